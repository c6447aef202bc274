"""A matq slice as ONNX weight initializers: ``com.microsoft.MatMulNBits`` inputs or a standard
``DequantizeLinear`` (blocked, opset 21; uint2 from opset 25). Pure numpy; the graph surgery that
uses these is ``onnx_graph``.

Both store ``(q - zp) * scale`` with ``q`` in a container of ``c`` bits (2, 4 or 8): the slice's
codes shifted into it as ``containers`` describes. Where the container's zero points are integers
the weights decode bit for bit (``tests/test_onnx_export.py`` runs each with the operator on an
identity input).
MatMulNBits also takes float zero points at 2 and 4 bits, which onnxruntime's CPU kernel applies as
``q * scale - zp * scale``: at most one float32 rounding away from the slice (recorded per tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from matq_converters.exporters.containers import (
    container_bits,
    container_codes,
    container_scale_zero,
    pack_bytes,
    step_exponent,
)

CONTAINERS = (2, 4, 8)
QMOE_CONTAINER = 4
"""The one container of QMoE experts that onnxruntime's CPU kernel runs in float32 (its block-wise
8-bit kernel quantizes activations to int8; 2 bits is CUDA only): int2..int4 slices go in it."""
MIN_BLOCK = 16
"""MatMulNBits' smallest block (a power of two)."""
CHANNEL_BLOCK = 128
"""The block per-channel scales are repeated over in MatMulNBits (its blocks are at most K)."""


@dataclass(frozen=True)
class WeightPlan:
    """How one quantized linear weight ``[N, K]`` (rows out, columns in) is stored."""

    name: str
    bits: int
    ep: bool
    container: int | None
    """2, 4 or 8; None: the weight stays a float MatMul (``reason`` says why)."""
    block: int | None
    """MatMulNBits: the block along K; QDQ: the group (None: per channel)."""
    zero_points: str = "uint8"
    """``default`` (omitted, 2^(c-1)), ``uint8`` (packed integers) or ``float``."""
    reason: str = ""
    layout: str = "matmulnbits"

    @property
    def exact(self) -> bool:
        return self.container is not None and self.zero_points != "float"


def stored_bits(plan: WeightPlan, shape) -> int:
    """Bits one weight ``[N, K]`` takes in the file under ``plan``: codes (MatMulNBits pads K to whole
    blocks), float32 scales, zero points (packed, or float32); 32 per weight where it stays float."""
    rows, cols = shape
    if plan.container is None:
        return 32 * rows * cols
    c = plan.container
    blocks = math.ceil(cols / plan.block) if plan.block else 1
    if plan.layout == "qdq":
        return rows * cols * c + rows * blocks * (32 + c)
    zp = {"default": 0, "uint8": math.ceil(blocks * c / 8) * 8, "float": blocks * 32}[plan.zero_points]
    return rows * (blocks * plan.block * c + blocks * 32 + zp)


def qmoe_whole(plans) -> bool:
    """Whether a MoE node's expert weights (``plans``, None for one not found) become one
    ``com.microsoft.QMoE``: every one in a container, all in one container and block (the operator
    has one ``block_size``). Else the node stays float, every expert weight with it."""
    kinds = {(p.container, p.block) for p in plans if p is not None}
    return None not in plans and len(kinds) == 1 and None not in next(iter(kinds))


def moe_bits(plans, shapes) -> int:
    """Bits a MoE node's expert weights take in the file: as planned if it becomes QMoE, else 32 per
    weight (:func:`qmoe_whole`). What a budget charges for each combination of their widths."""
    if qmoe_whole(plans):
        return sum(stored_bits(p, s) for p, s in zip(plans, shapes, strict=True))
    return 32 * sum(rows * cols for rows, cols in shapes)


def nbits_block(group: int | None, cols: int) -> int | None:
    """The MatMulNBits block for a group size: the largest power of two (at least 16) dividing it;
    per-channel scales repeat over ``CHANNEL_BLOCK`` (or the power of two at or above K, if smaller)."""
    if group is None:
        return min(CHANNEL_BLOCK, max(MIN_BLOCK, 1 << (cols - 1).bit_length()))
    b = group & -group
    return b if b >= MIN_BLOCK else None


def plan_weight(ckpt, name: str, bits: int, ep: bool, layout: str, exact: bool) -> WeightPlan:
    """The smallest container that holds one weight's slice: integer zero points first, then
    (MatMulNBits at 2 and 4 bits, unless ``exact``) float ones; a float MatMul where neither does."""
    info, zero, code_bits = ckpt.info(name), ckpt.zero(name), ckpt.code_bits
    group = info.group_size
    if info.stacked:
        return _plan_experts(ckpt, name, bits, ep, layout)
    block = nbits_block(group, info.cols) if layout == "matmulnbits" else group
    if layout == "matmulnbits" and block is None:
        why = f"group size {group} has no power-of-two block >= 16"
        return WeightPlan(name, bits, ep, None, None, reason=why, layout=layout)
    exact_c = container_bits(zero, code_bits, bits, ep, CONTAINERS)
    loose = layout == "matmulnbits" and not exact  # float zero points, at 2 and 4 bits only
    loose_c = next((c for c in (2, 4) if c >= bits + ep), None) if loose else None
    if exact_c is not None and (loose_c is None or exact_c <= loose_c):
        z = zero / np.float32(1 << step_exponent(code_bits, bits, ep, exact_c))
        default = layout == "matmulnbits" and bool(np.all(z == 2 ** (exact_c - 1)))
        return WeightPlan(name, bits, ep, exact_c, block, "default" if default else "uint8", layout=layout)
    if loose_c is not None:
        return WeightPlan(name, bits, ep, loose_c, block, "float", layout=layout)
    why = "no container holds its zero points exactly"
    return WeightPlan(name, bits, ep, None, block, reason=why, layout=layout)


def _plan_experts(ckpt, name: str, bits: int, ep: bool, layout: str) -> WeightPlan:
    """A stack of expert matrices as ``com.microsoft.QMoE`` weights: 4-bit container, blocks along
    the input features that divide them (the operator's one ``block_size``), integer zero points."""
    info, code_bits = ckpt.info(name), ckpt.code_bits
    block = nbits_block(info.group_size, info.cols) if info.group_size else None
    why = ""
    if layout != "matmulnbits":
        why = "experts are quantized as QMoE, with --layout matmulnbits"
    elif block is None or info.cols % block:
        why = f"QMoE needs blocks of a power of two >= {MIN_BLOCK} dividing {info.cols} input features"
    elif bits + ep > QMOE_CONTAINER:
        why = "QMoE runs only 4-bit experts in float32 on the CPU (its 8-bit kernel quantizes activations)"
    elif container_bits(ckpt.zero(name), code_bits, bits, ep, (QMOE_CONTAINER,)) is None:
        why = "no container holds its zero points exactly"
    if why:
        return WeightPlan(name, bits, ep, None, block, reason=why, layout=layout)
    z = ckpt.zero(name) / np.float32(1 << step_exponent(code_bits, bits, ep, QMOE_CONTAINER))
    zp = "default" if np.all(z == 2 ** (QMOE_CONTAINER - 1)) else "uint8"
    return WeightPlan(name, bits, ep, QMOE_CONTAINER, block, zp, layout=layout)


def _blocks_of(a: np.ndarray, group: int | None, block: int, nblocks: int) -> np.ndarray:
    """Per-group values ``[N, G]`` repeated per block: ``[N, nblocks]`` (block j lies in group j*b//g)."""
    if group is None:
        return np.repeat(a[:, :1], nblocks, axis=1)
    return a[:, (np.arange(nblocks) * block) // group]


def matmulnbits_inputs(
    plan: WeightPlan, k: np.ndarray, scale: np.ndarray, zero: np.ndarray, code_bits: int, group: int | None
) -> dict[str, np.ndarray]:
    """``B`` ``[N, blocks, block*c/8]`` uint8, ``scales`` ``[N*blocks]`` float32 and, unless default,
    ``zero_points`` (uint8 packed per row, or float32) from sliced codes ``k`` ``[N, K]``."""
    c, b = plan.container, plan.block
    rows, cols = k.shape
    nb = math.ceil(cols / b)
    q = np.zeros((rows, nb * b), np.uint8)
    q[:, :cols] = container_codes(k, code_bits, plan.bits, plan.ep, c)
    out = {"B": pack_bytes(q, c).reshape(rows, nb, b * c // 8)}
    s, z = container_scale_zero(scale, zero, code_bits, plan.bits, plan.ep, c)
    out["scales"] = _blocks_of(s, group, b, nb).reshape(-1)
    zb = _blocks_of(z, group, b, nb)
    if plan.zero_points == "float":
        out["zero_points"] = zb.reshape(-1).astype(np.float32)
    elif plan.zero_points == "uint8":
        per = 8 // c
        padded = np.zeros((rows, math.ceil(nb / per) * per), np.uint8)
        padded[:, :nb] = zb.astype(np.uint8)
        out["zero_points"] = pack_bytes(padded, c).reshape(-1)
    return out


def qdq_inputs(
    plan: WeightPlan, k: np.ndarray, scale: np.ndarray, zero: np.ndarray, code_bits: int
) -> dict[str, np.ndarray]:
    """``DequantizeLinear`` inputs of the transposed weight ``[K, N]``: codes (uint8 values of the
    container type), scales and zero points ``[groups, N]`` (blocked) or ``[N]`` (per channel)."""
    c = plan.container
    q = np.ascontiguousarray(container_codes(k, code_bits, plan.bits, plan.ep, c).T)
    s, z = container_scale_zero(scale, zero, code_bits, plan.bits, plan.ep, c)
    if plan.block is None:
        s, z = s[:, 0], z[:, 0]
    else:
        s, z = np.ascontiguousarray(s.T), np.ascontiguousarray(z.T)
    return {"x": q, "x_scale": s.astype(np.float32), "x_zero_point": z.astype(np.uint8)}


def packed_raw(values: np.ndarray, bits: int) -> bytes:
    """ONNX raw data of a sub-byte integer tensor: elements in row-major order, ``8 / bits`` to a
    byte, the first in the low bits (padded to a whole byte)."""
    flat = values.reshape(-1)
    per = 8 // bits
    padded = np.zeros(math.ceil(flat.size / per) * per, np.uint8)
    padded[: flat.size] = flat
    return pack_bytes(padded.reshape(1, -1), bits).tobytes()
