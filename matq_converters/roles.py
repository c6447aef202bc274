"""What each tensor of a Hugging Face checkpoint is, per architecture: FFN, attention, embedding, norm, head.

One small API for every converter:

    arch = detect(config)                       # from config.json (model_type / architectures)
    arch.role("model.layers.0.mlp.up_proj.weight")   # "ffn"
    arch.layers                                 # ("layers",): the base model's list of layers
    select(shapes, "ffn", arch)                  # names of the 2-D float weights to quantize
    layer_index("encoder.layer.3.output.dense.weight")   # 3

Known: Llama, Mistral, Qwen2, Gemma 2 (and Gemma), BERT. Any other model type gets generic rules
(``mlp``/``ffn`` and ``attn``/``attention`` in the name); a preset or pattern that selects nothing
fails with :class:`LayerPatternError` instead of writing an unquantized "quantized" checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from matq_format import constants as C
from matq_format.errors import MatqError
from matq_format.plans import layer_index

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DECODERS",
    "GENERIC",
    "LayerPatternError",
    "PRESETS",
    "ROLES",
    "detect",
    "layer_index",
    "select",
    "unquantized",
]

ROLES = ("ffn", "attention", "embedding", "norm", "head", "other")
PRESETS = ("ffn", "attention", "linear")
"""Layer selections by name: FFN only (the paper's default), attention only, or both ("linear")."""


class LayerPatternError(MatqError):
    """A layer selection (preset or regular expression) that is malformed or selects no weight."""


@dataclass(frozen=True)
class Architecture:
    """Name rules of one model family; each rule is a regex searched in the tensor name."""

    name: str
    model_types: tuple[str, ...]
    ffn: str
    attention: str
    embedding: str
    norm: str
    head: str
    layers: tuple[str, ...]
    """Where the transformers base model keeps its ``nn.ModuleList`` of layers (candidates, in order)."""
    decoder: bool = False
    """A causal decoder-only language model (next-token loss), not an encoder."""

    def role(self, name: str) -> str:
        """The role of a tensor: the first of norm, embedding, head, attention, ffn whose rule matches."""
        for role in ("norm", "embedding", "head", "attention", "ffn"):
            if re.search(getattr(self, role), name):
                return role
        return "other"


_DECODER_NORM = r"(?:^|\.)(?:norm|\w*layernorm|\w*_norm)\.(?:weight|bias)$"
_DECODER = dict(
    ffn=r"(?:^|\.)mlp\.(?:gate_proj|up_proj|down_proj)\.weight$",
    attention=r"(?:^|\.)self_attn\.(?:q_proj|k_proj|v_proj|o_proj)\.weight$",
    embedding=r"(?:^|\.)embed_tokens\.",
    norm=_DECODER_NORM,
    head=r"(?:^|\.)lm_head\.",
    layers=("layers",),
    decoder=True,
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), **_DECODER),
    Architecture("mistral", ("mistral",), **_DECODER),
    Architecture("qwen2", ("qwen2",), **_DECODER),
    Architecture("gemma2", ("gemma2", "gemma"), **_DECODER),
    Architecture(
        "bert",
        ("bert",),
        # The FFN is intermediate.dense + output.dense; attention.output.dense is attention.
        ffn=r"(?:^|\.)layer\.\d+\.(?:intermediate|output)\.dense\.weight$",
        attention=r"(?:^|\.)attention\.(?:self\.(?:query|key|value)|output\.dense)\.weight$",
        embedding=r"(?:^|\.)embeddings\.",
        norm=r"(?:^|\.)LayerNorm\.(?:weight|bias|gamma|beta)$",
        head=r"(?:^|\.)(?:pooler|cls|classifier|qa_outputs)\.",
        layers=("encoder.layer",),
    ),
)

DECODERS = tuple(a.name for a in ARCHITECTURES if a.decoder)
"""Names of the decoder-only families: llama, mistral, qwen2, gemma2."""

GENERIC = Architecture(
    "generic",
    (),
    ffn=r"(?:^|\.)(?:mlp|ffn|feed_forward|feedforward)\.[\w.]*weight$",
    attention=r"(?:^|\.)(?:self_attn|attn|attention)\.[\w.]*weight$",
    embedding=r"(?:^|\.)(?:embed_tokens|embeddings?|wte|wpe|word_embeddings)\.",
    norm=r"(?:^|\.)(?:\w*norm\w*|ln_\w+)\.(?:weight|bias)$",
    head=r"(?:^|\.)(?:lm_head|output|classifier)\.",
    layers=("layers", "encoder.layer", "decoder.layers", "h"),
)


def detect(config: Mapping | None) -> Architecture:
    """The architecture named by ``config.json`` (``model_type``, then ``architectures``); else generic."""
    config = config or {}
    model_type = str(config.get("model_type", "")).lower()
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    for cls in config.get("architectures") or []:
        low = str(cls).lower()
        for arch in ARCHITECTURES:
            if any(low.startswith(t) for t in arch.model_types):
                return arch
    return GENERIC


def quantizable(dtype: str, shape: tuple[int, ...]) -> bool:
    """Only 2-D float weights [out, in] become codes; everything else stays dense."""
    return why_dense(dtype, shape) is None


def why_dense(dtype: str, shape: tuple[int, ...]) -> str | None:
    """Why a tensor cannot become codes (``"1-D"``, ``"3-D"``, ``"dtype I32"``, ``"empty"``), or None."""
    if dtype not in C.QUANTIZABLE_DTYPES:
        return f"dtype {dtype}"
    if len(shape) != 2:
        return f"{len(shape)}-D"
    if 0 in shape:
        return "empty"
    return None


def unquantized(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]], layers: str, arch: Architecture
) -> dict[str, str]:
    """Tensors the selection names (by role or pattern, as :func:`select` does) that stay dense
    because they are not 2-D float weights: ``{name: why}``, in the given order."""
    if layers in PRESETS:
        roles = {"ffn": ("ffn",), "attention": ("attention",), "linear": ("ffn", "attention")}[layers]
        hits = [n for n in tensors if arch.role(n) in roles]
    else:
        try:
            rx = re.compile(layers)
        except re.error:
            return {}
        hits = [n for n in tensors if rx.search(n)]
    out = {n: why_dense(*tensors[n]) for n in hits}
    return {n: why for n, why in out.items() if why is not None}


def select(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    layers: str,
    arch: Architecture,
    *,
    path: str | None = None,
) -> list[str]:
    """Names to quantize, in the given order, from ``{name: (dtype, shape)}``.

    ``layers`` is a preset (``ffn``, ``attention``, ``linear``) or a regular expression searched in
    each name; a pattern may select embeddings or the head explicitly, presets never do. A
    selection with no quantizable weight raises :class:`LayerPatternError`.
    """
    if layers in PRESETS:
        roles = {"ffn": ("ffn",), "attention": ("attention",), "linear": ("ffn", "attention")}[layers]
        out = [n for n, (dt, sh) in tensors.items() if quantizable(dt, sh) and arch.role(n) in roles]
        if not out:
            raise LayerPatternError(
                path,
                f"--layers {layers}: no {'/'.join(roles)} weights found under the {arch.name} naming rules",
            )
        return out
    try:
        rx = re.compile(layers)
    except re.error as exc:
        raise LayerPatternError(
            path, f"--layers {layers!r} is not a valid regular expression ({exc})"
        ) from None
    hits = [n for n in tensors if rx.search(n)]
    if not hits:
        raise LayerPatternError(
            path,
            f"--layers {layers!r} matches no tensor name (presets: {', '.join(PRESETS)}; e.g. {next(iter(tensors), '')!r})",
        )
    out = [n for n in hits if quantizable(*tensors[n])]
    if not out:
        raise LayerPatternError(
            path,
            f"--layers {layers!r} matches {len(hits)} tensors but none is a 2-D float weight (e.g. {hits[0]!r})",
        )
    return out
