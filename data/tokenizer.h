/* data/tokenizer.h: text <-> token ids for the models we train and serve.
 *
 * Two algorithms (docs/FORMATS.md §7): byte-level BPE ("gpt2": GPT-2 byte->unicode
 * map, regex pre-tokenizers llama-bpe / smollm / qwen2 / gpt-2 / default run with PCRE2, merges
 * by rank) and SentencePiece-style BPE ("llama": U+2581 for spaces, merges by score, <0xXX>
 * byte fallback). A tokenizer is built from GGUF metadata, from a Hugging Face tokenizer.json
 * (+ tokenizer_config.json), or from an in-memory spec (tests, fuzzing). Once built it is
 * immutable: encode/decode may run from many threads at once. Chat formatting lives in
 * data/chat_template.h; this file knows nothing about roles. */
#ifndef QLR_DATA_TOKENIZER_H
#define QLR_DATA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

struct qlr_gguf;

typedef enum qlr_tok_kind {
    QLR_TOK_BPE = 0, /* byte-level BPE, tokenizer.ggml.model = "gpt2" */
    QLR_TOK_SPM = 1, /* SentencePiece-style BPE, tokenizer.ggml.model = "llama" */
} qlr_tok_kind;

typedef enum qlr_tok_pre {
    QLR_TOK_PRE_DEFAULT = 0, /* "default" or missing */
    QLR_TOK_PRE_GPT2,        /* "gpt-2", "phi-2", ... */
    QLR_TOK_PRE_LLAMA3,      /* "llama-bpe", "llama3", "llama-v3", "falcon3" (ignore_merges) */
    QLR_TOK_PRE_QWEN2,       /* "qwen2", "deepseek-r1-qwen" */
    QLR_TOK_PRE_SMOLLM,      /* "smollm", "starcoder", "refact", ... (digits isolated, then GPT-2) */
} qlr_tok_pre;

/* tokenizer.ggml.token_type values. */
typedef enum qlr_tok_type {
    QLR_TOKTYPE_UNDEFINED = 0,
    QLR_TOKTYPE_NORMAL = 1,
    QLR_TOKTYPE_UNKNOWN = 2,
    QLR_TOKTYPE_CONTROL = 3,      /* <|im_start|>, <s>: matched in text only with QLR_ENC_PARSE_SPECIAL */
    QLR_TOKTYPE_USER_DEFINED = 4, /* added tokens: always matched in text */
    QLR_TOKTYPE_UNUSED = 5,
    QLR_TOKTYPE_BYTE = 6,         /* SPM <0xXX> */
} qlr_tok_type;

typedef struct qlr_tokenizer qlr_tokenizer;

/* A length-delimited string (GGUF strings are not NUL-terminated). */
typedef struct qlr_str {
    const char *s;
    size_t len;
} qlr_str;

/* Everything a tokenizer is built from. Arrays are copied by qlr_tokenizer_create. */
typedef struct qlr_tokenizer_spec {
    qlr_tok_kind kind;
    const char *pre;             /* pre-tokenizer name as in tokenizer.ggml.pre; NULL = "default" */
    int32_t n_vocab;
    const qlr_str *tokens;       /* [n_vocab] token strings (byte-level strings for BPE); required */
    const int32_t *token_types;  /* [n_vocab] qlr_tok_type or NULL (all normal) */
    const float *scores;         /* [n_vocab] SPM merge scores or NULL */
    int64_t n_merges;
    const qlr_str *merges;       /* [n_merges] "left right"; rank = index. Required for BPE */
    int32_t bos, eos, eot, eom, unk, pad, sep; /* -1 = none; eot -1 = detect by token text */
    int add_bos, add_eos;        /* -1 = the default of kind/pre */
    int add_space_prefix;        /* -1 = default (SPM: 1, BPE: 0) */
    const char *chat_template;   /* Jinja source or NULL; copied */
    const char *name;            /* for messages ("model.gguf"); NULL = "tokenizer" */
} qlr_tokenizer_spec;

/* A spec with every id -1 and every flag at its default. */
qlr_tokenizer_spec qlr_tokenizer_spec_default(void);

/* Builds a tokenizer. QLR_ERR_INVALID/FORMAT with a message naming the offending entry
 * (duplicate token, a merge without a space, an id out of range); QLR_ERR_UNSUPPORTED for an
 * unknown pre-tokenizer. On failure *out is NULL. */
qlr_status qlr_tokenizer_create(const qlr_tokenizer_spec *spec, qlr_tokenizer **out);

/* Reads tokenizer.ggml.* and tokenizer.chat_template from an open GGUF. Errors name the key
 * ("tokenizer.ggml.merges: entry 17 has no space separator"). A file without
 * tokenizer.ggml.tokens is QLR_ERR_NOT_FOUND ("has no vocabulary"). */
qlr_status qlr_tokenizer_load_gguf(const struct qlr_gguf *g, qlr_tokenizer **out);
/* Opens `path`, loads the tokenizer, closes the file. */
qlr_status qlr_tokenizer_open_gguf(const char *path, qlr_tokenizer **out);

/* Loads a Hugging Face tokenizer: `path` is tokenizer.json or a folder holding it. A
 * tokenizer_config.json next to it supplies chat_template, add_bos_token/add_eos_token and
 * bos/eos/pad tokens. Byte-level BPE models must use a pre-tokenizer we recognise; BPE models
 * with byte_fallback (Llama 2, Mistral) load as SPM with scores derived from the merge ranks. */
qlr_status qlr_tokenizer_load_hf(const char *path, qlr_tokenizer **out);

void qlr_tokenizer_free(qlr_tokenizer *t);

/* ---- properties ---- */
qlr_tok_kind qlr_tokenizer_kind(const qlr_tokenizer *t);
qlr_tok_pre qlr_tokenizer_pre(const qlr_tokenizer *t);
int32_t qlr_tokenizer_n_vocab(const qlr_tokenizer *t);
int32_t qlr_tokenizer_bos(const qlr_tokenizer *t); /* -1 if none */
int32_t qlr_tokenizer_eos(const qlr_tokenizer *t);
int32_t qlr_tokenizer_eot(const qlr_tokenizer *t); /* end of turn; falls back to eos */
int32_t qlr_tokenizer_pad(const qlr_tokenizer *t);
int32_t qlr_tokenizer_unk(const qlr_tokenizer *t);
int qlr_tokenizer_add_bos(const qlr_tokenizer *t);
int qlr_tokenizer_add_eos(const qlr_tokenizer *t);
/* 1 if generation should stop at `id` (eos, eot, eom). */
int qlr_tokenizer_is_eog(const qlr_tokenizer *t, int32_t id);
/* The token's stored text (NUL-terminated; byte-level form for BPE), or NULL out of range. */
const char *qlr_tokenizer_token_text(const qlr_tokenizer *t, int32_t id);
qlr_tok_type qlr_tokenizer_token_type(const qlr_tokenizer *t, int32_t id);
/* Id of the token whose stored text is exactly `text`, or -1. */
int32_t qlr_tokenizer_find(const qlr_tokenizer *t, const char *text, size_t len);
/* Chat template source from the model (NUL-terminated) or NULL. */
const char *qlr_tokenizer_chat_template(const qlr_tokenizer *t);

/* ---- encoding ---- */

/* A growable list of token ids, with optional byte offsets into the encoded text. */
typedef struct qlr_tokens {
    int32_t *ids;
    size_t *offsets; /* filled when QLR_ENC_OFFSETS: byte where each token's text starts */
    size_t n, cap;
} qlr_tokens;

void qlr_tokens_free(qlr_tokens *v);      /* frees and zeroes; safe on a zeroed struct */
void qlr_tokens_clear(qlr_tokens *v);     /* n = 0, keeps the memory */
qlr_status qlr_tokens_push(qlr_tokens *v, int32_t id, size_t offset);

enum {
    QLR_ENC_ADD_SPECIAL = 1u << 0,   /* prepend bos / append eos as the tokenizer's flags say */
    QLR_ENC_PARSE_SPECIAL = 1u << 1, /* control tokens written in the text become their ids */
    QLR_ENC_OFFSETS = 1u << 2,       /* fill qlr_tokens.offsets */
};

/* Tokenizes `len` bytes of `text` (any bytes: invalid UTF-8 is encoded byte by byte) and
 * APPENDS the ids to `out`. User-defined tokens are always matched; control tokens only with
 * QLR_ENC_PARSE_SPECIAL (so user content cannot forge <|im_start|>). Fails only on
 * allocation failure. Offsets are relative to `text` (bos/eos get offset 0 / len). */
qlr_status qlr_tokenizer_encode(const qlr_tokenizer *t, const char *text, size_t len,
                                unsigned flags, qlr_tokens *out);

/* ---- decoding ---- */

enum {
    QLR_DEC_SKIP_SPECIAL = 1u << 0, /* drop control tokens (bos, eos, <|im_end|>) */
};

/* The raw bytes a token stands for (byte-level map undone, U+2581 -> space, <0xXX> -> byte;
 * control and user-defined tokens give their text). May be an incomplete UTF-8 sequence.
 * Returns NULL and *len = 0 for an id out of range. */
const char *qlr_tokenizer_piece(const qlr_tokenizer *t, int32_t id, size_t *len);

/* Decodes ids to bytes: a malloc'ed NUL-terminated buffer in *text (length in *len). Exact
 * inverse of encode (no UTF-8 repair). SPM: the space added by add_space_prefix is removed
 * from the first piece. Ids out of range are QLR_ERR_RANGE naming the position. */
qlr_status qlr_tokenizer_decode(const qlr_tokenizer *t, const int32_t *ids, size_t n, unsigned flags,
                                char **text, size_t *len);

/* Streaming detokenizer for generation: feed ids one at a time; the output is always valid
 * UTF-8. Bytes of a character split across tokens are held back until it completes; bytes
 * that cannot form a valid character become U+FFFD. Zero-initialise the state. */
typedef struct qlr_tok_stream {
    uint8_t pending[4];
    uint8_t n_pending;
} qlr_tok_stream;

/* Appends the text completed by `id` to out[0..cap) (not NUL-terminated) and returns its
 * length. If that length is > cap nothing is written and the state is unchanged, so the
 * caller can retry with a larger buffer (cap >= 4 * piece length + 8 always suffices).
 * Ids out of range produce nothing. */
size_t qlr_tok_stream_push(const qlr_tokenizer *t, qlr_tok_stream *s, int32_t id, unsigned flags,
                           char *out, size_t cap);
/* Ends the stream: held bytes of an incomplete character become one U+FFFD (written to out,
 * which needs 3 bytes). Returns the length written; resets the state. */
size_t qlr_tok_stream_flush(qlr_tok_stream *s, char *out, size_t cap);

#endif
