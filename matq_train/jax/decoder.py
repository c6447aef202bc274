"""Decoder-only causal LMs in plain JAX on Hugging Face parameter names: Llama, Mistral, Qwen2, Gemma 2.

transformers no longer ships Flax models, so the forward pass is matq's own. One decoder with
per-family switches read from ``config.json``: token embedding (times ``sqrt(hidden)`` for Gemma 2),
``num_hidden_layers`` blocks of RMSNorm (Gemma's ``1 + w``), grouped-query attention with rotary
embeddings (``rotate_half``, as ``modeling_llama``), optional q/k/v/o biases (Qwen2; Llama's
``attention_bias``), a sliding window on the layers the config marks (Mistral: every layer;
Gemma 2 and Qwen2: ``layer_types``), Gemma 2's ``query_pre_attn_scalar`` scaling, soft-capped
attention and final logits and its norms around both the attention and the feed-forward block, a
gated MLP (SiLU, or gelu_pytorch_tanh for Gemma 2), a final RMSNorm and the head (tied to the
embedding when the config says so). ``tests/test_train_jax.py`` compares the logits of each family
with transformers' float32 model. What it does not implement is refused with one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from ..config import JAX_DECODERS
from .layers import (
    Dropout,
    UnsupportedModelError,
    Weights,
    activation,
    attend,
    causal_mask,
    heads,
    linear,
    rms_norm,
)

__all__ = ["FAMILIES", "DecoderConfig", "forward"]

FAMILIES = JAX_DECODERS
"""The decoder families of the role table (``matq_converters.roles.DECODERS``) this backend implements
(listed in :data:`matq_train.config.JAX_DECODERS`, which ``--help`` reads without importing jax);
each one's switches are below."""


def _rope_theta(cfg: Mapping, path) -> float:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedModelError(path, f"rope type {kind!r} is not implemented in jax")
    return float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _windows(cfg: Mapping, kind: str, n: int) -> tuple[int | None, ...]:
    """The sliding window of each layer (None: full causal attention), as transformers applies it."""
    window = cfg.get("sliding_window")
    if kind == "llama" or (kind == "qwen2" and not cfg.get("use_sliding_window")) or not window:
        return (None,) * n
    if kind == "mistral":  # modeling_mistral windows every layer
        return (int(window),) * n
    types = cfg.get("layer_types")
    if not types:  # configs written before layer_types: the families' defaults
        if kind == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        else:
            first = int(cfg.get("max_window_layers", n))
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


@dataclass(frozen=True)
class DecoderConfig:
    """The fields of ``config.json`` the forward pass reads, with each family's switches resolved."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    act: str = "silu"
    scale: float = 1.0
    windows: tuple[int | None, ...] = ()
    norm_offset: float = 0.0
    embed_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sandwich_norms: bool = False
    attn_dropout: float = 0.0
    causal: ClassVar[bool] = True

    @classmethod
    def from_dict(cls, cfg: Mapping, path=None) -> DecoderConfig:
        """Refuse what this code does not implement, rather than compute something else."""
        kind = cfg.get("model_type")
        if kind not in FAMILIES:
            raise UnsupportedModelError(path, f"model type {kind!r} is not a decoder the jax backend has")
        gemma = kind == "gemma2"
        heads_n, hidden, n = (
            int(cfg["num_attention_heads"]),
            int(cfg["hidden_size"]),
            int(cfg["num_hidden_layers"]),
        )
        head_dim = int(cfg.get("head_dim") or hidden // heads_n)
        act = (
            (cfg.get("hidden_activation") or "gelu_pytorch_tanh") if gemma else cfg.get("hidden_act", "silu")
        )
        activation(act, path)
        return cls(
            family=kind,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=n,
            num_heads=heads_n,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads_n),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg, path),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            act=act,
            scale=float(cfg.get("query_pre_attn_scalar", 256) if gemma else head_dim) ** -0.5,
            windows=_windows(cfg, kind, n),
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=hidden**0.5 if gemma else None,
            attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
            final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
            sandwich_norms=gemma,
            attn_dropout=float(cfg.get("attention_dropout", 0.0)),
        )

    def forward(self, params: Mapping[str, jax.Array], ids: jax.Array, W: Weights | None = None, rng=None):
        return forward(params, ids, self, W, rng)


def _rope(T: int, cfg: DecoderConfig) -> tuple[jax.Array, jax.Array]:
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    freqs = jnp.arange(T, dtype=jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _attention(x, W: Weights, params, p: str, cfg: DecoderConfig, rope, mask, drop) -> jax.Array:
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = heads(linear(x, W, params, f"{p}.q_proj"), H, D)
    k = heads(linear(x, W, params, f"{p}.k_proj"), KV, D)
    v = heads(linear(x, W, params, f"{p}.v_proj"), KV, D)
    cos, sin = rope
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = jnp.repeat(k, H // KV, axis=1), jnp.repeat(v, H // KV, axis=1)
    out = attend(q, k, v, cfg.scale, mask, cfg.attn_softcap, lambda pr: drop(pr, cfg.attn_dropout))
    return linear(out, W, params, f"{p}.o_proj")


def _mlp(x, W: Weights, params, p: str, cfg: DecoderConfig) -> jax.Array:
    gate = activation(cfg.act)(linear(x, W, params, f"{p}.gate_proj"))
    return linear(gate * linear(x, W, params, f"{p}.up_proj"), W, params, f"{p}.down_proj")


def _block(x, W: Weights, params, i: int, cfg: DecoderConfig, rope, mask, drop: Dropout) -> jax.Array:
    """One decoder layer: pre-norm residual blocks (Gemma 2: normed on the way out too)."""
    p = f"model.layers.{i}"

    def norm(h, name):
        return rms_norm(h, params[f"{p}.{name}.weight"], cfg.rms_norm_eps, cfg.norm_offset)

    a = _attention(norm(x, "input_layernorm"), W, params, f"{p}.self_attn", cfg, rope, mask, drop)
    if not cfg.sandwich_norms:
        x = x + a
        return x + _mlp(norm(x, "post_attention_layernorm"), W, params, f"{p}.mlp", cfg)
    x = x + norm(a, "post_attention_layernorm")
    m = _mlp(norm(x, "pre_feedforward_layernorm"), W, params, f"{p}.mlp", cfg)
    return x + norm(m, "post_feedforward_layernorm")


def forward(
    params: Mapping[str, jax.Array],
    ids: jax.Array,
    cfg: DecoderConfig,
    W: Weights | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Logits ``[batch, seq, vocab]`` float32; ``W(name)`` gives each linear weight (fake-quantized or not);
    with ``rng``, the config's attention dropout (0 in the released models of these families)."""
    W = W or (lambda n: params[n])
    drop = Dropout(rng)
    x = params["model.embed_tokens.weight"][ids]
    if cfg.embed_scale is not None:
        x = x * jnp.float32(cfg.embed_scale)
    T = ids.shape[1]
    rope = _rope(T, cfg)
    masks = {w: causal_mask(T, w) for w in set(cfg.windows)}
    for i in range(cfg.num_layers):
        x = _block(x, W, params, i, cfg, rope, masks[cfg.windows[i]], drop)
    x = rms_norm(x, params["model.norm.weight"], cfg.rms_norm_eps, cfg.norm_offset)
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in params
    logits = x @ W("model.embed_tokens.weight" if tied else "lm_head.weight").T
    if cfg.final_softcap:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits
