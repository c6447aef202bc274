"""What each tensor of a Hugging Face checkpoint is, per architecture: the one table of roles.

One small API for every converter:

    arch = detect(config)                       # from config.json (model_type / architectures)
    arch.role("model.layers.0.mlp.up_proj.weight")   # "ffn"
    arch.layers                                 # ("layers",): the base model's list of layers
    select(shapes, "ffn", arch)                  # names of the float weights to quantize
    input_axes(shapes, names, arch, hidden)      # each one's axis of input features (fused experts)
    layer_index("encoder.layer.3.output.dense.weight")   # 3

Roles: ``ffn`` (dense MLPs, every expert of a mixture-of-experts layer and its shared experts),
``attention``, ``router`` (MoE routers and gates: kept float unless a ``--layers`` pattern names
them, as llama.cpp and the GPTQ tools keep them), ``embedding``, ``norm``, ``head``, ``other``.
Experts come per expert as 2-D weights (Mixtral, Qwen2/3-MoE, DeepSeek as transformers saves them)
or fused into 3-D stacks ``[experts, ., .]`` whose input axis the family says (gpt-oss stores
``[experts, in, out]``; transformers' own fused layout is ``[experts, out, in]``).

Known: Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Gemma, Gemma 2, Gemma 3, Phi-3,
OLMo 2, SmolLM3, Granite, gpt-oss, DeepSeek V2/V3, BERT. Any other model type gets generic rules
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
    "ExpertShapeError",
    "GENERIC",
    "LayerPatternError",
    "PRESETS",
    "ROLES",
    "detect",
    "input_axes",
    "layer_index",
    "select",
    "unquantized",
]

ROLES = ("ffn", "attention", "router", "embedding", "norm", "head", "other")
PRESETS = ("ffn", "attention", "linear")
"""Layer selections by name: FFN only (the paper's default), attention only, or both ("linear").
No preset selects routers, embeddings or the head; a pattern may."""


class LayerPatternError(MatqError):
    """A layer selection (preset or regular expression) that is malformed or selects no weight."""


class ExpertShapeError(MatqError):
    """A fused expert tensor whose shape fits no layout of its family (or, unknown, no layout at all)."""


_NEVER = r"(?!)"


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
    router: str = _NEVER
    experts: str = _NEVER
    """Fused expert stacks ``[experts, ., .]`` (role ffn), named without ``.weight``."""
    experts_input_axis: int | None = 2
    """The input axis of a fused expert stack: 2 (``[experts, out, in]``), 1 (``[experts, in, out]``),
    or None: told from ``hidden_size`` (generic rules)."""

    def role(self, name: str) -> str:
        """The role of a tensor: the first of norm, embedding, head, router, attention, ffn whose rule
        matches (a fused expert stack is ffn)."""
        for role in ("norm", "embedding", "head", "router", "attention", "ffn"):
            if re.search(getattr(self, role), name):
                return role
        return "ffn" if re.search(self.experts, name) else "other"


_DECODER_NORM = r"(?:^|\.)(?:norm|\w*layernorm|\w*_norm)\.(?:weight|bias)$"
_MLP = r"(?:^|\.)(?:mlp|block_sparse_moe)\."
_DECODER = dict(
    # Dense MLPs, Phi-3's fused gate_up_proj, per-expert weights (Mixtral's w1/w2/w3) and shared experts.
    ffn=_MLP + r"(?:(?:experts\.\d+|shared_experts?)\.)?(?:gate_proj|up_proj|down_proj|gate_up_proj|w1|w2|w3)\.weight$",
    # q/k/v/o, Phi-3's fused qkv_proj, DeepSeek's low-rank q_a/q_b/kv_a/kv_b.
    attention=r"(?:^|\.)self_attn\.(?:q_proj|k_proj|v_proj|o_proj|qkv_proj|q_a_proj|q_b_proj"
    r"|kv_a_proj_with_mqa|kv_b_proj)\.weight$",
    router=_MLP + r"(?:gate|router|shared_expert_gate)\.weight$",
    experts=_MLP + r"experts\.(?:gate_up_proj|down_proj)$",
    embedding=r"(?:^|\.)embed_tokens\.",
    norm=_DECODER_NORM,
    head=r"(?:^|\.)lm_head\.",
    layers=("layers",),
    decoder=True,
)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), **_DECODER),
    Architecture("mistral", ("mistral",), **_DECODER),
    Architecture("mixtral", ("mixtral",), **_DECODER),
    Architecture("qwen2", ("qwen2",), **_DECODER),
    Architecture("qwen2_moe", ("qwen2_moe",), **_DECODER),
    Architecture("qwen3", ("qwen3",), **_DECODER),
    Architecture("qwen3_moe", ("qwen3_moe",), **_DECODER),
    Architecture("gemma2", ("gemma2", "gemma"), **_DECODER),
    Architecture("gemma3", ("gemma3", "gemma3_text"), **_DECODER),
    Architecture("phi3", ("phi3",), **_DECODER),
    Architecture("olmo2", ("olmo2",), **_DECODER),
    Architecture("smollm3", ("smollm3",), **_DECODER),
    Architecture("granite", ("granite",), **_DECODER),
    Architecture("deepseek", ("deepseek_v3", "deepseek_v2"), **_DECODER),
    Architecture("gpt_oss", ("gpt_oss",), **{**_DECODER, "experts_input_axis": 1}),
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
"""Names of the decoder-only families of the table."""

GENERIC = Architecture(
    "generic",
    (),
    ffn=r"(?:^|\.)(?:mlp|ffn|feed_forward|feedforward|block_sparse_moe)\.[\w.]*weight$",
    attention=r"(?:^|\.)(?:self_attn|attn|attention)\.[\w.]*weight$",
    embedding=r"(?:^|\.)(?:embed_tokens|embeddings?|wte|wpe|word_embeddings)\.",
    norm=r"(?:^|\.)(?:\w*norm\w*|ln_\w+)\.(?:weight|bias)$",
    head=r"(?:^|\.)(?:lm_head|output|classifier)\.",
    layers=("layers", "encoder.layer", "decoder.layers", "h"),
    router=r"(?:^|\.)(?:mlp|ffn|feed_forward|block_sparse_moe|moe)\.(?:gate|router)\.weight$",
    experts=r"(?:^|\.)experts\.\w*(?:proj|w1|w2|w3)$",
    experts_input_axis=None,
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


def hidden_size(config: Mapping | None) -> int | None:
    """The model's hidden size from ``config.json`` (or its ``text_config``), if it states one."""
    config = config or {}
    h = config.get("hidden_size", (config.get("text_config") or {}).get("hidden_size"))
    return h if isinstance(h, int) and not isinstance(h, bool) else None


def why_dense(name: str, dtype: str, shape: tuple[int, ...], arch: Architecture) -> str | None:
    """Why a tensor cannot become codes (``"1-D"``, ``"3-D"``, ``"dtype I32"``, ``"empty"``, ``"bias"``),
    or None: a float weight of 2 dimensions, or a fused expert stack of 3."""
    if dtype not in C.QUANTIZABLE_DTYPES:
        return f"dtype {dtype}"
    if len(shape) < 2 or len(shape) > 3 or len(shape) == 3 and not re.search(arch.experts, name):
        return f"{len(shape)}-D"
    if 0 in shape:
        return "empty"
    if name.endswith("bias"):  # gpt-oss keeps its experts' biases as [experts, out]
        return "bias"
    return None


def _roles_of(layers: str) -> tuple[str, ...]:
    return {"ffn": ("ffn",), "attention": ("attention",), "linear": ("ffn", "attention")}[layers]


def _named(tensors: Mapping[str, tuple[str, tuple[int, ...]]], layers: str, arch: Architecture) -> list[str]:
    """The names a preset's roles or a pattern name, quantizable or not (the pattern is valid)."""
    if layers in PRESETS:
        return [n for n in tensors if arch.role(n) in _roles_of(layers)]
    rx = re.compile(layers)
    return [n for n in tensors if rx.search(n)]


def unquantized(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]], layers: str, arch: Architecture
) -> dict[str, str]:
    """Tensors the selection names (by role or pattern, as :func:`select` does) that stay dense
    because they cannot become codes: ``{name: why}``, in the given order."""
    try:
        hits = _named(tensors, layers, arch)
    except re.error:
        return {}
    out = {n: why_dense(n, *tensors[n], arch) for n in hits}
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
    each name; a pattern may select routers, embeddings or the head explicitly, presets never do. A
    selection with no quantizable weight, or a pattern that names a tensor of one dimension (a norm,
    a bias), raises :class:`LayerPatternError`.
    """
    if layers in PRESETS:
        out = [n for n in _named(tensors, layers, arch) if why_dense(n, *tensors[n], arch) is None]
        if not out:
            raise LayerPatternError(
                path,
                f"--layers {layers}: no {'/'.join(_roles_of(layers))} weights found under the {arch.name} naming rules",
            )
        return out
    try:
        hits = _named(tensors, layers, arch)
    except re.error as exc:
        raise LayerPatternError(
            path, f"--layers {layers!r} is not a valid regular expression ({exc})"
        ) from None
    if not hits:
        raise LayerPatternError(
            path,
            f"--layers {layers!r} matches no tensor name (presets: {', '.join(PRESETS)}; e.g. {next(iter(tensors), '')!r})",
        )
    flat = next((n for n in hits if len(tensors[n][1]) < 2), None)
    if flat is not None:
        raise LayerPatternError(
            path,
            f"--layers {layers!r} selects {flat!r}, of {len(tensors[flat][1])} dimensions: only weights "
            "are quantized; narrow the pattern (e.g. end it with 'weight$')",
        )
    out = [n for n in hits if why_dense(n, *tensors[n], arch) is None]
    if not out:
        raise LayerPatternError(
            path,
            f"--layers {layers!r} matches {len(hits)} tensors but none is a float weight (e.g. {hits[0]!r})",
        )
    return out


def input_axes(
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    names: list[str],
    arch: Architecture,
    hidden: int | None,
    *,
    path: str | None = None,
) -> dict[str, int]:
    """The axis of input features of each selected weight: 1 for a linear weight ``[out, in]``; for a
    fused expert stack the family's layout, checked against the hidden size (generic rules: the one
    layout the hidden size allows). A stack that fits none raises :class:`ExpertShapeError`."""
    return {n: 1 if len(tensors[n][1]) == 2 else _expert_axis(n, tensors[n][1], arch, hidden, path) for n in names}


def _expert_axis(name: str, shape: tuple[int, ...], arch: Architecture, hidden: int | None, path) -> int:
    """gate/up stacks read the hidden state (input axis = hidden); down stacks write it (the other)."""
    down = bool(re.search(r"(?:down_proj|w2)$", name))

    def fits(axis: int) -> bool:
        return hidden is None or shape[3 - axis if down else axis] == hidden

    fixed = arch.experts_input_axis
    fit = [a for a in ((fixed,) if fixed else (1, 2)) if fits(a)]
    if len(fit) == 1 and (fixed or hidden is not None):
        return fit[0]
    layouts = {1: "[experts, in, out]", 2: "[experts, out, in]"}
    told = layouts[fixed] if fixed else "[experts, in, out] or [experts, out, in], told apart by the hidden size"
    raise ExpertShapeError(
        path, f"{name}: expert shape {list(shape)} fits no layout of {arch.name} ({told}; hidden size {hidden})"
    )
