/* tests/gpu/test_cuda_attention.c: kv_store + causal GQA attention on the GPU against the CPU
 * reference, for head dims 64 and 128 and GQA ratios 1, 3, 4 and 8: decode batches (one token
 * per sequence at very different positions, position 0 included), a single-sequence prefill
 * longer than one tile, two packed sequences whose tokens share a tile, and a chunked prefill
 * continuing a sequence already in the cache. Both kernels (decode: n <= 64, tiled: n > 64). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0xa77;

/* The cache is first filled for positions [0, pre[s]) of each sequence (a previous step), then
 * this step's n tokens (seq[t], pos[t]) are stored and attended. */
static void run_case(const char *name, int64_t n_heads, int64_t n_kv, int64_t hd, int64_t n_seq,
                     int64_t ctx, const int32_t *pre, int64_t n, const int32_t *seq,
                     const int32_t *pos) {
    int64_t npre = 0;
    for (int64_t s = 0; s < n_seq; s++) npre += pre[s];
    int32_t *pseq = malloc((size_t)(npre + 1) * 4), *ppos = malloc((size_t)(npre + 1) * 4);
    int64_t k = 0;
    for (int64_t s = 0; s < n_seq; s++)
        for (int32_t p = 0; p < pre[s]; p++) pseq[k] = (int32_t)s, ppos[k++] = p;
    int64_t row = n_kv * hd;
    float *pk = malloc((size_t)(npre * row + 1) * 4), *pv = malloc((size_t)(npre * row + 1) * 4);
    gh_randn_bf16(pk, npre * row, 1.0f, &rng);
    gh_randn_bf16(pv, npre * row, 1.0f, &rng);
    float *q = malloc((size_t)(n * n_heads * hd) * 4);
    float *kk = malloc((size_t)(n * row) * 4), *vv = malloc((size_t)(n * row) * 4);
    gh_randn_bf16(q, n * n_heads * hd, 1.0f, &rng);
    gh_randn_bf16(kk, n * row, 1.0f, &rng);
    gh_randn_bf16(vv, n * row, 1.0f, &rng);
    /* a few large logits: one query row strongly aligned with one key */
    for (int64_t j = 0; j < hd && n > 0 && npre > 0; j++) q[j] = 3.0f * pk[j];
    int64_t cache_n = n_seq * ctx * row, out_n = n * n_heads * hd;
    float *ref = malloc((size_t)out_n * 4), *got = malloc((size_t)out_n * 4);
    float *zero = calloc((size_t)cache_n, 4);
    for (int b = 0; b < 2; b++) {
        qlr_backend *be = b ? g_gpu : g_cpu;
        size_t es = qlr_backend_act_size(be);
        gh_buf kc = gh_act(be, zero, cache_n), vc = gh_act(be, zero, cache_n);
        if (npre) {
            gh_buf a = gh_act(be, pk, npre * row), c = gh_act(be, pv, npre * row);
            gh_buf s = gh_raw(be, pseq, (size_t)npre * 4), p = gh_raw(be, ppos, (size_t)npre * 4);
            CHECK_OK(be->ops.kv_store(be, kc.p, vc.p, a.p, c.p, s.p, p.p, npre, n_kv, hd, ctx));
            gh_free_checked(be, &a, "pre k");
            gh_free_checked(be, &c, "pre v");
            gh_free_checked(be, &s, "pre seq");
            gh_free_checked(be, &p, "pre pos");
        }
        gh_buf bq = gh_act(be, q, out_n), bk = gh_act(be, kk, n * row), bv = gh_act(be, vv, n * row);
        gh_buf bs = gh_raw(be, seq, (size_t)n * 4), bp = gh_raw(be, pos, (size_t)n * 4);
        gh_buf bo = gh_alloc(be, (size_t)out_n * es);
        CHECK_OK(be->ops.kv_store(be, kc.p, vc.p, bk.p, bv.p, bs.p, bp.p, n, n_kv, hd, ctx));
        CHECK_OK(be->ops.attention(be, bo.p, bq.p, kc.p, vc.p, bs.p, bp.p, n, n_heads, n_kv, hd,
                                   ctx, 1.0f / sqrtf((float)hd)));
        gh_read_act(be, bo.p, b ? got : ref, out_n);
        gh_free_checked(be, &bo, "attention out");
        gh_free_checked(be, &kc, "k cache");
        gh_free_checked(be, &vc, "v cache");
        gh_free_checked(be, &bq, "q");
        gh_free_checked(be, &bk, "k");
        gh_free_checked(be, &bv, "v");
        gh_free_checked(be, &bs, "seq");
        gh_free_checked(be, &bp, "pos");
    }
    char what[128];
    snprintf(what, sizeof what, "attention %s H=%lld kv=%lld hd=%lld n=%lld", name,
             (long long)n_heads, (long long)n_kv, (long long)hd, (long long)n);
    gh_compare_attention(what, got, ref, out_n);
    free(pseq); free(ppos); free(pk); free(pv); free(q); free(kk); free(vv);
    free(ref); free(got); free(zero);
}

static void cases(int64_t n_heads, int64_t n_kv, int64_t hd) {
    /* decode: 5 sequences, one new token each, at positions 0, 1, 17, 300, 1000 */
    {
        int32_t pre[5] = {0, 1, 17, 300, 1000}, seq[5], pos[5];
        for (int i = 0; i < 5; i++) seq[i] = i, pos[i] = pre[i];
        run_case("decode5", n_heads, n_kv, hd, 5, 1024, pre, 5, seq, pos);
    }
    /* one token, empty cache */
    {
        int32_t pre[1] = {0}, seq[1] = {0}, pos[1] = {0};
        run_case("single", n_heads, n_kv, hd, 1, 8, pre, 1, seq, pos);
    }
    /* prefill of 130 tokens (tiled kernel, partial last tile) */
    {
        int32_t pre[1] = {0}, seq[130], pos[130];
        for (int i = 0; i < 130; i++) seq[i] = 0, pos[i] = i;
        run_case("prefill130", n_heads, n_kv, hd, 1, 160, pre, 130, seq, pos);
    }
    /* two packed sequences (70 + 61 tokens) sharing the second tile */
    {
        int32_t pre[2] = {0, 0}, seq[131], pos[131];
        for (int i = 0; i < 131; i++) seq[i] = i < 70 ? 1 : 0, pos[i] = i < 70 ? i : i - 70;
        run_case("packed70+61", n_heads, n_kv, hd, 2, 128, pre, 131, seq, pos);
    }
    /* chunked prefill: 100 new tokens after 37 cached ones, plus a decode token of another seq */
    {
        int32_t pre[2] = {37, 5}, seq[101], pos[101];
        for (int i = 0; i < 100; i++) seq[i] = 0, pos[i] = 37 + i;
        seq[100] = 1, pos[100] = 5;
        run_case("chunk+decode", n_heads, n_kv, hd, 2, 256, pre, 101, seq, pos);
    }
    /* 40 short prompts of 1..3 tokens through the decode kernel (n <= 64) */
    {
        int32_t pre[20], seq[40], pos[40];
        int k = 0;
        for (int s = 0; s < 20; s++) {
            pre[s] = s * 3;
            seq[k] = s, pos[k++] = s * 3;
            seq[k] = s, pos[k++] = s * 3 + 1;
        }
        run_case("multi-token-small", n_heads, n_kv, hd, 20, 64, pre, 40, seq, pos);
    }
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    static const int64_t cfg[][3] = {{4, 4, 64}, {8, 2, 64}, {16, 2, 128}, {8, 8, 128},
                                     {9, 3, 64}, {32, 8, 128}};
    for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++) cases(cfg[i][0], cfg[i][1], cfg[i][2]);
    gh_done();
    return test_finish();
}
