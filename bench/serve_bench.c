/* bench/serve_bench.c: see serve_bench.h. Every figure is the engine's own (qlr_engine_submit,
 * its callback): a stream is one request of `prompt` random tokens generating `tokens` tokens
 * with ignore_eos; each generated token is timestamped on arrival (host wall clock, the engine
 * thread's callback). Decode tokens/s is counted over the window in which every stream decodes
 * (from the last stream's first token to the first stream's end), so prefill and admission stay
 * out of it. A stall is the longest gap between two tokens of one running stream. The tokenizer
 * is synthetic (an SPM vocabulary of the model's size: "<unk>", "<s>", "</s>", 256 byte tokens,
 * then "▁wN"), since the engine detokenises every token. It measures; it changes nothing in the
 * engine, the registry or the kernels. */
#include "bench/serve_bench.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapters/lora.h"
#include "adapters/registry.h"
#include "backend/backend.h"
#include "bench/bench_common.h"
#include "core/core.h"
#include "data/tokenizer.h"
#include "infer/engine.h"
#include "model/model.h"
#ifdef QLR_BACKEND_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

qlr_bench_serve_opts qlr_bench_serve_default_opts(void) {
    qlr_bench_serve_opts o;
    memset(&o, 0, sizeof o);
    o.shape = "llama3.1-8b";
    o.device = "cuda";
    o.streams = 64;
    o.tokens = 128;
    o.prompt = 64;
    o.rank = 16;
    o.registered = 2000;
    o.files = 32;
    o.requests = 256;
    o.device_budget_gib = 24;
    o.host_budget_gib = 16;
    o.scenarios = "all";
    return o;
}

/* ---- one request's record (written by the engine thread, read after DONE) ---- */

typedef struct sreq {
    double t_submit, t_first, t_done;
    double *tt;             /* [max_tokens] arrival time of each generated token */
    int32_t n_tt, cap;
    int done;
    qlr_finish finish;
    char error[256];
    struct sctx *owner;
} sreq;

typedef struct sctx {
    const qlr_bench_serve_opts *o;
    qlr_backend *be;
    qlr_model *m;
    qlr_tokenizer *tok;
    qlr_registry *reg;
    qlr_engine *eng;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int n_done;             /* DONE events since the last reset */
    uint64_t seed;
    char tmp[4096];         /* the adapter files' folder ("" when none was made) */
    char err[512];          /* the first failed request's message */
} sctx;

static void on_event(void *ud, const qlr_engine_event *ev) {
    sreq *q = ud;
    double t = qlr_now();
    if (ev->type == QLR_ENGINE_EV_TEXT) {
        for (size_t i = 0; i < ev->n_ids && q->n_tt < q->cap; i++) q->tt[q->n_tt++] = t;
        if (q->n_tt > 0 && q->t_first == 0) q->t_first = q->tt[0];
        return;
    }
    sctx *c = q->owner;
    pthread_mutex_lock(&c->mu);
    q->t_done = t;
    q->finish = ev->finish;
    if (ev->finish == QLR_FINISH_ERROR) snprintf(q->error, sizeof q->error, "%s", ev->error ? ev->error : "?");
    q->done = 1;
    c->n_done++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

static uint64_t xorshift(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Submits one request of `prompt` random tokens (distinct per seed: no prefix sharing) with the
 * adapter `name` (NULL = base). q is reset first. */
static qlr_status submit(sctx *c, sreq *q, const char *name, int32_t tokens, uint64_t seed) {
    const qlr_bench_serve_opts *o = c->o;
    int32_t *ids = malloc((size_t)o->prompt * 4);
    if (!ids) return qlr_errorf(QLR_ERR_NOMEM, "bench serve: prompt");
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    for (int i = 0; i < o->prompt; i++) ids[i] = 3 + 256 + (int32_t)(xorshift(&s) % (uint64_t)(c->m->cfg.n_vocab - 259));
    double *tt = q->tt;
    int32_t cap = q->cap;
    if (!tt || cap < tokens) {
        free(tt);
        tt = malloc((size_t)tokens * sizeof *tt);
        cap = tokens;
    }
    memset(q, 0, sizeof *q);
    q->tt = tt;
    q->cap = cap;
    q->owner = c;
    qlr_adapter *a = NULL;
    qlr_status st = tt ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "bench serve: token times");
    if (st == QLR_OK && name) st = qlr_registry_acquire(c->reg, name, &a);
    qlr_engine_request r;
    memset(&r, 0, sizeof r);
    r.prompt = ids;
    r.n_prompt = o->prompt;
    r.max_tokens = tokens;
    r.sampling = qlr_sampling_default();
    r.sampling.temperature = 0;
    r.seed = seed;
    r.adapter = a;
    r.adapter_scale = 1.0f;
    r.ignore_eos = 1;
    q->t_submit = qlr_now();
    if (st == QLR_OK) st = qlr_engine_submit(c->eng, &r, on_event, q, NULL);
    free(ids);
    return st;
}

static void wait_done(sctx *c, int n) {
    pthread_mutex_lock(&c->mu);
    while (c->n_done < n) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

static void reset_done(sctx *c) {
    pthread_mutex_lock(&c->mu);
    c->n_done = 0;
    pthread_mutex_unlock(&c->mu);
}

/* The first failed request of q[0..n) becomes an error. */
static qlr_status check_finished(sctx *c, const sreq *q, int n, const char *what) {
    for (int i = 0; i < n; i++)
        if (q[i].finish == QLR_FINISH_ERROR || q[i].finish == QLR_FINISH_CANCELLED)
            return qlr_errorf(QLR_ERR_INTERNAL, "bench serve: %s: request %d ended %s: %s", what, i,
                              q[i].finish == QLR_FINISH_ERROR ? "with an error" : "cancelled", q[i].error);
    (void)c;
    return QLR_OK;
}

/* ---- figures of a set of streams ---- */

typedef struct sfig {
    double tok_s;           /* decode tokens/s, all streams decoding */
    double window_s;
    double step_ms_median;  /* median gap between tokens of one stream in the window */
    double gap_ms_max;      /* longest gap between tokens of one stream in the window */
    double ttft_ms_max;
    int64_t tokens;
} sfig;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Quantile p of v[0..n) (sorted in place); 0 when n == 0. */
static double quantile(double *v, int64_t n, double p) {
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    int64_t i = (int64_t)ceil(p * (double)n) - 1;
    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

static void figures(const sreq *q, int n, sfig *f) {
    memset(f, 0, sizeof *f);
    double t0 = 0, t1 = 1e300;
    for (int i = 0; i < n; i++) {
        if (q[i].n_tt > 0 && q[i].tt[0] > t0) t0 = q[i].tt[0];
        if (q[i].n_tt > 0 && q[i].tt[q[i].n_tt - 1] < t1) t1 = q[i].tt[q[i].n_tt - 1];
        double ttft = (q[i].t_first - q[i].t_submit) * 1e3;
        if (ttft > f->ttft_ms_max) f->ttft_ms_max = ttft;
    }
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += q[i].n_tt;
    double *gaps = malloc((size_t)(total > 0 ? total : 1) * sizeof *gaps);
    int64_t ng = 0;
    for (int i = 0; i < n; i++)
        for (int32_t k = 0; k < q[i].n_tt; k++) {
            double t = q[i].tt[k];
            if (t > t0 && t <= t1) {
                f->tokens++;
                if (gaps && k > 0) {
                    double g = (t - q[i].tt[k - 1]) * 1e3;
                    gaps[ng++] = g;
                    if (g > f->gap_ms_max) f->gap_ms_max = g;
                }
            }
        }
    f->window_s = t1 > t0 ? t1 - t0 : 0;
    f->tok_s = f->window_s > 0 ? (double)f->tokens / f->window_s : 0;
    if (gaps) f->step_ms_median = quantile(gaps, ng, 0.5);
    free(gaps);
}

/* n streams, stream i with adapter names[i] (names NULL: the base), `tokens` each; waits for all.
 */
static qlr_status run_streams(sctx *c, sreq *q, int n, const char *const *names, int32_t tokens,
                              const char *what, sfig *f) {
    reset_done(c);
    for (int i = 0; i < n; i++) {
        qlr_status st = submit(c, &q[i], names ? names[i] : NULL, tokens, ++c->seed);
        if (st != QLR_OK) {
            wait_done(c, i);
            return qlr_error_prefix("bench serve: %s: submitting stream %d", what, i);
        }
    }
    wait_done(c, n);
    QLR_TRY(check_finished(c, q, n, what));
    figures(q, n, f);
    fprintf(stderr, "[bench serve] %-28s %9.1f tokens/s (%lld tokens in %.2f s; step %.2f ms)\n",
            what, f->tok_s, (long long)f->tokens, f->window_s, f->step_ms_median);
    return QLR_OK;
}

/* ---- random adapters ---- */

typedef struct fill_ctx {
    float *v;
    uint64_t seed;
} fill_ctx;

static void fill_run(void *p, int64_t b, int64_t e, int tid) {
    (void)tid;
    fill_ctx *c = p;
    uint64_t s = (c->seed ^ (uint64_t)b * 0xbf58476d1ce4e5b9ull) | 1;
    for (int64_t i = b; i < e; i++) {
        /* uniform in [-0.02, 0.02): B is not zero, so every adapter changes the outputs */
        c->v[i] = ((float)(xorshift(&s) >> 40) / 16777216.0f - 0.5f) * 0.04f;
    }
}

static qlr_status make_adapter(const qlr_model_config *cfg, int32_t r, uint64_t seed, qlr_lora **out) {
    qlr_lora_base base;
    qlr_lora_base_from_config(cfg, &base);
    qlr_lora_params p = qlr_lora_params_default();
    p.r = r;
    p.alpha = 2.0 * r;
    p.targets = QLR_LORA_TARGETS_ALL;
    p.seed = seed;
    QLR_TRY(qlr_lora_create(&base, &p, out));
    fill_ctx fc = {(*out)->block, seed * 0x2545f4914f6cdd1dull + 7};
    qlr_parallel_for((int64_t)(*out)->n_params, 1 << 20, fill_run, &fc);
    return QLR_OK;
}

/* Attaches n in-memory adapters "<prefix>N" of ranks ranks[i % n_ranks]. */
static qlr_status attach_random(sctx *c, const char *prefix, int n, const int32_t *ranks, int n_ranks,
                                char (*names)[32]) {
    for (int i = 0; i < n; i++) {
        qlr_lora *l = NULL;
        snprintf(names[i], 32, "%s%d", prefix, i);
        QLR_TRY(make_adapter(&c->m->cfg, ranks[i % n_ranks], ++c->seed, &l));
        QLR_TRY(qlr_registry_attach(c->reg, names[i], l));
    }
    return QLR_OK;
}

static void detach_all(sctx *c, char (*names)[32], int n) {
    for (int i = 0; i < n; i++) qlr_registry_detach(c->reg, names[i]);
}

/* ---- the synthetic tokenizer ---- */

static qlr_status make_tokenizer(int32_t n_vocab, qlr_tokenizer **out) {
    qlr_str *toks = calloc((size_t)n_vocab, sizeof *toks);
    int32_t *types = calloc((size_t)n_vocab, sizeof *types);
    char *text = malloc((size_t)n_vocab * 16);
    qlr_status st = toks && types && text ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "bench serve: tokenizer");
    for (int32_t i = 0; i < n_vocab && st == QLR_OK; i++) {
        char *t = text + (size_t)i * 16;
        if (i == 0) snprintf(t, 16, "<unk>");
        else if (i == 1) snprintf(t, 16, "<s>");
        else if (i == 2) snprintf(t, 16, "</s>");
        else if (i < 259) snprintf(t, 16, "<0x%02X>", i - 3);
        else snprintf(t, 16, "\xe2\x96\x81w%d", i);
        toks[i] = (qlr_str){t, strlen(t)};
        types[i] = i == 0 ? QLR_TOKTYPE_UNKNOWN : i < 3 ? QLR_TOKTYPE_CONTROL : i < 259 ? QLR_TOKTYPE_BYTE : QLR_TOKTYPE_NORMAL;
    }
    if (st == QLR_OK) {
        qlr_tokenizer_spec sp = qlr_tokenizer_spec_default();
        sp.kind = QLR_TOK_SPM;
        sp.n_vocab = n_vocab;
        sp.tokens = toks;
        sp.token_types = types;
        sp.unk = 0;
        sp.bos = 1;
        sp.eos = 2;
        sp.eot = 2;
        sp.name = "bench-serve";
        st = qlr_tokenizer_create(&sp, out);
    }
    free(toks);
    free(types);
    free(text);
    return st;
}

/* ---- scenarios ---- */

static int wants(const qlr_bench_serve_opts *o, const char *name) {
    if (!strcmp(o->scenarios, "all")) return 1;
    size_t n = strlen(name);
    for (const char *p = o->scenarios; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && !strncmp(p, name, n)) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

static qlr_status check_scenarios(const char *s) {
    static const char *known[] = {"all", "base", "a8", "distinct", "mixed", "attach", "many"};
    for (const char *p = s; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        int ok = 0;
        for (size_t k = 0; k < sizeof known / sizeof *known; k++)
            ok |= strlen(known[k]) == len && !strncmp(p, known[k], len);
        if (!ok)
            return qlr_errorf(QLR_ERR_INVALID, "bench serve: unknown scenario '%.*s' (known: base, "
                              "a8, distinct, mixed, attach, many, all)", (int)len, p);
        if (!e) break;
        p = e + 1;
    }
    return QLR_OK;
}

/* The attach scenario: n streams over the first min(8, n) adapters of names run; once every
 * stream decodes, an adapter is attached from its file and one request with it is submitted.
 * attach_ms = attach call start -> that request's first token. The stall is the longest gap
 * between two tokens of any running stream from the attach start to that first token. */
static qlr_status scenario_attach(sctx *c, sreq *q, int n, char (*names)[32], const char *path,
                                  FILE *js) {
    const qlr_bench_serve_opts *o = c->o;
    int32_t tokens = o->tokens * 4; /* the streams must outlive the attach */
    const char **nm = malloc((size_t)n * sizeof *nm);
    if (!nm) return qlr_errorf(QLR_ERR_NOMEM, "bench serve: names");
    int na = n < 8 ? n : 8;
    for (int i = 0; i < n; i++) nm[i] = names[i % na];
    reset_done(c);
    qlr_status st = QLR_OK;
    int submitted = 0;
    for (; submitted < n && st == QLR_OK; submitted++)
        st = submit(c, &q[submitted], nm[submitted], tokens, ++c->seed);
    free(nm);
    if (st != QLR_OK) {
        wait_done(c, submitted - 1);
        return qlr_error_prefix("bench serve: attach: submitting the streams");
    }
    /* every stream decoding, a few steps in */
    for (;;) {
        int ready = 1;
        for (int i = 0; i < n; i++) ready &= q[i].n_tt >= 4 || q[i].done;
        if (ready) break;
        usleep(1000);
    }
    sreq *nq = &q[n];
    double t0 = qlr_now();
    st = qlr_registry_attach_file(c->reg, "attached", path, 0);
    double t_loaded = qlr_now();
    if (st == QLR_OK) st = submit(c, nq, "attached", 4, ++c->seed);
    if (st != QLR_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", qlr_error_msg());
        wait_done(c, n);
        return qlr_errorf(QLR_ERR_INTERNAL, "bench serve: attach: %s", msg);
    }
    wait_done(c, n + 1);
    QLR_TRY(check_finished(c, q, n + 1, "attach"));
    double t_first = nq->t_first;
    double gap = 0, base_gap = 0;
    int covered = 1;
    double *gaps = malloc((size_t)n * (size_t)tokens * sizeof *gaps);
    int64_t ng = 0;
    for (int i = 0; i < n; i++) {
        if (q[i].n_tt == 0 || q[i].tt[q[i].n_tt - 1] < t_first) covered = 0;
        for (int32_t k = 1; k < q[i].n_tt; k++) {
            double a = q[i].tt[k - 1], b = q[i].tt[k];
            if (b > t0 && a < t_first + 1e-9 && b - a > gap) gap = b - a; /* overlaps the attach */
            if (b <= t0 && gaps) gaps[ng++] = (b - a) * 1e3;                /* before it */
        }
    }
    if (gaps) base_gap = quantile(gaps, ng, 0.5);
    free(gaps);
    qlr_registry_detach(c->reg, "attached");
    fprintf(stderr, "[bench serve] attach                       %9.1f ms (file %.1f ms), longest "
            "stall %.1f ms (step %.2f ms)\n", (t_first - t0) * 1e3, (t_loaded - t0) * 1e3, gap * 1e3,
            base_gap);
    fprintf(js, ",\n  \"attach\": {\"adapter_rank\": %d, \"attach_ms\": %.2f, \"file_load_ms\": %.2f, "
            "\"first_token_after_submit_ms\": %.2f, \"max_stall_ms\": %.2f, \"step_ms_before\": %.3f, "
            "\"max_stall_over_step_ms\": %.2f, "
            "\"streams\": %d, \"streams_outlived_attach\": %s, \"note\": \"attach_ms = "
            "qlr_registry_attach_file start to the first token of a request with the adapter; "
            "max_stall_ms = the longest gap between two tokens of any running stream overlapping "
            "that interval\"}",
            o->rank, (t_first - t0) * 1e3, (t_loaded - t0) * 1e3, (t_first - nq->t_submit) * 1e3,
            gap * 1e3, base_gap, gap * 1e3 - base_gap, n, covered ? "true" : "false");
    return QLR_OK;
}

typedef struct reg_ctx {
    sctx *c;
    char (*paths)[4200];
    int files, total;
    int next;
    pthread_mutex_t mu;
    qlr_status st;
    char err[512];
} reg_ctx;

static void *reg_worker(void *p) {
    reg_ctx *r = p;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        int i = r->st == QLR_OK && r->next < r->total ? r->next++ : -1;
        pthread_mutex_unlock(&r->mu);
        if (i < 0) return NULL;
        char name[32];
        snprintf(name, sizeof name, "many%d", i);
        qlr_status st = qlr_registry_attach_file(r->c->reg, name, r->paths[i % r->files], 1);
        if (st != QLR_OK) {
            pthread_mutex_lock(&r->mu);
            if (r->st == QLR_OK) {
                r->st = st;
                snprintf(r->err, sizeof r->err, "%s", qlr_error_msg());
            }
            pthread_mutex_unlock(&r->mu);
        }
    }
}

/* The many-adapter scenario: o->registered names over o->files files (file tier: each name is
 * loaded from its file on first use, as its own adapter); o->streams clients each send a request
 * with a random name as soon as their previous one ends, o->requests in all. */
static qlr_status scenario_many(sctx *c, char (*paths)[4200], FILE *js) {
    const qlr_bench_serve_opts *o = c->o;
    reg_ctx rc;
    memset(&rc, 0, sizeof rc);
    rc.c = c;
    rc.paths = paths;
    rc.files = o->files;
    rc.total = o->registered;
    pthread_mutex_init(&rc.mu, NULL);
    int nth = qlr_n_threads();
    if (nth > 16) nth = 16;
    pthread_t th[16];
    double t0 = qlr_now();
    int started = 0;
    for (; started < nth; started++)
        if (pthread_create(&th[started], NULL, reg_worker, &rc) != 0) break;
    if (started == 0) reg_worker(&rc);
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    double t_reg = qlr_now() - t0;
    pthread_mutex_destroy(&rc.mu);
    if (rc.st != QLR_OK) return qlr_errorf(rc.st, "bench serve: registering adapters: %s", rc.err);
    fprintf(stderr, "[bench serve] registered %d adapters over %d files in %.1f s\n", o->registered,
            o->files, t_reg);
    qlr_registry_stats rs0;
    qlr_registry_get_stats(c->reg, &rs0);

    int nc = o->streams < o->requests ? o->streams : o->requests;
    sreq *q = calloc((size_t)o->requests, sizeof *q);
    int *slot_req = malloc((size_t)nc * sizeof *slot_req);
    if (!q || !slot_req) {
        free(q);
        free(slot_req);
        return qlr_errorf(QLR_ERR_NOMEM, "bench serve: requests");
    }
    uint64_t pick = 0x5eedull + (uint64_t)o->registered;
    reset_done(c);
    qlr_status st = QLR_OK;
    int sent = 0;
    double t_start = qlr_now();
    char name[32];
    for (; sent < nc && st == QLR_OK; sent++) {
        slot_req[sent] = sent;
        snprintf(name, sizeof name, "many%d", (int)(xorshift(&pick) % (uint64_t)o->registered));
        st = submit(c, &q[sent], name, o->tokens, ++c->seed);
    }
    /* closed loop: a finished client sends its next request */
    while (st == QLR_OK && sent < o->requests) {
        pthread_mutex_lock(&c->mu);
        int free_slot = -1;
        while (free_slot < 0) {
            for (int k = 0; k < nc && free_slot < 0; k++)
                if (slot_req[k] >= 0 && q[slot_req[k]].done) free_slot = k;
            if (free_slot < 0) pthread_cond_wait(&c->cv, &c->mu);
        }
        pthread_mutex_unlock(&c->mu);
        slot_req[free_slot] = sent;
        snprintf(name, sizeof name, "many%d", (int)(xorshift(&pick) % (uint64_t)o->registered));
        st = submit(c, &q[sent], name, o->tokens, ++c->seed);
        sent++;
    }
    if (st != QLR_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", qlr_error_msg());
        wait_done(c, sent - 1);
        for (int i = 0; i < o->requests; i++) free(q[i].tt);
        free(q);
        free(slot_req);
        return qlr_errorf(QLR_ERR_INTERNAL, "bench serve: many: submitting: %s", msg);
    }
    wait_done(c, o->requests);
    double wall = qlr_now() - t_start;
    st = check_finished(c, q, o->requests, "many adapters");
    double *ttft = malloc((size_t)o->requests * sizeof *ttft);
    int64_t gen = 0;
    double gap = 0;
    for (int i = 0; i < o->requests; i++) {
        if (ttft) ttft[i] = (q[i].t_first - q[i].t_submit) * 1e3;
        gen += q[i].n_tt;
        for (int32_t k = 1; k < q[i].n_tt; k++)
            if (q[i].tt[k] - q[i].tt[k - 1] > gap) gap = q[i].tt[k] - q[i].tt[k - 1];
    }
    double p50 = ttft ? quantile(ttft, o->requests, 0.5) : 0;
    double p99 = ttft ? quantile(ttft, o->requests, 0.99) : 0;
    double mx = ttft ? ttft[o->requests - 1] : 0;
    free(ttft);
    qlr_registry_stats rs;
    qlr_registry_get_stats(c->reg, &rs);
    fprintf(stderr, "[bench serve] many adapters                %9.1f tokens/s, TTFT p50 %.1f ms p99 "
            "%.1f ms, %llu loads, %llu evictions\n", (double)gen / wall, p50, p99,
            (unsigned long long)(rs.loads - rs0.loads), (unsigned long long)rs.evictions);
    if (st == QLR_OK)
        fprintf(js, ",\n  \"many_adapters\": {\"registered\": %d, \"files\": %d, \"rank\": %d, "
                "\"requests\": %d, \"concurrency\": %d, \"register_s\": %.2f, \"tokens_per_s\": %.1f, "
                "\"ttft_ms_p50\": %.2f, \"ttft_ms_p99\": %.2f, \"ttft_ms_max\": %.2f, "
                "\"max_token_gap_ms\": %.2f, \"file_loads\": %llu, \"device_evictions\": %llu, "
                "\"note\": \"the registered names share %d adapter files (disk space); each name is "
                "attached with lazy=1 (file tier) and loaded from its file on first use as its own "
                "adapter, with its own host and device copies; closed loop: each client sends its "
                "next request when the previous one ends; TTFT from submit\"}",
                o->registered, o->files, o->rank, o->requests, nc, t_reg, (double)gen / wall, p50,
                p99, mx, gap * 1e3, (unsigned long long)(rs.loads - rs0.loads),
                (unsigned long long)rs.evictions, o->files);
    for (int i = 0; i < o->requests; i++) free(q[i].tt);
    free(q);
    free(slot_req);
    for (int i = 0; i < o->registered; i++) {
        snprintf(name, sizeof name, "many%d", i);
        qlr_registry_detach(c->reg, name);
    }
    return st;
}

/* Writes o->files random adapter files (and the attach scenario's) into a fresh folder. */
static qlr_status write_files(sctx *c, int n, char (*paths)[4200]) {
    const char *base = c->o->tmp_dir ? c->o->tmp_dir : getenv("TMPDIR");
    snprintf(c->tmp, sizeof c->tmp, "%s/qlr-bench-serve-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(c->tmp)) {
        qlr_status st = qlr_errorf(QLR_ERR_IO, "bench serve: cannot make a folder %s", c->tmp);
        c->tmp[0] = 0;
        return st;
    }
    for (int i = 0; i < n; i++) {
        qlr_lora *l = NULL;
        snprintf(paths[i], sizeof paths[i], "%s/adapter%d.gguf", c->tmp, i);
        QLR_TRY(make_adapter(&c->m->cfg, c->o->rank, ++c->seed, &l));
        qlr_status st = qlr_lora_save_gguf(l, paths[i]);
        qlr_lora_free(l);
        QLR_TRY(st);
    }
    return QLR_OK;
}

static void remove_files(sctx *c, int n, char (*paths)[4200]) {
    if (!c->tmp[0]) return;
    for (int i = 0; i < n; i++) unlink(paths[i]);
    rmdir(c->tmp);
}

static void json_scenario(FILE *js, const char *key, const sfig *f, const sfig *base,
                          const char *extra) {
    fprintf(js, ",\n  \"%s\": {\"tokens_per_s\": %.1f, \"ratio_to_base\": %.4f, \"step_ms\": %.3f, "
            "\"max_token_gap_ms\": %.2f, \"ttft_ms_max\": %.1f, \"window_s\": %.3f%s%s}",
            key, f->tok_s, base && base->tok_s > 0 ? f->tok_s / base->tok_s : 0, f->step_ms_median,
            f->gap_ms_max, f->ttft_ms_max, f->window_s, extra ? ", " : "", extra ? extra : "");
}

/* Bytes one decode step reads at best: NF4 weights (+ lm_head) and, with adapters, each distinct
 * adapter's bf16 A and B once. For the bandwidth ceiling the lead compares against. */
static double adapter_bytes(const qlr_model_config *cfg, int32_t r) {
    qlr_lora_base b;
    qlr_lora_base_from_config(cfg, &b);
    double sum = 0;
    for (int i = 0; i < QLR_LIN_COUNT; i++) {
        int32_t out = 0, in = 0;
        qlr_lora_base_shape(&b, (qlr_linear_id)i, &out, &in);
        sum += (double)r * (in + out);
    }
    return sum * cfg->n_layers * 2.0;
}

qlr_status qlr_bench_serve(const qlr_bench_serve_opts *o, FILE *json) {
    qlr_model_config cfg;
    if (!o->shape) return qlr_errorf(QLR_ERR_INVALID, "bench serve: a shape is required");
    if (qlr_bench_model_config(o->shape, &cfg, NULL) != QLR_OK) {
        qlr_error_prefix("bench serve");
        return QLR_ERR_INVALID;
    }
    if (o->layers < 0 || o->streams < 1 || o->tokens < 2 || o->prompt < 1 || o->rank < 1 ||
        o->registered < 1 || o->files < 1 || o->requests < 1 || o->files > 4096)
        return qlr_errorf(QLR_ERR_INVALID, "bench serve: --layers >= 0, --streams, --prompt, --rank, "
                          "--registered, --requests >= 1, --tokens >= 2, --files 1..4096");
    QLR_TRY(check_scenarios(o->scenarios));
    if (o->layers > 0 && o->layers < cfg.n_layers) cfg.n_layers = o->layers;
    sctx c;
    memset(&c, 0, sizeof c);
    c.o = o;
    pthread_mutex_init(&c.mu, NULL);
    pthread_cond_init(&c.cv, NULL);
    int n = o->streams;
    sreq *q = calloc((size_t)n + 1, sizeof *q);
    char (*names)[32] = calloc((size_t)n, sizeof *names);
    int n_paths = o->files + 1;
    char (*paths)[4200] = calloc((size_t)n_paths, sizeof *paths);
    qlr_status st = q && names && paths ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "bench serve");
    double t_setup = qlr_now();
    if (st == QLR_OK) st = qlr_backend_create(o->device, 0, &c.be);
    char dev[256];
    snprintf(dev, sizeof dev, "%s", c.be ? c.be->name : o->device);
#ifdef QLR_BACKEND_CUDA
    if (c.be && c.be->kind == QLR_DEVICE_CUDA) snprintf(dev, sizeof dev, "%s", qlr_cuda_device_name(c.be));
#endif
    if (st == QLR_OK) {
        qlr_model_random_params rp = qlr_model_random_params_default();
        rp.lm_head_nf4 = !cfg.tied_embeddings && c.be->kind == QLR_DEVICE_CUDA;
        fprintf(stderr, "[bench serve] %s: random NF4 %s (%d layers) on %s\n", o->shape, cfg.arch,
                cfg.n_layers, dev);
        st = qlr_model_create_random(&cfg, c.be, 1, &rp, &c.m);
    }
    if (st == QLR_OK) st = make_tokenizer(cfg.n_vocab, &c.tok);
    if (st == QLR_OK) {
        qlr_registry_params rp = qlr_registry_params_default();
        rp.device_budget = (uint64_t)(o->device_budget_gib * (double)(1ull << 30));
        rp.host_budget = (uint64_t)(o->host_budget_gib * (double)(1ull << 30));
        st = qlr_registry_create(c.be, &c.m->cfg, &rp, &c.reg);
    }
    int need_files = wants(o, "attach") || wants(o, "many");
    if (st == QLR_OK) {
        qlr_engine_params ep = qlr_engine_params_default();
        ep.max_running = n + 1; /* the attach scenario's request runs beside n streams */
        if (ep.max_batch_tokens < n + 1) ep.max_batch_tokens = n + 1;
        ep.max_ctx = o->prompt + o->tokens * 4 + 8;
        ep.prefix_cache = 0; /* every prompt is distinct anyway */
        st = qlr_engine_create(c.m, c.tok, c.reg, &ep, &c.eng);
    }
    if (st == QLR_OK && need_files) st = write_files(&c, n_paths, paths);
    sfig base, f;
    memset(&base, 0, sizeof base);
    if (st == QLR_OK) { /* warm-up: workspaces, plans, the device's clocks */
        fprintf(stderr, "[bench serve] setup %.1f s; warming up\n", qlr_now() - t_setup);
        st = run_streams(&c, q, n, NULL, 4, "warm-up", &f);
    }
    if (st == QLR_OK) {
        fprintf(json, "{\n  \"benchmark\": \"serve\",\n  \"device\": \"%s\",\n  \"shape\": \"%s\",\n"
                "  \"layers\": %d,\n  \"streams\": %d,\n  \"prompt_tokens\": %d,\n"
                "  \"generated_tokens\": %d,\n  \"adapter_rank\": %d,\n"
                "  \"adapter_bytes_bf16\": %.0f,\n  \"targets\": \"all 7 linears\"",
                dev, o->shape, cfg.n_layers, n, o->prompt, o->tokens, o->rank,
                adapter_bytes(&cfg, o->rank));
    }
    if (st == QLR_OK && wants(o, "base")) {
        st = run_streams(&c, q, n, NULL, o->tokens, "base only", &base);
        if (st == QLR_OK) json_scenario(json, "base", &base, &base, NULL);
    }
    const char **nm = calloc((size_t)n, sizeof *nm);
    if (st == QLR_OK && !nm) st = qlr_errorf(QLR_ERR_NOMEM, "bench serve: names");
    int32_t r1[1] = {o->rank};
    int have_r = 0;
    if (st == QLR_OK && (wants(o, "a8") || wants(o, "distinct") || wants(o, "attach"))) {
        st = attach_random(&c, "r", n, r1, 1, names);
        have_r = st == QLR_OK;
    }
    if (st == QLR_OK && wants(o, "a8")) {
        int na = n < 8 ? n : 8;
        for (int i = 0; i < n; i++) nm[i] = names[i % na];
        char extra[64];
        snprintf(extra, sizeof extra, "\"adapters\": %d", na);
        st = run_streams(&c, q, n, nm, o->tokens, "8 adapters", &f);
        if (st == QLR_OK) json_scenario(json, "adapters_8", &f, &base, extra);
    }
    if (st == QLR_OK && wants(o, "distinct")) {
        for (int i = 0; i < n; i++) nm[i] = names[i];
        char extra[64];
        snprintf(extra, sizeof extra, "\"adapters\": %d", n);
        st = run_streams(&c, q, n, nm, o->tokens, "distinct adapters", &f);
        if (st == QLR_OK) json_scenario(json, "adapters_distinct", &f, &base, extra);
    }
    if (st == QLR_OK && wants(o, "attach")) st = scenario_attach(&c, q, n, names, paths[o->files], json);
    if (have_r) detach_all(&c, names, n);
    if (st == QLR_OK && wants(o, "mixed")) {
        const int32_t ranks[3] = {8, 16, 64};
        st = attach_random(&c, "mix", n, ranks, 3, names);
        for (int i = 0; i < n; i++) nm[i] = names[i];
        if (st == QLR_OK) st = run_streams(&c, q, n, nm, o->tokens, "distinct, ranks 8/16/64", &f);
        if (st == QLR_OK) json_scenario(json, "adapters_mixed_ranks", &f, &base,
                                        "\"ranks\": [8, 16, 64], \"adapters\": \"one per stream\"");
        detach_all(&c, names, n);
    }
    free(nm);
    if (st == QLR_OK && wants(o, "many")) st = scenario_many(&c, paths, json);
    if (st == QLR_OK)
        fprintf(json, ",\n  \"targets_issue15\": {\"distinct_ratio\": 0.90, \"mixed_ratio\": 0.85, "
                "\"attach_ms\": 150, \"max_stall_ms\": 20, \"many_ttft_ms_p99\": 500}\n}\n");
    if (st != QLR_OK) snprintf(c.err, sizeof c.err, "%s", qlr_error_msg());
    qlr_engine_free(c.eng);
    qlr_registry_free(c.reg);
    qlr_tokenizer_free(c.tok);
    qlr_model_free(c.m);
    remove_files(&c, n_paths, paths);
    if (c.be) qlr_backend_free(c.be);
    for (int i = 0; q && i <= n; i++) free(q[i].tt);
    free(q);
    free(names);
    free(paths);
    pthread_mutex_destroy(&c.mu);
    pthread_cond_destroy(&c.cv);
    if (st != QLR_OK) return qlr_errorf(st, "%s", c.err);
    return QLR_OK;
}
