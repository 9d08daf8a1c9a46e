/* tests/train/tiny_model.h: a tiny random llama GGUF with a byte-level SentencePiece vocabulary
 * (<unk>, <s>, </s>, <|im_start|>, <|im_end|>, <0x00>..<0xFF>) and tiny JSONL datasets, for the
 * trainer tests. Header-only for the tests of this folder (static functions). */
#ifndef QLR_TESTS_TRAIN_TINY_MODEL_H
#define QLR_TESTS_TRAIN_TINY_MODEL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/gguf.h"
#include "tests/test_util.h"

enum { TINY_D = 64, TINY_NH = 4, TINY_NKV = 2, TINY_HD = 16, TINY_FF = 96, TINY_NL = 2, TINY_VOCAB = 261 };

static float *tiny_rnd(uint64_t *rng, int64_t n, float s, float add) {
    float *p = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) p[i] = test_rng_normal(rng) * s + add;
    return p;
}

/* Writes <tmp>/<file> and returns its path (static buffer). */
static const char *tiny_model_write(const char *file) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", test_tmpdir(), file);
    uint64_t rng = 1234;
    qlr_gguf_writer *w = qlr_gguf_writer_create(0);
    CHECK_OK(qlr_gguf_set_str(w, "general.architecture", "llama"));
    CHECK_OK(qlr_gguf_set_u32(w, "llama.block_count", TINY_NL));
    CHECK_OK(qlr_gguf_set_u32(w, "llama.embedding_length", TINY_D));
    CHECK_OK(qlr_gguf_set_u32(w, "llama.feed_forward_length", TINY_FF));
    CHECK_OK(qlr_gguf_set_u32(w, "llama.attention.head_count", TINY_NH));
    CHECK_OK(qlr_gguf_set_u32(w, "llama.attention.head_count_kv", TINY_NKV));
    CHECK_OK(qlr_gguf_set_u32(w, "llama.context_length", 256));
    CHECK_OK(qlr_gguf_set_u32(w, "llama.vocab_size", TINY_VOCAB));
    CHECK_OK(qlr_gguf_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f));
    CHECK_OK(qlr_gguf_set_f32(w, "llama.rope.freq_base", 10000.0f));
    /* vocabulary */
    static char names[TINY_VOCAB][16];
    const char *toks[TINY_VOCAB];
    int32_t types[TINY_VOCAB];
    float scores[TINY_VOCAB];
    const char *special[5] = {"<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"};
    for (int i = 0; i < TINY_VOCAB; i++) {
        if (i < 5) {
            snprintf(names[i], sizeof names[i], "%s", special[i]);
            types[i] = i == 0 ? 2 : 3;
        } else {
            snprintf(names[i], sizeof names[i], "<0x%02X>", i - 5);
            types[i] = 6;
        }
        toks[i] = names[i];
        scores[i] = 0;
    }
    CHECK_OK(qlr_gguf_set_str(w, "tokenizer.ggml.model", "llama"));
    CHECK_OK(qlr_gguf_set_arr_str(w, "tokenizer.ggml.tokens", toks, TINY_VOCAB));
    CHECK_OK(qlr_gguf_set_arr(w, "tokenizer.ggml.token_type", QLR_GGUF_INT32, types, TINY_VOCAB));
    CHECK_OK(qlr_gguf_set_arr(w, "tokenizer.ggml.scores", QLR_GGUF_FLOAT32, scores, TINY_VOCAB));
    CHECK_OK(qlr_gguf_set_u32(w, "tokenizer.ggml.unknown_token_id", 0));
    CHECK_OK(qlr_gguf_set_u32(w, "tokenizer.ggml.bos_token_id", 1));
    CHECK_OK(qlr_gguf_set_u32(w, "tokenizer.ggml.eos_token_id", 2));
    CHECK_OK(qlr_gguf_set_u32(w, "tokenizer.ggml.eot_token_id", 4));
    CHECK_OK(qlr_gguf_set_bool(w, "tokenizer.ggml.add_space_prefix", 0));
    /* weights (f32; q/k written as random, their order does not matter for these tests) */
    float *keep[64];
    int nk = 0;
    uint64_t ne[2];
#define ADD(name, n0, n1, s, a)                                                                \
    do {                                                                                       \
        ne[0] = (n0), ne[1] = (n1);                                                            \
        keep[nk] = tiny_rnd(&rng, (int64_t)(n0) * ((n1) ? (n1) : 1), (s), (a));                \
        CHECK_OK(qlr_gguf_add_tensor(w, name, 0, (n1) ? 2 : 1, ne, keep[nk],                   \
                                     (uint64_t)(n0) * ((n1) ? (n1) : 1) * 4));                 \
        nk++;                                                                                  \
    } while (0)
    ADD("token_embd.weight", TINY_D, TINY_VOCAB, 1.0f, 0);
    ADD("output_norm.weight", TINY_D, 0, 0.1f, 1.0f);
    ADD("output.weight", TINY_D, TINY_VOCAB, 0.2f, 0);
    const char *lin[7] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    int64_t outs[7] = {TINY_NH * TINY_HD, TINY_NKV * TINY_HD, TINY_NKV * TINY_HD, TINY_D, TINY_FF, TINY_FF, TINY_D};
    int64_t ins[7] = {TINY_D, TINY_D, TINY_D, TINY_NH * TINY_HD, TINY_D, TINY_D, TINY_FF};
    static char tn[TINY_NL * 9][64];
    int ti = 0;
    for (int l = 0; l < TINY_NL; l++) {
        snprintf(tn[ti], 64, "blk.%d.attn_norm.weight", l);
        ADD(tn[ti], TINY_D, 0, 0.1f, 1.0f);
        ti++;
        snprintf(tn[ti], 64, "blk.%d.ffn_norm.weight", l);
        ADD(tn[ti], TINY_D, 0, 0.1f, 1.0f);
        ti++;
        for (int i = 0; i < 7; i++) {
            snprintf(tn[ti], 64, "blk.%d.%s.weight", l, lin[i]);
            ADD(tn[ti], ins[i], outs[i], 0.15f, 0);
            ti++;
        }
    }
#undef ADD
    CHECK_OK(qlr_gguf_writer_write(w, path));
    qlr_gguf_writer_free(w);
    for (int i = 0; i < nk; i++) free(keep[i]);
    return path;
}

/* A completion dataset of n lines of pseudo-random lowercase text ("text" field). */
static void tiny_completion_data(const char *path, int n, uint64_t seed) {
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    for (int i = 0; i < n; i++) {
        int len = 8 + (int)(test_rng_u64(&seed) % 30);
        fputs("{\"text\": \"", f);
        for (int k = 0; k < len; k++) fputc('a' + (int)(test_rng_u64(&seed) % 6), f);
        fputs("\"}\n", f);
    }
    fclose(f);
}

/* A chat dataset: "say X" -> "X" for short random words. */
__attribute__((unused)) static void tiny_chat_data(const char *path, int n, uint64_t seed) {
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    for (int i = 0; i < n; i++) {
        char word[16];
        int len = 2 + (int)(test_rng_u64(&seed) % 4);
        for (int k = 0; k < len; k++) word[k] = (char)('a' + (int)(test_rng_u64(&seed) % 4));
        word[len] = 0;
        fprintf(f, "{\"messages\": [{\"role\": \"user\", \"content\": \"say %s\"}, "
                   "{\"role\": \"assistant\", \"content\": \"%s\"}]}\n", word, word);
    }
    fclose(f);
}

static void tiny_write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

#endif
