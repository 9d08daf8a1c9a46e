/* tests/train/test_recipe.c: the recipe schema. Defaults, every key type, each error kind with
 * its exact file:line:column and key (bad recipes in tests/data/recipes/), --set overrides,
 * did-you-mean, YAML limits, and the write -> parse -> equal round trip. */
#include "core/core.h"
#include "formats/yaml.h"
#include "tests/test_util.h"
#include "train/recipe.h"

#include <stdlib.h>
#include <string.h>

#define DIR QLR_TEST_DATA "/recipes/"

/* Loads a bad recipe and checks the message equals PATH + expected (PATH written as @). */
static void expect_error(const char *file, const char *const *sets, int n_sets, const char *expected) {
    char path[512], want[1024];
    snprintf(path, sizeof path, DIR "%s", file);
    size_t k = 0;
    for (const char *e = expected; *e && k + 512 < sizeof want; e++) {
        if (*e == '@') k += (size_t)snprintf(want + k, sizeof want - k, "%s", path);
        else want[k++] = *e;
    }
    want[k] = 0;
    qlr_recipe r;
    qlr_status st = qlr_recipe_load(path, sets, n_sets, &r);
    CHECK_MSG(st != QLR_OK, "%s: expected an error", file);
    CHECK_MSG(!strcmp(qlr_error_msg(), want), "%s:\n   got: %s\n  want: %s", file, qlr_error_msg(), want);
    CHECK(r.base_model == NULL && r.datasets == NULL); /* freed on failure */
}

static void test_errors(void) {
    expect_error("bad_lora_r.yaml", NULL, 0, "@:5:9: lora_r: must be an integer in 1..1024, got \"eight\"");
    expect_error("unknown_key.yaml", NULL, 0, "@:5:1: lora_rank: unknown key; did you mean \"lora_r\"?");
    expect_error("typo_key.yaml", NULL, 0, "@:5:1: learning_rte: unknown key; did you mean \"learning_rate\"?");
    expect_error("epochs_and_steps.yaml", NULL, 0,
                 "@:6:12: max_steps: cannot be combined with num_epochs (set at @:5:13): max_steps stops after N "
                 "optimizer steps, num_epochs after N passes over the data; remove one of them (or set it to 0)");
    expect_error("warmup_both.yaml", NULL, 0,
                 "@:6:15: warmup_ratio: cannot be combined with warmup_steps (set at @:5:15): warmup_steps counts "
                 "optimizer steps, warmup_ratio is a fraction of all steps; remove one of them (or set it to 0)");
    expect_error("bad_enum.yaml", NULL, 0,
                 "@:5:15: lr_scheduler: must be one of constant, linear, cosine; got \"cosin\" (did you mean \"cosine\"?)");
    expect_error("bad_bool.yaml", NULL, 0, "@:5:17: sample_packing: must be true or false, got \"maybe\"");
    expect_error("bad_float_range.yaml", NULL, 0, "@:5:15: lora_dropout: must be a number in [0, 1), got \"1.5\"");
    expect_error("quoted_int.yaml", NULL, 0,
                 "@:5:9: lora_r: must be an integer in 1..1024, got \"8\" (quoted: write numbers and booleans without quotes)");
    expect_error("bad_module.yaml", NULL, 0,
                 "@:5:31: lora_target_modules: each entry must be one of q_proj, k_proj, v_proj, o_proj, gate_proj, "
                 "up_proj, down_proj; got \"v_prj\" (did you mean \"v_proj\"?)");
    expect_error("cosine_ratio_linear.yaml", NULL, 0,
                 "@:6:22: cosine_min_lr_ratio: only applies to lr_scheduler: cosine (it is linear at @:5:15)");
    expect_error("bad_size.yaml", NULL, 0,
                 "@:5:14: vram_budget: must be a size such as 16GiB, 500MiB or a number of bytes (0 = none), got \"lots\"");
    expect_error("int_out_of_range.yaml", NULL, 0, "@:5:15: sequence_len: must be an integer in 16..131072, got \"8\"");
    expect_error("missing_base_model.yaml", NULL, 0,
                 "@: base_model: required (a GGUF file, a Hugging Face folder or a known name such as meta-llama/Llama-3.1-8B)");
    expect_error("missing_datasets.yaml", NULL, 0,
                 "@: datasets: required (a list such as [{path: data/train.jsonl, type: alpaca}])");
    expect_error("ds_missing_type.yaml", NULL, 0,
                 "@:3:5: datasets.0.type: required (one of alpaca, completion, chat, sharegpt, input_output, pretokenized)");
    expect_error("ds_field_wrong_type.yaml", NULL, 0,
                 "@:5:21: datasets.0.field_messages: only applies to type chat or sharegpt (this dataset is alpaca)");
    expect_error("ds_unknown_key.yaml", NULL, 0, "@:3:5: datasets.0.pth: unknown dataset key; did you mean \"path\"?");
    expect_error("ds_bad_type.yaml", NULL, 0,
                 "@:4:11: datasets.0.type: must be one of alpaca, completion, chat, sharegpt, input_output, "
                 "pretokenized; got \"jsonl\"");
    expect_error("ds_not_list.yaml", NULL, 0, "@:2:11: datasets: must be a list of {path, type, ...} maps, got \"d.jsonl\"");
    expect_error("anchors.yaml", NULL, 0,
                 "@:1:7: YAML anchors (&name) and aliases (*name) are not supported: write the value out");
    expect_error("two_documents.yaml", NULL, 0, "@:5:1: a second YAML document ('---'): a recipe is one document");
    expect_error("duplicate_key.yaml", NULL, 0, "@:6:1: lora_r: duplicate key (first at line 5)");
    expect_error("not_a_map.yaml", NULL, 0,
                 "@:1:1: a recipe must be a map of keys (base_model: ..., datasets: ...), got a sequence");
    expect_error("empty.yaml", NULL, 0, "@: the recipe is empty (expected keys such as base_model, datasets)");
    expect_error("no_targets.yaml", NULL, 0,
                 "@:5:22: lora_target_modules: empty, so LoRA would train nothing; list modules (q_proj, k_proj, "
                 "v_proj, o_proj, gate_proj, up_proj, down_proj) or set lora_target_linear: true");

    /* libyaml's own syntax error: the position and its text */
    qlr_recipe r;
    CHECK(qlr_recipe_load(DIR "bad_indent.yaml", NULL, 0, &r) == QLR_ERR_FORMAT);
    CHECK_MSG(!strncmp(qlr_error_msg(), DIR "bad_indent.yaml:4:", strlen(DIR "bad_indent.yaml:4:")), "%s",
              qlr_error_msg());
    CHECK(qlr_recipe_load(DIR "no_such_file.yaml", NULL, 0, &r) == QLR_ERR_IO ||
          qlr_error_status() == QLR_ERR_NOT_FOUND);
}

static void test_defaults(void) {
    qlr_recipe r;
    CHECK_OK(qlr_recipe_load(DIR "good_minimal.yaml", NULL, 0, &r));
    CHECK(!strcmp(r.base_model, "m.gguf"));
    CHECK(!strcmp(r.base_dir, QLR_TEST_DATA "/recipes"));
    CHECK_EQ_INT(r.n_datasets, 1);
    CHECK(!strcmp(r.datasets[0].path, "d.jsonl"));
    CHECK_EQ_INT(r.datasets[0].type, QLR_DATASET_ALPACA);
    CHECK(!strcmp(r.datasets[0].split, "train"));
    CHECK(r.datasets[0].field == NULL && r.datasets[0].field_messages == NULL); /* not alpaca keys */
    CHECK_EQ_INT(r.datasets[0].on_bad_line, QLR_ON_BAD_LINE_ERROR);
    CHECK(!strcmp(r.chat_template, "tokenizer_default"));
    CHECK_EQ_INT(r.sequence_len, 512);
    CHECK_EQ_INT(r.sample_packing, 0);
    CHECK_EQ_INT(r.truncation, QLR_TRUNCATE);
    CHECK_EQ_INT(r.train_on_inputs, 0);
    CHECK(r.val_set_size == 0);
    CHECK_EQ_INT(r.micro_batch_size, 1);
    CHECK_EQ_INT(r.gradient_accumulation_steps, 1);
    CHECK(r.num_epochs == 1);
    CHECK_EQ_INT(r.max_steps, 0);
    CHECK(r.learning_rate == 2e-4);
    CHECK_EQ_INT(r.lr_scheduler, QLR_LR_COSINE);
    CHECK(r.cosine_min_lr_ratio == 0);
    CHECK_EQ_INT(r.warmup_steps, 0);
    CHECK(r.warmup_ratio == 0);
    CHECK(r.weight_decay == 0);
    CHECK(r.max_grad_norm == 1.0);
    CHECK_EQ_INT(r.optimizer, QLR_OPTIM_ADAMW_8BIT);
    CHECK(r.adam_beta1 == 0.9 && r.adam_beta2 == 0.999 && r.adam_epsilon == 1e-8);
    CHECK_EQ_INT(r.lora_r, 8);
    CHECK(r.lora_alpha == 16);
    CHECK(r.lora_dropout == 0);
    CHECK_EQ_INT(r.lora_target_modules, QLR_LORA_Q_PROJ | QLR_LORA_V_PROJ);
    CHECK_EQ_INT(r.lora_target_linear, 0);
    CHECK_EQ_INT(r.peft_use_rslora, 0);
    CHECK_EQ_INT(r.eval_steps, 0);
    CHECK_EQ_INT(r.save_steps, 0);
    CHECK_EQ_INT(r.save_total_limit, 0);
    CHECK_EQ_INT(r.logging_steps, 1);
    CHECK(!strcmp(r.output_dir, "outputs/run"));
    CHECK_EQ_INT(r.seed, 42);
    CHECK_EQ_INT(r.gradient_checkpointing, QLR_CKPT_AUTO);
    CHECK_EQ_INT(r.bf16, QLR_BF16_AUTO);
    CHECK_EQ_INT(r.device, QLR_RECIPE_DEVICE_AUTO);
    CHECK_EQ_INT(r.vram_budget, 0);
    char buf[256];
    CHECK_OK(qlr_recipe_resolve(&r, "x/y.gguf", buf, sizeof buf));
    CHECK(!strcmp(buf, QLR_TEST_DATA "/recipes/x/y.gguf"));
    CHECK_OK(qlr_recipe_resolve(&r, "/abs/y.gguf", buf, sizeof buf));
    CHECK(!strcmp(buf, "/abs/y.gguf"));
    CHECK_OK(qlr_recipe_resolve(&r, "../outputs/./run", buf, sizeof buf)); /* normalised */
    CHECK_MSG(!strcmp(buf, QLR_TEST_DATA "/outputs/run"), "%s", buf);
    qlr_recipe_free(&r);
    qlr_recipe_free(&r); /* safe twice */
}

/* Every key set to a non-default value, all types. */
static const char *const FULL =
    "base_model: \"models/x.gguf\"\n"
    "adapter: qlora\n"
    "chat_template: chatml\n"
    "datasets:\n"
    "  - path: a.jsonl\n"
    "    type: chat\n"
    "    field_messages: conv\n"
    "    message_field_role: who\n"
    "    message_field_content: text\n"
    "    split: validation\n"
    "    on_bad_line: skip\n"
    "  - {path: b.jsonl.gz, type: completion, field: body}\n"
    "  - {path: c.jsonl, type: sharegpt}\n"
    "  - {path: d.jsonl, type: input_output}\n"
    "  - {path: e.jsonl, type: pretokenized}\n"
    "sequence_len: 1024\n"
    "sample_packing: yes\n"
    "truncation: drop\n"
    "train_on_inputs: True\n"
    "val_set_size: 0.1\n"
    "micro_batch_size: 3\n"
    "gradient_accumulation_steps: 7\n"
    "num_epochs: 2.5\n"
    "learning_rate: 3e-5\n"
    "lr_scheduler: cosine\n"
    "cosine_min_lr_ratio: 0.25\n"
    "warmup_ratio: 0.05\n"
    "weight_decay: 0.01\n"
    "max_grad_norm: 0.3\n"
    "optimizer: adamw_torch\n"
    "adam_beta1: 0.8\n"
    "adam_beta2: 0.95\n"
    "adam_epsilon: 1.0e-6\n"
    "lora_r: 64\n"
    "lora_alpha: 12.5\n"
    "lora_dropout: 0.1\n"
    "lora_target_modules:\n"
    "  - q_proj\n"
    "  - down_proj\n"
    "lora_target_linear: false\n"
    "peft_use_rslora: on\n"
    "eval_steps: 50\n"
    "save_steps: 100\n"
    "save_total_limit: 4\n"
    "logging_steps: 5\n"
    "output_dir: out/run1\n"
    "seed: 4294967295\n"
    "gradient_checkpointing: false\n"
    "bf16: false\n"
    "device: cpu\n"
    "vram_budget: 24 GB\n";

static void test_all_keys(void) {
    qlr_recipe r;
    CHECK_OK(qlr_recipe_parse(FULL, strlen(FULL), "full.yaml", "/base", NULL, 0, &r));
    if (!r.base_model) return;
    CHECK(!strcmp(r.base_model, "models/x.gguf"));
    CHECK(!strcmp(r.chat_template, "chatml"));
    CHECK_EQ_INT(r.n_datasets, 5);
    CHECK_EQ_INT(r.datasets[0].type, QLR_DATASET_CHAT);
    CHECK(!strcmp(r.datasets[0].field_messages, "conv"));
    CHECK(!strcmp(r.datasets[0].message_field_role, "who"));
    CHECK(!strcmp(r.datasets[0].message_field_content, "text"));
    CHECK(!strcmp(r.datasets[0].split, "validation"));
    CHECK_EQ_INT(r.datasets[0].on_bad_line, QLR_ON_BAD_LINE_SKIP);
    CHECK_EQ_INT(r.datasets[1].type, QLR_DATASET_COMPLETION);
    CHECK(!strcmp(r.datasets[1].field, "body"));
    CHECK(r.datasets[1].field_messages == NULL);
    CHECK_EQ_INT(r.datasets[2].type, QLR_DATASET_SHAREGPT);
    CHECK(!strcmp(r.datasets[2].field_messages, "conversations")); /* sharegpt defaults */
    CHECK(!strcmp(r.datasets[2].message_field_role, "from"));
    CHECK(!strcmp(r.datasets[2].message_field_content, "value"));
    CHECK_EQ_INT(r.datasets[3].type, QLR_DATASET_INPUT_OUTPUT);
    CHECK_EQ_INT(r.datasets[4].type, QLR_DATASET_PRETOKENIZED);
    CHECK_EQ_INT(r.sequence_len, 1024);
    CHECK_EQ_INT(r.sample_packing, 1);
    CHECK_EQ_INT(r.truncation, QLR_TRUNCATION_DROP);
    CHECK_EQ_INT(r.train_on_inputs, 1);
    CHECK(r.val_set_size == 0.1);
    CHECK_EQ_INT(r.micro_batch_size, 3);
    CHECK_EQ_INT(r.gradient_accumulation_steps, 7);
    CHECK(r.num_epochs == 2.5);
    CHECK_EQ_INT(r.max_steps, 0);
    CHECK(r.learning_rate == 3e-5);
    CHECK(r.cosine_min_lr_ratio == 0.25);
    CHECK(r.warmup_ratio == 0.05);
    CHECK(r.weight_decay == 0.01);
    CHECK(r.max_grad_norm == 0.3);
    CHECK_EQ_INT(r.optimizer, QLR_OPTIM_ADAMW_TORCH);
    CHECK(r.adam_beta1 == 0.8 && r.adam_beta2 == 0.95 && r.adam_epsilon == 1e-6);
    CHECK_EQ_INT(r.lora_r, 64);
    CHECK(r.lora_alpha == 12.5);
    CHECK(r.lora_dropout == 0.1);
    CHECK_EQ_INT(r.lora_target_modules, QLR_LORA_Q_PROJ | QLR_LORA_DOWN_PROJ);
    CHECK_EQ_INT(qlr_recipe_lora_targets(&r), QLR_LORA_Q_PROJ | QLR_LORA_DOWN_PROJ);
    CHECK_EQ_INT(r.peft_use_rslora, 1);
    CHECK_EQ_INT(r.eval_steps, 50);
    CHECK_EQ_INT(r.save_steps, 100);
    CHECK_EQ_INT(r.save_total_limit, 4);
    CHECK_EQ_INT(r.logging_steps, 5);
    CHECK(!strcmp(r.output_dir, "out/run1"));
    CHECK_EQ_INT(r.seed, 4294967295ll);
    CHECK_EQ_INT(r.gradient_checkpointing, 0);
    CHECK_EQ_INT(r.bf16, QLR_BF16_OFF);
    CHECK_EQ_INT(r.device, QLR_RECIPE_DEVICE_CPU);
    CHECK_EQ_INT(r.vram_budget, 24000000000ll);

    /* round trip: write -> parse -> equal (relative paths kept) */
    char *text = NULL;
    CHECK_OK(qlr_recipe_to_yaml(&r, 0, &text));
    qlr_recipe r2;
    CHECK_OK(qlr_recipe_parse(text, strlen(text), "written.yaml", "/base", NULL, 0, &r2));
    CHECK_MSG(qlr_recipe_equal(&r, &r2), "round trip differs:\n%s", text);
    r2.lora_r++;
    CHECK(!qlr_recipe_equal(&r, &r2));
    qlr_recipe_free(&r2);
    free(text);
    qlr_recipe_free(&r);
}

static void test_round_trip_files(void) {
    const char *files[] = {QLR_SOURCE_DIR "/recipes/smollm2-quickstart.yaml", QLR_SOURCE_DIR "/recipes/llama3-8b-16gb.yaml",
                           DIR "good_minimal.yaml"};
    for (int i = 0; i < 3; i++) {
        qlr_recipe r, r2;
        CHECK_OK(qlr_recipe_load(files[i], NULL, 0, &r));
        if (!r.base_model) continue;
        char *text = NULL;
        CHECK_OK(qlr_recipe_to_yaml(&r, 0, &text));
        CHECK_OK(qlr_recipe_parse(text, strlen(text), "copy.yaml", r.base_dir, NULL, 0, &r2));
        CHECK_MSG(qlr_recipe_equal(&r, &r2), "%s: round trip differs:\n%s", files[i], text);
        qlr_recipe_free(&r2);
        free(text);
        /* written to a file with absolute paths: loads from another folder with the same targets */
        char out[512];
        snprintf(out, sizeof out, "%s/effective%d.yaml", test_tmpdir(), i);
        CHECK_OK(qlr_recipe_write(&r, out));
        CHECK_OK(qlr_recipe_load(out, NULL, 0, &r2));
        if (r2.base_model) {
            char a[4096], b[4096];
            CHECK(r2.datasets[0].path[0] == '/');
            CHECK(r2.output_dir[0] == '/');
            CHECK_OK(qlr_recipe_resolve(&r2, r2.datasets[0].path, b, sizeof b));
            CHECK_OK(qlr_recipe_resolve(&r, r.datasets[0].path, a, sizeof a));
            char *ra = realpath(a, NULL);
            CHECK(!ra || !strcmp(ra, b)); /* the file may not exist yet (data made later) */
            free(ra);
            CHECK_EQ_INT(r2.lora_r, r.lora_r);
            CHECK_EQ_INT(r2.max_steps, r.max_steps);
        }
        qlr_recipe_free(&r2);
        qlr_recipe_free(&r);
    }
    /* shipped recipes hold what the brief asks of them */
    qlr_recipe q;
    CHECK_OK(qlr_recipe_load(QLR_SOURCE_DIR "/recipes/smollm2-quickstart.yaml", NULL, 0, &q));
    if (q.base_model) {
        char p[4096];
        CHECK_OK(qlr_recipe_resolve(&q, q.base_model, p, sizeof p));
        CHECK(strstr(p, "/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf") != NULL);
        CHECK_OK(qlr_recipe_resolve(&q, q.datasets[0].path, p, sizeof p));
        CHECK(strstr(p, "/data/quickstart/train.jsonl") != NULL);
        CHECK_EQ_INT(q.sequence_len, 256);
        CHECK_EQ_INT(q.lora_r, 16);
        CHECK_EQ_INT(q.max_steps, 60);
    }
    qlr_recipe_free(&q);
}

static void test_set(void) {
    qlr_recipe r;
    const char *ok[] = {"lora_r=32", "datasets.0.path=other.jsonl", "datasets.1={path: chat.jsonl, type: chat}",
                        "datasets.1.field_messages=conv", "lora_target_modules=[q_proj, o_proj]", "max_steps=10",
                        "learning_rate=1e-4", "vram_budget=8GiB", "output_dir=/tmp/x", "sequence_len="};
    CHECK_OK(qlr_recipe_load(DIR "good_minimal.yaml", ok, 10, &r));
    if (r.base_model) {
        CHECK_EQ_INT(r.lora_r, 32);
        CHECK(!strcmp(r.datasets[0].path, "other.jsonl"));
        CHECK_EQ_INT(r.n_datasets, 2);
        CHECK_EQ_INT(r.datasets[1].type, QLR_DATASET_CHAT);
        CHECK(!strcmp(r.datasets[1].field_messages, "conv"));
        CHECK(!strcmp(r.datasets[1].message_field_role, "role"));
        CHECK_EQ_INT(r.lora_target_modules, QLR_LORA_Q_PROJ | QLR_LORA_O_PROJ);
        CHECK_EQ_INT(r.max_steps, 10);
        CHECK(r.num_epochs == 0); /* max_steps given: epochs unused */
        CHECK(r.learning_rate == 1e-4);
        CHECK_EQ_INT(r.vram_budget, 8ll << 30);
        CHECK(!strcmp(r.output_dir, "/tmp/x"));
        CHECK_EQ_INT(r.sequence_len, 512); /* empty value = default */
    }
    qlr_recipe_free(&r);

    const char *s1[] = {"lora_r=eight"};
    expect_error("good_minimal.yaml", s1, 1, "--set lora_r=eight: lora_r: must be an integer in 1..1024, got \"eight\"");
    const char *s2[] = {"lora_rnk=8"};
    expect_error("good_minimal.yaml", s2, 1, "--set lora_rnk=8: lora_rnk: unknown key; did you mean \"lora_r\"?");
    const char *s3[] = {"datasets.5.path=x.jsonl"};
    expect_error("good_minimal.yaml", s3, 1,
                 "--set datasets.5.path=x.jsonl: datasets.5.path: there are 1 datasets; the next one to add is datasets.1 "
                 "(at most 64)");
    const char *s4[] = {"lora_r"};
    expect_error("good_minimal.yaml", s4, 1,
                 "--set lora_r: expected key=value (e.g. --set lora_r=16 or --set datasets.0.path=x.jsonl)");
    const char *s5[] = {"datasets.0.field=txt"};
    expect_error("good_minimal.yaml", s5, 1,
                 "--set datasets.0.field=txt: datasets.0.field: only applies to type completion (this dataset is alpaca)");
    const char *s6[] = {"max_steps=10", "num_epochs=3"};
    expect_error("good_minimal.yaml", s6, 2,
                 "--set max_steps=10: max_steps: cannot be combined with num_epochs (set at --set num_epochs=3): max_steps "
                 "stops after N optimizer steps, num_epochs after N passes over the data; remove one of them (or set it to 0)");
    const char *s7[] = {"datasets.1.path=more.jsonl"};
    expect_error("good_minimal.yaml", s7, 1,
                 "--set datasets.1.path=more.jsonl: datasets.1.type: required (one of alpaca, completion, chat, sharegpt, "
                 "input_output, pretokenized)");
    /* a --set can clear a key from the file that would conflict */
    const char *s8[] = {"max_steps=0", "num_epochs=3"};
    CHECK_OK(qlr_recipe_load(DIR "epochs_and_steps.yaml", s8, 2, &r));
    CHECK(r.num_epochs == 3 && r.max_steps == 0);
    qlr_recipe_free(&r);
    const char *s10[] = {"report_to=tensorboard"};
    CHECK_OK(qlr_recipe_load(DIR "good_minimal.yaml", s10, 1, &r));
    CHECK_EQ_INT(r.report_to, QLR_REPORT_TENSORBOARD);
    qlr_recipe_free(&r);
    const char *s11[] = {"report_to=wandb"};
    expect_error("good_minimal.yaml", s11, 1,
                 "--set report_to=wandb: report_to: must be one of none, tensorboard; got \"wandb\"");
    const char *s9[] = {"device=gpu"};
    expect_error("good_minimal.yaml", s9, 1, "--set device=gpu: device: must be one of auto, cpu, cuda; got \"gpu\" (did you mean \"cpu\"?)");
}

/* test_datasets: axolotl's validation files, the same keys as datasets; val_set_size must be 0 */
static void test_test_datasets(void) {
    qlr_recipe r;
    CHECK_OK(qlr_recipe_load(DIR "good_test_datasets.yaml", NULL, 0, &r));
    if (r.base_model) {
        CHECK_EQ_INT(r.n_test_datasets, 2);
        CHECK(!strcmp(r.test_datasets[0].path, "held_out") && r.test_datasets[0].type == QLR_DATASET_CHAT);
        CHECK(!strcmp(r.test_datasets[0].field_messages, "conv") && !strcmp(r.test_datasets[0].message_field_role, "role"));
        CHECK(!strcmp(r.test_datasets[0].split, "test")); /* a folder means test.jsonl */
        CHECK(!strcmp(r.datasets[0].split, "train"));
        CHECK_EQ_INT(r.test_datasets[1].type, QLR_DATASET_ALPACA);
        CHECK(r.val_set_size == 0);
        /* where each key was given, for messages about values found wrong later */
        CHECK_MSG(!strcmp(qlr_recipe_where(&r, "test_datasets.1.path"), DIR "good_test_datasets.yaml:9:11"), "%s",
                  qlr_recipe_where(&r, "test_datasets.1.path"));
        CHECK(!strcmp(qlr_recipe_where(&r, "datasets.0.path"), DIR "good_test_datasets.yaml:3:11"));
        CHECK(!strcmp(qlr_recipe_where(&r, "base_model"), DIR "good_test_datasets.yaml:1:13"));
        CHECK(!strcmp(qlr_recipe_where(&r, "lora_r"), DIR "good_test_datasets.yaml")); /* a default */
        /* written and read back equal */
        char out[512];
        snprintf(out, sizeof out, "%s/test_datasets.yaml", test_tmpdir());
        qlr_recipe r2;
        CHECK_OK(qlr_recipe_write(&r, out));
        CHECK_OK(qlr_recipe_load(out, NULL, 0, &r2));
        CHECK_EQ_INT(r2.n_test_datasets, 2);
        CHECK(r2.test_datasets && r2.test_datasets[1].path[0] == '/'); /* written resolved */
        qlr_recipe_free(&r2);
    }
    qlr_recipe_free(&r);
    /* none given: written as an empty list that reads back as none */
    CHECK_OK(qlr_recipe_load(DIR "good_minimal.yaml", NULL, 0, &r));
    char *yaml = NULL;
    CHECK_OK(qlr_recipe_to_yaml(&r, 0, &yaml));
    CHECK_MSG(yaml && strstr(yaml, "\ntest_datasets: []"), "%s", yaml ? yaml : "");
    qlr_recipe r3;
    CHECK_OK(qlr_recipe_parse(yaml, strlen(yaml), "written", NULL, NULL, 0, &r3));
    CHECK(r3.n_test_datasets == 0 && qlr_recipe_equal(&r, &r3));
    qlr_recipe_free(&r3);
    free(yaml);
    qlr_recipe_free(&r);
    /* --set adds one, and its location is the --set */
    const char *s1[] = {"test_datasets.0={path: v.jsonl, type: alpaca}"};
    CHECK_OK(qlr_recipe_load(DIR "good_minimal.yaml", s1, 1, &r));
    CHECK_EQ_INT(r.n_test_datasets, 1);
    if (r.n_test_datasets)
        CHECK(!strcmp(qlr_recipe_where(&r, "test_datasets.0.path"), "--set test_datasets.0={path: v.jsonl, type: alpaca}"));
    qlr_recipe_free(&r);

    expect_error("test_datasets_and_split.yaml", NULL, 0,
                 "@:4:15: val_set_size: must be 0 when test_datasets (set at @:6:3) names the validation files: the "
                 "validation data is either those files or a fraction held out of datasets; set val_set_size: 0 or "
                 "remove test_datasets");
    const char *s2[] = {"val_set_size=0"};
    CHECK_OK(qlr_recipe_load(DIR "test_datasets_and_split.yaml", s2, 1, &r));
    qlr_recipe_free(&r);
    const char *s3[] = {"test_datasets.0.path=v.jsonl"};
    expect_error("good_minimal.yaml", s3, 1,
                 "--set test_datasets.0.path=v.jsonl: test_datasets.0.type: required (one of alpaca, completion, chat, "
                 "sharegpt, input_output, pretokenized)");
    const char *s4[] = {"test_datasets.2.path=v.jsonl"};
    expect_error("good_minimal.yaml", s4, 1,
                 "--set test_datasets.2.path=v.jsonl: test_datasets.2.path: there are 0 test_datasets; the next one to "
                 "add is test_datasets.0 (at most 64)");
}

static void test_helpers(void) {
    CHECK_EQ_INT(qlr_edit_distance("lora_rank", "lora_r"), 3);
    CHECK_EQ_INT(qlr_edit_distance("", "abc"), 3);
    CHECK_EQ_INT(qlr_edit_distance("cosin", "cosine"), 1);
    CHECK_EQ_INT(qlr_edit_distance("Seed", "seed"), 0);
    uint64_t v = 0;
    CHECK_OK(qlr_parse_size("16GiB", &v));
    CHECK_EQ_INT(v, 16ll << 30);
    CHECK_OK(qlr_parse_size("16 gib", &v));
    CHECK_EQ_INT(v, 16ll << 30);
    CHECK_OK(qlr_parse_size("1.5GiB", &v));
    CHECK_EQ_INT(v, 3ll << 29);
    CHECK_OK(qlr_parse_size("500MiB", &v));
    CHECK_EQ_INT(v, 500ll << 20);
    CHECK_OK(qlr_parse_size("16GB", &v));
    CHECK_EQ_INT(v, 16000000000ll);
    CHECK_OK(qlr_parse_size("1234", &v));
    CHECK_EQ_INT(v, 1234);
    CHECK(qlr_parse_size("lots", &v) != QLR_OK);
    CHECK(qlr_parse_size("-1GiB", &v) != QLR_OK);
    CHECK(qlr_parse_size("16 parsecs", &v) != QLR_OK);
    CHECK(qlr_parse_size("1e30GiB", &v) != QLR_OK);
    char q[64];
    qlr_yaml_quote(q, sizeof q, "a\"b\\c\nd");
    CHECK(!strcmp(q, "\"a\\\"b\\\\c\\nd\""));
}

static void test_yaml_limits(void) {
    qlr_yaml_doc *d = NULL;
    /* nesting beyond the bound: refused, no stack blow-up */
    size_t n = 100000;
    char *deep = malloc(2 * n + 1);
    memset(deep, '[', n);
    memset(deep + n, ']', n);
    deep[2 * n] = 0;
    CHECK(qlr_yaml_parse(deep, 2 * n, "deep.yaml", &d) == QLR_ERR_RANGE);
    CHECK(strstr(qlr_error_msg(), "nesting deeper than 64 levels") != NULL);
    CHECK(d == NULL);
    free(deep);
    /* too many nodes */
    size_t m = 300000;
    char *wide = malloc(3 * m + 3);
    size_t k = 0;
    wide[k++] = '[';
    for (size_t i = 0; i < m; i++) { wide[k++] = '1'; wide[k++] = ','; }
    wide[k++] = ']';
    CHECK(qlr_yaml_parse(wide, k, "wide.yaml", &d) == QLR_ERR_RANGE);
    CHECK(strstr(qlr_error_msg(), "more than 100000 YAML nodes") != NULL);
    free(wide);
    /* positions, quoting */
    const char *t = "a: 1\nb:\n  - 'x'\n  - y\nc: {d: \"e\"}\n";
    CHECK_OK(qlr_yaml_parse(t, strlen(t), "t.yaml", &d));
    if (d) {
        const qlr_yaml_node *b = qlr_yaml_map_get(d->root, "b");
        CHECK(b && b->kind == QLR_YAML_SEQ && b->n == 2);
        CHECK(b && b->items[0]->quoted && !b->items[1]->quoted);
        CHECK(b && b->items[0]->line == 3 && b->items[0]->col == 5);
        const qlr_yaml_node *c = qlr_yaml_map_get(d->root, "c");
        CHECK(c && qlr_yaml_map_get(c, "d") && !strcmp(qlr_yaml_map_get(c, "d")->text, "e"));
        CHECK(qlr_yaml_map_get(d->root, "zz") == NULL);
    }
    qlr_yaml_free(d);
    CHECK(qlr_yaml_parse("{[a]: 1}", 8, "k.yaml", &d) == QLR_ERR_FORMAT);
    CHECK(qlr_yaml_parse("a: !!python/object x\n", 21, "tag.yaml", &d) == QLR_ERR_FORMAT);
    CHECK(strstr(qlr_error_msg(), "tag.yaml:1:4: YAML tag") != NULL);
    CHECK_OK(qlr_yaml_parse("", 0, "empty.yaml", &d));
    CHECK(d && d->root == NULL);
    qlr_yaml_free(d);
}

int main(void) {
    qlr_log_set_level(QLR_LOG_ERROR);
    test_errors();
    test_defaults();
    test_all_keys();
    test_round_trip_files();
    test_set();
    test_test_datasets();
    test_helpers();
    test_yaml_limits();
    return test_finish();
}
