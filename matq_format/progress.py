"""Progress of long steps, told to whoever listens; silent when nobody does.

A library step that may take more than a few seconds wraps itself in :func:`stage`::

    with progress.stage("plan budget:3.5", total=len(names), unit="tensor") as advance:
        for name in names:
            ...
            advance(1)

``total`` may be ``None`` (a step that cannot count its work: a graph export). The ``matq`` command
listens (:func:`listening`) and draws a bar on a terminal or writes a line per long step to a log;
a library caller may listen with its own callable, or not at all. Nothing here prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

Advance = Callable[[int], Any]
Listener = Callable[[str, "int | None", str], contextlib.AbstractContextManager]
"""``listener(desc, total, unit)``: a context manager that yields the step's ``advance(n)``."""

_listener: ContextVar[Listener | None] = ContextVar("matq_progress_listener", default=None)


def _ignore(n: int = 1) -> None:
    return None


@contextlib.contextmanager
def stage(desc: str, total: int | None = None, unit: str = "it") -> Iterator[Advance]:
    """One step of ``total`` units (``None``: unknown); yields ``advance(n)``, to call as units finish."""
    listener = _listener.get()
    if listener is None:
        yield _ignore
        return
    with listener(desc, total, unit) as advance:
        yield advance


@contextlib.contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Within the block (this thread or task), steps are told to ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)
