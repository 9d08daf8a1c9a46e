/* tests/formats/test_gguf_demo.c: reads the demo model (SmolLM2-135M-Instruct Q4_1, installed by
 * scripts/setup.sh; path from QLR_DEMO_MODEL) and checks what we know about it: 272 tensors,
 * 30 blocks, 49152 tokens and 48900 merges reachable through the O(1) string-array index, the
 * chat template, tensor types and shapes, and that a rewrite with our writer reads back equal. */
#define _GNU_SOURCE /* memmem */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/gguf.h"
#include "tests/test_util.h"

static const char *demo_path(void) {
    return test_demo_model();
}

static int str_is(const char *s, uint64_t len, const char *want) {
    return len == strlen(want) && !memcmp(s, want, len);
}

int main(void) {
    const char *path = demo_path();
    if (!qlr_path_exists(path)) {
        test_fail_(__FILE__, __LINE__, "demo model %s not found: run scripts/setup.sh (or set QLR_DEMO_MODEL)", path);
        return test_finish();
    }
    qlr_gguf *g = NULL;
    CHECK_OK(qlr_gguf_open(path, &g));
    if (!g) return test_finish();

    CHECK_EQ_INT(qlr_gguf_version(g), 3);
    CHECK_EQ_INT(qlr_gguf_alignment(g), 32);
    CHECK_EQ_INT(qlr_gguf_n_tensors(g), 272);
    uint32_t blocks = 0;
    CHECK_OK(qlr_gguf_get_u32(g, "llama.block_count", &blocks));
    CHECK_EQ_INT(blocks, 30);
    const char *s;
    uint64_t len, n;
    CHECK_OK(qlr_gguf_get_str(g, "general.architecture", &s, &len));
    CHECK(str_is(s, len, "llama"));

    qlr_gguf_type et;
    CHECK_OK(qlr_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n, NULL));
    CHECK(et == QLR_GGUF_STRING);
    CHECK_EQ_INT(n, 49152);
    CHECK_OK(qlr_gguf_get_arr_str(g, "tokenizer.ggml.tokens", 0, &s, &len));
    CHECK(str_is(s, len, "<|endoftext|>"));
    CHECK_OK(qlr_gguf_get_arr_str(g, "tokenizer.ggml.tokens", 49151, &s, &len));
    CHECK(str_is(s, len, "ectable"));
    CHECK_OK(qlr_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n, NULL));
    CHECK_EQ_INT(n, 48900);
    CHECK_OK(qlr_gguf_get_arr_str(g, "tokenizer.ggml.merges", 0, &s, &len));
    CHECK(str_is(s, len, "\xc4\xa0 t"));
    CHECK_OK(qlr_gguf_get_arr_str(g, "tokenizer.ggml.merges", 48899, &s, &len));
    CHECK(str_is(s, len, "ect able"));
    CHECK_OK(qlr_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n, NULL));
    CHECK(et == QLR_GGUF_INT32 && n == 49152);
    CHECK_OK(qlr_gguf_get_str(g, "tokenizer.chat_template", &s, &len));
    CHECK(len > 100 && memmem(s, len, "im_start", 8) != NULL);

    const qlr_gguf_tensor *t = qlr_gguf_find_tensor(g, "token_embd.weight");
    CHECK(t && t->type == QLR_GGML_Q8_0 && t->n_dims == 2 && t->ne[0] == 576 && t->ne[1] == 49152);
    CHECK(t && t->size == 30081024 && t->offset == 0);
    t = qlr_gguf_find_tensor(g, "blk.29.ffn_down.weight");
    CHECK(t && t->type == QLR_GGML_Q4_1 && t->ne[0] == 1536 && t->ne[1] == 576);
    t = qlr_gguf_find_tensor(g, "blk.0.attn_norm.weight");
    CHECK(t && t->type == QLR_GGML_F32 && t->n_dims == 1 && t->ne[0] == 576);
    int n_q41 = 0, n_f32 = 0;
    uint64_t last_end = 0;
    for (int64_t i = 0; i < qlr_gguf_n_tensors(g); i++) {
        t = qlr_gguf_tensor_at(g, i);
        n_q41 += t->type == QLR_GGML_Q4_1;
        n_f32 += t->type == QLR_GGML_F32;
        last_end = qlr_gguf_data_offset(g) + t->offset + t->size;
    }
    CHECK_EQ_INT(n_q41, 210);
    CHECK_EQ_INT(n_f32, 61);
    CHECK(last_end <= qlr_gguf_file_size(g));

    /* rewrite everything with our writer and read it back */
    char out[512];
    snprintf(out, sizeof out, "%s/demo_copy.gguf", test_tmpdir());
    qlr_gguf_writer *w = qlr_gguf_writer_create(qlr_gguf_alignment(g));
    for (int64_t i = 0; i < qlr_gguf_n_kv(g); i++) CHECK_OK(qlr_gguf_copy_kv(w, g, i));
    for (int64_t i = 0; i < qlr_gguf_n_tensors(g); i++) {
        t = qlr_gguf_tensor_at(g, i);
        CHECK_OK(qlr_gguf_add_tensor(w, t->name, t->type, t->n_dims, t->ne, t->data, t->size));
    }
    CHECK_OK(qlr_gguf_writer_write(w, out));
    qlr_gguf_writer_free(w);
    qlr_gguf *g2 = NULL;
    CHECK_OK(qlr_gguf_open(out, &g2));
    if (g2) {
        CHECK_EQ_INT(qlr_gguf_n_kv(g2), qlr_gguf_n_kv(g));
        CHECK_EQ_INT(qlr_gguf_n_tensors(g2), 272);
        CHECK_EQ_INT(qlr_gguf_data_offset(g2), qlr_gguf_data_offset(g));
        int same = 1;
        for (int64_t i = 0; i < qlr_gguf_n_tensors(g); i++) {
            const qlr_gguf_tensor *a = qlr_gguf_tensor_at(g, i), *b = qlr_gguf_tensor_at(g2, i);
            same &= !strcmp(a->name, b->name) && a->offset == b->offset && a->size == b->size &&
                    !memcmp(a->data, b->data, a->size);
        }
        CHECK_MSG(same, "rewritten demo model has different tensors");
        CHECK_OK(qlr_gguf_get_arr_str(g2, "tokenizer.ggml.merges", 48899, &s, &len));
        CHECK(str_is(s, len, "ect able"));
        qlr_gguf_close(g2);
    }
    remove(out);
    qlr_gguf_close(g);
    return test_finish();
}
