"""BERT masked LM (``BertForMaskedLM``) in plain JAX on Hugging Face parameter names.

Post-LN encoder as ``modeling_bert``: word + token type (type 0, as the trainer passes no
``token_type_ids``) + absolute position embeddings, LayerNorm; each layer bidirectional multi-head
attention with biases, ``LayerNorm(x + attention)``, then ``LayerNorm(x + FFN(x))``; the MLM head's
transform (dense, activation, LayerNorm) and its decoder, tied to the word embeddings unless the
config says otherwise, plus the output bias. No attention mask: the trainer's blocks are full.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from .layers import Dropout, UnsupportedModelError, Weights, activation, attend, heads, layer_norm, linear

__all__ = ["BertConfig", "forward"]


@dataclass(frozen=True)
class BertConfig:
    """The fields of ``config.json`` the forward pass reads."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    act: str
    tie_word_embeddings: bool
    hidden_dropout: float = 0.0
    attn_dropout: float = 0.0
    causal: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, cfg: Mapping, path=None) -> BertConfig:
        if cfg.get("model_type") != "bert" or cfg.get("is_decoder"):
            raise UnsupportedModelError(
                path, "the jax backend's encoder is BERT's (model type 'bert', not a decoder)"
            )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(
                path, f"position embeddings {cfg['position_embedding_type']!r} are not implemented in jax"
            )
        act = cfg.get("hidden_act", "gelu")
        activation(act, path)
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            act=act,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            hidden_dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
            attn_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
        )

    def forward(self, params: Mapping[str, jax.Array], ids: jax.Array, W: Weights | None = None, rng=None):
        return forward(params, ids, self, W, rng)


def _layer(x, W: Weights, params, p: str, cfg: BertConfig, drop: Dropout) -> jax.Array:
    H = cfg.num_heads
    D = cfg.hidden_size // H
    q, k, v = (
        heads(linear(x, W, params, f"{p}.attention.self.{n}"), H, D) for n in ("query", "key", "value")
    )
    a = attend(q, k, v, D**-0.5, dropout=lambda pr: drop(pr, cfg.attn_dropout))
    a = drop(linear(a, W, params, f"{p}.attention.output.dense"), cfg.hidden_dropout)
    x = layer_norm(a + x, params, f"{p}.attention.output.LayerNorm", cfg.layer_norm_eps)
    h = activation(cfg.act)(linear(x, W, params, f"{p}.intermediate.dense"))
    h = drop(linear(h, W, params, f"{p}.output.dense"), cfg.hidden_dropout)
    return layer_norm(h + x, params, f"{p}.output.LayerNorm", cfg.layer_norm_eps)


def forward(
    params: Mapping[str, jax.Array],
    ids: jax.Array,
    cfg: BertConfig,
    W: Weights | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """MLM logits ``[batch, seq, vocab]`` float32; ``W(name)`` gives each linear weight; with ``rng``,
    dropout where ``modeling_bert`` applies it in training mode."""
    W = W or (lambda n: params[n])
    drop = Dropout(rng)
    e = "bert.embeddings"
    x = params[f"{e}.word_embeddings.weight"][ids] + params[f"{e}.token_type_embeddings.weight"][0]
    x = x + params[f"{e}.position_embeddings.weight"][jnp.arange(ids.shape[1])]
    x = drop(layer_norm(x, params, f"{e}.LayerNorm", cfg.layer_norm_eps), cfg.hidden_dropout)
    for i in range(cfg.num_layers):
        x = _layer(x, W, params, f"bert.encoder.layer.{i}", cfg, drop)
    t = "cls.predictions.transform"
    h = activation(cfg.act)(linear(x, W, params, f"{t}.dense"))
    h = layer_norm(h, params, f"{t}.LayerNorm", cfg.layer_norm_eps)
    dec = "cls.predictions.decoder.weight"
    tied = cfg.tie_word_embeddings or dec not in params
    bias = params.get("cls.predictions.decoder.bias", params.get("cls.predictions.bias"))
    return h @ W(f"{e}.word_embeddings.weight" if tied else dec).T + bias
