/* The sampled-block table: pointer -> (account, weight, traceback) for
 * every sampled block charged to an account and not yet freed.
 *
 * Open addressing with linear probing and backward-shift deletion (no
 * tombstones), load kept at or below 1/2.  Storage comes from libc calloc,
 * never from a hooked domain.  In front of it sits a counting filter of
 * 2^16 saturating byte counters indexed by another hash of the pointer: a
 * free of an untracked block costs one load and one test
 * (blocks_maybe_tracked in meter.h); the false-positive rate is about
 * (tracked blocks) / 65536.  Counters, not bits, because a filter must
 * forget a block when it goes: pymalloc hands the last freed address out
 * again first, so one stale bit made every later free of such a hot address
 * a false positive (measured: 6 million in a json loop with one block
 * tracked).
 *
 * All functions here run with the main interpreter's GIL held (meter.h).
 */
#include "meter.h"
#include <stdlib.h>

#define INITIAL_CAPACITY 1024

Py_ssize_t blocks_count = 0;
uint8_t blocks_filter[1 << BLOCKS_FILTER_BITS];

static block_t *table = NULL;
static size_t capacity = 0;     /* power of two, or 0 before first use */
static uint64_t false_positives = 0;

static inline size_t
slot_of(uintptr_t ptr, size_t mask)
{
    return (size_t)(((uint64_t)(ptr >> 3) * 0xD6E8FEB86659FD93ULL) >> 17) & mask;
}

static void
place(block_t *slots, size_t mask, const block_t *entry)
{
    size_t i = slot_of(entry->ptr, mask);
    while (slots[i].ptr != 0) {
        i = (i + 1) & mask;
    }
    slots[i] = *entry;
}

static int
grow(void)
{
    size_t new_capacity = capacity ? capacity * 2 : INITIAL_CAPACITY;
    block_t *slots = calloc(new_capacity, sizeof(block_t));
    if (slots == NULL) {
        return -1;
    }
    for (size_t i = 0; i < capacity; i++) {
        if (table[i].ptr != 0) {
            place(slots, new_capacity - 1, &table[i]);
        }
    }
    free(table);
    table = slots;
    capacity = new_capacity;
    return 0;
}

void
blocks_release(block_t *block)
{
    account_credit(block->account, block->weight);
    account_decref(block->account);
    traceback_decref(block->tb);
}

int
blocks_insert(uintptr_t ptr, account_t *account, int64_t weight,
              traceback_t *tb, int64_t mean)
{
    block_t stale;
    if (blocks_take(ptr, &stale)) {
        /* Its free was never seen (made outside the main interpreter, or
         * with no thread state): that block is gone, its address reused. */
        blocks_release(&stale);
    }
    if ((size_t)(blocks_count + 1) * 2 > capacity && grow() < 0) {
        return -1;  /* out of memory: the sample is dropped by the caller */
    }
    block_t entry = {ptr, account, weight, tb, mean};
    account_incref(account);
    if (tb != NULL) {
        tb->refcnt++;
    }
    place(table, capacity - 1, &entry);
    blocks_count++;
    uint8_t *counter = &blocks_filter[blocks_filter_index(ptr)];
    if (*counter != UINT8_MAX) {  /* a saturated counter stays: only a false positive */
        (*counter)++;
    }
    return 0;
}

int
blocks_take(uintptr_t ptr, block_t *out)
{
    if (capacity == 0) {
        return 0;
    }
    size_t mask = capacity - 1;
    size_t i = slot_of(ptr, mask);
    while (table[i].ptr != ptr) {
        if (table[i].ptr == 0) {
            return 0;
        }
        i = (i + 1) & mask;
    }
    *out = table[i];
    /* Backward-shift deletion: pull later members of the probe run into the
     * hole so that lookups never need tombstones. */
    size_t hole = i;
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (table[j].ptr == 0) {
            break;
        }
        size_t home = slot_of(table[j].ptr, mask);
        /* j's entry may move to the hole iff home is not in (hole, j]. */
        int movable = hole <= j ? (home <= hole || home > j)
                                : (home <= hole && home > j);
        if (movable) {
            table[hole] = table[j];
            hole = j;
        }
    }
    table[hole].ptr = 0;
    table[hole].account = NULL;
    table[hole].tb = NULL;
    blocks_count--;
    uint8_t *counter = &blocks_filter[blocks_filter_index(ptr)];
    if (*counter != UINT8_MAX) {
        (*counter)--;
    }
    return 1;
}

void
blocks_forget_all(void)
{
    for (size_t i = 0; i < capacity; i++) {
        if (table[i].ptr != 0) {
            block_t block = table[i];
            table[i].ptr = 0;
            table[i].account = NULL;
            table[i].tb = NULL;
            blocks_release(&block);
        }
    }
    blocks_count = 0;
    memset(blocks_filter, 0, sizeof(blocks_filter));
}

int
blocks_foreach(int (*fn)(const block_t *block, void *arg), void *arg)
{
    for (size_t i = 0; i < capacity; i++) {
        if (table[i].ptr != 0 && fn(&table[i], arg) < 0) {
            return -1;
        }
    }
    return 0;
}

Py_ssize_t
blocks_capacity(void)
{
    return (Py_ssize_t)capacity;
}

uint64_t
blocks_filter_false_positives(void)
{
    return false_positives;
}

void
blocks_note_false_positive(void)
{
    false_positives++;
}
