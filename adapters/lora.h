/* adapters/lora.h: the LoRA adapter object (fp32 masters on the host), its PEFT-style init, and
 * import/export in the two formats people use: a GGUF LoRA as llama.cpp reads it
 * (docs/FORMATS.md §4) and a HF PEFT folder (§5).
 *
 * Orientation: in memory every module holds A [r, in] and B [out, r], row-major, PyTorch/PEFT
 * orientation, with q/k rows in HF (rotate-half) order, which is what our model runs. Only the
 * GGUF writer/reader permutes lora_b rows of attn_q/attn_k (llama arch, spec §4.6).
 * It does not own device copies, gradients or the registry of attached adapters. */
#ifndef QLR_ADAPTERS_LORA_H
#define QLR_ADAPTERS_LORA_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/status.h"
#include "model/model.h"

/* Target mask: bit i is qlr_linear_id i (q, k, v, o, gate, up, down), the same bits as the
 * recipe's QLR_LORA_* mask (train/recipe.h), so a recipe mask passes through unchanged. */
#define QLR_LORA_TARGET(id) (1u << (id))
#define QLR_LORA_TARGETS_ALL 0x7fu

/* Identity of the base model an adapter was made for. 0 / "" = unknown (an adapter read from a
 * foreign file without a base model to compare against). */
typedef struct qlr_lora_base {
    char name[256];      /* the base model's file or folder name (informational) */
    uint64_t nf4_hash;   /* qlr_model.nf4_hash of the NF4 store it was trained against (0 = unknown) */
    char arch[32];       /* general.architecture: "llama", "qwen2" */
    int32_t n_layers;
    int32_t d_model;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t d_ff;
} qlr_lora_base;

/* One adapted linear of one layer. a/b NULL when the module is not targeted in this layer. */
typedef struct qlr_lora_module {
    float *a;            /* [r, in] fp32 */
    float *b;            /* [out, r] fp32 */
    int32_t in, out;
} qlr_lora_module;

typedef struct qlr_lora {
    qlr_lora_base base;
    char *base_model;    /* base_model_name_or_path (may be NULL) */
    /* The prompt format the adapter was trained with (NULL = unknown): a chat template name
     * (data/chat_template.h: chatml, llama3, llama2, mistral), "alpaca" or "completion"; and
     * for chatml the default system message the template inserted (NULL = none). Recorded by
     * the trainer, kept by both file formats; `qlora export --format ollama` turns it into a
     * Modelfile TEMPLATE. */
    char *prompt_format;
    char *prompt_system;
    int32_t r;
    double alpha;        /* PEFT lora_alpha */
    double dropout;      /* PEFT lora_dropout (applied by the trainer) */
    int use_rslora;      /* scale = alpha/sqrt(r) instead of alpha/r */
    float scale;         /* alpha/r or alpha/sqrt(r) */
    uint32_t targets;    /* QLR_LORA_TARGET mask: modules present in at least one layer */
    qlr_lora_module *mods; /* [base.n_layers * QLR_LIN_COUNT], index layer * QLR_LIN_COUNT + id */
    float *block;        /* one allocation holding every a and b */
    uint64_t n_params;   /* floats in block */
} qlr_lora;

typedef struct qlr_lora_params {
    int32_t r;           /* rank (default 8) */
    double alpha;        /* default 16 */
    double dropout;      /* default 0 */
    int use_rslora;      /* default 0 */
    uint32_t targets;    /* QLR_LORA_TARGET mask (default q|v, as PEFT's llama default) */
    uint64_t seed;       /* init seed (default 42) */
    const char *base_model; /* copied into base_model (default NULL) */
} qlr_lora_params;

qlr_lora_params qlr_lora_params_default(void);

/* The base identity of a model config (arch and shapes; no name or hash). Never fails. */
void qlr_lora_base_from_config(const qlr_model_config *cfg, qlr_lora_base *base);
/* The full identity of a loaded model: its config, the name of m->source and m->nf4_hash. */
void qlr_lora_base_from_loaded(const qlr_model *m, qlr_lora_base *base);
/* Sets (copies) the prompt format and default system message; NULLs clear. QLR_ERR_NOMEM. */
qlr_status qlr_lora_set_prompt(qlr_lora *l, const char *format, const char *system);
/* Logs a warning naming both models when the adapter records the NF4 store it was trained
 * against and `base` is another one (both hashes known and different); returns 1 then, else 0.
 * The loaders call it whenever they are given a base; shapes that do not fit are errors
 * (qlr_lora_check_base), a different store of the same shapes is this warning. */
int qlr_lora_warn_base(const qlr_lora *l, const qlr_lora_base *base, const char *src);
/* Reads the config of a base model path (GGUF file, or HF folder with config.json) without
 * loading weights, into *base. Errors of the config readers (naming the file and key). */
qlr_status qlr_lora_base_from_model(const char *path, qlr_lora_base *base);
/* Expected {out, in} of linear `id` for `base`; 0 when the base does not say. */
void qlr_lora_base_shape(const qlr_lora_base *base, qlr_linear_id id, int32_t *out, int32_t *in);

/* Creates an adapter for `base` (all shapes must be known) with every targeted module in every
 * layer, initialised as PEFT does: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with
 * a = sqrt(5)), B = 0. The PRNG is deterministic and documented in lora.c: each (layer, module)
 * has its own stream derived from (seed, layer, module), so changing the targets never changes
 * another module's init. QLR_ERR_INVALID for r < 1, alpha <= 0, dropout outside [0, 1), an empty
 * target mask or an unknown base shape; QLR_ERR_NOMEM. *out NULL on failure. */
qlr_status qlr_lora_create(const qlr_lora_base *base, const qlr_lora_params *p, qlr_lora **out);
/* Frees the adapter; safe on NULL. */
void qlr_lora_free(qlr_lora *l);

/* The module of (layer, id), or NULL when out of range or not targeted. */
qlr_lora_module *qlr_lora_get(qlr_lora *l, int32_t layer, qlr_linear_id id);
const qlr_lora_module *qlr_lora_get_const(const qlr_lora *l, int32_t layer, qlr_linear_id id);
/* Merges module (layer, id) into a weight: w [rows, cols] (HF row order, f32) += scale * B·A,
 * accumulated per element in double (threaded over rows). A no-op when the adapter does not
 * adapt that linear. QLR_ERR_INVALID when rows/cols are not the module's out/in. */
qlr_status qlr_lora_add_delta(const qlr_lora *l, int32_t layer, qlr_linear_id id, float scale, float *w,
                              int64_t rows, int64_t cols);
/* alpha/r, or alpha/sqrt(r) with rsLoRA (computed in double, returned as float). */
float qlr_lora_compute_scale(double alpha, int32_t r, int use_rslora);

/* Refuses an adapter made for another base: arch (when both known), a tensor in a layer the base
 * does not have (fewer layers is allowed, as PEFT layers_to_transform), every module's in/out
 * against `base`, then the head layout (n_heads, n_kv_heads, head_dim) when both know it. The message names the tensor in GGUF naming
 * ("blk.3.attn_q.weight.lora_b: out 960 but the base model's attn_q has 576 rows ..."), prefixed
 * with `src`. QLR_ERR_INVALID on mismatch. */
qlr_status qlr_lora_check_base(const qlr_lora *l, const qlr_lora_base *base, const char *src);

/* Writes a GGUF LoRA adapter (spec §4.1-4.3, §4.6) atomically: general.architecture,
 * general.type=adapter, adapter.type=lora, adapter.lora.alpha (FLOAT32), quantization_version,
 * F32 tensors blk.N.<gguf name>.weight.lora_a ne {in, r} / .lora_b ne {r, out}, lora_b of
 * attn_q/attn_k row-permuted per head for the llama arch. With rsLoRA the written alpha is
 * alpha*sqrt(r), so llama.cpp's alpha/r equals our scale. Extra keys qlora.* carry the base
 * shapes and the original alpha/rsLoRA flag/dropout for a lossless re-import; llama.cpp and
 * gguf-py ignore them. QLR_ERR_INVALID when the arch or (llama, q/k targeted) the head layout
 * is unknown (import with a base model). */
qlr_status qlr_lora_save_gguf(const qlr_lora *l, const char *path);

/* Writes a PEFT folder `dir` (created if missing): adapter_model.safetensors (F32,
 * base_model.model.model.layers.N.{self_attn,mlp}.<hf name>.lora_{A,B}.weight, __metadata__
 * {"format": "pt", "qlora.base": "<json of the base identity>"}) then adapter_config.json
 * (indent 2, sorted keys). Each file is written atomically, and an older adapter_config.json
 * is removed before the tensors are replaced: at every instant the folder holds one adapter
 * whole, or no config (a crash in between). */
qlr_status qlr_lora_save_peft(const qlr_lora *l, const char *dir);

/* Reads a GGUF adapter. `base` (may be NULL) is the model it will run on: shapes are checked
 * against it and it supplies the head layout needed to un-permute q/k lora_b of llama files
 * that lack our qlora.* keys. Errors name the file and tensor: wrong general.type/adapter.type,
 * arch mismatch, a half missing, rank mismatch, shapes, unsupported tensor types. */
qlr_status qlr_lora_load_gguf(const char *path, const qlr_lora_base *base, qlr_lora **out);
/* Reads a PEFT folder (adapter_config.json + adapter_model.safetensors). Config errors carry
 * file:line:col; rank_pattern/alpha_pattern, DoRA, bias != none, fan_in_fan_out and
 * modules_to_save are refused (QLR_ERR_UNSUPPORTED). target_modules may be a list or a string
 * (then inferred from the tensors). F32/F16/BF16 tensors. */
qlr_status qlr_lora_load_peft(const char *dir, const qlr_lora_base *base, qlr_lora **out);

/* Where the adapter of `path` is: a training run dir (output_dir) gives <run>/adapter if it holds
 * adapter_config.json, else <run>/checkpoint-N/adapter of the largest N whose manifest.json is
 * there (a complete checkpoint; incomplete ones are skipped); a PEFT folder or a GGUF
 * file is itself. *out is malloc'ed; *is_gguf says which format. QLR_ERR_NOT_FOUND naming what
 * was looked for. */
qlr_status qlr_lora_resolve(const char *path, char **out, int *is_gguf);
/* qlr_lora_resolve then the matching loader. */
qlr_status qlr_lora_load(const char *path, const qlr_lora_base *base, qlr_lora **out);

/* One-line summary ("lora r 8 alpha 16 (scale 2) rslora no, targets q_proj,v_proj, 30 layers,
 * 921600 params, base llama SmolLM2-135M-Instruct.Q4_1.gguf (nf4 a5eae5d5377676e9), prompt format
 * chatml (default system message)"). */
void qlr_lora_print(const qlr_lora *l, FILE *out);

/* Layout of a training run (the trainer writes these; readers use qlr_lora_resolve). */
#define QLR_RUN_ADAPTER_DIR "adapter"          /* <output_dir>/adapter/: final adapter, PEFT */
#define QLR_RUN_CHECKPOINT_PREFIX "checkpoint-" /* <output_dir>/checkpoint-N/adapter/ */
/* checkpoint-N/manifest.json, written last: a checkpoint folder without it is incomplete and
 * never read (train/checkpoint.h QLR_CKPT_MANIFEST is this name) */
#define QLR_RUN_CHECKPOINT_MANIFEST "manifest.json"

#endif
