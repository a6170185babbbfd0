"""bench/RESULTS.md is written by three runs: the default matrix (its header,
table, targets, memory and profile), the scale-out comparison and the
front comparison (each a section between markers of its own), followed by
bench/analysis.md. Each run replaces its own part and keeps the others', so
no run loses another's figures.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
ANALYSIS = HERE / "analysis.md"
ANALYSIS_HEADING = "## Analysis (hand-written"
MARKERS = {      # block -> (begin, end), in the order of the report
    "scaleout": ("<!-- scale-out: written by `python -m bench --scale-out`, "
                 "kept by the default run -->", "<!-- end of scale-out -->"),
    "front": ("<!-- front: written by `python -m bench --front ...`, kept by the other runs -->",
              "<!-- end of front -->"),
    "front_paced": ("<!-- front, paced: written by `python -m bench --front ... --rate R`, "
                    "kept by the other runs -->", "<!-- end of front, paced -->"),
}
BEGIN, END = MARKERS["scaleout"]


def _parts(text: str) -> tuple[str, dict[str, str]]:
    """(the matrix's part, each block with its markers) of an old report."""
    cut = text.find("\n" + ANALYSIS_HEADING)
    body = text if cut < 0 else text[:cut]
    blocks: dict[str, str] = {}
    first = len(body)
    for name, (begin, end) in MARKERS.items():
        start, stop = body.find(begin), body.find(end)
        if 0 <= start < stop:
            blocks[name] = body[start:stop + len(end)]
            first = min(first, start)
    return body[:first].strip(), blocks


def compose(out: Path, matrix: str | None = None, **sections: str | None) -> str:
    """The new report for ``out``: ``matrix`` and/or the named blocks
    (``scaleout``, ``front``, ``front_paced``) replace their parts of the old file (None:
    keep the old part), then the analysis."""
    unknown = set(sections) - set(MARKERS)
    if unknown:
        raise ValueError(f"no such section of RESULTS.md: {sorted(unknown)}")
    old_matrix, blocks = _parts(out.read_text()) if out.exists() else ("", {})
    matrix = old_matrix if matrix is None else matrix.strip()
    for name, section in sections.items():
        if section is not None:
            begin, end = MARKERS[name]
            blocks[name] = f"{begin}\n\n{section.strip()}\n\n{end}"
    parts = [matrix] + [blocks.get(name, "") for name in MARKERS]
    text = "\n\n".join(part for part in parts if part) + "\n"
    if ANALYSIS.exists():
        text += "\n" + ANALYSIS.read_text()
    return text


def write(out: Path, matrix: str | None = None, **sections: str | None) -> str:
    text = compose(out, matrix, **sections)
    out.write_text(text)
    return text
