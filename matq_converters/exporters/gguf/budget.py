"""``matq convert --to gguf --plan budget:BITS``: widths chosen so the file holds at most BITS bits per
weight as llama.cpp counts them (every tensor's bytes, over every tensor's elements).

Each quantized tensor may take any width its planes serve (int5 and int7 too: in a file, a width
costs its block type's bytes, and Q5_0/Q5_K sit between int4's and int6's types); its cost at a width is the size of what
the compact export writes for it (``gguf_blocks.encode_compact``, encoded here once per width), its
error the squared distance of that encoding's decoded weights to the checkpoint's full-width
weights, weighted per input feature by the importance a calibrated checkpoint keeps
(:class:`matq_format.budget.ErrorWeights`). Unquantized tensors cost what they will take in the
file. :func:`matq_format.budget.cheapest_within` then spends the budget.
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np

from matq_converters.exporters.gguf import blocks as B
from matq_converters.registry import ConvertOptionError
from matq_format import numerics as N
from matq_format import progress
from matq_format.budget import BudgetTooSmall, ErrorWeights, cheapest_within
from matq_format.numerics import planes_needed


def file_budget_plan(
    ckpt, quantized: list[str], dense: tuple[tuple[str, float, int], ...], budget: float, extra_precision: bool
) -> dict[str, int]:
    """{quantized tensor: width} for a file of at most ``budget`` bits per weight; ``dense``: the
    file's other tensors as (name, bits they take, weights). The smallest width of every tensor is
    encoded first (its size only), so a budget below the smallest file is refused before the rest of
    the search, which reads each tensor's reference weights once."""
    c = ckpt.code_bits
    fixed = sum(bits for _, bits, _ in dense)
    total = float(sum(n for _, _, n in dense)) + sum(ckpt.info(n).numel for n in quantized)
    widths = {n: _widths(c, ckpt.info(n).planes) for n in quantized}
    err: dict[str, dict[int, float]] = {n: {} for n in quantized}
    cost: dict[str, dict[int, float]] = {n: {} for n in quantized}
    weights = ErrorWeights(ckpt, quantized)
    room = budget * total * (1 + 1e-12) - fixed  # a budget given as another file's bits per weight
    # (bytes * 8 / weights) admits a file of exactly those bytes
    title = f"budget:{budget:g}: the smallest width of each tensor ({weights.note})"
    with progress.stage(title, len(quantized), "tensor") as done:
        for name in quantized:
            r = widths[name][0]
            sl = B.checkpoint_slice(ckpt, name, r, extra_precision and r < c)
            cost[name][r] = 8.0 * B.encode_compact(sl).data.nbytes
            done(1)
    least = sum(cost[n][widths[n][0]] for n in quantized)
    if least > room:
        _too_small(ckpt, budget, (least + fixed) / total)
    with progress.stage(f"budget:{budget:g}: every width", len(quantized), "tensor") as done:
        for name in quantized:
            _encode(ckpt, name, widths[name], extra_precision, weights, err, cost)
            done(1)
    try:
        return cheapest_within(err, cost, room)
    except BudgetTooSmall as exc:
        _too_small(ckpt, budget, (exc.minimum + fixed) / total)


def _encode(ckpt, name: str, rs: list[int], extra_precision: bool, weights: ErrorWeights, err: dict, cost: dict) -> None:
    """The compact encodings of ``name`` at widths ``rs``: their bits, and their (importance-weighted)
    squared error to the widest slice its planes serve (the last of ``rs``)."""
    t, c = ckpt.info(name), ckpt.code_bits
    ref = B.checkpoint_slice(ckpt, name, rs[-1], False).dequantize().astype(np.float64)
    for r in rs:
        enc = B.encode_compact(B.checkpoint_slice(ckpt, name, r, extra_precision and r < c))
        err[name][r] = weights.error(name, N.from_matrix(B.decode(enc) - ref, t.shape, t.in_axis))
        cost[name][r] = 8.0 * enc.data.nbytes


def _widths(c: int, planes) -> list[int]:
    """The widths from 2 up whose planes are all present, narrowest first."""
    return [r for r in range(2, c + 1) if set(planes_needed(c, r)) <= set(planes)]


def _too_small(ckpt, budget: float, least: float) -> NoReturn:
    raise ConvertOptionError(
        ckpt.path, f"budget:{budget:g} is below the smallest file this checkpoint makes ({least:.3f} bits per weight)"
    )
