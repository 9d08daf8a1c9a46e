/* model/backprop.c: the training forward and backward of one packed micro-batch, written only
 * against the backend op table (no loops over data here: the host only validates the batch,
 * derives each token's sequence start, and sums the per-token losses in double).
 *   forward:  embedding -> per layer [RMSNorm -> q/k/v (+LoRA) -> RoPE -> varlen attention ->
 *             o (+LoRA) -> residual -> RMSNorm -> gate/up (+LoRA) -> SwiGLU -> down (+LoRA) ->
 *             residual] -> final RMSNorm -> per chunk of ce_chunk rows: lm_head + CE (+ dX)
 *   backward: final RMSNorm -> per layer, last to first, the transpose of the above; only the
 *             LoRA A/B gradients are formed (NF4 weights, norms, embeddings frozen).
 * Activations: without checkpointing every layer keeps its own set; with checkpointing only
 * each layer's input is kept and the layer is recomputed into one shared set right before its
 * backward (the same ops on the same inputs, so the same bits).
 * Long context: with offload the layer inputs live in pinned host memory: two device slots
 * take turns (layer l's input in slot l & 1), each input is copied out on the copy stream
 * while its layer runs and copied back one layer ahead of the backward; events order the two
 * streams, the host never waits. With mlp_chunk the MLP runs on row chunks (rows are
 * independent there), its [T, d_ff] tensors shrink to [mlp_chunk, d_ff] and gate/up/SwiGLU are
 * recomputed chunk by chunk in the backward. */
#include "model/backprop.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

qlr_train_params qlr_train_params_default(void) {
    qlr_train_params p;
    memset(&p, 0, sizeof p);
    p.max_tokens = 2048;
    p.max_seq_len = 2048;
    p.checkpointing = 1;
    p.lora_dropout = 0.0f;
    p.ce_chunk = 1024;
    return p;
}

/* ---- workspace plan ---- */

/* One layer's saved activations (offsets within a set). */
enum { A_XN1, A_Q, A_K, A_V, A_ATT, A_LSE, A_XMID, A_XN2, A_GATE, A_UP, A_H, A_COUNT };

/* Workspace buffers; B_XIN holds n_layers + 1 residual streams, B_ACTS one or n_layers sets. */
enum { B_XIN, B_ACTS, B_XF, B_DXF, B_GX, B_DXN, B_TMPD, B_DH, B_DGATE, B_DUP, B_DATT, B_DQ, B_DK,
       B_DV, B_DROPX, B_DROPDX, B_LOGITS, B_LOSS, B_IDS, B_POS, B_START, B_TGT, B_MGATE, B_MUP,
       B_MH, B_COUNT };

typedef struct {
    void *p[A_COUNT];
} act_set;

struct qlr_train_ctx {
    qlr_model *m;
    qlr_train_params p;
    void *block;
    uint64_t bytes;
    void *buf[B_COUNT];
    void **xin;       /* [n_layers + 1] [T, d]: input of layer l; xin[n_layers] = final stream
                         (offload: the two device slots, xin[l & 1] for layer l) */
    void *host_block; /* offload: pinned [n_layers] [T, d] */
    void **xhost;     /* offload: [n_layers] host copy of layer l's input */
    void *ev_mark;    /* offload: a point of the compute stream the copy stream waits for */
    void *ev_copy[2]; /* offload: the last copy into/out of device slot s has finished */
    act_set *acts;    /* [n_sets] */
    int32_t n_sets;
    int32_t *start_host;  /* [T] */
    float *loss_host;     /* [T] */
    /* per-step state */
    const qlr_adapter_set *set; /* slot 0 is the adapter being trained (NULL: none) */
    float dropout;        /* dropout of this call (0 in eval) */
    uint64_t seed;
};

static uint64_t al(uint64_t x) { return (x + 255) & ~255ull; }

/* Rows of the MLP's [rows, d_ff] buffers: mlp_chunk (at most T) when chunked, else T. */
static uint64_t ff_rows(const qlr_train_params *p) {
    return p->mlp_chunk > 0 && p->mlp_chunk < p->max_tokens ? (uint64_t)p->mlp_chunk
                                                             : (uint64_t)p->max_tokens;
}

/* A layer's activation set; gate/up/h are not kept when the MLP is chunked (chunked). */
static void act_sizes(const qlr_model_config *c, qlr_device_traits dt, int64_t T, int chunked,
                      uint64_t *sz) {
    uint64_t a = qlr_dtype_size(dt.act_dtype);
    uint64_t d = (uint64_t)c->d_model, q = (uint64_t)c->n_heads * c->head_dim,
             kv = (uint64_t)c->n_kv_heads * c->head_dim, ff = (uint64_t)c->d_ff;
    sz[A_XN1] = al(T * d * a);
    sz[A_Q] = al(T * q * a);
    sz[A_K] = al(T * kv * a);
    sz[A_V] = al(T * kv * a);
    sz[A_ATT] = al(T * q * a);
    sz[A_LSE] = al(T * (uint64_t)c->n_heads * 4);
    sz[A_XMID] = al(T * d * a);
    sz[A_XN2] = al(T * d * a);
    sz[A_GATE] = sz[A_UP] = sz[A_H] = chunked ? 0 : al(T * ff * a);
}

static uint64_t act_set_bytes(const qlr_model_config *c, qlr_device_traits dt, int64_t T,
                              int chunked) {
    uint64_t sz[A_COUNT], t = 0;
    act_sizes(c, dt, T, chunked, sz);
    for (int i = 0; i < A_COUNT; i++) t += sz[i];
    return t;
}

static void plan(const qlr_model_config *c, qlr_device_traits dt, const qlr_train_params *p,
                 uint64_t *sz) {
    uint64_t a = qlr_dtype_size(dt.act_dtype), T = (uint64_t)p->max_tokens;
    uint64_t d = (uint64_t)c->d_model, q = (uint64_t)c->n_heads * c->head_dim,
             kv = (uint64_t)c->n_kv_heads * c->head_dim, ff = (uint64_t)c->d_ff;
    uint64_t mx = d > q ? d : q, R = ff_rows(p);
    mx = T * mx > R * ff ? T * mx : R * ff;
    uint64_t chunk = (uint64_t)(p->ce_chunk < p->max_tokens ? p->ce_chunk : p->max_tokens);
    uint64_t sets = p->checkpointing ? 1 : (uint64_t)c->n_layers;
    int chunked = p->mlp_chunk > 0;
    sz[B_XIN] = (p->offload ? 2 : (uint64_t)c->n_layers + 1) * al(T * d * a);
    sz[B_ACTS] = sets * act_set_bytes(c, dt, (int64_t)T, chunked);
    /* with offload the final norm's output and its gradient use the (then idle) activation
     * set's xn1 and x_mid: the set is rewritten by the last layer's recompute after both died */
    sz[B_XF] = sz[B_DXF] = p->offload ? 0 : T * d * a;
    sz[B_GX] = sz[B_DXN] = T * d * a;
    /* with offload (and q >= d) the linear dx scratch is d attention out: the forward never
     * uses the latter, and the backward's accumulating dx (up, k, v) runs while it is dead */
    sz[B_TMPD] = p->offload && q >= d ? 0 : T * d * a;
    sz[B_DH] = sz[B_DGATE] = sz[B_DUP] = R * ff * a;
    sz[B_MGATE] = sz[B_MUP] = sz[B_MH] = chunked ? R * ff * a : 0;
    sz[B_DATT] = sz[B_DQ] = T * q * a;
    sz[B_DK] = sz[B_DV] = T * kv * a;
    sz[B_DROPX] = sz[B_DROPDX] = p->lora_dropout > 0.0f ? mx * a : 0;
    sz[B_LOGITS] = chunk * (uint64_t)c->n_vocab * 4;
    sz[B_LOSS] = sz[B_IDS] = sz[B_POS] = sz[B_START] = sz[B_TGT] = T * 4;
    for (int i = 0; i < B_COUNT; i++) sz[i] = al(sz[i]);
}

/* What each workspace buffer is, for the plan: name, plan group (in B_ order). */
static const struct {
    const char *group, *name;
} k_buf_names[B_COUNT] = {
    {"activations", "layer inputs [T, d_model] x (n_layers + 1)"},
    {"activations", "layer activations (per layer, or one set with checkpointing)"},
    {"backward", "final norm out [T, d_model]"},
    {"backward", "d final norm out [T, d_model]"},
    {"backward", "d residual [T, d_model]"},
    {"backward", "d norm out [T, d_model]"},
    {"backward", "linear dx scratch [T, d_model]"},
    {"backward", "d swiglu out [T or mlp_chunk, d_ff]"},
    {"backward", "d gate [T or mlp_chunk, d_ff]"},
    {"backward", "d up [T or mlp_chunk, d_ff]"},
    {"backward", "d attention out [T, heads*head_dim]"},
    {"backward", "dq [T, heads*head_dim]"},
    {"backward", "dk [T, kv_heads*head_dim]"},
    {"backward", "dv [T, kv_heads*head_dim]"},
    {"backward", "LoRA dropout input [T, max dim]"},
    {"backward", "LoRA dropout dx [T, max dim]"},
    {"lm_head_ce", "logits chunk f32 [ce_chunk, vocab]"},
    {"lm_head_ce", "per-token loss f32 [T]"},
    {"batch", "token ids int32 [T]"},
    {"batch", "positions int32 [T]"},
    {"batch", "sequence starts int32 [T]"},
    {"batch", "targets int32 [T]"},
    {"activations", "MLP chunk gate [mlp_chunk, d_ff]"},
    {"activations", "MLP chunk up [mlp_chunk, d_ff]"},
    {"activations", "MLP chunk swiglu out [mlp_chunk, d_ff]"},
};

uint64_t qlr_train_plan_bytes(const qlr_model_config *cfg, qlr_device_traits dt,
                              const qlr_train_params *p) {
    uint64_t sz[B_COUNT], t = 0;
    plan(cfg, dt, p, sz);
    for (int i = 0; i < B_COUNT; i++) t += sz[i];
    return t;
}

uint64_t qlr_train_plan_host_bytes(const qlr_model_config *cfg, qlr_device_traits dt,
                                   const qlr_train_params *p) {
    if (!p->offload) return 0;
    return (uint64_t)cfg->n_layers *
           al((uint64_t)p->max_tokens * cfg->d_model * qlr_dtype_size(dt.act_dtype));
}

void qlr_train_plan_items(const qlr_model_config *cfg, qlr_device_traits dt,
                          const qlr_train_params *p, qlr_mem_item_fn fn, void *ud) {
    uint64_t sz[B_COUNT];
    plan(cfg, dt, p, sz);
    for (int i = 0; i < B_COUNT; i++)
        if (sz[i]) fn(ud, k_buf_names[i].group, k_buf_names[i].name, 1, sz[i]);
    uint64_t h = qlr_train_plan_host_bytes(cfg, dt, p);
    if (h) fn(ud, "host", "layer inputs [T, d_model] x n_layers (pinned host)", 1, h);
}

qlr_status qlr_train_ctx_create(qlr_model *m, const qlr_train_params *p, qlr_train_ctx **out) {
    *out = NULL;
    qlr_backend *be = m->be;
    const qlr_model_config *cfg = &m->cfg;
    if (p->max_tokens < 1 || p->max_seq_len < 1 || p->ce_chunk < 1)
        return qlr_errorf(QLR_ERR_INVALID, "train workspace: max_tokens %d, max_seq_len %d and "
                          "ce_chunk %d must be >= 1", p->max_tokens, p->max_seq_len, p->ce_chunk);
    if (p->mlp_chunk < 0)
        return qlr_errorf(QLR_ERR_INVALID, "train workspace: mlp_chunk %d must be >= 0 (0 = "
                          "whole rows)", p->mlp_chunk);
    if (p->offload && !p->checkpointing)
        return qlr_errorf(QLR_ERR_INVALID, "train workspace: offloading the layer inputs needs "
                          "checkpointing");
    if (!(p->lora_dropout >= 0.0f && p->lora_dropout < 1.0f))
        return qlr_errorf(QLR_ERR_INVALID, "train workspace: lora_dropout %g must be in [0, 1)",
                          (double)p->lora_dropout);
    const qlr_backend_ops *o = &be->ops;
    const char *missing = !o->attention_varlen       ? "attention_varlen"
                          : !o->attention_varlen_bwd ? "attention_varlen_bwd"
                          : !o->lm_head_ce           ? "lm_head_ce"
                          : !o->dropout              ? "dropout"
                          : !o->rmsnorm_bwd          ? "rmsnorm_bwd"
                          : !o->rope_bwd             ? "rope_bwd"
                          : !o->swiglu_bwd           ? "swiglu_bwd"
                          : !o->nf4_linear_dx        ? "nf4_linear_dx"
                          : !o->lora_bwd             ? "lora_bwd"
                          : p->offload && (!be->mem.host_alloc || !be->mem.event_create)
                              ? "host_alloc/event_create (offload)"
                              : NULL;
    if (missing)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "the %s backend has no '%s' op yet: training "
                          "needs it (use the cpu backend)", be->name, missing);
    qlr_train_ctx *c = calloc(1, sizeof *c);
    if (!c) return qlr_errorf(QLR_ERR_NOMEM, "train workspace");
    c->m = m;
    c->p = *p;
    c->n_sets = p->checkpointing ? 1 : cfg->n_layers;
    c->xin = calloc((size_t)cfg->n_layers + 1, sizeof *c->xin);
    c->acts = calloc((size_t)c->n_sets, sizeof *c->acts);
    c->start_host = malloc((size_t)p->max_tokens * 4);
    c->loss_host = malloc((size_t)p->max_tokens * 4);
    qlr_device_traits dt = qlr_device_traits_of(be);
    c->bytes = qlr_train_plan_bytes(cfg, dt, p);
    int host_ok = c->xin && c->acts && c->start_host && c->loss_host;
    if (host_ok && p->offload) {
        c->xhost = calloc((size_t)cfg->n_layers, sizeof *c->xhost);
        host_ok = c->xhost != NULL;
    }
    c->block = host_ok ? be->mem.alloc(be, (size_t)c->bytes) : NULL;
    uint64_t hbytes = qlr_train_plan_host_bytes(cfg, dt, p);
    if (c->block && hbytes) {
        c->host_block = be->mem.host_alloc(be, (size_t)hbytes);
        c->ev_mark = c->host_block ? be->mem.event_create(be) : NULL;
        c->ev_copy[0] = c->ev_mark ? be->mem.event_create(be) : NULL;
        c->ev_copy[1] = c->ev_copy[0] ? be->mem.event_create(be) : NULL;
    }
    if (!c->block || (hbytes && !c->ev_copy[1])) {
        qlr_status st = host_ok ? qlr_error_status() : qlr_errorf(QLR_ERR_NOMEM, "train");
        qlr_error_prefix("train workspace of %.1f MiB + %.1f MiB pinned host (%d tokens, %s)",
                         (double)c->bytes / (1 << 20), (double)hbytes / (1 << 20), p->max_tokens,
                         p->offload ? "checkpointing, offload" : p->checkpointing
                                                                   ? "checkpointing"
                                                                   : "no checkpointing");
        qlr_train_ctx_free(c);
        return st;
    }
    uint64_t sz[B_COUNT], off = 0;
    plan(cfg, dt, p, sz);
    for (int i = 0; i < B_COUNT; i++) {
        c->buf[i] = (uint8_t *)c->block + off;
        off += sz[i];
    }
    uint64_t xsz = al((uint64_t)p->max_tokens * cfg->d_model * qlr_backend_act_size(be));
    for (int32_t l = 0; l <= cfg->n_layers; l++)
        c->xin[l] = (uint8_t *)c->buf[B_XIN] + (uint64_t)(p->offload ? (l & 1) : l) * xsz;
    for (int32_t l = 0; c->xhost && l < cfg->n_layers; l++)
        c->xhost[l] = (uint8_t *)c->host_block + l * xsz;
    uint64_t asz[A_COUNT], set = act_set_bytes(cfg, dt, p->max_tokens, p->mlp_chunk > 0);
    act_sizes(cfg, dt, p->max_tokens, p->mlp_chunk > 0, asz);
    for (int32_t s = 0; s < c->n_sets; s++) {
        uint64_t o2 = s * set;
        for (int i = 0; i < A_COUNT; i++) {
            c->acts[s].p[i] = (uint8_t *)c->buf[B_ACTS] + o2;
            o2 += asz[i];
        }
    }
    if (p->offload) { /* see plan(): the final norm's buffers borrow the idle set */
        c->buf[B_XF] = c->acts[0].p[A_XN1];
        c->buf[B_DXF] = c->acts[0].p[A_XMID];
        if (!sz[B_TMPD]) c->buf[B_TMPD] = c->buf[B_DATT];
    }
    *out = c;
    return QLR_OK;
}

void qlr_train_ctx_free(qlr_train_ctx *c) {
    if (!c) return;
    qlr_backend *be = c->m->be;
    if (c->ev_mark || c->host_block) (void)be->mem.sync(be); /* no copy may still use them */
    for (int i = 0; i < 2; i++)
        if (c->ev_copy[i]) be->mem.event_free(be, c->ev_copy[i]);
    if (c->ev_mark) be->mem.event_free(be, c->ev_mark);
    if (c->host_block) be->mem.host_free(be, c->host_block);
    if (c->block) be->mem.free(be, c->block);
    free(c->xhost);
    free(c->xin);
    free(c->acts);
    free(c->start_host);
    free(c->loss_host);
    free(c);
}

uint64_t qlr_train_dropout_seed(uint64_t dropout_seed, int32_t layer, qlr_linear_id id) {
    uint64_t z = dropout_seed ^ (((uint64_t)(uint32_t)layer << 8 | (uint64_t)id) *
                                 0xD1B54A32D192ED03ull);
    z ^= z >> 31;
    z *= 0x9E3779B97F4A7C15ull;
    z ^= z >> 29;
    return z;
}

/* ---- batch validation ---- */

static qlr_status check_batch(qlr_train_ctx *c, const qlr_train_batch *b, int64_t *n_targets) {
    const qlr_model_config *cfg = &c->m->cfg;
    if (b->n < 1 || b->n > c->p.max_tokens)
        return qlr_errorf(QLR_ERR_RANGE, "train batch of %d tokens (the workspace holds 1..%d)",
                          b->n, c->p.max_tokens);
    if (b->n_seq < 1)
        return qlr_errorf(QLR_ERR_RANGE, "train batch: n_seq %d must be >= 1", b->n_seq);
    int64_t nt = 0;
    int32_t first = 0;
    for (int32_t t = 0; t < b->n; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= cfg->n_vocab)
            return qlr_errorf(QLR_ERR_RANGE, "train batch token %d: id %d is outside the "
                              "vocabulary (0..%d)", t, b->tokens[t], cfg->n_vocab - 1);
        if (b->targets[t] != QLR_IGNORE_INDEX && (b->targets[t] < 0 || b->targets[t] >= cfg->n_vocab))
            return qlr_errorf(QLR_ERR_RANGE, "train batch token %d: target %d is outside the "
                              "vocabulary (0..%d) and not the ignore index -100", t,
                              b->targets[t], cfg->n_vocab - 1);
        nt += b->targets[t] != QLR_IGNORE_INDEX;
        int32_t want = t == 0 ? 0 : b->seq[t - 1];
        if (t > 0 && b->seq[t] == want + 1) first = t;
        else if (b->seq[t] != want)
            return qlr_errorf(QLR_ERR_RANGE, "train batch token %d: sequence id %d after %d "
                              "(ids must start at 0, stay contiguous and grow by one)", t,
                              b->seq[t], want);
        if (b->pos[t] < 0 || b->pos[t] >= c->p.max_seq_len)
            return qlr_errorf(QLR_ERR_RANGE, "train batch token %d: position %d is outside "
                              "0..%d (max_seq_len)", t, b->pos[t], c->p.max_seq_len - 1);
        if (t - first >= c->p.max_seq_len)
            return qlr_errorf(QLR_ERR_RANGE, "train batch token %d: sequence %d is longer than "
                              "max_seq_len %d", t, b->seq[t], c->p.max_seq_len);
        c->start_host[t] = first;
    }
    if (b->seq[b->n - 1] != b->n_seq - 1)
        return qlr_errorf(QLR_ERR_RANGE, "train batch: %d sequences found, n_seq says %d",
                          b->seq[b->n - 1] + 1, b->n_seq);
    *n_targets = nt;
    return QLR_OK;
}

static qlr_status check_set(const qlr_train_ctx *c, const qlr_adapter_set *set) {
    if (set && set->n_layers != c->m->cfg.n_layers)
        return qlr_errorf(QLR_ERR_INVALID, "adapter set made for %d layers (the model has %d)",
                          set->n_layers, c->m->cfg.n_layers);
    return QLR_OK;
}

/* ---- linears with LoRA (and LoRA dropout) ---- */

/* The dropout seed of (layer, linear) for the rows from row0: a chunk of the MLP that does not
 * start at row 0 draws its own mask (the op's counter restarts at each call). */
static uint64_t lin_seed(const qlr_train_ctx *c, int32_t l, qlr_linear_id id, int64_t row0) {
    uint64_t s = qlr_train_dropout_seed(c->seed, l, id);
    return row0 ? qlr_train_dropout_seed(s, (int32_t)(row0 & 0x7fffffff), id) : s;
}

/* y = x·Wᵀ (+bias) + LoRA(dropout(x)); x holds rows row0.. of the micro-batch. */
static qlr_status lin_fwd(qlr_train_ctx *c, int32_t l, qlr_linear_id id, void *y, const void *x,
                          int64_t n, int64_t row0) {
    qlr_backend *be = c->m->be;
    const qlr_layer *L = &c->m->layers[l];
    QLR_TRY(be->ops.nf4_linear(be, y, x, &L->w[id], L->bias[id], n));
    const qlr_lora_ref *r = qlr_adapter_set_ref(c->set, l, id, 0);
    if (!r || r->r <= 0) return QLR_OK;
    int64_t in = L->w[id].cols, out = L->w[id].rows;
    const void *xl = x;
    if (c->dropout > 0.0f) {
        QLR_TRY(be->ops.dropout(be, c->buf[B_DROPX], x, n * in, c->dropout,
                                lin_seed(c, l, id, row0)));
        xl = c->buf[B_DROPX];
    }
    return be->ops.lora(be, y, xl, r, n, in, out);
}

/* Backward of lin_fwd given dy [n, out]: LoRA grads into da/db (+=), and, when dx is not
 * NULL, the input gradient dy·W + LoRA's into dx (overwritten, or added when `acc`). */
static qlr_status lin_bwd(qlr_train_ctx *c, int32_t l, qlr_linear_id id, void *dx, int acc,
                          const void *dy, const void *x, int64_t n, int64_t row0,
                          float *const *da, float *const *db) {
    qlr_backend *be = c->m->be;
    const qlr_layer *L = &c->m->layers[l];
    int64_t in = L->w[id].cols, out = L->w[id].rows;
    if (dx) {
        void *t = acc ? c->buf[B_TMPD] : dx;
        QLR_ASSERT(!acc || in == c->m->cfg.d_model);
        QLR_TRY(be->ops.nf4_linear_dx(be, t, dy, &L->w[id], n));
        if (acc) QLR_TRY(be->ops.add(be, dx, t, n * in));
    }
    const qlr_lora_ref *r = qlr_adapter_set_ref(c->set, l, id, 0);
    if (!r || r->r <= 0) return QLR_OK;
    int64_t k = (int64_t)l * QLR_LIN_COUNT + id;
    float *gA = da ? da[k] : NULL, *gB = db ? db[k] : NULL;
    if (c->dropout <= 0.0f) return be->ops.lora_bwd(be, gA, gB, dx, dy, x, r, n, in, out);
    uint64_t seed = lin_seed(c, l, id, row0);
    void *xd = c->buf[B_DROPX], *gx = c->buf[B_DROPDX];
    QLR_TRY(be->ops.dropout(be, xd, x, n * in, c->dropout, seed));
    if (!dx) return be->ops.lora_bwd(be, gA, gB, NULL, dy, xd, r, n, in, out);
    QLR_TRY(be->mem.memset0(be, gx, (size_t)(n * in) * qlr_backend_act_size(be)));
    QLR_TRY(be->ops.lora_bwd(be, gA, gB, gx, dy, xd, r, n, in, out));
    QLR_TRY(be->ops.dropout(be, gx, gx, n * in, c->dropout, seed)); /* d dropout = same mask */
    return be->ops.add(be, dx, gx, n * in);
}

/* ---- one layer ---- */

/* The MLP's input side on rows row0..row0+n: g = gate(xn2), u = up(xn2), h = SwiGLU(g, u),
 * each [n, d_ff]. */
static qlr_status mlp_gate_up(qlr_train_ctx *c, int32_t l, const void *xn2, void *g, void *u,
                              void *h, int64_t n, int64_t row0) {
    qlr_backend *be = c->m->be;
    QLR_TRY(lin_fwd(c, l, QLR_LIN_GATE, g, xn2, n, row0));
    QLR_TRY(lin_fwd(c, l, QLR_LIN_UP, u, xn2, n, row0));
    return be->ops.swiglu(be, h, g, u, n * c->m->cfg.d_ff);
}

/* Backward of the MLP on rows row0..row0+n: gx [n, d] = d loss / d x_out in, dxn [n, d] =
 * d loss / d xn2 out (before the norm's backward); g/u/h are that rows' gate, up, SwiGLU. */
static qlr_status mlp_bwd(qlr_train_ctx *c, int32_t l, void *dxn, const void *gx,
                          const void *xn2, const void *g, const void *u, const void *h,
                          int64_t n, int64_t row0, float *const *da, float *const *db) {
    qlr_backend *be = c->m->be;
    void *dh = c->buf[B_DH], *dgate = c->buf[B_DGATE], *dup = c->buf[B_DUP];
    QLR_TRY(lin_bwd(c, l, QLR_LIN_DOWN, dh, 0, gx, h, n, row0, da, db));
    QLR_TRY(be->ops.swiglu_bwd(be, dgate, dup, dh, g, u, n * c->m->cfg.d_ff));
    QLR_TRY(lin_bwd(c, l, QLR_LIN_GATE, dxn, 0, dgate, xn2, n, row0, da, db));
    return lin_bwd(c, l, QLR_LIN_UP, dxn, 1, dup, xn2, n, row0, da, db);
}

/* Forward of layer l from x_in into activation set A; the layer output goes to x_out, or
 * the down projection is skipped when x_out is NULL (the recompute before backward needs
 * only what the backward reads). */
static qlr_status layer_fwd(qlr_train_ctx *c, int32_t l, const void *x_in, void *x_out,
                            const act_set *A, int64_t n) {
    qlr_model *m = c->m;
    qlr_backend *be = m->be;
    const qlr_model_config *cfg = &m->cfg;
    const qlr_layer *L = &m->layers[l];
    int64_t d = cfg->d_model, nh = cfg->n_heads, nkv = cfg->n_kv_heads, hd = cfg->head_dim;
    size_t as = qlr_backend_act_size(be);
    const int32_t *pos = c->buf[B_POS], *start = c->buf[B_START];
    void *tmp = c->buf[B_TMPD];
    QLR_TRY(be->ops.rmsnorm(be, A->p[A_XN1], x_in, L->attn_norm, n, d, cfg->rms_eps));
    QLR_TRY(lin_fwd(c, l, QLR_LIN_Q, A->p[A_Q], A->p[A_XN1], n, 0));
    QLR_TRY(lin_fwd(c, l, QLR_LIN_K, A->p[A_K], A->p[A_XN1], n, 0));
    QLR_TRY(lin_fwd(c, l, QLR_LIN_V, A->p[A_V], A->p[A_XN1], n, 0));
    QLR_TRY(be->ops.rope(be, A->p[A_Q], pos, m->inv_freq, n, nh, hd));
    QLR_TRY(be->ops.rope(be, A->p[A_K], pos, m->inv_freq, n, nkv, hd));
    QLR_TRY(be->ops.attention_varlen(be, A->p[A_ATT], A->p[A_LSE], A->p[A_Q], A->p[A_K],
                                     A->p[A_V], start, n, nh, nkv, hd, 1.0f / sqrtf((float)hd)));
    QLR_TRY(lin_fwd(c, l, QLR_LIN_O, tmp, A->p[A_ATT], n, 0));
    QLR_TRY(be->mem.d2d(be, A->p[A_XMID], x_in, (size_t)(n * d) * as));
    QLR_TRY(be->ops.add(be, A->p[A_XMID], tmp, n * d));
    QLR_TRY(be->ops.rmsnorm(be, A->p[A_XN2], A->p[A_XMID], L->ffn_norm, n, d, cfg->rms_eps));
    if (c->p.mlp_chunk > 0) {
        if (!x_out) return QLR_OK; /* the backward recomputes the MLP chunk by chunk */
        for (int64_t r0 = 0; r0 < n; r0 += c->p.mlp_chunk) {
            int64_t cn = n - r0 < c->p.mlp_chunk ? n - r0 : c->p.mlp_chunk;
            QLR_TRY(mlp_gate_up(c, l, (const uint8_t *)A->p[A_XN2] + r0 * d * as, c->buf[B_MGATE],
                                c->buf[B_MUP], c->buf[B_MH], cn, r0));
            QLR_TRY(lin_fwd(c, l, QLR_LIN_DOWN, (uint8_t *)tmp + r0 * d * as, c->buf[B_MH], cn, r0));
        }
    } else {
        QLR_TRY(mlp_gate_up(c, l, A->p[A_XN2], A->p[A_GATE], A->p[A_UP], A->p[A_H], n, 0));
        if (!x_out) return QLR_OK;
        QLR_TRY(lin_fwd(c, l, QLR_LIN_DOWN, tmp, A->p[A_H], n, 0));
    }
    QLR_TRY(be->mem.d2d(be, x_out, A->p[A_XMID], (size_t)(n * d) * as));
    return be->ops.add(be, x_out, tmp, n * d);
}

/* Backward of layer l: gx [n, d] holds d loss / d x_out and becomes d loss / d x_in (left
 * untouched past the attention when need_dx is 0: the first layer's input gradient is not
 * used). LoRA gradients accumulate into da/db. */
static qlr_status layer_bwd(qlr_train_ctx *c, int32_t l, const void *x_in, const act_set *A,
                            int64_t n, float *const *da, float *const *db, int need_dx) {
    qlr_model *m = c->m;
    qlr_backend *be = m->be;
    const qlr_model_config *cfg = &m->cfg;
    const qlr_layer *L = &m->layers[l];
    int64_t d = cfg->d_model, nh = cfg->n_heads, nkv = cfg->n_kv_heads, hd = cfg->head_dim;
    const int32_t *pos = c->buf[B_POS], *start = c->buf[B_START];
    void *gx = c->buf[B_GX], *dxn = c->buf[B_DXN], *datt = c->buf[B_DATT], *dq = c->buf[B_DQ],
         *dk = c->buf[B_DK], *dv = c->buf[B_DV];
    size_t as = qlr_backend_act_size(be);
    /* MLP: x_out = x_mid + down(swiglu(gate(xn2), up(xn2))), xn2 = rmsnorm(x_mid) */
    if (c->p.mlp_chunk > 0) {
        for (int64_t r0 = 0; r0 < n; r0 += c->p.mlp_chunk) {
            int64_t cn = n - r0 < c->p.mlp_chunk ? n - r0 : c->p.mlp_chunk;
            const uint8_t *xr = (const uint8_t *)A->p[A_XN2] + r0 * d * as;
            QLR_TRY(mlp_gate_up(c, l, xr, c->buf[B_MGATE], c->buf[B_MUP], c->buf[B_MH], cn, r0));
            QLR_TRY(mlp_bwd(c, l, (uint8_t *)dxn + r0 * d * as, (uint8_t *)gx + r0 * d * as, xr,
                            c->buf[B_MGATE], c->buf[B_MUP], c->buf[B_MH], cn, r0, da, db));
        }
    } else {
        QLR_TRY(mlp_bwd(c, l, dxn, gx, A->p[A_XN2], A->p[A_GATE], A->p[A_UP], A->p[A_H], n, 0,
                        da, db));
    }
    QLR_TRY(be->ops.rmsnorm_bwd(be, dxn, dxn, A->p[A_XMID], L->ffn_norm, n, d, cfg->rms_eps));
    QLR_TRY(be->ops.add(be, gx, dxn, n * d));
    /* attention: x_mid = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))) */
    QLR_TRY(lin_bwd(c, l, QLR_LIN_O, datt, 0, gx, A->p[A_ATT], n, 0, da, db));
    QLR_TRY(be->ops.attention_varlen_bwd(be, dq, dk, dv, datt, A->p[A_Q], A->p[A_K], A->p[A_V],
                                         A->p[A_ATT], A->p[A_LSE], start, n, nh, nkv, hd,
                                         1.0f / sqrtf((float)hd)));
    QLR_TRY(be->ops.rope_bwd(be, dq, pos, m->inv_freq, n, nh, hd));
    QLR_TRY(be->ops.rope_bwd(be, dk, pos, m->inv_freq, n, nkv, hd));
    void *dxo = need_dx ? dxn : NULL;
    QLR_TRY(lin_bwd(c, l, QLR_LIN_Q, dxo, 0, dq, A->p[A_XN1], n, 0, da, db));
    QLR_TRY(lin_bwd(c, l, QLR_LIN_K, dxo, 1, dk, A->p[A_XN1], n, 0, da, db));
    QLR_TRY(lin_bwd(c, l, QLR_LIN_V, dxo, 1, dv, A->p[A_XN1], n, 0, da, db));
    if (!need_dx) return QLR_OK;
    QLR_TRY(be->ops.rmsnorm_bwd(be, dxn, dxn, x_in, L->attn_norm, n, d, cfg->rms_eps));
    return be->ops.add(be, gx, dxn, n * d);
}

/* ---- the step ---- */

/* Forward through every layer, then the chunked lm_head + CE (with dX into B_DXF when
 * with_grad). Loss per token lands in loss_host. */
static qlr_status forward(qlr_train_ctx *c, const qlr_train_batch *b, int with_grad,
                          float grad_scale) {
    qlr_model *m = c->m;
    qlr_backend *be = m->be;
    const qlr_model_config *cfg = &m->cfg;
    int64_t n = b->n, d = cfg->d_model;
    QLR_TRY(be->mem.h2d(be, c->buf[B_IDS], b->tokens, (size_t)n * 4));
    QLR_TRY(be->mem.h2d(be, c->buf[B_POS], b->pos, (size_t)n * 4));
    QLR_TRY(be->mem.h2d(be, c->buf[B_START], c->start_host, (size_t)n * 4));
    QLR_TRY(be->mem.h2d(be, c->buf[B_TGT], b->targets, (size_t)n * 4));
    QLR_TRY(be->ops.embedding(be, c->xin[0], m->tok_embd, c->buf[B_IDS], n, d, cfg->n_vocab));
    int off = c->p.offload && with_grad; /* eval keeps no layer input */
    size_t xbytes = (size_t)(n * d) * qlr_backend_act_size(be);
    for (int32_t l = 0; l < cfg->n_layers; l++) {
        const act_set *A = &c->acts[with_grad && !c->p.checkpointing ? l : 0];
        if (off) { /* layer l's input goes out while layer l runs */
            QLR_TRY(be->mem.event_record(be, c->ev_mark, 0));
            QLR_TRY(be->mem.event_wait(be, c->ev_mark, 1));
            QLR_TRY(be->mem.d2h_side(be, c->xhost[l], c->xin[l], xbytes));
            QLR_TRY(be->mem.event_record(be, c->ev_copy[l & 1], 1));
            /* layer l writes the slot of layer l - 1's input: its copy must be out */
            if (l > 0) QLR_TRY(be->mem.event_wait(be, c->ev_copy[(l - 1) & 1], 0));
        }
        QLR_TRY(layer_fwd(c, l, c->xin[l], c->xin[l + 1], A, n));
    }
    void *xf = c->buf[B_XF];
    QLR_TRY(be->ops.rmsnorm(be, xf, c->xin[cfg->n_layers], m->out_norm, n, d, cfg->rms_eps));
    size_t as = qlr_backend_act_size(be);
    int64_t ch = c->p.ce_chunk;
    for (int64_t r0 = 0; r0 < n; r0 += ch) {
        int64_t cn = n - r0 < ch ? n - r0 : ch, nt = 0;
        for (int64_t i = r0; i < r0 + cn; i++) nt += b->targets[i] != QLR_IGNORE_INDEX;
        void *dx = with_grad ? (uint8_t *)c->buf[B_DXF] + r0 * d * as : NULL;
        if (nt == 0) { /* nothing to learn from these rows: skip their logits */
            QLR_TRY(be->mem.memset0(be, (float *)c->buf[B_LOSS] + r0, (size_t)cn * 4));
            if (dx) QLR_TRY(be->mem.memset0(be, dx, (size_t)(cn * d) * as));
            continue;
        }
        float *loss = (float *)c->buf[B_LOSS] + r0;
        QLR_TRY(be->ops.lm_head_ce(be, loss, dx, c->buf[B_LOGITS], (uint8_t *)xf + r0 * d * as,
                                   m->lm_head, (const int32_t *)c->buf[B_TGT] + r0, cn, d,
                                   cfg->n_vocab, grad_scale));
    }
    return QLR_OK;
}

/* The per-token losses of the last forward, read back once (after the backward is queued, so the
 * host never waits between forward and backward): the step's one read-back besides the clip's. */
static qlr_status read_losses(qlr_train_ctx *c, int64_t n) {
    qlr_backend *be = c->m->be;
    QLR_TRY(be->mem.d2h(be, c->loss_host, c->buf[B_LOSS], (size_t)n * 4));
    return be->mem.sync(be);
}

static double loss_total(const qlr_train_ctx *c, const qlr_train_batch *b) {
    double s = 0.0;
    for (int32_t i = 0; i < b->n; i++)
        if (b->targets[i] != QLR_IGNORE_INDEX) s += c->loss_host[i];
    return s;
}

qlr_status qlr_train_fwd_bwd(qlr_train_ctx *c, const qlr_adapter_set *set,
                             const qlr_train_batch *b, float grad_scale, float *const *da,
                             float *const *db, uint64_t dropout_seed, double *loss_sum,
                             int64_t *n_targets) {
    qlr_model *m = c->m;
    qlr_backend *be = m->be;
    const qlr_model_config *cfg = &m->cfg;
    *loss_sum = 0.0;
    *n_targets = 0;
    int64_t nt = 0;
    QLR_TRY(check_batch(c, b, &nt));
    QLR_TRY(check_set(c, set));
    int64_t n = b->n, d = cfg->d_model;
    c->set = set;
    c->dropout = c->p.lora_dropout;
    c->seed = dropout_seed;
    QLR_TRY(forward(c, b, 1, grad_scale));
    /* final RMSNorm backward: d loss / d (last layer's output) */
    QLR_TRY(be->ops.rmsnorm_bwd(be, c->buf[B_GX], c->buf[B_DXF], c->xin[cfg->n_layers],
                                m->out_norm, n, d, cfg->rms_eps));
    size_t xbytes = (size_t)(n * d) * qlr_backend_act_size(be);
    for (int32_t l = cfg->n_layers - 1; l >= 0; l--) {
        const act_set *A = &c->acts[c->p.checkpointing ? 0 : l];
        if (c->p.offload) {
            /* layer l's input: still on the device for the last layer, else copied in while
             * layer l + 1 ran */
            if (l < cfg->n_layers - 1) QLR_TRY(be->mem.event_wait(be, c->ev_copy[l & 1], 0));
            /* layer l - 1's input into the other slot, free once what was queued before
             * (layer l + 1, or the final norm reading x_out) has run; overlaps layer l */
            if (l > 0) {
                QLR_TRY(be->mem.event_record(be, c->ev_mark, 0));
                QLR_TRY(be->mem.event_wait(be, c->ev_mark, 1));
                QLR_TRY(be->mem.h2d_side(be, c->xin[l - 1], c->xhost[l - 1], xbytes));
                QLR_TRY(be->mem.event_record(be, c->ev_copy[(l - 1) & 1], 1));
            }
        }
        if (c->p.checkpointing) QLR_TRY(layer_fwd(c, l, c->xin[l], NULL, A, n));
        QLR_TRY(layer_bwd(c, l, c->xin[l], A, n, da, db, l > 0));
    }
    QLR_TRY(read_losses(c, n));
    *loss_sum = loss_total(c, b);
    *n_targets = nt;
    return QLR_OK;
}

qlr_status qlr_train_eval(qlr_train_ctx *c, const qlr_adapter_set *set, const qlr_train_batch *b,
                          double *loss_sum, int64_t *n_targets) {
    *loss_sum = 0.0;
    *n_targets = 0;
    int64_t nt = 0;
    QLR_TRY(check_batch(c, b, &nt));
    QLR_TRY(check_set(c, set));
    c->set = set;
    c->dropout = 0.0f;
    c->seed = 0;
    QLR_TRY(forward(c, b, 0, 1.0f));
    QLR_TRY(read_losses(c, b->n));
    *loss_sum = loss_total(c, b);
    *n_targets = nt;
    return QLR_OK;
}
