/* bench/bench_decode.c: command-line driver of the decode benchmark (decode_bench.h).
 *   bench_decode [--model all|llama3-8b|smollm2-135m] [--prefill N] [--ctx N] [--steps N]
 *                [--quick] [--device cuda|cpu] [--out FILE]
 * Prints the JSON object to stdout (and to FILE with --out). Exit 0 ok, 1 failure, 2 usage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/decode_bench.h"
#include "core/core.h"
#ifdef QLR_BENCH_CUPTI
#include "bench/cupti_trace.h"
#endif

static int usage(void) {
    fprintf(stderr, "usage: bench_decode [--model all|llama3-8b|smollm2-135m] [--prefill N] "
                    "[--ctx N] [--steps N] [--quick] [--device cuda|cpu] [--out FILE]\n");
    return 2;
}

int main(int argc, char **argv) {
    qlr_bench_decode_opts o = qlr_bench_decode_default_opts();
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) return usage() - 2;
        if (!strcmp(a, "--quick")) { o.quick = 1; continue; }
        if (i + 1 >= argc) return usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--model")) o.models = v;
        else if (!strcmp(a, "--prefill")) o.prefill_tokens = atoi(v);
        else if (!strcmp(a, "--ctx")) o.decode_ctx = atoi(v);
        else if (!strcmp(a, "--steps")) o.decode_steps = atoi(v);
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--device")) o.device = v;
        else return usage();
    }
    if (o.prefill_tokens < 1 || o.decode_ctx < 1 || o.decode_steps < 1) return usage();
#ifdef QLR_BENCH_CUPTI
    if (qlr_bench_trace_begin() < 0) return 1;
#endif
    FILE *f = out ? fopen(out, "w") : NULL;
    if (out && !f) {
        perror(out);
        return 1;
    }
    qlr_status st = qlr_bench_decode(&o, f ? f : stdout);
    if (f) {
        fclose(f);
        if (st == QLR_OK) {
            f = fopen(out, "r");
            int c;
            while (f && (c = fgetc(f)) != EOF) putchar(c);
            if (f) fclose(f);
        }
    }
    if (st != QLR_OK) {
        fprintf(stderr, "bench_decode: %s (%s)\n", qlr_error_msg(), qlr_error_where());
        return 1;
    }
    return 0;
}
