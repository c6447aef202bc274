"""``matq pull``: download only the files a width (or Mix'n'Match plan) needs, then write a checkpoint.

1. Resolve the revision to one commit, so every file comes from the same revision.
2. Download ``matq.safetensors`` (manifest, scales, zero points, unquantized tensors) into the
   Hugging Face cache and resolve the width or plan against the manifest.
3. Download the plane files holding the planes those widths read, and the carried files: a width-r
   slice reads the top r planes plus the rounding plane (``numerics.planes_needed``). A plan that
   needs the weights themselves (``budget:``) downloads every plane.
4. Open the cached snapshot as a partial view, check the carried files' sha256, and write ``out``
   with ``matq_format.slice_checkpoint``, which checks the CRC-32 of every entry it copies.

Files come through ``hf_hub_download`` and its cache (a second pull of a width already fetched
transfers nothing). ``out`` appears only when complete; a failure leaves no partial folder.

The Hub is not trusted with the local disk (issue 24): the client names a cached file after the
ETag the Hub answers, so an ETag that is a path (``../../victim``) would put the file, or a link to
an existing one, outside the cache. Before a file is fetched, its ETag must be a plain name and the
size the Hub announces must be the one the manifest (for the base file, the Hub's listing) records;
while it downloads, the client's progress hook stops it at the first chunk past that size; after,
the snapshot entry must be a regular file whose real path lies in the repository's cache folder.
Only files there are ever deleted: an entry that resolves elsewhere is refused and left alone.
"""

from __future__ import annotations

import functools
import inspect
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matq_format as mf
from matq_format import constants as C
from matq_format.errors import FormatError, PlanError, RequestError
from matq_format.publish import OutputExistsError

from .client import api, endpoint_of, hub_errors
from .errors import (
    CacheEscapeError,
    DownloadChecksumError,
    DownloadSizeError,
    HubResponseError,
    NotAMatqRepoError,
)
from .layout import DeclaredView, _NeedsWeights, file_bytes, needed_files

DOWNLOAD_THREADS = 8
"""Files fetched at once, as ``snapshot_download`` does."""


@dataclass(frozen=True)
class PullResult:
    path: Path
    repo_id: str
    commit: str
    widths: dict[str, int]
    files: list[str]
    """Repository files this pull needed (fetched, or found in the cache)."""
    needed_bytes: int
    """Their total size."""


def _inside(path: Path, folder: Path) -> bool:
    return folder in path.parents


class _RepoCache:
    """The client's cache folder of one repository (``models--owner--name``) and one commit's snapshot.

    Its own files are what matq may read as downloads and delete as bad copies; nothing else."""

    def __init__(self, cache_dir: str | os.PathLike | None, repo_id: str, commit: str):
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        self.repo_id, self.commit = repo_id, commit
        folder = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(
            repo_id=repo_id, repo_type="model"
        )
        self.folder = Path(os.path.abspath(folder))
        self.snapshot = self.folder / "snapshots" / commit

    def where(self, filename: str) -> str:
        return f"{filename} (revision {self.commit[:12]})"

    def real_folder(self) -> Path:
        return Path(os.path.realpath(self.folder))

    def check(self, filename: str, entry: Path) -> Path:
        """``entry`` (the snapshot entry the client returned for ``filename``) if it is a regular file
        whose real path lies in this repository's cache folder; else CacheEscapeError, deleting nothing."""
        where, real = self.where(filename), Path(os.path.realpath(entry))
        if Path(os.path.abspath(entry)) != self.snapshot / filename:
            raise CacheEscapeError(
                self.repo_id, f"{where}: the client put it at {entry}, not in the snapshot"
            )
        if not _inside(real, self.real_folder()):
            raise CacheEscapeError(
                self.repo_id,
                f"{where}: the cache entry links to {real}, outside the cache; refused "
                f"(delete the link {entry}, not its target)",
            )
        try:
            regular = stat.S_ISREG(os.stat(real).st_mode)
        except FileNotFoundError:
            regular = False
        if not regular:
            raise CacheEscapeError(
                self.repo_id, f"{where}: the cache entry {entry} is not a regular file (or dangling); refused"
            )
        return entry

    def check_snapshot(self) -> None:
        """Every entry of the snapshot (files earlier pulls left there included) stays in the cache."""
        for entry in sorted(self.snapshot.rglob("*")):
            if entry.is_symlink() or not entry.is_dir():
                self.check(entry.relative_to(self.snapshot).as_posix(), entry)

    def purge(self, entry: Path) -> bool:
        """Remove a bad cached copy (the snapshot entry and the blob it points to) so the next pull
        fetches it again; only files whose real path lies in the cache folder. True if removed."""
        folder = self.real_folder()
        blob = Path(os.path.realpath(entry))
        if not _inside(Path(os.path.realpath(entry.parent)), folder) or not _inside(blob, folder):
            return False
        for p in (entry, blob):
            try:
                p.unlink()
            except OSError:
                pass
        return True


class _SizeCap:
    """Stands in for the client's progress bar, which sees every chunk before it is written: stops
    the download once more bytes arrive than the file should have (a Hub cannot fill the disk)."""

    def __init__(self, repo_id: str, where: str, limit: int, *, initial: int = 0, **_):
        self.repo_id, self.where, self.limit, self.n = repo_id, where, limit, initial

    def __enter__(self) -> _SizeCap:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        self.n += n
        if self.n > self.limit:
            raise DownloadSizeError(
                self.repo_id,
                f"{self.where}: the Hub sends more than the {self.limit} bytes expected; stopped",
            )

    def close(self) -> None:
        pass


def _recorded(filename: str) -> str:
    """Who set the size a file must have: its manifest, or for the base file the Hub's listing."""
    return "the Hub lists" if filename == C.BASE_FILENAME else "the manifest records"


def _plain_name(etag: str | None) -> bool:
    """True if ``etag`` can name a file in the cache's ``blobs`` folder without leaving it."""
    return bool(etag) and etag not in (".", "..") and not any(c in etag for c in "/\\\0")


def _fetcher(
    repo_id: str, cache: _RepoCache, *, token, cache_dir, endpoint
) -> Callable[[str, int | None], Path]:
    """``fetch(filename, size)``: the checked snapshot entry of one file, downloaded if not cached.

    ``size`` is what the manifest records (None for the base file until the Hub announces it)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    capped = "tqdm_class" in inspect.signature(hf_hub_download).parameters

    def announced(filename: str, size: int | None) -> int:
        url = hf_hub_url(repo_id, filename, revision=cache.commit, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=token, library_name="matq", endpoint=endpoint)
        where = cache.where(filename)
        if meta.commit_hash and meta.commit_hash != cache.commit:
            raise HubResponseError(
                repo_id, f"{where}: the Hub answers commit {meta.commit_hash[:40]!r}, not the one listed"
            )
        if not _plain_name(meta.etag):
            raise CacheEscapeError(
                repo_id,
                f"{where}: the Hub's ETag {meta.etag!r} is a path, which would put it outside the cache; refused before download",
            )
        if meta.size is None or (size is not None and meta.size != size):
            raise DownloadSizeError(
                repo_id,
                f"{where}: the Hub announces {meta.size if meta.size is not None else 'no'} bytes, "
                f"{_recorded(filename)} {size}; refused before download",
            )
        return meta.size

    def fetch(filename: str, size: int | None) -> Path:
        if not os.path.lexists(cache.snapshot / filename):  # a cached entry is checked below, not asked again
            size = announced(filename, size)
        extra = (
            {"tqdm_class": functools.partial(_SizeCap, repo_id, cache.where(filename), size)}
            if capped and size is not None
            else {}
        )
        entry = Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=cache.commit,
                cache_dir=cache_dir,
                endpoint=endpoint,
                token=token,
                library_name="matq",
                **extra,
            )
        )
        cache.check(filename, entry)
        got = entry.stat().st_size
        if size is not None and got != size:
            cache.purge(entry)  # checked above: a file of the cache's own
            raise DownloadSizeError(
                repo_id,
                f"{cache.where(filename)}: {got} bytes arrived, {_recorded(filename)} {size}; removed from the cache",
            )
        return entry

    return fetch


def pull(
    repo_id: str,
    out: str | os.PathLike,
    *,
    bits: int | None = None,
    plan: str | dict | None = None,
    extra_precision: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> PullResult:
    """Write the checkpoint ``repo_id`` serves at ``bits`` (all planes if None) or ``plan`` to ``out``."""
    out = Path(out)
    if bits is not None and plan is not None:
        raise PlanError(repo_id, "give at most one of bits or plan")
    if os.path.lexists(out) and not overwrite:  # before any download; the writer checks again
        raise OutputExistsError(out, "already exists")
    hub = api(endpoint, token)
    with hub_errors(repo_id, upload=False, endpoint=endpoint, revision=revision):
        info = hub.model_info(repo_id, revision=revision, files_metadata=True)
        commit = info.sha
        listed = {s.rfilename: s.size for s in info.siblings or []}
        if C.BASE_FILENAME not in listed:
            raise NotAMatqRepoError(repo_id, f"has no {C.BASE_FILENAME} at revision {revision or 'main'!r}")
        cache = _RepoCache(cache_dir, repo_id, commit)
        fetch = _fetcher(repo_id, cache, token=token, cache_dir=cache_dir, endpoint=endpoint_of(endpoint))
        base = fetch(C.BASE_FILENAME, listed[C.BASE_FILENAME])
    snapshot = cache.snapshot
    cache.check_snapshot()
    with _integrity(cache):
        head = mf.open(snapshot, partial=True)
    declared = DeclaredView(head)
    if plan is not None or bits is not None:
        spec: str | int | dict = plan if plan is not None else bits
    else:  # everything the repository holds: all planes, or each tensor's widest width if it was sliced
        full = declared.max_widths()
        spec = head.code_bits if all(r == head.code_bits for r in full.values()) else full
    try:
        widths: dict[str, int] | None = mf.resolve_plan(spec, declared, extra_precision=extra_precision)
    except _NeedsWeights:
        widths = None  # the plan reads the weights (budget:): fetch every plane, let the slicer resolve it
    except RequestError as exc:  # a width or plan this repository cannot serve: name the repository
        raise type(exc)(repo_id, exc.message) from None
    files = needed_files(head, widths or declared.max_widths())
    sizes = file_bytes(head, base.stat().st_size)
    head.close()
    _check_listing(cache, files, sizes, listed)
    with hub_errors(repo_id, upload=False, endpoint=endpoint, revision=revision):
        with ThreadPoolExecutor(max(1, min(DOWNLOAD_THREADS, len(files) - 1))) as pool:
            for done in [pool.submit(fetch, f, sizes[f]) for f in files[1:]]:
                done.result()

    cache.check_snapshot()
    with _integrity(cache):
        ckpt = mf.open(snapshot, partial=True)
        ckpt.carried_bytes()  # checked here so that a bad download is purged from the cache
        mf.slice_checkpoint(
            ckpt,
            out,
            bits=spec if isinstance(spec, int) else None,
            plan=None if isinstance(spec, int) else spec,
            extra_precision=extra_precision,
            overwrite=overwrite,
            progress=progress,
        )
        ckpt.close()
    if widths is None:
        with mf.open(out) as done:
            widths = {n: done.info(n).max_width(done.code_bits) for n in done.quantized_names()}
    return PullResult(out, repo_id, commit, widths, files, sum(sizes[f] for f in files))


def _check_listing(
    cache: _RepoCache, files: list[str], sizes: dict[str, int], listed: dict[str, int | None]
) -> None:
    """Before any download: each file the Hub lists has the size the manifest records (a file the
    Hub does not list is left to the download to report)."""
    for f in files:
        if listed.get(f) is not None and listed[f] != sizes[f]:
            raise DownloadSizeError(
                cache.repo_id,
                f"{cache.where(f)}: the Hub lists {listed[f]} bytes, the manifest records {sizes[f]}; refused before download",
            )


@contextmanager
def _integrity(cache: _RepoCache):
    """A downloaded file that fails its checks is removed from the cache and reported as one line.

    Only a copy inside the repository's cache folder is removed; anything else is refused as is."""
    try:
        yield
    except FormatError as exc:
        p = Path(os.path.abspath(exc.path)) if exc.path else None
        if p is None or cache.snapshot not in p.parents:
            raise
        rel = p.relative_to(cache.snapshot).as_posix()
        cache.check(rel, p)  # raises, deleting nothing, for an entry that resolves elsewhere
        if not cache.purge(p):
            raise
        raise DownloadChecksumError(cache.repo_id, f"{cache.where(rel)}: {exc.message}") from exc
