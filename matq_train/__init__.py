"""matq_train: the reference MatQuant QAT trainer (PyTorch).

Fake-quantized linear layers with a straight-through estimator (:mod:`.fakequant`), the MatQuant
loss (:mod:`.loss`), data (:mod:`.data`), the training loop with DDP/FSDP and resumable
checkpoints (:mod:`.trainer`) and the exact export to a matq checkpoint (:mod:`.export`).
Importing the package is cheap; torch is imported by the submodules.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "export_matq", "train"]


def __getattr__(name: str):
    if name in ("TrainConfig", "train"):
        from . import trainer

        return getattr(trainer, name)
    if name == "export_matq":
        from .export import export_matq

        return export_matq
    raise AttributeError(name)
