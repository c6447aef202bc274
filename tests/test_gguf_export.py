"""GGUF export (issue 4): exact block encodings, type choice, file contents, registry, CLI.

The llama.cpp runs (loading, tokenizing, logits) are in test_gguf_llama_cpp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from gguf_helpers import hf_tensors, to_matq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import family_model, tiny_hf_model

import matq_format as mf
from matq_cli.main import cli
from matq_converters import registry
from matq_converters.exporters.gguf import blocks as B
from matq_converters.exporters.gguf import params as G
from matq_converters.registry import (
    ConvertOptionError,
    ConvertOptions,
    TokenizerError,
    UnknownConverterError,
    UnsupportedModelError,
)
from matq_format import numerics as N
from matq_format.errors import PlanError, WriterError

WIDTHS = [
    (8, False),
    (6, False),
    (6, True),
    (4, False),
    (4, True),
    (3, False),
    (3, True),
    (2, False),
    (2, True),
]
K_MULT = {T.Q2_K: 15, T.Q4_K: 63, T.Q5_K: 63}
SIGNED_MULT = {T.Q3_K: 31, T.Q6_K: 127}


# --- references, written from numerics and gguf/params (ggml's block parameters and decoders) -----
def reference(sl: B.Slice, qtype: T) -> np.ndarray:
    """What ggml's decoder must return for ``sl`` stored as ``qtype``."""
    c, r, g = sl.code_bits, sl.bits, sl.group_size
    cols = sl.k.shape[1]

    def per_elem(p):
        return np.broadcast_to(N.expand_groups(np.asarray(p), cols, g), sl.k.shape)

    if qtype in (T.F16, T.F32):
        return sl.dequantize()
    if qtype in (T.Q4_1, T.Q5_1):
        d, m = G.ggml_affine_params(sl.scale, sl.zero, c, r)
        return G.dequantize_q4_1_reference(sl.k, per_elem(d), per_elem(m))
    if qtype in K_MULT:
        d, sc, dmin, mn = G.ggml_k_params(sl.scale, sl.zero, c, r, K_MULT[qtype])
        return G.dequantize_k_reference(sl.k, per_elem(d), per_elem(sc), per_elem(dmin), per_elem(mn))
    s = c - r
    j, zq = G.ggml_zero_split(sl.zero, s)
    levels = sl.k.astype(np.int32) * per_elem(1 << (s - j)) - per_elem(zq)
    if qtype in (T.Q8_0, T.Q5_0, T.Q4_0):
        d = N.fp16_round(sl.scale * np.exp2(j).astype(np.float32))
    else:
        d0, sc = G.fp16_times_int(sl.scale * np.float32(1 << s), SIGNED_MULT[qtype])
        d = d0 * sc.astype(np.float32)
    return G.dequantize_q8_0_reference(levels, per_elem(d))


def decode(enc: B.Encoded) -> np.ndarray:
    if enc.qtype in (T.F16, T.F32):
        return enc.data.astype(np.float32)
    return gguf.quants.dequantize(enc.data, enc.qtype)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def make_slice(rng, rows, cols, group, sym, zm, scale, r, ep) -> B.Slice:
    w = (rng.standard_normal((rows, cols)) * scale + rng.normal() * scale * 0.3).astype(np.float32)
    a, z = N.minmax_params(w, 8, group, symmetric=sym, zero_multiple=zm)
    q = N.quantize(w, a, z, 8, group)
    return B.Slice(N.slice_codes(q, 8, r, ep and r < 8), a, z, 8, r, group, ep and r < 8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    rows=st.integers(1, 5),
    cols=st.sampled_from([256, 512, 96, 100]),
    group=st.sampled_from([None, 32, 128, 256]),
    sym=st.booleans(),
    zm=st.sampled_from([1, 4, 16]),
    scale=st.sampled_from([1e-4, 0.02, 1.0, 300.0]),
    width=st.sampled_from(WIDTHS),
)
def test_every_type_decodes_to_the_numerics_reference(seed, rows, cols, group, sym, zm, scale, width):
    """gguf.quants.dequantize of each encoding == the numerics reference, bit for bit; exact claims hold."""
    if group is not None and cols % group:
        group = None
    sl = make_slice(np.random.default_rng(seed), rows, cols, group, sym, zm, scale, *width)
    for qtype in B.ORDER:
        enc = B.encode_as(sl, qtype)
        if enc is None:
            continue
        got = decode(enc)
        assert bits_equal(got, reference(sl, qtype)), qtype.name
        assert bits_equal(B.decode(enc), got), qtype.name  # decoded from the levels, bytes not unpacked
        if enc.exact:
            assert bits_equal(got, sl.dequantize()), qtype.name


# (scheme, group) -> width -> the type the exporter picks; the README's table says the same
EXPECTED = {
    ("asym", None): "F32 F32 F32 Q4_K Q5_K Q4_K Q4_K Q2_K Q4_K",
    ("asym", 128): "F32 F32 F32 Q4_1 Q5_1 Q4_1 Q4_1 Q4_1 Q4_1",
    ("asym16", None): "F32 Q8_0 Q8_0 Q4_K Q5_K Q4_K Q4_K Q2_K Q4_K",
    ("sym", None): "Q8_0 Q6_K Q8_0 Q4_K Q5_K Q3_K Q4_K Q2_K Q3_K",
    ("sym", 128): "Q8_0 Q8_0 Q8_0 Q4_0 Q5_0 Q4_0 Q4_0 Q4_0 Q4_0",
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_smallest_exact_type_per_width(key):
    scheme, group = key
    rng = np.random.default_rng(3)
    got = []
    for r, ep in WIDTHS:
        sl = make_slice(rng, 8, 512, group, scheme == "sym", 16 if scheme == "asym16" else 1, 0.05, r, ep)
        enc = B.encode(sl)
        got.append(enc.qtype.name)
        # symmetric and zero-multiple-16 per-channel checkpoints decode bit-identically at every width
        if scheme in ("sym", "asym16") and group is None:
            assert enc.exact and bits_equal(decode(enc), sl.dequantize())
    assert " ".join(got) == EXPECTED[key]


def test_rows_that_fit_no_block_fall_back_to_exact_floats():
    rng = np.random.default_rng(0)
    sl = make_slice(rng, 4, 100, None, True, 1, 0.05, 2, False)  # 100 columns: no 32- or 256-block
    enc = B.encode(sl)
    assert enc.qtype in (T.F16, T.F32) and bits_equal(decode(enc), sl.dequantize())
    sl = make_slice(rng, 4, 512, 64, False, 1, 0.05, 2, False)  # group 64: K-quants would span 4 groups
    assert B.encode(sl).qtype == T.Q4_1
    assert B.encode(sl, allowed=(T.Q2_K,)).qtype == T.F32  # F32 always remains


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda q: q.name)
def test_ggml_quantizes_dense_tensors_as_gguf_py_does(qtype):
    """Dense tensors are refitted by ggml's own ``ggml_quantize_chunk`` where llama-cpp-python is
    installed (as in CI), by gguf-py's numpy port elsewhere: the bytes must not depend on which.
    Rows beyond one chunk, an all-zero block and rows of very different scales included."""
    from matq_converters.exporters.gguf import ggml

    assert ggml.available(), "llama-cpp-python's libggml not found"
    rng = np.random.default_rng(1)
    rows = ggml.CHUNK // 96 + 3
    w = (rng.standard_normal((rows, 96)) * rng.uniform(0, 4, (rows, 1))).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :5] = [1e-30, -7e4, 3.5, 0.5, -0.5]
    got = B.refit(w, qtype)
    assert got.qtype == qtype
    assert np.array_equal(got.data, gguf.quants.quantize(w, qtype))


def test_k_quant_multiplier_makes_products_exact():
    t = np.array([3 * 0.125, 127 * 0.0009765625, 0.0, 1e9], np.float32)
    b, n = G.fp16_times_int(t, 63)
    prod = b * n.astype(np.float32)
    assert np.array_equal(prod[:3], t[:3]) and not np.isfinite(b[3])


# --- exported files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("gguf-export")
    hf = {a: tiny_hf_model(a, base / f"hf-{a}") for a in ("llama", "gemma2", "qwen2")}
    ck = {
        "llama": to_matq(hf["llama"], base / "ck-llama"),
        "gemma2": to_matq(hf["gemma2"], base / "ck-gemma2", symmetric=True),
        "qwen2": to_matq(hf["qwen2"], base / "ck-qwen2", group_size=128, quantize_embeddings=True),
    }
    return base, hf, ck


def export(ckpt, out, **kw) -> registry.ConvertResult:
    """The exact export (``--exact``) unless ``extra`` says otherwise: these tests check grids bit for bit."""
    settings = {"exact": True, **kw.pop("extra", {})}
    if "outtype" in kw:
        settings["outtype"] = kw.pop("outtype")
    return registry.get("gguf").convert(ckpt, out, ConvertOptions(overwrite=True, settings=settings, **kw))


def fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.token")}


def gguf_names(res: registry.ConvertResult, ckpt) -> dict[str, str]:
    """Quantized tensor -> the GGUF tensor written from it alone (the export's own account)."""
    q = set(ckpt.quantized_names())
    return {s[0]: g for g, s in res.details["sources"].items() if len(s) == 1 and s[0] in q}


def llama_permute(x: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, applied to any per-row array."""
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


@pytest.mark.parametrize(
    "arch,bits,ep", [("llama", 4, False), ("llama", 2, True), ("gemma2", 3, False), ("qwen2", 2, False)]
)
def test_written_tensors_equal_the_reference_bit_for_bit(models, tmp_path, arch, bits, ep):
    _, _, cks = models
    ckpt = cks[arch]
    res = export(ckpt, tmp_path / "m.gguf", bits=bits, extra_precision=ep)
    reader = gguf.GGUFReader(res.path)
    cfg = ckpt.config
    by_gguf = {g: s[0] for g, s in res.details["sources"].items() if s[0] in ckpt.quantized_names()}
    assert sorted(by_gguf.values()) == sorted(ckpt.quantized_names())
    exact = 0
    for t in reader.tensors:
        hf = by_gguf.get(t.name)
        if hf is None:
            continue
        k, a, z = ckpt.sliced_codes(hf, bits, ep), ckpt.scale(hf), ckpt.zero(hf)
        want = ckpt.dequantize(hf, bits, ep)
        if arch == "llama" and t.name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
            k, a, z, want = (llama_permute(x, heads) for x in (k, a, z, want))
        sl = B.Slice(k, a, z, 8, bits, ckpt.info(hf).group_size, ep)
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        assert bits_equal(got, reference(sl, T(t.tensor_type))), t.name
        if bits_equal(got, want):
            exact += 1
    kv = fields(reader)
    assert kv["matq.exact_tensors"] == exact == res.details["exact_tensors"]
    assert kv["matq.quantized_tensors"] == len(by_gguf)
    if arch == "gemma2":  # symmetric: every slice is bit-identical to ckpt.dequantize
        assert kv["matq.exact"] and exact == len(by_gguf)


def test_metadata_says_where_the_file_came_from(models, tmp_path):
    _, _, cks = models
    ckpt = cks["llama"]
    res = export(ckpt, tmp_path / "m.gguf", bits=4)
    kv = fields(gguf.GGUFReader(res.path))
    assert kv["general.architecture"] == "llama"
    assert kv["matq.source.digest"] == ckpt.digest
    assert kv["matq.code_bits"] == 8 and kv["matq.bits"] == 4 and kv["matq.plan"] == "4"
    assert kv["matq.extra_precision"] is False
    assert set(json.loads(kv["matq.widths"]).values()) == {4}
    assert kv["matq.format_version"] == ckpt.version
    assert json.loads(kv["matq.source"]) == ckpt.source
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv["llama.rope.dimension_count"] == 64 and kv["llama.attention.head_count_kv"] == 2
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_S


def test_mix_and_match_plan(models, tmp_path):
    _, _, cks = models
    ckpt = cks["llama"]
    plan = {n: (2 if "mlp" in n else 8) for n in ckpt.quantized_names()}
    res = export(ckpt, tmp_path / "m.gguf", plan=plan)
    kv = fields(gguf.GGUFReader(res.path))
    widths = json.loads(kv["matq.widths"])
    assert kv["matq.plan"] == "custom" and "matq.bits" not in kv
    assert {w for n, w in widths.items() if "ffn" in n} == {2} and {
        w for n, w in widths.items() if "attn" in n
    } == {8}
    assert {res.details["types"][n] for n in widths if "ffn" in n} == {"Q2_K"}
    res = export(ckpt, tmp_path / "p.gguf", plan="pyramid:2,4")
    assert fields(gguf.GGUFReader(res.path))["matq.plan"] == "pyramid:2,4"


def test_gemma_norms_get_their_offset_and_lm_head_is_tied(models, tmp_path):
    _, hf, cks = models
    res = export(cks["gemma2"], tmp_path / "m.gguf", bits=4)
    reader = gguf.GGUFReader(res.path)
    got = {t.name: np.array(t.data) for t in reader.tensors}
    src = hf_tensors(hf["gemma2"])
    assert "output.weight" not in got
    np.testing.assert_array_equal(
        got["blk.0.post_ffw_norm.weight"], src["model.layers.0.post_feedforward_layernorm.weight"] + 1
    )
    np.testing.assert_array_equal(got["output_norm.weight"], src["model.norm.weight"] + 1)
    kv = fields(reader)
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.add_space_prefix"] is False
    assert kv["gemma2.attn_logit_softcapping"] == pytest.approx(50.0)


@pytest.mark.parametrize("outtype,want", [("auto", T.F32), ("f16", T.F16), ("bf16", T.BF16), ("f32", T.F32)])
def test_outtype_for_unquantized_tensors(models, tmp_path, outtype, want):
    _, hf, cks = models
    res = export(cks["llama"], tmp_path / "m.gguf", bits=4, outtype=outtype)
    tensors = {t.name: t for t in gguf.GGUFReader(res.path).tensors}
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == want and tensors["output_norm.weight"].tensor_type == T.F32
    src = hf_tensors(hf["llama"])["model.embed_tokens.weight"]
    expect = gguf.quants.dequantize(gguf.quants.quantize(src, want), want) if want != T.F32 else src
    np.testing.assert_array_equal(gguf.quants.dequantize(emb.data, emb.tensor_type), expect)


# --- failures ---------------------------------------------------------------------------------------
def test_bad_requests_fail_before_writing(models, tmp_path):
    base, hf, cks = models
    ckpt = cks["llama"]
    out = tmp_path / "m.gguf"
    with pytest.raises(ConvertOptionError):
        export(ckpt, out, bits=4, plan="pyramid")
    with pytest.raises(ConvertOptionError):
        export(ckpt, out, bits=4, outtype="q8")
    with pytest.raises(mf.errors.PlanError):
        export(ckpt, out, bits=9)
    out.write_bytes(b"keep")
    with pytest.raises(WriterError):
        registry.get("gguf").convert(ckpt, out, ConvertOptions(bits=4))
    assert out.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _edit_copy(src: Path, dst: Path, edit) -> mf.Checkpoint:
    """A copy of ``src`` whose carried files were edited and re-recorded (checksums match)."""
    ck = mf.open(src)
    side = dst.with_name(dst.name + "-side")
    for rel, data in ck.carried_bytes().items():
        (side / rel).parent.mkdir(parents=True, exist_ok=True)
        (side / rel).write_bytes(data)
    edit(side)
    with mf.CheckpointWriter(dst, ck.code_bits, carry_from=side) as w:
        for name in ck.tensor_names():
            t = ck.info(name)
            if not t.quantized:
                w.add_dense(name, ck.dense(name), t.dtype)
                continue
            w.add_quantized_planes(
                name,
                {k: ck.plane(name, k) for k in t.planes},
                ck.scale(name),
                ck.zero(name),
                shape=t.shape,
                dtype=t.dtype,
                group_size=t.group_size,
                scheme=t.scheme,
                scale_dtype=t.scale_dtype,
                zero_dtype=t.zero_dtype,
                extra_precision=t.extra_precision,
            )
    return mf.open(dst, verify_reads=True)


def test_unsupported_architecture_tokenizer_and_tensors(models, tmp_path):
    _, _, cks = models
    root = cks["llama"].root

    def arch(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(architectures=["NoSuchForCausalLM"], model_type="nosuch")
        (d / "config.json").write_text(json.dumps(cfg))

    ck = _edit_copy(root, tmp_path / "a", arch)
    with pytest.raises(UnsupportedModelError, match="NoSuchForCausalLM is not one llama.cpp .* converter knows"):
        export(ck, tmp_path / "a.gguf", bits=4)
    ck = _edit_copy(root, tmp_path / "b", lambda d: (d / "tokenizer.json").unlink())
    with pytest.raises(TokenizerError, match="could not build its vocabulary.*carried: tokenizer_config.json"):
        export(ck, tmp_path / "b.gguf", bits=4)

    def odd_pre(d):
        tj = json.loads((d / "tokenizer.json").read_text())
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
        (d / "tokenizer.json").write_text(json.dumps(tj))

    ck = _edit_copy(root, tmp_path / "c", odd_pre)
    with pytest.raises(TokenizerError, match="tokenizer_pre"):
        export(ck, tmp_path / "c.gguf", bits=4)
    res = export(ck, tmp_path / "c.gguf", bits=4, extra={"tokenizer_pre": "gpt-2"})
    assert fields(gguf.GGUFReader(res.path))["tokenizer.ggml.pre"] == "gpt-2"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_unmapped_tensor_and_single_file_checkpoint(models, tmp_path):
    _, hf, _ = models
    with mf.CheckpointWriter(tmp_path / "ck", carry_from=hf["llama"]) as w:
        for i in range(2):  # as many numbered blocks as the config's layers
            w.add_dense(f"model.layers.{i}.mystery.weight", np.zeros((4, 4), np.float32))
        w.add_dense("model.embed_tokens.weight", np.zeros((512, 256), np.float32))
    with pytest.raises(UnsupportedModelError, match="mystery"):
        export(mf.open(tmp_path / "ck"), tmp_path / "m.gguf", bits=8)
    with mf.CheckpointWriter(tmp_path / "one.safetensors", single_file=True) as w:
        w.add_dense("model.embed_tokens.weight", np.zeros((4, 4), np.float32))
    with pytest.raises(UnsupportedModelError, match="config.json"):
        export(mf.open(tmp_path / "one.safetensors"), tmp_path / "m.gguf", bits=8)


def test_a_failure_midway_leaves_nothing(models, tmp_path, monkeypatch):
    _, _, cks = models
    calls = []

    def failing(sl, allowed=None):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated")
        return real(sl, allowed)

    real = B.encode
    monkeypatch.setattr(B, "encode", failing)
    with pytest.raises(MemoryError):
        export(cks["llama"], tmp_path / "m.gguf", bits=4)
    assert list(tmp_path.iterdir()) == []


# --- registry and CLI -------------------------------------------------------------------------------
def test_registry():
    assert "gguf" in registry.names()
    assert isinstance(registry.get("gguf"), registry.Converter)
    with pytest.raises(UnknownConverterError, match="known: .*gguf"):
        registry.get("tflite")

    class Echo:
        name, description, suffix, dependencies = "echo", "test", ".txt", ()

        def validate(self, ckpt, options):
            return []

        def convert(self, ckpt, out, options, progress=None):
            return registry.ConvertResult(Path(out), "ok")

    registry.register("echo", Echo)
    try:
        assert "echo" in registry.names() and registry.get("echo").name == "echo"
    finally:
        registry.exporters.unregister("echo")


def test_cli_convert(models, tmp_path):
    _, _, cks = models
    ck = str(cks["gemma2"].root)
    runner = CliRunner()
    r = runner.invoke(cli, ["convert", ck, "--to", "gguf", "--bits", "2", "-o", str(tmp_path / "a.gguf")])
    assert r.exit_code == 0, r.output
    assert "14/14 quantized tensors bit-exact" in r.output and "Q2_K" in r.output
    r = runner.invoke(cli, ["convert", ck, "--to", "gguf", "--bits", "2", "-o", str(tmp_path / "a.gguf")])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(
        cli,
        ["convert", ck, "--to", "gguf", "--plan", "4", "--json", "--force", "-o", str(tmp_path / "a.gguf")],
    )
    assert r.exit_code == 0 and json.loads(r.output)["types"]["blk.0.ffn_up.weight"] == "Q4_K"
    r = runner.invoke(cli, ["convert", ck, "--to", "onnx2", "--bits", "2", "-o", str(tmp_path / "b")])
    assert r.exit_code == 1 and "unknown converter 'onnx2'; known: " in r.output
    r = runner.invoke(
        cli, ["convert", ck, "--to", "gguf", "--bits", "2", "--plan", "4", "-o", str(tmp_path / "b")]
    )
    assert r.exit_code == 2
    assert "Examples:" in runner.invoke(cli, ["convert", "--help"]).output


def test_float_slices_is_what_llama_cpps_converter_would_write(models, tmp_path):
    """The baseline bench/gguf.py feeds to llama.cpp's quantizer: the slice, rounded to f16."""
    _, _, cks = models
    ckpt = cks["gemma2"]
    res = export(ckpt, tmp_path / "m.gguf", bits=4, extra={"float_slices": "f16"})
    t = {t.name: t for t in gguf.GGUFReader(res.path).tensors}["blk.1.ffn_down.weight"]
    want = ckpt.dequantize("model.layers.1.mlp.down_proj.weight", 4).astype(np.float16)
    assert t.tensor_type == T.F16 and np.array_equal(np.asarray(t.data), want)
    with pytest.raises(ConvertOptionError):
        export(ckpt, tmp_path / "m.gguf", bits=4, extra={"float_slices": "q8"})


# --- compact files (the default): the width's llama.cpp type, exact where the grid allows -----------
def nested_reference(sl: B.Slice, qtype: T) -> np.ndarray:
    """A K type's decode with one step (and minimum) per sub-block, from ggml_params.fp16_times_ints."""
    c, r, g = sl.code_bits, sl.bits, sl.group_size
    rows, cols = sl.k.shape
    sub = B.SUB_BLOCK[qtype]
    per_sub = lambda p: np.repeat(N.expand_groups(p, cols, g)[:, ::sub].reshape(-1, 256 // sub), 1, 0)  # noqa: E731
    step = per_sub(sl.scale * np.float32(1 << (c - r)))
    d, sc = G.fp16_times_ints(step, {T.Q2_K: 15, T.Q3_K: 31, T.Q6_K: 127}.get(qtype, 63))
    elem = lambda p: np.repeat(p.reshape(-1), sub).reshape(rows, cols)  # noqa: E731
    stepv = elem(d[:, None] * sc.astype(np.float32))
    if qtype in K_MULT:
        dmin, mn = G.fp16_times_ints(per_sub(sl.scale * sl.zero), K_MULT[qtype])
        return G.dequantize_k_reference(sl.k, stepv, 1.0, elem(dmin[:, None] * mn.astype(np.float32)), 1.0)
    j, zq = G.ggml_zero_split(sl.zero, c - r)
    levels = sl.k.astype(np.int32) - N.expand_groups(zq, cols, g)
    return G.dequantize_q8_0_reference(levels, stepv)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31),
    group=st.sampled_from([32, 64, 128]),
    sym=st.booleans(),
    width=st.sampled_from(WIDTHS),
    nested=st.booleans(),
)
def test_nested_k_types_decode_to_their_reference(seed, group, sym, width, nested):
    """Groups smaller than a super-block: one integer step per sub-block; exact when the groups'
    scales are integer multiples of one fp16 value (a layout built for it), else within rounding."""
    rng = np.random.default_rng(seed)
    sl = make_slice(rng, 3, 512, group, sym, 1, 0.05, *width)
    if nested:  # scales that nest: alpha_g = D * m_g with m_g <= 15, D an fp16 power of two
        m = rng.integers(8, 16, sl.scale.shape).astype(np.float32)
        sl = B.Slice(sl.k, m * np.float32(2.0**-12), sl.zero, 8, sl.bits, group, sl.extra_precision)
    for qtype in B.SUB_BLOCK:
        enc = B.encode_nested(sl, qtype)
        if enc is None:
            continue
        got = decode(enc)
        assert bits_equal(got, nested_reference(sl, qtype)), qtype.name
        assert bits_equal(B.decode(enc), got), qtype.name
        if enc.exact:
            assert bits_equal(got, sl.dequantize()), qtype.name
        elif nested and sym:  # symmetric zero points nest too (z = 128 on every grid)
            raise AssertionError(f"{qtype.name}: nested scales must be exact")


@pytest.mark.parametrize("cols", [576, 512])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group", [None, 128])
def test_compact_types_are_no_bigger_than_llama_cpps_and_say_how_exact(cols, sym, group):
    rng = np.random.default_rng(cols + sym)
    for r, ep in WIDTHS:
        sl = make_slice(rng, 8, cols, group, sym, 1, 0.05, r, ep)
        enc = B.encode_compact(sl)
        target = B.compact_type(r + (1 if ep and r < 8 else 0), cols)
        want = sl.dequantize()
        if enc.exact:
            assert bits_equal(decode(enc), want) and B.bits_per_weight(enc.qtype) <= B.bits_per_weight(target)
            continue
        if enc.qtype != target:  # an asymmetric int3 keeps its levels one type up
            assert not sym and r + ep == 3 and enc.qtype in (T.Q4_K, T.Q4_1), (r, ep, enc.qtype.name)
        err = B.rel_rms_error(enc, want)
        # levels kept, parameters rounded (fine K scales; Q2_K's 4-bit ones are coarser); or, for an
        # asymmetric grid in an offset-free type, values re-fitted: within half a step of the slice
        moved = not sym and enc.qtype in (T.Q8_0, T.Q6_K)
        bound = (
            {8: 0.01, 7: 0.01, 6: 0.03, 5: 0.03, 4: 0.1, 3: 0.25}[r + ep]
            if moved
            else 0.03
            if r + ep > 2
            else 0.1
        )
        assert 0 < err < bound, (r, ep, enc.qtype.name, err)


def test_compact_file_sizes_fall_with_width_and_record_their_error(models, tmp_path):
    _, _, cks = models
    ckpt = cks["llama"]  # per channel, z % 16 == 0: K types hold most slices exactly
    sizes = {}
    for bits in (8, 4, 3, 2):
        res = export(ckpt, tmp_path / f"m{bits}.gguf", bits=bits, extra={"exact": False})
        sizes[bits] = res.details["bytes"]
        reader = gguf.GGUFReader(res.path)
        kv = fields(reader)
        refit = json.loads(kv.get("matq.refit_rel_rms", "{}"))
        assert refit == res.details["refit_rel_rms"]
        assert kv["matq.exact_tensors"] + len(refit) == kv["matq.quantized_tensors"]
        tensors = {t.name: t for t in reader.tensors}
        cfg = ckpt.config
        for hf, g in gguf_names(res, ckpt).items():
            want = ckpt.dequantize(hf, bits)
            if g.split(".")[-2] in ("attn_q", "attn_k"):
                heads = cfg["num_attention_heads"] if "attn_q" in g else cfg["num_key_value_heads"]
                want = llama_permute(want, heads)
            got = gguf.quants.dequantize(tensors[g].data, tensors[g].tensor_type).astype(np.float64)
            err = float(np.sqrt(np.sum((got - want) ** 2) / np.sum(want.astype(np.float64) ** 2)))
            if g in refit:
                assert err == pytest.approx(refit[g], rel=1e-9), g
            else:
                assert err == 0.0, g
        emb = tensors["token_embd.weight"].tensor_type  # unquantized 2-D: llama.cpp's choice, not F32
        assert emb == (T.Q8_0 if bits == 8 else T.Q6_K)
        assert tensors["output_norm.weight"].tensor_type == T.F32
    assert sizes[8] > sizes[4] >= sizes[3] > sizes[2], sizes  # asymmetric int3 keeps its levels in Q4_K
    exact = export(ckpt, tmp_path / "e.gguf", bits=4)
    assert exact.details["bytes"] > sizes[4]  # Q4_K slices, but embeddings as stored


def test_a_budget_is_searched_once_per_request(models, tmp_path, monkeypatch):
    """``matq convert`` validates, then converts: the width search (every width of every tensor
    encoded) runs once; the file is the same as a fresh search's."""
    from matq_converters.exporters.gguf import blocks as gguf_blocks

    _, _, cks = models
    calls = []
    encode = gguf_blocks.encode_compact
    monkeypatch.setattr(gguf_blocks, "encode_compact", lambda s: calls.append(1) or encode(s))
    conv = registry.get("gguf")
    opts = ConvertOptions(plan="budget:5.0", overwrite=True, settings={"exact": False})
    conv.validate(cks["llama"], opts)
    searched = len(calls)
    conv.convert(cks["llama"], tmp_path / "a.gguf", opts)
    quantized = len(cks["llama"].quantized_names())
    assert searched >= 2 * quantized and len(calls) - searched == quantized  # convert: one encode each
    registry.get("gguf").convert(cks["llama"], tmp_path / "b.gguf", opts)  # a fresh plan
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_a_budget_below_the_smallest_file_is_refused_before_the_search(models, tmp_path, monkeypatch):
    """Only the narrowest width of each tensor is encoded before ``budget:2`` is refused."""
    from matq_converters.exporters.gguf import blocks as gguf_blocks

    _, _, cks = models
    calls = []
    encode = gguf_blocks.encode_compact
    monkeypatch.setattr(gguf_blocks, "encode_compact", lambda s: calls.append(s.bits) or encode(s))
    opts = ConvertOptions(plan="budget:2", overwrite=True, settings={"exact": False})
    with pytest.raises(ConvertOptionError, match="below the smallest file"):
        registry.get("gguf").validate(cks["llama"], opts)
    assert len(calls) == len(cks["llama"].quantized_names()) and set(calls) == {2}
    assert not (tmp_path / "x.gguf").exists()


def test_convert_plans_a_budget_once_and_export_gguf_plans_for_itself(models, tmp_path, monkeypatch):
    """``matq convert --plan budget:`` plans once: the plan ``validate`` makes is the one written, and
    it outlives the carried folder it was checked in. ``export_gguf`` called as a library function,
    without a plan, makes its own; both write the same file."""
    from matq_converters.exporters.gguf import export as gguf_export

    _, _, cks = models
    calls = []
    prepare = gguf_export._prepare
    monkeypatch.setattr(gguf_export, "_prepare", lambda *a: calls.append(1) or prepare(*a))
    ck, cli_out = cks["llama"], tmp_path / "cli.gguf"
    args = ["convert", str(ck.root), "--to", "gguf", "--plan", "budget:5.0", "-o", str(cli_out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    lib = gguf_export.export_gguf(ck, tmp_path / "lib.gguf", ConvertOptions(plan="budget:5.0"))
    assert len(calls) == 2
    assert lib.path == tmp_path / "lib.gguf" and 0 < lib.details["file_bits_per_weight"] <= 5.0
    assert lib.path.read_bytes() == cli_out.read_bytes()


def test_the_vocabulary_is_built_once(models, tmp_path, monkeypatch):
    """llama.cpp's converter builds a vocabulary in Python (10 s of CPU for Gemma 3's 262k tokens):
    ``matq convert`` builds it once, when planning, and writes the keys it made then."""
    from matq_converters.exporters.gguf import converter

    _, hf, cks = models
    conv = converter.load()
    cls = conv.get_model_class("Gemma2ForCausalLM", mmproj=False)
    calls = []
    set_vocab = cls.set_vocab
    monkeypatch.setattr(cls, "set_vocab", lambda self: calls.append(1) or set_vocab(self))
    out = tmp_path / "g.gguf"
    r = CliRunner().invoke(cli, ["convert", str(cks["gemma2"].root), "--to", "gguf", "--bits", "4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    own = cls(hf["gemma2"], gguf.LlamaFileType.ALL_F32, tmp_path / "own.gguf")  # llama.cpp's, built apart
    set_vocab(own)
    want = {k: v.value for k, v in own.gguf_writer.kv_data[0].items() if k.startswith("tokenizer.")}
    got = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("tokenizer.")}
    assert list(got) == list(want)
    assert got["tokenizer.ggml.tokens"] == [t.decode() for t in want["tokenizer.ggml.tokens"]]
    assert np.array_equal(np.float32(got["tokenizer.ggml.scores"]), np.float32(want["tokenizer.ggml.scores"]))


def test_fused_experts_are_written_from_their_codes(tmp_path):
    """gpt-oss fuses its experts (``[experts, in, 2 * ffn]``, gate and up interleaved); llama.cpp's
    converter transposes and splits them. Each GGUF expert row is found among the stack's rows along
    its input axis, and written as their codes: every expert decodes to its slice, bit for bit."""
    hf = family_model("gpt-oss", tmp_path / "hf")
    r = CliRunner().invoke(cli, ["quantize", str(hf), "-o", str(tmp_path / "ck"), "--layers", "linear"])
    assert r.exit_code == 0, r.output
    ckpt = mf.open(tmp_path / "ck")
    res = export(ckpt, tmp_path / "x.gguf", bits=4)
    assert res.details["exact_tensors"] == res.details["quantized_tensors"] == 14
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "x.gguf").tensors}
    for layer in range(2):
        fused = ckpt.dequantize(f"model.layers.{layer}.mlp.experts.gate_up_proj", 4).transpose(0, 2, 1)
        down = ckpt.dequantize(f"model.layers.{layer}.mlp.experts.down_proj", 4).transpose(0, 2, 1)
        for name, want in (("gate", fused[:, ::2]), ("up", fused[:, 1::2]), ("down", down)):
            t = got[f"blk.{layer}.ffn_{name}_exps.weight"]
            assert t.tensor_type not in (T.F32, T.F16), name
            decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            assert bits_equal(decoded, want), (layer, name)


def file_bits_per_weight(path: Path) -> float:
    """Bits per weight as llama.cpp reports them: every tensor's bytes over every tensor's elements."""
    tensors = gguf.GGUFReader(path).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def test_budget_counts_the_files_bits_and_buys_the_least_error(models, tmp_path):
    _, _, cks = models
    ckpt = cks["llama"]
    errors = []
    for budget in (3.6, 4.2, 5.0, 7.0):
        res = export(ckpt, tmp_path / f"b{budget}.gguf", plan=f"budget:{budget}", extra={"exact": False})
        got = file_bits_per_weight(res.path)
        assert got <= budget and got == pytest.approx(res.details["file_bits_per_weight"])
        assert f"{got:.3f} per weight of the file" in res.summary  # the figure the budget promised
        assert got > budget - 1.0  # the budget is spent, not ignored
        widths = res.details["widths"]
        reader = {t.name: t for t in gguf.GGUFReader(res.path).tensors}
        cfg = ckpt.config
        err = 0.0
        assert sorted(gguf_names(res, ckpt)) == sorted(ckpt.quantized_names())
        for hf, g in gguf_names(res, ckpt).items():
            full = ckpt.dequantize(hf)
            if g.split(".")[-2] in ("attn_q", "attn_k"):
                heads = cfg["num_attention_heads"] if "attn_q" in g else cfg["num_key_value_heads"]
                full = llama_permute(full, heads)
            got_w = gguf.quants.dequantize(reader[g].data, reader[g].tensor_type)
            err += float(np.sum((got_w.astype(np.float64) - full) ** 2))
        errors.append(err)
        assert set(widths.values()) <= set(range(2, 9))  # every width the planes serve may be chosen
    assert errors == sorted(errors, reverse=True), errors  # more bits, less error
    out = tmp_path / "tiny.gguf"
    with pytest.raises(ConvertOptionError, match="below the smallest file"):
        export(ckpt, out, plan="budget:2", extra={"exact": False})
    with pytest.raises(PlanError, match="budget must be a positive, finite number") as ei:
        export(ckpt, out, plan="budget:nan", extra={"exact": False})
    assert ei.value.path == "budget:nan"  # read by matq_format.budget.parse_budget, as every plan
    with pytest.raises(ConvertOptionError, match="exact"):
        export(ckpt, out, plan="budget:4")  # export() asks for exact types
    assert not out.exists()


def test_cli_exact_and_compact(models, tmp_path):
    _, _, cks = models
    ck = cks["llama"].root
    sizes = {}
    for flags, name in (([], "c.gguf"), (["--exact"], "e.gguf")):
        out = tmp_path / name
        r = CliRunner().invoke(
            cli, ["convert", str(ck), "--to", "gguf", "--bits", "2", "-o", str(out), "--json", *flags]
        )
        assert r.exit_code == 0, r.output
        sizes[name] = json.loads(r.output)["bytes"]
        assert sizes[name] == out.stat().st_size
    assert sizes["c.gguf"] < sizes["e.gguf"]  # embeddings as Q6_K instead of as stored


def test_gguf_layout_checkpoint_is_exact_at_every_width(models, tmp_path):
    """quantize --layout gguf: every width in llama.cpp's compact type for it, bit for bit; without
    nesting, symmetric groups of 32 still give exact Q4_0 files (file type MOSTLY_Q4_0)."""
    from matq_converters.importers.hf.quantize import quantize_hf

    base, hf, _ = models
    ck = mf.open(
        quantize_hf(
            hf["llama"], tmp_path / "ck", layers="linear", layout="gguf", group_size=32, scheme="symmetric",
            width_params=(),  # the shared grid; each width's own parameters: tests/test_width_params.py
        )
    )
    assert ck.source["layout"] == "gguf"
    # signed scales: Q4_K and Q2_K store unsigned sub-block scales, so int4 takes Q4_0 (the same
    # 4.5 bits per weight) and int2 keeps its levels in Q3_K
    want = {8: "Q8_0", 6: "Q6_K", 5: "Q5_0", 4: "Q4_0", 3: "Q3_K", 2: "Q3_K"}
    for bits, qtype in want.items():
        res = export(ck, tmp_path / f"m{bits}.gguf", bits=bits, extra={"exact": False})
        assert (
            res.details["exact_tensors"] == res.details["quantized_tensors"]
            and not res.details["refit_rel_rms"]
        )
        assert {res.details["types"][n] for n in res.details["widths"]} == {qtype}
    plain = to_matq(hf["llama"], tmp_path / "plain", group_size=32, symmetric=True)
    res = export(plain, tmp_path / "q40.gguf", bits=4, extra={"exact": False})
    assert fields(gguf.GGUFReader(res.path))["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0


# --- fetching llama.cpp's converter ---------------------------------------------------------------
def _fake_sdist(path: Path, parts=("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")) -> Path:
    """A llama_cpp_python sdist with only what the installer takes, plus things it must leave."""
    import io
    import tarfile

    top = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    files = {
        "convert_hf_to_gguf.py": "# converter\n",
        "conversion/__init__.py": "MARK = 1\n",
        "gguf-py/gguf/constants.py": "X = 1\n",
        "LICENSE": "MIT\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {**{k: v for k, v in files.items() if k.split("/")[0] in parts},
                           "src/llama.cpp": "// not taken\n", "../escape": "x"}.items():
            data = text.encode()
            info = tarfile.TarInfo(top + name if not name.startswith("..") else "llama_cpp_python-9.9.9/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(top + "conversion/link.py")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


def test_converter_install_extracts_the_converter_into_the_cache(tmp_path, monkeypatch):
    from matq_converters.exporters.gguf import converter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(converter.ENV, raising=False)
    dest = converter.install("9.9.9", sdist=_fake_sdist(tmp_path / "s.tar.gz"), gguf=False)
    assert dest == tmp_path / "cache" / "matq" / "llama.cpp" / "9.9.9"
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == ["LICENSE", "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/constants.py"]
    assert not list(dest.parent.glob(".*")), "no temporary folder is left"
    # an sdist without the converter is refused in one line, and nothing is left behind
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache2"))
    with pytest.raises(registry.MissingDependencyError, match="no vendor/llama.cpp/conversion"):
        converter.install("9.9.9", sdist=_fake_sdist(tmp_path / "t.tar.gz", parts=("LICENSE", "gguf-py",
                                                                                    "convert_hf_to_gguf.py")))
    assert not list((tmp_path / "cache2" / "matq" / "llama.cpp").iterdir())


def test_a_missing_converter_names_the_install_command(tmp_path, monkeypatch):
    from matq_converters.exporters.gguf import converter

    monkeypatch.setenv(converter.ENV, str(tmp_path / "nowhere"))
    converter.load.cache_clear()
    try:
        with pytest.raises(registry.MissingDependencyError, match=converter.INSTALL):
            converter.load()
    finally:
        converter.load.cache_clear()


def test_gguf_export_declares_what_it_imports():
    entry = registry.exporters._entry("gguf")
    assert set(entry.dependencies) >= {"gguf", "numpy", "torch", "transformers"}
    assert entry.extra == "gguf"
