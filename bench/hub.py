"""Bytes a width-selective `matq pull` transfers, measured at the server.

Generates a checkpoint of at least 100 MB (random weights, per-channel MinMax codes, F16 scales, U8
zero points), pushes it with the real huggingface_hub client to the loopback Hub server of the tests,
then pulls int2, int4 and int8 into fresh caches and reads the response-body bytes the server sent.
Targets: int2 <= 40% and int4 <= 65% of int8. A last pull of int4 is cut off part-way through a
plane file to show the client resuming with a Range request (bytes sent stay near a clean pull).

    nice python bench/hub.py [--layers 8] [--json out.json]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

# The client reads these once, at import: plain HTTP LFS, a private cache, no progress bars.
_HOME = tempfile.mkdtemp(prefix="matq-bench-hub-")
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HOME"] = os.path.join(_HOME, "hf-home")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.pop("HF_TOKEN", None)

import json  # noqa: E402
import shutil  # noqa: E402

import click  # noqa: E402
import numpy as np  # noqa: E402

import matq_format as mf  # noqa: E402
from matq_format import numerics as N  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hubserver import HubServer  # noqa: E402

from matq_hub import pull, push  # noqa: E402

HIDDEN, INTER, VOCAB = 1024, 2816, 8192
TOKEN = "hf_test_write"


def generate(out: Path, layers: int, seed: int = 0) -> int:
    """A llama-shaped checkpoint; returns the number of quantized weights."""
    rng = np.random.default_rng(seed)
    src = out.parent / "hf"
    src.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
    }
    (src / "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{n}.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
    with mf.CheckpointWriter(out, carry_from=src, source={"tool": "bench/hub.py"}) as w:
        for name, shape in shapes.items():
            x = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
            a, z = N.minmax_params(x, 8, None, scale_dtype="F16")
            w.add_quantized(name, N.quantize(x, a, z, 8, None), a, z, dtype="BF16", extra_precision=(2,))
        for i in range(layers):
            for n in ("input_layernorm", "post_attention_layernorm"):
                w.add_dense(f"model.layers.{i}.{n}.weight", np.ones(HIDDEN, np.float32))
        w.add_dense("model.norm.weight", np.ones(HIDDEN, np.float32))
    return sum(r * c for r, c in shapes.values())


@click.command()
@click.option("--layers", default=8, show_default=True, help="Transformer blocks (8 gives about 111 MB).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the figures as JSON.")
def main(layers: int, json_out: Path | None) -> None:
    work = Path(_HOME)
    try:
        t = time.perf_counter()
        ckpt = work / "ckpt"
        weights = generate(ckpt, layers)
        size = sum(p.stat().st_size for p in mf.open(ckpt).files())
        print(
            f"checkpoint: {weights:,} quantized weights, {size / 1e6:.1f} MB ({time.perf_counter() - t:.1f} s)"
        )
        if size < 100e6:
            raise SystemExit("checkpoint under 100 MB: raise --layers")
        with HubServer(work / "server") as server:
            t = time.perf_counter()
            push(ckpt, "bench/matq", token=TOKEN, endpoint=server.url)
            pushed = server.bytes_served
            print(f"push: {time.perf_counter() - t:.1f} s")
            rows = {}
            for r in (8, 4, 2):
                server.reset_counters()
                t = time.perf_counter()
                res = pull(
                    "bench/matq", work / f"int{r}", bits=r, endpoint=server.url, cache_dir=work / f"cache{r}"
                )
                rows[r] = {
                    "bytes_served": server.bytes_served,
                    "files": len(res.files),
                    "requests": len(server.log),
                    "seconds": round(time.perf_counter() - t, 2),
                }
                shutil.rmtree(work / f"cache{r}")
                shutil.rmtree(work / f"int{r}")
            # an int4 pull cut off 11 MiB into the top plane file: the client resumes with Range
            server.reset_counters()
            server.fail("GET", "/resolve/.*/matq-plane-7", "drop_after", 11 << 20)
            pull(
                "bench/matq", work / "resumed", bits=4, endpoint=server.url, cache_dir=work / "cache-resumed"
            )
            resumed = {
                "bytes_served": server.bytes_served,
                "plane7_statuses": [s for _, _, s, _ in server.requests("GET", "matq-plane-7")],
            }
        full = rows[8]["bytes_served"]
        print("\n| width | files | bytes served | share of int8 | target | time |\n|---|---|---|---|---|---|")
        targets = {8: None, 4: 0.65, 2: 0.40}
        ok = True
        for r in (8, 4, 2):
            share = rows[r]["bytes_served"] / full
            tgt = targets[r]
            ok &= tgt is None or share <= tgt
            rows[r]["share_of_int8"] = round(share, 4)
            print(
                f"| int{r} | {rows[r]['files']} | {rows[r]['bytes_served']:,} | {share:.1%} | "
                f"{'' if tgt is None else f'<= {tgt:.0%}'} | {rows[r]['seconds']} s |"
            )
        print(
            f"\ninterrupted int4 pull: {resumed['bytes_served']:,} bytes served "
            f"({resumed['bytes_served'] / rows[4]['bytes_served']:.3f} x a clean int4 pull), "
            f"matq-plane-7 answers {resumed['plane7_statuses']}"
        )
        if json_out:
            doc = {"checkpoint_bytes": size, "weights": weights, "push_bytes_served": pushed, "pulls": rows}
            json_out.write_text(json.dumps({**doc, "interrupted_int4": resumed}, indent=2))
        if not ok:
            raise SystemExit("a width is over its target")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
