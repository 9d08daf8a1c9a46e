/* train/plan.c: model shapes (GGUF, config.json, presets) and the memory plan table.
 *
 * The plan is a list of buffer classes (count x aligned bytes) grouped into components; the
 * rules below are the single source of the sizes: `qlora plan` prints them and the trainer
 * will carve its arenas from the same items. Advice for an over-budget plan is found by
 * rebuilding the plan with one knob changed at a time (the plan is cheap: no allocation of
 * model memory). Shapes are bounded on entry so every product fits in uint64. */
#include "train/plan.h"

#include <ctype.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "adapters/adapter_dev.h"
#include "core/file.h"
#include "core/strbuf.h"
#include "formats/gguf.h"
#include "formats/json.h"
#include "model/backprop.h"
#include "model/model.h"
#include "optim/optim.h"
#include "train/trainer.h"

/* ------------------------------------------------------------------ shapes */

typedef struct preset {
    const char *key;        /* normalized name prefix */
    const char *name;
    qlr_model_shape s;
} preset;

static const preset g_presets[] = {
    {"llama-3.1-8b", "Llama-3.1-8B", {"", QLR_SHAPE_PRESET, 4096, 32, 32, 8, 128, 14336, 128256, 0}},
    {"llama-3-8b", "Llama-3.1-8B", {"", QLR_SHAPE_PRESET, 4096, 32, 32, 8, 128, 14336, 128256, 0}},
    {"llama-3.2-1b", "Llama-3.2-1B", {"", QLR_SHAPE_PRESET, 2048, 16, 32, 8, 64, 8192, 128256, 1}},
    {"llama-3.2-3b", "Llama-3.2-3B", {"", QLR_SHAPE_PRESET, 3072, 28, 24, 8, 128, 8192, 128256, 1}},
    {"smollm2-135m", "SmolLM2-135M", {"", QLR_SHAPE_PRESET, 576, 30, 9, 3, 64, 1536, 49152, 1}},
    {"smollm2-360m", "SmolLM2-360M", {"", QLR_SHAPE_PRESET, 960, 32, 15, 5, 64, 2560, 49152, 1}},
    {"smollm2-1.7b", "SmolLM2-1.7B", {"", QLR_SHAPE_PRESET, 2048, 24, 32, 32, 64, 8192, 49152, 1}},
};
#define N_PRESETS ((int)(sizeof g_presets / sizeof g_presets[0]))

static const char *basename_of(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

qlr_status qlr_model_shape_preset(const char *name, qlr_model_shape *s) {
    char n[160];
    snprintf(n, sizeof n, "%s", basename_of(name));
    for (char *p = n; *p; p++) *p = (char)tolower((unsigned char)*p);
    const char *q = n;
    if (!strncmp(q, "meta-", 5)) q += 5;
    for (int i = 0; i < N_PRESETS; i++) {
        size_t k = strlen(g_presets[i].key);
        if (!strncmp(q, g_presets[i].key, k) && (q[k] == 0 || q[k] == '-' || q[k] == '.' || q[k] == '_')) {
            *s = g_presets[i].s;
            snprintf(s->name, sizeof s->name, "%s", g_presets[i].name);
            return QLR_OK;
        }
    }
    return qlr_errorf(QLR_ERR_NOT_FOUND,
                      "%s: not a file or folder, and not a known model name (presets: Llama-3.1-8B, Llama-3.2-1B, "
                      "Llama-3.2-3B, SmolLM2-135M, SmolLM2-360M, SmolLM2-1.7B)", name);
}

static qlr_status check_shape(const char *src, const qlr_model_shape *s) {
    struct { const char *what; uint32_t v, hi; } f[] = {
        {"hidden size", s->hidden, 65536}, {"layers", s->n_layers, 1024}, {"heads", s->n_heads, 1024},
        {"kv heads", s->n_kv_heads, 1024}, {"head dim", s->head_dim, 1024}, {"ff size", s->ff, 1u << 20},
        {"vocab size", s->vocab, 1u << 22},
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].v < 1 || f[i].v > f[i].hi)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: %s %u is outside 1..%u", src, f[i].what, f[i].v, f[i].hi);
    if (s->n_heads % s->n_kv_heads)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %u heads is not a multiple of %u kv heads", src, s->n_heads, s->n_kv_heads);
    return QLR_OK;
}

static qlr_status gguf_u32(const qlr_gguf *g, const char *path, const char *key, uint32_t *v, int required) {
    uint64_t x;
    qlr_status st = qlr_gguf_get_uint(g, key, &x);
    if (st == QLR_ERR_NOT_FOUND && !required) {
        qlr_error_clear();
        return QLR_ERR_NOT_FOUND;
    }
    if (st != QLR_OK) return qlr_error_prefix("%s: %s", path, key);
    if (x > UINT32_MAX) return qlr_errorf(QLR_ERR_FORMAT, "%s: %s: %llu is too large", path, key, (unsigned long long)x);
    *v = (uint32_t)x;
    return QLR_OK;
}

qlr_status qlr_model_shape_from_gguf(const char *path, qlr_model_shape *s) {
    memset(s, 0, sizeof *s);
    qlr_gguf *g = NULL;
    QLR_TRY(qlr_gguf_open(path, &g));
    qlr_status st = QLR_OK;
    const char *arch;
    uint64_t alen;
    if ((st = qlr_gguf_get_str(g, "general.architecture", &arch, &alen)) != QLR_OK) {
        st = qlr_error_prefix("%s", path);
        goto done;
    }
    if (alen != 5 || memcmp(arch, "llama", 5)) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: architecture \"%.*s\" is not supported (llama only)", path,
                        (int)(alen > 64 ? 64 : alen), arch);
        goto done;
    }
    if ((st = gguf_u32(g, path, "llama.embedding_length", &s->hidden, 1)) ||
        (st = gguf_u32(g, path, "llama.block_count", &s->n_layers, 1)) ||
        (st = gguf_u32(g, path, "llama.attention.head_count", &s->n_heads, 1)) ||
        (st = gguf_u32(g, path, "llama.feed_forward_length", &s->ff, 1)))
        goto done;
    st = gguf_u32(g, path, "llama.attention.head_count_kv", &s->n_kv_heads, 0);
    if (st == QLR_ERR_NOT_FOUND) s->n_kv_heads = s->n_heads;
    else if (st) goto done;
    st = gguf_u32(g, path, "llama.attention.key_length", &s->head_dim, 0);
    if (st == QLR_ERR_NOT_FOUND) s->head_dim = s->n_heads ? s->hidden / s->n_heads : 0;
    else if (st) goto done;
    st = gguf_u32(g, path, "llama.vocab_size", &s->vocab, 0);
    if (st == QLR_ERR_NOT_FOUND) {
        qlr_gguf_type et;
        uint64_t n;
        const void *data;
        if ((st = qlr_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n, &data)) != QLR_OK) {
            st = qlr_error_prefix("%s: no llama.vocab_size and no tokenizer.ggml.tokens", path);
            goto done;
        }
        s->vocab = n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
    } else if (st) goto done;
    st = QLR_OK;
    s->tied = qlr_gguf_find_tensor(g, "output.weight") == NULL;
    s->source = QLR_SHAPE_GGUF;
    snprintf(s->name, sizeof s->name, "%s", basename_of(path));
    st = check_shape(path, s);
done:
    qlr_gguf_close(g);
    return st;
}

qlr_status qlr_model_shape_from_config(const char *path, qlr_model_shape *s) {
    memset(s, 0, sizeof *s);
    char p[4096];
    if (qlr_is_dir(path)) snprintf(p, sizeof p, "%s/config.json", path);
    else snprintf(p, sizeof p, "%s", path);
    json_t *j = NULL;
    QLR_TRY(qlr_json_load_file(p, &j));
    qlr_status st;
    const char *mt = NULL;
    int64_t hid, nl, nh, nkv, ff, voc, hd;
    int tied;
    if ((st = qlr_json_get_string_opt(j, p, "model_type", "llama", &mt)) != QLR_OK) goto done;
    if (strcmp(mt, "llama")) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: model_type \"%s\" is not supported (llama only)", p, mt);
        goto done;
    }
    if ((st = qlr_json_get_int(j, p, "hidden_size", &hid)) || (st = qlr_json_get_int(j, p, "num_hidden_layers", &nl)) ||
        (st = qlr_json_get_int(j, p, "num_attention_heads", &nh)) ||
        (st = qlr_json_get_int_opt(j, p, "num_key_value_heads", nh, &nkv)) ||
        (st = qlr_json_get_int(j, p, "intermediate_size", &ff)) || (st = qlr_json_get_int(j, p, "vocab_size", &voc)) ||
        (st = qlr_json_get_int_opt(j, p, "head_dim", nh > 0 ? hid / nh : 0, &hd)) ||
        (st = qlr_json_get_bool_opt(j, p, "tie_word_embeddings", 0, &tied)))
        goto done;
    int64_t v[] = {hid, nl, nh, nkv, hd, ff, voc};
    for (int i = 0; i < 7; i++)
        if (v[i] < 0 || v[i] > UINT32_MAX) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: value %lld out of range", p, (long long)v[i]);
            goto done;
        }
    s->hidden = (uint32_t)hid;
    s->n_layers = (uint32_t)nl;
    s->n_heads = (uint32_t)nh;
    s->n_kv_heads = (uint32_t)nkv;
    s->head_dim = (uint32_t)hd;
    s->ff = (uint32_t)ff;
    s->vocab = (uint32_t)voc;
    s->tied = tied;
    s->source = QLR_SHAPE_CONFIG_JSON;
    snprintf(s->name, sizeof s->name, "%.*s", (int)sizeof s->name - 1, qlr_is_dir(path) ? basename_of(path) : p);
    st = check_shape(p, s);
done:
    json_decref(j);
    return st;
}

qlr_status qlr_model_shape_for_recipe(const qlr_recipe *r, qlr_model_shape *s) {
    char p[4096];
    QLR_TRY(qlr_recipe_resolve(r, r->base_model, p, sizeof p));
    if (qlr_is_dir(p)) return qlr_model_shape_from_config(p, s);
    if (qlr_path_exists(p)) {
        size_t n = strlen(p);
        if (n >= 5 && !strcmp(p + n - 5, ".json")) return qlr_model_shape_from_config(p, s);
        return qlr_model_shape_from_gguf(p, s);
    }
    qlr_status st = qlr_model_shape_preset(r->base_model, s);
    if (st == QLR_ERR_NOT_FOUND && (strchr(r->base_model, '.') || r->base_model[0] == '/'))
        return qlr_errorf(QLR_ERR_NOT_FOUND, "base_model: %s does not exist (resolved against %s) and is not a known "
                          "model name", p, r->base_dir ? r->base_dir : ".");
    return st;
}

/* ------------------------------------------------------------------ the table */

static const char *const g_comp_names[QLR_PLAN_N_COMPONENTS] = {
    "base weights (NF4)", "embeddings (bf16)", "norms, biases, RoPE", "lm_head (bf16)",
    "LoRA A/B fp32 masters", "LoRA A/B compute copies", "LoRA A/B grads (fp32)", "optimizer state",
    "saved activations", "recompute (one layer)", "backward (one layer)", "lm_head + CE chunk",
    "op workspace (estimate)", "batch tensors", "cuBLASLt/cuDNN workspace", "CUDA context reserve",
    "misc", "layer inputs (pinned host)",
};
static const char *const g_comp_arena[QLR_PLAN_N_COMPONENTS] = {
    "weights", "weights", "weights", "weights", "adapter", "adapter", "adapter", "optimizer",
    "activations", "activations", "activations", "activations", "workspace", "activations",
    "workspace", "reserve", "workspace", "host",
};

const char *qlr_plan_component_name(qlr_plan_component c) {
    return (unsigned)c < QLR_PLAN_N_COMPONENTS ? g_comp_names[c] : "?";
}
const char *qlr_plan_component_arena(qlr_plan_component c) {
    return (unsigned)c < QLR_PLAN_N_COMPONENTS ? g_comp_arena[c] : "?";
}

static uint64_t al(uint64_t b) { return (b + QLR_PLAN_ALIGN - 1) / QLR_PLAN_ALIGN * QLR_PLAN_ALIGN; }
static uint64_t cdiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

static qlr_status add(qlr_plan *p, qlr_plan_component c, const char *name, uint64_t count, uint64_t bytes) {
    if (count == 0 || bytes == 0) return QLR_OK;
    if (p->n_items == p->cap_items) {
        uint32_t nc = p->cap_items ? p->cap_items * 2 : 64;
        qlr_plan_item *it = realloc(p->items, nc * sizeof *it);
        if (!it) return qlr_errorf(QLR_ERR_NOMEM, "out of memory building the plan");
        p->items = it;
        p->cap_items = nc;
    }
    qlr_plan_item *it = &p->items[p->n_items++];
    it->comp = c;
    snprintf(it->name, sizeof it->name, "%s", name);
    it->count = count;
    it->bytes_each = al(bytes);
    p->comp_bytes[c] += count * it->bytes_each;
    if (c == QLR_PLAN_HOST_PINNED) p->host_total += count * it->bytes_each;
    else p->total += count * it->bytes_each;
    return QLR_OK;
}

void qlr_model_shape_config(const qlr_model_shape *s, qlr_model_config *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->arch, sizeof c->arch, "llama");
    c->n_vocab = (int32_t)s->vocab;
    c->d_model = (int32_t)s->hidden;
    c->n_layers = (int32_t)s->n_layers;
    c->n_heads = (int32_t)s->n_heads;
    c->n_kv_heads = (int32_t)s->n_kv_heads;
    c->head_dim = (int32_t)s->head_dim;
    c->d_ff = (int32_t)s->ff;
    c->tied_embeddings = s->tied;
}

/* Routes the sizing functions' items into plan components. */
typedef struct plan_sink {
    qlr_plan *p;
    int checkpointing;
    qlr_status st;
} plan_sink;

static void sink_item(void *ud, const char *group, const char *name, uint64_t count, uint64_t bytes) {
    plan_sink *k = ud;
    if (k->st) return;
    qlr_plan_component c = QLR_PLAN_MISC;
    if (!strcmp(group, "weights")) {
        c = strstr(name, "NF4")          ? QLR_PLAN_BASE_NF4
            : strstr(name, "token_embd") ? QLR_PLAN_EMBEDDINGS
            : strstr(name, "lm_head")    ? QLR_PLAN_LM_HEAD
                                         : QLR_PLAN_NORMS;
    } else if (!strcmp(group, "adapter")) {
        c = strstr(name, "masters")     ? QLR_PLAN_LORA_MASTER
            : strstr(name, "gradients") ? QLR_PLAN_LORA_GRADS
                                        : QLR_PLAN_LORA_COMPUTE;
    } else if (!strcmp(group, "optimizer")) {
        c = QLR_PLAN_OPTIMIZER;
    } else if (!strcmp(group, "activations")) {
        c = k->checkpointing && strstr(name, "layer activations") ? QLR_PLAN_RECOMPUTE
                                                                   : QLR_PLAN_ACT_SAVED;
    } else if (!strcmp(group, "backward")) {
        c = QLR_PLAN_BACKWARD;
    } else if (!strcmp(group, "lm_head_ce")) {
        c = QLR_PLAN_LM_HEAD_CE;
    } else if (!strcmp(group, "batch")) {
        c = QLR_PLAN_BATCH;
    } else if (!strcmp(group, "host")) {
        c = QLR_PLAN_HOST_PINNED;
    }
    k->st = add(k->p, c, name, count, bytes);
}

/* The plan of r with gradient_checkpointing `mode` (off, on or offload). */
static qlr_status build_mode(const qlr_recipe *r, const qlr_model_shape *s, int mode, qlr_plan *p) {
    memset(p, 0, sizeof *p);
    QLR_TRY(check_shape(s->name, s));
    p->shape = *s;
    p->cuda = r->device != QLR_RECIPE_DEVICE_CPU;
    qlr_device_traits dt = qlr_device_traits_named(p->cuda ? "cuda" : "cpu");
    const uint64_t T = (uint64_t)r->micro_batch_size * r->sequence_len, R = r->lora_r;
    const uint32_t targets = qlr_recipe_lora_targets(r);
    p->tokens = T;
    p->act_bytes = (uint32_t)qlr_dtype_size(dt.act_dtype);
    p->lora_r = r->lora_r;
    p->lora_targets = targets;
    qlr_model_config cfg;
    qlr_model_shape_config(s, &cfg);
    qlr_train_params tp;
    QLR_TRY(qlr_train_workspace_params(r->micro_batch_size, r->sequence_len, mode,
                                       r->lora_dropout, &tp));
    p->ce_chunk = (uint32_t)tp.ce_chunk;
    p->ckpt_mode = mode;
    p->mlp_chunk = (uint32_t)tp.mlp_chunk;
    plan_sink k = {p, mode != QLR_CKPT_OFF, QLR_OK};

    /* the base model as qlr_model_load allocates it (device copies of the NF4 store) */
    qlr_model_weight_items(&cfg, 1, sink_item, &k);
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        int64_t out, in;
        qlr_model_linear_shape(&cfg, (qlr_linear_id)i, &out, &in);
        p->base_params += (uint64_t)(out * in) * s->n_layers;
    }

    /* the adapter being trained: A [r, in], B [out, r] per targeted linear and layer; its
     * device side and one optimizer state per tensor */
    int eight = qlr_optimizer_is_8bit(r->optimizer);
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        if (!(targets & (1u << i))) continue;
        int64_t out, in;
        qlr_model_linear_shape(&cfg, (qlr_linear_id)i, &out, &in);
        const int64_t n_ab[2] = {(int64_t)R * in, out * (int64_t)R};
        for (int h = 0; h < 2; h++) {
            char nm[64];
            snprintf(nm, sizeof nm, "blk.*.%s lora_%s", qlr_lora_module_name(i), h ? "B" : "A");
            p->lora_params += (uint64_t)n_ab[h] * s->n_layers;
            qlr_adamw_state_items(n_ab[h], eight, s->n_layers, nm, sink_item, &k);
        }
    }
    qlr_lora_dev_items(dt, p->lora_params, 1, sink_item, &k);

    /* the training workspace (one allocation, carved) */
    qlr_train_plan_items(&cfg, dt, &tp, sink_item, &k);
    QLR_TRY(k.st);

    /* the trainer's own small buffers */
    if (!dt.host_visible)
        QLR_TRY(add(p, QLR_PLAN_MISC, "adapter slot table", 1,
                    (uint64_t)s->n_layers * QLR_LIN_COUNT * sizeof(qlr_lora_ref)));
    QLR_TRY(add(p, QLR_PLAN_MISC, "gradient-norm accumulator f64", 1, sizeof(double)));

    /* what the backend sizes itself (estimates) */
    if (p->cuda) {
        uint64_t maxn = 0;
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            int64_t out, in;
            qlr_model_linear_shape(&cfg, (qlr_linear_id)i, &out, &in);
            if ((uint64_t)(out * in) > maxn) maxn = (uint64_t)(out * in);
        }
        QLR_TRY(add(p, QLR_PLAN_DEQUANT, "largest linear dequantized (op workspace)", 1,
                    maxn * p->act_bytes));
        QLR_TRY(add(p, QLR_PLAN_BLAS_WS, "cuBLASLt workspace", 1, QLR_PLAN_CUBLASLT_WS));
        QLR_TRY(add(p, QLR_PLAN_BLAS_WS, "cuDNN attention workspace", 1, QLR_PLAN_CUDNN_WS));
        QLR_TRY(add(p, QLR_PLAN_CUDA_CONTEXT, "CUDA context reserve", 1, QLR_PLAN_CUDA_CONTEXT_BYTES));
    }
    (void)R;
    return QLR_OK;
}

qlr_status qlr_plan_build(const qlr_recipe *r, const qlr_model_shape *s, qlr_plan *p) {
    if (r->gradient_checkpointing != QLR_CKPT_AUTO) return build_mode(r, s, r->gradient_checkpointing, p);
    if (!r->vram_budget) {
        QLR_TRY(build_mode(r, s, QLR_CKPT_ON, p));
        p->ckpt_auto = 1;
        return QLR_OK;
    }
    /* fastest first: no recomputation, then recomputation, then host copies + MLP chunks */
    static const int order[3] = {QLR_CKPT_OFF, QLR_CKPT_ON, QLR_CKPT_OFFLOAD};
    for (int i = 0;; i++) {
        QLR_TRY(build_mode(r, s, order[i], p));
        p->ckpt_auto = 1;
        if (p->total <= r->vram_budget || i == 2) return QLR_OK;
        qlr_plan_free(p);
    }
}

void qlr_plan_free(qlr_plan *p) {
    if (!p) return;
    free(p->items);
    memset(p, 0, sizeof *p);
}

const char *qlr_plan_ckpt_name(int m) {
    return m == QLR_CKPT_OFF ? "false" : m == QLR_CKPT_ON ? "true" : m == QLR_CKPT_OFFLOAD ? "offload" : "auto";
}

static double gib(uint64_t b);

void qlr_plan_choice_line(const qlr_plan *p, const qlr_recipe *r, uint64_t budget, char *buf, size_t cap) {
    (void)r;
    int n = snprintf(buf, cap, "gradient_checkpointing %s%s", qlr_plan_ckpt_name(p->ckpt_mode),
                     !p->ckpt_auto ? "" : budget ? " (auto: the fastest that fits)" : " (auto, no budget: true)");
    if (n < 0 || (size_t)n >= cap) return;
    if (p->mlp_chunk) n += snprintf(buf + n, cap - n, ", MLP in chunks of %u tokens", p->mlp_chunk);
    if (n < 0 || (size_t)n >= cap) return;
    if (budget)
        n += snprintf(buf + n, cap - n, ", %.2f GiB of %.2f GiB, %s %.2f GiB", gib(p->total), gib(budget),
                      p->total <= budget ? "room left" : "OVER by", gib(p->total <= budget ? budget - p->total
                                                                                     : p->total - budget));
    else
        n += snprintf(buf + n, cap - n, ", %.2f GiB", gib(p->total));
    if (n < 0 || (size_t)n >= cap) return;
    if (p->host_total) snprintf(buf + n, cap - n, "; %.2f GiB pinned host memory", gib(p->host_total));
}

qlr_status qlr_plan_longest_seq(const qlr_recipe *r, const qlr_model_shape *s, uint64_t budget,
                                uint32_t max_len, uint32_t *seq, qlr_plan *out) {
    *seq = 0;
    if (out) memset(out, 0, sizeof *out);
    if (!budget || max_len < 16)
        return qlr_errorf(QLR_ERR_INVALID, "longest sequence: budget %llu and max_len %u must be > 0 and >= 16",
                          (unsigned long long)budget, max_len);
    QLR_TRY(check_shape(s->name, s));
    qlr_recipe c = *r; /* shallow: the plan reads only scalars */
    c.vram_budget = budget;
    uint32_t lo = 16, hi = max_len, best = 0;
    while (lo <= hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        c.sequence_len = mid;
        qlr_plan p;
        qlr_status st = qlr_plan_build(&c, s, &p);
        int fits = st == QLR_OK && p.total <= budget;
        if (st == QLR_OK) qlr_plan_free(&p);
        else if (st != QLR_ERR_RANGE) return st; /* out of memory, a bad shape */
        else qlr_error_clear();                   /* tokens past int32: too long */
        if (fits) best = mid, lo = mid + 1;
        else hi = mid - 1;
    }
    *seq = best;
    if (best && out) {
        c.sequence_len = best;
        QLR_TRY(qlr_plan_build(&c, s, out));
    }
    return QLR_OK;
}

/* ------------------------------------------------------------------ budget advice */

static double gib(uint64_t b) { return (double)b / (double)(1ull << 30); }

static uint64_t total_with(const qlr_recipe *r, const qlr_model_shape *s) {
    qlr_plan p;
    if (qlr_plan_build(r, s, &p) != QLR_OK) {
        qlr_error_clear();
        return UINT64_MAX;
    }
    uint64_t t = p.total;
    qlr_plan_free(&p);
    return t;
}

/* Largest v in [lo, hi] with fits(v), by bisection (the total grows with v); 0 if none. */
static uint32_t largest_fitting(qlr_recipe *c, uint32_t *field, uint32_t lo, uint32_t hi, const qlr_model_shape *s,
                                uint64_t budget) {
    uint32_t keep = *field, best = 0;
    while (lo <= hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        *field = mid;
        if (total_with(c, s) <= budget) {
            best = mid;
            lo = mid + 1;
        } else {
            if (mid == 0) break;
            hi = mid - 1;
        }
    }
    *field = keep;
    return best;
}

qlr_status qlr_plan_check(const qlr_plan *p, const qlr_recipe *r, uint64_t budget) {
    if (!budget || p->total <= budget) return QLR_OK;
    qlr_strbuf msg = {0}; /* grows: the advice has no length to cut it at */
    qlr_strbuf_printf(&msg, "the plan needs %.2f GiB (%llu bytes) but the budget is %.2f GiB: over by %.2f GiB", gib(p->total),
                          (unsigned long long)p->total, gib(budget), gib(p->total - budget));
    qlr_recipe c = *r; /* shallow: the plan reads only scalars */
    int n_opts = 0;
    const char *sep = "; change one of:";
    if (r->micro_batch_size > 1) {
        uint32_t mb = largest_fitting(&c, &c.micro_batch_size, 1, r->micro_batch_size - 1, &p->shape, budget);
        if (mb) {
            c.micro_batch_size = mb;
            uint64_t t = total_with(&c, &p->shape);
            c.micro_batch_size = r->micro_batch_size;
            uint64_t rows = (uint64_t)r->micro_batch_size * r->gradient_accumulation_steps;
            qlr_strbuf_printf(&msg,
                                  "%s\n  - micro_batch_size: %u -> %u (saves %.2f GiB; raise gradient_accumulation_steps "
                                  "%u -> %llu to keep %llu rows per step)",
                                  sep, r->micro_batch_size, mb, gib(p->total - t), r->gradient_accumulation_steps,
                                  (unsigned long long)cdiv(rows, mb), (unsigned long long)rows);
            sep = "";
            n_opts++;
        }
    }
    if (r->sequence_len > 16) {
        uint32_t sl = largest_fitting(&c, &c.sequence_len, 16, r->sequence_len - 1, &p->shape, budget);
        if (sl >= 16) {
            if (sl >= 128) sl = sl / 64 * 64;
            c.sequence_len = sl;
            uint64_t t = total_with(&c, &p->shape);
            c.sequence_len = r->sequence_len;
            qlr_strbuf_printf(&msg, "%s\n  - sequence_len: %u -> %u (saves %.2f GiB)", sep,
                                  r->sequence_len, sl, gib(p->total - t));
            sep = "";
            n_opts++;
        }
    }
    if (!r->gradient_checkpointing) {
        c.gradient_checkpointing = 1;
        uint64_t t = total_with(&c, &p->shape);
        c.gradient_checkpointing = 0;
        if (t <= budget) {
            qlr_strbuf_printf(&msg, "%s\n  - gradient_checkpointing: false -> true (saves %.2f GiB)",
                                  sep, gib(p->total - t));
            sep = "";
            n_opts++;
        }
    }
    if (r->gradient_checkpointing != QLR_CKPT_OFFLOAD && r->gradient_checkpointing != QLR_CKPT_AUTO) {
        c.gradient_checkpointing = QLR_CKPT_OFFLOAD;
        uint64_t t = total_with(&c, &p->shape);
        c.gradient_checkpointing = r->gradient_checkpointing;
        if (t <= budget) {
            qlr_strbuf_printf(&msg, "%s\n  - gradient_checkpointing: %s -> offload (saves %.2f GiB of device memory; "
                              "the layer inputs go to pinned host memory)", sep,
                              qlr_plan_ckpt_name(r->gradient_checkpointing), gib(p->total - t));
            sep = "";
            n_opts++;
        }
    }
    if (r->lora_r > 1) {
        uint32_t lr = largest_fitting(&c, &c.lora_r, 1, r->lora_r - 1, &p->shape, budget);
        if (lr) {
            c.lora_r = lr;
            uint64_t t = total_with(&c, &p->shape);
            c.lora_r = r->lora_r;
            qlr_strbuf_printf(&msg, "%s\n  - lora_r: %u -> %u (saves %.2f GiB)", sep, r->lora_r,
                                  lr, gib(p->total - t));
            sep = "";
            n_opts++;
        }
    }
    if ((!n_opts || !r->gradient_checkpointing)) {
        /* Several knobs together, greedily: checkpointing, then micro batch, sequence, rank. */
        qlr_recipe g = *r;
        qlr_strbuf parts = {0};
        if (!g.gradient_checkpointing) {
            g.gradient_checkpointing = 1;
            qlr_strbuf_printf(&parts, "gradient_checkpointing: true");
        }
        struct { const char *name; uint32_t *f; uint32_t lo; } knobs[] = {
            {"micro_batch_size", &g.micro_batch_size, 1}, {"sequence_len", &g.sequence_len, 16}, {"lora_r", &g.lora_r, 1}};
        for (int i = 0; i < 3 && total_with(&g, &p->shape) > budget; i++) {
            uint32_t was = *knobs[i].f;
            if (was <= knobs[i].lo) continue;
            uint32_t v = largest_fitting(&g, knobs[i].f, knobs[i].lo, was - 1, &p->shape, budget);
            if (!v) v = knobs[i].lo;
            else if (knobs[i].f == &g.sequence_len && v >= 128) v = v / 64 * 64;
            *knobs[i].f = v;
            qlr_strbuf_printf(&parts, "%s%s: %u -> %u", parts.n ? ", " : "", knobs[i].name, was, v);
        }
        uint64_t t = total_with(&g, &p->shape);
        if (t <= budget && parts.n && !parts.oom) {
            qlr_strbuf_printf(&msg, "%s\n  - together: %s (%.2f GiB)",
                                  n_opts ? "" : "; change several together:", parts.p, gib(t));
            n_opts++;
        }
        qlr_strbuf_free(&parts);
    }
    if (!n_opts) {
        /* Nothing alone is enough: say what the smallest run needs. */
        c.micro_batch_size = 1;
        c.sequence_len = 16;
        c.gradient_checkpointing = 1;
        c.lora_r = 1;
        uint64_t t = total_with(&c, &p->shape);
        qlr_strbuf_printf(&msg,
                 "; no single change of micro_batch_size, sequence_len, gradient_checkpointing or lora_r fits: even "
                 "micro_batch_size 1, sequence_len 16, lora_r 1 with checkpointing needs %.2f GiB (weights alone: "
                 "%.2f GiB); reduce several together, use a larger --vram or a smaller model",
                 gib(t), gib(p->comp_bytes[QLR_PLAN_BASE_NF4] + p->comp_bytes[QLR_PLAN_EMBEDDINGS] +
                             p->comp_bytes[QLR_PLAN_LM_HEAD]));
    }
    qlr_status st = qlr_errorf(QLR_ERR_RANGE, "%s", msg.oom || !msg.p ? "the plan does not fit the budget" : msg.p);
    qlr_strbuf_free(&msg);
    return st;
}

/* ------------------------------------------------------------------ output */

static const char *source_name(qlr_shape_source s) {
    return s == QLR_SHAPE_GGUF ? "GGUF metadata" : s == QLR_SHAPE_CONFIG_JSON ? "config.json" : "built-in preset";
}

void qlr_plan_print(const qlr_plan *p, const qlr_recipe *r, uint64_t budget, int verbose, FILE *f) {
    const qlr_model_shape *s = &p->shape;
    fprintf(f, "model: %s (%s): hidden %u, layers %u, heads %u/%u kv, head_dim %u, ff %u, vocab %u, %s embeddings\n",
            s->name, source_name(s->source), s->hidden, s->n_layers, s->n_heads, s->n_kv_heads, s->head_dim, s->ff,
            s->vocab, s->tied ? "tied" : "untied");
    if (s->source == QLR_SHAPE_PRESET)
        fprintf(f, "note: %s is not on disk; shapes come from the built-in %s preset\n", r->base_model, s->name);
    qlr_strbuf tb = {0};
    for (int i = 0; i < QLR_LORA_N_MODULES; i++)
        if (p->lora_targets & (1u << i)) qlr_strbuf_printf(&tb, "%s%s", tb.n ? "," : "", qlr_lora_module_name(i));
    const char *targets = tb.p && !tb.oom ? tb.p : "?";
    fprintf(f, "run: device %s, micro_batch_size %u x sequence_len %u = %llu tokens, gradient_checkpointing %s, "
               "%s compute, optimizer %s\n",
            p->cuda ? "cuda" : "cpu (host memory)", r->micro_batch_size, r->sequence_len, (unsigned long long)p->tokens,
            qlr_plan_ckpt_name(p->ckpt_mode), p->act_bytes == 2 ? "bf16" : "fp32", qlr_optimizer_name(r->optimizer));
    fprintf(f, "lora: r %u on %s: %llu trainable params (base linears: %llu params in NF4)\n\n", p->lora_r, targets,
            (unsigned long long)p->lora_params, (unsigned long long)p->base_params);
    qlr_strbuf_free(&tb);
    fprintf(f, "%-28s %16s %12s\n", "component", "bytes", "MiB");
    for (int c = 0; c < QLR_PLAN_N_COMPONENTS; c++) {
        if (!p->comp_bytes[c] && c != QLR_PLAN_LM_HEAD) continue;
        fprintf(f, "%-28s %16llu %12.1f%s\n", g_comp_names[c], (unsigned long long)p->comp_bytes[c],
                (double)p->comp_bytes[c] / 1048576.0, c == QLR_PLAN_LM_HEAD && p->shape.tied ? "  (tied to embeddings)" : "");
        if (verbose)
            for (uint32_t i = 0; i < p->n_items; i++)
                if (p->items[i].comp == (qlr_plan_component)c)
                    fprintf(f, "    %-40s %6llu x %12llu\n", p->items[i].name, (unsigned long long)p->items[i].count,
                            (unsigned long long)p->items[i].bytes_each);
    }
    fprintf(f, "%-28s %16llu %12.1f  (%.2f GiB)%s\n", "total", (unsigned long long)p->total, (double)p->total / 1048576.0,
            gib(p->total), p->host_total ? " of device memory (pinned host not included)" : "");
    if (budget)
        fprintf(f, "%-28s %16llu %12.1f  (%.2f GiB): %s\n", "budget", (unsigned long long)budget,
                (double)budget / 1048576.0, gib(budget), p->total <= budget ? "fits" : "OVER BUDGET");
    char line[256];
    qlr_plan_choice_line(p, r, budget, line, sizeof line);
    fprintf(f, "choice: %s\n", line);
}

qlr_status qlr_plan_to_json(const qlr_plan *p, const qlr_recipe *r, uint64_t budget, char **out) {
    json_t *o = json_object(), *m = json_object(), *comps = json_array(), *items = json_array();
    if (!o || !m || !comps || !items) goto oom;
    const qlr_model_shape *s = &p->shape;
    json_object_set_new(m, "name", json_string(s->name));
    json_object_set_new(m, "source", json_string(s->source == QLR_SHAPE_GGUF ? "gguf"
                                                 : s->source == QLR_SHAPE_CONFIG_JSON ? "config.json" : "preset"));
    json_object_set_new(m, "hidden", json_integer(s->hidden));
    json_object_set_new(m, "layers", json_integer(s->n_layers));
    json_object_set_new(m, "heads", json_integer(s->n_heads));
    json_object_set_new(m, "kv_heads", json_integer(s->n_kv_heads));
    json_object_set_new(m, "head_dim", json_integer(s->head_dim));
    json_object_set_new(m, "ff", json_integer(s->ff));
    json_object_set_new(m, "vocab", json_integer(s->vocab));
    json_object_set_new(m, "tied", json_boolean(s->tied));
    json_object_set_new(o, "model", m);
    m = NULL;
    json_object_set_new(o, "device", json_string(p->cuda ? "cuda" : "cpu"));
    json_object_set_new(o, "micro_batch_size", json_integer(r->micro_batch_size));
    json_object_set_new(o, "sequence_len", json_integer(r->sequence_len));
    json_object_set_new(o, "tokens", json_integer((json_int_t)p->tokens));
    json_object_set_new(o, "gradient_checkpointing", json_string(qlr_plan_ckpt_name(p->ckpt_mode)));
    json_object_set_new(o, "gradient_checkpointing_auto", json_boolean(p->ckpt_auto));
    json_object_set_new(o, "mlp_chunk", json_integer(p->mlp_chunk));
    json_object_set_new(o, "host_pinned_bytes", json_integer((json_int_t)p->host_total));
    json_object_set_new(o, "lora_r", json_integer(r->lora_r));
    json_object_set_new(o, "lora_params", json_integer((json_int_t)p->lora_params));
    json_object_set_new(o, "optimizer", json_string(qlr_optimizer_name(r->optimizer)));
    for (int c = 0; c < QLR_PLAN_N_COMPONENTS; c++) {
        json_t *e = json_object();
        if (!e) goto oom;
        json_object_set_new(e, "component", json_string(g_comp_names[c]));
        json_object_set_new(e, "arena", json_string(g_comp_arena[c]));
        json_object_set_new(e, "bytes", json_integer((json_int_t)p->comp_bytes[c]));
        json_object_set_new(e, "mib", json_real((double)p->comp_bytes[c] / 1048576.0));
        json_array_append_new(comps, e);
    }
    for (uint32_t i = 0; i < p->n_items; i++) {
        json_t *e = json_object();
        if (!e) goto oom;
        json_object_set_new(e, "component", json_string(g_comp_names[p->items[i].comp]));
        json_object_set_new(e, "name", json_string(p->items[i].name));
        json_object_set_new(e, "count", json_integer((json_int_t)p->items[i].count));
        json_object_set_new(e, "bytes_each", json_integer((json_int_t)p->items[i].bytes_each));
        json_array_append_new(items, e);
    }
    json_object_set_new(o, "components", comps);
    json_object_set_new(o, "items", items);
    comps = items = NULL;
    json_object_set_new(o, "total_bytes", json_integer((json_int_t)p->total));
    json_object_set_new(o, "budget_bytes", budget ? json_integer((json_int_t)budget) : json_null());
    json_object_set_new(o, "fits", budget ? json_boolean(p->total <= budget) : json_null());
    if (budget && p->total > budget) {
        if (qlr_plan_check(p, r, budget) != QLR_OK) json_object_set_new(o, "advice", json_string(qlr_error_msg()));
        qlr_error_clear();
    }
    *out = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(o);
    if (!*out) return qlr_errorf(QLR_ERR_NOMEM, "out of memory writing the plan as JSON");
    return QLR_OK;
oom:
    json_decref(o);
    json_decref(m);
    json_decref(comps);
    json_decref(items);
    return qlr_errorf(QLR_ERR_NOMEM, "out of memory writing the plan as JSON");
}
