"""The GPTQ layout of ``matq convert --to hf --layout gptq`` (AutoGPTQ's v1 checkpoint format).

Per linear layer ``<m>``: ``<m>.qweight`` int32 ``[in * c / 32, out]`` (codes packed along the input
dimension, least significant first), ``<m>.qzeros`` int32 ``[groups, out * c / 32]`` holding
``zero - 1`` (the v1 convention), ``<m>.scales`` float16 ``[groups, out]`` and ``<m>.g_idx``
``[in]``; the loaders dequantize ``scale * (q - (qzero + 1))``. Only containers of 2, 4 and 8 bits
(3-bit GPTQ packs across words, and onnxruntime-genai's builder refuses it). A slice is written only
where it is exact: integer zero points ``z / 2^e`` of at least 1 (v1 cannot store 0: ``0 - 1`` wraps,
and gptqmodel then reads ``2^c``), float16 scales ``alpha * 2^e`` that are exact, and rows and
columns that fill whole words. Anything else is refused with its reason.
"""

from __future__ import annotations

import re

import numpy as np

CONTAINERS = (2, 4, 8)


def choose(
    zero: np.ndarray, scale: np.ndarray, code_bits: int, bits: int, ep: bool, shape
) -> tuple[int, str]:
    """``(container, "")`` for the smallest exact GPTQ container, or ``(0, why not)``."""
    rows, cols = shape
    reasons = []
    for c in CONTAINERS:
        if c < bits + ep:
            continue
        e = code_bits - c + ep
        if e < 0:
            continue
        zc = zero / np.float32(1 << e)
        if not np.all(zc == np.round(zc)):
            reasons.append(f"zero points are not integers in {c} bits")
            continue
        if zc.min(initial=1) < 1:
            reasons.append(f"a zero point is 0 in {c} bits, which GPTQ v1 stores as 0 - 1")
            continue
        s = scale * np.float32(1 << e)
        if not np.array_equal(s.astype(np.float16).astype(np.float32), s):
            reasons.append(f"scales are not exact in float16 at {c} bits")
            continue
        if cols % (32 // c) or rows % (32 // c):
            reasons.append(f"{rows} x {cols} does not fill {c}-bit words")
            continue
        return c, ""
    return 0, reasons[-1] if reasons else f"no GPTQ container (2, 4, 8 bits) holds width {bits + ep}"


def entries(module: str, shape, groups: int, c: int) -> dict:
    """Names, safetensors dtypes and shapes of one GPTQ linear layer."""
    rows, cols = shape
    return {
        f"{module}.qweight": ("I32", (cols * c // 32, rows)),
        f"{module}.qzeros": ("I32", (groups, rows * c // 32)),
        f"{module}.scales": ("F16", (groups, rows)),
        f"{module}.g_idx": ("I32", (cols,)),
    }


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack along axis 0: word ``i`` of column ``j`` holds ``values[i * n + k, j] << (bits * k)``."""
    n = 32 // bits
    v = values.reshape(values.shape[0] // n, n, values.shape[1])
    out = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for k in range(n):
        out |= v[:, k, :].astype(np.uint32) << np.uint32(bits * k)
    return out.view(np.int32)


def tensors(k, scale, zero, code_bits: int, bits: int, ep: bool, c: int, group_size: int | None) -> dict:
    """The four arrays of one layer from its sliced codes ``k`` ``[out, in]``."""
    e = code_bits - c + ep
    kc = k.astype(np.uint8) << np.uint8(code_bits - bits - e)
    cols = k.shape[1]
    g = cols if group_size is None else group_size
    zc = (zero / np.float32(1 << e)).astype(np.int64) - 1
    return {
        "qweight": pack_rows(np.ascontiguousarray(kc.T), c),
        "qzeros": np.ascontiguousarray(pack_rows(zc.astype(np.uint8), c).T),
        "scales": np.ascontiguousarray((scale * np.float32(1 << e)).astype(np.float16).T),
        "g_idx": (np.arange(cols) // g).astype(np.int32),
    }


def config(containers: dict[str, int], group_size: int | None, sym: bool, skipped: list[str]) -> dict:
    """``quantization_config``: the most common container as ``bits``, the others per module in
    ``dynamic`` (gptqmodel's and onnxruntime-genai's per-module overrides), skipped linears as ``-:``."""
    counts: dict[int, int] = {}
    for c in containers.values():
        counts[c] = counts.get(c, 0) + 1
    main = max(counts, key=lambda c: (counts[c], c))
    # Matched against module names (gptqmodel, vLLM) and tensor names (onnxruntime-genai): both fit.
    dynamic = {f"+:^{re.escape(m)}(?:\\.|$)": {"bits": c} for m, c in sorted(containers.items()) if c != main}
    dynamic.update({f"-:^{re.escape(m)}(?:\\.|$)": {} for m in sorted(skipped)})
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": main,
        "group_size": -1 if group_size is None else group_size,
        "desc_act": False,
        "sym": sym,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.01,
        "lm_head": False,
        "dynamic": dynamic or None,
    }
