/* backend/cuda/attention_varlen_mma.h: the register-resident (mma.sync m16n8k16) kernels of the
 * training attention, behind attention_varlen.cu's op entries, which own the argument checks,
 * the workspace (D = rowsum(dO ∘ O), a recomputed forward) and the choice between these kernels
 * and the WMMA ones (QLR_ATTN_VARLEN=wmma). Tensors as in backend.h's attention_varlen: q, out,
 * dq, dout [n, n_heads, hd] bf16; k, v, dk, dv [n, n_kv, hd] bf16; lse, D [n, n_heads] f32;
 * start [n] int32. hd is 64 or 128 and every tensor pointer 16-byte aligned (the caller checks). */
#ifndef QLR_BACKEND_CUDA_ATTENTION_VARLEN_MMA_H
#define QLR_BACKEND_CUDA_ATTENTION_VARLEN_MMA_H

#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "core/status.h"
}

/* Forward: writes out and (when not NULL) lse = log-sum-exp of the scaled scores. */
qlr_status qlr_cuda_av_mma_fwd(cudaStream_t st, void *out, float *lse, const void *q,
                               const void *k, const void *v, const int32_t *start, int64_t n,
                               int64_t n_heads, int64_t n_kv, int64_t hd, float scale);
/* Backward from the forward's lse and D: overwrites dq, dk, dv (no atomics: deterministic). */
qlr_status qlr_cuda_av_mma_bwd(cudaStream_t st, void *dq, void *dk, void *dv, const void *dout,
                               const void *q, const void *k, const void *v, const float *lse,
                               const float *D, const int32_t *start, int64_t n, int64_t n_heads,
                               int64_t n_kv, int64_t hd, float scale);

#endif
