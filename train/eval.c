/* train/eval.c: `qlora eval` (see eval.h): validation loss through model/train.h's forward-only
 * pass, and exact match of greedy answers through model/'s generation loop, for the base model
 * and an adapter on one loaded base. The prompts are rebuilt from the raw JSONL lines (the
 * dataset keeps only token ids; each example remembers its file and line). */
#define _GNU_SOURCE
#include "train/eval.h"

#include <ctype.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "adapters/adapter_dev.h"
#include "adapters/lora.h"
#include "backend/backend.h"
#include "core/core.h"
#include "data/dataset.h"
#include "data/pack.h"
#include "model/model.h"
#include "model/backprop.h"
#include "train/trainer_internal.h"

qlr_eval_opts qlr_eval_opts_default(void) {
    qlr_eval_opts e;
    memset(&e, 0, sizeof e);
    e.eval_base = 1;
    e.eval_adapter = 1;
    e.n_show = 3;
    e.progress = 1;
    return e;
}

/* A whole (possibly gzip) text file split into lines (1-based, physical). */
typedef struct text_lines {
    char *buf;
    size_t len;
    size_t *start;   /* [n + 1] */
    size_t n;
} text_lines;

static void lines_free(text_lines *t) {
    free(t->buf);
    free(t->start);
    memset(t, 0, sizeof *t);
}

static qlr_status lines_load(const char *path, text_lines *t) {
    memset(t, 0, sizeof *t);
    gzFile gz = gzopen(path, "rb");
    if (!gz) return qlr_errorf(QLR_ERR_IO, "%s: cannot open", path);
    size_t cap = 1 << 20;
    t->buf = malloc(cap);
    qlr_status st = QLR_OK;
    for (;;) {
        if (!t->buf) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); break; }
        if (cap - t->len < (1 << 16)) {
            char *nb = realloc(t->buf, cap * 2);
            if (!nb) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); break; }
            t->buf = nb;
            cap *= 2;
        }
        int got = gzread(gz, t->buf + t->len, (unsigned)(cap - t->len - 1));
        if (got < 0) { st = qlr_errorf(QLR_ERR_IO, "%s: read error", path); break; }
        if (got == 0) break;
        t->len += (size_t)got;
    }
    gzclose(gz);
    if (st) {
        lines_free(t);
        return st;
    }
    size_t n = 1;
    for (size_t i = 0; i < t->len; i++) n += t->buf[i] == '\n';
    t->start = malloc(sizeof(size_t) * (n + 1));
    if (!t->start) {
        lines_free(t);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    size_t k = 0;
    t->start[k++] = 0;
    for (size_t i = 0; i < t->len; i++)
        if (t->buf[i] == '\n') t->start[k++] = i + 1;
    t->start[k] = t->len + 1;
    t->n = k;
    return QLR_OK;
}

/* Line `lineno` (1-based) without its newline / carriage return. */
static const char *lines_get(const text_lines *t, uint64_t lineno, size_t *len) {
    if (lineno < 1 || lineno > t->n) return NULL;
    size_t s = t->start[lineno - 1], e = t->start[lineno] - 1;
    if (e > t->len) e = t->len;
    while (e > s && (t->buf[e - 1] == '\r' || t->buf[e - 1] == '\n')) e--;
    *len = e - s;
    return t->buf + s;
}

/* One exact-match item: prompt ids and the reference answer. */
typedef struct em_item {
    int32_t *prompt;
    int32_t n_prompt;
    char *reference;
    int32_t n_ref_tokens;
    uint64_t line;
    uint32_t source;
} em_item;

static char *trim_dup(const char *s, size_t n) {
    while (n && isspace((unsigned char)*s)) s++, n--;
    while (n && isspace((unsigned char)s[n - 1])) n--;
    char *r = malloc(n + 1);
    if (r) {
        memcpy(r, s, n);
        r[n] = 0;
    }
    return r;
}

static qlr_status append_ids(qlr_tokens *dst, const qlr_tokens *src) {
    for (size_t i = 0; i < src->n; i++) QLR_TRY(qlr_tokens_push(dst, src->ids[i], 0));
    return QLR_OK;
}

/* Builds the prompt and reference of one record; *ok = 0 when the record has no answer to
 * check (a completion, a chat without an assistant turn). */
static qlr_status build_item(const qlr_data_record *rec, const qlr_tokenizer *tok, const qlr_chat_template *tmpl,
                             em_item *it, int *ok) {
    *ok = 0;
    qlr_tokens ids = {0}, part = {0};
    qlr_status st = QLR_OK;
    char *ref = NULL;
    if (rec->format == QLR_DATA_CHAT || rec->format == QLR_DATA_SHAREGPT) {
        size_t a = rec->n_msgs;
        for (size_t i = rec->n_msgs; i-- > 0;)
            if (rec->msgs[i].role && !strcmp(rec->msgs[i].role, "assistant")) {
                a = i;
                break;
            }
        if (a == rec->n_msgs || a == 0 || !tmpl) goto done;
        qlr_chat_render r;
        memset(&r, 0, sizeof r);
        if ((st = qlr_chat_render_messages(tmpl, rec->msgs, a, 1, &r))) goto done;
        /* as data/dataset.c tokenizes chat for training: control tokens parsed, nothing added */
        st = qlr_tokenizer_encode(tok, r.text, r.len, QLR_ENC_PARSE_SPECIAL, &ids);
        qlr_chat_render_free(&r);
        if (st) goto done;
        ref = trim_dup(rec->msgs[a].content, strlen(rec->msgs[a].content));
    } else if (rec->format == QLR_DATA_ALPACA || rec->format == QLR_DATA_INPUT_OUTPUT) {
        size_t i = 0;
        if (rec->add_bos_eos && qlr_tokenizer_add_bos(tok) && qlr_tokenizer_bos(tok) >= 0)
            if ((st = qlr_tokens_push(&ids, qlr_tokenizer_bos(tok), 0))) goto done;
        for (; i < rec->n_parts && !rec->parts[i].trainable; i++) {
            qlr_tokens_clear(&part);
            const qlr_data_part *p = &rec->parts[i];
            if ((st = qlr_tokenizer_encode(tok, p->text, p->len, p->special ? QLR_ENC_PARSE_SPECIAL : 0, &part))) goto done;
            if ((st = append_ids(&ids, &part))) goto done;
        }
        if (i == rec->n_parts || i == 0) goto done;
        size_t j = i, total = 0;
        for (; j < rec->n_parts && rec->parts[j].trainable; j++) total += rec->parts[j].len;
        char *cat = malloc(total + 1);
        if (!cat) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); goto done; }
        size_t used = 0;
        for (size_t k = i; k < j; k++) {
            memcpy(cat + used, rec->parts[k].text, rec->parts[k].len);
            used += rec->parts[k].len;
        }
        ref = trim_dup(cat, used);
        free(cat);
    } else {
        goto done;
    }
    if (!ref) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); goto done; }
    if (ids.n == 0) goto done;
    qlr_tokens_clear(&part);
    if ((st = qlr_tokenizer_encode(tok, ref, strlen(ref), 0, &part))) goto done;
    it->prompt = malloc(sizeof(int32_t) * ids.n);
    if (!it->prompt) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); goto done; }
    memcpy(it->prompt, ids.ids, sizeof(int32_t) * ids.n);
    it->n_prompt = (int32_t)ids.n;
    it->n_ref_tokens = (int32_t)part.n;
    it->reference = ref;
    ref = NULL;
    *ok = 1;
done:
    free(ref);
    qlr_tokens_free(&ids);
    qlr_tokens_free(&part);
    return st;
}

typedef struct gen_ctx {
    int32_t *ids;
    int32_t n, cap;
} gen_ctx;

static int on_token(void *ud, int32_t id) {
    gen_ctx *g = ud;
    if (g->n < g->cap) g->ids[g->n++] = id;
    return 0;
}

/* Everything loaded once for both models. */
typedef struct evaluator {
    const qlr_eval_opts *e;
    qlr_backend *be;
    qlr_model *m;
    qlr_tokenizer *tok;
    qlr_chat_template *tmpl;
    qlr_dataset *ds;
    qlr_data_source *src;       /* the files ds was read from (examples name theirs by index) */
    uint32_t n_src;
    uint32_t *val;
    size_t n_val;
    qlr_batcher *batcher;
    qlr_train_ctx *ctx;
    em_item *items;
    size_t n_items;
    int32_t max_need;        /* longest prompt + answer budget */
    qlr_forward *fw;
    qlr_kv_cache *kv;
    const qlr_adapter_set *set; /* the adapter being evaluated (NULL: the base model) */
    json_t *answers;            /* --answers: array of answer objects (NULL when not asked) */
} evaluator;

static void evaluator_free(evaluator *v) {
    for (size_t i = 0; i < v->n_items; i++) {
        free(v->items[i].prompt);
        free(v->items[i].reference);
    }
    free(v->items);
    qlr_forward_free(v->fw);
    qlr_kv_cache_free(v->kv);
    qlr_train_ctx_free(v->ctx);
    qlr_batcher_free(v->batcher);
    free(v->val);
    free(v->src);
    qlr_dataset_free(v->ds);
    qlr_chat_template_free(v->tmpl);
    qlr_tokenizer_free(v->tok);
    qlr_model_free(v->m);
    qlr_backend_free(v->be);
}

/* Where the validation examples come from: --data FILE, else the recipe's test_datasets, else
 * the val_set_size split of its datasets (the examples training held out). */
static int eval_on_all(const evaluator *v) { return v->e->data_path || v->e->run->n_test_datasets; }

static qlr_status load_eval_data(evaluator *v) {
    const qlr_train_opts *o = v->e->run;
    qlr_data_source *src;
    uint32_t n_src;
    if (v->e->data_path || !o->n_test_datasets) QLR_TRY(qlr_train_data_sources(o, v->e->data_path, &src, &n_src));
    else QLR_TRY(qlr_train_test_sources(o, &src, &n_src));
    v->src = src;
    v->n_src = n_src;
    qlr_data_params dp;
    qlr_train_data_params(o, &dp);
    dp.progress = v->e->progress;
    qlr_status st = qlr_dataset_load(src, n_src, &dp, v->tok, v->tmpl, &v->ds);
    if (st) goto done;
    if (eval_on_all(v)) {
        v->n_val = qlr_dataset_size(v->ds);
        v->val = malloc(sizeof(uint32_t) * (v->n_val ? v->n_val : 1));
        if (!v->val) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); goto done; }
        for (size_t i = 0; i < v->n_val; i++) v->val[i] = (uint32_t)i;
    } else {
        if (o->val_set_size <= 0) {
            st = qlr_errorf(QLR_ERR_INVALID, "%s: the recipe has no validation data (val_set_size: 0 and no "
                            "test_datasets); set val_set_size or test_datasets, or pass --data FILE", o->recipe_path ? o->recipe_path : "recipe");
            goto done;
        }
        qlr_data_split sp;
        if ((st = qlr_dataset_split(v->ds, o->val_set_size, o->seed, &sp))) goto done;
        v->val = sp.val;
        v->n_val = sp.n_val;
        sp.val = NULL;
        qlr_data_split_free(&sp);
    }
    if (v->e->n_examples > 0 && (size_t)v->e->n_examples < v->n_val) v->n_val = (size_t)v->e->n_examples;
    if (!v->n_val) { st = qlr_errorf(QLR_ERR_INVALID, "no validation examples"); goto done; }
    qlr_batch_params bp;
    qlr_train_batch_params(o, 0, &bp);
    if ((st = qlr_batcher_create(v->ds, v->val, v->n_val, &bp, &v->batcher))) goto done;

    /* exact-match items from the raw lines */
    v->items = calloc(v->n_val, sizeof *v->items);
    text_lines *files = calloc(n_src, sizeof *files);
    if (!v->items || !files) {
        free(files);
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (uint32_t i = 0; i < n_src && st == QLR_OK; i++) st = lines_load(src[i].path, &files[i]);
    for (size_t k = 0; k < v->n_val && st == QLR_OK; k++) {
        qlr_example ex = qlr_dataset_get(v->ds, v->val[k]);
        size_t len;
        const char *line = lines_get(&files[ex.source], ex.line, &len);
        if (!line) continue;
        qlr_data_record rec;
        if (qlr_data_parse_line(&src[ex.source], line, len, &rec) != QLR_OK) {
            qlr_error_clear();
            continue;
        }
        em_item *it = &v->items[v->n_items];
        int ok = 0;
        st = build_item(&rec, v->tok, v->tmpl, it, &ok);
        qlr_data_record_free(&rec);
        if (st == QLR_OK && ok) {
            it->line = ex.line;
            it->source = ex.source;
            int32_t need = it->n_prompt + it->n_ref_tokens + QLR_EVAL_EXTRA_TOKENS;
            if (need > v->max_need) v->max_need = need;
            v->n_items++;
        }
    }
    for (uint32_t i = 0; i < n_src; i++) lines_free(&files[i]);
    free(files);
done:
    return st;
}

static qlr_status eval_loss(evaluator *v, const char *name, qlr_eval_scores *s) {
    qlr_data_cursor c0 = {0, 0};
    QLR_TRY(qlr_batcher_seek(v->batcher, c0));
    uint64_t nb = qlr_batcher_batches_per_epoch(v->batcher);
    char label[96];
    snprintf(label, sizeof label, "loss (%s)", name);
    qlr_progress *bar = v->e->progress ? qlr_progress_begin(label, nb, "batches") : NULL;
    qlr_micro mb;
    memset(&mb, 0, sizeof mb);
    qlr_status st = QLR_OK;
    double sum = 0;
    int64_t cnt = 0;
    for (uint64_t i = 0; i < nb && st == QLR_OK; i++) {
        qlr_data_batch b;
        if ((st = qlr_batcher_next(v->batcher, &b)) || (st = qlr_micro_from_batch(&mb, &b))) break;
        if (!mb.n) continue;
        qlr_train_batch tb = qlr_micro_view(&mb);
        double ls;
        int64_t nt;
        if ((st = qlr_train_eval(v->ctx, v->set, &tb, &ls, &nt))) break;
        sum += ls;
        cnt += nt;
        char extra[64];
        snprintf(extra, sizeof extra, "loss %.4f", cnt ? sum / (double)cnt : 0.0);
        qlr_progress_update(bar, i + 1, extra);
    }
    qlr_progress_end(bar);
    qlr_micro_free(&mb);
    s->loss = cnt ? sum / (double)cnt : NAN;
    s->n_targets = cnt;
    return st;
}

static void print_clipped(FILE *out, const char *label, const char *s) {
    fprintf(out, "    %s", label);
    size_t n = strlen(s);
    for (size_t i = 0; i < n && i < 240; i++) {
        if (s[i] == '\n') fputs("\\n", out);
        else fputc(s[i], out);
    }
    fputs(n > 240 ? "...\n" : "\n", out);
}

static qlr_status eval_exact(evaluator *v, const char *name, qlr_eval_scores *s, FILE *out) {
    int32_t stops[2], ns = 0;
    int32_t cand[2] = {qlr_tokenizer_eot(v->tok), qlr_tokenizer_eos(v->tok)};
    for (int i = 0; i < 2; i++)
        if (cand[i] >= 0 && (ns == 0 || stops[0] != cand[i])) stops[ns++] = cand[i];
    gen_ctx g = {0};
    g.cap = 4096;
    g.ids = malloc(sizeof(int32_t) * (size_t)g.cap);
    if (!g.ids) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    int shown = 0;
    qlr_status st = QLR_OK;
    char label[96];
    snprintf(label, sizeof label, "exact match (%s)", name);
    qlr_progress *bar = v->e->progress ? qlr_progress_begin(label, v->n_items, "examples") : NULL;
    for (size_t k = 0; k < v->n_items && st == QLR_OK; k++) {
        em_item *it = &v->items[k];
        qlr_generate_params gp = qlr_generate_params_default();
        gp.n_predict = it->n_ref_tokens + QLR_EVAL_EXTRA_TOKENS;
        gp.stop_ids = stops;
        gp.n_stop = ns;
        gp.n_batch = 256;
        gp.adapters = v->set;
        g.n = 0;
        qlr_generate_stats gs;
        if ((st = qlr_generate(v->fw, v->kv, it->prompt, it->n_prompt, &gp, on_token, &g, &gs))) break;
        char *text = NULL;
        size_t tl = 0;
        if ((st = qlr_tokenizer_decode(v->tok, g.ids, (size_t)g.n, QLR_DEC_SKIP_SPECIAL, &text, &tl))) break;
        char *got = trim_dup(text, tl);
        free(text);
        if (!got) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); break; }
        s->n_examples++;
        int exact = !strcmp(got, it->reference);
        if (v->answers) {
            json_t *j = json_object();
            json_object_set_new(j, "model", json_string(name));
            json_object_set_new(j, "source", json_string(v->src[it->source].path));
            json_object_set_new(j, "line", json_integer((json_int_t)it->line));
            json_object_set_new(j, "reference", json_string(it->reference));
            json_object_set_new(j, "answer", json_string(got));
            json_object_set_new(j, "max_tokens", json_integer(gp.n_predict));
            json_object_set_new(j, "exact", json_boolean(exact));
            /* the tokens themselves, for other engines to replay (tests/tools/gguf_forward.py) */
            json_t *pi = json_array(), *ai = json_array(), *si = json_array();
            for (int32_t q = 0; q < it->n_prompt; q++) json_array_append_new(pi, json_integer(it->prompt[q]));
            for (int32_t q = 0; q < g.n; q++) json_array_append_new(ai, json_integer(g.ids[q]));
            for (int32_t q = 0; q < ns; q++) json_array_append_new(si, json_integer(stops[q]));
            json_object_set_new(j, "prompt_ids", pi);
            json_object_set_new(j, "answer_ids", ai);
            json_object_set_new(j, "stop_ids", si);
            json_object_set_new(j, "stopped", json_boolean(gs.stopped));
            json_array_append_new(v->answers, j);
        }
        if (exact) s->n_exact++;
        else if (shown < v->e->n_show) {
            if (!shown) {
                qlr_progress_clear_line();
                fprintf(out, "  %s mismatches (first %d):\n", name, v->e->n_show);
            }
            qlr_progress_clear_line();
            fprintf(out, "  - %s line %llu\n", v->src[it->source].path, (unsigned long long)it->line);
            print_clipped(out, "expected: ", it->reference);
            print_clipped(out, "got:      ", got);
            shown++;
        }
        free(got);
        char extra[64];
        snprintf(extra, sizeof extra, "%d/%d exact", s->n_exact, s->n_examples);
        qlr_progress_update(bar, k + 1, extra);
    }
    qlr_progress_end(bar);
    free(g.ids);
    return st;
}

/* One JSON object per line, written atomically. */
static qlr_status write_answers(const char *path, json_t *arr) {
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (size_t i = 0; buf && i < json_array_size(arr); i++) {
        char *line = json_dumps(json_array_get(arr, i), JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (!line) {
            free(buf);
            return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        }
        size_t n = strlen(line);
        if (len + n + 1 > cap) {
            while (len + n + 1 > cap) cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(line);
                free(buf);
                return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
            }
            buf = nb;
        }
        memcpy(buf + len, line, n);
        buf[len + n] = '\n';
        len += n + 1;
        free(line);
    }
    if (!buf) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    qlr_status st = qlr_write_atomic(path, buf, len);
    free(buf);
    return st;
}

static qlr_status eval_model(evaluator *v, const char *name, qlr_eval_scores *s, FILE *out) {
    memset(s, 0, sizeof *s);
    double t0 = qlr_now();
    QLR_TRY(eval_loss(v, name, s));
    QLR_TRY(eval_exact(v, name, s, out));
    s->seconds = qlr_now() - t0;
    s->done = 1;
    fprintf(out, "%-8s loss %.4f over %lld tokens | exact match %d/%d = %.1f%% (%.1fs)\n", name, s->loss,
            (long long)s->n_targets, s->n_exact, s->n_examples,
            s->n_examples ? 100.0 * s->n_exact / s->n_examples : 0.0, s->seconds);
    fflush(out);
    return QLR_OK;
}

qlr_status qlr_eval_run(const qlr_eval_opts *e, qlr_eval_scores *base_s, qlr_eval_scores *ad_s, FILE *out) {
    memset(base_s, 0, sizeof *base_s);
    memset(ad_s, 0, sizeof *ad_s);
    const qlr_train_opts *o = e->run;
    evaluator V;
    memset(&V, 0, sizeof V);
    evaluator *v = &V;
    v->e = e;
    qlr_adapter_one ad;
    memset(&ad, 0, sizeof ad);
    char *adapter_path = NULL;
    int is_gguf = 0;
    qlr_status st = QLR_OK;

    /* which adapter (found before the slow loading, so a missing one fails fast) */
    if (e->eval_adapter) {
        const char *want = e->adapter ? e->adapter : o->output_dir;
        st = qlr_lora_resolve(want, &adapter_path, &is_gguf);
        if (st && (e->adapter || !e->eval_base)) return st;
        if (st) {
            fprintf(out, "note: no adapter in %s yet (train first: %s train %s); evaluating the base model only\n",
                    want, e->qlora_cmd ? e->qlora_cmd : "qlora", o->recipe_path ? o->recipe_path : "RECIPE");
            qlr_error_clear();
            st = QLR_OK;
        }
    }
    const char *device = o->device && strcmp(o->device, "auto") ? o->device : "cpu";
    if (o->device && !strcmp(o->device, "auto")) {
        if (qlr_backend_create("cuda", o->threads, &v->be) != QLR_OK) qlr_error_clear();
    }
    if (!v->be && (st = qlr_backend_create(device, o->threads, &v->be))) goto done;
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = e->progress;
    if ((st = qlr_model_load(o->base_model, v->be, &lp, &v->m))) goto done;
    if ((st = qlr_data_open_tokenizer(o->base_model, o->chat_template, &v->tok, &v->tmpl))) goto done;
    if ((st = load_eval_data(v))) goto done;
    qlr_train_params tp = qlr_train_params_default();
    tp.max_tokens = (int32_t)(o->micro_batch_size * o->sequence_len);
    tp.max_seq_len = (int32_t)o->sequence_len;
    tp.checkpointing = 1;
    if (tp.ce_chunk > tp.max_tokens) tp.ce_chunk = tp.max_tokens;
    if ((st = qlr_train_ctx_create(v->m, &tp, &v->ctx))) goto done;
    int32_t ctx = v->max_need > 16 ? v->max_need : 16;
    if ((st = qlr_kv_cache_create(v->m, 1, ctx, &v->kv))) goto done;
    if ((st = qlr_forward_create(v->m, 256, 1, &v->fw))) goto done;
    char from[4200];
    if (e->data_path) snprintf(from, sizeof from, "%s", e->data_path);
    else if (o->n_test_datasets)
        snprintf(from, sizeof from, "test_datasets: %s%s", o->test_datasets[0].path,
                 o->n_test_datasets > 1 ? " and more" : "");
    else snprintf(from, sizeof from, "the recipe's val_set_size split");
    fprintf(out, "eval: %zu validation examples (%s), %zu with an answer to match\n", v->n_val, from, v->n_items);
    if (e->answers_path && !(v->answers = json_array())) {
        st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (e->eval_base && (st = eval_model(v, "base", base_s, out))) goto done;
    if (adapter_path) {
        if ((st = qlr_adapter_one_load(v->m, adapter_path, 1.0f, &ad))) goto done;
        v->set = ad.set;
        fprintf(out, "adapter: %s\n", adapter_path);
        if ((st = eval_model(v, "adapter", ad_s, out))) goto done;
    }
    if (base_s->done && ad_s->done && base_s->n_examples) {
        double b = 100.0 * base_s->n_exact / base_s->n_examples, a = 100.0 * ad_s->n_exact / ad_s->n_examples;
        fprintf(out, "exact match: base %.1f%% -> adapter %.1f%% (%+.1f points); loss %.4f -> %.4f\n", b, a, a - b,
                base_s->loss, ad_s->loss);
    }
    if (v->answers) st = write_answers(e->answers_path, v->answers);
done:
    json_decref(v->answers);
    v->set = NULL;
    qlr_adapter_one_free(&ad);
    free(adapter_path);
    evaluator_free(v);
    return st;
}
