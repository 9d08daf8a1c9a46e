/* optim/optim.h: the optimizer module's public API: AdamW (bitsandbytes-style 8-bit blockwise
 * states, bnb's 32-bit path for small tensors, and PyTorch's 32-bit AdamW), the serializable
 * per-tensor optimizer state, global-norm gradient clipping and the learning-rate schedules of
 * HF transformers. Spec: docs/FORMATS.md §2. Two families of entry points:
 *  - on a backend (the trainer's path): states whose arrays live in the backend's memory
 *    (qlr_adamw_state_create), stepped by its adamw_step op (qlr_adamw_update), clipped with its
 *    sum_squares / scale_f32 ops (qlr_grad_clip), saved and loaded in the same byte layout;
 *  - on host arrays (qlr_adamw_state_init, qlr_adamw_step, qlr_clip_grad_norm, ...): the CPU
 *    backend's ops called directly, kept for existing callers; same bits as the CPU backend.
 * The step math itself is the backends' (backend/cpu/ops_optim.c is the reference).
 * Parameters are fp32 masters; gradients fp32. Nothing here allocates during a step. */
#ifndef QLR_OPTIM_H
#define QLR_OPTIM_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "core/status.h"

#define QLR_ADAMW8_MIN_SIZE 4096   /* tensors with n < this keep 32-bit states (bnb min_8bit_size) */

/* ---------------------------------------------------------------- hyperparameters */

/* qlr_adamw_hparams and qlr_adamw_kind are defined in backend/backend.h (the adamw_step op). */

/* bnb.optim.AdamW8bit's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 1e-2, gnorm_scale 1. */
qlr_adamw_hparams qlr_adamw_default_hparams(void);

/* ---------------------------------------------------------------- state */


/* One parameter tensor's optimizer state. The arrays are owned by the state: host memory
 * (malloc) when made by qlr_adamw_state_init, the backend's memory when made by
 * qlr_adamw_state_create (the struct itself is always host memory). Flat description: n, step,
 * kind, and either (m, v) or (code1, code2, absmax1, absmax2). */
typedef struct qlr_adamw_state {
    int64_t n;          /* elements of the parameter tensor */
    int64_t step;       /* updates done so far (the next update uses t = step + 1) */
    int32_t kind;       /* qlr_adamw_kind */
    int64_t n_blocks;   /* ceil(n / 256) for BNB8, else 0 */
    float *m, *v;       /* [n] fp32 moments (TORCH32, BNB32), else NULL */
    uint8_t *code1;     /* [n] m codes over qlr_dynmap_signed (BNB8) */
    uint8_t *code2;     /* [n] v codes over qlr_dynmap_unsigned (BNB8) */
    float *absmax1;     /* [n_blocks] per-block scale of m (BNB8) */
    float *absmax2;     /* [n_blocks] per-block scale of v (BNB8) */
} qlr_adamw_state;

/* Initialises *s for an n-element tensor with zero moments and step 0. With use_8bit = 1 the
 * kind is BNB8 when n >= 4096 and BNB32 when n < 4096 (bnb's rule, strictly "less than");
 * with use_8bit = 0 it is TORCH32. Returns QLR_ERR_INVALID for n < 0, QLR_ERR_NOMEM when
 * allocation fails (*s is then zeroed). */
qlr_status qlr_adamw_state_init(qlr_adamw_state *s, int64_t n, int use_8bit);
/* Frees the arrays of *s and zeroes it; safe on a zeroed struct. */
void qlr_adamw_state_free(qlr_adamw_state *s);

/* The same state with its arrays in be's memory, zeroed (the kind rule of qlr_adamw_state_init).
 * Returns QLR_ERR_INVALID for n < 0, the backend's QLR_ERR_NOMEM / QLR_ERR_DEVICE when an
 * allocation or the zeroing fails (*s is then zeroed). */
qlr_status qlr_adamw_state_create(qlr_backend *be, qlr_adamw_state *s, int64_t n, int use_8bit);
/* Frees the arrays of a state made by qlr_adamw_state_create on the same be, and zeroes it;
 * safe on a zeroed struct. */
void qlr_adamw_state_destroy(qlr_backend *be, qlr_adamw_state *s);
/* The allocations qlr_adamw_state_create makes for `count` states of n elements (group
 * "optimizer"; `name` prefixes the item names). */
void qlr_adamw_state_items(int64_t n, int use_8bit, uint64_t count, const char *name,
                           qlr_mem_item_fn fn, void *ud);

/* One AdamW update of p[n] with gradient g[n]: increments s->step first (the first update
 * uses t = 1), then runs the step function of s->kind. Threaded. Returns QLR_ERR_INVALID if
 * the state is malformed (unknown kind); cannot otherwise fail. */
qlr_status qlr_adamw_step(qlr_adamw_state *s, float *p, const float *g, const qlr_adamw_hparams *hp);

/* The same update on a backend: increments s->step, then be->ops.adamw_step(be, s->kind, p, g,
 * the state's arrays, s->n, hp, s->step). p, g [s->n] f32 and the state's arrays are be memory
 * (s from qlr_adamw_state_create on be); hp host. Asynchronous like every op. Returns
 * QLR_ERR_INVALID for an unknown kind, QLR_ERR_UNSUPPORTED when be has no adamw_step op, or the
 * op's failure; s->step is unchanged on any failure (on a device failure the arrays may be
 * partly updated). On the CPU backend: the bits of qlr_adamw_step. */
qlr_status qlr_adamw_update(qlr_backend *be, qlr_adamw_state *s, float *p, const float *g,
                            const qlr_adamw_hparams *hp);

/* The step functions on host arrays (the CPU backend's adamw_step op, whose math is described
 * here; the CUDA op gives the same bits). t >= 1 is the (already incremented) step. Threaded
 * with qlr_parallel_for.
 *
 * qlr_adamw8bit_step: bnb's kOptimizerStatic8bit2StateBlockwise on 256-element blocks:
 *   dequantize m, v with the old absmax; m = b1*m + (1-b1)*g, v = b2*v + (1-b2)*g^2;
 *   new absmax = max |m|, max |v| per block; p += (-lr*c2/c1) * m / (sqrt(v) + c2*eps) then
 *   p *= 1 - lr*wd; requantize (nearest code by bnb's binary search, state1 sign fix).
 *   A non-finite g element sets m = v = 0 there and leaves that p element unchanged. */
void qlr_adamw8bit_step(float *p, const float *g, uint8_t *code1, uint8_t *code2, float *absmax1,
                        float *absmax2, int64_t n, const qlr_adamw_hparams *hp, int64_t t);
/* bnb's kOptimizer32bit2State (ADAM): same update formula and weight-decay order as the
 * 8-bit step with fp32 m, v; no special case for non-finite gradients (they propagate). */
void qlr_adamw32_bnb_step(float *p, const float *g, float *m, float *v, int64_t n,
                          const qlr_adamw_hparams *hp, int64_t t);
/* PyTorch AdamW (torch.optim.AdamW, foreach=False, amsgrad=False; HF's adamw_torch):
 *   p *= 1 - lr*wd; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
 *   p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps). Non-finite g propagates. */
void qlr_adamw32_torch_step(float *p, const float *g, float *m, float *v, int64_t n,
                            const qlr_adamw_hparams *hp, int64_t t);

/* The nearest-code search of bnb's CUDA kernels (quantize_2D): a 7-level binary search from
 * index 127 then a float32 midpoint comparison. Equals qlr_dynmap_nearest except on exact
 * midpoints, where the tie goes to the index the search ended on; NaN gives 0. `is_signed`
 * only sets the lower bound of the search (-1 or 0). */
uint8_t qlr_adamw8_quantize_code(const float *map, int is_signed, float x);

/* ---------------------------------------------------------------- state serialization
 *
 * Layout (all little-endian, no padding; version 1):
 *   header  : "QLRADAMW" (8 bytes), u32 version = 1, u32 n_tensors
 *   per tensor, in order:
 *             i64 n, i64 step, u32 kind (qlr_adamw_kind), u32 block (256 for BNB8, else 0)
 *             TORCH32 / BNB32 : f32 m[n], f32 v[n]
 *             BNB8            : u8 code1[n], u8 code2[n], f32 absmax1[nb], f32 absmax2[nb]
 *                               (nb = ceil(n / 256))
 *   trailer : u32 crc32 (zlib) of every byte before it
 * Hyperparameters are not stored: they come from the recipe and the schedule. */

/* Bytes qlr_adamw_states_write produces for these states (0 on size overflow). */
size_t qlr_adamw_states_size(const qlr_adamw_state *s, int n_tensors);
/* Writes the states into buf[cap]; *written gets the byte count. Returns QLR_ERR_RANGE if cap
 * is too small, QLR_ERR_INVALID for a malformed state; buf is then unspecified. */
qlr_status qlr_adamw_states_write(const qlr_adamw_state *s, int n_tensors, uint8_t *buf,
                                  size_t cap, size_t *written);
/* Reads buf[len] into s[n_tensors], which must already be initialised (qlr_adamw_state_init)
 * with the n and kind the run expects; step and the moments are overwritten. `what` names the
 * source in messages (a path). Returns QLR_ERR_FORMAT for a bad magic, version, crc, truncated
 * or trailing bytes, QLR_ERR_INVALID when the tensor count, an n or a kind differs from s
 * (the message names the tensor index). Every record is validated before anything is written,
 * so on those failures s is unchanged. */
qlr_status qlr_adamw_states_read(qlr_adamw_state *s, int n_tensors, const uint8_t *buf, size_t len,
                                 const char *what);

/* qlr_adamw_states_write for states made by qlr_adamw_state_create on be: the same bytes
 * (device -> host copies into buf, then a sync of be). Also returns the backend's failure of a
 * copy. buf is host memory. */
qlr_status qlr_adamw_states_save(qlr_backend *be, const qlr_adamw_state *s, int n_tensors,
                                 uint8_t *buf, size_t cap, size_t *written);
/* qlr_adamw_states_read into states made by qlr_adamw_state_create on be: the same checks and
 * messages, s unchanged on those; host -> device copies, then a sync of be. On a copy failure
 * (the backend's status) s may be partly overwritten. */
qlr_status qlr_adamw_states_load(qlr_backend *be, qlr_adamw_state *s, int n_tensors,
                                 const uint8_t *buf, size_t len, const char *what);

/* ---------------------------------------------------------------- gradient clipping */

/* Global L2 norm over n_tensors gradient tensors grads[i][ns[i]] (host arrays; the CPU
 * sum_squares op: f64 sums per QLR_SUMSQ_CHUNK chunk added in chunk order, so deterministic
 * whatever the thread count), then, as torch.nn.utils.clip_grad_norm_, scales
 * every gradient by max_norm / (norm + 1e-6) when that factor is < 1. max_norm <= 0 only
 * measures. Returns the pre-clip norm. When the norm is NaN or Inf nothing is scaled and
 * *nonfinite (if not NULL) is set to 1 (else 0): the caller skips or stops the step. */
float qlr_clip_grad_norm(float *const *grads, const int64_t *ns, int n_tensors, float max_norm,
                         int *nonfinite);

/* The same clipping on a backend: grads[i] [ns[i]] f32 in be memory (the arrays of pointers
 * are host). acc_dev is one f64 of be memory owned by the caller (scratch). Zeroes *acc_dev,
 * runs sum_squares on every tensor in order, copies the sum to the host (one sync of be), sets
 * *norm = (float)sqrt(sum) and *nonfinite (if not NULL) as above, then when the norm is finite,
 * max_norm > 0 and coef = max_norm / (norm + 1e-6f) < 1, scale_f32(coef) on every tensor
 * (queued, not waited for). Returns QLR_ERR_UNSUPPORTED when be lacks those ops, or a backend
 * failure. On the CPU backend the norm and the scaled gradients are qlr_clip_grad_norm's, bit
 * for bit; on CUDA the f64 sum may differ in its last bits (another summation order). */
qlr_status qlr_grad_clip(qlr_backend *be, float *const *grads, const int64_t *ns, int n_tensors,
                         float max_norm, double *acc_dev, float *norm, int *nonfinite);

/* ---------------------------------------------------------------- learning-rate schedules */

typedef enum qlr_lr_schedule_type {
    QLR_LR_CONSTANT = 0, /* get_constant_schedule_with_warmup */
    QLR_LR_LINEAR = 1,   /* get_linear_schedule_with_warmup */
    QLR_LR_COSINE = 2,   /* get_cosine_schedule_with_warmup / ..._with_min_lr (min_lr_ratio) */
} qlr_lr_schedule_type;

typedef struct qlr_lr_schedule {
    qlr_lr_schedule_type type;
    double base_lr;       /* the recipe's learning_rate */
    int64_t total_steps;  /* number of optimizer updates of the run */
    int64_t warmup_steps; /* > 0 wins over warmup_ratio */
    double warmup_ratio;  /* used when warmup_steps == 0: warmup = ceil(total * ratio) */
    double min_lr_ratio;  /* cosine only: the floor as a fraction of base_lr (0 = plain cosine) */
} qlr_lr_schedule;

/* Warmup steps in effect: warmup_steps if > 0, else ceil(total_steps * warmup_ratio) (HF
 * TrainingArguments.get_warmup_steps). */
int64_t qlr_lr_warmup_steps(const qlr_lr_schedule *s);
/* The learning rate of the update made after `step` updates (step = 0 for the first update;
 * HF's LambdaLR value at last_epoch = step). Pure; cannot fail. With W warmup, T total:
 *   step < W           : base * step / max(1, W)
 *   constant           : base
 *   linear             : base * max(0, (T - step) / max(1, T - W))
 *   cosine             : progress = (step - W) / max(1, T - W);
 *                        f = 0.5 * (1 + cos(pi * progress)); base * max(0, f*(1 - r) + r)
 *                        (r = min_lr_ratio; r = 0 is get_cosine_schedule_with_warmup) */
double qlr_lr_at(const qlr_lr_schedule *s, int64_t step);
/* Parses "constant", "linear", "cosine" (also HF's "constant_with_warmup",
 * "cosine_with_min_lr"). Returns QLR_ERR_INVALID naming the accepted values otherwise. */
qlr_status qlr_lr_schedule_parse(const char *name, qlr_lr_schedule_type *out);

#endif
