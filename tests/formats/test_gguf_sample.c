/* tests/formats/test_gguf_sample.c: see test_gguf_sample.h. */
#include "tests/formats/test_gguf_sample.h"

#include <stdlib.h>

#include "tests/test_util.h"

typedef struct sample_tensor {
    const char *name;
    uint32_t type, n_dims;
    uint64_t ne[4];
} sample_tensor;

static const sample_tensor g_tensors[] = {
    {"token_embd.weight", QLR_GGML_F32, 2, {4, 3}},
    {"blk.0.attn_norm.weight", QLR_GGML_F16, 1, {8}},
    {"blk.0.ffn_norm.weight", QLR_GGML_BF16, 3, {2, 2, 2}},
    {"blk.0.attn_q.weight", QLR_GGML_Q4_0, 2, {64, 2}},
    {"blk.0.attn_k.weight", QLR_GGML_Q4_1, 1, {32}},
    {"blk.0.attn_v.weight", QLR_GGML_Q8_0, 2, {32, 3}},
    {"blk.0.ffn_up.weight", QLR_GGML_Q4_K, 1, {256}},
    {"blk.0.ffn_down.weight", QLR_GGML_Q6_K, 2, {256, 2}},
    {"blk.0.positions", QLR_GGML_I32, 4, {5, 1, 1, 1}},
};
#define N_SAMPLE_TENSORS (sizeof g_tensors / sizeof g_tensors[0])

static uint8_t *g_bufs[N_SAMPLE_TENSORS];

qlr_status gguf_sample_fill(qlr_gguf_writer *w) {
    uint8_t u8 = 200, b = 1;
    int8_t i8 = -100;
    uint16_t u16 = 60000;
    int16_t i16 = -30000;
    int64_t i64 = -(1ll << 60);
    QLR_TRY(qlr_gguf_set_str(w, "general.architecture", "llama"));
    QLR_TRY(qlr_gguf_set_scalar(w, "t.u8", QLR_GGUF_UINT8, &u8));
    QLR_TRY(qlr_gguf_set_scalar(w, "t.i8", QLR_GGUF_INT8, &i8));
    QLR_TRY(qlr_gguf_set_scalar(w, "t.u16", QLR_GGUF_UINT16, &u16));
    QLR_TRY(qlr_gguf_set_scalar(w, "t.i16", QLR_GGUF_INT16, &i16));
    QLR_TRY(qlr_gguf_set_u32(w, "t.u32", 4000000000u));
    QLR_TRY(qlr_gguf_set_i32(w, "t.i32", -2000000000));
    QLR_TRY(qlr_gguf_set_f32(w, "t.f32", 1.5f));
    QLR_TRY(qlr_gguf_set_bool(w, "t.bool", 1));
    QLR_TRY(qlr_gguf_set_scalar(w, "t.bool2", QLR_GGUF_BOOL, &b));
    QLR_TRY(qlr_gguf_set_str(w, "t.str", "h\xc3\xa9llo\nworld \"quoted\""));
    QLR_TRY(qlr_gguf_set_str(w, "t.str_empty", ""));
    QLR_TRY(qlr_gguf_set_u64(w, "t.u64", 1ull << 60));
    QLR_TRY(qlr_gguf_set_scalar(w, "t.i64", QLR_GGUF_INT64, &i64));
    QLR_TRY(qlr_gguf_set_f64(w, "t.f64", 3.25));

    uint8_t au8[3] = {0, 1, 255};
    int8_t ai8[3] = {-128, 0, 127};
    uint16_t au16[2] = {1, 65535};
    int16_t ai16[2] = {-32768, 32767};
    uint32_t au32[4] = {1, 2, 3, 0xFFFFFFFFu};
    int32_t ai32[2] = {-1, 7};
    float af32[3] = {0.5f, -2.0f, 1e30f};
    uint8_t abool[2] = {1, 0};
    uint64_t au64[2] = {0, ~0ull};
    int64_t ai64[2] = {INT64_MIN, INT64_MAX};
    double af64[2] = {-0.25, 1e300};
    QLR_TRY(qlr_gguf_set_arr(w, "a.u8", QLR_GGUF_UINT8, au8, 3));
    QLR_TRY(qlr_gguf_set_arr(w, "a.i8", QLR_GGUF_INT8, ai8, 3));
    QLR_TRY(qlr_gguf_set_arr(w, "a.u16", QLR_GGUF_UINT16, au16, 2));
    QLR_TRY(qlr_gguf_set_arr(w, "a.i16", QLR_GGUF_INT16, ai16, 2));
    QLR_TRY(qlr_gguf_set_arr(w, "a.u32", QLR_GGUF_UINT32, au32, 4));
    QLR_TRY(qlr_gguf_set_arr(w, "a.i32", QLR_GGUF_INT32, ai32, 2));
    QLR_TRY(qlr_gguf_set_arr(w, "a.f32", QLR_GGUF_FLOAT32, af32, 3));
    QLR_TRY(qlr_gguf_set_arr(w, "a.bool", QLR_GGUF_BOOL, abool, 2));
    QLR_TRY(qlr_gguf_set_arr(w, "a.u64", QLR_GGUF_UINT64, au64, 2));
    QLR_TRY(qlr_gguf_set_arr(w, "a.i64", QLR_GGUF_INT64, ai64, 2));
    QLR_TRY(qlr_gguf_set_arr(w, "a.f64", QLR_GGUF_FLOAT64, af64, 2));
    QLR_TRY(qlr_gguf_set_arr(w, "a.empty", QLR_GGUF_UINT32, NULL, 0));
    const char *strs[4] = {"<s>", "", "\xc4\xa0the", "a b"};
    QLR_TRY(qlr_gguf_set_arr_str(w, "a.str", strs, 4));

    uint64_t rng = 1234;
    for (size_t i = 0; i < N_SAMPLE_TENSORS; i++) {
        const sample_tensor *t = &g_tensors[i];
        uint64_t size = t->ne[0] / (uint64_t)qlr_ggml_block_elems(t->type) * qlr_ggml_block_bytes(t->type);
        for (uint32_t d = 1; d < t->n_dims; d++) size *= t->ne[d];
        if (!g_bufs[i]) {
            g_bufs[i] = malloc(size);
            if (!g_bufs[i]) return qlr_errorf(QLR_ERR_NOMEM, "sample: out of memory");
            for (uint64_t k = 0; k < size; k++) g_bufs[i][k] = (uint8_t)test_rng_u64(&rng);
        }
        QLR_TRY(qlr_gguf_add_tensor(w, t->name, t->type, t->n_dims, t->ne, g_bufs[i], size));
    }
    return QLR_OK;
}
