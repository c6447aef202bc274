"""matq_hub: push Matryoshka checkpoints to the Hugging Face Hub and pull one width at a time.

``huggingface_hub`` is imported only when a transfer runs.
"""

from .errors import (
    BadRepoIdError,
    CacheEscapeError,
    DownloadChecksumError,
    DownloadInterruptedError,
    DownloadSizeError,
    HubAuthError,
    HubConnectionError,
    HubError,
    HubResponseError,
    NotAMatqRepoError,
    PushConflictError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsafeUploadError,
    UploadError,
)
from .pull import PullResult, pull
from .push import PushResult, push

__all__ = [
    "BadRepoIdError",
    "CacheEscapeError",
    "DownloadChecksumError",
    "DownloadInterruptedError",
    "DownloadSizeError",
    "HubAuthError",
    "HubConnectionError",
    "HubError",
    "HubResponseError",
    "NotAMatqRepoError",
    "PullResult",
    "PushConflictError",
    "PushResult",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "UnsafeUploadError",
    "UploadError",
    "pull",
    "push",
]
