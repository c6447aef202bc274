"""Throughput of `matq quantize` beside copying the same files, on a generated multi-shard checkpoint.

Generates a Llama-shaped bf16 checkpoint of at least ``--gb`` GB in a temporary folder (deleted at
the end), warms the page cache, then times in one run: copying its files (``shutil.copyfile``),
``quantize_hf`` in a fresh process (peak resident memory from ``getrusage``), and the ``matq
quantize`` command end to end. Target (issue 3): quantize at >= 0.5x copy speed.

    python bench/quantize.py [--gb 1] [--layers ffn|linear] [--objective minmax] [--threads N]
    python bench/quantize.py --minilm        # the README quality table (all-MiniLM-L6-v2)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from matq_format.container import SafetensorsWriter

HIDDEN, INTERMEDIATE, VOCAB, KV = 4096, 11008, 32000, 1024  # Llama-2-7B shapes, grouped KV
SHARD_BYTES = 400 << 20


def llama_tensors(n_layers: int) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    t = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        t += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return t + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def generate(root: Path, gb: float) -> dict:
    """A bf16 Llama-shaped checkpoint of at least ``gb`` GB: shards, index, config."""
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * HIDDEN * INTERMEDIATE)
    fixed = 2 * 2 * VOCAB * HIDDEN
    n_layers = max(1, int(np.ceil((gb * 1e9 - fixed) / per_layer)))
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16)  # bf16 bits of N(0, 0.02)
    weight_map, shard, shard_bytes, idx, offset = {}, None, 0, 0, 0
    names = []
    for name, shape in llama_tensors(n_layers):
        n = int(np.prod(shape))
        if shard is None or shard_bytes + 2 * n > SHARD_BYTES:
            if shard is not None:
                shard.close({"format": "pt"})
            idx += 1
            shard = SafetensorsWriter(root / f"model-{idx:05d}.safetensors")
            names.append(shard.path.name)
            shard_bytes = 0
        data = np.resize(np.roll(pool, offset), n) if len(shape) == 2 else np.full(n, 0x3F80, np.uint16)
        offset += 7919
        shard.write(name, data.reshape(shape), "BF16")
        weight_map[name] = shard.path.name
        shard_bytes += 2 * n
    shard.close({"format": "pt"})
    total = sum((root / f).stat().st_size for f in names)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": VOCAB,
        "torch_dtype": "bfloat16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return {"layers": n_layers, "shards": len(names), "bytes": total}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def copy_folder(src: Path, dst: Path, sync: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of copying every file of ``src``."""
    dst.mkdir()
    t0, c0 = time.perf_counter(), _cpu()
    for p in sorted(src.iterdir()):
        shutil.copyfile(p, dst / p.name)
    if sync:
        os.sync()
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    shutil.rmtree(dst)
    return dt, cpu


_CHILD = """
import json, resource, sys, time, os
from matq_converters.importers.hf.quantize import quantize_hf

def hwm():  # this process's peak resident set: VmHWM restarts at exec, unlike ru_maxrss
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

base = hwm()
kw = json.loads(sys.argv[4])
t0, c0 = time.perf_counter(), cpu()
quantize_hf(sys.argv[1], sys.argv[2], **kw)
if sys.argv[3] == "sync":
    os.sync()
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "cpu": cpu() - c0, "peak_rss": hwm(), "base_rss": base}))
"""


def quantize_once(src: Path, dst: Path, kw: dict, sync: bool) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(dst), "sync" if sync else "-", json.dumps(kw)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise SystemExit(r.stderr)
    shutil.rmtree(dst)
    return json.loads(r.stdout.strip().splitlines()[-1])


def cli_once(src: Path, dst: Path, args: list[str], sync: bool) -> float:
    t0 = time.perf_counter()
    subprocess.run(["matq", "quantize", str(src), "-o", str(dst), *args], check=True, capture_output=True)
    if sync:
        os.sync()
    dt = time.perf_counter() - t0
    shutil.rmtree(dst)
    return dt


def throughput(a: argparse.Namespace) -> None:
    from matq_converters.importers.hf.source import HFSource

    with tempfile.TemporaryDirectory(prefix="matq-bench-", dir=a.tmp) as tmp:
        tmp = Path(tmp)
        src = tmp / "model"
        src.mkdir()
        t0 = time.perf_counter()
        info = generate(src, a.gb)
        print(
            f"generated {info['bytes'] / 1e9:.2f} GB bf16, {info['layers']} Llama-7B-shaped layers, "
            f"{info['shards']} shards in {time.perf_counter() - t0:.0f} s"
        )
        hs = HFSource(src)
        largest = max(t.nbytes for t in hs.tensors.values())
        largest_q = max(t.nbytes for n, t in hs.tensors.items() if "mlp" in n)
        for p in src.iterdir():  # warm the page cache for both contestants
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass
        kw = {"layers": a.layers, "objective": a.objective, "threads": a.threads}
        copies, quants = [], []
        for _ in range(a.repeat):
            copies.append(copy_folder(src, tmp / "copy", a.sync))
            quants.append(quantize_once(src, tmp / "q", kw, a.sync))
        cli = cli_once(src, tmp / "cli", ["--layers", a.layers, "--objective", a.objective], a.sync)
        copy_s, copy_cpu = min(copies)
        best = min(quants, key=lambda r: r["seconds"])
        gbs = info["bytes"] / 1e9
        print(
            f"threads: {a.threads or 'default'} of {os.cpu_count()} CPUs; layers={a.layers}, "
            f"objective={a.objective}; {'with' if a.sync else 'without'} sync to disk"
        )
        runs = ", ".join(f"{c[0]:.2f}" for c in copies)
        print(
            f"copy files        {copy_s:6.2f} s  {gbs / copy_s:5.2f} GB/s   (runs: {runs}; CPU {copy_cpu:.2f} s)"
        )
        runs = ", ".join(f"{q['seconds']:.2f}" for q in quants)
        print(
            f"quantize_hf       {best['seconds']:6.2f} s  {gbs / best['seconds']:5.2f} GB/s   "
            f"(runs: {runs}; CPU {best['cpu']:.2f} s)"
        )
        print(f"matq quantize CLI {cli:6.2f} s  {gbs / cli:5.2f} GB/s   (process start and imports included)")
        print(f"throughput ratio quantize/copy: {copy_s / best['seconds']:.2f}  (target >= 0.5)")
        print(
            f"CPU-time ratio copy/quantize: {copy_cpu / best['cpu']:.2f}; load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"peak RSS {best['peak_rss'] / 2**20:.0f} MiB (after imports {best['base_rss'] / 2**20:.0f} MiB); "
            f"largest tensor {largest / 2**20:.0f} MiB, largest quantized tensor {largest_q / 2**20:.0f} MiB"
        )


def minilm_table(a: argparse.Namespace) -> None:
    """Cosine of mean-pooled embeddings, dequantized vs original, for the README."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_quantize import SENTENCES, minilm_cosines

    rows = [
        ("MinMax, group 128 (default)", {}),
        ("multiwidth, group 128, lambdas 1,1,1", {"objective": "multiwidth"}),
        ("multiwidth, group 128, lambdas 4,2,1", {"objective": "multiwidth", "lambdas": (4, 2, 1)}),
        ("MinMax, per channel", {"group_size": None}),
        ("multiwidth, per channel, lambdas 1,1,1", {"objective": "multiwidth", "group_size": None}),
    ]
    widths = (8, 6, 4, 3, 2)
    print(f"{len(SENTENCES)} sentences; cosine of mean-pooled embeddings (mean / min over sentences)\n")
    print("| quantization | " + " | ".join(f"int{r}" for r in widths) + " | seconds |")
    print("|---|" + "---|" * (len(widths) + 1))
    for label, kw in rows:
        res, secs = minilm_cosines(kw, widths)
        cells = " | ".join(f"{res[r][0]:.4f} / {res[r][1]:.3f}" for r in widths)
        print(f"| {label} | {cells} | {secs:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="checkpoint size to generate (GB, at least)")
    ap.add_argument("--layers", default="ffn")
    ap.add_argument("--objective", default="minmax")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sync", action="store_true", help="include flushing the written files to disk")
    ap.add_argument("--tmp", default=None, help="where to put the temporary folder")
    ap.add_argument("--minilm", action="store_true", help="print the MiniLM quality table instead")
    a = ap.parse_args()
    minilm_table(a) if a.minilm else throughput(a)


if __name__ == "__main__":
    main()
