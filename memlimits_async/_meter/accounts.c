/* Accounts: what a scope is charged, and the queue of breached accounts.
 *
 * Charging walks from the innermost account to the root, so every enclosing
 * account sees every sample and an inner scope can never extend an outer one.
 * A block is credited back along the same chain when it is freed, whenever
 * that happens: a block that outlives its scope keeps counting in the live
 * bytes of the enclosing scopes until it is freed (the closed account stays
 * allocated, by reference count, for as long as such blocks exist).
 *
 * A breach is recorded once per account (the first limit passed) and, if a
 * scope waits for it (an owner with a callback), the account is queued; the
 * queue is drained under the GIL by the Python delivery layer, which is woken
 * in two ways, both allocation-free and safe
 * inside an allocator hook: Py_AddPendingCall (runs at the main thread's next
 * eval-breaker check, i.e. within a few bytecodes when the allocating code is
 * on the main thread) and a POSIX semaphore that the delivery thread waits on
 * (for loops running in other threads, or a main thread blocked in C).
 */
#include "meter.h"
#include <errno.h>
#include <semaphore.h>
#include <stdlib.h>
#include <time.h>

static account_t *queue_head = NULL;
static account_t *queue_tail = NULL;
static int pending_call_scheduled = 0;
static sem_t wakeup;
static PyObject *breach_handler = NULL;

/* Never freed: its count starts at one reference nobody gives back. */
account_t global_root = {.refcnt = 1,
                         .memory_limit = NO_LIMIT,
                         .allocation_limit = NO_LIMIT,
                         .closed = 1};
int64_t global_limit = NO_LIMIT;
int64_t global_live = 0;
int64_t global_external = -1;
Py_ssize_t accounts_live = 0;
Py_ssize_t accounts_memory_limits_open = 0;

static int accounts_pending_call(void *unused);

int
accounts_init(void)
{
    if (sem_init(&wakeup, 0, 0) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

void
accounts_after_fork_child(void)
{
    /* The delivery thread does not exist in the child; a semaphore that a
     * vanished thread was waiting on is re-created rather than trusted. */
    sem_init(&wakeup, 0, 0);
    pending_call_scheduled = 0;
}

account_t *
account_new(account_t *parent, int64_t memory_limit, int64_t allocation_limit)
{
    account_t *a = calloc(1, sizeof(account_t));
    if (a == NULL) {
        return NULL;
    }
    accounts_live++;
    a->refcnt = 1;
    a->parent = parent;
    if (parent != NULL) {
        account_incref(parent);
    }
    a->memory_limit = memory_limit;
    a->allocation_limit = allocation_limit;
    sampler_relax_if_due();
    if (memory_limit != NO_LIMIT) {
        sampler_limit_opened(memory_limit);
        accounts_memory_limits_open++;
    }
    if (allocation_limit != NO_LIMIT) {
        sampler_limit_opened(allocation_limit);
    }
    return a;
}

void
account_incref(account_t *a)
{
    a->refcnt++;
}

void
account_decref(account_t *a)
{
    /* Iterative so that a long chain of closed accounts cannot recurse. */
    while (a != NULL && --a->refcnt == 0) {
        account_t *parent = a->parent;
        sites_counts_free(a->sites);
        free(a);
        accounts_live--;
        a = parent;
    }
}

void
account_close(account_t *a)
{
    if (a->closed) {
        return;
    }
    a->closed = 1;
    if (a->memory_limit != NO_LIMIT) {
        sampler_limit_closed(a->memory_limit);
        accounts_memory_limits_open--;
    }
    if (a->allocation_limit != NO_LIMIT) {
        sampler_limit_closed(a->allocation_limit);
    }
}

void
accounts_wake_delivery_thread(void)
{
    sem_post(&wakeup);
}

static void
wake_deliverer(void)
{
    if (!pending_call_scheduled) {
        /* May fail when the pending-call queue is full or the interpreter
         * is finalizing; the semaphore still wakes the delivery thread. */
        if (Py_AddPendingCall(accounts_pending_call, NULL) == 0) {
            pending_call_scheduled = 1;
        }
    }
    sem_post(&wakeup);
}

static void
record_breach(account_t *a, int kind, int64_t limit, int64_t observed,
              int64_t refused)
{
    a->breach_kind = (uint8_t)kind;
    a->breach_limit = limit;
    a->breach_observed = observed;
    a->breach_refused = refused;
    if (a->owner == NULL) {
        return;  /* nobody waits for it: it is read at exit */
    }
    account_incref(a);
    a->next_queued = NULL;
    if (queue_tail != NULL) {
        queue_tail->next_queued = a;
    }
    else {
        queue_head = a;
    }
    queue_tail = a;
    wake_deliverer();
}

void
accounts_set_global_limit(int64_t limit)
{
    if (global_limit != NO_LIMIT) {
        sampler_limit_closed(global_limit);
    }
    global_limit = limit;
    if (limit != NO_LIMIT) {
        sampler_limit_opened(limit);
    }
}

/* The allocating context's innermost open participant, breached. */
static void
charge_global(account_t *a)
{
    int64_t measure = global_external >= 0 ? global_external : global_live;
    if (measure <= global_limit) {
        return;
    }
    for (; a != NULL; a = a->parent) {
        if (a->global_participant && !a->closed) {
            if (a->breach_kind == BREACH_NONE) {
                record_breach(a, BREACH_GLOBAL_MEMORY, global_limit, measure, 0);
            }
            return;
        }
    }
}

void
account_charge(account_t *a, int64_t weight)
{
    account_t *allocating = a;
    global_live = meter_add_clamped(global_live, weight);
    for (; a != NULL; a = a->parent) {
        a->allocated = meter_add_clamped(a->allocated, weight);
        a->live = meter_add_clamped(a->live, weight);
        if (a->live > a->peak_live) {
            a->peak_live = a->live;
        }
        if (a->closed || a->breach_kind != BREACH_NONE) {
            continue;
        }
        if (a->memory_limit != NO_LIMIT && a->live > a->memory_limit) {
            record_breach(a, BREACH_MEMORY, a->memory_limit, a->live, 0);
        }
        else if (a->allocation_limit != NO_LIMIT
                 && a->allocated > a->allocation_limit) {
            record_breach(a, BREACH_ALLOCATIONS, a->allocation_limit,
                          a->allocated, 0);
        }
    }
    if (global_limit != NO_LIMIT) {
        charge_global(allocating);
    }
}

/* Is `a` the account `within` or one of its ancestors? */
static int
is_within(account_t *within, account_t *a)
{
    for (; within != NULL; within = within->parent) {
        if (within == a) {
            return 1;
        }
    }
    return 0;
}

/* Called from an allocator hook (GIL, depth 0): no Python, no lock, no
 * allocation; a walk up the chain of the allocating context.  Limits are
 * those of the breach test of account_charge: live bytes after the
 * request, against the limit.  A closed account never refuses (it never
 * breaches); an account already breached still refuses (its limit holds)
 * but keeps its first breach.  Shields and interrupt-safe regions: the
 * accounts around a shielded scope's account, and the account a region
 * protects with those around it, do not refuse (their limits are not
 * enforced inside such a body, as their cancellation is not); the shielded
 * scope's own limit and those of scopes opened inside still do. */
int
accounts_refuse(account_t *a, account_t *region, int64_t size,
                account_t *old, int64_t old_weight)
{
    int refused = 0;
    int sheltered = 0;  /* from here outward, limits do not refuse */
    account_t *participant = NULL;
    for (account_t *p = a; p != NULL; p = p->parent) {
        if (p == region) {
            sheltered = 1;
        }
        if (sheltered) {
            break;
        }
        if (participant == NULL && p->global_participant && !p->closed) {
            participant = p;
        }
        if (!p->closed && p->memory_limit != NO_LIMIT) {
            /* A resize gives back the charge of the block it resizes to
             * the accounts that hold it. */
            int64_t request = size;
            if (old != NULL && is_within(old, p)) {
                request = size - old_weight;
            }
            int64_t after = meter_add_clamped(p->live, request);
            if (after > p->memory_limit) {
                refused = 1;
                p->refused = 1;
                if (p->breach_kind == BREACH_NONE) {
                    record_breach(p, BREACH_MEMORY, p->memory_limit, after,
                                  size);
                }
            }
        }
        if (p->shielding) {
            sheltered = 1;
        }
    }
    if (global_limit != NO_LIMIT && participant != NULL) {
        int64_t measure = global_external >= 0 ? global_external : global_live;
        int64_t request = size;
        if (global_external < 0 && old != NULL) {
            request = size - old_weight;  /* the metered heap gives it back */
        }
        int64_t after = meter_add_clamped(measure, request);
        if (after > global_limit) {
            refused = 1;
            participant->refused = 1;
            if (participant->breach_kind == BREACH_NONE) {
                record_breach(participant, BREACH_GLOBAL_MEMORY, global_limit,
                              after, size);
            }
        }
    }
    return refused;
}

void
account_credit(account_t *a, int64_t weight)
{
    global_live = meter_add_clamped(global_live, -weight);
    for (; a != NULL; a = a->parent) {
        a->live = meter_add_clamped(a->live, -weight);
    }
}

PyObject *
accounts_take_breached(void)
{
    PyObject *listeners = PyList_New(0);
    if (listeners == NULL) {
        return NULL;
    }
    while (queue_head != NULL) {
        account_t *a = queue_head;
        AccountObject *owner = a->owner;
        if (owner != NULL && owner->listener != NULL
            && PyList_Append(listeners, owner->listener) < 0) {
            Py_DECREF(listeners);
            return NULL;
        }
        queue_head = a->next_queued;
        if (queue_head == NULL) {
            queue_tail = NULL;
        }
        a->next_queued = NULL;
        account_decref(a);
    }
    return listeners;
}

void
accounts_set_breach_handler(PyObject *callable)
{
    Py_XINCREF(callable);
    Py_XSETREF(breach_handler, callable);
}

/* Runs on the main thread at an eval-breaker check, with the GIL held, in
 * the middle of whatever Python code was running: it must never let an
 * exception escape into that code. */
static int
accounts_pending_call(void *unused)
{
    (void)unused;
    pending_call_scheduled = 0;
    if (queue_head == NULL || breach_handler == NULL) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *saved = PyErr_GetRaisedException();
#else
    PyObject *saved_type, *saved_value, *saved_tb;
    PyErr_Fetch(&saved_type, &saved_value, &saved_tb);
#endif
    PyObject *result = PyObject_CallNoArgs(breach_handler);
    if (result == NULL) {
        PyErr_WriteUnraisable(breach_handler);
    }
    Py_XDECREF(result);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(saved);
#else
    PyErr_Restore(saved_type, saved_value, saved_tb);
#endif
    return 0;
}

int
accounts_wait_for_breach(double timeout)
{
    if (queue_head != NULL) {
        return 1;
    }
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    double whole = (double)(time_t)timeout;
    deadline.tv_sec += (time_t)timeout;
    deadline.tv_nsec += (long)((timeout - whole) * 1e9);
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    do {
        rc = sem_timedwait(&wakeup, &deadline);
    } while (rc != 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    /* Coalesce: one drain serves every post made so far. */
    while (sem_trywait(&wakeup) == 0) {
    }
    return queue_head != NULL;
}
