/* tests/gpu/test_cuda_engine.c: the serving engine on CUDA with the whole demo model and random
 * adapters (ranks 4/16/8, different targets) in a CUDA registry: five requests over three adapters
 * and the base model at once, then each alone, then the first prompt twice more (prefix reuse).
 *
 * The check is test_cuda_generate.c's: every CUDA greedy token must be the CPU's greedy token or a
 * near tie of it. For each request the CPU model (same adapter, same scale) runs the prompt plus
 * the CUDA tokens in one teacher-forced forward; at each generated position the CUDA token must
 * equal the CPU argmax, or the CPU's own logits of the two must be within two bf16 spacings of
 * each other (|l[a] - l[b]| <= 2 * 2^-7 * max(|l[a]|, |l[b]|): CUDA carries activations in bf16);
 * a request that ended on end-of-generation must have the CPU's argmax (or a near tie) be an
 * end-of-generation id there. Also: every request gets exactly one DONE, all text is whole UTF-8,
 * no block stays used, the repeated prompt is served from the prefix cache. Prints how many
 * tokens are identical between the concurrent and the alone runs (informational: a near tie may
 * go either way under a different batch). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/adapter_dev.h"
#include "adapters/registry.h"
#include "core/core.h"
#include "infer/engine.h"
#include "tests/infer/engine_harness.h"
#include "tests/test_util.h"

#define NREQ 5
#define MAXTOK 24

static qlr_backend *cpu_be, *gpu_be;
static qlr_model *cpu_m, *gpu_m;
static qlr_tokenizer *tok;
static qlr_registry *reg;
static qlr_lora *ref_lora[3];
static const char *ad_name[3] = {"a4", "b16", "c8"};

static const int req_prompt[NREQ] = {0, 1, 2, 1, 0};
static const int req_ad[NREQ] = {-1, 0, 1, 2, 0};
static const float req_scale[NREQ] = {1.0f, 1.0f, 1.0f, 1.0f, 0.5f};
static qlr_tokens prompts[3];

static int32_t argmax(const float *x, int64_t n) {
    int32_t b = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[b]) b = (int32_t)i;
    return b;
}

/* Teacher-forced CPU check of the CUDA tokens of one request; returns the mismatches beyond
 * near ties and adds the near ties to *near. */
static int check_tokens(const qlr_tokens *p, const eh_out *o, const qlr_lora *l, float scale,
                        const char *what, int *near) {
    int32_t n = (int32_t)p->n, ng = o->n_ids, eog_end = o->finish == QLR_FINISH_STOP;
    int32_t rows = ng + eog_end, tot = n + ng;
    if (rows == 0) return 0;
    int32_t *all = malloc((size_t)tot * 4), *pos = malloc((size_t)tot * 4);
    int32_t *seq = calloc((size_t)tot, 4), *lr = malloc((size_t)rows * 4);
    memcpy(all, p->ids, (size_t)n * 4);
    memcpy(all + n, o->ids, (size_t)ng * 4);
    for (int32_t i = 0; i < tot; i++) pos[i] = i;
    for (int32_t s = 0; s < rows; s++) lr[s] = n - 1 + s;
    qlr_forward *f = NULL;
    qlr_kv_cache *kv = NULL;
    qlr_lora_dev *dev = NULL;
    qlr_adapter_slots *slots = NULL;
    const qlr_adapter_set *set = NULL;
    int bad = 0;
    CHECK_OK(qlr_forward_create(cpu_m, tot, rows, &f));
    CHECK_OK(qlr_kv_cache_create(cpu_m, 1, tot, &kv));
    if (l) {
        CHECK_OK(qlr_lora_dev_create(cpu_be, l, cpu_m->cfg.n_layers, 0, &dev));
        CHECK_OK(qlr_adapter_slots_create(cpu_be, cpu_m->cfg.n_layers, 1, &slots));
        if (dev && slots) {
            qlr_adapter_slots_put(slots, 0, dev, scale);
            CHECK_OK(qlr_adapter_slots_commit(slots, 1, &set));
        }
    }
    float *lg = NULL;
    qlr_batch b = {tot, all, pos, seq, rows, lr, set, NULL};
    if (f && kv && (!l || set)) CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
    int64_t V = cpu_m->cfg.n_vocab;
    for (int32_t s = 0; lg && s < rows; s++) {
        const float *x = lg + s * V;
        int32_t a = argmax(x, V);
        int ok;
        int32_t got;
        if (s < ng) {
            got = o->ids[s];
            ok = a == got;
        } else { /* the request ended on end-of-generation here */
            got = qlr_tokenizer_eos(tok);
            ok = qlr_tokenizer_is_eog(tok, a);
            if (!ok) { /* the best eog id of the CPU */
                int32_t c[2] = {qlr_tokenizer_eos(tok), qlr_tokenizer_eot(tok)};
                for (int k = 0; k < 2; k++)
                    if (c[k] >= 0 && x[c[k]] > x[got]) got = c[k];
            }
        }
        if (ok) continue;
        double gap = fabs((double)x[a] - x[got]);
        double mag = fmax(fabs((double)x[a]), fabs((double)x[got]));
        if (gap <= 2 * ldexp(mag, -7)) {
            (*near)++;
            fprintf(stderr, "%s step %d: near tie cpu %d (%.4f) vs cuda %d (%.4f)\n", what, s, a,
                    x[a], got, x[got]);
        } else {
            bad++;
            fprintf(stderr, "%s step %d: cpu %d (%.4f) vs cuda %d (cpu logit %.4f): beyond bf16 "
                    "rounding\n", what, s, a, x[a], got, x[got]);
        }
    }
    qlr_adapter_slots_free(slots);
    qlr_lora_dev_free(dev);
    qlr_kv_cache_free(kv);
    qlr_forward_free(f);
    free(all), free(pos), free(seq), free(lr);
    return bad;
}

static qlr_adapter *acquire(int i) {
    if (i < 0) return NULL;
    qlr_adapter *a = NULL;
    CHECK_OK(qlr_registry_acquire(reg, ad_name[i], &a));
    return a;
}

static int same_prefix(const eh_out *a, const eh_out *b) {
    int k = 0;
    while (k < a->n_ids && k < b->n_ids && a->ids[k] == b->ids[k]) k++;
    return k;
}

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    if (qlr_backend_create("cuda", 0, &gpu_be) != QLR_OK) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine): %s",
                  qlr_error_msg());
        return test_finish();
    }
    CHECK_OK(qlr_backend_create("cpu", 0, &cpu_be));
    CHECK_OK(qlr_model_load(path, gpu_be, &lp, &gpu_m));
    CHECK_OK(qlr_model_load(path, cpu_be, &lp, &cpu_m));
    CHECK_OK(qlr_tokenizer_open_gguf(path, &tok));
    qlr_registry_params rp = qlr_registry_params_default();
    if (gpu_m) CHECK_OK(qlr_registry_create(gpu_be, &gpu_m->cfg, &rp, &reg));
    if (!gpu_m || !cpu_m || !tok || !reg) return test_finish();
    const int32_t ranks[3] = {4, 16, 8};
    const uint32_t targets[3] = {QLR_LORA_TARGETS_ALL,
                                 QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_V) |
                                     QLR_LORA_TARGET(QLR_LIN_DOWN),
                                 QLR_LORA_TARGET(QLR_LIN_GATE) | QLR_LORA_TARGET(QLR_LIN_UP) |
                                     QLR_LORA_TARGET(QLR_LIN_O)};
    for (int i = 0; i < 3; i++) {
        ref_lora[i] = eh_make_adapter(&cpu_m->cfg, ranks[i], targets[i], 100 + (uint64_t)i);
        qlr_lora *l = eh_make_adapter(&gpu_m->cfg, ranks[i], targets[i], 100 + (uint64_t)i);
        if (l) CHECK_OK(qlr_registry_attach(reg, ad_name[i], l));
    }
    prompts[0] = eh_chat_prompt(tok, "What is the capital of France?");
    prompts[1] = eh_chat_prompt(tok, "Write a haiku about the sea.");
    prompts[2] = eh_chat_prompt(tok, "List three prime numbers and explain why they are prime.");

    qlr_engine_params ep = qlr_engine_params_default();
    ep.max_ctx = 1024;
    ep.max_running = 16;
    qlr_engine *e = NULL;
    CHECK_OK(qlr_engine_create(gpu_m, tok, reg, &ep, &e));
    if (!e) return test_finish();
    static eh_out conc[NREQ], alone[NREQ], again[2];
    for (int i = 0; i < NREQ; i++) {
        const qlr_tokens *p = &prompts[req_prompt[i]];
        CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, MAXTOK, acquire(req_ad[i]), req_scale[i],
                           NULL, 0, &conc[i], NULL));
    }
    for (int i = 0; i < NREQ; i++) CHECK(eh_wait(&conc[i]));
    for (int i = 0; i < NREQ; i++) {
        const qlr_tokens *p = &prompts[req_prompt[i]];
        CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, MAXTOK, acquire(req_ad[i]), req_scale[i],
                           NULL, 0, &alone[i], NULL));
        CHECK(eh_wait(&alone[i]));
    }
    for (int k = 0; k < 2; k++) { /* the first prompt again: served from the prefix cache */
        const qlr_tokens *p = &prompts[0];
        CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, MAXTOK, NULL, 1.0f, NULL, 0, &again[k], NULL));
        CHECK(eh_wait(&again[k]));
    }
    qlr_engine_stats st;
    qlr_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.requests_done, 2 * NREQ + 2);
    int32_t full_blocks = ((int32_t)prompts[0].n - 1) / ep.kv_block;
    CHECK_MSG(full_blocks == 0 || (again[0].n_cached > 0 && again[1].n_cached > 0),
              "the repeated prompt was not served from the prefix cache");
    int near = 0, bad = 0;
    for (int i = 0; i < NREQ; i++) {
        char what[64];
        const qlr_lora *l = req_ad[i] >= 0 ? ref_lora[req_ad[i]] : NULL;
        CHECK_MSG(conc[i].n_done == 1 && alone[i].n_done == 1, "request %d: DONE events", i);
        CHECK(conc[i].finish != QLR_FINISH_ERROR && alone[i].finish != QLR_FINISH_ERROR);
        CHECK_EQ_INT(conc[i].bad_utf8 + alone[i].bad_utf8, 0);
        snprintf(what, sizeof what, "request %d concurrent", i);
        bad += check_tokens(&prompts[req_prompt[i]], &conc[i], l, req_scale[i], what, &near);
        snprintf(what, sizeof what, "request %d alone", i);
        bad += check_tokens(&prompts[req_prompt[i]], &alone[i], l, req_scale[i], what, &near);
        printf("request %d (adapter %s, scale %.1f): %d tokens, %d identical concurrent vs alone\n", i,
               req_ad[i] >= 0 ? ad_name[req_ad[i]] : "none", (double)req_scale[i], conc[i].n_ids,
               same_prefix(&conc[i], &alone[i]));
    }
    for (int k = 0; k < 2; k++)
        bad += check_tokens(&prompts[0], &again[k], NULL, 1.0f, "prefix reuse", &near);
    printf("%d near ties, %d tokens beyond bf16 rounding\n", near, bad);
    CHECK_MSG(bad == 0, "%d CUDA tokens are not the CPU's greedy choice up to near ties", bad);
    qlr_engine_free(e);
    for (int i = 0; i < 3; i++) {
        qlr_tokens_free(&prompts[i]);
        qlr_lora_free(ref_lora[i]);
    }
    qlr_registry_free(reg);
    qlr_tokenizer_free(tok);
    qlr_model_free(cpu_m);
    qlr_model_free(gpu_m);
    qlr_backend_free(cpu_be);
    qlr_backend_free(gpu_be);
    return test_finish();
}
