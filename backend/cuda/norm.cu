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

/* Rows of d <= NORM_VEC * 8 * NORM_THREADS values with d % 8 == 0 (every model width) keep
 * their values in registers between the two passes; all loads are issued before any use. */
#define NORM_VEC 4

/* The second pass shared by rmsnorm and add+rmsnorm: y = v · r · w for the row held in registers
 * (v: this thread's NORM_VEC chunks of 8 bf16), r = 1 / sqrt(ss / d + eps). */
static __device__ __forceinline__ void norm_store_row(bf16 *y, const uint4 *v, const float *w, float ss,
                                                      int64_t d, float eps) {
    int64_t d8 = d / 8;
    float r = 1.0f / sqrtf(ss / (float)d + eps);
    uint4 *yr = (uint4 *)y;
#pragma unroll
    for (int u = 0; u < NORM_VEC; u++) {
        int64_t j = threadIdx.x + u * NORM_THREADS;
        if (j >= d8) continue;
        const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v[u];
        const float4 *wp = (const float4 *)(w + j * 8);
        float4 w0 = wp[0], w1 = wp[1];
        float ww[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
        __align__(16) __nv_bfloat162 o[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float2 f = __bfloat1622float2(h[k]);
            o[k] = __floats2bfloat162_rn(f.x * r * ww[2 * k], f.y * r * ww[2 * k + 1]);
        }
        yr[j] = *(uint4 *)o;
    }
}

__global__ void rmsnorm_vec_kernel(bf16 *y, const bf16 *x, const float *w, int64_t n, int64_t d,
                                   float eps) {
    __shared__ float red[NORM_THREADS / 32];
    int64_t d8 = d / 8;
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        const uint4 *xr = (const uint4 *)(x + row * d);
        uint4 v[NORM_VEC];
#pragma unroll
        for (int u = 0; u < NORM_VEC; u++) {
            int64_t j = threadIdx.x + u * NORM_THREADS;
            v[u] = j < d8 ? xr[j] : make_uint4(0, 0, 0, 0);
        }
        float ss = 0.0f;
#pragma unroll
        for (int u = 0; u < NORM_VEC; u++) {
            const __nv_bfloat162 *h = (const __nv_bfloat162 *)&v[u];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float2 f = __bfloat1622float2(h[k]);
                ss = fmaf(f.x, f.x, ss);
                ss = fmaf(f.y, f.y, ss);
            }
        }
        norm_store_row(y + row * d, v, w, block_sum(ss, red), d, eps);
    }
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
    if (d % 8 == 0 && d <= (int64_t)NORM_VEC * 8 * NORM_THREADS && ((uintptr_t)x & 15) == 0 &&
        ((uintptr_t)y & 15) == 0 && ((uintptr_t)w & 15) == 0)
        rmsnorm_vec_kernel<<<norm_grid(n), NORM_THREADS, 0, qlr_cuda_im(be)->stream>>>(
            (bf16 *)y, (const bf16 *)x, w, n, d, eps);
    else
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

/* ---- fused residual add + RMSNorm (the add_rmsnorm op): x += dx (rounded to bf16, stored),
 * then y = rmsnorm(x) on the rounded values, as the two separate ops compute it. One block per
 * row; rows of d % 8 == 0, d <= NORM_VEC * 8 * NORM_THREADS stay in registers. Launched with
 * programmatic dependent launch (waits before its first load). */
__global__ void add_rmsnorm_vec_kernel(bf16 *x, bf16 *y, const bf16 *dx, const float *w,
                                       int64_t n, int64_t d, float eps) {
    __shared__ float red[NORM_THREADS / 32];
    qlr_pdl_trigger();
    qlr_pdl_wait();
    int64_t d8 = d / 8;
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        uint4 *xr = (uint4 *)(x + row * d);
        const uint4 *dr = (const uint4 *)(dx + row * d);
        uint4 v[NORM_VEC], a[NORM_VEC];
#pragma unroll
        for (int u = 0; u < NORM_VEC; u++) {
            int64_t j = threadIdx.x + u * NORM_THREADS;
            v[u] = j < d8 ? xr[j] : make_uint4(0, 0, 0, 0);
            a[u] = j < d8 ? dr[j] : make_uint4(0, 0, 0, 0);
        }
        float ss = 0.0f;
#pragma unroll
        for (int u = 0; u < NORM_VEC; u++) {
            __nv_bfloat162 *h = (__nv_bfloat162 *)&v[u];
            const __nv_bfloat162 *g = (const __nv_bfloat162 *)&a[u];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float2 f = __bfloat1622float2(h[k]), e = __bfloat1622float2(g[k]);
                h[k] = __floats2bfloat162_rn(f.x + e.x, f.y + e.y);
                f = __bfloat1622float2(h[k]);
                ss = fmaf(f.x, f.x, ss);
                ss = fmaf(f.y, f.y, ss);
            }
            int64_t j = threadIdx.x + u * NORM_THREADS;
            if (j < d8) xr[j] = v[u];
        }
        norm_store_row(y + row * d, v, w, block_sum(ss, red), d, eps);
    }
}

qlr_status qlr_cuda_add_rmsnorm(qlr_backend *be, void *x, void *y, const void *dx, const float *w,
                                int64_t n, int64_t d, float eps) {
    if (n <= 0) return QLR_OK;
    if (d % 8 == 0 && d <= (int64_t)NORM_VEC * 8 * NORM_THREADS && ((uintptr_t)x & 15) == 0 &&
        ((uintptr_t)y & 15) == 0 && ((uintptr_t)dx & 15) == 0 && ((uintptr_t)w & 15) == 0) {
        QLR_CK(qlr_cuda_launch(add_rmsnorm_vec_kernel, dim3(norm_grid(n)), dim3(NORM_THREADS), 0,
                               qlr_cuda_im(be)->stream, 1, (bf16 *)x, (bf16 *)y, (const bf16 *)dx,
                               w, n, d, eps));
        QLR_CK_LAUNCH();
        return QLR_OK;
    }
    QLR_TRY(qlr_cuda_add(be, x, dx, n * d));
    return qlr_cuda_rmsnorm(be, y, x, w, n, d, eps);
}
