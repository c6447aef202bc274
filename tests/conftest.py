"""Shared test fixtures: small matq checkpoints built from random data, and Hypothesis profiles.

``make_checkpoint(**options)`` writes a checkpoint (folder or single file) with real MinMax codes
and returns what went in, so a test can compare what comes back out. Keep it small and generic:
tests that need odd layouts call :class:`matq_format.CheckpointWriter` themselves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

import matq_format as mf
from matq_format import numerics as N

# `HYPOTHESIS_PROFILE=thorough pytest ...` runs the format property tests ten times longer (they
# scale their example counts by the profile's max_examples). Hypothesis' own "ci" profile is
# picked automatically when the CI variable is set.
settings.register_profile("thorough", max_examples=1000)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])

# Commands run here write no progress lines (a slow machine would mix them into the output tests
# read); tests/test_progress.py turns them on where it checks them.
os.environ.setdefault("MATQ_PROGRESS", "off")


@dataclass
class Built:
    """A checkpoint written by :func:`build_checkpoint`, with the values that went in."""

    path: Path
    code_bits: int
    codes: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, np.ndarray] = field(default_factory=dict)
    """float32 values exactly as stored (already rounded to the scale dtype)."""
    zeros: dict[str, np.ndarray] = field(default_factory=dict)
    group_sizes: dict[str, int | None] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        """The file holding the manifest (the single file itself, or the folder's matq.safetensors)."""
        return self.path if self.path.is_file() else self.path / mf.constants.BASE_FILENAME


def build_checkpoint(
    out: str | Path,
    *,
    code_bits: int = 8,
    shapes: tuple[tuple[int, int], ...] = ((8, 70), (3, 64)),
    group_size: int | None = 32,
    scheme: str = "asymmetric",
    scale_dtype: str = "F16",
    zero_dtype: str = "U8",
    extra_precision: tuple[int, ...] = (2,),
    dense: bool = True,
    carry: dict[str, str] | None = None,
    single_file: bool = False,
    keep_bits: int | None = None,
    seed: int = 0,
    **writer_kw,
) -> Built:
    """Quantize random normal weights with MinMax and write them (plus a norm and a BF16 embedding).

    ``carry`` maps file names to text written into a side folder and carried along (folder form).
    """
    out = Path(out)
    rng = np.random.default_rng(seed)
    built = Built(out, code_bits)
    carry_from = None
    if carry:
        carry_from = out.parent / f"{out.name}-hf"
        carry_from.mkdir(parents=True, exist_ok=True)
        for rel, text in carry.items():
            (carry_from / rel).parent.mkdir(parents=True, exist_ok=True)
            (carry_from / rel).write_text(text)
    ep = tuple(r for r in extra_precision if r < code_bits)
    with mf.CheckpointWriter(
        out, code_bits, single_file=single_file, carry_from=carry_from, **writer_kw
    ) as w:
        for i, (rows, cols) in enumerate(shapes):
            name = f"model.layers.{i}.mlp.up_proj.weight"
            x = (rng.normal(size=(rows, cols)) * (1 + i)).astype(np.float32)
            s, z = N.minmax_params(
                x, code_bits, group_size, symmetric=scheme == "symmetric", scale_dtype=scale_dtype
            )
            q = N.quantize(x, s, z, code_bits, group_size)
            w.add_quantized(
                name,
                q,
                s,
                z,
                dtype="F32",
                group_size=group_size,
                scheme=scheme,
                scale_dtype=scale_dtype,
                zero_dtype=zero_dtype,
                extra_precision=ep,
                keep_bits=keep_bits,
            )
            built.codes[name], built.scales[name], built.zeros[name] = q, s, z
            built.group_sizes[name] = group_size
        if dense:
            norm = rng.normal(size=shapes[0][0]).astype(np.float32)
            emb = rng.normal(size=(5, 6)).astype(ml_dtypes.bfloat16)
            for name, a in (("model.norm.weight", norm), ("model.embed_tokens.weight", emb)):
                w.add_dense(name, a)
                built.dense[name] = a
    return built


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Built]:
    """Factory: ``make_checkpoint(out=None, **build_checkpoint options) -> Built``.

    Session-scoped so Hypothesis tests may call it; each call without ``out`` gets a fresh folder.
    """

    def make(out: str | Path | None = None, **kw) -> Built:
        if out is None:
            out = tmp_path_factory.mktemp("ckpt") / ("ck.safetensors" if kw.get("single_file") else "ck")
        return build_checkpoint(out, **kw)

    return make


@pytest.fixture(scope="session")
def small_checkpoint(make_checkpoint) -> Built:
    """One shared folder checkpoint (c = 8, groups not dividing cols, a carried config). Do not modify."""
    return make_checkpoint(carry={"config.json": json.dumps({"model_type": "llama"})})
