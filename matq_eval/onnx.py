"""ONNX candidates: a folder with ``model.onnx`` (an onnxruntime-genai decoder, as ``matq convert --to
onnx`` or onnxruntime-genai's builder writes it), run by onnxruntime on the CPU one window at a time."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from matq_format.safefs import read_json

from .errors import CandidateError

GENAI_CONFIG_LIMIT = 1 << 20
"""``genai_config.json`` is a few KiB; anything near a MiB is not one."""

SIDE_INPUTS = ("scales", "zero_points", "scale", "zero_point")


def is_onnx_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model.onnx").is_file()


def decoder_config(path: Path) -> dict:
    """The decoder section of ``genai_config.json`` ({} without one)."""
    cfg = path / "genai_config.json"
    if not cfg.is_file():
        return {}
    doc = read_json(cfg, GENAI_CONFIG_LIMIT, CandidateError)
    model = doc.get("model") if isinstance(doc, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    if not isinstance(decoder, dict):
        raise CandidateError(cfg, "has no model.decoder object")
    return decoder


def check_runnable(path: Path) -> None:
    """Refuse, before any work, what :class:`OrtRunner` cannot run."""
    if "sliding_window" in decoder_config(path):  # GroupQueryAttention wants a cache of the window
        raise CandidateError(
            path,
            "has sliding-window attention (Gemma 2): matq eval cannot run it yet (onnxruntime-genai can)",
        )


@dataclass(frozen=True)
class ONNXSize:
    bytes: int
    params: int
    linear_bytes: int
    linear_params: int
    matq: bool

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.params

    @property
    def linear_bits_per_weight(self) -> float:
        return 8 * self.linear_bytes / max(self.linear_params, 1)


def _nbytes(t) -> int:
    """Stored bytes of an initializer (its external data length, or its raw data)."""
    from onnx import external_data_helper

    if external_data_helper.uses_external_data(t):
        info = external_data_helper.ExternalDataInfo(t)
        return int(info.length or 0)
    return len(t.raw_data) or math.prod(t.dims) * 4


def onnx_size(path: Path) -> ONNXSize:
    """Bytes of the model files; weights counted as the float tensors they stand for (a MatMulNBits
    or DequantizeLinear weight as its ``K x N`` elements, scales and zero points as bytes only)."""
    import onnx

    model = onnx.load(path / "model.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    nbytes = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))
    params = {n: math.prod(t.dims) for n, t in inits.items() if not n.endswith(SIDE_INPUTS)}
    linear = set()
    for node in model.graph.node:
        w = node.input[1] if node.op_type in ("MatMul", "MatMulNBits") and len(node.input) > 1 else None
        w = node.input[0] if node.op_type == "DequantizeLinear" else w
        if w in inits and node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            params[w] = attrs["K"] * attrs["N"]
        if w in inits and "layers." in w:
            linear.add(w)
    lin_bytes = sum(_nbytes(inits[w]) + _side_bytes(inits, w) for w in linear)
    from matq_converters.exporters.onnx.export import META_CONVERTER

    matq = any(p.key == META_CONVERTER for p in model.metadata_props)
    return ONNXSize(nbytes, sum(params.values()), lin_bytes, sum(params[w] for w in linear), matq)


def _side_bytes(inits: dict, weight: str) -> int:
    """Bytes of a quantized weight's scales and zero points (named after it, as both writers do)."""
    stem = weight.rsplit("_Q", 1)[0]
    return sum(_nbytes(inits[n]) for n in inits if n.startswith(stem) and n.endswith(SIDE_INPUTS))


def decoded_weights(path: Path) -> dict[str, np.ndarray]:
    """Each quantized weight ``[K, N]`` as onnxruntime decodes it, by its stored initializer's name:
    its MatMulNBits node alone on an identity input, or its DequantizeLinear node alone."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(path / "model.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMulNBits", "DequantizeLinear"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs, feeds, names = [], {}, list(node.input)
        if node.op_type == "MatMulNBits":
            k = attrs["K"]
            inputs = [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [k, k])]
            feeds, names = {"A": np.eye(k, dtype=np.float32)}, ["A", *node.input[1:]]
        single = helper.make_node(node.op_type, names, ["Y"], domain=node.domain, **attrs)
        y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)
        graph = helper.make_graph([single], "w", inputs, [y], [inits[i] for i in names if i in inits])
        m = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        weight = node.input[1] if node.op_type == "MatMulNBits" else node.input[0]
        out[weight] = ort.InferenceSession(m.SerializeToString(), so).run(None, feeds)[0]
    return out


class OrtRunner:
    """Logits of one window at a time from an ONNX decoder with a past key/value cache (left empty)."""

    def __init__(self, path: str | os.PathLike, vocab: int, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or 0
        for k, v in self._session_entries().items():
            so.add_session_config_entry(k, v)
        self.sess = ort.InferenceSession(
            str(self.path / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        self.pasts = [i for i in self.sess.get_inputs() if i.name.startswith("past_key_values")]
        self.head_size = self._decoder().get("head_size")
        if "sliding_window" in self._decoder():  # GroupQueryAttention wants a cache of the window
            raise CandidateError(
                self.path,
                "has sliding-window attention (Gemma 2); matq eval cannot run it yet, onnxruntime-genai can",
            )
        out = {o.name: o for o in self.sess.get_outputs()}
        if "logits" not in out or out["logits"].shape[-1] != vocab:
            raise CandidateError(self.path, f"has no logits output over the reference's {vocab} tokens")

    def _decoder(self) -> dict:
        return decoder_config(self.path)

    def _session_entries(self) -> dict[str, str]:
        """The string-valued session options of ``genai_config.json`` (e.g. the QDQ accuracy level)."""
        opts = self._decoder().get("session_options", {})
        return {k: v for k, v in opts.items() if isinstance(v, str) and "." in k}

    def logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 logits ``[ctx - 1 - first, vocab]`` predicting ``tokens[first + 1:]``."""
        ids = np.ascontiguousarray(tokens, dtype=np.int64)[None]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for i in self.pasts:
            head = i.shape[3] if isinstance(i.shape[3], int) else self.head_size
            shape = [1, i.shape[1], 0, head]
            feeds[i.name] = np.zeros(shape, np.float32)
        out = self.sess.run(["logits"], feeds)[0][0]
        return np.ascontiguousarray(out[first : len(tokens) - 1], np.float32)

    def close(self) -> None:
        self.sess = None
