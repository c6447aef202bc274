"""Graph surgery on a float ONNX model: each MatMul whose weight is a matq slice becomes a
``MatMulNBits`` node (or ``DequantizeLinear`` + ``MatMul``) built from the slice's own codes.

Which initializer holds which checkpoint tensor is found by content, not by name: the float graph
was made from the dequantized slice, so an initializer equal bit for bit to a slice's transposed
weights is that slice (whatever the graph's producer named it, and only if it did not change it).
A graph producer that splits a fused weight (Phi-3's ``qkv_proj`` into Q, K and V MatMuls) leaves
initializers that are each a block of a slice's rows: :func:`find_row_blocks` finds those by the
content of their first row, then checks the whole block.
Initializers stream from the float model's external data to the new one, one at a time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from matq_converters.exporters.onnx.weights import WeightPlan, packed_raw

MS_DOMAIN = "com.microsoft"
DATA_NAME = "model.onnx.data"
ALIGN, ALIGN_LARGE, LARGE = 16, 1 << 16, 1 << 20
"""External data laid out as ``onnx.save`` does: tensors of 1 MiB and more at 64 KiB boundaries (so
onnxruntime can map them), the rest at 16 bytes."""
COPY_CHUNK = 1 << 24
QDQ_TYPES = {2: getattr(TensorProto, "UINT2", None), 4: TensorProto.UINT4, 8: TensorProto.UINT8}
"""uint2 exists from onnx 1.20 (opset 25); ``onnx_export`` refuses 2-bit QDQ without it."""
QDQ_OPSET = {2: 25, 4: 21, 8: 21}
"""The opset that first has blocked DequantizeLinear of each container type."""


def digest(weight_t: np.ndarray) -> str:
    """The key a transposed float32 weight ``[K, N]`` is found by."""
    a = np.ascontiguousarray(weight_t, np.float32)
    return hashlib.sha256(a.tobytes()).hexdigest() + str(a.shape)


@dataclass(frozen=True)
class Part:
    """A checkpoint tensor, or the block ``rows`` (start, stop) of its rows, that an initializer holds."""

    tensor: str
    rows: tuple[int, int] | None = None


@dataclass
class Encoded:
    """One weight's new inputs, as ``onnx_weights`` made them, and how the node uses them."""

    plan: WeightPlan
    arrays: dict[str, np.ndarray]
    shape: tuple[int, int]
    """``[N, K]``: rows out, columns in."""
    layout: str = "matmulnbits"
    accuracy_level: int = 1
    """MatMulNBits' compute type: 1 (float32, exact) or 4 (int8 activations)."""
    stack: tuple[int, int] | None = None
    """Experts (QMoE): ``(experts, out)``, ``shape`` being their matrix view ``[experts*out, in]``."""


class ExternalData:
    """Tensors appended to one external data file; each returned proto points into it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.f = open(folder / DATA_NAME, "wb")  # noqa: SIM115 - closed by close()

    def _place(self, t: TensorProto, chunks: Iterator[bytes], nbytes: int) -> TensorProto:
        pad = -self.f.tell() % (ALIGN_LARGE if nbytes >= LARGE else ALIGN)
        self.f.write(b"\0" * pad)
        offset = self.f.tell()
        for chunk in chunks:
            self.f.write(chunk)
        t.ClearField("raw_data")
        del t.external_data[:]
        for k, v in (("location", DATA_NAME), ("offset", offset), ("length", self.f.tell() - offset)):
            t.external_data.append(onnx.StringStringEntryProto(key=k, value=str(v)))
        t.data_location = TensorProto.EXTERNAL
        return t

    def add(
        self, name: str, a: np.ndarray, data_type: int | None = None, raw: bytes | None = None
    ) -> TensorProto:
        """A numpy array (or ``raw`` bytes of ``data_type``, for sub-byte types) as an initializer."""
        t = TensorProto(name=name, dims=list(a.shape))
        t.data_type = data_type or helper.np_dtype_to_tensor_dtype(a.dtype)
        data = raw if raw is not None else np.ascontiguousarray(a).tobytes()
        return self._place(t, iter([data]), len(data))

    def copy(self, t: TensorProto, src: Path) -> TensorProto:
        """An initializer of the float model, its bytes streamed from ``src``'s external data."""
        if not external_data_helper.uses_external_data(t):
            return t
        info = external_data_helper.ExternalDataInfo(t)
        out = TensorProto()
        out.CopyFrom(t)
        del out.external_data[:]
        length = (
            info.length
            if info.length is not None
            else (src / info.location).stat().st_size - (info.offset or 0)
        )
        return self._place(out, _read_chunks(src / info.location, info.offset or 0, length), length)

    def close(self) -> None:
        self.f.close()


def _read_chunks(path: Path, offset: int, length: int | None) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        left = length if length is not None else os.fstat(f.fileno()).st_size - offset
        while left > 0:
            chunk = f.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"{path}: external data ends early")
            left -= len(chunk)
            yield chunk


def read_initializer(t: TensorProto, folder: Path) -> np.ndarray:
    """One initializer's array, read from its external data if it has any."""
    if not external_data_helper.uses_external_data(t):
        return numpy_helper.to_array(t)
    info = external_data_helper.ExternalDataInfo(t)
    raw = b"".join(_read_chunks(folder / info.location, info.offset or 0, info.length))
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.frombuffer(raw, dtype).reshape(tuple(t.dims))


def matmul_weights(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Float 2-D initializers used as a MatMul's right input -> those MatMul nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.domain in ("", "ai.onnx") and n.input[1] in inits:
            t = inits[n.input[1]]
            if t.data_type == TensorProto.FLOAT and len(t.dims) == 2:
                out.setdefault(n.input[1], []).append(n)
    return out


MOE_WEIGHTS = {2: 2, 4: 5, 6: 8}
"""``com.microsoft.MoE`` input slot of fc1, fc2, fc3 weights -> the slot of QMoE's (scales follow)."""
QMOE_ZERO_POINTS = {2: 11, 4: 12, 6: 13}
"""MoE weight slot -> the QMoE slot of its zero points."""


def moe_weights(model: onnx.ModelProto) -> dict[str, list[str]]:
    """MoE node name -> its float 3-D expert weight initializers ``[experts, out, in]`` (fc1, fc2, fc3)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MoE" and n.domain == MS_DOMAIN:
            names = [n.input[i] for i in MOE_WEIGHTS if i < len(n.input) and n.input[i]]
            t = [inits.get(x) for x in names]
            if all(x is not None and x.data_type == TensorProto.FLOAT and len(x.dims) == 3 for x in t):
                out[n.name] = names
    return out


def find_slices(folder: Path, index: dict[str, str]) -> dict[str, str]:
    """Initializer name -> checkpoint tensor, for the MatMul weights (``[in, out]``) and MoE expert
    weights (``[experts, out, in]``) of ``folder/model.onnx`` whose content ``index`` knows (read
    one at a time)."""
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    experts = [w for ws in moe_weights(model).values() for w in ws]
    for name in [*matmul_weights(model), *experts]:
        key = digest(read_initializer(inits[name], folder))
        if key in index:
            found[name] = index[key]
    return found


def find_row_blocks(
    folder: Path, skip: set[str], first_rows: dict[str, list[tuple[str, int]]], weights: Callable[[str], np.ndarray]
) -> dict[str, Part]:
    """Initializer name -> :class:`Part`, for MatMul weights of ``folder/model.onnx`` (but ``skip``)
    whose rows are a block of a slice's rows: ``first_rows`` maps the digest of one slice row to
    (tensor, row) and ``weights(tensor)`` gives the slice ``[N, K]`` to check the block against."""
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for name in matmul_weights(model):
        if name in skip:
            continue
        w_t = read_initializer(inits[name], folder)
        for tensor, start in first_rows.get(digest(w_t[:, 0]), []):
            stop = start + w_t.shape[1]
            w = weights(tensor)
            if stop <= w.shape[0] and np.array_equal(w[start:stop], w_t.T):
                found[name] = Part(tensor, (start, stop))
                break
    return found


@dataclass
class Rewrite:
    """What :func:`rewrite` did: initializer -> what it held (``targets``' value), and the opsets it needed."""

    replaced: dict[str, str] = field(default_factory=dict)
    opset: int = 0


def rewrite(
    src: Path,
    dst: Path,
    targets: dict[str, Part],
    encode: Callable[[Part], Encoded | None],
    metadata: dict[str, str],
) -> Rewrite:
    """``src/model.onnx`` with each MatMul on a ``targets`` initializer replaced by its encoding
    (``encode(part)``; None keeps the float MatMul), written to ``dst/model.onnx`` + external data.
    A MoE node whose every expert weight is a target becomes QMoE; ``encode`` must give them all one
    container and block (the exporter plans them so)."""
    model = onnx.load(src / "model.onnx", load_external_data=False)
    users = _consumers(model)
    weights = matmul_weights(model)
    moe_inits = {m: ws for m, ws in moe_weights(model).items() if all(w in targets for w in ws)}
    moe = {n.name: n for n in model.graph.node if n.name in moe_inits}  # those whose every weight is a target
    experts = {w for ws in moe_inits.values() for w in ws}
    data = ExternalData(dst)
    done = Rewrite()
    try:
        new_inits, new_nodes, stored = [], {}, {}
        for t in model.graph.initializer:
            enc = encode(targets[t.name]) if t.name in targets else None
            if t.name in experts and (enc is None or enc.plan.container is None):
                raise ValueError(f"{t.name}: a MoE weight planned for QMoE has no container")
            if enc is None or enc.plan.container is None:
                new_inits.append(data.copy(t, src))
                continue
            if t.name in experts:  # the MoE node is rebuilt once all its weights are stored
                stored[t.name], inits = _store_experts(t.name, enc, data)
                new_inits += inits
                if len(users[t.name]) > 1:
                    new_inits.append(data.copy(t, src))
                done.replaced[t.name] = targets[t.name]
                continue
            inputs, inits, dq = _store(t.name, enc, data)
            new_inits += inits
            for i, node in enumerate(weights[t.name]):  # in graph order: the DQ node before its first user
                new_nodes[id(node)] = [dq] * (dq is not None and i == 0) + [_replacement(node, inputs, enc)]
            if len(users[t.name]) > len(weights[t.name]):  # also read elsewhere: keep the floats too
                new_inits.append(data.copy(t, src))
            done.replaced[t.name] = targets[t.name]
            if enc.layout == "qdq":
                done.opset = max(done.opset, QDQ_OPSET[enc.plan.container])
        for node in moe.values():
            new_nodes[id(node)] = [_qmoe(node, stored)]
    finally:
        data.close()
    _replace_nodes(model, new_nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(new_inits)
    _finish(model, done, metadata)
    onnx.save(model, dst / "model.onnx")
    return done


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _store(weight: str, enc: Encoded, data: ExternalData):
    """One weight's initializers, the names a node reads them by, and (QDQ) the DequantizeLinear
    node every MatMul on it shares."""
    c, a = enc.plan.container, enc.arrays
    if enc.layout == "matmulnbits":
        parts = {f"{weight}_Q{c}": a["B"], f"{weight}_scales": a["scales"]}
        if "zero_points" in a:
            parts[f"{weight}_zero_points"] = a["zero_points"]
        return list(parts), [data.add(n, v) for n, v in parts.items()], None
    kind, raw = QDQ_TYPES[c], (lambda v: packed_raw(v, c) if c < 8 else None)
    q, s, z = f"{weight}_Q{c}", f"{weight}_scale", f"{weight}_zero_point"
    inits = [
        data.add(q, a["x"], kind, raw(a["x"])),
        data.add(s, a["x_scale"]),
        data.add(z, a["x_zero_point"], kind, raw(a["x_zero_point"])),
    ]
    attrs = {"axis": 1} if enc.plan.block is None else {"axis": 0, "block_size": enc.plan.block}
    dq = helper.make_node(
        "DequantizeLinear", [q, s, z], [f"{weight}_dequantized"], name=f"{weight}_DQ", **attrs
    )
    return [dq.output[0]], inits, dq


def _store_experts(weight: str, enc: Encoded, data: ExternalData):
    """One stack of experts as QMoE inputs: packed codes ``[E, N, K*c/8]``, scales ``[E, N, K/block]``
    and, unless the operator's default, packed zero points ``[E, N, ceil(blocks*c/8)]``."""
    e, n = enc.stack
    a, c = enc.arrays, enc.plan.container
    parts = {f"{weight}_Q{c}": a["B"].reshape(e, n, -1), f"{weight}_scales": a["scales"].reshape(e, n, -1)}
    if "zero_points" in a:
        parts[f"{weight}_zero_points"] = a["zero_points"].reshape(e, n, -1)
    names = list(parts) + [""] * (3 - len(parts))
    return (names, enc), [data.add(k, v) for k, v in parts.items()]


def _qmoe(node: onnx.NodeProto, stored: dict) -> onnx.NodeProto:
    """A float MoE node as ``com.microsoft.QMoE`` on its stored experts (one container and block,
    which the exporter checked), its other attributes kept."""
    inputs = [node.input[0], node.input[1]] + [""] * 12
    encs = []
    for slot, qslot in MOE_WEIGHTS.items():
        if slot < len(node.input) and node.input[slot]:
            (q, s, z), enc = stored[node.input[slot]]
            inputs[qslot : qslot + 2] = [q, s]
            inputs[QMOE_ZERO_POINTS[slot]] = z
            encs.append(enc)
        if slot + 1 < len(node.input):
            inputs[MOE_WEIGHTS[slot] + 2] = node.input[slot + 1]  # the bias
    while inputs[-1] == "":
        inputs.pop()
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    enc = encs[0]
    return helper.make_node(
        "QMoE",
        inputs,
        list(node.output),
        name=f"{node.name}_Q{enc.plan.container}",
        domain=MS_DOMAIN,
        **attrs,
        expert_weight_bits=enc.plan.container,
        block_size=enc.plan.block,
        accuracy_level=enc.accuracy_level,
        weights_prepacked=0,
    )


def _replacement(node: onnx.NodeProto, inputs: list[str], enc: Encoded) -> onnx.NodeProto:
    """The node that takes one float MatMul's place."""
    if enc.layout == "qdq":
        return helper.make_node("MatMul", [node.input[0], *inputs], list(node.output), name=node.name)
    rows, cols = enc.shape
    return helper.make_node(
        "MatMulNBits",
        [node.input[0], *inputs],
        list(node.output),
        name=f"{node.name}_Q{enc.plan.container}",
        domain=MS_DOMAIN,
        K=cols,
        N=rows,
        bits=enc.plan.container,
        block_size=enc.plan.block,
        accuracy_level=enc.accuracy_level,
    )


def _replace_nodes(model: onnx.ModelProto, new_nodes: dict[int, list[onnx.NodeProto]]) -> None:
    nodes = []
    for n in model.graph.node:
        nodes.extend(new_nodes.get(id(n), [n]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _finish(model: onnx.ModelProto, done: Rewrite, metadata: dict[str, str]) -> None:
    """Opsets the new nodes need, and matq's metadata."""
    ops = {o.domain: o for o in model.opset_import}
    if any(n.domain == MS_DOMAIN for n in model.graph.node) and MS_DOMAIN not in ops:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    default = ops.get("") or ops.get("ai.onnx")
    if done.opset and default is not None and default.version < done.opset:
        default.version = done.opset
        model.ir_version = max(model.ir_version, 11 if done.opset >= 25 else 10)
    present = {p.key for p in model.metadata_props}
    for k, v in metadata.items():
        if k not in present:
            model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
