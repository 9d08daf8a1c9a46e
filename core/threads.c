/* core/threads.c: the worker pool behind qlr_parallel_for. Workers sleep on a condition
 * variable; each job is split into one contiguous range per thread (the caller takes range 0). */
#include "core/threads.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#define QLR_MAX_THREADS 256

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_n = 0;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv_work = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_cv_done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t g_job_mu = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static uint64_t g_gen;
static int g_pending;
static qlr_range_fn g_fn;
static void *g_ctx;
static int64_t g_n_items, g_chunk;
static int g_parts;
static _Thread_local int tl_in_worker;

void qlr_set_n_threads(int n) {
    if (g_n == 0) g_n = n;
}

static void run_part(int part) {
    int64_t b = (int64_t)part * g_chunk, e = b + g_chunk;
    if (e > g_n_items) e = g_n_items;
    if (b < e) g_fn(g_ctx, b, e, part);
}

static void *worker(void *arg) {
    int idx = (int)(intptr_t)arg;
    tl_in_worker = 1;
    uint64_t seen = 0;
    for (;;) {
        pthread_mutex_lock(&g_mu);
        while (g_gen == seen) pthread_cond_wait(&g_cv_work, &g_mu);
        seen = g_gen;
        int parts = g_parts;
        pthread_mutex_unlock(&g_mu);
        if (idx < parts) run_part(idx);
        pthread_mutex_lock(&g_mu);
        if (--g_pending == 0) pthread_cond_signal(&g_cv_done);
        pthread_mutex_unlock(&g_mu);
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
    g_parts = parts;
    g_pending = nt - 1;
    g_gen++;
    pthread_cond_broadcast(&g_cv_work);
    pthread_mutex_unlock(&g_mu);
    tl_in_worker = 1;
    run_part(0);
    tl_in_worker = 0;
    pthread_mutex_lock(&g_mu);
    while (g_pending > 0) pthread_cond_wait(&g_cv_done, &g_mu);
    pthread_mutex_unlock(&g_mu);
    pthread_mutex_unlock(&g_job_mu);
}
