/* train/trainer_internal.h: what the trainer's files share (not public): the run's state, the
 * micro-batch in the model's varlen form, and each file's entry points:
 *   trainer.c        the loop: one optimizer step, eval loss, progress, the final export
 *   trainer_setup.c  backend, model, data, the adapter's device side, optimizer states, schedule
 *   trainer_ckpt.c   checkpoints: save, resume (bit-identical), metrics.jsonl
 *   micro.c          data batches -> packed varlen micro-batches (also used by eval.c) */
#ifndef QLR_TRAIN_TRAINER_INTERNAL_H
#define QLR_TRAIN_TRAINER_INTERNAL_H

#include <jansson.h>
#include <stdint.h>

#include "adapters/adapter_dev.h"
#include "adapters/lora.h"
#include "backend/backend.h"
#include "data/dataset.h"
#include "data/pack.h"
#include "model/backprop.h"
#include "model/model.h"
#include "optim/optim.h"
#include "train/checkpoint.h"
#include "train/dist.h"
#include "train/trainer.h"

#define TRAINER_RNG_STREAM 4  /* data/rng.h streams 1..3 are the data's; 4 = dropout seeds */

/* One micro-batch in the model's varlen form (host arrays, padding dropped). */
typedef struct qlr_micro {
    int32_t *tokens, *targets, *pos, *seq;
    int32_t n, n_seq, cap;
    int64_t n_targets;
} qlr_micro;

void qlr_micro_free(qlr_micro *mb);
/* Copies the examples of a data batch back to back (seq ids 0..n_seqs-1 in batch order). */
qlr_status qlr_micro_from_batch(qlr_micro *mb, const qlr_data_batch *b);
/* The model's view of it (valid while mb is). */
qlr_train_batch qlr_micro_view(const qlr_micro *mb);

/* The adapter being trained with everything of it that lives on the training device. */
typedef struct qlr_trainable {
    qlr_lora *lora;                /* host masters: what checkpoints and exports write (aliased by
                                      the device masters on the CPU; downloaded before a save) */
    qlr_lora_dev *ldev;            /* device masters, gradients and compute copies */
    qlr_adapter_slots *slots;      /* one slot: this adapter */
    const qlr_adapter_set *set;
    int n_tensors;                 /* 2 per adapted module: A then B */
    float **param;                 /* [n_tensors] fp32 masters (device) */
    float **grad;                  /* [n_tensors] fp32 gradients (device) */
    int64_t *numel;                /* [n_tensors] */
    size_t grad_bytes;
    qlr_adamw_state *opt;          /* [n_tensors], states in device memory */
    double *norm_acc;              /* one device f64: the clip's sum of squares */
} qlr_trainable;

/* Creates the run's adapter (PEFT init from the recipe's seed) for a model of config `cfg`, its
 * device side on `be`, its one-slot set and an optimizer state per tensor: every allocation a
 * run makes for its adapter (`qlora plan` counts the same). *tr zeroed on failure. */
qlr_status qlr_trainable_create(qlr_backend *be, const qlr_model_config *cfg,
                                const qlr_train_opts *o, qlr_trainable *tr);
void qlr_trainable_free(qlr_backend *be, qlr_trainable *tr);

typedef struct trainer {
    const qlr_train_opts *o;
    qlr_backend *be;
    qlr_model *m;
    qlr_tokenizer *tok;
    qlr_chat_template *tmpl;
    qlr_dataset *ds;
    qlr_data_split split;
    qlr_dataset *test_ds;          /* the recipe's test_datasets (NULL: validation is split.val of ds) */
    uint32_t *test_idx;            /* [examples of test_ds]: 0..n-1 */
    qlr_batcher *train_b, *val_b;
    qlr_trainable tr;              /* the adapter being trained and its optimizer */
    qlr_train_ctx *ctx;
    qlr_lr_schedule sched;

    qlr_dist *dist;                /* data-parallel ranks (NULL: one process) */
    int rank0;                     /* 1 on the rank that writes (checkpoints, metrics, exports) */
    uint32_t n_micro;              /* micro-batches of a step over all ranks: grad_accum x world */
    qlr_micro *mb;                 /* [n_micro] (every rank reads them all: the same stream) */
    qlr_micro eval_mb;
    uint64_t step, start_step, total_steps, rng, tokens_seen;
    double elapsed_before;         /* seconds of training before a resume */
    char metrics_path[4200];
    struct qlr_tfevents *tb;       /* report_to: tensorboard (NULL otherwise) */
    char last_ckpt[4096];
    uint64_t last_ckpt_step;
    /* where the wall time goes (qlr_train_result.phase_seconds) */
    qlr_train_phase phase;
    double phase_t0;
    double *phase_s;               /* [QLR_TRAIN_PHASE_COUNT] */
} trainer;

/* trainer.c: the compute of one optimizer step, shared by the loop and `qlora bench train`
 * (bench/train_bench.c) so that the benchmark times the trainer's own step: zero the LoRA
 * grads, forward + backward of each micro-batch of this rank (k % world == rank; a dropout seed
 * drawn from *rng for every one of the n_micro) with grad_scale = 1 / targets (the targets of
 * the whole step, all ranks), the ranks' all-reduce (dist may be NULL), global-norm clip, AdamW
 * at `lr` with o's hyper-parameters, refresh of the compute copies. *loss = mean token loss.
 * *nonfinite = 1 (loss NaN/Inf: nothing clipped or stepped) or 2 (gradient norm not finite:
 * nothing stepped), else 0. Errors of the ops as they are. */
qlr_status qlr_train_step_compute(qlr_backend *be, qlr_train_ctx *ctx, qlr_trainable *tr, qlr_dist *dist,
                                  const qlr_train_opts *o, const qlr_micro *mb, uint32_t n_micro,
                                  int64_t targets, double lr, uint64_t *rng, double *loss, double *grad_norm,
                                  int *nonfinite);
/* trainer.c: ends the current phase (its seconds added up) and starts `p`. */
void qlr_trainer_phase(trainer *t, qlr_train_phase p);

/* trainer_setup.c */
qlr_status qlr_trainer_open_backend(const char *device, int threads, qlr_backend **be);
qlr_status qlr_trainer_load_data(trainer *t);
/* Adapter (host masters and its device side), optimizer states, workspace, schedule. */
qlr_status qlr_trainer_setup_params(trainer *t);
void qlr_trainer_free(trainer *t);

/* trainer_ckpt.c */
qlr_status qlr_trainer_save_checkpoint(trainer *t, double elapsed);
qlr_status qlr_trainer_resume(trainer *t, const char *dir);
/* On resume keeps the lines of steps <= `upto` (an interrupted run may have logged beyond its
 * last checkpoint); on a fresh start empties the file. */
qlr_status qlr_trainer_metrics_prepare(trainer *t, uint64_t upto, int resumed);
qlr_status qlr_trainer_metrics_append(trainer *t, json_t *obj);

#endif
