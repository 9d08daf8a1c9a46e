/* infer/engine.c: the serving engine (infer/engine.h): the request queue, the engine thread and
 * its scheduler, sampling, stop conditions and the events sent to each request's callback.
 *
 * One thread owns the backend. Each step it builds one batch: a token for every running request
 * that is decoding, then chunks of prompts still prefilling (chunked prefill), then new requests
 * admitted from the queue (FIFO) while the step has tokens left (max_batch_tokens), a request slot
 * is free (max_running) and the KV blocks the request may ever need fit (engine_kv.c reserves
 * them; a request that does not fit waits at the head of the queue: nothing is preempted). Every
 * token carries its request's adapter slot: the step's slot table holds each distinct (adapter,
 * scale) of the batch, pinned in the registry while its requests run. One forward through the
 * paged cache, one sample call for the rows that need a token, then each request's stop
 * conditions and text (engine_text.c). Requests finish with exactly one DONE event; a failed
 * forward ends the requests of that step with QLR_FINISH_ERROR and the engine goes on.
 *
 * Threads: submit, cancel, stop and get_stats may be called from any thread; they touch only
 * what the mutex guards (the queue, the running list's membership, flags and counters). Callbacks
 * run on the engine thread with no lock held. It does not own the model, tokenizer or registry. */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "adapters/adapter_dev.h"
#include "core/core.h"
#include "data/tokenizer.h"
#include "infer/engine.h"
#include "infer/engine_internal.h"

#define IDLE_ADAPTERS_MAX 8   /* adapters kept referenced after their last request (prefix keys) */
#define IDLE_CHECK_S 1.0
#define PREFETCH_AHEAD 16     /* queued requests whose file-tier adapters are read ahead */      /* how often idle adapters are checked against the registry */
#define RATE_WINDOW_S 5.0     /* tokens_per_s window */
#define RATE_SAMPLES 64
#define KEY_BASE 0x71723a62617365ull /* prefix key seed of the base model */

/* An adapter the engine has seen: its identity for prefix keys (uid, never reused) is valid while
 * a reference keeps the adapter alive: its requests' own, or the engine's after they end (so a
 * later request with the same adapter finds its cached prefixes). Engine thread only. */
typedef struct ad_entry {
    qlr_adapter *a;
    uint64_t uid;
    int32_t live;           /* admitted requests using it */
    int held;               /* the engine holds one reference of its own */
    double idle_since;
    struct ad_entry *next;
} ad_entry;

typedef struct rq {
    uint64_t id;
    struct rq *next;        /* queue link */
    qlr_engine_cb cb;
    void *ud;
    int32_t *tok;           /* [n_prompt + max_tokens]: the prompt, then generated tokens */
    int32_t n_prompt, n_tok, max_tokens, n_gen;
    int32_t n_done;         /* positions whose K/V is in the cache */
    int32_t n_cached;       /* prompt tokens from the prefix cache */
    int32_t chunk;          /* tokens of the current step */
    qlr_sampling sp;
    uint64_t rng;
    int32_t *stop_ids;
    int32_t n_stop_ids;
    int ignore_eos;
    qlr_etext text;
    qlr_adapter *adapter;   /* the caller's reference, owned by the request */
    float scale;
    ad_entry *ad;           /* admitted with an adapter */
    const qlr_lora_dev *dev;/* pinned */
    uint64_t key;           /* prefix cache key: adapter identity and scale */
    qlr_kvm_seq kv;
    int cancelled;          /* under mu */
} rq;

struct qlr_engine {
    qlr_model *m;
    qlr_backend *be;
    const qlr_tokenizer *tok;
    qlr_registry *reg;
    qlr_engine_params p;
    qlr_forward *f;
    qlr_kv_paged *kv;
    qlr_kvm *kvm;
    int32_t n_blocks;       /* blocks in the pool (constant) */
    qlr_adapter_slots *slots;
    pthread_t th;
    int started, join_claimed;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* under mu */
    rq *q_head, *q_tail;
    int32_t n_queued;
    rq **run;               /* [max_running] admitted requests, in admission order */
    int32_t n_run;
    int stopping, drain, cancel_pending;
    uint64_t next_id;
    qlr_engine_stats st;
    double rate_t[RATE_SAMPLES];
    uint64_t rate_g[RATE_SAMPLES];
    int rate_n, rate_i;
    /* engine thread */
    ad_entry *ads;
    uint64_t next_uid;
    double last_idle_check;
    int32_t *b_tok, *b_pos, *b_seq, *b_aslot, *b_rows, *btab;
    rq **b_req;             /* [max_running] requests of the step (rows of the block table) */
    rq **l_req;             /* [max_running] requests of the logits rows */
    qlr_sampling *s_par;
    uint64_t *s_rng;
    int32_t *s_ids;
    const qlr_lora_dev **sl_dev;
    float *sl_scale;
};

qlr_engine_params qlr_engine_params_default(void) {
    qlr_engine_params p;
    memset(&p, 0, sizeof p);
    p.max_batch_tokens = 512;
    p.max_running = 64;
    p.max_queue = 256;
    p.max_ctx = 0;      /* min(ctx_train, 8192), resolved by create */
    p.kv_block = 16;
    p.kv_bytes = 0;     /* room for max_running sequences of min(max_ctx, 2048) tokens */
    p.prefix_cache = 1;
    return p;
}

/* ---- requests ---- */

static void rq_free(qlr_engine *e, rq *r) {
    if (!r) return;
    if (r->adapter) qlr_registry_release(e->reg, r->adapter);
    qlr_etext_free(&r->text);
    free(r->kv.ids);
    free(r->tok);
    free(r->stop_ids);
    free(r);
}

static qlr_status validate(const qlr_engine *e, const qlr_engine_request *r, qlr_engine_cb cb) {
    const qlr_model_config *c = &e->m->cfg;
    if (!cb) return qlr_errorf(QLR_ERR_INVALID, "request: no callback");
    if (!r->prompt || r->n_prompt < 1)
        return qlr_errorf(QLR_ERR_INVALID, "prompt: empty");
    if (r->max_tokens < 1)
        return qlr_errorf(QLR_ERR_INVALID, "max_tokens: %d (must be >= 1)", r->max_tokens);
    if ((int64_t)r->n_prompt + r->max_tokens > e->p.max_ctx)
        return qlr_errorf(QLR_ERR_INVALID, "prompt (%d tokens) + max_tokens (%d) is more than the "
                          "context of %d tokens", r->n_prompt, r->max_tokens, e->p.max_ctx);
    for (int32_t i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= c->n_vocab)
            return qlr_errorf(QLR_ERR_INVALID, "prompt: token %d is id %d, outside the vocabulary "
                              "(0..%d)", i, r->prompt[i], c->n_vocab - 1);
    if (r->n_stop_ids < 0 || (r->n_stop_ids > 0 && !r->stop_ids))
        return qlr_errorf(QLR_ERR_INVALID, "stop_ids: %d ids", r->n_stop_ids);
    if (r->n_stop < 0 || (r->n_stop > 0 && !r->stop))
        return qlr_errorf(QLR_ERR_INVALID, "stop: %d strings", r->n_stop);
    for (int32_t i = 0; i < r->n_stop; i++)
        if (!r->stop[i] || !r->stop[i][0])
            return qlr_errorf(QLR_ERR_INVALID, "stop: string %d is empty", i);
    if (!isfinite(r->sampling.temperature))
        return qlr_errorf(QLR_ERR_INVALID, "temperature: not a finite number");
    if (!(r->sampling.top_p > 0.0f) || isnan(r->sampling.top_p))
        return qlr_errorf(QLR_ERR_INVALID, "top_p: %g (must be > 0)", (double)r->sampling.top_p);
    if (r->adapter && !e->reg)
        return qlr_errorf(QLR_ERR_INVALID, "adapter: this engine has no adapter registry");
    if (r->adapter && !isfinite(r->adapter_scale))
        return qlr_errorf(QLR_ERR_INVALID, "adapter scale: not a finite number");
    int64_t need = ((int64_t)r->n_prompt + r->max_tokens - 1 + e->p.kv_block - 1) / e->p.kv_block;
    if (need > e->n_blocks)
        return qlr_errorf(QLR_ERR_INVALID, "prompt (%d tokens) + max_tokens (%d) needs %lld KV "
                          "blocks of %d tokens; the cache holds %d", r->n_prompt, r->max_tokens,
                          (long long)need, e->p.kv_block, e->n_blocks);
    return QLR_OK;
}

qlr_status qlr_engine_submit(qlr_engine *e, const qlr_engine_request *r, qlr_engine_cb cb,
                             void *ud, uint64_t *id) {
    if (id) *id = 0;
    qlr_status st = validate(e, r, cb);
    rq *q = NULL;
    if (st == QLR_OK) {
        q = calloc(1, sizeof *q);
        if (!q) st = qlr_errorf(QLR_ERR_NOMEM, "request");
    }
    if (!q) {
        if (r->adapter && e->reg) qlr_registry_release(e->reg, r->adapter);
        return st;
    }
    q->adapter = r->adapter; /* from here on rq_free releases it */
    q->scale = r->adapter_scale;
    q->cb = cb;
    q->ud = ud;
    q->n_prompt = q->n_tok = r->n_prompt;
    q->max_tokens = r->max_tokens;
    q->sp = r->sampling;
    q->rng = r->seed;
    q->tok = malloc(((size_t)r->n_prompt + (size_t)r->max_tokens) * sizeof *q->tok);
    q->n_stop_ids = r->n_stop_ids;
    q->ignore_eos = r->ignore_eos;
    q->stop_ids = r->n_stop_ids > 0 ? malloc((size_t)r->n_stop_ids * sizeof *q->stop_ids) : NULL;
    if (!q->tok || (r->n_stop_ids > 0 && !q->stop_ids)) {
        rq_free(e, q);
        return qlr_errorf(QLR_ERR_NOMEM, "request of %d tokens", r->n_prompt + r->max_tokens);
    }
    memcpy(q->tok, r->prompt, (size_t)r->n_prompt * sizeof *q->tok);
    if (r->n_stop_ids > 0) memcpy(q->stop_ids, r->stop_ids, (size_t)r->n_stop_ids * sizeof *q->stop_ids);
    st = qlr_etext_init(&q->text, e->tok, r->stop, r->n_stop);
    if (st != QLR_OK) {
        rq_free(e, q);
        return st;
    }
    pthread_mutex_lock(&e->mu);
    if (e->stopping) {
        st = qlr_errorf(QLR_ERR_CANCELLED, "the engine is stopping");
    } else if (e->n_queued >= e->p.max_queue) {
        e->st.requests_rejected++;
        st = qlr_errorf(QLR_ERR_BUSY, "the queue is full (%d requests waiting)", e->n_queued);
    } else {
        q->id = ++e->next_id;
        if (e->q_tail) e->q_tail->next = q;
        else e->q_head = q;
        e->q_tail = q;
        e->n_queued++;
        e->st.requests_total++;
        e->st.queued = e->n_queued;
        if (id) *id = q->id;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (st != QLR_OK) rq_free(e, q);
    return st;
}

void qlr_engine_cancel(qlr_engine *e, uint64_t id) {
    if (!e || id == 0) return;
    pthread_mutex_lock(&e->mu);
    rq *hit = NULL;
    for (rq *r = e->q_head; r && !hit; r = r->next)
        if (r->id == id) hit = r;
    for (int32_t i = 0; i < e->n_run && !hit; i++)
        if (e->run[i]->id == id) hit = e->run[i];
    if (hit && !hit->cancelled) {
        hit->cancelled = 1;
        e->cancel_pending = 1;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
}

/* ---- adapters (engine thread) ---- */

static ad_entry *ad_find(qlr_engine *e, qlr_adapter *a) {
    for (ad_entry *d = e->ads; d; d = d->next)
        if (d->a == a) return d;
    return NULL;
}

static void ad_drop(qlr_engine *e, ad_entry *d) {
    ad_entry **p = &e->ads;
    while (*p != d) p = &(*p)->next;
    *p = d->next;
    if (d->held) qlr_registry_release(e->reg, d->a);
    free(d);
}

/* Idle entries beyond IDLE_ADAPTERS_MAX go, least recently used first. */
static void ad_trim(qlr_engine *e) {
    for (;;) {
        int n = 0;
        ad_entry *old = NULL;
        for (ad_entry *d = e->ads; d; d = d->next)
            if (d->live == 0) {
                n++;
                if (!old || d->idle_since < old->idle_since) old = d;
            }
        if (n <= IDLE_ADAPTERS_MAX) return;
        ad_drop(e, old);
    }
}

/* Drops idle entries whose adapter was detached (its name no longer attached), so that the
 * registry can free it; then lets the registry free device copies released since. */
static void ad_check_idle(qlr_engine *e) {
    if (!e->reg) return;
    double now = qlr_now();
    if (now - e->last_idle_check < IDLE_CHECK_S) return;
    e->last_idle_check = now;
    int idle = 0;
    for (ad_entry *d = e->ads; d; d = d->next) idle += d->live == 0;
    if (idle) {
        qlr_adapter_info *list = NULL;
        size_t n = 0;
        if (qlr_registry_list(e->reg, &list, &n) == QLR_OK) {
            for (ad_entry *d = e->ads, *nx; d; d = nx) {
                nx = d->next;
                if (d->live) continue;
                const char *name = qlr_adapter_name(d->a);
                int found = 0;
                for (size_t i = 0; i < n && !found; i++) found = !strcmp(list[i].name, name);
                if (!found) ad_drop(e, d);
            }
            free(list);
        } else {
            qlr_error_clear();
        }
    }
    qlr_registry_collect(e->reg);
}

/* The request's adapter leaves the engine: unpinned, and its reference handed to the entry when
 * it was the last live request (kept for prefix keys), else released. */
static void ad_request_done(qlr_engine *e, rq *r) {
    if (!r->adapter) return;
    if (r->dev) qlr_registry_unpin(e->reg, r->adapter);
    r->dev = NULL;
    ad_entry *d = r->ad;
    if (d) {
        r->ad = NULL;
        if (--d->live == 0) {
            d->idle_since = qlr_now();
            if (!d->held) {
                d->held = 1; /* takes over the request's reference */
                r->adapter = NULL;
            }
        }
    }
    if (r->adapter) qlr_registry_release(e->reg, r->adapter);
    r->adapter = NULL;
    ad_trim(e);
}

static uint64_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* ---- events ---- */

static void emit_text(void *ud, const char *text, size_t len, const int32_t *ids, size_t n_ids) {
    rq *r = ud;
    qlr_engine_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = QLR_ENGINE_EV_TEXT;
    ev.text = text;
    ev.len = len;
    ev.ids = ids;
    ev.n_ids = n_ids;
    r->cb(r->ud, &ev);
}

/* Publishes the block counts (under mu). */
static void publish_kv(qlr_engine *e) {
    qlr_kvm_stats ks;
    qlr_kvm_get_stats(e->kvm, &ks);
    e->st.kv_blocks_total = ks.total;
    e->st.kv_blocks_used = ks.used;
    e->st.running = e->n_run;
    e->st.queued = e->n_queued;
}

/* Ends request r (already out of the queue; maybe in the running list): its blocks and adapter go
 * back, then its DONE event; r is freed. */
static void finish(qlr_engine *e, rq *r, qlr_finish why, const char *err) {
    qlr_kvm_release(e->kvm, &r->kv);
    ad_request_done(e, r);
    pthread_mutex_lock(&e->mu);
    for (int32_t i = 0; i < e->n_run; i++)
        if (e->run[i] == r) {
            memmove(e->run + i, e->run + i + 1, (size_t)(e->n_run - i - 1) * sizeof *e->run);
            e->n_run--;
            break;
        }
    if (why == QLR_FINISH_CANCELLED) e->st.requests_cancelled++;
    else e->st.requests_done++;
    publish_kv(e);
    pthread_mutex_unlock(&e->mu);
    qlr_engine_event ev;
    memset(&ev, 0, sizeof ev);
    ev.type = QLR_ENGINE_EV_DONE;
    ev.finish = why;
    ev.error = why == QLR_FINISH_ERROR ? (err && err[0] ? err : "unknown error") : NULL;
    ev.n_prompt = r->n_prompt;
    ev.n_generated = r->n_gen;
    ev.n_cached = r->n_cached;
    r->cb(r->ud, &ev);
    rq_free(e, r);
}

/* finish() with the current error message (copied: the callback may raise another). */
static void finish_error(qlr_engine *e, rq *r) {
    char msg[512];
    snprintf(msg, sizeof msg, "%s", qlr_error_msg());
    finish(e, r, QLR_FINISH_ERROR, msg);
}

/* ---- the scheduler (engine thread) ---- */

/* Cancellations and, when stopping without drain, everything. Returns 1 when the thread should
 * exit. */
static int collect_cancelled(qlr_engine *e) {
    rq *list = NULL, **tail = &list, *keep = NULL, **ktail = &keep, *last = NULL;
    pthread_mutex_lock(&e->mu);
    int all = e->stopping && !e->drain;
    for (rq *r = e->q_head, *nx; r; r = nx) {
        nx = r->next;
        r->next = NULL;
        if (all || r->cancelled) {
            *tail = r;
            tail = &r->next;
            e->n_queued--;
        } else {
            *ktail = r;
            ktail = &r->next;
            last = r;
        }
    }
    e->q_head = keep;
    e->q_tail = last;
    int32_t k = 0;
    for (int32_t i = 0; i < e->n_run; i++) {
        rq *r = e->run[i];
        if (all || r->cancelled) {
            r->next = NULL;
            *tail = r;
            tail = &r->next;
        } else {
            e->run[k++] = r;
        }
    }
    e->n_run = k;
    e->cancel_pending = 0;
    int exit_now = all || (e->stopping && e->n_queued == 0 && e->n_run == 0);
    pthread_mutex_unlock(&e->mu);
    for (rq *r = list, *nx; r; r = nx) {
        nx = r->next;
        finish(e, r, QLR_FINISH_CANCELLED, NULL);
    }
    return exit_now;
}

/* Adds `c` tokens of r (from its first position not in the cache) to the step's batch. */
static void add_tokens(qlr_engine *e, rq *r, int32_t c, int32_t *n, int32_t *nseq, int32_t *nl) {
    qlr_kvm_ensure(e->kvm, &r->kv, r->n_done + c);
    for (int32_t j = 0; j < c; j++) {
        e->b_tok[*n] = r->tok[r->n_done + j];
        e->b_pos[*n] = r->n_done + j;
        e->b_seq[*n] = *nseq;
        (*n)++;
    }
    r->chunk = c;
    e->b_req[(*nseq)++] = r;
    if (r->n_done + c == r->n_tok) { /* the last known token: its logits give the next one */
        e->b_rows[*nl] = *n - 1;
        e->l_req[(*nl)++] = r;
    }
}

/* Tries to start the request at the head of the queue: pins its adapter, reserves its blocks
 * (prefix hits included). 1 started, 0 it must wait (nothing changed but a pin it keeps), -1 it
 * ended with an error (try the next one). */
static int admit(qlr_engine *e, rq *r) {
    /* a file-tier adapter is read on the registry's loader threads, never on this one: the
     * running streams go on decoding meanwhile */
    if (r->adapter && !r->dev && !qlr_registry_prefetch(e->reg, r->adapter)) return 0;
    if (r->adapter && !r->dev) {
        const qlr_lora_dev *dev = NULL;
        qlr_status st = qlr_registry_pin(e->reg, r->adapter, &dev);
        if (st == QLR_ERR_NOMEM && e->n_run > 0) { /* device budget: wait for a request to end */
            qlr_error_clear();
            return 0;
        }
        if (st == QLR_OK && !dev) st = qlr_errorf(QLR_ERR_INTERNAL, "registry pin gave no device copy");
        if (st != QLR_OK) {
            qlr_error_prefix("adapter '%s'", qlr_adapter_name(r->adapter));
            goto fail;
        }
        r->dev = dev;
        ad_entry *d = ad_find(e, r->adapter);
        if (!d) {
            d = calloc(1, sizeof *d);
            if (!d) {
                qlr_errorf(QLR_ERR_NOMEM, "adapter entry");
                goto fail;
            }
            d->a = r->adapter;
            d->uid = ++e->next_uid;
            d->next = e->ads;
            e->ads = d;
        }
        d->live++;
        r->ad = d;
        r->key = qlr_kvm_mix(qlr_kvm_mix(KEY_BASE, d->uid), float_bits(r->scale));
    } else if (!r->adapter) {
        r->key = KEY_BASE;
    }
    int ok = 0;
    int32_t nc = 0;
    if (qlr_kvm_admit(e->kvm, &r->kv, r->key, r->tok, r->n_prompt, r->n_prompt + r->max_tokens - 1,
                      &ok, &nc) != QLR_OK)
        goto fail;
    if (!ok) return 0;
    r->n_cached = nc;
    r->n_done = nc;
    pthread_mutex_lock(&e->mu);
    QLR_ASSERT(e->q_head == r);
    e->q_head = r->next;
    if (!e->q_head) e->q_tail = NULL;
    r->next = NULL;
    e->n_queued--;
    e->run[e->n_run++] = r;
    e->st.prompt_tokens += (uint64_t)r->n_prompt;
    e->st.cached_tokens += (uint64_t)nc;
    e->st.prefix_hits += (uint64_t)(nc / e->p.kv_block);
    pthread_mutex_unlock(&e->mu);
    return 1;
fail:
    pthread_mutex_lock(&e->mu);
    QLR_ASSERT(e->q_head == r);
    e->q_head = r->next;
    if (!e->q_head) e->q_tail = NULL;
    r->next = NULL;
    e->n_queued--;
    pthread_mutex_unlock(&e->mu);
    finish_error(e, r);
    return -1;
}

/* A sampled token for r: stop ids and end of generation, max_tokens, the context end, text. */
static void take_token(qlr_engine *e, rq *r, int32_t id, uint64_t *n_generated) {
    int stop = !r->ignore_eos && qlr_tokenizer_is_eog(e->tok, id), stopped = 0;
    for (int32_t i = 0; i < r->n_stop_ids && !stop; i++) stop = id == r->stop_ids[i];
    if (!stop) {
        r->tok[r->n_tok++] = id;
        r->n_gen++;
        (*n_generated)++;
        if (qlr_etext_push(&r->text, id, emit_text, r, &stopped) != QLR_OK) {
            finish_error(e, r);
            return;
        }
    }
    int length = !stop && !stopped && (r->n_gen >= r->max_tokens || r->n_tok >= e->p.max_ctx);
    if (!stop && !stopped && !length) return;
    /* eos / a stop id / the length: what is held is sent; a stop string: nothing more */
    if (!stopped && qlr_etext_finish(&r->text, emit_text, r) != QLR_OK) {
        finish_error(e, r);
        return;
    }
    finish(e, r, length ? QLR_FINISH_LENGTH : QLR_FINISH_STOP, NULL);
}

/* One step: builds the batch, runs the forward and the sampler, hands out the tokens. Returns
 * the tokens of the step (0: nothing could run). */
static int32_t step(qlr_engine *e) {
    int32_t budget = e->p.max_batch_tokens, n = 0, nseq = 0, nl = 0;
    int32_t n_run = e->n_run; /* only this thread changes the running list */
    for (int32_t i = 0; i < n_run; i++) { /* decodes first */
        rq *r = e->run[i];
        r->chunk = 0;
        if (r->n_done >= r->n_prompt && budget > 0) {
            add_tokens(e, r, 1, &n, &nseq, &nl);
            budget--;
        }
    }
    for (int32_t i = 0; i < n_run && budget > 0; i++) { /* prompts being prefilled */
        rq *r = e->run[i];
        if (r->n_done >= r->n_prompt) continue;
        int32_t c = r->n_prompt - r->n_done < budget ? r->n_prompt - r->n_done : budget;
        add_tokens(e, r, c, &n, &nseq, &nl);
        budget -= c;
    }
    if (e->reg) { /* the next queued requests' adapters are read while this step runs */
        pthread_mutex_lock(&e->mu);
        int k = 0;
        for (rq *q = e->q_head; q && k < PREFETCH_AHEAD; q = q->next, k++)
            if (q->adapter && !q->dev && !q->cancelled) qlr_registry_prefetch(e->reg, q->adapter);
        pthread_mutex_unlock(&e->mu);
    }
    while (budget > 0 && e->n_run < e->p.max_running) { /* new requests */
        pthread_mutex_lock(&e->mu);
        rq *r = e->q_head && !e->q_head->cancelled ? e->q_head : NULL;
        pthread_mutex_unlock(&e->mu);
        if (!r) break;
        int a = admit(e, r);
        if (a == 0) break;
        if (a < 0) continue;
        int32_t c = r->n_prompt - r->n_done < budget ? r->n_prompt - r->n_done : budget;
        add_tokens(e, r, c, &n, &nseq, &nl);
        budget -= c;
    }
    if (n == 0) return 0;

    /* block tables: one row per request of the step */
    int32_t width = 1;
    for (int32_t s = 0; s < nseq; s++)
        if (e->b_req[s]->kv.n > width) width = e->b_req[s]->kv.n;
    for (int32_t s = 0; s < nseq; s++) {
        const qlr_kvm_seq *kv = &e->b_req[s]->kv;
        int32_t *row = e->btab + (int64_t)s * width;
        memcpy(row, kv->ids, (size_t)kv->n * sizeof *row);
        for (int32_t j = kv->n; j < width; j++) row[j] = -1;
    }
    /* adapter slots: each distinct (adapter, scale) of the step */
    const qlr_adapter_set *set = NULL;
    int32_t n_slots = 0, tokpos = 0;
    qlr_status st = QLR_OK;
    for (int32_t s = 0; s < nseq; s++) {
        rq *r = e->b_req[s];
        int32_t slot = -1;
        if (r->dev) {
            for (int32_t k = 0; k < n_slots && slot < 0; k++)
                if (e->sl_dev[k] == r->dev && float_bits(e->sl_scale[k]) == float_bits(r->scale))
                    slot = k;
            if (slot < 0) {
                slot = n_slots++;
                e->sl_dev[slot] = r->dev;
                e->sl_scale[slot] = r->scale;
                qlr_adapter_slots_put(e->slots, slot, r->dev, r->scale);
            }
        }
        for (int32_t j = 0; j < r->chunk; j++) e->b_aslot[tokpos++] = slot;
    }
    if (n_slots > 0) st = qlr_adapter_slots_commit(e->slots, n_slots, &set);

    float *logits = NULL;
    if (st == QLR_OK) {
        qlr_batch b = {n, e->b_tok, e->b_pos, e->b_seq, nl, e->b_rows, set, set ? e->b_aslot : NULL};
        qlr_block_table bt = {e->btab, nseq, width};
        st = qlr_model_forward_paged(e->f, e->kv, &b, &bt, &logits);
    }
    if (st == QLR_OK && nl > 0) {
        for (int32_t i = 0; i < nl; i++) {
            e->s_par[i] = e->l_req[i]->sp;
            e->s_rng[i] = e->l_req[i]->rng;
        }
        st = e->be->ops.sample(e->be, e->s_ids, logits, e->s_par, e->s_rng, nl, e->m->cfg.n_vocab);
    }
    if (st != QLR_OK) { /* a device or adapter error ends this step's requests, not the engine */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", qlr_error_msg());
        QLR_LOGW("engine: a step of %d tokens failed: %s", n, msg);
        for (int32_t s = 0; s < nseq; s++) finish(e, e->b_req[s], QLR_FINISH_ERROR, msg);
        return n;
    }
    for (int32_t s = 0; s < nseq; s++) {
        rq *r = e->b_req[s];
        r->n_done += r->chunk;
        qlr_kvm_register(e->kvm, &r->kv, r->key, r->tok, r->n_done, r->n_prompt);
    }
    uint64_t n_generated = 0;
    for (int32_t i = 0; i < nl; i++) {
        e->l_req[i]->rng = e->s_rng[i];
        take_token(e, e->l_req[i], e->s_ids[i], &n_generated);
    }
    pthread_mutex_lock(&e->mu);
    e->st.steps++;
    e->st.generated_tokens += n_generated;
    e->st.last_batch_tokens = n;
    e->st.last_batch_seqs = nseq;
    e->rate_t[e->rate_i] = qlr_now();
    e->rate_g[e->rate_i] = e->st.generated_tokens;
    e->rate_i = (e->rate_i + 1) % RATE_SAMPLES;
    if (e->rate_n < RATE_SAMPLES) e->rate_n++;
    publish_kv(e);
    pthread_mutex_unlock(&e->mu);
    return n;
}

static void *engine_main(void *arg) {
    qlr_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && !e->cancel_pending && e->n_run == 0 &&
               (e->n_queued == 0 || (e->q_head && e->q_head->cancelled))) {
            if (!e->reg) {
                pthread_cond_wait(&e->cv, &e->mu);
                continue;
            }
            struct timespec ts; /* wake up now and then for the idle adapter check */
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&e->cv, &e->mu, &ts);
            pthread_mutex_unlock(&e->mu);
            ad_check_idle(e);
            pthread_mutex_lock(&e->mu);
        }
        pthread_mutex_unlock(&e->mu);
        if (collect_cancelled(e)) break;
        ad_check_idle(e);
        if (step(e) == 0) { /* the queue's head waits for its adapter's file: not a busy wait */
            struct timespec ts = {0, 500000};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* ---- create / stop / free ---- */

qlr_status qlr_engine_create(qlr_model *m, const qlr_tokenizer *tok, qlr_registry *reg,
                             const qlr_engine_params *p, qlr_engine **out) {
    *out = NULL;
    const qlr_model_config *c = &m->cfg;
    qlr_engine_params P = p ? *p : qlr_engine_params_default();
    if (P.max_ctx == 0) P.max_ctx = c->ctx_train > 0 && c->ctx_train < 8192 ? c->ctx_train : 8192;
    if (P.max_batch_tokens < 1 || P.max_running < 1 || P.max_queue < 0 || P.max_ctx < 1 ||
        P.kv_block < 1)
        return qlr_errorf(QLR_ERR_INVALID, "engine: max_batch_tokens %d, max_running %d, "
                          "max_queue %d, max_ctx %d, kv_block %d (each must be >= 1, max_queue "
                          ">= 0)", P.max_batch_tokens, P.max_running, P.max_queue, P.max_ctx,
                          P.kv_block);
    if (P.max_running > P.max_batch_tokens)
        return qlr_errorf(QLR_ERR_INVALID, "engine: max_running (%d) must be <= max_batch_tokens "
                          "(%d): every running request decodes one token per step", P.max_running,
                          P.max_batch_tokens);
    if (!tok) return qlr_errorf(QLR_ERR_INVALID, "engine: no tokenizer");
    uint64_t per_block = 2ull * (uint64_t)c->n_layers * (uint64_t)P.kv_block *
                         (uint64_t)c->n_kv_heads * (uint64_t)c->head_dim *
                         qlr_backend_act_size(m->be);
    if (P.kv_bytes == 0) {
        int64_t seq = P.max_ctx < 2048 ? P.max_ctx : 2048;
        P.kv_bytes = (uint64_t)P.max_running * (uint64_t)((seq + P.kv_block - 1) / P.kv_block) *
                     per_block;
    }
    uint64_t nb = P.kv_bytes / per_block;
    if (nb < 1 || nb > INT32_MAX / (uint64_t)P.kv_block)
        return qlr_errorf(QLR_ERR_INVALID, "engine: kv_bytes %llu holds %llu blocks of %d tokens "
                          "(%llu bytes each)", (unsigned long long)P.kv_bytes,
                          (unsigned long long)nb, P.kv_block, (unsigned long long)per_block);
    int32_t width = (P.max_ctx + P.kv_block - 1) / P.kv_block;

    qlr_engine *e = calloc(1, sizeof *e);
    if (!e) return qlr_errorf(QLR_ERR_NOMEM, "engine");
    e->m = m;
    e->be = m->be;
    e->tok = tok;
    e->reg = reg;
    e->p = P;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    qlr_status st = qlr_kvm_create((int32_t)nb, P.kv_block, P.prefix_cache, &e->kvm);
    e->n_blocks = (int32_t)nb;
    if (st == QLR_OK) st = qlr_kv_paged_create(m, (int32_t)nb, P.kv_block, P.max_running, width, &e->kv);
    if (st == QLR_OK) st = qlr_forward_create(m, P.max_batch_tokens, P.max_running, &e->f);
    if (st == QLR_OK && reg) st = qlr_adapter_slots_create(m->be, c->n_layers, P.max_running, &e->slots);
    if (st == QLR_OK) {
        size_t T = (size_t)P.max_batch_tokens, R = (size_t)P.max_running;
        e->run = calloc(R, sizeof *e->run);
        e->b_tok = malloc(T * 4);
        e->b_pos = malloc(T * 4);
        e->b_seq = malloc(T * 4);
        e->b_aslot = malloc(T * 4);
        e->b_rows = malloc(R * 4);
        e->btab = malloc(R * (size_t)width * 4);
        e->b_req = calloc(R, sizeof *e->b_req);
        e->l_req = calloc(R, sizeof *e->l_req);
        e->s_par = calloc(R, sizeof *e->s_par);
        e->s_rng = calloc(R, sizeof *e->s_rng);
        e->s_ids = calloc(R, sizeof *e->s_ids);
        e->sl_dev = calloc(R, sizeof *e->sl_dev);
        e->sl_scale = calloc(R, sizeof *e->sl_scale);
        if (!e->run || !e->b_tok || !e->b_pos || !e->b_seq || !e->b_aslot || !e->b_rows ||
            !e->btab || !e->b_req || !e->l_req || !e->s_par || !e->s_rng || !e->s_ids ||
            !e->sl_dev || !e->sl_scale)
            st = qlr_errorf(QLR_ERR_NOMEM, "engine tables");
    }
    if (st == QLR_OK) {
        publish_kv(e);
        e->st.kv_block = P.kv_block;
        if (pthread_create(&e->th, NULL, engine_main, e) != 0)
            st = qlr_errorf(QLR_ERR_INTERNAL, "engine: cannot start its thread");
        else
            e->started = 1;
    }
    if (st != QLR_OK) {
        qlr_error_prefix("engine (%llu KV blocks of %d tokens, %.1f MiB)", (unsigned long long)nb,
                         P.kv_block, (double)(nb * per_block) / (1 << 20));
        qlr_engine_free(e);
        return st;
    }
    QLR_LOGI("engine: %llu KV blocks of %d tokens (%.1f MiB), up to %d requests of %d tokens, "
             "%d tokens per step, prefix cache %s", (unsigned long long)nb, P.kv_block,
             (double)(nb * per_block) / (1 << 20), P.max_running, P.max_ctx, P.max_batch_tokens,
             P.prefix_cache ? "on" : "off");
    *out = e;
    return QLR_OK;
}

void qlr_engine_stop(qlr_engine *e, int drain) {
    if (!e) return;
    pthread_mutex_lock(&e->mu);
    if (!e->stopping) e->drain = drain;
    else if (!drain) e->drain = 0;
    e->stopping = 1;
    int join = e->started && !e->join_claimed;
    e->join_claimed = 1;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (join) pthread_join(e->th, NULL);
}

void qlr_engine_free(qlr_engine *e) {
    if (!e) return;
    qlr_engine_stop(e, 0);
    while (e->ads) {
        ad_entry *d = e->ads;
        QLR_ASSERT(d->live == 0);
        ad_drop(e, d);
    }
    if (e->reg) qlr_registry_collect(e->reg);
    qlr_adapter_slots_free(e->slots);
    qlr_forward_free(e->f);
    qlr_kv_paged_free(e->kv);
    qlr_kvm_free(e->kvm);
    free(e->run);
    free(e->b_tok);
    free(e->b_pos);
    free(e->b_seq);
    free(e->b_aslot);
    free(e->b_rows);
    free(e->btab);
    free(e->b_req);
    free(e->l_req);
    free(e->s_par);
    free(e->s_rng);
    free(e->s_ids);
    free(e->sl_dev);
    free(e->sl_scale);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    free(e);
}

void qlr_engine_get_stats(qlr_engine *e, qlr_engine_stats *s) {
    pthread_mutex_lock(&e->mu);
    *s = e->st;
    s->running = e->n_run;
    s->queued = e->n_queued;
    double now = qlr_now(), t0 = 0;
    uint64_t g0 = 0;
    int have = 0;
    for (int k = 0; k < e->rate_n; k++) { /* the oldest sample inside the window */
        int i = (e->rate_i - e->rate_n + k + RATE_SAMPLES) % RATE_SAMPLES;
        if (now - e->rate_t[i] <= RATE_WINDOW_S) {
            t0 = e->rate_t[i];
            g0 = e->rate_g[i];
            have = 1;
            break;
        }
    }
    s->tokens_per_s = have && now > t0 ? (double)(e->st.generated_tokens - g0) / (now - t0) : 0.0;
    pthread_mutex_unlock(&e->mu);
}
