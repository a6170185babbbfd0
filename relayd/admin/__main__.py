"""``python -m relayd.admin`` prints the admin socket's OpenAPI document, as
``GET /openapi.json`` answers it there: ``python -m relayd.admin >
docs/openapi.json`` brings the committed copy up to date."""

import sys

from . import UNIX_FAMILIES
from .openapi import document, render

sys.stdout.write(render(document(UNIX_FAMILIES)))
