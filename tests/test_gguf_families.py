"""The GGUF coverage matrix (issue 22 item 3): every family of ``tiny_models.FAMILIES`` through
``matq quantize --layers linear`` and ``matq convert --to gguf --bits 4``, run by llama.cpp.

For each family, three llama.cpp runs are compared with transformers running matq's dequantized
int4 weights (causal LMs: logits of one text; BERT: mean-pooled embeddings):
- ``own``: llama.cpp's own converter, F32, of a Hugging Face folder holding those dequantized
  weights (what llama.cpp itself makes of them, the reference for how close llama.cpp gets);
- ``f32``: matq's export of the same slice as F32 (no activation quantization): its logits must be
  ``own``'s bit for bit (the same tensors, the same hyper-parameters);
- ``ownq``: ``own`` quantized by llama.cpp (``llama_model_quantize``, llama-quantize's library call) to
  the int4 file's main type; llama.cpp quantizes activations for quantized matmuls, so this sets
  the bar for
- ``q4``: the ``--bits 4`` file itself: mean |diff| within 1.25x ``ownq``'s + 0.01 sigma, max within
  1.5x + 0.05 sigma, correlation >= 0.99 (or ``ownq``'s: in tiny random MoE models activation
  quantization flips some top-k routing choices, in llama.cpp's own file as in matq's).
A family the pinned llama.cpp cannot run must be refused by ``matq convert`` in one line.

Each family's row must agree with the table committed in docs/export-gguf.md (tests/family_table.py)
in its structural columns; ``MATQ_GGUF_FAMILY_TABLE=update`` rewrites that table's rows of the
families run, and the README's summary of it, instead; ``MATQ_GGUF_FAMILY_TABLE=FILE`` writes the
rows run to FILE.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from family_table import FULL_HEAD, check_row, update
from gguf_helpers import llama_cpp_model
from tiny_models import FAMILIES, family_model

import matq_format as mf
from matq_cli.main import cli
from matq_converters import registry
from matq_converters.registry import ConvertOptions

pytestmark = [pytest.mark.llama_cpp, pytest.mark.slow]
llama_cpp = pytest.importorskip("llama_cpp")

TEXT = "The quick brown fox jumps over the lazy dog. def f(x):\n    return 3.14159 * x  # naïve café"
FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_S"}
"""The int4 file's main type -> the llama-quantize file type that makes it from llama.cpp's own F32."""


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(mean |diff|, max |diff|) in units of the reference's spread, and the correlation."""
    sigma = float(b.std())
    d = np.abs(a - b)
    return float(d.mean()) / sigma, float(d.max()) / sigma, float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def own_f32(hf_dir: Path, out: Path) -> Path:
    """llama.cpp's converter, as ``convert_hf_to_gguf.py --outtype f32``, in-process; a BPE vocabulary
    trained here has no known pre-tokenizer hash, so it is named from its split regex, as matq does."""
    import gguf
    import torch

    from matq_converters.exporters.gguf import converter
    from matq_converters.exporters.gguf.pretokenizer import bpe_pre

    conv = converter.load()
    hparams = conv.ModelBase.load_hparams(hf_dir, False)
    cls = conv.get_model_class(conv.get_model_architecture(hparams, conv.ModelType.TEXT), mmproj=False)
    base = cls.get_vocab_base_pre

    def pre(self, tokenizer):
        try:
            return base(self, tokenizer)
        except NotImplementedError:
            return bpe_pre(hf_dir / "tokenizer.json")

    named = type(cls.__name__, (cls,), {"model_arch": cls.model_arch, "get_vocab_base_pre": pre})
    with torch.inference_mode():
        named(hf_dir, gguf.LlamaFileType.ALL_F32, out).write()
    return out


def run(path: Path, ids: list[int], embedding: bool) -> np.ndarray:
    llm = llama_cpp_model(path, n_ctx=256, n_batch=256, n_threads=2, verbose=False, seed=0,
                          logits_all=not embedding, embedding=embedding)
    try:
        if embedding:
            return np.asarray(llm.embed(TEXT), np.float32)
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def table():
    rows: dict[str, str] = {}
    yield rows
    path = os.environ.get("MATQ_GGUF_FAMILY_TABLE")
    if path == "update":
        update(rows, list(FAMILIES))
    elif path:
        head = FULL_HEAD + "\n" + "|---" * 9 + "|\n"
        Path(path).write_text(head + "".join(rows[f] + "\n" for f in FAMILIES if f in rows))


def committed(family: str, row: str) -> None:
    """The row agrees with docs/export-gguf.md's table, unless this run rewrites it."""
    if os.environ.get("MATQ_GGUF_FAMILY_TABLE") != "update":
        check_row(family, row)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_quantizes_exports_and_runs_in_llama_cpp(family, tmp_path, table):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    hf = family_model(family, tmp_path / "hf")
    runner = CliRunner()
    r = runner.invoke(cli, ["quantize", str(hf), "-o", str(tmp_path / "ck"), "--layers", "linear"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["convert", str(tmp_path / "ck"), "--to", "gguf", "--bits", "4", "-o",
                            str(tmp_path / "q4.gguf"), "--json"])
    if r.exit_code:
        # a family the pinned llama.cpp cannot run: refused in one line, nothing written
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "q4.gguf").exists()
        table[family] = f"| {family} | - | - | - | - | - | - | - | refused: {r.output.strip()} |"
        committed(family, table[family])
        return
    q4 = json.loads(r.output[r.output.index("{"):])
    ckpt = mf.open(tmp_path / "ck")
    embedding = FAMILIES[family][0] == "bert"
    f32 = registry.get("gguf").convert(
        ckpt, tmp_path / "f32.gguf", ConvertOptions(bits=4, settings={"types": ["F32"], "outtype": "f32"})
    )

    # matq's int4 weights in a copy of the Hugging Face folder: transformers runs it (MoE experts fused
    # as it loads them) and llama.cpp's own converter converts it
    from safetensors.numpy import load_file, save_file

    deq = tmp_path / "deq"
    shutil.copytree(hf, deq)
    (weights,) = deq.glob("*.safetensors")
    tensors = load_file(weights)
    for name in ckpt.quantized_names():
        tensors[name] = ckpt.dequantize(name, 4).astype(tensors[name].dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    model = (AutoModel if embedding else AutoModelForCausalLM).from_pretrained(deq, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(TEXT).input_ids
    with torch.no_grad():
        if embedding:
            want = model(**tok(TEXT, return_tensors="pt")).last_hidden_state[0].mean(0).float().numpy()
        else:
            want = model(torch.tensor([ids])).logits[0].float().numpy()
    own_file = own_f32(deq, tmp_path / "own.gguf")
    main = max(set(q4["types"][n] for n in q4["widths"]), key=list(q4["types"].values()).count)
    ownq = tmp_path / "ownq.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = getattr(llama_cpp, FTYPES[main]), 2
    assert llama_cpp.llama_model_quantize(str(own_file).encode(), str(ownq).encode(), ctypes.byref(p)) == 0
    got = {
        "own": run(own_file, ids, embedding),
        "ownq": run(ownq, ids, embedding),
        "f32": run(f32.path, ids, embedding),
        "q4": run(Path(q4["path"]), ids, embedding),
    }
    own, ownq_, mine, q = (agreement(got[k], want) for k in ("own", "ownq", "f32", "q4"))
    types = ", ".join(sorted({q4["types"][n] for n in q4["widths"]}))
    same = np.array_equal(got["f32"], got["own"])
    f32_ok = same and mine[1] <= max(2 * own[1], 0.01)
    q4_ok = q[0] <= 1.25 * ownq_[0] + 0.01 and q[1] <= 1.5 * ownq_[1] + 0.05 and q[2] >= min(0.99, ownq_[2])
    table[family] = (
        f"| {family} | {q4['arch']} | {q4['exact_tensors']} / {q4['quantized_tensors']} | {types} "
        f"| {own[1]:.4f} | {'identical' if same else f'{mine[1]:.4f}'} "
        f"| {ownq_[0]:.3f} / {ownq_[1]:.3f} | {q[0]:.3f} / {q[1]:.3f}, {q[2]:.4f} "
        f"| {'runs, agrees' if f32_ok and q4_ok else 'DISAGREES'} |"
    )
    assert f32_ok, (family, own, mine)
    assert q4_ok, (family, ownq_, q)
    committed(family, table[family])
