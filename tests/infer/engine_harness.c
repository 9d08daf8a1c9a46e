/* tests/infer/engine_harness.c: see engine_harness.h. One mutex and condition variable for every
 * collector (the engine calls back on its own thread). */
#include "tests/infer/engine_harness.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "adapters/adapter_dev.h"
#include "core/core.h"
#include "data/chat_template.h"
#include "tests/test_util.h"

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;

int eh_utf8_whole(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        int k = p[i] < 0x80 ? 1 : (p[i] & 0xE0) == 0xC0 ? 2 : (p[i] & 0xF0) == 0xE0 ? 3
                : (p[i] & 0xF8) == 0xF0 ? 4 : 0;
        if (!k || i + (size_t)k > n) return 0;
        for (int j = 1; j < k; j++)
            if ((p[i + j] & 0xC0) != 0x80) return 0;
        i += (size_t)k;
    }
    return 1;
}

void eh_cb(void *ud, const qlr_engine_event *ev) {
    eh_out *o = ud;
    pthread_mutex_lock(&g_mu);
    if (o->n_done) o->text_after_done++;
    if (ev->type == QLR_ENGINE_EV_TEXT) {
        if (!eh_utf8_whole(ev->text, ev->len)) o->bad_utf8++;
        if (o->len + ev->len < sizeof o->text) {
            memcpy(o->text + o->len, ev->text, ev->len);
            o->len += ev->len;
        }
        for (size_t i = 0; i < ev->n_ids && o->n_ids < EH_MAX_IDS; i++) o->ids[o->n_ids++] = ev->ids[i];
        o->n_text++;
        if (o->block_at > 0 && o->n_text == o->block_at) {
            o->blocked = 1;
            pthread_cond_broadcast(&g_cv);
            while (o->blocked) pthread_cond_wait(&g_cv, &g_mu);
        }
    } else {
        o->n_done++;
        o->finish = ev->finish;
        snprintf(o->error, sizeof o->error, "%s", ev->error ? ev->error : "");
        o->n_prompt = ev->n_prompt;
        o->n_generated = ev->n_generated;
        o->n_cached = ev->n_cached;
    }
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

static int wait_for(eh_out *o, int (*pred)(eh_out *)) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += 120;
    pthread_mutex_lock(&g_mu);
    int rc = 0;
    while (!pred(o) && rc == 0) rc = pthread_cond_timedwait(&g_cv, &g_mu, &ts);
    int ok = pred(o);
    pthread_mutex_unlock(&g_mu);
    return ok;
}

static int is_done(eh_out *o) { return o->n_done > 0; }
static int is_blocked(eh_out *o) { return o->blocked; }

int eh_wait(eh_out *o) { return wait_for(o, is_done); }
int eh_wait_blocked(eh_out *o) { return wait_for(o, is_blocked); }

void eh_unblock(eh_out *o) {
    pthread_mutex_lock(&g_mu);
    o->blocked = 0;
    o->block_at = 0;
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
}

int eh_text_events(eh_out *o) {
    pthread_mutex_lock(&g_mu);
    int n = o->n_text;
    pthread_mutex_unlock(&g_mu);
    return n;
}

qlr_status eh_submit(qlr_engine *e, const int32_t *prompt, int32_t n, int32_t max_tokens,
                     qlr_adapter *adapter, float scale, const char *const *stop, int32_t n_stop,
                     eh_out *o, uint64_t *id) {
    int block_at = o->block_at;
    memset(o, 0, sizeof *o);
    o->block_at = block_at;
    qlr_engine_request r;
    memset(&r, 0, sizeof r);
    r.prompt = prompt;
    r.n_prompt = n;
    r.max_tokens = max_tokens;
    r.sampling = qlr_sampling_default();
    r.stop = stop;
    r.n_stop = n_stop;
    r.adapter = adapter;
    r.adapter_scale = scale;
    uint64_t dummy;
    return qlr_engine_submit(e, &r, eh_cb, o, id ? id : &dummy);
}

qlr_tokens eh_chat_prompt(const qlr_tokenizer *tok, const char *user) {
    qlr_tokens ids = {0};
    qlr_chat_template *tmpl = NULL;
    const char *src = qlr_tokenizer_chat_template(tok);
    CHECK(src != NULL);
    if (!src) return ids;
    CHECK_OK(qlr_chat_template_detect(src, strlen(src), &tmpl));
    qlr_chat_msg msg = {"user", user};
    qlr_chat_render r = {0};
    if (tmpl) CHECK_OK(qlr_chat_render_messages(tmpl, &msg, 1, 1, &r));
    if (r.text) CHECK_OK(qlr_tokenizer_encode(tok, r.text, r.len, QLR_ENC_PARSE_SPECIAL, &ids));
    qlr_chat_render_free(&r);
    qlr_chat_template_free(tmpl);
    return ids;
}

qlr_lora *eh_make_adapter(const qlr_model_config *cfg, int32_t r, uint32_t targets, uint64_t seed) {
    qlr_lora_base base;
    qlr_lora_base_from_config(cfg, &base);
    qlr_lora_params p = qlr_lora_params_default();
    p.r = r;
    p.alpha = 2.0 * r;
    p.targets = targets;
    p.seed = seed;
    qlr_lora *l = NULL;
    CHECK_OK(qlr_lora_create(&base, &p, &l));
    if (!l) return NULL;
    uint64_t s = seed * 77 + 5;
    /* large enough to change the greedy tokens of the demo model */
    for (uint64_t i = 0; i < l->n_params; i++) l->block[i] = 0.06f * test_rng_normal(&s);
    return l;
}

static int g_gen_n;
static int32_t *g_gen_out;
static int on_token(void *ud, int32_t id) {
    g_gen_out[g_gen_n++] = id;
    return 0;
}

int eh_generate(qlr_model *m, const qlr_tokenizer *tok, const int32_t *prompt, int32_t n,
                int32_t max_tokens, const qlr_lora *l, float scale, int32_t *out) {
    qlr_forward *f = NULL;
    qlr_kv_cache *kv = NULL;
    qlr_lora_dev *dev = NULL;
    qlr_adapter_slots *slots = NULL;
    const qlr_adapter_set *set = NULL;
    CHECK_OK(qlr_forward_create(m, n > 256 ? n : 256, 1, &f));
    CHECK_OK(qlr_kv_cache_create(m, 1, n + max_tokens, &kv));
    if (l) {
        CHECK_OK(qlr_lora_dev_create(m->be, l, m->cfg.n_layers, 0, &dev));
        CHECK_OK(qlr_adapter_slots_create(m->be, m->cfg.n_layers, 1, &slots));
        if (slots && dev) {
            qlr_adapter_slots_put(slots, 0, dev, scale);
            CHECK_OK(qlr_adapter_slots_commit(slots, 1, &set));
        }
    }
    int32_t stops[3];
    int32_t ns = 0;
    int32_t cand[3] = {qlr_tokenizer_eos(tok), qlr_tokenizer_eot(tok), -1};
    for (int i = 0; i < 2; i++)
        if (cand[i] >= 0) stops[ns++] = cand[i];
    qlr_generate_params p = qlr_generate_params_default();
    p.n_predict = max_tokens;
    p.stop_ids = stops;
    p.n_stop = ns;
    p.adapters = set;
    qlr_generate_stats gs;
    g_gen_n = 0;
    g_gen_out = out;
    if (f && kv && (!l || set)) CHECK_OK(qlr_generate(f, kv, prompt, n, &p, on_token, NULL, &gs));
    qlr_adapter_slots_free(slots);
    qlr_lora_dev_free(dev);
    qlr_kv_cache_free(kv);
    qlr_forward_free(f);
    return g_gen_n;
}
