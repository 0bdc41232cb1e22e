/* modalmerge.ops.ckernels: kernels.c's entry points for Python (ops/fused.py calls them).
 *
 * Arrays arrive as addresses (tensors' data_ptr()) with the element offset `start` of the piece
 * to work on, so a caller splitting a block passes the same addresses to every piece. The caller
 * owns the memory and checks the sizes; here only the codes that index kernels.c's tables are
 * checked. The GIL is released around each kernel, so pieces run on several threads at once. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "kernels.h"

static Py_ssize_t element_size(int dtype) { return dtype == MM_F32 ? 4 : 2; }

static int check_codes(int dtype, int aggregate) {
    if (dtype < MM_BF16 || dtype > MM_F32 || aggregate < MM_MEAN || aggregate > MM_MAX) {
        PyErr_Format(PyExc_ValueError, "ckernels: unknown dtype code %d or aggregate code %d", dtype, aggregate);
        return -1;
    }
    return 0;
}

static int check_span(Py_ssize_t start, Py_ssize_t n) {
    if (start < 0 || n < 0) {
        PyErr_SetString(PyExc_ValueError, "ckernels: start and n must be >= 0");
        return -1;
    }
    return 0;
}

/* The models' addresses (a sequence of ints) advanced to element `start`, in a PyMem array the
 * caller frees; NULL with an exception set on a bad sequence. */
static const void **model_pointers(PyObject *models, int dtype, Py_ssize_t start, int *count) {
    PyObject *seq = PySequence_Fast(models, "ckernels: models must be a sequence of addresses");
    if (seq == NULL)
        return NULL;
    Py_ssize_t T = PySequence_Fast_GET_SIZE(seq);
    if (T < 1 || T > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "ckernels: models must hold at least one address");
        Py_DECREF(seq);
        return NULL;
    }
    const void **pointers = PyMem_Malloc((size_t)T * sizeof(void *));
    if (pointers == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t t = 0; t < T; t++) {
        unsigned long long address = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, t));
        if (PyErr_Occurred()) {
            PyMem_Free(pointers);
            Py_DECREF(seq);
            return NULL;
        }
        pointers[t] = (const char *)(uintptr_t)address + start * element_size(dtype);
    }
    Py_DECREF(seq);
    *count = (int)T;
    return pointers;
}

#define AT(address, start, size) ((void *)((char *)(uintptr_t)(address) + (start) * (size)))

static PyObject *trimmed_total(PyObject *self, PyObject *args) {
    int dtype, T;
    unsigned long long base, thr, w, out;
    PyObject *models;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "iKOKKKnn:trimmed_total", &dtype, &base, &models, &thr, &w, &out, &start, &n) ||
        check_codes(dtype, MM_MEAN) || check_span(start, n))
        return NULL;
    const void **m = model_pointers(models, dtype, start, &T);
    if (m == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    mm_trimmed_total(dtype, AT(base, start, element_size(dtype)), m, T, AT(thr, 0, 0), AT(w, 0, 0),
                     AT(out, start, 4), n);
    Py_END_ALLOW_THREADS
    PyMem_Free(m);
    Py_RETURN_NONE;
}

static PyObject *disjoint(PyObject *self, PyObject *args) {
    int dtype, aggregate, T;
    unsigned long long base, thr, w, total, count, out;
    float tie;
    PyObject *models;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "iiKOKKKfKKnn:disjoint", &dtype, &aggregate, &base, &models, &thr, &w, &total, &tie,
                          &count, &out, &start, &n) ||
        check_codes(dtype, aggregate) || check_span(start, n))
        return NULL;
    const void **m = model_pointers(models, dtype, start, &T);
    if (m == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    /* count: scratch of n floats, read and written only when T > MM_GROUP */
    mm_disjoint(dtype, aggregate, AT(base, start, element_size(dtype)), m, T, AT(thr, 0, 0), AT(w, 0, 0),
                AT(total, start, 4), tie, T > MM_GROUP ? AT(count, start, 4) : NULL, AT(out, start, 4), n);
    Py_END_ALLOW_THREADS
    PyMem_Free(m);
    Py_RETURN_NONE;
}

static PyObject *weighted_delta_sum(PyObject *self, PyObject *args) {
    int dtype, T;
    unsigned long long base, w, out;
    PyObject *models;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "iKOKKnn:weighted_delta_sum", &dtype, &base, &models, &w, &out, &start, &n) ||
        check_codes(dtype, MM_MEAN) || check_span(start, n))
        return NULL;
    const void **m = model_pointers(models, dtype, start, &T);
    if (m == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    mm_weighted_delta_sum(dtype, AT(base, start, element_size(dtype)), m, T, AT(w, 0, 0), AT(out, start, 4), n);
    Py_END_ALLOW_THREADS
    PyMem_Free(m);
    Py_RETURN_NONE;
}

static PyObject *magnitude_keys(PyObject *self, PyObject *args) {
    int dtype, m;
    unsigned long long base, model, keys, cuts, counts;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "iKKKKiKnn:magnitude_keys", &dtype, &base, &model, &keys, &cuts, &m, &counts, &start,
                          &n) ||
        check_codes(dtype, MM_MEAN) || check_span(start, n))
        return NULL;
    Py_ssize_t size = element_size(dtype);
    Py_BEGIN_ALLOW_THREADS
    mm_magnitude_keys(dtype, AT(base, start, size), AT(model, start, size), n, AT(keys, start, 2), AT(cuts, 0, 0), m,
                      AT(counts, 0, 0));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *count_at_least(PyObject *self, PyObject *args) {
    int m;
    unsigned long long keys, cuts, counts;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "KKiKnn:count_at_least", &keys, &cuts, &m, &counts, &start, &n) ||
        check_span(start, n))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    mm_count_at_least(AT(keys, start, 2), n, AT(cuts, 0, 0), m, AT(counts, 0, 0));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *boundary_low_counts(PyObject *self, PyObject *args) {
    int dtype;
    unsigned int high;
    unsigned long long base, model, counts;
    Py_ssize_t start, n;
    if (!PyArg_ParseTuple(args, "iKKIKnn:boundary_low_counts", &dtype, &base, &model, &high, &counts, &start, &n) ||
        check_codes(dtype, MM_MEAN) || check_span(start, n))
        return NULL;
    Py_ssize_t size = element_size(dtype);
    Py_BEGIN_ALLOW_THREADS
    mm_boundary_low_counts(dtype, AT(base, start, size), AT(model, start, size), n, high, AT(counts, 0, 0));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *instruction_set(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(mm_instruction_set());
}

static PyMethodDef methods[] = {
    {"trimmed_total", trimmed_total, METH_VARARGS,
     "trimmed_total(dtype, base, models, thr, w, out, start, n): out = sum_t w_t trim(m_t - base, thr_t)"},
    {"disjoint", disjoint, METH_VARARGS,
     "disjoint(dtype, aggregate, base, models, thr, w, total, tie, count, out, start, n): TIES's disjoint merge"},
    {"weighted_delta_sum", weighted_delta_sum, METH_VARARGS,
     "weighted_delta_sum(dtype, base, models, w, out, start, n): out = sum_t w_t (m_t - base)"},
    {"magnitude_keys", magnitude_keys, METH_VARARGS,
     "magnitude_keys(dtype, base, model, keys, cuts, m, counts, start, n): flagged keys of |m - base|, counted"},
    {"count_at_least", count_at_least, METH_VARARGS,
     "count_at_least(keys, cuts, m, counts, start, n): counts[c] += #{keys >= cuts[c]}"},
    {"boundary_low_counts", boundary_low_counts, METH_VARARGS,
     "boundary_low_counts(dtype, base, model, high, counts, start, n): low-16-bit counts inside bin `high`"},
    {"instruction_set", instruction_set, METH_NOARGS,
     "instruction_set(): 'x86-64-v4', 'x86-64-v3' or 'baseline', what the kernels run with on this CPU"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "modalmerge.ops.ckernels",
    "modalmerge's fused CPU kernels (kernels.c), called by modalmerge.ops.fused", -1, methods,
};

PyMODINIT_FUNC PyInit_ckernels(void) { return PyModule_Create(&module); }
