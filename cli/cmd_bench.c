/* cli/cmd_bench.c: `qlora bench serve`: bench/serve_bench.h (the serving engine with many
 * adapters); `qlora bench decode`: the decode/prefill benchmark of bench/decode_bench.h
 * (model/'s forward on Llama-3.1-8B and SmolLM2-135M shapes with random NF4 weights, no
 * download), reported as fractions of the GPU's own measured copy bandwidth and bf16 GEMM rate;
 * `qlora bench train`: bench/train_bench.h (a real training run of a recipe, by default the
 * quickstart on the demo model, with its time per phase and per op kind), or with --shape
 * synthetic steps at a model's real dimensions (tokens/s, MFU, memory against the plan, the
 * longest sequence within a budget). JSON on stdout. */
#include "bench/decode_bench.h"
#include "bench/serve_bench.h"
#include "bench/train_bench.h"
#include "cli/cli.h"
#include "core/core.h"
#include "train/recipe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void serve_help(void);

static void help(void) {
    printf("usage: qlora bench train [RECIPE] [options]\n\n"
           "Runs `qlora train` on RECIPE (default recipes/smollm2-quickstart.yaml, on the demo model:\n"
           "QLR_DEMO_MODEL or .cache/models) into a temporary folder and prints one JSON object:\n"
           "tokens/s, the wall and CPU time of each phase (load, data, setup, step, eval, checkpoint,\n"
           "export), each phase's op time per kind (linears, lora, attention, ce, optimizer,\n"
           "elementwise, memory) from a timing copy of the backend's op table, and the machine's sgemm\n"
           "rate (OpenBLAS, the run's thread count, measured before and after the run) with\n"
           "linears_fraction_of_sgemm = the step's NF4 linear FLOP rate / that rate. On CUDA every op\n"
           "is followed by a sync.\n\n"
           "  --set key=value    override a recipe key, as for qlora train\n"
           "  --steps N          the same as --set max_steps=N\n"
           "  --device D         cpu or cuda (the same as --set device=D)\n"
           "  -t, --threads N    CPU threads (default: all cores)\n"
           "  --output-dir DIR   run into DIR and keep it (default: a temporary folder, removed)\n"
           "  --out FILE         write the JSON into FILE (default: stdout)\n"
           "  -q, --quiet        no progress bar\n\n");
    printf("usage: qlora bench train --shape NAME [--device cuda|cpu] [--seq N] [--mb N] [--runs SEQ:MB,...]\n"
           "                         [--steps N] [--warmup N] [--checkpointing MODE] [--vram SIZE]\n"
           "                         [--longest] [--no-profile] [--out FILE]\n\n"
           "Trains at a model's real dimensions with random NF4 weights and random packed causal rows\n"
           "(no download, no data): LoRA r 16, alpha 32 on all 7 linears, AdamW 8-bit, the trainer's own\n"
           "step. One JSON object: per run tokens/s, step seconds, MFU and HFU (against the bf16 GEMM\n"
           "rate measured in the same run; HFU counts checkpointing's recompute), the allocator's peak\n"
           "and cudaMemGetInfo's used delta beside `qlora plan`'s bytes, and a profiled step's ms per\n"
           "op kind (the timed steps are not synchronised per op). MFU's FLOPs per token are\n"
           "4 N + layers * 4 * seq * d_model * 3/2 (N: the linears' and lm_head's parameters).\n\n"
           "  --shape NAME                  llama3.1-8b or smollm2-135m\n"
           "  --device D                    cuda (default) or cpu\n"
           "  --seq N                       tokens per row (default 2048)\n"
           "  --mb N                        rows per micro-batch (default 1)\n"
           "  --runs SEQ:MB,...             several runs, e.g. 2048:1,2048:2,8192:1 (not with --seq/--mb)\n"
           "  --steps N                     timed steps per run (default 6)\n"
           "  --warmup N                    untimed steps before them (default 2)\n"
           "  --checkpointing MODE          on (default), off, offload (layer inputs in pinned host memory,\n"
           "                                the MLP in row chunks) or auto: the planner's choice, the\n"
           "                                fastest that fits --vram (without it, the device's memory)\n"
           "  --vram SIZE                   a budget such as 16GiB: plan check, and --longest's budget\n"
           "  --longest                     also the planner's longest sequence (micro-batch 1) within\n"
           "                                --vram (the planner's mode per length unless --checkpointing\n"
           "                                names one), run 3 steps with allocations capped at --vram less\n"
           "                                the plan's CUDA context reserve (alone: only this run)\n"
           "  --no-profile                  no profiled step (no breakdown_ms)\n\n");
    printf("usage: qlora bench decode [--model all|llama3-8b|smollm2-135m] [--prefill N] [--ctx N]\n"
           "                          [--steps N] [--quick] [--device cuda|cpu] [--out FILE]\n\n"
           "Runs the model's forward on the CUDA backend with Llama-3.1-8B / SmolLM2-135M shapes and\n"
           "random NF4 weights and prints one JSON object: prefill tokens/s at --prefill tokens\n"
           "(default 2048), decode tokens/s at batch 1, 8, 32 and 64 with --ctx tokens of context\n"
           "(default 512), peak GPU memory, and the device's measured copy bandwidth and cuBLASLt\n"
           "bf16 GEMM rate with the two ratios:\n"
           "  decode_b1_fraction_of_bandwidth_bound  (NF4 weight bytes per token / bandwidth) / step\n"
           "  linear_fraction_of_gemm_rate           prefill linear FLOP rate / measured GEMM rate\n"
           "Needs a build with CUDA and an NVIDIA GPU. --quick does fewer repetitions. --device cpu\n"
           "runs only the backend-generic parts (a smoke run of the code, not a measurement).\n");
    serve_help();
}

/* "2048:1,2048:2" into o->runs. 0 on success, else a usage error's status. */
static int parse_runs(const char *v, qlr_bench_train_shape_opts *o) {
    const char *p = v;
    while (*p) {
        char *end;
        long seq = strtol(p, &end, 10), mb = 0;
        if (end != p && *end == ':') {
            const char *q = end + 1;
            mb = strtol(q, &end, 10);
            if (end == q) mb = 0;
        }
        if (seq < 16 || seq > 131072 || mb < 1 || mb > 4096 || (*end && *end != ','))
            return qlr_cli_usage_error("bench", "--runs %s: expected SEQ:MB pairs such as 2048:1,8192:1 "
                                       "(SEQ 16..131072, MB 1..4096)", v);
        if (o->n_runs == QLR_BENCH_TRAIN_MAX_RUNS)
            return qlr_cli_usage_error("bench", "--runs: at most %d runs", QLR_BENCH_TRAIN_MAX_RUNS);
        o->runs[o->n_runs].seq = (int32_t)seq;
        o->runs[o->n_runs++].micro_batch = (int32_t)mb;
        p = *end ? end + 1 : end;
    }
    return o->n_runs ? 0 : qlr_cli_usage_error("bench", "--runs: empty");
}

/* qlora bench train --shape NAME [options] (argv[0] = "train") */
static int bench_train_shape(int argc, char **argv) {
    qlr_bench_train_shape_opts o = qlr_bench_train_shape_default_opts();
    const char *out = NULL;
    long seq = 0, mb = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--longest")) {
            o.longest = 1;
            continue;
        }
        if (!strcmp(a, "--no-profile")) {
            o.profile = 0;
            continue;
        }
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) continue;
        if (a[0] != '-')
            return qlr_cli_usage_error("bench", "'%s': --shape runs no recipe (leave out the one or the other)", a);
        if (i + 1 >= argc) return qlr_cli_usage_error("bench", "%s needs a value", a);
        const char *v = argv[++i];
        if (!strcmp(a, "--shape")) o.shape = v;
        else if (!strcmp(a, "--device")) {
            if (strcmp(v, "cuda") && strcmp(v, "cpu") && strcmp(v, "auto"))
                return qlr_cli_usage_error("bench", "--device %s: expected cuda, cpu or auto", v);
            o.device = v;
        } else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--runs")) {
            int rc = parse_runs(v, &o);
            if (rc) return rc;
        } else if (!strcmp(a, "--checkpointing")) {
            if (!strcmp(v, "on")) o.checkpointing = QLR_CKPT_ON;
            else if (!strcmp(v, "off")) o.checkpointing = QLR_CKPT_OFF;
            else if (!strcmp(v, "offload")) o.checkpointing = QLR_CKPT_OFFLOAD;
            else if (!strcmp(v, "auto")) o.checkpointing = QLR_CKPT_AUTO;
            else return qlr_cli_usage_error("bench", "--checkpointing %s: expected on, off, offload or auto", v);
            o.ckpt_given = 1;
        } else if (!strcmp(a, "--vram")) {
            if (qlr_parse_size(v, &o.vram_budget) != QLR_OK || !o.vram_budget)
                return qlr_cli_usage_error("bench", "--vram %s: expected a size such as 16GiB, 24GB or 8000MiB", v);
        } else {
            char *end;
            long n = strtol(v, &end, 10);
            int zero_ok = !strcmp(a, "--warmup");
            if (!*v || *end || n < (zero_ok ? 0 : 1) || n > 1000000)
                return qlr_cli_usage_error("bench", "%s: expected a %s integer, got '%s'", a,
                                           zero_ok ? "non-negative" : "positive", v);
            if (!strcmp(a, "--seq")) seq = n;
            else if (!strcmp(a, "--mb")) mb = n;
            else if (!strcmp(a, "--steps")) o.steps = (int)n;
            else if (!strcmp(a, "--warmup")) o.warmup = (int)n;
            else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) o.threads = (int)n;
            else return qlr_cli_usage_error("bench", "unknown option '%s' (with --shape)", a);
        }
    }
    if (o.n_runs && (seq || mb)) return qlr_cli_usage_error("bench", "--runs and --seq/--mb: give one or the other");
    if (!o.n_runs && (seq || mb || !o.longest)) {
        o.runs[0].seq = (int32_t)(seq ? seq : 2048);
        o.runs[0].micro_batch = (int32_t)(mb ? mb : 1);
        o.n_runs = 1;
    }
    if (o.longest && !o.vram_budget) return qlr_cli_usage_error("bench", "--longest needs --vram SIZE (e.g. 16GiB)");
    FILE *f = stdout;
    if (out && !(f = fopen(out, "w"))) {
        qlr_errorf(QLR_ERR_IO, "%s: cannot open for writing", out);
        return qlr_cli_fail("bench");
    }
    qlr_status st = qlr_bench_train_shape(&o, f);
    if (f != stdout) fclose(f);
    return st == QLR_OK ? 0 : qlr_cli_fail("bench");
}

/* qlora bench train [RECIPE] [options] (argv[0] = "train") */
static int bench_train(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--shape")) return bench_train_shape(argc, argv);
    qlr_bench_train_opts o = qlr_bench_train_default_opts();
    const char *recipe = NULL, *out = NULL;
    char recipe_default[4096], model_set[4200], steps_set[64], dev_set[64];
    const char **sets = calloc((size_t)argc + 2, sizeof *sets);
    int n_sets = 0, rc = 0;
    if (!sets) return qlr_cli_usage_error("bench", "out of memory");
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_v = i + 1 < argc;
        if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            o.progress = 0;
        } else if (a[0] != '-') {
            if (recipe) {
                rc = qlr_cli_usage_error("bench", "one recipe only (got '%s' and '%s')", recipe, a);
                goto out;
            }
            recipe = a;
        } else if (!has_v) {
            rc = qlr_cli_usage_error("bench", "%s needs a value", a);
            goto out;
        } else if (!strcmp(a, "--set")) {
            sets[n_sets++] = argv[++i];
        } else if (!strcmp(a, "--out")) {
            out = argv[++i];
        } else if (!strcmp(a, "--output-dir")) {
            o.output_dir = argv[++i];
        } else if (!strcmp(a, "--device")) {
            snprintf(dev_set, sizeof dev_set, "device=%s", argv[++i]);
            sets[n_sets++] = dev_set;
        } else if (!strcmp(a, "--steps") || !strcmp(a, "-t") || !strcmp(a, "--threads")) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (!*argv[i] || *end || n < 1 || n > 1000000) {
                rc = qlr_cli_usage_error("bench", "%s: expected a positive integer, got '%s'", a, argv[i]);
                goto out;
            }
            if (!strcmp(a, "--steps")) {
                snprintf(steps_set, sizeof steps_set, "max_steps=%ld", n);
                sets[n_sets++] = steps_set;
            } else {
                o.threads = (int)n;
            }
        } else {
            rc = qlr_cli_usage_error("bench", "unknown option '%s'", a);
            goto out;
        }
    }
    if (!recipe) { /* the quickstart on the demo model */
        snprintf(recipe_default, sizeof recipe_default, "%s/recipes/smollm2-quickstart.yaml", QLR_SOURCE_DIR);
        recipe = recipe_default;
        snprintf(model_set, sizeof model_set, "base_model=%s", qlr_cli_demo_model());
        /* the model first, so that a --set base_model=... of the caller wins */
        memmove(sets + 1, sets, sizeof *sets * (size_t)n_sets);
        sets[0] = model_set;
        n_sets++;
    }
    o.recipe = recipe;
    o.sets = sets;
    o.n_sets = n_sets;
    FILE *f = stdout;
    if (out && !(f = fopen(out, "w"))) {
        qlr_errorf(QLR_ERR_IO, "%s: cannot open for writing", out);
        rc = qlr_cli_fail("bench");
        goto out;
    }
    qlr_status st = qlr_bench_train(&o, f);
    if (f != stdout) fclose(f);
    rc = st == QLR_OK ? 0 : qlr_cli_fail("bench");
out:
    free(sets);
    return rc;
}

static void serve_help(void) {
    printf("\nusage: qlora bench serve [--shape llama3.1-8b|smollm2-135m] [options]\n\n"
           "Runs the serving engine (no HTTP) on a random NF4 base with random LoRA adapters on all\n"
           "7 linears and prints one JSON object: decode tokens/s of --streams concurrent streams on\n"
           "the base only, over 8 adapters, over one distinct adapter per stream, over distinct\n"
           "adapters of ranks 8/16/64 (each with its ratio to the base); the attach of an adapter\n"
           "from its file while the streams run (ms to its first token, the longest stall of a\n"
           "running stream); --registered file-tier adapters over --files files, a random one per\n"
           "request (tokens/s, time to first token p50/p99).\n\n"
           "  --shape S            llama3.1-8b (default) or smollm2-135m\n"
           "  --device D           cuda (default) or cpu\n"
           "  --layers N           fewer layers than the shape's (smoke runs)\n"
           "  --streams N          concurrent streams (default 64)\n"
           "  --tokens N           tokens generated per stream (default 128)\n"
           "  --prompt N           prompt tokens per stream (default 64)\n"
           "  --rank N             adapter rank (default 16)\n"
           "  --registered N       adapters of the many-adapter scenario (default 2000)\n"
           "  --files N            adapter files behind them (default 32)\n"
           "  --requests N         requests of the many-adapter scenario (default 256)\n"
           "  --device-budget GIB  device memory for adapter copies (default 24)\n"
           "  --host-budget GIB    host memory for file-tier adapters (default 16)\n"
           "  --scenarios LIST     base,a8,distinct,mixed,attach,many or all (default)\n"
           "  --tmp DIR            where the adapter files go (default $TMPDIR or /tmp)\n"
           "  --out FILE           write the JSON into FILE (default: stdout)\n");
}

/* qlora bench serve [options] (argv[0] = "serve") */
static int bench_serve(int argc, char **argv) {
    qlr_bench_serve_opts o = qlr_bench_serve_default_opts();
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) return qlr_cli_usage_error("bench", "%s needs a value", a);
        const char *v = argv[++i];
        char *end;
        long n = strtol(v, &end, 10);
        int is_num = *v && !*end && n > 0 && n <= (1 << 20);
        double g = strtod(v, &end);
        int is_gib = *v && !*end && g > 0 && g < 1e6;
        if (!strcmp(a, "--shape")) o.shape = v;
        else if (!strcmp(a, "--device")) o.device = v;
        else if (!strcmp(a, "--scenarios")) o.scenarios = v;
        else if (!strcmp(a, "--tmp")) o.tmp_dir = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--device-budget") || !strcmp(a, "--host-budget")) {
            if (!is_gib) return qlr_cli_usage_error("bench", "%s: expected GiB > 0, got '%s'", a, v);
            *(a[2] == 'd' ? &o.device_budget_gib : &o.host_budget_gib) = g;
        } else if (!is_num) return qlr_cli_usage_error("bench", "%s: expected a positive integer, got '%s'", a, v);
        else if (!strcmp(a, "--layers")) o.layers = (int)n;
        else if (!strcmp(a, "--streams")) o.streams = (int)n;
        else if (!strcmp(a, "--tokens")) o.tokens = (int)n;
        else if (!strcmp(a, "--prompt")) o.prompt = (int)n;
        else if (!strcmp(a, "--rank")) o.rank = (int)n;
        else if (!strcmp(a, "--registered")) o.registered = (int)n;
        else if (!strcmp(a, "--files")) o.files = (int)n;
        else if (!strcmp(a, "--requests")) o.requests = (int)n;
        else return qlr_cli_usage_error("bench", "unknown option '%s'", a);
    }
    FILE *f = stdout;
    if (out && !(f = fopen(out, "w"))) {
        qlr_errorf(QLR_ERR_IO, "%s: cannot open for writing", out);
        return qlr_cli_fail("bench");
    }
    qlr_status st = qlr_bench_serve(&o, f);
    if (f != stdout) fclose(f);
    return st == QLR_OK ? 0 : qlr_cli_fail("bench");
}

static int cmd_bench(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv) || argc < 2) {
        help();
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "train")) return bench_train(argc - 1, argv + 1);
    if (!strcmp(argv[1], "serve")) return bench_serve(argc - 1, argv + 1);
    if (strcmp(argv[1], "decode") != 0)
        return qlr_cli_usage_error("bench", "unknown benchmark '%s' (known: train, decode, serve)", argv[1]);
    qlr_bench_decode_opts o = qlr_bench_decode_default_opts();
    const char *out = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--quick")) {
            o.quick = 1;
            continue;
        }
        if (i + 1 >= argc) return qlr_cli_usage_error("bench", "%s needs a value", a);
        const char *v = argv[++i];
        char *end;
        long n = strtol(v, &end, 10);
        int is_num = *v && !*end && n > 0 && n <= (1 << 20);
        if (!strcmp(a, "--model")) o.models = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--device")) o.device = v;
        else if (!is_num) return qlr_cli_usage_error("bench", "%s: expected a positive integer, got '%s'", a, v);
        else if (!strcmp(a, "--prefill")) o.prefill_tokens = (int)n;
        else if (!strcmp(a, "--ctx")) o.decode_ctx = (int)n;
        else if (!strcmp(a, "--steps")) o.decode_steps = (int)n;
        else return qlr_cli_usage_error("bench", "unknown option '%s'", a);
    }
    FILE *f = stdout;
    if (out && !(f = fopen(out, "w"))) {
        qlr_errorf(QLR_ERR_IO, "%s: cannot open for writing", out);
        return qlr_cli_fail("bench");
    }
    qlr_status st = qlr_bench_decode(&o, f);
    if (f != stdout) fclose(f);
    return st == QLR_OK ? 0 : qlr_cli_fail("bench");
}

const qlr_cli_cmd qlr_cmd_bench = {"bench", "performance figures as JSON (qlora bench train | decode | serve)", cmd_bench};
