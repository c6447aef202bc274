"""Converters from a matq checkpoint to other formats, registered by name (``matq convert --to NAME``).

A converter is a small object with a name, the Python modules it needs, a ``validate`` step that
checks everything it can before writing (so a bad request fails fast and leaves nothing behind),
and ``convert``. Built-in converters are listed here by import path and loaded on first use, so
``matq --help`` never imports gguf, onnx or transformers. Others can ``register`` their own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from matq_format.errors import MatqError, RequestError


class UnknownConverterError(RequestError):
    """No converter of that name; the message lists the known ones."""


class ConvertOptionError(RequestError):
    """An option the converter cannot honour (both or neither of bits and plan, an unknown type)."""


class MissingDependencyError(MatqError):
    """A converter needs a Python package that is not installed."""


class UnsupportedModelError(MatqError):
    """The checkpoint's architecture, config or tensors cannot be expressed in the target format."""


class TokenizerError(MatqError):
    """The tokenizer files are missing, or of a kind the target runtime does not implement."""


@dataclass
class ConvertOptions:
    """What to export: one width (``bits``) or a Mix'n'Match ``plan``, and how to store the rest."""

    bits: int | None = None
    plan: str | dict[str, int] | None = None
    extra_precision: bool = False
    outtype: str = "auto"
    """Float type of unquantized 2-D tensors: auto (as stored), f32, f16 or bf16."""
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """Converter-specific settings (e.g. ``tokenizer_pre`` for GGUF)."""


@dataclass
class ConvertResult:
    path: Path
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@runtime_checkable
class Converter(Protocol):
    name: str
    description: str
    suffix: str
    dependencies: tuple[str, ...]

    def validate(self, ckpt, options: ConvertOptions) -> list[str]:
        """Check the request against the checkpoint without writing; returns warnings, raises MatqError."""
        ...

    def convert(
        self,
        ckpt,
        out: str | os.PathLike,
        options: ConvertOptions,
        progress: Callable[[int], None] | None = None,
    ) -> ConvertResult:
        """Write ``out`` atomically (temp file, then rename); never modifies the checkpoint."""
        ...


_BUILTIN: dict[str, tuple[str, str, str]] = {
    "gguf": ("matq_converters.gguf_export", "GGUFConverter", "GGUF for llama.cpp, sliced grids kept exactly"),
}
_REGISTERED: dict[str, Callable[[], Converter]] = {}


def register(name: str, factory: Callable[[], Converter]) -> None:
    """Add a converter (``factory`` builds it on first use)."""
    _REGISTERED[name] = factory


def names() -> list[str]:
    return sorted({*_BUILTIN, *_REGISTERED})


def describe() -> dict[str, str]:
    """Name -> one-line description, without importing any converter."""
    out = {n: d for n, (_, _, d) in _BUILTIN.items()}
    out.update({n: "" for n in _REGISTERED if n not in out})
    return dict(sorted(out.items()))


def get(name: str) -> Converter:
    """The converter registered as ``name``; an unknown name lists the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]()
    if name not in _BUILTIN:
        raise UnknownConverterError(None, f"unknown converter {name!r}; known: {', '.join(names())}")
    module, attr, _ = _BUILTIN[name]
    conv = getattr(importlib.import_module(module), attr)()
    missing = [m for m in conv.dependencies if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            None, f"--to {name} needs {', '.join(missing)} (pip install 'matq[{name}]')"
        )
    return conv
