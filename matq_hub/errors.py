"""One error class per way a Hub transfer goes wrong, each a one-line MatqError with the next step.

The ``path`` of every error is the repository id (or the local file involved), so the CLI prints
``matq: user/model: <what went wrong> (<what to do>)``.
"""

from __future__ import annotations

from matq_format.errors import MatqError


class HubError(MatqError):
    """Base of the Hub errors."""


class HubAuthError(HubError):
    """No token, or the Hub refused the one given."""

    hint = "set HF_TOKEN or run `hf auth login` with a token that has write access"


class BadRepoIdError(HubError):
    """The repository id is not of the form the Hub accepts."""

    hint = "use owner/name, e.g. me/model-matq"


class RepoNotFoundError(HubError):
    """The repository does not exist, or is private and the token cannot see it."""

    hint = "check the repository id, and log in if it is private"


class RevisionNotFoundError(HubError):
    """The branch, tag or commit is not in the repository."""

    hint = "check --revision"


class NotAMatqRepoError(HubError):
    """The repository has no matq checkpoint at its root."""

    hint = "push one with `matq push CKPT REPO_ID`"


class HubResponseError(HubError):
    """The Hub answered a request with an error this command does not expect."""

    hint = "try again later; MATQ_DEBUG=1 shows the client's full error"


class HubConnectionError(HubError):
    """The Hub cannot be reached (network down, wrong HF_ENDPOINT)."""

    hint = "check the network and HF_ENDPOINT, then run the command again"


class DownloadInterruptedError(HubError):
    """A download stopped part-way and could not be resumed."""

    hint = "run the command again; finished files are kept in the Hugging Face cache"


class DownloadChecksumError(HubError):
    """A downloaded file does not match the checksum its manifest records.

    Raised only after the bad copy, a file inside the repository's cache folder, was removed."""

    hint = "the bad copy was removed from the cache; run the command again"


class DownloadSizeError(HubError):
    """The Hub announces or sends a file of another size than the manifest (or its listing) records.

    Checked before a download starts and while it runs, so a hostile Hub cannot fill the disk."""

    hint = (
        "nothing of it was kept; the repository or the Hub serving it is inconsistent, report it to its owner"
    )


class CacheEscapeError(HubError):
    """The Hub's answer would put a file outside the repository's cache folder (an ETag that is a
    path), or the cache holds a snapshot entry that resolves there. Nothing is read or deleted."""

    hint = "nothing was deleted; do not pull from this Hub"


class UnsafeUploadError(HubError):
    """A file push would upload is a link (out of the checkpoint folder, or in an export folder) or
    not a regular file: following it could publish a file its owner never meant to share."""

    hint = "push uploads regular files only: copy the file itself into the folder"


class UploadError(HubError):
    """The Hub refused or dropped an upload or the commit; the branch is unchanged."""

    hint = "run the command again; files already uploaded are not sent twice"


class PushConflictError(HubError):
    """The branch moved while the push was under way."""

    hint = "run the command again to commit on top of the new head"
