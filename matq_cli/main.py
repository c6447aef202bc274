"""The ``matq`` command: thin click commands over the library; errors become one line and exit 1.

Set ``MATQ_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

import click

from matq_format.errors import MatqError
from matq_format.publish import OutputExistsError, OutputRaceError


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so every ``with`` block removes its partial output."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


class MatqGroup(click.Group):
    """Turns every expected failure into ``matq: <path>: <what is wrong>`` and exit code 1."""

    def invoke(self, ctx: click.Context):
        from matq_format.progress import listening

        from .progress import listener

        try:
            with listening(listener):  # the library's long steps, as bars or log lines
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # `matq inspect | head`: the reader left; exit as SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except KeyboardInterrupt:
            click.echo("matq: interrupted; no output was written", err=True)
            sys.exit(130)
        except Terminated as exc:
            click.echo(f"matq: terminated by signal {exc.signum}; no output was written", err=True)
            sys.exit(128 + exc.signum)
        except Exception as exc:  # noqa: BLE001 - the central table below decides what is expected
            if os.environ.get("MATQ_DEBUG"):
                raise
            click.echo(f"matq: {describe(exc)}", err=True)
            sys.exit(1)


def describe(exc: BaseException) -> str:
    """One line for any error; MatqError already names its file."""
    if isinstance(exc, OutputExistsError) and not isinstance(exc, OutputRaceError):
        return f"{exc} (use --force to replace it)"
    if isinstance(exc, MatqError):
        return str(exc) + (f" ({exc.hint})" if exc.hint else "")
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file or directory"
    if isinstance(exc, PermissionError):
        return f"{exc.filename}: permission denied"
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith("matq"):
        package = exc.name.partition(".")[0]
        return f"this needs {package}, which is not installed; pip install 'matq[{extra_for(package)}]'"
    return f"internal error: {type(exc).__name__}: {exc} (set MATQ_DEBUG=1 for the traceback)"


def extra_for(module: str) -> str:
    """The first of matq's extras (as the package metadata lists them) that installs ``module``."""
    from importlib import metadata

    want = module.lower().replace("-", "_")
    try:
        requirements = metadata.requires("matq") or []
    except metadata.PackageNotFoundError:
        return "all"
    for req in requirements:
        name, _, marker = req.partition(";")
        dist = re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0].lower().replace("-", "_")
        found = re.search(r"extra\s*==\s*['\"]([\w-]+)['\"]", marker)
        if found and (dist == want or dist == f"{want}_python"):
            return found.group(1)
    return "all"


@click.group(cls=MatqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="matq")
def cli() -> None:
    """matq: Matryoshka-quantized checkpoints, sliced to any width, exported to GGUF, Hugging Face and ONNX.

    Progress goes to stderr: a bar on a terminal, a line per step longer than 5 s otherwise
    (MATQ_PROGRESS=auto|bar|log|off)."""


def _register() -> None:
    from .commands import format as format_cmds

    for cmd in format_cmds.COMMANDS:
        cli.add_command(cmd)
    # Each further command module registers here; a missing optional dependency only hides its commands.
    for modname in ("quantize", "convert", "train", "hub", "eval"):
        try:
            mod = __import__(f"matq_cli.commands.{modname}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("matq_cli.commands"):
                continue
            raise
        for cmd in mod.COMMANDS:
            cli.add_command(cmd)


_register()


def main() -> None:
    handler = logging.StreamHandler()  # the library's notes (stale outputs removed...) as one line each
    handler.setFormatter(logging.Formatter("matq: %(message)s"))
    logging.getLogger("matq").addHandler(handler)
    # Python's default for SIGTERM is to die on the spot, leaving temporary outputs behind.
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _raise_terminated)
    cli(prog_name="matq")
