/* backend/cuda/dropout.cu: inverted dropout on bf16 activations with the counter-based mask of
 * backend.h (splitmix64 of seed + i · golden ratio, top 24 bits against p). The mask is the CPU
 * op's bit for bit (integer math and one exact int -> float conversion); a kept value is
 * x · (1 / (1 - p)) in f32 (the factor computed on the host exactly as the CPU op does) rounded
 * once to bf16, i.e. the bf16 rounding of the CPU op's f32 result on the same input. Does not own
 * the mask's definition (backend.h) or its use in training (model/train.c). */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ uint64_t drop_mix64(uint64_t z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

/* y[i] = keep(seed, i) ? bf16(x[i] · inv_keep) : 0; y may equal x (each element is read and
 * written by the same thread). */
__global__ void dropout_kernel(bf16 *y, const bf16 *x, int64_t n, float p, float inv_keep,
                               uint64_t seed) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        uint64_t h = drop_mix64(seed + (uint64_t)i * 0x9E3779B97F4A7C15ull);
        float u = (float)(h >> 40) * (1.0f / 16777216.0f); /* < 2^24: exact */
        float v = __bfloat162float(x[i]);
        /* __fmul_rn: one IEEE multiply, never contracted with anything */
        y[i] = __float2bfloat16_rn(u >= p ? __fmul_rn(v, inv_keep) : 0.0f);
    }
}

qlr_status qlr_cuda_dropout(qlr_backend *be, void *y, const void *x, int64_t n, float p,
                            uint64_t seed) {
    QLR_ASSERT(p >= 0.0f && p < 1.0f);
    if (n <= 0) return QLR_OK;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    /* the CPU op's factor, the same f32 expression */
    float inv_keep = 1.0f / (1.0f - p);
    int64_t blocks = (n + 255) / 256, cap = (int64_t)im->n_sm * 16;
    dropout_kernel<<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, im->stream>>>(
        (bf16 *)y, (const bf16 *)x, n, p, inv_keep, seed);
    QLR_CK_LAUNCH();
    return QLR_OK;
}
