/* tests/backend/test_paged_attention.c: the CPU paged KV ops against the contiguous ones on the
 * same data. Each case stores a history for several sequences (a previous step), then one step of
 * mixed prefill chunks and decode tokens, into a contiguous cache (kv_store + attention) and into
 * a pool whose block tables are scattered (block ids shuffled, sequences interleaved, unused
 * blocks between them) (kv_store_paged + attention_paged). The outputs must be bitwise equal: the
 * CPU paged op runs the same arithmetic in the same order, only the row address differs. Also:
 * kv_store_paged writes exactly the slots it is given (a negative slot stores nothing, every
 * other pool row keeps its bytes). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "tests/test_util.h"

static uint64_t g_rng = 0x9a6ed;
static qlr_backend *be;

static void fill(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&g_rng);
}

/* n_seq sequences with pre[s] cached positions; this step adds add[s] tokens to sequence s
 * (prefill chunk when > 1, decode when 1, nothing when 0). */
static void run_case(const char *name, int64_t n_heads, int64_t n_kv, int64_t hd, int64_t block,
                     int64_t n_seq, const int32_t *pre, const int32_t *add) {
    int64_t row = n_kv * hd, ctx = 0, npre = 0, n = 0;
    for (int64_t s = 0; s < n_seq; s++) {
        if (pre[s] + add[s] > ctx) ctx = pre[s] + add[s];
        npre += pre[s];
        n += add[s];
    }
    int64_t width = (ctx + block - 1) / block;
    /* every sequence gets `width` block ids out of a pool twice as large, shuffled */
    int64_t n_blocks = 2 * n_seq * width + 3, n_rows = n_blocks * block;
    int32_t *perm = malloc((size_t)n_blocks * 4), *btab = malloc((size_t)(n_seq * width) * 4);
    for (int64_t i = 0; i < n_blocks; i++) perm[i] = (int32_t)i;
    for (int64_t i = n_blocks - 1; i > 0; i--) {
        int64_t j = (int64_t)(test_rng_u64(&g_rng) % (uint64_t)(i + 1));
        int32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int64_t i = 0; i < n_seq * width; i++) btab[i] = perm[2 * i + 1];
    /* the history, then this step's tokens (sequences interleaved token by token) */
    int64_t tot = npre + n;
    int32_t *seq = malloc((size_t)tot * 4), *pos = malloc((size_t)tot * 4);
    int32_t *slot = malloc((size_t)tot * 4);
    int64_t k = 0;
    for (int64_t s = 0; s < n_seq; s++)
        for (int32_t p = 0; p < pre[s]; p++) seq[k] = (int32_t)s, pos[k++] = p;
    int32_t done[64] = {0};
    for (int more = 1; more;) {
        more = 0;
        for (int64_t s = 0; s < n_seq; s++)
            if (done[s] < add[s]) {
                seq[k] = (int32_t)s, pos[k++] = pre[s] + done[s]++;
                more = 1;
            }
    }
    QLR_ASSERT(k == tot);
    for (int64_t t = 0; t < tot; t++)
        slot[t] = btab[seq[t] * width + pos[t] / block] * (int32_t)block + pos[t] % (int32_t)block;
    float *kk = malloc((size_t)(tot * row) * 4), *vv = malloc((size_t)(tot * row) * 4);
    float *q = malloc((size_t)(n * n_heads * hd) * 4);
    fill(kk, tot * row);
    fill(vv, tot * row);
    fill(q, n * n_heads * hd);
    float *kc = calloc((size_t)(n_seq * ctx * row), 4), *vc = calloc((size_t)(n_seq * ctx * row), 4);
    float *kp = malloc((size_t)(n_rows * row) * 4), *vp = malloc((size_t)(n_rows * row) * 4);
    float *kp0 = malloc((size_t)(n_rows * row) * 4);
    fill(kp, n_rows * row);
    fill(vp, n_rows * row);
    memcpy(kp0, kp, (size_t)(n_rows * row) * 4);
    float *o1 = malloc((size_t)(n * n_heads * hd) * 4), *o2 = malloc((size_t)(n * n_heads * hd) * 4);
    float scale = 1.0f / sqrtf((float)hd);
    /* history */
    CHECK_OK(be->ops.kv_store(be, kc, vc, kk, vv, seq, pos, npre, n_kv, hd, ctx));
    CHECK_OK(be->ops.kv_store_paged(be, kp, vp, kk, vv, slot, npre, n_kv, hd, n_rows));
    /* this step */
    const float *ks = kk + npre * row, *vs = vv + npre * row;
    CHECK_OK(be->ops.kv_store(be, kc, vc, ks, vs, seq + npre, pos + npre, n, n_kv, hd, ctx));
    CHECK_OK(be->ops.kv_store_paged(be, kp, vp, ks, vs, slot + npre, n, n_kv, hd, n_rows));
    CHECK_OK(be->ops.attention(be, o1, q, kc, vc, seq + npre, pos + npre, n, n_heads, n_kv, hd,
                               ctx, scale));
    CHECK_OK(be->ops.attention_paged(be, o2, q, kp, vp, btab, width, block, seq + npre,
                                     pos + npre, n, n_heads, n_kv, hd, scale));
    CHECK_MSG(memcmp(o1, o2, (size_t)(n * n_heads * hd) * 4) == 0,
              "%s: paged attention differs from the contiguous attention", name);
    /* the pool: stored rows hold their token's K, every other row its old bytes */
    char *stored = calloc((size_t)n_rows, 1);
    for (int64_t t = 0; t < tot; t++) stored[slot[t]] = 1;
    int64_t bad = 0;
    for (int64_t r = 0; r < n_rows; r++)
        if (!stored[r] && memcmp(kp + r * row, kp0 + r * row, (size_t)row * 4)) bad++;
    for (int64_t t = 0; t < tot; t++)
        if (memcmp(kp + (int64_t)slot[t] * row, kk + t * row, (size_t)row * 4)) bad++;
    CHECK_MSG(bad == 0, "%s: %lld pool rows wrong after kv_store_paged", name, (long long)bad);
    printf("%s: H=%lld kv=%lld hd=%lld block=%lld, %lld tokens over %lld sequences: %s\n", name,
           (long long)n_heads, (long long)n_kv, (long long)hd, (long long)block, (long long)n,
           (long long)n_seq, memcmp(o1, o2, (size_t)(n * n_heads * hd) * 4) ? "DIFFER" : "bitwise equal");
    free(perm); free(btab); free(seq); free(pos); free(slot); free(kk); free(vv); free(q);
    free(kc); free(vc); free(kp); free(vp); free(kp0); free(o1); free(o2); free(stored);
}

/* A negative slot stores nothing. */
static void test_skip_slot(void) {
    int64_t n_kv = 2, hd = 4, row = n_kv * hd, n_rows = 6;
    float k[3 * 8], v[3 * 8], kp[6 * 8], vp[6 * 8], kp0[6 * 8];
    fill(k, 3 * row);
    fill(v, 3 * row);
    fill(kp, n_rows * row);
    fill(vp, n_rows * row);
    memcpy(kp0, kp, sizeof kp);
    int32_t slot[3] = {4, -1, 0};
    CHECK_OK(be->ops.kv_store_paged(be, kp, vp, k, v, slot, 3, n_kv, hd, n_rows));
    CHECK(memcmp(kp + 4 * row, k, (size_t)row * 4) == 0);
    CHECK(memcmp(kp + 0 * row, k + 2 * row, (size_t)row * 4) == 0);
    CHECK(memcmp(vp + 4 * row, v, (size_t)row * 4) == 0);
    for (int r = 1; r < 6; r++)
        if (r != 4) CHECK(memcmp(kp + r * row, kp0 + r * row, (size_t)row * 4) == 0);
}

int main(void) {
    CHECK_OK(qlr_backend_cpu_create(0, &be));
    if (!be) return test_finish();
    test_skip_slot();
    {
        /* decode only: one token each at odd positions (0, block edges, mid-block) */
        int32_t pre[5] = {0, 15, 16, 33, 100}, add[5] = {1, 1, 1, 1, 1};
        run_case("decode", 9, 3, 64, 16, 5, pre, add);
        run_case("decode-mha", 4, 4, 32, 16, 5, pre, add);
    }
    {
        /* mixed: a fresh prefill, a chunk continuing a cached prefix, decodes, an idle sequence */
        int32_t pre[6] = {0, 32, 17, 5, 0, 48}, add[6] = {37, 19, 1, 1, 1, 0};
        run_case("mixed", 9, 3, 64, 16, 6, pre, add);
        run_case("mixed-hd128-gqa8", 8, 1, 128, 16, 6, pre, add);
        run_case("mixed-block5", 6, 2, 16, 5, 6, pre, add);
    }
    {
        /* block 1: every position its own block */
        int32_t pre[3] = {3, 0, 7}, add[3] = {2, 4, 1};
        run_case("block1", 4, 2, 8, 1, 3, pre, add);
    }
    qlr_backend_free(be);
    return test_finish();
}
