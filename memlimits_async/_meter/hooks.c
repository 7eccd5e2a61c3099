/* Allocator hooks on the MEM and OBJ domains.
 *
 * Discipline (after CPython's tracemalloc.c, minus its per-free lock):
 *  - Installed once, never uninstalled: sampled blocks may be freed at any
 *    time, and a wrapper above us (tracemalloc started later) keeps calling
 *    our functions.  When our hooks are removed from under us (tracemalloc
 *    started *before* us and then stopped restores the allocators it saved),
 *    hooks_check notices and installs them again.
 *  - Both MEM and OBJ: since 3.13 some dict and bytearray storage goes
 *    through MEM.  RAW is not hooked: it runs without the GIL and would need
 *    a lock-free table.  pymalloc forwards big requests to RAW, which we do
 *    not see twice for that reason.
 *  - A per-thread depth counter, checked on the slow path: an allocation
 *    made from inside our own slow path is never metered, so no block is
 *    counted twice and no sample is taken while one is being recorded.
 *  - Fast path: a thread-local subtraction, a size comparison, a branch
 *    and a tail call on allocation; a global load and a filter byte on
 *    free.  Everything else (random draws, the ContextVar read, the table)
 *    happens once per ~R sampled bytes, or for a request of 1 MiB or more
 *    (METER_REFUSE_MIN), which the slow path may refuse: NULL without
 *    calling the allocator below, when it alone would pass a memory limit
 *    (accounts_refuse).
 *  - No Python code, no exception left set, no GIL acquisition inside a hook
 *    (meter.h).  Shared state is touched only from the main interpreter.
 */
#include "meter.h"
#include <pthread.h>

typedef struct {
    PyMemAllocatorDomain domain;
    PyMemAllocatorEx prev;
} domain_hook_t;

static domain_hook_t mem_hook = {PYMEM_DOMAIN_MEM, {0}};
static domain_hook_t obj_hook = {PYMEM_DOMAIN_OBJ, {0}};
static domain_hook_t *const hooked_domains[] = {&mem_hook, &obj_hook};
#define N_HOOKED ((int)(sizeof(hooked_domains) / sizeof(hooked_domains[0])))

static int installed = 0;
static int attribution_enabled = 1;
static PyObject *account_var = NULL;        /* ContextVar, strong ref */
/* _masking.region_account (a ContextVar, strong ref), or NULL until
 * set_region_var(): the account an interrupt-safe region protects. */
static PyObject *region_var = NULL;
static PyTypeObject *account_type = NULL;   /* strong ref */
static PyInterpreterState *main_interp = NULL;

static uint64_t stat_samples = 0;       /* samples charged to an account */
static uint64_t stat_unattributed = 0;  /* samples outside any scope */
static uint64_t stat_dropped = 0;       /* samples lost to table OOM */
static uint64_t stat_reinstalls = 0;
static uint64_t stat_refused = 0;       /* requests refused (limits) */

/* True when shared meter state may be touched from this hook call: the
 * calling thread holds the GIL of the main interpreter.  MEM/OBJ hooks are
 * always called with a GIL, but numpy's data handler may be called without
 * one (numpy_handler.c), which 3.11 cannot tell from the thread state alone:
 * there _PyThreadState_UncheckedGet() is the GIL holder's thread state,
 * whichever thread asks, so it must also be this thread's own.  From 3.12 it
 * is this thread's attached thread state, NULL while it has released the
 * GIL.  (Not PyGILState_Check(): it answers 1 for every thread once a
 * subinterpreter has been created.) */
static inline PyThreadState *
current_tstate(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    /* Public from 3.13; the underscored name is deprecated from 3.14. */
    return PyThreadState_GetUnchecked();
#else
    return _PyThreadState_UncheckedGet();
#endif
}

static inline int
holds_main_gil(void)
{
    PyThreadState *ts = current_tstate();
#if PY_VERSION_HEX < 0x030C0000
    if (ts != PyGILState_GetThisThreadState()) {
        return 0;
    }
#endif
    return ts != NULL && PyThreadState_GetInterpreter(ts) == main_interp;
}

/* The account held by `var` in the allocating context, borrowed: the
 * context holds a reference for as long as this hook runs. */
static account_t *
context_var_account(PyObject *var)
{
    PyObject *value = NULL;
    int rc;
    /* PyContextVar_Get does not allocate and cannot fail for a ContextVar
     * key, but an allocation may happen while an exception is being
     * handled: keep the error indicator exactly as we found it. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *saved = PyErr_GetRaisedException();
    rc = PyContextVar_Get(var, NULL, &value);
    if (rc < 0) {
        PyErr_Clear();
    }
    PyErr_SetRaisedException(saved);
#else
    PyObject *saved_type, *saved_value, *saved_tb;
    PyErr_Fetch(&saved_type, &saved_value, &saved_tb);
    rc = PyContextVar_Get(var, NULL, &value);
    if (rc < 0) {
        PyErr_Clear();
    }
    PyErr_Restore(saved_type, saved_value, saved_tb);
#endif
    if (rc < 0 || value == NULL) {
        return NULL;
    }
    account_t *account = NULL;
    if (Py_IS_TYPE(value, account_type)) {
        account = ((AccountObject *)value)->account;
    }
    Py_DECREF(value);
    return account;
}

account_t *
current_account(void)
{
    return context_var_account(account_var);
}

/* Does the allocating context refuse a request of `size` bytes
 * (>= METER_REFUSE_MIN)?  `old`: for a realloc, the record of the block
 * being resized, or NULL.  Not inside our own slow path (depth), nor
 * without the main interpreter's GIL (no context to read), nor while no
 * memory limit is open. */
static int
refuses(thread_meter_t *t, size_t size, const block_t *old)
{
    if (t->depth || !attribution_enabled
        || (accounts_memory_limits_open == 0 && global_limit == NO_LIMIT)
        || size > (size_t)INT64_MAX || !holds_main_gil()) {
        return 0;
    }
    account_t *account = current_account();
    if (account == NULL) {
        return 0;  /* outside every scope: no limit, no participant */
    }
    account_t *region = region_var != NULL ? context_var_account(region_var)
                                           : NULL;
    if (!accounts_refuse(account, region, (int64_t)size,
                         old != NULL ? old->account : NULL,
                         old != NULL ? old->weight : 0)) {
        return 0;
    }
    stat_refused++;
    return 1;
}

/* A mark fell inside this allocation of `size` bytes, `overshoot` bytes
 * before its end: weigh the sample and charge it. */
static void
sample(thread_meter_t *t, void *ptr, size_t size, int64_t overshoot)
{
    if (METER_UNLIKELY(t->epoch != sampler_epoch)) {
        /* First allocation of this thread, or R changed since its countdown
         * was drawn: (re)start its Poisson process at this allocation. */
        if (t->mean == 0 && holds_main_gil()) {
            sampler_register_thread(t);
        }
        sampler_redraw(t);
        t->countdown -= (int64_t)size;
        if (t->countdown > 0) {
            return;
        }
        overshoot = -t->countdown;
    }
    if (ptr == NULL) {
        /* Refused: nothing to charge, and nothing to weigh.  The request
         * may be of nearly 2**63 bytes (bytearray(2**63 - 64)), whose marks
         * would weigh more than an int64 holds.  A fresh countdown leaves
         * the estimate unbiased (memorylessness). */
        sampler_redraw(t);
        return;
    }
    int64_t weight;
    if (t->mean <= 1) {
        weight = (int64_t)size;
    }
    else if (__builtin_add_overflow(sampler_extra_marks(t, overshoot), 1,
                                    &weight)
             || __builtin_mul_overflow(weight, t->mean, &weight)) {
        /* Only a block of nearly 2**63 bytes, or a configured interval
         * near 2**63, gets here: saturate rather than wrap. */
        weight = INT64_MAX;
    }
    sampler_redraw(t);
    if (weight == 0 || !attribution_enabled || !holds_main_gil()) {
        return;
    }
    account_t *account = current_account();
    if (account == NULL) {
        stat_unattributed++;
        if (global_limit == NO_LIMIT) {
            return;
        }
        account = &global_root;  /* counts toward the global limit */
    }
    /* The stack is read only now, for a sample that is kept: never on the
     * fast path, never for a sample nobody is charged. */
    traceback_t *tb = sites_traceback_limit ? sites_capture(current_tstate())
                                            : NULL;
    int64_t mean = t->mean <= 1 ? 1 : t->mean;
    if (blocks_insert((uintptr_t)ptr, account, weight, tb, mean) < 0) {
        traceback_decref(tb);
        stat_dropped++;
        return;
    }
    stat_samples++;
    account_charge(account, weight);
    if (tb != NULL) {
        /* Variance of a Poisson-sampled byte count: each mark is worth R
         * bytes, so Var = R * weight (zero when exact). */
        double var = mean > 1 ? (double)weight * (double)mean : 0.0;
        for (account_t *a = account; a != NULL; a = a->parent) {
            sites_count(a, tb, weight, var);
        }
        traceback_decref(tb);
    }
}

/* Inside our own slow path (or Account.enter/leave) nothing is metered: a
 * mark that falls there is dropped by restarting the countdown, which by
 * memorylessness leaves the rest of the process unbiased. */
static inline void
drop_mark(thread_meter_t *t)
{
    if (t->countdown <= 0) {
        sampler_redraw(t);
    }
}

void
meter_forget(void *ptr)
{
    block_t block;
    if (!holds_main_gil()) {
        return;
    }
    if (blocks_take((uintptr_t)ptr, &block)) {
        blocks_release(&block);
    }
    else {
        blocks_note_false_positive();
    }
}

/* The slow paths run when the countdown reached zero.  The depth counter
 * lives here, not on the fast path: MEM/OBJ allocators below us (pymalloc,
 * the debug hooks, tracemalloc) call the RAW domain or libc, never a hooked
 * domain, so the only code that can re-enter our hooks is our own slow path,
 * and that is where it is guarded.  They take the allocator below as a
 * function and its context, so that numpy's handler (numpy_handler.c) goes
 * through the very same paths. */
void *__attribute__((noinline))
meter_malloc_slow(meter_malloc_fn below, void *ctx, thread_meter_t *t,
                  size_t size)
{
    if (t->depth) {
        drop_mark(t);
        return below(ctx, size);
    }
    if (size >= METER_REFUSE_MIN) {
        if (refuses(t, size, NULL)) {
            /* Nothing allocated: the countdown is as it was before. */
            t->countdown += (int64_t)size;
            return NULL;
        }
        if (t->countdown > 0) {
            return below(ctx, size);  /* here to be checked, not sampled */
        }
    }
    int64_t overshoot = -t->countdown;
    t->depth = 1;
    void *ptr = below(ctx, size);
    sample(t, ptr, size, overshoot);
    t->depth = 0;
    return ptr;
}

void *__attribute__((noinline))
meter_calloc_slow(meter_calloc_fn below, void *ctx, thread_meter_t *t,
                  size_t nelem, size_t elsize, size_t size)
{
    if (t->depth) {
        drop_mark(t);
        return below(ctx, nelem, elsize);
    }
    if (size >= METER_REFUSE_MIN) {
        if (refuses(t, size, NULL)) {
            t->countdown += (int64_t)size;
            return NULL;
        }
        if (t->countdown > 0) {
            return below(ctx, nelem, elsize);
        }
    }
    int64_t overshoot = -t->countdown;
    t->depth = 1;
    void *ptr = below(ctx, nelem, elsize);
    sample(t, ptr, size, overshoot);
    t->depth = 0;
    return ptr;
}

/* A realloc of a possibly tracked block, or one that reached a mark.
 * `counted`: the fast path already subtracted `size` from the countdown. */
void *__attribute__((noinline))
meter_realloc_slow(meter_realloc_fn below, void *ctx, thread_meter_t *t,
                   void *ptr, size_t size, int counted)
{
    /* The old block's record is taken out before the call: once realloc
     * returns, its address may already belong to someone else.  This is
     * done even where nothing is metered, or the record would go stale.
     * (Without the main GIL it cannot be: if the block moves, its record is
     * left behind, stale, like that of a free made in another interpreter,
     * and is settled when that address is next sampled or freed.) */
    block_t old;
    int had_record = ptr != NULL && blocks_maybe_tracked(ptr)
                     && holds_main_gil()
                     && blocks_take((uintptr_t)ptr, &old);
    /* Growth by at least METER_REFUSE_MIN (as far as the meter knows the
     * old block: its charge if it was sampled, else nothing) that would
     * take a limit past: refused, the old block left as it was. */
    if (size >= METER_REFUSE_MIN
        && (int64_t)size - (had_record ? old.weight : 0)
               >= (int64_t)METER_REFUSE_MIN
        && refuses(t, size, had_record ? &old : NULL)) {
        if (counted) {
            t->countdown += (int64_t)size;
        }
        if (had_record
            && blocks_insert((uintptr_t)ptr, old.account, old.weight, old.tb,
                             old.mean) == 0) {
            account_decref(old.account);
            traceback_decref(old.tb);
        }
        else if (had_record) {
            blocks_release(&old);
        }
        return NULL;
    }
    if (!counted) {
        t->countdown -= (int64_t)size;
    }
    int outer_depth = t->depth;
    int metered = outer_depth == 0 && t->countdown <= 0;
    int64_t overshoot = -t->countdown;
    if (outer_depth) {
        drop_mark(t);
    }
    t->depth = 1;
    void *new_ptr = below(ctx, ptr, size);
    if (had_record) {
        if (new_ptr == NULL
            && blocks_insert((uintptr_t)ptr, old.account, old.weight, old.tb,
                             old.mean) == 0) {
            /* Failed: the old block is still there, and still charged. */
            account_decref(old.account);
            traceback_decref(old.tb);
        }
        else {
            blocks_release(&old);
        }
    }
    /* A realloc is charged its whole new size, like tracemalloc: it may move
     * and copy the block, and the old size is unknown for unsampled blocks. */
    if (metered) {
        sample(t, new_ptr, size, overshoot);
    }
    t->depth = outer_depth;
    return new_ptr;
}

/* Fast paths: a thread-local subtraction and a branch, then a tail call.
 * The subtraction cannot overflow: a countdown is never negative here (every
 * slow path leaves a fresh one), and no size is above PY_SSIZE_T_MAX, as
 * PyMem_Malloc, PyObject_Malloc and the others refuse larger requests
 * before they call the allocator. */

static void *
hook_malloc(void *ctx, size_t size)
{
    domain_hook_t *hook = ctx;
    thread_meter_t *t = &meter_tls;
    if (METER_LIKELY((t->countdown -= (int64_t)size) > 0
                     && size < METER_REFUSE_MIN)) {
        return hook->prev.malloc(hook->prev.ctx, size);
    }
    return meter_malloc_slow(hook->prev.malloc, hook->prev.ctx, t, size);
}

static void *
hook_calloc(void *ctx, size_t nelem, size_t elsize)
{
    domain_hook_t *hook = ctx;
    thread_meter_t *t = &meter_tls;
    int64_t size;
    if (METER_UNLIKELY(__builtin_mul_overflow(nelem, elsize, &size))) {
        return hook->prev.calloc(hook->prev.ctx, nelem, elsize);  /* fails */
    }
    if (METER_LIKELY((t->countdown -= size) > 0
                     && size < (int64_t)METER_REFUSE_MIN)) {
        return hook->prev.calloc(hook->prev.ctx, nelem, elsize);
    }
    return meter_calloc_slow(hook->prev.calloc, hook->prev.ctx, t, nelem,
                             elsize, size);
}

static void *
hook_realloc(void *ctx, void *ptr, size_t size)
{
    domain_hook_t *hook = ctx;
    thread_meter_t *t = &meter_tls;
    if (METER_UNLIKELY(ptr != NULL && blocks_maybe_tracked(ptr))) {
        return meter_realloc_slow(hook->prev.realloc, hook->prev.ctx, t, ptr,
                                  size, 0);
    }
    if (METER_LIKELY((t->countdown -= (int64_t)size) > 0
                     && size < METER_REFUSE_MIN)) {
        return hook->prev.realloc(hook->prev.ctx, ptr, size);
    }
    return meter_realloc_slow(hook->prev.realloc, hook->prev.ctx, t, ptr,
                              size, 1);
}

/* Out of line, so that the free fast path needs no stack frame. */
static void __attribute__((noinline))
free_tracked(domain_hook_t *hook, void *ptr)
{
    meter_forget(ptr);
    hook->prev.free(hook->prev.ctx, ptr);
}

static void
hook_free(void *ctx, void *ptr)
{
    domain_hook_t *hook = ctx;
    if (METER_UNLIKELY(ptr != NULL && blocks_maybe_tracked(ptr))) {
        free_tracked(hook, ptr);
        return;
    }
    hook->prev.free(hook->prev.ctx, ptr);
}

static void
install_domain(domain_hook_t *hook)
{
    PyMemAllocatorEx ours = {hook, hook_malloc, hook_calloc, hook_realloc,
                             hook_free};
    PyMem_GetAllocator(hook->domain, &hook->prev);
    PyMem_SetAllocator(hook->domain, &ours);
}

static void
after_fork_child(void)
{
    accounts_after_fork_child();
    sampler_after_fork_child();
    interrupts_after_fork_child();
}

int
hooks_install(void)
{
    if (installed) {
        return 0;
    }
    static int atfork_registered = 0;
    if (!atfork_registered) {
        if (pthread_atfork(NULL, NULL, after_fork_child) != 0) {
            PyErr_SetString(PyExc_RuntimeError,
                            "memlimits_async: pthread_atfork failed");
            return -1;
        }
        atfork_registered = 1;
    }
    for (int i = 0; i < N_HOOKED; i++) {
        install_domain(hooked_domains[i]);
    }
    installed = 1;
    return 0;
}

int
hooks_installed(void)
{
    return installed;
}

/* Does an allocation in this domain still reach our hook?  A wrapper
 * installed above us (tracemalloc started later) is fine as long as it calls
 * us; we find out by allocating once and watching our own countdown, which
 * costs nothing on the fast path, and, unlike PyMem_GetAllocator (which
 * takes a lock since 3.12), no lock: this runs at every scope entry. */
static int
domain_reaches_us(domain_hook_t *hook)
{
    thread_meter_t *t = &meter_tls;
    int64_t saved = t->countdown;
    t->countdown = INT64_MAX / 2;
    void *probe = hook->domain == PYMEM_DOMAIN_MEM ? PyMem_Malloc(8)
                                                   : PyObject_Malloc(8);
    int reached = t->countdown != INT64_MAX / 2;
    if (hook->domain == PYMEM_DOMAIN_MEM) {
        PyMem_Free(probe);
    }
    else {
        PyObject_Free(probe);
    }
    t->countdown = saved;
    return reached;
}

int
hooks_check(void)
{
    if (!installed) {
        return 1;
    }
    int intact = 1;
    for (int i = 0; i < N_HOOKED; i++) {
        if (!domain_reaches_us(hooked_domains[i])) {
            intact = 0;
        }
    }
    if (intact) {
        return 1;
    }
    /* Frees were missed while we were unhooked, so no record can be trusted
     * any longer: credit them all back (live estimates restart from the
     * blocks sampled from now on; cumulative counts are kept). */
    blocks_forget_all();
    for (int i = 0; i < N_HOOKED; i++) {
        if (!domain_reaches_us(hooked_domains[i])) {
            install_domain(hooked_domains[i]);
        }
    }
    stat_reinstalls++;
    return 0;
}

void
hooks_set_region_var(PyObject *var)
{
    Py_XINCREF(var);
    Py_XSETREF(region_var, var);
}

void
hooks_disable_attribution(void)
{
    attribution_enabled = 0;
}

int
hooks_init_module(PyObject *context_var, PyTypeObject *type)
{
    Py_INCREF(context_var);
    account_var = context_var;
    Py_INCREF(type);
    account_type = type;
    main_interp = PyInterpreterState_Main();
    return 0;
}

#define SET_STAT(dict, key, value)                                       \
    do {                                                                 \
        PyObject *v_ = PyLong_FromLongLong((long long)(value));          \
        if (v_ == NULL || PyDict_SetItemString(dict, key, v_) < 0) {     \
            Py_XDECREF(v_);                                              \
            return -1;                                                   \
        }                                                                \
        Py_DECREF(v_);                                                   \
    } while (0)

int
hooks_stats(PyObject *dict)
{
    SET_STAT(dict, "installed", installed);
    SET_STAT(dict, "reinstalls", stat_reinstalls);
    SET_STAT(dict, "numpy_handler", numpy_handler_wrapped());
    SET_STAT(dict, "samples", stat_samples);
    SET_STAT(dict, "unattributed_samples", stat_unattributed);
    SET_STAT(dict, "global_live", global_live);
    SET_STAT(dict, "dropped_samples", stat_dropped);
    SET_STAT(dict, "refused_requests", stat_refused);
    SET_STAT(dict, "tracked_blocks", blocks_count);
    SET_STAT(dict, "table_capacity", blocks_capacity());
    SET_STAT(dict, "filter_false_positives", blocks_filter_false_positives());
    SET_STAT(dict, "sampling_interval", sampler_interval);
    SET_STAT(dict, "configured_sampling_interval", sampler_configured());
    SET_STAT(dict, "min_adaptive_interval", sampler_min_adaptive_interval());
    SET_STAT(dict, "samples_per_limit", sampler_samples_per_limit());
    SET_STAT(dict, "traceback_limit", sites_traceback_limit);
    SET_STAT(dict, "tracebacks", sites_tracebacks());
    return 0;
}
