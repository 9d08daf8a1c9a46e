/* infer/engine_internal.h: the parts of the engine that are plain host logic, each in its own
 * file and tested on its own (tests/infer/test_engine_kv.c, test_engine_text.c):
 *  - engine_kv.c: the KV block manager: which pool block holds what, reference counts,
 *    reservations (admission), the prefix cache (full prompt blocks keyed by the adapter
 *    identity, the scale and the token chain) with LRU reuse of free cached blocks;
 *  - engine_text.c: one request's output text: UTF-8-safe streaming detokenisation and stop
 *    strings matched across token boundaries (text before a match is sent, never the match).
 * Not part of the public API (infer/engine.h is). Nothing here is thread-safe: the engine thread
 * owns both. */
#ifndef QLR_INFER_ENGINE_INTERNAL_H
#define QLR_INFER_ENGINE_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "data/tokenizer.h"

/* ---- KV block manager (engine_kv.c) ---- */

typedef struct qlr_kvm qlr_kvm;

/* The blocks of one sequence, in position order (block i holds positions [i * block,
 * (i + 1) * block)). Zero-initialise; qlr_kvm_release empties it. */
typedef struct qlr_kvm_seq {
    int32_t *ids;
    int32_t n, cap;
    int32_t reserved;     /* blocks promised to it and not yet taken (admission) */
    int32_t n_registered; /* leading blocks already offered to the prefix cache */
} qlr_kvm_seq;

typedef struct qlr_kvm_stats {
    int32_t total, used;       /* blocks; used = referenced by a sequence */
    int32_t cached_free;       /* free blocks still holding a cached prefix */
    int32_t committed;         /* blocks reserved and not yet taken */
    uint64_t evictions;        /* cached blocks reused for other content */
} qlr_kvm_stats;

/* A manager of n_blocks blocks of `block` tokens. QLR_ERR_INVALID / QLR_ERR_NOMEM. */
qlr_status qlr_kvm_create(int32_t n_blocks, int32_t block, int prefix_cache, qlr_kvm **out);
void qlr_kvm_free(qlr_kvm *m);
void qlr_kvm_get_stats(const qlr_kvm *m, qlr_kvm_stats *s);
int32_t qlr_kvm_block(const qlr_kvm *m);

/* Blocks a sequence of n_tokens positions occupies. */
int32_t qlr_kvm_blocks_for(const qlr_kvm *m, int64_t n_tokens);

/* Admission of a sequence that will hold at most n_total positions and whose prompt is
 * tokens[0..n_prompt): finds the longest chain of cached full blocks of the prompt for `key` (the
 * adapter identity and scale; the caller hashes them), at most (n_prompt - 1) / block blocks so
 * that the last prompt token is always computed (its logits are needed, and it must not write
 * into a shared block). Admits only when the free blocks, less those reserved for sequences
 * already admitted, cover the rest: then *admitted = 1, the hits are referenced into `s` and
 * the remaining blocks are reserved for it; *n_cached = hit blocks * block. Else *admitted = 0 and
 * nothing changes (the caller waits for blocks to free). QLR_ERR_NOMEM only. */
qlr_status qlr_kvm_admit(qlr_kvm *m, qlr_kvm_seq *s, uint64_t key, const int32_t *tokens,
                         int32_t n_prompt, int32_t n_total, int *admitted, int32_t *n_cached);
/* Makes `s` hold blocks for positions [0, n_tokens), taking new blocks from its reservation
 * (a free block without a cached prefix first, else the least recently freed cached one).
 * Asserts the reservation covers it (a scheduler bug otherwise). */
void qlr_kvm_ensure(qlr_kvm *m, qlr_kvm_seq *s, int32_t n_tokens);
/* Offers the full blocks of `s` whose positions are all below min(n_computed, n_prompt) to the
 * prefix cache under `key` (after their K/V were computed). A block whose key is already cached
 * (another sequence computed the same prefix) stays private, and so do the blocks after it (no
 * lookup can reach them). No-op without prefix caching. */
void qlr_kvm_register(qlr_kvm *m, qlr_kvm_seq *s, uint64_t key, const int32_t *tokens,
                      int32_t n_computed, int32_t n_prompt);
/* Drops the sequence's references (blocks reaching zero become free; cached ones stay findable
 * until reused, least recently freed first) and its reservation; empties `s`. */
void qlr_kvm_release(qlr_kvm *m, qlr_kvm_seq *s);

/* 64-bit mixing of a value into a running hash (splitmix64 finaliser); the engine hashes the
 * adapter identity and scale with it. */
uint64_t qlr_kvm_mix(uint64_t h, uint64_t v);

/* ---- output text (engine_text.c) ---- */

/* Receives text ready to send: len > 0 bytes of whole UTF-8 characters and the ids of the tokens
 * whose text is complete with it (may be 0 of them). */
typedef void (*qlr_etext_emit_fn)(void *ud, const char *text, size_t len, const int32_t *ids,
                                  size_t n_ids);

typedef struct qlr_etext {
    const qlr_tokenizer *tok;
    qlr_tok_stream ts;    /* bytes of a character split across tokens */
    char **stop;          /* [n_stop] copies */
    size_t *stop_len;
    int32_t n_stop;
    char *hold;           /* text not sent yet: a possible start of a stop string */
    size_t n_hold, cap_hold;
    int32_t *ids;         /* tokens whose text is not fully sent yet */
    size_t *id_end;       /* end offset of each one's text in hold */
    size_t n_ids, cap_ids;
    char *piece;          /* scratch for one token's text */
    size_t cap_piece;
} qlr_etext;

/* Copies the stop strings (each must be non-empty: the caller validates). QLR_ERR_NOMEM. */
qlr_status qlr_etext_init(qlr_etext *t, const qlr_tokenizer *tok, const char *const *stop,
                          int32_t n_stop);
void qlr_etext_free(qlr_etext *t);
/* Adds generated token `id`. Text that can no longer be part of a stop string is emitted
 * (complete characters only). *stopped = 1 when a stop string now appears: the text before its
 * first occurrence has been emitted and the rest is dropped (the request ends). QLR_ERR_NOMEM. */
qlr_status qlr_etext_push(qlr_etext *t, int32_t id, qlr_etext_emit_fn emit, void *ud,
                          int *stopped);
/* The stream ended for another reason (eos, a stop id, max_tokens): bytes of an incomplete
 * character become U+FFFD and everything held is emitted. QLR_ERR_NOMEM. */
qlr_status qlr_etext_finish(qlr_etext *t, qlr_etext_emit_fn emit, void *ud);

#endif
