"""Bad input gets its own typed error, naming the file; corrupt bytes never escape as anything else.

Files are damaged with the small safetensors helpers below (written here, independent of the
library's own parser): cutting, flipping, and rewriting the header or the manifest with a correct
manifest CRC, so the checks behind the CRC are reached too.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import matq_format as mf
from matq_format import constants as C
from matq_format.errors import (
    BadMagicError,
    BadParameterError,
    ChecksumError,
    FormatError,
    HeaderError,
    HeaderTooLargeError,
    LimitError,
    MatqError,
    MissingFileError,
    MissingPlanesError,
    OffsetError,
    TruncatedFileError,
    UnknownTensorError,
    UnsupportedVersionError,
    WidthError,
    WriterError,
)

SCALE = settings.default.max_examples / 100
"""Example counts below are for the default profile; a longer profile scales them."""

Q = "model.layers.0.mlp.up_proj.weight"  # [8, 70], groups of 32 (the last one short)
Q1 = "model.layers.1.mlp.up_proj.weight"  # [3, 64]
NORM = "model.norm.weight"
EMB = "model.embed_tokens.weight"  # BF16


# --- safetensors surgery -------------------------------------------------------------------------
def parse(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def unparse(path: Path, header: dict, data: bytes, *, size: int | None = None) -> None:
    """Write a safetensors file; ``size`` pads the header with spaces to give that total size."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    if size is not None:
        pad = size - 8 - len(blob) - len(data)
        assert pad >= 0, "header too long to keep the file size"
        blob += b" " * pad
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def crc(data: bytes | str) -> str:
    return f"{zlib.crc32(data.encode() if isinstance(data, str) else data) & 0xFFFFFFFF:08x}"


def base_of(ckpt: Path) -> Path:
    return ckpt / C.BASE_FILENAME if ckpt.is_dir() else ckpt


def rewrite_manifest(
    ckpt: Path, edit: Callable[[dict], object] | None = None, *, text: str | None = None
) -> None:
    """Edit the manifest (a function of the parsed dict, or raw text) and store it with a correct CRC."""
    base = base_of(ckpt)
    header, data = parse(base)
    if text is None:
        m = json.loads(header["__metadata__"][C.METADATA_KEY_MANIFEST])
        out = edit(m)
        text = json.dumps(m if out is None else out)
    header["__metadata__"][C.METADATA_KEY_MANIFEST] = text
    header["__metadata__"][C.METADATA_KEY_MANIFEST_CRC] = crc(text)
    unparse(base, header, data)


def manifest(ckpt: Path) -> dict:
    return json.loads(parse(base_of(ckpt))[0]["__metadata__"][C.METADATA_KEY_MANIFEST])


def locate(ckpt: Path, ename: str) -> tuple[Path, int, int]:
    """(file, absolute offset, length) of one entry."""
    fname = manifest(ckpt)["entries"][ename]["file"]
    path = base_of(ckpt) if fname == C.BASE_FILENAME else ckpt / fname
    header, _ = parse(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    start, end = header[ename]["data_offsets"]
    return path, 8 + n + start, end - start


def poke(path: Path, offset: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))


def flip(path: Path, offset: int, bit: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def set_entry(ckpt: Path, ename: str, value: np.ndarray) -> Path:
    """Overwrite an entry's bytes and update its CRC in the manifest, so only the values are wrong."""
    path, off, n = locate(ckpt, ename)
    raw = np.ascontiguousarray(value).tobytes()
    assert len(raw) == n
    poke(path, off, raw)

    def edit(m):
        m["entries"][ename]["crc32"] = crc(raw)

    rewrite_manifest(ckpt, edit)
    return path


def expect(cls: type[MatqError], file: Path | str, fn: Callable, *args, **kw) -> MatqError:
    """``fn`` raises exactly ``cls`` and the error names ``file``."""
    with pytest.raises(MatqError) as ei:
        fn(*args, **kw)
    err = ei.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    assert err.path == str(file) and str(file) in str(err), f"{err} does not name {file}"
    return err


def read_everything(path: Path) -> None:
    """Everything a user might do with a checkpoint: open, verify, every tensor at every width."""
    ckpt = mf.open(path)
    ckpt.verify()
    ckpt.files(), ckpt.carried_files(), ckpt.config, ckpt.source, ckpt.digest
    for name in ckpt.tensor_names():
        t = ckpt.info(name)
        if not t.quantized:
            ckpt.dequantize(name)
            continue
        for r in range(1, ckpt.code_bits + 1):
            ckpt.dequantize(name, r)
            if r < ckpt.code_bits:
                ckpt.dequantize(name, r, extra_precision=True)


@contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""

    def fire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(make_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """One folder and one single-file checkpoint to copy from (c = 8, extra precision at 2)."""
    return {
        "folder": make_checkpoint(carry={"config.json": '{"model_type": "llama"}'}).path,
        "single": make_checkpoint(single_file=True).path,
    }


def clone(src: Path, dst_dir: Path) -> Path:
    dst = dst_dir / src.name
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
    return dst


@pytest.fixture()
def ck(pristine, tmp_path) -> Path:
    """A fresh folder checkpoint to damage."""
    return clone(pristine["folder"], tmp_path)


@pytest.fixture()
def one(pristine, tmp_path) -> Path:
    """A fresh single-file checkpoint to damage."""
    return clone(pristine["single"], tmp_path)


def test_pristine_checkpoints_are_valid(pristine):
    for p in pristine.values():
        read_everything(p)


# --- truncation ---------------------------------------------------------------------------------
def test_cuts_of_a_single_file_are_truncated(one):
    """Proper prefixes of a valid file (inside the length, the header, or the data) are truncated.

    Every cut in the first bytes and around each boundary (header end, every entry's start and
    end), and a stride through the rest.
    """
    raw = one.read_bytes()
    header, _ = parse(one)
    (n,) = struct.unpack("<Q", raw[:8])
    edges = [8 + n + o for k, e in header.items() if k != "__metadata__" for o in e["data_offsets"]]
    cuts = set(range(24)) | set(range(0, len(raw), 97)) | {len(raw) - 1}
    cuts |= {e + d for e in [8 + n, *edges] for d in (-1, 0, 1)}
    for cut in sorted(c for c in cuts if 0 <= c < len(raw)):
        one.write_bytes(raw[:cut])
        expect(TruncatedFileError, one, mf.open, one)


@pytest.mark.parametrize("where", ["empty", "length", "header", "header_end", "data", "last_byte"])
@pytest.mark.parametrize("which", ["base", "plane7", "plane0"])
def test_truncated_file_in_folder(ck, where, which):
    path = ck / (C.BASE_FILENAME if which == "base" else C.PLANE_FILENAME.format(k=int(which[-1])))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cut = {
        "empty": 0,
        "length": 5,
        "header": 8 + n // 2,
        "header_end": 8 + n - 1,
        "data": 8 + n + (len(raw) - 8 - n) // 2,
        "last_byte": len(raw) - 1,
    }[where]
    path.write_bytes(raw[:cut])
    expect(TruncatedFileError, path, mf.open, ck)


def test_plane_file_of_the_wrong_size(ck):
    plane = ck / C.PLANE_FILENAME.format(k=3)
    raw = plane.read_bytes()
    plane.write_bytes(raw + b"\0" * 8)
    expect(FormatError, plane, mf.open, ck)  # spec/v1 section 11: a listed file longer than `bytes`
    plane.write_bytes(raw[:-8])
    expect(TruncatedFileError, plane, mf.open, ck)


# --- not a matq file ----------------------------------------------------------------------------
FOREIGN = {
    "gguf": b"GGUF\x03\x00\x00\x00" + struct.pack("<QQ", 1, 2) + b"\x00" * 64,
    "zip": b"PK\x03\x04" + b"\x14\x00" * 40,
    "text": b"Hello, this is a README and not a checkpoint.\n" * 4,
    "html": b"<!DOCTYPE html><html><body>404</body></html>",
    "json": b'{"model_type": "llama", "hidden_size": 8}',
    "zero_length": struct.pack("<Q", 0),
    "length_one": struct.pack("<Q", 1) + b"{",
    "array_header": struct.pack("<Q", 8) + b"[1, 2]  ",
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_not_safetensors(tmp_path, kind):
    p = tmp_path / "model.safetensors"
    p.write_bytes(FOREIGN[kind])
    expect(BadMagicError, p, mf.open, p)


def test_safetensors_but_not_matq(tmp_path, ck):
    from safetensors.numpy import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, str(p), metadata={"format": "pt"})
    expect(BadMagicError, p, mf.open, p)
    # A matq plane file is not a checkpoint either.
    plane = ck / C.PLANE_FILENAME.format(k=7)
    expect(BadMagicError, plane, mf.open, plane)
    # "format": "matq" without a manifest.
    header, data = parse(plane)
    header["__metadata__"] = {"format": "matq"}
    unparse(p, header, data)
    expect(BadMagicError, p, mf.open, p)


def test_plane_file_replaced_by_foreign_safetensors(ck):
    """Same size as the manifest says, but not a matq plane file."""
    plane = ck / C.PLANE_FILENAME.format(k=5)
    header, data = parse(plane)
    size = plane.stat().st_size
    header["__metadata__"] = {"format": "pt"}
    unparse(plane, header, data, size=size)
    expect(BadMagicError, plane, mf.open, ck)


# --- header limits and offsets ------------------------------------------------------------------
@pytest.mark.parametrize("hlen", [C.MAX_HEADER_BYTES + 1, 2**40, 2**64 - 1])
def test_oversized_header(tmp_path, hlen):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", hlen) + b'{"__metadata__": {}}')
    expect(HeaderTooLargeError, p, mf.open, p)


def _entries_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def test_overlapping_offsets(one):
    header, data = parse(one)
    a, b = _entries_by_offset(header)[:2]
    start, end = header[b]["data_offsets"]
    header[b]["data_offsets"] = [start - 1, end - 1]
    unparse(one, header, data)
    expect(OffsetError, one, mf.open, one)


def test_offsets_past_the_end(one):
    header, data = parse(one)
    last = _entries_by_offset(header)[-1]
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start + 4096, end + 4096]
    unparse(one, header, data)
    expect(OffsetError, one, mf.open, one)


def test_hole_between_entries(one):
    header, data = parse(one)
    names = _entries_by_offset(header)
    cut = header[names[2]]["data_offsets"][0]
    for name in names[2:]:
        header[name]["data_offsets"] = [o + 8 for o in header[name]["data_offsets"]]
    unparse(one, header, data[:cut] + b"\0" * 8 + data[cut:])
    expect(OffsetError, one, mf.open, one)


def test_bytes_after_the_last_entry(one):
    with open(one, "ab") as f:
        f.write(b"\0" * 16)
    expect(OffsetError, one, mf.open, one)


def test_entry_span_does_not_match_its_shape(one):
    header, data = parse(one)
    name = _entries_by_offset(header)[-1]
    header[name]["shape"] = [d + 1 for d in header[name]["shape"]] or [2]
    unparse(one, header, data)
    expect(OffsetError, one, mf.open, one)


@pytest.mark.parametrize(
    "entry,cls",
    [
        ({"dtype": "F32", "shape": [1] * (C.MAX_DIMS + 1), "data_offsets": [0, 4]}, LimitError),
        ({"dtype": "U8", "shape": [C.MAX_DIM_SIZE + 1, 0], "data_offsets": [0, 0]}, LimitError),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}, HeaderError),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, HeaderError),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}, HeaderError),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, OffsetError),
        ({"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}, HeaderError),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}, HeaderError),
        ([1, 2, 3], HeaderError),
    ],
)
def test_malformed_header_entries(tmp_path, entry, cls):
    p = tmp_path / "bad.safetensors"
    unparse(p, {"__metadata__": {"format": "matq"}, "w": entry}, b"\0" * 4)
    expect(cls, p, mf.open, p)


@pytest.mark.parametrize(
    "blob",
    [
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}',  # unterminated
        b'{"__metadata__": {"format": 1}}',
        b'{"__metadata__": [1]}',
        b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
        b'{"__metadata__": {"format": "matq\xff"}}',  # not UTF-8
        b'{"__metadata__": {"format": "\\ud800"}}',  # a lone surrogate
        b'{"w": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}',
        b'{"a": ' + b"[" * 50000 + b"]" * 50000 + b"}",  # nesting deeper than the parser's stack
    ],
    ids=["unterminated", "meta_int", "meta_list", "nan", "not_utf8", "surrogate", "huge_int", "deep"],
)
def test_header_json_is_validated(tmp_path, blob):
    p = tmp_path / "bad.safetensors"
    blob += b" " * (-len(blob) % 8)
    p.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    expect(HeaderError, p, mf.open, p)


# --- versions and extensions --------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2.0", "0.9", "99.1"])
def test_unknown_major_version(ck, version):
    rewrite_manifest(ck, lambda m: m.update(version=version))
    expect(UnsupportedVersionError, base_of(ck), mf.open, ck)


@pytest.mark.parametrize(
    "version", ["1", "1.0.0", "v1.0", "1.x", "\u00b9.0", "\u0661.0", 1.0, None, "1" * 5000 + ".0"]
)
def test_malformed_version(ck, version):
    rewrite_manifest(ck, lambda m: m.update(version=version))
    expect(HeaderError, base_of(ck), mf.open, ck)


def test_must_understand_unknown_extension(tmp_path, ck):
    out = tmp_path / "ext"
    with mf.CheckpointWriter(out, must_understand=["org.example.hessian"]) as w:
        w.add_dense("a", np.ones(2, np.float32))
    err = expect(UnsupportedVersionError, out / C.BASE_FILENAME, mf.open, out)
    assert "org.example.hessian" in str(err)
    # Known-but-optional extensions are fine; must_understand applies to the file the manifest is in.
    rewrite_manifest(ck, lambda m: m.update(extensions={"org.example.note": {"x": 1}}))
    mf.open(ck).verify()
    rewrite_manifest(ck, lambda m: m.update(must_understand=["org.example.note"]))
    expect(UnsupportedVersionError, base_of(ck), mf.open, ck)


@pytest.mark.parametrize(
    "c,cls",
    [(9, UnsupportedVersionError), (16, UnsupportedVersionError), (1, HeaderError), (17, HeaderError)],
)
def test_code_bits_outside_what_this_reader_reads(one, c, cls):
    rewrite_manifest(one, lambda m: m.update(code_bits=c))
    expect(cls, one, mf.open, one)


# --- the manifest behind its CRC -----------------------------------------------------------------
def _tensor(m: dict, name: str = Q) -> dict:
    return m["tensors"][name]


MANIFEST_EDITS: dict[str, Callable[[dict], object]] = {
    "not_an_object": lambda m: [m],
    "format": lambda m: m.update(format="gguf"),
    "no_code_bits": lambda m: m.pop("code_bits"),
    "code_bits_str": lambda m: m.update(code_bits="8"),
    "code_bits_bool": lambda m: m.update(code_bits=True),
    "no_tensors": lambda m: m.pop("tensors"),
    "tensors_list": lambda m: m.update(tensors=list(m["tensors"])),
    "no_entries": lambda m: m.pop("entries"),
    "files_list": lambda m: m.update(files=[]),
    "file_bytes_negative": lambda m: next(iter(m["files"].values())).update(bytes=-1),
    "file_bytes_float": lambda m: next(iter(m["files"].values())).update(bytes=1.5),
    "file_planes_out_of_range": lambda m: next(iter(m["files"].values())).update(planes=[8]),
    "file_name_parent": lambda m: m["files"].update({"../evil.safetensors": {"bytes": 1}}),
    "file_name_subdir": lambda m: m["files"].update({"a/b.safetensors": {"bytes": 1}}),
    "file_name_hidden": lambda m: m["files"].update({".x": {"bytes": 1}}),
    "file_name_base": lambda m: m["files"].update({C.BASE_FILENAME: {"bytes": 1}}),
    "entry_not_object": lambda m: m["entries"].update({f"{Q}@scale": "x"}),
    "entry_crc_short": lambda m: m["entries"][f"{Q}@scale"].update(crc32="abc"),
    "entry_crc_upper": lambda m: m["entries"][f"{Q}@scale"].update(crc32="ABCDEF12"),
    "entry_unlisted_file": lambda m: m["entries"][f"{Q}@scale"].update(file="other.safetensors"),
    "entry_wrong_file": lambda m: m["entries"][f"{Q}@plane7"].update(file=C.PLANE_FILENAME.format(k=6)),
    "entry_extra": lambda m: m["entries"].update(
        {f"{Q}@plane9": {"file": C.BASE_FILENAME, "crc32": "00000000"}}
    ),
    "entry_missing": lambda m: m["entries"].pop(f"{Q}@zero"),
    "tensor_not_object": lambda m: m["tensors"].update({Q: [1]}),
    "tensor_name_at": lambda m: m["tensors"].update({"a@b": {"kind": "dense", "dtype": "F32", "shape": [0]}}),
    "tensor_name_empty": lambda m: m["tensors"].update({"": {"kind": "dense", "dtype": "F32", "shape": [0]}}),
    "kind": lambda m: _tensor(m).update(kind="sparse"),
    "dtype": lambda m: _tensor(m).update(dtype="F128"),
    "dtype_not_quantizable": lambda m: _tensor(m).update(dtype="I32"),
    "shape_negative": lambda m: _tensor(m).update(shape=[-8, 70]),
    "shape_3d": lambda m: _tensor(m).update(shape=[8, 70, 1]),
    "shape_wrong": lambda m: _tensor(m).update(shape=[9, 70]),
    "shape_huge": lambda m: _tensor(m).update(shape=[2**40, 2**40]),
    "shape_too_huge": lambda m: _tensor(m).update(shape=[2**64, 1]),
    "dense_shape_wrong": lambda m: _tensor(m, NORM).update(shape=[7]),
    "dense_dtype_wrong": lambda m: _tensor(m, NORM).update(dtype="I32"),
    "granularity": lambda m: _tensor(m).update(granularity="tensor"),
    "group_size_zero": lambda m: _tensor(m).update(group_size=0),
    "group_size_negative": lambda m: _tensor(m).update(group_size=-32),
    "group_size_float": lambda m: _tensor(m).update(group_size=32.0),
    "group_size_huge": lambda m: _tensor(m).update(group_size=2**62),
    "group_size_other": lambda m: _tensor(m).update(group_size=16),
    "channel_with_group_size": lambda m: _tensor(m, Q1).update(group_size=64),
    "group_without_size": lambda m: _tensor(m).pop("group_size"),
    "scheme": lambda m: _tensor(m).update(scheme="nf4"),
    "scale_dtype": lambda m: _tensor(m).update(scale_dtype="F64"),
    "scale_dtype_other": lambda m: _tensor(m).update(scale_dtype="F32"),
    "zero_dtype": lambda m: _tensor(m).update(zero_dtype="I8"),
    "extra_precision_at_c": lambda m: _tensor(m).update(extra_precision=[8]),
    "extra_precision_zero": lambda m: _tensor(m).update(extra_precision=[0]),
    "extra_precision_twice": lambda m: _tensor(m).update(extra_precision=[2, 2]),
    "extra_precision_not_list": lambda m: _tensor(m).update(extra_precision=2),
    "planes_out_of_range": lambda m: _tensor(m).update(planes=[8, 7]),
    "planes_twice": lambda m: _tensor(m).update(planes=[7, 7, 6, 5, 4, 3, 2, 1]),
    "planes_fewer": lambda m: _tensor(m).update(planes=[7, 6, 5]),
    "planes_bool": lambda m: _tensor(m).update(planes=[True, 0]),
    "carried_list": lambda m: m.update(carried=["config.json"]),
    "carried_parent": lambda m: m["carried"].update({"../../etc/passwd": m["carried"]["config.json"]}),
    "carried_absolute": lambda m: m["carried"].update({"/etc/passwd": m["carried"]["config.json"]}),
    "carried_hidden": lambda m: m["carried"].update({"sub/.git": m["carried"]["config.json"]}),
    "carried_backslash": lambda m: m["carried"].update({"a\\b": m["carried"]["config.json"]}),
    "carried_is_a_plane_file": lambda m: m["carried"].update(
        {C.PLANE_FILENAME.format(k=0): m["carried"]["config.json"]}
    ),
    "carried_sha_short": lambda m: m["carried"]["config.json"].update(sha256="abc"),
    "carried_info_str": lambda m: m["carried"].update({"config.json": "x"}),
    "source_list": lambda m: m.update(source=[1]),
    "extensions_str": lambda m: m.update(extensions="x"),
    "must_understand_str": lambda m: m.update(must_understand="org.example.x"),
    # one zero point for the tensor (spec 10.6) where it cannot be: beside its entry, unmarked, not a code
    "zero_point_beside_its_entry": lambda m: _constant_zero(m, 128, drop_entry=False),
    "zero_point_without_must_understand": lambda m: _constant_zero(m, 128, marker=False),
    "zero_point_above_code_range": lambda m: _constant_zero(m, 256),
    "zero_point_negative": lambda m: _constant_zero(m, -1),
    "zero_point_float": lambda m: _constant_zero(m, 128.0),
    "zero_point_bool": lambda m: _constant_zero(m, True),
    "zero_point_str": lambda m: _constant_zero(m, "128"),
}


def _constant_zero(m: dict, z, *, marker: bool = True, drop_entry: bool = True) -> None:
    """Give Q one zero point in its record (10.6), with or without the marker and its entry."""
    _tensor(m)[C.ZERO_POINT_KEY] = z
    if marker:
        m["must_understand"] = [*m.get("must_understand", []), C.EXT_CONSTANT_ZERO]
    if drop_entry:
        m["entries"].pop(f"{Q}@zero")


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_manifest_is_validated_behind_its_crc(ck, edit):
    rewrite_manifest(ck, MANIFEST_EDITS[edit])
    # The error names the file where the inconsistency shows: the base, or the plane file whose
    # entry does not match what the manifest says of it.
    in_plane7 = edit in ("entry_wrong_file", "shape_huge", "shape_wrong")
    named = ck / C.PLANE_FILENAME.format(k=7) if in_plane7 else base_of(ck)
    expect(HeaderError, named, mf.open, ck)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"format": "matq", "version": "1.0", "code_bits": NaN}',
        '{"format": "matq", "version": "1.0", "code_bits": 1' + "0" * 5000 + "}",
        "[" * 100000 + "]" * 100000,
        "null",
    ],
    ids=["not_json", "nan", "huge_int", "deep", "null"],
)
def test_manifest_text_is_validated(ck, text):
    rewrite_manifest(ck, text=text)
    expect(HeaderError, base_of(ck), mf.open, ck)


def test_flipped_byte_in_the_manifest(one):
    """A manifest byte changed (still valid header JSON) is caught by the manifest CRC."""
    raw = one.read_bytes()
    at = raw.index(b'\\"code_bits\\":8') + len(b'\\"code_bits\\":')
    poke(one, at, b"4")
    expect(ChecksumError, one, mf.open, one)
    poke(one, at, b"8")
    header, data = parse(one)
    header["__metadata__"][C.METADATA_KEY_MANIFEST_CRC] = "00000000"
    unparse(one, header, data)
    expect(ChecksumError, one, mf.open, one)


# --- checksums of the data ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "ename,first",
    [
        (f"{Q}@plane7", True),
        (f"{Q}@plane0", True),
        (f"{Q}@plane0", False),  # the zero padding of the last word is covered too
        (f"{Q}@scale", True),
        (f"{Q}@zero", False),
        (EMB, True),
        (NORM, False),
    ],
)
@pytest.mark.parametrize("form", ["folder", "single"])
def test_flipped_data_byte(pristine, tmp_path, ename, first, form):
    ck = clone(pristine[form], tmp_path)
    path, off, n = locate(ck, ename)
    flip(path, off if first else off + n - 1, bit=3)
    ckpt = mf.open(ck)  # open reads headers only; the CRC is checked on first read ...
    if ename in (EMB, NORM):
        expect(ChecksumError, path, ckpt.dequantize, ename)
    elif ename.endswith(("@plane0", "@plane7")):
        expect(ChecksumError, path, ckpt.dequantize, Q, 8)
    else:
        expect(ChecksumError, path, ckpt.dequantize, Q, 4)
    expect(ChecksumError, path, mf.open(ck).verify)  # ... and by verify()


def test_narrow_width_does_not_read_a_damaged_low_plane(ck):
    """Width 2 reads planes 7..5 only, so damage in plane 0 does not stop it (verify still fails)."""
    path, off, _ = locate(ck, f"{Q}@plane0")
    flip(path, off)
    ckpt = mf.open(ck)
    ckpt.dequantize(Q, 2)
    expect(ChecksumError, path, ckpt.dequantize, Q, 8)
    expect(ChecksumError, path, ckpt.verify)


def test_wrong_crc_in_manifest(ck):
    rewrite_manifest(ck, lambda m: m["entries"][f"{Q}@plane6"].update(crc32="00000000"))
    expect(ChecksumError, ck / C.PLANE_FILENAME.format(k=6), mf.open(ck).verify)


# --- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0])
def test_bad_scale(ck, value):
    _, _, n = locate(ck, f"{Q}@scale")
    s = np.full(n // 2, 0.01, np.float16)
    s[n // 4] = value
    path = set_entry(ck, f"{Q}@scale", s)
    ckpt = mf.open(ck)
    expect(BadParameterError, path, ckpt.dequantize, Q, 4)
    expect(BadParameterError, path, ckpt.scale, Q)
    expect(BadParameterError, path, mf.open(ck).verify)
    ckpt.dequantize(Q1, 4)  # other tensors are unaffected


@pytest.mark.parametrize(
    "zero_dtype,value,code_bits",
    [
        ("F32", -1.0, 8),
        ("F32", np.nan, 8),
        ("F32", np.inf, 8),
        ("F32", 255.5, 8),
        ("F16", -0.5, 8),
        ("BF16", 512.0, 8),
        ("U8", 16, 4),
        ("U16", 256, 8),
    ],
)
def test_bad_zero_point(make_checkpoint, zero_dtype, value, code_bits):
    ck = make_checkpoint(zero_dtype=zero_dtype, code_bits=code_bits, dense=False).path
    _, _, n = locate(ck, f"{Q}@zero")
    np_dtype = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "U16": np.uint16}.get(zero_dtype)
    if zero_dtype == "BF16":
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    z = np.zeros(n // np.dtype(np_dtype).itemsize, np_dtype)
    z[-1] = value
    path = set_entry(ck, f"{Q}@zero", z)
    ckpt = mf.open(ck)
    expect(BadParameterError, path, ckpt.dequantize, Q, 2)
    expect(BadParameterError, path, ckpt.zero, Q)
    expect(BadParameterError, path, mf.open(ck).verify)


# --- files and requests -------------------------------------------------------------------------
def test_missing_plane_file(ck):
    plane = ck / C.PLANE_FILENAME.format(k=2)
    plane.unlink()
    expect(MissingFileError, plane, mf.open, ck)
    plane.mkdir()
    expect(MissingFileError, plane, mf.open, ck)


def test_missing_base_file(tmp_path, ck):
    (ck / C.BASE_FILENAME).unlink()
    expect(MissingFileError, ck, mf.open, ck)
    expect(MissingFileError, tmp_path / "nowhere", mf.open, tmp_path / "nowhere")


def test_plane_file_deleted_after_open(ck):
    ckpt = mf.open(ck)
    plane = ck / C.PLANE_FILENAME.format(k=1)
    plane.unlink()
    expect(MissingFileError, plane, ckpt.dequantize, Q, 8)
    ckpt.dequantize(Q, 4)


def test_carried_files(ck):
    cfg = ck / "config.json"
    cfg.write_text('{"model_type": "mistral"}')
    expect(ChecksumError, cfg, mf.open(ck).verify)
    cfg.write_text("{not json")
    expect(ChecksumError, cfg, lambda: mf.open(ck).config)  # checked before it is parsed
    cfg.unlink()
    expect(MissingFileError, cfg, mf.open(ck).verify)


def test_unknown_tensor(ck):
    ckpt = mf.open(ck)
    base = base_of(ck)
    for fn in (ckpt.info, ckpt.dequantize, ckpt.sliced_codes, ckpt.codes, ckpt.dense, ckpt.scale, ckpt.zero):
        err = expect(UnknownTensorError, base, fn, "model.layers.9.mlp.up_proj.weight")
        assert "model.layers.9.mlp.up_proj.weight" in str(err)
    expect(UnknownTensorError, base, ckpt.dense, Q)  # quantized, so no dense view
    expect(UnknownTensorError, base, ckpt.scale, NORM)  # dense, so no scale


@pytest.mark.parametrize(
    "bits,ep", [(0, False), (9, False), (-1, False), (8, True), (4.0, False), ("4", False)]
)
def test_width_outside_the_codes(ck, bits, ep):
    expect(WidthError, base_of(ck), mf.open(ck).dequantize, Q, bits, ep)


def test_sliced_checkpoint_lacks_wide_planes(make_checkpoint):
    """A checkpoint written with the planes of width 4 serves 4 and below, and says why not above."""
    ck = make_checkpoint(keep_bits=4).path
    ckpt = mf.open(ck)
    assert sorted(f for f in ckpt.manifest["files"]) == [
        C.PLANE_FILENAME.format(k=k) for k in (3, 4, 5, 6, 7)
    ]
    for r in (1, 2, 3, 4):
        ckpt.dequantize(Q, r, extra_precision=True)
    for r in (5, 6, 7, 8):
        err = expect(MissingPlanesError, base_of(ck), ckpt.dequantize, Q, r)
        assert Q in str(err)
    expect(MissingPlanesError, base_of(ck), ckpt.plane, Q, 0)
    expect(MissingPlanesError, base_of(ck), ckpt.codes, Q)
    ckpt.verify()


# --- the writer refuses what the reader would refuse ---------------------------------------------
def _q(w, name="q", codes=None, scale=None, zero=None, **kw):
    codes = np.zeros((2, 8), np.uint8) if codes is None else codes
    scale = np.ones((2, 1), np.float32) if scale is None else scale
    zero = np.zeros((2, 1), np.float32) if zero is None else zero
    w.add_quantized(name, codes, scale, zero, **kw)


BAD_WRITES: dict[str, Callable] = {
    "duplicate": lambda w: w.add_dense("ok", np.ones(2, np.float32)),
    "duplicate_quantized": lambda w: _q(w, "ok"),
    "name_at": lambda w: w.add_dense("a@scale", np.ones(2)),
    "name_empty": lambda w: w.add_dense("", np.ones(2)),
    "name_metadata": lambda w: w.add_dense("__metadata__", np.ones(2)),
    "name_not_str": lambda w: w.add_dense(7, np.ones(2)),
    "name_surrogate": lambda w: w.add_dense("a\udc80", np.ones(2)),
    "dense_complex": lambda w: w.add_dense("x", np.ones(2, np.complex64)),
    "dense_object": lambda w: w.add_dense("x", np.array([object()])),
    "dense_str": lambda w: w.add_dense("x", np.array(["a"])),
    "dense_dtype_unknown": lambda w: w.add_dense("x", np.ones(2, np.float32), dtype="F128"),
    "dense_itemsize": lambda w: w.add_dense("x", np.ones(2, np.float32), dtype="BF16"),
    "dense_too_many_dims": lambda w: w.add_dense("x", np.ones((1,) * (C.MAX_DIMS + 1), np.float32)),
    "codes_3d": lambda w: _q(w, codes=np.zeros((2, 2, 2), np.uint8)),
    "codes_1d": lambda w: _q(w, codes=np.zeros(8, np.uint8)),
    "codes_float": lambda w: _q(w, codes=np.zeros((2, 8), np.float32)),
    "codes_int16": lambda w: _q(w, codes=np.zeros((2, 8), np.int16)),
    "codes_out_of_range": lambda w: _q(w, codes=np.full((2, 8), 16, np.uint8)),
    "scale_shape": lambda w: _q(w, scale=np.ones((3, 1))),
    "zero_shape": lambda w: _q(w, zero=np.zeros((2, 2))),
    "scale_group_shape": lambda w: _q(w, scale=np.ones((2, 1)), zero=np.zeros((2, 1)), group_size=3),
    "scale_nan": lambda w: _q(w, scale=np.array([[1.0], [np.nan]])),
    "scale_inf": lambda w: _q(w, scale=np.array([[1.0], [np.inf]])),
    "scale_zero": lambda w: _q(w, scale=np.array([[1.0], [0.0]])),
    "scale_negative": lambda w: _q(w, scale=np.array([[1.0], [-1.0]])),
    "scale_not_f16": lambda w: _q(w, scale=np.array([[1.0], [0.1]]), scale_dtype="F16"),
    "scale_f16_overflow": lambda w: _q(w, scale=np.array([[1.0], [1e6]]), scale_dtype="F16"),
    "zero_nan": lambda w: _q(w, zero=np.array([[0.0], [np.nan]]), zero_dtype="F32"),
    "zero_negative_f32": lambda w: _q(w, zero=np.array([[0.0], [-1.0]]), zero_dtype="F32"),
    "zero_above_f16": lambda w: _q(w, zero=np.array([[0.0], [16.0]]), zero_dtype="F16"),
    "zero_above_u8": lambda w: _q(w, zero=np.array([[0.0], [16.0]])),
    "zero_fraction_u8": lambda w: _q(w, zero=np.array([[0.0], [1.5]])),
    "zero_point_above": lambda w: _q(w, zero=16),
    "zero_point_negative": lambda w: _q(w, zero=-1),
    "zero_point_bool": lambda w: _q(w, zero=True),
    "dtype": lambda w: _q(w, dtype="I8"),
    "scale_dtype": lambda w: _q(w, scale_dtype="F64"),
    "zero_dtype": lambda w: _q(w, zero_dtype="I8"),
    "scheme": lambda w: _q(w, scheme="nf4"),
    "group_size_zero": lambda w: _q(w, group_size=0),
    "group_size_negative": lambda w: _q(w, group_size=-4),
    "group_size_float": lambda w: _q(w, group_size=4.0),
    "group_size_bool": lambda w: _q(w, group_size=True),
    "extra_precision_c": lambda w: _q(w, extra_precision=(4,)),
    "extra_precision_zero": lambda w: _q(w, extra_precision=(0,)),
    "extra_precision_twice": lambda w: _q(w, extra_precision=(2, 2)),
    "extra_precision_str": lambda w: _q(w, extra_precision=("2",)),
    "keep_bits_high": lambda w: _q(w, keep_bits=5),
    "keep_bits_zero": lambda w: _q(w, keep_bits=0),
    "planes_wrong_size": lambda w: w.add_quantized_planes(
        "p", {3: np.zeros(8, np.uint8), 2: np.zeros(9, np.uint8)}, [[1.0]], [[0.0]], **_PLANES_KW
    ),
    "planes_wrong_index": lambda w: w.add_quantized_planes(
        "p", {3: np.zeros(8, np.uint8), 4: np.zeros(8, np.uint8)}, [[1.0]], [[0.0]], **_PLANES_KW
    ),
    "planes_shape_3d": lambda w: w.add_quantized_planes(
        "p", {3: np.zeros(8, np.uint8)}, [[1.0]], [[0.0]], **{**_PLANES_KW, "shape": (1, 2, 2)}
    ),
}
_PLANES_KW = dict(
    shape=(1, 4),
    dtype="F32",
    group_size=None,
    scheme="asymmetric",
    scale_dtype="F32",
    zero_dtype="F32",
)


def test_writer_refuses_bad_input_and_stays_usable(tmp_path):
    """Each bad call raises WriterError naming the output; the checkpoint then holds only good tensors."""
    out = tmp_path / "ck"
    with mf.CheckpointWriter(out, 4) as w:
        w.add_dense("ok", np.ones(2, np.float32))
        for label, bad in BAD_WRITES.items():
            with pytest.raises(WriterError) as ei:
                bad(w)
            assert type(ei.value) is WriterError and str(out) in str(ei.value), label
        _q(w, "good", codes=np.full((2, 8), 15, np.uint8), extra_precision=(2,))
    ckpt = mf.open(out)
    assert ckpt.tensor_names() == ["ok", "good"]
    ckpt.verify()
    read_everything(out)


@pytest.mark.parametrize("c", [0, 1, 9, 16])
def test_writer_code_bits(tmp_path, c):
    with pytest.raises(WriterError):
        mf.CheckpointWriter(tmp_path / "ck", c)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kw",
    [
        dict(source={"lr": float("nan")}),  # json.dumps would write NaN, which readers refuse
        dict(source={"when": object()}),
        dict(source={"k\udc80": 1}),
        dict(extensions={"Not An Extension": {}}),
        dict(must_understand=["hessian"]),
        dict(carry_from={"../escape.txt": "config.json"}),
        dict(carry_from={"ABSOLUTE": "config.json"}),
        dict(carry_from={"sub/../../escape.txt": "config.json"}),
        dict(carry_from={".hidden": "config.json"}),
        dict(carry_from={C.BASE_FILENAME: "config.json"}),
        dict(carry_from={C.PLANE_FILENAME.format(k=0): "config.json"}),
    ],
    ids=lambda kw: next(iter(kw)) + ":" + str(next(iter(kw.values())))[:24],
)
def test_writer_refuses_what_the_manifest_may_not_hold(tmp_path, kw):
    """Provenance that is not strict JSON, bad extension names, carried paths leaving the folder."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")
    if "carry_from" in kw:
        (rel, src), *_ = kw["carry_from"].items()
        rel = str(tmp_path / "escape.txt") if rel == "ABSOLUTE" else rel
        kw = dict(carry_from={rel: work / src})
    out = work / "ck"
    with pytest.raises(WriterError) as ei:
        mf.CheckpointWriter(out, **kw)
    assert str(out) in str(ei.value)
    assert sorted(p.name for p in work.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_writer_unwritable_output(tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "a_file" / "ck"
    with pytest.raises(WriterError) as ei:
        mf.CheckpointWriter(out)
    assert str(out) in str(ei.value)


def test_writer_carry_failure_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(WriterError) as ei:
        mf.CheckpointWriter(out, carry_from={"config.json": tmp_path / "missing.json"})
    assert str(out) in str(ei.value)
    assert list(tmp_path.iterdir()) == []


def test_writer_failure_inside_with_leaves_nothing(tmp_path):
    out = tmp_path / "ck"
    with pytest.raises(WriterError):
        with mf.CheckpointWriter(out) as w:
            w.add_dense("a", np.ones(2, np.float32))
            w.add_dense("a", np.ones(2, np.float32))
    assert list(tmp_path.iterdir()) == []


# --- fuzzing --------------------------------------------------------------------------------------
def _check_only_typed_errors(path: Path) -> None:
    try:
        with watchdog(20):
            read_everything(path)
    except MatqError as err:
        event(type(err).__name__)  # `pytest --hypothesis-show-statistics` shows what was reached
        assert err.path, f"{type(err).__name__} names no file: {err}"
        assert err.path in str(err)
    else:
        event("read fine")


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "overwrite", "truncate", "extend"]),
        st.floats(0, 1, exclude_max=True),  # where, relative to the region
        st.booleans(),  # region: the header (True) or the whole file
        st.integers(0, 255),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=3,
)


def _mutate(path: Path, ops) -> None:
    raw = bytearray(path.read_bytes())
    for op, where, in_header, byte, blob in ops:
        if not raw:
            break
        hlen = struct.unpack("<Q", bytes(raw[:8]))[0] if len(raw) >= 8 else 0
        region = min(len(raw), 8 + hlen) if in_header else len(raw)
        pos = int(where * region)
        if op == "flip":
            raw[pos] ^= 1 << (byte % 8)
        elif op == "overwrite":
            raw[pos] = byte
        elif op == "truncate":
            del raw[pos:]
        else:
            raw[pos:pos] = blob
    path.write_bytes(bytes(raw))


@settings(
    max_examples=int(250 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(form=st.sampled_from(["folder", "single"]), which=st.integers(0, 8), ops=MUTATIONS)
def test_fuzz_bytes_only_typed_errors(pristine, tmp_path, form, which, ops):
    ck = clone(pristine[form], tmp_path)
    files = [base_of(ck)] + (sorted(ck.glob("matq-plane-*.safetensors")) if form == "folder" else [])
    _mutate(files[which % len(files)], ops)
    _check_only_typed_errors(ck)


JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2, 7, 8, 9, 16, 17, 64, 2**31, 2**40, 2**40 + 1, 2**63, 2**64])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(
        [
            "matq",
            "1.0",
            "2.0",
            "1.9",
            "F16",
            "BF16",
            "U8",
            "I8",
            "F32",
            "channel",
            "group",
            "quantized",
            "dense",
            "symmetric",
            "asymmetric",
            "matq.safetensors",
            "matq-plane-7.safetensors",
            "../x",
            "config.json",
            "00000000",
            Q,
            NORM,
            f"{Q}@plane7",
        ]
    )  # fmt: skip
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def json_edits(draw, m: dict):
    """1-3 structural edits of a JSON document: replace a value, delete or add a key, wrap, renumber."""
    m = copy.deepcopy(m)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(m) if p]
        path = draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "wrap", "number"]))
        key = path[-1]
        if op == "replace":
            parent[key] = draw(JSON_VALUES)
        elif op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "add" and isinstance(parent[key], dict):
            parent[key][
                draw(st.text(max_size=6) | st.sampled_from(["bytes", "planes", "group_size", "file"]))
            ] = draw(JSON_VALUES)
        elif op == "wrap":
            parent[key] = [parent[key]]
        elif op == "number" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
            parent[key] = draw(st.sampled_from([-1, 0, 1, 2**40, 2**64, -(2**63)])) + parent[key] * draw(
                st.integers(-2, 2)
            )
    return m


@pytest.fixture(scope="module")
def pristine_manifest(pristine) -> dict:
    return manifest(pristine["folder"])


@settings(
    max_examples=int(200 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzz_manifest_structure_only_typed_errors(pristine, pristine_manifest, tmp_path, data):
    ck = clone(pristine["folder"], tmp_path)
    m = data.draw(json_edits(pristine_manifest))
    rewrite_manifest(ck, text=json.dumps(m))
    _check_only_typed_errors(ck)


@settings(
    max_examples=int(150 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(form=st.sampled_from(["folder", "single"]), which=st.integers(0, 8), data=st.data())
def test_fuzz_header_structure_only_typed_errors(pristine, tmp_path, form, which, data):
    """Structural edits of a safetensors header (entries, offsets, dtypes, metadata), as valid JSON."""
    ck = clone(pristine[form], tmp_path)
    files = [base_of(ck)] + (sorted(ck.glob("matq-plane-*.safetensors")) if form == "folder" else [])
    path = files[which % len(files)]
    header, payload = parse(path)
    size = path.stat().st_size
    edited = data.draw(json_edits(header))
    try:  # keep the size the manifest records for plane files, so their headers get parsed
        unparse(path, edited, payload, size=size)
    except AssertionError:
        unparse(path, edited, payload)
    _check_only_typed_errors(ck)


# --- issue 10, item 7g: a file changed while being read is not a corrupt file ------------------------
def _touch_later(path: Path) -> None:
    """A modification time after the one recorded at open (writes within one clock tick may keep it)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_file_rewritten_after_open_is_a_file_changed_error(ck):
    from matq_format.errors import FileChangedError

    path, off, _ = locate(ck, f"{Q}@plane7")
    # Before it is first read: refused when mapped, whatever the bytes.
    ckpt = mf.open(ck)
    flip(path, off)
    _touch_later(path)
    err = expect(FileChangedError, path, ckpt.dequantize, Q, 8)
    assert "changed while being read (modified since it was opened)" in str(err)
    # Mapped already, then rewritten in place: the CRC no longer matches, and the file is not the one opened.
    flip(path, off)
    ckpt = mf.open(ck)
    ckpt.dequantize(Q1, 8)  # maps every plane file
    flip(path, off)
    _touch_later(path)
    err = expect(FileChangedError, path, ckpt.dequantize, Q, 8)
    assert f"entry '{Q}@plane7' no longer matches its CRC-32 (modified since it was opened)" in str(err)
    expect(FileChangedError, path, ckpt.verify)
    # The same damage found by a fresh open is damage.
    expect(ChecksumError, path, mf.open(ck).dequantize, Q, 8)


def test_file_replaced_or_cut_after_open_is_a_file_changed_error(ck, tmp_path):
    from matq_format.errors import FileChangedError

    path, off, _ = locate(ck, f"{Q}@plane3")
    ckpt = mf.open(ck)
    other = tmp_path / "other"
    shutil.copyfile(path, other)
    flip(other, off)
    os.replace(other, path)
    err = expect(FileChangedError, path, ckpt.dequantize, Q, 8)
    assert "replaced by another file" in str(err)
    ckpt = mf.open(ck)
    path.write_bytes(path.read_bytes()[:-8])
    err = expect(FileChangedError, path, ckpt.dequantize, Q, 8)
    assert f"size {path.stat().st_size + 8} -> {path.stat().st_size}" in str(err)
