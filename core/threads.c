/* core/threads.c: the worker pool behind qlr_parallel_for. A job is cut into one contiguous
 * range ("part") per thread; the caller and the workers claim parts from one atomic word, so a
 * part runs on whichever thread gets to it first: the caller goes on to the next unclaimed part
 * when a worker is slow to wake (a loaded machine, where a sleeping worker can wait a whole time
 * slice for a core), instead of waiting for it. Workers sleep on a condition variable between
 * jobs. A part's index is what its function receives as `tid` (per-part scratch), whatever
 * thread runs it. */
#include "core/threads.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define QLR_MAX_THREADS 256

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_n = 0;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_cv_done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_job_mu = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static uint64_t g_gen;          /* job number, under g_mu (workers wait for it to change) */
static qlr_range_fn g_fn;
static void *g_ctx;
static int64_t g_n_items, g_chunk;
/* The claim word: job number (high 32 bits), next unclaimed part (16 bits), parts (16 bits).
 * The job's fn / ctx / sizes are written before the word that names the job (release), and
 * read after a successful claim of it (acquire). */
static _Atomic uint64_t g_claim;
static atomic_int g_done;       /* parts of the current job finished */
static _Thread_local int tl_in_worker;

void qlr_set_n_threads(int n) {
    if (g_n == 0) g_n = n;
}

static void run_part(int part) {
    int64_t b = (int64_t)part * g_chunk, e = b + g_chunk;
    if (e > g_n_items) e = g_n_items;
    if (b < e) g_fn(g_ctx, b, e, part);
}

/* Claims and runs parts of job `job` until none is left; returns how many this thread ran. */
static int run_parts(uint32_t job) {
    int ran = 0;
    for (;;) {
        uint64_t v = atomic_load_explicit(&g_claim, memory_order_acquire);
        uint32_t next = (uint32_t)(v >> 16) & 0xffff, parts = (uint32_t)v & 0xffff;
        if ((uint32_t)(v >> 32) != job || next >= parts) return ran;
        if (!atomic_compare_exchange_weak_explicit(&g_claim, &v, v + (1ull << 16),
                                                   memory_order_acq_rel, memory_order_acquire))
            continue;
        run_part((int)next);
        ran++;
        if (atomic_fetch_add_explicit(&g_done, 1, memory_order_acq_rel) + 1 == (int)parts) {
            pthread_mutex_lock(&g_mu);
            pthread_cond_signal(&g_cv_done);
            pthread_mutex_unlock(&g_mu);
        }
    }
}

static void *worker(void *arg) {
    (void)arg;
    tl_in_worker = 1;
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&g_mu);
        while (g_gen == seen) pthread_cond_wait(&g_cv_work, &g_mu);
        seen = g_gen;
        pthread_mutex_unlock(&g_mu);
        run_parts((uint32_t)seen);
    }
    return NULL;
}

static void init_pool(void) {
    if (g_n <= 0) {
        const char *s = getenv("QLR_THREADS");
        g_n = s ? atoi(s) : 0;
        if (g_n <= 0) g_n = (int)sysconf(_SC_NPROCESSORS_ONLN);
        if (g_n <= 0) g_n = 1;
    }
    if (g_n > QLR_MAX_THREADS) g_n = QLR_MAX_THREADS;
    for (int i = 1; i < g_n; i++) {
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &at, worker, (void *)(intptr_t)i) != 0) {
            g_n = i; /* run with what we got */
            pthread_attr_destroy(&at);
            break;
        }
        pthread_attr_destroy(&at);
    }
}

int qlr_n_threads(void) {
    pthread_once(&g_once, init_pool);
    return g_n;
}

void qlr_parallel_for(int64_t n, int64_t min_chunk, qlr_range_fn fn, void *ctx) {
    if (n <= 0) return;
    if (min_chunk < 1) min_chunk = 1;
    int nt = qlr_n_threads();
    if (nt == 1 || tl_in_worker || n <= min_chunk) {
        fn(ctx, 0, n, 0);
        return;
    }
    pthread_mutex_lock(&g_job_mu);
    int64_t chunk = (n + nt - 1) / nt;
    if (chunk < min_chunk) chunk = min_chunk;
    int parts = (int)((n + chunk - 1) / chunk);
    pthread_mutex_lock(&g_mu);
    g_fn = fn;
    g_ctx = ctx;
    g_n_items = n;
    g_chunk = chunk;
    atomic_store_explicit(&g_done, 0, memory_order_relaxed);
    g_gen++;
    uint32_t job = (uint32_t)g_gen;
    atomic_store_explicit(&g_claim, (uint64_t)job << 32 | (uint64_t)parts, memory_order_release);
    pthread_cond_broadcast(&g_cv_work);
    pthread_mutex_unlock(&g_mu);
    tl_in_worker = 1;
    run_parts(job);
    tl_in_worker = 0;
    if (atomic_load_explicit(&g_done, memory_order_acquire) < parts) {
        pthread_mutex_lock(&g_mu);
        while (atomic_load_explicit(&g_done, memory_order_acquire) < parts)
            pthread_cond_wait(&g_cv_done, &g_mu);
        pthread_mutex_unlock(&g_mu);
    }
    pthread_mutex_unlock(&g_job_mu);
}
