"""Per-width block parameters (spec 10.7, ``matq.width_params``): the golden example, the reader's
and writer's checks, partial views, the fit, and the exact GGUF K-quant mapping."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from spec_golden import MAKE, SPEC_DIR, VALIDATOR
from spec_golden import after as _after
from spec_golden import record as golden_record

import matq_format as mf
from matq_converters.importers.hf.widthfit import fit_width, spec_for
from matq_format import constants as C
from matq_format import numerics as N
from matq_format.errors import BadParameterError, HeaderError, UnsupportedVersionError, WriterError
from matq_format.manifest import parse_manifest
from matq_format.widths import WidthParams, WidthSpec

GOLDEN = SPEC_DIR / "example" / MAKE.WIDTHS
NAME = "fc.weight"


def test_golden_widths_example_reads_as_the_spec_says():
    ckpt = mf.open(GOLDEN)
    ckpt.verify()
    m = ckpt.manifest
    assert (m["version"], m["must_understand"]) == ("1.2", [C.EXT_WIDTH_PARAMS])
    assert [e.message for e in VALIDATOR.iter_errors(m)] == []
    record = golden_record("widths-record")
    assert record[C.EXT_WIDTH_PARAMS] == m["tensors"][NAME][C.EXT_WIDTH_PARAMS]
    rows = [r for r in _after("widths-weights").splitlines()[3:] if r.startswith("| ")][:6]
    got = {r: (ckpt.sliced_codes(NAME, r)[0], ckpt.dequantize(NAME, r)[0]) for r in (2, 3)}
    with pytest.warns(UserWarning, match="shared grid"):
        w4 = ckpt.dequantize(NAME, 4)[0]
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        col = int(cells[0])
        assert int(cells[1]) == ckpt.codes(NAME)[0, col]
        assert int(cells[2]) == got[2][0][col] and float(cells[3]) == got[2][1][col]
        assert int(cells[4]) == got[3][0][col] and float(cells[5]) == got[3][1][col]
        assert float(cells[6]) == w4[col]
    # width 4 (no parameters of its own) and extra precision keep the shared grid of 8.5
    np.testing.assert_array_equal(
        ckpt.dequantize(NAME, 2, extra_precision=True),
        N.dequantize(ckpt.codes(NAME), ckpt.scale(NAME), ckpt.zero(NAME), 8, 2, None, True),
    )


def test_a_1_1_reader_refuses_width_params_and_the_marker_is_required():
    text = json.dumps(mf.open(GOLDEN).manifest)
    with pytest.raises(UnsupportedVersionError, match=C.EXT_WIDTH_PARAMS):
        parse_manifest(GOLDEN, text, frozenset({C.EXT_SIGNED_SCALES, C.EXT_STACKED}))
    m = json.loads(text)
    m["must_understand"] = []
    with pytest.raises(HeaderError, match="need matq.width_params in must_understand"):
        parse_manifest(GOLDEN, json.dumps(m), frozenset({C.EXT_WIDTH_PARAMS}))


@pytest.mark.parametrize(
    "value, why",
    [
        ({"8": {"group_size": 16, "min": True}}, "not a decimal width"),
        ({"02": {"group_size": 16, "min": True}}, "not a decimal width"),
        ({"2": {"group_size": 24, "min": True}}, "must divide super_block 256"),
        ({"2": {"group_size": 64, "min": False, "super_block": 32}}, "must divide super_block 32"),
        ({"2": {"group_size": 16, "min": False, "super_block": 48}}, "super_block 48 must divide 256"),
        ({"2": {"group_size": 16, "min": False, "super_block": True}}, "super_block True must divide"),
        ({"2": {"group_size": 16, "min": 1}}, "'min' must be true or false"),
        ({"2": {"group_size": 16, "min": True, "x": 1}}, "only 'group_size', 'min' and 'super_block'"),
        ({}, "non-empty"),
    ],
)
def test_malformed_width_record_is_a_header_error(value, why):
    m = mf.open(GOLDEN).manifest
    m["tensors"][NAME][C.EXT_WIDTH_PARAMS] = value
    with pytest.raises(HeaderError, match=re.escape(why)):
        parse_manifest(GOLDEN, json.dumps(m), frozenset({C.EXT_WIDTH_PARAMS}))


def _params(r: int = 2, **over) -> WidthParams:
    base = dict(MAKE.WIDTHS_PARAMS[r].__dict__)
    base.update(over)
    return WidthParams(**base)


@pytest.mark.parametrize(
    "params, why",
    [
        (_params(sc=np.array([[5, -3, 1]], np.int8)), "width 2 sc has shape [1, 3], expected [1, 2]"),
        (_params(d=np.array([[np.inf]], np.float32)), "d and dmin must be finite"),
        (_params(sc=np.array([[64, 0]], np.int16)), "|sc| and mn must be at most 63"),
        (_params(3, sc=np.array([[32, 0]], np.int16)), "sc must lie in -32..31"),
        (_params(d=np.array([[0.1]], np.float32)), "not exactly representable as F16"),
    ],
)
def test_writer_refuses_bad_width_params_and_writes_nothing(tmp_path, params, why):
    out = tmp_path / "out"
    w = mf.CheckpointWriter(out)
    with pytest.raises(WriterError, match=re.escape(why)) as exc:
        w.add_quantized(
            NAME, MAKE.WIDTHS_CODES, MAKE.WIDTHS_SCALE, MAKE.WIDTHS_ZERO, width_params={params.spec.bits: params}
        )
    assert str(exc.value).count("\n") == 0
    w.abort()
    assert not out.exists()


def test_reader_refuses_an_sc_past_its_bound(tmp_path):
    """A file whose sc breaks 10.7 (written by hand) is a BadParameterError naming the tensor."""
    out = tmp_path / "bad.safetensors"
    with mf.CheckpointWriter(out, single_file=True) as w:
        w.add_quantized(NAME, MAKE.WIDTHS_CODES, MAKE.WIDTHS_SCALE, MAKE.WIDTHS_ZERO, width_params=MAKE.WIDTHS_PARAMS)
    raw = bytearray(out.read_bytes())
    ckpt = mf.open(out)
    h = ckpt._headers[C.BASE_FILENAME]
    e = h.entries[f"{NAME}@w3.sc"]
    raw[h.data_start + e.start] = 0x7F  # sc = 127
    crc = f"{__import__('zlib').crc32(bytes(raw[h.data_start + e.start : h.data_start + e.end])):08x}"
    text = ckpt.manifest_text.replace(ckpt.manifest["entries"][f"{NAME}@w3.sc"]["crc32"], crc)
    assert len(text) == len(ckpt.manifest_text)
    bad = tmp_path / "bad2.safetensors"
    meta_old = json.dumps(ckpt.manifest_text)[1:-1].encode()
    meta_new = json.dumps(text)[1:-1].encode()
    raw = raw.replace(meta_old, meta_new)
    old_crc = f"{__import__('zlib').crc32(ckpt.manifest_text.encode()):08x}".encode()
    raw = raw.replace(old_crc, f"{__import__('zlib').crc32(text.encode()):08x}".encode())
    bad.write_bytes(bytes(raw))
    with pytest.raises(BadParameterError, match=r"fc.weight: width 3: sc must lie in -32..31"):
        mf.open(bad).dequantize(NAME, 3)


def test_folder_form_keeps_each_width_in_its_own_file_and_a_partial_view_falls_back(tmp_path):
    out = tmp_path / "ckpt"
    with mf.CheckpointWriter(out) as w:
        w.add_quantized(NAME, MAKE.WIDTHS_CODES, MAKE.WIDTHS_SCALE, MAKE.WIDTHS_ZERO, width_params=MAKE.WIDTHS_PARAMS)
    ckpt = mf.open(out)
    files = ckpt.manifest["files"]
    assert files["matq-width-2.safetensors"]["width"] == 2 and files["matq-width-3.safetensors"]["width"] == 3
    assert {e["file"] for n, e in ckpt.manifest["entries"].items() if "@w2." in n} == {"matq-width-2.safetensors"}
    want2 = ckpt.dequantize(NAME, 2)
    np.testing.assert_array_equal(want2, mf.open(GOLDEN).dequantize(NAME, 2))
    (out / "matq-width-2.safetensors").unlink()
    with pytest.raises(mf.errors.MissingFileError):
        mf.open(out)
    part = mf.open(out, partial=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        shared = part.dequantize(NAME, 2)
        part.dequantize(NAME, 4)
    assert len(seen) == 1 and "shared grid" in str(seen[0].message)
    np.testing.assert_array_equal(shared, N.dequantize(part.codes(NAME), part.scale(NAME), part.zero(NAME), 8, 2, None))
    np.testing.assert_array_equal(part.dequantize(NAME, 3), mf.open(GOLDEN).dequantize(NAME, 3))


def _grid(w: np.ndarray, symmetric: bool, group: int = 32, sign_span: int = 32):
    if symmetric:
        sign = np.repeat(N.extreme_signs(w, sign_span), sign_span // group, axis=1)
        a, z = N.minmax_params(w * np.repeat(sign, group, 1), 8, group, symmetric=True)
        a = a * sign
    else:
        a, z = N.minmax_params(w, 8, group)
    return N.quantize(w, a, z, 8, group), a, z


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_fit_beats_or_matches_the_shared_grid(bits, symmetric):
    """Given the nested codes, the refit's importance-weighted error is no worse than the shared grid's
    at the low widths (it minimizes it before rounding); int5 may lose a hair to the integer rounding."""
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((32, 512)) * 0.02).astype(np.float32)
    h = rng.uniform(0.1, 4.0, 512)
    q, a, z = _grid(w, symmetric)
    k = N.slice_codes(q, 8, bits)
    p = fit_width(w, k, spec_for(bits, symmetric), h)
    own = N.dequantize_width(k, p.d, p.sc, p.dmin, p.mn, bits, p.spec.group_size)
    shared = N.dequantize_codes(k, a, z, 8, bits, 32)
    err = lambda v: float(np.sum(h * (v - w).astype(np.float64) ** 2))  # noqa: E731
    assert err(own) <= err(shared) * (1.0 if bits <= 4 else 1.05)


def test_fit_of_non_finite_weights_is_an_error():
    w = np.zeros((1, 256), np.float32)
    w[0, 3] = np.inf
    with pytest.raises(ValueError, match="not finite"):
        fit_width(w, np.zeros((1, 256), np.uint8), spec_for(2, True))


# --- GGUF: the K-quant of each width's shape, bit for bit ------------------------------------------
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits, qtype", [(2, "Q2_K"), (3, "Q3_K"), (4, "Q4_K"), (5, "Q5_K")])
def test_gguf_k_blocks_decode_to_dequantize_width(bits, qtype, symmetric):
    """gguf-py's reference decoders (ggml's dequantize_row_q*_K in numpy) return exactly
    ``numerics.dequantize_width``, negative sub-group scales (reversed levels) included."""
    gguf = pytest.importorskip("gguf")
    from matq_converters.exporters.gguf import blocks as B

    rng = np.random.default_rng(bits + 10 * symmetric)
    w = (rng.standard_normal((8, 768)) * rng.uniform(0.001, 0.1, (8, 1))).astype(np.float32)
    q, a, z = _grid(w, symmetric)
    k = N.slice_codes(q, 8, bits)
    spec = WidthSpec(3, 16, False) if bits == 3 else spec_for(bits, symmetric)  # Q3_K has no minimum
    p = fit_width(w, k, spec, rng.uniform(0.5, 2.0, 768))
    if p.spec.minimum:
        assert (p.sc < 0).any() == symmetric  # signed int8 grids make falling sub-groups
    sl = B.Slice(k, a, z, 8, bits, 32, False, p)
    enc = B.encode_compact(sl)
    assert enc.qtype.name == qtype and enc.exact
    got = gguf.quants.dequantize(enc.data, enc.qtype)
    np.testing.assert_array_equal(got.view(np.uint32), sl.dequantize().view(np.uint32))
    assert B.bits_per_weight(enc.qtype) == {2: 2.625, 3: 3.4375, 4: 4.5, 5: 5.5}[bits]


def test_gguf_rows_not_multiple_of_256_keep_the_width_values(tmp_path):
    """576 columns (SmolLM2's hidden size): no K-quant; the width's own values are refitted, not the shared grid's."""
    from matq_converters.exporters.gguf import blocks as B

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 576)) * 0.02).astype(np.float32)
    q, a, z = _grid(w, True)
    k = N.slice_codes(q, 8, 2)
    p = fit_width(w, k, spec_for(2, True))
    sl = B.Slice(k, a, z, 8, 2, 32, False, p)
    enc = B.encode_compact(sl)
    own = sl.dequantize()
    shared = N.dequantize_codes(k, a, z, 8, 2, 32)
    assert B.rel_rms_error(enc, own) < B.rel_rms_error(enc, shared)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    "bits, shape, qtype",
    [
        (2, (64, False), "Q2_0"), (3, (32, False), "Q4_0"), (4, (32, False), "Q4_0"), (5, (32, False), "Q5_0"),
        (2, (32, True), "Q4_1"), (4, (32, True), "Q4_1"), (5, (32, True), "Q5_1"),
    ],
)
def test_gguf_block_shapes_decode_to_dequantize_width(bits, shape, qtype, symmetric):
    """One ``d`` per group (``super_block`` = ``group_size``) on 576-column rows: ggml's block types
    decode to ``numerics.dequantize_width`` bit for bit (gguf-py's decoders); Q2_0, which gguf-py
    cannot decode, through ggml's formula, equal as values (its zero level's sign may differ)."""
    gguf = pytest.importorskip("gguf")
    from matq_converters.exporters.gguf import blocks as B

    rng = np.random.default_rng(bits + 10 * symmetric)
    w = (rng.standard_normal((8, 576)) * rng.uniform(0.001, 0.1, (8, 1))).astype(np.float32)
    q, a, z = _grid(w, symmetric, sign_span=64)
    k = N.slice_codes(q, 8, bits)
    p = fit_width(w, k, WidthSpec(bits, shape[0], shape[1], shape[0]), rng.uniform(0.5, 2.0, 576))
    assert set(np.unique(np.abs(p.sc))) <= {0, 1}
    sl = B.Slice(k, a, z, 8, bits, 32, False, p)
    enc = B.encode_compact(sl)
    assert enc.qtype.name == qtype and enc.exact
    want = sl.dequantize()
    if qtype == "Q2_0":
        np.testing.assert_array_equal(B.decode(enc), want)
        assert B.bits_per_weight(enc.qtype) == 2.25
        shared = N.dequantize_codes(k, a, z, 8, bits, 32)
        err = lambda v: float(np.sum((v - w).astype(np.float64) ** 2))  # noqa: E731
        assert err(want) <= err(shared) * (1.1 if symmetric else 2.0)
    else:
        got = gguf.quants.dequantize(enc.data, enc.qtype)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_fit_picks_the_shape_of_the_row_length():
    """256-multiples keep the K-quant shape (int2 takes Q2_0 only at no more error); other rows the block shape."""
    from matq_converters.importers.hf.widthfit import fit_tensor, weighted_error

    rng = np.random.default_rng(5)
    for cols in (512, 576):
        w = (rng.standard_normal((16, cols)) * 0.02).astype(np.float32)
        q, _, _ = _grid(w, True, sign_span=64)
        got = fit_tensor(w, q, 8, (2, 3, 4, 5), True)
        if cols == 576:
            assert {r: (p.spec.group_size, p.spec.super_block) for r, p in got.items()} == {
                2: (64, 64), 3: (32, 32), 4: (32, 32), 5: (32, 32)
            }
        else:
            assert [got[r].spec.super_block for r in (3, 4, 5)] == [256] * 3
            k = N.slice_codes(q, 8, 2)
            h = np.ones(cols, np.float32)
            k_err = weighted_error(w, k, fit_width(w, k, spec_for(2, True)), h)
            assert weighted_error(w, k, got[2], h) <= k_err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import tiny_hf_model

    from matq_converters.importers.hf.quantize import quantize_hf

    base = tmp_path_factory.mktemp("widths")
    hf = tiny_hf_model("llama", base / "hf", seed=1)
    quantize_hf(hf, base / "ck", layers="linear", width_params=(2, 3, 4))
    return hf, mf.open(base / "ck")


def test_quantize_fits_the_widths_asked_for_and_none_by_default(tiny_llama, tmp_path):
    from matq_converters.importers.hf.quantize import quantize_hf

    hf, ckpt = tiny_llama
    plain = mf.open(quantize_hf(hf, tmp_path / "plain", layers="linear"))
    assert C.EXT_WIDTH_PARAMS not in plain.manifest["must_understand"]
    assert ckpt.version == "1.2"
    assert set(ckpt.manifest["must_understand"]) == {C.EXT_SIGNED_SCALES, C.EXT_CONSTANT_ZERO, C.EXT_WIDTH_PARAMS}
    name = ckpt.quantized_names()[0]
    assert sorted(ckpt.info(name).width_specs(8)) == [2, 3, 4]
    assert {f: r["width"] for f, r in ckpt.manifest["files"].items() if "width" in r} == {
        C.WIDTH_FILENAME.format(r=r): r for r in (2, 3, 4)
    }


@pytest.fixture(scope="module")
def tiny_llama_320(tmp_path_factory):
    """ffn_down rows of 320 columns: no K-quant tiles them, so its widths take the block shapes."""
    from tiny_models import tiny_hf_model

    from matq_converters.importers.hf.quantize import quantize_hf

    base = tmp_path_factory.mktemp("widths320")
    hf = tiny_hf_model("llama", base / "hf", seed=1, intermediate=320)
    quantize_hf(hf, base / "ck", layers="linear", width_params=(2, 3, 4))
    return hf, mf.open(base / "ck")


@pytest.mark.llama_cpp
@pytest.mark.parametrize(
    "model, bits, qtypes",
    [
        ("tiny_llama", 2, {"Q2_K"}), ("tiny_llama", 3, {"Q3_K"}), ("tiny_llama", 4, {"Q4_K"}),
        ("tiny_llama_320", 2, {"Q2_K", "Q2_0"}), ("tiny_llama_320", 4, {"Q4_K", "Q4_0"}),
    ],
)
def test_llama_cpp_runs_the_width_blocks_as_transformers_runs_the_reader(request, tmp_path, model, bits, qtypes):
    pytest.importorskip("llama_cpp")
    import torch
    from gguf_helpers import SAMPLE, hf_model_on_matq, llama_cpp_model
    from transformers import AutoTokenizer

    from matq_converters import registry
    from matq_converters.registry import ConvertOptions

    hf, ckpt = request.getfixturevalue(model)
    ids = AutoTokenizer.from_pretrained(hf)(SAMPLE).input_ids
    with torch.no_grad():
        ref = hf_model_on_matq(hf, ckpt, bits, False)(torch.tensor([ids])).logits[0].float().numpy()
    sigma = float(ref.std())

    def run(**settings):
        opts = ConvertOptions(bits=bits, overwrite=True, settings={"exact": True, **settings})
        res = registry.get("gguf").convert(ckpt, tmp_path / "m.gguf", opts)
        llm = llama_cpp_model(res.path, n_ctx=256, n_batch=256, n_threads=2, verbose=False, seed=0, logits_all=True)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], np.float32)
        d = np.abs(got - ref) / sigma
        return res, float(d.mean()), float(d.max()), float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])

    res, mean, worst, corr = run()
    assert {res.details["types"][n] for n in res.details["widths"]} == qtypes
    assert res.details["exact_tensors"] == res.details["quantized_tensors"]
    # llama.cpp quantizes activations (Q8_K, Q8_0) for its matmuls; the same values as F32 must agree to 0.01
    assert mean <= 0.06 and worst <= 0.5 and corr >= 0.995, (mean, worst, corr)
    _, mean, worst, corr = run(types=["F32"])
    assert worst <= 0.01 and corr >= 0.99999, (mean, worst, corr)


def test_slice_keeps_the_widths_it_serves_and_drops_the_others(tmp_path):
    src = tmp_path / "ck"
    with mf.CheckpointWriter(src) as w:
        w.add_quantized(NAME, MAKE.WIDTHS_CODES, MAKE.WIDTHS_SCALE, MAKE.WIDTHS_ZERO, width_params=MAKE.WIDTHS_PARAMS)
    ckpt = mf.open(src)
    at2 = mf.slice_checkpoint(ckpt, tmp_path / "s2", bits=2)
    s2 = mf.open(at2)
    assert sorted(s2.info(NAME).width_specs(8)) == [2] and "matq-width-3.safetensors" not in s2.manifest["files"]
    np.testing.assert_array_equal(s2.dequantize(NAME, 2), ckpt.dequantize(NAME, 2))
    s4 = mf.open(mf.slice_checkpoint(ckpt, tmp_path / "s4", bits=4))
    assert sorted(s4.info(NAME).width_specs(8)) == [2, 3] and s4.version == "1.2"
    for r in (2, 3):
        np.testing.assert_array_equal(s4.dequantize(NAME, r), ckpt.dequantize(NAME, r))
    assert s4.manifest["entries"][f"{NAME}@w3.sc"]["crc32"] == ckpt.manifest["entries"][f"{NAME}@w3.sc"]["crc32"]


def test_download_of_a_checkpoint_without_width_files_is_unchanged():
    from matq_hub.layout import needed_files

    ckpt = mf.open(SPEC_DIR / "example" / "tiny-matq")  # a folder without width files: unchanged
    assert all("width" not in f for f in needed_files(ckpt, {NAME: 2}))


def test_pull_layout_lists_the_width_file(tmp_path):
    from matq_hub.layout import needed_files

    src = tmp_path / "ck"
    with mf.CheckpointWriter(src) as w:
        w.add_quantized(NAME, MAKE.WIDTHS_CODES, MAKE.WIDTHS_SCALE, MAKE.WIDTHS_ZERO, width_params=MAKE.WIDTHS_PARAMS)
    ckpt = mf.open(src)
    files = needed_files(ckpt, {NAME: 2})
    assert "matq-width-2.safetensors" in files and "matq-width-3.safetensors" not in files
    assert {f for f in files if "plane" in f} == {f"matq-plane-{k}.safetensors" for k in (7, 6, 5)}


def test_matq_torch_and_hf_export_serve_the_width_values(tiny_llama, tmp_path):
    """matq_torch (any switch order) and the dense HF export give the reader's per-width values bit for bit."""
    pytest.importorskip("torch")
    import matq_torch
    from matq_converters import registry
    from matq_converters.registry import ConvertOptions

    _, ckpt = tiny_llama
    model = matq_torch.load(ckpt, bits=2)
    params = dict(model.named_parameters())
    name = ckpt.quantized_names()[0]
    for r in (2, 4, 3, 2):
        model.matq.switch(r)
        np.testing.assert_array_equal(params[name].detach().numpy(), ckpt.dequantize(name, r))
    res = registry.get("hf").convert(
        ckpt, tmp_path / "hf2", ConvertOptions(bits=2, overwrite=True, settings={"layout": "dense", "dtype": "float32"})
    )
    from safetensors.numpy import load_file

    got = {}
    for f in sorted(Path(res.path).glob("*.safetensors")):
        got.update(load_file(f))
    np.testing.assert_array_equal(got[name], ckpt.dequantize(name, 2))
