/* model/kv_paged.c: the paged KV cache object: per layer one K pool and one V pool of n_blocks
 * blocks of `block` token rows ([n_blocks * block, n_kv, hd] act), and the device block table the
 * forward uploads each batch's table into, all carved from one device allocation. It does not
 * decide which block holds what (infer/engine_kv.c does) and has no forward of its own
 * (model/forward.c stores and attends through it). */
#include <stdlib.h>

#include "core/core.h"
#include "model/model.h"

static uint64_t align256(uint64_t x) { return (x + 255) & ~255ull; }

/* Bytes of one pool (K or V of one layer). */
static uint64_t pool_bytes(const qlr_model_config *c, qlr_backend *be, int32_t n_blocks,
                           int32_t block) {
    return align256((uint64_t)n_blocks * (uint64_t)block * (uint64_t)c->n_kv_heads *
                    (uint64_t)c->head_dim * qlr_backend_act_size(be));
}

uint64_t qlr_kv_paged_bytes(const qlr_model_config *c, qlr_backend *be, int32_t n_blocks,
                            int32_t block, int32_t max_seqs, int32_t max_width) {
    return 2ull * (uint64_t)c->n_layers * pool_bytes(c, be, n_blocks, block) +
           align256((uint64_t)max_seqs * (uint64_t)max_width * 4);
}

qlr_status qlr_kv_paged_create(const qlr_model *m, int32_t n_blocks, int32_t block,
                               int32_t max_seqs, int32_t max_width, qlr_kv_paged **out) {
    *out = NULL;
    const qlr_model_config *c = &m->cfg;
    if (n_blocks < 1 || block < 1 || max_seqs < 1 || max_width < 1)
        return qlr_errorf(QLR_ERR_INVALID, "paged KV cache: %d blocks of %d tokens, table %d x %d "
                          "(each must be >= 1)", n_blocks, block, max_seqs, max_width);
    if ((uint64_t)n_blocks * (uint64_t)block > INT32_MAX)
        return qlr_errorf(QLR_ERR_RANGE, "paged KV cache: %d blocks of %d tokens is more than "
                          "2^31 rows", n_blocks, block);
    qlr_kv_paged *kv = calloc(1, sizeof *kv);
    if (!kv) return qlr_errorf(QLR_ERR_NOMEM, "paged KV cache");
    kv->be = m->be;
    kv->n_layers = c->n_layers;
    kv->n_blocks = n_blocks;
    kv->block = block;
    kv->n_kv = c->n_kv_heads;
    kv->head_dim = c->head_dim;
    kv->max_seqs = max_seqs;
    kv->max_width = max_width;
    kv->bytes = qlr_kv_paged_bytes(c, m->be, n_blocks, block, max_seqs, max_width);
    kv->k = calloc((size_t)c->n_layers, sizeof(void *));
    kv->v = calloc((size_t)c->n_layers, sizeof(void *));
    kv->mem = m->be->mem.alloc(m->be, (size_t)kv->bytes);
    if (!kv->k || !kv->v || !kv->mem) {
        qlr_status st = kv->mem ? qlr_errorf(QLR_ERR_NOMEM, "paged KV cache") : qlr_error_status();
        qlr_error_prefix("paged KV cache of %.1f MiB (%d blocks of %d tokens)",
                         (double)kv->bytes / (1 << 20), n_blocks, block);
        qlr_kv_paged_free(kv);
        return st;
    }
    uint64_t per = pool_bytes(c, m->be, n_blocks, block);
    for (int32_t l = 0; l < c->n_layers; l++) {
        kv->k[l] = (uint8_t *)kv->mem + (2ull * l) * per;
        kv->v[l] = (uint8_t *)kv->mem + (2ull * l + 1) * per;
    }
    kv->table = (int32_t *)((uint8_t *)kv->mem + 2ull * c->n_layers * per);
    *out = kv;
    return QLR_OK;
}

void qlr_kv_paged_free(qlr_kv_paged *kv) {
    if (!kv) return;
    if (kv->mem) kv->be->mem.free(kv->be, kv->mem);
    free(kv->k);
    free(kv->v);
    free(kv);
}
