/* data/tokenizer_internal.h: the tokenizer struct, shared by tokenizer.c (build, encode,
 * decode) and tokenizer_load.c (GGUF and tokenizer.json readers). Not a public header. */
#ifndef QLR_DATA_TOKENIZER_INTERNAL_H
#define QLR_DATA_TOKENIZER_INTERNAL_H

#include "data/tokenizer.h"

#define QLR_TOK_MAX_RE 4

struct qlr_tokenizer {
    char *name;
    qlr_tok_kind kind;
    qlr_tok_pre pre;
    int32_t n_vocab;
    char *text_blob;     /* all token texts, NUL-separated */
    char **tok_text;     /* [n_vocab] into text_blob */
    uint32_t *tok_len;   /* [n_vocab] */
    uint8_t *tok_type;   /* [n_vocab] qlr_tok_type */
    float *scores;       /* [n_vocab] or NULL */
    int32_t *vmap;       /* open addressing: token text -> id (-1 empty) */
    uint32_t *vmap_hash;
    size_t vmap_cap;
    struct { uint64_t key; int32_t rank, merged; } *pmap; /* (left id, right id) -> rank, merged id */
    size_t pmap_cap;
    char *piece_blob;    /* decoded bytes of every token */
    uint32_t *piece_off, *piece_len;
    int32_t *spec_ids;   /* control + user-defined tokens sorted by (first byte, length desc) */
    int32_t n_spec;
    int32_t spec_first[257]; /* spec_ids[spec_first[b] .. spec_first[b+1]) start with byte b */
    int32_t byte_tok[256];   /* BPE: token of the mapped byte; SPM: <0xXX> token; -1 none */
    int32_t space_tok;
    int32_t bos, eos, eot, eom, unk, pad, sep;
    int add_bos, add_eos, add_space_prefix, ignore_merges;
    void *re[QLR_TOK_MAX_RE]; /* pcre2_code*, applied in order */
    int n_re;
    char *chat_template;
};

int32_t qlr_tok_vocab_find(const qlr_tokenizer *t, const char *s, size_t n);
qlr_status qlr_tok_pre_from_name(const char *name, size_t len, qlr_tok_pre *out);

/* Runs only the pre-tokenizer regexes (BPE) over `text` and calls fn once per pre-token, in
 * order (tests compare the splits with Hugging Face's). */
typedef void (*qlr_tok_piece_fn)(void *ctx, const char *s, size_t n);
qlr_status qlr_tok_pre_tokenize(const qlr_tokenizer *t, const char *text, size_t len, qlr_tok_piece_fn fn,
                                void *ctx);

#endif
