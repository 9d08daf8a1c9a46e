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

#endif
