"""Per-width block parameters (spec 10.7, ``matq.width_params``): what a width's record says, the
entries it calls for, and the value checks a reader and a writer both make."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import constants as C
from .numerics import dequantize_width, param_shape


@dataclass(frozen=True)
class WidthSpec:
    """One width's record in a tensor's ``matq.width_params``: sub-group size, and whether it has a minimum."""

    bits: int
    group_size: int
    minimum: bool
    super_block: int = C.WIDTH_SUPER_BLOCK
    """Columns per ``d``/``dmin``: 256 (K-quant shape), or ``group_size`` (one ``d`` per group, ``sc`` a sign)."""

    def to_json(self) -> dict:
        rec = {"group_size": self.group_size, "min": self.minimum}
        if self.super_block != C.WIDTH_SUPER_BLOCK:
            rec["super_block"] = self.super_block
        return rec

    def parts(self) -> tuple[str, ...]:
        return ("d", "sc", "dmin", "mn") if self.minimum else ("d", "sc")


@dataclass(frozen=True)
class WidthParams:
    """One width's parameters as arrays: ``d``/``dmin`` float32 per super-block, ``sc`` int8 and
    ``mn`` uint8 per sub-group, each in ``numerics.param_shape`` of the tensor along its input axis."""

    spec: WidthSpec
    d: np.ndarray
    sc: np.ndarray
    dmin: np.ndarray | None = None
    mn: np.ndarray | None = None

    def dequantize(self, k: np.ndarray, input_axis: int = -1) -> np.ndarray:
        """The width's nested codes ``k`` as float32 weights (``numerics.dequantize_width``)."""
        s = self.spec
        return dequantize_width(k, self.d, self.sc, self.dmin, self.mn, s.bits, s.group_size, input_axis, s.super_block)


def part_name(bits: int, part: str) -> str:
    """The entry part of a width's parameter: ``w2.d``."""
    return C.WIDTH_SUFFIX.format(r=bits, p=part)


def part_dtype(part: str) -> str:
    return {"d": "F16", "dmin": "F16", "sc": "I8", "mn": "U8"}[part]


def part_shape(spec: WidthSpec, part: str, shape: tuple[int, ...], input_axis: int) -> tuple[int, ...]:
    """Super-block parameters (``d``, ``dmin``) per ``super_block`` columns, sub-group ones per ``group_size``."""
    block = spec.super_block if part in ("d", "dmin") else spec.group_size
    return param_shape(shape, block, input_axis)


def parse_record(value, code_bits: int) -> dict[int, WidthSpec]:
    """A tensor's ``matq.width_params`` value, checked; raises ValueError with the reason."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{C.EXT_WIDTH_PARAMS} must be a non-empty object of widths")
    out: dict[int, WidthSpec] = {}
    for key, rec in value.items():
        if not (isinstance(key, str) and key.isdigit() and key == str(int(key)) and 1 <= int(key) < code_bits):
            raise ValueError(f"{C.EXT_WIDTH_PARAMS}: width {key!r} is not a decimal width in 1..{code_bits - 1}")
        if not isinstance(rec, dict) or set(rec) - {"group_size", "min", "super_block"}:
            raise ValueError(f"{C.EXT_WIDTH_PARAMS}[{key}] must hold only 'group_size', 'min' and 'super_block'")
        g, m, sb = rec.get("group_size"), rec.get("min"), rec.get("super_block", C.WIDTH_SUPER_BLOCK)
        if not (_positive(sb) and C.WIDTH_SUPER_BLOCK % sb == 0):
            raise ValueError(f"{C.EXT_WIDTH_PARAMS}[{key}]: super_block {sb!r} must divide {C.WIDTH_SUPER_BLOCK}")
        if not (_positive(g) and sb % g == 0):
            raise ValueError(f"{C.EXT_WIDTH_PARAMS}[{key}]: group_size {g!r} must divide super_block {sb}")
        if not isinstance(m, bool):
            raise ValueError(f"{C.EXT_WIDTH_PARAMS}[{key}]: 'min' must be true or false")
        out[int(key)] = WidthSpec(int(key), g, m, sb)
    return out


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def record(specs: dict[int, WidthSpec]) -> dict:
    """The JSON value of ``matq.width_params`` for these widths, narrowest first."""
    return {str(r): specs[r].to_json() for r in sorted(specs)}


def check_values(p: WidthParams) -> str | None:
    """Why these parameters break spec 10.7 (non-finite ``d``/``dmin``, ``sc``/``mn`` past their
    bounds), or None."""
    if not np.all(np.isfinite(p.d)) or (p.dmin is not None and not np.all(np.isfinite(p.dmin))):
        return f"width {p.spec.bits}: d and dmin must be finite"
    sc = np.asarray(p.sc, np.int32)
    if p.spec.minimum:
        top = C.WIDTH_SC_AFFINE
        if sc.size and (np.abs(sc).max() > top or np.asarray(p.mn, np.int32).max() > top):
            return f"width {p.spec.bits}: |sc| and mn must be at most {top}"
    else:
        lo, hi = -C.WIDTH_SC_SYMMETRIC, C.WIDTH_SC_SYMMETRIC - 1
        if sc.size and (sc.min() < lo or sc.max() > hi):
            return f"width {p.spec.bits}: sc must lie in {lo}..{hi}"
    return None
