"""The format's limits (issue 10, item 6): the writer refuses, before publishing, anything the reader
would refuse (too long a name, too many tensors or entries, a header past MAX_HEADER_BYTES, too large
a dimension or group), naming the tensor; the reader refuses the same; and the reader's memory per
entry stays small (bench/limits.py measures a whole checkpoint at the limits).

Limits are shrunk with ``monkeypatch`` so the tests stay small; both sides read them from
``matq_format.constants`` at call time.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from click.testing import CliRunner

import matq_format as mf
from matq_cli.main import cli
from matq_format import constants as C
from matq_format.container import SafetensorsWriter
from matq_format.errors import LimitError, WriterError

NAMES = ["plain", 'q"uote', "back\\slash", "ctl\x01\x1f", "ünï€😀", "x" * 300]
"""Names whose JSON (and JSON of that JSON, in the base header) grows in every way there is."""


def header_len(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def tight_header_len(path) -> int:
    """The header's length without the padding spaces a writer may add."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return len(f.read(n).rstrip(b" "))


def add_tensor(w: mf.CheckpointWriter, name: str, i: int = 0) -> None:
    """One small quantized tensor (groups of 4) and one dense tensor with extras."""
    cols = 7 + i
    g = -(-cols // 4)
    w.add_quantized(name, np.zeros((5, cols), np.uint8), np.ones((5, g)), np.zeros((5, g)), group_size=4)
    w.add_dense(name + ".d", np.zeros((3, i + 1), np.float32), extras={"org.x.note": '"q"\\'})


def write(out, names=NAMES, **kw):
    with mf.CheckpointWriter(out, overwrite=True, source={"note": 'q"\\\n'}, **kw) as w:
        for i, name in enumerate(names):
            add_tensor(w, name, i)
    return out


def base_of(out):
    return out / C.BASE_FILENAME if out.is_dir() else out


# --- tensor names ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["a" * (C.MAX_NAME_BYTES + 1), "é" * (C.MAX_NAME_BYTES // 2 + 1)], ids=["ascii", "2-byte"]
)
def test_writer_refuses_a_name_over_the_limit(tmp_path, name):
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        with pytest.raises(WriterError, match=f"bytes of UTF-8, over the limit of {C.MAX_NAME_BYTES}"):
            w.add_dense(name, np.zeros(2, np.float32))
        with pytest.raises(WriterError, match="over the limit"):
            w.add_quantized(name, np.zeros((1, 1), np.uint8), np.ones(1), np.zeros(1))
        w.add_dense("b" * C.MAX_NAME_BYTES, np.zeros(2, np.float32))  # at the limit: fine
        err = None
        try:
            w.add_dense(name, np.zeros(2, np.float32))
        except WriterError as exc:
            err = exc
        assert err is not None and len(str(err)) < 300, "the message shows the start of the name only"
    assert mf.open(tmp_path / "ck").tensor_names() == ["b" * C.MAX_NAME_BYTES]


def test_reader_refuses_a_name_over_the_limit(tmp_path, monkeypatch):
    out = write(tmp_path / "ck", names=["x" * 40])
    monkeypatch.setattr(C, "MAX_NAME_BYTES", 39)
    with pytest.raises(LimitError, match="is 40 bytes of UTF-8, over the limit of 39") as ei:  # as the writer
        mf.open(out)
    assert ei.value.path == str(base_of(out))


# --- tensor and entry counts -----------------------------------------------------------------------
def test_writer_refuses_one_tensor_too_many(tmp_path, monkeypatch):
    out = write(tmp_path / "ck", names=["a", "b"])  # 4 tensors, 12 entries
    monkeypatch.setattr(C, "MAX_TENSORS", 4)
    mf.open(out)
    with mf.CheckpointWriter(tmp_path / "ck2") as w:
        for name in ("a", "b"):
            add_tensor(w, name)
        with pytest.raises(WriterError, match="c: a checkpoint holds at most 4 tensors"):
            w.add_dense("c", np.zeros(1, np.float32))
    assert mf.open(tmp_path / "ck2").tensor_names() == ["a", "a.d", "b", "b.d"]
    monkeypatch.setattr(C, "MAX_TENSORS", 3)
    with pytest.raises(LimitError, match="4 tensors exceed the limit of 3"):
        mf.open(out)


@pytest.mark.parametrize("single_file", [False, True])
def test_writer_refuses_one_entry_too_many(tmp_path, monkeypatch, single_file):
    out = tmp_path / ("ck.safetensors" if single_file else "ck")
    write(out, names=["a"], single_file=single_file)  # 10 entries: 8 planes, scale, a.d (zero points all 0: 10.6)
    monkeypatch.setattr(C, "MAX_ENTRIES", 10)
    mf.open(out)
    with mf.CheckpointWriter(tmp_path / "ck2", single_file=single_file) as w:
        add_tensor(w, "a")
        with pytest.raises(WriterError, match="over the limit of 10|over 10 entries"):
            w.add_dense("b", np.zeros(1, np.float32))
    monkeypatch.setattr(C, "MAX_ENTRIES", 9)
    with pytest.raises(LimitError, match="entries exceed the limit of 9"):
        mf.open(out)


# --- header bytes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("single_file", [False, True])
def test_header_estimate_is_a_close_upper_bound(tmp_path, monkeypatch, single_file):
    """The writer counts every header byte as it will write it (names escaped twice in the base
    header): a limit 1 KiB above the real header admits the checkpoint, one byte below refuses it."""
    suffix = ".safetensors" if single_file else ""
    out = write(tmp_path / f"ck{suffix}", single_file=single_file)
    actual = tight_header_len(base_of(out))
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", actual + 1024)
    out = write(tmp_path / f"ck2{suffix}", single_file=single_file)
    assert header_len(base_of(out)) <= C.MAX_HEADER_BYTES
    mf.open(out)
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", actual - 1)
    with pytest.raises(WriterError, match="would take over"):
        write(tmp_path / f"ck3{suffix}", single_file=single_file)
    assert not (tmp_path / f"ck3{suffix}").exists()


@pytest.mark.parametrize("single_file", [False, True])
def test_writer_refuses_the_tensor_that_would_pass_the_header_limit(tmp_path, monkeypatch, single_file):
    """Before: the writer published a checkpoint whose header the reader then refused."""
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", 40_000)
    out = tmp_path / ("ck.safetensors" if single_file else "ck")
    w = mf.CheckpointWriter(out, single_file=single_file)
    n = 0
    with pytest.raises(WriterError, match=r"model\.layers\.\d+\.mlp\.up_proj\.weight: the header") as ei:
        while n < 1000:  # ~1 KB of header each: the limit comes long before
            w.add_quantized(
                f"model.layers.{n}.mlp.up_proj.weight", np.zeros((2, 3), np.uint8), np.ones(2), np.zeros(2)
            )
            n += 1
    assert f"limit of {C.MAX_HEADER_BYTES}" in str(ei.value) and ei.value.path == str(out)
    assert n > 10
    w.check_limits()
    w.close()  # the refused tensor left nothing behind
    ckpt = mf.open(out)
    assert len(ckpt.tensor_names()) == n
    assert header_len(base_of(out)) <= C.MAX_HEADER_BYTES
    # ... and it was the one that did not fit: with it, the header passes the limit.
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", 10**8)
    with mf.CheckpointWriter(tmp_path / "more", single_file=single_file) as w2:
        for i in range(n + 1):
            w2.add_quantized(
                f"model.layers.{i}.mlp.up_proj.weight", np.zeros((2, 3), np.uint8), np.ones(2), np.zeros(2)
            )
    assert tight_header_len(base_of(tmp_path / "more")) > 40_000 - 1024  # the estimate is close


def test_plane_file_headers_are_counted_too(tmp_path):
    """Plane headers are counted as well (an upper bound within a few bytes); the base header,
    which lists every plane entry again, always reaches the limit first."""
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        for i, name in enumerate(NAMES):
            add_tensor(w, name, i)
        b = w._budget
        planes = {k: b.plane_meta + n for k, n in b.planes.items()}
    assert sorted(planes) == list(range(8))
    for k, n in planes.items():
        assert 0 <= n - tight_header_len(tmp_path / "ck" / C.PLANE_FILENAME.format(k=k)) <= 16


def test_check_limits_recounts_source_and_carried(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", 20_000)
    w = mf.CheckpointWriter(tmp_path / "ck")
    add_tensor(w, "a")
    w.check_limits()
    w.source["notes"] = "x" * 30_000  # changed after the tensors were counted
    with pytest.raises(WriterError, match=f"past the reader's limit of {C.MAX_HEADER_BYTES}"):
        w.check_limits()
    w.abort()
    assert not (tmp_path / "ck").exists()


def test_header_room_never_passes_the_limit(tmp_path, monkeypatch):
    """The room reserved for a header (2 KiB per expected tensor) was kept, padded, whenever the data
    dwarfed it: 90k expected tensors and 400 GB of weights made a 184 MB header no reader opens."""
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", 1 << 20)
    monkeypatch.setattr(SafetensorsWriter, "MAX_WASTE_FRACTION", 1)  # padding is kept when data >= it
    with mf.CheckpointWriter(tmp_path / "ck", expected_tensors=1000) as w:  # 2.1 MB of room
        w.add_dense("big", np.zeros(3 << 20, np.uint8))
    assert header_len(tmp_path / "ck" / C.BASE_FILENAME) == 1 << 20  # padded, to the limit at most
    assert mf.open(tmp_path / "ck").dense("big").size == 3 << 20


# --- dimensions and group sizes --------------------------------------------------------------------
def test_writer_refuses_dimensions_the_reader_refuses(tmp_path):
    src = tmp_path / "zeros.bin"
    src.write_bytes(b"")
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        with pytest.raises(WriterError, match=r"big: shape \[0, 2199023255552\] passes the limits"):
            w.add_dense_from_file("big", src, 0, 0, "F32", (0, 2 * C.MAX_DIM_SIZE))
        with pytest.raises(WriterError, match="group_size 2199023255552 exceeds the limit"):
            w.add_quantized(
                "q", np.zeros((1, 1), np.uint8), np.ones(1), np.zeros(1), group_size=2 * C.MAX_DIM_SIZE
            )
        w.add_dense_from_file("edge", src, 0, 0, "F32", (0, C.MAX_DIM_SIZE, C.MAX_DIM_SIZE))
    assert mf.open(tmp_path / "ck").info("edge").shape == (0, C.MAX_DIM_SIZE, C.MAX_DIM_SIZE)


def test_slice_of_an_empty_tensor_numpy_cannot_hold(tmp_path):
    """Item 7b: [0, 2^40, 2^40] is valid (and written by quantize); slicing copies it file to file,
    reading it as an array is a typed error."""
    src = tmp_path / "zeros.bin"
    src.write_bytes(b"")
    shape = (0, C.MAX_DIM_SIZE, C.MAX_DIM_SIZE)
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        add_tensor(w, "q")
        w.add_dense_from_file("experts", src, 0, 0, "F32", shape)
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["slice", str(tmp_path / "ck"), "--bits", "4", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    sliced = mf.open(tmp_path / "s")
    assert sliced.info("experts").shape == shape
    sliced.verify()
    with pytest.raises(mf.errors.ShapeTooLargeError, match=r"experts: shape \[0, 1099511627776"):
        sliced.dense("experts")
    np.testing.assert_array_equal(sliced.dense("q.d"), mf.open(tmp_path / "ck").dense("q.d"))


def test_slice_copies_dense_tensors_checked(tmp_path):
    """Dense tensors are copied by the kernel now: a damaged one still fails the slice, and nothing
    is published."""
    out = write(tmp_path / "ck", names=["a"])
    ckpt = mf.open(out)
    path, offset, nbytes = ckpt.dense_location("a.d")
    assert (path, nbytes) == (base_of(out), 12)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(mf.errors.ChecksumError, match=r"entry 'a\.d' does not match its CRC-32"):
        mf.slice_checkpoint(mf.open(out), tmp_path / "s", bits=4)
    assert not (tmp_path / "s").exists()
    mf.slice_checkpoint(mf.open(out, verify_reads=False), tmp_path / "s", bits=4)  # as asked


def test_reader_keeps_one_string_per_dtype_and_file(tmp_path):
    """Memory per entry: entries share their dtype and file-name strings and equal shapes."""
    out = write(tmp_path / "ck", names=[f"t{i}" for i in range(20)])
    ckpt = mf.open(out)
    h = ckpt._headers[C.PLANE_FILENAME.format(k=7)]
    assert len({id(e.dtype) for e in h.entries.values()}) == 1
    assert len({id(e.shape) for e in h.entries.values()}) == len({e.shape for e in h.entries.values()})
    assert len({id(e["file"]) for e in ckpt.manifest["entries"].values()}) == 9
    assert not hasattr(h.entries["t0@plane7"], "__dict__")


def test_bench_script_runs(tmp_path, monkeypatch):
    """bench/limits.py at tiny limits: it writes each case up to a refusal and reports figures."""
    import importlib.util
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location(
        "bench_limits", os.path.join(os.path.dirname(__file__), "..", "bench", "limits.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(C, "MAX_TENSORS", 64)
    monkeypatch.setattr(C, "MAX_HEADER_BYTES", 30_000)
    for case in ("dense", "moe", "single", "long"):
        out = tmp_path / (case + (".safetensors" if case == "single" else ""))
        n, _ = bench.write(case, out)
        assert 0 < n <= 64
        assert header_len(base_of(out)) <= 30_000
    monkeypatch.undo()
    r = subprocess.run(
        [sys.executable, "-c", bench.PROBE, str(tmp_path / "moe")], capture_output=True, text=True, check=True
    )
    seconds, rss = map(float, r.stdout.split())
    assert seconds > 0 and rss > 10
