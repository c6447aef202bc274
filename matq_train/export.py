"""Write a trained model as a matq checkpoint whose slices are the trainer's own fake-quantized weights.

Each fake-quantized layer stores the codes, scales and zero points its forward pass used, so
``ckpt.dequantize(name, r)`` equals ``layer.fake_weight(r)`` bit for bit (a zero-tolerance test
checks every width). Everything else is stored dense as trained; the model's config and tokenizer
travel with the checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from torch import nn

import matq_format as mf
from matq_format import constants as C

from .fakequant import fake_quant_layers

__all__ = ["export_matq"]

_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}


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
    """Export ``model`` (prepared with :func:`matq_train.fakequant.prepare`) to the folder ``out``.

    ``extra_precision`` marks every width below the code width as trained with the extra bucket.
    """
    layers = dict(fake_quant_layers(model))
    if not layers:
        raise ValueError("the model has no fake-quantized layers; call prepare() first")
    specs = {m.spec for m in layers.values()}
    if len(specs) != 1:
        raise ValueError("all fake-quantized layers of one checkpoint must share code bits and parameters")
    spec = specs.pop()
    ep = tuple(r for r in C.SLICE_WIDTHS if r < spec.code_bits) if extra_precision else ()
    skip = {f"{n[: -len('weight')]}{p}" for n in layers for p in ("clip_gamma", "clip_beta")}
    with tempfile.TemporaryDirectory(prefix=".matq-train-side-") as side:
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(side)
        if tokenizer is not None:
            tokenizer.save_pretrained(side)
        with mf.CheckpointWriter(
            out,
            code_bits=spec.code_bits,
            carry_from=side,
            source=source or {},
            overwrite=overwrite,
            inputs=inputs,
        ) as w:
            seen: set[int] = set()
            for name, t in model.state_dict(keep_vars=False).items():
                if name in skip:
                    continue  # learned clipping is folded into the stored scale and zero point
                if name in layers:
                    codes, scale, zero = layers[name].export_params()
                    w.add_quantized(
                        name,
                        codes,
                        scale,
                        zero,
                        dtype="F32",
                        group_size=spec.group_size,
                        scheme=spec.scheme,
                        scale_dtype=spec.scale_dtype,
                        zero_dtype="U8",
                        extra_precision=ep,
                    )
                    continue
                if t.data_ptr() in seen and t.numel():
                    continue  # a tied weight (config.tie_word_embeddings restores it)
                seen.add(t.data_ptr())
                w.add_dense(name, np.ascontiguousarray(t.detach().cpu().numpy()))
    return Path(out)
