/* tests/model/test_kv_paged.c: the forward through the paged KV cache against the forward through
 * the contiguous cache, on the demo model cut to its first 4 layers (real shapes: 9/3 heads of
 * 64, vocab 49152). The same batches (a mixed prefill of three prompts of odd lengths, then
 * decode steps of all three) through both caches give bitwise equal logits on the CPU, with block
 * tables scattered over the pool (block 16 and block 5). A sequence whose first two blocks are
 * another sequence's (a shared prefix, computed once) gives the logits of computing its whole
 * prompt (f32 rounding of a different GEMM shape only). Bad tables are QLR_ERR_RANGE. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "model/model.h"
#include "tests/test_util.h"

enum { NSEQ = 3, WIDTH = 8 };

static qlr_backend *be;
static qlr_model *m;
static int64_t V;

static double maxdiff(const float *a, const float *b, int64_t n) {
    double w = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= w)) w = d;
    }
    return w;
}

/* A batch of every token of the three sequences from position at[s] to to[s] (interleaved),
 * logits for each sequence's last token (out [NSEQ, V]). */
typedef struct {
    int32_t n, tok[128], pos[128], seq[128], rows[NSEQ];
} step;

static void make_step(step *st, int32_t toks[NSEQ][64], const int32_t *at, const int32_t *to) {
    st->n = 0;
    int32_t cur[NSEQ];
    memcpy(cur, at, sizeof cur);
    for (int more = 1; more;) {
        more = 0;
        for (int s = 0; s < NSEQ; s++)
            if (cur[s] < to[s]) {
                st->tok[st->n] = toks[s][cur[s]], st->pos[st->n] = cur[s], st->seq[st->n] = s;
                if (cur[s] == to[s] - 1) st->rows[s] = st->n;
                st->n++, cur[s]++, more = 1;
            }
    }
}

static void run(qlr_forward *f, qlr_kv_cache *kv, qlr_kv_paged *kp, const int32_t *btab,
                int32_t width, const step *st, float *out) {
    float *lg = NULL;
    qlr_batch b = {st->n, st->tok, st->pos, st->seq, NSEQ, st->rows, NULL, NULL};
    qlr_block_table bt = {btab, NSEQ, width};
    qlr_status s = kp ? qlr_model_forward_paged(f, kp, &b, &bt, &lg) : qlr_model_forward(f, kv, &b, &lg);
    CHECK_OK(s);
    if (s == QLR_OK) memcpy(out, lg, (size_t)(NSEQ * V) * 4);
}

static void test_equal(int32_t block) {
    int32_t width = (64 + block - 1) / block, n_blocks = NSEQ * width * 2 + 3;
    qlr_kv_cache *kv = NULL;
    qlr_kv_paged *kp = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_cache_create(m, NSEQ, 64, &kv));
    CHECK_OK(qlr_kv_paged_create(m, n_blocks, block, NSEQ, width, &kp));
    CHECK_OK(qlr_forward_create(m, 128, NSEQ, &f));
    if (!kv || !kp || !f) goto done;
    /* scattered tables: sequence s gets blocks (7 + 5 * (s * width + i)) mod n_blocks, all
     * distinct (n_blocks is 27 or 81: coprime with 5) */
    int32_t *btab = malloc((size_t)(NSEQ * width) * 4);
    for (int32_t i = 0; i < NSEQ * width; i++) btab[i] = (7 + 5 * i) % n_blocks;
    uint64_t r = 5;
    int32_t toks[NSEQ][64];
    for (int s = 0; s < NSEQ; s++)
        for (int i = 0; i < 64; i++) toks[s][i] = (int32_t)(test_rng_u64(&r) % (uint64_t)V);
    float *a = malloc((size_t)(NSEQ * V) * 4), *b = malloc((size_t)(NSEQ * V) * 4);
    /* prompts of 37, 20 and 5 tokens in one batch, then three decode steps */
    int32_t at[NSEQ] = {0, 0, 0}, to[NSEQ] = {37, 20, 5};
    int ok = 1;
    for (int k = 0; k < 4; k++) {
        step st;
        make_step(&st, toks, at, to);
        run(f, kv, NULL, NULL, 0, &st, a);
        run(f, NULL, kp, btab, width, &st, b);
        int same = memcmp(a, b, (size_t)(NSEQ * V) * 4) == 0;
        CHECK_MSG(same, "block %d step %d: paged logits differ from contiguous by %g", block, k,
                  maxdiff(a, b, NSEQ * V));
        ok &= same;
        for (int s = 0; s < NSEQ; s++) at[s] = to[s], to[s]++;
    }
    printf("block %d: paged == contiguous (bitwise) over a prefill and 3 decode steps: %s\n", block,
           ok ? "yes" : "NO");
    free(btab), free(a), free(b);
done:
    qlr_forward_free(f);
    qlr_kv_paged_free(kp);
    qlr_kv_cache_free(kv);
}

/* Sequence 1 reuses sequence 0's first two blocks (32 shared tokens) and computes only its own
 * tokens 32..44; its last logits match computing all 45 tokens alone. */
static void test_shared_prefix(void) {
    const int32_t block = 16, width = 4;
    qlr_kv_paged *kp = NULL;
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_paged_create(m, 10, block, 2, width, &kp));
    CHECK_OK(qlr_kv_cache_create(m, 1, 64, &kv));
    CHECK_OK(qlr_forward_create(m, 64, 1, &f));
    if (!kp || !kv || !f) goto done;
    int32_t toks[2][45], pos[45], seq0[45] = {0}, seq1[45];
    uint64_t r = 11;
    for (int i = 0; i < 45; i++) {
        toks[0][i] = (int32_t)(test_rng_u64(&r) % (uint64_t)V);
        toks[1][i] = i < 32 ? toks[0][i] : (int32_t)(test_rng_u64(&r) % (uint64_t)V);
        pos[i] = i, seq1[i] = 1;
    }
    int32_t btab[2 * 4] = {3, 8, 1, -1, /* sequence 1: */ 3, 8, 6, -1};
    float *lg = NULL, *want = malloc((size_t)V * 4), *got = malloc((size_t)V * 4);
    int32_t last = 39;
    qlr_batch b0 = {40, toks[0], pos, seq0, 1, &last, NULL, NULL};
    qlr_block_table bt = {btab, 2, width};
    CHECK_OK(qlr_model_forward_paged(f, kp, &b0, &bt, &lg));
    last = 12;
    qlr_batch b1 = {13, toks[1] + 32, pos + 32, seq1, 1, &last, NULL, NULL};
    CHECK_OK(qlr_model_forward_paged(f, kp, &b1, &bt, &lg));
    if (lg) memcpy(got, lg, (size_t)V * 4);
    last = 44;
    qlr_batch bc = {45, toks[1], pos, seq0, 1, &last, NULL, NULL};
    CHECK_OK(qlr_model_forward(f, kv, &bc, &lg));
    if (lg) memcpy(want, lg, (size_t)V * 4);
    double d = maxdiff(got, want, V);
    printf("shared prefix: last logits vs the whole prompt alone: max diff %.3g\n", d);
    /* the shared rows were computed in a batch of 40 rather than 45: f32 rounding of the GEMM
     * only; logits are O(10) */
    CHECK_MSG(d < 1e-3, "shared prefix: logits differ by %g", d);
    free(want), free(got);

    /* errors: a block id outside the pool, a -1 inside the reached range, a position past the
     * table, a sequence outside the table, no table */
    int32_t p40 = 40, p63 = 63, s0 = 0, s2 = 2, t0 = toks[0][0];
    int32_t bad[4] = {3, 8, 10, -1};
    qlr_batch e1 = {1, &t0, &p40, &s0, 1, NULL, NULL, NULL};
    qlr_block_table e1t = {bad, 1, width};
    CHECK(qlr_model_forward_paged(f, kp, &e1, &e1t, &lg) == QLR_ERR_RANGE);
    qlr_batch e2 = {1, &t0, &p63, &s0, 1, NULL, NULL, NULL};
    qlr_block_table e2t = {btab, 1, width};
    CHECK(qlr_model_forward_paged(f, kp, &e2, &e2t, &lg) == QLR_ERR_RANGE);
    qlr_batch e3 = {1, &t0, &p40, &s0, 1, NULL, NULL, NULL};
    qlr_block_table e3t = {btab, 1, 2};
    CHECK(qlr_model_forward_paged(f, kp, &e3, &e3t, &lg) == QLR_ERR_RANGE);
    qlr_batch e4 = {1, &t0, &p40, &s2, 1, NULL, NULL, NULL};
    qlr_block_table e4t = {btab, 2, width};
    CHECK(qlr_model_forward_paged(f, kp, &e4, &e4t, &lg) == QLR_ERR_RANGE);
    qlr_batch e5 = {1, &t0, &p40, &s0, 1, NULL, NULL, NULL};
    qlr_block_table e5t = {NULL, 1, width};
    CHECK(qlr_model_forward_paged(f, kp, &e5, &e5t, &lg) == QLR_ERR_RANGE);
    qlr_batch e6 = {1, &t0, &p40, &s0, 1, NULL, NULL, NULL}; /* > max_seqs */
    qlr_block_table e6t = {btab, 3, width};
    CHECK(qlr_model_forward_paged(f, kp, &e6, &e6t, &lg) == QLR_ERR_RANGE);
done:
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);
    qlr_kv_paged_free(kp);
}

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    lp.max_layers = 4;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    if (!m) return test_finish();
    V = m->cfg.n_vocab;
    /* sizes: the pools and the table */
    CHECK_EQ_INT(qlr_kv_paged_bytes(&m->cfg, be, 10, 16, 2, 4),
                 2ull * 4 * 10 * 16 * 3 * 64 * 4 + 256);
    qlr_kv_paged *kp = NULL;
    CHECK(qlr_kv_paged_create(m, 0, 16, 1, 1, &kp) == QLR_ERR_INVALID && kp == NULL);
    test_equal(16);
    test_equal(5);
    test_shared_prefix();
    qlr_model_free(m);
    qlr_backend_free(be);
    return test_finish();
}
