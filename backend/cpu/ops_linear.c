/* backend/cpu/ops_linear.c: the CPU matrix products: NF4 linear (forward and dX), lm_head on
 * a bf16 table or an NF4 store (and the bf16 products the fused lm_head + CE uses), the LoRA
 * hook (forward and gradients) and the batched multi-adapter LoRA (one adapter per token, plain
 * loops so that each row's bits depend on that row alone). Weights are never dequantized whole:
 * see the two regimes below (fused GEMV for few tokens, per-thread tiles + sgemm for many). */
#include <cblas.h>
#include <pthread.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "core/threads.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

static float g_pair[256][2]; /* byte -> (code of the high nibble, code of the low nibble) */
static int g_avx2;           /* the CPU runs AVX2 (the dequantizer's fast path) */
static pthread_once_t g_pair_once = PTHREAD_ONCE_INIT;
static void pair_init(void) {
    for (int b = 0; b < 256; b++) {
        g_pair[b][0] = qlr_nf4_table[b >> 4];
        g_pair[b][1] = qlr_nf4_table[b & 15];
    }
#if defined(__x86_64__) && defined(__GNUC__)
    g_avx2 = __builtin_cpu_supports("avx2");
#endif
}

/* o[2k], o[2k+1] = table[high, low nibble of cb[k]] * am for k < nb: the portable loop. */
static void deq_bytes(const uint8_t *cb, int64_t nb, float am, float *o) {
    for (int64_t k = 0; k < nb; k++) {
        const float *p = g_pair[cb[k]];
        o[2 * k] = p[0] * am;
        o[2 * k + 1] = p[1] * am;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
/* The same with AVX2, 8 bytes (16 values) per step: the 16-entry table lives in two registers
 * and is read with two 8-way permutes and a blend on bit 3 of the code; the products are the
 * same f32 multiplications, so the values are the same bits. */
__attribute__((target("avx2"))) static void deq_bytes_avx2(const uint8_t *cb, int64_t nb,
                                                            float am, float *o) {
    const __m256 t_lo = _mm256_loadu_ps(qlr_nf4_table), t_hi = _mm256_loadu_ps(qlr_nf4_table + 8);
    const __m256 vam = _mm256_set1_ps(am);
    const __m256i low4 = _mm256_set1_epi32(15);
    int64_t k = 0;
    for (; k + 8 <= nb; k += 8) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cb + k)));
        __m256i hi = _mm256_srli_epi32(b, 4), lo = _mm256_and_si256(b, low4);
        __m256i ul = _mm256_unpacklo_epi32(hi, lo), uh = _mm256_unpackhi_epi32(hi, lo);
        __m256i i0 = _mm256_permute2x128_si256(ul, uh, 0x20); /* codes of bytes 0..3 in order */
        __m256i i1 = _mm256_permute2x128_si256(ul, uh, 0x31); /* bytes 4..7 */
        __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, i0),
                                     _mm256_permutevar8x32_ps(t_hi, i0),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
        __m256 v1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, i1),
                                     _mm256_permutevar8x32_ps(t_hi, i1),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
        _mm256_storeu_ps(o + 2 * k, _mm256_mul_ps(v0, vam));
        _mm256_storeu_ps(o + 2 * k + 8, _mm256_mul_ps(v1, vam));
    }
    deq_bytes(cb + k, nb - k, am, o + 2 * k);
}
#endif

/* Elements [e0, e1) of the store, block by block: whole bytes through deq_bytes(_avx2), scaled
 * by the block's absmax; an odd first or last element alone. */
void qlr_cpu_nf4_dequant_range(const qlr_nf4 *q, int64_t e0, int64_t e1, float *out) {
    pthread_once(&g_pair_once, pair_init);
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
        int64_t nb = (e - i) >> 1;
#if defined(__x86_64__) && defined(__GNUC__)
        if (g_avx2) deq_bytes_avx2(codes + (i >> 1), nb, am, o + i);
        else
#endif
            deq_bytes(codes + (i >> 1), nb, am, o + i);
        i += 2 * nb;
        if (i < e) o[i] = tab[codes[i >> 1] >> 4] * am;
    }
}

/* Two regimes. Few tokens (decode, n <= SMALL_N): a fused kernel per output row that reads
 * the packed codes directly (a 256-entry table maps one byte to its two code values; the block
 * sum is scaled by absmax once), threaded over rows with our pool. Many tokens (prefill,
 * training): each thread of the pool takes its own block of the output (y = x·Wᵀ: a range of
 * W's rows; dX = dY·W: a range of W's columns), dequantizes W's part of it tile by tile into its
 * own scratch (TILE_BYTES of f32: a thread's whole block of a SmolLM2-sized linear, so that x is
 * packed by one sgemm call, not once per tile; 512 KiB tiles cost 10% more CPU time) and
 * multiplies each tile with a single-threaded cblas_sgemm. No thread waits for another
 * between tiles, and no transposed copy is made: dX reads the tile in W's own layout. */

#define SMALL_N 4
#define TILE_BYTES (2u << 20)
#define COL_UNIT 16 /* dX column blocks are multiples of 16 floats (64 bytes) */

typedef struct {
    qlr_backend *be;
    float *y;
    const float *x;
    const qlr_nf4 *w;
    const float *bias;
    const uint16_t *wbf; /* lm_head */
    int64_t n, rows, cols, ldy;
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

/* Rows of W per tile when a tile row holds `cols` values. */
static int64_t tile_rows(int64_t cols) {
    int64_t t = TILE_BYTES / 4 / (cols > 0 ? cols : 1);
    return t < 1 ? 1 : t;
}

/* W[r0 .. r0+nr, c0 .. c0+nc) as f32 into buf [nr, nc] (NF4 store or bf16 table). */
static void tile_load(const lin_ctx *c, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                      float *buf) {
    if (c0 == 0 && nc == c->cols) { /* whole rows: one contiguous range */
        if (c->w) qlr_cpu_nf4_dequant_range(c->w, r0 * nc, (r0 + nr) * nc, buf);
        else qlr_bf16_to_f32_row(c->wbf + r0 * nc, buf, (size_t)(nr * nc));
        return;
    }
    for (int64_t r = 0; r < nr; r++) {
        int64_t e0 = (r0 + r) * c->cols + c0;
        if (c->w) qlr_cpu_nf4_dequant_range(c->w, e0, e0 + nc, buf + r * nc);
        else qlr_bf16_to_f32_row(c->wbf + e0, buf + r * nc, (size_t)nc);
    }
}

/* y[:, b:e] = x · W[b:e]ᵀ (+ bias): W's rows [b, e), tile by tile. */
static void xwt_run(void *p, int64_t b, int64_t e, int tid) {
    lin_ctx *c = p;
    float *buf = qlr_cpu_scratch(c->be, tid);
    int64_t ch = tile_rows(c->cols);
    for (int64_t r0 = b; r0 < e; r0 += ch) {
        int64_t nr = e - r0 < ch ? e - r0 : ch;
        tile_load(c, r0, nr, 0, c->cols, buf);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c->n, (int)nr, (int)c->cols,
                    1.0f, c->x, (int)c->cols, buf, (int)c->cols, 0.0f, c->y + r0, (int)c->ldy);
        if (c->bias)
            for (int64_t i = 0; i < c->n; i++)
                for (int64_t r = r0; r < r0 + nr; r++) c->y[i * c->ldy + r] += c->bias[r];
    }
}

/* The dX form: y [n, cols] (ldy = cols) = x [n, rows] · W, columns [b, e) x COL_UNIT of y,
 * accumulated over tiles of W's rows. */
static void xw_run(void *p, int64_t b, int64_t e, int tid) {
    lin_ctx *c = p;
    float *buf = qlr_cpu_scratch(c->be, tid);
    int64_t c0 = b * COL_UNIT, c1 = e * COL_UNIT < c->cols ? e * COL_UNIT : c->cols;
    int64_t nc = c1 - c0, ch = tile_rows(nc);
    for (int64_t r0 = 0; r0 < c->rows; r0 += ch) {
        int64_t nr = c->rows - r0 < ch ? c->rows - r0 : ch;
        tile_load(c, r0, nr, c0, nc, buf);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)c->n, (int)nc, (int)nr, 1.0f,
                    c->x + r0, (int)c->rows, buf, (int)nc, r0 ? 1.0f : 0.0f, c->y + c0,
                    (int)c->ldy);
    }
}

/* Every thread's tile buffer: TILE_BYTES, or one row of `cols` when that is longer. */
static qlr_status tile_reserve(qlr_backend *be, int64_t cols) {
    size_t row = (size_t)cols * 4;
    return qlr_cpu_scratch_reserve(be, row > TILE_BYTES ? row : TILE_BYTES);
}

/* Splits W's rows (y = x·Wᵀ) over the pool; at least 16 rows per thread. */
static qlr_status gemm_xwt(lin_ctx *c) {
    QLR_TRY(tile_reserve(c->be, c->cols));
    qlr_parallel_for(c->rows, 16, xwt_run, c);
    return QLR_OK;
}

/* Splits y's columns (y = x·W) over the pool; at least 64 columns per thread. */
static qlr_status gemm_xw(lin_ctx *c) {
    QLR_TRY(tile_reserve(c->be, c->cols));
    qlr_parallel_for((c->cols + COL_UNIT - 1) / COL_UNIT, 4, xw_run, c);
    return QLR_OK;
}

qlr_status qlr_cpu_nf4_linear(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                              const float *bias, int64_t n) {
    if (n <= 0) return QLR_OK;
    lin_ctx c = {be, y, x, w, bias, NULL, n, w->rows, w->cols, w->rows};
    if (n <= SMALL_N) {
        pthread_once(&g_pair_once, pair_init);
        QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)w->cols * 4));
        qlr_parallel_for(w->rows, 16, gemv_nf4_run, &c);
        return QLR_OK;
    }
    return gemm_xwt(&c);
}

/* dX = dY · W: each thread a block of dX's columns, W read in its own layout. */
qlr_status qlr_cpu_nf4_linear_dx(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                 int64_t n) {
    if (n <= 0) return QLR_OK;
    lin_ctx c = {be, dx, dy, w, NULL, NULL, n, w->rows, w->cols, w->cols};
    return gemm_xw(&c);
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
    lin_ctx c = {be, logits, x, NULL, NULL, w, n, vocab, d, vocab};
    if (n <= SMALL_N) {
        qlr_parallel_for(vocab, 64, gemv_bf16_run, &c);
        return QLR_OK;
    }
    return gemm_xwt(&c);
}

qlr_status qlr_cpu_bf16_xwt(qlr_backend *be, float *y, const float *x, const uint16_t *w,
                            int64_t n, int64_t rows, int64_t cols) {
    if (n <= 0) return QLR_OK;
    lin_ctx c = {be, y, x, NULL, NULL, w, n, rows, cols, rows};
    return gemm_xwt(&c);
}

qlr_status qlr_cpu_bf16_xw(qlr_backend *be, float *y, const float *x, const uint16_t *w,
                           int64_t n, int64_t rows, int64_t cols) {
    if (n <= 0) return QLR_OK;
    lin_ctx c = {be, y, x, NULL, NULL, w, n, rows, cols, cols};
    return gemm_xw(&c);
}

/* ---- lm_head on an NF4 store ---- */

/* act is f32 here, so the NF4 linear's output already is the f32 logits. */
qlr_status qlr_cpu_nf4_lm_head(qlr_backend *be, float *logits, const void *x, const qlr_nf4 *w,
                               int64_t n) {
    return qlr_cpu_nf4_linear(be, logits, x, w, NULL, n);
}

/* ---- LoRA ----
 * Split over the pool like the linears: the products with a token dimension by blocks of
 * tokens, dA by blocks of its columns and dB by blocks of its rows, so each thread writes its
 * own part of every output with a single-threaded sgemm. */

#define LORA_ROWS 16 /* at least this many tokens (or A/B rows) per thread */

typedef struct {
    qlr_backend *be;
    float *y, *da, *db, *dx, *u, *g;
    const float *x, *dy, *a, *b;
    int64_t n, in, out;
    int r;
    float scale;
} lora_ctx;

/* tokens [b, e): u = x·Aᵀ into the thread's scratch, y += scale · u·Bᵀ */
static void lora_fwd_run(void *p, int64_t b, int64_t e, int tid) {
    lora_ctx *c = p;
    float *u = qlr_cpu_scratch(c->be, tid);
    int64_t m = e - b;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, c->r, (int)c->in, 1.0f,
                c->x + b * c->in, (int)c->in, c->a, (int)c->in, 0.0f, u, c->r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)c->out, c->r, c->scale, u,
                c->r, c->b, c->r, 1.0f, c->y + b * c->out, (int)c->out);
}

qlr_status qlr_cpu_lora(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *l, int64_t n,
                        int64_t in, int64_t out) {
    if (!l || l->r <= 0 || n <= 0) return QLR_OK;
    int64_t per = (n + qlr_n_threads() - 1) / qlr_n_threads();
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)((per > LORA_ROWS ? per : LORA_ROWS) * l->r) * 4));
    lora_ctx c = {.be = be, .y = y, .x = x, .a = l->a, .b = l->b, .n = n, .in = in, .out = out,
                  .r = l->r, .scale = l->scale};
    qlr_parallel_for(n, LORA_ROWS, lora_fwd_run, &c);
    return QLR_OK;
}

/* tokens [b, e): u = x·Aᵀ, g = dy·B (shared [n, r] buffers) */
static void lora_ug_run(void *p, int64_t b, int64_t e, int tid) {
    lora_ctx *c = p;
    int64_t m = e - b;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, c->r, (int)c->in, 1.0f,
                c->x + b * c->in, (int)c->in, c->a, (int)c->in, 0.0f, c->u + b * c->r, c->r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, c->r, (int)c->out, 1.0f,
                c->dy + b * c->out, (int)c->out, c->b, c->r, 0.0f, c->g + b * c->r, c->r);
}

/* columns [b, e) x COL_UNIT of dA and dx */
static void lora_dadx_run(void *p, int64_t b, int64_t e, int tid) {
    lora_ctx *c = p;
    int64_t c0 = b * COL_UNIT, c1 = e * COL_UNIT < c->in ? e * COL_UNIT : c->in, nc = c1 - c0;
    if (c->da) /* dA[:, c0:c1] += scale · gᵀ · x[:, c0:c1] */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c->r, (int)nc, (int)c->n, c->scale,
                    c->g, c->r, c->x + c0, (int)c->in, 1.0f, c->da + c0, (int)c->in);
    if (c->dx) /* dx[:, c0:c1] += scale · g · A[:, c0:c1] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)c->n, (int)nc, c->r, c->scale,
                    c->g, c->r, c->a + c0, (int)c->in, 1.0f, c->dx + c0, (int)c->in);
}

/* rows [b, e) x COL_UNIT of dB: dB[o0:o1, :] += scale · dy[:, o0:o1]ᵀ · u */
static void lora_db_run(void *p, int64_t b, int64_t e, int tid) {
    lora_ctx *c = p;
    int64_t o0 = b * COL_UNIT, o1 = e * COL_UNIT < c->out ? e * COL_UNIT : c->out;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(o1 - o0), c->r, (int)c->n,
                c->scale, c->dy + o0, (int)c->out, c->u, c->r, 1.0f, c->db + o0 * c->r, c->r);
}

qlr_status qlr_cpu_lora_bwd(qlr_backend *be, float *da, float *db, void *dx, const void *dy,
                            const void *x, const qlr_lora_ref *l, int64_t n, int64_t in,
                            int64_t out) {
    if (!l || l->r <= 0 || n <= 0) return QLR_OK;
    int r = l->r;
    float *u = qlr_cpu_shared(be, (size_t)(2 * n * r) * 4); /* [n, r] = x · Aᵀ */
    if (!u) return qlr_error_status();
    lora_ctx c = {.be = be, .da = da, .db = db, .dx = dx, .u = u, .g = u + n * r, .x = x,
                  .dy = dy, .a = l->a, .b = l->b, .n = n, .in = in, .out = out, .r = r,
                  .scale = l->scale};
    qlr_parallel_for(n, LORA_ROWS, lora_ug_run, &c);
    if (da || dx) qlr_parallel_for((in + COL_UNIT - 1) / COL_UNIT, 1, lora_dadx_run, &c);
    if (db) qlr_parallel_for((out + COL_UNIT - 1) / COL_UNIT, 1, lora_db_run, &c);
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
