/* backend/backend.h: the backend contract (docs/ARCHITECTURE.md "The backend contract").
 *
 * A backend is a device-memory allocator plus a table of op function pointers. model/, adapters/,
 * optim/ and train/ call only these; backend/cpu/ is the plain-C reference (f32 activations,
 * the oracle for tests) and backend/cuda/ plugs in the same table (bf16 activations).
 *
 * Conventions for every op:
 *  - Every pointer argument is DEVICE memory of this backend unless the comment says "host".
 *  - "act" buffers hold be->act_dtype elements (CPU: QLR_F32, CUDA: QLR_BF16). Small parameters
 *    (norm weights, biases, RoPE inverse frequencies) are always f32; embedding and lm_head
 *    tables are bf16; logits are always f32. Accumulation is always f32.
 *  - Shapes are row-major, last dimension contiguous, written `[tokens, d_model]`.
 *  - Ops are asynchronous with respect to the host on devices that can be (CUDA: the backend's
 *    stream); `sync` waits. Copies to/from host are ordered with the ops.
 *  - Ops return QLR_OK or a status with a message (a device failure, an unsupported dtype).
 *    Shape preconditions are bugs and assert.
 *  - An op entry may be NULL when a backend does not implement it yet; callers check
 *    qlr_backend_has() or get QLR_ERR_UNSUPPORTED from the qlr_be_* wrappers below. */
#ifndef QLR_BACKEND_BACKEND_H
#define QLR_BACKEND_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/status.h"
#include "quant/nf4.h"

typedef enum qlr_device_kind {
    QLR_DEVICE_CPU = 0,
    QLR_DEVICE_CUDA = 1,
} qlr_device_kind;

typedef struct qlr_backend qlr_backend;

/* A LoRA adapter applied to one linear layer: y += scale * (x · Aᵀ) · Bᵀ.
 * a: [r, in] act dtype, b: [out, r] act dtype (compute copies; masters live in adapters/). */
typedef struct qlr_lora_ref {
    const void *a;
    const void *b;
    int32_t r;
    float scale;     /* alpha / r (or alpha / sqrt(r) for rsLoRA), times a user scale */
} qlr_lora_ref;

/* A batch's tokens grouped by adapter slot (lora_segmented), built once per forward on the host by
 * qlr_lora_segs_build and uploaded once, then reused by every LoRA call of that forward.
 * Tokens of one slot are cut into tiles of at most QLR_LORA_TILE tokens (a tile's A and B are
 * read once for all its tokens); a run of at least `run_min` consecutive batch tokens of one slot
 * (a prefill chunk) is left out of the tiles and listed in `runs`, for a dense (tensor-core)
 * path. Tokens of slot -1 are in neither. */
#define QLR_LORA_TILE 8 /* 16 costs the shrink 200 registers */
typedef struct qlr_lora_segs {
    int32_t n_tiles;         /* host */
    int32_t max_tile;        /* host: most tokens of a tile (0 when n_tiles is 0) */
    int32_t n_sorted;        /* host: tokens in tiles */
    const int32_t *tiles;    /* [n_tiles, 3] device: slot, first index into tok, token count */
    const int32_t *tok;      /* [n_sorted] device: batch token indices, tile after tile */
    int32_t n_runs;          /* host */
    const int32_t *runs;     /* [n_runs, 3] HOST: slot, first batch token, token count */
} qlr_lora_segs;

/* Fills the host arrays of a segment list from slot [n] (host, each in -1..n_slots-1; others
 * count as -1): tok [n], tiles [3 n] (slots in order of first use, tokens ascending in each),
 * runs [3 n], mark [n] scratch; run_min <= 0 disables runs. out's counts are set and its pointers are the host arrays
 * (the caller uploads tok and tiles and points out->tok / out->tiles at the device copies).
 * Never fails. */
void qlr_lora_segs_build(const int32_t *slot, int32_t n, int32_t n_slots, int32_t run_min,
                         int32_t *tok, int32_t *tiles, int32_t *runs, int32_t *mark,
                         qlr_lora_segs *out);

/* AdamW hyperparameters of one update (the optimizer's host-side description; optim/optim.h
 * documents the math of each kind). */
typedef struct qlr_adamw_hparams {
    float lr;            /* learning rate of this step (the schedule's value) */
    float beta1;         /* first-moment decay */
    float beta2;         /* second-moment decay */
    float eps;           /* denominator epsilon */
    float weight_decay;  /* decoupled weight decay (p *= 1 - lr*wd); 0 disables */
    float gnorm_scale;   /* gradient multiplier inside the update (bnb's gnorm_scale); 1 = none */
} qlr_adamw_hparams;

/* How one tensor's AdamW moments are kept (the value is part of the serialized layout). */
typedef enum qlr_adamw_kind {
    QLR_ADAMW_KIND_TORCH32 = 0, /* fp32 m, v; PyTorch AdamW math (adamw_torch) */
    QLR_ADAMW_KIND_BNB32 = 1,   /* fp32 m, v; bnb's 32-bit kernel math (AdamW8bit, n < 4096) */
    QLR_ADAMW_KIND_BNB8 = 2,    /* uint8 codes + fp32 block absmax; bnb blockwise 8-bit */
} qlr_adamw_kind;

#define QLR_ADAMW8_BLOCK 256       /* elements per 8-bit state block (bnb >= 0.44) */
#define QLR_SUMSQ_CHUNK 16384      /* elements per partial of the sum_squares op */
#define QLR_COMM_ID_BYTES 128      /* a communicator id (NCCL's unique id) */

/* Sampling parameters for one sequence. temperature <= 0 means greedy (argmax, ties to the
 * lowest id). top_k <= 0 disables top-k; top_p >= 1 disables top-p. Order: temperature, top-k,
 * then top-p on the renormalised distribution, then one draw from the RNG. */
typedef struct qlr_sampling {
    float temperature;
    int32_t top_k;
    float top_p;
} qlr_sampling;

/* Params with defaults: greedy. */
qlr_sampling qlr_sampling_default(void);

/* The op table. Forward ops first, then the backward ops the trainer needs. */
typedef struct qlr_backend_ops {
    /* ---- forward ---- */

    /* out[i, :] = table[ids[i], :] converted to act. table [vocab, d] bf16; ids [n] int32 (each
     * must be in [0, vocab): the caller validates them); out [n, d] act. */
    qlr_status (*embedding)(qlr_backend *be, void *out, const uint16_t *table, const int32_t *ids,
                            int64_t n, int64_t d, int64_t vocab);

    /* y[i, :] = x[i, :] / sqrt(mean(x[i, :]²) + eps) * w. x, y [n, d] act (y may equal x);
     * w [d] f32. */
    qlr_status (*rmsnorm)(qlr_backend *be, void *y, const void *x, const float *w, int64_t n,
                          int64_t d, float eps);

    /* RoPE in place, rotate-half (HF/NeoX) convention: within each head, the pair
     * (x[j], x[j + hd/2]) is rotated by angle pos[t] * inv_freq[j], j < hd/2.
     * x [n, n_heads, hd] act; pos [n] int32 per token (so packed / batched sequences work);
     * inv_freq [hd/2] f32 (the model precomputes base^(-2j/hd) with any llama3/linear scaling). */
    qlr_status (*rope)(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                       int64_t n, int64_t n_heads, int64_t hd);

    /* Writes each token's K and V into the cache: cache[seq[t], pos[t], :, :] = k[t] / v[t].
     * k, v [n, n_kv, hd] act; k_cache, v_cache [n_seq_max, ctx, n_kv, hd] act; seq, pos [n]. */
    qlr_status (*kv_store)(qlr_backend *be, void *k_cache, void *v_cache, const void *k,
                           const void *v, const int32_t *seq, const int32_t *pos, int64_t n,
                           int64_t n_kv, int64_t hd, int64_t ctx);

    /* Causal GQA attention over the cache, any mix of prefill and decode tokens of any number
     * of sequences (varlen): token t (query head h) attends to cache rows 0..pos[t] of
     * sequence seq[t] with KV head h / (n_heads / n_kv); softmax(q·kᵀ · scale) · v.
     * Those rows must have been written by kv_store (this call's tokens included).
     * q, out [n, n_heads, hd] act; caches as in kv_store; scale usually 1/sqrt(hd). */
    qlr_status (*attention)(qlr_backend *be, void *out, const void *q, const void *k_cache,
                            const void *v_cache, const int32_t *seq, const int32_t *pos, int64_t n,
                            int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx, float scale);

    /* out = silu(gate) * up, elementwise over n values; act. out may equal gate or up. */
    qlr_status (*swiglu)(qlr_backend *be, void *out, const void *gate, const void *up, int64_t n);

    /* y += x elementwise over n values (residual); act. */
    qlr_status (*add)(qlr_backend *be, void *y, const void *x, int64_t n);

    /* dst[i, :] = src[rows[i], :], d values per row; act. rows [n] int32. */
    qlr_status (*get_rows)(qlr_backend *be, void *dst, const void *src, const int32_t *rows,
                           int64_t n, int64_t d);

    /* y = x · Wᵀ (+ bias). x [n, in] act; w an NF4 store [out, in] whose buffers live on this
     * device (qlr_backend_nf4_upload); bias [out] f32 or NULL; y [n, out] act (overwritten). */
    qlr_status (*nf4_linear)(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                             const float *bias, int64_t n);

    /* The LoRA hook: y += l->scale · (x · Aᵀ) · Bᵀ. x [n, in] act; y [n, out] act. A NULL
     * `l` or l->r == 0 is a no-op (the forward calls this at every linear). */
    qlr_status (*lora)(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *l, int64_t n,
                       int64_t in, int64_t out);

    /* logits = x · Wᵀ. x [n, d] act; w [vocab, d] bf16 (lm_head, or the tied embedding);
     * logits [n, vocab] f32. */
    qlr_status (*lm_head)(qlr_backend *be, float *logits, const void *x, const uint16_t *w,
                          int64_t n, int64_t d, int64_t vocab);

    /* Samples one token per row. logits [n, vocab] f32 (device; the CPU version may modify
     * them in place); params [n] host; rng [n] host, per-sequence state (advanced by one draw
     * when a row is not greedy); out_ids [n] host. Deterministic for given inputs. */
    qlr_status (*sample)(qlr_backend *be, int32_t *out_ids, float *logits,
                         const qlr_sampling *params, uint64_t *rng, int64_t n, int64_t vocab);

    /* ---- backward (trainer; NULL until implemented; same shapes as the forward) ---- */

    /* dx = d/dx rmsnorm given dy and the forward input x (w frozen). dx may equal dy. */
    qlr_status (*rmsnorm_bwd)(qlr_backend *be, void *dx, const void *dy, const void *x,
                              const float *w, int64_t n, int64_t d, float eps);
    /* In place: the inverse rotation of rope (gradient of a rotation is its transpose). */
    qlr_status (*rope_bwd)(qlr_backend *be, void *dx, const int32_t *pos, const float *inv_freq,
                           int64_t n, int64_t n_heads, int64_t hd);
    /* dgate, dup from dout and the forward gate, up. */
    qlr_status (*swiglu_bwd)(qlr_backend *be, void *dgate, void *dup, const void *dout,
                             const void *gate, const void *up, int64_t n);
    /* dq [n, n_heads, hd]; dk_cache, dv_cache like the caches (accumulated, +=), from dout,
     * the forward q, out and per-row softmax statistics lse [n, n_heads] f32 (NULL: recompute). */
    qlr_status (*attention_bwd)(qlr_backend *be, void *dq, void *dk_cache, void *dv_cache,
                                const void *dout, const void *q, const void *k_cache,
                                const void *v_cache, const void *out, const float *lse,
                                const int32_t *seq, const int32_t *pos, int64_t n,
                                int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx,
                                float scale);
    /* dk[t] = dk_cache[seq[t], pos[t]] (gather, the transpose of kv_store). */
    qlr_status (*kv_store_bwd)(qlr_backend *be, void *dk, void *dv, const void *dk_cache,
                               const void *dv_cache, const int32_t *seq, const int32_t *pos,
                               int64_t n, int64_t n_kv, int64_t hd, int64_t ctx);
    /* dx = dy · W (NF4 frozen, no weight gradient). dy [n, out], dx [n, in] (overwritten). */
    qlr_status (*nf4_linear_dx)(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                int64_t n);
    /* LoRA grads: dA += scale·(dy·B)ᵀ·x  [r, in] f32, dB += scale·dyᵀ·(x·Aᵀ)  [out, r] f32,
     * dx += scale·(dy·B)·A [n, in] act (dx may be NULL). */
    qlr_status (*lora_bwd)(qlr_backend *be, float *da, float *db, void *dx, const void *dy,
                           const void *x, const qlr_lora_ref *l, int64_t n, int64_t in,
                           int64_t out);

    /* ---- training (model/train.c; appended after the ops above, never reordered) ---- */

    /* Causal GQA attention inside packed sequences, over the micro-batch's own K/V (no cache):
     * token t (query head h) attends tokens start[t]..t with KV head h / (n_heads / n_kv).
     * start[t] [n] int32 is the index of the first token of t's sequence (tokens of one
     * sequence contiguous and in order, so attention never crosses sequences).
     * q, out [n, n_heads, hd] act; k, v [n, n_kv, hd] act (already RoPE'd); lse [n, n_heads]
     * f32 = logsumexp of the scaled scores, written when not NULL. */
    qlr_status (*attention_varlen)(qlr_backend *be, void *out, float *lse, const void *q,
                                   const void *k, const void *v, const int32_t *start, int64_t n,
                                   int64_t n_heads, int64_t n_kv, int64_t hd, float scale);
    /* Its backward: dq [n, n_heads, hd], dk, dv [n, n_kv, hd] act (all overwritten) from dout
     * and the forward q, k, v, out and lse (lse / out may be NULL: recomputed). */
    qlr_status (*attention_varlen_bwd)(qlr_backend *be, void *dq, void *dk, void *dv,
                                       const void *dout, const void *q, const void *k,
                                       const void *v, const void *out, const float *lse,
                                       const int32_t *start, int64_t n, int64_t n_heads,
                                       int64_t n_kv, int64_t hd, float scale);
    /* Fused lm_head + cross-entropy on one chunk of rows (the caller loops over chunks, so
     * [tokens x vocab] logits never exist): logits = x · Wᵀ into `logits` [n, vocab] f32
     * (scratch, overwritten); loss[i] = logsumexp(logits[i]) - logits[i, targets[i]] in f32,
     * and 0 where targets[i] < 0 (the ignore index, -100). If dx is not NULL:
     * dx [n, d] act = grad_scale · (softmax(logits[i]) - onehot(targets[i])) · W, 0 rows for
     * ignored targets. x [n, d] act; w [vocab, d] bf16; targets [n] int32 (each < vocab: the
     * caller validates); loss [n] f32. */
    qlr_status (*lm_head_ce)(qlr_backend *be, float *loss, void *dx, float *logits, const void *x,
                             const uint16_t *w, const int32_t *targets, int64_t n, int64_t d,
                             int64_t vocab, float grad_scale);
    /* Inverted dropout with a counter-based mask: y[i] = keep(seed, i) ? x[i] / (1 - p) : 0,
     * keep(seed, i) = (splitmix64(seed + i · 0x9E3779B97F4A7C15) >> 40) · 2⁻²⁴ >= p, where
     * splitmix64(z) = z ^= z >> 30, z *= 0xBF58476D1CE4E5B9, z ^= z >> 27,
     * z *= 0x94D049BB133111EB, z ^= z >> 31 (mod 2⁶⁴). The same (seed, n, p) gives the same mask
     * on every backend, so the backward applies the same call to the gradient. n values act;
     * y may equal x; 0 <= p < 1. */
    qlr_status (*dropout)(qlr_backend *be, void *y, const void *x, int64_t n, float p,
                          uint64_t seed);

    /* ---- optional fused forward ops (appended, never reordered). NULL (the CPU backend) means
     * the caller composes the separate ops above; a backend that sets one must give the result
     * of that composition (act-dtype rounding of every intermediate included, up to its own
     * ops' arithmetic). ---- */

    /* k (1..3) NF4 linears of one input: y[i] = x · w[i]ᵀ (+ bias[i]) for i < k, as k
     * nf4_linear calls. Every w[i] has the same cols; bias NULL or k entries (each may be NULL). */
    qlr_status (*nf4_linear_multi)(qlr_backend *be, int k, void *const *y, const void *x,
                                   const qlr_nf4 *const *w, const float *const *bias, int64_t n);
    /* y = swiglu(gate, up) · wᵀ (+ bias): swiglu(be, gate, gate, up, n · w->cols) then
     * nf4_linear(be, y, gate, w, bias, n). gate [n, w->cols] is scratch (unspecified after). */
    qlr_status (*swiglu_nf4_linear)(qlr_backend *be, void *y, void *gate, const void *up,
                                    const qlr_nf4 *w, const float *bias, int64_t n);
    /* Residual add then RMSNorm: add(be, x, dx, n · d) then rmsnorm(be, y, x, w, n, d, eps)
     * (x [n, d] updated in place; y must not alias x or dx). */
    qlr_status (*add_rmsnorm)(qlr_backend *be, void *x, void *y, const void *dx, const float *w,
                              int64_t n, int64_t d, float eps);
    /* rope(q, n_heads), rope(k, n_kv) in place, then kv_store(k, v) (same arguments as those). */
    qlr_status (*rope_kv_store)(qlr_backend *be, void *q, void *k, const void *v, void *k_cache,
                                void *v_cache, const int32_t *seq, const int32_t *pos,
                                const float *inv_freq, int64_t n, int64_t n_heads, int64_t n_kv,
                                int64_t hd, int64_t ctx);
    /* Causal GQA attention of a fresh prefill: the n tokens of ONE sequence at positions
     * 0..n-1, over their own k/v (no cache): token t (query head h) attends tokens 0..t with
     * KV head h / (n_heads / n_kv); softmax(q·kᵀ · scale) · v. q, out [n, n_heads, hd] act;
     * k, v [n, n_kv, hd] act (the same tokens' roped K and V, i.e. what kv_store writes).
     * Must equal the attention op for a batch that is one sequence at positions 0..n-1 (whose
     * cache rows 0..n-1 hold this k/v), within the attention tolerance (both may round the
     * softmax weights to the act dtype before the product with v). May return
     * QLR_ERR_UNSUPPORTED (shape, size or library not served; nothing written): the caller
     * clears the error (qlr_error_clear) and uses the attention op. The caller still stores
     * k/v into the cache (kv_store) for later decode steps. */
    qlr_status (*attention_fresh)(qlr_backend *be, void *out, const void *q, const void *k,
                                  const void *v, int64_t n, int64_t n_heads, int64_t n_kv,
                                  int64_t hd, float scale);

    /* ---- adapters (appended) ---- */

    /* Batched multi-adapter LoRA: for every token t whose s = slot[t] is in [0, n_slots) and
     * whose L[s].r > 0, y[t, :] += L[s].scale · (x[t, :] · L[s].Aᵀ) · L[s].Bᵀ; the rows of other
     * tokens (slot -1 = the base model) are left untouched. Ranks may differ per slot (no
     * padding). x [n, in] act; y [n, out] act; slot [n] int32; L [n_slots] qlr_lora_ref in device
     * memory (a: A [r, in], b: B [out, r], act, device pointers) and L_host the same table in
     * host memory (may be the same pointer on a host-visible backend); max_r (host) >= every
     * L[s].r. uniform (host) is a hint: >= 0 when the caller knows every slot[t] == uniform (a
     * backend may use a dense path), -1 otherwise. On the CPU every row's result depends only on
     * that row's x and slot (bitwise), whatever else shares the batch. */
    qlr_status (*lora_batched)(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                               const qlr_lora_ref *L_host, int32_t n_slots, const int32_t *slot,
                               int32_t max_r, int32_t uniform, int64_t n, int64_t in,
                               int64_t out);

    /* ---- optimizer (appended; optim/ keeps the state layout and calls these) ---- */

    /* One AdamW update of p[n] with gradient g[n] (f32), t >= 1 the (already incremented) step:
     * kind TORCH32 / BNB32: s1 = m [n] f32, s2 = v [n] f32, absmax1/absmax2 unused (NULL);
     * kind BNB8: s1 = code1 [n] u8, s2 = code2 [n] u8, absmax1, absmax2 [ceil(n / 256)] f32.
     * hp host. The math of each kind is optim/optim.h's; every backend gives the CPU op's bits
     * on the same inputs (state codes, absmax, moments and parameters). */
    qlr_status (*adamw_step)(qlr_backend *be, int kind, float *p, const float *g, void *s1,
                             void *s2, float *absmax1, float *absmax2, int64_t n,
                             const qlr_adamw_hparams *hp, int64_t t);
    /* acc[0] += Σ x[i]² over n f32 values, as f64: the values are cut into chunks of
     * QLR_SUMSQ_CHUNK, each chunk's sum is formed in f64, and the partials are added to acc[0]
     * one by one in chunk order (the CPU op; another backend may order the terms differently).
     * acc is one device f64. */
    qlr_status (*sum_squares)(qlr_backend *be, double *acc, const float *x, int64_t n);
    /* x[i] *= s for n f32 values (s host). */
    qlr_status (*scale_f32)(qlr_backend *be, float *x, float s, int64_t n);
    /* dst [n] act = src [n] f32 converted on the device (round to nearest even for bf16): the
     * LoRA compute copies refreshed from device-resident fp32 masters after an optimizer step.
     * dst may equal src only when act is f32. */
    qlr_status (*f32_to_act)(qlr_backend *be, void *dst, const float *src, int64_t n);

    /* ---- NF4 output projection (appended) ---- */

    /* logits = x · Wᵀ with an NF4 output projection (a 4-bit lm_head for serving): x [n, w->cols]
     * act; w an NF4 store [vocab, d] on this device; logits [n, w->rows] f32. */
    qlr_status (*nf4_lm_head)(qlr_backend *be, float *logits, const void *x, const qlr_nf4 *w,
                              int64_t n);

    /* ---- paged KV cache (serving; appended) ----
     * A pool holds n_blocks blocks of `block` token rows: k_pool, v_pool
     * [n_blocks * block, n_kv, hd] act, pool row = block_id * block + offset. A sequence's
     * position p lives in pool row block_table[s * width + p / block] * block + p % block, where
     * s is the sequence's row in block_table [n_seqs, width] int32. */

    /* k_pool[slot[t]] = k[t], v_pool[slot[t]] = v[t] (each token's whole [n_kv, hd] row);
     * slot [n] int32 pool rows (slot[t] < 0: token t is not stored), each < n_rows (the pool's
     * row count, n_blocks * block); no two tokens share a slot. k, v [n, n_kv, hd] act. */
    qlr_status (*kv_store_paged)(qlr_backend *be, void *k_pool, void *v_pool, const void *k,
                                 const void *v, const int32_t *slot, int64_t n, int64_t n_kv,
                                 int64_t hd, int64_t n_rows);
    /* The attention op over a paged cache: token t (query head h) attends positions 0..pos[t]
     * of the sequence in row seq[t] of block_table, KV head h / (n_heads / n_kv);
     * softmax(q·kᵀ · scale) · v in the same arithmetic as the attention op (the CPU gives the
     * attention op's bits on the same rows). Those rows must have been stored by
     * kv_store_paged (this call's tokens included); pos[t] < width * block and every block id
     * the token reaches is in [0, n_blocks). q, out [n, n_heads, hd] act; seq, pos [n] int32;
     * block_table [n_seqs, width] int32 (device). */
    qlr_status (*attention_paged)(qlr_backend *be, void *out, const void *q, const void *k_pool,
                                  const void *v_pool, const int32_t *block_table, int64_t width,
                                  int64_t block, const int32_t *seq, const int32_t *pos,
                                  int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                  float scale);

    /* ---- collectives (appended; data-parallel training, train/dist.h). NULL on a backend whose
     * ranks exchange host memory instead (the CPU: train/dist.c sums over its TCP links). ---- */

    /* Fills id with a new communicator id (rank 0 calls it; the others receive the bytes). */
    qlr_status (*comm_id)(qlr_backend *be, uint8_t id[QLR_COMM_ID_BYTES]);
    /* Joins communicator `id` as `rank` of `world` (every rank calls it; it returns when all
     * have). *comm is the backend's handle. */
    qlr_status (*comm_create)(qlr_backend *be, const uint8_t id[QLR_COMM_ID_BYTES], int rank,
                              int world, void **comm);
    /* Frees a communicator; abort = 1 when a peer failed (pending operations are dropped). */
    void (*comm_destroy)(qlr_backend *be, void *comm, int abort);
    /* x[n] f32 (device) = the sum over the ranks of everyone's x, in place, queued on the stream;
     * every rank gets the same bits. */
    qlr_status (*allreduce_sum_f32)(qlr_backend *be, void *comm, float *x, int64_t n);
    /* QLR_OK when everything queued on the stream has finished, QLR_ERR_BUSY while it runs, a
     * device status when the communicator failed. Never blocks. */
    qlr_status (*comm_poll)(qlr_backend *be, void *comm);

    /* ---- segmented multi-adapter LoRA (serving; appended) ---- */

    /* lora_batched (same arguments, same result within the op's tolerance) with the batch's
     * tokens grouped by slot in `segs` (device tiles and host runs, built from this `slot`):
     * a tile's A and B are read once for all its tokens, a run may take a dense path. NULL on the
     * CPU (the caller uses lora_batched). */
    qlr_status (*lora_segmented)(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                                 const qlr_lora_ref *L_host, int32_t n_slots, const int32_t *slot,
                                 int32_t max_r, const qlr_lora_segs *segs, int64_t n, int64_t in,
                                 int64_t out);
} qlr_backend_ops;

/* Device memory and synchronisation. */
typedef struct qlr_backend_mem {
    /* Allocates `bytes` of device memory (256-byte aligned); NULL + error on failure. */
    void *(*alloc)(qlr_backend *be, size_t bytes);
    void (*free)(qlr_backend *be, void *p);
    qlr_status (*memset0)(qlr_backend *be, void *p, size_t bytes);
    qlr_status (*h2d)(qlr_backend *be, void *dst, const void *src_host, size_t bytes);
    qlr_status (*d2h)(qlr_backend *be, void *dst_host, const void *src, size_t bytes);
    qlr_status (*d2d)(qlr_backend *be, void *dst, const void *src, size_t bytes);
    /* Waits for every queued op and copy (the copy stream's too). */
    qlr_status (*sync)(qlr_backend *be);
    /* ---- host staging (training's layer-input offload) ----
     * Pinned (page-locked) host memory, and copies queued on a second stream (the "copy
     * stream") that runs beside the compute stream; the two are ordered only by events, so the
     * host never waits and compute waits only where an event says so. The CPU backend: malloc,
     * memcpy at once, events that are no-ops (every op has finished when it returns). */
    /* Pinned host memory of `bytes` (256-byte aligned); NULL + error on failure. */
    void *(*host_alloc)(qlr_backend *be, size_t bytes);
    void (*host_free)(qlr_backend *be, void *p);
    /* dst (pinned host) = src (device), queued on the copy stream. */
    qlr_status (*d2h_side)(qlr_backend *be, void *dst_host, const void *src, size_t bytes);
    /* dst (device) = src (pinned host), queued on the copy stream. */
    qlr_status (*h2d_side)(qlr_backend *be, void *dst, const void *src_host, size_t bytes);
    /* An event: a point in one stream's queue another stream can wait for. Never NULL unless
     * creation failed (then NULL + error). */
    void *(*event_create)(qlr_backend *be);
    void (*event_free)(qlr_backend *be, void *ev);
    /* Marks the current end of the compute stream (side 0) or of the copy stream (side 1). */
    qlr_status (*event_record)(qlr_backend *be, void *ev, int side);
    /* Makes the compute stream (side 0) or the copy stream (side 1) wait, on the device, until
     * the work before the event's last record has finished. */
    qlr_status (*event_wait)(qlr_backend *be, void *ev, int side);
} qlr_backend_mem;

struct qlr_backend {
    const char *name;          /* "cpu", "cuda" */
    qlr_device_kind kind;
    qlr_dtype act_dtype;       /* dtype of "act" buffers */
    int host_visible;          /* 1 if device pointers are host pointers (CPU) */
    qlr_backend_mem mem;
    qlr_backend_ops ops;
    void (*destroy)(qlr_backend *be);
    void *impl;                /* backend-private state */
};

/* Creates a backend by name ("cpu"; "cuda" when built with CUDA). `n_threads` 0 = default
 * (CPU: QLR_THREADS or all cores). QLR_ERR_UNSUPPORTED naming the device when not built in. */
qlr_status qlr_backend_create(const char *device, int n_threads, qlr_backend **out);
/* The CPU backend (always available). */
qlr_status qlr_backend_cpu_create(int n_threads, qlr_backend **out);
/* Frees a backend; safe on NULL. */
void qlr_backend_free(qlr_backend *be);

/* Bytes of one act element. */
static inline size_t qlr_backend_act_size(const qlr_backend *be) {
    return qlr_dtype_size(be->act_dtype);
}

/* Copies a host NF4 store into device memory of `be` (dev->owned = 0; free with
 * qlr_backend_nf4_free). On a host-visible backend with `steal` = 1 the host buffers are
 * moved, not copied (host->owned becomes 0 and dev takes ownership). A copied double-quant
 * store's second-level table is followed by QLR_NF4_DQ_PAD zero floats, so that kernels may read
 * it in aligned 32-byte pieces without leaving the allocation. */
#define QLR_NF4_DQ_PAD 8
qlr_status qlr_backend_nf4_upload(qlr_backend *be, qlr_nf4 *host, qlr_nf4 *dev, int steal);
void qlr_backend_nf4_free(qlr_backend *be, qlr_nf4 *dev);

/* ---- memory accounting: one size table for `qlora plan` and the allocations ----
 * A function that sizes a class of allocations reports it as an item, and the code that
 * allocates uses the same function, so the plan is the allocation, item by item. */

/* What a plan needs to know of a device without creating a backend. */
typedef struct qlr_device_traits {
    qlr_dtype act_dtype;     /* CPU f32, CUDA bf16 */
    int host_visible;        /* CPU 1 */
} qlr_device_traits;

qlr_device_traits qlr_device_traits_of(const qlr_backend *be);
/* "cpu" or "cuda" (anything else: cuda's). */
qlr_device_traits qlr_device_traits_named(const char *device);

/* Bytes mem.alloc takes for a request: every backend rounds up to 256 (0 counts as 1). */
static inline uint64_t qlr_alloc_bytes(uint64_t b) { return ((b ? b : 1) + 255) & ~255ull; }

/* One class of allocations: `count` buffers of `bytes` each, as requested from mem.alloc (the
 * memory taken is count * qlr_alloc_bytes(bytes)). group names the plan component. */
typedef void (*qlr_mem_item_fn)(void *ud, const char *group, const char *name, uint64_t count,
                                uint64_t bytes);

/* The buffers qlr_backend_nf4_upload allocates (no steal) for `count` [rows, cols] stores. */
void qlr_backend_nf4_items(int64_t rows, int64_t cols, int dq, uint64_t count, const char *group,
                           const char *name, qlr_mem_item_fn fn, void *ud);

/* Host f32 -> device act buffer of n elements (conversion on the host when act is bf16). */
qlr_status qlr_backend_upload_act(qlr_backend *be, void *dst, const float *src, int64_t n);
/* Device act buffer -> host f32. */
qlr_status qlr_backend_download_act(qlr_backend *be, float *dst, const void *src, int64_t n);

/* The CUDA backend's constructor, defined in backend/cuda/ (built into qlr_backend when CMake
 * finds CUDA and backend/cuda/CMakeLists.txt exists; QLR_BACKEND_CUDA is then defined). */
qlr_status qlr_backend_cuda_create(int n_threads, qlr_backend **out);

#endif
