"""``python -m relayd.ctl``: relayctl without the console script."""

import sys

from . import main

sys.exit(main())
