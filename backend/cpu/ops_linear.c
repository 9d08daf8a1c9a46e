/* backend/cpu/ops_linear.c: the CPU matrix products: NF4 linear (forward and dX), lm_head on
 * a bf16 table, and the LoRA hook (forward and gradients). Weights are never dequantized
 * whole: each thread dequantizes a tile of rows (about 256 KiB of f32) into its scratch and
 * multiplies it with cblas_sgemm (OpenBLAS, one thread per caller). */
#include <cblas.h>
#include <string.h>

#include "backend/cpu/cpu_internal.h"
#include "core/threads.h"

#define TILE_BYTES (256 * 1024)

/* Rows per tile for a row length `cols`: about TILE_BYTES of f32, at least 8. */
static int64_t tile_rows(int64_t cols, int64_t rows) {
    int64_t t = TILE_BYTES / 4 / (cols > 0 ? cols : 1);
    if (t < 8) t = 8;
    /* at least 4 tiles per thread when there is enough work, for balance */
    int64_t per = (rows + 4 * qlr_n_threads() - 1) / (4 * qlr_n_threads());
    if (per >= 8 && per < t) t = per;
    if (t > rows) t = rows;
    return t > 0 ? t : 1;
}

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

/* ---- NF4 linear ---- */

typedef struct {
    qlr_backend *be;
    float *y;
    const float *x;
    const qlr_nf4 *w;
    const float *bias;
    int64_t n, tile;
} lin_ctx;

static void lin_run(void *p, int64_t b, int64_t e, int tid) {
    lin_ctx *c = p;
    int64_t in = c->w->cols, out = c->w->rows;
    float *buf = qlr_cpu_scratch(c->be, tid);
    for (int64_t ti = b; ti < e; ti++) {
        int64_t r0 = ti * c->tile, nr = c->tile;
        if (r0 + nr > out) nr = out - r0;
        qlr_cpu_nf4_dequant_range(c->w, r0 * in, (r0 + nr) * in, buf);
        /* y[:, r0:r0+nr] = x · tileᵀ */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c->n, (int)nr, (int)in, 1.0f,
                    c->x, (int)in, buf, (int)in, 0.0f, c->y + r0, (int)out);
        if (c->bias)
            for (int64_t i = 0; i < c->n; i++)
                for (int64_t r = 0; r < nr; r++) c->y[i * out + r0 + r] += c->bias[r0 + r];
    }
}

qlr_status qlr_cpu_nf4_linear(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                              const float *bias, int64_t n) {
    if (n <= 0) return QLR_OK;
    int64_t tile = tile_rows(w->cols, w->rows);
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(tile * w->cols) * 4));
    lin_ctx c = {be, y, x, w, bias, n, tile};
    qlr_parallel_for((w->rows + tile - 1) / tile, 1, lin_run, &c);
    return QLR_OK;
}

/* dX = dY · W, split over column ranges of W so each thread owns its slice of dX. */
typedef struct {
    qlr_backend *be;
    float *dx;
    const float *dy;
    const qlr_nf4 *w;
    int64_t n, tile, cchunk;
} dx_ctx;

static void dx_run(void *p, int64_t b, int64_t e, int tid) {
    dx_ctx *c = p;
    int64_t in = c->w->cols, out = c->w->rows;
    float *buf = qlr_cpu_scratch(c->be, tid);
    for (int64_t ci = b; ci < e; ci++) {
        int64_t c0 = ci * c->cchunk, nc = c->cchunk;
        if (c0 + nc > in) nc = in - c0;
        for (int64_t r0 = 0; r0 < out; r0 += c->tile) {
            int64_t nr = out - r0 < c->tile ? out - r0 : c->tile;
            for (int64_t r = 0; r < nr; r++)
                qlr_cpu_nf4_dequant_range(c->w, (r0 + r) * in + c0, (r0 + r) * in + c0 + nc,
                                          buf + r * nc);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)c->n, (int)nc, (int)nr,
                        1.0f, c->dy + r0, (int)out, buf, (int)nc, r0 ? 1.0f : 0.0f, c->dx + c0,
                        (int)in);
        }
    }
}

qlr_status qlr_cpu_nf4_linear_dx(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                 int64_t n) {
    if (n <= 0) return QLR_OK;
    int64_t nt = qlr_n_threads();
    int64_t cchunk = (w->cols + nt - 1) / nt;
    cchunk = (cchunk + 63) / 64 * 64;
    if (cchunk > w->cols) cchunk = w->cols;
    int64_t tile = TILE_BYTES / 4 / cchunk;
    if (tile < 8) tile = 8;
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(tile * cchunk) * 4));
    dx_ctx c = {be, dx, dy, w, n, tile, cchunk};
    qlr_parallel_for((w->cols + cchunk - 1) / cchunk, 1, dx_run, &c);
    return QLR_OK;
}

/* ---- lm_head on a bf16 table ---- */

typedef struct {
    qlr_backend *be;
    float *logits;
    const float *x;
    const uint16_t *w;
    int64_t n, d, vocab, tile;
} head_ctx;

static void head_run(void *p, int64_t b, int64_t e, int tid) {
    head_ctx *c = p;
    float *buf = qlr_cpu_scratch(c->be, tid);
    for (int64_t ti = b; ti < e; ti++) {
        int64_t r0 = ti * c->tile, nr = c->tile;
        if (r0 + nr > c->vocab) nr = c->vocab - r0;
        qlr_bf16_to_f32_row(c->w + r0 * c->d, buf, (size_t)(nr * c->d));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c->n, (int)nr, (int)c->d, 1.0f,
                    c->x, (int)c->d, buf, (int)c->d, 0.0f, c->logits + r0, (int)c->vocab);
    }
}

qlr_status qlr_cpu_lm_head(qlr_backend *be, float *logits, const void *x, const uint16_t *w,
                           int64_t n, int64_t d, int64_t vocab) {
    if (n <= 0) return QLR_OK;
    int64_t tile = tile_rows(d, vocab);
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)(tile * d) * 4));
    head_ctx c = {be, logits, x, w, n, d, vocab, tile};
    qlr_parallel_for((vocab + tile - 1) / tile, 1, head_run, &c);
    return QLR_OK;
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
