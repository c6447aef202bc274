"""Choosing one option per tensor (a width, a type) for the least error within a size budget.

Shared by ``budget:BITS`` plans in matq's own storage bits (:mod:`matq_format.plans`) and in the
bits of an exported file (``matq convert --to gguf|onnx --plan budget:BITS``), which all read the
spec with :func:`parse_budget`. The error of every option is :class:`ErrorWeights`'s: weighted by
the importance a calibrated checkpoint keeps (spec 10.8), so all three spend bits alike.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

from . import progress
from .errors import PlanError
from .numerics import weighted_sq_error

BUDGET_PREFIX = "budget:"


class BudgetTooSmall(ValueError):
    """The cheapest choice for every tensor already exceeds the budget."""

    def __init__(self, minimum: float):
        super().__init__(f"the cheapest choice costs {minimum}")
        self.minimum = minimum


class ErrorWeights:
    """What each tensor's option errors are weighted by (spec 10.8). With a sensitivity kept beside
    the importance: ``sensitivity[row] * importance[col]``, the diagonal Fisher in K-FAC's factored
    form, so an error counts by the rise of the loss it causes and tensors compare fairly (an early
    layer's error, passed through every later one, counts by its effect on the output). Otherwise the
    importance scaled to a mean of 1 per tensor: it says which columns of that tensor matter, while
    tensors are compared by their weights' squared error. Absolute importance alone (the layer's own
    output error) was measured worse: on SmolLM2-135M the budget:6.165 file's KLD went from 0.0759 to
    0.0964, as late layers' large residual activations bought the bits; scaled, 0.0757. A tensor
    without importance (or, beside tensors with one, without sensitivity) counts plain squared
    distances, times the median tensor's mean weight when other tensors keep a sensitivity."""

    def __init__(self, ckpt, names: list[str]):
        self.ckpt = ckpt
        self.kept = [n for n in names if ckpt.has_importance(n)]
        self.sensitive = [n for n in self.kept if ckpt.has_sensitivity(n)]
        self.total = len(names)
        means = [_mean(ckpt.importance(n)) * _mean(ckpt.sensitivity(n)) for n in self.sensitive]
        self.unit = float(np.median(means)) if means else 1.0

    def error(self, name: str, d: np.ndarray) -> float:
        """The error of an option whose decoded weights differ from the reference by ``d``."""
        info = self.ckpt.info(name)
        imp = self.ckpt.importance(name)
        sens = self.ckpt.sensitivity(name)
        if sens is not None:
            return weighted_sq_error(d, imp, info.in_axis, sens)
        if imp is not None:
            mean = _mean(imp)
            imp = np.asarray(imp, np.float64) / mean if mean > 0 else None
        return self.unit * weighted_sq_error(d, imp, info.in_axis)

    @property
    def note(self) -> str:
        """How errors are weighed, said once in the step's title."""
        if not self.kept:
            return "plain squared errors: the checkpoint keeps no importance (matq quantize --calib keeps it)"
        if self.sensitive:
            return (
                f"errors weighted by each tensor's sensitivity and importance, as rises of the loss "
                f"({len(self.sensitive)} of {self.total} tensors keep both)"
            )
        return f"errors weighted by each tensor's importance across its columns ({len(self.kept)} of {self.total} tensors keep one)"


def slicing_errors(ckpt, widths: Mapping[str, Sequence[int]], extra_precision: bool, title: str) -> dict:
    """``{tensor: {width: error}}``: each tensor sliced to each of its widths (ascending), its
    :class:`ErrorWeights` error to its widest; what matq's own plans and the ONNX budget compare
    (the GGUF budget compares the encoded blocks instead). ``title`` starts the progress step."""
    weights, c, err = ErrorWeights(ckpt, list(widths)), ckpt.code_bits, {}
    with progress.stage(f"{title}: slicing error of each width ({weights.note})", len(widths), "tensor") as advance:
        for n, rs in widths.items():
            ref = ckpt.dequantize(n, rs[-1])
            err[n] = {r: weights.error(n, ckpt.dequantize(n, r, extra_precision and r < c) - ref) for r in rs}
            advance(1)
    return err


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a, dtype=np.float64))


def parse_budget(spec: str) -> float:
    """The bits per weight of a ``budget:BITS`` plan spec: one reading, one error type
    (:class:`PlanError` naming the spec) for matq's plans and every exporter's."""
    try:
        budget = float(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        raise PlanError(spec, "budget must be a number of bits per weight, e.g. budget:3.5") from None
    if not math.isfinite(budget) or budget <= 0:
        raise PlanError(spec, "budget must be a positive, finite number of bits per weight, e.g. budget:3.5")
    return budget


def tied(names: Sequence[str], ties: Iterable[Iterable[str]]) -> list[tuple[str, ...]]:
    """``names`` in groups that take one option together: names of one tie, or linked through several
    (a name in two ties joins them), are one group; a name in no tie is a group of its own; names not
    in ``names`` are left out. Groups come in the order of their first name, names in given order.

    The chooser's items when a file holds several tensors as one: llama.cpp stacks per-expert matrices
    into one GGUF tensor of one block type. matq's own checkpoints (``matq slice``) hold every tensor
    at its own width, so they do not tie (a finer choice). ONNX groups a MoE node's expert weights
    without tying them: its item's options are their combinations of widths (the node is QMoE only
    whole)."""
    parent = {n: n for n in names}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = n = parent[parent[n]]
        return n

    for tie in ties:
        members = [root(n) for n in tie if n in parent]
        for m in members[1:]:
            parent[root(m)] = root(members[0])
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(root(n), []).append(n)
    return [tuple(g) for g in groups.values()]


def cheapest_within(
    err: Mapping[Hashable, Mapping[Hashable, float]],
    cost: Mapping[Hashable, Mapping[Hashable, float]],
    limit: float,
) -> dict[Hashable, Hashable]:
    """Per item (a tensor, or a group of :func:`tied` tensors), one option of ``err[item]`` (costs
    ``cost[item]``), so that the summed cost stays within ``limit`` and the summed error is small.

    Greedy, as llama.cpp's and MatQuant's mixed-precision searches: every item starts at its
    cheapest option, then the upgrade with the largest error reduction per unit of cost is bought
    while it fits. Options that another option beats in both cost and error are never taken (an int7
    and an int8 slice written in the same Q8_0 blocks cost the same). Raises :class:`BudgetTooSmall` (with the minimum) when nothing fits.
    """
    options = {n: _frontier(err[n], cost[n]) for n in err}
    choice = {n: opts[0] for n, opts in options.items()}
    spent = sum(cost[n][choice[n]] for n in choice)
    if spent > limit:
        raise BudgetTooSmall(spent)
    while True:
        best, best_gain = None, 0.0
        for n, opts in options.items():
            i = opts.index(choice[n])
            if i + 1 == len(opts):
                continue
            nxt = opts[i + 1]
            dc = cost[n][nxt] - cost[n][choice[n]]
            if spent + dc > limit:
                continue
            gain = (err[n][choice[n]] - err[n][nxt]) / max(dc, 1e-9)
            if best is None or gain > best_gain:
                best, best_gain = (n, nxt, dc), gain
        if best is None:
            return choice
        choice[best[0]] = best[1]
        spent += best[2]


def _frontier(err: Mapping[Hashable, float], cost: Mapping[Hashable, float]) -> list[Hashable]:
    """The options no other option beats in both cost and error, cheapest first."""
    out: list[Hashable] = []
    for o in sorted(err, key=lambda o: (cost[o], err[o])):
        if not out or err[o] < err[out[-1]]:
            out.append(o)
    return out
