"""Train-free slicing: a smaller checkpoint holding only the planes a width or plan needs.

Planes are copied as they are stored (no unpacking), so the sliced checkpoint dequantizes
bit-identically to slicing the source, and still serves every narrower width.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from . import constants as C
from . import numerics
from .checkpoint import Checkpoint
from .checkpoint import open as open_checkpoint
from .errors import PlanError
from .plans import resolve_plan
from .writer import CheckpointWriter


def slice_checkpoint(
    src: str | os.PathLike | Checkpoint,
    out: str | os.PathLike,
    *,
    bits: int | None = None,
    plan: str | dict | None = None,
    extra_precision: bool = False,
    single_file: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write ``out`` with, per quantized tensor, only the planes its width needs."""
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(src)
    if (bits is None) == (plan is None):
        raise PlanError(ckpt.path, "give exactly one of bits or plan")
    widths = resolve_plan(bits if plan is None else plan, ckpt, extra_precision=extra_precision)
    source = dict(ckpt.source)
    source["sliced_from"] = ckpt.digest
    source["slice"] = {
        "plan": plan if isinstance(plan, str) else ("custom" if plan is not None else str(bits)),
        "widths": sorted(set(widths.values())),
        "extra_precision": bool(extra_precision),
    }
    carry = None if single_file else (ckpt.carried_bytes() or None)  # checked, never laundered
    with CheckpointWriter(
        out,
        ckpt.code_bits,
        single_file=single_file,
        carry_from=carry,
        source=source,
        overwrite=overwrite,
        extensions=ckpt.manifest.get("extensions"),
        must_understand=[m for m in ckpt.manifest.get("must_understand", []) if m != C.EXT_WIDTH_PARAMS],
        expected_tensors=len(ckpt.tensor_names()),
        inputs=ckpt.input_paths(),
        constant_zero=False,  # each tensor keeps its zero points as the source stores them
    ) as w:
        for name in ckpt.tensor_names():
            t = ckpt.info(name)
            if not t.quantized:  # copied file to file: constant memory, and any shape the format allows
                src, offset, nbytes = ckpt.dense_location(name)
                crc = w.add_dense_from_file(name, src, offset, nbytes, t.dtype, t.shape, extras=t.extras)
                ckpt.check_copied(name, crc)
                if progress:
                    progress(1)
                continue
            need = numerics.planes_needed(ckpt.code_bits, widths[name])
            w.add_quantized_planes(
                name,
                {k: ckpt.plane(name, k) for k in need},
                ckpt.scale(name),
                ckpt.zero(name) if t.zero_point is None else t.zero_point,
                shape=t.shape,
                dtype=t.dtype,
                group_size=t.group_size,
                scheme=t.scheme,
                scale_dtype=t.scale_dtype,
                zero_dtype=t.zero_dtype,
                extra_precision=t.extra_precision,
                extras=t.extras,
                input_axis=t.input_axis,
                width_params=_kept_widths(ckpt, name, widths[name]),
                importance=ckpt.importance(name, as_stored=True),  # spec 10.8: kept whatever the width
                sensitivity=ckpt.sensitivity(name, as_stored=True),
            )
            if progress:
                progress(1)
    return Path(out)


def _kept_widths(ckpt: Checkpoint, name: str, top: int) -> dict:
    """The per-width parameters (spec 10.7) of the widths the slice still serves and the checkpoint
    holds (a partial copy may lack some), copied as stored."""
    kept = {}
    for r in ckpt.info(name).width_specs(ckpt.code_bits):
        p = ckpt.width_params(name, r) if r <= top else None
        if p is not None:
            kept[r] = p
    return kept
