"""A torch model prepared for QAT as export records: its fake-quantized layers' codes, the rest dense.

``ckpt.dequantize(name, r)`` then equals ``layer.fake_weight(r)`` bit for bit (a zero-tolerance
test checks every width). Learned clipping is folded into the stored scales and zero points; tied
weights are stored once (the config restores the tie). Names and layouts are those transformers
saves (a mixture's experts per expert where the Hub checkpoints have them so), so a trained
checkpoint names its tensors as ``matq quantize`` of the same model does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..export import Quantized, export_records, input_axis
from .fakequant import CLIP_PARAMS, FakeQuantLinear, FakeQuantParam, fake_quant_layers

log = logging.getLogger("matq_train")

__all__ = ["export_matq", "model_records"]


def model_records(
    model: nn.Module, layers: dict[str, FakeQuantLinear | FakeQuantParam]
) -> Iterator[tuple[str, Quantized | np.ndarray]]:
    """``(name, record)``: quantized weights as :class:`Quantized`, the rest as arrays, under the names
    and in the layout transformers saves (:func:`_saved_records`); one tensor at a time, in state-dict
    order, for a model transformers saves as it holds it."""
    state = _state(model, layers)
    saved = _saved_records(model, state, layers)
    if saved is not None:
        yield from saved
        return
    for name, t in state.items():
        yield name, layers[name].export_params() if name in layers else t.detach().cpu().numpy()


def _state(model: nn.Module, layers: dict) -> dict:
    """The state dict without learned-clipping parameters and with each tied weight once."""
    out = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if name.rpartition(".")[2] in CLIP_PARAMS and name not in layers:
            continue
        if name not in layers and t.data_ptr() in seen and t.numel():
            continue  # a tied weight
        seen.add(t.data_ptr())
        out[name] = t
    return out


def _saved_records(model: nn.Module, state: dict, layers: dict) -> list | None:
    """The records under the names ``save_pretrained`` writes (transformers 5 fuses a mixture's
    experts in memory, ``mlp.experts.gate_up_proj``, and saves them per expert as the Hub checkpoints
    have them); None when it saves the model as it holds it. Codes, scales and zero points go through
    transformers' own reverse conversion (expert stacks split along experts and rows, never along the
    inputs), so each saved matrix is exactly the rows of its stack. A conversion whose result no longer
    fits a quantized layout (spec 10.5) leaves the in-memory names, with a warning."""
    from transformers.core_model_loading import revert_weight_conversion

    if set(revert_weight_conversion(model, dict(state))) == set(state):
        return None
    records = {n: layers[n].export_params() for n in state if n in layers}
    dense = revert_weight_conversion(model, {n: t for n, t in state.items() if n not in layers})
    parts = [
        revert_weight_conversion(
            model, {n: torch.from_numpy(np.ascontiguousarray(r[i])) for n, r in records.items()}
        )
        for i in range(3)
    ]
    quantized = _regrouped(parts, next(iter(layers.values())).spec.group_size)
    if quantized is None or set(quantized) & set(dense):
        log.warning("the quantized weights fit no layout under transformers' saved names: kept as in memory")
        return None
    out = {n: t.detach().cpu().numpy() for n, t in dense.items()} | quantized
    return sorted(out.items(), key=lambda kv: _natural(kv[0]))


def _regrouped(parts: list[dict], group_size: int | None) -> dict[str, Quantized] | None:
    """Reverted codes, scales and zero points as records; None if one no longer fits a layout
    (spec 10.5: inputs on the last axis or the one before, :func:`~matq_train.export.input_axis`)."""
    codes, scale, zero = parts
    if not set(codes) == set(scale) == set(zero):
        return None
    out = {}
    for n in codes:
        rec = Quantized(*(np.ascontiguousarray(t[n].numpy()) for t in parts))
        try:
            input_axis(rec.codes.shape, rec.scale.shape, group_size)
        except ValueError:
            return None
        if rec.zero.shape != rec.scale.shape:
            return None
        out[n] = rec
    return out


def _natural(name: str) -> tuple:
    """Sort key: layer numbers as numbers (``layers.2`` before ``layers.10``)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def export_matq(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer=None,
    extra_precision: bool = False,
    source: dict | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Export ``model`` (prepared with :func:`matq_train.torch.fakequant.prepare`) to the folder ``out``."""
    layers = dict(fake_quant_layers(model))
    if not layers:
        raise ValueError("the model has no fake-quantized layers; call prepare() first")
    specs = {m.spec for m in layers.values()}
    if len(specs) != 1:
        raise ValueError("all fake-quantized layers of one checkpoint must share code bits and parameters")

    def side_files(folder: Path) -> None:
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    return export_records(
        out,
        model_records(model, layers),
        specs.pop(),
        extra_precision=extra_precision,
        side_files=side_files,
        source=source,
        overwrite=overwrite,
        inputs=inputs,
    )
