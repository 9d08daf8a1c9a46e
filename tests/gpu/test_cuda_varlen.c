/* tests/gpu/test_cuda_varlen.c: the training attention (attention_varlen and its backward) on
 * the GPU against the CPU reference: one token; packed batches of 1 to 7 sequences of odd
 * lengths (1, 3, 17, 64, 65, 129, 300: tiles that hold several sequences, sequences that span
 * tiles); head dims 64 and 128; GQA ratios 1, 3, 4 and 8; single sequences of 4096 tokens; and
 * one sequence of 65,536 tokens, forward and backward, whose outputs must all be finite and whose
 * sampled rows must match a host computation of just those rows, with the op's workspace growth
 * bounded by O(tokens). The backward also runs with out and lse NULL (recomputed) and must then
 * give the same bits. Outputs start as NaN bytes, so an element a kernel never writes fails.
 * Two kernel sets serve the op (attention_varlen_mma.cu by default, the WMMA ones under
 * QLR_ATTN_VARLEN=wmma): every case runs both and compares each with the CPU and the default
 * with the WMMA one (same tolerances; the log gives the max abs error of every output), and a
 * 16,384-token sequence compares the two on the GPU. Last, a timing table (not checked): ms and
 * TFLOP/s of both at 2048 and 8192 tokens, H=32, KV=8, hd=128 (Llama-3.1-8B).
 * `--sanitize`: only the small cases (compute-sanitizer runs, scripts/gpu_check.sh). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0x5a7;
static int g_sanitize;

/* One problem: inputs on the host (bf16-rounded), packed as `lens`. */
typedef struct {
    int64_t n, H, KV, hd;
    float scale;
    int32_t *start;          /* [n] */
    float *q, *k, *v, *dout; /* [n, H, hd], [n, KV, hd] x2, [n, H, hd] */
} av_in;

/* One backend's results (host floats). */
typedef struct {
    float *out, *lse, *dq, *dk, *dv;
} av_out;

static void in_make(av_in *a, int64_t H, int64_t KV, int64_t hd, const int32_t *lens, int nseq) {
    memset(a, 0, sizeof *a);
    for (int s = 0; s < nseq; s++) a->n += lens[s];
    a->H = H;
    a->KV = KV;
    a->hd = hd;
    a->scale = 1.0f / sqrtf((float)hd);
    a->start = malloc((size_t)a->n * 4);
    for (int s = 0, t = 0; s < nseq; t += lens[s], s++)
        for (int i = 0; i < lens[s]; i++) a->start[t + i] = t;
    int64_t nq = a->n * H * hd, nk = a->n * KV * hd;
    a->q = malloc((size_t)nq * 4);
    a->dout = malloc((size_t)nq * 4);
    a->k = malloc((size_t)nk * 4);
    a->v = malloc((size_t)nk * 4);
    gh_randn_bf16(a->q, nq, 1.0f, &rng);
    gh_randn_bf16(a->dout, nq, 1.0f, &rng);
    gh_randn_bf16(a->k, nk, 1.0f, &rng);
    gh_randn_bf16(a->v, nk, 1.0f, &rng);
    /* one large logit: the first query of head 0 aligned with the first key (a peaked row) */
    for (int64_t j = 0; j < hd; j++) a->q[j] = qlr_bf16_to_f32(qlr_f32_to_bf16(3.0f * a->k[j]));
}

static void in_free(av_in *a) {
    free(a->start); free(a->q); free(a->k); free(a->v); free(a->dout);
}

static void out_alloc(av_out *o, const av_in *a) {
    int64_t nq = a->n * a->H * a->hd, nk = a->n * a->KV * a->hd;
    o->out = malloc((size_t)nq * 4);
    o->dq = malloc((size_t)nq * 4);
    o->lse = malloc((size_t)(a->n * a->H) * 4);
    o->dk = malloc((size_t)nk * 4);
    o->dv = malloc((size_t)nk * 4);
}

static void out_free(av_out *o) {
    free(o->out); free(o->lse); free(o->dq); free(o->dk); free(o->dv);
}

/* A guarded output buffer; on the GPU its bytes start as 0xFF (bf16 and f32 NaN). */
static gh_buf nan_buf(qlr_backend *be, size_t bytes) {
    gh_buf b = gh_alloc(be, bytes);
    if (be->kind == QLR_DEVICE_CUDA && bytes) {
        unsigned char *h = malloc(bytes);
        memset(h, 0xFF, bytes);
        QLR_ASSERT(be->mem.h2d(be, b.p, h, bytes) == QLR_OK);
        QLR_ASSERT(be->mem.sync(be) == QLR_OK);
        free(h);
    }
    return b;
}

static void rd_f32(qlr_backend *be, float *dst, const void *src, int64_t n) {
    CHECK_OK(be->mem.d2h(be, dst, src, (size_t)n * 4));
    CHECK_OK(be->mem.sync(be));
}

/* Runs the forward, then the backward from the forward's own out and lse, on one backend. On
 * the GPU with `recompute` also the backward with out = lse = NULL, which must give the same
 * bits, and (when ws_growth is not NULL) the growth of the backend's peak bytes across the two
 * ops. */
static void run_backend(qlr_backend *be, const av_in *a, av_out *r, int recompute,
                        size_t *ws_growth) {
    int64_t n = a->n, nq = n * a->H * a->hd, nk = n * a->KV * a->hd;
    size_t es = qlr_backend_act_size(be);
    gh_buf bq = gh_act(be, a->q, nq), bk = gh_act(be, a->k, nk), bv = gh_act(be, a->v, nk);
    gh_buf bdo = gh_act(be, a->dout, nq), bs = gh_raw(be, a->start, (size_t)n * 4);
    gh_buf bo = nan_buf(be, (size_t)nq * es), bl = nan_buf(be, (size_t)(n * a->H) * 4);
    gh_buf bdq = nan_buf(be, (size_t)nq * es), bdk = nan_buf(be, (size_t)nk * es);
    gh_buf bdv = nan_buf(be, (size_t)nk * es);
    int gpu = be->kind == QLR_DEVICE_CUDA;
    size_t peak0 = gpu ? qlr_cuda_peak_bytes(be) : 0;
    CHECK_OK(be->ops.attention_varlen(be, bo.p, bl.p, bq.p, bk.p, bv.p, bs.p, n, a->H, a->KV,
                                      a->hd, a->scale));
    CHECK_OK(be->ops.attention_varlen_bwd(be, bdq.p, bdk.p, bdv.p, bdo.p, bq.p, bk.p, bv.p, bo.p,
                                          bl.p, bs.p, n, a->H, a->KV, a->hd, a->scale));
    CHECK_OK(be->mem.sync(be));
    if (ws_growth) *ws_growth = gpu ? qlr_cuda_peak_bytes(be) - peak0 : 0;
    gh_read_act(be, bo.p, r->out, nq);
    rd_f32(be, r->lse, bl.p, n * a->H);
    gh_read_act(be, bdq.p, r->dq, nq);
    gh_read_act(be, bdk.p, r->dk, nk);
    gh_read_act(be, bdv.p, r->dv, nk);
    if (gpu && recompute) {
        /* the recomputing path: the same kernels on the same inputs, so the same bits */
        gh_buf cq = nan_buf(be, (size_t)nq * es), ck = nan_buf(be, (size_t)nk * es);
        gh_buf cv = nan_buf(be, (size_t)nk * es);
        CHECK_OK(be->ops.attention_varlen_bwd(be, cq.p, ck.p, cv.p, bdo.p, bq.p, bk.p, bv.p, NULL,
                                              NULL, bs.p, n, a->H, a->KV, a->hd, a->scale));
        CHECK_OK(be->mem.sync(be));
        uint16_t *h1 = malloc((size_t)nq * 2), *h2 = malloc((size_t)nq * 2);
        const void *pairs[3][2] = {{bdq.p, cq.p}, {bdk.p, ck.p}, {bdv.p, cv.p}};
        const char *names[3] = {"dq", "dk", "dv"};
        for (int i = 0; i < 3; i++) {
            size_t bytes = (size_t)(i ? nk : nq) * 2;
            CHECK_OK(be->mem.d2h(be, h1, pairs[i][0], bytes));
            CHECK_OK(be->mem.d2h(be, h2, pairs[i][1], bytes));
            CHECK_OK(be->mem.sync(be));
            CHECK_MSG(memcmp(h1, h2, bytes) == 0, "attention_varlen_bwd n=%lld: %s with out/lse "
                      "NULL (recomputed) differs from %s with the forward's", (long long)n,
                      names[i], names[i]);
        }
        free(h1);
        free(h2);
        gh_free_checked(be, &cq, "varlen dq (recomputed)");
        gh_free_checked(be, &ck, "varlen dk (recomputed)");
        gh_free_checked(be, &cv, "varlen dv (recomputed)");
    }
    gh_free_checked(be, &bo, "varlen out");
    gh_free_checked(be, &bl, "varlen lse");
    gh_free_checked(be, &bdq, "varlen dq");
    gh_free_checked(be, &bdk, "varlen dk");
    gh_free_checked(be, &bdv, "varlen dv");
    gh_free_checked(be, &bq, "q");
    gh_free_checked(be, &bk, "k");
    gh_free_checked(be, &bv, "v");
    gh_free_checked(be, &bdo, "dout");
    gh_free_checked(be, &bs, "start");
}

static double rms_diff(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return n ? sqrt(s / n) : 0.0;
}

/* The forward output: gh_compare_attention (bf16 output, P rounded to bf16 for P·V: 8e-3 +
 * 2^-7 relative), and its RMS error within 1% of the output's RMS. */
static void cmp_out(const char *what, const float *got, const float *ref, int64_t n) {
    gh_compare_attention(what, got, ref, n);
    double r = gh_rms(ref, n), e = rms_diff(got, ref, n);
    CHECK_MSG(e <= 1e-2 * r, "%s: rms error %.3g over 1%% of the rms %.3g", what, e, r);
}

/* lse: S = Q·Kᵀ in f32 on both sides from the same bf16 values (summation order differs,
 * ~1e-6 of |s| <= ~40) and sums of exponentials in f32: 1e-3 absolute plus 1e-5 relative. */
static void cmp_lse(const char *what, const float *got, const float *ref, int64_t n) {
    gh_compare(what, got, ref, n, 1e-3, 1e-5);
}

/* Gradients: the GPU rounds P and dS = P ∘ (dP - D) to bf16 for the tensor-core products
 * (2^-9 relative each), takes D = rowsum(dO ∘ O) from the bf16 output and stores bf16 (2^-9).
 * The RMS error must stay within 1% of the gradient's RMS (typically 0.3%). A single element
 * can be off by much more than 2^-9 of its own value: where it is a near-cancelling sum of large
 * terms (few keys, a peaked softmax) its error follows the terms, up to ~0.1 of the RMS; so the
 * per-element bound, 2^-2 of the RMS plus 2^-6 of the value, only catches gross errors (a wrong
 * row or mask). The 1e-3 / 1e-4 floors cover gradients that are zero in exact arithmetic (a
 * one-token sequence has dq = dk = 0, both sides then hold f32 rounding noise). */
static void cmp_grad(const char *what, const float *got, const float *ref, int64_t n) {
    double r = gh_rms(ref, n), e = rms_diff(got, ref, n);
    gh_compare(what, got, ref, n, r * 0x1p-2 + 1e-3, 0x1p-6);
    CHECK_MSG(e <= 1e-2 * r + 1e-4, "%s: rms error %.3g over 1%% of the rms %.3g", what, e, r);
}

/* Selects the GPU kernel set for the next ops: wmma = 1 the fallback (QLR_ATTN_VARLEN=wmma). */
static void use_wmma(int wmma) {
    if (wmma) setenv("QLR_ATTN_VARLEN", "wmma", 1);
    else unsetenv("QLR_ATTN_VARLEN");
}

/* Every output of `got` against `ref` (tag: "mma vs cpu", "wmma vs cpu", "mma vs wmma"). */
static void cmp_all(const char *tag, const char *name, const av_in *a, const av_out *got,
                    const av_out *ref) {
    int64_t nq = a->n * a->H * a->hd, nk = a->n * a->KV * a->hd;
    char what[200];
#define WHAT(t) snprintf(what, sizeof what, "varlen %s %s %s H=%lld kv=%lld hd=%lld n=%lld", tag, \
                         t, name, (long long)a->H, (long long)a->KV, (long long)a->hd,          \
                         (long long)a->n)
    WHAT("out");
    cmp_out(what, got->out, ref->out, nq);
    WHAT("lse");
    cmp_lse(what, got->lse, ref->lse, a->n * a->H);
    WHAT("dq");
    cmp_grad(what, got->dq, ref->dq, nq);
    WHAT("dk");
    cmp_grad(what, got->dk, ref->dk, nk);
    WHAT("dv");
    cmp_grad(what, got->dv, ref->dv, nk);
#undef WHAT
}

static void run_case(const char *name, int64_t H, int64_t KV, int64_t hd, const int32_t *lens,
                     int nseq) {
    av_in a;
    in_make(&a, H, KV, hd, lens, nseq);
    av_out c, g, w;
    out_alloc(&c, &a);
    out_alloc(&g, &a);
    out_alloc(&w, &a);
    run_backend(g_cpu, &a, &c, 0, NULL);
    use_wmma(1);
    run_backend(g_gpu, &a, &w, 1, NULL);
    use_wmma(0);
    run_backend(g_gpu, &a, &g, 1, NULL);
    cmp_all("mma vs cpu", name, &a, &g, &c);
    cmp_all("wmma vs cpu", name, &a, &w, &c);
    cmp_all("mma vs wmma", name, &a, &g, &w);
    out_free(&c);
    out_free(&g);
    out_free(&w);
    in_free(&a);
}

/* One sequence of n tokens, GPU only: the default kernels against the WMMA ones, every output. */
static void run_vs_wmma(int64_t n, int64_t H, int64_t KV, int64_t hd) {
    int32_t len = (int32_t)n;
    av_in a;
    in_make(&a, H, KV, hd, &len, 1);
    av_out g, w;
    out_alloc(&g, &a);
    out_alloc(&w, &a);
    use_wmma(1);
    run_backend(g_gpu, &a, &w, 0, NULL);
    use_wmma(0);
    run_backend(g_gpu, &a, &g, 0, NULL);
    cmp_all("mma vs wmma", "1 seq", &a, &g, &w);
    out_free(&g);
    out_free(&w);
    in_free(&a);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Prints the forward and backward time (mean of `iters` after a warm-up run) of both kernel sets
 * on one sequence of n tokens; causal FLOPs: forward 2·2·n²/2·H·hd, backward 2.5x that. Speed
 * is reported, never checked. */
static void time_case(int64_t n, int64_t H, int64_t KV, int64_t hd, int iters) {
    int32_t len = (int32_t)n;
    av_in a;
    in_make(&a, H, KV, hd, &len, 1);
    qlr_backend *be = g_gpu;
    int64_t nq = n * H * hd, nk = n * KV * hd;
    size_t es = qlr_backend_act_size(be);
    gh_buf bq = gh_act(be, a.q, nq), bk = gh_act(be, a.k, nk), bv = gh_act(be, a.v, nk);
    gh_buf bdo = gh_act(be, a.dout, nq), bs = gh_raw(be, a.start, (size_t)n * 4);
    gh_buf bo = gh_alloc(be, (size_t)nq * es), bl = gh_alloc(be, (size_t)(n * H) * 4);
    gh_buf bdq = gh_alloc(be, (size_t)nq * es), bdk = gh_alloc(be, (size_t)nk * es);
    gh_buf bdv = gh_alloc(be, (size_t)nk * es);
    double fwd_flop = 2.0 * 2.0 * (double)n * (double)n / 2.0 * (double)H * (double)hd;
    for (int wm = 0; wm < 2; wm++) {
        use_wmma(wm);
        double tf = 0, tb = 0;
        for (int i = 0; i <= iters; i++) {
            CHECK_OK(be->mem.sync(be));
            double t0 = now_s();
            CHECK_OK(be->ops.attention_varlen(be, bo.p, bl.p, bq.p, bk.p, bv.p, bs.p, n, H, KV,
                                              hd, a.scale));
            CHECK_OK(be->mem.sync(be));
            double t1 = now_s();
            CHECK_OK(be->ops.attention_varlen_bwd(be, bdq.p, bdk.p, bdv.p, bdo.p, bq.p, bk.p,
                                                  bv.p, bo.p, bl.p, bs.p, n, H, KV, hd,
                                                  a.scale));
            CHECK_OK(be->mem.sync(be));
            double t2 = now_s();
            if (i == 0) continue; /* warm-up: workspace growth, first launches */
            tf += t1 - t0;
            tb += t2 - t1;
        }
        tf /= iters;
        tb /= iters;
        printf("  timing %-4s n=%-5lld H=%lld kv=%lld hd=%lld: fwd %8.3f ms %6.1f TFLOP/s, "
               "bwd %8.3f ms %6.1f TFLOP/s, fwd+bwd %8.3f ms\n", wm ? "wmma" : "mma", (long long)n,
               (long long)H, (long long)KV, (long long)hd, tf * 1e3, fwd_flop / tf * 1e-12,
               tb * 1e3, 2.5 * fwd_flop / tb * 1e-12, (tf + tb) * 1e3);
    }
    use_wmma(0);
    gh_free_checked(be, &bo, "timing out");
    gh_free_checked(be, &bl, "timing lse");
    gh_free_checked(be, &bdq, "timing dq");
    gh_free_checked(be, &bdk, "timing dk");
    gh_free_checked(be, &bdv, "timing dv");
    gh_free_checked(be, &bq, "q");
    gh_free_checked(be, &bk, "k");
    gh_free_checked(be, &bv, "v");
    gh_free_checked(be, &bdo, "dout");
    gh_free_checked(be, &bs, "start");
    in_free(&a);
}

/* ---- the long sequence: sampled rows on the host ---- */

/* Exact (double) forward and dq of query row t, head h: out [hd], *lse, dq [hd]. */
static void ref_query_row(const av_in *a, int64_t t, int64_t h, double *out, double *lse,
                          double *dq) {
    int64_t hd = a->hd, g = h / (a->H / a->KV), s0 = a->start[t], np = t - s0 + 1;
    double *s = malloc((size_t)np * sizeof *s), mx = -INFINITY, sum = 0, D = 0;
    const float *q = a->q + (t * a->H + h) * hd, *dout = a->dout + (t * a->H + h) * hd;
    for (int64_t p = 0; p < np; p++) {
        const float *k = a->k + ((s0 + p) * a->KV + g) * hd;
        double d = 0;
        for (int64_t j = 0; j < hd; j++) d += (double)q[j] * k[j];
        s[p] = d * a->scale;
        if (s[p] > mx) mx = s[p];
    }
    for (int64_t p = 0; p < np; p++) sum += exp(s[p] - mx);
    *lse = mx + log(sum);
    for (int64_t j = 0; j < hd; j++) out[j] = dq[j] = 0;
    for (int64_t p = 0; p < np; p++) {
        const float *v = a->v + ((s0 + p) * a->KV + g) * hd;
        double pr = exp(s[p] - *lse);
        for (int64_t j = 0; j < hd; j++) out[j] += pr * v[j];
    }
    for (int64_t j = 0; j < hd; j++) D += dout[j] * out[j];
    for (int64_t p = 0; p < np; p++) {
        const float *v = a->v + ((s0 + p) * a->KV + g) * hd;
        const float *k = a->k + ((s0 + p) * a->KV + g) * hd;
        double dp = 0, pr = exp(s[p] - *lse);
        for (int64_t j = 0; j < hd; j++) dp += (double)dout[j] * v[j];
        double ds = pr * (dp - D) * a->scale;
        for (int64_t j = 0; j < hd; j++) dq[j] += ds * k[j];
    }
    free(s);
}

/* dk, dv [hd] of key row j, KV head g, from every query t >= j of j's sequence and every query
 * head of the group, with the forward statistics lse [n, H] and D [n, H] given (the GPU's). */
static void ref_key_row(const av_in *a, int64_t j, int64_t g, const float *lse, const double *D,
                        double *dk, double *dv) {
    int64_t hd = a->hd, G = a->H / a->KV;
    const float *k = a->k + (j * a->KV + g) * hd, *v = a->v + (j * a->KV + g) * hd;
    for (int64_t e = 0; e < hd; e++) dk[e] = dv[e] = 0;
    for (int64_t h = g * G; h < (g + 1) * G; h++)
        for (int64_t t = j; t < a->n && a->start[t] <= j; t++) {
            const float *q = a->q + (t * a->H + h) * hd, *dout = a->dout + (t * a->H + h) * hd;
            double s = 0, dp = 0;
            for (int64_t e = 0; e < hd; e++) {
                s += (double)q[e] * k[e];
                dp += (double)dout[e] * v[e];
            }
            double pr = exp(s * a->scale - lse[t * a->H + h]);
            double ds = pr * (dp - D[t * a->H + h]) * a->scale;
            for (int64_t e = 0; e < hd; e++) {
                dv[e] += pr * dout[e];
                dk[e] += ds * q[e];
            }
        }
}

static int64_t count_nonfinite(const float *x, int64_t n) {
    int64_t c = 0;
    for (int64_t i = 0; i < n; i++) c += !isfinite(x[i]);
    return c;
}

/* One sequence of n tokens on the GPU only (the CPU reference would take hours): every output
 * finite, sampled query rows (out, lse, dq) and key rows (dk, dv) against the host, and the
 * op's workspace growth within O(n) (an [n, n] score matrix would need n²·4 bytes per head). */
static void run_long(int64_t n, int64_t H, int64_t KV, int64_t hd) {
    int32_t len = (int32_t)n;
    av_in a;
    in_make(&a, H, KV, hd, &len, 1);
    av_out g;
    out_alloc(&g, &a);
    size_t growth = 0;
    run_backend(g_gpu, &a, &g, 0, &growth); /* (the recomputing path: run_case covers it) */
    int64_t nq = n * H * hd, nk = n * KV * hd;
    char what[128];
    snprintf(what, sizeof what, "long n=%lld H=%lld kv=%lld hd=%lld", (long long)n, (long long)H,
             (long long)KV, (long long)hd);
    int64_t bad = count_nonfinite(g.out, nq) + count_nonfinite(g.lse, n * H) +
                  count_nonfinite(g.dq, nq) + count_nonfinite(g.dk, nk) +
                  count_nonfinite(g.dv, nk);
    CHECK_MSG(bad == 0, "%s: %lld non-finite outputs", what, (long long)bad);
    size_t bound = (size_t)(n * H) * (8 + 2 * (size_t)hd) + (2u << 20);
    printf("  %-48s workspace growth %.2f MiB (bound %.2f MiB)\n", what,
           (double)growth / (1 << 20), (double)bound / (1 << 20));
    CHECK_MSG(growth <= bound, "%s: the ops grew device memory by %zu bytes (O(n) bound %zu)",
              what, growth, bound);
#define LONG_WHAT(t) snprintf(what, sizeof what, "long %s (sampled rows) n=%lld hd=%lld", t, \
                             (long long)n, (long long)hd)
    /* sampled query rows: tile edges, the middle, the last token */
    const int64_t qt[] = {0, 1, 63, 64, n / 16 + 1, n / 2, n - 2, n - 1};
    const int nqs = (int)(sizeof qt / sizeof qt[0]);
    int64_t m = nqs * H * hd;
    float *go = malloc((size_t)m * 4), *ro = malloc((size_t)m * 4), *gq = malloc((size_t)m * 4);
    float *rq = malloc((size_t)m * 4), *gl = malloc((size_t)(nqs * H) * 4);
    float *rl = malloc((size_t)(nqs * H) * 4);
    double *o = malloc((size_t)hd * sizeof *o), *d = malloc((size_t)hd * sizeof *d), lse;
    for (int i = 0; i < nqs; i++)
        for (int64_t h = 0; h < H; h++) {
            int64_t t = qt[i], row = (t * H + h) * hd, at = (i * H + h) * hd;
            ref_query_row(&a, t, h, o, &lse, d);
            for (int64_t e = 0; e < hd; e++) {
                go[at + e] = g.out[row + e];
                ro[at + e] = (float)o[e];
                gq[at + e] = g.dq[row + e];
                rq[at + e] = (float)d[e];
            }
            gl[i * H + h] = g.lse[t * H + h];
            rl[i * H + h] = (float)lse;
        }
    LONG_WHAT("out");
    cmp_out(what, go, ro, m);
    LONG_WHAT("lse");
    cmp_lse(what, gl, rl, nqs * H);
    LONG_WHAT("dq");
    cmp_grad(what, gq, rq, m);
    /* sampled key rows, from the GPU's lse and D = rowsum(dout ∘ out) of the GPU's bf16 out (what
     * the kernels use; the lse rows sampled above were checked against the exact values) */
    double *D = malloc((size_t)(n * H) * sizeof *D);
    for (int64_t i = 0; i < n * H; i++) {
        double s = 0;
        for (int64_t e = 0; e < hd; e++) s += (double)a.dout[i * hd + e] * g.out[i * hd + e];
        D[i] = s;
    }
    const int64_t kt[] = {0, 1, 64, n / 2 - 1, n - 64, n - 1};
    const int nks = (int)(sizeof kt / sizeof kt[0]);
    int64_t mk = nks * KV * hd;
    float *gk = malloc((size_t)mk * 4), *rk = malloc((size_t)mk * 4), *gv = malloc((size_t)mk * 4);
    float *rv = malloc((size_t)mk * 4);
    for (int i = 0; i < nks; i++)
        for (int64_t gg = 0; gg < KV; gg++) {
            int64_t row = (kt[i] * KV + gg) * hd, at = (i * KV + gg) * hd;
            ref_key_row(&a, kt[i], gg, g.lse, D, o, d);
            for (int64_t e = 0; e < hd; e++) {
                gk[at + e] = g.dk[row + e];
                rk[at + e] = (float)o[e];
                gv[at + e] = g.dv[row + e];
                rv[at + e] = (float)d[e];
            }
        }
    LONG_WHAT("dk");
    cmp_grad(what, gk, rk, mk);
    LONG_WHAT("dv");
    cmp_grad(what, gv, rv, mk);
#undef LONG_WHAT
    free(go); free(ro); free(gq); free(rq); free(gl); free(rl); free(o); free(d); free(D);
    free(gk); free(rk); free(gv); free(rv);
    out_free(&g);
    in_free(&a);
}

/* Every GQA ratio for one head dim: ratio 1 (H=2, kv=2), 3 (9, 3), 4 (4, 1), 8 (16, 2). */
static void cases(int64_t hd) {
    static const int32_t one[] = {1}, two[] = {3, 17}, three[] = {65, 1, 64}, mix4[] = {129, 7, 1, 3};
    static const int32_t seven[] = {1, 3, 17, 64, 65, 129, 300}, five[] = {17, 64, 1, 300, 65};
    static const int32_t single[] = {300};
    run_case("1 token", 2, 2, hd, one, 1);
    run_case("2 seqs", 9, 3, hd, two, 2);
    run_case("3 seqs", 4, 1, hd, three, 3);
    run_case("4 seqs", 16, 2, hd, mix4, 4);
    if (g_sanitize) return;
    run_case("7 seqs", 2, 2, hd, seven, 7);
    run_case("7 seqs", 4, 1, hd, seven, 7);
    run_case("5 seqs", 16, 2, hd, five, 5);
    run_case("1 seq", 9, 3, hd, single, 1);
    run_case("1 token", 16, 2, hd, one, 1);
}

int main(int argc, char **argv) {
    g_sanitize = argc > 1 && !strcmp(argv[1], "--sanitize");
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    if (!g_sanitize) {
        /* first, so that the peak-bytes figure before the ops is the live allocation */
        run_long(65536, 2, 1, 64);
    }
    cases(64);
    cases(128);
    if (g_sanitize) {
        printf("--sanitize: the 4096- and 65536-token cases are left out of this run\n");
    } else {
        static const int32_t long_len[] = {4096};
        run_case("long", 4, 2, 64, long_len, 1);
        run_case("long", 2, 2, 128, long_len, 1);
        static const int32_t long_mix[] = {1, 1000, 63, 65, 1, 2914, 52}; /* 4096 tokens */
        run_case("7 seqs", 8, 2, 128, long_mix, 7);
        run_vs_wmma(16384, 8, 2, 128);
        run_long(16384, 8, 2, 128);
        time_case(2048, 32, 8, 128, 5);
        time_case(8192, 32, 8, 128, 3);
    }
    /* an unsupported head dim is an error with a message, not a crash */
    {
        int32_t st = 0;
        gh_buf b = gh_alloc(g_gpu, 4096), s = gh_raw(g_gpu, &st, 4);
        qlr_status r = g_gpu->ops.attention_varlen(g_gpu, b.p, NULL, b.p, b.p, b.p, s.p, 1, 1, 1,
                                                   96, 0.1f);
        CHECK_MSG(r == QLR_ERR_UNSUPPORTED, "head_dim 96: status %d (%s)", (int)r, qlr_error_msg());
        qlr_error_clear();
        gh_free_checked(g_gpu, &b, "hd 96");
        gh_free_checked(g_gpu, &s, "start");
    }
    gh_done();
    return test_finish();
}
