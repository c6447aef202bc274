"""llama.cpp's own Hugging Face converter: the one source of GGUF architecture knowledge.

It comes from the sdist of the installed llama-cpp-python (its ``vendor/llama.cpp``; :data:`PINNED`
where none is installed), so it matches the llama.cpp that runs the files. ``python -m
matq_converters.exporters.gguf.converter install`` (what ``.ci/run`` runs too) downloads that sdist
with pip, extracts ``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/`` and ``LICENSE`` into
``~/.cache/matq/llama.cpp/VERSION`` and installs that ``gguf-py`` as the ``gguf`` package, which the
converter and matq then share (``docs/export-gguf.md``). PyPI's ``convert-hf-to-gguf`` is not used:
it is an older snapshot, and its wheel carries a ``gguf`` package of its own that would shadow the
installed one.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

from matq_converters.registry import MissingDependencyError

ENV = "MATQ_LLAMA_CPP_CONVERTER"
"""A folder holding ``conversion/`` and ``gguf-py/``, instead of the cached one."""
PACKAGE = "llama-cpp-python"
PINNED = "0.3.36"
"""The llama-cpp-python whose converter is used where none is installed; ``.ci/run`` builds this one."""
INSTALL = "python -m matq_converters.exporters.gguf.converter install"
"""The command that fetches the converter (named in every refusal about it)."""
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
"""What is taken from the sdist's ``vendor/llama.cpp``."""


def wanted_version() -> str:
    """The installed llama-cpp-python's version, else :data:`PINNED`."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return PINNED


def cache_folder(version: str) -> Path:
    """``~/.cache/matq/llama.cpp/VERSION`` (``$XDG_CACHE_HOME`` honoured)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "matq" / "llama.cpp" / version


def folder() -> Path:
    """Where the converter lies: ``$MATQ_LLAMA_CPP_CONVERTER``, else the cached one of
    :func:`wanted_version`."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return cache_folder(wanted_version())


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
            f"llama.cpp's converter is not in {root}; fetch it: {INSTALL}",
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
            f"the installed gguf ({mine.parent}) is not llama.cpp's gguf-py from {root}; run: {INSTALL}",
        )


# --- install ------------------------------------------------------------------------------------
def extract(sdist: Path, dest: Path) -> Path:
    """``PARTS`` of ``sdist``'s ``vendor/llama.cpp`` into ``dest``, which appears whole or not at all
    (an existing ``dest`` is replaced). Only regular files and folders are taken, none outside."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                parts = Path(m.name).parts
                if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or parts[3] not in PARTS:
                    continue
                if not (m.isfile() or m.isdir()) or ".." in parts:
                    continue
                m.name = str(Path(*parts[3:]))
                members.append(m)
            missing = [p for p in PARTS if not any(Path(m.name).parts[0] == p for m in members)]
            if missing:
                raise MissingDependencyError(sdist, f"no vendor/llama.cpp/{missing[0]} in this sdist")
            # members are already checked; the "data" filter where this Python has it (3.10.12+)
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **kw)
        if not (tmp / "conversion" / "__init__.py").is_file():
            raise MissingDependencyError(sdist, "no vendor/llama.cpp/conversion/__init__.py in this sdist")
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def download(version: str, into: Path) -> Path:
    """llama-cpp-python ``version``'s sdist, downloaded by pip into ``into``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--no-binary",
        ":all:",
        "-d",
        str(into),
        f"{PACKAGE}=={version}",
    ]
    subprocess.run(cmd, check=True)
    found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise MissingDependencyError(into, f"pip downloaded no llama_cpp_python-{version}.tar.gz")
    return found[0]


def install(version: str | None = None, sdist: Path | None = None, gguf: bool = True) -> Path:
    """Fetch the converter of llama-cpp-python ``version`` (:func:`wanted_version`) into
    :func:`cache_folder`, from ``sdist`` or downloaded by pip, and (``gguf``) install its ``gguf-py``
    as the ``gguf`` package. Returns the folder."""
    version = version or wanted_version()
    dest = cache_folder(version)
    if not (dest / "conversion" / "__init__.py").is_file():
        if sdist is None:
            with tempfile.TemporaryDirectory() as tmp:
                extract(download(version, Path(tmp)), dest)
        else:
            extract(Path(sdist), dest)
    if gguf:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--force-reinstall",
            str(dest / "gguf-py"),
        ]
        subprocess.run(cmd, check=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matq_converters.exporters.gguf.converter",
        description="Fetch llama.cpp's converter for `matq convert --to gguf`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "install", help="download the llama-cpp-python sdist, extract its converter, install its gguf-py"
    )
    p.add_argument("--version", help=f"llama-cpp-python version (default: the installed one, else {PINNED})")
    p.add_argument("--sdist", type=Path, help="a llama_cpp_python-VERSION.tar.gz already downloaded")
    p.add_argument("--no-gguf", action="store_true", help="do not install its gguf-py")
    sub.add_parser("where", help="print the folder the exporter reads the converter from")
    args = parser.parse_args(argv)
    if args.command == "where":
        print(folder())
        return 0
    try:
        print(install(args.version, args.sdist, gguf=not args.no_gguf))
    except (MissingDependencyError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
