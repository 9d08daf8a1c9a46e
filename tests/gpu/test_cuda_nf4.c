/* tests/gpu/test_cuda_nf4.c: NF4 on the GPU against the host store and the CPU op:
 * dequantization (bit-exact to bf16, with and without double quant, partial last block, odd
 * element counts, zero and extreme blocks), nf4_linear through the fused decode kernel, the
 * dequantize + cuBLASLt path, the tensor-core fused kernel and the automatic choice (1..65
 * tokens, bias), nf4_linear_dx and nf4_lm_head (f32 logits, one token and several). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "quant/nf4.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0x5eed4;

/* A weight matrix with edge blocks: one all-zero block, one with a single huge value, one of
 * tiny values (when large enough). */
static float *make_weights(int64_t rows, int64_t cols) {
    int64_t n = rows * cols;
    float *w = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) w[i] = 0.02f * test_rng_normal(&rng);
    if (n >= 3 * 64) {
        memset(w, 0, 64 * 4);
        w[64 + 5] = 3.0e4f;
        for (int64_t i = 128; i < 192; i++) w[i] = 1e-30f * test_rng_normal(&rng);
    }
    return w;
}

static void test_dequant(int64_t rows, int64_t cols, int dq) {
    char what[96];
    snprintf(what, sizeof what, "dequant [%lld, %lld] dq=%d", (long long)rows, (long long)cols, dq);
    int64_t n = rows * cols;
    float *w = make_weights(rows, cols);
    qlr_nf4 host, dev;
    CHECK_OK(qlr_nf4_quantize(w, rows, cols, dq, &host));
    CHECK_OK(qlr_backend_nf4_upload(g_gpu, &host, &dev, 0));
    float *ref = malloc((size_t)n * 4), *got = malloc((size_t)n * 4);
    qlr_nf4_dequant(&host, ref);
    for (int64_t i = 0; i < n; i++) ref[i] = qlr_bf16_to_f32(qlr_f32_to_bf16(ref[i]));
    gh_buf out = gh_alloc(g_gpu, (size_t)n * 2);
    CHECK_OK(qlr_cuda_nf4_dequant(g_gpu, out.p, &dev));
    gh_read_act(g_gpu, out.p, got, n);
    /* exact: the same f32 product rounded once to bf16 on both sides */
    gh_compare(what, got, ref, n, 0.0, 0.0);
    gh_free_checked(g_gpu, &out, what);
    qlr_backend_nf4_free(g_gpu, &dev);
    qlr_nf4_free(&host);
    free(w);
    free(ref);
    free(got);
}

static const char *path_name(qlr_cuda_nf4_path p) {
    return p == QLR_CUDA_NF4_FUSED ? "fused" : p == QLR_CUDA_NF4_DEQUANT_GEMM ? "dequant+gemm"
         : p == QLR_CUDA_NF4_FUSED_MMA ? "fused-mma" : "auto";
}

static void test_linear(int64_t rows, int64_t cols, int dq, int64_t n, int with_bias) {
    float *w = make_weights(rows, cols);
    qlr_nf4 host, dcpu, dgpu;
    CHECK_OK(qlr_nf4_quantize(w, rows, cols, dq, &host));
    CHECK_OK(qlr_backend_nf4_upload(g_cpu, &host, &dcpu, 0));
    CHECK_OK(qlr_backend_nf4_upload(g_gpu, &host, &dgpu, 0));
    float *x = malloc((size_t)(n * cols) * 4), *bias = malloc((size_t)rows * 4);
    gh_randn_bf16(x, n * cols, 1.0f, &rng);
    for (int64_t i = 0; i < rows; i++) bias[i] = 0.1f * test_rng_normal(&rng);
    float *ref = malloc((size_t)(n * rows) * 4), *got = malloc((size_t)(n * rows) * 4);
    gh_buf cx = gh_act(g_cpu, x, n * cols), cy = gh_alloc(g_cpu, (size_t)(n * rows) * 4);
    gh_buf cb = gh_raw(g_cpu, bias, (size_t)rows * 4);
    CHECK_OK(g_cpu->ops.nf4_linear(g_cpu, cy.p, cx.p, &dcpu, with_bias ? cb.p : NULL, n));
    memcpy(ref, cy.p, (size_t)(n * rows) * 4);
    double rms = gh_rms(ref, n * rows);
    gh_buf gx = gh_act(g_gpu, x, n * cols), gb = gh_raw(g_gpu, bias, (size_t)rows * 4);
    for (int pi = 0; pi < 4; pi++) {
        qlr_cuda_nf4_path path = (qlr_cuda_nf4_path)pi;
        char what[128];
        snprintf(what, sizeof what, "nf4_linear %s [%lld,%lld] dq=%d n=%lld%s", path_name(path),
                 (long long)rows, (long long)cols, dq, (long long)n, with_bias ? " bias" : "");
        gh_buf gy = gh_alloc(g_gpu, (size_t)(n * rows) * 2);
        CHECK_OK(qlr_cuda_nf4_linear_path(g_gpu, gy.p, gx.p, &dgpu, with_bias ? gb.p : NULL, n, path));
        gh_read_act(g_gpu, gy.p, got, n * rows);
        /* bf16 output rounding (2^-9 relative) plus, on the dequant and MMA paths, bf16 weights
         * (2^-9 per weight; the MMA path rounds the table and the absmax too, ~2^-8; errors
         * average over the row): 2^-7 of the output RMS and 2^-7 relative */
        gh_compare(what, got, ref, n * rows, rms * 0x1p-7, 0x1p-7);
        gh_free_checked(g_gpu, &gy, what);
    }
    if (rows % 8 == 0 && cols % 8 == 0) {
        /* dx [n, cols] = dy [n, rows] · W */
        float *dy = malloc((size_t)(n * rows) * 4), *dref = malloc((size_t)(n * cols) * 4);
        float *dgot = malloc((size_t)(n * cols) * 4);
        gh_randn_bf16(dy, n * rows, 1.0f, &rng);
        gh_buf cdy = gh_act(g_cpu, dy, n * rows), cdx = gh_alloc(g_cpu, (size_t)(n * cols) * 4);
        CHECK_OK(g_cpu->ops.nf4_linear_dx(g_cpu, cdx.p, cdy.p, &dcpu, n));
        memcpy(dref, cdx.p, (size_t)(n * cols) * 4);
        gh_buf gdy = gh_act(g_gpu, dy, n * rows), gdx = gh_alloc(g_gpu, (size_t)(n * cols) * 2);
        CHECK_OK(g_gpu->ops.nf4_linear_dx(g_gpu, gdx.p, gdy.p, &dgpu, n));
        gh_read_act(g_gpu, gdx.p, dgot, n * cols);
        char what[128];
        snprintf(what, sizeof what, "nf4_linear_dx [%lld,%lld] dq=%d n=%lld", (long long)rows,
                 (long long)cols, dq, (long long)n);
        gh_compare(what, dgot, dref, n * cols, gh_rms(dref, n * cols) * 0x1p-7, 0x1p-7);
        gh_free_checked(g_gpu, &gdx, what);
        gh_free_checked(g_gpu, &gdy, "dy");
        gh_free_checked(g_cpu, &cdx, "cpu dx");
        gh_free_checked(g_cpu, &cdy, "cpu dy");
        free(dy);
        free(dref);
        free(dgot);
    }
    gh_free_checked(g_gpu, &gx, "x");
    gh_free_checked(g_gpu, &gb, "bias");
    gh_free_checked(g_cpu, &cx, "cpu x");
    gh_free_checked(g_cpu, &cy, "cpu y");
    gh_free_checked(g_cpu, &cb, "cpu bias");
    qlr_backend_nf4_free(g_gpu, &dgpu);
    qlr_backend_nf4_free(g_cpu, &dcpu);
    qlr_nf4_free(&host);
    free(w);
    free(x);
    free(bias);
    free(ref);
    free(got);
}

/* The nf4_lm_head op (f32 logits from an NF4 output projection) against the CPU op: the
 * streaming one-token kernel (cols a multiple of 1024) and the dequantize + GEMM path. */
static void test_lm_head(int64_t rows, int64_t cols, int dq, int64_t n) {
    float *w = make_weights(rows, cols);
    qlr_nf4 host, dcpu, dgpu;
    CHECK_OK(qlr_nf4_quantize(w, rows, cols, dq, &host));
    CHECK_OK(qlr_backend_nf4_upload(g_cpu, &host, &dcpu, 0));
    CHECK_OK(qlr_backend_nf4_upload(g_gpu, &host, &dgpu, 0));
    float *x = malloc((size_t)(n * cols) * 4);
    gh_randn_bf16(x, n * cols, 1.0f, &rng);
    float *ref = malloc((size_t)(n * rows) * 4), *got = malloc((size_t)(n * rows) * 4);
    gh_buf cx = gh_act(g_cpu, x, n * cols), cy = gh_alloc(g_cpu, (size_t)(n * rows) * 4);
    CHECK_OK(g_cpu->ops.nf4_lm_head(g_cpu, cy.p, cx.p, &dcpu, n));
    memcpy(ref, cy.p, (size_t)(n * rows) * 4);
    gh_buf gx = gh_act(g_gpu, x, n * cols), gy = gh_alloc(g_gpu, (size_t)(n * rows) * 4);
    CHECK_OK(g_gpu->ops.nf4_lm_head(g_gpu, gy.p, gx.p, &dgpu, n));
    CHECK_OK(g_gpu->mem.d2h(g_gpu, got, gy.p, (size_t)(n * rows) * 4));
    CHECK_OK(g_gpu->mem.sync(g_gpu));
    char what[128];
    snprintf(what, sizeof what, "nf4_lm_head [%lld,%lld] dq=%d n=%lld", (long long)rows,
             (long long)cols, dq, (long long)n);
    /* f32 output; bf16 weights on the GEMM path (2^-9 per weight, averaging over the row) */
    gh_compare(what, got, ref, n * rows, gh_rms(ref, n * rows) * 0x1p-7, 0x1p-7);
    gh_free_checked(g_gpu, &gy, what);
    gh_free_checked(g_gpu, &gx, "x");
    gh_free_checked(g_cpu, &cx, "cpu x");
    gh_free_checked(g_cpu, &cy, "cpu y");
    qlr_backend_nf4_free(g_gpu, &dgpu);
    qlr_backend_nf4_free(g_cpu, &dcpu);
    qlr_nf4_free(&host);
    free(w);
    free(x);
    free(ref);
    free(got);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    static const int64_t dshapes[][2] = {{1, 64}, {3, 100}, {5, 7}, {1, 1}, {64, 576},
                                         {1536, 576}, {512, 4096}, {300, 1000}};
    for (size_t i = 0; i < sizeof dshapes / sizeof dshapes[0]; i++)
        for (int dq = 0; dq <= 1; dq++) test_dequant(dshapes[i][0], dshapes[i][1], dq);

    static const int64_t lshapes[][2] = {{96, 64}, {33, 100}, {64, 576}, {1536, 576}, {576, 1536},
                                         {256, 4096}, {128, 14336}, {200, 3104}};
    static const int64_t ns[] = {1, 3, 5, 8, 12, 17, 33, 64, 65};
    for (size_t i = 0; i < sizeof lshapes / sizeof lshapes[0]; i++)
        for (size_t j = 0; j < sizeof ns / sizeof ns[0]; j++)
            test_linear(lshapes[i][0], lshapes[i][1], (int)((i + j) & 1), ns[j], j == 2 || j == 5);
    test_linear(4096, 4096, 1, 1, 0);
    test_linear(1024, 4096, 1, 64, 0);
    test_lm_head(1000, 1024, 1, 1);
    test_lm_head(3000, 4096, 0, 1);
    test_lm_head(1000, 576, 1, 1);
    test_lm_head(1000, 1024, 1, 3);
    gh_done();
    return test_finish();
}
