/* backend/cuda/prefetch.cu: the nf4_prefetch hint. A decode step at one token per sequence reads
 * every NF4 weight once and little else, but between two linears runs a chain of small kernels
 * (RoPE, attention, the residual norm) during which HBM is idle. The weights never depend on
 * those kernels, so this op starts pulling the next linears' first bytes into L2 while they
 * run: one launch of one warp per SM whose thread 0 issues bulk L2 prefetches
 * (cp.async.bulk.prefetch.L2, sm_90; line prefetches before), then waits for the previous grid
 * like every PDL kernel, so that the stream order is kept.
 *
 * How much: at most im->pf_budget bytes ahead of the linears (default 60% of L2, or
 * QLR_CUDA_PREFETCH_MB; 0 turns the op into a no-op). A small table remembers which prefixes
 * were requested and not yet read by a linear, so a second hint continues where the first
 * stopped instead of asking for the same lines again, and the budget counts what is still
 * outstanding. Results never change: nothing is written. */
#include <stdint.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

#define PF_RANGES 12
#define PF_CHUNK (32u << 10)

struct pf_args {
    const char *p[PF_RANGES];
    unsigned long long n[PF_RANGES];
    int k;
};

__global__ void __launch_bounds__(32) pf_l2_kernel(const __grid_constant__ pf_args A) {
    qlr_pdl_trigger();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (threadIdx.x == 0) {
        /* chunks numbered across the ranges in order, dealt round-robin over the blocks: every
         * block asks for the earliest bytes first */
        unsigned long long c0 = 0, G = gridDim.x, b = blockIdx.x;
        for (int r = 0; r < A.k; r++) {
            unsigned long long nc = (A.n[r] + PF_CHUNK - 1) / PF_CHUNK;
            unsigned long long first = (b + G - c0 % G) % G; /* first c >= c0 with c % G == b, minus c0 */
            for (unsigned long long c = first; c < nc; c += G) {
                unsigned long long o = c * PF_CHUNK, len = A.n[r] - o < PF_CHUNK ? A.n[r] - o : PF_CHUNK;
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(A.p[r] + o),
                             "r"((unsigned)len)
                             : "memory");
            }
            c0 += nc;
        }
    }
#else
    unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x,
                       T = (unsigned long long)gridDim.x * blockDim.x;
    for (int r = 0; r < A.k; r++)
        for (unsigned long long o = t * 128; o < A.n[r]; o += T * 128)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(A.p[r] + o));
#endif
    qlr_pdl_wait();
}

void qlr_cuda_pf_init(qlr_cuda_impl *im, size_t l2_bytes) {
    const char *e = getenv("QLR_CUDA_PREFETCH_MB");
    im->pf_budget = e ? (size_t)(atof(e) * 1048576.0 > 0 ? atof(e) * 1048576.0 : 0) : l2_bytes / 10 * 6;
}

static qlr_cuda_pf_rec *pf_find(qlr_cuda_impl *im, const qlr_nf4 *w) {
    for (int i = 0; i < QLR_CUDA_PF_RECS; i++)
        if (im->pf[i].codes && im->pf[i].codes == w->codes) return &im->pf[i];
    return NULL;
}

void qlr_cuda_pf_consumed(qlr_cuda_impl *im, const qlr_nf4 *w) {
    qlr_cuda_pf_rec *r = pf_find(im, w);
    if (r) r->codes = NULL;
}

/* Appends [p + from, p + to) rounded inward to 16 bytes (the bulk prefetch's unit). */
static void pf_range(pf_args *A, const void *p, int64_t from, int64_t to) {
    if (!p || A->k >= PF_RANGES) return;
    uintptr_t a = ((uintptr_t)p + (uintptr_t)from + 15) & ~(uintptr_t)15,
              z = ((uintptr_t)p + (uintptr_t)to) & ~(uintptr_t)15;
    if (z <= a) return;
    A->p[A->k] = (const char *)a;
    A->n[A->k] = (unsigned long long)(z - a);
    A->k++;
}

qlr_status qlr_cuda_nf4_prefetch(qlr_backend *be, int k, const qlr_nf4 *const *w, int64_t n) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA && k >= 0 && (k == 0 || w));
    qlr_cuda_impl *im = qlr_cuda_im(be);
    /* only the fused small-n paths stream the weights once per step; prefill is compute-bound */
    if (im->pf_budget == 0 || n < 1 || n > 48 || k == 0) return QLR_OK;
    im->pf_calls++;
    /* forget requests no linear read within a few hints (an abandoned forward) */
    size_t out = 0;
    for (int i = 0; i < QLR_CUDA_PF_RECS; i++) {
        if (im->pf[i].codes && im->pf_calls - im->pf[i].call > 4) im->pf[i].codes = NULL;
        if (im->pf[i].codes) out += im->pf[i].bytes;
    }
    size_t left = out < im->pf_budget ? im->pf_budget - out : 0;
    pf_args A = {};
    for (int i = 0; i < k && left > 0 && A.k + 3 <= PF_RANGES; i++) {
        const qlr_nf4 *m = w[i];
        if (!m || m->rows <= 0 || m->cols <= 0 || !m->codes) continue;
        int64_t cols = m->cols, row_bytes = cols / 2 + (m->dq ? cols / 64 : cols / 16);
        if (row_bytes <= 0) continue;
        qlr_cuda_pf_rec *r = pf_find(im, m);
        int64_t r0 = r ? r->rows : 0;
        int64_t take = (int64_t)(left / (size_t)row_bytes);
        if (take > m->rows - r0) take = m->rows - r0;
        if (take <= 0) {
            if (r0 < m->rows) break; /* budget spent inside this matrix */
            continue;
        }
        int64_t e0 = r0 * cols, e1 = (r0 + take) * cols;
        pf_range(&A, m->codes, e0 / 2, (e1 + 1) / 2);
        if (m->dq) {
            pf_range(&A, m->absmax_q, e0 / 64, (e1 + 63) / 64);
            pf_range(&A, m->dq_absmax, (e0 / 16384) * 4, ((e1 + 16383) / 16384) * 4);
        } else {
            pf_range(&A, m->absmax, (e0 / 64) * 4, ((e1 + 63) / 64) * 4);
        }
        if (!r) { /* a free slot, else the oldest */
            r = &im->pf[0];
            for (int j = 0; j < QLR_CUDA_PF_RECS; j++) {
                if (!im->pf[j].codes) {
                    r = &im->pf[j];
                    break;
                }
                if (im->pf[j].call < r->call) r = &im->pf[j];
            }
            r->codes = m->codes;
            r->rows = 0;
            r->bytes = 0;
        }
        r->rows = r0 + take;
        r->bytes += (size_t)(take * row_bytes);
        r->call = im->pf_calls;
        left -= (size_t)(take * row_bytes);
        if (r->rows < m->rows) break;
    }
    if (A.k == 0) return QLR_OK;
    unsigned long long chunks = 0;
    for (int i = 0; i < A.k; i++) chunks += (A.n[i] + PF_CHUNK - 1) / PF_CHUNK;
    unsigned grid = (unsigned)(chunks < (unsigned long long)im->n_sm ? chunks : im->n_sm);
    QLR_CK(qlr_cuda_launch(pf_l2_kernel, dim3(grid), dim3(32), 0, im->stream, 1, A));
    QLR_CK_LAUNCH();
    return QLR_OK;
}

extern "C" void qlr_cuda_set_prefetch(qlr_backend *be, size_t bytes) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    im->pf_budget = bytes;
    for (int i = 0; i < QLR_CUDA_PF_RECS; i++) im->pf[i].codes = NULL;
}

extern "C" size_t qlr_cuda_prefetch_budget(qlr_backend *be) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    return qlr_cuda_im(be)->pf_budget;
}
