"""Reading a model folder without leaking what lies outside it.

A model folder (a Hugging Face snapshot, a matq checkpoint) is read only through these helpers, so
that a link cannot make matq copy ``/etc/passwd`` into a checkpoint, and a FIFO or ``/dev/zero``
cannot hang or fill a run. The rule:

- a file is read only if its real path lies inside the folder, or inside the ``blobs`` folder of a
  Hugging Face cache when the folder is one of that cache's ``snapshots/<revision>`` (whose files are
  links to ``../../blobs/<hash>``);
- only regular files are read, opened without blocking so a FIFO is refused rather than waited on;
- reads are bounded by the size the caller expects;
- JSON is parsed by one reader (:func:`read_json`, :func:`parse_json`): bounded in size and depth,
  and every way it can fail (not UTF-8, not JSON, nested deeper than :data:`JSON_MAX_DEPTH`) is a
  typed error naming the file, never a RecursionError.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import FormatError, MatqError

JSON_MAX_DEPTH = 64
"""Deepest nesting of arrays and objects matq accepts in a JSON file it reads (configs, tokenizers,
indexes, plans nest a few levels; libraries that walk them recursively fail long before 1000)."""


class RefusedFileError(FormatError):
    """A file matq will not read: a link out of its folder, or not a regular file."""

    hint = "copy the file into the folder, or point the link inside it"


def allowed_roots(root: str | os.PathLike) -> tuple[Path, ...]:
    """Real folders whose files may be read as part of ``root``."""
    real = Path(os.path.realpath(root))
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real, real.parent.parent / "blobs"
    return (real,)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def check_file(path: str | os.PathLike, roots: tuple[Path, ...]) -> Path:
    """``path`` if it is a regular file whose real path lies inside ``roots``; else RefusedFileError."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    if not _inside(real, roots):
        raise RefusedFileError(path, "is a link to a file outside the model folder; refusing to read it")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise RefusedFileError(path, "is a link to nothing (dangling)") from None
    if not stat.S_ISREG(st.st_mode):
        raise RefusedFileError(path, f"is not a regular file ({_kind(st.st_mode)}); refusing to read it")
    return path


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open a regular file for reading; a FIFO, device or folder is refused at once, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise RefusedFileError(path, "is a folder, not a file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RefusedFileError(path, f"is not a regular file ({_kind(mode)}); refusing to read it")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bounded(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (one more is read to tell)."""
    with open_regular(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RefusedFileError(path, f"is larger than the {limit} bytes expected")
    return data


class JSONFileError(FormatError):
    """A JSON file (config, tokenizer, index) that is not UTF-8, not JSON, or nested too deep."""


def parse_json(
    data: bytes | str,
    path: str | os.PathLike | None,
    error: type[MatqError] = JSONFileError,
    max_depth: int = JSON_MAX_DEPTH,
):
    """The JSON value of ``data`` (the bytes of ``path``); every failure is ``error(path, ...)``.

    Nesting deeper than ``max_depth`` is refused: json's decoder stops near the interpreter's
    recursion limit with a RecursionError, and the libraries handed such a file (transformers'
    config copies, tokenizers) fail deeper still."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
        doc = json.loads(text)
    except UnicodeDecodeError as exc:
        raise error(path, f"is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise error(path, f"is not valid JSON: nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and integers of more digits than Python converts
        raise error(path, f"is not valid JSON: {exc}") from None
    if _depth_over(doc, max_depth):
        raise error(path, f"is not valid JSON: nested deeper than {max_depth} levels")
    return doc


def read_json(
    path: str | os.PathLike,
    limit: int,
    error: type[MatqError] = JSONFileError,
    roots: tuple[Path, ...] | None = None,
    max_depth: int = JSON_MAX_DEPTH,
):
    """The JSON value of a regular file of at most ``limit`` bytes (inside ``roots`` when given)."""
    if roots is not None:
        check_file(path, roots)
    return parse_json(read_bounded(path, limit), path, error, max_depth)


def _depth_over(doc, max_depth: int) -> bool:
    """Whether arrays and objects nest deeper than ``max_depth`` in ``doc`` (without recursion)."""
    stack = [(doc, 1)] if isinstance(doc, (dict, list)) else []
    while stack:
        node, d = stack.pop()
        if d > max_depth:
            return True
        values = node.values() if isinstance(node, dict) else node
        stack.extend((v, d + 1) for v in values if isinstance(v, (dict, list)))
    return False


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a plain file"
