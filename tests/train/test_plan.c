/* tests/train/test_plan.c: the memory plan. The Llama-3.1-8B recipe's components are checked
 * against sizes computed here from the layout rules written in train/plan.h (NF4 codes n/2 +
 * uint8 absmax n/64 + fp32 nested absmax per 256 + offset; LoRA fp32/bf16/fp32; 8-bit AdamW
 * with the 4096-element rule; checkpointed activations; chunked CE), every buffer rounded up to
 * 256 bytes. Also: over-budget advice, shape sources (preset, GGUF demo model, config.json). */
#include "core/core.h"
#include "tests/test_util.h"
#include "train/plan.h"
#include "train/recipe.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

static uint64_t A(uint64_t b) { return (b + 255) / 256 * 256; }
static uint64_t cdiv(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

static uint64_t nf4_bytes(uint64_t n) {
    uint64_t nb = cdiv(n, 64);
    return A(cdiv(n, 2)) + A(nb) + A(4 * cdiv(nb, 256) + 4);
}

static uint64_t adam8_bytes(uint64_t n) { /* one tensor's m and v */
    return n >= 4096 ? 2 * A(n) + 2 * A(4 * cdiv(n, 256)) : 2 * A(4 * n);
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

    const uint64_t H = 4096, L = 32, F = 14336, V = 128256, R = 16, T = 4096, qd = 4096, kvd = 1024;
    const uint64_t lin[7][2] = {{qd, H}, {kvd, H}, {kvd, H}, {H, qd}, {F, H}, {F, H}, {H, F}}; /* out, in */
    uint64_t base = 0, master = 0, compute = 0, opt = 0;
    for (int i = 0; i < 7; i++) {
        base += L * nf4_bytes(lin[i][0] * lin[i][1]);
        uint64_t na = R * lin[i][1], nb = lin[i][0] * R;
        master += L * (A(4 * na) + A(4 * nb));
        compute += L * (A(2 * na) + A(2 * nb));
        opt += L * (adam8_bytes(na) + adam8_bytes(nb));
    }
    base += A(16 * 4) + A(256 * 4);
    opt += 2 * A(256 * 4);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_BASE_NF4], base);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_EMBEDDINGS], A(V * H * 2));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_LM_HEAD], A(V * H * 2)); /* untied */
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_NORMS], (2 * L + 1) * A(H * 2));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_LORA_MASTER], master);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_LORA_COMPUTE], compute);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_LORA_GRADS], master);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_OPTIMIZER], opt);
    CHECK_EQ_INT(p.lora_params, L * R * (2 * H + (H + kvd) * 2 + 2 * qd + 3 * (H + F)));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_ACT_SAVED], (L + 1) * A(T * H * 2));
    uint64_t recompute = 4 * A(T * H * 2) /* attn_norm out, attn out (qd == H), h1, ffn_norm out */ +
                         A(T * qd * 2) + 2 * A(T * kvd * 2) + 2 * A(T * 4) + A(32 * T * 4) + 3 * A(T * F * 2) +
                         7 * A(T * R * 2);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_RECOMPUTE], recompute);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_BACKWARD],
                 3 * A(T * H * 2) + 2 * A(T * qd * 2) + 2 * A(T * kvd * 2) + 2 * A(T * F * 2) + A(T * R * 2));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_LM_HEAD_CE], A(1024 * V * 4) + A(1024 * H * 2) + 2 * A(T * 4));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_DEQUANT], A(F * H * 2));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_BATCH], 3 * A(T * 4) + A((T + 1) * 4));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_ROPE], 2 * A(4096 * 64 * 4));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_BLAS_WS], 64ll << 20);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_CUDA_CONTEXT], 512ll << 20);
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_MISC], 16384);
    uint64_t sum = 0;
    for (int c = 0; c < QLR_PLAN_N_COMPONENTS; c++) sum += p.comp_bytes[c];
    CHECK_EQ_INT(p.total, sum);
    /* the NF4 base is about 0.5 + 1/64 + 1/4096 bytes per parameter */
    CHECK_NEAR((double)base / (double)p.base_params, 0.5 + 1.0 / 64 + 1.0 / 4096, 1e-3, 0);

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
    qlr_plan_free(&p);

    /* 32-bit optimizer: 8 bytes per parameter, no maps */
    r.optimizer = QLR_OPTIM_ADAMW_TORCH;
    CHECK_OK(qlr_plan_build(&r, &s, &p));
    uint64_t opt32 = 0;
    for (int i = 0; i < 7; i++) opt32 += L * (2 * A(4 * R * lin[i][1]) + 2 * A(4 * lin[i][0] * R));
    CHECK_EQ_INT(p.comp_bytes[QLR_PLAN_OPTIMIZER], opt32);
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
    CHECK_MSG(strstr(m, "micro_batch_size: 8 -> 2 (saves") != NULL, "%s", m);
    CHECK_MSG(strstr(m, "raise gradient_accumulation_steps 16 -> 64 to keep 128 rows per step") != NULL, "%s", m);
    CHECK_MSG(strstr(m, "sequence_len: 8192 -> ") != NULL, "%s", m);
    /* the advice is right: micro_batch_size 2 fits, 3 does not */
    r.micro_batch_size = 2;
    qlr_plan q;
    CHECK_OK(qlr_plan_build(&r, &s, &q));
    CHECK(q.total <= (16ull << 30));
    qlr_plan_free(&q);
    r.micro_batch_size = 3;
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
        if (!strcmp(p.items[i].name, "blk.*.k_proj lora_B m,v fp32")) {
            found32 = 1;
            CHECK_EQ_INT(p.items[i].bytes_each, A(3072 * 4));
            CHECK_EQ_INT(p.items[i].count, 2 * 30);
        }
        if (!strcmp(p.items[i].name, "blk.*.k_proj lora_A m,v uint8")) found8 = 1;
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

int main(void) {
    qlr_log_set_level(QLR_LOG_ERROR);
    test_llama3_8b();
    test_over_budget();
    test_shapes();
    return test_finish();
}
