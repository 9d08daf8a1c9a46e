/* model/export_gguf.c: a loaded model written as a llama.cpp GGUF (model/export_gguf.h): the
 * source GGUF's metadata and tensor list, the runtime's weights (NF4 dequantized, optionally plus
 * a merged delta), Q/K rows permuted back for llama, each tensor encoded to the type the chosen
 * mix gives it. Tensors are produced one at a time while the file is written
 * (qlr_gguf_add_tensor_fill), so memory stays at the largest tensor. */
#include "model/export_gguf.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "core/hash.h"
#include "model/model_internal.h"
#include "quant/ggml_quants.h"

static const char *const TYPE_NAMES[QLR_EXPORT_COUNT] = {"f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m"};

const char *qlr_export_type_name(qlr_export_type t) {
    return t >= 0 && t < QLR_EXPORT_COUNT ? TYPE_NAMES[t] : "?";
}

qlr_status qlr_export_type_parse(const char *s, qlr_export_type *out) {
    for (int i = 0; i < QLR_EXPORT_COUNT && s; i++) {
        const char *a = s, *b = TYPE_NAMES[i];
        while (*a && *b && tolower((unsigned char)*a) == *b) a++, b++;
        if (!*a && !*b) {
            *out = (qlr_export_type)i;
            return QLR_OK;
        }
    }
    return qlr_errorf(QLR_ERR_INVALID, "unknown type '%s' (known: f32, f16, bf16, q8_0, q6_k, q4_k_m)", s ? s : "");
}

uint32_t qlr_export_file_type(qlr_export_type t) {
    static const uint32_t ft[QLR_EXPORT_COUNT] = {0, 1, 32, 7, 18, 15};
    return t >= 0 && t < QLR_EXPORT_COUNT ? ft[t] : 0;
}

static int use_more_bits(int32_t layer, int32_t n) { /* llama.cpp's rule, restated */
    return layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

uint32_t qlr_export_tensor_type(qlr_export_type t, const char *name, int32_t layer, int32_t n_layers,
                                uint64_t ne0, uint32_t n_dims, int tied_embeddings) {
    if (n_dims < 2) return QLR_GGML_F32;
    uint32_t ty;
    switch (t) {
    case QLR_EXPORT_F32: return QLR_GGML_F32;
    case QLR_EXPORT_F16: return QLR_GGML_F16;
    case QLR_EXPORT_BF16: return QLR_GGML_BF16;
    case QLR_EXPORT_Q8_0: return ne0 % 32 ? QLR_GGML_F16 : QLR_GGML_Q8_0;
    case QLR_EXPORT_Q6_K: ty = QLR_GGML_Q6_K; break;
    case QLR_EXPORT_Q4_K_M: ty = QLR_GGML_Q4_K; break;
    default: return QLR_GGML_F16;
    }
    int head = !strcmp(name, "output.weight") || (tied_embeddings && !strcmp(name, "token_embd.weight"));
    if (head) {
        ty = ne0 % 256 ? QLR_GGML_Q8_0 : QLR_GGML_Q6_K;
    } else if (t == QLR_EXPORT_Q4_K_M && layer >= 0 &&
               (ends_with(name, ".attn_v.weight") || ends_with(name, ".ffn_down.weight")) &&
               use_more_bits(layer, n_layers)) {
        ty = QLR_GGML_Q6_K;
    }
    if ((ty == QLR_GGML_Q4_K || ty == QLR_GGML_Q6_K) && ne0 % 256)
        ty = ty == QLR_GGML_Q4_K ? QLR_GGML_Q5_0 : QLR_GGML_Q8_0;
    if (ne0 % (uint64_t)qlr_ggml_block_elems(ty)) ty = QLR_GGML_F16;
    return ty;
}

qlr_export_gguf_params qlr_export_gguf_params_default(void) {
    qlr_export_gguf_params p;
    memset(&p, 0, sizeof p);
    p.type = QLR_EXPORT_F16;
    return p;
}

/* ---- tensors ---- */

typedef enum src_kind { K_COPY, K_EMBD, K_OUTPUT, K_OUT_NORM, K_ATTN_NORM, K_FFN_NORM, K_LINEAR, K_BIAS } src_kind;

typedef struct ex_ctx ex_ctx;

typedef struct ex_tensor {
    ex_ctx *x;
    const qlr_gguf_tensor *src;
    src_kind kind;
    int32_t layer;
    qlr_linear_id id;
    uint32_t type;
    int64_t ne0, nrows;
} ex_tensor;

struct ex_ctx {
    const qlr_model *m;
    const qlr_export_gguf_params *p;
    float *scratch;          /* f32 of the largest tensor */
    int permuted;            /* llama: Q/K rows back to llama.cpp's order */
    qlr_progress *bar;
    int64_t done;
};

/* Splits "blk.N.rest" (N < n_layers); 0 when the name has no such prefix. */
static int block_name(const char *s, int32_t *layer, const char **rest) {
    if (strncmp(s, "blk.", 4)) return 0;
    const char *p = s + 4;
    if (*p < '0' || *p > '9') return 0;
    long v = 0;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p++ - '0');
        if (v > 1 << 20) return 0;
    }
    if (*p++ != '.') return 0;
    *layer = (int32_t)v;
    *rest = p;
    return 1;
}

static void classify(const qlr_model *m, ex_tensor *t) {
    const char *n = t->src->name, *rest;
    t->kind = K_COPY;
    t->layer = -1;
    if (!strcmp(n, "token_embd.weight")) t->kind = K_EMBD;
    else if (!strcmp(n, "output.weight") && !m->cfg.tied_embeddings) t->kind = K_OUTPUT;
    else if (!strcmp(n, "output_norm.weight")) t->kind = K_OUT_NORM;
    else if (block_name(n, &t->layer, &rest) && t->layer < m->cfg.n_layers) {
        if (!strcmp(rest, "attn_norm.weight")) t->kind = K_ATTN_NORM;
        else if (!strcmp(rest, "ffn_norm.weight")) t->kind = K_FFN_NORM;
        for (int i = 0; i < QLR_LIN_COUNT && t->kind == K_COPY; i++) {
            const char *g = qlr_linear_gguf_name((qlr_linear_id)i);
            size_t gl = strlen(g);
            if (strncmp(rest, g, gl)) continue;
            if (!strcmp(rest + gl, ".weight")) t->kind = K_LINEAR, t->id = (qlr_linear_id)i;
            else if (!strcmp(rest + gl, ".bias") && m->layers[t->layer].bias[i]) t->kind = K_BIAS, t->id = (qlr_linear_id)i;
        }
    }
}

/* The f32 values of one runtime tensor into x->scratch (rows in the GGUF's order). */
static qlr_status produce_f32(ex_tensor *t) {
    ex_ctx *x = t->x;
    const qlr_model *m = x->m;
    const qlr_model_config *c = &m->cfg;
    float *w = x->scratch;
    int64_t n = t->ne0 * t->nrows;
    switch (t->kind) {
    case K_EMBD:
    case K_OUTPUT: {
        const uint16_t *h = t->kind == K_EMBD ? m->tok_embd : m->lm_head;
        for (int64_t i = 0; i < n; i++) w[i] = qlr_bf16_to_f32(h[i]);
        return QLR_OK;
    }
    case K_OUT_NORM: memcpy(w, m->out_norm, (size_t)n * 4); return QLR_OK;
    case K_ATTN_NORM: memcpy(w, m->layers[t->layer].attn_norm, (size_t)n * 4); return QLR_OK;
    case K_FFN_NORM: memcpy(w, m->layers[t->layer].ffn_norm, (size_t)n * 4); return QLR_OK;
    case K_BIAS:
        memcpy(w, m->layers[t->layer].bias[t->id], (size_t)n * 4);
        if (x->permuted && (t->id == QLR_LIN_Q || t->id == QLR_LIN_K))
            QLR_TRY(qlr_permute_qk(w, t->id == QLR_LIN_Q ? c->n_heads : c->n_kv_heads, c->head_dim, 1));
        return QLR_OK;
    case K_LINEAR: {
        const qlr_nf4 *q = &m->layers[t->layer].w[t->id];
        qlr_nf4_dequant(q, w);
        if (x->p->delta) QLR_TRY(x->p->delta(x->p->delta_ud, t->layer, t->id, w, q->rows, q->cols));
        if (x->permuted && (t->id == QLR_LIN_Q || t->id == QLR_LIN_K))
            QLR_TRY(qlr_permute_qk(w, t->id == QLR_LIN_Q ? c->n_heads : c->n_kv_heads, c->head_dim, q->cols));
        return QLR_OK;
    }
    default: return qlr_errorf(QLR_ERR_INVALID, "export: no runtime tensor for %s", t->src->name);
    }
}

static qlr_status fill(void *ud, const char *name, void *out, uint64_t size) {
    (void)name;
    ex_tensor *t = ud;
    ex_ctx *x = t->x;
    qlr_status st;
    if (t->kind == K_COPY) {
        memcpy(out, t->src->data, (size_t)size);
        st = QLR_OK;
    } else {
        st = produce_f32(t);
        if (st == QLR_OK) st = qlr_ggml_quantize(t->type, x->scratch, t->ne0, t->nrows, out, (size_t)size);
    }
    qlr_progress_update(x->bar, (uint64_t)++x->done, NULL);
    return st;
}

/* ---- the recorded NF4 state (qlora.nf4.*, read back by loader.c) ---- */

static qlr_status add_nf4_state(const qlr_model *m, qlr_gguf_writer *w) {
    const qlr_model_config *c = &m->cfg;
    int dq = m->layers[0].w[0].dq;
    uint64_t nb = 0, ndq = 0, nt = (uint64_t)c->n_layers * QLR_LIN_COUNT;
    for (int32_t l = 0; l < c->n_layers; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            const qlr_nf4 *q = &m->layers[l].w[i];
            if (q->dq != dq)
                return qlr_errorf(QLR_ERR_UNSUPPORTED, "export: the linears mix double-quantized and plain stores");
            nb += (uint64_t)q->n_blocks;
            ndq += (uint64_t)q->n_dq_blocks;
        }
    uint8_t *aq = dq ? malloc(nb ? nb : 1) : NULL;
    float *fa = malloc((size_t)(dq ? (ndq ? ndq : 1) : (nb ? nb : 1)) * 4), *off = dq ? malloc(nt * 4) : NULL;
    qlr_status st = QLR_OK;
    if (!fa || (dq && (!aq || !off))) st = qlr_errorf(QLR_ERR_NOMEM, "export: out of memory");
    uint64_t kb = 0, kd = 0, kt = 0;
    for (int32_t l = 0; l < c->n_layers && st == QLR_OK; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            const qlr_nf4 *q = &m->layers[l].w[i];
            if (dq) {
                memcpy(aq + kb, q->absmax_q, (size_t)q->n_blocks);
                memcpy(fa + kd, q->dq_absmax, (size_t)q->n_dq_blocks * 4);
                off[kt++] = q->dq_offset;
            } else {
                memcpy(fa + kb, q->absmax, (size_t)q->n_blocks * 4);
            }
            kb += (uint64_t)q->n_blocks;
            kd += (uint64_t)q->n_dq_blocks;
        }
    char hex[17];
    qlr_model_hash_hex(m->nf4_hash, hex);
#define W(e) do { if (st == QLR_OK) st = (e); } while (0)
    W(qlr_gguf_set_u32(w, "qlora.nf4.version", 1));
    W(qlr_gguf_set_u32(w, "qlora.nf4.block_size", QLR_NF4_BLOCK));
    W(qlr_gguf_set_u32(w, "qlora.nf4.dq_block_size", QLR_NF4_DQ_BLOCK));
    W(qlr_gguf_set_bool(w, "qlora.nf4.double_quant", dq));
    W(qlr_gguf_set_str(w, "qlora.nf4.hash", hex));
    if (dq) {
        W(qlr_gguf_set_arr(w, "qlora.nf4.absmax_q", QLR_GGUF_UINT8, aq, nb));
        W(qlr_gguf_set_arr(w, "qlora.nf4.dq_absmax", QLR_GGUF_FLOAT32, fa, ndq));
        W(qlr_gguf_set_arr(w, "qlora.nf4.dq_offset", QLR_GGUF_FLOAT32, off, nt));
    } else {
        W(qlr_gguf_set_arr(w, "qlora.nf4.absmax", QLR_GGUF_FLOAT32, fa, nb));
    }
#undef W
    free(aq);
    free(fa);
    free(off);
    return st;
}

/* Keys the writer sets itself rather than copying from the source. */
static int key_replaced(const char *k) {
    return !strcmp(k, "general.file_type") || !strcmp(k, "general.quantization_version") ||
           !strcmp(k, "general.alignment") || !strncmp(k, "qlora.", 6);
}

qlr_status qlr_model_export_gguf(const qlr_model *m, const char *path, const qlr_export_gguf_params *p,
                                 qlr_export_stats *stats) {
    qlr_export_stats local;
    if (!stats) stats = &local;
    memset(stats, 0, sizeof *stats);
    const qlr_model_config *c = &m->cfg;
    if (!m->be->host_visible)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "export: the model must be loaded on the cpu backend");
    if (!m->source || qlr_is_dir(m->source))
        return qlr_errorf(QLR_ERR_UNSUPPORTED,
                          "export: %s is not a GGUF file: a GGUF export copies the source's tokenizer and "
                          "metadata, so it needs a GGUF base (convert an HF folder with llama.cpp's "
                          "convert_hf_to_gguf.py first, or use --format hf)",
                          m->source ? m->source : "the model");
    if (p->nf4_state && p->delta)
        return qlr_errorf(QLR_ERR_INVALID, "export: the NF4 state describes the base, not a merged model");
    qlr_gguf *g = NULL;
    QLR_TRY(qlr_gguf_open(m->source, &g));
    qlr_model_config fc;
    qlr_status st = qlr_model_config_from_gguf(g, &fc);
    if (st == QLR_OK && fc.n_layers != c->n_layers)
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "export: the model was loaded with %d of its %d layers", c->n_layers,
                        fc.n_layers);
    int64_t nt = qlr_gguf_n_tensors(g);
    ex_tensor *ts = st == QLR_OK ? calloc((size_t)(nt ? nt : 1), sizeof *ts) : NULL;
    ex_ctx x = {m, p, NULL, !strcmp(c->arch, "llama"), NULL, 0};
    qlr_gguf_writer *w = st == QLR_OK ? qlr_gguf_writer_create(qlr_gguf_alignment(g)) : NULL;
    if (st == QLR_OK && (!ts || !w)) st = qlr_errorf(QLR_ERR_NOMEM, "export: out of memory");
    /* metadata: the source's, then ours */
    for (int64_t i = 0; i < qlr_gguf_n_kv(g) && st == QLR_OK; i++)
        if (!key_replaced(qlr_gguf_kv_key(g, i))) st = qlr_gguf_copy_kv(w, g, i);
    if (st == QLR_OK) st = qlr_gguf_set_u32(w, "general.file_type", qlr_export_file_type(p->type));
    if (st == QLR_OK) st = qlr_gguf_set_u32(w, "general.quantization_version", 2);
    if (st == QLR_OK && p->nf4_state) st = add_nf4_state(m, w);
    if (st == QLR_OK && p->meta) st = p->meta(p->meta_ud, w);
    /* tensors, in the source's order */
    int64_t biggest = 1;
    for (int64_t i = 0; i < nt && st == QLR_OK; i++) {
        ex_tensor *t = &ts[i];
        t->x = &x;
        t->src = qlr_gguf_tensor_at(g, i);
        classify(m, t);
        const qlr_gguf_tensor *s = t->src;
        t->ne0 = (int64_t)s->ne[0];
        t->nrows = 1;
        for (uint32_t d = 1; d < s->n_dims; d++) t->nrows *= (int64_t)s->ne[d];
        if (t->kind == K_COPY) {
            t->type = s->type;
            stats->n_copied++;
            if (strcmp(s->name, "rope_freqs.weight"))
                QLR_LOGW("export: %s: tensor '%s' is not one qlora runs; copied as it is", m->source, s->name);
        } else {
            t->type = qlr_export_tensor_type(p->type, s->name, t->layer, c->n_layers, s->ne[0], s->n_dims,
                                             c->tied_embeddings);
            /* what the mix would give rows of a multiple of 256: differs = a row-length fallback */
            stats->n_fallback += qlr_export_tensor_type(p->type, s->name, t->layer, c->n_layers, 1 << 20,
                                                        s->n_dims, c->tied_embeddings) != t->type;
            if (t->ne0 * t->nrows > biggest) biggest = t->ne0 * t->nrows;
        }
        size_t rb = 0;
        st = qlr_ggml_row_bytes(t->type, t->ne0, &rb);
        if (st != QLR_OK) {
            qlr_error_prefix("export: tensor '%s'", s->name);
            break;
        }
        st = qlr_gguf_add_tensor_fill(w, s->name, t->type, s->n_dims, s->ne, (uint64_t)rb * (uint64_t)t->nrows, fill, t);
        if (st == QLR_OK && t->type < 64) stats->n_by_type[t->type]++;
    }
    stats->n_tensors = nt;
    if (st == QLR_OK && !(x.scratch = malloc((size_t)biggest * 4)))
        st = qlr_errorf(QLR_ERR_NOMEM, "export: out of memory for %lld floats", (long long)biggest);
    if (st == QLR_OK) {
        if (p->progress) x.bar = qlr_progress_begin("export", (uint64_t)nt, "tensors");
        st = qlr_gguf_writer_write(w, path);
        qlr_progress_end(x.bar);
    }
    if (st == QLR_OK) {
        qlr_gguf *r = NULL; /* the size, and a check that the file reads back */
        st = qlr_gguf_open(path, &r);
        if (st == QLR_OK) stats->bytes = qlr_gguf_file_size(r);
        qlr_gguf_close(r);
    }
    free(x.scratch);
    free(ts);
    qlr_gguf_writer_free(w);
    qlr_gguf_close(g);
    return st;
}
