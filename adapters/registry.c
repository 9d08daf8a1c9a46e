/* adapters/registry.c: the registry of named adapters (see registry.h for the contract).
 *
 * One mutex guards every table and every adapter's mutable fields; nothing slow runs under it:
 * files are read (qlr_lora_load) and device copies made or freed with the lock dropped, and
 * adapters / device copies that die under the lock are put on local lists freed after unlock.
 * An adapter in the middle of such work is pinned (pins > 0), so no other thread can evict its
 * host or device copy meanwhile.
 *
 * Lifetime: an adapter lives while it is attached (has its name) or referenced (refs > 0). When
 * both end, its host part is freed by whichever thread ended it, and its device copy goes to the
 * graveyard that the engine thread empties in collect / pin / qlr_registry_free.
 *
 * Budgets: the device budget counts each resident adapter's compute copies, n_params × the
 * backend's act size. On a host-visible f32 backend (the CPU) those copies are the host masters
 * themselves (adapter_dev.h), so there the budget bounds how many adapters are resident rather
 * than freeing memory; the LRU logic is the same on every backend. The host budget counts the
 * fp32 masters (n_params × 4) of file-backed adapters only: in-memory adapters have no file to
 * reload from, so they are never dropped. */
#include "adapters/registry.h"

#include <assert.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

#define LOADERS 4 /* threads reading file-tier adapters for qlr_registry_prefetch */

struct qlr_adapter {
    char name[QLR_ADAPTER_NAME_MAX];  /* immutable after attach */
    char *path;              /* file-backed: the path given to attach; NULL for in-memory */
    qlr_lora *lora;          /* host masters; NULL in the file tier */
    qlr_lora_dev *dev;       /* device copy; NULL when not resident (engine thread only) */
    /* what info reports when the host copy is gone (refreshed at every load) */
    int32_t r;
    uint32_t targets;
    double alpha;
    float scale;
    uint64_t n_params;
    uint64_t dev_bytes;      /* budget figure of the device copy now resident (0 = none) */
    int attached;            /* still under its name */
    int32_t refs;            /* references held by users */
    int32_t pins;            /* nested pins (plus one during a pin's work) */
    uint64_t uses;           /* acquisitions since attach */
    uint64_t last_dev;       /* tick of the last pin / unpin: device LRU */
    uint64_t last_host;      /* tick of the last acquire / pin / unpin: host LRU */
    qlr_adapter *prev, *next;   /* the registry's list of live adapters, attach order */
    qlr_adapter *grave_next;    /* dead adapters: the graveyard, or a local list to free */
    int loading;             /* queued for or in the loader thread (qlr_registry_prefetch) */
    int load_failed;         /* the last prefetch could not read it: pin reports why */
    qlr_adapter *load_next;  /* the loader's queue */
};

struct qlr_registry {
    qlr_backend *be;
    int32_t n_layers;
    qlr_lora_base base;
    qlr_registry_params p;
    pthread_mutex_t mu;
    qlr_adapter *head, *tail;   /* live adapters (attached, or detached but referenced) */
    qlr_adapter *graveyard;     /* dead adapters whose device copy waits for the engine thread */
    uint64_t tick;
    size_t n_attached, n_resident;
    uint64_t device_bytes;      /* resident copies + graveyard */
    uint64_t host_bytes;        /* every host master */
    uint64_t host_file_bytes;   /* host masters of file-backed adapters (the host budget) */
    uint64_t evictions, loads;
    /* the loader threads of qlr_registry_prefetch: file tier -> host masters, off the engine
     * thread */
    pthread_t loader[LOADERS];
    int loader_started, loader_stop; /* threads started (started on first use) */
    pthread_cond_t loader_cv;
    qlr_adapter *load_head, *load_tail;
};

/* ---- helpers (the caller holds r->mu where it says "_locked") ---- */

static uint64_t dev_cost(const qlr_registry *r, uint64_t n_params) {
    return n_params * (uint64_t)qlr_backend_act_size(r->be);
}

static void lock(qlr_registry *r) { pthread_mutex_lock(&r->mu); }
static void unlock(qlr_registry *r) { pthread_mutex_unlock(&r->mu); }

/* Copies `name` into buf for a message: at most 40 bytes, non-printable bytes as '?'. */
static const char *printable(const char *name, char *buf, size_t n) {
    size_t i = 0;
    for (; name[i] && i < 40 && i + 1 < n; i++)
        buf[i] = (name[i] >= 0x20 && name[i] < 0x7f) ? name[i] : '?';
    buf[i] = 0;
    if (name[i] && i + 4 < n) memcpy(buf + i, "...", 4);
    return buf;
}

static qlr_status name_check(const char *name) {
    char pb[64];
    if (!name || !name[0]) return qlr_errorf(QLR_ERR_INVALID, "adapter name is empty");
    size_t len = strnlen(name, QLR_ADAPTER_NAME_MAX);
    if (len >= QLR_ADAPTER_NAME_MAX)
        return qlr_errorf(QLR_ERR_INVALID, "adapter name '%s' is too long: at most %d bytes",
                          printable(name, pb, sizeof pb), QLR_ADAPTER_NAME_MAX - 1);
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '.' || c == '_' || c == ':' || c == '/' || c == '-';
        if (!ok)
            return qlr_errorf(QLR_ERR_INVALID,
                              "adapter name '%s': byte %zu (0x%02x) is not allowed (use letters, "
                              "digits and . _ : / -)", printable(name, pb, sizeof pb), i,
                              (unsigned)(unsigned char)c);
    }
    return QLR_OK;
}

static qlr_adapter *find_locked(qlr_registry *r, const char *name) {
    for (qlr_adapter *a = r->head; a; a = a->next)
        if (a->attached && strcmp(a->name, name) == 0) return a;
    return NULL;
}

static qlr_status taken_locked(qlr_registry *r, const char *name) {
    if (!find_locked(r, name)) return QLR_OK;
    return qlr_errorf(QLR_ERR_INVALID, "adapter name '%s' is already attached (detach it first)",
                      name);
}

static void set_meta(qlr_adapter *a, const qlr_lora *l) {
    a->r = l->r;
    a->targets = l->targets;
    a->alpha = l->alpha;
    a->scale = l->scale;
    a->n_params = l->n_params;
}

static uint64_t host_cost(const qlr_lora *l) { return l->n_params * 4; }

/* Accounts for a->lora = l (l not NULL, a->lora NULL). */
static void host_add_locked(qlr_registry *r, qlr_adapter *a, qlr_lora *l) {
    a->lora = l;
    set_meta(a, l);
    r->host_bytes += host_cost(l);
    if (a->path) r->host_file_bytes += host_cost(l);
}

/* Takes a's host copy out of the books; returns it for the caller to free after unlock. */
static qlr_lora *host_take_locked(qlr_registry *r, qlr_adapter *a) {
    qlr_lora *l = a->lora;
    if (!l) return NULL;
    r->host_bytes -= host_cost(l);
    if (a->path) r->host_file_bytes -= host_cost(l);
    a->lora = NULL;
    return l;
}

/* Whether a's host copy may be dropped now: file-backed, not in use by a pin, and not the memory
 * of its own device copy (aliased compute copies on a host-visible f32 backend). */
static int host_droppable(const qlr_adapter *a) {
    return a->path && a->lora && a->pins == 0 && (!a->dev || !a->dev->aliased);
}

/* Host copies taken out under the lock, freed after it. */
typedef struct lora_list {
    qlr_lora **v;
    size_t n, cap;
} lora_list;

static void lora_list_push(lora_list *ll, qlr_lora *l) {
    if (!l) return;
    if (ll->n == ll->cap) {
        size_t cap = ll->cap ? 2 * ll->cap : 8;
        qlr_lora **v = realloc(ll->v, cap * sizeof *v);
        if (!v) { /* cannot defer it: free it now (host memory only, so legal under the lock) */
            qlr_lora_free(l);
            return;
        }
        ll->v = v;
        ll->cap = cap;
    }
    ll->v[ll->n++] = l;
}

static void lora_list_free(lora_list *ll) {
    for (size_t i = 0; i < ll->n; i++) qlr_lora_free(ll->v[i]);
    free(ll->v);
    memset(ll, 0, sizeof *ll);
}

/* Drops least recently used host copies of file-backed adapters until the host budget holds
 * (or nothing else may go). */
static void host_enforce_locked(qlr_registry *r, lora_list *freed) {
    if (!r->p.host_budget) return;
    while (r->host_file_bytes > r->p.host_budget) {
        qlr_adapter *v = NULL;
        for (qlr_adapter *a = r->head; a; a = a->next)
            if (host_droppable(a) && (!v || a->last_host < v->last_host)) v = a;
        if (!v) return;
        lora_list_push(freed, host_take_locked(r, v));
    }
}

/* Unlinks a dead adapter (not attached, no references): its host copy joins *freed; with a
 * device copy it goes to the graveyard (the engine thread frees it), else onto *dead for the
 * caller to free after unlock. */
static void bury_locked(qlr_registry *r, qlr_adapter *a, lora_list *freed, qlr_adapter **dead) {
    QLR_ASSERT(!a->attached && a->refs == 0);
    QLR_ASSERT(a->pins == 0); /* a pin needs a reference: unpin before the last release */
    if (a->prev) a->prev->next = a->next;
    else r->head = a->next;
    if (a->next) a->next->prev = a->prev;
    else r->tail = a->prev;
    a->prev = a->next = NULL;
    lora_list_push(freed, host_take_locked(r, a));
    if (a->dev) {
        r->n_resident--;
        a->grave_next = r->graveyard;
        r->graveyard = a;
    } else {
        a->grave_next = *dead;
        *dead = a;
    }
}

/* Frees a chain of dead adapters (their device copies too: engine thread when there are any). */
static void free_adapters(qlr_adapter *dead) {
    while (dead) {
        qlr_adapter *n = dead->grave_next;
        qlr_lora_dev_free(dead->dev);
        free(dead->path);
        free(dead);
        dead = n;
    }
}

/* Empties the graveyard into a chain for free_adapters (engine thread). */
static qlr_adapter *take_graveyard_locked(qlr_registry *r) {
    qlr_adapter *g = r->graveyard;
    r->graveyard = NULL;
    for (qlr_adapter *a = g; a; a = a->grave_next) r->device_bytes -= a->dev_bytes;
    return g;
}

/* ---- lifetime ---- */

qlr_registry_params qlr_registry_params_default(void) {
    qlr_registry_params p = {0, 0, 0, NULL};
    return p;
}

qlr_status qlr_registry_create(qlr_backend *be, const qlr_model_config *cfg,
                               const qlr_registry_params *p, qlr_registry **out) {
    *out = NULL;
    QLR_ASSERT(be && cfg);
    qlr_registry *r = calloc(1, sizeof *r);
    if (!r) return qlr_errorf(QLR_ERR_NOMEM, "adapter registry");
    if (pthread_mutex_init(&r->mu, NULL) != 0) {
        free(r);
        return qlr_errorf(QLR_ERR_NOMEM, "adapter registry: cannot create its mutex");
    }
    if (pthread_cond_init(&r->loader_cv, NULL) != 0) {
        pthread_mutex_destroy(&r->mu);
        free(r);
        return qlr_errorf(QLR_ERR_NOMEM, "adapter registry: cannot create its condition variable");
    }
    r->be = be;
    r->n_layers = cfg->n_layers;
    qlr_lora_base_from_config(cfg, &r->base);
    r->p = p ? *p : qlr_registry_params_default();
    r->base.nf4_hash = r->p.base_nf4_hash;
    if (r->p.base_name) snprintf(r->base.name, sizeof r->base.name, "%s", r->p.base_name);
    r->p.base_name = NULL; /* copied: the caller's string need not outlive the call */
    *out = r;
    return QLR_OK;
}

void qlr_registry_free(qlr_registry *r) {
    if (!r) return;
    if (r->loader_started) { /* it drops its queue's references before it ends */
        lock(r);
        r->loader_stop = 1;
        pthread_cond_broadcast(&r->loader_cv);
        unlock(r);
        for (int i = 0; i < r->loader_started; i++) pthread_join(r->loader[i], NULL);
    }
    pthread_cond_destroy(&r->loader_cv);
    qlr_registry_collect(r);
    for (qlr_adapter *a = r->head, *n; a; a = n) {
        n = a->next;
        assert(a->refs == 0 && a->pins == 0); /* references outlive the registry: a bug */
        qlr_lora_dev_free(a->dev);
        qlr_lora_free(a->lora);
        free(a->path);
        free(a);
    }
    pthread_mutex_destroy(&r->mu);
    free(r);
}

/* ---- attach / detach ---- */

/* Inserts a new adapter under `name` unless the name was taken meanwhile. `l` gives the
 * metadata; it becomes the host copy when `keep`, else it is freed (file tier). Takes ownership
 * of l and path. */
static qlr_status insert(qlr_registry *r, const char *name, char *path, qlr_lora *l, int keep) {
    qlr_adapter *a = calloc(1, sizeof *a);
    if (!a) {
        qlr_lora_free(l);
        free(path);
        return qlr_errorf(QLR_ERR_NOMEM, "adapter '%s'", name);
    }
    snprintf(a->name, sizeof a->name, "%s", name);
    a->path = path;
    a->attached = 1;
    set_meta(a, l);
    if (!keep) {
        qlr_lora_free(l);
        l = NULL;
    }
    lora_list freed = {0};
    lock(r);
    qlr_status st = taken_locked(r, name);
    if (st == QLR_OK) {
        a->last_host = ++r->tick;
        if (l) host_add_locked(r, a, l);
        a->prev = r->tail;
        if (r->tail) r->tail->next = a;
        else r->head = a;
        r->tail = a;
        r->n_attached++;
        host_enforce_locked(r, &freed);
    }
    unlock(r);
    lora_list_free(&freed);
    if (st != QLR_OK) {
        qlr_lora_free(l);
        free(path);
        free(a);
    }
    return st;
}

qlr_status qlr_registry_attach(qlr_registry *r, const char *name, qlr_lora *l) {
    QLR_ASSERT(l);
    qlr_status st = name_check(name);
    if (st == QLR_OK) {
        char src[QLR_ADAPTER_NAME_MAX + 16];
        snprintf(src, sizeof src, "adapter '%s'", name);
        st = qlr_lora_check_base(l, &r->base, src);
    }
    if (st != QLR_OK) {
        qlr_lora_free(l);
        return st;
    }
    return insert(r, name, NULL, l, 1);
}

qlr_status qlr_registry_attach_file(qlr_registry *r, const char *name, const char *path,
                                    int lazy) {
    QLR_TRY(name_check(name));
    if (!path || !path[0]) return qlr_errorf(QLR_ERR_INVALID, "adapter '%s': empty path", name);
    lock(r); /* an early answer for a taken name before reading a big file */
    qlr_status st = taken_locked(r, name);
    unlock(r);
    QLR_TRY(st);
    /* the resolved path is what a later load reads: a run folder that gains a checkpoint after
     * attach must not change the adapter under its name */
    char *resolved = NULL;
    int is_gguf = 0;
    qlr_lora *l = NULL;
    st = qlr_lora_resolve(path, &resolved, &is_gguf);
    if (st == QLR_OK) st = qlr_lora_load(resolved, &r->base, &l); /* outside the lock */
    if (st != QLR_OK) {
        free(resolved);
        return qlr_error_prefix("attaching adapter '%s'", name);
    }
    lock(r);
    r->loads++;
    unlock(r);
    return insert(r, name, resolved, l, !lazy);
}

qlr_status qlr_registry_detach(qlr_registry *r, const char *name) {
    lora_list freed = {0};
    qlr_adapter *dead = NULL;
    lock(r);
    qlr_adapter *a = name ? find_locked(r, name) : NULL;
    if (a) {
        a->attached = 0;
        r->n_attached--;
        if (a->refs == 0) bury_locked(r, a, &freed, &dead);
    }
    unlock(r);
    lora_list_free(&freed);
    free_adapters(dead);
    if (!a)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "no adapter named '%s' is attached",
                          name ? name : "(null)");
    return QLR_OK;
}

/* ---- references ---- */

qlr_status qlr_registry_acquire(qlr_registry *r, const char *name, qlr_adapter **out) {
    *out = NULL;
    lock(r);
    qlr_adapter *a = name ? find_locked(r, name) : NULL;
    if (a) {
        a->refs++;
        a->uses++;
        a->last_host = ++r->tick;
    }
    unlock(r);
    if (!a)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "no adapter named '%s' is attached",
                          name ? name : "(null)");
    *out = a;
    return QLR_OK;
}

void qlr_registry_retain(qlr_registry *r, qlr_adapter *a) {
    lock(r);
    QLR_ASSERT(a->refs > 0); /* retain is for an adapter already held */
    a->refs++;
    unlock(r);
}

void qlr_registry_release(qlr_registry *r, qlr_adapter *a) {
    if (!a) return;
    lora_list freed = {0};
    qlr_adapter *dead = NULL;
    lock(r);
    QLR_ASSERT(a->refs > 0);
    if (--a->refs == 0 && !a->attached) bury_locked(r, a, &freed, &dead);
    unlock(r);
    lora_list_free(&freed);
    free_adapters(dead);
}

/* ---- device residency (engine thread) ---- */

void qlr_registry_collect(qlr_registry *r) {
    lock(r);
    qlr_adapter *g = take_graveyard_locked(r);
    unlock(r);
    free_adapters(g);
}

/* Makes room for `need` bytes under the device budget by evicting least recently used unpinned
 * copies (into *evicted, freed by the caller after unlock). QLR_ERR_NOMEM, evicting nothing,
 * when even evicting every unpinned copy would not do. */
static qlr_status dev_make_room_locked(qlr_registry *r, const qlr_adapter *for_a, uint64_t need,
                                       qlr_lora_dev ***evicted, size_t *n_evicted) {
    uint64_t budget = r->p.device_budget;
    *evicted = NULL;
    *n_evicted = 0;
    if (!budget || r->device_bytes + need <= budget) return QLR_OK;
    if (need > budget)
        return qlr_errorf(QLR_ERR_NOMEM,
                          "adapter '%s': its device copy needs %llu bytes, more than the whole "
                          "adapter device budget (%llu bytes)", for_a->name,
                          (unsigned long long)need, (unsigned long long)budget);
    uint64_t freeable = 0;
    size_t cand = 0, pinned = 0;
    for (qlr_adapter *a = r->head; a; a = a->next)
        if (a->dev) {
            if (a->pins == 0) freeable += a->dev_bytes, cand++;
            else pinned++;
        }
    if (r->device_bytes - freeable + need > budget)
        return qlr_errorf(QLR_ERR_NOMEM,
                          "adapter '%s': its device copy needs %llu bytes, but the adapter device "
                          "budget of %llu bytes holds %llu bytes of %zu pinned adapter(s) (in use "
                          "by running requests): raise the budget or retry when they finish",
                          for_a->name, (unsigned long long)need, (unsigned long long)budget,
                          (unsigned long long)(r->device_bytes - freeable), pinned);
    qlr_lora_dev **v = malloc((cand ? cand : 1) * sizeof *v);
    if (!v) return qlr_errorf(QLR_ERR_NOMEM, "adapter registry: eviction list");
    size_t n = 0;
    while (r->device_bytes + need > budget) {
        qlr_adapter *victim = NULL;
        for (qlr_adapter *a = r->head; a; a = a->next)
            if (a->dev && a->pins == 0 && (!victim || a->last_dev < victim->last_dev)) victim = a;
        QLR_ASSERT(victim); /* the sum above said enough is freeable */
        v[n++] = victim->dev;
        r->device_bytes -= victim->dev_bytes;
        r->n_resident--;
        r->evictions++;
        victim->dev = NULL;
        victim->dev_bytes = 0;
    }
    *evicted = v;
    *n_evicted = n;
    return QLR_OK;
}

static void free_devs(qlr_lora_dev **v, size_t n) {
    for (size_t i = 0; i < n; i++) qlr_lora_dev_free(v[i]);
    free(v);
}

qlr_status qlr_registry_pin(qlr_registry *r, qlr_adapter *a, const qlr_lora_dev **dev) {
    *dev = NULL;
    lock(r);
    QLR_ASSERT(a->refs > 0); /* pin an adapter you hold */
    a->pins++; /* from here on nobody evicts a's host or device copy */
    a->last_dev = a->last_host = ++r->tick;
    qlr_adapter *graves = take_graveyard_locked(r);
    if (a->dev) {
        *dev = a->dev;
        unlock(r);
        free_adapters(graves);
        return QLR_OK;
    }
    qlr_status st = QLR_OK;
    lora_list freed = {0};
    qlr_lora *l = a->lora;
    if (!l) { /* file tier: read it again, outside the lock */
        char *path = strdup(a->path);
        unlock(r);
        free_adapters(graves);
        graves = NULL;
        if (!path) st = qlr_errorf(QLR_ERR_NOMEM, "adapter '%s'", a->name);
        else if ((st = qlr_lora_load(path, &r->base, &l)) != QLR_OK)
            qlr_error_prefix("adapter '%s' can no longer be loaded", a->name);
        free(path);
        lock(r);
        if (st == QLR_OK) {
            r->loads++;
            host_add_locked(r, a, l);
            host_enforce_locked(r, &freed); /* a is pinned: it stays */
        }
    }
    qlr_lora_dev **evicted = NULL;
    size_t n_evicted = 0;
    uint64_t need = 0;
    if (st == QLR_OK) {
        need = dev_cost(r, l->n_params);
        st = dev_make_room_locked(r, a, need, &evicted, &n_evicted);
    }
    uint64_t reserved = st == QLR_OK ? need : 0;
    r->device_bytes += reserved; /* reserved while the copy is made */
    /* a copy evicted on a host-visible backend leaves its host masters droppable */
    if (n_evicted) host_enforce_locked(r, &freed);
    unlock(r);
    free_adapters(graves);
    free_devs(evicted, n_evicted);
    lora_list_free(&freed);

    qlr_lora_dev *d = NULL;
    if (st == QLR_OK) { /* l stays: a is pinned */
        st = qlr_lora_dev_create(r->be, l, r->n_layers, 0, &d);
        if (st != QLR_OK) qlr_error_prefix("adapter '%s'", a->name);
    }
    lock(r);
    if (st == QLR_OK) {
        a->dev = d;
        a->dev_bytes = need;
        r->n_resident++;
        *dev = d;
    } else {
        r->device_bytes -= reserved;
        a->pins--;
    }
    unlock(r);
    return st;
}

/* ---- prefetch: the loader thread ---- */

static void *loader_main(void *arg) {
    qlr_registry *r = arg;
    lock(r);
    for (;;) {
        while (!r->load_head && !r->loader_stop) pthread_cond_wait(&r->loader_cv, &r->mu);
        qlr_adapter *a = r->load_head;
        if (!a) break; /* stopping with an empty queue */
        r->load_head = a->load_next;
        if (!r->load_head) r->load_tail = NULL;
        a->load_next = NULL;
        qlr_lora *l = NULL;
        lora_list freed = {0};
        if (!r->loader_stop && !a->lora && !a->dev && a->attached && a->path) {
            char *path = strdup(a->path);
            unlock(r);
            qlr_status st = path ? qlr_lora_load(path, &r->base, &l) : QLR_ERR_NOMEM;
            if (st != QLR_OK) {
                QLR_LOGW("adapter '%s': prefetch from %s failed: %s", a->name, path ? path : "?",
                         qlr_error_msg());
                qlr_error_clear();
            }
            free(path);
            lock(r);
            a->load_failed = st != QLR_OK;
            if (st == QLR_OK && !a->lora) {
                r->loads++;
                a->last_host = ++r->tick;
                host_add_locked(r, a, l);
                host_enforce_locked(r, &freed);
                l = NULL;
            }
        }
        a->loading = 0;
        unlock(r);
        qlr_lora_free(l); /* a pin loaded it meanwhile */
        lora_list_free(&freed);
        qlr_registry_release(r, a); /* the queue's reference */
        lock(r);
    }
    unlock(r);
    return NULL;
}

int qlr_registry_prefetch(qlr_registry *r, qlr_adapter *a) {
    lock(r);
    QLR_ASSERT(a->refs > 0); /* prefetch an adapter you hold */
    int ready = a->lora || a->dev || !a->path;
    if (!ready && a->load_failed && !a->loading) {
        a->load_failed = 0; /* pin reads it and reports why; a later prefetch tries again */
        ready = 1;
    }
    if (!ready && !a->loading && !r->loader_stop) {
        while (r->loader_started < LOADERS &&
               pthread_create(&r->loader[r->loader_started], NULL, loader_main, r) == 0)
            r->loader_started++;
        if (!r->loader_started) {
            unlock(r);
            return 1; /* no thread: pin loads it on the caller's thread, as before */
        }
        a->loading = 1;
        a->refs++;
        if (r->load_tail) r->load_tail->load_next = a;
        else r->load_head = a;
        r->load_tail = a;
        pthread_cond_signal(&r->loader_cv);
    }
    unlock(r);
    return ready;
}

void qlr_registry_unpin(qlr_registry *r, qlr_adapter *a) {
    lora_list freed = {0};
    lock(r);
    QLR_ASSERT(a->pins > 0);
    a->pins--;
    a->last_dev = a->last_host = ++r->tick;
    host_enforce_locked(r, &freed); /* its host copy may be droppable now */
    unlock(r);
    lora_list_free(&freed);
}

/* ---- what is attached ---- */

const char *qlr_adapter_name(const qlr_adapter *a) { return a->name; }

static void info_locked(const qlr_adapter *a, qlr_adapter_info *o) {
    memset(o, 0, sizeof *o);
    snprintf(o->name, sizeof o->name, "%s", a->name);
    snprintf(o->path, sizeof o->path, "%s", a->path ? a->path : "");
    o->r = a->r;
    o->targets = a->targets;
    o->alpha = a->alpha;
    o->scale = a->scale;
    o->n_params = a->n_params;
    o->residency = a->dev ? QLR_RESIDENCY_DEVICE : a->lora ? QLR_RESIDENCY_HOST
                                                           : QLR_RESIDENCY_FILE;
    o->refs = a->refs;
    o->uses = a->uses;
    o->device_bytes = a->dev_bytes;
}

void qlr_adapter_get_info(qlr_registry *r, const qlr_adapter *a, qlr_adapter_info *out) {
    lock(r);
    info_locked(a, out);
    unlock(r);
}

qlr_status qlr_registry_list(qlr_registry *r, qlr_adapter_info **out, size_t *n) {
    *out = NULL;
    *n = 0;
    lock(r);
    size_t cnt = r->n_attached;
    qlr_adapter_info *v = cnt ? malloc(cnt * sizeof *v) : NULL;
    if (cnt && !v) {
        unlock(r);
        return qlr_errorf(QLR_ERR_NOMEM, "adapter list (%zu adapters)", cnt);
    }
    size_t i = 0;
    for (qlr_adapter *a = r->head; a; a = a->next)
        if (a->attached) info_locked(a, &v[i++]);
    unlock(r);
    QLR_ASSERT(i == cnt);
    *out = v;
    *n = cnt;
    return QLR_OK;
}

void qlr_registry_get_stats(qlr_registry *r, qlr_registry_stats *s) {
    lock(r);
    s->attached = r->n_attached;
    s->resident = r->n_resident;
    s->device_bytes = r->device_bytes;
    s->host_bytes = r->host_bytes;
    s->evictions = r->evictions;
    s->loads = r->loads;
    unlock(r);
}
