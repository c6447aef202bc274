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
are one choice: one width, costing their stacked encoding (one block type) and erring their summed
error. A tensor that feeds several GGUF tensors (gpt-oss's ``gate_up_proj``: its gate and up halves)
costs each as the export encodes it, in a type of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from matq_converters.exporters.gguf import blocks as B
from matq_converters.registry import ConvertOptionError
from matq_format import numerics as N
from matq_format import progress
from matq_format.budget import BudgetTooSmall, ErrorWeights, cheapest_within, tied
from matq_format.numerics import planes_needed


@dataclass(frozen=True)
class Part:
    """One GGUF tensor written from quantized tensors: its sources and, where it holds only some rows
    of its one source (gpt-oss's ``gate_up_proj`` makes two tensors), which, in the file's order."""

    sources: tuple[str, ...]
    rows: np.ndarray | None = None

    def numel(self, ckpt) -> int:
        if self.rows is None:
            return sum(ckpt.info(n).numel for n in self.sources)
        return len(self.rows) * ckpt.info(self.sources[0]).cols


def file_budget_plan(
    ckpt, parts: list[Part], dense: tuple[tuple[str, float, int], ...], budget: float, extra_precision: bool
) -> dict[str, int]:
    """{quantized tensor: width} for a file of at most ``budget`` bits per weight. ``parts``: the
    GGUF tensors written from quantized ones; the checkpoint tensors that feed one are one group,
    which takes one width, as a GGUF tensor has one block type (:func:`matq_format.budget.tied`), and
    costs what the export writes: each of its parts encoded apart. ``dense``: the file's other tensors
    as (name, bits they take, weights). The smallest width of every group is encoded first (its size
    only), so a budget below the smallest file is refused before the rest of the search, which reads
    each tensor's reference weights once."""
    groups = tied(ckpt.quantized_names(), (p.sources for p in parts))
    of = {g: [p for p in parts if p.sources[0] in g] for g in groups}
    fixed = sum(bits for _, bits, _ in dense)
    total = float(sum(n for _, _, n in dense)) + sum(p.numel(ckpt) for p in parts)
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
            slices = _slices(ckpt, g, r, extra_precision)
            cost[g][r] = sum(8.0 * B.encode_compact(_stacked(p, slices)).data.nbytes for p in of[g])
            done(1)
    least = sum(cost[g][widths[g][0]] for g in groups)
    if least > room:
        _too_small(ckpt, budget, (least + fixed) / total)
    with progress.stage(f"budget:{budget:g}: every width", len(groups), "tensor") as done:
        for g in groups:
            _encode(ckpt, g, of[g], widths[g], extra_precision, weights, err[g], cost[g])
            done(1)
    try:
        choice = cheapest_within(err, cost, room)
    except BudgetTooSmall as exc:
        _too_small(ckpt, budget, (exc.minimum + fixed) / total)
    return {n: r for g, r in choice.items() for n in g}


def _slices(ckpt, group: tuple[str, ...], r: int, extra_precision: bool) -> dict[str, B.Slice]:
    ep = extra_precision and r < ckpt.code_bits
    return {n: B.checkpoint_slice(ckpt, n, r, ep) for n in group}


def _stacked(part: Part, slices: dict[str, B.Slice]) -> B.Slice:
    """A part as the file holds it: one tensor of its sources' rows (all, or its own). The order of
    all of them does not change the size or the error (every row is encoded apart, in one type)."""
    return B.stack([slices[n] for n in part.sources], part.rows)


def _encode(
    ckpt, group: tuple[str, ...], parts: list[Part], rs: list[int], ep: bool, weights: ErrorWeights, err, cost
) -> None:
    """The compact encodings of ``group``'s parts at widths ``rs``: their bits, and the
    (importance-weighted) squared error of each part's rows to their slice at the widest of ``rs``."""
    refs = {n: B.checkpoint_slice(ckpt, n, rs[-1], False).dequantize().astype(np.float64) for n in group}
    for r in rs:
        slices, err[r], cost[r] = _slices(ckpt, group, r, ep), 0.0, 0.0
        for part in parts:
            enc = B.encode_compact(_stacked(part, slices))
            err[r] += _part_error(ckpt, weights, part, B.decode(enc), refs)
            cost[r] += 8.0 * enc.data.nbytes


def _part_error(ckpt, weights: ErrorWeights, part: Part, got: np.ndarray, refs: dict) -> float:
    """The error of a part's decoded rows, summed over its sources."""
    if part.rows is not None:
        (name,) = part.sources
        d = np.zeros_like(refs[name])
        d[part.rows] = got - refs[name][part.rows]
        return _weighted(ckpt, weights, name, d)
    start, total = 0, 0.0
    for name in part.sources:
        ref = refs[name]
        total += _weighted(ckpt, weights, name, got[start : start + len(ref)] - ref)
        start += len(ref)
    return total


def _weighted(ckpt, weights: ErrorWeights, name: str, d: np.ndarray) -> float:
    t = ckpt.info(name)
    return weights.error(name, N.from_matrix(d, t.shape, t.in_axis))


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
