/* Compiled fast path for numerics.quantize (the numpy code there is the reference; tests check both
 * give identical codes). numpy needs the per-group parameters expanded to the weights' shape and
 * four passes; this is one pass:
 *   quantize(w, rows, cols, g, a, z, qmax, q) q = clip(rint(w / a) + z, 0, qmax), float32
 * Round half to even uses the 1.5 * 2^23 trick, exact in the default rounding mode for |x| <= 2^22;
 * larger |x| is clamped first, which cannot change the clipped result (qmax, z < 2^16).
 * Built without -ffast-math: every float operation is the IEEE single operation numpy performs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

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
                x = x > lim ? lim : (x < -lim ? -lim : x);
                x = (x + magic) - magic;
                x = x + zj;
                x = x < 0.0f ? 0.0f : (x > qmax ? qmax : x);
                out[c] = (uint8_t)x;
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
    {"quantize", py_quantize, METH_VARARGS, "quantize(w_f32, rows, cols, g, a_f32, z_f32, qmax, q_out_u8)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quantkernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quantkernel(void) { return PyModule_Create(&module); }
