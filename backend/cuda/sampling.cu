/* backend/cuda/sampling.cu: token sampling on the GPU with exactly the CPU reference's semantics
 * (backend/cpu/ops_sample.c): greedy = argmax with ties to the lowest id; otherwise temperature,
 * top-k, top-p on the renormalised distribution and one draw, candidates ordered by (logit desc,
 * id asc). Instead of sorting the vocabulary, each decision ("the k-th candidate", "the first
 * candidate whose cumulative weight reaches T") is a bitwise search over the order-preserving
 * integer key of the logits: 32 block-wide counting or summing passes, sums in f64 like the CPU.
 * The host draws the uniform from the per-sequence splitmix64 stream (advancing it exactly as the
 * CPU does) and passes it in; the ids come back through pinned memory (one sync per step). */
#include "backend/cuda/cuda_internal.h"

#include <limits.h>
#include <string.h>

#define SAMPLE_THREADS 1024

struct row_param {
    float temperature, top_p;
    int32_t top_k, greedy;
    double u01;
};

__device__ __forceinline__ uint32_t fkey(float f) {
    uint32_t u = __float_as_uint(f);
    if (u == 0x80000000u) u = 0; /* -0 == +0, as the CPU's float comparison sees them */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename T>
__device__ T block_sum(T v, T *red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    T s = 0;
    for (int i = 0; i < SAMPLE_THREADS / 32; i++) s += red[i];
    return s;
}

struct row_ctx {
    const float *x;
    const float *w;     /* weights exp((x - max) / T) as f32 (as the CPU rounds them) */
    int64_t vocab;
    int topk_on;
    uint32_t tk;        /* top-k threshold key */
    int64_t idcut;      /* ties at tk are in when id <= idcut */
};

__device__ __forceinline__ bool in_set(const row_ctx &c, int64_t i, uint32_t k) {
    return !c.topk_on || k > c.tk || (k == c.tk && i <= c.idcut);
}

/* F(τ) = Σ w over candidates with key >= τ (key > τ when strict) */
__device__ double mass_ge(const row_ctx &c, uint32_t tau, bool strict, double *red) {
    double s = 0.0;
#pragma unroll 8
    for (int64_t i = threadIdx.x; i < c.vocab; i += SAMPLE_THREADS) {
        uint32_t k = fkey(c.x[i]);
        if (in_set(c, i, k) && (strict ? k > tau : k >= tau)) s += (double)c.w[i];
    }
    return block_sum(s, red);
}

/* The first candidate in (key desc, id asc) order whose running weight passes `target`
 * (>= when ge, else >); -1 when none does (rounding at the end of the distribution).
 * *cum_out receives the running weight through that candidate. */
__device__ int64_t first_crossing(const row_ctx &c, double target, bool ge, double *cum_out,
                                  double *red, long long *redi, int64_t *sh) {
    uint32_t tau = 0;
    for (int bit = 31; bit >= 0; bit--) {
        uint32_t cand = tau | (1u << bit);
        double f = mass_ge(c, cand, false, red);
        if (ge ? f >= target : f > target) tau = cand;
    }
    double f = mass_ge(c, tau, false, red);
    if (!(ge ? f >= target : f > target)) return -1;
    double before = mass_ge(c, tau, true, red);
    /* the candidates at key tau: usually one, found in parallel; exact ties walk in id order */
    long long nt = 0;
    long long first_id = LLONG_MAX;
    for (int64_t i = threadIdx.x; i < c.vocab; i += SAMPLE_THREADS) {
        uint32_t k = fkey(c.x[i]);
        if (k == tau && in_set(c, i, k)) {
            nt++;
            if (i < first_id) first_id = i;
        }
    }
    nt = block_sum(nt, redi);
    for (int o = 16; o > 0; o >>= 1) {
        long long oi = __shfl_xor_sync(0xffffffffu, first_id, o);
        first_id = oi < first_id ? oi : first_id;
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) redi[threadIdx.x >> 5] = first_id;
    __syncthreads();
    if (threadIdx.x == 0) {
        long long f = LLONG_MAX;
        for (int i = 0; i < SAMPLE_THREADS / 32; i++) f = redi[i] < f ? redi[i] : f;
        sh[0] = f;
    }
    __syncthreads();
    if (nt == 1) {
        int64_t r = sh[0];
        *cum_out = before + (double)c.w[r];
        __syncthreads();
        return r;
    }
    if (threadIdx.x == 0) {
        double cum = before;
        int64_t found = -1, last = -1;
        for (int64_t i = 0; i < c.vocab; i++) {
            uint32_t k = fkey(c.x[i]);
            if (k != tau || !in_set(c, i, k)) continue;
            cum += (double)c.w[i];
            last = i;
            if (ge ? cum >= target : cum > target) {
                found = i;
                break;
            }
        }
        if (found < 0) found = last;
        sh[0] = found;
        *(double *)&sh[1] = cum;
    }
    __syncthreads();
    int64_t r = sh[0];
    *cum_out = *(double *)&sh[1];
    __syncthreads();
    (void)redi;
    return r;
}

__device__ long long count_ge(const float *x, int64_t vocab, uint32_t tau, bool strict,
                              long long *redi) {
    long long n = 0;
#pragma unroll 8
    for (int64_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        uint32_t k = fkey(x[i]);
        n += strict ? (k > tau) : (k >= tau);
    }
    return block_sum(n, redi);
}

__global__ void __launch_bounds__(SAMPLE_THREADS) sample_kernel(const float *logits, float *wbuf,
                                                                const row_param *prm,
                                                                int32_t *ids, int64_t vocab) {
    __shared__ double red[SAMPLE_THREADS / 32];
    __shared__ long long redi[SAMPLE_THREADS / 32];
    __shared__ float redf[SAMPLE_THREADS / 32];
    __shared__ int64_t redx[SAMPLE_THREADS / 32];
    __shared__ int64_t sh[2];
    int64_t row = blockIdx.x;
    const float *x = logits + row * vocab;
    row_param p = prm[row];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    /* argmax, ties to the lowest id (also the max for the weights) */
    float bv = -INFINITY;
    int64_t bi = -1;
#pragma unroll 8
    for (int64_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        float v = x[i];
        if (bi < 0 || v > bv) {
            bv = v;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi >= 0 && (bi < 0 || ov > bv || (ov == bv && oi < bi))) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        redf[warp] = bv;
        redx[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float v = redf[0];
        int64_t b = redx[0];
        for (int w = 1; w < SAMPLE_THREADS / 32; w++)
            if (redx[w] >= 0 && (b < 0 || redf[w] > v || (redf[w] == v && redx[w] < b))) {
                v = redf[w];
                b = redx[w];
            }
        sh[0] = b;
        redf[0] = v;
    }
    __syncthreads();
    int64_t amax = sh[0];
    float mx = redf[0];
    __syncthreads();
    if (p.greedy) {
        if (threadIdx.x == 0) ids[row] = (int32_t)amax;
        return;
    }

    row_ctx c;
    c.x = x;
    c.vocab = vocab;
    c.w = wbuf + row * vocab;
    c.topk_on = 0;
    c.tk = 0;
    c.idcut = INT64_MAX;
    double inv_t = 1.0 / (double)p.temperature;
    float *w = wbuf + row * vocab;
    for (int64_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS)
        w[i] = (float)exp((double)(x[i] - mx) * inv_t);
    __syncthreads();

    if (p.top_k > 0 && p.top_k < vocab) {
        long long K = p.top_k;
        uint32_t tau = 0;
        for (int bit = 31; bit >= 0; bit--) {
            uint32_t cand = tau | (1u << bit);
            if (count_ge(x, vocab, cand, false, redi) >= K) tau = cand;
        }
        long long gt = count_ge(x, vocab, tau, true, redi);
        long long need = K - gt; /* ties at tau to keep, lowest ids first */
        int64_t lo = 0, hi = vocab - 1;
        while (lo < hi) { /* smallest id c with #(ties with id <= c) >= need */
            int64_t mid = (lo + hi) / 2;
            long long cnt = 0;
            for (int64_t i = threadIdx.x; i <= mid; i += SAMPLE_THREADS) cnt += fkey(x[i]) == tau;
            cnt = block_sum(cnt, redi);
            if (cnt >= need) hi = mid;
            else lo = mid + 1;
        }
        c.topk_on = 1;
        c.tk = tau;
        c.idcut = lo;
    }
    double sum = mass_ge(c, 0, false, red);
    if (p.top_p > 0.0f && p.top_p < 1.0f) {
        double target = (double)p.top_p * sum, cum = 0.0;
        int64_t j = first_crossing(c, target, true, &cum, red, redi, sh);
        if (j >= 0) sum = cum; /* else all candidates are kept (rounding) */
    }
    double cum;
    int64_t pick = first_crossing(c, p.u01 * sum, false, &cum, red, redi, sh);
    if (pick < 0) {
        /* past the end by rounding: the CPU returns the last kept candidate, the smallest weight
         * in order (lowest key, then highest id) */
        pick = first_crossing(c, 0.0, false, &cum, red, redi, sh);
        uint32_t lowk = 0xffffffffu;
        for (int64_t i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            uint32_t k = fkey(x[i]);
            if (in_set(c, i, k) && k < lowk) lowk = k;
        }
        for (int o = 16; o > 0; o >>= 1) lowk = min(lowk, __shfl_xor_sync(0xffffffffu, lowk, o));
        if (lane == 0) redi[warp] = lowk;
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t lk = 0xffffffffu;
            for (int i = 0; i < SAMPLE_THREADS / 32; i++) lk = min(lk, (uint32_t)redi[i]);
            int64_t last = pick;
            for (int64_t i = 0; i < vocab; i++)
                if (fkey(x[i]) == lk && in_set(c, i, lk)) last = i;
            sh[0] = last;
        }
        __syncthreads();
        pick = sh[0];
    }
    if (threadIdx.x == 0) ids[row] = (int32_t)pick;
}

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

qlr_status qlr_cuda_sample(qlr_backend *be, int32_t *out_ids, float *logits,
                           const qlr_sampling *params, uint64_t *rng, int64_t n, int64_t vocab) {
    if (n <= 0) return QLR_OK;
    qlr_cuda_impl *im = qlr_cuda_im(be);
    size_t pbytes = (size_t)n * sizeof(row_param), ibytes = (size_t)n * sizeof(int32_t);
    size_t need = ((pbytes + 255) & ~(size_t)255) + ibytes;
    if (need > im->h_pinned_bytes) {
        QLR_CK(cudaStreamSynchronize(im->stream));
        QLR_CK(cudaFreeHost(im->h_pinned));
        QLR_CK(cudaFree(im->d_stage));
        im->h_pinned = NULL;
        im->d_stage = NULL;
        im->h_pinned_bytes = 0;
        QLR_CK(cudaMallocHost(&im->h_pinned, need));
        QLR_CK(cudaMalloc(&im->d_stage, need));
        im->h_pinned_bytes = need;
    }
    row_param *hp = (row_param *)im->h_pinned;
    int32_t *hids = (int32_t *)((char *)im->h_pinned + ((pbytes + 255) & ~(size_t)255));
    int any_random = 0;
    for (int64_t i = 0; i < n; i++) {
        const qlr_sampling *sp = &params[i];
        hp[i].temperature = sp->temperature;
        hp[i].top_k = sp->top_k;
        hp[i].top_p = sp->top_p;
        hp[i].greedy = sp->temperature <= 0.0f || sp->top_k == 1;
        hp[i].u01 = 0.0;
        if (!hp[i].greedy) {
            hp[i].u01 = (double)(rng_next(&rng[i]) >> 11) * 0x1.0p-53;
            any_random = 1;
        }
    }
    float *wbuf = NULL;
    if (any_random) {
        void *ws;
        QLR_TRY(qlr_cuda_ws(be, (size_t)(n * vocab) * 4, &ws));
        wbuf = (float *)ws;
    }
    row_param *dp = (row_param *)im->d_stage;
    int32_t *dids = (int32_t *)((char *)im->d_stage + ((pbytes + 255) & ~(size_t)255));
    QLR_CK(cudaMemcpyAsync(dp, hp, pbytes, cudaMemcpyHostToDevice, im->stream));
    sample_kernel<<<(unsigned)n, SAMPLE_THREADS, 0, im->stream>>>(logits, wbuf, dp, dids, vocab);
    QLR_CK_LAUNCH();
    QLR_CK(cudaMemcpyAsync(hids, dids, ibytes, cudaMemcpyDeviceToHost, im->stream));
    QLR_CK(cudaStreamSynchronize(im->stream));
    memcpy(out_ids, hids, ibytes);
    return QLR_OK;
}
