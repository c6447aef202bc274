"""matq_train: the reference MatQuant QAT trainer, with a PyTorch and a JAX backend.

The framework-neutral core: :mod:`.spec` (what is quantized, checked by ``matq quantize``'s
QuantizeSpec), :mod:`.objective` (Eq. 7: widths, lambdas, co-distillation, extra precision,
baseline), :mod:`.config` (settings, schedule, resume rule), :mod:`.data` (token blocks, the same
batches on any world size) and :mod:`.export` (a matq checkpoint from (name, codes, scale, zero)
records). None of them imports torch or jax. The backends live in :mod:`.torch` and :mod:`.jax`;
:func:`train` runs the one ``TrainConfig.backend`` names. Importing the package is cheap.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "export_matq", "export_records", "train"]


def __getattr__(name: str):
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "train":
        from .run import train

        return train
    if name == "export_records":
        from .export import export_records

        return export_records
    if name == "export_matq":
        from .torch.export import export_matq

        return export_matq
    raise AttributeError(name)
