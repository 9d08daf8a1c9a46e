/* data/dataset.c: JSONL files -> records -> tokenized examples with labels (data/dataset.h).
 *
 * Reading goes through zlib's gzread, which passes plain files through unchanged; the first two
 * bytes (1f 8b) decide what we call the file in messages. Lines are collected in chunks, parsed
 * and tokenized in parallel on the core thread pool, then appended in file order, so the result
 * and the first reported bad line do not depend on the thread count. Shuffling, packing and
 * batching live in data/pack.c. */
#include "data/dataset.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <zlib.h>

#include "core/core.h"
#include "data/rng.h"
#include "formats/json.h"

static const char *const g_format_names[QLR_DATA_FORMAT_COUNT] = {
    "alpaca", "completion", "chat", "sharegpt", "input_output", "pretokenized"};

const char *qlr_data_format_name(qlr_data_format f) {
    return (unsigned)f < QLR_DATA_FORMAT_COUNT ? g_format_names[f] : "?";
}

qlr_data_params qlr_data_params_default(void) {
    qlr_data_params p = {.sequence_len = 512, .train_on_inputs = 0, .drop_long = 0, .progress = 0};
    return p;
}

/* ------------------------------------------------------------------ record parsing */

/* `obj[key]` as a string; `path` names it in messages ("messages[2].content"). */
static qlr_status get_str(const json_t *obj, const char *key, const char *path, int required, const char **s,
                          size_t *len) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (!required) {
            *s = "";
            *len = 0;
            return QLR_OK;
        }
        return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": missing", path);
    }
    if (!json_is_string(v)) return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": expected a string, got %s", path, qlr_json_type_name(v));
    *s = json_string_value(v);
    *len = json_string_length(v);
    return QLR_OK;
}

static qlr_status get_array(const json_t *obj, const char *key, json_t **out) {
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": missing", key);
    if (!json_is_array(v)) return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": expected an array, got %s", key, qlr_json_type_name(v));
    *out = v;
    return QLR_OK;
}

static qlr_status add_part(qlr_data_record *r, const char *text, size_t len, int trainable, int special) {
    qlr_data_part *p = realloc(r->parts, (r->n_parts + 1) * sizeof *p);
    if (!p) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    r->parts = p;
    p[r->n_parts++] = (qlr_data_part){text, len, (uint8_t)trainable, (uint8_t)special};
    return QLR_OK;
}

/* The Alpaca prompt (as the Stanford Alpaca repository and axolotl write it). */
static const char ALPACA_WITH_INPUT[] =
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n%s\n\n### Input:\n%s\n\n"
    "### Response:\n";
static const char ALPACA_NO_INPUT[] =
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n%s\n\n### Response:\n";

static qlr_status parse_alpaca(const json_t *o, qlr_data_record *r) {
    const char *ins, *inp, *outp;
    size_t nins, ninp, nout;
    QLR_TRY(get_str(o, "instruction", "instruction", 1, &ins, &nins));
    QLR_TRY(get_str(o, "input", "input", 0, &inp, &ninp));
    QLR_TRY(get_str(o, "output", "output", 1, &outp, &nout));
    /* strings with embedded NULs are refused by the parser (no JSON_ALLOW_NUL), so %s is exact */
    const char *fmt = ninp ? ALPACA_WITH_INPUT : ALPACA_NO_INPUT;
    size_t cap = strlen(fmt) + nins + ninp + 1;
    r->scratch_ = malloc(cap);
    if (!r->scratch_) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    int n = ninp ? snprintf(r->scratch_, cap, fmt, ins, inp) : snprintf(r->scratch_, cap, fmt, ins);
    r->add_bos_eos = 1;
    QLR_TRY(add_part(r, r->scratch_, (size_t)n, 0, 0));
    return add_part(r, outp, nout, 1, 0);
}

static qlr_status parse_completion(const qlr_data_source *src, const json_t *o, qlr_data_record *r) {
    const char *field = src->field && *src->field ? src->field : "text", *s;
    size_t n;
    QLR_TRY(get_str(o, field, field, 1, &s, &n));
    r->add_bos_eos = 1;
    return add_part(r, s, n, 1, 0);
}

static qlr_status parse_input_output(const json_t *o, qlr_data_record *r) {
    json_t *segs;
    QLR_TRY(get_array(o, "segments", &segs));
    if (json_array_size(segs) == 0) return qlr_errorf(QLR_ERR_FORMAT, "field \"segments\": empty");
    for (size_t i = 0; i < json_array_size(segs); i++) {
        json_t *s = json_array_get(segs, i);
        char path[64];
        snprintf(path, sizeof path, "segments[%zu]", i);
        if (!json_is_object(s))
            return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": expected an object {text, label}, got %s", path, qlr_json_type_name(s));
        snprintf(path, sizeof path, "segments[%zu].text", i);
        const char *t;
        size_t n;
        QLR_TRY(get_str(s, "text", path, 1, &t, &n));
        json_t *l = json_object_get(s, "label");
        snprintf(path, sizeof path, "segments[%zu].label", i);
        if (!l) return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": missing", path);
        if (!json_is_boolean(l)) return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": expected true or false, got %s", path, qlr_json_type_name(l));
        QLR_TRY(add_part(r, t, n, json_is_true(l), 1));
    }
    return QLR_OK;
}

/* ShareGPT speaker names -> chat roles; unknown names pass through for the template to judge. */
static const char *sharegpt_role(const char *from) {
    if (!strcmp(from, "human") || !strcmp(from, "user")) return "user";
    if (!strcmp(from, "gpt") || !strcmp(from, "assistant") || !strcmp(from, "model")) return "assistant";
    return from;
}

static qlr_status parse_chat(const qlr_data_source *src, const json_t *o, qlr_data_record *r) {
    int sg = src->format == QLR_DATA_SHAREGPT;
    const char *fm = src->field_messages && *src->field_messages ? src->field_messages : sg ? "conversations" : "messages";
    const char *fr = src->field_role && *src->field_role ? src->field_role : sg ? "from" : "role";
    const char *fc = src->field_content && *src->field_content ? src->field_content : sg ? "value" : "content";
    json_t *arr;
    QLR_TRY(get_array(o, fm, &arr));
    size_t n = json_array_size(arr);
    if (n == 0) return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": empty", fm);
    r->msgs = calloc(n, sizeof *r->msgs);
    if (!r->msgs) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *m = json_array_get(arr, i);
        char path[160];
        if (!json_is_object(m))
            return qlr_errorf(QLR_ERR_FORMAT, "field \"%s[%zu]\": expected an object {%s, %s}, got %s", fm, i, fr, fc, qlr_json_type_name(m));
        const char *role, *content;
        size_t nr, nc;
        snprintf(path, sizeof path, "%s[%zu].%s", fm, i, fr);
        QLR_TRY(get_str(m, fr, path, 1, &role, &nr));
        if (nr == 0) return qlr_errorf(QLR_ERR_FORMAT, "field \"%s\": empty", path);
        snprintf(path, sizeof path, "%s[%zu].%s", fm, i, fc);
        QLR_TRY(get_str(m, fc, path, 1, &content, &nc));
        r->msgs[i].role = sg ? sharegpt_role(role) : role;
        r->msgs[i].content = content;
        r->n_msgs = i + 1;
    }
    return QLR_OK;
}

static qlr_status int_array(const json_t *o, const char *key, int allow_ignore, int32_t **out, size_t *n) {
    json_t *a;
    QLR_TRY(get_array(o, key, &a));
    size_t k = json_array_size(a);
    *out = malloc((k ? k : 1) * sizeof **out);
    if (!*out) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < k; i++) {
        json_t *v = json_array_get(a, i);
        if (!json_is_integer(v))
            return qlr_errorf(QLR_ERR_FORMAT, "field \"%s[%zu]\": expected an integer, got %s", key, i, qlr_json_type_name(v));
        json_int_t x = json_integer_value(v);
        if (!(x >= 0 && x <= INT32_MAX) && !(allow_ignore && x == QLR_LABEL_IGNORE))
            return qlr_errorf(QLR_ERR_FORMAT, "field \"%s[%zu]\": %lld is not a token id%s", key, i, (long long)x,
                              allow_ignore ? " or -100" : "");
        (*out)[i] = (int32_t)x;
    }
    *n = k;
    return QLR_OK;
}

static qlr_status parse_pretokenized(const json_t *o, qlr_data_record *r) {
    QLR_TRY(int_array(o, "input_ids", 0, &r->ids, &r->n_ids));
    if (r->n_ids == 0) return qlr_errorf(QLR_ERR_FORMAT, "field \"input_ids\": empty");
    json_t *l = json_object_get(o, "labels");
    if (l && !json_is_null(l)) {
        size_t nl;
        QLR_TRY(int_array(o, "labels", 1, &r->labels, &nl));
        if (nl != r->n_ids)
            return qlr_errorf(QLR_ERR_FORMAT, "field \"labels\": %zu entries, but input_ids has %zu", nl, r->n_ids);
    } else {
        r->labels = malloc(r->n_ids * sizeof *r->labels);
        if (!r->labels) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        memcpy(r->labels, r->ids, r->n_ids * sizeof *r->labels);
    }
    return QLR_OK;
}

void qlr_data_record_free(qlr_data_record *rec) {
    if (!rec) return;
    free(rec->parts);
    free(rec->msgs);
    free(rec->ids);
    free(rec->labels);
    free(rec->scratch_);
    if (rec->json_) json_decref((json_t *)rec->json_);
    memset(rec, 0, sizeof *rec);
}

qlr_status qlr_data_parse_line(const qlr_data_source *src, const char *line, size_t len, qlr_data_record *rec) {
    memset(rec, 0, sizeof *rec);
    rec->format = src->format;
    if ((unsigned)src->format >= QLR_DATA_FORMAT_COUNT)
        return qlr_errorf(QLR_ERR_INVALID, "unknown dataset format %d", (int)src->format);
    if (memchr(line, 0, len)) return qlr_errorf(QLR_ERR_FORMAT, "not JSON: a NUL byte at column %zu", (size_t)((const char *)memchr(line, 0, len) - line) + 1);
    json_error_t e;
    json_t *o = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &e);
    if (!o) return qlr_errorf(QLR_ERR_FORMAT, "not JSON (column %d): %s", e.column, e.text);
    rec->json_ = o;
    if (!json_is_object(o))
        return qlr_errorf(QLR_ERR_FORMAT, "expected a JSON object per line, got %s", qlr_json_type_name(o));
    switch (src->format) {
    case QLR_DATA_ALPACA: return parse_alpaca(o, rec);
    case QLR_DATA_COMPLETION: return parse_completion(src, o, rec);
    case QLR_DATA_CHAT:
    case QLR_DATA_SHAREGPT: return parse_chat(src, o, rec);
    case QLR_DATA_INPUT_OUTPUT: return parse_input_output(o, rec);
    case QLR_DATA_PRETOKENIZED: return parse_pretokenized(o, rec);
    default: return qlr_errorf(QLR_ERR_INTERNAL, "format %d", (int)src->format);
    }
}

/* ------------------------------------------------------------------ tokenization */

void qlr_example_buf_free(qlr_example_buf *b) {
    free(b->ids);
    free(b->labels);
    memset(b, 0, sizeof *b);
}

static qlr_status buf_push(qlr_example_buf *b, int32_t id, int32_t label) {
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        int32_t *i = realloc(b->ids, cap * sizeof *i);
        if (!i) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        b->ids = i;
        int32_t *l = realloc(b->labels, cap * sizeof *l);
        if (!l) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        b->labels = l;
        b->cap = cap;
    }
    b->ids[b->n] = id;
    b->labels[b->n++] = label;
    return QLR_OK;
}

static qlr_status tokenize_parts(const qlr_data_record *rec, const qlr_tokenizer *tok, int train_on_inputs,
                                 qlr_example_buf *out) {
    qlr_status st = QLR_OK;
    qlr_tokens v = {0};
    int last_trainable = 0;
    if (rec->add_bos_eos && qlr_tokenizer_add_bos(tok) && qlr_tokenizer_bos(tok) >= 0) {
        int32_t b = qlr_tokenizer_bos(tok);
        if ((st = buf_push(out, b, train_on_inputs ? b : QLR_LABEL_IGNORE))) goto done;
    }
    for (size_t i = 0; i < rec->n_parts; i++) {
        const qlr_data_part *p = &rec->parts[i];
        qlr_tokens_clear(&v);
        if ((st = qlr_tokenizer_encode(tok, p->text, p->len, p->special ? QLR_ENC_PARSE_SPECIAL : 0, &v))) goto done;
        /* input_output labels are the user's word; elsewhere train_on_inputs opens the prompt */
        int train = p->trainable || (train_on_inputs && rec->format != QLR_DATA_INPUT_OUTPUT);
        for (size_t k = 0; k < v.n; k++)
            if ((st = buf_push(out, v.ids[k], train ? v.ids[k] : QLR_LABEL_IGNORE))) goto done;
        last_trainable = train;
    }
    if (rec->add_bos_eos) {
        int32_t e = qlr_tokenizer_eos(tok);
        if (e >= 0 && (st = buf_push(out, e, last_trainable ? e : QLR_LABEL_IGNORE))) goto done;
    }
done:
    qlr_tokens_free(&v);
    return st;
}

static qlr_status tokenize_chat(const qlr_data_record *rec, const qlr_tokenizer *tok, const qlr_chat_template *tmpl,
                                int train_on_inputs, qlr_example_buf *out) {
    if (!tmpl) return qlr_errorf(QLR_ERR_INVALID, "a %s dataset needs a chat template", qlr_data_format_name(rec->format));
    qlr_chat_render r;
    memset(&r, 0, sizeof r);
    qlr_status st = qlr_chat_render_messages(tmpl, rec->msgs, rec->n_msgs, 0, &r);
    if (st) {
        /* the template's refusal (role order, unknown role) is a property of this line */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", qlr_error_msg());
        st = qlr_errorf(QLR_ERR_FORMAT, "%s", msg);
        qlr_chat_render_free(&r);
        return st;
    }
    qlr_tokens v = {0};
    st = qlr_tokenizer_encode(tok, r.text, r.len, QLR_ENC_PARSE_SPECIAL | QLR_ENC_OFFSETS, &v);
    size_t s = 0;
    for (size_t i = 0; st == QLR_OK && i < v.n; i++) {
        /* offsets increase; walk the segments alongside */
        while (s + 1 < r.n_segs && v.offsets[i] >= r.segs[s].end) s++;
        int train = train_on_inputs || (r.n_segs && r.segs[s].is_assistant && v.offsets[i] >= r.segs[s].start &&
                                         v.offsets[i] < r.segs[s].end);
        st = buf_push(out, v.ids[i], train ? v.ids[i] : QLR_LABEL_IGNORE);
    }
    qlr_tokens_free(&v);
    qlr_chat_render_free(&r);
    return st;
}

qlr_status qlr_data_tokenize(const qlr_data_record *rec, const qlr_tokenizer *tok, const qlr_chat_template *tmpl,
                             int train_on_inputs, qlr_example_buf *out) {
    out->n = 0;
    switch (rec->format) {
    case QLR_DATA_ALPACA:
    case QLR_DATA_COMPLETION:
    case QLR_DATA_INPUT_OUTPUT: return tokenize_parts(rec, tok, train_on_inputs, out);
    case QLR_DATA_CHAT:
    case QLR_DATA_SHAREGPT: return tokenize_chat(rec, tok, tmpl, train_on_inputs, out);
    case QLR_DATA_PRETOKENIZED: {
        int32_t nv = qlr_tokenizer_n_vocab(tok);
        for (size_t i = 0; i < rec->n_ids; i++) {
            if (rec->ids[i] >= nv)
                return qlr_errorf(QLR_ERR_FORMAT, "field \"input_ids[%zu]\": %d is outside the vocabulary (%d tokens)", i,
                                  rec->ids[i], nv);
            if (rec->labels[i] >= nv)
                return qlr_errorf(QLR_ERR_FORMAT, "field \"labels[%zu]\": %d is outside the vocabulary (%d tokens)", i,
                                  rec->labels[i], nv);
            QLR_TRY(buf_push(out, rec->ids[i], rec->labels[i]));
        }
        return QLR_OK;
    }
    default: return qlr_errorf(QLR_ERR_INVALID, "unknown dataset format %d", (int)rec->format);
    }
}

/* ------------------------------------------------------------------ the dataset */

struct qlr_dataset {
    int32_t *ids, *labels;  /* [n_tok] all examples back to back */
    uint64_t n_tok, cap_tok;
    uint64_t *start;        /* [n + 1] token offsets */
    uint32_t *source;       /* [n] */
    uint64_t *line;         /* [n] */
    size_t n, cap;
    uint32_t sequence_len;
    qlr_data_stats stats;
};

static qlr_status ds_append(qlr_dataset *ds, const int32_t *ids, const int32_t *labels, uint32_t n, uint32_t src,
                            uint64_t line) {
    if (ds->n + 1 >= ds->cap) {
        size_t cap = ds->cap ? ds->cap * 2 : 1024;
        uint64_t *st = realloc(ds->start, (cap + 1) * sizeof *st);
        if (!st) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        ds->start = st;
        uint32_t *so = realloc(ds->source, cap * sizeof *so);
        if (!so) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        ds->source = so;
        uint64_t *li = realloc(ds->line, cap * sizeof *li);
        if (!li) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        ds->line = li;
        ds->cap = cap;
    }
    if (ds->n_tok + n > ds->cap_tok) {
        uint64_t cap = ds->cap_tok ? ds->cap_tok : 65536;
        while (cap < ds->n_tok + n) cap *= 2;
        int32_t *i = realloc(ds->ids, cap * sizeof *i);
        if (!i) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        ds->ids = i;
        int32_t *l = realloc(ds->labels, cap * sizeof *l);
        if (!l) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        ds->labels = l;
        ds->cap_tok = cap;
    }
    memcpy(ds->ids + ds->n_tok, ids, n * sizeof *ids);
    memcpy(ds->labels + ds->n_tok, labels, n * sizeof *labels);
    ds->start[ds->n] = ds->n_tok;
    ds->source[ds->n] = src;
    ds->line[ds->n] = line;
    ds->n_tok += n;
    ds->n++;
    ds->start[ds->n] = ds->n_tok;
    return QLR_OK;
}

void qlr_dataset_free(qlr_dataset *ds) {
    if (!ds) return;
    free(ds->ids);
    free(ds->labels);
    free(ds->start);
    free(ds->source);
    free(ds->line);
    free(ds);
}

size_t qlr_dataset_size(const qlr_dataset *ds) { return ds->n; }
const qlr_data_stats *qlr_dataset_stats(const qlr_dataset *ds) { return &ds->stats; }
uint32_t qlr_dataset_sequence_len(const qlr_dataset *ds) { return ds->sequence_len; }

qlr_example qlr_dataset_get(const qlr_dataset *ds, size_t i) {
    QLR_ASSERT(i < ds->n);
    qlr_example e = {ds->ids + ds->start[i], ds->labels + ds->start[i], (uint32_t)(ds->start[i + 1] - ds->start[i]),
                     ds->source[i], ds->line[i]};
    return e;
}

/* ---- line reader over gzread (plain files pass through) ---- */

typedef struct line_reader {
    gzFile gz;
    char *buf;      /* bytes read but not yet returned */
    size_t len, pos, cap;
    int eof;
} line_reader;

/* Next line without its '\n' (and a '\r' before it). *line points into the reader's buffer,
 * valid until the next call. Returns 1 with a line, 0 at end of file, -1 on error (set). */
static int reader_next(line_reader *r, const char *path, uint64_t lineno, char **line, size_t *n) {
    for (;;) {
        char *nl = r->pos < r->len ? memchr(r->buf + r->pos, '\n', r->len - r->pos) : NULL;
        if (nl || (r->eof && r->pos < r->len)) {
            size_t end = nl ? (size_t)(nl - r->buf) : r->len;
            *line = r->buf + r->pos;
            *n = end - r->pos;
            if (*n && (*line)[*n - 1] == '\r') (*n)--;
            r->pos = nl ? end + 1 : end;
            return 1;
        }
        if (r->eof) return 0;
        if (r->pos > 0) { /* keep the partial line at the front */
            memmove(r->buf, r->buf + r->pos, r->len - r->pos);
            r->len -= r->pos;
            r->pos = 0;
        }
        if (r->cap - r->len < (1u << 16)) {
            if (r->cap >= QLR_DATA_MAX_LINE + (1u << 17)) {
                qlr_errorf(QLR_ERR_FORMAT, "%s:%llu: line longer than %zu MiB", path, (unsigned long long)lineno,
                           QLR_DATA_MAX_LINE >> 20);
                return -1;
            }
            size_t cap = r->cap ? r->cap * 2 : (1u << 20);
            char *b = realloc(r->buf, cap);
            if (!b) {
                qlr_errorf(QLR_ERR_NOMEM, "out of memory");
                return -1;
            }
            r->buf = b;
            r->cap = cap;
        }
        int got = gzread(r->gz, r->buf + r->len, (unsigned)(r->cap - r->len));
        if (got < 0) {
            int err;
            const char *m = gzerror(r->gz, &err);
            qlr_errorf(QLR_ERR_FORMAT, "%s: after line %llu: cannot read: %s", path, (unsigned long long)lineno, m);
            return -1;
        }
        if (got == 0) r->eof = 1;
        r->len += (size_t)got;
    }
}

/* ---- chunked, parallel parse + tokenize ---- */

typedef struct line_job {
    char *text;
    size_t len;
    uint64_t lineno;
    qlr_status st;
    char *err;              /* the failure message (malloc'ed) */
    qlr_example_buf ex;
} line_job;

typedef struct chunk_ctx {
    line_job *jobs;
    const qlr_data_source *src;
    const qlr_tokenizer *tok;
    const qlr_chat_template *tmpl;
    int train_on_inputs;
} chunk_ctx;

static void chunk_worker(void *vctx, int64_t begin, int64_t end, int tid) {
    (void)tid;
    chunk_ctx *c = vctx;
    for (int64_t i = begin; i < end; i++) {
        line_job *j = &c->jobs[i];
        qlr_data_record rec;
        j->st = qlr_data_parse_line(c->src, j->text, j->len, &rec);
        if (j->st == QLR_OK) j->st = qlr_data_tokenize(&rec, c->tok, c->tmpl, c->train_on_inputs, &j->ex);
        if (j->st) j->err = strdup(qlr_error_msg());
        qlr_data_record_free(&rec);
    }
}

#define CHUNK_LINES 2048
#define CHUNK_BYTES ((size_t)16 << 20)

static uint64_t count_targets(const int32_t *labels, uint32_t n) {
    uint64_t k = 0;
    for (uint32_t i = 1; i < n; i++) k += labels[i] != QLR_LABEL_IGNORE;
    return k;
}

/* Folds one finished chunk into the dataset, in order. */
static qlr_status absorb_chunk(qlr_dataset *ds, const qlr_data_source *src, uint32_t si, const qlr_data_params *p,
                               line_job *jobs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        line_job *j = &jobs[i];
        if (j->st) {
            if (!src->skip_bad_lines || j->st == QLR_ERR_NOMEM || j->st == QLR_ERR_INVALID)
                return qlr_errorf(j->st == QLR_ERR_NOMEM || j->st == QLR_ERR_INVALID ? j->st : QLR_ERR_FORMAT,
                                  "%s:%llu: %s%s", src->path, (unsigned long long)j->lineno, j->err ? j->err : "?",
                                  j->st == QLR_ERR_FORMAT ? " (on_bad_line: skip would skip and count such lines)" : "");
            ds->stats.skipped++;
            if (ds->stats.skipped <= 3)
                QLR_LOGW("%s:%llu: skipped: %s", src->path, (unsigned long long)j->lineno, j->err ? j->err : "?");
            continue;
        }
        size_t len = j->ex.n;
        if (len > p->sequence_len) {
            if (p->drop_long) {
                ds->stats.dropped_long++;
                continue;
            }
            ds->stats.truncated++;
            len = p->sequence_len;
        }
        uint64_t targets = count_targets(j->ex.labels, (uint32_t)len);
        if (targets == 0) {
            ds->stats.dropped_empty++;
            continue;
        }
        QLR_TRY(ds_append(ds, j->ex.ids, j->ex.labels, (uint32_t)len, si, j->lineno));
        ds->stats.examples++;
        ds->stats.tokens += len;
        ds->stats.trainable += targets;
        if (len > ds->stats.longest) ds->stats.longest = len;
    }
    return QLR_OK;
}

static void free_jobs(line_job *jobs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(jobs[i].text);
        free(jobs[i].err);
        qlr_example_buf_free(&jobs[i].ex);
        memset(&jobs[i], 0, sizeof jobs[i]);
    }
}

static int is_blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r') return 0;
    return 1;
}

static qlr_status load_source(qlr_dataset *ds, const qlr_data_source *src, uint32_t si, const qlr_data_params *p,
                              const qlr_tokenizer *tok, const qlr_chat_template *tmpl) {
    if (!src->path) return qlr_errorf(QLR_ERR_INVALID, "dataset %u: no path", si);
    if ((src->format == QLR_DATA_CHAT || src->format == QLR_DATA_SHAREGPT) && !tmpl)
        return qlr_errorf(QLR_ERR_INVALID,
                          "%s: a %s dataset needs a chat template, and the model has none we recognise "
                          "(set chat_template: chatml|llama3|llama2|mistral)",
                          src->path, qlr_data_format_name(src->format));
    struct stat sb;
    if (stat(src->path, &sb) != 0) return qlr_errorf(QLR_ERR_IO, "%s: cannot open: %s", src->path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) return qlr_errorf(QLR_ERR_INVALID, "%s: is a folder, expected a JSONL file", src->path);
    FILE *f = fopen(src->path, "rb");
    if (!f) return qlr_errorf(QLR_ERR_IO, "%s: cannot open: %s", src->path, strerror(errno));
    unsigned char magic[2] = {0, 0};
    size_t nm = fread(magic, 1, 2, f);
    fclose(f);
    int gz = nm == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
    line_reader r = {0};
    r.gz = gzopen(src->path, "rb");
    if (!r.gz) return qlr_errorf(QLR_ERR_IO, "%s: cannot open: %s", src->path, strerror(errno));
    gzbuffer(r.gz, 1u << 17);
    QLR_LOGD("%s: %s JSONL, %lld bytes", src->path, gz ? "gzip" : "plain", (long long)sb.st_size);

    qlr_progress *bar = p->progress && sb.st_size > (1 << 20) ? qlr_progress_begin("tokenizing", (uint64_t)sb.st_size, "bytes") : NULL;
    line_job *jobs = calloc(CHUNK_LINES, sizeof *jobs);
    qlr_status st = jobs ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    uint64_t lineno = 0;
    int done = 0;
    while (st == QLR_OK && !done) {
        size_t n = 0, bytes = 0;
        while (n < CHUNK_LINES && bytes < CHUNK_BYTES) {
            char *line;
            size_t len;
            int k = reader_next(&r, src->path, lineno + 1, &line, &len);
            if (k < 0) {
                st = qlr_error_status();
                break;
            }
            if (k == 0) {
                done = 1;
                break;
            }
            lineno++;
            if (is_blank(line, len)) continue;
            ds->stats.lines++;
            jobs[n].text = malloc(len + 1);
            if (!jobs[n].text) {
                st = qlr_errorf(QLR_ERR_NOMEM, "out of memory");
                break;
            }
            memcpy(jobs[n].text, line, len);
            jobs[n].text[len] = 0;
            jobs[n].len = len;
            jobs[n].lineno = lineno;
            n++;
            bytes += len;
        }
        if (st == QLR_OK && n) {
            chunk_ctx c = {jobs, src, tok, tmpl, p->train_on_inputs};
            qlr_parallel_for((int64_t)n, 16, chunk_worker, &c);
            st = absorb_chunk(ds, src, si, p, jobs, n);
        }
        free_jobs(jobs, n);
        if (bar) qlr_progress_update(bar, (uint64_t)gzoffset(r.gz), NULL);
    }
    if (bar) qlr_progress_end(bar);
    free(jobs);
    free(r.buf);
    gzclose(r.gz);
    return st;
}

qlr_status qlr_dataset_load(const qlr_data_source *srcs, size_t n_srcs, const qlr_data_params *p,
                            const qlr_tokenizer *tok, const qlr_chat_template *tmpl, qlr_dataset **out) {
    *out = NULL;
    if (!tok) return qlr_errorf(QLR_ERR_INVALID, "qlr_dataset_load: no tokenizer");
    if (n_srcs == 0) return qlr_errorf(QLR_ERR_INVALID, "no datasets given");
    if (p->sequence_len < 2) return qlr_errorf(QLR_ERR_INVALID, "sequence_len %u: must be at least 2", p->sequence_len);
    qlr_dataset *ds = calloc(1, sizeof *ds);
    if (!ds) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    ds->sequence_len = p->sequence_len;
    for (size_t i = 0; i < n_srcs; i++) {
        qlr_status st = load_source(ds, &srcs[i], (uint32_t)i, p, tok, tmpl);
        if (st) {
            qlr_dataset_free(ds);
            return st;
        }
    }
    if (ds->n == 0) {
        const qlr_data_stats *s = &ds->stats;
        qlr_status st = qlr_errorf(QLR_ERR_INVALID,
                                   "%s%s: no usable example (%llu lines: %llu skipped, %llu longer than sequence_len %u "
                                   "dropped, %llu with nothing to train on)",
                                   srcs[0].path, n_srcs > 1 ? " and the other datasets" : "",
                                   (unsigned long long)s->lines, (unsigned long long)s->skipped,
                                   (unsigned long long)s->dropped_long, p->sequence_len,
                                   (unsigned long long)s->dropped_empty);
        qlr_dataset_free(ds);
        return st;
    }
    if (ds->stats.skipped)
        QLR_LOGW("%llu bad line(s) skipped (on_bad_line: skip)", (unsigned long long)ds->stats.skipped);
    *out = ds;
    return QLR_OK;
}

qlr_status qlr_data_open_tokenizer(const char *model, const char *chat_template, qlr_tokenizer **tok,
                                   qlr_chat_template **tmpl) {
    *tok = NULL;
    *tmpl = NULL;
    if (!qlr_path_exists(model))
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: model not found (scripts/setup.sh downloads the demo model)", model);
    int hf = qlr_is_dir(model) || (strlen(model) >= 5 && !strcmp(model + strlen(model) - 5, ".json"));
    QLR_TRY(hf ? qlr_tokenizer_load_hf(model, tok) : qlr_tokenizer_open_gguf(model, tok));
    if (!chat_template || !*chat_template || !strcmp(chat_template, "tokenizer_default")) {
        const char *src = qlr_tokenizer_chat_template(*tok);
        if (!src) {
            QLR_LOGD("%s: no chat template in the model", model);
            return QLR_OK;
        }
        if (qlr_chat_template_detect(src, strlen(src), tmpl) != QLR_OK) {
            QLR_LOGD("%s: chat template not recognised: %s", model, qlr_error_msg());
            *tmpl = NULL;
            qlr_error_clear();
        }
        return QLR_OK;
    }
    qlr_status st = qlr_chat_template_from_name(chat_template, tmpl);
    if (st) {
        qlr_tokenizer_free(*tok);
        *tok = NULL;
    }
    return st;
}

/* ------------------------------------------------------------------ split */

void qlr_data_split_free(qlr_data_split *s) {
    free(s->train);
    free(s->val);
    memset(s, 0, sizeof *s);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

qlr_status qlr_dataset_split(const qlr_dataset *ds, double val_set_size, uint64_t seed, qlr_data_split *out) {
    memset(out, 0, sizeof *out);
    size_t n = ds->n, n_val;
    if (!(val_set_size >= 0) || !isfinite(val_set_size))
        return qlr_errorf(QLR_ERR_RANGE, "val_set_size %g: must be >= 0", val_set_size);
    if (val_set_size < 1) {
        n_val = (size_t)ceil(val_set_size * (double)n - 1e-9);
    } else {
        if (val_set_size != floor(val_set_size))
            return qlr_errorf(QLR_ERR_RANGE, "val_set_size %g: a count must be a whole number (or a fraction below 1)",
                              val_set_size);
        n_val = val_set_size > (double)SIZE_MAX / 2 ? SIZE_MAX / 2 : (size_t)val_set_size;
    }
    if (n_val >= n)
        return qlr_errorf(QLR_ERR_RANGE, "val_set_size %g: would hold out %zu of %zu examples, leaving none to train on",
                          val_set_size, n_val, n);
    uint32_t *perm = malloc(n * sizeof *perm);
    out->train = malloc((n - n_val) * sizeof *out->train);
    out->val = malloc((n_val ? n_val : 1) * sizeof *out->val);
    if (!perm || !out->train || !out->val) {
        free(perm);
        qlr_data_split_free(out);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++) perm[i] = (uint32_t)i;
    if (n_val) qlr_data_permute(perm, n, qlr_data_rng_seed(seed, QLR_RNG_STREAM_SPLIT, 0));
    memcpy(out->val, perm, n_val * sizeof *perm);
    memcpy(out->train, perm + n_val, (n - n_val) * sizeof *perm);
    out->n_val = n_val;
    out->n_train = n - n_val;
    qsort(out->val, n_val, sizeof *out->val, cmp_u32);
    qsort(out->train, out->n_train, sizeof *out->train, cmp_u32);
    free(perm);
    return QLR_OK;
}
