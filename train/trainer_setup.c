/* train/trainer_setup.c: everything a run needs before its first step (see trainer_internal.h):
 * the backend (device auto = CUDA when present), the model, the tokenized and split data, the
 * adapter with its device side (fp32 masters, gradients and compute copies on the training
 * device), the optimizer states in device memory, the training workspace and the schedule. */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "train/trainer_internal.h"

void qlr_trainer_free(trainer *t) {
    qlr_train_ctx_free(t->ctx);
    qlr_trainable_free(t->be, &t->tr);
    qlr_dist_close(t->dist, 0);
    if (t->mb)
        for (uint32_t i = 0; i < t->n_micro; i++) qlr_micro_free(&t->mb[i]);
    free(t->mb);
    qlr_micro_free(&t->eval_mb);
    qlr_batcher_free(t->train_b);
    qlr_batcher_free(t->val_b);
    qlr_data_split_free(&t->split);
    qlr_dataset_free(t->ds);
    qlr_dataset_free(t->test_ds);
    free(t->test_idx);
    qlr_chat_template_free(t->tmpl);
    qlr_tokenizer_free(t->tok);
    qlr_model_free(t->m);
    qlr_backend_free(t->be);
}

qlr_status qlr_trainer_open_backend(const char *device, int threads, qlr_backend **be) {
    if (strcmp(device, "auto")) return qlr_backend_create(device, threads, be);
    if (qlr_backend_create("cuda", threads, be) == QLR_OK) return QLR_OK;
    QLR_LOGI("device auto: no CUDA backend available (%s); training on the CPU", qlr_error_msg());
    qlr_error_clear();
    return qlr_backend_create("cpu", threads, be);
}

/* Loads the recipe's test_datasets into t->test_ds (every example is validation). */
static qlr_status load_test_data(trainer *t, const qlr_data_params *dp) {
    qlr_data_source *src;
    uint32_t n_src;
    QLR_TRY(qlr_train_test_sources(t->o, &src, &n_src));
    qlr_status st = qlr_dataset_load(src, n_src, dp, t->tok, t->tmpl, &t->test_ds);
    free(src);
    QLR_TRY(st);
    size_t n = qlr_dataset_size(t->test_ds);
    if (!n) return qlr_errorf(QLR_ERR_INVALID, "test_datasets: no usable example in %s%s", t->o->test_datasets[0].path,
                              t->o->n_test_datasets > 1 ? " and the others" : "");
    t->test_idx = malloc(n * sizeof *t->test_idx);
    if (!t->test_idx) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) t->test_idx[i] = (uint32_t)i;
    return QLR_OK;
}

/* Tokenizer, datasets, split (or the test_datasets) and the two batchers. */
qlr_status qlr_trainer_load_data(trainer *t) {
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
    if (o->n_test_datasets) QLR_TRY(load_test_data(t, &dp));
    qlr_batch_params bp;
    qlr_train_batch_params(o, 1, &bp);
    QLR_TRY(qlr_batcher_create(t->ds, t->split.train, t->split.n_train, &bp, &t->train_b));
    bp.shuffle = 0;
    size_t n_val = t->test_ds ? qlr_dataset_size(t->test_ds) : t->split.n_val;
    if (t->test_ds) QLR_TRY(qlr_batcher_create(t->test_ds, t->test_idx, n_val, &bp, &t->val_b));
    else if (n_val) QLR_TRY(qlr_batcher_create(t->ds, t->split.val, n_val, &bp, &t->val_b));
    /* the model sees each micro-batch's examples back to back (qlr_micro_from_batch): the rows'
     * padding is never computed, so the efficiency only says how full sequence_len rows are */
    QLR_LOGI("split: %zu train, %zu validation examples%s; %llu micro-batches per epoch (rows %.1f%% full%s)",
             t->split.n_train, n_val, t->test_ds ? " (test_datasets)" : "",
             (unsigned long long)qlr_batcher_batches_per_epoch(t->train_b), 100.0 * qlr_batcher_efficiency(t->train_b),
             o->sample_packing ? ", packed" : "; padding is dropped before the model, it costs no compute");
    return QLR_OK;
}

void qlr_trainable_free(qlr_backend *be, qlr_trainable *tr) {
    qlr_adapter_slots_free(tr->slots);
    qlr_lora_dev_free(tr->ldev);
    if (tr->opt)
        for (int i = 0; i < tr->n_tensors; i++) qlr_adamw_state_destroy(be, &tr->opt[i]);
    free(tr->opt);
    if (tr->norm_acc) be->mem.free(be, tr->norm_acc);
    free(tr->param);
    free(tr->grad);
    free(tr->numel);
    qlr_lora_free(tr->lora);
    memset(tr, 0, sizeof *tr);
}

static qlr_status trainable_make(qlr_backend *be, const qlr_model_config *cfg,
                                 const qlr_train_opts *o, qlr_trainable *tr) {
    qlr_lora_base base;
    qlr_lora_base_from_config(cfg, &base);
    qlr_lora_params lp = qlr_lora_params_default();
    lp.r = (int32_t)o->lora_r;
    lp.alpha = o->lora_alpha;
    lp.dropout = o->lora_dropout;
    lp.use_rslora = o->rslora;
    lp.targets = o->lora_targets;
    lp.seed = o->seed;
    lp.base_model = o->base_model;
    QLR_TRY(qlr_lora_create(&base, &lp, &tr->lora));
    int32_t nl = cfg->n_layers;
    QLR_TRY(qlr_lora_dev_create(be, tr->lora, nl, 1, &tr->ldev));
    QLR_TRY(qlr_adapter_slots_create(be, nl, 1, &tr->slots));
    qlr_adapter_slots_put(tr->slots, 0, tr->ldev, 1.0f);
    QLR_TRY(qlr_adapter_slots_commit(tr->slots, 1, &tr->set));

    size_t nslots = (size_t)nl * QLR_LIN_COUNT;
    tr->param = calloc(2 * nslots, sizeof *tr->param);
    tr->grad = calloc(2 * nslots, sizeof *tr->grad);
    tr->numel = calloc(2 * nslots, sizeof *tr->numel);
    tr->opt = calloc(2 * nslots, sizeof *tr->opt);
    if (!tr->param || !tr->grad || !tr->numel || !tr->opt)
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    tr->grad_bytes = (size_t)tr->lora->n_params * sizeof(float);
    tr->norm_acc = be->mem.alloc(be, sizeof(double));
    if (!tr->norm_acc) return qlr_error_prefix("gradient-norm accumulator");
    /* tensors in the adapter's block order: A then B of each module; the device masters and the
     * gradients share that layout */
    int k = 0;
    for (int32_t li = 0; li < nl; li++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            const qlr_lora_module *mod = qlr_lora_get_const(tr->lora, li, (qlr_linear_id)i);
            if (!mod) continue;
            size_t s = (size_t)li * QLR_LIN_COUNT + (size_t)i;
            int64_t na = (int64_t)tr->lora->r * mod->in, nb = (int64_t)mod->out * tr->lora->r;
            tr->grad[k] = tr->ldev->da[s];
            tr->param[k] = tr->ldev->master + (tr->ldev->da[s] - tr->ldev->grad);
            tr->numel[k] = na;
            QLR_TRY(qlr_adamw_state_create(be, &tr->opt[k], na, o->adam_8bit));
            tr->n_tensors = ++k; /* what qlr_trainable_free destroys */
            tr->grad[k] = tr->ldev->db[s];
            tr->param[k] = tr->ldev->master + (tr->ldev->db[s] - tr->ldev->grad);
            tr->numel[k] = nb;
            QLR_TRY(qlr_adamw_state_create(be, &tr->opt[k], nb, o->adam_8bit));
            tr->n_tensors = ++k;
        }
    return QLR_OK;
}

qlr_status qlr_trainable_create(qlr_backend *be, const qlr_model_config *cfg,
                                const qlr_train_opts *o, qlr_trainable *tr) {
    memset(tr, 0, sizeof *tr);
    qlr_status st = trainable_make(be, cfg, o, tr);
    if (st) qlr_trainable_free(be, tr);
    return st;
}

/* What the adapter records of its training (adapters/lora.h): the base's name and NF4 store
 * hash, and the prompt format when every dataset renders prompts the same way (chat and
 * sharegpt: the chat template, with its default system message; alpaca; completion). */
static qlr_status record_identity(trainer *t) {
    const qlr_train_opts *o = t->o;
    qlr_lora *l = t->tr.lora;
    qlr_lora_base ident;
    qlr_lora_base_from_loaded(t->m, &ident);
    snprintf(l->base.name, sizeof l->base.name, "%s", ident.name);
    l->base.nf4_hash = ident.nf4_hash;
    const char *fmt = NULL, *sys = NULL;
    int mixed = 0;
    for (uint32_t i = 0; i < o->n_datasets; i++) {
        const char *f = NULL, *s = NULL;
        switch ((qlr_data_format)o->datasets[i].format) {
        case QLR_DATA_CHAT:
        case QLR_DATA_SHAREGPT:
            if (t->tmpl) {
                f = qlr_chat_template_name(t->tmpl);
                s = qlr_chat_template_default_system(t->tmpl);
            }
            break;
        case QLR_DATA_ALPACA: f = "alpaca"; break;
        case QLR_DATA_COMPLETION: f = "completion"; break;
        default: break; /* input_output, pretokenized: the data is its own format */
        }
        if (!f || (i && (!fmt || strcmp(f, fmt)))) mixed = 1;
        if (!i) fmt = f, sys = s;
    }
    if (mixed || !fmt) {
        QLR_LOGI("the datasets use %s: the adapter records no prompt format",
                 mixed && fmt ? "several prompt formats" : "their own token layout");
        return QLR_OK;
    }
    return qlr_lora_set_prompt(l, fmt, sys);
}

qlr_status qlr_trainer_setup_params(trainer *t) {
    const qlr_train_opts *o = t->o;
    QLR_TRY(qlr_trainable_create(t->be, &t->m->cfg, o, &t->tr));
    QLR_TRY(record_identity(t));
    qlr_train_params tp;
    QLR_TRY(qlr_train_workspace_params(o->micro_batch_size, o->sequence_len,
                                       o->gradient_checkpointing, o->lora_dropout, &tp));
    QLR_TRY(qlr_train_ctx_create(t->m, &tp, &t->ctx));

    t->n_micro = o->grad_accum * (uint32_t)qlr_dist_world(t->dist);
    t->mb = calloc(t->n_micro, sizeof *t->mb);
    if (!t->mb) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");

    uint64_t per_epoch = qlr_batcher_batches_per_epoch(t->train_b);
    if (o->max_steps) t->total_steps = o->max_steps;
    else {
        double micro_total = ceil(o->num_epochs * (double)per_epoch);
        t->total_steps = (uint64_t)ceil(micro_total / t->n_micro);
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

