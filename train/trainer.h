/* train/trainer.h: the `qlora train` loop — recipe in, trained LoRA adapter out.
 *
 * Owns: the run options a recipe turns into (qlr_train_opts, filled by train/trainer_recipe.c so
 * that the loop works from plain options and tests can drive it without a recipe file), the
 * loop (micro-batches, gradient accumulation with grad_scale = 1 / targets of the whole step,
 * global-norm clipping, AdamW 8/32-bit, warmup + schedule, epochs or max_steps), the progress bar
 * and metrics.jsonl (and its picture, loss.svg: train/plot.h), eval loss every eval_steps, checkpoints and resume (train/checkpoint.h),
 * NaN/Inf stops, SIGINT/SIGTERM (through a flag the CLI sets) and the final adapter export.
 * The adapter's device side (masters, gradients, compute copies) is adapters/adapter_dev.h's
 * qlr_lora_dev, given to the model as a one-slot adapter set. It does not own the forward/backward (model/train.h), the
 * optimizer math (optim/), batching (data/) or the adapter formats (adapters/). */
#ifndef QLR_TRAIN_TRAINER_H
#define QLR_TRAIN_TRAINER_H

#include <signal.h>
#include <stdint.h>
#include <stdio.h>

#include "core/status.h"

struct qlr_recipe;
struct qlr_lora;
struct qlr_model;
struct qlr_data_source;
struct qlr_data_params;
struct qlr_batch_params;

/* One dataset, as data/dataset.h qlr_data_source wants it (paths resolved). */
typedef struct qlr_train_dataset {
    char *path;                 /* a JSONL file (a folder in the recipe is resolved to <split>.jsonl[.gz]) */
    int format;                 /* qlr_data_format */
    char *field, *field_messages, *field_role, *field_content; /* NULL = the format's default */
    int skip_bad_lines;
} qlr_train_dataset;

/* Where a run's wall time goes (qlr_train_result.phase_seconds, and the on_phase hook). */
typedef enum qlr_train_phase {
    QLR_TRAIN_PHASE_LOAD = 0,   /* backend and base model (load, NF4 quantization) */
    QLR_TRAIN_PHASE_DATA,       /* tokenizing, splitting; each step's micro-batches */
    QLR_TRAIN_PHASE_SETUP,      /* adapter, optimizer states, workspace, resume, metrics file */
    QLR_TRAIN_PHASE_STEP,       /* forward, backward, clipping, optimizer of every step */
    QLR_TRAIN_PHASE_EVAL,       /* eval loss every eval_steps and at the end */
    QLR_TRAIN_PHASE_CHECKPOINT, /* checkpoints */
    QLR_TRAIN_PHASE_EXPORT,     /* the final PEFT folder and GGUF */
    QLR_TRAIN_PHASE_OTHER,      /* metrics lines, progress, the on_step hook */
    QLR_TRAIN_PHASE_COUNT
} qlr_train_phase;

/* The phase's name as the bench reports it ("load", "data", ...). */
const char *qlr_train_phase_name(qlr_train_phase p);

struct qlr_backend;

/* Everything a run needs, with no recipe types (see the file comment). Strings are malloc'ed
 * and freed by qlr_train_opts_free. */
typedef struct qlr_train_opts {
    char *recipe_path;          /* where the recipe came from (messages, the resume hint) */
    char *recipe_yaml;          /* the effective recipe as YAML, absolute paths (checkpoint copy) */
    char *base_model;           /* resolved path of the base model */
    char *chat_template;        /* "tokenizer_default" or a built-in name */
    qlr_train_dataset *datasets;
    uint32_t n_datasets;
    qlr_train_dataset *test_datasets; /* the validation files (recipe test_datasets); none: val_set_size */
    uint32_t n_test_datasets;
    uint32_t sequence_len;
    int sample_packing, drop_long, train_on_inputs;
    double val_set_size;
    uint32_t micro_batch_size, grad_accum;
    double num_epochs;          /* used when max_steps == 0 */
    uint64_t max_steps;
    double lr;
    int lr_schedule;            /* qlr_lr_schedule_type (optim/optim.h) */
    double min_lr_ratio;
    uint64_t warmup_steps;
    double warmup_ratio;
    double weight_decay, max_grad_norm, beta1, beta2, eps;
    int adam_8bit;              /* 1: bnb AdamW8bit (32-bit for tensors < 4096); 0: adamw_torch */
    uint32_t lora_r;
    double lora_alpha, lora_dropout;
    uint32_t lora_targets;      /* QLR_LORA_TARGET mask (bit i = qlr_linear_id i) */
    int rslora;
    uint64_t eval_steps, save_steps, logging_steps;
    int report_tensorboard;     /* 1: TensorBoard event files in output_dir/runs (recipe report_to) */
    uint32_t save_total_limit;
    char *output_dir;           /* resolved */
    uint64_t seed;
    int gradient_checkpointing; /* qlr_ckpt_mode, resolved (never auto after qlr_train_opts_load) */
    char *device;               /* "cpu", "cuda" or "auto" */
    int threads;                /* 0 = default */

    /* run control (not from the recipe) */
    int resume;                 /* 1: continue from resume_dir, or the latest checkpoint in output_dir
                                 * (none there: a warning, and the run starts from step 0) */
    char *resume_dir;           /* NULL = latest valid checkpoint in output_dir */
    volatile sig_atomic_t *stop_flag; /* set by a signal handler: finish the step, checkpoint, stop */
    uint64_t stop_after_step;   /* > 0: behave as if stopped by a signal after this step (tests) */
    int progress;               /* 1: progress bar on stderr (default 1) */
    int dist_force_comm;        /* 1: the backend's communicator even with one rank (tests of the
                                   world-size-1 path through NCCL); ranks come from the launcher's
                                   environment (train/dist.h) */
    int export_gguf;            /* 1: also write output_dir/adapter_model.gguf at the end (default 1) */
    /* Called after every optimizer step (tests: inspect or perturb the adapter). Non-zero stops
     * the run as a signal would. May be NULL. */
    int (*on_step)(void *ud, uint64_t step, struct qlr_lora *adapter);
    void *on_step_ud;
    /* Profiling hooks (qlora bench train; each may be NULL; both get hook_ud): on_backend once
     * the backend exists, before anything runs on it (the bench swaps in a timing copy of its
     * op table); on_phase at every change of phase (qlr_train_phase). */
    void (*on_backend)(void *ud, struct qlr_backend *be);
    void (*on_phase)(void *ud, qlr_train_phase phase);
    void *hook_ud;
} qlr_train_opts;

/* Translates a loaded recipe into options (paths resolved against the recipe's folder, the
 * effective recipe kept as YAML). QLR_ERR_NOT_FOUND for a dataset folder without its split file,
 * QLR_ERR_NOMEM, or a path that does not fit. */
qlr_status qlr_train_opts_from_recipe(const struct qlr_recipe *r, qlr_train_opts *o);
/* qlr_recipe_load + qlr_train_opts_from_recipe + the memory plan check (qlr_plan_check against
 * vram_budget; over budget is QLR_ERR_RANGE with the plan's advice, before anything is
 * allocated) + every dataset file exists (QLR_ERR_NOT_FOUND naming the recipe's
 * file:line:column and key). On failure *o is zeroed. */
qlr_status qlr_train_opts_load(const char *recipe_path, const char *const *sets, int n_sets,
                               qlr_train_opts *o);
/* Every dataset file of `o` (made from `r`) exists; else QLR_ERR_NOT_FOUND naming the recipe's
 * file:line:column and key (datasets.0.path). qlr_train_opts_load calls it. */
qlr_status qlr_train_opts_check_data(const struct qlr_recipe *r, const qlr_train_opts *o);
/* Frees the strings; safe on a zeroed struct. */
void qlr_train_opts_free(qlr_train_opts *o);

/* The recipe's datasets as loader sources (*src: free() it); with data_path, that one file
 * instead, read with the first dataset's format and fields. */
qlr_status qlr_train_data_sources(const qlr_train_opts *o, const char *data_path,
                                  struct qlr_data_source **src, uint32_t *n);
/* The recipe's test_datasets as loader sources (*src: free() it; *n 0 when there are none). */
qlr_status qlr_train_test_sources(const qlr_train_opts *o, struct qlr_data_source **src, uint32_t *n);
/* The recipe's sequence settings for the dataset loader (defaults elsewhere). */
void qlr_train_data_params(const qlr_train_opts *o, struct qlr_data_params *dp);
/* The recipe's micro-batch settings for a batcher (shuffled or in order). */
void qlr_train_batch_params(const qlr_train_opts *o, int shuffle, struct qlr_batch_params *bp);

/* The training workspace's parameters of a run (tokens per micro-batch, sequence length,
 * checkpointing mode (qlr_ckpt_mode; offload also chunks the MLP by QLR_PLAN_MLP_CHUNK rows),
 * LoRA dropout, CE chunk): the trainer's and the planner's. QLR_ERR_RANGE when
 * micro_batch_size * sequence_len does not fit an int32. */
struct qlr_train_params;
qlr_status qlr_train_workspace_params(uint32_t micro_batch_size, uint32_t sequence_len,
                                      int ckpt_mode, double lora_dropout,
                                      struct qlr_train_params *tp);

/* What a run did (filled by qlr_train_run, also on failure as far as it got). */
typedef struct qlr_train_result {
    uint64_t steps_done;        /* optimizer steps completed (counting those before a resume) */
    uint64_t total_steps;
    uint64_t resumed_from;      /* step of the checkpoint resumed from (0 = fresh start) */
    double seconds;             /* wall time of this process's loop */
    double final_loss;          /* loss of the last step (NaN when none) */
    double eval_loss;           /* last eval loss (NaN when none) */
    int stopped;                /* 1: stopped early by a signal, stop_after_step or on_step */
    int nonfinite;              /* 1: stopped on a NaN/Inf loss or gradient norm */
    char last_checkpoint[4096]; /* newest checkpoint written or resumed from ("" = none) */
    char adapter_dir[4096];     /* final PEFT adapter folder ("" when not written) */
    char adapter_gguf[4096];    /* final GGUF adapter ("" when not written) */
    char tensorboard_dir[4096]; /* output_dir/runs when report_to: tensorboard ("" = not written) */
    char plot[4096];            /* output_dir/loss.svg, redrawn at each checkpoint (train/plot.h; "" = none) */
    uint64_t tokens;            /* tokens trained on by this process (padding excluded) */
    double phase_seconds[QLR_TRAIN_PHASE_COUNT]; /* wall time of each phase, this process */
} qlr_train_result;

/* Runs the whole training: loads the model, tokenizes the data, creates (or resumes) the adapter
 * and optimizer, loops, checkpoints, exports. Prints the progress bar and the summary lines on
 * stderr. Returns QLR_OK for a completed or a cleanly stopped run (res->stopped says which);
 * QLR_ERR_RANGE for a NaN/Inf stop (the message names the step and the last good checkpoint);
 * otherwise the failing status with its message. */
qlr_status qlr_train_run(const qlr_train_opts *o, qlr_train_result *res);

#endif
