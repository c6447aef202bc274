"""Text corpora as token windows, for calibration (``matq quantize --calib``), evaluation (``matq eval``)
and training: the one place that finds text files, reads them, tokenizes them and cuts windows.

Finding: a file, or a folder's ``.txt``/``.md``/``.rst`` files (recursively, sorted by relative path;
a caller may name other suffixes), or a list of either. Reading: regular files only
(``matq_format.safefs``: a FIFO is refused, not waited on), as UTF-8 with a BOM dropped; NUL bytes or
undecodable bytes mean the file is not text. Tokenizing: each file on its own (no special tokens), the
streams concatenated, files read only until enough tokens are there. Cutting: whole windows of one
length; when the tokenizer puts a BOS token in front of a text, it replaces each window's first token
(as llama.cpp's perplexity tool does). Each caller passes its own error class, so its errors say what
the text was for.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matq_format.errors import MatqError
from matq_format.safefs import open_regular

__all__ = [
    "SUFFIXES",
    "TokenStream",
    "adds_bos",
    "cut_windows",
    "folder_files",
    "read_text",
    "text_files",
    "tokenize_documents",
    "tokenize_files",
]

SUFFIXES = (".txt", ".md", ".rst")

PathArg = str | os.PathLike


def folder_files(folder: Path, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """A folder's regular files with one of ``suffixes`` (any case), recursively, by relative path."""
    return sorted(
        (f for f in folder.rglob("*") if f.is_file() and f.name.lower().endswith(suffixes)),
        key=lambda f: f.relative_to(folder).as_posix(),
    )


def text_files(path: PathArg | Iterable[PathArg], error: type[MatqError]) -> list[Path]:
    """The files a text argument stands for: a file, a folder's text files, or a list of either."""
    if not isinstance(path, (str, os.PathLike)):
        out = [f for p in path for f in text_files(p, error)]
        if not out:
            raise error(None, "no text given")
        return out
    p = Path(path)
    if p.is_dir():
        files = folder_files(p)
        if not files:
            raise error(p, f"folder holds no {', '.join(SUFFIXES)} files")
        return files
    if not p.exists():
        raise error(p, "no such file or folder")
    if not p.is_file():
        raise error(p, "is not a regular file")
    return [p]


def read_text(path: Path, error: type[MatqError]) -> tuple[bytes, str]:
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


@dataclass(frozen=True)
class TokenStream:
    """The tokens of files read in order, and what was read: the record a manifest keeps."""

    ids: np.ndarray
    """int64 token ids, every used file's tokens one after the other."""
    files: list[Path] = field(default_factory=list)
    sha256: str = ""
    """sha256 of the bytes of the used files, in order."""
    text_bytes: int = 0


def tokenize_files(
    tokenizer,
    files: Sequence[Path],
    error: type[MatqError],
    max_tokens: int,
    *,
    skip_empty: bool = False,
) -> TokenStream:
    """Tokenize ``files`` one by one (no special tokens) until ``max_tokens`` tokens are there.

    A file of white space only is skipped with ``skip_empty`` (it adds nothing to a folder), else it
    is an ``error`` naming it."""
    ids: list[int] = []
    used: list[Path] = []
    digest = hashlib.sha256()
    n_bytes = 0
    for f in files:
        if len(ids) >= max_tokens:
            break
        data, text = read_text(f, error)
        if not text.strip():
            if skip_empty:
                continue
            raise error(f, "is empty")
        digest.update(data)
        n_bytes += len(data)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        used.append(f)
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
