/* tests/infer/test_engine_demo.c: the engine's text on the whole demo model (30 layers: real
 * answers), CPU:
 *  - a prompt whose answer has multi-byte characters split over byte tokens (Japanese): every
 *    TEXT event is whole UTF-8 characters, together they are the decoded tokens, and the tokens
 *    are qlr_generate's;
 *  - stop strings split across tokens: from an answer's own text, a stop string made of the end of
 *    one token and the start of the next; the request then sends exactly the text before its
 *    first occurrence and finishes with STOP; a stop string never produced changes nothing;
 *  - a stop id ends the request at that token (not counted, not sent). */
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "infer/engine.h"
#include "tests/infer/engine_harness.h"
#include "tests/test_util.h"

static qlr_backend *be;
static qlr_model *m;
static qlr_tokenizer *tok;
static qlr_engine *e;

static void test_utf8(void) {
    qlr_tokens p = eh_chat_prompt(tok, "Write the Japanese word for cat.");
    static eh_out o;
    CHECK_OK(eh_submit(e, p.ids, (int32_t)p.n, 24, NULL, 1.0f, NULL, 0, &o, NULL));
    CHECK(eh_wait(&o));
    CHECK_EQ_INT(o.bad_utf8, 0);
    CHECK_EQ_INT(o.n_ids, o.n_generated);
    /* the text is the tokens decoded (the decoder's bytes are whole characters here) */
    char *dec = NULL;
    size_t dlen = 0;
    CHECK_OK(qlr_tokenizer_decode(tok, o.ids, (size_t)o.n_ids, QLR_DEC_SKIP_SPECIAL, &dec, &dlen));
    CHECK_MSG(dec && dlen == o.len && !memcmp(dec, o.text, dlen), "streamed '%.*s' vs decoded '%s'",
              (int)o.len, o.text, dec ? dec : "");
    /* some token of the answer splits a character, or this test shows nothing */
    int split = 0, multibyte = 0;
    for (int i = 0; i < o.n_ids; i++) {
        size_t n = 0;
        const char *pc = qlr_tokenizer_piece(tok, o.ids[i], &n);
        split |= !eh_utf8_whole(pc, n);
    }
    for (size_t i = 0; i < o.len; i++) multibyte |= (unsigned char)o.text[i] >= 0x80;
    CHECK_MSG(split && multibyte, "the answer '%.*s' has no character split over tokens", (int)o.len,
              o.text);
    int32_t ref[24];
    int nref = eh_generate(m, tok, p.ids, (int32_t)p.n, 24, NULL, 1.0f, NULL, 0, ref);
    CHECK_MSG(nref == o.n_ids && !memcmp(ref, o.ids, (size_t)nref * 4),
              "engine tokens differ from qlr_generate's");
    printf("utf8: '%.*s' (%d tokens, %d TEXT events)\n", (int)o.len, o.text, o.n_ids, o.n_text);
    free(dec);
    qlr_tokens_free(&p);
}

static void test_stop_strings(void) {
    qlr_tokens p = eh_chat_prompt(tok, "Describe the sea in two sentences.");
    static eh_out full, cut, none, sid;
    CHECK_OK(eh_submit(e, p.ids, (int32_t)p.n, 32, NULL, 1.0f, NULL, 0, &full, NULL));
    CHECK(eh_wait(&full));
    /* a stop string across a token boundary: 2 bytes of token i, 2 of token i + 1 (ASCII) */
    size_t off = 0, at = 0;
    for (int i = 0; i + 1 < full.n_ids && !at; i++) {
        size_t n0 = 0, n1 = 0;
        const char *p0 = qlr_tokenizer_piece(tok, full.ids[i], &n0);
        const char *p1 = qlr_tokenizer_piece(tok, full.ids[i + 1], &n1);
        int ascii = 1;
        for (size_t k = 0; k < n0; k++) ascii &= (unsigned char)p0[k] < 0x80;
        for (size_t k = 0; k < n1; k++) ascii &= (unsigned char)p1[k] < 0x80;
        if (i >= 3 && ascii && n0 >= 3 && n1 >= 3) at = off + n0;
        off += n0;
    }
    CHECK_MSG(at > 0 && at + 2 <= full.len, "no two ASCII tokens of 3+ bytes in '%.*s'",
              (int)full.len, full.text);
    if (at == 0 || at + 2 > full.len) goto done;
    char stop[5];
    memcpy(stop, full.text + at - 2, 4);
    stop[4] = 0;
    const char *stops[2] = {"never in this answer \xE2\x9C\x93", stop};
    CHECK_OK(eh_submit(e, p.ids, (int32_t)p.n, 32, NULL, 1.0f, stops, 2, &cut, NULL));
    CHECK(eh_wait(&cut));
    size_t want = 0;
    while (memcmp(full.text + want, stop, 4)) want++; /* the first occurrence */
    CHECK_MSG(cut.len == want && !memcmp(cut.text, full.text, want),
              "stop '%s': sent '%.*s', want '%.*s'", stop, (int)cut.len, cut.text, (int)want,
              full.text);
    CHECK(cut.finish == QLR_FINISH_STOP);
    CHECK(cut.n_generated < full.n_generated);
    printf("stop string '%s' across tokens: sent %zu of %zu bytes\n", stop, cut.len, full.len);
    /* a stop string that never appears: the same text */
    CHECK_OK(eh_submit(e, p.ids, (int32_t)p.n, 32, NULL, 1.0f, stops, 1, &none, NULL));
    CHECK(eh_wait(&none));
    CHECK(none.len == full.len && !memcmp(none.text, full.text, full.len));
    CHECK(none.finish == full.finish);
    /* a stop id: the 5th generated token ends the request and is neither counted nor sent */
    if (full.n_ids > 5) {
        qlr_engine_request r;
        memset(&r, 0, sizeof r);
        r.prompt = p.ids;
        r.n_prompt = (int32_t)p.n;
        r.max_tokens = 32;
        r.sampling = qlr_sampling_default();
        r.stop_ids = &full.ids[4];
        r.n_stop_ids = 1;
        uint64_t id;
        int first = 0;
        while (full.ids[first] != full.ids[4]) first++; /* the id may come earlier */
        CHECK_OK(qlr_engine_submit(e, &r, eh_cb, &sid, &id));
        CHECK(eh_wait(&sid));
        CHECK(sid.finish == QLR_FINISH_STOP);
        CHECK_EQ_INT(sid.n_generated, first);
        CHECK(sid.n_ids == first && !memcmp(sid.ids, full.ids, (size_t)first * 4));
    }
done:
    qlr_tokens_free(&p);
}

/* ignore_eos: an answer that ends at its end-of-turn goes on to max_tokens instead */
static void test_ignore_eos(void) {
    qlr_tokens p = eh_chat_prompt(tok, "Say yes.");
    static eh_out a, b;
    CHECK_OK(eh_submit(e, p.ids, (int32_t)p.n, 40, NULL, 1.0f, NULL, 0, &a, NULL));
    CHECK(eh_wait(&a));
    CHECK_MSG(a.finish == QLR_FINISH_STOP && a.n_generated < 40, "'Say yes.' ran %d tokens (finish %d)",
              a.n_generated, (int)a.finish);
    qlr_engine_request r;
    memset(&r, 0, sizeof r);
    r.prompt = p.ids;
    r.n_prompt = (int32_t)p.n;
    r.max_tokens = 40;
    r.adapter_scale = 1.0f;
    r.sampling = qlr_sampling_default(); /* greedy */
    r.ignore_eos = 1;
    uint64_t id;
    CHECK_OK(qlr_engine_submit(e, &r, eh_cb, &b, &id));
    CHECK(eh_wait(&b));
    CHECK_EQ_INT(b.finish, QLR_FINISH_LENGTH);
    CHECK_EQ_INT(b.n_generated, 40);
    /* the same greedy tokens up to where the first one stopped */
    CHECK(a.n_ids <= b.n_ids && !memcmp(a.ids, b.ids, (size_t)a.n_ids * sizeof *a.ids));
    qlr_tokens_free(&p);
}

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    CHECK_OK(qlr_tokenizer_open_gguf(path, &tok));
    if (!m || !tok) return test_finish();
    qlr_engine_params ep = qlr_engine_params_default();
    ep.max_ctx = 256;
    ep.max_running = 4;
    CHECK_OK(qlr_engine_create(m, tok, NULL, &ep, &e));
    if (!e) return test_finish();
    test_utf8();
    test_stop_strings();
    test_ignore_eos();
    qlr_engine_free(e);
    qlr_tokenizer_free(tok);
    qlr_model_free(m);
    qlr_backend_free(be);
    return test_finish();
}
