"""The float ONNX graph an export starts from, made by the tools built for it from a Hugging Face
folder of the dequantized slice:

- decoders (Llama, Mistral, Qwen2, Gemma 2): onnxruntime-genai's model builder, the tool that makes
  the graphs its runtime generates with (GroupQueryAttention with a past key/value cache, rotary
  caches, ``genai_config.json``, tokenizer files). It runs in a subprocess, offline, float32, CPU,
  with Q, K and V kept apart so each can have its own width.
- encoders (BERT, e.g. all-MiniLM-L6-v2): ``torch.onnx.export`` of transformers' model, with
  ``input_ids``, ``attention_mask``, ``token_type_ids`` in and ``last_hidden_state`` out.

Both load the whole float model in memory (their own way of working); the rewrite that follows
streams tensor by tensor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from matq_converters.registry import UnsupportedModelError

DECODERS = ("llama", "mistral", "qwen2", "gemma2")
TOKENIZER_FILES = {"tokenizer.json", "tokenizer.model"}
ENCODERS = ("bert",)
BUILDER = "onnxruntime_genai.models.builder"
OPSET = 21
"""Opset of the encoder export (blocked DequantizeLinear needs 21)."""


class BuildError(UnsupportedModelError):
    """The float graph's producer failed; the message carries its last line."""


def family(ckpt) -> str:
    """``decoder`` or ``encoder`` for a checkpoint this export supports; a one-line refusal otherwise."""
    model_type = ckpt.config.get("model_type")
    if model_type in DECODERS:
        _check_builder_limits(ckpt)
        return "decoder"
    if model_type in ENCODERS:
        return "encoder"
    known = ", ".join(DECODERS + ENCODERS)
    raise UnsupportedModelError(
        ckpt.path, f"model_type {model_type!r} has no ONNX export here; supported: {known}"
    )


def _check_builder_limits(ckpt) -> None:
    """What onnxruntime-genai's builder cannot take: it wires any linear layer with ``vocab_size``
    outputs to the logits (``has_lm_head``), and it needs the tokenizer for its files."""
    vocab = ckpt.config.get("vocab_size")
    for name in ckpt.tensor_names():
        shape = ckpt.info(name).shape
        if len(shape) == 2 and shape[0] == vocab and "embed" not in name and "lm_head" not in name:
            raise UnsupportedModelError(
                ckpt.path,
                f"{name} has vocab_size ({vocab}) outputs; onnxruntime-genai's builder would take it for the LM head",
            )
    if not TOKENIZER_FILES & set(ckpt.manifest.get("carried", {})):
        raise UnsupportedModelError(
            ckpt.path,
            f"carries no tokenizer ({' or '.join(sorted(TOKENIZER_FILES))}); onnxruntime-genai needs one",
        )


def build_decoder(hf_dir: Path, out: Path, log: Path, source) -> None:
    """onnxruntime-genai's builder, float32 for the CPU, into ``out``; its output goes to ``log``,
    whose last line a failure names (against ``source``, the checkpoint)."""
    cmd = [
        sys.executable, "-m", BUILDER,
        "-i", str(hf_dir), "-o", str(out), "-p", "fp32", "-e", "cpu",
        "-c", str(out.parent / ".builder-cache"),
        "--extra_options", "fuse_qkv=false",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if rc != 0 or not (out / "model.onnx").is_file():
        lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
        raise BuildError(source, f"onnxruntime-genai's builder failed: {lines[-1] if lines else rc}")


def build_encoder(hf_dir: Path, out: Path) -> None:
    """transformers' encoder exported by ``torch.onnx.export`` (float32, dynamic batch and length)."""
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(hf_dir, dtype=torch.float32).eval()
    wrapped = _hidden_states(model).eval()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones((1, 8), dtype=torch.long) for _ in names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in [*names, "last_hidden_state"]}
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            wrapped,
            example,
            str(out / "model.onnx"),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
            external_data=True,
        )
    _external(out)
    del model


def _external(out: Path) -> None:
    """Move every initializer of ``out/model.onnx`` to external data (one file), as the builder does."""
    import onnx

    model = onnx.load(out / "model.onnx")
    for f in out.iterdir():
        if f.name != "model.onnx":
            f.unlink()
    onnx.save(
        model, out / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )


def _hidden_states(model):
    """``model`` as ``forward(input_ids, attention_mask, token_type_ids) -> last_hidden_state``."""
    import torch

    class HiddenStates(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    return HiddenStates(model)


def set_session_option(genai_config: Path, key: str, value: str) -> None:
    """One ORT session config entry in the decoder's ``session_options`` of ``genai_config.json``."""
    cfg = json.loads(genai_config.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})[key] = value
    genai_config.write_text(json.dumps(cfg, indent=4) + "\n")
