/* tests/gpu/test_cuda_fused.c: the optional fused CUDA ops (the entries at the end of the op
 * table) against the composition of the separate CPU reference ops they replace:
 * nf4_linear_multi (q/k/v and gate/up in one launch; partial row groups, a partial 1024-column
 * chunk, bias, n = 1 and the n > 1 fallback), swiglu_nf4_linear, add_rmsnorm (vectorised and
 * fallback widths) and rope_kv_store (head dims 64 and 128, GQA, large positions); the n = 1
 * kernels behind them: the streaming kernel (variant 4, sm_90: cols multiples of 1024 up to 32768,
 * partial tiles, fewer tiles than SMs, both absmax forms, two runs bitwise equal) and the register
 * kernel (variant 2) on the same inputs, and the f32-output NF4 logits entry. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_backend.h"
#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0xf05ed;

static float *randv(int64_t n, float s) {
    float *x = malloc((size_t)(n ? n : 1) * 4);
    gh_randn_bf16(x, n, s, &rng);
    return x;
}

typedef struct wpair {
    qlr_nf4 host, cpu, gpu;
} wpair;

static void make_w(wpair *p, int64_t rows, int64_t cols, int dq) {
    float *w = malloc((size_t)(rows * cols) * 4);
    for (int64_t i = 0; i < rows * cols; i++) w[i] = 0.02f * test_rng_normal(&rng);
    CHECK_OK(qlr_nf4_quantize(w, rows, cols, dq, &p->host));
    CHECK_OK(qlr_backend_nf4_upload(g_cpu, &p->host, &p->cpu, 0));
    CHECK_OK(qlr_backend_nf4_upload(g_gpu, &p->host, &p->gpu, 0));
    free(w);
}
static void free_w(wpair *p) {
    qlr_backend_nf4_free(g_gpu, &p->gpu);
    qlr_backend_nf4_free(g_cpu, &p->cpu);
    qlr_nf4_free(&p->host);
}

static void test_multi(int k, const int64_t *rows, int64_t cols, int64_t n, int dq, int with_bias) {
    wpair w[3];
    float *bias[3] = {0};
    gh_buf cb[3], gb[3], cy[3], gy[3];
    for (int i = 0; i < k; i++) {
        make_w(&w[i], rows[i], cols, dq);
        bias[i] = randv(rows[i], 0.1f);
        cb[i] = gh_raw(g_cpu, bias[i], (size_t)rows[i] * 4);
        gb[i] = gh_raw(g_gpu, bias[i], (size_t)rows[i] * 4);
        cy[i] = gh_alloc(g_cpu, (size_t)(n * rows[i]) * 4);
        gy[i] = gh_alloc(g_gpu, (size_t)(n * rows[i]) * 2);
    }
    float *x = randv(n * cols, 1.0f);
    x[0] = 300.0f; /* a large activation: the per-lane f16 scaling must hold it */
    gh_buf cx = gh_act(g_cpu, x, n * cols), gx = gh_act(g_gpu, x, n * cols);
    void *ys[3];
    const qlr_nf4 *ws[3];
    const float *bs[3];
    for (int i = 0; i < k; i++) {
        CHECK_OK(g_cpu->ops.nf4_linear(g_cpu, cy[i].p, cx.p, &w[i].cpu, with_bias ? cb[i].p : NULL, n));
        ys[i] = gy[i].p;
        ws[i] = &w[i].gpu;
        bs[i] = with_bias ? gb[i].p : NULL;
    }
    CHECK(g_gpu->ops.nf4_linear_multi != NULL);
    CHECK_OK(g_gpu->ops.nf4_linear_multi(g_gpu, k, ys, gx.p, ws, bs, n));
    for (int i = 0; i < k; i++) {
        float *got = malloc((size_t)(n * rows[i]) * 4);
        gh_read_act(g_gpu, gy[i].p, got, n * rows[i]);
        const float *ref = cy[i].p;
        char what[128];
        snprintf(what, sizeof what, "nf4_linear_multi k=%d #%d [%lld,%lld] dq=%d n=%lld%s", k, i,
                 (long long)rows[i], (long long)cols, dq, (long long)n, with_bias ? " bias" : "");
        double rms = gh_rms(ref, n * rows[i]);
        /* as test_cuda_nf4: bf16 output rounding plus f16 products (2^-11) */
        gh_compare(what, got, ref, n * rows[i], rms * 0x1p-7, 0x1p-7);
        gh_free_checked(g_gpu, &gy[i], what);
        gh_free_checked(g_cpu, &cy[i], "cpu y");
        gh_free_checked(g_gpu, &gb[i], "bias");
        gh_free_checked(g_cpu, &cb[i], "cpu bias");
        free(got);
        free(bias[i]);
        free_w(&w[i]);
    }
    gh_free_checked(g_gpu, &gx, "x");
    gh_free_checked(g_cpu, &cx, "cpu x");
    free(x);
}

static void test_swiglu_linear(int64_t rows, int64_t cols, int64_t n) {
    wpair w;
    make_w(&w, rows, cols, 1);
    float *g = randv(n * cols, 2.0f), *u = randv(n * cols, 2.0f);
    gh_buf cg = gh_act(g_cpu, g, n * cols), cu = gh_act(g_cpu, u, n * cols);
    gh_buf gg = gh_act(g_gpu, g, n * cols), gu = gh_act(g_gpu, u, n * cols);
    gh_buf cy = gh_alloc(g_cpu, (size_t)(n * rows) * 4), gy = gh_alloc(g_gpu, (size_t)(n * rows) * 2);
    CHECK_OK(g_cpu->ops.swiglu(g_cpu, cg.p, cg.p, cu.p, n * cols));
    CHECK_OK(g_cpu->ops.nf4_linear(g_cpu, cy.p, cg.p, &w.cpu, NULL, n));
    CHECK(g_gpu->ops.swiglu_nf4_linear != NULL);
    CHECK_OK(g_gpu->ops.swiglu_nf4_linear(g_gpu, gy.p, gg.p, gu.p, &w.gpu, NULL, n));
    float *got = malloc((size_t)(n * rows) * 4);
    gh_read_act(g_gpu, gy.p, got, n * rows);
    char what[128];
    snprintf(what, sizeof what, "swiglu_nf4_linear [%lld,%lld] n=%lld", (long long)rows,
             (long long)cols, (long long)n);
    const float *ref = cy.p;
    /* the SwiGLU values are rounded to bf16 on the GPU (2^-9 each) before the product */
    gh_compare(what, got, ref, n * rows, gh_rms(ref, n * rows) * 0x1p-6, 0x1p-6);
    gh_free_checked(g_gpu, &gy, what);
    gh_free_checked(g_gpu, &gg, "gate");
    gh_free_checked(g_gpu, &gu, "up");
    gh_free_checked(g_cpu, &cy, "cpu y");
    gh_free_checked(g_cpu, &cg, "cpu gate");
    gh_free_checked(g_cpu, &cu, "cpu up");
    free(got);
    free(g);
    free(u);
    free_w(&w);
}

static void test_add_rmsnorm(int64_t n, int64_t d) {
    float *x = randv(n * d, 1.0f), *dx = randv(n * d, 1.0f), *w = randv(d, 1.0f);
    if (n * d > 3) x[3] = 1000.0f;
    gh_buf cx = gh_act(g_cpu, x, n * d), cd = gh_act(g_cpu, dx, n * d);
    gh_buf gx = gh_act(g_gpu, x, n * d), gd = gh_act(g_gpu, dx, n * d);
    gh_buf cw = gh_raw(g_cpu, w, (size_t)d * 4), gw = gh_raw(g_gpu, w, (size_t)d * 4);
    gh_buf cy = gh_alloc(g_cpu, (size_t)(n * d) * 4), gy = gh_alloc(g_gpu, (size_t)(n * d) * 2);
    CHECK_OK(g_cpu->ops.add(g_cpu, cx.p, cd.p, n * d));
    CHECK_OK(g_cpu->ops.rmsnorm(g_cpu, cy.p, cx.p, cw.p, n, d, 1e-5f));
    CHECK(g_gpu->ops.add_rmsnorm != NULL);
    CHECK_OK(g_gpu->ops.add_rmsnorm(g_gpu, gx.p, gy.p, gd.p, gw.p, n, d, 1e-5f));
    float *got = malloc((size_t)(n * d) * 4);
    char what[96];
    gh_read_act(g_gpu, gx.p, got, n * d);
    snprintf(what, sizeof what, "add_rmsnorm x n=%lld d=%lld", (long long)n, (long long)d);
    gh_compare(what, got, cx.p, n * d, 0, 0x1p-8); /* one bf16 rounding of the sum */
    gh_read_act(g_gpu, gy.p, got, n * d);
    snprintf(what, sizeof what, "add_rmsnorm y n=%lld d=%lld", (long long)n, (long long)d);
    gh_compare(what, got, cy.p, n * d, gh_rms(cy.p, n * d) * 0x1p-8, 0x1p-7);
    gh_free_checked(g_gpu, &gx, what);
    gh_free_checked(g_gpu, &gy, what);
    gh_free_checked(g_gpu, &gd, "dx");
    gh_free_checked(g_gpu, &gw, "w");
    gh_free_checked(g_cpu, &cx, "cpu x");
    gh_free_checked(g_cpu, &cy, "cpu y");
    gh_free_checked(g_cpu, &cd, "cpu dx");
    gh_free_checked(g_cpu, &cw, "cpu w");
    free(got);
    free(x);
    free(dx);
    free(w);
}

static void test_rope_kv(int64_t n, int64_t nh, int64_t nkv, int64_t hd, int64_t ctx,
                         int64_t n_seq) {
    float *q = randv(n * nh * hd, 1.0f), *k = randv(n * nkv * hd, 1.0f), *v = randv(n * nkv * hd, 1.0f);
    float *inv = malloc((size_t)(hd / 2) * 4);
    for (int64_t j = 0; j < hd / 2; j++) inv[j] = powf(500000.0f, -2.0f * (float)j / (float)hd);
    int32_t *pos = malloc((size_t)n * 4), *seq = malloc((size_t)n * 4);
    /* distinct cache slots (two tokens writing one slot would make the order matter) */
    for (int64_t t = 0; t < n; t++) {
        seq[t] = (int32_t)(t % n_seq);
        pos[t] = (int32_t)(ctx - 1 - t);
    }
    int64_t cache = n_seq * ctx * nkv * hd;
    float *zero = calloc((size_t)cache, 4);
    gh_buf cq = gh_act(g_cpu, q, n * nh * hd), ck = gh_act(g_cpu, k, n * nkv * hd),
           cv = gh_act(g_cpu, v, n * nkv * hd), ckc = gh_act(g_cpu, zero, cache),
           cvc = gh_act(g_cpu, zero, cache), ci = gh_raw(g_cpu, inv, (size_t)(hd / 2) * 4),
           cp = gh_raw(g_cpu, pos, (size_t)n * 4), cs = gh_raw(g_cpu, seq, (size_t)n * 4);
    gh_buf gq = gh_act(g_gpu, q, n * nh * hd), gk = gh_act(g_gpu, k, n * nkv * hd),
           gv = gh_act(g_gpu, v, n * nkv * hd), gkc = gh_act(g_gpu, zero, cache),
           gvc = gh_act(g_gpu, zero, cache), gi = gh_raw(g_gpu, inv, (size_t)(hd / 2) * 4),
           gp = gh_raw(g_gpu, pos, (size_t)n * 4), gs = gh_raw(g_gpu, seq, (size_t)n * 4);
    CHECK_OK(g_cpu->ops.rope(g_cpu, cq.p, cp.p, ci.p, n, nh, hd));
    CHECK_OK(g_cpu->ops.rope(g_cpu, ck.p, cp.p, ci.p, n, nkv, hd));
    CHECK_OK(g_cpu->ops.kv_store(g_cpu, ckc.p, cvc.p, ck.p, cv.p, cs.p, cp.p, n, nkv, hd, ctx));
    CHECK(g_gpu->ops.rope_kv_store != NULL);
    CHECK_OK(g_gpu->ops.rope_kv_store(g_gpu, gq.p, gk.p, gv.p, gkc.p, gvc.p, gs.p, gp.p, gi.p, n,
                                      nh, nkv, hd, ctx));
    float *got = malloc((size_t)(cache > n * nh * hd ? cache : n * nh * hd) * 4);
    char what[128];
    struct { gh_buf *g, *c; int64_t cnt; const char *nm; } cmp[4] = {
        {&gq, &cq, n * nh * hd, "q"}, {&gk, &ck, n * nkv * hd, "k"}, {&gkc, &ckc, cache, "k_cache"},
        {&gvc, &cvc, cache, "v_cache"}};
    for (int i = 0; i < 4; i++) {
        gh_read_act(g_gpu, cmp[i].g->p, got, cmp[i].cnt);
        snprintf(what, sizeof what, "rope_kv_store %s n=%lld heads=%lld/%lld hd=%lld", cmp[i].nm,
                 (long long)n, (long long)nh, (long long)nkv, (long long)hd);
        gh_compare(what, got, cmp[i].c->p, cmp[i].cnt, 0x1p-9, 0x1p-7);
    }
    gh_buf *all[] = {&gq, &gk, &gv, &gkc, &gvc, &gi, &gp, &gs};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) gh_free_checked(g_gpu, all[i], "rope_kv buf");
    gh_buf *callb[] = {&cq, &ck, &cv, &ckc, &cvc, &ci, &cp, &cs};
    for (size_t i = 0; i < sizeof callb / sizeof callb[0]; i++) gh_free_checked(g_cpu, callb[i], "cpu buf");
    free(got); free(q); free(k); free(v); free(inv); free(pos); free(seq); free(zero);
}

/* nf4_linear_multi at n = 1 under the streaming kernel (variant 4) and the register kernel
 * (variant 2), each against the CPU; variant 4 run twice must give the same bytes. With `up`, the
 * SwiGLU-fused single-matrix op instead. */
static void test_variants(int k, const int64_t *rows, int64_t cols, int dq, int with_bias, int swiglu) {
    wpair w[3];
    float *bias[3] = {0}, *ref[3] = {0};
    gh_buf gb[3], gy[3];
    float *x = randv(cols, 1.0f), *u = randv(cols, 1.0f);
    x[3] = -300.0f; /* a large activation in the middle of a 32-column unit */
    gh_buf cx = gh_act(g_cpu, x, cols), gx = gh_act(g_gpu, x, cols);
    gh_buf cu = gh_act(g_cpu, u, cols), gu = gh_act(g_gpu, u, cols);
    if (swiglu) CHECK_OK(g_cpu->ops.swiglu(g_cpu, cx.p, cx.p, cu.p, cols));
    for (int i = 0; i < k; i++) {
        make_w(&w[i], rows[i], cols, dq);
        bias[i] = randv(rows[i], 0.1f);
        gh_buf cb = gh_raw(g_cpu, bias[i], (size_t)rows[i] * 4);
        gb[i] = gh_raw(g_gpu, bias[i], (size_t)rows[i] * 4);
        gh_buf cy = gh_alloc(g_cpu, (size_t)rows[i] * 4);
        CHECK_OK(g_cpu->ops.nf4_linear(g_cpu, cy.p, cx.p, &w[i].cpu, with_bias ? cb.p : NULL, 1));
        ref[i] = malloc((size_t)rows[i] * 4);
        memcpy(ref[i], cy.p, (size_t)rows[i] * 4);
        gh_free_checked(g_cpu, &cy, "cpu y");
        gh_free_checked(g_cpu, &cb, "cpu bias");
        gy[i] = gh_alloc(g_gpu, (size_t)rows[i] * 2);
    }
    static const int variants[3] = {4, 4, 2};
    uint16_t *first[3] = {0};
    for (int vi = 0; vi < 3; vi++) {
        qlr_cuda_set_gemv1_variant(g_gpu, variants[vi]);
        void *ys[3];
        const qlr_nf4 *ws[3];
        const float *bs[3];
        for (int i = 0; i < k; i++) ys[i] = gy[i].p, ws[i] = &w[i].gpu, bs[i] = with_bias ? gb[i].p : NULL;
        if (swiglu)
            CHECK_OK(g_gpu->ops.swiglu_nf4_linear(g_gpu, ys[0], gx.p, gu.p, ws[0], bs[0], 1));
        else
            CHECK_OK(g_gpu->ops.nf4_linear_multi(g_gpu, k, ys, gx.p, ws, bs, 1));
        for (int i = 0; i < k; i++) {
            float *got = malloc((size_t)rows[i] * 4);
            gh_read_act(g_gpu, gy[i].p, got, rows[i]);
            char what[160];
            snprintf(what, sizeof what, "n=1 variant %d%s k=%d #%d [%lld,%lld] dq=%d%s", variants[vi],
                     swiglu ? " swiglu" : "", k, i, (long long)rows[i], (long long)cols, dq,
                     with_bias ? " bias" : "");
            double rms = gh_rms(ref[i], rows[i]);
            /* as test_multi: bf16 output rounding plus f16 products (2^-11 each); with SwiGLU
             * also the bf16 rounding of silu(g)·u that the CPU reference keeps in f32 (as
             * test_swiglu_linear) */
            double tol = swiglu ? 0x1p-6 : 0x1p-7;
            gh_compare(what, got, ref[i], rows[i], rms * tol, tol);
            uint16_t *raw = malloc((size_t)rows[i] * 2);
            CHECK_OK(g_gpu->mem.d2h(g_gpu, raw, gy[i].p, (size_t)rows[i] * 2));
            CHECK_OK(g_gpu->mem.sync(g_gpu));
            if (vi == 0) first[i] = raw;
            else {
                if (vi == 1) CHECK_MSG(!memcmp(first[i], raw, (size_t)rows[i] * 2), "%s: two runs differ", what);
                free(raw);
            }
            free(got);
        }
    }
    qlr_cuda_set_gemv1_variant(g_gpu, 4);
    for (int i = 0; i < k; i++) {
        gh_free_checked(g_gpu, &gy[i], "y");
        gh_free_checked(g_gpu, &gb[i], "bias");
        free(first[i]);
        free(ref[i]);
        free(bias[i]);
        free_w(&w[i]);
    }
    gh_free_checked(g_gpu, &gx, "x");
    gh_free_checked(g_cpu, &cx, "cpu x");
    gh_free_checked(g_gpu, &gu, "up");
    gh_free_checked(g_cpu, &cu, "cpu up");
    free(x);
    free(u);
}

/* qlr_cuda_nf4_logits (f32 out) against the CPU linear; and its refusal of a shape it cannot take. */
static void test_logits(int64_t rows, int64_t cols, int dq) {
    wpair w;
    make_w(&w, rows, cols, dq);
    float *x = randv(cols, 1.0f);
    gh_buf cx = gh_act(g_cpu, x, cols), gx = gh_act(g_gpu, x, cols);
    gh_buf cy = gh_alloc(g_cpu, (size_t)rows * 4), gy = gh_alloc(g_gpu, (size_t)rows * 4);
    CHECK_OK(g_cpu->ops.nf4_linear(g_cpu, cy.p, cx.p, &w.cpu, NULL, 1));
    qlr_status st = qlr_cuda_nf4_logits(g_gpu, gy.p, gx.p, &w.gpu);
    char what[96];
    snprintf(what, sizeof what, "nf4 logits [%lld,%lld] dq=%d", (long long)rows, (long long)cols, dq);
    if (cols % 1024 == 0) {
        CHECK_OK(st);
        float *got = malloc((size_t)rows * 4);
        CHECK_OK(g_gpu->mem.d2h(g_gpu, got, gy.p, (size_t)rows * 4));
        CHECK_OK(g_gpu->mem.sync(g_gpu));
        /* f32 output: only the f16 products (2^-11 each, 32 per partial sum) */
        gh_compare(what, got, cy.p, rows, gh_rms(cy.p, rows) * 0x1p-9, 0x1p-9);
        free(got);
    } else {
        CHECK_MSG(st == QLR_ERR_UNSUPPORTED, "%s: expected QLR_ERR_UNSUPPORTED, got %d", what, (int)st);
    }
    gh_free_checked(g_gpu, &gy, what);
    gh_free_checked(g_cpu, &cy, "cpu y");
    gh_free_checked(g_gpu, &gx, "x");
    gh_free_checked(g_cpu, &cx, "cpu x");
    free(x);
    free_w(&w);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    static const int64_t qkv[3] = {576, 192, 192}, odd[3] = {130, 33, 4}, gu[2] = {1536, 1536};
    static const int64_t big[3] = {4096, 1024, 1024}, ffn[2] = {1000, 258};
    for (int dq = 0; dq <= 1; dq++) {
        test_multi(3, qkv, 576, 1, dq, 1);
        test_multi(3, odd, 1088, 1, dq, dq);
        test_multi(2, gu, 576, 1, dq, 0);
    }
    test_multi(3, big, 4096, 1, 1, 0);
    test_multi(2, ffn, 14336, 1, 1, 1);
    test_multi(3, qkv, 576, 3, 1, 1);  /* n > 1: per-matrix fallback */
    test_multi(1, odd, 100, 1, 1, 0);  /* cols % 32 != 0: not fusable */
    /* streaming-kernel shapes (>= 128 Ki weights per matrix): partial last tiles, 96 units (5
     * row partitions of 480 threads), two units per thread (28672), fewer tiles than SMs */
    static const int64_t s3[3] = {200, 1001, 129}, s2[2] = {4099, 43}, s1[1] = {513};
    static const int64_t s7[1] = {7}, s77[1] = {77}, s300[1] = {300};
    for (int dq = 0; dq <= 1; dq++) {
        test_variants(3, s3, 1024, dq, 1, 0);
        test_variants(2, s2, 3072, dq, dq, 0);
    }
    test_variants(1, s1, 28672, 1, 1, 0);
    test_variants(1, s300, 2048, 1, 0, 0);
    test_variants(1, s300, 14336, 1, 1, 1);    /* SwiGLU fused */
    test_variants(1, s77, 28672, 0, 0, 1);
    test_variants(3, big, 4096, 1, 1, 0);
    test_variants(1, s7, 576, 1, 1, 0);        /* not a multiple of 1024: register kernel */
    test_variants(1, s7, 2048, 1, 1, 0);       /* one partial tile, a second-level table of one float */
    test_logits(5000, 4096, 1);
    test_logits(1001, 1024, 0);
    test_logits(64, 576, 1);
    test_swiglu_linear(576, 1536, 1);
    test_swiglu_linear(130, 3104, 1);
    test_swiglu_linear(4096, 14336, 1);
    test_swiglu_linear(64, 1536, 2);
    static const int64_t nd[][2] = {{1, 576}, {5, 576}, {1, 4096}, {3, 100}, {2, 8200}};
    for (size_t i = 0; i < sizeof nd / sizeof nd[0]; i++) test_add_rmsnorm(nd[i][0], nd[i][1]);
    test_rope_kv(1, 32, 8, 128, 1024, 1);
    test_rope_kv(5, 9, 3, 64, 64, 2);
    test_rope_kv(7, 4, 4, 128, 8192, 3);
    gh_done();
    return test_finish();
}
