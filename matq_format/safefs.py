"""Reading a model folder without leaking what lies outside it.

A model folder (a Hugging Face snapshot, a matq checkpoint) is read only through these helpers, so
that a link cannot make matq copy ``/etc/passwd`` into a checkpoint, and a FIFO or ``/dev/zero``
cannot hang or fill a run. The rule:

- a file is read only if its real path lies inside the folder, or inside the ``blobs`` folder of a
  Hugging Face cache when the folder is one of that cache's ``snapshots/<revision>`` (whose files are
  links to ``../../blobs/<hash>``);
- only regular files are read, opened without blocking so a FIFO is refused rather than waited on;
- reads are bounded by the size the caller expects.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import FormatError


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
