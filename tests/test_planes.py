"""Bit-plane codec: the compiled kernel against the numpy reference, and both against numerics.

The numpy path in ``planes`` is the reference the C kernel must match byte for byte (packed planes
including their zero padding) and code for code (every c, r, extra precision, length).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matq_format import constants as C
from matq_format import numerics as N
from matq_format import planes as P

SCALE = settings.default.max_examples / 100
"""Example counts below are for the default profile; a longer profile scales them."""

needs_kernel = pytest.mark.skipif(not P.HAVE_KERNEL, reason="compiled bit-plane kernel not built")

# Lengths around the 8-code byte and 64-code word boundaries, plus a few larger ones.
LENGTHS = st.one_of(
    st.sampled_from([0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 511, 512, 513]),
    st.integers(0, 3000),
)


@st.composite
def code_arrays(draw, n=LENGTHS):
    """(codes uint8[n], c) with codes drawn to hit 0, the top code and the rounding boundaries."""
    c = draw(st.integers(C.MIN_CODE_BITS, C.MAX_CODE_BITS_IMPL))
    size = draw(n)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    top = (1 << c) - 1
    mode = draw(st.sampled_from(["uniform", "extremes", "high"]))
    if mode == "uniform":
        q = rng.integers(0, top + 1, size)
    elif mode == "extremes":
        q = rng.choice(np.array([0, 1, top - 1, top, top >> 1, (top >> 1) + 1]), size)
    else:  # the extra-bucket region: codes that round past 2^r - 1 for small r
        q = rng.integers(max(0, top - (top >> 2)), top + 1, size)
    return q.astype(np.uint8), c


@contextlib.contextmanager
def _simd(avx2: bool):
    """Select the kernel's AVX2 path (where the CPU has it) or its portable path."""
    from matq_format import _bitplanes

    was = _bitplanes.set_avx2(avx2)
    try:
        yield
    finally:
        _bitplanes.set_avx2(was)


@contextlib.contextmanager
def _qk_simd(avx2: bool):
    """Select the quantize kernel's hand-written AVX2 loop (where the CPU has it) or its portable one."""
    from matq_format import numerics

    was = numerics._qk.set_avx2(avx2)
    try:
        yield
    finally:
        numerics._qk.set_avx2(was)


def _planes_list(packed: np.ndarray, c: int, bits: int) -> list[np.ndarray | None]:
    need = set(N.planes_needed(c, bits))
    return [packed[k] if k in need else None for k in range(c)]


@needs_kernel
@settings(max_examples=int(300 * SCALE), deadline=None)
@given(code_arrays())
def test_pack_kernel_matches_numpy(arg):
    """Both compiled paths (AVX2 where the CPU has it, and SSE2/portable) give the numpy layout."""
    q, c = arg
    b = P.pack(q, c, use_kernel=False)
    for avx2 in (True, False):
        with _simd(avx2):
            a = P.pack(q, c)
        assert a.shape == b.shape == (c, P.plane_stride(q.size))
        np.testing.assert_array_equal(a, b)


@settings(max_examples=int(200 * SCALE), deadline=None)
@given(code_arrays(), st.data())
def test_pack_into_blocks_equals_one_pack(arg, data):
    """Blocks of whole words packed in any order, by either path, give the planes of one pack."""
    q, c = arg
    ref = P.pack(q, c, use_kernel=False)
    words = -(-q.size // 64)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, words), max_size=5)) + [0, words]))
    spans = [(64 * a, min(q.size, 64 * b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    spans = data.draw(st.permutations(spans))
    for use_kernel in (True, False) if P.HAVE_KERNEL else (False,):
        for avx2 in (True, False) if use_kernel else (False,):
            out = np.full((c, P.plane_stride(q.size) + 16), 0xA5, np.uint8)  # room after the planes
            with _simd(avx2) if use_kernel else contextlib.nullcontext():
                for a, b in spans:
                    P.pack_into(q[a:b], c, out, a, use_kernel=use_kernel)
            np.testing.assert_array_equal(out[:, : ref.shape[1]], ref)
            assert np.all(out[:, ref.shape[1] :] == 0xA5), "wrote past its words"
    with pytest.raises(ValueError):  # not on a word boundary, or past the end
        P.pack_into(q[:1], c, out, 8)
    with pytest.raises(ValueError):
        P.pack_into(q[:1], c, out, 64 * (words + 3))


@needs_kernel
@settings(max_examples=int(300 * SCALE), deadline=None)
@given(code_arrays(), st.data())
def test_unpack_kernel_matches_numpy_and_numerics(arg, data):
    q, c = arg
    bits = data.draw(st.integers(1, c), label="bits")
    ep = data.draw(st.booleans(), label="extra_precision")
    packed = P.pack(q, c, use_kernel=False)
    planes = _planes_list(packed, c, bits)
    want = N.slice_codes(q, c, bits, ep)
    got_np = P.unpack(planes, q.size, c, bits, ep, use_kernel=False)
    np.testing.assert_array_equal(got_np, want)
    for avx2 in (True, False):
        with _simd(avx2):
            got_k = P.unpack(planes, q.size, c, bits, ep)
        assert got_k.dtype == got_np.dtype == np.uint8
        np.testing.assert_array_equal(got_k, want)


@pytest.mark.parametrize("path", ["avx2", "portable", "numpy"])
@pytest.mark.parametrize("c", range(2, 9))
def test_every_width_exhaustive(c, path):
    """Every code value at every width and both clamp modes, against Eq. 6 written out here."""
    use_kernel = path != "numpy"
    if use_kernel and not P.HAVE_KERNEL:
        pytest.skip("compiled bit-plane kernel not built")
    with _simd(path == "avx2") if use_kernel else contextlib.nullcontext():
        _every_width(c, use_kernel)


def _every_width(c: int, use_kernel: bool) -> None:
    q = np.tile(np.arange(1 << c, dtype=np.uint8), 40)[: (1 << c) * 40 - 5]  # whole words and a tail
    packed = P.pack(q, c, use_kernel=use_kernel)
    qi = q.astype(np.int64)
    for bits in range(1, c + 1):
        for ep in (False, True):
            got = P.unpack(_planes_list(packed, c, bits), q.size, c, bits, ep, use_kernel=use_kernel)
            if bits == c:
                want = qi
            else:
                s = c - bits
                want = (qi >> s) + ((qi >> (s - 1)) & 1)
                if not ep:
                    want = np.minimum(want, (1 << bits) - 1)
            np.testing.assert_array_equal(got, want, err_msg=f"c={c} r={bits} ep={ep}")


@pytest.mark.parametrize("use_kernel", [True, False])
def test_planes_layout_lsb_first_zero_padded(use_kernel):
    """Plane k, byte j, bit i holds bit k of code 8j+i; padding up to whole 8-byte words is zero."""
    if use_kernel and not P.HAVE_KERNEL:
        pytest.skip("compiled bit-plane kernel not built")
    q = np.array([0b10000001, 0b00000010, 0xFF] + [0] * 6 + [0x80], dtype=np.uint8)
    packed = P.pack(q, 8, use_kernel=use_kernel)
    assert packed.shape == (8, 8)
    assert packed[0, 0] == 0b00000101  # codes 0 and 2 have bit 0
    assert packed[1, 0] == 0b00000110  # codes 1 and 2 have bit 1
    assert packed[7, 0] == 0b00000101 and packed[7, 1] == 0b00000010  # codes 0, 2 and 9
    assert not packed[:, 2:].any()


@pytest.mark.parametrize("use_kernel", [True, False])
def test_unneeded_planes_are_not_read(use_kernel):
    """A slice depends only on the top r planes and the rounding plane: garbage elsewhere is ignored."""
    if use_kernel and not P.HAVE_KERNEL:
        pytest.skip("compiled bit-plane kernel not built")
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, 1000).astype(np.uint8)
    packed = P.pack(q, 8, use_kernel=use_kernel)
    for bits in range(1, 8):
        need = N.planes_needed(8, bits)
        noisy = [
            packed[k] if k in need else rng.integers(0, 256, packed.shape[1]).astype(np.uint8)
            for k in range(8)
        ]
        for ep in (False, True):
            np.testing.assert_array_equal(
                P.unpack(noisy, q.size, 8, bits, ep, use_kernel=use_kernel), N.slice_codes(q, 8, bits, ep)
            )


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("c", [2, 4, 7])
def test_pack_rejects_codes_wider_than_c(c, use_kernel):
    if use_kernel and not P.HAVE_KERNEL:
        pytest.skip("compiled bit-plane kernel not built")
    q = np.zeros(100, np.uint8)
    q[77] = 1 << c
    with pytest.raises(ValueError):
        P.pack(q, c, use_kernel=use_kernel)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_pack_does_not_wrap_wide_integer_codes(use_kernel):
    """Codes given in a wider integer dtype are range-checked, not silently wrapped modulo 256."""
    if use_kernel and not P.HAVE_KERNEL:
        pytest.skip("compiled bit-plane kernel not built")
    for bad in (np.array([1, 256], np.int32), np.array([3, -1], np.int16)):
        with pytest.raises(ValueError):
            P.pack(bad, 8, use_kernel=use_kernel)
    np.testing.assert_array_equal(
        P.pack(np.array([5, 200], np.int64), 8, use_kernel=use_kernel),
        P.pack(np.array([5, 200], np.uint8), 8, use_kernel=use_kernel),
    )


@pytest.mark.parametrize("use_kernel", [True, False])
def test_unpack_refuses_short_or_missing_planes(use_kernel):
    """Both paths refuse a plane shorter than the stride, and an absent plane the width needs."""
    if use_kernel and not P.HAVE_KERNEL:
        pytest.skip("compiled bit-plane kernel not built")
    q = np.arange(130, dtype=np.uint8)
    packed = P.pack(q, 8)
    planes = list(packed)
    planes[7] = planes[7][:-8]
    with pytest.raises(ValueError):
        P.unpack(planes, q.size, 8, 4, use_kernel=use_kernel)
    planes = _planes_list(packed, 8, 4)
    planes[3] = None  # the rounding plane of a 4-bit slice
    with pytest.raises(ValueError):
        P.unpack(planes, q.size, 8, 4, use_kernel=use_kernel)
    with pytest.raises(ValueError):
        P.unpack(list(packed)[:7], q.size, 8, 4, use_kernel=use_kernel)
    with pytest.raises(ValueError):
        P.unpack(list(packed), q.size, 8, 9, use_kernel=use_kernel)


@needs_kernel
def test_kernel_accepts_non_contiguous_and_memmap_like_planes(tmp_path):
    """Planes arrive as memory maps or strided views; the kernel result must not depend on that."""
    rng = np.random.default_rng(5)
    q = rng.integers(0, 256, 777).astype(np.uint8)
    packed = P.pack(q, 8)
    path = tmp_path / "planes.bin"
    packed.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=packed.shape)
    strided = np.repeat(packed, 2, axis=1)[:, ::2]  # same values, stride 2
    assert not strided[0].flags.c_contiguous
    for planes in (list(mm), list(strided)):
        for bits in (8, 4, 2):
            np.testing.assert_array_equal(
                P.unpack(planes, q.size, 8, bits), P.unpack(planes, q.size, 8, bits, use_kernel=False)
            )


@needs_kernel
def test_large_tensor_kernel_matches_numpy():
    """A tensor larger than any cache, one width each path, to catch word-loop edge cases at scale."""
    rng = np.random.default_rng(11)
    q = rng.integers(0, 256, (1 << 20) + 37).astype(np.uint8)
    packed = P.pack(q, 8)
    np.testing.assert_array_equal(packed, P.pack(q, 8, use_kernel=False))
    for bits, ep in ((4, False), (2, True), (7, True)):
        planes = _planes_list(packed, 8, bits)
        np.testing.assert_array_equal(P.unpack(planes, q.size, 8, bits, ep), N.slice_codes(q, 8, bits, ep))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 300),
    group=st.sampled_from([None, 1, 7, 32, 128]),
    code_bits=st.integers(2, 8),
    halves=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantize_kernel_matches_numpy_reference(rows, cols, group, code_bits, halves, seed):
    """The compiled quantize gives the numpy reference's codes bit for bit, ties (x.5) included."""
    from matq_format import numerics

    if numerics._qk is None:
        pytest.skip("quantize kernel not built")
    rng = np.random.default_rng(seed)
    if halves:  # w / a lands exactly on .5 often: round half to even must agree
        w = (rng.integers(-4 * 300, 4 * 300, size=(rows, cols)) * 0.125).astype(np.float32)
        g = numerics.n_groups(cols, group)
        a = np.full((rows, g), 0.25, np.float32)
        z = rng.integers(0, 1 << code_bits, size=(rows, g)).astype(np.float32)
    else:
        w = (rng.standard_t(3, size=(rows, cols)) * 0.05).astype(np.float32)
        w[rng.random(w.shape) < 0.05] = 0.0
        a, z = numerics.minmax_params(w, code_bits, group)
    try:
        numerics.USE_KERNEL = False
        ref = numerics.quantize(w, a, z, code_bits, group)
        ref_params = numerics.minmax_params(w, code_bits, group, zero_multiple=1 << (code_bits // 2))
    finally:
        numerics.USE_KERNEL = True
    for avx2 in (True, False):  # the hand-written AVX2 loop (where the CPU has it) and the portable one
        with _qk_simd(avx2):
            got = numerics.quantize(w, a, z, code_bits, group)
        assert got.dtype == np.uint8 and np.array_equal(got, ref)
    got_params = numerics.minmax_params(w, code_bits, group, zero_multiple=1 << (code_bits // 2))
    assert all(np.array_equal(g, r) for g, r in zip(got_params, ref_params, strict=True))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_minmax_kernel_leaves_non_finite_input_to_numpy(bad):
    from matq_format import numerics

    w = np.linspace(-1, 1, 256, dtype=np.float32).reshape(2, 128)
    w[1, 5] = bad
    lo, hi = numerics.group_minmax(w, 64)
    try:
        numerics.USE_KERNEL = False
        rlo, rhi = numerics.group_minmax(w, 64)
    finally:
        numerics.USE_KERNEL = True
    assert np.array_equal(lo, rlo, equal_nan=True) and np.array_equal(hi, rhi, equal_nan=True)


def test_checksum_is_zlib_crc32():
    """The fast CRC (zlib-ng, when installed) is the spec's CRC-32: zlib's polynomial."""
    import zlib

    from matq_format.container import crc32_hex

    data = np.random.default_rng(3).integers(0, 256, 1 << 16, dtype=np.uint8)
    assert crc32_hex(data) == f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"
    assert crc32_hex(b"") == "00000000" and crc32_hex(b"123456789") == "cbf43926"


_EDGE = [
    0.0,
    -0.0,
    1e-30,
    -1e-30,
    6e-8,
    -6e-8,
    3e-8,
    1e-5,
    0.02,
    -0.02,
    1.0,
    -1.0,
    65504.0 * 255,
    1e7,
    -1e7,
    3e38,
]


@settings(max_examples=300, deadline=None)
@given(
    lo=st.lists(st.one_of(st.sampled_from(_EDGE), st.floats(-1e6, 0, width=32)), min_size=1, max_size=40),
    hi=st.lists(st.one_of(st.sampled_from(_EDGE), st.floats(0, 1e6, width=32)), min_size=1, max_size=40),
    code_bits=st.integers(1, 16),
    symmetric=st.booleans(),
    zero_multiple=st.sampled_from([1, 2, 4, 16, 64]),
    scale_dtype=st.sampled_from(["F32", "F16", "BF16"]),
)
def test_params_kernel_matches_numpy_reference(lo, hi, code_bits, symmetric, zero_multiple, scale_dtype):
    """MinMax scale and zero from group ranges: the compiled arithmetic is the reference's, bit for bit,
    including F16/BF16 rounding up, ties of the zero point and the F16 overflow."""
    from matq_format import numerics

    if numerics._qk is None:
        pytest.skip("quantize kernel not built")
    n = min(len(lo), len(hi))
    lo32 = np.minimum(np.array(lo[:n], np.float32), np.array(hi[:n], np.float32))
    hi32 = np.maximum(np.array(lo[:n], np.float32), np.array(hi[:n], np.float32))
    kw = dict(symmetric=symmetric, zero_multiple=zero_multiple, scale_dtype=scale_dtype)
    try:
        ref = numerics.minmax_params_from_range(lo32, hi32, code_bits, **kw)
    except OverflowError:
        ref = None
    a, z = np.empty_like(lo32), np.empty_like(lo32)
    sd = {"F32": 0, "F16": 1, "BF16": 2}[scale_dtype]
    rc = numerics._qk.params(lo32, hi32, n, (1 << code_bits) - 1, symmetric, zero_multiple, sd, a, z)
    if ref is None:
        assert rc == 0
        return
    assert rc == 1
    assert np.array_equal(a.view(np.uint32), ref[0].view(np.uint32))
    assert np.array_equal(z, ref[1])


def test_params_kernel_leaves_non_finite_ranges_to_numpy():
    from matq_format import numerics

    if numerics._qk is None:
        pytest.skip("quantize kernel not built")
    lo32 = np.array([-1.0, np.nan], np.float32)
    hi32 = np.array([1.0, 2.0], np.float32)
    a, z = np.empty_like(lo32), np.empty_like(lo32)
    assert numerics._qk.params(lo32, hi32, 2, 255, False, 1, 1, a, z) == -1


def test_params_kernel_rounds_every_float16_neighbourhood_like_numpy():
    """Symmetric 2-bit ranges [0, h] make the scale exactly h: sweep every positive float16, the
    float32 values either side of it and the midpoints between neighbours (ties), up to overflow."""
    from matq_format import numerics

    if numerics._qk is None:
        pytest.skip("quantize kernel not built")
    halves = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = (halves[:-1].astype(np.float64) + halves[1:]) / 2
    hi32 = np.concatenate(
        [
            halves,
            np.nextafter(halves, np.float32(np.inf)),
            np.nextafter(halves, np.float32(0)),
            mids.astype(np.float32),
            np.float32([1e-9, 65504.0, 65519.0, 65520.0]),
        ]
    )
    hi32 = hi32[hi32 < 65504.0]  # above the largest float16 the reference raises; checked below
    lo32 = np.zeros_like(hi32)
    for sd, name in ((1, "F16"), (2, "BF16"), (0, "F32")):
        ref_a, ref_z = numerics.minmax_params_from_range(lo32, hi32, 2, symmetric=True, scale_dtype=name)
        a, z = np.empty_like(lo32), np.empty_like(lo32)
        assert numerics._qk.params(lo32, hi32, hi32.size, 3, True, 1, sd, a, z) == 1
        assert np.array_equal(a.view(np.uint32), ref_a.view(np.uint32)) and np.array_equal(z, ref_z)
    over = np.float32([65504.5])
    with pytest.raises(OverflowError):
        numerics.minmax_params_from_range(np.zeros(1, np.float32), over, 2, symmetric=True)
    assert (
        numerics._qk.params(np.zeros(1, np.float32), over, 1, 3, True, 1, 1, *np.empty((2, 1), np.float32))
        == 0
    )


@settings(max_examples=int(100 * SCALE), deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 300),
    group=st.sampled_from([None, 1, 7, 32, 128]),
    code_bits=st.integers(2, 8),
    zero_multiple=st.sampled_from([1, 4]),
    special=st.sampled_from([None, np.nan, np.inf, -np.inf, 0.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_bf16_kernels_match_widening_to_float32(rows, cols, group, code_bits, zero_multiple, special, seed):
    """bfloat16 weights go to the kernels as they are stored; results equal widening them first."""
    import ml_dtypes

    from matq_format import numerics

    if numerics._qk is None:
        pytest.skip("quantize kernel not built")
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, size=(rows, cols)) * 0.05).astype(ml_dtypes.bfloat16)
    if special is not None:
        w[rng.integers(rows), rng.integers(cols)] = special
    w32 = w.astype(np.float32)
    lo, hi = numerics.group_minmax(w, group)
    rlo, rhi = numerics.group_minmax(w32, group)
    assert np.array_equal(lo, rlo, equal_nan=True) and np.array_equal(hi, rhi, equal_nan=True)
    kw = dict(zero_multiple=min(zero_multiple, 1 << (code_bits - 1)))

    def params(x):
        try:
            return numerics.minmax_params(x, code_bits, group, **kw)
        except OverflowError:  # an infinite weight: no float16 scale, on both paths
            return None

    got, ref_params = params(w), params(w32)
    assert (got is None) == (ref_params is None)
    if got is None:
        return
    (a, z), (ra, rz) = got, ref_params
    assert np.array_equal(a, ra, equal_nan=True) and np.array_equal(z, rz, equal_nan=True)
    if special is None or special == 0.0:
        try:
            numerics.USE_KERNEL = False
            ref = numerics.quantize(w32, a, z, code_bits, group)
        finally:
            numerics.USE_KERNEL = True
        for avx2 in (True, False):
            with _qk_simd(avx2):
                assert np.array_equal(numerics.quantize(w, a, z, code_bits, group), ref)
