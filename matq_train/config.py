"""Run settings, their checks, the learning-rate schedule and the resume rule: shared by every backend.

A :class:`TrainConfig` is stored in every trainer checkpoint (JSON); a run may resume from a
checkpoint only when every setting outside :data:`RESUMABLE_CHANGES` matches. Nothing here imports
torch or jax, so settings errors reach the user before a framework loads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from matq_format.errors import MatqError
from matq_format.publish import AtomicOutput, OutputExistsError, OutputKind, check_disjoint
from matq_format.safefs import read_bounded

from .objective import Objective
from .spec import QuantSpec

__all__ = [
    "BACKENDS",
    "BACKEND_FAMILIES",
    "CheckpointMismatchError",
    "JAX_DECODERS",
    "JAX_FAMILIES",
    "OutOfMemoryError",
    "PRECISIONS",
    "RESUMABLE_CHANGES",
    "TrainConfig",
    "TrainConfigError",
    "check_resumable",
    "latest_checkpoint",
    "lr_factor",
]

BACKENDS = ("torch", "jax")
JAX_DECODERS = ("llama", "mistral", "qwen2", "gemma2")
"""Model types of the causal decoders the jax backend implements (``matq_train/jax/decoder.py``)."""
JAX_FAMILIES = (*JAX_DECODERS, "bert")
"""Every model type the jax backend trains: its decoders and BERT's masked LM (``jax/bert.py``)."""
BACKEND_FAMILIES = {
    "torch": "the causal and masked LMs transformers runs",
    "jax": ", ".join(JAX_FAMILIES),
}
"""Which families each backend trains, in one line (``matq train --help``, the refusals, the docs)."""
PRECISIONS = ("fp32", "bf16")
"""``bf16``: matrix products under bfloat16 autocast; weights, optimizer state and fake quantization stay float32."""
# Fields that may change between a run and its resumption; every other field must match.
RESUMABLE_CHANGES = frozenset(
    {
        "steps",
        "out",
        "log_every",
        "save_every",
        "resume",
        "checkpoint_dir",
        "threads",
        "eval_every",
        "fsdp",
        "device",
        "grad_checkpointing",
        "mesh",
        "shard",
    }
)


class CheckpointMismatchError(MatqError):
    """A trainer checkpoint made with different settings than the run that tries to resume from it."""

    hint = "resume with the settings the checkpoint was made with, or use a new --checkpoint-dir"


class TrainConfigError(MatqError):
    """Run settings that cannot work together (batch size and world size, an existing output)."""


class OutOfMemoryError(MatqError):
    """A step that does not fit in the device's memory (raised before the first step where the backend can tell)."""

    hint = "lower --batch-size or --seq-len"


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in every trainer checkpoint."""

    model_dir: str
    data: list[str]
    out: str | None = None
    bits: tuple[int, ...] = (8, 4, 2)
    lambdas: tuple[float, ...] | None = None
    distill: str | None = None
    distill_labels: bool = False
    extra_precision: bool = False
    baseline: int | None = None
    full_precision: bool = False
    layers: str = "ffn"
    group_size: int | None = None
    clip: str = "minmax"
    scheme: str = "asymmetric"
    scale_dtype: str = "F16"
    code_bits: int = 8
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-4
    clip_lr: float = 5e-3
    weight_decay: float = 0.0
    warmup: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    holdout: float = 0.0
    text_field: str = "text"
    log_every: int = 10
    save_every: int = 0
    eval_every: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    fsdp: bool = False
    threads: int | None = None
    backend: str = "torch"
    device: str | None = None
    """torch: ``cpu``, ``cuda``, ``cuda:1`` (default: cuda when present, else cpu)."""
    precision: str = "fp32"
    grad_checkpointing: bool = False
    mesh: int | None = None
    """jax: devices along the mesh's ``data`` axis (default: every local device, divided by ``shard``)."""
    shard: int = 1
    """jax: devices along the mesh's ``model`` axis, over which each large matrix is sharded by rows."""

    def quant_spec(self) -> QuantSpec:
        c = self.baseline if self.baseline is not None else self.code_bits
        return QuantSpec(c, self.group_size, self.clip, self.scheme, self.scale_dtype)

    def objective(self) -> Objective:
        if self.full_precision:
            return Objective((), (), {}, False)
        if self.baseline is not None:
            return Objective.build((self.baseline,), None, None, False)
        return Objective.build(
            self.bits, self.lambdas, self.distill, self.extra_precision, self.distill_labels
        )

    def check(self, world: int = 1) -> tuple[QuantSpec, Objective]:
        """Every settings error before anything loads; the spec and objective of the run."""
        if self.backend not in BACKENDS:
            raise TrainConfigError(None, f"unknown backend {self.backend!r}; known: {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(
                None, f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}"
            )
        if self.backend != "jax" and (self.mesh is not None or self.shard != 1):
            raise TrainConfigError(
                None,
                "--mesh and --shard are jax options; torch runs data parallel under torchrun (--fsdp shards)",
            )
        if self.shard < 1:
            raise TrainConfigError(None, f"--shard {self.shard}: give at least 1 device")
        if self.steps < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise TrainConfigError(
                None, "steps, batch size and sequence length must be positive (sequence length >= 2)"
            )
        if self.batch_size % world:
            raise TrainConfigError(
                None, f"batch size {self.batch_size} is not divisible by the world size {world}"
            )
        spec, objective = self.quant_spec(), self.objective()
        if self.out and not self.full_precision:
            check_disjoint(self.out, [self.model_dir, *self.data])
            if os.path.lexists(self.out):
                raise OutputExistsError(self.out, "already exists; choose a new output folder")
        if self.checkpoint_folder():
            check_disjoint(self.checkpoint_folder(), [self.model_dir, *self.data])
        return spec, objective

    def checkpoint_folder(self) -> str | None:
        """Where trainer checkpoints go: ``--checkpoint-dir``, else ``OUT.ckpt``, else nowhere."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        return f"{self.out}.ckpt" if self.out else None

    def source_record(self, objective: Objective, history: list[dict]) -> dict:
        """The ``source`` a trained checkpoint records: trainer, objective, budget, final losses."""
        return {
            "trainer": "matq_train",
            "backend": self.backend,
            "model": os.path.basename(os.path.normpath(self.model_dir)),
            "objective": objective.to_json(),
            "steps": self.steps,
            "tokens": self.steps * self.batch_size * self.seq_len,
            "layers": self.layers,
            "clip": self.clip,
            "final_loss": history[-1]["widths"] if history else None,
        }


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    t = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def check_resumable(saved: dict, cfg: TrainConfig, path) -> None:
    """Refuse a checkpoint whose settings differ from this run's (fields it predates take their defaults)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    now = asdict(cfg)
    diff = sorted(
        k for k in now if k not in RESUMABLE_CHANGES and _norm(saved.get(k, defaults.get(k))) != _norm(now[k])
    )
    if diff:
        raise CheckpointMismatchError(
            path,
            "made with different settings: "
            + ", ".join(f"{k}={saved.get(k, defaults.get(k))!r} (now {now[k]!r})" for k in diff),
        )


STATE_FILE = "trainer.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"


def is_trainer_step(path: Path) -> bool:
    """Whether ``path`` is a complete ``step-N`` folder a trainer wrote (its settings file last)."""
    try:
        return isinstance(json.loads(read_bounded(Path(path) / STATE_FILE, 1 << 24)).get("step"), int)
    except (OSError, ValueError, AttributeError, RecursionError, MatqError):
        return False


TRAINER_STEP = OutputKind(
    "trainer checkpoint", True, is_trainer_step, lambda _: {STATE_FILE, MODEL_FILE, OPTIM_FILE}
)


@contextlib.contextmanager
def checkpoint_folder(directory: Path, step: int, cfg: TrainConfig):
    """``directory/step-N``, built in a partial folder beside it (yielded to the backend, which
    writes ``MODEL_FILE`` and ``OPTIM_FILE``), then the settings file, then published by
    ``AtomicOutput``: a failure or a kill leaves no partial step (the next save removes a killed
    one's), and an existing ``step-N`` is replaced only if it holds nothing but a step's files."""
    inputs = [cfg.model_dir, *cfg.data]
    with AtomicOutput(directory / f"step-{step}", TRAINER_STEP, inputs=inputs, overwrite=True) as o:
        yield o.tmp
        (o.tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=1))
        o.commit()


"""Written last into a ``step-N`` trainer checkpoint folder: its presence marks the folder complete."""


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete ``step-N`` folder (its ``trainer.json`` is written last)."""
    d = Path(directory)
    found = sorted(
        (int(p.name[5:]), p) for p in d.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).exists()
    )
    return found[-1][1] if found else None
