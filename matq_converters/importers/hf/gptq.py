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
  for bit; otherwise an exhaustive search over the ``2^c`` codes (one small matrix product and an
  argmin per column), with numerics' tie-break weight on the full width.
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
  ``H^-1`` (computed in float64, then used in float32), blocks of 128 columns with the intra-block
  updates column by column and one matrix product for the columns after the block ("lazy batch").

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
        Hd = H.clone()
        torch.diagonal(Hd).add_(damp * (10**attempt) * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
    raise ValueError("the Hessian is not positive definite even with 1000x damping")


def _group_params(
    w: torch.Tensor, spec: QuantizeSpec, importance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero per row of one group's weights ``w [rows, g]`` (numerics' formulas)."""
    wn = np.array(w.detach().to("cpu", torch.float32).numpy(), np.float32, order="C")
    sign = spec.flip_signs(wn, None)
    a, z = _unsigned_group_params(wn, spec, importance)
    return (a, z) if sign is None else (a * sign.reshape(-1), z)


def _unsigned_group_params(
    wn: np.ndarray, spec: QuantizeSpec, importance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    sym = spec.scheme == "symmetric"
    if spec.objective == "minmax":
        a, z = numerics.minmax_params(
            wn,
            spec.code_bits,
            None,
            symmetric=sym,
            zero_multiple=spec.zero_multiple,
            scale_dtype=spec.scale_dtype,
        )
    else:
        a, z = multiwidth.multiwidth_params(
            wn,
            spec.code_bits,
            None,
            spec.widths,
            spec.lambdas,
            symmetric=sym,
            zero_multiple=spec.zero_multiple,
            scale_dtype=spec.scale_dtype,
            extra_precision=spec.extra_precision,
            importance=importance,
        )
    return a.reshape(-1), z.reshape(-1)


PROPAGATE = ("mean", "per-width")


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
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be [rows, cols] and H [cols, cols]; got {tuple(W.shape)}, {tuple(H.shape)}")
    if spec.code_bits > 8:
        raise ValueError("multi-width GPTQ stores uint8 codes: code bits up to 8")
    if propagate not in PROPAGATE:
        raise ValueError(f"propagate must be one of {', '.join(PROPAGATE)}")
    dev = W.device
    rows, cols = W.shape
    gs = spec.group_size if spec.group_size is not None and spec.group_size < cols else None
    groups = numerics.n_groups(cols, spec.group_size)
    if importance is None:
        importance = torch.diagonal(H)
    imp = np.asarray(
        importance.detach().to("cpu", torch.float64).numpy() if torch.is_tensor(importance) else importance,
        np.float64,
    )
    on_cpu = dev.type == "cpu"  # numpy's searchsorted there: torch's is slow on CPU with several threads
    breaks_np, codes_np = multiwidth_table(spec)
    breaks = torch.from_numpy(breaks_np).to(dev)
    code_of = torch.from_numpy(codes_np.astype(np.int64)).to(dev)
    levels_np, lam_np = _slice_tables(spec)
    levels = torch.from_numpy(levels_np).to(dev)  # [widths, 2^c]: S(q, r) on the c-bit scale
    lam = torch.from_numpy(lam_np).to(dev)[:, None]  # [widths, 1]
    lam_total = torch.tensor(float(lam_np.sum()), dtype=torch.float32, device=dev)
    per_width = propagate == "per-width" and len(spec.widths) > 1
    if per_width:  # the search's objective, with numerics' tie-break weight on the full width
        tie = np.float32(multiwidth.MULTIWIDTH_TIE * lam_np.sum())
        top = numerics.slice_codes_c_scale(np.arange(1 << spec.code_bits), spec.code_bits, spec.code_bits)
        sq = (lam_np[:, None] * levels_np**2).sum(0) + tie * top.astype(np.float32) ** 2
        search_b = torch.from_numpy(sq.astype(np.float32)).to(dev)  # [2^c]
        search_l = torch.from_numpy((2 * lam_np[:, None] * levels_np).astype(np.float32)).to(dev)
        search_top = torch.from_numpy((2 * tie * top).astype(np.float32)).to(dev)

    U = _hinv_cholesky(H.to(dev), damp).to(torch.float32)
    # Targets [k, cols, rows], transposed so that input column j is row j (contiguous steps): one
    # target for "mean", one per width for "per-width".
    k = len(spec.widths) if per_width else 1
    T = W.detach().to(dev, torch.float32).t().contiguous().unsqueeze(0).repeat(k, 1, 1)
    Qt = torch.empty((cols, rows), dtype=torch.uint8, device=dev)
    scale = np.empty((rows, groups), np.float32)
    zero = np.empty((rows, groups), np.float32)
    a_col = z_col = z64 = None

    nest = spec.layout == "gguf" and gs is not None and cols % numerics.NEST_BLOCK == 0
    nest = nest and numerics.NEST_BLOCK % gs == 0
    nested: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def params_of(t: torch.Tensor, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        wg = t[0] if k == 1 else (t * lam[:, :, None]).sum(0) / lam_total
        return _group_params(wg.t(), spec, imp[c0:c1])

    def nest_params(t: torch.Tensor, c0: int) -> None:
        """gguf layout: at a super-block's first column, the parameters of its groups from the
        targets as they are now (static groups), scales nested (numerics.nest_scales)."""
        per = [params_of(t[:, j : j + gs], c0 + j, c0 + j + gs) for j in range(0, numerics.NEST_BLOCK, gs)]
        a = numerics.nest_scales(np.stack([p[0] for p in per], 1), numerics.NEST_BLOCK, gs)
        for i, (_, z) in enumerate(per):
            nested[c0 + i * gs] = (a[:, i], z)

    def set_params(t: torch.Tensor, c0: int, c1: int) -> None:
        """Parameters of the group of columns c0..c1-1 from targets ``t [k, c1 - c0, rows]``."""
        nonlocal a_col, z_col, z64
        a, z = nested.pop(c0) if c0 in nested else params_of(t, c0, c1)
        g = c0 // gs if gs is not None else 0
        scale[:, g], zero[:, g] = a, z
        a_col = torch.from_numpy(a).to(dev)
        z_col = torch.from_numpy(z).to(dev)
        z64 = z_col.to(torch.float64)

    def envelope(w: torch.Tensor) -> torch.Tensor:
        x = (w / a_col).to(torch.float64) + z64  # numerics' x: the float32 quotient, z in float64
        if on_cpu:
            return code_of[torch.from_numpy(np.searchsorted(breaks_np, x.numpy()))]
        return code_of[torch.searchsorted(breaks, x)]

    def search(t: torch.Tensor) -> torch.Tensor:
        if bool((t == t[0]).all()):  # every width still has the same target
            return envelope(t[0])
        x = t / a_col + z_col  # [widths, rows] on the c-bit scale
        cost = search_b - x.t() @ search_l - x[-1:].t() * search_top  # [rows, 2^c], up to a constant
        return cost.argmin(1)

    if gs is None:  # one scale per row, from the weights as given
        set_params(T, 0, cols)
    bs = _block_size(gs, cols, block_size)
    if nest:  # a block holds whole super-blocks, so their groups' targets are all current at its start
        bs = -(-bs // numerics.NEST_BLOCK) * numerics.NEST_BLOCK
    threads = torch.get_num_threads()
    try:
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            if on_cpu:  # one thread for the column steps: their ops are too small to share
                torch.set_num_threads(1)
            T1 = T[:, i1:i2].clone()
            Err1 = torch.empty_like(T1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if nest and col % numerics.NEST_BLOCK == 0:
                    nest_params(T1[:, i : i + numerics.NEST_BLOCK], col)
                if gs is not None and col % gs == 0:
                    g1 = min(col + gs, cols)
                    set_params(T1[:, i : i + (g1 - col)], col, g1)
                t = T1[:, i]  # [k, rows]
                q = search(t) if per_width else envelope(t[0])
                Qt[col] = q.to(torch.uint8)
                w_hat = (levels[:, q] - z_col) * a_col  # [widths, rows], as numerics.dequantize_codes
                if per_width:
                    err = (t - w_hat) / U1[i, i]
                else:
                    err = (((t[0] - w_hat) * lam).sum(0) / lam_total / U1[i, i])[None]
                for j in range(k):
                    T1[j, i:].addr_(U1[i, i:], err[j], alpha=-1)
                Err1[:, i] = err
            torch.set_num_threads(threads)
            if i2 < cols:
                for j in range(k):
                    T[j, i2:].addmm_(U[i1:i2, i2:].t(), Err1[j], alpha=-1)
    finally:
        torch.set_num_threads(threads)
    return Qt.t().contiguous().cpu().numpy(), scale, zero
