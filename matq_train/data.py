"""Training text: files or a local dataset folder, tokenized with the model's tokenizer into fixed blocks.

Batches are a pure function of ``(seed, step)``: every rank of a distributed run takes its share of
the same global batch, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from matq_converters.text import cut_windows, folder_files, read_text
from matq_converters.text import tokenize_documents as tokenize
from matq_format.errors import MatqError
from matq_format.safefs import parse_json

__all__ = [
    "DataError",
    "TEXT_SUFFIXES",
    "TokenBlocks",
    "load_blocks",
    "mask_tokens",
    "read_documents",
    "split_documents",
    "tokenize",
]

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl", ".json")


class DataError(MatqError):
    """Training data that is missing, empty, unreadable, or too short for one block."""

    hint = "pass text files, a folder of .txt/.md/.rst/.jsonl files, or a folder saved by datasets"


def _json_texts(path: Path, text: str, text_field: str) -> list[str]:
    out: list[str] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rec = parse_json(line, f"{path}:{i}", DataError)
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
                    raise DataError(path, f"line {i}: no string field {text_field!r}")
                out.append(rec[text_field])
        return out
    data = parse_json(text, path, DataError)
    if isinstance(data, dict) and isinstance(data.get(text_field), list):
        data = data[text_field]
    for rec in data if isinstance(data, list) else [data]:
        t = rec.get(text_field) if isinstance(rec, dict) else rec
        if not isinstance(t, str):
            raise DataError(path, f"expected strings or records with a string field {text_field!r}")
        out.append(t)
    return out


def read_documents(paths: Sequence[str | os.PathLike], text_field: str = "text") -> list[str]:
    """Documents from text files (one document each), JSON lines, or folders of them.

    A folder written by ``datasets.Dataset.save_to_disk`` is read with ``datasets`` when installed.
    """
    docs: list[str] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(p, "no such file or folder")
        if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
            try:
                import datasets
            except ImportError:
                raise DataError(
                    p, "a datasets folder needs the datasets package (pip install datasets)"
                ) from None
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
            if text_field not in ds.column_names:
                raise DataError(p, f"no column {text_field!r} (columns: {', '.join(ds.column_names)})")
            docs.extend(t for t in ds[text_field] if t)
            continue
        files = folder_files(p, TEXT_SUFFIXES) if p.is_dir() else [p]
        for f in files:  # regular files only, UTF-8 (as calibration text): a FIFO is refused, not waited on
            _, text = read_text(f, DataError)
            if f.suffix.lower() in (".jsonl", ".json"):
                docs.extend(_json_texts(f, text, text_field))
            else:
                docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(", ".join(map(str, paths)) or None, "no text found")
    return docs


def split_documents(docs: Iterable[str], holdout: float) -> tuple[list[str], list[str]]:
    """Train and held-out documents, chosen by a hash of each document's text (order-independent)."""
    train, held = [], []
    for d in docs:
        (held if zlib.crc32(d.encode("utf-8")) % 10_000 < holdout * 10_000 else train).append(d)
    return train, held


class TokenBlocks:
    """A token stream cut into ``[n, seq_len]`` blocks, served in a seeded order, epoch after epoch."""

    def __init__(self, stream: np.ndarray, seq_len: int, source: str | None = None):
        n = len(stream) // seq_len
        if n < 1:
            raise DataError(source, f"{len(stream)} tokens is less than one block of {seq_len}")
        self.seq_len = seq_len
        self.blocks = cut_windows(stream, seq_len, n)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def tokens(self) -> int:
        return self.blocks.size

    def indices(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Block indices of this rank's share (every ``world``-th row) of global batch ``step``."""
        n = len(self.blocks)
        g = step * batch_size + np.arange(batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(g // n):
            sel = g // n == epoch
            out[sel] = np.random.default_rng([seed, int(epoch)]).permutation(n)[g[sel] % n]
        return out[rank::world]

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> np.ndarray:
        return self.blocks[self.indices(step, batch_size, seed, rank, world)]

    def sequential(self, batch_size: int, limit: int | None = None) -> Iterable[np.ndarray]:
        """Every block once, in order (evaluation)."""
        n = len(self.blocks) if limit is None else min(limit, len(self.blocks))
        for i in range(0, n, batch_size):
            yield self.blocks[i : min(i + batch_size, n)]


def mask_tokens(
    ids: np.ndarray, tokenizer, seed: int, step: int, rows: np.ndarray, prob: float = 0.15
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking (80% [MASK], 10% random, 10% kept) seeded per global row, so any rank split agrees."""
    ids = ids.copy()
    labels = np.full_like(ids, -100)
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=ids.dtype)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([seed, step, int(row), 7])
        pick = (rng.random(ids.shape[1]) < prob) & ~np.isin(ids[i], special)
        if not pick.any():
            pick[rng.integers(ids.shape[1])] = True
        labels[i, pick] = ids[i, pick]
        u = rng.random(ids.shape[1])
        ids[i, pick & (u < 0.8)] = tokenizer.mask_token_id
        rand = pick & (u >= 0.8) & (u < 0.9)
        ids[i, rand] = rng.integers(0, len(tokenizer), size=int(rand.sum()))
    return ids, labels


def load_blocks(
    paths: Sequence[str | os.PathLike],
    tokenizer,
    seq_len: int,
    holdout: float = 0.0,
    text_field: str = "text",
) -> tuple[TokenBlocks, TokenBlocks | None]:
    """Train blocks and (with ``holdout > 0``) held-out blocks from the given paths."""
    docs = read_documents(paths, text_field)
    src = ", ".join(map(str, paths))
    if holdout > 0:
        train, held = split_documents(docs, holdout)
        if not held or not train:
            raise DataError(
                src, f"holdout {holdout} leaves {len(train)} train and {len(held)} held-out documents"
            )
        return TokenBlocks(tokenize(train, tokenizer), seq_len, src), TokenBlocks(
            tokenize(held, tokenizer), seq_len, src
        )
    return TokenBlocks(tokenize(docs, tokenizer), seq_len, src), None
