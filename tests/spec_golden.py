"""The spec text, its manifest schema and its example generator, loaded once for the golden-example tests."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import jsonschema

SPEC_DIR = Path(__file__).resolve().parents[1] / "spec" / "v1"
SPEC = (SPEC_DIR / "README.md").read_text(encoding="utf-8")
VALIDATOR = jsonschema.Draft202012Validator(json.loads((SPEC_DIR / "manifest.schema.json").read_text()))
_spec = importlib.util.spec_from_file_location("make_example", SPEC_DIR / "example" / "make_example.py")
MAKE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MAKE)


def after(marker: str) -> str:
    """The spec from its ``<!-- marker -->`` on."""
    return SPEC[SPEC.index(f"<!-- {marker} -->") :]


def record(marker: str) -> dict:
    """The first JSON block after the spec's ``<!-- marker -->``: a record the spec shows."""
    return json.loads(re.search(r"```json\n(.*?)\n```", after(marker), re.S).group(1))
