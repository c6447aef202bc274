"""The families x targets table: each cell written and checked by the test that checks it.

tests/family_table.json holds, for every family of ``tiny_models.FAMILIES``, one cell per column of
:data:`COLUMNS` and the GGUF figures row; README.md's table and docs/export-gguf.md's figures are
rendered from it between markers, never edited by hand. A test calls :func:`record` with the cell its
run produced: it must equal the committed cell, so the table cannot say what the tests no longer do.
``MATQ_FAMILY_TABLE=update`` makes :func:`record` rewrite the cell instead, and both pages with it
(under a lock, so ``-n 2`` workers may share the file). tests/test_readme.py checks the pages.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = Path(__file__).with_suffix(".json")
README = ROOT / "README.md"
DOCS = ROOT / "docs" / "export-gguf.md"
COLUMNS = {
    "quantize": ("`matq quantize --layers linear`", "tests/test_gguf_families.py"),
    "gguf": ("`--to gguf --bits 4`, run by llama.cpp", "tests/test_gguf_families.py"),
    "hf": ("`--to hf --bits 4`, run by transformers", "tests/test_gguf_families.py"),
    "onnx": ("`--to onnx --bits 4`, run by onnxruntime", "tests/test_onnx_export.py"),
    "trainer": ("`matq train` (torch)", "tests/test_train_families.py"),
}
"""Column key -> (heading, the test that writes and checks its cells)."""
FIGURES = "gguf_figures"
"""The key of each family's docs/export-gguf.md row (σ figures vary with the CPU: written, not checked)."""
FIGURES_HEAD = (
    "| family | GGUF arch | bit-exact / quantized | types (--bits 4) | own F32 max σ | matq F32 "
    "| own int4 mean / max σ | matq int4 mean / max σ, corr | result |"
)
MARKS = {
    README: ("<!-- families: tests/family_table.py renders tests/family_table.json here; do not edit -->",
             "<!-- /families -->"),
    DOCS: ("<!-- gguf-figures: tests/family_table.py renders tests/family_table.json here; do not edit -->",
           "<!-- /gguf-figures -->"),
}
UPDATE = os.environ.get("MATQ_FAMILY_TABLE") == "update"


def load() -> dict[str, dict]:
    """The committed table: family -> {column: cell}."""
    return json.loads(TABLE.read_text())


def record(family: str, column: str, cell: str | list[str], check: bool = True) -> None:
    """This run's ``cell``: written under ``MATQ_FAMILY_TABLE=update``, else (``check``) it must be
    the committed one."""
    if UPDATE:
        _update(family, column, cell)
        return
    if not check:
        return
    committed = load().get(family, {}).get(column)
    test = COLUMNS[column][1]
    assert cell == committed, (
        f"tests/family_table.json says {committed!r} for {family} / {column}, this run {cell!r}: "
        f"if the change is meant, run MATQ_FAMILY_TABLE=update pytest {test}"
    )


def _escape(cell: str) -> str:
    return cell.replace("|", r"\|")


def readme_table(table: dict[str, dict]) -> str:
    """The README's table: a row per family, a column per target."""
    out = ["| family | " + " | ".join(h for h, _ in COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for family, cells in table.items():
        out.append(f"| {family} | " + " | ".join(_escape(cells.get(c, "not run")) for c in COLUMNS) + " |")
    return "\n".join(out)


def figures_table(table: dict[str, dict]) -> str:
    """docs/export-gguf.md's coverage figures: the GGUF test's row per family."""
    rows = ["| " + " | ".join(map(_escape, c[FIGURES])) + " |" for c in table.values() if FIGURES in c]
    return "\n".join([FIGURES_HEAD, "|---" * 9 + "|", *rows])


def block(page: Path) -> str:
    """The text between ``page``'s markers, stripped."""
    text = page.read_text()
    begin, end = MARKS[page]
    if text.count(begin) != 1 or text.count(end) != 1:
        raise AssertionError(f"{page.name}: not exactly one {begin} ... {end} block")
    return text[text.index(begin) + len(begin):text.index(end)].strip()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _render(page: Path, table: str) -> None:
    text = page.read_text()
    begin, end = MARKS[page]
    block(page)  # exactly one block
    _write(page, text[: text.index(begin) + len(begin)] + "\n" + table + "\n" + text[text.index(end):])


def _update(family: str, column: str, cell: str | list[str]) -> None:
    """Merge one cell into the JSON, in ``FAMILIES``' order, and render both pages from it."""
    from tiny_models import FAMILIES

    with open(Path(tempfile.gettempdir()) / "matq-family-table.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = load() if TABLE.exists() else {}
        table.setdefault(family, {})[column] = cell
        order = [*COLUMNS, FIGURES]
        table = {f: {c: table[f][c] for c in order if c in table[f]}
                 for f in [*FAMILIES, *(f for f in table if f not in FAMILIES)] if f in table}
        _write(TABLE, _dumps(table))
        render()


def _dumps(table: dict[str, dict]) -> str:
    """JSON with a line per cell, so that a diff shows which cells changed."""
    def dump(x) -> str:
        return json.dumps(x, ensure_ascii=False)

    families = [
        f"  {dump(f)}: {{\n" + ",\n".join(f"    {dump(c)}: {dump(v)}" for c, v in cells.items()) + "\n  }"
        for f, cells in table.items()
    ]
    return "{\n" + ",\n".join(families) + "\n}\n"


def render() -> None:
    """Both pages' tables from the committed JSON."""
    table = load()
    _render(README, readme_table(table))
    _render(DOCS, figures_table(table))
