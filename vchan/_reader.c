/*
 * vchan._reader: the per-call fast paths of vchan.StreamReader in C (and
 * the gathered writelines() of a session stream's transport, at the end).
 *
 * A StreamReader answers most read(n), readexactly(n), readline() and
 * readuntil(separator) calls from the first piece it holds: a slice of one
 * bytes object.  In Python
 * each such call costs a coroutine object, a frame and ~35 bytecodes around
 * the one slice (about 0.4 us on CPython 3.11), which is most of what a
 * receiver of small messages spends per message.  Here the reader's state
 * that those paths read lives in C slots of a base class (ReaderCore), and
 * the four methods return a small awaitable (Call) that does the same, in
 * C, when it is first resumed; when the first piece does not answer the
 * call, it runs the reader's Python method (_read_slow, _readexactly_slow,
 * _readline_slow, _readuntil_slow) as a coroutine and passes everything
 * through to it, as ``await`` would.
 *
 * A Call behaves as the coroutine it replaces: nothing is taken from the
 * reader until it is awaited (a call that is never awaited, or a task
 * cancelled before it starts, loses no bytes), it can be awaited once, and
 * it is registered as a collections.abc.Coroutine (vchan/streams.py), so
 * that asyncio.create_task(), wait_for(), gather() and asyncio.run() take it.
 *
 * The slots are asyncio's own attribute names (_exception, _paused, _limit)
 * and the reader's (_chunks, _pos, _size): both asyncio's StreamReader code
 * and vchan's keep using them as plain attributes.  Every fast path checks
 * what the Python one checks, in the same order, and declines (the Python
 * method then runs) on anything unusual: an exception set, a state it does
 * not expect.  A paused reader is served too (a reader that falls behind
 * its sender is paused most of the time): once it is down to its limit,
 * the fast path calls _maybe_resume_transport() as the Python paths do.
 *
 * Stable ABI (Py_LIMITED_API 3.11), like vchan._native.
 */

#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030B0000
#endif
#define _GNU_SOURCE             /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#include "mux.h"                /* struct vchan_direct (the functions are _native's) */

/* -- ReaderCore: the slots ------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *exception;        /* _exception: None or the exception to raise */
    PyObject *paused;           /* _paused: True / False */
    PyObject *limit;            /* _limit: int */
    PyObject *chunks;           /* _chunks: collections.deque of bytes */
    PyObject *pos;              /* _pos: int, bytes of _chunks[0] already taken */
    PyObject *size;             /* _size: int, bytes buffered */
    PyObject *ring;             /* _ring: int, of them announced in a ring (not in _chunks) */
    PyObject *source;           /* _source: the transport they are taken from, or None */
    PyObject *direct_owner;     /* what keeps *direct alive */
    struct vchan_direct *direct;    /* the session's announced run, or NULL */
    PyObject *assembly;         /* a large readexactly()'s bytes being filled, or NULL */
    Py_ssize_t assembled;       /* of them filled */
} ReaderCore;

static PyMemberDef core_members[] = {
    {"_exception", T_OBJECT_EX, offsetof(ReaderCore, exception), 0, NULL},
    {"_paused", T_OBJECT_EX, offsetof(ReaderCore, paused), 0, NULL},
    {"_limit", T_OBJECT_EX, offsetof(ReaderCore, limit), 0, NULL},
    {"_chunks", T_OBJECT_EX, offsetof(ReaderCore, chunks), 0, NULL},
    {"_pos", T_OBJECT_EX, offsetof(ReaderCore, pos), 0, NULL},
    {"_size", T_OBJECT_EX, offsetof(ReaderCore, size), 0, NULL},
    {"_ring", T_OBJECT_EX, offsetof(ReaderCore, ring), 0, NULL},
    {"_source", T_OBJECT_EX, offsetof(ReaderCore, source), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static int core_traverse(ReaderCore *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE((PyObject *)self));
    Py_VISIT(self->exception);
    Py_VISIT(self->paused);
    Py_VISIT(self->limit);
    Py_VISIT(self->chunks);
    Py_VISIT(self->pos);
    Py_VISIT(self->size);
    Py_VISIT(self->ring);
    Py_VISIT(self->source);
    Py_VISIT(self->direct_owner);
    return 0;
}

static int core_clear(ReaderCore *self)
{
    Py_CLEAR(self->exception);
    Py_CLEAR(self->paused);
    Py_CLEAR(self->limit);
    Py_CLEAR(self->chunks);
    Py_CLEAR(self->pos);
    Py_CLEAR(self->size);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->source);
    self->direct = NULL;
    Py_CLEAR(self->direct_owner);
    Py_CLEAR(self->assembly);
    self->assembled = 0;
    return 0;
}

/* The dealloc of a garbage-collected heap type whose references ``clear``
   drops (both of this module's types; the instance may be of a subclass). */
static void gc_dealloc(PyObject *self, inquiry clear)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static void core_dealloc(ReaderCore *self)
{
    gc_dealloc((PyObject *)self, (inquiry)core_clear);
}

/* -- the fast paths ---------------------------------------------------------------- */

static PyObject *resume_name;       /* "_maybe_resume_transport" */
static PyObject *popleft_name;      /* "popleft" */

enum { KIND_READ, KIND_READEXACTLY, KIND_READLINE, KIND_READUNTIL };
#define KINDS 4

/* A value of a slot as a Py_ssize_t, or -1 (no error set) if it is not a
   non-negative int that fits. */
static Py_ssize_t slot_size(PyObject *v)
{
    if (v == NULL || !PyLong_Check(v))
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(v);
    if (n < 0) {
        PyErr_Clear();
        return -1;
    }
    return n;
}

/* Replace an int slot; 0, or -1 with an error set. */
static int set_slot(PyObject **slot, Py_ssize_t value)
{
    PyObject *v = PyLong_FromSsize_t(value);
    if (v == NULL)
        return -1;
    PyObject *old = *slot;
    *slot = v;
    Py_XDECREF(old);
    return 0;
}

/* -- taking straight from the ring ------------------------------------------------ */

/* vchan._native's functions (vchan/mux.c), whose addresses vchan.mux
   hands over once (set_direct_functions): this module does not link them. */
static int (*direct_take)(struct vchan_direct *d, void *buf, uint32_t len);
static int (*direct_find)(struct vchan_direct *d, uint8_t sep, uint32_t limit);
static int (*direct_rest)(struct vchan_direct *d);
static int (*direct_due)(const struct vchan_direct *d);
/* ... and vchan_session_writev (vchan/session.c), for writelines() (writev). */
static int (*session_writev)(const void *out, uint32_t stream, const struct vchan_iov *iov,
                             uint32_t len);
static PyObject *taken_name;        /* "_ring_taken" */
static PyObject *failed_name;       /* "_ring_failed" */

/* read(n) takes at most this much of a run at once (a frame's most): a
   larger bytes object would come from mmap (glibc's threshold starts at
   128 KiB) and fault its pages in on every call. */
#define DIRECT_MAX (64 << 10)

/* A corrupt ring (code: vchan_direct_take's error): the session fails,
 * and raises why.  Always NULL, with an exception set. */
static PyObject *ring_failed(ReaderCore *r, long code)
{
    PyObject *value = PyLong_FromLong(code);
    if (value != NULL) {
        PyObject *res = PyObject_CallMethodObjArgs(r->source, failed_name, value, NULL);
        Py_XDECREF(res);
        Py_DECREF(value);
    }
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_RuntimeError, "vchan: taking from the ring failed");
    return NULL;
}

/* Take k (> 0, <= ring) of the ring bytes announced to r, into new bytes
 * (a new reference; NULL with an error set).  _ring goes down by k (the
 * caller sees to _size); the session is told when its run is over or a
 * waiting writer is owed its wake-up, and fails if the ring is corrupt. */
static PyObject *ring_take(ReaderCore *r, Py_ssize_t k, Py_ssize_t ring)
{
    PyObject *data = PyBytes_FromStringAndSize(NULL, k);
    if (data == NULL)
        return NULL;
    char *buf = PyBytes_AsString(data);
    if (buf == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    int got = direct_take(r->direct, buf, (uint32_t)k);
    if (got != k) {
        Py_DECREF(data);
        return ring_failed(r, got);
    }
    if (set_slot(&r->ring, ring - k) < 0) {
        Py_DECREF(data);
        return NULL;
    }
    if (direct_due(r->direct)) {
        /* The run is over, or a waiting writer is owed its wake-up. */
        PyObject *res = PyObject_CallMethodObjArgs(r->source, taken_name, NULL);
        if (res == NULL) {
            Py_DECREF(data);
            return NULL;
        }
        Py_DECREF(res);
    }
    return data;
}

/* The ring bytes announced to r (> 0), if it can take them itself; else 0. */
static Py_ssize_t ring_ready(ReaderCore *r)
{
    struct vchan_direct *d = r->direct;
    Py_ssize_t ring = slot_size(r->ring);
    if (d == NULL || direct_take == NULL || ring <= 0 || (uint32_t)ring != d->left ||
        r->source == NULL || r->source == Py_None)
        return 0;
    return ring;
}

/* vchan_direct_find of sep within limit (any size) in the head frame of
 * r's announced run: the bytes through it, 0, or an error. */
static int ring_find(ReaderCore *r, uint8_t sep, Py_ssize_t limit)
{
    return direct_find(r->direct, sep, limit > UINT32_MAX ? UINT32_MAX : (uint32_t)limit);
}

/* The call answered from the ring bytes announced to a reader whose
 * chunks are empty (as fast_path: a new reference, or NULL with or without
 * an error set).  The frames are copied once, into the bytes returned. */
static PyObject *direct_path(ReaderCore *r, int kind, Py_ssize_t n, PyObject *separator,
                             Py_ssize_t size, Py_ssize_t limit, int paused)
{
    Py_ssize_t ring = ring_ready(r);
    if (ring <= 0 || ring > size)
        return NULL;
    Py_ssize_t k;
    if (kind == KIND_READ) {
        k = n < ring ? n : ring;
        if (k > DIRECT_MAX)
            k = DIRECT_MAX;
    } else if (kind == KIND_READEXACTLY) {
        if (n <= 0 || n > ring)
            return NULL;
        k = n;
    } else {
        uint8_t sep = '\n';
        if (separator != NULL) {
            if (PyBytes_Size(separator) != 1)
                return NULL;        /* (longer ones: the Python method) */
            sep = (uint8_t)PyBytes_AsString(separator)[0];
        }
        int found = ring_find(r, sep, limit);
        if (found <= 0)
            return NULL;            /* not in the head frame, or trouble: Python looks */
        k = found;
    }
    PyObject *data = ring_take(r, k, ring);
    if (data == NULL)
        return NULL;
    if (set_slot(&r->size, size - k) < 0) {
        Py_DECREF(data);
        return NULL;
    }
    if (paused && size - k <= limit) {
        PyObject *res = PyObject_CallMethodObjArgs((PyObject *)r, resume_name, NULL);
        if (res == NULL) {
            Py_DECREF(data);
            return NULL;
        }
        Py_DECREF(res);
    }
    return data;
}

/* The bytes the call returns when the first piece answers it (a new
 * reference), NULL with no error set when it does not (the Python method
 * decides), or NULL with an error set.  The state is changed only when
 * bytes are returned. */
static PyObject *fast_path(ReaderCore *r, int kind, Py_ssize_t n, PyObject *separator)
{
    int until = kind == KIND_READLINE || kind == KIND_READUNTIL;
    if (r->exception != Py_None || r->chunks == NULL)
        return NULL;
    int paused = r->paused == Py_True;
    if (!paused && r->paused != Py_False)
        return NULL;
    if (!until && n < 0)
        return NULL;
    if (kind == KIND_READ && n == 0)
        return NULL;
    Py_ssize_t count = PyObject_Size(r->chunks);
    if (count < 0) {
        PyErr_Clear();
        return NULL;
    }
    Py_ssize_t pos = slot_size(r->pos), size = slot_size(r->size);
    Py_ssize_t limit = slot_size(r->limit);
    if (pos < 0 || size < 0 || limit < 0)
        return NULL;
    if (count == 0)
        return direct_path(r, kind, n, separator, size, limit, paused);
    PyObject *head = PySequence_GetItem(r->chunks, 0);
    if (head == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *data = NULL;
    if (!PyBytes_CheckExact(head))
        goto out;
    Py_ssize_t len = PyBytes_Size(head);
    const char *buf = PyBytes_AsString(head);
    if (buf == NULL || pos > len) {
        PyErr_Clear();
        goto out;
    }
    Py_ssize_t end;
    int pop = 0;
    if (until) {
        /* The separator ends inside the first piece and starts within the
           limit (readuntil()'s fast path: no earlier one can straddle two
           pieces).  Ending the piece, it pops it. */
        const char *sep = "\n";
        Py_ssize_t sep_len = 1;
        if (separator != NULL) {
            sep = PyBytes_AsString(separator);
            sep_len = PyBytes_Size(separator);
            if (sep == NULL || sep_len <= 0) {
                PyErr_Clear();
                goto out;
            }
        }
        const char *found = sep_len == 1
            ? memchr(buf + pos, sep[0], (size_t)(len - pos))
            : memmem(buf + pos, (size_t)(len - pos), sep, (size_t)sep_len);
        if (found == NULL)
            goto out;
        Py_ssize_t i = found - buf;
        if (i - pos > limit)
            goto out;
        end = i + sep_len;
        pop = end == len;
        n = end - pos;
    } else {
        /* (the Python paths take a read that ends the piece) */
        if (n >= len - pos)
            goto out;
        end = pos + n;
    }
    if (n > size)
        goto out;               /* inconsistent state: let Python see it */
    if (pop && pos == 0) {
        Py_INCREF(head);        /* the whole piece is the answer: no copy */
        data = head;
    } else {
        data = PyBytes_FromStringAndSize(buf + pos, n);
        if (data == NULL)
            goto out;
    }
    if (pop) {
        PyObject *gone = PyObject_CallMethodObjArgs(r->chunks, popleft_name, NULL);
        if (gone == NULL) {
            Py_CLEAR(data);
            goto out;
        }
        Py_DECREF(gone);
        end = 0;
    }
    if (set_slot(&r->pos, end) < 0 || set_slot(&r->size, size - n) < 0) {
        Py_CLEAR(data);
        goto out;
    }
    if (paused && size - n <= limit) {
        /* Down to the limit: reading resumes (_maybe_resume_transport, as
           the Python paths call it; once per pause). */
        PyObject *res = PyObject_CallMethodObjArgs((PyObject *)r, resume_name, NULL);
        if (res == NULL)
            Py_CLEAR(data);
        else
            Py_DECREF(res);
    }
out:
    Py_DECREF(head);
    return data;
}

/* -- Call: the awaitable --------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *reader;           /* until it has started */
    PyObject *inner;            /* the Python method's coroutine, while it runs */
    PyObject *separator;        /* readuntil()'s argument, as given */
    Py_ssize_t n;
    int kind;
    int state;                  /* NEW, RUNNING (in inner), DONE */
} Call;

enum { NEW, RUNNING, DONE };

/* The module's types and names (single-phase initialisation, as cffi's
   modules: one interpreter). */
static PyTypeObject *call_type;
static PyObject *slow_names[KINDS]; /* _read_slow, ..., _readuntil_slow */

static int call_traverse(Call *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE((PyObject *)self));
    Py_VISIT(self->reader);
    Py_VISIT(self->inner);
    Py_VISIT(self->separator);
    return 0;
}

static int call_clear(Call *self)
{
    Py_CLEAR(self->reader);
    Py_CLEAR(self->inner);
    Py_CLEAR(self->separator);
    return 0;
}

static void call_dealloc(Call *self)
{
    gc_dealloc((PyObject *)self, (inquiry)call_clear);
}

/* Start the Python method's coroutine (the fast path declined). */
static int call_start_inner(Call *self, PyObject *slow_name)
{
    PyObject *coro;
    if (self->kind == KIND_READLINE) {
        coro = PyObject_CallMethodObjArgs(self->reader, slow_name, NULL);
    } else if (self->kind == KIND_READUNTIL) {
        coro = self->separator == NULL
            ? PyObject_CallMethodObjArgs(self->reader, slow_name, NULL)
            : PyObject_CallMethodObjArgs(self->reader, slow_name, self->separator, NULL);
    } else {
        PyObject *n = PyLong_FromSsize_t(self->n);
        if (n == NULL)
            return -1;
        coro = PyObject_CallMethodObjArgs(self->reader, slow_name, n, NULL);
        Py_DECREF(n);
    }
    if (coro == NULL)
        return -1;
    Py_CLEAR(self->reader);
    Py_CLEAR(self->separator);
    self->inner = coro;
    self->state = RUNNING;
    return 0;
}

static PySendResult call_send(Call *self, PyObject *arg, PyObject **result)
{
    if (self->state == NEW) {
        if (arg != Py_None) {
            self->state = DONE;
            Py_CLEAR(self->reader);
            PyErr_SetString(PyExc_TypeError,
                            "can't send non-None value to a just-started coroutine");
            *result = NULL;
            return PYGEN_ERROR;
        }
        /* (readuntil(): a bytes separator only; a tuple or another buffer
           is the Python method's) */
        PyObject *sep = self->separator;
        PyObject *data = (sep != NULL && !(PyBytes_CheckExact(sep) && PyBytes_Size(sep) > 0))
            ? NULL
            : fast_path((ReaderCore *)self->reader, self->kind, self->n, sep);
        if (data != NULL || PyErr_Occurred()) {
            self->state = DONE;
            Py_CLEAR(self->reader);
            *result = data;
            return data != NULL ? PYGEN_RETURN : PYGEN_ERROR;
        }
        if (call_start_inner(self, slow_names[self->kind]) < 0) {
            self->state = DONE;
            Py_CLEAR(self->reader);
            *result = NULL;
            return PYGEN_ERROR;
        }
    }
    if (self->state == DONE) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
        *result = NULL;
        return PYGEN_ERROR;
    }
    PySendResult r = PyIter_Send(self->inner, arg, result);
    if (r != PYGEN_NEXT) {
        self->state = DONE;
        Py_CLEAR(self->inner);
    }
    return r;
}

/* StopIteration(value) set as the current exception. */
static void set_stop_iteration(PyObject *value)
{
    PyObject *exc = PyObject_CallFunctionObjArgs(PyExc_StopIteration, value, NULL);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
}

static PyObject *send_result(PySendResult r, PyObject *result)
{
    if (r == PYGEN_NEXT)
        return result;
    if (r == PYGEN_RETURN) {
        if (result == Py_None)
            PyErr_SetNone(PyExc_StopIteration);
        else
            set_stop_iteration(result);
        Py_XDECREF(result);
    }
    return NULL;
}

static PyObject *call_iternext(Call *self)
{
    PyObject *result;
    PySendResult r = call_send(self, Py_None, &result);
    if (r == PYGEN_RETURN && result == Py_None) {
        Py_DECREF(result);
        return NULL;            /* exhausted, as a generator returning None */
    }
    return send_result(r, result);
}

static PyObject *call_send_method(Call *self, PyObject *arg)
{
    PyObject *result;
    PySendResult r = call_send(self, arg, &result);
    return send_result(r, result);
}

/* throw(typ[, val[, tb]]) of a coroutine that is not suspended anywhere:
 * raise what was thrown in (always returns NULL). */
static PyObject *raise_thrown(PyObject *args)
{
    PyObject *typ, *val = NULL, *tb = NULL;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb))
        return NULL;
    if (PyExceptionInstance_Check(typ))
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    else if (PyExceptionClass_Check(typ))
        PyErr_SetObject(typ, val);
    else
        PyErr_SetString(PyExc_TypeError,
                        "exceptions must be classes or instances deriving from BaseException");
    return NULL;
}

static PyObject *call_throw(Call *self, PyObject *args)
{
    if (self->state == RUNNING) {
        PyObject *meth = PyObject_GetAttrString(self->inner, "throw");
        if (meth == NULL)
            return NULL;
        PyObject *r = PyObject_Call(meth, args, NULL);
        Py_DECREF(meth);
        if (r == NULL) {
            self->state = DONE;
            Py_CLEAR(self->inner);
        }
        return r;
    }
    /* Not started (or done): it ends here, raising what was thrown in. */
    self->state = DONE;
    Py_CLEAR(self->reader);
    return raise_thrown(args);
}

static PyObject *call_close(Call *self, PyObject *Py_UNUSED(ignored))
{
    if (self->state == RUNNING) {
        self->state = DONE;
        PyObject *inner = self->inner;
        self->inner = NULL;
        PyObject *r = PyObject_CallMethod(inner, "close", NULL);
        Py_DECREF(inner);
        return r;
    }
    self->state = DONE;
    Py_CLEAR(self->reader);
    Py_RETURN_NONE;
}

static PyObject *call_await(Call *self)
{
    Py_INCREF((PyObject *)self);
    return (PyObject *)self;
}

static PyObject *call_get_cr_await(Call *self, void *Py_UNUSED(closure))
{
    if (self->state == RUNNING && self->inner != NULL) {
        PyObject *v = PyObject_GetAttrString(self->inner, "cr_await");
        if (v == NULL)
            PyErr_Clear();
        else
            return v;
    }
    Py_RETURN_NONE;
}

static PyObject *call_get_name(Call *self, void *Py_UNUSED(closure))
{
    static const char *names[] = {"read", "readexactly", "readline", "readuntil"};
    return PyUnicode_FromString(names[self->kind]);
}

static PyObject *call_get_qualname(Call *self, void *Py_UNUSED(closure))
{
    static const char *names[] = {"StreamReader.read", "StreamReader.readexactly",
                                  "StreamReader.readline", "StreamReader.readuntil"};
    return PyUnicode_FromString(names[self->kind]);
}

static PyMethodDef call_methods[] = {
    {"send", (PyCFunction)call_send_method, METH_O, "Resume with a value (as coroutine.send)."},
    {"throw", (PyCFunction)call_throw, METH_VARARGS,
     "Raise an exception at the point of suspension (as coroutine.throw)."},
    {"close", (PyCFunction)call_close, METH_NOARGS, "End it (as coroutine.close)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef call_getset[] = {
    {"cr_await", (getter)call_get_cr_await, NULL, "What it waits on, or None.", NULL},
    {"__name__", (getter)call_get_name, NULL, NULL, NULL},
    {"__qualname__", (getter)call_get_qualname, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot call_slots[] = {
    {Py_tp_doc, "A StreamReader call being awaited (see vchan._reader)."},
    {Py_tp_traverse, call_traverse},
    {Py_tp_clear, call_clear},
    {Py_tp_dealloc, call_dealloc},
    {Py_tp_iter, call_await},       /* (an iterator of itself, as awaiting needs) */
    {Py_tp_iternext, call_iternext},
    {Py_tp_methods, call_methods},
    {Py_tp_getset, call_getset},
    {Py_am_await, call_await},
    {Py_am_send, call_send},
    {0, NULL},
};

static PyType_Spec call_spec = {
    .name = "vchan._reader.Call",
    .basicsize = sizeof(Call),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = call_slots,
};

/* -- Done: what StreamWriter.drain() returns when there is nothing to wait for --- */

/* An awaitable (and a coroutine, as registered in vchan/_writer.py) that is
 * over as soon as it is resumed, with None.  Stateless: one instance serves
 * every call, so a drain() with nothing to wait for makes no object at all
 * (asyncio's makes two coroutines). */

typedef struct {
    PyObject_HEAD
} Done;

static PySendResult done_send(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(arg),
                              PyObject **result)
{
    Py_INCREF(Py_None);
    *result = Py_None;
    return PYGEN_RETURN;
}

static PyObject *done_iternext(PyObject *Py_UNUSED(self))
{
    return NULL;                /* exhausted: as a generator returning None */
}

static PyObject *done_send_method(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(arg))
{
    PyErr_SetNone(PyExc_StopIteration);
    return NULL;
}

static PyObject *done_throw(PyObject *Py_UNUSED(self), PyObject *args)
{
    /* Not suspended anywhere: what is thrown in is raised, as by a
     * coroutine that has not started. */
    return raise_thrown(args);
}

static PyObject *done_close(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored))
{
    Py_RETURN_NONE;
}

static PyObject *done_await(PyObject *self)
{
    Py_INCREF(self);
    return self;
}

static PyObject *done_get_none(PyObject *Py_UNUSED(self), void *Py_UNUSED(closure))
{
    Py_RETURN_NONE;
}

static PyObject *done_get_name(PyObject *Py_UNUSED(self), void *closure)
{
    return PyUnicode_FromString(closure ? "StreamWriter.drain" : "drain");
}

static PyMethodDef done_methods[] = {
    {"send", (PyCFunction)done_send_method, METH_O, "Over: raises StopIteration."},
    {"throw", (PyCFunction)done_throw, METH_VARARGS, "Raises what is thrown in."},
    {"close", (PyCFunction)done_close, METH_NOARGS, "Nothing to close."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef done_getset[] = {
    {"cr_await", (getter)done_get_none, NULL, "None: it waits on nothing.", NULL},
    {"__name__", (getter)done_get_name, NULL, NULL, NULL},
    {"__qualname__", (getter)done_get_name, NULL, NULL, (void *)1},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot done_slots[] = {
    {Py_tp_doc, "An awaitable over at once with None: StreamWriter.drain() with nothing "
                "to wait for (see vchan._reader)."},
    {Py_tp_iter, done_await},
    {Py_tp_iternext, done_iternext},
    {Py_tp_methods, done_methods},
    {Py_tp_getset, done_getset},
    {Py_am_await, done_await},
    {Py_am_send, done_send},
    {0, NULL},
};

static PyType_Spec done_spec = {
    .name = "vchan._reader.Done",
    .basicsize = sizeof(Done),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = done_slots,
};

/* -- ReaderCore's methods ------------------------------------------------------------ */

static PyObject *new_call(ReaderCore *self, int kind, Py_ssize_t n)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(call_type, Py_tp_alloc);
    Call *call = (Call *)alloc(call_type, 0);
    if (call == NULL)
        return NULL;
    Py_INCREF((PyObject *)self);
    call->reader = (PyObject *)self;
    call->inner = NULL;
    call->separator = NULL;
    call->n = n;
    call->kind = kind;
    call->state = NEW;
    return (PyObject *)call;
}

/* The one argument ``n`` of read() / readexactly(), positional or by
   keyword, as asyncio's methods take it; 0, or -1 with an error set. */
static int parse_n(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                   PyObject *kwnames, int required, Py_ssize_t *n)
{
    PyObject *arg = NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument (%zd given)",
                     fname, nargs + nkw);
        return -1;
    }
    if (nargs == 1) {
        arg = args[0];
    } else if (nkw == 1) {
        PyObject *name = PyTuple_GetItem(kwnames, 0);
        if (name == NULL)
            return -1;
        int is_n = PyUnicode_CompareWithASCIIString(name, "n") == 0;
        if (!is_n) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         fname, name);
            return -1;
        }
        arg = args[0];
    }
    if (arg == NULL) {
        if (required) {
            PyErr_Format(PyExc_TypeError, "%s() missing 1 required argument: 'n'", fname);
            return -1;
        }
        return 0;
    }
    *n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    return (*n == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *core_read(ReaderCore *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    Py_ssize_t n = -1;
    if (parse_n("read", args, nargs, kwnames, 0, &n) < 0)
        return NULL;
    return new_call(self, KIND_READ, n);
}

static PyObject *core_readexactly(ReaderCore *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    Py_ssize_t n = 0;
    if (parse_n("readexactly", args, nargs, kwnames, 1, &n) < 0)
        return NULL;
    return new_call(self, KIND_READEXACTLY, n);
}

static PyObject *core_readline(ReaderCore *self, PyObject *Py_UNUSED(ignored))
{
    return new_call(self, KIND_READLINE, 0);
}

static PyObject *core_readuntil(ReaderCore *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    PyObject *separator = NULL;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_Size(kwnames);
    if (nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError, "readuntil() takes at most 1 argument (%zd given)",
                     nargs + nkw);
        return NULL;
    }
    if (nkw == 1) {
        PyObject *name = PyTuple_GetItem(kwnames, 0);
        if (name == NULL)
            return NULL;
        if (PyUnicode_CompareWithASCIIString(name, "separator") != 0) {
            PyErr_Format(PyExc_TypeError,
                         "readuntil() got an unexpected keyword argument '%U'", name);
            return NULL;
        }
    }
    if (nargs + nkw == 1)
        separator = args[0];
    Call *call = (Call *)new_call(self, KIND_READUNTIL, 0);
    if (call != NULL && separator != NULL) {
        Py_INCREF(separator);
        call->separator = separator;
    }
    return (PyObject *)call;
}

static PyObject *core_set_direct(ReaderCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_set_direct(address, owner)");
        return NULL;
    }
    void *address = PyLong_AsVoidPtr(args[0]);
    if (address == NULL && PyErr_Occurred())
        return NULL;
    PyObject *old = self->direct_owner;
    Py_INCREF(args[1]);
    self->direct_owner = args[1];
    self->direct = address;
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

/* _take_ring(n): up to n of the announced ring bytes, no further than the
   end of the head frame, as bytes (one copy); _ring goes down by as many. */
static PyObject *core_take_ring(ReaderCore *self, PyObject *arg)
{
    Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t ring = ring_ready(self);
    if (n <= 0 || ring <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "vchan reader: no ring bytes to take");
        return NULL;
    }
    int rest = direct_rest(self->direct);
    if (rest <= 0)
        return ring_failed(self, rest < 0 ? rest : -1);
    Py_ssize_t k = n < rest ? n : rest;
    return ring_take(self, k, ring);
}

/* -- a large readexactly(): one bytes object filled as the bytes come ------------ */

/* Copy the first k (<= what the chunks hold) of r's buffered chunks to dst
 * and drop them from the buffer (_chunks, _pos, _size); 0, or -1 with an
 * error set.  The slots are kept consistent after each chunk. */
static int chunks_move(ReaderCore *r, char *dst, Py_ssize_t k)
{
    Py_ssize_t pos = slot_size(r->pos), size = slot_size(r->size);
    while (k > 0) {
        PyObject *head = PySequence_GetItem(r->chunks, 0);
        if (head == NULL)
            return -1;
        Py_ssize_t len = PyBytes_CheckExact(head) ? PyBytes_Size(head) : -1;
        if (pos < 0 || size < k || len <= pos) {
            Py_DECREF(head);
            PyErr_SetString(PyExc_RuntimeError, "vchan reader: its buffer is inconsistent");
            return -1;
        }
        Py_ssize_t part = len - pos < k ? len - pos : k;
        memcpy(dst, PyBytes_AsString(head) + pos, (size_t)part);
        Py_DECREF(head);
        dst += part;
        k -= part;
        size -= part;
        if (pos + part == len) {
            PyObject *gone = PyObject_CallMethodObjArgs(r->chunks, popleft_name, NULL);
            if (gone == NULL)
                return -1;
            Py_DECREF(gone);
            pos = 0;
        } else {
            pos += part;
        }
        if (set_slot(&r->pos, pos) < 0 || set_slot(&r->size, size) < 0)
            return -1;
    }
    return 0;
}

/* _assemble(n): fill the bytes a readexactly(n) returns with what is
 * buffered, then what is announced in the ring (straight out of it), and
 * drop those from the buffer.  The bytes object, once all n are in it (it
 * is private until then: nothing else refers to it); else None, and the
 * next call goes on from there.  _unassemble() gives back what was taken
 * when the call ends without them. */
static PyObject *core_assemble(ReaderCore *self, PyObject *arg)
{
    Py_ssize_t n = PyNumber_AsSsize_t(arg, PyExc_OverflowError);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n <= 0) {
        PyErr_SetString(PyExc_ValueError, "_assemble: n must be > 0");
        return NULL;
    }
    if (self->assembly == NULL) {
        self->assembly = PyBytes_FromStringAndSize(NULL, n);
        if (self->assembly == NULL)
            return NULL;
        self->assembled = 0;
    } else if (PyBytes_Size(self->assembly) != n) {
        PyErr_SetString(PyExc_RuntimeError, "vchan reader: another readexactly() is under way");
        return NULL;
    }
    char *dst = PyBytes_AsString(self->assembly);
    Py_ssize_t size = slot_size(self->size), ring = slot_size(self->ring);
    if (dst == NULL || size < 0 || ring < 0 || ring > size) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "vchan reader: its buffer is inconsistent");
        return NULL;
    }
    /* The chunks come first (the ring's bytes follow them). */
    Py_ssize_t k = n - self->assembled < size - ring ? n - self->assembled : size - ring;
    if (k > 0) {
        if (chunks_move(self, dst + self->assembled, k) < 0)
            return NULL;
        self->assembled += k;
    }
    /* Then the ring, a frame's most at a time: a writer that waits for
     * room is woken as soon as a good share of it is free (direct_due). */
    while (self->assembled < n && (ring = ring_ready(self)) > 0) {
        size = slot_size(self->size);
        k = n - self->assembled;
        if (k > ring)
            k = ring;
        if (k > DIRECT_MAX)
            k = DIRECT_MAX;
        int got = direct_take(self->direct, dst + self->assembled, (uint32_t)k);
        if (got != k)
            return ring_failed(self, got);
        self->assembled += k;
        if (set_slot(&self->ring, ring - k) < 0 || set_slot(&self->size, size - k) < 0)
            return NULL;
        if (direct_due(self->direct)) {
            PyObject *res = PyObject_CallMethodObjArgs(self->source, taken_name, NULL);
            if (res == NULL)
                return NULL;
            Py_DECREF(res);
        }
    }
    if (self->assembled < n) {
        if (slot_size(self->ring) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "vchan reader: announced ring bytes it "
                            "cannot take");
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *done = self->assembly;
    self->assembly = NULL;
    self->assembled = 0;
    return done;
}

/* _unassemble(): the bytes an unfinished _assemble() took (b"" if none),
 * as a new bytes object; the assembly is over. */
static PyObject *core_unassemble(ReaderCore *self, PyObject *Py_UNUSED(ignored))
{
    if (self->assembly == NULL)
        return PyBytes_FromStringAndSize(NULL, 0);
    PyObject *part = PyBytes_FromStringAndSize(PyBytes_AsString(self->assembly),
                                               self->assembled);
    Py_CLEAR(self->assembly);
    self->assembled = 0;
    return part;
}

/* _find_ring(sep, limit): bytes up to and including the byte sep in the
   rest of the head frame of the announced ring bytes, if it starts within
   limit; else 0 (or no ring bytes to look at). */
static PyObject *core_find_ring(ReaderCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_find_ring(sep, limit)");
        return NULL;
    }
    long sep = PyLong_AsLong(args[0]);
    Py_ssize_t limit = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    if ((sep == -1 || limit == -1) && PyErr_Occurred())
        return NULL;
    if (sep < 0 || sep > 255 || limit < 0) {
        PyErr_SetString(PyExc_ValueError, "_find_ring: a byte and a limit >= 0");
        return NULL;
    }
    if (ring_ready(self) <= 0)
        return PyLong_FromLong(0);
    int found = ring_find(self, (uint8_t)sep, limit);
    return PyLong_FromLong(found > 0 ? found : 0);
}

static PyMethodDef core_methods[] = {
    {"_take_ring", (PyCFunction)core_take_ring, METH_O,
     "_take_ring(n)\n--\n\nUp to n of the announced ring bytes (no further than the end\n"
     "of the head frame), as bytes; _ring goes down by as many."},
    {"_assemble", (PyCFunction)core_assemble, METH_O,
     "_assemble(n)\n--\n\nFill the bytes a readexactly(n) returns with what is buffered and\n"
     "announced (dropped from the buffer): the bytes once all n are in, else None."},
    {"_unassemble", (PyCFunction)core_unassemble, METH_NOARGS,
     "_unassemble()\n--\n\nWhat an unfinished _assemble() took, as bytes; it is over."},
    {"_find_ring", (PyCFunction)(void (*)(void))core_find_ring, METH_FASTCALL,
     "_find_ring(sep, limit)\n--\n\nThe bytes through the byte sep in the rest of the head\n"
     "frame of the announced ring bytes, if it starts within limit; else 0."},
    {"_set_direct", (PyCFunction)(void (*)(void))core_set_direct, METH_FASTCALL,
     "_set_direct(address, owner)\n--\n\nThe session's struct vchan_direct (an address; 0: none)\n"
     "that read() and the others take announced ring bytes through, and the\n"
     "object that keeps it alive."},
    {"read", (PyCFunction)(void (*)(void))core_read, METH_FASTCALL | METH_KEYWORDS,
     "read(n=-1)\n--\n\nRead at most ``n`` bytes (all until EOF if ``n`` < 0), as\n"
     ":meth:`asyncio.StreamReader.read` (a coroutine)."},
    {"readexactly", (PyCFunction)(void (*)(void))core_readexactly,
     METH_FASTCALL | METH_KEYWORDS,
     "readexactly(n)\n--\n\nRead exactly ``n`` bytes, as\n"
     ":meth:`asyncio.StreamReader.readexactly` (a coroutine)."},
    {"readline", (PyCFunction)core_readline, METH_NOARGS,
     "readline()\n--\n\nRead one line (ending in ``b\"\\n\"``), as\n"
     ":meth:`asyncio.StreamReader.readline` (a coroutine)."},
    {"readuntil", (PyCFunction)(void (*)(void))core_readuntil, METH_FASTCALL | METH_KEYWORDS,
     "readuntil(separator=b'\\n')\n--\n\nRead up to and including ``separator`` (or the one of\n"
     "a tuple of separators that ends first), as\n"
     ":meth:`asyncio.StreamReader.readuntil` (a coroutine)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot core_slots[] = {
    {Py_tp_doc, "The slots and fast paths of vchan.StreamReader (see vchan._reader)."},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_members, core_members},
    {Py_tp_methods, core_methods},
    {0, NULL},
};

static PyType_Spec core_spec = {
    .name = "vchan._reader.ReaderCore",
    .basicsize = sizeof(ReaderCore),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .slots = core_slots,
};

static PyObject *set_direct_functions(PyObject *Py_UNUSED(module), PyObject *const *args,
                                      Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "set_direct_functions(take, find, rest, due, writev)");
        return NULL;
    }
    void *f[5];
    for (int i = 0; i < 5; i++) {
        f[i] = PyLong_AsVoidPtr(args[i]);
        if (f[i] == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a null function");
            return NULL;
        }
    }
    direct_take = (int (*)(struct vchan_direct *, void *, uint32_t))f[0];
    direct_find = (int (*)(struct vchan_direct *, uint8_t, uint32_t))f[1];
    direct_rest = (int (*)(struct vchan_direct *))f[2];
    direct_due = (int (*)(const struct vchan_direct *))f[3];
    session_writev = (int (*)(const void *, uint32_t, const struct vchan_iov *, uint32_t))f[4];
    Py_RETURN_NONE;
}

/* -- the writer's writelines(): frames gathered from the pieces ------------------ */

#define WRITEV_MAX 64           /* pieces gathered in one call; more: the caller joins */

/* writev(out, stream, pieces, credit, least): write a list or tuple of
 * bytes as DATA frames of stream through a session's struct
 * vchan_session_out (an address), each frame gathered from the pieces: no
 * join, no Python per piece.  (written, total): at most credit bytes are
 * written (fewer once the ring is full), written < 0 is the ring's error.
 * None, having written nothing, when the pieces are not that (a list or
 * tuple of 1 to WRITEV_MAX bytes) or hold fewer than least bytes: the
 * caller writes them its own way. */
static PyObject *module_writev(PyObject *Py_UNUSED(module), PyObject *const *args,
                               Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "writev(out, stream, pieces, credit, least)");
        return NULL;
    }
    void *out = PyLong_AsVoidPtr(args[0]);
    unsigned long stream = PyLong_AsUnsignedLong(args[1]);
    Py_ssize_t credit = PyNumber_AsSsize_t(args[3], PyExc_OverflowError);
    Py_ssize_t least = PyNumber_AsSsize_t(args[4], PyExc_OverflowError);
    if (PyErr_Occurred())
        return NULL;
    if (out == NULL || session_writev == NULL || stream > UINT32_MAX || credit <= 0) {
        PyErr_SetString(PyExc_ValueError, "writev: no session, or a bad stream or credit");
        return NULL;
    }
    PyObject *pieces = args[2];
    int is_list = PyList_CheckExact(pieces);
    if (!is_list && !PyTuple_CheckExact(pieces))
        Py_RETURN_NONE;
    Py_ssize_t count = is_list ? PyList_Size(pieces) : PyTuple_Size(pieces);
    if (count <= 0 || count > WRITEV_MAX)
        Py_RETURN_NONE;
    struct vchan_iov iov[WRITEV_MAX];
    Py_ssize_t total = 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *piece = is_list ? PyList_GetItem(pieces, k) : PyTuple_GetItem(pieces, k);
        if (piece == NULL || !PyBytes_CheckExact(piece))
            Py_RETURN_NONE;
        Py_ssize_t len = PyBytes_Size(piece);
        total += len;
        if (total > UINT32_MAX)
            Py_RETURN_NONE;
        iov[k].base = PyBytes_AsString(piece);
        iov[k].len = (uint32_t)len;
    }
    if (total < least || total == 0)
        Py_RETURN_NONE;
    /* (Nothing runs Python code until it returns: the pieces stay as they are.) */
    int n = session_writev(out, (uint32_t)stream, iov,
                           (uint32_t)(total < credit ? total : credit));
    return Py_BuildValue("(in)", n, total);
}

static PyMethodDef module_methods[] = {
    {"writev", (PyCFunction)(void (*)(void))module_writev, METH_FASTCALL,
     "writev(out, stream, pieces, credit, least)\n--\n\nWrite a list or tuple of bytes as\n"
     "DATA frames gathered from the pieces, through a session's struct\n"
     "vchan_session_out (an address): (written, total), or None, having\n"
     "written nothing, for pieces it does not take (see vchan/_reader.c)."},
    {"set_direct_functions", (PyCFunction)(void (*)(void))set_direct_functions, METH_FASTCALL,
     "set_direct_functions(take, find, rest, due, writev)\n--\n\nThe addresses of\n"
     "vchan._native's vchan_direct_take, vchan_direct_find, vchan_direct_rest,\n"
     "vchan_direct_due and vchan_session_writev."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vchan._reader",
    .m_doc = "The per-call fast paths of vchan.StreamReader, in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__reader(void)
{
    static const char *names[] = {"_read_slow", "_readexactly_slow", "_readline_slow",
                                  "_readuntil_slow"};
    for (int i = 0; i < KINDS; i++) {
        if (slow_names[i] == NULL) {
            slow_names[i] = PyUnicode_InternFromString(names[i]);
            if (slow_names[i] == NULL)
                return NULL;
        }
    }
    if (resume_name == NULL) {
        resume_name = PyUnicode_InternFromString("_maybe_resume_transport");
        popleft_name = PyUnicode_InternFromString("popleft");
        taken_name = PyUnicode_InternFromString("_ring_taken");
        failed_name = PyUnicode_InternFromString("_ring_failed");
        if (resume_name == NULL || popleft_name == NULL || taken_name == NULL ||
            failed_name == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    PyObject *core = PyType_FromSpec(&core_spec);
    if (core == NULL || PyModule_AddObject(m, "ReaderCore", core) < 0) {
        Py_XDECREF(core);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *call = PyType_FromSpec(&call_spec);
    if (call == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    call_type = (PyTypeObject *)call;       /* (the module keeps it: one reference each) */
    Py_INCREF(call);
    if (PyModule_AddObject(m, "Call", call) < 0) {
        Py_DECREF(call);
        Py_DECREF(m);
        return NULL;
    }
    /* Done and its one instance (which holds its type too). */
    PyObject *done_type = PyType_FromSpec(&done_spec);
    if (done_type == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "Done", done_type) < 0) {
        Py_DECREF(done_type);
        Py_DECREF(m);
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot((PyTypeObject *)done_type, Py_tp_alloc);
    PyObject *done = alloc((PyTypeObject *)done_type, 0);
    if (done == NULL || PyModule_AddObject(m, "DONE", done) < 0) {
        Py_XDECREF(done);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
