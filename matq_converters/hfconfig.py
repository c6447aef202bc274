"""What a Hugging Face ``config.json`` may say, checked before transformers builds a model from it.

transformers builds a model from the config's sizes before it reads a single weight, so a config
that says 10^9 layers costs gigabytes (even on the meta device), and a vocabulary of ``-5``, a string
where a count goes or zero attention heads ends in an exception from deep inside it. :func:`check`
refuses such a config in one line naming it:

- sizes (layers, vocabulary, widths, heads, positions) are whole numbers (not bools, strings or
  floats) or null, none negative, heads and widths at least 1;
- the numbers that decide how much transformers builds are bounded by what the weights hold: layers
  by the block indices in the tensor names (``model.layers.N.``), vocabulary, widths and heads by the
  largest dimension of any tensor;
- ``model_type`` is a string, ``architectures`` a list of strings, flags are booleans.

The same rules hold inside nested configs (``text_config``, ``vision_config``...), bounded by the same
tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from matq_format.errors import MatqError
from matq_format.plans import layer_index

__all__ = ["check", "tensor_bounds"]

LAYER_KEYS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)
"""Block counts: at most the blocks the tensor names hold."""
WIDTH_KEYS = (
    "vocab_size",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
)
"""Sizes of at least 1, at most the largest tensor dimension."""
SIZE_KEYS = (
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "num_key_value_heads",
    "head_dim",
    "moe_intermediate_size",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
)
"""Sizes of at least 0 (some models write 0 for 'none'), at most the largest tensor dimension."""
COUNT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "sliding_window")
"""Whole numbers >= 0 that no tensor bounds (rotary positions are computed, not stored)."""
MAX_COUNT = 1 << 31
FLAG_KEYS = ("tie_word_embeddings", "use_cache", "is_encoder_decoder")


def tensor_bounds(names_and_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> tuple[int, int]:
    """(blocks, largest dimension) of the tensors: one more than the highest block index in their
    names (0 when none is numbered), and the largest size of any of their dimensions."""
    blocks, widest = 0, 0
    for name, shape in names_and_shapes:
        i = layer_index(name)
        if i is not None:
            blocks = max(blocks, i + 1)
        widest = max(widest, *shape, 0)
    return blocks, widest


def check(
    config: dict,
    names_and_shapes: Iterable[tuple[str, tuple[int, ...]]],
    path: str | os.PathLike,
    error: type[MatqError],
) -> None:
    """Raise ``error(path, ...)`` for the first value of ``config`` the rules above refuse."""
    if not isinstance(config, dict):
        raise error(path, "is not a JSON object")
    blocks, widest = tensor_bounds(names_and_shapes)
    _check(config, "", blocks, widest, path, error)


def _check(cfg: dict, where: str, blocks: int, widest: int, path, error) -> None:
    def bad(key: str, what: str) -> MatqError:
        return error(path, f"{where}{key} is {cfg[key]!r}: {what}")

    for key in (*LAYER_KEYS, *WIDTH_KEYS, *SIZE_KEYS, *COUNT_KEYS):
        v = cfg.get(key)
        if v is None:
            continue
        if type(v) is not int:
            raise bad(key, "not a whole number")
        least = 1 if key in WIDTH_KEYS else 0
        if v < least:
            raise bad(key, f"must be at least {least}")
        if key in LAYER_KEYS and v > blocks:
            raise bad(key, f"the weights hold {blocks} numbered block(s)")
        if key in (*WIDTH_KEYS, *SIZE_KEYS) and v > widest:
            raise bad(key, f"larger than any dimension of the weights (at most {widest})")
        if v > MAX_COUNT:
            raise bad(key, f"more than {MAX_COUNT}")
    if "model_type" in cfg and not isinstance(cfg["model_type"], str):
        raise bad("model_type", "not a string")
    archs = cfg.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise bad("architectures", "not a list of class names")
    for key in FLAG_KEYS:
        if key in cfg and cfg[key] is not None and not isinstance(cfg[key], bool):
            raise bad(key, "not true or false")
    for key, sub in cfg.items():
        if isinstance(sub, dict) and (key.endswith("_config") or key in ("encoder", "decoder")):
            _check(sub, f"{where}{key}.", blocks, widest, path, error)
