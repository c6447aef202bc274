"""Fake-quantized linear layers for MatQuant QAT, bit-exact with :mod:`matq_format.numerics`.

The forward pass computes, in float32 and in the order of ``numerics.quantize`` and
``numerics.dequantize_codes``::

    q = clamp(round(w / alpha) + z, 0, 2^c - 1)          # round half to even, like np.rint
    k = slice(q, r)                                       # Eq. 6, integer arithmetic
    w_r = alpha * (k * 2^(c-r) - z)

so the weights a layer uses at width r are exactly the weights a matq reader dequantizes from the
exported checkpoint. ``round`` and ``slice`` pass gradients straight through (the straight-through
estimator), each as a tiny :class:`torch.autograd.Function` that returns its exact forward value.

Scales and zero points come from ``numerics.minmax_params`` on the current weights (MinMax, the
paper's QAT default; treated as constants), or from learned clipping factors gamma, beta per row
and group (OmniQuant's LWC): ``alpha = (sigmoid(gamma) max - sigmoid(beta) min) / (2^c - 1)``,
``z = round(-sigmoid(beta) min / alpha)``, with the scale rounded up to its stored dtype by
``numerics.round_scale``. Only the parameterisation is trainer-specific; every stored number is
produced and checked by the numerics module.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matq_format import constants as C
from matq_format import numerics
from matq_format.errors import MatqError

__all__ = [
    "CLIP_MODES",
    "FakeQuantLinear",
    "LayerSelectionError",
    "QuantSpec",
    "QuantSpecError",
    "RoundSTE",
    "ScaleRoundSTE",
    "SliceSTE",
    "fake_quant_layers",
    "prepare",
    "set_width",
    "width",
]

CLIP_MODES = ("minmax", "learned")
LWC_INIT = 4.0
"""OmniQuant's initial clipping logit: sigmoid(4) = 0.982 of the MinMax range."""


class LayerSelectionError(MatqError):
    """The layer selection names no Linear weight, or names a weight that is not a Linear layer's."""

    hint = "use --layers ffn, linear, attention, or a regular expression matching Linear weight names"


class QuantSpecError(MatqError):
    """Quantization settings that matq cannot store (code width, granularity, clipping, scale dtype)."""


@dataclass(frozen=True)
class QuantSpec:
    """How the selected weights are quantized: the stored code width and its parameters."""

    code_bits: int = C.DEFAULT_CODE_BITS
    group_size: int | None = None
    clip: str = "minmax"
    scheme: str = "asymmetric"
    scale_dtype: str = "F16"

    def __post_init__(self) -> None:
        if not C.MIN_CODE_BITS <= self.code_bits <= C.MAX_CODE_BITS_IMPL:
            raise QuantSpecError(
                None, f"code bits {self.code_bits} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_IMPL}"
            )
        if self.clip not in CLIP_MODES:
            raise QuantSpecError(None, f"clip must be one of {CLIP_MODES}, not {self.clip!r}")
        if self.scheme not in ("asymmetric", "symmetric"):
            raise QuantSpecError(None, f"scheme must be asymmetric or symmetric, not {self.scheme!r}")
        if self.clip == "learned" and self.scheme != "asymmetric":
            raise QuantSpecError(None, "learned clipping is asymmetric (gamma for the max, beta for the min)")
        if self.group_size is not None and self.group_size < 1:
            raise QuantSpecError(None, "group size must be positive")
        if self.scale_dtype not in C.SCALE_DTYPES:
            raise QuantSpecError(None, f"scale dtype must be one of {C.SCALE_DTYPES}")


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
    """Eq. 6 on float codes: forward ``k * 2^s`` with ``k`` from ``numerics``' integer formula; identity backward.

    The integer arithmetic mirrors ``numerics.slice_codes``; ``tests/test_train.py`` checks every
    code 0..2^c-1 against it.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, code_bits: int, bits: int, extra_precision: bool) -> torch.Tensor:
        if bits == code_bits:
            return q.clone()
        s = code_bits - bits
        qi = q.to(torch.int32)
        k = (qi >> s) + ((qi >> (s - 1)) & 1)
        if not extra_precision:
            k = torch.clamp_max(k, numerics.code_max(bits))
        return k.to(torch.float32) * torch.tensor(float(1 << s), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None, None


class ScaleRoundSTE(torch.autograd.Function):
    """``numerics.round_scale`` (upward to the stored dtype) forward, identity backward."""

    @staticmethod
    def forward(ctx, alpha: torch.Tensor, dtype: str) -> torch.Tensor:
        r = numerics.round_scale(alpha.detach().cpu().numpy(), dtype)
        return torch.from_numpy(np.ascontiguousarray(r)).to(alpha.device)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None


# --- the layer ----------------------------------------------------------------------------------
def _expand(p: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """Per-group parameters ``[rows, groups]`` to ``[rows, cols]`` (``numerics.expand_groups``)."""
    if group_size is None:
        return p[:, :1]
    return torch.repeat_interleave(p, group_size, dim=1)[:, :cols]


def _group_view(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[rows, groups, g]``, padding the last group with its edge value as ``numerics.minmax_params`` does."""
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    pad = (-cols) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, g)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is fake-quantized to ``self.bits`` (None: full precision).

    Parameter names are those of ``nn.Linear`` (plus ``clip_gamma``/``clip_beta`` with learned
    clipping), so state dicts keep the Hugging Face names.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.bits: int | None = None
        self.extra_precision = False
        self._cache: tuple | None = None
        if spec.clip == "learned":
            rows, cols = linear.weight.shape
            groups = numerics.n_groups(cols, spec.group_size)
            init = torch.full((rows, groups), LWC_INIT, dtype=torch.float32, device=linear.weight.device)
            self.clip_gamma = nn.Parameter(init.clone())
            self.clip_beta = nn.Parameter(init.clone())

    def extra_repr(self) -> str:
        g = "channel" if self.spec.group_size is None else f"group {self.spec.group_size}"
        return f"{super().extra_repr()}, c={self.spec.code_bits}, {g}, {self.spec.clip}, bits={self.bits}"

    # -- quantization parameters --
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point ``[rows, groups]`` float32 for the current weights."""
        w = self.weight
        spec = self.spec
        if spec.clip == "minmax":
            # Valid while the weights are unchanged: within one step, every width reuses them.
            key = (w.data_ptr(), w._version, w.device)
            if self._cache is None or self._cache[0] != key:
                a, z = numerics.minmax_params(
                    # a copy: FSDP frees unsharded storage, which a numpy view would pin
                    w.detach().to("cpu", torch.float32, copy=True).numpy(),
                    spec.code_bits,
                    spec.group_size,
                    symmetric=spec.scheme == "symmetric",
                    scale_dtype=spec.scale_dtype,
                )
                self._cache = (key, torch.from_numpy(a).to(w.device), torch.from_numpy(z).to(w.device))
            return self._cache[1], self._cache[2]
        qmax = float(numerics.code_max(spec.code_bits))
        wg = _group_view(w.float(), spec.group_size)
        hi = torch.clamp_min(wg.amax(dim=2), 0.0)
        lo = torch.clamp_max(wg.amin(dim=2), 0.0)
        gamma, beta = torch.sigmoid(self.clip_gamma), torch.sigmoid(self.clip_beta)
        alpha = (gamma * hi - beta * lo) / qmax
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        alpha = ScaleRoundSTE.apply(alpha, spec.scale_dtype)
        z = torch.clamp(RoundSTE.apply(-beta * lo / alpha), 0.0, qmax)
        return alpha, z

    def invalidate(self) -> None:
        """Forget cached MinMax parameters (the trainer calls this after every optimizer step)."""
        self._cache = None

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float codes ``q`` (with gradient through the STE), scale and zero point expanded to ``[rows, cols]``."""
        a, z = self.qparams()
        cols = self.weight.shape[1]
        A, Z = _expand(a, cols, self.spec.group_size), _expand(z, cols, self.spec.group_size)
        q = torch.clamp(
            RoundSTE.apply(self.weight.float() / A) + Z, 0.0, float(numerics.code_max(self.spec.code_bits))
        )
        return q, A, Z

    def fake_weight(self, bits: int, extra_precision: bool = False) -> torch.Tensor:
        """The weights this layer computes with at width ``bits``: ``alpha * (S(q, r) - z)``, float32."""
        numerics.check_width(self.spec.code_bits, bits)
        q, A, Z = self.codes()
        S = SliceSTE.apply(q, self.spec.code_bits, bits, bool(extra_precision and bits < self.spec.code_bits))
        return A * (S - Z)

    def export_params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(codes uint8 [rows, cols], scale f32 [rows, groups], zero f32 [rows, groups])`` as stored."""
        with torch.no_grad():
            a, z = self.qparams()
            q, _, _ = self.codes()
        return (
            q.cpu().numpy().astype(np.uint8),
            a.detach().float().cpu().numpy().astype(np.float32),
            z.detach().float().cpu().numpy().astype(np.float32),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return F.linear(x, self.weight, self.bias)
        w = self.fake_weight(self.bits, self.extra_precision)
        return F.linear(x, w.to(x.dtype), self.bias)


# --- model surgery ------------------------------------------------------------------------------
def _select_names(model: nn.Module, layers: str) -> list[str]:
    """Weight names chosen by a preset (ffn, attention, linear) or a regular expression."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    shapes = {n: (names.get(p.dtype, str(p.dtype)), tuple(p.shape)) for n, p in model.named_parameters()}
    config = getattr(model, "config", None)
    cfg = config.to_dict() if config is not None and hasattr(config, "to_dict") else {}
    try:
        from matq_converters.architectures import detect, select
    except ImportError:  # the shared role table is optional; keep the paper's FFN default working
        return _select_local(shapes, layers)
    return select(shapes, layers, detect(cfg))


_LOCAL_PRESETS = {
    "ffn": r"(?:^|\.)(?:mlp|ffn|feed_forward)\.[\w.]*weight$|\.(?:intermediate|output)\.dense\.weight$",
    "attention": r"(?:^|\.)(?:self_attn|attn|attention)\.[\w.]*weight$",
}
_LOCAL_PRESETS["linear"] = f"{_LOCAL_PRESETS['ffn']}|{_LOCAL_PRESETS['attention']}"


def _select_local(shapes: dict, layers: str) -> list[str]:
    rx = re.compile(_LOCAL_PRESETS.get(layers, layers))
    return [n for n, (_, sh) in shapes.items() if len(sh) == 2 and rx.search(n)]


def prepare(model: nn.Module, layers: str, spec: QuantSpec) -> list[str]:
    """Replace the selected ``nn.Linear`` layers by :class:`FakeQuantLinear` in place; return their weight names.

    Starts at full precision (``bits=None``); :func:`set_width` switches widths.
    """
    names = [n for n in _select_names(model, layers) if n.endswith(".weight")]
    modules = dict(model.named_modules())
    chosen = []
    for n in names:
        mod_name = n[: -len(".weight")]
        mod = modules.get(mod_name)
        if isinstance(mod, FakeQuantLinear):
            chosen.append(n)
            continue
        if not isinstance(mod, nn.Linear):
            continue
        parent_name, _, attr = mod_name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, FakeQuantLinear(mod, spec))
        chosen.append(n)
    if not chosen:
        raise LayerSelectionError(None, f"--layers {layers!r} selects no nn.Linear weight")
    return chosen


def fake_quant_layers(model: nn.Module) -> Iterator[tuple[str, FakeQuantLinear]]:
    """``(weight name, layer)`` for every fake-quantized layer, in module order."""
    for n, m in model.named_modules():
        if isinstance(m, FakeQuantLinear):
            yield (f"{n}.weight" if n else "weight"), m


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
