/* tests/e2e/test_e2e_train.c: `qlora train` and `qlora eval` end to end on the demo model with
 * the shipped quickstart recipe (max_steps 3, output_dir in a temp folder):
 *  1. the run is interrupted with SIGINT after its first logged step: it must exit 0, say where
 *     the checkpoint is, and leave a checkpoint with a manifest;
 *  2. `--resume` finishes the 3 steps: metrics.jsonl has steps 1..3 (JSON, finite losses), the
 *     final checkpoint, adapter/ (PEFT) and adapter_model.gguf exist;
 *  3. `qlora eval -n 2` prints base and adapter results and writes --answers;
 *  4. `qlora generate --adapter RUN --chat` on the held-out prompt of eval's first adapter answer
 *     gives that same greedy answer (both go through the same adapter set and forward);
 *  5. `qlora bench train --steps 2` prints its JSON: the phases add up to the run's wall time,
 *     the op timer saw every NF4 linear of both steps (SmolLM2: 30 layers x 7 forward, 7 dX but
 *     the first layer's q/k/v), the evals' forwards and no optimizer op in them, and the linears'
 *     FLOP rate against a measured sgemm rate.
 * Needs scripts/setup.sh's demo model (fails with that hint otherwise). */
#include <errno.h>
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

static char g_model[1024], g_out[700], g_recipe[700], g_set_out[800], g_set_model[1200], g_log[800];

/* Starts qlora with argv (stdout, and stderr unless `quiet_err`, into g_log); returns the pid. */
static pid_t spawn_to(char *const *argv, int quiet_err) {
    pid_t pid = fork();
    if (pid == 0) {
        FILE *f = freopen(g_log, "w", stdout);
        if (!f) _exit(127);
        if (quiet_err) {
            if (!freopen("/dev/null", "w", stderr)) _exit(127);
        } else {
            dup2(fileno(stdout), 2);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static pid_t spawn(char *const *argv) { return spawn_to(argv, 0); }

/* Trims ASCII whitespace at both ends in place. */
static char *trim(char *s) {
    while (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r') s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\n' || s[n - 1] == '\t' || s[n - 1] == '\r')) s[--n] = 0;
    return s;
}

/* Line `lineno` (1-based) of a text file, malloc'ed, or NULL. */
static char *file_line(const char *path, long lineno) {
    FILE *f = fopen(path, "r");
    if (!f) return NULL;
    char *line = NULL;
    size_t cap = 0;
    long at = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, f)) >= 0)
        if (++at == lineno) break;
    fclose(f);
    if (at != lineno || got < 0) {
        free(line);
        return NULL;
    }
    return line;
}

static int wait_rc(pid_t pid) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static char *read_log(void) {
    char *s = NULL;
    size_t n;
    if (qlr_file_read_all(g_log, 1 << 24, &s, &n)) return strdup("");
    return s;
}

/* Lines of metrics.jsonl (checked as JSON); returns the count, -1 if missing. */
static int metrics_lines(int check_finite) {
    char path[800];
    snprintf(path, sizeof path, "%s/metrics.jsonl", g_out);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        json_error_t e;
        json_t *j = json_loads(line, 0, &e);
        CHECK_MSG(j != NULL, "metrics line %d not JSON: %s", n + 1, e.text);
        if (j) {
            CHECK_EQ_INT(json_integer_value(json_object_get(j, "step")), n + 1);
            double loss = json_number_value(json_object_get(j, "loss"));
            if (check_finite) CHECK_MSG(isfinite(loss) && loss > 0, "step %d loss %g", n + 1, loss);
            CHECK(json_is_number(json_object_get(j, "lr")));
            CHECK(json_is_number(json_object_get(j, "grad_norm")));
            CHECK(json_is_number(json_object_get(j, "tokens_per_s")));
            json_decref(j);
        }
        n++;
    }
    fclose(f);
    return n;
}

static void exists(const char *rel) {
    char path[900];
    snprintf(path, sizeof path, "%s/%s", g_out, rel);
    CHECK_MSG(qlr_path_exists(path), "%s missing", path);
}

int main(void) {
    const char *model = test_demo_model_or_fail();
    if (!model) return test_finish();
    snprintf(g_model, sizeof g_model, "%s", model);
    snprintf(g_recipe, sizeof g_recipe, "%s/recipes/smollm2-quickstart.yaml", QLR_SOURCE_DIR);
    snprintf(g_out, sizeof g_out, "%s/run", test_tmpdir());
    snprintf(g_set_out, sizeof g_set_out, "output_dir=%s", g_out);
    snprintf(g_set_model, sizeof g_set_model, "base_model=%s", g_model);
    snprintf(g_log, sizeof g_log, "%s/log.txt", test_tmpdir());
    char *train[] = {QLR_QLORA_BIN, "train", g_recipe, "--set", "max_steps=3", "--set", g_set_out, "--set",
                     g_set_model, "--set", "val_set_size=0.01", "--set", "save_steps=0", "--set", "device=cpu",
                     "--quiet", NULL};

    /* 1. interrupted after the first step */
    pid_t pid = spawn(train);
    int n = 0;
    for (int i = 0; i < 6000 && n < 1; i++) { /* up to 10 minutes */
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
        n = metrics_lines(0);
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) {
            char *log = read_log();
            CHECK_MSG(0, "qlora train ended before it was interrupted:\n%s", log);
            free(log);
            return test_finish();
        }
    }
    kill(pid, SIGINT);
    int rc = wait_rc(pid);
    char *log = read_log();
    CHECK_MSG(rc == 0, "interrupted run: exit %d\n%s", rc, log);
    CHECK_MSG(strstr(log, "stopped at step") && strstr(log, "--resume"), "interrupted run log:\n%s", log);
    free(log);
    char *latest = NULL;
    int ck = 0;
    for (int s = 1; s <= 3; s++) {
        char rel[64];
        snprintf(rel, sizeof rel, "checkpoint-%d/manifest.json", s);
        char path[900];
        snprintf(path, sizeof path, "%s/%s", g_out, rel);
        ck |= qlr_path_exists(path);
    }
    CHECK_MSG(ck, "no checkpoint after SIGINT in %s", g_out);
    free(latest);

    /* 2. resume to the end */
    char *resume[20];
    int k = 0;
    for (; train[k]; k++) resume[k] = train[k];
    resume[k++] = "--resume";
    resume[k] = NULL;
    rc = wait_rc(spawn(resume));
    log = read_log();
    CHECK_MSG(rc == 0, "resumed run: exit %d\n%s", rc, log);
    CHECK_MSG(strstr(log, "done: 3 steps") != NULL, "resumed run log:\n%s", log);
    free(log);
    CHECK_EQ_INT(metrics_lines(1), 3);
    exists("checkpoint-3/manifest.json");
    exists("checkpoint-3/optimizer.bin");
    exists("checkpoint-3/adapter/adapter_model.safetensors");
    exists("adapter/adapter_config.json");
    exists("adapter/adapter_model.safetensors");
    exists("adapter_model.gguf");

    /* 3. eval, 2 examples */
    char answers[800];
    snprintf(answers, sizeof answers, "%s/answers.jsonl", test_tmpdir());
    char *eval[] = {QLR_QLORA_BIN, "eval", g_recipe, "--set", g_set_out, "--set", g_set_model, "--set",
                    "val_set_size=0.01", "--set", "device=cpu", "-n", "2", "--quiet", "--answers", answers,
                    NULL};
    rc = wait_rc(spawn(eval));
    log = read_log();
    CHECK_MSG(rc == 0, "qlora eval: exit %d\n%s", rc, log);
    CHECK_MSG(strstr(log, "base ") && strstr(log, "adapter ") && strstr(log, "exact match: base"), "eval output:\n%s",
              log);
    free(log);

    /* 4. qlora generate --adapter gives eval's greedy answer on the same held-out prompt */
    json_t *ans = NULL;
    FILE *af = fopen(answers, "r");
    CHECK_MSG(af != NULL, "%s missing", answers);
    char line[1 << 16];
    int n_ans = 0;
    while (af && fgets(line, sizeof line, af)) {
        json_t *j = json_loads(line, 0, NULL);
        CHECK_MSG(j != NULL, "answers line %d is not JSON", n_ans + 1);
        n_ans++;
        if (j && !ans && !strcmp(json_string_value(json_object_get(j, "model")), "adapter")) ans = j;
        else json_decref(j);
    }
    if (af) fclose(af);
    CHECK_EQ_INT(n_ans, 4); /* 2 examples x (base, adapter) */
    CHECK_MSG(ans != NULL, "no adapter answer in %s", answers);
    if (!ans) return test_finish();
    char *src = file_line(json_string_value(json_object_get(ans, "source")),
                          (long)json_integer_value(json_object_get(ans, "line")));
    CHECK_MSG(src != NULL, "cannot read the held-out example");
    json_t *ex = src ? json_loads(src, 0, NULL) : NULL;
    const char *user = ex ? json_string_value(json_object_get(
                                json_array_get(json_object_get(ex, "messages"), 0), "content"))
                          : NULL;
    CHECK_MSG(user != NULL, "held-out example without a user message: %s", src ? src : "");
    if (user) {
        char npred[32];
        snprintf(npred, sizeof npred, "%lld", (long long)json_integer_value(json_object_get(ans, "max_tokens")));
        char *gen[] = {QLR_QLORA_BIN, "generate", "-m", g_model, "--adapter", g_out, "--chat", "-p", (char *)user,
                       "-n", npred, "--quiet", NULL};
        rc = wait_rc(spawn_to(gen, 1));
        log = read_log();
        CHECK_MSG(rc == 0, "qlora generate --adapter: exit %d\n%s", rc, log);
        const char *want = json_string_value(json_object_get(ans, "answer"));
        char *got = trim(log);
        CHECK_MSG(!strcmp(got, want), "qlora generate --adapter answered\n%s\nbut qlora eval scored\n%s", got,
                  want);
        printf("generate --adapter == eval's greedy answer: %s\n", want);
        free(log);
    }
    json_decref(ex);
    free(src);
    json_decref(ans);

    /* 5. qlora bench train, 2 steps with an eval after each */
    char bench_out[800];
    snprintf(bench_out, sizeof bench_out, "%s/bench.json", test_tmpdir());
    char *bench[] = {QLR_QLORA_BIN, "bench", "train", g_recipe, "--steps", "2", "--set", g_set_model,
                     "--set", "val_set_size=0.01", "--set", "eval_steps=1", "--set", "device=cpu", "-q",
                     "--out", bench_out, NULL};
    rc = wait_rc(spawn(bench));
    log = read_log();
    CHECK_MSG(rc == 0, "qlora bench train: exit %d\n%s", rc, log);
    free(log);
    json_error_t je;
    json_t *bj = json_load_file(bench_out, 0, &je);
    CHECK_MSG(bj != NULL, "%s: not JSON: %s", bench_out, je.text);
    if (!bj) return test_finish();
    CHECK_EQ_INT(json_integer_value(json_object_get(bj, "steps")), 2);
    CHECK(json_integer_value(json_object_get(bj, "tokens")) > 0);
    double wall = json_number_value(json_object_get(bj, "wall_s")), phases = 0;
    const char *key;
    json_t *v;
    json_object_foreach(json_object_get(bj, "phases_s"), key, v) phases += json_number_value(v);
    /* the trainer's phases cover its whole run; the bench's clock adds only the call itself */
    CHECK_MSG(phases > 0.9 * wall && phases <= wall * 1.001 + 0.01, "phases %.3f s, wall %.3f s", phases, wall);
    json_t *step_ops = json_object_get(bj, "step_ops"), *eval_ops = json_object_get(bj, "eval_ops");
    json_t *lin = json_object_get(step_ops, "linears");
    CHECK_EQ_INT(json_integer_value(json_object_get(lin, "calls")), 2 * (30 * 7 + 30 * 7 - 3));
    CHECK(json_number_value(json_object_get(lin, "gflop")) > 0);
    CHECK(json_integer_value(json_object_get(json_object_get(step_ops, "optimizer"), "calls")) > 0);
    CHECK(json_integer_value(json_object_get(json_object_get(step_ops, "attention"), "calls")) == 2 * 60);
    CHECK(json_integer_value(json_object_get(json_object_get(eval_ops, "linears"), "calls")) > 0);
    CHECK_EQ_INT(json_integer_value(json_object_get(json_object_get(eval_ops, "optimizer"), "calls")), 0);
    double frac = json_number_value(json_object_get(bj, "linears_fraction_of_sgemm"));
    double sg = json_number_value(json_object_get(json_object_get(bj, "sgemm"), "gflops"));
    CHECK_MSG(sg > 0 && frac > 0 && frac < 3, "sgemm %.1f GFLOP/s, linears fraction %.3f", sg, frac);
    printf("bench train: %.1f tokens/s in the steps, linears at %.2f of the sgemm rate (%.1f GFLOP/s)\n",
           json_number_value(json_object_get(bj, "train_tokens_per_s")), frac, sg);
    json_decref(bj);
    return test_finish();
}
