"""Write then read back: every layout option survives the file exactly, and slicing from the file
equals the reference formula in ``numerics`` at every width, with and without extra precision.

Also the writer's behaviour around the happy path: atomic publication, overwrite, permissions.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import matq_format as mf
from matq_format import constants as C
from matq_format import numerics as N
from matq_format.container import read_header
from matq_format.errors import MissingPlanesError, WidthError, WriterError

SCALE = settings.default.max_examples / 100
"""Example counts below are for the default profile; a longer profile scales them."""

# numpy dtypes for every safetensors dtype (BF16 and F8 through ml_dtypes).
DENSE_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
}
F8 = ("F8_E4M3", "F8_E5M2")


def test_every_safetensors_dtype_is_covered():
    assert set(DENSE_DTYPES) == set(C.DTYPES)


# --- strategies ---------------------------------------------------------------------------------
def _stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values that are exactly representable in ``dtype`` (scales and zero points)."""
    if dtype in ("U8", "U16"):
        return np.rint(values).astype(np.float32)
    return values.astype(DENSE_DTYPES[dtype]).astype(np.float32)


@st.composite
def quantized_specs(draw, code_bits: int):
    rows = draw(st.sampled_from([1, 2, 3, 7, 8, 9]) | st.integers(1, 24))
    cols = draw(st.sampled_from([1, 2, 7, 63, 64, 65, 129]) | st.integers(1, 200))
    group = draw(
        st.none()
        | st.sampled_from([1, 8, 32, 64, 128, cols, cols + 1])
        | st.integers(1, cols + 50)
        | st.just(10**6)
    )
    scale_dtype = draw(st.sampled_from(C.SCALE_DTYPES))
    zero_dtype = draw(st.sampled_from(C.ZERO_DTYPES))
    scheme = draw(st.sampled_from(["asymmetric", "symmetric"]))
    ep = draw(st.lists(st.integers(1, code_bits - 1), unique=True, max_size=3))
    dtype = draw(st.sampled_from(C.QUANTIZABLE_DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    top = (1 << code_bits) - 1
    groups = N.n_groups(cols, group)
    codes = rng.integers(0, top + 1, (rows, cols)).astype(np.uint8)
    codes.flat[rng.integers(0, codes.size, max(1, codes.size // 8))] = top  # the extra bucket
    lo, hi = {"F16": (-24, 15), "BF16": (-120, 120), "F32": (-140, 120)}[scale_dtype]
    scale = np.exp2(rng.uniform(lo, hi, (rows, groups))).astype(np.float32)
    scale = np.maximum(_stored(scale, scale_dtype), np.float32(2.0**lo))
    if scheme == "symmetric":
        zero = np.full((rows, groups), 1 << (code_bits - 1), np.float32)
    else:
        zero = _stored(rng.uniform(0, top, (rows, groups)).astype(np.float32), zero_dtype)
    zero = np.minimum(zero, top)
    return dict(
        codes=codes,
        scale=scale,
        zero=zero,
        dtype=dtype,
        group_size=group,
        scheme=scheme,
        scale_dtype=scale_dtype,
        zero_dtype=zero_dtype,
        extra_precision=tuple(ep),
    )


@st.composite
def dense_arrays(draw):
    dtype = draw(st.sampled_from(sorted(DENSE_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5) | st.integers(1, 40), max_size=4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "BOOL":
        a = rng.integers(0, 2, n).astype(np.bool_)
    else:  # arbitrary bit patterns: NaNs, infinities and negative zeros must survive as bytes
        a = rng.integers(0, 256, n * DENSE_DTYPES[dtype].itemsize).astype(np.uint8).view(DENSE_DTYPES[dtype])
    return dtype, a.reshape(shape)


@st.composite
def checkpoints(draw):
    c = draw(st.integers(C.MIN_CODE_BITS, C.MAX_CODE_BITS_IMPL))
    q = draw(st.lists(quantized_specs(c), min_size=0, max_size=3))
    d = draw(st.lists(dense_arrays(), min_size=0, max_size=3))
    assume(q or d)
    keep = draw(st.none() | st.integers(1, c))
    single = draw(st.booleans())
    return c, q, d, keep, single


def _bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns, so that NaN == NaN and -0.0 != 0.0 in comparisons."""
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))


def write(out: Path, c: int, qspecs, dspecs, keep_bits=None, single_file=False) -> dict[str, dict | tuple]:
    tensors: dict[str, dict | tuple] = {}
    with mf.CheckpointWriter(out, c, single_file=single_file, source={"test": "roundtrip"}) as w:
        for i, spec in enumerate(qspecs):
            name = f"model.layers.{i}.mlp.down_proj.weight"
            w.add_quantized(
                name,
                spec["codes"],
                spec["scale"],
                spec["zero"],
                **{k: v for k, v in spec.items() if k not in ("codes", "scale", "zero")},
                keep_bits=keep_bits,
            )
            tensors[name] = spec
        for i, (dtype, a) in enumerate(dspecs):
            name = f"model.dense.{i}.{dtype.lower()}"
            w.add_dense(name, a)
            tensors[name] = (dtype, a)
    return tensors


def _one_integer(z: np.ndarray) -> int | None:
    """The writer stores zero points that all equal one integer as that integer (spec 10.6)."""
    return int(z.flat[0]) if z.size and float(z.flat[0]).is_integer() and np.all(z == z.flat[0]) else None


def check_roundtrip(path: Path, c: int, tensors: dict, keep_bits: int | None) -> None:
    ckpt = mf.open(path)
    assert ckpt.code_bits == c
    assert ckpt.tensor_names() == list(tensors)
    assert ckpt.quantized_names() == [n for n, t in tensors.items() if isinstance(t, dict)]
    ckpt.verify()
    kept = N.planes_needed(c, keep_bits or c)
    served = max(r for r in range(1, c + 1) if set(N.planes_needed(c, r)) <= set(kept))
    for name, t in tensors.items():
        info = ckpt.info(name)
        if not isinstance(t, dict):
            dtype, a = t
            assert (info.kind, info.dtype, info.shape) == ("dense", dtype, a.shape)
            got = ckpt.dense(name)
            assert got.dtype == a.dtype and got.shape == a.shape
            assert got.tobytes() == a.tobytes()
            with np.errstate(invalid="ignore", over="ignore"):  # random bits include NaN and inf
                deq, as_f32 = ckpt.dequantize(name), a.astype(np.float32)
            if dtype in C.FLOAT_DTYPES or dtype in F8:
                assert deq.dtype == np.float32
                np.testing.assert_array_equal(_bits(deq), _bits(as_f32))
            else:
                np.testing.assert_array_equal(deq, a)
            continue
        rows, cols = t["codes"].shape
        gs = t["group_size"]
        assert info == mf.TensorInfo(
            name,
            "quantized",
            (rows, cols),
            t["dtype"],
            "channel" if gs is None else "group",
            gs,
            t["scheme"],
            t["scale_dtype"],
            t["zero_dtype"],
            tuple(sorted(t["extra_precision"])),
            kept,
            zero_point=_one_integer(t["zero"]),
        )
        assert info.max_width(c) == served
        np.testing.assert_array_equal(_bits(ckpt.scale(name)), _bits(t["scale"]))
        np.testing.assert_array_equal(_bits(ckpt.zero(name)), _bits(t["zero"]))
        if served == c:
            np.testing.assert_array_equal(ckpt.codes(name), t["codes"])
        for r in range(1, c + 1):
            for ep in (False, True) if r < c else (False,):
                if r > served:
                    with pytest.raises(MissingPlanesError):
                        ckpt.dequantize(name, r, ep)
                    continue
                k = ckpt.sliced_codes(name, r, ep)
                assert k.dtype == np.uint8 and k.shape == (rows, cols)
                np.testing.assert_array_equal(k, N.slice_codes(t["codes"], c, r, ep))
                want = N.dequantize(t["codes"], t["scale"], t["zero"], c, r, gs, ep)
                got = ckpt.dequantize(name, r, ep)
                assert got.dtype == np.float32 and got.shape == (rows, cols)
                np.testing.assert_array_equal(_bits(got), _bits(want))
        if served == c:
            np.testing.assert_array_equal(_bits(ckpt.dequantize(name)), _bits(ckpt.dequantize(name, c)))
        with pytest.raises(WidthError):
            ckpt.dequantize(name, c + 1)
        with pytest.raises(WidthError):
            ckpt.dequantize(name, 0)


def check_safetensors_compatible(ckpt_path: Path) -> None:
    """Every file loads in the real ``safetensors.safe_open`` with the bytes matq reads."""
    ckpt = mf.open(ckpt_path)
    files = [ckpt.path, *(ckpt.root / f for f in ckpt.manifest["files"])]
    for f in files:
        header = read_header(f)
        with safe_open(str(f), framework="numpy") as st_file:
            assert st_file.metadata() == header.metadata
            assert set(st_file.keys()) == set(header.entries)
            for ename, e in header.entries.items():
                sl = st_file.get_slice(ename)
                assert sl.get_dtype() == e.dtype and tuple(sl.get_shape()) == e.shape
                if e.dtype in F8:  # safetensors' numpy backend has no float8
                    continue
                got = st_file.get_tensor(ename)
                assert np.ascontiguousarray(got).tobytes() == bytes(ckpt._raw(ename))


# --- round trips --------------------------------------------------------------------------------
@settings(
    max_examples=int(120 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(checkpoints())
def test_roundtrip(tmp_path_factory, spec):
    c, qspecs, dspecs, keep_bits, single = spec
    out = tmp_path_factory.mktemp("rt") / ("ck.safetensors" if single else "ck")
    tensors = write(out, c, qspecs, dspecs, keep_bits, single)
    assert out.is_file() == single
    check_roundtrip(out, c, tensors, keep_bits)
    check_safetensors_compatible(out)


@settings(max_examples=int(25 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(C.MIN_CODE_BITS, C.MAX_CODE_BITS_IMPL), st.data())
def test_single_file_and_folder_hold_the_same(tmp_path_factory, c, data):
    """The two forms are one format: same manifest tensors, same entries, same values."""
    qspecs = data.draw(st.lists(quantized_specs(c), min_size=1, max_size=2))
    root = tmp_path_factory.mktemp("forms")
    write(root / "folder", c, qspecs, [])
    write(root / "one.safetensors", c, qspecs, [], single_file=True)
    a, b = mf.open(root / "folder"), mf.open(root / "one.safetensors")
    assert a.manifest["tensors"] == b.manifest["tensors"]
    assert {k: v["crc32"] for k, v in a.manifest["entries"].items()} == {
        k: v["crc32"] for k, v in b.manifest["entries"].items()
    }
    assert b.manifest["files"] == {} and len(a.manifest["files"]) == c
    assert a.files()[1:] == [a.root / C.PLANE_FILENAME.format(k=k) for k in range(c - 1, -1, -1)]
    for name in a.quantized_names():
        for r in range(1, c + 1):
            np.testing.assert_array_equal(a.sliced_codes(name, r), b.sliced_codes(name, r))


def test_open_accepts_folder_base_file_and_pathlike(small_checkpoint):
    for p in (small_checkpoint.path, small_checkpoint.base, str(small_checkpoint.path)):
        ckpt = mf.open(p)
        assert ckpt.path == small_checkpoint.base
        assert ckpt.tensor_names() == [*small_checkpoint.codes, *small_checkpoint.dense]


def test_shared_fixture_roundtrip(small_checkpoint):
    """The conftest factory's checkpoint reads back what went in (codes, params, dense, carried)."""
    b = small_checkpoint
    ckpt = mf.open(b.path)
    ckpt.verify()
    for name, q in b.codes.items():
        np.testing.assert_array_equal(ckpt.codes(name), q)
        np.testing.assert_array_equal(ckpt.scale(name), b.scales[name])
        np.testing.assert_array_equal(ckpt.zero(name), b.zeros[name])
        assert ckpt.info(name).extra_precision == (2,)
    for name, a in b.dense.items():
        assert ckpt.dense(name).tobytes() == a.tobytes() and ckpt.dense(name).dtype == a.dtype
    assert ckpt.config == {"model_type": "llama"}
    assert set(ckpt.carried_files()) == {"config.json"}
    assert len(ckpt.digest) == 64 and ckpt.digest == mf.open(b.path).digest


def test_source_extensions_and_carried_files_roundtrip(tmp_path):
    """Provenance, extension data and carried side files (nested paths too) come back as written."""
    hf = tmp_path / "hf"
    (hf / "tokenizer").mkdir(parents=True)
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    (hf / "model.safetensors").write_bytes(b"weights are not carried")
    (hf / ".cache").write_text("hidden files are not carried")
    source = {"model": "tiny", "revision": "abc", "params": {"lr": 1e-4, "widths": [8, 4, 2]}}
    ext = {"org.example.note": {"text": "kept \u00e9"}}
    with mf.CheckpointWriter(tmp_path / "ck", carry_from=hf, source=source, extensions=ext) as w:
        w.add_dense("a", np.ones(2, np.float32))
    ckpt = mf.open(tmp_path / "ck")
    ckpt.verify()
    assert ckpt.source == source and ckpt.manifest["extensions"] == ext
    assert sorted(ckpt.carried_files()) == ["config.json", "tokenizer/vocab.txt"]
    assert ckpt.carried_files()["tokenizer/vocab.txt"].read_text() == "a\nb\n"
    assert ckpt.config == {"model_type": "llama"}


def test_scalar_and_empty_dense_tensors_keep_their_shape(tmp_path):
    """0-d tensors stay 0-d (safetensors shape []), empty ones stay empty."""
    arrays = {
        "scalar": np.float32(3.5),
        "scalar_arr": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float16),
        "empty2": np.zeros((4, 0, 2), ml_dtypes.bfloat16),
    }
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        for name, a in arrays.items():
            w.add_dense(name, a)
    ckpt = mf.open(tmp_path / "ck")
    ckpt.verify()
    for name, a in arrays.items():
        a = np.asarray(a)
        assert ckpt.info(name).shape == a.shape
        assert ckpt.dense(name).shape == a.shape and ckpt.dense(name).tobytes() == a.tobytes()
    check_safetensors_compatible(tmp_path / "ck")


def test_empty_quantized_tensors(tmp_path):
    """Zero rows or zero columns: legal, verified, and every width returns an empty array."""
    with mf.CheckpointWriter(tmp_path / "ck", 4) as w:
        w.add_quantized("rows0", np.zeros((0, 9), np.uint8), np.ones((0, 1)), np.zeros((0, 1)))
        w.add_quantized("cols0", np.zeros((3, 0), np.uint8), np.ones((3, 1)), np.zeros((3, 1)))
        w.add_quantized("cols0g", np.zeros((3, 0), np.uint8), np.ones((3, 0)), np.zeros((3, 0)), group_size=8)
    ckpt = mf.open(tmp_path / "ck")
    ckpt.verify()
    for name in ckpt.tensor_names():
        for r in range(1, 5):
            assert ckpt.dequantize(name, r).shape == ckpt.info(name).shape


def test_non_native_byte_order_and_layout_are_stored_little_endian(tmp_path):
    """Big-endian and Fortran-ordered inputs are stored as their values, not their raw bytes."""
    be = np.arange(12, dtype=">f4").reshape(3, 4) * np.float32(1.5)
    fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    codes = np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        w.add_dense("be", be)
        w.add_dense("be16", np.arange(5, dtype=">u2"))
        w.add_dense("fortran", fortran)
        w.add_quantized("q", codes, np.array([1, 2, 4], ">f4"), np.array([0, 1, 2], ">f8"))
    ckpt = mf.open(tmp_path / "ck")
    np.testing.assert_array_equal(ckpt.dense("be"), be)
    np.testing.assert_array_equal(ckpt.dense("be16"), np.arange(5))
    np.testing.assert_array_equal(ckpt.dense("fortran"), fortran)
    np.testing.assert_array_equal(ckpt.codes("q"), codes)
    np.testing.assert_array_equal(ckpt.scale("q")[:, 0], [1, 2, 4])
    check_safetensors_compatible(tmp_path / "ck")


def test_minor_version_and_unknown_keys_are_read(small_checkpoint, tmp_path):
    """A newer minor version and unknown optional keys are read (spec: minor versions only add)."""
    import json
    import shutil
    import struct
    import zlib

    dst = tmp_path / "ck"
    shutil.copytree(small_checkpoint.path, dst)
    base = dst / C.BASE_FILENAME
    raw = base.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    m = json.loads(header["__metadata__"]["matq"])
    m["version"] = f"{C.FORMAT_VERSION[0]}.{C.FORMAT_VERSION[1] + 7}"
    m["org.example.future"] = {"x": [1, 2]}
    next(iter(m["tensors"].values()))["org.example.note"] = "kept"
    text = json.dumps(m)
    header["__metadata__"]["matq"] = text
    header["__metadata__"]["matq.crc32"] = f"{zlib.crc32(text.encode()) & 0xFFFFFFFF:08x}"
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    base.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    ckpt = mf.open(dst)
    ckpt.verify()
    name = next(iter(small_checkpoint.codes))
    np.testing.assert_array_equal(ckpt.codes(name), small_checkpoint.codes[name])


# --- writer behaviour on the happy path ---------------------------------------------------------
def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


@pytest.mark.parametrize("single_file", [False, True])
def test_exception_inside_with_leaves_nothing(tmp_path, single_file):
    out = tmp_path / ("ck.safetensors" if single_file else "ck")
    with pytest.raises(RuntimeError, match="boom"):
        with mf.CheckpointWriter(out, single_file=single_file) as w:
            w.add_dense("a", np.ones(4, np.float32))
            w.add_quantized("q", np.zeros((2, 8), np.uint8), np.ones((2, 1)), np.zeros((2, 1)))
            assert _leftovers(tmp_path, out.name)  # work in progress lives in a hidden temp dir
            assert not out.exists()
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("single_file", [False, True])
def test_overwrite(tmp_path, single_file):
    out = tmp_path / ("ck.safetensors" if single_file else "ck")
    with mf.CheckpointWriter(out, single_file=single_file) as w:
        w.add_dense("old", np.ones(4, np.float32))
    with pytest.raises(WriterError) as ei:
        mf.CheckpointWriter(out, single_file=single_file)
    assert str(out) in str(ei.value)
    # A failed overwrite keeps the old checkpoint intact.
    with pytest.raises(KeyboardInterrupt):
        with mf.CheckpointWriter(out, single_file=single_file, overwrite=True) as w:
            w.add_dense("new", np.zeros(4, np.float32))
            raise KeyboardInterrupt
    assert mf.open(out).tensor_names() == ["old"]
    with mf.CheckpointWriter(out, single_file=single_file, overwrite=True) as w:
        w.add_dense("new", np.zeros(4, np.float32))
    assert mf.open(out).tensor_names() == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    # Switching forms replaces a folder by a file and back.
    with mf.CheckpointWriter(out, single_file=not single_file, overwrite=True) as w:
        w.add_dense("other", np.zeros(2, np.float32))
    assert mf.open(out).tensor_names() == ["other"] and out.is_dir() == single_file
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_published_folder_has_normal_permissions(tmp_path):
    """The temp dir is private while writing; the published checkpoint is readable like any folder."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "ck"
    with mf.CheckpointWriter(out) as w:
        w.add_dense("a", np.ones(4, np.float32))
    ref = tmp_path / "ref"
    ref.mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(ref.stat().st_mode)


def test_writer_refuses_use_after_close(tmp_path):
    w = mf.CheckpointWriter(tmp_path / "ck")
    w.add_dense("a", np.ones(2, np.float32))
    assert w.close() == tmp_path / "ck"
    assert w.close() == tmp_path / "ck"  # idempotent
    with pytest.raises(WriterError):
        w.add_dense("b", np.ones(2, np.float32))


def test_many_tensors(tmp_path):
    """Hundreds of tensors: the manifest, the header alignment and safetensors' view all agree."""
    out = tmp_path / "ck"
    with mf.CheckpointWriter(out, 2) as w:
        for i in range(400):
            w.add_dense(f"model.layers.{i}.input_layernorm.weight", np.full(3, i, np.int16))
            w.add_quantized(f"model.layers.{i}.q", np.full((1, 3), i % 4, np.uint8), [[1.0]], [[1.0]])
    ckpt = mf.open(out)
    assert len(ckpt.tensor_names()) == 800
    assert ckpt.dense("model.layers.399.input_layernorm.weight").tolist() == [399] * 3
    assert ckpt.codes("model.layers.399.q").tolist() == [[3] * 3]
    for f in ckpt.files():
        assert read_header(f).data_start % C.HEADER_ALIGN_BYTES == 0
    check_safetensors_compatible(out)


def test_dequantized_float32_is_writable_and_private(tmp_path):
    """An unquantized float32 tensor comes back from ``dequantize`` as the caller's own writable array
    (a copy-on-write map, so nothing is copied up front): writing to it changes neither the file,
    nor ``dense``, nor the next ``dequantize``, and a file changed since opening is refused."""
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        w.add_dense("a", a)
        w.add_dense("scalar", np.float32(2.5))
    ckpt = mf.open(tmp_path / "ck")
    got = ckpt.dequantize("a")
    assert got.dtype == np.float32 and got.flags.writeable and np.array_equal(got, a)
    got[:] = -1.0
    assert np.array_equal(ckpt.dequantize("a"), a) and np.array_equal(ckpt.dense("a"), a)
    assert ckpt.dequantize("scalar").shape == () and float(ckpt.dequantize("scalar")) == 2.5
    ckpt.verify()
    fresh = mf.open(tmp_path / "ck")
    base = tmp_path / "ck" / C.BASE_FILENAME
    data = bytearray(base.read_bytes())
    os.replace(base, tmp_path / "old")
    base.write_bytes(bytes(data) + b" ")  # another file under the same name
    with pytest.raises(mf.errors.MatqError):
        fresh.dequantize("a")
