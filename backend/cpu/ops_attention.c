/* backend/cpu/ops_attention.c: the CPU reference of the KV cache store and of causal GQA
 * attention over it (any mix of prefill and decode tokens of many sequences; each token sees
 * cache rows 0..pos[t] of its own sequence), plus their backward, and the paged forms (rows
 * found through a block table; one code path with the contiguous cache, only the row address
 * differs, so both give the same bits). Plain loops in f32, one (token, head) per work item,
 * softmax with the running max subtracted. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "core/threads.h"

typedef struct {
    qlr_backend *be;
    float *out, *dq, *dk_cache, *dv_cache;
    const float *q, *k_cache, *v_cache, *dout, *k, *v;
    float *kc, *vc;
    const int32_t *seq, *pos;
    int64_t n, n_heads, n_kv, hd, ctx;
    float scale;
    const int32_t *btab;   /* paged: block table [n_seqs, width], NULL for the contiguous cache */
    int64_t width, block;
} att_ctx;

/* Offset of cache row (s, p, g, 0): contiguous [n_seq, ctx, n_kv, hd], or paged through the
 * block table (pool [n_blocks * block, n_kv, hd]). */
static inline int64_t cache_off(const att_ctx *c, int64_t s, int64_t p, int64_t g) {
    if (c->btab) {
        int64_t row = (int64_t)c->btab[s * c->width + p / c->block] * c->block + p % c->block;
        return (row * c->n_kv + g) * c->hd;
    }
    return ((s * c->ctx + p) * c->n_kv + g) * c->hd;
}

static void kv_store_run(void *p, int64_t b, int64_t e, int tid) {
    att_ctx *c = p;
    int64_t row = c->n_kv * c->hd;
    for (int64_t t = b; t < e; t++) {
        int64_t off = cache_off(c, c->seq[t], c->pos[t], 0);
        memcpy(c->kc + off, c->k + t * row, (size_t)row * 4);
        memcpy(c->vc + off, c->v + t * row, (size_t)row * 4);
    }
}

qlr_status qlr_cpu_kv_store(qlr_backend *be, void *k_cache, void *v_cache, const void *k,
                            const void *v, const int32_t *seq, const int32_t *pos, int64_t n,
                            int64_t n_kv, int64_t hd, int64_t ctx) {
    for (int64_t t = 0; t < n; t++) QLR_ASSERT(seq[t] >= 0 && pos[t] >= 0 && pos[t] < ctx);
    att_ctx c = {.kc = k_cache, .vc = v_cache, .k = k, .v = v, .seq = seq, .pos = pos,
                 .n_kv = n_kv, .hd = hd, .ctx = ctx};
    qlr_parallel_for(n, 64, kv_store_run, &c);
    return QLR_OK;
}

static void kv_store_bwd_run(void *p, int64_t b, int64_t e, int tid) {
    att_ctx *c = p;
    int64_t row = c->n_kv * c->hd;
    for (int64_t t = b; t < e; t++) {
        int64_t off = cache_off(c, c->seq[t], c->pos[t], 0);
        memcpy(c->kc + t * row, c->dk_cache + off, (size_t)row * 4);
        memcpy(c->vc + t * row, c->dv_cache + off, (size_t)row * 4);
    }
}

qlr_status qlr_cpu_kv_store_bwd(qlr_backend *be, void *dk, void *dv, const void *dk_cache,
                                const void *dv_cache, const int32_t *seq, const int32_t *pos,
                                int64_t n, int64_t n_kv, int64_t hd, int64_t ctx) {
    att_ctx c = {.kc = dk, .vc = dv, .dk_cache = (float *)dk_cache, .dv_cache = (float *)dv_cache,
                 .seq = seq, .pos = pos, .n_kv = n_kv, .hd = hd, .ctx = ctx};
    qlr_parallel_for(n, 64, kv_store_bwd_run, &c);
    return QLR_OK;
}

/* Softmax weights of token t, head h over cache rows 0..pos[t] into w[]; returns the count. */
static int64_t att_probs(const att_ctx *c, int64_t t, int64_t h, float *w) {
    int64_t g = h / (c->n_heads / c->n_kv);
    int64_t s = c->seq[t], np = (int64_t)c->pos[t] + 1;
    const float *q = c->q + (t * c->n_heads + h) * c->hd;
    float mx = -INFINITY;
    for (int64_t p = 0; p < np; p++) {
        const float *k = c->k_cache + cache_off(c, s, p, g);
        float d = 0.0f;
        for (int64_t j = 0; j < c->hd; j++) d += q[j] * k[j];
        d *= c->scale;
        w[p] = d;
        if (d > mx) mx = d;
    }
    qlr_cpu_softmax_inplace(w, np, mx);
    return np;
}

static void att_run(void *p, int64_t b, int64_t e, int tid) {
    att_ctx *c = p;
    float *w = qlr_cpu_scratch(c->be, tid);
    for (int64_t it = b; it < e; it++) {
        int64_t t = it / c->n_heads, h = it % c->n_heads;
        int64_t g = h / (c->n_heads / c->n_kv), s = c->seq[t];
        int64_t np = att_probs(c, t, h, w);
        float *o = c->out + (t * c->n_heads + h) * c->hd;
        memset(o, 0, (size_t)c->hd * 4);
        for (int64_t p2 = 0; p2 < np; p2++) {
            const float *v = c->v_cache + cache_off(c, s, p2, g);
            float wp = w[p2];
            for (int64_t j = 0; j < c->hd; j++) o[j] += wp * v[j];
        }
    }
}

qlr_status qlr_cpu_attention(qlr_backend *be, void *out, const void *q, const void *k_cache,
                             const void *v_cache, const int32_t *seq, const int32_t *pos, int64_t n,
                             int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx, float scale) {
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0);
    for (int64_t t = 0; t < n; t++) QLR_ASSERT(seq[t] >= 0 && pos[t] >= 0 && pos[t] < ctx);
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)ctx * 4));
    att_ctx c = {.be = be, .out = out, .q = q, .k_cache = k_cache, .v_cache = v_cache,
                 .seq = seq, .pos = pos, .n = n, .n_heads = n_heads, .n_kv = n_kv, .hd = hd,
                 .ctx = ctx, .scale = scale};
    qlr_parallel_for(n * n_heads, 1, att_run, &c);
    return QLR_OK;
}

static void kv_store_paged_run(void *p, int64_t b, int64_t e, int tid) {
    att_ctx *c = p;
    int64_t row = c->n_kv * c->hd;
    for (int64_t t = b; t < e; t++) {
        if (c->pos[t] < 0) continue; /* pos holds the slots here */
        memcpy(c->kc + c->pos[t] * row, c->k + t * row, (size_t)row * 4);
        memcpy(c->vc + c->pos[t] * row, c->v + t * row, (size_t)row * 4);
    }
}

qlr_status qlr_cpu_kv_store_paged(qlr_backend *be, void *k_pool, void *v_pool, const void *k,
                                  const void *v, const int32_t *slot, int64_t n, int64_t n_kv,
                                  int64_t hd, int64_t n_rows) {
    for (int64_t t = 0; t < n; t++) QLR_ASSERT(slot[t] < n_rows);
    att_ctx c = {.kc = k_pool, .vc = v_pool, .k = k, .v = v, .pos = slot, .n_kv = n_kv, .hd = hd};
    qlr_parallel_for(n, 64, kv_store_paged_run, &c);
    return QLR_OK;
}

qlr_status qlr_cpu_attention_paged(qlr_backend *be, void *out, const void *q, const void *k_pool,
                                   const void *v_pool, const int32_t *block_table, int64_t width,
                                   int64_t block, const int32_t *seq, const int32_t *pos,
                                   int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                   float scale) {
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0 && block > 0 && width > 0);
    for (int64_t t = 0; t < n; t++) {
        QLR_ASSERT(seq[t] >= 0 && pos[t] >= 0 && pos[t] < width * block);
        for (int64_t i = 0; i <= pos[t] / block; i++) QLR_ASSERT(block_table[seq[t] * width + i] >= 0);
    }
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(width * block) * 4));
    att_ctx c = {.be = be, .out = out, .q = q, .k_cache = k_pool, .v_cache = v_pool,
                 .seq = seq, .pos = pos, .n = n, .n_heads = n_heads, .n_kv = n_kv, .hd = hd,
                 .ctx = width * block, .scale = scale, .btab = block_table, .width = width,
                 .block = block};
    qlr_parallel_for(n * n_heads, 1, att_run, &c);
    return QLR_OK;
}

/* Backward, one work item per KV head (so the cache-gradient rows it accumulates into are its
 * own: no two threads write the same row). With P the softmax weights, o = Σ P_p v_p:
 * dv_p += P_p dout; dS_p = P_p (dout·v_p - dout·o) ; dq = scale Σ dS_p k_p; dk_p += scale dS_p q. */
static void att_bwd_run(void *p, int64_t b, int64_t e, int tid) {
    att_ctx *c = p;
    float *w = qlr_cpu_scratch(c->be, tid);
    int64_t grp = c->n_heads / c->n_kv;
    for (int64_t g = b; g < e; g++) {
        for (int64_t t = 0; t < c->n; t++) {
            int64_t s = c->seq[t];
            for (int64_t h = g * grp; h < (g + 1) * grp; h++) {
                int64_t np = att_probs(c, t, h, w);
                const float *dout = c->dout + (t * c->n_heads + h) * c->hd;
                const float *q = c->q + (t * c->n_heads + h) * c->hd;
                float *dq = c->dq + (t * c->n_heads + h) * c->hd;
                float D = 0.0f;
                for (int64_t p2 = 0; p2 < np; p2++) {
                    const float *v = c->v_cache + cache_off(c, s, p2, g);
                    float dp = 0.0f;
                    for (int64_t j = 0; j < c->hd; j++) dp += dout[j] * v[j];
                    D += w[p2] * dp;
                    w[c->ctx + p2] = dp;
                }
                memset(dq, 0, (size_t)c->hd * 4);
                for (int64_t p2 = 0; p2 < np; p2++) {
                    int64_t off = cache_off(c, s, p2, g);
                    const float *k = c->k_cache + off;
                    float *dk = c->dk_cache + off, *dv = c->dv_cache + off;
                    float ds = w[p2] * (w[c->ctx + p2] - D) * c->scale;
                    for (int64_t j = 0; j < c->hd; j++) {
                        dv[j] += w[p2] * dout[j];
                        dq[j] += ds * k[j];
                        dk[j] += ds * q[j];
                    }
                }
            }
        }
    }
}

qlr_status qlr_cpu_attention_bwd(qlr_backend *be, void *dq, void *dk_cache, void *dv_cache,
                                 const void *dout, const void *q, const void *k_cache,
                                 const void *v_cache, const void *out, const float *lse,
                                 const int32_t *seq, const int32_t *pos, int64_t n,
                                 int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx,
                                 float scale) {
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0);
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)ctx * 8));
    att_ctx c = {.be = be, .dq = dq, .dk_cache = dk_cache, .dv_cache = dv_cache, .dout = dout,
                 .q = q, .k_cache = k_cache, .v_cache = v_cache, .seq = seq, .pos = pos, .n = n,
                 .n_heads = n_heads, .n_kv = n_kv, .hd = hd, .ctx = ctx, .scale = scale};
    qlr_parallel_for(n_kv, 1, att_bwd_run, &c);
    return QLR_OK;
}
