"""The torch trainer on every family of ``tiny_models.FAMILIES`` (issue 22 item 6), dense and mixtures
of experts: two MatQuant steps with ``--layers linear``; the loss is finite and the weights move;
routers stay float and experts are quantized (transformers 5's fused expert parameters, fake-quantized
as stacks with groups along their inputs, spec 10.5); the checkpoint holds exactly the fake-quantized
weights under the names transformers saves; and transformers runs its ``--to hf`` export bit for bit
like the trained model at that width. Each family's cell of the families x targets table must be the
committed one (tests/family_table.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from family_table import record  # noqa: E402
from tiny_models import FAMILIES, corpus, family_model, small  # noqa: E402
from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

import matq_format as mf  # noqa: E402
from matq_cli.main import cli  # noqa: E402
from matq_converters import roles as R  # noqa: E402
from matq_train.torch.fakequant import FakeQuantParam, fake_quant_layers, width  # noqa: E402
from matq_train.torch.trainer import TrainConfig, load_model, train  # noqa: E402

WIDTHS = (8, 4, 2)
MOE = {f for f, fam in FAMILIES.items() if fam.model_type in ("mixtral", "qwen3_moe", "gpt_oss")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    for i, t in enumerate(corpus()[:40]):
        (folder / f"doc{i:02d}.txt").write_text(t)
    return folder


def _fake(layer, bits: int) -> torch.Tensor:
    """A fake-quantized weight at ``bits`` in its parameter's own shape."""
    if isinstance(layer, FakeQuantParam):
        return layer.fake_param(bits).detach()
    return layer.fake_weight(bits).detach()


@pytest.mark.parametrize("family", list(FAMILIES), ids=[re.sub(r"\W", "", f) for f in FAMILIES])
def test_trainer_takes_the_family(family, data, tmp_path):
    src = family_model(family, tmp_path / "src", **small(family))
    cfg = TrainConfig(model_dir=str(src), data=[str(data)], out=str(tmp_path / "ck"), steps=2, batch_size=2,
                      seq_len=16, lr=1e-3, log_every=1, threads=1, layers="linear", bits=(8, 2), group_size=16,
                      device="cpu")
    res = train(cfg)
    model = res.model.eval()
    layers = dict(fake_quant_layers(model))
    assert all(np.isfinite(h["loss"]) for h in res.history)
    before = dict(load_model(src)[0].named_parameters())
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in layers), "a quantized weight did not move"

    arch = R.detect(model.config.to_dict())
    roles = {arch.role(n) for n in layers}
    assert roles == {"ffn", "attention"}, roles
    stacks = [n for n, m in layers.items() if isinstance(m, FakeQuantParam)]
    assert bool(stacks) == (family in MOE)  # transformers 5 holds every mixture's experts fused
    ck = mf.open(res.out)
    ck.verify()
    routers = [n for n in ck.tensor_names() if R.detect(ck.config).role(n) == "router"]
    assert bool(routers) == (family in MOE)
    assert not any(ck.info(n).quantized for n in routers), "a router was quantized"
    if family in MOE:
        assert any("experts" in n for n in ck.quantized_names()), "experts not quantized"

    # the checkpoint holds the fake-quantized weights, bit for bit, under transformers' saved names
    for bits in WIDTHS:
        want = revert_weight_conversion(model, {n: _fake(m, bits) for n, m in layers.items()})
        assert sorted(want) == sorted(ck.quantized_names())
        for n, w in want.items():
            assert np.array_equal(ck.dequantize(n, bits), w.numpy()), (n, bits)

    # transformers loads the --to hf export and runs it exactly as the trained model at int4
    r = CliRunner().invoke(cli, ["convert", str(res.out), "--to", "hf", "--bits", "4", "--layout", "dense",
                                 "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    auto = tf.AutoModelForMaskedLM if family == "BERT" else tf.AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), width(model, 4):
        want_logits = model(input_ids=ids).logits
    with torch.no_grad():
        got_logits = loaded(input_ids=ids).logits
    exact = torch.equal(got_logits, want_logits)
    stacked = f" ({len(stacks)} expert stacks)" if stacks else ""
    record(family, "trainer", f"{cfg.steps} steps, {len(layers)} weights{stacked}; int4 `--to hf` "
           f"{'runs as trained, bit for bit' if exact else 'DIFFERS from the trained model'}")
    assert exact, re.sub(r"\s+", " ", str((got_logits - want_logits).abs().max()))


def test_fused_experts_take_learned_clipping_and_checkpointing(data, tmp_path):
    """Learned clipping on expert stacks (its parameters trained, folded into the stored scales, not
    exported) and gradient checkpointing (the layer recomputed at the width) on Mixtral."""
    src = family_model("Mixtral", tmp_path / "src", **small("Mixtral"))
    cfg = TrainConfig(model_dir=str(src), data=[str(data)], out=str(tmp_path / "ck"), steps=2, batch_size=2,
                      seq_len=16, lr=1e-3, log_every=1, threads=1, layers="ffn", bits=(8, 2), clip="learned",
                      extra_precision=True, grad_checkpointing=True, device="cpu")
    res = train(cfg)
    model = res.model.eval()
    layers = dict(fake_quant_layers(model))
    stacks = {n: m for n, m in layers.items() if isinstance(m, FakeQuantParam)}
    assert stacks and all(not torch.all(m.clip_gamma == m.clip_gamma.flatten()[0]) for m in stacks.values())
    ck = mf.open(res.out)
    assert not any("clip_" in n or "matq_" in n for n in ck.tensor_names())
    for bits in (8, 4, 2):
        want = revert_weight_conversion(model, {n: m.fake_param(bits, True).detach() for n, m in stacks.items()})
        for n, w in want.items():
            assert ck.info(n).extra_precision == (2, 3, 4, 6)
            assert np.array_equal(ck.dequantize(n, bits, bits < 8), w.numpy()), (n, bits)


def test_training_page_lists_each_backends_families():
    """docs/training.md's family line is what the code and this test say, so it cannot drift."""
    from matq_train.config import BACKEND_FAMILIES

    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    bullet = re.search(r"^- \*\*Families\.\*\* (.*?)(?=^- )", page, re.S | re.M)
    assert bullet, "docs/training.md has no Families bullet"
    want = (
        f"torch: {BACKEND_FAMILIES['torch']}; tested on {', '.join(FAMILIES)} (`tests/test_train_families.py`). "
        f"jax: {BACKEND_FAMILIES['jax']} (model types; any other is refused in one line that lists these, "
        "as `matq train --help` does)."
    )
    assert " ".join(bullet.group(1).split()) == want
