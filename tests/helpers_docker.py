"""The Dockerfile read as instructions, for the static checks of the image
(test_dockerfile.py) and the daemon test that runs its HEALTHCHECK
(test_packaging.py)."""

from __future__ import annotations

import json
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "dangling line continuation"
    return out


def instr(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions() if word == name]


def healthcheck_argv() -> list[str]:
    hc = instr("HEALTHCHECK")
    assert len(hc) == 1
    cmd = hc[0][hc[0].index("CMD") + 3:].strip()
    return json.loads(cmd)          # exec form: no shell needed in the image
