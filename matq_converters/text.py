"""Text corpora, for calibration (``matq quantize --calib``) and evaluation (``matq eval``).

A corpus is a file, or a folder's ``.txt``/``.md``/``.rst`` files in sorted order (or a list of
either). Files are read as regular files only (``matq_format.safefs``: a FIFO is refused, not
waited on), as UTF-8 with a BOM dropped; NUL bytes or undecodable bytes mean the file is not text.
Each caller passes its own error class, so its errors say what the text was for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from matq_format.errors import MatqError
from matq_format.safefs import open_regular

SUFFIXES = (".txt", ".md", ".rst")


class TextError(MatqError):
    """Text that is missing, empty, or not UTF-8 text."""


def text_files(
    path: str | os.PathLike | Iterable[str | os.PathLike], error: type[MatqError] = TextError
) -> list[Path]:
    """The files a text argument stands for: a file, a folder's text files, or a list of either."""
    if not isinstance(path, (str, os.PathLike)):
        out = [f for p in path for f in text_files(p, error)]
        if not out:
            raise error(None, "no text given")
        return out
    p = Path(path)
    if p.is_dir():
        files = sorted(
            (f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(SUFFIXES)),
            key=lambda f: f.relative_to(p).as_posix(),
        )
        if not files:
            raise error(p, f"folder holds no {', '.join(SUFFIXES)} files")
        return files
    if not p.exists():
        raise error(p, "no such file or folder")
    if not p.is_file():
        raise error(p, "is not a regular file")
    return [p]


def read_text(path: Path, error: type[MatqError] = TextError) -> tuple[bytes, str]:
    """A file's bytes and its text (UTF-8, a BOM dropped, no NUL bytes); the caller decides about
    text that is only white space."""
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as exc:
        raise error(path, f"cannot read: {exc.strerror or exc}") from None
    if b"\0" in data:
        raise error(path, "is not text (holds NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(path, f"is not UTF-8 text (byte {exc.start})") from None
    return data, text
