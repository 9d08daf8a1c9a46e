/* bench/decode_bench.h: the decode/prefill benchmark behind `bench/bench_decode` and
 * `qlora bench decode`: model/'s Llama forward (qlr_model_forward, and qlr_model_forward_dev in
 * CUDA graphs) on Llama-3.1-8B / SmolLM2-135M shapes with random NF4 weights
 * (qlr_model_create_random, no download), plus the device's measured copy bandwidth and bf16
 * GEMM rate, so that decode and prefill are reported as fractions of those ceilings. JSON out. */
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
    const char *device;     /* "cuda" (default); "cpu" runs the backend-generic parts only, as a
                               smoke test of this code (small sizes: smollm2-135m, a short
                               prefill and context) */
} qlr_bench_decode_opts;

qlr_bench_decode_opts qlr_bench_decode_default_opts(void);

/* Runs the benchmark on o->device and writes one JSON object to `json`. Progress lines go to
 * stderr. QLR_ERR_UNSUPPORTED when the build has no CUDA backend (device "cuda"), the device's
 * error when none is present, QLR_ERR_INVALID for an unknown model name. */
qlr_status qlr_bench_decode(const qlr_bench_decode_opts *o, FILE *json);

#endif
