/* backend/cpu/ops_linear.c: the CPU matrix products: NF4 linear (forward and dX), lm_head on
 * a bf16 table, the LoRA hook (forward and gradients) and the batched multi-adapter LoRA (one
 * adapter per token, plain loops so that each row's bits depend on that row alone). Weights are
 * never dequantized whole: see the two regimes below (fused GEMV for few tokens, chunked sgemm
 * for many). */
#include <cblas.h>
#include <pthread.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "core/threads.h"

void qlr_cpu_nf4_dequant_range(const qlr_nf4 *q, int64_t e0, int64_t e1, float *out) {
    const float *tab = qlr_nf4_table;
    const uint8_t *codes = q->codes;
    for (int64_t b = e0 / QLR_NF4_BLOCK; b * QLR_NF4_BLOCK < e1; b++) {
        float am = qlr_nf4_block_absmax(q, b);
        int64_t s = b * QLR_NF4_BLOCK, e = s + QLR_NF4_BLOCK;
        if (s < e0) s = e0;
        if (e > e1) e = e1;
        int64_t i = s;
        float *o = out - e0;
        if (i & 1) {
            o[i] = tab[codes[i >> 1] & 15] * am;
            i++;
        }
        for (; i + 1 < e; i += 2) {
            uint8_t c = codes[i >> 1];
            o[i] = tab[c >> 4] * am;
            o[i + 1] = tab[c & 15] * am;
        }
        if (i < e) o[i] = tab[codes[i >> 1] >> 4] * am;
    }
}

/* Two regimes. Few tokens (decode, n <= SMALL_N): a fused kernel per output row that reads
 * the packed codes directly (a 256-entry table maps one byte to its two code values; the block
 * sum is scaled by absmax once), threaded over rows with our pool. Many tokens (prefill,
 * training): a chunk of rows (CHUNK_BYTES of f32) is dequantized in parallel into a shared
 * buffer, then one cblas_sgemm (OpenBLAS's own threads) multiplies it. OpenBLAS serialises
 * concurrent callers, so it is never called from inside our parallel regions. */

#define SMALL_N 4
#define CHUNK_BYTES (4u << 20)

static float g_pair[256][2]; /* byte -> (code of the high nibble, code of the low nibble) */
static pthread_once_t g_pair_once = PTHREAD_ONCE_INIT;
static void pair_init(void) {
    for (int b = 0; b < 256; b++) {
        g_pair[b][0] = qlr_nf4_table[b >> 4];
        g_pair[b][1] = qlr_nf4_table[b & 15];
    }
}

typedef struct {
    qlr_backend *be;
    float *y;
    const float *x;
    const qlr_nf4 *w;
    const float *bias;
    const uint16_t *wbf; /* lm_head */
    float *buf;          /* shared chunk buffer */
    int64_t n, r0, rows, cols, ldy;
} lin_ctx;

/* y[i, r] for rows [b, e) of the weight, i < n <= SMALL_N, fused dequant + dot. */
static void gemv_nf4_run(void *p, int64_t b, int64_t e, int tid) {
    lin_ctx *c = p;
    int64_t in = c->cols, n = c->n;
    const qlr_nf4 *w = c->w;
    float *row = qlr_cpu_scratch(c->be, tid);
    for (int64_t r = b; r < e; r++) {
        float acc[SMALL_N] = {0};
        if (in % QLR_NF4_BLOCK == 0) {
            const uint8_t *codes = w->codes + r * in / 2;
            int64_t b0 = r * in / QLR_NF4_BLOCK;
            for (int64_t blk = 0; blk < in / QLR_NF4_BLOCK; blk++) {
                float am = qlr_nf4_block_absmax(w, b0 + blk);
                const uint8_t *cb = codes + blk * (QLR_NF4_BLOCK / 2);
                for (int64_t i = 0; i < n; i++) {
                    const float *xv = c->x + i * in + blk * QLR_NF4_BLOCK;
                    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
                    for (int k = 0; k < QLR_NF4_BLOCK / 2; k += 2) {
                        const float *p0 = g_pair[cb[k]], *p1 = g_pair[cb[k + 1]];
                        s0 += p0[0] * xv[2 * k];
                        s1 += p0[1] * xv[2 * k + 1];
                        s2 += p1[0] * xv[2 * k + 2];
                        s3 += p1[1] * xv[2 * k + 3];
                    }
                    acc[i] += ((s0 + s1) + (s2 + s3)) * am;
                }
            }
        } else {
            qlr_cpu_nf4_dequant_range(w, r * in, (r + 1) * in, row);
            for (int64_t i = 0; i < n; i++) {
                const float *xv = c->x + i * in;
                float s = 0;
                for (int64_t j = 0; j < in; j++) s += row[j] * xv[j];
                acc[i] = s;
            }
        }
        for (int64_t i = 0; i < n; i++) c->y[i * c->ldy + r] = acc[i] + (c->bias ? c->bias[r] : 0.0f);
    }
}

/* Dequantizes rows [r0 + b, r0 + e) of the NF4 weight into the shared chunk buffer. */
static void chunk_nf4_run(void *p, int64_t b, int64_t e, int tid) {
    lin_ctx *c = p;
    qlr_cpu_nf4_dequant_range(c->w, (c->r0 + b) * c->cols, (c->r0 + e) * c->cols,
                              c->buf + b * c->cols);
}

static void chunk_bf16_run(void *p, int64_t b, int64_t e, int tid) {
    lin_ctx *c = p;
    qlr_bf16_to_f32_row(c->wbf + (c->r0 + b) * c->cols, c->buf + b * c->cols,
                        (size_t)((e - b) * c->cols));
}

static int64_t chunk_rows(int64_t cols, int64_t rows) {
    int64_t t = CHUNK_BYTES / 4 / (cols > 0 ? cols : 1);
    if (t < 1) t = 1;
    return t < rows ? t : rows;
}

/* y[:, r0:r0+nr] (ldy) = x · W[r0:r0+nr]ᵀ chunk by chunk; `deq` fills c->buf. */
static qlr_status chunked_gemm(qlr_backend *be, lin_ctx *c, qlr_range_fn deq) {
    int64_t ch = chunk_rows(c->cols, c->rows);
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(ch * c->cols) * 4));
    c->buf = qlr_cpu_scratch(be, 0);
    int64_t rows = c->rows;
    for (int64_t r0 = 0; r0 < rows; r0 += ch) {
        int64_t nr = rows - r0 < ch ? rows - r0 : ch;
        c->r0 = r0;
        qlr_parallel_for(nr, 16, deq, c);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c->n, (int)nr, (int)c->cols,
                    1.0f, c->x, (int)c->cols, c->buf, (int)c->cols, 0.0f, c->y + r0, (int)c->ldy);
    }
    if (c->bias)
        for (int64_t i = 0; i < c->n; i++)
            for (int64_t r = 0; r < rows; r++) c->y[i * c->ldy + r] += c->bias[r];
    return QLR_OK;
}

qlr_status qlr_cpu_nf4_linear(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                              const float *bias, int64_t n) {
    if (n <= 0) return QLR_OK;
    lin_ctx c = {be, y, x, w, bias, NULL, NULL, n, 0, w->rows, w->cols, w->rows};
    if (n <= SMALL_N) {
        pthread_once(&g_pair_once, pair_init);
        QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)w->cols * 4));
        qlr_parallel_for(w->rows, 16, gemv_nf4_run, &c);
        return QLR_OK;
    }
    return chunked_gemm(be, &c, chunk_nf4_run);
}

/* dX = dY · W, chunk by chunk over the rows of W (dX accumulates over chunks). */
qlr_status qlr_cpu_nf4_linear_dx(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                 int64_t n) {
    if (n <= 0) return QLR_OK;
    int64_t in = w->cols, out = w->rows, ch = chunk_rows(in, out);
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(ch * in) * 4));
    lin_ctx c = {be, NULL, NULL, w, NULL, NULL, qlr_cpu_scratch(be, 0), n, 0, out, in, 0};
    for (int64_t r0 = 0; r0 < out; r0 += ch) {
        int64_t nr = out - r0 < ch ? out - r0 : ch;
        c.r0 = r0;
        qlr_parallel_for(nr, 16, chunk_nf4_run, &c);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)in, (int)nr, 1.0f,
                    (const float *)dy + r0, (int)out, c.buf, (int)in, r0 ? 1.0f : 0.0f, dx, (int)in);
    }
    return QLR_OK;
}

/* ---- lm_head on a bf16 table ---- */

static void gemv_bf16_run(void *p, int64_t b, int64_t e, int tid) {
    lin_ctx *c = p;
    int64_t d = c->cols;
    for (int64_t r = b; r < e; r++) {
        const uint16_t *wr = c->wbf + r * d;
        for (int64_t i = 0; i < c->n; i++) {
            const float *xv = c->x + i * d;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            int64_t j = 0;
            for (; j + 4 <= d; j += 4) {
                s0 += qlr_bf16_to_f32(wr[j]) * xv[j];
                s1 += qlr_bf16_to_f32(wr[j + 1]) * xv[j + 1];
                s2 += qlr_bf16_to_f32(wr[j + 2]) * xv[j + 2];
                s3 += qlr_bf16_to_f32(wr[j + 3]) * xv[j + 3];
            }
            for (; j < d; j++) s0 += qlr_bf16_to_f32(wr[j]) * xv[j];
            c->y[i * c->ldy + r] = (s0 + s1) + (s2 + s3);
        }
    }
}

qlr_status qlr_cpu_lm_head(qlr_backend *be, float *logits, const void *x, const uint16_t *w,
                           int64_t n, int64_t d, int64_t vocab) {
    if (n <= 0) return QLR_OK;
    lin_ctx c = {be, logits, x, NULL, NULL, w, NULL, n, 0, vocab, d, vocab};
    if (n <= SMALL_N) {
        qlr_parallel_for(vocab, 64, gemv_bf16_run, &c);
        return QLR_OK;
    }
    return chunked_gemm(be, &c, chunk_bf16_run);
}

/* ---- LoRA ---- */

qlr_status qlr_cpu_lora(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *l, int64_t n,
                        int64_t in, int64_t out) {
    if (!l || l->r <= 0 || n <= 0) return QLR_OK;
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(n * l->r) * 4));
    float *u = qlr_cpu_scratch(be, 0); /* [n, r] = x · Aᵀ */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, l->r, (int)in, 1.0f, x, (int)in,
                l->a, (int)in, 0.0f, u, l->r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)out, l->r, l->scale, u,
                l->r, l->b, l->r, 1.0f, y, (int)out);
    return QLR_OK;
}

qlr_status qlr_cpu_lora_bwd(qlr_backend *be, float *da, float *db, void *dx, const void *dy,
                            const void *x, const qlr_lora_ref *l, int64_t n, int64_t in,
                            int64_t out) {
    if (!l || l->r <= 0 || n <= 0) return QLR_OK;
    int r = l->r;
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(2 * n * r) * 4));
    float *u = qlr_cpu_scratch(be, 0); /* [n, r] = x · Aᵀ */
    float *g = u + n * r;              /* [n, r] = dy · B */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, r, (int)in, 1.0f, x, (int)in,
                l->a, (int)in, 0.0f, u, r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, r, (int)out, 1.0f, dy,
                (int)out, l->b, r, 0.0f, g, r);
    if (da) /* dA [r, in] += scale · gᵀ · x */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, (int)in, (int)n, l->scale, g, r,
                    x, (int)in, 1.0f, da, (int)in);
    if (db) /* dB [out, r] += scale · dyᵀ · u */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)out, r, (int)n, l->scale, dy,
                    (int)out, u, r, 1.0f, db, r);
    if (dx) /* dx [n, in] += scale · g · A */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)in, r, l->scale, g, r,
                    l->a, (int)in, 1.0f, dx, (int)in);
    return QLR_OK;
}

/* ---- batched multi-adapter LoRA ----
 *
 * Every token applies its own slot's A and B with plain loops (no BLAS: OpenBLAS picks kernels
 * by matrix size, so a row's bits would depend on how many rows share the call). Each dot
 * product runs LORA_LANES independent accumulators, lane l taking the elements j ≡ l mod
 * LORA_LANES in order, then a fixed pairwise combine and the tail in order: the compiler may
 * vectorise the lanes, but the sum of every row is formed the same way whatever the batch. */

#define LORA_LANES 8

/* Σ a[j]·b[j] over n values in the fixed lane pattern. */
static inline float lora_dot(const float *a, const float *b, int64_t n) {
    float acc[LORA_LANES] = {0};
    int64_t j = 0;
    for (; j + LORA_LANES <= n; j += LORA_LANES)
        for (int l = 0; l < LORA_LANES; l++) acc[l] += a[j + l] * b[j + l];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

typedef struct {
    qlr_backend *be;
    float *y;                  /* [n, out] */
    const float *x;            /* [n, in] */
    const qlr_lora_ref *L;     /* [n_slots] host */
    const int32_t *slot;       /* [n] */
    int32_t n_slots;
    int64_t in, out;
} lora_batched_ctx;

static void lora_batched_run(void *p, int64_t b, int64_t e, int tid) {
    lora_batched_ctx *c = p;
    float *u = qlr_cpu_scratch(c->be, tid); /* [max_r] = x[t] · Aᵀ */
    for (int64_t t = b; t < e; t++) {
        int32_t s = c->slot[t];
        if (s < 0 || s >= c->n_slots) continue;
        const qlr_lora_ref *l = &c->L[s];
        int32_t r = l->r;
        if (r <= 0) continue;
        const float *xt = c->x + t * c->in, *A = l->a, *B = l->b;
        for (int32_t k = 0; k < r; k++) u[k] = lora_dot(A + (int64_t)k * c->in, xt, c->in);
        float *yt = c->y + t * c->out;
        for (int64_t o = 0; o < c->out; o++) yt[o] += l->scale * lora_dot(B + o * r, u, r);
    }
}

qlr_status qlr_cpu_lora_batched(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                                const qlr_lora_ref *L_host, int32_t n_slots, const int32_t *slot,
                                int32_t max_r, int32_t uniform, int64_t n, int64_t in,
                                int64_t out) {
    if (n <= 0 || n_slots <= 0) return QLR_OK;
    QLR_ASSERT(L_host && slot && max_r >= 0 && in > 0 && out > 0);
    for (int32_t s = 0; s < n_slots; s++) QLR_ASSERT(L_host[s].r <= max_r);
    if (max_r == 0) return QLR_OK;
    /* uniform is only a hint; the per-token loop is already the dense path here */
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)max_r * 4));
    lora_batched_ctx c = {be, y, x, L_host, slot, n_slots, in, out};
    /* about 64k multiply-adds per chunk, so that a decode step of a few tokens stays on one
     * thread and a prefill spreads over all of them */
    int64_t per_token = (int64_t)max_r * (in + out);
    int64_t min_chunk = (65536 + per_token - 1) / per_token;
    qlr_parallel_for(n, min_chunk, lora_batched_run, &c);
    return QLR_OK;
}
