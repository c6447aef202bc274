"""The pieces every JAX model of the backend is built from, on Hugging Face parameter names.

``W(name)`` gives a linear layer's weight (fake-quantized at the width being trained, or float);
biases, norms and embeddings are read from ``params`` as they are. A bias is added when the
folder has one (``{layer}.bias``), so Llama's ``attention_bias``/``mlp_bias``, Qwen2's q/k/v biases
and BERT's dense layers need no switch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import jax
import jax.numpy as jnp

from ..config import TrainConfigError

__all__ = [
    "ACTIVATIONS",
    "Dropout",
    "UnsupportedModelError",
    "Weights",
    "activation",
    "attend",
    "causal_mask",
    "heads",
    "layer_norm",
    "linear",
    "rms_norm",
]

Weights = Callable[[str], jax.Array]
"""``W(name)``: the weight a linear layer computes with."""

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),  # transformers' "gelu" is the exact (erf) one
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
}


class UnsupportedModelError(TrainConfigError):
    """A model the JAX backend has no code for (architecture, rope scaling, activation, attention kind)."""

    hint = "use --backend torch for this model"


def activation(name: str | None, path=None) -> Callable[[jax.Array], jax.Array]:
    """The activation ``config.json`` names, or one line saying the jax backend lacks it."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(path, f"activation {name!r} is not implemented in jax")
    return ACTIVATIONS[name]


class Dropout:
    """Inverted dropout as torch's training mode applies it, a fresh key per call (in call order).

    Without a key (evaluation, or a step that passes none) it is the identity; the trainer passes a
    key derived from the seed, the step and the width, so resumed and sharded runs draw the same masks.
    """

    def __init__(self, key: jax.Array | None = None):
        self.key, self.calls = key, 0

    def __call__(self, x: jax.Array, rate: float) -> jax.Array:
        if self.key is None or not rate:
            return x
        self.calls += 1
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, self.calls), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0.0)


def linear(x: jax.Array, W: Weights, params: Mapping[str, jax.Array], layer: str) -> jax.Array:
    """``x @ W(layer.weight).T``, plus ``layer.bias`` when the model has one."""
    y = x @ W(f"{layer}.weight").T
    bias = params.get(f"{layer}.bias")
    return y if bias is None else y + bias


def rms_norm(x: jax.Array, w: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm; ``offset=1`` is Gemma's ``x_hat * (1 + w)``."""
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return (w + offset if offset else w) * (x * jax.lax.rsqrt(var + eps))


def layer_norm(x: jax.Array, params: Mapping[str, jax.Array], name: str, eps: float) -> jax.Array:
    """``torch.nn.LayerNorm`` (biased variance); old BERT files name its parameters gamma and beta."""
    w = params.get(f"{name}.weight", params.get(f"{name}.gamma"))
    b = params.get(f"{name}.bias", params.get(f"{name}.beta"))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


def heads(x: jax.Array, n: int, d: int) -> jax.Array:
    """``[B, T, n*d]`` -> ``[B, n, T, d]``."""
    B, T, _ = x.shape
    return x.reshape(B, T, n, d).transpose(0, 2, 1, 3)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    mask: jax.Array | None = None,
    softcap: float | None = None,
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Softmax attention over ``[B, H, T, D]`` (softmax in float32), back to ``[B, T, H*D]``.

    ``softcap``: Gemma 2's ``tanh(s / cap) * cap`` of the scaled scores, before the mask;
    ``dropout``: applied to the attention probabilities.
    """
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
    out = (probs if dropout is None else dropout(probs)) @ v
    B, H, T, D = out.shape
    return out.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def causal_mask(T: int, window: int | None = None) -> jax.Array:
    """``[T, T]`` True where query i sees key j: ``j <= i``, and ``j > i - window`` with a sliding window."""
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    keep = j <= i
    return keep & (j > i - window) if window else keep
