/* infer/engine.h: the serving engine: one thread owns the backend and runs continuous batching
 * over every running request, whatever its adapter. The HTTP layer (infer/server.h) and tests
 * submit requests and receive their tokens through a callback; nothing here knows HTTP.
 *
 * Owns: the request queue (bounded: a full queue refuses, the caller answers 429), the scheduler
 * (each step: the running decodes plus chunks of waiting prompts under a per-step token budget,
 * chunked prefill), the paged KV cache (fixed-size blocks, a block table per sequence, blocks freed
 * at the end or on cancel) with prefix caching (full blocks of a prompt already computed for the
 * same adapter are reused; the key includes the adapter), per-request sampling (temperature,
 * top_k, top_p, seed; n = 1), stop ids and stop strings, the end-of-turn token of the chat
 * template, UTF-8-safe streaming detokenisation, and the adapter set of each step (adapters are
 * pinned in the registry while a request of theirs runs). It does not own the model, the
 * tokenizer or the registry (the caller creates them and frees them after the engine). */
#ifndef QLR_INFER_ENGINE_H
#define QLR_INFER_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "adapters/registry.h"
#include "backend/backend.h"
#include "core/status.h"
#include "model/model.h"

struct qlr_tokenizer;

typedef struct qlr_engine qlr_engine;

typedef struct qlr_engine_params {
    int32_t max_batch_tokens;  /* tokens per forward step, decodes + prefill chunks (default 512) */
    int32_t max_running;       /* sequences decoding at once (default 64; <= max_batch_tokens) */
    int32_t max_queue;         /* requests waiting to start; one more is refused (default 256) */
    int32_t max_ctx;           /* longest sequence, prompt + generation (default 0 = min(ctx_train,
                                  8192)) */
    int32_t kv_block;          /* tokens per KV block (default 16) */
    uint64_t kv_bytes;         /* memory of the KV blocks (default 0 = room for max_running
                                  sequences of min(max_ctx, 2048) tokens) */
    int prefix_cache;          /* reuse computed prompt blocks (default 1) */
} qlr_engine_params;

qlr_engine_params qlr_engine_params_default(void);

/* The engine over model `m` (its backend), tokenizer `tok` (detokenisation, stop strings) and
 * registry `reg` (may be NULL: base model only). Allocates the KV blocks and the forward
 * workspace now (QLR_ERR_NOMEM naming the size). Starts its thread. */
qlr_status qlr_engine_create(qlr_model *m, const struct qlr_tokenizer *tok, qlr_registry *reg,
                             const qlr_engine_params *p, qlr_engine **out);
/* Stops accepting requests; with drain = 1 lets running and queued requests finish, else
 * cancels them (each gets its final event); then joins the thread. Idempotent. */
void qlr_engine_stop(qlr_engine *e, int drain);
/* qlr_engine_stop(e, 0) if still running, then frees; safe on NULL. */
void qlr_engine_free(qlr_engine *e);

/* What the caller's callback receives (on the engine thread; it must not block: copy and
 * return). A request receives zero or more TEXT events, then exactly one DONE. */
typedef enum qlr_engine_event_type {
    QLR_ENGINE_EV_TEXT = 0,    /* newly completed text (whole UTF-8 characters only) */
    QLR_ENGINE_EV_DONE = 1,    /* the end: finish says why; no event follows */
} qlr_engine_event_type;

typedef enum qlr_finish {
    QLR_FINISH_STOP = 0,       /* end-of-turn / eos / a stop id or stop string */
    QLR_FINISH_LENGTH = 1,     /* max_tokens or the context end */
    QLR_FINISH_CANCELLED = 2,  /* qlr_engine_cancel or engine stop without drain */
    QLR_FINISH_ERROR = 3,      /* a device or adapter error (message in `error`) */
} qlr_finish;

typedef struct qlr_engine_event {
    qlr_engine_event_type type;
    const char *text;          /* TEXT: bytes (not NUL-terminated), valid during the call */
    size_t len;
    const int32_t *ids;        /* TEXT: the token ids this text completes */
    size_t n_ids;
    qlr_finish finish;         /* DONE */
    const char *error;         /* DONE with QLR_FINISH_ERROR */
    int32_t n_prompt;          /* DONE: prompt tokens */
    int32_t n_generated;       /* DONE: generated tokens (the stop token not counted) */
    int32_t n_cached;          /* DONE: prompt tokens served from the prefix cache */
} qlr_engine_event;

typedef void (*qlr_engine_cb)(void *ud, const qlr_engine_event *ev);

typedef struct qlr_engine_request {
    const int32_t *prompt;     /* [n_prompt] token ids (copied) */
    int32_t n_prompt;
    int32_t max_tokens;        /* tokens to generate at most (>= 1) */
    qlr_sampling sampling;     /* temperature <= 0: greedy */
    uint64_t seed;
    const int32_t *stop_ids;   /* extra stop ids (copied); eos / end-of-turn stop unless ignore_eos */
    int32_t n_stop_ids;
    const char *const *stop;   /* stop strings (copied); the text before the match is sent */
    int32_t n_stop;
    qlr_adapter *adapter;      /* NULL = the base model; else a reference the caller took
                                  (qlr_registry_acquire): the engine takes it over and releases it
                                  after DONE, also when submit fails */
    float adapter_scale;       /* multiplies the adapter's own scale (1 = as trained) */
    int ignore_eos;            /* 1: eos / end-of-turn do not stop (benchmarks; they are text
                                  then); stop ids and strings still do */
} qlr_engine_request;

/* Queues a request. QLR_ERR_BUSY when the queue is full (answer 429), QLR_ERR_INVALID naming the
 * field (empty prompt, prompt + max_tokens over max_ctx, a token id outside the vocabulary, an
 * empty stop string, top_p <= 0, an adapter without a registry, or prompt + max_tokens needing
 * more KV blocks than the whole cache holds), QLR_ERR_CANCELLED once stopping; cb is then never
 * called. *id identifies it for cancel. A request starts when the KV blocks of its prompt +
 * max_tokens fit (they are reserved then, so it never waits mid-stream); until then it waits in
 * the queue. */
qlr_status qlr_engine_submit(qlr_engine *e, const qlr_engine_request *r, qlr_engine_cb cb,
                             void *ud, uint64_t *id);
/* Cancels a queued or running request (a client disconnected): its blocks are freed within one
 * step and its DONE (CANCELLED) is delivered. Unknown or finished ids are ignored. */
void qlr_engine_cancel(qlr_engine *e, uint64_t id);

/* A snapshot; any thread. kv_blocks_used counts blocks referenced by requests (free blocks that
 * still hold a cached prefix are not used). */
typedef struct qlr_engine_stats {
    uint64_t requests_total, requests_done, requests_cancelled, requests_rejected;
    uint64_t prompt_tokens, generated_tokens, cached_tokens;
    uint64_t steps;
    int32_t running, queued;
    int32_t last_batch_tokens, last_batch_seqs;
    int32_t kv_blocks_total, kv_blocks_used;
    int32_t kv_block;
    uint64_t prefix_hits;      /* prompt blocks served from the cache */
    double tokens_per_s;       /* generated tokens per second over the last few seconds */
} qlr_engine_stats;

void qlr_engine_get_stats(qlr_engine *e, qlr_engine_stats *s);

#endif
