/* cli/cmd_train.c: `qlora train RECIPE [--set key=value]... [--resume [DIR]]`. Parses flags,
 * installs the SIGINT/SIGTERM handler (a flag the trainer checks after each step: it finishes
 * the step, writes a checkpoint and stops), runs train/trainer.h and prints the summary. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/core.h"
#include "train/dist.h"
#include "train/trainer.h"

static volatile sig_atomic_t g_stop;

static void on_signal(int sig) {
    (void)sig;
    if (g_stop) _exit(130); /* a second Ctrl-C: stop now, without a checkpoint */
    g_stop = 1;
}

/* QLR_TEST_DIST_EXIT=RANK:STEP (tests): that rank dies (exit status 3, no checkpoint) right after
 * the step, as a crashed process would, to check that the other ranks stop instead of hanging. */
typedef struct test_exit {
    int rank;
    uint64_t step;
} test_exit;

static int test_exit_hook(void *ud, uint64_t step, struct qlr_lora *adapter) {
    (void)adapter;
    const test_exit *x = ud;
    if (step == x->step) _exit(3);
    return 0;
}

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora train RECIPE [--set key=value]... [--resume [DIR]] [options]\n\n"
            "Fine-tunes a LoRA adapter on a 4-bit NF4 base model as the recipe says (see\n"
            "recipes/smollm2-quickstart.yaml for every key, commented).\n\n"
            "  --set key=value   override a recipe key (YAML value; nested: datasets.0.path=...)\n"
            "  --resume [DIR]    continue from the latest checkpoint in output_dir, or from DIR\n"
            "                    (a checkpoint-N folder); the losses continue exactly as if the run\n"
            "                    had never stopped\n"
            "  --nproc N         data-parallel training with N processes on this host (one GPU\n"
            "                    each; on the CPU, N processes sharing the cores): the gradients\n"
            "                    are summed, so N x gradient_accumulation_steps micro-batches\n"
            "                    make a step. Under mpirun, srun or torchrun (RANK, WORLD_SIZE,\n"
            "                    MASTER_ADDR, MASTER_PORT) the ranks come from the launcher\n"
            "  --device D        cpu, cuda or auto (CUDA when a GPU is present); overrides the\n"
            "                    recipe's device\n"
            "  -t, --threads N   CPU threads (default: all cores)\n"
            "  --no-gguf         do not write output_dir/adapter_model.gguf at the end\n"
            "  -q, --quiet       no progress bars\n\n"
            "Writes into output_dir: metrics.jsonl (one JSON object per logged step: step, loss,\n"
            "lr, grad_norm, tokens_per_s, eval_loss), checkpoint-N/ every save_steps (adapter,\n"
            "optimizer state, RNG state, data cursor, recipe; crc32 per file in manifest.json), and\n"
            "at the end adapter/ (PEFT folder) and adapter_model.gguf (llama.cpp LoRA).\n"
            "Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and stops.\n\n"
            "exit status: 0 trained (or stopped cleanly by a signal), 1 error (a NaN/Inf loss\n"
            "included), 2 usage error\n");
}

static int cmd_train(int argc, char **argv) {
    const char *cmd = "train";
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    const char *recipe = NULL, *resume_dir = NULL;
    int resume = 0, quiet = 0, no_gguf = 0, threads = 0, nproc = 0;
    char dev_set[64];
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    int n_sets = 0;
    if (!sets) return qlr_cli_usage_error(cmd, "out of memory");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--set")) {
            if (i + 1 >= argc) { free(sets); return qlr_cli_usage_error(cmd, "--set needs key=value"); }
            sets[n_sets++] = argv[++i];
        } else if (!strncmp(a, "--set=", 6)) {
            sets[n_sets++] = a + 6;
        } else if (!strcmp(a, "--resume")) {
            resume = 1;
            /* an optional folder: the next argument when it is not a flag and the recipe is known
             * (or a second positional follows) */
            if (i + 1 < argc && argv[i + 1][0] != '-' && (recipe || (i + 2 < argc && argv[i + 2][0] != '-')))
                resume_dir = argv[++i];
        } else if (!strncmp(a, "--resume=", 9)) {
            resume = 1;
            resume_dir = a + 9;
        } else if (!strcmp(a, "--nproc")) {
            if (i + 1 >= argc) { free(sets); return qlr_cli_usage_error(cmd, "--nproc needs a count"); }
            nproc = atoi(argv[++i]);
            if (nproc < 1 || nproc > 1024) { free(sets); return qlr_cli_usage_error(cmd, "--nproc: 1..1024"); }
        } else if (!strcmp(a, "--device")) {
            if (i + 1 >= argc) { free(sets); return qlr_cli_usage_error(cmd, "--device needs cpu, cuda or auto"); }
            snprintf(dev_set, sizeof dev_set, "device=%s", argv[++i]);
            sets[n_sets++] = dev_set; /* validated with the recipe (names the accepted values) */
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            if (i + 1 >= argc) { free(sets); return qlr_cli_usage_error(cmd, "%s needs a value", a); }
            threads = atoi(argv[++i]);
            if (threads < 1 || threads > 1024) { free(sets); return qlr_cli_usage_error(cmd, "%s: 1..1024", a); }
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            quiet = 1;
        } else if (!strcmp(a, "--no-gguf")) {
            no_gguf = 1;
        } else if (a[0] == '-' && a[1]) {
            free(sets);
            return qlr_cli_usage_error(cmd, "unknown option '%s'", a);
        } else if (!recipe) {
            recipe = a;
        } else {
            free(sets);
            return qlr_cli_usage_error(cmd, "one recipe only (got '%s' and '%s')", recipe, a);
        }
    }
    if (!recipe) {
        free(sets);
        return qlr_cli_usage_error(cmd, "RECIPE is required");
    }
    if (nproc > 0) { /* the launcher: the same command without --nproc, nproc times */
        free(sets);
        if (getenv("WORLD_SIZE") || getenv("OMPI_COMM_WORLD_SIZE") || getenv("SLURM_NTASKS"))
            return qlr_cli_usage_error(cmd, "--nproc: already started by a launcher (WORLD_SIZE, "
                                       "OMPI_COMM_WORLD_SIZE or SLURM_NTASKS is set)");
        char **args = calloc((size_t)argc + 2, sizeof *args);
        if (!args) return qlr_cli_usage_error(cmd, "out of memory");
        int k = 0;
        args[k++] = "qlora";
        for (int i = 0; i < argc; i++) {
            if (!strcmp(argv[i], "--nproc")) { i++; continue; }
            args[k++] = argv[i];
        }
        int rc = qlr_dist_launch(nproc, args);
        free(args);
        return rc;
    }
    qlr_train_opts o;
    qlr_status st = qlr_train_opts_load(recipe, sets, n_sets, &o);
    free(sets);
    if (st) return qlr_cli_fail(cmd);
    o.resume = resume;
    if (resume_dir && !(o.resume_dir = strdup(resume_dir))) {
        qlr_train_opts_free(&o);
        return qlr_cli_usage_error(cmd, "out of memory");
    }
    o.threads = threads;
    o.progress = !quiet;
    o.export_gguf = !no_gguf;
    o.stop_flag = &g_stop;
    if (threads) qlr_set_n_threads(threads);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    /* QLR_STOP_AFTER_STEP=N: stop after step N as Ctrl-C would (scripts and tests) */
    const char *sa_env = getenv("QLR_STOP_AFTER_STEP");
    if (sa_env) o.stop_after_step = strtoull(sa_env, NULL, 10);
    qlr_dist_env denv;
    test_exit tx = {-1, 0};
    const char *tx_env = getenv("QLR_TEST_DIST_EXIT");
    if (tx_env && sscanf(tx_env, "%d:%llu", &tx.rank, (unsigned long long *)&tx.step) == 2 &&
        qlr_dist_env_read(&denv) == QLR_OK && denv.rank == tx.rank) {
        o.on_step = test_exit_hook;
        o.on_step_ud = &tx;
    }
    qlr_train_result r;
    st = qlr_train_run(&o, &r);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    int rc = 0;
    char dur[32];
    qlr_format_duration(r.seconds, dur, sizeof dur);
    if (st) {
        rc = qlr_cli_fail(cmd);
    } else if (qlr_dist_env_read(&denv) == QLR_OK && denv.rank != 0) {
        /* ranks other than 0 write nothing: rank 0 prints the summary */
    } else if (r.stopped) {
        fprintf(stderr,
                "qlora train: stopped at step %llu of %llu; checkpoint written to %s\n"
                "  continue with: qlora train %s --resume\n",
                (unsigned long long)r.steps_done, (unsigned long long)r.total_steps, r.last_checkpoint, recipe);
    } else {
        fprintf(stderr, "qlora train: done: %llu steps in %s", (unsigned long long)r.steps_done, dur);
        if (r.resumed_from) fprintf(stderr, " (resumed at step %llu)", (unsigned long long)r.resumed_from);
        fprintf(stderr, "; final loss %.4f", r.final_loss);
        if (r.eval_loss == r.eval_loss) fprintf(stderr, ", eval loss %.4f", r.eval_loss);
        fprintf(stderr, "\n  adapter: %s (PEFT)%s%s%s\n", r.adapter_dir, r.adapter_gguf[0] ? ", " : "", r.adapter_gguf,
                r.adapter_gguf[0] ? " (GGUF)" : "");
        fprintf(stderr, "  metrics: %s/metrics.jsonl; last checkpoint: %s\n", o.output_dir,
                r.last_checkpoint[0] ? r.last_checkpoint : "none");
        fprintf(stderr, "  next: qlora eval %s\n", recipe);
    }
    qlr_train_opts_free(&o);
    return rc;
}

const qlr_cli_cmd qlr_cmd_train = {"train", "fine-tune a LoRA adapter as a recipe says (resumable)", cmd_train};
