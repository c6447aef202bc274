"""One exception class per way a matq file or request can be wrong.

Every error carries the offending path so the CLI can print one line: ``<path>: <what is wrong>``.
"""

from __future__ import annotations

import os


def printable(text: str) -> str:
    """``text`` with each character that does not print (controls, line and paragraph separators,
    bidi overrides) escaped as ``repr`` would (``\\n``, ``\\x1b``, ``\\u202e``); anything else is kept.

    For names and paths from files shown on a terminal: one line, and no escape sequences."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class MatqError(Exception):
    """Base of every error matq raises on purpose.

    The text (``str(error)``) is one printable line: tensor names and paths are shown through
    :func:`printable`; ``path`` and ``message`` keep them as they are."""

    hint: str = ""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(printable(f"{self.path}: {message}" if self.path else message))


# --- the file itself ----------------------------------------------------------------------------
class FormatError(MatqError):
    """The bytes are not a valid matq file (base class for the specific cases below)."""


class TruncatedFileError(FormatError):
    """The file ends before the header or a tensor's bytes do."""


class BadMagicError(FormatError):
    """Not a safetensors file, or a safetensors file that is not matq."""


class UnsupportedVersionError(FormatError):
    """The file's major version is newer than this reader, or it requires an unknown feature."""


class HeaderTooLargeError(FormatError):
    """The declared header length exceeds the limit."""


class HeaderError(FormatError):
    """The JSON header or the manifest is malformed or inconsistent."""


class OffsetError(FormatError):
    """Tensor byte ranges overlap, leave holes, or point past the end of the data."""


class LimitError(FormatError):
    """Too many tensors, dimensions, or elements."""


class BadParameterError(FormatError):
    """A scale or zero point is NaN, infinite, non-positive, or outside the code range."""


class ChecksumError(FormatError):
    """Stored bytes do not match their CRC-32."""


class MissingFileError(FormatError):
    """A file the manifest names is not there."""


# --- requests against a valid file ---------------------------------------------------------------
class RequestError(MatqError):
    """A valid file cannot serve what was asked of it."""


class UnknownTensorError(RequestError):
    """No tensor of that name."""


class MissingPlanesError(RequestError):
    """The checkpoint was sliced and lacks the bit-planes this width needs."""


class WidthError(RequestError):
    """A width outside 1..c, or one that does not fit the request."""


class PlanError(RequestError):
    """A Mix'n'Match plan cannot be parsed or does not match the checkpoint."""


class ShapeTooLargeError(RequestError):
    """A tensor numpy cannot hold as one array: dimensions that multiply past 2^63 bytes (an empty
    ``[0, 2^40, 2^40]`` is valid matq, and copies fine, but is no numpy array)."""


class WriterError(MatqError):
    """The writer was used out of order or given inconsistent tensors."""


class FileChangedError(MatqError):
    """A file of an open checkpoint was rewritten, replaced or cut by someone else while being read:
    its bytes are not the ones that were opened (not necessarily a damaged file; open it again)."""
