/* model/model.h: the Llama-family transformer on the NF4 store, written against the backend op
 * table (backend/backend.h) so the same code runs on cpu and cuda.
 *
 * Owns: the architecture config (from GGUF metadata or HF config.json), loading weights into
 * the NF4 store (streaming, tensor by tensor), the KV caches (contiguous, and paged for serving:
 * fixed-size blocks found through per-sequence block tables), the forward pass for a batch of
 * sequences of different lengths, the generation loop, and two tools built on the loader:
 * per-tensor NF4 error (`qlora inspect --nf4`) and the export of the dequantized weights as
 * HF-named safetensors (the golden reference's input). It does not own tokenizers or chat
 * templates (data/), adapters (adapters/) or scheduling (infer/).
 *
 * Architectures: llama (Llama 2/3/3.1/3.2, Mistral, SmolLM2, TinyLlama) and qwen2 (q/k/v bias).
 * Runtime RoPE convention: rotate-half (HF); llama GGUF Q/K rows are un-permuted at load. */
#ifndef QLR_MODEL_MODEL_H
#define QLR_MODEL_MODEL_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "backend/backend.h"
#include "core/status.h"
#include "quant/nf4.h"

typedef enum qlr_rope_scaling {
    QLR_ROPE_SCALING_NONE = 0,
    QLR_ROPE_SCALING_LINEAR,   /* positions divided by factor */
    QLR_ROPE_SCALING_LLAMA3,   /* Llama 3.1 frequency-dependent scaling */
    QLR_ROPE_SCALING_FREQS,    /* per-dimension factors from a GGUF rope_freqs.weight tensor */
} qlr_rope_scaling;

typedef struct qlr_model_config {
    char arch[32];          /* "llama" or "qwen2" */
    int32_t n_vocab;
    int32_t d_model;        /* hidden_size */
    int32_t n_layers;
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t d_ff;           /* intermediate_size */
    int32_t ctx_train;      /* max_position_embeddings */
    float rms_eps;
    float rope_theta;
    qlr_rope_scaling rope_scaling;
    float rope_factor;          /* linear / llama3 */
    float rope_low_freq_factor; /* llama3 */
    float rope_high_freq_factor;/* llama3 */
    int32_t rope_orig_ctx;      /* llama3: original_max_position_embeddings */
    int tied_embeddings;    /* lm_head shares the token embedding */
    int qkv_bias;           /* q/k/v projections have a bias (qwen2) */
} qlr_model_config;

/* The decoder linears, in the order of the LoRA target names. */
typedef enum qlr_linear_id {
    QLR_LIN_Q = 0,
    QLR_LIN_K,
    QLR_LIN_V,
    QLR_LIN_O,
    QLR_LIN_GATE,
    QLR_LIN_UP,
    QLR_LIN_DOWN,
    QLR_LIN_COUNT
} qlr_linear_id;

/* [out, in] of a decoder linear of config c. */
struct qlr_model_config;
void qlr_model_linear_shape(const struct qlr_model_config *c, qlr_linear_id id, int64_t *out,
                            int64_t *in);

/* "q_proj", "k_proj", ... (HF names) and "attn_q", ... (GGUF names). */
const char *qlr_linear_hf_name(qlr_linear_id id);
const char *qlr_linear_gguf_name(qlr_linear_id id);

typedef struct qlr_layer {
    float *attn_norm;              /* [d_model] f32, device */
    float *ffn_norm;               /* [d_model] f32, device */
    qlr_nf4 w[QLR_LIN_COUNT];      /* NF4 [out, in], device buffers */
    float *bias[QLR_LIN_COUNT];    /* [out] f32 device or NULL (q/k/v of qwen2) */
    uint64_t nf4_hash[QLR_LIN_COUNT]; /* qlr_nf4_hash of each store, taken on the host at load */
} qlr_layer;

typedef struct qlr_model {
    qlr_model_config cfg;
    qlr_backend *be;                /* not owned */
    uint16_t *tok_embd;             /* [n_vocab, d_model] bf16, device */
    uint16_t *lm_head;              /* [n_vocab, d_model] bf16, device; == tok_embd when tied */
    float *out_norm;                /* [d_model] f32, device */
    float *inv_freq;                /* [head_dim / 2] f32, device (RoPE, scaling applied) */
    qlr_layer *layers;              /* [n_layers] */
    uint64_t nf4_bytes;             /* bytes of the NF4 store */
    uint64_t other_bytes;           /* embeddings, norms, biases */
    char *source;                   /* path it was loaded from */
    /* Identity of the weights qlora runs: qlr-hash64 over every decoder linear's NF4 store hash
     * in (layer, q k v o gate up down) order (qlr_model_nf4_hash). Adapters record it as their
     * base (adapters/lora.h); the exported base GGUF reloads to the same value. */
    uint64_t nf4_hash;
    /* Optional 4-bit output projection [n_vocab, d_model] NF4 (device) or NULL: when set, the
     * forward's logits use it (the nf4_lm_head op) instead of lm_head. Only
     * qlr_model_create_random makes one (serving figures with every weight in NF4); freed with
     * the model. */
    qlr_nf4 *lm_head_nf4;
} qlr_model;

/* ---- config ---- */

/* Fills cfg from an open GGUF's metadata (and, for tied embeddings / biases / rope_freqs, its
 * tensor list). Refuses other architectures by name: QLR_ERR_UNSUPPORTED "architecture 'gemma3'
 * is not supported yet (supported: llama, qwen2)". Errors name the key. */
struct qlr_gguf;
qlr_status qlr_model_config_from_gguf(const struct qlr_gguf *g, qlr_model_config *cfg);
/* Fills cfg from an HF config.json (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM). */
qlr_status qlr_model_config_from_hf(const char *config_json_path, qlr_model_config *cfg);
/* Checks ranges and consistency (heads divide, head_dim even, ...). QLR_ERR_FORMAT naming the
 * field. */
qlr_status qlr_model_config_validate(const qlr_model_config *cfg, const char *src);
/* RoPE inverse frequencies with the config's scaling: out[head_dim / 2] (host). `freqs` is the
 * GGUF rope_freqs factor table for QLR_ROPE_SCALING_FREQS (else NULL). */
void qlr_model_rope_inv_freq(const qlr_model_config *cfg, const float *freqs, float *out);
/* One-line summary ("llama: 30 layers, d 576, heads 9/3 x 64, ff 1536, vocab 49152, ..."). */
void qlr_model_config_print(const qlr_model_config *cfg, FILE *out);

/* ---- loading ---- */

typedef struct qlr_model_load_params {
    int progress;          /* show a progress bar on stderr (default 1) */
    int double_quant;      /* NF4 double quantization of absmax (default 1, QLoRA) */
    int32_t max_layers;    /* > 0: load only the first N layers (tests, golden subsets) */
} qlr_model_load_params;

qlr_model_load_params qlr_model_load_params_default(void);

/* Loads a base model onto `be`: a .gguf file, or an HF folder (config.json + safetensors). The
 * loader streams: each tensor is dequantized to f32 on the host, Q/K rows of llama GGUFs are
 * un-permuted (spec §4.6), decoder linears are quantized to NF4 and uploaded, then the next
 * tensor; peak host memory is about the NF4 store plus the largest tensor. A missing tensor, a
 * wrong shape or an unsupported type is one error naming the tensor. *out NULL on failure. */
qlr_status qlr_model_load(const char *path, qlr_backend *be, const qlr_model_load_params *p,
                          qlr_model **out);
/* Frees every device buffer and the model; safe on NULL. */
void qlr_model_free(qlr_model *m);

/* The model's nf4_hash from its layers' per-store hashes (the loaders call it at the end). */
uint64_t qlr_model_nf4_hash(const qlr_model *m);
/* "0123456789abcdef": the 16 lower-case hex digits of a hash, into buf[17]. */
void qlr_model_hash_hex(uint64_t h, char buf[17]);

/* The device buffers qlr_model_load allocates for a model of config `cfg` (group "weights": NF4
 * linears, embeddings, norms, lm_head, biases, RoPE table) on a backend that is not host-visible
 * (a host-visible backend keeps the quantizer's NF4 buffers instead of copies of them). */
void qlr_model_weight_items(const qlr_model_config *cfg, int double_quant, qlr_mem_item_fn fn,
                            void *ud);

/* ---- random weights (benchmarks, tests) ---- */

typedef struct qlr_model_random_params {
    int double_quant;      /* NF4 absmax double-quantized, as QLoRA (default 1) */
    int lm_head_nf4;       /* also make m->lm_head_nf4 (random NF4 bytes; default 0) */
    float embd_range;      /* embedding / lm_head values uniform in [-r, r) (default 0.034) */
} qlr_model_random_params;

qlr_model_random_params qlr_model_random_params_default(void);

/* A model of cfg's real dimensions with random weights, no file: every NF4 store's packed
 * codes and (double-quant) absmax bytes are random bytes written directly (never quantized
 * from floats, so Llama-3.1-8B takes seconds; never all zero, which runs faster than real data
 * on some devices), second-level absmax in [0.010, 0.017) with offset 0.03 (block absmax
 * 0.02..0.04, weights of about the scale of real ones); embeddings and lm_head random bf16
 * (one table when cfg->tied_embeddings); norms 1 +- 0.01; q/k/v biases +-0.01 when
 * cfg->qkv_bias; RoPE inverse frequencies from the config (qlr_model_rope_inv_freq; a
 * QLR_ROPE_SCALING_FREQS config has no table here and is refused). The same (cfg, seed,
 * params) gives the same bytes on every backend and thread count. p NULL = defaults.
 * QLR_ERR_FORMAT for an invalid cfg (qlr_model_config_validate), QLR_ERR_NOMEM or the
 * backend's allocation error; *out NULL on failure. */
qlr_status qlr_model_create_random(const qlr_model_config *cfg, qlr_backend *be, uint64_t seed,
                                   const qlr_model_random_params *p, qlr_model **out);

/* Undoes llama.cpp's Q/K row permutation in place: w is [n_head * hd, cols] (rows of GGUF
 * order in, HF order out; a bias is cols = 1). Spec §4.6: GGUF row 2j+t of a head becomes HF
 * row t*(hd/2)+j. QLR_ERR_NOMEM only. */
qlr_status qlr_unpermute_qk(float *w, int64_t n_head, int64_t hd, int64_t cols);
/* The forward direction (HF -> GGUF), for tests and adapter export. */
qlr_status qlr_permute_qk(float *w, int64_t n_head, int64_t hd, int64_t cols);

/* ---- KV cache ---- */

/* Per layer: k and v [n_seq, ctx, n_kv_heads, head_dim] in the backend's act dtype, all in one
 * device allocation. */
typedef struct qlr_kv_cache {
    int32_t n_layers, n_seq, ctx, n_kv, head_dim;
    void **k, **v;     /* [n_layers] device pointers */
    void *block;       /* the allocation */
    uint64_t bytes;
    qlr_backend *be;
} qlr_kv_cache;

/* Bytes of a cache for this config. */
uint64_t qlr_kv_cache_bytes(const qlr_model_config *cfg, qlr_backend *be, int32_t n_seq,
                            int32_t ctx);
qlr_status qlr_kv_cache_create(const qlr_model *m, int32_t n_seq, int32_t ctx,
                               qlr_kv_cache **out);
void qlr_kv_cache_free(qlr_kv_cache *kv);

/* ---- paged KV cache (serving) ---- */

/* Fixed-size blocks of `block` token rows in one pool per layer: k and v
 * [n_blocks * block, n_kv_heads, head_dim] act (pool row = block_id * block + offset), all in one
 * device allocation, plus the device block table the forward fills from qlr_batch.block_table
 * ([max_seqs, max_width] int32: sequences of one batch x blocks per sequence). Which block holds
 * what is the caller's business (infer/ hands blocks out, shares and frees them); the cache
 * only stores. */
typedef struct qlr_kv_paged {
    int32_t n_layers, n_blocks, block, n_kv, head_dim;
    int32_t max_seqs, max_width;
    void **k, **v;     /* [n_layers] device pool pointers */
    int32_t *table;    /* [max_seqs * max_width] device */
    void *mem;         /* the allocation */
    uint64_t bytes;
    qlr_backend *be;
} qlr_kv_paged;

/* Bytes of the pools and the table. */
uint64_t qlr_kv_paged_bytes(const qlr_model_config *cfg, qlr_backend *be, int32_t n_blocks,
                            int32_t block, int32_t max_seqs, int32_t max_width);
/* QLR_ERR_INVALID for a size < 1; QLR_ERR_NOMEM naming the size. *out NULL on failure. */
qlr_status qlr_kv_paged_create(const qlr_model *m, int32_t n_blocks, int32_t block,
                               int32_t max_seqs, int32_t max_width, qlr_kv_paged **out);
void qlr_kv_paged_free(qlr_kv_paged *kv);

/* ---- adapter sets ---- */

/* The adapters one forward (or one training step) may apply, as the model consumes them: a table
 * of qlr_lora_ref, one row per (layer, linear) and one column per slot, entry
 * [(layer * QLR_LIN_COUNT + id) * n_slots + s]. An entry with r == 0 means slot s does not adapt
 * that linear. a/b point at the slot's device compute copies (act dtype); scale is the slot's
 * whole multiplier (alpha / r, or alpha / sqrt(r), times any per-slot user scale). The set is
 * made and owned by adapters/ (adapters/adapter_set.h); the model only reads it, so the model
 * owns no adapter. */
typedef struct qlr_adapter_set {
    int32_t n_layers;            /* rows are n_layers * QLR_LIN_COUNT */
    int32_t n_slots;             /* >= 1 */
    int32_t max_r;               /* largest r in the table */
    const qlr_lora_ref *host;    /* the table in host memory */
    const qlr_lora_ref *dev;     /* the same table in device memory (== host when host-visible) */
} qlr_adapter_set;

/* The entry of (layer, linear, slot); NULL when the set is NULL or the slot does not adapt it. */
static inline const qlr_lora_ref *qlr_adapter_set_ref(const qlr_adapter_set *s, int32_t layer,
                                                     int id, int32_t slot) {
    if (!s || layer >= s->n_layers || slot < 0 || slot >= s->n_slots) return NULL;
    const qlr_lora_ref *r = &s->host[((int64_t)layer * QLR_LIN_COUNT + id) * s->n_slots + slot];
    return r->r > 0 ? r : NULL;
}

/* ---- forward ---- */

/* One forward call: n tokens, each with its position and the cache sequence (slot) it
 * belongs to. Tokens of one sequence must come in position order and every position below a
 * token's own must already be in the cache or earlier in this batch. Host arrays. */
typedef struct qlr_batch {
    int32_t n;
    const int32_t *tokens;     /* [n] */
    const int32_t *pos;        /* [n] */
    const int32_t *seq;        /* [n] */
    int32_t n_logits;          /* rows of logits wanted */
    const int32_t *logit_rows; /* [n_logits] indices into the batch; NULL = the first n_logits */
    /* Adapters: each token applies the adapter of its slot in `adapters` (-1 = the base model).
     * adapters NULL = every token runs the base model; adapter_slot NULL with a set = every token
     * uses slot 0. Tokens of different slots share the forward. */
    const qlr_adapter_set *adapters;
    const int32_t *adapter_slot; /* [n] */
} qlr_batch;

/* The block tables of one batch over a paged cache (qlr_model_forward_paged): the batch's seq[i]
 * is a row of ids, and position p of that sequence lives in pool block ids[seq * width + p /
 * block] at row p % block. Rows of different sequences may name the same block (a shared
 * prefix) as long as no token of the batch writes into it. Host memory. (A separate argument,
 * not qlr_batch fields, so that positional qlr_batch initializers stay complete.) */
typedef struct qlr_block_table {
    const int32_t *ids;        /* [n_seqs, width] */
    int32_t n_seqs, width;
} qlr_block_table;

/* Called after each decoder layer (and with layer = -1 after the embedding) with the
 * residual stream h [n, d_model] act (device). For golden tests and debugging. */
typedef void (*qlr_hidden_fn)(void *ud, int32_t layer, const void *h, int64_t n, int64_t d);

/* The forward workspace: activations for up to max_tokens tokens and max_logits logits rows,
 * carved from one device allocation sized by qlr_forward_plan_bytes. */
typedef struct qlr_forward qlr_forward;

uint64_t qlr_forward_plan_bytes(const qlr_model_config *cfg, qlr_backend *be, int32_t max_tokens,
                                int32_t max_logits);
qlr_status qlr_forward_create(qlr_model *m, int32_t max_tokens, int32_t max_logits,
                              qlr_forward **out);
void qlr_forward_free(qlr_forward *f);
void qlr_forward_set_hidden_fn(qlr_forward *f, qlr_hidden_fn fn, void *ud);

/* Runs the batch through the model, writing K/V into `kv`. *logits points at device memory
 * [b->n_logits, n_vocab] f32 owned by the workspace (valid until the next call). Validates the
 * batch (ids, positions against the cache, sizes against the workspace): QLR_ERR_RANGE with
 * a message naming the offending token. Then copies it into the workspace and runs
 * qlr_model_forward_dev. */
qlr_status qlr_model_forward(qlr_forward *f, qlr_kv_cache *kv, const qlr_batch *b,
                             float **logits);

/* qlr_model_forward over a paged cache: each token's K/V is stored at its pool row and attention
 * reads its sequence through the block tables `bt`. Validates the tables against the cache
 * (rows, width, block ids of every position a token reaches): QLR_ERR_RANGE naming the token.
 * On the CPU the logits are bitwise those of qlr_model_forward over a contiguous cache holding
 * the same rows. */
qlr_status qlr_model_forward_paged(qlr_forward *f, qlr_kv_paged *kv, const qlr_batch *b,
                                   const qlr_block_table *bt, float **logits);

/* A batch whose per-token arrays already live in device memory (the engine's or a benchmark's
 * buffers), so that a step can be replayed from a CUDA graph. Same meaning as qlr_batch. */
typedef struct qlr_batch_dev {
    int32_t n;
    const int32_t *tokens;       /* [n] device, each in 0..n_vocab-1 */
    const int32_t *pos;          /* [n] device, each in 0..kv->ctx-1 */
    const int32_t *seq;          /* [n] device, each in 0..kv->n_seq-1 */
    int32_t n_logits;            /* rows of logits wanted (host) */
    const int32_t *logit_rows;   /* [n_logits] device; NULL = the first n_logits tokens */
    const qlr_adapter_set *adapters; /* NULL = every token runs the base model */
    const int32_t *adapter_slot; /* [n] device, each in -1..adapters->n_slots-1; required with
                                    adapters (-1 = that token runs the base model) */
    int32_t uniform;             /* host: the slot every token has (a promise: backends may
                                    take the dense path), or -1 when they differ or it is not
                                    known; ignored without adapters */
    int32_t fresh;               /* host: 1 = the batch is one sequence at positions 0..n-1 (a
                                    fresh prefill: attention may run over the batch's own k/v
                                    through attention_fresh); 0 is always correct */
    const qlr_lora_segs *segs;   /* host struct, device tiles: adapter_slot grouped by slot for
                                    the lora_segmented op (qlr_lora_segs_build); NULL = none
                                    (lora_batched) */
} qlr_batch_dev;

/* The forward of qlr_model_forward on a device batch: only ops on the backend's stream, no
 * host copy, no synchronisation and no reading of device memory by the host, so a CUDA
 * stream capture of this call is a replayable step (plan workspaces first:
 * qlr_cuda_reserve). Checks only what the host knows (n, n_logits against the workspace,
 * the cache's and the adapter set's model, uniform): QLR_ERR_RANGE / QLR_ERR_INVALID. The
 * device arrays are NOT validated: the caller guarantees the ranges above (an id out of range
 * reads outside the tables). *logits as for qlr_model_forward. */
qlr_status qlr_model_forward_dev(qlr_forward *f, qlr_kv_cache *kv, const qlr_batch_dev *b,
                                 float **logits);

/* Debug hooks of a forward workspace, for the decode benchmark's ablation (what each kind of
 * kernel costs in place in a step); never for serving. A forward with kinds left out computes
 * meaningless values; only its time means something. Both hooks snapshot the backend's op
 * table when called (call again after changing be->ops). */
typedef enum qlr_forward_skip {
    QLR_FORWARD_SKIP_ATTENTION = 1 << 0, /* attention, attention_fresh, attention_paged */
    QLR_FORWARD_SKIP_ROPE_KV = 1 << 1,   /* rope, kv_store, rope_kv_store, kv_store_paged */
    QLR_FORWARD_SKIP_NORMS = 1 << 2,     /* rmsnorm, add_rmsnorm (with its residual add) */
    QLR_FORWARD_SKIP_QKV = 1 << 3,       /* the q, k, v NF4 products (LoRA terms still run) */
    QLR_FORWARD_SKIP_O = 1 << 4,         /* the o NF4 product */
    QLR_FORWARD_SKIP_GATE_UP = 1 << 5,   /* the gate and up NF4 products */
    QLR_FORWARD_SKIP_DOWN = 1 << 6,      /* swiglu and the down NF4 product (swiglu_nf4_linear) */
    QLR_FORWARD_SKIP_LM_HEAD = 1 << 7,   /* lm_head, nf4_lm_head */
    QLR_FORWARD_SKIP_ALL = 0xff,
} qlr_forward_skip;

/* Leaves the kinds in `mask` (qlr_forward_skip bits) out of every later forward of f; 0 (the
 * default) restores the full forward, bitwise. */
void qlr_forward_set_skip(qlr_forward *f, uint32_t mask);
/* fused = 0: later forwards compose the separate ops even where the backend has the optional
 * fused entries (nf4_linear_multi, swiglu_nf4_linear, add_rmsnorm, rope_kv_store), for
 * comparison figures; the results then differ only by the backend's fused-op tolerance.
 * 1 (the default) uses them. */
void qlr_forward_set_fused(qlr_forward *f, int fused);

/* ---- generation (one sequence) ---- */

typedef struct qlr_generate_params {
    int32_t n_predict;        /* tokens to generate (default 128) */
    qlr_sampling sampling;    /* default greedy */
    uint64_t seed;            /* RNG seed (default 0) */
    int32_t n_batch;          /* prompt tokens per forward (default 256) */
    const int32_t *stop_ids;  /* stop when one of these is sampled (not emitted) */
    int32_t n_stop;
    const qlr_adapter_set *adapters; /* every token uses slot 0 of this set (NULL = base model) */
} qlr_generate_params;

qlr_generate_params qlr_generate_params_default(void);

typedef struct qlr_generate_stats {
    int32_t n_prompt, n_gen;
    double prompt_secs, gen_secs;
    int stopped;              /* 1 if a stop id ended it */
} qlr_generate_stats;

/* Called with each generated token; return non-zero to stop. */
typedef int (*qlr_token_fn)(void *ud, int32_t id);

/* Prefills `prompt` then samples up to n_predict tokens (cache slot 0 of `kv`, from position
 * 0), calling on_token for each. The prompt plus n_predict must fit kv->ctx (else it stops at
 * the context end and says so). */
qlr_status qlr_generate(qlr_forward *f, qlr_kv_cache *kv, const int32_t *prompt, int32_t n_prompt,
                        const qlr_generate_params *p, qlr_token_fn on_token, void *ud,
                        qlr_generate_stats *stats);

/* ---- tools ---- */

/* `qlora inspect --nf4 MODEL`: for every decoder linear, quantize to NF4 and print the error
 * (RMS relative and max relative, spec via quant/nf4.h qlr_nf4_error_stats) and a total.
 * Host only, streaming. */
qlr_status qlr_model_print_nf4_error(const char *path, FILE *out);

/* Writes the model as the golden reference sees it: HF-named f32 safetensors of every weight
 * exactly as our runtime uses it (decoder linears = NF4 dequantized, Q/K in HF order;
 * embeddings/lm_head = the bf16 values; norms f32) plus config.json, into folder `dir`. */
qlr_status qlr_model_export_hf(const qlr_model *m, const char *dir);

#endif
