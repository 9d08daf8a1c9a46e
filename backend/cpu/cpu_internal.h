/* backend/cpu/cpu_internal.h: what the CPU backend's op files share: the private state
 * (per-thread scratch buffers, grown before a parallel region and reused across calls so no
 * op allocates per token) and the op entry points wired into the table by cpu_backend.c.
 * Not part of the public API. */
#ifndef QLR_BACKEND_CPU_INTERNAL_H
#define QLR_BACKEND_CPU_INTERNAL_H

#include <math.h>

#include "backend/backend.h"
#include "core/threads.h"

#define QLR_CPU_MAX_THREADS 256

typedef struct qlr_cpu_impl {
    int n_threads;                          /* qlr_n_threads() at creation */
    float *scratch[QLR_CPU_MAX_THREADS];    /* per-thread workspace (64-byte aligned) */
    size_t scratch_bytes[QLR_CPU_MAX_THREADS];
    float *shared;                          /* one workspace all threads of an op share */
    size_t shared_bytes;
} qlr_cpu_impl;

/* Makes every thread's scratch at least `bytes` long (serial; call before qlr_parallel_for). */
qlr_status qlr_cpu_scratch_reserve(qlr_backend *be, size_t bytes);
/* Thread `tid`'s scratch (valid after a reserve). */
static inline float *qlr_cpu_scratch(qlr_backend *be, int tid) {
    return ((qlr_cpu_impl *)be->impl)->scratch[tid];
}
/* The shared workspace, at least `bytes` long (64-byte aligned; serial, like the reserve; its
 * content is not kept across a growth). NULL + QLR_ERR_NOMEM message on failure. */
float *qlr_cpu_shared(qlr_backend *be, size_t bytes);

/* Runs fn(ctx, i, i + 1, tid) for every i in [0, n) on the pool, each thread taking the next
 * item as it finishes one (for items of uneven cost; list the costly ones first). Which thread
 * runs an item varies from run to run, so an item's result must depend on the item only (its
 * own outputs, the thread's scratch as workspace). */
void qlr_cpu_parallel_items(int64_t n, qlr_range_fn fn, void *ctx);

/* Matrix products: BLAS runs single-threaded inside our pool (cpu_backend.c sets OpenBLAS to
 * one thread), so an op parallelises by handing each thread its own block of the output. */

/* Dequantizes elements [e0, e1) of an NF4 store (flat row-major index) into out[e1 - e0]. */
void qlr_cpu_nf4_dequant_range(const qlr_nf4 *q, int64_t e0, int64_t e1, float *out);

/* ops_basic.c */
qlr_status qlr_cpu_embedding(qlr_backend *be, void *out, const uint16_t *table, const int32_t *ids,
                             int64_t n, int64_t d, int64_t vocab);
qlr_status qlr_cpu_rmsnorm(qlr_backend *be, void *y, const void *x, const float *w, int64_t n,
                           int64_t d, float eps);
qlr_status qlr_cpu_rmsnorm_bwd(qlr_backend *be, void *dx, const void *dy, const void *x,
                               const float *w, int64_t n, int64_t d, float eps);
qlr_status qlr_cpu_rope(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                        int64_t n, int64_t n_heads, int64_t hd);
qlr_status qlr_cpu_rope_bwd(qlr_backend *be, void *dx, const int32_t *pos, const float *inv_freq,
                            int64_t n, int64_t n_heads, int64_t hd);
qlr_status qlr_cpu_swiglu(qlr_backend *be, void *out, const void *gate, const void *up, int64_t n);
qlr_status qlr_cpu_swiglu_bwd(qlr_backend *be, void *dgate, void *dup, const void *dout,
                              const void *gate, const void *up, int64_t n);
qlr_status qlr_cpu_add(qlr_backend *be, void *y, const void *x, int64_t n);
qlr_status qlr_cpu_get_rows(qlr_backend *be, void *dst, const void *src, const int32_t *rows,
                            int64_t n, int64_t d);

/* ops_attention.c */
qlr_status qlr_cpu_kv_store(qlr_backend *be, void *k_cache, void *v_cache, const void *k,
                            const void *v, const int32_t *seq, const int32_t *pos, int64_t n,
                            int64_t n_kv, int64_t hd, int64_t ctx);
qlr_status qlr_cpu_kv_store_bwd(qlr_backend *be, void *dk, void *dv, const void *dk_cache,
                                const void *dv_cache, const int32_t *seq, const int32_t *pos,
                                int64_t n, int64_t n_kv, int64_t hd, int64_t ctx);
qlr_status qlr_cpu_attention(qlr_backend *be, void *out, const void *q, const void *k_cache,
                             const void *v_cache, const int32_t *seq, const int32_t *pos, int64_t n,
                             int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx, float scale);
qlr_status qlr_cpu_attention_bwd(qlr_backend *be, void *dq, void *dk_cache, void *dv_cache,
                                 const void *dout, const void *q, const void *k_cache,
                                 const void *v_cache, const void *out, const float *lse,
                                 const int32_t *seq, const int32_t *pos, int64_t n,
                                 int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx,
                                 float scale);
qlr_status qlr_cpu_kv_store_paged(qlr_backend *be, void *k_pool, void *v_pool, const void *k,
                                  const void *v, const int32_t *slot, int64_t n, int64_t n_kv,
                                  int64_t hd, int64_t n_rows);
qlr_status qlr_cpu_attention_paged(qlr_backend *be, void *out, const void *q, const void *k_pool,
                                   const void *v_pool, const int32_t *block_table, int64_t width,
                                   int64_t block, const int32_t *seq, const int32_t *pos,
                                   int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                   float scale);

/* ops_linear.c */
qlr_status qlr_cpu_nf4_linear(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                              const float *bias, int64_t n);
qlr_status qlr_cpu_nf4_linear_dx(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                 int64_t n);
qlr_status qlr_cpu_lora(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *l, int64_t n,
                        int64_t in, int64_t out);
qlr_status qlr_cpu_lora_bwd(qlr_backend *be, float *da, float *db, void *dx, const void *dy,
                            const void *x, const qlr_lora_ref *l, int64_t n, int64_t in,
                            int64_t out);
qlr_status qlr_cpu_lora_batched(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                                const qlr_lora_ref *L_host, int32_t n_slots, const int32_t *slot,
                                int32_t max_r, int32_t uniform, int64_t n, int64_t in,
                                int64_t out);
qlr_status qlr_cpu_lm_head(qlr_backend *be, float *logits, const void *x, const uint16_t *w,
                           int64_t n, int64_t d, int64_t vocab);
qlr_status qlr_cpu_nf4_lm_head(qlr_backend *be, float *logits, const void *x, const qlr_nf4 *w,
                               int64_t n);
/* y [n, rows] = x [n, cols] · Wᵀ and y [n, cols] = x [n, rows] · W for a bf16 table W
 * [rows, cols] (f32 in and out, sgemm on f32 tiles of W, split over the pool). */
qlr_status qlr_cpu_bf16_xwt(qlr_backend *be, float *y, const float *x, const uint16_t *w,
                            int64_t n, int64_t rows, int64_t cols);
qlr_status qlr_cpu_bf16_xw(qlr_backend *be, float *y, const float *x, const uint16_t *w,
                           int64_t n, int64_t rows, int64_t cols);

/* ops_sample.c */
qlr_status qlr_cpu_sample(qlr_backend *be, int32_t *out_ids, float *logits,
                          const qlr_sampling *params, uint64_t *rng, int64_t n, int64_t vocab);

/* ops_train.c */
qlr_status qlr_cpu_attention_varlen(qlr_backend *be, void *out, float *lse, const void *q,
                                    const void *k, const void *v, const int32_t *start, int64_t n,
                                    int64_t n_heads, int64_t n_kv, int64_t hd, float scale);
qlr_status qlr_cpu_attention_varlen_bwd(qlr_backend *be, void *dq, void *dk, void *dv,
                                        const void *dout, const void *q, const void *k,
                                        const void *v, const void *out, const float *lse,
                                        const int32_t *start, int64_t n, int64_t n_heads,
                                        int64_t n_kv, int64_t hd, float scale);
qlr_status qlr_cpu_lm_head_ce(qlr_backend *be, float *loss, void *dx, float *logits, const void *x,
                              const uint16_t *w, const int32_t *targets, int64_t n, int64_t d,
                              int64_t vocab, float grad_scale);
qlr_status qlr_cpu_dropout(qlr_backend *be, void *y, const void *x, int64_t n, float p,
                           uint64_t seed);

/* Softmax over scores already in w[0..n) whose maximum is mx, in place: w[p] = exp(w[p] - mx) / sum.
 * Returns the log-sum-exp mx + log(sum). Shared by the cache and varlen attention ops so both
 * round identically. */
static inline float qlr_cpu_softmax_inplace(float *w, int64_t n, float mx) {
    float sum = 0.0f;
    for (int64_t p = 0; p < n; p++) {
        w[p] = expf(w[p] - mx);
        sum += w[p];
    }
    float inv = 1.0f / sum;
    for (int64_t p = 0; p < n; p++) w[p] *= inv;
    return mx + logf(sum);
}

#endif
