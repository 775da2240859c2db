/* The journal's writer (journal.py's Journal) in C, for the compiled build.
 *
 * journal.py holds the format, the reference writer, the reader and the reasons; this file writes
 * the same bytes, in the same order, with plain stores: each request taken and each reply queued
 * costs the serving process a few aligned 8-byte stores and one short copy, where the
 * interpreter's stores into a memoryview cost some hundred instructions each.  The two writers are
 * checked to leave identical journals (tests/unit/test_journal.py).
 *
 * Every store into the journal goes through a pointer into the block the writer holds (a buffer
 * export of its memoryview, kept until close), at an offset checked against the block's bounds.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* journal.py's constants; journal.py refuses this writer if any differs. */
#define VERSION 1
#define MAGIC (0x4E42444A524E0000ULL | VERSION)
#define SIZE (2 << 20)
#define HEAD_SIZE 4096
#define SLOT_SIZE 128
#define SLOTS (4096 + 64)
#define SLOT_HEADER 24
#define MAX_HEADER (SLOT_SIZE - SLOT_HEADER)
#define RING_START (HEAD_SIZE + SLOTS * SLOT_SIZE)
#define RING_SIZE (SIZE - RING_START)
#define MAX_RECORD (64 * 1024)
#define CROWDED (RING_SIZE / 2)
#define NONE UINT64_MAX
#define STAGING_MAX (1024 * 1024)
#define TERMS_AT 256
#define MAX_TERMS (HEAD_SIZE - TERMS_AT)
#define FAST_BYTES 4096
#define REF 1
#define FLAG_DISCONNECTING 1
#define FLAG_GIVEN_UP 2

/* A store of a word that a replacement reads (the head's words, a slot's state): a release store, so
 * that no compiler moves it before the stores it follows in the program, and a word that makes
 * records count is never written before them.  (A process that dies has every store it executed
 * seen; only their order in the program matters.) */
#define PUBLISH(word, value) __atomic_store_n(&(word), (uint64_t)(value), __ATOMIC_RELEASE)

enum { W_MAGIC, W_FLAGS, W_CONSUMED, W_BASE, W_DIRECT, W_HEAD, W_TAIL, W_HALF0, W_HALF1, W_HALF_SIZE, W_TAG, W_TAIL_OUT, W_TERMS };

typedef struct {
    PyObject_HEAD
    PyObject *pool;
    PyObject *offsets;     /* the arena's {id(block): offset}, for offset_of */
    PyObject *arena;
    PyObject *block;       /* this journal's block of the arena */
    PyObject *halves;      /* the staging buffer's two halves */
    PyObject *last_block;  /* the block offset_of was asked about last, and its offset */
    long long last_offset;
    Py_buffer buffer;      /* of block: held until close */
    uint8_t *mem;          /* NULL once closed */
    uint64_t *words;
    uint8_t *ring;
    uint64_t *ring_words;
    uint64_t base, consumed, head, tail, out;
    long long record;
    int lagging, half, direct, given_up, nfree;
    int free[SLOTS];
    uint64_t ends[SLOTS];
} Writer;

static PyObject *offset_within_name;

static int closed(Writer *self) {
    if (self->mem == NULL) {
        PyErr_SetString(PyExc_ValueError, "the journal is closed");
        return 1;
    }
    return 0;
}

static void give_up(Writer *self, const char *why) {
    if (self->given_up)
        return;
    self->given_up = 1;
    PUBLISH(self->words[W_FLAGS], self->words[W_FLAGS] | FLAG_GIVEN_UP);
    /* Logged as journal.py logs it; a failure to log must not become this request's error. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject *logging = PyImport_ImportModule("logging");
    PyObject *log = logging ? PyObject_CallMethod(logging, "getLogger", "s", "nbdserver.serving.journal") : NULL;
    PyObject *done = log ? PyObject_CallMethod(log, "warning", "ss",
                                               "connection journal: %s: this connection would not survive a crash", why)
                         : NULL;
    Py_XDECREF(done);
    Py_XDECREF(log);
    Py_XDECREF(logging);
    PyErr_Clear();
    PyErr_Restore(type, value, traceback);
}

/* The offset of a block of the arena (-1: not one), remembered for the last block asked about. */
static long long offset_of(Writer *self, PyObject *block) {
    if (block == self->last_block)
        return self->last_offset;
    PyObject *key = PyLong_FromVoidPtr(block);
    if (key == NULL)
        return -2;
    PyObject *found = PyDict_GetItemWithError(self->offsets, key);
    Py_DECREF(key);
    long long offset = -1;
    if (found != NULL) {
        offset = PyLong_AsLongLong(found);
        if (offset == -1 && PyErr_Occurred())
            return -2;
    } else if (PyErr_Occurred()) {
        return -2;
    }
    Py_INCREF(block);
    Py_XSETREF(self->last_block, block);
    self->last_offset = offset;
    return offset;
}

static void store_consumed(Writer *self) {
    if (self->lagging) {
        self->lagging = 0;
        PUBLISH(self->words[W_CONSUMED], self->consumed);
    }
}

static long long take_block(PyObject *pool, Py_ssize_t size, PyObject **block) {
    *block = PyObject_CallMethod(pool, "take", "n", size);
    return *block == NULL ? -1 : 0;
}

static int Writer_init(Writer *self, PyObject *args, PyObject *kwds) {
    static char *names[] = {"pool", "tag", "in_base", "out_base", "staged", NULL};
    PyObject *pool;
    unsigned long long tag, in_base, out_base;
    Py_ssize_t staged;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OKKKn", names, &pool, &tag, &in_base, &out_base, &staged))
        return -1;
    if (self->pool != NULL) {
        PyErr_SetString(PyExc_TypeError, "a journal is opened once");
        return -1;
    }
    Py_INCREF(pool);
    self->pool = pool;
    self->arena = PyObject_GetAttrString(pool, "arena");
    if (self->arena == NULL)
        return -1;
    if (self->arena == Py_None) {
        PyErr_SetString(PyExc_ValueError, "a journal needs a pool carved from an arena");
        return -1;
    }
    self->offsets = PyObject_GetAttrString(self->arena, "_offsets");
    if (self->offsets == NULL)
        return -1;
    if (!PyDict_Check(self->offsets)) {
        PyErr_SetString(PyExc_TypeError, "the arena's offsets are not a dict");
        return -1;
    }
    self->last_offset = -1;
    if (take_block(pool, SIZE, &self->block) < 0)
        return -1;
    if (PyObject_GetBuffer(self->block, &self->buffer, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (self->buffer.len < SIZE) {
        PyBuffer_Release(&self->buffer);
        PyErr_SetString(PyExc_ValueError, "the pool gave a journal block too small");
        return -1;
    }
    Py_ssize_t halves = staged > STAGING_MAX ? staged : STAGING_MAX;
    PyObject *half0, *half1;
    if (take_block(pool, halves, &half0) < 0)
        goto failed;
    if (take_block(pool, halves, &half1) < 0) {
        Py_DECREF(half0);
        goto failed;
    }
    self->halves = PyTuple_Pack(2, half0, half1);
    Py_DECREF(half0);
    Py_DECREF(half1);
    if (self->halves == NULL)
        goto failed;
    self->mem = self->buffer.buf;
    self->words = (uint64_t *)self->mem;
    self->ring = self->mem + RING_START;
    self->ring_words = (uint64_t *)self->ring;
    self->record = offset_of(self, self->block);
    long long offsets[2] = {offset_of(self, half0), offset_of(self, half1)};
    if (self->record == -2 || offsets[0] == -2 || offsets[1] == -2)
        goto failed;
    self->base = self->consumed = in_base;
    self->out = out_base;
    self->nfree = SLOTS;
    for (int i = 0; i < SLOTS; i++)
        self->free[i] = SLOTS - 1 - i;
    self->given_up = self->record < 0 || offsets[0] < 0 || offsets[1] < 0;
    memset(self->mem, 0, HEAD_SIZE);
    for (int slot = 0; slot < SLOTS; slot++)
        PUBLISH(self->words[(HEAD_SIZE + slot * SLOT_SIZE) >> 3], 0);
    uint64_t *words = self->words;
    PUBLISH(words[W_CONSUMED], in_base);
    PUBLISH(words[W_BASE], in_base << 1);
    PUBLISH(words[W_HALF0], offsets[0] < 0 ? 0 : (uint64_t)offsets[0]);
    PUBLISH(words[W_HALF1], offsets[1] < 0 ? 0 : (uint64_t)offsets[1]);
    PUBLISH(words[W_HALF_SIZE], (uint64_t)halves);
    PUBLISH(words[W_TAG], tag);
    PUBLISH(words[W_TAIL_OUT], out_base);
    PUBLISH(words[W_FLAGS], self->given_up ? FLAG_GIVEN_UP : 0);
    PUBLISH(words[W_MAGIC], MAGIC); /* last: now the journal counts */
    return 0;
failed:
    self->mem = NULL;
    PyBuffer_Release(&self->buffer);
    return -1;
}

static PyObject *Writer_close(Writer *self, PyObject *unused) {
    if (closed(self))
        return NULL;
    PUBLISH(self->words[W_MAGIC], 0);
    self->mem = NULL;
    PyBuffer_Release(&self->buffer);
    PyObject *done = PyObject_CallMethod(self->pool, "give", "O", self->block);
    for (int i = 0; done != NULL && i < 2; i++) {
        Py_DECREF(done);
        done = PyObject_CallMethod(self->pool, "give", "O", PyTuple_GET_ITEM(self->halves, i));
    }
    return done == NULL ? NULL : (Py_DECREF(done), Py_NewRef(Py_None));
}

/* taken(view, pos, length, payload, block, copied=0) -> slot: see journal.py. */
static PyObject *Writer_taken(Writer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 && nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "taken() takes 5 or 6 arguments");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t length = PyLong_AsSsize_t(args[2]);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long payload = PyLong_AsUnsignedLongLong(args[3]);
    if ((payload == (unsigned long long)-1 && PyErr_Occurred()) || closed(self))
        return NULL;
    Py_ssize_t copied = nargs == 6 ? PyLong_AsSsize_t(args[5]) : 0;
    if (copied == -1 && PyErr_Occurred())
        return NULL;
    if (pos < 0 || length < 0 || copied < 0 || (unsigned long long)copied > payload) {
        PyErr_SetString(PyExc_ValueError, "a header at a negative position, or more copied than its payload");
        return NULL;
    }
    PyObject *block = args[4];
    uint64_t end = self->base + pos + length;
    if (self->nfree == 0 || length > MAX_HEADER) {
        give_up(self, "no room for a request");
        self->consumed = end + copied;
        self->lagging = 0;
        PUBLISH(self->words[W_CONSUMED], end + copied);
        return PyLong_FromLong(-1);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (length > view.len || pos > view.len - length) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "a header past the end of the staging buffer");
        return NULL;
    }
    int slot = self->free[--self->nfree];
    size_t at = HEAD_SIZE + (size_t)slot * SLOT_SIZE;
    uint64_t *w = self->words + (at >> 3);
    w[1] = payload << 8 | (uint64_t)length;
    if (payload) {
        long long offset = block == Py_None ? -1 : offset_of(self, block);
        if (offset == -2) {
            PyBuffer_Release(&view);
            self->free[self->nfree++] = slot;
            return NULL;
        }
        if (offset < 0 && block != Py_None) {
            give_up(self, "a payload outside the arena");
            if (closed(self)) {
                PyBuffer_Release(&view);
                return NULL;
            }
        }
        w[2] = offset < 0 ? NONE : (uint64_t)offset;
    }
    memcpy(self->mem + at + SLOT_HEADER, (uint8_t *)view.buf + pos, length);
    PyBuffer_Release(&view);
    PUBLISH(w[0], end << 1 | 1);
    /* Committed later, when the consumed mark stored passes the header (store_consumed). */
    self->consumed = end + copied;
    self->lagging = 1;
    self->ends[slot] = end;
    return PyLong_FromLong(slot);
}

static PyObject *Writer_consumed(Writer *self, PyObject *arg) {
    Py_ssize_t pos = PyLong_AsSsize_t(arg);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    self->consumed = self->base + pos;
    self->lagging = 1;
    Py_RETURN_NONE;
}

static PyObject *Writer_receiving(Writer *self, PyObject *arg) {
    int direct = PyObject_IsTrue(arg);
    if (direct < 0 || closed(self))
        return NULL;
    if (direct != self->direct) {
        store_consumed(self);
        self->direct = direct;
        PUBLISH(self->words[W_DIRECT], direct);
    }
    Py_RETURN_NONE;
}

static PyObject *Writer_received(Writer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "received() takes 2 arguments");
        return NULL;
    }
    long slot = PyLong_AsLong(args[0]);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long got = PyLong_AsUnsignedLongLong(args[1]);
    if ((got == (unsigned long long)-1 && PyErr_Occurred()) || closed(self))
        return NULL;
    if (slot >= SLOTS) {
        PyErr_SetString(PyExc_ValueError, "no such slot");
        return NULL;
    }
    if (slot >= 0) {
        uint64_t consumed = self->ends[slot] + got;
        self->consumed = consumed;
        self->lagging = 0;
        PUBLISH(self->words[W_CONSUMED], consumed);
        self->base = consumed;
        PUBLISH(self->words[W_BASE], consumed << 1 | self->half);
    }
    Py_RETURN_NONE;
}

static PyObject *Writer_moved(Writer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "moved() takes 2 arguments");
        return NULL;
    }
    unsigned long long pos = PyLong_AsUnsignedLongLong(args[0]);
    if (pos == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    long half = PyLong_AsLong(args[1]);
    if ((half == -1 && PyErr_Occurred()) || closed(self))
        return NULL;
    store_consumed(self);
    self->base += pos;
    self->half = half & 1;
    PUBLISH(self->words[W_BASE], self->base << 1 | self->half);
    Py_RETURN_NONE;
}

static PyObject *Writer_disconnecting(Writer *self, PyObject *unused) {
    if (closed(self))
        return NULL;
    store_consumed(self);
    PUBLISH(self->words[W_FLAGS], self->words[W_FLAGS] | FLAG_DISCONNECTING);
    Py_RETURN_NONE;
}

static PyObject *Writer_describe(Writer *self, PyObject *arg) {
    Py_buffer terms;
    if (closed(self) || PyObject_GetBuffer(arg, &terms, PyBUF_SIMPLE) < 0)
        return NULL;
    int fits = terms.len <= MAX_TERMS;
    if (fits) {
        memcpy(self->mem + TERMS_AT, terms.buf, terms.len);
        PUBLISH(self->words[W_TERMS], terms.len); /* the commit */
    }
    PyBuffer_Release(&terms);
    return PyBool_FromLong(fits);
}

/* Count pieces from ``first`` on as queued, unlogged. */
static int count(Writer *self, PyObject *const *pieces, Py_ssize_t first, Py_ssize_t n) {
    for (Py_ssize_t i = first; i < n; i++) {
        Py_ssize_t length = PyObject_Size(pieces[i]);
        if (length < 0)
            return -1;
        self->out += length;
    }
    return 0;
}

/* A reply of the common shapes (a header alone; a header and the data that is ``block``'s first
 * bytes) written at ``at`` of the log, not committed; its size, 0 for any other shape, -1 on error. */
static Py_ssize_t append_fast(Writer *self, uint64_t request, size_t at, PyObject *const *pieces, Py_ssize_t count,
                              PyObject *data, PyObject *block) {
    if (count < 1 || count > 2 || !PyBytes_CheckExact(pieces[0]))
        return 0;
    Py_ssize_t n = PyBytes_GET_SIZE(pieces[0]);
    if (n > FAST_BYTES)
        return 0;
    size_t padded = (n + 7) & ~(size_t)7;
    uint64_t *w = (uint64_t *)(self->ring + at);
    uint64_t m = 0;
    long long offset = 0;
    if (count == 2) {
        if (pieces[1] != data || block == Py_None)
            return 0;
        offset = offset_of(self, block);
        if (offset == -2)
            return -1;
        if (offset < 0)
            return 0;
        Py_ssize_t size = PyObject_Size(pieces[1]);
        if (size < 0)
            return -1;
        m = size;
    }
    size_t size = (count == 1 ? 32 : 48) + padded;
    w[0] = request << 1 | 1;
    w[1] = self->out;
    w[2] = (n + m) << 24 | size;
    w[3] = (uint64_t)n << 1;
    memcpy(w + 4, PyBytes_AS_STRING(pieces[0]), n);
    memset((uint8_t *)(w + 4) + n, 0, padded - n);
    if (count == 2) {
        uint64_t *ref = w + 4 + (padded >> 3);
        ref[0] = m << 1 | REF;
        ref[1] = (uint64_t)offset;
    }
    self->out += n + m;
    return size;
}

/* Log a reply piece by piece (journal.py's _append); -1 on error. */
static int append(Writer *self, uint64_t request, PyObject *const *pieces, Py_ssize_t npieces, PyObject *data,
                  PyObject *block) {
    uint64_t head = self->head;
    size_t at = head % RING_SIZE;
    size_t skip = at + MAX_RECORD > RING_SIZE ? RING_SIZE - at : 0;
    if (head + skip + MAX_RECORD - self->tail > RING_SIZE) {
        give_up(self, "the reply log is full");
        return count(self, pieces, 0, npieces);
    }
    uint64_t *words = self->ring_words;
    if (skip) {
        words[at >> 3] = 0; /* the next record is at the start */
        at = 0;
    }
    Py_ssize_t fast = append_fast(self, request, at, pieces, npieces, data, block);
    if (fast < 0)
        return -1;
    if (fast) {
        self->head = head + skip + fast;
        PUBLISH(self->words[W_HEAD], self->head); /* the commit: the reply counts from here */
        return 0;
    }
    size_t first = at >> 3, w = first + 3;
    uint64_t length = 0;
    for (Py_ssize_t i = 0; i < npieces; i++) {
        PyObject *piece = pieces[i];
        Py_ssize_t n = PyObject_Size(piece);
        if (n < 0)
            return -1;
        length += n;
        if (PyBytes_CheckExact(piece)) {
            if (((w + 1) << 3) + n - at > MAX_RECORD) {
                give_up(self, "a reply too large to log");
                self->out += length - n;
                return count(self, pieces, i, npieces);
            }
            words[w] = (uint64_t)n << 1;
            memcpy(self->ring + ((w + 1) << 3), PyBytes_AS_STRING(piece), n); /* unpadded, as journal.py */
            w += 1 + ((n + 7) >> 3);
            continue;
        }
        long long offset = -1;
        if (piece == data && block != Py_None) {
            offset = offset_of(self, block);
            if (offset == -2)
                return -1;
        }
        if (offset < 0) {
            PyObject *within = PyObject_CallMethodOneArg(self->arena, offset_within_name, piece);
            if (within == NULL)
                return -1;
            offset = PyLong_AsLongLong(within);
            Py_DECREF(within);
            if (offset == -1 && PyErr_Occurred())
                return -1;
        }
        if (offset < 0 || ((w + 2) << 3) - at > MAX_RECORD) {
            give_up(self, "reply data outside the arena, or too many pieces");
            self->out += length - n;
            return count(self, pieces, i, npieces);
        }
        words[w] = (uint64_t)n << 1 | REF;
        words[w + 1] = (uint64_t)offset;
        w += 2;
    }
    size_t size = (w << 3) - at;
    words[first] = request << 1 | 1;
    words[first + 1] = self->out;
    words[first + 2] = length << 24 | size;
    self->out += length;
    self->head = head + skip + size;
    PUBLISH(self->words[W_HEAD], self->head); /* the commit */
    return 0;
}

/* The log holds so much not yet known to be written that no new request should be taken. */
static PyObject *crowded(Writer *self) { return PyBool_FromLong(self->head - self->tail > CROWDED); }

/* reply(slot, pieces, data, block) -> crowded: see journal.py. */
static PyObject *Writer_reply(Writer *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "reply() takes 4 arguments");
        return NULL;
    }
    long slot = PyLong_AsLong(args[0]);
    if ((slot == -1 && PyErr_Occurred()) || closed(self))
        return NULL;
    if (slot >= SLOTS || slot < -1 || (slot >= 0 && self->nfree == SLOTS)) {
        PyErr_SetString(PyExc_ValueError, "no such slot taken");
        return NULL;
    }
    PyObject *pieces = PySequence_Fast(args[1], "the pieces of a reply are a sequence");
    if (pieces == NULL)
        return NULL;
    PyObject *const *items = PySequence_Fast_ITEMS(pieces);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(pieces);
    store_consumed(self); /* the request counts before its answer does */
    int failed = self->given_up ? count(self, items, 0, n)
                                : append(self, slot >= 0 ? self->ends[slot] : 0, items, n, args[2], args[3]);
    Py_DECREF(pieces);
    if (failed)
        return NULL;
    if (slot >= 0) {
        PUBLISH(self->words[(HEAD_SIZE + slot * SLOT_SIZE) >> 3], 0);
        self->free[self->nfree++] = slot;
    }
    return crowded(self);
}

/* written(offset) -> crowded: see journal.py. */
static PyObject *Writer_written(Writer *self, PyObject *arg) {
    unsigned long long offset = PyLong_AsUnsignedLongLong(arg);
    if ((offset == (unsigned long long)-1 && PyErr_Occurred()) || closed(self))
        return NULL;
    uint64_t tail = self->tail, head = self->head, end;
    if (tail == head)
        return crowded(self);
    if (offset >= self->out && !self->given_up) {
        end = self->out;
        tail = head;
    } else {
        int found = 0;
        uint64_t *words = self->ring_words;
        end = 0;
        while (tail < head) {
            size_t w = (tail % RING_SIZE) >> 3;
            if (words[w] == 0) {
                tail += RING_SIZE - (w << 3);
                continue;
            }
            uint64_t sizes = words[w + 2];
            uint64_t record_end = words[w + 1] + (sizes >> 24);
            if (record_end > offset)
                break;
            tail += sizes & 0xFFFFFF;
            end = record_end;
            found = 1;
        }
        if (!found)
            return crowded(self);
    }
    PUBLISH(self->words[W_TAIL_OUT], end);
    self->tail = tail;
    PUBLISH(self->words[W_TAIL], tail);
    return crowded(self);
}

static PyObject *Writer_give_up(Writer *self, PyObject *arg) {
    const char *why = PyUnicode_AsUTF8(arg);
    if (why == NULL || closed(self))
        return NULL;
    give_up(self, why);
    Py_RETURN_NONE;
}

static PyObject *Writer_crowded(Writer *self, void *unused) { return crowded(self); }
static PyObject *Writer_out(Writer *self, void *unused) { return PyLong_FromUnsignedLongLong(self->out); }
static PyObject *Writer_given_up(Writer *self, void *unused) { return PyBool_FromLong(self->given_up); }
static PyObject *Writer_record(Writer *self, void *unused) { return PyLong_FromLongLong(self->record); }
static PyObject *Writer_halves(Writer *self, void *unused) {
    return Py_NewRef(self->halves ? self->halves : Py_None);
}

static int Writer_traverse(Writer *self, visitproc visit, void *arg) {
    Py_VISIT(self->pool);
    Py_VISIT(self->offsets);
    Py_VISIT(self->arena);
    Py_VISIT(self->block);
    Py_VISIT(self->halves);
    Py_VISIT(self->last_block);
    return 0;
}

static int Writer_clear(Writer *self) {
    if (self->mem != NULL) {
        self->mem = NULL;
        PyBuffer_Release(&self->buffer);
    }
    Py_CLEAR(self->pool);
    Py_CLEAR(self->offsets);
    Py_CLEAR(self->arena);
    Py_CLEAR(self->block);
    Py_CLEAR(self->halves);
    Py_CLEAR(self->last_block);
    return 0;
}

static void Writer_dealloc(Writer *self) {
    PyObject_GC_UnTrack(self);
    Writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Writer_methods[] = {
    {"close", (PyCFunction)Writer_close, METH_NOARGS, NULL},
    {"taken", (PyCFunction)(void (*)(void))Writer_taken, METH_FASTCALL, NULL},
    {"consumed", (PyCFunction)Writer_consumed, METH_O, NULL},
    {"receiving", (PyCFunction)Writer_receiving, METH_O, NULL},
    {"received", (PyCFunction)(void (*)(void))Writer_received, METH_FASTCALL, NULL},
    {"moved", (PyCFunction)(void (*)(void))Writer_moved, METH_FASTCALL, NULL},
    {"disconnecting", (PyCFunction)Writer_disconnecting, METH_NOARGS, NULL},
    {"describe", (PyCFunction)Writer_describe, METH_O, NULL},
    {"reply", (PyCFunction)(void (*)(void))Writer_reply, METH_FASTCALL, NULL},
    {"written", (PyCFunction)Writer_written, METH_O, NULL},
    {"give_up", (PyCFunction)Writer_give_up, METH_O, NULL},
    {NULL},
};

static PyGetSetDef Writer_getset[] = {
    {"crowded", (getter)Writer_crowded, NULL, NULL, NULL},
    {"out", (getter)Writer_out, NULL, NULL, NULL},
    {"given_up", (getter)Writer_given_up, NULL, NULL, NULL},
    {"record", (getter)Writer_record, NULL, NULL, NULL},
    {"halves", (getter)Writer_halves, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "nbdserver.serving._journal.Writer",
    .tp_doc = "A connection's journal, as the process serving it writes it (journal.py's Journal, in C).",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_traverse = (traverseproc)Writer_traverse,
    .tp_clear = (inquiry)Writer_clear,
    .tp_methods = Writer_methods,
    .tp_getset = Writer_getset,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_journal", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__journal(void) {
    if (PyType_Ready(&WriterType) < 0)
        return NULL;
    offset_within_name = PyUnicode_InternFromString("offset_within");
    if (offset_within_name == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Writer", (PyObject *)&WriterType) < 0 ||
        PyModule_AddIntConstant(m, "VERSION", VERSION) < 0 || PyModule_AddIntConstant(m, "SIZE", SIZE) < 0 ||
        PyModule_AddIntConstant(m, "HEAD_SIZE", HEAD_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_SIZE", SLOT_SIZE) < 0 || PyModule_AddIntConstant(m, "SLOTS", SLOTS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_RECORD", MAX_RECORD) < 0 ||
        PyModule_AddIntConstant(m, "STAGING_MAX", STAGING_MAX) < 0 ||
        PyModule_AddIntConstant(m, "TERMS_AT", TERMS_AT) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_HEADER", SLOT_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "FAST_BYTES", FAST_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "RING_START", RING_START) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
