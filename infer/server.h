/* infer/server.h: `qlora serve`'s HTTP server (libmicrohttpd): the OpenAI-compatible API over an
 * engine (infer/engine.h) and an adapter registry (adapters/registry.h).
 *
 * Routes: POST /v1/chat/completions, POST /v1/completions (streamed as server-sent events with
 * "stream": true), GET /v1/models, GET /v1/models/{id}, POST /v1/load_lora_adapter, POST
 * /v1/unload_lora_adapter, GET /health, GET /metrics, and the web page (GET /, /app.js, /app.css,
 * /favicon.svg: infer/web.h; served without a key, with a Content-Security-Policy that allows
 * this origin only). Each connection has its own thread, which
 * parses and validates the body (infer/openai.h), renders the chat template, tokenizes, resolves
 * the adapter (the "model" field or llama.cpp's "lora" list) and takes a reference on it, submits
 * to the engine and then waits for its tokens, watching the socket: a client that goes away has
 * its request cancelled within one engine step. Errors are OpenAI error objects: 400 naming the
 * field, 401 bad key, 403 path outside --adapter-dir, 404 unknown adapter, 413 body too large,
 * 429 queue full (Retry-After), 503 shutting down. No request can end the process.
 *
 * It owns the listening socket and the connections; not the engine, registry or tokenizer, which
 * must outlive it. */
#ifndef QLR_INFER_SERVER_H
#define QLR_INFER_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "adapters/registry.h"
#include "core/status.h"
#include "infer/engine.h"

struct qlr_tokenizer;

typedef struct qlr_server qlr_server;

typedef struct qlr_server_params {
    const char *host;          /* address to bind (default "127.0.0.1": loopback only) */
    uint16_t port;             /* default 8080; 0 = a free port (see qlr_server_port) */
    const char *api_key;       /* NULL = no authentication; else every route but /health and the
                                  web page's files needs "Authorization: Bearer <key>" */
    const char *adapter_dir;   /* POST /v1/load_lora_adapter paths must resolve inside it; NULL =
                                  loading by path is refused (403) */
    const char *model_name;    /* the base model's name in the API (required) */
    int32_t max_ctx;           /* the engine's longest sequence, prompt + generation (required) */
    int32_t default_max_tokens; /* max_tokens of a request that gives none: this, or what is left
                                  of max_ctx when less (default 2048; 0 = what is left). The engine
                                  reserves KV blocks for prompt + max_tokens when a request starts,
                                  so an unbounded default would hold a whole context per request */
    size_t max_body;           /* largest request body in bytes (default 1 MiB; over it: 413) */
    int retry_after_s;         /* Retry-After of a 429 (default 1) */
    int max_connections;       /* connections (threads) at once (default 512) */
    int log_requests;          /* one info line per request (default 1) */
} qlr_server_params;

qlr_server_params qlr_server_params_default(void);

/* Starts listening and serving. `reg` may be NULL (base model only; adapter routes answer 400).
 * Errors: QLR_ERR_INVALID (a parameter: host that does not resolve, missing model_name or
 * max_ctx, an adapter_dir that is not a folder), QLR_ERR_IO (cannot bind, naming host:port). */
qlr_status qlr_server_start(qlr_engine *e, qlr_registry *reg, const struct qlr_tokenizer *tok,
                            const qlr_server_params *p, qlr_server **out);

/* The port it listens on (the one chosen when started with port 0). */
uint16_t qlr_server_port(const qlr_server *s);
/* The chat template's name ("chatml", ...) or NULL when the model has none (chat completions then
 * answer 400). */
const char *qlr_server_chat_template(const qlr_server *s);

/* Shuts down: stops accepting connections, answers 503 to new requests on open ones, then stops
 * the engine (drain = 1: running and queued requests finish and their answers are sent, waiting at
 * most timeout_s seconds for the last bytes to leave; drain = 0: they are cancelled), and closes
 * every connection. Idempotent; the engine is stopped but not freed. */
void qlr_server_stop(qlr_server *s, int drain, double timeout_s);
/* qlr_server_stop(s, 0, 0) if still running, then frees; safe on NULL. */
void qlr_server_free(qlr_server *s);

#endif
