/* tests/e2e/test_e2e_sigkill.c: crash safety of `qlora train` and `qlora export` under SIGKILL,
 * on the tiny random llama of tests/train/tiny_model.h (16 steps, a checkpoint every step, the
 * newest 2 kept, 8-bit AdamW, dropout, gradient accumulation, eval).
 *
 *  1. Two uninterrupted reference runs: one as the killed runs are configured, one that keeps
 *     every checkpoint (the bytes of checkpoint-N do not depend on save_total_limit); a trace of
 *     the first (QLR_TEST_KILL_TRACE) lists every kill point of a run in order.
 *  2. The run is killed with SIGKILL at 24 or more points and continued with `--resume` after
 *     each kill: at kill points of core/testhook.h (QLR_TEST_KILL_AT: inside steps, between a
 *     checkpoint's files, between its files and its manifest, inside a file write, between a
 *     temp file and its rename, during rotation, inside the final export) and after random
 *     delays. After every kill: each file at its final name equals the reference's file of that
 *     name byte for byte (no half-written file), every checkpoint with a manifest verifies, the
 *     adapter that readers resolve for the run folder comes from a complete checkpoint, and
 *     metrics.jsonl holds whole lines with the reference's values. Each resumed run must name
 *     the newest complete checkpoint and warn about the incomplete ones above it.
 *  3. The last run finishes: both adapter formats and the optimizer state equal the reference
 *     run's byte for byte, and no temp file is left anywhere.
 *  4. `qlora export` killed while it overwrites an older GGUF file and an older PEFT folder:
 *     the destination always holds the whole old or the whole new adapter.
 * Kill points come from a seed printed at the start; QLR_SIGKILL_SEED=<seed> replays a run. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "adapters/lora.h"
#include "core/core.h"
#include "tests/test_util.h"
#include "tests/train/tiny_model.h"
#include "train/checkpoint.h"

enum { MAX_STEPS = 16, KEEP = 2, KILLS_RANDOM = 22 };

static char g_tmp[512], g_recipe[600], g_log[600], g_trace[600];
static char g_ref[600], g_all[600], g_run[600];
static uint64_t g_rng;
static char *g_recipe_text; /* checkpoint-N/recipe.yaml of the killed run */

/* ------------------------------------------------------------------ small helpers */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rnd(uint64_t lo, uint64_t hi) { /* uniform in [lo, hi] */
    return hi <= lo ? lo : lo + test_rng_u64(&g_rng) % (hi - lo + 1);
}

static char *slurp(const char *path, size_t *n) {
    char *s = NULL;
    size_t len = 0;
    if (qlr_file_read_all(path, (size_t)1 << 30, &s, &len) != QLR_OK) {
        qlr_error_clear();
        return NULL;
    }
    if (n) *n = len;
    return s;
}

/* 1 when both files exist with the same bytes. */
static int same_file(const char *a, const char *b) {
    size_t na, nb;
    char *x = slurp(a, &na), *y = slurp(b, &nb);
    int eq = x && y && na == nb && !memcmp(x, y, na);
    free(x);
    free(y);
    return eq;
}

static const char *pjoin(char *buf, size_t cap, const char *a, const char *b) {
    snprintf(buf, cap, "%s/%s", a, b);
    return buf;
}

/* ------------------------------------------------------------------ running qlora */

typedef struct proc_result {
    int killed;      /* died of SIGKILL */
    int exit_code;   /* when it exited; -1 otherwise */
    char *log;       /* its stdout + stderr */
    char last[64];   /* the last kill point it passed ("" when none) */
} proc_result;

/* Runs qlora with argv under QLR_TEST_KILL_AT=kill_at (NULL: none) and a fresh trace; when
 * delay_s > 0 it is also sent SIGKILL after that many seconds. */
static proc_result run_qlora(char *const *argv, const char *kill_at, double delay_s) {
    proc_result r;
    memset(&r, 0, sizeof r);
    r.exit_code = -1;
    unlink(g_trace);
    unlink(g_log); /* a child killed before it opens its log must not leave the last run's */
    fflush(stdout); /* else the child's freopen writes our buffered lines a second time */
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        if (kill_at) setenv("QLR_TEST_KILL_AT", kill_at, 1);
        else unsetenv("QLR_TEST_KILL_AT");
        setenv("QLR_TEST_KILL_TRACE", g_trace, 1);
        setenv("QLR_LOG", "info", 1);
        if (!freopen(g_log, "w", stdout)) _exit(127);
        dup2(fileno(stdout), 2);
        execv(argv[0], argv);
        _exit(127);
    }
    int status = 0;
    if (delay_s > 0) {
        double end = now_s() + delay_s;
        for (;;) {
            pid_t w = waitpid(pid, &status, WNOHANG);
            if (w == pid) goto reaped;
            if (now_s() >= end) break;
            struct timespec ts = {0, 1000 * 1000};
            nanosleep(&ts, NULL);
        }
        kill(pid, SIGKILL);
    }
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
reaped:
    if (WIFSIGNALED(status)) r.killed = WTERMSIG(status) == SIGKILL;
    if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
    r.log = slurp(g_log, NULL);
    if (!r.log) r.log = strdup("");
    size_t n = 0;
    char *tr = slurp(g_trace, &n);
    if (tr && n) {
        while (n && tr[n - 1] == '\n') tr[--n] = 0;
        char *nl = strrchr(tr, '\n');
        snprintf(r.last, sizeof r.last, "%s", nl ? nl + 1 : tr);
    }
    free(tr);
    return r;
}

/* The trace of the last run as an array of lines. */
static char **read_trace(int *n_out) {
    size_t n = 0;
    char *s = slurp(g_trace, &n);
    *n_out = 0;
    if (!s) return NULL;
    int cap = 1024, k = 0;
    char **v = malloc(sizeof *v * (size_t)cap);
    for (char *line = strtok(s, "\n"); line; line = strtok(NULL, "\n")) {
        if (k == cap) v = realloc(v, sizeof *v * (size_t)(cap *= 2));
        v[k++] = strdup(line);
    }
    free(s);
    *n_out = k;
    return v;
}

static void train_argv(char **argv, const char *out, char *set_out, size_t cap, const char *extra, int resume) {
    int k = 0;
    snprintf(set_out, cap, "output_dir=%s", out);
    argv[k++] = QLR_QLORA_BIN;
    argv[k++] = "train";
    argv[k++] = g_recipe;
    argv[k++] = "--set";
    argv[k++] = set_out;
    if (extra) {
        argv[k++] = "--set";
        argv[k++] = (char *)extra;
    }
    argv[k++] = "--threads";
    argv[k++] = "2";
    argv[k++] = "--quiet";
    if (resume) argv[k++] = "--resume";
    argv[k] = NULL;
}

/* ------------------------------------------------------------------ the reference trace */

/* Kill points of the reference run: the position where a run resumed from checkpoint c starts
 * (after c's manifest and the rotation that follows it), so that a kill at "*:n" with n at most
 * the points left is sure to land. */
typedef struct ref_trace {
    char **line;
    int n;
    int start[MAX_STEPS + 1];
} ref_trace;

static void trace_index(ref_trace *t) {
    int c = 0;
    t->start[0] = 0;
    for (int i = 0; i < t->n && c < MAX_STEPS; i++) {
        if (strcmp(t->line[i], "ckpt.committed")) continue;
        int j = i + 1;
        while (j < t->n && !strcmp(t->line[j], "ckpt.remove")) j++;
        t->start[++c] = j;
    }
    CHECK_EQ_INT(c, MAX_STEPS);
}

static int left_after(const ref_trace *t, int c, const char *label) {
    int k = 0;
    for (int i = t->start[c]; i < t->n; i++)
        if (!label || !strcmp(t->line[i], label)) k++;
    return k;
}

/* ------------------------------------------------------------------ the state after a kill */

static int ckpt_has_manifest(const char *run, int n) {
    char p[900];
    snprintf(p, sizeof p, "%s/checkpoint-%d/%s", run, n, QLR_CKPT_MANIFEST);
    return qlr_path_exists(p);
}

/* N of the newest checkpoint-N with a manifest, or 0 when there is none. */
static int newest_complete(const char *run) {
    for (int n = MAX_STEPS; n >= 1; n--)
        if (ckpt_has_manifest(run, n)) return n;
    return 0;
}

static int is_temp(const char *name) { return strstr(name, ".tmp.") != NULL; }

/* Number of temp files under dir (recursively). */
static int count_temps(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int k = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char p[1200];
        pjoin(p, sizeof p, dir, e->d_name);
        if (qlr_is_dir(p)) k += count_temps(p);
        else if (is_temp(e->d_name)) k++;
    }
    closedir(d);
    return k;
}

/* Number of temp files of `name` ("<name>.tmp.<pid>") in dir. */
static int count_temps_of(const char *dir, const char *name) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int k = 0;
    size_t n = strlen(name);
    struct dirent *e;
    while ((e = readdir(d)))
        k += !strncmp(e->d_name, name, n) && !strncmp(e->d_name + n, ".tmp.", 5);
    closedir(d);
    return k;
}

/* Every non-temp file of run/rel (a folder) must be in `allowed` and equal ref/rel/<name>. */
static void check_files_equal(const char *run, const char *ref, const char *rel, const char *const *allowed) {
    char dir[900];
    snprintf(dir, sizeof dir, "%s/%s", run, rel);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || is_temp(e->d_name)) continue;
        char p[1200], q[1200];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (qlr_is_dir(p)) continue; /* sub-folders are checked by the caller */
        int ok = 0;
        for (int i = 0; allowed[i]; i++) ok |= !strcmp(allowed[i], e->d_name);
        CHECK_MSG(ok, "%s: unexpected file", p);
        if (!ok) continue;
        snprintf(q, sizeof q, "%s/%s/%s", ref, rel, e->d_name);
        CHECK_MSG(same_file(p, q), "%s differs from the reference %s (half-written or wrong)", p, q);
    }
    closedir(d);
}

static json_t *metrics_by_step(const char *run) {
    char p[900];
    pjoin(p, sizeof p, run, "metrics.jsonl");
    size_t n = 0;
    char *s = slurp(p, &n);
    json_t *arr = json_array();
    if (!s) return arr;
    char *line = s;
    int lineno = 0;
    while (line < s + n) {
        char *nl = memchr(line, '\n', (size_t)(s + n - line));
        lineno++;
        CHECK_MSG(nl != NULL, "%s:%d: a line without its newline (half-written)", p, lineno);
        if (!nl) break;
        json_error_t e;
        json_t *j = json_loadb(line, (size_t)(nl - line), 0, &e);
        CHECK_MSG(j != NULL, "%s:%d: not JSON: %s", p, lineno, e.text);
        if (j) json_array_append_new(arr, j);
        line = nl + 1;
    }
    free(s);
    return arr;
}

/* metrics.jsonl of `run` must be whole lines with the reference's values at each step. */
static void check_metrics(const char *run, json_t *ref) {
    json_t *m = metrics_by_step(run);
    json_int_t prev = 0;
    for (size_t i = 0; i < json_array_size(m); i++) {
        json_t *j = json_array_get(m, i);
        json_int_t step = json_integer_value(json_object_get(j, "step"));
        CHECK_MSG(step > prev, "%s/metrics.jsonl: step %lld after %lld", run, (long long)step, (long long)prev);
        prev = step;
        json_t *r = NULL;
        for (size_t k = 0; k < json_array_size(ref); k++)
            if (json_integer_value(json_object_get(json_array_get(ref, k), "step")) == step) r = json_array_get(ref, k);
        CHECK_MSG(r != NULL, "%s/metrics.jsonl: step %lld is not in the reference", run, (long long)step);
        if (!r) continue;
        static const char *keys[] = {"loss", "lr", "grad_norm", "eval_loss", "tokens"};
        for (int k = 0; k < 5; k++) {
            json_t *a = json_object_get(j, keys[k]), *b = json_object_get(r, keys[k]);
            CHECK_MSG((!a && !b) || (a && b && json_number_value(a) == json_number_value(b)),
                      "%s/metrics.jsonl step %lld: %s %.17g, reference %.17g", run, (long long)step, keys[k],
                      a ? json_number_value(a) : NAN, b ? json_number_value(b) : NAN);
        }
    }
    json_decref(m);
}

static void check_meta_equal(const char *dir, const qlr_ckpt_meta *a, const char *refdir) {
    qlr_ckpt_meta b;
    if (qlr_ckpt_open(refdir, &b, NULL, NULL) != QLR_OK) {
        CHECK_MSG(0, "reference %s: %s", refdir, qlr_error_msg());
        return;
    }
    CHECK_MSG(a->step == b.step && a->epoch == b.epoch && a->batch == b.batch && a->rng == b.rng &&
                  a->tokens_seen == b.tokens_seen,
              "%s: manifest state (step %" PRIu64 ", cursor %" PRIu64 "/%" PRIu64 ", rng %016" PRIx64
              ") differs from the reference's", dir, a->step, a->epoch, a->batch, a->rng);
}

static const char *const k_ckpt_files[] = {"optimizer.bin", "recipe.yaml", QLR_CKPT_MANIFEST, NULL};
static const char *const k_adapter_files[] = {"adapter_config.json", "adapter_model.safetensors", NULL};

/* The invariants after a kill (see the top comment). */
static void check_state(const char *run, json_t *ref_metrics) {
    char p[900], rel[300], r1[1200];
    DIR *d = opendir(run);
    if (!d) return; /* killed before the output folder existed */
    struct dirent *e;
    while ((e = readdir(d))) {
        int n = 0;
        if (sscanf(e->d_name, "checkpoint-%d", &n) != 1) continue;
        CHECK_MSG(n >= 1 && n <= MAX_STEPS, "%s/%s: unexpected folder", run, e->d_name);
        pjoin(p, sizeof p, run, e->d_name);
        /* recipe.yaml is the same in every checkpoint of a run: the reference run's (which ran
         * the same recipe) with its output_dir; the rest equals the keep-everything run's */
        char rp[1000];
        pjoin(rp, sizeof rp, p, "recipe.yaml");
        if (qlr_path_exists(rp)) {
            char *got = slurp(rp, NULL);
            CHECK_MSG(got && !strcmp(got, g_recipe_text), "%s differs from the reference:\n%s", rp, got ? got : "");
            free(got);
        }
        /* optimizer.bin and the adapter: bytes of the keep-everything run's checkpoint-n */
        snprintf(rel, sizeof rel, "%s", e->d_name);
        char q[1200];
        snprintf(q, sizeof q, "%s/%s/optimizer.bin", run, rel);
        snprintf(r1, sizeof r1, "%s/%s/optimizer.bin", g_all, rel);
        if (qlr_path_exists(q)) CHECK_MSG(same_file(q, r1), "%s differs from the reference (half-written?)", q);
        snprintf(rel, sizeof rel, "%s/adapter", e->d_name);
        check_files_equal(run, g_all, rel, k_adapter_files);
        /* nothing else but a manifest and temp files */
        DIR *cd = opendir(p);
        struct dirent *ce;
        while (cd && (ce = readdir(cd))) {
            if (ce->d_name[0] == '.' || is_temp(ce->d_name) || !strcmp(ce->d_name, "adapter")) continue;
            int ok = 0;
            for (int i = 0; k_ckpt_files[i]; i++) ok |= !strcmp(k_ckpt_files[i], ce->d_name);
            CHECK_MSG(ok, "%s/%s: unexpected file", p, ce->d_name);
        }
        if (cd) closedir(cd);
        if (!ckpt_has_manifest(run, n)) continue;
        qlr_ckpt_meta m;
        if (qlr_ckpt_open(p, &m, NULL, NULL) != QLR_OK) {
            CHECK_MSG(0, "%s has a manifest but does not verify: %s", p, qlr_error_msg());
            qlr_error_clear();
            continue;
        }
        snprintf(r1, sizeof r1, "%s/%s", g_all, e->d_name);
        check_meta_equal(p, &m, r1);
    }
    closedir(d);
    /* the final outputs */
    check_files_equal(run, g_ref, QLR_RUN_ADAPTER_DIR, k_adapter_files);
    pjoin(p, sizeof p, run, "adapter_model.gguf");
    pjoin(r1, sizeof r1, g_ref, "adapter_model.gguf");
    if (qlr_path_exists(p)) CHECK_MSG(same_file(p, r1), "%s differs from the reference (half-written?)", p);
    check_metrics(run, ref_metrics);
    /* what export, eval and serve read for this run folder: a complete checkpoint's adapter or
     * the whole final adapter */
    char *src = NULL;
    int gguf = 0;
    if (qlr_lora_resolve(run, &src, &gguf) == QLR_OK) {
        int k = -1;
        const char *c = strstr(src, "/checkpoint-");
        if (c && sscanf(c, "/checkpoint-%d/", &k) == 1)
            CHECK_MSG(ckpt_has_manifest(run, k) && k == newest_complete(run),
                      "the run folder resolves to %s, which is not the newest complete checkpoint (%d)", src,
                      newest_complete(run));
        else
            CHECK_MSG(newest_complete(run) == MAX_STEPS,
                      "the run folder resolves to %s before the run finished (newest checkpoint %d)", src,
                      newest_complete(run));
        qlr_lora *l = NULL;
        if (qlr_lora_load_peft(src, NULL, &l) != QLR_OK) {
            CHECK_MSG(0, "%s does not load: %s", src, qlr_error_msg());
            qlr_error_clear();
        }
        qlr_lora_free(l);
    } else {
        qlr_error_clear();
    }
    free(src);
}

/* ------------------------------------------------------------------ the training kills */

typedef struct kill_plan {
    char at[80];    /* QLR_TEST_KILL_AT, or "" */
    double delay;   /* > 0: also a timed kill */
} kill_plan;

static const char *const k_labels[] = {"train.micro",   "ckpt.file",   "ckpt.remove",   "train.step",
                                       "ckpt.manifest", "afile.write", "afile.synced",  "ckpt.committed",
                                       "ckpt.begin",    "afile.renamed", "peft.tensors", NULL};

static kill_plan plan_kill(int i, int at_ckpt, const ref_trace *t, double ref_seconds) {
    kill_plan k;
    memset(&k, 0, sizeof k);
    int left = left_after(t, at_ckpt, NULL);
    if (left < 1) left = 1;
    int mode = i % 4;
    if (mode == 1 || mode == 3) { /* a named point within the next two steps' worth */
        int n_labels = 0;
        while (k_labels[n_labels]) n_labels++;
        for (int tries = 0; tries < n_labels; tries++) {
            const char *lab = k_labels[(i / 2 + tries) % n_labels]; /* i = 1, 3, ..., 21: each once */
            int avail = left_after(t, at_ckpt, lab);
            if (avail < 1) continue;
            int per_step = (left_after(t, 0, lab) + MAX_STEPS - 1) / MAX_STEPS;
            int hi = 2 * per_step < avail ? 2 * per_step : avail;
            snprintf(k.at, sizeof k.at, "%s:%d", lab, (int)rnd(1, (uint64_t)(hi > 0 ? hi : 1)));
            return k;
        }
    }
    /* any point, spread so that the kills left cover what is left of the run */
    int spread = 2 * left / (KILLS_RANDOM - i > 1 ? KILLS_RANDOM - i : 1);
    if (spread < 2) spread = 2;
    if (spread > left) spread = left;
    snprintf(k.at, sizeof k.at, "*:%d", (int)rnd(1, (uint64_t)spread));
    if (mode == 2) { /* timed, with the point above as a backstop */
        double frac = (double)left / (double)t->n, most = 3.0 / (KILLS_RANDOM - i > 1 ? KILLS_RANDOM - i : 1);
        if (frac > most) frac = most;
        k.delay = 0.002 + (double)rnd(0, 1000) / 1000.0 * ref_seconds * frac;
        snprintf(k.at, sizeof k.at, "*:%d", left);
    }
    return k;
}

static int g_kills, g_by_label_n;
static char g_by_label[32][64];
static int g_by_label_k[32];

static void count_label(const char *last) {
    char lab[64];
    snprintf(lab, sizeof lab, "%.39s", last[0] ? last : "(start-up)");
    char *sp = strchr(lab, ' ');
    if (sp) *sp = 0;
    for (int i = 0; i < g_by_label_n; i++)
        if (!strcmp(g_by_label[i], lab)) {
            g_by_label_k[i]++;
            return;
        }
    if (g_by_label_n < 32) {
        snprintf(g_by_label[g_by_label_n], sizeof g_by_label[0], "%s", lab);
        g_by_label_k[g_by_label_n++] = 1;
    }
}

/* One run of the killed sequence. Returns 1 when it was killed, 0 when it finished, -1 on a
 * failure (reported). */
static int kill_run(const kill_plan *k, const char *why, json_t *ref_metrics) {
    int at = newest_complete(g_run);
    int resume = g_kills > 0;
    int incomplete[MAX_STEPS + 1]; /* checkpoint-N folders above `at` before this run */
    for (int n = 0; n <= MAX_STEPS; n++) {
        char p[800];
        snprintf(p, sizeof p, "%s/checkpoint-%d", g_run, n);
        incomplete[n] = n > at && qlr_is_dir(p);
    }
    char *argv[24], set_out[800];
    train_argv(argv, g_run, set_out, sizeof set_out, NULL, resume);
    proc_result r = run_qlora(argv, k->at[0] ? k->at : NULL, k->delay);
    int ret = -1;
    if (r.killed) {
        g_kills++;
        count_label(r.last);
        printf("kill %2d: %-24s %-22s from checkpoint %2d; died after %s\n", g_kills, why,
               k->delay > 0 ? "timed" : k->at, at, r.last[0] ? r.last : "(no point yet)");
        ret = 1;
    } else if (r.exit_code == 0) {
        printf("run finished: %s, from checkpoint %d\n", why, at);
        ret = 0;
    } else {
        CHECK_MSG(0, "qlora train (%s, from checkpoint %d) exited %d:\n%s", why, at, r.exit_code, r.log);
    }
    /* the resumed run named the newest complete checkpoint and warned about newer folders */
    if (resume && strstr(r.log, "resumed from")) {
        char want[800];
        snprintf(want, sizeof want, "resumed from %s/checkpoint-%d at step %d", g_run, at, at);
        CHECK_MSG(at > 0 && strstr(r.log, want), "expected \"%s\" in:\n%s", want, r.log);
        for (int n = at + 1; n <= MAX_STEPS; n++) {
            char p[800];
            snprintf(p, sizeof p, "%s/checkpoint-%d", g_run, n);
            if (!incomplete[n]) continue;
            char w2[900];
            snprintf(w2, sizeof w2, "%s: ignored", p);
            CHECK_MSG(strstr(r.log, w2) != NULL, "no warning about the incomplete %s in:\n%s", p, r.log);
        }
    }
    if (resume && !strstr(r.log, "resumed from") && r.exit_code == 0)
        CHECK_MSG(0, "a run with --resume finished without resuming:\n%s", r.log);
    free(r.log);
    if (ret >= 0) check_state(g_run, ref_metrics);
    return ret;
}

/* ------------------------------------------------------------------ qlora export */

/* Kills `qlora export SRC --format FMT -o DST` at each plan; DST starts as `old` and must hold
 * the whole old or the whole new adapter after every kill, and the new one at the end. */
static void export_kills(const char *fmt, const char *src, const char *old_src, const char *dst, const char *want) {
    char *ex[] = {QLR_QLORA_BIN, "export", (char *)src, "--format", (char *)fmt, "-o", (char *)dst, "-q", NULL};
    char *ex_old[] = {QLR_QLORA_BIN, "export", (char *)old_src, "--format", (char *)fmt, "-o", (char *)dst, "-q",
                      NULL};
    int is_gguf = !strcmp(fmt, "gguf");
    proc_result r = run_qlora(ex_old, NULL, 0);
    CHECK_MSG(r.exit_code == 0, "export of the old adapter: %s", r.log);
    free(r.log);
    char old_copy[700];
    snprintf(old_copy, sizeof old_copy, "%s/old_%s", g_tmp, fmt);
    if (is_gguf) {
        char cmd[2000];
        snprintf(cmd, sizeof cmd, "cp %s %s", dst, old_copy);
        CHECK(system(cmd) == 0);
    } else {
        char cmd[2000];
        snprintf(cmd, sizeof cmd, "rm -rf %s && cp -r %s %s", old_copy, dst, old_copy);
        CHECK(system(cmd) == 0);
    }
    /* the points of one uninterrupted export (into a scratch path) */
    char scratch[700];
    snprintf(scratch, sizeof scratch, "%s/scratch_%s", g_tmp, fmt);
    char *ex_scratch[] = {QLR_QLORA_BIN, "export", (char *)src, "--format", (char *)fmt, "-o", scratch, "-q", NULL};
    r = run_qlora(ex_scratch, NULL, 0);
    CHECK_MSG(r.exit_code == 0, "export: %s", r.log);
    free(r.log);
    int n_points = 0;
    char **tr = read_trace(&n_points);
    int writes = 0, renames = 0;
    for (int i = 0; i < n_points; i++) {
        writes += !strcmp(tr[i], "afile.write");
        renames += !strcmp(tr[i], "afile.renamed");
        free(tr[i]);
    }
    free(tr);
    CHECK_MSG(writes > 0 && renames > 0, "export passed %d writes and %d renames", writes, renames);
    char plans[6][80];
    int np = 0;
    snprintf(plans[np++], 80, "afile.write:%d", (int)rnd(1, (uint64_t)(writes > 0 ? writes : 1)));
    snprintf(plans[np++], 80, "afile.synced:%d", (int)rnd(1, (uint64_t)(renames > 0 ? renames : 1)));
    snprintf(plans[np++], 80, "afile.renamed:%d", (int)rnd(1, (uint64_t)(renames > 0 ? renames : 1)));
    snprintf(plans[np++], 80, "*:%d", (int)rnd(1, (uint64_t)(n_points > 0 ? n_points : 1)));
    if (!is_gguf) snprintf(plans[np++], 80, "peft.tensors:1");
    snprintf(plans[np++], 80, "timed");
    for (int i = 0; i < np; i++) {
        int timed = !strcmp(plans[i], "timed");
        double delay = timed ? 0.001 + (double)rnd(0, 30) / 1000.0 : 0;
        char backstop[32];
        snprintf(backstop, sizeof backstop, "*:%d", n_points > 0 ? n_points : 1);
        r = run_qlora(ex, timed ? backstop : plans[i], delay);
        CHECK_MSG(r.killed, "export %s under %s was not killed (exit %d):\n%s", fmt, plans[i], r.exit_code, r.log);
        printf("export %s kill: %-18s died after %s\n", fmt, plans[i], r.last[0] ? r.last : "(no point yet)");
        free(r.log);
        if (is_gguf) {
            CHECK_MSG(same_file(dst, old_copy) || same_file(dst, want),
                      "%s after a kill at %s is neither the old nor the new GGUF (half-written?)", dst, plans[i]);
        } else {
            char cfg[900], ten[900], ocfg[900], oten[900], ncfg[900], nten[900];
            pjoin(cfg, sizeof cfg, dst, "adapter_config.json");
            pjoin(ten, sizeof ten, dst, "adapter_model.safetensors");
            pjoin(ocfg, sizeof ocfg, old_copy, "adapter_config.json");
            pjoin(oten, sizeof oten, old_copy, "adapter_model.safetensors");
            pjoin(ncfg, sizeof ncfg, want, "adapter_config.json");
            pjoin(nten, sizeof nten, want, "adapter_model.safetensors");
            int old_pair = same_file(cfg, ocfg) && same_file(ten, oten);
            int new_pair = same_file(cfg, ncfg) && same_file(ten, nten);
            if (qlr_path_exists(cfg))
                CHECK_MSG(old_pair || new_pair,
                          "%s after a kill at %s: its config and tensors are not one adapter's (old or new)", dst,
                          plans[i]);
            if (qlr_path_exists(ten))
                CHECK_MSG(same_file(ten, oten) || same_file(ten, nten), "%s: half-written after a kill at %s", ten,
                          plans[i]);
        }
        g_kills++;
    }
    r = run_qlora(ex, NULL, 0);
    CHECK_MSG(r.exit_code == 0, "export after the kills: %s", r.log);
    free(r.log);
    if (is_gguf) {
        CHECK_MSG(same_file(dst, want), "%s: the finished export differs from an uninterrupted one", dst);
        CHECK_MSG(count_temps_of(g_tmp, "exported.gguf") == 0, "%s: temp files left after the finished export", dst);
    } else {
        char a[900], b[900];
        for (int i = 0; k_adapter_files[i]; i++)
            CHECK_MSG(same_file(pjoin(a, sizeof a, dst, k_adapter_files[i]), pjoin(b, sizeof b, want, k_adapter_files[i])),
                      "%s: the finished export differs from an uninterrupted one", a);
        CHECK_MSG(count_temps(dst) == 0, "%s: temp files left after the finished export", dst);
    }
}

/* ------------------------------------------------------------------ main */

static void write_recipe(void) {
    char path[700];
    tiny_model_write("tiny.gguf");
    snprintf(path, sizeof path, "%s/train.jsonl", g_tmp);
    tiny_completion_data(path, 64, 5);
    snprintf(g_recipe, sizeof g_recipe, "%s/tiny.yaml", g_tmp);
    char text[2048];
    snprintf(text, sizeof text,
             "base_model: tiny.gguf\n"
             "datasets:\n"
             "  - path: train.jsonl\n"
             "    type: completion\n"
             "sequence_len: 64\n"
             "sample_packing: true\n"
             "val_set_size: 0.1\n"
             "micro_batch_size: 2\n"
             "gradient_accumulation_steps: 2\n"
             "max_steps: %d\n"
             "learning_rate: 0.01\n"
             "lr_scheduler: cosine\n"
             "warmup_steps: 2\n"
             "optimizer: adamw_8bit\n"
             "lora_r: 8\n"
             "lora_alpha: 16\n"
             "lora_dropout: 0.1\n"
             "lora_target_linear: true\n"
             "eval_steps: 4\n"
             "logging_steps: 1\n"
             "save_steps: 1\n"
             "save_total_limit: %d\n"
             "seed: 11\n"
             "device: cpu\n",
             MAX_STEPS, KEEP);
    tiny_write_text(g_recipe, text);
}

int main(void) {
    snprintf(g_tmp, sizeof g_tmp, "%s", test_tmpdir());
    snprintf(g_log, sizeof g_log, "%s/log.txt", g_tmp);
    snprintf(g_trace, sizeof g_trace, "%s/trace.txt", g_tmp);
    snprintf(g_ref, sizeof g_ref, "%s/ref", g_tmp);
    snprintf(g_all, sizeof g_all, "%s/ref_all", g_tmp);
    snprintf(g_run, sizeof g_run, "%s/run", g_tmp);
    const char *seed_env = getenv("QLR_SIGKILL_SEED");
    uint64_t seed = seed_env && *seed_env ? strtoull(seed_env, NULL, 0) : (uint64_t)time(NULL) ^ (uint64_t)getpid();
    printf("seed %" PRIu64 " (replay: QLR_SIGKILL_SEED=%" PRIu64 ")\n", seed, seed);
    fflush(stdout);
    g_rng = seed;
    write_recipe();

    /* 1. the references */
    char *argv[24], set_out[800];
    train_argv(argv, g_all, set_out, sizeof set_out, "save_total_limit=0", 0);
    proc_result r = run_qlora(argv, NULL, 0);
    CHECK_MSG(r.exit_code == 0, "reference run (keep all): exit %d\n%s", r.exit_code, r.log);
    free(r.log);
    train_argv(argv, g_ref, set_out, sizeof set_out, NULL, 0);
    double t0 = now_s();
    r = run_qlora(argv, NULL, 0);
    double ref_seconds = now_s() - t0;
    CHECK_MSG(r.exit_code == 0, "reference run: exit %d\n%s", r.exit_code, r.log);
    free(r.log);
    char a[900], b[900];
    ref_trace t;
    memset(&t, 0, sizeof t);
    t.line = read_trace(&t.n);
    trace_index(&t);
    printf("reference run: %.2fs, %d kill points (%d after the last checkpoint)\n", ref_seconds, t.n,
           left_after(&t, MAX_STEPS, NULL));
    json_t *ref_metrics = metrics_by_step(g_ref);
    snprintf(a, sizeof a, "%s/checkpoint-%d/recipe.yaml", g_ref, MAX_STEPS);
    char *ref_yaml = slurp(a, NULL);
    CHECK_MSG(ref_yaml && strstr(ref_yaml, g_ref), "%s: no output_dir in it", a);
    if (!ref_yaml || !strstr(ref_yaml, g_ref)) return test_finish();
    {
        const char *at = strstr(ref_yaml, g_ref);
        size_t head = (size_t)(at - ref_yaml), n = strlen(ref_yaml) + strlen(g_run);
        g_recipe_text = malloc(n + 1);
        snprintf(g_recipe_text, n + 1, "%.*s%s%s", (int)head, ref_yaml, g_run, at + strlen(g_ref));
        free(ref_yaml);
    }
    CHECK_EQ_INT(json_array_size(ref_metrics), MAX_STEPS);
    if (test_n_fail) return test_finish();
    /* the reference runs agree with each other where they overlap */
    snprintf(a, sizeof a, "%s/checkpoint-%d/optimizer.bin", g_ref, MAX_STEPS);
    snprintf(b, sizeof b, "%s/checkpoint-%d/optimizer.bin", g_all, MAX_STEPS);
    CHECK_MSG(same_file(a, b), "the two reference runs end with different optimizer states");

    /* 2. kill, resume, kill, ... */
    for (int i = 0; i < KILLS_RANDOM; i++) {
        kill_plan k = plan_kill(i, newest_complete(g_run), &t, ref_seconds);
        char why[64];
        snprintf(why, sizeof why, "%s", i % 4 == 2 ? "timed" : (i % 2 ? "named point" : "any point"));
        if (kill_run(&k, why, ref_metrics) <= 0) break;
    }
    /* into the final export of the run: after the last checkpoint, then at points inside it */
    int at = newest_complete(g_run);
    if (at < MAX_STEPS) {
        kill_plan k;
        memset(&k, 0, sizeof k);
        snprintf(k.at, sizeof k.at, "ckpt.committed:%d", MAX_STEPS - at);
        CHECK_EQ_INT(kill_run(&k, "after the last manifest", ref_metrics), 1);
        CHECK_EQ_INT(newest_complete(g_run), MAX_STEPS);
    }
    const char *exp_labels[] = {"train.export", "peft.tensors", "afile.write", "afile.renamed", NULL};
    for (int i = 0; exp_labels[i]; i++) {
        kill_plan k;
        memset(&k, 0, sizeof k);
        int avail = left_after(&t, MAX_STEPS, exp_labels[i]);
        snprintf(k.at, sizeof k.at, "%s:%d", exp_labels[i], (int)rnd(1, (uint64_t)(avail > 0 ? avail : 1)));
        CHECK_EQ_INT(kill_run(&k, "final export", ref_metrics), 1);
    }
    int train_kills = g_kills;

    /* 3. the last run finishes */
    kill_plan none;
    memset(&none, 0, sizeof none);
    CHECK_EQ_INT(kill_run(&none, "no kill", ref_metrics), 0);
    static const char *const finals[] = {"adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                                         "adapter_model.gguf", "checkpoint-16/optimizer.bin",
                                         "checkpoint-16/adapter/adapter_model.safetensors",
                                         "checkpoint-15/optimizer.bin", NULL};
    for (int i = 0; finals[i]; i++)
        CHECK_MSG(same_file(pjoin(a, sizeof a, g_run, finals[i]), pjoin(b, sizeof b, g_ref, finals[i])),
                  "%s differs from the uninterrupted run's", a);
    for (int n = 1; n <= MAX_STEPS - KEEP; n++) {
        snprintf(a, sizeof a, "%s/checkpoint-%d", g_run, n);
        CHECK_MSG(!qlr_path_exists(a), "%s should have been rotated away", a);
    }
    CHECK_MSG(count_temps(g_run) == 0, "%s: %d temp files left after the run finished", g_run, count_temps(g_run));
    json_t *m = metrics_by_step(g_run);
    CHECK_EQ_INT(json_array_size(m), MAX_STEPS);
    json_decref(m);
    CHECK_MSG(train_kills >= 24, "only %d kills of qlora train", train_kills);

    /* 4. qlora export */
    char want_gguf[700], want_peft[700], old_src[700], dst_gguf[700], dst_peft[700];
    snprintf(want_gguf, sizeof want_gguf, "%s/want.gguf", g_tmp);
    snprintf(want_peft, sizeof want_peft, "%s/want_peft", g_tmp);
    /* the adapter already at the destinations: another run's (rank 4, another alpha), so that
     * its config and tensors differ from the new ones */
    snprintf(old_src, sizeof old_src, "%s/other", g_tmp);
    train_argv(argv, old_src, set_out, sizeof set_out, "lora_r=4", 0);
    for (int k = 0; argv[k]; k++)
        if (!argv[k + 1]) {
            argv[k + 1] = "--set";
            argv[k + 2] = "max_steps=1";
            argv[k + 3] = "--set";
            argv[k + 4] = "lora_alpha=8";
            argv[k + 5] = NULL;
            break;
        }
    r = run_qlora(argv, NULL, 0);
    CHECK_MSG(r.exit_code == 0, "the other run: exit %d\n%s", r.exit_code, r.log);
    free(r.log);
    snprintf(dst_gguf, sizeof dst_gguf, "%s/exported.gguf", g_tmp);
    snprintf(dst_peft, sizeof dst_peft, "%s/exported_peft", g_tmp);
    char *w1[] = {QLR_QLORA_BIN, "export", g_ref, "--format", "gguf", "-o", want_gguf, "-q", NULL};
    char *w2[] = {QLR_QLORA_BIN, "export", g_ref, "--format", "peft", "-o", want_peft, "-q", NULL};
    r = run_qlora(w1, NULL, 0);
    CHECK_MSG(r.exit_code == 0, "export: %s", r.log);
    free(r.log);
    r = run_qlora(w2, NULL, 0);
    CHECK_MSG(r.exit_code == 0, "export: %s", r.log);
    free(r.log);
    export_kills("gguf", g_run, old_src, dst_gguf, want_gguf);
    export_kills("peft", g_run, old_src, dst_peft, want_peft);

    printf("%d kills (%d of qlora train, %d of qlora export), seed %" PRIu64 "; last point passed before each kill:\n",
           g_kills, train_kills, g_kills - train_kills, seed);
    for (int i = 0; i < g_by_label_n; i++) printf("  %-16s %d\n", g_by_label[i], g_by_label_k[i]);
    for (int i = 0; i < t.n; i++) free(t.line[i]);
    free(t.line);
    json_decref(ref_metrics);
    return test_finish();
}
