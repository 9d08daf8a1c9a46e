/* tests/gpu/test_cuda_train_demo.c: training on the GPU against the CPU, on the demo model
 * (SmolLM2-135M) with the quickstart recipe (issue 12's acceptance checks):
 *  1. 50 steps on the CPU and on CUDA from the same seed, printed as a table (loss, grad norm):
 *     steps 1 and 2 (the same parameters: the first step's learning rate is 0 in warmup) within
 *     2% of the CPU's loss; after that Adam's first updates (about lr per element whatever the
 *     gradient's size, so the sign of every near-zero gradient element counts) make the bf16 and
 *     the f32 runs take different paths, so the later bounds are on 10-step means (25%), the
 *     final eval loss (10%) and `qlora eval` exact match of each adapter on the 40 held-out
 *     examples, each on its own device: within 2 points of the CPU adapter's;
 *  1b. at identical parameters one forward/backward gives the CPU's LoRA gradients on CUDA
 *     (cosine >= 0.995, norm within 3%): what the per-step comparison cannot show;
 *  2. gradient checkpointing on and off, and on with the layer inputs offloaded to the host, give
 *     bitwise-identical LoRA gradients on the GPU (the MLP in row chunks: to f32 rounding);
 *  3. a GPU run stopped after 3 steps and resumed gives the losses, the adapter and the optimizer
 *     state of an uninterrupted 6-step GPU run, bit for bit;
 *  4. data parallel with one rank through NCCL gives the plain path's losses bit for bit.
 * Needs the demo model (QLR_DEMO_MODEL or scripts/setup.sh) and a CUDA device.
 * QLR_TRAIN_DEMO_STEPS overrides the 50 steps (quick local runs). */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/adapter_dev.h"
#include "adapters/lora.h"
#include "backend/backend.h"
#include "core/core.h"
#include "model/backprop.h"
#include "model/model.h"
#include "tests/test_util.h"
#include "train/eval.h"
#include "train/trainer.h"

static char g_recipe[1024], g_model_set[1200];

static qlr_status opts(qlr_train_opts *o, const char *device, const char *out_dir, const char *steps,
                       const char *save) {
    char dev[64], od[800], st[64], sv[64];
    snprintf(dev, sizeof dev, "device=%s", device);
    snprintf(od, sizeof od, "output_dir=%s/%s", test_tmpdir(), out_dir);
    snprintf(st, sizeof st, "max_steps=%s", steps);
    snprintf(sv, sizeof sv, "save_steps=%s", save);
    const char *sets[] = {g_model_set, dev, od, st, sv, "eval_steps=0", "logging_steps=1"};
    qlr_status s = qlr_train_opts_load(g_recipe, sets, 7, o);
    o->progress = 0;
    o->export_gguf = 0;
    return s;
}

/* Per-step values of `key` from <dir>/metrics.jsonl into v[cap]; returns the count. */
static int metrics(const char *dir, const char *key, double *v, int cap) {
    char path[900];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "r");
    CHECK_MSG(f != NULL, "%s missing", path);
    if (!f) return 0;
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f) && n < cap) {
        json_t *j = json_loads(line, 0, NULL);
        CHECK_MSG(j != NULL, "%s line %d is not JSON", path, n + 1);
        if (!j) break;
        json_t *x = json_object_get(j, key);
        v[n++] = x ? json_number_value(x) : NAN;
        json_decref(j);
    }
    fclose(f);
    return n;
}

static int file_equal(const char *a, const char *b) {
    char *x, *y;
    size_t nx, ny;
    if (qlr_file_read_all(a, 1 << 30, &x, &nx)) return 0;
    if (qlr_file_read_all(b, 1 << 30, &y, &ny)) {
        free(x);
        return 0;
    }
    int eq = nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return eq;
}

/* 1. CPU vs CUDA losses and exact match. */
static void test_cpu_vs_gpu(void) {
    const char *env = getenv("QLR_TRAIN_DEMO_STEPS");
    char steps[32];
    snprintf(steps, sizeof steps, "%d", env ? atoi(env) : 50);
    int n_steps = atoi(steps);
    double secs[2] = {0, 0};
    char dirs[2][800];
    static const char *devs[2] = {"cpu", "cuda"};
    for (int k = 0; k < 2; k++) {
        qlr_train_opts o;
        qlr_train_result r;
        CHECK_OK(opts(&o, devs[k], devs[k], steps, "0"));
        snprintf(dirs[k], sizeof dirs[k], "%s", o.output_dir ? o.output_dir : "");
        double t0 = qlr_now();
        CHECK_OK(qlr_train_run(&o, &r));
        secs[k] = qlr_now() - t0;
        CHECK_EQ_INT(r.steps_done, n_steps);
        qlr_train_opts_free(&o);
    }
    double lc[256], lg[256], gc[256], gg[256];
    int nc = metrics(dirs[0], "loss", lc, 256), ng = metrics(dirs[1], "loss", lg, 256);
    metrics(dirs[0], "grad_norm", gc, 256);
    metrics(dirs[1], "grad_norm", gg, 256);
    CHECK_EQ_INT(nc, n_steps);
    CHECK_EQ_INT(ng, n_steps);
    printf("step | cpu loss  | cuda loss | rel diff | cpu grad norm | cuda grad norm\n");
    double worst = 0, wc = 0, wg = 0;
    int worst_step = 0;
    for (int i = 0; i < nc && i < ng; i++) {
        double rel = fabs(lg[i] - lc[i]) / fabs(lc[i]);
        printf("%4d | %.6f | %.6f | %.4f | %.5f | %.5f\n", i + 1, lc[i], lg[i], rel, gc[i], gg[i]);
        if (!(rel <= worst)) worst = rel, worst_step = i + 1;
        /* the same parameters: bf16 activations against f32, 2% (the bound) */
        if (i < 2)
            CHECK_MSG(rel <= 0.02, "step %d: cuda loss %.6f vs cpu %.6f (%.2f%%)", i + 1, lg[i], lc[i],
                      100 * rel);
        wc += lc[i], wg += lg[i];
        if ((i + 1) % 10 == 0) {
            double wr = fabs(wg - wc) / wc;
            printf("     steps %d-%d: mean loss cpu %.5f cuda %.5f (%.1f%%)\n", i - 8, i + 1, wc / 10,
                   wg / 10, 100 * wr);
            CHECK_MSG(wr <= 0.25, "steps %d-%d: mean loss cuda %.5f vs cpu %.5f (%.1f%%)", i - 8, i + 1,
                      wg / 10, wc / 10, 100 * wr);
            wc = wg = 0;
        }
    }
    printf("worst per-step relative loss difference %.4f at step %d; wall time: cpu %.1f s, cuda %.1f s "
           "(%d steps, load included)\n", worst, worst_step, secs[0], secs[1], n_steps);

    /* exact match of each adapter on the held-out examples, each evaluated on its own device */
    int em[2] = {0, 0}, n_ex[2] = {0, 0};
    double ev[2] = {NAN, NAN};
    for (int k = 0; k < 2; k++) {
        qlr_train_opts o;
        CHECK_OK(opts(&o, devs[k], devs[k], steps, "0"));
        qlr_eval_opts e = qlr_eval_opts_default();
        e.run = &o;
        e.eval_base = 0;
        e.progress = 0;
        e.n_show = 0;
        qlr_eval_scores b, a;
        double t0 = qlr_now();
        CHECK_OK(qlr_eval_run(&e, &b, &a, stdout));
        printf("%s adapter: eval loss %.4f, exact match %d/%d (%.1f s)\n", devs[k], a.loss, a.n_exact,
               a.n_examples, qlr_now() - t0);
        em[k] = a.n_exact;
        n_ex[k] = a.n_examples;
        ev[k] = a.loss;
        qlr_train_opts_free(&o);
    }
    CHECK_EQ_INT(n_ex[0], n_ex[1]);
    CHECK_MSG(fabs(ev[1] - ev[0]) <= 0.1 * ev[0], "eval loss: cuda adapter %.4f vs cpu adapter %.4f", ev[1],
              ev[0]);
    if (n_ex[0] > 0) {
        double d = 100.0 * fabs((double)(em[1] - em[0])) / n_ex[0];
        CHECK_MSG(d <= 2.0, "exact match: cuda adapter %d/%d vs cpu adapter %d/%d (%.1f points)", em[1],
                  n_ex[1], em[0], n_ex[0], d);
    }
}

/* A trainable r 16 adapter on every linear of m, made the same way on any backend: PEFT init, then
 * every value set to (add 0) or moved by (add 1) sigma * N(0, 1) from `seed`; with its one-slot
 * set. 1 when made. */
typedef struct tadapter {
    qlr_lora *l;
    qlr_lora_dev *d;
    qlr_adapter_slots *slots;
    const qlr_adapter_set *set;
} tadapter;

static int tadapter_make(qlr_model *m, uint64_t seed, float sigma, int add, tadapter *t) {
    memset(t, 0, sizeof *t);
    qlr_lora_base base;
    qlr_lora_base_from_config(&m->cfg, &base);
    qlr_lora_params p = qlr_lora_params_default();
    p.r = 16;
    p.alpha = 32;
    p.targets = QLR_LORA_TARGETS_ALL;
    CHECK_OK(qlr_lora_create(&base, &p, &t->l));
    if (!t->l) return 0;
    uint64_t rng = seed;
    for (uint64_t i = 0; i < t->l->n_params; i++)
        t->l->block[i] = (add ? t->l->block[i] : 0.0f) + sigma * test_rng_normal(&rng);
    CHECK_OK(qlr_lora_dev_create(m->be, t->l, m->cfg.n_layers, 1, &t->d));
    if (t->d) CHECK_OK(qlr_adapter_slots_create(m->be, m->cfg.n_layers, 1, &t->slots));
    if (!t->slots) return 0;
    qlr_adapter_slots_put(t->slots, 0, t->d, 1.0f);
    CHECK_OK(qlr_adapter_slots_commit(t->slots, 1, &t->set));
    return t->set != NULL;
}

static void tadapter_free(tadapter *t) {
    qlr_adapter_slots_free(t->slots);
    qlr_lora_dev_free(t->d);
    qlr_lora_free(t->l);
    memset(t, 0, sizeof *t);
}

/* 2. Checkpointing on/off: bitwise-identical LoRA gradients on CUDA. */
static void test_checkpointing_bitwise(const char *model_path) {
    qlr_backend *be = NULL;
    CHECK_OK(qlr_backend_create("cuda", 0, &be));
    if (!be) return;
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    lp.max_layers = 6;
    qlr_model *m = NULL;
    CHECK_OK(qlr_model_load(model_path, be, &lp, &m));
    if (!m) {
        qlr_backend_free(be);
        return;
    }
    tadapter ta;
    tadapter_make(m, 3, 0.02f, 0, &ta);
    qlr_lora_dev *d = ta.d;
    const qlr_adapter_set *set = ta.set;
    uint64_t rng = 4;
    /* two packed sequences of odd lengths */
    enum { N = 301 };
    int32_t tok[N], tgt[N], pos[N], seq[N];
    for (int i = 0; i < N; i++) {
        int s = i < 117 ? 0 : 1;
        seq[i] = s;
        pos[i] = s ? i - 117 : i;
        tok[i] = 100 + (int32_t)(test_rng_u64(&rng) % 20000);
    }
    for (int i = 0; i < N; i++) tgt[i] = i + 1 < N && seq[i + 1] == seq[i] ? tok[i + 1] : QLR_IGNORE_INDEX;
    qlr_train_batch b = {N, tok, tgt, pos, seq, 2};
    /* 0: checkpointing off, 1: on, 2: on + layer inputs offloaded to pinned host memory (copy
     * stream + events), 3: offload + the MLP in chunks of 64 rows (the same function; the LoRA
     * gradients are summed chunk by chunk, so equal to f32 rounding, not bitwise) */
    enum { NC = 4 };
    static const char *names[NC] = {"off", "on", "offload", "offload+mlp_chunk 64"};
    float *g[NC] = {NULL};
    double loss[NC] = {0};
    for (int ck = 0; ck < NC && set; ck++) {
        qlr_train_params tp = qlr_train_params_default();
        tp.max_tokens = N;
        tp.max_seq_len = N;
        tp.checkpointing = ck > 0;
        tp.offload = ck >= 2;
        tp.mlp_chunk = ck == 3 ? 64 : 0;
        tp.ce_chunk = 128;
        qlr_train_ctx *c = NULL;
        CHECK_OK(qlr_train_ctx_create(m, &tp, &c));
        if (!c) continue;
        CHECK_OK(be->mem.memset0(be, d->grad, d->n_params * 4));
        int64_t nt = 0;
        CHECK_OK(qlr_train_fwd_bwd(c, set, &b, 1.0f / 299, d->da, d->db, 7, &loss[ck], &nt));
        g[ck] = malloc(d->n_params * 4);
        CHECK_OK(be->mem.d2h(be, g[ck], d->grad, d->n_params * 4));
        CHECK_OK(be->mem.sync(be));
        qlr_train_ctx_free(c);
    }
    for (int ck = 1; ck < NC; ck++) {
        if (!g[0] || !g[ck]) continue;
        uint64_t diff = 0, nonzero = 0;
        double md = 0, gmax = 0;
        for (uint64_t i = 0; i < d->n_params; i++) {
            diff += memcmp(&g[0][i], &g[ck][i], 4) != 0;
            nonzero += g[0][i] != 0.0f;
            md = fmax(md, fabs((double)g[0][i] - g[ck][i]));
            gmax = fmax(gmax, fabs((double)g[0][i]));
        }
        printf("checkpointing off vs %s on cuda: loss %.9g / %.9g, %llu of %llu gradient values differ "
               "(max diff %.3g of %.3g; %llu nonzero)\n", names[ck], loss[0], loss[ck],
               (unsigned long long)diff, (unsigned long long)d->n_params, md, gmax,
               (unsigned long long)nonzero);
        if (ck < 3)
            CHECK_MSG(diff == 0 && loss[0] == loss[ck], "checkpointing %s changes %llu gradient values",
                      names[ck], (unsigned long long)diff);
        else /* MLP in chunks of 64 rows: cuBLASLt picks its GEMM tiling by M, so the chunks'
              * bf16 outputs round differently than whole rows' (measured on an H200: loss
              * 1.8e-4 relative, max gradient difference 1.3e-3 of the largest), and the LoRA dA/dB
              * are summed chunk by chunk. Tolerance: bf16 rounding level, loss 1e-3 relative,
              * gradients 1e-2 of the largest. */
            CHECK_MSG(md <= 1e-2 * gmax && fabs(loss[0] - loss[ck]) <= 1e-3 * fabs(loss[0]),
                      "mlp chunks: gradients differ by %g of %g, loss %.9g vs %.9g", md, gmax,
                      loss[0], loss[ck]);
        CHECK(nonzero > d->n_params / 2);
    }
    for (int ck = 0; ck < NC; ck++) free(g[ck]);
    tadapter_free(&ta);
    qlr_model_free(m);
    qlr_backend_free(be);
}

/* 1b. The same parameters and batch: CUDA's LoRA gradients are the CPU's (up to bf16). */
static void test_gradients_vs_cpu(const char *model_path) {
    float *g[2] = {NULL, NULL};
    uint64_t n_params = 0;
    double loss[2] = {0, 0};
    static const char *devs[2] = {"cpu", "cuda"};
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = NULL;
        CHECK_OK(qlr_backend_create(devs[k], 0, &be));
        if (!be) return;
        qlr_model_load_params lp = qlr_model_load_params_default();
        lp.progress = 0;
        qlr_model *m = NULL;
        CHECK_OK(qlr_model_load(model_path, be, &lp, &m));
        if (!m) {
            qlr_backend_free(be);
            return;
        }
        tadapter ta; /* B nonzero so that every gradient is */
        tadapter_make(m, 5, 0.01f, 1, &ta);
        qlr_lora_dev *d = ta.d;
        const qlr_adapter_set *set = ta.set;
        enum { N = 200 };
        int32_t tok[N], tgt[N], pos[N], seq[N];
        uint64_t r2 = 9;
        for (int i = 0; i < N; i++) seq[i] = i < 90 ? 0 : 1, pos[i] = i < 90 ? i : i - 90,
                                     tok[i] = 100 + (int32_t)(test_rng_u64(&r2) % 20000);
        for (int i = 0; i < N; i++) tgt[i] = i + 1 < N && seq[i + 1] == seq[i] ? tok[i + 1] : QLR_IGNORE_INDEX;
        qlr_train_batch b = {N, tok, tgt, pos, seq, 2};
        qlr_train_params tp = qlr_train_params_default();
        tp.max_tokens = tp.max_seq_len = N;
        qlr_train_ctx *c = NULL;
        CHECK_OK(qlr_train_ctx_create(m, &tp, &c));
        int64_t nt = 0;
        if (c) CHECK_OK(qlr_train_fwd_bwd(c, set, &b, 1.0f / 198, d->da, d->db, 3, &loss[k], &nt));
        n_params = d->n_params;
        g[k] = malloc(n_params * 4);
        CHECK_OK(be->mem.d2h(be, g[k], d->grad, n_params * 4));
        CHECK_OK(be->mem.sync(be));
        qlr_train_ctx_free(c);
        tadapter_free(&ta);
        qlr_model_free(m);
        qlr_backend_free(be);
    }
    if (g[0] && g[1]) {
        double dot = 0, n0 = 0, n1 = 0;
        for (uint64_t i = 0; i < n_params; i++)
            dot += (double)g[0][i] * g[1][i], n0 += (double)g[0][i] * g[0][i], n1 += (double)g[1][i] * g[1][i];
        double cosv = dot / sqrt(n0 * n1), ratio = sqrt(n1 / n0);
        printf("one fwd/bwd at the same parameters: loss cpu %.6f cuda %.6f; LoRA gradients: cosine %.5f, "
               "norm ratio cuda/cpu %.5f\n", loss[0], loss[1], cosv, ratio);
        /* bf16 activations and compute copies against f32 */
        CHECK_MSG(cosv >= 0.995, "LoRA gradients: cosine %.5f between cuda and cpu", cosv);
        /* measured on an H200: cosine 0.998, norm ratio 1.022 (the bf16 path's gradient is
         * slightly larger; not explained yet, see the closing note of issue 12) */
        CHECK_MSG(fabs(ratio - 1) <= 0.03, "LoRA gradients: norm ratio %.5f", ratio);
        CHECK_NEAR(loss[1], loss[0], 0, 0.02);
    }
    free(g[0]);
    free(g[1]);
}

/* 3. Resume on the GPU is bit-identical. */
static void test_resume(void) {
    qlr_train_opts o;
    qlr_train_result r;
    char a[800], b[800];
    CHECK_OK(opts(&o, "cuda", "resume_a", "6", "3"));
    snprintf(a, sizeof a, "%s", o.output_dir ? o.output_dir : "");
    CHECK_OK(qlr_train_run(&o, &r));
    qlr_train_opts_free(&o);
    CHECK_OK(opts(&o, "cuda", "resume_b", "6", "3"));
    snprintf(b, sizeof b, "%s", o.output_dir ? o.output_dir : "");
    o.stop_after_step = 3;
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK(r.stopped);
    qlr_train_opts_free(&o);
    CHECK_OK(opts(&o, "cuda", "resume_b", "6", "3"));
    o.resume = 1;
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK_EQ_INT(r.resumed_from, 3);
    qlr_train_opts_free(&o);
    double la[16], lb[16], ga[16], gb[16];
    int na = metrics(a, "loss", la, 16), nb = metrics(b, "loss", lb, 16);
    metrics(a, "grad_norm", ga, 16);
    metrics(b, "grad_norm", gb, 16);
    CHECK_EQ_INT(na, 6);
    CHECK_EQ_INT(nb, 6);
    for (int i = 0; i < na && i < nb; i++)
        CHECK_MSG(la[i] == lb[i] && ga[i] == gb[i], "step %d: straight loss %.17g grad_norm %.17g, "
                  "resumed %.17g %.17g", i + 1, la[i], ga[i], lb[i], gb[i]);
    char pa[900], pb[900];
    snprintf(pa, sizeof pa, "%s/adapter/adapter_model.safetensors", a);
    snprintf(pb, sizeof pb, "%s/adapter/adapter_model.safetensors", b);
    CHECK_MSG(file_equal(pa, pb), "final adapters differ: %s vs %s", pa, pb);
    snprintf(pa, sizeof pa, "%s/checkpoint-6/optimizer.bin", a);
    snprintf(pb, sizeof pb, "%s/checkpoint-6/optimizer.bin", b);
    CHECK_MSG(file_equal(pa, pb), "final optimizer states differ");
    printf("resume on cuda: 6 losses, adapter and optimizer state equal bit for bit\n");
}

/* 4. Data parallel with one rank through NCCL (issue 16's world-size-1 path) == the plain path. */
static void test_nccl_world1(void) {
    char dirs[2][800];
    for (int k = 0; k < 2; k++) {
        qlr_train_opts o;
        qlr_train_result r;
        CHECK_OK(opts(&o, "cuda", k ? "nccl1" : "plain1", "4", "0"));
        snprintf(dirs[k], sizeof dirs[k], "%s", o.output_dir ? o.output_dir : "");
        o.dist_force_comm = k;
        CHECK_OK(qlr_train_run(&o, &r));
        qlr_train_opts_free(&o);
    }
    double la[8], lb[8], ga[8], gb[8];
    int na = metrics(dirs[0], "loss", la, 8), nb = metrics(dirs[1], "loss", lb, 8);
    metrics(dirs[0], "grad_norm", ga, 8);
    metrics(dirs[1], "grad_norm", gb, 8);
    CHECK_EQ_INT(na, 4);
    CHECK_EQ_INT(nb, 4);
    for (int i = 0; i < na && i < nb; i++)
        CHECK_MSG(la[i] == lb[i] && ga[i] == gb[i], "step %d: plain loss %.17g grad norm %.17g, through "
                  "NCCL %.17g %.17g", i + 1, la[i], ga[i], lb[i], gb[i]);
    printf("one rank through NCCL: 4 losses and gradient norms equal to the plain path bit for bit\n");
}

int main(void) {
    const char *model = test_demo_model_or_fail();
    if (!model) return test_finish();
    snprintf(g_recipe, sizeof g_recipe, "%s/recipes/smollm2-quickstart.yaml", QLR_SOURCE_DIR);
    snprintf(g_model_set, sizeof g_model_set, "base_model=%s", model);
    test_checkpointing_bitwise(model);
    test_gradients_vs_cpu(model);
    test_resume();
    test_nccl_world1();
    test_cpu_vs_gpu();
    return test_finish();
}
