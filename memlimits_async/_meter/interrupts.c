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
 *  - other threads, 3.12 and later: a sys.monitoring INSTRUCTION callback
 *    (monitor_event) that the Python layer switches on, while a preemption
 *    is due, for the code objects on the stack of the threads it arms.  It
 *    runs in the thread that executes that code, before an instruction, so
 *    the decision and the landing are again one instant.  Threads that are
 *    not armed, and instructions that are not landing points, return at
 *    once without calling Python.
 *  - any thread: PyThreadState_SetAsyncExc, set while the caller holds the
 *    GIL.  The target thread is then parked either at an eval-breaker check
 *    (waiting for the GIL) or in a call that released the GIL; in both cases
 *    it raises at its next check, which is where it was parked or right
 *    after that call returns (3.11-3.13 check the eval breaker after calls).
 *    So a decision made from the thread's current frame, under the GIL,
 *    holds where the exception lands, provided the call returns: a fence
 *    (raise_in_thread_at) disarms it in the thread if the call fails.
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

#if PY_VERSION_HEX < 0x030D0000
/* What raises a pending asynchronous exception on purpose: an expression
 * statement, whose entry is an eval-breaker check. */
static PyObject *absorb_code = NULL;
static PyObject *absorb_globals = NULL;
#endif

/* Drop the asynchronous exception pending in the calling thread, if any,
 * leaving the interpreter as if it had been raised and caught.
 *
 * PyThreadState_SetAsyncExc(own id, NULL) is not that on 3.11 and 3.12:
 * they signal a pending asynchronous exception with one flag for the whole
 * interpreter, which only raising one clears, and clearing signals it
 * too.  The flag then stays set for good: every eval-breaker check of
 * every thread takes the slow path, and 3.11 spins forever at the entry of
 * the next function called under a trace function (a coverage tool, a
 * debugger), whose tracing re-runs the check until the flag clears.  So
 * the exception is raised here, at the check that starts absorb_code, and
 * caught.  The flag may also be clear already with one pending (a thread
 * that raised its own cleared it for all): then nothing raises it, and it
 * is dropped as it is.  Later versions keep the flag per thread and clear
 * it at the next check.  0, or -1 with an exception set (another one raised
 * at that check: a signal handler's, on the main thread), the pending one
 * left in place. */
static int
disarm_current(PyThreadState *ts)
{
    PyObject *pending = ts->async_exc;
    if (pending == NULL) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030D0000
    if (absorb_code == NULL) {
        /* Named as framework code: no preemption is decided in it. */
        PyObject *globals = Py_BuildValue("{ss}", "__name__", "memlimits_async._meter");
        if (globals == NULL) {
            return -1;
        }
        PyObject *code = Py_CompileString("None", "<memlimits_async disarm>",
                                          Py_eval_input);
        if (code == NULL) {
            Py_DECREF(globals);
            return -1;
        }
        absorb_globals = globals;
        absorb_code = code;
    }
    Py_INCREF(pending);
    PyObject *result = PyEval_EvalCode(absorb_code, absorb_globals, absorb_globals);
    if (result != NULL) {
        Py_DECREF(result);
    }
    else if (PyErr_ExceptionMatches(pending)) {
        PyErr_Clear();
    }
    else if (ts->async_exc != NULL) {
        Py_DECREF(pending);
        return -1;
    }
    else {
        PyErr_Clear();  /* MemoryError, RecursionError: dropped below */
    }
    Py_DECREF(pending);
    Py_CLEAR(ts->async_exc);
#else
    PyThreadState_SetAsyncExc(PyThread_get_thread_ident(), NULL);
#endif
    return 0;
}

/* Drop the asynchronous exception pending in this thread (disarm_current):
 * True if there was one. */
PyObject *
interrupts_disarm(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    PyThreadState *ts = PyThreadState_Get();
    int pending = ts->async_exc != NULL;
    if (disarm_current(ts) < 0) {
        return NULL;
    }
    return PyBool_FromLong(pending);
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

#if PY_VERSION_HEX < 0x030D0000
/* The fence of an exception armed from outside (3.11, and 3.12 when no
 * sys.monitoring tool id is free).
 *
 * A thread parked at an eval-breaker check raises the armed exception as
 * soon as it takes the GIL again, where it was looked at.  A thread seen in
 * a call that released the GIL (a socket read, a lock, a sleep) raises it
 * right after the call returns, also where it was looked at, but only if
 * the call *returns*: if it fails, its exception unwinds to the next
 * handler or out of the frame with no check on the way, and the armed one
 * lands at the first check after that, a place nobody looked at (measured:
 * at the entry of the scope's own `__exit__`, which then never ran, so the
 * scope stayed active in that thread and its next poll preempted code
 * after the `with`).  Seen from outside, the two cases look the same: the
 * frame is at the call either way.
 *
 * So the exception is armed together with a trace function for that
 * thread alone, which the thread calls, with the GIL, at the first event
 * it meets: the landing itself (an "exception" event in the frame looked
 * at, the armed exception no longer pending), or the call's own failure
 * (an "exception" event with the armed one still pending), where it is
 * disarmed before any check.  Either way the fence puts the thread's
 * previous trace function back (a coverage tool's, a debugger's) and
 * hands it the event, which it would have got anyway.  Nothing runs in the
 * thread while no exception is armed there.  What it cannot cover: a
 * Python function that the call runs before it returns (a sqlite3
 * callback) gets the exception at its entry, since 3.11 and 3.12 check for
 * it there before the "call" event. */
#define FENCE_CAPSULE "memlimits_async.fence"

typedef struct {
    Py_tracefunc saved_func;  /* the thread's trace function before */
    PyObject *saved_obj;      /* owned */
    PyObject *exc_class;      /* owned: what was armed */
    PyObject *on_disarm;      /* owned, or NULL: called in the thread */
} fence_t;

static void
fence_free(PyObject *capsule)
{
    fence_t *fence = PyCapsule_GetPointer(capsule, FENCE_CAPSULE);
    if (fence != NULL) {
        Py_XDECREF(fence->saved_obj);
        Py_XDECREF(fence->exc_class);
        Py_XDECREF(fence->on_disarm);
        PyMem_Free(fence);
    }
}

static int
fence_trace(PyObject *capsule, PyFrameObject *frame, int what, PyObject *arg)
{
    PyThreadState *ts = PyThreadState_Get();
    fence_t *fence = PyCapsule_GetPointer(capsule, FENCE_CAPSULE);
    if (fence == NULL) {
        PyErr_WriteUnraisable(capsule);
        return 0;
    }
    /* The capsule is the thread's trace object, borrowed by the caller:
     * putting the previous one back drops it. */
    Py_INCREF(capsule);
    Py_tracefunc saved_func = fence->saved_func;
    PyObject *saved_obj = Py_XNewRef(fence->saved_obj);
    PyObject *on_disarm = NULL;
    if (ts->async_exc != NULL && ts->async_exc == fence->exc_class) {
        /* Still pending: the thread is somewhere else than where it was
         * armed. */
        if (disarm_current(ts) < 0) {
            PyErr_WriteUnraisable(capsule);
        }
        else {
            on_disarm = Py_XNewRef(fence->on_disarm);
        }
    }
    /* The exception being handled by this event, if any, is the caller's
     * (fetched already for "exception" events): none is set here. */
    if (_PyEval_SetTrace(ts, saved_func, saved_obj) < 0) {
        /* An audit hook refused: the fence stays and forwards. */
        PyErr_WriteUnraisable(capsule);
    }
    if (on_disarm != NULL) {
        PyObject *result = PyObject_CallNoArgs(on_disarm);
        if (result == NULL) {
            PyErr_WriteUnraisable(on_disarm);
        }
        Py_XDECREF(result);
        Py_DECREF(on_disarm);
    }
    int status = 0;
    if (saved_func != NULL) {
        status = saved_func(saved_obj, frame, what, arg);
    }
    Py_XDECREF(saved_obj);
    Py_DECREF(capsule);
    return status;
}

/* Put the fence on `ts` (not the calling thread), keeping its trace
 * function for later.  -1 with an exception set on failure. */
static int
fence_thread(PyThreadState *ts, PyObject *exc_class, PyObject *on_disarm)
{
    fence_t *fence = PyMem_Calloc(1, sizeof(fence_t));
    if (fence == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (ts->c_tracefunc == fence_trace) {
        /* One left from an arming that met no event yet (its exception was
         * cleared by someone else): keep what it kept. */
        fence_t *old = PyCapsule_GetPointer(ts->c_traceobj, FENCE_CAPSULE);
        if (old == NULL) {
            PyMem_Free(fence);
            return -1;
        }
        fence->saved_func = old->saved_func;
        fence->saved_obj = Py_XNewRef(old->saved_obj);
    }
    else {
        fence->saved_func = ts->c_tracefunc;
        fence->saved_obj = Py_XNewRef(ts->c_traceobj);
    }
    fence->exc_class = Py_NewRef(exc_class);
    fence->on_disarm = Py_XNewRef(on_disarm);
    PyObject *capsule = PyCapsule_New(fence, FENCE_CAPSULE, fence_free);
    if (capsule == NULL) {
        Py_XDECREF(fence->saved_obj);
        Py_DECREF(fence->exc_class);
        Py_XDECREF(fence->on_disarm);
        PyMem_Free(fence);
        return -1;
    }
    int status = _PyEval_SetTrace(ts, fence_trace, capsule);
    Py_DECREF(capsule);
    return status;
}
#endif

/* Arm an asynchronous exception in a thread only if it has not moved since
 * the caller looked at it: its innermost frame is still `frame`, at the
 * same instruction, and its context still holds `expected` in `var` (a loop
 * around a `with limit_scope()` comes back to the same frame and
 * instruction in the next scope).  Python code deciding from that frame may
 * have let the thread run (the GIL is released at eval-breaker checks);
 * this check and the arming run no bytecode, so the GIL stays held and a
 * decision about a stale position is never acted on.  False also while an
 * exception armed earlier is still pending there, and (3.11, 3.12) while
 * the thread runs a trace function.  Up to 3.12 the exception is fenced
 * (above): `on_disarm` (None or a callable) is called in the thread if the
 * fence disarms it, before the thread runs on.  Later versions (which
 * never arm from outside) arm it bare. */
PyObject *
interrupts_raise_in_thread_at(PyObject *module, PyObject *const *args,
                              Py_ssize_t nargs)
{
    if ((nargs != 6 && nargs != 7) || !PyFrame_Check(args[1])
        || !PyType_Check(args[5])
        || !PyType_IsSubtype((PyTypeObject *)args[5],
                             (PyTypeObject *)PyExc_BaseException)
        || (nargs == 7 && args[6] != Py_None && !PyCallable_Check(args[6]))) {
        PyErr_SetString(PyExc_TypeError,
                        "raise_in_thread_at(thread_id, frame, lasti, var, "
                        "expected, exc_class, on_disarm=None)");
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
    /* One armed and not raised yet (the thread has not reached an
     * eval-breaker check since: on a busy machine it may wait for the GIL
     * through several polls): arming again would raise once but count as
     * another preemption.  The target clears it with the GIL held, as we
     * hold it here. */
    if (ts->async_exc != NULL) {
        Py_RETURN_FALSE;
    }
#if PY_VERSION_HEX < 0x030D0000
    /* Inside a trace function the thread calls no other (the fence would
     * not run), and what it runs there is not the scope's code. */
    if (ts->tracing) {
        Py_RETURN_FALSE;
    }
    PyObject *on_disarm = nargs == 7 && args[6] != Py_None ? args[6] : NULL;
    if (fence_thread(ts, args[5], on_disarm) < 0) {
        return NULL;
    }
#endif
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

/* ---- the sys.monitoring route (3.12+) ----
 *
 * Armed by the delivery thread (monitor_arm) with the threads where a
 * preemption is due, or about to be (with the time from which it is), and,
 * for each code object whose INSTRUCTION events it switched on, the landing
 * points allowed in it: a bytes object with one byte per code unit, nonzero
 * where the callback may ask the handler.  The arrays are replaced whole,
 * with the GIL held, and read only with the GIL held (the callback), so a
 * reader never sees half an update. */
static PyObject *monitor_handler = NULL;
static unsigned long *monitor_threads = NULL;
/* Per armed thread: no handler call before this time (CLOCK_MONOTONIC ns):
 * when the preemption is due, then MONITOR_BACKOFF_NS after each call that
 * did not land, so that code where it may not land (a long interrupt-safe
 * region in the scope's own code) pays a Python call every 200 us at most,
 * not one per line. */
static int64_t *monitor_next_ns = NULL;
#define MONITOR_BACKOFF_NS 200000LL
static Py_ssize_t monitor_thread_count = 0;
static PyObject **monitor_codes = NULL;     /* owned references */
static PyObject **monitor_landings = NULL;  /* owned: bytes, one per code */
static Py_ssize_t monitor_code_count = 0;

PyObject *
interrupts_monitor_arm(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || (args[0] != Py_None && !PyCallable_Check(args[0]))
        || !PyTuple_Check(args[1]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "monitor_arm(handler or None, ((thread id, due ns), "
                        "...), ((code, landings), ...))");
        return NULL;
    }
    Py_ssize_t n_threads = PyTuple_GET_SIZE(args[1]);
    Py_ssize_t n_codes = PyTuple_GET_SIZE(args[2]);
    unsigned long *threads = PyMem_Malloc(sizeof(unsigned long) * (n_threads + 1));
    int64_t *next_ns = PyMem_Malloc(sizeof(int64_t) * (n_threads + 1));
    PyObject **codes = PyMem_Malloc(sizeof(PyObject *) * (n_codes + 1));
    PyObject **landings = PyMem_Malloc(sizeof(PyObject *) * (n_codes + 1));
    if (threads == NULL || next_ns == NULL || codes == NULL || landings == NULL) {
        PyMem_Free(threads);
        PyMem_Free(next_ns);
        PyMem_Free(codes);
        PyMem_Free(landings);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n_threads; i++) {
        PyObject *pair = PyTuple_GET_ITEM(args[1], i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError,
                            "monitor_arm: each thread must be (id, due ns)");
            goto fail;
        }
        threads[i] = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(pair, 0));
        if (threads[i] == (unsigned long)-1 && PyErr_Occurred()) {
            goto fail;
        }
        next_ns[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
        if (next_ns[i] == -1 && PyErr_Occurred()) {
            goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < n_codes; i++) {
        PyObject *pair = PyTuple_GET_ITEM(args[2], i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
            || !PyCode_Check(PyTuple_GET_ITEM(pair, 0))
            || !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError,
                            "monitor_arm: each entry must be (code, bytes)");
            goto fail;
        }
        codes[i] = PyTuple_GET_ITEM(pair, 0);
        landings[i] = PyTuple_GET_ITEM(pair, 1);
    }
    for (Py_ssize_t i = 0; i < n_codes; i++) {
        Py_INCREF(codes[i]);
        Py_INCREF(landings[i]);
    }
    /* Nothing below runs Python code before the new state is complete: the
     * old references are dropped after the swap. */
    PyObject *old_handler = monitor_handler;
    PyObject **old_codes = monitor_codes, **old_landings = monitor_landings;
    Py_ssize_t old_count = monitor_code_count;
    unsigned long *old_threads = monitor_threads;
    int64_t *old_next_ns = monitor_next_ns;
    monitor_handler = args[0] == Py_None ? NULL : Py_NewRef(args[0]);
    monitor_threads = threads;
    monitor_next_ns = next_ns;
    monitor_thread_count = monitor_handler == NULL ? 0 : n_threads;
    monitor_codes = codes;
    monitor_landings = landings;
    monitor_code_count = n_codes;
    PyMem_Free(old_threads);
    PyMem_Free(old_next_ns);
    for (Py_ssize_t i = 0; i < old_count; i++) {
        Py_DECREF(old_codes[i]);
        Py_DECREF(old_landings[i]);
    }
    PyMem_Free(old_codes);
    PyMem_Free(old_landings);
    Py_XDECREF(old_handler);
    Py_RETURN_NONE;
fail:
    PyMem_Free(threads);
    PyMem_Free(next_ns);
    PyMem_Free(codes);
    PyMem_Free(landings);
    return NULL;
}

/* The INSTRUCTION callback: (code, instruction_offset).  Runs in whatever
 * thread executes a monitored code object, before the instruction; the
 * frame of that code is the caller of the handler.  Returns None, or sets
 * the exception the handler returned (sys.monitoring raises it in the
 * monitored code, at that instruction).  Never returns DISABLE, which would
 * switch the location off for every thread. */
PyObject *
interrupts_monitor_event(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (monitor_thread_count == 0 || nargs < 2) {
        Py_RETURN_NONE;
    }
    unsigned long me = PyThread_get_thread_ident();
    Py_ssize_t t = 0;
    while (t < monitor_thread_count && monitor_threads[t] != me) {
        t++;
    }
    if (t == monitor_thread_count) {
        Py_RETURN_NONE;  /* another thread running the same code */
    }
    PyObject *landings = NULL;
    for (Py_ssize_t i = 0; i < monitor_code_count; i++) {
        if (monitor_codes[i] == args[0]) {
            landings = monitor_landings[i];
            break;
        }
    }
    if (landings == NULL) {
        Py_RETURN_NONE;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    Py_ssize_t unit = offset / 2;
    if (unit >= PyBytes_GET_SIZE(landings) || !PyBytes_AS_STRING(landings)[unit]) {
        Py_RETURN_NONE;
    }
    int64_t now = now_ns();
    if (now < monitor_next_ns[t] || current_account() == NULL) {
        Py_RETURN_NONE;  /* not yet due, or outside every scope */
    }
    PyObject *handler = Py_NewRef(monitor_handler);
    PyObject *result = PyObject_CallNoArgs(handler);
    /* The handler ran Python code: the arrays may have been replaced. */
    for (t = 0; t < monitor_thread_count; t++) {
        if (monitor_threads[t] == me) {
            monitor_next_ns[t] = now_ns() + MONITOR_BACKOFF_NS;
            break;
        }
    }
    if (result == NULL) {
        /* The handler's own failure must not land in the user's code. */
        PyErr_WriteUnraisable(handler);
        Py_DECREF(handler);
        Py_RETURN_NONE;
    }
    Py_DECREF(handler);
    if (PyExceptionInstance_Check(result)) {
        PyErr_SetObject((PyObject *)Py_TYPE(result), result);
        Py_DECREF(result);
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_NONE;
}

void
interrupts_after_fork_child(void)
{
    interrupt_call_scheduled = 0;
    retry_until_ns = 0;
    /* The armed threads do not exist in the child (the forking thread keeps
     * its id there, and must not look armed).  No Python object may be
     * touched here: the references are dropped at the next monitor_arm. */
    monitor_thread_count = 0;
}
