"""Exporters (``matq convert --to NAME``) and importers (``matq quantize --from NAME``), registered by name.

Two typed registries, ``exporters`` and ``importers``. A converter is a small object with a name and
its settings declared as a dataclass (``Options``; each field made with :func:`option`, which carries
the help text and the allowed values), so the CLI derives its flags from them and a library caller
gets the same checks. An exporter has ``validate`` (everything that can fail, checked before writing)
and ``convert``; an importer has ``run``. Built-in converters are listed by import path with their
``Options`` in a light module of their own and the packages they need; both are loaded on first use,
so ``matq --help`` imports none of gguf, onnx, torch or transformers, and a missing package is named
with the extra that brings it before the converter's module is imported. A converter registered at
run time may list its packages in a ``dependencies`` attribute. A name registered twice is refused; an
unknown name lists the known ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from matq_format.errors import MatqError, RequestError


class UnknownConverterError(RequestError):
    """No converter of that name; the message lists the known ones."""


class DuplicateConverterError(RequestError):
    """A converter name is registered twice; the first one stays."""


class ConvertOptionError(RequestError):
    """An option the converter cannot honour (both or neither of bits and plan, an unknown type)."""


class MissingDependencyError(MatqError):
    """A converter needs a Python package that is not installed."""


class UnsupportedModelError(MatqError):
    """The checkpoint's architecture, config or tensors cannot be expressed in the target format."""


class TokenizerError(MatqError):
    """The tokenizer files are missing, or of a kind the target runtime does not implement."""


# --- declared options ---------------------------------------------------------------------------
def option(default: Any, help: str, *, choices: tuple = (), cli: bool = True) -> Any:  # noqa: A002
    """A declared setting: a dataclass field with its help, allowed values, and whether it is a CLI flag."""
    return field(default=default, metadata={"help": help, "choices": tuple(choices), "cli": cli})


@dataclass(frozen=True)
class NoOptions:
    """A converter without settings of its own."""


@dataclass(frozen=True)
class OptionSpec:
    """One declared setting, as the CLI and :func:`typed_options` read it."""

    name: str
    kinds: tuple[type, ...]
    """The value's types once ``None`` is set aside: bool, int, float, str, tuple (a sequence), Path."""
    default: Any
    help: str
    choices: tuple
    cli: bool

    @property
    def kind(self) -> type:
        return self.kinds[0]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _base_types(annotation: Any) -> tuple[type, ...]:
    """``int | None`` -> (int,); ``tuple[str, ...] | None`` -> (tuple,); ``int | str`` -> (int, str)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        args = [annotation]
    return tuple(typing.get_origin(a) or a for a in args)


def declared(options_type: type) -> list[OptionSpec]:
    """The settings a converter declares, in order."""
    hints = typing.get_type_hints(options_type)
    return [
        OptionSpec(
            f.name,
            _base_types(hints[f.name]),
            f.default,
            f.metadata.get("help", ""),
            f.metadata.get("choices", ()),
            f.metadata.get("cli", True),
        )
        for f in dataclasses.fields(options_type)
    ]


def typed_options(options_type: type, values: Any, target: str) -> Any:
    """``values`` (None, a mapping, or already ``options_type``) as a checked ``options_type``."""
    if isinstance(values, options_type):
        values = dataclasses.asdict(values)
    specs = {s.name: s for s in declared(options_type)}
    unknown = sorted(set(values or {}) - set(specs))
    if unknown:
        known = ", ".join(specs) or "none"
        raise ConvertOptionError(None, f"{target} has no option {unknown[0]!r}; its options: {known}")
    out = {}
    for name, value in (values or {}).items():
        out[name] = _check_value(specs[name], value, target)
    return options_type(**out)


def _check_value(spec: OptionSpec, value: Any, target: str) -> Any:
    """One value against its declared type and choices (a list becomes a tuple)."""
    if value is None:
        return None
    kinds = spec.kinds
    if tuple in kinds and isinstance(value, list):
        value = tuple(value)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if not ok:
        want = " or ".join(k.__name__ for k in kinds)
        raise ConvertOptionError(None, f"{target}: {spec.name} must be {want}, not {type(value).__name__}")
    if spec.choices and value not in spec.choices:
        raise ConvertOptionError(
            None, f"{target}: {spec.name} {value!r} is not one of {', '.join(map(str, spec.choices))}"
        )
    return value


# --- exporters ----------------------------------------------------------------------------------
@dataclass
class ConvertOptions:
    """What to export: one width (``bits``) or a Mix'n'Match ``plan``; ``settings`` are the
    converter's own (its ``Options``, or a mapping checked into one by :meth:`Registry.options`)."""

    bits: int | None = None
    plan: str | dict[str, int] | None = None
    extra_precision: bool = False
    overwrite: bool = False
    settings: Any = None


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
    Options: type

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
        """Write ``out`` atomically (through ``AtomicOutput``); never modifies the checkpoint."""
        ...


class PlannedExporter:
    """A :class:`Converter` made of two functions: ``plan(ckpt, options)`` checks and plans the
    request (raising what is wrong), ``export(ckpt, out, options, progress, planned)`` writes it.

    ``matq convert`` validates, then converts: the plan made by ``validate`` is handed to
    ``export`` for the same checkpoint and options, so it is made once (a ``budget:`` plan
    dequantizes every tensor at every width). A plan is kept after ``plan`` returns: it must hold
    nothing that ``plan`` cleans up (a temporary folder), and ``export`` must not change it."""

    plan: Callable[..., Any]
    export: Callable[..., ConvertResult]

    def _planned(self, ckpt, options: ConvertOptions) -> Any:
        key = (ckpt.digest, repr(options))
        last = getattr(self, "_last_plan", None)
        if last is None or last[0] != key:
            self._last_plan = (key, type(self).plan(ckpt, options))
        return self._last_plan[1]

    def validate(self, ckpt, options: ConvertOptions) -> list[str]:
        self._planned(ckpt, options)
        return []

    def convert(
        self,
        ckpt,
        out: str | os.PathLike,
        options: ConvertOptions,
        progress: Callable[[int], None] | None = None,
    ) -> ConvertResult:
        return type(self).export(ckpt, out, options, progress, self._planned(ckpt, options))


@runtime_checkable
class Importer(Protocol):
    name: str
    description: str
    Options: type

    def run(self, src: str | os.PathLike, out: str | os.PathLike, settings: Any, **kw: Any) -> Path:
        """Write the matq checkpoint of ``src`` at ``out`` atomically; ``kw``: overwrite, progress."""
        ...


T = TypeVar("T")


@dataclass(frozen=True)
class _Entry:
    description: str
    factory: Callable[[], Any] | None = None
    target: str = ""
    """``module:attr`` of the converter's class, imported on first use."""
    options: str = ""
    """``module:attr`` of its ``Options``: a module that imports nothing heavy, so flags cost nothing."""
    dependencies: tuple[str, ...] = ()
    """Top-level packages its module needs, checked before the module is imported."""
    extra: str = ""
    """The pip extra that brings its dependencies."""

    def load(self) -> Any:
        """The converter's class (or factory), importing its module on first use."""
        return self.factory or _attr(self.target)

    def options_type(self) -> type:
        if self.options:
            return _attr(self.options)
        return getattr(self.load(), "Options", NoOptions)


def _attr(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def missing_modules(modules: tuple[str, ...] | list[str]) -> list[str]:
    """Those of ``modules`` (top-level import names) that are not installed."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


class Registry(Generic[T]):
    """Names -> converters of one kind; ``flag`` is how the CLI names the choice (``--to``, ``--from``)."""

    def __init__(self, kind: str, flag: str):
        self.kind, self.flag = kind, flag
        self._entries: dict[str, _Entry] = {}

    def builtin(
        self,
        name: str,
        target: str,
        description: str,
        *,
        options: str = "",
        dependencies: tuple[str, ...] = (),
        extra: str = "",
    ) -> None:
        """A converter shipped with matq (``target`` and ``options`` as ``module:attr``), imported on
        first use, once ``dependencies`` are known to be installed."""
        self._add(name, _Entry(description, None, target, options, tuple(dependencies), extra or name))

    def register(self, name: str, factory: Callable[[], T], description: str = "") -> None:
        """Add a converter (``factory`` builds it on first use); a name already taken is refused."""
        self._add(name, _Entry(description or getattr(factory, "description", ""), factory))

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _add(self, name: str, entry: _Entry) -> None:
        if name in self._entries:
            raise DuplicateConverterError(None, f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def describe(self) -> dict[str, str]:
        """Name -> one-line description, without importing any converter."""
        return {n: self._entries[n].description for n in self.names()}

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise UnknownConverterError(
                None, f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def options_type(self, name: str) -> type:
        """The dataclass of ``name``'s settings (``NoOptions`` if it declares none)."""
        return self._entry(name).options_type()

    def options(self, name: str, values: Any = None) -> Any:
        """``values`` checked into ``name``'s ``Options`` (unknown names and bad values refused)."""
        return typed_options(self.options_type(name), values, f"{self.flag} {name}")

    def get(self, name: str) -> T:
        """The converter registered as ``name``; an unknown name lists the known ones."""
        entry = self._entry(name)
        self._require(name, entry, entry.dependencies)
        conv = entry.load()()
        self._require(name, entry, getattr(conv, "dependencies", ()))
        return conv

    def _require(self, name: str, entry: _Entry, modules) -> None:
        missing = missing_modules(tuple(modules))
        if missing:
            extra = f"; pip install 'matq[{entry.extra}]'" if entry.extra else ""
            raise MissingDependencyError(None, f"{self.flag} {name} needs {', '.join(missing)}{extra}")


_X = "matq_converters.exporters"
_I = "matq_converters.importers"
exporters: Registry[Converter] = Registry("converter", "--to")
exporters.builtin(
    "gguf",
    f"{_X}.gguf.export:GGUFConverter",
    "GGUF for llama.cpp, sliced grids kept exactly",
    options=f"{_X}.gguf.options:GGUFOptions",
    # llama.cpp's converter (converter.py) imports gguf, numpy, torch and transformers; its vocabularies
    # read tokenizers through transformers (fast) or sentencepiece (tokenizer.model)
    dependencies=("gguf", "numpy", "torch", "transformers", "tokenizers", "sentencepiece"),
)
exporters.builtin(
    "hf",
    f"{_X}.hf.export:HFConverter",
    "Hugging Face folder: compressed-tensors, dense or GPTQ",
    options=f"{_X}.hf.options:HFOptions",
)
exporters.builtin(
    "onnx",
    f"{_X}.onnx.export:ONNXConverter",
    "ONNX for onnxruntime and onnxruntime-genai (MatMulNBits or QDQ)",
    options=f"{_X}.onnx.options:ONNXOptions",
    dependencies=("onnx", "onnxruntime", "onnxruntime_genai", "torch", "transformers"),
)

importers: Registry[Importer] = Registry("importer", "--from")
importers.builtin(
    "hf",
    f"{_I}.hf.quantize:HFImporter",
    "a float Hugging Face model (PTQ)",
    options=f"{_I}.hf.options:HFImportOptions",
    extra="hf",
)
importers.builtin(
    "matgptq",
    f"{_I}.matgptq:MatGPTQImporter",
    "a MatGPTQ checkpoint, imported as it is",
)


def register(name: str, factory: Callable[[], Converter], description: str = "") -> None:
    """Add an exporter (``exporters.register``)."""
    exporters.register(name, factory, description)


def names() -> list[str]:
    """Exporter names (``exporters.names``), kept for callers of the one-registry API."""
    return exporters.names()


def describe() -> dict[str, str]:
    """Exporter descriptions (``exporters.describe``)."""
    return exporters.describe()


def get(name: str) -> Converter:
    """An exporter (``exporters.get``)."""
    return exporters.get(name)
