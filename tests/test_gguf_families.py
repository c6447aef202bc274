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
The same checkpoint also goes ``--to hf --bits 4``: transformers loads the folder, and its logits
(BERT: embeddings) are those of the dequantized weights above, bit for bit.

Each family's cells of the families x targets table (quantize, ``--to gguf``, ``--to hf``, and the
GGUF figures of docs/export-gguf.md) must be the committed ones in tests/family_table.json;
``MATQ_FAMILY_TABLE=update`` rewrites them instead (tests/family_table.py).
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from family_table import FIGURES, record
from gguf_helpers import llama_cpp_model
from tiny_models import FAMILIES, family_model

import matq_format as mf
from matq_cli.main import cli
from matq_converters import registry
from matq_converters import roles as R
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


def quantize_cell(ckpt: mf.Checkpoint) -> str:
    """Tensors ``--layers linear`` quantized, by role."""
    roles = Counter(R.detect(ckpt.config).role(n) for n in ckpt.quantized_names())
    order = ["ffn", "attention", "router", "embedding", "head"]
    by_role = ", ".join(f"{role} {n}" for role, n in sorted(roles.items(), key=lambda x: order.index(x[0])))
    return f"{sum(roles.values())} of {len(ckpt.tensor_names())} tensors: {by_role}"


def dequantized_folder(hf: Path, ckpt: mf.Checkpoint, out: Path) -> Path:
    """A copy of the Hugging Face folder holding matq's int4 weights: transformers runs it (MoE experts
    fused as it loads them) and llama.cpp's own converter converts it."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(hf, out)
    (weights,) = out.glob("*.safetensors")
    tensors = load_file(weights)
    for name in ckpt.quantized_names():
        tensors[name] = ckpt.dequantize(name, 4).astype(tensors[name].dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def transformers_output(folder: Path, tok, embedding: bool) -> np.ndarray:
    """Logits of ``TEXT`` (BERT: its mean-pooled embedding) from transformers loading ``folder``."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    model = (AutoModel if embedding else AutoModelForCausalLM).from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        if embedding:
            return model(**tok(TEXT, return_tensors="pt")).last_hidden_state[0].mean(0).float().numpy()
        return model(torch.tensor([tok(TEXT).input_ids])).logits[0].float().numpy()


def hf_export(ckpt_dir: Path, out: Path, tok, embedding: bool, want: np.ndarray) -> tuple[str, bool]:
    """``--to hf --bits 4`` (the default layout), loaded by transformers: its table cell, and whether
    every quantized tensor is exact and the output ``want``'s bit for bit."""
    r = CliRunner().invoke(cli, ["convert", str(ckpt_dir), "--to", "hf", "--bits", "4", "-o", str(out), "--json"])
    if r.exit_code:
        return f"refused: {r.output.strip()}", False
    res = json.loads(r.stdout)
    same = np.array_equal(transformers_output(out, tok, embedding), want)
    n, packed = res["quantized_tensors"], len(res["containers"])
    shown = f"all {n} packed" if packed == n else f"{packed} of {n} packed"
    if res["dequantized"]:  # the warning says why: "... dequantized (<why>: ...)"
        why = re.search(r"dequantized \(([^:)]+)", r.stderr)
        shown += f", {len(res['dequantized'])} written dequantized ({why.group(1) if why else r.stderr.strip()})"
    cell = f"{res['layout']}, {shown}; {'logits bit for bit' if same else 'logits DIFFER'}"
    return cell, same and res["exact_tensors"] == n


@pytest.mark.parametrize("family", list(FAMILIES), ids=[re.sub(r"\W", "", f) for f in FAMILIES])
def test_family_quantizes_exports_and_runs_in_llama_cpp(family, tmp_path):
    from transformers import AutoTokenizer

    hf = family_model(family, tmp_path / "hf")
    runner = CliRunner()
    r = runner.invoke(cli, ["quantize", str(hf), "-o", str(tmp_path / "ck"), "--layers", "linear"])
    assert r.exit_code == 0, r.output
    ckpt = mf.open(tmp_path / "ck")
    record(family, "quantize", quantize_cell(ckpt))
    embedding = FAMILIES[family][0] == "bert"
    deq = dequantized_folder(hf, ckpt, tmp_path / "deq")
    tok = AutoTokenizer.from_pretrained(hf)
    ids = tok(TEXT).input_ids
    want = transformers_output(deq, tok, embedding)

    cell, hf_ok = hf_export(tmp_path / "ck", tmp_path / "hf4", tok, embedding, want)
    record(family, "hf", cell)
    assert hf_ok, cell

    r = runner.invoke(cli, ["convert", str(tmp_path / "ck"), "--to", "gguf", "--bits", "4", "-o",
                            str(tmp_path / "q4.gguf"), "--json"])
    if r.exit_code:
        # a family the pinned llama.cpp cannot run: refused in one line, nothing written
        record(family, "gguf", f"refused: {r.output.strip()}")
        record(family, FIGURES, [family, *"-" * 7, f"refused: {r.output.strip()}"], check=False)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "q4.gguf").exists()
        return
    q4 = json.loads(r.output[r.output.index("{"):])
    f32 = registry.get("gguf").convert(
        ckpt, tmp_path / "f32.gguf", ConvertOptions(bits=4, settings={"types": ["F32"], "outtype": "f32"})
    )
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
    result = "runs, agrees" if f32_ok and q4_ok else "DISAGREES"
    exact, n = q4["exact_tensors"], q4["quantized_tensors"]
    record(family, FIGURES, [
        family, q4["arch"], f"{exact} / {n}", types, f"{own[1]:.4f}", "identical" if same else f"{mine[1]:.4f}",
        f"{ownq_[0]:.3f} / {ownq_[1]:.3f}", f"{q[0]:.3f} / {q[1]:.3f}, {q[2]:.4f}", result,
    ], check=False)
    shown = f"all {n}" if exact == n else f"{exact} of {n}"
    record(family, "gguf", f"`{q4['arch']}`, {shown} bit-exact ({types}); {result}")
    assert f32_ok, (family, own, mine)
    assert q4_ok, (family, ownq_, q)
