"""A GGUF file (llama.cpp) as a float Hugging Face model folder, for ``matq quantize`` to start from.

Many small models ship only as GGUF. transformers reads one (``from_pretrained(..., gguf_file=...)``
dequantizes every tensor) but will not save what it read ("The model is quantized with gguf and is
not serializable"). Here transformers' own GGUF reader does the reading: its model's weights are
moved into a model of the same class built from the same config, without ``quantization_config``,
which saves as any float model does. The architectures are those transformers' GGUF reader knows.

The folder records the files it wrote in :data:`RECORD` (with the source file's name), so ``--force``
replaces only a folder this wrote, and only when it holds nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from matq_format import progress
from matq_format.errors import MatqError
from matq_format.publish import AtomicOutput, OutputKind

__all__ = ["DTYPES", "GGUFImportError", "RECORD", "import_gguf"]

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "bfloat16", "float16")
RECORD = "matq-import-gguf.json"
"""What this wrote: ``{"source": <GGUF file name>, "dtype": ..., "files": [...]}``."""


class GGUFImportError(MatqError):
    """The file is not a GGUF, or transformers cannot read its architecture, tensors or tokenizer."""


def _record(path: Path) -> dict | None:
    try:
        rec = json.loads((path / RECORD).read_text()) if path.is_dir() else None
    except (OSError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def _members(path: Path) -> list[str] | None:
    files = (_record(path) or {}).get("files")
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


FLOAT_FOLDER = OutputKind("float model folder from a GGUF", True, lambda p: _record(p) is not None, _members)


def _check_gguf(src: Path) -> None:
    """A regular file that starts with GGUF's magic, checked before transformers is imported."""
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except IsADirectoryError:
        raise GGUFImportError(src, "is a folder; give the .gguf file") from None
    if magic != GGUF_MAGIC:
        raise GGUFImportError(src, f"is not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")


def import_gguf(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write ``out``, a float Hugging Face causal LM folder (weights, config, generation config,
    tokenizer) of the GGUF file ``src``, atomically; returns ``out``.

    ``dtype``: the weights' type in the folder (``float32`` keeps every dequantized value exactly).
    Reading and saving are reported as steps (:mod:`matq_format.progress`)."""
    src, out = Path(src), Path(out)
    if dtype not in DTYPES:
        raise GGUFImportError(None, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _check_gguf(src)
    with AtomicOutput(out, FLOAT_FOLDER, inputs=[src], overwrite=overwrite) as o:
        with progress.stage("read and dequantize the GGUF (transformers)"):
            model, tokenizer = _load(src, dtype)
        with progress.stage("save the float folder"):
            model.save_pretrained(o.tmp)
            tokenizer.save_pretrained(o.tmp)
        files = sorted(str(p.relative_to(o.tmp)) for p in o.tmp.rglob("*") if p.is_file())
        record = {"source": src.name, "dtype": dtype, "files": sorted([*files, RECORD])}
        (o.tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        o.commit()
    return out


def _load(src: Path, dtype: str):
    """transformers' model and tokenizer of ``src``; the model a plain float one that saves."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = getattr(torch, dtype)
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    where = dict(pretrained_model_name_or_path=src.parent, gguf_file=src.name)
    try:
        read = AutoModelForCausalLM.from_pretrained(**where, **{dtype_kw: kind})
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (ValueError, KeyError, NotImplementedError) as exc:  # an architecture or tokenizer it lacks
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GGUFImportError(src, f"transformers cannot read it: {first}") from None
    cfg = read.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):  # no second copy of the weights: the read tensors are moved in; the
        model = AutoModelForCausalLM.from_config(cfg, **{dtype_kw: kind})  # non-persistent buffers
    # (rotary frequencies) stay on the meta device: they are not saved, and this model is only saved
    model.load_state_dict(read.state_dict(), strict=True, assign=True)
    model.generation_config = read.generation_config
    return model, tokenizer
