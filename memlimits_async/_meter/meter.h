/* The allocation meter: shared declarations of the C layer.
 *
 * The meter wraps CPython's MEM and OBJ allocator domains (and numpy's
 * default data handler, numpy_handler.c), samples the bytes
 * they hand out with a Poisson process (every byte is "marked" with
 * probability 1/R), charges each sample to the account found in a ContextVar
 * of the allocating context and to every enclosing account, remembers sampled
 * blocks so that their free credits the same accounts, and records a breach
 * when an account passes one of its limits.  It knows nothing of event loops:
 * a breach is put on a queue and a registered Python callable is woken
 * (Py_AddPendingCall on the main thread, a semaphore for the delivery
 * thread), which is where the Python layer takes over.
 *
 * Concurrency invariant (enforced in hooks.c): every piece of shared state in
 * this layer (accounts, the block table, the breach queue, the interval
 * buckets) is touched only by a thread that holds the GIL of the *main*
 * interpreter.  MEM/OBJ hooks are called with the GIL held; a hook running in
 * another interpreter (which may have its own GIL), or numpy's handler
 * called without the GIL, leaves shared state alone.
 * The only state touched without that guarantee is thread-local (the
 * sampler's countdown) or read-only (the filter bytes, which are never
 * freed).  The free-threaded build is refused at build time (below).
 *
 * Hook invariant: no hook runs Python code, sets an exception, takes the GIL,
 * or allocates through a Python allocator domain.  (A hook that refuses a
 * request returns NULL without setting an exception: its caller raises
 * MemoryError, as for any failed allocation.)  The only allocations in a
 * hook are libc calloc/free of the block table, never of a hooked domain.
 */
#ifndef MEMLIMITS_METER_H
#define MEMLIMITS_METER_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#ifdef Py_GIL_DISABLED
#error "memlimits_async does not support the free-threaded build yet"
#endif

/* initial-exec TLS: one %fs-relative access instead of a __tls_get_addr call
 * per hook (research: +12-69% overhead with the default model in a .so). */
#if defined(__GNUC__) && defined(__ELF__)
#define METER_TLS __thread __attribute__((tls_model("initial-exec")))
#else
#define METER_TLS _Thread_local
#endif

#define METER_LIKELY(x) __builtin_expect(!!(x), 1)
#define METER_UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ---- breach kinds (mirror memlimits_async._accounts.BreachKind) ---- */
enum {
    BREACH_NONE = 0,
    BREACH_MEMORY = 1,
    BREACH_ALLOCATIONS = 2,
    BREACH_GLOBAL_MEMORY = 3,
};

#define NO_LIMIT (-1)

/* a + b, clamped to the int64 range.  Byte counts add up weights that may
 * themselves be clamped at INT64_MAX (sample() in hooks.c): pinned at the
 * end of the range they still read as "over any limit", where a wrapped
 * count would read as negative. */
static inline int64_t
meter_add_clamped(int64_t a, int64_t b)
{
    int64_t sum;
    if (__builtin_add_overflow(a, b, &sum)) {
        return b > 0 ? INT64_MAX : INT64_MIN;
    }
    return sum;
}

/* ---- accounts (accounts.c) ----
 * A plain C struct with its own reference count, so that a free (which may
 * happen long after the scope that owned the account has gone) never runs
 * Python code.  References are held by: the Python Account object, every
 * child account (parent link), every sampled block charged to it, and the
 * breach queue while it is queued. */
struct site_counts;

typedef struct account {
    Py_ssize_t refcnt;
    struct account *parent;
    /* Allocated bytes by allocating stack (sites.c), NULL until the first
     * sample with a stack; freed with the account. */
    struct site_counts *sites;
    int64_t allocated;       /* cumulative bytes allocated (estimate) */
    int64_t live;            /* bytes of sampled blocks not yet freed */
    int64_t peak_live;
    int64_t memory_limit;    /* NO_LIMIT or bytes */
    int64_t allocation_limit;
    /* Bits and bytes, not ints: an idle scope holds one account. */
    uint8_t closed : 1;              /* its scope has exited: count, never breach */
    uint8_t global_participant : 1;  /* may be stopped by the global memory limit */
    uint8_t interrupted : 1;         /* a breach was delivered to its scope */
    uint8_t shielding : 1;           /* its scope's body runs shielded: no
                                        request is refused for the limits
                                        of the accounts around it */
    uint8_t refused : 1;             /* a request was refused for its limit */
    uint8_t breach_kind;         /* first breach only; sticky */
    uint32_t entered_slot;       /* 1 + its place in the registry of entered
                                    accounts (module.c), 0 when not entered */
    void *owner;             /* AccountObject waiting for breaches (borrowed;
                                set by enter(listener), cleared by leave) */
    int64_t breach_limit;
    int64_t breach_observed;
    int64_t breach_refused;  /* bytes of the refused request, 0: sampled */
    struct account *next_queued;
} account_t;

account_t *account_new(account_t *parent, int64_t memory_limit,
                       int64_t allocation_limit);
void account_incref(account_t *a);
void account_decref(account_t *a);
void account_close(account_t *a);
/* Charge `weight` bytes to `a` and every ancestor; may record breaches. */
void account_charge(account_t *a, int64_t weight);
/* Credit `weight` live bytes back to `a` and every ancestor. */
void account_credit(account_t *a, int64_t weight);

/* Refusal of single large requests.  A request of at least
 * METER_REFUSE_MIN bytes that alone would take an open account of the
 * allocating context (or the global measure, for its innermost open
 * participant) past its memory limit is refused: the hook returns NULL
 * without calling the allocator below, and the account records a memory
 * breach naming the request.  Smaller requests are never refused: they
 * fail in unpredictable places inside CPython. */
#define METER_REFUSE_MIN ((size_t)1 << 20)
/* Memory limits of open accounts (the global limit aside): while none is
 * open and no global limit is set, nothing is looked up for a request. */
extern Py_ssize_t accounts_memory_limits_open;
/* Whether `a`'s chain refuses `size` bytes.  `region`: the account the
 * innermost interrupt-safe region of the context protects (its limit and
 * those around it do not refuse), or NULL.  `old`/`old_weight`: for a
 * realloc, the account charged for the block being resized and its charge,
 * which the resize gives back (NULL/0 otherwise).  Records the breaches. */
int accounts_refuse(account_t *a, account_t *region, int64_t size,
                    account_t *old, int64_t old_weight);

/* The global memory limit (accounts.c).  Every tracked block counts in
 * global_live; while a limit is set, samples outside any scope are tracked
 * too (charged to global_root), so global_live estimates the bytes the
 * process allocated through the hooked domains since the limit was set and
 * still holds.  global_external >= 0 replaces that measure (RSS, read by the
 * Python layer).  Policy: a sample taken while the measure is over the
 * limit breaches the innermost open participating account of the allocating
 * context, and nothing else; quiet participants are never stopped. */
extern account_t global_root;
extern int64_t global_limit;     /* NO_LIMIT or bytes */
extern int64_t global_live;
extern int64_t global_external;  /* -1: measure global_live */
extern Py_ssize_t accounts_live;   /* accounts allocated, not yet freed */
void accounts_set_global_limit(int64_t limit);
/* Pop every queued breached account; returns a new list of the listeners
 * of those whose scope is still open (GIL). */
PyObject *accounts_take_breached(void);
int accounts_wait_for_breach(double timeout);  /* releases the GIL */
void accounts_wake_delivery_thread(void);
void accounts_set_breach_handler(PyObject *callable);
void accounts_after_fork_child(void);
int accounts_init(void);

/* ---- the sampler (sampler.c) ---- */
typedef struct thread_meter {
    int64_t countdown;   /* bytes until the next mark; <= 0 -> slow path */
    int depth;           /* > 0 while inside one of our hooks */
    int64_t mean;        /* interval the current countdown was drawn with; 0 = new thread */
    uint64_t epoch;      /* value of sampler_epoch at the last draw */
    uint64_t rng;        /* xorshift64* state; 0 = seed at next draw */
    double fraction;     /* countdown minus the real-valued gap, in [0, 1) */
    int registered;      /* linked into the registry of live threads */
    struct thread_meter *prev, *next;
} thread_meter_t;

extern METER_TLS thread_meter_t meter_tls;

extern int64_t sampler_interval;        /* effective mean interval R (bytes) */
extern uint64_t sampler_epoch;          /* bumped whenever R changes */
void sampler_set_configured(int64_t interval);
int64_t sampler_configured(void);
void sampler_limit_opened(int64_t limit);
void sampler_limit_closed(int64_t limit);
/* A profiler asks for a mean interval of at most `interval` bytes while it
 * runs (process-wide: countdowns are per thread, not per scope). */
void sampler_request_opened(int64_t interval);
void sampler_request_closed(int64_t interval);
/* Let R rise again if the smallest limits have closed (GIL); the _if_due
 * variant does so at most every 0.25 s. */
void sampler_relax(void);
void sampler_relax_if_due(void);
/* Start a fresh countdown for this thread with the current R. */
void sampler_redraw(thread_meter_t *t);
/* Called on a thread's first slow path: from now on an interval change
 * reaches it at once.  -1 if registration failed (sampling still works). */
int sampler_register_thread(thread_meter_t *t);
void sampler_after_fork_child(void);
int sampler_init(void);
/* Number of marks after the first one in an allocation that reached it
 * `overshoot` bytes before its end (minus the countdown's rounding). */
int64_t sampler_extra_marks(thread_meter_t *t, int64_t overshoot);
int64_t sampler_min_adaptive_interval(void);
int64_t sampler_samples_per_limit(void);

/* ---- allocation sites (frames.c, sites.c) ----
 * At each sample (never on the fast path) the allocating Python stack is
 * read (frames.c: without allocating, see there why and how) and interned
 * in a table of tracebacks, so that a stack seen again costs a hash and a
 * compare.  A traceback is counted by reference from every sampled block
 * that carries it and every per-account site entry: integers only, so a
 * free never runs Python.  Tracebacks nobody references are released by
 * sites_collect(), outside any hook (their code objects' references are
 * dropped there). */
typedef struct {
    PyCodeObject *code;  /* strong reference, once interned */
    int lineno;
} site_frame_t;

typedef struct traceback {
    Py_uhash_t hash;
    Py_ssize_t refcnt;
    uint16_t nframe;
    uint8_t truncated;   /* the stack had more frames than the limit */
    site_frame_t frames[];  /* innermost first */
} traceback_t;

#define SITES_MAX_TRACEBACK_LIMIT 1000
#define SITES_DEFAULT_TRACEBACK_LIMIT 16

extern int sites_traceback_limit;   /* 0: capture off */
/* Up to `max` frames of tstate's Python stack, innermost first; *more is set
 * if frames were left out. */
int frames_capture(PyThreadState *tstate, site_frame_t *out, int max,
                   int *more);
/* The interned stack of the running thread (a new reference), or NULL when
 * capture is off or memory ran out.  GIL of the main interpreter held. */
traceback_t *sites_capture(PyThreadState *tstate);
static inline void
traceback_decref(traceback_t *tb)
{
    if (tb != NULL) {
        tb->refcnt--;
    }
}
/* Count `weight` allocated bytes (variance `var`) against tb in a's table. */
void sites_count(account_t *a, traceback_t *tb, int64_t weight, double var);
void sites_counts_free(struct site_counts *counts);
/* Release unreferenced tracebacks (GIL, outside hooks); the _if_due variant
 * only when the table has doubled since the last collection. */
void sites_collect(void);
void sites_collect_if_due(void);
Py_ssize_t sites_tracebacks(void);

/* One aggregated site: what snapshots are built from. */
typedef struct {
    uintptr_t group;     /* 0, or which group (process snapshots) */
    traceback_t *tb;     /* a reference held while the entry exists */
    int64_t bytes;
    int64_t samples;
    double var;          /* estimated variance of `bytes` */
} site_entry_t;

typedef struct {
    site_entry_t *entries;  /* open addressing on (group, tb); tb NULL = free */
    size_t capacity;
    size_t count;
    /* Set by site_agg_sort_by_group(): entries[0..count) are then in group
     * order (no longer a hash table: nothing may be added). */
    int sorted;
} site_agg_t;

int site_agg_add(site_agg_t *agg, uintptr_t group, traceback_t *tb,
                 int64_t bytes, int64_t samples, double var);
void site_agg_clear(site_agg_t *agg);
/* Add every entry of a's allocated-bytes table to agg under `group`. */
int sites_agg_account(site_agg_t *agg, account_t *a, uintptr_t group);
/* (frames, truncated, bytes, samples, var) tuples for the entries of agg
 * in `group`; frames are ((filename, lineno, qualname), ...) innermost
 * first.  `cache` (a dict) maps tracebacks already converted. */
PyObject *sites_agg_to_list(site_agg_t *agg, uintptr_t group, PyObject *cache);
/* Put the entries in group order, so that sites_agg_to_list() reads only
 * the group's own entries (a process snapshot asks for every open scope's
 * group: a scan of the whole table for each was quadratic). */
void site_agg_sort_by_group(site_agg_t *agg);

/* ---- sampled blocks (blocks.c) ---- */
typedef struct {
    uintptr_t ptr;       /* 0 = empty slot */
    account_t *account;  /* strong reference */
    int64_t weight;
    traceback_t *tb;     /* a reference, or NULL (capture off) */
    int64_t mean;        /* the interval it was sampled with (1: exact) */
} block_t;

extern Py_ssize_t blocks_count;
extern uint8_t blocks_filter[];
#define BLOCKS_FILTER_BITS 16

static inline size_t
blocks_filter_index(uintptr_t ptr)
{
    return (size_t)(((uint64_t)(ptr >> 4) * 0x9E3779B97F4A7C15ULL)
                    >> (64 - BLOCKS_FILTER_BITS));
}

/* Cheap pre-check for the free path: false means "certainly not tracked". */
static inline int
blocks_maybe_tracked(const void *ptr)
{
    return blocks_count != 0 && blocks_filter[blocks_filter_index((uintptr_t)ptr)];
}

int blocks_insert(uintptr_t ptr, account_t *account, int64_t weight,
                  traceback_t *tb, int64_t mean);
/* Call fn on every record (no record may be added or taken meanwhile). */
int blocks_foreach(int (*fn)(const block_t *block, void *arg), void *arg);
/* Release a record taken out with blocks_take: credit and drop references. */
void blocks_release(block_t *block);
/* Remove ptr's record; on success fills *out (the caller owns the reference). */
int blocks_take(uintptr_t ptr, block_t *out);
/* Forget every record, crediting the accounts (used after re-hooking). */
void blocks_forget_all(void);
Py_ssize_t blocks_capacity(void);
uint64_t blocks_filter_false_positives(void);
void blocks_note_false_positive(void);

/* ---- hooks (hooks.c) ----
 * The slow paths of the MEM/OBJ hooks, shared with numpy's data handler:
 * called with the allocator below (a function and its context) when the
 * countdown reached a mark, or for a realloc of a possibly tracked block
 * (`counted`: the caller already subtracted `size` from the countdown).
 * They call the allocator below in every case, and touch shared state only
 * if this thread holds the main interpreter's GIL; otherwise the mark is
 * dropped (the countdown restarts) and the allocation goes unmetered. */
typedef void *(*meter_malloc_fn)(void *ctx, size_t size);
typedef void *(*meter_calloc_fn)(void *ctx, size_t nelem, size_t elsize);
typedef void *(*meter_realloc_fn)(void *ctx, void *ptr, size_t new_size);
void *meter_malloc_slow(meter_malloc_fn below, void *ctx, thread_meter_t *t,
                        size_t size);
void *meter_calloc_slow(meter_calloc_fn below, void *ctx, thread_meter_t *t,
                        size_t nelem, size_t elsize, size_t size);
void *meter_realloc_slow(meter_realloc_fn below, void *ctx, thread_meter_t *t,
                         void *ptr, size_t size, int counted);
/* Credit the record of a block about to be freed, if it has one (call only
 * when blocks_maybe_tracked(ptr), before the block is freed). */
void meter_forget(void *ptr);

int hooks_install(void);         /* idempotent; -1 with exception on failure */
int hooks_installed(void);
/* 1 = still on top (or below a later wrapper that calls us), 0 = re-installed. */
int hooks_check(void);
int hooks_stats(PyObject *dict);
int hooks_init_module(PyObject *context_var, PyTypeObject *account_type);
void hooks_disable_attribution(void);
/* The ContextVar of the account an interrupt-safe region protects. */
void hooks_set_region_var(PyObject *var);
/* The account of the running context, borrowed, or NULL (GIL held). */
account_t *current_account(void);

/* ---- numpy's array buffers (numpy_handler.c) ---- */
/* True until numpy's default handler is wrapped, or found impossible to
 * wrap: numpy_handler_poll() (GIL) then looks for numpy in sys.modules and
 * wraps its handler once it is there.  Never leaves an exception set. */
extern int numpy_handler_pending;
void numpy_handler_poll(void);
int numpy_handler_wrapped(void);
int numpy_handler_init(void);

/* ---- interrupts (interrupts.c): raising into running code ---- */
PyObject *interrupts_set_handler(PyObject *module, PyObject *const *args,
                                 Py_ssize_t nargs);
PyObject *interrupts_call_on_main_thread(PyObject *module, PyObject *unused);
PyObject *interrupts_async_raise(PyObject *module, PyObject *const *args,
                                 Py_ssize_t nargs);
PyObject *interrupts_disarm(PyObject *module, PyObject *unused);
PyObject *interrupts_raise_in_thread_at(PyObject *module, PyObject *const *args,
                                        Py_ssize_t nargs);
PyObject *interrupts_thread_context(PyObject *module, PyObject *thread_id);
PyObject *interrupts_monitor_arm(PyObject *module, PyObject *const *args,
                                 Py_ssize_t nargs);
PyObject *interrupts_monitor_event(PyObject *module, PyObject *const *args,
                                   Py_ssize_t nargs);
void interrupts_after_fork_child(void);

/* Account object (module.c): the ContextVar holds one of these. */
typedef struct {
    PyObject_HEAD
    account_t *account;
    PyObject *previous;   /* between enter() and leave(), else NULL: the
                             ContextVar's value before enter() (None if
                             unset), restored by leave() */
    PyObject *listener;   /* while entered with one: the object whose
                             _on_breach() the delivery layer calls */
    /* Never both needed, so they share the place (the object stays in its
     * 80-byte size class). */
    union {
        /* Between enter() and leave(): the context enter() ran in, whose
         * identity only leave() compares (never dereferenced: it may be
         * gone).  A task or thread started inside the scope runs in a copy
         * of it, where this account is current too. */
        void *entered_in;
        int64_t left_usage[3];  /* allocated, live, peak_live at leave() */
    };
} AccountObject;

#endif /* MEMLIMITS_METER_H */
