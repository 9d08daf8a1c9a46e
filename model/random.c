/* model/random.c: qlr_model_create_random, a model of a config's real dimensions with random
 * weights and no file (the decode benchmark's Llama-3.1-8B and SmolLM2 shapes, tests). NF4
 * stores are written as random packed bytes, never quantized from floats, so an 8B model is
 * ready in seconds. Every tensor draws from its own counter-based stream (the seed, the tensor's
 * number, the element's index), so the bytes depend on neither the thread count nor the
 * backend. It owns no forward and no loader: the model it makes is freed by qlr_model_free. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "model/model_internal.h"

qlr_model_random_params qlr_model_random_params_default(void) {
    qlr_model_random_params p = {1, 0, 0.034f};
    return p;
}

/* ---- streams ---- */

/* splitmix64's output function: a bijection of 64-bit words with full avalanche. */
static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Tensor numbers of the stream keys: layer l's tensors are l * 16 + one of these; the
 * model-wide ones are above every layer's. */
enum { T_ATTN_NORM = QLR_LIN_COUNT, T_FFN_NORM, T_BIAS /* + linear id */ = 10 };
#define T_GLOBAL ((int64_t)1 << 40)
enum { T_EMBD = 0, T_LM_HEAD, T_OUT_NORM, T_LM_HEAD_NF4 };

/* The key of part `part` (0 codes, 1 absmax, 2 second-level absmax, 3 values) of `tensor`. */
static uint64_t stream_key(uint64_t seed, int64_t tensor, int part) {
    return mix64(seed ^ mix64(((uint64_t)tensor << 2 | (uint64_t)part) + 1));
}

/* Word i of a stream. */
static inline uint64_t stream_word(uint64_t key, uint64_t i) {
    return mix64(key + i * 0x9E3779B97F4A7C15ull);
}

/* Uniform in [lo, hi) from the top 24 bits of a word. */
static inline float word_uniform(uint64_t r, float lo, float hi) {
    return lo + (hi - lo) * ((float)(r >> 40) * (1.0f / 16777216.0f));
}

typedef struct fill_ctx {
    uint64_t key;
    void *dst;
    size_t n;       /* bytes (fill_bytes) or values */
    float lo, hi;
} fill_ctx;

static void bytes_run(void *p, int64_t b, int64_t e, int tid) {
    fill_ctx *c = p;
    uint8_t *dst = c->dst;
    for (int64_t i = b; i < e; i++) {
        uint64_t r = stream_word(c->key, (uint64_t)i);
        size_t off = (size_t)i * 8, k = c->n - off < 8 ? c->n - off : 8;
        memcpy(dst + off, &r, k);
    }
}

/* Two values per stream word (its top and its low 24 bits): value i uses word i / 2. */
static void bf16_run(void *p, int64_t b, int64_t e, int tid) {
    fill_ctx *c = p;
    uint16_t *dst = c->dst;
    for (int64_t i = b; i < e;) {
        uint64_t r = stream_word(c->key, (uint64_t)i >> 1);
        if (!(i & 1)) dst[i++] = qlr_f32_to_bf16(word_uniform(r, c->lo, c->hi));
        if (i < e) dst[i++] = qlr_f32_to_bf16(word_uniform(r << 40, c->lo, c->hi));
    }
}

static void f32_run(void *p, int64_t b, int64_t e, int tid) {
    fill_ctx *c = p;
    float *dst = c->dst;
    for (int64_t i = b; i < e; i++) dst[i] = word_uniform(stream_word(c->key, (uint64_t)i), c->lo, c->hi);
}

/* n random bytes (8 per stream word, little-endian). */
static void fill_bytes(uint64_t key, uint8_t *dst, size_t n) {
    fill_ctx c = {key, dst, n, 0, 0};
    qlr_parallel_for((int64_t)((n + 7) / 8), 1 << 14, bytes_run, &c);
}

static void fill_bf16(uint64_t key, uint16_t *dst, size_t n, float lo, float hi) {
    fill_ctx c = {key, dst, n, lo, hi};
    qlr_parallel_for((int64_t)n, 1 << 14, bf16_run, &c);
}

static void fill_f32(uint64_t key, float *dst, size_t n, float lo, float hi) {
    fill_ctx c = {key, dst, n, lo, hi};
    qlr_parallel_for((int64_t)n, 1 << 14, f32_run, &c);
}

/* ---- tensors ---- */

/* A random NF4 store [rows, cols] uploaded into *out: random codes; with dq random absmax codes
 * over the signed dynamic map, second-level absmax in [0.010, 0.017) and offset 0.03 (block
 * absmax 0.013..0.047, mostly 0.02..0.04); without, absmax in [0.02, 0.04). */
static qlr_status random_nf4(qlr_model *m, uint64_t seed, int64_t tensor, int64_t rows,
                             int64_t cols, int dq, qlr_nf4 *out) {
    qlr_nf4 h;
    memset(&h, 0, sizeof h);
    h.rows = rows;
    h.cols = cols;
    h.n = rows * cols;
    h.n_blocks = (h.n + QLR_NF4_BLOCK - 1) / QLR_NF4_BLOCK;
    h.n_dq_blocks = dq ? (h.n_blocks + QLR_NF4_DQ_BLOCK - 1) / QLR_NF4_DQ_BLOCK : 0;
    h.dq = dq;
    h.owned = 1;
    h.codes = malloc((size_t)((h.n + 1) / 2));
    if (dq) {
        h.absmax_q = malloc((size_t)h.n_blocks);
        h.dq_absmax = malloc((size_t)h.n_dq_blocks * 4);
    } else {
        h.absmax = malloc((size_t)h.n_blocks * 4);
    }
    if (!h.codes || (dq ? !h.absmax_q || !h.dq_absmax : !h.absmax)) {
        qlr_nf4_free(&h);
        return qlr_errorf(QLR_ERR_NOMEM, "random NF4 store [%lld, %lld]", (long long)rows,
                          (long long)cols);
    }
    fill_bytes(stream_key(seed, tensor, 0), h.codes, (size_t)((h.n + 1) / 2));
    if (dq) {
        fill_bytes(stream_key(seed, tensor, 1), h.absmax_q, (size_t)h.n_blocks);
        fill_f32(stream_key(seed, tensor, 2), h.dq_absmax, (size_t)h.n_dq_blocks, 0.010f, 0.017f);
        h.dq_offset = 0.03f;
    } else {
        fill_f32(stream_key(seed, tensor, 1), h.absmax, (size_t)h.n_blocks, 0.02f, 0.04f);
    }
    m->nf4_bytes += qlr_nf4_bytes(rows, cols, dq);
    qlr_status st = qlr_backend_nf4_upload(m->be, &h, out, 1);
    if (st == QLR_OK && !m->be->host_visible) st = m->be->mem.sync(m->be); /* h is freed next */
    qlr_nf4_free(&h);
    return st;
}

/* n f32 values uniform in [lo, hi) uploaded into *out (buf: scratch of n floats). */
static qlr_status random_f32(qlr_model *m, uint64_t seed, int64_t tensor, int64_t n, float lo,
                             float hi, float *buf, float **out) {
    fill_f32(stream_key(seed, tensor, 3), buf, (size_t)n, lo, hi);
    QLR_TRY(qlr_model_upload_f32(m, buf, n, out));
    return m->be->mem.sync(m->be); /* buf is reused next */
}

/* A [n_vocab, d_model] bf16 table uniform in [-r, r) uploaded into *out (buf: n values). */
static qlr_status random_table(qlr_model *m, uint64_t seed, int64_t tensor, int64_t n, float r,
                               uint16_t *buf, uint16_t **out) {
    fill_bf16(stream_key(seed, tensor, 3), buf, (size_t)n, -r, r);
    *out = m->be->mem.alloc(m->be, (size_t)n * 2);
    if (!*out) return qlr_error_status();
    m->other_bytes += (uint64_t)n * 2;
    QLR_TRY(m->be->mem.h2d(m->be, *out, buf, (size_t)n * 2));
    return m->be->mem.sync(m->be);
}

static qlr_status create(qlr_model *m, uint64_t seed, const qlr_model_random_params *p) {
    const qlr_model_config *c = &m->cfg;
    int64_t d = c->d_model, V = c->n_vocab, hd2 = c->head_dim / 2;
    int64_t small = d > c->d_ff ? d : c->d_ff;
    if ((int64_t)c->n_heads * c->head_dim > small) small = (int64_t)c->n_heads * c->head_dim;
    if (hd2 > small) small = hd2;
    float *buf = malloc((size_t)small * 4);
    uint16_t *table = malloc((size_t)(V * d) * 2);
    m->layers = calloc((size_t)c->n_layers, sizeof(qlr_layer));
    qlr_status st = QLR_OK;
    if (!buf || !table || !m->layers) {
        st = qlr_errorf(QLR_ERR_NOMEM, "random model: %.1f MiB of host buffers",
                        (double)(V * d * 2 + small * 4) / (1 << 20));
        goto done;
    }
    qlr_model_rope_inv_freq(c, NULL, buf);
    if ((st = qlr_model_upload_f32(m, buf, hd2, &m->inv_freq)) != QLR_OK) goto done;
    if ((st = m->be->mem.sync(m->be)) != QLR_OK) goto done;
    st = random_table(m, seed, T_GLOBAL + T_EMBD, V * d, p->embd_range, table, &m->tok_embd);
    if (st == QLR_OK && c->tied_embeddings) m->lm_head = m->tok_embd;
    else if (st == QLR_OK)
        st = random_table(m, seed, T_GLOBAL + T_LM_HEAD, V * d, p->embd_range, table, &m->lm_head);
    if (st == QLR_OK)
        st = random_f32(m, seed, T_GLOBAL + T_OUT_NORM, d, 0.99f, 1.01f, buf, &m->out_norm);
    for (int32_t l = 0; l < c->n_layers && st == QLR_OK; l++) {
        qlr_layer *L = &m->layers[l];
        int64_t t = (int64_t)l * 16;
        st = random_f32(m, seed, t + T_ATTN_NORM, d, 0.99f, 1.01f, buf, &L->attn_norm);
        if (st == QLR_OK)
            st = random_f32(m, seed, t + T_FFN_NORM, d, 0.99f, 1.01f, buf, &L->ffn_norm);
        for (int i = 0; i < QLR_LIN_COUNT && st == QLR_OK; i++) {
            int64_t out, in;
            qlr_model_linear_shape(c, (qlr_linear_id)i, &out, &in);
            st = random_nf4(m, seed, t + i, out, in, p->double_quant, &L->w[i]);
            if (st == QLR_OK && c->qkv_bias && i <= QLR_LIN_V)
                st = random_f32(m, seed, t + T_BIAS + i, out, -0.01f, 0.01f, buf, &L->bias[i]);
        }
    }
    if (st == QLR_OK && p->lm_head_nf4) {
        m->lm_head_nf4 = calloc(1, sizeof *m->lm_head_nf4);
        if (!m->lm_head_nf4) st = qlr_errorf(QLR_ERR_NOMEM, "random model");
        else st = random_nf4(m, seed, T_GLOBAL + T_LM_HEAD_NF4, V, d, p->double_quant, m->lm_head_nf4);
    }
done:
    free(buf);
    free(table);
    return st;
}

qlr_status qlr_model_create_random(const qlr_model_config *cfg, qlr_backend *be, uint64_t seed,
                                   const qlr_model_random_params *p, qlr_model **out) {
    *out = NULL;
    qlr_model_random_params def = qlr_model_random_params_default();
    if (!p) p = &def;
    QLR_TRY(qlr_model_config_validate(cfg, "random model"));
    if (cfg->rope_scaling == QLR_ROPE_SCALING_FREQS)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "random model: rope_freqs scaling needs the "
                          "GGUF's rope_freqs table (use llama3 scaling parameters instead)");
    qlr_model *m = calloc(1, sizeof *m);
    char name[64];
    snprintf(name, sizeof name, "random:%llu", (unsigned long long)seed);
    if (!m || !(m->source = strdup(name))) {
        free(m);
        return qlr_errorf(QLR_ERR_NOMEM, "random model");
    }
    m->cfg = *cfg;
    m->be = be;
    qlr_status st = create(m, seed, p);
    if (st != QLR_OK) {
        qlr_error_prefix("random model (%s)", cfg->arch);
        qlr_model_free(m);
        return st;
    }
    *out = m;
    return QLR_OK;
}
