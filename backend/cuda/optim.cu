/* backend/cuda/optim.cu: the optimizer ops on the device: one AdamW update of each kind
 * (bitsandbytes' blockwise 8-bit kernel, bnb's 32-bit kernel, PyTorch's AdamW) with the CPU
 * op's bits, the f64 sum of squares of gradient clipping (deterministic, but summed in another
 * order than the CPU), f32 scaling (the CPU's bits) and f32 -> bf16 (core/dtype's bits).
 * Bit-exactness: every float operation of the reference, backend/cpu/ops_optim.c, is written
 * here as an IEEE round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn,
 * __fsqrt_rn), in the same order, which nvcc never fuses into an FMA; the file is also built
 * with -fmad=false -ftz=false -prec-div=true -prec-sqrt=true (CMakeLists.txt) so that nothing
 * else rounds differently or flushes denormals. Per-call scalars (powf bias corrections, the
 * step size, decay factors) come from qlr_adamw_consts_make on the host, the function the CPU
 * op calls; the nearest-code search is the shared qlr_adamw8_search. The one known difference:
 * a NaN *generated* by the arithmetic (0·Inf, Inf - Inf: moments that overflowed) is x86's
 * negative default NaN on the CPU and CUDA's positive canonical NaN here, and NaN inputs keep
 * their payload on x86 but not here; finite inputs and the 8-bit kind's non-finite-gradient
 * guard never generate one. Kernels, then launchers/entries; everything on the backend stream. */
#include "backend/cuda/cuda_internal.h"

#include <string.h>

#include "backend/adamw_internal.h"

#define OPT_THREADS 256
static_assert(QLR_ADAMW8_BLOCK == OPT_THREADS, "one thread per element of an 8-bit state block");

/* The two dynamic maps travel as a kernel parameter (2 KiB, no device allocation) and each
 * block copies them to shared memory once. */
typedef struct adamw8_maps {
    float q1[256]; /* qlr_dynmap_signed: m codes */
    float q2[256]; /* qlr_dynmap_unsigned: v codes */
} adamw8_maps;

/* ------------------------------------------------------------------ 8-bit blockwise */

/* One CUDA block per 256-element state block (grid-stride over blocks), one thread per element.
 * Mirrors adamw8_blocks of ops_optim.c step by step; comments there say why. */
__global__ void __launch_bounds__(OPT_THREADS)
adamw8_kernel(float *__restrict__ p, const float *__restrict__ g, uint8_t *__restrict__ code1,
              uint8_t *__restrict__ code2, float *__restrict__ absmax1,
              float *__restrict__ absmax2, int64_t n, int64_t nb, const qlr_adamw_consts k,
              const adamw8_maps maps) {
    __shared__ float q1[256], q2[256];
    __shared__ float red1[OPT_THREADS / 32], red2[OPT_THREADS / 32];
    __shared__ float amax[2];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    q1[tid] = maps.q1[tid];
    q2[tid] = maps.q2[tid];
    __syncthreads();
    for (int64_t b = blockIdx.x; b < nb; b += gridDim.x) {
        const int64_t i = b * QLR_ADAMW8_BLOCK + tid;
        const bool valid = i < n;
        const float old1 = absmax1[b], old2 = absmax2[b]; /* read by all before tid 0 writes */

        /* 1. dequantize with the old scales, update the moments (non-finite g: m = v = 0) */
        const float gj = valid ? g[i] : 0.0f;
        const bool fin = valid && isfinite(gj);
        float m = 0.0f, v = 0.0f;
        if (fin) {
            const float gs = __fmul_rn(gj, k.gnorm_scale);
            float vj = __fmul_rn(q2[code2[i]], old2);
            vj = __fadd_rn(__fmul_rn(vj, k.b2), __fmul_rn(__fmul_rn(k.one_m_b2, gs), gs));
            float mj = __fmul_rn(q1[code1[i]], old1);
            mj = __fadd_rn(__fmul_rn(mj, k.b1), __fmul_rn(k.one_m_b1, gs));
            m = mj;
            v = vj;
        }

        /* 2. new block scales. The CPU's max starts at 0 and fmaxf skips NaN: each lane
         *    contributes max(0, |x|) (never NaN; lanes past n contribute 0), and max is exact
         *    and order-free, so the tree gives the CPU's value. */
        float a1 = fmaxf(0.0f, fabsf(m)), a2 = fmaxf(0.0f, fabsf(v));
        for (int o = 16; o > 0; o >>= 1) {
            a1 = fmaxf(a1, __shfl_xor_sync(0xffffffffu, a1, o));
            a2 = fmaxf(a2, __shfl_xor_sync(0xffffffffu, a2, o));
        }
        if (lane == 0) {
            red1[warp] = a1;
            red2[warp] = a2;
        }
        __syncthreads();
        if (tid == 0) {
            float x1 = red1[0], x2 = red2[0];
            for (int w = 1; w < OPT_THREADS / 32; w++) {
                x1 = fmaxf(x1, red1[w]);
                x2 = fmaxf(x2, red2[w]);
            }
            /* a partial last block: bnb's padding (g = 0, code1 = 128) enters the m max */
            if (n - b * QLR_ADAMW8_BLOCK < QLR_ADAMW8_BLOCK)
                x1 = fmaxf(x1, fabsf(__fadd_rn(__fmul_rn(__fmul_rn(q1[128], old1), k.b1), 0.0f)));
            amax[0] = x1;
            amax[1] = x2;
            absmax1[b] = x1;
            absmax2[b] = x2;
        }
        __syncthreads();
        const float amax1 = amax[0], amax2 = amax[1];

        /* 3. parameter update (finite gradients only), then decoupled weight decay */
        if (fin) {
            float pj = __fadd_rn(
                p[i], __fmul_rn(k.step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), k.c2_eps))));
            if (k.decay_on) pj = __fmul_rn(pj, k.decay);
            p[i] = pj;
        }

        /* 4. requantize with the new scales, bnb's sign fix on the m code */
        if (valid) {
            const float x1 = __fdiv_rn(m, amax1), x2 = __fdiv_rn(v, amax2);
            uint8_t k1 = qlr_adamw8_search(q1, 1, x1);
            if ((signbit(q1[k1]) != 0) != (signbit(m) != 0)) {
                if (m > 0.0f) k1 = (uint8_t)(k1 + 1);
                else k1 = (uint8_t)(k1 - 1);
            }
            code1[i] = k1;
            code2[i] = qlr_adamw8_search(q2, 0, x2);
        }
        __syncthreads(); /* red / amax are reused by the next block */
    }
}

/* ------------------------------------------------------------------ 32-bit kernels */

/* bnb's 32-bit kernel: adamw32_bnb_range of ops_optim.c */
__global__ void adamw32_bnb_kernel(float *__restrict__ p, const float *__restrict__ g,
                                   float *__restrict__ m_, float *__restrict__ v_, int64_t n,
                                   const qlr_adamw_consts k) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float gg = __fmul_rn(k.gnorm_scale, g[i]);
        const float m = __fadd_rn(__fmul_rn(m_[i], k.b1), __fmul_rn(k.one_m_b1, gg));
        const float v = __fadd_rn(__fmul_rn(v_[i], k.b2), __fmul_rn(k.one_m_b2, __fmul_rn(gg, gg)));
        float pp = __fadd_rn(p[i],
                             __fmul_rn(k.step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), k.c2_eps))));
        if (k.decay_on) pp = __fmul_rn(pp, k.decay);
        m_[i] = m;
        v_[i] = v;
        p[i] = pp;
    }
}

/* PyTorch's AdamW: adamw32_torch_range of ops_optim.c (decay first, torch.lerp, addcmul) */
__global__ void adamw32_torch_kernel(float *__restrict__ p, const float *__restrict__ g,
                                     float *__restrict__ m_, float *__restrict__ v_, int64_t n,
                                     const qlr_adamw_consts k) {
    const float w = k.t_lerp_w;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float gg = __fmul_rn(g[i], k.gnorm_scale);
        float pp = __fmul_rn(p[i], k.t_decay);
        float m = m_[i];
        m = (w < 0.5f) ? __fadd_rn(m, __fmul_rn(w, __fsub_rn(gg, m)))
                       : __fsub_rn(gg, __fmul_rn(__fsub_rn(gg, m), __fsub_rn(1.0f, w)));
        const float v = __fadd_rn(__fmul_rn(v_[i], k.b2), __fmul_rn(__fmul_rn(k.t_one_m_b2, gg), gg));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.t_bc2_sqrt), k.eps);
        pp = __fadd_rn(pp, __fdiv_rn(__fmul_rn(k.t_neg_step, m), denom));
        m_[i] = m;
        v_[i] = v;
        p[i] = pp;
    }
}

/* ------------------------------------------------------------------ sum of squares */

/* Sum over the block's threads in a fixed tree (xor butterfly within warps, then the warp sums
 * in warp order): deterministic. Valid in every thread. */
static __device__ double block_sum_f64(double s, double *red) {
    for (int o = 16; o > 0; o >>= 1) s = __dadd_rn(s, __shfl_xor_sync(0xffffffffu, s, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = s;
    __syncthreads();
    double t = red[0];
    for (int w = 1; w < OPT_THREADS / 32; w++) t = __dadd_rn(t, red[w]);
    return t;
}

/* partial[ch] = Σ x[i]² over chunk ch (QLR_SUMSQ_CHUNK values); one block per chunk. Each
 * product of two floats is exact in f64 (48 significant bits); only the additions round. */
__global__ void __launch_bounds__(OPT_THREADS)
sumsq_chunks_kernel(const float *__restrict__ x, int64_t n, int64_t nch, double *__restrict__ partial) {
    __shared__ double red[OPT_THREADS / 32];
    for (int64_t ch = blockIdx.x; ch < nch; ch += gridDim.x) {
        const int64_t i0 = ch * QLR_SUMSQ_CHUNK;
        const int64_t i1 = i0 + QLR_SUMSQ_CHUNK < n ? i0 + QLR_SUMSQ_CHUNK : n;
        double s = 0.0;
        for (int64_t i = i0 + threadIdx.x; i < i1; i += OPT_THREADS) {
            const double xi = (double)x[i];
            s = __dadd_rn(s, __dmul_rn(xi, xi));
        }
        s = block_sum_f64(s, red);
        if (threadIdx.x == 0) partial[ch] = s;
    }
}

/* acc[0] += Σ partial[0..nch), one block, fixed order */
__global__ void __launch_bounds__(OPT_THREADS)
sumsq_finish_kernel(double *acc, const double *__restrict__ partial, int64_t nch) {
    __shared__ double red[OPT_THREADS / 32];
    double s = 0.0;
    for (int64_t c = threadIdx.x; c < nch; c += OPT_THREADS) s = __dadd_rn(s, partial[c]);
    s = block_sum_f64(s, red);
    if (threadIdx.x == 0) acc[0] = __dadd_rn(acc[0], s);
}

/* ------------------------------------------------------------------ scale, f32 -> bf16 */

__global__ void scale_f32_kernel(float *x, float s, int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        x[i] = __fmul_rn(x[i], s);
}

/* core/dtype.h's qlr_f32_to_bf16, bit for bit: round to nearest even on the bits; a NaN keeps
 * its sign and top payload bits and is made quiet (not CUDA's canonical NaN). */
static __device__ __forceinline__ uint16_t f32_to_bf16_bits(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

__global__ void f32_to_bf16_kernel(uint16_t *__restrict__ dst, const float *__restrict__ src,
                                   int64_t n) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = f32_to_bf16_bits(src[i]);
}

/* ------------------------------------------------------------------ entries */

/* Elementwise grids: enough blocks to fill the device several times over, then grid-stride. */
static unsigned elem_grid(const qlr_cuda_impl *im, int64_t n) {
    unsigned b = qlr_cuda_blocks(n, OPT_THREADS), cap = (unsigned)(im->n_sm > 0 ? im->n_sm : 1) * 32u;
    return b < cap ? b : cap;
}

qlr_status qlr_cuda_adamw_step(qlr_backend *be, int kind, float *p, const float *g, void *s1,
                               void *s2, float *absmax1, float *absmax2, int64_t n,
                               const qlr_adamw_hparams *hp, int64_t t) {
    QLR_ASSERT(t >= 1 && n >= 0);
    if (kind != QLR_ADAMW_KIND_TORCH32 && kind != QLR_ADAMW_KIND_BNB32 && kind != QLR_ADAMW_KIND_BNB8)
        return qlr_errorf(QLR_ERR_INVALID, "adamw: unknown optimizer state kind %d", kind);
    if (n == 0) return QLR_OK;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    const qlr_adamw_consts k = qlr_adamw_consts_make(hp, t);
    if (kind == QLR_ADAMW_KIND_BNB8) {
        QLR_ASSERT(s1 && s2 && absmax1 && absmax2);
        adamw8_maps maps;
        memcpy(maps.q1, qlr_dynmap_signed, sizeof maps.q1);
        memcpy(maps.q2, qlr_dynmap_unsigned, sizeof maps.q2);
        const int64_t nb = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
        /* up to 8 resident 256-thread blocks per SM; more state blocks loop */
        const int64_t cap = (int64_t)(im->n_sm > 0 ? im->n_sm : 1) * 8;
        const unsigned grid = (unsigned)(nb < cap ? nb : cap);
        adamw8_kernel<<<grid, OPT_THREADS, 0, im->stream>>>(p, g, (uint8_t *)s1, (uint8_t *)s2,
                                                            absmax1, absmax2, n, nb, k, maps);
    } else if (kind == QLR_ADAMW_KIND_BNB32) {
        adamw32_bnb_kernel<<<elem_grid(im, n), OPT_THREADS, 0, im->stream>>>(p, g, (float *)s1,
                                                                            (float *)s2, n, k);
    } else {
        adamw32_torch_kernel<<<elem_grid(im, n), OPT_THREADS, 0, im->stream>>>(p, g, (float *)s1,
                                                                              (float *)s2, n, k);
    }
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_sum_squares(qlr_backend *be, double *acc, const float *x, int64_t n) {
    QLR_ASSERT(n >= 0);
    if (n == 0) return QLR_OK;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    const int64_t nch = (n + QLR_SUMSQ_CHUNK - 1) / QLR_SUMSQ_CHUNK;
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)nch * sizeof(double), &ws));
    const unsigned grid = (unsigned)(nch < 0x7fffffff ? nch : 0x7fffffff);
    sumsq_chunks_kernel<<<grid, OPT_THREADS, 0, im->stream>>>(x, n, nch, (double *)ws);
    QLR_CK_LAUNCH();
    sumsq_finish_kernel<<<1, OPT_THREADS, 0, im->stream>>>(acc, (const double *)ws, nch);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_scale_f32(qlr_backend *be, float *x, float s, int64_t n) {
    QLR_ASSERT(n >= 0);
    if (n == 0) return QLR_OK;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    scale_f32_kernel<<<elem_grid(im, n), OPT_THREADS, 0, im->stream>>>(x, s, n);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_f32_to_act(qlr_backend *be, void *dst, const float *src, int64_t n) {
    QLR_ASSERT(n >= 0);
    QLR_ASSERT(be->act_dtype == QLR_BF16 && dst != (const void *)src);
    if (n == 0) return QLR_OK;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    f32_to_bf16_kernel<<<elem_grid(im, n), OPT_THREADS, 0, im->stream>>>((uint16_t *)dst, src, n);
    QLR_CK_LAUNCH();
    return QLR_OK;
}
