"""Evaluation text: files read as UTF-8, tokenized with the reference's tokenizer, cut into windows.

A folder contributes its files whatever their names (recursively, sorted by relative path, hidden
ones left out; files that are not text skipped and said once); a list of paths is read in the order
given. Each file is tokenized on its own (no special tokens)
and the token streams are concatenated; files are read only until ``max_tokens`` are reached, so
a large folder costs what the run uses. The stream is cut into windows of ``ctx`` consecutive
tokens (whole windows only, at most ``max_tokens // ctx`` of them). When the tokenizer adds a BOS
token, the first token of every window is replaced by it, as llama.cpp's perplexity tool does.
Everything is deterministic: same files, tokenizer and settings, same windows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matq_converters import text as corpus

from .errors import TextError, TokenizerError

DEFAULT_CTX = 512
DEFAULT_MAX_TOKENS = 4096
"""8 windows of 512 (2,040 scored tokens with a BOS), as the tables in docs/results.md: every model
runs over all of them, so the time of a run grows with this times the number of models."""


@dataclass(frozen=True)
class Windows:
    """Token windows ``[n, ctx]`` and which positions are scored (predictions from ``first`` on)."""

    tokens: np.ndarray
    first: int
    bos: int | None
    files: list[Path] = field(default_factory=list)
    """Files whose tokens were used, in order."""

    @property
    def ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first

    @property
    def scored(self) -> int:
        return len(self.tokens) * self.scored_per_window

    def targets(self, i: int) -> np.ndarray:
        """The tokens predicted at the scored positions of window ``i``."""
        return self.tokens[i, self.first + 1 :]


def load_windows(
    tokenizer,
    text: str | os.PathLike | Iterable[str | os.PathLike],
    ctx: int = DEFAULT_CTX,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    first: int | None = None,
) -> Windows:
    """Tokenize ``text`` (see the module doc) into windows; ``tokenizer`` is a transformers tokenizer
    or a folder to load one from. ``first`` (default ``ctx // 2``, as llama.cpp) is the first position
    whose prediction is scored: every scored token has at least ``first`` tokens of context."""
    if ctx < 2:
        raise TextError(None, f"context {ctx} is too short; it must be at least 2 tokens")
    first = ctx // 2 if first is None else first
    if not 0 <= first <= ctx - 2:
        raise TextError(
            None, f"first scored position {first} must lie in 0..{ctx - 2} for a context of {ctx}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        except Exception as exc:  # no tokenizer files, or files transformers cannot read
            first = (str(exc).strip().splitlines() or [""])[0]
            raise TokenizerError(
                tokenizer, f"no tokenizer transformers can load ({type(exc).__name__}: {first})"
            ) from None
    files = corpus.text_files(text, TextError)
    n_windows = max_tokens // ctx
    if n_windows < 1:
        raise TextError(None, f"--max-tokens {max_tokens} is less than one window of {ctx} tokens")
    skip = corpus.names_a_folder(text)
    stream = corpus.tokenize_files(tokenizer, files, TextError, n_windows * ctx, skip_empty=skip)
    n_windows = min(n_windows, len(stream.ids) // ctx)
    if n_windows < 1:
        where = files[0] if len(files) == 1 else files[0].parent
        raise TextError(where, f"holds {len(stream.ids)} tokens, fewer than one window of {ctx}")
    bos = corpus.adds_bos(tokenizer)
    return Windows(corpus.cut_windows(stream.ids, ctx, n_windows, bos), first, bos, stream.files)
