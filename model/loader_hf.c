/* model/loader_hf.c: loads an HF checkpoint folder (config.json + one or more safetensors
 * files, sharded through model.safetensors.index.json or not) in f32, f16 or bf16, streaming
 * tensor by tensor like the GGUF loader: widen to f32 on the host, quantize decoder linears to
 * NF4, keep embeddings/lm_head as bf16 and norms/biases as f32. HF checkpoints are already in
 * rotate-half order: no Q/K permutation. Decoder linears saved by bitsandbytes' Linear4bit
 * (spec §1.7) are taken as stored, without re-quantization (model/loader_bnb.c); a checkpoint
 * may mix them with unquantized linears (llm_int8_skip_modules). */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/safetensors.h"
#include "model/loader_bnb.h"
#include "model/model_internal.h"

static qlr_status st_tensor_f32(const qlr_st_set *s, const char *dir, const char *name, int64_t d0,
                                int64_t d1, float *buf) {
    const qlr_st_tensor *t = qlr_st_set_find(s, name);
    if (qlr_bnb_has_quant_state(s, name))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: tensor '%s' is bitsandbytes 4-bit; only the "
                          "decoder linears may be (embeddings, norms, biases and lm_head must be "
                          "F32, F16 or BF16)", dir, name);
    if (!t) return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: tensor '%s' is missing", dir, name);
    int ok = d1 ? (t->n_dims == 2 && t->shape[0] == (uint64_t)d0 && t->shape[1] == (uint64_t)d1)
                : (t->n_dims == 1 && t->shape[0] == (uint64_t)d0);
    if (!ok) {
        char got[96] = "[";
        for (uint32_t i = 0; i < t->n_dims && i < 4; i++)
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%llu", i ? ", " : "",
                     (unsigned long long)t->shape[i]);
        strcat(got, "]");
        if (d1)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected [%lld, %lld]",
                              dir, name, got, (long long)d0, (long long)d1);
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor '%s' has shape %s, expected [%lld]", dir, name,
                          got, (long long)d0);
    }
    size_t n = (size_t)d0 * (size_t)(d1 ? d1 : 1);
    switch (t->dtype) {
    case QLR_ST_F32: memcpy(buf, t->data, n * 4); break;
    case QLR_ST_BF16: {
        const uint8_t *p = t->data; /* possibly unaligned */
        for (size_t i = 0; i < n; i++) buf[i] = qlr_bf16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        break;
    }
    case QLR_ST_F16: {
        const uint8_t *p = t->data;
        for (size_t i = 0; i < n; i++) buf[i] = qlr_f16_to_f32((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
        break;
    }
    default:
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s (supported: F32, F16, BF16)",
                          dir, name, qlr_st_dtype_name(t->dtype));
    }
    return QLR_OK;
}

qlr_status qlr_model_load_hf(const char *dir, qlr_model *m, const qlr_model_load_params *p) {
    char cfgp[4096];
    snprintf(cfgp, sizeof cfgp, "%s/config.json", dir);
    QLR_TRY(qlr_model_config_from_hf(cfgp, &m->cfg));
    QLR_TRY(qlr_bnb_check_config(cfgp, NULL));
    qlr_model_config *c = &m->cfg;
    if (p->max_layers > 0 && p->max_layers < c->n_layers) c->n_layers = p->max_layers;
    qlr_st_set *s = NULL;
    QLR_TRY(qlr_st_set_open(dir, &s));
    if (!c->tied_embeddings && !qlr_st_set_find(s, "lm_head.weight")) c->tied_embeddings = 1;
    int64_t d = c->d_model, V = c->n_vocab, biggest = V * d;
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        int64_t o, in;
        qlr_model_linear_shape(c, (qlr_linear_id)i, &o, &in);
        if (o * in > biggest) biggest = o * in;
    }
    float *buf = malloc((size_t)biggest * 4);
    m->layers = calloc((size_t)c->n_layers, sizeof(qlr_layer));
    qlr_progress *bar = NULL;
    qlr_status st = QLR_OK;
    if (!buf || !m->layers) {
        st = qlr_errorf(QLR_ERR_NOMEM, "%s: load buffer of %.1f MiB", dir, (double)biggest * 4 / (1 << 20));
        goto done;
    }
    float inv[1024];
    qlr_model_rope_inv_freq(c, NULL, inv);
    if ((st = qlr_model_upload_f32(m, inv, c->head_dim / 2, &m->inv_freq)) != QLR_OK) goto done;
    int64_t n_bnb = 0;
    int64_t total = 3 + (int64_t)c->n_layers * (9 + (c->qkv_bias ? 3 : 0)), done_n = 0;
    if (p->progress) bar = qlr_progress_begin("loading", (uint64_t)total, "tensors");
#define STEP()                                              \
    do {                                                    \
        if (st != QLR_OK) goto done;                        \
        qlr_progress_update(bar, (uint64_t)++done_n, NULL); \
    } while (0)
    st = st_tensor_f32(s, dir, "model.embed_tokens.weight", V, d, buf);
    if (st == QLR_OK) st = qlr_model_upload_bf16(m, buf, V * d, &m->tok_embd);
    STEP();
    st = st_tensor_f32(s, dir, "model.norm.weight", d, 0, buf);
    if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, d, &m->out_norm);
    STEP();
    if (c->tied_embeddings) {
        m->lm_head = m->tok_embd;
    } else {
        st = st_tensor_f32(s, dir, "lm_head.weight", V, d, buf);
        if (st == QLR_OK) st = qlr_model_upload_bf16(m, buf, V * d, &m->lm_head);
    }
    STEP();
    for (int32_t l = 0; l < c->n_layers; l++) {
        qlr_layer *L = &m->layers[l];
        char n[160];
        snprintf(n, sizeof n, "model.layers.%d.input_layernorm.weight", l);
        st = st_tensor_f32(s, dir, n, d, 0, buf);
        if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, d, &L->attn_norm);
        STEP();
        snprintf(n, sizeof n, "model.layers.%d.post_attention_layernorm.weight", l);
        st = st_tensor_f32(s, dir, n, d, 0, buf);
        if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, d, &L->ffn_norm);
        STEP();
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            int64_t o, in;
            qlr_model_linear_shape(c, (qlr_linear_id)i, &o, &in);
            const char *grp = i <= QLR_LIN_O ? "self_attn" : "mlp";
            snprintf(n, sizeof n, "model.layers.%d.%s.%s.weight", l, grp, qlr_linear_hf_name((qlr_linear_id)i));
            if (qlr_bnb_has_quant_state(s, n)) {
                st = qlr_model_upload_bnb(m, s, dir, n, o, in, &L->w[i], &L->nf4_hash[i]);
                n_bnb++;
            } else {
                st = st_tensor_f32(s, dir, n, o, in, buf);
                if (st == QLR_OK) st = qlr_model_upload_nf4(m, buf, o, in, p->double_quant, &L->w[i], &L->nf4_hash[i]);
            }
            STEP();
            if (c->qkv_bias && i <= QLR_LIN_V) {
                snprintf(n, sizeof n, "model.layers.%d.%s.%s.bias", l, grp, qlr_linear_hf_name((qlr_linear_id)i));
                st = st_tensor_f32(s, dir, n, o, 0, buf);
                if (st == QLR_OK) st = qlr_model_upload_f32(m, buf, o, &L->bias[i]);
                STEP();
            }
        }
    }
#undef STEP
    if (n_bnb)
        QLR_LOGI("%s: %lld of %lld decoder linears loaded as stored (bitsandbytes 4-bit nf4)", dir,
                 (long long)n_bnb, (long long)c->n_layers * QLR_LIN_COUNT);
done:
    if (bar) qlr_progress_end(bar);
    free(buf);
    qlr_st_set_close(s);
    return st;
}
