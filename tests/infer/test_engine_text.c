/* tests/infer/test_engine_text.c: one request's output text (infer/engine_text.c) with the demo
 * model's tokenizer: every emitted piece is whole UTF-8 characters, also when a character is
 * split over byte tokens (an emoji, CJK); all pieces together are the decoded text; stop strings
 * are found across token boundaries, the text before the first match is sent and never the
 * match; a partial match at the end is sent at the finish; each token's id goes out exactly once
 * and with the piece that completes its text. */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer.h"
#include "infer/engine_internal.h"
#include "tests/test_util.h"

static qlr_tokenizer *tok;

typedef struct {
    char text[4096];
    size_t len;
    int n_emits, bad_utf8;
    int32_t ids[512];
    size_t n_ids;
} sink;

/* 1 when s[0..n) is whole, valid UTF-8 characters. */
static int utf8_whole(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        int k = p[i] < 0x80 ? 1 : (p[i] & 0xE0) == 0xC0 ? 2 : (p[i] & 0xF0) == 0xE0 ? 3
                : (p[i] & 0xF8) == 0xF0 ? 4 : 0;
        if (!k || i + (size_t)k > n) return 0;
        for (int j = 1; j < k; j++)
            if ((p[i + j] & 0xC0) != 0x80) return 0;
        i += (size_t)k;
    }
    return 1;
}

static void emit(void *ud, const char *text, size_t len, const int32_t *ids, size_t n_ids) {
    sink *s = ud;
    CHECK(len > 0);
    if (!utf8_whole(text, len)) s->bad_utf8++;
    if (s->len + len < sizeof s->text) {
        memcpy(s->text + s->len, text, len);
        s->len += len;
    }
    for (size_t i = 0; i < n_ids && s->n_ids < 512; i++) s->ids[s->n_ids++] = ids[i];
    s->n_emits++;
}

static qlr_tokens encode(const char *text) {
    qlr_tokens t = {0};
    CHECK_OK(qlr_tokenizer_encode(tok, text, strlen(text), 0, &t));
    return t;
}

/* Pushes the tokens of `text` with stop strings `stop`; returns the token index at which a stop
 * string ended the stream, or -1 (then finish was called). */
static int run(const char *text, const char *const *stop, int n_stop, sink *s) {
    memset(s, 0, sizeof *s);
    qlr_tokens t = encode(text);
    qlr_etext et;
    CHECK_OK(qlr_etext_init(&et, tok, stop, n_stop));
    int at = -1;
    for (size_t i = 0; i < t.n && at < 0; i++) {
        int stopped = 0;
        CHECK_OK(qlr_etext_push(&et, t.ids[i], emit, s, &stopped));
        if (stopped) at = (int)i;
    }
    if (at < 0) CHECK_OK(qlr_etext_finish(&et, emit, s));
    qlr_etext_free(&et);
    qlr_tokens_free(&t);
    return at;
}

static void test_utf8(void) {
    const char *text = "Hello w\xC3\xB6rld \xF0\x9F\x98\x80 \xE7\x8C\xAB \xE3\x81\x8F\xE3\x82\x89 end";
    /* the emoji must really be split over tokens for this test to mean anything */
    qlr_tokens t = encode(text);
    int split = 0;
    for (size_t i = 0; i < t.n; i++) {
        size_t n = 0;
        const char *p = qlr_tokenizer_piece(tok, t.ids[i], &n);
        split |= !utf8_whole(p, n);
    }
    CHECK_MSG(split, "no token of the test text splits a character (the test would be vacuous)");
    sink s;
    CHECK_EQ_INT(run(text, NULL, 0, &s), -1);
    CHECK_EQ_INT(s.bad_utf8, 0);
    CHECK(s.len == strlen(text) && !memcmp(s.text, text, s.len));
    CHECK_EQ_INT(s.n_ids, t.n);
    int same = s.n_ids == t.n;
    for (size_t i = 0; same && i < t.n; i++) same = s.ids[i] == t.ids[i];
    CHECK_MSG(same, "the ids sent are not the tokens pushed, in order");
    qlr_tokens_free(&t);
}

static void test_stop(void) {
    const char *text = "The quick brown fox jumps over the lazy dog.";
    qlr_tokens t = encode(text);
    /* a stop string made of the end of one token and the start of the next */
    size_t off = 0, cut = 0;
    for (size_t i = 0; i + 1 < t.n && !cut; i++) {
        size_t n0 = 0, n1 = 0;
        qlr_tokenizer_piece(tok, t.ids[i], &n0);
        qlr_tokenizer_piece(tok, t.ids[i + 1], &n1);
        off += n0;
        if (n0 >= 3 && n1 >= 3) cut = off;
    }
    CHECK(cut > 0);
    char stop[8];
    memcpy(stop, text + cut - 2, 4);
    stop[4] = 0;
    const char *stops[1] = {stop};
    sink s;
    int at = run(text, stops, 1, &s);
    CHECK_MSG(at >= 0, "stop string '%s' not found", stop);
    size_t want = (size_t)(strstr(text, stop) - text);
    CHECK_MSG(s.len == want && !memcmp(s.text, text, want), "sent '%.*s', want '%.*s'",
              (int)s.len, s.text, (int)want, text);
    CHECK(strstr(s.text, stop) == NULL);
    /* the earliest of several stop strings wins, wherever it ends */
    const char *two[2] = {"lazy", "fox jumps"};
    run(text, two, 2, &s);
    CHECK(s.len == (size_t)(strstr(text, "fox") - text));
    /* a stop string at the very start: nothing is sent */
    const char *first[1] = {"The q"};
    CHECK(run(text, first, 1, &s) >= 0);
    CHECK_EQ_INT(s.len, 0);
    CHECK_EQ_INT(s.n_emits, 0);
    /* a partial match at the end is ordinary text at the finish */
    const char *tail[1] = {"dog.!"};
    CHECK_EQ_INT(run(text, tail, 1, &s), -1);
    CHECK(s.len == strlen(text) && !memcmp(s.text, text, s.len));
    /* while a possible match is pending, it is held back: after "quick b" with stop "brown cow"
       the text up to "quick " is out and "b..." waits */
    const char *cow[1] = {"brown cow"};
    CHECK_EQ_INT(run(text, cow, 1, &s), -1);
    CHECK(s.len == strlen(text) && !memcmp(s.text, text, s.len));
    CHECK_EQ_INT(s.n_ids, t.n);
    /* a stop string inside the multi-byte text: the characters before it are whole */
    const char *jp = "\xE3\x81\x8F\xE3\x82\x89\xE3\x81\x8D\xE3\x82\x8B (kitto)";
    const char *ki[1] = {"\xE3\x81\x8D"};
    run(jp, ki, 1, &s);
    CHECK(s.len == 6 && !memcmp(s.text, jp, 6));
    CHECK_EQ_INT(s.bad_utf8, 0);
    qlr_tokens_free(&t);
}

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    CHECK_OK(qlr_tokenizer_open_gguf(path, &tok));
    if (!tok) return test_finish();
    test_utf8();
    test_stop();
    qlr_tokenizer_free(tok);
    return test_finish();
}
