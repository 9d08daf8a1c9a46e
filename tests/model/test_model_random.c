/* tests/model/test_model_random.c: the random model (qlr_model_create_random) and the device
 * forward entry (qlr_model_forward_dev) with its debug hooks, on the CPU backend:
 *  - the random model has the config's shapes, is the same bytes for the same seed (other bytes
 *    for another seed), its NF4 bytes are never all zero, its RoPE table is the config's;
 *  - qlr_model_forward and qlr_model_forward_dev give bitwise-equal logits (mixed sequences,
 *    gathered and leading logits rows, with and without an adapter set);
 *  - the skip hook: 0 restores the full forward bitwise, a skipped kind changes the result, a
 *    skipped lm_head leaves the logits buffer as it was; the unfused hook drops fused entries;
 *  - the NF4 lm_head against a float64 product of its dequantized rows. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "model/model.h"
#include "tests/test_util.h"

static qlr_backend *be;

/* A small Llama 3-like config: GQA, llama3 RoPE scaling, untied. */
static qlr_model_config small_cfg(int tied, int bias) {
    qlr_model_config c;
    memset(&c, 0, sizeof c);
    strcpy(c.arch, bias ? "qwen2" : "llama");
    c.n_vocab = 300;
    c.d_model = 128;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 32;
    c.d_ff = 192;
    c.ctx_train = 256;
    c.rms_eps = 1e-5f;
    c.rope_theta = 500000.0f;
    c.rope_scaling = QLR_ROPE_SCALING_LLAMA3;
    c.rope_factor = 8;
    c.rope_low_freq_factor = 1;
    c.rope_high_freq_factor = 4;
    c.rope_orig_ctx = 64;
    c.tied_embeddings = tied;
    c.qkv_bias = bias;
    return c;
}

static qlr_model *make(const qlr_model_config *c, uint64_t seed, int nf4_head) {
    qlr_model_random_params p = qlr_model_random_params_default();
    p.lm_head_nf4 = nf4_head;
    qlr_model *m = NULL;
    CHECK_OK(qlr_model_create_random(c, be, seed, &p, &m));
    return m;
}

static int nf4_same(const qlr_nf4 *a, const qlr_nf4 *b) {
    return a->rows == b->rows && a->cols == b->cols && a->dq == b->dq &&
           a->dq_offset == b->dq_offset && !memcmp(a->codes, b->codes, (size_t)(a->n + 1) / 2) &&
           !memcmp(a->absmax_q, b->absmax_q, (size_t)a->n_blocks) &&
           !memcmp(a->dq_absmax, b->dq_absmax, (size_t)a->n_dq_blocks * 4);
}

/* Fraction of zero bytes in p[n]. */
static double zero_fraction(const uint8_t *p, size_t n) {
    size_t z = 0;
    for (size_t i = 0; i < n; i++) z += p[i] == 0;
    return (double)z / (double)n;
}

static void test_create(void) {
    qlr_model_config c = small_cfg(0, 1);
    qlr_model *a = make(&c, 7, 1), *b = make(&c, 7, 1), *o = make(&c, 8, 0);
    if (!a || !b || !o) goto done;
    int same = 1, other = 0, shapes = 1, nonzero = 1;
    for (int l = 0; l < c.n_layers; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            const qlr_nf4 *w = &a->layers[l].w[i];
            int64_t out, in;
            switch (i) {
            case QLR_LIN_Q: out = 128, in = 128; break;
            case QLR_LIN_K:
            case QLR_LIN_V: out = 64, in = 128; break;
            case QLR_LIN_O: out = 128, in = 128; break;
            case QLR_LIN_DOWN: out = 128, in = 192; break;
            default: out = 192, in = 128; break;
            }
            shapes &= w->rows == out && w->cols == in && w->dq == 1;
            same &= nf4_same(w, &b->layers[l].w[i]);
            other |= memcmp(w->codes, o->layers[l].w[i].codes, (size_t)w->n / 2) != 0;
            /* random bytes: about 1/256 of them zero, never all */
            double zc = zero_fraction(w->codes, (size_t)w->n / 2);
            double za = zero_fraction(w->absmax_q, (size_t)w->n_blocks);
            nonzero &= zc < 0.02 && za < 0.1;
            /* block absmax in the documented range */
            for (int64_t k = 0; k < w->n_blocks; k++) {
                float am = qlr_nf4_block_absmax(w, k);
                nonzero &= am > 0.012f && am < 0.048f;
            }
            if (i <= QLR_LIN_V) {
                same &= !memcmp(a->layers[l].bias[i], b->layers[l].bias[i], (size_t)out * 4);
                shapes &= fabsf(a->layers[l].bias[i][0]) <= 0.01f;
            } else {
                shapes &= a->layers[l].bias[i] == NULL;
            }
            same &= !memcmp(a->layers[l].attn_norm, b->layers[l].attn_norm, 128 * 4);
            shapes &= fabsf(a->layers[l].ffn_norm[5] - 1.0f) <= 0.01f;
        }
    CHECK_MSG(shapes, "random model: shapes, biases or norms not as configured");
    CHECK_MSG(same, "random model: two models of one seed differ");
    CHECK_MSG(other, "random model: two seeds give the same codes");
    CHECK_MSG(nonzero, "random model: NF4 bytes not random (zero bytes or absmax out of range)");
    size_t tab = (size_t)c.n_vocab * c.d_model * 2;
    CHECK(!memcmp(a->tok_embd, b->tok_embd, tab));
    CHECK(a->lm_head != a->tok_embd && memcmp(a->lm_head, a->tok_embd, tab) != 0);
    CHECK(a->lm_head_nf4 && a->lm_head_nf4->rows == c.n_vocab && a->lm_head_nf4->cols == c.d_model);
    CHECK(a->lm_head_nf4 && nf4_same(a->lm_head_nf4, b->lm_head_nf4));
    CHECK(o->lm_head_nf4 == NULL);
    float inv[16];
    qlr_model_rope_inv_freq(&c, NULL, inv);
    CHECK(!memcmp(inv, a->inv_freq, sizeof inv));
    /* tied: one table */
    qlr_model_config t = small_cfg(1, 0);
    qlr_model *tm = make(&t, 7, 0);
    if (tm) CHECK(tm->lm_head == tm->tok_embd && tm->layers[0].bias[0] == NULL);
    qlr_model_free(tm);
    /* refusals */
    qlr_model *bad = NULL;
    qlr_model_config f = small_cfg(0, 0);
    f.rope_scaling = QLR_ROPE_SCALING_FREQS;
    CHECK(qlr_model_create_random(&f, be, 1, NULL, &bad) == QLR_ERR_UNSUPPORTED && !bad);
    f = small_cfg(0, 0);
    f.n_kv_heads = 3;
    CHECK(qlr_model_create_random(&f, be, 1, NULL, &bad) == QLR_ERR_FORMAT && !bad);
done:
    qlr_model_free(a);
    qlr_model_free(b);
    qlr_model_free(o);
}

/* ---- host forward vs device forward ---- */

/* Device copy of n int32 values (the CPU backend's memory; freed by the caller). */
static int32_t *dev_i32(const int32_t *h, int32_t n) {
    int32_t *d = be->mem.alloc(be, (size_t)n * 4);
    if (d) CHECK_OK(be->mem.h2d(be, d, h, (size_t)n * 4));
    return d;
}

enum { N = 9, NL = 4 };
/* Two sequences' prefill interleaved (seq 0: 5 tokens, seq 1: 4 tokens). */
static const int32_t k_tok[N] = {11, 250, 3, 17, 99, 42, 5, 280, 7};
static const int32_t k_pos[N] = {0, 0, 1, 1, 2, 2, 3, 3, 4};
static const int32_t k_seq[N] = {0, 1, 0, 1, 0, 1, 0, 1, 0};
static const int32_t k_rows[NL] = {8, 1, 4, 7};
static const int32_t k_slot[N] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
static const int32_t k_mixed[N] = {0, -1, 1, 0, -1, 1, 1, 0, -1};

/* Logits of qlr_model_forward (host == 1) or qlr_model_forward_dev on the same batch through a
 * fresh cache and workspace, into out [nl, vocab]: the prefill above, then one decode token per
 * sequence (whose logits are the ones returned). rows NULL: the first nl rows. */
static void run(qlr_model *m, int host, const int32_t *rows, int32_t nl,
                const qlr_adapter_set *set, const int32_t *slot, float *out) {
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_cache_create(m, 2, 16, &kv));
    CHECK_OK(qlr_forward_create(m, N, N, &f));
    if (!kv || !f) goto done;
    int32_t dtok[2] = {21, 22}, dpos[2] = {5, 4}, dseq[2] = {0, 1};
    int32_t dslot[2] = {slot ? slot[0] : 0, slot ? slot[1] : 0};
    for (int step = 0; step < 2; step++) {
        int32_t n = step ? 2 : N;
        const int32_t *tok = step ? dtok : k_tok, *pos = step ? dpos : k_pos,
                      *seq = step ? dseq : k_seq, *sl = step ? dslot : slot;
        const int32_t *rw = step ? NULL : rows;
        int32_t nr = step ? 2 : nl;
        float *lg = NULL;
        if (host) {
            qlr_batch b = {n, tok, pos, seq, nr, rw, set, sl};
            CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
        } else {
            int32_t *dt = dev_i32(tok, n), *dp = dev_i32(pos, n), *ds = dev_i32(seq, n);
            int32_t *dr = rw ? dev_i32(rw, nr) : NULL, *dsl = NULL;
            int32_t uniform = -1;
            if (set) {
                int32_t ones[N];
                for (int i = 0; i < n; i++) ones[i] = sl ? sl[i] : 0;
                dsl = dev_i32(ones, n);
                uniform = ones[0];
                for (int i = 0; i < n; i++)
                    if (ones[i] != uniform) uniform = -1;
            }
            qlr_batch_dev b = {n, dt, dp, ds, nr, dr, set, dsl, uniform, 0, NULL};
            CHECK_OK(qlr_model_forward_dev(f, kv, &b, &lg));
            be->mem.free(be, dt), be->mem.free(be, dp), be->mem.free(be, ds);
            if (dr) be->mem.free(be, dr);
            if (dsl) be->mem.free(be, dsl);
        }
        if (lg) memcpy(out + (step ? (size_t)nl * m->cfg.n_vocab : 0), lg,
                       (size_t)nr * m->cfg.n_vocab * 4);
    }
done:
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);
}

/* A set of n_slots random adapters of rank r + slot (ranks differ) on every linear. */
typedef struct tset {
    qlr_adapter_set set;
    qlr_lora_ref *refs;
    float *mem;
} tset;

static void tset_make(tset *t, const qlr_model *m, int32_t n_slots) {
    int32_t rows = m->cfg.n_layers * QLR_LIN_COUNT;
    t->refs = calloc((size_t)rows * n_slots, sizeof *t->refs);
    t->mem = malloc((size_t)rows * n_slots * 2 * 4 * 192 * 4);
    uint64_t rng = 5;
    float *p = t->mem;
    for (int32_t l = 0; l < m->cfg.n_layers; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++)
            for (int32_t s = 0; s < n_slots; s++) {
                const qlr_nf4 *w = &m->layers[l].w[i];
                int32_t r = 2 + s;
                float *a = p, *b = p + r * w->cols;
                for (int64_t k = 0; k < r * w->cols; k++) a[k] = 0.1f * test_rng_normal(&rng);
                for (int64_t k = 0; k < w->rows * r; k++) b[k] = 0.1f * test_rng_normal(&rng);
                p += 4 * 192 * 2;
                t->refs[((int64_t)l * QLR_LIN_COUNT + i) * n_slots + s] =
                    (qlr_lora_ref){a, b, r, 2.0f / (float)r};
            }
    t->set = (qlr_adapter_set){m->cfg.n_layers, n_slots, 1 + n_slots, t->refs, t->refs};
}

static void tset_free(tset *t) {
    free(t->refs);
    free(t->mem);
}

static void test_forward_dev(int tied, int bias) {
    qlr_model_config c = small_cfg(tied, bias);
    qlr_model *m = make(&c, 3, 0);
    if (!m) return;
    size_t per = (size_t)(NL + 2) * c.n_vocab;
    float *h = malloc(per * 4), *d = malloc(per * 4), *base = malloc(per * 4);
    /* gathered rows, then the leading rows (rows NULL) */
    run(m, 1, k_rows, NL, NULL, NULL, h);
    run(m, 0, k_rows, NL, NULL, NULL, d);
    CHECK_MSG(!memcmp(h, d, per * 4), "forward vs forward_dev: logits differ (gathered rows)");
    memcpy(base, h, per * 4);
    run(m, 1, NULL, NL, NULL, NULL, h);
    run(m, 0, NULL, NL, NULL, NULL, d);
    CHECK_MSG(!memcmp(h, d, per * 4), "forward vs forward_dev: logits differ (leading rows)");
    /* batch row 1 is logits row 1 of both runs, and the decode steps after them are equal:
     * the gather and the in-place normalisation of the leading rows agree */
    CHECK(!memcmp(h + c.n_vocab, base + c.n_vocab, (size_t)c.n_vocab * 4));
    CHECK(!memcmp(h + (size_t)NL * c.n_vocab, base + (size_t)NL * c.n_vocab,
                  (size_t)2 * c.n_vocab * 4));
    CHECK(memcmp(h, base, (size_t)c.n_vocab * 4) != 0); /* batch rows 0 and 8 differ */
    /* one adapter slot for every token: the adapter changes the logits, both paths agree */
    tset t;
    tset_make(&t, m, 2);
    run(m, 1, k_rows, NL, &t.set, k_slot, h);
    run(m, 0, k_rows, NL, &t.set, k_slot, d);
    CHECK_MSG(!memcmp(h, d, per * 4), "forward vs forward_dev with an adapter: logits differ");
    double md = 0;
    for (size_t i = 0; i < per; i++) md = fmax(md, fabs((double)h[i] - base[i]));
    CHECK_MSG(md > 1e-3, "the adapter set does not change the logits (%g)", md);
    /* mixed slots (-1, 0, 1) need the batched op */
    if (be->ops.lora_batched) {
        run(m, 1, k_rows, NL, &t.set, k_mixed, h);
        run(m, 0, k_rows, NL, &t.set, k_mixed, d);
        CHECK_MSG(!memcmp(h, d, per * 4), "forward vs forward_dev, mixed adapters: logits differ");
    } else {
        printf("  (cpu has no lora_batched op yet: mixed adapter slots not compared)\n");
    }
    tset_free(&t);
    /* host-known checks of the device entry */
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_cache_create(m, 2, 16, &kv));
    CHECK_OK(qlr_forward_create(m, 4, 2, &f));
    if (kv && f) {
        int32_t *z = dev_i32(k_slot, N);
        float *lg;
        qlr_batch_dev big = {5, z, z, z, 1, NULL, NULL, NULL, -1, 0, NULL};
        CHECK(qlr_model_forward_dev(f, kv, &big, &lg) == QLR_ERR_RANGE);
        qlr_batch_dev rows = {2, z, z, z, 3, NULL, NULL, NULL, -1, 0, NULL};
        CHECK(qlr_model_forward_dev(f, kv, &rows, &lg) == QLR_ERR_RANGE);
        tset_make(&t, m, 1);
        qlr_batch_dev noslot = {2, z, z, z, 1, NULL, &t.set, NULL, 0, 0, NULL};
        CHECK(qlr_model_forward_dev(f, kv, &noslot, &lg) == QLR_ERR_INVALID);
        qlr_batch_dev badu = {2, z, z, z, 1, NULL, &t.set, z, 1, 0, NULL};
        CHECK(qlr_model_forward_dev(f, kv, &badu, &lg) == QLR_ERR_RANGE);
        tset_free(&t);
        be->mem.free(be, z);
    }
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);
    free(h), free(d), free(base);
    qlr_model_free(m);
}

/* ---- debug hooks ---- */

static int g_fused_calls;
static qlr_status fake_add_rmsnorm(qlr_backend *b, void *x, void *y, const void *dx,
                                   const float *w, int64_t n, int64_t d, float eps) {
    g_fused_calls++;
    QLR_TRY(b->ops.add(b, x, dx, n * d));
    return b->ops.rmsnorm(b, y, x, w, n, d, eps);
}

/* One forward of the 9-token batch through f (fresh cache), logits of rows 0..3 into out. */
static void fwd(qlr_forward *f, qlr_model *m, const int32_t *tok, float *out) {
    qlr_kv_cache *kv = NULL;
    CHECK_OK(qlr_kv_cache_create(m, 2, 16, &kv));
    float *lg = NULL;
    qlr_batch b = {N, tok, k_pos, k_seq, NL, NULL, NULL, NULL};
    if (kv) CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
    if (lg) memcpy(out, lg, (size_t)NL * m->cfg.n_vocab * 4);
    qlr_kv_cache_free(kv);
}

static void test_hooks(void) {
    qlr_model_config c = small_cfg(0, 0);
    qlr_model *m = make(&c, 4, 0);
    qlr_forward *f = NULL;
    if (m) CHECK_OK(qlr_forward_create(m, N, N, &f));
    if (!f) goto done;
    size_t per = (size_t)NL * c.n_vocab;
    float *ref = malloc(per * 4), *got = malloc(per * 4);
    fwd(f, m, k_tok, ref);
    static const uint32_t kinds[] = {QLR_FORWARD_SKIP_ATTENTION, QLR_FORWARD_SKIP_ROPE_KV,
                                     QLR_FORWARD_SKIP_NORMS, QLR_FORWARD_SKIP_QKV,
                                     QLR_FORWARD_SKIP_O, QLR_FORWARD_SKIP_GATE_UP,
                                     QLR_FORWARD_SKIP_DOWN};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        qlr_forward_set_skip(f, kinds[i]);
        fwd(f, m, k_tok, got);
        CHECK_MSG(memcmp(ref, got, per * 4) != 0, "skipping kind 0x%x changed nothing", kinds[i]);
    }
    /* the lm_head left out: the logits buffer keeps the previous forward's values even for
     * other tokens */
    int32_t other[N];
    for (int i = 0; i < N; i++) other[i] = (k_tok[i] + 1) % c.n_vocab;
    qlr_forward_set_skip(f, 0);
    fwd(f, m, k_tok, ref);
    qlr_forward_set_skip(f, QLR_FORWARD_SKIP_LM_HEAD);
    fwd(f, m, other, got);
    CHECK_MSG(!memcmp(ref, got, per * 4), "a skipped lm_head wrote the logits");
    qlr_forward_set_skip(f, QLR_FORWARD_SKIP_ALL);
    fwd(f, m, other, got);
    qlr_forward_set_skip(f, 0);
    fwd(f, m, other, got);
    CHECK_MSG(memcmp(ref, got, per * 4) != 0, "other tokens give the same logits");
    fwd(f, m, k_tok, got);
    CHECK_MSG(!memcmp(ref, got, per * 4), "skip 0 after skipping everything: logits differ");
    /* unfused: a fused entry the backend has is not called, and the result is the plain ops' */
    qlr_backend_ops saved = be->ops;
    be->ops.add_rmsnorm = fake_add_rmsnorm;
    g_fused_calls = 0;
    fwd(f, m, k_tok, got);
    CHECK(g_fused_calls > 0);
    CHECK_MSG(!memcmp(ref, got, per * 4), "the fake add_rmsnorm entry changed the logits");
    qlr_forward_set_fused(f, 0);
    g_fused_calls = 0;
    fwd(f, m, k_tok, got);
    CHECK_MSG(g_fused_calls == 0, "unfused forward called add_rmsnorm %d times", g_fused_calls);
    CHECK_MSG(!memcmp(ref, got, per * 4), "unfused forward: logits differ");
    qlr_forward_set_fused(f, 1);
    fwd(f, m, k_tok, got);
    CHECK(g_fused_calls > 0);
    be->ops = saved;
    free(ref), free(got);
done:
    qlr_forward_free(f);
    qlr_model_free(m);
}

/* ---- NF4 lm_head ---- */

static const float *g_last_h; /* the residual stream after the last layer */
static void on_hidden(void *ud, int32_t layer, const void *h, int64_t n, int64_t d) {
    if (layer == *(int32_t *)ud) g_last_h = h;
}

static void test_nf4_lm_head(void) {
    qlr_model_config c = small_cfg(1, 0);
    qlr_model *m = make(&c, 9, 1);
    qlr_forward *f = NULL;
    qlr_kv_cache *kv = NULL;
    if (m) CHECK_OK(qlr_forward_create(m, N, N, &f));
    if (m) CHECK_OK(qlr_kv_cache_create(m, 2, 16, &kv));
    if (!f || !kv) goto done;
    int32_t last = c.n_layers - 1;
    qlr_forward_set_hidden_fn(f, on_hidden, &last);
    float *lg = NULL;
    qlr_batch b = {N, k_tok, k_pos, k_seq, NL, k_rows, NULL, NULL};
    CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
    if (!lg || !g_last_h) goto done;
    /* reference: RMSNorm of the gathered rows, times the dequantized NF4 rows, in float64 */
    int64_t d = c.d_model, V = c.n_vocab;
    float *w = malloc((size_t)(V * d) * 4);
    qlr_nf4_dequant(m->lm_head_nf4, w);
    double md = 0, mx = 0;
    for (int r = 0; r < NL; r++) {
        const float *x = g_last_h + (size_t)k_rows[r] * d;
        double ss = 0;
        for (int64_t j = 0; j < d; j++) ss += (double)x[j] * x[j];
        double inv = 1.0 / sqrt(ss / (double)d + c.rms_eps);
        for (int64_t v = 0; v < V; v++) {
            double s = 0;
            for (int64_t j = 0; j < d; j++) s += x[j] * inv * m->out_norm[j] * w[v * d + j];
            md = fmax(md, fabs(s - lg[(size_t)r * V + v]));
            mx = fmax(mx, fabs(s));
        }
    }
    free(w);
    /* f32 products of d = 128 terms of size ~0.03 (logits ~0.3): rounding ~1e-6 */
    printf("NF4 lm_head: max |logit| %.3g, max diff to float64 %.3g\n", mx, md);
    CHECK_MSG(mx > 0.05 && md < 1e-5, "NF4 lm_head logits: max diff %g (max %g)", md, mx);
done:
    qlr_kv_cache_free(kv);
    qlr_forward_free(f);
    qlr_model_free(m);
}

int main(void) {
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    test_create();
    test_forward_dev(0, 0);
    test_forward_dev(1, 1);
    test_hooks();
    test_nf4_lm_head();
    qlr_backend_free(be);
    return test_finish();
}
