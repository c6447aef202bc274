"""Models in transformers: a Hugging Face folder as it is (the float reference), or a matq checkpoint
at a width or Mix'n'Match plan (every tensor dequantized with ``Checkpoint.dequantize``, float32).
Sizes count every tensor the way llama.cpp counts a GGUF file's."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_format import constants as C
from matq_format.plans import layer_index

from .errors import CandidateError


@dataclass(frozen=True)
class Size:
    """Bits of every tensor and of the 2-D tensors inside transformer blocks (the linear layers)."""

    bits: float
    params: int
    linear_bits: float
    linear_params: int

    @property
    def bytes(self) -> int:
        return round(self.bits / 8)

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.params

    @property
    def linear_bits_per_weight(self) -> float:
        return self.linear_bits / self.linear_params if self.linear_params else float("nan")


def _is_linear(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and layer_index(name) is not None


def _size(items) -> Size:
    """``items``: (name, shape, bits) per tensor."""
    bits = lin_bits = 0.0
    params = lin_params = 0
    for name, shape, b in items:
        n = int(np.prod(shape))
        bits += b
        params += n
        if _is_linear(name, shape):
            lin_bits += b
            lin_params += n
    return Size(bits, params, lin_bits, lin_params)


def hf_size(path: str | os.PathLike) -> Size:
    """A Hugging Face folder's tensors at their stored dtypes."""
    from matq_converters.importers.hf.source import HFSource

    src = HFSource(path)
    return _size((n, t.shape, t.nbytes * 8) for n, t in src.tensors.items())


def matq_size(ckpt: mf.Checkpoint, widths: dict[str, int], extra_precision: bool = False) -> Size:
    """A checkpoint served at ``widths``: quantized tensors as ``matq_format.summarize`` costs them
    (``numerics.bits_per_weight``: codes, scales, zero points, extra bucket), dense ones as stored."""
    items = []
    for name in ckpt.tensor_names():
        t = ckpt.info(name)
        if t.quantized:
            s = mf.summarize(ckpt, {name: widths[name]}, extra_precision)
            items.append((name, t.shape, s.bits_per_weight * t.numel))
        else:
            items.append((name, t.shape, C.DTYPES[t.dtype][1] * 8 * t.numel))
    return _size(items)


class TorchRunner:
    """Logits of one window at a time from a transformers causal LM (float32, CPU)."""

    def __init__(self, model, vocab: int | None, name: str | os.PathLike, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        if vocab is not None and self.vocab != vocab:
            raise CandidateError(name, f"has a vocabulary of {self.vocab} tokens, the reference {vocab}")
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 logits ``[ctx - 1 - first, vocab]`` predicting ``tokens[first + 1:]``."""
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))[None]
        kw = {"logits_to_keep": len(tokens) - first} if self._keep else {}
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=False, **kw).logits[0]
        out = out[-(len(tokens) - first) :][:-1]
        return out.float().numpy().copy()

    def close(self) -> None:
        self.model = None


def load_hf(path: str | os.PathLike):
    """A Hugging Face folder as float32 ``AutoModelForCausalLM``."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(path), dtype=torch.float32)


def load_matq(ckpt: mf.Checkpoint, widths: dict[str, int], extra_precision: bool = False):
    """The checkpoint's causal LM (from its carried, checked config) serving ``widths``, loaded by
    ``matq_torch`` (every tensor as ``ckpt.dequantize`` gives it, bit for bit; ties kept); its
    ``model.matq.switch`` serves another width in place."""
    import torch
    from transformers import AutoModelForCausalLM

    import matq_torch

    try:
        return matq_torch.load(
            ckpt,
            plan=widths,
            extra_precision=extra_precision,
            dtype=torch.float32,
            model_class=AutoModelForCausalLM,
        )
    except matq_torch.LoadError as exc:
        raise CandidateError(exc.path, exc.message) from None
