"""The GGUF coverage table: tests/test_gguf_families.py's results, between markers in
docs/export-gguf.md (every column) and README.md (a summary made from it here, never by hand).

``MATQ_GGUF_FAMILY_TABLE=update pytest tests/test_gguf_families.py`` rewrites the rows of the
families it ran in both pages (the others kept; under a lock, so ``-n 2`` workers may share it);
tests/test_readme.py checks that the README's summary is the docs table's, family for family.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "export-gguf.md"
README = ROOT / "README.md"
BEGIN = "<!-- gguf-families: tests/test_gguf_families.py writes this table; do not edit it by hand -->"
END = "<!-- /gguf-families -->"
FULL_HEAD = (
    "| family | GGUF arch | bit-exact / quantized | types (--bits 4) | own F32 max σ | matq F32 "
    "| own int4 mean / max σ | matq int4 mean / max σ, corr | result |"
)
SUMMARY_HEAD = "| family | `--to gguf` arch | quantized tensors bit-exact | types (`--bits 4`) | in llama.cpp |"
STRUCTURE = (0, 1, 2, 3, 8)
"""The columns a run must reproduce exactly (the σ figures vary with the CPU's kernels)."""


def cells(row: str) -> list[str]:
    """A Markdown table row's cells, stripped."""
    return [c.strip() for c in row.strip().strip("|").split("|")]


def block(text: str, page: Path) -> tuple[int, int]:
    """Start and end offsets of the lines between the markers."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise AssertionError(f"{page.name}: not exactly one gguf-families block")
    start, end = text.index(BEGIN) + len(BEGIN) + 1, text.index(END)
    return start, end


def rows(page: Path = DOCS) -> dict[str, list[str]]:
    """The table between the markers of ``page``: family -> cells, in the page's order."""
    text = page.read_text()
    start, end = block(text, page)
    lines = [ln for ln in text[start:end].splitlines() if ln.startswith("|")]
    return {cells(ln)[0]: cells(ln) for ln in lines[2:]}


def summary(full: dict[str, list[str]]) -> str:
    """The README's table, from the docs table's cells."""
    out = [SUMMARY_HEAD, "|---|---|---|---|---|"]
    for family, c in full.items():
        exact, _, quantized = (x.strip() for x in c[2].partition("/"))
        shown = "-" if not quantized else f"all {quantized}" if exact == quantized else f"{exact} of {quantized}"
        out.append(f"| {family} | {c[1]} | {shown} | {c[3]} | {c[8]} |")
    return "\n".join(out)


def _replace(page: Path, table: str) -> None:
    text = page.read_text()
    start, end = block(text, page)
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(text[:start] + table + "\n" + text[end:])
    os.replace(tmp, page)


def update(new: dict[str, str], order: list[str]) -> None:
    """Merge ``new`` (family -> full row) into docs/export-gguf.md, in ``order``, and rewrite the
    README's summary from the result."""
    with open(Path(tempfile.gettempdir()) / "matq-gguf-families.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {f: "| " + " | ".join(c) + " |" for f, c in rows(DOCS).items()}
        merged.update(new)
        known = [f for f in order if f in merged] + [f for f in merged if f not in order]
        _replace(DOCS, "\n".join([FULL_HEAD, "|" + "---|" * 9, *(merged[f] for f in known)]))
        _replace(README, summary(rows(DOCS)))


def check_row(family: str, row: str) -> None:
    """This run's row for ``family`` agrees with the committed docs table in every structural column."""
    committed = rows(DOCS).get(family)
    hint = "run MATQ_GGUF_FAMILY_TABLE=update pytest tests/test_gguf_families.py"
    assert committed is not None, f"docs/export-gguf.md's family table has no {family} row: {hint}"
    got = cells(row)
    for i in STRUCTURE:
        assert got[i] == committed[i], (
            f"docs/export-gguf.md says {committed[i]!r} for {family}, this run {got[i]!r}: {hint}"
        )
