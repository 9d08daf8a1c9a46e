/* train/trainer_recipe.c: recipe -> qlr_train_opts, and the memory-plan check before a run.
 * The loop in trainer.c works from qlr_train_opts only, so tests drive it without a recipe
 * file. Does not open models or data. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/dataset.h"
#include "data/pack.h"
#include "model/backprop.h"
#include "train/plan.h"
#include "train/recipe.h"
#include "train/trainer.h"

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

/* The file a dataset path names (resolved against the recipe's folder): a file as is, a folder
 * means <split>.jsonl (or .jsonl.gz) inside it. `key` ("datasets.0") and the recipe's record of
 * where it was given make the message of a folder without that file. */
static qlr_status dataset_file(const qlr_recipe *r, const char *key, const char *resolved, const char *split,
                               char **out) {
    char pkey[96];
    snprintf(pkey, sizeof pkey, "%s.path", key);
    if (!qlr_is_dir(resolved)) {
        *out = strdup(resolved);
        return *out ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    static const char *ext[] = {".jsonl", ".jsonl.gz"};
    for (int i = 0; i < 2; i++) {
        char *p = NULL;
        if (asprintf(&p, "%s/%s%s", resolved, split, ext[i]) < 0) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        if (qlr_path_exists(p)) {
            *out = p;
            return QLR_OK;
        }
        free(p);
    }
    return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: %s: %s is a folder without %s.jsonl or %s.jsonl.gz (%s.split names the file)",
                      qlr_recipe_where(r, pkey), pkey, resolved, split, split, key);
}

/* One recipe dataset list into run options (paths resolved, files checked). */
static qlr_status datasets_from_recipe(const qlr_recipe *r, const char *list_key, const qlr_recipe_dataset *ds,
                                       uint32_t n, qlr_train_dataset **out) {
    *out = calloc(n ? n : 1, sizeof **out);
    if (!*out) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        const qlr_recipe_dataset *d = &ds[i];
        qlr_train_dataset *t = &(*out)[i];
        char path[4096], key[64];
        snprintf(key, sizeof key, "%s.%u", list_key, i);
        QLR_TRY(qlr_recipe_resolve(r, d->path, path, sizeof path));
        QLR_TRY(dataset_file(r, key, path, d->split ? d->split : "train", &t->path));
        t->format = (int)d->type;
        t->field = dup_or_null(d->field);
        t->field_messages = dup_or_null(d->field_messages);
        t->field_role = dup_or_null(d->message_field_role);
        t->field_content = dup_or_null(d->message_field_content);
        t->skip_bad_lines = d->on_bad_line == QLR_ON_BAD_LINE_SKIP;
        if ((d->field && !t->field) || (d->field_messages && !t->field_messages) ||
            (d->message_field_role && !t->field_role) || (d->message_field_content && !t->field_content))
            return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    return QLR_OK;
}

qlr_status qlr_train_opts_from_recipe(const qlr_recipe *r, qlr_train_opts *o) {
    memset(o, 0, sizeof *o);
    char path[4096];
    qlr_status st = QLR_OK;
    o->recipe_path = dup_or_null(r->source);
    if ((st = qlr_recipe_to_yaml(r, 1, &o->recipe_yaml))) goto fail;
    if ((st = qlr_recipe_resolve(r, r->base_model, path, sizeof path))) goto fail;
    char *canon = realpath(path, NULL);
    o->base_model = canon ? canon : strdup(path);
    o->chat_template = dup_or_null(r->chat_template ? r->chat_template : "tokenizer_default");
    if (!o->base_model || !o->chat_template) goto nomem;
    o->n_datasets = r->n_datasets;
    if ((st = datasets_from_recipe(r, "datasets", r->datasets, r->n_datasets, &o->datasets))) goto fail;
    o->n_test_datasets = r->n_test_datasets;
    if ((st = datasets_from_recipe(r, "test_datasets", r->test_datasets, r->n_test_datasets, &o->test_datasets)))
        goto fail;
    o->sequence_len = r->sequence_len;
    o->sample_packing = r->sample_packing;
    o->drop_long = r->truncation == QLR_TRUNCATION_DROP;
    o->train_on_inputs = r->train_on_inputs;
    o->val_set_size = r->val_set_size;
    o->micro_batch_size = r->micro_batch_size;
    o->grad_accum = r->gradient_accumulation_steps;
    o->num_epochs = r->num_epochs;
    o->max_steps = r->max_steps;
    o->lr = r->learning_rate;
    /* the recipe's scheduler values are optim's qlr_lr_schedule_type values (constant 0,
     * linear 1, cosine 2) */
    o->lr_schedule = (int)r->lr_scheduler;
    o->min_lr_ratio = r->lr_scheduler == QLR_LR_COSINE ? r->cosine_min_lr_ratio : 0;
    o->warmup_steps = r->warmup_steps;
    o->warmup_ratio = r->warmup_ratio;
    o->weight_decay = r->weight_decay;
    o->max_grad_norm = r->max_grad_norm;
    o->beta1 = r->adam_beta1;
    o->beta2 = r->adam_beta2;
    o->eps = r->adam_epsilon;
    o->adam_8bit = qlr_optimizer_is_8bit(r->optimizer);
    o->lora_r = r->lora_r;
    o->lora_alpha = r->lora_alpha;
    o->lora_dropout = r->lora_dropout;
    o->lora_targets = qlr_recipe_lora_targets(r);
    o->rslora = r->peft_use_rslora;
    o->eval_steps = r->eval_steps;
    o->save_steps = r->save_steps;
    o->logging_steps = r->logging_steps ? r->logging_steps : 1;
    o->report_tensorboard = r->report_to == QLR_REPORT_TENSORBOARD;
    o->save_total_limit = r->save_total_limit;
    if ((st = qlr_recipe_resolve(r, r->output_dir, path, sizeof path))) goto fail;
    o->output_dir = strdup(path);
    o->seed = r->seed;
    /* auto is resolved by the plan (qlr_train_opts_load); without one, today's default */
    o->gradient_checkpointing =
        r->gradient_checkpointing == QLR_CKPT_AUTO ? QLR_CKPT_ON : r->gradient_checkpointing;
    o->device = strdup(r->device == QLR_RECIPE_DEVICE_CPU ? "cpu" : r->device == QLR_RECIPE_DEVICE_CUDA ? "cuda" : "auto");
    o->progress = 1;
    o->export_gguf = 1;
    if (!o->output_dir || !o->device) goto nomem;
    return QLR_OK;
nomem:
    st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
fail:
    qlr_train_opts_free(o);
    return st;
}

qlr_status qlr_train_opts_check_data(const qlr_recipe *r, const qlr_train_opts *o) {
    for (int l = 0; l < 2; l++) {
        const qlr_train_dataset *ds = l ? o->test_datasets : o->datasets;
        const qlr_recipe_dataset *rd = l ? r->test_datasets : r->datasets;
        uint32_t n = l ? o->n_test_datasets : o->n_datasets;
        for (uint32_t i = 0; i < n; i++) {
            if (qlr_path_exists(ds[i].path)) continue;
            char key[96];
            snprintf(key, sizeof key, "%s.%u.path", l ? "test_datasets" : "datasets", i);
            return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: %s: %s does not exist%s", qlr_recipe_where(r, key), key,
                              ds[i].path,
                              rd[i].path[0] == '/' ? "" : " (relative paths are resolved against the recipe's folder)");
        }
    }
    return QLR_OK;
}

qlr_status qlr_train_opts_load(const char *recipe_path, const char *const *sets, int n_sets, qlr_train_opts *o) {
    memset(o, 0, sizeof *o);
    qlr_recipe r;
    QLR_TRY(qlr_recipe_load(recipe_path, sets, n_sets, &r));
    qlr_model_shape shape;
    qlr_plan plan;
    memset(&plan, 0, sizeof plan);
    qlr_status st = qlr_model_shape_for_recipe(&r, &shape);
    if (st == QLR_ERR_NOT_FOUND) qlr_error_prefix("%s", qlr_recipe_where(&r, "base_model"));
    if (st == QLR_OK && shape.source == QLR_SHAPE_PRESET) {
        char path[4096];
        if (qlr_recipe_resolve(&r, r.base_model, path, sizeof path) == QLR_OK && !qlr_path_exists(path))
            st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: base_model: %s not found%s", qlr_recipe_where(&r, "base_model"), path,
                            strstr(path, ".cache/models") ? " (scripts/setup.sh downloads the demo model)" : "");
    }
    if (st == QLR_OK) st = qlr_plan_build(&r, &shape, &plan);
    if (st == QLR_OK && r.vram_budget) {
        st = qlr_plan_check(&plan, &r, r.vram_budget);
        if (st) qlr_error_prefix("%s: the memory plan does not fit vram_budget (see `qlora plan %s`)", recipe_path,
                                 recipe_path);
    }
    int mode = plan.ckpt_mode;
    if (st == QLR_OK) {
        char line[256];
        qlr_plan_choice_line(&plan, &r, r.vram_budget, line, sizeof line);
        QLR_LOGI("memory plan: %s", line);
    }
    qlr_plan_free(&plan);
    if (st == QLR_OK) st = qlr_train_opts_from_recipe(&r, o);
    if (st == QLR_OK) o->gradient_checkpointing = mode;
    if (st == QLR_OK && (st = qlr_train_opts_check_data(&r, o))) qlr_train_opts_free(o);
    qlr_recipe_free(&r);
    return st;
}

void qlr_train_opts_free(qlr_train_opts *o) {
    if (!o) return;
    free(o->recipe_path);
    free(o->recipe_yaml);
    free(o->base_model);
    free(o->chat_template);
    qlr_train_dataset *lists[2] = {o->datasets, o->test_datasets};
    uint32_t counts[2] = {o->n_datasets, o->n_test_datasets};
    for (int l = 0; l < 2; l++) {
        for (uint32_t i = 0; lists[l] && i < counts[l]; i++) {
            qlr_train_dataset *t = &lists[l][i];
            free(t->path);
            free(t->field);
            free(t->field_messages);
            free(t->field_role);
            free(t->field_content);
        }
        free(lists[l]);
    }
    free(o->output_dir);
    free(o->device);
    free(o->resume_dir);
    memset(o, 0, sizeof *o);
}

static qlr_status train_sources(const qlr_train_dataset *ds, uint32_t n_ds, const char *data_path,
                                qlr_data_source **src, uint32_t *n);

qlr_status qlr_train_data_sources(const qlr_train_opts *o, const char *data_path,
                                  qlr_data_source **src, uint32_t *n) {
    return train_sources(o->datasets, o->n_datasets, data_path, src, n);
}

qlr_status qlr_train_test_sources(const qlr_train_opts *o, qlr_data_source **src, uint32_t *n) {
    return train_sources(o->test_datasets, o->n_test_datasets, NULL, src, n);
}

static qlr_status train_sources(const qlr_train_dataset *ds, uint32_t n_ds, const char *data_path,
                                qlr_data_source **src, uint32_t *n) {
    uint32_t k = data_path ? 1 : n_ds;
    *src = calloc(k ? k : 1, sizeof **src);
    *n = k;
    if (!*src) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    for (uint32_t i = 0; i < k; i++) {
        const qlr_train_dataset *d = &ds[i];
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


qlr_status qlr_train_workspace_params(uint32_t micro_batch_size, uint32_t sequence_len,
                                      int ckpt_mode, double lora_dropout, qlr_train_params *tp) {
    *tp = qlr_train_params_default();
    uint64_t max_tokens = (uint64_t)micro_batch_size * sequence_len;
    if (max_tokens > INT32_MAX || max_tokens < 1)
        return qlr_errorf(QLR_ERR_RANGE, "micro_batch_size * sequence_len = %llu tokens: must be "
                          "1..%d", (unsigned long long)max_tokens, INT32_MAX);
    tp->max_tokens = (int32_t)max_tokens;
    tp->max_seq_len = (int32_t)sequence_len;
    tp->checkpointing = ckpt_mode != QLR_CKPT_OFF; /* auto, unresolved: checkpointing */
    tp->offload = ckpt_mode == QLR_CKPT_OFFLOAD;
    tp->mlp_chunk = tp->offload ? QLR_PLAN_MLP_CHUNK : 0;
    if (tp->offload) tp->ce_chunk = QLR_PLAN_CE_CHUNK_OFFLOAD; /* long context: every MiB counts */
    tp->lora_dropout = (float)lora_dropout;
    if (tp->ce_chunk > tp->max_tokens) tp->ce_chunk = tp->max_tokens;
    return QLR_OK;
}
