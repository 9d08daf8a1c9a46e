/* tests/gpu/test_cuda_ops.c: the row-wise and elementwise CUDA ops and the bf16-table products
 * against the CPU reference: embedding, get_rows, RMSNorm (+ backward), RoPE (+ backward; head
 * dims 64 and 128, large positions), SwiGLU (+ backward), residual add, lm_head and the LoRA
 * hook, on odd sizes, a single row, and edge values (large magnitudes, zeros). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0x0e5;

/* Runs one act-in/act-out op on both backends and compares. `fn` calls the op on a backend
 * with its device buffers. */
#define BOTH(be, body) do { qlr_backend *be = g_cpu; body; be = g_gpu; body; } while (0)

static float *randv(int64_t n, float s) {
    float *x = malloc((size_t)(n ? n : 1) * 4);
    gh_randn_bf16(x, n, s, &rng);
    return x;
}

static void test_embedding(int64_t vocab, int64_t d, int64_t n) {
    float *tab = randv(vocab * d, 1.0f);
    uint16_t *tb = malloc((size_t)(vocab * d) * 2);
    qlr_f32_to_bf16_row(tab, tb, (size_t)(vocab * d));
    int32_t *ids = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(test_rng_u64(&rng) % (uint64_t)vocab);
    if (n > 1) ids[0] = 0, ids[n - 1] = (int32_t)(vocab - 1);
    float *ref = malloc((size_t)(n * d) * 4), *got = malloc((size_t)(n * d) * 4);
    gh_buf ct = gh_raw(g_cpu, tb, (size_t)(vocab * d) * 2), ci = gh_raw(g_cpu, ids, (size_t)n * 4);
    gh_buf co = gh_alloc(g_cpu, (size_t)(n * d) * 4);
    CHECK_OK(g_cpu->ops.embedding(g_cpu, co.p, ct.p, ci.p, n, d, vocab));
    memcpy(ref, co.p, (size_t)(n * d) * 4);
    gh_buf gt = gh_raw(g_gpu, tb, (size_t)(vocab * d) * 2), gi = gh_raw(g_gpu, ids, (size_t)n * 4);
    gh_buf go = gh_alloc(g_gpu, (size_t)(n * d) * 2);
    CHECK_OK(g_gpu->ops.embedding(g_gpu, go.p, gt.p, gi.p, n, d, vocab));
    gh_read_act(g_gpu, go.p, got, n * d);
    char what[96];
    snprintf(what, sizeof what, "embedding vocab=%lld d=%lld n=%lld", (long long)vocab, (long long)d,
             (long long)n);
    gh_compare(what, got, ref, n * d, 0, 0); /* a copy: exact */
    gh_free_checked(g_gpu, &go, what);
    /* get_rows on act rows: the same gather */
    gh_buf gsrc = gh_act(g_gpu, tab, vocab * d), gdst = gh_alloc(g_gpu, (size_t)(n * d) * 2);
    CHECK_OK(g_gpu->ops.get_rows(g_gpu, gdst.p, gsrc.p, gi.p, n, d));
    gh_read_act(g_gpu, gdst.p, got, n * d);
    snprintf(what, sizeof what, "get_rows d=%lld n=%lld", (long long)d, (long long)n);
    gh_compare(what, got, ref, n * d, 0, 0);
    gh_free_checked(g_gpu, &gdst, what);
    gh_free_checked(g_gpu, &gsrc, "src");
    gh_free_checked(g_gpu, &gt, "table");
    gh_free_checked(g_gpu, &gi, "ids");
    gh_free_checked(g_cpu, &ct, "table");
    gh_free_checked(g_cpu, &ci, "ids");
    gh_free_checked(g_cpu, &co, "out");
    free(tab); free(tb); free(ids); free(ref); free(got);
}

static void test_rmsnorm(int64_t n, int64_t d, float scale) {
    float *x = randv(n * d, scale), *w = malloc((size_t)d * 4), *dy = randv(n * d, 1.0f);
    for (int64_t j = 0; j < d; j++) w[j] = 1.0f + 0.1f * test_rng_normal(&rng);
    float *ref = malloc((size_t)(n * d) * 4), *got = malloc((size_t)(n * d) * 4);
    char what[96];
    for (int bwd = 0; bwd <= 1; bwd++) {
        gh_buf bx[2], by[2], bw[2], bdy[2];
        for (int k = 0; k < 2; k++) {
            qlr_backend *be = k ? g_gpu : g_cpu;
            bx[k] = gh_act(be, x, n * d);
            bdy[k] = gh_act(be, dy, n * d);
            by[k] = gh_alloc(be, (size_t)(n * d) * qlr_backend_act_size(be));
            bw[k] = gh_raw(be, w, (size_t)d * 4);
            if (bwd)
                CHECK_OK(be->ops.rmsnorm_bwd(be, by[k].p, bdy[k].p, bx[k].p, bw[k].p, n, d, 1e-5f));
            else
                CHECK_OK(be->ops.rmsnorm(be, by[k].p, bx[k].p, bw[k].p, n, d, 1e-5f));
            gh_read_act(be, by[k].p, k ? got : ref, n * d);
        }
        snprintf(what, sizeof what, "rmsnorm%s n=%lld d=%lld scale=%g", bwd ? "_bwd" : "",
                 (long long)n, (long long)d, scale);
        /* f32 math on identical inputs, one bf16 rounding of the output: 2^-8 relative; the
         * backward subtracts two terms, so add an absolute 2^-8 of the output RMS */
        gh_compare(what, got, ref, n * d, gh_rms(ref, n * d) * 0x1p-8, 0x1p-8);
        for (int k = 0; k < 2; k++) {
            qlr_backend *be = k ? g_gpu : g_cpu;
            gh_free_checked(be, &by[k], what);
            gh_free_checked(be, &bx[k], "x");
            gh_free_checked(be, &bw[k], "w");
            gh_free_checked(be, &bdy[k], "dy");
        }
    }
    free(x); free(w); free(dy); free(ref); free(got);
}

static void test_rope(int64_t n, int64_t heads, int64_t hd, int32_t max_pos) {
    float *x = randv(n * heads * hd, 1.0f), *inv = malloc((size_t)(hd / 2) * 4);
    int32_t *pos = malloc((size_t)n * 4);
    for (int64_t j = 0; j < hd / 2; j++) inv[j] = powf(500000.0f, -2.0f * (float)j / (float)hd);
    for (int64_t t = 0; t < n; t++) pos[t] = (int32_t)(test_rng_u64(&rng) % (uint64_t)(max_pos + 1));
    pos[0] = 0;
    if (n > 1) pos[n - 1] = max_pos;
    int64_t tot = n * heads * hd;
    float *ref = malloc((size_t)tot * 4), *got = malloc((size_t)tot * 4);
    for (int bwd = 0; bwd <= 1; bwd++) {
        for (int k = 0; k < 2; k++) {
            qlr_backend *be = k ? g_gpu : g_cpu;
            gh_buf bx = gh_act(be, x, tot), bp = gh_raw(be, pos, (size_t)n * 4);
            gh_buf bi = gh_raw(be, inv, (size_t)(hd / 2) * 4);
            if (bwd) CHECK_OK(be->ops.rope_bwd(be, bx.p, bp.p, bi.p, n, heads, hd));
            else CHECK_OK(be->ops.rope(be, bx.p, bp.p, bi.p, n, heads, hd));
            gh_read_act(be, bx.p, k ? got : ref, tot);
            gh_free_checked(be, &bx, "rope x");
            gh_free_checked(be, &bp, "pos");
            gh_free_checked(be, &bi, "inv_freq");
        }
        char what[96];
        snprintf(what, sizeof what, "rope%s n=%lld heads=%lld hd=%lld max_pos=%d", bwd ? "_bwd" : "",
                 (long long)n, (long long)heads, (long long)hd, max_pos);
        /* same f32 angle; sincosf vs the host libm differ by an ulp or two; output bf16: 2^-8 */
        gh_compare(what, got, ref, tot, 0x1p-8, 0x1p-8);
    }
    free(x); free(inv); free(pos); free(ref); free(got);
}

static void test_elementwise(int64_t n) {
    float *g = randv(n, 3.0f), *u = randv(n, 1.0f), *d = randv(n, 1.0f);
    if (n > 4) g[0] = 80.0f, g[1] = -80.0f, g[2] = 0.0f, g[3] = 1e-20f;
    float *ref = malloc((size_t)n * 8 + 8), *got = malloc((size_t)n * 8 + 8);
    char what[96];
    /* swiglu */
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bg = gh_act(be, g, n), bu = gh_act(be, u, n);
        gh_buf bo = gh_alloc(be, (size_t)n * qlr_backend_act_size(be));
        CHECK_OK(be->ops.swiglu(be, bo.p, bg.p, bu.p, n));
        gh_read_act(be, bo.p, k ? got : ref, n);
        gh_free_checked(be, &bo, "swiglu out");
        gh_free_checked(be, &bg, "g");
        gh_free_checked(be, &bu, "u");
    }
    snprintf(what, sizeof what, "swiglu n=%lld", (long long)n);
    gh_compare(what, got, ref, n, 1e-6, 0x1p-8); /* one bf16 rounding */
    /* swiglu_bwd: dgate then dup */
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        size_t es = qlr_backend_act_size(be);
        gh_buf bg = gh_act(be, g, n), bu = gh_act(be, u, n), bd = gh_act(be, d, n);
        gh_buf b1 = gh_alloc(be, (size_t)n * es), b2 = gh_alloc(be, (size_t)n * es);
        CHECK_OK(be->ops.swiglu_bwd(be, b1.p, b2.p, bd.p, bg.p, bu.p, n));
        gh_read_act(be, b1.p, k ? got : ref, n);
        gh_read_act(be, b2.p, (k ? got : ref) + n, n);
        gh_free_checked(be, &b1, "dgate");
        gh_free_checked(be, &b2, "dup");
        gh_free_checked(be, &bg, "g");
        gh_free_checked(be, &bu, "u");
        gh_free_checked(be, &bd, "d");
    }
    snprintf(what, sizeof what, "swiglu_bwd n=%lld", (long long)n);
    gh_compare(what, got, ref, 2 * n, 1e-6, 0x1p-8);
    /* add */
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf by = gh_act(be, g, n), bx = gh_act(be, u, n);
        CHECK_OK(be->ops.add(be, by.p, bx.p, n));
        gh_read_act(be, by.p, k ? got : ref, n);
        gh_free_checked(be, &by, "add y");
        gh_free_checked(be, &bx, "add x");
    }
    snprintf(what, sizeof what, "add n=%lld", (long long)n);
    gh_compare(what, got, ref, n, 0, 0x1p-8);
    free(g); free(u); free(d); free(ref); free(got);
}

static void test_lm_head(int64_t n, int64_t d, int64_t vocab) {
    float *x = randv(n * d, 1.0f), *w = randv(vocab * d, 0.05f);
    uint16_t *wb = malloc((size_t)(vocab * d) * 2);
    qlr_f32_to_bf16_row(w, wb, (size_t)(vocab * d));
    float *ref = malloc((size_t)(n * vocab) * 4), *got = malloc((size_t)(n * vocab) * 4);
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_act(be, x, n * d), bw = gh_raw(be, wb, (size_t)(vocab * d) * 2);
        gh_buf bl = gh_alloc(be, (size_t)(n * vocab) * 4);
        CHECK_OK(be->ops.lm_head(be, bl.p, bx.p, bw.p, n, d, vocab));
        CHECK_OK(be->mem.d2h(be, k ? got : ref, bl.p, (size_t)(n * vocab) * 4));
        CHECK_OK(be->mem.sync(be));
        gh_free_checked(be, &bl, "logits");
        gh_free_checked(be, &bx, "x");
        gh_free_checked(be, &bw, "w");
    }
    char what[96];
    snprintf(what, sizeof what, "lm_head n=%lld d=%lld vocab=%lld", (long long)n, (long long)d,
             (long long)vocab);
    /* identical bf16 operands, f32 logits: only the summation order differs (1e-5 of the RMS) */
    gh_compare(what, got, ref, n * vocab, gh_rms(ref, n * vocab) * 1e-4, 1e-4);
    free(x); free(w); free(wb); free(ref); free(got);
}

static void test_lora(int64_t n, int64_t in, int64_t out, int32_t r) {
    float *x = randv(n * in, 1.0f), *y0 = randv(n * out, 1.0f);
    float *a = randv((int64_t)r * in, 0.05f), *b = randv(out * (int64_t)r, 0.05f);
    float *ref = malloc((size_t)(n * out) * 4), *got = malloc((size_t)(n * out) * 4);
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_act(be, x, n * in), by = gh_act(be, y0, n * out);
        gh_buf ba = gh_act(be, a, (int64_t)r * in), bb = gh_act(be, b, out * (int64_t)r);
        qlr_lora_ref l = {ba.p, bb.p, r, 2.0f};
        CHECK_OK(be->ops.lora(be, by.p, bx.p, &l, n, in, out));
        gh_read_act(be, by.p, k ? got : ref, n * out);
        gh_free_checked(be, &by, "lora y");
        gh_free_checked(be, &bx, "x");
        gh_free_checked(be, &ba, "a");
        gh_free_checked(be, &bb, "b");
    }
    char what[96];
    snprintf(what, sizeof what, "lora n=%lld in=%lld out=%lld r=%d", (long long)n, (long long)in,
             (long long)out, r);
    /* the GPU rounds the [n, r] intermediate and y to bf16: 2^-7 of the output RMS */
    gh_compare(what, got, ref, n * out, gh_rms(ref, n * out) * 0x1p-7, 0x1p-7);
    free(x); free(y0); free(a); free(b); free(ref); free(got);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    test_embedding(1000, 576, 7);
    test_embedding(49152, 64, 1);
    test_embedding(37, 13, 5); /* odd row length: the scalar path */
    test_rmsnorm(1, 576, 1.0f);
    test_rmsnorm(7, 4096, 1.0f);
    test_rmsnorm(3, 1001, 100.0f);
    test_rmsnorm(5, 64, 1e-3f);
    test_rope(1, 9, 64, 0);
    test_rope(17, 3, 64, 8191);
    test_rope(33, 32, 128, 131071);
    test_rope(5, 8, 128, 4095);
    test_elementwise(1);
    test_elementwise(1001);
    test_elementwise(1 << 20);
    test_lm_head(1, 576, 49152);
    test_lm_head(5, 4096, 3001);
    test_lora(1, 576, 576, 8);
    test_lora(9, 4096, 1024, 16);
    gh_done();
    return test_finish();
}
