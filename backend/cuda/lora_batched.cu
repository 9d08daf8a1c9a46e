/* backend/cuda/lora_batched.cu: the batched multi-adapter LoRA op (backend.h lora_batched) on
 * bf16 activations: every token applies its own slot's A [r, in] and B [out, r], ranks mixed,
 * the adapters never padded.
 *
 * Two kernels, correct for any mix of slots: shrink writes u [n, max_r] f32 (op workspace), one
 * warp per (token, rank row) dot product; expand adds scale · u[t] · B[s]ᵀ to y, one thread per
 * (token, output) so that each bf16 element of y is read, updated in f32 and rounded once by its
 * only owner (no atomics). A batch of one slot (the `uniform` hint) takes the dense path, the
 * single-adapter op (two cuBLASLt GEMMs). The segmented fast kernels (tokens sorted by slot,
 * tensor cores) are a later issue; this file does not own the adapters or the slot table. */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

#define SHRINK_WARPS 8 /* rank rows per shrink block: a block is one token x 8 rows of its A */
#define EXPAND_THREADS 256

/* ---- kernels ---- */

/* u[t, j] = Σ_k x[t, k] · A[s][j, k] for j < r_s, s = slot[t]; grid (n, ceil(max_r / 8)), warp w
 * of block (t, y) takes row j = 8·y + w. Rows j >= r_s and tokens without an adapter are left
 * alone (expand never reads them). */
static __global__ void lora_shrink_kernel(float *u, const bf16 *x, const qlr_lora_ref *L,
                                          int32_t n_slots, const int32_t *slot, int32_t max_r,
                                          int64_t in) {
    int64_t t = blockIdx.x;
    int32_t s = slot[t];
    if (s < 0 || s >= n_slots) return;
    int32_t r = L[s].r;
    int32_t j = (int32_t)blockIdx.y * SHRINK_WARPS + (int32_t)(threadIdx.x / 32);
    if (r <= 0 || r > max_r || j >= r) return;
    int lane = threadIdx.x % 32;
    const bf16 *xr = x + t * in;
    const bf16 *ar = (const bf16 *)L[s].a + (int64_t)j * in;
    float acc = 0.0f;
    if ((in & 7) == 0 && (((uintptr_t)xr | (uintptr_t)ar) & 15) == 0) {
        /* 16-byte loads: 8 bf16 of x and of A per lane per step */
        const uint4 *x4 = (const uint4 *)xr, *a4 = (const uint4 *)ar;
        for (int64_t k = lane; k < in / 8; k += 32) {
            uint4 xv = x4[k], av = __ldg(a4 + k);
            const __nv_bfloat162 *xp = (const __nv_bfloat162 *)&xv;
            const __nv_bfloat162 *ap = (const __nv_bfloat162 *)&av;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float2 xf = __bfloat1622float2(xp[q]), af = __bfloat1622float2(ap[q]);
                acc += xf.x * af.x;
                acc += xf.y * af.y;
            }
        }
    } else {
        for (int64_t k = lane; k < in; k += 32)
            acc += __bfloat162float(xr[k]) * __bfloat162float(ar[k]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) u[t * max_r + j] = acc;
}

/* y[t, o] = bf16(y[t, o] + scale_s · Σ_j u[t, j] · B[s][o, j]); grid (n, ceil(out / 256)), one
 * thread per output of one token; the token's u row is staged in shared memory (max_r f32). */
static __global__ void lora_expand_kernel(bf16 *y, const float *u, const qlr_lora_ref *L,
                                          int32_t n_slots, const int32_t *slot, int32_t max_r,
                                          int64_t out) {
    extern __shared__ float su[];
    int64_t t = blockIdx.x;
    int32_t s = slot[t];
    if (s < 0 || s >= n_slots) return; /* the whole block: s is the token's */
    int32_t r = L[s].r;
    if (r <= 0 || r > max_r) return;
    for (int32_t j = threadIdx.x; j < r; j += blockDim.x) su[j] = u[t * max_r + j];
    __syncthreads();
    int64_t o = (int64_t)blockIdx.y * blockDim.x + threadIdx.x;
    if (o >= out) return;
    const bf16 *br = (const bf16 *)L[s].b + o * r;
    float acc = 0.0f;
    for (int32_t j = 0; j < r; j++) acc += su[j] * __bfloat162float(br[j]);
    bf16 *yp = y + t * out + o;
    *yp = __float2bfloat16_rn(__bfloat162float(*yp) + L[s].scale * acc);
}

/* ---- launchers ---- */

static qlr_status launch_shrink(cudaStream_t st, float *u, const bf16 *x, const qlr_lora_ref *L,
                                int32_t n_slots, const int32_t *slot, int32_t max_r, int64_t n,
                                int64_t in) {
    QLR_ASSERT(n > 0 && n <= 0x7fffffff && max_r > 0 && in > 0);
    dim3 grid((unsigned)n, (unsigned)((max_r + SHRINK_WARPS - 1) / SHRINK_WARPS));
    QLR_ASSERT(grid.y <= 65535);
    lora_shrink_kernel<<<grid, SHRINK_WARPS * 32, 0, st>>>(u, x, L, n_slots, slot, max_r, in);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

static qlr_status launch_expand(cudaStream_t st, bf16 *y, const float *u, const qlr_lora_ref *L,
                                int32_t n_slots, const int32_t *slot, int32_t max_r, int64_t n,
                                int64_t out) {
    QLR_ASSERT(n > 0 && n <= 0x7fffffff && max_r > 0 && out > 0);
    int64_t gy = (out + EXPAND_THREADS - 1) / EXPAND_THREADS;
    QLR_ASSERT(gy <= 65535);
    size_t smem = (size_t)max_r * sizeof(float);
    QLR_ASSERT(smem <= 48u << 10); /* max_r <= 12288: far above any LoRA rank */
    dim3 grid((unsigned)n, (unsigned)gy);
    lora_expand_kernel<<<grid, EXPAND_THREADS, smem, st>>>(y, u, L, n_slots, slot, max_r, out);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

/* ---- entry ---- */

qlr_status qlr_cuda_lora_batched(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                                 const qlr_lora_ref *L_host, int32_t n_slots, const int32_t *slot,
                                 int32_t max_r, int32_t uniform, int64_t n, int64_t in,
                                 int64_t out) {
    if (n <= 0 || n_slots <= 0) return QLR_OK;
    QLR_ASSERT(L && L_host && slot && max_r >= 0 && in > 0 && out > 0);
    QLR_ASSERT(uniform < n_slots);
    for (int32_t s = 0; s < n_slots; s++) QLR_ASSERT(L_host[s].r <= max_r);
    if (uniform >= 0) /* every token is of one slot: the dense single-adapter GEMMs */
        return qlr_cuda_lora(be, y, x, &L_host[uniform], n, in, out);
    if (max_r == 0) return QLR_OK;
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)n * (size_t)max_r * sizeof(float), &ws));
    cudaStream_t st = qlr_cuda_im(be)->stream;
    QLR_TRY(launch_shrink(st, (float *)ws, (const bf16 *)x, L, n_slots, slot, max_r, n, in));
    return launch_expand(st, (bf16 *)y, (const float *)ws, L, n_slots, slot, max_r, n, out);
}
