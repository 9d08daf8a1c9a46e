/* bench/serve_bench.h: `qlora bench serve`: the serving engine (infer/engine.h, its own API, no
 * HTTP) on a random NF4 base (qlr_model_create_random: Llama-3.1-8B or SmolLM2-135M shapes) with
 * random LoRA adapters on all 7 linears, made in memory or written as adapter files. Scenarios:
 * decode tokens/s of N concurrent streams on the base only, over 8 adapters, over N distinct
 * adapters and over N adapters of mixed ranks; the attach of an adapter from its file while N
 * streams run (attach time to the first token, and the longest gap between tokens of any running
 * stream meanwhile); many registered file-tier adapters, a random one per request (throughput,
 * time to first token p50/p99). One JSON object out. It owns no engine code. */
#ifndef QLR_BENCH_SERVE_BENCH_H
#define QLR_BENCH_SERVE_BENCH_H

#include <stdio.h>

#include "core/status.h"

typedef struct qlr_bench_serve_opts {
    const char *shape;      /* "llama3.1-8b" (default; also "llama3-8b") or "smollm2-135m" */
    const char *device;     /* "cuda" (default) or "cpu" */
    int layers;             /* 0 = the shape's; else fewer layers (smoke runs) */
    int streams;            /* concurrent streams (64) */
    int tokens;             /* tokens generated per stream (128) */
    int prompt;             /* prompt tokens per stream (64) */
    int rank;               /* rank of the adapters (16); the mixed scenario uses 8/16/64 */
    int registered;         /* adapters registered for the many-adapter scenario (2000) */
    int files;              /* adapter files behind them (32): registered names share files,
                               each name loaded on its own as its own adapter */
    int requests;           /* requests of the many-adapter scenario (512) */
    double device_budget_gib; /* the registry's device budget for adapter copies (24) */
    double host_budget_gib; /* the registry's host budget for file-tier masters (16) */
    const char *scenarios;  /* comma list of base,a8,distinct,mixed,attach,many or "all" */
    const char *tmp_dir;    /* where adapter files go (default: $TMPDIR or /tmp); removed after */
} qlr_bench_serve_opts;

qlr_bench_serve_opts qlr_bench_serve_default_opts(void);

/* Runs the scenarios on o->device and writes one JSON object to `json`; progress lines go to
 * stderr. QLR_ERR_INVALID for an unknown shape or scenario or a bad count; the backend's error
 * when the device is absent; a scenario's first failure (a request that ended in an error) is
 * the status, with its message. */
qlr_status qlr_bench_serve(const qlr_bench_serve_opts *o, FILE *json);

#endif
