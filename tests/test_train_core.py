"""The trainer's framework-neutral core, and the torch backend's device numerics and per-width steps.

The core (spec, objective, config, data, export records) must import neither torch nor jax; the
torch quantization operations must equal ``matq_format.numerics`` bit for bit, edge cases included;
a step that runs each width's backward in turn must give the gradients of the one-graph objective.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from matq_format import numerics as N
from matq_format.quantspec import OptionError
from matq_train.config import TrainConfig, TrainConfigError
from matq_train.objective import Objective
from matq_train.spec import QuantSpec, QuantSpecError


def test_core_imports_no_framework():
    code = (
        "import sys, matq_train, matq_train.spec, matq_train.objective, matq_train.config, "
        "matq_train.data, matq_train.export, matq_train.run\n"
        "bad = [m for m in ('torch', 'jax', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_checks_are_quantize_spec_checks():
    for bad in (dict(code_bits=9), dict(group_size=0), dict(scale_dtype="F8"), dict(scheme="odd")):
        with pytest.raises(QuantSpecError) as err:
            QuantSpec(**bad)
        assert isinstance(err.value, OptionError)  # one set of checks, one error family
    with pytest.raises(QuantSpecError, match="clip"):
        QuantSpec(clip="omni")
    opts = QuantSpec(8, 32, scheme="symmetric").entry_options(extra_precision=True)
    assert (
        opts["group_size"] == 32
        and opts["scheme"] == "symmetric"
        and sorted(opts["extra_precision"]) == [2, 3, 4, 6]
    )


def test_objective_terms_order_teachers_first():
    t = Objective.build("8,4,2", "0.1,0.1,1", "8->2").terms()
    assert [(x.bits, x.teacher, x.labels, x.keep) for x in t] == [
        (8, None, True, True),
        (4, None, True, False),
        (2, 8, False, False),
    ]
    assert Objective((), ()).terms()[0].bits is None


def test_config_checks_before_loading(tmp_path):
    base = dict(model_dir=str(tmp_path / "m"), data=[str(tmp_path / "d")])
    for bad, match in ((dict(backend="tf"), "backend"), (dict(precision="fp8"), "precision")):
        with pytest.raises(TrainConfigError, match=match):
            TrainConfig(**base, **bad).check()
    with pytest.raises(TrainConfigError, match="divisible"):
        TrainConfig(**base, batch_size=3).check(world=2)


# --- torch numerics ---------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def _weights(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((16, 72)) * rng.uniform(1e-4, 3.0, (16, 1))).astype(np.float32)
    w[0] = 0.0  # zero row: scale 1
    w[1] = np.abs(w[1])  # one sign
    w[2] = -np.abs(w[2])
    w[3, :] = 1.0
    w[3, 5] = -1e-6  # rint gives z = 0 with a tiny negative side: the floor/ceil fallback
    w[4, :] = -1.0
    w[4, 7] = 1e-6
    return w


@pytest.mark.parametrize("scale_dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("group_size", [None, 16, 20, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_torch_minmax_and_codes_equal_numerics(scale_dtype, group_size, symmetric):
    from matq_train.torch import qops

    w = _weights(7 + (group_size or 0))
    a, z = N.minmax_params(w, 8, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    ta, tz = qops.minmax_params(
        torch.from_numpy(w), 8, group_size, symmetric=symmetric, scale_dtype=scale_dtype
    )
    assert np.array_equal(ta.numpy(), a) and np.array_equal(tz.numpy(), z)
    q = N.quantize(w, a, z, 8, group_size)
    tq = qops.quantize(torch.from_numpy(w), ta, tz, 8, group_size)
    assert np.array_equal(tq.numpy(), q)
    for r in (8, 6, 4, 3, 2, 1):
        for ep in (False, True) if r < 8 else (False,):
            got = qops.dequantize(tq, ta, tz, 8, r, group_size, ep).numpy()
            assert np.array_equal(got, N.dequantize(q, a, z, 8, r, group_size, ep)), (r, ep)


def test_torch_stack_views_equal_numerics():
    """A stack of matrices seen as one matrix (spec 10.5), inputs on either of the last two axes."""
    torch = pytest.importorskip("torch")
    from matq_train.torch import qops

    w = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    for axis in (1, 2, -1):
        m = qops.as_matrix(torch.from_numpy(w), axis)
        assert np.array_equal(m.numpy(), N.as_matrix(w, axis))
        assert np.array_equal(qops.from_matrix(m, w.shape, axis).numpy(), N.from_matrix(N.as_matrix(w, axis), w.shape, axis))


def test_torch_round_scale_equals_numerics():
    from matq_train.torch import qops

    rng = np.random.default_rng(3)
    x = np.concatenate(
        [np.exp(rng.uniform(-20, 10, 4000)), [1.0, 2.0**-14, 2.0**-24, 65504.0, 1e-8, 3.0e38]]
    ).astype(np.float32)
    for dtype in ("F16", "BF16", "F32"):
        ok = x if dtype != "F16" else x[x <= 65504]
        assert np.array_equal(qops.round_scale(torch.from_numpy(ok), dtype).numpy(), N.round_scale(ok, dtype))


def test_minmax_gradient_is_exactly_straight_through():
    from matq_train.torch.fakequant import FakeQuantLinear

    lin = torch.nn.Linear(40, 8, bias=False)
    layer = FakeQuantLinear(lin, QuantSpec(8, 16))
    g = torch.randn(8, 40)
    (layer.fake_weight(2) * g).sum().backward()
    assert torch.equal(lin.weight.grad, g)


def _grads(model_dir, obj, per_width: bool, checkpointing: bool = False) -> dict:
    from matq_train.torch.fakequant import prepare, width
    from matq_train.torch.loss import MatQuantStep
    from matq_train.torch.trainer import enable_checkpointing, load_model

    model, _, _ = load_model(model_dir)
    model.train()
    if checkpointing:
        enable_checkpointing(model)
    prepare(model, "linear", QuantSpec(8, 16))
    step = MatQuantStep(model, obj)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 200, (2, 16))).long()
    if per_width:
        teachers: dict = {}
        for i, t in enumerate(step.terms):
            with width(model, t.bits):  # as the trainer does: checkpointing recomputes at this width
                step(ids, ids, None, 30.0, i, teachers)[0].backward()
    else:
        step(ids, ids, None, 30.0)[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_per_width_backward_and_checkpointing_give_the_one_graph_gradients(tmp_path):
    """Each width's backward in turn (one width's activations alive), with or without gradient
    checkpointing, gives the gradients of the whole objective in one graph."""
    pytest.importorskip("transformers")
    from test_train import make_model_dir

    model_dir = make_model_dir(tmp_path)
    obj = Objective.build("8,4,2", "0.2,0.2,1", "8->2", distill_labels=True)
    ref = _grads(model_dir, obj, per_width=False)
    for got in (_grads(model_dir, obj, True), _grads(model_dir, obj, True, checkpointing=True)):
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-7, msg=n)


def test_checkpointing_and_bf16_options_train(tmp_path):
    pytest.importorskip("transformers")
    from test_train import cfg_for, make_model_dir

    from matq_train.torch.trainer import DeviceError, train

    model_dir = make_model_dir(tmp_path)
    for kw in (dict(grad_checkpointing=True), dict(precision="bf16")):
        res = train(cfg_for(model_dir, None, steps=2, **kw))
        assert all(np.isfinite(v) for v in res.history[-1]["widths"].values()), kw
    with pytest.raises(DeviceError):
        train(cfg_for(model_dir, None, device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA"):
            train(cfg_for(model_dir, None, device="cuda"))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_fused_linear_equals_linear_on_fake_weights(bits):
    """The recomputing layer gives ``F.linear(x, w_r)``'s output exactly and its gradients."""
    from matq_train.torch.fakequant import FakeQuantLinear

    torch.manual_seed(bits)
    lin = torch.nn.Linear(40, 24, bias=True)
    layer = FakeQuantLinear(lin, QuantSpec(8, 16))
    layer.bits = bits
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = (x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    x.grad = lin.weight.grad = lin.bias.grad = None
    ref = torch.nn.functional.linear(x, layer.fake_weight(bits), lin.bias)
    assert torch.equal(y, ref)
    ref.backward(g)
    for a, b in zip(got, (x.grad, lin.weight.grad, lin.bias.grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_width_batches_train_the_same_model(tmp_path, monkeypatch):
    """Quantizing a whole width at once (the CUDA path) gives exactly the per-layer path's training."""
    pytest.importorskip("transformers")
    from test_train import cfg_for, make_model_dir

    from matq_train.torch import trainer

    model_dir = make_model_dir(tmp_path)
    kw = dict(steps=2, layers="linear", group_size=16, distill="8->2", extra_precision=True)
    ref = trainer.train(cfg_for(model_dir, None, **kw))
    monkeypatch.setattr(trainer, "batched", lambda *a: True)
    got = trainer.train(cfg_for(model_dir, None, **kw))
    assert got.history == ref.history or [h["widths"] for h in got.history] == [
        h["widths"] for h in ref.history
    ]
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got.model.state_dict()[k], v), k


def test_checkpoints_from_before_new_settings_still_resume(tmp_path):
    """A checkpoint written before backend/device/precision existed resumes with their defaults."""
    from dataclasses import asdict

    from matq_train.config import CheckpointMismatchError, check_resumable

    cfg = TrainConfig(model_dir="m", data=["d"])
    old = {
        k: v
        for k, v in asdict(cfg).items()
        if k not in ("backend", "device", "precision", "grad_checkpointing", "mesh")
    }
    check_resumable(old, cfg, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="backend"):
        check_resumable(old, TrainConfig(model_dir="m", data=["d"], backend="jax"), tmp_path)


def test_training_text_is_read_as_regular_utf8_files(tmp_path):
    """A FIFO among the data files is refused at once (not waited on), bytes that are not UTF-8 are a
    one-line error naming the file, and JSON lines still give their text field."""
    import os
    import threading

    from matq_format.errors import MatqError
    from matq_train.data import DataError, read_documents

    (tmp_path / "a.txt").write_text("The quick brown fox.", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    assert read_documents([tmp_path]) == ["The quick brown fox.", "one", "two"]
    bad = tmp_path / "c.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match="c.txt.*not UTF-8"):
        read_documents([tmp_path])
    bad.unlink()
    fifo = tmp_path / "d.txt"
    os.mkfifo(fifo)
    result: list = []

    def read() -> None:
        result.append(read_documents([tmp_path]))  # a folder's FIFO is not a text file: skipped
        with pytest.raises(MatqError, match="d.txt: is not a regular file"):  # named directly: refused
            read_documents([fifo])
        result.append("refused")

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a FIFO made training wait"
    assert result == [["The quick brown fox.", "one", "two"], "refused"]
