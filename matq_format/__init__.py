"""matq_format: write, read, validate and slice Matryoshka-quantized checkpoints (spec/v1)."""

from . import constants, errors, numerics, planes
from .checkpoint import Checkpoint, open
from .manifest import TensorInfo
from .plans import resolve_plan, summarize
from .slicing import slice_checkpoint
from .writer import CheckpointWriter

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "TensorInfo",
    "constants",
    "errors",
    "numerics",
    "open",
    "planes",
    "resolve_plan",
    "slice_checkpoint",
    "summarize",
]
__version__ = "0.1.0"
