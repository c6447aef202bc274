"""The manifest: the JSON document in the base file that says what every tensor is and where it lives.

Validation here is the normative reading of spec/v1 ("Manifest"); spec/v1/manifest.schema.json
describes the same document for other implementations and is checked against it in tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import constants as C
from .container import gc_paused, strict_json
from .dtypes import cast_exact
from .errors import HeaderError, LimitError, UnsupportedVersionError
from .numerics import code_max, importance_shape, n_groups, param_shape, planes_needed, sensitivity_shape
from .widths import WidthSpec, parse_record, part_dtype, part_name, part_shape


@dataclass(frozen=True)
class TensorInfo:
    """What the manifest says of one tensor."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    granularity: str | None = None
    group_size: int | None = None
    scheme: str | None = None
    scale_dtype: str | None = None
    zero_dtype: str | None = None
    extra_precision: tuple[int, ...] = ()
    planes: tuple[int, ...] = ()
    extras: dict = field(default_factory=dict, compare=False, repr=False)
    input_axis: int | None = None
    """The axis of input features (spec 10.5); None: the last, as in a linear weight [out, in]."""
    zero_point: int | None = None
    """One zero point for the whole tensor (spec 10.6), stored in the record; None: a ``@zero`` entry."""

    @property
    def quantized(self) -> bool:
        return self.kind == C.KIND_QUANTIZED

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def in_axis(self) -> int:
        """The axis groups run along: ``input_axis``, or the last one."""
        return len(self.shape) - 1 if self.input_axis is None else self.input_axis

    @property
    def stacked(self) -> bool:
        """A quantized tensor that needs ``matq.stacked`` (10.5): not a plain ``[out, in]`` matrix."""
        return self.quantized and (len(self.shape) != 2 or self.in_axis != len(self.shape) - 1)

    @property
    def param_parts(self) -> tuple[str, ...]:
        """Entry parts holding the quantization parameters: scale, and zero unless it is a constant."""
        return (C.SCALE_SUFFIX,) if self.zero_point is not None else (C.SCALE_SUFFIX, C.ZERO_SUFFIX)

    @property
    def zero_bytes(self) -> int:
        """Bytes stored per zero point: none when the record holds one for the whole tensor."""
        return 0 if self.zero_point is not None else C.DTYPES[self.zero_dtype][1]

    @property
    def cols(self) -> int:
        """Input features: the length of each row of the matrix view (``numerics.as_matrix``)."""
        return self.shape[self.in_axis]

    @property
    def rows(self) -> int:
        """Rows of the matrix view: every element but the input axis, folded together."""
        return math.prod(d for i, d in enumerate(self.shape) if i != self.in_axis)

    @property
    def groups(self) -> int:
        return n_groups(self.cols, self.group_size)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of the scale and zero entries: ``[rows, groups]`` for a matrix (section 6, 10.5)."""
        return param_shape(self.shape, self.group_size, self.in_axis)

    @property
    def importance_shape(self) -> tuple[int, ...]:
        """Shape of the ``@importance`` entry (10.8): the shape without the output axis."""
        return importance_shape(self.shape, self.in_axis)

    @property
    def sensitivity_shape(self) -> tuple[int, ...]:
        """Shape of the ``@sensitivity`` entry (10.8): the shape without the input axis."""
        return sensitivity_shape(self.shape, self.in_axis)

    def width_specs(self, code_bits: int) -> dict[int, WidthSpec]:
        """The widths that carry their own block parameters (spec 10.7), by width; {} if none."""
        value = self.extras.get(C.EXT_WIDTH_PARAMS)
        return {} if value is None else parse_record(value, code_bits)

    def width_entries(self, code_bits: int):
        """(width, entry name, dtype, shape) of every per-width parameter entry of this tensor."""
        for r, spec in self.width_specs(code_bits).items():
            for p in spec.parts():
                shape = part_shape(spec, p, self.shape, self.in_axis)
                yield r, entry_name(self.name, part_name(r, p)), part_dtype(p), shape

    def max_width(self, code_bits: int) -> int:
        """Widest slice the present planes serve (0 if none)."""
        for r in range(code_bits, 0, -1):
            if set(planes_needed(code_bits, r)) <= set(self.planes):
                return r
        return 0

    def to_json(self) -> dict:
        d: dict = {"kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}
        if self.quantized:
            d.update(
                granularity=self.granularity,
                group_size=self.group_size,
                scheme=self.scheme,
                scale_dtype=self.scale_dtype,
                zero_dtype=self.zero_dtype,
                extra_precision=list(self.extra_precision),
                planes=list(self.planes),
            )
            if self.stacked:
                d["input_axis"] = self.in_axis
            if self.zero_point is not None:
                d[C.ZERO_POINT_KEY] = self.zero_point
        d.update(self.extras)
        return d


def entry_name(tensor: str, part: str) -> str:
    """``<tensor>@plane7``, ``<tensor>@scale``, ``<tensor>@zero``."""
    return f"{tensor}{C.ENTRY_SEP}{part}"


def plane_entry(tensor: str, k: int) -> str:
    return entry_name(tensor, C.PLANE_SUFFIX.format(k=k))


# --- the one check of a tensor record: the writer makes it before writing, the parser after reading ---
class RecordError(ValueError):
    """A tensor's name or record breaks a rule of spec/v1 ("Tensors"). The writer and the manifest
    parser raise it again as their own typed error; ``limit`` marks a size limit, not a malformed value."""

    def __init__(self, message: str, *, limit: bool = False):
        super().__init__(message)
        self.limit = limit


def _shown(name) -> str:
    """A tensor name as messages show it: quoted, cut after 64 characters."""
    return f"{name[:64]!r}..." if isinstance(name, str) and len(name) > 64 else repr(name)


def check_name(name) -> None:
    """The rules of a tensor name; raises :class:`RecordError`."""
    if not isinstance(name, str) or not name or C.ENTRY_SEP in name or name == "__metadata__":
        raise RecordError(f"tensor name {_shown(name)} must be a non-empty string free of '@', not __metadata__")
    try:
        nbytes = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        raise RecordError(f"tensor name {_shown(name)} is not valid Unicode") from None
    if nbytes > C.MAX_NAME_BYTES:
        raise RecordError(
            f"tensor name {_shown(name)} is {nbytes} bytes of UTF-8, over the limit of {C.MAX_NAME_BYTES}",
            limit=True,
        )


def check_tensor(info: TensorInfo, code_bits: int) -> None:
    """The rules of one tensor's record but its name (kind, dtype, shape, quantization parameters,
    planes); raises :class:`RecordError`. ``info`` holds the values as given: nothing is coerced."""
    if not _one_of(info.kind, C.KINDS):
        raise RecordError(f"unknown kind {info.kind!r}")
    if not _one_of(info.dtype, C.DTYPES):
        raise RecordError(f"unknown dtype {info.dtype!r} (known: {', '.join(C.DTYPES)})")
    _check_shape(info.shape)
    if info.quantized:
        _check_quantized(info, code_bits)


def _one_of(value, allowed) -> bool:
    return isinstance(value, str) and value in allowed


def _is_int(v) -> bool:
    """An integer as JSON writes one: ``True`` and ``1.0`` are none."""
    return isinstance(v, int) and not isinstance(v, bool)


def _distinct_ints(values, lo: int, hi: int) -> bool:
    """Distinct integers in ``lo..hi``."""
    return all(_is_int(v) and lo <= v <= hi for v in values) and len(set(values)) == len(values)


def _check_shape(shape: tuple) -> None:
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise RecordError(f"malformed shape {str(list(shape))[:80]}: dimensions are non-negative integers")
    if len(shape) > C.MAX_DIMS:
        raise RecordError(f"shape has {len(shape)} dimensions, over the limit of {C.MAX_DIMS}")
    if any(d > C.MAX_DIM_SIZE for d in shape):
        raise RecordError(
            f"shape {list(shape)} passes the limits of {C.MAX_DIMS} dimensions of at most {C.MAX_DIM_SIZE}"
        )


def _check_quantized(t: TensorInfo, code_bits: int) -> None:
    if len(t.shape) < 2:
        raise RecordError(f"quantized tensors have 2 or more dimensions, got shape {list(t.shape)}")
    last = len(t.shape) - 1
    if t.input_axis is not None and (not _is_int(t.input_axis) or t.input_axis not in (last - 1, last)):
        raise RecordError(f"input_axis {t.input_axis!r} must be {last - 1} or {last} for shape {list(t.shape)}")
    if t.dtype not in C.QUANTIZABLE_DTYPES:
        raise RecordError(f"source dtype {t.dtype} cannot be quantized (only {', '.join(C.QUANTIZABLE_DTYPES)})")
    if not _one_of(t.granularity, C.GRANULARITIES):
        raise RecordError(f"unknown granularity {t.granularity!r}")
    if t.granularity == C.GRANULARITY_CHANNEL and t.group_size is not None:
        raise RecordError("channel granularity takes no group_size")
    if t.granularity == C.GRANULARITY_GROUP and (not _is_int(t.group_size) or t.group_size < 1):
        raise RecordError(f"group_size {t.group_size!r} must be a positive integer")
    if t.granularity == C.GRANULARITY_GROUP and t.group_size > C.MAX_DIM_SIZE:
        raise RecordError(f"group_size {t.group_size} exceeds the limit of {C.MAX_DIM_SIZE}")
    if not _one_of(t.scheme, C.SCHEMES):
        raise RecordError(f"unknown scheme {t.scheme!r} (known: {', '.join(C.SCHEMES)})")
    if not _one_of(t.scale_dtype, C.SCALE_DTYPES):
        raise RecordError(f"scale_dtype {t.scale_dtype!r} is not one of {', '.join(C.SCALE_DTYPES)}")
    if not _one_of(t.zero_dtype, C.ZERO_DTYPES):
        raise RecordError(f"zero_dtype {t.zero_dtype!r} is not one of {', '.join(C.ZERO_DTYPES)}")
    if not _distinct_ints(t.extra_precision, 1, code_bits - 1):
        raise RecordError(f"extra_precision must list distinct widths in 1..{code_bits - 1}")
    if not _distinct_ints(t.planes, 0, code_bits - 1):
        raise RecordError(f"planes must list distinct plane indices in 0..{code_bits - 1}")
    if t.zero_point is not None:
        _check_zero_point(t.zero_point, t.zero_dtype, code_bits)
    try:
        t.width_specs(code_bits)
    except ValueError as exc:
        raise RecordError(str(exc)) from None


def _check_zero_point(z, zero_dtype: str, code_bits: int) -> None:
    """A constant zero point (10.6): an integer code, which a ``zero_dtype`` entry would hold exactly."""
    if not _is_int(z) or not 0 <= z <= code_max(code_bits):
        raise RecordError(f"{C.ZERO_POINT_KEY} {str(z)[:40]} must be an integer in 0..{code_max(code_bits)}")
    try:
        cast_exact(np.array([z], np.float32), zero_dtype)
    except ValueError:
        raise RecordError(f"{C.ZERO_POINT_KEY} {z} is not exactly representable in zero_dtype {zero_dtype}") from None


_VERSION_RE = re.compile(r"[0-9]{1,9}\.[0-9]{1,9}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_CRC_RE = re.compile(r"[0-9a-f]{8}")


def parse_version(path: Path, text) -> tuple[int, int]:
    if not isinstance(text, str) or not _VERSION_RE.fullmatch(text):
        raise HeaderError(path, f"version {str(text)[:40]!r} is not MAJOR.MINOR")
    major, minor = (int(p) for p in text.split("."))
    if major != C.FORMAT_VERSION[0]:
        raise UnsupportedVersionError(
            path, f"format major version {major} is not supported (this reader reads {C.FORMAT_VERSION[0]}.x)"
        )
    return major, minor


def _req(path: Path, d: dict, key: str, types, where: str):
    if key not in d:
        raise HeaderError(path, f"{where}: missing {key!r}")
    v = d[key]
    if (
        not isinstance(v, types)
        or isinstance(v, bool)
        and bool not in (types if isinstance(types, tuple) else (types,))
    ):
        raise HeaderError(path, f"{where}: {key!r} has the wrong type")
    return v


def parse_manifest(
    path: Path, text: str, understood: frozenset[str] = frozenset()
) -> tuple[dict, dict[str, TensorInfo]]:
    """Validate the manifest JSON; returns it and the tensors as :class:`TensorInfo`."""
    try:
        m = strict_json(text)
    except (ValueError, RecursionError):
        raise HeaderError(path, "manifest is not valid JSON") from None
    if not isinstance(m, dict):
        raise HeaderError(path, "manifest is not a JSON object")
    if m.get("format") != C.FORMAT_NAME:
        raise HeaderError(path, f"manifest format is {m.get('format')!r}, expected 'matq'")
    parse_version(path, m.get("version"))
    must = m.get("must_understand", [])
    if not isinstance(must, list) or not all(isinstance(x, str) for x in must):
        raise HeaderError(path, "must_understand must be a list of extension names")
    ext = m.get("extensions", {})
    if not isinstance(ext, dict):
        raise HeaderError(path, "extensions must be an object")
    badname = [x for x in [*must, *ext] if not C.EXTENSION_NAME_RE.match(x)]
    if badname:
        raise HeaderError(path, f"extension name {badname[0]!r} does not match {C.EXTENSION_NAME_RE.pattern}")
    unknown = [x for x in must if x not in understood]
    if unknown:
        raise UnsupportedVersionError(
            path, f"requires extensions this reader does not understand: {', '.join(unknown)}"
        )
    c = _req(path, m, "code_bits", int, "manifest")
    if not C.MIN_CODE_BITS <= c <= C.MAX_CODE_BITS_SPEC:
        raise HeaderError(path, f"code_bits {c} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_SPEC}")
    if c > C.MAX_CODE_BITS_IMPL:
        raise UnsupportedVersionError(
            path, f"code_bits {c} > {C.MAX_CODE_BITS_IMPL} is not supported by this reader"
        )
    files = _req(path, m, "files", dict, "manifest")
    for fname, finfo in files.items():
        if not _safe_relname(fname) or fname == C.BASE_FILENAME:
            raise HeaderError(path, f"file name {fname!r} must be a plain name in the checkpoint folder")
        if not isinstance(finfo, dict) or type(finfo.get("bytes")) is not int or finfo["bytes"] < 0:
            raise HeaderError(path, f"file {fname!r} needs an integer 'bytes'")
        if "planes" in finfo and not _index_list(finfo["planes"], c):
            raise HeaderError(
                path, f"file {fname!r}: planes must list distinct plane indices below code_bits"
            )
    carried = m.get("carried", {})
    if not isinstance(carried, dict):
        raise HeaderError(path, "carried must be an object")
    for rel, cinfo in carried.items():
        if not safe_relpath(rel) or rel == C.BASE_FILENAME or rel in files:
            raise HeaderError(path, f"carried file {rel!r} must be a relative path inside the checkpoint")
        if (
            not isinstance(cinfo, dict)
            or type(cinfo.get("bytes")) is not int
            or cinfo["bytes"] < 0
            or not isinstance(cinfo.get("sha256"), str)
            or not _SHA256_RE.fullmatch(cinfo["sha256"])
        ):
            raise HeaderError(path, f"carried file {rel!r} needs an integer 'bytes' and a hex 'sha256'")
    for key in ("source", "extensions"):
        if not isinstance(m.get(key, {}), dict):
            raise HeaderError(path, f"{key} must be an object")
    tensors = _req(path, m, "tensors", dict, "manifest")
    entries = _req(path, m, "entries", dict, "manifest")
    if len(tensors) > C.MAX_TENSORS:
        raise LimitError(path, f"{len(tensors)} tensors exceed the limit of {C.MAX_TENSORS}")
    if len(entries) > C.MAX_ENTRIES:
        raise LimitError(path, f"{len(entries)} entries exceed the limit of {C.MAX_ENTRIES}")
    # Every entry then holds one shared string per file name rather than a parsed copy of its own.
    fnames = {C.BASE_FILENAME: C.BASE_FILENAME, **{f: f for f in files}}
    for ename, e in entries.items():
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("file"), str)
            or not isinstance(e.get("crc32"), str)
        ):
            raise HeaderError(path, f"entry {ename!r} needs 'file' and 'crc32'")
        if len(e["crc32"]) != 8 or not _CRC_RE.fullmatch(e["crc32"]):
            raise HeaderError(path, f"entry {ename!r} has a malformed crc32")
        ext_name = e.get(C.ENTRY_EXTENSION_KEY)
        if ext_name is not None and not (isinstance(ext_name, str) and C.EXTENSION_NAME_RE.match(ext_name)):
            raise HeaderError(path, f"entry {ename!r}: {C.ENTRY_EXTENSION_KEY} must be an extension name")
        fname = fnames.get(e["file"])
        if fname is None:
            raise HeaderError(
                path, f"entry {ename!r} names file {e['file']!r}, which the manifest does not list"
            )
        e["file"] = fname
    with gc_paused():
        infos = {name: _parse_tensor(path, name, t, c) for name, t in tensors.items()}
    stacked = next((n for n, t in infos.items() if t.stacked), None)
    if stacked is not None and C.EXT_STACKED not in must:
        raise HeaderError(path, f"tensor {_shown(stacked)}: a stacked tensor needs {C.EXT_STACKED} in must_understand")
    constant = next((n for n, t in infos.items() if t.zero_point is not None), None)
    if constant is not None and C.EXT_CONSTANT_ZERO not in must:
        raise HeaderError(
            path, f"tensor {_shown(constant)}: a {C.ZERO_POINT_KEY} needs {C.EXT_CONSTANT_ZERO} in must_understand"
        )
    widths = next((n for n, t in infos.items() if C.EXT_WIDTH_PARAMS in t.extras), None)
    if widths is not None and C.EXT_WIDTH_PARAMS not in must:
        raise HeaderError(path, f"tensor {_shown(widths)}: per-width parameters need {C.EXT_WIDTH_PARAMS} in must_understand")
    for fname, finfo in files.items():
        w = finfo.get("width")
        if w is not None and not (_is_int(w) and 1 <= w < c):
            raise HeaderError(path, f"file {fname!r}: width must be an integer in 1..{c - 1}")
    return m, infos


def _index_list(v, code_bits: int) -> bool:
    """A list of distinct plane indices in 0..code_bits-1."""
    return isinstance(v, list) and _distinct_ints(v, 0, code_bits - 1)


def safe_relpath(rel: str) -> bool:
    """``tokenizer.json`` or ``sub/file``: no absolute paths, no ``..``, no hidden parts."""
    return bool(rel) and "\\" not in rel and all(_safe_relname(part) for part in rel.split("/"))


def _safe_relname(name: str) -> bool:
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and not name.startswith(".")
    )


def _parse_tensor(path: Path, name: str, t, code_bits: int) -> TensorInfo:
    """One tensor of the manifest, checked by :func:`check_name` and :func:`check_tensor` as the
    writer checks it before writing."""
    try:
        check_name(name)
    except RecordError as exc:
        raise (LimitError if exc.limit else HeaderError)(path, str(exc)) from None
    where = f"tensor {_shown(name)}"
    if not isinstance(t, dict):
        raise HeaderError(path, f"{where}: not an object")
    info = _record(path, name, t, where)
    try:
        check_tensor(info, code_bits)
    except RecordError as exc:
        raise HeaderError(path, f"{where}: {exc}") from None
    return info if not info.quantized else replace(info, planes=tuple(sorted(info.planes, reverse=True)))


_DENSE_KEYS = frozenset(("kind", "dtype", "shape"))
_QUANTIZED_KEYS = _DENSE_KEYS | {
    "granularity", "group_size", "scheme", "scale_dtype", "zero_dtype", "extra_precision", "planes",
    "input_axis", C.ZERO_POINT_KEY,
}


def _record(path: Path, name: str, t: dict, where: str) -> TensorInfo:
    """A tensor record's values as JSON gave them, each key present and of its JSON type."""
    kind = _req(path, t, "kind", str, where)
    dtype = _req(path, t, "dtype", str, where)
    shape = tuple(_req(path, t, "shape", list, where))
    if kind != C.KIND_QUANTIZED:
        return TensorInfo(name, kind, shape, dtype, extras=_extras(t, _DENSE_KEYS))
    return TensorInfo(
        name,
        kind,
        shape,
        dtype,
        _req(path, t, "granularity", str, where),
        t.get("group_size"),
        _req(path, t, "scheme", str, where),
        _req(path, t, "scale_dtype", str, where),
        _req(path, t, "zero_dtype", str, where),
        tuple(_req(path, t, "extra_precision", list, where)),
        tuple(_req(path, t, "planes", list, where)),
        extras=_extras(t, _QUANTIZED_KEYS),
        input_axis=t.get("input_axis"),
        zero_point=t.get(C.ZERO_POINT_KEY),
    )


def _extras(t: dict, known: frozenset[str]) -> dict:
    return {k: v for k, v in t.items() if k not in known}
