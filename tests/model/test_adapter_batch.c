/* tests/model/test_adapter_batch.c: one forward serving tokens of different adapters (issue 11).
 * Four sequences share one prefill and then decode steps: three use adapters of different ranks
 * and target sets (r 4 on all linears, r 16 on q/v, r 64 on the MLP), one the base model; two
 * sequences use the same adapter at different scales. Each sequence's logits must equal, row by
 * row, those of the same batch run with every token on that sequence's own adapter (the same
 * shapes, so the same kernels): bitwise on the CPU, within the forward's tolerance on CUDA
 * (built as tests/gpu/test_cuda_adapter_batch with QLR_TEST_CUDA). Also: a scale-0 slot equals the
 * base model; a slot outside the set is refused naming the token. Demo model, first 4 layers. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/adapter_dev.h"
#include "adapters/lora.h"
#include "core/core.h"
#include "model/model.h"
#include "tests/test_util.h"

#ifdef QLR_TEST_CUDA
#define DEVICE "cuda"
#else
#define DEVICE "cpu"
#endif

enum { NSEQ = 4, PLEN = 23, NDEC = 3 };

static qlr_lora *make_adapter(const qlr_model *m, int32_t r, uint32_t targets, uint64_t seed) {
    qlr_lora_base base;
    qlr_lora_base_from_config(&m->cfg, &base);
    qlr_lora_params p = qlr_lora_params_default();
    p.r = r;
    p.alpha = 2.0 * r;
    p.targets = targets;
    p.seed = seed;
    qlr_lora *l = NULL;
    CHECK_OK(qlr_lora_create(&base, &p, &l));
    uint64_t s = seed * 77 + 1;
    for (uint64_t i = 0; l && i < l->n_params; i++) l->block[i] = 0.05f * test_rng_normal(&s);
    return l;
}

/* Runs the prefill (all sequences) and NDEC decode steps with the given per-token slots
 * (slot_of_seq[s] for sequence s) and copies every logits row into out
 * [(1 + NDEC) * NSEQ, vocab]: the last prompt row of each sequence, then each decode step's. */
static void run(qlr_forward *f, qlr_model *m, const qlr_adapter_set *set, const int32_t *slot_of_seq,
                const int32_t *prompt, float *out) {
    qlr_backend *be = m->be;
    int64_t V = m->cfg.n_vocab;
    qlr_kv_cache *kv = NULL;
    CHECK_OK(qlr_kv_cache_create(m, NSEQ, PLEN + NDEC + 1, &kv));
    if (!kv) return;
    int32_t tok[NSEQ * PLEN], pos[NSEQ * PLEN], seq[NSEQ * PLEN], slot[NSEQ * PLEN], rows[NSEQ];
    int n = 0;
    /* tokens of the sequences interleaved (slots scattered through the batch) */
    for (int i = 0; i < PLEN; i++)
        for (int s = 0; s < NSEQ; s++) {
            tok[n] = prompt[s * PLEN + i];
            pos[n] = i;
            seq[n] = s;
            slot[n] = slot_of_seq[s];
            if (i == PLEN - 1) rows[s] = n;
            n++;
        }
    float *lg = NULL;
    qlr_batch b = {n, tok, pos, seq, NSEQ, rows, set, slot};
    CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
    float *host = malloc((size_t)(NSEQ * V) * 4);
    CHECK_OK(be->mem.d2h(be, host, lg, (size_t)(NSEQ * V) * 4));
    CHECK_OK(be->mem.sync(be));
    memcpy(out, host, (size_t)(NSEQ * V) * 4);
    for (int d = 0; d < NDEC; d++) {
        int32_t t2[NSEQ], p2[NSEQ], s2[NSEQ], sl2[NSEQ];
        for (int s = 0; s < NSEQ; s++) {
            t2[s] = 100 + 7 * s + d; /* fixed tokens: the comparison is of logits, not of choices */
            p2[s] = PLEN + d;
            s2[s] = s;
            sl2[s] = slot_of_seq[s];
        }
        qlr_batch bd = {NSEQ, t2, p2, s2, NSEQ, NULL, set, sl2};
        CHECK_OK(qlr_model_forward(f, kv, &bd, &lg));
        CHECK_OK(be->mem.d2h(be, host, lg, (size_t)(NSEQ * V) * 4));
        CHECK_OK(be->mem.sync(be));
        memcpy(out + (size_t)(d + 1) * NSEQ * V, host, (size_t)(NSEQ * V) * 4);
    }
    free(host);
    qlr_kv_cache_free(kv);
}

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    qlr_backend *be = NULL;
    CHECK_OK(qlr_backend_create(DEVICE, 0, &be));
    if (!be) return test_finish();
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    lp.max_layers = 4;
    qlr_model *m = NULL;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    if (!m) return test_finish();
    int64_t V = m->cfg.n_vocab;

    /* adapters: r 4 on all linears, r 16 on q/v, r 64 on the MLP */
    qlr_lora *ad[3] = {make_adapter(m, 4, QLR_LORA_TARGETS_ALL, 1),
                       make_adapter(m, 16, QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_V), 2),
                       make_adapter(m, 64, QLR_LORA_TARGET(QLR_LIN_GATE) | QLR_LORA_TARGET(QLR_LIN_UP) |
                                               QLR_LORA_TARGET(QLR_LIN_DOWN), 3)};
    qlr_lora_dev *dev[3] = {NULL, NULL, NULL};
    for (int i = 0; i < 3; i++)
        if (ad[i]) CHECK_OK(qlr_lora_dev_create(be, ad[i], m->cfg.n_layers, 0, &dev[i]));
    /* slots: 0 = ad0 scale 1, 1 = ad1, 2 = ad2, 3 = ad0 at scale 0.5, 4 = ad1 at scale 0 */
    qlr_adapter_slots *tab = NULL;
    CHECK_OK(qlr_adapter_slots_create(be, m->cfg.n_layers, 5, &tab));
    const qlr_adapter_set *set = NULL;
    if (tab) {
        qlr_adapter_slots_put(tab, 0, dev[0], 1.0f);
        qlr_adapter_slots_put(tab, 1, dev[1], 1.0f);
        qlr_adapter_slots_put(tab, 2, dev[2], 1.0f);
        qlr_adapter_slots_put(tab, 3, dev[0], 0.5f);
        qlr_adapter_slots_put(tab, 4, dev[1], 0.0f);
        CHECK_OK(qlr_adapter_slots_commit(tab, 5, &set));
    }
    if (!set) return test_finish();

    int32_t prompt[NSEQ * PLEN];
    uint64_t rng = 11;
    for (int i = 0; i < NSEQ * PLEN; i++) prompt[i] = 200 + (int32_t)(test_rng_u64(&rng) % 30000);
    qlr_forward *f = NULL;
    CHECK_OK(qlr_forward_create(m, NSEQ * PLEN, NSEQ, &f));
    if (!f) return test_finish();

    size_t per = (size_t)(1 + NDEC) * NSEQ * (size_t)V;
    float *mixed = malloc(per * 4), *alone = malloc(per * 4), *base = malloc(per * 4);
    const int32_t mix_slots[NSEQ] = {0, 2, -1, 3}; /* seq 1: r 64 MLP; seq 2: base; seq 3: ad0 x 0.5 */
    run(f, m, set, mix_slots, prompt, mixed);
    const int32_t base_slots[NSEQ] = {-1, -1, -1, -1};
    run(f, m, NULL, base_slots, prompt, base);

    /* CPU: every row depends only on its own tokens and slot, so bitwise; CUDA: the dense
     * (uniform) path rounds x·Aᵀ to bf16 where the mixed kernel keeps f32, and the two paths order
     * sums differently: relative rms 2e-2 of the logits, the generate test's scale */
#ifdef QLR_TEST_CUDA
    const double tol = 2e-2;
#else
    const double tol = 0.0;
#endif
    for (int s = 0; s < NSEQ; s++) {
        int32_t want[NSEQ];
        for (int k = 0; k < NSEQ; k++) want[k] = mix_slots[s];
        run(f, m, mix_slots[s] >= 0 ? set : NULL, want, prompt, alone);
        double err = 0, ref = 0;
        size_t differ = 0;
        for (int r = 0; r < 1 + NDEC; r++) {
            const float *a = mixed + ((size_t)r * NSEQ + s) * V, *b = alone + ((size_t)r * NSEQ + s) * V;
            for (int64_t v = 0; v < V; v++) {
                differ += memcmp(&a[v], &b[v], 4) != 0;
                err += ((double)a[v] - b[v]) * ((double)a[v] - b[v]);
                ref += (double)b[v] * b[v];
            }
        }
        double rel = ref > 0 ? sqrt(err / ref) : 0;
        printf("sequence %d (slot %d): %zu of %lld logits differ from its own forward, rms rel %.3g\n", s,
               mix_slots[s], differ, (long long)((1 + NDEC) * V), rel);
#ifdef QLR_TEST_CUDA
        CHECK_MSG(rel <= tol, "sequence %d: mixed vs own-adapter forward rms rel %.3g > %.3g", s, rel, tol);
#else
        CHECK_MSG(differ == 0, "sequence %d: %zu logits differ between the mixed and the own-adapter forward", s,
                  differ);
#endif
    }
    /* the adapters change the logits (the comparison above is not vacuous) */
    double dmax = 0;
    for (size_t i = 0; i < (size_t)V; i++) dmax = fmax(dmax, fabs(mixed[i] - base[i]));
    CHECK_MSG(dmax > 1e-3, "adapter 0 leaves sequence 0's logits unchanged (max diff %g)", dmax);
    (void)tol;

    /* a scale-0 slot is the base model (bitwise on the CPU: y += 0 * ...) */
    const int32_t zero_slots[NSEQ] = {4, 4, 4, 4};
    run(f, m, set, zero_slots, prompt, alone);
    size_t zd = 0;
    for (size_t i = 0; i < per; i++) zd += fabsf(alone[i] - base[i]) > 0.0f;
#ifndef QLR_TEST_CUDA
    CHECK_MSG(zd == 0, "a scale-0 adapter changes %zu logits", zd);
#endif

    /* a slot outside the set is refused naming the token */
    qlr_kv_cache *kv = NULL;
    CHECK_OK(qlr_kv_cache_create(m, 1, 8, &kv));
    int32_t t1 = 5, p1 = 0, s1 = 0, bad = 5;
    qlr_batch bb = {1, &t1, &p1, &s1, 1, NULL, set, &bad};
    float *lg;
    CHECK(qlr_model_forward(f, kv, &bb, &lg) == QLR_ERR_RANGE);
    CHECK_MSG(strstr(qlr_error_msg(), "adapter slot 5") != NULL, "%s", qlr_error_msg());
    qlr_kv_cache_free(kv);

    free(mixed), free(alone), free(base);
    qlr_forward_free(f);
    qlr_adapter_slots_free(tab);
    for (int i = 0; i < 3; i++) qlr_lora_dev_free(dev[i]), qlr_lora_free(ad[i]);
    qlr_model_free(m);
    qlr_backend_free(be);
    return test_finish();
}
