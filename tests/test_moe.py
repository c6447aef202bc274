"""The table of roles per family and mixture-of-experts weights (issue 22 items 2, 3, 5): tiny random
transformers models of each family through ``matq quantize --layers ffn`` and ``--layers linear``,
experts per expert (2-D) and fused (3-D, gpt-oss's ``[experts, in, out]``) quantized with groups along
their input features, routers kept float, ``verify``, ``slice``, and bad input refused in one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from tiny_models import FAMILIES, family_model, small

import matq_format as mf
from matq_cli.main import cli
from matq_converters import roles as R


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny model per family of ``tiny_models.FAMILIES`` (hidden 64, two layers, four experts)."""
    root = tmp_path_factory.mktemp("families")
    return {f: family_model(f, root / re.sub(r"\W", "_", f), **small(f)) for f in FAMILIES}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "model.safetensors", "np") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _quantize(src: Path, out: Path, *args: str) -> mf.Checkpoint:
    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(out), "--layout", "free", *args])
    assert r.exit_code == 0, r.output
    return mf.open(out)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_quantizes_its_ffn_and_attention_by_role(models, family, tmp_path):
    src, fam = models[family], FAMILIES[family]
    arch = R.detect(_config(src))
    assert arch is not R.GENERIC, family
    ffn = _quantize(src, tmp_path / "ffn", "--layers", "ffn")
    lin = _quantize(src, tmp_path / "lin", "--layers", "linear")
    n_layers = _config(src)["num_hidden_layers"]
    assert len(ffn.quantized_names()) == fam.ffn * n_layers
    assert len(lin.quantized_names()) == (fam.ffn + fam.attention) * n_layers
    assert {arch.role(n) for n in ffn.quantized_names()} == {"ffn"}
    assert {arch.role(n) for n in lin.quantized_names()} == {"ffn", "attention"}
    for name in lin.tensor_names():  # routers, norms, embeddings and head stay as they came
        if arch.role(name) in ("router", "norm", "embedding", "head"):
            assert not lin.info(name).quantized, name
    lin.verify()


def test_experts_per_expert_and_fused_are_quantized_along_their_inputs(models, tmp_path):
    """Mixtral and Qwen3-MoE store experts as 2-D [out, in]; gpt-oss as 3-D [experts, in, out]."""
    for family, expert in [
        ("Mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
        ("Qwen3-MoE", "model.layers.1.mlp.experts.3.down_proj.weight"),
    ]:
        ck = _quantize(models[family], tmp_path / family, "--layers", "ffn", "--group-size", "16")
        t = ck.info(expert)
        assert t.quantized and not t.stacked and t.param_shape == (t.shape[0], t.shape[1] // 16)
    src = models["gpt-oss"]
    shapes, cfg = _shapes(src), _config(src)
    ck = _quantize(src, tmp_path / "gpt_oss", "--layers", "ffn", "--group-size", "16")
    assert ck.manifest["version"] == "1.1" and ck.manifest["must_understand"] == ["matq.stacked"]
    gate_up, down = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    for name, n_in in ((gate_up, cfg["hidden_size"]), (down, cfg["intermediate_size"])):
        t = ck.info(name)
        assert t.shape == shapes[name] and t.input_axis == 1 and t.cols == n_in
        assert t.param_shape == (4, n_in // 16, shapes[name][2])
    assert not ck.info("model.layers.0.mlp.router.weight").quantized
    assert not ck.info("model.layers.0.mlp.experts.gate_up_proj_bias").quantized
    # Groups run along the inputs: each expert is the 2-D [out, in] quantization of its transpose.
    with safe_open(src / "model.safetensors", "np") as f:
        w = f.get_tensor(gate_up)
    for e in range(4):
        ref = _quantize_matrix(w[e].T, tmp_path / f"e{e}")
        assert ck.dequantize(gate_up, 4)[e].T.tobytes() == ref.dequantize("m", 4).tobytes()
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "gpt_oss")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["slice", str(tmp_path / "gpt_oss"), "-o", str(tmp_path / "s2"), "--bits", "2"])
    assert r.exit_code == 0, r.output
    assert mf.open(tmp_path / "s2").dequantize(down, 2).tobytes() == ck.dequantize(down, 2).tobytes()


def _quantize_matrix(w: np.ndarray, folder: Path) -> mf.Checkpoint:
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"m": np.ascontiguousarray(w)}, str(folder / "model.safetensors"))
    return _quantize(folder, folder.with_name(folder.name + "-q"), "--layers", "^m$", "--group-size", "16")


def test_routers_only_when_a_pattern_names_them(models, tmp_path):
    ck = _quantize(models["Qwen3-MoE"], tmp_path / "r", "--layers", r"mlp\.gate\.weight$")
    assert ck.quantized_names() == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert {R.detect(ck.config).role(n) for n in ck.quantized_names()} == {"router"}


def test_unknown_family_gets_generic_rules_and_one_line_saying_what(models, tmp_path):
    src = tmp_path / "renamed"
    src.mkdir()
    shutil.copy(models["Llama 3"] / "model.safetensors", src / "model.safetensors")
    cfg = _config(models["Llama 3"])
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "newfam", "architectures": ["NewFam"]}))
    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "q"), "--layers", "linear"])
    assert r.exit_code == 0, r.output
    assert r.stderr.count("\n") == 1, r.stderr
    assert re.fullmatch(
        r"matq: warning: model type newfam is not in the table of roles; generic rules selected "
        r"6 ffn \(e\.g\. model\.layers\.0\.mlp\.down_proj\.weight\), 8 attention \(e\.g\. [^)]+\)\n",
        r.stderr,
    ), r.stderr


def _refused(args: list[str], out: Path, match: str) -> None:
    r = CliRunner().invoke(cli, ["quantize", *args, "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and re.search(match, r.stderr), r.stderr
    assert not out.exists() and not list(out.parent.glob(f"{out.name}*"))


def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(models["gpt-oss"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48}))  # stacks no longer fit
    _refused([str(bad)], tmp_path / "o1", r"/bad: model\.layers\.0\.mlp\.experts\.(gate_up|down)_proj: expert shape "
             r"\[4, \d+, \d+\] fits no layout of gpt_oss \(\[experts, in, out\]; hidden size 48\)")
    _refused([str(models["Llama 3"]), "--layers", r"layers\.0\."], tmp_path / "o2",
             r"--layers 'layers\\\\?\.0\\\\?\.' selects 'model\.layers\.0\.input_layernorm\.weight', of 1 dimensions")


def test_generic_rules_tell_a_fused_layout_by_the_hidden_size_or_refuse():
    arch = R.GENERIC
    shapes = {"m.experts.gate_up_proj": ("F32", (4, 32, 128)), "m.experts.down_proj": ("F32", (4, 64, 32))}
    names = list(shapes)
    assert R.input_axes(shapes, names, arch, 32) == {"m.experts.gate_up_proj": 1, "m.experts.down_proj": 1}
    flipped = {"m.experts.gate_up_proj": ("F32", (4, 128, 32)), "m.experts.down_proj": ("F32", (4, 32, 64))}
    assert R.input_axes(flipped, names, arch, 32) == {"m.experts.gate_up_proj": 2, "m.experts.down_proj": 2}
    square = {"m.experts.down_proj": ("F32", (4, 32, 32))}
    with pytest.raises(R.ExpertShapeError, match="fits no layout of generic"):
        R.input_axes(square, ["m.experts.down_proj"], arch, 32)
    with pytest.raises(R.ExpertShapeError):
        R.input_axes(shapes, names, arch, None)


def _logits_against_matq(models, family: str, ck: mf.Checkpoint, bits: int, out: Path, tmp_path: Path):
    """Logits of transformers loading ``out`` and of the source folder with matq's dequantized weights."""
    import torch
    import transformers as tf
    from safetensors.numpy import save_file

    ref = tmp_path / f"ref{bits}"  # the source folder with matq's dequantized weights in place
    shutil.copytree(models[family], ref)
    save_file({n: np.ascontiguousarray(ck.dequantize(n, bits)) for n in ck.tensor_names()}, str(ref / "model.safetensors"),
              metadata={"format": "pt"})
    ids = torch.randint(0, _config(models[family])["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return [tf.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()(ids).logits for p in (out, ref)]


@pytest.mark.parametrize("family", ["Qwen3-MoE", "gpt-oss", "Mixtral"])
def test_hf_export_carries_experts_exactly(models, family, tmp_path):
    """``--to hf --layout dense``: transformers runs the export bit for bit like matq's int4 weights."""
    import torch

    ck = _quantize(models[family], tmp_path / "q", "--layers", "linear", "--group-size", "16")
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "q"), "--to", "hf", "--bits", "4", "--layout", "dense",
                                 "-o", str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    got, want = _logits_against_matq(models, family, ck, 4, tmp_path / "hf", tmp_path)
    assert torch.equal(got, want)
    assert ck.info(next(n for n in ck.quantized_names() if "experts" in n)).quantized


@pytest.mark.parametrize("family", ["Qwen3-MoE", "Mixtral", "gpt-oss"])
def test_compressed_tensors_packs_experts_transformers_merges(models, family, tmp_path):
    """``--to hf`` (compressed-tensors): per-expert 2-D experts of a symmetric checkpoint are packed in a
    scheme of their own and transformers' loader decompresses and merges them into its fused experts,
    bit for bit; gpt-oss's fused 3-D experts (no per-expert form transformers merges) are written
    dequantized, with the reason."""
    import torch

    ck = _quantize(models[family], tmp_path / "q", "--layers", "linear", "--group-size", "16", "--scheme", "symmetric")
    experts = [n for n in ck.quantized_names() if ".experts." in n]
    for bits in (4, 2, 8):
        out = tmp_path / f"hf{bits}"
        r = CliRunner().invoke(cli, ["convert", str(tmp_path / "q"), "--to", "hf", "--bits", str(bits), "-o", str(out),
                                     "--json"])
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        got, want = _logits_against_matq(models, family, ck, bits, out, tmp_path)
        assert torch.equal(got, want), bits
        assert res["exact_tensors"] == res["quantized_tensors"] == len(ck.quantized_names())
        if family == "gpt-oss":
            assert sorted(res["dequantized"]) == sorted(experts) and "fused experts" in r.stderr
            continue
        assert not res["dequantized"] and set(experts) <= set(res["containers"]) and not r.stderr
        assert set(res["containers"].values()) == {bits}
        groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
        assert [any("experts" in t for t in g["targets"]) for g in groups.values()] == [False, True]


@pytest.mark.parametrize("family", ["Qwen3-MoE", "Mixtral"])
def test_compressed_tensors_refuses_experts_transformers_cannot_load(models, family, tmp_path):
    """transformers takes compressed-tensors experts only packed and symmetric: asymmetric experts,
    and float experts beside packed attention, would make a folder it cannot load; refused, one line."""
    free = _quantize(models[family], tmp_path / "free", "--layers", "linear", "--group-size", "16")
    attn = _quantize(models[family], tmp_path / "attn", "--layers", "attention", "--group-size", "16",
                     "--scheme", "symmetric")
    for ck, why in ((free, "has asymmetric zero points"), (attn, "is not quantized")):
        out = tmp_path / f"hf-{ck.root.name}"
        r = CliRunner().invoke(cli, ["convert", str(ck.root), "--to", "hf", "--bits", "4", "-o", str(out)])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert re.search(rf"experts\.0\.\w+\.weight {why}; transformers loads compressed-tensors experts only packed "
                         r"and symmetric .*--layout dense", r.output), r.output
        assert not out.exists()


def test_matq_torch_serves_fused_experts_at_every_width(models, tmp_path):
    """``matq_torch`` holds a stack of expert matrices like a linear weight and switches its width."""
    import matq_torch

    ck = _quantize(models["gpt-oss"], tmp_path / "ck", "--layers", "linear")
    stacks = [n for n in ck.quantized_names() if len(ck.info(n).shape) == 3]
    assert stacks
    model = matq_torch.load(ck.root, bits=4)
    for bits in (4, 2, 8):
        model.matq.switch(bits=bits)
        params = dict(model.named_parameters())
        for n in stacks:
            np.testing.assert_array_equal(params[n].detach().numpy(), ck.dequantize(n, bits))
