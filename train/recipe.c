/* train/recipe.c: recipe schema, parsing, validation, --set overrides and YAML output.
 *
 * One table (g_keys, g_ds_keys) describes every key: its type, its field in qlr_recipe, its
 * range and a one-line comment. Parsing, --set, printing and writing all walk that table, so a
 * key added there is parsed, validated, written and round-tripped without further code.
 * Cross-key rules (required keys, exclusive pairs, per-dataset-type fields) live in
 * validate(). YAML syntax is formats/yaml.c's business. */
#include "train/recipe.h"
#include "core/strbuf.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "core/file.h"
#include "core/log.h"
#include "formats/yaml.h"

/* ------------------------------------------------------------------ names */

static const char *const g_module_names[] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj", NULL};
static const char *const g_ds_type_names[] = {"alpaca", "completion", "chat", "sharegpt",
                                              "input_output", "pretokenized", NULL};
static const char *const g_bad_line_names[] = {"error", "skip", NULL};
static const char *const g_sched_names[] = {"constant", "linear", "cosine", NULL};
static const char *const g_optim_names[] = {"adamw_8bit", "adamw_bnb_8bit", "adamw_torch", NULL};
static const char *const g_trunc_names[] = {"truncate", "drop", NULL};
static const char *const g_device_names[] = {"auto", "cpu", "cuda", NULL};
static const char *const g_bf16_names[] = {"auto", "true", "false", NULL};
static const char *const g_ckpt_names[] = {"false", "true", "offload", "auto", NULL}; /* qlr_ckpt_mode */
static const char *const g_template_names[] = {"tokenizer_default", "chatml", "llama3", "llama2", "mistral", NULL};
static const char *const g_adapter_names[] = {"qlora", NULL};
static const char *const g_report_names[] = {"none", "tensorboard", NULL};

const char *qlr_lora_module_name(int bit) { return bit >= 0 && bit < QLR_LORA_N_MODULES ? g_module_names[bit] : NULL; }
const char *qlr_dataset_type_name(qlr_dataset_type t) {
    return (unsigned)t < QLR_DATASET_TYPE_COUNT ? g_ds_type_names[t] : "?";
}
const char *qlr_optimizer_name(qlr_optimizer o) { return (unsigned)o <= QLR_OPTIM_ADAMW_TORCH ? g_optim_names[o] : "?"; }
int qlr_optimizer_is_8bit(qlr_optimizer o) { return o == QLR_OPTIM_ADAMW_8BIT || o == QLR_OPTIM_ADAMW_BNB_8BIT; }
uint32_t qlr_recipe_lora_targets(const qlr_recipe *r) {
    return r->lora_target_linear ? QLR_LORA_ALL_LINEAR : r->lora_target_modules;
}

/* ------------------------------------------------------------------ the key table */

typedef enum kkind {
    K_STR,      /* char * */
    K_U32,      /* uint32_t in [lo, hi] */
    K_U64,      /* uint64_t in [lo, hi] */
    K_F64,      /* double in lo..hi, bounds open when lo_open/hi_open */
    K_BOOL,     /* int 0/1 */
    K_ENUM,     /* int (an enum) indexing `names` */
    K_BF16,     /* qlr_bf16_mode: auto or a boolean */
    K_CKPT,     /* qlr_ckpt_mode: auto, offload or a boolean */
    K_SIZE,     /* uint64_t bytes from "16GiB" */
    K_MODULES,  /* uint32_t mask from a list of module names */
    K_DATASETS, /* the datasets list */
    K_ADAPTER,  /* a constant the file may state (adapter: qlora); no field */
} kkind;

typedef struct key_def {
    const char *name;
    kkind kind;
    size_t off;
    double lo, hi;
    int lo_open, hi_open;
    const char *const *names;
    const char *help;
} key_def;

#define F(field) offsetof(qlr_recipe, field)
#define NOF 0
static const key_def g_keys[] = {
    {"base_model", K_STR, F(base_model), 0, 0, 0, 0, NULL, "GGUF file, HF folder, or a known model name"},
    {"adapter", K_ADAPTER, NOF, 0, 0, 0, 0, g_adapter_names, "always qlora: NF4 base + LoRA"},
    {"chat_template", K_ENUM, F(chat_template), 0, 0, 0, 0, g_template_names, "tokenizer_default uses the model's own"},
    {"datasets", K_DATASETS, NOF, 0, 0, 0, 0, NULL, "training data, JSONL"},
    {"test_datasets", K_DATASETS, NOF, 0, 0, 0, 0, NULL, "validation data, JSONL (then val_set_size: 0)"},
    {"sequence_len", K_U32, F(sequence_len), 16, 131072, 0, 0, NULL, "tokens per row"},
    {"sample_packing", K_BOOL, F(sample_packing), 0, 0, 0, 0, NULL, "pack several samples per row"},
    {"truncation", K_ENUM, F(truncation), 0, 0, 0, 0, g_trunc_names, "samples longer than sequence_len"},
    {"train_on_inputs", K_BOOL, F(train_on_inputs), 0, 0, 0, 0, NULL, "false: loss on outputs only"},
    {"val_set_size", K_F64, F(val_set_size), 0, 0.5, 0, 0, NULL, "fraction held out for eval (or test_datasets)"},
    {"micro_batch_size", K_U32, F(micro_batch_size), 1, 4096, 0, 0, NULL, "rows per forward pass"},
    {"gradient_accumulation_steps", K_U32, F(gradient_accumulation_steps), 1, 65536, 0, 0, NULL,
     "micro batches per optimizer step"},
    {"num_epochs", K_F64, F(num_epochs), 0, 10000, 0, 0, NULL, "passes over the data (0 = use max_steps)"},
    {"max_steps", K_U64, F(max_steps), 0, 1e12, 0, 0, NULL, "optimizer steps (0 = use num_epochs)"},
    {"learning_rate", K_F64, F(learning_rate), 0, 1, 1, 0, NULL, "peak learning rate"},
    {"lr_scheduler", K_ENUM, F(lr_scheduler), 0, 0, 0, 0, g_sched_names, "after warmup"},
    {"cosine_min_lr_ratio", K_F64, F(cosine_min_lr_ratio), 0, 1, 0, 0, NULL, "cosine floor, fraction of peak"},
    {"warmup_steps", K_U64, F(warmup_steps), 0, 1e12, 0, 0, NULL, "linear warmup steps"},
    {"warmup_ratio", K_F64, F(warmup_ratio), 0, 1, 0, 1, NULL, "warmup as a fraction of all steps"},
    {"weight_decay", K_F64, F(weight_decay), 0, 1, 0, 0, NULL, "decoupled (AdamW)"},
    {"max_grad_norm", K_F64, F(max_grad_norm), 0, 1e6, 0, 0, NULL, "global L2 clip, 0 = off"},
    {"optimizer", K_ENUM, F(optimizer), 0, 0, 0, 0, g_optim_names, "8-bit states save memory"},
    {"adam_beta1", K_F64, F(adam_beta1), 0, 1, 0, 1, NULL, "first-moment decay"},
    {"adam_beta2", K_F64, F(adam_beta2), 0, 1, 0, 1, NULL, "second-moment decay"},
    {"adam_epsilon", K_F64, F(adam_epsilon), 0, 1, 1, 1, NULL, "denominator epsilon"},
    {"lora_r", K_U32, F(lora_r), 1, 1024, 0, 0, NULL, "LoRA rank"},
    {"lora_alpha", K_F64, F(lora_alpha), 0, 65536, 1, 0, NULL, "scale = alpha / r"},
    {"lora_dropout", K_F64, F(lora_dropout), 0, 1, 0, 1, NULL, "dropout on the LoRA input"},
    {"lora_target_modules", K_MODULES, F(lora_target_modules), 0, 0, 0, 0, NULL, "linear layers with LoRA"},
    {"lora_target_linear", K_BOOL, F(lora_target_linear), 0, 0, 0, 0, NULL, "true = all 7 linear layers"},
    {"peft_use_rslora", K_BOOL, F(peft_use_rslora), 0, 0, 0, 0, NULL, "scale = alpha / sqrt(r)"},
    {"eval_steps", K_U64, F(eval_steps), 0, 1e12, 0, 0, NULL, "0 = evaluate at the end"},
    {"save_steps", K_U64, F(save_steps), 0, 1e12, 0, 0, NULL, "0 = checkpoint at the end"},
    {"save_total_limit", K_U32, F(save_total_limit), 0, 1000000, 0, 0, NULL, "0 = keep all checkpoints"},
    {"logging_steps", K_U64, F(logging_steps), 1, 1e12, 0, 0, NULL, "steps between log lines"},
    {"report_to", K_ENUM, F(report_to), 0, 0, 0, 0, g_report_names, "tensorboard: event files in output_dir/runs"},
    {"output_dir", K_STR, F(output_dir), 0, 0, 0, 0, NULL, "checkpoints, metrics, adapter"},
    {"seed", K_U64, F(seed), 0, 4294967295.0, 0, 0, NULL, "RNG seed (init, dropout, shuffle)"},
    {"gradient_checkpointing", K_CKPT, F(gradient_checkpointing), 0, 0, 0, 0, g_ckpt_names, "auto (fastest that fits vram_budget), true, false or offload"},
    {"bf16", K_BF16, F(bf16), 0, 0, 0, 0, g_bf16_names, "bf16 compute: auto, true or false"},
    {"device", K_ENUM, F(device), 0, 0, 0, 0, g_device_names, "auto, cpu or cuda"},
    {"vram_budget", K_SIZE, F(vram_budget), 0, 0, 0, 0, NULL, "refuse plans above this, 0 = none"},
};
#undef F
#define N_KEYS ((int)(sizeof g_keys / sizeof g_keys[0]))

/* Dataset keys; `types` is a mask of the dataset types the key applies to. */
typedef struct ds_key_def {
    const char *name;
    kkind kind;
    size_t off;
    const char *const *names;
    unsigned types;
    const char *help;
} ds_key_def;
#define D(field) offsetof(qlr_recipe_dataset, field)
#define ALL_TYPES 0x3fu
#define T(x) (1u << (x))
static const ds_key_def g_ds_keys[] = {
    {"path", K_STR, D(path), NULL, ALL_TYPES, "JSONL file or folder"},
    {"type", K_ENUM, D(type), g_ds_type_names, ALL_TYPES, NULL},
    {"split", K_STR, D(split), NULL, ALL_TYPES, NULL},
    {"field", K_STR, D(field), NULL, T(QLR_DATASET_COMPLETION), NULL},
    {"field_messages", K_STR, D(field_messages), NULL, T(QLR_DATASET_CHAT) | T(QLR_DATASET_SHAREGPT), NULL},
    {"message_field_role", K_STR, D(message_field_role), NULL, T(QLR_DATASET_CHAT) | T(QLR_DATASET_SHAREGPT), NULL},
    {"message_field_content", K_STR, D(message_field_content), NULL, T(QLR_DATASET_CHAT) | T(QLR_DATASET_SHAREGPT),
     NULL},
    {"on_bad_line", K_ENUM, D(on_bad_line), g_bad_line_names, ALL_TYPES, NULL},
};
#undef D
#define N_DS_KEYS ((int)(sizeof g_ds_keys / sizeof g_ds_keys[0]))

/* Common names from other tools that edit distance does not catch. */
static const char *const g_aliases[][2] = {
    {"epochs", "num_epochs"}, {"lr", "learning_rate"}, {"batch_size", "micro_batch_size"},
    {"per_device_train_batch_size", "micro_batch_size"}, {"max_seq_length", "sequence_len"},
    {"max_seq_len", "sequence_len"}, {"seq_len", "sequence_len"}, {"model", "base_model"},
    {"model_name_or_path", "base_model"}, {"optim", "optimizer"}, {"lora_rank", "lora_r"},
    {"target_modules", "lora_target_modules"}, {"r", "lora_r"}, {"warmup", "warmup_steps"},
    {"use_rslora", "peft_use_rslora"}, {"grad_clip", "max_grad_norm"},
};

/* ------------------------------------------------------------------ helpers */

int qlr_edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64) return 255;
    int prev[65], cur[65];
    for (size_t j = 0; j <= lb; j++) prev[j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= lb; j++) {
            int c = prev[j - 1] + (tolower((unsigned char)a[i - 1]) != tolower((unsigned char)b[j - 1]));
            if (prev[j] + 1 < c) c = prev[j] + 1;
            if (cur[j - 1] + 1 < c) c = cur[j - 1] + 1;
            cur[j] = c;
        }
        memcpy(prev, cur, sizeof(int) * (lb + 1));
    }
    return prev[lb] > 255 ? 255 : prev[lb];
}

/* The closest of `names` to `s` when close enough to be a typo, else NULL. */
static const char *closest(const char *s, const char *const *names, int n, size_t stride) {
    const char *best = NULL;
    int bd = 1000;
    for (int i = 0; i < n; i++) {
        const char *nm = *(const char *const *)((const char *)names + (size_t)i * stride);
        int d = qlr_edit_distance(s, nm);
        if (d < bd) { bd = d; best = nm; }
    }
    size_t len = strlen(s);
    if (best && (bd <= 2 || (size_t)bd * 3 <= len) && (size_t)bd < len) return best;
    return NULL;
}

static int names_count(const char *const *names) {
    int n = 0;
    while (names[n]) n++;
    return n;
}

/* Shortest "%.Ng" that reads back as the same double. */
static void fmt_double(char *buf, size_t cap, double v) {
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, cap, "%.*g", p, v);
        if (strtod(buf, NULL) == v) break;
    }
    /* keep a number that YAML 1.1 readers also take as a float: 1e-08 -> 1.0e-08 */
    if (!strchr(buf, '.') && (strchr(buf, 'e') || strchr(buf, 'n') || strchr(buf, 'i'))) {
        char *e = strchr(buf, 'e');
        if (e) {
            char tmp[64];
            snprintf(tmp, sizeof tmp, "%.*s.0%s", (int)(e - buf), buf, e);
            snprintf(buf, cap, "%s", tmp);
        }
    }
}

qlr_status qlr_parse_size(const char *s, uint64_t *out) {
    const char *p = s;
    while (isspace((unsigned char)*p)) p++;
    if (!isdigit((unsigned char)*p)) return qlr_errorf(QLR_ERR_INVALID, "not a size: \"%s\"", s);
    errno = 0;
    char *end;
    double v = strtod(p, &end);
    if (errno || !isfinite(v) || v < 0) return qlr_errorf(QLR_ERR_INVALID, "not a size: \"%s\"", s);
    while (isspace((unsigned char)*end)) end++;
    static const struct { const char *unit; double mul; } units[] = {
        {"", 1}, {"b", 1}, {"kib", 1024.0}, {"mib", 1048576.0}, {"gib", 1073741824.0}, {"tib", 1099511627776.0},
        {"k", 1024.0}, {"m", 1048576.0}, {"g", 1073741824.0}, {"t", 1099511627776.0},
        {"kb", 1e3}, {"mb", 1e6}, {"gb", 1e9}, {"tb", 1e12},
    };
    char u[8];
    size_t ul = strlen(end);
    if (ul >= sizeof u) return qlr_errorf(QLR_ERR_INVALID, "not a size: \"%s\"", s);
    for (size_t i = 0; i <= ul; i++) u[i] = (char)tolower((unsigned char)end[i]);
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (!strcmp(u, units[i].unit)) {
            double b = v * units[i].mul;
            if (b >= 18446744073709551615.0) return qlr_errorf(QLR_ERR_RANGE, "size too large: \"%s\"", s);
            if (units[i].mul == 1 && b != floor(b)) return qlr_errorf(QLR_ERR_INVALID, "not a size: \"%s\"", s);
            *out = (uint64_t)llround(b);
            return QLR_OK;
        }
    }
    return qlr_errorf(QLR_ERR_INVALID, "not a size: \"%s\"", s);
}

/* "16GiB" when exact in GiB or MiB, else bytes. */
static void fmt_size(char *buf, size_t cap, uint64_t v) {
    if (v && v % (1ull << 30) == 0) snprintf(buf, cap, "%lluGiB", (unsigned long long)(v >> 30));
    else if (v && v % (1ull << 20) == 0) snprintf(buf, cap, "%lluMiB", (unsigned long long)(v >> 20));
    else snprintf(buf, cap, "%llu", (unsigned long long)v);
}

/* ------------------------------------------------------------------ parse context */

#define LOC_MAX 160
typedef struct pctx {
    const char *name;      /* recipe file name for messages */
    const char *set_arg;   /* non-NULL while applying one --set */
    char loc[N_KEYS][LOC_MAX];               /* where each key was set ("" = not set) */
    /* per dataset list (DS_TRAIN, DS_TEST): */
    char ds_loc[2][QLR_RECIPE_MAX_DATASETS][N_DS_KEYS][LOC_MAX];
    char ds_list_loc[2][LOC_MAX];
    char ds_item_loc[2][QLR_RECIPE_MAX_DATASETS][LOC_MAX]; /* where each dataset map starts */
} pctx;

/* The two dataset lists: `datasets` (training) and `test_datasets` (validation). */
enum { DS_TRAIN = 0, DS_TEST = 1 };
static const char *const g_ds_list_keys[2] = {"datasets", "test_datasets"};
static qlr_recipe_dataset **ds_items(qlr_recipe *r, int list) { return list == DS_TEST ? &r->test_datasets : &r->datasets; }
static uint32_t *ds_count(qlr_recipe *r, int list) { return list == DS_TEST ? &r->n_test_datasets : &r->n_datasets; }
static const qlr_recipe_dataset *ds_items_c(const qlr_recipe *r, int list, uint32_t *n) {
    *n = list == DS_TEST ? r->n_test_datasets : r->n_datasets;
    return list == DS_TEST ? r->test_datasets : r->datasets;
}
static int ds_list_of(const key_def *k) { return strcmp(k->name, "test_datasets") ? DS_TRAIN : DS_TEST; }

static void where(const pctx *c, const qlr_yaml_node *n, char *buf) {
    if (c->set_arg) snprintf(buf, LOC_MAX, "--set %.140s", c->set_arg);
    else if (n) snprintf(buf, LOC_MAX, "%.120s:%u:%u", c->name, n->line, n->col);
    else snprintf(buf, LOC_MAX, "%.150s", c->name);
}

/* "got "eight"" or "got a map" */
static void got(const qlr_yaml_node *n, char *buf, size_t cap) {
    if (n->kind != QLR_YAML_SCALAR) snprintf(buf, cap, "got a %s", qlr_yaml_kind_name(n->kind));
    else snprintf(buf, cap, "got \"%.60s%s\"", n->text, strlen(n->text) > 60 ? "..." : "");
}

static qlr_status key_err(const pctx *c, const qlr_yaml_node *n, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static qlr_status key_err(const pctx *c, const qlr_yaml_node *n, const char *key, const char *fmt, ...) {
    char loc[LOC_MAX], msg[512];
    where(c, n, loc);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return qlr_errorf(QLR_ERR_INVALID, "%s: %s: %s", loc, key, msg);
}

static void range_text(const key_def *k, char *buf, size_t cap) {
    if (k->kind == K_U32 || k->kind == K_U64) {
        if (k->hi >= 1e12) snprintf(buf, cap, "an integer >= %.0f", k->lo);
        else snprintf(buf, cap, "an integer in %.0f..%.0f", k->lo, k->hi);
    } else {
        char lo[32], hi[32];
        fmt_double(lo, sizeof lo, k->lo);
        fmt_double(hi, sizeof hi, k->hi);
        snprintf(buf, cap, "a number in %c%s, %s%c", k->lo_open ? '(' : '[', lo, hi, k->hi_open ? ')' : ']');
    }
}

static int parse_bool_text(const char *s, int *v) {
    static const char *const t[] = {"true", "yes", "on"}, *const f[] = {"false", "no", "off"};
    for (int i = 0; i < 3; i++) {
        if (!strcasecmp(s, t[i])) { *v = 1; return 1; }
        if (!strcasecmp(s, f[i])) { *v = 0; return 1; }
    }
    return 0;
}

static int parse_uint_text(const char *s, uint64_t *v) {
    const char *p = s;
    if (*p == '+') p++;
    if (!isdigit((unsigned char)*p)) return 0;
    uint64_t x = 0;
    for (; *p; p++) {
        if (*p == '_') continue;
        if (!isdigit((unsigned char)*p)) return 0;
        if (x > (UINT64_MAX - 9) / 10) return 0;
        x = x * 10 + (uint64_t)(*p - '0');
    }
    *v = x;
    return 1;
}

static int parse_double_text(const char *s, double *v) {
    if (!*s) return 0;
    errno = 0;
    char *end;
    double x = strtod(s, &end);
    if (*end || errno || !isfinite(x)) return 0;
    if (strpbrk(s, "xXnN")) return 0; /* hex floats, nan/inf spellings */
    *v = x;
    return 1;
}

static int enum_index(const char *const *names, const char *s) {
    for (int i = 0; names[i]; i++)
        if (!strcmp(names[i], s)) return i;
    return -1;
}

static void enum_list(const char *const *names, char *buf, size_t cap) {
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; names[i] && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%s", i ? ", " : "", names[i]);
}

static qlr_status set_str(char **dst, const char *s) {
    char *d = strdup(s);
    if (!d) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    free(*dst);
    *dst = d;
    return QLR_OK;
}

/* Parses a scalar-kind value `n` of `kind` into `field`. `key` names it in messages. Enum
 * strings for K_STR with names (chat_template) are handled as K_ENUM over a char*. */
static qlr_status parse_value(const pctx *c, const qlr_yaml_node *n, const char *key, kkind kind, void *field,
                              const key_def *k, const char *const *names) {
    char g[96], gn[160], want[160];
    got(n, g, sizeof g);
    /* for numbers and booleans: a quoted "8" is a string in YAML */
    snprintf(gn, sizeof gn, "%s%s", g, n->kind == QLR_YAML_SCALAR && n->quoted ? " (quoted: write numbers and booleans without quotes)" : "");
    switch (kind) {
    case K_STR:
        if (n->kind != QLR_YAML_SCALAR) return key_err(c, n, key, "must be a string, %s", g);
        if (!n->text[0]) return key_err(c, n, key, "must not be empty");
        if (strlen(n->text) != n->len) return key_err(c, n, key, "must not contain NUL bytes");
        if (names) {
            if (enum_index(names, n->text) < 0) goto bad_enum;
        }
        return set_str((char **)field, n->text);
    case K_U32:
    case K_U64: {
        uint64_t v;
        range_text(k, want, sizeof want);
        if (n->kind != QLR_YAML_SCALAR || n->quoted || !parse_uint_text(n->text, &v) || (double)v < k->lo ||
            (double)v > k->hi)
            return key_err(c, n, key, "must be %s, %s", want, gn);
        if (kind == K_U32) *(uint32_t *)field = (uint32_t)v;
        else *(uint64_t *)field = v;
        return QLR_OK;
    }
    case K_F64: {
        double v;
        range_text(k, want, sizeof want);
        if (n->kind != QLR_YAML_SCALAR || n->quoted || !parse_double_text(n->text, &v) || v < k->lo || v > k->hi ||
            (k->lo_open && v == k->lo) || (k->hi_open && v == k->hi))
            return key_err(c, n, key, "must be %s, %s", want, gn);
        *(double *)field = v;
        return QLR_OK;
    }
    case K_BOOL: {
        int v;
        if (n->kind != QLR_YAML_SCALAR || n->quoted || !parse_bool_text(n->text, &v))
            return key_err(c, n, key, "must be true or false, %s", gn);
        *(int *)field = v;
        return QLR_OK;
    }
    case K_CKPT: {
        int v;
        if (n->kind == QLR_YAML_SCALAR && !n->quoted && (!strcmp(n->text, "auto") || !strcmp(n->text, "offload"))) {
            *(int *)field = n->text[0] == 'a' ? QLR_CKPT_AUTO : QLR_CKPT_OFFLOAD;
            return QLR_OK;
        }
        if (n->kind != QLR_YAML_SCALAR || n->quoted || !parse_bool_text(n->text, &v))
            return key_err(c, n, key, "must be auto, true, false or offload, %s", gn);
        *(int *)field = v ? QLR_CKPT_ON : QLR_CKPT_OFF;
        return QLR_OK;
    }
    case K_BF16: {
        int v;
        if (n->kind == QLR_YAML_SCALAR && !strcmp(n->text, "auto")) {
            *(qlr_bf16_mode *)field = QLR_BF16_AUTO;
            return QLR_OK;
        }
        if (n->kind != QLR_YAML_SCALAR || n->quoted || !parse_bool_text(n->text, &v))
            return key_err(c, n, key, "must be auto, true or false, %s", gn);
        *(qlr_bf16_mode *)field = v ? QLR_BF16_ON : QLR_BF16_OFF;
        return QLR_OK;
    }
    case K_ENUM:
    case K_ADAPTER: {
        if (n->kind != QLR_YAML_SCALAR) goto bad_enum;
        int i = enum_index(names, n->text);
        if (i < 0) goto bad_enum;
        if (field) *(int *)field = i;
        return QLR_OK;
    }
    case K_SIZE: {
        uint64_t v;
        if (n->kind != QLR_YAML_SCALAR || qlr_parse_size(n->text, &v) != QLR_OK) {
            qlr_error_clear();
            return key_err(c, n, key, "must be a size such as 16GiB, 500MiB or a number of bytes (0 = none), %s", g);
        }
        *(uint64_t *)field = v;
        return QLR_OK;
    }
    case K_MODULES: {
        if (n->kind != QLR_YAML_SEQ)
            return key_err(c, n, key, "must be a list such as [q_proj, v_proj], %s", g);
        uint32_t mask = 0;
        for (size_t i = 0; i < n->n; i++) {
            const qlr_yaml_node *it = n->items[i];
            int b = it->kind == QLR_YAML_SCALAR ? enum_index(g_module_names, it->text) : -1;
            if (b < 0) {
                char list[200], gi[96];
                enum_list(g_module_names, list, sizeof list);
                got(it, gi, sizeof gi);
                const char *sug = it->kind == QLR_YAML_SCALAR
                                      ? closest(it->text, g_module_names, QLR_LORA_N_MODULES, sizeof(char *))
                                      : NULL;
                return key_err(c, it, key, "each entry must be one of %s; %s%s%s%s", list, gi,
                               sug ? " (did you mean \"" : "", sug ? sug : "", sug ? "\"?)" : "");
            }
            if (mask & (1u << b)) return key_err(c, it, key, "%s is listed twice", it->text);
            mask |= 1u << b;
        }
        *(uint32_t *)field = mask;
        return QLR_OK;
    }
    default: QLR_ASSERT(0 && "unhandled kind");
    }
    return QLR_OK;
bad_enum: {
    char list[200];
    enum_list(names, list, sizeof list);
    const char *sug = n->kind == QLR_YAML_SCALAR ? closest(n->text, names, names_count(names), sizeof(char *)) : NULL;
    return key_err(c, n, key, "must be one of %s; %s%s%s%s", list, g, sug ? " (did you mean \"" : "",
                   sug ? sug : "", sug ? "\"?)" : "");
}
}

/* ------------------------------------------------------------------ defaults and free */

static void dataset_free(qlr_recipe_dataset *d) {
    free(d->path);
    free(d->split);
    free(d->field);
    free(d->field_messages);
    free(d->message_field_role);
    free(d->message_field_content);
    memset(d, 0, sizeof *d);
}

void qlr_recipe_free(qlr_recipe *r) {
    if (!r) return;
    free(r->source);
    free(r->base_dir);
    free(r->base_model);
    free(r->chat_template);
    for (uint32_t i = 0; i < r->n_datasets; i++) dataset_free(&r->datasets[i]);
    free(r->datasets);
    for (uint32_t i = 0; i < r->n_test_datasets; i++) dataset_free(&r->test_datasets[i]);
    free(r->test_datasets);
    free(r->output_dir);
    for (uint32_t i = 0; i < r->n_locs; i++) {
        free(r->locs[i].key);
        free(r->locs[i].where);
    }
    free(r->locs);
    memset(r, 0, sizeof *r);
}

qlr_status qlr_recipe_defaults(qlr_recipe *r) {
    memset(r, 0, sizeof *r);
    r->chat_template = strdup("tokenizer_default");
    r->output_dir = strdup("outputs/run");
    if (!r->chat_template || !r->output_dir) {
        qlr_recipe_free(r);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    r->sequence_len = 512;
    r->sample_packing = 0;
    r->truncation = QLR_TRUNCATE;
    r->train_on_inputs = 0;
    r->val_set_size = 0;
    r->micro_batch_size = 1;
    r->gradient_accumulation_steps = 1;
    r->num_epochs = 1;
    r->max_steps = 0;
    r->learning_rate = 2e-4;
    r->lr_scheduler = QLR_LR_COSINE;
    r->cosine_min_lr_ratio = 0;
    r->warmup_steps = 0;
    r->warmup_ratio = 0;
    r->weight_decay = 0;
    r->max_grad_norm = 1.0;
    r->optimizer = QLR_OPTIM_ADAMW_8BIT;
    r->adam_beta1 = 0.9;
    r->adam_beta2 = 0.999;
    r->adam_epsilon = 1e-8;
    r->lora_r = 8;
    r->lora_alpha = 16;
    r->lora_dropout = 0;
    r->lora_target_modules = QLR_LORA_Q_PROJ | QLR_LORA_V_PROJ;
    r->lora_target_linear = 0;
    r->peft_use_rslora = 0;
    r->eval_steps = 0;
    r->save_steps = 0;
    r->save_total_limit = 0;
    r->logging_steps = 1;
    r->report_to = QLR_REPORT_NONE;
    r->seed = 42;
    r->gradient_checkpointing = QLR_CKPT_AUTO;
    r->bf16 = QLR_BF16_AUTO;
    r->device = QLR_RECIPE_DEVICE_AUTO;
    r->vram_budget = 0;
    return QLR_OK;
}

/* Resets one key to its default (YAML null, `--set key=`). */
static qlr_status reset_key(qlr_recipe *r, const key_def *k) {
    qlr_recipe d;
    QLR_TRY(qlr_recipe_defaults(&d));
    qlr_status st = QLR_OK;
    if (k->kind == K_DATASETS) {
        int list = ds_list_of(k);
        for (uint32_t i = 0; i < *ds_count(r, list); i++) dataset_free(&(*ds_items(r, list))[i]);
        *ds_count(r, list) = 0;
    } else if (k->kind == K_STR || (k->kind == K_ENUM && k->names == g_template_names)) {
        char **dst = (char **)((char *)r + k->off), *src = *(char **)((char *)&d + k->off);
        free(*dst);
        *dst = src ? strdup(src) : NULL;
        if (src && !*dst) st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    } else if (k->kind != K_ADAPTER) {
        size_t sz = k->kind == K_U64 || k->kind == K_SIZE ? 8 : k->kind == K_F64 ? sizeof(double) : 4;
        memcpy((char *)r + k->off, (char *)&d + k->off, sz);
    }
    qlr_recipe_free(&d);
    return st;
}

/* ------------------------------------------------------------------ datasets */

static void ds_key_name(char *buf, size_t cap, int list, uint32_t i, const char *key) {
    snprintf(buf, cap, "%s.%u.%s", g_ds_list_keys[list], i, key);
}

static qlr_status parse_ds_key(pctx *c, qlr_recipe *r, int list, uint32_t i, const qlr_yaml_node *knode,
                               const char *key, const qlr_yaml_node *v) {
    char name[96];
    ds_key_name(name, sizeof name, list, i, key);
    for (int j = 0; j < N_DS_KEYS; j++) {
        const ds_key_def *dk = &g_ds_keys[j];
        if (strcmp(dk->name, key)) continue;
        void *field = (char *)&(*ds_items(r, list))[i] + dk->off;
        if (qlr_yaml_is_null(v)) {
            if (dk->kind == K_STR) {
                free(*(char **)field);
                *(char **)field = NULL;
            } else *(int *)field = dk->names == g_ds_type_names ? QLR_DATASET_TYPE_COUNT : 0;
            c->ds_loc[list][i][j][0] = 0;
            return QLR_OK;
        }
        key_def kd = {dk->name, dk->kind, 0, 0, 0, 0, 0, dk->names, NULL};
        QLR_TRY(parse_value(c, v, name, dk->kind, field, &kd, dk->names));
        where(c, v, c->ds_loc[list][i][j]);
        return QLR_OK;
    }
    const char *sug = closest(key, &g_ds_keys[0].name, N_DS_KEYS, sizeof(ds_key_def));
    char known[300];
    size_t k = 0;
    for (int j = 0; j < N_DS_KEYS && k < sizeof known; j++)
        k += (size_t)snprintf(known + k, sizeof known - k, "%s%s", j ? ", " : "", g_ds_keys[j].name);
    if (sug) return key_err(c, knode, name, "unknown dataset key; did you mean \"%s\"?", sug);
    return key_err(c, knode, name, "unknown dataset key (known: %s)", known);
}

static qlr_status ensure_dataset(pctx *c, qlr_recipe *r, int list, uint32_t i, const qlr_yaml_node *n,
                                 const char *key) {
    uint32_t *cnt = ds_count(r, list);
    if (i < *cnt) return QLR_OK;
    if (i > *cnt || i >= QLR_RECIPE_MAX_DATASETS)
        return key_err(c, n, key, "there are %u %s; the next one to add is %s.%u (at most %d)", *cnt,
                       g_ds_list_keys[list], g_ds_list_keys[list], *cnt, QLR_RECIPE_MAX_DATASETS);
    qlr_recipe_dataset *d = realloc(*ds_items(r, list), (size_t)(i + 1) * sizeof *d);
    if (!d) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    *ds_items(r, list) = d;
    memset(&d[i], 0, sizeof d[i]);
    d[i].type = QLR_DATASET_TYPE_COUNT; /* "not given" until validated */
    memset(c->ds_loc[list][i], 0, sizeof c->ds_loc[list][i]);
    where(c, n, c->ds_item_loc[list][i]);
    *cnt = i + 1;
    return QLR_OK;
}

static qlr_status parse_dataset_map(pctx *c, qlr_recipe *r, int list, uint32_t i, const qlr_yaml_node *m) {
    char name[64];
    snprintf(name, sizeof name, "%s.%u", g_ds_list_keys[list], i);
    if (m->kind != QLR_YAML_MAP) {
        char g[96];
        got(m, g, sizeof g);
        return key_err(c, m, name, "must be a map such as {path: data/train.jsonl, type: alpaca}, %s", g);
    }
    for (size_t j = 0; j < m->n; j++)
        QLR_TRY(parse_ds_key(c, r, list, i, m->keys[j], m->keys[j]->text, m->items[j]));
    return QLR_OK;
}

static qlr_status parse_datasets(pctx *c, qlr_recipe *r, int list, const qlr_yaml_node *n) {
    const char *key = g_ds_list_keys[list];
    if (n->kind != QLR_YAML_SEQ) {
        char g[96];
        got(n, g, sizeof g);
        return key_err(c, n, key, "must be a list of {path, type, ...} maps, %s", g);
    }
    if (n->n > QLR_RECIPE_MAX_DATASETS)
        return key_err(c, n, key, "at most %d datasets, got %zu", QLR_RECIPE_MAX_DATASETS, n->n);
    for (uint32_t i = 0; i < *ds_count(r, list); i++) dataset_free(&(*ds_items(r, list))[i]);
    *ds_count(r, list) = 0;
    for (uint32_t i = 0; i < n->n; i++) {
        QLR_TRY(ensure_dataset(c, r, list, i, n->items[i], key));
        QLR_TRY(parse_dataset_map(c, r, list, i, n->items[i]));
    }
    where(c, n, c->ds_list_loc[list]);
    return QLR_OK;
}

/* ------------------------------------------------------------------ top level */

static const key_def *find_key(const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(g_keys[i].name, name)) return &g_keys[i];
    return NULL;
}

static qlr_status unknown_key(const pctx *c, const qlr_yaml_node *kn, const char *key) {
    const char *sug = NULL;
    for (size_t i = 0; i < sizeof g_aliases / sizeof g_aliases[0]; i++)
        if (!strcmp(g_aliases[i][0], key)) sug = g_aliases[i][1];
    if (!sug) sug = closest(key, &g_keys[0].name, N_KEYS, sizeof(key_def));
    if (sug) return key_err(c, kn, key, "unknown key; did you mean \"%s\"?", sug);
    return key_err(c, kn, key, "unknown key (see recipes/*.yaml or train/recipe.h for the keys)");
}

static qlr_status apply_key(pctx *c, qlr_recipe *r, const key_def *k, const qlr_yaml_node *v) {
    int idx = (int)(k - g_keys);
    if (qlr_yaml_is_null(v)) {
        c->loc[idx][0] = 0;
        return reset_key(r, k);
    }
    if (k->kind == K_DATASETS) QLR_TRY(parse_datasets(c, r, ds_list_of(k), v));
    else if (k->kind == K_ENUM && k->names == g_template_names)
        QLR_TRY(parse_value(c, v, k->name, K_STR, (char *)r + k->off, k, k->names));
    else QLR_TRY(parse_value(c, v, k->name, k->kind, k->kind == K_ADAPTER ? NULL : (char *)r + k->off, k, k->names));
    where(c, v, c->loc[idx]);
    return QLR_OK;
}

static qlr_status parse_root(pctx *c, qlr_recipe *r, const qlr_yaml_doc *doc) {
    const qlr_yaml_node *root = doc->root;
    if (!root) return qlr_errorf(QLR_ERR_INVALID, "%s: the recipe is empty (expected keys such as base_model, datasets)", c->name);
    if (root->kind != QLR_YAML_MAP) {
        char g[96];
        got(root, g, sizeof g);
        return qlr_errorf(QLR_ERR_INVALID, "%s:%u:%u: a recipe must be a map of keys (base_model: ..., datasets: ...), %s",
                          c->name, root->line, root->col, g);
    }
    for (size_t i = 0; i < root->n; i++) {
        const qlr_yaml_node *kn = root->keys[i];
        const key_def *k = find_key(kn->text);
        if (!k) return unknown_key(c, kn, kn->text);
        QLR_TRY(apply_key(c, r, k, root->items[i]));
    }
    return QLR_OK;
}

/* One --set "key=value". */
static qlr_status apply_set(pctx *c, qlr_recipe *r, const char *arg) {
    c->set_arg = arg;
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg)
        return qlr_errorf(QLR_ERR_INVALID, "--set %s: expected key=value (e.g. --set lora_r=16 or --set datasets.0.path=x.jsonl)", arg);
    char key[128];
    if ((size_t)(eq - arg) >= sizeof key) return qlr_errorf(QLR_ERR_INVALID, "--set %.60s...: key too long", arg);
    memcpy(key, arg, (size_t)(eq - arg));
    key[eq - arg] = 0;
    char docname[LOC_MAX];
    snprintf(docname, sizeof docname, "--set %.140s", arg);
    qlr_yaml_doc *doc = NULL;
    qlr_status st = qlr_yaml_parse(eq + 1, strlen(eq + 1), docname, &doc);
    if (st != QLR_OK) return st;
    static const qlr_yaml_node empty = {QLR_YAML_SCALAR, 1, 1, (char *)"", 0, 0, 0, NULL, NULL};
    const qlr_yaml_node *v = doc->root ? doc->root : &empty;
    int list = !strncmp(key, "datasets.", 9) ? DS_TRAIN : !strncmp(key, "test_datasets.", 14) ? DS_TEST : -1;
    if (list >= 0) {
        const char *lk = g_ds_list_keys[list];
        char *end;
        const char *p = key + strlen(lk) + 1;
        unsigned long i = isdigit((unsigned char)*p) ? strtoul(p, &end, 10) : ULONG_MAX;
        if (i == ULONG_MAX || (*end != '.' && *end != 0)) {
            st = qlr_errorf(QLR_ERR_INVALID, "--set %s: %s: expected %s.N or %s.N.key (N from 0)", arg, key, lk, lk);
        } else if (i >= QLR_RECIPE_MAX_DATASETS) {
            st = key_err(c, v, key, "at most %d datasets", QLR_RECIPE_MAX_DATASETS);
        } else if ((st = ensure_dataset(c, r, list, (uint32_t)i, v, key)) == QLR_OK) {
            qlr_recipe_dataset *d = &(*ds_items(r, list))[i];
            if (*end == 0) {
                dataset_free(d);
                d->type = QLR_DATASET_TYPE_COUNT;
                memset(c->ds_loc[list][i], 0, sizeof c->ds_loc[list][i]);
                st = parse_dataset_map(c, r, list, (uint32_t)i, v);
            } else {
                st = parse_ds_key(c, r, list, (uint32_t)i, v, end + 1, v);
            }
        }
    } else {
        const key_def *k = find_key(key);
        st = k ? apply_key(c, r, k, v) : unknown_key(c, v, key);
    }
    qlr_yaml_free(doc);
    c->set_arg = NULL;
    return st;
}

/* ------------------------------------------------------------------ validation */

static const char *loc_of(const pctx *c, const char *key) {
    const key_def *k = find_key(key);
    return k ? c->loc[k - g_keys] : "";
}

static qlr_status exclusive(const pctx *c, const char *a, int a_on, const char *b, int b_on, const char *why) {
    if (!a_on || !b_on) return QLR_OK;
    return qlr_errorf(QLR_ERR_INVALID, "%s: %s: cannot be combined with %s (set at %s): %s; remove one of them (or set it to 0)",
                      loc_of(c, b), b, a, loc_of(c, a), why);
}

/* Each dataset of one list: path and type given, keys that fit its type, per-type defaults. */
static qlr_status validate_datasets(pctx *c, qlr_recipe *r, int list) {
    for (uint32_t i = 0; i < *ds_count(r, list); i++) {
        qlr_recipe_dataset *d = &(*ds_items(r, list))[i];
        char name[80], loc[LOC_MAX];
        snprintf(loc, sizeof loc, "%s", c->ds_item_loc[list][i][0] ? c->ds_item_loc[list][i] : c->name);
        if (!d->path) {
            ds_key_name(name, sizeof name, list, i, "path");
            return qlr_errorf(QLR_ERR_INVALID, "%s: %s: required (a JSONL file or a folder)", loc, name);
        }
        if (d->type == QLR_DATASET_TYPE_COUNT) {
            char types[200];
            enum_list(g_ds_type_names, types, sizeof types);
            ds_key_name(name, sizeof name, list, i, "type");
            return qlr_errorf(QLR_ERR_INVALID, "%s: %s: required (one of %s)", loc, name, types);
        }
        for (int j = 0; j < N_DS_KEYS; j++) {
            const ds_key_def *dk = &g_ds_keys[j];
            if (!c->ds_loc[list][i][j][0] || (dk->types & (1u << d->type))) continue;
            char types[128];
            size_t k = 0;
            types[0] = 0;
            for (int t = 0; t < QLR_DATASET_TYPE_COUNT; t++)
                if (dk->types & (1u << t))
                    k += (size_t)snprintf(types + k, sizeof types - k, "%s%s", k ? " or " : "", g_ds_type_names[t]);
            ds_key_name(name, sizeof name, list, i, dk->name);
            return qlr_errorf(QLR_ERR_INVALID, "%s: %s: only applies to type %s (this dataset is %s)",
                              c->ds_loc[list][i][j], name, types, g_ds_type_names[d->type]);
        }
        /* per-type defaults; keys that do not apply stay NULL */
        const char *def[4] = {NULL, NULL, NULL, NULL};
        if (d->type == QLR_DATASET_COMPLETION) def[0] = "text";
        if (d->type == QLR_DATASET_CHAT) { def[1] = "messages"; def[2] = "role"; def[3] = "content"; }
        if (d->type == QLR_DATASET_SHAREGPT) { def[1] = "conversations"; def[2] = "from"; def[3] = "value"; }
        char **f[4] = {&d->field, &d->field_messages, &d->message_field_role, &d->message_field_content};
        for (int j = 0; j < 4; j++)
            if (def[j] && !*f[j]) QLR_TRY(set_str(f[j], def[j]));
        if (!d->split) QLR_TRY(set_str(&d->split, list == DS_TEST ? "test" : "train"));
    }
    return QLR_OK;
}

static qlr_status validate(pctx *c, qlr_recipe *r) {
    if (!r->base_model)
        return qlr_errorf(QLR_ERR_INVALID, "%s: base_model: required (a GGUF file, a Hugging Face folder or a known name "
                          "such as meta-llama/Llama-3.1-8B)", c->name);
    if (r->n_datasets == 0)
        return qlr_errorf(QLR_ERR_INVALID, "%s: datasets: required (a list such as [{path: data/train.jsonl, type: alpaca}])",
                          c->ds_list_loc[DS_TRAIN][0] ? c->ds_list_loc[DS_TRAIN] : c->name);
    for (int list = DS_TRAIN; list <= DS_TEST; list++)
        QLR_TRY(validate_datasets(c, r, list));
    if (r->n_test_datasets && r->val_set_size > 0)
        return qlr_errorf(QLR_ERR_INVALID, "%s: val_set_size: must be 0 when test_datasets (set at %s) names the "
                          "validation files: the validation data is either those files or a fraction held out of "
                          "datasets; set val_set_size: 0 or remove test_datasets",
                          loc_of(c, "val_set_size")[0] ? loc_of(c, "val_set_size") : c->name, c->ds_list_loc[DS_TEST]);
    QLR_TRY(exclusive(c, "num_epochs", c->loc[find_key("num_epochs") - g_keys][0] && r->num_epochs > 0, "max_steps",
                      r->max_steps > 0,
                      "max_steps stops after N optimizer steps, num_epochs after N passes over the data"));
    QLR_TRY(exclusive(c, "warmup_steps", r->warmup_steps > 0, "warmup_ratio", r->warmup_ratio > 0,
                      "warmup_steps counts optimizer steps, warmup_ratio is a fraction of all steps"));
    if (r->max_steps > 0) r->num_epochs = 0;
    else if (r->num_epochs == 0) r->num_epochs = 1;
    if (r->cosine_min_lr_ratio > 0 && r->lr_scheduler != QLR_LR_COSINE)
        return qlr_errorf(QLR_ERR_INVALID, "%s: cosine_min_lr_ratio: only applies to lr_scheduler: cosine (it is %s at %s)",
                          loc_of(c, "cosine_min_lr_ratio"), g_sched_names[r->lr_scheduler],
                          loc_of(c, "lr_scheduler")[0] ? loc_of(c, "lr_scheduler") : "the default");
    if (qlr_recipe_lora_targets(r) == 0)
        return qlr_errorf(QLR_ERR_INVALID, "%s: lora_target_modules: empty, so LoRA would train nothing; list modules "
                          "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or set lora_target_linear: true",
                          loc_of(c, "lora_target_modules"));
    if (r->save_total_limit > 0 && r->save_steps == 0 && loc_of(c, "save_total_limit")[0])
        QLR_LOGW("%s: save_total_limit: has no effect while save_steps is 0 (one checkpoint at the end)",
                 loc_of(c, "save_total_limit"));
    return QLR_OK;
}

/* ------------------------------------------------------------------ where keys were set */

static qlr_status add_loc(qlr_recipe *r, const char *key, const char *where_text) {
    if (!where_text[0]) return QLR_OK;
    qlr_recipe_loc *l = realloc(r->locs, (r->n_locs + 1) * sizeof *l);
    if (!l) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    r->locs = l;
    l[r->n_locs].key = strdup(key);
    l[r->n_locs].where = strdup(where_text);
    r->n_locs++;
    if (!l[r->n_locs - 1].key || !l[r->n_locs - 1].where) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    return QLR_OK;
}

/* Keeps the parse context's locations in the recipe (qlr_recipe_where). */
static qlr_status keep_locs(const pctx *c, qlr_recipe *r) {
    for (int i = 0; i < N_KEYS; i++) QLR_TRY(add_loc(r, g_keys[i].name, c->loc[i]));
    for (int list = DS_TRAIN; list <= DS_TEST; list++)
        for (uint32_t i = 0; i < *ds_count(r, list); i++) {
            char name[96];
            snprintf(name, sizeof name, "%s.%u", g_ds_list_keys[list], i);
            QLR_TRY(add_loc(r, name, c->ds_item_loc[list][i]));
            for (int j = 0; j < N_DS_KEYS; j++) {
                ds_key_name(name, sizeof name, list, i, g_ds_keys[j].name);
                QLR_TRY(add_loc(r, name, c->ds_loc[list][i][j]));
            }
        }
    return QLR_OK;
}

const char *qlr_recipe_where(const qlr_recipe *r, const char *key) {
    for (uint32_t i = r->n_locs; i-- > 0;)
        if (!strcmp(r->locs[i].key, key)) return r->locs[i].where;
    return r->source ? r->source : "<recipe>";
}

/* ------------------------------------------------------------------ entry points */

qlr_status qlr_recipe_parse(const char *text, size_t len, const char *name, const char *base_dir,
                            const char *const *sets, int n_sets, qlr_recipe *r) {
    if (!name) name = "<string>";
    QLR_TRY(qlr_recipe_defaults(r));
    qlr_status st = QLR_OK;
    pctx *c = calloc(1, sizeof *c);
    qlr_yaml_doc *doc = NULL;
    if (!c) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); goto done; }
    c->name = name;
    if ((st = set_str(&r->source, name)) != QLR_OK) goto done;
    if ((st = set_str(&r->base_dir, base_dir && *base_dir ? base_dir : ".")) != QLR_OK) goto done;
    if ((st = qlr_yaml_parse(text, len, name, &doc)) != QLR_OK) goto done;
    if ((st = parse_root(c, r, doc)) != QLR_OK) goto done;
    for (int i = 0; i < n_sets; i++)
        if ((st = apply_set(c, r, sets[i])) != QLR_OK) goto done;
    if ((st = validate(c, r)) != QLR_OK) goto done;
    st = keep_locs(c, r);
done:
    qlr_yaml_free(doc);
    free(c);
    if (st != QLR_OK) qlr_recipe_free(r);
    return st;
}

qlr_status qlr_recipe_load(const char *path, const char *const *sets, int n_sets, qlr_recipe *r) {
    memset(r, 0, sizeof *r);
    char *data = NULL;
    size_t size = 0;
    QLR_TRY(qlr_file_read_all(path, QLR_YAML_MAX_BYTES, &data, &size));
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    qlr_status st = qlr_recipe_parse(data, size, path, dir, sets, n_sets, r);
    free(data);
    return st;
}

qlr_status qlr_recipe_resolve(const qlr_recipe *r, const char *path, char *out, size_t cap) {
    char joined[8192];
    int n;
    if (path[0] == '/' || !r->base_dir || !strcmp(r->base_dir, ".")) n = snprintf(joined, sizeof joined, "%s", path);
    else n = snprintf(joined, sizeof joined, "%s/%s", r->base_dir, path);
    if (n < 0 || (size_t)n >= sizeof joined) return qlr_errorf(QLR_ERR_RANGE, "path too long: %s", path);
    return qlr_path_normalize(joined, out, cap); /* recipes/../outputs/run -> outputs/run */
}

/* ------------------------------------------------------------------ equality and output */

static int str_eq(const char *a, const char *b) { return (!a && !b) || (a && b && !strcmp(a, b)); }

int qlr_recipe_equal(const qlr_recipe *a, const qlr_recipe *b) {
    for (int i = 0; i < N_KEYS; i++) {
        const key_def *k = &g_keys[i];
        const char *pa = (const char *)a + k->off, *pb = (const char *)b + k->off;
        switch (k->kind) {
        case K_STR: if (!str_eq(*(char *const *)pa, *(char *const *)pb)) return 0; break;
        case K_ENUM:
            if (k->names == g_template_names) { if (!str_eq(*(char *const *)pa, *(char *const *)pb)) return 0; }
            else if (*(const int *)pa != *(const int *)pb) return 0;
            break;
        case K_U32: case K_MODULES: if (*(const uint32_t *)pa != *(const uint32_t *)pb) return 0; break;
        case K_U64: case K_SIZE: if (*(const uint64_t *)pa != *(const uint64_t *)pb) return 0; break;
        case K_F64: if (*(const double *)pa != *(const double *)pb) return 0; break;
        case K_BOOL: case K_BF16: case K_CKPT: if (*(const int *)pa != *(const int *)pb) return 0; break;
        case K_DATASETS: {
            uint32_t na, nb;
            const qlr_recipe_dataset *da = ds_items_c(a, ds_list_of(k), &na), *db = ds_items_c(b, ds_list_of(k), &nb);
            if (na != nb) return 0;
            for (uint32_t d = 0; d < na; d++) {
                const qlr_recipe_dataset *x = &da[d], *y = &db[d];
                if (!str_eq(x->path, y->path) || x->type != y->type || !str_eq(x->split, y->split) ||
                    !str_eq(x->field, y->field) || !str_eq(x->field_messages, y->field_messages) ||
                    !str_eq(x->message_field_role, y->message_field_role) ||
                    !str_eq(x->message_field_content, y->message_field_content) || x->on_bad_line != y->on_bad_line)
                    return 0;
            }
            break;
        }
        case K_ADAPTER: break;
        }
    }
    return 1;
}

static void sb_quoted(qlr_strbuf *s, const char *str) {
    size_t need = qlr_yaml_quote(NULL, 0, str);
    char *q = malloc(need + 1);
    if (!q) { s->oom = 1; return; }
    qlr_yaml_quote(q, need + 1, str);
    qlr_strbuf_printf(s, "%s", q);
    free(q);
}

/* A path field, resolved when asked and it is relative (base_model only if it exists). */
static void sb_path(qlr_strbuf *s, const qlr_recipe *r, const char *p, int absolute, int only_if_exists) {
    char buf[4096];
    if (absolute && p[0] != '/' && qlr_recipe_resolve(r, p, buf, sizeof buf) == QLR_OK &&
        (!only_if_exists || qlr_path_exists(buf))) {
        char *rp = realpath(buf, NULL);
        sb_quoted(s, rp ? rp : buf);
        free(rp);
    } else sb_quoted(s, p);
}

static void emit(qlr_strbuf *s, const qlr_recipe *r, int absolute, int comments) {
    if (comments) qlr_strbuf_printf(s, "# qlora recipe (effective values; every key written)\n");
    for (int i = 0; i < N_KEYS; i++) {
        const key_def *k = &g_keys[i];
        const char *p = (const char *)r + k->off;
        char v[64];
        size_t start = s->n;
        qlr_strbuf_printf(s, "%s: ", k->name);
        switch (k->kind) {
        case K_STR:
            if (*(char *const *)p) {
                int is_path = !strcmp(k->name, "base_model") || !strcmp(k->name, "output_dir");
                if (is_path) sb_path(s, r, *(char *const *)p, absolute, !strcmp(k->name, "base_model"));
                else sb_quoted(s, *(char *const *)p);
            } else qlr_strbuf_printf(s, "null");
            break;
        case K_ENUM:
            if (k->names == g_template_names) qlr_strbuf_printf(s, "%s", *(char *const *)p ? *(char *const *)p : "null");
            else qlr_strbuf_printf(s, "%s", k->names[*(const int *)p]);
            break;
        case K_ADAPTER: qlr_strbuf_printf(s, "qlora"); break;
        case K_U32: qlr_strbuf_printf(s, "%u", *(const uint32_t *)p); break;
        case K_U64: qlr_strbuf_printf(s, "%llu", (unsigned long long)*(const uint64_t *)p); break;
        case K_F64: fmt_double(v, sizeof v, *(const double *)p); qlr_strbuf_printf(s, "%s", v); break;
        case K_BOOL: qlr_strbuf_printf(s, "%s", *(const int *)p ? "true" : "false"); break;
        case K_BF16: qlr_strbuf_printf(s, "%s", g_bf16_names[*(const int *)p]); break;
        case K_CKPT: qlr_strbuf_printf(s, "%s", g_ckpt_names[*(const int *)p]); break;
        case K_SIZE: fmt_size(v, sizeof v, *(const uint64_t *)p); qlr_strbuf_printf(s, "%s", v); break;
        case K_MODULES: {
            uint32_t m = *(const uint32_t *)p;
            qlr_strbuf_printf(s, "[");
            for (int b = 0, first = 1; b < QLR_LORA_N_MODULES; b++)
                if (m & (1u << b)) { qlr_strbuf_printf(s, "%s%s", first ? "" : ", ", g_module_names[b]); first = 0; }
            qlr_strbuf_printf(s, "]");
            break;
        }
        case K_DATASETS: {
            uint32_t nd;
            const qlr_recipe_dataset *list = ds_items_c(r, ds_list_of(k), &nd);
            if (!nd) qlr_strbuf_printf(s, "[]"); /* test_datasets when not given */
            if (comments) qlr_strbuf_printf(s, "  # %s\n", k->help);
            else qlr_strbuf_printf(s, "\n");
            for (uint32_t d = 0; d < nd; d++) {
                const qlr_recipe_dataset *ds = &list[d];
                qlr_strbuf_printf(s, "  - path: ");
                sb_path(s, r, ds->path, absolute, 0);
                qlr_strbuf_printf(s, "\n    type: %s\n", g_ds_type_names[ds->type]);
                const char *names[] = {"split", "field", "field_messages", "message_field_role", "message_field_content"};
                const char *vals[] = {ds->split, ds->field, ds->field_messages, ds->message_field_role,
                                      ds->message_field_content};
                for (int j = 0; j < 5; j++)
                    if (vals[j]) {
                        qlr_strbuf_printf(s, "    %s: ", names[j]);
                        sb_quoted(s, vals[j]);
                        qlr_strbuf_printf(s, "\n");
                    }
                qlr_strbuf_printf(s, "    on_bad_line: %s\n", g_bad_line_names[ds->on_bad_line]);
            }
            continue;
        }
        }
        if (comments) {
            size_t w = s->n - start;
            qlr_strbuf_printf(s, "%*s# %s\n", w < 40 ? (int)(40 - w) : 1, "", k->help);
        } else qlr_strbuf_printf(s, "\n");
    }
}

qlr_status qlr_recipe_to_yaml(const qlr_recipe *r, int absolute_paths, char **text) {
    qlr_strbuf s = {0};
    emit(&s, r, absolute_paths, 1);
    if (s.oom || !s.p) {
        free(s.p);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory writing the recipe");
    }
    *text = s.p;
    return QLR_OK;
}

qlr_status qlr_recipe_write(const qlr_recipe *r, const char *path) {
    char *t = NULL;
    QLR_TRY(qlr_recipe_to_yaml(r, 1, &t));
    qlr_status st = qlr_write_atomic(path, t, strlen(t));
    free(t);
    return st;
}

void qlr_recipe_print(const qlr_recipe *r, FILE *f) {
    qlr_strbuf s = {0};
    emit(&s, r, 0, 0);
    if (s.p) fputs(s.p, f);
    free(s.p);
}
