"""``load`` and ``MatqWeights.switch``: one loaded model, any width, plan or extra precision.

Memory: the planes of every quantized tensor (``code_bits`` bits per weight, 1 byte at 8 bits),
float32 scales and zero points, and one float copy of the model at its dtype, the weights served
now; switching needs one tensor's unpacked codes (a byte per weight) and a row block of float32
beside that. That is below two float copies at any dtype of 2 bytes or more. Every number is
computed with ``numerics.dequantize_codes``'s float32 operations in the same order (the reference
every reader matches), so a switched model equals a fresh load bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

import matq_format as mf
from matq_format import numerics
from matq_format.errors import MatqError
from matq_format.planes import plane_stride, unpack

ROW_BLOCK = 1 << 20
"""Weights dequantized at a time while switching (bounds the float32 scratch to a few MiB)."""


class LoadError(MatqError):
    """The checkpoint does not fit the model its config describes (no config, unknown or missing tensors)."""


@dataclass
class _Tensor:
    """One quantized tensor: the parameter it serves and the module that holds its planes."""

    name: str
    param: object
    module: object
    attr: str
    shape: tuple[int, ...]
    group_size: int | None
    present: tuple[int, ...]
    in_axis: int = -1
    """The axis of input features: the last for a linear weight, either of the last two for a stack."""
    bits: int | None = None
    extra_precision: bool = False
    own: dict = field(default_factory=dict)
    """Widths with their own block parameters (spec 10.7): width -> ``WidthParams``."""


class MatqWeights:
    """The quantized tensors of a loaded model (``model.matq``), and the width each serves."""

    def __init__(self, ckpt: mf.Checkpoint, tensors: dict[str, _Tensor]):
        self.ckpt = ckpt
        self.code_bits = ckpt.code_bits
        self.tensors = tensors

    @property
    def widths(self) -> dict[str, int]:
        return {n: t.bits for n, t in self.tensors.items()}

    def switch(self, bits: int | None = None, plan=None, extra_precision: bool = False) -> dict[str, int]:
        """Serve ``bits`` (or a Mix'n'Match ``plan``, as ``matq slice`` takes it) from the held planes;
        only tensors whose width or extra precision changes are rewritten. Returns the widths."""
        if (bits is None) == (plan is None):
            raise mf.errors.RequestError(self.ckpt.path, "give exactly one of bits or plan")
        widths = mf.resolve_plan(bits if plan is None else plan, self.ckpt, extra_precision=extra_precision)
        for name, t in self.tensors.items():
            r = widths[name]
            ep = bool(extra_precision) and r < self.code_bits
            if (r, ep) != (t.bits, t.extra_precision):
                self._write(t, r, ep)
        return widths

    def _write(self, t: _Tensor, bits: int, ep: bool) -> None:
        """Unpack ``t`` at ``bits`` and dequantize it into its parameter, a row block at a time."""
        import torch

        need = numerics.planes_needed(self.code_bits, bits)
        missing = [k for k in need if k not in t.present]
        if missing:
            raise mf.errors.MissingPlanesError(
                self.ckpt.path, f"{t.name}: width {bits} needs planes {list(need)}, loaded {list(t.present)}"
            )
        planes = getattr(t.module, f"{t.attr}_matq_planes").cpu().numpy()
        n = int(np.prod(t.shape))
        k = unpack(
            [planes[i] if i in need else None for i in range(self.code_bits)], n, self.code_bits, bits, ep
        )
        k = k.reshape(t.shape)
        scale = getattr(t.module, f"{t.attr}_matq_scale").cpu().numpy()
        zero = getattr(t.module, f"{t.attr}_matq_zero").cpu().numpy()
        own = None if ep else t.own.get(bits)
        if own is not None:  # the width's own block parameters, as the reader uses them
            w = own.dequantize(k, t.in_axis)
            _assign(t.param, w)
            t.bits, t.extra_precision = bits, ep
            return
        if len(t.shape) != 2:  # a stack of expert matrices (spec 10.5): the reference, one stack at a time
            w = numerics.dequantize_codes(k, scale, zero, self.code_bits, bits, t.group_size, t.in_axis)
            _assign(t.param, w)
            t.bits, t.extra_precision = bits, ep
            return
        step = max(1, ROW_BLOCK // max(t.shape[1], 1))
        out = _numpy_view(t.param)
        direct = out is not None and out.dtype == np.float32  # dequantized straight into the weights
        scratch = None if direct else np.empty((min(step, t.shape[0]), t.shape[1]), np.float32)
        for r0 in range(0, t.shape[0], step):
            rows = slice(r0, r0 + step)
            buf = out[rows] if direct else scratch
            w = dequantize_rows(k[rows], scale[rows], zero[rows], self.code_bits, bits, t.group_size, buf)
            if out is None:
                with torch.no_grad():
                    t.param[rows].copy_(torch.from_numpy(w))
            elif not np.may_share_memory(w, out):
                out[rows] = w
        t.bits, t.extra_precision = bits, ep

    def nbytes(self) -> dict[str, int]:
        """Bytes held: planes, scales and zero points, and the float weights served now."""
        held = {"planes": 0, "scales_zeros": 0, "float_weights": 0}
        for t in self.tensors.values():
            held["planes"] += getattr(t.module, f"{t.attr}_matq_planes").numel()
            held["scales_zeros"] += 2 * getattr(t.module, f"{t.attr}_matq_scale").numel() * 4
            held["float_weights"] += t.param.numel() * t.param.element_size()
        return held


def dequantize_rows(k, scale, zero, code_bits: int, bits: int, group_size: int | None, scratch) -> np.ndarray:
    """``numerics.dequantize_codes`` with the same float32 operations, bit for bit, in three passes
    over ``scratch`` and no ``[rows, cols]`` copies of the scales and zero points."""
    rows, cols = k.shape
    g = cols if group_size is None else group_size
    if cols % g:  # a ragged last group: the reference, which expands the parameters
        return numerics.dequantize_codes(k, scale, zero, code_bits, bits, group_size)
    w = scratch[:rows]
    np.multiply(k, np.float32(1 << (code_bits - bits)), out=w, dtype=np.float32)
    w3 = w.reshape(rows, cols // g, g)
    np.subtract(w3, zero.reshape(rows, -1, 1), out=w3)
    np.multiply(w3, scale.reshape(rows, -1, 1), out=w3)
    return w


def _assign(target, values: np.ndarray) -> None:
    """``target[...] = values`` (float32 rounded to the target's dtype), through numpy where it can."""
    import torch

    out = _numpy_view(target)
    if out is not None:
        out[...] = values
    else:
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(values)))


def _numpy_view(param) -> np.ndarray | None:
    """The CPU parameter's memory as numpy (bfloat16 through ml_dtypes), written without torch's
    thread pool, whose copies of small blocks measured 500x slower on a busy 2-core machine; None
    elsewhere (the caller copies with torch). numpy and torch both round float32 to nearest even."""
    import ml_dtypes
    import torch

    if param.device.type != "cpu":
        return None
    data = param.detach()
    if data.dtype == torch.bfloat16:
        return data.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if data.dtype in (torch.float32, torch.float16, torch.float64):
        return data.numpy()
    return None


def load(
    path: str | os.PathLike | mf.Checkpoint,
    *,
    bits: int | None = None,
    plan=None,
    extra_precision: bool = False,
    dtype=None,
    model_class=None,
):
    """The transformers model of a matq checkpoint, serving ``bits`` (default: every code bit) or
    ``plan``; ``model.matq.switch(...)`` changes that in place. ``dtype``: torch float type
    (default float32); ``model_class``: default the config's ``architectures[0]``."""
    import torch

    ckpt = path if isinstance(path, mf.Checkpoint) else mf.open(path)
    model = _build(ckpt, model_class, dtype or torch.float32)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    tensors: dict[str, _Tensor] = {}
    loaded = set()
    for name in ckpt.tensor_names():
        target = params.get(name, buffers.get(name))
        if target is None:
            raise LoadError(ckpt.path, f"tensor {name} has no place in a {type(model).__name__}")
        info = ckpt.info(name)
        if tuple(info.shape) != tuple(target.shape):
            raise LoadError(
                ckpt.path, f"{name} has shape {list(info.shape)}, the model expects {list(target.shape)}"
            )
        if info.quantized:
            tensors[name] = _hold(model, ckpt, name, target)
        else:
            _assign(target, ckpt.dequantize(name))
        loaded.add(target.data_ptr())
    missing = [n for n, p in params.items() if p.data_ptr() not in loaded]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(ckpt.path, f"lacks {', '.join(missing[:3])}{more}")
    model.matq = MatqWeights(ckpt, tensors)
    if bits is None and plan is None:
        bits = ckpt.code_bits
    model.matq.switch(bits, plan, extra_precision)
    return model.eval()


def _build(ckpt: mf.Checkpoint, model_class, dtype):
    """The model of the carried config (checked copies), at ``dtype``, without a quantization config."""
    import transformers

    from matq_converters import hfconfig

    cfg = ckpt.config  # read through the bounded JSON reader, then checked against the weights
    if cfg is None:
        raise LoadError(ckpt.path, "carries no config.json; transformers cannot build its model")
    hfconfig.check(cfg, ((n, ckpt.info(n).shape) for n in ckpt.tensor_names()), ckpt.root / "config.json", LoadError)
    with ckpt.carried_folder() as root:
        try:
            config = transformers.AutoConfig.from_pretrained(root)
        except Exception as exc:  # transformers' own errors: unknown type, values it refuses, ...
            raise LoadError(ckpt.path, f"transformers cannot read its config.json: {_first_line(exc)}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    try:
        if hasattr(model_class, "_from_config"):
            return model_class._from_config(config).to(dtype)
        return model_class.from_config(config).to(dtype)
    except Exception as exc:  # values transformers accepts in a config but cannot build a model of
        raise LoadError(
            ckpt.path, f"transformers cannot build its model ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hold(model, ckpt: mf.Checkpoint, name: str, param) -> _Tensor:
    """Copy one tensor's planes, scales and zero points into buffers of the module that owns it."""
    import torch

    info = ckpt.info(name)
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name)
    n = int(np.prod(info.shape))
    planes = torch.zeros((ckpt.code_bits, plane_stride(n)), dtype=torch.uint8)
    view = planes.numpy()
    for k in info.planes:
        view[k] = np.asarray(ckpt.plane(name, k))[: plane_stride(n)]
    module.register_buffer(f"{attr}_matq_planes", planes, persistent=False)
    module.register_buffer(f"{attr}_matq_scale", torch.from_numpy(ckpt.scale(name)), persistent=False)
    module.register_buffer(f"{attr}_matq_zero", torch.from_numpy(ckpt.zero(name)), persistent=False)
    shape, planes_held = tuple(info.shape), tuple(info.planes)
    own = {r: ckpt.width_params(name, r) for r in info.width_specs(ckpt.code_bits)}
    own = {r: p for r, p in own.items() if p is not None}
    return _Tensor(name, param, module, attr, shape, info.group_size, planes_held, info.in_axis, own=own)
