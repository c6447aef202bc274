"""Fake-quantized linear layers for MatQuant QAT in torch, on the training device, bit-exact with :mod:`matq_format.numerics`.

The forward pass computes, in float32 and in the order of ``numerics.quantize`` and
``numerics.dequantize_codes``::

    q = clamp(round(w / alpha) + z, 0, 2^c - 1)          # round half to even, like np.rint
    k = slice(q, r)                                       # Eq. 6, integer arithmetic
    w_r = alpha * (k * 2^(c-r) - z)

so the weights a layer uses at width r are exactly the weights a matq reader dequantizes from the
exported checkpoint. MinMax scales and zero points are ``numerics.minmax_params_from_range``'s
float64 arithmetic written in torch (:mod:`.qops`), computed on the weights' device once per
optimizer step; the codes ``q`` are kept (one byte per weight) and every width of the step slices
them. With MinMax the range covers every weight, so the straight-through gradient of ``w_r`` with
respect to ``w`` is exactly the identity (:class:`FakeQuantSTE`; nothing is saved for backward).
Learned clipping (OmniQuant's LWC, ``--clip learned``) composes ``round`` and ``slice``
straight-through estimators so gradients reach gamma and beta:
``alpha = (sigmoid(gamma) max - sigmoid(beta) min) / (2^c - 1)``, ``z = round(-sigmoid(beta) min / alpha)``,
the scale rounded up to its stored dtype. ``tests/test_train.py`` checks every path against numerics.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matq_format import numerics

from ..export import Quantized
from ..spec import LWC_INIT, LayerSelectionError, QuantSpec, QuantSpecError, select_weights, weight_axes
from . import qops

__all__ = [
    "FakeQuantLinear",
    "FakeQuantLinearFn",
    "FakeQuantParam",
    "FakeQuantSTE",
    "LayerSelectionError",
    "QuantSpec",
    "QuantSpecError",
    "RoundSTE",
    "ScaleRoundSTE",
    "SliceSTE",
    "WidthBatches",
    "fake_quant_layers",
    "prepare",
    "set_width",
    "width",
]


CLIP_PARAMS = ("clip_gamma", "clip_beta")
"""Learned clipping's parameters, on each fake-quantized layer (not exported: folded into the scales)."""


# --- straight-through estimators ---------------------------------------------------------------
class RoundSTE(torch.autograd.Function):
    """``torch.round`` (half to even, as ``np.rint``) forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g


class SliceSTE(torch.autograd.Function):
    """Eq. 6 on float codes (``qops.slice_c_scale``); identity backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, code_bits: int, bits: int, extra_precision: bool) -> torch.Tensor:
        return qops.slice_c_scale(q, code_bits, bits, extra_precision)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None, None


class ScaleRoundSTE(torch.autograd.Function):
    """``numerics.round_scale`` (upward to the stored dtype, :func:`qops.round_scale`) forward, identity backward."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, dtype: str) -> torch.Tensor:
        return qops.round_scale(alpha, dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


class FakeQuantSTE(torch.autograd.Function):
    """``w_r`` from the kept codes forward; the gradient passes to ``w`` unchanged.

    Exact for MinMax, whose range covers every weight (no clamp ever bites); it saves no tensor.
    """

    @staticmethod
    def forward(ctx, w, q, alpha, zero, code_bits: int, bits: int, extra_precision: bool, group_size):
        return qops.dequantize(q, alpha, zero, code_bits, bits, group_size, extra_precision)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None, None, None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives a matrix product of ``x`` (x's own dtype outside autocast)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _linear_backward(ctx, gy, w_r, xc):
    """``dx = dy w_r``, ``dw = dy^T x`` (the straight-through estimator), ``db = sum dy``."""
    x_dtype, w_dtype, has_bias = ctx.dtypes
    w_r = w_r.to(gy.dtype)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = (gy @ w_r).to(x_dtype)
    g2, x2 = gy.reshape(-1, gy.shape[-1]), xc.reshape(-1, xc.shape[-1]).to(gy.dtype)
    if ctx.needs_input_grad[1]:
        gw = (g2.t() @ x2).to(w_dtype)
    if has_bias and ctx.needs_input_grad[2]:
        gb = g2.sum(0).to(w_dtype)
    return gx, gw, gb


def _linear_forward(ctx, x, w, bias, w_r):
    dt = _compute_dtype(x)
    xc = x.to(dt)
    ctx.dtypes = (x.dtype, w.dtype, bias is not None)
    return xc, F.linear(xc, w_r.to(dt), None if bias is None else bias.to(dt))


class FakeQuantLinearFn(torch.autograd.Function):
    """``x @ w_r^T + b`` for a MinMax layer, with ``w_r`` recomputed from the kept codes in backward.

    A plain ``F.linear`` on ``w_r`` would keep every layer's fake-quantized weights (float32, the
    size of the weights) alive until backward; this saves only the input, as ``nn.Linear`` does, and
    the one-byte codes are kept by the layer anyway, so a QAT step needs no more memory than plain
    fine-tuning.
    """

    @staticmethod
    def forward(ctx, x, w, bias, q, alpha, zero, code_bits: int, bits: int, ep: bool, group_size):
        w_r = qops.dequantize(q, alpha, zero, code_bits, bits, group_size, ep)
        xc, y = _linear_forward(ctx, x, w, bias, w_r)
        ctx.save_for_backward(xc, q, alpha, zero)
        ctx.args = (code_bits, bits, ep, group_size)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xc, q, alpha, zero = ctx.saved_tensors
        code_bits, bits, ep, group_size = ctx.args
        w_r = qops.dequantize(q, alpha, zero, code_bits, bits, group_size, ep)
        return *_linear_backward(ctx, gy, w_r, xc), None, None, None, None, None, None, None


class PreparedLinearFn(torch.autograd.Function):
    """``x @ w_r^T + b`` with ``w_r`` computed beforehand for the whole width (:class:`WidthBatches`)."""

    @staticmethod
    def forward(ctx, x, w, bias, w_r):
        xc, y = _linear_forward(ctx, x, w, bias, w_r)
        ctx.save_for_backward(xc, w_r)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        xc, w_r = ctx.saved_tensors
        return *_linear_backward(ctx, gy, w_r, xc), None


# --- the layer ----------------------------------------------------------------------------------
def _group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[rows, groups, g]``, padding the last group with its edge value as ``numerics.minmax_params`` does."""
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    pad = (-cols) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, g)


class _FakeQuant:
    """What a fake-quantized weight does, on its matrix view ``[rows, cols]`` (:meth:`_matrix`).

    Shared by :class:`FakeQuantLinear` (the weight itself) and :class:`FakeQuantParam` (a stack of
    expert matrices seen as one matrix, spec 10.5), so both quantize with the same code.
    """

    spec: QuantSpec
    bits: int | None
    extra_precision: bool
    _cache: tuple | None

    def _matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def _source(self) -> torch.Tensor:
        """The parameter whose values the codes describe (the cache key reads it)."""
        raise NotImplementedError

    def _init_quant(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.bits = None
        self.extra_precision = False
        self._cache = None
        if spec.clip == "learned":
            rows, cols = self._matrix().shape
            groups = numerics.n_groups(cols, spec.group_size)
            dev = self._source().device
            init = torch.full((rows, groups), LWC_INIT, dtype=torch.float32, device=dev)
            self.clip_gamma = nn.Parameter(init.clone())
            self.clip_beta = nn.Parameter(init.clone())

    def _quant_repr(self) -> str:
        g = "channel" if self.spec.group_size is None else f"group {self.spec.group_size}"
        return f"c={self.spec.code_bits}, {g}, {self.spec.clip}, bits={self.bits}"

    # -- MinMax: parameters and codes kept for the step --
    def _minmax(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale, zero point and uint8 codes of the current weights, computed once per weight version.

        Every width of a step (and a gradient-checkpointing recomputation) reuses them; the trainer
        calls :meth:`invalidate` after each optimizer step, and the weight's version guards the rest.
        """
        spec = self.spec
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                w = self._matrix()
                a, z = qops.minmax_params(
                    w,
                    spec.code_bits,
                    spec.group_size,
                    symmetric=spec.scheme == "symmetric",
                    scale_dtype=spec.scale_dtype,
                )
                q = qops.quantize(w, a, z, spec.code_bits, spec.group_size)
            self._cache = (key, a, z, q)
        return self._cache[1], self._cache[2], self._cache[3]

    def _key(self) -> tuple:
        """Identifies the weights' current values: storage, in-place version, device."""
        w = self._source()
        return (w.data_ptr(), w._version, w.device)

    def invalidate(self) -> None:
        """Forget the kept MinMax parameters and codes (the trainer calls this after every optimizer step)."""
        self._cache = None

    # -- learned clipping: differentiable parameters --
    def _learned(self) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        qmax = float(numerics.code_max(spec.code_bits))
        wg = _group_view(self._matrix().float(), spec.group_size)
        hi = torch.clamp_min(wg.amax(dim=2), 0.0)
        lo = torch.clamp_max(wg.amin(dim=2), 0.0)
        gamma, beta = torch.sigmoid(self.clip_gamma), torch.sigmoid(self.clip_beta)
        alpha = (gamma * hi - beta * lo) / qmax
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        alpha = ScaleRoundSTE.apply(alpha, spec.scale_dtype)
        z = torch.clamp(RoundSTE.apply(-beta * lo / alpha), 0.0, qmax)
        return alpha, z

    def _learned_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float codes ``q`` with gradients through the STEs, scale and zero point ``[rows, cols]``."""
        a, z = self._learned()
        w = self._matrix()
        cols, g = w.shape[1], self.spec.group_size
        A, Z = qops.expand(a, cols, g), qops.expand(z, cols, g)
        q = torch.clamp(RoundSTE.apply(w.float() / A) + Z, 0.0, float(numerics.code_max(self.spec.code_bits)))
        return q, A, Z

    def fake_weight(self, bits: int, extra_precision: bool = False) -> torch.Tensor:
        """The weights this layer computes with at width ``bits``: ``alpha * (S(q, r) - z)``, float32,
        as the matrix ``[rows, cols]``."""
        spec = self.spec
        numerics.check_width(spec.code_bits, bits)
        ep = bool(extra_precision and bits < spec.code_bits)
        if spec.clip == "minmax":
            a, z, q = self._minmax()
            return FakeQuantSTE.apply(self._matrix(), q, a, z, spec.code_bits, bits, ep, spec.group_size)
        q, A, Z = self._learned_codes()
        return A * (SliceSTE.apply(q, spec.code_bits, bits, ep) - Z)

    def export_params(self) -> Quantized:
        """``(codes uint8 [rows, cols], scale f32 [rows, groups], zero f32 [rows, groups])`` as stored."""
        with torch.no_grad():
            if self.spec.clip == "minmax":
                a, z, q = self._minmax()
            else:
                qf, _, _ = self._learned_codes()
                a, z = self._learned()
                q = qf.to(torch.uint8)
        return Quantized(
            q.cpu().numpy(),
            a.detach().float().cpu().numpy().astype(np.float32),
            z.detach().float().cpu().numpy().astype(np.float32),
        )


class FakeQuantLinear(_FakeQuant, nn.Linear):
    """An ``nn.Linear`` whose weight is fake-quantized to ``self.bits`` (None: full precision).

    Parameter names are those of ``nn.Linear`` (plus ``clip_gamma``/``clip_beta`` with learned
    clipping), so state dicts keep the Hugging Face names.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._wr: tuple | None = None  # (bits, extra precision, w_r) set by WidthBatches
        self._init_quant(spec)

    def _matrix(self) -> torch.Tensor:
        return self.weight

    def _source(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._quant_repr()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return F.linear(x, self.weight, self.bias)
        spec = self.spec
        if spec.clip == "minmax":
            numerics.check_width(spec.code_bits, self.bits)
            ep = bool(self.extra_precision and self.bits < spec.code_bits)
            if self._wr is not None and self._wr[:2] == (self.bits, ep) and self._cache[0] == self._key():
                return PreparedLinearFn.apply(x, self.weight, self.bias, self._wr[2])
            a, z, q = self._minmax()
            args = (q, a, z, spec.code_bits, self.bits, ep, spec.group_size)
            return FakeQuantLinearFn.apply(x, self.weight, self.bias, *args)
        w = self.fake_weight(self.bits, self.extra_precision)
        return F.linear(x, w.to(x.dtype), self.bias)


class FakeQuantParam(_FakeQuant, nn.Module):
    """A weight that is no ``nn.Linear``'s, fake-quantized: a stack of expert matrices
    (``[experts, out, in]`` or ``[experts, in, out]``) as one matrix with groups along its input axis
    (spec 10.5), or a matrix a module uses itself (a router a pattern names).

    transformers 5 keeps a mixture's experts fused as parameters of one module, so this child of that
    module hands it, for each forward at a width, the fake-quantized tensor in place of its parameter
    (hooks swap it in and restore it); the parameter keeps its name and receives the gradient.
    """

    def __init__(self, owner: nn.Module, name: str, input_axis: int, spec: QuantSpec):
        nn.Module.__init__(self)
        self.__dict__["_owner"] = owner  # not a child: the owner holds this module
        self.param_name, self.input_axis = name, input_axis
        self.__dict__["_held"] = None  # the parameter while the fake stack stands in for it
        self._init_quant(spec)

    def _source(self) -> torch.Tensor:
        return self._held if self._held is not None else self._owner._parameters[self.param_name]

    def _matrix(self) -> torch.Tensor:
        return qops.as_matrix(self._source(), self.input_axis)

    def extra_repr(self) -> str:
        shape = list(self._source().shape)
        return f"{self.param_name} {shape}, input axis {self.input_axis}, {self._quant_repr()}"

    def fake_param(self, bits: int, extra_precision: bool = False) -> torch.Tensor:
        """:meth:`fake_weight` in the parameter's own shape and memory layout (a strided view would
        take another matrix-product kernel than the loaded model's own tensor, rounding differently)."""
        shape = self._source().shape
        return qops.from_matrix(self.fake_weight(bits, extra_precision), shape, self.input_axis).contiguous()

    def export_params(self) -> Quantized:
        """Codes in the parameter's shape, scale and zero point in ``numerics.param_shape`` (spec 10.5)."""
        m = super().export_params()
        shape, axis = tuple(self._source().shape), self.input_axis
        pshape = numerics.param_shape(shape, self.spec.group_size, axis)
        return Quantized(
            *(numerics.from_matrix(t, s, axis) for t, s in zip(m, (shape, pshape, pshape), strict=True))
        )

    def swap_in(self) -> None:
        """Stand the fake-quantized tensor in for the parameter (at a width; nothing at full precision)."""
        if self.bits is None or self._held is not None:
            return
        w_r = self.fake_param(self.bits, self.extra_precision)
        self.__dict__["_held"] = self._owner._parameters[self.param_name]  # not registered here
        self._owner._parameters[self.param_name] = w_r.to(self._held.dtype)

    def swap_out(self) -> None:
        """Put the parameter back."""
        if self._held is not None:
            self._owner._parameters[self.param_name] = self._held
            self.__dict__["_held"] = None


def _swap_in(module: nn.Module, args) -> None:
    for m in module.children():
        if isinstance(m, FakeQuantParam):
            m.swap_in()


def _swap_out(module: nn.Module, args, output) -> None:
    for m in module.children():
        if isinstance(m, FakeQuantParam):
            m.swap_out()


class WidthBatches:
    """MinMax layers grouped by shape and spec; each group's parameters, codes and width-r weights at once.

    On a GPU, quantizing layer by layer is dozens of small kernel launches per layer and width,
    which cost more than a small model's matrix products (SmolLM2-135M on an H200: single-width QAT
    at 0.5x plain fine-tuning's speed). Every formula is row-wise, so computing a group's stacked
    rows gives each layer exactly its own values. The width's weights stay alive until
    :meth:`release` (the size of the quantized weights in float32), so the trainer uses this on CUDA,
    where launches dominate, and not on the CPU, where memory does.
    """

    def __init__(self, layers: list):
        groups: dict[tuple, list[FakeQuantLinear]] = {}
        for m in layers:
            if isinstance(m, FakeQuantLinear) and m.spec.clip == "minmax":
                groups.setdefault((tuple(m.weight.shape), m.spec, m.weight.device), []).append(m)
        self.groups = list(groups.values())
        self._whole: list[tuple | None] = [None] * len(self.groups)

    def refresh(self) -> None:
        """Parameters and codes of every group whose weights changed (once per optimizer step)."""
        for i, layers in enumerate(self.groups):
            keys = [m._key() for m in layers]
            if self._whole[i] is not None and self._whole[i][0] == keys:
                continue
            spec, rows = layers[0].spec, layers[0].weight.shape[0]
            with torch.no_grad():
                w = torch.cat([m.weight.detach() for m in layers])
                sym = spec.scheme == "symmetric"
                a, z = qops.minmax_params(
                    w, spec.code_bits, spec.group_size, symmetric=sym, scale_dtype=spec.scale_dtype
                )
                q = qops.quantize(w, a, z, spec.code_bits, spec.group_size)
            del w
            for j, m in enumerate(layers):
                rs = slice(j * rows, (j + 1) * rows)
                m._cache = (keys[j], a[rs], z[rs], q[rs])
            self._whole[i] = (keys, a, z, q)

    def set_width(self, bits: int | None, extra_precision: bool = False) -> None:
        """Compute every layer's weights at ``bits`` (None: release them)."""
        self.release()
        if bits is None:
            return
        self.refresh()
        for layers, (_, a, z, q) in zip(self.groups, self._whole, strict=True):
            spec, rows = layers[0].spec, layers[0].weight.shape[0]
            ep = bool(extra_precision and bits < spec.code_bits)
            with torch.no_grad():
                w_r = qops.dequantize(q, a, z, spec.code_bits, bits, spec.group_size, ep)
            for j, m in enumerate(layers):
                m._wr = (bits, ep, w_r[j * rows : (j + 1) * rows])

    def release(self) -> None:
        for layers in self.groups:
            for m in layers:
                m._wr = None

    def invalidate(self) -> None:
        self.release()
        self._whole = [None] * len(self.groups)


# --- model surgery ------------------------------------------------------------------------------
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def prepare(model: nn.Module, layers: str, spec: QuantSpec) -> list[str]:
    """Fake-quantize the selected weights in place; return their names.

    An ``nn.Linear`` becomes a :class:`FakeQuantLinear`; any other selected weight (fused experts, a
    router named by a pattern) gets a :class:`FakeQuantParam` beside it. Starts at full precision
    (``bits=None``); :func:`set_width` switches widths.
    """
    shapes = {
        n: (_DTYPE_NAMES.get(p.dtype, str(p.dtype)), tuple(p.shape)) for n, p in model.named_parameters()
    }
    config = getattr(model, "config", None)
    cfg = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    names = select_weights(shapes, layers, cfg)
    axes = weight_axes(shapes, names, cfg)
    modules = dict(model.named_modules())
    chosen = [n for n in names if _fake_quantize(model, modules, n, axes[n], spec)]
    if not chosen:
        raise LayerSelectionError(None, f"--layers {layers!r} selects no weight a module of the model holds")
    return chosen


def _fake_quantize(model: nn.Module, modules: dict, name: str, axis: int, spec: QuantSpec) -> bool:
    """Fake-quantize one weight (its owner found by name); False when no module holds it as a parameter."""
    owner_name, _, attr = name.rpartition(".")
    owner = modules[owner_name] if owner_name else model
    if isinstance(owner, _FakeQuant):
        return True
    if attr not in owner._parameters:
        return False
    if attr == "weight" and isinstance(owner, nn.Linear):
        parent_name, _, child = owner_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, FakeQuantLinear(owner, spec))
        return True
    child = f"matq_{attr}"
    if child not in owner._modules:
        if not any(isinstance(m, FakeQuantParam) for m in owner.children()):
            owner.register_forward_pre_hook(_swap_in)
            owner.register_forward_hook(_swap_out, always_call=True)
        owner.add_module(child, FakeQuantParam(owner, attr, axis, spec))
    return True


def fake_quant_layers(model: nn.Module) -> Iterator[tuple[str, FakeQuantLinear | FakeQuantParam]]:
    """``(weight name, layer)`` for every fake-quantized weight, in module order."""
    for n, m in model.named_modules():
        if isinstance(m, FakeQuantLinear):
            yield (f"{n}.weight" if n else "weight"), m
        elif isinstance(m, FakeQuantParam):
            owner = n.rpartition(".")[0]
            yield (f"{owner}.{m.param_name}" if owner else m.param_name), m


def set_width(model: nn.Module, bits: int | dict[str, int] | None, extra_precision: bool = False) -> None:
    """Serve every fake-quantized layer at ``bits`` (None: full precision); a dict sets widths per weight name."""
    for n, m in fake_quant_layers(model):
        b = bits.get(n, m.spec.code_bits) if isinstance(bits, dict) else bits
        if b is not None:
            numerics.check_width(m.spec.code_bits, b)
        m.bits = b
        m.extra_precision = bool(extra_precision)


class width:  # noqa: N801 - used as a context manager, reads like a function
    """``with width(model, 2): ...`` runs the model at int2 and restores the previous widths."""

    def __init__(self, model: nn.Module, bits: int | dict[str, int] | None, extra_precision: bool = False):
        self.model, self.bits, self.ep = model, bits, extra_precision
        self.saved: list[tuple[FakeQuantLinear, int | None, bool]] = []

    def __enter__(self) -> nn.Module:
        self.saved = [(m, m.bits, m.extra_precision) for _, m in fake_quant_layers(self.model)]
        set_width(self.model, self.bits, self.ep)
        return self.model

    def __exit__(self, *exc) -> None:
        for m, b, ep in self.saved:
            m.bits, m.extra_precision = b, ep
