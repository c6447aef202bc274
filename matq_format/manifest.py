"""The manifest: the JSON document in the base file that says what every tensor is and where it lives.

Validation here is the normative reading of spec/v1 ("Manifest"); spec/v1/manifest.schema.json
describes the same document for other implementations and is checked against it in tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import constants as C
from .container import gc_paused, strict_json
from .errors import HeaderError, LimitError, UnsupportedVersionError
from .numerics import n_groups, planes_needed


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

    @property
    def quantized(self) -> bool:
        return self.kind == C.KIND_QUANTIZED

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def groups(self) -> int:
        return n_groups(self.shape[1], self.group_size)

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
        d.update(self.extras)
        return d


def entry_name(tensor: str, part: str) -> str:
    """``<tensor>@plane7``, ``<tensor>@scale``, ``<tensor>@zero``."""
    return f"{tensor}{C.ENTRY_SEP}{part}"


def plane_entry(tensor: str, k: int) -> str:
    return entry_name(tensor, C.PLANE_SUFFIX.format(k=k))


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
        if not _safe_relpath(rel) or rel == C.BASE_FILENAME or rel in files:
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
        fname = fnames.get(e["file"])
        if fname is None:
            raise HeaderError(
                path, f"entry {ename!r} names file {e['file']!r}, which the manifest does not list"
            )
        e["file"] = fname
    with gc_paused():
        infos = {name: _parse_tensor(path, name, t, c) for name, t in tensors.items()}
    return m, infos


def _index_list(v, code_bits: int) -> bool:
    """A list of distinct plane indices (or widths) in 0..code_bits-1."""
    return (
        isinstance(v, list)
        and all(type(k) is int and 0 <= k < code_bits for k in v)
        and len(set(v)) == len(v)
    )


def _safe_relpath(rel: str) -> bool:
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
    where = f"tensor {name!r}"
    if not isinstance(t, dict):
        raise HeaderError(path, f"{where}: not an object")
    if not name or C.ENTRY_SEP in name:
        raise HeaderError(path, f"{where}: names must be non-empty and free of '@'")
    if len(name) > C.MAX_NAME_BYTES // 4 and len(name.encode("utf-8", "surrogatepass")) > C.MAX_NAME_BYTES:
        raise LimitError(path, f"tensor {name[:64]!r}...: name longer than {C.MAX_NAME_BYTES} bytes of UTF-8")
    kind = _req(path, t, "kind", str, where)
    if kind not in C.KINDS:
        raise HeaderError(path, f"{where}: unknown kind {kind!r}")
    dtype = _req(path, t, "dtype", str, where)
    if dtype not in C.DTYPES:
        raise HeaderError(path, f"{where}: unknown dtype {dtype!r}")
    shape = _req(path, t, "shape", list, where)
    if not all(type(d) is int and 0 <= d <= C.MAX_DIM_SIZE for d in shape) or len(shape) > C.MAX_DIMS:
        raise HeaderError(path, f"{where}: malformed shape")
    known = {"kind", "dtype", "shape"}
    if kind == C.KIND_DENSE:
        return TensorInfo(
            name, kind, tuple(shape), dtype, extras={k: v for k, v in t.items() if k not in known}
        )
    known |= {"granularity", "group_size", "scheme", "scale_dtype", "zero_dtype", "extra_precision", "planes"}
    if len(shape) != 2:
        raise HeaderError(path, f"{where}: quantized tensors are 2-D")
    if dtype not in C.QUANTIZABLE_DTYPES:
        raise HeaderError(path, f"{where}: source dtype {dtype} cannot be quantized")
    gran = _req(path, t, "granularity", str, where)
    if gran not in C.GRANULARITIES:
        raise HeaderError(path, f"{where}: unknown granularity {gran!r}")
    gs = t.get("group_size")
    if gran == C.GRANULARITY_GROUP:
        if type(gs) is not int or not 1 <= gs <= C.MAX_DIM_SIZE:
            raise HeaderError(path, f"{where}: group granularity needs a positive integer group_size")
    elif gs is not None:
        raise HeaderError(path, f"{where}: channel granularity takes no group_size")
    scheme = _req(path, t, "scheme", str, where)
    if scheme not in C.SCHEMES:
        raise HeaderError(path, f"{where}: unknown scheme {scheme!r}")
    sd = _req(path, t, "scale_dtype", str, where)
    zd = _req(path, t, "zero_dtype", str, where)
    if sd not in C.SCALE_DTYPES or zd not in C.ZERO_DTYPES:
        raise HeaderError(path, f"{where}: bad scale_dtype or zero_dtype")
    ep = _req(path, t, "extra_precision", list, where)
    if not all(type(r) is int and 1 <= r < code_bits for r in ep) or len(set(ep)) != len(ep):
        raise HeaderError(path, f"{where}: extra_precision must list distinct widths below code_bits")
    planes = _req(path, t, "planes", list, where)
    if not _index_list(planes, code_bits):
        raise HeaderError(path, f"{where}: planes must list distinct plane indices below code_bits")
    return TensorInfo(
        name,
        kind,
        tuple(shape),
        dtype,
        gran,
        gs,
        scheme,
        sd,
        zd,
        tuple(ep),
        tuple(sorted(planes, reverse=True)),
        extras={k: v for k, v in t.items() if k not in known},
    )
