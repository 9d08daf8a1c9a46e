/* model/config.c: the architecture config, read from GGUF metadata (spec §4.5: the
 * `<arch>.*` keys) or from an HF config.json, validated, and the RoPE inverse-frequency table
 * (plain, linear, llama3 and GGUF rope_freqs scaling). Knows nothing about weights. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "formats/gguf.h"
#include "formats/json.h"
#include "model/model.h"

static const char *k_supported = "llama, qwen2";

const char *qlr_linear_hf_name(qlr_linear_id id) {
    static const char *n[] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    return id < QLR_LIN_COUNT ? n[id] : "?";
}

const char *qlr_linear_gguf_name(qlr_linear_id id) {
    static const char *n[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
    return id < QLR_LIN_COUNT ? n[id] : "?";
}

static qlr_status gguf_u32(const qlr_gguf *g, const char *arch, const char *key, int required,
                           uint32_t def, int32_t *out) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    uint64_t v;
    qlr_status st = qlr_gguf_get_uint(g, full, &v);
    if (st == QLR_ERR_NOT_FOUND && !required) {
        qlr_error_clear();
        *out = (int32_t)def;
        return QLR_OK;
    }
    if (st == QLR_ERR_NOT_FOUND)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: missing metadata key '%s'", qlr_gguf_path(g), full);
    if (st != QLR_OK) return st;
    if (v > INT32_MAX)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: key '%s' = %llu is out of range", qlr_gguf_path(g),
                          full, (unsigned long long)v);
    *out = (int32_t)v;
    return QLR_OK;
}

static qlr_status gguf_f32(const qlr_gguf *g, const char *arch, const char *key, int required,
                           float def, float *out) {
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    double v;
    qlr_status st = qlr_gguf_get_float(g, full, &v);
    if (st == QLR_ERR_NOT_FOUND && !required) {
        qlr_error_clear();
        *out = def;
        return QLR_OK;
    }
    if (st == QLR_ERR_NOT_FOUND)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: missing metadata key '%s'", qlr_gguf_path(g), full);
    if (st != QLR_OK) return st;
    *out = (float)v;
    return QLR_OK;
}

qlr_status qlr_model_config_from_gguf(const qlr_gguf *g, qlr_model_config *c) {
    memset(c, 0, sizeof *c);
    const char *s;
    uint64_t len;
    const char *path = qlr_gguf_path(g);
    qlr_status st = qlr_gguf_get_str(g, "general.architecture", &s, &len);
    if (st == QLR_ERR_NOT_FOUND)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: missing metadata key 'general.architecture'", path);
    QLR_TRY(st);
    if (len >= sizeof c->arch) len = sizeof c->arch - 1;
    memcpy(c->arch, s, len);
    c->arch[len] = 0;
    if (strcmp(c->arch, "llama") && strcmp(c->arch, "qwen2"))
        return qlr_errorf(QLR_ERR_UNSUPPORTED,
                          "%s: architecture '%s' is not supported yet (supported: %s)", path,
                          c->arch, k_supported);
    const char *a = c->arch;
    QLR_TRY(gguf_u32(g, a, "block_count", 1, 0, &c->n_layers));
    QLR_TRY(gguf_u32(g, a, "embedding_length", 1, 0, &c->d_model));
    QLR_TRY(gguf_u32(g, a, "feed_forward_length", 1, 0, &c->d_ff));
    QLR_TRY(gguf_u32(g, a, "attention.head_count", 1, 0, &c->n_heads));
    QLR_TRY(gguf_u32(g, a, "attention.head_count_kv", 0, (uint32_t)c->n_heads, &c->n_kv_heads));
    QLR_TRY(gguf_u32(g, a, "context_length", 1, 0, &c->ctx_train));
    QLR_TRY(gguf_f32(g, a, "attention.layer_norm_rms_epsilon", 1, 0, &c->rms_eps));
    QLR_TRY(gguf_f32(g, a, "rope.freq_base", 0, 10000.0f, &c->rope_theta));
    int32_t def_hd = c->n_heads > 0 ? c->d_model / c->n_heads : 0, rot;
    QLR_TRY(gguf_u32(g, a, "attention.key_length", 0, (uint32_t)def_hd, &c->head_dim));
    int32_t vlen;
    QLR_TRY(gguf_u32(g, a, "attention.value_length", 0, (uint32_t)c->head_dim, &vlen));
    if (vlen != c->head_dim)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: %s.attention.value_length %d != key_length %d",
                          path, a, vlen, c->head_dim);
    QLR_TRY(gguf_u32(g, a, "rope.dimension_count", 0, (uint32_t)c->head_dim, &rot));
    if (rot != c->head_dim)
        return qlr_errorf(QLR_ERR_UNSUPPORTED,
                          "%s: %s.rope.dimension_count %d != head dim %d (partial rotary is not "
                          "supported)", path, a, rot, c->head_dim);
    const qlr_gguf_tensor *emb = qlr_gguf_find_tensor(g, "token_embd.weight");
    uint64_t n_tok = 0;
    qlr_gguf_type et;
    const void *ed;
    if (qlr_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n_tok, &ed) != QLR_OK) {
        qlr_error_clear();
        n_tok = 0;
    }
    QLR_TRY(gguf_u32(g, a, "vocab_size", 0,
                     (uint32_t)(n_tok ? n_tok : (emb ? emb->ne[1] : 0)), &c->n_vocab));
    /* rope scaling: "linear" in metadata; llama3 arrives as a rope_freqs.weight tensor */
    char key[128];
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    if (qlr_gguf_get_str(g, key, &s, &len) == QLR_OK) {
        if (len == 6 && !memcmp(s, "linear", 6)) {
            c->rope_scaling = QLR_ROPE_SCALING_LINEAR;
            QLR_TRY(gguf_f32(g, a, "rope.scaling.factor", 1, 1.0f, &c->rope_factor));
        } else if (!(len == 4 && !memcmp(s, "none", 4))) {
            return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: %s = '%.*s' is not supported (none, linear)",
                              path, key, (int)len, s);
        }
    } else {
        qlr_error_clear();
    }
    if (qlr_gguf_find_tensor(g, "rope_freqs.weight")) c->rope_scaling = QLR_ROPE_SCALING_FREQS;
    c->tied_embeddings = qlr_gguf_find_tensor(g, "output.weight") == NULL;
    c->qkv_bias = qlr_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    return qlr_model_config_validate(c, path);
}

qlr_status qlr_model_config_from_hf(const char *path, qlr_model_config *c) {
    memset(c, 0, sizeof *c);
    json_t *j = NULL;
    QLR_TRY(qlr_json_load_file(path, &j));
    qlr_status st = QLR_OK;
    const char *mt = NULL;
    json_t *archs = json_object_get(j, "architectures");
    const char *arch0 = json_is_array(archs) && json_array_size(archs) > 0
                            ? json_string_value(json_array_get(archs, 0)) : NULL;
    if ((st = qlr_json_get_string_opt(j, path, "model_type", NULL, &mt)) != QLR_OK) goto done;
    if (!mt) mt = "?";
    if (!strcmp(mt, "llama") || !strcmp(mt, "mistral")) {
        strcpy(c->arch, "llama");
    } else if (!strcmp(mt, "qwen2")) {
        strcpy(c->arch, "qwen2");
        c->qkv_bias = 1;
    } else {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: architecture '%s' is not supported yet "
                        "(supported: llama, mistral, qwen2)", path, arch0 ? arch0 : mt);
        goto done;
    }
    int64_t v;
    double d;
#define GETI(key, dst)                                                   \
    if ((st = qlr_json_get_int(j, path, key, &v)) != QLR_OK) goto done;  \
    dst = (int32_t)v;
    GETI("hidden_size", c->d_model);
    GETI("num_hidden_layers", c->n_layers);
    GETI("num_attention_heads", c->n_heads);
    GETI("intermediate_size", c->d_ff);
    GETI("vocab_size", c->n_vocab);
#undef GETI
    if ((st = qlr_json_get_int_opt(j, path, "num_key_value_heads", c->n_heads, &v))) goto done;
    c->n_kv_heads = (int32_t)v;
    if ((st = qlr_json_get_int_opt(j, path, "head_dim", c->n_heads ? c->d_model / c->n_heads : 0, &v)))
        goto done;
    c->head_dim = (int32_t)v;
    if ((st = qlr_json_get_int_opt(j, path, "max_position_embeddings", 4096, &v))) goto done;
    c->ctx_train = (int32_t)v;
    if ((st = qlr_json_get_double_opt(j, path, "rms_norm_eps", 1e-6, &d))) goto done;
    c->rms_eps = (float)d;
    if ((st = qlr_json_get_double_opt(j, path, "rope_theta", 10000.0, &d))) goto done;
    c->rope_theta = (float)d;
    int tie;
    if ((st = qlr_json_get_bool_opt(j, path, "tie_word_embeddings", 0, &tie))) goto done;
    c->tied_embeddings = tie;
    int bias;
    if ((st = qlr_json_get_bool_opt(j, path, "attention_bias", c->qkv_bias, &bias))) goto done;
    c->qkv_bias = bias;
    json_t *rs = NULL;
    if ((st = qlr_json_get_object_opt(j, path, "rope_scaling", &rs))) goto done;
    if (rs) {
        const char *rt = NULL;
        if ((st = qlr_json_get_string_opt(rs, path, "rope_type", NULL, &rt))) goto done;
        if (!rt && (st = qlr_json_get_string_opt(rs, path, "type", NULL, &rt))) goto done;
        if (!rt || !strcmp(rt, "default")) {
        } else if (!strcmp(rt, "linear")) {
            c->rope_scaling = QLR_ROPE_SCALING_LINEAR;
            if ((st = qlr_json_get_double(rs, path, "factor", &d))) goto done;
            c->rope_factor = (float)d;
        } else if (!strcmp(rt, "llama3")) {
            c->rope_scaling = QLR_ROPE_SCALING_LLAMA3;
            if ((st = qlr_json_get_double(rs, path, "factor", &d))) goto done;
            c->rope_factor = (float)d;
            if ((st = qlr_json_get_double_opt(rs, path, "low_freq_factor", 1.0, &d))) goto done;
            c->rope_low_freq_factor = (float)d;
            if ((st = qlr_json_get_double_opt(rs, path, "high_freq_factor", 4.0, &d))) goto done;
            c->rope_high_freq_factor = (float)d;
            if ((st = qlr_json_get_int_opt(rs, path, "original_max_position_embeddings", 8192, &v)))
                goto done;
            c->rope_orig_ctx = (int32_t)v;
        } else {
            st = qlr_errorf(QLR_ERR_UNSUPPORTED,
                            "%s: rope_scaling type '%s' is not supported (linear, llama3)", path, rt);
            goto done;
        }
    }
    st = qlr_model_config_validate(c, path);
done:
    json_decref(j);
    return st;
}

qlr_status qlr_model_config_validate(const qlr_model_config *c, const char *src) {
#define RANGE(f, lo, hi)                                                                       \
    if (c->f < (lo) || c->f > (hi))                                                            \
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %s = %d is out of range [%d, %d]", src, #f,     \
                          (int)c->f, (int)(lo), (int)(hi));
    RANGE(n_layers, 1, 1024);
    RANGE(d_model, 1, 1 << 16);
    RANGE(n_heads, 1, 1024);
    RANGE(n_kv_heads, 1, 1024);
    RANGE(head_dim, 2, 1024);
    RANGE(d_ff, 1, 1 << 20);
    RANGE(n_vocab, 1, 1 << 24);
    RANGE(ctx_train, 1, 1 << 24);
#undef RANGE
    if (c->n_heads % c->n_kv_heads)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %d attention heads are not a multiple of %d KV heads",
                          src, c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: head dim %d is odd", src, c->head_dim);
    if (!(c->rms_eps > 0 && c->rms_eps < 1))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: rms_norm_eps %g out of range", src, c->rms_eps);
    if (!(c->rope_theta > 0))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: rope theta %g out of range", src, c->rope_theta);
    if ((c->rope_scaling == QLR_ROPE_SCALING_LINEAR || c->rope_scaling == QLR_ROPE_SCALING_LLAMA3) &&
        !(c->rope_factor > 0))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: rope scaling factor %g out of range", src,
                          c->rope_factor);
    return QLR_OK;
}

void qlr_model_rope_inv_freq(const qlr_model_config *c, const float *freqs, float *out) {
    int32_t half = c->head_dim / 2;
    for (int32_t j = 0; j < half; j++) {
        /* as HF: 1 / base^(2j/d) computed in f32 from an int64 arange */
        float f = 1.0f / powf(c->rope_theta, (float)(2 * j) / (float)c->head_dim);
        switch (c->rope_scaling) {
        case QLR_ROPE_SCALING_LINEAR:
            f /= c->rope_factor;
            break;
        case QLR_ROPE_SCALING_FREQS:
            if (freqs) f /= freqs[j];
            break;
        case QLR_ROPE_SCALING_LLAMA3: {
            /* HF _compute_llama3_parameters: wavelengths above orig/low are divided by factor,
             * below orig/high kept, in between smoothly interpolated. */
            float lo_wl = (float)c->rope_orig_ctx / c->rope_low_freq_factor;
            float hi_wl = (float)c->rope_orig_ctx / c->rope_high_freq_factor;
            float wl = 2.0f * (float)M_PI / f;
            if (wl > lo_wl) {
                f = f / c->rope_factor;
            } else if (wl >= hi_wl) {
                float sm = ((float)c->rope_orig_ctx / wl - c->rope_low_freq_factor) /
                           (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1.0f - sm) * f / c->rope_factor + sm * f;
            }
            break;
        }
        default:
            break;
        }
        out[j] = f;
    }
}

void qlr_model_config_print(const qlr_model_config *c, FILE *out) {
    static const char *rs[] = {"none", "linear", "llama3", "rope_freqs"};
    fprintf(out, "%s: %d layers, d_model %d, heads %d/%d x %d, d_ff %d, vocab %d, ctx %d, "
                 "rope theta %g (%s scaling), eps %g%s%s\n",
            c->arch, c->n_layers, c->d_model, c->n_heads, c->n_kv_heads, c->head_dim, c->d_ff,
            c->n_vocab, c->ctx_train, c->rope_theta, rs[c->rope_scaling], c->rms_eps,
            c->tied_embeddings ? ", tied embeddings" : "", c->qkv_bias ? ", qkv bias" : "");
}
