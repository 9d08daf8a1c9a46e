/* bench/train_bench.h: the training benchmark behind `qlora bench train`: a real `qlora train`
 * run of a recipe (by default the quickstart on the demo model) through train/trainer.h, with
 * the backend's op table swapped for a timing copy (bench/op_timer.h), and the machine's own
 * sgemm rate (OpenBLAS with the run's thread count) measured in the same process. JSON out:
 * tokens/s, the wall time and the process CPU time of each phase (load, data, setup, step,
 * eval, checkpoint, export: CPU time is what load from other processes does not inflate),
 * each step's time per op kind (linears, LoRA, attention, CE, optimizer, elementwise, memory),
 * and the linears' FLOP rate as a fraction of the sgemm rate. */
#ifndef QLR_BENCH_TRAIN_BENCH_H
#define QLR_BENCH_TRAIN_BENCH_H

#include <stdint.h>
#include <stdio.h>

#include "core/status.h"

typedef struct qlr_bench_train_opts {
    const char *recipe;          /* the recipe (required) */
    const char *const *sets;     /* --set key=value overrides, applied to the recipe */
    int n_sets;
    int threads;                 /* 0: QLR_THREADS or all cores */
    const char *output_dir;      /* NULL: a fresh folder under $TMPDIR (or /tmp), removed after */
    int progress;                /* 1: the trainer's progress bar on stderr */
} qlr_bench_train_opts;

qlr_bench_train_opts qlr_bench_train_default_opts(void);

/* Runs the recipe (its output_dir replaced by o->output_dir or the temporary folder) and writes
 * one JSON object to `json`. The recipe's errors and the trainer's as they are;
 * QLR_ERR_INVALID when output_dir already holds a run. */
qlr_status qlr_bench_train(const qlr_bench_train_opts *o, FILE *json);

/* ---- `qlora bench train --shape`: synthetic runs at a model's real dimensions ----
 *
 * No download, no data: a model of a benchmark shape (bench/bench_common.h) with random NF4
 * weights, the trainer's adapter and optimizer (train/trainer_internal.h qlr_trainable_create:
 * LoRA r 16, alpha 32, all 7 linears, AdamW 8-bit), its workspace, and packed causal
 * micro-batches of random tokens (micro_batch rows, each one sequence of seq tokens); each step
 * is the trainer's own (qlr_train_step_compute). Per run: warm-up steps, then `steps` timed
 * steps with no sync but the step's own loss read-back (tokens/s, MFU, HFU), the peak of the
 * backend's allocator and cudaMemGetInfo's used-bytes delta beside `qlora plan`'s prediction
 * for the same settings, then one profiled step with the op timer (bench/op_timer.h: a sync
 * after each op on a device) for the time per op kind, then the GEMM rate in the same process.
 * --longest: the planner's longest sequence (micro-batch 1) within the budget, confirmed by 3
 * steps with the CUDA allocator capped (budget - the plan's CUDA context reserve). */

typedef struct qlr_bench_train_run {
    int32_t seq;                 /* tokens per row */
    int32_t micro_batch;         /* rows per micro-batch */
} qlr_bench_train_run;

#define QLR_BENCH_TRAIN_MAX_RUNS 16

typedef struct qlr_bench_train_shape_opts {
    const char *shape;           /* "llama3.1-8b", "smollm2-135m" (required) */
    const char *device;          /* "cuda" (default), "cpu" or "auto" */
    qlr_bench_train_run runs[QLR_BENCH_TRAIN_MAX_RUNS];
    int n_runs;                  /* 0 with longest: only the longest run */
    int steps;                   /* timed steps per run (default 6) */
    int warmup;                  /* untimed steps before them (default 2) */
    int checkpointing;           /* qlr_ckpt_mode (train/recipe.h): QLR_CKPT_ON (default), OFF,
                                    OFFLOAD, or AUTO: the planner's choice, the fastest mode that
                                    fits --vram (without it the device's memory) */
    int ckpt_given;              /* 1: --checkpointing was given (--longest otherwise uses AUTO) */
    uint64_t vram_budget;        /* bytes, 0 = none; the plan's check and --longest's cap */
    int longest;                 /* 1: the longest-sequence run (needs vram_budget) */
    int profile;                 /* 1 (default): one profiled step per run for the breakdown */
    int threads;                 /* CPU threads, 0 = default */
    uint64_t seed;               /* weights, tokens, adapter init (default 42) */
} qlr_bench_train_shape_opts;

qlr_bench_train_shape_opts qlr_bench_train_shape_default_opts(void);

/* Runs o's runs (then the longest run) and writes one JSON object to `json` (shape, device,
 * runs [...], longest {...}). QLR_ERR_INVALID for bad options (naming the option), the errors of
 * the backend, model and steps as they are; a longest run whose capped steps fail still writes
 * the JSON (confirmed false, the error) and returns that error. */
qlr_status qlr_bench_train_shape(const qlr_bench_train_shape_opts *o, FILE *json);

#endif
