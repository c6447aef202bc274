"""Outputs that appear whole or not at all, never clobber an input, and never race.

Every matq command that writes goes through :class:`AtomicOutput`:

- ``OUT`` must not be, contain, or lie inside any input (checked on real paths).
- A run holds ``.OUT.matq-lock`` (an ``flock`` beside ``OUT``) from start to publish: a second run
  to the same output fails at once instead of silently losing one result.
- The result is built in ``.OUT.partial-PID-XXXX`` beside ``OUT`` and published with one rename
  that refuses to replace anything (``renameat2(RENAME_NOREPLACE)``): an ``OUT`` that appeared
  meanwhile is reported, not overwritten.
- ``overwrite`` replaces only what this kind of output is (a matq checkpoint, a GGUF file, ...),
  never an unrelated file or folder, and a folder only when its own record (a manifest, an index)
  lists every entry in it: a file a user added is named, never deleted. Old and new swap in one step
  (``renameat2(RENAME_EXCHANGE)``). Where the kernel lacks that, the old output is first renamed to
  ``.OUT.old-PID-XXXX``; a run killed between the two renames is repaired by the next run.
- Whoever takes the lock next removes the leftovers of runs that died (``kill -9``, power loss):
  their partial outputs, and old outputs already replaced, recognised by their exact names and a
  process id that no longer runs, never by prefix alone.
- matq creates, truncates, renames or deletes only what it can prove it made: the lock file is
  opened without following links and must be a regular file holding a process id; scratch folders in
  TMPDIR (:func:`scratch_dir`) carry the owner's process id and are removed by the next run once
  that process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import WriterError

log = logging.getLogger("matq")

PARTIAL_TAG = ".partial-"
OLD_TAG = ".old-"
LOCK_SUFFIX = ".matq-lock"
RANDOM_LEN = 8
"""Random characters ending every temporary name (``mkdtemp``'s and ``token_hex(4)``'s)."""
PID_DIGITS = 7
"""Longest process id (Linux's ``pid_max`` is at most 2^22)."""
LOCK_MAX_BYTES = 32
_PID = rf"(?P<pid>\d{{1,{PID_DIGITS}}})"
_RANDOM = rf"[a-z0-9_]{{{RANDOM_LEN}}}"
SHOWN = 5


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
    members: Callable[[Path], Iterable[str] | None] | None = None
    """For a folder: the relative paths its own record lists (None: it records none). ``overwrite``
    replaces the folder only when it holds nothing else."""


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
        if not os.fspath(out):
            raise OutputError(None, "the output path is empty; name a file or folder to write")
        self.out = Path(out)
        if not self.out.name or self.out.name in (".", ".."):
            raise OutputError(self.out, "is not a file or folder name")
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
        _check_name_length(self.out)
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
        if self.out.is_dir():  # what a folder holds, whichever form replaces it
            self._check_members()

    def _check_members(self) -> None:
        """A folder is replaced only when its own record lists everything in it."""
        listed = self.kind.members(self.out) if self.kind.members else None
        if listed is None:
            raise OutputKindError(
                self.out, "records no list of its files; refusing to replace it (remove it yourself)"
            )
        foreign = foreign_entries(self.out, listed)
        if foreign:
            more = f", and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
            raise OutputKindError(
                self.out,
                f"holds entries the {self.kind.name} does not list ({', '.join(foreign[:SHOWN])}{more}); "
                "refusing to replace it: move them out, or remove it yourself",
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
            fd = _open_lock(self._lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, LOCK_MAX_BYTES, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise OutputBusyError(
                    self.out, f"another matq run (pid {holder}) is writing it; wait for it to finish"
                ) from None
            if _same_file(fd, self._lock_path):  # the last holder may have removed it meanwhile
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)

    def _unlock(self) -> None:
        if self._lock_fd is None:
            return
        if _same_file(self._lock_fd, self._lock_path):
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
        os.close(self._lock_fd)
        self._lock_fd = None

    def _clean_stale(self) -> None:
        """With the lock held, the partial and old outputs of this name whose process is gone
        belong to runs that died; an old output is put back only if it is of this kind."""
        pattern = re.compile(
            re.escape(f".{self.out.name}") + rf"(?P<tag>\.partial-|\.old-){_PID}-{_RANDOM}(-{_RANDOM})?"
        )  # .OUT.partial-PID-XXXXXXXX, with the single-file writer's -XXXXXXXX after it
        partials, olds = [], []
        for p in self.out.parent.iterdir():
            m = _left_by_dead_run(pattern, p.name)
            if m and m["tag"] == PARTIAL_TAG:
                partials.append(p)
            elif m and m["tag"] == OLD_TAG and self.kind.recognize(p):
                olds.append(p)
        olds.sort(key=lambda p: p.stat(follow_symlinks=False).st_mtime_ns)
        if olds and not os.path.lexists(self.out):
            os.rename(olds.pop(), self.out)
            log.warning("%s: restored the output a killed run had moved aside", self.out)
        for p in partials + olds:
            _remove(p)
            log.warning("%s: removed %s, left by a run that did not finish", self.out, p.name)


def _left_by_dead_run(pattern: re.Pattern, name: str) -> re.Match | None:
    """``name`` matched in full by ``pattern`` (whose ``pid`` group names the run that made it),
    where that process is gone; else None."""
    m = pattern.fullmatch(name)
    return m if m is not None and not pid_alive(int(m["pid"])) else None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (this one included); one we may not signal counts as running."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


FILES_KEY = "matq.files"
"""Metadata key under which an export folder records every file it wrote (a JSON list), so that
``overwrite`` replaces nothing a user added (an export's :attr:`OutputKind.members`)."""


def files_record(files: Iterable[str]) -> str:
    """The value of :data:`FILES_KEY` for ``files`` (relative POSIX paths)."""
    return json.dumps(sorted(files))


def read_files_record(metadata: dict | None) -> list[str] | None:
    """The files a :data:`FILES_KEY` entry of ``metadata`` lists; None where there is no valid one."""
    try:
        files = json.loads((metadata or {})[FILES_KEY])
    except (KeyError, ValueError, TypeError, RecursionError):
        return None
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def foreign_entries(folder: Path, listed: Iterable[str]) -> list[str]:
    """Entries of ``folder`` (relative, folders with a trailing ``/``) that ``listed`` (relative
    POSIX paths of files) does not account for; links are never followed."""
    files = {Path(p).as_posix() for p in listed}
    dirs = {parent.as_posix() for p in files for parent in Path(p).parents if parent != Path(".")}
    out: list[str] = []

    def walk(d: Path, rel: str) -> None:
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            r = f"{rel}{e.name}"
            if e.is_dir(follow_symlinks=False) and r in dirs:
                walk(Path(e.path), r + "/")
            elif r not in files or not e.is_file(follow_symlinks=False):
                out.append(r + ("/" if e.is_dir(follow_symlinks=False) else ""))

    walk(folder, "")
    return out


def _open_lock(path: Path) -> int:
    """The lock file, created or opened without following a link; anything but a regular file of
    matq's (one name, a process id or nothing inside) is refused, never truncated."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(path, "is a symbolic link, not a lock file matq made; remove it") from None
        raise
    st = os.fstat(fd)
    ok = stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size <= LOCK_MAX_BYTES
    if ok:
        ok = re.fullmatch(rb"\d*\n?", os.pread(fd, LOCK_MAX_BYTES, 0)) is not None
    if not ok:
        os.close(fd)
        raise OutputError(path, "is not a lock file matq made (a process id); refusing to touch it")
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _check_name_length(out: Path) -> None:
    """Refuse, before anything is made, a name whose temporary siblings would be too long."""
    extra = 1 + len(PARTIAL_TAG) + PID_DIGITS + 1 + 2 * (RANDOM_LEN + 1)
    parent = next((a for a in [out.parent, *out.parent.parents] if a.exists()), Path("."))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    n = len(os.fsencode(out.name))
    if n + extra > limit:
        raise OutputError(
            out, f"name is {n} bytes; matq builds it under a name {extra} bytes longer, so at most "
            f"{limit - extra} bytes fit here"
        )


@contextlib.contextmanager
def scratch_dir(tag: str, parent: str | os.PathLike | None = None) -> Iterator[Path]:
    """A private scratch folder ``matq-TAG-PID-XXXXXXXX`` in ``parent`` (TMPDIR), removed on exit;
    those a killed run of this user left (its process gone) are removed first."""
    where = Path(parent or tempfile.gettempdir())
    pattern = re.compile(rf"matq-{re.escape(tag)}-{_PID}-{_RANDOM}")
    with contextlib.suppress(OSError):
        for e in os.scandir(where):
            if _left_by_dead_run(pattern, e.name) and e.stat(follow_symlinks=False).st_uid == os.getuid():
                _remove(Path(e.path))
    path = Path(tempfile.mkdtemp(prefix=f"matq-{tag}-{os.getpid()}-", dir=where))
    try:
        yield path
    finally:
        _remove(path)


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
