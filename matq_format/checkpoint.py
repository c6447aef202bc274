"""Memory-mapped reader: opens a checkpoint, validates it, and reads only the planes a width needs."""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np

from . import constants as C
from . import dtypes, numerics
from .container import FileHeader, crc32_hex, file_identity, read_header
from .errors import (
    BadMagicError,
    BadParameterError,
    ChecksumError,
    FileChangedError,
    FormatError,
    HeaderError,
    LimitError,
    MissingFileError,
    MissingPlanesError,
    OffsetError,
    ShapeTooLargeError,
    TruncatedFileError,
    UnknownTensorError,
    WidthError,
)
from .manifest import TensorInfo, entry_name, parse_manifest, plane_entry
from .planes import plane_stride, unpack
from .publish import scratch_dir
from .safefs import allowed_roots, check_file, open_regular, parse_json
from .widths import WidthParams, check_values, part_name

UNDERSTOOD_EXTENSIONS: frozenset[str] = frozenset(
    {C.EXT_SIGNED_SCALES, C.EXT_STACKED, C.EXT_CONSTANT_ZERO, C.EXT_WIDTH_PARAMS, C.EXT_IMPORTANCE}
)


def resolve_base(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        base = p / C.BASE_FILENAME
        if not base.exists():
            raise MissingFileError(p, f"folder has no {C.BASE_FILENAME}; is it a matq checkpoint?")
        return base
    if not p.exists():
        raise MissingFileError(p, "no such file or folder")
    return p


class Checkpoint:
    """A matq checkpoint, opened read-only. Use :func:`open`."""

    def __init__(self, path: str | os.PathLike, *, verify_reads: bool = True, partial: bool = False):
        self.path = resolve_base(path)
        self.partial = partial
        self.missing_files: set[str] = set()
        self.root = self.path.parent
        self._roots = allowed_roots(self.root)
        self._opened_folder = Path(path).is_dir()
        self.verify_reads = verify_reads
        if self._opened_folder:  # the base file is read under the folder's link rules, as planes are
            check_file(self.path, self._roots)
        base = read_header(self.path)
        meta = base.metadata
        if meta.get(C.METADATA_KEY_FORMAT) != C.FORMAT_NAME or C.METADATA_KEY_MANIFEST not in meta:
            raise BadMagicError(self.path, "a safetensors file, but not a matq checkpoint (no matq manifest)")
        text = meta[C.METADATA_KEY_MANIFEST]
        crc = crc32_hex(text.encode("utf-8"))
        if meta.get(C.METADATA_KEY_MANIFEST_CRC) != crc:
            raise ChecksumError(self.path, "manifest does not match its CRC-32")
        self.manifest, self._infos = parse_manifest(self.path, text, UNDERSTOOD_EXTENSIONS)
        self.manifest_text = text
        named_directly = not self._opened_folder
        if named_directly and (self.manifest["files"] or self.manifest.get("carried")):  # a folder's base
            check_file(self.path, self._roots)
        self.code_bits: int = self.manifest["code_bits"]
        self.version: str = self.manifest["version"]
        self._headers: dict[str, FileHeader] = {C.BASE_FILENAME: base}
        self._maps: dict[str, np.ndarray] = {}
        self._verified: set[str] = set()
        self._fallback_said = False
        self._open_files()
        self._cross_check()
        if self.missing_files:
            self._drop_missing_planes()

    # --- structure ------------------------------------------------------------------------------
    def _open_files(self) -> None:
        for fname, finfo in self.manifest["files"].items():
            p = self.root / fname
            if not p.is_file():
                if self.partial and not p.exists():
                    self.missing_files.add(fname)
                    continue
                raise MissingFileError(p, "listed in the manifest but missing (or not a file)")
            check_file(p, self._roots)
            size = p.stat().st_size
            if size < finfo["bytes"]:
                raise TruncatedFileError(p, f"is {size} bytes, the manifest says {finfo['bytes']}")
            if size != finfo["bytes"]:
                raise FormatError(p, f"is {size} bytes, the manifest says {finfo['bytes']}")
            h = read_header(p)
            if h.metadata.get(C.METADATA_KEY_FORMAT) != C.FORMAT_NAME:
                raise BadMagicError(p, "not a matq plane file")
            self._headers[fname] = h

    def _cross_check(self) -> None:
        """Every entry the manifest names exists with the right dtype and shape; nothing else does."""
        listed = self.manifest["entries"]
        for fname, h in self._headers.items():
            for ename in h.entries:
                le = listed.get(ename)
                if le is None or le["file"] != fname:
                    raise HeaderError(h.path, f"entry {ename!r} is not listed in the manifest for this file")
        # Extension entries (5.6) are outside the entry set: checked here if known, else ignored.
        ext = [e for e, rec in listed.items() if C.ENTRY_EXTENSION_KEY in rec]
        self._importance: dict[str, str] = {}
        self._sensitivity: dict[str, str] = {}
        for ename in ext:
            self._extension_entry(ename, listed[ename])
        lone = sorted(set(self._sensitivity) - set(self._importance))
        if lone:
            raise HeaderError(self.path, f"entry {self._sensitivity[lone[0]]!r} has no {lone[0]}@importance beside it")
        # Expected entries are made one at a time, never all at once: a checkpoint may have millions.
        n = 0
        for ename, _, _ in self._expected_entries():
            if ename not in listed or C.ENTRY_EXTENSION_KEY in listed[ename]:
                self._entries_mismatch()
            n += 1
        if n != len(listed) - len(ext):  # expected names are distinct and all listed: some are extra
            self._entries_mismatch()
        for ename, dtype, shape in self._expected_entries():
            fname = listed[ename]["file"]
            if not ename.partition(C.ENTRY_SEP)[2].startswith(("plane", "w")) and fname != C.BASE_FILENAME:
                raise HeaderError(self.path, f"entry {ename!r} must live in the base file, not {fname!r}")
            if fname in self.missing_files:
                continue
            e = self._headers[fname].entries.get(ename)
            if e is None:
                raise HeaderError(self._fpath(fname), f"entry {ename!r} is missing")
            if e.dtype != dtype or e.shape != shape:
                raise HeaderError(
                    self._fpath(fname),
                    f"entry {ename!r} is {e.dtype}{list(e.shape)}, expected {dtype}{list(shape)}",
                )

    def _expected_entries(self) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        """(entry name, dtype, shape) of every entry the manifest's tensors call for (section 6)."""
        for name, t in self._infos.items():
            if not t.quantized:
                yield name, t.dtype, t.shape
                continue
            stride = (plane_stride(t.numel),)
            for k in t.planes:
                yield plane_entry(name, k), "U8", stride
            g = t.param_shape
            yield entry_name(name, C.SCALE_SUFFIX), t.scale_dtype, g
            if C.ZERO_SUFFIX in t.param_parts:
                yield entry_name(name, C.ZERO_SUFFIX), t.zero_dtype, g
            for _, ename, dtype, shape in t.width_entries(self.code_bits):
                yield ename, dtype, shape

    def _extension_entry(self, ename: str, rec: dict) -> None:
        """An entry of an extension (5.6): ``matq.importance``'s are checked (10.8), an unknown
        extension's are left alone, as long as they name a tensor of this checkpoint."""
        tensor, _, part = ename.partition(C.ENTRY_SEP)
        ext = rec[C.ENTRY_EXTENSION_KEY]
        if tensor not in self._infos or not part:
            raise HeaderError(self.path, f"entry {ename!r} of extension {ext} names no tensor of this checkpoint")
        if ext not in UNDERSTOOD_EXTENSIONS:
            return
        t = self._infos[tensor]
        kept = {C.IMPORTANCE_SUFFIX: (self._importance, t.importance_shape)}
        kept[C.SENSITIVITY_SUFFIX] = (self._sensitivity, t.sensitivity_shape)
        if ext != C.EXT_IMPORTANCE or part not in kept or not t.quantized:
            raise HeaderError(self.path, f"entry {ename!r}: {ext} defines no such entry")
        if rec["file"] != C.BASE_FILENAME:
            raise HeaderError(self.path, f"entry {ename!r} must live in the base file, not {rec['file']!r}")
        e = self._headers[C.BASE_FILENAME].entries.get(ename)
        if e is None:
            raise HeaderError(self.path, f"entry {ename!r} is missing")
        found, shape = kept[part]
        if e.dtype not in C.IMPORTANCE_DTYPES or e.shape != shape:
            raise HeaderError(
                self.path, f"entry {ename!r} is {e.dtype}{list(e.shape)}, expected F16 or F32 {list(shape)}"
            )
        found[tensor] = ename

    def _entries_mismatch(self) -> NoReturn:
        expected = {e for e, _, _ in self._expected_entries()}
        listed = {e for e, rec in self.manifest["entries"].items() if C.ENTRY_EXTENSION_KEY not in rec}
        extra = sorted(listed - expected)[:3]
        missing = sorted(expected - listed)[:3]
        raise HeaderError(
            self.path, f"manifest entries do not match its tensors (extra {extra}, missing {missing})"
        )

    def _drop_missing_planes(self) -> None:
        """Partial view (e.g. a width-selective download): planes in absent files are not served."""
        entries = self.manifest["entries"]
        for name, t in self._infos.items():
            if not t.quantized:
                continue
            for part in t.param_parts:
                if entries[entry_name(name, part)]["file"] in self.missing_files:
                    raise MissingFileError(self.path, f"{name}: its {part} lives in a missing file")
            kept = tuple(
                k for k in t.planes if entries[plane_entry(name, k)]["file"] not in self.missing_files
            )
            self._infos[name] = dataclasses.replace(t, planes=kept)

    def _raw(self, ename: str) -> np.ndarray:
        """The bytes of one entry (memory-mapped), checked against its CRC-32 on first read."""
        fname = self.manifest["entries"][ename]["file"]
        h = self._headers[fname]
        e = h.entries[ename]
        data = self._map(fname)[h.data_start + e.start : h.data_start + e.end]
        if self.verify_reads and ename not in self._verified:
            self._check_crc(ename, data)
        return data

    def _map(self, fname: str) -> np.ndarray:
        """The whole file, memory-mapped once; a file gone, or changed since open, is a typed error."""
        mm = self._maps.get(fname)
        if mm is None:
            h = self._headers[fname]
            try:
                with builtins.open(h.path, "rb") as f:  # the very file mapped is the one compared
                    now = file_identity(os.fstat(f.fileno()))
                    mm = np.memmap(f, dtype=np.uint8, mode="r") if now[0] else np.zeros(0, np.uint8)
            except OSError as exc:
                raise MissingFileError(h.path, f"cannot be read: {exc.strerror or exc}") from None
            _check_unchanged(h, now)
            self._maps[fname] = mm
        return mm

    def _private_float32(self, name: str) -> np.ndarray:
        """A float32 tensor (checked by :meth:`dense`) as a private copy-on-write map of its bytes:
        writable, the file untouched, and nothing copied until written. A fresh array of a 1 GB
        embedding costs seconds of first-touch page faults on some machines; this costs none."""
        t = self.info(name)
        self.dense(name)  # its CRC-32, once
        fname = self.manifest["entries"][name]["file"]
        h = self._headers[fname]
        try:
            with builtins.open(h.path, "rb") as f:  # the very file mapped is the one compared
                _check_unchanged(h, file_identity(os.fstat(f.fileno())))
                return np.memmap(f, np.dtype("<f4"), "c", h.data_start + h.entries[name].start, tuple(t.shape))
        except OSError as exc:
            raise MissingFileError(h.path, f"cannot be read: {exc.strerror or exc}") from None

    def _check_crc(self, ename: str, data: np.ndarray, got: str | None = None) -> None:
        """``data`` (or bytes whose CRC-32 is ``got``) against the entry's CRC-32: ChecksumError, or
        FileChangedError if the file is no longer the one opened."""
        fname = self.manifest["entries"][ename]["file"]
        got = crc32_hex(data) if got is None else got
        if got != self.manifest["entries"][ename]["crc32"]:
            h = self._headers[fname]
            try:
                now = file_identity(os.stat(h.path))
            except OSError:
                now = None
            if h.identity is not None and now != h.identity:  # rewritten under the map: not damage
                raise FileChangedError(
                    self._fpath(fname),
                    f"changed while being read: entry {ename!r} no longer matches its CRC-32 "
                    f"({_changes(h.identity, now, h.file_size)} since it was opened)",
                )
            raise ChecksumError(self._fpath(fname), f"entry {ename!r} does not match its CRC-32")
        self._verified.add(ename)

    # --- public API -----------------------------------------------------------------------------
    def checked_entries(self) -> int:
        """How many entries have been read and matched their CRC-32 so far (all after :meth:`verify`)."""
        return len(self._verified)

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise UnknownTensorError(self.path, f"no tensor named {name!r}") from None

    def quantized_names(self) -> list[str]:
        return [n for n, t in self._infos.items() if t.quantized]

    def scale(self, name: str) -> np.ndarray:
        t = self._qinfo(name)
        s = dtypes.from_bytes(
            self._raw(entry_name(name, C.SCALE_SUFFIX)), t.scale_dtype, t.param_shape
        ).astype(np.float32)
        if not np.all(np.isfinite(s)) or not np.all(np.abs(s) > 0 if self.signed_scales else s > 0):
            what = "non-zero" if self.signed_scales else "positive"
            raise BadParameterError(
                self._file_of(entry_name(name, C.SCALE_SUFFIX)), f"{name}: scales must be finite and {what}"
            )
        return s

    @property
    def signed_scales(self) -> bool:
        """Whether scales may be negative (the ``matq.signed_scales`` extension, spec 10.4)."""
        return C.EXT_SIGNED_SCALES in self.manifest.get("must_understand", [])

    def zero(self, name: str) -> np.ndarray:
        """float32 zero points ``[rows, groups]`` (``param_shape``), whether stored as an entry or as
        one constant in the record (10.6): every caller reads them here."""
        t = self._qinfo(name)
        if t.zero_point is not None:  # checked in range when the manifest was parsed
            return np.full(t.param_shape, t.zero_point, np.float32)
        z = dtypes.from_bytes(
            self._raw(entry_name(name, C.ZERO_SUFFIX)), t.zero_dtype, t.param_shape
        ).astype(np.float32)
        if (
            not np.all(np.isfinite(z))
            or z.min(initial=0) < 0
            or z.max(initial=0) > numerics.code_max(self.code_bits)
        ):
            raise BadParameterError(
                self._file_of(entry_name(name, C.ZERO_SUFFIX)),
                f"{name}: zero points must be finite and within the code range",
            )
        return z

    def importance(self, name: str, *, as_stored: bool = False) -> np.ndarray | None:
        """float32 per-input-feature importance (10.8: mean squared calibration activation, shape
        ``importance_shape``), or None when the checkpoint keeps none for ``name``. ``as_stored``:
        in its stored dtype (float16 for F16), for copies that keep it bit for bit."""
        return self._kept_vector(name, self._importance, "importance", as_stored)

    def sensitivity(self, name: str, *, as_stored: bool = False) -> np.ndarray | None:
        """float32 per-output-feature sensitivity (10.8: mean squared loss gradient at the tensor's
        output, shape ``sensitivity_shape``), or None when the checkpoint keeps none for ``name``."""
        return self._kept_vector(name, self._sensitivity, "sensitivity", as_stored)

    def _kept_vector(self, name: str, kept: dict[str, str], what: str, as_stored: bool) -> np.ndarray | None:
        """An entry of 10.8, checked finite and not negative."""
        ename = kept.get(name)
        if ename is None:
            self.info(name)
            return None
        e = self._headers[C.BASE_FILENAME].entries[ename]
        stored = dtypes.from_bytes(self._raw(ename), e.dtype, e.shape)
        a = stored.astype(np.float32)
        if not np.all(np.isfinite(a)) or a.min(initial=0) < 0:
            raise BadParameterError(self.path, f"{name}: {what} must be finite and not negative")
        return np.array(stored) if as_stored else a

    def has_importance(self, name: str) -> bool:
        """Whether the checkpoint keeps ``name``'s importance (10.8)."""
        return name in self._importance

    def has_sensitivity(self, name: str) -> bool:
        """Whether the checkpoint keeps ``name``'s sensitivity (10.8)."""
        return name in self._sensitivity

    def plane(self, name: str, k: int) -> np.ndarray:
        """Packed bit-plane k of a quantized tensor (memory-mapped, CRC-checked)."""
        t = self._qinfo(name)
        if k not in t.planes:
            raise MissingPlanesError(
                self.path, f"{name}: plane {k} is not in this checkpoint (sliced to planes {list(t.planes)})"
            )
        return self._raw(plane_entry(name, k))

    def sliced_codes(self, name: str, bits: int | None = None, extra_precision: bool = False) -> np.ndarray:
        """Codes in the r-bit domain, uint8 in the tensor's shape; reads only the planes that width needs."""
        t = self._qinfo(name)
        bits = self.code_bits if bits is None else bits
        if (
            not isinstance(bits, (int, np.integer))
            or isinstance(bits, bool)
            or not 1 <= bits <= self.code_bits
        ):
            raise WidthError(self.path, f"width {bits!r} is not an integer in 1..{self.code_bits}")
        bits = int(bits)
        if extra_precision and bits == self.code_bits:
            raise WidthError(self.path, f"extra precision needs a width below {self.code_bits}")
        need = numerics.planes_needed(self.code_bits, bits)
        missing = [k for k in need if k not in t.planes]
        if missing:
            raise MissingPlanesError(
                self.path,
                f"{name}: width {bits} needs planes {list(need)}, this checkpoint has {list(t.planes)}",
            )
        planes = [self.plane(name, k) if k in need else None for k in range(self.code_bits)]
        return unpack(planes, t.numel, self.code_bits, bits, extra_precision).reshape(t.shape)

    def codes(self, name: str) -> np.ndarray:
        """The full c-bit codes (needs every plane)."""
        return self.sliced_codes(name, self.code_bits)

    def dense(self, name: str) -> np.ndarray:
        """An unquantized tensor exactly as stored (BF16 as ``ml_dtypes.bfloat16``)."""
        t = self.info(name)
        if t.quantized:
            raise UnknownTensorError(self.path, f"{name} is quantized; use dequantize()")
        raw = self._raw(name)
        try:
            return dtypes.from_bytes(raw, t.dtype, t.shape)
        except ValueError:  # e.g. [0, 2^40, 2^40]: no elements, but dimensions numpy cannot multiply
            raise ShapeTooLargeError(
                self.path, f"{name}: shape {list(t.shape)} is more than a numpy array can hold, even empty"
            ) from None

    def dense_location(self, name: str) -> tuple[Path, int, int]:
        """Where an unquantized tensor's bytes lie, as ``(file, offset, nbytes)``: for copying them
        file to file (then pass their CRC-32 to :meth:`check_copied`). The file is checked unchanged."""
        t = self.info(name)
        if t.quantized:
            raise UnknownTensorError(self.path, f"{name} is quantized")
        fname = self.manifest["entries"][name]["file"]
        h = self._headers[fname]
        e = h.entries[name]
        self._map(fname)  # FileChangedError if the file is not the one opened
        return self._fpath(fname), h.data_start + e.start, e.nbytes

    def check_copied(self, name: str, crc32: str) -> None:
        """With ``verify_reads``: bytes copied from :meth:`dense_location` must have the entry's CRC-32
        (ChecksumError, or FileChangedError if the file changed meanwhile)."""
        if self.verify_reads:
            self._check_crc(name, None, crc32)

    def width_params(self, name: str, bits: int) -> WidthParams | None:
        """Width ``bits``'s own block parameters (spec 10.7), checked; None when the tensor has none
        for that width, or their file is absent from a partial view."""
        t = self._qinfo(name)
        spec = t.width_specs(self.code_bits).get(bits)
        if spec is None:
            return None
        entries = self.manifest["entries"]
        arrays = {}
        for p in spec.parts():
            ename = entry_name(name, part_name(bits, p))
            if entries[ename]["file"] in self.missing_files:
                return None
            e = self._headers[entries[ename]["file"]].entries[ename]
            arrays[p] = dtypes.from_bytes(self._raw(ename), e.dtype, e.shape)
        params = WidthParams(
            spec,
            arrays["d"].astype(np.float32),
            arrays["sc"],
            arrays["dmin"].astype(np.float32) if spec.minimum else None,
            arrays.get("mn"),
        )
        why = check_values(params)
        if why is not None:
            raise BadParameterError(self._file_of(entry_name(name, part_name(bits, "d"))), f"{name}: {why}")
        return params

    def dequantize(self, name: str, bits: int | None = None, extra_precision: bool = False) -> np.ndarray:
        """float32 weights of one tensor at a width; unquantized float tensors come back as stored, in float32.

        A width with its own block parameters (spec 10.7) uses them, unless ``extra_precision``."""
        t = self.info(name)
        if not t.quantized:
            if t.dtype == "F32" and t.shape and all(t.shape):
                return self._private_float32(name)
            a = self.dense(name)
            is_float = t.dtype in C.FLOAT_DTYPES or t.dtype.startswith("F8_")
            return a.astype(np.float32) if is_float else np.array(a)
        bits = self.code_bits if bits is None else bits
        k = self.sliced_codes(name, bits, extra_precision)
        wp = None if extra_precision or bits >= self.code_bits else self.width_params(name, bits)
        if wp is not None:
            return wp.dequantize(k, t.in_axis)
        if bits < self.code_bits and not extra_precision and t.width_specs(self.code_bits) and not self._fallback_said:
            self._fallback_said = True
            warnings.warn(
                f"{self.path}: width {bits} of {name} (and maybe others) has no block parameters of its "
                "own here; it uses the shared grid",
                stacklevel=2,
            )
        return numerics.dequantize_codes(
            k, self.scale(name), self.zero(name), self.code_bits, bits, t.group_size, t.in_axis
        )

    def bytes_for_width(self, name: str, bits: int | None) -> int:
        """Bytes a reader touches for one tensor at a width (planes, scales, zero points; dense as is)."""
        t = self.info(name)
        size = lambda e: self._headers[self.manifest["entries"][e]["file"]].entries[e].nbytes  # noqa: E731
        if not t.quantized:
            return size(name)
        planes = numerics.planes_needed(self.code_bits, bits or self.code_bits)
        own = sum(size(e) for r, e, _, _ in t.width_entries(self.code_bits) if r == bits)
        return len(planes) * plane_stride(t.numel) + sum(size(entry_name(name, p)) for p in t.param_parts) + own

    @property
    def is_folder(self) -> bool:
        """A checkpoint folder (planes and carried files beside the base), not a single file."""
        m = self.manifest
        return self.path.name == C.BASE_FILENAME and (self._opened_folder or bool(m["files"] or m.get("carried")))

    def input_paths(self) -> list[Path]:
        """What a command reading this checkpoint must never write into: the folder, or the file."""
        return list(self._roots) if self.is_folder else [self.path]

    def read_carried(self, rel: str) -> bytes:
        """A carried file's bytes, checked: a regular file inside the folder, of the recorded size
        and sha256 (at most that many bytes are read)."""
        meta = self.manifest.get("carried", {}).get(rel)
        p = self.root / rel
        if meta is None:
            raise UnknownTensorError(self.path, f"no carried file named {rel!r}")
        if not p.exists() and not p.is_symlink():
            raise MissingFileError(p, "carried file listed in the manifest is missing")
        check_file(p, self._roots)
        with open_regular(p) as f:  # one byte past the recorded size tells a longer file
            data = f.read(min(int(meta["bytes"]), C.CARRY_MAX_BYTES) + 1)
        if len(data) != meta["bytes"]:
            raise ChecksumError(p, f"carried file is not the {meta['bytes']} bytes the manifest records")
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise ChecksumError(p, "carried file does not match its sha256")
        return data

    def carried_bytes(self) -> dict[str, bytes]:
        """Every carried file, checked as :meth:`read_carried` does (relative name -> bytes); all of
        them together at most ``CARRY_TOTAL_MAX_BYTES``, else a LimitError before any is read."""
        self._check_carried_total()
        return {rel: self.read_carried(rel) for rel in self.manifest.get("carried", {})}

    def _check_carried_total(self) -> None:
        carried = self.manifest.get("carried", {})
        total = sum(c["bytes"] for c in carried.values())
        if total > C.CARRY_TOTAL_MAX_BYTES:
            raise LimitError(
                self.path,
                f"its {len(carried)} carried files come to {total} bytes, more than the "
                f"{C.CARRY_TOTAL_MAX_BYTES} bytes matq reads",
            )

    @contextlib.contextmanager
    def carried_folder(self) -> Iterator[Path]:
        """A private temporary folder of checked copies of the carried files, for libraries that
        read files by path (tokenizers, gguf-py); removed on exit."""
        with scratch_dir("carried") as tmp:
            for rel, data in self.carried_bytes().items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            yield tmp

    def carried_files(self) -> dict[str, Path]:
        """Carried files (relative name -> path), each checked as :meth:`read_carried` does."""
        self.carried_bytes()
        return {rel: self.root / rel for rel in self.manifest.get("carried", {})}

    @property
    def config(self) -> dict | None:
        if "config.json" not in self.manifest.get("carried", {}):
            return None
        path = self.root / "config.json"
        doc = parse_json(self.read_carried("config.json"), path, HeaderError)
        if not isinstance(doc, dict):
            raise HeaderError(path, "carried config.json is not a JSON object")
        return doc

    @property
    def digest(self) -> str:
        """sha256 of the manifest: names the checkpoint's exact contents (it holds every CRC)."""
        return hashlib.sha256(self.manifest_text.encode("utf-8")).hexdigest()

    @property
    def source(self) -> dict:
        return self.manifest.get("source", {})

    def files(self) -> list[Path]:
        """Every file of the checkpoint: base, plane files, carried files."""
        present = (self.root / f for f in self.manifest["files"] if f not in self.missing_files)
        return [self.path, *present, *self.carried_files().values()]

    def verify(self, progress=None) -> None:
        """Check every entry's CRC-32, every parameter, and every carried file's sha256."""
        for ename in self.manifest["entries"]:
            fname = self.manifest["entries"][ename]["file"]
            if fname in self.missing_files:
                continue
            h = self._headers[fname]
            e = h.entries[ename]
            self._check_crc(ename, self._map(fname)[h.data_start + e.start : h.data_start + e.end])
            if progress is not None:
                progress(e.nbytes)
        for name in self.quantized_names():
            self.scale(name)
            self.zero(name)
            for r in self.info(name).width_specs(self.code_bits):
                self.width_params(name, r)
            self.importance(name)
            self.sensitivity(name)
        self._check_carried_total()
        for rel in self.manifest.get("carried", {}):  # one at a time: each checked, then dropped
            self.read_carried(rel)

    def close(self) -> None:
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _qinfo(self, name: str) -> TensorInfo:
        t = self.info(name)
        if not t.quantized:
            raise UnknownTensorError(self.path, f"{name} is not quantized")
        return t

    def _file_of(self, ename: str) -> Path:
        return self._fpath(self.manifest["entries"][ename]["file"])

    def _fpath(self, fname: str) -> Path:
        """Where a file the manifest names lives (the base may be a single file of any name)."""
        return self.path if fname == C.BASE_FILENAME else self.root / fname


def _check_unchanged(h, now) -> None:
    """FileChangedError unless the file opened now (``file_identity``) is the one the header read."""
    if now[0] != h.file_size or (h.identity is not None and now != h.identity):
        raise FileChangedError(
            h.path, f"changed while being read ({_changes(h.identity, now, h.file_size)} since it was opened)"
        )


def _changes(old: tuple | None, new: tuple | None, size: int) -> str:
    """What differs between two ``file_identity`` values, in words."""
    if new is None:
        return "removed"
    if old is None:
        old = (size, *new[1:])
    what = []
    if new[0] != old[0]:
        what.append(f"size {old[0]} -> {new[0]}")
    if new[2:] != old[2:]:
        what.append("replaced by another file")
    elif new[1] != old[1]:
        what.append("modified")
    return ", ".join(what) or "modified"


def open(path: str | os.PathLike, *, verify_reads: bool = True, partial: bool = False) -> Checkpoint:  # noqa: A001
    """Open a checkpoint folder (or its ``matq.safetensors``, or a single-file checkpoint).

    ``partial=True`` tolerates absent plane files (a width-selective download): the tensors then
    serve only the widths whose planes are present.
    """
    try:
        return Checkpoint(path, verify_reads=verify_reads, partial=partial)
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise MissingFileError(path, "no such file or folder") from None
        raise OffsetError(path, f"cannot be read: {exc}") from None
