/* backend/cuda/attention_varlen_mma.cu: FlashAttention-2-style kernels of the training attention
 * (causal GQA inside packed sequences; attention_varlen.cu owns the op entries, checks, workspace
 * and the WMMA fallback). Tensor cores through inline PTX: mma.sync m16n8k16 bf16 -> f32, operand
 * fragments read from padded shared memory with ldmatrix (.trans for the operands stored
 * [key][d] that enter as the k dimension), tiles staged with cp.async (double-buffered). Scores,
 * probabilities and accumulators stay in registers: the f32 C fragment of a 16x8 score tile,
 * packed to bf16, is the A fragment of the next product (P·V, Pᵀ·dO, dSᵀ·Q, dS·K).
 *  - forward: one block per (query tile of 16·FWD_WARPS rows, query head), each warp 16 rows;
 *    64-key tiles from the tile's first sequence start to its last query; a warp skips the key
 *    tiles its rows cannot see and masks (start[row] <= key <= row) only where a tile crosses
 *    the diagonal or a sequence boundary; online softmax per row (base 2, quad shuffles).
 *  - backward, no atomics (deterministic, bitwise repeatable): D = rowsum(dO ∘ O) comes from the
 *    caller; dK/dV: one block per (64-key tile, KV head), warp w owns keys 16w..16w+15 and keeps
 *    dK, dV in registers while looping over the group's query heads and the query tiles of
 *    fa_bwd_qt rows that can see the keys, computing Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ directly (so Pᵀ and
 *    dSᵀ are A fragments); dQ: one block per (64-query tile, query head) looping over key tiles
 *    as the forward does. P and dS are rounded to bf16 only as mma operands (as the WMMA kernels).
 * No [n, n] buffer: shared memory and registers only. */
#include "backend/cuda/attention_varlen_mma.h"
#include "backend/cuda/cuda_internal.h"

#include <limits.h>

typedef __nv_bfloat16 bf16;

#define FA_KT 64          /* keys per key tile (forward, dQ); keys per dK/dV block */
#define FA_FWD_WARPS 4    /* forward: 64 query rows per block */
#define FA_DQ_WARPS 4     /* dQ: 64 query rows per block */
#define FA_BWD_WARPS 4    /* dK/dV: 64 keys per block, 16 per warp */
/* dK/dV: query rows per step of the loop; at head dim 128 the 64-row step spills (dK, dV, Pᵀ and
 * dPᵀ fragments exceed 255 registers) */
template <int HD> struct fa_bwd_qt { static constexpr int V = HD == 128 ? 32 : 64; };
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f

/* ---- PTX wrappers ---- */

__device__ __forceinline__ uint32_t fa_smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared, asynchronous; ok = 0 writes zeros (src is still a valid address). */
__device__ __forceinline__ void fa_cp16(void *dst, const void *src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fa_smem_addr(dst)),
                 "l"(src), "r"(ok ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void fa_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void fa_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Four 8x8 bf16 matrices; lane l gives the address of row l % 8 of matrix l / 8, and register j
 * receives matrix j's (row lane / 4, columns 2·(lane % 4), +1) (.trans: rows and columns
 * swapped). */
__device__ __forceinline__ void fa_ldsm4(uint32_t r[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem_addr(p))
                 : "memory");
}
__device__ __forceinline__ void fa_ldsm4_t(uint32_t r[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem_addr(p))
                 : "memory");
}

/* c[16x8] += a[16x16] · b[16x8]. Lane l, g = l / 4, q = l % 4: a = {(g, 2q..), (g+8, 2q..),
 * (g, 2q+8..), (g+8, 2q+8..)}, b = {(k 2q.., n g), (k 2q+8.., n g)}, c = {(g, 2q), (g, 2q+1),
 * (g+8, 2q), (g+8, 2q+1)}. */
__device__ __forceinline__ void fa_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t fa_pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *(uint32_t *)&v;
}

/* The A fragment of columns 16kk..16kk+15 of a 16-row f32 tile held as C fragments c[j][4] of
 * 8 columns each (FA2: the score tile becomes the next product's left operand). */
__device__ __forceinline__ void fa_c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = fa_pack(c0[0], c0[1]);
    a[1] = fa_pack(c0[2], c0[3]);
    a[2] = fa_pack(c1[0], c1[1]);
    a[3] = fa_pack(c1[2], c1[3]);
}

/* ---- shared-memory tiles: rows of HD bf16, pitch HD + 8 (ldmatrix rows land in distinct banks) */

template <int HD> struct fa_ld { static constexpr int LD = HD + 8; };

/* ROWS rows from row0 of a [n, heads, HD] tensor at head h into dst [ROWS][LD], asynchronously;
 * rows at or past n become zeros. */
template <int HD, int ROWS, int NT>
__device__ __forceinline__ void fa_load(bf16 *dst, const bf16 *src, int64_t row0, int64_t n,
                                        int64_t heads, int64_t h) {
    constexpr int C8 = HD / 8, LD = fa_ld<HD>::LD;
    static_assert(ROWS * C8 % NT == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int j = 0; j < ROWS * C8 / NT; j++) {
        const int i = threadIdx.x + j * NT, r = i / C8, c = i % C8;
        int64_t t = row0 + r;
        bool ok = t < n;
        fa_cp16(dst + r * LD + c * 8, src + ((ok ? t : 0) * heads + h) * HD + c * 8, ok);
    }
}

/* acc[16 x 8·NB] += A[16 rows of `a`, HD] · B[8·NB rows of `b`, HD]ᵀ: both operands [row][d] in
 * shared memory (Q·Kᵀ, dO·Vᵀ, K·Qᵀ, V·dOᵀ). */
template <int HD, int NB>
__device__ __forceinline__ void fa_abt(float acc[][4], const bf16 *a, const bf16 *b, int lane) {
    constexpr int LD = fa_ld<HD>::LD;
    const bf16 *pa = a + (lane & 15) * LD + (lane >> 4) * 8;
    const bf16 *pb = b + ((lane & 7) + (lane >> 4) * 8) * LD + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        uint32_t fa[4];
        fa_ldsm4(fa, pa + kk * 16);
#pragma unroll
        for (int np = 0; np < NB / 2; np++) {
            uint32_t fb[4];
            fa_ldsm4(fb, pb + np * 16 * LD + kk * 16);
            fa_mma(acc[2 * np], fa, fb[0], fb[1]);
            fa_mma(acc[2 * np + 1], fa, fb[2], fb[3]);
        }
    }
}

/* acc[16 x HD] += X[16 x 16·KC] · B[16·KC rows of `b`, HD], X given as C fragments x[2·KC][4]
 * (P·V, Pᵀ·dO, dSᵀ·Q, dS·K; B stored [k][d], read transposed). */
template <int HD, int KC>
__device__ __forceinline__ void fa_xb(float acc[][4], const float x[][4], const bf16 *b,
                                      int lane) {
    constexpr int LD = fa_ld<HD>::LD;
    const bf16 *pb = b + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
    for (int kk = 0; kk < KC; kk++) {
        uint32_t fa[4];
        fa_c_to_a(fa, x[2 * kk], x[2 * kk + 1]);
#pragma unroll
        for (int dp = 0; dp < HD / 16; dp++) {
            uint32_t fb[4];
            fa_ldsm4_t(fb, pb + kk * 16 * LD + dp * 16);
            fa_mma(acc[2 * dp], fa, fb[0], fb[1]);
            fa_mma(acc[2 * dp + 1], fa, fb[2], fb[3]);
        }
    }
}

/* Stores a warp's [16, HD] f32 accumulator times mul as bf16 rows r0 = row + g, r1 = r0 + 8 of
 * a [n, heads, HD] tensor at head h (rows at or past n skipped). */
template <int HD>
__device__ __forceinline__ void fa_store16(bf16 *dst, const float acc[][4], int64_t r0, int64_t n,
                                           int64_t heads, int64_t h, float mul0, float mul1,
                                           int lane) {
    const int c = 2 * (lane & 3);
    const int64_t r1 = r0 + 8; /* (int64: the row offsets below) */
#pragma unroll
    for (int dn = 0; dn < HD / 8; dn++) {
        if (r0 < n)
            *(__nv_bfloat162 *)(dst + (r0 * heads + h) * HD + dn * 8 + c) =
                __floats2bfloat162_rn(acc[dn][0] * mul0, acc[dn][1] * mul0);
        if (r1 < n)
            *(__nv_bfloat162 *)(dst + (r1 * heads + h) * HD + dn * 8 + c) =
                __floats2bfloat162_rn(acc[dn][2] * mul1, acc[dn][3] * mul1);
    }
}

/* First token t >= lo with start[t] > key, or n (start is nondecreasing). */
__device__ __forceinline__ int fa_first_after(const int32_t *start, int lo, int n, int key) {
    int hi = n;
    while (lo < hi) {
        int mid = lo + ((hi - lo) >> 1);
        if (start[mid] <= key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* ---- query-tile kernels (forward, dQ): a block of BM query rows at one head ---- */

/* The block's rows t0..t_last (launched last tile first: the most keys), its key tiles from the
 * first row's sequence start, and per warp its rows wr0..w_last, per thread its rows r0 = wr0 +
 * lane / 4 and r1 = r0 + 8 with their sequence starts (INT_MAX past n: every key masked). Row
 * and key indices are int (the entry points check n's range). */
struct fa_qtile {
    int ni, t0, h, kvh, k_lo, ntiles;
    int wr0, w_last, w_s_lo, w_s_hi, r0, r1, rs0, rs1;
    bool w_live, w_full;

    __device__ __forceinline__ fa_qtile(int BM, const int32_t *start, int64_t n, int64_t n_heads,
                                        int64_t n_kv) {
        ni = (int)n;
        t0 = (int)(gridDim.x - 1 - blockIdx.x) * BM;
        h = blockIdx.y;
        kvh = h / (int)(n_heads / n_kv);
        const int t_last = (t0 + BM < ni ? t0 + BM : ni) - 1;
        k_lo = start[t0];
        ntiles = (t_last - k_lo) / FA_KT + 1;
        wr0 = t0 + 16 * (int)(threadIdx.x >> 5);
        w_last = wr0 + 15 < ni ? wr0 + 15 : ni - 1;
        w_live = wr0 < ni;
        w_full = wr0 + 15 < ni;
        w_s_lo = w_live ? start[wr0] : 0;
        w_s_hi = w_live ? start[w_last] : 0;
        r0 = wr0 + (int)((threadIdx.x & 31) >> 2);
        r1 = r0 + 8;
        rs0 = r0 < ni ? start[r0] : INT_MAX;
        rs1 = r1 < ni ? start[r1] : INT_MAX;
    }
    /* the warp sees some key of the tile k0..k0+FA_KT-1 */
    __device__ __forceinline__ bool active(int k0) const {
        return w_live && k0 <= w_last && k0 + FA_KT - 1 >= w_s_lo;
    }
    /* some (row, key) pair of the warp and the tile is masked (diagonal, sequence edge, past n) */
    __device__ __forceinline__ bool mask(int k0) const {
        return !w_full || k0 + FA_KT - 1 > wr0 || k0 < w_s_hi;
    }
    /* row r0 (hi = 0) or r1 (hi = 1) sees key */
    __device__ __forceinline__ bool sees(int key, bool hi) const {
        return hi ? (key >= rs1 && key <= r1) : (key >= rs0 && key <= r0);
    }
};

/* Key tile `it` of the loop is ready in buffer it & 1 after this (and tile it + 1 on its way
 * into the other buffer); ends with the block barrier. */
template <int HD, int NT>
__device__ __forceinline__ void fa_kv_step(bf16 *Ks, bf16 *Vs, const bf16 *k, const bf16 *v,
                                           const fa_qtile &T, int it, int64_t n, int64_t n_kv) {
    constexpr int LD = fa_ld<HD>::LD;
    if (it + 1 < T.ntiles) {
        const int buf = (it + 1) & 1, k1 = T.k_lo + (it + 1) * FA_KT;
        fa_load<HD, FA_KT, NT>(Ks + buf * FA_KT * LD, k, k1, n, n_kv, T.kvh);
        fa_load<HD, FA_KT, NT>(Vs + buf * FA_KT * LD, v, k1, n, n_kv, T.kvh);
        fa_cp_commit();
        fa_cp_wait<1>();
    } else {
        fa_cp_wait<0>();
    }
    __syncthreads();
}

/* ---- forward ---- */

/* One block per (query tile, query head blockIdx.y); the last tiles (most keys) are launched
 * first. scale_log2 = scale · log2(e). */
template <int HD, int NW>
__global__ void __launch_bounds__(NW * 32, 2)
    fa_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v,
                  const int32_t *start, int64_t n, int64_t n_heads, int64_t n_kv,
                  float scale_log2) {
    constexpr int BM = 16 * NW, NT = NW * 32, LD = fa_ld<HD>::LD;
    extern __shared__ __align__(128) unsigned char smraw[];
    bf16 *Qs = (bf16 *)smraw;               /* [BM][LD] */
    bf16 *Ks = Qs + BM * LD;                /* [2][FA_KT][LD] */
    bf16 *Vs = Ks + 2 * FA_KT * LD;         /* [2][FA_KT][LD] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, qd = lane & 3;
    const fa_qtile T(BM, start, n, n_heads, n_kv);
    fa_load<HD, BM, NT>(Qs, q, T.t0, n, n_heads, T.h);
    fa_load<HD, FA_KT, NT>(Ks, k, T.k_lo, n, n_kv, T.kvh);
    fa_load<HD, FA_KT, NT>(Vs, v, T.k_lo, n, n_kv, T.kvh);
    fa_cp_commit();

    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    for (int it = 0; it < T.ntiles; it++) {
        const int k0 = T.k_lo + it * FA_KT, buf = it & 1;
        fa_kv_step<HD, NT>(Ks, Vs, k, v, T, it, n, n_kv);
        if (T.active(k0)) {
            float s[FA_KT / 8][4];
#pragma unroll
            for (int j = 0; j < FA_KT / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
            fa_abt<HD, FA_KT / 8>(s, Qs + 16 * warp * LD, Ks + buf * FA_KT * LD, lane);
            const bool mask = T.mask(k0);
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int j = 0; j < FA_KT / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = k0 + 8 * j + 2 * qd + (e & 1);
                    float x = s[j][e] * scale_log2;
                    if (mask && !T.sees(key, e >= 2)) x = -INFINITY;
                    s[j][e] = x;
                    if (e < 2) mx0 = fmaxf(mx0, x);
                    else mx1 = fmaxf(mx1, x);
                }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            /* a row with no visible key yet keeps max -inf: exponents against 0 give zeros */
            const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;
            const float al0 = exp2f(m0 - mu0), al1 = exp2f(m1 - mu1);
            m0 = mn0;
            m1 = mn1;
            l0 *= al0;
            l1 *= al1;
#pragma unroll
            for (int i = 0; i < HD / 8; i++) {
                o[i][0] *= al0;
                o[i][1] *= al0;
                o[i][2] *= al1;
                o[i][3] *= al1;
            }
#pragma unroll
            for (int j = 0; j < FA_KT / 8; j++) {
                s[j][0] = exp2f(s[j][0] - mu0);
                s[j][1] = exp2f(s[j][1] - mu0);
                s[j][2] = exp2f(s[j][2] - mu1);
                s[j][3] = exp2f(s[j][3] - mu1);
                l0 += s[j][0] + s[j][1];
                l1 += s[j][2] + s[j][3];
            }
            fa_xb<HD, FA_KT / 16>(o, s, Vs + buf * FA_KT * LD, lane);
        }
        __syncthreads(); /* the buffer is refilled two iterations on */
    }
    /* the row sums: each lane of a quad summed its own columns */
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    if (!T.w_live) return;
    fa_store16<HD>(out, o, T.r0, n, n_heads, T.h, l0 > 0.0f ? 1.0f / l0 : 0.0f,
                   l1 > 0.0f ? 1.0f / l1 : 0.0f, lane);
    if (lse && qd == 0) {
        if (T.r0 < T.ni) lse[(int64_t)T.r0 * n_heads + T.h] = (m0 + log2f(l0)) * FA_LN2;
        if (T.r1 < T.ni) lse[(int64_t)T.r1 * n_heads + T.h] = (m1 + log2f(l1)) * FA_LN2;
    }
}

/* ---- backward: dK, dV ---- */

/* Per-row data of query rows row0..row0+BQ at head h into shared memory: the sequence start
 * (INT_MAX past n: every key masked), lse · log2(e) and D. */
template <int BQ, int NT>
__device__ __forceinline__ void fa_load_rows(int *rst, float *rlse, float *rD,
                                             const int32_t *start, const float *lse,
                                             const float *D, int64_t row0, int64_t n,
                                             int64_t n_heads, int64_t h) {
    for (int r = threadIdx.x; r < BQ; r += NT) {
        const int64_t t = row0 + r;
        const bool in = t < n;
        rst[r] = in ? start[t] : INT_MAX;
        rlse[r] = in ? lse[t * n_heads + h] * FA_LOG2E : 0.0f;
        rD[r] = in ? D[t * n_heads + h] : 0.0f;
    }
}

/* dK, dV of key tile blockIdx.x at KV head blockIdx.y (key tile 0, the one most queries see,
 * first). Loops over the group's query heads and the query tiles from k0 up to the last query
 * whose sequence starts at or before the tile's last key. dk, dv overwritten. */
template <int HD, int BQ>
__global__ void __launch_bounds__(FA_BWD_WARPS * 32, 2)
    fa_bwd_dkdv_kernel(bf16 *dk, bf16 *dv, const bf16 *q, const bf16 *k, const bf16 *v,
                       const bf16 *dout, const float *lse, const float *D, const int32_t *start,
                       int64_t n, int64_t n_heads, int64_t n_kv, float scale, float scale_log2) {
    constexpr int NT = FA_BWD_WARPS * 32, LD = fa_ld<HD>::LD, BK = 16 * FA_BWD_WARPS;
    extern __shared__ __align__(128) unsigned char smraw[];
    bf16 *Ks = (bf16 *)smraw;               /* [BK][LD] */
    bf16 *Vs = Ks + BK * LD;                /* [BK][LD] */
    bf16 *Qs = Vs + BK * LD;                /* [2][BQ][LD] */
    bf16 *dOs = Qs + 2 * BQ * LD;           /* [2][BQ][LD] */
    int *rst = (int *)(dOs + 2 * BQ * LD);  /* [2][BQ] */
    float *rlse = (float *)(rst + 2 * BQ);  /* [2][BQ] */
    float *rD = rlse + 2 * BQ;              /* [2][BQ] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
    const int ni = (int)n;
    const int k0 = blockIdx.x * BK, kvh = blockIdx.y, G = (int)(n_heads / n_kv);
    const int k_last = (k0 + BK < ni ? k0 + BK : ni) - 1;
    /* query tiles qt0 = k0, k0 + BQ, ... below the first token that cannot see k_last */
    const int q_end = fa_first_after(start, k0, ni, k_last);
    const int nqt = (q_end - k0 + BQ - 1) / BQ, total = nqt * G;

    fa_load<HD, BK, NT>(Ks, k, k0, n, n_kv, kvh);
    fa_load<HD, BK, NT>(Vs, v, k0, n, n_kv, kvh);
    fa_load<HD, BQ, NT>(Qs, q, k0, n, n_heads, kvh * G);
    fa_load<HD, BQ, NT>(dOs, dout, k0, n, n_heads, kvh * G);
    fa_cp_commit();
    fa_load_rows<BQ, NT>(rst, rlse, rD, start, lse, D, k0, n, n_heads, kvh * G);

    const int kw0 = k0 + 16 * warp; /* this warp's keys kw0..kw0+15 */
    const int key0 = kw0 + g, key1 = key0 + 8;
    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) {
        dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = 0.0f;
        dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0.0f;
    }

    for (int it = 0; it < total; it++) {
        const int buf = it & 1;
        const int qt0 = k0 + (it % nqt) * BQ;
        if (it + 1 < total) {
            const int h1 = kvh * G + (it + 1) / nqt, q1 = k0 + ((it + 1) % nqt) * BQ;
            fa_load<HD, BQ, NT>(Qs + (buf ^ 1) * BQ * LD, q, q1, n, n_heads, h1);
            fa_load<HD, BQ, NT>(dOs + (buf ^ 1) * BQ * LD, dout, q1, n, n_heads, h1);
            fa_cp_commit();
            fa_load_rows<BQ, NT>(rst + (buf ^ 1) * BQ, rlse + (buf ^ 1) * BQ, rD + (buf ^ 1) * BQ,
                                 start, lse, D, q1, n, n_heads, h1);
            fa_cp_wait<1>();
        } else {
            fa_cp_wait<0>();
        }
        __syncthreads();
        const int *cst = rst + buf * BQ;
        const float *clse = rlse + buf * BQ, *cD = rD + buf * BQ;
        /* skip when every query of the tile precedes the keys or starts after them */
        const bool active = kw0 < ni && qt0 + BQ - 1 >= kw0 && cst[0] <= kw0 + 15;
        if (active) {
            const bf16 *Qb = Qs + buf * BQ * LD, *dOb = dOs + buf * BQ * LD;
            const bool mask = kw0 + 15 >= ni || qt0 + BQ > ni || qt0 < kw0 + 15 ||
                              cst[BQ - 1] > kw0;
            /* Pᵀ [16 keys, BQ queries] = exp2(K·Qᵀ · scale·log2e - lse·log2e), 0 where masked */
            float p[BQ / 8][4];
#pragma unroll
            for (int j = 0; j < BQ / 8; j++) p[j][0] = p[j][1] = p[j][2] = p[j][3] = 0.0f;
            fa_abt<HD, BQ / 8>(p, Ks + 16 * warp * LD, Qb, lane);
#pragma unroll
            for (int j = 0; j < BQ / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int c = 8 * j + 2 * qd + (e & 1);
                    float x = exp2f(p[j][e] * scale_log2 - clse[c]);
                    if (mask) {
                        const int key = e < 2 ? key0 : key1, t = qt0 + c;
                        if (!(key >= cst[c] && key <= t)) x = 0.0f;
                    }
                    p[j][e] = x;
                }
            fa_xb<HD, BQ / 16>(dva, p, dOb, lane); /* dV += Pᵀ · dO */
            /* dSᵀ = Pᵀ ∘ (V·dOᵀ - D) */
            float ds[BQ / 8][4];
#pragma unroll
            for (int j = 0; j < BQ / 8; j++) ds[j][0] = ds[j][1] = ds[j][2] = ds[j][3] = 0.0f;
            fa_abt<HD, BQ / 8>(ds, Vs + 16 * warp * LD, dOb, lane);
#pragma unroll
            for (int j = 0; j < BQ / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) ds[j][e] = p[j][e] * (ds[j][e] - cD[8 * j + 2 * qd + (e & 1)]);
            fa_xb<HD, BQ / 16>(dka, ds, Qb, lane); /* dK += dSᵀ · Q */
        }
        __syncthreads(); /* the buffer is refilled two iterations on */
    }
    if (kw0 >= ni) return;
    fa_store16<HD>(dk, dka, key0, n, n_kv, kvh, scale, scale, lane);
    fa_store16<HD>(dv, dva, key0, n, n_kv, kvh, 1.0f, 1.0f, lane);
}

/* ---- backward: dQ ---- */

/* dQ of query tile (launched last tile first) at query head blockIdx.y: loops over the key
 * tiles as the forward does, recomputing P and dS for the warp's 16 rows. dq overwritten. */
template <int HD, int NW>
__global__ void __launch_bounds__(NW * 32, 2)
    fa_bwd_dq_kernel(bf16 *dq, const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *dout,
                     const float *lse, const float *D, const int32_t *start, int64_t n,
                     int64_t n_heads, int64_t n_kv, float scale, float scale_log2) {
    constexpr int BM = 16 * NW, NT = NW * 32, LD = fa_ld<HD>::LD;
    extern __shared__ __align__(128) unsigned char smraw[];
    bf16 *Qs = (bf16 *)smraw;               /* [BM][LD] */
    bf16 *dOs = Qs + BM * LD;               /* [BM][LD] */
    bf16 *Ks = dOs + BM * LD;               /* [2][FA_KT][LD] */
    bf16 *Vs = Ks + 2 * FA_KT * LD;         /* [2][FA_KT][LD] */

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, qd = lane & 3;
    const fa_qtile T(BM, start, n, n_heads, n_kv);
    const int ni = T.ni, r0 = T.r0, r1 = T.r1, h = T.h;
    fa_load<HD, BM, NT>(Qs, q, T.t0, n, n_heads, h);
    fa_load<HD, BM, NT>(dOs, dout, T.t0, n, n_heads, h);
    fa_load<HD, FA_KT, NT>(Ks, k, T.k_lo, n, n_kv, T.kvh);
    fa_load<HD, FA_KT, NT>(Vs, v, T.k_lo, n, n_kv, T.kvh);
    fa_cp_commit();

    const float ls0 = r0 < ni ? lse[(int64_t)r0 * n_heads + h] * FA_LOG2E : 0.0f;
    const float ls1 = r1 < ni ? lse[(int64_t)r1 * n_heads + h] * FA_LOG2E : 0.0f;
    const float D0 = r0 < ni ? D[(int64_t)r0 * n_heads + h] : 0.0f;
    const float D1 = r1 < ni ? D[(int64_t)r1 * n_heads + h] : 0.0f;

    float dqa[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.0f;

    for (int it = 0; it < T.ntiles; it++) {
        const int k0 = T.k_lo + it * FA_KT, buf = it & 1;
        fa_kv_step<HD, NT>(Ks, Vs, k, v, T, it, n, n_kv);
        if (T.active(k0)) {
            const bf16 *Kb = Ks + buf * FA_KT * LD, *Vb = Vs + buf * FA_KT * LD;
            const bool mask = T.mask(k0);
            float p[FA_KT / 8][4], ds[FA_KT / 8][4];
#pragma unroll
            for (int j = 0; j < FA_KT / 8; j++) {
                p[j][0] = p[j][1] = p[j][2] = p[j][3] = 0.0f;
                ds[j][0] = ds[j][1] = ds[j][2] = ds[j][3] = 0.0f;
            }
            fa_abt<HD, FA_KT / 8>(p, Qs + 16 * warp * LD, Kb, lane);   /* S = Q·Kᵀ */
            fa_abt<HD, FA_KT / 8>(ds, dOs + 16 * warp * LD, Vb, lane); /* dP = dO·Vᵀ */
#pragma unroll
            for (int j = 0; j < FA_KT / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float x = exp2f(p[j][e] * scale_log2 - (e < 2 ? ls0 : ls1));
                    if (mask && !T.sees(k0 + 8 * j + 2 * qd + (e & 1), e >= 2)) x = 0.0f;
                    ds[j][e] = x * (ds[j][e] - (e < 2 ? D0 : D1));
                }
            fa_xb<HD, FA_KT / 16>(dqa, ds, Kb, lane); /* dQ += dS · K */
        }
        __syncthreads();
    }
    if (!T.w_live) return;
    fa_store16<HD>(dq, dqa, r0, n, n_heads, h, scale, scale, lane);
}

/* ---- launchers ---- */

template <int HD> struct fa_bytes {
    static constexpr size_t T = (size_t)fa_ld<HD>::LD * 2; /* one tile row */
    static constexpr size_t FWD = (16 * FA_FWD_WARPS + 4 * FA_KT) * T;
    static constexpr size_t DQ = (2 * 16 * FA_DQ_WARPS + 4 * FA_KT) * T;
    static constexpr int BQ = fa_bwd_qt<HD>::V;
    static constexpr size_t DKDV = (2 * 16 * FA_BWD_WARPS + 4 * BQ) * T + 6 * BQ * 4;
};

template <int HD>
static qlr_status fa_fwd_launch(cudaStream_t st, bf16 *out, float *lse, const bf16 *q,
                                const bf16 *k, const bf16 *v, const int32_t *start, int64_t n,
                                int64_t n_heads, int64_t n_kv, float scale) {
    constexpr int BM = 16 * FA_FWD_WARPS;
    const size_t bytes = fa_bytes<HD>::FWD;
    QLR_CK(cudaFuncSetAttribute(fa_fwd_kernel<HD, FA_FWD_WARPS>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    dim3 grid((unsigned)((n + BM - 1) / BM), (unsigned)n_heads);
    fa_fwd_kernel<HD, FA_FWD_WARPS><<<grid, FA_FWD_WARPS * 32, bytes, st>>>(
        out, lse, q, k, v, start, n, n_heads, n_kv, scale * FA_LOG2E);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

template <int HD>
static qlr_status fa_bwd_launch(cudaStream_t st, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout,
                                const bf16 *q, const bf16 *k, const bf16 *v, const float *lse,
                                const float *D, const int32_t *start, int64_t n, int64_t n_heads,
                                int64_t n_kv, float scale) {
    constexpr int BM = 16 * FA_DQ_WARPS, BK = 16 * FA_BWD_WARPS;
    const size_t dq_bytes = fa_bytes<HD>::DQ, kv_bytes = fa_bytes<HD>::DKDV;
    QLR_CK(cudaFuncSetAttribute(fa_bwd_dq_kernel<HD, FA_DQ_WARPS>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)dq_bytes));
    fa_bwd_dq_kernel<HD, FA_DQ_WARPS>
        <<<dim3((unsigned)((n + BM - 1) / BM), (unsigned)n_heads), FA_DQ_WARPS * 32, dq_bytes,
           st>>>(dq, q, k, v, dout, lse, D, start, n, n_heads, n_kv, scale, scale * FA_LOG2E);
    QLR_CK_LAUNCH();
    QLR_CK(cudaFuncSetAttribute(fa_bwd_dkdv_kernel<HD, fa_bwd_qt<HD>::V>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kv_bytes));
    fa_bwd_dkdv_kernel<HD, fa_bwd_qt<HD>::V>
        <<<dim3((unsigned)((n + BK - 1) / BK), (unsigned)n_kv), FA_BWD_WARPS * 32, kv_bytes,
           st>>>(dk, dv, q, k, v, dout, lse, D, start, n, n_heads, n_kv, scale,
                 scale * FA_LOG2E);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_av_mma_fwd(cudaStream_t st, void *out, float *lse, const void *q,
                               const void *k, const void *v, const int32_t *start, int64_t n,
                               int64_t n_heads, int64_t n_kv, int64_t hd, float scale) {
    QLR_ASSERT(hd == 64 || hd == 128);
    QLR_ASSERT(n > 0 && n <= (int64_t)INT_MAX - 256); /* token and key indices in int */
    if (hd == 64)
        return fa_fwd_launch<64>(st, (bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k,
                                 (const bf16 *)v, start, n, n_heads, n_kv, scale);
    return fa_fwd_launch<128>(st, (bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k,
                              (const bf16 *)v, start, n, n_heads, n_kv, scale);
}

qlr_status qlr_cuda_av_mma_bwd(cudaStream_t st, void *dq, void *dk, void *dv, const void *dout,
                               const void *q, const void *k, const void *v, const float *lse,
                               const float *D, const int32_t *start, int64_t n, int64_t n_heads,
                               int64_t n_kv, int64_t hd, float scale) {
    QLR_ASSERT(hd == 64 || hd == 128);
    QLR_ASSERT(n > 0 && n <= (int64_t)INT_MAX - 256); /* token and key indices in int */
    if (hd == 64)
        return fa_bwd_launch<64>(st, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout,
                                 (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, lse, D, start,
                                 n, n_heads, n_kv, scale);
    return fa_bwd_launch<128>(st, (bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout,
                              (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, lse, D, start, n,
                              n_heads, n_kv, scale);
}
