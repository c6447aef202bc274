"""Mix'n'Match plans: a width per quantized tensor, chosen after training without retraining.

A plan spec is one of:
  ``4``                        every tensor at int4
  ``pyramid`` / ``reverse_pyramid`` / ``increasing`` / ``decreasing`` [``:2,4,8``]
                               layer-position patterns over the given widths (default 2,4,8)
  ``budget:3.5``               the least slicing error within an average of 3.5 bits per weight
                               (codes, scales, zero points and the extra bucket included)
  a path to a JSON file        ``{"default": 4, "layers": {"0-1": 2, "12": 8}, "patterns": {"down_proj": 8}}``
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import constants as C
from . import numerics
from .budget import BUDGET_PREFIX, BudgetTooSmall, cheapest_within, parse_budget, slicing_errors
from .errors import PlanError, WidthError
from .safefs import read_bounded

PATTERNS = ("pyramid", "reverse_pyramid", "increasing", "decreasing")
DEFAULT_PATTERN_WIDTHS = (2, 4, 8)
BUDGET_WIDTHS = (2, 3, 4, 6, 8)
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """Transformer block index in a tensor name (``model.layers.3.mlp...`` -> 3), if any."""
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class PlanSummary:
    widths: dict[str, int]
    extra_precision: bool
    bits_per_weight: float
    weights: int
    bytes_read: int


def resolve_plan(spec: str | int | dict, ckpt, *, extra_precision: bool = False) -> dict[str, int]:
    """Turn a plan spec into ``{tensor name: width}`` for every quantized tensor of ``ckpt``."""
    names = ckpt.quantized_names()
    c = ckpt.code_bits
    if isinstance(spec, dict):
        plan = {n: int(spec.get(n, c)) for n in names}
    else:
        text = str(spec).strip()
        if text.isdigit():
            plan = dict.fromkeys(names, int(text))
        elif text.split(":", 1)[0] in PATTERNS:
            plan = _pattern_plan(text, names, c)
        elif text.startswith(BUDGET_PREFIX):
            plan = _budget_plan(text, ckpt, extra_precision)
        elif Path(text).is_file():
            plan = _file_plan(Path(text), names, c)
        else:
            raise PlanError(
                text, f"unknown plan; use a width, one of {', '.join(PATTERNS)}, budget:BITS, or a JSON file"
            )
    for name, r in plan.items():
        if not 1 <= r <= c:
            raise PlanError(ckpt.path, f"{name}: width {r} outside 1..{c}")
        avail = ckpt.info(name).max_width(c)
        if r > avail:
            raise PlanError(
                ckpt.path, f"{name}: width {r} needs planes this checkpoint lacks (it serves up to {avail})"
            )
    if extra_precision and plan and all(r >= c for r in plan.values()):
        raise WidthError(
            ckpt.path,
            f"extra precision needs a width below the code width {c}; this plan serves every tensor at {c}",
        )
    return plan


def _pattern_widths(text: str) -> tuple[str, tuple[int, ...]]:
    kind, _, rest = text.partition(":")
    try:
        widths = tuple(sorted(int(x) for x in rest.split(","))) if rest else DEFAULT_PATTERN_WIDTHS
    except ValueError:
        raise PlanError(text, "pattern widths must be integers, e.g. pyramid:2,4,8") from None
    return kind, widths


def _pattern_plan(text: str, names: list[str], c: int) -> dict[str, int]:
    kind, widths = _pattern_widths(text)
    if bad := [r for r in widths if not 1 <= r <= c]:
        raise PlanError(text, f"width {bad[0]} outside 1..{c}")
    layers = sorted({i for n in names if (i := layer_index(n)) is not None})
    if not layers:
        raise PlanError(text, "pattern plans need tensors with layer indices (e.g. model.layers.N.)")
    lo, hi = layers[0], layers[-1]
    nb = len(widths)

    def width(i: int | None) -> int:
        if i is None:
            return widths[-1]
        x = 0.0 if hi == lo else (i - lo) / (hi - lo)
        if kind in ("pyramid", "reverse_pyramid"):
            t = 1.0 - abs(2.0 * x - 1.0)  # 0 at both ends, 1 in the middle
        else:
            t = x
        if kind in ("reverse_pyramid", "decreasing"):
            t = 1.0 - t
        return widths[min(int(t * nb), nb - 1)]

    return {n: width(layer_index(n)) for n in names}


PLAN_MAX_BYTES = 1 << 20


def _width(value, where: str) -> int:
    """A plan's width: a whole JSON number (``true`` and ``4.9`` are not widths)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: width {json.dumps(value)[:20]} is not a whole number")
    return value


def _object(doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be an object")
    return value


def _parse_layers(key: str) -> range:
    a, _, b = key.partition("-")
    return range(int(a), int(b or a) + 1)


def _file_plan(path: Path, names: list[str], c: int) -> dict[str, int]:
    try:
        doc = json.loads(read_bounded(path, PLAN_MAX_BYTES))
        if isinstance(doc, dict) and "extra_precision" in doc:
            raise PlanError(path, "extra precision is not part of a plan: ask for it with the plan (--extra-precision)")
        if not isinstance(doc, dict) or not set(doc) <= {"default", "layers", "patterns"}:
            raise ValueError("expected an object with default, layers, patterns")
        default = _width(doc.get("default", c), "default")
        layers = [(_parse_layers(k), _width(v, f"layers {k!r}")) for k, v in _object(doc, "layers").items()]
        patterns = [(re.compile(k), _width(v, f"pattern {k!r}")) for k, v in _object(doc, "patterns").items()]
    except (ValueError, TypeError, re.error, RecursionError, OverflowError) as exc:
        raise PlanError(path, f"not a valid plan file: {exc}") from None
    plan = {}
    for n in names:
        r = default
        i = layer_index(n)
        for rng, v in layers:
            if i is not None and i in rng:
                r = v
        for rx, v in patterns:
            if rx.search(n):
                r = v
        plan[n] = r
    for rx, _ in patterns:
        if not any(rx.search(n) for n in names):
            raise PlanError(path, f"pattern {rx.pattern!r} matches no quantized tensor")
    return plan


def tensor_bits(ckpt, name: str, bits: int, extra_precision: bool, share: float | None = None) -> float:
    """Bits per weight of one tensor served at ``bits``: codes, parameters, extra bucket."""
    t = ckpt.info(name)
    if 0 in t.shape:  # holds no weight: costs nothing per weight (and divides by nothing)
        return 0.0
    ep = extra_precision and bits < ckpt.code_bits
    if ep and share is None:
        k = ckpt.sliced_codes(name, bits, extra_precision=True)  # reads only the planes this width needs
        share = float(np.count_nonzero(k == (1 << bits)) / max(k.size, 1))
    return numerics.bits_per_weight(
        bits,
        t.rows,
        t.cols,
        t.group_size,
        C.DTYPES[t.scale_dtype][1],
        t.zero_bytes,
        share if ep else 0.0,
    )


def summarize(ckpt, plan: dict[str, int], extra_precision: bool = False) -> PlanSummary:
    """Average served bits per weight and bytes read for a plan."""
    total_bits = 0.0
    weights = 0
    read = 0
    for name, r in plan.items():
        n = ckpt.info(name).numel
        total_bits += tensor_bits(ckpt, name, r, extra_precision) * n
        weights += n
        read += ckpt.bytes_for_width(name, r)
    return PlanSummary(plan, extra_precision, total_bits / max(weights, 1), weights, read)


def _budget_plan(text: str, ckpt, extra_precision: bool) -> dict[str, int]:
    """Greedy: start every tensor at the narrowest width, then buy the upgrade with the best error
    reduction per bit until the budget is spent. Error = squared distance to the full-width weights,
    weighted by the importance a calibrated checkpoint keeps (:class:`ErrorWeights`).
    The sizes are counted first: a budget below the narrowest plan is refused before any tensor is
    dequantized."""
    budget = parse_budget(text)
    c = ckpt.code_bits
    names = ckpt.quantized_names()
    widths = {n: [r for r in BUDGET_WIDTHS if r <= ckpt.info(n).max_width(c)] for n in names}
    cost: dict[str, dict[int, float]] = {}
    for n in names:
        if not widths[n]:
            raise PlanError(ckpt.path, f"{n}: no width of {BUDGET_WIDTHS} can be served")
        numel = ckpt.info(n).numel
        cost[n] = {r: tensor_bits(ckpt, n, r, extra_precision) * numel for r in widths[n]}
    total_w = sum(ckpt.info(n).numel for n in names)
    least = sum(min(cost[n].values()) for n in names)
    if least > budget * total_w:
        raise PlanError(text, f"budget {budget} is below the narrowest plan ({least / total_w:.3f} bits per weight)")
    err = slicing_errors(ckpt, {n: widths[n] for n in names}, extra_precision, text)
    try:
        return cheapest_within(err, cost, budget * total_w)
    except BudgetTooSmall as exc:  # not reached: checked above
        raise PlanError(
            text, f"budget {budget} is below the narrowest plan ({exc.minimum / total_w:.3f} bits per weight)"
        ) from None
