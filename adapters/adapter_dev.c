/* adapters/adapter_dev.c: an adapter's device side (compute copies; masters and gradients when
 * trainable) and the slot tables behind a model's qlr_adapter_set (see adapter_dev.h).
 *
 * Layout: the compute copies, the device masters and the gradients all follow the host
 * qlr_lora's block layout (module by module in (layer, linear) order, A [r, in] then B [out, r]),
 * so one f32_to_act call refreshes every compute copy and one copy moves every master. */
#include "adapters/adapter_dev.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"

static int masters_alias(qlr_device_traits dt) { return dt.host_visible; }
static int compute_alias(qlr_device_traits dt, int trainable) {
    return dt.act_dtype == QLR_F32 && (dt.host_visible || trainable);
}

/* The three buffers' sizes in bytes (0 = aliased, not allocated). */
static void dev_sizes(qlr_device_traits dt, uint64_t n, int trainable, uint64_t sz[3]) {
    uint64_t m = n ? n : 1;
    sz[0] = trainable && !masters_alias(dt) ? m * 4 : 0;                    /* masters */
    sz[1] = trainable ? m * 4 : 0;                                           /* gradients */
    sz[2] = compute_alias(dt, trainable) ? 0 : m * qlr_dtype_size(dt.act_dtype); /* compute */
}

void qlr_lora_dev_items(qlr_device_traits dt, uint64_t n_params, int trainable, qlr_mem_item_fn fn,
                        void *ud) {
    static const char *names[3] = {"LoRA A/B fp32 masters", "LoRA A/B fp32 gradients",
                                   "LoRA A/B compute copies"};
    uint64_t sz[3];
    dev_sizes(dt, n_params, trainable, sz);
    for (int i = 0; i < 3; i++)
        if (sz[i]) fn(ud, "adapter", names[i], 1, sz[i]);
}

/* Offsets of module k's A within the block (floats), or -1 when absent. */
static int64_t module_offset(const qlr_lora *l, size_t k) {
    const qlr_lora_module *m = &l->mods[k];
    return m->a ? (int64_t)(m->a - l->block) : -1;
}

qlr_status qlr_lora_dev_create(qlr_backend *be, const qlr_lora *l, int32_t n_layers, int trainable,
                               qlr_lora_dev **out) {
    *out = NULL;
    qlr_lora_dev *d = calloc(1, sizeof *d);
    size_t nslots = (size_t)n_layers * QLR_LIN_COUNT;
    if (!d) return qlr_errorf(QLR_ERR_NOMEM, "adapter device copy");
    d->be = be;
    d->n_layers = n_layers;
    d->r = l->r;
    d->trainable = trainable;
    d->n_params = l->n_params;
    d->mods = calloc(nslots, sizeof *d->mods);
    d->da = calloc(nslots, sizeof *d->da);
    d->db = calloc(nslots, sizeof *d->db);
    if (!d->mods || !d->da || !d->db) {
        qlr_lora_dev_free(d);
        return qlr_errorf(QLR_ERR_NOMEM, "adapter device copy");
    }
    qlr_device_traits dt = qlr_device_traits_of(be);
    uint64_t sz[3];
    dev_sizes(dt, l->n_params, trainable, sz);
    if (trainable) {
        d->master = sz[0] ? be->mem.alloc(be, (size_t)sz[0]) : l->block;
        d->grad = be->mem.alloc(be, (size_t)sz[1]);
        if (!d->master || !d->grad) {
            qlr_lora_dev_free(d);
            return qlr_error_prefix("adapter masters and gradients (%llu bytes)",
                                    (unsigned long long)(sz[0] + sz[1]));
        }
    }
    d->aliased = compute_alias(dt, trainable);
    if (sz[2]) {
        d->compute = be->mem.alloc(be, (size_t)sz[2]);
        if (!d->compute) {
            qlr_lora_dev_free(d);
            return qlr_error_prefix("adapter compute copies (%llu bytes)", (unsigned long long)sz[2]);
        }
    }
    d->device_bytes = sz[0] + sz[1] + sz[2];
    size_t esz = qlr_dtype_size(be->act_dtype), alloc_n = l->n_params ? (size_t)l->n_params : 1;
    /* aliased compute copies are the device masters (trainable) or the host masters */
    char *cbase = d->aliased ? (char *)(trainable ? d->master : l->block) : (char *)d->compute;
    size_t cesz = d->aliased ? 4 : esz;
    for (int32_t li = 0; li < n_layers && li < l->base.n_layers; li++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            size_t k = (size_t)li * QLR_LIN_COUNT + (size_t)i;
            int64_t off = module_offset(l, k);
            if (off < 0) continue;
            const qlr_lora_module *m = &l->mods[k];
            int64_t boff = off + (int64_t)l->r * m->in;
            d->mods[k].a = cbase + (size_t)off * cesz;
            d->mods[k].b = cbase + (size_t)boff * cesz;
            d->mods[k].r = l->r;
            d->mods[k].scale = l->scale;
            if (trainable) {
                d->da[k] = d->grad + off;
                d->db[k] = d->grad + boff;
            }
        }
    qlr_status st = qlr_lora_dev_upload(d, l);
    if (st == QLR_OK && trainable) st = be->mem.memset0(be, d->grad, alloc_n * 4);
    if (st) {
        qlr_lora_dev_free(d);
        return st;
    }
    *out = d;
    return QLR_OK;
}

void qlr_lora_dev_free(qlr_lora_dev *d) {
    if (!d) return;
    qlr_backend *be = d->be;
    if (d->master && !masters_alias(qlr_device_traits_of(be))) be->mem.free(be, d->master);
    if (d->grad) be->mem.free(be, d->grad);
    if (d->compute) be->mem.free(be, d->compute);
    free(d->mods);
    free(d->da);
    free(d->db);
    free(d);
}

qlr_status qlr_lora_dev_upload(qlr_lora_dev *d, const qlr_lora *l) {
    QLR_ASSERT(l->n_params == d->n_params);
    qlr_backend *be = d->be;
    if (!l->n_params) return QLR_OK;
    if (d->trainable && d->master != l->block) {
        QLR_TRY(be->mem.h2d(be, d->master, l->block, (size_t)l->n_params * 4));
        return qlr_lora_dev_refresh(d);
    }
    if (d->aliased) return QLR_OK;
    return qlr_backend_upload_act(be, d->compute, l->block, (int64_t)l->n_params);
}

qlr_status qlr_lora_dev_refresh(qlr_lora_dev *d) {
    if (d->aliased || !d->trainable || !d->n_params) return QLR_OK;
    qlr_backend *be = d->be;
    if (!be->ops.f32_to_act)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "the %s backend has no 'f32_to_act' op: training "
                          "needs it", be->name);
    return be->ops.f32_to_act(be, d->compute, d->master, (int64_t)d->n_params);
}

qlr_status qlr_lora_dev_download(qlr_lora_dev *d, qlr_lora *l) {
    QLR_ASSERT(l->n_params == d->n_params);
    if (!d->trainable || d->master == l->block || !l->n_params) return QLR_OK;
    QLR_TRY(d->be->mem.d2h(d->be, l->block, d->master, (size_t)l->n_params * 4));
    return d->be->mem.sync(d->be);
}

/* ------------------------------------------------------------------ slot tables */

struct qlr_adapter_slots {
    qlr_backend *be;
    int32_t n_layers, cap;
    const qlr_lora_dev **dev;  /* [cap] */
    float *scale;              /* [cap] */
    qlr_lora_ref *host;        /* [n_layers * 7 * cap] */
    qlr_lora_ref *devtab;      /* device copy (== host when host-visible) */
    qlr_adapter_set set;
};

qlr_status qlr_adapter_slots_create(qlr_backend *be, int32_t n_layers, int32_t cap_slots,
                                    qlr_adapter_slots **out) {
    *out = NULL;
    if (cap_slots < 1 || n_layers < 1)
        return qlr_errorf(QLR_ERR_INVALID, "adapter slots: %d slots for %d layers", cap_slots,
                          n_layers);
    qlr_adapter_slots *t = calloc(1, sizeof *t);
    if (!t) return qlr_errorf(QLR_ERR_NOMEM, "adapter slots");
    size_t rows = (size_t)n_layers * QLR_LIN_COUNT, bytes = rows * (size_t)cap_slots * sizeof(qlr_lora_ref);
    t->be = be;
    t->n_layers = n_layers;
    t->cap = cap_slots;
    t->dev = calloc((size_t)cap_slots, sizeof *t->dev);
    t->scale = calloc((size_t)cap_slots, sizeof *t->scale);
    t->host = calloc(1, bytes);
    t->devtab = be->host_visible ? t->host : be->mem.alloc(be, bytes);
    if (!t->dev || !t->scale || !t->host || !t->devtab) {
        qlr_status st = t->host && !t->devtab ? qlr_error_status() : qlr_errorf(QLR_ERR_NOMEM, "adapter slots");
        qlr_adapter_slots_free(t);
        return st;
    }
    *out = t;
    return QLR_OK;
}

void qlr_adapter_slots_free(qlr_adapter_slots *t) {
    if (!t) return;
    if (t->devtab && t->devtab != t->host) t->be->mem.free(t->be, t->devtab);
    free(t->dev);
    free(t->scale);
    free(t->host);
    free(t);
}

void qlr_adapter_slots_put(qlr_adapter_slots *t, int32_t s, const qlr_lora_dev *d, float scale) {
    QLR_ASSERT(s >= 0 && s < t->cap);
    QLR_ASSERT(!d || d->be == t->be);
    t->dev[s] = d;
    t->scale[s] = scale;
}

qlr_status qlr_adapter_slots_commit(qlr_adapter_slots *t, int32_t n_slots,
                                    const qlr_adapter_set **set) {
    QLR_ASSERT(n_slots >= 1 && n_slots <= t->cap);
    int32_t max_r = 0;
    size_t rows = (size_t)t->n_layers * QLR_LIN_COUNT;
    for (size_t k = 0; k < rows; k++)
        for (int32_t s = 0; s < n_slots; s++) {
            qlr_lora_ref *e = &t->host[k * (size_t)n_slots + (size_t)s];
            const qlr_lora_dev *d = t->dev[s];
            memset(e, 0, sizeof *e);
            if (!d || (int32_t)(k / QLR_LIN_COUNT) >= d->n_layers || d->mods[k].r <= 0) continue;
            *e = d->mods[k];
            e->scale = d->mods[k].scale * t->scale[s];
            if (e->r > max_r) max_r = e->r;
        }
    if (t->devtab != t->host)
        QLR_TRY(t->be->mem.h2d(t->be, t->devtab, t->host, rows * (size_t)n_slots * sizeof(qlr_lora_ref)));
    t->set.n_layers = t->n_layers;
    t->set.n_slots = n_slots;
    t->set.max_r = max_r;
    t->set.host = t->host;
    t->set.dev = t->devtab;
    *set = &t->set;
    return QLR_OK;
}

/* ------------------------------------------------------------------ one adapter */

qlr_status qlr_adapter_one_load(qlr_model *m, const char *path, float scale, qlr_adapter_one *a) {
    memset(a, 0, sizeof *a);
    qlr_lora_base base;
    qlr_lora_base_from_loaded(m, &base);
    qlr_status st = qlr_lora_load(path, &base, &a->lora);
    if (st == QLR_OK) st = qlr_lora_dev_create(m->be, a->lora, m->cfg.n_layers, 0, &a->dev);
    if (st == QLR_OK) st = qlr_adapter_slots_create(m->be, m->cfg.n_layers, 1, &a->slots);
    if (st == QLR_OK) {
        qlr_adapter_slots_put(a->slots, 0, a->dev, scale);
        st = qlr_adapter_slots_commit(a->slots, 1, &a->set);
    }
    if (st) qlr_adapter_one_free(a);
    return st;
}

void qlr_adapter_one_free(qlr_adapter_one *a) {
    qlr_adapter_slots_free(a->slots);
    qlr_lora_dev_free(a->dev);
    qlr_lora_free(a->lora);
    memset(a, 0, sizeof *a);
}
