"""What push and pull share: the Hub client, the token, and turning client exceptions into one line.

``huggingface_hub`` is imported inside functions so that ``matq --help`` works without it.
Settings are read when a command runs, not when the client was imported: ``HF_ENDPOINT`` (or the
``endpoint`` argument) picks the Hub, the token comes from the argument, ``HF_TOKEN`` or the login
file, in that order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from matq_format import __version__
from matq_format.errors import MatqError

from .errors import (
    BadRepoIdError,
    DownloadInterruptedError,
    HubAuthError,
    HubConnectionError,
    HubResponseError,
    PushConflictError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UploadError,
)

# Exception class names that mean "could not connect" / "the transfer broke off", across the HTTP
# stacks huggingface_hub has used (httpx2, httpx, requests): matched by name so no stack is imported.
_CONNECT = {"ConnectError", "ConnectTimeout", "ConnectionError", "ConnectionRefusedError", "ProxyError"}
_BROKEN = {
    "RemoteProtocolError",
    "ReadError",
    "ReadTimeout",
    "WriteError",
    "ChunkedEncodingError",
    "IncompleteRead",
}


def endpoint_of(endpoint: str | None) -> str | None:
    """The Hub to talk to: the argument, else ``HF_ENDPOINT`` as set now, else the client's default."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or "").rstrip("/") or None


def token_of(token: str | None) -> str | None:
    """The token to use: the argument, else the client's usual places (``HF_TOKEN``, the login file)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def api(endpoint: str | None, token: str | None):
    from huggingface_hub import HfApi

    return HfApi(
        endpoint=endpoint_of(endpoint), token=token, library_name="matq", library_version=__version__
    )


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for e in _chain(exc) for cls in type(e).__mro__}


def _first_line(text: str | None) -> str:
    return next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")


def translate(
    exc: BaseException, repo_id: str, *, upload: bool, endpoint: str | None, revision: str | None
) -> MatqError | None:
    """The one-line matq error for a client exception, or None if it is not one we expect."""
    from huggingface_hub import errors as hf

    where = endpoint_of(endpoint) or "the Hub"
    for e in _chain(exc):
        if isinstance(e, hf.OfflineModeIsEnabled):
            return HubConnectionError(repo_id, "HF_HUB_OFFLINE is set; unset it to reach the Hub")
        if isinstance(e, hf.HFValidationError):
            return BadRepoIdError(repo_id, _first_line(str(e)))
        if isinstance(e, hf.FileMetadataError):
            return HubResponseError(
                repo_id, f"{where} does not answer like a Hub ({_first_line(str(e))[:120]})"
            )
        if isinstance(e, hf.GatedRepoError):
            return HubAuthError(repo_id, "the repository is gated and this token has no access")
        if isinstance(e, hf.RepositoryNotFoundError):
            return RepoNotFoundError(repo_id, f"no such repository on {where} (or it is private)")
        if isinstance(e, hf.RevisionNotFoundError):
            return RevisionNotFoundError(repo_id, f"revision {revision or 'main'!r} not found")
        if isinstance(e, hf.HfHubHTTPError):
            status = e.response.status_code if e.response is not None else 0
            detail = _first_line(e.server_message) or _first_line(str(e))
            if status in (401, 403):
                return HubAuthError(repo_id, f"{where} refused the token (HTTP {status}: {detail})")
            if status in (409, 412) and upload:
                return PushConflictError(
                    repo_id, f"the branch moved during the push (HTTP {status}: {detail})"
                )
            cls = UploadError if upload else HubResponseError
            return cls(repo_id, f"{where} answered HTTP {status}: {detail}")
    names = _names(exc)
    if names & _CONNECT:
        return HubConnectionError(repo_id, f"cannot reach {where}")
    if names & _BROKEN or "Consistency check failed" in " ".join(str(e) for e in _chain(exc)):
        if upload:
            return UploadError(repo_id, "the connection broke off during the upload")
        return DownloadInterruptedError(repo_id, "the download broke off and could not be resumed")
    if upload and isinstance(exc, (RuntimeError, ValueError)):
        cause = exc.__cause__ or exc
        return UploadError(
            repo_id, _first_line(f"{exc} {_first_line(str(cause)) if cause is not exc else ''}")
        )
    return None


@contextmanager
def hub_errors(repo_id: str, *, upload: bool, endpoint: str | None = None, revision: str | None = None):
    """Re-raise client exceptions as typed one-line matq errors; matq's own errors pass through."""
    try:
        yield
    except MatqError:
        raise
    except Exception as exc:  # noqa: BLE001 - translate() decides which are expected
        err = translate(exc, repo_id, upload=upload, endpoint=endpoint, revision=revision)
        if err is None:
            raise
        raise err from exc
