/* backend/cuda/attention_varlen.cu: causal GQA attention inside packed sequences over the
 * micro-batch's own K/V (training), forward and backward. Token t (query head h) attends tokens
 * start[t]..t with KV head h / (n_heads / n_kv). Flash-attention style on tensor cores (WMMA
 * bf16 16x16x16, f32 accumulation), tiles of 64 tokens, 4 warps per block, each warp owning 16
 * rows of the tile; the memory used beyond the inputs and outputs is O(tokens) (the backward's
 * per-row D, and a recomputed forward when the caller has no out / lse), never O(tokens²).
 *  - forward: one block per (64-query tile, query head); keys from start[first query] to the
 *    last query in 64-key tiles; S = Q·Kᵀ and O in shared memory (f32), an online softmax per
 *    row, P rounded to bf16 for P·V; writes out (bf16) and lse = log-sum-exp of the scaled scores.
 *  - backward, three kernels, no atomics (deterministic): D = rowsum(dO ∘ O); dK/dV with one
 *    block per (64-key tile, KV head) looping over every query head of the group and every query
 *    tile that can see the keys, with dK, dV accumulated in registers; dQ with one block per
 *    (64-query tile, query head) looping over the key tiles as the forward does. Both recompute
 *    P = exp(S · scale - lse) and dS = P ∘ (dP - D), dP = dO·Vᵀ, rounding P and dS to bf16 for
 *    the tensor-core products.
 * A tile whose tokens belong to several sequences masks each row by its own start. Head dims 64
 * and 128; backend/cpu/ops_train.c is the reference.
 * These WMMA kernels are the fallback: by default the op entries below run the register-resident
 * mma.sync kernels of attention_varlen_mma.cu (same contract, same workspace, deterministic);
 * QLR_ATTN_VARLEN=wmma selects these (read at every call, so a test can compare the two). */
#include "backend/cuda/attention_varlen_mma.h"
#include "backend/cuda/cuda_internal.h"

#include <limits.h>
#include <mma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;
using namespace nvcuda;

#define AV_T 64                   /* tokens per tile, queries and keys alike */
#define AV_WARPS 4                /* each warp: 16 rows of a tile */
#define AV_THREADS (AV_WARPS * 32)

/* Shared-memory layout (bytes) for head dim HD. Row pitches are padded (bank spread) and keep
 * every WMMA pointer 32-byte aligned: LDH bf16 tiles of Q, K, V, dO; LDS f32 score tiles; LDP
 * bf16 P / dS tiles; LDO f32 O (forward) or the output staging of the backward. Every section is
 * a multiple of 128 bytes. */
template <int HD> struct av_smem {
    static constexpr int LDH = HD + 8, LDS = AV_T + 4, LDP = AV_T + 8, LDO = HD + 4;
    static constexpr size_t H = (size_t)AV_T * LDH * 2;
    static constexpr size_t S = (size_t)AV_T * LDS * 4;
    static constexpr size_t P = (size_t)AV_T * LDP * 2;
    static constexpr size_t O = (size_t)AV_T * LDO * 4;
    static constexpr size_t ROWS = (size_t)AV_T * 4; /* one int or float per tile row */
    /* forward: Q K V | S | P | O | start m l */
    static constexpr size_t FWD = 3 * H + S + P + O + 3 * ROWS;
    /* backward: K V Q dO | S dP (later the output staging) | P dS | start lse D */
    static constexpr size_t BWD = 4 * H + 2 * S + 2 * P + 3 * ROWS;
    static_assert(O <= 2 * S, "the backward stages dK / dV / dQ in the S and dP tiles");
    static_assert(H % 128 == 0 && S % 128 == 0 && P % 128 == 0 && O % 128 == 0, "alignment");
};

/* Rows [row0, row0 + AV_T) of a [n, heads, HD] bf16 tensor at head h into dst [AV_T][LDH]; rows
 * at or past n become zeros. 16-byte loads (the launcher checks the alignment). */
template <int HD>
__device__ __forceinline__ void av_load_tile(bf16 *dst, const bf16 *src, int64_t row0, int64_t n,
                                             int64_t heads, int64_t h) {
    constexpr int C8 = HD / 8, LDH = av_smem<HD>::LDH;
    for (int i = threadIdx.x; i < AV_T * C8; i += AV_THREADS) {
        int r = i / C8, c = i % C8;
        int64_t t = row0 + r;
        uint4 u = make_uint4(0, 0, 0, 0);
        if (t < n) u = __ldg((const uint4 *)(src + (t * heads + h) * HD) + c);
        *(uint4 *)(dst + r * LDH + c * 8) = u;
    }
}

/* Warp w: S[16w..16w+15][0..AV_T) (f32, pitch LDS) = A[16w.., :] · B[0..AV_T, :]ᵀ, A and B
 * [AV_T][LDH] bf16 (Q·Kᵀ, dO·Vᵀ). */
template <int HD>
__device__ __forceinline__ void av_warp_abt(float *S, const bf16 *A, const bf16 *B, int warp) {
    constexpr int LDH = av_smem<HD>::LDH, LDS = av_smem<HD>::LDS;
#pragma unroll
    for (int nt = 0; nt < AV_T / 16; nt++) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
            wmma::load_matrix_sync(fa, A + warp * 16 * LDH + kk * 16, LDH);
            wmma::load_matrix_sync(fb, B + nt * 16 * LDH + kk * 16, LDH);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(S + warp * 16 * LDS + nt * 16, acc, LDS, wmma::mem_row_major);
    }
}

/* Writes AV_T rows of an f32 staging tile [AV_T][LDO] as bf16 rows row0.. of a [n, heads, HD]
 * tensor at head h, times `mul` (rows at or past n are skipped). */
template <int HD>
__device__ __forceinline__ void av_store_rows(bf16 *dst, const float *stage, int64_t row0,
                                              int64_t n, int64_t heads, int64_t h, float mul) {
    constexpr int LDO = av_smem<HD>::LDO;
    for (int i = threadIdx.x; i < AV_T * HD / 2; i += AV_THREADS) {
        int r = i / (HD / 2), c = 2 * (i % (HD / 2));
        int64_t t = row0 + r;
        if (t >= n) continue;
        const float *s = stage + r * LDO + c;
        *(__nv_bfloat162 *)(dst + (t * heads + h) * HD + c) =
            __floats2bfloat162_rn(s[0] * mul, s[1] * mul);
    }
}

/* ---- forward ---- */

/* One block per (query tile blockIdx.x, query head blockIdx.y). out [n, n_heads, HD] bf16;
 * lse [n, n_heads] f32 (NULL: not written). */
template <int HD>
__global__ void __launch_bounds__(AV_THREADS)
    av_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                  const int32_t *start, int64_t n, int64_t n_heads, int64_t n_kv, float scale) {
    using L = av_smem<HD>;
    extern __shared__ __align__(128) unsigned char smraw[];
    bf16 *Qs = (bf16 *)smraw, *Ks = (bf16 *)(smraw + L::H), *Vs = (bf16 *)(smraw + 2 * L::H);
    float *Ss = (float *)(smraw + 3 * L::H);
    bf16 *Ps = (bf16 *)(smraw + 3 * L::H + L::S);
    float *Os = (float *)(smraw + 3 * L::H + L::S + L::P);
    int *rstart = (int *)(smraw + 3 * L::H + L::S + L::P + L::O);
    float *mrow = (float *)(rstart + AV_T), *lrow = mrow + AV_T;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t t0 = (int64_t)blockIdx.x * AV_T, h = blockIdx.y;
    const int64_t g = h / (n_heads / n_kv);
    const int64_t t_last = (t0 + AV_T < n ? t0 + AV_T : n) - 1;

    for (int r = tid; r < AV_T; r += AV_THREADS) {
        rstart[r] = t0 + r < n ? start[t0 + r] : INT_MAX; /* INT_MAX: no token, every key masked */
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
    }
    av_load_tile<HD>(Qs, q, t0, n, n_heads, h);
    for (int i = tid; i < AV_T * HD; i += AV_THREADS) Os[(i / HD) * L::LDO + i % HD] = 0.0f;
    const int64_t k_lo = start[t0]; /* the tile's earliest key: start is nondecreasing */
    __syncthreads();

    for (int64_t k0 = k_lo; k0 <= t_last; k0 += AV_T) {
        av_load_tile<HD>(Ks, k, k0, n, n_kv, g);
        av_load_tile<HD>(Vs, v, k0, n, n_kv, g);
        __syncthreads();
        av_warp_abt<HD>(Ss, Qs, Ks, warp);
        __syncwarp();
        /* online softmax over this key tile: two lanes per row, 32 columns each */
        {
            const int r = warp * 16 + (lane >> 1), c0 = (lane & 1) * 32;
            const int64_t t = t0 + r, rs = rstart[r];
            float *srow = Ss + r * L::LDS;
            float mx = -INFINITY;
            for (int c = c0; c < c0 + 32; c++) {
                int64_t key = k0 + c;
                float s = (key >= rs && key <= t) ? srow[c] * scale : -INFINITY;
                srow[c] = s;
                mx = fmaxf(mx, s);
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            const float mold = mrow[r], mnew = fmaxf(mold, mx);
            const float al = mnew == -INFINITY ? 1.0f : expf(mold - mnew);
            float sum = 0.0f;
            bf16 *prow = Ps + r * L::LDP;
            for (int c = c0; c < c0 + 32; c++) {
                float e = srow[c] == -INFINITY ? 0.0f : expf(srow[c] - mnew);
                sum += e;
                prow[c] = __float2bfloat16_rn(e);
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            if (al != 1.0f) {
                float *orow = Os + r * L::LDO + (lane & 1) * (HD / 2);
                for (int d = 0; d < HD / 2; d++) orow[d] *= al;
            }
            __syncwarp(); /* both lanes have read mrow / lrow */
            if ((lane & 1) == 0) {
                mrow[r] = mnew;
                lrow[r] = lrow[r] * al + sum;
            }
        }
        __syncwarp();
        /* O_w [16, HD] += P_w [16, AV_T] · V [AV_T, HD] */
#pragma unroll
        for (int dt = 0; dt < HD / 16; dt++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, Os + warp * 16 * L::LDO + dt * 16, L::LDO,
                                   wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < AV_T / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, Ps + warp * 16 * L::LDP + kk * 16, L::LDP);
                wmma::load_matrix_sync(fb, Vs + kk * 16 * L::LDH + dt * 16, L::LDH);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(Os + warp * 16 * L::LDO + dt * 16, acc, L::LDO,
                                    wmma::mem_row_major);
        }
        __syncthreads(); /* K, V, S, P are free for the next tile; O and the stats complete */
    }
    for (int i = tid; i < AV_T * HD; i += AV_THREADS) {
        int r = i / HD, d = i % HD;
        int64_t t = t0 + r;
        if (t >= n) continue;
        float l = lrow[r];
        out[(t * n_heads + h) * HD + d] = __float2bfloat16_rn(l > 0.0f ? Os[r * L::LDO + d] / l
                                                                        : 0.0f);
    }
    if (lse)
        for (int r = tid; r < AV_T; r += AV_THREADS)
            if (t0 + r < n) lse[(t0 + r) * n_heads + h] = mrow[r] + logf(lrow[r]);
}

/* ---- backward ---- */

/* D[i] = Σ_d dout[i, d] · out[i, d] over rows i of [rows, hd] (one warp per row; hd even). */
__global__ void av_dsum_kernel(float *D, const bf16 *dout, const bf16 *o, int64_t rows, int hd) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; i < rows; i += warps) {
        const __nv_bfloat162 *a = (const __nv_bfloat162 *)(dout + i * hd);
        const __nv_bfloat162 *b = (const __nv_bfloat162 *)(o + i * hd);
        float s = 0.0f;
        for (int j = lane; j < hd / 2; j += 32) {
            float2 x = __bfloat1622float2(a[j]), y = __bfloat1622float2(b[j]);
            s += x.x * y.x + x.y * y.y;
        }
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) D[i] = s;
    }
}

/* Loads the per-row data of query tile qt0 at head h: the sequence start (INT_MAX past n), the
 * forward's lse and D. */
__device__ __forceinline__ void av_load_rows(int *rstart, float *rlse, float *rD,
                                             const int32_t *start, const float *lse,
                                             const float *D, int64_t qt0, int64_t n,
                                             int64_t n_heads, int64_t h) {
    for (int r = threadIdx.x; r < AV_T; r += AV_THREADS) {
        int64_t t = qt0 + r;
        bool in = t < n;
        rstart[r] = in ? start[t] : INT_MAX;
        rlse[r] = in ? lse[t * n_heads + h] : 0.0f;
        rD[r] = in ? D[t * n_heads + h] : 0.0f;
    }
}

/* Warp w's 16 rows of the (query tile qt0) x (key tile k0) block: from S (raw Q·Kᵀ) and dP
 * (dO·Vᵀ), P = exp(S · scale - lse) (0 where masked) and dS = P ∘ (dP - D), both to bf16 tiles
 * (P only when Ps is not null). Two lanes per row, 32 columns each. */
template <int HD>
__device__ __forceinline__ void av_warp_p_ds(bf16 *Ps, bf16 *dSs, const float *Ss,
                                             const float *dPs, const int *rstart,
                                             const float *rlse, const float *rD, int64_t qt0,
                                             int64_t k0, float scale, int warp, int lane) {
    using L = av_smem<HD>;
    const int r = warp * 16 + (lane >> 1), c0 = (lane & 1) * 32;
    const int64_t t = qt0 + r, rs = rstart[r];
    const float ls = rlse[r], dd = rD[r];
    for (int c = c0; c < c0 + 32; c++) {
        int64_t key = k0 + c;
        float p = (key >= rs && key <= t) ? expf(Ss[r * L::LDS + c] * scale - ls) : 0.0f;
        float ds = p * (dPs[r * L::LDS + c] - dd);
        if (Ps) Ps[r * L::LDP + c] = __float2bfloat16_rn(p);
        dSs[r * L::LDP + c] = __float2bfloat16_rn(ds);
    }
}

/* dK, dV of key tile blockIdx.x at KV head blockIdx.y: loops over the group's query heads and
 * every query tile qt0 = k0, k0 + 64, ... whose first token's sequence starts at or before the
 * tile's last key (start is nondecreasing: later tiles cannot see these keys). Warp w owns key
 * rows 16w..16w+15 of dK and dV (register fragments). dk, dv [n, n_kv, HD] bf16, overwritten. */
template <int HD>
__global__ void __launch_bounds__(AV_THREADS)
    av_bwd_dkdv_kernel(bf16 *dk, bf16 *dv, const bf16 *q, const bf16 *k, const bf16 *v,
                       const bf16 *dout, const float *lse, const float *D, const int32_t *start,
                       int64_t n, int64_t n_heads, int64_t n_kv, float scale) {
    using L = av_smem<HD>;
    extern __shared__ __align__(128) unsigned char smraw[];
    bf16 *Ks = (bf16 *)smraw, *Vs = (bf16 *)(smraw + L::H), *Qs = (bf16 *)(smraw + 2 * L::H);
    bf16 *dOs = (bf16 *)(smraw + 3 * L::H);
    float *Ss = (float *)(smraw + 4 * L::H), *dPs = (float *)(smraw + 4 * L::H + L::S);
    bf16 *Ps = (bf16 *)(smraw + 4 * L::H + 2 * L::S);
    bf16 *dSs = (bf16 *)(smraw + 4 * L::H + 2 * L::S + L::P);
    int *rstart = (int *)(smraw + 4 * L::H + 2 * L::S + 2 * L::P);
    float *rlse = (float *)(rstart + AV_T), *rD = rlse + AV_T;
    float *stage = Ss; /* [AV_T][LDO] f32 over S and dP once the loops are done */

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t k0 = (int64_t)blockIdx.x * AV_T, g = blockIdx.y, G = n_heads / n_kv;
    const int64_t k_last = (k0 + AV_T < n ? k0 + AV_T : n) - 1;

    av_load_tile<HD>(Ks, k, k0, n, n_kv, g);
    av_load_tile<HD>(Vs, v, k0, n, n_kv, g);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dkf[HD / 16], dvf[HD / 16];
#pragma unroll
    for (int dt = 0; dt < HD / 16; dt++) {
        wmma::fill_fragment(dkf[dt], 0.0f);
        wmma::fill_fragment(dvf[dt], 0.0f);
    }
    for (int64_t h = g * G; h < (g + 1) * G; h++) {
        for (int64_t qt0 = k0; qt0 < n && start[qt0] <= k_last; qt0 += AV_T) {
            av_load_tile<HD>(Qs, q, qt0, n, n_heads, h);
            av_load_tile<HD>(dOs, dout, qt0, n, n_heads, h);
            av_load_rows(rstart, rlse, rD, start, lse, D, qt0, n, n_heads, h);
            __syncthreads();
            av_warp_abt<HD>(Ss, Qs, Ks, warp);
            av_warp_abt<HD>(dPs, dOs, Vs, warp);
            __syncwarp();
            av_warp_p_ds<HD>(Ps, dSs, Ss, dPs, rstart, rlse, rD, qt0, k0, scale, warp, lane);
            __syncthreads(); /* every query row of P and dS before the transposed products */
            /* dV_w [16 keys, HD] += Pᵀ · dO, then dK_w += dSᵀ · Q (Pᵀ and dSᵀ read
             * column-major; one product at a time keeps fewer fragments live) */
#pragma unroll
            for (int kk = 0; kk < AV_T / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fp;
                wmma::load_matrix_sync(fp, Ps + kk * 16 * L::LDP + warp * 16, L::LDP);
#pragma unroll
                for (int dt = 0; dt < HD / 16; dt++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fo;
                    wmma::load_matrix_sync(fo, dOs + kk * 16 * L::LDH + dt * 16, L::LDH);
                    wmma::mma_sync(dvf[dt], fp, fo, dvf[dt]);
                }
            }
#pragma unroll
            for (int kk = 0; kk < AV_T / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> fs;
                wmma::load_matrix_sync(fs, dSs + kk * 16 * L::LDP + warp * 16, L::LDP);
#pragma unroll
                for (int dt = 0; dt < HD / 16; dt++) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fq;
                    wmma::load_matrix_sync(fq, Qs + kk * 16 * L::LDH + dt * 16, L::LDH);
                    wmma::mma_sync(dkf[dt], fs, fq, dkf[dt]);
                }
            }
            __syncthreads(); /* Q, dO, P, dS and the row data are free for the next tile */
        }
    }
    /* dK = scale · Σ dSᵀ Q; both staged in f32 over S / dP, then written as bf16 */
#pragma unroll
    for (int dt = 0; dt < HD / 16; dt++)
        wmma::store_matrix_sync(stage + warp * 16 * L::LDO + dt * 16, dkf[dt], L::LDO,
                                wmma::mem_row_major);
    __syncthreads();
    av_store_rows<HD>(dk, stage, k0, n, n_kv, g, scale);
    __syncthreads();
#pragma unroll
    for (int dt = 0; dt < HD / 16; dt++)
        wmma::store_matrix_sync(stage + warp * 16 * L::LDO + dt * 16, dvf[dt], L::LDO,
                                wmma::mem_row_major);
    __syncthreads();
    av_store_rows<HD>(dv, stage, k0, n, n_kv, g, 1.0f);
}

/* dQ of query tile blockIdx.x at query head blockIdx.y: the forward's loop over key tiles
 * start[t0] .. last query; warp w owns query rows 16w..16w+15 of dQ (register fragments) and
 * needs only its own rows of dS. dq [n, n_heads, HD] bf16, overwritten. */
template <int HD>
__global__ void __launch_bounds__(AV_THREADS)
    av_bwd_dq_kernel(bf16 *dq, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,
                     const float *lse, const float *D, const int32_t *start, int64_t n,
                     int64_t n_heads, int64_t n_kv, float scale) {
    using L = av_smem<HD>;
    extern __shared__ __align__(128) unsigned char smraw[];
    bf16 *Ks = (bf16 *)smraw, *Vs = (bf16 *)(smraw + L::H), *Qs = (bf16 *)(smraw + 2 * L::H);
    bf16 *dOs = (bf16 *)(smraw + 3 * L::H);
    float *Ss = (float *)(smraw + 4 * L::H), *dPs = (float *)(smraw + 4 * L::H + L::S);
    bf16 *dSs = (bf16 *)(smraw + 4 * L::H + 2 * L::S + L::P);
    int *rstart = (int *)(smraw + 4 * L::H + 2 * L::S + 2 * L::P);
    float *rlse = (float *)(rstart + AV_T), *rD = rlse + AV_T;
    float *stage = Ss;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int64_t t0 = (int64_t)blockIdx.x * AV_T, h = blockIdx.y;
    const int64_t g = h / (n_heads / n_kv);
    const int64_t t_last = (t0 + AV_T < n ? t0 + AV_T : n) - 1;

    av_load_tile<HD>(Qs, q, t0, n, n_heads, h);
    av_load_tile<HD>(dOs, dout, t0, n, n_heads, h);
    av_load_rows(rstart, rlse, rD, start, lse, D, t0, n, n_heads, h);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> dqf[HD / 16];
#pragma unroll
    for (int dt = 0; dt < HD / 16; dt++) wmma::fill_fragment(dqf[dt], 0.0f);
    const int64_t k_lo = start[t0];
    for (int64_t k0 = k_lo; k0 <= t_last; k0 += AV_T) {
        av_load_tile<HD>(Ks, k, k0, n, n_kv, g);
        av_load_tile<HD>(Vs, v, k0, n, n_kv, g);
        __syncthreads(); /* (first pass: also Q, dO and the row data) */
        av_warp_abt<HD>(Ss, Qs, Ks, warp);
        av_warp_abt<HD>(dPs, dOs, Vs, warp);
        __syncwarp();
        av_warp_p_ds<HD>(nullptr, dSs, Ss, dPs, rstart, rlse, rD, t0, k0, scale, warp, lane);
        __syncwarp();
        /* dQ_w [16, HD] += dS_w [16, AV_T] · K [AV_T, HD] */
#pragma unroll
        for (int kk = 0; kk < AV_T / 16; kk++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fs;
            wmma::load_matrix_sync(fs, dSs + warp * 16 * L::LDP + kk * 16, L::LDP);
#pragma unroll
            for (int dt = 0; dt < HD / 16; dt++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fk;
                wmma::load_matrix_sync(fk, Ks + kk * 16 * L::LDH + dt * 16, L::LDH);
                wmma::mma_sync(dqf[dt], fs, fk, dqf[dt]);
            }
        }
        __syncthreads(); /* K and V are free for the next tile */
    }
#pragma unroll
    for (int dt = 0; dt < HD / 16; dt++)
        wmma::store_matrix_sync(stage + warp * 16 * L::LDO + dt * 16, dqf[dt], L::LDO,
                                wmma::mem_row_major);
    __syncthreads();
    av_store_rows<HD>(dq, stage, t0, n, n_heads, h, scale);
}

/* ---- launchers ---- */

static bool av_aligned(const void *p) { return ((uintptr_t)p & 15) == 0; }

static qlr_status av_check(const char *op, int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd) {
    QLR_ASSERT(n_kv > 0 && n_heads >= n_kv && n_heads % n_kv == 0);
    QLR_ASSERT(n <= (int64_t)INT_MAX && n_heads <= 65535);
    if (hd != 64 && hd != 128)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda %s: head_dim %lld (the kernels serve 64 and "
                          "128; the cpu backend serves any)", op, (long long)hd);
    return QLR_OK;
}

template <int HD>
static qlr_status av_fwd_launch(cudaStream_t st, bf16 *out, float *lse, const bf16 *q,
                                const bf16 *k, const bf16 *v, const int32_t *start, int64_t n,
                                int64_t n_heads, int64_t n_kv, float scale) {
    size_t bytes = av_smem<HD>::FWD;
    QLR_CK(cudaFuncSetAttribute(av_fwd_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)bytes));
    dim3 grid((unsigned)((n + AV_T - 1) / AV_T), (unsigned)n_heads);
    av_fwd_kernel<HD><<<grid, AV_THREADS, bytes, st>>>(out, lse, q, k, v, start, n, n_heads, n_kv,
                                                       scale);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

template <int HD>
static qlr_status av_bwd_launch(cudaStream_t st, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout,
                                const bf16 *q, const bf16 *k, const bf16 *v, const float *lse,
                                const float *D, const int32_t *start, int64_t n, int64_t n_heads,
                                int64_t n_kv, float scale) {
    size_t bytes = av_smem<HD>::BWD;
    unsigned tiles = (unsigned)((n + AV_T - 1) / AV_T);
    QLR_CK(cudaFuncSetAttribute(av_bwd_dq_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)bytes));
    av_bwd_dq_kernel<HD><<<dim3(tiles, (unsigned)n_heads), AV_THREADS, bytes, st>>>(
        dq, q, k, v, dout, lse, D, start, n, n_heads, n_kv, scale);
    QLR_CK_LAUNCH();
    QLR_CK(cudaFuncSetAttribute(av_bwd_dkdv_kernel<HD>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    av_bwd_dkdv_kernel<HD><<<dim3(tiles, (unsigned)n_kv), AV_THREADS, bytes, st>>>(
        dk, dv, q, k, v, dout, lse, D, start, n, n_heads, n_kv, scale);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

/* ---- op entries ---- */

/* 1 when QLR_ATTN_VARLEN=wmma asks for the WMMA kernels; "mma" or unset: the mma.sync ones. An
 * unknown value is reported once and ignored. */
static int av_use_wmma(void) {
    static int warned;
    const char *e = getenv("QLR_ATTN_VARLEN");
    if (!e || !*e || !strcmp(e, "mma")) return 0;
    if (!strcmp(e, "wmma")) return 1;
    if (!warned) {
        warned = 1;
        fprintf(stderr, "qlora: QLR_ATTN_VARLEN=%s is not a kernel choice (mma, wmma): using mma\n",
                e);
    }
    return 0;
}

qlr_status qlr_cuda_attention_varlen(qlr_backend *be, void *out, float *lse, const void *q,
                                     const void *k, const void *v, const int32_t *start,
                                     int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                     float scale) {
    if (n <= 0) return QLR_OK;
    QLR_TRY(av_check("attention_varlen", n, n_heads, n_kv, hd));
    QLR_ASSERT(av_aligned(out) && av_aligned(q) && av_aligned(k) && av_aligned(v));
    cudaStream_t st = qlr_cuda_im(be)->stream;
    if (!av_use_wmma())
        return qlr_cuda_av_mma_fwd(st, out, lse, q, k, v, start, n, n_heads, n_kv, hd, scale);
    if (hd == 64)
        return av_fwd_launch<64>(st, (bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k,
                                 (const bf16 *)v, start, n, n_heads, n_kv, scale);
    return av_fwd_launch<128>(st, (bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k,
                              (const bf16 *)v, start, n, n_heads, n_kv, scale);
}

/* Workspace: D [n, n_heads] f32, and when the caller has no out or no lse a recomputed forward:
 * lse [n, n_heads] f32 and out [n, n_heads, hd] bf16. */
qlr_status qlr_cuda_attention_varlen_bwd(qlr_backend *be, void *dq, void *dk, void *dv,
                                         const void *dout, const void *q, const void *k,
                                         const void *v, const void *out, const float *lse,
                                         const int32_t *start, int64_t n, int64_t n_heads,
                                         int64_t n_kv, int64_t hd, float scale) {
    if (n <= 0) return QLR_OK;
    QLR_TRY(av_check("attention_varlen_bwd", n, n_heads, n_kv, hd));
    QLR_ASSERT(av_aligned(dq) && av_aligned(dk) && av_aligned(dv) && av_aligned(dout) &&
               av_aligned(q) && av_aligned(k) && av_aligned(v) && (!out || av_aligned(out)));
    cudaStream_t st = qlr_cuda_im(be)->stream;
    const int recompute = !out || !lse;
    size_t rows = (size_t)(n * n_heads), row_bytes = (rows * 4 + 255) & ~(size_t)255;
    size_t bytes = row_bytes + (recompute ? row_bytes + rows * (size_t)hd * 2 : 0);
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, bytes, &ws));
    float *D = (float *)ws;
    if (recompute) {
        float *lse2 = (float *)((char *)ws + row_bytes);
        bf16 *out2 = (bf16 *)((char *)ws + 2 * row_bytes);
        QLR_TRY(qlr_cuda_attention_varlen(be, out2, lse2, q, k, v, start, n, n_heads, n_kv, hd,
                                          scale));
        out = out2;
        lse = lse2;
    }
    int64_t dsum_blocks = ((int64_t)rows + 7) / 8, cap = (int64_t)qlr_cuda_im(be)->n_sm * 32;
    av_dsum_kernel<<<(unsigned)(dsum_blocks < cap ? dsum_blocks : cap), 256, 0, st>>>(
        D, (const bf16 *)dout, (const bf16 *)out, (int64_t)rows, (int)hd);
    QLR_CK_LAUNCH();
    if (!av_use_wmma())
        return qlr_cuda_av_mma_bwd(st, dq, dk, dv, dout, q, k, v, lse, D, start, n, n_heads, n_kv,
                                   hd, scale);
    if (hd == 64)
        return av_bwd_launch<64>(st, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout,
                                 (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, lse, D, start,
                                 n, n_heads, n_kv, scale);
    return av_bwd_launch<128>(st, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout,
                              (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, lse, D, start, n,
                              n_heads, n_kv, scale);
}
