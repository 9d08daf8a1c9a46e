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

/* ---- varlen attention ----
 * One work item per (sequence, head) in the forward and per (sequence, KV head) in the
 * backward, handed out longest sequence first (qlr_cpu_parallel_items: the cost grows as the
 * square of the length). Inside an item, blocks of ATT_QB queries: the scores of a block
 * against the keys it may see are one sgemm, the causal softmax a row loop, the product with V
 * another sgemm (the backward: P·dO, dO·Vᵀ, dS·K and dSᵀ·Q likewise). Causally hidden entries
 * of a block are zeros in P and dS. An item writes only its own rows of out / lse / dq and, in
 * the backward, its own (sequence, KV head) rows of dk / dv, so results do not depend on which
 * thread runs it. */

#define ATT_QB 64

typedef struct {
    qlr_backend *be;
    float *out, *lse, *dq, *dk, *dv;
    const float *q, *k, *v, *dout, *lse_in;
    const int64_t *first;   /* [n_seqs + 1] first token of each sequence */
    const int64_t *order;   /* [n_seqs] sequences, longest first */
    int64_t n_seqs, n_heads, n_kv, hd, per_seq; /* per_seq: heads (fwd) or KV heads (bwd) */
    float scale;
} vatt_ctx;

/* P = causal softmax of the scaled scores already in s [nq, nk] (row i sees keys 0..k0 + i),
 * entries past the diagonal set to 0; the row's log-sum-exp into lse[i * lse_stride] when
 * lse is not NULL. With lse_in (the forward's), P = exp(s - lse_in) directly. */
static void causal_softmax(float *s, int64_t nq, int64_t nk, int64_t k0, float *lse,
                           const float *lse_in, int64_t lse_stride) {
    for (int64_t i = 0; i < nq; i++) {
        float *w = s + i * nk;
        int64_t np = k0 + i + 1;
        if (lse_in) {
            float l = lse_in[i * lse_stride];
            for (int64_t j = 0; j < np; j++) w[j] = expf(w[j] - l);
        } else {
            float mx = -INFINITY;
            for (int64_t j = 0; j < np; j++) mx = w[j] > mx ? w[j] : mx;
            float l = qlr_cpu_softmax_inplace(w, np, mx);
            if (lse) lse[i * lse_stride] = l;
        }
        for (int64_t j = np; j < nk; j++) w[j] = 0.0f;
    }
}

static void vatt_fwd_item(void *p, int64_t it, int64_t it_end, int tid) {
    vatt_ctx *c = p;
    float *sc = qlr_cpu_scratch(c->be, tid);
    int64_t sq = c->order[it / c->n_heads], h = it % c->n_heads;
    int64_t g = h / (c->n_heads / c->n_kv), hd = c->hd, nh = c->n_heads, nkv = c->n_kv;
    int64_t t0 = c->first[sq], len = c->first[sq + 1] - t0;
    const float *K = c->k + (t0 * nkv + g) * hd, *V = c->v + (t0 * nkv + g) * hd;
    for (int64_t q0 = 0; q0 < len; q0 += ATT_QB) {
        int64_t nq = len - q0 < ATT_QB ? len - q0 : ATT_QB, nk = q0 + nq;
        const float *Q = c->q + ((t0 + q0) * nh + h) * hd;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)hd, c->scale,
                    Q, (int)(nh * hd), K, (int)(nkv * hd), 0.0f, sc, (int)nk);
        causal_softmax(sc, nq, nk, q0, c->lse ? c->lse + (t0 + q0) * nh + h : NULL, NULL, nh);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, (int)hd, (int)nk, 1.0f,
                    sc, (int)nk, V, (int)(nkv * hd), 0.0f, c->out + ((t0 + q0) * nh + h) * hd,
                    (int)(nh * hd));
    }
}

/* With P the softmax weights of a query block and dP = dO·Vᵀ: dV += Pᵀ·dO;
 * dS = P ∘ (dP - rowsum(P ∘ dP)) · scale; dQ = dS·K; dK += dSᵀ·Q. */
static void vatt_bwd_item(void *p, int64_t it, int64_t it_end, int tid) {
    vatt_ctx *c = p;
    float *sc = qlr_cpu_scratch(c->be, tid);
    int64_t sq = c->order[it / c->n_kv], g = it % c->n_kv;
    int64_t hd = c->hd, nh = c->n_heads, nkv = c->n_kv, grp = nh / nkv;
    int64_t t0 = c->first[sq], len = c->first[sq + 1] - t0;
    float *dP = sc + ATT_QB * len;
    const float *K = c->k + (t0 * nkv + g) * hd, *V = c->v + (t0 * nkv + g) * hd;
    float *dK = c->dk + (t0 * nkv + g) * hd, *dV = c->dv + (t0 * nkv + g) * hd;
    for (int64_t t = 0; t < len; t++) {
        memset(dK + t * nkv * hd, 0, (size_t)hd * 4);
        memset(dV + t * nkv * hd, 0, (size_t)hd * 4);
    }
    for (int64_t h = g * grp; h < (g + 1) * grp; h++) {
        for (int64_t q0 = 0; q0 < len; q0 += ATT_QB) {
            int64_t nq = len - q0 < ATT_QB ? len - q0 : ATT_QB, nk = q0 + nq;
            int64_t row = (t0 + q0) * nh + h;
            const float *Q = c->q + row * hd, *dO = c->dout + row * hd;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)hd,
                        c->scale, Q, (int)(nh * hd), K, (int)(nkv * hd), 0.0f, sc, (int)nk);
            causal_softmax(sc, nq, nk, q0, NULL, c->lse_in ? c->lse_in + row : NULL, nh);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)hd, (int)nq, 1.0f,
                        sc, (int)nk, dO, (int)(nh * hd), 1.0f, dV, (int)(nkv * hd));
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)hd, 1.0f,
                        dO, (int)(nh * hd), V, (int)(nkv * hd), 0.0f, dP, (int)nk);
            for (int64_t i = 0; i < nq; i++) {
                float *pr = sc + i * nk, *dr = dP + i * nk, D = 0.0f;
                int64_t np = q0 + i + 1;
                for (int64_t j = 0; j < np; j++) D += pr[j] * dr[j];
                for (int64_t j = 0; j < np; j++) pr[j] = pr[j] * (dr[j] - D) * c->scale;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, (int)hd, (int)nk, 1.0f,
                        sc, (int)nk, K, (int)(nkv * hd), 0.0f, c->dq + row * hd, (int)(nh * hd));
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)hd, (int)nq, 1.0f,
                        sc, (int)nk, Q, (int)(nh * hd), 1.0f, dK, (int)(nkv * hd));
        }
    }
}

static void check_starts(const int32_t *start, int64_t n) {
    for (int64_t t = 0; t < n; t++)
        QLR_ASSERT(start[t] >= 0 && start[t] <= t && (t == 0 || start[t] == start[t - 1] ||
                                                      start[t] == t));
}

/* The sequences of a batch from its start[] array: first [n_seqs + 1] and order [n_seqs]
 * (longest first, ties in batch order) in one allocation (*first; free() it), and the longest
 * length. */
static qlr_status seq_table(const int32_t *start, int64_t n, int64_t **first, int64_t **order,
                            int64_t *n_seqs, int64_t *max_len) {
    check_starts(start, n);
    int64_t ns = 0;
    for (int64_t t = 0; t < n; t++) ns += start[t] == t;
    int64_t *f = malloc((size_t)(2 * ns + 1) * sizeof *f);
    if (!f) return qlr_errorf(QLR_ERR_NOMEM, "attention_varlen: %lld sequences", (long long)ns);
    int64_t *o = f + ns + 1, mx = 0;
    for (int64_t t = 0, s = 0; t < n; t++)
        if (start[t] == t) f[s++] = t;
    f[ns] = n;
    for (int64_t s = 0; s < ns; s++) { /* insertion sort by length, longest first, stable */
        int64_t len = f[s + 1] - f[s], j = s;
        mx = len > mx ? len : mx;
        while (j > 0 && f[o[j - 1] + 1] - f[o[j - 1]] < len) {
            o[j] = o[j - 1];
            j--;
        }
        o[j] = s;
    }
    *first = f;
    *order = o;
    *n_seqs = ns;
    *max_len = mx;
    return QLR_OK;
}

qlr_status qlr_cpu_attention_varlen(qlr_backend *be, void *out, float *lse, const void *q,
                                    const void *k, const void *v, const int32_t *start, int64_t n,
                                    int64_t n_heads, int64_t n_kv, int64_t hd, float scale) {
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0);
    if (n <= 0) return QLR_OK;
    int64_t *first, *order, ns, mx;
    QLR_TRY(seq_table(start, n, &first, &order, &ns, &mx));
    qlr_status st = qlr_cpu_scratch_reserve(be, (size_t)(ATT_QB * mx) * 4);
    if (st == QLR_OK) {
        vatt_ctx c = {.be = be, .out = out, .lse = lse, .q = q, .k = k, .v = v, .first = first,
                      .order = order, .n_seqs = ns, .n_heads = n_heads, .n_kv = n_kv, .hd = hd,
                      .scale = scale};
        qlr_cpu_parallel_items(ns * n_heads, vatt_fwd_item, &c);
    }
    free(first);
    return st;
}

qlr_status qlr_cpu_attention_varlen_bwd(qlr_backend *be, void *dq, void *dk, void *dv,
                                        const void *dout, const void *q, const void *k,
                                        const void *v, const void *out, const float *lse,
                                        const int32_t *start, int64_t n, int64_t n_heads,
                                        int64_t n_kv, int64_t hd, float scale) {
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0);
    if (n <= 0) return QLR_OK;
    int64_t *first, *order, ns, mx;
    QLR_TRY(seq_table(start, n, &first, &order, &ns, &mx));
    qlr_status st = qlr_cpu_scratch_reserve(be, (size_t)(2 * ATT_QB * mx) * 4);
    if (st == QLR_OK) {
        vatt_ctx c = {.be = be, .dq = dq, .dk = dk, .dv = dv, .dout = dout, .q = q, .k = k,
                      .v = v, .lse_in = lse, .first = first, .order = order, .n_seqs = ns,
                      .n_heads = n_heads, .n_kv = n_kv, .hd = hd, .scale = scale};
        qlr_cpu_parallel_items(ns * n_kv, vatt_bwd_item, &c);
    }
    free(first);
    return st;
}

/* ---- fused lm_head + cross-entropy ---- */

typedef struct {
    float *loss, *logits;
    const int32_t *targets;
    int64_t vocab;
    float grad_scale;
    int want_grad;
} ce_ctx;

/* Per row of the compacted rows (every one has a target): loss = lse - logit[target] (f32);
 * the row becomes e^(z - max) (one exponential per logit), and with want_grad
 * grad_scale · (softmax - onehot) = e^(z - max) · (grad_scale / sum) - grad_scale · onehot. */
static void ce_rows_run(void *p, int64_t b, int64_t e, int tid) {
    ce_ctx *c = p;
    for (int64_t i = b; i < e; i++) {
        float *z = c->logits + i * c->vocab;
        int32_t tg = c->targets[i];
        float mx = -INFINITY;
        for (int64_t j = 0; j < c->vocab; j++) mx = z[j] > mx ? z[j] : mx;
        float zt = z[tg], sum = 0.0f;
        for (int64_t j = 0; j < c->vocab; j++) z[j] = expf(z[j] - mx);
        for (int64_t j = 0; j < c->vocab; j++) sum += z[j];
        c->loss[i] = mx + logf(sum) - zt;
        if (!c->want_grad) continue;
        float k = c->grad_scale / sum;
        for (int64_t j = 0; j < c->vocab; j++) z[j] *= k;
        z[tg] -= c->grad_scale;
    }
}

/* Only the rows with a target are computed (with train_on_inputs off most rows of a batch
 * have none): they are gathered into a compact [m, d] block, their logits, losses and dX
 * formed there, and the dX rows scattered back (ignored rows: loss 0, dX 0). Logits and dX go
 * through the bf16 sgemm products (qlr_cpu_bf16_xwt / _xw) whatever the row count (no GEMV path
 * for few rows as in lm_head), so a token's loss and dX do not depend on how the caller chunks
 * the tokens. */
qlr_status qlr_cpu_lm_head_ce(qlr_backend *be, float *loss, void *dx, float *logits, const void *x,
                              const uint16_t *w, const int32_t *targets, int64_t n, int64_t d,
                              int64_t vocab, float grad_scale) {
    if (n <= 0) return QLR_OK;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        QLR_ASSERT(targets[i] < vocab);
        m += targets[i] >= 0;
    }
    for (int64_t i = 0; i < n; i++)
        if (targets[i] < 0) loss[i] = 0.0f;
    if (dx) memset(dx, 0, (size_t)(n * d) * 4);
    if (m == 0) return QLR_OK;
    /* shared: [m] row index, [m] target, [m] loss, [m, d] x rows, [m, d] dX rows */
    size_t head = (size_t)(3 * m + 15) & ~(size_t)15;
    float *sh = qlr_cpu_shared(be, (head + (size_t)(2 * m * d)) * 4);
    if (!sh) return qlr_error_status();
    int32_t *row = (int32_t *)sh, *tgt = row + m;
    float *ls = sh + 2 * m, *xs = sh + head, *dxs = xs + m * d;
    const float *xf = x;
    for (int64_t i = 0, k = 0; i < n; i++) {
        if (targets[i] < 0) continue;
        row[k] = (int32_t)i;
        tgt[k] = targets[i];
        memcpy(xs + k * d, xf + i * d, (size_t)d * 4);
        k++;
    }
    /* logits [m, vocab] = xs · Wᵀ */
    QLR_TRY(qlr_cpu_bf16_xwt(be, logits, xs, w, m, vocab, d));
    ce_ctx c = {ls, logits, tgt, vocab, grad_scale, dx != NULL};
    qlr_parallel_for(m, 1, ce_rows_run, &c);
    for (int64_t k = 0; k < m; k++) loss[row[k]] = ls[k];
    if (!dx) return QLR_OK;
    /* dX rows [m, d] = dlogits [m, vocab] · W [vocab, d] */
    QLR_TRY(qlr_cpu_bf16_xw(be, dxs, logits, w, m, vocab, d));
    for (int64_t k = 0; k < m; k++) memcpy((float *)dx + (int64_t)row[k] * d, dxs + k * d, (size_t)d * 4);
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
