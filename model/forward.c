/* model/forward.c: the KV cache, the forward workspace (one device allocation carved from a
 * table of sizes) and the transformer forward for a batch of tokens from any number of
 * sequences at any positions, over a contiguous cache or a paged one (model/kv_paged.c: K/V
 * stored at each token's pool row, attention through the batch's block tables), written only
 * against the backend op table:
 *   embedding -> per layer [RMSNorm -> q/k/v (+LoRA) -> RoPE -> KV store -> attention (over
 *   the batch's own k/v for a fresh prefill when the backend has attention_fresh) ->
 *   o (+LoRA) -> residual -> RMSNorm -> gate/up (+LoRA) -> SwiGLU -> down (+LoRA) -> residual]
 *   -> gather the rows whose logits are wanted -> final RMSNorm -> lm_head (bf16 or NF4).
 * qlr_model_forward (and qlr_model_forward_paged) validates a host batch and copies it into the
 * workspace; qlr_model_forward_dev is the forward itself (device batch, capturable in a CUDA
 * graph). The
 * debug hooks (skip / unfused, the decode benchmark's ablation) swap in a patched op table. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "model/model_internal.h"

/* ---- KV cache ---- */

uint64_t qlr_kv_cache_bytes(const qlr_model_config *c, qlr_backend *be, int32_t n_seq, int32_t ctx) {
    return 2ull * (uint64_t)c->n_layers * (uint64_t)n_seq * (uint64_t)ctx *
           (uint64_t)c->n_kv_heads * (uint64_t)c->head_dim * qlr_backend_act_size(be);
}

qlr_status qlr_kv_cache_create(const qlr_model *m, int32_t n_seq, int32_t ctx, qlr_kv_cache **out) {
    *out = NULL;
    const qlr_model_config *c = &m->cfg;
    if (n_seq < 1 || ctx < 1)
        return qlr_errorf(QLR_ERR_INVALID, "KV cache: n_seq %d and ctx %d must be >= 1", n_seq, ctx);
    qlr_kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv) return qlr_errorf(QLR_ERR_NOMEM, "KV cache");
    kv->be = m->be;
    kv->n_layers = c->n_layers;
    kv->n_seq = n_seq;
    kv->ctx = ctx;
    kv->n_kv = c->n_kv_heads;
    kv->head_dim = c->head_dim;
    kv->bytes = qlr_kv_cache_bytes(c, m->be, n_seq, ctx);
    kv->k = calloc((size_t)c->n_layers, sizeof(void *));
    kv->v = calloc((size_t)c->n_layers, sizeof(void *));
    kv->block = m->be->mem.alloc(m->be, (size_t)kv->bytes);
    if (!kv->k || !kv->v || !kv->block) {
        qlr_status st = kv->block ? qlr_errorf(QLR_ERR_NOMEM, "KV cache") : qlr_error_status();
        qlr_error_prefix("KV cache of %.1f MiB (%d sequences x %d positions)",
                         (double)kv->bytes / (1 << 20), n_seq, ctx);
        qlr_kv_cache_free(kv);
        return st;
    }
    uint64_t per = kv->bytes / (2ull * (uint64_t)c->n_layers);
    for (int32_t l = 0; l < c->n_layers; l++) {
        kv->k[l] = (uint8_t *)kv->block + (2ull * l) * per;
        kv->v[l] = (uint8_t *)kv->block + (2ull * l + 1) * per;
    }
    *out = kv;
    return QLR_OK;
}

void qlr_kv_cache_free(qlr_kv_cache *kv) {
    if (!kv) return;
    if (kv->block) kv->be->mem.free(kv->be, kv->block);
    free(kv->k);
    free(kv->v);
    free(kv);
}

/* ---- workspace plan ---- */

enum { B_X, B_XN, B_Q, B_K, B_V, B_ATT, B_O, B_GATE, B_UP, B_XL, B_LOGITS, B_IDS, B_POS, B_SEQ,
       B_ROWS, B_SLOT, B_KVSLOT, B_COUNT };

struct qlr_forward {
    qlr_model *m;
    int32_t max_tokens, max_logits;
    void *block;
    uint64_t bytes;
    void *buf[B_COUNT];
    qlr_hidden_fn hidden_fn;
    void *hidden_ud;
    int32_t *slot_host; /* [5 max_tokens]: slot [n], then lora_segmented's tok [n] and tiles
                           [3 n], uploaded together into B_SLOT */
    int32_t *seg_scratch; /* [4 max_tokens]: the segments' runs [3 n] (host) and scratch [n] */
    qlr_lora_segs seg_store; /* the segments set_adapters built for the current call */
    int32_t *kvslot_host; /* [max_tokens] paged cache: each token's pool row */
    /* adapters of the current call */
    const qlr_adapter_set *set;
    int32_t uniform;    /* the slot every token uses, or -1 when they differ */
    const int32_t *slot_dev; /* [n] device: each token's slot */
    const qlr_lora_segs *segs; /* the call's tokens grouped by slot, or NULL */
    /* debug hooks (qlr_forward_set_skip / _set_fused): the op table the forward calls when
     * `debug` is set, a copy of the backend's with the skipped kinds' entries made no-ops */
    uint32_t skip;
    int unfused, debug;
    qlr_backend_ops debug_ops;
};

/* Bytes of each workspace buffer, aligned to 256. */
static void plan(const qlr_model_config *c, qlr_backend *be, int32_t T, int32_t L, uint64_t *sz) {
    uint64_t a = qlr_backend_act_size(be);
    uint64_t d = (uint64_t)c->d_model, q = (uint64_t)c->n_heads * c->head_dim,
             kv = (uint64_t)c->n_kv_heads * c->head_dim, ff = (uint64_t)c->d_ff;
    sz[B_X] = T * d * a;
    sz[B_XN] = T * d * a;
    sz[B_Q] = T * q * a;
    sz[B_K] = T * kv * a;
    sz[B_V] = T * kv * a;
    sz[B_ATT] = T * q * a;
    sz[B_O] = T * d * a;
    sz[B_GATE] = T * ff * a;
    sz[B_UP] = T * ff * a;
    sz[B_XL] = (uint64_t)L * d * a;
    sz[B_LOGITS] = (uint64_t)L * c->n_vocab * 4;
    sz[B_IDS] = sz[B_POS] = sz[B_SEQ] = (uint64_t)T * 4;
    sz[B_ROWS] = (uint64_t)L * 4;
    sz[B_SLOT] = (uint64_t)T * 4 * 5; /* slot [T], segment tok [T] and tiles [3 T] */
    sz[B_KVSLOT] = (uint64_t)T * 4;
    for (int i = 0; i < B_COUNT; i++) sz[i] = (sz[i] + 255) & ~255ull;
}

uint64_t qlr_forward_plan_bytes(const qlr_model_config *c, qlr_backend *be, int32_t T, int32_t L) {
    uint64_t sz[B_COUNT], t = 0;
    plan(c, be, T, L, sz);
    for (int i = 0; i < B_COUNT; i++) t += sz[i];
    return t;
}

qlr_status qlr_forward_create(qlr_model *m, int32_t max_tokens, int32_t max_logits,
                              qlr_forward **out) {
    *out = NULL;
    if (max_tokens < 1 || max_logits < 1)
        return qlr_errorf(QLR_ERR_INVALID, "forward workspace: max_tokens %d, max_logits %d",
                          max_tokens, max_logits);
    qlr_forward *f = calloc(1, sizeof *f);
    if (!f) return qlr_errorf(QLR_ERR_NOMEM, "forward workspace");
    f->m = m;
    f->max_tokens = max_tokens;
    f->max_logits = max_logits;
    uint64_t sz[B_COUNT];
    plan(&m->cfg, m->be, max_tokens, max_logits, sz);
    f->bytes = qlr_forward_plan_bytes(&m->cfg, m->be, max_tokens, max_logits);
    f->block = m->be->mem.alloc(m->be, (size_t)f->bytes);
    f->slot_host = malloc((size_t)max_tokens * 4 * 5);
    f->seg_scratch = malloc((size_t)max_tokens * 4 * 4);
    f->kvslot_host = malloc((size_t)max_tokens * 4);
    if (!f->block || !f->slot_host || !f->seg_scratch || !f->kvslot_host) {
        qlr_status st = f->block ? qlr_errorf(QLR_ERR_NOMEM, "forward") : qlr_error_status();
        qlr_error_prefix("forward workspace of %.1f MiB", (double)f->bytes / (1 << 20));
        qlr_forward_free(f);
        return st;
    }
    uint64_t off = 0;
    for (int i = 0; i < B_COUNT; i++) {
        f->buf[i] = (uint8_t *)f->block + off;
        off += sz[i];
    }
    *out = f;
    return QLR_OK;
}

void qlr_forward_free(qlr_forward *f) {
    if (!f) return;
    if (f->block) f->m->be->mem.free(f->m->be, f->block);
    free(f->slot_host);
    free(f->seg_scratch);
    free(f->kvslot_host);
    free(f);
}

void qlr_forward_set_hidden_fn(qlr_forward *f, qlr_hidden_fn fn, void *ud) {
    f->hidden_fn = fn;
    f->hidden_ud = ud;
}

/* ---- forward ---- */

/* The paged cache's part of the batch check: table size, and every block id a token reaches
 * (positions 0..pos of its sequence; a run of tokens of one sequence in rising positions is
 * checked once). Fills f->kvslot_host with each token's pool row. */
static qlr_status check_paged(qlr_forward *f, const qlr_kv_paged *kv, const qlr_batch *b,
                              const qlr_block_table *bt) {
    if (!bt || !bt->ids || bt->n_seqs < 1 || bt->n_seqs > kv->max_seqs || bt->width < 1 ||
        bt->width > kv->max_width)
        return qlr_errorf(QLR_ERR_RANGE, "paged batch: block table %s%d x %d (the cache holds "
                          "1..%d x 1..%d)", bt && bt->ids ? "" : "missing, ", bt ? bt->n_seqs : 0,
                          bt ? bt->width : 0, kv->max_seqs, kv->max_width);
    int64_t ctx = (int64_t)bt->width * kv->block;
    for (int32_t i = 0; i < b->n; i++) {
        int32_t s = b->seq[i], p = b->pos[i];
        if (s < 0 || s >= bt->n_seqs)
            return qlr_errorf(QLR_ERR_RANGE, "token %d of the batch: sequence %d is outside the "
                              "block table (0..%d)", i, s, bt->n_seqs - 1);
        if (p < 0 || p >= ctx)
            return qlr_errorf(QLR_ERR_RANGE, "token %d of the batch: position %d is outside the "
                              "block table (0..%lld)", i, p, (long long)ctx - 1);
        const int32_t *row = bt->ids + (int64_t)s * bt->width;
        int32_t from = i > 0 && b->seq[i - 1] == s && b->pos[i - 1] < p ?
                           b->pos[i - 1] / kv->block + 1 : 0;
        for (int32_t j = from; j <= p / kv->block; j++)
            if (row[j] < 0 || row[j] >= kv->n_blocks)
                return qlr_errorf(QLR_ERR_RANGE, "token %d of the batch: block %d of sequence %d "
                                  "is %d (the pool holds 0..%d)", i, j, s, row[j],
                                  kv->n_blocks - 1);
        f->kvslot_host[i] = row[p / kv->block] * kv->block + p % kv->block;
    }
    return QLR_OK;
}

/* The cache's shapes against the model (exactly one of kv and kvp is set). */
static qlr_status check_cache(const qlr_model_config *c, const qlr_kv_cache *kv,
                              const qlr_kv_paged *kvp) {
    if (kv && (kv->n_layers != c->n_layers || kv->n_kv != c->n_kv_heads ||
               kv->head_dim != c->head_dim))
        return qlr_errorf(QLR_ERR_INVALID, "KV cache was made for another model");
    if (kvp && (kvp->n_layers != c->n_layers || kvp->n_kv != c->n_kv_heads ||
                kvp->head_dim != c->head_dim))
        return qlr_errorf(QLR_ERR_INVALID, "paged KV cache was made for another model");
    return QLR_OK;
}

/* A host batch over the contiguous cache kv or the paged cache kvp with tables bt. */
/* What a host batch and a device batch share: sizes against the workspace, the cache's and the
 * adapter set's model. */
static qlr_status check_shape(const qlr_forward *f, const qlr_kv_cache *kv, const qlr_kv_paged *kvp,
                              int32_t n, int32_t n_logits, const qlr_adapter_set *set) {
    const qlr_model_config *c = &f->m->cfg;
    if (n < 1 || n > f->max_tokens)
        return qlr_errorf(QLR_ERR_RANGE, "batch of %d tokens (workspace holds 1..%d)", n,
                          f->max_tokens);
    if (n_logits < 0 || n_logits > f->max_logits || n_logits > n)
        return qlr_errorf(QLR_ERR_RANGE, "%d logits rows requested (workspace holds %d, batch %d)",
                          n_logits, f->max_logits, n);
    QLR_TRY(check_cache(c, kv, kvp));
    if (set && (set->n_layers != c->n_layers || set->n_slots < 1))
        return qlr_errorf(QLR_ERR_INVALID, "adapter set made for %d layers (the model has %d)",
                          set->n_layers, c->n_layers);
    return QLR_OK;
}

static qlr_status check_batch(qlr_forward *f, const qlr_kv_cache *kv, const qlr_kv_paged *kvp,
                              const qlr_batch *b, const qlr_block_table *bt) {
    const qlr_model_config *c = &f->m->cfg;
    QLR_TRY(check_shape(f, kv, kvp, b->n, b->n_logits, b->adapters));
    for (int32_t i = 0; i < b->n; i++) {
        if (b->tokens[i] < 0 || b->tokens[i] >= c->n_vocab)
            return qlr_errorf(QLR_ERR_RANGE, "token %d of the batch: id %d is outside the vocabulary "
                              "(0..%d)", i, b->tokens[i], c->n_vocab - 1);
        if (!kv) continue;
        if (b->pos[i] < 0 || b->pos[i] >= kv->ctx)
            return qlr_errorf(QLR_ERR_RANGE, "token %d of the batch: position %d is outside the "
                              "context (0..%d)", i, b->pos[i], kv->ctx - 1);
        if (b->seq[i] < 0 || b->seq[i] >= kv->n_seq)
            return qlr_errorf(QLR_ERR_RANGE, "token %d of the batch: sequence %d is outside the "
                              "cache (0..%d)", i, b->seq[i], kv->n_seq - 1);
    }
    if (kvp) QLR_TRY(check_paged(f, kvp, b, bt));
    if (b->adapters && b->adapter_slot)
        for (int32_t i = 0; i < b->n; i++)
            if (b->adapter_slot[i] < -1 || b->adapter_slot[i] >= b->adapters->n_slots)
                return qlr_errorf(QLR_ERR_RANGE, "token %d of the batch: adapter slot %d is outside "
                                  "-1..%d", i, b->adapter_slot[i], b->adapters->n_slots - 1);
    if (b->logit_rows)
        for (int32_t i = 0; i < b->n_logits; i++)
            if (b->logit_rows[i] < 0 || b->logit_rows[i] >= b->n)
                return qlr_errorf(QLR_ERR_RANGE, "logits row %d: %d is outside the batch", i,
                                  b->logit_rows[i]);
    return QLR_OK;
}

/* 1 when the batch is one sequence at positions 0..n-1: a fresh prefill, whose attention over
 * the cache equals attention over the batch's own k/v (the attention_fresh op). */
static int fresh_prefill(const qlr_batch *b) {
    for (int32_t i = 0; i < b->n; i++)
        if (b->seq[i] != b->seq[0] || b->pos[i] != i) return 0;
    return 1;
}

/* 1 when some slot of the call's set adapts linear `id` of layer `l`. */
static int adapted(const qlr_forward *f, int32_t l, qlr_linear_id id) {
    const qlr_adapter_set *s = f->set;
    if (!s || l >= s->n_layers) return 0;
    const qlr_lora_ref *row = &s->host[((int64_t)l * QLR_LIN_COUNT + id) * s->n_slots];
    if (f->uniform >= 0) return row[f->uniform].r > 0;
    for (int32_t i = 0; i < s->n_slots; i++)
        if (row[i].r > 0) return 1;
    return 0;
}

/* y [n, out] += each token's adapter on linear (l, id) of input x [n, in]. */
static qlr_status lora(qlr_forward *f, int32_t l, qlr_linear_id id, void *y, const void *x,
                       int64_t n) {
    if (!adapted(f, l, id)) return QLR_OK;
    qlr_backend *be = f->m->be;
    const qlr_nf4 *w = &f->m->layers[l].w[id];
    const qlr_adapter_set *s = f->set;
    int64_t row = ((int64_t)l * QLR_LIN_COUNT + id) * s->n_slots;
    if (!be->ops.lora_batched)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "the %s backend has no lora_batched op: it cannot "
                          "apply adapters at inference", be->name);
    if (f->uniform < 0 && f->segs && be->ops.lora_segmented)
        return be->ops.lora_segmented(be, y, x, s->dev + row, s->host + row, s->n_slots,
                                      f->slot_dev, s->max_r, f->segs, n, w->cols, w->rows);
    return be->ops.lora_batched(be, y, x, s->dev + row, s->host + row, s->n_slots,
                                f->slot_dev, s->max_r, f->uniform, n, w->cols, w->rows);
}

/* The qlr_forward_skip bit of a linear. */
static uint32_t skip_kind(qlr_linear_id id) {
    return id <= QLR_LIN_V ? QLR_FORWARD_SKIP_QKV : id == QLR_LIN_O ? QLR_FORWARD_SKIP_O
           : id == QLR_LIN_DOWN ? QLR_FORWARD_SKIP_DOWN : QLR_FORWARD_SKIP_GATE_UP;
}

static qlr_status linear(qlr_forward *f, int32_t l, qlr_linear_id id, void *y, const void *x,
                         int64_t n) {
    const qlr_layer *L = &f->m->layers[l];
    if (!(f->skip & skip_kind(id)))
        QLR_TRY(f->m->be->ops.nf4_linear(f->m->be, y, x, &L->w[id], L->bias[id], n));
    return lora(f, l, id, y, x, n);
}

/* Consecutive tokens of one slot from which lora_segmented may take a dense (tensor-core) path:
 * a prefill chunk. */
#define LORA_RUN_MIN 64

/* Uploads the batch's adapter slots (when it has a set) and notes in d whether they are
 * uniform. */
static qlr_status set_adapters(qlr_forward *f, const qlr_batch *b, qlr_batch_dev *d) {
    const qlr_adapter_set *s = b->adapters;
    d->adapters = NULL;
    d->adapter_slot = NULL;
    d->uniform = -1;
    d->segs = NULL;
    if (!s) return QLR_OK;
    int32_t u = b->adapter_slot ? b->adapter_slot[0] : 0;
    for (int32_t i = 0; i < b->n; i++) {
        int32_t v = b->adapter_slot ? b->adapter_slot[i] : 0;
        f->slot_host[i] = v >= 0 && v < s->n_slots ? v : -1;
        if (f->slot_host[i] != u) u = -1;
    }
    if (u == -1 && f->slot_host[0] == -1) {
        int any = 0;
        for (int32_t i = 0; i < b->n && !any; i++) any = f->slot_host[i] >= 0;
        if (!any) return QLR_OK; /* every token runs the base model */
    }
    d->adapters = s;
    d->adapter_slot = f->buf[B_SLOT];
    d->uniform = u;
    size_t words = (size_t)b->n;
    if (u < 0 && f->m->be->ops.lora_segmented) {
        /* the tokens grouped by slot, built once here for every LoRA call of this forward and
         * uploaded with the slots in one copy: slot [n] | tok [n] | tiles [3 n_tiles] */
        int32_t n = b->n, *tok = f->slot_host + n, *tiles = f->slot_host + 2 * (size_t)n;
        qlr_lora_segs_build(f->slot_host, n, s->n_slots, LORA_RUN_MIN, tok, tiles,
                            f->seg_scratch, f->seg_scratch + 3 * (size_t)n, &f->seg_store);
        for (int32_t p = f->seg_store.n_sorted; p < n; p++) tok[p] = 0;
        int32_t *dev = f->buf[B_SLOT];
        f->seg_store.tok = dev + n;
        f->seg_store.tiles = dev + 2 * (size_t)n;
        d->segs = &f->seg_store;
        words = 2 * (size_t)n + 3 * (size_t)f->seg_store.n_tiles;
    }
    return f->m->be->mem.h2d(f->m->be, f->buf[B_SLOT], f->slot_host, words * 4);
}

/* What the host knows of a device batch (sizes, the cache's and the set's model). */
static qlr_status check_batch_dev(const qlr_forward *f, const qlr_kv_cache *kv,
                                  const qlr_kv_paged *kvp, const qlr_batch_dev *b) {
    QLR_TRY(check_shape(f, kv, kvp, b->n, b->n_logits, b->adapters));
    if (!b->adapters) return QLR_OK;
    if (!b->adapter_slot)
        return qlr_errorf(QLR_ERR_INVALID, "device batch with an adapter set but no slot array");
    if (b->uniform < -1 || b->uniform >= b->adapters->n_slots)
        return qlr_errorf(QLR_ERR_RANGE, "uniform adapter slot %d is outside -1..%d", b->uniform,
                          b->adapters->n_slots - 1);
    return QLR_OK;
}

/* Where a paged forward stores and reads K/V: the pool, each token's pool row (slot [n] device)
 * and the block tables already on the device (kvp->table, rows of `width`). */
typedef struct paged_view {
    qlr_kv_paged *kvp;
    const int32_t *slot;
    int32_t width;
} paged_view;

/* The forward over the contiguous cache kv, or over the paged cache of pv when kv is NULL. */
static qlr_status forward_dev(qlr_forward *f, qlr_kv_cache *kv, const paged_view *pv,
                              const qlr_batch_dev *b, float **logits) {
    qlr_model *m = f->m;
    qlr_backend *be = m->be;
    const qlr_model_config *c = &m->cfg;
    qlr_kv_paged *kvp = kv ? NULL : pv->kvp;
    QLR_TRY(check_batch_dev(f, kv, kvp, b));
    int64_t n = b->n, d = c->d_model, nh = c->n_heads, nkv = c->n_kv_heads, hd = c->head_dim;
    const int32_t *ids = b->tokens, *pos = b->pos, *seq = b->seq;
    void *x = f->buf[B_X], *xn = f->buf[B_XN], *q = f->buf[B_Q], *k = f->buf[B_K], *v = f->buf[B_V],
         *att = f->buf[B_ATT], *o = f->buf[B_O], *gate = f->buf[B_GATE], *up = f->buf[B_UP];
    f->set = b->adapters;
    f->uniform = b->adapters ? b->uniform : -1;
    f->slot_dev = b->adapter_slot;
    f->segs = b->adapters ? b->segs : NULL;

    QLR_TRY(be->ops.embedding(be, x, m->tok_embd, ids, n, d, c->n_vocab));
    if (f->hidden_fn) f->hidden_fn(f->hidden_ud, -1, x, n, d);
    float scale = 1.0f / sqrtf((float)hd);
    /* Optional fused ops (NULL on the CPU: the separate ops below, in the same order). Without a
     * hidden-state callback the residual add of a layer's MLP is deferred into the next layer's
     * add_rmsnorm (`pending`). */
    const qlr_backend_ops *op = f->debug ? &f->debug_ops : &be->ops;
    if (kvp && (!op->kv_store_paged || !op->attention_paged))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "the %s backend has no paged KV cache ops",
                          be->name);
    void *pending = NULL;
    /* A fresh prefill longer than 64 tokens goes through attention_fresh when the backend has it
     * (k/v are still stored into the cache for later steps); on QLR_ERR_UNSUPPORTED the error is
     * cleared and this forward uses the attention op from then on. */
    int fresh = op->attention_fresh && n > 64 && b->fresh;
    for (int32_t l = 0; l < c->n_layers; l++) {
        const qlr_layer *L = &m->layers[l];
        if (pending) QLR_TRY(op->add_rmsnorm(be, x, xn, pending, L->attn_norm, n, d, c->rms_eps));
        else QLR_TRY(op->rmsnorm(be, xn, x, L->attn_norm, n, d, c->rms_eps));
        pending = NULL;
        if (op->nf4_linear_multi && L->w[QLR_LIN_K].cols == L->w[QLR_LIN_Q].cols &&
            L->w[QLR_LIN_V].cols == L->w[QLR_LIN_Q].cols) {
            void *ys[3] = {q, k, v};
            const qlr_nf4 *ws[3] = {&L->w[QLR_LIN_Q], &L->w[QLR_LIN_K], &L->w[QLR_LIN_V]};
            const float *bs[3] = {L->bias[QLR_LIN_Q], L->bias[QLR_LIN_K], L->bias[QLR_LIN_V]};
            QLR_TRY(op->nf4_linear_multi(be, 3, ys, xn, ws, bs, n));
            for (int i = 0; i < 3; i++) QLR_TRY(lora(f, l, (qlr_linear_id)(QLR_LIN_Q + i), ys[i], xn, n));
        } else {
            QLR_TRY(linear(f, l, QLR_LIN_Q, q, xn, n));
            QLR_TRY(linear(f, l, QLR_LIN_K, k, xn, n));
            QLR_TRY(linear(f, l, QLR_LIN_V, v, xn, n));
        }
        if (kvp) {
            QLR_TRY(op->rope(be, q, pos, m->inv_freq, n, nh, hd));
            QLR_TRY(op->rope(be, k, pos, m->inv_freq, n, nkv, hd));
            QLR_TRY(op->kv_store_paged(be, kvp->k[l], kvp->v[l], k, v, pv->slot, n, nkv, hd,
                                       (int64_t)kvp->n_blocks * kvp->block));
        } else if (op->rope_kv_store) {
            QLR_TRY(op->rope_kv_store(be, q, k, v, kv->k[l], kv->v[l], seq, pos, m->inv_freq, n, nh,
                                      nkv, hd, kv->ctx));
        } else {
            QLR_TRY(op->rope(be, q, pos, m->inv_freq, n, nh, hd));
            QLR_TRY(op->rope(be, k, pos, m->inv_freq, n, nkv, hd));
            QLR_TRY(op->kv_store(be, kv->k[l], kv->v[l], k, v, seq, pos, n, nkv, hd, kv->ctx));
        }
        qlr_status ast = QLR_ERR_UNSUPPORTED;
        if (fresh) {
            ast = op->attention_fresh(be, att, q, k, v, n, nh, nkv, hd, scale);
            if (ast == QLR_ERR_UNSUPPORTED) {
                qlr_error_clear();
                fresh = 0;
            } else {
                QLR_TRY(ast);
            }
        }
        if (ast == QLR_ERR_UNSUPPORTED && kvp)
            QLR_TRY(op->attention_paged(be, att, q, kvp->k[l], kvp->v[l], kvp->table, pv->width,
                                        kvp->block, seq, pos, n, nh, nkv, hd, scale));
        else if (ast == QLR_ERR_UNSUPPORTED)
            QLR_TRY(op->attention(be, att, q, kv->k[l], kv->v[l], seq, pos, n, nh, nkv, hd,
                                  kv->ctx, scale));
        QLR_TRY(linear(f, l, QLR_LIN_O, o, att, n));
        if (op->add_rmsnorm) {
            QLR_TRY(op->add_rmsnorm(be, x, xn, o, L->ffn_norm, n, d, c->rms_eps));
        } else {
            QLR_TRY(op->add(be, x, o, n * d));
            QLR_TRY(op->rmsnorm(be, xn, x, L->ffn_norm, n, d, c->rms_eps));
        }
        if (op->nf4_linear_multi && L->w[QLR_LIN_UP].cols == L->w[QLR_LIN_GATE].cols) {
            void *ys[2] = {gate, up};
            const qlr_nf4 *ws[2] = {&L->w[QLR_LIN_GATE], &L->w[QLR_LIN_UP]};
            const float *bs[2] = {L->bias[QLR_LIN_GATE], L->bias[QLR_LIN_UP]};
            QLR_TRY(op->nf4_linear_multi(be, 2, ys, xn, ws, bs, n));
            for (int i = 0; i < 2; i++)
                QLR_TRY(lora(f, l, (qlr_linear_id)(QLR_LIN_GATE + i), ys[i], xn, n));
        } else {
            QLR_TRY(linear(f, l, QLR_LIN_GATE, gate, xn, n));
            QLR_TRY(linear(f, l, QLR_LIN_UP, up, xn, n));
        }
        if (op->swiglu_nf4_linear && !adapted(f, l, QLR_LIN_DOWN)) {
            QLR_TRY(op->swiglu_nf4_linear(be, o, gate, up, &L->w[QLR_LIN_DOWN],
                                          L->bias[QLR_LIN_DOWN], n));
        } else {
            QLR_TRY(op->swiglu(be, gate, gate, up, n * c->d_ff));
            QLR_TRY(linear(f, l, QLR_LIN_DOWN, o, gate, n));
        }
        if (op->add_rmsnorm && !f->hidden_fn) {
            pending = o;
        } else {
            QLR_TRY(op->add(be, x, o, n * d));
            if (f->hidden_fn) f->hidden_fn(f->hidden_ud, l, x, n, d);
        }
    }
    if (pending) QLR_TRY(op->add(be, x, pending, n * d));
    int32_t nl = b->n_logits;
    *logits = f->buf[B_LOGITS];
    if (nl == 0) return QLR_OK;
    void *xl = f->buf[B_XL];
    if (b->logit_rows) { /* else the first nl rows of x, normalised in place of the gather */
        QLR_TRY(op->get_rows(be, xl, x, b->logit_rows, nl, d));
        QLR_TRY(op->rmsnorm(be, xl, xl, m->out_norm, nl, d, c->rms_eps));
    } else {
        QLR_TRY(op->rmsnorm(be, xl, x, m->out_norm, nl, d, c->rms_eps));
    }
    if (m->lm_head_nf4) {
        if (!op->nf4_lm_head)
            return qlr_errorf(QLR_ERR_UNSUPPORTED, "the %s backend has no NF4 lm_head op",
                              be->name);
        return op->nf4_lm_head(be, *logits, xl, m->lm_head_nf4, nl);
    }
    return op->lm_head(be, *logits, xl, m->lm_head, nl, d, c->n_vocab);
}

qlr_status qlr_model_forward_dev(qlr_forward *f, qlr_kv_cache *kv, const qlr_batch_dev *b,
                                 float **logits) {
    return forward_dev(f, kv, NULL, b, logits);
}

/* A host batch over the contiguous cache kv, or the paged cache kvp with tables bt: validated,
 * copied into the workspace, then forward_dev. */
static qlr_status forward_host(qlr_forward *f, qlr_kv_cache *kv, qlr_kv_paged *kvp,
                               const qlr_batch *b, const qlr_block_table *bt, float **logits) {
    qlr_backend *be = f->m->be;
    QLR_TRY(check_batch(f, kv, kvp, b, bt));
    size_t bytes = (size_t)b->n * 4;
    qlr_batch_dev d = {b->n, f->buf[B_IDS], f->buf[B_POS], f->buf[B_SEQ], b->n_logits, NULL,
                       NULL, NULL, -1, fresh_prefill(b), NULL};
    QLR_TRY(be->mem.h2d(be, f->buf[B_IDS], b->tokens, bytes));
    QLR_TRY(be->mem.h2d(be, f->buf[B_POS], b->pos, bytes));
    QLR_TRY(be->mem.h2d(be, f->buf[B_SEQ], b->seq, bytes));
    QLR_TRY(set_adapters(f, b, &d));
    if (b->logit_rows && b->n_logits > 0) {
        d.logit_rows = f->buf[B_ROWS];
        QLR_TRY(be->mem.h2d(be, f->buf[B_ROWS], b->logit_rows, (size_t)b->n_logits * 4));
    }
    if (!kvp) return forward_dev(f, kv, NULL, &d, logits);
    paged_view pv = {kvp, f->buf[B_KVSLOT], bt->width};
    QLR_TRY(be->mem.h2d(be, f->buf[B_KVSLOT], f->kvslot_host, bytes));
    QLR_TRY(be->mem.h2d(be, kvp->table, bt->ids, (size_t)bt->n_seqs * (size_t)bt->width * 4));
    return forward_dev(f, NULL, &pv, &d, logits);
}

qlr_status qlr_model_forward(qlr_forward *f, qlr_kv_cache *kv, const qlr_batch *b,
                             float **logits) {
    return forward_host(f, kv, NULL, b, NULL, logits);
}

qlr_status qlr_model_forward_paged(qlr_forward *f, qlr_kv_paged *kv, const qlr_batch *b,
                                   const qlr_block_table *bt, float **logits) {
    return forward_host(f, NULL, kv, b, bt, logits);
}

/* ---- debug hooks ---- */

static qlr_status skip_rmsnorm(qlr_backend *be, void *y, const void *x, const float *w,
                               int64_t n, int64_t d, float eps) {
    return QLR_OK;
}
static qlr_status skip_add_rmsnorm(qlr_backend *be, void *x, void *y, const void *dx,
                                   const float *w, int64_t n, int64_t d, float eps) {
    return QLR_OK;
}
static qlr_status skip_rope(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                            int64_t n, int64_t n_heads, int64_t hd) {
    return QLR_OK;
}
static qlr_status skip_kv_store(qlr_backend *be, void *k_cache, void *v_cache, const void *k,
                                const void *v, const int32_t *seq, const int32_t *pos, int64_t n,
                                int64_t n_kv, int64_t hd, int64_t ctx) {
    return QLR_OK;
}
static qlr_status skip_rope_kv_store(qlr_backend *be, void *q, void *k, const void *v,
                                     void *k_cache, void *v_cache, const int32_t *seq,
                                     const int32_t *pos, const float *inv_freq, int64_t n,
                                     int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx) {
    return QLR_OK;
}
static qlr_status skip_attention(qlr_backend *be, void *out, const void *q, const void *k_cache,
                                 const void *v_cache, const int32_t *seq, const int32_t *pos,
                                 int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd, int64_t ctx,
                                 float scale) {
    return QLR_OK;
}
static qlr_status skip_kv_store_paged(qlr_backend *be, void *k_pool, void *v_pool, const void *k,
                                      const void *v, const int32_t *slot, int64_t n, int64_t n_kv,
                                      int64_t hd, int64_t n_rows) {
    return QLR_OK;
}
static qlr_status skip_attention_paged(qlr_backend *be, void *out, const void *q, const void *kp,
                                       const void *vp, const int32_t *btab, int64_t width,
                                       int64_t block, const int32_t *seq, const int32_t *pos,
                                       int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                       float scale) {
    return QLR_OK;
}
static qlr_status skip_attention_fresh(qlr_backend *be, void *out, const void *q, const void *k,
                                       const void *v, int64_t n, int64_t n_heads, int64_t n_kv,
                                       int64_t hd, float scale) {
    return QLR_OK;
}
static qlr_status skip_swiglu(qlr_backend *be, void *out, const void *gate, const void *up,
                              int64_t n) {
    return QLR_OK;
}
static qlr_status skip_swiglu_nf4_linear(qlr_backend *be, void *y, void *gate, const void *up,
                                         const qlr_nf4 *w, const float *bias, int64_t n) {
    return QLR_OK;
}
static qlr_status skip_lm_head(qlr_backend *be, float *logits, const void *x, const uint16_t *w,
                               int64_t n, int64_t d, int64_t vocab) {
    return QLR_OK;
}
static qlr_status skip_nf4_lm_head(qlr_backend *be, float *logits, const void *x,
                                   const qlr_nf4 *w, int64_t n) {
    return QLR_OK;
}
/* nf4_linear_multi carries q/k/v (k = 3) and gate/up (k = 2): one entry per skipped set; the
 * other set goes to the backend's own entry. */
static qlr_status skip_multi_qkv(qlr_backend *be, int k, void *const *y, const void *x,
                                 const qlr_nf4 *const *w, const float *const *bias, int64_t n) {
    return k == 3 ? QLR_OK : be->ops.nf4_linear_multi(be, k, y, x, w, bias, n);
}
static qlr_status skip_multi_gate_up(qlr_backend *be, int k, void *const *y, const void *x,
                                     const qlr_nf4 *const *w, const float *const *bias,
                                     int64_t n) {
    return k == 2 ? QLR_OK : be->ops.nf4_linear_multi(be, k, y, x, w, bias, n);
}
static qlr_status skip_multi_all(qlr_backend *be, int k, void *const *y, const void *x,
                                 const qlr_nf4 *const *w, const float *const *bias, int64_t n) {
    return QLR_OK;
}

/* Rebuilds the debug op table from the backend's: the fused entries dropped when unfused, then
 * each skipped kind's entries (those present) replaced by no-ops. The linears called one by one
 * are skipped in linear() itself. */
static void debug_ops_build(qlr_forward *f) {
    qlr_backend_ops *o = &f->debug_ops;
    uint32_t s = f->skip;
    *o = f->m->be->ops;
    f->debug = s != 0 || f->unfused;
    if (f->unfused) {
        o->nf4_linear_multi = NULL;
        o->swiglu_nf4_linear = NULL;
        o->add_rmsnorm = NULL;
        o->rope_kv_store = NULL;
    }
#define SKIP_OP(bit, entry, fn)                    \
    do {                                           \
        if ((s & (bit)) && o->entry) o->entry = fn; \
    } while (0)
    SKIP_OP(QLR_FORWARD_SKIP_ATTENTION, attention, skip_attention);
    SKIP_OP(QLR_FORWARD_SKIP_ATTENTION, attention_fresh, skip_attention_fresh);
    SKIP_OP(QLR_FORWARD_SKIP_ATTENTION, attention_paged, skip_attention_paged);
    SKIP_OP(QLR_FORWARD_SKIP_ROPE_KV, rope, skip_rope);
    SKIP_OP(QLR_FORWARD_SKIP_ROPE_KV, kv_store, skip_kv_store);
    SKIP_OP(QLR_FORWARD_SKIP_ROPE_KV, rope_kv_store, skip_rope_kv_store);
    SKIP_OP(QLR_FORWARD_SKIP_ROPE_KV, kv_store_paged, skip_kv_store_paged);
    SKIP_OP(QLR_FORWARD_SKIP_NORMS, rmsnorm, skip_rmsnorm);
    SKIP_OP(QLR_FORWARD_SKIP_NORMS, add_rmsnorm, skip_add_rmsnorm);
    SKIP_OP(QLR_FORWARD_SKIP_DOWN, swiglu, skip_swiglu);
    SKIP_OP(QLR_FORWARD_SKIP_DOWN, swiglu_nf4_linear, skip_swiglu_nf4_linear);
    SKIP_OP(QLR_FORWARD_SKIP_LM_HEAD, lm_head, skip_lm_head);
    SKIP_OP(QLR_FORWARD_SKIP_LM_HEAD, nf4_lm_head, skip_nf4_lm_head);
#undef SKIP_OP
    uint32_t both = QLR_FORWARD_SKIP_QKV | QLR_FORWARD_SKIP_GATE_UP;
    if (o->nf4_linear_multi && (s & both))
        o->nf4_linear_multi = (s & both) == both ? skip_multi_all
                              : (s & QLR_FORWARD_SKIP_QKV) ? skip_multi_qkv : skip_multi_gate_up;
}

void qlr_forward_set_skip(qlr_forward *f, uint32_t mask) {
    f->skip = mask & QLR_FORWARD_SKIP_ALL;
    debug_ops_build(f);
}

void qlr_forward_set_fused(qlr_forward *f, int fused) {
    f->unfused = !fused;
    debug_ops_build(f);
}

/* ---- generation ---- */

qlr_generate_params qlr_generate_params_default(void) {
    qlr_generate_params p;
    memset(&p, 0, sizeof p);
    p.n_predict = 128;
    p.sampling = qlr_sampling_default();
    p.n_batch = 256;
    return p;
}

qlr_status qlr_generate(qlr_forward *f, qlr_kv_cache *kv, const int32_t *prompt, int32_t n_prompt,
                        const qlr_generate_params *p, qlr_token_fn on_token, void *ud,
                        qlr_generate_stats *stats) {
    qlr_backend *be = f->m->be;
    memset(stats, 0, sizeof *stats);
    if (n_prompt < 1) return qlr_errorf(QLR_ERR_INVALID, "generate: the prompt is empty");
    if (n_prompt > kv->ctx)
        return qlr_errorf(QLR_ERR_RANGE, "generate: the prompt has %d tokens, the context holds %d",
                          n_prompt, kv->ctx);
    int32_t nb = p->n_batch > 0 ? p->n_batch : 256;
    if (nb > f->max_tokens) nb = f->max_tokens;
    int32_t *pos = malloc((size_t)nb * 4), *seq = calloc((size_t)nb, 4);
    if (!pos || !seq) {
        free(pos), free(seq);
        return qlr_errorf(QLR_ERR_NOMEM, "generate");
    }
    qlr_status st = QLR_OK;
    float *logits = NULL;
    double t0 = qlr_now();
    for (int32_t s = 0; s < n_prompt && st == QLR_OK; s += nb) {
        int32_t cnt = n_prompt - s < nb ? n_prompt - s : nb;
        for (int32_t i = 0; i < cnt; i++) pos[i] = s + i;
        int32_t last = cnt - 1;
        qlr_batch b = {cnt, prompt + s, pos, seq, s + cnt == n_prompt ? 1 : 0, &last,
                       p->adapters, NULL};
        st = qlr_model_forward(f, kv, &b, &logits);
    }
    if (st == QLR_OK) st = be->mem.sync(be);
    stats->n_prompt = n_prompt;
    stats->prompt_secs = qlr_now() - t0;
    t0 = qlr_now();
    uint64_t rng = p->seed;
    int32_t cur = n_prompt;
    for (int32_t g = 0; g < p->n_predict && st == QLR_OK; g++) {
        int32_t id;
        st = be->ops.sample(be, &id, logits, &p->sampling, &rng, 1, f->m->cfg.n_vocab);
        if (st != QLR_OK) break;
        int stop = 0;
        for (int32_t i = 0; i < p->n_stop; i++) stop |= id == p->stop_ids[i];
        if (stop) {
            stats->stopped = 1;
            break;
        }
        stats->n_gen++;
        if (on_token && on_token(ud, id)) break;
        if (g + 1 == p->n_predict) break;
        if (cur >= kv->ctx) {
            QLR_LOGW("generate: reached the end of the context (%d tokens)", kv->ctx);
            break;
        }
        int32_t zero = 0, p1 = cur;
        qlr_batch b = {1, &id, &p1, &zero, 1, NULL, p->adapters, NULL};
        st = qlr_model_forward(f, kv, &b, &logits);
        cur++;
    }
    if (st == QLR_OK) st = be->mem.sync(be);
    stats->gen_secs = qlr_now() - t0;
    free(pos);
    free(seq);
    return st;
}
