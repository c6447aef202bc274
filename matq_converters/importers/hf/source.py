"""A Hugging Face model folder as a read-only source of tensors, one memory-mapped tensor at a time.

The folder holds ``config.json`` and either ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Headers are parsed by the matq container reader (so a damaged
shard gets the same typed errors as a damaged matq file) and each tensor is mapped on its own with
``numpy.memmap``: only the pages of the tensor being read are resident, and dropping the array
unmaps them. ``safetensors.safe_open(framework="np")`` is not used because its numpy backend
rejects BF16, the dtype most checkpoints ship in.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matq_converters import hfconfig
from matq_format import constants as C
from matq_format import dtypes
from matq_format.container import Entry, FileHeader, read_header
from matq_format.errors import HeaderError, MatqError
from matq_format.safefs import allowed_roots, check_file, read_json

__all__ = [
    "HFSource",
    "MissingShardError",
    "NotAModelFolderError",
    "ShardIndexError",
    "ConfigError",
    "SourceError",
    "SourceTensor",
]

INDEX_NAME = "model.safetensors.index.json"
SIDE_JSON = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
)
"""JSON files of a model folder that transformers reads (besides config.json): checked on opening."""
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


class SourceError(MatqError):
    """A model folder that cannot be read as a Hugging Face safetensors checkpoint."""


class NotAModelFolderError(SourceError):
    """No folder, no ``config.json``, or no safetensors weights."""

    hint = "point at a Hugging Face model folder (config.json plus *.safetensors)"


class MissingShardError(SourceError):
    """The index names a shard file that is not in the folder."""

    hint = "download the missing shard or re-save the model with save_pretrained"


class ConfigError(NotAModelFolderError):
    """config.json holds a value transformers cannot build a model of, or more than the weights hold
    (see :mod:`matq_converters.hfconfig`)."""

    hint = ""


class ShardIndexError(SourceError):
    """The index is malformed or disagrees with the shards."""


@dataclass(frozen=True)
class SourceTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int


class HFSource:
    """Tensors of a Hugging Face model folder; nothing is read until :meth:`read`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotAModelFolderError(self.root, "is not a folder")
        self.roots = allowed_roots(self.root)
        """Where the folder's files may lie (itself, or a Hugging Face cache's blobs)."""
        cfg = self.root / "config.json"
        if not os.path.lexists(cfg):
            raise NotAModelFolderError(self.root, "has no config.json; is it a Hugging Face model folder?")
        self.config: dict = read_json(cfg, C.CARRY_MAX_BYTES, ConfigError, self.roots)
        if not isinstance(self.config, dict):
            raise ConfigError(cfg, "is not a JSON object")
        for name in SIDE_JSON:  # read by transformers and tokenizers: parsed here first, bounded
            if os.path.lexists(self.root / name):
                read_json(self.root / name, C.CARRY_MAX_BYTES, SourceError, self.roots)
        self.files = self._shard_files()
        self._headers: dict[Path, FileHeader] = {p: read_header(p) for p in self.files}
        self.tensors: dict[str, SourceTensor] = {}
        self._entries: dict[str, tuple[FileHeader, Entry]] = {}
        for p in self.files:
            h = self._headers[p]
            for e in sorted(h.entries.values(), key=lambda e: e.start):  # file order: sequential reads
                if e.name in self.tensors:
                    raise HeaderError(p, f"tensor {e.name!r} is also in {self.tensors[e.name].file.name}")
                self.tensors[e.name] = SourceTensor(e.name, e.dtype, e.shape, p, e.nbytes)
                self._entries[e.name] = (h, e)
        if self._index is not None:
            for name, shard in self._index.items():
                if self.tensors.get(name) is None or self.tensors[name].file.name != shard:
                    raise ShardIndexError(
                        self.root / INDEX_NAME, f"names {name!r} in {shard}, which lacks it"
                    )
        hfconfig.check(self.config, ((t.name, t.shape) for t in self.tensors.values()), cfg, ConfigError)

    def _shard_files(self) -> list[Path]:
        index = self.root / INDEX_NAME
        self._index: dict[str, str] | None = None
        if os.path.lexists(index):
            doc = read_json(index, C.CARRY_MAX_BYTES, ShardIndexError, self.roots)
            try:
                weight_map = doc["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
                ):
                    raise TypeError
            except (KeyError, TypeError):
                raise ShardIndexError(
                    index, "is not a safetensors index (needs a weight_map object)"
                ) from None
            self._index = weight_map
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if Path(s).name != s or s.startswith("."):
                    raise ShardIndexError(index, f"shard name {s!r} must be a plain file name in the folder")
            missing = [s for s in shards if not (self.root / s).is_file()]
            if missing:
                raise MissingShardError(
                    self.root / missing[0],
                    f"shard listed in {INDEX_NAME} is missing ({len(missing)} missing)",
                )
            return [check_file(self.root / s, self.roots) for s in shards]
        files = sorted(
            check_file(p, self.roots) for p in self.root.glob("*.safetensors") if not p.name.startswith(".")
        )
        if not files:
            other = [p.name for p in self.root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
            extra = f" (found {other[0]}; re-save it with safe_serialization=True)" if other else ""
            raise NotAModelFolderError(self.root, f"has no safetensors weights{extra}")
        return files

    # --- queries --------------------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{name: (safetensors dtype, shape)}`` in file order."""
        return {n: (t.dtype, t.shape) for n, t in self.tensors.items()}

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def location(self, name: str) -> tuple[Path, int, int]:
        """(shard, byte offset, byte count) of a tensor's data, for copying it without reading it."""
        h, e = self._entries[name]
        return h.path, h.data_start + e.start, e.nbytes

    def read(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as ``ml_dtypes.bfloat16``), a read-only memory map of its bytes.

        The map covers this tensor only and is populated up front; it is unmapped when the
        returned array is dropped.
        """
        h, e = self._entries[name]
        if e.nbytes == 0:
            return dtypes.from_bytes(np.zeros(0, np.uint8), e.dtype, e.shape)
        start = h.data_start + e.start
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with open(h.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), start + e.nbytes - base, offset=base, access=mmap.ACCESS_READ)
        if _MADV_POPULATE_READ is not None:
            try:  # map every page in one call: half the CPU of faulting them in one by one
                mm.madvise(_MADV_POPULATE_READ)
            except OSError:  # kernels before 5.14
                pass
        buf = np.frombuffer(mm, dtype=np.uint8, count=e.nbytes, offset=start - base)
        return dtypes.from_bytes(buf, e.dtype, e.shape)
