/* adapters/lora_gguf.c: GGUF LoRA adapters as llama.cpp writes and reads them
 * (docs/FORMATS.md §4.1-4.3, §4.6). Export permutes lora_b rows of attn_q/attn_k per
 * head (llama arch: llama.cpp rotates adjacent pairs, our runtime and PEFT rotate halves); import
 * undoes it. Keys under qlora.* (base shapes, the original alpha, rsLoRA flag, dropout) make our
 * own files re-import losslessly; foreign files work without them given a base model.
 * It does not own the adapter object (lora.c) or the GGUF container (formats/gguf.c). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora_internal.h"
#include "core/core.h"
#include "formats/gguf.h"

#define MAX_LAYERS 4096

static int needs_qk_permute(const qlr_lora_base *b) { return !strcmp(b->arch, "llama"); }

/* Checks that the head layout is known and matches the module shape before permuting. */
static qlr_status qk_layout(const qlr_lora *l, const qlr_lora_module *m, qlr_linear_id id,
                            int32_t layer, const char *src, int64_t *heads) {
    *heads = id == QLR_LIN_Q ? l->base.n_heads : l->base.n_kv_heads;
    if (*heads <= 0 || l->base.head_dim <= 0 || l->base.head_dim % 2)
        return qlr_errorf(QLR_ERR_INVALID,
                          "%s: tensor blk.%d.%s.weight.lora_b: the head layout of the base model is "
                          "unknown, needed for llama.cpp's Q/K row permutation (give the base model, "
                          "e.g. -m MODEL)",
                          src, layer, qlr_linear_gguf_name(id));
    if ((int64_t)*heads * l->base.head_dim != m->out)
        return qlr_errorf(QLR_ERR_INVALID,
                          "%s: tensor blk.%d.%s.weight.lora_b: %d rows but %lld heads x %d",
                          src, layer, qlr_linear_gguf_name(id), m->out, (long long)*heads, l->base.head_dim);
    return QLR_OK;
}

qlr_status qlr_lora_save_gguf(const qlr_lora *l, const char *path) {
    if (!l->base.arch[0])
        return qlr_errorf(QLR_ERR_INVALID,
                          "%s: the adapter's base architecture is unknown (general.architecture is "
                          "required): give the base model, e.g. -m MODEL", path);
    qlr_gguf_writer *w = qlr_gguf_writer_create(0);
    if (!w) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    int perm = needs_qk_permute(&l->base);
    size_t nm = (size_t)l->base.n_layers * QLR_LIN_COUNT;
    float **copies = calloc(nm, sizeof *copies); /* permuted lora_b copies, kept until written */
    qlr_status st = copies ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    /* llama.cpp scale = alpha / r; with rsLoRA write alpha' = alpha * sqrt(r) so that
     * alpha' / r = alpha / sqrt(r). */
    float alpha_file = (float)(l->use_rslora ? l->alpha * sqrt((double)l->r) : l->alpha);
#define W(x) do { if (st == QLR_OK) st = (x); } while (0)
    W(qlr_gguf_set_str(w, "general.architecture", l->base.arch));
    W(qlr_gguf_set_str(w, "general.type", "adapter"));
    W(qlr_gguf_set_str(w, "adapter.type", "lora"));
    W(qlr_gguf_set_f32(w, "adapter.lora.alpha", alpha_file));
    W(qlr_gguf_set_u32(w, "general.quantization_version", 2));
    if (l->base_model) W(qlr_gguf_set_str(w, "qlora.base_model", l->base_model));
    const struct { const char *k; int32_t v; } bk[] = {
        {"qlora.base.block_count", l->base.n_layers},
        {"qlora.base.embedding_length", l->base.d_model},
        {"qlora.base.head_count", l->base.n_heads},
        {"qlora.base.head_count_kv", l->base.n_kv_heads},
        {"qlora.base.head_dim", l->base.head_dim},
        {"qlora.base.feed_forward_length", l->base.d_ff},
    };
    for (size_t i = 0; i < sizeof bk / sizeof bk[0]; i++)
        if (bk[i].v > 0) W(qlr_gguf_set_u32(w, bk[i].k, (uint32_t)bk[i].v));
    if (l->base.name[0]) W(qlr_gguf_set_str(w, "qlora.base.name", l->base.name));
    if (l->base.nf4_hash) {
        char hex[17];
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)l->base.nf4_hash);
        W(qlr_gguf_set_str(w, "qlora.base.nf4_hash", hex));
    }
    if (l->prompt_format) W(qlr_gguf_set_str(w, "qlora.prompt.format", l->prompt_format));
    if (l->prompt_system) W(qlr_gguf_set_str(w, "qlora.prompt.system", l->prompt_system));
    W(qlr_gguf_set_f64(w, "qlora.lora.alpha", l->alpha));
    W(qlr_gguf_set_bool(w, "qlora.lora.use_rslora", l->use_rslora));
    W(qlr_gguf_set_f64(w, "qlora.lora.dropout", l->dropout));
    char name[160];
    for (int32_t L = 0; L < l->base.n_layers && st == QLR_OK; L++)
        for (int id = 0; id < QLR_LIN_COUNT && st == QLR_OK; id++) {
            const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
            if (!m) continue;
            const float *b = m->b;
            uint64_t nb = (uint64_t)m->out * l->r;
            if (perm && (id == QLR_LIN_Q || id == QLR_LIN_K)) {
                int64_t heads = 0;
                W(qk_layout(l, m, (qlr_linear_id)id, L, path, &heads));
                float *c = st == QLR_OK ? malloc(nb * sizeof(float)) : NULL;
                if (st == QLR_OK && !c) st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
                if (st != QLR_OK) break;
                memcpy(c, m->b, nb * sizeof(float));
                copies[(size_t)L * QLR_LIN_COUNT + id] = c;
                W(qlr_permute_qk(c, heads, l->base.head_dim, l->r));
                b = c;
            }
            uint64_t ne_a[2] = {(uint64_t)m->in, (uint64_t)l->r};
            uint64_t ne_b[2] = {(uint64_t)l->r, (uint64_t)m->out};
            snprintf(name, sizeof name, "blk.%d.%s.weight.lora_a", L, qlr_linear_gguf_name((qlr_linear_id)id));
            W(qlr_gguf_add_tensor(w, name, QLR_GGML_F32, 2, ne_a, m->a, ne_a[0] * ne_a[1] * 4));
            snprintf(name, sizeof name, "blk.%d.%s.weight.lora_b", L, qlr_linear_gguf_name((qlr_linear_id)id));
            W(qlr_gguf_add_tensor(w, name, QLR_GGML_F32, 2, ne_b, b, nb * 4));
        }
    W(qlr_gguf_writer_write(w, path));
#undef W
    if (copies)
        for (size_t k = 0; k < nm; k++) free(copies[k]);
    free(copies);
    qlr_gguf_writer_free(w);
    return st;
}

/* ---- import ---- */

/* Splits "blk.N.<gguf linear>.weight.lora_a|b". Returns 1 on a match, 0 for a tensor llama.cpp
 * ignores (*_norm.weight), -1 for anything else. */
static int parse_name(const char *s, int32_t *layer, qlr_linear_id *id, int *half) {
    size_t n = strlen(s);
    if (n > 12 && !strcmp(s + n - 12, "_norm.weight")) return 0;
    if (strncmp(s, "blk.", 4)) return -1;
    const char *p = s + 4;
    if (*p < '0' || *p > '9') return -1;
    long L = 0;
    while (*p >= '0' && *p <= '9') {
        L = L * 10 + (*p++ - '0');
        if (L >= MAX_LAYERS) return -1;
    }
    if (*p++ != '.') return -1;
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        const char *g = qlr_linear_gguf_name((qlr_linear_id)i);
        size_t gl = strlen(g);
        if (strncmp(p, g, gl)) continue;
        const char *q = p + gl;
        if (!strcmp(q, ".weight.lora_a") || !strcmp(q, ".weight.lora_b")) {
            *layer = (int32_t)L;
            *id = (qlr_linear_id)i;
            *half = q[13] == 'b';
            return 1;
        }
    }
    return -1;
}

static qlr_status get_str(const qlr_gguf *g, const char *path, const char *key, char *buf, size_t n,
                          int required) {
    const char *s;
    uint64_t len;
    qlr_status st = qlr_gguf_get_str(g, key, &s, &len);
    if (st == QLR_ERR_NOT_FOUND && !required) {
        qlr_error_clear();
        buf[0] = 0;
        return QLR_OK;
    }
    if (st == QLR_ERR_NOT_FOUND) return qlr_errorf(QLR_ERR_FORMAT, "%s: missing key %s", path, key);
    if (st != QLR_OK) return qlr_error_prefix("%s", path);
    if (len >= n) len = n - 1;
    memcpy(buf, s, len);
    buf[len] = 0;
    return QLR_OK;
}

static qlr_status opt_u32(const qlr_gguf *g, const char *key, int32_t *out) {
    uint64_t v;
    qlr_status st = qlr_gguf_get_uint(g, key, &v);
    if (st == QLR_ERR_NOT_FOUND) {
        qlr_error_clear();
        return QLR_OK;
    }
    QLR_TRY(st);
    if (v > INT32_MAX) return qlr_errorf(QLR_ERR_FORMAT, "key %s: %llu is out of range", key, (unsigned long long)v);
    *out = (int32_t)v;
    return QLR_OK;
}

/* Reads tensor t (2-D, ne {cols, rows}) as f32 into dst[rows * cols]. */
static qlr_status tensor_f32(const qlr_gguf_tensor *t, float *dst) {
    if (t->type == QLR_GGML_F32) {
        memcpy(dst, t->data, t->ne[0] * t->ne[1] * sizeof(float));
        return QLR_OK;
    }
    qlr_status st = qlr_ggml_dequant(t->type, t->data, t->size, (int64_t)t->ne[0], (int64_t)t->ne[1], dst);
    if (st != QLR_OK) return qlr_error_prefix("tensor %s", t->name);
    return QLR_OK;
}

typedef struct pair {
    const qlr_gguf_tensor *t[2];
} pair;

static qlr_status load_gguf(qlr_gguf *g, const char *path, const qlr_lora_base *base, qlr_lora **out) {
    char s[64];
    QLR_TRY(get_str(g, path, "general.type", s, sizeof s, 1));
    if (strcmp(s, "adapter"))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: general.type is '%s', expected 'adapter' (not a LoRA adapter file)", path, s);
    QLR_TRY(get_str(g, path, "adapter.type", s, sizeof s, 1));
    if (strcmp(s, "lora"))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: adapter.type is '%s', only 'lora' is supported", path, s);
    qlr_lora_base fb;
    memset(&fb, 0, sizeof fb);
    QLR_TRY(get_str(g, path, "general.architecture", fb.arch, sizeof fb.arch, 1));
    if (base && base->arch[0] && strcmp(fb.arch, base->arch))
        return qlr_errorf(QLR_ERR_INVALID, "%s: adapter architecture '%s' does not match the base model's '%s'",
                          path, fb.arch, base->arch);
    float alpha_file = 0.0f;
    int has_alpha = 1;
    qlr_status st = qlr_gguf_get_f32(g, "adapter.lora.alpha", &alpha_file);
    if (st == QLR_ERR_NOT_FOUND) {
        qlr_error_clear();
        has_alpha = 0;
    } else if (st != QLR_OK) {
        return qlr_error_prefix("%s", path);
    } else if (!isfinite(alpha_file) || alpha_file < 0) {
        return qlr_errorf(QLR_ERR_FORMAT, "%s: adapter.lora.alpha is %g", path, (double)alpha_file);
    }
    int32_t file_layers = 0;
    if ((st = opt_u32(g, "qlora.base.block_count", &file_layers)) != QLR_OK ||
        (st = opt_u32(g, "qlora.base.embedding_length", &fb.d_model)) != QLR_OK ||
        (st = opt_u32(g, "qlora.base.head_count", &fb.n_heads)) != QLR_OK ||
        (st = opt_u32(g, "qlora.base.head_count_kv", &fb.n_kv_heads)) != QLR_OK ||
        (st = opt_u32(g, "qlora.base.head_dim", &fb.head_dim)) != QLR_OK ||
        (st = opt_u32(g, "qlora.base.feed_forward_length", &fb.d_ff)) != QLR_OK)
        return qlr_error_prefix("%s", path);
    if (file_layers > MAX_LAYERS) return qlr_errorf(QLR_ERR_FORMAT, "%s: qlora.base.block_count %d", path, file_layers);
    char hex[24];
    QLR_TRY(get_str(g, path, "qlora.base.name", fb.name, sizeof fb.name, 0));
    QLR_TRY(get_str(g, path, "qlora.base.nf4_hash", hex, sizeof hex, 0));
    if (hex[0] && qlr_lora_parse_hash_(hex, &fb.nf4_hash) != QLR_OK)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: qlora.base.nf4_hash '%s' is not 16 hex digits", path, hex);

    /* collect the pairs */
    int64_t nt = qlr_gguf_n_tensors(g);
    int32_t n_layers = file_layers;
    for (int64_t i = 0; i < nt; i++) {
        const qlr_gguf_tensor *t = qlr_gguf_tensor_at(g, i);
        int32_t L;
        qlr_linear_id id;
        int half;
        int k = parse_name(t->name, &L, &id, &half);
        if (k < 0)
            return qlr_errorf(QLR_ERR_UNSUPPORTED,
                              "%s: tensor '%s' is not a LoRA tensor of a decoder linear "
                              "(blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight.lora_{a,b})",
                              path, t->name);
        if (k == 1 && L + 1 > n_layers) n_layers = L + 1;
    }
    if (n_layers < 1) return qlr_errorf(QLR_ERR_FORMAT, "%s: no LoRA tensors", path);
    size_t nm = (size_t)n_layers * QLR_LIN_COUNT;
    pair *pairs = calloc(nm, sizeof *pairs);
    int32_t (*shapes)[2] = calloc(nm, sizeof *shapes);
    qlr_lora *l = NULL;
    if (!pairs || !shapes) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (int64_t i = 0; i < nt; i++) {
        const qlr_gguf_tensor *t = qlr_gguf_tensor_at(g, i);
        int32_t L;
        qlr_linear_id id;
        int half;
        if (parse_name(t->name, &L, &id, &half) != 1) continue;
        if (t->n_dims != 2) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s has %u dimensions, expected 2", path, t->name, t->n_dims);
            goto done;
        }
        if (t->ne[0] == 0 || t->ne[1] == 0 || t->ne[0] > INT32_MAX || t->ne[1] > INT32_MAX) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s: bad shape {%llu, %llu}", path, t->name,
                            (unsigned long long)t->ne[0], (unsigned long long)t->ne[1]);
            goto done;
        }
        pairs[(size_t)L * QLR_LIN_COUNT + id].t[half] = t;
    }
    int32_t r = 0;
    char tn[160];
    for (size_t k = 0; k < nm; k++) {
        pair *p = &pairs[k];
        if (!p->t[0] && !p->t[1]) continue;
        int32_t L = (int32_t)(k / QLR_LIN_COUNT);
        qlr_linear_id id = (qlr_linear_id)(k % QLR_LIN_COUNT);
        for (int h = 0; h < 2; h++)
            if (!p->t[h]) {
                qlr_lora_tensor_name_(tn, sizeof tn, 0, L, id, h);
                st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s is missing (its %s is present): both halves are required",
                                path, tn, h ? "lora_a" : "lora_b");
                goto done;
            }
        /* a: ne {in, r}; b: ne {r, out} */
        if (p->t[0]->ne[1] != p->t[1]->ne[0]) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s: rank %llu (ne[0]) but its lora_a has rank %llu (ne[1])",
                            path, p->t[1]->name, (unsigned long long)p->t[1]->ne[0],
                            (unsigned long long)p->t[0]->ne[1]);
            goto done;
        }
        int32_t rk = (int32_t)p->t[0]->ne[1];
        if (r && rk != r) {
            st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: tensor %s has rank %d, earlier tensors %d (one rank per adapter)",
                            path, p->t[0]->name, rk, r);
            goto done;
        }
        r = rk;
        shapes[k][0] = (int32_t)p->t[1]->ne[1];
        shapes[k][1] = (int32_t)p->t[0]->ne[0];
    }
    if (!r) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: no LoRA tensors", path);
        goto done;
    }
    if ((st = qlr_lora_alloc_(&fb, n_layers, r, (const int32_t(*)[2])shapes, &l)) != QLR_OK) goto done;
    /* the file's own shapes must agree with its qlora.base keys, then with the base model */
    if ((st = qlr_lora_check_base(l, &fb, path)) != QLR_OK) goto done;
    if (base) {
        if ((st = qlr_lora_check_base(l, base, path)) != QLR_OK) goto done;
        qlr_lora_adopt_base_(l, base);
        qlr_lora_warn_base(l, base, path);
    }
    for (size_t k = 0; k < nm; k++) {
        qlr_lora_module *m = &l->mods[k];
        if (!m->a) continue;
        if ((st = tensor_f32(pairs[k].t[0], m->a)) != QLR_OK || (st = tensor_f32(pairs[k].t[1], m->b)) != QLR_OK) {
            qlr_error_prefix("%s", path);
            goto done;
        }
        qlr_linear_id id = (qlr_linear_id)(k % QLR_LIN_COUNT);
        if (needs_qk_permute(&l->base) && (id == QLR_LIN_Q || id == QLR_LIN_K)) {
            int64_t heads = 0;
            if ((st = qk_layout(l, m, id, (int32_t)(k / QLR_LIN_COUNT), path, &heads)) != QLR_OK ||
                (st = qlr_unpermute_qk(m->b, heads, l->base.head_dim, r)) != QLR_OK)
                goto done;
        }
    }
    /* hyper-parameters: llama.cpp reads alpha 0 / absent as scale 1 (alpha = r). Our qlora.*
     * keys restore the exact alpha, rsLoRA and dropout when they agree with the file's alpha. */
    double alpha = has_alpha && alpha_file > 0 ? (double)alpha_file : (double)r;
    int rslora = 0;
    double dropout = 0.0, a0 = 0.0;
    int rs = 0;
    if (qlr_gguf_get_float(g, "qlora.lora.alpha", &a0) == QLR_OK &&
        qlr_gguf_get_bool(g, "qlora.lora.use_rslora", &rs) == QLR_OK) {
        float expect = (float)(rs ? a0 * sqrt((double)r) : a0);
        if (has_alpha && expect == alpha_file) {
            alpha = a0;
            rslora = rs;
        } else {
            QLR_LOGW("%s: qlora.lora.alpha %g does not match adapter.lora.alpha %g; using the latter",
                     path, a0, (double)alpha_file);
        }
    }
    qlr_error_clear();
    if (qlr_gguf_get_float(g, "qlora.lora.dropout", &dropout) != QLR_OK || !(dropout >= 0 && dropout < 1))
        dropout = 0.0;
    qlr_error_clear();
    qlr_lora_finish_(l, alpha, dropout, rslora);
    const char *pk[2] = {"qlora.prompt.format", "qlora.prompt.system"};
    for (int k = 0; k < 2; k++) {
        const char *ps;
        uint64_t pl;
        if (qlr_gguf_get_str(g, pk[k], &ps, &pl) != QLR_OK) continue;
        char *d = malloc(pl + 1);
        if (!d) {
            st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
            goto done;
        }
        memcpy(d, ps, pl);
        d[pl] = 0;
        if (k) l->prompt_system = d;
        else l->prompt_format = d;
    }
    qlr_error_clear();
    const char *bm;
    uint64_t bl;
    if (qlr_gguf_get_str(g, "qlora.base_model", &bm, &bl) == QLR_OK) {
        l->base_model = malloc(bl + 1);
        if (!l->base_model) {
            st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
            goto done;
        }
        memcpy(l->base_model, bm, bl);
        l->base_model[bl] = 0;
    }
    qlr_error_clear();
done:
    free(pairs);
    free(shapes);
    if (st != QLR_OK) {
        qlr_lora_free(l);
        l = NULL;
    }
    *out = l;
    return st;
}

qlr_status qlr_lora_load_gguf_mem_(const void *data, size_t size, const char *name, const qlr_lora_base *base,
                                   qlr_lora **out) {
    *out = NULL;
    qlr_gguf *g = NULL;
    QLR_TRY(qlr_gguf_open_mem(data, size, name, &g));
    qlr_status st = load_gguf(g, name, base, out);
    qlr_gguf_close(g);
    return st;
}

qlr_status qlr_lora_load_gguf(const char *path, const qlr_lora_base *base, qlr_lora **out) {
    *out = NULL;
    qlr_gguf *g = NULL;
    QLR_TRY(qlr_gguf_open(path, &g));
    qlr_status st = load_gguf(g, path, base, out);
    qlr_gguf_close(g);
    return st;
}
