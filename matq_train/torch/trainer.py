"""The MatQuant QAT loop in torch: one process or device, DDP under ``torchrun``, or FSDP2 sharding.

Every step draws the same global batch whatever the world size (``data.TokenBlocks``), so a run on
N processes trains the same model as one process, and a resumed run continues exactly where its
checkpoint left off. Each width runs its forward and its backward before the next width starts
(gradients accumulate; under DDP only the last backward synchronises), so the memory of a step is
that of one width, as in plain fine-tuning; options add gradient checkpointing and bfloat16
autocast, and ``--device`` picks CPU or CUDA. Checkpoints are safetensors plus JSON (no pickles):
the model, the optimizer state and the step, written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from matq_format.errors import MatqError
from matq_torch.device import resolve_device

from ..config import (
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    CheckpointMismatchError,
    OutOfMemoryError,
    TrainConfig,
    TrainConfigError,
    check_resumable,
    checkpoint_folder,
    latest_checkpoint,
    lr_factor,
)
from ..data import TokenBlocks, load_blocks, mask_tokens
from .fakequant import WidthBatches, fake_quant_layers, prepare, width
from .loss import MatQuantStep, token_nll

__all__ = [
    "CheckpointMismatchError",
    "DeviceError",
    "OutOfMemoryError",
    "TrainConfig",
    "TrainConfigError",
    "TrainResult",
    "evaluate",
    "latest_checkpoint",
    "load_model",
    "train",
]

log = logging.getLogger("matq_train")
CPU_ALLOC_FAILED = "DefaultCPUAllocator: can't allocate memory"
"""What torch's CPU allocator says when malloc fails (a host's OOM killer, by contrast, ends the process)."""



class DeviceError(MatqError):
    """A ``--device`` torch cannot use here (no CUDA, an index past the last GPU, an unknown name)."""

    hint = "use --device cpu, or cuda / cuda:N on a machine with that GPU"


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


# --- checkpoints ------------------------------------------------------------------------------------
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
    if rank == 0:
        with checkpoint_folder(directory, step, cfg) as tmp:
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
    return directory / f"step-{step}"


def load_checkpoint(path: Path, model: nn.Module, opt, cfg: TrainConfig) -> int:
    """Restore model and optimizer; return the step to continue from. Settings must match."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = json.loads((path / STATE_FILE).read_text())
    check_resumable(state["config"], cfg, path)
    msd = load_file(str(path / MODEL_FILE))
    with safe_open(str(path / OPTIM_FILE), "pt") as f:
        ometa = json.loads(f.metadata()["meta"])
    osd = _unflatten_optim(load_file(str(path / OPTIM_FILE)), ometa)
    set_state_dict(
        model, opt, model_state_dict=msd, optim_state_dict=osd, options=StateDictOptions(full_state_dict=True)
    )
    return int(state["step"])


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
                dev = next(model.parameters()).device
                x, y = torch.from_numpy(ids).long().to(dev), torch.from_numpy(labels).long().to(dev)
                nll, n = token_nll(model(input_ids=x).logits, y, causal)
                total += float(nll)
                count += int(n)
    finally:
        model.train(was)
    return total / max(count, 1)


# --- devices and options ----------------------------------------------------------------------------
def _autocast(cfg: TrainConfig, device: torch.device):
    """bfloat16 autocast for ``--precision bf16``; nothing for float32."""
    if cfg.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; learned clipping parameters get their own learning rate and no weight decay."""
    clip_params = [p for n, p in model.named_parameters() if n.endswith(("clip_gamma", "clip_beta"))]
    clip_ids = {id(p) for p in clip_params}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in clip_ids], "lr": cfg.lr, "base_lr": cfg.lr}
    ]
    if clip_params:
        groups.append({"params": clip_params, "lr": cfg.clip_lr, "base_lr": cfg.clip_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library, another system)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Hand the pages freed by a width's backward back to the system before the next width runs.

    glibc keeps freed activation buffers of a few MiB in its heap, and the next width's buffers do
    not land in the same holes, so without this the resident size grows with every width of a step
    (SmolLM2-135M, MatQuant [8, 4, 2] on the CPU: 1.30x plain fine-tuning's peak RSS, against 1.06x
    on CUDA, whose caching allocator reuses its blocks). It costs milliseconds per width.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def batched(cfg: TrainConfig, device: torch.device, world: int) -> bool:
    """Quantize whole widths at once (:class:`WidthBatches`): on CUDA, without FSDP's sharded weights."""
    return device.type == "cuda" and not (cfg.fsdp and world > 1)


def _wrap(step_module: MatQuantStep, cfg: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """DDP, FSDP2 or nothing around the step module."""
    if world > 1 and cfg.fsdp:
        _shard(step_module.model)
        return step_module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(step_module, device_ids=ids)
    return step_module


# --- the loop ---------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every step of a run needs."""

    cfg: TrainConfig
    net: nn.Module
    model: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    causal: bool
    tokenizer: object
    rank: int
    world: int
    terms: tuple = ()
    extra_precision: bool = False
    batches: WidthBatches | None = None


def _batch(run: _Run, blocks: TokenBlocks, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's share of global batch ``step`` on the device, and the loss denominator."""
    cfg = run.cfg
    rows = blocks.indices(step, cfg.batch_size, cfg.seed, run.rank, run.world)
    ids = blocks.blocks[rows]
    labels = ids
    if not run.causal:
        ids, labels = mask_tokens(ids, run.tokenizer, cfg.seed, step, rows)
    x, y = torch.from_numpy(ids).long(), torch.from_numpy(labels).long()
    scored = torch.tensor(float(((y[:, 1:] if run.causal else y) != -100).sum()))
    if run.world > 1 and run.device.type == "cuda":
        scored = scored.to(run.device)
    denom = float(_all_mean(scored, run.world))  # global count / world: DDP's averaging gives the global mean
    return x.to(run.device), y.to(run.device), max(denom, 1.0)


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, denom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step: each width's forward and backward in turn; returns (total, per-width losses)."""
    terms, ddp = run.terms, hasattr(run.net, "no_sync")  # DDP: synchronise on the last width only
    teachers: dict[int, torch.Tensor] = {}
    total = torch.zeros((), device=run.device)
    per = []
    for i in range(len(terms)):
        last = i == len(terms) - 1
        sync = run.net.no_sync() if ddp and not last else contextlib.nullcontext()
        if run.batches is not None:
            run.batches.set_width(terms[i].bits, run.extra_precision)
        # the width stays set through backward: gradient checkpointing recomputes at this width
        with sync, width(run.model, terms[i].bits, run.extra_precision):
            with _autocast(run.cfg, run.device):
                value, nll = run.net(x, y, None, denom, i, teachers)
            value.backward()
        if run.batches is not None:
            run.batches.release()
        if run.device.type == "cpu":
            _return_freed_memory()
        total += value.detach()
        per.append(nll)
        for r in [r for r in teachers if all(t.teacher != r for t in terms[i + 1 :])]:
            del teachers[r]  # no later student needs it
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return total, torch.stack(per)


def _setup(cfg: TrainConfig, rank: int, world: int):
    """Model on its device with fake-quantized layers, tokenizer, whether causal, the device."""
    device = resolve_device(cfg.device, DeviceError, auto=True)
    torch.manual_seed(cfg.seed)
    model, tokenizer, causal = load_model(cfg.model_dir)
    model.to(device)
    model.train()
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    return model, tokenizer, causal, device


def enable_checkpointing(model) -> None:
    """Recompute activations in backward, non-reentrant: transformers 5.25 renamed
    ``gradient_checkpointing_enable`` (now a deprecated alias) to ``activation_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
    spec, objective = cfg.check(world)  # settings errors before any loading
    model, tokenizer, causal, device = _setup(cfg, rank, world)
    quantized = [] if cfg.full_precision else prepare(model, cfg.layers, spec)
    if train_blocks is None:
        train_blocks, held = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.holdout, cfg.text_field)
        eval_blocks = eval_blocks or held
    step_module = MatQuantStep(model, objective, causal)
    net = _wrap(step_module, cfg, world, device)  # FSDP2 replaces the parameters: the optimizer comes after
    opt = _optimizer(model, cfg)
    run = _Run(
        cfg,
        net,
        model,
        opt,
        device,
        causal,
        tokenizer,
        rank,
        world,
        step_module.terms,
        objective.extra_precision,
    )
    if batched(cfg, device, world):
        run.batches = WidthBatches([m for _, m in fake_quant_layers(model)])
    ckpt_dir = Path(d) if (d := cfg.checkpoint_folder()) else None
    start = 0
    if cfg.resume and ckpt_dir is not None and (found := latest_checkpoint(ckpt_dir)) is not None:
        start = load_checkpoint(found, model, opt, cfg)
        if rank == 0:
            log.info("resumed from %s at step %d", found, start)
    try:
        history, t_train = _loop(run, start, train_blocks, eval_blocks, objective, ckpt_dir, on_log, on_step)
    except RuntimeError as e:  # torch.OutOfMemoryError on CUDA; the CPU allocator raises a plain one
        if not isinstance(e, torch.OutOfMemoryError) and CPU_ALLOC_FAILED not in str(e):
            raise
        raise OutOfMemoryError(
            None,
            f"a step of {cfg.batch_size} x {cfg.seq_len} tokens does not fit in {device} memory"
            " (--grad-checkpointing and --precision bf16 need less)",
        ) from None
    steps_run = cfg.steps - start
    tokens = steps_run * cfg.batch_size * cfg.seq_len
    result = TrainResult(
        model, tokenizer, history, tokens / max(t_train, 1e-9), t_train, steps_run, None, quantized
    )
    if cfg.out and not cfg.full_precision:
        result.out = _export(cfg, model, tokenizer, spec, objective, history, rank, world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return result


def _loop(run: _Run, start, train_blocks, eval_blocks, objective, ckpt_dir, on_log, on_step):
    """Steps ``start`` .. ``cfg.steps``: the history of logged records and the seconds spent training."""
    cfg, model = run.cfg, run.model
    names = list(objective.labels())
    fq_layers = [m for _, m in fake_quant_layers(model)]
    history: list[dict] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    t_train, t_mark, steps_mark = 0.0, time.perf_counter(), start
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        x, y, denom = _batch(run, train_blocks, step)
        for g in run.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg)
        total, per = _step(run, x, y, denom)
        for layer in fq_layers:
            layer.invalidate()
        if run.batches is not None:
            run.batches.invalidate()
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        t_train += time.perf_counter() - t0
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            rec = {
                "step": done,
                "loss": float(_all_mean(total, run.world)),
                "widths": {
                    n: round(float(v), 5) for n, v in zip(names, _all_mean(per, run.world), strict=True)
                },
                "lr": run.opt.param_groups[0]["lr"],
                "tokens_per_s": (done - steps_mark) * tokens_per_step / max(now - t_mark, 1e-9),
            }
            t_mark, steps_mark = now, done
            if cfg.eval_every and eval_blocks is not None and done % cfg.eval_every == 0 and run.world == 1:
                rec["eval"] = _held_out(run, eval_blocks, objective)
            history.append(rec)
            _report(run, rec, on_log)
        if ckpt_dir is not None and cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt_dir, done, model, run.opt, cfg, run.rank)
        if on_step is not None and run.rank == 0:
            on_step(done)
    return history, t_train


def _held_out(run: _Run, blocks: TokenBlocks, objective) -> dict[str, float]:
    return {
        n: evaluate(
            run.model,
            blocks,
            r,
            extra_precision=objective.extra_precision,
            causal=run.causal,
            tokenizer=run.tokenizer,
        )
        for n, r in objective.labels().items()
    }


def _report(run: _Run, rec: dict, on_log) -> None:
    if run.rank != 0:
        return
    log.info(
        "step %d/%d  loss %.4f  %s  %.0f tok/s",
        rec["step"],
        run.cfg.steps,
        rec["loss"],
        "  ".join(f"{k} {v:.4f}" for k, v in rec["widths"].items()),
        rec["tokens_per_s"],
    )
    if on_log is not None:
        on_log(rec)


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
    return export_matq(
        model,
        cfg.out,
        tokenizer=tokenizer,
        extra_precision=objective.extra_precision,
        source=cfg.source_record(objective, history),
        inputs=[cfg.model_dir, *cfg.data],
    )
