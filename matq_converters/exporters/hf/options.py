"""Settings of ``--to hf``, declared apart from the exporter so that the CLI builds its flags (and a
library caller checks its values) without importing torch or transformers."""

from __future__ import annotations

from dataclasses import dataclass

from matq_converters.registry import option

LAYOUTS = ("compressed-tensors", "dense", "gptq")
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class HFOptions:
    """Settings of ``--to hf``; the CLI's flags come from these fields."""

    layout: str = option(
        "compressed-tensors",
        "compressed-tensors: pack-quantized integer codes (exact); dense: the dequantized slice as floats; "
        "gptq: GPTQ v1 where every slice is exact (else refused).",
        choices=LAYOUTS,
    )
    dtype: str | None = option(
        None,
        "Float type of dequantized tensors (dense layout, embeddings) and of the config; default: each "
        "tensor's source dtype.",
        choices=tuple(DTYPES),
    )
    exact: bool = option(False, "Refuse to write any tensor that would not hold its slice bit for bit.")
    groups: str = option(
        "one",
        "compressed-tensors: one: a single scheme, the widest container needed (transformers loads it); "
        "per-width: one config group per container (smaller; the form vLLM reads, not tested here; transformers 5.24 cannot load it).",
        choices=("one", "per-width"),
    )
    max_shard_size: str = option("50GB", "Largest safetensors shard, as transformers counts it (5GB, 500MB).")
