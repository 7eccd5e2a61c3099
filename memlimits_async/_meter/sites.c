/* Allocation sites: the interned tracebacks of sampled allocations, and the
 * allocated bytes of each account by traceback.
 *
 * After CPython's tracemalloc (Python/tracemalloc.c): a stack is read into a
 * fixed buffer, hashed, and looked up in a table of interned tracebacks, so
 * that a stack seen before costs one hash and one compare and no memory.
 * Differences, because of where this runs:
 *  - Every table here is allocated with libc calloc/free, never through a
 *    Python domain (tracemalloc uses the RAW domain with its own hooks
 *    disabled; ours sit on MEM and OBJ, and libc is below all of them).
 *  - Only sampled allocations are looked at (one per ~R bytes), so this is
 *    never on the hooks' fast path.
 *  - A traceback holds strong references to its frames' code objects (one
 *    Py_INCREF per frame, when it is first interned: an integer increment,
 *    no Python code).  It is released only by sites_collect(), which runs
 *    outside every hook, because dropping a code object's last reference
 *    runs its deallocator (and code watchers, weakref callbacks).
 *  - Tracebacks are counted by reference (sampled blocks, per-account
 *    entries), with plain integers, so that freeing a block or an account
 *    inside a free hook only decrements a count.
 *
 * Everything here runs with the main interpreter's GIL held (meter.h), and
 * only from the hooks' slow path or from module functions: one at a time.
 */
#include "meter.h"
#include <stdlib.h>
#include <string.h>

int sites_traceback_limit = SITES_DEFAULT_TRACEBACK_LIMIT;

/* The stack being captured: one capture at a time (GIL, depth guard). */
static site_frame_t capture_buffer[SITES_MAX_TRACEBACK_LIMIT];

static traceback_t **interned = NULL;  /* open addressing, NULL = free */
static size_t interned_capacity = 0;
static size_t interned_count = 0;
static size_t collect_threshold = 4096;

struct site_counts {
    site_agg_t agg;
};

static Py_uhash_t
hash_frames(const site_frame_t *frames, int n, int truncated)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)(n * 2 + truncated);
    for (int i = 0; i < n; i++) {
        h ^= (uint64_t)(uintptr_t)frames[i].code;
        h *= 0xBF58476D1CE4E5B9ULL;
        h ^= (uint64_t)(uint32_t)frames[i].lineno;
        h *= 0x94D049BB133111EBULL;
        h ^= h >> 31;
    }
    return (Py_uhash_t)h;
}

static void
intern_place(traceback_t **slots, size_t mask, traceback_t *tb)
{
    size_t i = (size_t)tb->hash & mask;
    while (slots[i] != NULL) {
        i = (i + 1) & mask;
    }
    slots[i] = tb;
}

static int
intern_grow(void)
{
    size_t capacity = interned_capacity ? interned_capacity * 2 : 1024;
    traceback_t **slots = calloc(capacity, sizeof(traceback_t *));
    if (slots == NULL) {
        return -1;
    }
    for (size_t i = 0; i < interned_capacity; i++) {
        if (interned[i] != NULL) {
            intern_place(slots, capacity - 1, interned[i]);
        }
    }
    free(interned);
    interned = slots;
    interned_capacity = capacity;
    return 0;
}

traceback_t *
sites_capture(PyThreadState *tstate)
{
    int limit = sites_traceback_limit;
    if (limit <= 0) {
        return NULL;
    }
    int more;
    int n = frames_capture(tstate, capture_buffer, limit, &more);
    Py_uhash_t hash = hash_frames(capture_buffer, n, more);
    size_t bytes = (size_t)n * sizeof(site_frame_t);
    if (interned_capacity != 0) {
        size_t mask = interned_capacity - 1;
        for (size_t i = (size_t)hash & mask; interned[i] != NULL;
             i = (i + 1) & mask) {
            traceback_t *tb = interned[i];
            if (tb->hash == hash && tb->nframe == n && tb->truncated == more
                && memcmp(tb->frames, capture_buffer, bytes) == 0) {
                tb->refcnt++;
                return tb;
            }
        }
    }
    if ((interned_count + 1) * 2 > interned_capacity && intern_grow() < 0) {
        return NULL;
    }
    traceback_t *tb = malloc(sizeof(traceback_t) + bytes);
    if (tb == NULL) {
        return NULL;
    }
    tb->hash = hash;
    tb->refcnt = 1;
    tb->nframe = (uint16_t)n;
    tb->truncated = (uint8_t)more;
    memcpy(tb->frames, capture_buffer, bytes);
    for (int i = 0; i < n; i++) {
        Py_INCREF(tb->frames[i].code);
    }
    intern_place(interned, interned_capacity - 1, tb);
    interned_count++;
    return tb;
}

Py_ssize_t
sites_tracebacks(void)
{
    return (Py_ssize_t)interned_count;
}

void
sites_collect(void)
{
    if (interned_count == 0) {
        return;
    }
    /* First take every dead traceback out of the table (a fresh one, so
     * no probe run is broken), and only then drop their code objects: a
     * deallocator may allocate, and so sample and intern, meanwhile. */
    traceback_t **slots = calloc(interned_capacity, sizeof(traceback_t *));
    if (slots == NULL) {
        return;
    }
    traceback_t *dead = NULL;  /* linked through their hash field */
    size_t kept = 0;
    for (size_t i = 0; i < interned_capacity; i++) {
        traceback_t *tb = interned[i];
        if (tb == NULL) {
            continue;
        }
        if (tb->refcnt > 0) {
            intern_place(slots, interned_capacity - 1, tb);
            kept++;
        }
        else {
            tb->hash = (Py_uhash_t)(uintptr_t)dead;
            dead = tb;
        }
    }
    free(interned);
    interned = slots;
    interned_count = kept;
    collect_threshold = kept * 2 > 4096 ? kept * 2 : 4096;
    while (dead != NULL) {
        traceback_t *next = (traceback_t *)(uintptr_t)dead->hash;
        for (int i = 0; i < dead->nframe; i++) {
            Py_DECREF(dead->frames[i].code);
        }
        free(dead);
        dead = next;
    }
}

void
sites_collect_if_due(void)
{
    if (interned_count >= collect_threshold) {
        sites_collect();
    }
}

/* ---- aggregation tables: per-account counts and snapshots ---- */

static inline size_t
agg_slot(uintptr_t group, const traceback_t *tb, size_t mask)
{
    uint64_t h = ((uint64_t)(uintptr_t)tb ^ ((uint64_t)group << 17))
                 * 0x9E3779B97F4A7C15ULL;
    return (size_t)(h >> 20) & mask;
}

static int
agg_grow(site_agg_t *agg)
{
    size_t capacity = agg->capacity ? agg->capacity * 2 : 16;
    site_entry_t *entries = calloc(capacity, sizeof(site_entry_t));
    if (entries == NULL) {
        return -1;
    }
    for (size_t i = 0; i < agg->capacity; i++) {
        site_entry_t *e = &agg->entries[i];
        if (e->tb != NULL) {
            size_t j = agg_slot(e->group, e->tb, capacity - 1);
            while (entries[j].tb != NULL) {
                j = (j + 1) & (capacity - 1);
            }
            entries[j] = *e;
        }
    }
    free(agg->entries);
    agg->entries = entries;
    agg->capacity = capacity;
    return 0;
}

int
site_agg_add(site_agg_t *agg, uintptr_t group, traceback_t *tb, int64_t bytes,
             int64_t samples, double var)
{
    assert(!agg->sorted);
    if (agg->capacity != 0) {
        size_t mask = agg->capacity - 1;
        for (size_t i = agg_slot(group, tb, mask); agg->entries[i].tb != NULL;
             i = (i + 1) & mask) {
            site_entry_t *e = &agg->entries[i];
            if (e->tb == tb && e->group == group) {
                e->bytes = meter_add_clamped(e->bytes, bytes);
                e->samples += samples;
                e->var += var;
                return 0;
            }
        }
    }
    if ((agg->count + 1) * 2 > agg->capacity && agg_grow(agg) < 0) {
        return -1;
    }
    size_t mask = agg->capacity - 1;
    size_t i = agg_slot(group, tb, mask);
    while (agg->entries[i].tb != NULL) {
        i = (i + 1) & mask;
    }
    agg->entries[i] = (site_entry_t){group, tb, bytes, samples, var};
    tb->refcnt++;
    agg->count++;
    return 0;
}

void
site_agg_clear(site_agg_t *agg)
{
    for (size_t i = 0; i < agg->capacity; i++) {
        traceback_decref(agg->entries[i].tb);
    }
    free(agg->entries);
    agg->entries = NULL;
    agg->capacity = agg->count = 0;
    agg->sorted = 0;
}

static int
entry_group_order(const void *x, const void *y)
{
    uintptr_t a = ((const site_entry_t *)x)->group;
    uintptr_t b = ((const site_entry_t *)y)->group;
    return (a > b) - (a < b);
}

void
site_agg_sort_by_group(site_agg_t *agg)
{
    size_t n = 0;
    for (size_t i = 0; i < agg->capacity; i++) {
        if (agg->entries[i].tb != NULL) {
            agg->entries[n++] = agg->entries[i];
        }
    }
    for (size_t i = n; i < agg->capacity; i++) {
        agg->entries[i] = (site_entry_t){0};
    }
    if (n > 1) {
        qsort(agg->entries, n, sizeof(site_entry_t), entry_group_order);
    }
    agg->sorted = 1;
}

void
sites_count(account_t *a, traceback_t *tb, int64_t weight, double var)
{
    if (a->sites == NULL) {
        a->sites = calloc(1, sizeof(struct site_counts));
        if (a->sites == NULL) {
            return;  /* the sample still counts; only its site is lost */
        }
    }
    site_agg_add(&a->sites->agg, 0, tb, weight, 1, var);
}

void
sites_counts_free(struct site_counts *counts)
{
    if (counts != NULL) {
        site_agg_clear(&counts->agg);
        free(counts);
    }
}

int
sites_agg_account(site_agg_t *agg, account_t *a, uintptr_t group)
{
    if (a->sites == NULL) {
        return 0;
    }
    site_agg_t *own = &a->sites->agg;
    for (size_t i = 0; i < own->capacity; i++) {
        site_entry_t *e = &own->entries[i];
        if (e->tb != NULL
            && site_agg_add(agg, group, e->tb, e->bytes, e->samples, e->var)
                   < 0) {
            return -1;
        }
    }
    return 0;
}

/* ---- conversion to Python (outside hooks) ---- */

static PyObject *
frames_tuple(const traceback_t *tb)
{
    PyObject *frames = PyTuple_New(tb->nframe);
    if (frames == NULL) {
        return NULL;
    }
    for (int i = 0; i < tb->nframe; i++) {
        PyCodeObject *code = tb->frames[i].code;
        PyObject *frame = Py_BuildValue("(OiO)", code->co_filename,
                                        tb->frames[i].lineno,
                                        code->co_qualname);
        if (frame == NULL) {
            Py_DECREF(frames);
            return NULL;
        }
        PyTuple_SET_ITEM(frames, i, frame);
    }
    return frames;
}

PyObject *
sites_agg_to_list(site_agg_t *agg, uintptr_t group, PyObject *cache)
{
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        return NULL;
    }
    size_t start = 0, end = agg->capacity;
    if (agg->sorted) {
        size_t high = agg->count;
        while (start < high) {  /* the group's first entry */
            size_t middle = start + (high - start) / 2;
            if (agg->entries[middle].group < group) {
                start = middle + 1;
            }
            else {
                high = middle;
            }
        }
        end = agg->count;
    }
    for (size_t i = start; i < end; i++) {
        site_entry_t *e = &agg->entries[i];
        if (agg->sorted && e->group != group) {
            break;
        }
        if (e->tb == NULL || e->group != group) {
            continue;
        }
        PyObject *key = PyLong_FromVoidPtr(e->tb);
        if (key == NULL) {
            goto error;
        }
        PyObject *frames = PyDict_GetItemWithError(cache, key);  /* borrowed */
        if (frames == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(key);
                goto error;
            }
            frames = frames_tuple(e->tb);
            if (frames == NULL || PyDict_SetItem(cache, key, frames) < 0) {
                Py_XDECREF(frames);
                Py_DECREF(key);
                goto error;
            }
            Py_DECREF(frames);  /* the cache holds it */
        }
        Py_DECREF(key);
        PyObject *item = Py_BuildValue("(OOLLd)", frames,
                                       e->tb->truncated ? Py_True : Py_False,
                                       (long long)e->bytes,
                                       (long long)e->samples, e->var);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            goto error;
        }
        Py_DECREF(item);
    }
    return list;
error:
    Py_DECREF(list);
    return NULL;
}
