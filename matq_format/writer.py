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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import constants as C
from . import dtypes
from .container import SafetensorsWriter, crc32_hex, read_header
from .errors import MatqError, WriterError
from .manifest import (
    RecordError,
    TensorInfo,
    check_name,
    check_tensor,
    entry_name,
    plane_entry,
    safe_relpath,
)
from .numerics import code_max, planes_needed
from .planes import pack
from .publish import AtomicOutput, OutputKind, output_error
from .safefs import allowed_roots, check_file, read_bounded
from .widths import WidthParams, check_values, part_dtype, part_name, part_shape, record

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
        dirnames[:] = [d for d in dirnames if safe_relpath(d)]
        for fname in filenames:
            p = Path(dirpath) / fname
            rel = p.relative_to(src).as_posix()
            if not safe_relpath(rel) or fname.endswith(WEIGHT_SUFFIXES) or fname == "README.md":
                continue  # hidden files, odd names, weights
            check_file(p, roots)
            if p.stat().st_size <= C.CARRY_MAX_BYTES:
                out.append(p)
    return sorted(out)


def checkpoint_kind(single_file: bool) -> OutputKind:
    """What the writer writes, for replacing only that (see :mod:`matq_format.publish`)."""
    return OutputKind("matq checkpoint", not single_file, is_checkpoint, checkpoint_members)


def checkpoint_members(path: str | os.PathLike) -> set[str] | None:
    """The files a checkpoint folder's manifest lists: its base file, planes and carried files."""
    try:
        meta = read_header(Path(path) / C.BASE_FILENAME).metadata
        manifest = json.loads(meta[C.METADATA_KEY_MANIFEST])
        listed = [*manifest.get("files", {}), *manifest.get("carried", {})]
    except (MatqError, OSError, KeyError, ValueError, TypeError, RecursionError):
        return None
    if not all(isinstance(n, str) for n in listed):
        return None
    return {C.BASE_FILENAME, *listed}


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a matq checkpoint (a folder with its base file, or a single file)."""
    path = Path(path)
    base = path / C.BASE_FILENAME if path.is_dir() else path
    try:
        meta = read_header(base).metadata
    except (MatqError, OSError):
        return False
    return meta.get(C.METADATA_KEY_FORMAT) == C.FORMAT_NAME and C.METADATA_KEY_MANIFEST in meta


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""How headers and the manifest are serialized: compact, strict JSON, UTF-8 left unescaped."""
_PLANE_METADATA = {C.METADATA_KEY_FORMAT: C.FORMAT_NAME, C.METADATA_KEY_ROLE: C.ROLE_PLANES}
_WIDTH_METADATA = {C.METADATA_KEY_FORMAT: C.FORMAT_NAME, C.METADATA_KEY_ROLE: C.ROLE_WIDTH}


def _manifest_json(obj) -> str:
    """Strict JSON (no NaN), encodable as UTF-8: what the reader accepts."""
    text = _ENCODER.encode(obj)
    text.encode("utf-8")
    return text


def _little_endian_c(a: np.ndarray) -> np.ndarray:
    """The same values as a C-contiguous little-endian array (0-d arrays stay 0-d)."""
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).reshape(a.shape)


def _plain_int(v):
    """A numpy integer as a Python one, so the record it goes into is JSON; anything else as it is."""
    return int(v) if isinstance(v, np.integer) else v


def _is_integer(v) -> bool:
    """A zero point given as one integer, Python's or numpy's (``True`` too: the record check refuses it)."""
    return isinstance(v, (int, np.integer))


def _one_integer(z: np.ndarray) -> int | None:
    """The integer every zero point equals, if there is one (10.6); None for none or for several."""
    if z.size == 0:
        return None
    first = z.reshape(-1)[0]
    if not float(first).is_integer() or not np.all(z == first):
        return None
    return int(first)


def _plain_ints(values) -> tuple:
    return tuple(_plain_int(v) for v in values)


def _json_bytes(obj) -> int:
    """Bytes of ``obj`` as a header holds it: compact JSON in UTF-8."""
    return len(_ENCODER.encode(obj).encode("utf-8"))


def _members(obj: dict) -> str:
    """The members of ``obj`` as they sit in a larger JSON object: ``"key":value,`` each."""
    return _ENCODER.encode(obj)[1:-1] + ","


def _escaped_bytes(text: str) -> int:
    """Bytes of ``text`` as a JSON string holds it, as the manifest sits in the base header."""
    return _json_bytes(text) - 2


class _Planned(NamedTuple):
    """An entry about to be written, and its file: a plane index, ``"w<r>"`` for width r's
    parameters (spec 10.7), or None for the base file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    plane: int | str | None = None
    extension: str | None = None  # an extension entry's record names its extension (spec 5.6)


@dataclass
class _HeaderBytes:
    """The bytes each header will take, counted tensor by tensor before anything is written.

    Records are serialized as ``close`` will serialize them and measured: exact, but for one comma
    per JSON object. ``fixed`` lists every plane file at a 21-digit size, so totals are upper bounds."""

    fixed: int  # the base header without tensors: metadata and the manifest's other fields
    plane_meta: int  # a plane file's header without entries
    base: int = 0  # entry records of the base file
    manifest: int = 0  # tensor and entry records of the manifest, as escaped in the base header
    planes: dict[int, int] = field(default_factory=dict)  # entry records of each plane file


class CheckpointWriter:
    """Write a checkpoint tensor by tensor.

    ``out`` is a folder (canonical form: ``matq.safetensors`` plus one file per bit-plane, plus the
    carried config and tokenizer files) or, with ``single_file=True``, one ``.safetensors`` file.
    ``expected_tensors`` (a count known up front, as when converting a model) sizes the header room
    so that no data has to move when the headers are written at close. ``constant_zero`` stores a
    tensor whose zero points all equal one integer as that integer (spec 10.6: no ``@zero`` entry);
    a tool that copies checkpoints (slicing) turns it off to keep each tensor as it found it.
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
        constant_zero: bool = True,
    ):
        if not C.MIN_CODE_BITS <= code_bits <= C.MAX_CODE_BITS_IMPL:
            raise WriterError(out, f"code bits {code_bits} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_IMPL}")
        self.out = Path(out)
        self.code_bits = code_bits
        self.constant_zero = constant_zero
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
        self._planes: dict[int | str, SafetensorsWriter] = {}  # plane index, or "w<r>" (a width file)
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
        self._importance_kept = False
        if carry_from is not None:
            try:
                self._carry(carry_from)
            except OSError as exc:
                self.abort()
                raise output_error(self.out, exc) from None
            except BaseException:
                self.abort()
                raise
        plane_meta = _json_bytes({"__metadata__": _PLANE_METADATA}) + C.HEADER_ALIGN_BYTES
        self._budget = _HeaderBytes(self._fixed_bytes(), plane_meta)

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
        info = TensorInfo(name, C.KIND_DENSE, tuple(array.shape), dtype, extras=dict(extras or {}))
        self._check_record(info)
        if array.dtype.itemsize != C.DTYPES[dtype][1]:
            raise WriterError(self.out, f"{name}: array itemsize does not match dtype {dtype}")
        self._charge(info, [_Planned(name, dtype, info.shape, array.nbytes)])
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
        shape = tuple(int(d) for d in shape)
        info = TensorInfo(name, C.KIND_DENSE, shape, dtype, extras=dict(extras or {}))
        self._check_record(info)
        if nbytes != math.prod(shape) * C.DTYPES[dtype][1]:
            raise WriterError(
                self.out, f"{name}: {nbytes} bytes do not hold a {dtype} tensor of shape {shape}"
            )
        self._charge(info, [_Planned(name, dtype, shape, nbytes)])
        crc = self._base.copy_from(name, path, offset, nbytes, dtype, shape)
        self._entries[name] = {"file": C.BASE_FILENAME, "crc32": crc}
        self._tensors[name] = info
        return crc

    def add_quantized(
        self,
        name: str,
        codes: np.ndarray,
        scale: np.ndarray,
        zero: np.ndarray | int,
        *,
        dtype: str = "F32",
        group_size: int | None = None,
        scheme: str = "asymmetric",
        scale_dtype: str = "F16",
        zero_dtype: str = "U8",
        extra_precision: tuple[int, ...] | list[int] = (),
        keep_bits: int | None = None,
        input_axis: int | None = None,
        width_params: dict[int, WidthParams] | None = None,
        importance: np.ndarray | None = None,
        sensitivity: np.ndarray | None = None,
    ) -> None:
        """Store c-bit codes ``[rows, cols]`` as bit-planes with their scale and zero point (an array,
        or one integer for the whole tensor: spec 10.6).

        ``keep_bits`` stores only the planes a width-``keep_bits`` slice needs (a sliced checkpoint).
        Codes of more dimensions are a stack of matrices with groups along ``input_axis`` (the last
        or the one before; spec 10.5), and scale and zero have ``numerics.param_shape``.
        """
        self._check_name(name)
        codes = np.asarray(codes)
        if codes.ndim < 2 or codes.dtype != np.uint8:
            raise WriterError(self.out, f"{name}: codes must be a uint8 array of 2 or more dimensions")
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
            input_axis=input_axis,
            width_params=width_params,
            importance=importance,
            sensitivity=sensitivity,
        )

    def add_quantized_planes(
        self,
        name: str,
        planes: dict[int, np.ndarray],
        scale: np.ndarray,
        zero: np.ndarray | int,
        *,
        shape: tuple[int, ...],
        dtype: str,
        group_size: int | None,
        scheme: str,
        scale_dtype: str,
        zero_dtype: str,
        extra_precision=(),
        extras: dict | None = None,
        input_axis: int | None = None,
        width_params: dict[int, WidthParams] | None = None,
        importance: np.ndarray | None = None,
        sensitivity: np.ndarray | None = None,
    ) -> None:
        """Store already packed planes (``{k: uint8[stride]}``), e.g. copied from another checkpoint.

        A stacked tensor (10.5: more than two dimensions, or ``input_axis`` not the last) lists
        ``matq.stacked`` in ``must_understand`` and makes the checkpoint version 1.1; a constant zero
        point (10.6: ``zero`` an integer, or an array of one integer with ``constant_zero``) lists
        ``matq.constant_zero`` and ``width_params`` (10.7, one file per width) list
        ``matq.width_params``; either makes it 1.2. ``importance`` (10.8: per input feature, shape
        ``importance_shape``, finite and not negative) is kept as ``t@importance`` and makes it 1.2
        without entering ``must_understand``; so is ``sensitivity`` (10.8: per output feature, shape
        ``sensitivity_shape``), as ``t@sensitivity``, only beside an importance."""
        self._check_name(name)
        extras = dict(extras or {})
        extras.pop(C.EXT_WIDTH_PARAMS, None)
        if width_params:
            extras[C.EXT_WIDTH_PARAMS] = record({r: p.spec for r, p in width_params.items()})
        info = TensorInfo(
            name,
            C.KIND_QUANTIZED,
            _plain_ints(shape),
            dtype,
            C.GRANULARITY_CHANNEL if group_size is None else C.GRANULARITY_GROUP,
            _plain_int(group_size),
            scheme,
            scale_dtype,
            zero_dtype,
            _plain_ints(extra_precision),
            _plain_ints(planes),
            extras=extras,
            input_axis=_plain_int(input_axis),
        )
        self._check_record(info)
        info = replace(
            info,
            extra_precision=tuple(sorted(info.extra_precision)),
            planes=tuple(sorted(info.planes, reverse=True)),
            input_axis=info.in_axis if info.stacked else None,
        )
        pshape = info.param_shape
        scale = np.asarray(scale, np.float32)
        zero = _plain_int(zero) if _is_integer(zero) else np.asarray(zero, np.float32)
        n = math.prod(pshape)
        if scale.size != n or (isinstance(zero, np.ndarray) and zero.size != n):
            got = list(zero.shape) if isinstance(zero, np.ndarray) else "one integer"
            raise WriterError(
                self.out, f"{name}: scale and zero need shape {list(pshape)}, got {list(scale.shape)} and {got}"
            )
        s_arr = self._scales(name, scale.reshape(pshape), scale_dtype)
        z_arr = self._zeros(name, zero.reshape(pshape), zero_dtype) if isinstance(zero, np.ndarray) else None
        constant = zero if z_arr is None else _one_integer(z_arr) if self.constant_zero else None
        if constant is not None:  # one integer for the tensor, in the record (10.6)
            z_arr, info = None, replace(info, zero_point=constant)
            self._check_record(info)  # its range and dtype, as the reader checks them
        stride = -(-info.numel // 64) * C.PLANE_ALIGN_BYTES
        arrays = {k: np.asarray(planes[k], np.uint8).reshape(-1) for k in info.planes}
        for k, p in arrays.items():
            if p.size != stride:
                raise WriterError(self.out, f"{name}: plane {k} must be {stride} bytes")
        plane_file = {k: None if self.single_file else k for k in arrays}
        wide = self._width_arrays(info, width_params or {})
        kept = self._kept(info, importance, sensitivity)
        planned = [
            *(_Planned(plane_entry(name, k), "U8", (stride,), stride, plane_file[k]) for k in arrays),
            _Planned(entry_name(name, C.SCALE_SUFFIX), scale_dtype, pshape, s_arr.nbytes),
        ]
        if z_arr is not None:
            planned.append(_Planned(entry_name(name, C.ZERO_SUFFIX), zero_dtype, pshape, z_arr.nbytes))
        planned += [_Planned(e, dt, a.shape, a.nbytes, f) for e, dt, a, f in wide]
        planned += [_Planned(e, dt, a.shape, a.nbytes, None, C.EXT_IMPORTANCE) for e, dt, a in kept]
        self._charge(info, planned)
        self._require(C.EXT_STACKED, info.stacked)
        self._require(C.EXT_CONSTANT_ZERO, info.zero_point is not None)
        self._require(C.EXT_WIDTH_PARAMS, bool(wide))
        for k, p in arrays.items():  # only now, so a refused tensor leaves nothing behind
            self._write_plane(k, plane_entry(name, k), p)
        self._write_base(entry_name(name, C.SCALE_SUFFIX), s_arr, scale_dtype)
        if z_arr is not None:
            self._write_base(entry_name(name, C.ZERO_SUFFIX), z_arr, zero_dtype)
        for e, dt, a, f in wide:
            self._write_width(f, e, a, dt)
        for ename, dt, a in kept:
            self._write_base(ename, a, dt)
            self._entries[ename][C.ENTRY_EXTENSION_KEY] = C.EXT_IMPORTANCE
            self._importance_kept = True
        self._tensors[name] = info

    def _kept(
        self, info: TensorInfo, importance: np.ndarray | None, sensitivity: np.ndarray | None
    ) -> list[tuple[str, str, np.ndarray]]:
        """(entry, dtype, array) of a tensor's importance and sensitivity as stored (spec 10.8); a
        sensitivity needs an importance beside it."""
        if sensitivity is not None and importance is None:
            raise WriterError(self.out, f"{info.name}: a sensitivity needs an importance beside it")
        out = []
        for part, a, shape in (
            (C.IMPORTANCE_SUFFIX, importance, info.importance_shape),
            (C.SENSITIVITY_SUFFIX, sensitivity, info.sensitivity_shape),
        ):
            if a is not None:
                out.append((entry_name(info.name, part), *self._vector(info.name, part, a, shape)))
        return out

    def _vector(self, name: str, what: str, a: np.ndarray, shape: tuple[int, ...]) -> tuple[str, np.ndarray]:
        """(dtype, array) of one 10.8 entry: F16 if given as float16, else F32; of ``shape``, every
        value finite and not negative."""
        a = np.asarray(a)
        if a.shape != shape:
            raise WriterError(self.out, f"{name}: {what} has shape {list(a.shape)}, expected {list(shape)}")
        dtype = "F16" if a.dtype == np.float16 else "F32"
        with np.errstate(over="ignore", invalid="ignore"):
            stored = a.astype(dtypes.np_dtype(dtype))
        if not np.all(np.isfinite(stored)) or stored.min(initial=0) < 0:
            raise WriterError(self.out, f"{name}: {what} must be finite and not negative")
        return dtype, _little_endian_c(stored)

    def _scales(self, name: str, scale: np.ndarray, scale_dtype: str) -> np.ndarray:
        """The scales as stored: finite, non-zero, negative only with the extension."""
        if not np.all(np.isfinite(scale)) or not np.all(scale != 0):
            raise WriterError(self.out, f"{name}: scales must be finite and non-zero")
        if np.any(scale < 0) and C.EXT_SIGNED_SCALES not in self.must_understand:
            raise WriterError(
                self.out, f"{name}: negative scales need {C.EXT_SIGNED_SCALES} in must_understand"
            )
        try:
            return dtypes.cast_exact(scale, scale_dtype)
        except ValueError as exc:
            raise WriterError(self.out, f"{name}: {exc}") from None

    def _zeros(self, name: str, zero: np.ndarray, zero_dtype: str) -> np.ndarray:
        """The zero points as a ``@zero`` entry stores them: finite, in the code range, exact in their dtype."""
        if not np.all(np.isfinite(zero)):
            raise WriterError(self.out, f"{name}: zero points must be finite")
        if zero.min(initial=0) < 0 or zero.max(initial=0) > code_max(self.code_bits):
            raise WriterError(self.out, f"{name}: zero points must lie in 0..{code_max(self.code_bits)}")
        if zero_dtype in ("U8", "U16") and np.any(zero != np.rint(zero)):
            raise WriterError(self.out, f"{name}: {zero_dtype} zero points must be integers")
        try:
            return dtypes.cast_exact(zero, zero_dtype)
        except ValueError as exc:
            raise WriterError(self.out, f"{name}: {exc}") from None

    def _require(self, extension: str, used: bool) -> None:
        """List an extension in ``must_understand`` once a tensor uses it (the base header grows)."""
        if used and extension not in self.must_understand:
            self.must_understand.append(extension)
            self._budget.fixed = self._fixed_bytes()

    def _width_arrays(self, info: TensorInfo, params: dict[int, WidthParams]) -> list[tuple]:
        """(entry, dtype, array, file key) of every per-width parameter, checked against spec 10.7:
        widths below ``c`` and not served with extra precision, shapes, finite ``d``, bounded ``sc``."""
        out = []
        for r, p in sorted(params.items()):
            if r != p.spec.bits or not 1 <= r < self.code_bits:
                raise WriterError(self.out, f"{info.name}: width parameters for {r} must be for a width in 1..{self.code_bits - 1}")
            why = check_values(p)
            if why is not None:
                raise WriterError(self.out, f"{info.name}: {why}")
            for part in p.spec.parts():
                dtype = part_dtype(part)
                want = part_shape(p.spec, part, info.shape, info.in_axis)
                a = np.asarray(getattr(p, part))
                if a.shape != want:
                    raise WriterError(self.out, f"{info.name}: width {r} {part} has shape {list(a.shape)}, expected {list(want)}")
                try:
                    stored = dtypes.cast_exact(a, dtype) if dtype == "F16" else a.astype(dtypes.np_dtype(dtype))
                except ValueError as exc:
                    raise WriterError(self.out, f"{info.name}: width {r} {part}: {exc}") from None
                key = None if self.single_file else f"w{r}"
                out.append((entry_name(info.name, part_name(r, part)), dtype, _little_endian_c(stored), key))
        return out

    def close(self) -> Path:
        """Finish every file, write the manifest, and move the checkpoint into place."""
        if self._closed:
            return self.out
        self._closed = True
        try:
            self.check_limits()  # every limit the reader enforces, before anything is published
            files = {}
            planes = sorted((k for k in self._planes if isinstance(k, int)), reverse=True)
            widths = sorted((k for k in self._planes if isinstance(k, str)), key=lambda k: int(k[1:]))
            for k in [*planes, *widths]:
                w = self._planes[k]
                w.close(_PLANE_METADATA if isinstance(k, int) else _WIDTH_METADATA)
                where = {"planes": [k]} if isinstance(k, int) else {"width": int(k[1:])}
                files[w.path.name] = {"bytes": w.path.stat().st_size, **where}
            tensors = {n: t.to_json() for n, t in self._tensors.items()}
            text = _manifest_json(self._manifest(files, tensors, self._entries))
            self._base.close(self._base_metadata(text, crc32_hex(text.encode("utf-8"))))
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
            w.abort()
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
        """Refuse a name the reader would refuse, a duplicate, or one tensor past the reader's limit."""
        if self._closed:
            raise WriterError(self.out, "writer is closed")
        try:
            check_name(name)
        except RecordError as exc:
            raise WriterError(self.out, str(exc)) from None
        if name in self._tensors:
            raise WriterError(self.out, f"duplicate tensor {name!r}")
        if len(self._tensors) >= C.MAX_TENSORS:
            raise WriterError(
                self.out, f"{name}: a checkpoint holds at most {C.MAX_TENSORS} tensors (the reader's limit)"
            )

    def _check_record(self, info: TensorInfo) -> None:
        """The manifest parser's own check of a tensor record (:func:`check_tensor`), made before writing."""
        try:
            check_tensor(info, self.code_bits)
        except RecordError as exc:
            raise WriterError(self.out, f"{info.name}: {exc}") from None

    def _manifest(self, files: dict, tensors: dict, entries: dict) -> dict:
        """The manifest as ``close`` writes it."""
        return {
            "format": C.FORMAT_NAME,
            "version": self._version(),
            "code_bits": self.code_bits,
            "must_understand": self.must_understand,
            "extensions": self.extensions,
            "files": files,
            "carried": self._carried,
            "tensors": tensors,
            "entries": entries,
            "source": self.source,
        }

    def _version(self) -> str:
        """The lowest version this checkpoint needs: 1.2 once it holds a constant zero point (10.6),
        per-width parameters (10.7) or an importance (10.8: earlier readers refuse its entry), 1.1
        once it holds a stacked tensor (10.5), else 1.0."""
        must = self.must_understand
        needs_2 = self._importance_kept or {C.EXT_CONSTANT_ZERO, C.EXT_WIDTH_PARAMS} & set(must)
        minor = 2 if needs_2 else 1 if C.EXT_STACKED in must else 0
        return f"{C.FORMAT_VERSION[0]}.{minor}"

    def _base_metadata(self, manifest_text: str, crc: str) -> dict[str, str]:
        return {
            C.METADATA_KEY_FORMAT: C.FORMAT_NAME,
            C.METADATA_KEY_ROLE: C.ROLE_BASE,
            C.METADATA_KEY_MANIFEST: manifest_text,
            C.METADATA_KEY_MANIFEST_CRC: crc,
        }

    def _fixed_bytes(self) -> int:
        """The base header's bytes without tensors, with every plane file listed at a 21-digit size
        (files appear as planes are written; source and carried files may change until close)."""
        files = {
            C.PLANE_FILENAME.format(k=k): {"bytes": 10**20, "planes": [k]}
            for k in range(0 if self.single_file else self.code_bits)
        }
        if any(C.EXT_WIDTH_PARAMS in t.extras for t in self._tensors.values()) and not self.single_file:
            files.update({C.WIDTH_FILENAME.format(r=r): {"bytes": 10**20, "width": r} for r in range(1, self.code_bits)})
        text = _manifest_json(self._manifest(files, {}, {}))
        return _json_bytes({"__metadata__": self._base_metadata(text, "0" * 8)}) + C.HEADER_ALIGN_BYTES

    def _file_writer(self, plane: int | str | None) -> SafetensorsWriter | None:
        """The writer of a plane's or a width's file (None: the base file), if it was started."""
        return self._base if plane is None else self._planes.get(plane)

    def _file_name(self, plane: int | str | None) -> str:
        if isinstance(plane, str):
            return C.WIDTH_FILENAME.format(r=int(plane[1:]))
        return C.BASE_FILENAME if plane is None else C.PLANE_FILENAME.format(k=plane)

    def _charge(self, info: TensorInfo, entries: list[_Planned]) -> None:
        """Count a tensor's records into the headers, or refuse the tensor (nothing is written yet) if
        a header would pass a limit the reader enforces: entries in a file or the manifest, bytes.

        ``entries`` come in the order they will be written. Each record is built as ``close`` will
        write it (entries at the data offsets they will get) and measured as JSON."""
        name = info.name
        try:
            tensor = _members({name: info.to_json()})
        except (TypeError, ValueError) as exc:
            raise WriterError(self.out, f"{name}: extras must be plain JSON: {exc}") from None
        records = self._header_records(entries)
        self._check_entry_counts(name, records, len(entries))
        files = {
            e.name: {"file": self._file_name(e.plane), "crc32": "0" * 8}
            | ({C.ENTRY_EXTENSION_KEY: e.extension} if e.extension else {})
            for e in entries
        }
        manifest = _escaped_bytes(tensor + _members(files))
        added = {plane: len(_members(recs).encode("utf-8")) for plane, recs in records.items()}
        b = self._budget
        base = added.pop(None, 0)
        total = b.fixed + b.manifest + manifest + b.base + base
        if total > C.MAX_HEADER_BYTES:
            raise WriterError(
                self.out,
                f"{name}: the header of {C.BASE_FILENAME} would take over {total} bytes, past the "
                f"reader's limit of {C.MAX_HEADER_BYTES} (too many tensors, or too long names)",
            )
        for k, n in added.items():
            if b.plane_meta + b.planes.get(k, 0) + n > C.MAX_HEADER_BYTES:
                raise WriterError(
                    self.out,
                    f"{name}: the header of {self._file_name(k)} would pass the reader's "
                    f"limit of {C.MAX_HEADER_BYTES} bytes",
                )
        b.manifest += manifest
        b.base += base
        for k, n in added.items():
            b.planes[k] = b.planes.get(k, 0) + n

    def _header_records(self, entries: list[_Planned]) -> dict[int | None, dict]:
        """The records each file's header gains (by plane file; None: the base file), as the
        container writes them, at the data offsets the entries will get."""
        records: dict[int | None, dict] = {}
        end: dict[int | None, int] = {}
        for e in entries:
            if e.plane not in end:
                w = self._file_writer(e.plane)
                end[e.plane] = 0 if w is None else w.data_bytes
            start = end[e.plane]
            end[e.plane] = start + e.nbytes
            records.setdefault(e.plane, {})[e.name] = {
                "dtype": e.dtype,
                "shape": list(e.shape),
                "data_offsets": [start, start + e.nbytes],
            }
        return records

    def _check_entry_counts(self, name: str, records: dict[int | None, dict], added: int) -> None:
        for plane, recs in records.items():
            w = self._file_writer(plane)
            n = (0 if w is None else w.entry_count) + len(recs)
            if n > C.MAX_ENTRIES:
                raise WriterError(
                    self.out,
                    f"{name}: {self._file_name(plane)} would hold {n} entries, over the limit of {C.MAX_ENTRIES}",
                )
        if len(self._entries) + added > C.MAX_ENTRIES:
            raise WriterError(
                self.out, f"{name}: the manifest would list over {C.MAX_ENTRIES} entries (the reader's limit)"
            )

    def check_limits(self) -> None:
        """Raise :class:`WriterError` if the checkpoint as written so far would break a limit the
        reader enforces (tensors, entries, header bytes); call before publishing.

        Every ``add_*`` already refuses a tensor that would; this recounts the fixed part of the
        base header (source, extensions, carried files), which may have changed since."""
        b = self._budget
        b.fixed = self._fixed_bytes()
        if len(self._tensors) > C.MAX_TENSORS:
            raise WriterError(self.out, f"{len(self._tensors)} tensors exceed the limit of {C.MAX_TENSORS}")
        files = [self._base, *self._planes.values()]
        if len(self._entries) > C.MAX_ENTRIES or any(w.entry_count > C.MAX_ENTRIES for w in files):
            raise WriterError(self.out, f"more than {C.MAX_ENTRIES} entries in a header (the reader's limit)")
        total = b.fixed + b.manifest + b.base
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
                    f"the header of {self._file_name(k)} would pass the reader's limit of "
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

    def _write_width(self, key: str | None, entry: str, data: np.ndarray, dtype: str) -> None:
        """A per-width parameter into its width's file (the base file in the single-file form)."""
        if key is None:
            self._write_base(entry, data, dtype)
            return
        w = self._planes.get(key)
        if w is None:
            w = self._planes[key] = SafetensorsWriter(self._tmp / self._file_name(key), reserve=4 * self._plane_reserve)
        crc = w.write(entry, data, dtype)
        self._entries[entry] = {"file": w.path.name, "crc32": crc}

    def _carry(self, src: str | os.PathLike | dict[str, Path | bytes]) -> None:
        """Copy a model folder's side files, or an explicit ``{relative name: path or bytes}`` map.

        Files are read as regular files of bounded size (a FIFO or ``/dev/zero`` is refused)."""
        where = self.out
        if not isinstance(src, dict):
            root = where = Path(src)
            src = {p.relative_to(root).as_posix(): p for p in carried_sources(root)}
        total = sum(len(p) if isinstance(p, bytes) else os.stat(p).st_size for p in src.values())
        if total > C.CARRY_TOTAL_MAX_BYTES:  # before a byte is read: links to one sparse file add up
            raise WriterError(
                where,
                f"its side files (config, tokenizer, ...) come to {total} bytes in {len(src)} files, more "
                f"than the {C.CARRY_TOTAL_MAX_BYTES} bytes a checkpoint carries; move what the model does "
                "not need out of the folder",
            )
        reserved = {
            C.BASE_FILENAME,
            *(C.PLANE_FILENAME.format(k=k) for k in range(C.MAX_CODE_BITS_SPEC)),
            *(C.WIDTH_FILENAME.format(r=r) for r in range(1, C.MAX_CODE_BITS_SPEC + 1)),
        }
        for rel, p in src.items():
            if not isinstance(rel, str) or not safe_relpath(rel) or rel.split("/")[0] in reserved:
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
