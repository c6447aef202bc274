"""Write trained weights as a matq checkpoint, from (name, codes, scale, zero point) records.

A backend hands over, in model order, each fake-quantized weight as the :class:`Quantized` codes,
scales and zero points its forward pass used, and every other tensor as an array; so
``ckpt.dequantize(name, r)`` equals the backend's fake-quantized weight at width r bit for bit (the
tests check every width with zero tolerance). The writer keywords come from the run's
:class:`~matq_train.spec.QuantSpec`. Nothing here imports torch or jax.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

import matq_format as mf
from matq_format import numerics
from matq_format.publish import scratch_dir

from .spec import QuantSpec

__all__ = ["Quantized", "export_records", "input_axis"]


class Quantized(NamedTuple):
    """One weight as stored: codes ``uint8 [rows, cols]``, scale and zero point ``float32 [rows, groups]``;
    or a stack of matrices (spec 10.5): codes in the weight's shape, scale and zero point in
    ``numerics.param_shape`` (their shapes say the input axis: :func:`input_axis`)."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray


def input_axis(
    codes_shape: tuple[int, ...], param_shape: tuple[int, ...], group_size: int | None
) -> int | None:
    """The axis of input features that the parameters' shape implies (spec 10.5: the last or the one
    before), or None for a plain matrix ``[rows, cols]``. Where both fit, every group holds the same
    single column either way, so the last is taken. Neither: ``ValueError``."""
    n = len(codes_shape)
    fits = [
        a for a in (n - 1, n - 2) if numerics.param_shape(codes_shape, group_size, a) == tuple(param_shape)
    ]
    if not fits:
        raise ValueError(f"parameters {list(param_shape)} fit no input axis of codes {list(codes_shape)}")
    return None if n == 2 and fits[0] == 1 else fits[0]


def export_records(
    out: str | os.PathLike,
    records: Iterable[tuple[str, Quantized | np.ndarray]],
    spec: QuantSpec,
    *,
    extra_precision: bool = False,
    side_files: Callable[[Path], None] | None = None,
    carry_from: str | os.PathLike | None = None,
    source: dict | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``records`` to the checkpoint folder ``out`` (atomically, as every matq writer does).

    ``side_files(folder)`` writes the files the checkpoint carries (config, tokenizer) into a
    temporary folder; ``carry_from`` names a model folder whose side files travel as they are (instead);
    ``extra_precision`` marks every width below the code width as trained with the
    extra bucket.
    """
    options = spec.entry_options(extra_precision)
    n_quantized = 0
    with scratch_dir("train-side") as side:
        if side_files is not None:
            side_files(side)
        with mf.CheckpointWriter(
            out,
            code_bits=spec.code_bits,
            carry_from=carry_from if carry_from is not None else side,
            source=source or {},
            overwrite=overwrite,
            inputs=inputs,
        ) as w:
            for name, rec in records:
                if isinstance(rec, Quantized):
                    w.add_quantized(
                        name,
                        rec.codes,
                        rec.scale,
                        rec.zero,
                        dtype="F32",
                        input_axis=input_axis(rec.codes.shape, rec.scale.shape, spec.group_size),
                        **options,
                    )
                    n_quantized += 1
                else:
                    w.add_dense(name, np.ascontiguousarray(rec))
            if not n_quantized:
                raise ValueError("no quantized records: the model has no fake-quantized layers")
    return Path(out)
