"""External tools that some tests run (promtool, ...): found on PATH, else
skipped locally with the install command and failed under CI (CI=true), so
they are never silently skipped there."""

from __future__ import annotations

import os
import shutil

import pytest


def absent(message: str) -> None:
    """A tool that is not installed: skipped locally, failed under CI."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        absent(f"{name} is not installed: apt-get install {package}")
    assert path is not None
    return path
