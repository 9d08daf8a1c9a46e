/* bench/decode_bench.h: the decode/prefill benchmark behind `bench/bench_decode` (and later
 * `qlora bench decode`): a Llama-shaped model with random NF4 weights (no download) run through
 * the backend op table, plus the device's measured copy bandwidth and bf16 GEMM rate, so that
 * decode and prefill are reported as fractions of those ceilings. JSON out. */
#ifndef QLR_BENCH_DECODE_BENCH_H
#define QLR_BENCH_DECODE_BENCH_H

#include <stdio.h>

#include "core/status.h"

typedef struct qlr_bench_decode_opts {
    const char *models;     /* "llama3-8b", "smollm2-135m" or "all" */
    int prefill_tokens;     /* 2048 */
    int decode_ctx;         /* context each sequence has when decode timing starts (512) */
    int decode_steps;       /* timed steps per batch size (20) */
    int quick;              /* 1: fewer repetitions (smoke run) */
} qlr_bench_decode_opts;

qlr_bench_decode_opts qlr_bench_decode_default_opts(void);

/* Runs the benchmark on the CUDA backend and writes one JSON object to `json`. Progress lines go
 * to stderr. QLR_ERR_UNSUPPORTED when the build has no CUDA backend or no device is present. */
qlr_status qlr_bench_decode(const qlr_bench_decode_opts *o, FILE *json);

#endif
