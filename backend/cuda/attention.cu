/* backend/cuda/attention.cu: the KV cache store and causal GQA attention over the cache for any
 * mix of prefill and decode tokens (token t, head h sees rows 0..pos[t] of sequence seq[t], KV
 * head h / (n_heads / n_kv)). Two kernels, picked by the token count (seq/pos stay on the device,
 * so the host never waits to look at them):
 *  - n <= 64 and head_dim 64 or 128 (decode, short chunks): split-KV "flash decoding": one block
 *    per (token, KV head, split) serves all query heads of the group, online softmax in f32,
 *    partials combined by a second kernel;
 *  - n > 64 or other head dims (prefill): a tiled flash kernel on tensor cores (WMMA bf16 16x16x16, f32
 *    accumulation): 64 query tokens x one head per block, 64-key tiles, online softmax; a tile
 *    whose tokens belong to several sequences handles them one sequence after another.
 * Caches are [n_seq_max, ctx, n_kv, hd] bf16; hd must be a multiple of 16 and at most 256. */
#include "backend/cuda/cuda_internal.h"

#include <mma.h>

typedef __nv_bfloat16 bf16;
using namespace nvcuda;

/* ---- kv_store ---- */

__global__ void kv_store_kernel(bf16 *kc, bf16 *vc, const bf16 *k, const bf16 *v,
                                const int32_t *seq, const int32_t *pos, int64_t n, int64_t row8,
                                int64_t ctx) {
    /* row8 = n_kv * hd / 8 uint4 per token row */
    int64_t total = n * row8;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / row8, j = i % row8;
        int64_t p = pos[t];
        if (p < 0 || p >= ctx || seq[t] < 0) continue; /* caller validates (backend.h) */
        int64_t off = ((int64_t)seq[t] * ctx + p) * row8 + j;
        ((uint4 *)kc)[off] = ((const uint4 *)k)[i];
        ((uint4 *)vc)[off] = ((const uint4 *)v)[i];
    }
}

qlr_status qlr_cuda_kv_store(qlr_backend *be, void *k_cache, void *v_cache, const void *k,
                             const void *v, const int32_t *seq, const int32_t *pos, int64_t n,
                             int64_t n_kv, int64_t hd, int64_t ctx) {
    if (n <= 0) return QLR_OK;
    QLR_ASSERT((n_kv * hd) % 8 == 0);
    int64_t row8 = n_kv * hd / 8, total = n * row8;
    int64_t blocks = (total + 255) / 256, cap = (int64_t)qlr_cuda_im(be)->n_sm * 8;
    kv_store_kernel<<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)k_cache, (bf16 *)v_cache, (const bf16 *)k, (const bf16 *)v, seq, pos, n, row8, ctx);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

/* ---- decode: split-KV ---- */

#define DEC_THREADS 128
#define DEC_KEYS 64    /* keys per pass: 32 per warp pair, one key per lane */
#define DEC_MAXG 16    /* query heads per KV head */

struct att_args {
    bf16 *out;
    const bf16 *q, *kc, *vc;
    const int32_t *seq, *pos;
    int64_t n, n_heads, n_kv, hd, ctx;
    float scale;
};

__device__ __forceinline__ void dec_cp16(void *dst, const void *src) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
}

/* One block per (split s, KV head g, token t): keys [k0, k1) of the token's sequence for the G
 * query heads of the group, in passes of DEC_KEYS keys. Per pass every load is issued before any
 * math: the V rows go to shared memory by cp.async, and each thread holds half of one key's K
 * row in registers (warps 0-1: dims [0, HD/2), warps 2-3: [HD/2, HD); lane = key), so a pass
 * costs one memory latency. Scores (f32, both halves added in shared memory), an online softmax
 * per head (one warp per head), then o += p · v with each thread owning a pair of dims for half
 * of the heads. MG (4, 8 or 16) bounds the group size G: the per-head loops are unrolled to MG,
 * so a small MG keeps predicated-off work out of the inner loops.
 * Writes the split's {m, l, o[HD]} (unnormalised) for att_combine_kernel.
 * partial layout: [(t * n_heads + h) * nsplit + s] -> {m, l, o[hd]} f32. */
template <int HD, int MG>
__global__ void __launch_bounds__(DEC_THREADS) att_decode_kernel(att_args a, float *part) {
    __shared__ __align__(16) bf16 vs[DEC_KEYS * HD];
    __shared__ __align__(16) float qs[MG * HD];
    __shared__ float sc[2][MG][DEC_KEYS];
    __shared__ float mrow[MG], lrow[MG], alpha[MG];
    int nsplit = gridDim.x, s = blockIdx.x, g = blockIdx.y;
    int64_t t = blockIdx.z;
    int G = (int)(a.n_heads / a.n_kv), tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    /* seq/pos come from the host before the forward's first kernel: readable before the wait */
    int64_t L = (int64_t)a.pos[t] + 1, sq = a.seq[t];
    int64_t chunk = (L + nsplit - 1) / nsplit;
    chunk = (chunk + DEC_KEYS - 1) / DEC_KEYS * DEC_KEYS;
    int64_t k0 = s * chunk, k1 = k0 + chunk < L ? k0 + chunk : L;
    int64_t pbase = (t * a.n_heads + (int64_t)g * G) * nsplit + s;
    /* When no other token of this batch belongs to sequence sq, the previous kernel (kv_store)
     * wrote only row L - 1 of it: the first pass's other K/V rows, from earlier forwards, are
     * requested before griddepcontrol.wait (they overlap the RoPE/kv_store kernel) and the
     * current row after it. */
    int shared_seq = tid < a.n && tid != t && a.seq[tid] == sq; /* n <= 64 < DEC_THREADS */
    int early = k0 < k1 && !__syncthreads_or(shared_seq);
    const int64_t kv_stride = a.n_kv * HD; /* between positions */
    const bf16 *kbase = a.kc + (sq * a.ctx * a.n_kv + g) * HD;
    const bf16 *vbase = a.vc + (sq * a.ctx * a.n_kv + g) * HD;
    const int half = warp >> 1, key = ((warp & 1) << 5) + lane;
    uint4 kr[HD / 16] = {}; /* keys past the pass: computed on zeros, never used */
    int nk0 = (int)(k1 - k0 < DEC_KEYS ? k1 - k0 : DEC_KEYS);
    if (early) {
        for (int i = tid; i < nk0 * (HD / 8); i += DEC_THREADS) {
            int j = i / (HD / 8), c = i % (HD / 8);
            if (k0 + j != L - 1) dec_cp16(vs + j * HD + c * 8, vbase + (k0 + j) * kv_stride + c * 8);
        }
        /* never row L - 1 here: its later load must not meet a line cached before the wait */
        int64_t kj = k0 + (key < nk0 ? key : 0);
        if (kj != L - 1) {
            const uint4 *kp = (const uint4 *)(kbase + kj * kv_stride + half * (HD / 2));
#pragma unroll
            for (int d8 = 0; d8 < HD / 16; d8++) kr[d8] = __ldg(kp + d8);
        }
    }
    qlr_pdl_wait();
    qlr_pdl_trigger();
    if (k0 >= k1) {
        for (int i = tid; i < G; i += DEC_THREADS) {
            float *p = part + (pbase + (int64_t)i * nsplit) * (HD + 2);
            p[0] = -INFINITY;
            p[1] = 0.0f;
        }
        return;
    }
    {
        const __nv_bfloat162 *qp = (const __nv_bfloat162 *)(a.q + (t * a.n_heads + (int64_t)g * G) * HD);
        for (int i = tid; i < G * HD / 2; i += DEC_THREADS) {
            float2 f = __bfloat1622float2(qp[i]);
            qs[2 * i] = f.x;
            qs[2 * i + 1] = f.y;
        }
    }
    if (tid < G) {
        mrow[tid] = -INFINITY;
        lrow[tid] = 0.0f;
    }
    const int npair = HD / 2, dp = tid % npair, gsub = tid / npair, gstep = DEC_THREADS / npair;
    float2 o[MG];
#pragma unroll
    for (int i = 0; i < MG; i++) o[i] = make_float2(0.0f, 0.0f);
    for (int64_t p0 = k0; p0 < k1; p0 += DEC_KEYS) {
        int nk = (int)(k1 - p0 < DEC_KEYS ? k1 - p0 : DEC_KEYS);
        __syncthreads(); /* vs / sc of the previous pass are consumed; qs, mrow written */
        if (early && p0 == k0) {
            /* the first pass's rows were requested before the wait, except the current one */
            if (L - 1 < p0 + nk) {
                int j = (int)(L - 1 - p0);
                for (int c = tid; c < HD / 8; c += DEC_THREADS)
                    dec_cp16(vs + j * HD + c * 8, vbase + (L - 1) * kv_stride + c * 8);
                if (key == j) {
                    const uint4 *kp = (const uint4 *)(kbase + (L - 1) * kv_stride + half * (HD / 2));
#pragma unroll
                    for (int d8 = 0; d8 < HD / 16; d8++) kr[d8] = __ldcg(kp + d8);
                }
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
        } else {
            /* V rows of the pass -> shared memory (rows past nk are not read) */
            for (int i = tid; i < nk * (HD / 8); i += DEC_THREADS) {
                int j = i / (HD / 8), c = i % (HD / 8);
                dec_cp16(vs + j * HD + c * 8, vbase + (p0 + j) * kv_stride + c * 8);
            }
            asm volatile("cp.async.commit_group;" ::: "memory");
            /* this thread's half K row */
            int kj = key < nk ? key : 0;
            const uint4 *kp = (const uint4 *)(kbase + (p0 + kj) * kv_stride + half * (HD / 2));
#pragma unroll
            for (int d8 = 0; d8 < HD / 16; d8++) kr[d8] = __ldg(kp + d8);
        }
        float acc[MG];
#pragma unroll
        for (int gi = 0; gi < MG; gi++) acc[gi] = 0.0f;
#pragma unroll
        for (int d8 = 0; d8 < HD / 16; d8++) {
            uint32_t uu[4] = {kr[d8].x, kr[d8].y, kr[d8].z, kr[d8].w};
            float kf[8];
#pragma unroll
            for (int h2 = 0; h2 < 4; h2++) {
                kf[2 * h2] = __uint_as_float(uu[h2] << 16);
                kf[2 * h2 + 1] = __uint_as_float(uu[h2] & 0xffff0000u);
            }
#pragma unroll
            for (int gi = 0; gi < MG; gi++) {
                if (gi < G) {
                    const float4 *qq = (const float4 *)(qs + gi * HD + half * (HD / 2) + d8 * 8);
                    float4 q0 = qq[0], q1 = qq[1];
                    acc[gi] = fmaf(q0.x, kf[0], acc[gi]);
                    acc[gi] = fmaf(q0.y, kf[1], acc[gi]);
                    acc[gi] = fmaf(q0.z, kf[2], acc[gi]);
                    acc[gi] = fmaf(q0.w, kf[3], acc[gi]);
                    acc[gi] = fmaf(q1.x, kf[4], acc[gi]);
                    acc[gi] = fmaf(q1.y, kf[5], acc[gi]);
                    acc[gi] = fmaf(q1.z, kf[6], acc[gi]);
                    acc[gi] = fmaf(q1.w, kf[7], acc[gi]);
                }
            }
        }
#pragma unroll
        for (int gi = 0; gi < MG; gi++)
            if (gi < G) sc[half][gi][key] = acc[gi];
        __syncthreads();
        /* softmax statistics: warp w handles heads w, w + 4, ...; lane takes keys lane, lane + 32 */
        for (int gi = warp; gi < G; gi += DEC_THREADS / 32) {
            float e0 = lane < nk ? (sc[0][gi][lane] + sc[1][gi][lane]) * a.scale : -INFINITY;
            float e1 = lane + 32 < nk ? (sc[0][gi][lane + 32] + sc[1][gi][lane + 32]) * a.scale : -INFINITY;
            float mx = fmaxf(e0, e1);
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            float mold = mrow[gi], mnew = fmaxf(mold, mx);
            float p0v = lane < nk ? expf(e0 - mnew) : 0.0f, p1v = lane + 32 < nk ? expf(e1 - mnew) : 0.0f;
            sc[0][gi][lane] = p0v;
            sc[0][gi][lane + 32] = p1v;
            float sum = p0v + p1v;
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            __syncwarp(); /* every lane has read mrow[gi] */
            if (lane == 0) {
                float al = expf(mold - mnew); /* mold = -inf on the first pass: 0 */
                alpha[gi] = al;
                lrow[gi] = lrow[gi] * al + sum;
                mrow[gi] = mnew;
            }
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        /* o += p · v */
#pragma unroll
        for (int i = 0; i < MG; i++) {
            int gi = gsub + i * gstep;
            if (gi < G) {
                o[i].x *= alpha[gi];
                o[i].y *= alpha[gi];
            }
        }
        if (gsub < G) {
            const __nv_bfloat162 *vcol = (const __nv_bfloat162 *)vs + dp;
#pragma unroll 4
            for (int j = 0; j < nk; j++) {
                float2 vv = __bfloat1622float2(vcol[j * (HD / 2)]);
#pragma unroll
                for (int i = 0; i < MG; i++) {
                    int gi = gsub + i * gstep;
                    if (gi < G) {
                        float pj = sc[0][gi][j];
                        o[i].x = fmaf(pj, vv.x, o[i].x);
                        o[i].y = fmaf(pj, vv.y, o[i].y);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < MG; i++) {
        int gi = gsub + i * gstep;
        if (gi < G) {
            float *p = part + (pbase + (int64_t)gi * nsplit) * (HD + 2);
            if (dp == 0) {
                p[0] = mrow[gi];
                p[1] = lrow[gi];
            }
            p[2 + 2 * dp] = o[i].x;
            p[3 + 2 * dp] = o[i].y;
        }
    }
}

__global__ void att_combine_kernel(att_args a, const float *part, int nsplit) {
    __shared__ float scl[32]; /* exp(m_s - M) / L per split (nsplit <= 32) */
    qlr_pdl_wait();
    qlr_pdl_trigger();
    int64_t th = blockIdx.x; /* t * n_heads + h */
    int hd = (int)a.hd, tid = threadIdx.x;
    const float *p = part + th * nsplit * (hd + 2);
    if (tid < 32) {
        /* one warp: the splits' statistics loaded in parallel, reduced by shuffles */
        float m = tid < nsplit ? p[tid * (hd + 2)] : -INFINITY;
        float l = tid < nsplit ? p[tid * (hd + 2) + 1] : 0.0f;
        float M = m;
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
        float e = (m == -INFINITY) ? 0.0f : expf(m - M);
        float L = l * e;
        for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
        scl[tid] = L > 0.0f ? e / L : 0.0f;
    }
    __syncthreads();
    for (int d = tid; d < hd; d += blockDim.x) {
        float o = 0.0f;
        /* independent loads: the compiler keeps several in flight */
#pragma unroll 8
        for (int s = 0; s < nsplit; s++)
            if (scl[s] != 0.0f) o += p[s * (hd + 2) + 2 + d] * scl[s];
        a.out[th * hd + d] = __float2bfloat16_rn(o);
    }
}

/* ---- prefill: tiled WMMA flash attention ---- */

#define PF_BR 64
#define PF_BC 64
#define PF_WARPS 4
#define PF_LOADS 8 /* uint4 loads of K and of V in flight per thread */

struct pf_smem {
    int ldq, lds, ldp, ldo;
    size_t q, k, v, s, p, o, stat, bytes;
};

__host__ __device__ static pf_smem pf_layout(int hd) {
    pf_smem L;
    L.ldq = hd + 8;
    L.lds = PF_BC + 4;
    L.ldp = PF_BC + 8;
    L.ldo = hd + 4;
    L.q = 0;
    L.k = L.q + (size_t)PF_BR * L.ldq * 2;
    L.v = L.k + (size_t)PF_BC * L.ldq * 2;
    L.s = L.v + (size_t)PF_BC * L.ldq * 2;
    L.p = L.s + (size_t)PF_BR * L.lds * 4;
    L.o = L.p + (size_t)PF_BR * L.ldp * 2;
    L.stat = L.o + (size_t)PF_BR * L.ldo * 4;
    L.bytes = L.stat + (size_t)PF_BR * 4 * 4 + 64;
    return L;
}

__global__ void __launch_bounds__(PF_WARPS * 32) att_prefill_kernel(att_args a) {
    extern __shared__ __align__(128) unsigned char smraw[];
    int hd = (int)a.hd;
    pf_smem L = pf_layout(hd);
    bf16 *Qs = (bf16 *)(smraw + L.q), *Ks = (bf16 *)(smraw + L.k), *Vs = (bf16 *)(smraw + L.v);
    float *Ss = (float *)(smraw + L.s), *Os = (float *)(smraw + L.o);
    bf16 *Ps = (bf16 *)(smraw + L.p);
    int *rseq = (int *)(smraw + L.stat);           /* [BR] seq of each row (-1: no token) */
    int *rpos = rseq + PF_BR;                       /* [BR] */
    float *mrow = (float *)(rpos + PF_BR), *lrow = mrow + PF_BR;
    __shared__ int cur_s, kmax_s, next_s;

    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int64_t t0 = (int64_t)blockIdx.x * PF_BR;
    int h = blockIdx.y, G = (int)(a.n_heads / a.n_kv), g = h / G;
    const int64_t kv_stride = a.n_kv * hd;

    for (int r = tid; r < PF_BR; r += blockDim.x) {
        int64_t t = t0 + r;
        rseq[r] = t < a.n ? a.seq[t] : -1;
        rpos[r] = t < a.n ? a.pos[t] : -1;
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
    }
    /* Q tile and a zeroed O */
    int hd8 = hd / 8;
    for (int i = tid; i < PF_BR * hd8; i += blockDim.x) {
        int r = i / hd8, c8 = i % hd8;
        int64_t t = t0 + r;
        uint4 u = make_uint4(0, 0, 0, 0);
        if (t < a.n) u = *(const uint4 *)(a.q + (t * a.n_heads + h) * hd + c8 * 8);
        *(uint4 *)(Qs + r * L.ldq + c8 * 8) = u;
    }
    for (int i = tid; i < PF_BR * hd; i += blockDim.x) Os[(i / hd) * L.ldo + i % hd] = 0.0f;
    __syncthreads(); /* rseq complete before thread 0 scans it (racecheck found the gap) */
    if (tid == 0) {
        int mn = INT_MAX;
        for (int r = 0; r < PF_BR; r++)
            if (rseq[r] >= 0 && rseq[r] < mn) mn = rseq[r];
        cur_s = mn == INT_MAX ? -1 : mn;
    }
    __syncthreads();

    while (cur_s >= 0) {
        int cs = cur_s;
        if (tid == 0) {
            int km = -1, nx = INT_MAX;
            for (int r = 0; r < PF_BR; r++) {
                if (rseq[r] == cs && rpos[r] > km) km = rpos[r];
                if (rseq[r] > cs && rseq[r] < nx) nx = rseq[r];
            }
            kmax_s = km;
            next_s = nx == INT_MAX ? -1 : nx;
        }
        __syncthreads();
        int kmax = kmax_s;
        const bf16 *kb = a.kc + ((int64_t)cs * a.ctx * a.n_kv + g) * hd;
        const bf16 *vb = a.vc + ((int64_t)cs * a.ctx * a.n_kv + g) * hd;
        for (int j0 = 0; j0 <= kmax; j0 += PF_BC) {
            /* every load of the tile is issued before the first store (a store right after its
             * load would wait a full memory latency per element) */
            for (int base = tid; base < PF_BC * hd8; base += PF_LOADS * PF_WARPS * 32) {
                uint4 ku[PF_LOADS], vu[PF_LOADS];
#pragma unroll
                for (int u = 0; u < PF_LOADS; u++) {
                    int i = base + u * PF_WARPS * 32, r = i / hd8, c8 = i % hd8;
                    ku[u] = vu[u] = make_uint4(0, 0, 0, 0);
                    if (i < PF_BC * hd8 && j0 + r <= kmax) {
                        ku[u] = __ldg((const uint4 *)(kb + (int64_t)(j0 + r) * kv_stride + c8 * 8));
                        vu[u] = __ldg((const uint4 *)(vb + (int64_t)(j0 + r) * kv_stride + c8 * 8));
                    }
                }
#pragma unroll
                for (int u = 0; u < PF_LOADS; u++) {
                    int i = base + u * PF_WARPS * 32, r = i / hd8, c8 = i % hd8;
                    if (i < PF_BC * hd8) {
                        *(uint4 *)(Ks + r * L.ldq + c8 * 8) = ku[u];
                        *(uint4 *)(Vs + r * L.ldq + c8 * 8) = vu[u];
                    }
                }
            }
            __syncthreads();
            /* S_w [16, 64] = Q_w · Kᵀ */
            for (int nt = 0; nt < PF_BC / 16; nt++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::fill_fragment(acc, 0.0f);
                for (int kk = 0; kk < hd / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> fb;
                    wmma::load_matrix_sync(fa, Qs + warp * 16 * L.ldq + kk * 16, L.ldq);
                    wmma::load_matrix_sync(fb, Ks + nt * 16 * L.ldq + kk * 16, L.ldq);
                    wmma::mma_sync(acc, fa, fb, acc);
                }
                wmma::store_matrix_sync(Ss + warp * 16 * L.lds + nt * 16, acc, L.lds,
                                        wmma::mem_row_major);
            }
            __syncwarp();
            /* online softmax: two lanes per row, 32 columns each */
            {
                int r = warp * 16 + (lane >> 1), c0 = (lane & 1) * 32;
                bool live = rseq[r] == cs;
                int rp = rpos[r];
                float *srow = Ss + r * L.lds;
                float mx = -INFINITY;
                for (int c = c0; c < c0 + 32; c++) {
                    int key = j0 + c;
                    float v = (live && key <= rp) ? srow[c] * a.scale : -INFINITY;
                    srow[c] = v;
                    mx = fmaxf(mx, v);
                }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                float mold = mrow[r], mnew = fmaxf(mold, mx);
                float al = (mnew == -INFINITY) ? 1.0f : expf(mold - mnew);
                float sum = 0.0f;
                bf16 *prow = Ps + r * L.ldp;
                for (int c = c0; c < c0 + 32; c++) {
                    float e = (srow[c] == -INFINITY) ? 0.0f : expf(srow[c] - mnew);
                    sum += e;
                    prow[c] = __float2bfloat16_rn(e);
                }
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                float *orow = Os + r * L.ldo;
                int hh = hd / 2, d0 = (lane & 1) * hh;
                if (al != 1.0f)
                    for (int d = d0; d < d0 + hh; d++) orow[d] *= al;
                __syncwarp();
                if ((lane & 1) == 0) {
                    mrow[r] = mnew;
                    lrow[r] = lrow[r] * al + sum;
                }
            }
            __syncwarp();
            /* O_w [16, hd] += P_w [16, 64] · V [64, hd] */
            for (int dt = 0; dt < hd / 16; dt++) {
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
                wmma::load_matrix_sync(acc, Os + warp * 16 * L.ldo + dt * 16, L.ldo,
                                       wmma::mem_row_major);
                for (int kk = 0; kk < PF_BC / 16; kk++) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> fa;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> fb;
                    wmma::load_matrix_sync(fa, Ps + warp * 16 * L.ldp + kk * 16, L.ldp);
                    wmma::load_matrix_sync(fb, Vs + kk * 16 * L.ldq + dt * 16, L.ldq);
                    wmma::mma_sync(acc, fa, fb, acc);
                }
                wmma::store_matrix_sync(Os + warp * 16 * L.ldo + dt * 16, acc, L.ldo,
                                        wmma::mem_row_major);
            }
            __syncthreads();
        }
        if (tid == 0) cur_s = next_s;
        __syncthreads();
    }
    for (int i = tid; i < PF_BR * hd; i += blockDim.x) {
        int r = i / hd, d = i % hd;
        int64_t t = t0 + r;
        if (t >= a.n) continue;
        float l = lrow[r];
        float v = l > 0.0f ? Os[r * L.ldo + d] / l : 0.0f;
        a.out[(t * a.n_heads + h) * hd + d] = __float2bfloat16_rn(v);
    }
}

qlr_status qlr_cuda_attention(qlr_backend *be, void *out, const void *q, const void *k_cache,
                              const void *v_cache, const int32_t *seq, const int32_t *pos,
                              int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx,
                              float scale) {
    if (n <= 0) return QLR_OK;
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0);
    if (hd % 16 != 0 || hd > 256)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda attention: head_dim %lld (needs a multiple "
                          "of 16, at most 256)", (long long)hd);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    att_args a = {(bf16 *)out, (const bf16 *)q, (const bf16 *)k_cache, (const bf16 *)v_cache,
                  seq, pos, n, n_heads, n_kv, hd, ctx, scale};
    if (n > 64 || (hd != 64 && hd != 128) || n_heads / n_kv > DEC_MAXG) {
        pf_smem L = pf_layout((int)hd);
        QLR_CK(cudaFuncSetAttribute(att_prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)L.bytes));
        dim3 grid((unsigned)((n + PF_BR - 1) / PF_BR), (unsigned)n_heads);
        att_prefill_kernel<<<grid, PF_WARPS * 32, L.bytes, im->stream>>>(a);
        QLR_CK_LAUNCH();
        return QLR_OK;
    }
    /* splits of at least DEC_KEYS keys; the kernel sizes them from the real length on the device */
    int64_t nsplit = (ctx + DEC_KEYS - 1) / DEC_KEYS;
    if (nsplit > 32) nsplit = 32;
    if (nsplit < 1) nsplit = 1;
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)(n * n_heads * nsplit * (hd + 2)) * 4, &ws));
    dim3 grid((unsigned)nsplit, (unsigned)n_kv, (unsigned)n);
    int G = (int)(n_heads / n_kv);
#define DEC_LAUNCH(HD_, MG_)                                                                      \
    QLR_CK(qlr_cuda_launch(att_decode_kernel<HD_, MG_>, grid, dim3(DEC_THREADS), 0, im->stream, 1, \
                           a, (float *)ws))
    if (hd == 64) {
        if (G <= 4) DEC_LAUNCH(64, 4);
        else if (G <= 8) DEC_LAUNCH(64, 8);
        else DEC_LAUNCH(64, 16);
    } else {
        if (G <= 4) DEC_LAUNCH(128, 4);
        else if (G <= 8) DEC_LAUNCH(128, 8);
        else DEC_LAUNCH(128, 16);
    }
#undef DEC_LAUNCH
    QLR_CK_LAUNCH();
    QLR_CK(qlr_cuda_launch(att_combine_kernel, dim3((unsigned)(n * n_heads)), dim3(128), 0,
                           im->stream, 1, a, (const float *)ws, (int)nsplit));
    QLR_CK_LAUNCH();
    return QLR_OK;
}
