/* backend/cuda/lora_bwd.cu: the LoRA backward of one adapter on one linear (training shapes),
 * five cuBLASLt products through qlr_cuda_gemm_t (no kernel of its own):
 *   u  [n, r] = x · Aᵀ          g  [n, r] = dy · B          (bf16, in the op workspace)
 *   dA [r, in]  += scale · gᵀ · x     dB [out, r] += scale · dyᵀ · u     (f32 accumulators)
 *   dx [n, in]  += scale · g · A      (act, when dx != NULL)
 * u and g are kept in bf16 because cuBLASLt multiplies operands of one type and x, dy, A, B are
 * bf16: an f32 u or g would need an f32 copy of x or dy (n · in floats) per call. The cost is
 * one bf16 rounding (2^-9 relative) of each element of u and g, the same rounding the forward's
 * LoRA hook already applies to u; the weight gradients still accumulate in f32. Rows of u and g
 * are padded to a multiple of 8 elements (16 bytes) so every operand row is vector-aligned. The
 * forward hook and the generic GEMM wrapper live in gemm.cu. */
#include "backend/cuda/cuda_internal.h"

qlr_status qlr_cuda_lora_bwd(qlr_backend *be, float *da, float *db, void *dx, const void *dy,
                             const void *x, const qlr_lora_ref *l, int64_t n, int64_t in,
                             int64_t out) {
    if (!l || l->r <= 0 || n <= 0) return QLR_OK;
    QLR_ASSERT(in > 0 && out > 0);
    int64_t r = l->r, rp = (r + 7) / 8 * 8;
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)(2 * n * rp) * 2, &ws));
    uint16_t *u = (uint16_t *)ws, *g = u + n * rp; /* [n, rp] bf16 each */
    /* u [n, r] = x [n, in] · A [r, in]ᵀ */
    QLR_TRY(qlr_cuda_gemm_t(be, u, CUDA_R_16BF, x, l->a, n, r, in, in, in, rp, 1.0f, 0.0f, 0, 0));
    /* g [n, r] = dy [n, out] · B [out, r] */
    QLR_TRY(qlr_cuda_gemm_t(be, g, CUDA_R_16BF, dy, l->b, n, r, out, out, r, rp, 1.0f, 0.0f, 0,
                            1));
    if (da) /* dA [r, in] += scale · g [n, r]ᵀ · x [n, in] */
        QLR_TRY(qlr_cuda_gemm_t(be, da, CUDA_R_32F, g, x, r, in, n, rp, in, in, l->scale, 1.0f, 1,
                                1));
    if (db) /* dB [out, r] += scale · dy [n, out]ᵀ · u [n, r] */
        QLR_TRY(qlr_cuda_gemm_t(be, db, CUDA_R_32F, dy, u, out, r, n, out, rp, r, l->scale, 1.0f,
                                1, 1));
    if (dx) /* dx [n, in] += scale · g [n, r] · A [r, in] */
        QLR_TRY(qlr_cuda_gemm_t(be, dx, CUDA_R_16BF, g, l->a, n, in, r, rp, in, in, l->scale, 1.0f,
                                0, 1));
    return QLR_OK;
}
