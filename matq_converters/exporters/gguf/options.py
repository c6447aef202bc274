"""Settings of ``--to gguf``, declared apart from the exporter so that the CLI builds its flags (and a
library caller checks its values) without importing gguf."""

from __future__ import annotations

from dataclasses import dataclass

from matq_converters.registry import option

OUTTYPES = ("auto", "source", "f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class GGUFOptions:
    """Settings of ``--to gguf``; the CLI's flags come from these fields."""

    outtype: str = option(
        "auto",
        "Type of unquantized 2-D tensors (embeddings, head): auto picks as llama.cpp does for the width "
        "(Q6_K; Q8_0 at int8 or where rows are not multiples of 256), source keeps them as stored. "
        "1-D tensors are always f32.",
        choices=OUTTYPES,
    )
    exact: bool = option(
        False,
        "Only types that hold each slice exactly, even where that is bigger than the width's compact "
        "type (and unquantized tensors as stored unless --outtype says otherwise).",
    )
    tokenizer_pre: str | None = option(None, "llama.cpp pre-tokenizer name, when matq cannot infer it.")
    types: tuple[str, ...] | None = option(None, "Block types to try (tests, benchmarks).", cli=False)
    float_slices: str | None = option(
        None, "Write slices as plain floats (what llama.cpp's converter makes).", choices=("f32", "f16", "bf16"),
        cli=False,
    )
