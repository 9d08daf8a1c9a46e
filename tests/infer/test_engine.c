/* tests/infer/test_engine.c: the serving engine on the CPU with the demo model cut to 8 layers
 * (real shapes and tokenizer, a few seconds per run) and synthetic random adapters of mixed
 * ranks and targets in a registry:
 *  - five requests over four adapters and the base model at once give the same greedy tokens as
 *    each one alone through the engine and as qlr_generate with that adapter; again with a step
 *    budget of 16 tokens (chunked prefill mixed with decodes);
 *  - prefix reuse: the same prompt again reuses its full blocks (n_cached, prefix_hits) and gives
 *    the same tokens as without reuse; another adapter or another scale reuses nothing;
 *  - cancel mid-stream and in the queue: DONE (CANCELLED), every block back (kv_blocks_used 0);
 *  - a full queue refuses with QLR_ERR_BUSY (counted as rejected);
 *  - invalid requests name the field and give the adapter reference back;
 *  - a failing forward ends the requests of that step with QLR_FINISH_ERROR and a message, and
 *    the engine serves the next request;
 *  - stop without drain ends everything with one DONE (CANCELLED) each; with drain everything
 *    finishes; submit after stop is QLR_ERR_CANCELLED. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapters/registry.h"
#include "core/core.h"
#include "infer/engine.h"
#include "tests/infer/engine_harness.h"
#include "tests/test_util.h"

#define NREQ 5
#define MAXTOK 12

static qlr_backend *be;
static qlr_model *m;
static qlr_tokenizer *tok;
static qlr_registry *reg;
static qlr_lora *ref_lora[3]; /* the same adapters as the registry's, for qlr_generate */
static const char *ad_name[3] = {"a4", "b16", "c8"};

static qlr_engine *new_engine(int32_t max_batch, int32_t max_running, int32_t max_queue,
                              int prefix) {
    qlr_engine_params p = qlr_engine_params_default();
    p.max_batch_tokens = max_batch;
    p.max_running = max_running;
    p.max_queue = max_queue;
    p.max_ctx = 512;
    p.prefix_cache = prefix;
    qlr_engine *e = NULL;
    CHECK_OK(qlr_engine_create(m, tok, reg, &p, &e));
    return e;
}

static qlr_adapter *acquire(int i) {
    if (i < 0) return NULL;
    qlr_adapter *a = NULL;
    CHECK_OK(qlr_registry_acquire(reg, ad_name[i], &a));
    return a;
}

/* the five requests: (prompt, adapter index or -1, scale) */
static qlr_tokens prompts[3];
static const int req_prompt[NREQ] = {0, 1, 2, 1, 0};
static const int req_ad[NREQ] = {-1, 0, 1, 2, 0};
static const float req_scale[NREQ] = {1.0f, 1.0f, 1.0f, 1.0f, 0.5f};

static int same_ids(const eh_out *o, const int32_t *ids, int n) {
    if (o->n_ids != n) return 0;
    for (int i = 0; i < n; i++)
        if (o->ids[i] != ids[i]) return 0;
    return 1;
}

static void test_concurrent(void) {
    static eh_out conc[NREQ], alone[NREQ], chunked[NREQ];
    int32_t ref[NREQ][MAXTOK];
    int nref[NREQ];
    for (int i = 0; i < NREQ; i++) {
        const qlr_tokens *p = &prompts[req_prompt[i]];
        nref[i] = eh_generate(m, tok, p->ids, (int32_t)p->n, MAXTOK,
                              req_ad[i] >= 0 ? ref_lora[req_ad[i]] : NULL, req_scale[i], ref[i]);
    }
    /* the adapters change the tokens: otherwise this test shows nothing */
    int differ = nref[0] != nref[4] || memcmp(ref[0], ref[4], (size_t)nref[0] * 4) != 0;
    CHECK_MSG(differ, "the adapter at scale 0.5 did not change the base model's greedy tokens");
    for (int pass = 0; pass < 3; pass++) {
        /* pass 0: all at once; 1: each alone; 2: all at once, 16 tokens per step */
        eh_out *out = pass == 0 ? conc : pass == 1 ? alone : chunked;
        qlr_engine *e = new_engine(pass == 2 ? 16 : 512, 8, 16, 0);
        if (!e) return;
        for (int i = 0; i < NREQ; i++) {
            const qlr_tokens *p = &prompts[req_prompt[i]];
            CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, MAXTOK, acquire(req_ad[i]), req_scale[i],
                               NULL, 0, &out[i], NULL));
            if (pass == 1) CHECK(eh_wait(&out[i]));
        }
        for (int i = 0; i < NREQ; i++) CHECK(eh_wait(&out[i]));
        qlr_engine_stats st;
        qlr_engine_get_stats(e, &st);
        CHECK_EQ_INT(st.kv_blocks_used, 0);
        CHECK_EQ_INT(st.requests_done, NREQ);
        if (pass != 1) CHECK_MSG(st.last_batch_seqs >= 1, "no step ran");
        qlr_engine_free(e);
    }
    for (int i = 0; i < NREQ; i++) {
        CHECK_MSG(conc[i].n_done == 1 && alone[i].n_done == 1 && chunked[i].n_done == 1,
                  "request %d: DONE events %d/%d/%d", i, conc[i].n_done, alone[i].n_done,
                  chunked[i].n_done);
        CHECK_MSG(same_ids(&conc[i], ref[i], nref[i]), "request %d: concurrent tokens differ from "
                  "qlr_generate's (%d vs %d tokens)", i, conc[i].n_ids, nref[i]);
        CHECK_MSG(same_ids(&alone[i], ref[i], nref[i]), "request %d: tokens alone differ from "
                  "qlr_generate's", i);
        CHECK_MSG(same_ids(&chunked[i], ref[i], nref[i]), "request %d: chunked-prefill tokens "
                  "differ from qlr_generate's", i);
        CHECK_EQ_INT(conc[i].n_generated, conc[i].n_ids);
        CHECK(conc[i].finish == QLR_FINISH_STOP || conc[i].finish == QLR_FINISH_LENGTH);
        CHECK_EQ_INT(conc[i].bad_utf8, 0);
        CHECK(conc[i].len == alone[i].len && !memcmp(conc[i].text, alone[i].text, conc[i].len));
    }
    printf("concurrent: %d requests over 3 adapters + base, tokens == alone == qlr_generate\n", NREQ);
}

static void test_prefix(void) {
    /* a prompt of 4+ full blocks: 16-token blocks, the chat prompt repeated */
    int32_t pr[256];
    int32_t n = 0;
    for (int k = 0; k < 3 && n + (int32_t)prompts[2].n <= 256; k++) {
        memcpy(pr + n, prompts[2].ids, prompts[2].n * 4);
        n += (int32_t)prompts[2].n;
    }
    CHECK(n > 64);
    int32_t blocks = (n - 1) / 16;
    qlr_engine *e = new_engine(512, 8, 16, 1), *e0 = new_engine(512, 8, 16, 0);
    if (!e || !e0) return;
    static eh_out o[7];
    /* one engine at a time runs forwards: they share the backend */
    CHECK_OK(eh_submit(e0, pr, n, MAXTOK, NULL, 1.0f, NULL, 0, &o[0], NULL)); /* no reuse */
    CHECK(eh_wait(&o[0]));
    CHECK_OK(eh_submit(e, pr, n, MAXTOK, NULL, 1.0f, NULL, 0, &o[1], NULL));
    CHECK(eh_wait(&o[1]));
    CHECK_OK(eh_submit(e, pr, n, MAXTOK, NULL, 1.0f, NULL, 0, &o[2], NULL)); /* reuse */
    CHECK(eh_wait(&o[2]));
    CHECK_OK(eh_submit(e, pr, n, MAXTOK, acquire(0), 1.0f, NULL, 0, &o[3], NULL)); /* adapter */
    CHECK(eh_wait(&o[3]));
    CHECK_OK(eh_submit(e, pr, n, MAXTOK, acquire(0), 1.0f, NULL, 0, &o[4], NULL)); /* again */
    CHECK(eh_wait(&o[4]));
    CHECK_OK(eh_submit(e, pr, n, MAXTOK, acquire(0), 0.5f, NULL, 0, &o[5], NULL)); /* scale */
    CHECK(eh_wait(&o[5]));
    CHECK_OK(eh_submit(e0, pr, n, MAXTOK, acquire(0), 1.0f, NULL, 0, &o[6], NULL));
    CHECK(eh_wait(&o[6]));
    CHECK_EQ_INT(o[1].n_cached, 0);
    CHECK_EQ_INT(o[2].n_cached, blocks * 16);
    CHECK_EQ_INT(o[3].n_cached, 0);
    CHECK_EQ_INT(o[4].n_cached, blocks * 16);
    CHECK_EQ_INT(o[5].n_cached, 0);
    CHECK_MSG(same_ids(&o[1], o[0].ids, o[0].n_ids) && same_ids(&o[2], o[0].ids, o[0].n_ids),
              "prefix reuse changed the base model's tokens");
    CHECK_MSG(same_ids(&o[3], o[6].ids, o[6].n_ids) && same_ids(&o[4], o[6].ids, o[6].n_ids),
              "prefix reuse changed the adapter's tokens");
    CHECK_MSG(!same_ids(&o[3], o[0].ids, o[0].n_ids), "the adapter did not change the tokens");
    qlr_engine_stats st;
    qlr_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.prefix_hits, 2 * blocks);
    CHECK_EQ_INT(st.cached_tokens, 2 * blocks * 16);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.prompt_tokens, 5 * n);
    printf("prefix: %d-token prompt, %d blocks reused twice (stats: %llu hits)\n", n, blocks,
           (unsigned long long)st.prefix_hits);
    qlr_engine_free(e);
    qlr_engine_free(e0);
}

static void test_cancel(void) {
    qlr_engine *e = new_engine(512, 1, 4, 1);
    if (!e) return;
    static eh_out a, b;
    uint64_t ia = 0, ib = 0;
    const qlr_tokens *p = &prompts[0];
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 400, NULL, 1.0f, NULL, 0, &a, &ia));
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 400, NULL, 1.0f, NULL, 0, &b, &ib));
    CHECK(ia != 0 && ib != 0 && ia != ib);
    /* b waits in the queue (one request runs at a time): cancelled there */
    qlr_engine_cancel(e, ib);
    CHECK(eh_wait(&b));
    CHECK(b.finish == QLR_FINISH_CANCELLED && b.n_generated == 0 && b.n_done == 1);
    /* a: cancelled after a few tokens */
    for (int k = 0; k < 6000 && eh_text_events(&a) < 3 && !a.n_done; k++) usleep(5000);
    CHECK(eh_text_events(&a) >= 3);
    qlr_engine_stats st;
    qlr_engine_get_stats(e, &st);
    CHECK(st.kv_blocks_used > 0 && st.running == 1);
    qlr_engine_cancel(e, ia);
    qlr_engine_cancel(e, ia);      /* twice: ignored */
    qlr_engine_cancel(e, 987654);  /* unknown: ignored */
    CHECK(eh_wait(&a));
    CHECK(a.finish == QLR_FINISH_CANCELLED && a.n_done == 1 && a.text_after_done == 0);
    CHECK(a.n_generated >= 3 && a.n_generated < 400);
    qlr_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.running, 0);
    CHECK_EQ_INT(st.queued, 0);
    CHECK_EQ_INT(st.requests_cancelled, 2);
    qlr_engine_cancel(e, ia); /* finished: ignored */
    printf("cancel: after %d tokens; blocks used %d\n", a.n_generated, st.kv_blocks_used);
    qlr_engine_free(e);
}

static void test_busy(void) {
    qlr_engine *e = new_engine(512, 1, 2, 0);
    if (!e) return;
    static eh_out a, b, c, d;
    const qlr_tokens *p = &prompts[1];
    a.block_at = 1; /* the engine thread stops inside a's first TEXT event */
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 4, NULL, 1.0f, NULL, 0, &a, NULL));
    CHECK(eh_wait_blocked(&a));
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 2, NULL, 1.0f, NULL, 0, &b, NULL));
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 2, NULL, 1.0f, NULL, 0, &c, NULL));
    qlr_adapter *ad = acquire(1);
    qlr_adapter_info info;
    qlr_adapter_get_info(reg, ad, &info);
    int refs = info.refs;
    CHECK(eh_submit(e, p->ids, (int32_t)p->n, 2, ad, 1.0f, NULL, 0, &d, NULL) == QLR_ERR_BUSY);
    qlr_adapter_get_info(reg, ad, &info);
    CHECK_EQ_INT(info.refs, refs - 1); /* the refused request gave its reference back */
    qlr_engine_stats st;
    qlr_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.requests_rejected, 1);
    CHECK_EQ_INT(st.queued, 2);
    CHECK_EQ_INT(st.running, 1);
    eh_unblock(&a);
    CHECK(eh_wait(&a) && eh_wait(&b) && eh_wait(&c));
    CHECK(d.n_done == 0 && d.n_text == 0);
    CHECK(b.finish != QLR_FINISH_CANCELLED && c.finish != QLR_FINISH_CANCELLED);
    qlr_engine_free(e);
}

static void test_invalid(void) {
    qlr_engine *e = new_engine(512, 4, 4, 0);
    if (!e) return;
    static eh_out o;
    int32_t bad[2] = {1, 49152};
    const qlr_tokens *p = &prompts[0];
    CHECK(eh_submit(e, p->ids, 0, 4, NULL, 1.0f, NULL, 0, &o, NULL) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "prompt") != NULL);
    CHECK(eh_submit(e, p->ids, (int32_t)p->n, 0, NULL, 1.0f, NULL, 0, &o, NULL) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "max_tokens") != NULL);
    CHECK(eh_submit(e, p->ids, (int32_t)p->n, 600, NULL, 1.0f, NULL, 0, &o, NULL) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "context") != NULL);
    CHECK(eh_submit(e, bad, 2, 4, NULL, 1.0f, NULL, 0, &o, NULL) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "vocabulary") != NULL);
    const char *empty[1] = {""};
    qlr_adapter *ad = acquire(2);
    qlr_adapter_info info;
    qlr_adapter_get_info(reg, ad, &info);
    int refs = info.refs;
    CHECK(eh_submit(e, p->ids, (int32_t)p->n, 4, ad, 1.0f, empty, 1, &o, NULL) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "stop") != NULL);
    qlr_adapter_get_info(reg, ad, &info);
    CHECK_EQ_INT(info.refs, refs - 1);
    CHECK(o.n_done == 0);
    qlr_engine_free(e);
    /* bad parameters */
    qlr_engine_params pp = qlr_engine_params_default();
    pp.max_running = 600; /* > max_batch_tokens */
    CHECK(qlr_engine_create(m, tok, reg, &pp, &e) == QLR_ERR_INVALID && e == NULL);
}

/* A forward that fails (as a device error would): the step's requests end with ERROR and the
 * message; the engine goes on with the next request. */
static qlr_status fail_attention(qlr_backend *b, void *out, const void *q, const void *kp,
                                 const void *vp, const int32_t *bt, int64_t w, int64_t blk,
                                 const int32_t *seq, const int32_t *pos, int64_t n, int64_t nh,
                                 int64_t nkv, int64_t hd, float scale) {
    return qlr_errorf(QLR_ERR_DEVICE, "simulated device failure");
}

static void test_error(void) {
    qlr_engine *e = new_engine(512, 4, 4, 1);
    if (!e) return;
    static eh_out a, b, c;
    const qlr_tokens *p = &prompts[0];
    qlr_backend_ops saved = be->ops;
    be->ops.attention_paged = fail_attention; /* published to the engine thread by submit's lock */
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 4, acquire(0), 1.0f, NULL, 0, &a, NULL));
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 4, NULL, 1.0f, NULL, 0, &b, NULL));
    CHECK(eh_wait(&a) && eh_wait(&b));
    be->ops = saved;
    CHECK(a.finish == QLR_FINISH_ERROR && strstr(a.error, "simulated device failure"));
    CHECK(b.finish == QLR_FINISH_ERROR && b.n_done == 1);
    CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 4, NULL, 1.0f, NULL, 0, &c, NULL));
    CHECK(eh_wait(&c));
    CHECK(c.finish != QLR_FINISH_ERROR && c.n_generated > 0);
    CHECK_EQ_INT(c.n_cached, 0); /* nothing of the failed step was entered in the cache */
    qlr_engine_stats st;
    qlr_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    qlr_engine_free(e);
}

static void test_stop(void) {
    static eh_out o[4], q;
    const qlr_tokens *p = &prompts[2];
    qlr_engine *e = new_engine(512, 2, 8, 1);
    if (!e) return;
    for (int i = 0; i < 4; i++)
        CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 300, i == 1 ? acquire(2) : NULL, 1.0f, NULL, 0,
                           &o[i], NULL));
    for (int k = 0; k < 6000 && eh_text_events(&o[0]) < 1; k++) usleep(5000);
    qlr_engine_stop(e, 0);
    for (int i = 0; i < 4; i++)
        CHECK_MSG(o[i].n_done == 1 && o[i].finish == QLR_FINISH_CANCELLED && !o[i].text_after_done,
                  "request %d: %d DONE, finish %d", i, o[i].n_done, o[i].finish);
    CHECK(eh_submit(e, p->ids, (int32_t)p->n, 4, acquire(0), 1.0f, NULL, 0, &q, NULL) ==
          QLR_ERR_CANCELLED);
    qlr_engine_stop(e, 1); /* idempotent */
    qlr_engine_stats st;
    qlr_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.kv_blocks_used, 0);
    CHECK_EQ_INT(st.requests_cancelled, 4);
    qlr_engine_free(e);
    /* drain: everything finishes normally */
    e = new_engine(512, 2, 8, 1);
    if (!e) return;
    for (int i = 0; i < 3; i++)
        CHECK_OK(eh_submit(e, p->ids, (int32_t)p->n, 3, NULL, 1.0f, NULL, 0, &o[i], NULL));
    qlr_engine_stop(e, 1);
    for (int i = 0; i < 3; i++)
        CHECK(o[i].n_done == 1 && o[i].finish != QLR_FINISH_CANCELLED && o[i].n_generated > 0);
    qlr_engine_free(e);
    qlr_engine_free(NULL);
}

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    lp.max_layers = 8;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    CHECK_OK(qlr_tokenizer_open_gguf(path, &tok));
    qlr_registry_params rp = qlr_registry_params_default();
    CHECK_OK(qlr_registry_create(be, m ? &m->cfg : NULL, &rp, &reg));
    if (!m || !tok || !reg) return test_finish();
    const int32_t ranks[3] = {4, 16, 8};
    const uint32_t targets[3] = {QLR_LORA_TARGETS_ALL,
                                 QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_V) |
                                     QLR_LORA_TARGET(QLR_LIN_DOWN),
                                 QLR_LORA_TARGET(QLR_LIN_GATE) | QLR_LORA_TARGET(QLR_LIN_UP) |
                                     QLR_LORA_TARGET(QLR_LIN_O)};
    for (int i = 0; i < 3; i++) {
        ref_lora[i] = eh_make_adapter(&m->cfg, ranks[i], targets[i], 100 + (uint64_t)i);
        qlr_lora *l = eh_make_adapter(&m->cfg, ranks[i], targets[i], 100 + (uint64_t)i);
        if (l) CHECK_OK(qlr_registry_attach(reg, ad_name[i], l));
    }
    prompts[0] = eh_chat_prompt(tok, "What is the capital of France?");
    prompts[1] = eh_chat_prompt(tok, "Write a haiku about the sea.");
    prompts[2] = eh_chat_prompt(tok, "List three prime numbers and explain why they are prime.");
    test_concurrent();
    test_prefix();
    test_cancel();
    test_busy();
    test_invalid();
    test_error();
    test_stop();
    for (int i = 0; i < 3; i++) {
        qlr_tokens_free(&prompts[i]);
        qlr_lora_free(ref_lora[i]);
    }
    qlr_registry_free(reg);
    qlr_tokenizer_free(tok);
    qlr_model_free(m);
    qlr_backend_free(be);
    return test_finish();
}
