"""MatGPTQ import: a packed MatGPTQ folder built here from the field guide's description imports with
the same dequantized weights at every width; malformed folders give typed errors and no output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import build, config

import matq_format as mf
from matq_cli.main import cli
from matq_converters.importers.hf.source import HFSource
from matq_converters.importers.matgptq import MatGPTQLayoutError, NotMatGPTQError, import_matgptq

GROUP = 32
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _float_model(out: Path) -> Path:
    cfg = config(
        "llama",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return build(cfg, out, seed=1, dtype="bfloat16")


def _pack_matgptq(float_dir: Path, out: Path, scales_dtype: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MatGPTQ's packed layout: per linear layer uint8 qweight [out, in] and scales [out, in/group],
    symmetric with zero 128 (codes from round-to-nearest here; GPTQ would pick them differently, which
    the importer cannot tell apart). Two shards and an index. Returns {prefix: (qweight, scales f32)}."""
    import torch
    from safetensors.torch import save_file

    src = HFSource(float_dir)
    tensors, packed = {}, {}
    for name in src:
        stored = src.read(name)
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and prefix.rsplit(".", 1)[-1] in LINEAR:
            w = stored.astype(np.float32)
            rows, cols = w.shape
            amax = np.abs(w.reshape(rows, cols // GROUP, GROUP)).max(axis=2)
            s16 = np.maximum(amax / 127, 1e-4).astype(np.float16)
            s = s16.astype(np.float32)
            q = np.clip(np.rint(w / np.repeat(s, GROUP, axis=1)) + 128, 0, 255).astype(np.uint8)
            tensors[prefix + ".qweight"] = torch.from_numpy(q)
            st = torch.from_numpy(s16)
            tensors[prefix + ".scales"] = st if scales_dtype == "F16" else st.to(torch.bfloat16)
            packed[prefix] = (q, tensors[prefix + ".scales"].float().numpy())
        else:
            tensors[name] = torch.from_numpy(np.array(stored).view(np.int16)).view(torch.bfloat16)
    out.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in shards.items():
        save_file({n: tensors[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
    weight_map = {n: f for f, part in shards.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "matgptq_quant",
        "group_size": GROUP,
        "master_bitwidth": 8,
        "inference_bitwidth": 4,
        "bitwidth_options": [3, 4, 8],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_bytes((float_dir / "generation_config.json").read_bytes())
    return packed


def _reference(q: np.ndarray, scales: np.ndarray, r: int) -> np.ndarray:
    """The field guide's slice and MatGPTQ's dequantization, written out independently of matq."""
    if r == 8:
        k = q.astype(np.int32)
    else:
        s = 8 - r
        k = np.minimum((q >> s) + ((q >> (s - 1)) & 1), (1 << r) - 1).astype(np.int32) << s
    return np.repeat(scales.astype(np.float32), GROUP, axis=1) * (k - 128).astype(np.float32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("matgptq")
    float_dir = _float_model(root / "float")
    out = {"float": float_dir}
    for dt in ("F16", "BF16"):
        out[dt] = (root / f"matgptq-{dt}", _pack_matgptq(float_dir, root / f"matgptq-{dt}", dt))
    return out


@pytest.mark.parametrize("scales_dtype", ["F16", "BF16"])
def test_import_identical_at_every_width(folders, tmp_path, scales_dtype):
    src_dir, packed = folders[scales_dtype]
    ck = mf.open(import_matgptq(src_dir, tmp_path / "ck"))
    ck.verify()
    assert sorted(ck.quantized_names()) == sorted(p + ".weight" for p in packed)
    for prefix, (q, scales) in packed.items():
        name = prefix + ".weight"
        t = ck.info(name)
        assert (t.group_size, t.scheme, t.scale_dtype, t.zero_dtype) == (
            GROUP,
            "symmetric",
            scales_dtype,
            "U8",
        )
        np.testing.assert_array_equal(ck.codes(name), q)
        for r in range(1, 9):
            np.testing.assert_array_equal(
                ck.dequantize(name, r), _reference(q, scales, r), err_msg=f"{name} int{r}"
            )
    src = HFSource(src_dir)
    dense = [n for n in src.tensors if not n.endswith((".qweight", ".scales"))]
    assert sorted(set(ck.tensor_names()) - set(ck.quantized_names())) == sorted(dense)
    for n in dense:
        np.testing.assert_array_equal(ck.dense(n).view(np.uint16), src.read(n).view(np.uint16))
    assert "quantization_config" not in ck.config  # the checkpoint is no longer MatGPTQ-packed
    assert ck.source["quantization_config"]["quant_method"] == "matgptq_quant"
    assert "generation_config.json" in ck.carried_files()


def test_cli_both_spellings_agree(folders, tmp_path):
    src_dir, _ = folders["F16"]
    r1 = CliRunner().invoke(cli, ["import-matgptq", str(src_dir), "-o", str(tmp_path / "a"), "--json"])
    r2 = CliRunner().invoke(
        cli, ["quantize", str(src_dir), "-o", str(tmp_path / "b"), "--from", "matgptq", "--json"]
    )
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert json.loads(r1.output)["digest"] == json.loads(r2.output)["digest"]
    assert "Examples:" in CliRunner().invoke(cli, ["import-matgptq", "--help"]).output


def _edit(src_dir: Path, dst: Path, drop: str | None = None, replace: dict | None = None) -> Path:
    """A copy of a MatGPTQ folder with one tensor dropped or replaced (its shard rewritten)."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for p in src_dir.iterdir():
        if p.suffix == ".safetensors":
            t = load_file(str(p))
            if drop in t or any(k in t for k in replace or {}):
                t.pop(drop, None)
                t.update({k: torch.from_numpy(v) for k, v in (replace or {}).items() if k in t})
                save_file(t, str(dst / p.name), metadata={"format": "pt"})
                continue
        (dst / p.name).write_bytes(p.read_bytes())
    if drop:
        idx = json.loads((dst / "model.safetensors.index.json").read_text())
        idx["weight_map"].pop(drop, None)
        (dst / "model.safetensors.index.json").write_text(json.dumps(idx))
    return dst


def test_errors_typed_and_no_output(folders, tmp_path):
    src_dir, packed = folders["F16"]
    prefix = sorted(packed)[0]
    before = set(os.listdir(tmp_path))
    with pytest.raises(NotMatGPTQError, match="matgptq_quant"):
        import_matgptq(folders["float"], tmp_path / "out")
    assert set(os.listdir(tmp_path)) == before

    no_scales = _edit(src_dir, tmp_path / "no-scales", drop=prefix + ".scales")
    bad_shape = _edit(
        src_dir, tmp_path / "bad-shape", replace={prefix + ".scales": np.ones((3, 1), np.float16)}
    )
    before = set(os.listdir(tmp_path))
    with pytest.raises(MatGPTQLayoutError, match="has no"):
        import_matgptq(no_scales, tmp_path / "out")
    with pytest.raises(MatGPTQLayoutError, match="expected F16/BF16"):
        import_matgptq(bad_shape, tmp_path / "out")
    assert set(os.listdir(tmp_path)) == before
    r = CliRunner().invoke(cli, ["import-matgptq", str(no_scales), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and r.output.startswith("matq: ") and len(r.output.strip().splitlines()) == 1
