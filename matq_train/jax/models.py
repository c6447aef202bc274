"""Which JAX model code serves a Hugging Face folder, and its parameters.

Parameters are a flat ``{HF name: array}`` dict read from the model's safetensors
(``matq_converters.importers.hf.source``), so state dicts, layer selections and exports keep the Hugging Face
names. A model config has ``causal`` (next-token or masked-token loss) and
``forward(params, ids, W)``; an architecture without code here is refused with one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..config import BACKEND_FAMILIES, JAX_FAMILIES
from .bert import BertConfig
from .decoder import DecoderConfig
from .layers import UnsupportedModelError

__all__ = ["SUPPORTED", "ModelConfig", "UnsupportedModelError", "load_params", "model_config"]

ModelConfig = DecoderConfig | BertConfig
SUPPORTED = JAX_FAMILIES


def model_config(cfg: Mapping, path=None) -> ModelConfig:
    """The JAX model for ``config.json``: a causal decoder family, or BERT's masked LM."""
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise UnsupportedModelError(
            path,
            f"model type {kind!r}: the jax backend trains {BACKEND_FAMILIES['jax']}",
        )
    archs = [str(a) for a in cfg.get("architectures") or []]
    if kind == "bert":
        if archs and not any(a.endswith("ForMaskedLM") for a in archs):
            raise UnsupportedModelError(path, f"{archs[0]}: the jax backend trains BERT as a masked LM only")
        return BertConfig.from_dict(cfg, path)
    return DecoderConfig.from_dict(cfg, path)


def load_params(model_dir: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``config.json`` as a dict (checked first), and every tensor of the folder as float32 numpy arrays."""
    from matq_converters.importers.hf.source import HFSource

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    model_config(cfg, model_dir)
    src = HFSource(model_dir)
    return cfg, {n: np.asarray(src.read(n), dtype=np.float32) for n in src}
