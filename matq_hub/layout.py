"""Which repository files a width needs, read from the manifest alone.

The format keeps each bit-plane of every tensor in its own file (``matq-plane-K.safetensors``) and
the manifest maps every entry to its file, so the files a download needs follow from the manifest:
the base file, the files holding the planes each tensor's width reads (and that width's own block
parameters, spec 10.7), and the carried files.
Nothing here assumes the canonical layout; a single-file checkpoint simply needs its one file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matq_format import constants as C
from matq_format import numerics
from matq_format.checkpoint import UNDERSTOOD_EXTENSIONS, Checkpoint
from matq_format.manifest import TensorInfo, parse_manifest, plane_entry


def needed_files(ckpt: Checkpoint, widths: Mapping[str, int]) -> list[str]:
    """Repository paths a checkpoint served at ``widths`` (``{tensor: bits}``) needs, base file first."""
    entries = ckpt.manifest["entries"]
    files: set[str] = set()
    for name, r in widths.items():
        for k in numerics.planes_needed(ckpt.code_bits, r):
            files.add(entries[plane_entry(name, k)]["file"])
        for rr, ename, _, _ in ckpt.info(name).width_entries(ckpt.code_bits):  # spec 10.7: width r's own
            if rr == r:
                files.add(entries[ename]["file"])
    files.discard(C.BASE_FILENAME)
    return [C.BASE_FILENAME, *sorted(files, reverse=True), *sorted(ckpt.manifest.get("carried", {}))]


def file_bytes(ckpt: Checkpoint, base_bytes: int) -> dict[str, int]:
    """Size of every repository file of the checkpoint, as its manifest records it."""
    sizes = {C.BASE_FILENAME: base_bytes}
    sizes.update({f: int(v["bytes"]) for f, v in ckpt.manifest["files"].items()})
    sizes.update({f: int(v["bytes"]) for f, v in ckpt.manifest.get("carried", {}).items()})
    return sizes


class _NeedsWeights(Exception):
    """Raised when a plan asks for weight data (e.g. ``budget:``), which a manifest alone cannot give."""


class DeclaredView:
    """A checkpoint as its manifest declares it (every plane), before any plane file is downloaded.

    Enough for :func:`matq_format.resolve_plan` on plans that depend on names and layer positions
    only; anything that would read weights raises :class:`_NeedsWeights`.
    """

    def __init__(self, ckpt: Checkpoint):
        self.path: Path = ckpt.path
        self.code_bits = ckpt.code_bits
        self.manifest = ckpt.manifest
        _, self._infos = parse_manifest(ckpt.path, ckpt.manifest_text, UNDERSTOOD_EXTENSIONS)

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def quantized_names(self) -> list[str]:
        return [n for n, t in self._infos.items() if t.quantized]

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _NeedsWeights(name)

    def max_widths(self) -> dict[str, int]:
        """Widest width each quantized tensor can serve with the planes the repository holds."""
        return {n: self._infos[n].max_width(self.code_bits) for n in self.quantized_names()}
