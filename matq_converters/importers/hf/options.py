"""Settings of ``--from hf``: the one declaration of the quantization options.

``matq quantize`` makes one flag per field (its help, choices, and how the flag's text is read:
:class:`FlagText`), :func:`~matq_converters.importers.hf.quantize.quantize_hf` checks its keywords
into :class:`HFImportOptions`, and :meth:`HFImportOptions.spec` hands them to ``QuantizeSpec.build``.
Declared apart from the quantizer, so the flags cost nothing beyond numpy.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from matq_converters.registry import option
from matq_format import constants as C
from matq_format.quantspec import BY_LAYOUT, LAYOUTS, OBJECTIVES, SLICE_EXACT, QuantizeSpec

__all__ = ["FlagText", "HFImportOptions", "flag_texts"]

_FLAG = "flag"
"""The metadata key of a field's :class:`FlagText`."""


@dataclass(frozen=True)
class FlagText:
    """How ``matq quantize`` reads one flag: ``parse`` (text -> value; ValueError if malformed),
    ``bounds`` (an integer's range, None for no limit) and ``show_default`` (the help shows it)."""

    parse: Callable[[str], Any] | None = None
    bounds: tuple[int | None, int | None] | None = None
    show_default: bool = False


def _option(default: Any, help: str, *, choices: tuple = (), cli: bool = True, **flag: Any) -> Any:  # noqa: A002
    """A registry ``option`` that also carries how its flag's text is read (:class:`FlagText` keywords)."""
    declared = option(default, help, choices=choices, cli=cli)
    return field(default=default, metadata={**declared.metadata, _FLAG: FlagText(**flag)})


def _ints(text: str) -> tuple[int, ...] | None:
    """``8,4,2`` -> (8, 4, 2); empty -> None (the default)."""
    try:
        return tuple(int(x) for x in text.split(",")) if text else None
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers") from None


def _floats(text: str) -> tuple[float, ...] | None:
    """``1024,16,4,1`` -> (1024.0, 16.0, 4.0, 1.0); empty -> None (the default)."""
    try:
        return tuple(float(x) for x in text.split(",")) if text else None
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


def _int_set(text: str) -> tuple[int, ...]:
    """``2,4`` -> (2, 4); empty -> () (none)."""
    return _ints(text) or ()


def _widths_or_none(text: str) -> tuple[int, ...] | None:
    """``2,3,4`` -> (2, 3, 4); ``none`` -> (); empty -> None (the default)."""
    return () if text.lower() == "none" else _ints(text)


def _group_size(text: str) -> int | None:
    """A number of columns; ``channel`` (or none, 0) -> None, one scale per output row."""
    if text.lower() in ("channel", "none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r}: use a number of columns or 'channel'") from None


def _zero_multiple(text: str) -> int | str:
    """An integer, or ``slice-exact``."""
    if text == SLICE_EXACT:
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r}: use an integer power of two or {SLICE_EXACT!r}") from None


@dataclass(frozen=True)
class HFImportOptions:
    """Settings of ``--from hf``: the keywords of :func:`quantize_hf` and the flags of ``matq quantize``."""

    layers: str = _option(
        "ffn", "ffn, attention, linear (both), or a regular expression over tensor names.", show_default=True
    )
    layout: str = _option(
        "gguf",
        "gguf: symmetric, groups of 32 unless --group-size says otherwise, scales nested in "
        "256-column super-blocks, so every width exports to llama.cpp's compact types exactly.",
        choices=LAYOUTS,
        show_default=True,
    )
    group_size: int | None | str = _option(
        BY_LAYOUT,
        "Input columns per scale, or 'channel' for one scale per output row (default: 128; 32 with "
        "--layout gguf).",
        parse=_group_size,
    )
    scheme: str | None = _option(
        None,
        "Zero points (default: asymmetric; symmetric with --layout gguf).",
        choices=("asymmetric", "symmetric"),
    )
    zero_multiple: int | str = _option(
        1,
        "Zero points on multiples of this power of two; 'slice-exact' keeps every --widths slice integral.",
        parse=_zero_multiple,
        show_default=True,
    )
    objective: str | None = _option(
        None,
        "multiwidth: round (and pick scales) for the lambda-weighted error of the --widths slices "
        "(default: minmax; multiwidth scales with --calib).",
        choices=OBJECTIVES,
    )
    widths: tuple[int, ...] | None = _option(
        None,
        "Target widths of multiwidth, slice-exact and --calib (default: 8,4,2; 8,5,4,3,2 with --calib).",
        parse=_ints,
    )
    lambdas: tuple[float, ...] | None = _option(
        None,
        "One weight per width (default: all 1; with --calib 4^(r - narrowest), int2 as int4: 4096,64,16,4,16).",
        parse=_floats,
    )
    extra_precision: tuple[int, ...] = _option(
        (),
        "Widths served with the extra bucket, e.g. 2 or 2,4 (recorded, and used by multiwidth).",
        parse=_int_set,
    )
    code_bits: int = _option(
        C.DEFAULT_CODE_BITS,
        "Bits of the stored codes (the widest width).",
        bounds=(C.MIN_CODE_BITS, C.MAX_CODE_BITS_IMPL),
        show_default=True,
    )
    scale_dtype: str = _option(
        "F16", "Dtype of the stored scales.", choices=C.SCALE_DTYPES, show_default=True
    )
    threads: int | None = _option(None, "Worker threads (default: CPUs, at most 8).", bounds=(1, 256))
    calib: str | os.PathLike | None = _option(
        None, "Calibration text (file or folder): multi-width GPTQ from the model's activations on it."
    )
    calib_tokens: int | None = _option(
        8192, "Calibration tokens at most (sequences of 512).", bounds=(16, None), show_default=True
    )
    calib_propagate: str = _option(
        "per-width",
        "GPTQ error feedback: the lambda-weighted mean error, or one target per width.",
        choices=("mean", "per-width"),
        show_default=True,
    )
    device: str = _option("cpu", "Where --calib runs: cpu, cuda or cuda:N.", show_default=True)
    calib_seq_len: int | None = _option(None, "Tokens per calibration sequence (default 512).", cli=False)
    width_params: tuple[int, ...] | None = _option(
        None,
        "Widths that get their own block parameters, refitted to their nested codes (spec 10.7), e.g. "
        "2,3,4 (with --layout gguf they export as Q2_K/Q2_0, Q3_K and Q4_K/Q4_0, bit for bit); default: "
        "none. Widths below --code-bits only.",
        parse=_widths_or_none,
    )

    def own_widths(self) -> tuple[int, ...]:
        """The widths given their own block parameters: ``width_params`` (none by default: the ONNX
        export and GPTQ containers hold only the shared grid)."""
        return tuple(sorted(set(self.width_params or ())))

    def spec(self) -> QuantizeSpec:
        """The validated spec (``QuantizeSpec.build``; with ``calib``, the calibrated defaults)."""
        spec = QuantizeSpec.build(
            code_bits=self.code_bits,
            group_size=self.group_size,
            scheme=self.scheme,
            zero_multiple=self.zero_multiple,
            objective=self.objective,
            widths=self.widths,
            lambdas=self.lambdas,
            extra_precision=self.extra_precision,
            scale_dtype=self.scale_dtype,
            layout=self.layout,
            calibrated=self.calib is not None,
        )
        return dataclasses.replace(spec, block_signs=2 in self.own_widths()) if spec.signed_scales else spec


def flag_texts() -> dict[str, FlagText]:
    """Setting name -> how its ``matq quantize`` flag is read."""
    return {f.name: f.metadata.get(_FLAG, FlagText()) for f in dataclasses.fields(HFImportOptions)}
