"""Outputs that appear whole or not at all, never clobber an input, and never race.

Every matq command that writes goes through :class:`AtomicOutput`:

- ``OUT`` must not be, contain, or lie inside any input (checked on real paths).
- A run holds ``.OUT.matq-lock`` (an ``flock`` beside ``OUT``) from start to publish: a second run
  to the same output fails at once instead of silently losing one result.
- The result is built in ``.OUT.partial-PID-XXXX`` beside ``OUT`` and published with one rename
  that refuses to replace anything (``renameat2(RENAME_NOREPLACE)``): an ``OUT`` that appeared
  meanwhile is reported, not overwritten.
- ``overwrite`` replaces only what this kind of output is (a matq checkpoint, a GGUF file, ...),
  never an unrelated file or folder, and swaps old and new in one step
  (``renameat2(RENAME_EXCHANGE)``). Where the kernel lacks that, the old output is first renamed to
  ``.OUT.old-PID-XXXX``; a run killed between the two renames is repaired by the next run.
- Whoever takes the lock next removes the leftovers of runs that died (``kill -9``, power loss):
  their partial outputs, and old outputs already replaced.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import WriterError

log = logging.getLogger("matq")

PARTIAL_TAG = ".partial-"
OLD_TAG = ".old-"
LOCK_SUFFIX = ".matq-lock"


class OutputError(WriterError):
    """The output path cannot be written as asked."""


class OutputExistsError(OutputError):
    """The output exists and replacing it was not asked for."""


class OutputOverlapError(OutputError):
    """The output is, contains, or lies inside one of the run's inputs."""


class OutputKindError(OutputError):
    """The output exists and is not what this command writes, so it is never replaced."""


class OutputBusyError(OutputError):
    """Another run is writing the same output."""


class OutputRaceError(OutputExistsError):
    """Something appeared at the output while this run was writing; nothing was published."""


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: a name for messages, folder or file, and how to recognise one."""

    name: str
    is_dir: bool
    recognize: Callable[[Path], bool]


def check_disjoint(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is, contains, or lies inside an input (real paths compared)."""
    o = Path(os.path.realpath(out))
    for i in inputs:
        s = Path(os.path.realpath(i))
        if o == s:
            raise OutputOverlapError(out, f"is the input {i}; write somewhere else")
        if s in o.parents:
            raise OutputOverlapError(out, f"lies inside the input {i}; write outside it")
        if o in s.parents:
            raise OutputOverlapError(out, f"contains the input {i}; write somewhere else")


class AtomicOutput:
    """``with AtomicOutput(out, kind) as o:`` write into ``o.tmp``, then ``o.commit()``.

    Leaving the block without ``commit`` (an error, Ctrl-C) removes ``o.tmp``; ``OUT`` is untouched.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        kind: OutputKind,
        *,
        inputs: Iterable[str | os.PathLike] = (),
        overwrite: bool = False,
    ):
        self.out = Path(out)
        self.kind = kind
        self.inputs = list(inputs)
        self.overwrite = overwrite
        self.tmp: Path | None = None
        self._lock_fd: int | None = None
        self._lock_path = self.out.with_name(f".{self.out.name}{LOCK_SUFFIX}")
        self._done = False
        self._made: list[Path] = []  # folders above OUT this run created, deepest first

    # --- life cycle -------------------------------------------------------------------------------
    def open(self) -> AtomicOutput:
        if not self.out.name or self.out.name in (".", ".."):
            raise OutputError(self.out, "is not a file or folder name")
        check_disjoint(self.out, self.inputs)
        self._check_existing()
        try:
            self._made = [a for a in [self.out.parent, *self.out.parent.parents] if not a.exists()]
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._clean_stale()
            self._check_existing()  # again: a repaired replacement may have brought OUT back
            prefix = f".{self.out.name}{PARTIAL_TAG}{os.getpid()}-"
            if self.kind.is_dir:
                self.tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=self.out.parent))
            else:
                self.tmp = self.out.with_name(prefix + secrets.token_hex(4))
        except OSError as exc:
            self.close()
            raise OutputError(self.out, f"cannot write here: {exc.strerror or exc}") from None
        except BaseException:
            self.close()
            raise
        return self

    def commit(self) -> Path:
        """Move the finished ``tmp`` into place."""
        assert self.tmp is not None and not self._done
        umask = os.umask(0)
        os.umask(umask)
        if self.kind.is_dir:  # mkdtemp made it private; publish it like any folder
            os.chmod(self.tmp, 0o777 & ~umask)
        if os.path.lexists(self.out):
            if not self.overwrite:
                raise OutputRaceError(
                    self.out, "appeared while this run was writing; the result was discarded, not published"
                )
            self._check_replaceable()
            self._swap()
        elif not _renameat2(self.tmp, self.out, _RENAME_NOREPLACE):
            if os.path.lexists(self.out):
                raise OutputRaceError(self.out, "appeared while this run was writing; nothing was published")
            os.rename(self.tmp, self.out)
        self._done = True
        return self.out

    def close(self) -> None:
        """Remove what was not published and release the lock."""
        if self.tmp is not None and not self._done:
            _remove(self.tmp)
        self._unlock()
        if not self._done:
            for folder in self._made:  # a failed run leaves no trace, not even the folders it made
                try:
                    folder.rmdir()
                except OSError:  # another run's files are there now, or it is gone already
                    break

    def __enter__(self) -> AtomicOutput:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if isinstance(exc, OSError) and not isinstance(exc, WriterError):
            raise output_error(self.out, exc) from None

    # --- internals --------------------------------------------------------------------------------
    def _check_existing(self) -> None:
        if not os.path.lexists(self.out):
            return
        if not self.overwrite:
            raise OutputExistsError(self.out, "already exists")
        self._check_replaceable()

    def _check_replaceable(self) -> None:
        if self.out.is_symlink():
            raise OutputKindError(self.out, "is a symbolic link; refusing to replace it")
        if not self.kind.recognize(self.out):
            raise OutputKindError(
                self.out,
                f"exists and is not {'an' if self.kind.name[0] in 'AEIOU' else 'a'} {self.kind.name}; refusing to replace it",
            )

    def _swap(self) -> None:
        if _renameat2(self.tmp, self.out, _RENAME_EXCHANGE):
            _remove(self.tmp)  # the old output, now under the partial name
            return
        old = self.out.with_name(f".{self.out.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(self.out, old)
        os.rename(self.tmp, self.out)  # a kill before this line is repaired by the next run
        _remove(old)

    def _lock(self) -> None:
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise OutputBusyError(
                    self.out, f"another matq run (pid {holder}) is writing it; wait for it to finish"
                ) from None
            try:  # the last holder may have removed the lock file between our open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self._lock_path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            os.unlink(self._lock_path)
        except OSError:
            pass
        os.close(self._lock_fd)
        self._lock_fd = None

    def _clean_stale(self) -> None:
        """With the lock held, every partial or old output of this name belongs to a run that died."""
        stem = f".{self.out.name}"
        stale = [p for p in self.out.parent.iterdir() if p.name.startswith(stem + PARTIAL_TAG)]
        olds = sorted(
            (p for p in self.out.parent.iterdir() if p.name.startswith(stem + OLD_TAG)),
            key=lambda p: p.stat(follow_symlinks=False).st_mtime_ns,
        )
        if olds and not os.path.lexists(self.out):
            os.rename(olds.pop(), self.out)
            log.warning("%s: restored the output a killed run had moved aside", self.out)
        for p in stale + olds:
            _remove(p)
            log.warning("%s: removed %s, left by a run that did not finish", self.out, p.name)


def output_error(out: Path, exc: OSError) -> OutputError:
    """An OSError met while writing ``out``, as one line that names it (disk full, TMPDIR full...)."""
    where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != out else ""
    msg = f"cannot write{where}: {exc.strerror or exc}"
    if exc.errno == errno.ENOSPC:
        msg += f"; temporary files go beside it and to TMPDIR ({tempfile.gettempdir()})"
    return OutputError(out, msg)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
try:
    _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (OSError, AttributeError):  # not glibc >= 2.28
    _libc_renameat2 = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2`` with ``flags``; False where the C library or file system lacks it."""
    if _libc_renameat2 is None:
        return False
    if _libc_renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    if err == errno.EEXIST:
        raise OutputRaceError(dst, "appeared while this run was writing; nothing was published")
    raise OSError(err, os.strerror(err), os.fspath(dst))
