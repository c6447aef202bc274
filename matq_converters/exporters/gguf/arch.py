"""What llama.cpp expects of each architecture: GGUF name, hyper-parameters, tensor names, quirks.

Follows llama.cpp's ``convert_hf_to_gguf.py`` for the architectures matq exports: Llama (Mistral
runs as llama), Qwen2, Gemma 2, and BERT as an embedding model. Quirks:
- llama: q/k rows are permuted from HF's rotate-half order to ggml's interleaved RoPE order
  (per-row scales and zero points move with their rows);
- gemma2: RMSNorm weights are stored as ``w - 1`` by HF, llama.cpp wants ``w``; lm_head is tied;
- bert: no pooler, non-causal attention, pooling type from the sentence-transformers folder.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matq_converters.registry import UnsupportedModelError

log = logging.getLogger("matq.gguf")


@dataclass(frozen=True)
class Arch:
    name: str
    """GGUF ``general.architecture`` (a ``gguf.MODEL_ARCH_NAMES`` value)."""
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    tokenizers: tuple[str, ...]
    """Tokenizer kinds llama.cpp's converter accepts for this architecture, in its order."""
    hparams: Callable[[Any, dict, Path], list[str] | None]
    """Writes the architecture's keys; returns warnings."""
    permute_qk: bool = False
    norm_offset: float = 0.0
    skip: tuple[str, ...] = ()
    """Regexes of HF tensor names llama.cpp does not use (dropped, not an error)."""
    strip_prefix: str = ""
    spm_space_prefix: bool | None = None
    """Force ``tokenizer.ggml.add_space_prefix`` (None: take it from the SentencePiece model)."""


def _get(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _rope(cfg: dict) -> dict:
    """transformers 5 nests RoPE settings in ``rope_parameters``; earlier versions use top-level keys."""
    p = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_theta") is not None:
        p.setdefault("rope_theta", cfg["rope_theta"])
    scaling = cfg.get("rope_scaling") or {}
    for k, v in scaling.items():
        p.setdefault("rope_type" if k == "type" else k, v)
    return p


def head_dim(cfg: dict) -> int:
    return int(_get(cfg, "head_dim", default=cfg["hidden_size"] // cfg["num_attention_heads"]))


def _decoder(w, cfg: dict) -> None:
    """Keys every decoder-only architecture here shares (convert_hf_to_gguf TextModel)."""
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(_get(cfg, "num_key_value_heads", "num_attention_heads")))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    hd = head_dim(cfg)
    w.add_key_length(hd)
    w.add_value_length(hd)
    rope = _rope(cfg)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type")
    if kind in (None, "default"):
        return
    if kind == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
        return
    raise UnsupportedModelError(
        None, f"RoPE scaling {kind!r} is not supported by matq's GGUF export (default and linear are)"
    )


def _llama(w, cfg: dict, root: Path) -> None:
    _decoder(w, cfg)
    w.add_rope_dimension_count(head_dim(cfg))


def _qwen2(w, cfg: dict, root: Path) -> None:
    _decoder(w, cfg)


def _gemma2(w, cfg: dict, root: Path) -> list[str]:
    _decoder(w, cfg)
    hd = head_dim(cfg)
    scalar = cfg.get("query_pre_attn_scalar", hd)
    per_head = cfg["hidden_size"] // cfg["num_attention_heads"]
    if scalar not in (hd, per_head):
        raise UnsupportedModelError(
            None,
            f"query_pre_attn_scalar {scalar} is neither head_dim {hd} nor hidden/heads {per_head}; "
            "llama.cpp computes the attention scale from those",
        )
    warnings = []
    if cfg.get("attn_logit_softcapping") is None:
        # llama.cpp caps attention logits of every Gemma 2 (at 50 unless told otherwise)
        warnings.append("gemma2 config has no attn_logit_softcapping; llama.cpp will still cap at 50")
    else:
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
    if cfg.get("final_logit_softcapping") is not None:
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    w.add_sliding_window(int(cfg.get("sliding_window") or 4096))
    return warnings


def _bert(w, cfg: dict, root: Path) -> None:
    import gguf

    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-12)))
    w.add_causal_attention(False)
    pooling = sentence_transformers_pooling(root)
    if pooling is not None:
        w.add_pooling_type(getattr(gguf.PoolingType, pooling))


def sentence_transformers_pooling(root: Path) -> str | None:
    """MEAN / CLS / LAST from a sentence-transformers folder (modules.json -> Pooling config)."""
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            try:
                pc = json.loads((root / m.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                return None
            if pc.get("pooling_mode_mean_tokens"):
                return "MEAN"
            if pc.get("pooling_mode_cls_token"):
                return "CLS"
            if pc.get("pooling_mode_lasttoken"):
                return "LAST"
    return None


ARCHES: tuple[Arch, ...] = (
    Arch(
        "llama",
        ("LlamaForCausalLM", "MistralForCausalLM"),
        ("llama", "mistral"),
        ("spm", "bpe"),
        _llama,
        permute_qk=True,
        skip=(r"\.rotary_emb\.inv_freq$",),
    ),
    Arch("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), ("bpe",), _qwen2, skip=(r"\.rotary_emb\.inv_freq$",)),
    Arch(
        "gemma2",
        ("Gemma2ForCausalLM",),
        ("gemma2",),
        ("spm",),
        _gemma2,
        norm_offset=1.0,
        skip=(r"^lm_head\.weight$",),
        spm_space_prefix=False,
    ),
    Arch(
        "bert",
        ("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
        ("bert",),
        ("wpm",),
        _bert,
        skip=(r"(^|\.)position_ids$", r"^pooler\.", r"^cls\."),
        strip_prefix="bert.",
    ),
)


def detect(config: dict | None, path) -> Arch:
    """The architecture of a checkpoint from its carried config.json."""
    supported = ", ".join(a for arch in ARCHES for a in arch.hf_architectures)
    if not config:
        raise UnsupportedModelError(path, "has no config.json; GGUF export needs the source model's config")
    for name in config.get("architectures") or []:
        for arch in ARCHES:
            if name in arch.hf_architectures:
                return arch
    for arch in ARCHES:
        if config.get("model_type") in arch.model_types:
            return arch
    found = config.get("architectures") or config.get("model_type")
    raise UnsupportedModelError(
        path, f"architecture {found} is not supported for GGUF; supported: {supported}"
    )


class TensorNames:
    """HF tensor name -> GGUF name for one architecture (gguf.TensorNameMap plus the skip list)."""

    def __init__(self, arch: Arch, n_blocks: int):
        import gguf

        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        self.arch = arch
        self.map = gguf.get_tensor_name_map(by_name[arch.name], n_blocks)
        self._skip = [re.compile(p) for p in arch.skip]

    def skipped(self, hf_name: str) -> bool:
        return any(p.search(hf_name) for p in self._skip)

    def gguf_name(self, hf_name: str) -> str | None:
        name = hf_name
        if self.arch.strip_prefix and name.startswith(self.arch.strip_prefix):
            name = name[len(self.arch.strip_prefix) :]
        return self.map.get_name(name, try_suffixes=(".weight", ".bias"))


def row_permutation(arch: Arch, gguf_name: str, cfg: dict, rows: int) -> np.ndarray | None:
    """Row order llama.cpp wants for this tensor (None: unchanged).

    Llama q/k: convert_hf_to_gguf's ``permute`` (heads x [2, head_dim/2] -> heads x [head_dim/2, 2]),
    expressed as an index so it applies alike to weights, codes, biases and per-row parameters.
    """
    if not arch.permute_qk:
        return None
    role = gguf_name.split(".")[-2] if gguf_name.count(".") >= 2 else ""
    if role == "attn_q":
        heads = int(cfg["num_attention_heads"])
    elif role == "attn_k":
        heads = int(_get(cfg, "num_key_value_heads", "num_attention_heads"))
    else:
        return None
    if rows % (2 * heads):
        raise UnsupportedModelError(None, f"{gguf_name}: {rows} rows do not split into {heads} rotary heads")
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def norm_offset(arch: Arch, hf_name: str) -> float:
    """Gemma stores RMSNorm weights as ``w - 1``; llama.cpp multiplies by ``w``."""
    return arch.norm_offset if arch.norm_offset and hf_name.endswith("norm.weight") else 0.0
