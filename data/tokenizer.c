/* data/tokenizer.c: the tokenizer object, encoding and decoding (byte-level BPE and SPM).
 *
 * Owns the vocabulary hash map, the merge-pair map, the PCRE2 pre-tokenizer regexes (compiled
 * once per tokenizer, matched with a per-call match block so encode is thread-safe), the
 * special-token matcher and the per-token decoded pieces. Loading from GGUF / tokenizer.json
 * lives in tokenizer_load.c; both end in qlr_tokenizer_create. Regexes follow
 * docs/FORMATS.md §7.2, with \s spelled out as the Unicode White_Space set that
 * Hugging Face's Oniguruma uses (PCRE2's own \s misses U+0085). */
#define _GNU_SOURCE /* qsort_r */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/tokenizer.h"

#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "data/tokenizer_internal.h"

/* ------------------------------------------------------------------------------------------ */
/* hashing                                                                                     */

static uint32_t hash_bytes(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

int32_t qlr_tok_vocab_find(const qlr_tokenizer *t, const char *s, size_t n) {
    if (!t->vmap) return -1;
    uint32_t h = hash_bytes(s, n);
    size_t mask = t->vmap_cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        int32_t id = t->vmap[i];
        if (id < 0) return -1;
        if (t->vmap_hash[i] == h && t->tok_len[id] == n && memcmp(t->tok_text[id], s, n) == 0) return id;
    }
}

/* Inserts id; returns the existing id when the text is already present, else -1. */
static int32_t vocab_insert(qlr_tokenizer *t, int32_t id) {
    uint32_t h = hash_bytes(t->tok_text[id], t->tok_len[id]);
    size_t mask = t->vmap_cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        int32_t o = t->vmap[i];
        if (o < 0) {
            t->vmap[i] = id;
            t->vmap_hash[i] = h;
            return -1;
        }
        if (t->vmap_hash[i] == h && t->tok_len[o] == t->tok_len[id] &&
            memcmp(t->tok_text[o], t->tok_text[id], t->tok_len[id]) == 0)
            return o;
    }
}

/* pair (a, b) -> (rank, merged id) */
static int pair_find(const qlr_tokenizer *t, int32_t a, int32_t b, int32_t *rank, int32_t *merged) {
    if (!t->pmap_cap) return 0;
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t mask = t->pmap_cap - 1;
    for (size_t i = hash_u64(key) & mask;; i = (i + 1) & mask) {
        if (t->pmap[i].rank < 0) return 0;
        if (t->pmap[i].key == key) {
            *rank = t->pmap[i].rank;
            *merged = t->pmap[i].merged;
            return 1;
        }
    }
}

/* Keeps the first (lowest) rank for a pair listed twice. */
static void pair_insert(qlr_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t mask = t->pmap_cap - 1;
    for (size_t i = hash_u64(key) & mask;; i = (i + 1) & mask) {
        if (t->pmap[i].rank < 0) {
            t->pmap[i].key = key;
            t->pmap[i].rank = rank;
            t->pmap[i].merged = merged;
            return;
        }
        if (t->pmap[i].key == key) return;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* UTF-8 and the GPT-2 byte map                                                               */

/* Length of the valid UTF-8 sequence starting at s[0] (1..4), or 0 if invalid / truncated. */
static int utf8_valid_len(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    int len;
    uint32_t min;
    if (c >= 0xC2 && c <= 0xDF) len = 2, min = 0x80;
    else if ((c & 0xF0) == 0xE0) len = 3, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, min = 0x10000;
    else return 0;
    if ((size_t)len > n) return 0;
    uint32_t cp = c & (0x7F >> len);
    for (int i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

/* Length a lead byte announces (1..4), 0 for a continuation or invalid lead. */
static int utf8_lead_len(uint8_t c) {
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return 2;
    if ((c & 0xF0) == 0xE0) return 3;
    if (c >= 0xF0 && c <= 0xF4) return 4;
    return 0;
}

static int utf8_put(uint32_t cp, char *out) {
    if (cp < 0x80) { out[0] = (char)cp; return 1; }
    if (cp < 0x800) { out[0] = (char)(0xC0 | (cp >> 6)); out[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decodes one code point (valid UTF-8 assumed checked by the caller); returns its length. */
static int utf8_get(const uint8_t *s, size_t n, uint32_t *cp) {
    int len = utf8_valid_len(s, n);
    if (len == 0) { *cp = 0xFFFFFFFFu; return 1; }
    uint32_t c = s[0] & (len == 1 ? 0x7F : (0x7F >> len));
    for (int i = 1; i < len; i++) c = (c << 6) | (s[i] & 0x3F);
    *cp = c;
    return len;
}

/* GPT-2 bytes_to_unicode: printable Latin-1 bytes map to themselves, the other 68 to
 * U+0100.. in increasing byte order. */
static uint32_t byte_to_cp(uint8_t b) {
    static uint32_t table[256];
    static int init;
    if (!init) {
        uint32_t next = 0x100;
        for (int i = 0; i < 256; i++) {
            int keep = (i >= 0x21 && i <= 0x7E) || (i >= 0xA1 && i <= 0xAC) || (i >= 0xAE && i <= 0xFF);
            table[i] = keep ? (uint32_t)i : next++;
        }
        __atomic_store_n(&init, 1, __ATOMIC_RELEASE);
    }
    return table[b];
}

static int cp_to_byte(uint32_t cp) {
    if (cp >= 0x21 && cp <= 0x7E) return (int)cp;
    if ((cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF)) return (int)cp;
    if (cp < 0x100 || cp >= 0x100 + 68) return -1;
    for (int b = 0; b < 256; b++)
        if (byte_to_cp((uint8_t)b) == cp) return b;
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* pre-tokenizer regexes                                                                      */

/* Unicode White_Space, as \s means in Oniguruma (Hugging Face tokenizers). */
#define WS "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

static const char RE_GPT2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+|[" WS "]+(?![^" WS "])|[" WS "]+";
static const char RE_LLAMA3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*"
    "|[" WS "]*[\\r\\n]+|[" WS "]+(?![^" WS "])|[" WS "]+";
static const char RE_QWEN2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*"
    "|[" WS "]*[\\r\\n]+|[" WS "]+(?![^" WS "])|[" WS "]+";
static const char RE_DIGIT[] = "\\p{N}";
static const char RE_DEF_PUNCT[] = "[\\p{P}\\$\\+<=>\\^~\\|]+";
static const char RE_DEF_NUM[] = "\\p{N}+";
static const char RE_DEF_3DIG[] = "[0-9][0-9][0-9]";

static const struct {
    const char *name;
    qlr_tok_pre pre;
} PRE_NAMES[] = {
    {"default", QLR_TOK_PRE_DEFAULT},   {"gpt-2", QLR_TOK_PRE_GPT2},       {"gpt2", QLR_TOK_PRE_GPT2},
    {"phi-2", QLR_TOK_PRE_GPT2},        {"jina-es", QLR_TOK_PRE_GPT2},     {"jina-de", QLR_TOK_PRE_GPT2},
    {"llama-bpe", QLR_TOK_PRE_LLAMA3},  {"llama3", QLR_TOK_PRE_LLAMA3},    {"llama-v3", QLR_TOK_PRE_LLAMA3},
    {"falcon3", QLR_TOK_PRE_LLAMA3},    {"qwen2", QLR_TOK_PRE_QWEN2},      {"deepseek-r1-qwen", QLR_TOK_PRE_QWEN2},
    {"smollm", QLR_TOK_PRE_SMOLLM},     {"starcoder", QLR_TOK_PRE_SMOLLM}, {"refact", QLR_TOK_PRE_SMOLLM},
    {"command-r", QLR_TOK_PRE_SMOLLM},  {"codeshell", QLR_TOK_PRE_SMOLLM}, {"exaone", QLR_TOK_PRE_SMOLLM},
    {"minerva-7b", QLR_TOK_PRE_SMOLLM},
};

qlr_status qlr_tok_pre_from_name(const char *name, size_t len, qlr_tok_pre *out) {
    for (size_t i = 0; i < sizeof PRE_NAMES / sizeof PRE_NAMES[0]; i++) {
        if (strlen(PRE_NAMES[i].name) == len && memcmp(PRE_NAMES[i].name, name, len) == 0) {
            *out = PRE_NAMES[i].pre;
            return QLR_OK;
        }
    }
    char known[512] = "";
    for (size_t i = 0; i < sizeof PRE_NAMES / sizeof PRE_NAMES[0]; i++) {
        if (i) strncat(known, ", ", sizeof known - strlen(known) - 1);
        strncat(known, PRE_NAMES[i].name, sizeof known - strlen(known) - 1);
    }
    return qlr_errorf(QLR_ERR_UNSUPPORTED, "unknown pre-tokenizer '%.*s' (known: %s)", (int)(len > 200 ? 200 : len),
                      name, known);
}

static qlr_status compile_re(qlr_tokenizer *t, const char *pat) {
    int err;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return qlr_errorf(QLR_ERR_INTERNAL, "pre-tokenizer regex does not compile at %zu: %s", (size_t)off,
                          (const char *)msg);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* optional: pcre2_match falls back to the interpreter */
    t->re[t->n_re++] = re;
    return QLR_OK;
}

static qlr_status compile_pre(qlr_tokenizer *t) {
    switch (t->pre) {
    case QLR_TOK_PRE_GPT2: return compile_re(t, RE_GPT2);
    case QLR_TOK_PRE_LLAMA3: return compile_re(t, RE_LLAMA3);
    case QLR_TOK_PRE_QWEN2: return compile_re(t, RE_QWEN2);
    case QLR_TOK_PRE_SMOLLM:
        QLR_TRY(compile_re(t, RE_DIGIT));
        return compile_re(t, RE_GPT2);
    case QLR_TOK_PRE_DEFAULT:
        QLR_TRY(compile_re(t, RE_DEF_PUNCT));
        QLR_TRY(compile_re(t, RE_GPT2));
        QLR_TRY(compile_re(t, RE_DEF_NUM));
        return compile_re(t, RE_DEF_3DIG);
    }
    return qlr_errorf(QLR_ERR_INTERNAL, "pre-tokenizer %d has no regexes", (int)t->pre);
}

/* ------------------------------------------------------------------------------------------ */
/* creation                                                                                   */

qlr_tokenizer_spec qlr_tokenizer_spec_default(void) {
    qlr_tokenizer_spec s;
    memset(&s, 0, sizeof s);
    s.bos = s.eos = s.eot = s.eom = s.unk = s.pad = s.sep = -1;
    s.add_bos = s.add_eos = s.add_space_prefix = -1;
    return s;
}

void qlr_tokenizer_free(qlr_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_re; i++) pcre2_code_free((pcre2_code *)t->re[i]);
    free(t->text_blob);
    free(t->tok_text);
    free(t->tok_len);
    free(t->tok_type);
    free(t->scores);
    free(t->vmap);
    free(t->vmap_hash);
    free(t->pmap);
    free(t->piece_blob);
    free(t->piece_off);
    free(t->piece_len);
    free(t->spec_ids);
    free(t->chat_template);
    free(t->name);
    free(t);
}

static int32_t check_id(const qlr_tokenizer *t, int32_t id, const char *what) {
    if (id < 0) return -1;
    if (id >= t->n_vocab) {
        QLR_LOGW("%s: %s %d is out of range (vocabulary of %d); ignored", t->name, what, (int)id, (int)t->n_vocab);
        return -1;
    }
    return id;
}

static qlr_status build_pieces(qlr_tokenizer *t) {
    size_t total = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) total += t->tok_len[i] + 1;
    t->piece_blob = malloc(total ? total : 1);
    t->piece_off = malloc(sizeof(uint32_t) * (size_t)t->n_vocab);
    t->piece_len = malloc(sizeof(uint32_t) * (size_t)t->n_vocab);
    if (!t->piece_blob || !t->piece_off || !t->piece_len)
        return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory for token pieces", t->name);
    size_t pos = 0;
    for (int32_t i = 0; i < t->n_vocab; i++) {
        const uint8_t *s = (const uint8_t *)t->tok_text[i];
        size_t n = t->tok_len[i];
        char *o = t->piece_blob + pos;
        size_t k = 0;
        uint8_t ty = t->tok_type[i];
        int literal = ty == QLR_TOKTYPE_CONTROL || ty == QLR_TOKTYPE_USER_DEFINED || ty == QLR_TOKTYPE_UNKNOWN;
        if (literal) {
            memcpy(o, s, n);
            k = n;
        } else if (t->kind == QLR_TOK_BPE) {
            for (size_t j = 0; j < n;) {
                uint32_t cp;
                int l = utf8_get(s + j, n - j, &cp);
                int b = cp_to_byte(cp);
                if (b >= 0) o[k++] = (char)b;
                else { memcpy(o + k, s + j, (size_t)l); k += (size_t)l; }
                j += (size_t)l;
            }
        } else if (ty == QLR_TOKTYPE_BYTE && n == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>') {
            o[k++] = (char)strtol((const char *)s + 3, NULL, 16);
        } else {
            for (size_t j = 0; j < n;) {
                if (j + 3 <= n && s[j] == 0xE2 && s[j + 1] == 0x96 && s[j + 2] == 0x81) {
                    o[k++] = ' ';
                    j += 3;
                } else o[k++] = (char)s[j++];
            }
        }
        t->piece_off[i] = (uint32_t)pos;
        t->piece_len[i] = (uint32_t)k;
        pos += k + 1;
    }
    return QLR_OK;
}

static int cmp_special(const void *a, const void *b, void *ctx) {
    const qlr_tokenizer *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint8_t fx = (uint8_t)t->tok_text[x][0], fy = (uint8_t)t->tok_text[y][0];
    if (fx != fy) return fx < fy ? -1 : 1;
    if (t->tok_len[x] != t->tok_len[y]) return t->tok_len[x] > t->tok_len[y] ? -1 : 1; /* longest first */
    return x < y ? -1 : x > y;
}

static qlr_status build_specials(qlr_tokenizer *t) {
    int32_t n = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        if ((t->tok_type[i] == QLR_TOKTYPE_CONTROL || t->tok_type[i] == QLR_TOKTYPE_USER_DEFINED) && t->tok_len[i] > 0)
            n++;
    t->spec_ids = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
    if (!t->spec_ids) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", t->name);
    n = 0;
    for (int32_t i = 0; i < t->n_vocab; i++)
        if ((t->tok_type[i] == QLR_TOKTYPE_CONTROL || t->tok_type[i] == QLR_TOKTYPE_USER_DEFINED) && t->tok_len[i] > 0)
            t->spec_ids[n++] = i;
    t->n_spec = n;
    qsort_r(t->spec_ids, (size_t)n, sizeof(int32_t), cmp_special, t);
    memset(t->spec_first, 0, sizeof t->spec_first);
    for (int32_t i = 0; i < n; i++) t->spec_first[(uint8_t)t->tok_text[t->spec_ids[i]][0] + 1]++;
    for (int b = 0; b < 256; b++) t->spec_first[b + 1] += t->spec_first[b];
    return QLR_OK;
}

static const char *const EOT_NAMES[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                                        "<EOT>"};

qlr_status qlr_tokenizer_create(const qlr_tokenizer_spec *spec, qlr_tokenizer **out) {
    *out = NULL;
    const char *name = spec->name ? spec->name : "tokenizer";
    if (spec->n_vocab <= 0 || !spec->tokens)
        return qlr_errorf(QLR_ERR_INVALID, "%s: the tokenizer has no vocabulary (0 tokens)", name);
    if (spec->kind != QLR_TOK_BPE && spec->kind != QLR_TOK_SPM)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: tokenizer kind %d is not supported", name, (int)spec->kind);
    qlr_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name);
    qlr_status st = QLR_OK;
    t->name = strdup(name);
    t->kind = spec->kind;
    t->n_vocab = spec->n_vocab;
    size_t nv = (size_t)spec->n_vocab;
    if (!t->name) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name); goto fail; }

    if (t->kind == QLR_TOK_BPE) {
        const char *pre = spec->pre ? spec->pre : "default";
        st = qlr_tok_pre_from_name(pre, strlen(pre), &t->pre);
        if (st) { qlr_error_prefix("%s: tokenizer.ggml.pre", name); goto fail; }
    } else {
        t->pre = QLR_TOK_PRE_DEFAULT;
    }

    /* token texts in one blob */
    size_t total = 0;
    for (size_t i = 0; i < nv; i++) {
        if (!spec->tokens[i].s && spec->tokens[i].len) {
            st = qlr_errorf(QLR_ERR_INVALID, "%s: token %zu has no text", name, i);
            goto fail;
        }
        total += spec->tokens[i].len + 1;
    }
    t->text_blob = malloc(total);
    t->tok_text = malloc(sizeof(char *) * nv);
    t->tok_len = malloc(sizeof(uint32_t) * nv);
    t->tok_type = malloc(nv);
    if (!t->text_blob || !t->tok_text || !t->tok_len || !t->tok_type) {
        st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory for %zu tokens", name, nv);
        goto fail;
    }
    size_t pos = 0;
    for (size_t i = 0; i < nv; i++) {
        size_t n = spec->tokens[i].len;
        if (n > UINT32_MAX / 2) { st = qlr_errorf(QLR_ERR_FORMAT, "%s: token %zu is too long", name, i); goto fail; }
        if (n) memcpy(t->text_blob + pos, spec->tokens[i].s, n);
        t->text_blob[pos + n] = 0;
        t->tok_text[i] = t->text_blob + pos;
        t->tok_len[i] = (uint32_t)n;
        pos += n + 1;
        int32_t ty = spec->token_types ? spec->token_types[i] : QLR_TOKTYPE_NORMAL;
        if (ty < 0 || ty > QLR_TOKTYPE_BYTE) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tokenizer.ggml.token_type: entry %zu has type %d (valid: 0..6)", name,
                            i, (int)ty);
            goto fail;
        }
        t->tok_type[i] = (uint8_t)ty;
    }
    if (spec->scores) {
        t->scores = malloc(sizeof(float) * nv);
        if (!t->scores) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name); goto fail; }
        memcpy(t->scores, spec->scores, sizeof(float) * nv);
    }

    /* vocabulary map */
    t->vmap_cap = pow2_at_least(nv * 2);
    t->vmap = malloc(sizeof(int32_t) * t->vmap_cap);
    t->vmap_hash = malloc(sizeof(uint32_t) * t->vmap_cap);
    if (!t->vmap || !t->vmap_hash) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name); goto fail; }
    memset(t->vmap, 0xFF, sizeof(int32_t) * t->vmap_cap);
    size_t n_dup = 0;
    for (size_t i = 0; i < nv; i++) {
        int32_t o = vocab_insert(t, (int32_t)i);
        if (o >= 0 && n_dup++ == 0)
            QLR_LOGW("%s: tokenizer.ggml.tokens: entry %zu duplicates entry %d ('%.40s'); the first one is used", name,
                     i, (int)o, t->tok_text[i]);
    }
    if (n_dup > 1) QLR_LOGW("%s: %zu duplicate tokens in all", name, n_dup);

    /* merges */
    if (t->kind == QLR_TOK_BPE) {
        if (spec->n_merges < 0 || (spec->n_merges > 0 && !spec->merges)) {
            st = qlr_errorf(QLR_ERR_INVALID, "%s: tokenizer.ggml.merges: missing", name);
            goto fail;
        }
        if (spec->n_merges > INT32_MAX / 2) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: tokenizer.ggml.merges: %lld entries is too many", name,
                            (long long)spec->n_merges);
            goto fail;
        }
        t->pmap_cap = pow2_at_least((size_t)spec->n_merges * 2 + 1);
        t->pmap = malloc(sizeof(*t->pmap) * t->pmap_cap);
        if (!t->pmap) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory for merges", name); goto fail; }
        for (size_t i = 0; i < t->pmap_cap; i++) t->pmap[i].rank = -1;
        int64_t n_skip = 0, first_skip = -1;
        char *buf = NULL;
        size_t buf_cap = 0;
        for (int64_t i = 0; i < spec->n_merges; i++) {
            const char *m = spec->merges[i].s;
            size_t n = spec->merges[i].len;
            size_t sp = 1;
            while (sp < n && m[sp] != ' ') sp++;
            if (!m || sp >= n) {
                free(buf);
                st = qlr_errorf(QLR_ERR_FORMAT, "%s: tokenizer.ggml.merges: entry %lld ('%.40s') has no space separator",
                                name, (long long)i, m ? m : "");
                goto fail;
            }
            int32_t a = qlr_tok_vocab_find(t, m, sp);
            int32_t b = qlr_tok_vocab_find(t, m + sp + 1, n - sp - 1);
            if (n > buf_cap) {
                char *nb = realloc(buf, n + 16);
                if (!nb) { free(buf); st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name); goto fail; }
                buf = nb;
                buf_cap = n + 16;
            }
            memcpy(buf, m, sp);
            memcpy(buf + sp, m + sp + 1, n - sp - 1);
            int32_t c = qlr_tok_vocab_find(t, buf, n - 1);
            if (a < 0 || b < 0 || c < 0) {
                if (n_skip++ == 0) first_skip = i;
                continue;
            }
            pair_insert(t, a, b, (int32_t)i, c);
        }
        free(buf);
        if (n_skip)
            QLR_LOGW("%s: tokenizer.ggml.merges: %lld entries (first: %lld) name tokens not in the vocabulary; skipped",
                     name, (long long)n_skip, (long long)first_skip);
    }

    /* byte tokens */
    for (int b = 0; b < 256; b++) {
        char s[8];
        int n;
        if (t->kind == QLR_TOK_BPE) n = utf8_put(byte_to_cp((uint8_t)b), s);
        else n = snprintf(s, sizeof s, "<0x%02X>", b);
        t->byte_tok[b] = qlr_tok_vocab_find(t, s, (size_t)n);
    }
    if (t->kind == QLR_TOK_SPM) {
        t->space_tok = qlr_tok_vocab_find(t, "\xE2\x96\x81", 3);
    }

    /* ids and flags */
    int is_spm = t->kind == QLR_TOK_SPM;
    t->bos = check_id(t, spec->bos, "bos_token_id");
    t->eos = check_id(t, spec->eos, "eos_token_id");
    t->unk = check_id(t, spec->unk, "unknown_token_id");
    t->pad = check_id(t, spec->pad, "padding_token_id");
    t->sep = check_id(t, spec->sep, "seperator_token_id");
    t->eom = check_id(t, spec->eom, "eom_token_id");
    t->eot = check_id(t, spec->eot, "eot_token_id");
    if (t->eot < 0) {
        for (size_t k = 0; k < sizeof EOT_NAMES / sizeof EOT_NAMES[0] && t->eot < 0; k++) {
            int32_t id = qlr_tok_vocab_find(t, EOT_NAMES[k], strlen(EOT_NAMES[k]));
            if (id >= 0 && (t->tok_type[id] == QLR_TOKTYPE_CONTROL || t->tok_type[id] == QLR_TOKTYPE_USER_DEFINED))
                t->eot = id;
        }
    }
    t->add_bos = spec->add_bos >= 0 ? !!spec->add_bos : (is_spm || t->pre == QLR_TOK_PRE_LLAMA3);
    t->add_eos = spec->add_eos >= 0 ? !!spec->add_eos : 0;
    t->add_space_prefix = spec->add_space_prefix >= 0 ? !!spec->add_space_prefix : is_spm;
    t->ignore_merges = t->kind == QLR_TOK_BPE && t->pre == QLR_TOK_PRE_LLAMA3;
    if (t->add_bos && t->bos < 0) {
        QLR_LOGW("%s: add_bos is set but there is no bos token; not adding one", name);
        t->add_bos = 0;
    }
    if (t->add_eos && t->eos < 0) {
        QLR_LOGW("%s: add_eos is set but there is no eos token; not adding one", name);
        t->add_eos = 0;
    }
    if (spec->chat_template) {
        t->chat_template = strdup(spec->chat_template);
        if (!t->chat_template) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name); goto fail; }
    }

    if ((st = build_pieces(t))) goto fail;
    if ((st = build_specials(t))) goto fail;
    if (t->kind == QLR_TOK_BPE && (st = compile_pre(t))) goto fail;
    *out = t;
    return QLR_OK;
fail:
    qlr_tokenizer_free(t);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* properties                                                                                 */

qlr_tok_kind qlr_tokenizer_kind(const qlr_tokenizer *t) { return t->kind; }
qlr_tok_pre qlr_tokenizer_pre(const qlr_tokenizer *t) { return t->pre; }
int32_t qlr_tokenizer_n_vocab(const qlr_tokenizer *t) { return t->n_vocab; }
int32_t qlr_tokenizer_bos(const qlr_tokenizer *t) { return t->bos; }
int32_t qlr_tokenizer_eos(const qlr_tokenizer *t) { return t->eos; }
int32_t qlr_tokenizer_eot(const qlr_tokenizer *t) { return t->eot >= 0 ? t->eot : t->eos; }
int32_t qlr_tokenizer_pad(const qlr_tokenizer *t) { return t->pad; }
int32_t qlr_tokenizer_unk(const qlr_tokenizer *t) { return t->unk; }
int qlr_tokenizer_add_bos(const qlr_tokenizer *t) { return t->add_bos; }
int qlr_tokenizer_add_eos(const qlr_tokenizer *t) { return t->add_eos; }
const char *qlr_tokenizer_chat_template(const qlr_tokenizer *t) { return t->chat_template; }

int qlr_tokenizer_is_eog(const qlr_tokenizer *t, int32_t id) {
    return id >= 0 && (id == t->eos || id == t->eot || id == t->eom);
}

const char *qlr_tokenizer_token_text(const qlr_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab ? t->tok_text[id] : NULL;
}

qlr_tok_type qlr_tokenizer_token_type(const qlr_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_vocab ? (qlr_tok_type)t->tok_type[id] : QLR_TOKTYPE_UNDEFINED;
}

int32_t qlr_tokenizer_find(const qlr_tokenizer *t, const char *text, size_t len) {
    return qlr_tok_vocab_find(t, text, len);
}

/* ------------------------------------------------------------------------------------------ */
/* token lists                                                                                */

void qlr_tokens_free(qlr_tokens *v) {
    free(v->ids);
    free(v->offsets);
    memset(v, 0, sizeof *v);
}

void qlr_tokens_clear(qlr_tokens *v) { v->n = 0; }

static qlr_status tokens_reserve(qlr_tokens *v, size_t extra, int offs) {
    if (v->n + extra <= v->cap && (!offs || v->offsets)) return QLR_OK;
    size_t cap = v->cap < 64 ? 64 : v->cap;
    while (cap < v->n + extra) cap *= 2;
    int32_t *ids = realloc(v->ids, sizeof(int32_t) * cap);
    if (!ids) return qlr_errorf(QLR_ERR_NOMEM, "out of memory for %zu tokens", cap);
    v->ids = ids;
    if (offs || v->offsets) {
        size_t *o = realloc(v->offsets, sizeof(size_t) * cap);
        if (!o) return qlr_errorf(QLR_ERR_NOMEM, "out of memory for %zu tokens", cap);
        if (!v->offsets && v->n) memset(o, 0, sizeof(size_t) * v->n);
        v->offsets = o;
    }
    v->cap = cap;
    return QLR_OK;
}

qlr_status qlr_tokens_push(qlr_tokens *v, int32_t id, size_t offset) {
    QLR_TRY(tokens_reserve(v, 1, 0));
    v->ids[v->n] = id;
    if (v->offsets) v->offsets[v->n] = offset;
    v->n++;
    return QLR_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* encoding                                                                                   */

typedef struct sym {
    int32_t id;   /* BPE: token id (-1 once merged away); SPM: unused */
    int32_t prev, next;
    uint32_t off; /* byte offset inside the word */
    uint32_t len; /* bytes (0 once merged away) */
} sym;

typedef struct heap_item {
    float key;     /* BPE: rank; SPM: -score (smaller pops first) */
    int32_t left;
    int32_t a, b;  /* BPE: pair ids at push; SPM: a = combined length */
} heap_item;

typedef struct enc_ctx {
    const qlr_tokenizer *t;
    qlr_tokens *out;
    int offs;
    const char *base; /* start of the caller's text, for offsets */
    sym *syms;
    size_t syms_cap;
    heap_item *heap;
    size_t heap_n, heap_cap;
    char *buf;        /* mapped word (ignore_merges) or SPM text */
    size_t buf_cap;
    size_t *boff;     /* SPM: original offset of each byte of buf */
    size_t boff_cap;
    pcre2_match_data *md[QLR_TOK_MAX_RE];
    qlr_tok_piece_fn piece_fn; /* set: report pre-tokens instead of encoding them */
    void *piece_ctx;
} enc_ctx;

static qlr_status grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return QLR_OK;
    size_t c = *cap < 64 ? 64 : *cap;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return qlr_errorf(QLR_ERR_NOMEM, "tokenizer: out of memory (%zu x %zu bytes)", c, elem);
    *p = q;
    *cap = c;
    return QLR_OK;
}

static int heap_less(const heap_item *x, const heap_item *y) {
    if (x->key != y->key) return x->key < y->key;
    return x->left < y->left;
}

static qlr_status heap_push(enc_ctx *c, heap_item it) {
    QLR_TRY(grow((void **)&c->heap, &c->heap_cap, c->heap_n + 1, sizeof(heap_item)));
    size_t i = c->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&it, &c->heap[p])) break;
        c->heap[i] = c->heap[p];
        i = p;
    }
    c->heap[i] = it;
    return QLR_OK;
}

static heap_item heap_pop(enc_ctx *c) {
    heap_item top = c->heap[0];
    heap_item last = c->heap[--c->heap_n];
    size_t i = 0, n = c->heap_n;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const heap_item *best = &last;
        if (l < n && heap_less(&c->heap[l], best)) m = l, best = &c->heap[l];
        if (r < n && heap_less(&c->heap[r], best)) m = r;
        if (m == i) break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n) c->heap[i] = last;
    return top;
}

static qlr_status emit(enc_ctx *c, int32_t id, const char *at) {
    QLR_TRY(tokens_reserve(c->out, 1, c->offs));
    c->out->ids[c->out->n] = id;
    if (c->out->offsets) c->out->offsets[c->out->n] = c->offs ? (size_t)(at - c->base) : 0;
    c->out->n++;
    return QLR_OK;
}

static qlr_status bpe_push_pair(enc_ctx *c, int32_t l) {
    int32_t r = c->syms[l].next;
    if (l < 0 || r < 0) return QLR_OK;
    int32_t rank, merged;
    if (!pair_find(c->t, c->syms[l].id, c->syms[r].id, &rank, &merged)) return QLR_OK;
    heap_item it = {(float)rank, l, c->syms[l].id, c->syms[r].id};
    return heap_push(c, it);
}

/* Byte-level BPE of one pre-token. */
static qlr_status bpe_word(enc_ctx *c, const char *w, size_t n) {
    const qlr_tokenizer *t = c->t;
    if (t->ignore_merges) {
        QLR_TRY(grow((void **)&c->buf, &c->buf_cap, n * 2 + 1, 1));
        size_t k = 0;
        for (size_t i = 0; i < n; i++) k += (size_t)utf8_put(byte_to_cp((uint8_t)w[i]), c->buf + k);
        int32_t id = qlr_tok_vocab_find(t, c->buf, k);
        if (id >= 0) return emit(c, id, w);
    }
    if (n > INT32_MAX / 2) return qlr_errorf(QLR_ERR_RANGE, "tokenizer: a pre-token of %zu bytes is too long", n);
    QLR_TRY(grow((void **)&c->syms, &c->syms_cap, n, sizeof(sym)));
    sym *s = c->syms;
    for (size_t i = 0; i < n; i++) {
        s[i].id = t->byte_tok[(uint8_t)w[i]];
        s[i].prev = (int32_t)i - 1;
        s[i].next = i + 1 < n ? (int32_t)i + 1 : -1;
        s[i].off = (uint32_t)i;
        s[i].len = 1;
    }
    c->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if (s[i].id >= 0 && s[i + 1].id >= 0) QLR_TRY(bpe_push_pair(c, (int32_t)i));
    while (c->heap_n) {
        heap_item it = heap_pop(c);
        s = c->syms;
        int32_t l = it.left, r = s[l].next;
        if (s[l].len == 0 || r < 0 || s[l].id != it.a || s[r].id != it.b) continue;
        int32_t rank, merged;
        pair_find(t, s[l].id, s[r].id, &rank, &merged);
        s[l].id = merged;
        s[l].len += s[r].len;
        s[l].next = s[r].next;
        if (s[r].next >= 0) s[s[r].next].prev = l;
        s[r].len = 0;
        s[r].id = -1;
        if (s[l].prev >= 0) QLR_TRY(bpe_push_pair(c, s[l].prev));
        QLR_TRY(bpe_push_pair(c, l));
    }
    s = c->syms;
    for (int32_t i = 0; i >= 0; i = s[i].next) {
        if (s[i].id >= 0) QLR_TRY(emit(c, s[i].id, w + s[i].off));
        else if (t->unk >= 0) QLR_TRY(emit(c, t->unk, w + s[i].off));
        /* a byte with no token and no unk: dropped (a vocabulary without the 256 byte tokens) */
    }
    return QLR_OK;
}

/* Applies regex `level` to [s, s+n): matches and the gaps between them go to the next level. */
static qlr_status pre_split(enc_ctx *c, int level, const char *s, size_t n) {
    if (n == 0) return QLR_OK;
    const qlr_tokenizer *t = c->t;
    if (level == t->n_re) {
        if (c->piece_fn) {
            c->piece_fn(c->piece_ctx, s, n);
            return QLR_OK;
        }
        return bpe_word(c, s, n);
    }
    pcre2_code *re = (pcre2_code *)t->re[level];
    pcre2_match_data *md = c->md[level];
    size_t pos = 0, gap = 0;
    while (pos < n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, pos, 0, md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return qlr_errorf(QLR_ERR_INTERNAL, "tokenizer: pre-tokenizer regex failed: %s", (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me <= ms) { /* empty match: cannot happen with our patterns; step over one byte */
            pos = ms + 1;
            continue;
        }
        QLR_TRY(pre_split(c, level + 1, s + gap, ms - gap));
        QLR_TRY(pre_split(c, level + 1, s + ms, me - ms));
        pos = gap = me;
    }
    return pre_split(c, level + 1, s + gap, n - gap);
}

static qlr_status spm_push_pair(enc_ctx *c, int32_t l) {
    if (l < 0) return QLR_OK;
    int32_t r = c->syms[l].next;
    if (r < 0) return QLR_OK;
    const qlr_tokenizer *t = c->t;
    uint32_t len = c->syms[l].len + c->syms[r].len;
    int32_t id = qlr_tok_vocab_find(t, c->buf + c->syms[l].off, len);
    if (id < 0 || t->tok_type[id] == QLR_TOKTYPE_CONTROL || t->tok_type[id] == QLR_TOKTYPE_BYTE ||
        t->tok_type[id] == QLR_TOKTYPE_UNUSED)
        return QLR_OK;
    heap_item it = {t->scores ? -t->scores[id] : 0.0f, l, (int32_t)len, 0};
    return heap_push(c, it);
}

/* SentencePiece-style BPE of one raw text fragment. */
static qlr_status spm_fragment(enc_ctx *c, const char *s, size_t n, int prefix) {
    const qlr_tokenizer *t = c->t;
    size_t need = n * 3 + 4;
    QLR_TRY(grow((void **)&c->buf, &c->buf_cap, need, 1));
    QLR_TRY(grow((void **)&c->boff, &c->boff_cap, need, sizeof(size_t)));
    size_t k = 0;
    size_t base = (size_t)(s - c->base);
    if (prefix) {
        memcpy(c->buf, "\xE2\x96\x81", 3);
        c->boff[0] = c->boff[1] = c->boff[2] = base;
        k = 3;
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] == ' ') {
            memcpy(c->buf + k, "\xE2\x96\x81", 3);
            c->boff[k] = c->boff[k + 1] = c->boff[k + 2] = base + i;
            k += 3;
        } else {
            c->buf[k] = s[i];
            c->boff[k++] = base + i;
        }
    }
    if (k > INT32_MAX / 2) return qlr_errorf(QLR_ERR_RANGE, "tokenizer: a text of %zu bytes is too long", n);
    QLR_TRY(grow((void **)&c->syms, &c->syms_cap, k, sizeof(sym)));
    sym *sy = c->syms;
    int32_t ns = 0;
    for (size_t i = 0; i < k;) {
        int l = utf8_valid_len((const uint8_t *)c->buf + i, k - i);
        if (l == 0) l = 1;
        sy[ns].prev = ns - 1;
        sy[ns].next = ns + 1;
        sy[ns].off = (uint32_t)i;
        sy[ns].len = (uint32_t)l;
        ns++;
        i += (size_t)l;
    }
    if (ns == 0) return QLR_OK;
    sy[ns - 1].next = -1;
    c->heap_n = 0;
    for (int32_t i = 0; i + 1 < ns; i++) QLR_TRY(spm_push_pair(c, i));
    while (c->heap_n) {
        heap_item it = heap_pop(c);
        sy = c->syms;
        int32_t l = it.left, r = sy[l].next;
        if (sy[l].len == 0 || r < 0 || sy[l].len + sy[r].len != (uint32_t)it.a) continue;
        sy[l].len += sy[r].len;
        sy[l].next = sy[r].next;
        if (sy[r].next >= 0) sy[sy[r].next].prev = l;
        sy[r].len = 0;
        QLR_TRY(spm_push_pair(c, sy[l].prev));
        QLR_TRY(spm_push_pair(c, l));
    }
    sy = c->syms;
    for (int32_t i = 0; i >= 0; i = sy[i].next) {
        const char *p = c->buf + sy[i].off;
        int32_t id = qlr_tok_vocab_find(t, p, sy[i].len);
        if (id >= 0 && t->tok_type[id] != QLR_TOKTYPE_CONTROL) {
            QLR_TRY(emit(c, id, c->base + c->boff[sy[i].off]));
            continue;
        }
        for (uint32_t j = 0; j < sy[i].len; j++) {
            int32_t b = t->byte_tok[(uint8_t)p[j]];
            if (b < 0) b = t->unk;
            if (b >= 0) QLR_TRY(emit(c, b, c->base + c->boff[sy[i].off + j]));
            if (t->byte_tok[(uint8_t)p[j]] < 0) break; /* one unk per character */
        }
    }
    return QLR_OK;
}

static qlr_status encode_raw(enc_ctx *c, const char *s, size_t n, int *prev_special) {
    if (n == 0) return QLR_OK;
    if (c->t->kind == QLR_TOK_SPM) {
        int prefix = c->t->add_space_prefix && *prev_special;
        *prev_special = 0;
        return spm_fragment(c, s, n, prefix);
    }
    *prev_special = 0;
    return pre_split(c, 0, s, n);
}

/* The longest special token starting at s (of the allowed types), or -1. */
static int32_t match_special(const qlr_tokenizer *t, const char *s, size_t n, int parse_special) {
    uint8_t b = (uint8_t)s[0];
    for (int32_t k = t->spec_first[b]; k < t->spec_first[b + 1]; k++) {
        int32_t id = t->spec_ids[k];
        if (t->tok_len[id] > n) continue;
        if (!parse_special && t->tok_type[id] == QLR_TOKTYPE_CONTROL) continue;
        if (memcmp(s, t->tok_text[id], t->tok_len[id]) == 0) return id;
    }
    return -1;
}

qlr_status qlr_tokenizer_encode(const qlr_tokenizer *t, const char *text, size_t len, unsigned flags,
                                qlr_tokens *out) {
    enc_ctx c;
    memset(&c, 0, sizeof c);
    c.t = t;
    c.out = out;
    c.offs = (flags & QLR_ENC_OFFSETS) != 0;
    c.base = text;
    qlr_status st = QLR_OK;
    if (c.offs && (st = tokens_reserve(out, 1, 1))) return st;
    for (int i = 0; i < t->n_re; i++) {
        c.md[i] = pcre2_match_data_create_from_pattern((pcre2_code *)t->re[i], NULL);
        if (!c.md[i]) { st = qlr_errorf(QLR_ERR_NOMEM, "tokenizer: out of memory"); goto done; }
    }
    if ((flags & QLR_ENC_ADD_SPECIAL) && t->add_bos && (st = emit(&c, t->bos, text))) goto done;
    int parse = (flags & QLR_ENC_PARSE_SPECIAL) != 0;
    int prev_special = 1;
    size_t start = 0;
    for (size_t i = 0; i < len;) {
        uint8_t b = (uint8_t)text[i];
        int32_t id = t->spec_first[b + 1] > t->spec_first[b] ? match_special(t, text + i, len - i, parse) : -1;
        if (id < 0) { i++; continue; }
        if ((st = encode_raw(&c, text + start, i - start, &prev_special))) goto done;
        if ((st = emit(&c, id, text + i))) goto done;
        prev_special = 1;
        i += t->tok_len[id];
        start = i;
    }
    if ((st = encode_raw(&c, text + start, len - start, &prev_special))) goto done;
    if ((flags & QLR_ENC_ADD_SPECIAL) && t->add_eos && (st = emit(&c, t->eos, text + len))) goto done;
done:
    for (int i = 0; i < t->n_re; i++) pcre2_match_data_free(c.md[i]);
    free(c.syms);
    free(c.heap);
    free(c.buf);
    free(c.boff);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* decoding                                                                                   */

const char *qlr_tokenizer_piece(const qlr_tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        *len = 0;
        return NULL;
    }
    *len = t->piece_len[id];
    return t->piece_blob + t->piece_off[id];
}

qlr_status qlr_tokenizer_decode(const qlr_tokenizer *t, const int32_t *ids, size_t n, unsigned flags, char **text,
                                size_t *len) {
    *text = NULL;
    *len = 0;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab)
            return qlr_errorf(QLR_ERR_RANGE, "decode: token %zu has id %d, outside the vocabulary of %d", i,
                              (int)ids[i], (int)t->n_vocab);
        total += t->piece_len[ids[i]];
    }
    char *o = malloc(total + 1);
    if (!o) return qlr_errorf(QLR_ERR_NOMEM, "decode: out of memory for %zu bytes", total);
    size_t k = 0;
    int first = 1;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if ((flags & QLR_DEC_SKIP_SPECIAL) && t->tok_type[id] == QLR_TOKTYPE_CONTROL) continue;
        const char *p = t->piece_blob + t->piece_off[id];
        size_t pl = t->piece_len[id];
        if (first && t->kind == QLR_TOK_SPM && t->add_space_prefix && t->tok_type[id] != QLR_TOKTYPE_CONTROL) {
            if (pl && p[0] == ' ') p++, pl--;
        }
        if (t->tok_type[id] != QLR_TOKTYPE_CONTROL) first = 0;
        memcpy(o + k, p, pl);
        k += pl;
    }
    o[k] = 0;
    *text = o;
    *len = k;
    return QLR_OK;
}

/* Writes the valid-UTF-8 form of in[0..n): complete characters pass, invalid bytes become
 * U+FFFD, and an incomplete tail (a valid prefix of a character) is returned in *tail_len
 * when `keep_tail`. Returns the bytes written to `o` (NULL = count only). */
static size_t utf8_sanitize(const uint8_t *in, size_t n, char *o, int keep_tail, size_t *tail_len) {
    size_t k = 0, i = 0;
    *tail_len = 0;
    while (i < n) {
        int l = utf8_valid_len(in + i, n - i);
        if (l > 0) {
            if (o) memcpy(o + k, in + i, (size_t)l);
            k += (size_t)l;
            i += (size_t)l;
            continue;
        }
        /* incomplete at the end? */
        int want = utf8_lead_len(in[i]);
        if (keep_tail && want > 1 && (size_t)want > n - i) {
            int ok = 1;
            for (size_t j = i + 1; j < n; j++) ok &= (in[j] & 0xC0) == 0x80;
            /* reject prefixes that can never complete (overlong / surrogate second byte) */
            if (ok && n - i >= 2) {
                uint8_t c0 = in[i], c1 = in[i + 1];
                if ((c0 == 0xE0 && c1 < 0xA0) || (c0 == 0xED && c1 > 0x9F) || (c0 == 0xF0 && c1 < 0x90) ||
                    (c0 == 0xF4 && c1 > 0x8F))
                    ok = 0;
            }
            if (ok) {
                *tail_len = n - i;
                return k;
            }
        }
        if (o) memcpy(o + k, "\xEF\xBF\xBD", 3);
        k += 3;
        i++;
    }
    return k;
}

size_t qlr_tok_stream_push(const qlr_tokenizer *t, qlr_tok_stream *s, int32_t id, unsigned flags, char *out,
                           size_t cap) {
    if (id < 0 || id >= t->n_vocab) return 0;
    if ((flags & QLR_DEC_SKIP_SPECIAL) && t->tok_type[id] == QLR_TOKTYPE_CONTROL) return 0;
    size_t pl = t->piece_len[id];
    const uint8_t *p = (const uint8_t *)t->piece_blob + t->piece_off[id];
    /* pending (<= 3 bytes) + piece, scanned in one go */
    uint8_t small[64];
    uint8_t *tmp = pl + s->n_pending <= sizeof small ? small : malloc(pl + s->n_pending);
    if (!tmp) return 0;
    memcpy(tmp, s->pending, s->n_pending);
    memcpy(tmp + s->n_pending, p, pl);
    size_t n = pl + s->n_pending, tail;
    size_t need = utf8_sanitize(tmp, n, NULL, 1, &tail);
    if (need <= cap) {
        utf8_sanitize(tmp, n, out, 1, &tail);
        memcpy(s->pending, tmp + n - tail, tail);
        s->n_pending = (uint8_t)tail;
    }
    if (tmp != small) free(tmp);
    return need;
}

size_t qlr_tok_stream_flush(qlr_tok_stream *s, char *out, size_t cap) {
    size_t k = 0;
    if (s->n_pending && cap >= 3) {
        memcpy(out, "\xEF\xBF\xBD", 3);
        k = 3;
    }
    s->n_pending = 0;
    return k;
}

qlr_status qlr_tok_pre_tokenize(const qlr_tokenizer *t, const char *text, size_t len, qlr_tok_piece_fn fn,
                                void *ctx) {
    if (t->kind != QLR_TOK_BPE) return qlr_errorf(QLR_ERR_INVALID, "pre-tokenize: not a BPE tokenizer");
    enc_ctx c;
    memset(&c, 0, sizeof c);
    c.t = t;
    c.base = text;
    c.piece_fn = fn;
    c.piece_ctx = ctx;
    qlr_status st = QLR_OK;
    for (int i = 0; i < t->n_re; i++) {
        c.md[i] = pcre2_match_data_create_from_pattern((pcre2_code *)t->re[i], NULL);
        if (!c.md[i]) { st = qlr_errorf(QLR_ERR_NOMEM, "tokenizer: out of memory"); goto done; }
    }
    st = pre_split(&c, 0, text, len);
done:
    for (int i = 0; i < t->n_re; i++) pcre2_match_data_free(c.md[i]);
    return st;
}
