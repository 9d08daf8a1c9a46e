/* bench/train_bench.c: see train_bench.h. The run is train/trainer.h's qlr_train_run on the
 * recipe; its hooks install the op timer on the backend it creates and move the timer's bucket
 * with each phase. The sgemm rate is OpenBLAS's own (cblas_sgemm with as many OpenBLAS threads
 * as the run has, the best of repeated calls), measured before and after the run; the higher of
 * the two is the machine's rate the linears are compared with. */
#define _XOPEN_SOURCE 700
#include "bench/train_bench.h"

#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "bench/bench_common.h"
#include "bench/op_timer.h"
#include "core/core.h"
#include "train/trainer.h"

qlr_bench_train_opts qlr_bench_train_default_opts(void) {
    qlr_bench_train_opts o;
    memset(&o, 0, sizeof o);
    o.progress = 1;
    return o;
}

/* ---- the run's hooks ---- */

static void on_backend(void *ud, qlr_backend *be) {
    (void)ud;
    qlr_op_timer_install(be);
}

/* process CPU seconds per phase (all threads): a figure that load from other processes on
 * the machine does not inflate, unlike the wall times */
static double g_cpu_s[QLR_TRAIN_PHASE_COUNT], g_cpu_t0;
static int g_cpu_phase = -1;

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void on_phase(void *ud, qlr_train_phase p) {
    (void)ud;
    double now = cpu_now();
    if (g_cpu_phase >= 0) g_cpu_s[g_cpu_phase] += now - g_cpu_t0;
    g_cpu_phase = (int)p;
    g_cpu_t0 = now;
    qlr_op_timer_set_phase((int)p);
}

static double loadavg_1m(void) {
    double l = NAN;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1) l = NAN;
        fclose(f);
    }
    return l;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static json_t *jnum(double v) { return isfinite(v) ? json_real(round(v * 1e4) / 1e4) : json_null(); }

/* ---- the benchmark ---- */

qlr_status qlr_bench_train(const qlr_bench_train_opts *o, FILE *json) {
    if (!o->recipe) return qlr_errorf(QLR_ERR_INVALID, "bench train: a recipe is required");
    if (o->threads > 0) qlr_set_n_threads(o->threads);
    int threads = qlr_n_threads();
    char tmp[4096] = "", out_dir[4200];
    if (o->output_dir) {
        snprintf(out_dir, sizeof out_dir, "%s", o->output_dir);
    } else {
        const char *td = getenv("TMPDIR");
        snprintf(tmp, sizeof tmp, "%s/qlora-bench-train-XXXXXX", td && *td ? td : "/tmp");
        if (!mkdtemp(tmp)) return qlr_errorf(QLR_ERR_IO, "bench train: cannot create %s", tmp);
        snprintf(out_dir, sizeof out_dir, "%s/run", tmp);
    }
    /* the caller's overrides, then output_dir */
    const char **sets = calloc((size_t)o->n_sets + 1, sizeof *sets);
    char out_set[4300];
    if (!sets) return qlr_errorf(QLR_ERR_NOMEM, "bench train");
    for (int i = 0; i < o->n_sets; i++) sets[i] = o->sets[i];
    snprintf(out_set, sizeof out_set, "output_dir=%s", out_dir);
    sets[o->n_sets] = out_set;
    qlr_train_opts to;
    qlr_status st = qlr_train_opts_load(o->recipe, sets, o->n_sets + 1, &to);
    free(sets);
    if (st) goto cleanup;
    to.threads = o->threads;
    to.progress = o->progress;
    to.export_gguf = 1;
    to.on_backend = on_backend;
    to.on_phase = on_phase;

    double load0 = loadavg_1m();
    QLR_LOGI("bench train: measuring the sgemm rate (OpenBLAS, %d threads)", threads);
    double sq_before = qlr_bench_sgemm_gflops(threads, 2048, 2048, 2048, 1.0);
    /* the shape of one MLP linear of a quickstart micro-batch */
    double step_shape = qlr_bench_sgemm_gflops(threads, 400, 1536, 576, 0.5);
    double t0 = qlr_now();
    qlr_train_result res;
    st = qlr_train_run(&to, &res);
    double wall = qlr_now() - t0;
    double sq_after = qlr_bench_sgemm_gflops(threads, 2048, 2048, 2048, 1.0);
    double load1 = loadavg_1m();
    if (st) {
        qlr_train_opts_free(&to);
        goto cleanup;
    }
    double sgemm = sq_before > sq_after ? sq_before : sq_after;

    json_t *j = json_object();
    json_object_set_new(j, "bench", json_string("train"));
    json_object_set_new(j, "recipe", json_string(o->recipe));
    json_object_set_new(j, "base_model", json_string(to.base_model));
    json_object_set_new(j, "device", json_string(to.device));
    json_object_set_new(j, "threads", json_integer(threads));
    json_object_set_new(j, "steps", json_integer((json_int_t)res.steps_done));
    json_object_set_new(j, "tokens", json_integer((json_int_t)res.tokens));
    json_object_set_new(j, "micro_batch_size", json_integer(to.micro_batch_size));
    json_object_set_new(j, "sample_packing", json_boolean(to.sample_packing));
    json_object_set_new(j, "eval_steps", json_integer((json_int_t)to.eval_steps));
    json_object_set_new(j, "save_steps", json_integer((json_int_t)to.save_steps));
    json_object_set_new(j, "final_loss", jnum(res.final_loss));
    json_object_set_new(j, "eval_loss", jnum(res.eval_loss));
    json_object_set_new(j, "wall_s", jnum(wall));
    double step_s = res.phase_seconds[QLR_TRAIN_PHASE_STEP];
    json_object_set_new(j, "train_tokens_per_s", jnum(step_s > 0 ? (double)res.tokens / step_s : NAN));
    json_object_set_new(j, "end_to_end_tokens_per_s", jnum(wall > 0 ? (double)res.tokens / wall : NAN));

    json_t *sg = json_object();
    json_object_set_new(sg, "gflops", jnum(sgemm));
    json_object_set_new(sg, "gflops_before_run", jnum(sq_before));
    json_object_set_new(sg, "gflops_after_run", jnum(sq_after));
    json_object_set_new(sg, "shape", json_string("2048x2048x2048, A·Bᵀ, best of repeated calls"));
    json_object_set_new(sg, "gflops_400x1536x576", jnum(step_shape));
    json_object_set_new(sg, "openblas_threads", json_integer(threads));
    json_object_set_new(j, "sgemm", sg);

    /* phases, and each phase's op kinds */
    json_t *ph = json_object();
    for (int p = 0; p < QLR_TRAIN_PHASE_COUNT; p++)
        json_object_set_new(ph, qlr_train_phase_name((qlr_train_phase)p), jnum(res.phase_seconds[p]));
    json_object_set_new(j, "phases_s", ph);
    json_t *pc = json_object();
    for (int p = 0; p < QLR_TRAIN_PHASE_COUNT; p++)
        json_object_set_new(pc, qlr_train_phase_name((qlr_train_phase)p), jnum(g_cpu_s[p]));
    json_object_set_new(j, "phases_cpu_s", pc);
    const int ops_of[] = {QLR_TRAIN_PHASE_STEP, QLR_TRAIN_PHASE_EVAL};
    for (int q = 0; q < 2; q++) {
        int p = ops_of[q];
        json_t *bo = json_object();
        double timed = 0;
        for (int k = 0; k < QLR_OPK_COUNT; k++) {
            qlr_op_bucket b = qlr_op_timer_get(p, (qlr_op_kind)k);
            json_t *e = json_object();
            json_object_set_new(e, "s", jnum(b.seconds));
            json_object_set_new(e, "calls", json_integer((json_int_t)b.calls));
            if (b.flops > 0) {
                json_object_set_new(e, "gflop", jnum(b.flops * 1e-9));
                json_object_set_new(e, "gflops", jnum(b.seconds > 0 ? b.flops * 1e-9 / b.seconds : NAN));
            }
            json_object_set_new(bo, qlr_op_kind_name((qlr_op_kind)k), e);
            timed += b.seconds;
        }
        json_object_set_new(bo, "untimed_s", jnum(res.phase_seconds[p] - timed));
        json_object_set_new(j, q == 0 ? "step_ops" : "eval_ops", bo);
    }
    qlr_op_bucket lin = qlr_op_timer_get(QLR_TRAIN_PHASE_STEP, QLR_OPK_LINEAR);
    double lin_rate = lin.seconds > 0 ? lin.flops * 1e-9 / lin.seconds : NAN;
    json_object_set_new(j, "linears_gflops", jnum(lin_rate));
    json_object_set_new(j, "linears_fraction_of_sgemm", jnum(sgemm > 0 ? lin_rate / sgemm : NAN));
    json_t *mach = json_object();
    json_object_set_new(mach, "loadavg_1m_before", jnum(load0));
    json_object_set_new(mach, "loadavg_1m_after", jnum(load1));
    json_object_set_new(mach, "online_cpus", json_integer(sysconf(_SC_NPROCESSORS_ONLN)));
    json_object_set_new(j, "machine", mach);
    qlr_train_opts_free(&to);
    char *txt = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(6));
    json_decref(j);
    if (!txt) {
        st = qlr_errorf(QLR_ERR_NOMEM, "bench train: JSON");
        goto cleanup;
    }
    fprintf(json, "%s\n", txt);
    free(txt);
cleanup:
    if (tmp[0]) nftw(tmp, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return st;
}
