/* bench/decode_bench.c: see decode_bench.h. The model is model/'s: qlr_model_create_random
 * builds Llama-3.1-8B or SmolLM2-135M (their qlr_model_config) with random NF4 bytes, and every
 * forward timed here is model/forward.c's: qlr_model_forward for prefills and eager decode steps,
 * qlr_model_forward_dev captured in a CUDA graph for replayed decode steps, its debug hooks
 * (qlr_forward_set_skip / _set_fused) for the in-place ablation and the unfused comparison, the
 * model's NF4 lm_head for the all-NF4 figure. Measures: copy bandwidth (device-to-device, bytes
 * read + written), cuBLASLt bf16 GEMM rate (8192^3), prefill tokens/s and its linear layers'
 * share of the GEMM rate, decode tokens/s at batch 1/8/32/64 and batch-1 decode against the NF4
 * bandwidth bound, the fused-vs-dequant crossover of the NF4 linear, and peak device memory.
 * Host wall clock around synchronised regions (a decode step ends in the sampler's
 * device-to-host copy anyway). On the CPU backend (opts.device "cpu") only the backend-generic
 * parts run: a smoke run of this code, not a measurement. */
#include "bench/decode_bench.h"
#include "bench/bench_common.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "core/core.h"
#include "model/model.h"
#ifdef QLR_BACKEND_CUDA
#include <cuda_profiler_api.h>
#include <cuda_runtime_api.h>

#include "backend/cuda/cuda_backend.h"
#endif

/* ---- the two models ---- */

typedef struct bench_model {
    const char *name;
    qlr_model_config cfg;
} bench_model;

/* Llama-3.1-8B and SmolLM2-135M-Instruct (bench/bench_common.h). */
static int bench_models(bench_model *out) {
    out[0].name = "llama3-8b";
    qlr_bench_model_config(out[0].name, &out[0].cfg, NULL);
    out[1].name = "smollm2-135m";
    qlr_bench_model_config(out[1].name, &out[1].cfg, NULL);
    return 2;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Random host inputs for the op-level timings (their content does not matter for speed, but
 * never zeros). */
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

/* Values of about N(0, sigma)'s scale: uniform in [-1.7 sigma, 1.7 sigma). */
static float next_uniform(uint64_t *s, float sigma) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    float u = (float)((*s >> 11) & 0xffffff) / 16777216.0f - 0.5f;
    return u * 3.4f * sigma;
}

#ifdef QLR_BACKEND_CUDA
static void fill_bf16(uint16_t *p, size_t n, float sigma) {
    for (size_t i = 0; i < n; i++) p[i] = qlr_f32_to_bf16(next_uniform(&xs_state, sigma));
}
#endif

/* n random act values (sigma 1) into the device buffer dst. */
static qlr_status random_act(qlr_backend *be, void *dst, int64_t n) {
    float *h = malloc((size_t)n * 4);
    if (!h) return qlr_errorf(QLR_ERR_NOMEM, "bench: host buffer");
    for (int64_t i = 0; i < n; i++) h[i] = next_uniform(&xs_state, 1.0f);
    qlr_status st = qlr_backend_upload_act(be, dst, h, n);
    if (st == QLR_OK) st = be->mem.sync(be);
    free(h);
    return st;
}

/* Bytes of an NF4 store as its kernels read them (codes, absmax codes, second-level table). */
static double nf4_store_bytes(const qlr_nf4 *w) {
    return (double)((w->n + 1) / 2 + w->n_blocks + 4 * w->n_dq_blocks);
}

/* ---- one model on one backend ---- */

typedef struct bctx {
    const char *name;
    qlr_backend *be;
    int cuda;               /* be is the CUDA backend (else: smoke run on the CPU) */
    qlr_model *m;
    qlr_kv_cache *kv;       /* [64 sequences, ctx] */
    qlr_forward *f;         /* max_n tokens, 64 logits rows */
    int64_t max_n;
    int32_t *d_ids, *d_pos, *d_seq, *d_rows; /* the device batch of graph steps [max_n] */
    /* op-level scratch (act): sx random input and sy output [max_n, wide], s1..s3 [wide] */
    void *sx, *sy, *s1, *s2, *s3;
    qlr_nf4 *head_nf4;      /* the NF4 lm_head (untied models), in m->lm_head_nf4 only while
                               timed */
    double nf4_bytes, nf4_params, head_nf4_bytes;
} bctx;

static void bctx_free(bctx *b) {
    qlr_backend *be = b->be;
    if (!be) return;
    be->mem.sync(be);
    void *bufs[] = {b->d_ids, b->d_pos, b->d_seq, b->d_rows, b->sx, b->sy, b->s1, b->s2, b->s3};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->mem.free(be, bufs[i]);
    qlr_forward_free(b->f);
    qlr_kv_cache_free(b->kv);
    if (b->m) b->m->lm_head_nf4 = b->head_nf4; /* freed with the model */
    qlr_model_free(b->m);
    memset(b, 0, sizeof *b);
}

static void *dalloc(qlr_backend *be, size_t bytes, qlr_status *st) {
    if (*st != QLR_OK) return NULL;
    void *p = be->mem.alloc(be, bytes);
    if (!p) *st = qlr_error_status();
    return p;
}

/* The random model, a cache of 64 sequences of ctx positions, a forward workspace of max_n
 * tokens and 64 logits rows, the device batch and the scratch. */
static qlr_status bctx_create(qlr_backend *be, const bench_model *bm, int64_t ctx, int64_t max_n,
                              bctx *b) {
    memset(b, 0, sizeof *b);
    b->name = bm->name;
    b->be = be;
    b->cuda = be->kind == QLR_DEVICE_CUDA;
    b->max_n = max_n;
    const qlr_model_config *c = &bm->cfg;
    qlr_model_random_params rp = qlr_model_random_params_default();
    rp.lm_head_nf4 = !c->tied_embeddings && b->cuda; /* serving with a 4-bit output projection */
    qlr_status st = qlr_model_create_random(c, be, 1, &rp, &b->m);
    if (st != QLR_OK) return st;
    b->head_nf4 = b->m->lm_head_nf4;
    b->m->lm_head_nf4 = NULL;
    if (b->head_nf4) b->head_nf4_bytes = nf4_store_bytes(b->head_nf4);
    for (int32_t l = 0; l < c->n_layers; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            b->nf4_bytes += nf4_store_bytes(&b->m->layers[l].w[i]);
            b->nf4_params += (double)b->m->layers[l].w[i].n;
        }
    st = qlr_kv_cache_create(b->m, 64, (int32_t)ctx, &b->kv);
    if (st == QLR_OK) st = be->mem.memset0(be, b->kv->block, (size_t)b->kv->bytes);
    if (st == QLR_OK) st = qlr_forward_create(b->m, (int32_t)max_n, 64, &b->f);
    int64_t wide = c->d_ff;
    if (c->d_model > wide) wide = c->d_model;
    if ((int64_t)c->n_heads * c->head_dim > wide) wide = (int64_t)c->n_heads * c->head_dim;
    size_t es = qlr_backend_act_size(be);
    b->d_ids = dalloc(be, (size_t)max_n * 4, &st);
    b->d_pos = dalloc(be, (size_t)max_n * 4, &st);
    b->d_seq = dalloc(be, (size_t)max_n * 4, &st);
    b->d_rows = dalloc(be, (size_t)max_n * 4, &st);
    b->sx = dalloc(be, (size_t)(max_n * wide) * es, &st);
    b->sy = dalloc(be, (size_t)(max_n * wide) * es, &st);
    b->s1 = dalloc(be, (size_t)wide * es, &st);
    b->s2 = dalloc(be, (size_t)wide * es, &st);
    b->s3 = dalloc(be, (size_t)wide * es, &st);
    if (st == QLR_OK) st = random_act(be, b->sx, max_n * wide);
    if (st == QLR_OK) st = random_act(be, b->s1, wide);
    if (st == QLR_OK) st = random_act(be, b->s2, wide);
    if (st == QLR_OK) st = random_act(be, b->s3, wide);
    if (st != QLR_OK) bctx_free(b);
    return st;
}

/* The device batch of graph steps and forced-path prefills: ids/seq/pos of n tokens. */
static qlr_status upload_tokens(bctx *b, int64_t n, const int32_t *ids, const int32_t *seq,
                                const int32_t *pos) {
    qlr_backend *be = b->be;
    QLR_TRY(be->mem.h2d(be, b->d_ids, ids, (size_t)n * 4));
    QLR_TRY(be->mem.h2d(be, b->d_seq, seq, (size_t)n * 4));
    return be->mem.h2d(be, b->d_pos, pos, (size_t)n * 4);
}

/* Greedy sampling of n logits rows into out_ids (host); synchronises. */
static qlr_status sample_greedy(bctx *b, float *logits, int64_t n, int32_t *out_ids) {
    qlr_sampling sp[64];
    uint64_t rng[64];
    QLR_ASSERT(n <= 64);
    for (int64_t i = 0; i < n; i++) {
        sp[i] = qlr_sampling_default();
        rng[i] = (uint64_t)i;
    }
    return b->be->ops.sample(b->be, out_ids, logits, sp, rng, n, b->m->cfg.n_vocab);
}

/* One eager forward through qlr_model_forward (the host batch validated and copied in): the
 * logits of the last token (last_only) or of every token, sampled greedily into out. */
static qlr_status forward_host(bctx *b, int64_t n, const int32_t *ids, const int32_t *seq,
                               const int32_t *pos, int last_only, int32_t *out) {
    int32_t last = (int32_t)n - 1;
    qlr_batch hb = {(int32_t)n, ids, pos, seq, last_only ? 1 : (int32_t)n, last_only ? &last : NULL,
                    NULL, NULL};
    float *logits = NULL;
    QLR_TRY(qlr_model_forward(b->f, b->kv, &hb, &logits));
    return sample_greedy(b, logits, hb.n_logits, out);
}

/* A prefill of one sequence at positions 0..n-1 through qlr_model_forward_dev with fresh = 0:
 * the attention op over the cache even where the backend has attention_fresh. */
static qlr_status prefill_attention_op(bctx *b, int64_t n, const int32_t *ids, const int32_t *seq,
                                       const int32_t *pos, int32_t *out) {
    int32_t last = (int32_t)n - 1;
    QLR_TRY(upload_tokens(b, n, ids, seq, pos));
    QLR_TRY(b->be->mem.h2d(b->be, b->d_rows, &last, 4));
    qlr_batch_dev db = {(int32_t)n, b->d_ids, b->d_pos, b->d_seq, 1, b->d_rows, NULL, NULL, -1, 0, NULL};
    float *logits = NULL;
    QLR_TRY(qlr_model_forward_dev(b->f, b->kv, &db, &logits));
    return sample_greedy(b, logits, 1, out);
}

#ifdef QLR_BACKEND_CUDA
/* Captures a decode step of B tokens (device batch: the first B rows of d_ids/d_seq/d_pos, every
 * row's logits) into a CUDA graph, with the model and hooks as they are now. */
static qlr_status capture_step(bctx *b, int32_t B, cudaGraphExec_t *exec, float **logits) {
    cudaStream_t cs = (cudaStream_t)qlr_cuda_stream(b->be);
    cudaGraph_t g;
    qlr_batch_dev db = {B, b->d_ids, b->d_pos, b->d_seq, B, NULL, NULL, NULL, -1, 0, NULL};
    if (cudaStreamBeginCapture(cs, cudaStreamCaptureModeRelaxed) != cudaSuccess)
        return qlr_errorf(QLR_ERR_DEVICE, "bench: cudaStreamBeginCapture failed");
    qlr_status s = qlr_model_forward_dev(b->f, b->kv, &db, logits);
    cudaError_t e = cudaStreamEndCapture(cs, &g);
    if (s != QLR_OK) {
        if (e == cudaSuccess) cudaGraphDestroy(g);
        return s;
    }
    if (e != cudaSuccess)
        return qlr_errorf(QLR_ERR_DEVICE, "bench: graph capture: %s", cudaGetErrorString(e));
    e = cudaGraphInstantiate(exec, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess)
        return qlr_errorf(QLR_ERR_DEVICE, "bench: graph instantiate: %s", cudaGetErrorString(e));
    return QLR_OK;
}

/* Captures a batch-B decode step and replays it warm + steps times at positions D + s, feeding
 * the greedy tokens back (each step: the tokens uploaded, the graph, the sampler);
 * *sec = seconds per timed step. */
static qlr_status graph_decode(bctx *b, int B, int64_t D, int steps, int warm, int32_t *tok,
                               int32_t *seq, int32_t *pos, double *sec) {
    qlr_backend *be = b->be;
    cudaGraphExec_t exec = NULL;
    float *logits = NULL;
    int32_t out[64];
    qlr_status st = capture_step(b, B, &exec, &logits);
    cudaStream_t cs = (cudaStream_t)qlr_cuda_stream(be);
    double t_start = now_s();
    for (int s = 0; s < steps + warm && st == QLR_OK; s++) {
        if (s == warm) {
            st = be->mem.sync(be);
            t_start = now_s();
        }
        for (int i = 0; i < B; i++) seq[i] = i, pos[i] = (int32_t)(D + s);
        if (st == QLR_OK) st = upload_tokens(b, B, tok, seq, pos);
        if (st == QLR_OK && cudaGraphLaunch(exec, cs) != cudaSuccess)
            st = qlr_errorf(QLR_ERR_DEVICE, "bench: cudaGraphLaunch failed");
        if (st == QLR_OK) st = sample_greedy(b, logits, B, out);
        for (int i = 0; i < B; i++) tok[i] = out[i];
    }
    *sec = (now_s() - t_start) / steps;
    if (exec) cudaGraphExecDestroy(exec);
    return st;
}

/* QLR_BENCH_PROFILE_STEP=1: a prefill of D tokens, then one eager batch-1 decode step (bf16
 * lm_head, then NF4 lm_head) between cudaProfilerStart/Stop, for `ncu --profile-from-start off`
 * to time every kernel of a step; nothing else is measured. */
static qlr_status profile_step(bctx *b, int64_t D, int32_t *ids, int32_t *seq, int32_t *pos) {
    int32_t out[1], tok[1] = {1};
    for (int64_t i = 0; i < D; i++) seq[i] = 0, pos[i] = (int32_t)i;
    QLR_TRY(forward_host(b, D, ids, seq, pos, 1, out));
    seq[0] = 0;
    pos[0] = (int32_t)D;
    QLR_TRY(forward_host(b, 1, tok, seq, pos, 1, out)); /* warm-up: plans, workspaces */
    QLR_TRY(b->be->mem.sync(b->be));
    cudaProfilerStart();
    qlr_status st = forward_host(b, 1, tok, seq, pos, 1, out);
    if (st == QLR_OK && b->head_nf4) {
        b->m->lm_head_nf4 = b->head_nf4;
        st = forward_host(b, 1, tok, seq, pos, 1, out);
        b->m->lm_head_nf4 = NULL;
    }
    if (st == QLR_OK) st = b->be->mem.sync(b->be);
    cudaProfilerStop();
    return st;
}
#endif

/* Seconds for one pass over every NF4 linear of the model at n tokens (x = sx, y = sy), best of
 * `reps`; `path` a qlr_cuda_nf4_path on CUDA (the op itself elsewhere). */
static qlr_status time_linears(bctx *b, int64_t n, int path, int reps, double *out) {
    qlr_backend *be = b->be;
    double best = 1e30;
    for (int r = 0; r < reps + 1; r++) {
        QLR_TRY(be->mem.sync(be));
        double t0 = now_s();
        for (int32_t l = 0; l < b->m->cfg.n_layers; l++)
            for (int i = 0; i < QLR_LIN_COUNT; i++) {
                const qlr_nf4 *w = &b->m->layers[l].w[i];
#ifdef QLR_BACKEND_CUDA
                if (b->cuda) {
                    QLR_TRY(qlr_cuda_nf4_linear_path(be, b->sy, b->sx, w, NULL, n,
                                                     (qlr_cuda_nf4_path)path));
                    continue;
                }
#endif
                QLR_TRY(be->ops.nf4_linear(be, b->sy, b->sx, w, NULL, n));
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
    uint8_t *h = malloc(1 << 24);
    qlr_status st = a && b ? QLR_OK : qlr_error_status();
    if (st == QLR_OK && !h) st = qlr_errorf(QLR_ERR_NOMEM, "bench: host buffer");
    if (st == QLR_OK) fill_random(h, 1 << 24);
    for (size_t off = 0; off < bytes && st == QLR_OK; off += 1 << 24)
        st = be->mem.h2d(be, (char *)a + off, h, 1 << 24);
    if (st == QLR_OK) st = be->mem.sync(be);
    if (st == QLR_OK) st = be->mem.d2d(be, b, a, bytes);
    if (st == QLR_OK) st = be->mem.sync(be);
    int reps = 20;
    double t0 = now_s();
    for (int i = 0; i < reps && st == QLR_OK; i++)
        st = be->mem.d2d(be, (i & 1) ? a : b, (i & 1) ? b : a, bytes);
    if (st == QLR_OK) st = be->mem.sync(be);
    double t = now_s() - t0;
    *gbps = 2.0 * (double)bytes * reps / t / 1e9;
    free(h);
    if (a) be->mem.free(be, a);
    if (b) be->mem.free(be, b);
    return st;
}

static size_t device_used(const bctx *b) {
#ifdef QLR_BACKEND_CUDA
    size_t fr = 0, tot = 0;
    if (b->cuda && cudaMemGetInfo(&fr, &tot) == cudaSuccess) return tot - fr;
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
static qlr_status bench_attention_sdpa(const bctx *bc, int64_t P, int reps, char *js, size_t cap) {
    snprintf(js, cap, "null");
#ifdef QLR_BACKEND_CUDA
    if (!bc->cuda) return QLR_OK;
    qlr_backend *be = bc->be;
    const qlr_model_config *c = &bc->m->cfg;
    const int64_t sizes[3] = {P, 4096, 8192}, H = c->n_heads, KV = c->n_kv_heads, D = c->head_dim;
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
            fprintf(stderr, "bench %s: attention S=%lld skipped: %s\n", bc->name, (long long)S,
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
                for (int64_t l = 0; l < (r ? c->n_layers : 1) && st == QLR_OK; l++)
                    st = be->ops.attention(be, o1, q, k, v, ds, dp, S, H, KV, D, S, scale);
                if (st == QLR_OK) st = be->mem.sync(be);
                double t = (now_s() - s0) / (double)c->n_layers;
                if (r > 0 && t < ours) ours = t;
            }
            qlr_status ds_st = QLR_OK;
            for (int r = 0; r < reps + 1 && st == QLR_OK && ds_st == QLR_OK; r++) {
                st = be->mem.sync(be);
                double s0 = now_s();
                for (int64_t l = 0; l < (r ? c->n_layers : 1) && ds_st == QLR_OK; l++)
                    ds_st = qlr_cuda_attention_prefill_cudnn(be, o2, q, k, v, S, H, KV, D, scale);
                if (st == QLR_OK) st = be->mem.sync(be);
                double t = now_s() - s0;
                if (r == 0) first = t;
                else if (t / (double)c->n_layers < dnn) dnn = t / (double)c->n_layers;
            }
            if (ds_st != QLR_OK) {
                dnn_state = qlr_status_str(ds_st);
                fprintf(stderr, "bench %s: cuDNN SDPA at S=%lld: %s\n", bc->name, (long long)S,
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
                    bc->name, (long long)S, 1e3 * ours, fl / ours / 1e12, ok ? 1e3 * dnn : 0.0,
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
        void *bufs[7] = {q, k, v, o1, o2, ds, dp};
        for (int i = 0; i < 7; i++)
            if (bufs[i]) be->mem.free(be, bufs[i]);
        free(h);
        free(h2);
        free(hi);
    }
    if (len < cap) snprintf(js + len, cap - len, "]");
    return st;
#else
    (void)bc, (void)P, (void)reps;
    return QLR_OK;
#endif
}

/* ---- the measurements of one model ---- */

/* What each kernel kind costs in place in the batch-1 graph step (overlap included): the step
 * timed with that kind left out (qlr_forward_set_skip), subtracted from the full step. The
 * values the skipping steps compute are meaningless; only their time counts. */
#define N_ABL 12
#ifdef QLR_BACKEND_CUDA
static const uint32_t k_abl_mask[N_ABL] = {
    0, QLR_FORWARD_SKIP_ATTENTION, QLR_FORWARD_SKIP_ROPE_KV, QLR_FORWARD_SKIP_NORMS,
    QLR_FORWARD_SKIP_QKV, QLR_FORWARD_SKIP_O, QLR_FORWARD_SKIP_GATE_UP, QLR_FORWARD_SKIP_DOWN,
    QLR_FORWARD_SKIP_LM_HEAD,
    QLR_FORWARD_SKIP_ATTENTION | QLR_FORWARD_SKIP_ROPE_KV | QLR_FORWARD_SKIP_NORMS |
        QLR_FORWARD_SKIP_LM_HEAD,
    QLR_FORWARD_SKIP_QKV | QLR_FORWARD_SKIP_O | QLR_FORWARD_SKIP_GATE_UP | QLR_FORWARD_SKIP_DOWN,
    QLR_FORWARD_SKIP_ALL};
#endif
static const char *k_abl_name[N_ABL] = {"step", "attention", "rope_kv", "norms", "qkv", "o",
                                        "gate_up", "down_swiglu", "lm_head", "non_linear_kernels",
                                        "nf4_linears", "all_kernels"};

static const int k_batches[4] = {1, 8, 32, 64};
static const int k_sweep[7] = {1, 2, 4, 8, 16, 32, 64};
static const char *k_gnames[7] = {"q_proj", "k_proj", "gate_proj", "down_proj", "qkv_merged",
                                  "gate_up_merged", "down_swiglu"};
static const char *k_shape_names[4] = {"q_proj", "k_proj", "gate_proj", "down_proj"};

/* Everything one model's JSON object reports. */
typedef struct bres {
    /* prefill */
    double best_pf, ours_pf, lin_pf, att_pf, dq_s;
    const char *pf_att;
    char sdpa_js[1536];
    /* NF4 linears */
    double fz[7], dg[7], mm[7];
    int best[7];
    double var_s[3], gshp[7], shp[4][3];
    /* decode */
    double dec_s[4], dec_graph_s[4], dec_b1_unfused, dec_b1_nf4head, abl_ms[N_ABL];
} bres;

/* Prefill of P tokens: as served (qlr_model_forward: attention_fresh, i.e. cuDNN's SDPA, where
 * the backend has it), then with the attention op (qlr_model_forward_dev, fresh = 0); the
 * linears alone, the attention op alone over the prefill's cache, cuDNN vs ours, and the
 * dequantization kernel alone. */
static qlr_status bench_prefill(bctx *b, int64_t P, int reps, int32_t *ids, int32_t *seq,
                                int32_t *pos, bres *r) {
    qlr_backend *be = b->be;
    const qlr_model_config *c = &b->m->cfg;
    int32_t out[1];
    qlr_status st = QLR_OK;
    for (int64_t i = 0; i < P; i++) seq[i] = 0, pos[i] = (int32_t)i;
    r->best_pf = r->ours_pf = 1e30;
    for (int pass = 0; pass < 2; pass++) {
        double *best = pass ? &r->ours_pf : &r->best_pf;
        for (int k = 0; k < reps + 1 && st == QLR_OK; k++) {
            st = be->mem.sync(be);
            double s0 = now_s();
            if (st == QLR_OK)
                st = pass ? prefill_attention_op(b, P, ids, seq, pos, out)
                          : forward_host(b, P, ids, seq, pos, 1, out);
            double t = now_s() - s0;
            if (k > 0 && t < *best) *best = t;
        }
    }
    /* which attention the served prefill used: the forward's attention_fresh on this shape
     * (seq 0's first P cache rows are its own k/v, contiguous) or its fallback */
    r->pf_att = "attention";
    float scale = 1.0f / sqrtf((float)c->head_dim);
    if (st == QLR_OK && be->ops.attention_fresh && P > 64) {
        qlr_status fs = be->ops.attention_fresh(be, b->sy, b->sx, b->kv->k[0], b->kv->v[0], P,
                                                c->n_heads, c->n_kv_heads, c->head_dim, scale);
        if (fs == QLR_OK) r->pf_att = "attention_fresh";
        else if (fs == QLR_ERR_UNSUPPORTED) qlr_error_clear();
        else st = fs;
    }
    fprintf(stderr, "bench %s: prefill %lld tokens: %.1f ms (%.0f tokens/s) through %s; with the "
            "attention op %.1f ms (%.0f tokens/s)\n", b->name, (long long)P, 1e3 * r->best_pf,
            P / r->best_pf, r->pf_att, 1e3 * r->ours_pf, P / r->ours_pf);
    if (st == QLR_OK) st = time_linears(b, P, 0, reps, &r->lin_pf);
    /* attention alone over the prefill (the cache holds this prefill's K/V; the device batch
     * its seq/pos) */
    r->att_pf = 1e30;
    for (int k = 0; k < reps + 1 && st == QLR_OK; k++) {
        st = be->mem.sync(be);
        double s0 = now_s();
        for (int32_t l = 0; l < c->n_layers && st == QLR_OK; l++)
            st = be->ops.attention(be, b->sy, b->sx, b->kv->k[l], b->kv->v[l], b->d_seq,
                                   b->d_pos, P, c->n_heads, c->n_kv_heads, c->head_dim,
                                   b->kv->ctx, scale);
        if (st == QLR_OK) st = be->mem.sync(be);
        double t = now_s() - s0;
        if (k > 0 && t < r->att_pf) r->att_pf = t;
    }
    if (st == QLR_OK) st = bench_attention_sdpa(b, P, reps, r->sdpa_js, sizeof r->sdpa_js);
    r->dq_s = 0;
#ifdef QLR_BACKEND_CUDA
    if (b->cuda) {
        /* the dequantization kernel alone (bytes: NF4 in, bf16 out) */
        r->dq_s = 1e30;
        void *wsp = st == QLR_OK ? be->mem.alloc(be, (size_t)c->d_ff * c->d_model * 2) : NULL;
        if (st == QLR_OK && !wsp) st = qlr_error_status();
        for (int k = 0; k < reps + 1 && st == QLR_OK; k++) {
            st = be->mem.sync(be);
            double s0 = now_s();
            for (int32_t l = 0; l < c->n_layers && st == QLR_OK; l++)
                for (int i = 0; i < QLR_LIN_COUNT && st == QLR_OK; i++)
                    st = qlr_cuda_nf4_dequant(be, wsp, &b->m->layers[l].w[i]);
            if (st == QLR_OK) st = be->mem.sync(be);
            double t = now_s() - s0;
            if (k > 0 && t < r->dq_s) r->dq_s = t;
        }
        if (wsp) be->mem.free(be, wsp);
    }
#endif
    return st;
}

#ifdef QLR_BACKEND_CUDA
/* The n = 1 kernels alone in a CUDA graph (no launch gaps from the host): shape si once per
 * layer (the launches rotate over the layers' weights, so nothing sits in L2); GB/s of NF4
 * bytes. Shapes: q, k, gate, down; q/k/v and gate/up merged into one launch; the SwiGLU-fused
 * down. */
static qlr_status graph_shape_rate(bctx *b, int si, double *gbps) {
    qlr_backend *be = b->be;
    const qlr_model_config *c = &b->m->cfg;
    cudaStream_t cs = (cudaStream_t)qlr_cuda_stream(be);
    cudaGraph_t gr;
    cudaGraphExec_t ge = NULL;
    double bytes = 0;
    qlr_status st = QLR_OK;
    if (cudaStreamBeginCapture(cs, cudaStreamCaptureModeRelaxed) != cudaSuccess)
        return qlr_errorf(QLR_ERR_DEVICE, "bench: capture");
    for (int32_t l = 0; l < c->n_layers && st == QLR_OK; l++) {
        const qlr_layer *L = &b->m->layers[l];
        if (si < 4) {
            static const qlr_linear_id one[4] = {QLR_LIN_Q, QLR_LIN_K, QLR_LIN_GATE, QLR_LIN_DOWN};
            const qlr_nf4 *w = &L->w[one[si]];
            st = qlr_cuda_nf4_linear_path(be, b->sy, b->sx, w, NULL, 1, QLR_CUDA_NF4_FUSED);
            bytes += nf4_store_bytes(w);
        } else if (si < 6) {
            void *ys[3] = {b->s1, b->s2, b->s3};
            const qlr_nf4 *ws[3] = {&L->w[QLR_LIN_Q], &L->w[QLR_LIN_K], &L->w[QLR_LIN_V]};
            if (si == 5) ws[0] = &L->w[QLR_LIN_GATE], ws[1] = &L->w[QLR_LIN_UP];
            int k = si == 4 ? 3 : 2;
            st = be->ops.nf4_linear_multi(be, k, ys, b->sx, ws, NULL, 1);
            for (int i = 0; i < k; i++) bytes += nf4_store_bytes(ws[i]);
        } else {
            st = be->ops.swiglu_nf4_linear(be, b->s3, b->s1, b->s2, &L->w[QLR_LIN_DOWN], NULL, 1);
            bytes += nf4_store_bytes(&L->w[QLR_LIN_DOWN]);
        }
    }
    cudaError_t e = cudaStreamEndCapture(cs, &gr);
    if (st == QLR_OK && e != cudaSuccess) st = qlr_errorf(QLR_ERR_DEVICE, "bench: capture end");
    if (st == QLR_OK && cudaGraphInstantiate(&ge, gr, 0) != cudaSuccess)
        st = qlr_errorf(QLR_ERR_DEVICE, "bench: instantiate");
    if (e == cudaSuccess) cudaGraphDestroy(gr);
    double best_g = 1e30;
    for (int k = 0; k < 6 && st == QLR_OK; k++) {
        st = be->mem.sync(be);
        double s0 = now_s();
        if (st == QLR_OK && cudaGraphLaunch(ge, cs) != cudaSuccess)
            st = qlr_errorf(QLR_ERR_DEVICE, "bench: graph launch");
        if (st == QLR_OK) st = be->mem.sync(be);
        double t = now_s() - s0;
        if (k > 0 && t < best_g) best_g = t;
    }
    if (ge) cudaGraphExecDestroy(ge);
    *gbps = bytes / best_g / 1e9;
    fprintf(stderr, "bench %s: n=1 %s in a graph: %.0f GB/s (%.1f us per launch)\n", b->name,
            k_gnames[si], *gbps, 1e6 * best_g / (double)c->n_layers);
    return st;
}
#endif

/* The NF4 linear per token count: the crossover of the fused FMA kernel, the fused tensor-core
 * kernel and dequantize + cuBLASLt (the fastest becomes the AUTO policy of the decode steps),
 * the n = 1 kernel variants (the fastest stays), the n = 1 kernels in graphs and the
 * steady-state rate of single shapes. */
static qlr_status bench_linears(bctx *b, int reps, bres *r) {
    qlr_backend *be = b->be;
    qlr_status st = QLR_OK;
    for (int i = 0; i < 7 && st == QLR_OK; i++) {
        st = time_linears(b, k_sweep[i], 1, reps, &r->fz[i]);
        if (st == QLR_OK) st = time_linears(b, k_sweep[i], 2, reps, &r->dg[i]);
        if (st == QLR_OK) st = time_linears(b, k_sweep[i], 3, reps, &r->mm[i]);
        r->best[i] = r->fz[i] <= r->dg[i] && r->fz[i] <= r->mm[i] ? 1
                     : (r->mm[i] <= r->dg[i] ? 3 : 2);
    }
#ifdef QLR_BACKEND_CUDA
    if (b->cuda) {
        int pmax[8], np = 0;
        qlr_cuda_nf4_path ppath[8];
        for (int i = 0; i < 7; i++) {
            if (np && (int)ppath[np - 1] == r->best[i]) pmax[np - 1] = k_sweep[i];
            else {
                pmax[np] = k_sweep[i];
                ppath[np++] = (qlr_cuda_nf4_path)r->best[i];
            }
        }
        if (st == QLR_OK) st = qlr_cuda_set_nf4_policy(be, np, pmax, ppath);
        /* the n = 1 kernel variant (register kernel with 2 or 3 blocks per SM, or streaming) */
        static const int var_id[3] = {2, 3, 4};
        int var_best = 0;
        for (int vi = 0; vi < 3 && st == QLR_OK; vi++) {
            qlr_cuda_set_gemv1_variant(be, var_id[vi]);
            st = time_linears(b, 1, 1, reps, &r->var_s[vi]);
            if (vi > 0 && r->var_s[vi] < r->var_s[var_best]) var_best = vi;
        }
        qlr_cuda_set_gemv1_variant(be, var_id[var_best]);
        if (st == QLR_OK) st = time_linears(b, 1, 1, reps, &r->fz[0]);
        for (int si = 0; si < 7 && st == QLR_OK; si++) st = graph_shape_rate(b, si, &r->gshp[si]);
    }
#endif
    /* steady-state rate of each kernel on single weight shapes at n = 1 (GB/s of NF4 bytes) */
    static const qlr_linear_id shape_id[4] = {QLR_LIN_Q, QLR_LIN_K, QLR_LIN_GATE, QLR_LIN_DOWN};
    static const int paths[3] = {1, 3, 2};
    int32_t layers = b->m->cfg.n_layers;
    for (int si = 0; si < 4 && st == QLR_OK; si++) {
        double bytes = nf4_store_bytes(&b->m->layers[0].w[shape_id[si]]);
        for (int pi = 0; pi < 3 && st == QLR_OK; pi++) {
            int iters = 50;
            double t0 = now_s();
            for (int it = 0; it < iters + 5 && st == QLR_OK; it++) {
                if (it == 5) {
                    st = be->mem.sync(be);
                    t0 = now_s();
                }
                /* rotate over the layers so that the weights do not sit in L2 */
                const qlr_nf4 *wl = &b->m->layers[it % layers].w[shape_id[si]];
#ifdef QLR_BACKEND_CUDA
                if (b->cuda && st == QLR_OK) {
                    st = qlr_cuda_nf4_linear_path(be, b->sy, b->sx, wl, NULL, 1,
                                                  (qlr_cuda_nf4_path)paths[pi]);
                    continue;
                }
#endif
                (void)paths; /* one path off CUDA: the op */
                if (st == QLR_OK) st = be->ops.nf4_linear(be, b->sy, b->sx, wl, NULL, 1);
            }
            if (st == QLR_OK) st = be->mem.sync(be);
            r->shp[si][pi] = bytes * iters / (now_s() - t0) / 1e9;
        }
    }
    return st;
}

/* Decode: seq 0's first D positions are filled by a prefill, then copied to every other
 * sequence so each batch row attends over a real context; at batch 1, 8, 32 and 64 eager steps
 * (qlr_model_forward) and graph steps (qlr_model_forward_dev replayed), and at batch 1 the
 * unfused step, the NF4-lm_head step and the in-place ablation. */
static qlr_status bench_decode_steps(bctx *b, const qlr_bench_decode_opts *o, int32_t *ids,
                                     int32_t *seq, int32_t *pos, bres *r) {
    qlr_backend *be = b->be;
    const qlr_model_config *c = &b->m->cfg;
    int64_t D = o->decode_ctx;
    int32_t out[64];
    for (int64_t i = 0; i < D; i++) seq[i] = 0, pos[i] = (int32_t)i;
    qlr_status st = forward_host(b, D, ids, seq, pos, 1, out);
    size_t rowb = (size_t)c->n_kv_heads * c->head_dim * qlr_backend_act_size(be);
    for (int32_t l = 0; l < c->n_layers && st == QLR_OK; l++)
        for (int32_t s = 1; s < b->kv->n_seq && st == QLR_OK; s++) {
            size_t off = (size_t)s * b->kv->ctx * rowb;
            st = be->mem.d2d(be, (char *)b->kv->k[l] + off, b->kv->k[l], (size_t)D * rowb);
            if (st == QLR_OK)
                st = be->mem.d2d(be, (char *)b->kv->v[l] + off, b->kv->v[l], (size_t)D * rowb);
        }
    for (int bi = 0; bi < 4 && st == QLR_OK; bi++) {
        int B = k_batches[bi];
        int32_t tok[64];
        for (int i = 0; i < B; i++) tok[i] = (int32_t)(i + 1);
        int steps = o->quick ? 3 : o->decode_steps, warm = 2;
        double t_start = 0;
        for (int s = 0; s < steps + warm && st == QLR_OK; s++) {
            if (s == warm) {
                st = be->mem.sync(be);
                t_start = now_s();
            }
            for (int i = 0; i < B; i++) seq[i] = i, pos[i] = (int32_t)(D + s);
            if (st == QLR_OK) st = forward_host(b, B, tok, seq, pos, 0, out);
            for (int i = 0; i < B; i++) tok[i] = out[i];
        }
        r->dec_s[bi] = (now_s() - t_start) / steps;
        r->dec_graph_s[bi] = r->dec_s[bi];
#ifdef QLR_BACKEND_CUDA
        if (b->cuda) {
            /* the same step replayed from a CUDA graph (no per-kernel launch cost) */
            if (st == QLR_OK)
                st = graph_decode(b, B, D, steps, warm, tok, seq, pos, &r->dec_graph_s[bi]);
            if (B == 1 && st == QLR_OK) {
                /* the same batch-1 step with the separate ops (no fused entries) */
                qlr_forward_set_fused(b->f, 0);
                st = graph_decode(b, B, D, steps, warm, tok, seq, pos, &r->dec_b1_unfused);
                qlr_forward_set_fused(b->f, 1);
                if (b->head_nf4 && st == QLR_OK) {
                    /* and with the lm_head in NF4 as well (every weight read per token is NF4) */
                    b->m->lm_head_nf4 = b->head_nf4;
                    st = graph_decode(b, B, D, steps, warm, tok, seq, pos, &r->dec_b1_nf4head);
                    b->m->lm_head_nf4 = NULL;
                    fprintf(stderr, "bench %s: decode batch 1 with an NF4 lm_head: %.3f ms/step "
                            "graph\n", b->name, 1e3 * r->dec_b1_nf4head);
                }
                fprintf(stderr, "bench %s: decode batch 1 without fused ops: %.3f ms/step graph\n",
                        b->name, 1e3 * r->dec_b1_unfused);
                /* the ablation */
                double sec[N_ABL];
                for (int i = 0; i < N_ABL && st == QLR_OK; i++) {
                    qlr_forward_set_skip(b->f, k_abl_mask[i]);
                    st = graph_decode(b, 1, D, 20, 3, tok, seq, pos, &sec[i]);
                }
                qlr_forward_set_skip(b->f, 0);
                for (int i = 0; i < N_ABL && st == QLR_OK; i++) {
                    r->abl_ms[i] = 1e3 * (i == 0 ? sec[0] : sec[0] - sec[i]);
                    fprintf(stderr, "bench %s: decode batch 1, %s%s: %.3f ms\n", b->name,
                            i == 0 ? "" : "in place, ", k_abl_name[i], r->abl_ms[i]);
                }
            }
        }
#endif
        fprintf(stderr, "bench %s: decode batch %d: %.3f ms/step eager, %.3f ms/step graph, "
                "%.1f tokens/s\n", b->name, B, 1e3 * r->dec_s[bi], 1e3 * r->dec_graph_s[bi],
                B / r->dec_graph_s[bi]);
    }
    return st;
}

static void write_json(const bctx *b, const qlr_bench_decode_opts *o, const bres *r,
                       double bw_gbps, double gemm_tflops, size_t peak_used, FILE *js) {
    const qlr_model_config *c = &b->m->cfg;
    int64_t P = o->prefill_tokens, D = o->decode_ctx;
    double bound = b->nf4_bytes / (bw_gbps * 1e9);
    double head_bytes = (double)c->n_vocab * c->d_model * 2;
    double pf_flops = 2.0 * (double)P * b->nf4_params;
    /* causal: half of the 4·P²·hd·heads multiply-adds of full attention */
    double att_flops = 2.0 * (double)P * (double)P * (double)c->head_dim * c->n_heads * c->n_layers;
    double lin_b1 = r->best[0] == 1 ? r->fz[0] : r->best[0] == 3 ? r->mm[0] : r->dg[0];
    fprintf(js, "    {\"model\": \"%s\", \"hidden\": %d, \"layers\": %d, \"heads\": %d, "
            "\"kv_heads\": %d, \"head_dim\": %d, \"ff\": %d, \"vocab\": %d,\n",
            b->name, c->d_model, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim, c->d_ff,
            c->n_vocab);
    fprintf(js, "     \"nf4_weight_bytes\": %.0f, \"nf4_params\": %.0f, \"lm_head_bytes\": %.0f,\n",
            b->nf4_bytes, b->nf4_params, head_bytes);
    fprintf(js, "     \"prefill\": {\"tokens\": %lld, \"seconds\": %.6f, \"tokens_per_s\": %.1f, "
            "\"attention_path\": \"%s\", \"attention_op_seconds\": %.6f, "
            "\"attention_op_tokens_per_s\": %.1f, \"linear_seconds\": %.6f, "
            "\"linear_tflops\": %.1f, \"linear_fraction_of_gemm_rate\": %.3f, "
            "\"attention_seconds\": %.6f, \"attention_tflops\": %.1f, \"dequant_seconds\": %.6f, "
            "\"dequant_GBps\": %.0f, \"attention_sdpa\": %s},\n",
            (long long)P, r->best_pf, P / r->best_pf, r->pf_att, r->ours_pf, P / r->ours_pf,
            r->lin_pf, pf_flops / r->lin_pf / 1e12,
            gemm_tflops > 0 ? pf_flops / r->lin_pf / 1e12 / gemm_tflops : 0.0, r->att_pf,
            att_flops / r->att_pf / 1e12, r->dq_s,
            r->dq_s > 0 ? (b->nf4_bytes + 2.0 * b->nf4_params) / r->dq_s / 1e9 : 0.0, r->sdpa_js);
    fprintf(js, "     \"decode_context\": %lld, \"decode\": [", (long long)D);
    for (int bi = 0; bi < 4; bi++)
        fprintf(js, "%s{\"batch\": %d, \"step_ms\": %.4f, \"tokens_per_s\": %.1f, "
                "\"eager_step_ms\": %.4f, \"eager_tokens_per_s\": %.1f}", bi ? ", " : "",
                k_batches[bi], 1e3 * r->dec_graph_s[bi], k_batches[bi] / r->dec_graph_s[bi],
                1e3 * r->dec_s[bi], k_batches[bi] / r->dec_s[bi]);
    fprintf(js, "],\n");
    fprintf(js, "     \"decode_b1_nf4_bound_ms\": %.4f, \"decode_b1_fraction_of_bandwidth_bound\": %.3f, "
            "\"decode_b1_linears_ms\": %.4f, \"decode_b1_linears_fraction_of_bandwidth_bound\": %.3f, "
            "\"decode_b1_fraction_all_weights_bound\": %.3f,\n",
            1e3 * bound, bound / r->dec_graph_s[0], 1e3 * lin_b1, bound / lin_b1,
            (b->nf4_bytes + head_bytes) / (bw_gbps * 1e9) / r->dec_graph_s[0]);
    if (b->cuda) {
        fprintf(js, "     \"gemv1_variant_linears_ms\": {\"registers_2_blocks_per_sm\": %.4f, "
                "\"registers_3_blocks_per_sm\": %.4f, \"streaming\": %.4f},\n",
                1e3 * r->var_s[0], 1e3 * r->var_s[1], 1e3 * r->var_s[2]);
        fprintf(js, "     \"nf4_gemv_n1_graph_GBps\": {");
        for (int si = 0; si < 7; si++)
            fprintf(js, "%s\"%s\": %.0f", si ? ", " : "", k_gnames[si], r->gshp[si]);
        fprintf(js, "},\n");
        fprintf(js, "     \"decode_b1_unfused_graph_step_ms\": %.4f,\n", 1e3 * r->dec_b1_unfused);
        /* in place: "step" is the whole step; every other entry is what leaving that out saves */
        fprintf(js, "     \"decode_b1_in_place_ms\": {");
        for (int i = 0; i < N_ABL; i++)
            fprintf(js, "%s\"%s\": %.4f", i ? ", " : "", k_abl_name[i], r->abl_ms[i]);
        fprintf(js, "},\n");
        if (r->dec_b1_nf4head > 0) {
            double nb = b->nf4_bytes + b->head_nf4_bytes;
            fprintf(js, "     \"decode_b1_nf4_lm_head\": {\"step_ms\": %.4f, \"tokens_per_s\": %.1f, "
                    "\"nf4_weight_bytes\": %.0f, \"nf4_bound_ms\": %.4f, "
                    "\"fraction_of_bandwidth_bound\": %.3f},\n",
                    1e3 * r->dec_b1_nf4head, 1.0 / r->dec_b1_nf4head, nb,
                    1e3 * nb / (bw_gbps * 1e9), nb / (bw_gbps * 1e9) / r->dec_b1_nf4head);
        }
    }
    fprintf(js, "     \"nf4_gemv_n1_GBps\": [");
    for (int si = 0; si < 4; si++)
        fprintf(js, "%s{\"shape\": \"%s\", \"fused\": %.0f, \"fused_mma\": %.0f, \"dequant_gemm\": %.0f}",
                si ? ", " : "", k_shape_names[si], r->shp[si][0], r->shp[si][1], r->shp[si][2]);
    fprintf(js, "],\n");
    fprintf(js, "     \"nf4_linear_sweep\": [");
    for (int i = 0; i < 7; i++)
        fprintf(js, "%s{\"n\": %d, \"fused_ms\": %.4f, \"fused_mma_ms\": %.4f, "
                "\"dequant_gemm_ms\": %.4f, \"chosen\": \"%s\"}", i ? ", " : "", k_sweep[i],
                1e3 * r->fz[i], 1e3 * r->mm[i], 1e3 * r->dg[i],
                r->best[i] == 1 ? "fused" : r->best[i] == 3 ? "fused_mma" : "dequant_gemm");
    fprintf(js, "],\n");
#ifdef QLR_BACKEND_CUDA
    if (b->cuda) {
        fprintf(js, "     \"peak_allocated_bytes\": %zu, \"peak_device_used_bytes\": %zu}",
                qlr_cuda_peak_bytes(b->be), peak_used);
        return;
    }
#endif
    fprintf(js, "     \"peak_device_used_bytes\": %zu}", peak_used);
}

static qlr_status run_model(qlr_backend *be, const bench_model *bm, const qlr_bench_decode_opts *o,
                            double bw_gbps, double gemm_tflops, FILE *js) {
    const qlr_model_config *c = &bm->cfg;
    int64_t max_b = 64;
    /* positions: the prefill, or the decode context plus its timed steps (at least the 23 steps
     * of the ablation) */
    int64_t steps = o->decode_steps > 20 ? o->decode_steps : 20;
    int64_t ctx = o->prefill_tokens;
    if (o->decode_ctx + steps + 8 > ctx) ctx = o->decode_ctx + steps + 8;
    /* tokens of one forward: the prefill, a decode batch, or the decode context's prefill */
    int64_t max_n = o->prefill_tokens > max_b ? o->prefill_tokens : max_b;
    if (o->decode_ctx > max_n) max_n = o->decode_ctx;
    bctx b;
    double t0 = now_s();
    fprintf(stderr, "bench %s: creating random NF4 model...\n", bm->name);
    QLR_TRY(bctx_create(be, bm, ctx, max_n, &b));
    fprintf(stderr, "bench %s: ready in %.1f s (%.2f GB of NF4 weights)\n", bm->name,
            now_s() - t0, b.nf4_bytes / 1e9);
    qlr_status st = QLR_OK;
#ifdef QLR_BACKEND_CUDA
    if (b.cuda) {
        /* the largest workspace a forward needs, allocated now rather than inside a timed step */
        size_t ws = (size_t)c->d_ff * c->d_model * 2;
        size_t att_ws = (size_t)(max_b * c->n_heads * 32 * (c->head_dim + 2)) * 4;
        size_t smp_ws = (size_t)(max_b * c->n_vocab) * 4;
        if (att_ws > ws) ws = att_ws;
        if (smp_ws > ws) ws = smp_ws;
        st = qlr_cuda_reserve(be, ws);
    }
#endif
    int reps = o->quick ? 1 : 3;
    int32_t *ids = calloc((size_t)max_n, 4), *seq = calloc((size_t)max_n, 4);
    int32_t *pos = calloc((size_t)max_n, 4);
    bres *r = calloc(1, sizeof *r);
    if (st == QLR_OK && (!ids || !seq || !pos || !r))
        st = qlr_errorf(QLR_ERR_NOMEM, "bench: host arrays");
    for (int64_t i = 0; i < max_n && ids; i++) ids[i] = (int32_t)((i * 7919) % c->n_vocab);
    int profiled = 0;
#ifdef QLR_BACKEND_CUDA
    const char *prof = getenv("QLR_BENCH_PROFILE_STEP");
    if (b.cuda && st == QLR_OK && prof && (!strcmp(prof, "1") || !strcmp(prof, "2"))) {
        profiled = 1;
        if (!strcmp(prof, "1")) {
            st = profile_step(&b, o->decode_ctx, ids, seq, pos);
        } else {
            /* a batch-1 decode step from a CUDA graph, replayed 3 times between
             * cudaProfilerStart/Stop: with QLR_BENCH_TRACE=FILE (bench/cupti_trace.c) or nsys
             * --capture-range=cudaProfilerApi --cuda-graph-trace=node, every kernel's start and
             * end inside the graph */
            int32_t tok[1] = {1}, out[1];
            for (int64_t i = 0; i < o->decode_ctx; i++) seq[i] = 0, pos[i] = (int32_t)i;
            st = forward_host(&b, o->decode_ctx, ids, seq, pos, 1, out);
            double sec = 0;
            if (st == QLR_OK) st = graph_decode(&b, 1, o->decode_ctx, 3, 2, tok, seq, pos, &sec);
            cudaProfilerStart();
            if (st == QLR_OK) st = graph_decode(&b, 1, o->decode_ctx, 3, 0, tok, seq, pos, &sec);
            cudaProfilerStop();
            fprintf(stderr, "bench %s: profiled graph step %.3f ms\n", bm->name, 1e3 * sec);
        }
    }
#endif
    if (!profiled) {
        if (st == QLR_OK) st = bench_prefill(&b, o->prefill_tokens, reps, ids, seq, pos, r);
        size_t peak = device_used(&b);
        if (st == QLR_OK) st = bench_linears(&b, reps, r);
        if (st == QLR_OK) st = bench_decode_steps(&b, o, ids, seq, pos, r);
        size_t used = device_used(&b);
        if (used > peak) peak = used;
        if (st == QLR_OK) write_json(&b, o, r, bw_gbps, gemm_tflops, peak, js);
    }
    free(ids);
    free(seq);
    free(pos);
    free(r);
    bctx_free(&b);
    return st;
}

qlr_bench_decode_opts qlr_bench_decode_default_opts(void) {
    qlr_bench_decode_opts o = {"all", 2048, 512, 20, 0, "cuda"};
    return o;
}

qlr_status qlr_bench_decode(const qlr_bench_decode_opts *o, FILE *js) {
    bench_model models[2];
    int n_models = bench_models(models), known = !strcmp(o->models, "all");
    for (int i = 0; i < n_models; i++) known |= !strcmp(o->models, models[i].name);
    if (!known)
        return qlr_errorf(QLR_ERR_INVALID, "bench: unknown model '%s' (known: all, llama3-8b, "
                          "smollm2-135m)", o->models);
    const char *device = o->device ? o->device : "cuda";
    qlr_backend *be;
    QLR_TRY(qlr_backend_create(device, 0, &be));
    if (be->kind != QLR_DEVICE_CUDA)
        QLR_LOGW("bench: the %s backend runs only the backend-generic parts (no CUDA graphs, "
                 "GEMM rate, kernel paths or ablation): a smoke run, not a measurement", be->name);
    double bw = 0, gemm = 0;
    qlr_status st = measure_copy_bw(be, &bw);
    if (st == QLR_OK) st = qlr_bench_gemm_bf16_tflops(be, &gemm);
    char dev[256];
    snprintf(dev, sizeof dev, "%s", be->name);
#ifdef QLR_BACKEND_CUDA
    if (be->kind == QLR_DEVICE_CUDA) snprintf(dev, sizeof dev, "%s", qlr_cuda_device_name(be));
#endif
    qlr_backend_free(be);
    QLR_TRY(st);
    fprintf(stderr, "bench: copy bandwidth %.0f GB/s, bf16 GEMM %.0f TFLOP/s\n", bw, gemm);
    fprintf(js, "{\"bench\": \"decode\", \"device\": \"%s\", \"copy_bandwidth_GBps\": %.1f, "
            "\"gemm_bf16_tflops\": %.1f, \"models\": [\n", dev, bw, gemm);
    int first = 1;
    for (int i = 0; i < n_models && st == QLR_OK; i++) {
        if (strcmp(o->models, "all") && strcmp(o->models, models[i].name)) continue;
        if (!first) fprintf(js, ",\n");
        first = 0;
        /* a fresh backend per model, so that its peak-memory figure is its own */
        st = qlr_backend_create(device, 0, &be);
        if (st == QLR_OK) {
            st = run_model(be, &models[i], o, bw, gemm, js);
            qlr_backend_free(be);
        }
    }
    fprintf(js, "\n]}\n");
    fflush(js);
    return st;
}
