/* bench/decode_bench.c: see decode_bench.h. A Llama forward written against the backend op table
 * (embedding, RMSNorm, NF4 q/k/v/o/gate/up/down, RoPE, kv_store, attention, SwiGLU, residual
 * adds, lm_head, greedy sampling) on random weights: NF4 codes and double-quant absmax bytes are
 * random (never zeros, which run faster than real data), embeddings and lm_head random bf16.
 * Measures: copy bandwidth (device-to-device, bytes read + written), cuBLASLt bf16 GEMM rate
 * (8192^3), prefill tokens/s and its linear layers' share of the GEMM rate, decode tokens/s at
 * batch 1/8/32/64 and batch-1 decode against the NF4 bandwidth bound, the fused-vs-dequant
 * crossover of the NF4 linear, and peak device memory. Host wall clock around synchronised
 * regions (a decode step ends in the sampler's device-to-host copy anyway). */
#include "bench/decode_bench.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "core/core.h"
#ifdef QLR_BACKEND_CUDA
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include "backend/cuda/cuda_backend.h"
#endif

typedef struct mcfg {
    const char *name;
    int64_t hidden, layers, heads, kv, hd, ff, vocab;
    int tied;
    float theta;
    int llama3;              /* llama3 rope scaling (factor 8, low 1, high 4, original 8192) */
} mcfg;

static const mcfg k_models[] = {
    {"llama3-8b", 4096, 32, 32, 8, 128, 14336, 128256, 0, 500000.0f, 1},
    {"smollm2-135m", 576, 30, 9, 3, 64, 1536, 49152, 1, 100000.0f, 0},
};

typedef struct blayer {
    qlr_nf4 w[7]; /* q, k, v, o, gate, up, down */
    float *ln1, *ln2;
    void *kc, *vc;
} blayer;

typedef struct bmodel {
    mcfg c;
    qlr_backend *be;
    blayer *L;
    uint16_t *emb, *head;
    float *lnf, *inv_freq;
    int64_t n_seq, ctx, max_n;
    void *x, *h, *q, *k, *v, *att, *g, *u, *o;
    float *logits;
    int32_t *d_ids, *d_seq, *d_pos;
    double nf4_bytes, nf4_params;
    int use_fused; /* call the optional fused ops when the backend has them */
    qlr_nf4 head_nf4;  /* the lm_head as NF4 (serving with a 4-bit output projection) */
    double head_nf4_bytes;
    int use_nf4_head;  /* single-row logits through head_nf4 */
    int fresh_prefill; /* this forward is one sequence at positions 0..n-1 (set by forward()) */
    int no_fresh;      /* 1: the attention op even for fresh prefills (our kernel, not cuDNN) */
    int fresh_served;  /* layers attention_fresh served (counts up) */
    int skip;          /* kinds of kernel left out (b1_marginal; timing only): 1 attention,
                          2 rope_kv, 4 norms, 8 q/k/v, 16 o, 32 gate/up, 64 down, 128 lm_head */
} bmodel;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t xs_state = 0x9e3779b97f4a7c15ull;
static void fill_random(void *p, size_t bytes) {
    uint64_t s = xs_state;
    uint8_t *b = p;
    size_t i = 0;
    for (; i + 8 <= bytes; i += 8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        memcpy(b + i, &s, 8);
    }
    for (; i < bytes; i++) b[i] = (uint8_t)(s >> (8 * (i & 7)));
    xs_state = s;
}

/* bf16 values N-ish(0, sigma): random mantissa bits with a fixed small exponent range */
static void fill_bf16(uint16_t *p, size_t n, float sigma) {
    uint64_t s = xs_state;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        float u = (float)((s >> 11) & 0xffffff) / 16777216.0f - 0.5f;
        p[i] = qlr_f32_to_bf16(u * 3.4f * sigma);
    }
    xs_state = s;
}

static void *dalloc(bmodel *m, size_t bytes, qlr_status *st) {
    if (*st != QLR_OK) return NULL;
    void *p = m->be->mem.alloc(m->be, bytes);
    if (!p) *st = qlr_error_status();
    return p;
}

static qlr_status upload(bmodel *m, void *dst, const void *src, size_t bytes) {
    return m->be->mem.h2d(m->be, dst, src, bytes);
}

static void model_free(bmodel *m) {
    qlr_backend *be = m->be;
    if (!be) return;
    be->mem.sync(be);
    if (m->L)
        for (int64_t l = 0; l < m->c.layers; l++) {
            for (int i = 0; i < 7; i++)
                if (m->L[l].w[i].codes) qlr_backend_nf4_free(be, &m->L[l].w[i]);
            be->mem.free(be, m->L[l].ln1);
            be->mem.free(be, m->L[l].ln2);
            be->mem.free(be, m->L[l].kc);
            be->mem.free(be, m->L[l].vc);
        }
    free(m->L);
    if (m->head_nf4.codes) qlr_backend_nf4_free(be, &m->head_nf4);
    void *bufs[] = {m->emb, m->c.tied ? NULL : m->head, m->lnf, m->inv_freq, m->x, m->h, m->q,
                    m->k, m->v, m->att, m->g, m->u, m->o, m->logits, m->d_ids, m->d_seq, m->d_pos};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->mem.free(be, bufs[i]);
    memset(m, 0, sizeof *m);
}

static qlr_status model_create(qlr_backend *be, const mcfg *c, int64_t n_seq, int64_t ctx,
                               int64_t max_n, bmodel *m) {
    memset(m, 0, sizeof *m);
    m->c = *c;
    m->be = be;
    m->n_seq = n_seq;
    m->ctx = ctx;
    m->max_n = max_n;
    qlr_status st = QLR_OK;
    int64_t H = c->heads * c->hd, KV = c->kv * c->hd;
    int64_t shapes[7][2] = {{H, c->hidden}, {KV, c->hidden}, {KV, c->hidden}, {c->hidden, H},
                            {c->ff, c->hidden}, {c->ff, c->hidden}, {c->hidden, c->ff}};
    int64_t max_el = 0;
    for (int i = 0; i < 7; i++)
        if (shapes[i][0] * shapes[i][1] > max_el) max_el = shapes[i][0] * shapes[i][1];
    /* random host bytes shared by every layer's upload (content does not matter for speed) */
    int64_t max_blocks = (max_el + 63) / 64;
    uint8_t *hcodes = malloc((size_t)(max_el / 2 + 16)), *haq = malloc((size_t)max_blocks + 16);
    float *hdqa = malloc((size_t)(max_blocks / 256 + 2) * 4);
    if (!hcodes || !haq || !hdqa) {
        free(hcodes);
        free(haq);
        free(hdqa);
        return qlr_errorf(QLR_ERR_NOMEM, "bench: host buffers");
    }
    fill_random(hcodes, (size_t)(max_el / 2 + 16));
    fill_random(haq, (size_t)max_blocks + 16);
    for (int64_t i = 0; i < max_blocks / 256 + 2; i++) hdqa[i] = 0.01f + 0.001f * (float)(i % 7);
    float *ones = malloc((size_t)(c->ff > c->hidden ? c->ff : c->hidden) * 4);
    for (int64_t i = 0; i < c->hidden; i++) ones[i] = 1.0f + 0.01f * (float)(i % 5);
    m->L = calloc((size_t)c->layers, sizeof *m->L);
    size_t cache_bytes = (size_t)(n_seq * ctx * KV) * 2;
    for (int64_t l = 0; l < c->layers && st == QLR_OK; l++) {
        blayer *L = &m->L[l];
        for (int i = 0; i < 7 && st == QLR_OK; i++) {
            qlr_nf4 h;
            memset(&h, 0, sizeof h);
            h.rows = shapes[i][0];
            h.cols = shapes[i][1];
            h.n = h.rows * h.cols;
            h.n_blocks = (h.n + 63) / 64;
            h.n_dq_blocks = (h.n_blocks + 255) / 256;
            h.dq = 1;
            h.codes = hcodes;
            h.absmax_q = haq;
            h.dq_absmax = hdqa;
            h.dq_offset = 0.03f;
            st = qlr_backend_nf4_upload(be, &h, &L->w[i], 0);
            m->nf4_bytes += (double)((h.n + 1) / 2 + h.n_blocks + 4 * h.n_dq_blocks);
            m->nf4_params += (double)h.n;
        }
        L->ln1 = dalloc(m, (size_t)c->hidden * 4, &st);
        L->ln2 = dalloc(m, (size_t)c->hidden * 4, &st);
        L->kc = dalloc(m, cache_bytes, &st);
        L->vc = dalloc(m, cache_bytes, &st);
        if (st == QLR_OK) st = upload(m, L->ln1, ones, (size_t)c->hidden * 4);
        if (st == QLR_OK) st = upload(m, L->ln2, ones, (size_t)c->hidden * 4);
        if (st == QLR_OK) st = be->mem.memset0(be, L->kc, cache_bytes);
        if (st == QLR_OK) st = be->mem.memset0(be, L->vc, cache_bytes);
        if (st == QLR_OK) st = be->mem.sync(be);
    }
#ifdef QLR_BACKEND_CUDA
    /* the lm_head again as NF4 (random codes; the bf16 table below stays the default) */
    if (st == QLR_OK && !c->tied) {
        int64_t hn = c->vocab * c->hidden, hb = (hn + 63) / 64;
        uint8_t *hc = malloc((size_t)(hn / 2 + 16)), *ha = malloc((size_t)hb + 16);
        float *hd = malloc((size_t)(hb / 256 + 2) * 4);
        if (!hc || !ha || !hd) st = qlr_errorf(QLR_ERR_NOMEM, "bench: host buffers");
        if (st == QLR_OK) {
            fill_random(hc, (size_t)(hn / 2 + 16));
            fill_random(ha, (size_t)hb + 16);
            for (int64_t i = 0; i < hb / 256 + 2; i++) hd[i] = 0.01f + 0.001f * (float)(i % 7);
            qlr_nf4 h;
            memset(&h, 0, sizeof h);
            h.rows = c->vocab;
            h.cols = c->hidden;
            h.n = hn;
            h.n_blocks = hb;
            h.n_dq_blocks = (hb + 255) / 256;
            h.dq = 1;
            h.codes = hc;
            h.absmax_q = ha;
            h.dq_absmax = hd;
            h.dq_offset = 0.03f;
            st = qlr_backend_nf4_upload(be, &h, &m->head_nf4, 0);
            m->head_nf4_bytes = (double)((hn + 1) / 2 + hb + 4 * h.n_dq_blocks);
        }
        free(hc);
        free(ha);
        free(hd);
    }
#endif
    free(hcodes);
    free(haq);
    free(hdqa);
    /* embedding and lm_head (tied: one table) */
    size_t tab = (size_t)(c->vocab * c->hidden);
    uint16_t *ht = malloc(tab * 2);
    if (!ht) st = qlr_errorf(QLR_ERR_NOMEM, "bench: host table");
    if (st == QLR_OK) fill_bf16(ht, tab, 0.02f);
    m->emb = dalloc(m, tab * 2, &st);
    if (st == QLR_OK) st = upload(m, m->emb, ht, tab * 2);
    if (c->tied) m->head = m->emb;
    else {
        m->head = dalloc(m, tab * 2, &st);
        if (st == QLR_OK) st = upload(m, m->head, ht, tab * 2);
    }
    if (st == QLR_OK) st = be->mem.sync(be);
    free(ht);
    m->lnf = dalloc(m, (size_t)c->hidden * 4, &st);
    if (st == QLR_OK) st = upload(m, m->lnf, ones, (size_t)c->hidden * 4);
    /* inverse frequencies, with llama3 scaling for the 8B */
    float *inv = malloc((size_t)(c->hd / 2) * 4);
    for (int64_t j = 0; j < c->hd / 2; j++) {
        double f = pow((double)c->theta, -2.0 * (double)j / (double)c->hd);
        if (c->llama3) {
            double factor = 8, lo = 1, hi = 4, orig = 8192;
            double wl = 2 * M_PI / f, low_wl = orig / lo, high_wl = orig / hi;
            if (wl > low_wl) f /= factor;
            else if (wl >= high_wl) {
                double sm = (orig / wl - lo) / (hi - lo);
                f = (1 - sm) * f / factor + sm * f;
            }
        }
        inv[j] = (float)f;
    }
    m->inv_freq = dalloc(m, (size_t)(c->hd / 2) * 4, &st);
    if (st == QLR_OK) st = upload(m, m->inv_freq, inv, (size_t)(c->hd / 2) * 4);
    if (st == QLR_OK) st = be->mem.sync(be);
    free(inv);
    size_t es = qlr_backend_act_size(be);
    m->x = dalloc(m, (size_t)(max_n * c->hidden) * es, &st);
    m->h = dalloc(m, (size_t)(max_n * c->hidden) * es, &st);
    m->q = dalloc(m, (size_t)(max_n * H) * es, &st);
    m->k = dalloc(m, (size_t)(max_n * KV) * es, &st);
    m->v = dalloc(m, (size_t)(max_n * KV) * es, &st);
    m->att = dalloc(m, (size_t)(max_n * H) * es, &st);
    m->o = dalloc(m, (size_t)(max_n * c->hidden) * es, &st);
    m->g = dalloc(m, (size_t)(max_n * c->ff) * es, &st);
    m->u = dalloc(m, (size_t)(max_n * c->ff) * es, &st);
    int64_t max_rows = n_seq > 1 ? n_seq : 1;
    m->logits = dalloc(m, (size_t)(max_rows * c->vocab) * 4, &st);
    m->d_ids = dalloc(m, (size_t)max_n * 4, &st);
    m->d_seq = dalloc(m, (size_t)max_n * 4, &st);
    m->d_pos = dalloc(m, (size_t)max_n * 4, &st);
    /* random activations for the linear-only timings */
    if (st == QLR_OK) {
        size_t nb = (size_t)(max_n * c->ff);
        uint16_t *hx = malloc(nb * 2);
        fill_bf16(hx, nb, 1.0f);
        st = upload(m, m->g, hx, nb * 2);
        if (st == QLR_OK) st = be->mem.sync(be);
        free(hx);
    }
    free(ones);
    if (st != QLR_OK) model_free(m);
    return st;
}

/* The device part of one forward over n tokens whose ids/seq/pos are already on the device:
 * embedding .. lm_head for the last `last_rows` tokens. No host synchronisation, so that a
 * decode step can be captured into a CUDA graph. */
static qlr_status forward_device(bmodel *m, int64_t n, int64_t last_rows) {
    qlr_backend *be = m->be;
    const mcfg *c = &m->c;
    qlr_backend_ops *o = &be->ops;
    size_t es = qlr_backend_act_size(be);
    QLR_TRY(o->embedding(be, m->x, m->emb, m->d_ids, n, c->hidden, c->vocab));
    float scale = 1.0f / sqrtf((float)c->hd);
    int fresh = m->fresh_prefill && !m->no_fresh && n > 64 && o->attention_fresh;
    for (int64_t l = 0; l < c->layers; l++) {
        blayer *L = &m->L[l];
        /* the fused ops when the backend has them (model/forward.c does the same); the MLP's
         * residual add is deferred into the next layer's add_rmsnorm */
        int fz = m->use_fused;
        if (!(m->skip & 4)) {
            if (fz && l > 0 && o->add_rmsnorm)
                QLR_TRY(o->add_rmsnorm(be, m->x, m->h, m->o, L->ln1, n, c->hidden, 1e-5f));
            else
                QLR_TRY(o->rmsnorm(be, m->h, m->x, L->ln1, n, c->hidden, 1e-5f));
        }
        if (!(m->skip & 8)) {
            if (fz && o->nf4_linear_multi) {
                void *ys[3] = {m->q, m->k, m->v};
                const qlr_nf4 *ws[3] = {&L->w[0], &L->w[1], &L->w[2]};
                QLR_TRY(o->nf4_linear_multi(be, 3, ys, m->h, ws, NULL, n));
            } else {
                QLR_TRY(o->nf4_linear(be, m->q, m->h, &L->w[0], NULL, n));
                QLR_TRY(o->nf4_linear(be, m->k, m->h, &L->w[1], NULL, n));
                QLR_TRY(o->nf4_linear(be, m->v, m->h, &L->w[2], NULL, n));
            }
        }
        if (!(m->skip & 2)) {
            if (fz && o->rope_kv_store) {
                QLR_TRY(o->rope_kv_store(be, m->q, m->k, m->v, L->kc, L->vc, m->d_seq, m->d_pos,
                                         m->inv_freq, n, c->heads, c->kv, c->hd, m->ctx));
            } else {
                QLR_TRY(o->rope(be, m->q, m->d_pos, m->inv_freq, n, c->heads, c->hd));
                QLR_TRY(o->rope(be, m->k, m->d_pos, m->inv_freq, n, c->kv, c->hd));
                QLR_TRY(o->kv_store(be, L->kc, L->vc, m->k, m->v, m->d_seq, m->d_pos, n, c->kv,
                                    c->hd, m->ctx));
            }
        }
        /* a fresh prefill over its own k/v (model/forward.c does the same) */
        qlr_status ast = QLR_ERR_UNSUPPORTED;
        if (fresh) {
            ast = o->attention_fresh(be, m->att, m->q, m->k, m->v, n, c->heads, c->kv, c->hd,
                                     scale);
            if (ast == QLR_ERR_UNSUPPORTED) {
                qlr_error_clear();
                fresh = 0;
            } else {
                QLR_TRY(ast);
                m->fresh_served++;
            }
        }
        if (ast == QLR_ERR_UNSUPPORTED && !(m->skip & 1))
            QLR_TRY(o->attention(be, m->att, m->q, L->kc, L->vc, m->d_seq, m->d_pos, n, c->heads,
                                 c->kv, c->hd, m->ctx, scale));
        if (!(m->skip & 16)) {
            if (fz && o->add_rmsnorm) {
                QLR_TRY(o->nf4_linear(be, m->o, m->att, &L->w[3], NULL, n));
            } else {
                QLR_TRY(o->nf4_linear(be, m->h, m->att, &L->w[3], NULL, n));
            }
        }
        if (!(m->skip & 4)) {
            if (fz && o->add_rmsnorm) {
                QLR_TRY(o->add_rmsnorm(be, m->x, m->h, m->o, L->ln2, n, c->hidden, 1e-5f));
            } else {
                QLR_TRY(o->add(be, m->x, m->h, n * c->hidden));
                QLR_TRY(o->rmsnorm(be, m->h, m->x, L->ln2, n, c->hidden, 1e-5f));
            }
        }
        if (!(m->skip & 32)) {
            if (fz && o->nf4_linear_multi) {
                void *ys[2] = {m->g, m->u};
                const qlr_nf4 *ws[2] = {&L->w[4], &L->w[5]};
                QLR_TRY(o->nf4_linear_multi(be, 2, ys, m->h, ws, NULL, n));
            } else {
                QLR_TRY(o->nf4_linear(be, m->g, m->h, &L->w[4], NULL, n));
                QLR_TRY(o->nf4_linear(be, m->u, m->h, &L->w[5], NULL, n));
            }
        }
        if (!(m->skip & 64)) {
            if (fz && o->swiglu_nf4_linear) {
                QLR_TRY(o->swiglu_nf4_linear(be, m->o, m->g, m->u, &L->w[6], NULL, n));
            } else {
                QLR_TRY(o->swiglu(be, m->g, m->g, m->u, n * c->ff));
                QLR_TRY(o->nf4_linear(be, m->o, m->g, &L->w[6], NULL, n));
            }
        }
        if (!(fz && o->add_rmsnorm) || l + 1 == c->layers)
            QLR_TRY(o->add(be, m->x, m->o, n * c->hidden));
    }
    int64_t r0 = n - last_rows;
    char *xl = (char *)m->x + (size_t)(r0 * c->hidden) * es;
    QLR_TRY(o->rmsnorm(be, m->h, xl, m->lnf, last_rows, c->hidden, 1e-5f));
#ifdef QLR_BACKEND_CUDA
    if (m->use_nf4_head && last_rows == 1) return qlr_cuda_nf4_logits(be, m->logits, m->h, &m->head_nf4);
#endif
    if (m->skip & 128) return QLR_OK;
    return o->lm_head(be, m->logits, m->h, m->head, last_rows, c->hidden, c->vocab);
}

static qlr_status upload_tokens(bmodel *m, int64_t n, const int32_t *ids, const int32_t *seq,
                                const int32_t *pos) {
    qlr_backend *be = m->be;
    QLR_TRY(be->mem.h2d(be, m->d_ids, ids, (size_t)n * 4));
    QLR_TRY(be->mem.h2d(be, m->d_seq, seq, (size_t)n * 4));
    return be->mem.h2d(be, m->d_pos, pos, (size_t)n * 4);
}

/* Greedy sampling of the last_rows logits rows into out_ids (host); synchronises. */
static qlr_status sample_greedy(bmodel *m, int64_t last_rows, int32_t *out_ids) {
    qlr_sampling sp[64];
    uint64_t rng[64];
    QLR_ASSERT(last_rows <= 64);
    for (int64_t i = 0; i < last_rows; i++) {
        sp[i] = qlr_sampling_default();
        rng[i] = (uint64_t)i;
    }
    return m->be->ops.sample(m->be, out_ids, m->logits, sp, rng, last_rows, m->c.vocab);
}

/* One whole forward: upload, device part, greedy sampling. */
static qlr_status forward(bmodel *m, int64_t n, const int32_t *ids, const int32_t *seq,
                          const int32_t *pos, int64_t last_rows, int32_t *out_ids) {
    QLR_TRY(upload_tokens(m, n, ids, seq, pos));
    m->fresh_prefill = 1;
    for (int64_t i = 0; i < n; i++)
        if (seq[i] != seq[0] || pos[i] != i) m->fresh_prefill = 0;
    qlr_status st = forward_device(m, n, last_rows);
    m->fresh_prefill = 0;
    QLR_TRY(st);
    return sample_greedy(m, last_rows, out_ids);
}

#ifdef QLR_BACKEND_CUDA
/* Captures forward_device(n, last_rows) into a CUDA graph (the decode step of a server). */
static qlr_status capture_step(bmodel *m, int64_t n, int64_t last_rows, cudaGraphExec_t *exec) {
    cudaStream_t st = (cudaStream_t)qlr_cuda_stream(m->be);
    cudaGraph_t g;
    if (cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed) != cudaSuccess)
        return qlr_errorf(QLR_ERR_DEVICE, "bench: cudaStreamBeginCapture failed");
    qlr_status s = forward_device(m, n, last_rows);
    cudaError_t e = cudaStreamEndCapture(st, &g);
    if (s != QLR_OK) return s;
    if (e != cudaSuccess)
        return qlr_errorf(QLR_ERR_DEVICE, "bench: graph capture: %s", cudaGetErrorString(e));
    e = cudaGraphInstantiate(exec, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess)
        return qlr_errorf(QLR_ERR_DEVICE, "bench: graph instantiate: %s", cudaGetErrorString(e));
    return QLR_OK;
}
#endif

#ifdef QLR_BACKEND_CUDA
/* QLR_BENCH_PROFILE_STEP=1: a prefill of ctx tokens, then one eager batch-1 decode step (bf16
 * lm_head, then NF4 lm_head) between cudaProfilerStart/Stop, for `ncu --profile-from-start off`
 * to time every kernel of a step; nothing else is measured. */
static qlr_status profile_step(bmodel *m, int64_t D, int32_t *ids, int32_t *seq, int32_t *pos) {
    int32_t out[1], tok[1] = {1};
    for (int64_t i = 0; i < D; i++) seq[i] = 0, pos[i] = (int32_t)i;
    QLR_TRY(forward(m, D, ids, seq, pos, 1, out));
    seq[0] = 0;
    pos[0] = (int32_t)D;
    QLR_TRY(forward(m, 1, tok, seq, pos, 1, out)); /* warm-up: plans, workspaces */
    QLR_TRY(m->be->mem.sync(m->be));
    cudaProfilerStart();
    qlr_status st = forward(m, 1, tok, seq, pos, 1, out);
    if (st == QLR_OK && m->head_nf4.codes) {
        m->use_nf4_head = 1;
        st = forward(m, 1, tok, seq, pos, 1, out);
        m->use_nf4_head = 0;
    }
    if (st == QLR_OK) st = m->be->mem.sync(m->be);
    cudaProfilerStop();
    return st;
}

/* Captures a batch-B decode step (as the model is configured now) and replays it warm + steps
 * times at positions D + s, feeding the greedy tokens back; *sec = seconds per timed step. */
static qlr_status graph_decode(bmodel *m, int B, int64_t D, int steps, int warm, int32_t *tok,
                               int32_t *seq, int32_t *pos, double *sec) {
    qlr_backend *be = m->be;
    cudaGraphExec_t exec = NULL;
    int32_t out[64];
    qlr_status st = capture_step(m, B, B, &exec);
    cudaStream_t cs = (cudaStream_t)qlr_cuda_stream(be);
    double t_start = now_s();
    for (int s = 0; s < steps + warm && st == QLR_OK; s++) {
        if (s == warm) {
            st = be->mem.sync(be);
            t_start = now_s();
        }
        for (int b = 0; b < B; b++) seq[b] = b, pos[b] = (int32_t)(D + s);
        st = upload_tokens(m, B, tok, seq, pos);
        if (st == QLR_OK && cudaGraphLaunch(exec, cs) != cudaSuccess)
            st = qlr_errorf(QLR_ERR_DEVICE, "bench: cudaGraphLaunch failed");
        if (st == QLR_OK) st = sample_greedy(m, B, out);
        for (int b = 0; b < B; b++) tok[b] = out[b];
    }
    *sec = (now_s() - t_start) / steps;
    if (exec) cudaGraphExecDestroy(exec);
    return st;
}
#endif

/* Seconds for one pass over every NF4 linear of the model at n tokens, best of `reps`. */
static qlr_status time_linears(bmodel *m, int64_t n, int path, int reps, double *out) {
    qlr_backend *be = m->be;
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {
        QLR_TRY(be->mem.sync(be));
        double t0 = now_s();
        for (int64_t l = 0; l < m->c.layers; l++)
            for (int i = 0; i < 7; i++) {
#ifdef QLR_BACKEND_CUDA
                QLR_TRY(qlr_cuda_nf4_linear_path(be, m->u, m->g, &m->L[l].w[i], NULL, n,
                                                 (qlr_cuda_nf4_path)path));
#else
                (void)path;
                QLR_TRY(be->ops.nf4_linear(be, m->u, m->g, &m->L[l].w[i], NULL, n));
#endif
            }
        QLR_TRY(be->mem.sync(be));
        double t = now_s() - t0;
        if (r > 0 && t < best) best = t; /* r = 0 warms up */
    }
    *out = best;
    return QLR_OK;
}

static qlr_status measure_copy_bw(qlr_backend *be, double *gbps) {
    size_t bytes = (size_t)1 << 30;
    void *a = be->mem.alloc(be, bytes), *b = be->mem.alloc(be, bytes);
    if (!a || !b) {
        if (a) be->mem.free(be, a);
        if (b) be->mem.free(be, b);
        return qlr_error_status();
    }
    uint8_t *h = malloc(1 << 24);
    fill_random(h, 1 << 24);
    for (size_t off = 0; off < bytes; off += 1 << 24) QLR_TRY(be->mem.h2d(be, (char *)a + off, h, 1 << 24));
    QLR_TRY(be->mem.sync(be));
    free(h);
    QLR_TRY(be->mem.d2d(be, b, a, bytes));
    QLR_TRY(be->mem.sync(be));
    int reps = 20;
    double t0 = now_s();
    for (int i = 0; i < reps; i++) QLR_TRY(be->mem.d2d(be, (i & 1) ? a : b, (i & 1) ? b : a, bytes));
    QLR_TRY(be->mem.sync(be));
    double t = now_s() - t0;
    *gbps = 2.0 * (double)bytes * reps / t / 1e9;
    be->mem.free(be, a);
    be->mem.free(be, b);
    return QLR_OK;
}

static qlr_status measure_gemm(qlr_backend *be, double *tflops) {
#ifdef QLR_BACKEND_CUDA
    int64_t N = 8192;
    size_t el = (size_t)(N * N);
    void *a = be->mem.alloc(be, el * 2), *b = be->mem.alloc(be, el * 2), *c = be->mem.alloc(be, el * 2);
    if (!a || !b || !c) return qlr_error_status();
    uint16_t *h = malloc(el * 2);
    fill_bf16(h, el, 1.0f);
    QLR_TRY(be->mem.h2d(be, a, h, el * 2));
    fill_bf16(h, el, 1.0f);
    QLR_TRY(be->mem.h2d(be, b, h, el * 2));
    QLR_TRY(be->mem.sync(be));
    free(h);
    for (int i = 0; i < 3; i++) QLR_TRY(qlr_cuda_gemm_bf16(be, c, a, b, N, N, N, 0));
    QLR_TRY(be->mem.sync(be));
    int reps = 20;
    double t0 = now_s();
    for (int i = 0; i < reps; i++) QLR_TRY(qlr_cuda_gemm_bf16(be, c, a, b, N, N, N, 0));
    QLR_TRY(be->mem.sync(be));
    double t = now_s() - t0;
    *tflops = 2.0 * (double)N * N * N * reps / t / 1e12;
    be->mem.free(be, a);
    be->mem.free(be, b);
    be->mem.free(be, c);
    return QLR_OK;
#else
    *tflops = 0;
    return qlr_errorf(QLR_ERR_UNSUPPORTED, "bench: GEMM rate needs the CUDA backend");
#endif
}

static size_t device_used(void) {
#ifdef QLR_BACKEND_CUDA
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) return tot - fr;
#endif
    return 0;
}

/* Prefill attention of one sequence alone, ours (the attention op over a cache holding the same
 * K/V: seq 0, positions 0..S-1) against cuDNN's fused SDPA (qlr_cuda_attention_prefill_cudnn),
 * on this model's head shape for S = P, 4096 and 8192 (larger S only, each where memory allows):
 * best of `reps` runs of `layers` back-to-back calls, causal flops 2·S²·hd·heads per call, the
 * first cuDNN call (plan build, maybe a kernel compile) timed apart, and the largest difference
 * between the two outputs. Writes a JSON array into js (null without CUDA). A cuDNN refusal is
 * recorded (and its reason printed), not returned. */
static qlr_status bench_attention_sdpa(qlr_backend *be, const mcfg *c, int64_t P, int reps,
                                       char *js, size_t cap) {
    snprintf(js, cap, "null");
#ifdef QLR_BACKEND_CUDA
    const int64_t sizes[3] = {P, 4096, 8192}, H = c->heads, KV = c->kv, D = c->hd;
    const float scale = 1.0f / sqrtf((float)D);
    size_t len = (size_t)snprintf(js, cap, "[");
    qlr_status st = QLR_OK;
    for (int si = 0; si < 3 && st == QLR_OK; si++) {
        int64_t S = sizes[si];
        if (si > 0 && S <= P) continue;
        size_t nq = (size_t)(S * H * D), nk = (size_t)(S * KV * D);
        void *q = be->mem.alloc(be, nq * 2), *k = be->mem.alloc(be, nk * 2);
        void *v = be->mem.alloc(be, nk * 2), *o1 = be->mem.alloc(be, nq * 2);
        void *o2 = be->mem.alloc(be, nq * 2), *ds = be->mem.alloc(be, (size_t)S * 4);
        void *dp = be->mem.alloc(be, (size_t)S * 4);
        uint16_t *h = malloc(nq * 2), *h2 = malloc(nq * 2);
        int32_t *hi = malloc((size_t)S * 4);
        double ours = 1e30, dnn = 1e30, first = 0, maxd = 0;
        const char *dnn_state = "ok";
        if (!q || !k || !v || !o1 || !o2 || !ds || !dp || !h || !h2 || !hi) {
            fprintf(stderr, "bench %s: attention S=%lld skipped: %s\n", c->name, (long long)S,
                    qlr_error_msg());
            len += (size_t)snprintf(js + len, len < cap ? cap - len : 0, "%s{\"tokens\": %lld, "
                                    "\"skipped\": \"out of memory\"}", len > 1 ? ", " : "",
                                    (long long)S);
        } else {
            /* q, k, v; seq 0 and positions 0..S-1 (a [1, S, KV, D] cache is k itself) */
            fill_bf16(h, nq, 1.0f);
            st = be->mem.h2d(be, q, h, nq * 2);
            fill_bf16(h, nk, 1.0f);
            if (st == QLR_OK) st = be->mem.h2d(be, k, h, nk * 2);
            fill_bf16(h2, nk, 1.0f);
            if (st == QLR_OK) st = be->mem.h2d(be, v, h2, nk * 2);
            for (int64_t i = 0; i < S; i++) hi[i] = 0;
            if (st == QLR_OK) st = be->mem.h2d(be, ds, hi, (size_t)S * 4);
            for (int64_t i = 0; i < S; i++) hi[i] = (int32_t)i;
            if (st == QLR_OK) st = be->mem.h2d(be, dp, hi, (size_t)S * 4);
            for (int r = 0; r < reps + 1 && st == QLR_OK; r++) {
                st = be->mem.sync(be);
                double s0 = now_s();
                for (int64_t l = 0; l < (r ? c->layers : 1) && st == QLR_OK; l++)
                    st = be->ops.attention(be, o1, q, k, v, ds, dp, S, H, KV, D, S, scale);
                if (st == QLR_OK) st = be->mem.sync(be);
                double t = (now_s() - s0) / (double)c->layers;
                if (r > 0 && t < ours) ours = t;
            }
            qlr_status ds_st = QLR_OK;
            for (int r = 0; r < reps + 1 && st == QLR_OK && ds_st == QLR_OK; r++) {
                st = be->mem.sync(be);
                double s0 = now_s();
                for (int64_t l = 0; l < (r ? c->layers : 1) && ds_st == QLR_OK; l++)
                    ds_st = qlr_cuda_attention_prefill_cudnn(be, o2, q, k, v, S, H, KV, D, scale);
                if (st == QLR_OK) st = be->mem.sync(be);
                double t = now_s() - s0;
                if (r == 0) first = t;
                else if (t / (double)c->layers < dnn) dnn = t / (double)c->layers;
            }
            if (ds_st != QLR_OK) {
                dnn_state = qlr_status_str(ds_st);
                fprintf(stderr, "bench %s: cuDNN SDPA at S=%lld: %s\n", c->name, (long long)S,
                        qlr_error_msg());
            } else if (st == QLR_OK) {
                st = be->mem.d2h(be, h, o1, nq * 2);
                if (st == QLR_OK) st = be->mem.d2h(be, h2, o2, nq * 2);
                if (st == QLR_OK) st = be->mem.sync(be);
                for (size_t i = 0; i < nq && st == QLR_OK; i++) {
                    double d = fabs((double)qlr_bf16_to_f32(h[i]) - (double)qlr_bf16_to_f32(h2[i]));
                    if (d > maxd || d != d) maxd = d;
                }
            }
            double fl = 2.0 * (double)S * (double)S * (double)(D * H);
            int ok = ds_st == QLR_OK;
            fprintf(stderr, "bench %s: prefill attention S=%lld: ours %.3f ms (%.1f TFLOP/s), "
                    "cuDNN %.3f ms (%.1f TFLOP/s, first call %.1f ms), max |diff| %.3g\n",
                    c->name, (long long)S, 1e3 * ours, fl / ours / 1e12, ok ? 1e3 * dnn : 0.0,
                    ok ? fl / dnn / 1e12 : 0.0, 1e3 * first, maxd);
            len += (size_t)snprintf(js + len, len < cap ? cap - len : 0, "%s{\"tokens\": %lld, "
                                    "\"ours_ms\": %.4f, \"ours_tflops\": %.1f, \"cudnn\": "
                                    "\"%s\", \"cudnn_ms\": %.4f, \"cudnn_tflops\": %.1f, "
                                    "\"cudnn_over_ours\": %.2f, \"cudnn_first_call_ms\": %.1f, "
                                    "\"max_abs_diff\": %.3g}", len > 1 ? ", " : "",
                                    (long long)S, 1e3 * ours, fl / ours / 1e12, dnn_state,
                                    ok ? 1e3 * dnn : 0.0, ok ? fl / dnn / 1e12 : 0.0,
                                    ok ? ours / dnn : 0.0, 1e3 * first, maxd);
        }
        be->mem.free(be, q);
        be->mem.free(be, k);
        be->mem.free(be, v);
        be->mem.free(be, o1);
        be->mem.free(be, o2);
        be->mem.free(be, ds);
        be->mem.free(be, dp);
        free(h);
        free(h2);
        free(hi);
    }
    if (len < cap) snprintf(js + len, cap - len, "]");
    return st;
#else
    (void)be, (void)c, (void)P, (void)reps;
    return QLR_OK;
#endif
}

#ifdef QLR_BACKEND_CUDA
/* What each kernel kind costs in place in the batch-1 graph step (overlap included): the step
 * timed with that kind left out (m->skip), subtracted from the full step. The values the
 * skipping steps compute are meaningless; only their time counts. */
#define N_ABL 12
static const int k_abl_mask[N_ABL] = {0, 1, 2, 4, 8, 16, 32, 64, 128, 1 | 2 | 4 | 128, 8 | 16 | 32 | 64, 255};
static const char *k_abl_name[N_ABL] = {"step", "attention", "rope_kv", "norms", "qkv", "o",
                                        "gate_up", "down_swiglu", "lm_head", "non_linear_kernels",
                                        "nf4_linears", "all_kernels"};
static qlr_status b1_marginal(bmodel *m, int64_t D, int32_t *tok, int32_t *seq, int32_t *pos,
                              double *ms) {
    double sec[N_ABL];
    qlr_status st = QLR_OK;
    for (int i = 0; i < N_ABL && st == QLR_OK; i++) {
        m->skip = k_abl_mask[i];
        st = graph_decode(m, 1, D, 20, 3, tok, seq, pos, &sec[i]);
    }
    m->skip = 0;
    for (int i = 0; i < N_ABL && st == QLR_OK; i++) {
        ms[i] = 1e3 * (i == 0 ? sec[0] : sec[0] - sec[i]);
        fprintf(stderr, "bench %s: decode batch 1, %s%s: %.3f ms\n", m->c.name,
                i == 0 ? "" : "in place, ", k_abl_name[i], ms[i]);
    }
    return st;
}
#endif

static qlr_status bench_model(qlr_backend *be, const mcfg *c, const qlr_bench_decode_opts *o,
                              double bw_gbps, double gemm_tflops, FILE *js, size_t *peak_used) {
    static const int batches[] = {1, 8, 32, 64};
    int64_t max_b = 64;
    int64_t ctx = o->prefill_tokens;
    if (o->decode_ctx + o->decode_steps + 8 > ctx) ctx = o->decode_ctx + o->decode_steps + 8;
    /* tokens of one forward: the prefill, a decode batch, or the decode context's prefill */
    int64_t max_n = o->prefill_tokens > max_b ? o->prefill_tokens : max_b;
    if (o->decode_ctx > max_n) max_n = o->decode_ctx;
    bmodel m;
    double t0 = now_s();
    fprintf(stderr, "bench %s: creating random NF4 model...\n", c->name);
    QLR_TRY(model_create(be, c, max_b, ctx, max_n, &m));
    m.use_fused = 1;
    fprintf(stderr, "bench %s: ready in %.1f s (%.2f GB of NF4 weights)\n", c->name, now_s() - t0,
            m.nf4_bytes / 1e9);
#ifdef QLR_BACKEND_CUDA
    /* the largest workspace a forward needs, allocated now rather than inside a timed step */
    size_t ws = (size_t)(c->ff * c->hidden) * 2;
    size_t att_ws = (size_t)(max_b * c->heads * 32 * (c->hd + 2)) * 4;
    size_t smp_ws = (size_t)(max_b * c->vocab) * 4;
    if (att_ws > ws) ws = att_ws;
    if (smp_ws > ws) ws = smp_ws;
    QLR_TRY(qlr_cuda_reserve(be, ws));
#endif
    qlr_status st = QLR_OK;
    const char *pf_att = "attention";
    int reps = o->quick ? 1 : 3;
    int32_t *ids = calloc((size_t)max_n, 4), *seq = calloc((size_t)max_n, 4);
    int32_t *pos = calloc((size_t)max_n, 4), out[64];
    for (int64_t i = 0; i < max_n; i++) ids[i] = (int32_t)((i * 7919) % c->vocab);

#ifdef QLR_BACKEND_CUDA
    const char *prof = getenv("QLR_BENCH_PROFILE_STEP");
    if (prof && !strcmp(prof, "1")) {
        st = profile_step(&m, o->decode_ctx, ids, seq, pos);
        free(ids);
        free(seq);
        free(pos);
        model_free(&m);
        return st;
    }
    if (prof && !strcmp(prof, "2")) {
        /* a batch-1 decode step from a CUDA graph, replayed 3 times between
         * cudaProfilerStart/Stop: with QLR_BENCH_TRACE=FILE (bench/cupti_trace.c) or nsys
         * --capture-range=cudaProfilerApi --cuda-graph-trace=node, every kernel's start and
         * end inside the graph */
        int32_t tok[1] = {1};
        for (int64_t i = 0; i < o->decode_ctx; i++) seq[i] = 0, pos[i] = (int32_t)i;
        st = forward(&m, o->decode_ctx, ids, seq, pos, 1, out);
        double sec = 0;
        if (st == QLR_OK) st = graph_decode(&m, 1, o->decode_ctx, 3, 2, tok, seq, pos, &sec);
        cudaProfilerStart();
        if (st == QLR_OK) st = graph_decode(&m, 1, o->decode_ctx, 3, 0, tok, seq, pos, &sec);
        cudaProfilerStop();
        fprintf(stderr, "bench %s: profiled graph step %.3f ms\n", c->name, 1e3 * sec);
        free(ids);
        free(seq);
        free(pos);
        model_free(&m);
        return st;
    }
#endif
    /* prefill: one sequence of prefill_tokens, first as served (attention_fresh: cuDNN's SDPA
     * where the backend has it), then with the attention op (our kernel) */
    int64_t P = o->prefill_tokens;
    for (int64_t i = 0; i < P; i++) seq[i] = 0, pos[i] = (int32_t)i;
    double best_pf = 1e30, ours_pf = 1e30;
    for (int pass = 0; pass < 2; pass++) {
        double *best = pass ? &ours_pf : &best_pf;
        m.no_fresh = pass;
        for (int r = 0; r < reps + 1 && st == QLR_OK; r++) {
            st = be->mem.sync(be);
            double s0 = now_s();
            if (st == QLR_OK) st = forward(&m, P, ids, seq, pos, 1, out);
            double t = now_s() - s0;
            if (r > 0 && t < *best) *best = t;
        }
        if (!pass) pf_att = m.fresh_served ? "attention_fresh" : "attention";
    }
    m.no_fresh = 0;
    fprintf(stderr, "bench %s: prefill %lld tokens: %.1f ms (%.0f tokens/s) through %s; with the "
            "attention op %.1f ms (%.0f tokens/s)\n", c->name, (long long)P, 1e3 * best_pf,
            P / best_pf, pf_att, 1e3 * ours_pf, P / ours_pf);
    double lin_pf = 0;
    if (st == QLR_OK) st = time_linears(&m, P, 0, reps, &lin_pf);
    double pf_flops = 2.0 * (double)P * m.nf4_params;
    /* attention alone over the prefill (the caches hold this prefill's K/V) */
    double att_pf = 1e30;
    for (int r = 0; r < reps + 1 && st == QLR_OK; r++) {
        st = be->mem.sync(be);
        double s0 = now_s();
        for (int64_t l = 0; l < c->layers && st == QLR_OK; l++)
            st = be->ops.attention(be, m.att, m.q, m.L[l].kc, m.L[l].vc, m.d_seq, m.d_pos, P,
                                   c->heads, c->kv, c->hd, m.ctx, 1.0f / sqrtf((float)c->hd));
        if (st == QLR_OK) st = be->mem.sync(be);
        double t = now_s() - s0;
        if (r > 0 && t < att_pf) att_pf = t;
    }
    /* causal: half of the 4·P²·hd·heads multiply-adds of full attention */
    double att_flops = 2.0 * (double)P * (double)P * (double)(c->hd * c->heads) * (double)c->layers;
    char sdpa_js[1536];
    if (st == QLR_OK) st = bench_attention_sdpa(be, c, P, reps, sdpa_js, sizeof sdpa_js);
    double dq_s = 0;
#ifdef QLR_BACKEND_CUDA
    /* the dequantization kernel alone (bytes: NF4 in, bf16 out) */
    dq_s = 1e30;
    void *wsp = be->mem.alloc(be, (size_t)(c->ff * c->hidden) * 2);
    if (!wsp) st = qlr_error_status();
    for (int r = 0; r < reps + 1 && st == QLR_OK; r++) {
        st = be->mem.sync(be);
        double s0 = now_s();
        for (int64_t l = 0; l < c->layers && st == QLR_OK; l++)
            for (int i = 0; i < 7 && st == QLR_OK; i++)
                st = qlr_cuda_nf4_dequant(be, wsp, &m.L[l].w[i]);
        if (st == QLR_OK) st = be->mem.sync(be);
        double t = now_s() - s0;
        if (r > 0 && t < dq_s) dq_s = t;
    }
    if (wsp) be->mem.free(be, wsp);
#endif
    size_t used = device_used();
    if (used > *peak_used) *peak_used = used;

    /* NF4 linear crossover per token count: fused FMA kernel, fused tensor-core kernel,
     * dequantize + cuBLASLt; the fastest becomes the AUTO policy used by the decode steps */
    static const int sweep[] = {1, 2, 4, 8, 16, 32, 64};
    double fz[7] = {0}, dg[7] = {0}, mm[7] = {0};
    int best[7];
    for (int i = 0; i < 7 && st == QLR_OK; i++) {
        st = time_linears(&m, sweep[i], 1, reps, &fz[i]);
        if (st == QLR_OK) st = time_linears(&m, sweep[i], 2, reps, &dg[i]);
        if (st == QLR_OK) st = time_linears(&m, sweep[i], 3, reps, &mm[i]);
        best[i] = fz[i] <= dg[i] && fz[i] <= mm[i] ? 1 : (mm[i] <= dg[i] ? 3 : 2);
    }
#ifdef QLR_BACKEND_CUDA
    {
        int pmax[8], np = 0;
        qlr_cuda_nf4_path ppath[8];
        for (int i = 0; i < 7; i++) {
            if (np && (int)ppath[np - 1] == best[i]) pmax[np - 1] = sweep[i];
            else {
                pmax[np] = sweep[i];
                ppath[np++] = (qlr_cuda_nf4_path)best[i];
            }
        }
        if (st == QLR_OK) st = qlr_cuda_set_nf4_policy(be, np, pmax, ppath);
    }
#endif

    /* the n = 1 kernel variant (register kernel with 2 or 3 blocks per SM, or streaming): the
     * fastest stays */
#ifdef QLR_BACKEND_CUDA
    double var_s[3] = {0, 0, 0};
    static const int var_id[3] = {2, 3, 4};
    int var_best = 0;
    for (int vi = 0; vi < 3 && st == QLR_OK; vi++) {
        qlr_cuda_set_gemv1_variant(be, var_id[vi]);
        st = time_linears(&m, 1, 1, reps, &var_s[vi]);
        if (vi > 0 && var_s[vi] < var_s[var_best]) var_best = vi;
    }
    qlr_cuda_set_gemv1_variant(be, var_id[var_best]);
    if (st == QLR_OK) st = time_linears(&m, 1, 1, reps, &fz[0]);
    /* n = 1 kernels alone in CUDA graphs (no launch gaps from the host): each shape once per
     * layer (32 launches rotate over the layers' weights, so nothing sits in L2), GB/s of NF4
     * bytes; plus q/k/v and gate/up merged into one launch and the SwiGLU-fused down */
    double gshp[7] = {0};
    static const char *gnames[7] = {"q_proj", "k_proj", "gate_proj", "down_proj", "qkv_merged",
                                    "gate_up_merged", "down_swiglu"};
    for (int si = 0; si < 7 && st == QLR_OK; si++) {
        cudaStream_t cs = (cudaStream_t)qlr_cuda_stream(be);
        cudaGraph_t gr;
        cudaGraphExec_t ge = NULL;
        double bytes = 0;
        if (cudaStreamBeginCapture(cs, cudaStreamCaptureModeRelaxed) != cudaSuccess) {
            st = qlr_errorf(QLR_ERR_DEVICE, "bench: capture");
            break;
        }
        for (int64_t l = 0; l < c->layers && st == QLR_OK; l++) {
            blayer *L = &m.L[l];
            const qlr_nf4 *w1 = si == 0 ? &L->w[0] : si == 1 ? &L->w[1] : si == 2 ? &L->w[4] : &L->w[6];
            if (si < 4) {
                st = qlr_cuda_nf4_linear_path(be, m.u, m.g, w1, NULL, 1, QLR_CUDA_NF4_FUSED);
                bytes += (double)((w1->n + 1) / 2 + w1->n_blocks + 4 * w1->n_dq_blocks);
            } else if (si < 6) {
                void *ys[3] = {m.q, m.k, m.v};
                if (si == 5) ys[0] = m.u, ys[1] = m.att;
                const qlr_nf4 *ws[3] = {&L->w[0], &L->w[1], &L->w[2]};
                if (si == 5) ws[0] = &L->w[4], ws[1] = &L->w[5];
                int k = si == 4 ? 3 : 2;
                st = be->ops.nf4_linear_multi(be, k, ys, m.h, ws, NULL, 1);
                for (int i = 0; i < k; i++)
                    bytes += (double)((ws[i]->n + 1) / 2 + ws[i]->n_blocks + 4 * ws[i]->n_dq_blocks);
            } else {
                st = be->ops.swiglu_nf4_linear(be, m.o, m.g, m.u, &L->w[6], NULL, 1);
                bytes += (double)((L->w[6].n + 1) / 2 + L->w[6].n_blocks + 4 * L->w[6].n_dq_blocks);
            }
        }
        cudaError_t e = cudaStreamEndCapture(cs, &gr);
        if (st == QLR_OK && e != cudaSuccess) st = qlr_errorf(QLR_ERR_DEVICE, "bench: capture end");
        if (st == QLR_OK && cudaGraphInstantiate(&ge, gr, 0) != cudaSuccess)
            st = qlr_errorf(QLR_ERR_DEVICE, "bench: instantiate");
        if (e == cudaSuccess) cudaGraphDestroy(gr);
        double best_g = 1e30;
        for (int r = 0; r < 6 && st == QLR_OK; r++) {
            st = be->mem.sync(be);
            double s0 = now_s();
            if (st == QLR_OK && cudaGraphLaunch(ge, cs) != cudaSuccess)
                st = qlr_errorf(QLR_ERR_DEVICE, "bench: graph launch");
            if (st == QLR_OK) st = be->mem.sync(be);
            double t = now_s() - s0;
            if (r > 0 && t < best_g) best_g = t;
        }
        if (ge) cudaGraphExecDestroy(ge);
        gshp[si] = bytes / best_g / 1e9;
        fprintf(stderr, "bench %s: n=1 %s in a graph: %.0f GB/s (%.1f us per launch)\n", c->name,
                gnames[si], gshp[si], 1e6 * best_g / (double)c->layers);
    }
#endif

    /* steady-state rate of each kernel on single weight shapes at n = 1 (GB/s of NF4 bytes) */
    static const int shape_idx[4] = {0, 1, 4, 6}; /* q, k, gate, down */
    double shp[4][3] = {{0}};
    for (int si = 0; si < 4 && st == QLR_OK; si++) {
        const qlr_nf4 *w = &m.L[0].w[shape_idx[si]];
        double bytes = (double)((w->n + 1) / 2 + w->n_blocks + 4 * w->n_dq_blocks);
        static const int paths[3] = {1, 3, 2};
        for (int pi = 0; pi < 3 && st == QLR_OK; pi++) {
            int iters = 50;
            for (int it = 0; it < iters + 5 && st == QLR_OK; it++) {
                if (it == 5) {
                    st = be->mem.sync(be);
                    t0 = now_s();
                }
                /* rotate over the layers so that the weights do not sit in L2 */
                const qlr_nf4 *wl = &m.L[it % c->layers].w[shape_idx[si]];
#ifdef QLR_BACKEND_CUDA
                if (st == QLR_OK)
                    st = qlr_cuda_nf4_linear_path(be, m.u, m.g, wl, NULL, 1, (qlr_cuda_nf4_path)paths[pi]);
#else
                (void)wl;
                (void)paths;
#endif
            }
            if (st == QLR_OK) st = be->mem.sync(be);
            shp[si][pi] = bytes * iters / (now_s() - t0) / 1e9;
        }
    }

    /* decode: seq 0's first decode_ctx positions are filled by a prefill, then copied to every
     * other sequence so each batch row attends over a real context */
    int64_t D = o->decode_ctx;
    for (int64_t i = 0; i < D && st == QLR_OK; i++) seq[i] = 0, pos[i] = (int32_t)i;
    if (st == QLR_OK) st = forward(&m, D, ids, seq, pos, 1, out);
    size_t rowb = (size_t)(c->kv * c->hd) * 2;
    for (int64_t l = 0; l < c->layers && st == QLR_OK; l++)
        for (int64_t s = 1; s < max_b && st == QLR_OK; s++) {
            size_t off = (size_t)(s * ctx) * rowb;
            st = be->mem.d2d(be, (char *)m.L[l].kc + off, m.L[l].kc, (size_t)D * rowb);
            if (st == QLR_OK) st = be->mem.d2d(be, (char *)m.L[l].vc + off, m.L[l].vc, (size_t)D * rowb);
        }
    double dec_s[4] = {0}, dec_graph_s[4] = {0};
#ifdef QLR_BACKEND_CUDA
    double dec_b1_unfused = 0, dec_b1_nf4head = 0, abl_ms[N_ABL] = {0};
#endif
    for (int bi = 0; bi < 4 && st == QLR_OK; bi++) {
        int B = batches[bi];
        int32_t tok[64];
        for (int b = 0; b < B; b++) tok[b] = (int32_t)(b + 1);
        int steps = o->quick ? 3 : o->decode_steps, warm = 2;
        double t_start = 0;
        for (int s = 0; s < steps + warm && st == QLR_OK; s++) {
            if (s == warm) {
                st = be->mem.sync(be);
                t_start = now_s();
            }
            for (int b = 0; b < B; b++) seq[b] = b, pos[b] = (int32_t)(D + s);
            st = forward(&m, B, tok, seq, pos, B, out);
            for (int b = 0; b < B; b++) tok[b] = out[b];
        }
        dec_s[bi] = (now_s() - t_start) / steps;
#ifdef QLR_BACKEND_CUDA
        /* the same step replayed from a CUDA graph (no per-kernel launch cost) */
        if (st == QLR_OK) st = graph_decode(&m, B, D, steps, warm, tok, seq, pos, &dec_graph_s[bi]);
        if (B == 1 && st == QLR_OK) {
            /* the same batch-1 step with the separate ops (no fused entries) for comparison */
            m.use_fused = 0;
            st = graph_decode(&m, B, D, steps, warm, tok, seq, pos, &dec_b1_unfused);
            m.use_fused = 1;
            if (m.head_nf4.codes && st == QLR_OK) {
                /* and with the lm_head in NF4 as well (every weight read per token is NF4) */
                m.use_nf4_head = 1;
                st = graph_decode(&m, B, D, steps, warm, tok, seq, pos, &dec_b1_nf4head);
                m.use_nf4_head = 0;
                fprintf(stderr, "bench %s: decode batch 1 with an NF4 lm_head: %.3f ms/step graph\n",
                        c->name, 1e3 * dec_b1_nf4head);
            }
            fprintf(stderr, "bench %s: decode batch 1 without fused ops: %.3f ms/step graph\n",
                    c->name, 1e3 * dec_b1_unfused);
            if (st == QLR_OK) st = b1_marginal(&m, D, tok, seq, pos, abl_ms);
        }
#else
        dec_graph_s[bi] = dec_s[bi];
#endif
        fprintf(stderr, "bench %s: decode batch %d: %.3f ms/step eager, %.3f ms/step graph, "
                "%.1f tokens/s\n", c->name, B, 1e3 * dec_s[bi], 1e3 * dec_graph_s[bi],
                B / dec_graph_s[bi]);
    }
    used = device_used();
    if (used > *peak_used) *peak_used = used;

    if (st != QLR_OK) {
        free(ids);
        free(seq);
        free(pos);
        model_free(&m);
        return st;
    }
    double bound = m.nf4_bytes / (bw_gbps * 1e9);
    double head_bytes = (double)(c->vocab * c->hidden) * 2;
    fprintf(js, "    {\"model\": \"%s\", \"hidden\": %lld, \"layers\": %lld, \"heads\": %lld, "
            "\"kv_heads\": %lld, \"head_dim\": %lld, \"ff\": %lld, \"vocab\": %lld,\n",
            c->name, (long long)c->hidden, (long long)c->layers, (long long)c->heads,
            (long long)c->kv, (long long)c->hd, (long long)c->ff, (long long)c->vocab);
    fprintf(js, "     \"nf4_weight_bytes\": %.0f, \"nf4_params\": %.0f, \"lm_head_bytes\": %.0f,\n",
            m.nf4_bytes, m.nf4_params, head_bytes);
    fprintf(js, "     \"prefill\": {\"tokens\": %lld, \"seconds\": %.6f, \"tokens_per_s\": %.1f, "
            "\"attention_path\": \"%s\", \"attention_op_seconds\": %.6f, "
            "\"attention_op_tokens_per_s\": %.1f, \"linear_seconds\": %.6f, "
            "\"linear_tflops\": %.1f, \"linear_fraction_of_gemm_rate\": %.3f, "
            "\"attention_seconds\": %.6f, \"attention_tflops\": %.1f, \"dequant_seconds\": %.6f, "
            "\"dequant_GBps\": %.0f, \"attention_sdpa\": %s},\n",
            (long long)P, best_pf, P / best_pf, pf_att, ours_pf, P / ours_pf, lin_pf,
            pf_flops / lin_pf / 1e12,
            pf_flops / lin_pf / 1e12 / gemm_tflops, att_pf, att_flops / att_pf / 1e12, dq_s,
            dq_s > 0 ? (m.nf4_bytes + 2.0 * m.nf4_params) / dq_s / 1e9 : 0.0, sdpa_js);
    fprintf(js, "     \"decode_context\": %lld, \"decode\": [", (long long)D);
    for (int bi = 0; bi < 4; bi++)
        fprintf(js, "%s{\"batch\": %d, \"step_ms\": %.4f, \"tokens_per_s\": %.1f, "
                "\"eager_step_ms\": %.4f, \"eager_tokens_per_s\": %.1f}", bi ? ", " : "",
                batches[bi], 1e3 * dec_graph_s[bi], batches[bi] / dec_graph_s[bi],
                1e3 * dec_s[bi], batches[bi] / dec_s[bi]);
    fprintf(js, "],\n");
    fprintf(js, "     \"decode_b1_nf4_bound_ms\": %.4f, \"decode_b1_fraction_of_bandwidth_bound\": %.3f, "
            "\"decode_b1_linears_ms\": %.4f, \"decode_b1_linears_fraction_of_bandwidth_bound\": %.3f, "
            "\"decode_b1_fraction_all_weights_bound\": %.3f,\n",
            1e3 * bound, bound / dec_graph_s[0], 1e3 * (best[0] == 1 ? fz[0] : best[0] == 3 ? mm[0] : dg[0]),
            bound / (best[0] == 1 ? fz[0] : best[0] == 3 ? mm[0] : dg[0]),
            (m.nf4_bytes + head_bytes) / (bw_gbps * 1e9) / dec_graph_s[0]);
#ifdef QLR_BACKEND_CUDA
    fprintf(js, "     \"gemv1_variant_linears_ms\": {\"registers_2_blocks_per_sm\": %.4f, "
            "\"registers_3_blocks_per_sm\": %.4f, \"streaming\": %.4f},\n",
            1e3 * var_s[0], 1e3 * var_s[1], 1e3 * var_s[2]);
    fprintf(js, "     \"nf4_gemv_n1_graph_GBps\": {");
    for (int si = 0; si < 7; si++)
        fprintf(js, "%s\"%s\": %.0f", si ? ", " : "", gnames[si], gshp[si]);
    fprintf(js, "},\n");
    fprintf(js, "     \"decode_b1_unfused_graph_step_ms\": %.4f,\n", 1e3 * dec_b1_unfused);
    /* in place: "step" is the whole step; every other entry is what leaving that out saves */
    fprintf(js, "     \"decode_b1_in_place_ms\": {");
    for (int i = 0; i < N_ABL; i++)
        fprintf(js, "%s\"%s\": %.4f", i ? ", " : "", k_abl_name[i], abl_ms[i]);
    fprintf(js, "},\n");
    if (dec_b1_nf4head > 0) {
        double nb = m.nf4_bytes + m.head_nf4_bytes;
        fprintf(js, "     \"decode_b1_nf4_lm_head\": {\"step_ms\": %.4f, \"tokens_per_s\": %.1f, "
                "\"nf4_weight_bytes\": %.0f, \"nf4_bound_ms\": %.4f, \"fraction_of_bandwidth_bound\": %.3f},\n",
                1e3 * dec_b1_nf4head, 1.0 / dec_b1_nf4head, nb, 1e3 * nb / (bw_gbps * 1e9),
                nb / (bw_gbps * 1e9) / dec_b1_nf4head);
    }
#endif
    fprintf(js, "     \"nf4_gemv_n1_GBps\": [");
    static const char *shape_names[4] = {"q_proj", "k_proj", "gate_proj", "down_proj"};
    for (int si = 0; si < 4; si++)
        fprintf(js, "%s{\"shape\": \"%s\", \"fused\": %.0f, \"fused_mma\": %.0f, \"dequant_gemm\": %.0f}",
                si ? ", " : "", shape_names[si], shp[si][0], shp[si][1], shp[si][2]);
    fprintf(js, "],\n");
    fprintf(js, "     \"nf4_linear_sweep\": [");
    for (int i = 0; i < 7; i++)
        fprintf(js, "%s{\"n\": %d, \"fused_ms\": %.4f, \"fused_mma_ms\": %.4f, "
                "\"dequant_gemm_ms\": %.4f, \"chosen\": \"%s\"}", i ? ", " : "", sweep[i],
                1e3 * fz[i], 1e3 * mm[i], 1e3 * dg[i],
                best[i] == 1 ? "fused" : best[i] == 3 ? "fused_mma" : "dequant_gemm");
    fprintf(js, "],\n");
#ifdef QLR_BACKEND_CUDA
    fprintf(js, "     \"peak_allocated_bytes\": %zu, \"peak_device_used_bytes\": %zu}",
            qlr_cuda_peak_bytes(be), *peak_used);
#else
    fprintf(js, "     \"peak_device_used_bytes\": %zu}", *peak_used);
#endif
    free(ids);
    free(seq);
    free(pos);
    model_free(&m);
    return QLR_OK;
}

qlr_bench_decode_opts qlr_bench_decode_default_opts(void) {
    qlr_bench_decode_opts o = {"all", 2048, 512, 20, 0};
    return o;
}

qlr_status qlr_bench_decode(const qlr_bench_decode_opts *o, FILE *js) {
    qlr_backend *be;
    QLR_TRY(qlr_backend_create("cuda", 0, &be));
    double bw = 0, gemm = 0;
    qlr_status st = measure_copy_bw(be, &bw);
    if (st == QLR_OK) st = measure_gemm(be, &gemm);
#ifdef QLR_BACKEND_CUDA
    char dev[256];
    snprintf(dev, sizeof dev, "%s", qlr_cuda_device_name(be));
#else
    const char *dev = "none";
#endif
    qlr_backend_free(be);
    QLR_TRY(st);
    fprintf(stderr, "bench: copy bandwidth %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", bw, gemm);
    fprintf(js, "{\"bench\": \"decode\", \"device\": \"%s\", \"copy_bandwidth_GBps\": %.1f, "
            "\"gemm_bf16_tflops\": %.1f, \"models\": [\n", dev, bw, gemm);
    int first = 1;
    for (size_t i = 0; i < sizeof k_models / sizeof k_models[0] && st == QLR_OK; i++) {
        if (strcmp(o->models, "all") && strcmp(o->models, k_models[i].name)) continue;
        if (!first) fprintf(js, ",\n");
        first = 0;
        size_t peak = 0;
        /* a fresh backend per model, so that its peak-memory figure is its own */
        st = qlr_backend_create("cuda", 0, &be);
        if (st == QLR_OK) {
            st = bench_model(be, &k_models[i], o, bw, gemm, js, &peak);
            qlr_backend_free(be);
        }
    }
    fprintf(js, "\n]}\n");
    fflush(js);
    return st;
}
