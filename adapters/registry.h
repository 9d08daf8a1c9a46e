/* adapters/registry.h: the registry of named adapters attached to one base model (the server's
 * adapters, `qlora generate --adapter`, `qlora eval`).
 *
 * Owns: names -> adapters; reference counts (an adapter in use by a request is never freed under
 * it: detach removes the name at once and the adapter is freed when its last reference is
 * released); three residency tiers per adapter: device (compute copies, qlr_lora_dev), host
 * (fp32 masters, qlr_lora) and file (only the path; loaded on demand), with LRU eviction of
 * device copies under a byte budget (pinned adapters are never evicted) and of host copies of
 * file-backed adapters under a host budget. Mixed ranks and target sets live side by side; an
 * adapter made for another base (architecture or shapes) is refused, naming the mismatch.
 *
 * Threads: every function may be called from any thread, except qlr_registry_pin,
 * qlr_registry_unpin and qlr_registry_collect, which touch device memory and belong to the one
 * thread that runs forwards on the backend (the engine thread). Device memory is only freed by
 * that thread: a detach or release on another thread leaves the device copy for the next
 * collect (or pin, or qlr_registry_free). It does not own the base model or the backend. */
#ifndef QLR_ADAPTERS_REGISTRY_H
#define QLR_ADAPTERS_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

#include "adapters/adapter_dev.h"
#include "adapters/lora.h"
#include "backend/backend.h"
#include "core/status.h"

#define QLR_ADAPTER_NAME_MAX 128   /* bytes of a name, NUL included */

typedef struct qlr_registry qlr_registry;
typedef struct qlr_adapter qlr_adapter;   /* one attached adapter (reference-counted) */

typedef struct qlr_registry_params {
    uint64_t device_budget;  /* bytes of device compute copies kept resident; 0 = no limit */
    uint64_t host_budget;    /* bytes of host masters of file-backed adapters; 0 = no limit */
    uint64_t base_nf4_hash;  /* the served model's qlr_model.nf4_hash (0 = unknown): an adapter
                                trained on another NF4 store is attached with a warning naming
                                both (qlr_lora_warn_base) */
    const char *base_name;   /* the served model's name for that warning (copied; NULL = none) */
} qlr_registry_params;

/* Defaults: no limits. */
qlr_registry_params qlr_registry_params_default(void);

/* A registry for adapters of the base model `cfg` (its identity is what attach checks against),
 * whose device copies live on `be` for a model of cfg->n_layers layers. QLR_ERR_NOMEM. */
qlr_status qlr_registry_create(qlr_backend *be, const qlr_model_config *cfg,
                               const qlr_registry_params *p, qlr_registry **out);
/* Frees every adapter (references still held are a bug: asserted in debug builds); safe on
 * NULL. Call from the engine thread once no forward runs. */
void qlr_registry_free(qlr_registry *r);

/* Attaches the adapter at `path` (GGUF LoRA, PEFT folder or training run folder:
 * qlr_lora_resolve) under `name`. It is loaded and checked now (a corrupt file or one made for
 * another base is refused with the loader's message naming the file; nothing is attached).
 * `lazy` = 1 keeps only the path after the check (file tier; loaded again on first use).
 * Names: 1..127 bytes of [A-Za-z0-9._:/-], not taken: QLR_ERR_INVALID naming the name. */
qlr_status qlr_registry_attach_file(qlr_registry *r, const char *name, const char *path, int lazy);
/* Attaches an in-memory adapter under `name`, taking ownership of `l` (freed on failure too). */
qlr_status qlr_registry_attach(qlr_registry *r, const char *name, qlr_lora *l);
/* Removes `name` (QLR_ERR_NOT_FOUND naming it when absent). The adapter stays valid for those
 * who hold a reference and is freed after the last release. */
qlr_status qlr_registry_detach(qlr_registry *r, const char *name);

/* Looks `name` up and takes a reference (*out NULL and QLR_ERR_NOT_FOUND when absent). */
qlr_status qlr_registry_acquire(qlr_registry *r, const char *name, qlr_adapter **out);
/* Takes one more reference on an adapter already held. */
void qlr_registry_retain(qlr_registry *r, qlr_adapter *a);
/* Drops a reference; safe on NULL. */
void qlr_registry_release(qlr_registry *r, qlr_adapter *a);

/* Engine thread: makes `a` device-resident (loading it from its file when needed, evicting the
 * least recently used unpinned device copies to stay within device_budget) and pins it; *dev is
 * valid until the matching unpin. Pins nest. A file that became unreadable or corrupt since
 * attach is an error naming it (the adapter stays attached). QLR_ERR_NOMEM when the budget is
 * too small even after evicting every unpinned copy. */
qlr_status qlr_registry_pin(qlr_registry *r, qlr_adapter *a, const qlr_lora_dev **dev);
void qlr_registry_unpin(qlr_registry *r, qlr_adapter *a);
/* Any thread: 1 when a pin of `a` needs no file read (its host or device copy is there, or a
 * background read of it failed: the pin then reads it and reports why); else 0 after queueing
 * the read of its file on the registry's loader thread (once; the queue holds a reference), so
 * that the engine thread never stalls on a file-tier adapter's disk read. Poll it until 1. */
int qlr_registry_prefetch(qlr_registry *r, qlr_adapter *a);
/* Engine thread: frees the device copies of adapters detached and released since. */
void qlr_registry_collect(qlr_registry *r);

/* ---- what is attached ---- */

typedef enum qlr_residency {
    QLR_RESIDENCY_FILE = 0,
    QLR_RESIDENCY_HOST = 1,
    QLR_RESIDENCY_DEVICE = 2,
} qlr_residency;

typedef struct qlr_adapter_info {
    char name[QLR_ADAPTER_NAME_MAX];
    char path[4096];         /* "" for an in-memory adapter */
    int32_t r;
    uint32_t targets;        /* QLR_LORA_TARGET mask */
    double alpha;
    float scale;             /* the adapter's own scale (alpha / r or rsLoRA) */
    uint64_t n_params;
    qlr_residency residency;
    int32_t refs;            /* references held now (requests using it) */
    uint64_t uses;           /* acquisitions since attach */
    uint64_t device_bytes;   /* bytes of its device copy (0 when not resident) */
} qlr_adapter_info;

/* The name of an adapter held (valid while the reference is). */
const char *qlr_adapter_name(const qlr_adapter *a);
/* Its info now. */
void qlr_adapter_get_info(qlr_registry *r, const qlr_adapter *a, qlr_adapter_info *out);
/* A snapshot of every attached adapter in attach order (*out malloc'ed, free() it). */
qlr_status qlr_registry_list(qlr_registry *r, qlr_adapter_info **out, size_t *n);

typedef struct qlr_registry_stats {
    size_t attached;         /* names */
    size_t resident;         /* device copies */
    uint64_t device_bytes;   /* bytes of device copies */
    uint64_t host_bytes;     /* bytes of host masters */
    uint64_t evictions;      /* device copies evicted since creation */
    uint64_t loads;          /* file loads since creation */
} qlr_registry_stats;

void qlr_registry_get_stats(qlr_registry *r, qlr_registry_stats *s);

#endif
