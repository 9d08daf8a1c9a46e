/* backend/cpu/ops_sample.c: token sampling on the host: greedy (argmax, lowest id on ties), or
 * temperature -> top-k -> top-p -> one draw from a per-sequence splitmix64 stream. Candidates
 * are ordered by (logit desc, id asc), so the result depends only on the inputs and the seed. */
#include <math.h>
#include <stdlib.h>

#include "backend/cpu/cpu_internal.h"

typedef struct {
    float v;
    int32_t id;
} cand;

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* a before b when a has the larger logit, or the same logit and the smaller id */
static int cand_before(const cand *a, const cand *b) {
    return a->v > b->v || (a->v == b->v && a->id < b->id);
}

static int cand_cmp(const void *pa, const void *pb) {
    const cand *a = pa, *b = pb;
    if (cand_before(a, b)) return -1;
    if (cand_before(b, a)) return 1;
    return 0;
}

/* Min-heap on "before" order: the root is the worst kept candidate. */
static void heap_sift_down(cand *h, int64_t k, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && cand_before(&h[m], &h[l])) m = l;
        if (r < k && cand_before(&h[m], &h[r])) m = r;
        if (m == i) return;
        cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

static int32_t sample_row(const float *logits, int64_t vocab, const qlr_sampling *sp,
                          uint64_t *rng, cand *c) {
    if (sp->temperature <= 0.0f || sp->top_k == 1) {
        int64_t best = 0;
        for (int64_t i = 1; i < vocab; i++)
            if (logits[i] > logits[best]) best = i;
        return (int32_t)best;
    }
    int64_t k = vocab;
    if (sp->top_k > 0 && sp->top_k < vocab) {
        k = sp->top_k;
        for (int64_t i = 0; i < k; i++) c[i] = (cand){logits[i], (int32_t)i};
        for (int64_t i = k / 2 - 1; i >= 0; i--) heap_sift_down(c, k, i);
        for (int64_t i = k; i < vocab; i++) {
            cand x = {logits[i], (int32_t)i};
            if (cand_before(&x, &c[0])) {
                c[0] = x;
                heap_sift_down(c, k, 0);
            }
        }
    } else {
        for (int64_t i = 0; i < vocab; i++) c[i] = (cand){logits[i], (int32_t)i};
    }
    qsort(c, (size_t)k, sizeof *c, cand_cmp);
    double inv_t = 1.0 / sp->temperature, sum = 0.0;
    float mx = c[0].v;
    for (int64_t i = 0; i < k; i++) {
        c[i].v = (float)exp((double)(c[i].v - mx) * inv_t);
        sum += c[i].v;
    }
    if (sp->top_p > 0.0f && sp->top_p < 1.0f) {
        double cum = 0.0, target = sp->top_p * sum;
        int64_t keep = 0;
        while (keep < k) {
            cum += c[keep++].v;
            if (cum >= target) break;
        }
        k = keep;
        sum = cum;
    }
    double u = (double)(rng_next(rng) >> 11) * 0x1.0p-53 * sum, acc = 0.0;
    for (int64_t i = 0; i < k; i++) {
        acc += c[i].v;
        if (u < acc) return c[i].id;
    }
    return c[k - 1].id;
}

qlr_status qlr_cpu_sample(qlr_backend *be, int32_t *out_ids, float *logits,
                          const qlr_sampling *params, uint64_t *rng, int64_t n, int64_t vocab) {
    QLR_TRY(qlr_cpu_scratch_reserve(be, (size_t)vocab * sizeof(cand)));
    cand *c = (cand *)qlr_cpu_scratch(be, 0);
    for (int64_t i = 0; i < n; i++)
        out_ids[i] = sample_row(logits + i * vocab, vocab, &params[i], &rng[i], c);
    return QLR_OK;
}
