/* The RBD engine's calls per request (librbd.py's RbdEngine) in C, for the compiled build.
 *
 * librbd.py loads librbd with ctypes and keeps every call that is made once per image or once per
 * rare request (opening, flushes, discards, zeroes, block status).  The two calls every READ and
 * WRITE makes, starting one and reaping finished ones, cost the interpreter some 10 µs of the
 * serving thread per request through ctypes (argument conversion, a c_void_p per completion, the
 * iovec array packed by struct); here they are plain calls through the function pointers ctypes
 * found, so this module links against nothing and librbd stays loaded on first use only.
 *
 * Each request started here owns a small block: the iovec array librbd reads the segments'
 * addresses from (kept until the completion, as librbd's documentation does not say when it is
 * done with it), given to librbd as the completion's argument and freed when it is reaped.  The
 * segments' buffers are kept referenced by the caller (librbd.py's _Operation) until then.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

/* <rbd/librbd.h>'s signatures, declared here so that the build needs no librbd headers. */
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);

#define LIBRADOS_OP_FLAG_FADVISE_FUA 0x80
#define POLL_BATCH 64

/* librbd.py's kinds of request; it checks that they match. */
#define KIND_READ 0
#define KIND_WRITE 1
#define KIND_WRITE_FUA 2 /* one segment: one write with the FUA op flag */

static struct {
    int (*create_completion)(void *arg, rbd_callback_t callback, rbd_completion_t *completion);
    int (*readv)(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t offset, rbd_completion_t c);
    int (*writev)(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t offset, rbd_completion_t c);
    int (*write2)(rbd_image_t image, uint64_t offset, size_t length, const char *buffer, rbd_completion_t c,
                  int op_flags);
    int (*poll_io_events)(rbd_image_t image, rbd_completion_t *completions, int count);
    ssize_t (*get_return_value)(rbd_completion_t c);
    void *(*get_arg)(rbd_completion_t c);
    void (*release)(rbd_completion_t c);
} calls;

static int bound = 0;

/* bind(create_completion, readv, writev, write2, poll_io_events, get_return_value, get_arg,
 * release): the functions' addresses, as ctypes found them in librbd.so.1. */
static PyObject *bind(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    void *found[8];
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "bind() takes the 8 functions' addresses");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < 8; i++) {
        found[i] = PyLong_AsVoidPtr(args[i]);
        if (found[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "bind(): a null function");
            return NULL;
        }
    }
    calls.create_completion = found[0];
    calls.readv = found[1];
    calls.writev = found[2];
    calls.write2 = found[3];
    calls.poll_io_events = found[4];
    calls.get_return_value = found[5];
    calls.get_arg = found[6];
    calls.release = found[7];
    bound = 1;
    Py_RETURN_NONE;
}

/* Whether a call may go on: ``nargs`` is what ``usage`` takes, and bind() came first. */
static int callable(Py_ssize_t nargs, Py_ssize_t wanted, const char *usage) {
    if (nargs != wanted) {
        PyErr_Format(PyExc_TypeError, "takes %zd arguments: %s", wanted, usage);
        return 0;
    }
    if (!bound) {
        PyErr_Format(PyExc_RuntimeError, "%s before bind()", usage);
        return 0;
    }
    return 1;
}

struct request {
    int count;
    struct iovec iov[];
};

/* Fill ``request``'s iovecs from ``segments`` (buffers; the empty ones left out). */
static int gather(struct request *request, PyObject **items, Py_ssize_t n, int writable) {
    request->count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(items[i], &view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
            return -1;
        /* Released at once: the caller keeps the segment (a bytearray or a view of one, never
         * resized) referenced until the completion, so its bytes stay where they are. */
        if (view.len > 0) {
            request->iov[request->count].iov_base = view.buf;
            request->iov[request->count].iov_len = (size_t)view.len;
            request->count++;
        }
        PyBuffer_Release(&view);
    }
    return 0;
}

/* start(image, kind, offset, segments) -> the completion's address; 0 if the segments hold no
 * byte (nothing started); -errno if librbd refused the request (nothing will complete). */
static PyObject *start(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (!callable(nargs, 4, "start(image, kind, offset, segments)"))
        return NULL;
    rbd_image_t image = PyLong_AsVoidPtr(args[0]);
    long kind = PyLong_AsLong(args[1]);
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (image == NULL) /* closed: librbd would crash on it */
        return PyLong_FromLong(-EBADF);
    if (kind != KIND_READ && kind != KIND_WRITE && kind != KIND_WRITE_FUA) {
        PyErr_Format(PyExc_ValueError, "start(): no request kind %ld", kind);
        return NULL;
    }
    PyObject *segments = PySequence_Fast(args[3], "start(): segments must be a sequence");
    if (segments == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(segments);
    if (n > 1024) { /* IOV_MAX: the block layer's max_segments never exceeds it */
        Py_DECREF(segments);
        PyErr_Format(PyExc_ValueError, "start(): %zd segments in one request", n);
        return NULL;
    }
    struct request *request = malloc(sizeof(struct request) + (size_t)(n ? n : 1) * sizeof(struct iovec));
    if (request == NULL) {
        Py_DECREF(segments);
        return PyErr_NoMemory();
    }
    int failed = gather(request, PySequence_Fast_ITEMS(segments), n, kind == KIND_READ);
    Py_DECREF(segments);
    if (failed || request->count == 0) {
        free(request);
        return failed ? NULL : PyLong_FromLong(0);
    }
    if (kind == KIND_WRITE_FUA && request->count != 1) {
        free(request);
        PyErr_SetString(PyExc_ValueError, "start(): a FUA write of one segment only");
        return NULL;
    }
    rbd_completion_t completion = NULL;
    int result = calls.create_completion(request, NULL, &completion);
    if (result < 0) {
        free(request);
        return PyLong_FromLong(result);
    }
    if (kind == KIND_READ)
        result = calls.readv(image, request->iov, request->count, offset, completion);
    else if (kind == KIND_WRITE)
        result = calls.writev(image, request->iov, request->count, offset, completion);
    else
        result = calls.write2(image, offset, request->iov[0].iov_len, request->iov[0].iov_base, completion,
                              LIBRADOS_OP_FLAG_FADVISE_FUA);
    if (result < 0) {
        calls.release(completion);
        free(request);
        return PyLong_FromLong(result);
    }
    return PyLong_FromVoidPtr(completion);
}

/* reap(image, eventfd) -> [(completion, result), ...]: every finished completion of the image,
 * released (its block freed), with librbd's return value.  The eventfd is read first, so that a
 * completion finishing after the poll wakes the loop again. */
static PyObject *reap(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (!callable(nargs, 2, "reap(image, eventfd)"))
        return NULL;
    rbd_image_t image = PyLong_AsVoidPtr(args[0]);
    int fd = (int)PyLong_AsLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (image == NULL) {
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    uint64_t count;
    if (read(fd, &count, sizeof count) < 0 && errno != EAGAIN) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    PyObject *finished = PyList_New(0);
    if (finished == NULL)
        return NULL;
    rbd_completion_t polled[POLL_BATCH];
    for (;;) {
        int n = calls.poll_io_events(image, polled, POLL_BATCH);
        if (n < 0) {
            if (PyList_GET_SIZE(finished) > 0)
                return finished; /* these first; the error comes again at the next poll */
            Py_DECREF(finished);
            errno = -n;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        for (int i = 0; i < n; i++) {
            ssize_t result = calls.get_return_value(polled[i]);
            free(calls.get_arg(polled[i])); /* NULL for the requests librbd.py started itself */
            PyObject *pair = Py_BuildValue("(Nn)", PyLong_FromVoidPtr(polled[i]), (Py_ssize_t)result);
            calls.release(polled[i]);
            if (pair == NULL || PyList_Append(finished, pair) < 0) {
                /* Out of memory: the rest are released unreported; their callers wait for ever,
                 * which is what an allocation failure here leaves no better choice for. */
                Py_XDECREF(pair);
                for (int j = i + 1; j < n; j++) {
                    free(calls.get_arg(polled[j]));
                    calls.release(polled[j]);
                }
                Py_DECREF(finished);
                return NULL;
            }
            Py_DECREF(pair);
        }
        if (n < POLL_BATCH)
            return finished;
    }
}

static PyMethodDef functions[] = {
    {"bind", (PyCFunction)(void (*)(void))bind, METH_FASTCALL, NULL},
    {"start", (PyCFunction)(void (*)(void))start, METH_FASTCALL, NULL},
    {"reap", (PyCFunction)(void (*)(void))reap, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rbd", NULL, -1, functions};

PyMODINIT_FUNC PyInit__rbd(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "KIND_READ", KIND_READ) < 0 ||
        PyModule_AddIntConstant(m, "KIND_WRITE", KIND_WRITE) < 0 ||
        PyModule_AddIntConstant(m, "KIND_WRITE_FUA", KIND_WRITE_FUA) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
