/* Reading the allocating Python stack from inside an allocator hook.
 *
 * The public frame API cannot be used here: PyThreadState_GetFrame() and
 * PyFrame_GetBack() return frame *objects*, which since 3.11 are made
 * lazily, on first request, by allocating one (through the OBJ domain: our
 * own hook, from inside it).  Only PyFrame_GetCode() and
 * PyFrame_GetLineNumber() are allocation-free, and they need a frame object
 * to start from.  So this file does what CPython's tracemalloc does in the
 * same place: it walks the interpreter's own frame records
 * (_PyInterpreterFrame, linked by `previous` from the thread state), which
 * exist for every running Python function whether or not a frame object was
 * ever made, and reads each one's code object and line number.  Nothing
 * here allocates, takes a lock, or runs Python code; a line number comes
 * from PyCode_Addr2Line (the code's location table, read in place).
 *
 * Those records are internal, so this file alone is compiled with
 * Py_BUILD_CORE_MODULE and the internal headers that define them; the rest
 * of the extension sees only frames_capture() (meter.h).  The layout
 * differs by version, hence the guards:
 *
 *   3.11   tstate->cframe->current_frame; frame->f_code; incomplete frames
 *          (being set up, before their first RESUME) skipped by hand, as
 *          3.11's tracemalloc does; line from _PyInterpreterFrame_LASTI.
 *   3.12   _PyThreadState_GetFrame() / _PyFrame_GetFirstComplete() (inline,
 *          skip incomplete frames and the C-stack shim frames);
 *          PyUnstable_InterpreterFrame_GetLine() (public unstable API).
 *   3.13   the same; the code is in f_executable (_PyFrame_GetCode()).
 *   3.14+  the same, from pycore_interpframe.h (f_executable became a
 *          _PyStackRef, which _PyFrame_GetCode() reads).
 *
 * The code object's address is what is recorded (a borrowed reference: the
 * frame holds it while we read it; sites.c takes its own reference when it
 * interns a new stack).
 */
#ifndef Py_BUILD_CORE_MODULE
#define Py_BUILD_CORE_MODULE 1
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX >= 0x030E0000
#include "internal/pycore_interpframe.h"
#else
#include "internal/pycore_frame.h"
#endif
#include "meter.h"

static inline _PyInterpreterFrame *
first_complete(_PyInterpreterFrame *frame)
{
#if PY_VERSION_HEX >= 0x030C0000
    return _PyFrame_GetFirstComplete(frame);
#else
    while (frame != NULL && _PyFrame_IsIncomplete(frame)) {
        frame = frame->previous;
    }
    return frame;
#endif
}

static inline PyCodeObject *
code_of(_PyInterpreterFrame *frame)
{
#if PY_VERSION_HEX >= 0x030D0000
    return _PyFrame_GetCode(frame);
#else
    return frame->f_code;
#endif
}

static inline int
line_of(_PyInterpreterFrame *frame, PyCodeObject *code)
{
#if PY_VERSION_HEX >= 0x030C0000
    (void)code;
    return PyUnstable_InterpreterFrame_GetLine(frame);
#else
    return PyCode_Addr2Line(code, _PyInterpreterFrame_LASTI(frame)
                                      * (int)sizeof(_Py_CODEUNIT));
#endif
}

int
frames_capture(PyThreadState *tstate, site_frame_t *out, int max, int *more)
{
    *more = 0;
    if (tstate == NULL) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030D0000
    _PyInterpreterFrame *frame = first_complete(tstate->current_frame);
#else
    _PyInterpreterFrame *frame = first_complete(tstate->cframe->current_frame);
#endif
    int n = 0;
    while (frame != NULL) {
        if (n == max) {
            *more = 1;
            break;
        }
        PyCodeObject *code = code_of(frame);
        out[n].code = code;
        out[n].lineno = line_of(frame, code);
        n++;
        frame = first_complete(frame->previous);
    }
    return n;
}
