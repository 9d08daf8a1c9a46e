/* tests/infer/engine_harness.h: what the engine tests share: a request's collected events (text,
 * ids, the one DONE, UTF-8 checks), submitting and waiting, chat prompts of the demo model, random
 * adapters made the same way twice (one for the registry, one for qlr_generate), and the reference
 * greedy tokens of qlr_generate. Also used by tests/gpu/test_cuda_engine.c. */
#ifndef QLR_TESTS_INFER_ENGINE_HARNESS_H
#define QLR_TESTS_INFER_ENGINE_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "adapters/lora.h"
#include "adapters/registry.h"
#include "data/tokenizer.h"
#include "infer/engine.h"
#include "model/model.h"

#define EH_MAX_IDS 2048

typedef struct eh_out {
    char text[16384];
    size_t len;
    int32_t ids[EH_MAX_IDS];
    int n_ids;
    int n_text, n_done;       /* events seen */
    int bad_utf8;             /* TEXT events that were not whole UTF-8 characters */
    int text_after_done;
    qlr_finish finish;
    char error[512];
    int32_t n_prompt, n_generated, n_cached;
    int block_at;             /* > 0: the callback blocks at this TEXT event until eh_unblock */
    int blocked;
} eh_out;

/* The engine callback (ud = eh_out *). Thread-safe against eh_wait / eh_text_events. */
void eh_cb(void *ud, const qlr_engine_event *ev);
/* Waits (up to 120 s) until o has its DONE; 1 when it came. */
int eh_wait(eh_out *o);
/* TEXT events o has seen so far. */
int eh_text_events(eh_out *o);
/* Waits until o's callback is blocked (block_at), then returns; eh_unblock lets it go on. */
int eh_wait_blocked(eh_out *o);
void eh_unblock(eh_out *o);
/* 1 when s[0..n) is whole, valid UTF-8 characters. */
int eh_utf8_whole(const char *s, size_t n);

/* Submits prompt with greedy sampling; o is zeroed first (keep block_at: set it after). adapter
 * NULL or a reference the engine takes over. Returns the submit status. */
qlr_status eh_submit(qlr_engine *e, const int32_t *prompt, int32_t n, int32_t max_tokens,
                     qlr_adapter *adapter, float scale, const char *const *stop, int32_t n_stop,
                     eh_out *o, uint64_t *id);

/* The chat rendering of one user message, tokenized (QLR_ENC_PARSE_SPECIAL). */
qlr_tokens eh_chat_prompt(const qlr_tokenizer *tok, const char *user);

/* An adapter for `cfg`: r, targets; every A and B value random (B not zero), deterministic in
 * seed. */
qlr_lora *eh_make_adapter(const qlr_model_config *cfg, int32_t r, uint32_t targets, uint64_t seed);

/* Greedy tokens of qlr_generate (contiguous cache) for prompt, with `l` (may be NULL) at `scale`,
 * stopping at the tokenizer's end-of-generation ids; returns the count written to out. */
int eh_generate(qlr_model *m, const qlr_tokenizer *tok, const int32_t *prompt, int32_t n,
                int32_t max_tokens, const qlr_lora *l, float scale, int32_t *out);

#endif
