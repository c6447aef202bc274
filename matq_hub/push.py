"""``matq push``: upload a checkpoint (and exports made from it) to the Hub in one commit.

Every file goes into a single ``create_commit`` whose parent is the head the push started from, so
the branch moves once, to a revision holding the whole checkpoint, or not at all. Large files are
uploaded as LFS objects before the commit; a push that failed part-way is finished by running it
again: the Hub reports which objects it already holds and the client skips them. Pushing the same
checkpoint twice makes no new commit (the card is deterministic).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matq_format as mf
from matq_format import constants as C
from matq_format.checkpoint import Checkpoint
from matq_format.errors import MissingFileError

from .card import render_card
from .client import api, hub_errors, token_of
from .errors import HubAuthError, UnsafeUploadError

EXPORTS_DIR = "exports"
PLANE_FILE_RE = re.compile(r"^matq-plane-\d+\.safetensors$")


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit: str
    commit_url: str
    files: list[str]
    """Repository paths this push wrote (the checkpoint, exports, README.md)."""
    deleted: list[str]
    """Plane files of an earlier checkpoint that this one does not have."""
    changed: bool
    """False when the revision already held exactly these files (no commit was made)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file"


def _regular(path: Path, real: Path) -> Path:
    """``real`` if it is a regular file; a FIFO, device or socket is refused, never opened."""
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise UnsafeUploadError(path, "is a link to nothing (dangling); refusing to upload it") from None
    if not stat.S_ISREG(mode):
        raise UnsafeUploadError(path, f"is not a regular file ({_kind(mode)}); refusing to upload it")
    return real


def _inside_checkpoint(path: Path, root: Path) -> Path:
    """The real path of a checkpoint file, which must lie in the checkpoint folder ``root`` (real).

    A link inside the folder is part of the checkpoint; one out of it would publish whatever it
    points at (issue 24 #6). The real path is what gets uploaded, so the link is read only here."""
    real = Path(os.path.realpath(path))
    if root not in real.parents:
        raise UnsafeUploadError(
            path, "is a link to a file outside the checkpoint folder; refusing to upload it"
        )
    return _regular(path, real)


def checkpoint_files(ckpt: Checkpoint) -> dict[str, Path]:
    """``{path in the repository: local file}`` for every file of a checkpoint, each a regular file
    whose real path lies in the checkpoint folder."""
    files = {C.BASE_FILENAME: ckpt.path}
    files.update({f: ckpt.root / f for f in ckpt.manifest["files"]})
    files.update(ckpt.carried_files())
    root = Path(os.path.realpath(ckpt.root))
    return {rel: _inside_checkpoint(p, root) for rel, p in files.items()}


def _no_link(path: Path) -> None:
    if path.is_symlink():
        raise UnsafeUploadError(path, "is a symbolic link; push uploads no links from exports")


def _export_tree(top: Path, rel: str = "") -> Iterator[tuple[str, Path]]:
    """``(path under top, file)`` for every regular file below ``top``, hidden entries skipped.

    Nothing is followed: a link anywhere (to a file or a folder) or a FIFO, device or socket refuses
    the whole push, since an export folder is uploaded as a tree and a link in it would publish a file
    from elsewhere, e.g. a private key (issue 24 #7)."""
    with os.scandir(top / rel) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if e.name.startswith("."):
            continue
        path = Path(e.path)
        _no_link(path)
        if e.is_dir(follow_symlinks=False):
            yield from _export_tree(top, f"{rel}{e.name}/")
        else:
            yield f"{rel}{e.name}", _regular(path, path)


def export_files(exports: Iterable[str | os.PathLike]) -> dict[str, Path]:
    """Exports go under ``exports/``: a file by its name, a folder with its tree (hidden files skipped).

    Only regular files are uploaded, and no link is followed, the named export included."""
    out: dict[str, Path] = {}
    for e in exports:
        p = Path(e)
        if not os.path.lexists(p):
            raise MissingFileError(p, "export to include does not exist")
        _no_link(p)
        if p.is_dir():
            items = {f"{p.name}/{rel}": f for rel, f in _export_tree(p)}
        else:
            items = {p.name: _regular(p, p)}
        for rel, f in items.items():
            key = f"{EXPORTS_DIR}/{rel}"
            if key in out:
                raise MissingFileError(p, f"two exports would both be uploaded as {key}")
            out[key] = f
    return out


def push(
    ckpt: str | os.PathLike | Checkpoint,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str | None = None,
    exports: Iterable[str | os.PathLike] = (),
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload ``ckpt`` to ``repo_id`` (created if missing) on branch ``revision`` (default main)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ckpt = ckpt if isinstance(ckpt, Checkpoint) else mf.open(ckpt)
    if ckpt.partial and ckpt.missing_files:
        raise MissingFileError(ckpt.path, "is a partial view; push a complete checkpoint")
    token = token_of(token)
    if not token:
        raise HubAuthError(repo_id, "no Hugging Face token found")
    ckpt.verify()  # never publish a damaged checkpoint
    files = checkpoint_files(ckpt)
    extra = export_files(exports)
    card = render_card(
        ckpt,
        repo_id,
        base_bytes=ckpt.path.stat().st_size,
        exports={k: v.stat().st_size for k, v in extra.items()},
    )
    files.update(extra)
    branch = revision or "main"
    hub = api(endpoint, token)
    with hub_errors(repo_id, upload=True, endpoint=endpoint, revision=branch):
        hub.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            hub.create_branch(repo_id, branch=branch, exist_ok=True)
        head = hub.model_info(repo_id, revision=branch)
        stale = sorted(
            s.rfilename
            for s in head.siblings or []
            if PLANE_FILE_RE.match(s.rfilename) and s.rfilename not in files
        )
        ops: list = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        ops += [CommitOperationDelete(path_in_repo=p) for p in stale]
        n = len(ckpt.quantized_names())
        info = hub.create_commit(
            repo_id,
            ops,
            commit_message=message
            or f"matq push: {n} quantized tensors, c={ckpt.code_bits} ({ckpt.digest[:12]})",
            revision=branch,
            parent_commit=head.sha,
        )
    return PushResult(
        repo_id, branch, info.oid, str(info.commit_url), [*files, "README.md"], stale, info.oid != head.sha
    )
