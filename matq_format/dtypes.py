"""Mapping between numpy arrays and safetensors dtype names (BF16 through ml_dtypes)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import constants as C

_NP_TO_ST = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int16): "I16",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.float32): "F32",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64",
    np.dtype(np.float64): "F64",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
}
_ST_TO_NP = {v: k for k, v in _NP_TO_ST.items()}


def st_dtype(array: np.ndarray) -> str:
    try:
        return _NP_TO_ST[array.dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"no safetensors dtype for numpy {array.dtype}") from None


def np_dtype(name: str) -> np.dtype:
    return _ST_TO_NP[name].newbyteorder("<") if _ST_TO_NP[name].itemsize > 1 else _ST_TO_NP[name]


def from_bytes(buf: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """View raw little-endian bytes as the stored dtype, without copying."""
    return np.frombuffer(buf, dtype=np_dtype(dtype)).reshape(shape)


def cast_exact(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float32 parameters to the stored dtype, refusing any value that would change."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, as a ValueError
        out = np.asarray(values, dtype=np.float32).astype(np_dtype(dtype))
    if not np.array_equal(out.astype(np.float32), np.asarray(values, np.float32), equal_nan=True):
        raise ValueError(f"values are not exactly representable as {dtype}")
    return out


assert set(_ST_TO_NP) == set(C.DTYPES)
