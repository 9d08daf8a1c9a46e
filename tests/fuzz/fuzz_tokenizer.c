/* tests/fuzz/fuzz_tokenizer.c: libFuzzer target for data/tokenizer.h and data/chat_template.h.
 * Tokenizes arbitrary bytes (invalid UTF-8 included) with small in-memory vocabularies -- byte-
 * level BPE under each pre-tokenizer, and SPM with byte fallback -- chosen by the first input
 * byte. Byte-level BPE must round-trip exactly; offsets must line up; the streaming decoder must
 * emit valid UTF-8. The input is also fed to chat-template detection and rendering. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"

#define N_TOK 6

static qlr_tokenizer *toks[N_TOK];

static int put_cp(uint32_t cp, char *o) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

/* 256 byte tokens, a few merges and specials; pre = one of ours. */
static qlr_tokenizer *make_bpe(const char *pre) {
    static char bytes[256][4];
    static const char *extra[] = {"Ġt", "he", "Ġthe", "in", "er", "Ġa", "12", "<|im_start|>", "<|im_end|>", "<tool>"};
    static const int32_t extra_type[] = {1, 1, 1, 1, 1, 1, 1, 3, 3, 4};
    static const char *merges[] = {"Ġ t", "h e", "Ġt he", "i n", "e r", "Ġ a", "1 2"};
    qlr_str t[300];
    int32_t ty[300];
    int n = 0;
    uint32_t next = 0x100;
    for (int b = 0; b < 256; b++) {
        int keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        int l = put_cp(keep ? (uint32_t)b : next++, bytes[b]);
        t[n] = (qlr_str){bytes[b], (size_t)l};
        ty[n++] = 1;
    }
    for (int i = 0; i < 10; i++) {
        t[n] = (qlr_str){extra[i], strlen(extra[i])};
        ty[n++] = extra_type[i];
    }
    qlr_str m[7];
    for (int i = 0; i < 7; i++) m[i] = (qlr_str){merges[i], strlen(merges[i])};
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    sp.kind = QLR_TOK_BPE;
    sp.pre = pre;
    sp.n_vocab = n;
    sp.tokens = t;
    sp.token_types = ty;
    sp.merges = m;
    sp.n_merges = 7;
    sp.bos = 256 + 7;
    sp.eos = 256 + 8;
    qlr_tokenizer *tk = NULL;
    if (qlr_tokenizer_create(&sp, &tk) != QLR_OK) abort();
    return tk;
}

static qlr_tokenizer *make_spm(void) {
    static char bytes[256][8];
    static const char *w[] = {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "a", "b", "\xE2\x96\x81" "a", "ab",
                              "\xE2\x96\x81" "ab", "\xC3\xA9"};
    qlr_str t[300];
    int32_t ty[300];
    float sc[300];
    int n = 0;
    for (int i = 0; i < 10; i++) {
        t[n] = (qlr_str){w[i], strlen(w[i])};
        ty[n] = i == 0 ? 2 : i < 3 ? 3 : 1;
        sc[n++] = -(float)i;
    }
    for (int b = 0; b < 256; b++) {
        snprintf(bytes[b], sizeof bytes[b], "<0x%02X>", b);
        t[n] = (qlr_str){bytes[b], 6};
        ty[n] = 6;
        sc[n++] = 0;
    }
    qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
    sp.kind = QLR_TOK_SPM;
    sp.n_vocab = n;
    sp.tokens = t;
    sp.token_types = ty;
    sp.scores = sc;
    sp.bos = 1;
    sp.eos = 2;
    sp.unk = 0;
    qlr_tokenizer *tk = NULL;
    if (qlr_tokenizer_create(&sp, &tk) != QLR_OK) abort();
    return tk;
}

static int valid_utf8(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        size_t l = c < 0x80 ? 1 : (c >= 0xC2 && c <= 0xDF) ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
        if (!l || i + l > n) return 0;
        for (size_t j = 1; j < l; j++)
            if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += l;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!toks[0]) {
        qlr_log_set_level(QLR_LOG_ERROR);
        const char *pres[] = {"gpt-2", "llama-bpe", "qwen2", "smollm", "default"};
        for (int i = 0; i < 5; i++) toks[i] = make_bpe(pres[i]);
        toks[5] = make_spm();
    }
    if (size == 0) return 0;
    qlr_tokenizer *t = toks[data[0] % N_TOK];
    unsigned flags = QLR_ENC_OFFSETS | ((data[0] >> 3) & 1 ? QLR_ENC_PARSE_SPECIAL : 0) |
                     ((data[0] >> 4) & 1 ? QLR_ENC_ADD_SPECIAL : 0);
    const char *text = (const char *)data + 1;
    size_t len = size - 1;

    qlr_tokens v = {0};
    if (qlr_tokenizer_encode(t, text, len, flags, &v) != QLR_OK) abort();
    for (size_t i = 0; i < v.n; i++) {
        if (v.ids[i] < 0 || v.ids[i] >= qlr_tokenizer_n_vocab(t)) abort();
        if (v.offsets[i] > len || (i && v.offsets[i] < v.offsets[i - 1])) abort();
    }
    char *dec = NULL;
    size_t dlen = 0;
    if (qlr_tokenizer_decode(t, v.ids, v.n, QLR_DEC_SKIP_SPECIAL * !(flags & QLR_ENC_PARSE_SPECIAL), &dec, &dlen))
        abort();
    if (qlr_tokenizer_kind(t) == QLR_TOK_BPE && !(flags & QLR_ENC_ADD_SPECIAL) &&
        (dlen != len || memcmp(dec, text, len) != 0))
        abort(); /* byte-level BPE is lossless */
    free(dec);

    qlr_tok_stream s = {0};
    char buf[128];
    for (size_t i = 0; i < v.n; i++) {
        size_t k = qlr_tok_stream_push(t, &s, v.ids[i], 0, buf, sizeof buf);
        if (k > sizeof buf || !valid_utf8((const uint8_t *)buf, k)) abort();
    }
    size_t k = qlr_tok_stream_flush(&s, buf, sizeof buf);
    if (!valid_utf8((const uint8_t *)buf, k)) abort();
    qlr_tokens_free(&v);

    /* chat templates: detection on the raw bytes, rendering of the bytes as content */
    qlr_chat_template *ct = NULL;
    if (qlr_chat_template_detect(text, len, &ct) != QLR_OK) qlr_chat_template_from_name("chatml", &ct);
    char *content = malloc(len + 1);
    if (!content) return 0;
    memcpy(content, text, len);
    content[len] = 0;
    qlr_chat_msg msgs[] = {{"system", content}, {"user", content}, {"assistant", content}};
    qlr_chat_render r;
    if (qlr_chat_render_messages(ct, msgs, 3, data[0] & 1, &r) == QLR_OK) {
        size_t pos = 0;
        for (size_t i = 0; i < r.n_segs; i++) {
            if (r.segs[i].start != pos || r.segs[i].end < r.segs[i].start) abort();
            pos = r.segs[i].end;
        }
        if (pos != r.len) abort();
        qlr_chat_render_free(&r);
    }
    free(content);
    qlr_chat_template_free(ct);
    return 0;
}
