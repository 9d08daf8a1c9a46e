/* backend/cuda/rope.cu: rotary position embedding in place on bf16 [n, n_heads, hd], rotate-half
 * (HF/NeoX) convention, one position per token (packed and batched sequences), inverse
 * frequencies precomputed by the model (llama3 scaling included there). The angle is the f32
 * product pos · inv_freq as in HF and the CPU reference; sinf/cosf are the accurate versions. */
#include "backend/cuda/cuda_internal.h"

typedef __nv_bfloat16 bf16;

__global__ void rope_kernel(bf16 *x, const int32_t *pos, const float *inv_freq, int64_t n,
                            int64_t n_heads, int64_t hd, float sign) {
    int64_t half = hd / 2, total = n * n_heads * half;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = i % half, th = i / half, t = th / n_heads;
        float ang = (float)pos[t] * inv_freq[j];
        float sn, cs;
        sincosf(ang, &sn, &cs);
        sn *= sign;
        bf16 *v = x + th * hd;
        float x1 = __bfloat162float(v[j]), x2 = __bfloat162float(v[j + half]);
        v[j] = __float2bfloat16_rn(x1 * cs - x2 * sn);
        v[j + half] = __float2bfloat16_rn(x2 * cs + x1 * sn);
    }
}

static qlr_status rope_launch(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                              int64_t n, int64_t n_heads, int64_t hd, float sign) {
    QLR_ASSERT(hd % 2 == 0);
    int64_t total = n * n_heads * (hd / 2);
    if (total <= 0) return QLR_OK;
    int64_t blocks = (total + 255) / 256, cap = (int64_t)qlr_cuda_im(be)->n_sm * 16;
    rope_kernel<<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, qlr_cuda_im(be)->stream>>>(
        (bf16 *)x, pos, inv_freq, n, n_heads, hd, sign);
    QLR_CK_LAUNCH();
    return QLR_OK;
}

qlr_status qlr_cuda_rope(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                         int64_t n, int64_t n_heads, int64_t hd) {
    return rope_launch(be, x, pos, inv_freq, n, n_heads, hd, 1.0f);
}

qlr_status qlr_cuda_rope_bwd(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                             int64_t n, int64_t n_heads, int64_t hd) {
    return rope_launch(be, x, pos, inv_freq, n, n_heads, hd, -1.0f);
}

/* ---- fused RoPE on q and k + KV store (the rope_kv_store op): one thread per rotated pair of
 * q or k (a k pair is also written into the cache) or per 16 bytes of v. The same arithmetic
 * as rope_kernel and kv_store. Launched with programmatic dependent launch. */
__global__ void rope_kv_kernel(bf16 *q, bf16 *k, const bf16 *v, bf16 *kc, bf16 *vc,
                               const int32_t *seq, const int32_t *pos, const float *inv_freq,
                               int64_t n, int64_t nh, int64_t nkv, int64_t hd, int64_t ctx) {
    qlr_pdl_trigger();
    qlr_pdl_wait();
    int64_t half = hd / 2, nrot = n * (nh + nkv) * half, row8 = nkv * hd / 8;
    int64_t total = nrot + n * row8;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        if (i < nrot) {
            int64_t j = i % half, th = i / half, t = th / (nh + nkv), h = th % (nh + nkv);
            float ang = (float)pos[t] * inv_freq[j];
            float sn, cs;
            sincosf(ang, &sn, &cs);
            bf16 *src = h < nh ? q + (t * nh + h) * hd : k + (t * nkv + (h - nh)) * hd;
            float x1 = __bfloat162float(src[j]), x2 = __bfloat162float(src[j + half]);
            bf16 o1 = __float2bfloat16_rn(x1 * cs - x2 * sn);
            bf16 o2 = __float2bfloat16_rn(x2 * cs + x1 * sn);
            src[j] = o1;
            src[j + half] = o2;
            if (h >= nh) {
                int64_t p = pos[t];
                if (p < 0 || p >= ctx || seq[t] < 0) continue;
                bf16 *dst = kc + (((int64_t)seq[t] * ctx + p) * nkv + (h - nh)) * hd;
                dst[j] = o1;
                dst[j + half] = o2;
            }
        } else {
            int64_t e = i - nrot, t = e / row8, jj = e % row8;
            int64_t p = pos[t];
            if (p < 0 || p >= ctx || seq[t] < 0) continue;
            ((uint4 *)vc)[((int64_t)seq[t] * ctx + p) * row8 + jj] = ((const uint4 *)v)[e];
        }
    }
}

qlr_status qlr_cuda_rope_kv_store(qlr_backend *be, void *q, void *k, const void *v, void *k_cache,
                                  void *v_cache, const int32_t *seq, const int32_t *pos,
                                  const float *inv_freq, int64_t n, int64_t n_heads, int64_t n_kv,
                                  int64_t hd, int64_t ctx) {
    if (n <= 0) return QLR_OK;
    QLR_ASSERT(hd % 2 == 0 && (n_kv * hd) % 8 == 0);
    int64_t total = n * (n_heads + n_kv) * (hd / 2) + n * (n_kv * hd / 8);
    int64_t blocks = (total + 255) / 256, cap = (int64_t)qlr_cuda_im(be)->n_sm * 16;
    QLR_CK(qlr_cuda_launch(rope_kv_kernel, dim3((unsigned)(blocks < cap ? blocks : cap)), dim3(256),
                           0, qlr_cuda_im(be)->stream, 1, (bf16 *)q, (bf16 *)k, (const bf16 *)v,
                           (bf16 *)k_cache, (bf16 *)v_cache, seq, pos, inv_freq, n, n_heads, n_kv,
                           hd, ctx));
    QLR_CK_LAUNCH();
    return QLR_OK;
}
