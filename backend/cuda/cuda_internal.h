/* backend/cuda/cuda_internal.h: what the CUDA op files share (C++/CUDA only, not public): the
 * backend's private state (device, stream, cuBLASLt handle, workspaces), the one check macro
 * QLR_CK for CUDA / cuBLAS / cuDNN / NCCL calls (status + "file:line: statement: error (device
 * N)"), the launch check, and the op entry points that cuda_backend.cu wires into the table.
 * Every launch goes on impl->stream; nothing here synchronises the host. */
#ifndef QLR_BACKEND_CUDA_INTERNAL_H
#define QLR_BACKEND_CUDA_INTERNAL_H

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

extern "C" {
#include "backend/backend.h"
}

#define QLR_CUDA_MAX_POLICY 8

typedef struct qlr_cuda_alloc_rec {
    void *p;
    size_t bytes;
} qlr_cuda_alloc_rec;

struct qlr_cuda_sdpa_cache; /* attention_cudnn.cu */

typedef struct qlr_cuda_impl {
    int device;
    cudaStream_t stream;
    cudaStream_t copy_stream;    /* side copies (layer-input offload), ordered by events */
    cublasLtHandle_t lt;
    void *lt_ws;                 /* cuBLASLt workspace */
    size_t lt_ws_bytes;
    void *ws;                    /* op workspace (NF4 dequant tile, attention partials, ...) */
    size_t ws_bytes;
    float *d_dynmap;             /* [256] signed dynamic map (double-quant decode) */
    void *h_pinned;              /* pinned staging for sampling (params in, ids out) */
    size_t h_pinned_bytes;
    void *d_stage;               /* device twin of h_pinned */
    /* nf4_linear AUTO policy: the first entry with n <= policy_max_n[i] gives the path
     * (qlr_cuda_nf4_path); past the last entry, dequantize + cuBLASLt */
    int n_policy;
    int policy_max_n[QLR_CUDA_MAX_POLICY];
    int policy_path[QLR_CUDA_MAX_POLICY];
    int n_sm;
    int gemv1_variant;            /* n = 1 NF4 kernel: 2 or 3 resident blocks per SM (register cap) */
    size_t peak_bytes, cur_bytes; /* bytes allocated through mem.alloc and the workspaces */
    size_t cap_bytes;             /* 0: none; else cur_bytes may not pass it (qlr_cuda_set_alloc_cap) */
    qlr_cuda_alloc_rec *allocs;   /* live mem.alloc blocks */
    size_t n_allocs, cap_allocs;
    cudnnHandle_t dnn;                /* on `stream`, made on first use (attention_cudnn.cu) */
    struct qlr_cuda_sdpa_cache *sdpa; /* cuDNN SDPA execution plans per shape */
    int32_t *fresh_idx;               /* attention_fresh's seq/pos table (cuda_backend.cu) */
    int64_t fresh_cap;
} qlr_cuda_impl;

static inline qlr_cuda_impl *qlr_cuda_im(qlr_backend *be) { return (qlr_cuda_impl *)be->impl; }

/* Error conversion for each library; the overloads let one macro check every call. */
qlr_status qlr_cuda_fail(cudaError_t e, const char *stmt, const char *file, int line);
qlr_status qlr_cuda_fail(cublasStatus_t e, const char *stmt, const char *file, int line);
qlr_status qlr_cuda_fail(cudnnStatus_t e, const char *stmt, const char *file, int line);
qlr_status qlr_cuda_fail(ncclResult_t e, const char *stmt, const char *file, int line);
static inline bool qlr_cuda_ok(cudaError_t e) { return e == cudaSuccess; }
static inline bool qlr_cuda_ok(cublasStatus_t e) { return e == CUBLAS_STATUS_SUCCESS; }
static inline bool qlr_cuda_ok(cudnnStatus_t e) { return e == CUDNN_STATUS_SUCCESS; }
static inline bool qlr_cuda_ok(ncclResult_t e) { return e == ncclSuccess; }

/* Evaluates a CUDA/cuBLAS/cuDNN/NCCL call; on failure records the statement, file:line and the
 * device and returns QLR_ERR_DEVICE from the enclosing function. */
#define QLR_CK(expr)                                                                \
    do {                                                                            \
        auto qlr_ck_e_ = (expr);                                                    \
        if (!qlr_cuda_ok(qlr_ck_e_))                                                \
            return qlr_cuda_fail(qlr_ck_e_, #expr, __FILE__, __LINE__);             \
    } while (0)

/* After a kernel launch: a bad configuration shows up here (not a sync). */
#define QLR_CK_LAUNCH() QLR_CK(cudaGetLastError())

/* Grows impl->ws to at least `bytes` (a cudaMalloc: only on the first call of a new size, so
 * plan it with qlr_cuda_reserve before timing or capturing). */
qlr_status qlr_cuda_ws(qlr_backend *be, size_t bytes, void **out);

/* Programmatic dependent launch (Hopper): a kernel launched by qlr_cuda_launch with pdl = 1 may
 * start while the previous kernel on the stream finishes; it must call qlr_pdl_wait() before
 * touching memory that earlier work writes or reads (only constant inputs such as weights may be
 * read before). qlr_pdl_trigger() lets the next such kernel start early; it never lets it pass
 * its own wait before this grid has completed. QLR_CUDA_PDL=0 turns the attribute off. */
__device__ __forceinline__ void qlr_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void qlr_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
int qlr_cuda_pdl_enabled(void);
template <typename... KArgs, typename... Args>
static inline cudaError_t qlr_cuda_launch(void (*kern)(KArgs...), dim3 grid, dim3 block,
                                          size_t smem, cudaStream_t st, int pdl, Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl && qlr_cuda_pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kern, args...);
}

static inline unsigned qlr_cuda_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 0x7fffffff ? 0x7fffffff : (b < 1 ? 1 : b));
}

/* gemm.cu: D = alpha · A · Bᵀ + beta · C in row-major terms: a [m, k] bf16 (lda), b [n, k]
 * bf16 (ldb), d [m, n] of d_type (bf16 or f32, ldd), C = D when beta != 0. trans_b = 1 takes
 * b as [k, n] instead (D = A · B). */
qlr_status qlr_cuda_gemm(qlr_backend *be, void *d, cudaDataType_t d_type, const void *a,
                         const void *b, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                         int64_t ldd, float alpha, float beta, int trans_b);
/* The same with the first operand stored transposed when trans_a = 1: a [k, m] bf16 (lda), so
 * D = alpha · Aᵀ · op(B) + beta · C (the weight-gradient products, reductions over tokens). */
qlr_status qlr_cuda_gemm_t(qlr_backend *be, void *d, cudaDataType_t d_type, const void *a,
                           const void *b, int64_t m, int64_t n, int64_t k, int64_t lda,
                           int64_t ldb, int64_t ldd, float alpha, float beta, int trans_a,
                           int trans_b);

/* attention_cudnn.cu: destroys the cached SDPA plans and the cuDNN handle (backend teardown,
 * after the stream is idle). */
void qlr_cuda_sdpa_release(qlr_cuda_impl *im);

/* Op entries (each file's exported functions, wired in cuda_backend.cu). */
qlr_status qlr_cuda_embedding(qlr_backend *be, void *out, const uint16_t *table, const int32_t *ids,
                              int64_t n, int64_t d, int64_t vocab);
qlr_status qlr_cuda_rmsnorm(qlr_backend *be, void *y, const void *x, const float *w, int64_t n,
                            int64_t d, float eps);
qlr_status qlr_cuda_rmsnorm_bwd(qlr_backend *be, void *dx, const void *dy, const void *x,
                                const float *w, int64_t n, int64_t d, float eps);
qlr_status qlr_cuda_rope(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                         int64_t n, int64_t n_heads, int64_t hd);
qlr_status qlr_cuda_rope_bwd(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                             int64_t n, int64_t n_heads, int64_t hd);
qlr_status qlr_cuda_kv_store(qlr_backend *be, void *k_cache, void *v_cache, const void *k,
                             const void *v, const int32_t *seq, const int32_t *pos, int64_t n,
                             int64_t n_kv, int64_t hd, int64_t ctx);
qlr_status qlr_cuda_attention(qlr_backend *be, void *out, const void *q, const void *k_cache,
                              const void *v_cache, const int32_t *seq, const int32_t *pos,
                              int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx,
                              float scale);
qlr_status qlr_cuda_kv_store_paged(qlr_backend *be, void *k_pool, void *v_pool, const void *k,
                                   const void *v, const int32_t *slot, int64_t n, int64_t n_kv,
                                   int64_t hd, int64_t n_rows);
qlr_status qlr_cuda_attention_paged(qlr_backend *be, void *out, const void *q, const void *k_pool,
                                    const void *v_pool, const int32_t *block_table, int64_t width,
                                    int64_t block, const int32_t *seq, const int32_t *pos,
                                    int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                    float scale);
qlr_status qlr_cuda_swiglu(qlr_backend *be, void *out, const void *gate, const void *up, int64_t n);
qlr_status qlr_cuda_swiglu_bwd(qlr_backend *be, void *dgate, void *dup, const void *dout,
                               const void *gate, const void *up, int64_t n);
qlr_status qlr_cuda_add(qlr_backend *be, void *y, const void *x, int64_t n);
qlr_status qlr_cuda_get_rows(qlr_backend *be, void *dst, const void *src, const int32_t *rows,
                             int64_t n, int64_t d);
qlr_status qlr_cuda_nf4_linear(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                               const float *bias, int64_t n);
qlr_status qlr_cuda_nf4_linear_dx(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                  int64_t n);
qlr_status qlr_cuda_lora(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *l, int64_t n,
                         int64_t in, int64_t out);
qlr_status qlr_cuda_lm_head(qlr_backend *be, float *logits, const void *x, const uint16_t *w,
                            int64_t n, int64_t d, int64_t vocab);
qlr_status qlr_cuda_nf4_lm_head(qlr_backend *be, float *logits, const void *x, const qlr_nf4 *w,
                                int64_t n);
qlr_status qlr_cuda_lora_batched(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                                 const qlr_lora_ref *L_host, int32_t n_slots, const int32_t *slot,
                                 int32_t max_r, int32_t uniform, int64_t n, int64_t in,
                                 int64_t out);
qlr_status qlr_cuda_lora_segmented(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                                   const qlr_lora_ref *L_host, int32_t n_slots,
                                   const int32_t *slot, int32_t max_r, const qlr_lora_segs *g,
                                   int64_t n, int64_t in, int64_t out);
/* Fused ops (the optional entries at the end of the op table). */
qlr_status qlr_cuda_nf4_linear_multi(qlr_backend *be, int k, void *const *y, const void *x,
                                     const qlr_nf4 *const *w, const float *const *bias, int64_t n);
qlr_status qlr_cuda_swiglu_nf4_linear(qlr_backend *be, void *y, void *gate, const void *up,
                                      const qlr_nf4 *w, const float *bias, int64_t n);
qlr_status qlr_cuda_add_rmsnorm(qlr_backend *be, void *x, void *y, const void *dx, const float *w,
                                int64_t n, int64_t d, float eps);
qlr_status qlr_cuda_rope_kv_store(qlr_backend *be, void *q, void *k, const void *v, void *k_cache,
                                  void *v_cache, const int32_t *seq, const int32_t *pos,
                                  const float *inv_freq, int64_t n, int64_t n_heads, int64_t n_kv,
                                  int64_t hd, int64_t ctx);
qlr_status qlr_cuda_sample(qlr_backend *be, int32_t *out_ids, float *logits,
                           const qlr_sampling *params, uint64_t *rng, int64_t n, int64_t vocab);
/* optim.cu: the optimizer ops (AdamW of the three kinds, bit for bit the CPU op's results;
 * sum of squares in f64; f32 scaling; f32 -> bf16 compute copies). */
qlr_status qlr_cuda_adamw_step(qlr_backend *be, int kind, float *p, const float *g, void *s1,
                               void *s2, float *absmax1, float *absmax2, int64_t n,
                               const qlr_adamw_hparams *hp, int64_t t);
qlr_status qlr_cuda_sum_squares(qlr_backend *be, double *acc, const float *x, int64_t n);
qlr_status qlr_cuda_scale_f32(qlr_backend *be, float *x, float s, int64_t n);
qlr_status qlr_cuda_f32_to_act(qlr_backend *be, void *dst, const float *src, int64_t n);
/* Training ops (model/train.c): attention_varlen.cu, lm_head_ce.cu, dropout.cu, lora_bwd.cu. */
qlr_status qlr_cuda_attention_varlen(qlr_backend *be, void *out, float *lse, const void *q,
                                     const void *k, const void *v, const int32_t *start,
                                     int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                     float scale);
qlr_status qlr_cuda_attention_varlen_bwd(qlr_backend *be, void *dq, void *dk, void *dv,
                                         const void *dout, const void *q, const void *k,
                                         const void *v, const void *out, const float *lse,
                                         const int32_t *start, int64_t n, int64_t n_heads,
                                         int64_t n_kv, int64_t hd, float scale);
qlr_status qlr_cuda_lm_head_ce(qlr_backend *be, float *loss, void *dx, float *logits,
                               const void *x, const uint16_t *w, const int32_t *targets,
                               int64_t n, int64_t d, int64_t vocab, float grad_scale);
qlr_status qlr_cuda_dropout(qlr_backend *be, void *y, const void *x, int64_t n, float p,
                            uint64_t seed);
qlr_status qlr_cuda_lora_bwd(qlr_backend *be, float *da, float *db, void *dx, const void *dy,
                             const void *x, const qlr_lora_ref *l, int64_t n, int64_t in,
                             int64_t out);

/* nccl.cu: the collectives (backend.h). */
qlr_status qlr_cuda_comm_id(qlr_backend *be, uint8_t id[QLR_COMM_ID_BYTES]);
qlr_status qlr_cuda_comm_create(qlr_backend *be, const uint8_t id[QLR_COMM_ID_BYTES], int rank,
                                int world, void **comm);
void qlr_cuda_comm_destroy(qlr_backend *be, void *comm, int abort_);
qlr_status qlr_cuda_allreduce_sum_f32(qlr_backend *be, void *comm, float *x, int64_t n);
qlr_status qlr_cuda_comm_poll(qlr_backend *be, void *comm);

#endif
