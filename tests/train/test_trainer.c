/* tests/train/test_trainer.c: the training loop on a tiny random llama (tiny_model.h):
 *  - resume is bit-identical: 6 steps straight vs 3 steps, stop, --resume for 3 more; the
 *    metrics (loss, lr, grad_norm, eval_loss) and the final adapter bytes are equal (with LoRA
 *    dropout, gradient accumulation, eval and 8-bit optimizer states in play);
 *  - checkpoint rotation keeps save_total_limit; a corrupted checkpoint file is refused naming
 *    the file; a checkpoint without a manifest is ignored; a key-field change is refused naming
 *    the field; a fresh run into a folder with checkpoints is refused;
 *  - a NaN loss stops the run naming the step and the last good checkpoint;
 *  - --resume with no complete checkpoint yet starts from step 0;
 *  - every metrics.jsonl line parses as JSON with the documented keys;
 *  - qlora eval's loss + exact match run on chat data. */
#include <dirent.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapters/lora.h"
#include "core/core.h"
#include "tests/test_util.h"
#include "tests/train/tiny_model.h"
#include "train/checkpoint.h"
#include "train/eval.h"
#include "train/trainer.h"

static char g_recipe[600];

static void write_recipe(void) {
    char path[600];
    tiny_model_write("tiny.gguf");
    snprintf(path, sizeof path, "%s/train.jsonl", test_tmpdir());
    tiny_completion_data(path, 48, 5);
    snprintf(path, sizeof path, "%s/chat.jsonl", test_tmpdir());
    tiny_chat_data(path, 40, 9);
    snprintf(g_recipe, sizeof g_recipe, "%s/tiny.yaml", test_tmpdir());
    tiny_write_text(g_recipe,
                    "base_model: tiny.gguf\n"
                    "datasets:\n"
                    "  - path: train.jsonl\n"
                    "    type: completion\n"
                    "sequence_len: 64\n"
                    "sample_packing: true\n"
                    "val_set_size: 0.1\n"
                    "micro_batch_size: 2\n"
                    "gradient_accumulation_steps: 2\n"
                    "max_steps: 6\n"
                    "learning_rate: 0.01\n"
                    "lr_scheduler: cosine\n"
                    "warmup_steps: 1\n"
                    "optimizer: adamw_8bit\n"
                    "lora_r: 64\n"
                    "lora_alpha: 16\n"
                    "lora_dropout: 0.1\n"
                    "lora_target_linear: true\n"
                    "eval_steps: 2\n"
                    "save_steps: 2\n"
                    "save_total_limit: 2\n"
                    "output_dir: run_a\n"
                    "seed: 7\n"
                    "device: cpu\n");
}

/* Loads the recipe with overrides, quiet. */
static qlr_status opts(qlr_train_opts *o, const char *s1, const char *s2, const char *s3) {
    const char *sets[3];
    int n = 0;
    if (s1) sets[n++] = s1;
    if (s2) sets[n++] = s2;
    if (s3) sets[n++] = s3;
    qlr_status st = qlr_train_opts_load(g_recipe, sets, n, o);
    o->progress = 0;
    o->export_gguf = 1;
    return st;
}

/* The metrics file as an array of JSON objects (NULL on a parse error, which is counted). */
static json_t *read_metrics(const char *dir) {
    char path[700];
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    FILE *f = fopen(path, "r");
    CHECK_MSG(f != NULL, "%s missing", path);
    if (!f) return NULL;
    json_t *arr = json_array();
    char line[4096];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        json_error_t e;
        json_t *j = json_loads(line, 0, &e);
        CHECK_MSG(j != NULL, "%s:%d: not JSON: %s", path, lineno, e.text);
        if (!j) continue;
        CHECK_MSG(json_is_integer(json_object_get(j, "step")), "%s:%d: no step", path, lineno);
        CHECK_MSG(json_is_number(json_object_get(j, "loss")), "%s:%d: no loss", path, lineno);
        CHECK_MSG(json_is_number(json_object_get(j, "lr")), "%s:%d: no lr", path, lineno);
        CHECK_MSG(json_is_number(json_object_get(j, "grad_norm")), "%s:%d: no grad_norm", path, lineno);
        CHECK_MSG(json_is_number(json_object_get(j, "tokens_per_s")), "%s:%d: no tokens_per_s", path, lineno);
        json_array_append_new(arr, j);
    }
    fclose(f);
    return arr;
}

static double num(json_t *o, const char *k) {
    json_t *v = json_object_get(o, k);
    return v ? json_number_value(v) : NAN;
}

static int file_equal(const char *a, const char *b) {
    char *x, *y;
    size_t nx, ny;
    if (qlr_file_read_all(a, 1 << 30, &x, &nx) || qlr_file_read_all(b, 1 << 30, &y, &ny)) return 0;
    int eq = nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return eq;
}

static void test_resume_bit_identical(void) {
    char dir_a[600], dir_b[600];
    qlr_train_opts o;
    qlr_train_result r;

    /* A: 6 steps straight */
    CHECK_OK(opts(&o, "output_dir=run_a", NULL, NULL));
    snprintf(dir_a, sizeof dir_a, "%s", o.output_dir);
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK_EQ_INT(r.steps_done, 6);
    CHECK(!r.stopped);
    CHECK(isfinite(r.final_loss));
    CHECK(isfinite(r.eval_loss));
    qlr_train_opts_free(&o);

    /* B: stopped after 3 (as SIGINT would), then resumed from the latest checkpoint */
    CHECK_OK(opts(&o, "output_dir=run_b", NULL, NULL));
    snprintf(dir_b, sizeof dir_b, "%s", o.output_dir);
    o.stop_after_step = 3;
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK(r.stopped);
    CHECK_EQ_INT(r.steps_done, 3);
    CHECK_MSG(strstr(r.last_checkpoint, "checkpoint-3") != NULL, "last checkpoint %s", r.last_checkpoint);
    qlr_train_opts_free(&o);
    CHECK_OK(opts(&o, "output_dir=run_b", NULL, NULL));
    o.resume = 1;
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK_EQ_INT(r.resumed_from, 3);
    CHECK_EQ_INT(r.steps_done, 6);
    qlr_train_opts_free(&o);

    json_t *ma = read_metrics(dir_a), *mb = read_metrics(dir_b);
    if (ma && mb) {
        CHECK_EQ_INT(json_array_size(ma), 6);
        CHECK_EQ_INT(json_array_size(mb), 6);
        for (size_t i = 0; i < json_array_size(ma) && i < json_array_size(mb); i++) {
            json_t *a = json_array_get(ma, i), *b = json_array_get(mb, i);
            CHECK_EQ_INT(json_integer_value(json_object_get(a, "step")), (long long)i + 1);
            CHECK_EQ_INT(json_integer_value(json_object_get(b, "step")), (long long)i + 1);
            static const char *keys[] = {"loss", "lr", "grad_norm", "eval_loss", "tokens"};
            for (int k = 0; k < 5; k++) {
                double x = num(a, keys[k]), y = num(b, keys[k]);
                CHECK_MSG((isnan(x) && isnan(y)) || x == y, "step %zu %s: straight %.17g, resumed %.17g", i + 1, keys[k],
                          x, y);
            }
            CHECK_MSG(isfinite(num(a, "loss")), "step %zu loss not finite", i + 1);
            CHECK_MSG((i + 1) % 2 == 0 ? isfinite(num(a, "eval_loss")) : isnan(num(a, "eval_loss")),
                      "eval_loss at step %zu", i + 1);
        }
        /* the loss moves (the adapter learns something) */
        CHECK(num(json_array_get(ma, 0), "loss") != num(json_array_get(ma, 5), "loss"));
    }
    json_decref(ma);
    json_decref(mb);
    char pa[700], pb[700];
    snprintf(pa, sizeof pa, "%s/adapter/adapter_model.safetensors", dir_a);
    snprintf(pb, sizeof pb, "%s/adapter/adapter_model.safetensors", dir_b);
    CHECK_MSG(file_equal(pa, pb), "final adapters differ: %s vs %s", pa, pb);
    snprintf(pa, sizeof pa, "%s/checkpoint-6/optimizer.bin", dir_a);
    snprintf(pb, sizeof pb, "%s/checkpoint-6/optimizer.bin", dir_b);
    CHECK_MSG(file_equal(pa, pb), "final optimizer states differ");
    snprintf(pa, sizeof pa, "%s/adapter_model.gguf", dir_a);
    CHECK(qlr_path_exists(pa));

    /* rotation: save_steps 2, limit 2 -> checkpoint-4 and checkpoint-6 remain */
    snprintf(pa, sizeof pa, "%s/checkpoint-2", dir_a);
    CHECK_MSG(!qlr_path_exists(pa), "%s should have been rotated away", pa);
    snprintf(pa, sizeof pa, "%s/checkpoint-4/manifest.json", dir_a);
    CHECK(qlr_path_exists(pa));
    snprintf(pa, sizeof pa, "%s/checkpoint-6/manifest.json", dir_a);
    CHECK(qlr_path_exists(pa));
    /* the run's adapter resolves for export/eval */
    char *res = NULL;
    int gguf = 0;
    CHECK_OK(qlr_lora_resolve(dir_a, &res, &gguf));
    free(res);
}

static void test_refusals(void) {
    qlr_train_opts o;
    qlr_train_result r;
    char path[700];

    /* a fresh run into a folder that holds checkpoints */
    CHECK_OK(opts(&o, "output_dir=run_a", NULL, NULL));
    CHECK(qlr_train_run(&o, &r) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "--resume") != NULL, "message: %s", qlr_error_msg());
    qlr_train_opts_free(&o);

    /* key field changed */
    CHECK_OK(opts(&o, "output_dir=run_a", "lora_r=8", "max_steps=8"));
    o.resume = 1;
    CHECK(qlr_train_run(&o, &r) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "lora_r 64") && strstr(qlr_error_msg(), "says 8"), "message: %s",
              qlr_error_msg());
    qlr_train_opts_free(&o);
    CHECK_OK(opts(&o, "output_dir=run_a", "sequence_len=48", "max_steps=8"));
    o.resume = 1;
    CHECK(qlr_train_run(&o, &r) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "sequence_len") != NULL, "message: %s", qlr_error_msg());
    qlr_train_opts_free(&o);
    CHECK_OK(opts(&o, "output_dir=run_a", "lora_target_modules=[q_proj]", "lora_target_linear=false"));
    o.resume = 1;
    CHECK(qlr_train_run(&o, &r) == QLR_ERR_INVALID);
    CHECK_MSG(strstr(qlr_error_msg(), "lora_target_modules") != NULL, "message: %s", qlr_error_msg());
    qlr_train_opts_free(&o);

    /* a corrupted file: one byte of the optimizer state flipped */
    CHECK_OK(opts(&o, "output_dir=run_a", "max_steps=8", NULL));
    snprintf(path, sizeof path, "%s/checkpoint-6/optimizer.bin", o.output_dir);
    FILE *f = fopen(path, "r+b");
    CHECK(f != NULL);
    if (f) {
        fseek(f, 100, SEEK_SET);
        int c = fgetc(f);
        fseek(f, 100, SEEK_SET);
        fputc(c ^ 0x5a, f);
        fclose(f);
    }
    o.resume = 1;
    CHECK(qlr_train_run(&o, &r) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "checkpoint-6/optimizer.bin") && strstr(qlr_error_msg(), "crc32"),
              "message: %s", qlr_error_msg());

    /* without a manifest checkpoint-6 is ignored: --resume takes checkpoint-4 and trains to 8 */
    snprintf(path, sizeof path, "%s/checkpoint-6/manifest.json", o.output_dir);
    CHECK(unlink(path) == 0);
    char *latest = NULL;
    CHECK_OK(qlr_ckpt_find_latest(o.output_dir, &latest));
    CHECK_MSG(latest && strstr(latest, "checkpoint-4"), "latest %s", latest ? latest : "(null)");
    free(latest);
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK_EQ_INT(r.resumed_from, 4);
    CHECK_EQ_INT(r.steps_done, 8);
    /* metrics: steps 1..4 kept from before, 5..8 new; nothing duplicated */
    json_t *m = read_metrics(o.output_dir);
    if (m) {
        CHECK_EQ_INT(json_array_size(m), 8);
        for (size_t i = 0; i < json_array_size(m); i++)
            CHECK_EQ_INT(json_integer_value(json_object_get(json_array_get(m, i), "step")), (long long)i + 1);
    }
    json_decref(m);
    qlr_train_opts_free(&o);
}

/* Poisons one LoRA B value after step 2, so step 3's loss is NaN. */
static int poison(void *ud, uint64_t step, qlr_lora *l) {
    (void)ud;
    if (step == 2) {
        qlr_lora_module *mod = qlr_lora_get(l, 0, QLR_LIN_Q);
        if (mod) mod->b[0] = NAN;
    }
    return 0;
}

static void test_nan_stop(void) {
    qlr_train_opts o;
    qlr_train_result r;
    CHECK_OK(opts(&o, "output_dir=run_nan", NULL, NULL));
    o.on_step = poison;
    CHECK(qlr_train_run(&o, &r) == QLR_ERR_RANGE);
    CHECK(r.nonfinite);
    CHECK_EQ_INT(r.steps_done, 2);
    CHECK_MSG(strstr(qlr_error_msg(), "step 3") && strstr(qlr_error_msg(), "NaN") &&
                  strstr(qlr_error_msg(), "checkpoint-2"),
              "message: %s", qlr_error_msg());
    qlr_train_opts_free(&o);
}

/* `--resume` restarts a run killed before its first complete checkpoint: only an incomplete
 * checkpoint-1 (no manifest) is there, and the run starts from step 0 (found by
 * tests/e2e/test_e2e_sigkill.c: the restart command failed with "no checkpoint"). */
static void test_resume_without_checkpoint(void) {
    qlr_train_opts o;
    qlr_train_result r;
    CHECK_OK(opts(&o, "output_dir=run_nockpt", "max_steps=2", NULL));
    char path[800];
    snprintf(path, sizeof path, "%s/checkpoint-1/adapter", o.output_dir);
    CHECK_OK(qlr_mkdir_p(path));
    o.resume = 1;
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK_EQ_INT(r.resumed_from, 0);
    CHECK_EQ_INT(r.steps_done, 2);
    snprintf(path, sizeof path, "%s/checkpoint-2/manifest.json", o.output_dir);
    CHECK(qlr_path_exists(path));
    qlr_train_opts_free(&o);
    /* an explicit folder must still exist */
    CHECK_OK(opts(&o, "output_dir=run_nockpt2", "max_steps=2", NULL));
    o.resume = 1;
    snprintf(path, sizeof path, "%s/checkpoint-7", o.output_dir);
    o.resume_dir = strdup(path);
    CHECK(qlr_train_run(&o, &r) != QLR_OK);
    qlr_train_opts_free(&o);
}

static void test_eval_chat(void) {
    qlr_train_opts o;
    qlr_train_result r;
    /* train 2 steps on chat data, then eval base and adapter */
    CHECK_OK(opts(&o, "output_dir=run_chat", "datasets.0.path=chat.jsonl", "datasets.0.type=chat"));
    qlr_train_opts_free(&o);
    const char *sets[] = {"output_dir=run_chat", "datasets.0.path=chat.jsonl", "datasets.0.type=chat",
                          "chat_template=chatml", "max_steps=2", "val_set_size=0.2"};
    CHECK_OK(qlr_train_opts_load(g_recipe, sets, 6, &o));
    o.progress = 0;
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK(isfinite(r.final_loss));
    qlr_eval_opts e = qlr_eval_opts_default();
    e.run = &o;
    e.progress = 0;
    e.n_examples = 5;
    qlr_eval_scores b, a;
    char out_path[700];
    snprintf(out_path, sizeof out_path, "%s/eval.txt", test_tmpdir());
    FILE *out = fopen(out_path, "w+");
    CHECK(out != NULL);
    if (!out) return;
    CHECK_OK(qlr_eval_run(&e, &b, &a, out));
    CHECK(b.done && a.done);
    CHECK_EQ_INT(b.n_examples, 5);
    CHECK_EQ_INT(a.n_examples, 5);
    CHECK(isfinite(b.loss) && isfinite(a.loss));
    CHECK(b.loss != a.loss);
    CHECK(b.n_targets > 0 && b.n_targets == a.n_targets);
    fflush(out);
    rewind(out);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, out);
    buf[n] = 0;
    fclose(out);
    CHECK_MSG(strstr(buf, "exact match: base") != NULL, "eval output: %s", buf);
    qlr_train_opts_free(&o);
}

/* test_datasets: the eval steps and qlora eval use every example of that file, and only it */
static void test_test_datasets(void) {
    char path[700];
    snprintf(path, sizeof path, "%s/val_chat.jsonl", test_tmpdir());
    tiny_chat_data(path, 6, 11);
    qlr_train_opts o;
    qlr_train_result r;
    const char *sets[] = {"output_dir=run_test_ds", "datasets.0.path=chat.jsonl", "datasets.0.type=chat",
                          "chat_template=chatml", "max_steps=2", "val_set_size=0", "eval_steps=1",
                          "test_datasets=[{path: val_chat.jsonl, type: chat}]", "report_to=tensorboard"};
    CHECK_OK(qlr_train_opts_load(g_recipe, sets, 9, &o));
    if (!o.output_dir) return;
    o.progress = 0;
    CHECK_EQ_INT(o.n_test_datasets, 1);
    CHECK_MSG(o.n_test_datasets && !strcmp(o.test_datasets[0].path, path), "%s",
              o.n_test_datasets ? o.test_datasets[0].path : "");
    CHECK_OK(qlr_train_run(&o, &r));
    CHECK_MSG(r.plot[0] && qlr_path_exists(r.plot) && strstr(r.plot, "/loss.svg"), "plot '%s'", r.plot);
    /* report_to: tensorboard: one event file in output_dir/runs (its records: test_tfevents; read
     * back with the tensorboard package: tests/e2e/test_e2e_quickstart.py) */
    char tb[800];
    snprintf(tb, sizeof tb, "%s/runs", o.output_dir);
    CHECK_MSG(!strcmp(r.tensorboard_dir, tb), "tensorboard_dir '%s'", r.tensorboard_dir);
    DIR *dir = opendir(tb);
    int events = 0;
    for (struct dirent *de; dir && (de = readdir(dir));) events += strstr(de->d_name, "events.out.tfevents.") != NULL;
    if (dir) closedir(dir);
    CHECK_EQ_INT(events, 1);
    json_t *m = read_metrics(o.output_dir);
    double eval_last = NAN;
    if (m) {
        CHECK_EQ_INT(json_array_size(m), 2);
        for (size_t i = 0; i < json_array_size(m); i++) {
            json_t *ev = json_object_get(json_array_get(m, i), "eval_loss");
            CHECK_MSG(json_is_number(ev), "step %zu has no eval_loss", i + 1);
            eval_last = json_number_value(ev);
        }
    }
    json_decref(m);
    qlr_eval_opts e = qlr_eval_opts_default();
    e.run = &o;
    e.progress = 0;
    e.n_show = 0;
    char answers[700], out_path[700];
    snprintf(answers, sizeof answers, "%s/test_ds_answers.jsonl", test_tmpdir());
    snprintf(out_path, sizeof out_path, "%s/test_ds_eval.txt", test_tmpdir());
    e.answers_path = answers;
    qlr_eval_scores b, a;
    FILE *out = fopen(out_path, "w+");
    CHECK(out != NULL);
    if (!out) return;
    CHECK_OK(qlr_eval_run(&e, &b, &a, out));
    CHECK_EQ_INT(b.n_examples, 6); /* all of val_chat.jsonl */
    CHECK_EQ_INT(a.n_examples, 6);
    /* the same examples, batches and forward as the trainer's last eval step */
    CHECK_NEAR(a.loss, eval_last, 0, 1e-9);
    rewind(out);
    char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, out);
    buf[n] = 0;
    fclose(out);
    CHECK_MSG(strstr(buf, "eval: 6 validation examples (test_datasets: ") && strstr(buf, "val_chat.jsonl"),
              "eval output: %s", buf);
    /* every answer names the test file as its source */
    FILE *af = fopen(answers, "r");
    int lines = 0, from_test = 0;
    char line[4096];
    while (af && fgets(line, sizeof line, af)) {
        json_t *j = json_loads(line, 0, NULL);
        lines++;
        from_test += j && !strcmp(json_string_value(json_object_get(j, "source")) ? json_string_value(json_object_get(j, "source")) : "", path);
        json_decref(j);
    }
    if (af) fclose(af);
    CHECK_EQ_INT(lines, 12);
    CHECK_EQ_INT(from_test, 12);
    qlr_train_opts_free(&o);
}

/* A dataset file that does not exist: the message names the recipe's file:line:column and key,
 * before anything is loaded. */
static void test_missing_dataset(void) {
    char recipe[700], want[2000];
    snprintf(recipe, sizeof recipe, "%s/missing_data.yaml", test_tmpdir());
    tiny_write_text(recipe, "base_model: tiny.gguf\n"
                            "datasets:\n"
                            "  - path: no_such.jsonl\n"
                            "    type: completion\n");
    qlr_train_opts o;
    CHECK(qlr_train_opts_load(recipe, NULL, 0, &o) == QLR_ERR_NOT_FOUND);
    snprintf(want, sizeof want,
             "%s:3:11: datasets.0.path: %s/no_such.jsonl does not exist (relative paths are resolved against the "
             "recipe's folder)", recipe, test_tmpdir());
    CHECK_MSG(!strcmp(qlr_error_msg(), want), "\n   got: %s\n  want: %s", qlr_error_msg(), want);
    CHECK(o.output_dir == NULL);
    const char *sets[] = {"val_set_size=0", "test_datasets.0={path: /nonexistent/v.jsonl, type: completion}"};
    CHECK(qlr_train_opts_load(g_recipe, sets, 2, &o) == QLR_ERR_NOT_FOUND);
    CHECK_MSG(!strcmp(qlr_error_msg(), "--set test_datasets.0={path: /nonexistent/v.jsonl, type: completion}: "
                                       "test_datasets.0.path: /nonexistent/v.jsonl does not exist"),
              "%s", qlr_error_msg());
    const char *sets2[] = {"datasets.0.path=.", "datasets.0.split=nosuch"}; /* a folder without nosuch.jsonl */
    CHECK(qlr_train_opts_load(g_recipe, sets2, 2, &o) == QLR_ERR_NOT_FOUND);
    CHECK_MSG(!strncmp(qlr_error_msg(), "--set datasets.0.path=.: datasets.0.path: ", 42) &&
                  strstr(qlr_error_msg(), "is a folder without nosuch.jsonl or nosuch.jsonl.gz (datasets.0.split "
                                          "names the file)"),
              "%s", qlr_error_msg());
    qlr_error_clear();
}

int main(void) {
    qlr_log_set_level(QLR_LOG_WARN);
    write_recipe();
    test_resume_bit_identical();
    test_refusals();
    test_nan_stop();
    test_resume_without_checkpoint();
    test_eval_chat();
    test_test_datasets();
    test_missing_dataset();
    return test_finish();
}
