/* cli/cmd_bench.c: `qlora bench decode`: the decode/prefill benchmark of bench/decode_bench.h
 * (model/'s forward on Llama-3.1-8B and SmolLM2-135M shapes with random NF4 weights, no
 * download), reported as fractions of the GPU's own measured copy bandwidth and bf16 GEMM rate.
 * JSON on stdout. */
#include "bench/decode_bench.h"
#include "cli/cli.h"
#include "core/core.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void help(void) {
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
}

static int cmd_bench(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv) || argc < 2) {
        help();
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "decode") != 0)
        return qlr_cli_usage_error("bench", "unknown benchmark '%s' (known: decode)", argv[1]);
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

const qlr_cli_cmd qlr_cmd_bench = {"bench", "performance figures as JSON (qlora bench decode)", cmd_bench};
