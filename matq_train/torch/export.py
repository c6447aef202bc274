"""A torch model prepared for QAT as export records: its fake-quantized layers' codes, the rest dense.

``ckpt.dequantize(name, r)`` then equals ``layer.fake_weight(r)`` bit for bit (a zero-tolerance
test checks every width). Learned clipping is folded into the stored scales and zero points; tied
weights are stored once (the config restores the tie).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from torch import nn

from ..export import Quantized, export_records
from .fakequant import FakeQuantLinear, fake_quant_layers

__all__ = ["export_matq", "model_records"]


def model_records(
    model: nn.Module, layers: dict[str, FakeQuantLinear]
) -> Iterator[tuple[str, Quantized | np.ndarray]]:
    """``(name, record)`` in state-dict order: quantized layers as :class:`Quantized`, the rest as arrays."""
    skip = {f"{n[: -len('weight')]}{p}" for n in layers for p in ("clip_gamma", "clip_beta")}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if name in skip:
            continue
        if name in layers:
            yield name, layers[name].export_params()
            continue
        if t.data_ptr() in seen and t.numel():
            continue  # a tied weight
        seen.add(t.data_ptr())
        yield name, t.detach().cpu().numpy()


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
