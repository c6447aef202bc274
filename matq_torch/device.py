"""Which torch device a command runs on: one rule for ``matq quantize --calib`` and ``matq train``.

Here, on the torch floor, so that the calibration importer and the trainer share it without one
importing the other (and without torch in :mod:`matq_format`); torch is imported when it is called.
"""

from __future__ import annotations

import os

from matq_format.errors import MatqError

__all__ = ["resolve_device"]


def resolve_device(device: str | None, error: type[MatqError] | None = None, *, auto: bool = False):
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device; a CUDA device that is not there is an
    ``error`` (default :class:`~matq_format.quantspec.OptionError`). Bare ``cuda`` is this rank's GPU
    (``LOCAL_RANK``, 0 outside a distributed run); no device is the CPU, or with ``auto`` this rank's
    GPU when CUDA is present (as the trainer wants)."""
    import torch

    from matq_format.quantspec import OptionError

    error = error or OptionError
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if auto and torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device.strip().lower())
    except (RuntimeError, ValueError):
        raise error(None, f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise error(None, f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise error(None, f"device {device!r}: this torch build sees no CUDA device")
    index = local if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise error(None, f"device {device!r}: only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)
