/* model/model.c: the model object's shared pieces: the decoder linears' shapes, the device
 * uploads that count bytes on the model (f32, bf16, NF4), the Q/K row permutation between
 * llama.cpp's and HF's order (spec §4.6), and the model's free. Used by the loaders
 * (loader.c, loader_hf.c) and the tools; depends on nothing else in model/. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "core/hash.h"
#include "model/model_internal.h"
#include "quant/nf4.h"

/* ---- Q/K permutation (spec §4.6) ---- */

static qlr_status permute_rows(float *w, int64_t n_head, int64_t hd, int64_t cols, int inverse) {
    int64_t half = hd / 2;
    float *tmp = malloc((size_t)(hd * cols) * sizeof(float));
    if (!tmp) return qlr_errorf(QLR_ERR_NOMEM, "Q/K permutation: %lld values", (long long)(hd * cols));
    for (int64_t h = 0; h < n_head; h++) {
        float *head = w + h * hd * cols;
        memcpy(tmp, head, (size_t)(hd * cols) * sizeof(float));
        for (int64_t t = 0; t < 2; t++)
            for (int64_t j = 0; j < half; j++) {
                int64_t gg = 2 * j + t, hf = t * half + j; /* GGUF row, HF row */
                if (inverse)
                    memcpy(head + hf * cols, tmp + gg * cols, (size_t)cols * sizeof(float));
                else
                    memcpy(head + gg * cols, tmp + hf * cols, (size_t)cols * sizeof(float));
            }
    }
    free(tmp);
    return QLR_OK;
}

qlr_status qlr_unpermute_qk(float *w, int64_t n_head, int64_t hd, int64_t cols) {
    return permute_rows(w, n_head, hd, cols, 1);
}

qlr_status qlr_permute_qk(float *w, int64_t n_head, int64_t hd, int64_t cols) {
    return permute_rows(w, n_head, hd, cols, 0);
}

/* ---- device uploads ---- */

qlr_status qlr_model_upload_f32(qlr_model *m, const float *src, int64_t n, float **out) {
    *out = m->be->mem.alloc(m->be, (size_t)n * 4);
    if (!*out) return qlr_error_status();
    m->other_bytes += (uint64_t)n * 4;
    return m->be->mem.h2d(m->be, *out, src, (size_t)n * 4);
}

/* Converts buf (f32, n values) to bf16 in place (the bf16 array is half as long and written
 * front to back, never ahead of what is still to be read) and uploads it. */
qlr_status qlr_model_upload_bf16(qlr_model *m, float *buf, int64_t n, uint16_t **out) {
    uint16_t *h = (uint16_t *)buf;
    for (int64_t i = 0; i < n; i++) h[i] = qlr_f32_to_bf16(buf[i]);
    *out = m->be->mem.alloc(m->be, (size_t)n * 2);
    if (!*out) return qlr_error_status();
    m->other_bytes += (uint64_t)n * 2;
    QLR_TRY(m->be->mem.h2d(m->be, *out, h, (size_t)n * 2));
    return m->be->mem.sync(m->be); /* buf is reused right after */
}

qlr_status qlr_model_upload_nf4(qlr_model *m, const float *w, int64_t rows, int64_t cols, int dq,
                                qlr_nf4 *out, uint64_t *hash) {
    qlr_nf4 host;
    QLR_TRY(qlr_nf4_quantize(w, rows, cols, dq, &host));
    qlr_status st = qlr_model_upload_nf4_store(m, &host, out, hash);
    qlr_nf4_free(&host);
    return st;
}

qlr_status qlr_model_upload_nf4_store(qlr_model *m, qlr_nf4 *host, qlr_nf4 *out, uint64_t *hash) {
    *hash = qlr_nf4_hash(host);
    m->nf4_bytes += qlr_nf4_bytes(host->rows, host->cols, host->dq);
    qlr_status st = qlr_backend_nf4_upload(m->be, host, out, 1); /* host-visible: buffers moved */
    if (st == QLR_OK && !m->be->host_visible) st = m->be->mem.sync(m->be);
    return st;
}

uint64_t qlr_model_nf4_hash(const qlr_model *m) {
    qlr_hash64 h;
    qlr_hash64_init(&h, 0x6e6634ull); /* "nf4" */
    for (int32_t l = 0; l < m->cfg.n_layers; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            uint8_t b[8];
            for (int k = 0; k < 8; k++) b[k] = (uint8_t)(m->layers[l].nf4_hash[i] >> (8 * k));
            qlr_hash64_update(&h, b, 8);
        }
    return qlr_hash64_final(&h);
}

void qlr_model_hash_hex(uint64_t h, char buf[17]) { snprintf(buf, 17, "%016llx", (unsigned long long)h); }

void qlr_model_weight_items(const qlr_model_config *c, int dq, qlr_mem_item_fn fn, void *ud) {
    const char *g = "weights";
    uint64_t L = (uint64_t)c->n_layers, d = (uint64_t)c->d_model, V = (uint64_t)c->n_vocab;
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        int64_t out, in;
        qlr_model_linear_shape(c, (qlr_linear_id)i, &out, &in);
        char nm[64];
        snprintf(nm, sizeof nm, "blk.*.%s", qlr_linear_gguf_name((qlr_linear_id)i));
        qlr_backend_nf4_items(out, in, dq, L, g, nm, fn, ud);
        if (c->qkv_bias && i <= QLR_LIN_V) {
            snprintf(nm, sizeof nm, "blk.*.%s bias f32", qlr_linear_gguf_name((qlr_linear_id)i));
            fn(ud, g, nm, L, (uint64_t)out * 4);
        }
    }
    fn(ud, g, "token_embd bf16 [vocab, d_model]", 1, V * d * 2);
    if (!c->tied_embeddings) fn(ud, g, "output (lm_head) bf16 [vocab, d_model]", 1, V * d * 2);
    fn(ud, g, "blk.*.attn_norm, ffn_norm f32 [d_model]", 2 * L, d * 4);
    fn(ud, g, "output_norm f32 [d_model]", 1, d * 4);
    fn(ud, g, "RoPE inverse frequencies f32 [head_dim/2]", 1, (uint64_t)c->head_dim / 2 * 4);
}

void qlr_model_free(qlr_model *m) {
    if (!m) return;
    qlr_backend *be = m->be;
    if (m->layers) {
        for (int32_t l = 0; l < m->cfg.n_layers; l++) {
            qlr_layer *L = &m->layers[l];
            if (L->attn_norm) be->mem.free(be, L->attn_norm);
            if (L->ffn_norm) be->mem.free(be, L->ffn_norm);
            for (int i = 0; i < QLR_LIN_COUNT; i++) {
                qlr_backend_nf4_free(be, &L->w[i]);
                if (L->bias[i]) be->mem.free(be, L->bias[i]);
            }
        }
        free(m->layers);
    }
    if (m->lm_head_nf4) {
        qlr_backend_nf4_free(be, m->lm_head_nf4);
        free(m->lm_head_nf4);
    }
    if (m->lm_head && m->lm_head != m->tok_embd) be->mem.free(be, m->lm_head);
    if (m->tok_embd) be->mem.free(be, m->tok_embd);
    if (m->out_norm) be->mem.free(be, m->out_norm);
    if (m->inv_freq) be->mem.free(be, m->inv_freq);
    free(m->source);
    free(m);
}

void qlr_model_linear_shape(const qlr_model_config *c, qlr_linear_id id, int64_t *out, int64_t *in) {
    int64_t d = c->d_model, q = (int64_t)c->n_heads * c->head_dim,
            kv = (int64_t)c->n_kv_heads * c->head_dim;
    switch (id) {
    case QLR_LIN_Q: *out = q, *in = d; break;
    case QLR_LIN_K:
    case QLR_LIN_V: *out = kv, *in = d; break;
    case QLR_LIN_O: *out = d, *in = q; break;
    case QLR_LIN_GATE:
    case QLR_LIN_UP: *out = c->d_ff, *in = d; break;
    default: *out = d, *in = c->d_ff; break;
    }
}

