/* backend/cuda/attention_paged.cu: the paged KV cache ops (serving): kv_store_paged writes each
 * token's K/V row to its pool row (slot = block_id * block + offset), and attention_paged is the
 * causal GQA attention of any mix of prefill and decode tokens over sequences whose rows are
 * found through a block table [n_seqs, width]. It does not own the pool or the block tables
 * (model/ and infer/ do).
 *
 * attention_paged is a split-KV ("flash decoding") kernel: one block per (token, KV head,
 * split) walks its keys in tiles of PG_TK rows (K and V gathered through the block table into
 * shared memory), scores the G query heads of the group, keeps an online softmax per head in
 * f32 and writes unnormalised partials {m, l, o[hd]}; a second kernel combines the splits. Any
 * head_dim that is a multiple of 8 up to 256, any group size. Correct first: a long prefill
 * re-reads the keys once per token (a tiled prefill kernel is a later optimisation). */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

/* ---- kv_store_paged ---- */

__global__ void kv_store_paged_kernel(bf16 *kp, bf16 *vp, const bf16 *k, const bf16 *v,
                                      const int32_t *slot, int64_t n, int64_t row8,
                                      int64_t n_rows) {
    /* row8 = n_kv * hd / 8 uint4 per token row */
    int64_t total = n * row8;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / row8, j = i % row8;
        int64_t s = slot[t];
        if (s < 0 || s >= n_rows) continue; /* negative: not stored; past the pool: caller bug */
        ((uint4 *)kp)[s * row8 + j] = ((const uint4 *)k)[i];
        ((uint4 *)vp)[s * row8 + j] = ((const uint4 *)v)[i];
    }
}

qlr_status qlr_cuda_kv_store_paged(qlr_backend *be, void *k_pool, void *v_pool, const void *k,
                                   const void *v, const int32_t *slot, int64_t n, int64_t n_kv,
                                   int64_t hd, int64_t n_rows) {
    if (n <= 0) return QLR_OK;
    QLR_ASSERT((n_kv * hd) % 8 == 0);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    int64_t row8 = n_kv * hd / 8, total = n * row8;
    int64_t blocks = (total + 255) / 256, cap = (int64_t)im->n_sm * 8;
    kv_store_paged_kernel<<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, im->stream>>>(
        (bf16 *)k_pool, (bf16 *)v_pool, (const bf16 *)k, (const bf16 *)v, slot, n, row8, n_rows);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

/* ---- attention_paged: split-KV ---- */

#define PG_THREADS 128
#define PG_TK 32       /* keys per tile: one per lane in the softmax */
#define PG_MAX_SPLIT 32

struct pg_args {
    bf16 *out;
    const bf16 *q, *kp, *vp;
    const int32_t *btab, *seq, *pos;
    int64_t width, block, n, n_heads, n_kv, hd;
    float scale;
};

/* Shared memory of one block for G query heads of head_dim hd (offsets in bytes; V first so its
 * 16-byte stores are aligned; K rows padded by one word so that the lanes of a warp, one key
 * each, read different banks). */
struct pg_smem {
    size_t v, q, o, k, p, stat, bytes;
    int kw; /* words per K row */
};

__host__ __device__ static pg_smem pg_layout(int G, int hd) {
    pg_smem L;
    L.kw = hd / 2 + 1;
    L.v = 0;
    L.q = L.v + (size_t)PG_TK * hd * 2;
    L.o = L.q + (size_t)G * hd * 4;
    L.k = L.o + (size_t)G * hd * 4;
    L.p = L.k + (size_t)PG_TK * L.kw * 4;
    L.stat = L.p + (size_t)G * PG_TK * 4;
    L.bytes = L.stat + (size_t)G * 3 * 4;
    return L;
}

/* partial layout: [(t * n_heads + h) * nsplit + s] -> {m, l, o[hd]} f32 */
__global__ void __launch_bounds__(PG_THREADS) att_paged_split_kernel(pg_args a, float *part) {
    extern __shared__ __align__(16) unsigned char pg_raw[];
    const int hd = (int)a.hd, G = (int)(a.n_heads / a.n_kv), tid = threadIdx.x;
    const int lane = tid & 31, warp = tid >> 5;
    const int nsplit = gridDim.z, s = blockIdx.z, g = blockIdx.y;
    const int64_t t = blockIdx.x;
    pg_smem L = pg_layout(G, hd);
    bf16 *vs = (bf16 *)(pg_raw + L.v);
    float *qs = (float *)(pg_raw + L.q), *os = (float *)(pg_raw + L.o);
    uint32_t *ks = (uint32_t *)(pg_raw + L.k);
    float *ps = (float *)(pg_raw + L.p);
    float *mrow = (float *)(pg_raw + L.stat), *lrow = mrow + G, *alpha = lrow + G;

    int64_t len = (int64_t)a.pos[t] + 1, sq = a.seq[t];
    if (len > a.width * a.block) len = a.width * a.block; /* the caller validates; never past */
    int64_t chunk = (len + nsplit - 1) / nsplit;
    chunk = (chunk + PG_TK - 1) / PG_TK * PG_TK;
    const int64_t k0 = s * chunk, k1 = k0 + chunk < len ? k0 + chunk : len;
    const int64_t pbase = (t * a.n_heads + (int64_t)g * G) * nsplit + s;
    if (k0 >= k1) {
        for (int gi = tid; gi < G; gi += PG_THREADS) {
            float *p = part + (pbase + (int64_t)gi * nsplit) * (hd + 2);
            p[0] = -INFINITY;
            p[1] = 0.0f;
        }
        return;
    }
    const bf16 *qp = a.q + (t * a.n_heads + (int64_t)g * G) * hd;
    for (int i = tid; i < G * hd; i += PG_THREADS) {
        qs[i] = __bfloat162float(qp[i]);
        os[i] = 0.0f;
    }
    for (int gi = tid; gi < G; gi += PG_THREADS) {
        mrow[gi] = -INFINITY;
        lrow[gi] = 0.0f;
    }
    const int hd8 = hd / 8, hw = hd / 2;
    const int32_t *brow = a.btab + sq * a.width;
    for (int64_t p0 = k0; p0 < k1; p0 += PG_TK) {
        const int nk = (int)(k1 - p0 < PG_TK ? k1 - p0 : PG_TK);
        __syncthreads(); /* the previous tile's K/V/P are consumed; qs, os, stats written */
        for (int i = tid; i < nk * hd8; i += PG_THREADS) {
            int j = i / hd8, c = i % hd8;
            int64_t p = p0 + j;
            int64_t row = (int64_t)brow[p / a.block] * a.block + p % a.block;
            int64_t off = (row * a.n_kv + g) * hd + c * 8;
            uint4 ku = __ldg((const uint4 *)(a.kp + off));
            uint4 vu = __ldg((const uint4 *)(a.vp + off));
            *(uint4 *)(vs + j * hd + c * 8) = vu;
            uint32_t *kd = ks + j * L.kw + c * 4;
            kd[0] = ku.x;
            kd[1] = ku.y;
            kd[2] = ku.z;
            kd[3] = ku.w;
        }
        __syncthreads();
        /* scores: consecutive threads take consecutive keys of one head */
        for (int i = tid; i < G * PG_TK; i += PG_THREADS) {
            int gi = i / PG_TK, j = i % PG_TK;
            float sc = -INFINITY;
            if (j < nk) {
                const uint32_t *kr = ks + j * L.kw;
                const float2 *qv = (const float2 *)(qs + gi * hd);
                float acc = 0.0f;
                for (int w = 0; w < hw; w++) {
                    uint32_t u = kr[w];
                    float2 qq = qv[w];
                    acc = fmaf(qq.x, __uint_as_float(u << 16), acc);
                    acc = fmaf(qq.y, __uint_as_float(u & 0xffff0000u), acc);
                }
                sc = acc * a.scale;
            }
            ps[gi * PG_TK + j] = sc;
        }
        __syncthreads();
        /* online softmax: warp w takes heads w, w + 4, ...; lane = key */
        for (int gi = warp; gi < G; gi += PG_THREADS / 32) {
            float e = ps[gi * PG_TK + lane];
            float mx = e;
            for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            float mold = mrow[gi], mnew = fmaxf(mold, mx); /* finite: nk >= 1 */
            float pv = lane < nk ? expf(e - mnew) : 0.0f;
            float sum = pv;
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            ps[gi * PG_TK + lane] = pv;
            __syncwarp(); /* every lane has read mrow[gi] */
            if (lane == 0) {
                float al = expf(mold - mnew); /* mold = -inf on the first tile: 0 */
                alpha[gi] = al;
                lrow[gi] = lrow[gi] * al + sum;
                mrow[gi] = mnew;
            }
        }
        __syncthreads();
        /* o = o * alpha + p · v; consecutive threads take consecutive dims */
        for (int i = tid; i < G * hd; i += PG_THREADS) {
            int gi = i / hd, d = i % hd;
            const float *pr = ps + gi * PG_TK;
            float acc = os[i] * alpha[gi];
            for (int j = 0; j < nk; j++) acc = fmaf(pr[j], __bfloat162float(vs[j * hd + d]), acc);
            os[i] = acc;
        }
    }
    __syncthreads();
    for (int i = tid; i < G * (hd + 2); i += PG_THREADS) {
        int gi = i / (hd + 2), c = i % (hd + 2);
        float *p = part + (pbase + (int64_t)gi * nsplit) * (hd + 2);
        p[c] = c == 0 ? mrow[gi] : c == 1 ? lrow[gi] : os[gi * hd + c - 2];
    }
}

/* One block per (token, query head): out = Σ_s exp(m_s - M) o_s / Σ_s exp(m_s - M) l_s. */
__global__ void att_paged_combine_kernel(pg_args a, const float *part, int nsplit) {
    __shared__ float scl[PG_MAX_SPLIT];
    const int64_t th = blockIdx.x; /* t * n_heads + h */
    const int hd = (int)a.hd, tid = threadIdx.x;
    const float *p = part + th * nsplit * (hd + 2);
    if (tid < 32) {
        float m = tid < nsplit ? p[tid * (hd + 2)] : -INFINITY;
        float l = tid < nsplit ? p[tid * (hd + 2) + 1] : 0.0f;
        float M = m;
        for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
        float e = m == -INFINITY ? 0.0f : expf(m - M);
        float Lsum = l * e;
        for (int o = 16; o > 0; o >>= 1) Lsum += __shfl_xor_sync(0xffffffffu, Lsum, o);
        scl[tid] = Lsum > 0.0f ? e / Lsum : 0.0f;
    }
    __syncthreads();
    for (int d = tid; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < nsplit; s++)
            if (scl[s] != 0.0f) o += p[s * (hd + 2) + 2 + d] * scl[s];
        a.out[th * hd + d] = __float2bfloat16_rn(o);
    }
}

qlr_status qlr_cuda_attention_paged(qlr_backend *be, void *out, const void *q, const void *k_pool,
                                    const void *v_pool, const int32_t *block_table, int64_t width,
                                    int64_t block, const int32_t *seq, const int32_t *pos,
                                    int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                    float scale) {
    if (n <= 0) return QLR_OK;
    QLR_ASSERT(n_kv > 0 && n_heads % n_kv == 0 && block > 0 && width > 0);
    if (hd % 8 != 0 || hd > 256)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda paged attention: head_dim %lld (needs a "
                          "multiple of 8, at most 256)", (long long)hd);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    int G = (int)(n_heads / n_kv);
    pg_smem L = pg_layout(G, (int)hd);
    if (L.bytes > 200 * 1024)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda paged attention: %d query heads per KV head "
                          "of head_dim %lld need %zu bytes of shared memory", G, (long long)hd,
                          L.bytes);
    /* Splits: enough to cover the longest sequence in tiles of a few hundred keys, no more
     * than it takes to fill the GPU (the kernel sizes each split from the real length). */
    int64_t keys = width * block;
    int64_t nsplit = (keys + 255) / 256;
    int64_t fill = ((int64_t)im->n_sm * 4 + n * n_kv - 1) / (n * n_kv);
    if (nsplit > fill) nsplit = fill;
    if (nsplit > PG_MAX_SPLIT) nsplit = PG_MAX_SPLIT;
    if (nsplit < 1) nsplit = 1;
    void *ws;
    QLR_TRY(qlr_cuda_ws(be, (size_t)(n * n_heads * nsplit * (hd + 2)) * 4, &ws));
    if (L.bytes > 48 * 1024)
        QLR_CK(cudaFuncSetAttribute(att_paged_split_kernel,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L.bytes));
    pg_args a = {(bf16 *)out, (const bf16 *)q, (const bf16 *)k_pool, (const bf16 *)v_pool,
                 block_table, seq, pos, width, block, n, n_heads, n_kv, hd, scale};
    dim3 grid((unsigned)n, (unsigned)n_kv, (unsigned)nsplit); /* tokens in x: no 65535 limit */
    att_paged_split_kernel<<<grid, PG_THREADS, L.bytes, im->stream>>>(a, (float *)ws);
    QLR_CK_LAUNCH();
    att_paged_combine_kernel<<<(unsigned)(n * n_heads), 128, 0, im->stream>>>(a, (const float *)ws,
                                                                              (int)nsplit);
    QLR_CK_LAUNCH();
    return QLR_OK;
}
