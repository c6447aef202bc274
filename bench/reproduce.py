"""Reproduce the ordering of the MatQuant paper's Table 2 at small scale, on CPU.

A small Llama-architecture model is pretrained here on real English text (the reST sources of the
Python documentation, Debian package ``python3.11-doc``), then trained with the same token budget
each as: QAT baselines at int8, int4 and int2 (each its own model, ``c = r``); MatQuant [8, 4, 2];
MatQuant with co-distillation [8, 4, 8->2] and [8, 4, 2, 8->2]; MatQuant with extra precision; and, without training,
MinMax int8 sliced to every width. Held-out log perplexity (nats per token) at int8, int6, int4,
int3 and int2 for each, training speed against plain full-precision training, bits per weight of
the extra-precision model, a JSON file and a PNG plot.

``--backend jax`` trains and evaluates the QAT runs with the JAX backend (``matq_train.jax``); the
pretraining, the train-free rows and the interleaved speed measurement stay in torch (the same
fake-quantized numerics, bit for bit), so with ``--reuse-pretrained`` both backends start from the
same pretrained model.

    nice -n 10 python bench/reproduce.py            # about 15 minutes on 2 lightly loaded cores
    python bench/reproduce.py --quick               # a 1-minute smoke run of the whole pipeline
    python bench/reproduce.py --backend jax --reuse-pretrained   # the QAT runs in JAX
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Busy-waiting OpenMP threads collapse when the two cores are shared with other work: sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

CORPUS = Path("/usr/share/doc/python3.11/html/_sources")
WIDTHS = (8, 6, 4, 3, 2)
ROOT = Path(__file__).resolve().parents[1]


def read_corpus(root: Path) -> list[str]:
    """Every reST source file of the Python docs, one document each, in a fixed order."""
    files = sorted(root.rglob("*.txt"))
    if not files:
        sys.exit(f"no corpus at {root}: apt-get install -y python3.11-doc")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(docs: list[str], vocab: int, out: Path):
    """A byte-level BPE tokenizer trained on the training documents, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return fast


def make_model(args, tokenizer, out: Path) -> None:
    """The random Llama to pretrain, built by the tests' tiny-model builder, saved with its tokenizer."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import build, config

    cfg = config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    build(cfg, out, seed=args.seed, tokenizer=tokenizer)


def bits_per_weight(ckpt_dir: Path) -> dict[str, dict[str, float]]:
    """Average served bits per quantized weight at each width below 8, with the extra bucket.

    ``codes`` counts r bits plus the extra bucket (as the paper reports, e.g. 2.05); ``total`` adds
    the F16 scale and U8 zero point per row or group. Both use ``numerics`` (extra bucket costed as
    32-bit positions of the weights in it, or a 1-bit mask when that is cheaper).
    """
    import matq_format as mf
    from matq_format import numerics

    ckpt = mf.open(ckpt_dir)
    out = {}
    for r in WIDTHS[1:]:
        n = codes_bits = total_bits = share_n = 0.0
        for name in ckpt.quantized_names():
            t = ckpt.info(name)
            q = ckpt.codes(name)
            share = numerics.extra_bucket_share(q, ckpt.code_bits, r)
            rows, cols = t.shape
            total = numerics.bits_per_weight(r, rows, cols, t.group_size, 2, 1, share)
            codes = numerics.bits_per_weight(r, rows, cols, t.group_size, 0, 0, share)
            n += q.size
            codes_bits += codes * q.size
            total_bits += total * q.size
            share_n += share * q.size
        out[f"int{r}"] = {"codes": codes_bits / n, "total": total_bits / n, "extra_share": share_n / n}
    return out


def speed(model_dir: Path, blocks, args) -> dict[str, float]:
    """Tokens/s of full-precision, single-width QAT and 3-width MatQuant steps, measured interleaved.

    The cores are shared with other work; running the three kinds of step in turn, round after
    round, lets load changes hit all three alike. Reported: the median over rounds.
    """
    import torch

    from matq_train.objective import Objective
    from matq_train.torch.fakequant import QuantSpec, prepare
    from matq_train.torch.loss import MatQuantStep
    from matq_train.torch.trainer import load_model

    nets = {}
    for kind, obj, spec in (
        ("full precision", Objective((), ()), None),
        ("QAT int2 baseline", Objective((2,), (1.0,)), QuantSpec(2)),
        ("MatQuant [8,4,2]", Objective((8, 4, 2), (0.1, 0.1, 1.0)), QuantSpec(8)),
    ):
        model, _, _ = load_model(model_dir)
        if spec is not None:
            prepare(model, "ffn", spec)
        nets[kind] = (MatQuantStep(model, obj), torch.optim.AdamW(model.parameters(), lr=1e-5))
    rates: dict[str, list[float]] = {k: [] for k in nets}
    tokens = args.batch * args.seq_len
    for rnd in range(args.speed_rounds + 1):
        for kind, (net, opt) in nets.items():
            x = torch.from_numpy(blocks.batch(rnd, args.batch, 99)).long()
            t0 = time.perf_counter()
            for _ in range(args.speed_steps):
                loss, _ = net(x, x, None, float(x.numel() - len(x)))
                loss.backward()
                opt.step()
                opt.zero_grad()
            if rnd:  # round 0 warms up
                rates[kind].append(args.speed_steps * tokens / (time.perf_counter() - t0))
    return {k: float(np.median(v)) for k, v in rates.items()}


def table(results: dict, methods: list[str]) -> str:
    head = "| method | " + " | ".join(f"int{r}" for r in WIDTHS) + " |"
    lines = [head, "|" + "---|" * (len(WIDTHS) + 1)]
    for m in methods:
        row = results[m]
        cells = [f"{row[f'int{r}']:.3f}" if f"int{r}" in row else "—" for r in WIDTHS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, fp: tuple[float, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    styles = {
        "Sliced int8 (no training)": ("tab:gray", "s", ":"),
        "Sliced int8 QAT baseline": ("tab:orange", "s", ":"),
        "MatQuant": ("tab:blue", "o", "-"),
        "MatQuant, lambdas 1,1,1": ("tab:cyan", "o", "--"),
        "MatQuant + co-distill 8->2": ("tab:green", "^", "-"),
        "MatQuant + co-distill 8->2, with labels": ("tab:olive", "v", "--"),
        "MatQuant + extra precision": ("tab:purple", "D", "-"),
    }
    for name, (color, marker, ls) in styles.items():
        xs = [r for r in WIDTHS if f"int{r}" in results[name]]
        ax.plot(xs, [results[name][f"int{r}"] for r in xs], color=color, marker=marker, ls=ls, label=name)
    bx = [r for r in WIDTHS if f"int{r}" in results["Baseline QAT (one model per width)"]]
    ax.plot(
        bx,
        [results["Baseline QAT (one model per width)"][f"int{r}"] for r in bx],
        color="tab:red",
        marker="*",
        ms=11,
        ls="none",
        label="Baseline QAT (one model per width)",
    )
    ax.axhline(fp[0], color="black", lw=0.8, ls=":", label="full precision (pretrained)")
    ax.axhline(fp[1], color="black", lw=0.8, ls="--", label="full precision, same extra tokens")
    ax.set_xlabel("served width (bits, FFN weights)")
    ax.set_ylabel("held-out log perplexity (nats/token)")
    ax.set_xticks(list(WIDTHS))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


METHODS = [
    "Baseline QAT (one model per width)",
    "Sliced int8 (no training)",
    "Sliced int8 QAT baseline",
    "MatQuant",
    "MatQuant + co-distill 8->2",
    "MatQuant + co-distill 8->2, with labels",
    "MatQuant, lambdas 1,1,1",
    "MatQuant + extra precision",
    "Sliced int8, FFN + attention (no training)",
]
"""The rows of the printed table, in order."""

QAT_CONFIGS = {
    "Full precision, same extra tokens": dict(full_precision=True),
    "Baseline QAT int8": dict(baseline=8),
    "Baseline QAT int4": dict(baseline=4),
    "Baseline QAT int2": dict(baseline=2),
    "MatQuant": dict(bits=(8, 4, 2), lambdas=(0.1, 0.1, 1.0)),
    "MatQuant + co-distill 8->2": dict(bits=(8, 4, 2), lambdas=(0.1, 0.1, 1.0), distill="8->2"),
    "MatQuant + co-distill 8->2, with labels": dict(
        bits=(8, 4, 2), lambdas=(0.1, 0.1, 1.0), distill="8->2", distill_labels=True
    ),
    "MatQuant + extra precision": dict(bits=(8, 4, 2), lambdas=(1.0, 1.0, 1.0), extra_precision=True),
    "MatQuant, lambdas 1,1,1": dict(bits=(8, 4, 2), lambdas=(1.0, 1.0, 1.0)),
}
"""The training runs, each on the same token budget, in the order they run."""


def parse_args() -> argparse.Namespace:
    """The command line, with the defaults that depend on ``--backend`` and ``--quick`` filled in."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "reproduce")
    ap.add_argument("--backend", choices=["torch", "jax"], default="torch", help="trainer of the QAT runs")
    ap.add_argument("--json", type=Path, default=None, help="default: docs/train_reproduce[_jax].json")
    ap.add_argument("--plot", type=Path, default=None, help="default: docs/train_reproduce[_jax].png")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--pretrain-lr", type=float, default=2e-3)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--qat-lr", type=float, default=3e-4)
    ap.add_argument("--group-size", type=int, default=None, help="default: per output channel")
    ap.add_argument("--eval-blocks", type=int, default=256)
    ap.add_argument("--speed-rounds", type=int, default=5)
    ap.add_argument("--speed-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--reuse-pretrained", action="store_true", help="keep the pretrained model of an earlier run"
    )
    ap.add_argument(
        "--replot", action="store_true", help="only redraw --plot from the --json of a finished run"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check the pipeline end to end")
    args = ap.parse_args()
    stem = "train_reproduce" + ("_jax" if args.backend == "jax" else "")
    args.json = args.json or ROOT / "docs" / f"{stem}.json"
    args.plot = args.plot or ROOT / "docs" / f"{stem}.png"
    if args.quick:
        args.pretrain_steps, args.qat_steps, args.eval_blocks = 20, 4, 8
        args.hidden, args.intermediate, args.layers, args.vocab = 128, 256, 2, 512
        args.speed_rounds, args.speed_steps = 1, 1
        args.work = args.work.with_name(args.work.name + "-quick")
        args.json = args.work / "results.json"
        args.plot = args.work / "plot.png"
    return args


def replot(args) -> None:
    """Redraw ``args.plot`` from the JSON of a finished run, without training anything."""
    rep = json.loads(args.json.read_text())
    fp = (rep["full_precision_log_ppl"], rep["full_precision_same_extra_tokens_log_ppl"])
    title = rep["setup"].get("title", f"MatQuant at small scale: {rep['setup']['model']}")
    plot(rep["log_ppl"], fp, args.plot, title)


def quiet_libraries(threads: int) -> None:
    """Torch on ``threads`` threads; timestamped log lines, without transformers' notes and bars."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@dataclass
class Data:
    """The corpus split into training and held-out token blocks, and its tokenizer."""

    tokenizer: Any
    train_blocks: Any
    held_blocks: Any
    n_eval: int
    """Held-out blocks evaluated."""


def load_data(args, reuse: bool, pre_dir: Path) -> Data:
    """Read and split the corpus; train a tokenizer on the training part (or reuse the pretrained one's)."""
    from matq_train.data import TokenBlocks, split_documents, tokenize

    docs = read_corpus(args.corpus)
    train_docs, held_docs = split_documents(docs, 0.05)
    if reuse:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(pre_dir)
    else:
        tokenizer = train_tokenizer(train_docs, args.vocab, args.work / "tokenizer")
    train_blocks = TokenBlocks(tokenize(train_docs, tokenizer), args.seq_len)
    held_blocks = TokenBlocks(tokenize(held_docs, tokenizer), args.seq_len)
    n_eval = min(args.eval_blocks, len(held_blocks))
    print(
        f"corpus: {len(docs)} files, {sum(map(len, docs)) / 1e6:.1f} MB; train {train_blocks.tokens:,} tokens, "
        f"held out {len(held_docs)} files, {held_blocks.tokens:,} tokens ({n_eval * args.seq_len:,} evaluated)"
    )
    return Data(tokenizer, train_blocks, held_blocks, n_eval)


class Evaluator:
    """Held-out loss of a model or a QAT run, and a run's trained weights, in the backend that trained it."""

    def __init__(self, args, data: Data):
        self.args, self.data = args, data

    def model(self, model, bits, ep=False) -> float:
        """Held-out loss of a torch model at ``bits`` (None: full precision)."""
        from matq_train.torch.trainer import evaluate

        d = self.data
        return evaluate(model, d.held_blocks, bits, extra_precision=ep, limit=d.n_eval, batch_size=16)

    def run(self, res, bits, ep=False, code_bits=8) -> float:
        """Held-out loss of a QAT run's model at ``bits``, in the backend that trained it."""
        if self.args.backend == "torch":
            return self.model(res.model, bits, ep)
        from matq_train.jax.trainer import evaluate as jax_evaluate
        from matq_train.torch.fakequant import QuantSpec

        spec = QuantSpec(code_bits, self.args.group_size)
        return jax_evaluate(
            res.params,
            res.model,
            self.data.held_blocks,
            bits,
            spec=spec,
            names=res.quantized,
            extra_precision=ep,
            limit=self.data.n_eval,
            batch_size=16,
        )

    def trained_weight(self, res, name, bits, ep, code_bits):
        """The fake-quantized weight the run trained, as the backend computes it."""
        from matq_train.torch.fakequant import QuantSpec, fake_quant_layers

        if self.args.backend == "torch":
            layer = dict(fake_quant_layers(res.model))[name]
            return layer.fake_weight(bits, ep).detach().numpy()
        from matq_train.jax.fakequant import dequantize

        return np.asarray(dequantize(res.codes[name], QuantSpec(code_bits, self.args.group_size), bits, ep))


@dataclass
class Bench:
    """What every stage reads: the arguments, the data, its evaluator, the pretrained model's folder."""

    args: argparse.Namespace
    data: Data
    ev: Evaluator
    pre_dir: Path


@dataclass
class Results:
    """What the stages measure, filled in as they run (insertion order is the JSON's order)."""

    log_ppl: dict[str, dict[str, float]] = field(default_factory=dict)
    """Method -> width (``int8`` ..., or ``fp``) -> held-out log perplexity."""
    runs: dict[str, dict] = field(default_factory=dict)
    """Training run -> tokens, time, speed, final loss (and bits per weight with extra precision)."""
    baseline: dict[str, float] = field(default_factory=dict)
    """The single-width QAT baselines, one model per width, as one row."""


def common_config(args) -> dict:
    """Training settings shared by pretraining and every QAT run."""
    return dict(
        data=[],
        seq_len=args.seq_len,
        batch_size=args.batch,
        seed=args.seed,
        log_every=max(args.qat_steps // 3, 1),
    )


@dataclass
class Pretrained:
    """The full-precision model every other row starts from, and what it measured."""

    model: Any
    tokens_per_s: float
    n_params: int
    loss: float
    """Held-out log perplexity in full precision."""


def pretrain(b: Bench, reuse: bool, init_dir: Path) -> Pretrained:
    """Stage 1: pretrain in full precision (or reuse the pretrained model of an earlier run)."""
    from matq_train.torch.trainer import TrainConfig, load_model, train

    args, data, pre_dir = b.args, b.data, b.pre_dir
    pre_cfg = TrainConfig(
        model_dir=str(init_dir),
        full_precision=True,
        steps=args.pretrain_steps,
        lr=args.pretrain_lr,
        warmup=max(args.pretrain_steps // 20, 1),
        **{**common_config(args), "log_every": max(args.pretrain_steps // 10, 1)},
    )
    if reuse:
        pre_model, _, _ = load_model(pre_dir)
        pre_speed = json.loads((pre_dir / "pretrain.json").read_text())["tokens_per_s"]
    else:
        make_model(args, data.tokenizer, init_dir)
        pre = train(pre_cfg, train_blocks=data.train_blocks)
        pre_model, pre_speed = pre.model, pre.tokens_per_s
        pre_model.save_pretrained(pre_dir)
        data.tokenizer.save_pretrained(pre_dir)
        (pre_dir / "pretrain.json").write_text(
            json.dumps({"tokens_per_s": pre_speed, "history": pre.history})
        )
    n_params = sum(p.numel() for p in pre_model.parameters())
    fp_loss = b.ev.model(pre_model, None)
    print(
        f"pretrained: {n_params / 1e6:.2f} M parameters, held-out log ppl {fp_loss:.3f}, {pre_speed:.0f} tok/s"
    )
    return Pretrained(pre_model, pre_speed, n_params, fp_loss)


def train_free(b: Bench, pre: Pretrained, rec: Results) -> tuple[float, dict]:
    """Stage 2: MinMax int8 of the pretrained model, sliced, no training (rows added to ``rec``);
    returns the loss without the FFN and the FFN rows' outlier statistics."""
    from matq_train.torch.fakequant import QuantSpec, prepare
    from matq_train.torch.trainer import load_model

    model, _, _ = load_model(b.pre_dir)
    spec8 = QuantSpec(8, b.args.group_size)
    prepare(model, "ffn", spec8)
    rec.log_ppl["Sliced int8 (no training)"] = {f"int{r}": b.ev.model(model, r) for r in WIDTHS}
    ffn_off = loss_without_ffn(b.ev, b.pre_dir)
    ffn_rows = ffn_row_stats(pre.model)
    model, _, _ = load_model(b.pre_dir)
    prepare(model, "linear", spec8)
    rec.log_ppl["Sliced int8, FFN + attention (no training)"] = {
        f"int{r}": b.ev.model(model, r) for r in WIDTHS
    }
    return ffn_off, ffn_rows


def loss_without_ffn(ev: Evaluator, pre_dir: Path) -> float:
    """How much of the loss the FFN carries at all: the pretrained model with every FFN output zeroed."""
    from matq_train.torch.trainer import load_model

    model, _, _ = load_model(pre_dir)
    for name, p in model.named_parameters():
        if ".mlp.down_proj." in name:
            p.data.zero_()
    ffn_off = ev.model(model, None)
    print(f"pretrained model without its FFN (down_proj zeroed): {ffn_off:.3f}")
    return ffn_off


def ffn_row_stats(pre_model) -> dict[str, float]:
    """How outlier-heavy the FFN rows are: int2 MinMax levels hurt most when max|w| is many sigmas out."""
    rows = [p.detach().numpy() for n, p in pre_model.named_parameters() if ".mlp." in n]
    peak = np.concatenate([np.abs(w).max(1) / w.std(1) for w in rows])
    kurt = np.concatenate(
        [(((w - w.mean(1, keepdims=True)) / w.std(1, keepdims=True)) ** 4).mean(1) for w in rows]
    )
    ffn_rows = {"max_abs_over_std_median": float(np.median(peak)), "kurtosis_median": float(np.median(kurt))}
    print(
        f"FFN rows: median max|w|/std {ffn_rows['max_abs_over_std_median']:.2f}, kurtosis {ffn_rows['kurtosis_median']:.2f}"
    )
    return ffn_rows


def qat_runs(b: Bench, rec: Results) -> None:
    """Stage 3: every run of ``QAT_CONFIGS`` on the same token budget, measured into ``rec``."""
    args = b.args
    qat = dict(
        model_dir=str(b.pre_dir),
        steps=args.qat_steps,
        lr=args.qat_lr,
        warmup=max(args.qat_steps // 10, 1),
        layers="ffn",
        group_size=args.group_size,
        **common_config(args),
    )
    for name, extra in QAT_CONFIGS.items():
        out = args.work / "".join(c if c.isalnum() else "-" for c in name.lower())
        shutil.rmtree(out, ignore_errors=True)
        if extra.get("full_precision"):
            full_precision_run(b, name, {**qat, **extra}, rec)
        else:
            qat_run(b, name, out, {**qat, **extra}, extra, rec)
    rec.log_ppl["Baseline QAT (one model per width)"] = rec.baseline


def full_precision_run(b: Bench, name: str, cfg: dict, rec: Results) -> None:
    """Full precision trained on as many more tokens as each QAT run: the fair float reference."""
    from matq_train.run import train as train_qat
    from matq_train.torch.trainer import TrainConfig

    res = train_qat(TrainConfig(**cfg, backend=b.args.backend), train_blocks=b.data.train_blocks)
    rec.log_ppl[name] = {"fp": b.ev.run(res, None)}
    rec.runs[name] = {"tokens": res.steps_run * b.args.batch * b.args.seq_len}
    print(f"{name}: fp {rec.log_ppl[name]['fp']:.3f}")


def qat_run(b: Bench, name: str, out: Path, cfg: dict, extra: dict, rec: Results) -> None:
    """One QAT run (``cfg``, of which ``extra`` is its own part) exported to ``out``, checked against
    its trained weights, and evaluated at its width (a baseline) or at every width."""
    import matq_format as mf
    from matq_train.run import train as train_qat
    from matq_train.torch.trainer import TrainConfig

    args, ev = b.args, b.ev
    res = train_qat(TrainConfig(out=str(out), **cfg, backend=args.backend), train_blocks=b.data.train_blocks)
    ckpt = mf.open(out)
    # the exported checkpoint holds exactly the weights that were evaluated (spot check)
    lname, c = res.quantized[0], extra.get("baseline", 8)
    r0, ep0 = extra.get("baseline", 2), extra.get("extra_precision", False)
    assert np.array_equal(
        ckpt.dequantize(lname, r0, ep0 and r0 < 8), ev.trained_weight(res, lname, r0, ep0 and r0 < 8, c)
    )
    if "baseline" in extra:
        r = extra["baseline"]
        rec.baseline[f"int{r}"] = rec.log_ppl.setdefault(name, {})[f"int{r}"] = ev.run(res, r, code_bits=r)
        if r == 8:  # the paper's "sliced int8": the int8 QAT model served at every width
            rec.log_ppl["Sliced int8 QAT baseline"] = {f"int{w}": ev.run(res, w) for w in WIDTHS}
    else:
        ep = extra.get("extra_precision", False)
        rec.log_ppl[name] = {f"int{r}": ev.run(res, r, ep and r < 8) for r in WIDTHS}
        if ep:
            rec.runs[name] = {"bits_per_weight": bits_per_weight(out)}
    rec.runs.setdefault(name, {}).update(
        {
            "tokens": res.steps_run * args.batch * args.seq_len,
            "train_seconds": round(res.train_seconds, 1),
            "tokens_per_s": round(res.tokens_per_s, 1),
            "final_train_loss": res.history[-1]["widths"] if res.history else None,
        }
    )
    print(f"{name}: " + "  ".join(f"{k} {v:.3f}" for k, v in rec.log_ppl[name].items()))
    shutil.rmtree(f"{out}.ckpt", ignore_errors=True)


def paper_checks(results: dict, baseline_row: dict[str, float]) -> dict[str, bool]:
    """The orderings of the paper's Table 2 that this run should show."""
    return {
        "int2: MatQuant < baseline int2": results["MatQuant"]["int2"] < baseline_row["int2"],
        "int2: baseline int2 << sliced int8": baseline_row["int2"]
        < results["Sliced int8 (no training)"]["int2"],
        "int8: |MatQuant - baseline| < 0.05": abs(results["MatQuant"]["int8"] - baseline_row["int8"]) < 0.05,
        "int4: |MatQuant - baseline| < 0.05": abs(results["MatQuant"]["int4"] - baseline_row["int4"]) < 0.05,
        "int2: extra precision < MatQuant": results["MatQuant + extra precision"]["int2"]
        < results["MatQuant"]["int2"],
        "int2: co-distill < MatQuant": results["MatQuant + co-distill 8->2"]["int2"]
        < results["MatQuant"]["int2"],
        "int2: co-distill with labels < MatQuant": results["MatQuant + co-distill 8->2, with labels"]["int2"]
        < results["MatQuant"]["int2"],
        "int2: extra precision < MatQuant at the same lambdas": results["MatQuant + extra precision"]["int2"]
        < results["MatQuant, lambdas 1,1,1"]["int2"],
    }


def setup_record(args, data: Data, pre: Pretrained) -> dict:
    """What was run: corpus, model, quantization, token budgets, machine and arguments."""
    return {
        "corpus": str(args.corpus),
        "model": f"Llama {args.layers} layers x {args.hidden}, FFN {args.intermediate}, vocab {len(data.tokenizer)}",
        "title": f"MatQuant at small scale: Llama {args.layers}x{args.hidden}, Python docs",
        "parameters": pre.n_params,
        "quantized": "FFN (gate/up/down_proj), asymmetric MinMax, "
        + ("per channel" if args.group_size is None else f"groups of {args.group_size}")
        + ", F16 scales rounded up, U8 zero points",
        "pretrain_tokens": args.pretrain_steps * args.batch * args.seq_len,
        "qat_tokens_each": args.qat_steps * args.batch * args.seq_len,
        "eval_tokens": data.n_eval * args.seq_len,
        "threads": args.threads,
        "backend": args.backend,
        "machine": platform.processor() or platform.machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }


def print_summary(args, report: dict) -> None:
    """The table, extra precision's bits per weight, training speed and the checks, as text."""
    results = report["log_ppl"]
    fp_loss, fp_more = report["full_precision_log_ppl"], report["full_precision_same_extra_tokens_log_ppl"]
    ep_bpw = report["runs"]["MatQuant + extra precision"]["bits_per_weight"]
    rates = report["speed_tokens_per_s"]["interleaved"]
    print(
        f"\nheld-out log perplexity (nats/token), FFN weights quantized; full precision {fp_loss:.3f} "
        f"(pretrained), {fp_more:.3f} (trained on as long as each QAT run)\n"
    )
    print(table(results, METHODS))
    print(
        "\nextra precision, bits per weight: "
        + ", ".join(
            f"{k} {v['codes']:.3f} ({v['extra_share']:.2%} in the extra bucket; {v['total']:.3f} with scales)"
            for k, v in ep_bpw.items()
        )
    )
    fpr = rates["full precision"]
    print(
        "\ntraining speed, tokens/s (interleaved, median): "
        + ", ".join(f"{k} {v:.0f} ({v / fpr:.2f}x)" for k, v in rates.items())
    )
    print("\nchecks: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in report["checks"].items()))
    print(f"\nwall time {report['wall_seconds'] / 60:.1f} min; results {args.json}; plot {args.plot}")


def main() -> None:
    args = parse_args()
    if args.replot:
        replot(args)
        return
    quiet_libraries(args.threads)
    t_start = time.perf_counter()
    init_dir, pre_dir = args.work / "init", args.work / "pretrained"
    reuse = args.reuse_pretrained and (pre_dir / "config.json").exists()
    if not reuse:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    data = load_data(args, reuse, pre_dir)
    b = Bench(args, data, Evaluator(args, data), pre_dir)
    pre = pretrain(b, reuse, init_dir)
    rec = Results()
    ffn_off, ffn_rows = train_free(b, pre, rec)
    qat_runs(b, rec)
    rates = speed(pre_dir, data.train_blocks, args)  # stage 4: speed, interleaved
    fp_more = rec.log_ppl["Full precision, same extra tokens"]["fp"]
    report = {
        "setup": setup_record(args, data, pre),
        "full_precision_log_ppl": pre.loss,
        "full_precision_same_extra_tokens_log_ppl": fp_more,
        "pretrained_without_ffn_log_ppl": ffn_off,
        "pretrained_ffn_rows": ffn_rows,
        "log_ppl": rec.log_ppl,
        "runs": rec.runs,
        "speed_tokens_per_s": {
            "pretraining (full precision)": round(pre.tokens_per_s, 1),
            "interleaved": rates,
        },
        "checks": paper_checks(rec.log_ppl, rec.baseline),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    plot(rec.log_ppl, (pre.loss, fp_more), args.plot, report["setup"]["title"])
    print_summary(args, report)


if __name__ == "__main__":
    main()
