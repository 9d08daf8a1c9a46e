/* tests/model/test_export_gguf.c: the GGUF export of a loaded model (model/export_gguf.h).
 *  - the per-tensor type rules of the mixes (llama.cpp's Q4_K_M / Q6_K / Q8_0, restated);
 *  - the demo model exported as f32 and as q8_0 and loaded back: every linear's NF4 store equal
 *    byte for byte (rebuilt on the recorded qlora.nf4.* state), the same nf4 hash, embeddings and
 *    norms bitwise, and the same logits bitwise; the tensor list (names, ne) and the source's
 *    metadata kept; attn_q/attn_k in llama.cpp's row order;
 *  - a merge: the exported linear equals dequant(NF4) + delta, permuted;
 *  - a load without double quantization does not take the recorded (double-quant) state.
 * Needs the demo model (scripts/setup.sh). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/gguf.h"
#include "model/export_gguf.h"
#include "model/model.h"
#include "quant/ggml_quants.h"
#include "tests/test_util.h"

static void test_types(void) {
    /* 30 layers: use_more_bits = layers 0-2, 26-29 and (l - 3) % 3 == 2: 5, 8, ..., 23 */
    const int n = 30;
    struct {
        qlr_export_type t;
        const char *name;
        int layer;
        uint64_t ne0;
        uint32_t dims;
        int tied;
        uint32_t want;
    } c[] = {
        {QLR_EXPORT_Q4_K_M, "blk.0.attn_v.weight", 0, 4096, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q4_K_M, "blk.4.attn_v.weight", 4, 4096, 2, 0, QLR_GGML_Q4_K},
        {QLR_EXPORT_Q4_K_M, "blk.5.attn_v.weight", 5, 4096, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q4_K_M, "blk.6.attn_v.weight", 6, 4096, 2, 0, QLR_GGML_Q4_K},
        {QLR_EXPORT_Q4_K_M, "blk.25.ffn_down.weight", 25, 14336, 2, 0, QLR_GGML_Q4_K},
        {QLR_EXPORT_Q4_K_M, "blk.26.ffn_down.weight", 26, 14336, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q4_K_M, "blk.23.ffn_down.weight", 23, 14336, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q4_K_M, "blk.0.attn_q.weight", 0, 4096, 2, 0, QLR_GGML_Q4_K},
        {QLR_EXPORT_Q4_K_M, "blk.0.ffn_gate.weight", 0, 4096, 2, 0, QLR_GGML_Q4_K},
        {QLR_EXPORT_Q4_K_M, "output.weight", -1, 4096, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q4_K_M, "token_embd.weight", -1, 4096, 2, 0, QLR_GGML_Q4_K},
        {QLR_EXPORT_Q4_K_M, "token_embd.weight", -1, 4096, 2, 1, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q4_K_M, "token_embd.weight", -1, 576, 2, 1, QLR_GGML_Q8_0},  /* head rule */
        {QLR_EXPORT_Q4_K_M, "blk.9.attn_q.weight", 9, 576, 2, 0, QLR_GGML_Q5_0},  /* fallback */
        {QLR_EXPORT_Q4_K_M, "blk.0.attn_v.weight", 0, 576, 2, 0, QLR_GGML_Q8_0},  /* Q6_K fallback */
        {QLR_EXPORT_Q4_K_M, "blk.0.ffn_down.weight", 0, 1536, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q4_K_M, "blk.0.attn_norm.weight", 0, 576, 1, 0, QLR_GGML_F32},
        {QLR_EXPORT_Q4_K_M, "blk.0.attn_q.weight", 0, 48, 2, 0, QLR_GGML_F16},    /* no 32-block fits */
        {QLR_EXPORT_Q6_K, "blk.7.attn_q.weight", 7, 4096, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q6_K, "blk.7.attn_q.weight", 7, 576, 2, 0, QLR_GGML_Q8_0},
        {QLR_EXPORT_Q6_K, "token_embd.weight", -1, 4096, 2, 0, QLR_GGML_Q6_K},
        {QLR_EXPORT_Q8_0, "blk.7.attn_q.weight", 7, 576, 2, 0, QLR_GGML_Q8_0},
        {QLR_EXPORT_Q8_0, "blk.7.attn_q.weight", 7, 48, 2, 0, QLR_GGML_F16},
        {QLR_EXPORT_Q8_0, "output_norm.weight", -1, 576, 1, 0, QLR_GGML_F32},
        {QLR_EXPORT_F16, "token_embd.weight", -1, 576, 2, 1, QLR_GGML_F16},
        {QLR_EXPORT_BF16, "blk.1.ffn_up.weight", 1, 576, 2, 0, QLR_GGML_BF16},
        {QLR_EXPORT_F32, "blk.1.ffn_up.weight", 1, 576, 2, 0, QLR_GGML_F32},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        uint32_t got = qlr_export_tensor_type(c[i].t, c[i].name, c[i].layer, n, c[i].ne0, c[i].dims, c[i].tied);
        CHECK_MSG(got == c[i].want, "%s %s ne0 %llu tied %d: %s, expected %s", qlr_export_type_name(c[i].t),
                  c[i].name, (unsigned long long)c[i].ne0, c[i].tied, qlr_ggml_type_name(got),
                  qlr_ggml_type_name(c[i].want));
    }
    qlr_export_type t;
    CHECK(qlr_export_type_parse("Q4_K_M", &t) == QLR_OK && t == QLR_EXPORT_Q4_K_M);
    CHECK(qlr_export_type_parse("q5_k_m", &t) == QLR_ERR_INVALID);
    qlr_error_clear();
    CHECK(qlr_export_file_type(QLR_EXPORT_Q4_K_M) == 15 && qlr_export_file_type(QLR_EXPORT_BF16) == 32);
}

static int stores_equal(const qlr_nf4 *a, const qlr_nf4 *b) {
    if (a->rows != b->rows || a->cols != b->cols || a->dq != b->dq) return 0;
    if (memcmp(a->codes, b->codes, (size_t)(a->n + 1) / 2)) return 0;
    if (a->dq)
        return !memcmp(a->absmax_q, b->absmax_q, (size_t)a->n_blocks) &&
               !memcmp(a->dq_absmax, b->dq_absmax, (size_t)a->n_dq_blocks * 4) && a->dq_offset == b->dq_offset;
    return !memcmp(a->absmax, b->absmax, (size_t)a->n_blocks * 4);
}

static float *logits_of(qlr_model *m, const int32_t *toks, int32_t n) {
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    float *out = malloc((size_t)n * m->cfg.n_vocab * 4), *lg = NULL;
    int32_t pos[16], seq[16];
    for (int32_t i = 0; i < n; i++) pos[i] = i, seq[i] = 0;
    qlr_batch b = {n, toks, pos, seq, n, NULL, NULL, NULL};
    CHECK_OK(qlr_kv_cache_create(m, 1, 32, &kv));
    CHECK_OK(qlr_forward_create(m, n, n, &f));
    if (kv && f && out) {
        CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
        if (lg) memcpy(out, lg, (size_t)n * m->cfg.n_vocab * 4);
    }
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);
    return out;
}

/* The exported file against the source: the same tensors (names, dims, ne) in the same order,
 * every source metadata key but the file type / quantization version / qlora.* present with the
 * same type. */
static void check_layout(const char *src, const char *path, uint32_t linear_type) {
    qlr_gguf *a = NULL, *b = NULL;
    CHECK_OK(qlr_gguf_open(src, &a));
    CHECK_OK(qlr_gguf_open(path, &b));
    if (!a || !b) goto done;
    CHECK_EQ_INT(qlr_gguf_n_tensors(a), qlr_gguf_n_tensors(b));
    for (int64_t i = 0; i < qlr_gguf_n_tensors(a) && i < qlr_gguf_n_tensors(b); i++) {
        const qlr_gguf_tensor *x = qlr_gguf_tensor_at(a, i), *y = qlr_gguf_tensor_at(b, i);
        CHECK_MSG(!strcmp(x->name, y->name) && x->n_dims == y->n_dims && !memcmp(x->ne, y->ne, sizeof x->ne),
                  "tensor %lld: %s vs %s", (long long)i, x->name, y->name);
        if (y->n_dims == 1) CHECK_MSG(y->type == QLR_GGML_F32, "%s is %s", y->name, qlr_ggml_type_name(y->type));
        else CHECK_MSG(y->type == linear_type, "%s is %s", y->name, qlr_ggml_type_name(y->type));
    }
    int missing = 0;
    for (int64_t i = 0; i < qlr_gguf_n_kv(a); i++) {
        const char *k = qlr_gguf_kv_key(a, i);
        if (!strcmp(k, "general.file_type") || !strcmp(k, "general.quantization_version")) continue;
        int64_t j = qlr_gguf_find_key(b, k);
        if (j < 0 || qlr_gguf_kv_type(a, i) != qlr_gguf_kv_type(b, j)) missing++;
    }
    CHECK_MSG(missing == 0, "%d metadata keys of the source are missing or retyped", missing);
    const char *s;
    uint64_t sl;
    CHECK(qlr_gguf_get_str(b, "tokenizer.chat_template", &s, &sl) == QLR_OK && sl > 0);
    CHECK(qlr_gguf_get_str(b, "qlora.nf4.hash", &s, &sl) == QLR_OK && sl == 16);
done:
    qlr_gguf_close(a);
    qlr_gguf_close(b);
}

typedef struct delta_ud {
    int calls;
} delta_ud;

/* A delta that is easy to check: w[o][i] += 0.001 * (o % 7) - 0.002 * (i % 5). */
static qlr_status test_delta(void *ud, int32_t layer, qlr_linear_id id, float *w, int64_t rows, int64_t cols) {
    (void)layer;
    (void)id;
    ((delta_ud *)ud)->calls++;
    for (int64_t o = 0; o < rows; o++)
        for (int64_t i = 0; i < cols; i++) w[o * cols + i] += 0.001f * (float)(o % 7) - 0.002f * (float)(i % 5);
    return QLR_OK;
}

static void test_demo(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return;
    qlr_backend *be = NULL;
    qlr_model *m = NULL, *r = NULL;
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    if (!m) goto done;
    CHECK(m->nf4_hash != 0);
    const qlr_model_config *c = &m->cfg;
    const int32_t toks[6] = {1, 9690, 28, 588, 253, 2}; /* any ids below the vocabulary size */
    float *ref = logits_of(m, toks, 6);
    const qlr_export_type types[2] = {QLR_EXPORT_F32, QLR_EXPORT_Q8_0};
    for (int k = 0; k < 2; k++) {
        char out[512];
        snprintf(out, sizeof out, "%s/base-%s.gguf", test_tmpdir(), qlr_export_type_name(types[k]));
        qlr_export_gguf_params p = qlr_export_gguf_params_default();
        p.type = types[k];
        p.nf4_state = 1;
        qlr_export_stats st;
        CHECK_OK(qlr_model_export_gguf(m, out, &p, &st));
        check_layout(path, out, types[k] == QLR_EXPORT_F32 ? QLR_GGML_F32 : QLR_GGML_Q8_0);
        CHECK_OK(qlr_model_load(out, be, &lp, &r));
        if (!r) continue;
        int bad = 0;
        for (int32_t l = 0; l < c->n_layers; l++)
            for (int i = 0; i < QLR_LIN_COUNT; i++) bad += !stores_equal(&m->layers[l].w[i], &r->layers[l].w[i]);
        CHECK_MSG(bad == 0, "%s: %d of %d NF4 stores differ after the round trip", qlr_export_type_name(types[k]), bad,
                  c->n_layers * QLR_LIN_COUNT);
        CHECK_MSG(r->nf4_hash == m->nf4_hash, "%s: nf4 hash %016llx, the source's %016llx",
                  qlr_export_type_name(types[k]), (unsigned long long)r->nf4_hash, (unsigned long long)m->nf4_hash);
        if (types[k] == QLR_EXPORT_F32) {
            /* the f32 file holds the runtime's values exactly: embeddings, norms, logits */
            CHECK(!memcmp(m->tok_embd, r->tok_embd, (size_t)c->n_vocab * c->d_model * 2));
            CHECK(!memcmp(m->out_norm, r->out_norm, (size_t)c->d_model * 4));
            int nb = 0;
            for (int32_t l = 0; l < c->n_layers; l++)
                nb += memcmp(m->layers[l].attn_norm, r->layers[l].attn_norm, (size_t)c->d_model * 4) != 0;
            CHECK_EQ_INT(nb, 0);
            float *got = logits_of(r, toks, 6);
            CHECK_MSG(got && ref && !memcmp(got, ref, (size_t)6 * c->n_vocab * 4),
                      "logits of the reloaded f32 export differ from the original load's");
            free(got);
            /* attn_q in the file: llama.cpp's row order = permute(dequant(store)) */
            qlr_gguf *g = NULL;
            CHECK_OK(qlr_gguf_open(out, &g));
            const qlr_gguf_tensor *t = g ? qlr_gguf_find_tensor(g, "blk.3.attn_q.weight") : NULL;
            CHECK(t != NULL);
            if (t) {
                const qlr_nf4 *q = &m->layers[3].w[QLR_LIN_Q];
                float *w = malloc((size_t)q->n * 4);
                qlr_nf4_dequant(q, w);
                CHECK_OK(qlr_permute_qk(w, c->n_heads, c->head_dim, q->cols));
                CHECK(!memcmp(w, t->data, (size_t)q->n * 4));
                free(w);
            }
            qlr_gguf_close(g);
        }
        qlr_model_free(r);
        r = NULL;
    }
    /* the recorded state is a double-quant one: a plain load quantizes afresh */
    {
        char out[512];
        snprintf(out, sizeof out, "%s/base-f32.gguf", test_tmpdir());
        qlr_model_load_params lp2 = lp;
        lp2.double_quant = 0;
        CHECK_OK(qlr_model_load(out, be, &lp2, &r));
        CHECK(r && !r->layers[0].w[0].dq && r->nf4_hash != m->nf4_hash);
        qlr_model_free(r);
        r = NULL;
    }
    /* a merge: the written linear is dequant + delta, permuted for attn_k */
    {
        char out[512];
        snprintf(out, sizeof out, "%s/merged.gguf", test_tmpdir());
        delta_ud du = {0};
        qlr_export_gguf_params p = qlr_export_gguf_params_default();
        p.type = QLR_EXPORT_F32;
        p.delta = test_delta;
        p.delta_ud = &du;
        CHECK_OK(qlr_model_export_gguf(m, out, &p, NULL));
        CHECK_EQ_INT(du.calls, c->n_layers * QLR_LIN_COUNT);
        p.nf4_state = 1; /* a merged model is not the base: refused */
        CHECK(qlr_model_export_gguf(m, out, &p, NULL) == QLR_ERR_INVALID);
        qlr_error_clear();
        qlr_gguf *g = NULL;
        CHECK_OK(qlr_gguf_open(out, &g));
        const qlr_gguf_tensor *t = g ? qlr_gguf_find_tensor(g, "blk.7.attn_k.weight") : NULL;
        CHECK(t != NULL && g && qlr_gguf_find_key(g, "qlora.nf4.hash") < 0);
        if (t) {
            const qlr_nf4 *q = &m->layers[7].w[QLR_LIN_K];
            float *w = malloc((size_t)q->n * 4);
            qlr_nf4_dequant(q, w);
            test_delta(&du, 7, QLR_LIN_K, w, q->rows, q->cols);
            CHECK_OK(qlr_permute_qk(w, c->n_kv_heads, c->head_dim, q->cols));
            CHECK(!memcmp(w, t->data, (size_t)q->n * 4));
            free(w);
        }
        qlr_gguf_close(g);
    }
    free(ref);
done:
    qlr_model_free(m);
    qlr_backend_free(be);
}

int main(void) {
    test_types();
    test_demo();
    return test_finish();
}
