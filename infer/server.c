/* infer/server.c: the libmicrohttpd server of server.h.
 *
 * Threads: MHD runs one thread per connection (MHD_USE_THREAD_PER_CONNECTION), so a handler may
 * block: a non-streamed completion waits in its handler for the engine's DONE; a streamed one
 * returns a callback response whose reader blocks until the engine has pushed text. Both wait in
 * 50 ms slices and between slices look at the client socket (POLLRDHUP): a client that closed
 * its end has its request cancelled at once rather than when the next write fails. MHD's
 * request-completed notification cancels too (any other way a request can end early).
 *
 * A completion's shared state (struct srv_req) is reference-counted: one reference for the
 * connection (dropped in the completed notification), one for the engine (dropped after DONE),
 * one for a streamed response (dropped when MHD frees it). The engine's callback only appends to
 * a buffer under the request's mutex and signals; JSON and SSE framing happen on the connection's
 * thread. */
#define _GNU_SOURCE /* POLLRDHUP */
#include "infer/server.h"

#include <errno.h>
#include <inttypes.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "infer/http_util.h"
#include "infer/metrics.h"
#include "infer/openai.h"
#include "infer/web.h"

#define WAIT_SLICE_MS 50
#define STREAM_BLOCK 4096
#define MAX_STATUS 600

struct qlr_server {
    struct MHD_Daemon *d;
    qlr_engine *e;
    qlr_registry *reg;
    const qlr_tokenizer *tok;
    qlr_chat_template *tmpl;      /* NULL: no usable chat template */
    unsigned chat_flags;          /* how the rendered chat text is encoded */
    qlr_server_params p;
    char *host, *api_key, *adapter_dir, *model_name;   /* copies of the params' strings */
    uint16_t port;
    int64_t created;              /* Unix seconds at start */
    double t0;
    int stopping;                 /* atomic: new requests get 503 */
    int closing;                  /* atomic: waiting requests give up (daemon stopping) */
    int stopped;
    MHD_socket quiesced_fd;
    pthread_mutex_t mu;           /* guards active */
    pthread_cond_t cv;
    int active;                   /* completions whose state is alive */
    uint64_t status_counts[MAX_STATUS]; /* atomic */
    uint64_t id_seed, id_counter; /* atomic counter */
    char mhd_error[256];          /* the last message libmicrohttpd logged */
};

/* ---- per completion state ---- */

typedef struct srv_req {
    qlr_server *s;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    uint64_t eid;
    int cancelled;                /* we asked the engine to cancel */
    /* from the engine */
    qlr_strbuf text;              /* text not yet taken by the connection thread */
    int done;
    qlr_finish finish;
    char *error;
    int32_t n_prompt, n_generated, n_cached;
    /* the answer */
    qlr_oai_endpoint ep;
    int fd;                       /* client socket (disconnect detection) */
    char id[64];
    char model[QLR_ADAPTER_NAME_MAX + 256];
    int64_t created;
    qlr_oai_stream st;
    qlr_strbuf out;               /* SSE bytes not yet handed to MHD */
    size_t out_pos;
    int began, ended;
} srv_req;

static srv_req *req_new(qlr_server *s) {
    srv_req *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->s = s;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->refs = 1;
    q->fd = -1;
    pthread_mutex_lock(&s->mu);
    s->active++;
    pthread_mutex_unlock(&s->mu);
    return q;
}

static void req_unref(srv_req *q) {
    pthread_mutex_lock(&q->mu);
    int left = --q->refs;
    pthread_mutex_unlock(&q->mu);
    if (left > 0) return;
    qlr_server *s = q->s;
    qlr_strbuf_free(&q->text);
    qlr_strbuf_free(&q->out);
    free(q->error);
    pthread_cond_destroy(&q->cv);
    pthread_mutex_destroy(&q->mu);
    free(q);
    pthread_mutex_lock(&s->mu);
    s->active--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* Engine thread: copy and signal, nothing more. */
static void on_event(void *ud, const qlr_engine_event *ev) {
    srv_req *q = ud;
    pthread_mutex_lock(&q->mu);
    if (ev->type == QLR_ENGINE_EV_TEXT) {
        qlr_strbuf_put(&q->text, ev->text, ev->len);
    } else {
        q->done = 1;
        q->finish = ev->finish;
        if (ev->finish == QLR_FINISH_ERROR) q->error = strdup(ev->error ? ev->error : "engine error");
        q->n_prompt = ev->n_prompt;
        q->n_generated = ev->n_generated;
        q->n_cached = ev->n_cached;
    }
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
    if (ev->type == QLR_ENGINE_EV_DONE) req_unref(q);
}

/* 1 when the peer has closed its end (or the socket failed). */
static int client_gone(int fd) {
    if (fd < 0) return 0;
    struct pollfd p = {fd, POLLRDHUP, 0};
    int n = poll(&p, 1, 0);
    return n > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

/* Called with q->mu held: waits one slice; returns 1 if the client went away (the request is
 * then cancelled) or the server is closing. */
static int wait_slice(srv_req *q) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_nsec += WAIT_SLICE_MS * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&q->cv, &q->mu, &ts);
    if (__atomic_load_n(&q->s->closing, __ATOMIC_ACQUIRE)) return 1;
    if (!q->done && !q->cancelled && client_gone(q->fd)) {
        q->cancelled = 1;
        pthread_mutex_unlock(&q->mu);
        qlr_engine_cancel(q->s->e, q->eid);
        pthread_mutex_lock(&q->mu);
        return 1;
    }
    return 0;
}

/* ---- responses ---- */

typedef enum route {
    R_NONE = 0, R_CHAT, R_COMPLETIONS, R_MODELS, R_MODEL_ONE, R_LOAD, R_UNLOAD, R_HEALTH, R_METRICS, R_PAGE,
} route;

typedef struct conn_ctx {
    route r;
    qlr_strbuf body;
    int too_large;
    int responded;                /* a response was queued before the body was read */
    int status;
    srv_req *req;
    double t0;
    char method[8];
} conn_ctx;

static void count_status(qlr_server *s, int status) {
    if (status > 0 && status < MAX_STATUS) __atomic_add_fetch(&s->status_counts[status], 1, __ATOMIC_RELAXED);
}

static const char OOM_BODY[] =
    "{\"error\":{\"message\":\"out of memory\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";

/* Queues `body` (malloc'ed, taken; NULL = out of memory: a 500) with `status`. */
static enum MHD_Result send_body(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx, int status,
                                 const char *ctype, char *body, size_t n) {
    struct MHD_Response *r;
    if (!body) {
        status = 500;
        ctype = "application/json";
        r = MHD_create_response_from_buffer(sizeof OOM_BODY - 1, (void *)OOM_BODY, MHD_RESPMEM_PERSISTENT);
    } else {
        r = MHD_create_response_from_buffer(n, body, MHD_RESPMEM_MUST_FREE);
        if (!r) free(body);
    }
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (status == 429) {
        char ra[16];
        snprintf(ra, sizeof ra, "%d", s->p.retry_after_s);
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, ra);
    }
    if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    if (status == 405) {
        const char *allow = cx && cx->r == R_PAGE ? "GET, HEAD"
                            : cx && (cx->r == R_MODELS || cx->r == R_MODEL_ONE || cx->r == R_HEALTH ||
                                     cx->r == R_METRICS) ? "GET" : "POST";
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow);
    }
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    count_status(s, status);
    if (cx) cx->status = status;
    return ret;
}

static enum MHD_Result send_json(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx, int status, char *json) {
    return send_body(s, c, cx, status, "application/json", json, json ? strlen(json) : 0);
}

static enum MHD_Result send_error(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx, const qlr_oai_error *e) {
    return send_json(s, c, cx, e->http_status, qlr_oai_error_json(e));
}

static enum MHD_Result send_errorf(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx, int status,
                                   const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static enum MHD_Result send_errorf(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx, int status,
                                   const char *param, const char *code, const char *fmt, ...) {
    qlr_oai_error e;
    char msg[sizeof e.message];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    qlr_oai_error_set(&e, status, param, code, "%s", msg);
    return send_error(s, c, cx, &e);
}

static char *json_steal_dump(json_t *v) {
    if (!v) return NULL;
    char *t = json_dumps(v, JSON_COMPACT);
    json_decref(v);
    return t;
}

/* ---- completions ---- */

/* The prompt's token ids; 0 with `err` set when it cannot be built. */
static int build_prompt(qlr_server *s, const qlr_oai_request *rq, qlr_tokens *ids, qlr_oai_error *err) {
    const char *param = rq->endpoint == QLR_OAI_CHAT ? "messages" : "prompt";
    if (rq->endpoint == QLR_OAI_CHAT) {
        if (!s->tmpl) {
            qlr_oai_error_set(err, 400, "messages", NULL,
                              "the model '%s' has no chat template this server can render; use "
                              "/v1/completions with a prompt", s->model_name);
            return 0;
        }
        qlr_chat_render rd = {0};
        if (qlr_chat_render_messages(s->tmpl, rq->messages, rq->n_messages, 1, &rd) != QLR_OK) {
            qlr_oai_error_set(err, 400, "messages", NULL, "'messages': %s", qlr_error_msg());
            qlr_error_clear();
            return 0;
        }
        qlr_status st = qlr_tokenizer_encode(s->tok, rd.text, rd.len, s->chat_flags, ids);
        qlr_chat_render_free(&rd);
        if (st != QLR_OK) {
            qlr_oai_error_set(err, 500, NULL, NULL, "tokenizing the prompt failed: %s", qlr_error_msg());
            return 0;
        }
    } else if (rq->prompt) {
        if (qlr_tokenizer_encode(s->tok, rq->prompt, strlen(rq->prompt), QLR_ENC_ADD_SPECIAL, ids) != QLR_OK) {
            qlr_oai_error_set(err, 500, NULL, NULL, "tokenizing the prompt failed: %s", qlr_error_msg());
            return 0;
        }
    } else {
        int32_t nv = qlr_tokenizer_n_vocab(s->tok);
        for (size_t i = 0; i < rq->n_prompt_ids; i++) {
            if (rq->prompt_ids[i] >= nv) {
                char p[48];
                snprintf(p, sizeof p, "prompt[%zu]", i);
                qlr_oai_error_set(err, 400, p, NULL, "'%s': token id %d is outside the vocabulary (%d tokens)",
                                  p, rq->prompt_ids[i], nv);
                return 0;
            }
            if (qlr_tokens_push(ids, rq->prompt_ids[i], 0) != QLR_OK) {
                qlr_oai_error_set(err, 500, NULL, NULL, "out of memory");
                return 0;
            }
        }
    }
    if (ids->n == 0) {
        qlr_oai_error_set(err, 400, param, NULL, "'%s' encodes to no tokens", param);
        return 0;
    }
    return 1;
}

/* The adapter the request names (*a NULL = the base model) and the name to answer with. */
static int resolve_adapter(qlr_server *s, const qlr_oai_request *rq, qlr_adapter **a, char *name,
                           size_t cap, qlr_oai_error *err) {
    *a = NULL;
    const char *want = NULL, *param = "model";
    char by_id[QLR_ADAPTER_NAME_MAX];
    int model_is_base = !rq->model || !rq->model[0] || !strcmp(rq->model, s->model_name);
    if (rq->has_lora) {
        if (rq->lora_id >= 0) {
            param = "lora[0].id";
            qlr_adapter_info *list = NULL;
            size_t n = 0;
            if (s->reg && qlr_registry_list(s->reg, &list, &n) != QLR_OK) {
                qlr_oai_error_set(err, 500, NULL, NULL, "listing adapters failed: %s", qlr_error_msg());
                return 0;
            }
            if ((size_t)rq->lora_id >= n) {
                free(list);
                qlr_oai_error_set(err, 404, param, "model_not_found",
                                  "'lora[0].id': no adapter with id %d (%zu attached; see /v1/models)",
                                  rq->lora_id, n);
                return 0;
            }
            snprintf(by_id, sizeof by_id, "%s", list[rq->lora_id].name);
            free(list);
            want = by_id;
        } else {
            param = "lora[0].name";
            want = rq->lora_name;
        }
        if (!model_is_base && strcmp(rq->model, want)) {
            qlr_oai_error_set(err, 400, "lora", NULL,
                              "'model' names '%s' but 'lora' selects '%s'; give the base model's name "
                              "('%s') or the same adapter in 'model'", rq->model, want, s->model_name);
            return 0;
        }
    } else if (!model_is_base) {
        want = rq->model;
    }
    if (!want) {
        snprintf(name, cap, "%s", s->model_name);
        return 1;
    }
    qlr_status st = s->reg ? qlr_registry_acquire(s->reg, want, a) : QLR_ERR_NOT_FOUND;
    if (st != QLR_OK) {
        *a = NULL;
        qlr_error_clear();
        qlr_oai_error_set(err, 404, param, "model_not_found",
                          "%s%s%sthe model '%s' does not exist: it is neither the base model ('%s') nor an "
                          "attached adapter (see /v1/models)", rq->has_lora ? "'" : "", rq->has_lora ? param : "",
                          rq->has_lora ? "': " : "", want, s->model_name);
        return 0;
    }
    snprintf(name, cap, "%s", want);
    return 1;
}

static uint64_t next_random(qlr_server *s) {
    uint64_t k = __atomic_add_fetch(&s->id_counter, 1, __ATOMIC_RELAXED);
    uint64_t z = s->id_seed + k * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static const char *finish_name(qlr_finish f) { return f == QLR_FINISH_LENGTH ? "length" : "stop"; }

/* Streamed responses: MHD calls this on the connection's thread whenever it can send. */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    srv_req *q = cls;
    (void)pos;
    pthread_mutex_lock(&q->mu);
    for (;;) {
        if (q->out.oom) break;
        if (q->out_pos < q->out.n) {
            size_t n = q->out.n - q->out_pos;
            if (n > max) n = max;
            memcpy(buf, q->out.p + q->out_pos, n);
            q->out_pos += n;
            if (q->out_pos == q->out.n) {
                q->out.n = 0;
                q->out_pos = 0;
            }
            pthread_mutex_unlock(&q->mu);
            return (ssize_t)n;
        }
        if (q->ended) {
            pthread_mutex_unlock(&q->mu);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        if (!q->began) {
            qlr_oai_stream_begin(&q->st, &q->out);
            q->began = 1;
            continue;
        }
        if (q->text.n) {
            qlr_oai_stream_text(&q->st, q->text.p, q->text.n, &q->out);
            q->text.n = 0;
            continue;
        }
        if (q->done) {
            if (q->finish == QLR_FINISH_ERROR || q->finish == QLR_FINISH_CANCELLED) {
                if (q->cancelled) break; /* our own cancel: the client is gone */
                qlr_oai_error e;
                if (q->finish == QLR_FINISH_ERROR)
                    qlr_oai_error_set(&e, 500, NULL, NULL, "generation failed: %s", q->error ? q->error : "");
                else
                    qlr_oai_error_set(&e, 503, NULL, NULL, "the request was cancelled: the server is shutting down");
                qlr_oai_stream_error(&e, &q->out);
            } else {
                qlr_oai_stream_end(&q->st, finish_name(q->finish), q->n_prompt, q->n_generated, q->n_cached,
                                   &q->out);
            }
            q->ended = 1;
            continue;
        }
        if (wait_slice(q)) break;
    }
    pthread_mutex_unlock(&q->mu);
    return MHD_CONTENT_READER_END_WITH_ERROR;
}

static void stream_free(void *cls) { req_unref(cls); }

static enum MHD_Result completion(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx) {
    qlr_oai_endpoint ep = cx->r == R_CHAT ? QLR_OAI_CHAT : QLR_OAI_COMPLETIONS;
    if (__atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE))
        return send_errorf(s, c, cx, 503, NULL, "shutting_down", "the server is shutting down");
    qlr_oai_request rq;
    qlr_oai_error err;
    memset(&err, 0, sizeof err);
    if (qlr_oai_parse_request(ep, cx->body.p ? cx->body.p : "", cx->body.n, &rq, &err) != QLR_OK)
        return send_error(s, c, cx, &err);
    enum MHD_Result ret;
    qlr_tokens ids = {0};
    qlr_adapter *adapter = NULL;
    char name[sizeof ((srv_req *)0)->model];
    const char *prompt_field = ep == QLR_OAI_CHAT ? "messages" : "prompt";
    if (!build_prompt(s, &rq, &ids, &err)) goto fail;
    if (ids.n >= (size_t)s->p.max_ctx) {
        qlr_oai_error_set(&err, 400, prompt_field, "context_length_exceeded",
                          "'%s': this model's maximum context length is %d tokens, but the prompt has %zu tokens",
                          prompt_field, s->p.max_ctx, ids.n);
        goto fail;
    }
    int32_t n_prompt = (int32_t)ids.n;
    /* the engine reserves the KV blocks of prompt + max_tokens when the request starts */
    qlr_engine_stats es;
    qlr_engine_get_stats(s->e, &es);
    int64_t kv_tokens = (int64_t)es.kv_blocks_total * es.kv_block;
    int32_t max_tokens = rq.max_tokens;
    if (!max_tokens) { /* what is left of the context and of the KV cache, at most the default */
        int64_t room = s->p.max_ctx - n_prompt;
        if (kv_tokens > 0 && kv_tokens - n_prompt < room) room = kv_tokens - n_prompt;
        if (s->p.default_max_tokens > 0 && s->p.default_max_tokens < room) room = s->p.default_max_tokens;
        max_tokens = room > 0 ? (int32_t)room : 1;
    }
    if ((int64_t)n_prompt + max_tokens > s->p.max_ctx) {
        qlr_oai_error_set(&err, 400, rq.max_tokens_field, "context_length_exceeded",
                          "'%s': this model's maximum context length is %d tokens; the prompt has %d and %d "
                          "were requested for the completion", rq.max_tokens_field, s->p.max_ctx, n_prompt, max_tokens);
        goto fail;
    }
    if (kv_tokens > 0 && (int64_t)n_prompt + max_tokens > kv_tokens) {
        const char *f = rq.max_tokens ? rq.max_tokens_field : prompt_field;
        qlr_oai_error_set(&err, 400, f, "context_length_exceeded",
                          "'%s': the prompt (%d tokens) + %d completion tokens do not fit in the KV cache "
                          "(%lld tokens)", f, n_prompt, max_tokens, (long long)kv_tokens);
        goto fail;
    }
    if (!resolve_adapter(s, &rq, &adapter, name, sizeof name, &err)) goto fail;

    srv_req *q = req_new(s);
    if (!q) {
        qlr_registry_release(s->reg, adapter);
        qlr_oai_error_set(&err, 500, NULL, NULL, "out of memory");
        goto fail;
    }
    q->ep = ep;
    snprintf(q->model, sizeof q->model, "%s", name);
    qlr_oai_make_id(ep, next_random(s), q->id, sizeof q->id);
    q->created = (int64_t)time(NULL);
    q->st = (qlr_oai_stream){ep, q->id, q->created, q->model, rq.include_usage};
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    q->fd = ci ? ci->connect_fd : -1;

    qlr_engine_request er;
    memset(&er, 0, sizeof er);
    er.prompt = ids.ids;
    er.n_prompt = n_prompt;
    er.max_tokens = max_tokens;
    er.sampling.temperature = rq.temperature;
    er.sampling.top_k = rq.top_k;
    er.sampling.top_p = rq.top_p;
    if (rq.top_p <= 0.0f) { /* OpenAI allows 0: only the most likely token, i.e. greedy */
        er.sampling.temperature = 0.0f;
        er.sampling.top_p = 1.0f;
    }
    er.seed = rq.has_seed ? rq.seed : next_random(s);
    er.stop = rq.stop;
    er.n_stop = rq.n_stop;
    er.ignore_eos = rq.ignore_eos;
    er.adapter = adapter;        /* the engine takes the reference over, also on failure */
    er.adapter_scale = rq.lora_scale;
    q->refs++;                   /* the engine's */
    qlr_status st = qlr_engine_submit(s->e, &er, on_event, q, &q->eid);
    if (st != QLR_OK) {
        q->refs--;
        int status = st == QLR_ERR_BUSY ? 429 : st == QLR_ERR_CANCELLED ? 503 : st == QLR_ERR_INVALID ? 400 : 500;
        const char *code = st == QLR_ERR_BUSY ? "rate_limit_exceeded" : st == QLR_ERR_CANCELLED ? "shutting_down" : NULL;
        if (st == QLR_ERR_BUSY)
            qlr_oai_error_set(&err, 429, NULL, code, "the server is at capacity (the request queue is full); "
                                                     "retry after %d s", s->p.retry_after_s);
        else
            qlr_oai_error_set(&err, status, NULL, code, "%s", qlr_error_msg()[0] ? qlr_error_msg() : qlr_status_str(st));
        qlr_error_clear();
        req_unref(q);
        goto fail;
    }
    cx->req = q;                 /* the connection's reference */
    qlr_tokens_free(&ids);

    if (rq.stream) {
        qlr_oai_request_free(&rq);
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK, stream_reader,
                                                                   q, stream_free);
        if (!r) return MHD_NO;   /* the completed notification cancels */
        pthread_mutex_lock(&q->mu);
        q->refs++;               /* the response's, dropped in stream_free */
        pthread_mutex_unlock(&q->mu);
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        ret = MHD_queue_response(c, MHD_HTTP_OK, r);
        MHD_destroy_response(r);
        count_status(s, 200);
        cx->status = 200;
        return ret;
    }

    /* not streamed: wait here for the whole answer */
    pthread_mutex_lock(&q->mu);
    int gone = 0;
    while (!q->done && !gone) gone = wait_slice(q);
    while (!q->done && q->cancelled && !__atomic_load_n(&s->closing, __ATOMIC_ACQUIRE)) wait_slice(q);
    int done = q->done;
    qlr_finish finish = q->finish;
    pthread_mutex_unlock(&q->mu);
    qlr_oai_request_free(&rq);
    if (!done || q->cancelled) {
        cx->status = 499;        /* nginx's "client closed request", for the log only */
        return MHD_NO;
    }
    if (finish == QLR_FINISH_ERROR)
        return send_errorf(s, c, cx, 500, NULL, NULL, "generation failed: %s", q->error ? q->error : "");
    if (finish == QLR_FINISH_CANCELLED)
        return send_errorf(s, c, cx, 503, NULL, "shutting_down", "the request was cancelled: the server is shutting down");
    qlr_oai_result res = {q->id, q->created, q->model, q->text.p, q->text.n, finish_name(finish),
                          q->n_prompt, q->n_generated, q->n_cached};
    return send_json(s, c, cx, 200, qlr_oai_format_result(ep, &res));

fail:
    qlr_tokens_free(&ids);
    qlr_oai_request_free(&rq);
    return send_error(s, c, cx, &err);
}

/* ---- adapters, models, health, metrics ---- */

static int valid_adapter_name(const char *n) {
    size_t len = strlen(n);
    if (len == 0 || len >= QLR_ADAPTER_NAME_MAX) return 0;
    for (const char *c = n; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              strchr("._:/-", *c)))
            return 0;
    return 1;
}

static enum MHD_Result load_adapter(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx) {
    qlr_oai_lora_request lr;
    qlr_oai_error err;
    if (!s->reg) return send_errorf(s, c, cx, 400, NULL, NULL, "this server has no adapter registry");
    if (qlr_oai_parse_lora_request(cx->body.p ? cx->body.p : "", cx->body.n, 1, &lr, &err) != QLR_OK)
        return send_error(s, c, cx, &err);
    enum MHD_Result ret;
    char real[4096];
    if (!valid_adapter_name(lr.lora_name) || !strcmp(lr.lora_name, s->model_name)) {
        qlr_oai_error_set(&err, 400, "lora_name", NULL,
                          "'lora_name': '%s' is not a valid adapter name (1 to %d characters of A-Z a-z 0-9 . _ : / -, "
                          "not the base model's name)", lr.lora_name, QLR_ADAPTER_NAME_MAX - 1);
        ret = send_error(s, c, cx, &err);
    } else if (!qlr_http_confine_path(s->adapter_dir, lr.lora_path, real, sizeof real, &err)) {
        ret = send_error(s, c, cx, &err);
    } else {
        qlr_adapter *held = NULL;
        if (qlr_registry_acquire(s->reg, lr.lora_name, &held) == QLR_OK) {
            qlr_registry_release(s->reg, held);
            qlr_oai_error_set(&err, 400, "lora_name", "adapter_exists",
                              "'lora_name': the adapter '%s' is already loaded; unload it first", lr.lora_name);
            ret = send_error(s, c, cx, &err);
        } else {
            qlr_error_clear();
            qlr_status st = qlr_registry_attach_file(s->reg, lr.lora_name, real, 0);
            if (st != QLR_OK) {
                qlr_oai_error_set(&err, st == QLR_ERR_NOMEM ? 500 : 400, st == QLR_ERR_NOMEM ? NULL : "lora_path",
                                  NULL, "%sloading the adapter '%s' failed: %s", st == QLR_ERR_NOMEM ? "" : "'lora_path': ",
                                  lr.lora_name, qlr_error_msg());
                qlr_error_clear();
                ret = send_error(s, c, cx, &err);
            } else {
                QLR_LOGI("adapter '%s' loaded from %s", lr.lora_name, real);
                json_t *o = json_object();
                json_object_set_new(o, "object", json_string("lora_adapter"));
                json_object_set_new(o, "lora_name", json_string(lr.lora_name));
                json_object_set_new(o, "status", json_string("loaded"));
                ret = send_json(s, c, cx, 200, json_steal_dump(o));
            }
        }
    }
    qlr_oai_lora_request_free(&lr);
    return ret;
}

static enum MHD_Result unload_adapter(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx) {
    qlr_oai_lora_request lr;
    qlr_oai_error err;
    if (!s->reg) return send_errorf(s, c, cx, 400, NULL, NULL, "this server has no adapter registry");
    if (qlr_oai_parse_lora_request(cx->body.p ? cx->body.p : "", cx->body.n, 0, &lr, &err) != QLR_OK)
        return send_error(s, c, cx, &err);
    enum MHD_Result ret;
    if (qlr_registry_detach(s->reg, lr.lora_name) != QLR_OK) {
        qlr_error_clear();
        qlr_oai_error_set(&err, 404, "lora_name", "model_not_found", "'lora_name': no adapter named '%s' is loaded",
                          lr.lora_name);
        ret = send_error(s, c, cx, &err);
    } else {
        QLR_LOGI("adapter '%s' unloaded (freed once its running requests end)", lr.lora_name);
        json_t *o = json_object();
        json_object_set_new(o, "object", json_string("lora_adapter"));
        json_object_set_new(o, "lora_name", json_string(lr.lora_name));
        json_object_set_new(o, "status", json_string("unloaded"));
        ret = send_json(s, c, cx, 200, json_steal_dump(o));
    }
    qlr_oai_lora_request_free(&lr);
    return ret;
}

static enum MHD_Result list_models(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx, const char *one) {
    qlr_adapter_info *list = NULL;
    size_t n = 0;
    if (s->reg && qlr_registry_list(s->reg, &list, &n) != QLR_OK) {
        qlr_error_clear();
        return send_errorf(s, c, cx, 500, NULL, NULL, "listing adapters failed");
    }
    char *text = qlr_oai_format_models(s->model_name, s->created, s->p.max_ctx, list, n);
    free(list);
    if (!one || !text) return send_json(s, c, cx, 200, text);
    /* GET /v1/models/{id}: the one entry of the list */
    json_t *all = json_loads(text, 0, NULL);
    free(text);
    json_t *data = json_object_get(all, "data"), *m;
    size_t i;
    json_array_foreach(data, i, m) {
        if (!strcmp(json_string_value(json_object_get(m, "id")), one)) {
            char *t = json_dumps(m, JSON_COMPACT);
            json_decref(all);
            return send_json(s, c, cx, 200, t);
        }
    }
    json_decref(all);
    return send_errorf(s, c, cx, 404, "model", "model_not_found", "the model '%s' does not exist", one);
}

static enum MHD_Result metrics(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx) {
    qlr_engine_stats es;
    qlr_engine_get_stats(s->e, &es);
    qlr_registry_stats rs;
    qlr_adapter_info *list = NULL;
    size_t n = 0;
    if (s->reg) {
        qlr_registry_get_stats(s->reg, &rs);
        if (qlr_registry_list(s->reg, &list, &n) != QLR_OK) {
            qlr_error_clear();
            n = 0;
        }
    }
    int codes[MAX_STATUS];
    uint64_t counts[MAX_STATUS];
    size_t nc = 0;
    for (int i = 0; i < MAX_STATUS; i++) {
        uint64_t v = __atomic_load_n(&s->status_counts[i], __ATOMIC_RELAXED) + (i == 200); /* + this answer */
        if (v) {
            codes[nc] = i;
            counts[nc++] = v;
        }
    }
    qlr_metrics_input in = {&es, s->reg ? &rs : NULL, list, n, codes, counts, nc, qlr_now() - s->t0,
                            __atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE)};
    qlr_strbuf b = {0};
    qlr_metrics_write(&in, &b);
    free(list);
    if (b.oom) {
        qlr_strbuf_free(&b);
        b.p = NULL;
    }
    return send_body(s, c, cx, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.n);
}

static enum MHD_Result health(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx) {
    int draining = __atomic_load_n(&s->stopping, __ATOMIC_ACQUIRE);
    const char *body = draining ? "{\"status\":\"draining\"}" : "{\"status\":\"ok\"}";
    return send_json(s, c, cx, draining ? 503 : 200, strdup(body));
}

/* The web page's files (infer/web.h), with no key: the page asks for it and sends it to the API. */
static enum MHD_Result page(qlr_server *s, struct MHD_Connection *c, conn_ctx *cx, const qlr_web_asset *a) {
    struct MHD_Response *r = MHD_create_response_from_buffer(a->size, (void *)a->data, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, a->content_type);
    MHD_add_response_header(r, "Content-Security-Policy", QLR_WEB_CSP);
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    enum MHD_Result ret = MHD_queue_response(c, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    count_status(s, 200);
    cx->status = 200;
    return ret;
}

/* ---- routing ---- */

static route route_of(const char *url, const char *method, int *method_ok, const char **model_id) {
    static const struct { const char *path; const char *method; route r; } table[] = {
        {"/v1/chat/completions", "POST", R_CHAT},   {"/v1/completions", "POST", R_COMPLETIONS},
        {"/v1/models", "GET", R_MODELS},            {"/v1/load_lora_adapter", "POST", R_LOAD},
        {"/v1/unload_lora_adapter", "POST", R_UNLOAD}, {"/health", "GET", R_HEALTH},
        {"/metrics", "GET", R_METRICS},
    };
    *model_id = NULL;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (!strcmp(url, table[i].path)) {
            *method_ok = !strcmp(method, table[i].method);
            return table[i].r;
        }
    if (!strncmp(url, "/v1/models/", 11) && url[11]) {
        *method_ok = !strcmp(method, "GET");
        *model_id = url + 11;
        return R_MODEL_ONE;
    }
    if (qlr_web_find(url)) {
        *method_ok = !strcmp(method, "GET") || !strcmp(method, "HEAD");
        return R_PAGE;
    }
    *method_ok = 0;
    return R_NONE;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                               const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    qlr_server *s = cls;
    (void)version;
    conn_ctx *cx = *con_cls;
    const char *model_id = NULL;
    if (!cx) {
        /* headers only: refuse early what needs no body */
        cx = calloc(1, sizeof *cx);
        if (!cx) return MHD_NO;
        *con_cls = cx;
        cx->t0 = qlr_now();
        snprintf(cx->method, sizeof cx->method, "%s", method);
        int method_ok;
        cx->r = route_of(url, method, &method_ok, &model_id);
        if (cx->r == R_NONE) {
            cx->responded = 1;
            return send_errorf(s, c, cx, 404, NULL, "not_found", "no route %s %s", method, url);
        }
        if (!method_ok) {
            cx->responded = 1;
            return send_errorf(s, c, cx, 405, NULL, "method_not_allowed", "%s is not allowed on %s", method, url);
        }
        if (cx->r != R_HEALTH && cx->r != R_PAGE &&
            !qlr_http_auth_ok(MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION),
                              s->api_key)) {
            cx->responded = 1;
            return send_errorf(s, c, cx, 401, NULL, "invalid_api_key",
                               "missing or wrong API key: send 'Authorization: Bearer <key>'");
        }
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > s->p.max_body) {
            cx->responded = 1;
            return send_errorf(s, c, cx, 413, NULL, "request_too_large",
                               "the request body has %s bytes; at most %zu are accepted", cl, s->p.max_body);
        }
        return MHD_YES;
    }
    if (*upload_size) {
        if (!cx->responded && !cx->too_large) {
            if (cx->body.n + *upload_size > s->p.max_body) {
                cx->too_large = 1;
                qlr_strbuf_free(&cx->body);
            } else {
                qlr_strbuf_put(&cx->body, upload, *upload_size);
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (cx->responded) return MHD_YES;
    cx->responded = 1;
    if (cx->too_large)
        return send_errorf(s, c, cx, 413, NULL, "request_too_large", "the request body is over %zu bytes",
                           s->p.max_body);
    if (cx->body.oom) return send_body(s, c, cx, 500, "application/json", NULL, 0);
    switch (cx->r) {
    case R_CHAT:
    case R_COMPLETIONS: return completion(s, c, cx);
    case R_MODELS: return list_models(s, c, cx, NULL);
    case R_MODEL_ONE: {
        int ok;
        route_of(url, method, &ok, &model_id);
        return list_models(s, c, cx, model_id);
    }
    case R_LOAD: return load_adapter(s, c, cx);
    case R_UNLOAD: return unload_adapter(s, c, cx);
    case R_HEALTH: return health(s, c, cx);
    case R_METRICS: return metrics(s, c, cx);
    case R_PAGE: {
        const qlr_web_asset *a = qlr_web_find(url);
        return a ? page(s, c, cx, a) : MHD_NO;
    }
    default: return MHD_NO;
    }
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    qlr_server *s = cls;
    (void)c;
    conn_ctx *cx = *con_cls;
    if (!cx) return;
    *con_cls = NULL;
    if (cx->req) {
        srv_req *q = cx->req;
        pthread_mutex_lock(&q->mu);
        int cancel = !q->done && !q->cancelled;
        if (cancel) q->cancelled = 1;
        pthread_mutex_unlock(&q->mu);
        if (cancel) qlr_engine_cancel(s->e, q->eid);
        if (s->p.log_requests)
            QLR_LOGI("%s %s %d%s %.2f s, %d prompt + %d generated tokens", cx->method,
                     cx->r == R_CHAT ? "/v1/chat/completions" : "/v1/completions", cx->status,
                     cancel || toe != MHD_REQUEST_TERMINATED_COMPLETED_OK ? " (client gone: cancelled)" : "",
                     qlr_now() - cx->t0, q->n_prompt, q->n_generated);
        req_unref(q);
    } else if (s->p.log_requests && cx->r != R_HEALTH && cx->r != R_METRICS && cx->r != R_PAGE) {
        QLR_LOGI("%s %d %.3f s", cx->method, cx->status, qlr_now() - cx->t0);
    }
    qlr_strbuf_free(&cx->body);
    free(cx);
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    qlr_server *s = cls;
    vsnprintf(s->mhd_error, sizeof s->mhd_error, fmt, ap);
    size_t n = strlen(s->mhd_error);
    while (n && s->mhd_error[n - 1] == '\n') s->mhd_error[--n] = 0;
    QLR_LOGD("libmicrohttpd: %s", s->mhd_error);
}

/* ---- lifecycle ---- */

qlr_server_params qlr_server_params_default(void) {
    qlr_server_params p;
    memset(&p, 0, sizeof p);
    p.host = "127.0.0.1";
    p.port = 8080;
    p.max_body = (size_t)1 << 20;
    p.default_max_tokens = 2048;
    p.retry_after_s = 1;
    p.max_connections = 512;
    p.log_requests = 1;
    return p;
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

qlr_status qlr_server_start(qlr_engine *e, qlr_registry *reg, const qlr_tokenizer *tok,
                            const qlr_server_params *p, qlr_server **out) {
    *out = NULL;
    if (!e || !tok || !p || !p->model_name || !p->model_name[0] || p->max_ctx <= 0 || !p->host)
        return qlr_errorf(QLR_ERR_INVALID, "server: an engine, a tokenizer, a model name, max_ctx and a host are required");
    if (p->adapter_dir && !qlr_is_dir(p->adapter_dir))
        return qlr_errorf(QLR_ERR_INVALID, "--adapter-dir %s is not a folder", p->adapter_dir);
    qlr_server *s = calloc(1, sizeof *s);
    if (!s) return qlr_errorf(QLR_ERR_NOMEM, "server: out of memory");
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->e = e;
    s->reg = reg;
    s->tok = tok;
    s->p = *p;
    if (s->p.max_body == 0) s->p.max_body = (size_t)1 << 20;
    if (s->p.retry_after_s <= 0) s->p.retry_after_s = 1;
    if (s->p.max_connections <= 0) s->p.max_connections = 512;
    s->host = strdup(p->host);
    s->api_key = dup_or_null(p->api_key);
    s->adapter_dir = dup_or_null(p->adapter_dir);
    s->model_name = strdup(p->model_name);
    s->quiesced_fd = MHD_INVALID_SOCKET;
    s->created = (int64_t)time(NULL);
    s->t0 = qlr_now();
    if (getrandom(&s->id_seed, sizeof s->id_seed, 0) != (ssize_t)sizeof s->id_seed)
        s->id_seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    qlr_status st = QLR_OK;
    if (!s->host || !s->model_name || (p->api_key && !s->api_key) || (p->adapter_dir && !s->adapter_dir)) {
        st = qlr_errorf(QLR_ERR_NOMEM, "server: out of memory");
        goto fail;
    }

    const char *src = qlr_tokenizer_chat_template(tok);
    if (src && qlr_chat_template_detect(src, strlen(src), &s->tmpl) == QLR_OK) {
        s->chat_flags = QLR_ENC_PARSE_SPECIAL | (qlr_chat_template_has_bos(s->tmpl) ? 0 : QLR_ENC_ADD_SPECIAL);
    } else {
        QLR_LOGW("%s: %s; /v1/chat/completions will answer 400 (use /v1/completions)", p->model_name,
                 src ? qlr_error_msg() : "the model has no chat template");
        qlr_error_clear();
        s->tmpl = NULL;
    }

    char port[8];
    snprintf(port, sizeof port, "%u", (unsigned)p->port);
    struct addrinfo hints, *ai = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int gai = getaddrinfo(p->host, port, &hints, &ai);
    if (gai != 0 || !ai) {
        st = qlr_errorf(QLR_ERR_INVALID, "--host %s: %s", p->host, gai_strerror(gai));
        goto fail;
    }
    struct sockaddr_storage addr;
    memset(&addr, 0, sizeof addr);
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    int v6 = ai->ai_family == AF_INET6;
    freeaddrinfo(ai);

    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ITC | MHD_USE_POLL |
                     MHD_USE_ERROR_LOG | (v6 ? MHD_USE_IPv6 : 0);
    s->d = MHD_start_daemon(flags, p->port, NULL, NULL, handler, s, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_CONNECTION_LIMIT,
                            (unsigned)s->p.max_connections, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)300,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s, MHD_OPTION_END);
    if (!s->d) {
        st = qlr_errorf(QLR_ERR_IO, "cannot listen on %s:%s%s%s", p->host, port, s->mhd_error[0] ? ": " : "",
                        s->mhd_error);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : p->port;
    *out = s;
    return QLR_OK;
fail:
    s->stopped = 1;
    qlr_server_free(s);
    return st;
}

uint16_t qlr_server_port(const qlr_server *s) { return s->port; }

const char *qlr_server_chat_template(const qlr_server *s) {
    return s->tmpl ? qlr_chat_template_name(s->tmpl) : NULL;
}

void qlr_server_stop(qlr_server *s, int drain, double timeout_s) {
    if (!s || s->stopped) return;
    __atomic_store_n(&s->stopping, 1, __ATOMIC_RELEASE);
    if (s->d) s->quiesced_fd = MHD_quiesce_daemon(s->d);
    qlr_engine_stop(s->e, drain);
    /* every request has its DONE now; let the last answers leave */
    double deadline = qlr_now() + (timeout_s > 0 ? timeout_s : 0);
    pthread_mutex_lock(&s->mu);
    while (s->active > 0 && qlr_now() < deadline) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += WAIT_SLICE_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    }
    int left = s->active;
    pthread_mutex_unlock(&s->mu);
    if (left > 0 && drain) QLR_LOGW("%d responses still being sent after %.0f s; closing their connections", left, timeout_s);
    __atomic_store_n(&s->closing, 1, __ATOMIC_RELEASE);
    if (s->d) MHD_stop_daemon(s->d);
    s->d = NULL;
    if (s->quiesced_fd != MHD_INVALID_SOCKET) close(s->quiesced_fd);
    s->quiesced_fd = MHD_INVALID_SOCKET;
    s->stopped = 1;
}

void qlr_server_free(qlr_server *s) {
    if (!s) return;
    qlr_server_stop(s, 0, 0);
    qlr_chat_template_free(s->tmpl);
    free(s->host);
    free(s->api_key);
    free(s->adapter_dir);
    free(s->model_name);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
