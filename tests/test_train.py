"""The MatQuant trainer: fake quantization bit-exact with numerics, the objective, training, resume, export, CLI.

Models are tiny Llama / BERT configs with tokenizers trained here on the standard library's own
docstrings (real English, present wherever Python is).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from matq_format.publish import OutputExistsError, OutputOverlapError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from tiny_models import build, config, small_bpe  # noqa: E402

import matq_format as mf  # noqa: E402
from matq_format import numerics as N  # noqa: E402
from matq_format.errors import MatqError  # noqa: E402
from matq_train.objective import Objective, ObjectiveError, parse_distill  # noqa: E402
from matq_train.torch.fakequant import (  # noqa: E402
    FakeQuantLinear,
    QuantSpec,
    QuantSpecError,
    SliceSTE,
    fake_quant_layers,
    prepare,
)
from matq_train.torch.trainer import (  # noqa: E402
    CheckpointMismatchError,
    TrainConfig,
    latest_checkpoint,
    train,
)

WIDTHS = (8, 6, 4, 3, 2)


# --- tiny models ---------------------------------------------------------------------------------
def corpus_texts() -> list[str]:
    """Real English prose available offline everywhere: docstrings of standard-library modules."""
    import argparse
    import collections
    import email
    import json as json_mod
    import logging
    import os
    import pathlib
    import re
    import subprocess
    import textwrap
    import unittest

    mods = [argparse, collections, email, json_mod, logging, os, pathlib, re, subprocess, textwrap, unittest]
    texts = [m.__doc__ for m in mods if m.__doc__]
    for m in mods:
        for name in sorted(dir(m))[:40]:
            doc = getattr(getattr(m, name, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                texts.append(doc)
    return texts


def make_model_dir(root: Path, masked: bool = False) -> Path:
    """A tiny Llama (or BERT masked LM) with its tokenizer, saved as a Hugging Face folder."""
    texts = corpus_texts()
    tok = small_bpe(texts, masked)
    if masked:
        cfg = config(
            "bert",
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
        )
    else:
        cfg = config(
            "llama",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    out = build(cfg, root / ("bert" if masked else "llama"), tokenizer=tok)
    data = root / "data"
    data.mkdir(exist_ok=True)
    for i, t in enumerate(texts):
        (data / f"doc{i:03d}.txt").write_text(t)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("llama"))


def cfg_for(model_dir: Path, out: Path | None, **kw) -> TrainConfig:
    base = dict(
        model_dir=str(model_dir),
        data=[str(model_dir.parent / "data")],
        out=str(out) if out else None,
        steps=3,
        batch_size=4,
        seq_len=16,
        lr=1e-3,
        log_every=1,
        threads=1,
    )
    return TrainConfig(**{**base, **kw})


# --- fake quantization against numerics ----------------------------------------------------------
def test_slice_ste_matches_numerics_for_every_code():
    q = np.arange(256, dtype=np.uint8).reshape(16, 16)
    qt = torch.from_numpy(q.astype(np.float32))
    for r in range(1, 9):
        for ep in (False, True):
            if ep and r == 8:
                continue
            got = SliceSTE.apply(qt, 8, r, ep).numpy()
            want = N.slice_codes_c_scale(q, 8, r, ep).astype(np.float32)
            assert np.array_equal(got, want), (r, ep)


@pytest.mark.parametrize("group_size", [None, 16, 24])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("code_bits", [8, 4])
def test_minmax_fake_weight_equals_numerics_dequantize(group_size, scheme, code_bits):
    rng = np.random.default_rng(code_bits + (group_size or 0))
    w = (rng.standard_normal((12, 40)) * rng.uniform(0.001, 0.2, (12, 1))).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale falls back to 1
    w[5, :7] = np.abs(w[5, :7])  # rows with one sign in some groups
    lin = torch.nn.Linear(40, 12, bias=False)
    lin.weight.data = torch.from_numpy(w.copy())
    layer = FakeQuantLinear(lin, QuantSpec(code_bits, group_size, scheme=scheme))
    a, z = N.minmax_params(w, code_bits, group_size, symmetric=scheme == "symmetric")
    q = N.quantize(w, a, z, code_bits, group_size)
    codes, sa, sz = layer.export_params()
    assert np.array_equal(codes, q) and np.array_equal(sa, a) and np.array_equal(sz, z)
    for r in range(2, code_bits + 1):
        for ep in (False, True) if r < code_bits else (False,):
            got = layer.fake_weight(r, ep).detach().numpy()
            assert np.array_equal(got, N.dequantize(q, a, z, code_bits, r, group_size, ep)), (r, ep)


def test_straight_through_gradient_is_identity_and_reaches_clipping():
    lin = torch.nn.Linear(32, 8, bias=False)
    layer = FakeQuantLinear(lin, QuantSpec(8, None, "minmax"))
    layer.fake_weight(2).sum().backward()
    assert torch.allclose(lin.weight.grad, torch.ones_like(lin.weight), rtol=1e-5)
    lin2 = torch.nn.Linear(32, 8, bias=False)
    learned = FakeQuantLinear(lin2, QuantSpec(8, 16, "learned"))
    (learned.fake_weight(4) ** 2).sum().backward()
    assert learned.clip_gamma.grad is not None and learned.clip_gamma.grad.abs().sum() > 0
    assert learned.clip_beta.grad is not None and learned.clip_beta.grad.abs().sum() > 0
    assert lin2.weight.grad.abs().sum() > 0


def test_learned_clipping_shrinks_the_range_and_stays_storable():
    lin = torch.nn.Linear(64, 4, bias=False)
    layer = FakeQuantLinear(lin, QuantSpec(8, 32, "learned"))
    codes, scale, zero = layer.export_params()
    a_mm, _ = N.minmax_params(lin.weight.detach().numpy(), 8, 32)
    assert np.all(scale <= a_mm)  # sigmoid(4) < 1 clips the range
    assert np.array_equal(scale, N.round_scale(scale, "F16"))
    assert np.array_equal(zero, np.rint(zero)) and zero.min() >= 0 and zero.max() <= 255
    assert np.array_equal(layer.fake_weight(3).detach().numpy(), N.dequantize(codes, scale, zero, 8, 3, 32))


def test_spec_and_objective_errors():
    with pytest.raises(QuantSpecError):
        QuantSpec(9)
    with pytest.raises(QuantSpecError):
        QuantSpec(8, clip="omni")
    assert parse_distill("8->2, 8->4") == {2: 8, 4: 8}
    for bad in ("2->8", "8-2", "8->2,4->2"):
        with pytest.raises(ObjectiveError):
            parse_distill(bad)
    with pytest.raises(ObjectiveError):
        Objective.build("8,4,2", "1,1")
    with pytest.raises(ObjectiveError):
        Objective.build("8,4", None, "8->2")
    obj = Objective.build("2,8,4", "1,0.1,0.2")  # lambdas follow --bits order
    assert obj.bits == (8, 4, 2) and obj.lambdas == (0.1, 0.2, 1.0)
    with pytest.raises(ObjectiveError):
        Objective.build("8,4,2", None, None, distill_labels=True)


def test_objective_terms(llama_dir):
    """Eq. 7 term by term: ground truth per width; 8->2 replaces int2's target; with labels, adds to it."""
    from transformers import AutoModelForCausalLM

    from matq_train.torch.fakequant import width
    from matq_train.torch.loss import MatQuantStep, token_nll

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    prepare(model, "ffn", QuantSpec())
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        logits = {}
        for r in (8, 4, 2):
            with width(model, r):
                logits[r] = model(input_ids=ids).logits
        nll = {r: token_nll(logits[r], ids, True)[0].item() for r in logits}
        n = ids[:, 1:].numel()
        t = torch.log_softmax(logits[8][:, :-1].float(), -1)
        s = torch.log_softmax(logits[2][:, :-1].float(), -1)
        kl = (t.exp() * (t - s)).sum().item()
        assert kl > 0
        lam = (0.1, 0.2, 1.0)
        want = {
            "plain": (lam[0] * nll[8] + lam[1] * nll[4] + lam[2] * nll[2]) / n,
            "distill": (lam[0] * nll[8] + lam[1] * nll[4] + lam[2] * kl) / n,
            "labels": (lam[0] * nll[8] + lam[1] * nll[4] + lam[2] * (kl + nll[2])) / n,
        }
        objectives = {
            "plain": Objective.build("8,4,2", lam),
            "distill": Objective.build("8,4,2", lam, "8->2"),
            "labels": Objective.build("8,4,2", lam, "8->2", distill_labels=True),
        }
        for key, obj in objectives.items():
            total, per = MatQuantStep(model, obj)(ids, ids)
            assert total.item() == pytest.approx(want[key], rel=1e-5), key
            assert per.tolist() == pytest.approx([nll[r] / n for r in (8, 4, 2)], rel=1e-5)


def test_prepare_selects_ffn_and_refuses_nothing(llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    names = prepare(model, "ffn", QuantSpec())
    assert len(names) == 6 and all(".mlp." in n for n in names)
    assert set(names) == {n for n, _ in fake_quant_layers(model)}
    assert set(model.state_dict()) >= set(names)  # Hugging Face names unchanged
    with pytest.raises(MatqError):  # the shared role table's LayerPatternError, or LayerSelectionError
        prepare(AutoModelForCausalLM.from_pretrained(llama_dir), r"no_such_layer\.weight$", QuantSpec())


# --- training and export --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=(8, 4, 2), lambdas=(0.1, 0.1, 1.0), distill="8->2", group_size=16),
        dict(bits=(8, 4, 2), extra_precision=True, clip="learned", layers="linear"),
        dict(baseline=2),
    ],
    ids=["matquant-distill-group", "extra-precision-learned-linear", "baseline-int2"],
)
def test_export_equals_fake_quantized_weights_exactly(llama_dir, tmp_path, kw):
    res = train(cfg_for(llama_dir, tmp_path / "out", **kw))
    ckpt = mf.open(res.out)
    ckpt.verify()
    layers = dict(fake_quant_layers(res.model))
    assert sorted(ckpt.quantized_names()) == sorted(layers) == sorted(res.quantized)
    c = ckpt.code_bits
    assert c == kw.get("baseline", 8)
    for name, layer in layers.items():
        for r in [w for w in WIDTHS if w <= c]:
            for ep in (False, True) if r < c else (False,):
                want = layer.fake_weight(r, ep).detach().numpy()
                assert np.array_equal(ckpt.dequantize(name, r, ep), want), (name, r, ep)  # zero tolerance
        assert ckpt.info(name).extra_precision == ((2, 3, 4, 6) if kw.get("extra_precision") else ())
    state = res.model.state_dict()
    for name in ckpt.tensor_names():
        if name not in layers:
            assert np.array_equal(ckpt.dequantize(name), state[name].numpy())
    assert not any("clip_" in n for n in ckpt.tensor_names())
    assert {"config.json", "tokenizer.json"} <= set(ckpt.carried_files())
    assert json.loads((res.out / "config.json").read_text())["model_type"] == "llama"
    assert ckpt.source["objective"]["bits"] == [kw.get("baseline")] if "baseline" in kw else True
    hist = res.history
    assert len(hist) == 3 and all(np.isfinite(v) for h in hist for v in h["widths"].values())
    assert list(hist[0]["widths"]) == [
        f"int{r}" for r in ((kw["baseline"],) if "baseline" in kw else (8, 4, 2))
    ]


def test_training_lowers_the_loss(llama_dir, tmp_path):
    res = train(cfg_for(llama_dir, tmp_path / "o", steps=12, lr=3e-3, log_every=4, batch_size=8))
    first, last = res.history[0]["widths"], res.history[-1]["widths"]
    assert all(last[k] < first[k] for k in first)


class Interrupted(Exception):
    pass


def _stop_at(n: int):
    def on_step(done: int) -> None:
        if done == n:
            raise Interrupted

    return on_step


def test_resume_continues_exactly(llama_dir, tmp_path):
    kw = dict(bits=(8, 2), clip="learned", save_every=2, steps=4)
    straight = train(cfg_for(llama_dir, None, checkpoint_dir=str(tmp_path / "a"), **kw))
    with pytest.raises(Interrupted):  # killed after step 3; the step-2 checkpoint survives
        train(cfg_for(llama_dir, None, checkpoint_dir=str(tmp_path / "b"), **kw), on_step=_stop_at(3))
    assert latest_checkpoint(tmp_path / "b").name == "step-2"
    resumed = train(cfg_for(llama_dir, None, checkpoint_dir=str(tmp_path / "b"), resume=True, **kw))
    assert resumed.steps_run == 2 and latest_checkpoint(tmp_path / "b").name == "step-4"
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["widths"] for h in resumed.history] == [h["widths"] for h in straight.history[2:]]
    with pytest.raises(CheckpointMismatchError, match="lr"):
        train(
            cfg_for(
                llama_dir,
                None,
                checkpoint_dir=str(tmp_path / "b"),
                resume=True,
                **{**kw, "steps": 5},
                lr=5e-3,
            )
        )


def test_masked_lm_trains_and_exports(tmp_path):
    bert = make_model_dir(tmp_path, masked=True)
    res = train(cfg_for(bert, tmp_path / "out", bits=(8, 4), layers="ffn"))
    ckpt = mf.open(res.out)
    names = ckpt.quantized_names()
    assert names and all(
        ("intermediate" in n or ".output.dense" in n) and "attention" not in n for n in names
    )
    layer = dict(fake_quant_layers(res.model))[names[0]]
    assert np.array_equal(ckpt.dequantize(names[0], 4), layer.fake_weight(4).detach().numpy())


def test_existing_output_and_bad_batch_refused(llama_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        train(cfg_for(llama_dir, tmp_path / "taken"))
    with pytest.raises(OutputOverlapError, match="inside the input"):
        train(cfg_for(llama_dir, llama_dir / "out"))
    assert not (llama_dir / "out").exists()


OOM_SCRIPT = """
import resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_train import cfg_for
from matq_train.run import train
limit = 4 << 30  # address space: malloc fails past it, as on a full host without overcommit
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
train(cfg_for(Path(sys.argv[1]), Path(sys.argv[2]), batch_size=1 << 16, steps=1))
"""


def test_step_that_does_not_fit_is_one_line_and_writes_nothing(llama_dir, tmp_path):
    """65536 x 16 tokens under a 4 GiB address-space limit: torch's CPU allocator fails (a plain
    RuntimeError), which the trainer raises as a one-line ``OutOfMemoryError``; no output folder."""
    import subprocess
    import sys

    out = tmp_path / "o"
    r = subprocess.run(
        [sys.executable, "-c", OOM_SCRIPT, str(llama_dir), str(out), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("matq_train.config.OutOfMemoryError: a step of 65536 x 16 tokens")
    assert "does not fit in cpu memory" in last
    assert not out.exists()


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_train_logs_each_width_and_writes_checkpoint(llama_dir, tmp_path):
    from matq_cli.main import cli

    out = tmp_path / "cli-out"
    args = [
        "train",
        str(llama_dir),
        "--data",
        str(llama_dir.parent / "data"),
        "--bits",
        "8,4,2",
        "--lambdas",
        "0.1,0.1,1",
        "--distill",
        "8->2",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--log-every",
        "1",
        "--group-size",
        "16",
        "--threads",
        "1",
        "-o",
        str(out),
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "step 2/2" in r.output and "int8" in r.output and "int2" in r.output
    assert mf.open(out).code_bits == 8
    r = CliRunner().invoke(cli, args)  # OUT exists now
    assert r.exit_code == 1 and "already exists" in r.output
    bad = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "x"), "--distill", "2->8"])
    assert bad.exit_code == 1 and bad.output.startswith("matq: ") and "teacher" in bad.output
    assert "Examples:" in CliRunner().invoke(cli, ["train", "--help"]).output
