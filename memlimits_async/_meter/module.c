/* memlimits_async._meter._core: the Python face of the C meter.
 *
 * Single-phase initialisation on purpose: the meter's state is process-wide
 * (there is one allocator table per process), and CPython refuses to import a
 * single-phase module into an isolated subinterpreter, which is exactly the
 * case this layer does not handle.
 */
#include "meter.h"

static PyTypeObject AccountType;
static PyObject *current_account_var = NULL;

static PyObject *breach_record(account_t *a);

/* The accounts between enter() and leave(), for whole-process snapshots
 * (borrowed: an object leaves the registry before it can be freed).  libc
 * storage; an account knows its place (entered_slot), so that leaving costs
 * a swap with the last one. */
static AccountObject **entered = NULL;
static size_t entered_count = 0;
static size_t entered_capacity = 0;

static int
registry_add(AccountObject *self)
{
    if (entered_count == entered_capacity) {
        size_t capacity = entered_capacity ? entered_capacity * 2 : 64;
        AccountObject **grown = realloc(entered, capacity * sizeof(*grown));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        entered = grown;
        entered_capacity = capacity;
    }
    entered[entered_count++] = self;
    self->account->entered_slot = (uint32_t)entered_count;
    return 0;
}

static void
registry_remove(AccountObject *self)
{
    uint32_t slot = self->account->entered_slot;
    if (slot == 0) {
        return;
    }
    AccountObject *last = entered[--entered_count];
    entered[slot - 1] = last;
    last->account->entered_slot = slot;
    self->account->entered_slot = 0;
}

static int
parse_limit(PyObject *value, const char *name, int64_t *out)
{
    if (value == Py_None) {
        *out = NO_LIMIT;
        return 0;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int or None, not %.100s",
                     name, Py_TYPE(value)->tp_name);
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < 0) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 0, got %lld", name, v);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* Install the hooks, or install them again (with a warning) if they were
 * removed: tracemalloc, started before us and then stopped, restores the
 * allocators it saved, which do not include ours.  Until numpy's data
 * handler is wrapped, also look whether numpy has been imported since (a
 * dict lookup, at every scope entry and upkeep tick). */
static int
ensure_hooks(void)
{
    if (numpy_handler_pending) {
        numpy_handler_poll();
    }
    if (!hooks_installed()) {
        return hooks_install();
    }
    if (hooks_check()) {
        return 0;
    }
    return PyErr_WarnEx(
        PyExc_RuntimeWarning,
        "memlimits_async: the allocator hooks had been removed (by "
        "tracemalloc.stop() after tracemalloc was started before "
        "memlimits_async?) and were installed again; live-bytes estimates of "
        "scopes open at that time restart from zero",
        1);
}

/* The account current in this context, borrowed from the context (which
 * holds it for as long as the caller runs), or NULL. */
static account_t *
context_account(void)
{
    PyObject *value = NULL;
    if (PyContextVar_Get(current_account_var, NULL, &value) < 0) {
        return NULL;
    }
    account_t *account = NULL;
    if (value != NULL && Py_IS_TYPE(value, &AccountType)) {
        account = ((AccountObject *)value)->account;
    }
    Py_XDECREF(value);
    return account;
}

static PyObject *
Account_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"memory_limit", "allocation_limit",
                               "global_memory", NULL};
    PyObject *memory = Py_None;
    PyObject *allocations = Py_None;
    int global_memory = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OOp:Account", keywords,
                                     &memory, &allocations, &global_memory)) {
        return NULL;
    }
    int64_t memory_limit, allocation_limit;
    if (parse_limit(memory, "memory_limit", &memory_limit) < 0
        || parse_limit(allocations, "allocation_limit", &allocation_limit) < 0) {
        return NULL;
    }
    if (ensure_hooks() < 0) {
        return NULL;
    }
    account_t *parent = context_account();
    if (parent == NULL && PyErr_Occurred()) {
        return NULL;
    }
    AccountObject *self = (AccountObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->account = account_new(parent, memory_limit, allocation_limit);
    if (self->account == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->account->global_participant = global_memory != 0;
    return (PyObject *)self;
}

/* The listener is usually the scope that owns this object, hence a cycle
 * until leave(): the type takes part in GC. */
static int
Account_traverse(AccountObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->previous);
    Py_VISIT(self->listener);
    return 0;
}

static int
Account_clear(AccountObject *self)
{
    if (self->account != NULL) {
        self->account->owner = NULL;
        registry_remove(self);
    }
    Py_CLEAR(self->listener);
    Py_CLEAR(self->previous);
    return 0;
}

static void
Account_dealloc(AccountObject *self)
{
    PyObject_GC_UnTrack(self);
    Account_clear(self);
    if (self->account != NULL) {
        account_close(self->account);
        account_decref(self->account);
        self->account = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Switching the ContextVar allocates (a new HAMT, a Token): done with the
 * hooks passing through, so that a scope is never charged for its own
 * bookkeeping and only its body's allocations count.
 *
 * The Token is dropped at once and leave() sets the previous value back:
 * an idle scope (a parked task's) then holds a reference to an object that
 * exists anyway instead of a Token of its own (72 bytes). */
static PyObject *
Account_enter(AccountObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *listener = nargs > 0 ? args[0] : Py_None;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "enter() takes at most 1 argument");
        return NULL;
    }
    if (self->previous != NULL || self->account->closed) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this account was already entered");
        return NULL;
    }
    PyObject *previous = NULL;
    if (PyContextVar_Get(current_account_var, NULL, &previous) < 0) {
        return NULL;
    }
    if (registry_add(self) < 0) {
        Py_XDECREF(previous);
        return NULL;
    }
    meter_tls.depth++;
    PyObject *token = PyContextVar_Set(current_account_var, (PyObject *)self);
    Py_XDECREF(token);
    meter_tls.depth--;
    if (token == NULL) {
        registry_remove(self);
        Py_XDECREF(previous);
        return NULL;
    }
    /* The reference Get returned; None for unset, since NULL means "not
     * entered" (leave() sets None back: the same to every reader). */
    self->previous = previous != NULL ? previous : Py_NewRef(Py_None);
    self->entered_in = PyThreadState_Get()->context;  /* Set made it */
    if (listener != Py_None) {
        /* The object itself, not a bound method of it: 64 bytes less for
         * each idle scope. */
        self->listener = Py_NewRef(listener);
        self->account->owner = self;
    }
    Py_RETURN_NONE;
}

static PyObject *
Account_leave(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->previous != NULL) {
        /* Only where it is current: this context, nothing entered after it
         * still entered.  (A ContextVar token would catch the first only.) */
        PyObject *current = NULL;
        if (PyContextVar_Get(current_account_var, NULL, &current) < 0) {
            return NULL;
        }
        Py_XDECREF(current);  /* only its identity is used */
        if (current != (PyObject *)self) {
            PyErr_SetString(PyExc_RuntimeError,
                            "this account is not current here: leave() must "
                            "run in the context of its enter(), after every "
                            "account entered since was left");
            return NULL;  /* the account stays entered */
        }
        if (PyThreadState_Get()->context != self->entered_in) {
            PyErr_SetString(PyExc_RuntimeError,
                            "this account was entered in another task, thread "
                            "or context, a copy of whose context runs here: "
                            "leave() must run in the context of its enter()");
            return NULL;  /* the account stays entered */
        }
        meter_tls.depth++;
        PyObject *token = PyContextVar_Set(current_account_var, self->previous);
        Py_XDECREF(token);
        meter_tls.depth--;
        if (token == NULL) {
            return NULL;
        }
        Py_CLEAR(self->previous);
        registry_remove(self);
    }
    account_t *a = self->account;
    a->owner = NULL;
    Py_CLEAR(self->listener);
    account_close(a);
    self->left_usage[0] = a->allocated;
    self->left_usage[1] = a->live;
    self->left_usage[2] = a->peak_live;
    return breach_record(a);
}

/* ---- allocation sites ---- */

static inline double
block_var(const block_t *b)
{
    return b->mean > 1 ? (double)b->weight * (double)b->mean : 0.0;
}

typedef struct {
    site_agg_t *agg;
    account_t *within;  /* only blocks charged to it (by_group == 0) */
    int by_group;       /* group by the innermost entered account */
} live_visit_t;

static int
live_visit(const block_t *b, void *arg)
{
    live_visit_t *v = arg;
    if (b->tb == NULL) {
        return 0;
    }
    uintptr_t group = 0;
    if (v->by_group) {
        for (account_t *a = b->account; a != NULL; a = a->parent) {
            if (a->entered_slot != 0) {
                group = (uintptr_t)a;
                break;
            }
        }
    }
    else {
        account_t *a = b->account;
        while (a != NULL && a != v->within) {
            a = a->parent;
        }
        if (a == NULL) {
            return 0;
        }
    }
    return site_agg_add(v->agg, group, b->tb, b->weight, 1, block_var(b));
}

/* The raw data is copied out first, with no Python object made (so that
 * no Python code, which might allocate, free or collect, runs while the
 * meter's tables are read); the lists are built from the copies, unmetered
 * (a snapshot is not charged to the scope it looks at). */
static PyObject *
Account_sites(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    site_agg_t live = {0}, allocated = {0};
    PyObject *cache = NULL, *live_list = NULL, *allocated_list = NULL;
    PyObject *result = NULL;
    live_visit_t visit = {&live, self->account, 0};
    if (blocks_foreach(live_visit, &visit) < 0
        || sites_agg_account(&allocated, self->account, 0) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    meter_tls.depth++;
    cache = PyDict_New();
    if (cache != NULL
        && (live_list = sites_agg_to_list(&live, 0, cache)) != NULL
        && (allocated_list = sites_agg_to_list(&allocated, 0, cache)) != NULL) {
        result = PyTuple_Pack(2, live_list, allocated_list);
    }
    meter_tls.depth--;
done:
    site_agg_clear(&live);
    site_agg_clear(&allocated);
    Py_XDECREF(cache);
    Py_XDECREF(live_list);
    Py_XDECREF(allocated_list);
    return result;
}

/* For a task started inside the account's scope (a copy of its context):
 * from now on this context charges what was current before enter(), so the
 * task's own scope, entered next, is a sibling of this one, not a child.
 * Never where it was entered: its leave() must find it current there. */
static PyObject *
Account_step_outside(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->previous == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this account is not entered");
        return NULL;
    }
    PyObject *current = NULL;
    if (PyContextVar_Get(current_account_var, NULL, &current) < 0) {
        return NULL;
    }
    Py_XDECREF(current);  /* only its identity is used */
    if (current != (PyObject *)self) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this account is not the innermost one current here");
        return NULL;
    }
    if (PyThreadState_Get()->context == self->entered_in) {
        PyErr_SetString(PyExc_RuntimeError,
                        "step_outside() must run in a copy of the context "
                        "that entered the account (a task or thread started "
                        "inside it), not in that context itself");
        return NULL;
    }
    meter_tls.depth++;
    PyObject *token = PyContextVar_Set(current_account_var, self->previous);
    Py_XDECREF(token);
    meter_tls.depth--;
    if (token == NULL) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Account_usage_at_leave(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->previous != NULL) {  /* entered: the place holds entered_in */
        return Py_BuildValue("(iii)", 0, 0, 0);
    }
    return Py_BuildValue("(LLL)", (long long)self->left_usage[0],
                         (long long)self->left_usage[1],
                         (long long)self->left_usage[2]);
}

static PyObject *
Account_usage(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    account_t *a = self->account;
    return Py_BuildValue("(LLL)", (long long)a->allocated, (long long)a->live,
                         (long long)a->peak_live);
}

static PyObject *
breach_record(account_t *a)
{
    if (a->breach_kind == BREACH_NONE) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(iLLL)", a->breach_kind, (long long)a->breach_limit,
                         (long long)a->breach_observed,
                         (long long)a->breach_refused);
}

static PyObject *
Account_refused(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyBool_FromLong(self->account->refused);
}

static PyObject *
Account_set_shielding(AccountObject *self, PyObject *arg)
{
    int shielding = PyObject_IsTrue(arg);
    if (shielding < 0) {
        return NULL;
    }
    self->account->shielding = shielding != 0;
    Py_RETURN_NONE;
}

static PyObject *
Account_breach(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    return breach_record(self->account);
}

static PyObject *
Account_mark_interrupted(AccountObject *self, PyObject *Py_UNUSED(ignored))
{
    self->account->interrupted = 1;
    Py_RETURN_NONE;
}

static PyObject *
Account_is_within(AccountObject *self, PyObject *other)
{
    if (!Py_IS_TYPE(other, &AccountType)) {
        PyErr_SetString(PyExc_TypeError, "is_within() takes an Account");
        return NULL;
    }
    account_t *ancestor = ((AccountObject *)other)->account;
    for (account_t *a = self->account; a != NULL; a = a->parent) {
        if (a == ancestor) {
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

/* The account that was current where this one was entered: the next
 * enclosing scope's, as the running code sees it.  The preemption layer
 * walks it out from the running account, so that finding the breached
 * scopes around running code costs the nesting depth, not the number of
 * breached scopes. */
static PyObject *
Account_get_outer(AccountObject *self, void *Py_UNUSED(closure))
{
    if (self->previous == NULL || !Py_IS_TYPE(self->previous, &AccountType)) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(self->previous);
}

static PyGetSetDef Account_getset[] = {
    {"outer", (getter)Account_get_outer, NULL,
     "The account current where this one was entered (None outside every\n"
     "account, or when it is not entered).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef Account_methods[] = {
    {"mark_interrupted", (PyCFunction)Account_mark_interrupted, METH_NOARGS,
     "mark_interrupted(): a breach was delivered to this account's scope;\n"
     "interrupted() is True in its context until it is left."},
    {"is_within", (PyCFunction)Account_is_within, METH_O,
     "is_within(account) -> True if account is this one or an ancestor."},
    {"sites", (PyCFunction)Account_sites, METH_NOARGS,
     "sites() -> (live, allocated): lists of (frames, truncated, bytes,\n"
     "samples, variance) by allocating stack, for the blocks charged to\n"
     "this account (or its descendants) and still alive, and for every\n"
     "sample charged to it; frames are ((filename, lineno, qualname), ...)\n"
     "innermost first."},
    {"usage", (PyCFunction)Account_usage, METH_NOARGS,
     "usage() -> (allocated, live, peak_live): estimated bytes."},
    {"breach", (PyCFunction)Account_breach, METH_NOARGS,
     "breach() -> None | (kind, limit, observed, refused): the first limit\n"
     "passed; refused is the size of the request refused for it (observed:\n"
     "the bytes it would have made), or 0 when a sample passed it."},
    {"refused", (PyCFunction)Account_refused, METH_NOARGS,
     "refused() -> bool: a request was refused for this account's limit\n"
     "(or, for a participant, the global limit), first breach or not."},
    {"set_shielding", (PyCFunction)Account_set_shielding, METH_O,
     "set_shielding(flag): while set, no request in the account's context is\n"
     "refused for the limits of the accounts around it (its own still\n"
     "refuses)."},
    {"enter", (PyCFunction)(void (*)(void))Account_enter, METH_FASTCALL,
     "enter(listener=None): make this account current in this context;\n"
     "listener._on_breach() is called (by the delivery layer) if it\n"
     "breaches before leave()."},
    {"leave", (PyCFunction)Account_leave, METH_NOARGS,
     "leave() -> breach(): undo enter() (in its context, not a copy, where\n"
     "it is current) and close the\n"
     "account:\n"
     "it keeps counting the blocks charged to it, and never breaches again.\n"
     "Its usage at this moment stays available from usage_at_leave()."},
    {"step_outside", (PyCFunction)Account_step_outside, METH_NOARGS,
     "step_outside(): in a copy of the context of enter() where this\n"
     "account is current, make the account current before it current again."},
    {"usage_at_leave", (PyCFunction)Account_usage_at_leave, METH_NOARGS,
     "usage_at_leave() -> (allocated, live, peak_live) when leave() ran."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AccountType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memlimits_async._meter._core.Account",
    .tp_doc = PyDoc_STR("Account(memory_limit=None, allocation_limit=None)"
                        "\n\n"
                        "What one scope is charged.  Its parent is the account "
                        "current in this context; charges also go to every "
                        "ancestor."),
    .tp_basicsize = sizeof(AccountObject),
    /* not subclassable: hooks test the exact type */
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)Account_traverse,
    .tp_clear = (inquiry)Account_clear,
    .tp_new = Account_new,
    .tp_dealloc = (destructor)Account_dealloc,
    .tp_methods = Account_methods,
    .tp_getset = Account_getset,
};

/* Every entered account's sites: live bytes by the innermost entered
 * account of each block, allocated bytes by account (inclusive of the
 * accounts entered inside it), and a last group for what no entered
 * account holds. */
static PyObject *
meter_process_sites(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    site_agg_t live = {0}, allocated = {0};
    PyObject *cache = NULL, *result = NULL;
    size_t n = entered_count;
    AccountObject **objects = calloc(n + 1, sizeof(AccountObject *));
    AccountObject **outers = calloc(n + 1, sizeof(AccountObject *));
    if (objects == NULL || outers == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    live_visit_t visit = {&live, NULL, 1};
    if (blocks_foreach(live_visit, &visit) < 0
        || sites_agg_account(&allocated, &global_root, 0) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        account_t *a = entered[i]->account;
        if (sites_agg_account(&allocated, a, (uintptr_t)a) < 0) {
            PyErr_NoMemory();
            goto done;
        }
        objects[i] = (AccountObject *)Py_NewRef(entered[i]);
        for (account_t *p = a->parent; p != NULL; p = p->parent) {
            if (p->entered_slot != 0) {
                outers[i] = (AccountObject *)Py_NewRef(entered[p->entered_slot - 1]);
                break;
            }
        }
    }
    site_agg_sort_by_group(&live);
    site_agg_sort_by_group(&allocated);
    meter_tls.depth++;
    cache = PyDict_New();
    result = cache != NULL ? PyList_New(0) : NULL;
    for (size_t i = 0; result != NULL && i <= n; i++) {
        AccountObject *object = objects[i];  /* NULL: the last group */
        uintptr_t group = object != NULL ? (uintptr_t)object->account : 0;
        PyObject *live_list = sites_agg_to_list(&live, group, cache);
        PyObject *allocated_list =
            live_list != NULL ? sites_agg_to_list(&allocated, group, cache)
                              : NULL;
        PyObject *item = NULL;
        if (allocated_list != NULL) {
            PyObject *listener = object != NULL && object->listener != NULL
                                     ? object->listener
                                     : Py_None;
            item = Py_BuildValue(
                "(OOOOO)", object != NULL ? (PyObject *)object : Py_None,
                listener,
                outers[i] != NULL ? (PyObject *)outers[i] : Py_None, live_list,
                allocated_list);
        }
        Py_XDECREF(live_list);
        Py_XDECREF(allocated_list);
        if (item == NULL || PyList_Append(result, item) < 0) {
            Py_XDECREF(item);
            Py_CLEAR(result);
        }
        Py_XDECREF(item);
    }
    meter_tls.depth--;
done:
    if (objects != NULL) {
        for (size_t i = 0; i < n; i++) {
            Py_XDECREF(objects[i]);
        }
    }
    if (outers != NULL) {
        for (size_t i = 0; i < n; i++) {
            Py_XDECREF(outers[i]);
        }
    }
    free(objects);
    free(outers);
    site_agg_clear(&live);
    site_agg_clear(&allocated);
    Py_XDECREF(cache);
    return result;
}

static PyObject *
meter_set_traceback_limit(PyObject *module, PyObject *arg)
{
    long limit = PyLong_AsLong(arg);
    if (limit == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (limit < 0 || limit > SITES_MAX_TRACEBACK_LIMIT) {
        PyErr_Format(PyExc_ValueError,
                     "traceback_limit must be between 0 and %d, got %ld",
                     SITES_MAX_TRACEBACK_LIMIT, limit);
        return NULL;
    }
    sites_traceback_limit = (int)limit;
    Py_RETURN_NONE;
}

static PyObject *
meter_collect_tracebacks(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    sites_collect();
    return PyLong_FromSsize_t(sites_tracebacks());
}

static PyObject *
meter_install(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    if (ensure_hooks() < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
meter_tick(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    sampler_relax();
    sites_collect_if_due();
    if (ensure_hooks() < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
meter_set_sampling_interval(PyObject *module, PyObject *arg)
{
    long long interval = PyLong_AsLongLong(arg);
    if (interval == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (interval < 1) {
        PyErr_SetString(PyExc_ValueError, "sampling_interval must be >= 1");
        return NULL;
    }
    sampler_set_configured((int64_t)interval);
    Py_RETURN_NONE;
}

static int
parse_interval(PyObject *arg, int64_t *out)
{
    long long interval = PyLong_AsLongLong(arg);
    if (interval == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (interval < 1) {
        PyErr_SetString(PyExc_ValueError, "sampling_interval must be >= 1");
        return -1;
    }
    *out = (int64_t)interval;
    return 0;
}

static PyObject *
meter_request_interval(PyObject *module, PyObject *arg)
{
    int64_t interval;
    if (parse_interval(arg, &interval) < 0) {
        return NULL;
    }
    sampler_request_opened(interval);
    Py_RETURN_NONE;
}

static PyObject *
meter_release_interval(PyObject *module, PyObject *arg)
{
    int64_t interval;
    if (parse_interval(arg, &interval) < 0) {
        return NULL;
    }
    sampler_request_closed(interval);
    Py_RETURN_NONE;
}

static PyObject *
meter_stats(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    sampler_relax();
    PyObject *dict = PyDict_New();
    if (dict == NULL) {
        return NULL;
    }
    PyObject *live = PyLong_FromSsize_t(accounts_live);
    if (live == NULL || hooks_stats(dict) < 0
        || PyDict_SetItemString(dict, "live_accounts", live) < 0) {
        Py_XDECREF(live);
        Py_DECREF(dict);
        return NULL;
    }
    Py_DECREF(live);
    return dict;
}

static PyObject *
meter_take_breached(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    return accounts_take_breached();
}

static PyObject *
meter_wait_for_breach(PyObject *module, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    if (!(timeout >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be >= 0");
        return NULL;
    }
    return PyBool_FromLong(accounts_wait_for_breach(timeout));
}

static PyObject *
meter_wake_delivery_thread(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    accounts_wake_delivery_thread();
    Py_RETURN_NONE;
}

static PyObject *
meter_set_breach_handler(PyObject *module, PyObject *arg)
{
    if (arg != Py_None && !PyCallable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "handler must be callable or None");
        return NULL;
    }
    accounts_set_breach_handler(arg == Py_None ? NULL : arg);
    Py_RETURN_NONE;
}

static PyObject *
meter_set_region_var(PyObject *module, PyObject *arg)
{
    if (!PyContextVar_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_region_var() takes a ContextVar");
        return NULL;
    }
    hooks_set_region_var(arg);
    Py_RETURN_NONE;
}

static PyObject *
meter_disable_attribution(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    hooks_disable_attribution();
    Py_RETURN_NONE;
}

static PyObject *
meter_interrupted(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    account_t *a = context_account();
    if (a == NULL && PyErr_Occurred()) {
        return NULL;
    }
    for (; a != NULL; a = a->parent) {
        if (a->interrupted && !a->closed) {
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
}

static PyObject *
meter_set_global_memory_limit(PyObject *module, PyObject *arg)
{
    int64_t limit;
    if (parse_limit(arg, "limit", &limit) < 0) {
        return NULL;
    }
    if (limit != NO_LIMIT && ensure_hooks() < 0) {
        return NULL;
    }
    accounts_set_global_limit(limit);
    Py_RETURN_NONE;
}

static PyObject *
meter_set_global_measure(PyObject *module, PyObject *arg)
{
    long long measure = PyLong_AsLongLong(arg);
    if (measure == -1 && PyErr_Occurred()) {
        return NULL;
    }
    global_external = measure < 0 ? -1 : (int64_t)measure;
    Py_RETURN_NONE;
}

static PyMethodDef meter_methods[] = {
    {"set_interrupt_handler",
     (PyCFunction)(void (*)(void))interrupts_set_handler, METH_FASTCALL,
     "set_interrupt_handler(handler, never_here): the callable that\n"
     "call_on_main_thread() runs, returning an exception instance to raise\n"
     "in the code it interrupted, True to be called again at the next check\n"
     "(for a short while), or False; and a set of code objects in whose\n"
     "frames it is not even called."},
    {"call_on_main_thread", interrupts_call_on_main_thread, METH_NOARGS,
     "Run the interrupt handler on the main thread at its next eval-breaker\n"
     "check (a pending call).  False if the pending-call queue is full."},
    {"async_raise", (PyCFunction)(void (*)(void))interrupts_async_raise,
     METH_FASTCALL,
     "async_raise(thread_id, exc_class or None): PyThreadState_SetAsyncExc.\n"
     "Returns the number of threads affected (0: no such thread)."},
    {"disarm", interrupts_disarm, METH_NOARGS,
     "disarm() -> bool: drop the asynchronous exception pending in this\n"
     "thread, if any, as if it had been raised and caught (unlike\n"
     "async_raise(own id, None), which leaves 3.11's and 3.12's eval breaker\n"
     "set for good)."},
    {"raise_in_thread_at",
     (PyCFunction)(void (*)(void))interrupts_raise_in_thread_at, METH_FASTCALL,
     "raise_in_thread_at(thread_id, frame, lasti, var, expected, exc_class,\n"
     "on_disarm=None) -> bool: arm an asynchronous exception in that thread\n"
     "only if its innermost frame is still frame, at instruction lasti, and\n"
     "its context still holds expected in var (it has not moved since), and\n"
     "no exception armed earlier is still pending there.  Up to 3.12 it is\n"
     "fenced: disarmed in the thread, and on_disarm() called there, if the\n"
     "thread runs anything else before it lands."},
    {"monitor_arm", (PyCFunction)(void (*)(void))interrupts_monitor_arm,
     METH_FASTCALL,
     "monitor_arm(handler or None, ((thread_id, due_ns), ...),\n"
     "((code, landings), ...)): the threads where monitor_event calls\n"
     "handler, from when (CLOCK_MONOTONIC ns), and the instructions of each\n"
     "monitored code object where it does (landings: one byte per code\n"
     "unit, nonzero where allowed).  Replaces the previous state."},
    {"monitor_event", (PyCFunction)(void (*)(void))interrupts_monitor_event,
     METH_FASTCALL,
     "The sys.monitoring INSTRUCTION callback: in an armed thread, at an\n"
     "allowed instruction of a monitored code object, inside a scope, calls\n"
     "the handler and raises the exception instance it returns there."},
    {"thread_context", interrupts_thread_context, METH_O,
     "The contextvars.Context the given thread runs in, or None."},
    {"interrupted", meter_interrupted, METH_NOARGS,
     "True if an account of this context (or an ancestor) is marked\n"
     "interrupted and not yet left."},
    {"set_global_memory_limit", meter_set_global_memory_limit, METH_O,
     "Set (bytes) or clear (None) the global memory limit."},
    {"set_global_measure", meter_set_global_measure, METH_O,
     "Bytes measured outside the meter (RSS) that replace the metered heap\n"
     "in the global limit's test; -1 to measure the metered heap again."},
    {"install", meter_install, METH_NOARGS,
     "Install the allocator hooks, or install them again, with a\n"
     "RuntimeWarning, if they were removed.  They are never uninstalled.\n"
     "Account() does the same."},
    {"tick", meter_tick, METH_NOARGS,
     "Periodic upkeep (the delivery thread, every 0.25 s): let the sampling\n"
     "interval rise after small limits closed; put lost hooks back."},
    {"set_sampling_interval", meter_set_sampling_interval, METH_O,
     "Set the configured (maximum) mean sampling interval in bytes."},
    {"stats", meter_stats, METH_NOARGS, "Counters of the meter."},
    {"process_sites", meter_process_sites, METH_NOARGS,
     "process_sites() -> [(account, listener, outer account, live,\n"
     "allocated), ...]: the sites of every entered account (live: blocks\n"
     "whose innermost entered account it is; allocated: all its samples),\n"
     "then (None, None, None, live, allocated) for the rest."},
    {"request_interval", meter_request_interval, METH_O,
     "Keep the mean sampling interval at most this many bytes until the\n"
     "matching release_interval() (profiling)."},
    {"release_interval", meter_release_interval, METH_O,
     "Withdraw one request_interval(); the interval rises again at the\n"
     "next upkeep."},
    {"set_traceback_limit", meter_set_traceback_limit, METH_O,
     "Frames recorded per sampled allocation (0: none)."},
    {"collect_tracebacks", meter_collect_tracebacks, METH_NOARGS,
     "Release the interned tracebacks nothing refers to any more; returns\n"
     "how many are left."},
    {"take_breached", meter_take_breached, METH_NOARGS,
     "Listeners of the accounts breached since the last call."},
    {"wait_for_breach", meter_wait_for_breach, METH_O,
     "Block (GIL released) until a breach is queued or timeout passes."},
    {"wake_delivery_thread", meter_wake_delivery_thread, METH_NOARGS,
     "Make a wait_for_breach() in progress return now."},
    {"set_breach_handler", meter_set_breach_handler, METH_O,
     "Callable run on the main thread soon after a breach is queued."},
    {"set_region_var", meter_set_region_var, METH_O,
     "set_region_var(var): the ContextVar holding the account an\n"
     "interrupt-safe region protects; requests are not refused there for the\n"
     "limits of that account and those around it."},
    {"disable_attribution", meter_disable_attribution, METH_NOARGS,
     "Stop charging accounts (interpreter shutdown)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef meter_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "memlimits_async._meter._core",
    .m_doc = "Sampling allocation meter (C layer of memlimits_async).",
    .m_size = -1,
    .m_methods = meter_methods,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    if (PyType_Ready(&AccountType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&meter_module);
    if (module == NULL) {
        return NULL;
    }
    if (numpy_handler_init() < 0) {
        Py_DECREF(module);
        return NULL;
    }
    if (sampler_init() < 0) {
        PyErr_SetString(PyExc_RuntimeError,
                        "memlimits_async: pthread_key_create failed");
        return NULL;
    }
    if (current_account_var == NULL) {
        current_account_var =
            PyContextVar_New("memlimits_async.current_account", NULL);
        if (current_account_var == NULL || accounts_init() < 0
            || hooks_init_module(current_account_var, &AccountType) < 0) {
            Py_DECREF(module);
            return NULL;
        }
    }
    if (PyModule_AddObjectRef(module, "Account", (PyObject *)&AccountType) < 0
        || PyModule_AddObjectRef(module, "current_account",
                                 current_account_var) < 0
        || PyModule_AddIntConstant(module, "BREACH_MEMORY", BREACH_MEMORY) < 0
        || PyModule_AddIntConstant(module, "BREACH_ALLOCATIONS",
                                   BREACH_ALLOCATIONS) < 0
        || PyModule_AddIntConstant(module, "BREACH_GLOBAL_MEMORY",
                                   BREACH_GLOBAL_MEMORY) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
