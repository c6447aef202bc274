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
"""

from __future__ import annotations

import os
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
from .errors import DownloadChecksumError, NotAMatqRepoError
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


def _purge(path: Path) -> None:
    """Remove a cached file (the snapshot link and the blob it points to) so the next pull fetches it again."""
    blob = path.resolve()
    for p in (path, blob):
        try:
            p.unlink()
        except OSError:
            pass


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
    from huggingface_hub import hf_hub_download

    out = Path(out)
    if bits is not None and plan is not None:
        raise PlanError(repo_id, "give at most one of bits or plan")
    if os.path.lexists(out) and not overwrite:  # before any download; the writer checks again
        raise OutputExistsError(out, "already exists")
    hub = api(endpoint, token)
    ep = endpoint_of(endpoint)

    def fetch(filename: str, commit: str) -> Path:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=commit,
                cache_dir=cache_dir,
                endpoint=ep,
                token=token,
                library_name="matq",
            )
        )

    with hub_errors(repo_id, upload=False, endpoint=endpoint, revision=revision):
        info = hub.model_info(repo_id, revision=revision)
        commit = info.sha
        listed = {s.rfilename for s in info.siblings or []}
        if C.BASE_FILENAME not in listed:
            raise NotAMatqRepoError(repo_id, f"has no {C.BASE_FILENAME} at revision {revision or 'main'!r}")
        base = fetch(C.BASE_FILENAME, commit)
    snapshot = base.parent
    with _integrity(repo_id, commit, snapshot):
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
    with hub_errors(repo_id, upload=False, endpoint=endpoint, revision=revision):
        with ThreadPoolExecutor(max(1, min(DOWNLOAD_THREADS, len(files) - 1))) as pool:
            for done in [pool.submit(fetch, f, commit) for f in files[1:]]:
                done.result()

    with _integrity(repo_id, commit, snapshot):
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


@contextmanager
def _integrity(repo_id: str, commit: str, snapshot: Path):
    """A downloaded file that fails its checks is removed from the cache and reported as one line."""
    try:
        yield
    except FormatError as exc:
        p = Path(exc.path) if exc.path else None
        if p is None or snapshot not in p.parents:
            raise
        _purge(p)
        rel = p.relative_to(snapshot).as_posix()
        raise DownloadChecksumError(repo_id, f"{rel} (revision {commit[:12]}): {exc.message}") from exc
