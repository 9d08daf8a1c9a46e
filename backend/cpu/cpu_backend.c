/* backend/cpu/cpu_backend.c: the CPU backend object: host memory as "device" memory, the
 * per-thread and shared scratch buffers, the item-by-item parallel loop, and the op table wired
 * to the reference ops in ops_*.c. OpenBLAS runs single-threaded: every matrix product is
 * split over our own pool (each thread one block of the output, its own sgemm), so one set of
 * threads does all the work and none spins waiting while the other set runs (OpenBLAS's idle
 * workers poll with sched_yield). */
#include "backend/cpu/cpu_internal.h"
#include "backend/cpu/cpu_optim.h"

#include <cblas.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "core/threads.h"

static void *cpu_alloc(qlr_backend *be, size_t bytes) {
    size_t rounded = (bytes + 255) & ~(size_t)255;
    if (rounded < bytes || rounded == 0) rounded = 256;
    void *p = aligned_alloc(256, rounded);
    if (!p)
        qlr_errorf(QLR_ERR_NOMEM, "cpu: cannot allocate %.1f MiB", (double)bytes / (1 << 20));
    return p;
}
static void cpu_free(qlr_backend *be, void *p) { free(p); }
static qlr_status cpu_memset0(qlr_backend *be, void *p, size_t n) {
    memset(p, 0, n);
    return QLR_OK;
}
static qlr_status cpu_copy(qlr_backend *be, void *dst, const void *src, size_t n) {
    if (n) memmove(dst, src, n);
    return QLR_OK;
}
static qlr_status cpu_sync(qlr_backend *be) { return QLR_OK; }
/* Host staging: there is one memory, and every op has finished when it returns, so the side
 * copies are plain copies and an event orders nothing. */
static void *cpu_host_alloc(qlr_backend *be, size_t bytes) { return cpu_alloc(be, bytes); }
static void *cpu_event_create(qlr_backend *be) {
    (void)be;
    static char ev; /* a non-NULL token: CPU events carry no state */
    return &ev;
}
static void cpu_event_free(qlr_backend *be, void *ev) { (void)be, (void)ev; }
static qlr_status cpu_event_op(qlr_backend *be, void *ev, int side) {
    (void)be, (void)ev, (void)side;
    return QLR_OK;
}

qlr_status qlr_cpu_scratch_reserve(qlr_backend *be, size_t bytes) {
    qlr_cpu_impl *im = be->impl;
    for (int t = 0; t < im->n_threads; t++) {
        if (im->scratch_bytes[t] >= bytes) continue;
        size_t want = (bytes + 63) & ~(size_t)63;
        free(im->scratch[t]);
        im->scratch[t] = aligned_alloc(64, want);
        im->scratch_bytes[t] = im->scratch[t] ? want : 0;
        if (!im->scratch[t])
            return qlr_errorf(QLR_ERR_NOMEM, "cpu: cannot allocate %.1f MiB of scratch",
                              (double)bytes / (1 << 20));
    }
    return QLR_OK;
}

float *qlr_cpu_shared(qlr_backend *be, size_t bytes) {
    qlr_cpu_impl *im = be->impl;
    if (im->shared_bytes >= bytes && im->shared) return im->shared;
    size_t want = (bytes + 63) & ~(size_t)63;
    free(im->shared);
    im->shared = aligned_alloc(64, want ? want : 64);
    im->shared_bytes = im->shared ? want : 0;
    if (!im->shared)
        qlr_errorf(QLR_ERR_NOMEM, "cpu: cannot allocate %.1f MiB of scratch",
                   (double)bytes / (1 << 20));
    return im->shared;
}

typedef struct items_ctx {
    qlr_range_fn fn;
    void *ctx;
    int64_t n;
    atomic_llong next;
} items_ctx;

static void items_run(void *p, int64_t b, int64_t e, int tid) {
    items_ctx *c = p;
    for (int64_t i; (i = atomic_fetch_add(&c->next, 1)) < c->n;) c->fn(c->ctx, i, i + 1, tid);
}

void qlr_cpu_parallel_items(int64_t n, qlr_range_fn fn, void *ctx) {
    if (n <= 0) return;
    items_ctx c = {fn, ctx, n, 0};
    int nt = qlr_n_threads();
    qlr_parallel_for(nt < n ? nt : n, 1, items_run, &c);
}

static void cpu_destroy(qlr_backend *be) {
    qlr_cpu_impl *im = be->impl;
    if (im) {
        for (int t = 0; t < QLR_CPU_MAX_THREADS; t++) free(im->scratch[t]);
        free(im->shared);
    }
    free(im);
    free(be);
}

qlr_status qlr_backend_cpu_create(int n_threads, qlr_backend **out) {
    *out = NULL;
    if (n_threads > 0) qlr_set_n_threads(n_threads);
    qlr_backend *be = calloc(1, sizeof *be);
    qlr_cpu_impl *im = calloc(1, sizeof *im);
    if (!be || !im) {
        free(be);
        free(im);
        return qlr_errorf(QLR_ERR_NOMEM, "cpu backend");
    }
    im->n_threads = qlr_n_threads();
    if (im->n_threads > QLR_CPU_MAX_THREADS) im->n_threads = QLR_CPU_MAX_THREADS;
    if (n_threads > 0 && im->n_threads != n_threads)
        QLR_LOGW("cpu backend: the thread pool already runs %d threads; --threads %d ignored",
                 im->n_threads, n_threads);
    openblas_set_num_threads(1);

    be->name = "cpu";
    be->kind = QLR_DEVICE_CPU;
    be->act_dtype = QLR_F32;
    be->host_visible = 1;
    be->impl = im;
    be->destroy = cpu_destroy;
    be->mem.alloc = cpu_alloc;
    be->mem.free = cpu_free;
    be->mem.memset0 = cpu_memset0;
    be->mem.h2d = cpu_copy;
    be->mem.d2h = cpu_copy;
    be->mem.d2d = cpu_copy;
    be->mem.sync = cpu_sync;
    be->mem.host_alloc = cpu_host_alloc;
    be->mem.host_free = cpu_free;
    be->mem.d2h_side = cpu_copy;
    be->mem.h2d_side = cpu_copy;
    be->mem.event_create = cpu_event_create;
    be->mem.event_free = cpu_event_free;
    be->mem.event_record = cpu_event_op;
    be->mem.event_wait = cpu_event_op;

    qlr_backend_ops *o = &be->ops;
    o->embedding = qlr_cpu_embedding;
    o->rmsnorm = qlr_cpu_rmsnorm;
    o->rope = qlr_cpu_rope;
    o->kv_store = qlr_cpu_kv_store;
    o->attention = qlr_cpu_attention;
    o->swiglu = qlr_cpu_swiglu;
    o->add = qlr_cpu_add;
    o->get_rows = qlr_cpu_get_rows;
    o->nf4_linear = qlr_cpu_nf4_linear;
    o->lora = qlr_cpu_lora;
    o->lm_head = qlr_cpu_lm_head;
    o->sample = qlr_cpu_sample;
    o->rmsnorm_bwd = qlr_cpu_rmsnorm_bwd;
    o->rope_bwd = qlr_cpu_rope_bwd;
    o->swiglu_bwd = qlr_cpu_swiglu_bwd;
    o->attention_bwd = qlr_cpu_attention_bwd;
    o->kv_store_bwd = qlr_cpu_kv_store_bwd;
    o->nf4_linear_dx = qlr_cpu_nf4_linear_dx;
    o->lora_bwd = qlr_cpu_lora_bwd;
    o->attention_varlen = qlr_cpu_attention_varlen;
    o->attention_varlen_bwd = qlr_cpu_attention_varlen_bwd;
    o->lm_head_ce = qlr_cpu_lm_head_ce;
    o->dropout = qlr_cpu_dropout;
    o->lora_batched = qlr_cpu_lora_batched;
    o->adamw_step = qlr_cpu_adamw_step;
    o->sum_squares = qlr_cpu_sum_squares;
    o->scale_f32 = qlr_cpu_scale_f32;
    o->f32_to_act = qlr_cpu_f32_to_act;
    o->nf4_lm_head = qlr_cpu_nf4_lm_head;
    o->kv_store_paged = qlr_cpu_kv_store_paged;
    o->attention_paged = qlr_cpu_attention_paged;
    *out = be;
    return QLR_OK;
}
