/* tests/gpu/gpu_harness.h: what the GPU op tests share: the two backends (CPU = oracle, CUDA
 * under test), device buffers with guard bytes on both sides (an out-of-bounds write by a
 * kernel changes them and fails the test), bf16-rounded random inputs given identically to both
 * backends, and a comparison that reports the worst element and the relative norm error. */
#ifndef QLR_TESTS_GPU_HARNESS_H
#define QLR_TESTS_GPU_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "backend/cuda/cuda_backend.h"

extern qlr_backend *g_cpu, *g_gpu;

/* Creates both backends; returns 0 (and prints why) when no CUDA device can be used. */
int gh_init(void);
void gh_done(void);

/* A device buffer of `bytes` with GH_GUARD guard bytes each side set to a pattern. */
#define GH_GUARD 256
typedef struct gh_buf {
    unsigned char *base;
    void *p;        /* the usable region */
    size_t bytes;
} gh_buf;
gh_buf gh_alloc(qlr_backend *be, size_t bytes);
/* Checks the guards (a CHECK per buffer, named by `what`), then frees. */
void gh_free_checked(qlr_backend *be, gh_buf *b, const char *what);

/* Random N(0, sigma) values rounded to bf16 (so both backends see the same numbers). */
void gh_randn_bf16(float *x, int64_t n, float sigma, uint64_t *rng);

/* Uploads n floats to the backend's act dtype (bf16 on CUDA, f32 on CPU) in a new guarded
 * buffer / a plain buffer on the CPU. */
gh_buf gh_act(qlr_backend *be, const float *x, int64_t n);
/* Any bytes, as is. */
gh_buf gh_raw(qlr_backend *be, const void *x, size_t bytes);
/* Reads n act values back as floats. */
void gh_read_act(qlr_backend *be, const void *p, float *out, int64_t n);

/* Compares got against ref: passes when every |got - ref| <= atol + rtol·|ref|. Prints the op,
 * the worst element, max abs error and ||got - ref|| / ||ref||. Returns 1 on pass. */
int gh_compare(const char *what, const float *got, const float *ref, int64_t n, double atol,
               double rtol);
/* gh_compare with the tolerance of bf16 attention kernels against the f32 CPU reference (inputs
 * N(0, 1) rounded to bf16): outputs are convex combinations of the values, so each is at most
 * max|v|; the bf16 output costs 2^-9 relative and kernels that round the softmax weights to bf16
 * for the tensor-core P·V product another 2^-9 per weight -> 8e-3 absolute + 2^-7 relative. */
int gh_compare_attention(const char *what, const float *got, const float *ref, int64_t n);
/* Root mean square of x. */
double gh_rms(const float *x, int64_t n);

/* ---- the multi-adapter LoRA tests (test_cuda_lora_batched, test_cuda_lora_segments) ---- */

/* n_slots random adapters for [in] -> [out]: A_s [r_s, in] ~ N(0, 1/in), B_s [out, r_s] ~
 * N(0, 1/r_s) (u and the update are O(1), like y), bf16-rounded; scales 2, 0.5, -1 in turn. */
typedef struct gh_lora_set {
    int32_t n_slots, max_r;
    const int32_t *ranks;  /* [n_slots], not owned */
    int64_t in, out;
    float **a, **b;        /* [n_slots] host f32 */
    float *scale;          /* [n_slots] */
} gh_lora_set;
void gh_lora_make(gh_lora_set *s, int32_t n_slots, const int32_t *ranks, int64_t in, int64_t out,
                  uint64_t *rng);
void gh_lora_free(gh_lora_set *s);
/* The set on `be`: Lh [n_slots] filled with device pointers; dev [2 n_slots] one guarded buffer
 * per A and B, or with `packed` one buffer *pack holding them all at odd element offsets (2-byte
 * offsets on the GPU: the kernels' scalar loads). Free with gh_lora_free_dev. */
void gh_lora_upload(qlr_backend *be, const gh_lora_set *s, int packed, qlr_lora_ref *Lh,
                    gh_buf *dev, gh_buf *pack);
void gh_lora_free_dev(qlr_backend *be, const gh_lora_set *s, gh_buf *dev, gh_buf *pack,
                      const char *what);
/* What gh_lora_check found. */
typedef struct gh_lora_err {
    int64_t bad, untouched_bad, adapted;  /* values over tolerance; slot -1 / r = 0 values changed
                                             (on either side); adapted tokens */
    int64_t first, worst;                 /* first mismatch and the worst, as n·out indices */
    double worst_ratio, max_abs, max_rel; /* worst |err| / tol; max |err|; max |err| / |ref| */
} gh_lora_err;
/* Checks got (device op) against ref (the CPU op) for y = y0 + each token's adapter: per element
 * |got - ref| <= c·(1 + 2^-9)·M + 2·(in + r + 2)·2^-24·Mf with M = |y0| + |scale|·Σ_j |u_j|·|B_oj|
 * and Mf the same with |u_j| replaced by Σ_k |x_k·A_jk|. Why: every path rounds y to bf16 once
 * (2^-9 of a value at most (1 + 2^-9)·M; c = 2^-8 covers it with the other side's rounding) and
 * both sides sum the same f32 products in different orders (each within (in + r + 2)·2^-24·Mf).
 * c = 2^-7 for tokens with coarse[t] != 0 (or every token when coarse_all): the dense cuBLASLt
 * path rounds u to bf16 and its bf16 epilogue rounds the product before it adds C (seen on an
 * H200: up to 1.7 times the single-rounding bound). Rows of slot -1 / r = 0 must keep y0's bits. */
void gh_lora_check(const gh_lora_set *s, const float *x, const float *y0, const int32_t *slot,
                   int64_t n, const float *got, const float *ref, const char *coarse,
                   int coarse_all, gh_lora_err *e);

#endif
