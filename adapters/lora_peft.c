/* adapters/lora_peft.c: HF PEFT LoRA folders (docs/FORMATS.md §5):
 * adapter_model.safetensors (F32 tensors base_model.model.model.layers.N.{self_attn,mlp}.<proj>
 * .lora_{A,B}.weight, A [r, in], B [out, r], HF row order) and adapter_config.json (indent 2,
 * sorted keys, as save_pretrained writes it). The safetensors __metadata__ carries "qlora.base",
 * the base identity as compact JSON, which PEFT ignores; adapter_config.json carries "qlora":
 * {base_name, base_nf4_hash, prompt_format, prompt_system} (PEFT >= 0.14 drops unknown keys with
 * a warning; older PEFT refuses them). This is also the trainer's own adapter
 * format (run dir: <output_dir>/adapter/, <output_dir>/checkpoint-N/adapter/). */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapters/lora_internal.h"
#include "core/core.h"
#include "formats/json.h"
#include "formats/safetensors.h"

#define PREFIX "base_model.model.model.layers."
#define MAX_LAYERS 4096

static char *join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", a, b);
    return p;
}

/* ---- export ---- */

static json_t *base_json(const qlr_lora_base *b) {
    json_t *o = json_object();
    if (!o) return NULL;
    json_object_set_new(o, "arch", json_string(b->arch));
    json_object_set_new(o, "n_layers", json_integer(b->n_layers));
    json_object_set_new(o, "d_model", json_integer(b->d_model));
    json_object_set_new(o, "n_heads", json_integer(b->n_heads));
    json_object_set_new(o, "n_kv_heads", json_integer(b->n_kv_heads));
    json_object_set_new(o, "head_dim", json_integer(b->head_dim));
    json_object_set_new(o, "d_ff", json_integer(b->d_ff));
    if (b->name[0]) json_object_set_new(o, "name", json_string(b->name));
    if (b->nf4_hash) {
        char hex[17];
        snprintf(hex, sizeof hex, "%016llx", (unsigned long long)b->nf4_hash);
        json_object_set_new(o, "nf4_hash", json_string(hex));
    }
    return o;
}

/* The "qlora" object of adapter_config.json, or NULL when there is nothing to record. */
static json_t *qlora_json(const qlr_lora *l) {
    json_t *q = json_object();
    if (!q) return NULL;
    json_t *b = base_json(&l->base);
    json_t *v;
    if (b && (v = json_object_get(b, "name"))) json_object_set(q, "base_name", v);
    if (b && (v = json_object_get(b, "nf4_hash"))) json_object_set(q, "base_nf4_hash", v);
    json_decref(b);
    if (l->prompt_format) json_object_set_new(q, "prompt_format", json_string(l->prompt_format));
    if (l->prompt_system) json_object_set_new(q, "prompt_system", json_string(l->prompt_system));
    if (!json_object_size(q)) {
        json_decref(q);
        return NULL;
    }
    return q;
}

static json_t *config_json(const qlr_lora *l) {
    json_t *c = json_object();
    json_t *tm = json_array();
    if (!c || !tm) {
        json_decref(c);
        json_decref(tm);
        return NULL;
    }
    for (int id = 0; id < QLR_LIN_COUNT; id++)
        if (l->targets & QLR_LORA_TARGET(id)) json_array_append_new(tm, json_string(qlr_linear_hf_name((qlr_linear_id)id)));
    /* the fields current PEFT writes for a LoRA config (others are optional) */
    json_object_set_new(c, "alpha_pattern", json_object());
    json_object_set_new(c, "auto_mapping", json_null());
    json_object_set_new(c, "base_model_name_or_path", l->base_model ? json_string(l->base_model) : json_null());
    json_object_set_new(c, "bias", json_string("none"));
    json_object_set_new(c, "fan_in_fan_out", json_false());
    json_object_set_new(c, "inference_mode", json_true());
    json_object_set_new(c, "init_lora_weights", json_true());
    json_object_set_new(c, "layer_replication", json_null());
    json_object_set_new(c, "layers_pattern", json_null());
    json_object_set_new(c, "layers_to_transform", json_null());
    json_object_set_new(c, "loftq_config", json_object());
    /* an integral alpha is written as an int, as users write it in Python */
    if (l->alpha == floor(l->alpha) && fabs(l->alpha) < 1e15)
        json_object_set_new(c, "lora_alpha", json_integer((json_int_t)l->alpha));
    else
        json_object_set_new(c, "lora_alpha", json_real(l->alpha));
    json_object_set_new(c, "lora_dropout", json_real(l->dropout));
    json_object_set_new(c, "megatron_config", json_null());
    json_object_set_new(c, "megatron_core", json_string("megatron.core"));
    json_object_set_new(c, "modules_to_save", json_null());
    json_object_set_new(c, "peft_type", json_string("LORA"));
    json_t *q = qlora_json(l);
    if (q) json_object_set_new(c, "qlora", q);
    json_object_set_new(c, "r", json_integer(l->r));
    json_object_set_new(c, "rank_pattern", json_object());
    json_object_set_new(c, "revision", json_null());
    json_object_set_new(c, "target_modules", tm);
    json_object_set_new(c, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(c, "use_dora", json_false());
    json_object_set_new(c, "use_rslora", l->use_rslora ? json_true() : json_false());
    return c;
}

qlr_status qlr_lora_save_peft(const qlr_lora *l, const char *dir) {
    QLR_TRY(qlr_mkdir_p(dir));
    char *st_path = join(dir, "adapter_model.safetensors");
    char *cfg_path = join(dir, "adapter_config.json");
    qlr_st_writer *w = qlr_st_writer_create();
    json_t *bj = base_json(&l->base);
    json_t *cj = config_json(l);
    char *bs = bj ? json_dumps(bj, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    qlr_status st = QLR_OK;
    if (!st_path || !cfg_path || !w || !bs || !cj) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    if ((st = qlr_st_writer_set_metadata(w, "format", "pt")) != QLR_OK ||
        (st = qlr_st_writer_set_metadata(w, "qlora.base", bs)) != QLR_OK)
        goto done;
    char name[192];
    for (int32_t L = 0; L < l->base.n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
            if (!m) continue;
            uint64_t sa[2] = {(uint64_t)l->r, (uint64_t)m->in}, sb[2] = {(uint64_t)m->out, (uint64_t)l->r};
            qlr_lora_tensor_name_(name, sizeof name, 1, L, (qlr_linear_id)id, 0);
            if ((st = qlr_st_writer_add(w, name, QLR_ST_F32, 2, sa, m->a, sa[0] * sa[1] * 4)) != QLR_OK) goto done;
            qlr_lora_tensor_name_(name, sizeof name, 1, L, (qlr_linear_id)id, 1);
            if ((st = qlr_st_writer_add(w, name, QLR_ST_F32, 2, sb, m->b, sb[0] * sb[1] * 4)) != QLR_OK) goto done;
        }
    /* The config is the folder's commit record: an older adapter's config goes first, then the
     * tensors, then the new config (each file atomic). A kill at any point leaves the old
     * adapter whole, a folder without a config (not an adapter), or the new adapter whole;
     * never the old config over the new tensors. */
    if (unlink(cfg_path) != 0 && errno != ENOENT) {
        st = qlr_errorf(QLR_ERR_IO, "%s: cannot replace it: %s", cfg_path, strerror(errno));
        goto done;
    }
    if ((st = qlr_st_writer_write(w, st_path)) != QLR_OK) goto done;
    qlr_kill_point("peft.tensors");
    st = qlr_json_write_file(cfg_path, cj);
done:
    free(bs);
    json_decref(bj);
    json_decref(cj);
    qlr_st_writer_free(w);
    free(st_path);
    free(cfg_path);
    return st;
}

/* ---- import ---- */

static int module_by_hf_name(const char *s, size_t n) {
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        const char *h = qlr_linear_hf_name((qlr_linear_id)i);
        if (strlen(h) == n && !strncmp(s, h, n)) return i;
    }
    return -1;
}

/* Splits PREFIX "N.{self_attn|mlp}.<proj>.lora_{A|B}.weight". 1 on a match, else 0. */
static int parse_name(const char *s, int32_t *layer, qlr_linear_id *id, int *half) {
    size_t pl = strlen(PREFIX);
    if (strncmp(s, PREFIX, pl)) return 0;
    const char *p = s + pl;
    if (*p < '0' || *p > '9') return 0;
    long L = 0;
    while (*p >= '0' && *p <= '9') {
        L = L * 10 + (*p++ - '0');
        if (L >= MAX_LAYERS) return 0;
    }
    int attn;
    if (!strncmp(p, ".self_attn.", 11)) {
        attn = 1;
        p += 11;
    } else if (!strncmp(p, ".mlp.", 5)) {
        attn = 0;
        p += 5;
    } else {
        return 0;
    }
    const char *dot = strchr(p, '.');
    if (!dot) return 0;
    int m = module_by_hf_name(p, (size_t)(dot - p));
    if (m < 0 || attn != (m <= QLR_LIN_O)) return 0;
    if (!strcmp(dot, ".lora_A.weight")) *half = 0;
    else if (!strcmp(dot, ".lora_B.weight")) *half = 1;
    else return 0;
    *layer = (int32_t)L;
    *id = (qlr_linear_id)m;
    return 1;
}

static qlr_status tensor_f32(const qlr_st_tensor *t, float *dst, const char *path) {
    uint64_t n = t->numel;
    switch (t->dtype) {
    case QLR_ST_F32: memcpy(dst, t->data, n * 4); return QLR_OK;
    case QLR_ST_F16:
    case QLR_ST_BF16: {
        const uint8_t *s = t->data;
        for (uint64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = t->dtype == QLR_ST_F16 ? qlr_f16_to_f32(h) : qlr_bf16_to_f32(h);
        }
        return QLR_OK;
    }
    default:
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: tensor %s has dtype %s (supported: F32, F16, BF16)", path,
                          t->name, qlr_st_dtype_name(t->dtype));
    }
}

/* The qlora.base metadata entry, if any, into *b (unknown fields stay 0). */
static qlr_status read_base_meta(const qlr_safetensors *f, const char *path, qlr_lora_base *b) {
    const char *s = qlr_safetensors_metadata(f, "qlora.base");
    if (!s) return QLR_OK;
    json_t *j = NULL;
    char src[512];
    snprintf(src, sizeof src, "%s: __metadata__ qlora.base", path);
    QLR_TRY(qlr_json_load_buffer(src, s, strlen(s), &j));
    const char *arch = NULL, *name = NULL, *hash = NULL;
    int64_t v[6] = {0};
    const char *keys[6] = {"n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff"};
    qlr_status st = qlr_json_get_string_opt(j, src, "arch", "", &arch);
    if (st == QLR_OK) st = qlr_json_get_string_opt(j, src, "name", "", &name);
    if (st == QLR_OK) st = qlr_json_get_string_opt(j, src, "nf4_hash", "", &hash);
    if (st == QLR_OK && hash[0] && qlr_lora_parse_hash_(hash, &b->nf4_hash) != QLR_OK)
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: nf4_hash '%s' is not 16 hex digits", src, hash);
    for (int i = 0; i < 6 && st == QLR_OK; i++) {
        st = qlr_json_get_int_opt(j, src, keys[i], 0, &v[i]);
        if (st == QLR_OK && (v[i] < 0 || v[i] > INT32_MAX))
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: %s out of range", src, keys[i]);
    }
    if (st == QLR_OK) {
        snprintf(b->name, sizeof b->name, "%s", name);
        snprintf(b->arch, sizeof b->arch, "%s", arch);
        b->n_layers = (int32_t)v[0];
        b->d_model = (int32_t)v[1];
        b->n_heads = (int32_t)v[2];
        b->n_kv_heads = (int32_t)v[3];
        b->head_dim = (int32_t)v[4];
        b->d_ff = (int32_t)v[5];
    }
    json_decref(j);
    return st;
}

/* Checks the unsupported features and reads the hyper-parameters. *targets = mask from a list,
 * 0 when target_modules is a string (inferred from the tensors). */
static qlr_status read_config(const json_t *c, const char *src, int64_t *r, double *alpha, double *dropout,
                              int *rslora, uint32_t *targets, const char **base_model) {
    if (!json_is_object(c)) return qlr_errorf(QLR_ERR_FORMAT, "%s: expected a JSON object", src);
    const char *s = NULL;
    QLR_TRY(qlr_json_get_string(c, src, "peft_type", &s));
    if (strcmp(s, "LORA"))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: peft_type \"%s\" is not supported (only LORA)", src, s);
    QLR_TRY(qlr_json_get_int_opt(c, src, "r", 8, r));
    if (*r < 1 || *r > 65536) return qlr_errorf(QLR_ERR_FORMAT, "%s: key \"r\": %lld is out of range 1..65536", src, (long long)*r);
    QLR_TRY(qlr_json_get_double_opt(c, src, "lora_alpha", 8.0, alpha));
    if (!(*alpha > 0) || !isfinite(*alpha)) return qlr_errorf(QLR_ERR_FORMAT, "%s: key \"lora_alpha\" must be > 0", src);
    QLR_TRY(qlr_json_get_double_opt(c, src, "lora_dropout", 0.0, dropout));
    if (!(*dropout >= 0 && *dropout < 1)) return qlr_errorf(QLR_ERR_FORMAT, "%s: key \"lora_dropout\" must be in [0, 1)", src);
    QLR_TRY(qlr_json_get_bool_opt(c, src, "use_rslora", 0, rslora));
    int b = 0;
    QLR_TRY(qlr_json_get_bool_opt(c, src, "fan_in_fan_out", 0, &b));
    if (b) return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: fan_in_fan_out true (Conv1D weights) is not supported", src);
    QLR_TRY(qlr_json_get_bool_opt(c, src, "use_dora", 0, &b));
    if (b) return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: use_dora true (DoRA) is not supported", src);
    QLR_TRY(qlr_json_get_string_opt(c, src, "bias", "none", &s));
    if (strcmp(s, "none"))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: bias \"%s\" is not supported (only \"none\")", src, s);
    const char *pats[2] = {"rank_pattern", "alpha_pattern"};
    for (int i = 0; i < 2; i++) {
        json_t *o = qlr_json_lookup(c, pats[i]);
        if (o && !json_is_null(o) && !(json_is_object(o) && json_object_size(o) == 0))
            return qlr_errorf(QLR_ERR_UNSUPPORTED,
                              "%s: %s is not supported: every module must share r and lora_alpha", src, pats[i]);
    }
    json_t *mts = qlr_json_lookup(c, "modules_to_save");
    if (mts && !json_is_null(mts) && !(json_is_array(mts) && json_array_size(mts) == 0))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: modules_to_save is not supported (fully trained extra modules)", src);
    *targets = 0;
    json_t *tm = qlr_json_lookup(c, "target_modules");
    if (json_is_array(tm)) {
        for (size_t i = 0; i < json_array_size(tm); i++) {
            const char *n = json_string_value(json_array_get(tm, i));
            int m = n ? module_by_hf_name(n, strlen(n)) : -1;
            if (m < 0)
                return qlr_errorf(QLR_ERR_UNSUPPORTED,
                                  "%s: target_modules[%zu] %s%s%s is not supported (supported: q_proj, k_proj, "
                                  "v_proj, o_proj, gate_proj, up_proj, down_proj)",
                                  src, i, n ? "\"" : "", n ? n : "(not a string)", n ? "\"" : "");
            *targets |= QLR_LORA_TARGET(m);
        }
    } else if (tm && !json_is_string(tm) && !json_is_null(tm)) {
        return qlr_errorf(QLR_ERR_FORMAT, "%s: key \"target_modules\": expected a list or a string, got %s", src,
                          qlr_json_type_name(tm));
    }
    QLR_TRY(qlr_json_get_string_opt(c, src, "base_model_name_or_path", NULL, base_model));
    return QLR_OK;
}

/* The "qlora" object of adapter_config.json (optional): prompt format and system message, and
 * the base identity where the safetensors metadata did not give it. */
static qlr_status read_qlora_config(const json_t *c, const char *src, qlr_lora *l) {
    json_t *q = qlr_json_lookup(c, "qlora");
    if (!q || json_is_null(q)) return QLR_OK;
    if (!json_is_object(q)) return qlr_errorf(QLR_ERR_FORMAT, "%s: key \"qlora\": expected an object", src);
    const char *pf = NULL, *ps = NULL, *bn = NULL, *bh = NULL;
    QLR_TRY(qlr_json_get_string_opt(q, src, "prompt_format", NULL, &pf));
    QLR_TRY(qlr_json_get_string_opt(q, src, "prompt_system", NULL, &ps));
    QLR_TRY(qlr_json_get_string_opt(q, src, "base_name", NULL, &bn));
    QLR_TRY(qlr_json_get_string_opt(q, src, "base_nf4_hash", NULL, &bh));
    QLR_TRY(qlr_lora_set_prompt(l, pf, ps));
    if (bn && !l->base.name[0]) snprintf(l->base.name, sizeof l->base.name, "%s", bn);
    if (bh && !l->base.nf4_hash && qlr_lora_parse_hash_(bh, &l->base.nf4_hash) != QLR_OK)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: qlora.base_nf4_hash '%s' is not 16 hex digits", src, bh);
    return QLR_OK;
}

/* The adapter of an opened safetensors file `f` under the hyper-parameters read_config gave;
 * cfg is the parsed adapter_config.json (its "qlora" record); the paths are for messages. */
static qlr_status load_peft(const qlr_safetensors *f, const json_t *cfg, const char *cfg_path,
                            const char *st_path,
                            int64_t r, double alpha, double dropout, int rslora, uint32_t targets,
                            const char *base_model, const qlr_lora_base *base, qlr_lora **out) {
    *out = NULL;
    qlr_lora *l = NULL;
    const qlr_st_tensor **pairs = NULL;
    int32_t (*shapes)[2] = NULL;
    qlr_status st = QLR_OK;
    qlr_lora_base fb;
    memset(&fb, 0, sizeof fb);
    if ((st = read_base_meta(f, st_path, &fb)) != QLR_OK) goto done;
    if (fb.n_layers > MAX_LAYERS) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: __metadata__ qlora.base: n_layers %d", st_path, fb.n_layers);
        goto done;
    }
    size_t nt = qlr_safetensors_count(f);
    int32_t n_layers = fb.n_layers;
    for (size_t i = 0; i < nt; i++) {
        const qlr_st_tensor *t = qlr_safetensors_tensor(f, i);
        int32_t L;
        qlr_linear_id id;
        int half;
        if (!parse_name(t->name, &L, &id, &half)) {
            st = qlr_errorf(QLR_ERR_UNSUPPORTED,
                            "%s: tensor '%s' is not a LoRA tensor of a decoder linear ("
                            PREFIX "N.{self_attn,mlp}.<proj>.lora_{A,B}.weight)", st_path, t->name);
            goto done;
        }
        if (targets && !(targets & QLR_LORA_TARGET(id))) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s: %s is not in target_modules of %s", st_path, t->name,
                            qlr_linear_hf_name(id), cfg_path);
            goto done;
        }
        if (L + 1 > n_layers) n_layers = L + 1;
    }
    if (n_layers < 1) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: no LoRA tensors", st_path);
        goto done;
    }
    size_t nm = (size_t)n_layers * QLR_LIN_COUNT;
    pairs = calloc(nm * 2, sizeof *pairs);
    shapes = calloc(nm, sizeof *shapes);
    if (!pairs || !shapes) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < nt; i++) {
        const qlr_st_tensor *t = qlr_safetensors_tensor(f, i);
        int32_t L;
        qlr_linear_id id;
        int half;
        parse_name(t->name, &L, &id, &half);
        if (t->n_dims != 2 || t->shape[0] == 0 || t->shape[1] == 0 || t->shape[0] > INT32_MAX ||
            t->shape[1] > INT32_MAX) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s: expected a 2-D non-empty shape", st_path, t->name);
            goto done;
        }
        uint64_t rk = half ? t->shape[1] : t->shape[0];
        if (rk != (uint64_t)r) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s: shape [%llu, %llu] has rank %llu but %s says r = %lld",
                            st_path, t->name, (unsigned long long)t->shape[0], (unsigned long long)t->shape[1],
                            (unsigned long long)rk, cfg_path, (long long)r);
            goto done;
        }
        size_t k = (size_t)L * QLR_LIN_COUNT + id;
        pairs[2 * k + half] = t;
        shapes[k][half ? 0 : 1] = (int32_t)(half ? t->shape[0] : t->shape[1]);
    }
    char tn[192];
    uint32_t found = 0;
    for (size_t k = 0; k < nm; k++) {
        if (!pairs[2 * k] && !pairs[2 * k + 1]) continue;
        for (int h = 0; h < 2; h++)
            if (!pairs[2 * k + h]) {
                qlr_lora_tensor_name_(tn, sizeof tn, 1, (int32_t)(k / QLR_LIN_COUNT), (qlr_linear_id)(k % QLR_LIN_COUNT), h);
                st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor %s is missing (its lora_%c is present): both halves are required",
                                st_path, tn, h ? 'A' : 'B');
                goto done;
            }
        found |= QLR_LORA_TARGET(k % QLR_LIN_COUNT);
    }
    for (int id = 0; id < QLR_LIN_COUNT; id++)
        if ((targets & QLR_LORA_TARGET(id)) && !(found & QLR_LORA_TARGET(id)))
            QLR_LOGW("%s: target_modules lists %s but the adapter has no tensor for it", cfg_path,
                     qlr_linear_hf_name((qlr_linear_id)id));
    if ((st = qlr_lora_alloc_(&fb, n_layers, (int32_t)r, (const int32_t(*)[2])shapes, &l)) != QLR_OK) goto done;
    if ((st = qlr_lora_check_base_(l, &fb, st_path, 1)) != QLR_OK) goto done;
    if ((st = read_qlora_config(cfg, cfg_path, l)) != QLR_OK) goto done;
    if (base) {
        if ((st = qlr_lora_check_base_(l, base, st_path, 1)) != QLR_OK) goto done;
        qlr_lora_adopt_base_(l, base);
        qlr_lora_warn_base(l, base, cfg_path);
    }
    for (size_t k = 0; k < nm; k++) {
        qlr_lora_module *m = &l->mods[k];
        if (!m->a) continue;
        if ((st = tensor_f32(pairs[2 * k], m->a, st_path)) != QLR_OK ||
            (st = tensor_f32(pairs[2 * k + 1], m->b, st_path)) != QLR_OK)
            goto done;
    }
    qlr_lora_finish_(l, alpha, dropout, rslora);
    if (base_model && !(l->base_model = strdup(base_model))) st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
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

qlr_status qlr_lora_load_peft(const char *dir, const qlr_lora_base *base, qlr_lora **out) {
    *out = NULL;
    char *cfg_path = join(dir, "adapter_config.json");
    char *st_path = join(dir, "adapter_model.safetensors");
    json_t *cfg = NULL;
    qlr_safetensors *f = NULL;
    qlr_status st = QLR_OK;
    if (!cfg_path || !st_path) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    if ((st = qlr_json_load_file(cfg_path, &cfg)) != QLR_OK) goto done;
    int64_t r = 0;
    double alpha = 0, dropout = 0;
    int rslora = 0;
    uint32_t targets = 0;
    const char *base_model = NULL;
    if ((st = read_config(cfg, cfg_path, &r, &alpha, &dropout, &rslora, &targets, &base_model)) != QLR_OK) goto done;
    if (!qlr_path_exists(st_path)) {
        char *bin = join(dir, "adapter_model.bin");
        int has_bin = bin && qlr_path_exists(bin);
        free(bin);
        st = qlr_errorf(QLR_ERR_NOT_FOUND, has_bin ? "%s: missing; adapter_model.bin (pickle) is not read: save with "
                                                     "safe_serialization=True"
                                                   : "%s: missing",
                        st_path);
        goto done;
    }
    if ((st = qlr_safetensors_open(st_path, &f)) != QLR_OK) goto done;
    st = load_peft(f, cfg, cfg_path, st_path, r, alpha, dropout, rslora, targets, base_model, base, out);
done:
    qlr_safetensors_close(f);
    json_decref(cfg);
    free(cfg_path);
    free(st_path);
    return st;
}

qlr_status qlr_lora_load_peft_mem_(const void *cfg_text, size_t cfg_size, const void *st_data, size_t st_size,
                                   const qlr_lora_base *base, qlr_lora **out) {
    *out = NULL;
    static const char cfg_name[] = "adapter_config.json", st_name[] = "adapter_model.safetensors";
    json_t *cfg = NULL;
    qlr_safetensors *f = NULL;
    QLR_TRY(qlr_json_load_buffer(cfg_name, cfg_text, cfg_size, &cfg));
    int64_t r = 0;
    double alpha = 0, dropout = 0;
    int rslora = 0;
    uint32_t targets = 0;
    const char *base_model = NULL;
    qlr_status st = read_config(cfg, cfg_name, &r, &alpha, &dropout, &rslora, &targets, &base_model);
    if (st == QLR_OK) st = qlr_safetensors_open_buffer(st_data, st_size, st_name, &f);
    if (st == QLR_OK) st = load_peft(f, cfg, cfg_name, st_name, r, alpha, dropout, rslora, targets, base_model, base, out);
    qlr_safetensors_close(f);
    json_decref(cfg);
    return st;
}
