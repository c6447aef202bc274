"""Streaming, atomic writer for matq checkpoints (spec/v1 "Layout").

Tensors are written one at a time; nothing is visible at the output path until ``close`` renames
the finished folder (or file) into place, and an exception inside ``with`` leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import constants as C
from . import dtypes
from .container import SafetensorsWriter, crc32_hex, read_header
from .errors import MatqError, WriterError
from .manifest import TensorInfo, _safe_relpath, entry_name, plane_entry
from .numerics import code_max, n_groups, planes_needed
from .planes import pack
from .publish import AtomicOutput, OutputKind, output_error
from .safefs import allowed_roots, check_file, read_bounded

WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".onnx_data",
    ".index.json",
)


def carried_sources(src: str | os.PathLike) -> list[Path]:
    """Files of a model folder that travel with a checkpoint: config, tokenizer, everything but weights.

    Links are followed only inside the folder (or a Hugging Face cache's blobs, see
    :mod:`matq_format.safefs`); any other link, FIFO or device among them is refused, not skipped,
    so nothing from outside the folder is ever published with a checkpoint.
    """
    src = Path(src)
    roots = allowed_roots(src)
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = [d for d in dirnames if _safe_relpath(d)]
        for fname in filenames:
            p = Path(dirpath) / fname
            rel = p.relative_to(src).as_posix()
            if not _safe_relpath(rel) or fname.endswith(WEIGHT_SUFFIXES) or fname == "README.md":
                continue  # hidden files, odd names, weights
            check_file(p, roots)
            if p.stat().st_size <= C.CARRY_MAX_BYTES:
                out.append(p)
    return sorted(out)


def checkpoint_kind(single_file: bool) -> OutputKind:
    """What the writer writes, for replacing only that (see :mod:`matq_format.publish`)."""
    return OutputKind("matq checkpoint", not single_file, is_checkpoint)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a matq checkpoint (a folder with its base file, or a single file)."""
    path = Path(path)
    base = path / C.BASE_FILENAME if path.is_dir() else path
    try:
        meta = read_header(base).metadata
    except (MatqError, OSError):
        return False
    return meta.get(C.METADATA_KEY_FORMAT) == C.FORMAT_NAME and C.METADATA_KEY_MANIFEST in meta


def _manifest_json(obj) -> str:
    """Strict JSON (no NaN), encodable as UTF-8: what the reader accepts."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    text.encode("utf-8")
    return text


def _little_endian_c(a: np.ndarray) -> np.ndarray:
    """The same values as a C-contiguous little-endian array (0-d arrays stay 0-d)."""
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).reshape(a.shape)


def _escaped_len(text: str) -> int:
    """UTF-8 bytes of JSON text once more JSON-escaped, as the manifest sits in the base header.

    The text comes from ``json.dumps``, which leaves no control character raw, so only quotes and
    backslashes grow (by one byte each)."""
    return len(text.encode("utf-8")) + text.count('"') + text.count("\\")


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""The manifest's encoding (as ``_manifest_json``), made once: tensors are counted one by one."""
_ENTRY_RECORD = len('{"dtype":"","shape":[],"data_offsets":[,]}') + 2
"""Bytes of a header entry record but for its name, dtype, dimensions and offsets (plus ':' and ',')."""


class _HeaderBudget:
    """The bytes and entries each header will hold, counted tensor by tensor as ``close`` writes them.

    Exact for entries and manifest records; the fixed part (metadata, files, source, carried) is
    counted with every plane file present and 20-digit file sizes, so the total is an upper bound.
    """

    def __init__(self, w: CheckpointWriter):
        self.base = 0  # entry records of the base file
        self.planes: dict[int, int] = {}  # entry records of each plane file
        self.manifest = 0  # tensor and entry records of the manifest, as escaped in the base header
        self._fixed: int | None = None
        # An entry's manifest record but for its name: ':{"file":"<file>","crc32":"<8 hex>"},'
        self._files = {
            f: _escaped_len(":" + json.dumps({"file": f, "crc32": "0" * 8}, separators=(",", ":")) + ",")
            for f in [C.BASE_FILENAME, *(C.PLANE_FILENAME.format(k=k) for k in range(w.code_bits))]
        }
        meta = {C.METADATA_KEY_FORMAT: C.FORMAT_NAME, C.METADATA_KEY_ROLE: C.ROLE_PLANES}
        self.plane_meta = len(json.dumps({"__metadata__": meta}, separators=(",", ":"))) + 1 + 8

    def fixed(self, w: CheckpointWriter) -> int:
        """Base header bytes besides entries and records: metadata, manifest keys, files, source."""
        if self._fixed is None:
            meta = {
                C.METADATA_KEY_FORMAT: C.FORMAT_NAME,
                C.METADATA_KEY_ROLE: C.ROLE_BASE,
                C.METADATA_KEY_MANIFEST: "",
                C.METADATA_KEY_MANIFEST_CRC: "0" * 8,
            }
            files = {
                C.PLANE_FILENAME.format(k=k): {"bytes": 10**20, "planes": [k]}
                for k in range(0 if w.single_file else w.code_bits)
            }
            manifest = {
                "format": C.FORMAT_NAME,
                "version": f"{C.FORMAT_VERSION[0]}.{C.FORMAT_VERSION[1]}",
                "code_bits": w.code_bits,
                "must_understand": w.must_understand,
                "extensions": w.extensions,
                "files": files,
                "carried": w._carried,
                "tensors": {},
                "entries": {},
                "source": w.source,
            }
            self._fixed = (
                len(json.dumps({"__metadata__": meta}, separators=(",", ":")))
                + _escaped_len(_manifest_json(manifest))
                + 1
                + 8  # the comma after the metadata, and alignment padding
            )
        return self._fixed


class CheckpointWriter:
    """Write a checkpoint tensor by tensor.

    ``out`` is a folder (canonical form: ``matq.safetensors`` plus one file per bit-plane, plus the
    carried config and tokenizer files) or, with ``single_file=True``, one ``.safetensors`` file.
    ``expected_tensors`` (a count known up front, as when converting a model) sizes the header room
    so that no data has to move when the headers are written at close.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        code_bits: int = C.DEFAULT_CODE_BITS,
        *,
        single_file: bool = False,
        carry_from: str | os.PathLike | dict[str, Path] | None = None,
        source: dict | None = None,
        overwrite: bool = False,
        extensions: dict | None = None,
        must_understand: list[str] | None = None,
        expected_tensors: int | None = None,
        inputs: Iterable[str | os.PathLike] = (),
    ):
        if not C.MIN_CODE_BITS <= code_bits <= C.MAX_CODE_BITS_IMPL:
            raise WriterError(out, f"code bits {code_bits} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_IMPL}")
        self.out = Path(out)
        self.code_bits = code_bits
        self.single_file = single_file
        self.source = dict(source or {})
        self.extensions = dict(extensions or {})
        self.must_understand = list(must_understand or [])
        names = [*self.extensions, *self.must_understand]
        bad = [n for n in names if not isinstance(n, str) or not C.EXTENSION_NAME_RE.match(n)]
        if bad:
            raise WriterError(self.out, f"extension names must be dotted lower-case names: {bad[:3]}")
        try:  # fail now, not at close: the manifest must be strict JSON in UTF-8
            _manifest_json({"source": self.source, "extensions": self.extensions})
        except (TypeError, ValueError) as exc:
            raise WriterError(self.out, f"source and extensions must be plain JSON: {exc}") from None
        if carry_from is not None and single_file:
            raise WriterError(
                self.out, "a single-file checkpoint carries no side files; write a folder to keep them"
            )
        self._output = AtomicOutput(self.out, checkpoint_kind(single_file), inputs=inputs, overwrite=overwrite)
        self._output.open()
        self._planes: dict[int, SafetensorsWriter] = {}
        # Header room: with a tensor count the headers fit without moving any data at close.
        self._plane_reserve = 1 << 20 if expected_tensors is None else 4096 + 320 * expected_tensors
        base_reserve = 4 << 20 if expected_tensors is None else 65536 + 2048 * expected_tensors
        try:
            # A folder is built in the output's partial folder; a single file in a partial folder
            # of its own (named like it, so a later run cleans it up too), then moved.
            self._tmp = (
                Path(tempfile.mkdtemp(prefix=self._output.tmp.name + "-", dir=self.out.parent))
                if single_file
                else self._output.tmp
            )
            self._base = SafetensorsWriter(self._tmp / C.BASE_FILENAME, reserve=base_reserve)
        except OSError as exc:
            self._output.close()
            raise output_error(self.out, exc) from None
        self._tensors: dict[str, TensorInfo] = {}
        self._entries: dict[str, dict] = {}
        self._carried: dict[str, dict] = {}
        self._closed = False
        if carry_from is not None:
            try:
                self._carry(carry_from)
            except OSError as exc:
                self.abort()
                raise output_error(self.out, exc) from None
            except BaseException:
                self.abort()
                raise

    # --- public API ------------------------------------------------------------------------------
    def add_dense(
        self, name: str, array: np.ndarray, dtype: str | None = None, *, extras: dict | None = None
    ) -> None:
        """Store a tensor as it came (embeddings, norms, biases). ``dtype='BF16'`` takes uint16 bits.

        ``extras`` are extension keys of the tensor's manifest entry, kept as given."""
        self._check_name(name)
        array = _little_endian_c(np.asarray(array))
        try:
            dtype = dtype or dtypes.st_dtype(array)
        except ValueError as exc:
            raise WriterError(self.out, f"{name}: {exc}") from None
        if dtype not in C.DTYPES:
            raise WriterError(self.out, f"{name}: unknown dtype {dtype!r} (known: {', '.join(C.DTYPES)})")
        if array.dtype.itemsize != C.DTYPES[dtype][1]:
            raise WriterError(self.out, f"{name}: array itemsize does not match dtype {dtype}")
        info = TensorInfo(name, C.KIND_DENSE, tuple(array.shape), dtype, extras=dict(extras or {}))
        self._charge(info, [(name, dtype, info.shape, array.nbytes)], [])
        self._write_base(name, array, dtype)
        self._tensors[name] = info

    def add_dense_from_file(
        self,
        name: str,
        path: str | os.PathLike,
        offset: int,
        nbytes: int,
        dtype: str,
        shape: tuple[int, ...],
        *,
        extras: dict | None = None,
    ) -> str:
        """:meth:`add_dense` of ``nbytes`` little-endian bytes of ``path`` at ``offset`` (a tensor of a
        safetensors file): the same entry, copied by the kernel, in constant memory. Returns the
        CRC-32 of the bytes copied (8 hex digits)."""
        self._check_name(name)
        if dtype not in C.DTYPES:
            raise WriterError(self.out, f"{name}: unknown dtype {dtype!r} (known: {', '.join(C.DTYPES)})")
        shape = tuple(int(d) for d in shape)
        if nbytes != math.prod(shape) * C.DTYPES[dtype][1]:
            raise WriterError(
                self.out, f"{name}: {nbytes} bytes do not hold a {dtype} tensor of shape {shape}"
            )
        info = TensorInfo(name, C.KIND_DENSE, shape, dtype, extras=dict(extras or {}))
        self._charge(info, [(name, dtype, shape, nbytes)], [])
        crc = self._base.copy_from(name, path, offset, nbytes, dtype, shape)
        self._entries[name] = {"file": C.BASE_FILENAME, "crc32": crc}
        self._tensors[name] = info
        return crc

    def add_quantized(
        self,
        name: str,
        codes: np.ndarray,
        scale: np.ndarray,
        zero: np.ndarray,
        *,
        dtype: str = "F32",
        group_size: int | None = None,
        scheme: str = "asymmetric",
        scale_dtype: str = "F16",
        zero_dtype: str = "U8",
        extra_precision: tuple[int, ...] | list[int] = (),
        keep_bits: int | None = None,
    ) -> None:
        """Store c-bit codes ``[rows, cols]`` as bit-planes with their scale and zero point.

        ``keep_bits`` stores only the planes a width-``keep_bits`` slice needs (a sliced checkpoint).
        """
        self._check_name(name)
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.dtype != np.uint8:
            raise WriterError(self.out, f"{name}: codes must be a 2-D uint8 array")
        try:
            packed = pack(codes, self.code_bits)
        except ValueError as exc:
            raise WriterError(self.out, f"{name}: {exc}") from None
        if keep_bits is not None and not 1 <= keep_bits <= self.code_bits:
            raise WriterError(self.out, f"{name}: keep_bits {keep_bits} outside 1..{self.code_bits}")
        keep = planes_needed(self.code_bits, keep_bits or self.code_bits)
        self.add_quantized_planes(
            name,
            {k: packed[k] for k in keep},
            scale,
            zero,
            shape=codes.shape,
            dtype=dtype,
            group_size=group_size,
            scheme=scheme,
            scale_dtype=scale_dtype,
            zero_dtype=zero_dtype,
            extra_precision=extra_precision,
        )

    def add_quantized_planes(
        self,
        name: str,
        planes: dict[int, np.ndarray],
        scale: np.ndarray,
        zero: np.ndarray,
        *,
        shape: tuple[int, int],
        dtype: str,
        group_size: int | None,
        scheme: str,
        scale_dtype: str,
        zero_dtype: str,
        extra_precision=(),
        extras: dict | None = None,
    ) -> None:
        """Store already packed planes (``{k: uint8[stride]}``), e.g. copied from another checkpoint."""
        self._check_name(name)
        if len(shape) != 2 or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            raise WriterError(self.out, f"{name}: quantized tensors are 2-D, got shape {tuple(shape)}")
        if group_size is not None and (
            not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size < 1
        ):
            raise WriterError(self.out, f"{name}: group_size must be None or a positive integer")
        if scheme not in C.SCHEMES:
            raise WriterError(self.out, f"{name}: unknown scheme {scheme!r}")
        if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in extra_precision):
            raise WriterError(self.out, f"{name}: extra_precision must list integer widths")
        if len(set(extra_precision)) != len(extra_precision):
            raise WriterError(self.out, f"{name}: extra_precision lists a width twice")
        rows, cols = (int(d) for d in shape)
        group_size = None if group_size is None else int(group_size)
        if group_size is not None and group_size > C.MAX_DIM_SIZE:
            raise WriterError(self.out, f"{name}: group_size {group_size} exceeds the limit of {C.MAX_DIM_SIZE}")
        groups = n_groups(cols, group_size)
        info = TensorInfo(
            name,
            C.KIND_QUANTIZED,
            (rows, cols),
            dtype,
            C.GRANULARITY_CHANNEL if group_size is None else C.GRANULARITY_GROUP,
            group_size,
            scheme,
            scale_dtype,
            zero_dtype,
            tuple(sorted(int(r) for r in extra_precision)),
            tuple(sorted(planes, reverse=True)),
            extras=dict(extras or {}),
        )
        if (
            dtype not in C.QUANTIZABLE_DTYPES
            or scale_dtype not in C.SCALE_DTYPES
            or zero_dtype not in C.ZERO_DTYPES
        ):
            raise WriterError(self.out, f"{name}: unsupported dtype, scale_dtype or zero_dtype")
        if any(not 1 <= r < self.code_bits for r in info.extra_precision):
            raise WriterError(self.out, f"{name}: extra-precision widths must be below {self.code_bits}")
        scale, zero = np.asarray(scale, np.float32), np.asarray(zero, np.float32)
        if scale.size != rows * groups or zero.size != rows * groups:
            raise WriterError(
                self.out,
                f"{name}: scale and zero need {rows}x{groups} values, got {scale.size} and {zero.size}",
            )
        scale, zero = scale.reshape(rows, groups), zero.reshape(rows, groups)
        if not np.all(np.isfinite(scale)) or not np.all(scale != 0):
            raise WriterError(self.out, f"{name}: scales must be finite and non-zero")
        if np.any(scale < 0) and C.EXT_SIGNED_SCALES not in self.must_understand:
            raise WriterError(
                self.out, f"{name}: negative scales need {C.EXT_SIGNED_SCALES} in must_understand"
            )
        if not np.all(np.isfinite(zero)):
            raise WriterError(self.out, f"{name}: zero points must be finite")
        if zero.min(initial=0) < 0 or zero.max(initial=0) > code_max(self.code_bits):
            raise WriterError(self.out, f"{name}: zero points must lie in 0..{code_max(self.code_bits)}")
        if zero_dtype in ("U8", "U16") and np.any(zero != np.rint(zero)):
            raise WriterError(self.out, f"{name}: {zero_dtype} zero points must be integers")
        try:
            s_arr, z_arr = dtypes.cast_exact(scale, scale_dtype), dtypes.cast_exact(zero, zero_dtype)
        except ValueError as exc:
            raise WriterError(self.out, f"{name}: {exc}") from None
        stride = -(-rows * cols // 64) * C.PLANE_ALIGN_BYTES
        arrays = {k: np.asarray(planes[k], np.uint8).reshape(-1) for k in sorted(planes, reverse=True)}
        for k, p in arrays.items():
            if not 0 <= k < self.code_bits or p.size != stride:
                raise WriterError(self.out, f"{name}: plane {k} must be {stride} bytes")
        g = (rows, groups)
        self._charge(
            info,
            [
                (entry_name(name, C.SCALE_SUFFIX), scale_dtype, g, s_arr.nbytes),
                (entry_name(name, C.ZERO_SUFFIX), zero_dtype, g, z_arr.nbytes),
            ],
            [(k, plane_entry(name, k), stride) for k in arrays],
        )
        for k, p in arrays.items():  # only now, so a refused tensor leaves nothing behind
            self._write_plane(k, plane_entry(name, k), p)
        self._write_base(entry_name(name, C.SCALE_SUFFIX), s_arr, scale_dtype)
        self._write_base(entry_name(name, C.ZERO_SUFFIX), z_arr, zero_dtype)
        self._tensors[name] = info

    def close(self) -> Path:
        """Finish every file, write the manifest, and move the checkpoint into place."""
        if self._closed:
            return self.out
        self._closed = True
        try:
            self.check_limits()  # every limit the reader enforces, before anything is published
            files = {}
            for k, w in sorted(self._planes.items(), reverse=True):
                w.close({C.METADATA_KEY_FORMAT: C.FORMAT_NAME, C.METADATA_KEY_ROLE: C.ROLE_PLANES})
                files[w.path.name] = {"bytes": w.path.stat().st_size, "planes": [k]}
            manifest = {
                "format": C.FORMAT_NAME,
                "version": f"{C.FORMAT_VERSION[0]}.{C.FORMAT_VERSION[1]}",
                "code_bits": self.code_bits,
                "must_understand": self.must_understand,
                "extensions": self.extensions,
                "files": files,
                "carried": self._carried,
                "tensors": {n: t.to_json() for n, t in self._tensors.items()},
                "entries": self._entries,
                "source": self.source,
            }
            text = _manifest_json(manifest)
            self._base.close(
                {
                    C.METADATA_KEY_FORMAT: C.FORMAT_NAME,
                    C.METADATA_KEY_ROLE: C.ROLE_BASE,
                    C.METADATA_KEY_MANIFEST: text,
                    C.METADATA_KEY_MANIFEST_CRC: crc32_hex(text.encode("utf-8")),
                }
            )
            if self.single_file:
                os.rename(self._base.path, self._output.tmp)
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._output.commit()
        except OSError as exc:
            self.abort()
            raise output_error(self.out, exc) from None
        except BaseException:
            self.abort()
            raise
        self._output.close()
        return self.out

    def abort(self) -> None:
        """Drop everything written so far; the output path is left as it was."""
        self._closed = True
        for w in [self._base, *self._planes.values()]:
            if not w._f.closed:
                w._f.close()
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._output.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        self.abort()
        if isinstance(exc, OSError):  # disk full and the like: say which output it was
            raise output_error(self.out, exc) from None

    # --- internals ------------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        if self._closed:
            raise WriterError(self.out, "writer is closed")
        if not isinstance(name, str) or not name or C.ENTRY_SEP in name or name == "__metadata__":
            raise WriterError(self.out, f"tensor name {name!r} must be a non-empty string free of '@'")
        try:
            nbytes = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise WriterError(self.out, f"tensor name {name[:64]!r} is not valid Unicode") from None
        if nbytes > C.MAX_NAME_BYTES:
            raise WriterError(
                self.out,
                f"tensor name {name[:64]!r}... is {nbytes} bytes of UTF-8, over the limit of {C.MAX_NAME_BYTES}",
            )
        if name in self._tensors:
            raise WriterError(self.out, f"duplicate tensor {name!r}")
        if len(self._tensors) >= C.MAX_TENSORS:
            raise WriterError(
                self.out, f"{name}: a checkpoint holds at most {C.MAX_TENSORS} tensors (the reader's limit)"
            )

    _budget: _HeaderBudget | None = None

    def _charge(
        self,
        info: TensorInfo,
        base: list[tuple[str, str, tuple[int, ...], int]],
        planes: list[tuple[int, str, int]],
    ) -> None:
        """Count a tensor's entries and records into the headers, or refuse it (nothing written yet)
        if any limit the reader enforces would be passed: dimensions, entries, header bytes.

        ``base``: (entry, dtype, shape, bytes) of entries in the base file; ``planes``: (plane,
        entry, bytes) of U8 plane entries (in the base file too, for a single file)."""
        name = info.name
        for what, shape in [("shape", info.shape), *((e, s) for e, _, s, _ in base)]:
            if len(shape) > C.MAX_DIMS or any(d > C.MAX_DIM_SIZE for d in shape):
                raise WriterError(
                    self.out,
                    f"{name}: {what} {list(shape)} passes the limits of {C.MAX_DIMS} dimensions "
                    f"of at most {C.MAX_DIM_SIZE}",
                )
        if self._budget is None:
            self._budget = _HeaderBudget(self)
        b = self._budget
        j = _ENCODER.encode(name)
        jlen = len(j.encode("utf-8"))
        jesc = jlen + j.count('"') + j.count("\\")
        try:
            record = _ENCODER.encode(info.to_json())
        except (TypeError, ValueError) as exc:
            raise WriterError(self.out, f"{name}: extras must be plain JSON: {exc}") from None
        manifest = jesc + _escaped_len(record) + 2
        base_bytes = 0
        plane_bytes: dict[int, int] = {}
        pos = {C.BASE_FILENAME: self._base._pos}
        counts = {C.BASE_FILENAME: len(self._base._entries)}
        entries = []  # in the order they are written: planes, then the base file's entries
        for k, e, n in planes:
            f = C.BASE_FILENAME if self.single_file else C.PLANE_FILENAME.format(k=k)
            if f not in pos:
                w = self._planes.get(k)
                pos[f], counts[f] = (w._pos, len(w._entries)) if w is not None else (0, 0)
            entries.append((e, f, None if self.single_file else k, "U8", (n,), n))
        entries += [(e, C.BASE_FILENAME, None, dt, sh, n) for e, dt, sh, n in base]
        for e, f, k, dt, sh, n in entries:
            suffix = len(e) - len(name)  # "@plane7", "@scale", "@zero": nothing to escape
            rec = (
                jlen
                + suffix
                + _ENTRY_RECORD
                + len(dt)
                + len(",".join(map(str, sh)))
                + len(str(pos[f]))
                + len(str(pos[f] + n))
            )
            pos[f] += n
            counts[f] += 1
            if k is None:
                base_bytes += rec
            else:
                plane_bytes[k] = plane_bytes.get(k, 0) + rec
            manifest += jesc + suffix + b._files[f]
        for f, n in counts.items():
            if n > C.MAX_ENTRIES:
                raise WriterError(
                    self.out, f"{name}: {f} would hold {n} entries, over the limit of {C.MAX_ENTRIES}"
                )
        if len(self._entries) + len(entries) > C.MAX_ENTRIES:
            raise WriterError(
                self.out, f"{name}: the manifest would list over {C.MAX_ENTRIES} entries (the reader's limit)"
            )
        total = b.fixed(self) + b.manifest + manifest + b.base + base_bytes
        if total > C.MAX_HEADER_BYTES:
            raise WriterError(
                self.out,
                f"{name}: the header of {C.BASE_FILENAME} would take over {total} bytes, past the "
                f"reader's limit of {C.MAX_HEADER_BYTES} (too many tensors, or too long names)",
            )
        for k, n in plane_bytes.items():
            if b.plane_meta + b.planes.get(k, 0) + n > C.MAX_HEADER_BYTES:
                raise WriterError(
                    self.out,
                    f"{name}: the header of {C.PLANE_FILENAME.format(k=k)} would pass the reader's "
                    f"limit of {C.MAX_HEADER_BYTES} bytes",
                )
        b.manifest += manifest
        b.base += base_bytes
        for k, n in plane_bytes.items():
            b.planes[k] = b.planes.get(k, 0) + n

    def check_limits(self) -> None:
        """Raise :class:`WriterError` if the checkpoint as written so far would break a limit the
        reader enforces (tensors, entries, header bytes); call before publishing.

        Every ``add_*`` already refuses a tensor that would; this recounts the fixed part of the
        base header (source, extensions, carried files), which may have changed since."""
        if self._budget is None:
            self._budget = _HeaderBudget(self)
        b = self._budget
        b._fixed = None
        if len(self._tensors) > C.MAX_TENSORS:
            raise WriterError(self.out, f"{len(self._tensors)} tensors exceed the limit of {C.MAX_TENSORS}")
        files = [self._base, *self._planes.values()]
        if len(self._entries) > C.MAX_ENTRIES or any(len(w._entries) > C.MAX_ENTRIES for w in files):
            raise WriterError(self.out, f"more than {C.MAX_ENTRIES} entries in a header (the reader's limit)")
        total = b.fixed(self) + b.manifest + b.base
        if total > C.MAX_HEADER_BYTES:
            raise WriterError(
                self.out,
                f"the header of {C.BASE_FILENAME} would take over {total} bytes, past the reader's "
                f"limit of {C.MAX_HEADER_BYTES}",
            )
        for k, n in b.planes.items():
            if b.plane_meta + n > C.MAX_HEADER_BYTES:
                raise WriterError(
                    self.out,
                    f"the header of {C.PLANE_FILENAME.format(k=k)} would pass the reader's limit of "
                    f"{C.MAX_HEADER_BYTES} bytes",
                )

    def _write_base(self, entry: str, array: np.ndarray, dtype: str) -> None:
        crc = self._base.write(entry, array, dtype)
        self._entries[entry] = {"file": C.BASE_FILENAME, "crc32": crc}

    def _write_plane(self, k: int, entry: str, data: np.ndarray) -> None:
        if self.single_file:
            w = self._base
        else:
            w = self._planes.get(k)
            if w is None:
                w = self._planes[k] = SafetensorsWriter(
                    self._tmp / C.PLANE_FILENAME.format(k=k), reserve=self._plane_reserve
                )
        crc = w.write(entry, data, "U8")
        self._entries[entry] = {"file": w.path.name, "crc32": crc}

    def _carry(self, src: str | os.PathLike | dict[str, Path | bytes]) -> None:
        """Copy a model folder's side files, or an explicit ``{relative name: path or bytes}`` map.

        Files are read as regular files of bounded size (a FIFO or ``/dev/zero`` is refused)."""
        if not isinstance(src, dict):
            root = Path(src)
            src = {p.relative_to(root).as_posix(): p for p in carried_sources(root)}
        reserved = {C.BASE_FILENAME, *(C.PLANE_FILENAME.format(k=k) for k in range(C.MAX_CODE_BITS_SPEC))}
        for rel, p in src.items():
            if not isinstance(rel, str) or not _safe_relpath(rel) or rel.split("/")[0] in reserved:
                raise WriterError(
                    self.out, f"cannot carry {rel!r}: not a plain relative path, or a matq file name"
                )
            data = p if isinstance(p, bytes) else read_bounded(p, C.CARRY_MAX_BYTES)
            if len(data) > C.CARRY_MAX_BYTES:
                raise WriterError(self.out, f"cannot carry {rel!r}: larger than {C.CARRY_MAX_BYTES} bytes")
            dst = self._tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            self._carried[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
