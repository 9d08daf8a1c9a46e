/* train/eval.h: `qlora eval` — the loss and the task metric on a recipe's validation split, for
 * the base model and/or a trained adapter, on one loaded base model.
 *
 * The task metric is exact match of the greedy answer: for chat data the conversation up to the
 * last assistant turn is rendered with the generation prompt, the model generates greedily until
 * end of turn (at most the reference's token count + QLR_EVAL_EXTRA_TOKENS: a longer answer
 * cannot match), and the trimmed text must equal the trimmed reference exactly. Alpaca and
 * input_output data use the untrained parts as the prompt and the trained part as the reference.
 * The validation data is the recipe's: every example of its test_datasets files, or else the
 * val_set_size split (same seed, so the same held-out examples the trainer evaluated on); or all
 * of another JSONL file (data_path) in the first dataset's format. Does not own the forward (model/) or the training loop (train/trainer.h). */
#ifndef QLR_TRAIN_EVAL_H
#define QLR_TRAIN_EVAL_H

#include <stdint.h>
#include <stdio.h>

#include "core/status.h"
#include "train/trainer.h"

#define QLR_EVAL_EXTRA_TOKENS 16

typedef struct qlr_eval_opts {
    const qlr_train_opts *run;  /* the recipe's options (model, data, split, sequence_len, ...) */
    const char *adapter;        /* adapter path (run dir, PEFT folder, GGUF); NULL = the run's output_dir */
    int eval_base;              /* 1: evaluate the base model */
    int eval_adapter;           /* 1: evaluate the adapter (it must exist when asked for explicitly) */
    const char *data_path;      /* NULL = the recipe's validation data; else every example of this file */
    int32_t n_examples;         /* > 0: only the first N validation examples (loss and exact match) */
    int32_t n_show;             /* mismatches to print per model (default 3) */
    const char *answers_path;   /* NULL, or a JSONL file written (atomically) with one object per
                                   example and model: model, source, line, reference, answer,
                                   max_tokens (the generation budget), exact */
    int progress;               /* progress bar on stderr */
    const char *qlora_cmd;      /* how hints name the program ("qlora", "build/bin/qlora"); NULL = "qlora" */
} qlr_eval_opts;

typedef struct qlr_eval_scores {
    int done;                   /* 1 when this model was evaluated */
    double loss;                /* mean token cross-entropy (NaN when no targets) */
    int64_t n_targets;
    int32_t n_examples;         /* examples with an exact-match reference */
    int32_t n_exact;
    double seconds;
} qlr_eval_scores;

qlr_eval_opts qlr_eval_opts_default(void);

/* Loads the base model and the data once, then evaluates the base and/or the adapter, printing
 * one result line per model, the mismatches and a comparison to `out`. When the adapter is not
 * given and the run's output_dir holds none, only the base is evaluated (with a note), unless
 * eval_base is 0 (then QLR_ERR_NOT_FOUND). QLR_ERR_INVALID when there is no validation data. */
qlr_status qlr_eval_run(const qlr_eval_opts *e, qlr_eval_scores *base, qlr_eval_scores *adapter, FILE *out);

#endif
