/* train/trainer_ckpt.c: a run's checkpoints (train/checkpoint.h does the files and the manifest):
 * what goes in (the adapter as PEFT from the host masters, the optimizer states byte for byte,
 * the RNG and the data cursor, the effective recipe), resuming bit-identically from one, and
 * metrics.jsonl (cut back to the checkpoint's step on resume). */
#define _GNU_SOURCE
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "train/trainer_internal.h"

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

qlr_status qlr_trainer_save_checkpoint(trainer *t, double elapsed) {
    qlr_ckpt_writer w;
    QLR_TRY(qlr_ckpt_begin(&w, t->o->output_dir, t->step));
    char adir[4200];
    snprintf(adir, sizeof adir, "%s/%s", w.dir, QLR_RUN_ADAPTER_DIR);
    QLR_TRY(qlr_lora_dev_download(t->tr.ldev, t->tr.lora));
    QLR_TRY(qlr_lora_save_peft(t->tr.lora, adir));
    QLR_TRY(qlr_ckpt_add_file(&w, QLR_RUN_ADAPTER_DIR "/adapter_config.json"));
    QLR_TRY(qlr_ckpt_add_file(&w, QLR_RUN_ADAPTER_DIR "/adapter_model.safetensors"));
    size_t n = qlr_adamw_states_size(t->tr.opt, t->tr.n_tensors), written = 0;
    if (!n) return qlr_errorf(QLR_ERR_NOMEM, "optimizer state size overflows");
    uint8_t *buf = malloc(n);
    if (!buf) return qlr_errorf(QLR_ERR_NOMEM, "out of memory (%zu bytes of optimizer state)", n);
    qlr_status st = qlr_adamw_states_save(t->be, t->tr.opt, t->tr.n_tensors, buf, n, &written);
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

qlr_status qlr_trainer_resume(trainer *t, const char *dir) {
    qlr_ckpt_meta meta, now;
    qlr_ckpt_file files[QLR_CKPT_MAX_FILES];
    int nf = 0;
    QLR_TRY(qlr_ckpt_open(dir, &meta, files, &nf));
    fill_meta(t, &now, 0);
    QLR_TRY(qlr_ckpt_check_compatible(dir, &meta, &now));
    char adir[4200];
    snprintf(adir, sizeof adir, "%s/%s", dir, QLR_RUN_ADAPTER_DIR);
    qlr_lora_base base;
    qlr_lora_base_from_loaded(t->m, &base);
    qlr_lora *saved = NULL;
    QLR_TRY(qlr_lora_load_peft(adir, &base, &saved));
    qlr_status st = QLR_OK;
    for (int32_t li = 0; li < t->m->cfg.n_layers && st == QLR_OK; li++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            qlr_lora_module *mine = qlr_lora_get(t->tr.lora, li, (qlr_linear_id)i);
            const qlr_lora_module *s = qlr_lora_get_const(saved, li, (qlr_linear_id)i);
            if (!mine && !s) continue;
            if (!mine || !s || mine->in != s->in || mine->out != s->out || saved->r != t->tr.lora->r) {
                st = qlr_errorf(QLR_ERR_INVALID, "cannot resume from %s: its adapter has a different layout at "
                                "layer %d %s", dir, li, qlr_linear_hf_name((qlr_linear_id)i));
                break;
            }
            memcpy(mine->a, s->a, sizeof(float) * (size_t)t->tr.lora->r * (size_t)s->in);
            memcpy(mine->b, s->b, sizeof(float) * (size_t)s->out * (size_t)t->tr.lora->r);
        }
    qlr_lora_free(saved);
    QLR_TRY(st);
    uint8_t *buf;
    size_t n;
    QLR_TRY(qlr_ckpt_read(dir, files, nf, "optimizer.bin", &buf, &n));
    char what[4300];
    snprintf(what, sizeof what, "%s/optimizer.bin", dir);
    st = qlr_adamw_states_load(t->be, t->tr.opt, t->tr.n_tensors, buf, n, what);
    free(buf);
    if (st) return qlr_error_prefix("cannot resume from %s (was the optimizer changed?)", dir);
    QLR_TRY(qlr_lora_dev_upload(t->tr.ldev, t->tr.lora));
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

qlr_status qlr_trainer_metrics_prepare(trainer *t, uint64_t upto, int resumed) {
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

qlr_status qlr_trainer_metrics_append(trainer *t, json_t *obj) {
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

