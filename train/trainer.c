/* train/trainer.c: the training loop of `qlora train` (see trainer.h for what it owns).
 *
 * One optimizer step: pull grad_accum micro-batches from the data cursor (copied, padding
 * dropped: the model sees packed varlen sequences), count their targets, zero the LoRA grads,
 * run forward+backward on each with grad_scale = 1 / (targets of the whole step) so the
 * gradient is that of the mean token loss, clip the global norm, AdamW on the fp32 masters,
 * refresh the compute copies. Determinism (the resume contract): the data order is a function of
 * (seed, cursor), dropout seeds come from one splitmix64 stream advanced once per micro-batch,
 * grads restart from zero each step, and the optimizer state is saved bit for bit, so a resumed
 * run computes exactly the losses an uninterrupted one does. */
#define _GNU_SOURCE
#include "train/trainer.h"

#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"
#include "formats/tfevents.h"
#include "train/plot.h"
#include "train/trainer_internal.h"

/* Copies a NUL-terminated string, cut to cap - 1 bytes. */
static void copy_str(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

/* ------------------------------------------------------------------ phases */

const char *qlr_train_phase_name(qlr_train_phase p) {
    static const char *const k[QLR_TRAIN_PHASE_COUNT] = {"load", "data", "setup", "step",
                                                         "eval", "checkpoint", "export", "other"};
    return (unsigned)p < QLR_TRAIN_PHASE_COUNT ? k[p] : "?";
}

void qlr_trainer_phase(trainer *t, qlr_train_phase p) {
    double now = qlr_now();
    if (t->phase_s) t->phase_s[t->phase] += now - t->phase_t0;
    t->phase = p;
    t->phase_t0 = now;
    if (t->o->on_phase) t->o->on_phase(t->o->hook_ud, p);
}

/* ------------------------------------------------------------------ eval */

static qlr_status eval_loss(trainer *t, double *out) {
    *out = NAN;
    if (!t->val_b) return QLR_OK;
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_EVAL);
    qlr_data_cursor c0 = {0, 0};
    QLR_TRY(qlr_batcher_seek(t->val_b, c0));
    uint64_t nb = qlr_batcher_batches_per_epoch(t->val_b);
    double sum = 0;
    int64_t cnt = 0;
    for (uint64_t i = 0; i < nb; i++) {
        qlr_data_batch b;
        QLR_TRY(qlr_batcher_next(t->val_b, &b));
        QLR_TRY(qlr_micro_from_batch(&t->eval_mb, &b));
        if (t->eval_mb.n == 0) continue;
        qlr_train_batch tb = qlr_micro_view(&t->eval_mb);
        double ls;
        int64_t nt;
        QLR_TRY(qlr_train_eval(t->ctx, t->tr.set, &tb, &ls, &nt));
        sum += ls;
        cnt += nt;
    }
    *out = cnt ? sum / (double)cnt : NAN;
    return QLR_OK;
}

/* ------------------------------------------------------------------ one step */

qlr_status qlr_train_step_compute(qlr_backend *be, qlr_train_ctx *ctx, qlr_trainable *tr, qlr_dist *dist,
                                  const qlr_train_opts *o, const qlr_micro *mb, uint32_t n_micro,
                                  int64_t targets, double lr, uint64_t *rng, double *loss, double *grad_norm,
                                  int *nonfinite) {
    *loss = 0.0;
    *grad_norm = 0.0;
    *nonfinite = 0;
    int world = qlr_dist_world(dist), rank = qlr_dist_rank(dist);
    float scale = targets > 0 ? (float)(1.0 / (double)targets) : 0.0f;
    QLR_TRY(be->mem.memset0(be, tr->ldev->grad, tr->grad_bytes));
    double sums[2] = {0, 0}; /* loss sum, targets counted */
    for (uint32_t k = 0; k < n_micro; k++) {
        uint64_t dseed = qlr_data_rng_next(rng);
        if ((int)(k % (uint32_t)world) != rank || mb[k].n == 0) continue;
        qlr_train_batch tb = qlr_micro_view(&mb[k]);
        double ls;
        int64_t nt;
        QLR_TRY(qlr_train_fwd_bwd(ctx, tr->set, &tb, scale, tr->ldev->da, tr->ldev->db, dseed, &ls, &nt));
        sums[0] += ls;
        sums[1] += (double)nt;
        qlr_kill_point("train.micro");
    }
    if (dist) {
        QLR_TRY(qlr_dist_allreduce_f32(dist, tr->ldev->grad, (int64_t)(tr->grad_bytes / 4)));
        QLR_TRY(qlr_dist_allreduce_host(dist, sums, 2, QLR_DIST_SUM));
    }
    *loss = sums[1] > 0 ? sums[0] / sums[1] : 0.0;
    if (!isfinite(*loss)) {
        *nonfinite = 1;
        return QLR_OK;
    }
    /* clip and step on the training device: the norm's one f64 is the step's only read-back
     * besides the losses */
    int nf = 0;
    float norm = 0.0f;
    QLR_TRY(qlr_grad_clip(be, tr->grad, tr->numel, tr->n_tensors, (float)o->max_grad_norm, tr->norm_acc, &norm,
                          &nf));
    *grad_norm = norm;
    if (nf) {
        *nonfinite = 2;
        return QLR_OK;
    }
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    hp.lr = (float)lr;
    hp.beta1 = (float)o->beta1;
    hp.beta2 = (float)o->beta2;
    hp.eps = (float)o->eps;
    hp.weight_decay = (float)o->weight_decay;
    hp.gnorm_scale = 1.0f;
    for (int i = 0; i < tr->n_tensors; i++)
        QLR_TRY(qlr_adamw_update(be, &tr->opt[i], tr->param[i], tr->grad[i], &hp));
    return qlr_lora_dev_refresh(tr->ldev);
}


typedef struct step_out {
    double loss, grad_norm, lr;
    uint64_t tokens;
    int nonfinite;   /* 1: loss NaN/Inf, 2: gradient norm NaN/Inf */
} step_out;

static qlr_status train_step(trainer *t, step_out *so) {
    memset(so, 0, sizeof *so);
    /* every rank reads the whole step's micro-batches (one stream, one seed rule) and runs those
     * of its own (k % world == rank); the targets of all of them set the gradient's scale */
    int64_t targets = 0;
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_DATA);
    for (uint32_t k = 0; k < t->n_micro; k++) {
        qlr_data_batch b;
        QLR_TRY(qlr_batcher_next(t->train_b, &b));
        QLR_TRY(qlr_micro_from_batch(&t->mb[k], &b));
        targets += t->mb[k].n_targets;
        so->tokens += (uint64_t)t->mb[k].n;
    }
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_STEP);
    so->lr = qlr_lr_at(&t->sched, (int64_t)t->step);
    QLR_TRY(qlr_train_step_compute(t->be, t->ctx, &t->tr, t->dist, t->o, t->mb, t->n_micro, targets, so->lr,
                                   &t->rng, &so->loss, &so->grad_norm, &so->nonfinite));
    if (so->nonfinite) return QLR_OK;
    t->step++;
    t->tokens_seen += so->tokens;
    qlr_kill_point("train.step");
    return QLR_OK;
}

/* ------------------------------------------------------------------ the run */

static qlr_status export_final(trainer *t, qlr_train_result *res) {
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_EXPORT);
    QLR_TRY(qlr_lora_dev_download(t->tr.ldev, t->tr.lora));
    snprintf(res->adapter_dir, sizeof res->adapter_dir, "%s/%s", t->o->output_dir, QLR_RUN_ADAPTER_DIR);
    QLR_TRY(qlr_lora_save_peft(t->tr.lora, res->adapter_dir));
    qlr_kill_point("train.export");
    if (t->o->export_gguf) {
        snprintf(res->adapter_gguf, sizeof res->adapter_gguf, "%s/adapter_model.gguf", t->o->output_dir);
        qlr_status st = qlr_lora_save_gguf(t->tr.lora, res->adapter_gguf);
        if (st) {
            QLR_LOGW("GGUF export skipped: %s", qlr_error_msg());
            qlr_error_clear();
            res->adapter_gguf[0] = 0;
        }
    }
    return QLR_OK;
}

static void fmt_lr(char *buf, size_t n, double lr) { snprintf(buf, n, "%.3g", lr); }

static double wall_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* report_to: tensorboard: the logged step's scalars (HF Trainer's tag names). */
static qlr_status report_step(trainer *t, const step_out *so, double tps, double eval) {
    if (!t->tb) return QLR_OK;
    const char *tags[] = {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "eval/loss"};
    const float vals[] = {(float)so->loss, (float)so->lr, (float)so->grad_norm, (float)tps, (float)eval};
    return qlr_tfevents_scalars(t->tb, (int64_t)t->step, wall_clock(), tags, vals, isnan(eval) ? 4 : 5);
}

/* Redraws output_dir/loss.svg from metrics.jsonl (after each checkpoint, so a stopped or crashed
 * run has its picture too). A failure is a warning: the training goes on. */
static void draw_plot(trainer *t, qlr_train_result *res) {
    char path[4096];
    if (qlr_plot_run(t->o->output_dir, NULL, path, sizeof path) == QLR_OK) {
        copy_str(res->plot, sizeof res->plot, path);
        return;
    }
    qlr_progress_clear_line();
    QLR_LOGW("the plot of the run was not written: %s", qlr_error_msg());
    qlr_error_clear();
}

qlr_status qlr_train_run(const qlr_train_opts *o, qlr_train_result *res) {
    memset(res, 0, sizeof *res);
    res->final_loss = NAN;
    res->eval_loss = NAN;
    if (!o->grad_accum || !o->micro_batch_size || !o->sequence_len || !o->lora_r || !o->output_dir)
        return qlr_errorf(QLR_ERR_INVALID, "train options: sizes must be > 0 and output_dir set");
    trainer T;
    memset(&T, 0, sizeof T);
    trainer *t = &T;
    t->o = o;
    qlr_status st = QLR_OK;
    qlr_progress *bar = NULL;
    double t_start = qlr_now();
    t->phase_t0 = t_start;
    t->phase_s = res->phase_seconds;
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_LOAD);

    /* refuse to mix a fresh run with the checkpoints of an old one before loading anything */
    char *latest = NULL;
    if (!o->resume && qlr_ckpt_find_latest(o->output_dir, &latest) == QLR_OK) {
        st = qlr_errorf(QLR_ERR_INVALID,
                        "%s already holds a checkpoint of an earlier run (%s): pass --resume to continue it, "
                        "or remove the folder / choose another output_dir",
                        o->output_dir, latest);
        free(latest);
        return st;
    }
    qlr_error_clear();
    char *resume_dir = NULL;
    if (o->resume) {
        /* `--resume` is the command that restarts a run after a crash: a run killed before its
         * first complete checkpoint starts again from step 0 (an explicit DIR must exist) */
        if (o->resume_dir) resume_dir = strdup(o->resume_dir);
        else if ((st = qlr_ckpt_find_latest(o->output_dir, &resume_dir)) == QLR_ERR_NOT_FOUND) {
            QLR_LOGW("--resume: %s holds no complete checkpoint: starting from step 0", o->output_dir);
            qlr_error_clear();
            st = QLR_OK;
        } else if (st) {
            qlr_error_prefix("--resume");
            return st;
        }
        if (o->resume_dir && !resume_dir) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    qlr_dist_env denv;
    if ((st = qlr_dist_env_read(&denv))) goto done;
    t->rank0 = denv.rank == 0;
    if (denv.world > 1 && !getenv("QLR_CUDA_DEVICE")) { /* one GPU per rank of this host */
        char dev[16];
        snprintf(dev, sizeof dev, "%d", denv.local_rank);
        setenv("QLR_CUDA_DEVICE", dev, 1);
    }
    if (!t->rank0) qlr_log_set_level(QLR_LOG_WARN); /* rank 0 speaks for the run */
    if (t->rank0 && (st = qlr_mkdir_p(o->output_dir))) goto done;
    if ((st = qlr_trainer_open_backend(o->device, o->threads, &t->be))) goto done;
    if (o->on_backend) o->on_backend(o->hook_ud, t->be);
    if (denv.world > 1 || o->dist_force_comm) {
        if ((st = qlr_dist_open(&denv, t->be, o->dist_force_comm, &t->dist))) goto done;
    }
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = o->progress;
    if ((st = qlr_model_load(o->base_model, t->be, &lp, &t->m))) goto done;
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_DATA);
    if ((st = qlr_trainer_load_data(t))) goto done;
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_SETUP);
    if (qlr_tokenizer_n_vocab(t->tok) > t->m->cfg.n_vocab) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: the tokenizer has %d tokens but the model only %d", o->base_model,
                        qlr_tokenizer_n_vocab(t->tok), t->m->cfg.n_vocab);
        goto done;
    }
    if ((st = qlr_trainer_setup_params(t))) goto done;
    if (resume_dir) {
        if ((st = qlr_trainer_resume(t, resume_dir))) goto done;
        QLR_LOGI("resumed from %s at step %" PRIu64, resume_dir, t->step);
        res->resumed_from = t->step;
        /* a run killed between a manifest and the rotation after it left an old checkpoint
         * (rank 0 writes and rotates; it keeps the one resumed from, the newest complete) */
        if (t->rank0 && (st = qlr_ckpt_rotate(o->output_dir, o->save_total_limit))) goto done;
    }
    if (t->rank0 && (st = qlr_trainer_metrics_prepare(t, t->step, resume_dir != NULL))) goto done;
    if (t->rank0 && o->report_tensorboard) {
        snprintf(res->tensorboard_dir, sizeof res->tensorboard_dir, "%s/runs", o->output_dir);
        if ((st = qlr_tfevents_open(res->tensorboard_dir, &t->tb))) goto done;
        /* a resumed run restarts at step+1: TensorBoard drops what an earlier file logged from there */
        if (resume_dir && (st = qlr_tfevents_restart(t->tb, (int64_t)t->step + 1, wall_clock()))) goto done;
    }
    res->total_steps = t->total_steps;
    copy_str(res->last_checkpoint, sizeof res->last_checkpoint, t->last_ckpt);
    QLR_LOGI("training: %" PRIu64 " steps of %u x %u micro-batches (%u rows of %u tokens), lr %g, %s, %d adapted "
             "tensors (%" PRIu64 " parameters), %s backend, %d threads",
             t->total_steps, t->n_micro, o->micro_batch_size, o->micro_batch_size, o->sequence_len, o->lr,
             o->adam_8bit ? "AdamW 8-bit" : "AdamW 32-bit", t->tr.n_tensors, t->tr.lora->n_params, t->be->name,
             qlr_n_threads());

    if (t->step >= t->total_steps) QLR_LOGW("the checkpoint is at step %" PRIu64 " of %" PRIu64 ": nothing left to train",
                                            t->step, t->total_steps);
    double t_loop = qlr_now();
    if (o->progress && t->rank0) {
        char label[64];
        if (t->start_step) snprintf(label, sizeof label, "train (from step %" PRIu64 ")", t->start_step);
        else snprintf(label, sizeof label, "train");
        bar = qlr_progress_begin(label, t->total_steps - (t->step < t->total_steps ? t->step : t->total_steps), "steps");
    }
    uint64_t last_eval_step = UINT64_MAX;
    while (t->step < t->total_steps) {
        double t0 = qlr_now();
        step_out so;
        if ((st = train_step(t, &so))) goto done;
        if (so.nonfinite) {
            qlr_progress_end(bar);
            bar = NULL;
            st = qlr_errorf(QLR_ERR_RANGE,
                            "step %" PRIu64 ": the %s is %s; stopping. The last good checkpoint is %s%s",
                            t->step + 1, so.nonfinite == 1 ? "loss" : "gradient norm",
                            so.nonfinite == 1 ? (isnan(so.loss) ? "NaN" : "Inf") : "not finite",
                            t->last_ckpt[0] ? t->last_ckpt : "none (no checkpoint was written yet)",
                            t->last_ckpt[0] ? " (resume with --resume after lowering learning_rate or "
                                              "checking the data)"
                                            : "; lower learning_rate or check the data");
            res->nonfinite = 1;
            res->final_loss = so.loss;
            goto done;
        }
        double dt = qlr_now() - t0;
        qlr_trainer_phase(t, QLR_TRAIN_PHASE_OTHER);
        res->final_loss = so.loss;
        res->tokens += so.tokens;
        double tps = dt > 0 ? (double)so.tokens / dt : 0;
        double ev = NAN;
        if (t->rank0 && t->val_b && o->eval_steps && t->step % o->eval_steps == 0) {
            if ((st = eval_loss(t, &ev))) goto done;
            res->eval_loss = ev;
            last_eval_step = t->step;
            qlr_trainer_phase(t, QLR_TRAIN_PHASE_OTHER);
        }
        int last = t->step == t->total_steps;
        if (t->rank0 && last && t->val_b && last_eval_step != t->step) {
            if ((st = eval_loss(t, &ev))) goto done;
            res->eval_loss = ev;
            last_eval_step = t->step;
            qlr_trainer_phase(t, QLR_TRAIN_PHASE_OTHER);
        }
        if (t->rank0 && (t->step % o->logging_steps == 0 || last || !isnan(ev))) {
            json_t *j = json_object();
            json_object_set_new(j, "step", json_integer((json_int_t)t->step));
            json_object_set_new(j, "loss", json_real(so.loss));
            json_object_set_new(j, "lr", json_real(so.lr));
            json_object_set_new(j, "grad_norm", json_real(so.grad_norm));
            json_object_set_new(j, "tokens_per_s", json_real(round(tps * 10) / 10));
            json_object_set_new(j, "tokens", json_integer((json_int_t)t->tokens_seen));
            if (!isnan(ev)) json_object_set_new(j, "eval_loss", json_real(ev));
            st = qlr_trainer_metrics_append(t, j);
            json_decref(j);
            if (st || (st = report_step(t, &so, tps, ev))) goto done;
            if (!isnan(ev)) {
                qlr_progress_clear_line();
                QLR_LOGI("step %" PRIu64 ": eval loss %.4f (train loss %.4f)", t->step, ev, so.loss);
            }
        }
        double elapsed = t->elapsed_before + (qlr_now() - t_loop);
        int stop = (o->stop_flag && *o->stop_flag) || (o->stop_after_step && t->step >= o->stop_after_step);
        if (t->dist) { /* the ranks stop at the same step */
            double s1 = stop;
            if ((st = qlr_dist_allreduce_host(t->dist, &s1, 1, QLR_DIST_MAX))) goto done;
            stop = s1 > 0;
        }
        if (o->on_step) { /* the hook sees (and may change) the host masters */
            if ((st = qlr_lora_dev_download(t->tr.ldev, t->tr.lora))) goto done;
            if (o->on_step(o->on_step_ud, t->step, t->tr.lora)) stop = 1;
            if ((st = qlr_lora_dev_upload(t->tr.ldev, t->tr.lora))) goto done;
        }
        if (t->rank0 && ((o->save_steps && t->step % o->save_steps == 0) || last || stop)) {
            qlr_trainer_phase(t, QLR_TRAIN_PHASE_CHECKPOINT);
            if ((st = qlr_trainer_save_checkpoint(t, elapsed))) goto done;
            copy_str(res->last_checkpoint, sizeof res->last_checkpoint, t->last_ckpt);
            draw_plot(t, res);
            qlr_trainer_phase(t, QLR_TRAIN_PHASE_OTHER);
        }
        char extra[160], lrs[32];
        fmt_lr(lrs, sizeof lrs, so.lr);
        snprintf(extra, sizeof extra, "step %" PRIu64 "/%" PRIu64 " loss %.4f lr %s %.0f tok/s", t->step,
                 t->total_steps, so.loss, lrs, tps);
        qlr_progress_update(bar, t->step - t->start_step, extra);
        res->steps_done = t->step;
        if (stop && !last) {
            res->stopped = 1;
            break;
        }
    }
    res->steps_done = t->step;
    qlr_progress_end(bar);
    bar = NULL;
    res->seconds = qlr_now() - t_loop;
    if (!res->stopped) {
        if (t->rank0 && t->step > t->start_step && t->last_ckpt_step != t->step) {
            qlr_trainer_phase(t, QLR_TRAIN_PHASE_CHECKPOINT);
            if ((st = qlr_trainer_save_checkpoint(t, t->elapsed_before + res->seconds))) goto done;
            copy_str(res->last_checkpoint, sizeof res->last_checkpoint, t->last_ckpt);
            draw_plot(t, res);
        }
        if (t->rank0 && (st = export_final(t, res))) goto done;
    }
    QLR_LOGD("trainer wall time %.1fs", qlr_now() - t_start);
done:
    qlr_trainer_phase(t, QLR_TRAIN_PHASE_OTHER);
    t->phase_s = NULL;
    qlr_progress_end(bar);
    qlr_tfevents_close(t->tb);
    t->tb = NULL;
    if (st && t->dist) { /* a failed rank must not leave the others waiting in a collective */
        qlr_dist_close(t->dist, 1);
        t->dist = NULL;
    }
    free(resume_dir);
    qlr_trainer_free(t);
    return st;
}

