/* model/backprop.h: the training forward + backward of the transformer on one micro-batch,
 * producing LoRA gradients only (the NF4 base, norms and embeddings are frozen), written
 * against the backend op table like model/forward.c.
 *
 * Owns: the training workspace (one device allocation carved from a table of sizes), the
 * packed-varlen forward with per-layer activation saving or per-layer gradient checkpointing
 * (keep each layer's input, recompute the layer in backward; same gradients bit for bit on
 * the CPU), optionally with the layer inputs offloaded to pinned host memory and the MLP run
 * on row chunks (long context), LoRA dropout, the chunked lm_head + cross-entropy (fp32, ignore index -100; never
 * [tokens x vocab] logits) and the layer-by-layer backward. It does not own the adapters
 * (adapters/), the optimizer (optim/), batching (data/) or the loop (train/). */
#ifndef QLR_MODEL_BACKPROP_H
#define QLR_MODEL_BACKPROP_H

#include <stdint.h>

#include "model/model.h"

#define QLR_IGNORE_INDEX (-100)

typedef struct qlr_train_batch {
    int32_t n;                 /* tokens in the micro-batch (rows * sequence_len, or packed) */
    const int32_t *tokens;     /* [n] host */
    const int32_t *targets;    /* [n] host: next-token target of each position, -100 = no loss
                                  (already shifted; example boundaries get -100) */
    const int32_t *pos;        /* [n] host: position within its sequence (restarts per example) */
    const int32_t *seq;        /* [n] host: sequence id; attention never crosses sequences;
                                  tokens of one sequence contiguous and in position order */
    int32_t n_seq;             /* number of distinct sequences (ids 0..n_seq-1) */
} qlr_train_batch;

typedef struct qlr_train_params {
    int32_t max_tokens;        /* largest micro-batch n (default 2048) */
    int32_t max_seq_len;       /* longest sequence; positions must be below it (default 2048) */
    int checkpointing;         /* 1: keep only each layer's input, recompute in backward (default 1) */
    float lora_dropout;        /* dropout on the LoRA input path (0 = off; default 0) */
    int32_t ce_chunk;          /* tokens per lm_head+CE chunk (default 1024) */
    int offload;               /* 1: the layer inputs live in pinned host memory, copied out on
                                  the backend's copy stream after use and prefetched back one
                                  layer ahead of the backward; needs checkpointing (default 0) */
    int32_t mlp_chunk;         /* > 0: the MLP (gate/up, SwiGLU, down, and their backward) runs
                                  on row chunks of this many tokens, so its [tokens, d_ff]
                                  buffers are [mlp_chunk, d_ff]; gate/up/SwiGLU are recomputed
                                  per chunk in the backward. 0: whole rows (default 0) */
} qlr_train_params;

/* Defaults as commented on each field. Cannot fail. */
qlr_train_params qlr_train_params_default(void);

typedef struct qlr_train_ctx qlr_train_ctx;

/* Device bytes of the training workspace for this config and params (saved activations,
 * backward scratch, one CE chunk of logits, the batch): one allocation. The model's weights are
 * not included, nor the pinned host memory of offload (qlr_train_plan_host_bytes). */
uint64_t qlr_train_plan_bytes(const qlr_model_config *cfg, qlr_device_traits dt,
                              const qlr_train_params *p);
/* Pinned host bytes of the workspace: with offload, the n_layers layer inputs [T, d_model]
 * (one mem.host_alloc); 0 otherwise. */
uint64_t qlr_train_plan_host_bytes(const qlr_model_config *cfg, qlr_device_traits dt,
                                   const qlr_train_params *p);
/* The same workspace buffer by buffer (groups "activations", "backward", "lm_head_ce",
 * "batch"; sizes already 256-aligned, summing to qlr_train_plan_bytes), then, with offload,
 * the pinned host block as group "host". */
void qlr_train_plan_items(const qlr_model_config *cfg, qlr_device_traits dt,
                          const qlr_train_params *p, qlr_mem_item_fn fn, void *ud);

/* Workspaces carved once (sized by qlr_train_plan_bytes). QLR_ERR_INVALID for bad params (sizes < 1, dropout outside [0, 1)), QLR_ERR_UNSUPPORTED
 * when the backend lacks a training op, QLR_ERR_NOMEM naming the size. *out NULL on failure. */
qlr_status qlr_train_ctx_create(qlr_model *m, const qlr_train_params *p, qlr_train_ctx **out);
/* Frees the workspace; safe on NULL. */
void qlr_train_ctx_free(qlr_train_ctx *c);

/* Forward + backward of one micro-batch with every token on slot 0 of `set` (the adapter being
 * trained: its compute copies; NULL = the base model alone). Adds
 * grad_scale * d(sum of token CE losses)/dθ into da[l*QLR_LIN_COUNT + i] ([r, in] f32 device)
 * and db[...] ([out, r] f32 device) for every (layer, linear) slot 0 adapts (NULL entries
 * skipped). *loss_sum = sum of CE over
 * target tokens (host double), *n_targets = their count. dropout_seed makes dropout masks
 * deterministic (same seed -> same masks, so a resumed run is bit-identical).
 * Validates the batch (token / target ids, sequence ids and positions, sizes against the
 * workspace): QLR_ERR_RANGE naming the offending token; nothing is accumulated then. */
qlr_status qlr_train_fwd_bwd(qlr_train_ctx *c, const qlr_adapter_set *set,
                             const qlr_train_batch *b, float grad_scale, float *const *da,
                             float *const *db, uint64_t dropout_seed, double *loss_sum,
                             int64_t *n_targets);

/* Forward only (eval) with slot 0 of `set` (NULL = base model): loss sum and count, no dropout.
 * Same validation as qlr_train_fwd_bwd. */
qlr_status qlr_train_eval(qlr_train_ctx *c, const qlr_adapter_set *set, const qlr_train_batch *b,
                          double *loss_sum, int64_t *n_targets);

/* The dropout seed used for the LoRA input of (layer, linear) in a step with dropout_seed
 * (the backend's dropout op is called with it on [n, in]). For tests. */
uint64_t qlr_train_dropout_seed(uint64_t dropout_seed, int32_t layer, qlr_linear_id id);

#endif
