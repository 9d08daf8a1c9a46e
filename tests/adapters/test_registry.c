/* tests/adapters/test_registry.c: the registry of named adapters (adapters/registry.h) on the CPU
 * backend with a tiny random llama model (tests/train/tiny_model.h) and small synthetic adapters
 * saved as GGUF and PEFT into a temp dir: names; references (detach while held, the last release
 * frees); adapters for another base and corrupt files refused with the loader's message while the
 * registry keeps working; the file tier (lazy attach, reload on pin, a vanished file); the host
 * budget; the device budget (LRU eviction order, pinned never evicted, QLR_ERR_NOMEM); list, info
 * and stats; forwards through a pinned adapter equal to a reference made without the registry;
 * and the concurrency test of issue 11: one thread keeps forwarding through adapters it looks up
 * by name while another attaches and detaches 1,000 times, every forward's logits checked. Run it
 * under QLR_ASAN and QLR_TSAN builds too. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adapters/adapter_dev.h"
#include "adapters/registry.h"
#include "core/core.h"
#include "model/model.h"
#include "tests/test_util.h"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function" /* the dataset writers of the trainer tests */
#include "tests/train/tiny_model.h"
#pragma GCC diagnostic pop

static qlr_backend *g_be;
static qlr_model *g_model;
static qlr_lora_base g_base;

static const char *tmp(const char *name) {
    static char buf[16][512];
    static int k;
    char *p = buf[k++ % 16];
    snprintf(p, 512, "%s/%s", test_tmpdir(), name);
    return p;
}

/* An adapter for the tiny model: every value of A and B random (B is not zero, so it changes the
 * forward), deterministic in seed. No CHECK inside: the concurrency test calls it off the main
 * thread (the test counters are not atomic). */
static qlr_status make_adapter_st(const qlr_lora_base *base, int32_t r, uint32_t targets,
                                  uint64_t seed, qlr_lora **out) {
    qlr_lora_params p = qlr_lora_params_default();
    p.r = r;
    p.alpha = 2.0 * r;
    p.targets = targets;
    p.seed = seed;
    QLR_TRY(qlr_lora_create(base, &p, out));
    uint64_t s = seed * 77 + 5;
    for (uint64_t i = 0; i < (*out)->n_params; i++) (*out)->block[i] = 0.05f * test_rng_normal(&s);
    return QLR_OK;
}

static qlr_lora *make_adapter(const qlr_lora_base *base, int32_t r, uint32_t targets,
                              uint64_t seed) {
    qlr_lora *l = NULL;
    CHECK_OK(make_adapter_st(base, r, targets, seed, &l));
    return l;
}

static const char *save_gguf(qlr_lora *l, const char *name) {
    const char *p = tmp(name);
    CHECK_OK(qlr_lora_save_gguf(l, p));
    return p;
}

static int msg_has(const char *needle) { return strstr(qlr_error_msg(), needle) != NULL; }

static qlr_registry *new_registry(uint64_t dev_budget, uint64_t host_budget) {
    qlr_registry_params p = qlr_registry_params_default();
    p.device_budget = dev_budget;
    p.host_budget = host_budget;
    qlr_registry *r = NULL;
    CHECK_OK(qlr_registry_create(g_be, &g_model->cfg, &p, &r));
    return r;
}

static qlr_adapter_info info_of(qlr_registry *r, qlr_adapter *a) {
    qlr_adapter_info i;
    qlr_adapter_get_info(r, a, &i);
    return i;
}

/* Residency of the attached adapter `name` (-1 when absent). */
static int residency(qlr_registry *r, const char *name) {
    qlr_adapter_info *v = NULL;
    size_t n = 0;
    int res = -1;
    CHECK_OK(qlr_registry_list(r, &v, &n));
    for (size_t i = 0; i < n; i++)
        if (strcmp(v[i].name, name) == 0) res = (int)v[i].residency;
    free(v);
    return res;
}

/* ---- names ---- */

static void test_names(void) {
    qlr_registry *r = new_registry(0, 0);
    CHECK_OK(qlr_registry_attach(r, "sql", make_adapter(&g_base, 4, 0x7f, 1)));
    CHECK(qlr_registry_attach(r, "sql", make_adapter(&g_base, 4, 0x7f, 2)) == QLR_ERR_INVALID);
    CHECK(msg_has("'sql'") && msg_has("already attached"));
    CHECK_OK(qlr_registry_attach(r, "org/model:v1.2_b-3", make_adapter(&g_base, 4, 0x7f, 3)));
    const char *bad[] = {"", "a b", "tab\there", "caf\xc3\xa9", "semi;colon", "q\"uote", "x\n"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(qlr_registry_attach(r, bad[i], make_adapter(&g_base, 4, 0x7f, 4)) == QLR_ERR_INVALID);
        CHECK_MSG(msg_has("adapter name"), "bad name %zu: %s", i, qlr_error_msg());
    }
    CHECK(qlr_registry_attach(r, NULL, make_adapter(&g_base, 4, 0x7f, 4)) == QLR_ERR_INVALID);
    char longname[200];
    memset(longname, 'n', sizeof longname);
    longname[QLR_ADAPTER_NAME_MAX - 1] = 0; /* 127 bytes: the longest allowed */
    CHECK_OK(qlr_registry_attach(r, longname, make_adapter(&g_base, 4, 0x7f, 5)));
    longname[QLR_ADAPTER_NAME_MAX - 1] = 'n';
    longname[QLR_ADAPTER_NAME_MAX] = 0; /* 128 */
    CHECK(qlr_registry_attach(r, longname, make_adapter(&g_base, 4, 0x7f, 6)) == QLR_ERR_INVALID);
    CHECK(msg_has("too long"));
    /* file attach checks the name before reading anything */
    CHECK(qlr_registry_attach_file(r, "bad name", "/nonexistent", 0) == QLR_ERR_INVALID);
    CHECK(msg_has("adapter name"));
    CHECK(qlr_registry_attach_file(r, "sql", "/nonexistent", 0) == QLR_ERR_INVALID);
    CHECK(msg_has("already attached"));
    qlr_registry_stats s;
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.attached, 3);
    CHECK(qlr_registry_detach(r, "nope") == QLR_ERR_NOT_FOUND);
    CHECK(msg_has("'nope'"));
    qlr_adapter *a = NULL;
    CHECK(qlr_registry_acquire(r, "nope", &a) == QLR_ERR_NOT_FOUND && a == NULL);
    qlr_registry_free(r);
}

/* ---- references ---- */

static void test_refs(void) {
    qlr_registry *r = new_registry(0, 0);
    qlr_lora *l = make_adapter(&g_base, 8, 0x7f, 11);
    uint64_t np = l->n_params;
    CHECK_OK(qlr_registry_attach(r, "x", l));
    qlr_adapter *a = NULL, *b = NULL;
    CHECK_OK(qlr_registry_acquire(r, "x", &a));
    CHECK(a && strcmp(qlr_adapter_name(a), "x") == 0);
    qlr_registry_retain(r, a);
    qlr_adapter_info i = info_of(r, a);
    CHECK_EQ_INT(i.refs, 2);
    CHECK_EQ_INT(i.uses, 1);
    CHECK_EQ_INT(i.r, 8);
    CHECK_EQ_INT(i.n_params, np);
    CHECK_EQ_INT(i.residency, QLR_RESIDENCY_HOST);
    CHECK(strcmp(i.path, "") == 0);
    const qlr_lora_dev *d = NULL;
    CHECK_OK(qlr_registry_pin(r, a, &d));
    CHECK(d && d->r == 8);
    qlr_registry_unpin(r, a);
    /* detach while held: the name goes at once, the adapter stays for its holders */
    CHECK_OK(qlr_registry_detach(r, "x"));
    CHECK(qlr_registry_acquire(r, "x", &b) == QLR_ERR_NOT_FOUND);
    CHECK(qlr_registry_detach(r, "x") == QLR_ERR_NOT_FOUND);
    qlr_registry_stats s;
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.attached, 0);
    CHECK_EQ_INT(s.resident, 1);
    CHECK_EQ_INT(s.host_bytes, np * 4);
    /* the same name may be attached again meanwhile: another adapter */
    qlr_lora *l4 = make_adapter(&g_base, 4, 0x7f, 12);
    uint64_t np4 = l4->n_params;
    CHECK_OK(qlr_registry_attach(r, "x", l4));
    CHECK_OK(qlr_registry_acquire(r, "x", &b));
    CHECK(b != a && info_of(r, b).r == 4);
    qlr_registry_release(r, b);
    /* the held one still works: pin again and read it */
    CHECK_OK(qlr_registry_pin(r, a, &d));
    CHECK(d && d->r == 8 && strcmp(qlr_adapter_name(a), "x") == 0);
    qlr_registry_unpin(r, a);
    qlr_registry_release(r, a); /* the retain's reference */
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.host_bytes, (np + np4) * 4);
    CHECK_EQ_INT(s.resident, 1);
    qlr_registry_release(r, a); /* the acquire's: the last */
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.host_bytes, np4 * 4); /* the last release freed the first x's masters */
    /* its device copy waits for the engine thread's collect */
    CHECK_EQ_INT(s.resident, 0);
    CHECK_EQ_INT(s.device_bytes, np * 4);
    qlr_registry_collect(r);
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.device_bytes, 0);
    qlr_registry_release(r, NULL); /* safe */
    qlr_registry_free(r);
}

/* ---- refusals ---- */

static void test_refusals(void) {
    qlr_registry *r = new_registry(0, 0);
    /* another base: wider model, more layers, another architecture */
    qlr_lora_base wide = g_base;
    wide.d_model = 2 * g_base.d_model;
    qlr_lora_base deep = g_base;
    deep.n_layers = g_base.n_layers + 1;
    qlr_lora_base qwen = g_base;
    snprintf(qwen.arch, sizeof qwen.arch, "qwen2");
    CHECK(qlr_registry_attach(r, "wide", make_adapter(&wide, 4, 0x7f, 21)) == QLR_ERR_INVALID);
    CHECK_MSG(msg_has("adapter 'wide'") && msg_has("in_features") && msg_has("attn_q"), "%s",
              qlr_error_msg());
    CHECK(qlr_registry_attach(r, "deep", make_adapter(&deep, 4, 0x7f, 22)) == QLR_ERR_INVALID);
    CHECK_MSG(msg_has("only 2 layers"), "%s", qlr_error_msg());
    CHECK(qlr_registry_attach(r, "qwen", make_adapter(&qwen, 4, 0x7f, 23)) == QLR_ERR_INVALID);
    CHECK_MSG(msg_has("'qwen2'") && msg_has("'llama'"), "%s", qlr_error_msg());
    /* the same through files (GGUF and PEFT): the loader's message, naming the file */
    qlr_lora *w = make_adapter(&wide, 4, 0x7f, 24);
    const char *wg = save_gguf(w, "wide.gguf");
    const char *wp = tmp("wide_peft");
    CHECK_OK(qlr_lora_save_peft(w, wp));
    qlr_lora_free(w);
    CHECK(qlr_registry_attach_file(r, "wide", wg, 0) == QLR_ERR_INVALID);
    CHECK_MSG(msg_has(wg) && msg_has("in_features") && msg_has("'wide'"), "%s", qlr_error_msg());
    CHECK(qlr_registry_attach_file(r, "wide", wp, 1) == QLR_ERR_INVALID);
    CHECK_MSG(msg_has("wide_peft") && msg_has("in_features"), "%s", qlr_error_msg());
    /* corrupt files: garbage, a truncated GGUF, a broken adapter_config.json, a missing path */
    const char *garbage = tmp("garbage.gguf");
    tiny_write_text(garbage, "GGUF this is not a GGUF file at all");
    CHECK(qlr_registry_attach_file(r, "g", garbage, 0) != QLR_OK);
    CHECK_MSG(msg_has(garbage), "%s", qlr_error_msg());
    qlr_lora *ok = make_adapter(&g_base, 4, 0x7f, 25);
    const char *okg = save_gguf(ok, "ok.gguf");
    const char *okp = tmp("ok_peft");
    CHECK_OK(qlr_lora_save_peft(ok, okp));
    qlr_lora_free(ok);
    FILE *f = fopen(okg, "rb");
    CHECK(f != NULL);
    char *buf = malloc(1 << 20);
    size_t len = f ? fread(buf, 1, 1 << 20, f) : 0;
    if (f) fclose(f);
    const char *trunc = tmp("truncated.gguf");
    f = fopen(trunc, "wb");
    CHECK(f != NULL);
    if (f) {
        fwrite(buf, 1, len / 2, f);
        fclose(f);
    }
    free(buf);
    CHECK(qlr_registry_attach_file(r, "t", trunc, 1) != QLR_OK);
    CHECK_MSG(msg_has(trunc), "%s", qlr_error_msg());
    char cfg[600];
    snprintf(cfg, sizeof cfg, "%s/adapter_config.json", okp);
    tiny_write_text(cfg, "{\n  \"r\": 4,\n  \"lora_alpha\": \n}\n");
    CHECK(qlr_registry_attach_file(r, "p", okp, 0) != QLR_OK);
    CHECK_MSG(msg_has("adapter_config.json:"), "%s", qlr_error_msg());
    CHECK(qlr_registry_attach_file(r, "m", tmp("missing.gguf"), 0) == QLR_ERR_NOT_FOUND);
    /* nothing was attached, and the registry still works */
    qlr_registry_stats s;
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.attached, 0);
    CHECK_EQ_INT(s.host_bytes, 0);
    CHECK_OK(qlr_registry_attach_file(r, "good", okg, 0));
    qlr_adapter *a = NULL;
    CHECK_OK(qlr_registry_acquire(r, "good", &a));
    const qlr_lora_dev *d = NULL;
    CHECK_OK(qlr_registry_pin(r, a, &d));
    qlr_registry_unpin(r, a);
    qlr_registry_release(r, a);
    qlr_registry_free(r);
}

/* ---- the file tier and the host budget ---- */

static int same_values(const qlr_lora *l, const qlr_lora_dev *d) {
    /* on the CPU the device copy aliases f32 masters: compare every module's A and B */
    for (int32_t L = 0; L < l->base.n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
            const qlr_lora_ref *ref = &d->mods[L * QLR_LIN_COUNT + id];
            if (!m) {
                if (ref->r != 0) return 0;
                continue;
            }
            if (ref->r != l->r || memcmp(ref->a, m->a, (size_t)l->r * m->in * 4) ||
                memcmp(ref->b, m->b, (size_t)l->r * m->out * 4))
                return 0;
        }
    return 1;
}

static void test_file_tier(void) {
    qlr_lora *l = make_adapter(&g_base, 4, QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_DOWN),
                               31);
    const char *path = save_gguf(l, "lazy.gguf");
    const char *peft = tmp("lazy_peft");
    CHECK_OK(qlr_lora_save_peft(l, peft));
    uint64_t bytes = l->n_params * 4;
    qlr_registry *r = new_registry(0, 0);
    CHECK_OK(qlr_registry_attach_file(r, "lazy", path, 1));
    CHECK_OK(qlr_registry_attach_file(r, "eager", peft, 0));
    CHECK_EQ_INT(residency(r, "lazy"), QLR_RESIDENCY_FILE);
    CHECK_EQ_INT(residency(r, "eager"), QLR_RESIDENCY_HOST);
    qlr_registry_stats s;
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.loads, 2);
    CHECK_EQ_INT(s.host_bytes, bytes);
    qlr_adapter *a = NULL;
    CHECK_OK(qlr_registry_acquire(r, "lazy", &a));
    qlr_adapter_info i = info_of(r, a);
    CHECK(strcmp(i.path, path) == 0);
    CHECK_EQ_INT(i.r, 4);
    CHECK_EQ_INT(i.n_params, l->n_params);
    CHECK_EQ_INT(i.targets, l->targets);
    CHECK_NEAR(i.alpha, 8.0, 0, 0);
    CHECK_NEAR(i.scale, 2.0, 0, 0);
    CHECK_EQ_INT(i.device_bytes, 0);
    const qlr_lora_dev *d = NULL;
    CHECK_OK(qlr_registry_pin(r, a, &d)); /* loads it again */
    CHECK(d && same_values(l, d));
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.loads, 3);
    CHECK_EQ_INT(info_of(r, a).residency, QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(info_of(r, a).device_bytes, bytes); /* f32 compute copies on the CPU */
    qlr_registry_unpin(r, a);
    qlr_registry_release(r, a);
    /* a file that vanished since attach: an error naming it, the adapter stays attached */
    qlr_lora *l2 = make_adapter(&g_base, 4, 0x7f, 32);
    const char *gone = save_gguf(l2, "gone.gguf");
    qlr_lora_free(l2);
    CHECK_OK(qlr_registry_attach_file(r, "gone", gone, 1));
    CHECK(unlink(gone) == 0);
    CHECK_OK(qlr_registry_acquire(r, "gone", &a));
    CHECK(qlr_registry_pin(r, a, &d) != QLR_OK && d == NULL);
    CHECK_MSG(msg_has("gone.gguf") && msg_has("'gone'"), "%s", qlr_error_msg());
    qlr_registry_release(r, a);
    CHECK_EQ_INT(residency(r, "gone"), QLR_RESIDENCY_FILE);
    qlr_registry_free(r);

    /* host budget of two adapters: the least recently used file-backed host copy goes to the
     * file tier; in-memory adapters never do */
    r = new_registry(0, 2 * bytes);
    CHECK_OK(qlr_registry_attach(r, "mem", make_adapter(&g_base, 4, l->targets, 33)));
    CHECK_OK(qlr_registry_attach_file(r, "f1", path, 0));
    CHECK_OK(qlr_registry_attach_file(r, "f2", path, 0));
    CHECK_EQ_INT(residency(r, "f1"), QLR_RESIDENCY_HOST);
    CHECK_OK(qlr_registry_acquire(r, "f1", &a)); /* f1 is now more recent than f2 */
    qlr_registry_release(r, a);
    CHECK_OK(qlr_registry_attach_file(r, "f3", path, 0));
    CHECK_EQ_INT(residency(r, "mem"), QLR_RESIDENCY_HOST);
    CHECK_EQ_INT(residency(r, "f1"), QLR_RESIDENCY_HOST);
    CHECK_EQ_INT(residency(r, "f2"), QLR_RESIDENCY_FILE);
    CHECK_EQ_INT(residency(r, "f3"), QLR_RESIDENCY_HOST);
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.host_bytes, 3 * bytes);
    /* using f2 loads it again and drops the least recent other (f1) */
    CHECK_OK(qlr_registry_acquire(r, "f2", &a));
    CHECK_OK(qlr_registry_pin(r, a, &d));
    CHECK(d && same_values(l, d));
    qlr_registry_unpin(r, a);
    qlr_registry_release(r, a);
    CHECK_EQ_INT(residency(r, "f1"), QLR_RESIDENCY_FILE);
    CHECK_EQ_INT(residency(r, "f2"), QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(residency(r, "f3"), QLR_RESIDENCY_HOST);
    qlr_registry_free(r);
    qlr_lora_free(l);
}

/* ---- the device budget ---- */

static void pin_unpin(qlr_registry *r, const char *name) {
    qlr_adapter *a = NULL;
    const qlr_lora_dev *d = NULL;
    CHECK_OK(qlr_registry_acquire(r, name, &a));
    if (!a) return;
    CHECK_OK(qlr_registry_pin(r, a, &d));
    if (d) qlr_registry_unpin(r, a);
    qlr_registry_release(r, a);
}

/* qlr_registry_prefetch: a file-tier adapter is read on the loader threads (0 until then), the
 * pin after it reads no file; in-memory and host-resident adapters are ready at once; a file that
 * vanished makes prefetch say "ready" so that the pin reports the error; a registry freed while
 * reads are queued drops their references (no leak, no assert). */
static void test_prefetch(void) {
    qlr_lora *l = make_adapter(&g_base, 4, QLR_LORA_TARGETS_ALL, 41);
    const char *path = save_gguf(l, "prefetch.gguf");
    qlr_registry *r = new_registry(0, 0);
    CHECK_OK(qlr_registry_attach_file(r, "pf", path, 1));
    CHECK_OK(qlr_registry_attach(r, "mem", make_adapter(&g_base, 4, QLR_LORA_TARGETS_ALL, 42)));
    qlr_adapter *a = NULL, *m = NULL;
    CHECK_OK(qlr_registry_acquire(r, "pf", &a));
    CHECK_OK(qlr_registry_acquire(r, "mem", &m));
    CHECK_EQ_INT(qlr_registry_prefetch(r, m), 1);
    qlr_registry_stats s0, s;
    qlr_registry_get_stats(r, &s0);
    int polls = 0;
    while (!qlr_registry_prefetch(r, a) && polls < 20000) {
        usleep(500);
        polls++;
    }
    CHECK_MSG(polls < 20000, "prefetch never finished");
    CHECK_EQ_INT(residency(r, "pf"), QLR_RESIDENCY_HOST);
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.loads, s0.loads + 1);
    const qlr_lora_dev *d = NULL;
    CHECK_OK(qlr_registry_pin(r, a, &d));
    CHECK(d && same_values(l, d));
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.loads, s0.loads + 1); /* the pin read no file */
    qlr_registry_unpin(r, a);
    qlr_registry_release(r, a);
    qlr_registry_release(r, m);
    /* a vanished file: prefetch ends "ready" and the pin names the file */
    qlr_lora *l2 = make_adapter(&g_base, 4, 0x7f, 43);
    const char *gone = save_gguf(l2, "prefetch_gone.gguf");
    qlr_lora_free(l2);
    CHECK_OK(qlr_registry_attach_file(r, "pgone", gone, 1));
    CHECK(unlink(gone) == 0);
    CHECK_OK(qlr_registry_acquire(r, "pgone", &a));
    polls = 0;
    while (!qlr_registry_prefetch(r, a) && polls < 20000) {
        usleep(500);
        polls++;
    }
    CHECK_MSG(polls < 20000, "prefetch of a vanished file never ended");
    CHECK(qlr_registry_pin(r, a, &d) != QLR_OK && d == NULL);
    CHECK_MSG(msg_has("prefetch_gone.gguf"), "%s", qlr_error_msg());
    qlr_registry_release(r, a);
    /* freed with reads queued: the queue's references are dropped first */
    for (int i = 0; i < 8; i++) {
        char nm[16];
        snprintf(nm, sizeof nm, "q%d", i);
        CHECK_OK(qlr_registry_attach_file(r, nm, path, 1));
        CHECK_OK(qlr_registry_acquire(r, nm, &a));
        CHECK_EQ_INT(qlr_registry_prefetch(r, a), 0);
        qlr_registry_release(r, a);
    }
    qlr_registry_free(r);
    qlr_lora_free(l);
}

static void test_device_budget(void) {
    qlr_lora *probe = make_adapter(&g_base, 4, 0x7f, 40);
    uint64_t bytes = probe->n_params * 4; /* every adapter below has this size */
    qlr_lora_free(probe);
    qlr_registry *r = new_registry(3 * bytes, 0);
    const char *names[5] = {"a", "b", "c", "d", "e"};
    for (int i = 0; i < 5; i++)
        CHECK_OK(qlr_registry_attach(r, names[i], make_adapter(&g_base, 4, 0x7f, 41 + i)));
    pin_unpin(r, "a");
    pin_unpin(r, "b");
    pin_unpin(r, "c");
    qlr_registry_stats s;
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.resident, 3);
    CHECK_EQ_INT(s.device_bytes, 3 * bytes);
    CHECK_EQ_INT(s.evictions, 0);
    pin_unpin(r, "a"); /* order of use now b, c, a */
    pin_unpin(r, "d"); /* evicts b */
    CHECK_EQ_INT(residency(r, "b"), QLR_RESIDENCY_HOST);
    CHECK_EQ_INT(residency(r, "a"), QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(residency(r, "c"), QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(residency(r, "d"), QLR_RESIDENCY_DEVICE);
    pin_unpin(r, "e"); /* evicts c */
    CHECK_EQ_INT(residency(r, "c"), QLR_RESIDENCY_HOST);
    pin_unpin(r, "b"); /* evicts a */
    CHECK_EQ_INT(residency(r, "a"), QLR_RESIDENCY_HOST);
    CHECK_EQ_INT(residency(r, "d"), QLR_RESIDENCY_DEVICE);
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.evictions, 3);
    CHECK_EQ_INT(s.resident, 3);
    CHECK(s.device_bytes <= 3 * bytes);
    /* pinned copies are never evicted: hold d (least recent) and e; c must evict b */
    qlr_adapter *ad = NULL, *ae = NULL, *ac = NULL, *aa = NULL;
    const qlr_lora_dev *dd = NULL, *de = NULL, *dc = NULL, *da = NULL;
    CHECK_OK(qlr_registry_acquire(r, "d", &ad));
    CHECK_OK(qlr_registry_acquire(r, "e", &ae));
    CHECK_OK(qlr_registry_pin(r, ad, &dd));
    CHECK_OK(qlr_registry_pin(r, ad, &dd)); /* pins nest */
    qlr_registry_unpin(r, ad);              /* still pinned once */
    CHECK_OK(qlr_registry_pin(r, ae, &de));
    pin_unpin(r, "a"); /* b was least recent among the unpinned (b used before d, e pinned) */
    CHECK_EQ_INT(residency(r, "b"), QLR_RESIDENCY_HOST);
    CHECK_EQ_INT(residency(r, "d"), QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(residency(r, "e"), QLR_RESIDENCY_DEVICE);
    /* three pinned: a fourth cannot fit, nothing is evicted */
    CHECK_OK(qlr_registry_acquire(r, "a", &aa));
    CHECK_OK(qlr_registry_pin(r, aa, &da));
    CHECK_OK(qlr_registry_acquire(r, "c", &ac));
    CHECK(qlr_registry_pin(r, ac, &dc) == QLR_ERR_NOMEM && dc == NULL);
    CHECK_MSG(msg_has("'c'") && msg_has("pinned"), "%s", qlr_error_msg());
    CHECK_EQ_INT(residency(r, "a"), QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(residency(r, "d"), QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(residency(r, "e"), QLR_RESIDENCY_DEVICE);
    CHECK_EQ_INT(residency(r, "c"), QLR_RESIDENCY_HOST);
    /* one unpin makes room again */
    qlr_registry_unpin(r, aa);
    CHECK_OK(qlr_registry_pin(r, ac, &dc));
    CHECK_EQ_INT(residency(r, "a"), QLR_RESIDENCY_HOST);
    qlr_registry_unpin(r, ac);
    qlr_registry_unpin(r, ad);
    qlr_registry_unpin(r, ae);
    qlr_registry_release(r, aa);
    qlr_registry_release(r, ac);
    qlr_registry_release(r, ad);
    qlr_registry_release(r, ae);
    /* an adapter larger than the whole budget */
    CHECK_OK(qlr_registry_attach(r, "big", make_adapter(&g_base, 16, 0x7f, 49)));
    CHECK_OK(qlr_registry_acquire(r, "big", &aa));
    CHECK(qlr_registry_pin(r, aa, &da) == QLR_ERR_NOMEM);
    CHECK_MSG(msg_has("'big'") && msg_has("whole"), "%s", qlr_error_msg());
    qlr_registry_release(r, aa);
    qlr_registry_free(r);
}

/* ---- list, info, stats ---- */

static void test_list(void) {
    qlr_registry *r = new_registry(0, 0);
    qlr_lora *l = make_adapter(&g_base, 6, QLR_LORA_TARGET(QLR_LIN_V), 50);
    const char *p = save_gguf(l, "list.gguf");
    uint64_t np6 = l->n_params;
    qlr_lora_free(l);
    CHECK_OK(qlr_registry_attach(r, "one", make_adapter(&g_base, 4, 0x7f, 51)));
    CHECK_OK(qlr_registry_attach_file(r, "two", p, 1));
    CHECK_OK(qlr_registry_attach(r, "three", make_adapter(&g_base, 8, 0x7f, 52)));
    CHECK_OK(qlr_registry_detach(r, "one"));
    CHECK_OK(qlr_registry_attach(r, "one", make_adapter(&g_base, 4, 0x7f, 53)));
    qlr_adapter_info *v = NULL;
    size_t n = 0;
    CHECK_OK(qlr_registry_list(r, &v, &n));
    CHECK_EQ_INT(n, 3);
    if (n == 3) {
        CHECK(strcmp(v[0].name, "two") == 0 && strcmp(v[1].name, "three") == 0 &&
              strcmp(v[2].name, "one") == 0);
        CHECK_EQ_INT(v[0].r, 6);
        CHECK_EQ_INT(v[0].targets, QLR_LORA_TARGET(QLR_LIN_V));
        CHECK_EQ_INT(v[0].n_params, np6);
        CHECK_EQ_INT(v[0].residency, QLR_RESIDENCY_FILE);
        CHECK(strcmp(v[0].path, p) == 0);
        CHECK_EQ_INT(v[1].r, 8);
        CHECK_EQ_INT(v[1].residency, QLR_RESIDENCY_HOST);
        CHECK_EQ_INT(v[2].refs, 0);
    }
    free(v);
    qlr_registry_stats s;
    qlr_registry_get_stats(r, &s);
    CHECK_EQ_INT(s.attached, 3);
    CHECK_EQ_INT(s.resident, 0);
    CHECK_EQ_INT(s.loads, 1);
    CHECK_EQ_INT(s.evictions, 0);
    qlr_registry *empty = new_registry(0, 0);
    CHECK_OK(qlr_registry_list(empty, &v, &n));
    CHECK(n == 0 && v == NULL);
    qlr_registry_free(empty);
    qlr_registry_free(r);
}

/* ---- forwards through the registry ---- */

enum { FW_N = 4 };

typedef struct fw_ctx {
    qlr_forward *f;
    qlr_kv_cache *kv;
    qlr_adapter_slots *slots;
} fw_ctx;

static void fw_create(fw_ctx *c) {
    CHECK_OK(qlr_forward_create(g_model, FW_N, FW_N, &c->f));
    CHECK_OK(qlr_kv_cache_create(g_model, 1, 16, &c->kv));
    CHECK_OK(qlr_adapter_slots_create(g_be, g_model->cfg.n_layers, 1, &c->slots));
}

static void fw_free(fw_ctx *c) {
    qlr_adapter_slots_free(c->slots);
    qlr_kv_cache_free(c->kv);
    qlr_forward_free(c->f);
}

/* Logits [FW_N, vocab] of a fixed prompt through adapter d (NULL = the base model) into out.
 * Returns the forward's status (no CHECK: called from the concurrency test's thread). */
static qlr_status fw_run(fw_ctx *c, const qlr_lora_dev *d, float *out) {
    static const int32_t tok[FW_N] = {1, 70, 80, 90}, pos[FW_N] = {0, 1, 2, 3},
                         seq[FW_N] = {0, 0, 0, 0};
    const qlr_adapter_set *set = NULL;
    if (d) {
        qlr_adapter_slots_put(c->slots, 0, d, 1.0f);
        QLR_TRY(qlr_adapter_slots_commit(c->slots, 1, &set));
    }
    qlr_batch b = {FW_N, tok, pos, seq, FW_N, NULL, set, NULL};
    float *logits = NULL;
    QLR_TRY(qlr_model_forward(c->f, c->kv, &b, &logits));
    QLR_TRY(g_be->mem.d2h(g_be, out, logits, (size_t)FW_N * g_model->cfg.n_vocab * 4));
    return g_be->mem.sync(g_be);
}

/* Reference logits of adapter l, made without the registry. */
static float *fw_reference(fw_ctx *c, const qlr_lora *l) {
    float *out = malloc((size_t)FW_N * g_model->cfg.n_vocab * 4);
    qlr_lora_dev *d = NULL;
    if (l) CHECK_OK(qlr_lora_dev_create(g_be, l, g_model->cfg.n_layers, 0, &d));
    CHECK_OK(fw_run(c, d, out));
    qlr_lora_dev_free(d);
    return out;
}

static size_t logits_bytes(void) { return (size_t)FW_N * g_model->cfg.n_vocab * 4; }

static void test_forward(void) {
    fw_ctx c;
    fw_create(&c);
    qlr_lora *l = make_adapter(&g_base, 4, 0x7f, 60);
    const char *p = save_gguf(l, "fw.gguf");
    float *ref = fw_reference(&c, l), *base = fw_reference(&c, NULL);
    float *got = malloc(logits_bytes());
    CHECK(memcmp(ref, base, logits_bytes()) != 0); /* the adapter changes the logits */
    qlr_registry *r = new_registry(0, 0);
    CHECK_OK(qlr_registry_attach_file(r, "fw", p, 1));
    qlr_adapter *a = NULL;
    const qlr_lora_dev *d = NULL;
    CHECK_OK(qlr_registry_acquire(r, "fw", &a));
    CHECK_OK(qlr_registry_pin(r, a, &d));
    CHECK_OK(fw_run(&c, d, got));
    CHECK(memcmp(got, ref, logits_bytes()) == 0);
    qlr_registry_unpin(r, a);
    qlr_registry_release(r, a);
    qlr_registry_free(r);
    free(ref), free(base), free(got);
    qlr_lora_free(l);
    fw_free(&c);
}

/* ---- concurrency (issue 11) ---- */

enum { CHURN_CYCLES = 1000 };

typedef struct conc {
    qlr_registry *r;
    fw_ctx fw;
    const float *ref_x, *ref_p, *ref_q; /* X r 6 (never detached), P r 4, Q r 8 */
    atomic_int done;
    atomic_long forwards, churn_forwards, used_after_detach, acquisitions;
    atomic_int failures;
    char first_failure[512]; /* written once by the thread that sets failures to 1 */
} conc;

static void conc_fail(conc *c, const char *what) {
    if (atomic_fetch_add(&c->failures, 1) == 0)
        snprintf(c->first_failure, sizeof c->first_failure, "%s: %s", what, qlr_error_msg());
}

/* The engine thread: look up, pin, forward, check the logits, unpin, release, collect. */
static void *engine_main(void *arg) {
    conc *c = arg;
    float *got = malloc(logits_bytes());
    const char *names[2] = {"x", "churn"};
    while (!atomic_load(&c->done)) {
        for (int k = 0; k < 2; k++) {
            qlr_adapter *a = NULL;
            qlr_status st = qlr_registry_acquire(c->r, names[k], &a);
            if (st == QLR_ERR_NOT_FOUND && k == 1) {
                qlr_error_clear();
                continue;
            }
            if (st != QLR_OK) {
                conc_fail(c, "acquire");
                continue;
            }
            if (k == 1) atomic_fetch_add(&c->acquisitions, 1);
            qlr_adapter_info info;
            qlr_adapter_get_info(c->r, a, &info);
            const float *ref = info.r == 6 ? c->ref_x : info.r == 4 ? c->ref_p
                                                     : info.r == 8 ? c->ref_q : NULL;
            const qlr_lora_dev *d = NULL;
            if (!ref) conc_fail(c, "unexpected rank");
            else if (qlr_registry_pin(c->r, a, &d) != QLR_OK) conc_fail(c, "pin");
            else {
                if (fw_run(&c->fw, d, got) != QLR_OK) conc_fail(c, "forward");
                else if (memcmp(got, ref, logits_bytes()) != 0) conc_fail(c, "logits differ");
                atomic_fetch_add(&c->forwards, 1);
                if (k == 1) {
                    atomic_fetch_add(&c->churn_forwards, 1);
                    qlr_adapter *b = NULL; /* was it detached while we used it? */
                    if (qlr_registry_acquire(c->r, "churn", &b) != QLR_OK) qlr_error_clear();
                    if (b != a) atomic_fetch_add(&c->used_after_detach, 1);
                    qlr_registry_release(c->r, b);
                }
                qlr_registry_unpin(c->r, a);
            }
            qlr_registry_release(c->r, a);
            qlr_registry_collect(c->r);
        }
    }
    free(got);
    return NULL;
}

/* The other thread: attach "churn" (P lazily from GGUF, Q from PEFT, or P in memory) and names
 * of its own, then detach them, CHURN_CYCLES times; usually right after the engine took the
 * adapter, so that detach hits an adapter in use. */
typedef struct churn_args {
    conc *c;
    const char *p_gguf, *q_peft;
} churn_args;

static void *churn_main(void *arg) {
    churn_args *ca = arg;
    conc *c = ca->c;
    char other[64];
    for (int i = 0; i < CHURN_CYCLES && !atomic_load(&c->failures); i++) {
        qlr_status st;
        if (i % 3 == 0) st = qlr_registry_attach_file(c->r, "churn", ca->p_gguf, 1);
        else if (i % 3 == 1) st = qlr_registry_attach_file(c->r, "churn", ca->q_peft, 0);
        else {
            qlr_lora *l = NULL;
            st = make_adapter_st(&g_base, 4, 0x7f, 70, &l); /* p's values, in memory */
            if (st == QLR_OK) st = qlr_registry_attach(c->r, "churn", l);
        }
        if (st != QLR_OK) conc_fail(c, "attach churn");
        snprintf(other, sizeof other, "other-%d", i % 5);
        if (qlr_registry_attach_file(c->r, other, ca->p_gguf, i & 1) != QLR_OK)
            conc_fail(c, "attach other");
        /* wait (a little) for the engine to take "churn", then pull it away */
        long seen = atomic_load(&c->acquisitions);
        for (int w = 0; w < 2000 && atomic_load(&c->acquisitions) == seen; w++) usleep(50);
        if (qlr_registry_detach(c->r, "churn") != QLR_OK) conc_fail(c, "detach churn");
        if (qlr_registry_detach(c->r, other) != QLR_OK) conc_fail(c, "detach other");
        qlr_adapter_info *v = NULL;
        size_t n = 0;
        if (qlr_registry_list(c->r, &v, &n) != QLR_OK) conc_fail(c, "list");
        free(v);
    }
    atomic_store(&c->done, 1);
    return NULL;
}

static void test_concurrency(void) {
    /* make_adapter CHECKs: only on this thread, so build everything first */
    qlr_lora *x = make_adapter(&g_base, 6, 0x7f, 71);
    qlr_lora *p = make_adapter(&g_base, 4, 0x7f, 70);
    qlr_lora *q = make_adapter(&g_base, 8, QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_UP), 72);
    const char *p_gguf = save_gguf(p, "conc_p.gguf");
    const char *q_peft = tmp("conc_q_peft");
    CHECK_OK(qlr_lora_save_peft(q, q_peft));
    static conc c;
    memset(&c, 0, sizeof c);
    fw_create(&c.fw);
    float *ref_x = fw_reference(&c.fw, x), *ref_p = fw_reference(&c.fw, p),
          *ref_q = fw_reference(&c.fw, q), *ref_0 = fw_reference(&c.fw, NULL);
    CHECK(memcmp(ref_x, ref_p, logits_bytes()) && memcmp(ref_p, ref_q, logits_bytes()) &&
          memcmp(ref_q, ref_0, logits_bytes()) && memcmp(ref_x, ref_0, logits_bytes()));
    c.ref_x = ref_x, c.ref_p = ref_p, c.ref_q = ref_q;
    /* a device budget of one adapter (every pin evicts the other) and a host budget of one byte
     * (every file-backed host copy not in use goes back to the file tier) */
    uint64_t big = q->n_params > x->n_params ? q->n_params : x->n_params;
    if (p->n_params > big) big = p->n_params;
    c.r = new_registry(big * 4, 1);
    CHECK_OK(qlr_registry_attach(c.r, "x", x));
    churn_args ca = {&c, p_gguf, q_peft};
    pthread_t te, tc;
    CHECK(pthread_create(&te, NULL, engine_main, &c) == 0);
    CHECK(pthread_create(&tc, NULL, churn_main, &ca) == 0);
    pthread_join(tc, NULL);
    pthread_join(te, NULL);
    long fw = atomic_load(&c.forwards), cf = atomic_load(&c.churn_forwards),
         uad = atomic_load(&c.used_after_detach);
    printf("concurrency: %d attach/detach cycles, %ld forwards (%ld through 'churn', %ld of them "
           "detached while in use)\n", CHURN_CYCLES, fw, cf, uad);
    CHECK_MSG(atomic_load(&c.failures) == 0, "%d failures; first: %s", atomic_load(&c.failures),
              c.first_failure);
    CHECK(cf > 0);
    CHECK(uad > 0); /* the case the test is about did happen */
    qlr_registry_stats s;
    qlr_registry_get_stats(c.r, &s);
    CHECK_EQ_INT(s.attached, 1);
    CHECK(s.evictions > 0);
    CHECK_OK(qlr_registry_detach(c.r, "x"));
    qlr_registry_collect(c.r);
    qlr_registry_get_stats(c.r, &s);
    CHECK_EQ_INT(s.attached, 0);
    CHECK_EQ_INT(s.resident, 0);
    CHECK_EQ_INT(s.device_bytes, 0);
    CHECK_EQ_INT(s.host_bytes, 0);
    qlr_registry_free(c.r);
    fw_free(&c.fw);
    free(ref_x), free(ref_p), free(ref_q), free(ref_0);
    qlr_lora_free(p);
    qlr_lora_free(q);
}

int main(void) {
    test_tmpdir(); /* made once, before any thread */
    const char *mp = tiny_model_write("registry_tiny.gguf");
    CHECK_OK(qlr_backend_create("cpu", 0, &g_be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    if (g_be) CHECK_OK(qlr_model_load(mp, g_be, &lp, &g_model));
    if (!g_model) return test_finish();
    qlr_lora_base_from_config(&g_model->cfg, &g_base);
    test_names();
    test_refs();
    test_refusals();
    test_file_tier();
    test_prefetch();
    test_device_budget();
    test_list();
    test_forward();
    test_concurrency();
    qlr_model_free(g_model);
    qlr_backend_free(g_be);
    return test_finish();
}
