/* train/recipe.h: the `qlora train` recipe — a YAML file parsed into one qlr_recipe struct.
 *
 * Owns: the schema (key names follow axolotl where the concept is the same), defaults,
 * validation with "file:line:column: key: message" errors (unknown keys get a did-you-mean,
 * wrong types and ranges say what is allowed, mutually exclusive keys are explained),
 * `--set key=value` overrides (nested: datasets.0.path=...), and writing the effective recipe
 * back out as YAML. It does not open models or datasets (model/, data/ do).
 *
 * Relative paths (base_model, datasets[].path, output_dir) are resolved against the folder
 * that holds the recipe file, never against the current directory, so a recipe runs the same
 * from anywhere; shipped recipes therefore say "../.cache/models/...". `--set` values follow
 * the same rule. Use qlr_recipe_resolve() to get the path to open. */
#ifndef QLR_TRAIN_RECIPE_H
#define QLR_TRAIN_RECIPE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/status.h"
#include "optim/optim.h"

typedef enum qlr_dataset_type {
    QLR_DATASET_ALPACA = 0,     /* {"instruction", "input"?, "output"} */
    QLR_DATASET_COMPLETION,     /* raw text in one field (`field`, default "text"); all tokens trained */
    QLR_DATASET_CHAT,           /* OpenAI-style messages [{role, content}] in `field_messages` */
    QLR_DATASET_SHAREGPT,       /* conversations [{from, value}] (from: system|human|gpt) */
    QLR_DATASET_INPUT_OUTPUT,   /* {"segments": [{"text", "label": bool}]}: label marks trained text */
    QLR_DATASET_PRETOKENIZED,   /* {"input_ids": [...], "labels"?: [...]} (-100 = not trained) */
    QLR_DATASET_TYPE_COUNT
} qlr_dataset_type;

typedef enum qlr_on_bad_line {
    QLR_ON_BAD_LINE_ERROR = 0,  /* stop with file:line and the reason (default) */
    QLR_ON_BAD_LINE_SKIP,       /* skip it, count it, report the count once */
} qlr_on_bad_line;

typedef enum qlr_optimizer {
    QLR_OPTIM_ADAMW_8BIT = 0,   /* blockwise 8-bit states (bitsandbytes AdamW8bit layout) */
    QLR_OPTIM_ADAMW_BNB_8BIT,   /* axolotl's name for the same optimizer */
    QLR_OPTIM_ADAMW_TORCH,      /* 32-bit states */
} qlr_optimizer;

typedef enum qlr_truncation {
    QLR_TRUNCATE = 0,           /* cut a sample longer than sequence_len to sequence_len tokens */
    QLR_TRUNCATION_DROP,        /* drop it (counted and reported) */
} qlr_truncation;

typedef enum qlr_recipe_device {
    QLR_RECIPE_DEVICE_AUTO = 0,        /* cuda when built with CUDA and a GPU is present, else cpu */
    QLR_RECIPE_DEVICE_CPU,
    QLR_RECIPE_DEVICE_CUDA,
} qlr_recipe_device;

typedef enum qlr_report_to {
    QLR_REPORT_NONE = 0,        /* metrics.jsonl and loss.svg only */
    QLR_REPORT_TENSORBOARD,     /* also TensorBoard event files in output_dir/runs (formats/tfevents.h) */
} qlr_report_to;

typedef enum qlr_bf16_mode {
    QLR_BF16_AUTO = 0,          /* bf16 compute where the device supports it (sm80+, cpu reference: fp32) */
    QLR_BF16_ON,                /* required; an error on a device without bf16 */
    QLR_BF16_OFF,               /* fp32 compute copies and activations */
} qlr_bf16_mode;

/* gradient_checkpointing: what the training workspace keeps of each layer for the backward. */
typedef enum qlr_ckpt_mode {
    QLR_CKPT_OFF = 0,           /* false: every layer's activations (fastest, most memory) */
    QLR_CKPT_ON,                /* true: each layer's input; the layer is recomputed in backward */
    QLR_CKPT_OFFLOAD,           /* offload: the inputs in pinned host memory, the MLP in row
                                   chunks (long context) */
    QLR_CKPT_AUTO,              /* auto: the planner picks the fastest that fits vram_budget
                                   (true when there is no budget) */
} qlr_ckpt_mode;

/* LoRA target modules, as a bit mask. */
enum {
    QLR_LORA_Q_PROJ = 1u << 0,
    QLR_LORA_K_PROJ = 1u << 1,
    QLR_LORA_V_PROJ = 1u << 2,
    QLR_LORA_O_PROJ = 1u << 3,
    QLR_LORA_GATE_PROJ = 1u << 4,
    QLR_LORA_UP_PROJ = 1u << 5,
    QLR_LORA_DOWN_PROJ = 1u << 6,
    QLR_LORA_ALL_LINEAR = 0x7fu,
};
#define QLR_LORA_N_MODULES 7
/* "q_proj", ... for bit i; NULL past the end. */
const char *qlr_lora_module_name(int bit);

#define QLR_RECIPE_MAX_DATASETS 64

typedef struct qlr_recipe_dataset {
    char *path;                 /* required. JSONL file (.jsonl or .jsonl.gz) or a folder holding <split>.jsonl */
    qlr_dataset_type type;      /* required: alpaca|completion|chat|sharegpt|input_output|pretokenized */
    char *split;                /* default "train": file <split>.jsonl[.gz] when path is a folder; ignored for a file */
    char *field;                /* completion only: the text field; default "text" */
    char *field_messages;       /* chat: default "messages"; sharegpt: default "conversations" */
    char *message_field_role;   /* chat: default "role"; sharegpt: default "from" */
    char *message_field_content;/* chat: default "content"; sharegpt: default "value" */
    qlr_on_bad_line on_bad_line;/* default error */
} qlr_recipe_dataset;

/* Where a key was given: "file:line:column" or "--set key=value". */
typedef struct qlr_recipe_loc {
    char *key;                  /* "lora_r", "datasets.0.path", "test_datasets.1" (a list item) */
    char *where;
} qlr_recipe_loc;

typedef struct qlr_recipe {
    /* where the recipe came from (not YAML keys) */
    char *source;               /* file path as given, or "<string>"; used in messages */
    char *base_dir;             /* folder relative paths resolve against (the recipe's folder; "." for strings) */
    qlr_recipe_loc *locs;       /* every key given, for messages about its value (qlr_recipe_where) */
    uint32_t n_locs;

    /* model */
    char *base_model;           /* required. GGUF file, HF folder (config.json + safetensors), or a known name
                                   such as meta-llama/Llama-3.1-8B (shape presets for `qlora plan`) */
    char *chat_template;        /* default "tokenizer_default" (detected from the model's template); or chatml|llama3|llama2|mistral */

    /* data */
    qlr_recipe_dataset *datasets; /* required, 1..QLR_RECIPE_MAX_DATASETS entries */
    uint32_t n_datasets;
    uint32_t sequence_len;      /* default 512; 16..131072 tokens per packed row */
    int sample_packing;         /* default false: pack several samples per row (attention kept per sample) */
    qlr_truncation truncation;  /* default truncate: what to do with samples longer than sequence_len */
    int train_on_inputs;        /* default false: loss only on outputs/assistant turns */
    double val_set_size;        /* default 0 (no eval); fraction in [0, 0.5] held out for evaluation */
    qlr_recipe_dataset *test_datasets; /* default none: validation files (axolotl's test_datasets, same keys as
                                   datasets; a folder path means <split>.jsonl, split default "test"), used by
                                   the eval steps and `qlora eval`; val_set_size must then be 0 */
    uint32_t n_test_datasets;

    /* batch and length of training */
    uint32_t micro_batch_size;  /* default 1; 1..4096 rows per forward */
    uint32_t gradient_accumulation_steps; /* default 1; 1..65536 micro batches per optimizer step */
    double num_epochs;          /* default 1 when max_steps is 0; >0..10000; exclusive with max_steps */
    uint64_t max_steps;         /* default 0 = use num_epochs; else stop after this many optimizer steps */

    /* optimizer and schedule */
    double learning_rate;       /* default 2e-4; (0, 1] */
    qlr_lr_schedule_type lr_scheduler; /* optim/optim.h: constant|linear|cosine; default cosine */
    double cosine_min_lr_ratio; /* default 0; [0, 1]; cosine only */
    uint64_t warmup_steps;      /* default 0; exclusive with warmup_ratio */
    double warmup_ratio;        /* default 0; [0, 1) fraction of total steps; exclusive with warmup_steps */
    double weight_decay;        /* default 0; [0, 1] decoupled (AdamW) */
    double max_grad_norm;       /* default 1.0; >= 0 global L2 clip, 0 = no clipping */
    qlr_optimizer optimizer;    /* default adamw_8bit */
    double adam_beta1;          /* default 0.9; [0, 1) */
    double adam_beta2;          /* default 0.999; [0, 1) */
    double adam_epsilon;        /* default 1e-8; (0, 1) */

    /* LoRA */
    uint32_t lora_r;            /* default 8; 1..1024 */
    double lora_alpha;          /* default 16; (0, 65536]; scale = alpha/r (alpha/sqrt(r) with rslora) */
    double lora_dropout;        /* default 0; [0, 1) dropout on the LoRA input */
    uint32_t lora_target_modules; /* QLR_LORA_* mask; default q_proj|v_proj when neither key is given */
    int lora_target_linear;     /* default false; true = every linear layer (all 7), union with the mask */
    int peft_use_rslora;        /* default false */

    /* evaluation, checkpoints, logging */
    uint64_t eval_steps;        /* default 0 = evaluate at the end only (when val_set_size > 0) */
    uint64_t save_steps;        /* default 0 = checkpoint at the end only */
    uint32_t save_total_limit;  /* default 0 = keep every checkpoint; else keep the newest N */
    uint64_t logging_steps;     /* default 1; >= 1 optimizer steps between progress/metrics lines */
    qlr_report_to report_to;    /* default none; tensorboard: event files of the logged scalars */
    char *output_dir;           /* default "outputs/run" (relative: against the recipe's folder) */
    uint64_t seed;              /* default 42; 0..2^32-1 */

    /* compute */
    int gradient_checkpointing; /* qlr_ckpt_mode; default auto (auto|true|false|offload) */
    qlr_bf16_mode bf16;         /* default auto (true|false|auto) */
    qlr_recipe_device device;     /* default auto (cpu|cuda|auto) */
    uint64_t vram_budget;       /* default 0 = no budget (the device's free memory); bytes, written "16GiB" */
} qlr_recipe;

/* Fills every field with its documented default; datasets empty, base_model NULL. Strings are
 * malloc'ed (free with qlr_recipe_free). Returns QLR_ERR_NOMEM only if malloc fails. */
qlr_status qlr_recipe_defaults(qlr_recipe *r);

/* Parses a recipe file and applies `n_sets` overrides "key=value" (value is YAML: 8, true,
 * "text", [q_proj, v_proj]) in order, then validates the whole. On failure *r is left freed
 * (zeroed) and the message names file:line:column (or the --set argument) and the key. */
qlr_status qlr_recipe_load(const char *path, const char *const *sets, int n_sets, qlr_recipe *r);

/* Same from text in memory; `name` is used in messages; relative paths resolve against
 * `base_dir` (NULL = "."). */
qlr_status qlr_recipe_parse(const char *text, size_t len, const char *name, const char *base_dir,
                            const char *const *sets, int n_sets, qlr_recipe *r);

/* Frees the strings and datasets and zeroes the struct; safe on a zeroed struct. */
void qlr_recipe_free(qlr_recipe *r);

/* Field-by-field equality of the YAML-visible fields (source and base_dir are ignored). */
int qlr_recipe_equal(const qlr_recipe *a, const qlr_recipe *b);

/* The effective recipe as YAML text (malloc'ed, NUL-terminated), every key written, with a
 * comment per key. With `absolute_paths`, relative dataset paths, output_dir and an on-disk
 * base_model are written resolved (checkpoint copies stay valid from anywhere). */
qlr_status qlr_recipe_to_yaml(const qlr_recipe *r, int absolute_paths, char **text);

/* Writes qlr_recipe_to_yaml(r, 1) atomically to `path`. */
qlr_status qlr_recipe_write(const qlr_recipe *r, const char *path);

/* Prints "key: value" lines of the effective recipe (no comments). */
void qlr_recipe_print(const qlr_recipe *r, FILE *f);

/* Where `key` was given ("recipe.yaml:14:11", "--set datasets.0.path=x.jsonl"), for messages about
 * its value found later (a file that does not exist); the recipe file's name for a key left at
 * its default. Keys as in qlr_recipe_loc. Never NULL. */
const char *qlr_recipe_where(const qlr_recipe *r, const char *key);

/* Resolves a recipe path: absolute paths unchanged, relative ones joined to r->base_dir; then
 * normalised (qlr_path_normalize: "recipes/../outputs/run" is "outputs/run").
 * QLR_ERR_RANGE if it does not fit in `cap`. */
qlr_status qlr_recipe_resolve(const qlr_recipe *r, const char *path, char *out, size_t cap);

/* Names of the enum values, for messages and printing. */
const char *qlr_dataset_type_name(qlr_dataset_type t);
const char *qlr_optimizer_name(qlr_optimizer o);
/* 1 for the 8-bit optimizers. */
int qlr_optimizer_is_8bit(qlr_optimizer o);
/* The effective LoRA target mask (lora_target_linear folded in). */
uint32_t qlr_recipe_lora_targets(const qlr_recipe *r);

/* Parses a byte size: "16GiB", "16 GiB", "500MiB", "16GB" (10^9), "1024" (bytes). */
qlr_status qlr_parse_size(const char *s, uint64_t *out);
/* Edit distance (Levenshtein) of two short strings, capped at 255. */
int qlr_edit_distance(const char *a, const char *b);

#endif
