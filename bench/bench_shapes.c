/* bench/bench_shapes.c: see bench_shapes.h. */
#include "bench/bench_shapes.h"

#include <string.h>

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

int qlr_bench_shape(const char *name, qlr_model_config *out) {
    if (!strcmp(name, "llama3-8b") || !strcmp(name, "llama3.1-8b")) {
        /* llama3 RoPE scaling: factor 8, low 1, high 4, original 8192 */
        *out = llama_config(128256, 4096, 32, 32, 8, 128, 14336, 131072, 500000.0f, 0);
        out->rope_scaling = QLR_ROPE_SCALING_LLAMA3;
        out->rope_factor = 8;
        out->rope_low_freq_factor = 1;
        out->rope_high_freq_factor = 4;
        out->rope_orig_ctx = 8192;
        return 1;
    }
    if (!strcmp(name, "smollm2-135m")) {
        *out = llama_config(49152, 576, 30, 9, 3, 64, 1536, 8192, 100000.0f, 1);
        return 1;
    }
    return 0;
}
