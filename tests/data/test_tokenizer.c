/* tests/data/test_tokenizer.c: the tokenizer against Hugging Face `tokenizers` and hand-made
 * vocabularies. Parity: ids for tests/data/tokenizer/parity.txt on the demo model (SmolLM2,
 * pre = smollm) must match HF token for token -- computed live by tests/tools/tokenizer_ref.py
 * when `tokenizers` and `gguf` import, else read from the committed parity.ids. Pre-token splits
 * of gpt-2 / llama3 / qwen2 / smollm are compared with lists printed by HF's Split(regex).
 * Also: merge order and ties, ignore_merges, special tokens, SPM with byte fallback and space
 * prefix, streaming decode, error messages, and speed on 1 MB of text. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/core.h"
#include "data/tokenizer.h"
#include "data/tokenizer_internal.h"
#include "formats/gguf.h"
#include "tests/test_util.h"

static char *read_file(const char *path, size_t *n) {
    char *d = NULL;
    if (qlr_file_read_all(path, 1 << 26, &d, n) != QLR_OK) return NULL;
    return d;
}

static const char *demo_model(void) {
    return test_demo_model();
}

/* Reads whitespace-separated ids; returns the count (malloc'ed array in *ids). */
static size_t parse_ids(const char *s, int32_t **ids) {
    size_t cap = 1024, n = 0;
    int32_t *v = malloc(cap * sizeof *v);
    char *end;
    for (;;) {
        while (*s == ' ' || *s == '\n' || *s == '\r' || *s == '\t') s++;
        if (!*s) break;
        long x = strtol(s, &end, 10);
        if (end == s) break;
        if (n == cap) v = realloc(v, (cap *= 2) * sizeof *v);
        v[n++] = (int32_t)x;
        s = end;
    }
    *ids = v;
    return n;
}

/* Expected ids from Python when possible; NULL + message otherwise. */
static char *python_ids(const char *model, const char *text_path) {
    if (system("python3 -c 'import tokenizers, gguf' >/dev/null 2>&1") != 0) return NULL;
    char cmd[4096];
    snprintf(cmd, sizeof cmd, "python3 '%s/tests/tools/tokenizer_ref.py' ids '%s' '%s'", QLR_SOURCE_DIR, model,
             text_path);
    FILE *p = popen(cmd, "r");
    if (!p) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    size_t r;
    while ((r = fread(buf + n, 1, cap - n - 1, p)) > 0) {
        n += r;
        if (n + 1 >= cap) buf = realloc(buf, cap *= 2);
    }
    buf[n] = 0;
    if (pclose(p) != 0) {
        free(buf);
        return NULL;
    }
    return buf;
}

static void test_parity(void) {
    const char *model = demo_model();
    if (!qlr_path_exists(model)) {
        CHECK_MSG(0, "demo model %s not found: run scripts/setup.sh (or set QLR_DEMO_MODEL)", model);
        return;
    }
    qlr_tokenizer *t;
    CHECK_OK(qlr_tokenizer_open_gguf(model, &t));
    if (!t) return;
    CHECK_EQ_INT(qlr_tokenizer_kind(t), QLR_TOK_BPE);
    CHECK_EQ_INT(qlr_tokenizer_pre(t), QLR_TOK_PRE_SMOLLM);
    CHECK_EQ_INT(qlr_tokenizer_n_vocab(t), 49152);
    CHECK_EQ_INT(qlr_tokenizer_bos(t), 1);
    CHECK_EQ_INT(qlr_tokenizer_eos(t), 2);
    CHECK_EQ_INT(qlr_tokenizer_eot(t), 2); /* <|im_end|> */
    CHECK_EQ_INT(qlr_tokenizer_add_bos(t), 0);
    CHECK(qlr_tokenizer_chat_template(t) && strstr(qlr_tokenizer_chat_template(t), "<|im_start|>"));

    const char *text_path = QLR_TEST_DATA "/tokenizer/parity.txt";
    size_t tlen;
    char *text = read_file(text_path, &tlen);
    CHECK_MSG(text != NULL, "cannot read %s", text_path);
    if (!text) { qlr_tokenizer_free(t); return; }
    char *exp_txt = python_ids(model, text_path);
    const char *src = "python tokenizers";
    if (!exp_txt) {
        size_t n;
        exp_txt = read_file(QLR_TEST_DATA "/tokenizer/parity.ids", &n);
        src = "committed parity.ids";
    }
    printf("parity: expected ids from %s\n", src);
    CHECK(exp_txt != NULL);
    int32_t *exp = NULL;
    size_t n_exp = exp_txt ? parse_ids(exp_txt, &exp) : 0;
    CHECK(n_exp > 100);

    qlr_tokens tok = {0};
    CHECK_OK(qlr_tokenizer_encode(t, text, tlen, QLR_ENC_PARSE_SPECIAL | QLR_ENC_OFFSETS, &tok));
    CHECK_EQ_INT(tok.n, n_exp);
    size_t first_diff = (size_t)-1;
    for (size_t i = 0; i < tok.n && i < n_exp; i++)
        if (tok.ids[i] != exp[i]) { first_diff = i; break; }
    if (first_diff != (size_t)-1) {
        size_t i = first_diff;
        CHECK_MSG(0, "parity: token %zu is %d ('%s'), expected %d ('%s'), at byte %zu", i, (int)tok.ids[i],
                  qlr_tokenizer_token_text(t, tok.ids[i]), (int)exp[i], qlr_tokenizer_token_text(t, exp[i]),
                  tok.offsets[i]);
    } else {
        CHECK(1);
    }
    /* offsets: each token's piece is the text at its offset */
    int offs_ok = 1;
    for (size_t i = 0; i < tok.n; i++) {
        size_t pl;
        const char *p = qlr_tokenizer_piece(t, tok.ids[i], &pl);
        size_t next = i + 1 < tok.n ? tok.offsets[i + 1] : tlen;
        if (tok.offsets[i] + pl != next || memcmp(text + tok.offsets[i], p, pl) != 0) offs_ok = 0;
    }
    CHECK_MSG(offs_ok, "offsets do not line up with the pieces");
    /* round trip */
    char *dec;
    size_t dlen;
    CHECK_OK(qlr_tokenizer_decode(t, tok.ids, tok.n, 0, &dec, &dlen));
    CHECK_EQ_INT(dlen, tlen);
    CHECK(dec && dlen == tlen && memcmp(dec, text, tlen) == 0);
    free(dec);
    /* skip_special drops <|im_start|> etc. */
    CHECK_OK(qlr_tokenizer_decode(t, tok.ids, tok.n, QLR_DEC_SKIP_SPECIAL, &dec, &dlen));
    CHECK(dec && !strstr(dec, "<|im_end|>") && strstr(dec, "hi and  done"));
    free(dec);

    /* streaming: one id at a time reproduces the (valid UTF-8) text */
    qlr_tok_stream s = {0};
    char *acc = malloc(tlen * 4 + 16), buf[256];
    size_t an = 0;
    for (size_t i = 0; i < tok.n; i++) {
        size_t k = qlr_tok_stream_push(t, &s, tok.ids[i], 0, buf, sizeof buf);
        CHECK(k <= sizeof buf);
        memcpy(acc + an, buf, k);
        an += k;
    }
    an += qlr_tok_stream_flush(&s, acc + an, 8);
    CHECK_EQ_INT(an, tlen);
    CHECK(an == tlen && memcmp(acc, text, tlen) == 0);
    free(acc);

    /* without parse_special the control tokens are plain text */
    qlr_tokens t2 = {0};
    CHECK_OK(qlr_tokenizer_encode(t, "<|im_end|>", 10, 0, &t2));
    CHECK(t2.n > 1);
    qlr_tokens_clear(&t2);
    CHECK_OK(qlr_tokenizer_encode(t, "<|im_end|>", 10, QLR_ENC_PARSE_SPECIAL, &t2));
    CHECK(t2.n == 1 && t2.ids[0] == 2);
    qlr_tokens_free(&t2);

    /* speed: ~1 MB of mixed text on one core */
    size_t big_n = 0, target = 1 << 20;
    char *big = malloc(target + tlen);
    while (big_n < target) {
        memcpy(big + big_n, text, tlen);
        big_n += tlen;
    }
    qlr_tokens tb = {0};
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    CHECK_OK(qlr_tokenizer_encode(t, big, big_n, 0, &tb));
    clock_gettime(CLOCK_MONOTONIC, &b);
    double sec = (double)(b.tv_sec - a.tv_sec) + 1e-9 * (double)(b.tv_nsec - a.tv_nsec);
    printf("speed: %zu bytes -> %zu tokens in %.3f s (%.2f MB/s)\n", big_n, tb.n, sec, big_n / sec / 1e6);
    CHECK_MSG(sec < 5.0, "tokenizing 1 MB took %.2f s (budget: about 1 s)", sec);
    qlr_tokens_free(&tb);
    free(big);

    qlr_tokens_free(&tok);
    free(exp);
    free(exp_txt);
    free(text);
    qlr_tokenizer_free(t);
}

/* ---- hand-made byte-level vocabularies ---- */

static int cp_put(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* 256 byte tokens (GPT-2 map) + extra tokens; returns a tokenizer. */
static qlr_tokenizer *byte_vocab(const char *pre, const char *const *extra, int n_extra, const int32_t *extra_types,
                                 const char *const *merges, int n_merges) {
    static char store[256][4];
    qlr_str toks[512];
    int32_t types[512];
    int n = 0;
    uint32_t next = 0x100;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        uint32_t cp = keep ? (uint32_t)b : next++;
        int l = cp_put(cp, store[b]);
        toks[n] = (qlr_str){store[b], (size_t)l};
        types[n++] = QLR_TOKTYPE_NORMAL;
    }
    for (int i = 0; i < n_extra; i++) {
        toks[n] = (qlr_str){extra[i], strlen(extra[i])};
        types[n++] = extra_types ? extra_types[i] : QLR_TOKTYPE_NORMAL;
    }
    qlr_str ms[64];
    for (int i = 0; i < n_merges; i++) ms[i] = (qlr_str){merges[i], strlen(merges[i])};
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    sp.kind = QLR_TOK_BPE;
    sp.pre = pre;
    sp.n_vocab = n;
    sp.tokens = toks;
    sp.token_types = types;
    sp.merges = ms;
    sp.n_merges = n_merges;
    qlr_tokenizer *t = NULL;
    CHECK_OK(qlr_tokenizer_create(&sp, &t));
    return t;
}

typedef struct { char out[4096]; size_t n; } split_acc;

static void on_piece(void *ctx, const char *s, size_t n) {
    split_acc *a = ctx;
    if (a->n + n + 1 < sizeof a->out) {
        memcpy(a->out + a->n, s, n);
        a->n += n;
        a->out[a->n++] = '|';
        a->out[a->n] = 0;
    }
}

/* expected: the pre-tokens joined with '|' (and a trailing '|'), as HF's Split(regex) prints them */
static void check_split(const char *pre, const char *text, const char *expected) {
    qlr_tokenizer *t = byte_vocab(pre, NULL, 0, NULL, NULL, 0);
    if (!t) return;
    split_acc a = {{0}, 0};
    CHECK_OK(qlr_tok_pre_tokenize(t, text, strlen(text), on_piece, &a));
    CHECK_MSG(strcmp(a.out, expected) == 0, "%s split of '%s':\n  got      %s\n  expected %s", pre, text, a.out,
              expected);
    qlr_tokenizer_free(t);
}

static void test_splits(void) {
    /* expected lists printed by HF tokenizers (tests/tools/tokenizer_ref.py split PRE FILE) */
    const char *s1 = "Hello world's  end\n\n  x 12345 ab-cd!!";
    const char *s2 = "I'M here   \tnow\r\n";
    check_split("gpt-2", s1, "Hello| world|'s| | end|\n\n | x| 12345| ab|-|cd|!!|");
    check_split("gpt-2", s2, "I|'|M| here|   |\t|now|\r\n|");
    check_split("llama-bpe", s1, "Hello| world|'s| | end|\n\n| | x| |123|45| ab|-cd|!!|");
    check_split("llama-bpe", s2, "I|'M| here|   |\tnow|\r\n|");
    check_split("llama-bpe", "(foo) ...\n\nbar 1234567", "(foo|)| ...\n\n|bar| |123|456|7|");
    check_split("qwen2", s1, "Hello| world|'s| | end|\n\n| | x| |1|2|3|4|5| ab|-cd|!!|");
    check_split("qwen2", s2, "I|'M| here|   |\tnow|\r\n|");
    check_split("smollm", "abc 2024 x1y", "abc| |2|0|2|4| x|1|y|");
    check_split("smollm", " 12 ab", " |1|2| ab|");
    /* invalid UTF-8 is never matched by the regex: the bytes become pre-tokens of their own */
    check_split("gpt-2", "ab\xff\xfe cd", "ab|\xff\xfe| cd|");
}

static void test_merges(void) {
    const char *extra[] = {"aa", "aaa", "ab", "Ġa", "Ġaa"};
    const char *merges[] = {"a a", "aa a", "a b", "Ġ a", "Ġa a"};
    qlr_tokenizer *t = byte_vocab("gpt-2", extra, 5, NULL, merges, 5);
    if (!t) return;
    int32_t aa = 256, aaa = 257, ab = 258; /* byte tokens sit at their byte's id */
    qlr_tokens v = {0};
    /* "aaaa": a a -> leftmost first: [aa][a][a] -> (aa a) rank1 vs (a a) rank0 at pos 2 -> [aa][aa] */
    CHECK_OK(qlr_tokenizer_encode(t, "aaaa", 4, 0, &v));
    CHECK(v.n == 2 && v.ids[0] == aa && v.ids[1] == aa);
    qlr_tokens_clear(&v);
    CHECK_OK(qlr_tokenizer_encode(t, "aaa", 3, 0, &v));
    CHECK(v.n == 1 && v.ids[0] == aaa);
    qlr_tokens_clear(&v);
    /* "aab": (a a) rank 0 beats (a b) rank 2 -> [aa][b] */
    CHECK_OK(qlr_tokenizer_encode(t, "aab", 3, 0, &v));
    CHECK(v.n == 2 && v.ids[0] == aa && v.ids[1] == 'b');
    qlr_tokens_clear(&v);
    /* " aa": (a a) rank 0 first leaves [Ġ][aa]; no merge "Ġ aa" exists */
    CHECK_OK(qlr_tokenizer_encode(t, "ab aa", 5, 0, &v));
    CHECK(v.n == 3 && v.ids[0] == ab && v.ids[1] == ' ' && v.ids[2] == aa);
    qlr_tokens_clear(&v);
    CHECK_OK(qlr_tokenizer_encode(t, " a", 2, 0, &v));
    CHECK(v.n == 1 && v.ids[0] == 259);
    qlr_tokens_clear(&v);
    CHECK_OK(qlr_tokenizer_encode(t, " aaa", 4, 0, &v));
    CHECK(v.n == 2 && v.ids[0] == ' ' && v.ids[1] == aaa);
    qlr_tokens_clear(&v);
    /* bytes without merges: one token per byte, including invalid UTF-8 */
    CHECK_OK(qlr_tokenizer_encode(t, "\xff\x00z", 3, 0, &v));
    CHECK_EQ_INT(v.n, 3);
    char *d;
    size_t dn;
    CHECK_OK(qlr_tokenizer_decode(t, v.ids, v.n, 0, &d, &dn));
    CHECK(dn == 3 && memcmp(d, "\xff\x00z", 3) == 0);
    free(d);
    qlr_tokens_free(&v);
    qlr_tokenizer_free(t);

    /* llama3 ignore_merges: a pre-token that is a token is emitted whole even with no merge path */
    const char *e2[] = {"hello", "Ġworld"};
    t = byte_vocab("llama-bpe", e2, 2, NULL, NULL, 0);
    if (!t) return;
    CHECK_OK(qlr_tokenizer_encode(t, "hello worlds", 12, 0, &v));
    CHECK(v.n == 8 && v.ids[0] == 256 && v.ids[1] == ' '); /* byte tokens sit at their byte's id */
    qlr_tokens_free(&v);
    CHECK_OK(qlr_tokenizer_encode(t, "hello world", 11, 0, &v));
    CHECK(v.n == 2 && v.ids[0] == 256 && v.ids[1] == 257);
    CHECK_EQ_INT(qlr_tokenizer_add_bos(t), 0); /* no bos token: flag dropped */
    qlr_tokens_free(&v);
    qlr_tokenizer_free(t);
}

static void test_specials(void) {
    const char *extra[] = {"<|im_start|>", "<|im_end|>", "<tool>", "<|im"};
    int32_t types[] = {QLR_TOKTYPE_CONTROL, QLR_TOKTYPE_CONTROL, QLR_TOKTYPE_USER_DEFINED, QLR_TOKTYPE_CONTROL};
    qlr_tokenizer *t = byte_vocab("smollm", extra, 4, types, NULL, 0);
    if (!t) return;
    CHECK_EQ_INT(qlr_tokenizer_eot(t), 257);
    qlr_tokens v = {0};
    const char *s = "a<|im_start|>b<tool>";
    CHECK_OK(qlr_tokenizer_encode(t, s, strlen(s), QLR_ENC_PARSE_SPECIAL | QLR_ENC_OFFSETS, &v));
    CHECK(v.n == 4 && v.ids[1] == 256 && v.ids[3] == 258);
    CHECK(v.n == 4 && v.offsets[1] == 1 && v.offsets[2] == 13 && v.offsets[3] == 14);
    qlr_tokens_clear(&v);
    /* without parse_special: control tokens are text, user-defined still match */
    CHECK_OK(qlr_tokenizer_encode(t, s, strlen(s), 0, &v));
    CHECK(v.n == 15 && v.ids[14] == 258); /* 14 bytes of text ("<|im" is control too) + <tool> */
    qlr_tokens_free(&v);
    qlr_tokenizer_free(t);
}

/* ---- SentencePiece-style ---- */

static qlr_tokenizer *spm_vocab(void) {
    static char bytes[256][8];
    const char *words[] = {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "h", "e", "l", "o", "w", "r", "d",
                           "\xE2\x96\x81h", "he", "ll", "llo", "\xE2\x96\x81he", "\xE2\x96\x81hello", "\xE2\x96\x81w",
                           "or", "\xE2\x96\x81wor", "ld", "\xE2\x96\x81world", "\xE2\x96\x81hell"};
    float wscore[] = {0, 0, 0, -1, -2, -2, -2, -2, -2, -2, -2, -3, -4, -5, -6, -7, -8, -3, -4, -5, -6, -7, -20};
    int nw = (int)(sizeof words / sizeof words[0]);
    qlr_str toks[300];
    int32_t types[300];
    float scores[300];
    int n = 0;
    for (int i = 0; i < nw; i++) {
        toks[n] = (qlr_str){words[i], strlen(words[i])};
        types[n] = i == 0 ? QLR_TOKTYPE_UNKNOWN : i < 3 ? QLR_TOKTYPE_CONTROL : QLR_TOKTYPE_NORMAL;
        scores[n++] = wscore[i];
    }
    for (int b = 0; b < 256; b++) {
        snprintf(bytes[b], sizeof bytes[b], "<0x%02X>", b);
        toks[n] = (qlr_str){bytes[b], 6};
        types[n] = QLR_TOKTYPE_BYTE;
        scores[n++] = 0;
    }
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    sp.kind = QLR_TOK_SPM;
    sp.n_vocab = n;
    sp.tokens = toks;
    sp.token_types = types;
    sp.scores = scores;
    sp.bos = 1;
    sp.eos = 2;
    sp.unk = 0;
    qlr_tokenizer *t = NULL;
    CHECK_OK(qlr_tokenizer_create(&sp, &t));
    return t;
}

static void test_spm(void) {
    qlr_tokenizer *t = spm_vocab();
    if (!t) return;
    CHECK_EQ_INT(qlr_tokenizer_add_bos(t), 1);
    qlr_tokens v = {0};
    CHECK_OK(qlr_tokenizer_encode(t, "hello world", 11, QLR_ENC_ADD_SPECIAL, &v));
    CHECK(v.n == 3 && v.ids[0] == 1 && v.ids[1] == 16 && v.ids[2] == 21);
    char *d;
    size_t dn;
    CHECK_OK(qlr_tokenizer_decode(t, v.ids, v.n, QLR_DEC_SKIP_SPECIAL, &d, &dn));
    CHECK(d && strcmp(d, "hello world") == 0);
    free(d);
    qlr_tokens_clear(&v);
    /* byte fallback: 'i' and 'é' are not in the vocabulary */
    CHECK_OK(qlr_tokenizer_encode(t, "hi \xC3\xA9", 5, 0, &v));
    int32_t b_i = 23 + 'i', b_c3 = 23 + 0xC3, b_a9 = 23 + 0xA9;
    CHECK(v.n == 5 && v.ids[0] == 11 && v.ids[1] == b_i && v.ids[2] == 3 && v.ids[3] == b_c3 && v.ids[4] == b_a9);
    CHECK_OK(qlr_tokenizer_decode(t, v.ids, v.n, 0, &d, &dn));
    CHECK(d && strcmp(d, "hi \xC3\xA9") == 0);
    free(d);
    /* streaming holds the first byte of é until the second arrives */
    qlr_tok_stream s = {0};
    char buf[32];
    size_t k = 0, tot = 0;
    char acc[64];
    for (size_t i = 0; i < v.n; i++) {
        k = qlr_tok_stream_push(t, &s, v.ids[i], 0, buf, sizeof buf);
        if (i == 3) CHECK_EQ_INT(k, 0);
        memcpy(acc + tot, buf, k);
        tot += k;
    }
    CHECK(tot == 6 && memcmp(acc, " hi \xC3\xA9", 6) == 0);
    /* a lone lead byte then ASCII: U+FFFD then the ASCII */
    k = qlr_tok_stream_push(t, &s, b_c3, 0, buf, sizeof buf);
    CHECK_EQ_INT(k, 0);
    k = qlr_tok_stream_push(t, &s, 23 + 'A', 0, buf, sizeof buf);
    CHECK(k == 4 && memcmp(buf, "\xEF\xBF\xBD" "A", 4) == 0);
    k = qlr_tok_stream_push(t, &s, b_c3, 0, buf, sizeof buf);
    CHECK_EQ_INT(qlr_tok_stream_flush(&s, buf, sizeof buf), 3);
    qlr_tokens_free(&v);
    qlr_tokenizer_free(t);
}

static void test_errors(void) {
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    qlr_tokenizer *t = (qlr_tokenizer *)1;
    sp.kind = QLR_TOK_BPE;
    CHECK(qlr_tokenizer_create(&sp, &t) == QLR_ERR_INVALID && t == NULL);
    CHECK(strstr(qlr_error_msg(), "no vocabulary") != NULL);
    qlr_str toks[] = {{"a", 1}, {"b", 1}, {"ab", 2}};
    qlr_str merges[] = {{"a b", 3}, {"ab", 2}};
    sp.n_vocab = 3;
    sp.tokens = toks;
    sp.merges = merges;
    sp.n_merges = 2;
    CHECK(qlr_tokenizer_create(&sp, &t) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "tokenizer.ggml.merges: entry 1") && strstr(qlr_error_msg(), "no space"),
              "message: %s", qlr_error_msg());
    sp.n_merges = 1;
    sp.pre = "klingon";
    CHECK(qlr_tokenizer_create(&sp, &t) == QLR_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(qlr_error_msg(), "klingon") && strstr(qlr_error_msg(), "llama-bpe"), "message: %s",
              qlr_error_msg());
    sp.pre = "gpt-2";
    CHECK_OK(qlr_tokenizer_create(&sp, &t));
    int32_t bad = 7;
    char *d;
    size_t dn;
    CHECK(qlr_tokenizer_decode(t, &bad, 1, 0, &d, &dn) == QLR_ERR_RANGE);
    qlr_tokenizer_free(t);

    /* GGUF without a vocabulary, and with a broken merge */
    char path[512];
    snprintf(path, sizeof path, "%s/novocab.gguf", test_tmpdir());
    qlr_gguf_writer *w = qlr_gguf_writer_create(0);
    CHECK_OK(qlr_gguf_set_str(w, "general.architecture", "llama"));
    CHECK_OK(qlr_gguf_writer_write(w, path));
    qlr_gguf_writer_free(w);
    CHECK(qlr_tokenizer_open_gguf(path, &t) == QLR_ERR_NOT_FOUND);
    CHECK_MSG(strstr(qlr_error_msg(), "no vocabulary") != NULL, "message: %s", qlr_error_msg());

    snprintf(path, sizeof path, "%s/badmerge.gguf", test_tmpdir());
    w = qlr_gguf_writer_create(0);
    const char *tk[] = {"a", "b", "ab"};
    const char *mg[] = {"a b", "a b", "ab"};
    CHECK_OK(qlr_gguf_set_str(w, "tokenizer.ggml.model", "gpt2"));
    CHECK_OK(qlr_gguf_set_str(w, "tokenizer.ggml.pre", "smollm"));
    CHECK_OK(qlr_gguf_set_arr_str(w, "tokenizer.ggml.tokens", tk, 3));
    CHECK_OK(qlr_gguf_set_arr_str(w, "tokenizer.ggml.merges", mg, 3));
    CHECK_OK(qlr_gguf_writer_write(w, path));
    qlr_gguf_writer_free(w);
    CHECK(qlr_tokenizer_open_gguf(path, &t) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "tokenizer.ggml.merges: entry 2") != NULL, "message: %s", qlr_error_msg());
}

static void write_text(const char *path, const char *s) {
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) return;
    fputs(s, f);
    fclose(f);
}

/* tokenizer.json + tokenizer_config.json, hand-written (SmolLM2's structure, tiny vocabulary) */
static void test_hf_json(void) {
    char dir[512], path[600];
    snprintf(dir, sizeof dir, "%s/hf_tok", test_tmpdir());
    CHECK_OK(qlr_mkdir_p(dir));
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    write_text(path,
               "{\"version\": \"1.0\", \"added_tokens\": ["
               "{\"id\": 0, \"content\": \"<|endoftext|>\", \"special\": true},"
               "{\"id\": 1, \"content\": \"<|im_start|>\", \"special\": true},"
               "{\"id\": 2, \"content\": \"<|im_end|>\", \"special\": true}],"
               "\"normalizer\": null,"
               "\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": ["
               "{\"type\": \"Digits\", \"individual_digits\": true},"
               "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}]},"
               "\"decoder\": {\"type\": \"ByteLevel\"},"
               "\"model\": {\"type\": \"BPE\", \"vocab\": {\"<|endoftext|>\": 0, \"<|im_start|>\": 1, \"<|im_end|>\": 2,"
               "\"h\": 3, \"i\": 4, \"\\u0120\": 5, \"1\": 6, \"2\": 7, \"hi\": 8, \"\\u0120hi\": 9},"
               "\"merges\": [\"h i\", [\"\\u0120\", \"hi\"]]}}");
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    write_text(path, "{\"bos_token\": \"<|im_start|>\", \"eos_token\": {\"content\": \"<|im_end|>\"},"
                     "\"add_bos_token\": false, \"chat_template\": \"{{ '<|im_start|>' }}\"}");
    qlr_tokenizer *t = NULL;
    CHECK_OK(qlr_tokenizer_load_hf(dir, &t));
    if (!t) return;
    CHECK_EQ_INT(qlr_tokenizer_pre(t), QLR_TOK_PRE_SMOLLM);
    CHECK_EQ_INT(qlr_tokenizer_n_vocab(t), 10);
    CHECK_EQ_INT(qlr_tokenizer_bos(t), 1);
    CHECK_EQ_INT(qlr_tokenizer_eos(t), 2);
    CHECK(qlr_tokenizer_chat_template(t) && strcmp(qlr_tokenizer_chat_template(t), "{{ '<|im_start|>' }}") == 0);
    qlr_tokens v = {0};
    const char *s = "hi hi12<|im_end|>";
    CHECK_OK(qlr_tokenizer_encode(t, s, strlen(s), QLR_ENC_PARSE_SPECIAL, &v));
    CHECK(v.n == 5 && v.ids[0] == 8 && v.ids[1] == 9 && v.ids[2] == 6 && v.ids[3] == 7 && v.ids[4] == 2);
    qlr_tokens_free(&v);
    qlr_tokenizer_free(t);

    /* an unknown pre-tokenizer is refused, naming it */
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    write_text(path, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []},"
                     "\"pre_tokenizer\": {\"type\": \"Whitespace\"}}");
    CHECK(qlr_tokenizer_load_hf(path, &t) == QLR_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(qlr_error_msg(), "Whitespace") != NULL, "message: %s", qlr_error_msg());
    write_text(path, "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}");
    CHECK(qlr_tokenizer_load_hf(path, &t) == QLR_ERR_FORMAT);
    CHECK_MSG(strstr(qlr_error_msg(), "no vocabulary") != NULL, "message: %s", qlr_error_msg());
}

int main(void) {
    test_hf_json();
    test_splits();
    test_merges();
    test_specials();
    test_spm();
    test_errors();
    test_parity();
    return test_finish();
}
