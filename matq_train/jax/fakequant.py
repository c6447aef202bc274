"""Fake quantization in JAX, bit-exact with :mod:`matq_format.numerics`.

MinMax scales, zero points and codes come from the numerics module itself, on the host, once per
optimizer step (``numerics.minmax_params`` and ``numerics.quantize``: the same bytes the checkpoint
stores); inside the jitted step each width is sliced and dequantized in ``jnp`` with the reference's
integer operations and float32 order (``alpha * (S(q, r) - z)``), and :func:`fake_weight` passes
the gradient to the float weight unchanged (the straight-through estimator; MinMax ranges cover
every weight, so no clamp ever bites). ``tests/test_train_jax.py`` checks every width against
``numerics.dequantize`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from matq_format import numerics

from ..export import Quantized
from ..spec import QuantSpec

__all__ = ["Codes", "codes_for", "dequantize", "fake_weight", "slice_c_scale"]

Codes = Mapping[str, tuple]
"""``{weight name: (q uint8 [rows, cols], alpha f32 [rows, groups], zero f32 [rows, groups])}``."""


def quantize_host(w: np.ndarray, spec: QuantSpec) -> Quantized:
    """``numerics.minmax_params`` and ``numerics.quantize`` of one float32 weight: what is stored."""
    w = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
    sym = spec.scheme == "symmetric"
    a, z = numerics.minmax_params(
        w, spec.code_bits, spec.group_size, symmetric=sym, scale_dtype=spec.scale_dtype
    )
    return Quantized(numerics.quantize(w, a, z, spec.code_bits, spec.group_size), a, z)


def codes_for(params: Mapping, names, spec: QuantSpec) -> dict[str, tuple]:
    """Codes, scales and zero points of the named weights, from their current values."""
    return {n: tuple(quantize_host(np.asarray(params[n]), spec)) for n in names}


def _expand(p: jax.Array, cols: int, group_size: int | None) -> jax.Array:
    if group_size is None:
        return p[:, :1]
    return jnp.repeat(p, group_size, axis=1, total_repeat_length=p.shape[1] * group_size)[:, :cols]


def slice_c_scale(q: jax.Array, code_bits: int, bits: int, extra_precision: bool = False) -> jax.Array:
    """``numerics.slice_codes_c_scale`` as float32: ``k * 2^(c-r)``, clamped unless extra precision."""
    if bits == code_bits:
        return q.astype(jnp.float32)
    s = code_bits - bits
    qi = q.astype(jnp.int32)
    k = (qi >> s) + ((qi >> (s - 1)) & 1)
    if not extra_precision:
        k = jnp.minimum(k, numerics.code_max(bits))
    return k.astype(jnp.float32) * jnp.float32(1 << s)


def dequantize(codes: tuple, spec: QuantSpec, bits: int, extra_precision: bool = False) -> jax.Array:
    """``numerics.dequantize``: ``alpha * (S(q, r) - z)`` in float32."""
    q, a, z = codes
    cols = q.shape[1]
    ep = bool(extra_precision and bits < spec.code_bits)
    kf = slice_c_scale(q, spec.code_bits, bits, ep)
    return _expand(a, cols, spec.group_size) * (kf - _expand(z, cols, spec.group_size))


@jax.custom_vjp
def _through(w: jax.Array, w_r: jax.Array) -> jax.Array:
    return w_r


def _through_fwd(w, w_r):
    return w_r, None


def _through_bwd(_, g):
    return g, jnp.zeros_like(g)


_through.defvjp(_through_fwd, _through_bwd)


def fake_weight(
    w: jax.Array, codes: tuple, spec: QuantSpec, bits: int, extra_precision: bool = False
) -> jax.Array:
    """The weights a layer computes with at width ``bits``; the gradient reaches ``w`` unchanged."""
    return _through(w, jax.lax.stop_gradient(dequantize(codes, spec, bits, extra_precision)))
