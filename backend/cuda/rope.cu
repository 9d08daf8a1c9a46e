/* backend/cuda/rope.cu: rotary position embedding in place on bf16 [n, n_heads, hd], rotate-half
 * (HF/NeoX) convention, one position per token (packed and batched sequences), inverse
 * frequencies precomputed by the model (llama3 scaling included there). The angle is the f32
 * product pos · inv_freq as in HF and the CPU reference; sinf/cosf are the accurate versions. */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

__global__ void rope_kernel(bf16 *x, const int32_t *pos, const float *inv_freq, int64_t n,
                            int64_t n_heads, int64_t hd, float sign) {
    int64_t half = hd / 2, total = n * n_heads * half;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = i % half, th = i / half, t = th / n_heads;
        float ang = (float)pos[t] * inv_freq[j];
        float sn, cs;
        sincosf(ang, &sn, &cs);
        sn *= sign;
        bf16 *v = x + th * hd;
        float x1 = __bfloat162float(v[j]), x2 = __bfloat162float(v[j + half]);
        v[j] = __float2bfloat16_rn(x1 * cs - x2 * sn);
        v[j + half] = __float2bfloat16_rn(x2 * cs + x1 * sn);
    }
}

static qlr_status rope_launch(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                              int64_t n, int64_t n_heads, int64_t hd, float sign) {
    QLR_ASSERT(hd % 2 == 0);
    int64_t total = n * n_heads * (hd / 2);
    if (total <= 0) return QLR_OK;
    int64_t blocks = (total + 255) / 256, cap = (int64_t)qlr_cuda_im(be)->n_sm * 16;
    rope_kernel<<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)x, pos, inv_freq, n, n_heads, hd, sign);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_rope(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                         int64_t n, int64_t n_heads, int64_t hd) {
    return rope_launch(be, x, pos, inv_freq, n, n_heads, hd, 1.0f);
}

qlr_status qlr_cuda_rope_bwd(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                             int64_t n, int64_t n_heads, int64_t hd) {
    return rope_launch(be, x, pos, inv_freq, n, n_heads, hd, -1.0f);
}
