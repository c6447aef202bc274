"""How one tensor is quantized: the one validated configuration that PTQ, calibration, GPTQ, the
trainer and the writer's records share (``QuantizeSpec.build`` checks every option once)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import constants as C
from . import multiwidth, numerics
from .errors import MatqError

__all__ = [
    "BY_LAYOUT",
    "DEFAULT_GROUP_SIZE",
    "GGUF_GROUP_SIZE",
    "LAYOUTS",
    "OBJECTIVES",
    "SLICE_EXACT",
    "OptionError",
    "QuantizeSpec",
]

DEFAULT_GROUP_SIZE = 128
"""Groups of 128 input columns, as MatGPTQ and the OmniQuant ports use; ``None`` is per channel."""
GGUF_GROUP_SIZE = 32
"""The gguf layout's group: llama.cpp's 32-weight blocks (Q4_0, Q5_0, Q8_0)."""
BY_LAYOUT = "by-layout"
"""``group_size`` default: :data:`GGUF_GROUP_SIZE` in the gguf layout, else :data:`DEFAULT_GROUP_SIZE`."""
OBJECTIVES = ("minmax", "multiwidth")
SLICE_EXACT = "slice-exact"
LAYOUTS = ("free", "gguf")


class OptionError(MatqError):
    """A quantization option that is out of range or inconsistent."""


@dataclass(frozen=True)
class QuantizeSpec:
    """How to quantize one tensor; validated once, used for every tensor."""

    code_bits: int = C.DEFAULT_CODE_BITS
    group_size: int | None = DEFAULT_GROUP_SIZE
    scheme: str = "asymmetric"
    zero_multiple: int = 1
    objective: str = "minmax"
    widths: tuple[int, ...] = multiwidth.MULTIWIDTH_WIDTHS
    lambdas: tuple[float, ...] = multiwidth.MULTIWIDTH_LAMBDAS
    extra_precision: tuple[int, ...] = ()
    scale_dtype: str = "F16"
    layout: str = "gguf"
    """``gguf``: symmetric, scales nested in 256-column super-blocks (``numerics.nest_scales``), so
    every width exports exactly to llama.cpp's compact types; ``free``: no constraint."""
    block_signs: bool = False
    """gguf layout, rows no K-quant tiles: one scale sign per Q2_0 block of 64 columns
    (``numerics.sign_span``), which int2's own block parameters in that shape need (spec 10.7);
    else one sign per group."""

    @classmethod
    def build(
        cls,
        *,
        code_bits: int = C.DEFAULT_CODE_BITS,
        group_size: int | None | str = BY_LAYOUT,
        scheme: str | None = None,
        zero_multiple: int | str = 1,
        objective: str | None = None,
        widths: Sequence[int] | None = None,
        lambdas: Sequence[float] | None = None,
        extra_precision: Sequence[int] = (),
        scale_dtype: str = "F16",
        layout: str = "gguf",
        calibrated: bool = False,
    ) -> QuantizeSpec:
        """Check every option and resolve ``zero_multiple="slice-exact"`` and the layout's defaults
        (``scheme`` None and ``group_size`` :data:`BY_LAYOUT`) and of calibration (``objective``,
        ``widths`` and ``lambdas`` None); raises :class:`OptionError`."""
        if objective is None:  # calibrated: GPTQ's codes with scales searched for the same objective
            objective = "multiwidth" if calibrated else "minmax"
        if scheme is None:
            scheme = "symmetric" if layout == "gguf" else "asymmetric"
        _check_code_bits(code_bits)
        group_size = _group_size(group_size, layout)
        _check_names(layout, scheme, objective, scale_dtype, code_bits)
        widths = _widths(widths, code_bits, calibrated)
        lambdas = _lambdas(lambdas, widths, calibrated)
        extra_precision = _extra_precision(extra_precision, code_bits)
        zero_multiple = _zero_multiple(zero_multiple, code_bits, widths)
        return cls(
            code_bits,
            group_size,
            scheme,
            zero_multiple,
            objective,
            widths,
            lambdas,
            extra_precision,
            scale_dtype,
            layout,
        )

    def params_and_codes(
        self, w: np.ndarray, group_size: int | None, out: np.ndarray, cols: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero of a float32 block, its codes into ``out``; the formulas all live in numerics.

        ``w`` is overwritten (it is the caller's scratch buffer). ``cols``: the tensor's row length
        when ``w`` holds its groups as rows (``group_size=None`` then), for the gguf layout.
        """
        sym = self.scheme == "symmetric"
        sign = self.flip_signs(w, group_size, cols)
        a, z = self._params_and_codes(w, group_size, out, cols, sym)
        return (a, z) if sign is None else (a * sign, z)

    def _params_and_codes(
        self, w: np.ndarray, group_size: int | None, out: np.ndarray, cols: int | None, sym: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        grid = dict(symmetric=sym, zero_multiple=self.zero_multiple, scale_dtype=self.scale_dtype)
        if self.objective == "minmax":
            a, z = numerics.minmax_params(w, self.code_bits, group_size, **grid)
            a = self._nest(a, w.shape[1], group_size, cols)
            numerics.quantize(w, a, z, self.code_bits, group_size, out=out, work=w)
            return a, z
        mw = dict(widths=self.widths, lambdas=self.lambdas, extra_precision=self.extra_precision)
        a, z = multiwidth.multiwidth_params(w, self.code_bits, group_size, **grid, **mw)
        a = self._nest(a, w.shape[1], group_size, cols)
        out[...] = multiwidth.multiwidth_codes(w, a, z, self.code_bits, group_size, **mw)
        return a, z

    @property
    def signed_scales(self) -> bool:
        """The gguf layout signs each group's scale (``numerics.extreme_signs``)."""
        return self.layout == "gguf"

    def flip_signs(self, w: np.ndarray, group_size: int | None, cols: int | None = None) -> np.ndarray | None:
        """With signed scales: ``w`` (a float32 scratch buffer) times each group's
        ``numerics.extreme_signs`` in place, and those signs; else None and ``w`` untouched.

        Quantizing the flipped ``w`` with positive scales gives the codes of ``w`` with the scales
        times the signs, so every parameter search runs unchanged on the flipped weights. Rows that
        no K-quant tiles share one sign per ``numerics.sign_span`` columns (Q2_0's block of 64), so
        that a width's one step per block (spec 10.7) does not straddle two signs.
        ``cols``: the row length when ``w`` holds one group per row."""
        if not self.signed_scales:
            return None
        n = w.shape[1] if cols is None else cols
        span = numerics.sign_span(n, group_size or w.shape[1]) if self.block_signs else group_size or w.shape[1]
        if group_size is None and cols is not None and span > w.shape[1] and w.shape[0] % (span // w.shape[1]) == 0:
            sign = numerics.extreme_signs(w.reshape(-1, span), None)  # consecutive rows are one row's groups
            sign = np.repeat(sign, span // w.shape[1], axis=0)
        elif group_size is not None and span > group_size:
            sign = np.repeat(numerics.extreme_signs(w, span), span // group_size, axis=1)
        else:
            sign = numerics.extreme_signs(w, group_size)
        w *= numerics.expand_groups(sign, w.shape[1], group_size)
        return sign

    def writer_options(self) -> dict:
        """``CheckpointWriter`` keywords this spec needs (the extension signed scales require)."""
        return {"must_understand": [C.EXT_SIGNED_SCALES]} if self.signed_scales else {}

    def _nest(self, a: np.ndarray, width: int, group_size: int | None, cols: int | None) -> np.ndarray:
        if self.layout != "gguf":
            return a
        if cols is None:  # rows of the tensor as they are
            return numerics.nest_scales(a, width, group_size)
        return numerics.nest_scales(a.reshape(-1, cols // width), cols, width).reshape(a.shape)

    def entry_options(self) -> dict:
        """How the writer stores tensors quantized with this spec (``add_quantized*`` keywords)."""
        return {
            "group_size": self.group_size,
            "scheme": self.scheme,
            "scale_dtype": self.scale_dtype,
            "zero_dtype": "U8" if self.code_bits <= 8 else "U16",
            "extra_precision": self.extra_precision,
        }

    def source_record(self) -> dict:
        return {
            "code_bits": self.code_bits,
            "group_size": self.group_size,
            "scheme": self.scheme,
            "zero_multiple": self.zero_multiple,
            "objective": self.objective,
            **(
                {"widths": list(self.widths), "lambdas": list(self.lambdas)}
                if self.objective != "minmax"
                else {}
            ),
            "scale_dtype": self.scale_dtype,
            **({"layout": self.layout} if self.layout != "free" else {}),
        }


def _check_code_bits(code_bits: int) -> None:
    """Code widths the format and the packers implement."""
    if not C.MIN_CODE_BITS <= code_bits <= C.MAX_CODE_BITS_IMPL:
        raise OptionError(None, f"code bits {code_bits} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_IMPL}")


def _group_size(group_size: int | None | str, layout: str) -> int | None:
    """The layout's default resolved; a positive int the format can record, or None (per channel)."""
    if group_size == BY_LAYOUT:
        group_size = GGUF_GROUP_SIZE if layout == "gguf" else DEFAULT_GROUP_SIZE
    if group_size is None:
        return None
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size < 1:
        raise OptionError(None, f"group size {group_size!r} must be a positive number of columns")
    if group_size > C.MAX_DIM_SIZE:
        raise OptionError(
            None, f"group size {group_size} exceeds the format's limit of {C.MAX_DIM_SIZE} columns"
        )
    return int(group_size)


def _check_names(layout: str, scheme: str, objective: str, scale_dtype: str, code_bits: int) -> None:
    """Named choices are known, and the gguf layout's fixed ones hold."""
    if layout not in LAYOUTS:
        raise OptionError(None, f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "gguf" and (scheme != "symmetric" or scale_dtype != "F16" or code_bits != 8):
        raise OptionError(None, "the gguf layout is symmetric with F16 scales and 8-bit codes")
    if scheme not in ("asymmetric", "symmetric"):
        raise OptionError(None, f"unknown scheme {scheme!r}; use asymmetric or symmetric")
    if objective not in OBJECTIVES:
        raise OptionError(None, f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if scale_dtype not in C.SCALE_DTYPES:
        raise OptionError(None, f"scale dtype {scale_dtype!r} not one of {', '.join(C.SCALE_DTYPES)}")


def _widths(widths: Sequence[int] | None, code_bits: int, calibrated: bool) -> tuple[int, ...]:
    """Given widths, or 8, 4, 2 (8, 5, 4, 3 calibrated) with c in place of 8; each within 1..c."""
    if widths is None:
        base = multiwidth.CALIBRATED_WIDTHS if calibrated else multiwidth.MULTIWIDTH_WIDTHS
        widths = sorted({min(r, code_bits) for r in base} | {code_bits}, reverse=True)
    widths = tuple(int(r) for r in widths)
    if not widths or any(not 1 <= r <= code_bits for r in widths):
        raise OptionError(None, f"widths {list(widths)} must be non-empty and within 1..{code_bits}")
    return widths


def _lambdas(lambdas: Sequence[float] | None, widths: tuple[int, ...], calibrated: bool) -> tuple[float, ...]:
    """One finite non-negative weight per width, not all zero (default: all 1; noise-equal calibrated)."""
    if lambdas is None:
        lambdas = multiwidth.calibrated_lambdas(widths) if calibrated else [1.0] * len(widths)
    lambdas = tuple(float(v) for v in lambdas)
    if len(lambdas) != len(widths) or any(not np.isfinite(v) or v < 0 for v in lambdas) or sum(lambdas) <= 0:
        raise OptionError(None, "lambdas must be one non-negative number per width, not all zero")
    return lambdas


def _extra_precision(extra_precision: Sequence[int], code_bits: int) -> tuple[int, ...]:
    """Sorted distinct widths below c (the full width has no extra bucket)."""
    extra = tuple(sorted({int(r) for r in extra_precision}))
    if any(not 1 <= r < code_bits for r in extra):
        raise OptionError(None, f"extra-precision widths must lie in 1..{code_bits - 1}")
    return extra


def _zero_multiple(zero_multiple: int | str, code_bits: int, widths: tuple[int, ...]) -> int:
    """A power of two up to 2^(c-1); slice-exact: the one that keeps the narrowest width integral."""
    if zero_multiple == SLICE_EXACT:
        zero_multiple = 1 << (code_bits - min(widths))
    try:
        zero_multiple = int(zero_multiple)
    except (TypeError, ValueError):
        raise OptionError(None, f"zero multiple must be an integer or {SLICE_EXACT!r}") from None
    if zero_multiple < 1 or zero_multiple & (zero_multiple - 1) or zero_multiple > 1 << (code_bits - 1):
        raise OptionError(
            None, f"zero multiple {zero_multiple} must be a power of two up to {1 << (code_bits - 1)}"
        )
    return zero_multiple
