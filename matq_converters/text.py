"""Text corpora as token windows, for calibration (``matq quantize --calib``), evaluation (``matq eval``)
and training: the one place that finds text files, reads them, tokenizes them and cuts windows.

Finding: a file, or a folder's files whatever their names (recursively, sorted by relative path,
hidden files and folders left out; a caller may name suffixes), or a list of either. Reading: regular
files only (``matq_format.safefs``: a FIFO is refused, not waited on), as UTF-8 with a BOM dropped;
NUL bytes or undecodable bytes mean the file is not text: a file named on its own is an error, a
folder's is skipped, and the skipped files are said once (:class:`SkippedFilesWarning`).
Tokenizing: each file on its own (no special tokens), the streams concatenated; files are read and
tokenized in pieces of about :data:`PIECE_BYTES`, cut before a space that starts a word (where the
tokenizers' pre-tokenizers split anyway), and reading stops once enough tokens are there, so a huge
one-line file costs what is kept, not its size. Cutting: whole windows of one length; when the
tokenizer puts a BOS token in front of a text, it replaces each window's first token (as llama.cpp's
perplexity tool does). Each caller passes its own error class, so its errors say what the text was for.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matq_format.errors import MatqError
from matq_format.safefs import open_regular

__all__ = [
    "PIECE_BYTES",
    "SUFFIXES",
    "SkippedFilesWarning",
    "TokenStream",
    "adds_bos",
    "cut_windows",
    "folder_files",
    "names_a_folder",
    "read_pieces",
    "read_text",
    "text_files",
    "tokenize_documents",
    "tokenize_files",
]

SUFFIXES = (".txt", ".md", ".rst")
"""Suffixes a caller may pass to :func:`folder_files` to keep only these (training data does)."""
PIECE_BYTES = 1 << 20
"""About how many bytes of text are read and tokenized at a time."""
_MAX_PIECE_BYTES = 16 << 20
"""A piece with no place to cut is cut at a character boundary past this (no spaces: CJK, minified)."""
_CUT = re.compile(rb"(?<=[^\s]) (?=[^\s])")
"""A cut: before a single space between two non-space bytes (never inside a UTF-8 character)."""

PathArg = str | os.PathLike


class SkippedFilesWarning(UserWarning):
    """Files of a text folder that are not text (NUL bytes, not UTF-8), skipped: said once per corpus."""

    SHOWN = 3

    def __init__(self, files: list[tuple[Path, str]]):
        self.files = list(files)
        names = ", ".join(f"{p} ({why})" for p, why in self.files[: self.SHOWN])
        more = f" and {len(self.files) - self.SHOWN} more" if len(self.files) > self.SHOWN else ""
        super().__init__(f"skipped {len(self.files)} file(s) that are not text: {names}{more}")


def folder_files(folder: Path, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """A folder's regular files (with one of ``suffixes``, any case, when given), recursively, by
    relative path; hidden files and folders (``.git``) left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            p = Path(dirpath) / f
            if f.startswith(".") or (suffixes is not None and not f.lower().endswith(suffixes)):
                continue
            if p.is_file():
                out.append(p)
    return sorted(out, key=lambda f: f.relative_to(folder).as_posix())


def text_files(path: PathArg | Iterable[PathArg], error: type[MatqError]) -> list[Path]:
    """The files a text argument stands for: a file, a folder's files, or a list of either."""
    return [f for f, _ in _text_files(path, error)]


def names_a_folder(path: PathArg | Iterable[PathArg]) -> bool:
    """Whether a text argument is or holds a folder (whose files that are not text are skipped)."""
    if isinstance(path, (str, os.PathLike)):
        return Path(path).is_dir()
    return any(names_a_folder(p) for p in path)


def _text_files(path: PathArg | Iterable[PathArg], error: type[MatqError]) -> list[tuple[Path, bool]]:
    """(file, found in a folder) for each file the argument stands for."""
    if not isinstance(path, (str, os.PathLike)):
        out = [f for p in path for f in _text_files(p, error)]
        if not out:
            raise error(None, "no text given")
        return out
    p = Path(path)
    if p.is_dir():
        files = folder_files(p)
        if not files:
            raise error(p, "folder holds no files")
        return [(f, True) for f in files]
    if not p.exists():
        raise error(p, "no such file or folder")
    if not p.is_file():
        raise error(p, "is not a regular file")
    return [(p, False)]


def read_text(path: Path, error: type[MatqError]) -> tuple[bytes, str]:
    """A file's bytes and its text (UTF-8, a BOM dropped, no NUL bytes); the caller decides about
    text that is only white space."""
    pieces = list(read_pieces(path, error, piece_bytes=None))
    return b"".join(b for b, _ in pieces), "".join(t for _, t in pieces)


def read_pieces(
    path: Path,
    error: type[MatqError],
    piece_bytes: int | None = PIECE_BYTES,
    not_text: list[tuple[Path, str]] | None = None,
) -> Iterator[tuple[bytes, str]]:
    """A file's bytes and text in pieces of about ``piece_bytes`` (None: the whole file at once),
    each cut before a space between two words (or, with none in reach, at a character boundary), so
    that tokenizing the pieces one by one gives the tokens of the whole; checked as :func:`read_text`
    says, piece by piece. A file that is not text is an ``error``, or, given ``not_text``, appended
    to it as ``(path, why)`` and ends the pieces."""
    try:
        f = open_regular(path)
    except OSError as exc:
        raise error(path, f"cannot read: {exc.strerror or exc}") from None
    with f:
        offset, rest, first = 0, b"", True
        while True:
            try:
                if piece_bytes is None:
                    more = f.read()
                else:
                    more = f.read(piece_bytes - len(rest) if len(rest) < piece_bytes // 2 else piece_bytes)
            except OSError as exc:
                raise error(path, f"cannot read: {exc.strerror or exc}") from None
            data = rest + more
            if not data:
                return
            cut = len(data) if not more else None if piece_bytes is None else _cut(data, piece_bytes)
            if cut is None:  # no place to cut yet: read on
                rest = data
                continue
            piece, rest = data[:cut], data[cut:]
            why = None
            if b"\0" in piece:
                why = "is not text (holds NUL bytes)"
            else:
                try:
                    text = piece.decode("utf-8-sig" if first else "utf-8")
                except UnicodeDecodeError as exc:
                    why = f"is not UTF-8 text (byte {offset + exc.start})"
            if why is not None:
                if not_text is None:
                    raise error(path, why)
                not_text.append((path, why))
                return
            yield piece, text
            offset += len(piece)
            first = False


def _cut(data: bytes, piece_bytes: int) -> int | None:
    """Where to cut ``data`` (more follows): before its last space between words (looked for in its
    second half, or anywhere once it grew past a piece), else past ``_MAX_PIECE_BYTES`` before the
    last character that starts there, else None (read more first)."""
    if len(data) < piece_bytes:
        return None
    last = None
    for m in _CUT.finditer(data, len(data) // 2 if len(data) <= piece_bytes else 0):
        last = m.start()
    if last:
        return last
    if len(data) < _MAX_PIECE_BYTES:
        return None
    i = len(data) - 1
    while i > 0 and data[i] & 0xC0 == 0x80:  # back over continuation bytes to a character's start
        i -= 1
    return i or len(data)


@dataclass(frozen=True)
class TokenStream:
    """The tokens of files read in order, and what was read: the record a manifest keeps."""

    ids: np.ndarray
    """int64 token ids, every used file's tokens one after the other."""
    files: list[Path] = field(default_factory=list)
    sha256: str = ""
    """sha256 of the bytes read of the used files, in order (of the last, the part read when enough
    tokens were there)."""
    text_bytes: int = 0


def tokenize_files(
    tokenizer,
    files: Sequence[Path],
    error: type[MatqError],
    max_tokens: int,
    *,
    skip_empty: bool = False,
) -> TokenStream:
    """Tokenize ``files`` one by one (no special tokens), piece by piece (:func:`read_pieces`), until
    ``max_tokens`` tokens are there: nothing past them is read.

    With ``skip_empty`` (the files of a folder), a file of white space only adds nothing and a file
    that is not text is skipped, the skipped ones said once (:class:`SkippedFilesWarning`); without,
    each is an ``error`` naming it. ``sha256`` and ``text_bytes`` cover the bytes read."""
    ids: list[int] = []
    used: list[Path] = []
    digest = hashlib.sha256()
    n_bytes = 0
    not_text: list[tuple[Path, str]] = []
    for f in files:
        if len(ids) >= max_tokens:
            break
        mine, seen, has_text, read = [], digest.copy(), False, 0
        for data, text in read_pieces(f, error, not_text=not_text if skip_empty else None):
            seen.update(data)
            read += len(data)
            has_text = has_text or bool(text.strip())
            mine.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if has_text and len(ids) + len(mine) >= max_tokens:
                break
        if not_text and not_text[-1][0] == f:
            continue
        if not has_text:
            if skip_empty:
                continue
            raise error(f, "is empty")
        ids.extend(mine)
        digest, n_bytes = seen, n_bytes + read
        used.append(f)
    if not_text:
        warnings.warn(SkippedFilesWarning(not_text), stacklevel=2)
    return TokenStream(np.asarray(ids, dtype=np.int64), used, digest.hexdigest(), n_bytes)


def tokenize_documents(docs: Sequence[str], tokenizer) -> np.ndarray:
    """One int32 token stream: each document's tokens followed by the end-of-sequence (or SEP) token."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    parts = [np.asarray(x + ([eos] if eos is not None else []), dtype=np.int32) for x in ids]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def adds_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text (Llama 3, Gemma), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def cut_windows(
    stream: np.ndarray, length: int, count: int | None = None, bos: int | None = None
) -> np.ndarray:
    """The first ``count`` (default: all) whole windows ``[count, length]`` of ``stream``, in its dtype;
    ``bos`` replaces each window's first token (in a copy: the stream is left as it was)."""
    n = len(stream) // length if count is None else count
    out = np.ascontiguousarray(stream[: n * length].reshape(n, length))
    if bos is not None:
        out = out.copy()
        out[:, 0] = bos
    return out
