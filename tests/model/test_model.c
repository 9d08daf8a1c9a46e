/* tests/model/test_model.c: the model on tiny random GGUF files written here: Q/K
 * un-permutation (spec §4.6) end to end through the loader, batched prefill == token-by-token
 * decode through the KV cache, a batch of sequences of different lengths == each alone, llama
 * (tied embeddings) and qwen2 (q/k/v bias, untied), the forward with the optional add_rmsnorm
 * entry (deferred residual) against the plain ops, and the loader's errors for a missing
 * tensor, a wrong shape, an unsupported type and an unsupported architecture. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "formats/gguf.h"
#include "model/model.h"
#include "tests/test_util.h"

enum { D = 64, NH = 4, NKV = 2, HD = 16, FF = 96, VOCAB = 50, NL = 2 };

static uint64_t g_rng = 99;
static float *hf_q[NL], *hf_k[NL]; /* HF-order q/k weights of the last written file */

static float *rnd(int64_t n, float s) {
    float *p = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) p[i] = test_rng_normal(&g_rng) * s;
    return p;
}

typedef struct {
    const char *arch;
    int tied, bias;
    const char *drop;        /* tensor to leave out */
    const char *bad_shape;   /* tensor written with a wrong shape */
    const char *q8_tensor;   /* tensor written as Q5_1 (unsupported) */
} spec;

/* Keeps every buffer alive until the writer has written. */
static void *keep[256];
static int n_keep;

static void add(qlr_gguf_writer *w, const spec *s, const char *name, uint64_t ne0, uint64_t ne1,
                float *data) {
    keep[n_keep++] = data;
    if (s->drop && !strcmp(name, s->drop)) return;
    uint64_t ne[2] = {ne0, ne1};
    if (s->bad_shape && !strcmp(name, s->bad_shape)) ne[0] = ne0 / 2, ne[1] = ne1 ? ne1 * 2 : 2;
    uint32_t nd = ne1 ? 2 : 1;
    if (s->bad_shape && !strcmp(name, s->bad_shape) && !ne1) nd = 2;
    if (s->q8_tensor && !strcmp(name, s->q8_tensor)) {
        /* ggml type 7 (Q5_1): 32 elements in 24 bytes; the loader does not decode it */
        CHECK_OK(qlr_gguf_add_tensor(w, name, 7, nd, ne, data, ne0 * (ne1 ? ne1 : 1) / 32 * 24));
        return;
    }
    CHECK_OK(qlr_gguf_add_tensor(w, name, 0, nd, ne, data, ne0 * (ne1 ? ne1 : 1) * 4));
}

/* Writes a tiny model; q/k go in permuted (llama) order as llama.cpp's converter writes them. */
static char *write_model(const char *file, const spec *s) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", test_tmpdir(), file);
    qlr_gguf_writer *w = qlr_gguf_writer_create(0);
    char key[64];
    CHECK_OK(qlr_gguf_set_str(w, "general.architecture", s->arch));
#define KU(k, v) do { snprintf(key, sizeof key, "%s." k, s->arch); CHECK_OK(qlr_gguf_set_u32(w, key, v)); } while (0)
    KU("block_count", NL);
    KU("embedding_length", D);
    KU("feed_forward_length", FF);
    KU("attention.head_count", NH);
    KU("attention.head_count_kv", NKV);
    KU("context_length", 128);
    KU("vocab_size", VOCAB);
#undef KU
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", s->arch);
    CHECK_OK(qlr_gguf_set_f32(w, key, 1e-5f));
    snprintf(key, sizeof key, "%s.rope.freq_base", s->arch);
    CHECK_OK(qlr_gguf_set_f32(w, key, 10000.0f));
    n_keep = 0;
    add(w, s, "token_embd.weight", D, VOCAB, rnd(D * VOCAB, 1.0f));
    float *on = rnd(D, 0.1f);
    for (int i = 0; i < D; i++) on[i] += 1.0f;
    add(w, s, "output_norm.weight", D, 0, on);
    if (!s->tied) add(w, s, "output.weight", D, VOCAB, rnd(D * VOCAB, 0.2f));
    for (int l = 0; l < NL; l++) {
        char n[64];
        float *an = rnd(D, 0.1f), *fn = rnd(D, 0.1f);
        for (int i = 0; i < D; i++) an[i] += 1.0f, fn[i] += 1.0f;
        snprintf(n, sizeof n, "blk.%d.attn_norm.weight", l);
        add(w, s, n, D, 0, an);
        snprintf(n, sizeof n, "blk.%d.ffn_norm.weight", l);
        add(w, s, n, D, 0, fn);
        const char *lin[7] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
        int64_t outs[7] = {NH * HD, NKV * HD, NKV * HD, D, FF, FF, D};
        int64_t ins[7] = {D, D, D, NH * HD, D, D, FF};
        for (int i = 0; i < 7; i++) {
            float *m = rnd(outs[i] * ins[i], 0.15f);
            if (i < 2) {
                free(i == 0 ? hf_q[l] : hf_k[l]);
                float *copy = malloc(outs[i] * ins[i] * 4);
                memcpy(copy, m, outs[i] * ins[i] * 4);
                if (i == 0) hf_q[l] = copy;
                else hf_k[l] = copy;
                if (!strcmp(s->arch, "llama")) qlr_permute_qk(m, i == 0 ? NH : NKV, HD, ins[i]);
            }
            snprintf(n, sizeof n, "blk.%d.%s.weight", l, lin[i]);
            add(w, s, n, ins[i], outs[i], m);
            if (s->bias && i < 3) {
                snprintf(n, sizeof n, "blk.%d.%s.bias", l, lin[i]);
                add(w, s, n, outs[i], 0, rnd(outs[i], 0.1f));
            }
        }
    }
    CHECK_OK(qlr_gguf_writer_write(w, path));
    qlr_gguf_writer_free(w);
    for (int i = 0; i < n_keep; i++) free(keep[i]);
    return path;
}

static qlr_backend *be;

/* max |a - b| over n floats */
static double maxdiff(const float *a, const float *b, int64_t n) {
    double m = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= m)) m = d;
    }
    return m;
}

static void test_permutation(void) {
    /* spec §4.6 on one head of hd 4, 1 column: HF rows [a b c d] -> GGUF [a c b d] */
    float w[8] = {0, 1, 2, 3, 10, 11, 12, 13};
    CHECK_OK(qlr_permute_qk(w, 2, 4, 1));
    float want[8] = {0, 2, 1, 3, 10, 12, 11, 13};
    CHECK(memcmp(w, want, sizeof w) == 0);
    CHECK_OK(qlr_unpermute_qk(w, 2, 4, 1));
    float orig[8] = {0, 1, 2, 3, 10, 11, 12, 13};
    CHECK(memcmp(w, orig, sizeof w) == 0);
    /* hd 8, 3 columns: GGUF row 2j+t holds HF row t*4+j */
    float m[24], p[24];
    for (int i = 0; i < 24; i++) m[i] = p[i] = (float)i;
    CHECK_OK(qlr_permute_qk(p, 1, 8, 3));
    int ok = 1;
    for (int j = 0; j < 4; j++)
        for (int t = 0; t < 2; t++)
            for (int c = 0; c < 3; c++) ok &= p[(2 * j + t) * 3 + c] == m[(t * 4 + j) * 3 + c];
    CHECK(ok);
}

/* Logits of every token, with all tokens of all sequences in one forward call. */
static void run_batch(qlr_model *m, int32_t n, const int32_t *tok, const int32_t *pos,
                      const int32_t *seq, int32_t n_seq, float *out) {
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_cache_create(m, n_seq, 32, &kv));
    CHECK_OK(qlr_forward_create(m, n, n, &f));
    float *lg = NULL;
    qlr_batch b = {n, tok, pos, seq, n, NULL, NULL, NULL};
    CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
    if (lg) memcpy(out, lg, (size_t)n * VOCAB * 4);
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);
}

/* Logits of each of one sequence's n tokens, one decode step each through a fresh cache. */
static void run_decode(qlr_model *m, int32_t n, const int32_t *tok, const int32_t *pos,
                       float *out) {
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    int32_t seq0 = 0;
    CHECK_OK(qlr_kv_cache_create(m, 1, 32, &kv));
    CHECK_OK(qlr_forward_create(m, 1, 1, &f));
    for (int32_t i = 0; i < n; i++) {
        float *lg = NULL;
        qlr_batch b = {1, &tok[i], &pos[i], &seq0, 1, NULL, NULL, NULL};
        CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
        if (lg) memcpy(out + (size_t)i * VOCAB, lg, VOCAB * 4);
    }
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);
}

static void test_forward(const char *arch, int tied, int bias) {
    spec s = {arch, tied, bias, NULL, NULL, NULL};
    char *path = write_model(tied ? "tiny_tied.gguf" : "tiny.gguf", &s);
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    qlr_model *m = NULL;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    if (!m) return;
    CHECK_EQ_INT(m->cfg.tied_embeddings, tied);
    CHECK_EQ_INT(m->cfg.qkv_bias, bias);
    CHECK_EQ_INT(m->cfg.head_dim, HD);
    /* the loaded q/k weights are the HF-order matrices (NF4 of the same rows, bit-identical) */
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < 2; i++) {
            const qlr_nf4 *q = &m->layers[l].w[i];
            float *got = malloc(q->n * 4), *want = malloc(q->n * 4);
            qlr_nf4 ref;
            CHECK_OK(qlr_nf4_quantize(i == 0 ? hf_q[l] : hf_k[l], q->rows, q->cols, 1, &ref));
            qlr_nf4_dequant(q, got);
            qlr_nf4_dequant(&ref, want);
            CHECK_MSG(memcmp(got, want, q->n * 4) == 0, "%s layer %d %s: loaded rows are not HF order",
                      arch, l, i ? "k" : "q");
            qlr_nf4_free(&ref);
            free(got), free(want);
        }

    /* prefill of 13 tokens in one call == token-by-token decode through the cache */
    enum { T = 13 };
    int32_t tok[T], pos[T], seq0[T] = {0};
    for (int i = 0; i < T; i++) tok[i] = (int32_t)(test_rng_u64(&g_rng) % VOCAB), pos[i] = i;
    float *pre = malloc(T * VOCAB * 4), *dec = malloc(T * VOCAB * 4);
    run_batch(m, T, tok, pos, seq0, 1, pre);
    run_decode(m, T, tok, pos, dec);
    /* same math, different GEMM shapes (summation order): f32 rounding only; logits ~O(5) */
    double md = maxdiff(pre, dec, T * VOCAB);
    CHECK_MSG(md < 2e-4, "%s: prefill vs decode logits differ by %g", arch, md);
    /* the batch also must differ from garbage: logits are not all equal */
    CHECK(maxdiff(pre, pre + VOCAB, VOCAB) > 1e-3);
    /* errors: position outside the cache, token outside the vocabulary */
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_cache_create(m, 1, 32, &kv));
    CHECK_OK(qlr_forward_create(m, 1, 1, &f));
    float *lg = NULL;
    int32_t badpos = 32, badtok = VOCAB;
    qlr_batch bb = {1, &tok[0], &badpos, seq0, 1, NULL, NULL, NULL};
    CHECK(qlr_model_forward(f, kv, &bb, &lg) == QLR_ERR_RANGE);
    qlr_batch bt = {1, &badtok, &pos[0], seq0, 1, NULL, NULL, NULL};
    CHECK(qlr_model_forward(f, kv, &bt, &lg) == QLR_ERR_RANGE);
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);

    /* three sequences of lengths 5, 1 and 7, interleaved in one batch == each alone */
    int32_t lens[3] = {5, 1, 7}, bt_tok[13], bt_pos[13], bt_seq[13], n = 0;
    int32_t seqtok[3][7];
    for (int sq = 0; sq < 3; sq++)
        for (int i = 0; i < lens[sq]; i++) seqtok[sq][i] = (int32_t)(test_rng_u64(&g_rng) % VOCAB);
    int32_t at[3] = {0, 0, 0};
    while (n < 13) /* round robin: tokens of a sequence stay in position order */
        for (int sq = 0; sq < 3; sq++)
            if (at[sq] < lens[sq]) {
                bt_tok[n] = seqtok[sq][at[sq]], bt_pos[n] = at[sq], bt_seq[n] = sq;
                at[sq]++, n++;
            }
    float *all = malloc(13 * VOCAB * 4), *alone = malloc(7 * VOCAB * 4);
    run_batch(m, 13, bt_tok, bt_pos, bt_seq, 3, all);
    for (int sq = 0; sq < 3; sq++) {
        int32_t p[7], z[7] = {0};
        for (int i = 0; i < 7; i++) p[i] = i;
        run_batch(m, lens[sq], seqtok[sq], p, z, 1, alone);
        double w = 0;
        for (int i = 0; i < 13; i++)
            if (bt_seq[i] == sq) {
                double d = maxdiff(all + i * VOCAB, alone + bt_pos[i] * VOCAB, VOCAB);
                if (d > w) w = d;
            }
        CHECK_MSG(w < 2e-4, "%s: sequence %d in a batch vs alone differs by %g", arch, sq, w);
    }
    /* export as HF safetensors + config.json, load the folder back: same model up to one more
     * NF4 round trip of values already on the NF4 grid (only the double-quantized absmax moves,
     * by < 1%), so logits of O(5) agree to a few 1e-2 */
    char dir[512];
    snprintf(dir, sizeof dir, "%s/hf_%s", test_tmpdir(), arch);
    CHECK_OK(qlr_model_export_hf(m, dir));
    qlr_model *h = NULL;
    CHECK_OK(qlr_model_load(dir, be, &lp, &h));
    if (h) {
        CHECK_EQ_INT(h->cfg.tied_embeddings, tied);
        CHECK_EQ_INT(h->cfg.qkv_bias, bias);
        CHECK_EQ_INT(h->cfg.n_kv_heads, NKV);
        float *hl = malloc(T * VOCAB * 4);
        run_batch(h, T, tok, pos, seq0, 1, hl);
        double hd2 = maxdiff(pre, hl, T * VOCAB);
        printf("%s: HF export reloaded: max logit diff %.3g\n", arch, hd2);
        CHECK_MSG(hd2 < 0.1, "%s: HF export reloaded differs by %g", arch, hd2);
        free(hl);
        qlr_model_free(h);
    }
    free(pre), free(dec), free(all), free(alone);
    qlr_model_free(m);
}

static void expect_load_error(const spec *s, qlr_status want, const char *needle) {
    char *path = write_model("bad.gguf", s);
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    qlr_model *m = NULL;
    qlr_status st = qlr_model_load(path, be, &lp, &m);
    CHECK_MSG(st == want && m == NULL, "load: status %d, want %d (%s)", st, want, qlr_error_msg());
    printf("  error: %s\n", qlr_error_msg());
    CHECK_MSG(strstr(qlr_error_msg(), needle) != NULL, "error '%s' does not mention '%s'",
              qlr_error_msg(), needle);
    qlr_model_free(m);
}

static void test_load_errors(void) {
    spec s = {"llama", 1, 0, "blk.1.ffn_up.weight", NULL, NULL};
    expect_load_error(&s, QLR_ERR_NOT_FOUND, "'blk.1.ffn_up.weight' is missing");
    spec s2 = {"llama", 1, 0, NULL, "blk.0.attn_k.weight", NULL};
    expect_load_error(&s2, QLR_ERR_FORMAT, "'blk.0.attn_k.weight' has shape");
    spec s3 = {"llama", 1, 0, NULL, NULL, "blk.0.ffn_down.weight"};
    expect_load_error(&s3, QLR_ERR_UNSUPPORTED, "blk.0.ffn_down.weight");
    spec s4 = {"gemma3", 1, 0, NULL, NULL, NULL};
    expect_load_error(&s4, QLR_ERR_UNSUPPORTED, "architecture 'gemma3' is not supported yet");
    spec s5 = {"qwen2", 0, 1, "blk.0.attn_v.bias", NULL, NULL};
    expect_load_error(&s5, QLR_ERR_NOT_FOUND, "'blk.0.attn_v.bias' is missing");
}

/* The optional add_rmsnorm entry as a composition of the CPU ops (same arithmetic): with it, the
 * forward defers each layer's MLP residual into the next layer's add_rmsnorm (and adds the last
 * one after the loop); the logits must be bitwise those of the plain ops, for a prefill and for
 * decode steps through the cache. */
static int g_fused_calls;
static qlr_status fake_add_rmsnorm(qlr_backend *b, void *x, void *y, const void *dx,
                                   const float *w, int64_t n, int64_t d, float eps) {
    g_fused_calls++;
    QLR_TRY(b->ops.add(b, x, dx, n * d));
    return b->ops.rmsnorm(b, y, x, w, n, d, eps);
}

static void test_fused_entries(const char *arch, int tied, int bias) {
    spec s = {arch, tied, bias, NULL, NULL, NULL};
    char *path = write_model("tiny_fused.gguf", &s);
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    qlr_model *m = NULL;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    if (!m) return;
    enum { T = 6 };
    int32_t tok[T], pos[T], seq0[T] = {0};
    for (int i = 0; i < T; i++) tok[i] = (int32_t)(test_rng_u64(&g_rng) % VOCAB), pos[i] = i;
    float *ref = malloc((size_t)2 * T * VOCAB * 4), *got = malloc((size_t)2 * T * VOCAB * 4);
    qlr_backend_ops saved = be->ops;
    for (int pass = 0; pass < 2; pass++) {
        if (pass) be->ops.add_rmsnorm = fake_add_rmsnorm;
        g_fused_calls = 0;
        float *out = pass ? got : ref;
        /* a prefill of T tokens, then T decode steps */
        run_batch(m, T, tok, pos, seq0, 1, out);
        run_decode(m, T, tok, pos, out + T * VOCAB);
        if (pass) {
            /* per forward: the FFN norm of every layer and the attention norm of layers 1.. */
            CHECK_MSG(g_fused_calls == (T + 1) * (2 * NL - 1), "%s: %d add_rmsnorm calls, want %d",
                      arch, g_fused_calls, (T + 1) * (2 * NL - 1));
            CHECK_MSG(!memcmp(ref, got, (size_t)2 * T * VOCAB * 4), "%s: logits with the "
                      "add_rmsnorm entry differ from the plain ops", arch);
        }
    }
    be->ops = saved;
    free(ref);
    free(got);
    qlr_model_free(m);
}

int main(void) {
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    test_permutation();
    test_forward("llama", 1, 0);
    test_forward("qwen2", 0, 1);
    test_fused_entries("llama", 1, 0);
    test_fused_entries("qwen2", 0, 1);
    test_load_errors();
    for (int l = 0; l < NL; l++) free(hf_q[l]), free(hf_k[l]);
    qlr_backend_free(be);
    return test_finish();
}
