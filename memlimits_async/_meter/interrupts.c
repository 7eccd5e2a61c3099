/* Raising an exception into running Python code: the two doors CPython has.
 *
 * The meter's layer knows nothing of tasks or scopes; this file only offers
 * the mechanisms with which the Python layer (_preempt.py) interrupts code
 * that never reaches a checkpoint:
 *
 *  - the main thread: a pending call (Py_AddPendingCall) runs the registered
 *    handler at the thread's next eval-breaker check, in the middle of
 *    whatever bytecode it is running, with that code's frame as the caller.
 *    The handler decides there and then; when it returns an exception, the
 *    exception is raised at that very point.  The decision and the landing
 *    are the same instant: nothing can run in between.  When it returns
 *    True ("not here"), the call is made again at the next check, for a
 *    short while (see retry_soon).
 *  - any thread: PyThreadState_SetAsyncExc, set while the caller holds the
 *    GIL.  The target thread is then parked either at an eval-breaker check
 *    (waiting for the GIL) or in a call that released the GIL; in both cases
 *    it raises at its next check, which is where it was parked or right
 *    after that call returns (3.11-3.13 check the eval breaker after calls).
 *    So a decision made from the thread's current frame, under the GIL,
 *    holds where the exception lands.
 *
 * Invariant: the pending call never lets the handler's own errors escape
 * into the interrupted code (they are reported as unraisable); only an
 * exception the handler *returns* is raised there.
 */
#include "meter.h"
#include <time.h>

static PyObject *interrupt_handler = NULL;
/* Code objects whose frames are never interrupted (framework, marked):
 * when the running frame has one, the handler is not even called. */
static PyObject *never_here = NULL;
static int interrupt_call_scheduled = 0;

/* When the handler answers "a preemption is due, but not here" (the running
 * code is protected), the call is made again at every eval-breaker check:
 * protected code is mostly short calls, and the next check in the scope's
 * own code comes soon.  For at most RETRY_WINDOW_NS after that answer, so
 * that long protected stretches are not slowed for long; after that the
 * Python layer asks again at its next poll.  Nothing else opens the
 * window: a poll that finds nothing due costs one call. */
#define RETRY_WINDOW_NS 2000000LL
static int64_t retry_until_ns = 0;

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int interrupt_pending_call(void *unused);

static void
schedule_pending_call(void)
{
    if (!interrupt_call_scheduled) {
        if (Py_AddPendingCall(interrupt_pending_call, NULL) == 0) {
            interrupt_call_scheduled = 1;
        }
    }
}

static int
retry_soon(void)
{
    if (retry_until_ns != 0) {
        if (now_ns() < retry_until_ns) {
            /* From the main thread, which trips its own eval breaker. */
            schedule_pending_call();
        }
        else {
            retry_until_ns = 0;  /* closed: the next poll asks again */
        }
    }
    return 0;
}

static int
interrupt_pending_call(void *unused)
{
    (void)unused;
    interrupt_call_scheduled = 0;
    if (interrupt_handler == NULL) {
        return 0;
    }
    if (current_account() == NULL) {
        /* Code outside every scope (the event loop itself, another task):
         * no breached scope's code, nothing to decide in Python. */
        return retry_soon();
    }
    if (never_here != NULL) {
        PyFrameObject *frame = PyEval_GetFrame();  /* borrowed */
        if (frame != NULL) {
            PyCodeObject *code = PyFrame_GetCode(frame);
            int skip = PySet_Contains(never_here, (PyObject *)code);
            Py_DECREF(code);
            if (skip == 1) {
                return retry_soon();
            }
            PyErr_Clear();  /* skip == -1 cannot happen for a code object */
        }
    }
    PyObject *handler = Py_NewRef(interrupt_handler);
    PyObject *result = PyObject_CallNoArgs(handler);
    if (result == NULL) {
        PyErr_WriteUnraisable(handler);
        Py_DECREF(handler);
        return 0;
    }
    Py_DECREF(handler);
    if (PyExceptionInstance_Check(result)) {
        PyErr_SetObject((PyObject *)Py_TYPE(result), result);
        Py_DECREF(result);
        retry_until_ns = 0;
        return -1;  /* raised in the interrupted code */
    }
    int again = result == Py_True;
    Py_DECREF(result);
    if (!again) {
        retry_until_ns = 0;
        return 0;
    }
    if (retry_until_ns == 0) {
        retry_until_ns = now_ns() + RETRY_WINDOW_NS;
    }
    return retry_soon();
}

PyObject *
interrupts_set_handler(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || (args[0] != Py_None && !PyCallable_Check(args[0]))
        || (args[1] != Py_None && !PySet_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError,
                        "set_interrupt_handler(handler or None, set or None)");
        return NULL;
    }
    Py_XSETREF(interrupt_handler, args[0] == Py_None ? NULL : Py_NewRef(args[0]));
    Py_XSETREF(never_here, args[1] == Py_None ? NULL : Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

PyObject *
interrupts_call_on_main_thread(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    /* One call in flight is enough: the handler looks at every request.
     * From another thread, before 3.13, the main thread notices it at its
     * next GIL switch rather than at once (the eval breaker is computed for
     * the calling thread); the caller holding the GIL makes that soon. */
    schedule_pending_call();
    return PyBool_FromLong(interrupt_call_scheduled);
}

PyObject *
interrupts_async_raise(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError,
                        "async_raise() takes a thread id and an exception class");
        return NULL;
    }
    unsigned long thread_id = PyLong_AsUnsignedLong(args[0]);
    if (thread_id == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *exc_class = args[1];
    if (exc_class != Py_None
        && !(PyType_Check(exc_class)
             && PyType_IsSubtype((PyTypeObject *)exc_class,
                                 (PyTypeObject *)PyExc_BaseException))) {
        PyErr_SetString(PyExc_TypeError,
                        "async_raise() needs an exception class or None");
        return NULL;
    }
    int found = PyThreadState_SetAsyncExc(
        thread_id, exc_class == Py_None ? NULL : exc_class);
    return PyLong_FromLong(found);
}

static PyThreadState *
thread_state_of(unsigned long thread_id)
{
    PyInterpreterState *interp = PyInterpreterState_Get();
    for (PyThreadState *ts = PyInterpreterState_ThreadHead(interp); ts != NULL;
         ts = PyThreadState_Next(ts)) {
        if (ts->thread_id == thread_id) {
            return ts;
        }
    }
    return NULL;
}

/* Arm an asynchronous exception in a thread only if it has not moved since
 * the caller looked at it: its innermost frame is still `frame`, at the
 * same instruction, and its context still holds `expected` in `var` (a loop
 * around a `with limit_scope()` comes back to the same frame and
 * instruction in the next scope).  Python code deciding from that frame may
 * have let the thread run (the GIL is released at eval-breaker checks);
 * this check and the arming run no bytecode, so the GIL stays held and a
 * decision about a stale position is never acted on. */
PyObject *
interrupts_raise_in_thread_at(PyObject *module, PyObject *const *args,
                              Py_ssize_t nargs)
{
    if (nargs != 6 || !PyFrame_Check(args[1]) || !PyType_Check(args[5])
        || !PyType_IsSubtype((PyTypeObject *)args[5],
                             (PyTypeObject *)PyExc_BaseException)) {
        PyErr_SetString(PyExc_TypeError,
                        "raise_in_thread_at(thread_id, frame, lasti, var, "
                        "expected, exc_class)");
        return NULL;
    }
    unsigned long thread_id = PyLong_AsUnsignedLong(args[0]);
    if (thread_id == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    long lasti = PyLong_AsLong(args[2]);
    if (lasti == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyThreadState *ts = thread_state_of(thread_id);
    if (ts == NULL || ts == PyThreadState_Get() || ts->context == NULL) {
        Py_RETURN_FALSE;
    }
    PyFrameObject *current = PyThreadState_GetFrame(ts);
    int unchanged = (PyObject *)current == args[1]
                    && PyFrame_GetLasti(current) == lasti;
    Py_XDECREF(current);
    if (!unchanged) {
        Py_RETURN_FALSE;
    }
    /* Context.get is C: no bytecode runs, the GIL is not released. */
    PyObject *value = PyObject_CallMethod(ts->context, "get", "O", args[3]);
    if (value == NULL) {
        return NULL;
    }
    unchanged = value == args[4];
    Py_DECREF(value);
    if (!unchanged) {
        Py_RETURN_FALSE;
    }
    PyThreadState_SetAsyncExc(thread_id, args[5]);
    Py_RETURN_TRUE;
}

/* The context a thread is running in: what its ContextVars read now. */
PyObject *
interrupts_thread_context(PyObject *module, PyObject *arg)
{
    unsigned long thread_id = PyLong_AsUnsignedLong(arg);
    if (thread_id == (unsigned long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    PyThreadState *ts = thread_state_of(thread_id);
    if (ts == NULL || ts->context == NULL) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(ts->context);
}

void
interrupts_after_fork_child(void)
{
    interrupt_call_scheduled = 0;
    retry_until_ns = 0;
}
