/* Compiled fast paths for numerics (the numpy code there is the reference; tests check both give
 * identical results). numpy needs several passes and expanded parameters; these are one pass each:
 *   minmax(w, n_groups, g, lo, hi)            min and max of each run of g floats (finite input)
 *   quantize(w, rows, cols, g, a, z, qmax, q) q = clip(rint(w / a) + z, 0, qmax), float32
 * Round half to even uses the 1.5 * 2^23 trick, exact in the default rounding mode for |x| <= 2^22;
 * larger |x| is clamped first, which cannot change the clipped result (qmax, z < 2^16).
 * Built without -ffast-math and without contraction: every float operation is the IEEE single
 * operation numpy performs (-fno-trapping-math only lets the compiler vectorize the clamps).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

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

static void quantize_impl(const float *w, size_t rows, size_t cols, size_t g, const float *a,
                          const float *z, float qmax, uint8_t *q) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    const float lim = 4194304.0f;    /* 2^22 */
    size_t groups = (cols + g - 1) / g;
    for (size_t r = 0; r < rows; r++) {
        const float *row = w + r * cols;
        uint8_t *out = q + r * cols;
        for (size_t j = 0; j < groups; j++) {
            size_t c0 = j * g, c1 = c0 + g < cols ? c0 + g : cols;
            float aj = a[r * groups + j], zj = z[r * groups + j];
            for (size_t c = c0; c < c1; c++) {
                float x = row[c] / aj;
                x = x > lim ? lim : x;
                x = x < -lim ? -lim : x;
                x = (x + magic) - magic;
                x = x + zj;
                x = x < 0.0f ? 0.0f : x;
                x = x > qmax ? qmax : x;
                out[c] = (uint8_t)(int32_t)x;
            }
        }
    }
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

static PyObject *py_minmax(PyObject *self, PyObject *args) {
    PyObject *ow, *olo, *ohi;
    Py_ssize_t n_groups, g;
    if (!PyArg_ParseTuple(args, "OnnOO", &ow, &n_groups, &g, &olo, &ohi)) return NULL;
    if (n_groups < 0 || g < 1) {
        PyErr_SetString(PyExc_ValueError, "bad shape");
        return NULL;
    }
    Py_buffer w, lo, hi;
    if (get2(ow, &w, 0, n_groups * g * 4, "w")) return NULL;
    if (get2(olo, &lo, 1, n_groups * 4, "lo")) { PyBuffer_Release(&w); return NULL; }
    if (get2(ohi, &hi, 1, n_groups * 4, "hi")) { PyBuffer_Release(&w); PyBuffer_Release(&lo); return NULL; }
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = minmax_impl((const float *)w.buf, n_groups, g, (float *)lo.buf, (float *)hi.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&w); PyBuffer_Release(&lo); PyBuffer_Release(&hi);
    return PyBool_FromLong(finite);
}

static PyObject *py_quantize(PyObject *self, PyObject *args) {
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
    if (get2(ow, &w, 0, rows * cols * 4, "w")) return NULL;
    if (get2(oa, &a, 0, rows * groups * 4, "a")) { PyBuffer_Release(&w); return NULL; }
    if (get2(oz, &z, 0, rows * groups * 4, "z")) { PyBuffer_Release(&w); PyBuffer_Release(&a); return NULL; }
    if (get2(oq, &q, 1, rows * cols, "q")) { PyBuffer_Release(&w); PyBuffer_Release(&a); PyBuffer_Release(&z); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    quantize_impl((const float *)w.buf, rows, cols, g, (const float *)a.buf, (const float *)z.buf, (float)qmax, (uint8_t *)q.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&w); PyBuffer_Release(&a); PyBuffer_Release(&z); PyBuffer_Release(&q);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"minmax", py_minmax, METH_VARARGS, "minmax(w_f32, n_groups, g, lo_out, hi_out) -> all finite"},
    {"quantize", py_quantize, METH_VARARGS, "quantize(w_f32, rows, cols, g, a_f32, z_f32, qmax, q_out_u8)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quantkernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quantkernel(void) { return PyModule_Create(&module); }
