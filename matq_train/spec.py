"""What the trainer quantizes and how: the QAT view of ``matq quantize``'s :class:`QuantizeSpec`.

Code width, granularity, scheme and scale dtype are checked by ``QuantizeSpec.build`` (one set of
checks for PTQ, QAT and the writer's entry options); the trainer adds only the clipping mode, which
PTQ has no use for. Layer selection uses the converters' architecture table, so ``--layers ffn``
picks the same weights in ``matq quantize`` and ``matq train``. No framework is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from matq_converters.roles import LayerPatternError, detect, hidden_size, input_axes, select
from matq_format import constants as C
from matq_format.quantspec import OptionError, QuantizeSpec

__all__ = [
    "CLIP_MODES",
    "LWC_INIT",
    "LayerSelectionError",
    "QuantSpec",
    "QuantSpecError",
    "select_weights",
    "weight_axes",
]

CLIP_MODES = ("minmax", "learned")
LWC_INIT = 4.0
"""OmniQuant's initial clipping logit: sigmoid(4) = 0.982 of the MinMax range."""


class QuantSpecError(OptionError):
    """Quantization settings that matq cannot store (code width, granularity, clipping, scale dtype)."""


class LayerSelectionError(LayerPatternError):
    """The layer selection names no weight that a module of the model holds as a parameter."""

    hint = "use --layers ffn, linear, attention, or a regular expression matching weight names"


@dataclass(frozen=True)
class QuantSpec:
    """How the selected weights are quantized during training: the stored code width and its parameters."""

    code_bits: int = C.DEFAULT_CODE_BITS
    group_size: int | None = None
    clip: str = "minmax"
    scheme: str = "asymmetric"
    scale_dtype: str = "F16"

    def __post_init__(self) -> None:
        if self.clip not in CLIP_MODES:
            raise QuantSpecError(None, f"clip must be one of {CLIP_MODES}, not {self.clip!r}")
        if self.clip == "learned" and self.scheme != "asymmetric":
            raise QuantSpecError(None, "learned clipping is asymmetric (gamma for the max, beta for the min)")
        try:
            self.storage()
        except OptionError as exc:
            raise QuantSpecError(exc.path, exc.message) from None

    def storage(self) -> QuantizeSpec:
        """The PTQ spec with the same stored parameters: its checks and its writer keywords."""
        return QuantizeSpec.build(
            code_bits=self.code_bits,
            group_size=self.group_size,
            scheme=self.scheme,
            scale_dtype=self.scale_dtype,
            widths=(self.code_bits,),
            layout="free",  # the trainer's own MinMax grid, not the GGUF layout
        )

    def entry_options(self, extra_precision: bool) -> dict:
        """``CheckpointWriter.add_quantized`` keywords; ``extra_precision`` marks every width below c."""
        ep = tuple(r for r in C.SLICE_WIDTHS if r < self.code_bits) if extra_precision else ()
        return {**self.storage().entry_options(), "extra_precision": ep}


def select_weights(
    shapes: Mapping[str, tuple[str, tuple[int, ...]]], layers: str, config: Mapping | None
) -> list[str]:
    """Weight names chosen by a preset (ffn, attention, linear) or a regular expression, in model order."""
    return select(dict(shapes), layers, detect(config or {}))


def weight_axes(
    shapes: Mapping[str, tuple[str, tuple[int, ...]]], names: list[str], config: Mapping | None
) -> dict[str, int]:
    """Each selected weight's axis of input features: 1 for a matrix, the family's layout for a
    fused expert stack (``roles.input_axes``; a stack that fits none is an ``ExpertShapeError``)."""
    config = config or {}
    return input_axes(dict(shapes), names, detect(config), hidden_size(config))
