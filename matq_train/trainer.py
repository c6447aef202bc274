"""The MatQuant QAT loop: one process, DDP under ``torchrun`` (gloo on CPU), or FSDP2 sharding.

Every step draws the same global batch whatever the world size (``data.TokenBlocks``), so a run on
N processes trains the same model as one process, and a resumed run continues exactly where its
checkpoint left off. Checkpoints are safetensors plus JSON (no pickles): the model, the optimizer
state and the step, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from matq_format.errors import MatqError
from matq_format.publish import OutputExistsError, check_disjoint

from .data import TokenBlocks, load_blocks, mask_tokens
from .fakequant import QuantSpec, fake_quant_layers, prepare, width
from .loss import MatQuantStep, Objective, token_nll

__all__ = [
    "CheckpointMismatchError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "evaluate",
    "latest_checkpoint",
    "load_model",
    "train",
]

log = logging.getLogger("matq_train")

STATE_FILE = "trainer.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
# Fields that may change between a run and its resumption; every other field must match.
RESUMABLE_CHANGES = {
    "steps",
    "out",
    "log_every",
    "save_every",
    "resume",
    "checkpoint_dir",
    "threads",
    "eval_every",
    "fsdp",
}


class CheckpointMismatchError(MatqError):
    """A trainer checkpoint made with different settings than the run that tries to resume from it."""

    hint = "resume with the settings the checkpoint was made with, or use a new --checkpoint-dir"


class TrainConfigError(MatqError):
    """Run settings that cannot work together (batch size and world size, an existing output)."""


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


@dataclass
class TrainResult:
    """The trained model (unwrapped), its tokenizer, the loss history and the measured speed."""

    model: nn.Module
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    steps_run: int = 0
    out: Path | None = None
    quantized: list[str] = field(default_factory=list)


# --- model and distributed setup ------------------------------------------------------------------
def is_masked_lm(config) -> bool:
    return any(str(a).endswith("ForMaskedLM") for a in (getattr(config, "architectures", None) or []))


def load_model(model_dir: str | os.PathLike) -> tuple[nn.Module, object, bool]:
    """A Hugging Face causal or masked LM in float32, its tokenizer, and whether it is causal."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    masked = is_masked_lm(config)
    cls = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, not masked


def _dist() -> tuple[int, int]:
    """Join the process group that torchrun (or a test's spawn) describes in the environment."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    import torch.distributed as dist

    x = x.clone()
    dist.all_reduce(x)
    return x / world


def _shard(model: nn.Module) -> None:
    """FSDP2: shard every block Hugging Face marks as not splittable, then the root."""
    from torch.distributed.fsdp import fully_shard

    units = set(getattr(model, "_no_split_modules", None) or [])
    for m in list(model.modules()):
        if type(m).__name__ in units:
            fully_shard(m)
    fully_shard(model)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` at the last step."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    t = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# --- checkpoints ------------------------------------------------------------------------------------
def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete ``step-N`` folder (its ``trainer.json`` is written last)."""
    d = Path(directory)
    found = sorted(
        (int(p.name[5:]), p) for p in d.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).exists()
    )
    return found[-1][1] if found else None


def _flatten_optim(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": osd["param_groups"], "scalars": {}}
    for pname, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pname}\x1f{k}"] = v.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{pname}\x1f{k}"] = v
    return tensors, meta


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pname, k = key.split("\x1f")
        state.setdefault(pname, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: Path, step: int, model: nn.Module, opt, cfg: TrainConfig, rank: int) -> Path:
    """Write ``step-N`` atomically: model, optimizer, settings and step (full state dicts, rank 0 writes)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    final = directory / f"step-{step}"
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.partial-", dir=directory))
        try:
            seen, model_t = set(), {}
            for k, v in msd.items():
                v = v.detach().cpu()
                key = (v.data_ptr(), tuple(v.shape))
                if key in seen:  # tied weights: safetensors refuses shared storage
                    v = v.clone()
                seen.add(key)
                model_t[k] = v.contiguous()
            save_file(model_t, str(tmp / MODEL_FILE))
            ot, ometa = _flatten_optim(osd)
            save_file(ot, str(tmp / OPTIM_FILE), metadata={"meta": json.dumps(ometa)})
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def load_checkpoint(path: Path, model: nn.Module, opt, cfg: TrainConfig) -> int:
    """Restore model and optimizer; return the step to continue from. Settings must match."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = json.loads((path / STATE_FILE).read_text())
    saved, now = state["config"], asdict(cfg)
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and _norm(saved.get(k)) != _norm(now[k]))
    if diff:
        raise CheckpointMismatchError(
            path,
            "made with different settings: "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in diff),
        )
    msd = load_file(str(path / MODEL_FILE))
    with safe_open(str(path / OPTIM_FILE), "pt") as f:
        ometa = json.loads(f.metadata()["meta"])
    osd = _unflatten_optim(load_file(str(path / OPTIM_FILE)), ometa)
    set_state_dict(
        model, opt, model_state_dict=msd, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True)
    )
    return int(state["step"])


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


# --- evaluation -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: TokenBlocks,
    bits: int | dict[str, int] | None,
    *,
    extra_precision: bool = False,
    causal: bool = True,
    tokenizer=None,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 1234,
) -> float:
    """Mean held-out negative log-likelihood per token (log perplexity, nats) at a width."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with width(model, bits, extra_precision):
            for i, ids in enumerate(blocks.sequential(batch_size, limit)):
                labels = ids
                if not causal:
                    ids, labels = mask_tokens(ids, tokenizer, seed, i, np.arange(len(ids)))
                x, y = torch.from_numpy(ids).long(), torch.from_numpy(labels).long()
                nll, n = token_nll(model(input_ids=x).logits, y, causal)
                total += float(nll)
                count += int(n)
    finally:
        model.train(was)
    return total / max(count, 1)


# --- the loop ---------------------------------------------------------------------------------------
def train(
    cfg: TrainConfig,
    *,
    on_log: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    train_blocks: TokenBlocks | None = None,
    eval_blocks: TokenBlocks | None = None,
) -> TrainResult:
    """Train ``cfg.model_dir`` with the MatQuant objective; export to ``cfg.out`` when set.

    ``on_log`` receives a record every ``log_every`` steps (step, loss, loss per width, lr,
    tokens/s); ``on_step`` every step (for progress bars). ``train_blocks`` skips reading ``cfg.data``.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world = _dist()
    if cfg.batch_size % world:
        raise TrainConfigError(
            None, f"batch size {cfg.batch_size} is not divisible by the world size {world}"
        )
    if cfg.out and not cfg.full_precision:
        check_disjoint(cfg.out, [cfg.model_dir, *cfg.data])
        if os.path.lexists(cfg.out):
            raise OutputExistsError(cfg.out, "already exists; choose a new output folder")
    if cfg.steps < 1 or cfg.seq_len < 2 or cfg.batch_size < 1:
        raise TrainConfigError(
            None, "steps, batch size and sequence length must be positive (sequence length >= 2)"
        )
    spec, objective = cfg.quant_spec(), cfg.objective()  # settings errors before any loading
    torch.manual_seed(cfg.seed)
    model, tokenizer, causal = load_model(cfg.model_dir)
    model.train()
    quantized = [] if cfg.full_precision else prepare(model, cfg.layers, spec)
    if train_blocks is None:
        train_blocks, held = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.holdout, cfg.text_field)
        eval_blocks = eval_blocks or held

    step_module = MatQuantStep(model, objective, causal)
    if world > 1 and cfg.fsdp:
        _shard(model)
        net: nn.Module = step_module
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(step_module)
    else:
        net = step_module

    clip_params = [p for n, p in model.named_parameters() if n.endswith(("clip_gamma", "clip_beta"))]
    clip_ids = {id(p) for p in clip_params}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in clip_ids], "lr": cfg.lr, "base_lr": cfg.lr}
    ]
    if clip_params:
        groups.append({"params": clip_params, "lr": cfg.clip_lr, "base_lr": cfg.clip_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    ckpt_dir = (
        Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else (Path(f"{cfg.out}.ckpt") if cfg.out else None)
    )
    start = 0
    if cfg.resume and ckpt_dir is not None and (found := latest_checkpoint(ckpt_dir)) is not None:
        start = load_checkpoint(found, model, opt, cfg)
        if rank == 0:
            log.info("resumed from %s at step %d", found, start)

    names = [f"int{r}" for r in objective.bits] or ["fp"]
    fq_layers = [m for _, m in fake_quant_layers(model)]
    history: list[dict] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_train, t_mark, steps_mark = 0.0, time.perf_counter(), start
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        rows = train_blocks.indices(step, cfg.batch_size, cfg.seed, rank, world)
        ids = train_blocks.blocks[rows]
        labels = ids
        if not causal:
            ids, labels = mask_tokens(ids, tokenizer, cfg.seed, step, rows)
        x, y = torch.from_numpy(ids).long(), torch.from_numpy(labels).long()
        scored = torch.tensor(float(((y[:, 1:] if causal else y) != -100).sum()))
        denom = float(_all_mean(scored, world))  # global count / world: DDP's averaging gives the global mean
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg)
        total, per = net(x, y, None, max(denom, 1.0))
        total.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for layer in fq_layers:
            layer.invalidate()
        t_train += time.perf_counter() - t0
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
            per = _all_mean(per, world)
            now = time.perf_counter()
            rec = {
                "step": done,
                "loss": float(_all_mean(total.detach(), world)),
                "widths": {n: round(float(v), 5) for n, v in zip(names, per, strict=True)},
                "lr": opt.param_groups[0]["lr"],
                "tokens_per_s": (done - steps_mark) * tokens_per_step / max(now - t_mark, 1e-9),
            }
            t_mark, steps_mark = now, done
            if cfg.eval_every and eval_blocks is not None and done % cfg.eval_every == 0 and world == 1:
                rec["eval"] = {
                    n: evaluate(
                        model,
                        eval_blocks,
                        r,
                        extra_precision=objective.extra_precision,
                        causal=causal,
                        tokenizer=tokenizer,
                    )
                    for n, r in zip(names, objective.bits or (None,), strict=True)
                }
            history.append(rec)
            if rank == 0:
                log.info(
                    "step %d/%d  loss %.4f  %s  %.0f tok/s",
                    done,
                    cfg.steps,
                    rec["loss"],
                    "  ".join(f"{k} {v:.4f}" for k, v in rec["widths"].items()),
                    rec["tokens_per_s"],
                )
                if on_log is not None:
                    on_log(rec)
        if ckpt_dir is not None and cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt_dir, done, model, opt, cfg, rank)
        if on_step is not None and rank == 0:
            on_step(done)
    steps_run = cfg.steps - start
    result = TrainResult(
        model,
        tokenizer,
        history,
        steps_run * tokens_per_step / max(t_train, 1e-9),
        t_train,
        steps_run,
        None,
        quantized,
    )
    if cfg.out and not cfg.full_precision:
        result.out = _export(cfg, model, tokenizer, spec, objective, history, rank, world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def _export(cfg, model, tokenizer, spec, objective, history, rank, world) -> Path | None:
    from .export import export_matq

    if cfg.fsdp and world > 1:  # gather the full weights, then export from an unsharded copy on rank 0
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank != 0:
            return None
        model, _, _ = load_model(cfg.model_dir)
        prepare(model, cfg.layers, spec)
        model.load_state_dict(full)
    elif rank != 0:
        return None
    source = {
        "trainer": "matq_train",
        "model": os.path.basename(os.path.normpath(cfg.model_dir)),
        "objective": objective.to_json(),
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "layers": cfg.layers,
        "clip": cfg.clip,
        "final_loss": history[-1]["widths"] if history else None,
    }
    return export_matq(
        model,
        cfg.out,
        tokenizer=tokenizer,
        extra_precision=objective.extra_precision,
        source=source,
        inputs=[cfg.model_dir, *cfg.data],
    )
