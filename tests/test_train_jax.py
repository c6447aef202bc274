"""The JAX backend: fake quantization bit-exact with numerics, its Llama against transformers, agreement
with the torch backend, export, resume, a 4-device mesh against one device, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from test_train import cfg_for, make_model_dir  # noqa: E402

import matq_format as mf  # noqa: E402
from matq_format import numerics as N  # noqa: E402
from matq_train.config import TrainConfigError  # noqa: E402
from matq_train.jax import fakequant as jfq  # noqa: E402
from matq_train.jax.llama import UnsupportedModelError  # noqa: E402
from matq_train.run import train  # noqa: E402
from matq_train.spec import QuantSpec  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("jax-llama"))


@pytest.mark.parametrize("group_size", [None, 16, 20])
def test_jax_fake_weights_equal_numerics(group_size):
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((12, 56)) * rng.uniform(1e-3, 1, (12, 1))).astype(np.float32)
    w[0] = 0.0
    spec = QuantSpec(8, group_size)
    q, a, z = jfq.quantize_host(w, spec)
    for r in (8, 6, 4, 3, 2, 1):
        for ep in (False, True) if r < 8 else (False,):
            got = np.asarray(jfq.fake_weight(jnp.asarray(w), (q, a, z), spec, r, ep))
            assert np.array_equal(got, N.dequantize(q, a, z, 8, r, group_size, ep)), (r, ep)
    g = jnp.asarray(rng.standard_normal(w.shape).astype(np.float32))
    grad = jax.grad(lambda x: (jfq.fake_weight(x, (q, a, z), spec, 2) * g).sum())(jnp.asarray(w))
    assert np.array_equal(np.asarray(grad), np.asarray(g))  # straight through, exactly


def test_llama_logits_match_transformers(llama_dir):
    """matq's JAX Llama against transformers' float32 LlamaForCausalLM on the same weights and tokens."""
    from transformers import AutoModelForCausalLM

    from matq_train.jax.llama import LlamaConfig, forward, load_params

    raw, params = load_params(llama_dir)
    ids = np.random.default_rng(0).integers(0, raw["vocab_size"], (2, 24)).astype(np.int32)
    got = np.asarray(
        forward({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(ids), LlamaConfig.from_dict(raw))
    )
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)(
            torch.from_numpy(ids).long()
        ).logits
    want = want.numpy()
    # measured: max |diff| 8.9e-8 on logits up to 0.43 (float32 rounding of a different op order)
    assert np.abs(got - want).max() < 1e-6 * max(1.0, np.abs(want).max())


def test_backends_agree(llama_dir, tmp_path):
    """Same initial weights and batches: first-step loss per width to float32 rounding, initial fake-quantized
    weights bit for bit, and loss curves over 50 steps within 0.5% (measured: first step 6e-8 relative,
    at most 4.7e-4 over the 50 steps)."""
    from matq_train.torch.fakequant import fake_quant_layers, prepare
    from matq_train.torch.trainer import load_model

    kw = dict(bits=(8, 4, 2), lambdas=(0.2, 0.2, 1.0), distill="8->2", distill_labels=True, group_size=16)
    kw.update(layers="linear", steps=50, lr=1e-3, log_every=1)
    t = train(cfg_for(llama_dir, None, **kw))
    j = train(cfg_for(llama_dir, None, backend="jax", **kw))
    first_t, first_j = t.history[0]["widths"], j.history[0]["widths"]
    assert first_j == pytest.approx(first_t, rel=2e-5)
    for ht, hj in zip(t.history, j.history, strict=True):
        assert hj["loss"] == pytest.approx(ht["loss"], rel=5e-3), ht["step"]
    model, _, _ = load_model(llama_dir)
    prepare(model, "linear", QuantSpec(8, 16))
    from matq_train.jax.llama import load_params

    _, params = load_params(llama_dir)
    for name, layer in fake_quant_layers(model):
        codes = jfq.quantize_host(params[name], QuantSpec(8, 16))
        for r in (8, 4, 2):
            assert np.array_equal(
                np.asarray(jfq.dequantize(codes, QuantSpec(8, 16), r)), layer.fake_weight(r).detach().numpy()
            )


def test_jax_export_equals_fake_weights(llama_dir, tmp_path):
    res = train(cfg_for(llama_dir, tmp_path / "out", backend="jax", extra_precision=True, group_size=16))
    ckpt = mf.open(res.out)
    ckpt.verify()
    assert sorted(ckpt.quantized_names()) == sorted(res.quantized)
    spec = QuantSpec(8, 16)
    for name in res.quantized:
        for r in (8, 6, 4, 3, 2):
            for ep in (False, True) if r < 8 else (False,):
                want = np.asarray(jfq.dequantize(res.codes[name], spec, r, ep))
                assert np.array_equal(ckpt.dequantize(name, r, ep), want), (name, r, ep)  # zero tolerance
    for name in ckpt.tensor_names():
        if name not in res.quantized:
            assert np.array_equal(ckpt.dequantize(name), res.params[name])
    assert {"config.json", "tokenizer.json"} <= set(ckpt.carried_files())
    assert ckpt.source["backend"] == "jax"


def test_jax_resume_continues_exactly(llama_dir, tmp_path):
    kw = dict(backend="jax", bits=(8, 2), save_every=2, steps=4)
    straight = train(cfg_for(llama_dir, None, checkpoint_dir=str(tmp_path / "a"), **kw))

    class Stop(Exception):
        pass

    def stop(done):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        train(cfg_for(llama_dir, None, checkpoint_dir=str(tmp_path / "b"), **kw), on_step=stop)
    resumed = train(cfg_for(llama_dir, None, checkpoint_dir=str(tmp_path / "b"), resume=True, **kw))
    assert resumed.steps_run == 2
    for k, v in straight.params.items():
        assert np.array_equal(resumed.params[k], v), k


def test_jax_refusals_write_nothing(llama_dir, tmp_path):
    out = tmp_path / "o"
    for bad, match in (
        (dict(clip="learned"), "--clip learned"),
        (dict(precision="bf16"), "bf16"),
        (dict(device="cuda"), "--device"),
        (dict(mesh=64), "--mesh 64"),
    ):
        with pytest.raises(TrainConfigError, match=match) as err:
            train(cfg_for(llama_dir, out, backend="jax", **bad))
        assert "\n" not in str(err.value)
    bert = make_model_dir(tmp_path, masked=True)
    with pytest.raises(UnsupportedModelError, match="model type 'bert'"):
        train(cfg_for(bert, out, backend="jax"))
    assert not out.exists()


MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[3])
    from test_train import cfg_for
    from pathlib import Path
    from matq_train.run import train
    import jax
    assert len(jax.devices()) == 4, jax.devices()
    kw = dict(backend="jax", steps=3, batch_size=8, group_size=16, distill="8->2")
    one = train(cfg_for(Path(sys.argv[1]), None, mesh=1, **kw))
    four = train(cfg_for(Path(sys.argv[1]), None, mesh=4, **kw))
    diff = max(float(np.abs(one.params[k] - four.params[k]).max()) for k in one.params)
    json.dump({"diff": diff, "one": one.history[-1]["widths"], "four": four.history[-1]["widths"]},
              open(sys.argv[2], "w"))
    """
)


def test_mesh_of_four_devices_trains_the_same_model_as_one(llama_dir, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "mesh.json"
    tests = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(llama_dir), str(out), tests], env=env, check=True)
    res = json.loads(out.read_text())
    assert res["diff"] < 1e-5  # the same global batch; only the order of the gradient sums differs
    assert res["four"] == pytest.approx(res["one"], rel=1e-5)


def test_cli_jax_backend(llama_dir, tmp_path):
    from click.testing import CliRunner

    from matq_cli.main import cli

    out = tmp_path / "cli-jax"
    args = ["train", str(llama_dir), "--data", str(llama_dir.parent / "data"), "--backend", "jax"]
    args += ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--log-every", "1", "-o", str(out)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "step 2/2" in r.output and mf.open(out).code_bits == 8
    bad = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "x"), "--clip", "learned"])
    assert bad.exit_code == 1 and bad.output.startswith("matq: ") and "--clip learned" in bad.output
