"""Click parameter types shared by the commands."""

from __future__ import annotations

from pathlib import Path

import click

from matq_format.errors import MatqError


class EmptyPathError(MatqError):
    """A path argument given as the empty string (``-o ""``), which ``Path`` would read as ``.``."""


class PathArg(click.Path):
    """``click.Path(path_type=Path)`` that refuses ``""`` in one line (exit 1), instead of taking it
    for the current folder."""

    def __init__(self, **kw):
        super().__init__(path_type=Path, **kw)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value == "":
            if isinstance(param, click.Option):
                what = param.opts[0]
            else:
                what = param.human_readable_name if param is not None else "a path"
            raise EmptyPathError(None, f"{what} is empty; name a file or folder")
        return super().convert(value, param, ctx)
