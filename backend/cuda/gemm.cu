/* backend/cuda/gemm.cu: bf16 matrix products through cuBLASLt (f32 accumulation): the generic
 * row-major wrapper every large product uses (either operand may be stored transposed), the
 * lm_head op (bf16 table -> f32 logits) and the LoRA hook (two thin products, the second
 * accumulating into y). Chosen algorithms are cached per shape so that a decode step does not pay
 * cuBLASLt's heuristic query for every layer. */
#include "backend/cuda/cuda_internal.h"

#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend/cuda/cuda_backend.h"
}

typedef struct gemm_key {
    int64_t m, n, k, lda, ldb, ldd;
    int d_type, trans_a, trans_b, beta_nz;
} gemm_key;

typedef struct gemm_entry {
    gemm_key key;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
    int valid;
} gemm_entry;

#define GEMM_CACHE 128
/* One cache per process and device is enough: keys include every shape parameter, and a plan
 * made for one handle is valid for another handle on the same device. */
static gemm_entry g_cache[GEMM_CACHE];
static int g_cache_next;

static qlr_status plan(qlr_cuda_impl *im, const gemm_key *key, gemm_entry **out) {
    for (int i = 0; i < GEMM_CACHE; i++)
        if (g_cache[i].valid && !memcmp(&g_cache[i].key, key, sizeof *key)) {
            *out = &g_cache[i];
            return QLR_OK;
        }
    gemm_entry *e = &g_cache[g_cache_next];
    g_cache_next = (g_cache_next + 1) % GEMM_CACHE;
    if (e->valid) {
        cublasLtMatmulDescDestroy(e->op);
        cublasLtMatrixLayoutDestroy(e->la);
        cublasLtMatrixLayoutDestroy(e->lb);
        cublasLtMatrixLayoutDestroy(e->lc);
        e->valid = 0;
    }
    memset(e, 0, sizeof *e);
    e->key = *key;
    cudaDataType_t dt = (cudaDataType_t)key->d_type;
    /* column-major view: Dᵀ [n, m] = Bᵀ · Aᵀ (B the logical [k, n] right factor), cuBLASLt's
     * first operand being b and its second a. Read column-major, b [n, k] is B (op T), b [k, n]
     * (trans_b) is Bᵀ (no op), a [m, k] is Aᵀ (no op) and a [k, m] (trans_a) is A (op T). */
    cublasOperation_t ta = key->trans_b ? CUBLAS_OP_N : CUBLAS_OP_T;
    cublasOperation_t tb = key->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    QLR_CK(cublasLtMatmulDescCreate(&e->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    QLR_CK(cublasLtMatmulDescSetAttribute(e->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    QLR_CK(cublasLtMatmulDescSetAttribute(e->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    if (key->trans_b)
        QLR_CK(cublasLtMatrixLayoutCreate(&e->la, CUDA_R_16BF, key->n, key->k, key->ldb));
    else
        QLR_CK(cublasLtMatrixLayoutCreate(&e->la, CUDA_R_16BF, key->k, key->n, key->ldb));
    if (key->trans_a)
        QLR_CK(cublasLtMatrixLayoutCreate(&e->lb, CUDA_R_16BF, key->m, key->k, key->lda));
    else
        QLR_CK(cublasLtMatrixLayoutCreate(&e->lb, CUDA_R_16BF, key->k, key->m, key->lda));
    QLR_CK(cublasLtMatrixLayoutCreate(&e->lc, dt, key->n, key->m, key->ldd));
    cublasLtMatmulPreference_t pref;
    QLR_CK(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = im->lt_ws_bytes;
    cublasStatus_t cs = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t res;
    int n_res = 0;
    if (cs == CUBLAS_STATUS_SUCCESS)
        cs = cublasLtMatmulAlgoGetHeuristic(im->lt, e->op, e->la, e->lb, e->lc, e->lc, pref, 1,
                                            &res, &n_res);
    cublasLtMatmulPreferenceDestroy(pref);
    QLR_CK(cs);
    if (n_res < 1) {
        cublasLtMatmulDescDestroy(e->op);
        cublasLtMatrixLayoutDestroy(e->la);
        cublasLtMatrixLayoutDestroy(e->lb);
        cublasLtMatrixLayoutDestroy(e->lc);
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuBLASLt: no algorithm for bf16 GEMM m=%lld n=%lld "
                          "k=%lld (lda %lld, ldb %lld)", (long long)key->m, (long long)key->n,
                          (long long)key->k, (long long)key->lda, (long long)key->ldb);
    }
    e->algo = res.algo;
    e->valid = 1;
    *out = e;
    return QLR_OK;
}

qlr_status qlr_cuda_gemm_t(qlr_backend *be, void *d, cudaDataType_t d_type, const void *a,
                           const void *b, int64_t m, int64_t n, int64_t k, int64_t lda,
                           int64_t ldb, int64_t ldd, float alpha, float beta, int trans_a,
                           int trans_b) {
    if (m <= 0 || n <= 0) return QLR_OK;
    QLR_ASSERT(k > 0);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    gemm_key key;
    memset(&key, 0, sizeof key);
    key.m = m;
    key.n = n;
    key.k = k;
    key.lda = lda;
    key.ldb = ldb;
    key.ldd = ldd;
    key.d_type = (int)d_type;
    key.trans_a = trans_a;
    key.trans_b = trans_b;
    key.beta_nz = beta != 0.0f;
    gemm_entry *e = NULL;
    QLR_TRY(plan(im, &key, &e));
    QLR_CK(cublasLtMatmul(im->lt, e->op, &alpha, b, e->la, a, e->lb, &beta, d, e->lc, d, e->lc,
                          &e->algo, im->lt_ws, im->lt_ws_bytes, im->stream));
    return QLR_OK;
}

qlr_status qlr_cuda_gemm(qlr_backend *be, void *d, cudaDataType_t d_type, const void *a,
                         const void *b, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                         int64_t ldd, float alpha, float beta, int trans_b) {
    return qlr_cuda_gemm_t(be, d, d_type, a, b, m, n, k, lda, ldb, ldd, alpha, beta, 0, trans_b);
}

extern "C" qlr_status qlr_cuda_gemm_bf16(qlr_backend *be, void *y, const uint16_t *x,
                                         const uint16_t *w, int64_t m, int64_t n, int64_t k,
                                         int y_f32) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    return qlr_cuda_gemm(be, y, y_f32 ? CUDA_R_32F : CUDA_R_16BF, x, w, m, n, k, k, k, n, 1.0f,
                         0.0f, 0);
}

qlr_status qlr_cuda_lm_head(qlr_backend *be, float *logits, const void *x, const uint16_t *w,
                            int64_t n, int64_t d, int64_t vocab) {
    return qlr_cuda_gemm(be, logits, CUDA_R_32F, x, w, n, vocab, d, d, d, vocab, 1.0f, 0.0f, 0);
}

qlr_status qlr_cuda_lora(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *l, int64_t n,
                         int64_t in, int64_t out) {
    if (!l || l->r <= 0 || n <= 0) return QLR_OK;
    void *ws;
    /* u [n, r] bf16 = x · Aᵀ, then y += scale · u · Bᵀ (beta = 1 accumulates into y) */
    QLR_TRY(qlr_cuda_ws(be, (size_t)(n * l->r) * 2, &ws));
    QLR_TRY(qlr_cuda_gemm(be, ws, CUDA_R_16BF, x, l->a, n, l->r, in, in, in, l->r, 1.0f, 0.0f, 0));
    return qlr_cuda_gemm(be, y, CUDA_R_16BF, ws, l->b, n, out, l->r, l->r, l->r, out, l->scale,
                         1.0f, 0);
}
