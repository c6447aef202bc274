"""Importance kept in the checkpoint (spec 10.8) and the budgets that weigh errors by it.

A calibrated tensor keeps ``t@importance`` (mean squared input per feature); readers that do not
implement an extension skip its entries (5.6); ``budget:`` plans weigh each option's error by it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_format_errors import manifest, rewrite_manifest, set_entry

import matq_format as mf
from matq_format import constants as C
from matq_format import numerics
from matq_format.errors import BadParameterError, HeaderError, WriterError
from matq_format.inspect import describe
from matq_format.plans import resolve_plan
from matq_format.slicing import slice_checkpoint
from matq_format.writer import CheckpointWriter

ROWS, COLS, G = 64, 256, 32


def _quantized(w: np.ndarray):
    """int8 codes of ``w``, symmetric groups of 32 (what ``--layout gguf`` stores)."""
    a, z = numerics.minmax_params(w, 8, G, symmetric=True)
    return numerics.quantize(w, a, z, 8, G), a, z


def write_calibrated(path, tensors: dict[str, tuple], **kw):
    """A checkpoint of quantized ``{name: (weights, importance[, sensitivity])}`` and one dense
    tensor (tests/test_sensitivity.py writes its checkpoints with it too)."""
    with CheckpointWriter(path, **kw) as w:
        for name, (weights, imp, *sens) in tensors.items():
            q, a, z = _quantized(weights)
            extra = {"sensitivity": sens[0]} if sens else {}
            w.add_quantized(name, q, a, z, group_size=G, scheme="symmetric", importance=imp, **extra)
        w.add_dense("norm.weight", np.ones(COLS, np.float32))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(23)


def test_importance_round_trips_beside_the_codes(tmp_path, rng):
    """Kept as written (F32, or F16 when given as float16), in the base file, version 1.2, not in
    must_understand; the values every width returns are those of the same file without it."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    imp32 = rng.random(COLS).astype(np.float32) * 10
    imp16 = imp32.astype(np.float16)
    ck = mf.open(write_calibrated(tmp_path / "a", {"x.weight": (w, imp32), "y.weight": (w, imp16), "z.weight": (w, None)}))
    plain = mf.open(write_calibrated(tmp_path / "b", {"x.weight": (w, None)}))
    assert ck.version == "1.2" and C.EXT_IMPORTANCE not in ck.manifest["must_understand"]
    rec = ck.manifest["entries"]["x.weight@importance"]
    assert rec["file"] == C.BASE_FILENAME and rec[C.ENTRY_EXTENSION_KEY] == C.EXT_IMPORTANCE
    np.testing.assert_array_equal(ck.importance("x.weight"), imp32)
    np.testing.assert_array_equal(ck.importance("y.weight"), imp16.astype(np.float32))
    assert ck.importance("y.weight", as_stored=True).dtype == np.float16
    assert ck.importance("z.weight") is None and ck.importance("norm.weight") is None
    for r in (8, 4, 2):
        np.testing.assert_array_equal(ck.dequantize("x.weight", r), plain.dequantize("x.weight", r))
    ck.verify()
    d = describe(ck)
    assert d["summary"]["importance_tensors"] == 2
    assert [t.get("importance") for t in d["tensors"]] == [True, True, False, None]


def test_a_reader_skips_entries_of_an_extension_it_does_not_implement(tmp_path, rng):
    """5.6: an entry whose record names an unknown extension is outside the entry-set check; the same
    entry without ``extension`` is an extra entry, and a known extension's wrong entry is refused."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    path = write_calibrated(tmp_path / "a", {"x.weight": (w, rng.random(COLS))})

    def rename(ext):
        def edit(m):
            m["entries"]["x.weight@importance"][C.ENTRY_EXTENSION_KEY] = ext

        return edit

    rewrite_manifest(path, rename("org.example.stats"))  # a vendor's statistics, unknown here
    ck = mf.open(path)
    assert not ck.has_importance("x.weight") and ck.importance("x.weight") is None
    np.testing.assert_array_equal(ck.dequantize("x.weight", 4), mf.open(write_calibrated(tmp_path / "b", {"x.weight": (w, None)})).dequantize("x.weight", 4))
    ck.verify()  # its CRC is still checked

    def unmark(m):
        del m["entries"]["x.weight@importance"][C.ENTRY_EXTENSION_KEY]

    rewrite_manifest(path, unmark)
    with pytest.raises(HeaderError, match="extra"):
        mf.open(path)
    rewrite_manifest(path, rename("not an extension"))
    with pytest.raises(HeaderError, match="must be an extension name"):
        mf.open(path)
    rewrite_manifest(path, rename(C.EXT_WIDTH_PARAMS))  # known, and defines no such entry
    with pytest.raises(HeaderError, match="defines no such entry"):
        mf.open(path)


def test_a_reader_refuses_a_bad_importance(tmp_path, rng):
    """Wrong shape (HeaderError, at open) and negative or non-finite values (BadParameterError, on read)."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    for bad, cls in ((-1.0, BadParameterError), (np.nan, BadParameterError)):
        path = write_calibrated(tmp_path / f"v{bad}", {"x.weight": (w, np.ones(COLS, np.float32))})
        values = np.ones(COLS, np.float32)
        values[7] = bad
        set_entry(path, "x.weight@importance", values)
        ck = mf.open(path)
        with pytest.raises(cls, match="importance must be finite and not negative"):
            ck.importance("x.weight")
        with pytest.raises(cls):
            ck.verify()
    path = write_calibrated(tmp_path / "s", {"x.weight": (w, np.ones(COLS, np.float32))})
    def move(m):  # the importance of a dense tensor
        m["entries"]["norm.weight@importance"] = m["entries"].pop("x.weight@importance")

    rewrite_manifest(path, move)
    with pytest.raises(HeaderError):
        mf.open(path)


@pytest.mark.parametrize(
    "imp, why",
    [
        (np.ones(COLS - 1), "importance has shape"),
        (np.ones((ROWS, COLS)), "importance has shape"),
        (np.full(COLS, np.inf), "finite and not negative"),
        (np.full(COLS, np.nan), "finite and not negative"),
        (np.full(COLS, 1e39), "finite and not negative"),  # overflows F32
        (-np.ones(COLS), "finite and not negative"),
    ],
)
def test_the_writer_refuses_a_bad_importance_and_writes_nothing(tmp_path, rng, imp, why):
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    out = tmp_path / "out"
    with pytest.raises(WriterError, match=why) as ei:
        write_calibrated(out, {"x.weight": (w, imp)})
    assert "\n" not in str(ei.value) and "x.weight" in str(ei.value)
    assert not out.exists()


def test_slicing_keeps_the_importance_bit_for_bit(tmp_path, rng):
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    imp = (rng.random(COLS) * 3).astype(np.float16)
    src = mf.open(write_calibrated(tmp_path / "a", {"x.weight": (w, imp), "y.weight": (w, None)}))
    for kw in ({"bits": 3}, {"plan": {"x.weight": 2, "y.weight": 8}}):
        out = slice_checkpoint(src, tmp_path / f"s{len(kw)}{next(iter(kw))}", **kw)
        ck = mf.open(out)
        assert ck.manifest["entries"]["x.weight@importance"]["crc32"] == src.manifest["entries"]["x.weight@importance"]["crc32"]
        assert ck.importance("x.weight", as_stored=True).dtype == np.float16
        assert not ck.has_importance("y.weight") and ck.version == "1.2"


def test_stacked_importance_is_one_vector_per_matrix(tmp_path, rng):
    """Experts ``[E, in, out]`` (input axis 1): the importance is ``[E, in]``; the weighted error
    weighs each expert's columns by its own vector."""
    E, IN, OUT = 3, 64, 32
    w = rng.standard_normal((E, IN, OUT)).astype(np.float32)
    imp = rng.random((E, IN)).astype(np.float32)
    with CheckpointWriter(tmp_path / "s") as wr:
        m = numerics.as_matrix(w, 1)
        q, a, z = _quantized(m)
        shape = numerics.param_shape(w.shape, G, 1)
        wr.add_quantized(
            "experts", numerics.from_matrix(q, w.shape, 1), a.reshape(shape), z.reshape(shape),
            group_size=G, scheme="symmetric", input_axis=1, importance=imp,
        )
    ck = mf.open(tmp_path / "s")
    np.testing.assert_array_equal(ck.importance("experts"), imp)
    d = ck.dequantize("experts", 3) - ck.dequantize("experts", 8)
    d64, imp64 = d.astype(np.float64), imp.astype(np.float64)
    want = sum(float(np.sum(d64[e] ** 2 * imp64[e][:, None])) for e in range(E))
    assert numerics.weighted_sq_error(d, imp, 1) == pytest.approx(want, rel=1e-12)


def _mirror_tensors(tmp_path, rng, *, with_importance: bool, flip: bool = False):
    """``a.weight`` and ``b.weight`` hold the same weights: large in the first half of the columns,
    tiny in the second, so a narrow width's error sits in the first half. ``a``'s inputs are large
    there and ``b``'s in the second half (``flip`` swaps them): ``a``'s error matters, ``b``'s hardly."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    w[:, COLS // 2 :] *= 0.01
    hi = np.r_[np.full(COLS // 2, 10.0), np.full(COLS // 2, 0.1)].astype(np.float32)
    imp = {"a.weight": hi, "b.weight": hi[::-1].copy()}
    if flip:
        imp = {"a.weight": imp["b.weight"], "b.weight": imp["a.weight"]}
    return mf.open(
        write_calibrated(
            tmp_path / f"ck{with_importance}{flip}",
            {n: (w, imp[n] if with_importance else None) for n in ("a.weight", "b.weight")},
        )
    )


def test_importance_gives_the_bits_to_the_tensor_whose_errors_fall_on_large_inputs(tmp_path, rng):
    """Room for one tensor at int4 and the other at int2. Plain errors give both the same width; with
    importance the tensor whose error columns carry large inputs is upgraded, and swapping the
    importance vectors swaps the choice."""
    b4 = numerics.bits_per_weight(4, ROWS, COLS, G, 2, 0, 0.0)
    b2 = numerics.bits_per_weight(2, ROWS, COLS, G, 2, 0, 0.0)
    spec = f"budget:{(b4 + b2) / 2 + 1e-6}"
    plain = resolve_plan(spec, _mirror_tensors(tmp_path, rng, with_importance=False))
    assert plain["a.weight"] == plain["b.weight"]  # the same weights, the same choice
    rng2 = np.random.default_rng(23)
    assert resolve_plan(spec, _mirror_tensors(tmp_path, rng2, with_importance=True)) == {"a.weight": 4, "b.weight": 2}
    rng3 = np.random.default_rng(23)
    flipped = _mirror_tensors(tmp_path, rng3, with_importance=True, flip=True)
    assert resolve_plan(spec, flipped) == {"a.weight": 2, "b.weight": 4}


def test_gguf_budget_weighs_errors_by_importance(tmp_path, rng):
    """The GGUF file budget takes the same turn, and the turn follows the importance vectors."""
    from matq_converters.exporters.gguf.budget import Part, file_budget_plan

    parts = [Part(("a.weight",)), Part(("b.weight",))]  # one GGUF tensor each
    got = {}
    for flip in (False, True):
        ck = _mirror_tensors(tmp_path, np.random.default_rng(23), with_importance=True, flip=flip)
        assert set(file_budget_plan(ck, parts, (), 100.0, False).values()) == {8}
        got[flip] = file_budget_plan(ck, parts, (), 3.9, False)
    assert got[False]["a.weight"] > got[False]["b.weight"]
    assert got[True]["b.weight"] > got[True]["a.weight"]


def test_budget_without_importance_says_so_once(tmp_path, rng):
    """The step's title says how errors are weighed: the log line of ``matq -v``."""
    from matq_format import progress

    seen = []

    class _Stage:
        def __init__(self, desc, total, unit):
            seen.append(desc)

        def __enter__(self):
            return lambda n=1: None

        def __exit__(self, *a):
            return False

    for flag in (False, True):
        ck = _mirror_tensors(tmp_path, rng, with_importance=flag)
        with progress.listening(_Stage):
            resolve_plan("budget:4", ck)
    assert "plain squared errors: the checkpoint keeps no importance" in seen[0]
    assert "errors weighted by each tensor's importance across its columns (2 of 2 tensors keep one)" in seen[1]


def test_manifest_records_stay_plain_json(tmp_path, rng):
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    path = write_calibrated(tmp_path / "a", {"x.weight": (w, np.ones(COLS))})
    json.dumps(manifest(path))
