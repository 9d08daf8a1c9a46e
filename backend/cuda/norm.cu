/* backend/cuda/norm.cu: RMSNorm forward and backward on bf16 rows with an f32 weight.
 * One block per row; the sum of squares is reduced in f32; y = x · r · w with
 * r = 1 / sqrt(mean(x²) + eps), the same expression as the CPU reference. */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

#define NORM_THREADS 256

static __device__ float block_sum(float v, float *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < NORM_THREADS / 32; i++) s += red[i];
    return s;
}

__global__ void rmsnorm_kernel(bf16 *y, const bf16 *x, const float *w, int64_t n, int64_t d,
                               float eps) {
    __shared__ float red[NORM_THREADS / 32];
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        const bf16 *xr = x + row * d;
        bf16 *yr = y + row * d;
        float ss = 0.0f;
        for (int64_t j = threadIdx.x; j < d; j += NORM_THREADS) {
            float v = __bfloat162float(xr[j]);
            ss = fmaf(v, v, ss);
        }
        ss = block_sum(ss, red);
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (int64_t j = threadIdx.x; j < d; j += NORM_THREADS)
            yr[j] = __float2bfloat16_rn(__bfloat162float(xr[j]) * r * w[j]);
    }
}

__global__ void rmsnorm_bwd_kernel(bf16 *dx, const bf16 *dy, const bf16 *x, const float *w,
                                   int64_t n, int64_t d, float eps) {
    __shared__ float red[NORM_THREADS / 32];
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        const bf16 *xr = x + row * d, *dyr = dy + row * d;
        bf16 *dxr = dx + row * d;
        float ss = 0.0f, dot = 0.0f;
        for (int64_t j = threadIdx.x; j < d; j += NORM_THREADS) {
            float v = __bfloat162float(xr[j]);
            ss = fmaf(v, v, ss);
            dot = fmaf(w[j] * __bfloat162float(dyr[j]), v, dot);
        }
        ss = block_sum(ss, red);
        dot = block_sum(dot, red);
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        float k = dot * r * r * r / (float)d;
        /* each thread rereads only the elements it writes, so dx may alias dy */
        for (int64_t j = threadIdx.x; j < d; j += NORM_THREADS)
            dxr[j] = __float2bfloat16_rn(r * w[j] * __bfloat162float(dyr[j]) -
                                         __bfloat162float(xr[j]) * k);
    }
}

static unsigned norm_grid(int64_t n) { return (unsigned)(n < 65535 ? (n > 0 ? n : 1) : 65535); }

qlr_status qlr_cuda_rmsnorm(qlr_backend *be, void *y, const void *x, const float *w, int64_t n,
                            int64_t d, float eps) {
    if (n <= 0) return QLR_OK;
    rmsnorm_kernel<<<norm_grid(n), NORM_THREADS, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)y, (const bf16 *)x, w, n, d, eps);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_rmsnorm_bwd(qlr_backend *be, void *dx, const void *dy, const void *x,
                                const float *w, int64_t n, int64_t d, float eps) {
    if (n <= 0) return QLR_OK;
    rmsnorm_bwd_kernel<<<norm_grid(n), NORM_THREADS, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)dx, (const bf16 *)dy, (const bf16 *)x, w, n, d, eps);
    QLR_CK_LAUNCH();
    return QLR_OK;
}
