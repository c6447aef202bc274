"""The safetensors container: header parsing with typed errors, and a streaming writer.

The ``safetensors`` package has no streaming writer (it needs every tensor in memory to write the
header first), so the writer below lays out the same bytes itself: it reserves room for the header,
streams entries after it, and fills the header in at close. Files it writes load in
``safetensors.safe_open`` (tested). Reading parses and validates the header here, so each way a
file can be wrong gets its own error, then maps entries with ``numpy.memmap``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import math
import mmap
import os
import shutil
import struct
import sys
import zlib

try:  # the same CRC-32, computed with carry-less multiplication: about 3x zlib's speed
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - optional dependency (matq[fast])
    _crc32 = zlib.crc32
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import constants as C
from .errors import (
    BadMagicError,
    HeaderError,
    HeaderTooLargeError,
    LimitError,
    OffsetError,
    TruncatedFileError,
    WriterError,
)
from .safefs import open_regular

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


@dataclass(frozen=True, slots=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class FileHeader:
    path: Path
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data_start: int
    file_size: int
    identity: tuple[int, int, int, int] | None = None
    """``file_identity`` of the file just after its header was read: a reader compares it to tell a
    file changed since then (rewritten or replaced) from one whose bytes were always wrong."""


def file_identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: size, modification time, inode, device."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


def crc32_hex(data) -> str:
    """CRC-32 (zlib's polynomial, ISO-HDLC) as 8 lowercase hex digits, as the manifest stores it."""
    return f"{_crc32(data) & 0xFFFFFFFF:08x}"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return d


@contextlib.contextmanager
def gc_paused():
    """The cyclic garbage collector off while a large header becomes Python objects.

    Parsed JSON holds no reference cycles, but every collection would walk all the objects made so
    far: with it on, opening a checkpoint of 550k entries took 1.6 times as long.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def strict_json(text: str | bytes):
    """``json.loads`` without NaN/Infinity and without duplicate keys (spec: both forbidden);
    every failure is a ValueError or RecursionError."""
    with gc_paused():
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800-style escape
        return False
    return True


def read_header(path: str | os.PathLike) -> FileHeader:
    """Parse and validate a safetensors header: sizes, JSON, dtypes, shapes, offsets, limits."""
    path = Path(path)
    with open_regular(path) as f:  # a FIFO or device is refused, never waited on
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(C.HEADER_PREFIX_BYTES)
        if len(prefix) < C.HEADER_PREFIX_BYTES:
            raise TruncatedFileError(path, f"file is {size} bytes, shorter than the 8-byte header length")
        (hlen,) = struct.unpack("<Q", prefix)
        first = f.read(1)
        if first and first != b"{":  # checked first: most foreign files also claim an absurd length
            raise BadMagicError(path, "not a safetensors file (header does not start with '{')")
        f.seek(C.HEADER_PREFIX_BYTES)
        if hlen > C.MAX_HEADER_BYTES:
            raise HeaderTooLargeError(path, f"header length {hlen} exceeds the limit of {C.MAX_HEADER_BYTES}")
        if hlen < 2:
            raise BadMagicError(path, "not a safetensors file (header length below 2)")
        if C.HEADER_PREFIX_BYTES + hlen > size:
            raise TruncatedFileError(path, f"header needs {hlen} bytes but the file has {size - 8}")
        raw = f.read(hlen)
    identity = file_identity(os.stat(path))
    if raw[:1] != b"{":
        raise BadMagicError(path, "not a safetensors file (header does not start with '{')")
    try:
        text = raw.decode("utf-8")
        del raw  # up to MAX_HEADER_BYTES: not kept beside the text and the objects parsed from it
        header = strict_json(text)
        del text
    except (ValueError, RecursionError) as exc:
        raise HeaderError(path, f"header is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise HeaderError(path, "header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise HeaderError(path, "__metadata__ must map strings to strings")
    if not all(_encodable(k) and _encodable(v) for k, v in meta.items()) or not all(map(_encodable, header)):
        raise HeaderError(path, "header holds a string that is not valid Unicode")
    if len(header) > C.MAX_ENTRIES:
        raise LimitError(path, f"{len(header)} entries exceed the limit of {C.MAX_ENTRIES}")
    data_start = C.HEADER_PREFIX_BYTES + hlen
    data_len = size - data_start
    entries: dict[str, Entry] = {}
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape, shared
    with gc_paused():
        for name, info in header.items():
            entries[name] = _parse_entry(path, name, info, shapes)
        del header
        spans = sorted((e.start, e.end, e.name) for e in entries.values())
    pos = 0
    for start, end, name in spans:
        if start != pos:
            kind = "overlaps the previous entry" if start < pos else "leaves a hole before it"
            raise OffsetError(path, f"entry {name!r} at byte {start} {kind}")
        pos = end
    if pos != data_len:
        if pos > data_len:
            raise TruncatedFileError(path, f"entries need {pos} data bytes but the file has {data_len}")
        raise OffsetError(path, f"{data_len - pos} bytes after the last entry belong to no entry")
    return FileHeader(path, meta, entries, data_start, size, identity)


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_DTYPE_NAMES = {name: name for name in C.DTYPES}
"""Each dtype name once: entries keep these rather than one parsed string apiece."""


def _parse_entry(path: Path, name: str, info, shapes: dict | None = None) -> Entry:
    if not isinstance(info, dict) or info.keys() != _ENTRY_KEYS:
        raise HeaderError(path, f"entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in C.DTYPES:
        raise HeaderError(path, f"entry {name!r} has unknown dtype {str(dtype)[:40]!r}")
    dtype = _DTYPE_NAMES[dtype]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise HeaderError(path, f"entry {name!r} has a malformed shape")
    if len(shape) > C.MAX_DIMS or any(d > C.MAX_DIM_SIZE for d in shape):
        raise LimitError(path, f"entry {name!r} has too many or too large dimensions")
    if not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int and o >= 0 for o in offs):
        raise HeaderError(path, f"entry {name!r} has malformed data_offsets")
    start, end = offs
    nbytes = math.prod(shape) * C.DTYPES[dtype][1]  # Python integers: no overflow
    if end < start or end - start != nbytes:
        raise OffsetError(path, f"entry {name!r} spans {end - start} bytes but its shape needs {nbytes}")
    shape = tuple(shape)
    if shapes is not None:
        shape = shapes.setdefault(shape, shape)
    return Entry(name, dtype, shape, start, end)


class SafetensorsWriter:
    """Streams entries into one safetensors file; the header is written at close.

    Room for the header is reserved up front. At close the header goes into that room, padded with
    spaces; if it does not fit, or the file is small enough that the padding would matter, the data
    is moved once to sit right after a tight header.
    """

    MAX_WASTE_FRACTION = 256
    """Padding beyond 1/256 of the data (and beyond 4 KiB) is not worth keeping: move the data instead."""

    def __init__(self, path: str | os.PathLike, reserve: int = 1 << 20):
        self.path = Path(path)
        # Never more room than a reader accepts: a header padded past it would be refused.
        self._reserve = reserve = min(reserve, C.MAX_HEADER_BYTES - C.MAX_HEADER_BYTES % C.HEADER_ALIGN_BYTES)
        self._f = open(self.path, "wb")
        self._f.seek(C.HEADER_PREFIX_BYTES + reserve)
        self._pos = 0
        self._entries: dict[str, dict] = {}
        self.crcs: dict[str, str] = {}

    @property
    def data_bytes(self) -> int:
        """Bytes of entry data written so far: where the next entry's data starts."""
        return self._pos

    @property
    def entry_count(self) -> int:
        return len(self._entries)

    def write(self, name: str, array: np.ndarray, dtype: str, shape: tuple[int, ...] | None = None) -> str:
        """Append one entry from a C-contiguous array; returns its CRC-32 (8 hex digits)."""
        if name in self._entries:
            raise ValueError(f"duplicate entry {name!r}")
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._f.write(data)
        shape = tuple(array.shape) if shape is None else tuple(shape)
        self._entries[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [self._pos, self._pos + len(data)],
        }
        self._pos += len(data)
        crc = crc32_hex(data)
        self.crcs[name] = crc
        return crc

    COPY_WINDOW = 32 << 20
    """Bytes of a copied entry mapped at a time, for its checksum."""

    def copy_from(
        self, name: str, src: str | os.PathLike, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]
    ) -> str:
        """Append an entry whose bytes are ``nbytes`` of the file ``src`` from ``offset``; returns its CRC-32.

        The kernel copies the bytes (``sendfile``): they never pass through this process, whose
        own copies from memory ran at 1.5 to 4 GB/s from run to run on a virtual machine where
        ``sendfile`` held 3.2; only a window is mapped at a time, for the checksum.
        """
        if name in self._entries:
            raise ValueError(f"duplicate entry {name!r}")
        if nbytes == 0:  # nothing to copy: the source is not even opened
            return self.write(name, np.zeros(0, np.uint8), dtype, shape)
        with open(src, "rb") as f:
            fd = f.fileno()
            self._f.flush()
            start = self._f.tell()
            try:
                self._copy_range(fd, offset, nbytes, start)
            except BaseException:  # leave the file as it was, so the entries after this one stay right
                with contextlib.suppress(OSError):
                    self._f.seek(start)
                    self._f.truncate()
                raise
            crc, pos = 0, 0
            while pos < nbytes:
                lo, n = offset + pos, min(self.COPY_WINDOW, nbytes - pos)
                base = lo - lo % mmap.ALLOCATIONGRANULARITY
                with mmap.mmap(fd, lo + n - base, offset=base, access=mmap.ACCESS_READ) as mm:
                    if _MADV_POPULATE_READ is not None:
                        try:  # map the window in one call: far less CPU than faulting it in page by page
                            mm.madvise(_MADV_POPULATE_READ)
                        except OSError:  # kernels before 5.14
                            pass
                    with memoryview(mm) as view, view[lo - base : lo - base + n] as part:
                        crc = _crc32(part, crc)
                pos += n
        self._entries[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [self._pos, self._pos + nbytes],
        }
        self._pos += nbytes
        crc_hex = f"{crc & 0xFFFFFFFF:08x}"
        self.crcs[name] = crc_hex
        return crc_hex

    def _copy_range(self, fd: int, offset: int, nbytes: int, start: int) -> None:
        done = 0
        while done < nbytes:
            try:
                n = os.sendfile(self._f.fileno(), fd, offset + done, nbytes - done)
            except OSError as exc:
                if done or exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                n = 0  # no sendfile between these files: copy through memory below
            if n == 0:
                break
            done += n
        self._f.seek(start + done)
        while done < nbytes:
            chunk = os.pread(fd, min(self.COPY_WINDOW, nbytes - done), offset + done)
            if not chunk:
                raise OSError(errno.EIO, "the source file ends inside the copied range")
            self._f.write(chunk)
            done += len(chunk)

    def close(self, metadata: dict[str, str]) -> None:
        header = {"__metadata__": metadata, **self._entries} if metadata else dict(self._entries)
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        tight = len(blob) + (-len(blob)) % C.HEADER_ALIGN_BYTES
        if tight > C.MAX_HEADER_BYTES:  # CheckpointWriter refuses such tensors before: a last guard
            raise WriterError(self.path, f"header of {tight} bytes exceeds the limit of {C.MAX_HEADER_BYTES}")
        waste = self._reserve - tight
        if 0 <= waste <= max(4096, self._pos // self.MAX_WASTE_FRACTION):
            blob = blob.ljust(self._reserve, b" ")
            self._f.seek(0)
            self._f.write(struct.pack("<Q", len(blob)) + blob)
            self._f.close()
            return
        blob = blob.ljust(tight, b" ")
        self._f.close()
        moved = self.path.with_name(self.path.name + ".compact")
        with open(self.path, "rb") as src, open(moved, "wb") as dst:
            dst.write(struct.pack("<Q", len(blob)) + blob)
            src.seek(C.HEADER_PREFIX_BYTES + self._reserve)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(moved, self.path)

    def abort(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)
