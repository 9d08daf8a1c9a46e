/* backend/cpu/ops_train.c: the CPU reference of the ops only training uses: causal varlen
 * attention over a packed micro-batch's own K/V (forward and backward), the fused chunked
 * lm_head + cross-entropy (loss and dX of one chunk of rows; logits of that chunk only), and
 * counter-based inverted dropout. f32 throughout, softmax / log-sum-exp with the row max
 * subtracted. Inference ops live in ops_basic.c, ops_attention.c and ops_linear.c. */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "core/threads.h"

/* ---- varlen attention ---- */

typedef struct {
    qlr_backend *be;
    float *out, *lse, *dq, *dk, *dv;
    const float *q, *k, *v, *dout;
    const int32_t *start;
    const int64_t *seq_first; /* backward: first token of each sequence, [n_seqs + 1] */
    int64_t n, n_heads, n_kv, hd, n_seqs;
    float scale;
} vatt_ctx;

/* Softmax weights of token t, head h over tokens start[t]..t into w[]; returns the count and
 * the log-sum-exp of the scaled scores in *lse. */
static int64_t vatt_probs(const vatt_ctx *c, int64_t t, int64_t h, float *w, float *lse) {
    int64_t g = h / (c->n_heads / c->n_kv), s0 = c->start[t], np = t - s0 + 1;
    const float *q = c->q + (t * c->n_heads + h) * c->hd;
    float mx = -INFINITY;
    for (int64_t p = 0; p < np; p++) {
        const float *k = c->k + ((s0 + p) * c->n_kv + g) * c->hd;
        float d = 0.0f;
        for (int64_t j = 0; j < c->hd; j++) d += q[j] * k[j];
        d *= c->scale;
        w[p] = d;
        if (d > mx) mx = d;
    }
    *lse = qlr_cpu_softmax_inplace(w, np, mx);
    return np;
}

static void vatt_run(void *p, int64_t b, int64_t e, int tid) {
    vatt_ctx *c = p;
    float *w = qlr_cpu_scratch(c->be, tid);
    for (int64_t it = b; it < e; it++) {
        int64_t t = it / c->n_heads, h = it % c->n_heads;
        int64_t g = h / (c->n_heads / c->n_kv), s0 = c->start[t];
        float lse;
        int64_t np = vatt_probs(c, t, h, w, &lse);
        if (c->lse) c->lse[it] = lse;
        float *o = c->out + it * c->hd;
        memset(o, 0, (size_t)c->hd * 4);
        for (int64_t p2 = 0; p2 < np; p2++) {
            const float *v = c->v + ((s0 + p2) * c->n_kv + g) * c->hd;
            float wp = w[p2];
            for (int64_t j = 0; j < c->hd; j++) o[j] += wp * v[j];
        }
    }
}

static void check_starts(const int32_t *start, int64_t n) {
    for (int64_t t = 0; t < n; t++)
        QLR_ASSERT(start[t] >= 0 && start[t] <= t && (t == 0 || start[t] == start[t - 1] ||
                                                      start[t] == t));
}

qlr_status qlr_cpu_attention_varlen(qlr_backend *be, void *out, float *lse, const void *q,
                                    const void *k, const void *v, const int32_t *start, int64_t n,
                                    int64_t n_heads, int64_t n_kv, int64_t hd, float scale) {
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0);
    check_starts(start, n);
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)n * 4));
    vatt_ctx c = {.be = be, .out = out, .lse = lse, .q = q, .k = k, .v = v, .start = start,
                  .n = n, .n_heads = n_heads, .n_kv = n_kv, .hd = hd, .scale = scale};
    qlr_parallel_for(n * n_heads, 1, vatt_run, &c);
    return QLR_OK;
}

/* Backward, one work item per (sequence, KV head): the dK/dV rows it accumulates into belong
 * to that sequence and head only, so no two threads write the same row. With P the softmax
 * weights and o = Σ P_p v_p: dv_p += P_p dout; dS_p = P_p (dout·v_p - dout·o);
 * dq = scale Σ dS_p k_p; dk_p += scale dS_p q. */
static void vatt_bwd_run(void *p, int64_t b, int64_t e, int tid) {
    vatt_ctx *c = p;
    float *w = qlr_cpu_scratch(c->be, tid);
    int64_t grp = c->n_heads / c->n_kv, hd = c->hd;
    for (int64_t it = b; it < e; it++) {
        int64_t sq = it / c->n_kv, g = it % c->n_kv;
        int64_t t0 = c->seq_first[sq], t1 = c->seq_first[sq + 1];
        for (int64_t t = t0; t < t1; t++) {
            memset(c->dk + (t * c->n_kv + g) * hd, 0, (size_t)hd * 4);
            memset(c->dv + (t * c->n_kv + g) * hd, 0, (size_t)hd * 4);
        }
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t h = g * grp; h < (g + 1) * grp; h++) {
                float lse;
                int64_t np = vatt_probs(c, t, h, w, &lse);
                const float *dout = c->dout + (t * c->n_heads + h) * hd;
                const float *q = c->q + (t * c->n_heads + h) * hd;
                float *dq = c->dq + (t * c->n_heads + h) * hd;
                float D = 0.0f;
                for (int64_t p2 = 0; p2 < np; p2++) {
                    const float *v = c->v + ((t0 + p2) * c->n_kv + g) * hd;
                    float dp = 0.0f;
                    for (int64_t j = 0; j < hd; j++) dp += dout[j] * v[j];
                    D += w[p2] * dp;
                    w[c->n + p2] = dp;
                }
                memset(dq, 0, (size_t)hd * 4);
                for (int64_t p2 = 0; p2 < np; p2++) {
                    float *dv = c->dv + ((t0 + p2) * c->n_kv + g) * hd;
                    float *dk = c->dk + ((t0 + p2) * c->n_kv + g) * hd;
                    const float *k = c->k + ((t0 + p2) * c->n_kv + g) * hd;
                    float wp = w[p2], ds = wp * (w[c->n + p2] - D) * c->scale;
                    for (int64_t j = 0; j < hd; j++) {
                        dv[j] += wp * dout[j];
                        dq[j] += ds * k[j];
                        dk[j] += ds * q[j];
                    }
                }
            }
        }
    }
}

qlr_status qlr_cpu_attention_varlen_bwd(qlr_backend *be, void *dq, void *dk, void *dv,
                                        const void *dout, const void *q, const void *k,
                                        const void *v, const void *out, const float *lse,
                                        const int32_t *start, int64_t n, int64_t n_heads,
                                        int64_t n_kv, int64_t hd, float scale) {
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0);
    if (n <= 0) return QLR_OK;
    check_starts(start, n);
    int64_t n_seqs = 0;
    for (int64_t t = 0; t < n; t++) n_seqs += start[t] == t;
    int64_t *first = malloc((size_t)(n_seqs + 1) * sizeof *first);
    if (!first) return qlr_errorf(QLR_ERR_NOMEM, "attention_varlen_bwd");
    for (int64_t t = 0, s = 0; t < n; t++)
        if (start[t] == t) first[s++] = t;
    first[n_seqs] = n;
    qlr_status st = qlr_cpu_scratch_reserve(be, (size_t)n * 8);
    if (st == QLR_OK) {
        vatt_ctx c = {.be = be, .dq = dq, .dk = dk, .dv = dv, .dout = dout, .q = q, .k = k,
                      .v = v, .start = start, .seq_first = first, .n = n, .n_heads = n_heads,
                      .n_kv = n_kv, .hd = hd, .n_seqs = n_seqs, .scale = scale};
        qlr_parallel_for(n_seqs * n_kv, 1, vatt_bwd_run, &c);
    }
    free(first);
    return st;
}

/* ---- fused lm_head + cross-entropy ---- */

typedef struct {
    float *loss, *logits;
    const int32_t *targets;
    const uint16_t *w;
    float *buf;
    int64_t vocab, d, r0;
    float grad_scale;
    int want_grad;
} ce_ctx;

/* Per row: loss = lse - logit[target] (f32); with want_grad the row becomes
 * grad_scale · (softmax - onehot), or zeros for an ignored target. */
static void ce_rows_run(void *p, int64_t b, int64_t e, int tid) {
    ce_ctx *c = p;
    for (int64_t i = b; i < e; i++) {
        float *z = c->logits + i * c->vocab;
        int32_t tg = c->targets[i];
        if (tg < 0) {
            c->loss[i] = 0.0f;
            if (c->want_grad) memset(z, 0, (size_t)c->vocab * 4);
            continue;
        }
        float mx = -INFINITY;
        for (int64_t j = 0; j < c->vocab; j++) mx = z[j] > mx ? z[j] : mx;
        float sum = 0.0f;
        for (int64_t j = 0; j < c->vocab; j++) sum += expf(z[j] - mx);
        float lse = mx + logf(sum);
        c->loss[i] = lse - z[tg];
        if (!c->want_grad) continue;
        for (int64_t j = 0; j < c->vocab; j++) z[j] = expf(z[j] - lse) * c->grad_scale;
        z[tg] -= c->grad_scale;
    }
}

static void ce_deq_run(void *p, int64_t b, int64_t e, int tid) {
    ce_ctx *c = p;
    qlr_bf16_to_f32_row(c->w + (c->r0 + b) * c->d, c->buf + b * c->d, (size_t)((e - b) * c->d));
}

/* logits and dX both go through cblas_sgemm on row chunks of W dequantized to f32 whatever
 * the chunk's row count (no GEMV path for few rows as in lm_head), so a token's loss and dX
 * do not depend on how the caller chunks the tokens. */
qlr_status qlr_cpu_lm_head_ce(qlr_backend *be, float *loss, void *dx, float *logits, const void *x,
                              const uint16_t *w, const int32_t *targets, int64_t n, int64_t d,
                              int64_t vocab, float grad_scale) {
    if (n <= 0) return QLR_OK;
    for (int64_t i = 0; i < n; i++) QLR_ASSERT(targets[i] < vocab);
    int64_t ch = (4 << 20) / 4 / d;
    if (ch < 1) ch = 1;
    if (ch > vocab) ch = vocab;
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(ch * d) * 4));
    ce_ctx c = {loss, logits, targets, w, qlr_cpu_scratch(be, 0), vocab, d, 0, grad_scale,
                dx != NULL};
    /* logits [n, vocab] = x [n, d] · Wᵀ */
    for (int64_t r0 = 0; r0 < vocab; r0 += ch) {
        int64_t nr = vocab - r0 < ch ? vocab - r0 : ch;
        c.r0 = r0;
        qlr_parallel_for(nr, 64, ce_deq_run, &c);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)nr, (int)d, 1.0f, x,
                    (int)d, c.buf, (int)d, 0.0f, logits + r0, (int)vocab);
    }
    qlr_parallel_for(n, 1, ce_rows_run, &c);
    if (!dx) return QLR_OK;
    /* dx [n, d] = dlogits [n, vocab] · W [vocab, d] */
    for (int64_t r0 = 0; r0 < vocab; r0 += ch) {
        int64_t nr = vocab - r0 < ch ? vocab - r0 : ch;
        c.r0 = r0;
        qlr_parallel_for(nr, 64, ce_deq_run, &c);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)d, (int)nr, 1.0f,
                    logits + r0, (int)vocab, c.buf, (int)d, r0 ? 1.0f : 0.0f, dx, (int)d);
    }
    return QLR_OK;
}

/* ---- dropout ---- */

static inline uint64_t mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

typedef struct {
    float *y;
    const float *x;
    uint64_t seed;
    float p, inv_keep;
} drop_ctx;

static void drop_run(void *p, int64_t b, int64_t e, int tid) {
    drop_ctx *c = p;
    for (int64_t i = b; i < e; i++) {
        uint64_t h = mix64(c->seed + (uint64_t)i * 0x9E3779B97F4A7C15ull);
        float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        c->y[i] = u >= c->p ? c->x[i] * c->inv_keep : 0.0f;
    }
}

qlr_status qlr_cpu_dropout(qlr_backend *be, void *y, const void *x, int64_t n, float p,
                           uint64_t seed) {
    QLR_ASSERT(p >= 0.0f && p < 1.0f);
    drop_ctx c = {y, x, seed, p, 1.0f / (1.0f - p)};
    qlr_parallel_for(n, 16384, drop_run, &c);
    return QLR_OK;
}
