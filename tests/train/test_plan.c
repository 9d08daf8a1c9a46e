/* tests/train/test_plan.c: the memory plan.
 *  - plan == allocation: a run's allocations (the weights through qlr_model_load, the trainable
 *    adapter with its device side and optimizer states through the trainer's own
 *    qlr_trainable_create, the training workspace) recorded buffer by buffer on a device-like
 *    recorder equal the plan's items, for the Llama-3.1-8B recipe and the quickstart (with and
 *    without checkpointing);
 *  - the 8B recipe fits 16 GiB, its totals, JSON and the 32-bit optimizer's 8 bytes/parameter;
 *  - over-budget advice; shape sources (preset, GGUF demo model, config.json). */
#include "core/core.h"
#include "tests/test_util.h"
#include "train/plan.h"
#include "train/recipe.h"
#include "train/trainer_internal.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static uint64_t A(uint64_t b) { return (b + 255) / 256 * 256; }

/* ---- plan == allocation: a backend that records what is allocated and touches nothing ----
 * Device-like (bf16 activations, not host-visible, so every buffer is a mem.alloc, as on CUDA).
 * Its pointers are addresses in a range never mapped: a dereference would crash the test. The
 * ops that allocation paths check for exist but are never called. */

typedef struct rec_log {
    uint64_t *sizes;
    size_t n, cap;
    uint64_t next;
} rec_log;
static rec_log g_rec;

static void *rec_alloc(qlr_backend *be, size_t bytes) {
    (void)be;
    if (g_rec.n == g_rec.cap) {
        g_rec.cap = g_rec.cap ? 2 * g_rec.cap : 1024;
        g_rec.sizes = realloc(g_rec.sizes, g_rec.cap * sizeof *g_rec.sizes);
    }
    uint64_t b = qlr_alloc_bytes(bytes);
    g_rec.sizes[g_rec.n++] = b;
    void *p = (void *)(uintptr_t)((1ull << 44) + g_rec.next);
    g_rec.next += b;
    return p;
}
static void rec_free(qlr_backend *be, void *p) { (void)be, (void)p; }
/* Pinned host memory (offload): recorded apart, compared with the plan's host items. */
static uint64_t g_host_bytes, g_host_n;
static void *rec_host_alloc(qlr_backend *be, size_t bytes) {
    (void)be;
    g_host_bytes += qlr_alloc_bytes(bytes);
    g_host_n++;
    return (void *)(uintptr_t)(1ull << 45);
}
static void *rec_event_create(qlr_backend *be) {
    (void)be;
    return (void *)(uintptr_t)1;
}
static void rec_event_free(qlr_backend *be, void *ev) { (void)be, (void)ev; }
static qlr_status rec_set(qlr_backend *be, void *p, size_t n) { (void)be, (void)p, (void)n; return QLR_OK; }
static qlr_status rec_copy(qlr_backend *be, void *d, const void *s, size_t n) {
    (void)be, (void)d, (void)s, (void)n;
    return QLR_OK;
}
static qlr_status rec_sync(qlr_backend *be) { (void)be; return QLR_OK; }
static qlr_status rec_f32_to_act(qlr_backend *be, void *d, const float *s, int64_t n) {
    (void)be, (void)d, (void)s, (void)n;
    return QLR_OK;
}
static qlr_status never_called(void) { return QLR_ERR_INTERNAL; }

static void rec_backend(qlr_backend *be) {
    memset(be, 0, sizeof *be);
    be->name = "recorder";
    be->kind = QLR_DEVICE_CUDA;
    be->act_dtype = QLR_BF16;
    be->mem.alloc = rec_alloc;
    be->mem.free = rec_free;
    be->mem.memset0 = rec_set;
    be->mem.h2d = rec_copy;
    be->mem.d2h = rec_copy;
    be->mem.d2d = rec_copy;
    be->mem.sync = rec_sync;
    be->mem.host_alloc = rec_host_alloc;
    be->mem.host_free = rec_free;
    be->mem.event_create = rec_event_create;
    be->mem.event_free = rec_event_free;
    be->ops.f32_to_act = rec_f32_to_act;
    /* qlr_train_ctx_create checks these exist */
#define NEVER(f) be->ops.f = (void *)never_called
    NEVER(attention_varlen);
    NEVER(attention_varlen_bwd);
    NEVER(lm_head_ce);
    NEVER(dropout);
    NEVER(rmsnorm_bwd);
    NEVER(rope_bwd);
    NEVER(swiglu_bwd);
    NEVER(nf4_linear_dx);
    NEVER(lora_bwd);
#undef NEVER
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The plan's items of the components in `mask` (bit per qlr_plan_component), one entry per
 * buffer, sorted; *n their count. */
static uint64_t *plan_sizes(const qlr_plan *p, uint32_t mask, size_t *n) {
    size_t k = 0;
    for (uint32_t i = 0; i < p->n_items; i++)
        if (mask >> p->items[i].comp & 1) k += p->items[i].count;
    uint64_t *v = malloc((k ? k : 1) * sizeof *v);
    k = 0;
    for (uint32_t i = 0; i < p->n_items; i++)
        if (mask >> p->items[i].comp & 1)
            for (uint64_t c = 0; c < p->items[i].count; c++) v[k++] = p->items[i].bytes_each;
    qsort(v, k, sizeof *v, cmp_u64);
    *n = k;
    return v;
}

/* The allocations recorded since `from` equal the plan's items of `mask`, buffer by buffer. */
static void check_phase(const char *what, const qlr_plan *p, uint32_t mask, size_t from) {
    size_t n_plan, n_rec = g_rec.n - from;
    uint64_t *want = plan_sizes(p, mask, &n_plan);
    uint64_t *got = malloc((n_rec ? n_rec : 1) * sizeof *got);
    memcpy(got, g_rec.sizes + from, n_rec * sizeof *got);
    qsort(got, n_rec, sizeof *got, cmp_u64);
    uint64_t tw = 0, tg = 0, diff = 0;
    for (size_t i = 0; i < n_plan; i++) tw += want[i];
    for (size_t i = 0; i < n_rec; i++) tg += got[i];
    for (size_t i = 0; i < n_plan && i < n_rec; i++) diff += want[i] != got[i];
    printf("%s: planned %zu buffers, %.3f MiB; allocated %zu buffers, %.3f MiB\n", what, n_plan,
           tw / 1048576.0, n_rec, tg / 1048576.0);
    CHECK_MSG(n_plan == n_rec && diff == 0 && tw == tg, "%s: the plan (%zu buffers, %llu bytes) is not "
              "the allocation (%zu buffers, %llu bytes; %llu sizes differ)", what, n_plan,
              (unsigned long long)tw, n_rec, (unsigned long long)tg, (unsigned long long)diff);
    free(want);
    free(got);
}

#define C(x) (1u << (x))

/* Builds the plan of `recipe` (+ sets, device cuda) and performs the run's allocations on the
 * recorder: the weights (when `model_file`, through qlr_model_load), the trainable adapter with
 * its device side and optimizer states (qlr_trainable_create, the trainer's own function), and
 * the training workspace (qlr_train_ctx_create). */
static void test_plan_is_allocation(const char *recipe, const char *const *sets, int n_sets,
                                    const char *model_file) {
    qlr_recipe r;
    const char *all[8];
    int n = 0;
    for (int i = 0; i < n_sets; i++) all[n++] = sets[i];
    all[n++] = "device=cuda";
    CHECK_OK(qlr_recipe_load(recipe, all, n, &r));
    if (!r.base_model) return;
    qlr_model_shape s;
    CHECK_OK(qlr_model_shape_for_recipe(&r, &s));
    qlr_plan p;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    qlr_train_opts o;
    CHECK_OK(qlr_train_opts_from_recipe(&r, &o));
    qlr_backend be;
    rec_backend(&be);
    printf("%s (%s):\n", recipe, s.name);

    qlr_model m0, *m = &m0;
    memset(m, 0, sizeof *m);
    size_t from = g_rec.n;
    if (model_file) {
        qlr_model_load_params lp = qlr_model_load_params_default();
        lp.progress = 0;
        m = NULL;
        CHECK_OK(qlr_model_load(model_file, &be, &lp, &m));
        if (!m) goto done;
        check_phase("  weights", &p, C(QLR_PLAN_BASE_NF4) | C(QLR_PLAN_EMBEDDINGS) | C(QLR_PLAN_NORMS) |
                    C(QLR_PLAN_LM_HEAD), from);
    } else {
        m->be = &be;
        qlr_model_shape_config(&s, &m->cfg);
    }

    from = g_rec.n;
    qlr_trainable tr;
    CHECK_OK(qlr_trainable_create(&be, &m->cfg, &o, &tr));
    check_phase("  adapter + optimizer", &p, C(QLR_PLAN_LORA_MASTER) | C(QLR_PLAN_LORA_COMPUTE) |
                C(QLR_PLAN_LORA_GRADS) | C(QLR_PLAN_OPTIMIZER) | C(QLR_PLAN_MISC), from);
    CHECK_EQ_INT(tr.lora ? tr.lora->n_params : 0, p.lora_params);

    from = g_rec.n;
    qlr_train_params tp;
    CHECK_OK(qlr_train_workspace_params(r.micro_batch_size, r.sequence_len, p.ckpt_mode,
                                        r.lora_dropout, &tp));
    qlr_train_ctx *c = NULL;
    g_host_bytes = g_host_n = 0;
    CHECK_OK(qlr_train_ctx_create(m, &tp, &c));
    /* the pinned host block (offload) is the plan's host component, apart from the device total */
    CHECK_EQ_INT(g_host_bytes, p.host_total);
    CHECK_EQ_INT(g_host_bytes, p.comp_bytes[QLR_PLAN_HOST_PINNED]);
    CHECK_EQ_INT(g_host_n, p.host_total ? 1 : 0);
    CHECK_EQ_INT(p.host_total != 0, p.ckpt_mode == QLR_CKPT_OFFLOAD);
    /* one allocation carved into the planned buffers */
    size_t n_ws;
    uint64_t *ws = plan_sizes(&p, C(QLR_PLAN_ACT_SAVED) | C(QLR_PLAN_RECOMPUTE) | C(QLR_PLAN_BACKWARD) |
                              C(QLR_PLAN_LM_HEAD_CE) | C(QLR_PLAN_BATCH), &n_ws);
    uint64_t sum = 0;
    for (size_t i = 0; i < n_ws; i++) sum += ws[i];
    free(ws);
    CHECK_EQ_INT(g_rec.n - from, 1);
    if (g_rec.n - from == 1) {
        printf("  training workspace: planned %zu buffers, %.3f MiB; allocated one block of %.3f MiB\n",
               n_ws, sum / 1048576.0, g_rec.sizes[from] / 1048576.0);
        CHECK_EQ_INT(g_rec.sizes[from], sum);
    }
    qlr_train_ctx_free(c);
    qlr_trainable_free(&be, &tr);
    if (model_file) qlr_model_free(m);
done:
    qlr_train_opts_free(&o);
    qlr_plan_free(&p);
    qlr_recipe_free(&r);
}

static void test_llama3_8b(void) {
    qlr_recipe r;
    CHECK_OK(qlr_recipe_load(QLR_SOURCE_DIR "/recipes/llama3-8b-16gb.yaml", NULL, 0, &r));
    if (!r.base_model) return;
    qlr_model_shape s;
    CHECK_OK(qlr_model_shape_for_recipe(&r, &s));
    CHECK_EQ_INT(s.source, QLR_SHAPE_PRESET);
    CHECK(!strcmp(s.name, "Llama-3.1-8B"));
    qlr_plan p;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    CHECK_EQ_INT(r.vram_budget, 16ll << 30);
    CHECK_MSG(p.total < (16ull << 30), "8B plan %.2f GiB is not under 16 GiB", p.total / 1073741824.0);
    CHECK_OK(qlr_plan_check(&p, &r, 16ull << 30));
    uint64_t sum = 0;
    for (int c = 0; c < QLR_PLAN_N_COMPONENTS; c++) sum += p.comp_bytes[c];
    CHECK_EQ_INT(p.total, sum);
    /* the NF4 base is about 0.5 + 1/64 + 1/4096 bytes per parameter */
    CHECK_NEAR((double)p.comp_bytes[QLR_PLAN_BASE_NF4] / (double)p.base_params, 0.5 + 1.0 / 64 + 1.0 / 4096,
               1e-3, 0);
    const uint64_t H = 4096, L = 32, F = 14336, R = 16, qd = 4096, kvd = 1024;
    CHECK_EQ_INT(p.lora_params, L * R * (2 * H + (H + kvd) * 2 + 2 * qd + 3 * (H + F)));

    /* JSON carries the same numbers */
    char *js = NULL;
    CHECK_OK(qlr_plan_to_json(&p, &r, 16ull << 30, &js));
    json_error_t e;
    json_t *j = js ? json_loads(js, 0, &e) : NULL;
    CHECK(j != NULL);
    CHECK_EQ_INT(json_integer_value(json_object_get(j, "total_bytes")), p.total);
    CHECK(json_is_true(json_object_get(j, "fits")));
    CHECK_EQ_INT(json_array_size(json_object_get(j, "components")), QLR_PLAN_N_COMPONENTS);
    json_decref(j);
    free(js);
    uint64_t opt8 = p.comp_bytes[QLR_PLAN_OPTIMIZER];
    qlr_plan_free(&p);

    /* 32-bit optimizer: 8 bytes per parameter */
    r.optimizer = QLR_OPTIM_ADAMW_TORCH;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    uint64_t lin[7][2] = {{qd, H}, {kvd, H}, {kvd, H}, {H, qd}, {F, H}, {F, H}, {H, F}}, opt32 = 0;
    for (int i = 0; i < 7; i++) opt32 += L * (2 * A(4 * R * lin[i][1]) + 2 * A(4 * lin[i][0] * R));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_OPTIMIZER], opt32);
    CHECK(opt8 < opt32 / 3);
    qlr_plan_free(&p);
    qlr_recipe_free(&r);
}

static void test_over_budget(void) {
    qlr_recipe r;
    const char *sets[] = {"micro_batch_size=8", "sequence_len=8192"};
    CHECK_OK(qlr_recipe_load(QLR_SOURCE_DIR "/recipes/llama3-8b-16gb.yaml", sets, 2, &r));
    if (!r.base_model) return;
    qlr_model_shape s;
    qlr_plan p;
    CHECK_OK(qlr_model_shape_for_recipe(&r, &s));
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    CHECK(p.total > (16ull << 30));
    CHECK(qlr_plan_check(&p, &r, 16ull << 30) == QLR_ERR_RANGE);
    const char *m = qlr_error_msg();
    CHECK_MSG(strstr(m, "but the budget is 16.00 GiB: over by") != NULL, "%s", m);
    CHECK_MSG(strstr(m, "micro_batch_size: 8 -> 1 (saves") != NULL, "%s", m);
    CHECK_MSG(strstr(m, "raise gradient_accumulation_steps 16 -> 128 to keep 128 rows per step") != NULL, "%s", m);
    CHECK_MSG(strstr(m, "sequence_len: 8192 -> ") != NULL, "%s", m);
    /* the advice is right: micro_batch_size 1 fits, 2 does not */
    r.micro_batch_size = 1;
    qlr_plan q;
    CHECK_OK(qlr_plan_build(&r, &s, &q));
    CHECK(q.total <= (16ull << 30));
    qlr_plan_free(&q);
    r.micro_batch_size = 2;
    CHECK_OK(qlr_plan_build(&r, &s, &q));
    CHECK(q.total > (16ull << 30));
    qlr_plan_free(&q);
    qlr_plan_free(&p);

    /* checkpointing off: named, alone or together with a smaller micro batch */
    r.micro_batch_size = 8;
    r.sequence_len = 4096;
    r.gradient_checkpointing = 0;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    CHECK(qlr_plan_check(&p, &r, 16ull << 30) == QLR_ERR_RANGE);
    CHECK_MSG(strstr(qlr_error_msg(), "together: gradient_checkpointing: true, micro_batch_size: 8 -> ") != NULL, "%s",
              qlr_error_msg());
    qlr_plan_free(&p);

    /* a budget below the weights: says that nothing alone fits */
    r.gradient_checkpointing = 1;
    r.micro_batch_size = 1;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    CHECK(qlr_plan_check(&p, &r, 3ull << 30) == QLR_ERR_RANGE);
    CHECK_MSG(strstr(qlr_error_msg(), "no single change of micro_batch_size, sequence_len, gradient_checkpointing or lora_r fits") != NULL,
              "%s", qlr_error_msg());
    CHECK_OK(qlr_plan_check(&p, &r, 0)); /* no budget */
    qlr_plan_free(&p);
    qlr_recipe_free(&r);
}

static void test_shapes(void) {
    qlr_model_shape s;
    CHECK_OK(qlr_model_shape_preset("meta-llama/Llama-3.1-8B-Instruct", &s));
    CHECK(s.hidden == 4096 && s.n_layers == 32 && s.n_heads == 32 && s.n_kv_heads == 8 && s.ff == 14336 &&
          s.vocab == 128256 && !s.tied);
    CHECK_OK(qlr_model_shape_preset("meta-llama/Llama-3.2-1B", &s));
    CHECK(s.hidden == 2048 && s.n_layers == 16 && s.tied);
    CHECK_OK(qlr_model_shape_preset("Llama-3.2-3B-Instruct", &s));
    CHECK(s.hidden == 3072 && s.n_layers == 28 && s.n_heads == 24);
    CHECK_OK(qlr_model_shape_preset("HuggingFaceTB/SmolLM2-135M-Instruct", &s));
    CHECK(s.hidden == 576 && s.n_layers == 30 && s.n_heads == 9 && s.n_kv_heads == 3 && s.ff == 1536 && s.tied);
    CHECK(qlr_model_shape_preset("meta-llama/Llama-3.1-80B", &s) == QLR_ERR_NOT_FOUND);
    CHECK(qlr_model_shape_preset("gpt2", &s) == QLR_ERR_NOT_FOUND);

    /* config.json */
    char path[512];
    snprintf(path, sizeof path, "%s/config.json", test_tmpdir());
    const char *cfg = "{\"model_type\": \"llama\", \"hidden_size\": 2048, \"num_hidden_layers\": 16, "
                      "\"num_attention_heads\": 32, \"num_key_value_heads\": 8, \"intermediate_size\": 8192, "
                      "\"vocab_size\": 128256, \"tie_word_embeddings\": true, \"head_dim\": 64}";
    CHECK_OK(qlr_write_atomic(path, cfg, strlen(cfg)));
    CHECK_OK(qlr_model_shape_from_config(test_tmpdir(), &s));
    CHECK(s.source == QLR_SHAPE_CONFIG_JSON && s.hidden == 2048 && s.n_kv_heads == 8 && s.head_dim == 64 && s.tied);
    const char *bad = "{\"model_type\": \"llama\", \"hidden_size\": 2048, \"num_hidden_layers\": 16, "
                      "\"num_attention_heads\": 32, \"num_key_value_heads\": 7, \"intermediate_size\": 8192, \"vocab_size\": 10}";
    CHECK_OK(qlr_write_atomic(path, bad, strlen(bad)));
    CHECK(qlr_model_shape_from_config(path, &s) == QLR_ERR_FORMAT);
    CHECK(strstr(qlr_error_msg(), "32 heads is not a multiple of 7 kv heads") != NULL);

    /* the demo model's GGUF metadata */
    const char *demo = test_demo_model_or_fail();
    if (!demo) return;
    CHECK_OK(qlr_model_shape_from_gguf(demo, &s));
    CHECK(s.source == QLR_SHAPE_GGUF && s.hidden == 576 && s.n_layers == 30 && s.n_heads == 9 && s.n_kv_heads == 3 &&
          s.head_dim == 64 && s.ff == 1536 && s.vocab == 49152 && s.tied);

    /* quickstart plan on the demo model: SmolLM2's k/v LoRA B (192 x 16 = 3072 < 4096) keeps fp32 states */
    qlr_recipe r;
    char set_model[4200];
    snprintf(set_model, sizeof set_model, "base_model=%s", demo); /* QLR_DEMO_MODEL may point elsewhere */
    const char *sets[1] = {set_model};
    CHECK_OK(qlr_recipe_load(QLR_SOURCE_DIR "/recipes/smollm2-quickstart.yaml", sets, 1, &r));
    if (!r.base_model) return;
    qlr_model_shape q;
    CHECK_OK(qlr_model_shape_for_recipe(&r, &q));
    CHECK_EQ_INT(q.source, QLR_SHAPE_GGUF);
    qlr_plan p;
    CHECK_OK(qlr_plan_build(&r, &q, &p));
    int found32 = 0, found8 = 0;
    for (uint32_t i = 0; i < p.n_items; i++) {
        if (!strcmp(p.items[i].name, "blk.*.k_proj lora_B m, v f32")) {
            found32 = 1;
            CHECK_EQ_INT(p.items[i].bytes_each, A(3072 * 4));
            CHECK_EQ_INT(p.items[i].count, 2 * 30);
        }
        if (!strcmp(p.items[i].name, "blk.*.k_proj lora_A m, v codes u8")) found8 = 1;
    }
    CHECK(found32 && found8);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_LM_HEAD], 0);
    CHECK_EQ_INT(p.ce_chunk, 1024);
    qlr_plan_free(&p);
    /* on the CPU: no CUDA workspaces */
    r.device = QLR_RECIPE_DEVICE_CPU;
    CHECK_OK(qlr_plan_build(&r, &q, &p));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_CUDA_CONTEXT], 0);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_BLAS_WS], 0);
    qlr_plan_free(&p);
    qlr_recipe_free(&r);
}

/* Issue 13: Llama-3.1-8B within 16 GiB. gradient_checkpointing auto picks the fastest mode that
 * fits: at 80k tokens only offload (+ MLP chunks) fits; the longest context that fits is
 * >= 80,000 tokens; with an ample budget no recomputation; without one, checkpointing. */
static void test_long_context_8b(void) {
    const uint64_t G16 = 16ull << 30;
    qlr_recipe r;
    const char *sets[] = {"micro_batch_size=1", "sequence_len=2048", "gradient_checkpointing=true",
                          "device=cuda"};
    CHECK_OK(qlr_recipe_load(QLR_SOURCE_DIR "/recipes/llama3-8b-16gb.yaml", sets, 4, &r));
    if (!r.base_model) return;
    qlr_model_shape s;
    CHECK_OK(qlr_model_shape_for_recipe(&r, &s));
    qlr_plan p;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    /* Issue 13 asks for <= 6.5 GiB; the plan is 8.10 GiB: the bf16 embedding table and lm_head
     * alone are 1.96 GiB and the 33 layer inputs 0.52 GiB. Not met yet (the embedding table on
     * the host is the next step); this guards against growth. */
    printf("8B seq 2048 mb 1 checkpointing: %.3f GiB (issue target <= 6.5 GiB: not met)\n",
           p.total / 1073741824.0);
    CHECK_MSG(p.total <= (33ull << 28), "8B at 2048 tokens with checkpointing plans %.3f GiB > 8.25 GiB",
              p.total / 1073741824.0);
    qlr_plan_free(&p);

    r.gradient_checkpointing = QLR_CKPT_AUTO;
    r.vram_budget = G16;
    r.sequence_len = 81920;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    char line[256];
    qlr_plan_choice_line(&p, &r, G16, line, sizeof line);
    printf("8B seq 81920 auto, 16 GiB: %s\n", line);
    CHECK_EQ_INT(p.ckpt_mode, QLR_CKPT_OFFLOAD);
    CHECK(p.ckpt_auto && p.mlp_chunk == QLR_PLAN_MLP_CHUNK);
    CHECK_MSG(p.total <= G16, "8B at 81920 tokens with offload plans %.3f GiB", p.total / 1073741824.0);
    /* the 32 layer inputs [81920, 4096] bf16 on the host */
    CHECK_EQ_INT(p.host_total, 32ull * 81920 * 4096 * 2);
    CHECK(strstr(line, "offload") && strstr(line, "pinned host"));
    qlr_plan_free(&p);

    uint32_t best = 0;
    CHECK_OK(qlr_plan_longest_seq(&r, &s, G16, 1u << 20, &best, &p));
    printf("8B longest sequence within 16 GiB (mb 1): %u tokens, gradient_checkpointing %s, %.3f GiB\n",
           best, qlr_plan_ckpt_name(p.ckpt_mode), p.total / 1073741824.0);
    CHECK_MSG(best >= 80000, "8B: the longest context within 16 GiB is %u tokens", best);
    CHECK(p.total <= G16 && p.ckpt_mode == QLR_CKPT_OFFLOAD);
    qlr_plan_free(&p);

    /* a budget with room: auto takes the fastest mode, no recomputation */
    r.sequence_len = 2048;
    r.vram_budget = 80ull << 30;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    CHECK_EQ_INT(p.ckpt_mode, QLR_CKPT_OFF);
    qlr_plan_free(&p);
    r.vram_budget = 0; /* no budget: checkpointing, as before auto */
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    CHECK_EQ_INT(p.ckpt_mode, QLR_CKPT_ON);
    qlr_plan_free(&p);
    CHECK(qlr_plan_longest_seq(&r, &s, 0, 1000, &best, NULL) == QLR_ERR_INVALID);
    qlr_recipe_free(&r);
}

int main(void) {
    qlr_log_set_level(QLR_LOG_ERROR);
    test_llama3_8b();
    test_long_context_8b();
    /* plan == allocation: the 8B recipe (adapter, optimizer, workspace) and the quickstart on the
     * demo model (weights too) */
    test_plan_is_allocation(QLR_SOURCE_DIR "/recipes/llama3-8b-16gb.yaml", NULL, 0, NULL);
    const char *off[3] = {"gradient_checkpointing=offload", "sequence_len=81920", "micro_batch_size=1"};
    test_plan_is_allocation(QLR_SOURCE_DIR "/recipes/llama3-8b-16gb.yaml", off, 3, NULL);
    const char *aut[2] = {"gradient_checkpointing=auto", "lora_dropout=0.05"};
    test_plan_is_allocation(QLR_SOURCE_DIR "/recipes/llama3-8b-16gb.yaml", aut, 2, NULL);
    const char *demo = test_demo_model();
    char set_model[4200];
    snprintf(set_model, sizeof set_model, "base_model=%s", demo);
    const char *qs[2] = {set_model, "gradient_checkpointing=true"};
    if (qlr_path_exists(demo)) {
        test_plan_is_allocation(QLR_SOURCE_DIR "/recipes/smollm2-quickstart.yaml", qs, 1, demo);
        test_plan_is_allocation(QLR_SOURCE_DIR "/recipes/smollm2-quickstart.yaml", qs, 2, demo);
    }
    test_over_budget();
    test_shapes();
    return test_finish();
}
