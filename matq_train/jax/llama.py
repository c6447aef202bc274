"""A Llama-family causal LM in plain JAX, on Hugging Face parameter names (no Flax).

transformers no longer ships Flax models, so the forward pass is matq's own: token embedding,
``num_hidden_layers`` blocks of RMSNorm, grouped-query attention with rotary embeddings (the
``rotate_half`` convention of ``modeling_llama``) and a SwiGLU MLP, a final RMSNorm and the head
(tied to the embedding when the config says so). Parameters are a flat ``{HF name: array}`` dict
read from the model's safetensors (``matq_converters.hf_source``), so state dicts, selections and
exports keep the Hugging Face names. ``tests/test_train_jax.py`` compares its logits with
transformers' float32 ``LlamaForCausalLM``. Other architectures are refused with one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..config import TrainConfigError

__all__ = ["LlamaConfig", "UnsupportedModelError", "forward", "load_params"]

SUPPORTED = ("llama", "mistral")


class UnsupportedModelError(TrainConfigError):
    """A model the JAX backend has no code for (architecture, rope scaling, biases, sliding windows)."""

    hint = "use --backend torch for this model"


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of ``config.json`` the forward pass reads."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_dict(cls, cfg: Mapping, path=None) -> LlamaConfig:
        """Refuse what this code does not implement, rather than compute something else."""
        kind = cfg.get("model_type")
        if kind not in SUPPORTED:
            raise UnsupportedModelError(
                path, f"model type {kind!r}: the jax backend trains {', '.join(SUPPORTED)}"
            )
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UnsupportedModelError(
                path, f"rope type {rope.get('rope_type')!r} is not implemented in jax"
            )
        if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("sliding_window"):
            raise UnsupportedModelError(
                path, "attention/MLP biases and sliding windows are not implemented in jax"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                path, f"activation {cfg.get('hidden_act')!r} is not implemented in jax"
            )
        heads = int(cfg["num_attention_heads"])
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


def load_params(model_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``config.json`` as a dict, and every tensor of the folder as float32 numpy arrays."""
    from matq_converters.hf_source import HFSource

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    LlamaConfig.from_dict(cfg, model_dir)
    src = HFSource(model_dir)
    return cfg, {n: np.asarray(src.read(n), dtype=np.float32) for n in src}


def _rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    var = jnp.mean(x * x, axis=-1, keepdims=True)
    return w * (x * jax.lax.rsqrt(var + eps))


def _rope(T: int, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    freqs = jnp.arange(T, dtype=jnp.float32)[:, None] * inv[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _attention(x, W: Callable[[str], jax.Array], p: str, cfg: LlamaConfig, cos, sin) -> jax.Array:
    B, T, _ = x.shape
    H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = (x @ W(f"{p}.q_proj.weight").T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
    k = (x @ W(f"{p}.k_proj.weight").T).reshape(B, T, KV, D).transpose(0, 2, 1, 3)
    v = (x @ W(f"{p}.v_proj.weight").T).reshape(B, T, KV, D).transpose(0, 2, 1, 3)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k, v = jnp.repeat(k, H // KV, axis=1), jnp.repeat(v, H // KV, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) * (D**-0.5)
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    out = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype) @ v
    return out.transpose(0, 2, 1, 3).reshape(B, T, H * D) @ W(f"{p}.o_proj.weight").T


def forward(
    params: Mapping[str, jax.Array], ids: jax.Array, cfg: LlamaConfig, W: Callable | None = None
) -> jax.Array:
    """Logits ``[batch, seq, vocab]`` float32; ``W(name)`` gives each linear weight (fake-quantized or not)."""
    W = W or (lambda n: params[n])
    x = params["model.embed_tokens.weight"][ids]
    cos, sin = _rope(ids.shape[1], cfg)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(x, params[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        x = x + _attention(h, W, f"{p}.self_attn", cfg, cos, sin)
        h = _rms_norm(x, params[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        m = f"{p}.mlp"
        gate, up = h @ W(f"{m}.gate_proj.weight").T, h @ W(f"{m}.up_proj.weight").T
        x = x + (jax.nn.silu(gate) * up) @ W(f"{m}.down_proj.weight").T
    x = _rms_norm(x, params["model.norm.weight"], cfg.rms_norm_eps)
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in params
    return x @ W("model.embed_tokens.weight" if tied else "lm_head.weight").T
