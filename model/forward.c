/* model/forward.c: the KV cache, the forward workspace (one device allocation carved from a
 * table of sizes) and the transformer forward for a batch of tokens from any number of
 * sequences at any positions, over a contiguous cache or a paged one (model/kv_paged.c: K/V
 * stored at each token's pool row, attention through the batch's block table), written only
 * against the backend op table:
 *   embedding -> per layer [RMSNorm -> q/k/v (+LoRA) -> RoPE -> KV store -> attention (over
 *   the batch's own k/v for a fresh prefill when the backend has attention_fresh) ->
 *   o (+LoRA) -> residual -> RMSNorm -> gate/up (+LoRA) -> SwiGLU -> down (+LoRA) -> residual]
 *   -> gather the rows whose logits are wanted -> final RMSNorm -> lm_head. */
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
    int32_t *rows_host; /* [max_logits] */
    int32_t *slot_host; /* [max_tokens] */
    int32_t *kvslot_host; /* [max_tokens] paged cache: each token's pool row */
    /* adapters of the current call */
    const qlr_adapter_set *set;
    int32_t uniform;    /* the slot every token uses, or -1 when they differ */
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
    sz[B_SLOT] = (uint64_t)T * 4;
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
    f->rows_host = malloc((size_t)max_logits * 4);
    f->slot_host = malloc((size_t)max_tokens * 4);
    f->kvslot_host = malloc((size_t)max_tokens * 4);
    if (!f->block || !f->rows_host || !f->slot_host || !f->kvslot_host) {
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
    free(f->rows_host);
    free(f->slot_host);
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

/* Exactly one of kv (contiguous) and kvp (paged) is set. */
static qlr_status check_batch(qlr_forward *f, const qlr_kv_cache *kv, const qlr_kv_paged *kvp,
                              const qlr_batch *b, const qlr_block_table *bt) {
    const qlr_model_config *c = &f->m->cfg;
    if (b->n < 1 || b->n > f->max_tokens)
        return qlr_errorf(QLR_ERR_RANGE, "batch of %d tokens (workspace holds 1..%d)", b->n,
                          f->max_tokens);
    if (b->n_logits < 0 || b->n_logits > f->max_logits || b->n_logits > b->n)
        return qlr_errorf(QLR_ERR_RANGE, "%d logits rows requested (workspace holds %d, batch %d)",
                          b->n_logits, f->max_logits, b->n);
    if (kv && (kv->n_layers != c->n_layers || kv->n_kv != c->n_kv_heads ||
               kv->head_dim != c->head_dim))
        return qlr_errorf(QLR_ERR_INVALID, "KV cache was made for another model");
    if (kvp && (kvp->n_layers != c->n_layers || kvp->n_kv != c->n_kv_heads ||
                kvp->head_dim != c->head_dim))
        return qlr_errorf(QLR_ERR_INVALID, "paged KV cache was made for another model");
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
    if (b->adapters && (b->adapters->n_layers != c->n_layers || b->adapters->n_slots < 1))
        return qlr_errorf(QLR_ERR_INVALID, "adapter set made for %d layers (the model has %d)",
                          b->adapters->n_layers, c->n_layers);
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
    if (!be->ops.lora_batched) { /* until every backend has the batched op */
        if (f->uniform < 0)
            return qlr_errorf(QLR_ERR_UNSUPPORTED, "the %s backend cannot apply different "
                              "adapters in one batch yet (no lora_batched op)", be->name);
        return be->ops.lora(be, y, x, &s->host[row + f->uniform], n, w->cols, w->rows);
    }
    return be->ops.lora_batched(be, y, x, s->dev + row, s->host + row, s->n_slots,
                                f->buf[B_SLOT], s->max_r, f->uniform, n, w->cols, w->rows);
}

static qlr_status linear(qlr_forward *f, int32_t l, qlr_linear_id id, void *y, const void *x,
                         int64_t n) {
    const qlr_layer *L = &f->m->layers[l];
    QLR_TRY(f->m->be->ops.nf4_linear(f->m->be, y, x, &L->w[id], L->bias[id], n));
    return lora(f, l, id, y, x, n);
}

/* Uploads the batch's adapter slots (when it has a set) and notes whether they are uniform. */
static qlr_status set_adapters(qlr_forward *f, const qlr_batch *b) {
    const qlr_adapter_set *s = b->adapters;
    f->set = NULL;
    f->uniform = -1;
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
    f->set = s;
    f->uniform = u;
    return f->m->be->mem.h2d(f->m->be, f->buf[B_SLOT], f->slot_host, (size_t)b->n * 4);
}

/* The forward over the contiguous cache kv or the paged cache kvp with tables bt (exactly one
 * cache is set). */
static qlr_status forward(qlr_forward *f, qlr_kv_cache *kv, qlr_kv_paged *kvp, const qlr_batch *b,
                          const qlr_block_table *bt, float **logits) {
    qlr_model *m = f->m;
    qlr_backend *be = m->be;
    const qlr_model_config *c = &m->cfg;
    QLR_TRY(check_batch(f, kv, kvp, b, bt));
    if (kvp && (!be->ops.kv_store_paged || !be->ops.attention_paged))
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "the %s backend has no paged KV cache ops",
                          be->name);
    int64_t n = b->n, d = c->d_model, nh = c->n_heads, nkv = c->n_kv_heads, hd = c->head_dim;
    int32_t *ids = f->buf[B_IDS], *pos = f->buf[B_POS], *seq = f->buf[B_SEQ], *rows = f->buf[B_ROWS];
    void *x = f->buf[B_X], *xn = f->buf[B_XN], *q = f->buf[B_Q], *k = f->buf[B_K], *v = f->buf[B_V],
         *att = f->buf[B_ATT], *o = f->buf[B_O], *gate = f->buf[B_GATE], *up = f->buf[B_UP];
    QLR_TRY(be->mem.h2d(be, ids, b->tokens, (size_t)n * 4));
    QLR_TRY(be->mem.h2d(be, pos, b->pos, (size_t)n * 4));
    QLR_TRY(be->mem.h2d(be, seq, b->seq, (size_t)n * 4));
    QLR_TRY(set_adapters(f, b));
    int32_t *kvslot = f->buf[B_KVSLOT];
    if (kvp) {
        QLR_TRY(be->mem.h2d(be, kvslot, f->kvslot_host, (size_t)n * 4));
        QLR_TRY(be->mem.h2d(be, kvp->table, bt->ids, (size_t)bt->n_seqs * (size_t)bt->width * 4));
    }

    QLR_TRY(be->ops.embedding(be, x, m->tok_embd, ids, n, d, c->n_vocab));
    if (f->hidden_fn) f->hidden_fn(f->hidden_ud, -1, x, n, d);
    float scale = 1.0f / sqrtf((float)hd);
    /* Optional fused ops (NULL on the CPU: the separate ops below, in the same order). Without a
     * hidden-state callback the residual add of a layer's MLP is deferred into the next layer's
     * add_rmsnorm (`pending`). */
    const qlr_backend_ops *op = &be->ops;
    void *pending = NULL;
    /* A fresh prefill longer than 64 tokens goes through attention_fresh when the backend has it
     * (k/v are still stored into the cache for later steps); on QLR_ERR_UNSUPPORTED the error is
     * cleared and this forward uses the attention op from then on. */
    int fresh = op->attention_fresh && n > 64 && fresh_prefill(b);
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
            QLR_TRY(op->kv_store_paged(be, kvp->k[l], kvp->v[l], k, v, kvslot, n, nkv, hd,
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
            QLR_TRY(op->attention_paged(be, att, q, kvp->k[l], kvp->v[l], kvp->table, bt->width,
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
    for (int32_t i = 0; i < nl; i++) f->rows_host[i] = b->logit_rows ? b->logit_rows[i] : i;
    QLR_TRY(be->mem.h2d(be, rows, f->rows_host, (size_t)nl * 4));
    void *xl = f->buf[B_XL];
    QLR_TRY(be->ops.get_rows(be, xl, x, rows, nl, d));
    QLR_TRY(be->ops.rmsnorm(be, xl, xl, m->out_norm, nl, d, c->rms_eps));
    QLR_TRY(be->ops.lm_head(be, *logits, xl, m->lm_head, nl, d, c->n_vocab));
    return QLR_OK;
}

qlr_status qlr_model_forward(qlr_forward *f, qlr_kv_cache *kv, const qlr_batch *b,
                             float **logits) {
    return forward(f, kv, NULL, b, NULL, logits);
}

qlr_status qlr_model_forward_paged(qlr_forward *f, qlr_kv_paged *kv, const qlr_batch *b,
                                   const qlr_block_table *bt, float **logits) {
    return forward(f, NULL, kv, b, bt, logits);
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
