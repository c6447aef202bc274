"""Converters: importers into a matq checkpoint (``importers``) and exporters out of one, one
package per target (``exporters``), registered by name in ``registry``.

The entry points a script needs are importable from here; each loads its module on first use, so
``import matq_converters`` costs nothing::

    from matq_converters import quantize_hf, import_matgptq, registry
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_matgptq", "quantize_hf", "registry", "roles"]

_LAZY = {
    "quantize_hf": "matq_converters.importers.hf.quantize",
    "import_matgptq": "matq_converters.importers.matgptq",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("registry", "roles"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
