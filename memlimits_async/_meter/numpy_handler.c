/* numpy's array buffers, metered through numpy's own data handler.
 *
 * numpy (>= 1.22, NEP 49) takes array data from a PyDataMem_Handler held in
 * a PyCapsule named "mem_handler", not from PyMem: its default handler calls
 * malloc, calloc, realloc and free (behind a small cache of blocks under
 * 1 KiB), so the MEM/OBJ hooks never see those buffers.  Here the default
 * handler is wrapped: each call goes to numpy's allocator, then through the
 * same slow paths as the MEM/OBJ hooks (hooks.c), so that a buffer sampled
 * inside a scope is charged to it and its ancestors and its free credits
 * them; exactly at sampling interval 1, unbiased otherwise.
 *
 * Where the wrapper goes.  numpy reads the handler in force from a
 * ContextVar (`current_handler` in numpy's alloc.c) whose default value is
 * numpy's one default capsule, PyDataMem_DefaultHandler.
 * PyDataMem_SetHandler() sets the variable in the calling context only:
 * contexts copied before (running tasks), and every other thread (whose
 * context starts empty), would still see the default.  So instead of
 * setting the variable, the default capsule itself is made to point to our
 * handler (PyCapsule_SetPointer): every context that has not chosen a
 * handler of its own sees the wrapper, now and later.  A context that did
 * set one keeps it, unmetered.  Only numpy's own "default_allocator" is
 * wrapped, and only once; it is never unwrapped (arrays hold the capsule
 * and free through it).
 *
 * Arrays allocated before the wrap keep a reference to that same capsule,
 * so their buffers are freed through the wrapper too: they have no record,
 * the free is passed down untouched (numpy's cache sits below us and sees
 * the same calls as before).  Arrays whose handler is NULL (data handed to
 * numpy by a C extension) are freed by numpy with free(), never here.
 *
 * The GIL.  numpy calls its handler with the GIL held (its default cache is
 * unlocked global state; its calloc releases the GIL around the libc call,
 * inside the call we make), with one exception: np.fromstring/np.fromfile
 * with a separator grow the result with realloc inside
 * NPY_BEGIN_ALLOW_THREADS.  The shared slow paths touch shared state only
 * when this thread holds the main interpreter's GIL (holds_main_gil in
 * hooks.c); otherwise they drop the mark and the call goes unmetered.  A
 * block moved by such a realloc leaves its record behind (see
 * meter_realloc_slow).  Without the GIL, the fast paths touch only this
 * thread's countdown and read the filter (meter.h).
 *
 * numpy's headers are not needed: the struct layout and the slots of the
 * C-API table used are declared here (numpy/ndarraytypes.h,
 * numpy/__multiarray_api.h; the same in numpy 1.22 to 2.x), so numpy stays
 * an optional run-time dependency.
 */
#include "meter.h"
#include <string.h>

/* PyDataMemAllocator and PyDataMem_Handler, version 1. */
typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator_t;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator_t allocator;
} np_handler_t;

#define HANDLER_CAPSULE "mem_handler"
#define DEFAULT_HANDLER_NAME "default_allocator"

/* Slots of numpy's _ARRAY_API table (numpy_api.py in numpy's sources). */
#define API_ABI_VERSION 0        /* unsigned int PyArray_GetNDArrayCVersion(void) */
#define API_FEATURE_VERSION 211  /* unsigned int PyArray_GetNDArrayCFeatureVersion(void) */
#define API_DEFAULT_HANDLER 306  /* PyObject **: &PyDataMem_DefaultHandler */
#define NPY_1_ABI 0x01000009u
#define NPY_2_ABI 0x02000000u
#define NPY_1_22_FEATURES 0x0000000fu   /* slot 306 exists from here on */

/* numpy's default allocator, copied when it is wrapped. */
static np_allocator_t below;
static PyObject *default_capsule = NULL;  /* strong ref, once wrapped */

/* Fast paths, as in hooks.c: a thread-local subtraction and a branch.
 * numpy refuses arrays of more than NPY_MAX_INTP bytes, but its handler is
 * public C API (PyDataMem_UserNEW): a size past INT64_MAX, which no
 * allocator can grant, goes straight below to fail there, unmetered (as
 * CPython's PyMem_Malloc refuses it before calling its allocator), so that
 * the countdown cannot wrap. */

static void *
np_malloc(void *ctx, size_t size)
{
    thread_meter_t *t = &meter_tls;
    if (METER_UNLIKELY(size > (size_t)INT64_MAX)) {
        return below.malloc(below.ctx, size);  /* fails */
    }
    if (METER_LIKELY((t->countdown -= (int64_t)size) > 0
                     && size < METER_REFUSE_MIN)) {
        return below.malloc(below.ctx, size);
    }
    return meter_malloc_slow(below.malloc, below.ctx, t, size);
}

static void *
np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    thread_meter_t *t = &meter_tls;
    int64_t size;
    if (METER_UNLIKELY(__builtin_mul_overflow(nelem, elsize, &size))) {
        return below.calloc(below.ctx, nelem, elsize);  /* fails */
    }
    if (METER_LIKELY((t->countdown -= size) > 0
                     && size < (int64_t)METER_REFUSE_MIN)) {
        return below.calloc(below.ctx, nelem, elsize);
    }
    return meter_calloc_slow(below.calloc, below.ctx, t, nelem, elsize, size);
}

static void *
np_realloc(void *ctx, void *ptr, size_t size)
{
    thread_meter_t *t = &meter_tls;
    if (METER_UNLIKELY(size > (size_t)INT64_MAX)) {
        /* Fails, leaving the block and its record as they are. */
        return below.realloc(below.ctx, ptr, size);
    }
    if (METER_UNLIKELY(ptr != NULL && blocks_maybe_tracked(ptr))) {
        return meter_realloc_slow(below.realloc, below.ctx, t, ptr, size, 0);
    }
    if (METER_LIKELY((t->countdown -= (int64_t)size) > 0
                     && size < METER_REFUSE_MIN)) {
        return below.realloc(below.ctx, ptr, size);
    }
    return meter_realloc_slow(below.realloc, below.ctx, t, ptr, size, 1);
}

static void
np_free(void *ctx, void *ptr, size_t size)
{
    if (METER_UNLIKELY(ptr != NULL && blocks_maybe_tracked(ptr))) {
        meter_forget(ptr);  /* before the address can be handed out again */
    }
    below.free(below.ctx, ptr, size);
}

static np_handler_t wrapper = {
    "memlimits_async",
    1,
    {NULL, np_malloc, np_calloc, np_realloc, np_free},
};

int
numpy_handler_wrapped(void)
{
    return default_capsule != NULL;
}

/* Wrap numpy's default handler, given numpy's C-API table: 1 if wrapped,
 * 0 if numpy is still initializing (try again later), -1 if this numpy
 * cannot be metered (nothing was changed). */
static int
wrap_default_handler(void **api)
{
    unsigned int (*abi_version)(void) =
        (unsigned int (*)(void))api[API_ABI_VERSION];
    unsigned int abi = abi_version();
    if (abi != NPY_1_ABI && abi != NPY_2_ABI) {
        return -1;  /* a table this file does not know */
    }
    unsigned int (*feature_version)(void) =
        (unsigned int (*)(void))api[API_FEATURE_VERSION];
    if (feature_version() < NPY_1_22_FEATURES) {
        return -1;  /* no data handlers before numpy 1.22 */
    }
    PyObject *capsule = *(PyObject **)api[API_DEFAULT_HANDLER];
    if (capsule == NULL) {
        return 0;
    }
    np_handler_t *handler = PyCapsule_GetPointer(capsule, HANDLER_CAPSULE);
    if (handler == NULL) {
        return -1;
    }
    if (handler->version != 1
        || strncmp(handler->name, DEFAULT_HANDLER_NAME,
                   sizeof(handler->name)) != 0) {
        return -1;  /* replaced by someone else's: left alone */
    }
    below = handler->allocator;
    /* A thread that does not hold the GIL (np.fromstring's realloc) may read
     * the capsule's pointer at any moment: `below` must be visible to it
     * before the wrapper is. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (PyCapsule_SetPointer(capsule, &wrapper) < 0) {
        return -1;
    }
    default_capsule = Py_NewRef(capsule);
    return 1;
}

int numpy_handler_pending = 1;
static PyObject *numpy_name = NULL;
/* numpy 2.x, then 1.x */
static PyObject *core_names[2] = {NULL, NULL};
static PyObject *array_api_name = NULL;

int
numpy_handler_init(void)
{
    if (numpy_name != NULL) {
        return 0;
    }
    numpy_name = PyUnicode_InternFromString("numpy");
    core_names[0] = PyUnicode_InternFromString("numpy._core._multiarray_umath");
    core_names[1] = PyUnicode_InternFromString("numpy.core._multiarray_umath");
    array_api_name = PyUnicode_InternFromString("_ARRAY_API");
    if (numpy_name == NULL || core_names[0] == NULL || core_names[1] == NULL
        || array_api_name == NULL) {
        return -1;
    }
    return 0;
}

/* Find numpy's C-API table: 1 (*api set) if numpy's core module is
 * imported and initialized, 0 if numpy is not imported or still importing,
 * -1 if its table cannot be read.  Looks in sys.modules and in the module's
 * dict only: numpy is never imported from here, and no module __getattr__
 * runs (numpy 2.x's numpy.core shims warn).  Leaves no exception set. */
static int
find_array_api(void ***api)
{
    PyObject *numpy = PyImport_GetModule(numpy_name);
    if (numpy == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(numpy);
    for (size_t i = 0; i < sizeof(core_names) / sizeof(core_names[0]); i++) {
        PyObject *core = PyImport_GetModule(core_names[i]);
        if (core == NULL) {
            PyErr_Clear();
            continue;
        }
        PyObject *capsule = NULL;
        if (PyModule_Check(core)) {
            capsule = PyDict_GetItemWithError(PyModule_GetDict(core),
                                              array_api_name);
        }
        PyErr_Clear();
        if (capsule == NULL) {
            /* Not yet (the module is being initialized), or a shim without
             * the table (numpy 2.x's numpy.core): try the next name. */
            Py_DECREF(core);
            continue;
        }
        int found = -1;
        if (PyCapsule_IsValid(capsule, NULL)) {
            /* It stays valid: numpy's module is never unloaded. */
            *api = PyCapsule_GetPointer(capsule, NULL);
            found = 1;
        }
        Py_DECREF(core);
        return found;
    }
    return 0;
}

void
numpy_handler_poll(void)
{
    if (!numpy_handler_pending || numpy_name == NULL) {
        return;
    }
    /* Whatever this allocates is nobody's: not charged to the scope being
     * entered, nor to the one around it. */
    meter_tls.depth++;
    void **api = NULL;
    int found = find_array_api(&api);
    if (found < 0 || (found > 0 && wrap_default_handler(api) != 0)) {
        numpy_handler_pending = 0;  /* wrapped, or never will be */
    }
    meter_tls.depth--;
}
