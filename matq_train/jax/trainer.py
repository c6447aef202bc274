"""The MatQuant QAT loop in JAX: the core's objective, optax, a ``jax.sharding.Mesh`` of ``data`` x ``model``.

Each step is one jitted function per :class:`~matq_train.objective.Term` (widest first), a
``value_and_grad`` of that width's loss, the gradients summed (teachers' logits passed on with
``stop_gradient``), then global-norm clipping and AdamW written as torch's (decoupled weight decay,
the learning rate of :func:`~matq_train.config.lr_factor` passed in each step). Causal LMs are
scored on the next token, masked LMs (BERT) on the tokens :func:`~matq_train.data.mask_tokens`
masks, seeded as the torch backend seeds them. The batch is sharded along the mesh's ``data``
axis; each 2-D parameter whose rows divide evenly (and its codes, scales, zero points and Adam
moments) is sharded by rows along the ``model`` axis (``--shard``), the rest replicated, and XLA
partitions the computation and reduces the gradients. A run on any mesh trains the same model as
one device: the global batch and loss denominators are the same, only summation order differs.
Codes, scales and zero points come from the numerics module once per step (:mod:`.fakequant`).
Checkpoints are safetensors plus JSON, no pickles; the export is the same matq checkpoint the
torch backend writes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
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
    OutOfMemoryError,
    TrainConfig,
    TrainConfigError,
    check_resumable,
    checkpoint_folder,
    latest_checkpoint,
    lr_factor,
)
from ..data import TokenBlocks, load_blocks, mask_tokens
from ..export import Quantized, export_records
from ..objective import IGNORE, Objective
from ..spec import QuantSpec, select_weights
from .fakequant import codes_for, fake_weight, quantize_host
from .memory import available_bytes, program_bytes, tree_bytes
from .models import ModelConfig, load_params, model_config

__all__ = ["JaxTrainResult", "evaluate", "make_mesh", "param_shardings", "train"]

log = logging.getLogger("matq_train")
UNSUPPORTED = {
    "clip": ("learned", "--clip learned"),
    "fsdp": (True, "--fsdp (the jax backend shards over a mesh: --shard)"),
    "grad_checkpointing": (True, "--grad-checkpointing"),
    "precision": ("bf16", "--precision bf16"),
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
    model: ModelConfig | None = None


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


def make_mesh(n: int | None, shard: int = 1) -> Mesh:
    """A ``data`` x ``model`` mesh: ``n`` devices along ``data`` (default: all there are, over ``shard``)."""
    devices = jax.devices()
    data = n if n is not None else max(len(devices) // shard, 1)
    if data * shard > len(devices):
        what = f"--mesh {n}" if n is not None else "the mesh"
        raise TrainConfigError(
            None, f"{what} x --shard {shard} needs {data * shard} devices: only {len(devices)} jax devices"
        )
    return Mesh(np.array(devices[: data * shard]).reshape(data, shard), ("data", "model"))


def _is_rows(mesh: Mesh, shape: tuple[int, ...]) -> bool:
    """Whether an array is sharded by rows along ``model``: 2-D, with rows that divide evenly."""
    m = mesh.shape["model"]
    return m > 1 and len(shape) == 2 and shape[0] % m == 0


def _row_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Rows along ``model`` for a 2-D array whose rows divide evenly; replicated otherwise."""
    return NamedSharding(mesh, P("model", None) if _is_rows(mesh, shape) else P())


def param_shardings(mesh: Mesh, tree) -> object:
    """The sharding of every array of ``tree`` (parameters, codes, optimizer state) by its shape."""
    return jax.tree_util.tree_map(lambda x: _row_sharding(mesh, np.shape(x)), tree)


def _put(tree, shardings):
    return jax.tree_util.tree_map(jax.device_put, tree, shardings)


# --- loss ---------------------------------------------------------------------------------------------
def _log_softmax(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def _scored(logits: jax.Array, labels: jax.Array, causal: bool):
    """Logits and targets of the scored positions (next token, or masked tokens), and which count."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE
    return logits, jnp.where(keep, labels, 0), keep


def _width_nll(params, codes, ids, labels, model: ModelConfig, spec, bits, ep, names, rng=None):
    """Summed cross-entropy over the scored tokens at width ``bits``, log-probabilities, logits, mask.

    ``rng``: dropout as the model's training mode applies it (None: evaluation, no dropout)."""

    def W(n):
        if bits is None or n not in names:
            return params[n]
        return fake_weight(params[n], codes[n], spec, bits, ep)

    logits = model.forward(params, ids, W, rng)
    scored, target, keep = _scored(logits, labels, model.causal)
    logp = _log_softmax(scored)
    nll = -jnp.where(keep, jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0], 0.0).sum()
    return nll, logp, logits, keep


def _term_loss(params, codes, ids, labels, denom, rng, t, model, spec, ep, teachers, names):
    """One width's weighted loss; its summed cross-entropy, scored-token count and logits."""
    nll, logp, logits, keep = _width_nll(params, codes, ids, labels, model, spec, t.bits, ep, names, rng)
    value = jnp.zeros((), jnp.float32)
    if t.teacher is not None:
        tp = _log_softmax(_scored(teachers[t.teacher], labels, model.causal)[0])
        value = value + jnp.where(keep[..., None], jnp.exp(tp) * (tp - logp), 0.0).sum()
    if t.labels:
        value = value + nll
    return t.weight * value / denom, (nll, keep.sum(), logits)


def _sharded_grad(mesh: Mesh, rows, loss: Callable) -> Callable:
    """``loss``'s value and gradient per device, FSDP-style, under ``shard_map``.

    Each device gathers the row-sharded parameters and codes (``rows``: which leaves are), computes
    its ``data`` shard's loss and gradient with every product whole (as on one device), keeps its
    own rows of each gradient and sums gradients and losses over ``data``. Dropout keys differ per
    ``data`` shard.
    """
    m = mesh.shape["model"]

    def gather(x, r):
        return jax.lax.all_gather(x, "model", axis=0, tiled=True) if r else x

    def own_rows(g, r):
        n = g.shape[0] // m
        return jax.lax.dynamic_slice_in_dim(g, jax.lax.axis_index("model") * n, n, 0) if r else g

    def local(params, codes, ids, labels, denom, rng, teacher):
        whole = jax.tree_util.tree_map(gather, (params, codes), rows)
        rng = jax.random.fold_in(rng, jax.lax.axis_index("data"))
        (value, (nll, count, logits)), g = jax.value_and_grad(loss, has_aux=True)(
            *whole, ids, labels, denom, rng, teacher
        )
        g = jax.tree_util.tree_map(own_rows, g, rows[0])
        g, value, nll, count = jax.lax.psum((g, value, nll, count), "data")
        return g, value, nll / jnp.maximum(count, 1), logits

    def spec(r):
        return P("model", None) if r else P()

    p_spec, c_spec = jax.tree_util.tree_map(spec, rows)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(p_spec, c_spec, P("data"), P("data"), P(), P(), P("data")),
        out_specs=(p_spec, P(), P(), P("data")),
        check_vma=False,
    )


def make_step(
    objective: Objective,
    model: ModelConfig,
    spec: QuantSpec,
    names: frozenset,
    cfg: TrainConfig,
    mesh: Mesh | None = None,
):
    """The training step ``(params, opt_state, codes, ids, labels, denom, lr, rng)`` ->
    ``(params, opt_state, total, per)``; ``rng`` keys the step's dropout.

    Each width's gradient is its own jitted call (summed into the previous widths'), and the update
    another: one jitted program for all widths let XLA keep every width's activations at once
    (SmolLM2-135M on the CPU: 1.65x plain fine-tuning's peak memory). On a mesh with a ``model``
    axis the parameters and codes are gathered for the forward and backward pass (FSDP: every
    product is computed whole, as on one device) and each gradient is kept as its row shard; the
    update keeps every parameter and moment on the sharding it came with.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
        optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
    )
    terms, ep, wd = objective.terms(), objective.extra_precision, cfg.weight_decay

    def width_fn(t):
        def loss(params, codes, ids, labels, denom, rng, teacher):
            teachers = {} if teacher is None else {t.teacher: teacher}
            return _term_loss(params, codes, ids, labels, denom, rng, t, model, spec, ep, teachers, names)

        def grad(params, acc, codes, ids, labels, denom, rng, teacher):
            if mesh is None or mesh.size == 1:
                (value, (nll, count, logits)), g = jax.value_and_grad(loss, has_aux=True)(
                    params, codes, ids, labels, denom, rng, teacher
                )
                nll = nll / jnp.maximum(count, 1)
            else:
                rows = jax.tree_util.tree_map(lambda x: _is_rows(mesh, x.shape), (params, codes))
                fn = _sharded_grad(mesh, rows, loss)
                g, value, nll, logits = fn(params, codes, ids, labels, denom, rng, teacher)
            acc = g if acc is None else jax.tree_util.tree_map(jnp.add, acc, g)
            return acc, value, nll, (jax.lax.stop_gradient(logits) if t.keep else None)

        return jax.jit(grad, donate_argnums=1)  # the running gradient sum is updated in place

    grads_of = [width_fn(t) for t in terms]

    def update(params, opt_state, grads, lr):
        updates, opt_state = tx.update(grads, opt_state, params)
        return {n: p - lr * (updates[n] + wd * p) for n, p in params.items()}, opt_state  # torch's AdamW

    applies: dict = {}

    def apply(params, opt_state, grads, lr):
        if not applies:  # out shardings: those the parameters and moments were placed with
            shardings = jax.tree_util.tree_map(lambda x: x.sharding, (params, opt_state))
            applies["fn"] = jax.jit(update, out_shardings=shardings, donate_argnums=(0, 1))  # in place
        return applies["fn"](params, opt_state, grads, lr)

    def widths(params, codes, ids, labels, denom, rng, call):
        """Each width in turn through ``call(grad, args)``: the gradient sum, each width's (loss, nll)."""
        acc, outs, kept = None, [], {}
        for i, (t, grad) in enumerate(zip(terms, grads_of, strict=True)):
            key = jax.random.fold_in(rng, i)  # each width its own dropout masks, as torch draws anew
            acc, value, nll, logits = call(
                grad, (params, acc, codes, ids, labels, denom, key, kept.get(t.teacher))
            )
            if t.keep:
                kept[t.bits] = logits
            kept = {r: v for r, v in kept.items() if any(u.teacher == r for u in terms[i + 1 :])}
            outs.append((value, nll))
        return acc, outs

    def step(params, opt_state, codes, ids, labels, denom, lr, rng):
        acc, outs = widths(params, codes, ids, labels, denom, rng, lambda grad, args: grad(*args))
        params, opt_state = apply(params, opt_state, acc, lr)
        total = sum((v for v, _ in outs), jnp.zeros((), jnp.float32))
        return params, opt_state, total, jnp.stack([n for _, n in outs])

    def step_bytes(params, codes, ids, labels, denom, rng) -> int | None:
        """Per device, the most any width's program needs beyond the parameters, optimizer state and
        codes (XLA's analysis of the compiled program, plus the gradient sum and teachers' logits
        alive from earlier widths). ``ids``, ``labels`` may be abstract: nothing is run or allocated."""
        need: list[int | None] = []

        def call(grad, args):
            compiled = grad.lower(*args).compile()  # cached: the step's own call does not compile again
            own = program_bytes(compiled)
            need.append(None if own is None else own + tree_bytes((args[1], args[7])))
            return jax.tree_util.tree_map(  # placed as the real outputs, so the next width's lowering is the step's
                lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                jax.eval_shape(grad, *args),
                compiled.output_shardings,
            )

        widths(params, codes, ids, labels, denom, rng, call)
        return None if None in need else max(need, default=0)

    return tx, step, step_bytes


def batch_for(blocks: TokenBlocks, step: int, cfg: TrainConfig, causal: bool, tokenizer):
    """Global batch ``step`` as the torch backend draws it: inputs, labels, scored-token count."""
    rows = blocks.indices(step, cfg.batch_size, cfg.seed)
    ids = blocks.blocks[rows]
    labels = ids
    if not causal:
        ids, labels = mask_tokens(ids, tokenizer, cfg.seed, step, rows)
    scored = int(((labels[:, 1:] if causal else labels) != IGNORE).sum())
    return ids, labels, max(scored, 1)


@partial(jax.jit, static_argnums=(4, 5, 6, 7, 8))
def _eval_nll(params, codes, ids, labels, model, spec, bits, ep, names):
    nll, _, _, keep = _width_nll(params, codes, ids, labels, model, spec, bits, ep, names)
    return nll, keep.sum()


def evaluate(
    params: Mapping[str, np.ndarray],
    model: ModelConfig,
    blocks: TokenBlocks,
    bits: int | None,
    *,
    spec: QuantSpec | None = None,
    names=(),
    extra_precision: bool = False,
    tokenizer=None,
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 1234,
) -> float:
    """Mean held-out negative log-likelihood per token (nats) with ``names`` fake-quantized at ``bits``.

    As the torch backend's ``evaluate``: blocks in order, masked LMs masked with the same seeds.
    """
    names = frozenset(names) if bits is not None else frozenset()
    params = {n: jnp.asarray(v) for n, v in params.items()}
    codes = jax.device_put(codes_for(params, names, spec)) if names else {}
    total, count = 0.0, 0
    for i, ids in enumerate(blocks.sequential(batch_size, limit)):
        labels = ids
        if not model.causal:
            ids, labels = mask_tokens(ids, tokenizer, seed, i, np.arange(len(ids)))
        args = (params, codes, jnp.asarray(ids), jnp.asarray(labels))
        nll, n = _eval_nll(*args, model, spec, bits, bool(extra_precision), names)
        total, count = total + float(nll), count + int(n)
    return total / max(count, 1)


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
def _setup(cfg: TrainConfig):
    """Model config, float32 parameters, tokenizer and the quantized weight names."""
    from transformers import AutoTokenizer

    raw, params = load_params(cfg.model_dir)
    model = model_config(raw, cfg.model_dir)
    shapes = {n: ("F32", tuple(v.shape)) for n, v in params.items()}
    names = [] if cfg.full_precision else select_weights(shapes, cfg.layers, raw)
    return model, params, AutoTokenizer.from_pretrained(cfg.model_dir), names


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
    mesh = make_mesh(cfg.mesh, cfg.shard)
    spec, objective = cfg.check(mesh.shape["data"])
    model, params_np, tokenizer, names = _setup(cfg)
    if train_blocks is None:
        train_blocks, held = load_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.holdout, cfg.text_field)
        eval_blocks = eval_blocks or held
    by_row = NamedSharding(mesh, P("data"))
    tx, step_fn, step_bytes = make_step(objective, model, spec, frozenset(names), cfg, mesh)
    p_shard = param_shardings(mesh, params_np)
    params = _put(params_np, p_shard)
    opt_state = tx.init(params)
    o_shard = param_shardings(mesh, opt_state)
    opt_state = _put(opt_state, o_shard)
    ckpt_dir = Path(d) if (d := cfg.checkpoint_folder()) else None
    start = 0
    if cfg.resume and ckpt_dir is not None and (found := latest_checkpoint(ckpt_dir)) is not None:
        p, o, start = load_checkpoint(found, params, opt_state, cfg)
        params, opt_state = _put(p, p_shard), _put(o, o_shard)
    labels_of = list(objective.labels())
    history, t_train = [], 0.0
    codes = _put(c := codes_for(params, names, spec), param_shardings(mesh, c))
    _check_fits(step_bytes, params, codes, cfg, mesh, start)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        if step > start:
            codes = _put(c := codes_for(params, names, spec), param_shardings(mesh, c))
        ids, labels, denom = batch_for(train_blocks, step, cfg, model.causal, tokenizer)
        ids, labels = jax.device_put(ids, by_row), jax.device_put(labels, by_row)
        lr = jnp.float32(cfg.lr * lr_factor(step, cfg))
        rng = jax.random.fold_in(jax.random.key(cfg.seed), step)
        params, opt_state, total, per = _run_step(
            step_fn, cfg, params, opt_state, codes, ids, labels, jnp.float32(denom), lr, rng
        )
        t_train += time.perf_counter() - t0
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
            rec = {
                "step": done,
                "loss": float(total),
                "widths": {n: round(float(v), 5) for n, v in zip(labels_of, per, strict=True)},
                "lr": float(lr),
                "tokens_per_s": cfg.batch_size * cfg.seq_len / max(time.perf_counter() - t0, 1e-9),
            }
            if cfg.eval_every and eval_blocks is not None and done % cfg.eval_every == 0:
                rec["eval"] = _held_out(params, model, eval_blocks, objective, spec, names, tokenizer)
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
    res.train_seconds, res.steps_run, res.quantized, res.model = t_train, steps_run, list(names), model
    res.codes = {n: quantize_host(final[n], spec) for n in names}
    if cfg.out and not cfg.full_precision:
        res.out = _export(cfg, final, res.codes, objective, history, spec)
    return res


def _run_step(step_fn, cfg: TrainConfig, *args):
    """One step, waited for; an accelerator's allocator failing is ``OutOfMemoryError`` (a host's OOM
    killer ends the process instead, which is why :func:`_check_fits` asks first)."""
    try:
        out = step_fn(*args)
        out[2].block_until_ready()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise OutOfMemoryError(
            None, f"a step of {cfg.batch_size} x {cfg.seq_len} tokens ran out of device memory"
        ) from None
    return out


def _check_fits(step_bytes, params, codes, cfg: TrainConfig, mesh: Mesh, start: int) -> None:
    """Refuse, before the first step, a batch whose step cannot fit in the devices' memory (XLA's estimate)."""
    free = available_bytes(mesh.devices.flat)
    if free is None:
        return
    ids = jax.ShapeDtypeStruct(
        (cfg.batch_size, cfg.seq_len), jnp.int32, sharding=NamedSharding(mesh, P("data"))
    )
    rng = jax.random.fold_in(jax.random.key(cfg.seed), start)
    need = step_bytes(params, codes, ids, ids, jnp.float32(1), rng)
    if need is not None and need > free:
        where = (
            f"{mesh.devices.flat[0].platform} device" if mesh.size == 1 else f"each of {mesh.size} devices"
        )
        raise OutOfMemoryError(
            None,
            f"a step of {cfg.batch_size} x {cfg.seq_len} tokens needs {need / 2**30:.1f} GiB beyond the"
            f" parameters (XLA's estimate) and {where} has {free / 2**30:.1f} GiB available",
        )


def _held_out(params, model: ModelConfig, blocks: TokenBlocks, objective: Objective, spec, names, tokenizer):
    """Held-out nats per token at every width of the objective (``fp`` for full precision)."""
    ep = objective.extra_precision
    return {
        n: evaluate(params, model, blocks, r, spec=spec, names=names, extra_precision=ep, tokenizer=tokenizer)
        for n, r in objective.labels().items()
    }


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
