/* tests/backend/test_backend_ops.c: every CPU op against a naive double-precision reference on
 * random data with awkward shapes (one token, odd lengths, head_dim 64 and 128, GQA ratios 1, 4
 * and 8, NF4 matrices whose size is not a multiple of a block), plus the sampling rules.
 * Tolerances are written next to each check with the reason. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "tests/test_util.h"

static uint64_t g_rng = 12345;

static float *rnd(int64_t n, float scale) {
    float *p = malloc((size_t)(n > 0 ? n : 1) * 4);
    for (int64_t i = 0; i < n; i++) p[i] = test_rng_normal(&g_rng) * scale;
    return p;
}

/* max |a-b| / (atol + rtol |b|) over n values: <= 1 means within tolerance */
static double worst(const float *a, const double *b, int64_t n, double atol, double rtol) {
    double w = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / (atol + rtol * fabs(b[i]));
        if (!(e <= w)) w = e; /* NaN propagates */
    }
    return w;
}

#define CHECK_CLOSE(name, a, b, n, atol, rtol)                                           \
    do {                                                                                 \
        double w_ = worst(a, b, n, atol, rtol);                                          \
        CHECK_MSG(w_ <= 1.0, "%s: error %.3g x tolerance (atol %g rtol %g)", name, w_,  \
                  (double)(atol), (double)(rtol));                                       \
    } while (0)

static qlr_backend *be;

static void test_rmsnorm(void) {
    int64_t shapes[][2] = {{1, 1}, {1, 64}, {7, 63}, {5, 576}, {3, 4096}};
    for (int s = 0; s < 5; s++) {
        int64_t n = shapes[s][0], d = shapes[s][1];
        float *x = rnd(n * d, 2.0f), *w = rnd(d, 1.0f), *y = malloc(n * d * 4);
        double *ref = malloc(n * d * 8);
        for (int64_t i = 0; i < n; i++) {
            double ss = 0;
            for (int64_t j = 0; j < d; j++) ss += (double)x[i * d + j] * x[i * d + j];
            double r = 1.0 / sqrt(ss / d + 1e-5);
            for (int64_t j = 0; j < d; j++) ref[i * d + j] = x[i * d + j] * r * w[j];
        }
        CHECK_OK(be->ops.rmsnorm(be, y, x, w, n, d, 1e-5f));
        /* f32 sum of d squares: relative error ~ d * 2^-24 at worst; 1e-5 covers d = 4096 */
        CHECK_CLOSE("rmsnorm", y, ref, n * d, 1e-5, 1e-5);
        CHECK_OK(be->ops.rmsnorm(be, x, x, w, n, d, 1e-5f)); /* in place */
        CHECK_CLOSE("rmsnorm in place", x, ref, n * d, 1e-5, 1e-5);
        free(x), free(w), free(y), free(ref);
    }
}

static void test_rope(void) {
    int64_t hds[] = {64, 128};
    for (int s = 0; s < 2; s++) {
        int64_t hd = hds[s], n = 9, nh = 3, half = hd / 2;
        float *x = rnd(n * nh * hd, 1.0f), *inv = malloc(half * 4);
        int32_t pos[9] = {0, 1, 2, 17, 100, 511, 4095, 3, 0};
        for (int64_t j = 0; j < half; j++) inv[j] = (float)pow(500000.0, -2.0 * j / hd);
        double *ref = malloc(n * nh * hd * 8);
        for (int64_t t = 0; t < n; t++)
            for (int64_t h = 0; h < nh; h++)
                for (int64_t j = 0; j < half; j++) {
                    /* the angle is the f32 product, as HF computes it (the op does the same) */
                    double a = (double)((float)pos[t] * inv[j]);
                    const float *v = x + (t * nh + h) * hd;
                    ref[(t * nh + h) * hd + j] = v[j] * cos(a) - v[j + half] * sin(a);
                    ref[(t * nh + h) * hd + j + half] = v[j + half] * cos(a) + v[j] * sin(a);
                }
        float *y = malloc(n * nh * hd * 4);
        memcpy(y, x, n * nh * hd * 4);
        CHECK_OK(be->ops.rope(be, y, pos, inv, n, nh, hd));
        /* cosf/sinf of angles up to ~4096 rad: a few ulp of the result */
        CHECK_CLOSE("rope", y, ref, n * nh * hd, 2e-6, 2e-6);
        CHECK_OK(be->ops.rope_bwd(be, y, pos, inv, n, nh, hd)); /* inverse rotation */
        double *xd = malloc(n * nh * hd * 8);
        for (int64_t i = 0; i < n * nh * hd; i++) xd[i] = x[i];
        CHECK_CLOSE("rope_bwd(rope(x)) == x", y, xd, n * nh * hd, 1e-5, 1e-5);
        free(x), free(inv), free(ref), free(y), free(xd);
    }
}

/* Attention over a cache holding several sequences of different lengths; the batch mixes a
 * prefill of one sequence, decode tokens of others, and a single-token sequence. */
static void test_attention(void) {
    int64_t cfg[][3] = {{4, 4, 64}, {8, 2, 64}, {8, 1, 128}, {1, 1, 128}, {16, 2, 128}};
    for (int c = 0; c < 5; c++) {
        int64_t nh = cfg[c][0], nkv = cfg[c][1], hd = cfg[c][2], ctx = 37, nseq = 3;
        /* sequence lengths 37, 5, 1: tokens: all 37 of seq 0 (prefill), last of seq 1, seq 2 */
        int32_t len[3] = {37, 5, 1};
        int64_t n = 0;
        int32_t seq[64], pos[64];
        for (int32_t p = 0; p < len[0]; p++) seq[n] = 0, pos[n++] = p;
        seq[n] = 1, pos[n++] = len[1] - 1;
        seq[n] = 2, pos[n++] = 0;
        int64_t row = nkv * hd, csz = nseq * ctx * row;
        float *kc = rnd(csz, 1.0f), *vc = rnd(csz, 1.0f);
        float *k = rnd(n * row, 1.5f), *v = rnd(n * row, 1.0f), *q = rnd(n * nh * hd, 1.5f);
        CHECK_OK(be->ops.kv_store(be, kc, vc, k, v, seq, pos, n, nkv, hd, ctx));
        float *out = malloc(n * nh * hd * 4);
        float scale = 1.0f / sqrtf((float)hd);
        CHECK_OK(be->ops.attention(be, out, q, kc, vc, seq, pos, n, nh, nkv, hd, ctx, scale));
        double *ref = calloc(n * nh * hd, 8), *sc = malloc(ctx * 8);
        for (int64_t t = 0; t < n; t++)
            for (int64_t h = 0; h < nh; h++) {
                int64_t g = h / (nh / nkv);
                double mx = -1e300, sum = 0;
                for (int64_t p = 0; p <= pos[t]; p++) {
                    /* the cache rows written by this batch equal k/v of that token */
                    const float *kr = kc + ((seq[t] * ctx + p) * nkv + g) * hd;
                    double d = 0;
                    for (int64_t j = 0; j < hd; j++) d += (double)q[(t * nh + h) * hd + j] * kr[j];
                    sc[p] = d * scale;
                    if (sc[p] > mx) mx = sc[p];
                }
                for (int64_t p = 0; p <= pos[t]; p++) sum += (sc[p] = exp(sc[p] - mx));
                for (int64_t p = 0; p <= pos[t]; p++) {
                    const float *vr = vc + ((seq[t] * ctx + p) * nkv + g) * hd;
                    for (int64_t j = 0; j < hd; j++) ref[(t * nh + h) * hd + j] += sc[p] / sum * vr[j];
                }
            }
        /* f32 dot products of length <= 128 and a softmax over <= 37 rows: ~1e-6 relative */
        CHECK_CLOSE("attention", out, ref, n * nh * hd, 2e-5, 2e-5);
        /* the stored rows really are the inputs */
        CHECK(memcmp(kc + ((1 * ctx + 4) * nkv) * hd, k + (n - 2) * row, row * 4) == 0);
        free(kc), free(vc), free(k), free(v), free(q), free(out), free(ref), free(sc);
    }
}

static void test_elementwise(void) {
    int64_t n = 1001;
    float *g = rnd(n, 3.0f), *u = rnd(n, 1.0f), *o = malloc(n * 4), *y = rnd(n, 1.0f);
    double *ref = malloc(n * 8);
    for (int64_t i = 0; i < n; i++) ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    CHECK_OK(be->ops.swiglu(be, o, g, u, n));
    CHECK_CLOSE("swiglu", o, ref, n, 1e-6, 1e-5); /* expf: a few ulp */
    for (int64_t i = 0; i < n; i++) ref[i] = (double)y[i] + g[i];
    CHECK_OK(be->ops.add(be, y, g, n));
    CHECK_CLOSE("add", y, ref, n, 1e-6, 1e-6);
    /* swiglu backward against central differences in double of the exact formula */
    float *dout = rnd(n, 1.0f), *dg = malloc(n * 4), *du = malloc(n * 4);
    double *rg = malloc(n * 8), *ru = malloc(n * 8);
    for (int64_t i = 0; i < n; i++) {
        double x = g[i], h = 1e-5;
        double fp = (x + h) / (1 + exp(-(x + h))), fm = (x - h) / (1 + exp(-(x - h)));
        rg[i] = dout[i] * u[i] * (fp - fm) / (2 * h);
        ru[i] = dout[i] * x / (1 + exp(-x));
    }
    CHECK_OK(be->ops.swiglu_bwd(be, dg, du, dout, g, u, n));
    CHECK_CLOSE("swiglu_bwd dgate", dg, rg, n, 1e-5, 1e-4); /* finite difference error ~h² */
    CHECK_CLOSE("swiglu_bwd dup", du, ru, n, 1e-6, 1e-5);
    /* embedding and get_rows are exact copies */
    int64_t vocab = 11, d = 5;
    uint16_t *tab = malloc(vocab * d * 2);
    for (int64_t i = 0; i < vocab * d; i++) tab[i] = qlr_f32_to_bf16(test_rng_normal(&g_rng));
    int32_t ids[4] = {10, 0, 3, 10};
    float *e = malloc(4 * d * 4), *r2 = malloc(2 * d * 4);
    CHECK_OK(be->ops.embedding(be, e, tab, ids, 4, d, vocab));
    int ok = 1;
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < d; j++) ok &= e[i * d + j] == qlr_bf16_to_f32(tab[ids[i] * d + j]);
    CHECK(ok);
    int32_t rows[2] = {3, 1};
    CHECK_OK(be->ops.get_rows(be, r2, e, rows, 2, d));
    CHECK(memcmp(r2, e + 3 * d, d * 4) == 0 && memcmp(r2 + d, e + d, d * 4) == 0);
    free(g), free(u), free(o), free(y), free(ref), free(dout), free(dg), free(du), free(rg),
        free(ru), free(tab), free(e), free(r2);
}

static void test_rmsnorm_bwd(void) {
    int64_t n = 3, d = 67;
    float *x = rnd(n * d, 1.0f), *w = rnd(d, 1.0f), *dy = rnd(n * d, 1.0f), *dx = malloc(n * d * 4);
    double *ref = malloc(n * d * 8);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < d; j++) {
            /* d/dx_j of L = Σ_k dy_k y_k, central difference in double */
            double h = 1e-6, l[2];
            for (int sgn = 0; sgn < 2; sgn++) {
                double ss = 0, xs[256];
                for (int64_t k = 0; k < d; k++) xs[k] = x[i * d + k];
                xs[j] += sgn ? -h : h;
                for (int64_t k = 0; k < d; k++) ss += xs[k] * xs[k];
                double r = 1 / sqrt(ss / d + 1e-6), L = 0;
                for (int64_t k = 0; k < d; k++) L += dy[i * d + k] * xs[k] * r * w[k];
                l[sgn] = L;
            }
            ref[i * d + j] = (l[0] - l[1]) / (2 * h);
        }
    CHECK_OK(be->ops.rmsnorm_bwd(be, dx, dy, x, w, n, d, 1e-6f));
    CHECK_CLOSE("rmsnorm_bwd", dx, ref, n * d, 1e-4, 1e-4); /* f32 op vs double FD (h = 1e-6) */
    free(x), free(w), free(dy), free(dx), free(ref);
}

/* Attention backward: dq and the cache gradients against central differences of
 * L = Σ dout · attention(q, K, V) in double. */
static void test_attention_bwd(void) {
    int64_t nh = 4, nkv = 2, hd = 8, ctx = 6, nseq = 2, n = 5;
    int32_t seq[5] = {0, 0, 0, 1, 1}, pos[5] = {0, 1, 2, 0, 1};
    int64_t row = nkv * hd, csz = nseq * ctx * row, qn = n * nh * hd;
    float *q = rnd(qn, 1.0f), *kc = rnd(csz, 1.0f), *vc = rnd(csz, 1.0f), *dout = rnd(qn, 1.0f);
    float *dq = malloc(qn * 4), *dkc = calloc(csz, 4), *dvc = calloc(csz, 4), *o = malloc(qn * 4);
    float scale = 0.35f;
    CHECK_OK(be->ops.attention(be, o, q, kc, vc, seq, pos, n, nh, nkv, hd, ctx, scale));
    CHECK_OK(be->ops.attention_bwd(be, dq, dkc, dvc, dout, q, kc, vc, o, NULL, seq, pos, n, nh,
                                   nkv, hd, ctx, scale));
    /* loss in f32 through the op; FD step 1e-2 on values ~1: error ~h² · |f'''| ~ 1e-4 */
    float *tmp = malloc(qn * 4);
    double *rq = malloc(qn * 8), *rk = malloc(csz * 8), *rv = malloc(csz * 8);
#define LOSS(res)                                                                       \
    do {                                                                                \
        be->ops.attention(be, tmp, q, kc, vc, seq, pos, n, nh, nkv, hd, ctx, scale);    \
        double s_ = 0;                                                                  \
        for (int64_t i_ = 0; i_ < qn; i_++) s_ += (double)tmp[i_] * dout[i_];           \
        res = s_;                                                                       \
    } while (0)
    float h = 1e-2f;
    float *arrs[3] = {q, kc, vc};
    double *refs[3] = {rq, rk, rv};
    int64_t sizes[3] = {qn, csz, csz};
    for (int a = 0; a < 3; a++)
        for (int64_t i = 0; i < sizes[a]; i++) {
            float keep = arrs[a][i];
            double lp, lm;
            arrs[a][i] = keep + h;
            LOSS(lp);
            arrs[a][i] = keep - h;
            LOSS(lm);
            arrs[a][i] = keep;
            refs[a][i] = (lp - lm) / (2.0 * h);
        }
    CHECK_CLOSE("attention_bwd dq", dq, rq, qn, 2e-3, 2e-3);
    CHECK_CLOSE("attention_bwd dk", dkc, rk, csz, 2e-3, 2e-3);
    CHECK_CLOSE("attention_bwd dv", dvc, rv, csz, 2e-3, 2e-3);
    free(q), free(kc), free(vc), free(dout), free(dq), free(dkc), free(dvc), free(o), free(tmp),
        free(rq), free(rk), free(rv);
}

/* Varlen attention (training: blocked sgemm products inside each sequence) against the cache
 * attention ops (plain loops over the same causal sets) as its reference twin, forward and
 * backward, on SmolLM2's head shape with sequences longer than one query block (64), of one
 * token and of exactly one block; the backward with the forward's lse and without it. */
static void test_attention_varlen(void) {
    enum { NS = 5 };
    const int32_t len[NS] = {150, 1, 70, 64, 3};
    int64_t nh = 9, nkv = 3, hd = 64, ctx = 150, n = 0;
    for (int s = 0; s < NS; s++) n += len[s];
    int32_t *seq = malloc(n * 4), *pos = malloc(n * 4), *start = malloc(n * 4);
    for (int s = 0, t = 0; s < NS; s++)
        for (int32_t p = 0; p < len[s]; p++, t++) seq[t] = s, pos[t] = p, start[t] = t - p;
    int64_t qn = n * nh * hd, kn = n * nkv * hd, csz = NS * ctx * nkv * hd;
    float *q = rnd(qn, 1.0f), *k = rnd(kn, 1.0f), *v = rnd(kn, 1.0f), *dout = rnd(qn, 1.0f);
    float *kc = calloc(csz, 4), *vc = calloc(csz, 4), *dkc = calloc(csz, 4), *dvc = calloc(csz, 4);
    float *o = malloc(qn * 4), *oref = malloc(qn * 4), *lse = malloc(n * nh * 4);
    float *dq = malloc(qn * 4), *dk = malloc(kn * 4), *dv = malloc(kn * 4);
    float *rdq = malloc(qn * 4), *rdk = malloc(kn * 4), *rdv = malloc(kn * 4);
    float scale = 0.125f;
    CHECK_OK(be->ops.kv_store(be, kc, vc, k, v, seq, pos, n, nkv, hd, ctx));
    CHECK_OK(be->ops.attention(be, oref, q, kc, vc, seq, pos, n, nh, nkv, hd, ctx, scale));
    CHECK_OK(be->ops.attention_bwd(be, rdq, dkc, dvc, dout, q, kc, vc, oref, NULL, seq, pos, n, nh,
                                   nkv, hd, ctx, scale));
    CHECK_OK(be->ops.kv_store_bwd(be, rdk, rdv, dkc, dvc, seq, pos, n, nkv, hd, ctx));
    double *r = malloc((qn > kn ? qn : kn) * 8);
#define AS_REF(src, cnt) \
    for (int64_t i_ = 0; i_ < (cnt); i_++) r[i_] = (src)[i_]
    CHECK_OK(be->ops.attention_varlen(be, o, lse, q, k, v, start, n, nh, nkv, hd, scale));
    /* both f32: dot products of 64 and sums over <= 150 keys in another order: ~1e-6 */
    AS_REF(oref, qn);
    CHECK_CLOSE("attention_varlen vs cache attention", o, r, qn, 1e-5, 1e-4);
    for (int with_lse = 0; with_lse < 2; with_lse++) {
        CHECK_OK(be->ops.attention_varlen_bwd(be, dq, dk, dv, dout, q, k, v, o,
                                              with_lse ? lse : NULL, start, n, nh, nkv, hd, scale));
        /* gradients sum up to 150 x 3 heads of products ~1: ~1e-5 absolute */
        AS_REF(rdq, qn);
        CHECK_CLOSE("attention_varlen_bwd dq", dq, r, qn, 1e-4, 1e-4);
        AS_REF(rdk, kn);
        CHECK_CLOSE("attention_varlen_bwd dk", dk, r, kn, 1e-4, 1e-4);
        AS_REF(rdv, kn);
        CHECK_CLOSE("attention_varlen_bwd dv", dv, r, kn, 1e-4, 1e-4);
    }
#undef AS_REF
    free(seq), free(pos), free(start), free(q), free(k), free(v), free(dout), free(kc), free(vc),
        free(dkc), free(dvc), free(o), free(oref), free(lse), free(dq), free(dk), free(dv),
        free(rdq), free(rdk), free(rdv), free(r);
}

static void test_nf4_linear(void) {
    /* out x in: partial NF4 blocks, rows not block aligned, more than 256 blocks (dq); the last
     * two are split over the threads, the first of them into several per-thread tiles of W
     * (2 MiB of f32) in both products, the last with dX column blocks (16 floats) that cut NF4
     * blocks (64) in the middle */
    int64_t shapes[][3] = {{1, 37, 65},    {5, 37, 65},     {3, 300, 130},
                           {1, 576, 576},  {17, 129, 192},  {12, 2000, 700},
                           {9, 301, 1537}};
    for (int s = 0; s < 7; s++) {
        int64_t n = shapes[s][0], out = shapes[s][1], in = shapes[s][2];
        float *w = rnd(out * in, 0.05f), *x = rnd(n * in, 1.0f), *bias = rnd(out, 0.1f);
        qlr_nf4 q;
        CHECK_OK(qlr_nf4_quantize(w, out, in, 1, &q));
        float *wd = malloc(out * in * 4), *y = malloc(n * out * 4);
        qlr_nf4_dequant(&q, wd); /* quant's own dequantizer is the reference for the weights */
        double *ref = malloc(n * out * 8);
        for (int64_t i = 0; i < n; i++)
            for (int64_t r = 0; r < out; r++) {
                double acc = bias[r];
                for (int64_t j = 0; j < in; j++) acc += (double)x[i * in + j] * wd[r * in + j];
                ref[i * out + r] = acc;
            }
        CHECK_OK(be->ops.nf4_linear(be, y, x, &q, bias, n));
        /* sgemm in f32 over `in` <= 576 products of magnitude ~0.05: ~1e-5 absolute */
        CHECK_CLOSE("nf4_linear", y, ref, n * out, 3e-5, 1e-4);
        /* dX = dY · W */
        float *dy = rnd(n * out, 1.0f), *dx = malloc(n * in * 4);
        double *rdx = malloc(n * in * 8);
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < in; j++) {
                double acc = 0;
                for (int64_t r = 0; r < out; r++) acc += (double)dy[i * out + r] * wd[r * in + j];
                rdx[i * in + j] = acc;
            }
        CHECK_OK(be->ops.nf4_linear_dx(be, dx, dy, &q, n));
        CHECK_CLOSE("nf4_linear_dx", dx, rdx, n * in, 3e-5, 1e-4);
        qlr_nf4_free(&q);
        free(w), free(x), free(bias), free(wd), free(y), free(ref), free(dy), free(dx), free(rdx);
    }
}

/* n x in -> out at rank r; the second shape splits tokens, A's columns and B's rows over
 * every thread */
static void test_lora_shape(int64_t n, int64_t in, int64_t out, int32_t r) {
    float *x = rnd(n * in, 1.0f), *a = rnd(r * in, 0.1f), *b = rnd(out * r, 0.1f);
    float *y = rnd(n * out, 1.0f);
    double *ref = malloc(n * out * 8);
    qlr_lora_ref l = {a, b, r, 0.5f};
    for (int64_t i = 0; i < n; i++)
        for (int64_t o = 0; o < out; o++) {
            double acc = 0;
            for (int k = 0; k < r; k++) {
                double u = 0;
                for (int64_t j = 0; j < in; j++) u += (double)x[i * in + j] * a[k * in + j];
                acc += u * b[o * r + k];
            }
            ref[i * out + o] = y[i * out + o] + 0.5 * acc;
        }
    CHECK_OK(be->ops.lora(be, y, x, &l, n, in, out));
    CHECK_CLOSE("lora", y, ref, n * out, 1e-5, 1e-5);
    CHECK_OK(be->ops.lora(be, y, x, NULL, n, in, out)); /* no adapter: no-op */
    CHECK_CLOSE("lora none", y, ref, n * out, 1e-5, 1e-5);
    /* gradients of L = Σ dy · lora(x) against the closed forms in double */
    float *dy = rnd(n * out, 1.0f), *da = calloc(r * in, 4), *db = calloc(out * r, 4),
          *dx = calloc(n * in, 4);
    CHECK_OK(be->ops.lora_bwd(be, da, db, dx, dy, x, &l, n, in, out));
    double *rda = calloc(r * in, 8), *rdb = calloc(out * r, 8), *rdx = calloc(n * in, 8);
    for (int64_t i = 0; i < n; i++)
        for (int k = 0; k < r; k++) {
            double u = 0, g = 0;
            for (int64_t j = 0; j < in; j++) u += (double)x[i * in + j] * a[k * in + j];
            for (int64_t o = 0; o < out; o++) g += (double)dy[i * out + o] * b[o * r + k];
            for (int64_t j = 0; j < in; j++) rda[k * in + j] += 0.5 * g * x[i * in + j];
            for (int64_t o = 0; o < out; o++) rdb[o * r + k] += 0.5 * dy[i * out + o] * u;
            for (int64_t j = 0; j < in; j++) rdx[i * in + j] += 0.5 * g * a[k * in + j];
        }
    CHECK_CLOSE("lora_bwd dA", da, rda, r * in, 1e-5, 1e-4);
    CHECK_CLOSE("lora_bwd dB", db, rdb, out * r, 1e-5, 1e-4);
    CHECK_CLOSE("lora_bwd dX", dx, rdx, n * in, 1e-5, 1e-4);
    free(x), free(a), free(b), free(y), free(ref), free(dy), free(da), free(db), free(dx),
        free(rda), free(rdb), free(rdx);
}

static void test_lora(void) {
    test_lora_shape(3, 70, 33, 4);
    test_lora_shape(70, 576, 200, 16);
}

/* The batched multi-adapter LoRA against the single-adapter op applied to each token's row
 * alone, and the promise that a row's bits depend only on that row's x and slot. Slots of ranks
 * 4, 8, 16, 64, a slot with r = 0 and tokens of slot -1 (untouched); tokens of one slot
 * scattered through the batch; in not a multiple of the accumulator width. */
static void test_lora_batched_shape(int64_t n, int64_t in, int64_t out) {
    enum { NS = 5 };
    const int32_t ranks[NS] = {4, 8, 0, 16, 64};
    const float scales[NS] = {0.5f, 2.0f, 1.0f, -0.25f, 0.125f};
    float *A[NS], *B[NS];
    qlr_lora_ref L[NS];
    for (int s = 0; s < NS; s++) {
        int32_t r = ranks[s];
        A[s] = rnd(r * in, 0.1f);
        B[s] = rnd(out * r, 0.1f);
        L[s] = (qlr_lora_ref){A[s], B[s], r, scales[s]};
    }
    float *x = rnd(n * in, 1.0f), *y0 = rnd(n * out, 1.0f);
    float *y = malloc(n * out * 4), *one = malloc(out * 4), *u = malloc(n * out * 4);
    int32_t *slot = malloc(n * 4), *uslot = malloc(n * 4);
    for (int64_t t = 0; t < n; t++) slot[t] = (int32_t)(test_rng_u64(&g_rng) % (NS + 1)) - 1;
    memcpy(y, y0, n * out * 4);
    CHECK_OK(be->ops.lora_batched(be, y, x, L, L, NS, slot, 64, -1, n, in, out));
    char what[96];
    int64_t bad_ref = 0, bad_alone = 0, bad_uniform = 0, bad_untouched = 0;
    double wmax = 0;
    for (int64_t t = 0; t < n; t++) {
        int32_t s = slot[t];
        const float *xt = x + t * in, *yt = y + t * out;
        if (s < 0 || ranks[s] == 0) {
            bad_untouched += memcmp(yt, y0 + t * out, out * 4) != 0;
            continue;
        }
        /* the single-adapter op (OpenBLAS) on this row alone; both sum the same f32 products in
         * different orders, so each side is within m·2⁻²⁴·M of the exact value, m = in + r + 2
         * terms on the longest path and M = |y0| + |scale|·Σ_j (Σ_k |x_k A_jk|)·|B_oj| the sum of
         * the magnitudes (the classic bound for recursive summation) */
        memcpy(one, y0 + t * out, out * 4);
        CHECK_OK(be->ops.lora(be, one, xt, &L[s], 1, in, out));
        int32_t r = ranks[s];
        double gamma = (double)(in + r + 2) * 0x1p-24;
        for (int64_t o = 0; o < out; o++) {
            double M = fabs(y0[t * out + o]);
            for (int32_t j = 0; j < r; j++) {
                double U = 0;
                for (int64_t k = 0; k < in; k++) U += fabs((double)xt[k] * A[s][j * in + k]);
                M += fabs(scales[s]) * U * fabs(B[s][o * r + j]);
            }
            double e = fabs((double)yt[o] - one[o]) / (2 * gamma * M);
            if (!(e <= 1.0)) bad_ref++;
            if (!(e <= wmax)) wmax = e;
        }
        /* bitwise: the same token alone in a batch of one */
        memcpy(one, y0 + t * out, out * 4);
        CHECK_OK(be->ops.lora_batched(be, one, xt, L, L, NS, &s, 64, s, 1, in, out));
        bad_alone += memcmp(one, yt, out * 4) != 0;
    }
    /* bitwise: every token in a uniform batch of its slot (the hint set or not) */
    for (int s = 0; s < NS; s++)
        for (int hint = 0; hint < 2; hint++) {
            for (int64_t t = 0; t < n; t++) uslot[t] = s;
            memcpy(u, y0, n * out * 4);
            CHECK_OK(be->ops.lora_batched(be, u, x, L, L, NS, uslot, 64, hint ? s : -1, n, in,
                                          out));
            for (int64_t t = 0; t < n; t++)
                if (slot[t] == s) bad_uniform += memcmp(u + t * out, y + t * out, out * 4) != 0;
        }
    snprintf(what, sizeof what, "lora_batched n=%lld in=%lld out=%lld", (long long)n,
             (long long)in, (long long)out);
    CHECK_MSG(bad_ref == 0, "%s: %lld values off the single-adapter op (worst %.3g x tolerance)",
              what, (long long)bad_ref, wmax);
    CHECK_MSG(bad_untouched == 0, "%s: %lld rows of slot -1 / r = 0 changed", what,
              (long long)bad_untouched);
    CHECK_MSG(bad_alone == 0, "%s: %lld rows differ from the same token alone", what,
              (long long)bad_alone);
    CHECK_MSG(bad_uniform == 0, "%s: %lld rows differ from a uniform batch", what,
              (long long)bad_uniform);
    /* the op must have done something: a wrong op that leaves y alone fails above only if
     * some token was adapted */
    int adapted = 0;
    for (int64_t t = 0; t < n; t++) adapted += slot[t] >= 0 && ranks[slot[t]] > 0;
    CHECK(n < 8 || adapted > 0);
    for (int s = 0; s < NS; s++) free(A[s]), free(B[s]);
    free(x), free(y0), free(y), free(one), free(u), free(slot), free(uslot);
}

static void test_lora_batched(void) {
    test_lora_batched_shape(1, 70, 33);
    test_lora_batched_shape(37, 70, 33);
    test_lora_batched_shape(64, 576, 192);
    test_lora_batched_shape(9, 192, 576);
    /* n = 0 and an empty table are no-ops */
    CHECK_OK(be->ops.lora_batched(be, NULL, NULL, NULL, NULL, 0, NULL, 0, -1, 0, 8, 8));
}

/* qlr_lora_segs_build: every adapted token in exactly one tile of its slot or one run, tiles of
 * <= QLR_LORA_TILE tokens ascending within a slot, runs exactly the stretches of >= run_min
 * consecutive tokens of one slot, slot -1 and out-of-range slots nowhere. */
static void check_segs(const int32_t *slot, int32_t n, int32_t n_slots, int32_t run_min) {
    int32_t *tok = malloc((size_t)n * 4 + 4), *tiles = malloc((size_t)n * 12 + 4),
            *runs = malloc((size_t)n * 12 + 4), *mark = malloc((size_t)n * 4 + 4),
            *seen = calloc((size_t)n + 1, 4);
    qlr_lora_segs g;
    qlr_lora_segs_build(slot, n, n_slots, run_min, tok, tiles, runs, mark, &g);
    int32_t pos = 0, mt = 0;
    for (int32_t t = 0; t < g.n_tiles; t++) {
        int32_t s = tiles[3 * t], p0 = tiles[3 * t + 1], c = tiles[3 * t + 2];
        CHECK(c >= 1 && c <= QLR_LORA_TILE && p0 == pos && s >= 0 && s < n_slots);
        for (int32_t i = 0; i < c; i++) {
            int32_t k = tok[p0 + i];
            CHECK(k >= 0 && k < n && slot[k] == s);
            if (k >= 0 && k < n) seen[k]++;
            if (i) CHECK(tok[p0 + i] > tok[p0 + i - 1]);
        }
        pos += c;
        mt = c > mt ? c : mt;
    }
    CHECK(pos == g.n_sorted && mt == g.max_tile);
    for (int32_t r = 0; r < g.n_runs; r++) {
        int32_t s = runs[3 * r], t0 = runs[3 * r + 1], c = runs[3 * r + 2];
        CHECK(run_min > 0 && c >= run_min && t0 >= 0 && t0 + c <= n);
        CHECK(t0 == 0 || slot[t0 - 1] != s);
        CHECK(t0 + c == n || slot[t0 + c] != s);
        for (int32_t i = t0; i < t0 + c && i < n; i++) {
            CHECK(slot[i] == s);
            seen[i]++;
        }
    }
    for (int32_t i = 0; i < n; i++)
        CHECK(seen[i] == (slot[i] >= 0 && slot[i] < n_slots ? 1 : 0));
    free(tok), free(tiles), free(runs), free(mark), free(seen);
}

static void test_lora_segs(void) {
    enum { N = 700 };
    int32_t slot[N];
    for (int32_t i = 0; i < N; i++) slot[i] = (int32_t)(test_rng_u64(&g_rng) % 9) - 1;
    check_segs(slot, N, 8, 64);  /* scattered: tiles only */
    slot[5] = 8;                 /* out of range: base */
    check_segs(slot, N, 8, 0);
    for (int32_t i = 100; i < 300; i++) slot[i] = 3; /* a prefill chunk: one run */
    for (int32_t i = 300; i < 363; i++) slot[i] = 2; /* 63 tokens: tiles */
    for (int32_t i = 400; i < 470; i++) slot[i] = -1;
    check_segs(slot, N, 8, 64);
    for (int32_t i = 0; i < N; i++) slot[i] = i % 64; /* 64 distinct adapters, decode-like */
    check_segs(slot, 64, 64, 64);
    check_segs(slot, 1, 64, 64);
    for (int32_t i = 0; i < 64; i++) slot[i] = i / 8; /* 8 adapters x 8 tokens */
    check_segs(slot, 64, 8, 64);
    qlr_lora_segs g;
    qlr_lora_segs_build(slot, 0, 8, 64, NULL, NULL, NULL, NULL, &g);
    CHECK(g.n_tiles == 0 && g.n_runs == 0 && g.n_sorted == 0);
}

static void test_lm_head(void) {
    int64_t n = 2, d = 65, vocab = 1037;
    uint16_t *w = malloc(vocab * d * 2);
    for (int64_t i = 0; i < vocab * d; i++) w[i] = qlr_f32_to_bf16(test_rng_normal(&g_rng) * 0.1f);
    float *x = rnd(n * d, 1.0f), *lg = malloc(n * vocab * 4);
    double *ref = malloc(n * vocab * 8);
    for (int64_t i = 0; i < n; i++)
        for (int64_t v = 0; v < vocab; v++) {
            double acc = 0;
            for (int64_t j = 0; j < d; j++) acc += (double)x[i * d + j] * qlr_bf16_to_f32(w[v * d + j]);
            ref[i * vocab + v] = acc;
        }
    CHECK_OK(be->ops.lm_head(be, lg, x, w, n, d, vocab));
    CHECK_CLOSE("lm_head", lg, ref, n * vocab, 1e-5, 1e-4);
    free(w), free(x), free(lg), free(ref);
}

static void test_sample(void) {
    int64_t vocab = 50;
    float *lg = rnd(vocab, 1.0f);
    lg[17] = 5.0f;
    lg[23] = 5.0f; /* tie: greedy takes the lowest id */
    qlr_sampling sp = qlr_sampling_default();
    uint64_t rng = 1;
    int32_t id = -1;
    CHECK_OK(be->ops.sample(be, &id, lg, &sp, &rng, 1, vocab));
    CHECK_EQ_INT(id, 17);
    CHECK_EQ_INT(rng, 1); /* greedy does not consume randomness */
    sp.temperature = 1.0f;
    sp.top_k = 1;
    CHECK_OK(be->ops.sample(be, &id, lg, &sp, &rng, 1, vocab));
    CHECK_EQ_INT(id, 17);
    /* top_p tiny keeps only the best candidate */
    sp.top_k = 0;
    sp.top_p = 1e-6f;
    CHECK_OK(be->ops.sample(be, &id, lg, &sp, &rng, 1, vocab));
    CHECK_EQ_INT(id, 17);
    /* determinism: same seed, same sequence */
    sp.top_p = 0.9f;
    sp.top_k = 10;
    int32_t a[20], b2[20];
    uint64_t r1 = 42, r2 = 42;
    for (int i = 0; i < 20; i++) {
        CHECK_OK(be->ops.sample(be, &a[i], lg, &sp, &r1, 1, vocab));
        CHECK_OK(be->ops.sample(be, &b2[i], lg, &sp, &r2, 1, vocab));
    }
    CHECK(memcmp(a, b2, sizeof a) == 0);
    /* distribution: three tokens at temperature 2 follow softmax(l / 2) */
    float l3[3] = {0.0f, 1.0f, 2.0f};
    double p[3], z = 0;
    for (int i = 0; i < 3; i++) z += (p[i] = exp(l3[i] / 2.0));
    int cnt[3] = {0, 0, 0};
    qlr_sampling s3 = {2.0f, 0, 1.0f};
    uint64_t r3 = 7;
    int draws = 30000;
    for (int i = 0; i < draws; i++) {
        int32_t t;
        be->ops.sample(be, &t, l3, &s3, &r3, 1, 3);
        cnt[t]++;
    }
    for (int i = 0; i < 3; i++) /* binomial sd <= 0.003 at 30000 draws: 0.015 is 5 sd */
        CHECK_NEAR((double)cnt[i] / draws, p[i] / z, 0.015, 0);
    /* top-k 2 never picks the worst of three */
    s3.top_k = 2;
    int worst_seen = 0;
    for (int i = 0; i < 2000; i++) {
        int32_t t;
        be->ops.sample(be, &t, l3, &s3, &r3, 1, 3);
        worst_seen |= t == 0;
    }
    CHECK(!worst_seen);
    free(lg);
}

int main(void) {
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    if (!be) return test_finish();
    test_rmsnorm();
    test_rope();
    test_attention();
    test_elementwise();
    test_rmsnorm_bwd();
    test_attention_bwd();
    test_attention_varlen();
    test_nf4_linear();
    test_lora();
    test_lora_batched();
    test_lora_segs();
    test_lm_head();
    test_sample();
    qlr_backend *none = NULL;
    CHECK(qlr_backend_create("tpu", 0, &none) == QLR_ERR_INVALID && none == NULL);
    qlr_backend_free(be);
    return test_finish();
}
