"""Helpers for the export tests: matq checkpoints of a tiny model (``tiny_models``), its tensors, the
transformers model running matq's weights, and llama.cpp.

Checkpoints are written with matq_format directly (MinMax, per channel or per group).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_format import numerics as N

LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
BERT_LINEAR = re.compile(r"\.(query|key|value|dense)\.weight$")
SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Return a new list of 12345 items;\n"
    "  raise ValueError('bad value') if the path does not exist.  Tabs\tand   spaces!"
)


def hf_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def to_matq(
    src: Path,
    out: Path,
    *,
    group_size: int | None = None,
    symmetric: bool = False,
    zero_multiple: int = 1,
    quantize_embeddings: bool = False,
    pattern: re.Pattern = LINEAR,
    group_sizes: dict[str, int | None] | None = None,
) -> mf.Checkpoint:
    """MinMax-quantize the linear layers (and optionally embeddings) of an HF folder to a matq
    checkpoint; ``group_sizes`` gives some tensors a group size of their own."""
    with mf.CheckpointWriter(out, 8, carry_from=src, source={"model": Path(src).name}) as w:
        for name, x in hf_tensors(src).items():
            quant = x.ndim == 2 and (
                pattern.search(name) or (quantize_embeddings and "embed" in name and "position" not in name)
            )
            if not quant:
                w.add_dense(name, x)
                continue
            x = x.astype(np.float32)
            g = (group_sizes or {}).get(name, group_size)
            s, z = N.minmax_params(x, 8, g, symmetric=symmetric, zero_multiple=zero_multiple)
            w.add_quantized(
                name,
                N.quantize(x, s, z, 8, g),
                s,
                z,
                dtype="F32",
                group_size=g,
                scheme="symmetric" if symmetric else "asymmetric",
                extra_precision=(2,),
            )
    return mf.open(out)


def hf_model_on_matq(
    src: Path, ckpt: mf.Checkpoint, bits: int | dict[str, int], extra_precision: bool = False, cls=None
):
    """The transformers model of ``src`` running matq's dequantized weights at ``bits`` (or per-tensor widths)."""
    import torch
    import transformers as tf

    cls = cls or tf.AutoModelForCausalLM
    model = cls.from_pretrained(src, dtype=torch.float32).eval()
    state = {}
    for name in ckpt.quantized_names():
        r = bits[name] if isinstance(bits, dict) else bits
        state[name] = torch.from_numpy(ckpt.dequantize(name, r, extra_precision and r < ckpt.code_bits))
    missing = set(state) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    return model


def env_threads() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def llama_cpp_model(path: Path, **kw):
    """``llama_cpp.Llama(path, **kw)`` with llama.cpp's extra CPU buffer types off: see
    ``matq_eval.llama.load_llama`` (AMX builds crash or miscompute with them)."""
    from matq_eval.llama import load_llama

    llm = load_llama(path, **kw)
    assert llm.model_params.use_extra_bufts is False, "llama.cpp's extra buffer types are still on"
    return llm
