/* model/loader.c: loads a base model into the NF4 store on a backend, streaming tensor by
 * tensor: dequantize one GGUF tensor to f32 on the host (quant/ggml_quants.h), un-permute the
 * Q/K rows of llama GGUFs (spec §4.6), quantize decoder linears to NF4 (double quant) and upload
 * them; embeddings/lm_head become bf16 and norms/biases stay f32. HF safetensors folders go
 * through model/loader_hf.c; both use model/model.c's uploads (files depend downwards only:
 * loader.c -> loader_hf.c -> model.c). */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/gguf.h"
#include "model/model_internal.h"
#include "quant/ggml_quants.h"

qlr_model_load_params qlr_model_load_params_default(void) {
    qlr_model_load_params p = {1, 1, 0};
    return p;
}

/* ---- GGUF ---- */

/* Finds `name`, checks its shape (GGUF ne order: ne0 contiguous; ne1 0 = 1-D) and type, and
 * dequantizes it into buf. */
static qlr_status gguf_tensor_f32(const qlr_gguf *g, const char *name, uint64_t ne0, uint64_t ne1,
                                  float *buf) {
    const char *path = qlr_gguf_path(g);
    const qlr_gguf_tensor *t = qlr_gguf_find_tensor(g, name);
    if (!t) return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: tensor '%s' is missing", path, name);
    int dims = ne1 ? 2 : 1;
    int ok = t->n_dims == (uint32_t)dims && t->ne[0] == ne0 && (dims == 1 || t->ne[1] == ne1);
    for (uint32_t i = 2; i < t->n_dims && i < QLR_GGUF_MAX_DIMS; i++) ok &= t->ne[i] == 1;
    if (!ok) {
        if (dims == 1)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor '%s' has shape {%llu, %llu}, expected {%llu}",
                              path, name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                              (unsigned long long)ne0);
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor '%s' has shape {%llu, %llu}, expected {%llu, %llu}",
                          path, name, (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                          (unsigned long long)ne0, (unsigned long long)ne1);
    }
    if (qlr_ggml_type_check(t->type) != QLR_OK)
        return qlr_error_prefix("%s: tensor '%s'", path, name);
    qlr_status st = qlr_ggml_dequant(t->type, t->data, (size_t)t->size, (int64_t)ne0,
                                     (int64_t)(ne1 ? ne1 : 1), buf);
    if (st != QLR_OK) return qlr_error_prefix("%s: tensor '%s'", path, name);
    return QLR_OK;
}

static qlr_status load_gguf(const char *path, qlr_model *m, const qlr_model_load_params *p) {
    qlr_gguf *g = NULL;
    QLR_TRY(qlr_gguf_open(path, &g));
    float *buf = NULL;
    qlr_progress *bar = NULL;
    qlr_status st = qlr_model_config_from_gguf(g, &m->cfg);
    if (st != QLR_OK) goto done;
    qlr_model_config *c = &m->cfg;
    if (p->max_layers > 0 && p->max_layers < c->n_layers) c->n_layers = p->max_layers;
    int64_t d = c->d_model, q_out = (int64_t)c->n_heads * c->head_dim, ff = c->d_ff,
            V = c->n_vocab;
    int64_t biggest = V * d;
    if (ff * d > biggest) biggest = ff * d;
    if (q_out * d > biggest) biggest = q_out * d;
    buf = malloc((size_t)biggest * sizeof(float));
    m->layers = calloc((size_t)c->n_layers, sizeof(qlr_layer));
    if (!buf || !m->layers) {
        st = qlr_errorf(QLR_ERR_NOMEM, "%s: cannot allocate %.1f MiB of load buffer", path,
                        (double)biggest * 4 / (1 << 20));
        goto done;
    }
    int64_t total = 3 + (int64_t)c->n_layers * (9 + (c->qkv_bias ? 3 : 0)), done_n = 0;
    if (p->progress) bar = qlr_progress_begin("loading", (uint64_t)total, "tensors");
#define STEP()                                                     \
    do {                                                           \
        if (st != QLR_OK) goto done;                               \
        qlr_progress_update(bar, (uint64_t)++done_n, NULL);        \
    } while (0)

    /* RoPE table (rope_freqs.weight holds per-dimension divisors for llama3 GGUFs) */
    float *ftab = NULL;
    if (c->rope_scaling == QLR_ROPE_SCALING_FREQS) {
        st = gguf_tensor_f32(g, "rope_freqs.weight", (uint64_t)c->head_dim / 2, 0, buf);
        if (st != QLR_OK) goto done;
        ftab = buf + c->head_dim / 2;
        memcpy(ftab, buf, (size_t)c->head_dim / 2 * sizeof(float));
    }
    float inv[1024];
    qlr_model_rope_inv_freq(c, ftab, inv);
    st = qlr_model_upload_f32(m, inv, c->head_dim / 2, &m->inv_freq);
    if (st != QLR_OK) goto done;

    st = gguf_tensor_f32(g, "token_embd.weight", (uint64_t)d, (uint64_t)V, buf);
    if (st == QLR_OK) st = qlr_model_upload_bf16(m, buf, V * d, &m->tok_embd);
    STEP();
    st = gguf_tensor_f32(g, "output_norm.weight", (uint64_t)d, 0, buf);
    if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, d, &m->out_norm);
    STEP();
    if (c->tied_embeddings) {
        m->lm_head = m->tok_embd;
    } else {
        st = gguf_tensor_f32(g, "output.weight", (uint64_t)d, (uint64_t)V, buf);
        if (st == QLR_OK) st = qlr_model_upload_bf16(m, buf, V * d, &m->lm_head);
    }
    STEP();

    int permuted = !strcmp(c->arch, "llama"); /* qwen2 GGUFs keep HF row order (NeoX rope) */
    for (int32_t l = 0; l < c->n_layers; l++) {
        qlr_layer *L = &m->layers[l];
        char name[96];
        snprintf(name, sizeof name, "blk.%d.attn_norm.weight", l);
        st = gguf_tensor_f32(g, name, (uint64_t)d, 0, buf);
        if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, d, &L->attn_norm);
        STEP();
        snprintf(name, sizeof name, "blk.%d.ffn_norm.weight", l);
        st = gguf_tensor_f32(g, name, (uint64_t)d, 0, buf);
        if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, d, &L->ffn_norm);
        STEP();
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            int64_t out, in;
            qlr_model_linear_shape(c, (qlr_linear_id)i, &out, &in);
            int64_t heads = i == QLR_LIN_Q ? c->n_heads : c->n_kv_heads;
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, qlr_linear_gguf_name((qlr_linear_id)i));
            st = gguf_tensor_f32(g, name, (uint64_t)in, (uint64_t)out, buf);
            if (st == QLR_OK && permuted && (i == QLR_LIN_Q || i == QLR_LIN_K))
                st = qlr_unpermute_qk(buf, heads, c->head_dim, in);
            if (st == QLR_OK) st = qlr_model_upload_nf4(m, buf, out, in, p->double_quant, &L->w[i]);
            STEP();
            if (c->qkv_bias && i <= QLR_LIN_V) {
                snprintf(name, sizeof name, "blk.%d.%s.bias", l, qlr_linear_gguf_name((qlr_linear_id)i));
                st = gguf_tensor_f32(g, name, (uint64_t)out, 0, buf);
                if (st == QLR_OK && permuted && (i == QLR_LIN_Q || i == QLR_LIN_K))
                    st = qlr_unpermute_qk(buf, heads, c->head_dim, 1);
                if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, out, &L->bias[i]);
                STEP();
            }
        }
    }
#undef STEP
done:
    if (bar) qlr_progress_end(bar);
    free(buf);
    qlr_gguf_close(g);
    return st;
}

qlr_status qlr_model_load(const char *path, qlr_backend *be, const qlr_model_load_params *p,
                          qlr_model **out) {
    *out = NULL;
    qlr_model_load_params def = qlr_model_load_params_default();
    if (!p) p = &def;
    qlr_model *m = calloc(1, sizeof *m);
    if (!m) return qlr_errorf(QLR_ERR_NOMEM, "model");
    m->be = be;
    m->source = strdup(path);
    qlr_status st;
    if (qlr_is_dir(path)) {
        st = qlr_model_load_hf(path, m, p);
    } else {
        size_t n = strlen(path);
        if (n > 5 && !strcmp(path + n - 5, ".json"))
            st = qlr_errorf(QLR_ERR_INVALID, "%s: pass the model folder, not its config.json", path);
        else
            st = load_gguf(path, m, p);
    }
    if (st != QLR_OK) {
        qlr_model_free(m);
        return st;
    }
    *out = m;
    return QLR_OK;
}
