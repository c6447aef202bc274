"""`matq import-gguf`: a GGUF file as a float Hugging Face folder that transformers loads, with the
logits transformers computes from the GGUF itself; bad inputs refused before any work; progress lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf_helpers import to_matq
from tiny_models import tiny_hf_model

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from matq_cli.main import cli  # noqa: E402
from matq_converters import registry  # noqa: E402
from matq_converters.importers.gguf import RECORD, GGUFImportError, import_gguf  # noqa: E402
from matq_converters.registry import ConvertOptions  # noqa: E402

IDS = [[1, 5, 9, 20, 7, 300, 42, 11]]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Llama, quantized in the GGUF layout and written as int4 (Q4 blocks, not plain floats)."""
    base = tmp_path_factory.mktemp("import-gguf")
    hf = tiny_hf_model("llama", base / "hf")
    ckpt = to_matq(hf, base / "ck", group_size=32, symmetric=True)
    registry.get("gguf").convert(ckpt, base / "src" / "tiny.gguf", ConvertOptions(bits=4))
    return base / "src" / "tiny.gguf"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def test_folder_loads_in_transformers_with_the_logits_of_the_gguf(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = import_gguf(tiny_gguf, tmp_path / "float")
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    folder = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(folder.config, "quantization_config", None) is None
    assert folder.dtype == torch.float32
    assert torch.equal(_logits(folder), _logits(direct))
    tok = AutoTokenizer.from_pretrained(out)
    want = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    assert tok("The quick brown fox")["input_ids"] == want("The quick brown fox")["input_ids"]
    record = json.loads((out / RECORD).read_text())
    assert record["source"] == "tiny.gguf" and sorted(p.name for p in out.iterdir()) == record["files"]


def test_cli_writes_bfloat16_and_replaces_only_its_own_folder(tiny_gguf, tmp_path):
    out = tmp_path / "bf16"
    r = CliRunner().invoke(cli, ["import-gguf", str(tiny_gguf), "-o", str(out), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    assert f"{out}: a bfloat16 model folder from tiny.gguf" in r.output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    r = CliRunner().invoke(cli, ["import-gguf", str(tiny_gguf), "-o", str(out)])
    assert r.exit_code == 1 and "already exists (use --force" in r.output
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(cli, ["import-gguf", str(tiny_gguf), "-o", str(out), "--force"])
    assert r.exit_code == 1 and "notes.txt" in r.output and (out / "notes.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    r = CliRunner().invoke(cli, ["import-gguf", str(tiny_gguf), "-o", str(other), "--force"])
    assert r.exit_code == 1 and "is not a float model folder from a GGUF" in r.output


def test_not_a_gguf_is_refused_before_transformers_reads_it(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04not a gguf")
    with pytest.raises(GGUFImportError, match="is not a GGUF file"):
        import_gguf(bad, tmp_path / "out")
    with pytest.raises(GGUFImportError, match="is a folder"):
        import_gguf(tmp_path, tmp_path / "out2")
    r = CliRunner().invoke(cli, ["import-gguf", str(bad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "is not a GGUF file" in r.output
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_is_one_line(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "odd.gguf", "notanarch")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFImportError, match="transformers cannot read it"):
        import_gguf(tmp_path / "odd.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
