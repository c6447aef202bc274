"""Sensitivity kept beside the importance (spec 10.8) and budgets that compare tensors by it.

``t@sensitivity`` holds, per output feature, the mean squared gradient of the loss at the tensor's
output; with the importance it weighs a weight error by the rise of the loss it causes, so a budget
gives bits to the tensor whose output matters more, which per-tensor-scaled importance cannot see.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_format_errors import rewrite_manifest, set_entry
from test_importance import COLS, ROWS, G, write_calibrated

import matq_format as mf
from matq_format import constants as C
from matq_format import numerics
from matq_format.budget import ErrorWeights
from matq_format.errors import BadParameterError, HeaderError, WriterError
from matq_format.inspect import describe
from matq_format.plans import resolve_plan
from matq_format.slicing import slice_checkpoint
from matq_format.writer import CheckpointWriter


@pytest.fixture
def rng():
    return np.random.default_rng(8)


def test_sensitivity_round_trips_and_slicing_keeps_it(tmp_path, rng):
    """Kept as written (F32, or F16 when given as float16) in the base file, under matq.importance,
    never in must_understand; values unchanged; a slice keeps it bit for bit; inspect counts it."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    imp = rng.random(COLS).astype(np.float32)
    s32 = rng.random(ROWS).astype(np.float32) * 1e-3
    s16 = s32.astype(np.float16)
    path = write_calibrated(tmp_path / "a", {"x.weight": (w, imp, s32), "y.weight": (w, imp, s16), "z.weight": (w, imp, None)})
    ck = mf.open(path)
    plain = mf.open(write_calibrated(tmp_path / "b", {"x.weight": (w, None, None)}))
    assert ck.version == "1.2" and C.EXT_IMPORTANCE not in ck.manifest["must_understand"]
    rec = ck.manifest["entries"]["x.weight@sensitivity"]
    assert rec["file"] == C.BASE_FILENAME and rec[C.ENTRY_EXTENSION_KEY] == C.EXT_IMPORTANCE
    np.testing.assert_array_equal(ck.sensitivity("x.weight"), s32)
    np.testing.assert_array_equal(ck.sensitivity("y.weight"), s16.astype(np.float32))
    assert ck.sensitivity("z.weight") is None and not ck.has_sensitivity("z.weight")
    np.testing.assert_array_equal(ck.dequantize("x.weight", 3), plain.dequantize("x.weight", 3))
    ck.verify()
    d = describe(ck)
    assert d["summary"]["sensitivity_tensors"] == 2
    assert [t.get("sensitivity") for t in d["tensors"]] == [True, True, False, None]
    out = mf.open(slice_checkpoint(ck, tmp_path / "s", bits=4))
    entries = ck.manifest["entries"]
    assert out.manifest["entries"]["x.weight@sensitivity"]["crc32"] == entries["x.weight@sensitivity"]["crc32"]
    assert out.sensitivity("y.weight", as_stored=True).dtype == np.float16


@pytest.mark.parametrize(
    "sens, imp, why",
    [
        (np.ones(COLS), np.ones(COLS), "sensitivity has shape"),  # the input axis' length
        (np.ones(ROWS - 1), np.ones(COLS), "sensitivity has shape"),
        (np.full(ROWS, np.nan), np.ones(COLS), "sensitivity must be finite and not negative"),
        (np.full(ROWS, np.inf), np.ones(COLS), "sensitivity must be finite and not negative"),
        (-np.ones(ROWS), np.ones(COLS), "sensitivity must be finite and not negative"),
        (np.ones(ROWS), None, "a sensitivity needs an importance beside it"),
    ],
)
def test_the_writer_refuses_a_bad_sensitivity_and_writes_nothing(tmp_path, rng, sens, imp, why):
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    out = tmp_path / "out"
    with pytest.raises(WriterError, match=why) as ei:
        write_calibrated(out, {"x.weight": (w, imp, sens)})
    assert "\n" not in str(ei.value) and "x.weight" in str(ei.value)
    assert not out.exists()


def test_a_reader_refuses_a_bad_sensitivity(tmp_path, rng):
    """Non-finite or negative values: BadParameterError on read; a sensitivity without its
    importance, or of the importance's shape: HeaderError at open."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    for bad in (-1.0, np.nan):
        path = write_calibrated(tmp_path / f"v{bad}", {"x.weight": (w, np.ones(COLS), np.ones(ROWS))})
        values = np.ones(ROWS, np.float32)
        values[3] = bad
        set_entry(path, "x.weight@sensitivity", values)
        ck = mf.open(path)
        with pytest.raises(BadParameterError, match="x.weight: sensitivity must be finite and not negative"):
            ck.sensitivity("x.weight")
        with pytest.raises(BadParameterError):
            ck.verify()
    path = write_calibrated(tmp_path / "lone", {"x.weight": (w, np.ones(COLS), np.ones(ROWS))})

    def drop_importance(m):
        m["entries"]["x.weight@importance"][C.ENTRY_EXTENSION_KEY] = "org.example.other"

    rewrite_manifest(path, drop_importance)
    with pytest.raises(HeaderError, match="has no x.weight@importance beside it"):
        mf.open(path)
    from matq_format.manifest import TensorInfo

    with pytest.MonkeyPatch.context() as mp:  # a writer that gets the shape wrong: [cols], not [rows]
        mp.setattr(TensorInfo, "sensitivity_shape", property(lambda t: t.importance_shape))
        path = write_calibrated(tmp_path / "shape", {"x.weight": (w, np.ones(COLS), np.ones(COLS))})
    with pytest.raises(HeaderError, match=r"x.weight@sensitivity.*expected F16 or F32 \[64\]"):
        mf.open(path)


def test_stacked_sensitivity_is_one_vector_per_matrix(tmp_path, rng):
    """Experts ``[E, in, out]`` (input axis 1): the sensitivity is ``[E, out]`` and weighs each
    expert's rows by its own vector."""
    E, IN, OUT = 3, 64, 32
    w = rng.standard_normal((E, IN, OUT)).astype(np.float32)
    imp, sens = rng.random((E, IN)).astype(np.float32), rng.random((E, OUT)).astype(np.float32)
    with CheckpointWriter(tmp_path / "s") as wr:
        a, z = numerics.minmax_params(numerics.as_matrix(w, 1), 8, G, symmetric=True)
        q = numerics.quantize(numerics.as_matrix(w, 1), a, z, 8, G)
        shape = numerics.param_shape(w.shape, G, 1)
        wr.add_quantized(
            "experts", numerics.from_matrix(q, w.shape, 1), a.reshape(shape), z.reshape(shape),
            group_size=G, scheme="symmetric", input_axis=1, importance=imp, sensitivity=sens,
        )
    ck = mf.open(tmp_path / "s")
    np.testing.assert_array_equal(ck.sensitivity("experts"), sens)
    d = (ck.dequantize("experts", 3) - ck.dequantize("experts", 8)).astype(np.float64)
    want = sum(float(np.sum(d[e] ** 2 * imp[e][:, None] * sens[e][None, :])) for e in range(E))
    assert numerics.weighted_sq_error(d, imp, 1, sens) == pytest.approx(want, rel=1e-12)


def _twins(tmp_path, loud: str | None, tag: str):
    """``a.weight`` and ``b.weight``: the same weights and the same importance; ``loud`` (if any)
    has a 100 times larger sensitivity: its output matters more to the loss."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    imp = rng.random(COLS).astype(np.float32) + 0.5
    sens = {n: np.full(ROWS, 100.0 if n == loud else 1.0, np.float32) for n in ("a.weight", "b.weight")}
    return mf.open(write_calibrated(tmp_path / tag, {n: (w, imp, sens[n] if loud else None) for n in sens}))


def test_sensitivity_gives_the_bits_to_the_tensor_whose_output_matters_more(tmp_path):
    """Room for one tensor at int4 and the other at int2. Per-tensor-scaled importance sees two equal
    tensors and gives them the same width; the sensitivity upgrades the one whose output matters,
    and swapping it swaps the choice, in matq's plans and in the GGUF file budget."""
    from matq_converters.exporters.gguf.budget import Part, file_budget_plan

    b4 = numerics.bits_per_weight(4, ROWS, COLS, G, 2, 0, 0.0)
    b2 = numerics.bits_per_weight(2, ROWS, COLS, G, 2, 0, 0.0)
    spec = f"budget:{(b4 + b2) / 2 + 1e-6}"
    same = resolve_plan(spec, _twins(tmp_path, None, "none"))
    assert same["a.weight"] == same["b.weight"]
    assert resolve_plan(spec, _twins(tmp_path, "a.weight", "a")) == {"a.weight": 4, "b.weight": 2}
    assert resolve_plan(spec, _twins(tmp_path, "b.weight", "b")) == {"a.weight": 2, "b.weight": 4}
    groups = [Part(("a.weight",)), Part(("b.weight",))]  # one GGUF tensor each
    plain = file_budget_plan(_twins(tmp_path, None, "g0"), groups, (), 3.9, False)
    assert plain["a.weight"] == plain["b.weight"]
    for loud, quiet in (("a.weight", "b.weight"), ("b.weight", "a.weight")):
        got = file_budget_plan(_twins(tmp_path, loud, "g" + loud), groups, (), 3.9, False)
        assert got[loud] > got[quiet]


def test_tensors_without_sensitivity_count_as_the_median_tensor(tmp_path, rng):
    """Beside tensors that keep a sensitivity, one that keeps none is weighed in the same unit: its
    plain (or column-scaled) error times the median tensor's mean weight; the step says which."""
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    imp = np.full(COLS, 2.0, np.float32)
    sens = {"a.weight": 1e-3, "b.weight": 4e-3, "c.weight": 9e-3}
    tensors = {n: (w, imp, np.full(ROWS, s, np.float32)) for n, s in sens.items()}
    tensors["d.weight"] = (w, None, None)
    ck = mf.open(write_calibrated(tmp_path / "m", tensors))
    ew = ErrorWeights(ck, list(tensors))
    d = np.ones((ROWS, COLS))
    assert ew.unit == pytest.approx(2.0 * 4e-3)
    assert ew.error("d.weight", d) == pytest.approx(2.0 * 4e-3 * ROWS * COLS)
    assert ew.error("c.weight", d) == pytest.approx(2.0 * 9e-3 * ROWS * COLS, rel=1e-6)
    assert "sensitivity and importance, as rises of the loss (3 of 4 tensors keep both)" in ew.note
