/* train/plan.h: the memory plan of a training run, computed before anything is allocated.
 *
 * Owns: the model shape a plan needs (from GGUF llama.* metadata, a HF config.json, or a
 * built-in preset for well-known names not on disk), and the table of sizes — one row per
 * buffer class, each with a count and an aligned size — that `qlora plan` prints and that the
 * trainer carves its arenas from (STYLE.md habit 8). It does not allocate device memory.
 *
 * One size table (ARCHITECTURE.md "Weights and memory"): every item comes from the function
 * that sizes the allocation itself — model/model.h qlr_model_weight_items (what qlr_model_load
 * allocates), adapters/adapter_dev.h qlr_lora_dev_items (masters, gradients, compute copies),
 * optim/optim.h qlr_adamw_state_items, model/backprop.h qlr_train_plan_items (the training
 * workspace) — so the plan is the allocation, item by item (tests/train/test_plan.c checks it by
 * recording a run's allocations). Sizes are as requested from mem.alloc; the memory taken is
 * each rounded up to QLR_PLAN_ALIGN. Estimated, not allocated by us: the backend's op
 * workspace (dequantized linear), cuBLASLt/cuDNN workspaces and the CUDA context. */
#ifndef QLR_TRAIN_PLAN_H
#define QLR_TRAIN_PLAN_H

#include <stdint.h>
#include <stdio.h>

#include "core/status.h"
#include "train/recipe.h"

#define QLR_PLAN_ALIGN 256u                 /* every buffer starts 256-byte aligned */
#define QLR_PLAN_CE_CHUNK 1024u             /* tokens per lm_head + cross-entropy chunk */
#define QLR_PLAN_MLP_CHUNK 2048u            /* tokens per MLP chunk with gradient_checkpointing offload */
#define QLR_PLAN_CE_CHUNK_OFFLOAD 256u      /* lm_head + CE chunk with offload ([256, vocab] f32 logits) */
#define QLR_PLAN_CUBLASLT_WS (32ull << 20)  /* cuBLASLt workspace */
#define QLR_PLAN_CUDNN_WS (32ull << 20)     /* cuDNN attention workspace */
#define QLR_PLAN_CUDA_CONTEXT_BYTES (512ull << 20) /* context, kernels, allocator slack outside our arenas */

typedef enum qlr_shape_source {
    QLR_SHAPE_GGUF = 0,      /* llama.* metadata of the base_model GGUF */
    QLR_SHAPE_CONFIG_JSON,   /* config.json of a HF folder */
    QLR_SHAPE_PRESET,        /* built-in shapes of a known name not present on disk */
} qlr_shape_source;

typedef struct qlr_model_shape {
    char name[128];          /* preset name, or the file's basename */
    qlr_shape_source source;
    uint32_t hidden;         /* d_model, 1..65536 */
    uint32_t n_layers;       /* 1..1024 */
    uint32_t n_heads;        /* 1..1024 */
    uint32_t n_kv_heads;     /* divides n_heads */
    uint32_t head_dim;       /* 1..1024 */
    uint32_t ff;             /* MLP intermediate size, 1..1048576 */
    uint32_t vocab;          /* 1..4194304 */
    int tied;                /* lm_head shares the embedding matrix */
} qlr_model_shape;

/* Shape of a built-in preset whose name matches `name` (case-insensitive; a path, an org/ prefix,
 * "meta-", "-Instruct" and a ".gguf" suffix are ignored): Llama-3.1-8B (also Llama-3-8B),
 * Llama-3.2-1B, Llama-3.2-3B, SmolLM2-135M, SmolLM2-360M, SmolLM2-1.7B. QLR_ERR_NOT_FOUND (with
 * the list of presets) when none matches. */
qlr_status qlr_model_shape_preset(const char *name, qlr_model_shape *s);
/* From GGUF metadata (general.architecture must be llama). */
qlr_status qlr_model_shape_from_gguf(const char *path, qlr_model_shape *s);
/* From a HF config.json (model_type llama), or a folder holding one. */
qlr_status qlr_model_shape_from_config(const char *path, qlr_model_shape *s);
/* The recipe's base_model, resolved (qlr_recipe_resolve): a GGUF file, a folder or config.json,
 * else a preset (the caller should say so: s->source == QLR_SHAPE_PRESET). */
qlr_status qlr_model_shape_for_recipe(const qlr_recipe *r, qlr_model_shape *s);

/* The model config a shape stands for (arch llama; what the planner sizes). */
struct qlr_model_config;
void qlr_model_shape_config(const qlr_model_shape *s, struct qlr_model_config *c);

typedef enum qlr_plan_component {
    QLR_PLAN_BASE_NF4 = 0,   /* decoder linear weights, NF4 + double-quant absmax */
    QLR_PLAN_EMBEDDINGS,     /* token embeddings, bf16 [vocab, hidden] */
    QLR_PLAN_NORMS,          /* RMSNorm weights, biases, RoPE table (f32) */
    QLR_PLAN_LM_HEAD,        /* bf16 [vocab, hidden]; 0 when tied */
    QLR_PLAN_LORA_MASTER,    /* LoRA A/B fp32 masters */
    QLR_PLAN_LORA_COMPUTE,   /* LoRA A/B compute copies in the activation dtype */
    QLR_PLAN_LORA_GRADS,     /* LoRA A/B fp32 gradients (accumulated over micro batches) */
    QLR_PLAN_OPTIMIZER,      /* AdamW m and v */
    QLR_PLAN_ACT_SAVED,      /* activations kept for backward */
    QLR_PLAN_RECOMPUTE,      /* one layer's forward recomputed in backward (checkpointing) */
    QLR_PLAN_BACKWARD,       /* one layer's activation gradients */
    QLR_PLAN_LM_HEAD_CE,     /* chunked lm_head + cross-entropy workspace */
    QLR_PLAN_DEQUANT,        /* the backend's op workspace: the largest linear dequantized
                                (estimated: the backend sizes it on first use) */
    QLR_PLAN_BATCH,          /* token ids, labels, positions, sequence starts */
    QLR_PLAN_BLAS_WS,        /* cuBLASLt + cuDNN workspaces (cuda only) */
    QLR_PLAN_CUDA_CONTEXT,   /* reserve for the CUDA context (cuda only) */
    QLR_PLAN_MISC,           /* adapter slot table, grad-norm accumulator */
    QLR_PLAN_HOST_PINNED,    /* offload: the layer inputs in pinned host memory (not device
                                memory: counted in host_total, not in total) */
    QLR_PLAN_N_COMPONENTS
} qlr_plan_component;

/* One buffer class: `count` buffers of `bytes_each` (already aligned). */
typedef struct qlr_plan_item {
    qlr_plan_component comp;
    char name[64];           /* "blk.*.ffn_gate NF4 codes", "layer input (checkpoint)", ... */
    uint64_t count;
    uint64_t bytes_each;
} qlr_plan_item;

typedef struct qlr_plan {
    qlr_model_shape shape;
    int cuda;                /* planned for device memory (device cuda or auto) */
    uint64_t tokens;         /* T = micro_batch_size * sequence_len */
    uint32_t ce_chunk;       /* min(QLR_PLAN_CE_CHUNK, T) */
    int ckpt_mode;           /* qlr_ckpt_mode planned: off, on or offload (never auto) */
    int ckpt_auto;           /* 1: the recipe said auto and the planner chose ckpt_mode */
    uint32_t mlp_chunk;      /* MLP rows per chunk (offload), 0 = whole rows */
    uint32_t act_bytes;      /* 2 (bf16) or 4 (bf16: false) bytes per activation element */
    uint32_t lora_r;
    uint32_t lora_targets;   /* effective QLR_LORA_* mask */
    uint64_t lora_params;    /* trainable parameters */
    uint64_t base_params;    /* parameters in the NF4 linears */
    qlr_plan_item *items;
    uint32_t n_items, cap_items;
    uint64_t comp_bytes[QLR_PLAN_N_COMPONENTS];
    uint64_t total;          /* device bytes */
    uint64_t host_total;     /* pinned host bytes (offload), beside the device total */
} qlr_plan;

/* "base weights (NF4)", ... */
const char *qlr_plan_component_name(qlr_plan_component c);
/* The arena a component is carved from: "weights", "adapter", "optimizer", "activations",
 * "workspace" or "reserve". */
const char *qlr_plan_component_arena(qlr_plan_component c);

/* Builds the plan of recipe `r` on model `s`. With gradient_checkpointing auto it picks the
 * fastest mode whose plan fits r->vram_budget: false (no recomputation), else true, else
 * offload (layer inputs in pinned host memory, MLP in QLR_PLAN_MLP_CHUNK rows); offload when
 * none fits, true when there is no budget. QLR_ERR_INVALID for an out-of-bounds shape,
 * QLR_ERR_NOMEM if the item list cannot grow. Free with qlr_plan_free. */
qlr_status qlr_plan_build(const qlr_recipe *r, const qlr_model_shape *s, qlr_plan *p);
void qlr_plan_free(qlr_plan *p);

/* "false", "true", "offload" or "auto". */
const char *qlr_plan_ckpt_name(int ckpt_mode);
/* One line saying what the plan chose and the room left: "gradient_checkpointing offload
 * (auto: the fastest that fits), 15.02 GiB of 16.00 GiB, 0.98 GiB left; 20.00 GiB pinned host
 * memory". budget 0: no room is said. */
void qlr_plan_choice_line(const qlr_plan *p, const qlr_recipe *r, uint64_t budget, char *buf,
                          size_t cap);
/* The longest sequence_len in [16, max_len] whose plan (r's micro_batch_size and other
 * settings; gradient_checkpointing auto picks per length with `budget`) fits `budget`, by
 * bisection (the plan grows with the length); *seq = 0 when not even 16 fits. With out, the
 * plan at that length (its ckpt_mode, mlp_chunk, total, host_total), to free with
 * qlr_plan_free (zeroed when *seq is 0). QLR_ERR_INVALID for budget 0 or max_len < 16. */
qlr_status qlr_plan_longest_seq(const qlr_recipe *r, const qlr_model_shape *s, uint64_t budget,
                                uint32_t max_len, uint32_t *seq, qlr_plan *out);

/* QLR_OK when budget is 0 or p->total <= budget. Otherwise QLR_ERR_RANGE with a message that
 * says by how much it is over and names what to change (micro_batch_size, sequence_len,
 * gradient_checkpointing, lora_r) and to what value each alone would make it fit. */
qlr_status qlr_plan_check(const qlr_plan *p, const qlr_recipe *r, uint64_t budget);

/* The table: component, bytes, MiB, then the total against the budget (0 = none). With
 * `verbose`, every item under its component. */
void qlr_plan_print(const qlr_plan *p, const qlr_recipe *r, uint64_t budget, int verbose, FILE *f);
/* The plan as a JSON object (malloc'ed text): model, settings, components, items, total,
 * budget, fits. */
qlr_status qlr_plan_to_json(const qlr_plan *p, const qlr_recipe *r, uint64_t budget, char **out);

#endif
