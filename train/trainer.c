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

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/adapter_dev.h"
#include "adapters/lora.h"
#include "backend/backend.h"
#include "core/core.h"
#include "data/dataset.h"
#include "data/pack.h"
#include "model/model.h"
#include "model/backprop.h"
#include "optim/optim.h"
#include "train/checkpoint.h"

#define TRAINER_RNG_STREAM 4  /* data/pack.h streams 1..3 are the data's; 4 = dropout seeds */

/* Copies a NUL-terminated string, cut to cap - 1 bytes. */
static void copy_str(char *dst, size_t cap, const char *src) {
    size_t n = strlen(src);
    if (n >= cap) n = cap - 1;
    memcpy(dst, src, n);
    dst[n] = 0;
}

/* ------------------------------------------------------------------ micro-batches */

/* One micro-batch in the model's varlen form (host arrays, padding dropped). */
typedef struct micro {
    int32_t *tokens, *targets, *pos, *seq;
    int32_t n, n_seq, cap;
    int64_t n_targets;
} micro;

static void micro_free(micro *mb) {
    free(mb->tokens);
    free(mb->targets);
    free(mb->pos);
    free(mb->seq);
    memset(mb, 0, sizeof *mb);
}

/* Copies the examples of a data batch back to back (seq ids 0..n_seqs-1 in batch order). */
static qlr_status micro_from_batch(micro *mb, const qlr_data_batch *b) {
    int64_t need = 0;
    for (uint32_t s = 0; s < b->n_seqs; s++) need += b->seq_lengths[s];
    if (need > INT32_MAX) return qlr_errorf(QLR_ERR_RANGE, "micro-batch of %lld tokens", (long long)need);
    if (need > mb->cap) {
        int32_t cap = (int32_t)need;
        int32_t *t = realloc(mb->tokens, sizeof(int32_t) * (size_t)cap);
        if (t) mb->tokens = t;
        int32_t *g = realloc(mb->targets, sizeof(int32_t) * (size_t)cap);
        if (g) mb->targets = g;
        int32_t *p = realloc(mb->pos, sizeof(int32_t) * (size_t)cap);
        if (p) mb->pos = p;
        int32_t *q = realloc(mb->seq, sizeof(int32_t) * (size_t)cap);
        if (q) mb->seq = q;
        if (!t || !g || !p || !q) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        mb->cap = cap;
    }
    int32_t n = 0;
    int64_t nt = 0;
    for (uint32_t s = 0; s < b->n_seqs; s++) {
        uint32_t off = b->seq_offsets[s], len = b->seq_lengths[s];
        for (uint32_t j = 0; j < len; j++) {
            mb->tokens[n] = b->input_ids[off + j];
            mb->targets[n] = b->targets[off + j];
            mb->pos[n] = b->positions[off + j];
            mb->seq[n] = (int32_t)s;
            nt += mb->targets[n] >= 0;
            n++;
        }
    }
    mb->n = n;
    mb->n_seq = (int32_t)b->n_seqs;
    mb->n_targets = nt;
    return QLR_OK;
}

static qlr_train_batch micro_view(const micro *mb) {
    qlr_train_batch tb = {mb->n, mb->tokens, mb->targets, mb->pos, mb->seq, mb->n_seq};
    return tb;
}

/* ------------------------------------------------------------------ the trainer state */

typedef struct trainer {
    const qlr_train_opts *o;
    qlr_backend *be;
    qlr_model *m;
    qlr_tokenizer *tok;
    qlr_chat_template *tmpl;
    qlr_dataset *ds;
    qlr_data_split split;
    qlr_batcher *train_b, *val_b;
    qlr_lora *lora;                /* host masters (aliased by the device ones on the CPU) */
    qlr_lora_dev *ldev;            /* device masters, gradients and compute copies */
    qlr_adapter_slots *slots;      /* one slot: the adapter being trained */
    const qlr_adapter_set *set;
    qlr_train_ctx *ctx;

    int n_tensors;                 /* 2 per adapted module: A then B */
    float **param;                 /* [n_tensors] fp32 masters (host) */
    float **grad_host;             /* [n_tensors] fp32 grads (host; == device grads when host-visible) */
    int64_t *numel;                /* [n_tensors] */
    float *grad_host_block;        /* host copy (non host-visible backends) */
    size_t grad_bytes;
    qlr_adamw_state *opt;          /* [n_tensors] */
    qlr_lr_schedule sched;

    micro *mb;                     /* [grad_accum] */
    micro eval_mb;
    uint64_t step, start_step, total_steps, rng, tokens_seen;
    double elapsed_before;         /* seconds of training before a resume */
    char metrics_path[4200];
    char last_ckpt[4096];
    uint64_t last_ckpt_step;
} trainer;

static void trainer_free(trainer *t) {
    qlr_train_ctx_free(t->ctx);
    qlr_adapter_slots_free(t->slots);
    qlr_lora_dev_free(t->ldev);
    if (t->opt)
        for (int i = 0; i < t->n_tensors; i++) qlr_adamw_state_free(&t->opt[i]);
    free(t->opt);
    free(t->grad_host_block);
    free(t->param);
    free(t->grad_host);
    free(t->numel);
    if (t->mb)
        for (uint32_t i = 0; i < t->o->grad_accum; i++) micro_free(&t->mb[i]);
    free(t->mb);
    micro_free(&t->eval_mb);
    qlr_lora_free(t->lora);
    qlr_batcher_free(t->train_b);
    qlr_batcher_free(t->val_b);
    qlr_data_split_free(&t->split);
    qlr_dataset_free(t->ds);
    qlr_chat_template_free(t->tmpl);
    qlr_tokenizer_free(t->tok);
    qlr_model_free(t->m);
    qlr_backend_free(t->be);
}

static qlr_status open_backend(const char *device, int threads, qlr_backend **be) {
    if (strcmp(device, "auto")) return qlr_backend_create(device, threads, be);
    if (qlr_backend_create("cuda", threads, be) == QLR_OK) return QLR_OK;
    QLR_LOGI("device auto: no CUDA backend available (%s); training on the CPU", qlr_error_msg());
    qlr_error_clear();
    return qlr_backend_create("cpu", threads, be);
}

/* Tokenizer, datasets, split and the two batchers. */
static qlr_status load_data(trainer *t) {
    const qlr_train_opts *o = t->o;
    QLR_TRY(qlr_data_open_tokenizer(o->base_model, o->chat_template, &t->tok, &t->tmpl));
    qlr_data_source *src;
    uint32_t n_src;
    QLR_TRY(qlr_train_data_sources(o, NULL, &src, &n_src));
    qlr_data_params dp;
    qlr_train_data_params(o, &dp);
    dp.progress = o->progress;
    qlr_status st = qlr_dataset_load(src, n_src, &dp, t->tok, t->tmpl, &t->ds);
    free(src);
    QLR_TRY(st);
    const qlr_data_stats *s = qlr_dataset_stats(t->ds);
    QLR_LOGI("data: %llu examples, %llu tokens (%llu trained), %llu truncated, %llu dropped (too long), "
             "%llu dropped (nothing to train), %llu bad lines skipped",
             (unsigned long long)s->examples, (unsigned long long)s->tokens, (unsigned long long)s->trainable,
             (unsigned long long)s->truncated, (unsigned long long)s->dropped_long,
             (unsigned long long)s->dropped_empty, (unsigned long long)s->skipped);
    QLR_TRY(qlr_dataset_split(t->ds, o->val_set_size, o->seed, &t->split));
    qlr_batch_params bp;
    qlr_train_batch_params(o, 1, &bp);
    QLR_TRY(qlr_batcher_create(t->ds, t->split.train, t->split.n_train, &bp, &t->train_b));
    if (t->split.n_val) {
        bp.shuffle = 0;
        QLR_TRY(qlr_batcher_create(t->ds, t->split.val, t->split.n_val, &bp, &t->val_b));
    }
    QLR_LOGI("split: %zu train, %zu validation examples; %llu micro-batches per epoch (%s efficiency %.1f%%)",
             t->split.n_train, t->split.n_val, (unsigned long long)qlr_batcher_batches_per_epoch(t->train_b),
             o->sample_packing ? "packing" : "padding", 100.0 * qlr_batcher_efficiency(t->train_b));
    return QLR_OK;
}

/* Adapter, grads, optimizer states, schedule. */
static qlr_status setup_params(trainer *t) {
    const qlr_train_opts *o = t->o;
    qlr_lora_base base;
    qlr_lora_base_from_config(&t->m->cfg, &base);
    qlr_lora_params lp = qlr_lora_params_default();
    lp.r = (int32_t)o->lora_r;
    lp.alpha = o->lora_alpha;
    lp.dropout = o->lora_dropout;
    lp.use_rslora = o->rslora;
    lp.targets = o->lora_targets;
    lp.seed = o->seed;
    lp.base_model = o->base_model;
    QLR_TRY(qlr_lora_create(&base, &lp, &t->lora));
    int32_t nl = t->m->cfg.n_layers;
    QLR_TRY(qlr_lora_dev_create(t->be, t->lora, nl, 1, &t->ldev));
    QLR_TRY(qlr_adapter_slots_create(t->be, nl, 1, &t->slots));
    qlr_adapter_slots_put(t->slots, 0, t->ldev, 1.0f);
    QLR_TRY(qlr_adapter_slots_commit(t->slots, 1, &t->set));

    size_t nslots = (size_t)nl * QLR_LIN_COUNT;
    t->param = calloc(2 * nslots, sizeof *t->param);
    t->grad_host = calloc(2 * nslots, sizeof *t->grad_host);
    t->numel = calloc(2 * nslots, sizeof *t->numel);
    t->opt = calloc(2 * nslots, sizeof *t->opt);
    if (!t->param || !t->grad_host || !t->numel || !t->opt)
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    t->grad_bytes = (size_t)t->lora->n_params * sizeof(float);
    float *host = t->ldev->grad;
    if (!t->be->host_visible) {
        t->grad_host_block = malloc(t->grad_bytes ? t->grad_bytes : 4);
        if (!t->grad_host_block) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        host = t->grad_host_block;
    }
    int k = 0;
    for (int32_t li = 0; li < nl; li++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            qlr_lora_module *mod = qlr_lora_get(t->lora, li, (qlr_linear_id)i);
            if (!mod) continue;
            size_t s = (size_t)li * QLR_LIN_COUNT + (size_t)i;
            int64_t na = (int64_t)t->lora->r * mod->in, nb = (int64_t)mod->out * t->lora->r;
            t->grad_host[k] = host + (t->ldev->da[s] - t->ldev->grad);
            t->param[k] = mod->a;
            t->numel[k] = na;
            QLR_TRY(qlr_adamw_state_init(&t->opt[k], na, o->adam_8bit));
            k++;
            t->grad_host[k] = host + (t->ldev->db[s] - t->ldev->grad);
            t->param[k] = mod->b;
            t->numel[k] = nb;
            QLR_TRY(qlr_adamw_state_init(&t->opt[k], nb, o->adam_8bit));
            k++;
        }
    t->n_tensors = k;

    qlr_train_params tp = qlr_train_params_default();
    uint64_t max_tokens = (uint64_t)o->micro_batch_size * o->sequence_len;
    if (max_tokens > INT32_MAX) return qlr_errorf(QLR_ERR_RANGE, "micro_batch_size * sequence_len is too large");
    tp.max_tokens = (int32_t)max_tokens;
    tp.max_seq_len = (int32_t)o->sequence_len;
    tp.checkpointing = o->gradient_checkpointing;
    tp.lora_dropout = (float)o->lora_dropout;
    if (tp.ce_chunk > tp.max_tokens) tp.ce_chunk = tp.max_tokens;
    QLR_TRY(qlr_train_ctx_create(t->m, &tp, &t->ctx));

    t->mb = calloc(o->grad_accum, sizeof *t->mb);
    if (!t->mb) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");

    uint64_t per_epoch = qlr_batcher_batches_per_epoch(t->train_b);
    if (o->max_steps) t->total_steps = o->max_steps;
    else {
        double micro_total = ceil(o->num_epochs * (double)per_epoch);
        t->total_steps = (uint64_t)ceil(micro_total / o->grad_accum);
        if (t->total_steps < 1) t->total_steps = 1;
    }
    t->sched.type = (qlr_lr_schedule_type)o->lr_schedule;
    t->sched.base_lr = o->lr;
    t->sched.total_steps = (int64_t)t->total_steps;
    t->sched.warmup_steps = (int64_t)o->warmup_steps;
    t->sched.warmup_ratio = o->warmup_ratio;
    t->sched.min_lr_ratio = o->min_lr_ratio;
    t->rng = qlr_data_rng_seed(o->seed, TRAINER_RNG_STREAM, 0);
    return QLR_OK;
}

/* ------------------------------------------------------------------ checkpoints */

static void fill_meta(const trainer *t, qlr_ckpt_meta *m, double elapsed) {
    memset(m, 0, sizeof *m);
    qlr_data_cursor c = qlr_batcher_cursor(t->train_b);
    m->step = t->step;
    m->epoch = c.epoch;
    m->batch = c.batch;
    m->rng = t->rng;
    m->tokens_seen = t->tokens_seen;
    m->elapsed = elapsed;
    snprintf(m->base_model, sizeof m->base_model, "%s", t->o->base_model);
    m->lora_r = t->o->lora_r;
    m->lora_targets = t->o->lora_targets;
    m->sequence_len = t->o->sequence_len;
}

static qlr_status save_checkpoint(trainer *t, double elapsed) {
    qlr_ckpt_writer w;
    QLR_TRY(qlr_ckpt_begin(&w, t->o->output_dir, t->step));
    char adir[4200];
    snprintf(adir, sizeof adir, "%s/%s", w.dir, QLR_RUN_ADAPTER_DIR);
    QLR_TRY(qlr_lora_save_peft(t->lora, adir));
    QLR_TRY(qlr_ckpt_add_file(&w, QLR_RUN_ADAPTER_DIR "/adapter_config.json"));
    QLR_TRY(qlr_ckpt_add_file(&w, QLR_RUN_ADAPTER_DIR "/adapter_model.safetensors"));
    size_t n = qlr_adamw_states_size(t->opt, t->n_tensors), written = 0;
    if (!n) return qlr_errorf(QLR_ERR_NOMEM, "optimizer state size overflows");
    uint8_t *buf = malloc(n);
    if (!buf) return qlr_errorf(QLR_ERR_NOMEM, "out of memory (%zu bytes of optimizer state)", n);
    qlr_status st = qlr_adamw_states_write(t->opt, t->n_tensors, buf, n, &written);
    if (st == QLR_OK) st = qlr_ckpt_add_buffer(&w, "optimizer.bin", buf, written);
    free(buf);
    QLR_TRY(st);
    const char *y = t->o->recipe_yaml ? t->o->recipe_yaml : "";
    QLR_TRY(qlr_ckpt_add_buffer(&w, "recipe.yaml", y, strlen(y)));
    qlr_ckpt_meta meta;
    fill_meta(t, &meta, elapsed);
    QLR_TRY(qlr_ckpt_commit(&w, &meta));
    snprintf(t->last_ckpt, sizeof t->last_ckpt, "%s", w.dir);
    t->last_ckpt_step = t->step;
    QLR_TRY(qlr_ckpt_rotate(t->o->output_dir, t->o->save_total_limit));
    return QLR_OK;
}

static qlr_status resume_from(trainer *t, const char *dir) {
    qlr_ckpt_meta meta, now;
    qlr_ckpt_file files[QLR_CKPT_MAX_FILES];
    int nf = 0;
    QLR_TRY(qlr_ckpt_open(dir, &meta, files, &nf));
    fill_meta(t, &now, 0);
    QLR_TRY(qlr_ckpt_check_compatible(dir, &meta, &now));
    char adir[4200];
    snprintf(adir, sizeof adir, "%s/%s", dir, QLR_RUN_ADAPTER_DIR);
    qlr_lora_base base;
    qlr_lora_base_from_config(&t->m->cfg, &base);
    qlr_lora *saved = NULL;
    QLR_TRY(qlr_lora_load_peft(adir, &base, &saved));
    qlr_status st = QLR_OK;
    for (int32_t li = 0; li < t->m->cfg.n_layers && st == QLR_OK; li++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            qlr_lora_module *mine = qlr_lora_get(t->lora, li, (qlr_linear_id)i);
            const qlr_lora_module *s = qlr_lora_get_const(saved, li, (qlr_linear_id)i);
            if (!mine && !s) continue;
            if (!mine || !s || mine->in != s->in || mine->out != s->out || saved->r != t->lora->r) {
                st = qlr_errorf(QLR_ERR_INVALID, "cannot resume from %s: its adapter has a different layout at "
                                "layer %d %s", dir, li, qlr_linear_hf_name((qlr_linear_id)i));
                break;
            }
            memcpy(mine->a, s->a, sizeof(float) * (size_t)t->lora->r * (size_t)s->in);
            memcpy(mine->b, s->b, sizeof(float) * (size_t)s->out * (size_t)t->lora->r);
        }
    qlr_lora_free(saved);
    QLR_TRY(st);
    uint8_t *buf;
    size_t n;
    QLR_TRY(qlr_ckpt_read(dir, files, nf, "optimizer.bin", &buf, &n));
    char what[4300];
    snprintf(what, sizeof what, "%s/optimizer.bin", dir);
    st = qlr_adamw_states_read(t->opt, t->n_tensors, buf, n, what);
    free(buf);
    if (st) return qlr_error_prefix("cannot resume from %s (was the optimizer changed?)", dir);
    QLR_TRY(qlr_lora_dev_upload(t->ldev, t->lora));
    qlr_data_cursor c = {meta.epoch, meta.batch};
    QLR_TRY(qlr_batcher_seek(t->train_b, c));
    t->step = t->start_step = meta.step;
    t->rng = meta.rng;
    t->tokens_seen = meta.tokens_seen;
    t->elapsed_before = meta.elapsed;
    snprintf(t->last_ckpt, sizeof t->last_ckpt, "%s", dir);
    t->last_ckpt_step = meta.step;
    return QLR_OK;
}

/* ------------------------------------------------------------------ metrics.jsonl */

/* On resume keeps the lines of steps <= `upto` (an interrupted run may have logged beyond its
 * last checkpoint); on a fresh start empties the file. */
static qlr_status metrics_prepare(trainer *t, uint64_t upto, int resumed) {
    snprintf(t->metrics_path, sizeof t->metrics_path, "%s/metrics.jsonl", t->o->output_dir);
    if (!resumed || !qlr_path_exists(t->metrics_path))
        return qlr_write_atomic(t->metrics_path, "", 0);
    char *text;
    size_t len;
    QLR_TRY(qlr_file_read_all(t->metrics_path, (size_t)1 << 30, &text, &len));
    char *out = malloc(len + 1);
    if (!out) {
        free(text);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    size_t used = 0;
    for (char *line = text; line < text + len;) {
        char *nl = memchr(line, '\n', (size_t)(text + len - line));
        size_t ll = nl ? (size_t)(nl - line) : (size_t)(text + len - line);
        json_t *j = json_loadb(line, ll, 0, NULL);
        json_t *s = j ? json_object_get(j, "step") : NULL;
        if (json_is_integer(s) && (uint64_t)json_integer_value(s) <= upto) {
            memcpy(out + used, line, ll);
            used += ll;
            out[used++] = '\n';
        }
        json_decref(j);
        line += ll + (nl ? 1 : 0);
    }
    qlr_status st = qlr_write_atomic(t->metrics_path, out, used);
    free(out);
    free(text);
    return st;
}

static qlr_status metrics_append(trainer *t, json_t *obj) {
    char *line = json_dumps(obj, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
    if (!line) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    FILE *f = fopen(t->metrics_path, "ab");
    if (!f) {
        free(line);
        return qlr_errorf(QLR_ERR_IO, "%s: cannot open: %s", t->metrics_path, strerror(errno));
    }
    int ok = fprintf(f, "%s\n", line) > 0;
    ok &= fclose(f) == 0;
    free(line);
    return ok ? QLR_OK : qlr_errorf(QLR_ERR_IO, "%s: write failed", t->metrics_path);
}

/* ------------------------------------------------------------------ eval */

static qlr_status eval_loss(trainer *t, double *out) {
    *out = NAN;
    if (!t->val_b) return QLR_OK;
    qlr_data_cursor c0 = {0, 0};
    QLR_TRY(qlr_batcher_seek(t->val_b, c0));
    uint64_t nb = qlr_batcher_batches_per_epoch(t->val_b);
    double sum = 0;
    int64_t cnt = 0;
    for (uint64_t i = 0; i < nb; i++) {
        qlr_data_batch b;
        QLR_TRY(qlr_batcher_next(t->val_b, &b));
        QLR_TRY(micro_from_batch(&t->eval_mb, &b));
        if (t->eval_mb.n == 0) continue;
        qlr_train_batch tb = micro_view(&t->eval_mb);
        double ls;
        int64_t nt;
        QLR_TRY(qlr_train_eval(t->ctx, t->set, &tb, &ls, &nt));
        sum += ls;
        cnt += nt;
    }
    *out = cnt ? sum / (double)cnt : NAN;
    return QLR_OK;
}

/* ------------------------------------------------------------------ one step */

typedef struct step_out {
    double loss, grad_norm, lr;
    uint64_t tokens;
    int nonfinite;   /* 1: loss NaN/Inf, 2: gradient norm NaN/Inf */
} step_out;

static qlr_status train_step(trainer *t, step_out *so) {
    const qlr_train_opts *o = t->o;
    memset(so, 0, sizeof *so);
    int64_t targets = 0;
    for (uint32_t k = 0; k < o->grad_accum; k++) {
        qlr_data_batch b;
        QLR_TRY(qlr_batcher_next(t->train_b, &b));
        QLR_TRY(micro_from_batch(&t->mb[k], &b));
        targets += t->mb[k].n_targets;
        so->tokens += (uint64_t)t->mb[k].n;
    }
    float scale = targets > 0 ? (float)(1.0 / (double)targets) : 0.0f;
    QLR_TRY(t->be->mem.memset0(t->be, t->ldev->grad, t->grad_bytes));
    double loss_sum = 0;
    int64_t counted = 0;
    for (uint32_t k = 0; k < o->grad_accum; k++) {
        uint64_t dseed = qlr_data_rng_next(&t->rng);
        if (t->mb[k].n == 0) continue;
        qlr_train_batch tb = micro_view(&t->mb[k]);
        double ls;
        int64_t nt;
        QLR_TRY(qlr_train_fwd_bwd(t->ctx, t->set, &tb, scale, t->ldev->da, t->ldev->db, dseed, &ls,
                                  &nt));
        loss_sum += ls;
        counted += nt;
    }
    QLR_TRY(t->be->mem.sync(t->be));
    so->loss = counted ? loss_sum / (double)counted : 0.0;
    so->lr = qlr_lr_at(&t->sched, (int64_t)t->step);
    if (!isfinite(so->loss)) {
        so->nonfinite = 1;
        return QLR_OK;
    }
    if (!t->be->host_visible)
        QLR_TRY(t->be->mem.d2h(t->be, t->grad_host_block, t->ldev->grad, t->grad_bytes));
    int nonfinite = 0;
    so->grad_norm = qlr_clip_grad_norm(t->grad_host, t->numel, t->n_tensors, (float)o->max_grad_norm, &nonfinite);
    if (nonfinite) {
        so->nonfinite = 2;
        return QLR_OK;
    }
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    hp.lr = (float)so->lr;
    hp.beta1 = (float)o->beta1;
    hp.beta2 = (float)o->beta2;
    hp.eps = (float)o->eps;
    hp.weight_decay = (float)o->weight_decay;
    hp.gnorm_scale = 1.0f;
    for (int i = 0; i < t->n_tensors; i++) QLR_TRY(qlr_adamw_step(&t->opt[i], t->param[i], t->grad_host[i], &hp));
    QLR_TRY(qlr_lora_dev_upload(t->ldev, t->lora));
    t->step++;
    t->tokens_seen += so->tokens;
    return QLR_OK;
}

/* ------------------------------------------------------------------ the run */

static qlr_status export_final(trainer *t, qlr_train_result *res) {
    snprintf(res->adapter_dir, sizeof res->adapter_dir, "%s/%s", t->o->output_dir, QLR_RUN_ADAPTER_DIR);
    QLR_TRY(qlr_lora_save_peft(t->lora, res->adapter_dir));
    if (t->o->export_gguf) {
        snprintf(res->adapter_gguf, sizeof res->adapter_gguf, "%s/adapter_model.gguf", t->o->output_dir);
        qlr_status st = qlr_lora_save_gguf(t->lora, res->adapter_gguf);
        if (st) {
            QLR_LOGW("GGUF export skipped: %s", qlr_error_msg());
            qlr_error_clear();
            res->adapter_gguf[0] = 0;
        }
    }
    return QLR_OK;
}

static void fmt_lr(char *buf, size_t n, double lr) { snprintf(buf, n, "%.3g", lr); }

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
        if (o->resume_dir) resume_dir = strdup(o->resume_dir);
        else if ((st = qlr_ckpt_find_latest(o->output_dir, &resume_dir))) {
            qlr_error_prefix("--resume");
            return st;
        }
        if (!resume_dir) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    if ((st = qlr_mkdir_p(o->output_dir))) goto done;
    if ((st = open_backend(o->device, o->threads, &t->be))) goto done;
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = o->progress;
    if ((st = qlr_model_load(o->base_model, t->be, &lp, &t->m))) goto done;
    if ((st = load_data(t))) goto done;
    if (qlr_tokenizer_n_vocab(t->tok) > t->m->cfg.n_vocab) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: the tokenizer has %d tokens but the model only %d", o->base_model,
                        qlr_tokenizer_n_vocab(t->tok), t->m->cfg.n_vocab);
        goto done;
    }
    if ((st = setup_params(t))) goto done;
    if (resume_dir) {
        if ((st = resume_from(t, resume_dir))) goto done;
        QLR_LOGI("resumed from %s at step %" PRIu64, resume_dir, t->step);
        res->resumed_from = t->step;
    }
    if ((st = metrics_prepare(t, t->step, resume_dir != NULL))) goto done;
    res->total_steps = t->total_steps;
    copy_str(res->last_checkpoint, sizeof res->last_checkpoint, t->last_ckpt);
    QLR_LOGI("training: %" PRIu64 " steps of %u x %u micro-batches (%u rows of %u tokens), lr %g, %s, %d adapted "
             "tensors (%" PRIu64 " parameters), %s backend, %d threads",
             t->total_steps, o->grad_accum, o->micro_batch_size, o->micro_batch_size, o->sequence_len, o->lr,
             o->adam_8bit ? "AdamW 8-bit" : "AdamW 32-bit", t->n_tensors, t->lora->n_params, t->be->name,
             qlr_n_threads());

    if (t->step >= t->total_steps) QLR_LOGW("the checkpoint is at step %" PRIu64 " of %" PRIu64 ": nothing left to train",
                                            t->step, t->total_steps);
    double t_loop = qlr_now();
    if (o->progress) {
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
        res->final_loss = so.loss;
        double tps = dt > 0 ? (double)so.tokens / dt : 0;
        double ev = NAN;
        if (t->val_b && o->eval_steps && t->step % o->eval_steps == 0) {
            if ((st = eval_loss(t, &ev))) goto done;
            res->eval_loss = ev;
            last_eval_step = t->step;
        }
        int last = t->step == t->total_steps;
        if (last && t->val_b && last_eval_step != t->step) {
            if ((st = eval_loss(t, &ev))) goto done;
            res->eval_loss = ev;
            last_eval_step = t->step;
        }
        if (t->step % o->logging_steps == 0 || last || !isnan(ev)) {
            json_t *j = json_object();
            json_object_set_new(j, "step", json_integer((json_int_t)t->step));
            json_object_set_new(j, "loss", json_real(so.loss));
            json_object_set_new(j, "lr", json_real(so.lr));
            json_object_set_new(j, "grad_norm", json_real(so.grad_norm));
            json_object_set_new(j, "tokens_per_s", json_real(round(tps * 10) / 10));
            json_object_set_new(j, "tokens", json_integer((json_int_t)t->tokens_seen));
            if (!isnan(ev)) json_object_set_new(j, "eval_loss", json_real(ev));
            st = metrics_append(t, j);
            json_decref(j);
            if (st) goto done;
            if (!isnan(ev)) {
                qlr_progress_clear_line();
                QLR_LOGI("step %" PRIu64 ": eval loss %.4f (train loss %.4f)", t->step, ev, so.loss);
            }
        }
        double elapsed = t->elapsed_before + (qlr_now() - t_loop);
        int stop = (o->stop_flag && *o->stop_flag) || (o->stop_after_step && t->step >= o->stop_after_step);
        if (o->on_step && o->on_step(o->on_step_ud, t->step, t->lora)) stop = 1;
        if (o->on_step && (st = qlr_lora_dev_upload(t->ldev, t->lora))) goto done;
        if ((o->save_steps && t->step % o->save_steps == 0) || last || stop) {
            if ((st = save_checkpoint(t, elapsed))) goto done;
            copy_str(res->last_checkpoint, sizeof res->last_checkpoint, t->last_ckpt);
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
        if (t->step > t->start_step && t->last_ckpt_step != t->step) {
            if ((st = save_checkpoint(t, t->elapsed_before + res->seconds))) goto done;
            copy_str(res->last_checkpoint, sizeof res->last_checkpoint, t->last_ckpt);
        }
        if ((st = export_final(t, res))) goto done;
    }
    QLR_LOGD("trainer wall time %.1fs", qlr_now() - t_start);
done:
    qlr_progress_end(bar);
    free(resume_dir);
    trainer_free(t);
    return st;
}

qlr_status qlr_train_data_sources(const qlr_train_opts *o, const char *data_path,
                                  qlr_data_source **src, uint32_t *n) {
    uint32_t k = data_path ? 1 : o->n_datasets;
    *src = calloc(k ? k : 1, sizeof **src);
    *n = k;
    if (!*src) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    for (uint32_t i = 0; i < k; i++) {
        const qlr_train_dataset *d = &o->datasets[i];
        qlr_data_source *s = &(*src)[i];
        s->path = data_path ? data_path : d->path;
        s->format = (qlr_data_format)d->format;
        s->field = d->field;
        s->field_messages = d->field_messages;
        s->field_role = d->field_role;
        s->field_content = d->field_content;
        s->skip_bad_lines = d->skip_bad_lines;
    }
    return QLR_OK;
}

void qlr_train_data_params(const qlr_train_opts *o, qlr_data_params *dp) {
    *dp = qlr_data_params_default();
    dp->sequence_len = o->sequence_len;
    dp->train_on_inputs = o->train_on_inputs;
    dp->drop_long = o->drop_long;
}

void qlr_train_batch_params(const qlr_train_opts *o, int shuffle, qlr_batch_params *bp) {
    *bp = qlr_batch_params_default();
    bp->micro_batch_size = o->micro_batch_size;
    bp->sequence_len = o->sequence_len;
    bp->packing = o->sample_packing;
    bp->shuffle = shuffle;
    bp->seed = o->seed;
}
