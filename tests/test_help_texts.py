"""--help texts are for people who installed relayd from the package index:
they never point at SPEC sections or into a source tree they do not have."""

from __future__ import annotations

import subprocess
import sys

import pytest

GROUPS = ["owner", "app", "user", "smtp", "domain", "status", "lockout"]


def help_of(module: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, *args, "--help"], capture_output=True,
                         text=True, timeout=60, env={"COLUMNS": "100", "PATH": ""})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("args", [("relayd",), ("relayd.ctl",),
                                  *(("relayd.ctl", g) for g in GROUPS)])
def test_help_names_no_spec_section_and_no_source_path(args):
    text = help_of(*args)
    assert text.strip()
    for word in ("SPEC", "source tree", "config/relayd.yaml", ".py"):
        assert word not in text, (args, word)
