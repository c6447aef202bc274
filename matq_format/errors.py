"""One exception class per way a matq file or request can be wrong.

Every error carries the offending path so the CLI can print one line: ``<path>: <what is wrong>``.
"""

from __future__ import annotations

import os


class MatqError(Exception):
    """Base of every error matq raises on purpose."""

    hint: str = ""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


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


class WriterError(MatqError):
    """The writer was used out of order or given inconsistent tensors."""
