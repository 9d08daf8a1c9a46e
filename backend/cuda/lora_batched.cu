/* backend/cuda/lora_batched.cu: the batched multi-adapter LoRA op (backend.h lora_batched) on
 * bf16 activations: every token applies its own slot's A [r, in] and B [out, r], ranks mixed,
 * the adapters never padded.
 *
 * Two kernels, correct for any mix of slots: shrink writes u [n, max_r] f32 (op workspace), one
 * warp per (token, rank row) dot product; expand adds scale · u[t] · B[s]ᵀ to y, one thread per
 * (token, output) so that each bf16 element of y is read, updated in f32 and rounded once by its
 * only owner (no atomics). A batch of one slot (the `uniform` hint) takes the dense path, the
 * single-adapter op (two cuBLASLt GEMMs).
 *
 * lora_segmented (the serving path): the forward groups the batch's tokens by slot once
 * (backend.h qlr_lora_segs: tiles of <= 8 tokens of one slot, and runs of >= 64 consecutive
 * tokens of one slot). A run takes the dense path (cuBLASLt, tensor cores). A tile's A is read
 * once for all its tokens by the segmented shrink (16-byte loads along k, split-k over blocks so
 * that a decode batch fills the GPU; each split writes its own f32 partials, summed in a fixed
 * order by the expand: deterministic, no atomics), and its B once by the segmented expand (one
 * thread per output row of B, its r values contiguous: 16-byte loads). No padding to the max
 * rank: a tile's blocks loop over its own rank. This file does not own the adapters or the slot
 * table. */
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

/* ---- segmented kernels (lora_segmented) ---- */

#define SEG_THREADS 256
#define SEG_WARPS (SEG_THREADS / 32)
#define SEG_UNROLL 4 /* 16-byte loads of A in flight per lane */

static __device__ __forceinline__ bool seg_aligned16(const void *p) {
    return ((uintptr_t)p & 15) == 0;
}

/* Σ_q a[q]·x[q] over 8 bf16 pairs, added to acc. */
static __device__ __forceinline__ float seg_dot8(uint4 av, uint4 xv, float acc) {
    const __nv_bfloat162 *ap = (const __nv_bfloat162 *)&av, *xp = (const __nv_bfloat162 *)&xv;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        float2 af = __bfloat1622float2(ap[q]), xf = __bfloat1622float2(xp[q]);
        acc += af.x * xf.x;
        acc += af.y * xf.y;
    }
    return acc;
}

/* part[split, p, j] = Σ_{k in split} x[tok[p], k] · A_s[j, k] for the tile's tokens p and rows
 * j < r_s. grid (n_tiles, splits); warp w takes rows w, w + 8, ...; its lanes stride the split's
 * k range with 16-byte loads of A (each element of A read once per tile) and of x (L1-resident:
 * the tile's x rows are shared by the block's warps). TT >= the tile's token count. */
template <int TT>
static __global__ void __launch_bounds__(SEG_THREADS)
seg_shrink_kernel(float *part, const bf16 *x, const qlr_lora_ref *L, int32_t n_slots,
                  const int32_t *tiles, const int32_t *tok, int32_t n_sorted, int32_t max_r,
                  int64_t in, int64_t kc) {
    int32_t s = tiles[3 * blockIdx.x], p0 = tiles[3 * blockIdx.x + 1],
            cnt = tiles[3 * blockIdx.x + 2];
    if (s < 0 || s >= n_slots) return;
    int32_t r = L[s].r;
    if (r <= 0 || r > max_r || cnt <= 0 || cnt > TT) return; /* expand skips the same tiles */
    const bf16 *A = (const bf16 *)L[s].a;
    int64_t k0 = (int64_t)blockIdx.y * kc, k1 = k0 + kc < in ? k0 + kc : in;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int32_t tk[TT];
    bool vec = (in & 7) == 0 && (k0 & 7) == 0 && seg_aligned16(A) && seg_aligned16(x);
#pragma unroll
    for (int tt = 0; tt < TT; tt++) tk[tt] = tok[p0 + (tt < cnt ? tt : 0)];
    float *pp = part + ((int64_t)blockIdx.y * n_sorted + p0) * max_r;
    for (int32_t j = warp; j < r; j += SEG_WARPS) {
        float acc[TT];
#pragma unroll
        for (int tt = 0; tt < TT; tt++) acc[tt] = 0.0f;
        const bf16 *ar = A + (int64_t)j * in;
        if (vec) {
            const uint4 *a4 = (const uint4 *)ar;
            int64_t v1 = k1 / 8;
            for (int64_t v = k0 / 8 + lane; v < v1; v += 32 * SEG_UNROLL) {
                uint4 av[SEG_UNROLL];
#pragma unroll
                for (int u = 0; u < SEG_UNROLL; u++)
                    av[u] = v + 32 * u < v1 ? __ldg(a4 + v + 32 * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int u = 0; u < SEG_UNROLL; u++) {
                    if (v + 32 * u >= v1) break;
#pragma unroll
                    for (int tt = 0; tt < TT; tt++)
                        if (tt < cnt)
                            acc[tt] = seg_dot8(
                                av[u], __ldg((const uint4 *)(x + (int64_t)tk[tt] * in) + v + 32 * u),
                                acc[tt]);
                }
            }
        } else { /* odd `in` or A at a 2-byte offset: scalar loads, same arithmetic */
            for (int64_t k = k0 + lane; k < k1; k += 32) {
                float a = __bfloat162float(ar[k]);
#pragma unroll
                for (int tt = 0; tt < TT; tt++)
                    if (tt < cnt) acc[tt] += a * __bfloat162float(x[(int64_t)tk[tt] * in + k]);
            }
        }
#pragma unroll
        for (int tt = 0; tt < TT; tt++) {
            float a = acc[tt];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) a += __shfl_xor_sync(0xffffffffu, a, off);
            if (lane == 0 && tt < cnt) pp[(int64_t)tt * max_r + j] = a;
        }
    }
}

/* y[tok[p], o] = bf16(y + scale_s · Σ_j u[p, j] · B_s[o, j]), u[p, j] = Σ_split part[split, p, j]
 * (fixed order). grid (n_tiles, ceil(out / (256 · opt))); the tile's u rows are staged in shared
 * memory [TT, r]; each thread takes `opt` outputs o (consecutive threads, consecutive o: the
 * y updates coalesce) and reads B_s row o (r contiguous values) with 16-byte loads; every B row
 * of the slot is read once for all the tile's tokens. Each y element has one owner. */
template <int TT>
static __global__ void __launch_bounds__(SEG_THREADS)
seg_expand_kernel(bf16 *y, const float *part, int32_t splits, const qlr_lora_ref *L,
                  int32_t n_slots, const int32_t *tiles, const int32_t *tok, int32_t n_sorted,
                  int32_t max_r, int64_t out, int opt) {
    extern __shared__ float su[]; /* [TT, r] */
    int32_t s = tiles[3 * blockIdx.x], p0 = tiles[3 * blockIdx.x + 1],
            cnt = tiles[3 * blockIdx.x + 2];
    if (s < 0 || s >= n_slots) return;
    int32_t r = L[s].r;
    if (r <= 0 || r > max_r || cnt <= 0 || cnt > TT) return;
    for (int32_t i = threadIdx.x; i < TT * r; i += blockDim.x) {
        int32_t tt = i / r, j = i % r;
        float a = 0.0f;
        if (tt < cnt)
            for (int32_t sp = 0; sp < splits; sp++)
                a += part[((int64_t)sp * n_sorted + p0 + tt) * max_r + j];
        su[i] = a;
    }
    __syncthreads();
    const bf16 *B = (const bf16 *)L[s].b;
    float scale = L[s].scale;
    bool vec = (r & 7) == 0 && seg_aligned16(B);
    int64_t trow[TT];
#pragma unroll
    for (int tt = 0; tt < TT; tt++) trow[tt] = (int64_t)tok[p0 + (tt < cnt ? tt : 0)] * out;
    for (int i = 0; i < opt; i++) {
        int64_t o = ((int64_t)blockIdx.y * opt + i) * blockDim.x + threadIdx.x;
        if (o >= out) break;
        const bf16 *br = B + o * r;
        float acc[TT];
#pragma unroll
        for (int tt = 0; tt < TT; tt++) acc[tt] = 0.0f;
        if (vec) {
            const uint4 *b4 = (const uint4 *)br;
#pragma unroll 4
            for (int32_t j8 = 0; j8 < r / 8; j8++) {
                uint4 bv = __ldg(b4 + j8);
                const __nv_bfloat162 *bp = (const __nv_bfloat162 *)&bv;
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    float2 bf = __bfloat1622float2(bp[q]);
#pragma unroll
                    for (int tt = 0; tt < TT; tt++) {
                        const float *ut = su + tt * r + j8 * 8 + 2 * q;
                        acc[tt] += ut[0] * bf.x;
                        acc[tt] += ut[1] * bf.y;
                    }
                }
            }
        } else {
            for (int32_t j = 0; j < r; j++) {
                float b = __bfloat162float(br[j]);
#pragma unroll
                for (int tt = 0; tt < TT; tt++) acc[tt] += su[tt * r + j] * b;
            }
        }
#pragma unroll
        for (int tt = 0; tt < TT; tt++)
            if (tt < cnt) {
                bf16 *yp = y + trow[tt] + o;
                *yp = __float2bfloat16_rn(__bfloat162float(*yp) + scale * acc[tt]);
            }
    }
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

/* ---- segmented: launchers and entry ---- */

#define SEG_SMEM_MAX (48u << 10)

/* The template instance for tiles of at most `max_tile` tokens. */
static int seg_tt(int32_t max_tile) {
    return max_tile <= 1 ? 1 : max_tile <= 2 ? 2 : max_tile <= 4 ? 4 : 8;
}

template <int TT>
static qlr_status launch_seg(cudaStream_t st, int n_sm, bf16 *y, const bf16 *x, float *part,
                             int32_t splits, int64_t kc, const qlr_lora_ref *L, int32_t n_slots,
                             const qlr_lora_segs *g, int32_t max_r, int64_t in, int64_t out) {
    QLR_ASSERT(splits >= 1 && splits <= 65535 && g->n_tiles > 0);
    dim3 gs((unsigned)g->n_tiles, (unsigned)splits);
    seg_shrink_kernel<TT><<<gs, SEG_THREADS, 0, st>>>(part, x, L, n_slots, g->tiles, g->tok,
                                                      g->n_sorted, max_r, in, kc);
    QLR_CK_LAUNCH();
    /* two outputs per thread when that still leaves 8 blocks per SM */
    int64_t per = (out + SEG_THREADS - 1) / SEG_THREADS;
    int opt = (int64_t)g->n_tiles * per >= 16LL * n_sm ? 2 : 1;
    int64_t gy = (out + (int64_t)SEG_THREADS * opt - 1) / ((int64_t)SEG_THREADS * opt);
    QLR_ASSERT(gy <= 65535);
    size_t smem = (size_t)TT * (size_t)max_r * sizeof(float);
    dim3 ge((unsigned)g->n_tiles, (unsigned)gy);
    seg_expand_kernel<TT><<<ge, SEG_THREADS, smem, st>>>(y, part, splits, L, n_slots, g->tiles,
                                                         g->tok, g->n_sorted, max_r, out, opt);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_lora_segmented(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *L,
                                   const qlr_lora_ref *L_host, int32_t n_slots,
                                   const int32_t *slot, int32_t max_r, const qlr_lora_segs *g,
                                   int64_t n, int64_t in, int64_t out) {
    if (n <= 0 || n_slots <= 0 || max_r <= 0) return QLR_OK;
    QLR_ASSERT(L && L_host && slot && g && in > 0 && out > 0);
    QLR_ASSERT(g->n_sorted >= 0 && g->n_sorted <= n && g->max_tile <= QLR_LORA_TILE);
    for (int32_t s = 0; s < n_slots; s++) QLR_ASSERT(L_host[s].r <= max_r);
    int tt = seg_tt(g->max_tile);
    if ((size_t)tt * (size_t)max_r * sizeof(float) > SEG_SMEM_MAX) /* ranks > 1536: per token */
        return qlr_cuda_lora_batched(be, y, x, L, L_host, n_slots, slot, max_r, -1, n, in, out);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    cudaStream_t st = im->stream;
    int n_sm = im->n_sm > 0 ? im->n_sm : 132;
    if (g->n_tiles > 0) {
        /* split k so that shrink has >= 4 blocks per SM, each split >= 512 values of k (a
         * multiple of 256: every split starts on a 16-byte boundary of an aligned row) */
        int64_t want = (4LL * n_sm + g->n_tiles - 1) / g->n_tiles, cap = (in + 511) / 512;
        int64_t splits = want < 1 ? 1 : want > cap ? cap : want;
        int64_t kc = (in + splits - 1) / splits;
        kc = (kc + 255) / 256 * 256;
        splits = (in + kc - 1) / kc;
        void *ws;
        QLR_TRY(qlr_cuda_ws(be, (size_t)splits * (size_t)g->n_sorted * (size_t)max_r * 4, &ws));
        bf16 *yb = (bf16 *)y;
        const bf16 *xb = (const bf16 *)x;
        float *part = (float *)ws;
        int32_t sp = (int32_t)splits;
        switch (tt) {
        case 1: QLR_TRY(launch_seg<1>(st, n_sm, yb, xb, part, sp, kc, L, n_slots, g, max_r, in, out)); break;
        case 2: QLR_TRY(launch_seg<2>(st, n_sm, yb, xb, part, sp, kc, L, n_slots, g, max_r, in, out)); break;
        case 4: QLR_TRY(launch_seg<4>(st, n_sm, yb, xb, part, sp, kc, L, n_slots, g, max_r, in, out)); break;
        default: QLR_TRY(launch_seg<8>(st, n_sm, yb, xb, part, sp, kc, L, n_slots, g, max_r, in, out)); break;
        }
    }
    /* runs of one slot (prefill chunks): the dense single-adapter GEMMs on their rows */
    for (int32_t i = 0; i < g->n_runs; i++) {
        int32_t s = g->runs[3 * i], t0 = g->runs[3 * i + 1], cnt = g->runs[3 * i + 2];
        QLR_ASSERT(s >= 0 && s < n_slots && t0 >= 0 && cnt > 0 && t0 + (int64_t)cnt <= n);
        if (L_host[s].r <= 0) continue;
        QLR_TRY(qlr_cuda_lora(be, (bf16 *)y + (int64_t)t0 * out, (const bf16 *)x + (int64_t)t0 * in,
                              &L_host[s], cnt, in, out));
    }
    return QLR_OK;
}
