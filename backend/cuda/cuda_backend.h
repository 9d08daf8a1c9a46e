/* backend/cuda/cuda_backend.h: what the CUDA backend offers beyond the op table of
 * backend/backend.h, for tests and benchmarks: forcing an NF4 linear path, dequantizing an
 * NF4 store to bf16, a raw bf16 GEMM, the stream, the workspace reservation and memory figures.
 * C-callable; include after backend/backend.h. Every function takes a backend made by
 * qlr_backend_cuda_create and asserts that it is one. */
#ifndef QLR_BACKEND_CUDA_BACKEND_H
#define QLR_BACKEND_CUDA_BACKEND_H

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Which kernel nf4_linear uses. AUTO follows the policy (qlr_cuda_set_nf4_policy) for row
 * lengths divisible by 32, else dequantize into the workspace + cuBLASLt. */
typedef enum qlr_cuda_nf4_path {
    QLR_CUDA_NF4_AUTO = 0,
    QLR_CUDA_NF4_FUSED = 1,       /* packed weights read directly, f32 FMA (slow for large n) */
    QLR_CUDA_NF4_DEQUANT_GEMM = 2,
    QLR_CUDA_NF4_FUSED_MMA = 3,   /* packed weights read directly, bf16 tensor cores (n <= 64
                                     per pass) */
} qlr_cuda_nf4_path;

/* nf4_linear with a chosen path (same contract as the op). */
qlr_status qlr_cuda_nf4_linear_path(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                                    const float *bias, int64_t n, qlr_cuda_nf4_path path);
/* Sets the AUTO policy: for n <= max_n[0] use paths[0], else for n <= max_n[1] paths[1], ...,
 * past the last entry dequantize + cuBLASLt. At most 8 entries; QLR_ERR_INVALID beyond.
 * Default: n = 1 fused (FMA), n <= 48 fused (tensor cores), else dequantize + cuBLASLt. */
qlr_status qlr_cuda_set_nf4_policy(qlr_backend *be, int n_entries, const int *max_n,
                                   const qlr_cuda_nf4_path *paths);

/* The n = 1 fused kernel: 4 (the default) streams weights through shared memory (cp.async
 * stages) where the shape allows (cols a multiple of 1024, at most 32768), else the register
 * kernel with 2 blocks per SM; 2 or 3 force the register kernel with its 128- or 80-register cap
 * (2 or 3 blocks per SM). For the benchmark's tuning and comparisons. */
void qlr_cuda_set_gemv1_variant(qlr_backend *be, int variant);

/* logits [rows] f32 = x [cols] bf16 · Wᵀ for one token with an NF4 output projection (a 4-bit
 * lm_head for serving). QLR_ERR_UNSUPPORTED unless cols % 1024 == 0, cols <= 32768 and the
 * arrays are 16-byte aligned. Async. */
qlr_status qlr_cuda_nf4_logits(qlr_backend *be, float *logits, const void *x, const qlr_nf4 *w);

/* out [rows, cols] bf16 = dequantized w (device store, double quant or not). Async. */
qlr_status qlr_cuda_nf4_dequant(qlr_backend *be, uint16_t *out, const qlr_nf4 *w);

/* Row-major bf16 GEMM y [m, n] = x [m, k] · w [n, k]ᵀ through cuBLASLt with f32 accumulation;
 * y is f32 when y_f32, else bf16. Async. */
qlr_status qlr_cuda_gemm_bf16(qlr_backend *be, void *y, const uint16_t *x, const uint16_t *w,
                              int64_t m, int64_t n, int64_t k, int y_f32);

/* Causal GQA prefill attention of one sequence through cuDNN's fused scaled-dot-product
 * attention (its flash-attention engine, picked by cuDNN's heuristics): out [S, H, D] bf16 =
 * softmax(scale · q kᵀ, causal) v for q [S, H, D] and k, v [S, KV, D] bf16, token-major; query i
 * sees keys 0..i, query head h reads KV head h / (H / KV). Needs H % KV == 0 (QLR_ERR_INVALID
 * otherwise) and 16-byte aligned pointers. The execution plan of (S, H, KV, D) is built on the
 * first call (cuDNN may compile a kernel then: up to about a second) and cached in the backend,
 * so later calls only execute; the workspace comes from the op workspace (qlr_cuda_reserve).
 * QLR_ERR_UNSUPPORTED, with cuDNN's reason, when cuDNN cannot serve the shape or cannot be
 * loaded: fall back to the attention op then. QLR_ERR_DEVICE on other cuDNN/CUDA failures.
 * Async on the backend's stream. The op table's attention_fresh (n > 64, unless QLR_CUDA_SDPA=0
 * left it out) calls it for the first n rounded down to a multiple of 64 rows. */
qlr_status qlr_cuda_attention_prefill_cudnn(qlr_backend *be, void *out, const void *q,
                                            const void *k, const void *v, int64_t S, int64_t H,
                                            int64_t KV, int64_t D, float scale);

/* Grows the op workspace to `bytes` now (so that no allocation happens inside a forward). */
qlr_status qlr_cuda_reserve(qlr_backend *be, size_t bytes);
/* The backend's cudaStream_t, as a pointer. */
void *qlr_cuda_stream(qlr_backend *be);
/* Peak bytes allocated through be->mem.alloc and the workspaces since creation. */
size_t qlr_cuda_peak_bytes(qlr_backend *be);
/* Caps the bytes the backend holds (be->mem.alloc and its workspaces, as counted by
 * qlr_cuda_peak_bytes; the CUDA context and cuDNN's own memory are outside it): an allocation
 * that would pass it fails with QLR_ERR_NOMEM naming the cap, as if the device had no more
 * memory (mem.alloc returns NULL). 0 removes the cap. Cannot fail. */
void qlr_cuda_set_alloc_cap(qlr_backend *be, size_t bytes);
/* cudaMemGetInfo on the backend's device. QLR_ERR_DEVICE on failure. */
qlr_status qlr_cuda_mem_info(qlr_backend *be, size_t *free_bytes, size_t *total_bytes);
/* Device name (static storage) and multiprocessor count. */
const char *qlr_cuda_device_name(qlr_backend *be);

#ifdef __cplusplus
}
#endif

#endif
