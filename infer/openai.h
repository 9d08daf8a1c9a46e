/* infer/openai.h: the OpenAI-compatible request and response layer of `qlora serve`, free of
 * HTTP so that it can be unit-tested and fuzzed: parsing and validating the bodies of
 * /v1/chat/completions, /v1/completions, /v1/load_lora_adapter and /v1/unload_lora_adapter;
 * OpenAI-style error objects that name the offending field; the JSON of completions, of stream
 * chunks framed as server-sent events, and of /v1/models.
 *
 * It does not own tokenization, the chat template, adapter lookup or the engine (infer/server.c
 * does those with what is parsed here), nor sockets. Every text written into JSON goes through a
 * UTF-8 check first: invalid bytes become U+FFFD, so a response is always valid JSON. */
#ifndef QLR_INFER_OPENAI_H
#define QLR_INFER_OPENAI_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "adapters/registry.h"
#include "core/status.h"
#include "core/strbuf.h"
#include "data/chat_template.h"

#define QLR_OAI_MAX_STOP 4          /* stop strings per request (OpenAI's limit) */
#define QLR_OAI_MAX_STOP_BYTES 256  /* bytes of one stop string */

typedef enum qlr_oai_endpoint {
    QLR_OAI_CHAT = 0,         /* POST /v1/chat/completions */
    QLR_OAI_COMPLETIONS = 1,  /* POST /v1/completions */
} qlr_oai_endpoint;

/* An error as OpenAI's API reports it: {"error": {"message", "type", "param", "code"}} with the
 * HTTP status to answer. */
typedef struct qlr_oai_error {
    int http_status;          /* 400, 401, 403, 404, 405, 413, 429, 500, 503 */
    const char *type;         /* "invalid_request_error", ... (static; from the status) */
    const char *code;         /* static machine-readable code or NULL (JSON null) */
    char param[128];          /* the field at fault ("messages[1].content"); "" = JSON null */
    char message[768];
} qlr_oai_error;

/* Fills `e`: the type follows from the status (400/404/405/413 invalid_request_error, 401
 * authentication_error, 403 permission_error, 429 rate_limit_error, 5xx server_error). `param`
 * and `code` may be NULL. Never fails (the message is truncated to fit). */
void qlr_oai_error_set(qlr_oai_error *e, int http_status, const char *param, const char *code,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* The error object as compact JSON (malloc'ed, NUL-terminated; NULL only when out of memory). */
char *qlr_oai_error_json(const qlr_oai_error *e);

/* A completion request, validated. Strings are borrowed from `root` (or from `owned`). */
typedef struct qlr_oai_request {
    qlr_oai_endpoint endpoint;
    json_t *root;             /* the parsed body (owned) */
    const char *model;        /* NULL when absent or null */

    /* chat: the conversation ("developer" is passed on as "system"; list contents joined) */
    qlr_chat_msg *messages;   /* [n_messages] */
    size_t n_messages;
    /* completions: a text prompt, or token ids (exactly one of the two is set) */
    const char *prompt;
    int32_t *prompt_ids;      /* [n_prompt_ids] (owned) */
    size_t n_prompt_ids;

    int32_t max_tokens;       /* 0 = not given (the server fills the room left in the context);
                                 chat: max_completion_tokens wins over max_tokens */
    const char *max_tokens_field; /* the key it came from ("max_tokens" when not given) */
    float temperature;        /* default 1 (OpenAI's); 0 = greedy */
    float top_p;              /* default 1 = off */
    int32_t top_k;            /* extension; default 0 = off (-1 is accepted as off) */
    int has_seed;
    uint64_t seed;            /* the request's seed (two's complement of a negative one) */
    const char *stop[QLR_OAI_MAX_STOP];
    int32_t n_stop;
    int stream;
    int include_usage;        /* stream_options.include_usage */
    int ignore_eos;           /* vLLM's extension: generate max_tokens whatever the model says
                                 (benchmarks); stop strings still stop */

    /* llama.cpp's "lora": [{"id" | "name", "scale"}] (at most one entry) */
    int has_lora;
    const char *lora_name;    /* by name, or NULL */
    int32_t lora_id;          /* by position in /v1/models' adapter list, or -1 */
    float lora_scale;         /* default 1 */

    char **owned;             /* joined message contents (freed with the request) */
    size_t n_owned;
} qlr_oai_request;

/* Parses and validates a completion request body of `n` bytes (not NUL-terminated). On failure
 * `err` says what is wrong and names the field, *out is left empty (nothing to free), and the
 * status is QLR_ERR_INVALID (a bad body: err->http_status 400) or QLR_ERR_NOMEM (500). It checks
 * types and ranges and refuses options it would otherwise have to ignore silently (n != 1,
 * logprobs, tools, non-zero penalties, logit_bias, echo, suffix, best_of > 1, a response_format
 * other than text, stream_options without stream); unknown keys are ignored, as vLLM does. */
qlr_status qlr_oai_parse_request(qlr_oai_endpoint ep, const void *body, size_t n,
                                 qlr_oai_request *out, qlr_oai_error *err);
/* Frees what a successful parse holds and zeroes *r; safe on a zeroed struct. */
void qlr_oai_request_free(qlr_oai_request *r);

/* POST /v1/load_lora_adapter {"lora_name", "lora_path"} and /v1/unload_lora_adapter
 * {"lora_name"} (vLLM's names). `lora_path` is required when `need_path`; strings borrow from
 * `root`. Errors as for qlr_oai_parse_request. */
typedef struct qlr_oai_lora_request {
    json_t *root;
    const char *lora_name;
    const char *lora_path;    /* NULL for unload */
} qlr_oai_lora_request;

qlr_status qlr_oai_parse_lora_request(const void *body, size_t n, int need_path,
                                      qlr_oai_lora_request *out, qlr_oai_error *err);
void qlr_oai_lora_request_free(qlr_oai_lora_request *r);

/* "chatcmpl-" / "cmpl-" followed by 24 hex digits of `r` mixed with a counter. */
void qlr_oai_make_id(qlr_oai_endpoint ep, uint64_t r, char *out, size_t cap);

/* What a finished completion produced. */
typedef struct qlr_oai_result {
    const char *id;
    int64_t created;          /* Unix seconds */
    const char *model;        /* the name the request used (adapter or base) */
    const char *text;         /* [len] generated bytes (any bytes: invalid UTF-8 is replaced) */
    size_t len;
    const char *finish_reason; /* "stop" or "length" */
    int32_t prompt_tokens, completion_tokens, cached_tokens;
} qlr_oai_result;

/* The non-streamed response: chat.completion (choices[0].message) or text_completion
 * (choices[0].text), with usage. Compact JSON, malloc'ed; NULL when out of memory. */
char *qlr_oai_format_result(qlr_oai_endpoint ep, const qlr_oai_result *r);

/* One streamed response as server-sent events. Each function appends whole events
 * ("data: <json>\n\n") to `out`; a failed allocation shows as out->oom. */
typedef struct qlr_oai_stream {
    qlr_oai_endpoint endpoint;
    const char *id;
    int64_t created;
    const char *model;
    int include_usage;        /* every chunk carries "usage": null, and a last chunk the usage */
} qlr_oai_stream;

/* chat: the first chunk, delta {"role": "assistant", "content": ""}; completions: nothing. */
void qlr_oai_stream_begin(const qlr_oai_stream *s, qlr_strbuf *out);
/* A chunk with `len` bytes of new text (nothing when len is 0). */
void qlr_oai_stream_text(const qlr_oai_stream *s, const char *text, size_t len, qlr_strbuf *out);
/* The chunk with finish_reason, then (include_usage) the usage chunk, then "data: [DONE]". */
void qlr_oai_stream_end(const qlr_oai_stream *s, const char *finish_reason, int32_t prompt_tokens,
                        int32_t completion_tokens, int32_t cached_tokens, qlr_strbuf *out);
/* An error event (the error object) then "data: [DONE]": how a stream that already answered
 * 200 reports a failure. */
void qlr_oai_stream_error(const qlr_oai_error *e, qlr_strbuf *out);

/* GET /v1/models: {"object": "list", "data": [...]}: the base model first, then each adapter
 * with OpenAI's fields (id, object "model", created, owned_by) plus vLLM's root / parent and
 * ours: lora_id (its position, for "lora": [{"id"}]), rank, alpha, scale, targets (the adapted
 * linears' HF names, "q_proj", ...), residency ("device", "host", "file"), refs (references held
 * now: its running requests and the engine's set of recently used adapters), requests (requests
 * that used it since it was attached). Compact JSON, malloc'ed; NULL when out of memory. */
char *qlr_oai_format_models(const char *base_name, int64_t created, int32_t max_ctx,
                            const qlr_adapter_info *adapters, size_t n_adapters);

/* Name of a residency tier: "file", "host", "device". */
const char *qlr_oai_residency_name(qlr_residency r);

/* Copies `len` bytes of `s` to a malloc'ed NUL-terminated string with every invalid UTF-8
 * sequence (a bad lead or continuation byte, an overlong form, a surrogate, a code point over
 * U+10FFFF, a truncated tail) replaced by U+FFFD, one per maximal bad subpart as in Unicode's
 * recommendation; *out_len gets its length. NULL when out of memory. */
char *qlr_oai_utf8_sanitize(const char *s, size_t len, size_t *out_len);

#endif
