/* bench/bench_common.c: see bench_common.h. */
#include "bench/bench_common.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/core.h"
#ifdef QLR_BACKEND_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

static qlr_model_config llama_config(int32_t vocab, int32_t d, int32_t layers, int32_t heads,
                                     int32_t kv, int32_t hd, int32_t ff, int32_t ctx, float theta,
                                     int tied) {
    qlr_model_config c;
    memset(&c, 0, sizeof c);
    strcpy(c.arch, "llama");
    c.n_vocab = vocab;
    c.d_model = d;
    c.n_layers = layers;
    c.n_heads = heads;
    c.n_kv_heads = kv;
    c.head_dim = hd;
    c.d_ff = ff;
    c.ctx_train = ctx;
    c.rms_eps = 1e-5f;
    c.rope_theta = theta;
    c.tied_embeddings = tied;
    return c;
}

qlr_status qlr_bench_model_config(const char *name, qlr_model_config *cfg, const char **plan_name) {
    if (!strcasecmp(name, "llama3.1-8b") || !strcasecmp(name, "llama3-8b")) {
        /* llama3 RoPE scaling: factor 8, low 1, high 4, original 8192 */
        *cfg = llama_config(128256, 4096, 32, 32, 8, 128, 14336, 131072, 500000.0f, 0);
        cfg->rope_scaling = QLR_ROPE_SCALING_LLAMA3;
        cfg->rope_factor = 8;
        cfg->rope_low_freq_factor = 1;
        cfg->rope_high_freq_factor = 4;
        cfg->rope_orig_ctx = 8192;
        if (plan_name) *plan_name = "Llama-3.1-8B";
        return QLR_OK;
    }
    if (!strcasecmp(name, "smollm2-135m")) {
        *cfg = llama_config(49152, 576, 30, 9, 3, 64, 1536, 8192, 100000.0f, 1);
        if (plan_name) *plan_name = "SmolLM2-135M";
        return QLR_OK;
    }
    return qlr_errorf(QLR_ERR_NOT_FOUND, "unknown shape '%s' (known: llama3.1-8b, smollm2-135m)", name);
}

qlr_status qlr_bench_gemm_bf16_tflops(qlr_backend *be, double *tflops) {
    *tflops = 0;
#ifdef QLR_BACKEND_CUDA
    if (be->kind != QLR_DEVICE_CUDA) return QLR_OK;
    const int64_t N = 8192;
    const size_t el = (size_t)(N * N);
    void *a = be->mem.alloc(be, el * 2), *b = be->mem.alloc(be, el * 2), *c = be->mem.alloc(be, el * 2);
    uint16_t *h = malloc(el * 2);
    qlr_status st = a && b && c ? QLR_OK : qlr_error_status();
    if (st == QLR_OK && !h) st = qlr_errorf(QLR_ERR_NOMEM, "bench: host buffer");
    /* values of about unit scale (never zeros: they run faster than real data on some GPUs) */
    uint64_t s = 0x9e3779b97f4a7c15ull;
    for (int m = 0; m < 2 && st == QLR_OK; m++) {
        for (size_t i = 0; i < el; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            h[i] = qlr_f32_to_bf16((float)((s >> 11) & 0xffffff) / 8388608.0f - 1.0f);
        }
        st = be->mem.h2d(be, m ? b : a, h, el * 2);
        if (st == QLR_OK) st = be->mem.sync(be);
    }
    for (int i = 0; i < 3 && st == QLR_OK; i++) st = qlr_cuda_gemm_bf16(be, c, a, b, N, N, N, 0);
    if (st == QLR_OK) st = be->mem.sync(be);
    const int reps = 20;
    double t0 = qlr_now();
    for (int i = 0; i < reps && st == QLR_OK; i++) st = qlr_cuda_gemm_bf16(be, c, a, b, N, N, N, 0);
    if (st == QLR_OK) st = be->mem.sync(be);
    double t = qlr_now() - t0;
    if (st == QLR_OK) *tflops = 2.0 * (double)N * N * N * reps / t / 1e12;
    free(h);
    if (a) be->mem.free(be, a);
    if (b) be->mem.free(be, b);
    if (c) be->mem.free(be, c);
    return st;
#else
    (void)be;
    return QLR_OK;
#endif
}

/* OpenBLAS's thread control (not in cblas.h of every BLAS; the build links OpenBLAS). */
void openblas_set_num_threads(int n);
int openblas_get_num_threads(void);

double qlr_bench_sgemm_gflops(int threads, int m, int n, int k, double seconds) {
    float *a = malloc(sizeof(float) * (size_t)m * (size_t)k);
    float *b = malloc(sizeof(float) * (size_t)n * (size_t)k);
    float *c = malloc(sizeof(float) * (size_t)m * (size_t)n);
    double best = 0.0;
    if (a && b && c) {
        for (size_t i = 0; i < (size_t)m * (size_t)k; i++) a[i] = (float)((i * 7919u) % 1000) * 1e-3f - 0.5f;
        for (size_t i = 0; i < (size_t)n * (size_t)k; i++) b[i] = (float)((i * 104729u) % 1000) * 1e-3f - 0.5f;
        int before = openblas_get_num_threads();
        openblas_set_num_threads(threads);
        double flops = 2.0 * m * n * k, t_end = qlr_now() + seconds;
        for (int rep = 0; rep < 3 || qlr_now() < t_end; rep++) {
            double t0 = qlr_now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, b, k, 0.0f,
                        c, n);
            double dt = qlr_now() - t0;
            if (rep > 0 && dt > 0 && flops / dt > best) best = flops / dt; /* rep 0 warms up */
        }
        openblas_set_num_threads(before);
    }
    free(a);
    free(b);
    free(c);
    return best * 1e-9;
}
