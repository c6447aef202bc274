"""``matq convert --to gguf --plan budget:BITS``: widths chosen so the file holds at most BITS bits per
weight as llama.cpp counts them (every tensor's bytes, over every tensor's elements).

Each quantized tensor may take any width its planes serve (int5 and int7 too: in a file, a width
costs its block type's bytes, and Q5_0/Q5_K sit between int4's and int6's types); its cost at a width is the size of what
the compact export writes for it (``gguf_blocks.encode_compact``, encoded here once per width), its
error the squared distance of that encoding's decoded weights to the checkpoint's full-width
weights, weighted per input feature by the importance a calibrated checkpoint keeps
(:class:`matq_format.budget.ErrorWeights`). Unquantized tensors cost what they will take in the
file. :func:`matq_format.budget.cheapest_within` then spends the budget. Checkpoint tensors that
llama.cpp's converter stacks into one GGUF tensor (Mixtral's and Qwen3-MoE's per-expert matrices)
are one choice: one width, costing their stacked encoding (one block type) and erring their summed error.
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
    ckpt, groups: list[tuple[str, ...]], dense: tuple[tuple[str, float, int], ...], budget: float, extra_precision: bool
) -> dict[str, int]:
    """{quantized tensor: width} for a file of at most ``budget`` bits per weight. ``groups``: the
    quantized tensors as the file holds them (:func:`matq_format.budget.tied`: per-expert matrices
    stacked into one GGUF tensor are one group, which takes one width, as a GGUF tensor has one block
    type); ``dense``: the file's other tensors as (name, bits they take, weights). The smallest width
    of every group is encoded first (its size only), so a budget below the smallest file is refused
    before the rest of the search, which reads each tensor's reference weights once."""
    fixed = sum(bits for _, bits, _ in dense)
    total = float(sum(n for _, _, n in dense)) + sum(ckpt.info(n).numel for g in groups for n in g)
    widths = {g: _shared_widths(ckpt, g) for g in groups}
    err: dict[tuple[str, ...], dict[int, float]] = {g: {} for g in groups}
    cost: dict[tuple[str, ...], dict[int, float]] = {g: {} for g in groups}
    weights = ErrorWeights(ckpt, [n for g in groups for n in g])
    room = budget * total * (1 + 1e-12) - fixed  # a budget given as another file's bits per weight
    # (bytes * 8 / weights) admits a file of exactly those bytes
    title = f"budget:{budget:g}: the smallest width of each tensor ({weights.note})"
    with progress.stage(title, len(groups), "tensor") as done:
        for g in groups:
            r = widths[g][0]
            cost[g][r] = 8.0 * B.encode_compact(_slice(ckpt, g, r, extra_precision)).data.nbytes
            done(1)
    least = sum(cost[g][widths[g][0]] for g in groups)
    if least > room:
        _too_small(ckpt, budget, (least + fixed) / total)
    with progress.stage(f"budget:{budget:g}: every width", len(groups), "tensor") as done:
        for g in groups:
            _encode(ckpt, g, widths[g], extra_precision, weights, err[g], cost[g])
            done(1)
    try:
        choice = cheapest_within(err, cost, room)
    except BudgetTooSmall as exc:
        _too_small(ckpt, budget, (exc.minimum + fixed) / total)
    return {n: r for g, r in choice.items() for n in g}


def _slice(ckpt, group: tuple[str, ...], r: int, extra_precision: bool) -> B.Slice:
    """The group at width ``r`` as the file holds it: one tensor of all its rows. Their order does not
    change the size or the error (every row is encoded apart, in one type chosen for all)."""
    ep = extra_precision and r < ckpt.code_bits
    return B.stack([B.checkpoint_slice(ckpt, n, r, ep) for n in group])


def _encode(ckpt, group: tuple[str, ...], rs: list[int], ep: bool, weights: ErrorWeights, err: dict, cost: dict) -> None:
    """The compact encodings of ``group`` at widths ``rs``: their bits, and the (importance-weighted)
    squared error of each tensor's rows to its slice at the widest of ``rs``, summed over the group."""
    refs = [B.checkpoint_slice(ckpt, n, rs[-1], False).dequantize().astype(np.float64) for n in group]
    for r in rs:
        enc = B.encode_compact(_slice(ckpt, group, r, ep))
        got, start, err[r] = B.decode(enc), 0, 0.0
        for name, ref in zip(group, refs, strict=True):
            t = ckpt.info(name)
            err[r] += weights.error(name, N.from_matrix(got[start : start + len(ref)] - ref, t.shape, t.in_axis))
            start += len(ref)
        cost[r] = 8.0 * enc.data.nbytes


def _shared_widths(ckpt, group: tuple[str, ...]) -> list[int]:
    """The widths every tensor of ``group`` serves, narrowest first."""
    c = ckpt.code_bits
    rs = sorted(set.intersection(*(set(_widths(c, ckpt.info(n).planes)) for n in group)))
    if not rs:
        raise ConvertOptionError(
            ckpt.path, f"{', '.join(group)} are one GGUF tensor but their planes serve no width in common"
        )
    return rs


def _widths(c: int, planes) -> list[int]:
    """The widths from 2 up whose planes are all present, narrowest first."""
    return [r for r in range(2, c + 1) if set(planes_needed(c, r)) <= set(planes)]


def _too_small(ckpt, budget: float, least: float) -> NoReturn:
    raise ConvertOptionError(
        ckpt.path, f"budget:{budget:g} is below the smallest file this checkpoint makes ({least:.3f} bits per weight)"
    )
