/* backend/cuda/nf4.cu: NF4 (bitsandbytes layout, spec §1) on the GPU: dequantization to bf16
 * (double-quant aware), the fused decode kernel that reads packed weights directly for a few
 * tokens, and the nf4_linear / nf4_linear_dx / nf4_lm_head ops. For many tokens (prefill,
 * training) the layer's weight is dequantized into the workspace and multiplied by cuBLASLt
 * (f32 accumulation).
 * Absmax reconstruction and code scaling use round-to-nearest multiplies and adds without FMA
 * contraction, so the dequantized values equal quant/nf4.c's before the bf16 rounding. */
#include "backend/cuda/cuda_internal.h"

#include <cuda_fp16.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend/cuda/cuda_backend.h"
}

__constant__ float c_nf4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* The device-side view of a store (pointers on this device). */
struct nf4_dev {
    const uint8_t *codes;
    const uint8_t *aq;    /* [n_blocks] when dq */
    const float *dqa;     /* [n_dq_blocks] when dq */
    const float *am;      /* [n_blocks] when !dq */
    const float *dynmap;  /* [256] */
    float off;
    int dq;
};

static nf4_dev dev_view(qlr_backend *be, const qlr_nf4 *w) {
    nf4_dev d;
    d.codes = w->codes;
    d.aq = w->absmax_q;
    d.dqa = w->dq_absmax;
    d.am = w->absmax;
    d.dynmap = qlr_cuda_im(be)->d_dynmap;
    d.off = w->dq_offset;
    d.dq = w->dq;
    return d;
}

/* The raw loads behind block b's absmax, issued before anything uses them: a warp issues its
 * loads in order and stalls at the first instruction that needs a result, so looking up the
 * dynamic map right after loading the code would cost one memory latency per row. */
struct absmax_raw {
    uint32_t q;
    float d;
};
__device__ __forceinline__ absmax_raw absmax_load(const nf4_dev &w, int64_t b) {
    absmax_raw r;
    if (!w.dq) {
        r.q = 0;
        r.d = __ldg(w.am + b);
    } else {
        r.q = __ldg(w.aq + b);
        r.d = __ldg(w.dqa + (b >> 8));
    }
    return r;
}
__device__ __forceinline__ float absmax_decode(const nf4_dev &w, const float *dynmap, absmax_raw r) {
    if (!w.dq) return r.d;
    return __fadd_rn(__fmul_rn(dynmap[r.q], r.d), w.off);
}

/* First-level absmax of block b: dynmap[q] * nested + offset (no FMA, as the host code). */
__device__ __forceinline__ float block_absmax(const nf4_dev &w, const float *dynmap, int64_t b) {
    if (!w.dq) return __ldg(w.am + b);
    return __fadd_rn(__fmul_rn(dynmap[__ldg(w.aq + b)], __ldg(w.dqa + (b >> 8))), w.off);
}

/* ---- dequantization ---- */

/* Threads [0, n16) each expand 8 code bytes (16 elements, one 64-block) into two 16-byte
 * stores; threads [n16, n16 + rem) each do one trailing element. out [n] bf16. */
__global__ void nf4_dequant_kernel(nf4_dev w, __nv_bfloat16 *out, int64_t n) {
    /* a shared copy of the table: lanes reading different codes would serialise on the
     * constant cache, but hit 16 distinct banks here */
    __shared__ float t[16];
    if (threadIdx.x < 16) t[threadIdx.x] = c_nf4[threadIdx.x];
    __syncthreads();
    int64_t n16 = n >> 4;
    int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g < n16) {
        int64_t e0 = g << 4;
        uint2 c = __ldg((const uint2 *)(w.codes + (e0 >> 1)));
        float a = block_absmax(w, w.dynmap, e0 >> 6);
        uint32_t cw[2] = {c.x, c.y};
        __align__(16) __nv_bfloat162 v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            uint32_t byte = (cw[j >> 2] >> ((j & 3) * 8)) & 0xff;
            v[j] = __floats2bfloat162_rn(__fmul_rn(t[byte >> 4], a), __fmul_rn(t[byte & 15], a));
        }
        uint4 *o = (uint4 *)(out + e0);
        o[0] = *(uint4 *)&v[0];
        o[1] = *(uint4 *)&v[4];
    } else if (g < n16 + (n & 15)) {
        int64_t e = (n16 << 4) + (g - n16);
        float a = block_absmax(w, w.dynmap, e >> 6);
        uint8_t byte = w.codes[e >> 1];
        int code = (e & 1) ? (byte & 15) : (byte >> 4);
        out[e] = __float2bfloat16_rn(__fmul_rn(t[code], a));
    }
}

static qlr_status dequant_launch(qlr_backend *be, __nv_bfloat16 *out, const qlr_nf4 *w) {
    int64_t n = w->rows * w->cols;
    if (n <= 0) return QLR_OK;
    QLR_ASSERT(((uintptr_t)w->codes & 7) == 0 && ((uintptr_t)out & 15) == 0);
    int64_t threads = (n >> 4) + (n & 15);
    nf4_dequant_kernel<<<qlr_cuda_blocks(threads, 256), 256, 0, qlr_cuda_im(be)->stream>>>(
        dev_view(be, w), out, n);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

extern "C" qlr_status qlr_cuda_nf4_dequant(qlr_backend *be, uint16_t *out, const qlr_nf4 *w) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    return dequant_launch(be, (__nv_bfloat16 *)out, w);
}

/* ---- fused decode kernel ----
 * y[t, r] = Σ_c x[t, c] · W[r, c] for M tokens, reading W's packed codes once.
 * Block: 8 warps = WK warps along K × RG warps along rows; a tile is RG × RPW rows; blocks loop
 * over tiles (a persistent grid, so the lookup table below is built once per block). A warp owns
 * RPW consecutive rows of the tile and the K-chunks kg, kg + WK, ... (a chunk is 1024 columns:
 * 32 lanes × 32 columns, one 16-byte load of codes per lane and row; its 32 columns lie in one
 * 64-block because cols is a multiple of 32). The lane keeps its chunk's x in registers (f32)
 * and streams RPW rows with their loads issued together. A byte (two codes) becomes two NF4
 * values through a shared table of f16 pairs (f16 holds the NF4 values to 2^-12; bf16 would
 * round them to 2^-9) replicated once per lane, so lookups never conflict on a bank: 2 bytes of
 * shared-memory traffic per weight. Partial sums meet in shared memory. */
#define GEMV_WARPS 8
#define GEMV_RPW 8

template <int M>
__global__ void __launch_bounds__(256) nf4_gemv_kernel(nf4_dev w, const __nv_bfloat16 *__restrict__ x,
                                                       __nv_bfloat16 *__restrict__ y,
                                                       const float *__restrict__ bias, int rows,
                                                       int cols, int n_tok, int wk) {
    __shared__ __half2 tab[256 * 32];
    __shared__ float dyn[256];
    __shared__ float part[GEMV_WARPS][GEMV_WARPS * GEMV_RPW][M];
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    for (int i = tid; i < 256 * 32; i += 256) {
        int b = i >> 5;
        tab[i] = __floats2half2_rn(c_nf4[b >> 4], c_nf4[b & 15]);
    }
    dyn[tid] = w.dynmap[tid];
    __syncthreads();

    int rg_n = GEMV_WARPS / wk;
    int kg = warp % wk, rg = warp / wk;
    int rows_per_tile = rg_n * GEMV_RPW;
    int n_tiles = (rows + rows_per_tile - 1) / rows_per_tile;
    int kc = (cols + 1023) >> 10;
    const __half2 *mytab = tab + lane;

    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        int row0 = tile * rows_per_tile + rg * GEMV_RPW;
        float acc[GEMV_RPW][M];
#pragma unroll
        for (int i = 0; i < GEMV_RPW; i++)
#pragma unroll
            for (int m = 0; m < M; m++) acc[i][m] = 0.0f;
        for (int c = kg; c < kc; c += wk) {
            int col = (c << 10) + (lane << 5);
            if (col >= cols) continue;
            uint4 q[GEMV_RPW];
            absmax_raw ar[GEMV_RPW];
            float a[GEMV_RPW];
#pragma unroll
            for (int i = 0; i < GEMV_RPW; i++) {
                int r = row0 + i < rows ? row0 + i : rows - 1; /* clamped: loads stay in bounds */
                int64_t e = (int64_t)r * cols + col;
                q[i] = __ldg((const uint4 *)(w.codes + (e >> 1)));
                ar[i] = absmax_load(w, e >> 6);
            }
#pragma unroll
            for (int i = 0; i < GEMV_RPW; i++)
                a[i] = row0 + i < rows ? absmax_decode(w, dyn, ar[i]) : 0.0f;
            float xf[M][32];
#pragma unroll
            for (int m = 0; m < M; m++) {
                if (m < n_tok) {
                    const uint4 *xp = (const uint4 *)(x + (int64_t)m * cols + col);
#pragma unroll
                    for (int j = 0; j < 4; j++) {
                        uint4 u = __ldg(xp + j);
                        uint32_t uu[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                        for (int h = 0; h < 4; h++) {
                            xf[m][j * 8 + h * 2] = __uint_as_float(uu[h] << 16);
                            xf[m][j * 8 + h * 2 + 1] = __uint_as_float(uu[h] & 0xffff0000u);
                        }
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 32; j++) xf[m][j] = 0.0f;
                }
            }
#pragma unroll
            for (int i = 0; i < GEMV_RPW; i++) {
                uint32_t qq[4] = {q[i].x, q[i].y, q[i].z, q[i].w};
                float s[M];
#pragma unroll
                for (int m = 0; m < M; m++) s[m] = 0.0f;
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    uint32_t byte = (qq[j >> 2] >> ((j & 3) * 8)) & 0xff;
                    float2 v = __half22float2(mytab[byte << 5]);
#pragma unroll
                    for (int m = 0; m < M; m++) {
                        s[m] = fmaf(v.x, xf[m][2 * j], s[m]);
                        s[m] = fmaf(v.y, xf[m][2 * j + 1], s[m]);
                    }
                }
#pragma unroll
                for (int m = 0; m < M; m++) acc[i][m] = fmaf(s[m], a[i], acc[i][m]);
            }
        }
#pragma unroll
        for (int i = 0; i < GEMV_RPW; i++)
#pragma unroll
            for (int m = 0; m < M; m++) {
                float v = acc[i][m];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0) part[kg][rg * GEMV_RPW + i][m] = v;
            }
        __syncthreads();
        for (int idx = tid; idx < rows_per_tile * M; idx += 256) {
            int lr = idx / M, m = idx % M;
            int r = tile * rows_per_tile + lr;
            if (r >= rows || m >= n_tok) continue;
            float v = 0.0f;
            for (int k = 0; k < wk; k++) v += part[k][lr][m];
            if (bias) v += bias[r];
            y[(int64_t)m * rows + r] = __float2bfloat16_rn(v);
        }
        __syncthreads();
    }
}

/* ---- fused decode kernel on tensor cores ----
 * The same product through mma.sync m16n8k16 (bf16 in, f32 accumulate), for 1..64 tokens:
 * a warp owns 16 weight rows (A) and multiplies them by up to 8 tokens per MMA (B), NG token
 * groups reusing each decoded A fragment. Lane (g = lane/4, t = lane%4) loads 16 bytes (32
 * columns, one 64-block) of rows g and g + 8 and 32 columns of x for token g of each group.
 * The k order inside an MMA does not change the sum, so the lane's own 32 columns serve as its
 * fragment columns: in step s (0..7) its bytes 2s and 2s+1 are the A pairs (2t, 2t+1) and
 * (2t+8, 2t+9) and x words 2s, 2s+1 the matching B pairs, so neither operand is shuffled.
 * A byte becomes a bf16 pair through a per-lane replicated shared table and is scaled by the
 * block's absmax with one bf16x2 multiply (so weights carry bf16 rounding twice: ~2^-8, like
 * the dequantize + GEMM path). Warps of a block split K; partial tiles meet in shared memory. */
#define MMA_WARPS 8

__device__ __forceinline__ void mma_bf16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t bmul2(uint32_t t, __nv_bfloat162 s) {
    __nv_bfloat162 v = __hmul2(*(const __nv_bfloat162 *)&t, s);
    return *(uint32_t *)&v;
}

template <int NG>
__global__ void __launch_bounds__(MMA_WARPS * 32, 2) nf4_mma_kernel(nf4_dev w,
                                                                 const __nv_bfloat16 *__restrict__ x,
                                                                 __nv_bfloat16 *__restrict__ y,
                                                                 const float *__restrict__ bias,
                                                                 int rows, int cols, int n_tok) {
    constexpr int U = NG >= 4 ? 1 : 4 / NG; /* K-chunks whose loads are in flight together */
    __shared__ uint32_t tab[256 * 32];
    __shared__ float dyn[256];
    __shared__ float part[NG * 8][16]; /* [token][row of the tile], summed over the warps */
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
    for (int i = tid; i < 256 * 32; i += MMA_WARPS * 32) {
        int b = i >> 5;
        __nv_bfloat162 v = __floats2bfloat162_rn(c_nf4[b >> 4], c_nf4[b & 15]);
        tab[i] = *(uint32_t *)&v;
    }
    dyn[tid] = w.dynmap[tid];
    __syncthreads();
    const uint32_t *mytab = tab + lane;
    int n_tiles = (rows + 15) >> 4;
    int kc = (cols + 127) >> 7; /* 128-column chunks */
    for (int tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
        int ra = tile * 16 + g, rb = ra + 8;
        for (int i = tid; i < NG * 8 * 16; i += MMA_WARPS * 32) part[i >> 4][i & 15] = 0.0f;
        __syncthreads();
        float acc[NG][4];
#pragma unroll
        for (int q = 0; q < NG; q++) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.0f;
        for (int c0 = warp; c0 < kc; c0 += MMA_WARPS * U) {
            uint4 qa[U], qb[U];
            absmax_raw ara[U], arb[U];
            __nv_bfloat162 sa[U], sb[U];
            uint4 xv[U][NG][4];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int col = ((c0 + u * MMA_WARPS) << 7) + (t << 5);
                bool kin = (c0 + u * MMA_WARPS) < kc && col < cols;
                qa[u] = qb[u] = make_uint4(0, 0, 0, 0);
                ara[u].q = arb[u].q = 0;
                ara[u].d = arb[u].d = 0.0f;
                if (kin && ra < rows) {
                    int64_t e = (int64_t)ra * cols + col;
                    qa[u] = __ldg((const uint4 *)(w.codes + (e >> 1)));
                    ara[u] = absmax_load(w, e >> 6);
                }
                if (kin && rb < rows) {
                    int64_t e = (int64_t)rb * cols + col;
                    qb[u] = __ldg((const uint4 *)(w.codes + (e >> 1)));
                    arb[u] = absmax_load(w, e >> 6);
                }
#pragma unroll
                for (int q = 0; q < NG; q++) {
                    int tok = q * 8 + g;
#pragma unroll
                    for (int j = 0; j < 4; j++) xv[u][q][j] = make_uint4(0, 0, 0, 0);
                    if (kin && tok < n_tok) {
                        const uint4 *xp = (const uint4 *)(x + (int64_t)tok * cols + col);
#pragma unroll
                        for (int j = 0; j < 4; j++) xv[u][q][j] = __ldg(xp + j);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int col = ((c0 + u * MMA_WARPS) << 7) + (t << 5);
                bool kin = (c0 + u * MMA_WARPS) < kc && col < cols;
                float fa = kin && ra < rows ? absmax_decode(w, dyn, ara[u]) : 0.0f;
                float fb = kin && rb < rows ? absmax_decode(w, dyn, arb[u]) : 0.0f;
                sa[u] = __floats2bfloat162_rn(fa, fa);
                sb[u] = __floats2bfloat162_rn(fb, fb);
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                uint32_t wa[4] = {qa[u].x, qa[u].y, qa[u].z, qa[u].w};
                uint32_t wb[4] = {qb[u].x, qb[u].y, qb[u].z, qb[u].w};
#pragma unroll
                for (int s = 0; s < 8; s++) {
                    uint32_t A = wa[s >> 1] >> ((s & 1) * 16), B = wb[s >> 1] >> ((s & 1) * 16);
                    uint32_t a0 = bmul2(mytab[(A & 0xff) << 5], sa[u]);
                    uint32_t a2 = bmul2(mytab[((A >> 8) & 0xff) << 5], sa[u]);
                    uint32_t a1 = bmul2(mytab[(B & 0xff) << 5], sb[u]);
                    uint32_t a3 = bmul2(mytab[((B >> 8) & 0xff) << 5], sb[u]);
#pragma unroll
                    for (int q = 0; q < NG; q++) {
                        const uint32_t *xw = (const uint32_t *)&xv[u][q][0];
                        mma_bf16(acc[q], a0, a1, a2, a3, xw[2 * s], xw[2 * s + 1]);
                    }
                }
            }
        }
        /* D[row][token]: c0,c1 = row g, tokens 2t, 2t+1; c2,c3 = row g + 8. The warps add their
         * partial sums one after another in warp order (not with atomics), so the result is
         * bitwise the same on every run; within a warp every lane owns distinct cells. */
        for (int wi = 0; wi < MMA_WARPS; wi++) {
            if (warp == wi) {
#pragma unroll
                for (int q = 0; q < NG; q++) {
                    part[q * 8 + 2 * t][g] += acc[q][0];
                    part[q * 8 + 2 * t + 1][g] += acc[q][1];
                    part[q * 8 + 2 * t][g + 8] += acc[q][2];
                    part[q * 8 + 2 * t + 1][g + 8] += acc[q][3];
                }
            }
            __syncthreads();
        }
        for (int idx = tid; idx < NG * 8 * 16; idx += MMA_WARPS * 32) {
            int tok = idx >> 4, lr = idx & 15, r = tile * 16 + lr;
            if (tok >= n_tok || r >= rows) continue;
            float v = part[tok][lr];
            if (bias) v += bias[r];
            y[(int64_t)tok * rows + r] = __float2bfloat16_rn(v);
        }
        __syncthreads();
    }
}

template <int NG>
static void mma_launch(qlr_backend *be, const nf4_dev &d, const __nv_bfloat16 *x, __nv_bfloat16 *y,
                       const float *bias, int rows, int cols, int n_tok) {
    int tiles = (rows + 15) / 16;
    static int per_sm = 0;
    if (!per_sm) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, nf4_mma_kernel<NG>,
                                                          MMA_WARPS * 32, 0) != cudaSuccess ||
            per_sm < 1)
            per_sm = 1;
    }
    int blocks = qlr_cuda_im(be)->n_sm * per_sm;
    if (blocks > tiles) blocks = tiles;
    nf4_mma_kernel<NG><<<blocks, MMA_WARPS * 32, 0, qlr_cuda_im(be)->stream>>>(d, x, y, bias, rows,
                                                                               cols, n_tok);
}

static qlr_status mma_linear(qlr_backend *be, __nv_bfloat16 *y, const __nv_bfloat16 *x,
                             const qlr_nf4 *w, const float *bias, int64_t n) {
    nf4_dev d = dev_view(be, w);
    int rows = (int)w->rows, cols = (int)w->cols;
    for (int64_t t0 = 0; t0 < n; t0 += 64) {
        int nt = (int)(n - t0 < 64 ? n - t0 : 64);
        const __nv_bfloat16 *xt = x + t0 * cols;
        __nv_bfloat16 *yt = y + t0 * rows;
        if (nt <= 8) mma_launch<1>(be, d, xt, yt, bias, rows, cols, nt);
        else if (nt <= 16) mma_launch<2>(be, d, xt, yt, bias, rows, cols, nt);
        else if (nt <= 32) mma_launch<4>(be, d, xt, yt, bias, rows, cols, nt);
        else mma_launch<8>(be, d, xt, yt, bias, rows, cols, nt);
        QLR_CK_LAUNCH();
    }
    return QLR_OK;
}

/* ---- n = 1 decode GEMV (the batch-1 hot path) ----
 * y_m = x · W_mᵀ (+ bias_m) for up to 3 matrices sharing x and cols (q/k/v, gate/up) in one
 * launch. Work unit: a group of GEMV1_RPW consecutive rows of one matrix; groups of all matrices
 * are numbered one after another. A block of wk x rg warps owns a contiguous run of G x rg
 * groups: warp (kg, rg) takes 1024-column chunks kg, kg + wk, ... and, for each, its groups
 * rg, rg + rg_n, ...; partial row sums meet in shared memory once, at the end (one barrier per
 * block, none in the loop). The grid never exceeds the resident block count (no second wave).
 * Per chunk a lane converts its 32 x values once to f16 pairs scaled by a power of two (largest
 * |x| of the lane's 32 values scaled into [1, 2), so no f16 overflow and no loss of bf16 bits),
 * then streams rows: a 16-byte code load (32 weights, one 64-block), one shared f16-pair table
 * lookup per byte and one HFMA2 per byte (two accumulators of 8 products each, f16), then the
 * lane's f32 partial = sum * absmax / scale. The next group's code and absmax loads are issued
 * before the current group's math. With `up` set, x = silu(x) * up rounded to bf16 first (the
 * SwiGLU op fused into the down projection). Programmatic dependent launch: the table, the
 * dynamic map and the first group's weight loads are issued before griddepcontrol.wait (weights
 * are never written by the previous kernel); x and y only after it. */
#define GEMV1_RPW 4
#define GEMV1_MAXPART 2048 /* floats of partial sums per block (wk x rows) */

struct gemv1_mat {
    nf4_dev w;
    __nv_bfloat16 *y;
    const float *bias;
    int rows, g0, ng; /* first global group, group count */
};
struct gemv1_args {
    gemv1_mat m[3];
    int nm, cols, kc, wk, rg, G, n_groups;
    const __nv_bfloat16 *x, *up;
};

struct gemv1_ld {
    uint4 q[GEMV1_RPW];
    absmax_raw a[GEMV1_RPW];
};

__device__ __forceinline__ int gemv1_mat_of(const gemv1_args &A, int g) {
    return (A.nm > 2 && g >= A.m[2].g0) ? 2 : (A.nm > 1 && g >= A.m[1].g0) ? 1 : 0;
}

/* Field selection by compare-and-select: a run-time index into the parameter array would copy
 * it to local memory. */
#define GEMV1_SEL(A, mi, f) ((mi) == 2 ? (A).m[2].f : (mi) == 1 ? (A).m[1].f : (A).m[0].f)

__device__ __forceinline__ void gemv1_load(const gemv1_args &A, int g, int col, gemv1_ld &L) {
    int mi = gemv1_mat_of(A, g);
    nf4_dev w;
    w.codes = GEMV1_SEL(A, mi, w.codes);
    w.aq = GEMV1_SEL(A, mi, w.aq);
    w.dqa = GEMV1_SEL(A, mi, w.dqa);
    w.am = GEMV1_SEL(A, mi, w.am);
    w.dq = GEMV1_SEL(A, mi, w.dq);
    int rows = GEMV1_SEL(A, mi, rows);
    int r0 = (g - GEMV1_SEL(A, mi, g0)) * GEMV1_RPW;
#pragma unroll
    for (int i = 0; i < GEMV1_RPW; i++) {
        int r = r0 + i < rows ? r0 + i : rows - 1; /* clamped: loads stay in bounds */
        int64_t e = (int64_t)r * A.cols + col;
        L.q[i] = __ldg((const uint4 *)(w.codes + (e >> 1)));
        L.a[i] = absmax_load(w, e >> 6);
    }
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + expf(-g)); }

/* A lane's 32 columns of x (from col; zeros when !act) as 16 f16 pairs scaled by a power of two
 * that puts the largest |x| into [1, 2) (no f16 overflow, no loss of bf16 bits); with up, x is
 * silu(x) · up rounded to bf16 first (the SwiGLU op fused into the down projection). Returns the
 * inverse scale. */
__device__ __forceinline__ float gemv_x_f16(const __nv_bfloat16 *x, const __nv_bfloat16 *upv, int col,
                                            bool act, __half2 xh[16]) {
    uint32_t xw[16];
    const uint4 *xp = (const uint4 *)(x + col);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        uint4 u = act ? __ldg(xp + j) : make_uint4(0, 0, 0, 0);
        xw[4 * j] = u.x, xw[4 * j + 1] = u.y, xw[4 * j + 2] = u.z, xw[4 * j + 3] = u.w;
    }
    if (upv) {
        const uint4 *up = (const uint4 *)(upv + col);
        uint32_t uw[16];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            uint4 u = act ? __ldg(up + j) : make_uint4(0, 0, 0, 0);
            uw[4 * j] = u.x, uw[4 * j + 1] = u.y, uw[4 * j + 2] = u.z, uw[4 * j + 3] = u.w;
        }
#pragma unroll
        for (int j = 0; j < 16; j++) {
            float g0 = __uint_as_float(xw[j] << 16), g1 = __uint_as_float(xw[j] & 0xffff0000u);
            float u0 = __uint_as_float(uw[j] << 16), u1 = __uint_as_float(uw[j] & 0xffff0000u);
            __nv_bfloat162 s = __floats2bfloat162_rn(silu_f(g0) * u0, silu_f(g1) * u1);
            xw[j] = *(uint32_t *)&s;
        }
    }
    uint32_t mx = 0;
#pragma unroll
    for (int j = 0; j < 16; j++) mx = __vmaxu2(mx, xw[j] & 0x7fff7fffu);
    mx = max(mx >> 16, mx & 0xffffu);
    int E = (int)(mx >> 7); /* biased exponent of the largest |x| (255: inf/nan) */
    E = E < 1 ? 1 : (E > 253 ? 253 : E);
    float scale = __int_as_float((254 - E) << 23);
#pragma unroll
    for (int j = 0; j < 16; j++)
        xh[j] = __floats2half2_rn(__uint_as_float(xw[j] << 16) * scale,
                                  __uint_as_float(xw[j] & 0xffff0000u) * scale);
    return __int_as_float(E << 23);
}

/* Warp reduce-scatter of four per-lane row values: lanes with (lane & 7) == 0 end with the
 * warp's sum of row (lane >> 3) & 3 (a fixed order: bitwise reproducible). */
__device__ __forceinline__ float warp_rs4(const float v[4], int lane) {
    const bool hi16 = lane & 16, hi8 = lane & 8;
    float k0 = hi16 ? v[2] : v[0], k1 = hi16 ? v[3] : v[1];
    float s0 = hi16 ? v[0] : v[2], s1 = hi16 ? v[1] : v[3];
    k0 += __shfl_xor_sync(0xffffffffu, s0, 16);
    k1 += __shfl_xor_sync(0xffffffffu, s1, 16);
    float kk = hi8 ? k1 : k0, ss = hi8 ? k0 : k1;
    kk += __shfl_xor_sync(0xffffffffu, ss, 8);
    kk += __shfl_xor_sync(0xffffffffu, kk, 4);
    kk += __shfl_xor_sync(0xffffffffu, kk, 2);
    kk += __shfl_xor_sync(0xffffffffu, kk, 1);
    return kk;
}

template <int MINB>
__global__ void __launch_bounds__(256, MINB) nf4_gemv1_kernel(gemv1_args A) {
    __shared__ __align__(16) __half2 tab[256 * 32];
    __shared__ float dyn[256];
    __shared__ float part[GEMV1_MAXPART];
    qlr_pdl_trigger();
    int nthr = blockDim.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    /* table: entry b (two codes) replicated once per lane; 16-byte stores */
    for (int i = tid; i < 256 * 8; i += nthr) {
        int b = i >> 3;
        __half2 v = __floats2half2_rn(c_nf4[b >> 4], c_nf4[b & 15]);
        uint32_t u = *(uint32_t *)&v;
        ((uint4 *)tab)[i] = make_uint4(u, u, u, u);
    }
    for (int i = tid; i < 256; i += nthr) dyn[i] = A.m[0].w.dynmap[i];
    int rows_blk = A.G * A.rg * GEMV1_RPW;
    for (int i = tid; i < A.wk * rows_blk; i += nthr) part[i] = 0.0f;
    int kg = warp % A.wk, rgi = warp / A.wk;
    int gb0 = blockIdx.x * A.G * A.rg; /* first group of the block */
    /* first group's weights before the dependency wait */
    gemv1_ld cur;
    int c0 = kg, g_first = gb0 + rgi;
    /* lanes past the end of a partial last chunk (cols % 1024 != 0) stay in the loop, for the
     * full-warp shuffles: their x is 0 and their loads read column 0 */
    int col0 = (c0 << 10) + (lane << 5);
    bool have = g_first < A.n_groups && c0 < A.kc; /* warp-uniform */
    if (have) gemv1_load(A, g_first, col0 < A.cols ? col0 : 0, cur);
    qlr_pdl_wait();
    __syncthreads();
    const __half2 *mytab = tab + lane;
    for (int c = kg; c < A.kc; c += A.wk) {
        int col = (c << 10) + (lane << 5);
        bool act = col < A.cols; /* cols % 32 == 0: a lane's 32 columns are whole or absent */
        if (!act) col = 0;
        /* x chunk -> 16 scaled f16 pairs */
        __half2 xh[16];
        float inv = gemv_x_f16(A.x, A.up, col, act, xh);
        if (c != c0) {
            have = gb0 + rgi < A.n_groups;
            if (have) gemv1_load(A, gb0 + rgi, col, cur);
        }
        for (int j = 0; j < A.G; j++) {
            int lg = rgi + j * A.rg, g = gb0 + lg;
            if (!have) break;
            gemv1_ld nxt;
            int gn = g + A.rg;
            bool hn = j + 1 < A.G && gn < A.n_groups;
            if (hn) gemv1_load(A, gn, col, nxt);
            int mi = gemv1_mat_of(A, g);
            float v[GEMV1_RPW];
#pragma unroll
            for (int i = 0; i < GEMV1_RPW; i++) {
                uint32_t qq[4] = {cur.q[i].x, cur.q[i].y, cur.q[i].z, cur.q[i].w};
                __half2 s0 = __float2half2_rn(0.0f), s1 = s0;
#pragma unroll
                for (int b = 0; b < 16; b += 2) {
                    uint32_t b0 = (qq[b >> 2] >> ((b & 3) * 8)) & 0xff;
                    uint32_t b1 = (qq[b >> 2] >> (((b + 1) & 3) * 8)) & 0xff;
                    s0 = __hfma2(mytab[b0 << 5], xh[b], s0);
                    s1 = __hfma2(mytab[b1 << 5], xh[b + 1], s1);
                }
                float2 f = __half22float2(__hadd2(s0, s1));
                float a = GEMV1_SEL(A, mi, w.dq)
                              ? __fadd_rn(__fmul_rn(dyn[cur.a[i].q], cur.a[i].d), GEMV1_SEL(A, mi, w.off))
                              : cur.a[i].d;
                v[i] = (f.x + f.y) * (a * inv);
            }
            float kk = warp_rs4(v, lane);
            if ((lane & 7) == 0) part[kg * rows_blk + lg * GEMV1_RPW + (lane >> 3)] += kk;
            if (!hn) break;
            cur = nxt;
        }
    }
    __syncthreads();
    for (int lr = tid; lr < rows_blk; lr += nthr) {
        int g = gb0 + lr / GEMV1_RPW;
        if (g >= A.n_groups) break;
        int mi = gemv1_mat_of(A, g);
        int r = (g - GEMV1_SEL(A, mi, g0)) * GEMV1_RPW + lr % GEMV1_RPW;
        if (r >= GEMV1_SEL(A, mi, rows)) continue;
        float s = 0.0f;
        for (int k = 0; k < A.wk; k++) s += part[k * rows_blk + lr];
        const float *bias = GEMV1_SEL(A, mi, bias);
        if (bias) s += bias[r];
        GEMV1_SEL(A, mi, y)[r] = __float2bfloat16_rn(s);
    }
}

/* ---- n = 1 streaming GEMV (variant 4, the default where it applies; sm_90) ----
 * The kernels above keep each warp's next rows in registers, one group ahead, so a multiprocessor
 * has ~32 KB of weight loads in flight: less than the bandwidth-latency product of HBM3 under load
 * (~3 TB/s x ~2 us / 132 SMs ~ 45 KB). This one streams the weights through shared memory with
 * the bulk copy engine: tiles of ~32 KB of codes (whole consecutive rows of one matrix: code
 * bytes, their absmax bytes and 8 second-level floats around them) in GS_STAGES stages, each
 * completing on its own mbarrier, GS_STAGES - 1 tiles in flight per block. A producer warp
 * (after the compute warps) issues the three copies per tile and adds the previous tile's warp
 * sums into y, so the compute warps only compute and no serial work sits on the per-tile
 * barrier. One block of up to 512 compute threads + 32 per SM, tiles dealt round-robin over a
 * grid of at most one block per SM. Thread t owns column
 * units (32 columns) u = t % TU (+ TU) for the whole launch, so its x (scaled f16 pairs, as in
 * the kernel above) is converted once, and takes four items per tile: rows p, p + P, p + 2P,
 * p + 3P of its unit (NU = 1), or rows p, p + 1 of both units (NU = 2, P = 1), all in flight
 * together. A code byte becomes an f16 pair through a per-lane table with entries 256 B apart, so
 * one byte_perm of the code word and the lane offset gives the address (PRMT, LDS, HFMA2 per
 * byte). Warp sums go to shared memory; after the next tile's barrier a producer lane per row
 * adds its TU / 32 warp sums in a fixed order (bitwise reproducible) and writes y (bf16) or yf
 * (f32).
 * Weights are requested before griddepcontrol.wait, x read after. Needs cols % 1024 == 0 (each
 * warp within one row), cols <= 32768, one absmax form per launch, 16-byte aligned arrays and
 * stores from qlr_backend_nf4_upload (the padded second-level table). */
#define GS_THREADS 512
#define GS_TAB 65536
#define GS_HDR 1152 /* dynamic map (1 KB) + mbarriers */
#define GS_STAGES 4
#define GS_MAXSTAGE ((32768 + 4096 + 32 + 127) & ~127) /* codes + f32 absmax (no double quant) + dq floats, as stage_bytes rounds */

struct gs_mat {
    const uint8_t *codes, *aq;
    const float *dqa, *am;
    float off;
    __nv_bfloat16 *y;
    float *yf;
    const float *bias;
    int rows, t0; /* first global tile */
};
struct gs_args {
    gs_mat m[3];
    int nm, cols, rt, tu, p, n_tiles, stage_bytes, am_region;
    const __nv_bfloat16 *x, *up;
    const float *dynmap;
};

__device__ __forceinline__ unsigned gs_smem(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ int gs_mat_of(const gs_args &A, int j) {
    return (A.nm > 2 && j >= A.m[2].t0) ? 2 : (A.nm > 1 && j >= A.m[1].t0) ? 1 : 0;
}
#define GS_SEL(A, mi, f) ((mi) == 2 ? (A).m[2].f : (mi) == 1 ? (A).m[1].f : (A).m[0].f)

/* First second-level float copied for a tile starting at weight e: 8 floats from a 16-byte
 * boundary, in bounds thanks to the QLR_NF4_DQ_PAD floats after every uploaded table. */
__device__ __forceinline__ int64_t gs_dq0(int64_t e) { return (e >> 14) & ~(int64_t)3; }

/* Tile j -> stage dst, completing on bar (one thread). */
template <int DQ>
__device__ __forceinline__ void gs_issue(const gs_args &A, int j, uint8_t *dst, uint64_t *bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    int mi = gs_mat_of(A, j);
    int rows = GS_SEL(A, mi, rows);
    int64_t r0 = (int64_t)(j - GS_SEL(A, mi, t0)) * A.rt;
    int64_t rv = rows - r0 < A.rt ? rows - r0 : A.rt, cols = A.cols;
    unsigned cb = (unsigned)(rv * cols >> 1), ab = (unsigned)(DQ ? rv * cols >> 6 : rv * cols >> 4);
    unsigned tx = cb + ab + (DQ ? 32u : 0u);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(gs_smem(bar)), "r"(tx)
                 : "memory");
    const void *src[3];
    unsigned off[3] = {0, (unsigned)(A.rt * cols >> 1), (unsigned)(A.rt * cols >> 1) + A.am_region};
    unsigned len[3] = {cb, ab, 32};
    src[0] = GS_SEL(A, mi, codes) + r0 * (cols >> 1);
    if (DQ) {
        src[1] = GS_SEL(A, mi, aq) + r0 * (cols >> 6);
        src[2] = GS_SEL(A, mi, dqa) + gs_dq0(r0 * cols);
    } else {
        src[1] = GS_SEL(A, mi, am) + r0 * (cols >> 6);
    }
#pragma unroll
    for (int i = 0; i < (DQ ? 3 : 2); i++)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(gs_smem(dst + off[i])), "l"(src[i]), "r"(len[i]), "r"(gs_smem(bar))
                     : "memory");
#endif
}

__device__ __forceinline__ void gs_wait(uint64_t *bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned done;
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}"
                     : "=r"(done)
                     : "r"(gs_smem(bar)), "r"(parity)
                     : "memory");
    } while (!done);
#endif
}

/* Row sums of tile j (warp partials in part) -> y. */
__device__ __forceinline__ void gs_write(const gs_args &A, int j, const float *part, int tid) {
    if (tid >= A.rt) return;
    int mi = gs_mat_of(A, j);
    int rows = GS_SEL(A, mi, rows);
    int64_t r = (int64_t)(j - GS_SEL(A, mi, t0)) * A.rt + tid;
    if (r >= rows) return;
    int nwp = A.tu >> 5, w0 = (tid % A.p) * nwp;
    float s = 0.0f;
    for (int w = 0; w < nwp; w++) s += part[(w0 + w) * A.rt + tid];
    const float *bias = GS_SEL(A, mi, bias);
    if (bias) s += bias[r];
    float *yf = GS_SEL(A, mi, yf);
    if (yf) yf[r] = s;
    else GS_SEL(A, mi, y)[r] = __float2bfloat16_rn(s);
}

template <int NU, int DQ>
__global__ void __launch_bounds__(GS_THREADS + 32, 1) nf4_gemv1s_kernel(const __grid_constant__ gs_args A) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) uint8_t gsm[];
    uint8_t *tab = gsm;
    float *dyn = (float *)(gsm + GS_TAB);
    uint64_t *bar = (uint64_t *)(gsm + GS_TAB + 1024);
    uint8_t *stg = gsm + GS_TAB + GS_HDR;
    int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, warp = tid >> 5;
    /* the compute warps, then one producer warp: its lane 0 issues the tile copies and the whole
     * warp adds the previous tile's warp sums into y, off the compute warps' path */
    const int ncomp = A.tu * A.p, nw = ncomp >> 5;
    const bool producer = tid >= ncomp;
    float *part = (float *)(stg + GS_STAGES * A.stage_bytes);
    const int S = GS_STAGES;
    qlr_pdl_trigger();
    int bid = blockIdx.x, G = gridDim.x;
    int nk = bid < A.n_tiles ? (A.n_tiles - 1 - bid) / G + 1 : 0;
    if (producer && lane == 0) {
        for (int i = 0; i < S; i++)
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(gs_smem(bar + i)) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        /* weights first: they never depend on the previous kernel */
        for (int k = 0; k < S - 1 && k < nk; k++) gs_issue<DQ>(A, bid + k * G, stg + k * A.stage_bytes, bar + k);
    }
    for (int i = tid; i < 256 * 32; i += nthr) {
        int b = i >> 5, l = i & 31;
        *(__half2 *)(tab + b * 256 + l * 4) = __floats2half2_rn(c_nf4[b >> 4], c_nf4[b & 15]);
    }
    for (int i = tid; i < 256; i += nthr) dyn[i] = A.dynmap[i];
    qlr_pdl_wait();
    if (producer) {
        for (int k = 0; k < nk; k++) {
            __syncthreads(); /* stage (k - 1) % S is free, part[(k - 1) & 1] complete */
            if (lane == 0 && k + S - 1 < nk)
                gs_issue<DQ>(A, bid + (k + S - 1) * G, stg + ((k + S - 1) % S) * A.stage_bytes,
                             bar + (k + S - 1) % S);
            if (k > 0)
                for (int r = lane; r < A.rt; r += 32)
                    gs_write(A, bid + (k - 1) * G, part + ((k - 1) & 1) * nw * A.rt, r);
        }
        __syncthreads();
        if (nk > 0)
            for (int r = lane; r < A.rt; r += 32)
                gs_write(A, bid + (nk - 1) * G, part + ((nk - 1) & 1) * nw * A.rt, r);
        return;
    }
    int p = tid / A.tu, ut = tid - p * A.tu;
    __half2 xh[NU][16];
    float inv[NU];
#pragma unroll
    for (int i = 0; i < NU; i++) inv[i] = gemv_x_f16(A.x, A.up, (ut + i * A.tu) << 5, true, xh[i]);
    const int cols = A.cols, rb = cols >> 1, ab = cols >> 6;
    const uint32_t lane4 = (uint32_t)lane << 2;
    /* items: (row, unit, x) = (p + iP, ut, 0) for NU = 1; (p + (i >> 1), ut + (i & 1) TU, i & 1)
     * for NU = 2 (P = 1). Their offsets inside a stage are fixed for the launch; rows past a
     * partial last tile read stale stage bytes and are computed but never written. */
    int coff[4], boff[4], eoff[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int row = NU == 1 ? p + i * A.p : p + (i >> 1), u = NU == 1 ? ut : ut + (i & 1) * A.tu;
        coff[i] = row * rb + (u << 4);
        boff[i] = row * ab + (u >> 1);
        eoff[i] = row * cols + (u << 5);
    }
    const bool hi16 = lane & 16, hi8 = lane & 8;
    for (int k = 0; k < nk; k++) {
        __syncthreads(); /* stage (k - 1) % S is free, part[(k - 1) & 1] complete */
        int j = bid + k * G, mi = gs_mat_of(A, j);
        int rows = GS_SEL(A, mi, rows);
        int64_t r0 = (int64_t)(j - GS_SEL(A, mi, t0)) * A.rt;
        int rv = rows - r0 < A.rt ? (int)(rows - r0) : A.rt;
        gs_wait(bar + k % S, (unsigned)(k / S) & 1);
        if (p >= rv) continue; /* warp-uniform: a warp lies in one partition */
        const uint8_t *sc = stg + (k % S) * A.stage_bytes;
        const uint8_t *am8 = sc + A.rt * rb;
        float v[4];
        int e0 = 0, dd = 0;
        float off = 0.0f;
        const float *dqs = (const float *)(am8 + A.am_region);
        if (DQ) {
            int64_t base = r0 * cols;
            e0 = (int)(base & 16383);
            dd = (int)((base >> 14) - gs_dq0(base));
            off = GS_SEL(A, mi, off);
        }
        uint32_t w[4][4];
        float am[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            uint4 q = *(const uint4 *)(sc + coff[i]);
            w[i][0] = q.x, w[i][1] = q.y, w[i][2] = q.z, w[i][3] = q.w;
            if (DQ)
                am[i] = __fadd_rn(__fmul_rn(dyn[am8[boff[i]]], dqs[((e0 + eoff[i]) >> 14) + dd]), off);
            else
                am[i] = ((const float *)am8)[boff[i]];
        }
        __half2 acc[4][2];
#pragma unroll
        for (int i = 0; i < 4; i++) acc[i][0] = acc[i][1] = __float2half2_rn(0.0f);
#pragma unroll
        for (int b = 0; b < 16; b += 2) {
            const uint32_t s0 = 0x5504u | ((b & 3) << 4), s1 = 0x5504u | (((b + 1) & 3) << 4);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const __half2 *xi = xh[NU == 1 ? 0 : (i & 1)];
                __half2 t0 = *(const __half2 *)(tab + __byte_perm(w[i][b >> 2], lane4, s0));
                __half2 t1 = *(const __half2 *)(tab + __byte_perm(w[i][b >> 2], lane4, s1));
                acc[i][0] = __hfma2(t0, xi[b], acc[i][0]);
                acc[i][1] = __hfma2(t1, xi[b + 1], acc[i][1]);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 f = __half22float2(__hadd2(acc[i][0], acc[i][1]));
            v[i] = (f.x + f.y) * (am[i] * inv[NU == 1 ? 0 : (i & 1)]);
        }
        float *pp = part + (k & 1) * nw * A.rt;
        if (NU == 1) {
            /* four rows: lanes 0 / 8 / 16 / 24 end with rows 0 / 1 / 2 / 3 */
            float kk = warp_rs4(v, lane);
            int ri = (hi16 ? 2 : 0) + (hi8 ? 1 : 0);
            int rl = p + ri * A.p;
            if ((lane & 7) == 0 && rl < rv) pp[warp * A.rt + rl] = kk;
        } else {
            /* two rows of two units each: lanes 0 / 16 end with rows p / p + 1 */
            float a0 = v[0] + v[1], a1 = v[2] + v[3];
            float kk = hi16 ? a1 : a0, ss = hi16 ? a0 : a1;
            kk += __shfl_xor_sync(0xffffffffu, ss, 16);
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) kk += __shfl_xor_sync(0xffffffffu, kk, o);
            int rl = p + (hi16 ? 1 : 0);
            if ((lane & 15) == 0 && rl < rv) pp[warp * A.rt + rl] = kk;
        }
    }
    __syncthreads();
#endif
}

/* Whether the streaming kernel takes these k matrices (equal cols) on this device. */
static int gs_fits(qlr_backend *be, int k, const qlr_nf4 *const *w) {
    static int major = -1; /* one device per process for this check: the bulk copies need sm_90 */
    if (major < 0 && cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                            qlr_cuda_im(be)->device) != cudaSuccess)
        major = 0;
    if (major < 9) return 0;
    int64_t cols = w[0]->cols;
    if (cols % 1024 != 0 || cols > 32768) return 0;
    for (int i = 0; i < k; i++) {
        if (w[i]->cols != cols || w[i]->rows <= 0 || ((uintptr_t)w[i]->codes & 15)) return 0;
        if (w[i]->dq != w[0]->dq) return 0; /* one absmax form per launch */
        if (w[i]->dq ? ((uintptr_t)w[i]->absmax_q & 15) || ((uintptr_t)w[i]->dq_absmax & 15)
                     : ((uintptr_t)w[i]->absmax & 15))
            return 0;
    }
    return 1;
}

template <int NU, int DQ>
static qlr_status gs_launch_t(qlr_backend *be, const gs_args &A, int threads, size_t smem) {
    qlr_cuda_impl *im = qlr_cuda_im(be);
    static int ready = 0; /* per instantiation: the opt-in to more than 48 KB of shared memory */
    if (!ready) {
        QLR_CK(cudaFuncSetAttribute(nf4_gemv1s_kernel<NU, DQ>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)(GS_TAB + GS_HDR + GS_STAGES * GS_MAXSTAGE + 2 * 16 * 64 * 4)));
        ready = 1;
    }
    unsigned blocks = (unsigned)(A.n_tiles < im->n_sm ? A.n_tiles : im->n_sm);
    QLR_CK(qlr_cuda_launch(nf4_gemv1s_kernel<NU, DQ>, dim3(blocks), dim3((unsigned)threads + 32), smem,
                           im->stream, 1, A));
    QLR_CK_LAUNCH();
    return QLR_OK;
}

/* y[i] (bf16) or yf[i] (f32) = x · W[i]ᵀ (+ bias[i]) for k (1..3) matrices that gs_fits. */
static qlr_status gs_launch(qlr_backend *be, int k, __nv_bfloat16 *const *y, float *const *yf,
                            const __nv_bfloat16 *x, const __nv_bfloat16 *up,
                            const qlr_nf4 *const *w, const float *const *bias) {
    gs_args A;
    memset(&A, 0, sizeof A);
    int cols = (int)w[0]->cols, U = cols >> 5, NU = U <= GS_THREADS ? 1 : 2;
    A.nm = k;
    A.cols = cols;
    A.tu = U / NU;
    A.p = GS_THREADS / A.tu;
    A.rt = NU == 1 ? 4 * A.p : 2; /* four items per thread per tile: ~32 KB of codes */
    A.x = x;
    A.up = up;
    A.dynmap = qlr_cuda_im(be)->d_dynmap;
    int nt = 0, dq = w[0]->dq;
    for (int i = 0; i < k; i++) {
        gs_mat &m = A.m[i];
        m.codes = w[i]->codes;
        m.aq = w[i]->absmax_q;
        m.dqa = w[i]->dq_absmax;
        m.am = w[i]->absmax;
        m.off = w[i]->dq_offset;
        m.y = y ? y[i] : NULL;
        m.yf = yf ? yf[i] : NULL;
        m.bias = bias ? bias[i] : NULL;
        m.rows = (int)w[i]->rows;
        m.t0 = nt;
        nt += (m.rows + A.rt - 1) / A.rt;
    }
    A.n_tiles = nt;
    int64_t tile_w = (int64_t)A.rt * cols;
    QLR_ASSERT(A.rt <= 64 && tile_w <= 65536);
    A.am_region = (int)(dq ? tile_w / 64 : tile_w / 16);
    A.stage_bytes = (int)(((tile_w >> 1) + A.am_region + 32 + 127) & ~127);
    QLR_ASSERT(A.stage_bytes <= GS_MAXSTAGE + 128);
    int threads = A.tu * A.p;
    size_t smem = (size_t)GS_TAB + GS_HDR + (size_t)GS_STAGES * A.stage_bytes +
                  2 * (size_t)(threads / 32) * A.rt * 4;
    if (dq)
        return NU == 1 ? gs_launch_t<1, 1>(be, A, threads, smem) : gs_launch_t<2, 1>(be, A, threads, smem);
    return NU == 1 ? gs_launch_t<1, 0>(be, A, threads, smem) : gs_launch_t<2, 0>(be, A, threads, smem);
}

/* One launch for k (1..3) matrices of equal cols at n = 1; every one fusable. */
static qlr_status gemv1_launch(qlr_backend *be, int k, __nv_bfloat16 *const *y,
                               const __nv_bfloat16 *x, const __nv_bfloat16 *up,
                               const qlr_nf4 *const *w, const float *const *bias) {
    qlr_cuda_impl *im = qlr_cuda_im(be);
    if (im->gemv1_variant == 4 && gs_fits(be, k, w)) return gs_launch(be, k, y, NULL, x, up, w, bias);
    gemv1_args A;
    memset(&A, 0, sizeof A);
    A.nm = k;
    A.cols = (int)w[0]->cols;
    A.kc = (A.cols + 1023) >> 10;
    A.x = x;
    A.up = up;
    int ng = 0;
    for (int i = 0; i < k; i++) {
        A.m[i].w = dev_view(be, w[i]);
        A.m[i].y = y[i];
        A.m[i].bias = bias ? bias[i] : NULL;
        A.m[i].rows = (int)w[i]->rows;
        A.m[i].g0 = ng;
        A.m[i].ng = (A.m[i].rows + GEMV1_RPW - 1) / GEMV1_RPW;
        ng += A.m[i].ng;
    }
    A.n_groups = ng;
    /* K split: at most 8 warps; a warp takes ceil(kc / wk) chunks */
    int per = (A.kc + 7) / 8;
    A.wk = (A.kc + per - 1) / per;
    A.rg = 8 / A.wk;
    int threads = A.wk * A.rg * 32;
    /* variant: register cap for 2 (128 registers) or 3 (80) resident blocks per SM */
    int v3 = im->gemv1_variant == 3;
    static int occ[2][9];
    int wi = threads / 32;
    if (!occ[v3][wi]) {
        cudaError_t e = v3 ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ[v3][wi],
                                                                          nf4_gemv1_kernel<3>, threads, 0)
                           : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ[v3][wi],
                                                                          nf4_gemv1_kernel<2>, threads, 0);
        if (e != cudaSuccess || occ[v3][wi] < 1) occ[v3][wi] = 1;
    }
    int slots = im->n_sm * occ[v3][wi];
    int rounds = (ng + A.rg - 1) / A.rg;
    int G = (rounds + slots - 1) / slots;
    int gmax = GEMV1_MAXPART / (A.wk * A.rg * GEMV1_RPW);
    if (G > gmax) G = gmax;
    if (G < 1) G = 1;
    A.G = G;
    unsigned blocks = (unsigned)((rounds + G - 1) / G);
    if (v3)
        QLR_CK(qlr_cuda_launch(nf4_gemv1_kernel<3>, dim3(blocks), dim3((unsigned)threads), 0,
                               im->stream, 1, A));
    else
        QLR_CK(qlr_cuda_launch(nf4_gemv1_kernel<2>, dim3(blocks), dim3((unsigned)threads), 0,
                               im->stream, 1, A));
    QLR_CK_LAUNCH();
    return QLR_OK;
}

static int fusable(const qlr_nf4 *w, const void *x, const void *y) {
    return w->cols % 32 == 0 && ((uintptr_t)w->codes & 15) == 0 && ((uintptr_t)x & 15) == 0 &&
           w->cols <= (1 << 30) && w->rows <= (1 << 30);
}

template <int M>
static void gemv_launch(qlr_backend *be, const nf4_dev &d, const __nv_bfloat16 *x, __nv_bfloat16 *y,
                        const float *bias, int rows, int cols, int n_tok) {
    int kc = (cols + 1023) / 1024, wk = 1;
    while (wk < kc && wk < GEMV_WARPS) wk *= 2;
    int rpt = (GEMV_WARPS / wk) * GEMV_RPW;
    int tiles = (rows + rpt - 1) / rpt;
    static int per_sm = 0; /* resident blocks per SM for this M (same device for the process) */
    if (!per_sm) {
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, nf4_gemv_kernel<M>, 256, 0) !=
                cudaSuccess || per_sm < 1)
            per_sm = 1;
    }
    int blocks = qlr_cuda_im(be)->n_sm * per_sm;
    if (blocks > tiles) blocks = tiles;
    nf4_gemv_kernel<M><<<blocks, 256, 0, qlr_cuda_im(be)->stream>>>(d, x, y, bias, rows, cols, n_tok, wk);
}

static qlr_status fused_linear(qlr_backend *be, __nv_bfloat16 *y, const __nv_bfloat16 *x,
                               const qlr_nf4 *w, const float *bias, int64_t n) {
    if (n == 1) {
        __nv_bfloat16 *ys[1] = {y};
        const qlr_nf4 *ws[1] = {w};
        const float *bs[1] = {bias};
        return gemv1_launch(be, 1, ys, x, NULL, ws, bs);
    }
    nf4_dev d = dev_view(be, w);
    int rows = (int)w->rows, cols = (int)w->cols;
    for (int64_t t0 = 0; t0 < n; t0 += 4) {
        int nt = (int)(n - t0 < 4 ? n - t0 : 4);
        const __nv_bfloat16 *xt = x + t0 * cols;
        __nv_bfloat16 *yt = y + t0 * rows;
        switch (nt) {
        case 1: gemv_launch<1>(be, d, xt, yt, bias, rows, cols, 1); break;
        case 2: gemv_launch<2>(be, d, xt, yt, bias, rows, cols, 2); break;
        case 3: gemv_launch<3>(be, d, xt, yt, bias, rows, cols, 3); break;
        default: gemv_launch<4>(be, d, xt, yt, bias, rows, cols, 4); break;
        }
        QLR_CK_LAUNCH();
    }
    return QLR_OK;
}

/* ---- fallback for shapes cuBLASLt and the fused kernel do not take (row length not a multiple
 * of 8): one warp per output element, per-element decode. Slow; only odd test shapes use it. */
__global__ void nf4_linear_naive_kernel(nf4_dev w, const __nv_bfloat16 *x, __nv_bfloat16 *y,
                                        const float *bias, int64_t rows, int64_t cols, int64_t n) {
    int64_t gw = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gw >= rows * n) return;
    int64_t t = gw / rows, r = gw % rows;
    float s = 0.0f;
    for (int64_t c = lane; c < cols; c += 32) {
        int64_t e = r * cols + c;
        uint8_t byte = w.codes[e >> 1];
        int code = (e & 1) ? (byte & 15) : (byte >> 4);
        float wv = __fmul_rn(c_nf4[code], block_absmax(w, w.dynmap, e >> 6));
        s = fmaf(wv, __bfloat162float(x[t * cols + c]), s);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) y[t * rows + r] = __float2bfloat16_rn(s + (bias ? bias[r] : 0.0f));
}

/* y [n, rows] += bias [rows] */
__global__ void bias_add_kernel(__nv_bfloat16 *y, const float *bias, int64_t rows, int64_t total) {
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) y[i] = __float2bfloat16_rn(__bfloat162float(y[i]) + bias[i % rows]);
}

static qlr_status dequant_gemm_linear(qlr_backend *be, __nv_bfloat16 *y, const __nv_bfloat16 *x,
                                      const qlr_nf4 *w, const float *bias, int64_t n) {
    cudaStream_t st = qlr_cuda_im(be)->stream;
    if (w->cols % 8 != 0) {
        int64_t warps = w->rows * n;
        nf4_linear_naive_kernel<<<qlr_cuda_blocks(warps * 32, 256), 256, 0, st>>>(
            dev_view(be, w), x, y, bias, w->rows, w->cols, n);
        QLR_CK_LAUNCH();
        return QLR_OK;
    }
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)(w->rows * w->cols) * 2, &ws));
    QLR_TRY(dequant_launch(be, (__nv_bfloat16 *)ws, w));
    QLR_TRY(qlr_cuda_gemm(be, y, CUDA_R_16BF, x, ws, n, w->rows, w->cols, w->cols, w->cols,
                          w->rows, 1.0f, 0.0f, 0));
    if (bias) {
        int64_t total = n * w->rows;
        bias_add_kernel<<<qlr_cuda_blocks(total, 256), 256, 0, st>>>(y, bias, w->rows, total);
        QLR_CK_LAUNCH();
    }
    return QLR_OK;
}

extern "C" qlr_status qlr_cuda_nf4_linear_path(qlr_backend *be, void *y, const void *x,
                                               const qlr_nf4 *w, const float *bias, int64_t n,
                                               qlr_cuda_nf4_path path) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    if (n <= 0 || w->rows <= 0) return QLR_OK;
    QLR_ASSERT(w->cols > 0);
    int can_fuse = fusable(w, x, y);
    if (path == QLR_CUDA_NF4_AUTO) {
        qlr_cuda_impl *im = qlr_cuda_im(be);
        path = QLR_CUDA_NF4_DEQUANT_GEMM;
        if (can_fuse)
            for (int i = 0; i < im->n_policy; i++)
                if (n <= im->policy_max_n[i]) {
                    path = (qlr_cuda_nf4_path)im->policy_path[i];
                    break;
                }
    }
    if (path == QLR_CUDA_NF4_FUSED && can_fuse)
        return fused_linear(be, (__nv_bfloat16 *)y, (const __nv_bfloat16 *)x, w, bias, n);
    if (path == QLR_CUDA_NF4_FUSED_MMA && can_fuse)
        return mma_linear(be, (__nv_bfloat16 *)y, (const __nv_bfloat16 *)x, w, bias, n);
    return dequant_gemm_linear(be, (__nv_bfloat16 *)y, (const __nv_bfloat16 *)x, w, bias, n);
}

extern "C" qlr_status qlr_cuda_set_nf4_policy(qlr_backend *be, int n_entries, const int *max_n,
                                              const qlr_cuda_nf4_path *paths) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    if (n_entries < 0 || n_entries > QLR_CUDA_MAX_POLICY)
        return qlr_errorf(QLR_ERR_INVALID, "cuda nf4 policy: %d entries (at most %d)", n_entries,
                          QLR_CUDA_MAX_POLICY);
    for (int i = 0; i < n_entries; i++) {
        im->policy_max_n[i] = max_n[i];
        im->policy_path[i] = (int)paths[i];
    }
    im->n_policy = n_entries;
    return QLR_OK;
}

qlr_status qlr_cuda_nf4_linear(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                               const float *bias, int64_t n) {
    return qlr_cuda_nf4_linear_path(be, y, x, w, bias, n, QLR_CUDA_NF4_AUTO);
}

/* dx [n, cols] = dy [n, rows] · W: dequantize, then a GEMM with W untransposed. */
qlr_status qlr_cuda_nf4_linear_dx(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                  int64_t n) {
    if (n <= 0) return QLR_OK;
    if (w->cols % 8 != 0 || w->rows % 8 != 0)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda nf4_linear_dx: [%lld, %lld] weight: both "
                          "dimensions must be multiples of 8", (long long)w->rows,
                          (long long)w->cols);
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)(w->rows * w->cols) * 2, &ws));
    QLR_TRY(dequant_launch(be, (__nv_bfloat16 *)ws, w));
    return qlr_cuda_gemm(be, dx, CUDA_R_16BF, dy, ws, n, w->cols, w->rows, w->rows, w->cols,
                         w->cols, 1.0f, 0.0f, 1);
}

/* k (1..3) NF4 linears sharing their input: y[i] = x · W[i]ᵀ (+ bias[i]). One launch of the n = 1
 * kernel when n is 1, the AUTO policy picks the fused path at n = 1 and every weight has the
 * same cols and is fusable; otherwise one nf4_linear per matrix (same results as the op). */
qlr_status qlr_cuda_nf4_linear_multi(qlr_backend *be, int k, void *const *y, const void *x,
                                     const qlr_nf4 *const *w, const float *const *bias, int64_t n) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA && k >= 1 && k <= 3);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    int one = n == 1 && im->n_policy > 0 && im->policy_max_n[0] >= 1 &&
              im->policy_path[0] == QLR_CUDA_NF4_FUSED;
    for (int i = 0; i < k && one; i++)
        one = w[i]->cols == w[0]->cols && w[i]->rows > 0 && fusable(w[i], x, y[i]);
    if (one) {
        __nv_bfloat16 *ys[3];
        for (int i = 0; i < k; i++) ys[i] = (__nv_bfloat16 *)y[i];
        return gemv1_launch(be, k, ys, (const __nv_bfloat16 *)x, NULL, w, bias);
    }
    for (int i = 0; i < k; i++)
        QLR_TRY(qlr_cuda_nf4_linear(be, y[i], x, w[i], bias ? bias[i] : NULL, n));
    return QLR_OK;
}

/* y = (silu(gate) · up) · Wᵀ (+ bias). At n = 1 on the fused path one launch (the SwiGLU values
 * rounded to bf16 as the swiglu op does, never stored); otherwise swiglu into gate, then the
 * linear (gate's contents afterwards are unspecified, as the op contract says). */
qlr_status qlr_cuda_swiglu_nf4_linear(qlr_backend *be, void *y, void *gate, const void *up,
                                      const qlr_nf4 *w, const float *bias, int64_t n) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    if (n == 1 && im->n_policy > 0 && im->policy_max_n[0] >= 1 &&
        im->policy_path[0] == QLR_CUDA_NF4_FUSED && w->rows > 0 && fusable(w, gate, y) &&
        ((uintptr_t)up & 15) == 0) {
        __nv_bfloat16 *ys[1] = {(__nv_bfloat16 *)y};
        const qlr_nf4 *ws[1] = {w};
        const float *bs[1] = {bias};
        return gemv1_launch(be, 1, ys, (const __nv_bfloat16 *)gate, (const __nv_bfloat16 *)up, ws,
                            bs);
    }
    QLR_TRY(qlr_cuda_swiglu(be, gate, gate, up, n * w->cols));
    return qlr_cuda_nf4_linear(be, y, gate, w, bias, n);
}

extern "C" void qlr_cuda_set_gemv1_variant(qlr_backend *be, int variant) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    qlr_cuda_im(be)->gemv1_variant = variant == 3 || variant == 4 ? variant : 2;
}

/* logits [vocab] f32 = x [cols] · Wᵀ for an NF4 output projection at n = 1 (serving with a 4-bit
 * lm_head); the streaming kernel's f32 output. */
extern "C" qlr_status qlr_cuda_nf4_logits(qlr_backend *be, float *logits, const void *x,
                                          const qlr_nf4 *w) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    const qlr_nf4 *ws[1] = {w};
    if (!gs_fits(be, 1, ws) || ((uintptr_t)x & 15))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda nf4 logits: [%lld, %lld] weight: needs cols "
                          "a multiple of 1024 (at most 32768) and 16-byte aligned arrays",
                          (long long)w->rows, (long long)w->cols);
    float *yf[1] = {logits};
    return gs_launch(be, 1, NULL, yf, (const __nv_bfloat16 *)x, NULL, ws, NULL);
}

/* The nf4_lm_head op: one token through qlr_cuda_nf4_logits where the shape allows; otherwise
 * dequantize W into the op workspace ([vocab, d] bf16: 1 GiB for Llama 3's lm_head) and the
 * lm_head GEMM. */
qlr_status qlr_cuda_nf4_lm_head(qlr_backend *be, float *logits, const void *x, const qlr_nf4 *w,
                                int64_t n) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    if (n <= 0) return QLR_OK;
    const qlr_nf4 *ws1[1] = {w};
    if (n == 1 && gs_fits(be, 1, ws1) && ((uintptr_t)x & 15) == 0) {
        float *yf[1] = {logits};
        return gs_launch(be, 1, NULL, yf, (const __nv_bfloat16 *)x, NULL, ws1, NULL);
    }
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)(w->rows * w->cols) * 2, &ws));
    QLR_TRY(dequant_launch(be, (__nv_bfloat16 *)ws, w));
    return qlr_cuda_lm_head(be, logits, x, (const uint16_t *)ws, n, w->cols, w->rows);
}
