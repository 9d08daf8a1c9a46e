/* bench/train_shape_bench.c: `qlora bench train --shape` (train_bench.h): training steps at a
 * model's real dimensions with random NF4 weights and random packed tokens. Every run is built
 * from one recipe text (bench_recipe) that both the planner (train/plan.h, the prediction) and
 * the run (qlr_train_opts_from_recipe, the trainer's adapter, optimizer and workspace) read, so
 * the prediction and the allocation come from the same settings; the step is the trainer's
 * (qlr_train_step_compute). It owns no training code of its own: only the batch, the clocks
 * and the JSON. */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "bench/bench_common.h"
#include "bench/op_timer.h"
#include "bench/train_bench.h"
#include "core/core.h"
#include "data/rng.h"
#include "train/plan.h"
#include "train/recipe.h"
#include "train/trainer_internal.h"
#ifdef QLR_BACKEND_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

#define LORA_R 16
#define LORA_ALPHA 32
#define LEARNING_RATE 2e-4

qlr_bench_train_shape_opts qlr_bench_train_shape_default_opts(void) {
    qlr_bench_train_shape_opts o;
    memset(&o, 0, sizeof o);
    o.device = "cuda";
    o.steps = 6;
    o.warmup = 2;
    o.checkpointing = QLR_CKPT_ON;
    o.profile = 1;
    o.seed = 42;
    return o;
}

static json_t *jnum(double v) { return isfinite(v) ? json_real(round(v * 1e4) / 1e4) : json_null(); }

/* The recipe of one run: the planner and the run read the same one. The dataset is never
 * opened (the batch is synthetic); a recipe needs one. */
static qlr_status bench_recipe(const qlr_bench_train_shape_opts *o, const char *plan_name, int32_t seq, int32_t mb,
                               int ckpt, uint64_t budget, qlr_recipe *r) {
    char text[1024];
    int n = snprintf(text, sizeof text,
                     "base_model: %s\n"
                     "datasets:\n  - path: synthetic.jsonl\n    type: completion\n"
                     "sequence_len: %d\nsample_packing: true\nmicro_batch_size: %d\n"
                     "gradient_accumulation_steps: 1\nmax_steps: %d\n"
                     "learning_rate: %g\nlr_scheduler: constant\noptimizer: adamw_8bit\n"
                     "lora_r: %d\nlora_alpha: %d\nlora_dropout: 0\nlora_target_linear: true\n"
                     "gradient_checkpointing: %s\nvram_budget: %lluB\ndevice: %s\nseed: %llu\n",
                     plan_name, seq, mb, o->warmup + o->steps + 1, LEARNING_RATE, LORA_R, LORA_ALPHA,
                     qlr_plan_ckpt_name(ckpt), (unsigned long long)budget, o->device,
                     (unsigned long long)o->seed);
    if (n < 0 || (size_t)n >= sizeof text) return qlr_errorf(QLR_ERR_RANGE, "bench train: recipe text");
    return qlr_recipe_parse(text, (size_t)n, "bench train --shape", ".", NULL, 0, r);
}

/* Total bytes `qlora plan` predicts for these settings. */
static qlr_status plan_total(const qlr_bench_train_shape_opts *o, const qlr_model_shape *s, const char *plan_name,
                             int32_t seq, int32_t mb, int ckpt, uint64_t *total, uint64_t *reserve, int *mode) {
    qlr_recipe r;
    QLR_TRY(bench_recipe(o, plan_name, seq, mb, ckpt, o->vram_budget, &r));
    qlr_plan p;
    qlr_status st = qlr_plan_build(&r, s, &p);
    qlr_recipe_free(&r);
    QLR_TRY(st);
    *total = p.total;
    if (reserve) *reserve = p.comp_bytes[QLR_PLAN_CUDA_CONTEXT];
    if (mode) *mode = p.ckpt_mode;
    qlr_plan_free(&p);
    return QLR_OK;
}

/* mb rows of seq random tokens, each row one causal sequence (targets: the next token; the
 * row's last position has none). */
static qlr_status make_batch(qlr_micro *m, int32_t seq, int32_t mb, int32_t vocab, uint64_t seed) {
    memset(m, 0, sizeof *m);
    int32_t n = seq * mb;
    m->tokens = malloc(sizeof(int32_t) * (size_t)n);
    m->targets = malloc(sizeof(int32_t) * (size_t)n);
    m->pos = malloc(sizeof(int32_t) * (size_t)n);
    m->seq = malloc(sizeof(int32_t) * (size_t)n);
    if (!m->tokens || !m->targets || !m->pos || !m->seq) return qlr_errorf(QLR_ERR_NOMEM, "bench train: batch");
    uint64_t rng = qlr_data_rng_seed(seed, 7, 0);
    for (int32_t i = 0; i < n; i++) m->tokens[i] = (int32_t)(qlr_data_rng_next(&rng) % (uint64_t)vocab);
    for (int32_t i = 0; i < n; i++) {
        int32_t p = i % seq;
        m->pos[i] = p;
        m->seq[i] = i / seq;
        m->targets[i] = p + 1 < seq ? m->tokens[i + 1] : QLR_IGNORE_INDEX;
        m->n_targets += m->targets[i] >= 0;
    }
    m->n = m->cap = n;
    m->n_seq = mb;
    return QLR_OK;
}

/* What one run allocated and its state between steps. */
typedef struct run_ctx {
    qlr_backend *be;
    qlr_model *m;
    qlr_trainable tr;
    qlr_train_ctx *ctx;
    qlr_train_opts to;
    qlr_micro mb;
    uint64_t rng;
    double lr;
    int nonfinite_steps;
    double last_loss;
} run_ctx;

static void run_free(run_ctx *c) {
    qlr_train_ctx_free(c->ctx);
    if (c->be) qlr_trainable_free(c->be, &c->tr);
    qlr_model_free(c->m);
    qlr_micro_free(&c->mb);
    qlr_train_opts_free(&c->to);
    qlr_backend_free(c->be);
    memset(c, 0, sizeof *c);
}

static qlr_status one_step(run_ctx *c) {
    double loss, gn;
    int nf;
    QLR_TRY(qlr_train_step_compute(c->be, c->ctx, &c->tr, NULL, &c->to, &c->mb, 1, c->mb.n_targets, c->lr, &c->rng,
                                   &loss, &gn, &nf));
    c->last_loss = loss;
    if (nf) c->nonfinite_steps++;
    return QLR_OK;
}

static size_t device_used(qlr_backend *be) {
#ifdef QLR_BACKEND_CUDA
    size_t fr = 0, tot = 0;
    if (be->kind == QLR_DEVICE_CUDA && qlr_cuda_mem_info(be, &fr, &tot) == QLR_OK) return tot - fr;
    qlr_error_clear();
#endif
    (void)be;
    return 0;
}

/* The high-water mark of a backend without its own (the CPU's): be->mem.alloc/free wrapped
 * by a counter, one backend at a time (each run frees its backend before the next). */
static qlr_backend_mem g_real_mem;
static struct { void *p; size_t bytes; } *g_blocks;
static size_t g_n_blocks, g_cap_blocks, g_cur, g_peak;

static void *count_alloc(qlr_backend *be, size_t bytes) {
    void *p = g_real_mem.alloc(be, bytes);
    if (!p) return NULL;
    if (g_n_blocks == g_cap_blocks) {
        size_t cap = g_cap_blocks ? 2 * g_cap_blocks : 256;
        void *nb = realloc(g_blocks, cap * sizeof *g_blocks);
        if (!nb) { /* uncounted: the peak is then a lower bound */
            QLR_LOGW("bench train: the allocation counter is out of memory; peak_alloc_bytes is a lower bound");
            return p;
        }
        g_blocks = nb;
        g_cap_blocks = cap;
    }
    g_blocks[g_n_blocks].p = p;
    g_blocks[g_n_blocks++].bytes = bytes;
    g_cur += bytes;
    if (g_cur > g_peak) g_peak = g_cur;
    return p;
}

static void count_free(qlr_backend *be, void *p) {
    for (size_t i = 0; p && i < g_n_blocks; i++)
        if (g_blocks[i].p == p) {
            g_cur -= g_blocks[i].bytes;
            g_blocks[i] = g_blocks[--g_n_blocks];
            break;
        }
    g_real_mem.free(be, p);
}

static void count_install(qlr_backend *be) {
    g_real_mem = be->mem;
    g_n_blocks = g_cur = g_peak = 0;
    be->mem.alloc = count_alloc;
    be->mem.free = count_free;
}

static size_t peak_bytes(qlr_backend *be) {
#ifdef QLR_BACKEND_CUDA
    if (be->kind == QLR_DEVICE_CUDA) return qlr_cuda_peak_bytes(be);
#endif
    (void)be;
    return g_peak;
}

/* Backend (capped at cap bytes when > 0), model, adapter, optimizer, workspace and batch. */
static qlr_status run_setup(const qlr_bench_train_shape_opts *o, const qlr_model_config *cfg, const qlr_recipe *r,
                            uint64_t cap, run_ctx *c, size_t *used0) {
    memset(c, 0, sizeof *c);
    QLR_TRY(qlr_train_opts_from_recipe(r, &c->to));
    QLR_TRY(qlr_trainer_open_backend(c->to.device, o->threads, &c->be));
    *used0 = device_used(c->be);
    if (c->be->kind != QLR_DEVICE_CUDA) count_install(c->be);
    if (cap) {
#ifdef QLR_BACKEND_CUDA
        if (c->be->kind == QLR_DEVICE_CUDA) qlr_cuda_set_alloc_cap(c->be, (size_t)cap);
#endif
    }
    qlr_model_random_params rp = qlr_model_random_params_default();
    QLR_TRY(qlr_model_create_random(cfg, c->be, o->seed, &rp, &c->m));
    QLR_TRY(qlr_trainable_create(c->be, &c->m->cfg, &c->to, &c->tr));
    qlr_train_params tp;
    QLR_TRY(qlr_train_workspace_params(c->to.micro_batch_size, c->to.sequence_len, c->to.gradient_checkpointing,
                                       c->to.lora_dropout, &tp));
    QLR_TRY(qlr_train_ctx_create(c->m, &tp, &c->ctx));
    QLR_TRY(make_batch(&c->mb, (int32_t)c->to.sequence_len, (int32_t)c->to.micro_batch_size, cfg->n_vocab, o->seed));
    c->rng = qlr_data_rng_seed(o->seed, TRAINER_RNG_STREAM, 0);
    c->lr = c->to.lr;
    return QLR_OK;
}

/* FLOPs per trained token: model (MFU) = 4 N + L * 4 * seq * d * 3/2 with N the parameters of
 * the linears and the lm_head (no weight gradients of the frozen base: forward 2N, backward
 * dx 2N); hardware (HFU) adds checkpointing's recompute of each layer's forward
 * (2 N_layers + L * 2 * seq * d). LoRA's own FLOPs are left out of both (under 1% at r 16). */
static void flops_per_token(const qlr_model_config *cfg, int32_t seq, int ckpt, double *model, double *hw) {
    double n_layers_lin = 0;
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        int64_t out, in;
        qlr_model_linear_shape(cfg, (qlr_linear_id)i, &out, &in);
        n_layers_lin += (double)out * (double)in;
    }
    n_layers_lin *= cfg->n_layers;
    double n = n_layers_lin + (double)cfg->n_vocab * cfg->d_model;
    double attn = (double)cfg->n_layers * 4.0 * seq * cfg->d_model;
    *model = 4.0 * n + attn * 1.5;
    *hw = *model + (ckpt ? 2.0 * n_layers_lin + attn * 0.5 : 0.0);
}

/* The device's GEMM rate in TFLOP/s and what it is. */
static qlr_status gemm_rate(qlr_backend *be, double *tflops, const char **kind) {
    if (be->kind == QLR_DEVICE_CUDA) {
        *kind = "cuBLASLt bf16 8192^3";
        return qlr_bench_gemm_bf16_tflops(be, tflops);
    }
    *kind = "OpenBLAS sgemm 2048^3 (cpu)";
    *tflops = qlr_bench_sgemm_gflops(qlr_n_threads(), 2048, 2048, 2048, 0.5) * 1e-3;
    return QLR_OK;
}

/* One profiled step: the op timer around the trainer's step, a sync after each op on a
 * device. Times per op kind in ms, "gaps" the rest of the step's wall time. */
static qlr_status profile_step(run_ctx *c, json_t *out, double *wall_ms) {
    qlr_op_timer_install(c->be);
    qlr_op_timer_set_phase(QLR_TRAIN_PHASE_STEP);
    double t0 = qlr_now();
    qlr_status st = one_step(c);
    if (st == QLR_OK) st = c->be->mem.sync(c->be);
    double wall = (qlr_now() - t0) * 1e3;
    qlr_op_timer_uninstall(c->be);
    QLR_TRY(st);
    double timed = 0;
    for (int k = 0; k < QLR_OPK_COUNT; k++) {
        qlr_op_bucket b = qlr_op_timer_get(QLR_TRAIN_PHASE_STEP, (qlr_op_kind)k);
        const char *name = k == QLR_OPK_LINEAR ? "nf4_linears" : k == QLR_OPK_MEMORY ? "copies"
                                                                : qlr_op_kind_name((qlr_op_kind)k);
        json_object_set_new(out, name, jnum(b.seconds * 1e3));
        timed += b.seconds * 1e3;
    }
    json_object_set_new(out, "gaps", jnum(wall - timed));
    *wall_ms = wall;
    return QLR_OK;
}

static const char *device_name(qlr_backend *be, char *buf, size_t cap) {
#ifdef QLR_BACKEND_CUDA
    if (be->kind == QLR_DEVICE_CUDA) return qlr_cuda_device_name(be);
#endif
    snprintf(buf, cap, "cpu (%d threads)", qlr_n_threads());
    return buf;
}

/* Memory figures of a run beside the plan's. */
static void memory_json(json_t *j, run_ctx *c, size_t used0, uint64_t plan, uint64_t reserve) {
    size_t peak = peak_bytes(c->be), used = device_used(c->be);
    size_t delta = used > used0 ? used - used0 : 0;
    json_object_set_new(j, "peak_alloc_bytes", json_integer((json_int_t)peak));
    int cuda = c->be->kind == QLR_DEVICE_CUDA;
    json_object_set_new(j, "memgetinfo_used_delta", cuda ? json_integer((json_int_t)delta) : json_null());
    json_object_set_new(j, "plan_bytes", json_integer((json_int_t)plan));
    json_object_set_new(j, "plan_context_reserve_bytes", json_integer((json_int_t)reserve));
    /* the allocator does not see the CUDA context: compare it with the plan less its reserve */
    json_object_set_new(j, "peak_over_plan", jnum(plan > reserve ? (double)peak / (double)(plan - reserve) : NAN));
    json_object_set_new(j, "memgetinfo_delta_over_plan", jnum(cuda && plan ? (double)delta / (double)plan : NAN));
}

/* The checkpointing mode of a run: o's, or for auto the planner's choice (qlr_plan_build: the
 * fastest mode that fits) under --vram, or without one under the device's total memory (the
 * CPU: no budget, so checkpointing). */
static qlr_status choose_ckpt(const qlr_bench_train_shape_opts *o, const qlr_model_shape *s, const char *plan_name,
                              int32_t seq, int32_t mb, int *mode) {
    *mode = o->checkpointing;
    if (o->checkpointing != QLR_CKPT_AUTO) return QLR_OK;
    uint64_t budget = o->vram_budget;
#ifdef QLR_BACKEND_CUDA
    if (!budget && strcmp(o->device, "cpu")) {
        qlr_backend *be = NULL;
        size_t fr = 0, tot = 0;
        if (qlr_backend_create("cuda", 0, &be) == QLR_OK && qlr_cuda_mem_info(be, &fr, &tot) == QLR_OK)
            budget = tot;
        qlr_error_clear();
        qlr_backend_free(be);
    }
#endif
    qlr_recipe r;
    QLR_TRY(bench_recipe(o, plan_name, seq, mb, QLR_CKPT_AUTO, budget, &r));
    qlr_plan p;
    qlr_status st = qlr_plan_build(&r, s, &p);
    qlr_recipe_free(&r);
    QLR_TRY(st);
    *mode = p.ckpt_mode;
    qlr_plan_free(&p);
    return QLR_OK;
}

static qlr_status one_run(const qlr_bench_train_shape_opts *o, const qlr_model_config *cfg, const qlr_model_shape *s,
                          const char *plan_name, qlr_bench_train_run rn, json_t *runs, char *dev, size_t dev_cap) {
    int ckpt;
    QLR_TRY(choose_ckpt(o, s, plan_name, rn.seq, rn.micro_batch, &ckpt));
    uint64_t plan = 0, reserve = 0;
    QLR_TRY(plan_total(o, s, plan_name, rn.seq, rn.micro_batch, ckpt, &plan, &reserve, NULL));
    qlr_recipe r;
    QLR_TRY(bench_recipe(o, plan_name, rn.seq, rn.micro_batch, ckpt, o->vram_budget, &r));
    run_ctx c;
    size_t used0 = 0;
    QLR_LOGI("bench train: %s seq %d x micro-batch %d, checkpointing %s: setting up", o->shape, rn.seq,
             rn.micro_batch, qlr_plan_ckpt_name(ckpt));
    qlr_status st = run_setup(o, cfg, &r, 0, &c, &used0);
    qlr_recipe_free(&r);
    for (int i = 0; i < o->warmup && st == QLR_OK; i++) st = one_step(&c);
    if (st == QLR_OK) st = c.be->mem.sync(c.be);
    double t0 = qlr_now();
    for (int i = 0; i < o->steps && st == QLR_OK; i++) st = one_step(&c);
    if (st == QLR_OK) st = c.be->mem.sync(c.be);
    double secs = qlr_now() - t0;
    if (st) {
        run_free(&c);
        return st;
    }
    json_t *j = json_object();
    char nb[64];
    snprintf(dev, dev_cap, "%s", device_name(c.be, nb, sizeof nb));
    json_object_set_new(j, "seq", json_integer(rn.seq));
    json_object_set_new(j, "micro_batch", json_integer(rn.micro_batch));
    json_object_set_new(j, "checkpointing", json_string(qlr_plan_ckpt_name(ckpt)));
    json_object_set_new(j, "steps", json_integer(o->steps));
    json_object_set_new(j, "warmup_steps", json_integer(o->warmup));
    double tokens = (double)c.mb.n * o->steps, tps = secs > 0 ? tokens / secs : NAN;
    json_object_set_new(j, "step_s", jnum(secs / o->steps));
    json_object_set_new(j, "tokens_per_s", jnum(tps));
    json_object_set_new(j, "final_loss", jnum(c.last_loss));
    json_object_set_new(j, "nonfinite_steps", json_integer(c.nonfinite_steps));
    memory_json(j, &c, used0, plan, reserve);
    if (o->profile) {
        json_t *bd = json_object();
        double wall_ms = 0;
        if ((st = profile_step(&c, bd, &wall_ms))) {
            json_decref(bd);
            json_decref(j);
            run_free(&c);
            return st;
        }
        json_object_set_new(j, "profiled_step_ms", jnum(wall_ms));
        json_object_set_new(j, "breakdown_ms", bd);
    }
    double tflops = 0, fm, fh;
    const char *gk;
    st = gemm_rate(c.be, &tflops, &gk);
    flops_per_token(cfg, rn.seq, ckpt, &fm, &fh);
    json_object_set_new(j, "gemm_tflops", jnum(tflops));
    json_object_set_new(j, "gemm", json_string(gk));
    json_object_set_new(j, "model_flops_per_token", jnum(fm));
    json_object_set_new(j, "hardware_flops_per_token", jnum(fh));
    json_object_set_new(j, "mfu", jnum(tflops > 0 ? tps * fm / (tflops * 1e12) : NAN));
    json_object_set_new(j, "hfu", jnum(tflops > 0 ? tps * fh / (tflops * 1e12) : NAN));
    json_array_append_new(runs, j);
    run_free(&c);
    return st;
}

/* The planner's longest sequence (micro-batch 1) within the budget: 0 when not even 16 fits. */
static qlr_status longest_seq(const qlr_bench_train_shape_opts *o, const qlr_model_shape *s, const char *plan_name,
                              int32_t hi, int ckpt, int32_t *out) {
    int32_t lo = 16;
    uint64_t t;
    *out = 0;
    QLR_TRY(plan_total(o, s, plan_name, lo, 1, ckpt, &t, NULL, NULL));
    if (t > o->vram_budget) return QLR_OK;
    while (lo < hi) { /* lo fits; find the largest that does */
        int32_t mid = lo + (hi - lo + 1) / 2;
        QLR_TRY(plan_total(o, s, plan_name, mid, 1, ckpt, &t, NULL, NULL));
        if (t <= o->vram_budget) lo = mid;
        else hi = mid - 1;
    }
    *out = lo;
    return QLR_OK;
}

static qlr_status longest_run(const qlr_bench_train_shape_opts *o, const qlr_model_config *cfg,
                              const qlr_model_shape *s, const char *plan_name, json_t *out) {
    /* the planner's choice per length unless --checkpointing named a mode */
    int ckpt = o->ckpt_given ? o->checkpointing : QLR_CKPT_AUTO;
    int32_t hi = cfg->ctx_train < 131072 ? cfg->ctx_train : 131072, seq;
    QLR_TRY(longest_seq(o, s, plan_name, hi, ckpt, &seq));
    json_object_set_new(out, "vram_budget_bytes", json_integer((json_int_t)o->vram_budget));
    json_object_set_new(out, "planner_longest_seq", json_integer(seq));
    json_object_set_new(out, "seq_bound", json_integer(hi));
    if (!seq) {
        json_object_set_new(out, "confirmed", json_false());
        return qlr_errorf(QLR_ERR_RANGE, "--longest: not even 16 tokens fit in --vram %.2f GiB",
                          (double)o->vram_budget / (1 << 30));
    }
    uint64_t plan = 0, reserve = 0;
    QLR_TRY(plan_total(o, s, plan_name, seq, 1, ckpt, &plan, &reserve, &ckpt));
    json_object_set_new(out, "checkpointing", json_string(qlr_plan_ckpt_name(ckpt)));
    uint64_t cap = o->vram_budget > reserve ? o->vram_budget - reserve : o->vram_budget;
    int capped = 0;
#ifdef QLR_BACKEND_CUDA
    capped = strcmp(o->device, "cpu") != 0;
#endif
    if (!capped) QLR_LOGW("--longest: the cpu backend has no allocation cap; the steps run uncapped");
    json_object_set_new(out, "alloc_cap_bytes", capped ? json_integer((json_int_t)cap) : json_null());
    qlr_recipe r;
    QLR_TRY(bench_recipe(o, plan_name, seq, 1, ckpt, o->vram_budget, &r));
    run_ctx c;
    size_t used0 = 0;
    QLR_LOGI("bench train: longest %s seq %d within %.2f GiB (allocations capped at %.2f GiB): 3 steps", o->shape,
             seq, (double)o->vram_budget / (1 << 30), (double)cap / (1 << 30));
    qlr_status st = run_setup(o, cfg, &r, capped ? cap : 0, &c, &used0);
    qlr_recipe_free(&r);
    json_t *secs = json_array();
    for (int i = 0; i < 3 && st == QLR_OK; i++) {
        double t0 = qlr_now();
        st = one_step(&c);
        if (st == QLR_OK) st = c.be->mem.sync(c.be);
        if (st == QLR_OK) json_array_append_new(secs, jnum(qlr_now() - t0));
    }
    json_object_set_new(out, "step_s", secs);
    json_object_set_new(out, "confirmed", json_boolean(st == QLR_OK));
    if (st) json_object_set_new(out, "error", json_string(qlr_error_msg()));
    if (c.be) memory_json(out, &c, used0, plan, reserve);
    run_free(&c);
    return st;
}

qlr_status qlr_bench_train_shape(const qlr_bench_train_shape_opts *o, FILE *json) {
    if (!o->shape) return qlr_errorf(QLR_ERR_INVALID, "bench train: --shape is required");
    if (o->steps < 1) return qlr_errorf(QLR_ERR_INVALID, "bench train: --steps must be >= 1");
    if (o->warmup < 0) return qlr_errorf(QLR_ERR_INVALID, "bench train: --warmup must be >= 0");
    if (o->longest && !o->vram_budget) return qlr_errorf(QLR_ERR_INVALID, "bench train: --longest needs --vram");
    if (!o->n_runs && !o->longest) return qlr_errorf(QLR_ERR_INVALID, "bench train: no run (--runs or --longest)");
    qlr_model_config cfg;
    const char *plan_name;
    QLR_TRY(qlr_bench_model_config(o->shape, &cfg, &plan_name));
    qlr_model_shape s;
    QLR_TRY(qlr_model_shape_preset(plan_name, &s));
    for (int i = 0; i < o->n_runs; i++)
        if (o->runs[i].seq < 16 || o->runs[i].micro_batch < 1 || o->runs[i].seq > cfg.ctx_train)
            return qlr_errorf(QLR_ERR_INVALID, "bench train: --runs %d:%d: seq must be in 16..%d, micro-batch >= 1",
                              o->runs[i].seq, o->runs[i].micro_batch, cfg.ctx_train);
    if (o->threads > 0) qlr_set_n_threads(o->threads);
    json_t *j = json_object(), *runs = json_array();
    char dev[256] = "";
    qlr_status st = QLR_OK;
    for (int i = 0; i < o->n_runs && st == QLR_OK; i++)
        st = one_run(o, &cfg, &s, plan_name, o->runs[i], runs, dev, sizeof dev);
    json_t *lg = NULL;
    if (st == QLR_OK && o->longest) {
        lg = json_object();
        st = longest_run(o, &cfg, &s, plan_name, lg);
    }
    if (st == QLR_OK || lg) {
        json_object_set_new(j, "bench", json_string("train"));
        json_object_set_new(j, "shape", json_string(o->shape));
        json_object_set_new(j, "device", json_string(o->device));
        json_object_set_new(j, "device_name", json_string(dev[0] ? dev : o->device));
        json_object_set_new(j, "lora_r", json_integer(LORA_R));
        json_object_set_new(j, "lora_alpha", json_integer(LORA_ALPHA));
        json_object_set_new(j, "lora_targets", json_string("all 7 linears"));
        json_object_set_new(j, "optimizer", json_string("adamw_8bit"));
        json_object_set_new(j, "batches", json_string("packed causal rows of random tokens, one sequence per row"));
        json_object_set_new(j, "runs", runs);
        runs = NULL;
        if (lg) json_object_set_new(j, "longest", lg);
        char *txt = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
        if (txt) fprintf(json, "%s\n", txt);
        else if (st == QLR_OK) st = qlr_errorf(QLR_ERR_NOMEM, "bench train: JSON");
        free(txt);
    }
    json_decref(runs);
    json_decref(j);
    return st;
}
