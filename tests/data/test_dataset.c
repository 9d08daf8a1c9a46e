/* tests/data/test_dataset.c: every dataset format on tiny fixtures (tests/data/datasets/)
 * tokenized with the demo model's tokenizer: the ids, and exactly which tokens are trained
 * (chat: the assistant contents and their <|im_end|>; alpaca: the response and eos;
 * input_output: the label:true segments); gzip == plain; bad lines (file:line and field in the
 * error, skip counts); truncate vs drop; train_on_inputs; `qlora data preview`-style counts.
 * Needs the demo model: it FAILS with a message to run scripts/setup.sh when missing. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "core/core.h"
#include "data/dataset.h"
#include "tests/test_util.h"

#define FIX QLR_TEST_DATA "/datasets/"

static qlr_tokenizer *g_tok;
static qlr_chat_template *g_tmpl;

static qlr_data_source src_of(const char *path, qlr_data_format f) {
    qlr_data_source s = {0};
    s.path = path;
    s.format = f;
    return s;
}

static qlr_dataset *load(const qlr_data_source *s, uint32_t seq_len, int train_on_inputs, int drop) {
    qlr_data_params p = qlr_data_params_default();
    p.sequence_len = seq_len;
    p.train_on_inputs = train_on_inputs;
    p.drop_long = drop;
    qlr_dataset *ds = NULL;
    CHECK_OK(qlr_dataset_load(s, 1, &p, g_tok, g_tmpl, &ds));
    return ds;
}

/* Appends encode(text) (no special handling unless `special`) to v. */
static void enc(const char *text, int special, qlr_tokens *v) {
    CHECK_OK(qlr_tokenizer_encode(g_tok, text, strlen(text), special ? QLR_ENC_PARSE_SPECIAL : 0, v));
}

/* The decoded text of the trained tokens (labels != -100), in order. */
static char *trained_text(const qlr_example *e) {
    int32_t *ids = malloc((e->n + 1) * sizeof *ids);
    size_t k = 0;
    for (uint32_t i = 0; i < e->n; i++)
        if (e->labels[i] != QLR_LABEL_IGNORE) {
            CHECK_EQ_INT(e->labels[i], e->ids[i]); /* a trained label is the token itself */
            ids[k++] = e->ids[i];
        }
    char *text = NULL;
    size_t len;
    CHECK_OK(qlr_tokenizer_decode(g_tok, ids, k, 0, &text, &len));
    free(ids);
    return text;
}

static int same_ids(const qlr_example *e, const qlr_tokens *v) {
    if (e->n != v->n) return 0;
    for (size_t i = 0; i < v->n; i++)
        if (e->ids[i] != v->ids[i]) return 0;
    return 1;
}

static void test_alpaca(void) {
    qlr_data_source s = src_of(FIX "alpaca.jsonl", QLR_DATA_ALPACA);
    qlr_dataset *ds = load(&s, 512, 0, 0);
    if (!ds) return;
    CHECK_EQ_INT(qlr_dataset_size(ds), 2);
    const char *prompt =
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2 and "
        "3\n\n### Response:\n";
    qlr_tokens v = {0};
    if (qlr_tokenizer_add_bos(g_tok)) CHECK_OK(qlr_tokens_push(&v, qlr_tokenizer_bos(g_tok), 0));
    size_t n_prompt;
    enc(prompt, 0, &v);
    n_prompt = v.n;
    enc("5", 0, &v);
    CHECK_OK(qlr_tokens_push(&v, qlr_tokenizer_eos(g_tok), 0));
    qlr_example e = qlr_dataset_get(ds, 0);
    CHECK_MSG(same_ids(&e, &v), "alpaca ids differ (%u vs %zu tokens)", e.n, v.n);
    for (uint32_t i = 0; i < e.n && e.n == v.n; i++)
        CHECK_EQ_INT(e.labels[i], i < n_prompt ? QLR_LABEL_IGNORE : e.ids[i]);
    CHECK_EQ_INT(e.line, 1);
    char *t = trained_text(&e);
    CHECK_MSG(strcmp(t, "5<|endoftext|>") == 0 || strcmp(t, "5<|im_end|>") == 0, "alpaca trained: '%s'", t);
    free(t);
    e = qlr_dataset_get(ds, 1);
    t = trained_text(&e);
    char want[64];
    snprintf(want, sizeof want, "Hello there!%s", qlr_tokenizer_token_text(g_tok, qlr_tokenizer_eos(g_tok)));
    CHECK_MSG(strcmp(t, want) == 0, "alpaca (no input) trained: '%s'", t);
    free(t);
    qlr_tokens_free(&v);
    qlr_dataset_free(ds);

    /* train_on_inputs: every token after the first is a target */
    ds = load(&s, 512, 1, 0);
    if (!ds) return;
    e = qlr_dataset_get(ds, 0);
    int all = 1;
    for (uint32_t i = 0; i < e.n; i++) all &= e.labels[i] == e.ids[i];
    CHECK(all);
    CHECK_EQ_INT(qlr_dataset_stats(ds)->trainable, qlr_dataset_stats(ds)->tokens - 2);
    qlr_dataset_free(ds);
}

static void test_completion(void) {
    qlr_data_source s = src_of(FIX "completion.jsonl", QLR_DATA_COMPLETION);
    qlr_dataset *ds = load(&s, 512, 0, 0);
    if (!ds) return;
    CHECK_EQ_INT(qlr_dataset_size(ds), 2);
    CHECK_EQ_INT(qlr_dataset_stats(ds)->lines, 2); /* the blank line is ignored */
    qlr_tokens v = {0};
    if (qlr_tokenizer_add_bos(g_tok)) CHECK_OK(qlr_tokens_push(&v, qlr_tokenizer_bos(g_tok), 0));
    enc("The quick brown fox jumps over the lazy dog.", 0, &v);
    CHECK_OK(qlr_tokens_push(&v, qlr_tokenizer_eos(g_tok), 0));
    qlr_example e = qlr_dataset_get(ds, 0);
    CHECK(same_ids(&e, &v));
    for (uint32_t i = 0; i < e.n; i++) CHECK_EQ_INT(e.labels[i], e.ids[i]);
    CHECK_EQ_INT(qlr_dataset_get(ds, 1).line, 3);
    qlr_tokens_free(&v);
    qlr_dataset_free(ds);

    /* a custom field name that the lines lack: an error naming it */
    s.field = "body";
    qlr_data_params p = qlr_data_params_default();
    CHECK(qlr_dataset_load(&s, 1, &p, g_tok, g_tmpl, &ds) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "completion.jsonl:1:") && strstr(qlr_error_msg(), "field \"body\": missing"),
              "message: %s", qlr_error_msg());
}

/* Chat and ShareGPT fixtures hold the same conversations: identical examples. */
static void check_chat(qlr_data_format f, const char *path) {
    qlr_data_source s = src_of(path, f);
    qlr_dataset *ds = load(&s, 512, 0, 0);
    if (!ds) return;
    /* line 3 has no assistant turn: nothing to train on, dropped and counted */
    CHECK_EQ_INT(qlr_dataset_size(ds), 2);
    CHECK_EQ_INT(qlr_dataset_stats(ds)->dropped_empty, 1);
    qlr_example e = qlr_dataset_get(ds, 0);
    /* ids: the rendered conversation tokenized whole */
    qlr_chat_msg m[] = {{"user", "What is 2+2?"}, {"assistant", "4"}};
    qlr_chat_render r;
    CHECK_OK(qlr_chat_render_messages(g_tmpl, m, 2, 0, &r));
    qlr_tokens v = {0};
    enc(r.text, 1, &v);
    CHECK(same_ids(&e, &v));
    qlr_chat_render_free(&r);
    /* exactly the assistant content and its <|im_end|> are trained, and they are the tail
     * "4<|im_end|>" followed by the untrained "\n" */
    size_t n_tr = 0;
    for (uint32_t i = 0; i < e.n; i++) n_tr += e.labels[i] != QLR_LABEL_IGNORE;
    qlr_tokens a = {0};
    enc("4", 0, &a);
    CHECK_EQ_INT(n_tr, a.n + 1);
    CHECK(e.n >= 3 && e.labels[e.n - 1] == QLR_LABEL_IGNORE && e.labels[e.n - 2] != QLR_LABEL_IGNORE &&
          e.labels[e.n - 3] != QLR_LABEL_IGNORE && e.labels[e.n - 1 - a.n - 2] == QLR_LABEL_IGNORE);
    char *t = trained_text(&e);
    CHECK_MSG(strcmp(t, "4<|im_end|>") == 0, "trained: '%s'", t);
    free(t);
    qlr_tokens_free(&a);
    e = qlr_dataset_get(ds, 1);
    t = trained_text(&e);
    CHECK_MSG(strcmp(t, "Paris.<|im_end|>Madrid.<|im_end|>") == 0, "trained (2 turns): '%s'", t);
    free(t);
    qlr_tokens_free(&v);
    qlr_dataset_free(ds);
}

static void test_chat(void) {
    check_chat(QLR_DATA_CHAT, FIX "chat.jsonl");
    check_chat(QLR_DATA_SHAREGPT, FIX "sharegpt.jsonl");
    /* sharegpt and chat give the same examples */
    qlr_data_source a = src_of(FIX "chat.jsonl", QLR_DATA_CHAT), b = src_of(FIX "sharegpt.jsonl", QLR_DATA_SHAREGPT);
    qlr_dataset *x = load(&a, 512, 0, 0), *y = load(&b, 512, 0, 0);
    if (x && y && qlr_dataset_size(x) == qlr_dataset_size(y))
        for (size_t i = 0; i < qlr_dataset_size(x); i++) {
            qlr_example p = qlr_dataset_get(x, i), q = qlr_dataset_get(y, i);
            CHECK(p.n == q.n && !memcmp(p.ids, q.ids, p.n * 4) && !memcmp(p.labels, q.labels, p.n * 4));
        }
    qlr_dataset_free(x);
    qlr_dataset_free(y);

    /* a chat dataset without a template is refused up front */
    qlr_data_params p = qlr_data_params_default();
    qlr_dataset *ds;
    CHECK(qlr_dataset_load(&a, 1, &p, g_tok, NULL, &ds) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "chat template") != NULL);

    /* llama2 refuses a conversation that does not start with the user: a bad line */
    qlr_chat_template *l2;
    CHECK_OK(qlr_chat_template_from_name("llama2", &l2));
    char path[512];
    snprintf(path, sizeof path, "%s/l2.jsonl", test_tmpdir());
    FILE *f = fopen(path, "w");
    fputs("{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n"
          "{\"messages\": [{\"role\": \"assistant\", \"content\": \"b\"}]}\n",
          f);
    fclose(f);
    qlr_data_source s = src_of(path, QLR_DATA_CHAT);
    CHECK(qlr_dataset_load(&s, 1, &p, g_tok, l2, &ds) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "l2.jsonl:2:") != NULL, "message: %s", qlr_error_msg());
    s.skip_bad_lines = 1;
    CHECK_OK(qlr_dataset_load(&s, 1, &p, g_tok, l2, &ds));
    if (ds) CHECK_EQ_INT(qlr_dataset_stats(ds)->skipped, 1);
    qlr_dataset_free(ds);
    qlr_chat_template_free(l2);
}

static void test_input_output(void) {
    qlr_data_source s = src_of(FIX "input_output.jsonl", QLR_DATA_INPUT_OUTPUT);
    /* labels are honoured even with train_on_inputs */
    for (int toi = 0; toi < 2; toi++) {
        qlr_dataset *ds = load(&s, 512, toi, 0);
        if (!ds) return;
        CHECK_EQ_INT(qlr_dataset_size(ds), 2);
        qlr_example e = qlr_dataset_get(ds, 0);
        qlr_tokens v = {0};
        size_t a, b;
        enc("<|im_start|>user\nhi<|im_end|>\n", 1, &v);
        a = v.n;
        enc("<|im_start|>assistant\nhello<|im_end|>", 1, &v);
        b = v.n;
        enc("\n", 1, &v);
        CHECK(same_ids(&e, &v));
        for (uint32_t i = 0; i < e.n && e.n == v.n; i++)
            CHECK_EQ_INT(e.labels[i], i >= a && i < b ? e.ids[i] : QLR_LABEL_IGNORE);
        CHECK(qlr_tokenizer_token_text(g_tok, e.ids[0]) && !strcmp(qlr_tokenizer_token_text(g_tok, e.ids[0]), "<|im_start|>"));
        qlr_example e1 = qlr_dataset_get(ds, 1);
        char *t = trained_text(&e1);
        CHECK_MSG(strcmp(t, "Answer: 2") == 0, "trained: '%s'", t);
        free(t);
        qlr_tokens_free(&v);
        qlr_dataset_free(ds);
    }
}

static void test_pretokenized(void) {
    qlr_data_source s = src_of(FIX "pretokenized.jsonl", QLR_DATA_PRETOKENIZED);
    qlr_dataset *ds = load(&s, 512, 0, 0);
    if (!ds) return;
    qlr_example e = qlr_dataset_get(ds, 0);
    int32_t ids[] = {1, 2, 3, 4, 5}, lab[] = {-100, -100, 3, 4, 5};
    CHECK(e.n == 5 && !memcmp(e.ids, ids, sizeof ids) && !memcmp(e.labels, lab, sizeof lab));
    e = qlr_dataset_get(ds, 1);
    int32_t ids2[] = {10, 11, 12};
    CHECK(e.n == 3 && !memcmp(e.ids, ids2, sizeof ids2) && !memcmp(e.labels, ids2, sizeof ids2));
    CHECK_EQ_INT(qlr_dataset_stats(ds)->trainable, 3 + 2);
    qlr_dataset_free(ds);

    /* an id outside the vocabulary names the field */
    char path[512];
    snprintf(path, sizeof path, "%s/pt_bad.jsonl", test_tmpdir());
    FILE *f = fopen(path, "w");
    fprintf(f, "{\"input_ids\": [1, %d]}\n", qlr_tokenizer_n_vocab(g_tok));
    fclose(f);
    qlr_data_source b = src_of(path, QLR_DATA_PRETOKENIZED);
    qlr_data_params p = qlr_data_params_default();
    CHECK(qlr_dataset_load(&b, 1, &p, g_tok, g_tmpl, &ds) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "pt_bad.jsonl:1:") && strstr(qlr_error_msg(), "input_ids[1]"), "message: %s",
              qlr_error_msg());
}

/* gzip is detected by its magic: a .jsonl name holding gzip data loads the same examples */
static void test_gzip(void) {
    char *plain;
    size_t n;
    CHECK_OK(qlr_file_read_all(FIX "chat.jsonl", 1 << 20, &plain, &n));
    char path[512];
    snprintf(path, sizeof path, "%s/chat_gz.jsonl", test_tmpdir());
    gzFile g = gzopen(path, "wb");
    CHECK(g && gzwrite(g, plain, (unsigned)n) == (int)n);
    gzclose(g);
    free(plain);
    FILE *f = fopen(path, "rb");
    unsigned char m[2] = {0};
    CHECK(f && fread(m, 1, 2, f) == 2 && m[0] == 0x1f && m[1] == 0x8b);
    if (f) fclose(f);
    qlr_data_source a = src_of(FIX "chat.jsonl", QLR_DATA_CHAT), b = src_of(path, QLR_DATA_CHAT);
    qlr_dataset *x = load(&a, 512, 0, 0), *y = load(&b, 512, 0, 0);
    if (!x || !y) goto done;
    CHECK_EQ_INT(qlr_dataset_size(x), qlr_dataset_size(y));
    CHECK(!memcmp(qlr_dataset_stats(x), qlr_dataset_stats(y), sizeof(qlr_data_stats)));
    for (size_t i = 0; i < qlr_dataset_size(x) && i < qlr_dataset_size(y); i++) {
        qlr_example p = qlr_dataset_get(x, i), q = qlr_dataset_get(y, i);
        CHECK(p.n == q.n && p.line == q.line && !memcmp(p.ids, q.ids, p.n * 4) && !memcmp(p.labels, q.labels, p.n * 4));
    }
done:
    qlr_dataset_free(x);
    qlr_dataset_free(y);
}

static void test_bad_lines(void) {
    qlr_data_source s = src_of(FIX "bad.jsonl", QLR_DATA_ALPACA);
    qlr_data_params p = qlr_data_params_default();
    qlr_dataset *ds = NULL;
    CHECK(qlr_dataset_load(&s, 1, &p, g_tok, g_tmpl, &ds) == QLR_ERR_FORMAT);
    CHECK(ds == NULL);
    CHECK_MSG(strstr(qlr_error_msg(), "bad.jsonl:2: not JSON") != NULL, "message: %s", qlr_error_msg());

    /* skip mode: lines 2 (not JSON), 3 (no output) and 5 (instruction not a string) */
    s.skip_bad_lines = 1;
    CHECK_OK(qlr_dataset_load(&s, 1, &p, g_tok, g_tmpl, &ds));
    if (ds) {
        CHECK_EQ_INT(qlr_dataset_stats(ds)->skipped, 3);
        CHECK_EQ_INT(qlr_dataset_stats(ds)->lines, 5);
        CHECK_EQ_INT(qlr_dataset_size(ds), 2);
        CHECK_EQ_INT(qlr_dataset_get(ds, 1).line, 4);
    }
    qlr_dataset_free(ds);

    /* the field-level messages, one line at a time through the parser */
    qlr_data_record rec;
    const char *l3 = "{\"instruction\": \"Lacks the output field.\"}";
    CHECK(qlr_data_parse_line(&s, l3, strlen(l3), &rec) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "field \"output\": missing") != NULL, "message: %s", qlr_error_msg());
    qlr_data_record_free(&rec);
    const char *l5 = "{\"instruction\": 7, \"output\": \"x\"}";
    CHECK(qlr_data_parse_line(&s, l5, strlen(l5), &rec) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "field \"instruction\": expected a string, got integer") != NULL, "message: %s",
              qlr_error_msg());
    qlr_data_record_free(&rec);

    /* chat: CRLF line ends, a message without content, a non-object line, messages not a list,
     * and a last line without '\n' */
    qlr_data_source c = src_of(FIX "bad_chat.jsonl", QLR_DATA_CHAT);
    CHECK(qlr_dataset_load(&c, 1, &p, g_tok, g_tmpl, &ds) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "bad_chat.jsonl:2: field \"messages[0].content\": missing") != NULL, "message: %s",
              qlr_error_msg());
    c.skip_bad_lines = 1;
    CHECK_OK(qlr_dataset_load(&c, 1, &p, g_tok, g_tmpl, &ds));
    if (ds) {
        CHECK_EQ_INT(qlr_dataset_stats(ds)->skipped, 3);
        CHECK_EQ_INT(qlr_dataset_size(ds), 2);
        CHECK_EQ_INT(qlr_dataset_get(ds, 1).line, 5);
        qlr_example e0 = qlr_dataset_get(ds, 0);
        char *t = trained_text(&e0);
        CHECK_MSG(strcmp(t, "hello<|im_end|>") == 0, "CRLF line trained: '%s'", t);
        free(t);
    }
    qlr_dataset_free(ds);
    const char *l4 = "{\"messages\": \"a string\"}";
    CHECK(qlr_data_parse_line(&c, l4, strlen(l4), &rec) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "field \"messages\": expected an array, got string") != NULL, "message: %s",
              qlr_error_msg());
    qlr_data_record_free(&rec);

    /* a missing file */
    qlr_data_source m = src_of(FIX "no_such.jsonl", QLR_DATA_CHAT);
    CHECK(qlr_dataset_load(&m, 1, &p, g_tok, g_tmpl, &ds) == QLR_ERR_IO);
    CHECK(strstr(qlr_error_msg(), "no_such.jsonl") != NULL);
}

static void test_truncate_drop(void) {
    /* completion lines of known lengths against sequence_len 16 */
    char path[512];
    snprintf(path, sizeof path, "%s/lengths.jsonl", test_tmpdir());
    FILE *f = fopen(path, "w");
    const char *texts[] = {"short", "a b c d e f g h i j k l m n o p q r s t u v w x y z", "hello world",
                           "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"};
    uint32_t lens[4];
    for (int i = 0; i < 4; i++) {
        fprintf(f, "{\"text\": \"%s\"}\n", texts[i]);
        qlr_tokens v = {0};
        enc(texts[i], 0, &v);
        lens[i] = (uint32_t)v.n + 1 + (qlr_tokenizer_add_bos(g_tok) ? 1 : 0);
        qlr_tokens_free(&v);
    }
    fclose(f);
    uint32_t L = 16;
    int n_long = 0;
    for (int i = 0; i < 4; i++) n_long += lens[i] > L;
    CHECK_EQ_INT(n_long, 2);
    qlr_data_source s = src_of(path, QLR_DATA_COMPLETION);
    qlr_dataset *ds = load(&s, L, 0, 0);
    if (ds) {
        CHECK_EQ_INT(qlr_dataset_size(ds), 4);
        CHECK_EQ_INT(qlr_dataset_stats(ds)->truncated, 2);
        CHECK_EQ_INT(qlr_dataset_stats(ds)->dropped_long, 0);
        CHECK_EQ_INT(qlr_dataset_stats(ds)->longest, L);
        for (int i = 0; i < 4; i++) CHECK_EQ_INT(qlr_dataset_get(ds, i).n, lens[i] > L ? L : lens[i]);
    }
    qlr_dataset_free(ds);
    ds = load(&s, L, 0, 1);
    if (ds) {
        CHECK_EQ_INT(qlr_dataset_size(ds), 2);
        CHECK_EQ_INT(qlr_dataset_stats(ds)->truncated, 0);
        CHECK_EQ_INT(qlr_dataset_stats(ds)->dropped_long, 2);
        CHECK_EQ_INT(qlr_dataset_get(ds, 1).line, 3);
    }
    qlr_dataset_free(ds);
}

/* The shipped quickstart data loads, masks the prompt, and every example has trained tokens. */
static void test_quickstart(void) {
    qlr_data_source s = src_of(QLR_SOURCE_DIR "/data/quickstart/val.jsonl", QLR_DATA_CHAT);
    qlr_dataset *ds = load(&s, 256, 0, 0);
    if (!ds) return;
    const qlr_data_stats *st = qlr_dataset_stats(ds);
    CHECK_EQ_INT(st->examples, 200);
    CHECK_EQ_INT(st->skipped + st->dropped_empty + st->dropped_long + st->truncated, 0);
    CHECK(st->trainable > 0 && st->trainable < st->tokens / 2);
    qlr_dataset_free(ds);
}

int main(void) {
    const char *model = test_demo_model_or_fail();
    if (!model) return test_finish();
    CHECK_OK(qlr_data_open_tokenizer(model, "tokenizer_default", &g_tok, &g_tmpl));
    if (!g_tok || !g_tmpl) {
        CHECK_MSG(0, "no tokenizer or chat template from %s", model);
        return test_finish();
    }
    test_alpaca();
    test_completion();
    test_chat();
    test_input_output();
    test_pretokenized();
    test_gzip();
    test_bad_lines();
    test_truncate_drop();
    test_quickstart();
    qlr_chat_template_free(g_tmpl);
    qlr_tokenizer_free(g_tok);
    return test_finish();
}
