"""The MatQuant QAT loop in JAX: the core's objective, optax, data parallel over a ``jax.sharding.Mesh``.

Each step is one jitted function: for every :class:`~matq_train.objective.Term` (widest first) a
``value_and_grad`` of that width's loss, the gradients summed (teachers' logits passed on with
``stop_gradient``), global-norm clipping and AdamW written as torch's (decoupled weight decay, the
learning rate of :func:`~matq_train.config.lr_factor` passed in each step). The batch is sharded
along the mesh's ``data`` axis and the parameters replicated, so XLA reduces the gradients across
devices and a run on N devices trains the same model as one (the global batch and the loss
denominators are the same; only summation order differs). Codes, scales and zero points come from
the numerics module once per step (:mod:`.fakequant`). Checkpoints are safetensors plus JSON, no
pickles; the export is the same matq checkpoint the torch backend writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import (
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    TrainConfig,
    TrainConfigError,
    check_resumable,
    checkpoint_folder,
    latest_checkpoint,
    lr_factor,
)
from ..data import TokenBlocks, load_blocks
from ..export import Quantized, export_records
from ..objective import Objective
from ..spec import QuantSpec, select_weights
from .fakequant import codes_for, fake_weight, quantize_host
from .llama import LlamaConfig, forward, load_params

__all__ = ["JaxTrainResult", "make_mesh", "train"]

log = logging.getLogger("matq_train")
UNSUPPORTED = {
    "clip": ("learned", "--clip learned"),
    "fsdp": (True, "--fsdp (the jax backend shards over a mesh: --mesh)"),
    "grad_checkpointing": (True, "--grad-checkpointing"),
    "precision": ("bf16", "--precision bf16"),
    "eval_every": (None, "--eval-every"),
}


@dataclass
class JaxTrainResult:
    """Trained parameters (numpy, Hugging Face names), tokenizer, loss history and speed."""

    params: dict[str, np.ndarray]
    tokenizer: object
    history: list[dict] = field(default_factory=list)
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    steps_run: int = 0
    out: Path | None = None
    quantized: list[str] = field(default_factory=list)
    codes: dict[str, Quantized] = field(default_factory=dict)


def _refuse_unsupported(cfg: TrainConfig) -> None:
    """Options the torch backend has and this one lacks: one line, before anything loads."""
    for name, (bad, flag) in UNSUPPORTED.items():
        value = getattr(cfg, name)
        if (bad is None and value) or (bad is not None and value == bad):
            raise TrainConfigError(None, f"{flag} is not available with --backend jax")
    if cfg.device is not None:
        raise TrainConfigError(
            None, "--device is a torch option; jax uses its default platform (JAX_PLATFORMS)"
        )


def make_mesh(n: int | None) -> Mesh:
    """A one-axis ``data`` mesh over the first ``n`` devices (default: all)."""
    devices = jax.devices()
    if n is not None and n > len(devices):
        raise TrainConfigError(None, f"--mesh {n}: only {len(devices)} jax devices")
    return Mesh(np.array(devices[: n or len(devices)]), ("data",))


# --- loss ---------------------------------------------------------------------------------------------
def _log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _term_loss(params, codes, ids, denom, t, lcfg, spec, ep, teachers, names):
    """One width's weighted loss, its loss per token, and its logits (causal next-token loss)."""

    def W(n):
        if t.bits is None or n not in names:
            return params[n]
        return fake_weight(params[n], codes[n], spec, t.bits, ep)

    logits = forward(params, ids, lcfg, W)
    logp = _log_softmax(logits[:, :-1])
    target = ids[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1).sum()
    value = jnp.zeros((), jnp.float32)
    if t.teacher is not None:
        tp = _log_softmax(teachers[t.teacher][:, :-1])
        value = value + (jnp.exp(tp) * (tp - logp)).sum()
    if t.labels:
        value = value + nll
    return t.weight * value / denom, (nll / target.size, logits)


def make_step(objective: Objective, lcfg: LlamaConfig, spec: QuantSpec, names: frozenset, cfg: TrainConfig):
    """The training step ``(params, opt_state, codes, ids, lr) -> (params, opt_state, total, per)``.

    Each width's gradient is its own jitted call (summed into the previous widths'), and the update
    another: one jitted program for all widths let XLA keep every width's activations at once
    (SmolLM2-135M on the CPU: 1.65x plain fine-tuning's peak memory).
    """
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
    )
    terms, ep, wd = objective.terms(), objective.extra_precision, cfg.weight_decay

    def width_fn(t):
        def grad(params, acc, codes, ids, teacher):
            denom = jnp.float32(ids.shape[0] * (ids.shape[1] - 1))
            teachers = {} if teacher is None else {t.teacher: teacher}
            fn = jax.value_and_grad(_term_loss, has_aux=True)
            (value, (nll, logits)), g = fn(params, codes, ids, denom, t, lcfg, spec, ep, teachers, names)
            acc = g if acc is None else jax.tree_util.tree_map(jnp.add, acc, g)
            return acc, value, nll, (jax.lax.stop_gradient(logits) if t.keep else None)

        return jax.jit(grad)

    grads_of = [width_fn(t) for t in terms]

    @jax.jit
    def apply(params, opt_state, grads, lr):
        updates, opt_state = tx.update(grads, opt_state, params)
        return {n: p - lr * (updates[n] + wd * p) for n, p in params.items()}, opt_state  # torch's AdamW

    def step(params, opt_state, codes, ids, lr):
        acc, total, per, kept = None, jnp.zeros((), jnp.float32), [], {}
        for i, (t, grad) in enumerate(zip(terms, grads_of, strict=True)):
            acc, value, nll, logits = grad(params, acc, codes, ids, kept.get(t.teacher))
            if t.keep:
                kept[t.bits] = logits
            kept = {r: v for r, v in kept.items() if any(u.teacher == r for u in terms[i + 1 :])}
            total, per = total + value, [*per, nll]
        params, opt_state = apply(params, opt_state, acc, lr)
        return params, opt_state, total, jnp.stack(per)

    return tx, step


# --- checkpoints ---------------------------------------------------------------------------------------
def _flat_state(opt_state) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def save_checkpoint(directory: Path, step: int, params, opt_state, cfg: TrainConfig) -> Path:
    """``step-N`` written in a temporary folder and renamed into place: parameters, optimizer, settings."""
    from safetensors.numpy import save_file

    with checkpoint_folder(directory, step, cfg) as tmp:
        save_file({n: np.asarray(v) for n, v in params.items()}, str(tmp / MODEL_FILE))
        save_file(_flat_state(opt_state), str(tmp / OPTIM_FILE))
    return directory / f"step-{step}"


def load_checkpoint(path: Path, params, opt_state, cfg: TrainConfig):
    """Parameters, optimizer state (in ``opt_state``'s structure) and the step to continue from."""
    from safetensors.numpy import load_file

    state = json.loads((path / STATE_FILE).read_text())
    check_resumable(state["config"], cfg, path)
    saved_p, saved_o = load_file(str(path / MODEL_FILE)), load_file(str(path / OPTIM_FILE))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    restored = [saved_o[jax.tree_util.keystr(k)] for k, _ in leaves]
    return (
        {n: saved_p[n] for n in params},
        jax.tree_util.tree_unflatten(treedef, restored),
        int(state["step"]),
    )


# --- the loop ------------------------------------------------------------------------------------------
def _setup(cfg: TrainConfig, spec: QuantSpec):
    """Config, float32 parameters, tokenizer and the quantized weight names."""
    from transformers import AutoTokenizer

    raw, params = load_params(cfg.model_dir)
    lcfg = LlamaConfig.from_dict(raw, cfg.model_dir)
    shapes = {n: ("F32", tuple(v.shape)) for n, v in params.items()}
    names = [] if cfg.full_precision else select_weights(shapes, cfg.layers, raw)
    return lcfg, params, AutoTokenizer.from_pretrained(cfg.model_dir), names


def train(
    cfg: TrainConfig,
    *,
    on_log: Callable[[dict], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    train_blocks: TokenBlocks | None = None,
    eval_blocks: TokenBlocks | None = None,
) -> JaxTrainResult:
    """Train ``cfg.model_dir`` with the MatQuant objective in JAX; export to ``cfg.out`` when set."""
    _refuse_unsupported(cfg)
    mesh = make_mesh(cfg.mesh)
    spec, objective = cfg.check(mesh.size)
    lcfg, params_np, tokenizer, names = _setup(cfg, spec)
    if train_blocks is None:
        train_blocks, _ = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.holdout, cfg.text_field)
    replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx, step_fn = make_step(objective, lcfg, spec, frozenset(names), cfg)
    params = {n: jax.device_put(v, replicated) for n, v in params_np.items()}
    opt_state = jax.device_put(tx.init(params), replicated)
    ckpt_dir = Path(d) if (d := cfg.checkpoint_folder()) else None
    start = 0
    if cfg.resume and ckpt_dir is not None and (found := latest_checkpoint(ckpt_dir)) is not None:
        p, o, start = load_checkpoint(found, params, opt_state, cfg)
        params, opt_state = jax.device_put(p, replicated), jax.device_put(o, replicated)
    labels = [f"int{r}" for r in objective.bits] or ["fp"]
    history, t_train = [], 0.0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        codes = jax.device_put(codes_for(params, names, spec), replicated)
        ids = jax.device_put(train_blocks.batch(step, cfg.batch_size, cfg.seed), by_row)
        lr = jnp.float32(cfg.lr * lr_factor(step, cfg))
        params, opt_state, total, per = step_fn(params, opt_state, codes, ids, lr)
        total.block_until_ready()
        t_train += time.perf_counter() - t0
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
            rec = {
                "step": done,
                "loss": float(total),
                "widths": {n: round(float(v), 5) for n, v in zip(labels, per, strict=True)},
                "lr": float(lr),
                "tokens_per_s": cfg.batch_size * cfg.seq_len / max(time.perf_counter() - t0, 1e-9),
            }
            history.append(rec)
            if on_log is not None:
                on_log(rec)
        if ckpt_dir is not None and cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(ckpt_dir, done, params, opt_state, cfg)
        if on_step is not None:
            on_step(done)
    final = {n: np.asarray(v) for n, v in params.items()}
    steps_run = cfg.steps - start
    res = JaxTrainResult(
        final, tokenizer, history, steps_run * cfg.batch_size * cfg.seq_len / max(t_train, 1e-9)
    )
    res.train_seconds, res.steps_run, res.quantized = t_train, steps_run, list(names)
    res.codes = {n: quantize_host(final[n], spec) for n in names}
    if cfg.out and not cfg.full_precision:
        res.out = _export(cfg, final, res.codes, objective, history, spec)
    return res


def _export(cfg: TrainConfig, params, codes, objective: Objective, history, spec: QuantSpec) -> Path:
    """The same matq checkpoint the torch backend writes: codes of the final weights, the rest dense."""
    records = ((n, codes[n] if n in codes else v) for n, v in params.items())
    return export_records(
        cfg.out,
        records,
        spec,
        extra_precision=objective.extra_precision,
        carry_from=cfg.model_dir,
        source=cfg.source_record(objective, history),
        inputs=[cfg.model_dir, *cfg.data],
    )
