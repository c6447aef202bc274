"""``matq convert --to gguf --plan budget:BITS``: widths chosen so the file holds at most BITS bits per
weight as llama.cpp counts them (every tensor's bytes, over every tensor's elements).

Each quantized tensor may take any width its planes serve (int5 and int7 too: in a file, a width
costs its block type's bytes, and Q5_0/Q5_K sit between int4's and int6's types); its cost at a width is the size of what
the compact export writes for it (``gguf_blocks.encode_compact``, encoded here once per width), its
error the squared distance of that encoding's decoded weights to the checkpoint's full-width
weights. Unquantized tensors cost what they will take in the
file. :func:`matq_format.budget.cheapest_within` then spends the budget.
"""

from __future__ import annotations

import numpy as np

from matq_converters.exporters.gguf import blocks as B
from matq_converters.registry import ConvertOptionError
from matq_format.budget import BudgetTooSmall, cheapest_within
from matq_format.numerics import planes_needed

_LAST: dict[tuple, dict[str, int]] = {}
"""The last plan made, by its inputs: ``matq convert`` checks a request (``validate``) and then
writes it, and the search encodes every width of every tensor, the export's slowest step."""


def file_budget_plan(
    ckpt, quantized: list[str], dense: tuple[tuple[str, float, int], ...], budget: float, extra_precision: bool
) -> dict[str, int]:
    """{quantized tensor: width} for a file of at most ``budget`` bits per weight; ``dense``: the
    file's other tensors as (name, bits they take, weights)."""
    key = (ckpt.digest, budget, extra_precision, tuple(quantized), tuple(dense))
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = _search(ckpt, quantized, dense, budget, extra_precision)
    return dict(_LAST[key])


def _search(
    ckpt, quantized: list[str], dense: tuple[tuple[str, float, int], ...], budget: float, extra_precision: bool
) -> dict[str, int]:
    c = ckpt.code_bits
    err: dict[str, dict[int, float]] = {}
    cost: dict[str, dict[int, float]] = {}
    fixed = sum(bits for _, bits, _ in dense)
    total = float(sum(n for _, _, n in dense))
    for name in quantized:
        info = ckpt.info(name)
        total += info.numel
        widths = [r for r in range(2, c + 1) if set(planes_needed(c, r)) <= set(info.planes)]
        ref = ckpt.dequantize(name, widths[-1]).astype(np.float64)
        err[name], cost[name] = {}, {}
        scale, zero = ckpt.scale(name), ckpt.zero(name)
        for r in widths:
            ep = extra_precision and r < c
            k = ckpt.sliced_codes(name, r, ep)
            enc = B.encode_compact(B.Slice(k, scale, zero, c, r, info.group_size, ep))
            d = B.decode(enc) - ref
            err[name][r] = float(np.sum(d * d))
            cost[name][r] = 8.0 * enc.data.nbytes
    try:
        return cheapest_within(err, cost, budget * total * (1 + 1e-12) - fixed)  # a budget given as
        # another file's bits per weight (bytes * 8 / weights) admits a file of exactly those bytes
    except BudgetTooSmall as exc:
        least = (exc.minimum + fixed) / total
        raise ConvertOptionError(
            ckpt.path,
            f"budget:{budget:g} is below the smallest file this checkpoint makes ({least:.3f} bits per weight)",
        ) from None
