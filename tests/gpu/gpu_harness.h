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

#endif
