/* Compiled fast paths for numerics (the numpy code there is the reference; tests check both give
 * identical results). numpy needs several passes and expanded parameters; these are one pass each:
 *   minmax(w, n_groups, g, lo, hi)            min and max of each run of g floats (finite input)
 *   quantize(w, rows, cols, g, a, z, qmax, q) q = clip(rint(w / a) + z, 0, qmax), float32
 *   minmax_bf16, quantize_bf16             the same for bfloat16 input (bits as uint16)
 *   params(lo, hi, n, qmax, sym, m, sd, a, z) numerics.minmax_params from the group min/max: the
 *                                             same float64 operations in the same order, then the
 *                                             scale rounded up to F32 / F16 / BF16
 * Round half to even uses the 1.5 * 2^23 trick, exact in the default rounding mode for |x| <= 2^22;
 * larger |x| is clamped first, which cannot change the clipped result (qmax, z < 2^16).
 * Built without -ffast-math and without contraction: every float operation is the IEEE single
 * operation numpy performs (-fno-trapping-math only lets the compiler vectorize the clamps).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Per group of g consecutive floats: min and max. Returns 0 if any value is NaN or infinite (the
 * caller then takes the numpy path, whose NaN propagation it defines). */
#if defined(__GNUC__) && !defined(__clang__)
/* Lets GCC use minps/maxps for the reduction: exact on finite input, which is all the result is
 * used for (non-finite input is reported and handled by numpy); the sign of a zero min or max never
 * reaches a parameter (the range is widened to include +0 first). */
__attribute__((optimize("finite-math-only", "no-signed-zeros")))
#endif
static int minmax_impl(const float *w, size_t n_groups, size_t g, float *lo, float *hi) {
    uint32_t bad = 0;
    for (size_t j = 0; j < n_groups; j++) {
        const float *p = w + j * g;
        const uint32_t *u = (const uint32_t *)p;
        float mn = p[0], mx = p[0];
        for (size_t c = 0; c < g; c++) {
            float v = p[c];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        uint32_t e = 0;
        for (size_t c = 0; c < g; c++) e |= (u[c] & 0x7F800000u) == 0x7F800000u; /* a second pass, from L1 */
        bad |= e;
        lo[j] = mn;
        hi[j] = mx;
    }
    return !bad;
}

/* AVX2 where the CPU has it (twice the divisions per instruction), chosen at load time; the
 * arithmetic is the same IEEE single operations either way (no FMA: -ffp-contract=off). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

/* The same two passes for bfloat16 input (widened exactly by a 16-bit shift): no float32 copy. */
MULTIVERSION static int minmax_bf16_impl(const uint16_t *w, size_t n_groups, size_t g, float *lo, float *hi) {
    uint32_t bad = 0;
    for (size_t j = 0; j < n_groups; j++) {
        const uint16_t *p = w + j * g;
        /* Sign-magnitude bits -> an int16 key in the order of the values (16-bit integer min/max
         * vectorize where float conversions do not); -0 sorts just below +0, which is harmless. */
        int16_t kmn = INT16_MAX, kmx = INT16_MIN;
        for (size_t c = 0; c < g; c++) {
            int16_t s = (int16_t)p[c];
            int16_t k = (int16_t)(s ^ ((s >> 15) & 0x7FFF));
            kmn = k < kmn ? k : kmn;
            kmx = k > kmx ? k : kmx;
        }
        uint32_t e = 0;
        for (size_t c = 0; c < g; c++) e |= (p[c] & 0x7F80u) == 0x7F80u; /* a second pass, from L1 */
        bad |= e;
        lo[j] = bf16_value((uint16_t)(kmn ^ ((kmn >> 15) & 0x7FFF)));
        hi[j] = bf16_value((uint16_t)(kmx ^ ((kmx >> 15) & 0x7FFF)));
    }
    return !bad;
}

static inline float f32_value(float x) { return x; }

/* q = clip(rint(w / a) + z, 0, qmax) for weights of type T widened by LOAD: one body for both. */
#define DEFINE_QUANTIZE(NAME, T, LOAD)                                                            \
    MULTIVERSION static void NAME(const T *w, size_t rows, size_t cols, size_t g, const float *a, \
                                  const float *z, float qmax, uint8_t *q) {                       \
        const float magic = 12582912.0f; /* 1.5 * 2^23 */                                         \
        const float lim = 4194304.0f;    /* 2^22 */                                               \
        size_t groups = (cols + g - 1) / g;                                                       \
        for (size_t r = 0; r < rows; r++) {                                                       \
            const T *row = w + r * cols;                                                          \
            uint8_t *out = q + r * cols;                                                          \
            for (size_t j = 0; j < groups; j++) {                                                 \
                size_t c0 = j * g, c1 = c0 + g < cols ? c0 + g : cols;                            \
                float aj = a[r * groups + j], zj = z[r * groups + j];                             \
                for (size_t c = c0; c < c1; c++) {                                                \
                    float x = LOAD(row[c]) / aj;                                                  \
                    x = x > lim ? lim : x;                                                        \
                    x = x < -lim ? -lim : x;                                                      \
                    x = (x + magic) - magic;                                                      \
                    x = x + zj;                                                                   \
                    x = x < 0.0f ? 0.0f : x;                                                      \
                    x = x > qmax ? qmax : x;                                                      \
                    out[c] = (uint8_t)(int32_t)x;                                                 \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

DEFINE_QUANTIZE(quantize_impl, float, f32_value)
DEFINE_QUANTIZE(quantize_bf16_impl, uint16_t, bf16_value)

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
/* The quantize loop written out for AVX2 (chosen at run time), 32 weights per step: the same IEEE
 * single operations in the same order as the loop above. Each clamp is min/max with the bound as
 * the first operand, which is exactly `x > b ? b : x` (NaN included: vminps returns its second
 * operand then); packing with unsigned saturation keeps codes 0..255 and gives 0 where the scalar
 * cast of NaN's 0x80000000 gives its low byte, 0. */
#define DEFINE_QUANTIZE_AVX2(NAME, T, LOAD8)                                                       \
    __attribute__((target("avx2"))) static void NAME(const T *w, size_t rows, size_t cols, size_t g, \
                                                     const float *a, const float *z, float qmax,     \
                                                     uint8_t *q) {                                   \
        const float magic = 12582912.0f, lim = 4194304.0f;                                          \
        const __m256 vmagic = _mm256_set1_ps(magic), vlim = _mm256_set1_ps(lim);                    \
        const __m256 vnlim = _mm256_set1_ps(-lim), vzero = _mm256_setzero_ps();                     \
        const __m256 vqmax = _mm256_set1_ps(qmax);                                                  \
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);                            \
        size_t groups = (cols + g - 1) / g;                                                         \
        for (size_t r = 0; r < rows; r++) {                                                         \
            const T *row = w + r * cols;                                                            \
            uint8_t *out = q + r * cols;                                                            \
            for (size_t j = 0; j < groups; j++) {                                                   \
                size_t c = j * g, c1 = c + g < cols ? c + g : cols;                                 \
                float aj = a[r * groups + j], zj = z[r * groups + j];                               \
                const __m256 va = _mm256_set1_ps(aj), vz = _mm256_set1_ps(zj);                     \
                for (; c + 32 <= c1; c += 32) {                                                     \
                    __m256i k[4];                                                                   \
                    for (int h = 0; h < 4; h++) {                                                   \
                        __m256 x = _mm256_div_ps(LOAD8(row + c + 8 * h), va);                       \
                        x = _mm256_max_ps(vnlim, _mm256_min_ps(vlim, x));                           \
                        x = _mm256_sub_ps(_mm256_add_ps(x, vmagic), vmagic);                        \
                        x = _mm256_add_ps(x, vz);                                                   \
                        x = _mm256_min_ps(vqmax, _mm256_max_ps(vzero, x));                          \
                        k[h] = _mm256_cvttps_epi32(x);                                              \
                    }                                                                               \
                    __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(k[0], k[1]),                \
                                                    _mm256_packus_epi32(k[2], k[3]));               \
                    _mm256_storeu_si256((__m256i *)(out + c), _mm256_permutevar8x32_epi32(b, order)); \
                }                                                                                   \
                for (; c < c1; c++) {                                                               \
                    float x = LOAD_SCALAR_##T(row[c]) / aj;                                         \
                    x = x > lim ? lim : x;                                                          \
                    x = x < -lim ? -lim : x;                                                        \
                    x = (x + magic) - magic;                                                        \
                    x = x + zj;                                                                     \
                    x = x < 0.0f ? 0.0f : x;                                                        \
                    x = x > qmax ? qmax : x;                                                        \
                    out[c] = (uint8_t)(int32_t)x;                                                   \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

#define LOAD_SCALAR_float f32_value
#define LOAD_SCALAR_uint16_t bf16_value
#define LOAD8_F32(p) _mm256_loadu_ps(p)
#define LOAD8_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
DEFINE_QUANTIZE_AVX2(quantize_avx2, float, LOAD8_F32)
DEFINE_QUANTIZE_AVX2(quantize_bf16_avx2, uint16_t, LOAD8_BF16)
#endif

static int use_avx2 = 0;

/* float32 -> float16 bits rounded up, for 0 < x (x = +inf included): the smallest float16 >= x,
 * which is what numpy's round to nearest even followed by nextafter upward when it fell short gives.
 * Branch-free on the common path (the rounding direction of random scales does not predict). */
static inline uint16_t half_ceil_bits(float x) {
    uint32_t f;
    memcpy(&f, &x, 4);
    if (f > 0x477FE000u) return 0x7C00u; /* above 65504, the largest float16: inf */
    uint32_t e = f >> 23, mant = f & 0x7FFFFFu;
    if (e < 113) return (uint16_t)ceilf(x * 16777216.0f); /* float16 subnormal: units of 2^-24, exact */
    return (uint16_t)((((e - 112) << 10) | (mant >> 13)) + ((mant & 0x1FFFu) != 0)); /* carries are right */
}

static float half_value(uint16_t h) {
    uint32_t e = h >> 10, m = h & 0x3FFu, f;
    if (e == 0) return (float)m * (1.0f / 16777216.0f); /* exact: m < 2^10 */
    if (e == 31) return INFINITY;
    f = ((e + 112) << 23) | (m << 13);
    float x;
    memcpy(&x, &f, 4);
    return x;
}

static double alpha_for_zero(double lo, double hi, double z, double qmax) {
    double up = hi > 0 ? hi / (qmax - z) : 0.0;
    double down = lo < 0 ? -lo / z : 0.0;
    if (hi > 0 && z >= qmax) up = INFINITY;
    if (lo < 0 && z <= 0) down = INFINITY;
    return up > down ? up : down;
}

static double clip(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }

/* Returns 1, 0 when a scale does not fit F16 (numpy raises OverflowError), -1 on non-finite input.
 * The AVX2 clone rounds with roundsd (SSE4.1) where the default one calls libm's nearbyint: the
 * same round-half-even in the default rounding mode, in a few cycles instead of a function call. */
MULTIVERSION static int params_impl(const float *lo32, const float *hi32, size_t n, double qmax, int sym, double m,
                       int sd, float *a_out, float *z_out) {
    for (size_t j = 0; j < n; j++) {
        if (!isfinite(lo32[j]) || !isfinite(hi32[j])) return -1;
        double lo = lo32[j] < 0.0f ? (double)lo32[j] : 0.0;
        double hi = hi32[j] > 0.0f ? (double)hi32[j] : 0.0;
        double z, alpha;
        if (sym) {
            z = (qmax + 1) / 2;
            alpha = alpha_for_zero(lo, hi, z, qmax);
        } else {
            double span = hi - lo;
            double z0 = span > 0 ? -lo / span * qmax : 0.0;
            double best_z, best_a;
            if (m > 1) {
                double top = floor(qmax / m) * m;
                best_z = clip(floor(z0 / m) * m, 0, top);
                best_a = alpha_for_zero(lo, hi, best_z, qmax);
                double zc = clip(ceil(z0 / m) * m, 0, top), a = alpha_for_zero(lo, hi, zc, qmax);
                if (a < best_a) best_z = zc, best_a = a;
            } else {
                best_z = clip(nearbyint(z0), 0, qmax);
                best_a = alpha_for_zero(lo, hi, best_z, qmax);
                if (!isfinite(best_a)) { /* the only case where floor or ceil can win */
                    double cands[2] = {floor(z0), ceil(z0)};
                    for (int k = 0; k < 2; k++) {
                        double zc = clip(cands[k], 0, qmax), a = alpha_for_zero(lo, hi, zc, qmax);
                        if (!isfinite(best_a) && a < best_a) best_z = zc, best_a = a;
                    }
                }
            }
            z = best_z;
            alpha = best_a; /* alpha_for_zero(lo, hi, z, qmax), computed once */
        }
        float a = (float)(alpha > 0 ? alpha : 1.0);
        if (sd == 1) { /* F16, rounded up */
            uint16_t h = half_ceil_bits(a);
            if (h >= 0x7C00u) return 0;
            a = half_value(h);
        } else if (sd == 2) { /* BF16, rounded up */
            uint32_t b, t;
            memcpy(&b, &a, 4);
            t = b & 0xFFFF0000u;
            t += (t != b) ? 0x10000u : 0;
            memcpy(&a, &t, 4);
        }
        a_out[j] = a;
        z_out[j] = (float)z + 0.0f; /* +0 for -0, as the stored integer */
    }
    return 1;
}

static int get2(PyObject *o, Py_buffer *b, int writable, Py_ssize_t need, const char *what) {
    if (PyObject_GetBuffer(o, b, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS)) return -1;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s buffer too small", what);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *py_params(PyObject *self, PyObject *args) {
    PyObject *olo, *ohi, *oa, *oz;
    Py_ssize_t n;
    double qmax, m;
    int sym, sd;
    if (!PyArg_ParseTuple(args, "OOndpdiOO", &olo, &ohi, &n, &qmax, &sym, &m, &sd, &oa, &oz)) return NULL;
    if (n < 0 || qmax < 1 || qmax > 65535 || m < 1 || sd < 0 || sd > 2) {
        PyErr_SetString(PyExc_ValueError, "bad parameters");
        return NULL;
    }
    Py_buffer lo, hi, a, z;
    if (get2(olo, &lo, 0, n * 4, "lo")) return NULL;
    if (get2(ohi, &hi, 0, n * 4, "hi")) { PyBuffer_Release(&lo); return NULL; }
    if (get2(oa, &a, 1, n * 4, "a")) { PyBuffer_Release(&lo); PyBuffer_Release(&hi); return NULL; }
    if (get2(oz, &z, 1, n * 4, "z")) { PyBuffer_Release(&lo); PyBuffer_Release(&hi); PyBuffer_Release(&a); return NULL; }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = params_impl((const float *)lo.buf, (const float *)hi.buf, n, qmax, sym, m, sd, (float *)a.buf, (float *)z.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&lo); PyBuffer_Release(&hi); PyBuffer_Release(&a); PyBuffer_Release(&z);
    return PyLong_FromLong(rc);
}

/* One entry point per kernel for float32 (esize 4) and bfloat16-bits (esize 2) weights. */
static PyObject *minmax_entry(PyObject *args, Py_ssize_t esize) {
    PyObject *ow, *olo, *ohi;
    Py_ssize_t n_groups, g;
    if (!PyArg_ParseTuple(args, "OnnOO", &ow, &n_groups, &g, &olo, &ohi)) return NULL;
    if (n_groups < 0 || g < 1) {
        PyErr_SetString(PyExc_ValueError, "bad shape");
        return NULL;
    }
    Py_buffer w, lo, hi;
    if (get2(ow, &w, 0, n_groups * g * esize, "w")) return NULL;
    if (get2(olo, &lo, 1, n_groups * 4, "lo")) { PyBuffer_Release(&w); return NULL; }
    if (get2(ohi, &hi, 1, n_groups * 4, "hi")) { PyBuffer_Release(&w); PyBuffer_Release(&lo); return NULL; }
    int finite;
    Py_BEGIN_ALLOW_THREADS
    if (esize == 2)
        finite = minmax_bf16_impl((const uint16_t *)w.buf, n_groups, g, (float *)lo.buf, (float *)hi.buf);
    else
        finite = minmax_impl((const float *)w.buf, n_groups, g, (float *)lo.buf, (float *)hi.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&w); PyBuffer_Release(&lo); PyBuffer_Release(&hi);
    return PyBool_FromLong(finite);
}

static PyObject *quantize_entry(PyObject *args, Py_ssize_t esize) {
    PyObject *ow, *oa, *oz, *oq;
    Py_ssize_t rows, cols, g;
    int qmax;
    if (!PyArg_ParseTuple(args, "OnnnOOiO", &ow, &rows, &cols, &g, &oa, &oz, &qmax, &oq)) return NULL;
    if (rows < 0 || cols < 1 || g < 1 || qmax < 1 || qmax > 255) {
        PyErr_SetString(PyExc_ValueError, "bad shape or code range");
        return NULL;
    }
    Py_ssize_t groups = (cols + g - 1) / g;
    Py_buffer w, a, z, q;
    if (get2(ow, &w, 0, rows * cols * esize, "w")) return NULL;
    if (get2(oa, &a, 0, rows * groups * 4, "a")) { PyBuffer_Release(&w); return NULL; }
    if (get2(oz, &z, 0, rows * groups * 4, "z")) { PyBuffer_Release(&w); PyBuffer_Release(&a); return NULL; }
    if (get2(oq, &q, 1, rows * cols, "q")) { PyBuffer_Release(&w); PyBuffer_Release(&a); PyBuffer_Release(&z); return NULL; }
    const float *af = (const float *)a.buf, *zf = (const float *)z.buf;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
    if (use_avx2 && esize == 2)
        quantize_bf16_avx2((const uint16_t *)w.buf, rows, cols, g, af, zf, (float)qmax, (uint8_t *)q.buf);
    else if (use_avx2)
        quantize_avx2((const float *)w.buf, rows, cols, g, af, zf, (float)qmax, (uint8_t *)q.buf);
    else
#endif
    if (esize == 2)
        quantize_bf16_impl((const uint16_t *)w.buf, rows, cols, g, af, zf, (float)qmax, (uint8_t *)q.buf);
    else
        quantize_impl((const float *)w.buf, rows, cols, g, af, zf, (float)qmax, (uint8_t *)q.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&w); PyBuffer_Release(&a); PyBuffer_Release(&z); PyBuffer_Release(&q);
    Py_RETURN_NONE;
}

static PyObject *py_minmax(PyObject *self, PyObject *args) { return minmax_entry(args, 4); }
static PyObject *py_minmax_bf16(PyObject *self, PyObject *args) { return minmax_entry(args, 2); }
static PyObject *py_quantize(PyObject *self, PyObject *args) { return quantize_entry(args, 4); }
static PyObject *py_quantize_bf16(PyObject *self, PyObject *args) { return quantize_entry(args, 2); }

static PyObject *py_set_avx2(PyObject *self, PyObject *args) {
    int on, was = use_avx2;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
#ifdef HAVE_AVX2_PATH
    use_avx2 = on && __builtin_cpu_supports("avx2");
#endif
    return PyBool_FromLong(was);
}

static PyMethodDef methods[] = {
    {"set_avx2", py_set_avx2, METH_VARARGS, "set_avx2(on) -> previous: the hand-written AVX2 quantize loop where the CPU has it (tests compare both)"},
    {"minmax_bf16", py_minmax_bf16, METH_VARARGS, "minmax_bf16(w_u16, n_groups, g, lo_out, hi_out) -> all finite"},
    {"quantize_bf16", py_quantize_bf16, METH_VARARGS, "quantize_bf16(w_u16, rows, cols, g, a_f32, z_f32, qmax, q_out_u8)"},
    {"params", py_params, METH_VARARGS,
     "params(lo_f32, hi_f32, n, qmax, symmetric, zero_multiple, scale_dtype 0=F32 1=F16 2=BF16, a_out, z_out) -> 1, 0 (F16 overflow), -1 (non-finite)"},
    {"minmax", py_minmax, METH_VARARGS, "minmax(w_f32, n_groups, g, lo_out, hi_out) -> all finite"},
    {"quantize", py_quantize, METH_VARARGS, "quantize(w_f32, rows, cols, g, a_f32, z_f32, qmax, q_out_u8)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quantkernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quantkernel(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2");
#endif
    return PyModule_Create(&module);
}
