"""Settings of ``--from hf``, declared apart from the quantizer so that the CLI builds its flags (and a
library caller checks its values) without importing anything beyond numpy."""

from __future__ import annotations

import os
from dataclasses import dataclass

from matq_converters.registry import option
from matq_format import constants as C
from matq_format.quantspec import BY_LAYOUT, LAYOUTS, OBJECTIVES


@dataclass(frozen=True)
class HFImportOptions:
    """Settings of ``--from hf`` (the keywords of :func:`quantize_hf`, checked by ``QuantizeSpec.build``)."""

    code_bits: int = option(C.DEFAULT_CODE_BITS, "Bits of the stored codes.")
    group_size: int | None | str = option(
        BY_LAYOUT, "Input columns per scale; None per channel; by-layout: 32 in the gguf layout, else 128."
    )
    scheme: str | None = option(
        None,
        "Zero points (None: symmetric in the gguf layout, else asymmetric).",
        choices=("asymmetric", "symmetric"),
    )
    zero_multiple: int | str = option(1, "Zero points on multiples of this power of two, or slice-exact.")
    layers: str = option("ffn", "ffn, attention, linear, or a regular expression over tensor names.")
    objective: str | None = option(
        None, "Rounding and scale objective (None: multiwidth with calib, else minmax).", choices=OBJECTIVES
    )
    widths: tuple[int, ...] | None = option(None, "Target widths of multiwidth and slice-exact.")
    lambdas: tuple[float, ...] | None = option(None, "One weight per width.")
    extra_precision: tuple[int, ...] = option((), "Widths served with the extra bucket.")
    scale_dtype: str = option("F16", "Scale dtype.", choices=("F16", "BF16", "F32"))
    layout: str = option("gguf", "gguf: every width exact in llama.cpp's compact types; free: any scheme.", choices=LAYOUTS)
    threads: int | None = option(None, "Worker threads.")
    calib: str | os.PathLike | None = option(None, "Calibration text: multi-width GPTQ.")
    calib_tokens: int | None = option(None, "Calibration tokens at most.")
    calib_propagate: str = option("per-width", "GPTQ error feedback.", choices=("mean", "per-width"))
    device: str = option("cpu", "Where calibration runs.")
