/* model/tools.c: two tools on top of the loader. qlr_model_print_nf4_error streams a GGUF and
 * prints, for every decoder linear, the error NF4 (double quant) makes against the file's
 * dequantized weights (`qlora inspect --nf4`). qlr_model_export_hf writes a loaded model's
 * weights exactly as the runtime uses them (NF4 dequantized, Q/K in HF order, bf16 embeddings
 * widened) as HF-named f32 safetensors + config.json: the golden reference's input. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/gguf.h"
#include "formats/json.h"
#include "formats/safetensors.h"
#include "model/model_internal.h"
#include "quant/ggml_quants.h"

qlr_status qlr_model_print_nf4_error(const char *path, FILE *out) {
    qlr_gguf *g = NULL;
    QLR_TRY(qlr_gguf_open(path, &g));
    qlr_model_config c;
    float *buf = NULL;
    qlr_status st = qlr_model_config_from_gguf(g, &c);
    if (st != QLR_OK) goto done;
    int64_t biggest = 0;
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        int64_t o, in;
        qlr_model_linear_shape(&c, (qlr_linear_id)i, &o, &in);
        if (o * in > biggest) biggest = o * in;
    }
    buf = malloc((size_t)biggest * 4);
    if (!buf) {
        st = qlr_errorf(QLR_ERR_NOMEM, "nf4 error report");
        goto done;
    }
    fprintf(out, "NF4 quantization error (block 64, double-quantized absmax) of %s\n", path);
    fprintf(out, "%-28s %-6s %-13s %11s %11s %11s\n", "tensor", "type", "shape", "rel RMS", "max rel",
            "max abs");
    double sum_err2 = 0, sum_ref2 = 0, worst_rel_rms = 0;
    int64_t n_all = 0;
    for (int32_t l = 0; l < c.n_layers && st == QLR_OK; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            char name[96];
            snprintf(name, sizeof name, "blk.%d.%s.weight", l, qlr_linear_gguf_name((qlr_linear_id)i));
            const qlr_gguf_tensor *t = qlr_gguf_find_tensor(g, name);
            int64_t o, in;
            qlr_model_linear_shape(&c, (qlr_linear_id)i, &o, &in);
            if (!t) {
                st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: tensor '%s' is missing", path, name);
                break;
            }
            if (t->ne[0] != (uint64_t)in || t->ne[1] != (uint64_t)o) {
                st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor '%s' has shape {%llu, %llu}, expected "
                                "{%lld, %lld}", path, name, (unsigned long long)t->ne[0],
                                (unsigned long long)t->ne[1], (long long)in, (long long)o);
                break;
            }
            if ((st = qlr_ggml_type_check(t->type)) != QLR_OK ||
                (st = qlr_ggml_dequant(t->type, t->data, (size_t)t->size, in, o, buf)) != QLR_OK) {
                qlr_error_prefix("%s: tensor '%s'", path, name);
                break;
            }
            qlr_nf4 q;
            qlr_nf4_err e;
            if ((st = qlr_nf4_quantize(buf, o, in, 1, &q)) != QLR_OK) break;
            st = qlr_nf4_error_stats(&q, buf, &e);
            qlr_nf4_free(&q);
            if (st != QLR_OK) break;
            char shape[32];
            snprintf(shape, sizeof shape, "[%lld, %lld]", (long long)o, (long long)in);
            fprintf(out, "%-28s %-6s %-13s %10.4f%% %10.2f%% %11.4g\n", name,
                    qlr_ggml_type_name(t->type), shape, 100 * e.rel_rms_err,
                    100 * e.max_rel_err, e.max_abs_err);
            sum_err2 += e.rms_err * e.rms_err * (double)(o * in);
            sum_ref2 += e.rms_ref * e.rms_ref * (double)(o * in);
            n_all += o * in;
            if (e.rel_rms_err > worst_rel_rms) worst_rel_rms = e.rel_rms_err;
        }
    if (st == QLR_OK)
        fprintf(out, "total: %d tensors, %lld weights, relative RMS error %.4f%% (worst tensor %.4f%%)\n",
                c.n_layers * QLR_LIN_COUNT, (long long)n_all,
                sum_ref2 > 0 ? 100 * sqrt(sum_err2 / sum_ref2) : 0.0, 100 * worst_rel_rms);
done:
    free(buf);
    qlr_gguf_close(g);
    return st;
}

/* ---- export ---- */

typedef struct {
    qlr_st_writer *w;
    float **bufs;
    int n, cap;
} export_ctx;

static float *ex_alloc(export_ctx *x, int64_t n) {
    if (x->n == x->cap) {
        int nc = x->cap ? 2 * x->cap : 64;
        float **nb = realloc(x->bufs, (size_t)nc * sizeof *nb);
        if (!nb) return NULL;
        x->bufs = nb, x->cap = nc;
    }
    float *p = malloc((size_t)(n > 0 ? n : 1) * 4);
    if (p) x->bufs[x->n++] = p;
    return p;
}

static qlr_status ex_add(export_ctx *x, const char *name, float *data, int64_t d0, int64_t d1) {
    uint64_t shape[2] = {(uint64_t)d0, (uint64_t)d1};
    uint32_t nd = d1 > 0 ? 2 : 1;
    uint64_t n = (uint64_t)d0 * (uint64_t)(d1 > 0 ? d1 : 1);
    return qlr_st_writer_add(x->w, name, QLR_ST_F32, nd, shape, data, n * 4);
}

static qlr_status ex_f32(export_ctx *x, qlr_backend *be, const char *name, const float *dev,
                         int64_t d0) {
    float *h = ex_alloc(x, d0);
    if (!h) return qlr_errorf(QLR_ERR_NOMEM, "export %s", name);
    QLR_TRY(be->mem.d2h(be, h, dev, (size_t)d0 * 4));
    QLR_TRY(be->mem.sync(be));
    return ex_add(x, name, h, d0, 0);
}

static qlr_status ex_bf16(export_ctx *x, qlr_backend *be, const char *name, const uint16_t *dev,
                          int64_t d0, int64_t d1) {
    float *h = ex_alloc(x, d0 * d1);
    if (!h) return qlr_errorf(QLR_ERR_NOMEM, "export %s", name);
    uint16_t *tmp = (uint16_t *)h + d0 * d1; /* upper half of the f32 buffer */
    QLR_TRY(be->mem.d2h(be, tmp, dev, (size_t)(d0 * d1) * 2));
    QLR_TRY(be->mem.sync(be));
    for (int64_t i = 0; i < d0 * d1; i++) h[i] = qlr_bf16_to_f32(tmp[i]); /* reads stay ahead */
    return ex_add(x, name, h, d0, d1);
}

static qlr_status ex_nf4(export_ctx *x, qlr_backend *be, const char *name, const qlr_nf4 *dev) {
    float *h = ex_alloc(x, dev->n);
    if (!h) return qlr_errorf(QLR_ERR_NOMEM, "export %s", name);
    qlr_nf4 q = *dev;
    q.owned = 0;
    uint8_t *codes = NULL, *aq = NULL;
    float *am = NULL, *dqa = NULL;
    if (!be->host_visible) { /* bring the store to the host */
        codes = malloc((size_t)(dev->n + 1) / 2);
        aq = malloc((size_t)dev->n_blocks + 1);
        am = malloc((size_t)dev->n_blocks * 4 + 4);
        dqa = malloc((size_t)dev->n_dq_blocks * 4 + 4);
        qlr_status st = QLR_OK;
        if (!codes || !aq || !am || !dqa) st = qlr_errorf(QLR_ERR_NOMEM, "export %s", name);
        if (st == QLR_OK) st = be->mem.d2h(be, codes, dev->codes, (size_t)(dev->n + 1) / 2);
        if (st == QLR_OK && dev->dq) st = be->mem.d2h(be, aq, dev->absmax_q, (size_t)dev->n_blocks);
        if (st == QLR_OK && dev->dq)
            st = be->mem.d2h(be, dqa, dev->dq_absmax, (size_t)dev->n_dq_blocks * 4);
        if (st == QLR_OK && !dev->dq) st = be->mem.d2h(be, am, dev->absmax, (size_t)dev->n_blocks * 4);
        if (st == QLR_OK) st = be->mem.sync(be);
        q.codes = codes, q.absmax_q = aq, q.absmax = am, q.dq_absmax = dqa;
        if (st != QLR_OK) {
            free(codes), free(aq), free(am), free(dqa);
            return st;
        }
    }
    qlr_nf4_dequant(&q, h);
    free(codes), free(aq), free(am), free(dqa);
    return ex_add(x, name, h, dev->rows, dev->cols);
}

static qlr_status write_config(const qlr_model *m, const char *path) {
    const qlr_model_config *c = &m->cfg;
    int qwen = !strcmp(c->arch, "qwen2");
    json_t *j = json_object();
    json_object_set_new(j, "architectures", json_pack("[s]", qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"));
    json_object_set_new(j, "model_type", json_string(qwen ? "qwen2" : "llama"));
    json_object_set_new(j, "hidden_size", json_integer(c->d_model));
    json_object_set_new(j, "intermediate_size", json_integer(c->d_ff));
    json_object_set_new(j, "num_hidden_layers", json_integer(c->n_layers));
    json_object_set_new(j, "num_attention_heads", json_integer(c->n_heads));
    json_object_set_new(j, "num_key_value_heads", json_integer(c->n_kv_heads));
    json_object_set_new(j, "head_dim", json_integer(c->head_dim));
    json_object_set_new(j, "vocab_size", json_integer(c->n_vocab));
    json_object_set_new(j, "max_position_embeddings", json_integer(c->ctx_train));
    json_object_set_new(j, "rms_norm_eps", json_real(c->rms_eps));
    json_object_set_new(j, "rope_theta", json_real(c->rope_theta));
    json_object_set_new(j, "tie_word_embeddings", json_boolean(c->tied_embeddings));
    json_object_set_new(j, "hidden_act", json_string("silu"));
    json_object_set_new(j, "attention_bias", json_boolean(c->qkv_bias));
    json_object_set_new(j, "mlp_bias", json_false());
    json_object_set_new(j, "torch_dtype", json_string("float32"));
    if (c->rope_scaling == QLR_ROPE_SCALING_LINEAR)
        json_object_set_new(j, "rope_scaling", json_pack("{s:s, s:f}", "rope_type", "linear",
                                                         "factor", (double)c->rope_factor));
    else if (c->rope_scaling == QLR_ROPE_SCALING_LLAMA3)
        json_object_set_new(j, "rope_scaling",
                            json_pack("{s:s, s:f, s:f, s:f, s:i}", "rope_type", "llama3", "factor",
                                      (double)c->rope_factor, "low_freq_factor",
                                      (double)c->rope_low_freq_factor, "high_freq_factor",
                                      (double)c->rope_high_freq_factor,
                                      "original_max_position_embeddings", c->rope_orig_ctx));
    else if (c->rope_scaling == QLR_ROPE_SCALING_FREQS)
        QLR_LOGW("export: the GGUF's rope_freqs table has no HF config equivalent; the exported "
                 "config.json has no rope_scaling (reference logits will differ at long range)");
    qlr_status st = qlr_json_write_file(path, j);
    json_decref(j);
    return st;
}

qlr_status qlr_model_export_hf(const qlr_model *m, const char *dir) {
    QLR_TRY(qlr_mkdir_p(dir));
    const qlr_model_config *c = &m->cfg;
    qlr_backend *be = m->be;
    export_ctx x = {qlr_st_writer_create(), NULL, 0, 0};
    if (!x.w) return qlr_error_status();
    qlr_status st = ex_bf16(&x, be, "model.embed_tokens.weight", m->tok_embd, c->n_vocab, c->d_model);
    if (st == QLR_OK) st = ex_f32(&x, be, "model.norm.weight", m->out_norm, c->d_model);
    if (st == QLR_OK && !c->tied_embeddings)
        st = ex_bf16(&x, be, "lm_head.weight", m->lm_head, c->n_vocab, c->d_model);
    for (int32_t l = 0; l < c->n_layers && st == QLR_OK; l++) {
        const qlr_layer *L = &m->layers[l];
        char n[128];
        snprintf(n, sizeof n, "model.layers.%d.input_layernorm.weight", l);
        st = ex_f32(&x, be, n, L->attn_norm, c->d_model);
        snprintf(n, sizeof n, "model.layers.%d.post_attention_layernorm.weight", l);
        if (st == QLR_OK) st = ex_f32(&x, be, n, L->ffn_norm, c->d_model);
        for (int i = 0; i < QLR_LIN_COUNT && st == QLR_OK; i++) {
            const char *grp = i <= QLR_LIN_O ? "self_attn" : "mlp";
            snprintf(n, sizeof n, "model.layers.%d.%s.%s.weight", l, grp, qlr_linear_hf_name((qlr_linear_id)i));
            st = ex_nf4(&x, be, n, &L->w[i]);
            if (st == QLR_OK && L->bias[i]) {
                snprintf(n, sizeof n, "model.layers.%d.%s.%s.bias", l, grp, qlr_linear_hf_name((qlr_linear_id)i));
                st = ex_f32(&x, be, n, L->bias[i], L->w[i].rows);
            }
        }
    }
    char path[4096];
    if (st == QLR_OK) {
        qlr_st_writer_set_metadata(x.w, "format", "pt");
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        st = qlr_st_writer_write(x.w, path);
    }
    if (st == QLR_OK) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        st = write_config(m, path);
    }
    qlr_st_writer_free(x.w);
    for (int i = 0; i < x.n; i++) free(x.bufs[i]);
    free(x.bufs);
    return st;
}
