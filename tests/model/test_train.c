/* tests/model/test_train.c (label grad): the training forward + backward (model/train.c) on
 * tiny random GGUF models (GQA 4/2 heads, 2 layers, LoRA on all 7 linears, llama tied and
 * qwen2 untied with q/k/v bias). The oracle is an independent float64 reimplementation of the
 * model written here (NF4 weights dequantized, same bf16 tables); its loss is differentiated
 * by central differences and compared with our f32 analytic LoRA gradients, with and without
 * LoRA dropout. Also: checkpointing on == off bit for bit, CE chunk sizes 1, 3 and n give the
 * same loss and gradients (to f32 rounding: BLAS picks kernels by shape), the ignore index, a sequence alone == the same sequence packed with another,
 * dropout determinism, batch validation errors; the long-context modes (layer inputs offloaded
 * to host memory, MLP in row chunks) against the default. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "formats/gguf.h"
#include "model/model.h"
#include "model/backprop.h"
#include "tests/test_util.h"

enum { D = 64, NH = 4, NKV = 2, HD = 16, FF = 96, VOCAB = 50, NL = 2, R = 4, NLIN = QLR_LIN_COUNT };

static const int64_t OUTS[NLIN] = {NH * HD, NKV * HD, NKV * HD, D, FF, FF, D};
static const int64_t INS[NLIN] = {D, D, D, NH * HD, D, D, FF};
static uint64_t g_rng = 7;
static qlr_backend *be;

static float *rnd(int64_t n, float s) {
    float *p = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) p[i] = test_rng_normal(&g_rng) * s;
    return p;
}

/* A tiny model; qwen2 gets q/k/v biases and an untied lm_head. */
static char *write_model(const char *arch) {
    static char path[512];
    snprintf(path, sizeof path, "%s/train_%s.gguf", test_tmpdir(), arch);
    int qwen = !strcmp(arch, "qwen2");
    qlr_gguf_writer *w = qlr_gguf_writer_create(0);
    char key[96];
    void *keep[128];
    int nk = 0;
    CHECK_OK(qlr_gguf_set_str(w, "general.architecture", arch));
#define KU(k, v) do { snprintf(key, sizeof key, "%s." k, arch); CHECK_OK(qlr_gguf_set_u32(w, key, v)); } while (0)
    KU("block_count", NL);
    KU("embedding_length", D);
    KU("feed_forward_length", FF);
    KU("attention.head_count", NH);
    KU("attention.head_count_kv", NKV);
    KU("context_length", 128);
    KU("vocab_size", VOCAB);
#undef KU
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", arch);
    CHECK_OK(qlr_gguf_set_f32(w, key, 1e-5f));
    snprintf(key, sizeof key, "%s.rope.freq_base", arch);
    CHECK_OK(qlr_gguf_set_f32(w, key, 10000.0f));
#define ADD(name, ne0, ne1, data) do { \
        uint64_t ne_[2] = {ne0, ne1}; float *d_ = (data); keep[nk++] = d_; \
        CHECK_OK(qlr_gguf_add_tensor(w, name, 0, (ne1) ? 2 : 1, ne_, d_, (ne0) * ((ne1) ? (ne1) : 1) * 4)); \
    } while (0)
    ADD("token_embd.weight", D, VOCAB, rnd(D * VOCAB, 1.0f));
    float *on = rnd(D, 0.1f);
    for (int i = 0; i < D; i++) on[i] += 1.0f;
    ADD("output_norm.weight", D, 0, on);
    if (qwen) ADD("output.weight", D, VOCAB, rnd(D * VOCAB, 0.3f));
    const char *lin[NLIN] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                             "ffn_down"};
    for (int l = 0; l < NL; l++) {
        char n[64];
        float *an = rnd(D, 0.1f), *fn = rnd(D, 0.1f);
        for (int i = 0; i < D; i++) an[i] += 1.0f, fn[i] += 1.0f;
        snprintf(n, sizeof n, "blk.%d.attn_norm.weight", l);
        ADD(n, D, 0, an);
        snprintf(n, sizeof n, "blk.%d.ffn_norm.weight", l);
        ADD(n, D, 0, fn);
        for (int i = 0; i < NLIN; i++) {
            snprintf(n, sizeof n, "blk.%d.%s.weight", l, lin[i]);
            ADD(n, INS[i], OUTS[i], rnd(OUTS[i] * INS[i], 0.2f));
            if (qwen && i < 3) {
                snprintf(n, sizeof n, "blk.%d.%s.bias", l, lin[i]);
                ADD(n, OUTS[i], 0, rnd(OUTS[i], 0.2f));
            }
        }
    }
#undef ADD
    CHECK_OK(qlr_gguf_writer_write(w, path));
    qlr_gguf_writer_free(w);
    for (int i = 0; i < nk; i++) free(keep[i]);
    return path;
}

/* ---- LoRA state ---- */

typedef struct {
    qlr_lora_ref ref[NL][NLIN];
    float *a[NL][NLIN], *b[NL][NLIN];     /* [R, in], [out, R] f32 (the compute copies) */
    float *da[NL * NLIN], *db[NL * NLIN]; /* gradients */
    qlr_adapter_set set;                  /* one slot: ref */
} lora_set;

static void lora_init(lora_set *s, qlr_model *m, float b_scale) {
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < NLIN; i++) {
            s->a[l][i] = rnd(R * INS[i], 0.2f);
            s->b[l][i] = rnd(OUTS[i] * R, b_scale);
            s->ref[l][i] = (qlr_lora_ref){s->a[l][i], s->b[l][i], R, 8.0f / R};
            s->da[l * NLIN + i] = calloc(R * INS[i], 4);
            s->db[l * NLIN + i] = calloc(OUTS[i] * R, 4);
        }
    (void)m;
    s->set = (qlr_adapter_set){NL, 1, R, &s->ref[0][0], &s->ref[0][0]};
}

static void lora_zero_grads(lora_set *s) {
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < NLIN; i++) {
            memset(s->da[l * NLIN + i], 0, R * INS[i] * 4);
            memset(s->db[l * NLIN + i], 0, OUTS[i] * R * 4);
        }
}

static void lora_free(lora_set *s, qlr_model *m) {
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < NLIN; i++) {
            free(s->a[l][i]), free(s->b[l][i]), free(s->da[l * NLIN + i]), free(s->db[l * NLIN + i]);
    (void)m;
        }
}

/* Copies of every gradient, for comparisons. */
static float *grads_flat(const lora_set *s) {
    int64_t tot = 0;
    for (int i = 0; i < NLIN; i++) tot += NL * R * (INS[i] + OUTS[i]);
    float *g = malloc((size_t)tot * 4), *p = g;
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < NLIN; i++) {
            memcpy(p, s->da[l * NLIN + i], R * INS[i] * 4), p += R * INS[i];
            memcpy(p, s->db[l * NLIN + i], OUTS[i] * R * 4), p += OUTS[i] * R;
        }
    return g;
}
static int64_t grads_len(void) {
    int64_t tot = 0;
    for (int i = 0; i < NLIN; i++) tot += NL * R * (INS[i] + OUTS[i]);
    return tot;
}

/* ---- the float64 reference model ---- */

typedef struct {
    int tied;
    double *w[NL][NLIN], *bias[NL][NLIN], *an[NL], *fn[NL], *onorm, *emb, *head;
    double inv[HD / 2], eps;
    double *a[NL][NLIN], *b[NL][NLIN], scale;
    float *mask[NL][NLIN]; /* [n, in] dropout multipliers or NULL */
} ref_model;

static double *to_d(const float *f, int64_t n) {
    double *d = malloc((size_t)n * 8);
    for (int64_t i = 0; i < n; i++) d[i] = f[i];
    return d;
}
static double *bf_to_d(const uint16_t *f, int64_t n) {
    double *d = malloc((size_t)n * 8);
    for (int64_t i = 0; i < n; i++) d[i] = qlr_bf16_to_f32(f[i]);
    return d;
}

static void ref_init(ref_model *r, const qlr_model *m, const lora_set *s) {
    memset(r, 0, sizeof *r);
    r->eps = m->cfg.rms_eps;
    for (int j = 0; j < HD / 2; j++) r->inv[j] = m->inv_freq[j];
    r->emb = bf_to_d(m->tok_embd, VOCAB * D);
    r->head = bf_to_d(m->lm_head, VOCAB * D);
    r->onorm = to_d(m->out_norm, D);
    for (int l = 0; l < NL; l++) {
        r->an[l] = to_d(m->layers[l].attn_norm, D);
        r->fn[l] = to_d(m->layers[l].ffn_norm, D);
        for (int i = 0; i < NLIN; i++) {
            float *wf = malloc(OUTS[i] * INS[i] * 4);
            qlr_nf4_dequant(&m->layers[l].w[i], wf);
            r->w[l][i] = to_d(wf, OUTS[i] * INS[i]);
            free(wf);
            if (m->layers[l].bias[i]) r->bias[l][i] = to_d(m->layers[l].bias[i], OUTS[i]);
            r->a[l][i] = to_d(s->a[l][i], R * INS[i]);
            r->b[l][i] = to_d(s->b[l][i], OUTS[i] * R);
        }
    }
    r->scale = s->ref[0][0].scale;
}

static void ref_free(ref_model *r) {
    free(r->emb), free(r->head), free(r->onorm);
    for (int l = 0; l < NL; l++) {
        free(r->an[l]), free(r->fn[l]);
        for (int i = 0; i < NLIN; i++) free(r->w[l][i]), free(r->bias[l][i]), free(r->a[l][i]), free(r->b[l][i]);
    }
}

static void ref_rms(const double *x, const double *w, double *y, int n) {
    for (int t = 0; t < n; t++) {
        double ss = 0;
        for (int j = 0; j < D; j++) ss += x[t * D + j] * x[t * D + j];
        double k = 1.0 / sqrt(ss / D + 1e-5);
        for (int j = 0; j < D; j++) y[t * D + j] = x[t * D + j] * k * w[j];
    }
}

static void ref_lin(const ref_model *r, int l, int i, const double *x, double *y, int n) {
    int64_t in = INS[i], out = OUTS[i];
    double *u = calloc(R, 8);
    for (int t = 0; t < n; t++) {
        const double *xv = x + t * in;
        for (int64_t o = 0; o < out; o++) {
            double s = r->bias[l][i] ? r->bias[l][i][o] : 0.0;
            for (int64_t j = 0; j < in; j++) s += r->w[l][i][o * in + j] * xv[j];
            y[t * out + o] = s;
        }
        for (int k = 0; k < R; k++) {
            double s = 0;
            for (int64_t j = 0; j < in; j++) {
                double xm = xv[j] * (r->mask[l][i] ? r->mask[l][i][t * in + j] : 1.0);
                s += r->a[l][i][k * in + j] * xm;
            }
            u[k] = s;
        }
        for (int64_t o = 0; o < out; o++) {
            double s = 0;
            for (int k = 0; k < R; k++) s += r->b[l][i][o * R + k] * u[k];
            y[t * out + o] += r->scale * s;
        }
    }
    free(u);
}

static void ref_rope(const ref_model *r, double *x, const int32_t *pos, int n, int nh) {
    for (int t = 0; t < n; t++)
        for (int j = 0; j < HD / 2; j++) {
            double ang = (double)(float)((float)pos[t] * (float)r->inv[j]);
            double cs = cos(ang), sn = sin(ang);
            for (int h = 0; h < nh; h++) {
                double *v = x + (t * nh + h) * HD, x1 = v[j], x2 = v[j + HD / 2];
                v[j] = x1 * cs - x2 * sn;
                v[j + HD / 2] = x2 * cs + x1 * sn;
            }
        }
}

/* Sum of CE over target tokens (float64 throughout). */
static double ref_loss(const ref_model *r, const qlr_train_batch *b) {
    int n = b->n;
    double *x = malloc(n * D * 8), *xn = malloc(n * D * 8), *q = malloc(n * NH * HD * 8),
           *k = malloc(n * NKV * HD * 8), *v = malloc(n * NKV * HD * 8),
           *att = malloc(n * NH * HD * 8), *o = malloc(n * D * 8), *g = malloc(n * FF * 8),
           *u = malloc(n * FF * 8), *sc = malloc(n * 8);
    for (int t = 0; t < n; t++)
        for (int j = 0; j < D; j++) x[t * D + j] = r->emb[b->tokens[t] * D + j];
    for (int l = 0; l < NL; l++) {
        ref_rms(x, r->an[l], xn, n);
        ref_lin(r, l, 0, xn, q, n);
        ref_lin(r, l, 1, xn, k, n);
        ref_lin(r, l, 2, xn, v, n);
        ref_rope(r, q, b->pos, n, NH);
        ref_rope(r, k, b->pos, n, NKV);
        for (int t = 0; t < n; t++)
            for (int h = 0; h < NH; h++) {
                int gk = h / (NH / NKV);
                double mx = -INFINITY, sum = 0;
                for (int p = 0; p <= t; p++) {
                    sc[p] = -INFINITY;
                    if (b->seq[p] != b->seq[t]) continue;
                    double dd = 0;
                    for (int j = 0; j < HD; j++) dd += q[(t * NH + h) * HD + j] * k[(p * NKV + gk) * HD + j];
                    sc[p] = dd / sqrt((double)HD);
                    if (sc[p] > mx) mx = sc[p];
                }
                for (int p = 0; p <= t; p++) sum += sc[p] == -INFINITY ? 0 : exp(sc[p] - mx);
                for (int j = 0; j < HD; j++) {
                    double acc = 0;
                    for (int p = 0; p <= t; p++)
                        if (sc[p] != -INFINITY) acc += exp(sc[p] - mx) / sum * v[(p * NKV + gk) * HD + j];
                    att[(t * NH + h) * HD + j] = acc;
                }
            }
        ref_lin(r, l, 3, att, o, n);
        for (int i = 0; i < n * D; i++) x[i] += o[i];
        ref_rms(x, r->fn[l], xn, n);
        ref_lin(r, l, 4, xn, g, n);
        ref_lin(r, l, 5, xn, u, n);
        for (int i = 0; i < n * FF; i++) g[i] = g[i] / (1.0 + exp(-g[i])) * u[i];
        ref_lin(r, l, 6, g, o, n);
        for (int i = 0; i < n * D; i++) x[i] += o[i];
    }
    ref_rms(x, r->onorm, xn, n);
    double loss = 0;
    for (int t = 0; t < n; t++) {
        if (b->targets[t] < 0) continue;
        double lg[VOCAB], mx = -INFINITY, s = 0;
        for (int vv = 0; vv < VOCAB; vv++) {
            double dd = 0;
            for (int j = 0; j < D; j++) dd += xn[t * D + j] * r->head[vv * D + j];
            lg[vv] = dd;
            if (dd > mx) mx = dd;
        }
        for (int vv = 0; vv < VOCAB; vv++) s += exp(lg[vv] - mx);
        loss += mx + log(s) - lg[b->targets[t]];
    }
    free(x), free(xn), free(q), free(k), free(v), free(att), free(o), free(g), free(u), free(sc);
    return loss;
}

/* ---- batches ---- */

enum { NMAX = 32 };
typedef struct {
    int32_t tok[NMAX], tgt[NMAX], pos[NMAX], seq[NMAX];
    qlr_train_batch b;
} batch_buf;

/* Packs sequences of the given lengths; targets = next token of the sequence, -100 on each
 * sequence's last token and where ignore[] marks. */
static void make_batch(batch_buf *bb, int n_seq, const int *lens, const int32_t *const *toks,
                       const int *ignore) {
    int n = 0;
    for (int s = 0; s < n_seq; s++)
        for (int i = 0; i < lens[s]; i++, n++) {
            bb->tok[n] = toks[s][i];
            bb->pos[n] = i;
            bb->seq[n] = s;
            bb->tgt[n] = i + 1 < lens[s] ? toks[s][i + 1] : QLR_IGNORE_INDEX;
            if (ignore && ignore[n]) bb->tgt[n] = QLR_IGNORE_INDEX;
        }
    bb->b = (qlr_train_batch){n, bb->tok, bb->tgt, bb->pos, bb->seq, n_seq};
}

static qlr_model *load_tiny(const char *arch) {
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    qlr_model *m = NULL;
    CHECK_OK(qlr_model_load(write_model(arch), be, &lp, &m));
    return m;
}

/* A workspace with the long-context knobs: offload the layer inputs, chunk the MLP rows. */
static qlr_train_ctx *make_ctx_long(qlr_model *m, int ckpt, float dropout, int chunk, int offload,
                                    int mlp_chunk) {
    qlr_train_params p = qlr_train_params_default();
    p.max_tokens = NMAX;
    p.max_seq_len = 24;
    p.checkpointing = ckpt;
    p.lora_dropout = dropout;
    p.ce_chunk = chunk;
    p.offload = offload;
    p.mlp_chunk = mlp_chunk;
    qlr_train_ctx *c = NULL;
    CHECK_OK(qlr_train_ctx_create(m, &p, &c));
    return c;
}

static qlr_train_ctx *make_ctx(qlr_model *m, int ckpt, float dropout, int chunk) {
    return make_ctx_long(m, ckpt, dropout, chunk, 0, 0);
}

static int32_t seqA[12], seqB[7];

/* The two-sequence batch most tests use: lengths 12 and 7 (GQA, packed), with three more
 * ignored targets. */
static void std_batch(batch_buf *bb) {
    int lens[2] = {12, 7}, ign[NMAX] = {0};
    ign[2] = ign[5] = ign[14] = 1;
    const int32_t *toks[2] = {seqA, seqB};
    make_batch(bb, 2, lens, toks, ign);
}

/* Central differences of the float64 loss against our gradients, on a sample of entries of
 * every A and B (all 7 targets, both layers). */
static void test_fd(const char *arch, int ckpt, float dropout) {
    qlr_model *m = load_tiny(arch);
    if (!m) return;
    lora_set s;
    lora_init(&s, m, 0.2f);
    batch_buf bb;
    std_batch(&bb);
    qlr_train_ctx *c = make_ctx(m, ckpt, dropout, 5);
    if (!c) return;
    const float gs = 0.5f;
    const uint64_t seed = 1234;
    double loss = 0;
    int64_t nt = 0;
    CHECK_OK(qlr_train_fwd_bwd(c, &s.set, &bb.b, gs, s.da, s.db, seed, &loss, &nt));
    int want_nt = 0;
    for (int i = 0; i < bb.b.n; i++) want_nt += bb.tgt[i] >= 0;
    CHECK_EQ_INT(nt, want_nt);
    ref_model r;
    ref_init(&r, m, &s);
    if (dropout > 0) /* the masks the backend draws for each (layer, linear) */
        for (int l = 0; l < NL; l++)
            for (int i = 0; i < NLIN; i++) {
                int64_t cnt = bb.b.n * INS[i];
                float *ones = malloc(cnt * 4);
                for (int64_t j = 0; j < cnt; j++) ones[j] = 1.0f;
                r.mask[l][i] = malloc(cnt * 4);
                CHECK_OK(be->ops.dropout(be, r.mask[l][i], ones, cnt, dropout,
                                         qlr_train_dropout_seed(seed, l, (qlr_linear_id)i)));
                free(ones);
            }
    double rl = ref_loss(&r, &bb.b);
    printf("%s ckpt %d dropout %.2f: loss %.6f (float64 reference %.6f) over %lld targets\n", arch,
           ckpt, dropout, loss, rl, (long long)nt);
    CHECK_NEAR(loss, rl, 1e-4, 1e-5); /* f32 forward vs float64: rounding only */
    double worst = 0;
    int checked = 0;
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < NLIN; i++)
            for (int which = 0; which < 2; which++) {
                int64_t cnt = which ? OUTS[i] * R : R * INS[i];
                double *par = which ? r.b[l][i] : r.a[l][i];
                const float *g = which ? s.db[l * NLIN + i] : s.da[l * NLIN + i];
                double gmax = 0;
                for (int64_t j = 0; j < cnt; j++) gmax = fmax(gmax, fabs(g[j]));
                CHECK_MSG(gmax > 0, "layer %d linear %d %s: gradient all zero", l, i, which ? "B" : "A");
                for (int e = 0; e < 6; e++) {
                    int64_t j = (int64_t)(test_rng_u64(&g_rng) % (uint64_t)cnt);
                    double h = 1e-4, keep = par[j];
                    par[j] = keep + h;
                    double lp = ref_loss(&r, &bb.b);
                    par[j] = keep - h;
                    double lm = ref_loss(&r, &bb.b);
                    par[j] = keep;
                    double fd = gs * (lp - lm) / (2 * h);
                    double err = fabs(fd - g[j]) / (fabs(fd) + 1e-2 * gmax + 1e-6);
                    if (err > worst) worst = err;
                    checked++;
                    /* f32 backward vs float64 central differences (h² ~ 1e-8): relative 1e-3,
                     * floor at 1% of the largest gradient of that matrix */
                    CHECK_MSG(err < 2e-3, "%s layer %d %s %s[%lld]: ours %.8g, finite difference %.8g",
                              arch, l, qlr_linear_hf_name(i), which ? "B" : "A", (long long)j, g[j], fd);
                }
            }
    printf("  %d finite-difference checks, worst relative error %.3g\n", checked, worst);
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < NLIN; i++) free(r.mask[l][i]);
    ref_free(&r);
    qlr_train_ctx_free(c);
    lora_free(&s, m);
    qlr_model_free(m);
}

/* Runs one fwd+bwd from zero grads and returns (flattened grads, loss). */
static float *run_grads(qlr_train_ctx *c, lora_set *s, const qlr_train_batch *b, uint64_t seed,
                        double *loss) {
    lora_zero_grads(s);
    int64_t nt = 0;
    CHECK_OK(qlr_train_fwd_bwd(c, &s->set, b, 1.0f, s->da, s->db, seed, loss, &nt));
    return grads_flat(s);
}

static void test_equivalences(const char *arch) {
    qlr_model *m = load_tiny(arch);
    if (!m) return;
    lora_set s;
    lora_init(&s, m, 0.2f);
    batch_buf bb;
    std_batch(&bb);
    int64_t G = grads_len();
    double l0, l1;

    /* checkpointing on == off, bit for bit (with dropout too: masks are redrawn identically) */
    for (int di = 0; di < 2; di++) {
        float drop = di ? 0.25f : 0.0f;
        qlr_train_ctx *c0 = make_ctx(m, 0, drop, 1024), *c1 = make_ctx(m, 1, drop, 1024);
        float *g0 = run_grads(c0, &s, &bb.b, 9, &l0), *g1 = run_grads(c1, &s, &bb.b, 9, &l1);
        CHECK_MSG(l0 == l1 && memcmp(g0, g1, G * 4) == 0,
                  "%s dropout %.2f: checkpointing changes the loss (%.9g vs %.9g) or gradients",
                  arch, drop, l0, l1);
        if (di) { /* same seed -> same bits; another seed -> other masks */
            double l2, l3;
            float *g2 = run_grads(c1, &s, &bb.b, 9, &l2), *g3 = run_grads(c1, &s, &bb.b, 10, &l3);
            CHECK(l2 == l1 && memcmp(g2, g1, G * 4) == 0);
            CHECK(l3 != l1 && memcmp(g3, g1, G * 4) != 0);
            free(g2), free(g3);
        }
        free(g0), free(g1);
        qlr_train_ctx_free(c0), qlr_train_ctx_free(c1);
    }

    /* CE chunk sizes 1, 3, n: the same loss and gradients, bit for bit */
    qlr_train_ctx *cn = make_ctx(m, 1, 0.0f, bb.b.n);
    float *gn = run_grads(cn, &s, &bb.b, 0, &l0);
    for (int k = 0; k < 2; k++) {
        qlr_train_ctx *ck = make_ctx(m, 1, 0.0f, k ? 3 : 1);
        float *gk = run_grads(ck, &s, &bb.b, 0, &l1);
        double mg = 0, gmax = 0;
        for (int64_t i = 0; i < G; i++) mg = fmax(mg, fabs(gn[i] - gk[i])), gmax = fmax(gmax, fabs(gn[i]));
        int same = l0 == l1 && memcmp(gn, gk, G * 4) == 0;
        printf("%s: ce_chunk %d vs %d: %s (loss diff %.3g, max grad diff %.3g of %.3g)\n", arch,
               k ? 3 : 1, bb.b.n, same ? "bit-identical" : "equal to f32 rounding",
               fabs(l0 - l1), mg, gmax);
        /* each token's CE is its own row: only the GEMM shape of the chunk changes, and
         * OpenBLAS picks kernels by shape, so agreement is to f32 rounding, not always bits */
        CHECK_NEAR(l1, l0, 0.0, 1e-6);
        CHECK_MSG(mg <= 1e-6 * gmax, "%s: ce_chunk %d gradients differ by %g", arch, k ? 3 : 1, mg);
        free(gk);
        qlr_train_ctx_free(ck);
    }

    /* eval == the loss of fwd_bwd (no dropout), and eval leaves gradients alone */
    double le;
    int64_t nte;
    CHECK_OK(qlr_train_eval(cn, &s.set, &bb.b, &le, &nte));
    CHECK(le == l0);

    /* ignore index: all targets ignored -> loss 0, count 0, gradients exactly 0 */
    batch_buf bi = bb;
    for (int i = 0; i < bi.b.n; i++) bi.tgt[i] = QLR_IGNORE_INDEX;
    bi.b.targets = bi.tgt;
    float *gz = run_grads(cn, &s, &bi.b, 0, &l1);
    int allz = 1;
    for (int64_t i = 0; i < G; i++) allz &= gz[i] == 0.0f;
    CHECK_MSG(allz && l1 == 0.0, "%s: all-ignored batch gives loss %g / nonzero gradients", arch, l1);
    free(gz);
    /* one target: the loss is that token's CE alone; the gradient scales linearly with grad_scale */
    bi.tgt[4] = bb.tgt[4];
    lora_zero_grads(&s);
    int64_t nt1;
    CHECK_OK(qlr_train_fwd_bwd(cn, &s.set, &bi.b, 2.0f, s.da, s.db, 0, &l1, &nt1));
    CHECK_EQ_INT(nt1, 1);
    float *g2x = grads_flat(&s);
    float *g1x = run_grads(cn, &s, &bi.b, 0, &l1);
    double md = 0;
    for (int64_t i = 0; i < G; i++) md = fmax(md, fabs(g2x[i] - 2.0 * g1x[i]));
    CHECK_MSG(md < 1e-6, "%s: grad_scale 2 vs 1: %g", arch, md);
    free(g2x), free(g1x);

    /* a sequence alone == the same sequence packed after another whose targets are ignored */
    int lensA[1] = {12};
    const int32_t *tA[1] = {seqA};
    batch_buf ba;
    make_batch(&ba, 1, lensA, tA, NULL);
    float *ga = run_grads(cn, &s, &ba.b, 0, &l0);
    int lens2[2] = {7, 12}, ign[NMAX] = {0};
    for (int i = 0; i < 7; i++) ign[i] = 1;
    const int32_t *t2[2] = {seqB, seqA};
    batch_buf bp;
    make_batch(&bp, 2, lens2, t2, ign);
    float *gp = run_grads(cn, &s, &bp.b, 0, &l1);
    double mg = 0, ga_max = 0;
    for (int64_t i = 0; i < G; i++) mg = fmax(mg, fabs(ga[i] - gp[i])), ga_max = fmax(ga_max, fabs(ga[i]));
    printf("%s: alone vs packed: loss %.9g vs %.9g, max grad diff %.3g (max grad %.3g)\n", arch, l0,
           l1, mg, ga_max);
    /* the same math on other GEMM shapes: f32 rounding only */
    CHECK_NEAR(l1, l0, 1e-5, 1e-6);
    CHECK_MSG(mg <= 1e-5 * ga_max + 1e-7, "%s: packed sequence gradients differ by %g", arch, mg);
    free(ga), free(gp), free(gn);

    /* validation errors */
    double ls;
    int64_t ntt;
    batch_buf bx = bb;
    bx.b.tokens = bx.tok, bx.b.targets = bx.tgt, bx.b.pos = bx.pos, bx.b.seq = bx.seq;
    bx.tgt[3] = VOCAB;
    CHECK(qlr_train_fwd_bwd(cn, &s.set, &bx.b, 1.0f, s.da, s.db, 0, &ls, &ntt) == QLR_ERR_RANGE);
    printf("  error: %s\n", qlr_error_msg());
    bx.tgt[3] = bb.tgt[3];
    bx.seq[13] = 0; /* sequence 0 resumes after sequence 1 began */
    CHECK(qlr_train_fwd_bwd(cn, &s.set, &bx.b, 1.0f, s.da, s.db, 0, &ls, &ntt) == QLR_ERR_RANGE);
    printf("  error: %s\n", qlr_error_msg());
    bx.seq[13] = 1;
    bx.b.n_seq = 3;
    CHECK(qlr_train_eval(cn, &s.set, &bx.b, &ls, &ntt) == QLR_ERR_RANGE);
    bx.b.n_seq = 2;
    bx.pos[1] = 24;
    CHECK(qlr_train_eval(cn, &s.set, &bx.b, &ls, &ntt) == QLR_ERR_RANGE);
    printf("  error: %s\n", qlr_error_msg());
    qlr_train_ctx_free(cn);
    qlr_train_params bad = qlr_train_params_default();
    bad.lora_dropout = 1.0f;
    qlr_train_ctx *cb = NULL;
    CHECK(qlr_train_ctx_create(m, &bad, &cb) == QLR_ERR_INVALID && cb == NULL);
    lora_free(&s, m);
    qlr_model_free(m);
}

/* The long-context modes against the default (checkpointing, whole MLP rows, inputs on the
 * device):
 *  - mlp_chunk >= n is one chunk: the same ops on the same inputs, bit for bit;
 *  - mlp_chunk 5 (4 chunks of the 19 rows): every row's forward is its own, but the LoRA
 *    gradients of gate/up/down are summed over the rows chunk by chunk, and BLAS picks kernels
 *    by shape, so agreement is to f32 rounding (1e-6 of the largest gradient; loss 1e-6 rel);
 *  - offload (layer inputs through host memory) is a copy: bit for bit, with and without
 *    chunks, with dropout too, and across two steps on one workspace (slots reused);
 *  - offload needs checkpointing (QLR_ERR_INVALID). */
static void test_long_context(const char *arch) {
    qlr_model *m = load_tiny(arch);
    if (!m) return;
    lora_set s;
    lora_init(&s, m, 0.2f);
    batch_buf bb;
    std_batch(&bb);
    int64_t G = grads_len();
    double l0, l1, l2;
    for (int di = 0; di < 2; di++) {
        float drop = di ? 0.25f : 0.0f;
        qlr_train_ctx *c0 = make_ctx(m, 1, drop, 1024);
        float *g0 = run_grads(c0, &s, &bb.b, 9, &l0);
        if (!di) { /* one chunk == whole rows, bit for bit */
            qlr_train_ctx *c1 = make_ctx_long(m, 1, drop, 1024, 0, NMAX);
            float *g1 = run_grads(c1, &s, &bb.b, 9, &l1);
            CHECK_MSG(l0 == l1 && memcmp(g0, g1, G * 4) == 0,
                      "%s: mlp_chunk %d (one chunk) changes the loss (%.9g vs %.9g) or gradients",
                      arch, NMAX, l0, l1);
            free(g1);
            qlr_train_ctx_free(c1);
        }
        /* offload, whole rows: bit for bit; twice on one workspace */
        qlr_train_ctx *c2 = make_ctx_long(m, 1, drop, 1024, 1, 0);
        for (int rep = 0; rep < 2; rep++) {
            float *g2 = run_grads(c2, &s, &bb.b, 9, &l2);
            CHECK_MSG(l0 == l2 && memcmp(g0, g2, G * 4) == 0,
                      "%s dropout %.2f step %d: offload changes the loss (%.9g vs %.9g) or "
                      "gradients", arch, drop, rep, l0, l2);
            free(g2);
        }
        double le0, le2;
        int64_t nt;
        CHECK_OK(qlr_train_eval(c0, &s.set, &bb.b, &le0, &nt));
        CHECK_OK(qlr_train_eval(c2, &s.set, &bb.b, &le2, &nt));
        CHECK(le0 == le2);
        qlr_train_ctx_free(c2);
        /* chunks of 5 rows: without checkpointing, with it, with offload */
        qlr_train_ctx *c3 = make_ctx_long(m, 1, drop, 1024, 0, 5),
                      *c4 = make_ctx_long(m, 0, drop, 1024, 0, 5),
                      *c5 = make_ctx_long(m, 1, drop, 1024, 1, 5);
        double l3, l4, l5;
        float *g3 = run_grads(c3, &s, &bb.b, 9, &l3), *g4 = run_grads(c4, &s, &bb.b, 9, &l4),
              *g5 = run_grads(c5, &s, &bb.b, 9, &l5);
        CHECK_MSG(l3 == l4 && memcmp(g3, g4, G * 4) == 0,
                  "%s dropout %.2f: mlp_chunk 5, checkpointing on != off", arch, drop);
        CHECK_MSG(l3 == l5 && memcmp(g3, g5, G * 4) == 0,
                  "%s dropout %.2f: mlp_chunk 5, offload != device inputs", arch, drop);
        if (!di) { /* no dropout: the same function as whole rows, to f32 rounding */
            double mg = 0, gmax = 0;
            for (int64_t i = 0; i < G; i++)
                mg = fmax(mg, fabs(g0[i] - g3[i])), gmax = fmax(gmax, fabs(g0[i]));
            int same = l0 == l3 && memcmp(g0, g3, G * 4) == 0;
            printf("%s: mlp_chunk 5 vs whole rows: %s (loss diff %.3g, max grad diff %.3g of "
                   "%.3g)\n", arch, same ? "bit-identical" : "equal to f32 rounding",
                   fabs(l0 - l3), mg, gmax);
            CHECK_NEAR(l3, l0, 0.0, 1e-6);
            CHECK_MSG(mg <= 1e-6 * gmax, "%s: mlp_chunk 5 gradients differ by %g", arch, mg);
        }
        free(g3), free(g4), free(g5), free(g0);
        qlr_train_ctx_free(c3), qlr_train_ctx_free(c4), qlr_train_ctx_free(c5);
        qlr_train_ctx_free(c0);
    }
    qlr_train_params bad = qlr_train_params_default();
    bad.checkpointing = 0;
    bad.offload = 1;
    qlr_train_ctx *cb = NULL;
    CHECK(qlr_train_ctx_create(m, &bad, &cb) == QLR_ERR_INVALID && cb == NULL);
    bad.offload = 0;
    bad.mlp_chunk = -1;
    CHECK(qlr_train_ctx_create(m, &bad, &cb) == QLR_ERR_INVALID && cb == NULL);
    lora_free(&s, m);
    qlr_model_free(m);
}

int main(void) {
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    for (int i = 0; i < 12; i++) seqA[i] = (int32_t)(test_rng_u64(&g_rng) % VOCAB);
    for (int i = 0; i < 7; i++) seqB[i] = (int32_t)(test_rng_u64(&g_rng) % VOCAB);
    test_fd("llama", 0, 0.0f);
    test_fd("qwen2", 1, 0.0f);
    test_fd("llama", 1, 0.3f);
    test_equivalences("llama");
    test_equivalences("qwen2");
    test_long_context("llama");
    test_long_context("qwen2");
    qlr_backend_free(be);
    return test_finish();
}
