"""One zero point for a whole tensor (spec 10.6, version 1.2, issue 23 item 4): symmetric layouts store
no zero points; 1.0 and 1.1 readers refuse such files (``must_understand``); files that do not use it
are unchanged; every reader of zero points goes through ``Checkpoint.zero``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from spec_golden import MAKE, SPEC, SPEC_DIR, VALIDATOR
from spec_golden import after as _after
from spec_golden import record as golden_record
from test_format_errors import rewrite_manifest

import matq_format as mf
from matq_cli.main import cli
from matq_format import constants as C
from matq_format import numerics as N
from matq_format.checkpoint import UNDERSTOOD_EXTENSIONS
from matq_format.errors import HeaderError, UnsupportedVersionError, WriterError
from matq_format.manifest import RecordError, TensorInfo, check_tensor, parse_manifest
from matq_format.plans import tensor_bits

GOLDEN = SPEC_DIR / "example" / MAKE.CONSTANT_ZERO
READER_1_1 = frozenset({C.EXT_SIGNED_SCALES, C.EXT_STACKED})


def _symmetric(w: mf.CheckpointWriter, name: str = "q", rows: int = 4, cols: int = 70, seed: int = 0, **kw):
    """Random weights on a symmetric grid (z = 128 everywhere), groups of 32; returns the zero array."""
    x = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    s, z = N.minmax_params(x, 8, 32, symmetric=True, scale_dtype="F16")
    w.add_quantized(name, N.quantize(x, s, z, 8, 32), s, z, group_size=32, scheme="symmetric", **kw)
    return z


# --- the golden example (14.7) ---------------------------------------------------------------------
def test_golden_example_reads_as_the_spec_says(tmp_path):
    ckpt = mf.open(GOLDEN)
    ckpt.verify()
    m = ckpt.manifest
    assert (m["version"], m["must_understand"]) == ("1.2", [C.EXT_CONSTANT_ZERO])
    record = golden_record("constant-zero-record")
    assert record == m["tensors"]["fc.weight"] and record[C.ZERO_POINT_KEY] == MAKE.ZERO_POINT
    assert sorted(m["entries"]) == sorted([f"fc.weight@plane{k}" for k in range(8)] + ["fc.weight@scale"])
    rows = _after("constant-zero-weights").split("\n\n")[0].splitlines()[3:]  # marker, header, rule
    assert len(rows) == 7
    q, z = ckpt.codes("fc.weight"), ckpt.zero("fc.weight")
    assert z.dtype == np.float32 and z.shape == (2, 2) and np.all(z == 128)
    for row in rows:
        c = [x.strip() for x in row.strip("|").split("|")]
        i, j, g = int(c[0]), int(c[1]), int(c[1]) // 4
        assert (int(c[2]), int(c[3])) == (q[i, j], g) and 2.0 ** int(c[4][2:]) == ckpt.scale("fc.weight")[i, g]
        assert float(c[5]) == ckpt.dequantize("fc.weight")[i, j]
        for r, k, w in ((4, c[6], c[7]), (2, c[8], c[9])):
            assert int(k) == ckpt.sliced_codes("fc.weight", r)[i, j]
            assert float(w) == ckpt.dequantize("fc.weight", r)[i, j]
    # the same tensor with a zero entry: version 1.0, the same weights, the sizes the spec states
    with mf.CheckpointWriter(
        tmp_path / "f.safetensors", 8, single_file=True, source=MAKE.SOURCE, constant_zero=False
    ) as w:
        MAKE.write_constant_zero(w, np.full((2, 2), 128.0, np.float32))
    entry = mf.open(tmp_path / "f.safetensors")
    assert entry.version == "1.0" and "fc.weight@zero" in entry.manifest["entries"]
    for r in range(1, 9):
        assert entry.dequantize("fc.weight", r).tobytes() == ckpt.dequantize("fc.weight", r).tobytes()
    sizes = re.search(r"<!-- constant-zero-sizes --> (\d+) bytes, this one (\d+)", SPEC).groups()
    assert (int(sizes[0]), int(sizes[1])) == (entry.path.stat().st_size, GOLDEN.stat().st_size)


def test_a_1_1_reader_refuses_it_and_older_files_read_as_before():
    text = json.dumps(mf.open(GOLDEN).manifest)
    with pytest.raises(UnsupportedVersionError, match=C.EXT_CONSTANT_ZERO):
        parse_manifest(GOLDEN, text, READER_1_1)
    for old in (MAKE.SINGLE_FILE, MAKE.STACKED):  # the 1.0 and 1.1 golden files: no extension of 1.2
        m = mf.open(SPEC_DIR / "example" / old).manifest
        assert C.EXT_CONSTANT_ZERO not in m["must_understand"] and m["version"] in ("1.0", "1.1")
        parse_manifest(GOLDEN, json.dumps(m), READER_1_1)


def test_schema_accepts_1_2_and_keeps_1_0_closed():
    m = mf.open(GOLDEN).manifest
    assert [e.message for e in VALIDATOR.iter_errors(m)] == []
    m["version"] = "1.0"  # a 1.0 document cannot hold zero_point
    assert list(VALIDATOR.iter_errors(m))


def test_record_check_refuses_what_zero_dtype_cannot_hold():
    """The spec allows c up to 16: a zero point its zero_dtype cannot hold exactly is malformed."""
    t = TensorInfo("t", "quantized", (2, 64), "F32", "channel", None, "symmetric", "F16", "BF16", (), ())
    check_tensor(TensorInfo(**{**t.__dict__, "zero_point": 256}), 16)  # BF16 holds 256
    with pytest.raises(RecordError, match="not exactly representable in zero_dtype BF16"):
        check_tensor(TensorInfo(**{**t.__dict__, "zero_point": 257}), 16)
    with pytest.raises(RecordError, match=r"integer in 0\.\.255"):
        check_tensor(TensorInfo(**{**t.__dict__, "zero_point": 256}), 8)


# --- the writer's choice ---------------------------------------------------------------------------
def test_writer_records_one_integer_and_nothing_else(tmp_path):
    """Zero points all equal to one integer go in the record; others (several values, one fraction,
    an empty tensor) stay an entry; ``constant_zero=False`` keeps every entry."""
    out = tmp_path / "ck"
    with mf.CheckpointWriter(out, 8) as w:
        _symmetric(w, "sym")
        w.add_quantized("asym", np.zeros((2, 8), np.uint8), np.ones((2, 1)), np.array([[3.0], [4.0]]))
        w.add_quantized("half", np.zeros((2, 8), np.uint8), np.ones((2, 1)), np.full((2, 1), 7.5), zero_dtype="F32")
        w.add_quantized("empty", np.zeros((0, 8), np.uint8), np.ones((0, 1)), np.ones((0, 1)))
        w.add_quantized("given", np.zeros((2, 8), np.uint8), np.ones((2, 1)), np.int64(9))
    ckpt = mf.open(out)
    ckpt.verify()
    assert [ckpt.info(n).zero_point for n in ckpt.tensor_names()] == [128, None, None, None, 9]
    entries = ckpt.manifest["entries"]
    assert [f"{n}@zero" in entries for n in ckpt.tensor_names()] == [False, True, True, True, False]
    assert ckpt.version == "1.2" and ckpt.manifest["must_understand"] == [C.EXT_CONSTANT_ZERO]
    with mf.CheckpointWriter(tmp_path / "old", 8, constant_zero=False) as w:
        z = _symmetric(w, "sym")
    old = mf.open(tmp_path / "old")
    assert old.version == "1.0" and old.manifest["must_understand"] == [] and "sym@zero" in old.manifest["entries"]
    np.testing.assert_array_equal(old.zero("sym"), z)
    np.testing.assert_array_equal(ckpt.zero("sym"), z)
    for r, ep in ((8, False), (4, False), (2, True)):
        assert ckpt.dequantize("sym", r, ep).tobytes() == old.dequantize("sym", r, ep).tobytes()


def test_writer_refuses_a_bad_constant_and_writes_nothing(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(WriterError, match=r"zero_point 256 must be an integer in 0\.\.255") as ei:
        with mf.CheckpointWriter(out, 8) as w:
            w.add_quantized("q", np.zeros((2, 8), np.uint8), np.ones((2, 1)), 256)
    assert str(out) in str(ei.value) and "\n" not in str(ei.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_sizes_drop_by_the_zero_entry(tmp_path):
    """Bytes each width reads, and bits per weight, lose exactly the zero entry: 0.25 bits per weight
    for U8 zero points in groups of 32."""
    for name, kw in (("new", {}), ("old", {"constant_zero": False})):
        with mf.CheckpointWriter(tmp_path / name, 8, **kw) as w:
            _symmetric(w, rows=8, cols=256)
    new, old = mf.open(tmp_path / "new"), mf.open(tmp_path / "old")
    for r in (8, 4, 2):
        assert old.bytes_for_width("q", r) - new.bytes_for_width("q", r) == 8 * 8
        assert tensor_bits(old, "q", r, False) - tensor_bits(new, "q", r, False) == 0.25
    assert tensor_bits(new, "q", 2, False) == 2 + 16 / 32  # served codes and F16 scales, no zero points


# --- slicing, partial views, the command line ------------------------------------------------------
def test_slice_keeps_each_tensor_as_it_found_it(tmp_path):
    for name, kw in (("new", {}), ("old", {"constant_zero": False})):
        with mf.CheckpointWriter(tmp_path / name, 8, **kw) as w:
            _symmetric(w)
        mf.slice_checkpoint(tmp_path / name, tmp_path / f"{name}-int2", bits=2)
    new, old = mf.open(tmp_path / "new-int2"), mf.open(tmp_path / "old-int2")
    assert (new.version, new.info("q").zero_point) == ("1.2", 128)
    assert (old.version, old.info("q").zero_point) == ("1.0", None)  # a 1.0 file stays 1.0
    assert new.dequantize("q", 2).tobytes() == old.dequantize("q", 2).tobytes()


def test_partial_view_reads_a_width_without_the_other_planes(tmp_path):
    """What ``matq pull --bits 2`` downloads (the base file and three plane files) serves int2."""
    with mf.CheckpointWriter(tmp_path / "ck", 8) as w:
        _symmetric(w)
    full = mf.open(tmp_path / "ck")
    want = full.dequantize("q", 2)
    for k in set(range(8)) - set(N.planes_needed(8, 2)):
        (tmp_path / "ck" / C.PLANE_FILENAME.format(k=k)).unlink()
    part = mf.open(tmp_path / "ck", partial=True)
    assert part.dequantize("q", 2).tobytes() == want.tobytes() and part.info("q").max_width(8) == 2


def _unmarked(tmp_path: Path) -> Path:
    """A 1.2 checkpoint whose manifest lost ``matq.constant_zero`` (a 1.1 manifest using it)."""
    out = tmp_path / "bad.safetensors"
    with mf.CheckpointWriter(out, 8, single_file=True) as w:
        _symmetric(w)
    rewrite_manifest(out, lambda m: m.update(version="1.1", must_understand=[]))
    return out


def test_cli_refuses_an_unmarked_constant_in_one_line_and_writes_nothing(tmp_path):
    bad = _unmarked(tmp_path)
    with pytest.raises(HeaderError, match=f"needs {C.EXT_CONSTANT_ZERO} in must_understand"):
        mf.open(bad)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["slice", str(bad), "--bits", "2", "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 1 and str(bad) in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists()


def test_this_reader_understands_it():
    assert C.EXT_CONSTANT_ZERO in UNDERSTOOD_EXTENSIONS


def test_inspect_shows_the_constant(tmp_path):
    with mf.CheckpointWriter(tmp_path / "ck", 8) as w:
        _symmetric(w)
    run = CliRunner().invoke
    r = run(cli, ["inspect", str(tmp_path / "ck"), "--tensors"], catch_exceptions=False)
    assert r.exit_code == 0 and "group 32 symmetric z=128 " in r.output, r.output
    d = json.loads(run(cli, ["inspect", str(tmp_path / "ck"), "--json"], catch_exceptions=False).output)
    assert d["format_version"] == "1.2" and d["tensors"][0]["zero_point"] == 128
