"""Typed errors of ``matq eval``; each names its file, so the CLI prints one line."""

from __future__ import annotations

from matq_format.errors import MatqError, RequestError


class TextError(MatqError):
    """The evaluation text is missing, empty, not UTF-8 text, or shorter than one window."""


class TokenizerError(MatqError):
    """The reference folder holds no tokenizer transformers can load."""


class CandidateError(RequestError):
    """A candidate spec names nothing evaluable, or a model whose vocabulary differs from the reference's."""


class CacheSpaceError(MatqError):
    """The folder for the reference logits lacks the disk space they need."""
