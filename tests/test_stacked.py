"""Stacked quantized tensors (spec 10.5, version 1.1, issue 22 item 2): a stack of matrices with groups
along the stated input axis, behind ``matq.stacked`` in ``must_understand`` so 1.0 readers refuse it
rather than misread it, and 1.0 checkpoints unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from spec_golden import MAKE, SPEC_DIR, VALIDATOR
from spec_golden import after as _after
from spec_golden import record as golden_record

import matq_format as mf
from matq_format import constants as C
from matq_format import numerics
from matq_format.errors import HeaderError, UnsupportedVersionError
from matq_format.manifest import parse_manifest

STACKED = SPEC_DIR / "example" / MAKE.STACKED
NAME = "experts.gate_up_proj"


def test_golden_stacked_example_reads_as_the_spec_says():
    ckpt = mf.open(STACKED)
    ckpt.verify()
    m = ckpt.manifest
    assert (m["version"], m["must_understand"]) == ("1.1", [C.EXT_STACKED])
    record = golden_record("stacked-record")
    assert record == m["tensors"][NAME]
    np.testing.assert_array_equal(ckpt.codes(NAME), MAKE.STACKED_CODES)
    assert ckpt.scale(NAME).shape == (2, 2, 3)
    rows = [r for r in _after("stacked-weights").splitlines()[3:] if r.startswith("| (")]
    assert len(rows) == 8
    w8, k2, w2 = ckpt.dequantize(NAME), ckpt.sliced_codes(NAME, 2), ckpt.dequantize(NAME, 2)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        e, i, o = (int(x) for x in cells[0].strip("()").split(","))
        g = i // 2
        assert int(cells[1]) == ckpt.codes(NAME)[e, i, o] and int(cells[2]) == g
        assert 2.0 ** int(cells[3][2:]) == ckpt.scale(NAME)[e, g, o] and int(cells[4]) == ckpt.zero(NAME)[e, g, o]
        assert float(cells[5]) == w8[e, i, o] and int(cells[6]) == k2[e, i, o] and float(cells[7]) == w2[e, i, o]


def test_a_1_0_reader_refuses_a_stacked_checkpoint_and_reads_1_0_ones():
    """A reader that knows only 1.0's extension refuses the file before any data (must_understand)."""
    text = json.dumps(mf.open(STACKED).manifest)
    with pytest.raises(UnsupportedVersionError, match="matq.stacked"):
        parse_manifest(STACKED, text, frozenset({C.EXT_SIGNED_SCALES}))
    m10 = mf.open(SPEC_DIR / "example" / MAKE.SINGLE_FILE).manifest
    assert m10["version"] == "1.0" and m10["must_understand"] == []
    parse_manifest(STACKED, json.dumps(m10), frozenset())


def test_stacked_tensor_without_the_marker_is_malformed():
    m = mf.open(STACKED).manifest
    m["must_understand"] = []
    with pytest.raises(HeaderError, match="needs matq.stacked in must_understand"):
        parse_manifest(STACKED, json.dumps(m), frozenset({C.EXT_STACKED}))


def test_schema_accepts_1_1_and_keeps_1_0_closed():
    m = mf.open(STACKED).manifest
    assert [e.message for e in VALIDATOR.iter_errors(m)] == []
    m["version"] = "1.0"  # a 1.0 document cannot hold a 3-D quantized tensor or input_axis
    assert list(VALIDATOR.iter_errors(m))


@pytest.mark.parametrize("axis", [1, 2])
@pytest.mark.parametrize("group", [None, 4, 3])
def test_stack_is_the_same_as_its_matrices_one_by_one(tmp_path, axis, group):
    """Each expert of a stack dequantizes, bit for bit, as the 2-D tensor [out, in] holding it."""
    rng = np.random.default_rng(axis)
    e, n_in, n_out = 3, 10, 7
    shape = (e, n_in, n_out) if axis == 1 else (e, n_out, n_in)
    codes = rng.integers(0, 256, shape, dtype=np.uint8)
    pshape = numerics.param_shape(shape, group, axis)
    scale = (2.0 ** rng.integers(-12, -4, pshape)).astype(np.float32)
    zero = rng.integers(0, 256, pshape).astype(np.float32)
    with mf.CheckpointWriter(tmp_path / "ck", 8) as w:
        w.add_quantized("s", codes, scale, zero, group_size=group, input_axis=axis)
        for x in range(e):  # the same expert, as a plain linear weight [out, in]
            c, s, z = (a[x].T if axis == 1 else a[x] for a in (codes, scale, zero))
            w.add_quantized(f"m{x}", np.ascontiguousarray(c), s, z, group_size=group)
    ckpt = mf.open(tmp_path / "ck")
    assert ckpt.info("s").stacked and not ckpt.info("m0").stacked
    for r, ep in [(8, False), (4, False), (2, True)]:
        stack = ckpt.dequantize("s", r, ep)
        assert stack.shape == shape
        for x in range(e):
            mine = stack[x].T if axis == 1 else stack[x]
            assert mine.tobytes() == np.ascontiguousarray(ckpt.dequantize(f"m{x}", r, ep)).tobytes()
    mf.slice_checkpoint(ckpt, tmp_path / "s4", bits=4)
    sliced = mf.open(tmp_path / "s4")
    assert sliced.manifest["version"] == "1.1" and sliced.info("s").input_axis == axis
    assert sliced.dequantize("s", 4).tobytes() == ckpt.dequantize("s", 4).tobytes()


def test_matrix_view_round_trips():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis in (1, 2):
        m = numerics.as_matrix(a, axis)
        assert m.shape == (a.size // a.shape[axis], a.shape[axis])
        assert np.array_equal(numerics.from_matrix(m, a.shape, axis), a)
    assert np.shares_memory(numerics.as_matrix(a, 2), a)  # the last axis: a view, no copy


def test_writer_refuses_parameters_of_the_wrong_shape(tmp_path):
    with mf.CheckpointWriter(tmp_path / "ck", 8) as w:
        with pytest.raises(mf.errors.WriterError, match=r"scale and zero need shape \[2, 1, 3\]"):
            w.add_quantized("s", np.zeros((2, 4, 3), np.uint8), np.ones((2, 4, 3)), np.zeros((2, 4, 3)), input_axis=1)
        w.add_dense("d", np.zeros(1, np.float32))
    assert mf.open(tmp_path / "ck").manifest["version"] == "1.0"  # nothing stacked was written
