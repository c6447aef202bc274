/* Bit-plane pack and slice-unpack kernels for matq (spec/v1, "Bit-planes").
 *
 * Plane k holds bit k of every code, LSB-first within each byte, padded to whole 64-bit words,
 * so word w of a plane covers codes 64w..64w+63 with bit i <-> code 64w+i (little endian).
 * Slicing (Eq. 6) is done on whole words in the plane domain: a ripple-carry add of the rounding
 * plane into the top r planes, with the carry masked where the top r bits are all ones (the
 * clamp). Only then are the r (or r+1 with extra precision) result planes expanded to bytes.
 * Portable C; the compiler vectorizes what it can. The GIL is released around the loops.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAXC 8

static uint64_t spread_lut[256];

static void init_lut(void) {
    for (int b = 0; b < 256; b++) {
        uint64_t v = 0;
        for (int j = 0; j < 8; j++)
            if (b & (1 << j)) v |= (uint64_t)1 << (8 * j);
        spread_lut[b] = v;
    }
}

static inline uint64_t load64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void store64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

static void pack_block(const uint8_t *codes, int c, uint8_t *const *planes, size_t word) {
    /* 64 codes -> one word in each of c planes. */
#if defined(__SSE2__)
    /* movemask gathers the top bit of 16 bytes; shifting 16-bit lanes left by 7-k brings bit k of
     * every byte to its top bit (bits that cross into the high byte land below its top bit). */
    for (int h = 0; h < 4; h++) {
        __m128i x = _mm_loadu_si128((const __m128i *)(codes + 16 * h));
        for (int k = 0; k < c; k++) {
            int m = _mm_movemask_epi8(_mm_sll_epi16(x, _mm_cvtsi32_si128(7 - k)));
            planes[k][word * 8 + 2 * h] = (uint8_t)m;
            planes[k][word * 8 + 2 * h + 1] = (uint8_t)(m >> 8);
        }
    }
#else
    for (int j = 0; j < 8; j++) {
        uint64_t x = load64(codes + 8 * j);
        for (int k = 0; k < c; k++) {
            uint64_t b = (((x >> k) & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56;
            planes[k][word * 8 + j] = (uint8_t)b;
        }
    }
#endif
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
/* The same bit gather 32 codes at a time, for CPUs with AVX2 (chosen at run time): movemask of
 * 32 bytes gives 32 consecutive bits of a plane, stored little-endian like the SSE2 path's. */
__attribute__((target("avx2"))) static void pack_blocks_avx2(const uint8_t *codes, size_t blocks, int c,
                                                             uint8_t *const *planes) {
    for (size_t w = 0; w < blocks; w++) {
        for (int h = 0; h < 2; h++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(codes + 64 * w + 32 * h));
            for (int k = 0; k < c; k++) {
                uint32_t m = (uint32_t)_mm256_movemask_epi8(_mm256_sll_epi16(x, _mm_cvtsi32_si128(7 - k)));
                memcpy(planes[k] + w * 8 + 4 * h, &m, 4);
            }
        }
    }
}
#endif

static int use_avx2 = 0;

/* Codes -> words word0.. of each plane (plane k at out + k * stride); the last partial word is
 * zero padded, the rest of the stride is the caller's (so row blocks can be packed in parallel). */
static int pack_impl(const uint8_t *codes, size_t n, int c, uint8_t *out, size_t stride, size_t word0) {
    uint8_t *planes[MAXC];
    uint8_t orv = 0;
    for (size_t i = 0; i < n; i++) orv |= codes[i];
    if (c < 8 && (orv >> c)) return -1;
    for (int k = 0; k < c; k++) planes[k] = out + (size_t)k * stride + word0 * 8;
    size_t full = n / 64, w;
#ifdef HAVE_AVX2_PATH
    if (use_avx2) {
        pack_blocks_avx2(codes, full, c, planes);
        w = full;
    } else
#endif
        for (w = 0; w < full; w++) pack_block(codes + 64 * w, c, planes, w);
    if (n % 64) {
        uint8_t tmp[64] = {0};
        memcpy(tmp, codes + 64 * full, n % 64);
        pack_block(tmp, c, planes, full);
        w = full + 1;
    }
    return 0;
}

/* Slice one word position into m result planes (r or r+1), returns m. */
static inline void slice_word(const uint8_t *const *planes, size_t w, int c, int r, int ep,
                              uint64_t *res) {
    if (r == c) {
        for (int i = 0; i < c; i++) res[i] = load64(planes[i] + 8 * w);
        return;
    }
    int s = c - r;
    uint64_t carry = load64(planes[s - 1] + 8 * w), all = ~(uint64_t)0;
    uint64_t t[MAXC];
    for (int i = 0; i < r; i++) { t[i] = load64(planes[s + i] + 8 * w); all &= t[i]; }
    if (!ep) carry &= ~all;
    for (int i = 0; i < r; i++) { res[i] = t[i] ^ carry; carry &= t[i]; }
    if (ep) res[r] = carry;
}

static inline void expand_word(const uint64_t *res, int m, uint8_t *dst) {
#if defined(__SSE2__)
    /* 16 codes at a time: unpacking a 16-bit slice of the plane word three times gives its low
     * byte in lanes 0-7 and its high byte in lanes 8-15; each lane then tests its own bit. */
    const __m128i bit = _mm_set1_epi64x((long long)0x8040201008040201ULL);
    for (int h = 0; h < 4; h++) {
        __m128i acc = _mm_setzero_si128();
        for (int i = 0; i < m; i++) {
            __m128i v = _mm_cvtsi32_si128((int)((res[i] >> (16 * h)) & 0xFFFF));
            v = _mm_unpacklo_epi8(v, v);
            v = _mm_unpacklo_epi16(v, v);
            v = _mm_unpacklo_epi32(v, v);
            v = _mm_cmpeq_epi8(_mm_and_si128(v, bit), bit);
            acc = _mm_or_si128(acc, _mm_and_si128(v, _mm_set1_epi8((char)(1 << i))));
        }
        _mm_storeu_si128((__m128i *)(dst + 16 * h), acc);
    }
    return;
#endif
    for (int j = 0; j < 8; j++) {
        uint64_t v = 0;
        for (int i = 0; i < m; i++) v |= spread_lut[(res[i] >> (8 * j)) & 0xFF] << i;
        store64(dst + 8 * j, v);
    }
}

#ifdef HAVE_AVX2_PATH
/* expand_word 32 codes at a time: each code's byte picks its bit of the plane word (shuffle the
 * word's bytes out to 8 lanes each, test one bit per lane), then ORs in that plane's value. */
__attribute__((target("avx2"))) static void unpack_words_avx2(const uint8_t *const *planes, size_t full,
                                                              int c, int r, int ep, int m, uint8_t *out) {
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2,
                                            2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    uint64_t res[MAXC + 1];
    for (size_t w = 0; w < full; w++) {
        slice_word(planes, w, c, r, ep, res);
        for (int h = 0; h < 2; h++) {
            __m256i acc = _mm256_setzero_si256();
            for (int i = 0; i < m; i++) {
                __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)(uint32_t)(res[i] >> (32 * h))), spread);
                v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
                acc = _mm256_or_si256(acc, _mm256_and_si256(v, _mm256_set1_epi8((char)(1 << i))));
            }
            _mm256_storeu_si256((__m256i *)(out + 64 * w + 32 * h), acc);
        }
    }
}
#endif

static void unpack_impl(const uint8_t *const *planes, size_t n, int c, int r, int ep, uint8_t *out) {
    int m = (r < c && ep) ? r + 1 : r;
    uint64_t res[MAXC + 1];
    size_t full = n / 64;
#ifdef HAVE_AVX2_PATH
    if (use_avx2)
        unpack_words_avx2(planes, full, c, r, ep, m, out);
    else
#endif
        for (size_t w = 0; w < full; w++) {
            slice_word(planes, w, c, r, ep, res);
            expand_word(res, m, out + 64 * w);
        }
    if (n % 64) {
        uint8_t tmp[64];
        slice_word(planes, full, c, r, ep, res);
        expand_word(res, m, tmp);
        memcpy(out + 64 * full, tmp, n % 64);
    }
}

static PyObject *py_pack(PyObject *self, PyObject *args) {
    Py_buffer codes, out;
    int c;
    Py_ssize_t ostride = -1, word0 = 0;
    if (!PyArg_ParseTuple(args, "y*iw*|nn", &codes, &c, &out, &ostride, &word0)) return NULL;
    PyObject *ret = NULL;
    size_t n = (size_t)codes.len, words = (n + 63) / 64;
    size_t stride = ostride < 0 ? words * 8 : (size_t)ostride;
    if (c < 1 || c > MAXC) {
        PyErr_SetString(PyExc_ValueError, "code bits must be 1..8");
    } else if (word0 < 0 || stride % 8 || ((size_t)word0 + words) * 8 > stride) {
        PyErr_SetString(PyExc_ValueError, "codes do not fit the plane stride at that word");
    } else if ((size_t)out.len < stride * (size_t)c) {
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
    } else {
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = pack_impl((const uint8_t *)codes.buf, n, c, (uint8_t *)out.buf, stride, (size_t)word0);
        Py_END_ALLOW_THREADS
        if (rc) PyErr_SetString(PyExc_ValueError, "a code does not fit the code width");
        else ret = Py_None, Py_INCREF(ret);
    }
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_unpack(PyObject *self, PyObject *args) {
    PyObject *seq;
    Py_ssize_t n;
    int c, r, ep;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "Oniipw*", &seq, &n, &c, &r, &ep, &out)) return NULL;
    Py_buffer bufs[MAXC];
    const uint8_t *planes[MAXC];
    int got[MAXC] = {0};
    PyObject *ret = NULL;
    size_t stride = (((size_t)n + 63) / 64) * 8;
    if (c < 1 || c > MAXC || r < 1 || r > c || n < 0) {
        PyErr_SetString(PyExc_ValueError, "bad widths");
        goto done;
    }
    if (!PySequence_Check(seq) || PySequence_Size(seq) != c) {
        PyErr_SetString(PyExc_ValueError, "planes must be a sequence of c buffers or None");
        goto done;
    }
    if ((size_t)out.len < (size_t)n) {
        PyErr_SetString(PyExc_ValueError, "output buffer too small");
        goto done;
    }
    int lowest = c - r - 1 < 0 ? 0 : c - r - 1;
    for (int k = 0; k < c; k++) {
        planes[k] = NULL;
        PyObject *item = PySequence_GetItem(seq, k);
        if (!item) goto done;
        if (item == Py_None) {
            Py_DECREF(item);
            if (k >= lowest) { PyErr_Format(PyExc_ValueError, "plane %d is needed", k); goto done; }
            continue;
        }
        int rc = PyObject_GetBuffer(item, &bufs[k], PyBUF_SIMPLE);
        Py_DECREF(item);
        if (rc) goto done;
        got[k] = 1;
        if ((size_t)bufs[k].len < stride) { PyErr_Format(PyExc_ValueError, "plane %d too short", k); goto done; }
        planes[k] = (const uint8_t *)bufs[k].buf;
    }
    Py_BEGIN_ALLOW_THREADS
    unpack_impl(planes, (size_t)n, c, r, ep, (uint8_t *)out.buf);
    Py_END_ALLOW_THREADS
    ret = Py_None;
    Py_INCREF(ret);
done:
    for (int k = 0; k < MAXC; k++) if (got[k]) PyBuffer_Release(&bufs[k]);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_set_avx2(PyObject *self, PyObject *args) {
    int on, was = use_avx2;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
#ifdef HAVE_AVX2_PATH
    use_avx2 = on && __builtin_cpu_supports("avx2");
#endif
    return PyBool_FromLong(was);
}

static PyMethodDef methods[] = {
    {"set_avx2", py_set_avx2, METH_VARARGS, "set_avx2(on) -> previous: the AVX2 pack path where the CPU has it (tests compare both)"},
    {"pack", py_pack, METH_VARARGS, "pack(codes, code_bits, out[, stride, word]): codes -> c bit-planes of stride ceil(n/64)*8 (or stride, from 64-bit word `word` on)."},
    {"unpack", py_unpack, METH_VARARGS, "unpack(planes, n, code_bits, bits, extra_precision, out): sliced codes."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitplanes", NULL, -1, methods};

PyMODINIT_FUNC PyInit__bitplanes(void) {
    init_lut();
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&module);
}
