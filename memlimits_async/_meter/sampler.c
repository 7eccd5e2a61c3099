/* Poisson byte sampling: per-thread countdowns, random draws, and the
 * effective sampling interval.
 *
 * Every byte is marked independently with probability 1/R.  A thread keeps
 * the number of bytes until its next mark (an Exp(R) draw); an allocation
 * that reaches the mark is sampled and carries 1 + Poisson(rest/R) marks,
 * each worth R bytes.  Because the exponential is memoryless, a countdown may
 * be thrown away and redrawn at any moment without biasing the estimate, and
 * the weight of a sample is the R its countdown was drawn with; so R can
 * change at any time (see sampler_limit_opened) and estimates stay unbiased.
 *
 * Effective interval: R = min(configured, max(MIN_ADAPTIVE, L / K)) where L is
 * the smallest limit in force, rounded down to 4 significant bits, and K =
 * SAMPLES_PER_LIMIT.  With K >= 1200 samples per limit, the estimate of a
 * monotone count (an allocation limit, or live bytes built up without
 * frees) crosses L before the truth reaches 0.8 L, or has not crossed it by
 * 1.2 L, each with probability < 1e-10.  Live bytes that churn get more
 * chances to cross early; limits below ~600 KiB, where R stops at its
 * 512-byte floor, get fewer samples.  docs/accuracy.md has the computation.
 */
#include "meter.h"
#include <math.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#define SAMPLES_PER_LIMIT 1200
#define MIN_ADAPTIVE_INTERVAL 512
#define DEFAULT_INTERVAL (64 * 1024)
#define N_BUCKETS (64 * 8)

METER_TLS thread_meter_t meter_tls;

int64_t sampler_interval = DEFAULT_INTERVAL;
uint64_t sampler_epoch = 1;
static int64_t configured_interval = DEFAULT_INTERVAL;

/* Open limits, counted by their value rounded down to 4 significant bits.
 * Bucket 0 holds limits of 0 bytes.
 *
 * min_bucket is at or below the smallest open limit: it drops at once when a
 * smaller limit opens (a tighter limit needs its samples now), but it only
 * rises in sampler_relax(), called from the delivery thread every 0.25 s and,
 * at most as often, when an account is created (for programs that have no
 * delivery thread).  So R never flips up and down, expiring every thread's
 * countdown, when scopes open and close many times a second: it stays at the
 * smallest limit of the last moments, which only makes estimates better. */
static Py_ssize_t bucket_counts[N_BUCKETS + 1];
static int min_bucket = N_BUCKETS + 1;   /* none open */
static int min_bucket_stale = 0;

/* Open profiling requests (sampler_request_opened), counted the same way by
 * the interval they ask for: R is at most the smallest of them (rounded
 * down to 4 significant bits), and rises again the same lazy way. */
static Py_ssize_t request_counts[N_BUCKETS + 1];
static int min_request = N_BUCKETS + 1;

static int
bucket_of(int64_t limit)
{
    if (limit <= 0) {
        return 0;
    }
    int top = 63 - __builtin_clzll((unsigned long long)limit);
    int mantissa = top >= 3 ? (int)((limit >> (top - 3)) & 7)
                            : (int)((limit << (3 - top)) & 7);
    return 1 + top * 8 + mantissa;
}

static int64_t
bucket_floor(int bucket)
{
    if (bucket == 0) {
        return 0;
    }
    int top = (bucket - 1) / 8;
    int64_t mantissa = 8 | ((bucket - 1) % 8);
    return top >= 3 ? mantissa << (top - 3) : mantissa >> (3 - top);
}

/* Registry of the threads that have sampled, so that a change of R reaches
 * every thread's countdown at once instead of after its next sample (an
 * allocation limit of a few KiB, or exact mode, must not wait for a 64 KiB
 * countdown drawn earlier).  The list is linked through the threads' own TLS
 * blocks; a thread leaves it from a pthread key destructor, which runs
 * before its static TLS is released.  The mutex is never taken on the fast
 * path. */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static thread_meter_t *registry = NULL;
static pthread_key_t registry_key;
static int registry_key_ready = 0;

static void
unregister_thread(void *arg)
{
    thread_meter_t *t = arg;
    pthread_mutex_lock(&registry_lock);
    if (t->registered) {
        if (t->prev != NULL) {
            t->prev->next = t->next;
        }
        else {
            registry = t->next;
        }
        if (t->next != NULL) {
            t->next->prev = t->prev;
        }
        t->registered = 0;
        t->prev = t->next = NULL;
    }
    pthread_mutex_unlock(&registry_lock);
}

int
sampler_init(void)
{
    if (!registry_key_ready) {
        if (pthread_key_create(&registry_key, unregister_thread) != 0) {
            return -1;
        }
        registry_key_ready = 1;
    }
    return 0;
}

int
sampler_register_thread(thread_meter_t *t)
{
    if (t->registered || !registry_key_ready) {
        return 0;
    }
    if (pthread_setspecific(registry_key, t) != 0) {
        return -1;
    }
    pthread_mutex_lock(&registry_lock);
    t->prev = NULL;
    t->next = registry;
    if (registry != NULL) {
        registry->prev = t;
    }
    registry = t;
    t->registered = 1;
    pthread_mutex_unlock(&registry_lock);
    return 0;
}

void
sampler_after_fork_child(void)
{
    /* Only the forking thread exists in the child. */
    pthread_mutex_init(&registry_lock, NULL);
    registry = NULL;
    thread_meter_t *self = &meter_tls;
    /* Reseed (with the child's pid) and restart the countdown, or every
     * child of one parent would sample the same bytes. */
    self->rng = 0;
    sampler_redraw(self);
    if (self->registered) {
        self->registered = 0;
        sampler_register_thread(self);
    }
}

/* Send every thread to its slow path at its next allocation, where the
 * stale epoch makes it restart its countdown with the new R.  Writing
 * another thread's countdown is safe: we hold the GIL, and a registered
 * thread only touches its countdown inside a hook, i.e. with the GIL (only
 * threads of the main interpreter register; see hooks.c).  The exception is
 * numpy's handler called without the GIL (numpy_handler.c): its subtraction
 * may overwrite our 0, and that thread then adopts the new R at its next
 * sample instead of now; its samples keep the weight they were drawn with,
 * so estimates stay unbiased. */
static void
expire_all_countdowns(void)
{
    pthread_mutex_lock(&registry_lock);
    for (thread_meter_t *t = registry; t != NULL; t = t->next) {
        t->countdown = 0;
    }
    pthread_mutex_unlock(&registry_lock);
}

static void
recompute_interval(void)
{
    int64_t r = configured_interval;
    if (min_request <= N_BUCKETS) {
        int64_t requested = bucket_floor(min_request);
        if (requested < 1) {
            requested = 1;
        }
        if (requested < r) {
            r = requested;
        }
    }
    if (min_bucket <= N_BUCKETS) {
        int64_t adaptive = bucket_floor(min_bucket) / SAMPLES_PER_LIMIT;
        if (adaptive < MIN_ADAPTIVE_INTERVAL) {
            adaptive = MIN_ADAPTIVE_INTERVAL;
        }
        if (adaptive < r) {
            r = adaptive;
        }
    }
    if (r < sampler_interval) {
        /* Smaller: every thread adopts it now, for the new limit's sake. */
        sampler_interval = r;
        sampler_epoch++;
        expire_all_countdowns();
    }
    else if (r > sampler_interval) {
        /* Larger: threads adopt it at their next sample.  Until then their
         * samples keep the weight they were drawn with: unbiased. */
        sampler_interval = r;
        sampler_epoch++;
    }
}

void
sampler_set_configured(int64_t interval)
{
    configured_interval = interval;
    recompute_interval();
}

int64_t
sampler_configured(void)
{
    return configured_interval;
}

int64_t
sampler_min_adaptive_interval(void)
{
    return MIN_ADAPTIVE_INTERVAL;
}

int64_t
sampler_samples_per_limit(void)
{
    return SAMPLES_PER_LIMIT;
}

void
sampler_limit_opened(int64_t limit)
{
    int b = bucket_of(limit);
    bucket_counts[b]++;
    if (b < min_bucket) {
        min_bucket = b;
        recompute_interval();
    }
}

void
sampler_request_opened(int64_t interval)
{
    int b = bucket_of(interval);
    request_counts[b]++;
    if (b < min_request) {
        min_request = b;
        recompute_interval();
    }
}

void
sampler_request_closed(int64_t interval)
{
    int b = bucket_of(interval);
    if (request_counts[b] > 0) {
        request_counts[b]--;
    }
    if (b == min_request && request_counts[b] == 0) {
        min_bucket_stale = 1;
    }
}

void
sampler_limit_closed(int64_t limit)
{
    int b = bucket_of(limit);
    if (bucket_counts[b] > 0) {
        bucket_counts[b]--;
    }
    if (b == min_bucket && bucket_counts[b] == 0) {
        min_bucket_stale = 1;
    }
}

#define RELAX_PERIOD_NS 250000000LL

static int64_t last_relax_ns = 0;

static int64_t
coarse_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

void
sampler_relax_if_due(void)
{
    if (min_bucket_stale && coarse_now_ns() - last_relax_ns >= RELAX_PERIOD_NS) {
        sampler_relax();
    }
}

void
sampler_relax(void)
{
    last_relax_ns = coarse_now_ns();
    if (!min_bucket_stale) {
        return;
    }
    min_bucket_stale = 0;
    while (min_bucket <= N_BUCKETS && bucket_counts[min_bucket] == 0) {
        min_bucket++;
    }
    while (min_request <= N_BUCKETS && request_counts[min_request] == 0) {
        min_request++;
    }
    recompute_interval();
}

/* ---- random numbers ---- */

static uint64_t seed_counter = 0x853c49e6748fea9bULL;

static uint64_t
splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void
seed_thread(thread_meter_t *t)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* seed_counter is shared; a lost update between two threads only makes
     * two seeds depend on the same counter value, still mixed with the
     * thread's own address, the process id (a forked child must not repeat
     * its parent's or its siblings' draws) and the clock. */
    uint64_t s = seed_counter ^ (uint64_t)(uintptr_t)t
                 ^ ((uint64_t)getpid() << 40)
                 ^ ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec;
    seed_counter = splitmix64(&s);
    t->rng = splitmix64(&s) | 1;
}

/* Uniform in (0, 1]: never 0, so log() is finite. */
static double
uniform(thread_meter_t *t)
{
    uint64_t x = t->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    t->rng = x;
    return (double)(((x * 0x2545F4914F6CDD1DULL) >> 11) + 1) * 0x1.0p-53;
}

void
sampler_redraw(thread_meter_t *t)
{
    if (t->rng == 0) {
        seed_thread(t);
    }
    t->mean = sampler_interval;
    t->epoch = sampler_epoch;
    if (t->mean <= 1) {
        /* Exact accounting: every allocation reaches the slow path. */
        t->countdown = 0;
        return;
    }
    /* The mark is at real position `gap`; an allocation of n bytes reaches
     * it iff n > gap iff n >= floor(gap) + 1 = countdown.  What the integer
     * countdown rounds off is kept in `fraction`, so that the marks after
     * the first are drawn over exactly n - gap bytes. */
    double gap = -log(uniform(t)) * (double)t->mean;
    if (gap >= 4e18) {
        t->countdown = INT64_MAX;
        t->fraction = 0;
        return;
    }
    t->countdown = (int64_t)gap + 1;
    t->fraction = (double)t->countdown - gap;
}

/* Poisson(lam) for lam >= 10: Hoermann's PTRS transformed rejection, as in
 * numpy's random_poisson_ptrs.  O(1) expected time. */
static int64_t
poisson_ptrs(thread_meter_t *t, double lam)
{
    double slam = sqrt(lam);
    double loglam = log(lam);
    double b = 0.931 + 2.53 * slam;
    double a = -0.059 + 0.02483 * b;
    double invalpha = 1.1239 + 1.1328 / (b - 3.4);
    double vr = 0.9277 - 3.6224 / (b - 2);
    for (;;) {
        double u = uniform(t) - 0.5;
        double v = uniform(t);
        double us = 0.5 - fabs(u);
        if (us == 0) {
            /* u = 0.5 (uniform() gave 1), outside the algorithm's open
             * interval: 2a/us would divide by zero. */
            continue;
        }
        double k = floor((2 * a / us + b) * u + lam + 0.43);
        /* Negative k is rejected below anyway; k >= 2**63 (us near 0)
         * cannot be cast to int64, and for lam <= 2**62 (an overshoot below
         * 2**63 bytes, an interval of 2 bytes or more) the test below would
         * reject it.  For lam >= 10 the first acceptance never sees either. */
        if (!(k >= 0 && k < 0x1p63)) {
            continue;
        }
        if (us >= 0.07 && v <= vr) {
            return (int64_t)k;
        }
        if (us < 0.013 && v > us) {
            continue;
        }
        if (log(v) + log(invalpha) - log(a / (us * us) + b)
            <= -lam + k * loglam - lgamma(k + 1)) {
            return (int64_t)k;
        }
    }
}

int64_t
sampler_extra_marks(thread_meter_t *t, int64_t overshoot)
{
    double lam = ((double)overshoot + t->fraction) / (double)t->mean;
    if (lam <= 0) {
        return 0;
    }
    if (lam >= 10) {
        return poisson_ptrs(t, lam);
    }
    /* Knuth: count uniforms until their product drops below e^-lam. */
    double limit = exp(-lam);
    double product = uniform(t);
    int64_t k = 0;
    while (product > limit) {
        k++;
        product *= uniform(t);
    }
    return k;
}
