/* backend/cuda/lm_head_ce.cu: the fused lm_head + cross-entropy of one chunk of rows (the
 * trainer loops over chunks, so [tokens x vocab] logits never exist):
 *   1. logits [n, vocab] f32 = x · Wᵀ through cuBLASLt into the caller's scratch;
 *   2. one block per row: log-sum-exp (online max / sum in f32), loss = lse - logit[target]
 *      (0 for the ignore index), and with a gradient the row g = grad_scale · (softmax - onehot)
 *      in bf16 (0 for an ignored row);
 *   3. dx [n, d] bf16 = g · W through cuBLASLt.
 * Why g is bf16: cuBLASLt multiplies operands of one type and W is bf16 (an f32 copy of W would
 * cost vocab · d floats); each g element then carries one 2^-9 relative rounding, independent
 * across the vocabulary, which is below the bf16 rounding of dx itself. Where g lives: when vocab
 * is a multiple of 4 (every common vocabulary) g is written IN PLACE over the first half of its
 * own row's f32 bytes, read with a leading dimension of 2·vocab (rows stay 16-byte aligned), so
 * the op needs no memory beyond the caller's logits chunk; otherwise g goes to the op workspace
 * with rows padded to a multiple of 8 elements (n · vocab · 2 bytes more). The CPU reference is
 * backend/cpu/ops_train.c (qlr_cpu_lm_head_ce). */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

#define CE_THREADS 512

/* Merges the pair (m2, s2) into the running (m, s) = (max, sum of exp(z - max)). */
__device__ __forceinline__ void ce_merge(float &m, float &s, float m2, float s2) {
    if (m2 == -INFINITY) return;
    if (m == -INFINITY) {
        m = m2;
        s = s2;
        return;
    }
    if (m2 > m) {
        s = s * expf(m - m2) + s2;
        m = m2;
    } else {
        s += s2 * expf(m2 - m);
    }
}

/* One block per row i of logits [n, vocab] f32. Writes loss[i]; with want_grad writes g row i
 * at g + i · ldg (bf16). In place (g == logits, ldg = 2·vocab) the rewrite is chunked: each pass
 * reads floats [c0, c0 + B) into registers, then (after a barrier) writes bf16 elements
 * [c0, c0 + B), i.e. the bytes of floats [c0 / 2, (c0 + B) / 2), all below c0 + B: already read
 * by this pass or an earlier one, and never read again; other rows' bytes are never touched. */
__global__ void __launch_bounds__(CE_THREADS) ce_rows_kernel(float *logits, bf16 *g, int64_t ldg,
                                                            float *loss, const int32_t *targets,
                                                            int64_t vocab, float grad_scale,
                                                            int want_grad) {
    __shared__ float red_m[CE_THREADS / 32], red_s[CE_THREADS / 32];
    __shared__ float lse_s, zt_s;
    int64_t i = blockIdx.x;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float *z = logits + i * vocab;
    bf16 *gb = g + i * ldg;
    int32_t tg = targets[i];
    if (tg < 0) { /* the ignore index: no loss, a zero gradient row */
        if (tid == 0) loss[i] = 0.0f;
        if (want_grad)
            for (int64_t j = tid; j < vocab; j += CE_THREADS) gb[j] = __float2bfloat16_rn(0.0f);
        return;
    }
    float m = -INFINITY, s = 0.0f;
    for (int64_t j = tid; j < vocab; j += CE_THREADS) {
        float v = z[j];
        if (v > m) {
            s = (m == -INFINITY ? 0.0f : s * expf(m - v)) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        ce_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        red_m[warp] = m;
        red_s[warp] = s;
    }
    /* read before any thread rewrites the row; a target >= vocab (the caller validates them)
     * gives a NaN loss, never a read outside the row */
    if (tid == 0) zt_s = tg < vocab ? z[tg] : NAN;
    __syncthreads();
    if (tid == 0) {
        float bm = red_m[0], bs = red_s[0];
        for (int w = 1; w < CE_THREADS / 32; w++) ce_merge(bm, bs, red_m[w], red_s[w]);
        float lse = bm + logf(bs);
        lse_s = lse;
        loss[i] = lse - zt_s;
    }
    __syncthreads();
    if (!want_grad) return;
    float lse = lse_s;
    for (int64_t c0 = 0; c0 < vocab; c0 += CE_THREADS) {
        int64_t j = c0 + tid;
        float v = j < vocab ? z[j] : 0.0f;
        __syncthreads(); /* in place: the whole pass is read before any of it is overwritten */
        if (j < vocab) {
            float gv = expf(v - lse) * grad_scale;
            if (j == tg) gv -= grad_scale;
            gb[j] = __float2bfloat16_rn(gv);
        }
    }
}

qlr_status qlr_cuda_lm_head_ce(qlr_backend *be, float *loss, void *dx, float *logits,
                               const void *x, const uint16_t *w, const int32_t *targets,
                               int64_t n, int64_t d, int64_t vocab, float grad_scale) {
    if (n <= 0) return QLR_OK;
    QLR_ASSERT(d > 0 && vocab > 0 && n <= 0x7fffffff);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    /* logits [n, vocab] f32 = x [n, d] · W [vocab, d]ᵀ */
    QLR_TRY(qlr_cuda_gemm(be, logits, CUDA_R_32F, x, w, n, vocab, d, d, d, vocab, 1.0f, 0.0f, 0));
    bf16 *g = (bf16 *)logits;
    int64_t ldg = 2 * vocab;
    if (dx && vocab % 4 != 0) { /* in place would leave g rows only 4-byte aligned */
        void *ws;
        ldg = (vocab + 7) / 8 * 8;
        QLR_TRY(qlr_cuda_ws(be, (size_t)(n * ldg) * 2, &ws));
        g = (bf16 *)ws;
    }
    ce_rows_kernel<<<(unsigned)n, CE_THREADS, 0, im->stream>>>(logits, g, ldg, loss, targets,
                                                               vocab, grad_scale, dx != NULL);
    QLR_CK_LAUNCH();
    if (!dx) return QLR_OK;
    /* dx [n, d] = g [n, vocab] (bf16, row stride ldg) · W [vocab, d] */
    return qlr_cuda_gemm(be, dx, CUDA_R_16BF, g, w, n, d, vocab, ldg, d, d, 1.0f, 0.0f, 1);
}
