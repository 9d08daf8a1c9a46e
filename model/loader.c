/* model/loader.c: loads a base model into the NF4 store on a backend, streaming tensor by
 * tensor: dequantize one GGUF tensor to f32 on the host (quant/ggml_quants.h), un-permute the
 * Q/K rows of llama GGUFs (spec §4.6), quantize decoder linears to NF4 (double quant) and upload
 * them; embeddings/lm_head become bf16 and norms/biases stay f32. A GGUF written by
 * `qlora export-base` carries the NF4 scale state of every linear (qlora.nf4.*, written by
 * export_gguf.c): its linears are rebuilt on that state instead of re-quantized, so the store
 * is the exporter's byte for byte (checked per tensor by the deviation, and overall by the
 * recorded hash). HF safetensors folders go
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

/* The recorded NF4 state of an export-base GGUF (all arrays borrowed from the mapping; the
 * per-tensor slices are found by walking the config's shapes in (layer, linear) order). */
typedef struct nf4_rec {
    int present;
    int dq;
    const uint8_t *absmax_q; /* dq */
    const uint8_t *dq_absmax; /* dq: f32 LE, unaligned */
    const uint8_t *absmax;    /* !dq: f32 LE, unaligned */
    const uint8_t *offsets;   /* dq: one f32 per tensor */
    uint64_t n_aq, n_dqa, n_abs, n_off;
    uint64_t hash;            /* recorded model hash, 0 = none */
    uint64_t at_blocks, at_dq, at_tensor; /* walk position */
} nf4_rec;

static qlr_status rec_arr(const qlr_gguf *g, const char *key, qlr_gguf_type want, const uint8_t **data,
                          uint64_t *n) {
    qlr_gguf_type t;
    const void *d;
    qlr_status st = qlr_gguf_get_arr(g, key, &t, n, &d);
    if (st != QLR_OK) return qlr_error_prefix("%s", qlr_gguf_path(g));
    if (t != want)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %s: array of %s, expected %s", qlr_gguf_path(g), key,
                          qlr_gguf_type_name(t), qlr_gguf_type_name(want));
    *data = d;
    return QLR_OK;
}

/* Reads qlora.nf4.* when present and usable with the load's double-quant mode. */
static qlr_status nf4_rec_open(const qlr_gguf *g, const qlr_model_load_params *p, nf4_rec *r) {
    memset(r, 0, sizeof *r);
    uint32_t ver = 0;
    qlr_status st = qlr_gguf_get_u32(g, "qlora.nf4.version", &ver);
    if (st == QLR_ERR_NOT_FOUND) {
        qlr_error_clear();
        return QLR_OK;
    }
    if (st != QLR_OK) return qlr_error_prefix("%s", qlr_gguf_path(g));
    uint32_t bs = 0;
    int dq = 0;
    if (ver != 1 || qlr_gguf_get_u32(g, "qlora.nf4.block_size", &bs) != QLR_OK || bs != QLR_NF4_BLOCK ||
        qlr_gguf_get_bool(g, "qlora.nf4.double_quant", &dq) != QLR_OK) {
        qlr_error_clear();
        QLR_LOGW("%s: qlora.nf4.* (version %u) not understood; its linears are quantized afresh",
                 qlr_gguf_path(g), ver);
        return QLR_OK;
    }
    if (!dq != !p->double_quant) {
        QLR_LOGI("%s: the recorded NF4 state is %s double quantization, this load is not: linears are "
                 "quantized afresh", qlr_gguf_path(g), dq ? "with" : "without");
        return QLR_OK;
    }
    r->dq = dq;
    if (dq) {
        QLR_TRY(rec_arr(g, "qlora.nf4.absmax_q", QLR_GGUF_UINT8, &r->absmax_q, &r->n_aq));
        QLR_TRY(rec_arr(g, "qlora.nf4.dq_absmax", QLR_GGUF_FLOAT32, &r->dq_absmax, &r->n_dqa));
        QLR_TRY(rec_arr(g, "qlora.nf4.dq_offset", QLR_GGUF_FLOAT32, &r->offsets, &r->n_off));
    } else {
        QLR_TRY(rec_arr(g, "qlora.nf4.absmax", QLR_GGUF_FLOAT32, &r->absmax, &r->n_abs));
    }
    const char *hs;
    uint64_t hl;
    if (qlr_gguf_get_str(g, "qlora.nf4.hash", &hs, &hl) == QLR_OK && hl == 16) {
        char tmp[17];
        memcpy(tmp, hs, 16);
        tmp[16] = 0;
        char *end = NULL;
        r->hash = strtoull(tmp, &end, 16);
        if (*end) r->hash = 0;
    }
    qlr_error_clear();
    r->present = 1;
    return QLR_OK;
}

static float rd_f32le(const uint8_t *p) {
    uint32_t u = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The largest |w - dequant| / |absmax| a rebuilt store may show: above every rounding an
 * export type makes (q8_0 <= 0.004, bf16 <= 0.002), below what unrelated weights give (~0.05). */
#define NF4_REBUILD_MAX_DEV 0.01f

/* Builds the store of the next linear in walk order from the recorded state when the weights fit
 * it; *used = 0 when they do not (the caller quantizes afresh). Advances the walk either way. */
static qlr_status nf4_rec_take(nf4_rec *r, const char *path, const char *name, const float *w, int64_t rows,
                               int64_t cols, qlr_nf4 *host, int *used) {
    *used = 0;
    int64_t nb = (rows * cols + QLR_NF4_BLOCK - 1) / QLR_NF4_BLOCK, ndq = (nb + QLR_NF4_DQ_BLOCK - 1) / QLR_NF4_DQ_BLOCK;
    uint64_t b0 = r->at_blocks, d0 = r->at_dq, t0 = r->at_tensor;
    r->at_blocks += (uint64_t)nb;
    r->at_dq += (uint64_t)ndq;
    r->at_tensor++;
    if (r->dq ? (r->at_blocks > r->n_aq || r->at_dq > r->n_dqa || r->at_tensor > r->n_off) : r->at_blocks > r->n_abs)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: qlora.nf4.* arrays end before tensor '%s'", path, name);
    float *tmp = malloc((size_t)(r->dq ? ndq : nb) * sizeof(float));
    if (!tmp) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    const uint8_t *src = r->dq ? r->dq_absmax + 4 * d0 : r->absmax + 4 * b0;
    for (int64_t i = 0; i < (r->dq ? ndq : nb); i++) tmp[i] = rd_f32le(src + 4 * i);
    qlr_nf4_state s = {r->dq, r->dq ? NULL : tmp, r->dq ? r->absmax_q + b0 : NULL, r->dq ? tmp : NULL,
                       r->dq ? rd_f32le(r->offsets + 4 * t0) : 0.0f};
    float dev = 0.0f;
    qlr_status st = qlr_nf4_from_state(w, rows, cols, &s, host, &dev);
    free(tmp);
    QLR_TRY(st);
    if (!(dev <= NF4_REBUILD_MAX_DEV)) {
        QLR_LOGW("%s: tensor '%s' does not hold the dequantized values of its recorded NF4 state "
                 "(deviation %.3g of the block scale): quantized afresh", path, name, (double)dev);
        qlr_nf4_free(host);
        return QLR_OK;
    }
    *used = 1;
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
    int32_t file_layers = c->n_layers;
    nf4_rec rec;
    int n_rebuilt = 0;
    if ((st = nf4_rec_open(g, p, &rec)) != QLR_OK) goto done;
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
            int rebuilt = 0;
            qlr_nf4 host;
            if (st == QLR_OK && rec.present) st = nf4_rec_take(&rec, path, name, buf, out, in, &host, &rebuilt);
            if (st == QLR_OK && rebuilt) {
                st = qlr_model_upload_nf4_store(m, &host, &L->w[i], &L->nf4_hash[i]);
                qlr_nf4_free(&host);
                n_rebuilt++;
            } else if (st == QLR_OK) {
                st = qlr_model_upload_nf4(m, buf, out, in, p->double_quant, &L->w[i], &L->nf4_hash[i]);
            }
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
    m->nf4_hash = qlr_model_nf4_hash(m);
    if (rec.present) {
        char want[17], got[17];
        qlr_model_hash_hex(rec.hash, want);
        qlr_model_hash_hex(m->nf4_hash, got);
        int all = c->n_layers * QLR_LIN_COUNT;
        if (n_rebuilt == all && c->n_layers == file_layers && rec.hash && rec.hash != m->nf4_hash)
            QLR_LOGW("%s: the NF4 store rebuilt from qlora.nf4.* hashes to %s, the file records %s (the "
                     "file was changed after export?)", path, got, want);
        else
            QLR_LOGI("%s: %d of %d linears rebuilt on their recorded NF4 state (nf4 %s)", path, n_rebuilt, all, got);
    }
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
    if (!m->nf4_hash) m->nf4_hash = qlr_model_nf4_hash(m);
    *out = m;
    return QLR_OK;
}
