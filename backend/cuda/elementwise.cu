/* backend/cuda/elementwise.cu: the memory-bound elementwise and gather ops on bf16
 * activations: embedding (bf16 table rows), SwiGLU (+ backward), residual add and row gather.
 * f32 arithmetic, one rounding to bf16 per output. Grid-stride loops on the backend's stream. */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

__global__ void gather_rows_kernel(bf16 *out, const bf16 *src, const int32_t *ids, int64_t n,
                                   int64_t d, int64_t vocab) {
    /* one block row per token; 16-byte copies when rows are 8-element aligned */
    for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
        int64_t id = ids[t];
        bf16 *o = out + t * d;
        if (id < 0 || id >= vocab) {
            /* the caller validates ids (backend.h); a bad one yields a zero row, never a stray read */
            for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = __float2bfloat16_rn(0.0f);
            continue;
        }
        const bf16 *s = src + id * d;
        if ((d & 7) == 0) {
            const uint4 *s4 = (const uint4 *)s;
            uint4 *o4 = (uint4 *)o;
#pragma unroll 4
            for (int64_t j = threadIdx.x; j < d / 8; j += blockDim.x) o4[j] = __ldg(s4 + j);
        } else {
            for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = s[j];
        }
    }
}

static unsigned row_grid(int64_t n) { return (unsigned)(n < 65535 ? (n > 0 ? n : 1) : 65535); }

qlr_status qlr_cuda_embedding(qlr_backend *be, void *out, const uint16_t *table, const int32_t *ids,
                              int64_t n, int64_t d, int64_t vocab) {
    if (n <= 0) return QLR_OK;
    gather_rows_kernel<<<row_grid(n), 128, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)out, (const bf16 *)table, ids, n, d, vocab);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_get_rows(qlr_backend *be, void *dst, const void *src, const int32_t *rows,
                             int64_t n, int64_t d) {
    if (n <= 0) return QLR_OK;
    gather_rows_kernel<<<row_grid(n), 128, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)dst, (const bf16 *)src, rows, n, d, INT64_MAX);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

__global__ void swiglu_kernel(bf16 *out, const bf16 *gate, const bf16 *up, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]);
        out[i] = __float2bfloat16_rn(silu(g) * u);
    }
}

__global__ void swiglu_bwd_kernel(bf16 *dgate, bf16 *dup, const bf16 *dout, const bf16 *gate,
                                  const bf16 *up, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]);
        float d = __bfloat162float(dout[i]);
        float s = 1.0f / (1.0f + expf(-g));
        float dg = d * u * s * (1.0f + g * (1.0f - s));
        float du = d * g * s;
        dgate[i] = __float2bfloat16_rn(dg);
        dup[i] = __float2bfloat16_rn(du);
    }
}

__global__ void add_kernel(bf16 *y, const bf16 *x, int64_t n) {
    int64_t n2 = n / 2;
    __nv_bfloat162 *y2 = (__nv_bfloat162 *)y;
    const __nv_bfloat162 *x2 = (const __nv_bfloat162 *)x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n2;
         i += (int64_t)gridDim.x * blockDim.x) {
        float2 a = __bfloat1622float2(y2[i]), b = __bfloat1622float2(x2[i]);
        y2[i] = __floats2bfloat162_rn(a.x + b.x, a.y + b.y);
    }
    if ((n & 1) && blockIdx.x == 0 && threadIdx.x == 0)
        y[n - 1] = __float2bfloat16_rn(__bfloat162float(y[n - 1]) + __bfloat162float(x[n - 1]));
}

static unsigned ew_grid(qlr_backend *be, int64_t n) {
    int64_t b = (n + 255) / 256, cap = (int64_t)qlr_cuda_im(be)->n_sm * 16;
    return (unsigned)(b < 1 ? 1 : (b > cap ? cap : b));
}

qlr_status qlr_cuda_swiglu(qlr_backend *be, void *out, const void *gate, const void *up, int64_t n) {
    if (n <= 0) return QLR_OK;
    swiglu_kernel<<<ew_grid(be, n), 256, 0, qlr_cuda_im(be)->stream>>>((bf16 *)out,
                                                                       (const bf16 *)gate,
                                                                       (const bf16 *)up, n);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_swiglu_bwd(qlr_backend *be, void *dgate, void *dup, const void *dout,
                               const void *gate, const void *up, int64_t n) {
    if (n <= 0) return QLR_OK;
    swiglu_bwd_kernel<<<ew_grid(be, n), 256, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)dgate, (bf16 *)dup, (const bf16 *)dout, (const bf16 *)gate, (const bf16 *)up, n);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_add(qlr_backend *be, void *y, const void *x, int64_t n) {
    if (n <= 0) return QLR_OK;
    /* bf16x2 accesses need 4-byte alignment of both buffers */
    QLR_ASSERT(((uintptr_t)y & 3) == 0 && ((uintptr_t)x & 3) == 0);
    add_kernel<<<ew_grid(be, n / 2 + 1), 256, 0, qlr_cuda_im(be)->stream>>>((bf16 *)y,
                                                                             (const bf16 *)x, n);
    QLR_CK_LAUNCH();
    return QLR_OK;
}
