"""Multi-width GPTQ: one set of c-bit codes whose slices are jointly good at every served width.

GPTQ (Frantar et al., arXiv 2210.17323) quantizes a linear layer's weight ``W [rows, cols]`` one
input column at a time and moves each column's rounding error onto the columns not yet quantized,
weighted by the inverse Hessian of the layer's output error ``||X (W - W_hat)^T||^2``, whose Hessian
is ``H = 2 X^T X`` (X: the layer's calibration inputs, one row per token). Here the objective is the
lambda-weighted sum over the served widths r of ``||X (W - W_hat_r)^T||^2``, with ``W_hat_r`` the
width-r slice of the one set of codes (``numerics.dequantize_codes``):

* Codes. Per weight, the code ``q`` minimising ``sum_r lambda_r (t_r - alpha (S(q, r) - z))^2``,
  where ``t_r`` is the error-updated weight (the target) of width r. While every width has the same
  target (always, with ``propagate="mean"``) this is ``multiwidth.multiwidth_codes``' exact
  lower-envelope minimiser, looked up with the same breakpoints (``torch.searchsorted`` on the
  device), so the codes equal what numerics gives for the same weights, scale and zero point, bit
  for bit; otherwise the exact minimiser over the ``2^c`` codes, with numerics' tie-break weight on
  the full width: each cost summed directly (the expanded form in float32 lost ~16 in costs of
  ~3e8 and picked a worse code for about one weight in 1,500), scored first for the ``2 * SEARCH_RADIUS
  + 1`` codes around the full width's nearest, every code only for the rows where a lower bound on
  the codes outside (each width's levels grow with the code) does not clear the window's best.
* Error feedback, ``propagate="per-width"`` (the default): one target per width, each passed its own
  width's error ``t_r - w_hat_r`` (divided by the Cholesky diagonal), so each width gets GPTQ's
  compensation for its own rounding, and the code choice trades the widths off per weight.
  ``propagate="mean"``: one target for all widths, passed the lambda-weighted mean error, the exact
  minimiser of the objective if the columns not yet quantized were continuous and shared by all
  widths (a sum of quadratics with one Hessian is that quadratic at the weighted mean, plus a
  constant). That relaxation ignores that later codes can still serve the widths differently, and
  measures worse: on a correlated random layer (tests/test_gptq.py, lambdas 1,1,1, multi-width
  scales) the output error relative to round-to-nearest MinMax is 102x / 0.75 / 0.35 at int8 /
  int4 / int2 per width against 174x / 1.03 / 0.40 with the mean; on the tiny test Llama the
  held-out KL at int4 / int2 is 0.115 / 0.72 against 0.277 / 0.97 (MinMax: 0.160 / 1.20); on
  SmolLM2-135M (every linear, 64k calibration tokens, MinMax scales) held-out perplexity at int8 /
  int4 is 10.8 / 13.6 against 16.9 / 22.9 (MinMax 8.86 / 14.5, float 8.86).
* Scales and zero points. Per group of ``group_size`` input columns, computed when the sweep
  reaches the group's first column, from the error-updated weights of the whole group (blocks are
  aligned to groups, so those include every update so far; per width, their lambda-weighted mean):
  ``numerics.minmax_params`` (``objective="minmax"``) or the importance-weighted multi-width scale
  search (:func:`matq_format.multiwidth.multiwidth_params` with ``importance``, ``objective="multiwidth"``).
  Per channel (``group_size=None``): once per row, from the weights as given.
* GPTQ's machinery as published: damping ``1%`` of the mean diagonal, the upper Cholesky factor of
  ``H^-1`` (computed in float64 from one Cholesky of the reversed H, then used in float32), blocks
  of 128 columns, one matrix product for the columns after the block ("lazy batch"); inside a
  block the same again with sub-blocks of 32 columns (whole groups), column-by-column updates only
  within a sub-block. That moves 8x less memory than updating the whole block per column, and
  only changes the order of float sums.

The lambdas set the trade between widths: the int2 error is some 250 times the int8 one, so with
lambdas 1,1,1 the int2 term dominates and int8 ends far above MinMax's (tiny) int8 error; lambdas
such as 64,8,1 keep int8 within a few times it and still gain at int4 and int2 (SmolLM2-135M:
perplexity 9.02 / 11.3 at int8 / int4).

MatGPTQ (IST-DASLab, arXiv 2602.03537, ``src/mat_gptq.py``) does the same sweep with an exhaustive
search over the ``2^c`` codes per weight for the lambda-weighted error against one target, and
passes on the *unweighted* mean of the per-width errors (our ``"mean"`` weights it by lambda, which
is what minimises the weighted objective; ``"per-width"`` keeps one target per width); it takes
group parameters (MinMax) from weights that lack the current block's updates (here blocks are
aligned to groups); computes ``H`` and its Cholesky factor in float32 (here ``H`` is accumulated in
float64 by the caller and factored in float64); and zeroes the weights of input columns never seen
active (here they are kept: a column dead in the calibration text need not be dead in use; ``H``
gets a 1 on its diagonal there, so such a column is rounded on its own and passes no error on).
Both then run the next layer on the int8 (full-width) dequantized weights.
"""

from __future__ import annotations

import numpy as np
import torch

from matq_format import multiwidth, numerics
from matq_format.quantspec import QuantizeSpec

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_DAMP", "gptq_multiwidth", "multiwidth_table"]

DEFAULT_BLOCK_SIZE = 128
SUB_BLOCK = 32
"""Columns whose errors are passed on one by one within a block, the rest of the block a sub-block at a
time (whole groups)."""
DEFAULT_DAMP = 0.01
"""Damping added to H's diagonal, as a fraction of its mean diagonal (GPTQ's default)."""


def multiwidth_table(spec: QuantizeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (float64, increasing) and codes of numerics' multi-width envelope for ``spec``.

    ``multiwidth.multiwidth_codes(w, a, z, ...) == codes[searchsorted(breaks, x, side="left")]`` with
    ``x = float64(float32(w / a)) + z``: the breakpoints are where the envelope's best code changes.
    """
    return multiwidth.multiwidth_breakpoints(spec.code_bits, spec.widths, spec.lambdas, spec.extra_precision)


def _slice_tables(spec: QuantizeSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per width of ``spec``: ``S(q, r)`` on the c-bit scale for every code (float32, exact), and lambda."""
    q = np.arange(1 << spec.code_bits)
    ep = set(spec.extra_precision)
    levels = np.stack(
        [numerics.slice_codes_c_scale(q, spec.code_bits, r, r in ep).astype(np.float32) for r in spec.widths]
    )
    return levels, np.asarray(spec.lambdas, np.float32)


def _block_size(group_size: int | None, cols: int, block_size: int) -> int:
    """Blocks never cut a group, so a group's parameters see all of its columns' updates."""
    if group_size is None or group_size >= cols:
        return block_size
    if group_size >= block_size:
        return group_size
    return group_size * (block_size // group_size)


def _hinv_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, float64; dead columns get H_jj = 1.

    If H is not positive definite after damping (rank-deficient inputs), the damping grows tenfold,
    up to three times, before giving up.
    """
    H = H.to(torch.float64).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    H[dead, :] = 0
    H[:, dead] = 0
    diag[dead] = 1.0
    mean = float(diag.mean()) if diag.numel() else 1.0
    for attempt in range(4):
        Hd = H.flip(0, 1)
        torch.diagonal(Hd).add_(damp * (10**attempt) * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            # With P the reversal, P H P = L L^T gives H^-1 = U^T U for U = P L^-1 P, upper triangular
            # with a positive diagonal: the factor, from one Cholesky and one triangular inverse
            # (GPTQ's Cholesky, inverse and Cholesky again cost twice that: 1 s for 1536 columns on 2 cores).
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
    raise ValueError("the Hessian is not positive definite even with 1000x damping")


def _group_params(
    w: torch.Tensor, spec: QuantizeSpec, importance: np.ndarray | None, group_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero per row of one group's weights ``w [rows, g]`` (numerics' formulas), or with
    ``group_size`` per row and group of several groups' (``[rows, groups]``)."""
    wn = np.array(w.detach().to("cpu", torch.float32).numpy(), np.float32, order="C")
    sign = spec.flip_signs(wn, group_size)
    a, z = _unsigned_group_params(wn, spec, importance, group_size)
    if group_size is None:
        a, z = a.reshape(-1), z.reshape(-1)
    return (a, z) if sign is None else (a * sign.reshape(a.shape), z)


def _unsigned_group_params(
    wn: np.ndarray, spec: QuantizeSpec, importance: np.ndarray | None, group_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
    sym = spec.scheme == "symmetric"
    if spec.objective == "minmax":
        a, z = numerics.minmax_params(
            wn,
            spec.code_bits,
            group_size,
            symmetric=sym,
            zero_multiple=spec.zero_multiple,
            scale_dtype=spec.scale_dtype,
        )
    else:
        a, z = multiwidth.multiwidth_params(
            wn,
            spec.code_bits,
            group_size,
            spec.widths,
            spec.lambdas,
            symmetric=sym,
            zero_multiple=spec.zero_multiple,
            scale_dtype=spec.scale_dtype,
            extra_precision=spec.extra_precision,
            importance=importance,
        )
    return a, z


PROPAGATE = ("mean", "per-width")
SEARCH_RADIUS = 2
"""Codes either side of the full width's nearest code that the per-width search scores first."""
SEARCH_MARGIN = 1e-5
"""Relative margin by which a bound must clear the window's best cost: float sums of a few
non-negative terms are within 1e-6 of exact, so no code outside can then be as good."""
_NO_CODES = 1e15
"""Level range standing for "no codes on this side of the window": any target is far from it."""


def _window_tables(levels: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per start s of a window of ``m`` codes: the levels of its codes ``[starts, widths, m]``, and
    the lowest and highest level of the codes below it and above it ``[starts, widths, 4]``."""
    n = levels.shape[1]
    starts = np.arange(n - m + 1)
    win = np.stack([levels[:, s : s + m] for s in starts])
    ends = np.full((starts.size, levels.shape[0], 4), _NO_CODES, np.float32)
    below, above = starts > 0, starts + m < n
    ends[below, :, 0] = levels[:, 0]
    ends[below, :, 1] = levels[:, starts[below] - 1].T
    ends[above, :, 2] = levels[:, starts[above] + m].T
    ends[above, :, 3] = levels[:, -1]
    return win, ends


class _Codes:
    """How one column's codes are chosen, and the error each width then passes on: numerics'
    envelope, or (``per_width``) the exhaustive search with numerics' tie-break on the full width."""

    def __init__(self, spec: QuantizeSpec, dev: torch.device, per_width: bool):
        self.on_cpu = dev.type == "cpu"  # numpy's searchsorted there: torch's is slow with several threads
        self.per_width = per_width
        self.breaks_np, codes_np = multiwidth_table(spec)
        self.breaks = torch.from_numpy(self.breaks_np).to(dev)
        self.code_of = torch.from_numpy(codes_np.astype(np.int64)).to(dev)
        levels_np, lam_np = _slice_tables(spec)
        self.levels = torch.from_numpy(levels_np).to(dev)  # [widths, 2^c]: S(q, r) on the c-bit scale
        self.lam = torch.from_numpy(lam_np).to(dev)[:, None]  # [widths, 1]
        self.lam_total = torch.tensor(float(lam_np.sum()), dtype=torch.float32, device=dev)
        if per_width:
            self._search_terms(spec, levels_np, lam_np, dev)

    def _search_terms(self, spec: QuantizeSpec, levels_np: np.ndarray, lam_np: np.ndarray, dev) -> None:
        """The search's terms (each width's levels and lambda, then the full width's with the tie
        weight), and per window start the levels of its codes and the range of levels outside it."""
        tie = np.float32(multiwidth.MULTIWIDTH_TIE * lam_np.sum())
        top = numerics.slice_codes_c_scale(np.arange(1 << spec.code_bits), spec.code_bits, spec.code_bits)
        levels = np.vstack([levels_np, top[None].astype(np.float32)])  # [widths + 1, 2^c], each increasing
        self.search_levels = torch.from_numpy(levels).to(dev)
        self.search_lam = torch.from_numpy(np.append(lam_np, tie).astype(np.float32)).to(dev)
        # the full width's term bounds the cost of codes far from its nearest code (_window)
        full = [i for i, r in enumerate(spec.widths) if r == spec.code_bits]
        self.anchor = max(full, key=lambda i: lam_np[i]) if full else None
        n, m = levels.shape[1], 2 * SEARCH_RADIUS + 1
        if self.anchor is None or n <= m:
            self.anchor = None
            return
        win, ends = _window_tables(levels, m)
        self.window_levels = torch.from_numpy(win.reshape(win.shape[0], -1)).to(dev)
        # lowest and highest level below the window, then above it: [starts, (widths + 1) * 2] each
        self.outside_low = torch.from_numpy(ends[:, :, 0::2].reshape(ends.shape[0], -1).copy()).to(dev)
        self.outside_high = torch.from_numpy(ends[:, :, 1::2].reshape(ends.shape[0], -1).copy()).to(dev)

    def envelope(self, w: torch.Tensor, g: _Groups) -> torch.Tensor:
        """numerics' multi-width codes of ``w`` with the current group's scale and zero."""
        x = (w / g.a).to(torch.float64) + g.z64  # numerics' x: the float32 quotient, z in float64
        if self.on_cpu:
            return self.code_of[torch.from_numpy(np.searchsorted(self.breaks_np, x.numpy()))]
        return self.code_of[torch.searchsorted(self.breaks, x)]

    def choose(self, t: torch.Tensor, g: _Groups) -> torch.Tensor:
        """Codes of one column of targets ``t [k, rows]``."""
        if not self.per_width or bool((t == t[0]).all()):  # every width still has the same target
            return self.envelope(t[0], g)
        x = t / g.a + g.z  # [widths, rows] on the c-bit scale
        x = torch.cat([x, x[-1:]]).t().contiguous()  # [rows, widths + 1]; the tie's target: the last width's
        if self.anchor is None:
            return self._best_of_all(x)
        return self._window(x)

    def _best_of_all(self, x: torch.Tensor) -> torch.Tensor:
        """Codes of least cost ``sum_r lambda_r (x_r - S(q, r))^2`` over every code; ties to the lowest."""
        d = x[:, :, None] - self.search_levels  # [rows, widths + 1, 2^c]
        return (d * d * self.search_lam[:, None]).sum(1).argmin(1)

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        """The exhaustive search's codes, scoring first ``SEARCH_RADIUS`` codes either side of the full
        width's nearest code. Exact: each width's levels grow with the code, so a code below the
        window costs at least the cost of that width's target to the interval of levels below it
        (above it likewise); rows where that bound does not clear the window's best by a margin
        wider than float rounding are searched over every code."""
        rows, k1 = x.shape
        lam = self.search_lam[:, None]
        lo = (x[:, self.anchor].round() - SEARCH_RADIUS).clamp_(0, self.window_levels.shape[0] - 1).long()
        xx = x[:, :, None]
        d = self.window_levels.index_select(0, lo).view(rows, k1, -1).sub_(xx)  # [rows, widths + 1, window]
        best, j = d.square_().mul_(lam).sum(1).min(1)
        q = lo + j
        low = self.outside_low.index_select(0, lo).view(rows, k1, 2).sub_(xx).clamp_(min=0)
        high = (xx - self.outside_high.index_select(0, lo).view(rows, k1, 2)).clamp_(min=0)
        bound = low.add_(high).square_().mul_(lam).sum(1).amin(1)  # [rows], the lesser of the two sides
        unsure = ~(bound > best * (1 + SEARCH_MARGIN))
        if bool(unsure.any()):
            r = unsure.nonzero()[:, 0]
            q[r] = self._best_of_all(x[r])
        return q

    def error(self, t: torch.Tensor, q: torch.Tensor, g: _Groups, d: torch.Tensor) -> torch.Tensor:
        """What the column passes on, divided by the Cholesky diagonal ``d``: per width, or the mean."""
        w_hat = (self.levels[:, q] - g.z) * g.a  # [widths, rows], as numerics.dequantize_codes
        if self.per_width:
            return (t - w_hat) / d
        return (((t[0] - w_hat) * self.lam).sum(0) / self.lam_total / d)[None]


class _Groups:
    """Scale and zero of every group, set when the sweep reaches the group's first column; the
    current group's on the device (``a``, ``z``, ``z64``) for the code choice."""

    def __init__(self, spec: QuantizeSpec, imp: np.ndarray, rows: int, cols: int, codes: _Codes, dev):
        self.spec, self.imp, self.cols, self.codes, self.dev = spec, imp, cols, codes, dev
        self.gs = spec.group_size if spec.group_size is not None and spec.group_size < cols else None
        groups = numerics.n_groups(cols, spec.group_size)
        self.scale = np.empty((rows, groups), np.float32)
        self.zero = np.empty((rows, groups), np.float32)
        nest = spec.layout == "gguf" and self.gs is not None and cols % numerics.NEST_BLOCK == 0
        self.nest = nest and numerics.NEST_BLOCK % self.gs == 0
        self.nested: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.a = self.z = self.z64 = None

    def block_size(self, block_size: int) -> int:
        """Blocks of whole groups; nested, of whole super-blocks (their targets all current at its start)."""
        bs = _block_size(self.gs, self.cols, block_size)
        return -(-bs // numerics.NEST_BLOCK) * numerics.NEST_BLOCK if self.nest else bs

    def _params_of(
        self, t: torch.Tensor, c0: int, c1: int, group_size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """From the targets ``t [c1 - c0, k, rows]``: one, or their lambda-weighted mean."""
        lam = self.codes.lam
        wg = t[:, 0] if t.shape[1] == 1 else (t * lam[None]).sum(1) / self.codes.lam_total
        return _group_params(wg.t(), self.spec, self.imp[c0:c1], group_size)

    def _nest_params(self, t: torch.Tensor, c0: int) -> None:
        """gguf layout: at a super-block's first column, the parameters of its groups from the
        targets as they are now (static groups), scales nested (numerics.nest_scales). One search
        for all its groups, unless a group's importance is flat (the search then weighs it as
        unweighted, which one search over unequal columns would not)."""
        gs, nb = self.gs, numerics.NEST_BLOCK
        imp = self.imp[c0 : c0 + nb].reshape(-1, gs)
        if bool((imp == imp[:, :1]).all(1).any()) and not bool((imp == imp[0, 0]).all()):
            per = [self._params_of(t[j : j + gs], c0 + j, c0 + j + gs) for j in range(0, nb, gs)]
            a, z = np.stack([p[0] for p in per], 1), np.stack([p[1] for p in per], 1)
        else:
            a, z = self._params_of(t[:nb], c0, c0 + nb, gs)
        a = numerics.nest_scales(a, nb, gs)
        for i in range(a.shape[1]):
            self.nested[c0 + i * gs] = (a[:, i], z[:, i])

    def set(self, t: torch.Tensor, c0: int, c1: int) -> None:
        """Parameters of the group of columns c0..c1-1 from targets ``t [k, c1 - c0, rows]``."""
        a, z = self.nested.pop(c0) if c0 in self.nested else self._params_of(t, c0, c1)
        g = c0 // self.gs if self.gs is not None else 0
        self.scale[:, g], self.zero[:, g] = a, z
        self.a = torch.from_numpy(a).to(self.dev)
        self.z = torch.from_numpy(z).to(self.dev)
        self.z64 = self.z.to(torch.float64)

    def at_column(self, T1: torch.Tensor, i: int, col: int) -> None:
        """At a (super-)group's first column ``col`` (``i`` in the block ``T1``), set its parameters."""
        if self.nest and col % numerics.NEST_BLOCK == 0:
            self._nest_params(T1[i : i + numerics.NEST_BLOCK], col)
        if self.gs is not None and col % self.gs == 0:
            g1 = min(col + self.gs, self.cols)
            self.set(T1[i : i + (g1 - col)], col, g1)


def _check_inputs(W: torch.Tensor, H: torch.Tensor, spec: QuantizeSpec, propagate: str) -> None:
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [rows, cols] and H [cols, cols]; got {tuple(W.shape)}, {tuple(H.shape)}")
    if spec.code_bits > 8:
        raise ValueError("multi-width GPTQ stores uint8 codes: code bits up to 8")
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {', '.join(PROPAGATE)}")


def _importance(H: torch.Tensor, importance: np.ndarray | torch.Tensor | None) -> np.ndarray:
    """Per input column, float64 on the CPU; ``diag(H)`` unless given."""
    if importance is None:
        importance = torch.diagonal(H)
    if torch.is_tensor(importance):
        importance = importance.detach().to("cpu", torch.float64).numpy()
    return np.asarray(importance, np.float64)


@torch.no_grad()
def gptq_multiwidth(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantizeSpec,
    *,
    importance: np.ndarray | torch.Tensor | None = None,
    propagate: str = "per-width",
    block_size: int = DEFAULT_BLOCK_SIZE,
    damp: float = DEFAULT_DAMP,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``uint8 [rows, cols]``, scale and zero ``float32 [rows, groups]`` of ``W`` for Hessian ``H``.

    ``W`` (any float dtype) and ``H [cols, cols]`` (``X^T X`` up to a constant factor; float64 best)
    may live on any device; the work runs there. ``importance`` (per input column, default
    ``diag(H)``) weights the multi-width scale search of ``objective="multiwidth"``. The result is
    numpy on the CPU, bit-compatible with numerics: ``numerics.dequantize_codes`` of the sliced codes
    gives the weights whose errors were minimised. Deterministic for the same inputs and device.

    ``propagate="mean"`` (the module docstring) passes on the lambda-weighted mean error.
    ``"per-width"`` keeps one error-updated target per width instead, each passed its own width's
    error (GPTQ for that width alone), and picks each code by exhaustive search over the ``2^c``
    codes for ``sum_r lambda_r (t_r - w_hat_r(q))^2`` (numerics' envelope wherever the targets still
    agree); group parameters come from the lambda-weighted mean of the targets.
    """
    _check_inputs(W, H, spec, propagate)
    dev = W.device
    rows, cols = W.shape
    per_width = propagate == "per-width" and len(spec.widths) > 1
    codes = _Codes(spec, dev, per_width)
    groups = _Groups(spec, _importance(H, importance), rows, cols, codes, dev)
    U = _hinv_cholesky(H.to(dev), damp).to(torch.float32)
    # Targets [cols, k, rows], transposed so that input column j is T[j] (contiguous steps, and
    # the lazy batch one matrix product): one target for "mean", one per width for "per-width".
    k = len(spec.widths) if per_width else 1
    T = W.detach().to(dev, torch.float32).t().contiguous().unsqueeze(1).repeat(1, k, 1)
    if groups.gs is None:  # one scale per row, from the weights as given
        groups.set(T, 0, cols)
    Qt = _sweep(T, U, codes, groups, groups.block_size(block_size), _block_size(groups.gs, cols, SUB_BLOCK))
    return Qt.t().contiguous().cpu().numpy(), groups.scale, groups.zero


def _sweep(T: torch.Tensor, U: torch.Tensor, codes: _Codes, groups: _Groups, bs: int, ib: int) -> torch.Tensor:
    """GPTQ's lazy-batch sweep over blocks of ``bs`` columns, each in sub-blocks of ``ib``; the codes
    ``[cols, rows]``."""
    cols, k, rows = T.shape
    Qt = torch.empty((cols, rows), dtype=torch.uint8, device=T.device)
    threads = torch.get_num_threads()
    try:
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            Err1 = _sweep_block(T[i1:i2], U[i1:i2, i1:i2], i1, Qt, codes, groups, ib)
            if i2 < cols:
                _update(T[i2:], U[i1:i2, i2:], Err1)
    finally:
        torch.set_num_threads(threads)
    return Qt


def _update(T: torch.Tensor, U: torch.Tensor, Err: torch.Tensor) -> None:
    """The lazy batch: ``T -= U^T Err`` for every target at once (``[cols, k, rows]``: one product)."""
    T.view(T.shape[0], -1).addmm_(U.t(), Err.view(Err.shape[0], -1), alpha=-1)


def _sweep_block(
    T1: torch.Tensor, U1: torch.Tensor, i1: int, Qt: torch.Tensor, codes: _Codes, groups: _Groups, ib: int
) -> torch.Tensor:
    """One block's column steps, in place on ``T1``: codes into ``Qt``; each column's error onto the
    later columns of its sub-block at once, onto the block's later sub-blocks a sub-block at a time
    (what a rank-1 update of the whole block per column costs in memory traffic is most of the sweep).
    Returns the errors, for the columns after the block."""
    Err1 = torch.empty_like(T1)
    n = T1.shape[0]
    threads = torch.get_num_threads()
    for j1 in range(0, n, ib):
        j2 = min(j1 + ib, n)
        if codes.on_cpu:  # one thread for the column steps: their ops are too small to share
            torch.set_num_threads(1)
        for i in range(j1, j2):
            col = i1 + i
            groups.at_column(T1, i, col)
            t = T1[i]  # [k, rows]
            q = codes.choose(t, groups)
            Qt[col] = q.to(torch.uint8)
            err = codes.error(t, q, groups, U1[i, i])
            T1[i:j2].addcmul_(U1[i, i:j2][:, None, None], err, value=-1)
            Err1[i] = err
        torch.set_num_threads(threads)
        if j2 < n:
            _update(T1[j2:], U1[j1:j2, j2:], Err1[j1:j2])
    return Err1
