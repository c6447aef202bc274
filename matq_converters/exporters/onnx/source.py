"""The float ONNX graph an export starts from, made by the tools built for it from a Hugging Face
folder of the dequantized slice:

- decoders (every architecture onnxruntime-genai's model builder takes for the CPU, read from the
  builder's own dispatch: :func:`builder_architectures`): the builder makes the graphs its runtime
  generates with (GroupQueryAttention with a past key/value cache, rotary caches,
  ``genai_config.json``, tokenizer files). It runs in a subprocess, offline, float32, CPU, with Q, K
  and V kept apart so each can have its own width.
- encoders (BERT, e.g. all-MiniLM-L6-v2): ``torch.onnx.export`` of transformers' model, with
  ``input_ids``, ``attention_mask``, ``token_type_ids`` in and ``last_hidden_state`` out.

Both load the whole float model in memory (their own way of working); the rewrite that follows
streams tensor by tensor.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from matq_converters.registry import MissingDependencyError, UnsupportedModelError

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
    if model_type in ENCODERS:
        return "encoder"
    archs = ckpt.config.get("architectures") or [None]
    takes = builder_architectures()
    if archs[0] in takes:
        _check_builder_limits(ckpt)
        return "decoder"
    raise UnsupportedModelError(
        ckpt.path,
        f"architecture {archs[0]!r} (model_type {model_type!r}) has no ONNX export: onnxruntime-genai "
        f"{_builder_version()}'s model builder does not take it for the CPU; it takes {', '.join(takes)} "
        f"(and encoders: {', '.join(ENCODERS)})",
    )


@functools.cache
def builder_architectures() -> tuple[str, ...]:
    """The ``architectures[0]`` values onnxruntime-genai's builder makes a CPU model of, read from its
    own dispatch (the ``config.architectures[0] == "..."`` branches of ``create_model``) without
    importing it; a branch that sets another execution provider (Phi-3.5-MoE: CUDA only) is left out."""
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(None, "--to onnx needs onnxruntime-genai; pip install 'matq[onnx]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    create = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "create_model")
    cpu: dict[str, bool] = {}
    for branch in (n for n in ast.walk(create) if isinstance(n, ast.If)):
        for name in _dispatched(branch.test):
            cpu[name] = cpu.get(name, False) or not _sets_other_provider(branch.body)
    return tuple(sorted(n for n, ok in cpu.items() if ok))


def _dispatched(test: ast.expr) -> list[str]:
    """The names a branch's test compares ``config.architectures[0]`` with."""
    out = []
    for cmp in (n for n in ast.walk(test) if isinstance(n, ast.Compare)):
        if ast.unparse(cmp.left) == "config.architectures[0]" and isinstance(cmp.ops[0], ast.Eq):
            out += [c.value for c in cmp.comparators if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return out


def _sets_other_provider(body: list[ast.stmt]) -> bool:
    """Whether a branch's own statements set ``execution_provider`` to something other than the CPU."""
    for stmt in body:
        if isinstance(stmt, ast.Assign) and any(ast.unparse(t) == "execution_provider" for t in stmt.targets):
            if not (isinstance(stmt.value, ast.Constant) and stmt.value.value == "cpu"):
                return True
    return False


def _builder_version() -> str:
    try:
        return importlib.metadata.version("onnxruntime-genai")
    except importlib.metadata.PackageNotFoundError:
        return "?"


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


def build_decoder(hf_dir: Path, out: Path, log: Path, source, arch: str = "") -> None:
    """onnxruntime-genai's builder, float32 for the CPU, into ``out``; its output goes to ``log``,
    whose last line a failure names with the architecture (against ``source``, the checkpoint): the
    builder dispatches on more architectures than it can build from transformers' current configs."""
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
        last = lines[-1] if lines else f"exit status {rc}"
        raise BuildError(source, f"onnxruntime-genai {_builder_version()}'s builder failed on {arch}: {last}")


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
