"""Run a :class:`~matq_train.config.TrainConfig` on the backend it names, importing only that framework."""

from __future__ import annotations

from .config import TrainConfig, TrainConfigError

__all__ = ["BackendMissingError", "train"]


class BackendMissingError(TrainConfigError):
    """The backend's framework is not installed."""

    hint = "pip install 'matq[train]' for torch, 'matq[jax]' for jax"


def train(cfg: TrainConfig, **kw):
    """``matq_train.torch.trainer.train`` or ``matq_train.jax.trainer.train``; keywords pass through."""
    cfg.check()
    try:
        if cfg.backend == "jax":
            from .jax.trainer import train as backend_train
        else:
            from .torch.trainer import train as backend_train
    except ImportError as exc:
        raise BackendMissingError(
            None, f"backend {cfg.backend}: {exc.name or exc} is not installed"
        ) from None
    return backend_train(cfg, **kw)
