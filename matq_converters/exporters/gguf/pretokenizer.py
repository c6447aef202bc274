"""The llama.cpp pre-tokenizer of a byte-level BPE ``tokenizer.json`` whose vocabulary llama.cpp's
converter does not recognise (it hashes a sample's tokens, so a retrained vocabulary is unknown to
it): named from the split regex, which llama.cpp hard-codes one per name."""

from __future__ import annotations

import json
from pathlib import Path

from matq_converters.registry import TokenizerError

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_BY_SPLIT = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


def bpe_pre(path: Path) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json."""
    try:
        tj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(path, f"cannot be read: {exc}") from None
    pt = tj.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    types = [s.get("type") for s in steps]
    if types == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if types == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_BY_SPLIT and steps[0].get("behavior") in ("Isolated", "Removed"):
            return PRE_BY_SPLIT[regex]
    raise TokenizerError(
        path,
        f"byte-level BPE pre-tokenizer {json.dumps(pt)[:200]} is known neither to llama.cpp's converter "
        "nor by its split regex (Llama 3 -> llama-bpe, Qwen2 -> qwen2, GPT-2 ByteLevel -> gpt-2); "
        "pass tokenizer_pre if you know llama.cpp's name for it",
    )
