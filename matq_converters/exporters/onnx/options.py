"""Settings of ``--to onnx``, declared apart from the exporter so that the CLI builds its flags (and a
library caller checks its values) without importing onnx, torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass

from matq_converters.registry import option

LAYOUTS = ("matmulnbits", "qdq")
ACCURACY = {"fp32": 1, "int8": 4}


@dataclass(frozen=True)
class ONNXOptions:
    """Settings of ``--to onnx``; the CLI's flags come from these fields."""

    layout: str = option(
        "matmulnbits",
        "matmulnbits: com.microsoft.MatMulNBits (2/4/8-bit); qdq: DequantizeLinear + MatMul (opset 21, 25 for 2-bit).",
        choices=LAYOUTS,
    )
    accuracy: str = option(
        "fp32",
        "Compute of the quantized MatMuls in onnxruntime: fp32 (exact to the slice) or int8 (activations "
        "quantized, faster).",
        choices=tuple(ACCURACY),
    )
    exact: bool = option(
        False,
        "Refuse unless every quantized MatMul weight goes in a container that decodes to its slice bit for "
        "bit (float zero points move to 8 bits; a weight no container holds is an error, not a float MatMul).",
    )
