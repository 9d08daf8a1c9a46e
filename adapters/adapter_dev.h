/* adapters/adapter_dev.h: an adapter's device side and the adapter sets a forward consumes.
 *
 * Owns: qlr_lora_dev, the compute copies (act dtype) of one adapter's A/B on a backend, and for a
 * trainable adapter also its fp32 masters and fp32 gradients on that device (so the optimizer
 * runs there); qlr_adapter_slots, the table of slots (adapter + scale per slot) behind a
 * model/model.h qlr_adapter_set, kept in host and device memory.
 * On a host-visible f32 backend (the CPU) nothing is copied: compute copies and device masters
 * alias the host qlr_lora's fp32 block. It does not own the host adapter (adapters/lora.h), the
 * registry of named adapters (adapters/registry.h) or the optimizer (optim/). */
#ifndef QLR_ADAPTERS_ADAPTER_DEV_H
#define QLR_ADAPTERS_ADAPTER_DEV_H

#include <stdint.h>

#include "adapters/lora.h"
#include "backend/backend.h"
#include "model/model.h"

typedef struct qlr_lora_dev {
    qlr_backend *be;             /* not owned */
    int32_t n_layers;            /* rows of mods: the model's layer count */
    int32_t r;
    int trainable;               /* masters and grads on the device */
    int aliased;                 /* compute copies alias the masters (host-visible f32 backend) */
    uint64_t n_params;           /* floats in the adapter (== its qlr_lora's n_params) */
    float *master;               /* [n_params] f32 device, the qlr_lora block's layout (trainable);
                                    == the host block when host-visible */
    float *grad;                 /* [n_params] f32 device, same layout (trainable) */
    void *compute;               /* the act-dtype copies (NULL when aliased) */
    uint64_t device_bytes;       /* bytes this object allocated on the device */
    qlr_lora_ref *mods;          /* [n_layers * QLR_LIN_COUNT] host: a/b device compute pointers,
                                    r (0 = not adapted), scale = the adapter's own scale */
    float **da, **db;            /* [n_layers * QLR_LIN_COUNT] gradient of each A and B inside
                                    `grad` (NULL where not adapted, or not trainable) */
} qlr_lora_dev;

/* Device bytes qlr_lora_dev_create allocates for adapter `l` on `be` (the planner's figure). */
uint64_t qlr_lora_dev_bytes(const qlr_backend *be, const qlr_lora *l, int trainable);

/* Makes the device side of `l` for a model of `n_layers` layers (the adapter must already fit the
 * model: qlr_lora_check_base) and uploads it. `trainable` also allocates device masters (copied
 * from l) and zeroed gradients. QLR_ERR_NOMEM (naming the bytes) or a device error; *out NULL
 * on failure. */
qlr_status qlr_lora_dev_create(qlr_backend *be, const qlr_lora *l, int32_t n_layers, int trainable,
                               qlr_lora_dev **out);
/* Frees every device buffer; safe on NULL. */
void qlr_lora_dev_free(qlr_lora_dev *d);
/* Host masters of `l` -> device (masters when trainable, and the compute copies). */
qlr_status qlr_lora_dev_upload(qlr_lora_dev *d, const qlr_lora *l);
/* Device masters -> the compute copies (after an optimizer step on the device; f32_to_act op).
 * A no-op when aliased. */
qlr_status qlr_lora_dev_refresh(qlr_lora_dev *d);
/* Device masters -> host masters of `l` (before a checkpoint or an export). A no-op when the
 * masters alias l's block. */
qlr_status qlr_lora_dev_download(qlr_lora_dev *d, qlr_lora *l);

/* ---- adapter sets ---- */

typedef struct qlr_adapter_slots qlr_adapter_slots;

/* A slot table for a model of n_layers layers with room for cap_slots slots (device table
 * allocated once). QLR_ERR_INVALID for cap_slots < 1; QLR_ERR_NOMEM. */
qlr_status qlr_adapter_slots_create(qlr_backend *be, int32_t n_layers, int32_t cap_slots,
                                    qlr_adapter_slots **out);
void qlr_adapter_slots_free(qlr_adapter_slots *t);
/* Puts adapter d (NULL = empty slot) with user scale `scale` (1 = the adapter as trained) into
 * slot s < cap_slots. Host side only: qlr_adapter_slots_commit publishes. */
void qlr_adapter_slots_put(qlr_adapter_slots *t, int32_t s, const qlr_lora_dev *d, float scale);
/* Uploads the first n_slots slots' table (ordered with the backend's later ops) and returns the
 * set to put in a batch (valid until the next commit or free). */
qlr_status qlr_adapter_slots_commit(qlr_adapter_slots *t, int32_t n_slots,
                                    const qlr_adapter_set **set);

/* ---- one adapter as a one-slot set (`qlora generate --adapter`, `qlora eval`) ---- */

typedef struct qlr_adapter_one {
    qlr_lora *lora;
    qlr_lora_dev *dev;
    qlr_adapter_slots *slots;
    const qlr_adapter_set *set;   /* slot 0 = the adapter times `scale` */
} qlr_adapter_one;

/* Loads the adapter at `path` (qlr_lora_load: GGUF LoRA, PEFT folder or run folder) for model
 * `m` (refused, naming the mismatch, when made for another base) and makes its one-slot set.
 * *a zeroed on failure. */
qlr_status qlr_adapter_one_load(qlr_model *m, const char *path, float scale, qlr_adapter_one *a);
/* Frees everything; safe on a zeroed struct. */
void qlr_adapter_one_free(qlr_adapter_one *a);

#endif
