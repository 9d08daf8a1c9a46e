/* tests/gpu/test_cuda_forward.c: a whole Llama-shaped forward (SmolLM2-135M widths, 4 layers,
 * random NF4 weights, tied bf16 embeddings) composed from the op table, run on the CPU backend
 * and twice on the CUDA backend: "ours" (the attention op everywhere) and "cudnn" (rope_kv_store,
 * and a fresh prefill above 64 tokens through the optional attention_fresh op, i.e. cuDNN's
 * SDPA for its first 128 rows here, as model/forward.c does). Cases: a 7-token prefill then 32
 * greedy decode steps; a 150-token prefill then 16 steps, where attention_fresh must serve every
 * layer. All three models are fed the CPU's token (teacher forcing), so every step is compared
 * (judge() says how). During the 150-token prefill each layer's attention_fresh input and output
 * are kept, and afterwards compared with the CPU attention op and our attention kernel on the
 * same q/k/v. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "quant/nf4.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

enum { HID = 576, NH = 9, NKV = 3, HD = 64, FF = 1536, NL = 4, VOCAB = 4096, CTX = 192,
       MAXN = 150 };
#define SCALE (1.0f / 8.0f) /* 1 / sqrt(HD) */

typedef struct fmodel {
    qlr_backend *be;
    int fresh;     /* rope_kv_store, and attention_fresh for fresh prefills above 64 tokens */
    int snap;      /* keep each layer's q and attention_fresh output (sq, sa) */
    int fresh_ok, fresh_refused;
    char why[512]; /* the last refusal */
    qlr_nf4 w[NL][7];
    float *ln1[NL], *ln2[NL], *lnf, *inv;
    void *kc[NL], *vc[NL];
    void *sq[NL], *sa[NL];
    uint16_t *emb;
    void *x, *h, *q, *k, *v, *att, *g, *u;
    float *logits;
    int32_t *ids, *seq, *pos;
} fmodel;

static void *dal(qlr_backend *be, size_t n) {
    void *p = be->mem.alloc(be, n);
    QLR_ASSERT(p);
    return p;
}

static void build(fmodel *m, qlr_backend *be, qlr_nf4 host[NL][7], const uint16_t *emb,
                  const float *norms, const float *inv) {
    memset(m, 0, sizeof *m);
    m->be = be;
    size_t es = qlr_backend_act_size(be);
    int64_t N = MAXN;
    for (int l = 0; l < NL; l++) {
        for (int i = 0; i < 7; i++) CHECK_OK(qlr_backend_nf4_upload(be, &host[l][i], &m->w[l][i], 0));
        m->ln1[l] = dal(be, HID * 4);
        m->ln2[l] = dal(be, HID * 4);
        CHECK_OK(be->mem.h2d(be, m->ln1[l], norms + (2 * l) * HID, HID * 4));
        CHECK_OK(be->mem.h2d(be, m->ln2[l], norms + (2 * l + 1) * HID, HID * 4));
        size_t cb = (size_t)CTX * NKV * HD * es;
        m->kc[l] = dal(be, cb);
        m->vc[l] = dal(be, cb);
        CHECK_OK(be->mem.memset0(be, m->kc[l], cb));
        CHECK_OK(be->mem.memset0(be, m->vc[l], cb));
        m->sq[l] = dal(be, N * NH * HD * es);
        m->sa[l] = dal(be, N * NH * HD * es);
    }
    m->lnf = dal(be, HID * 4);
    CHECK_OK(be->mem.h2d(be, m->lnf, norms + 2 * NL * HID, HID * 4));
    m->inv = dal(be, HD / 2 * 4);
    CHECK_OK(be->mem.h2d(be, m->inv, inv, HD / 2 * 4));
    m->emb = dal(be, (size_t)VOCAB * HID * 2);
    CHECK_OK(be->mem.h2d(be, m->emb, emb, (size_t)VOCAB * HID * 2));
    m->x = dal(be, N * HID * es);
    m->h = dal(be, N * HID * es);
    m->q = dal(be, N * NH * HD * es);
    m->k = dal(be, N * NKV * HD * es);
    m->v = dal(be, N * NKV * HD * es);
    m->att = dal(be, N * NH * HD * es);
    m->g = dal(be, N * FF * es);
    m->u = dal(be, N * FF * es);
    m->logits = dal(be, (size_t)VOCAB * 4);
    m->ids = dal(be, N * 4);
    m->seq = dal(be, N * 4);
    m->pos = dal(be, N * 4);
    CHECK_OK(be->mem.sync(be));
}

static void destroy(fmodel *m) {
    qlr_backend *be = m->be;
    for (int l = 0; l < NL; l++) {
        for (int i = 0; i < 7; i++) qlr_backend_nf4_free(be, &m->w[l][i]);
        void *b[] = {m->ln1[l], m->ln2[l], m->kc[l], m->vc[l], m->sq[l], m->sa[l]};
        for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) be->mem.free(be, b[i]);
    }
    void *b[] = {m->lnf, m->inv, m->emb, m->x, m->h, m->q, m->k, m->v, m->att, m->g, m->u,
                 m->logits, m->ids, m->seq, m->pos};
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) be->mem.free(be, b[i]);
}

/* n tokens at positions p0.. of sequence 0; logits of the last token into host `out`. With
 * m->fresh, a fresh prefill (p0 = 0) of more than 64 tokens uses attention_fresh, falling back
 * to the attention op on QLR_ERR_UNSUPPORTED (model/forward.c's rule). */
static void step(fmodel *m, const int32_t *ids, int64_t n, int32_t p0, float *out) {
    qlr_backend *be = m->be;
    qlr_backend_ops *o = &be->ops;
    size_t es = qlr_backend_act_size(be);
    int32_t seq[MAXN] = {0}, pos[MAXN];
    QLR_ASSERT(n <= MAXN && p0 + n <= CTX);
    for (int64_t i = 0; i < n; i++) pos[i] = p0 + (int32_t)i;
    CHECK_OK(be->mem.h2d(be, m->ids, ids, n * 4));
    CHECK_OK(be->mem.h2d(be, m->seq, seq, n * 4));
    CHECK_OK(be->mem.h2d(be, m->pos, pos, n * 4));
    CHECK_OK(o->embedding(be, m->x, m->emb, m->ids, n, HID, VOCAB));
    int fresh = m->fresh && p0 == 0 && n > 64 && o->attention_fresh;
    for (int l = 0; l < NL; l++) {
        CHECK_OK(o->rmsnorm(be, m->h, m->x, m->ln1[l], n, HID, 1e-5f));
        CHECK_OK(o->nf4_linear(be, m->q, m->h, &m->w[l][0], NULL, n));
        CHECK_OK(o->nf4_linear(be, m->k, m->h, &m->w[l][1], NULL, n));
        CHECK_OK(o->nf4_linear(be, m->v, m->h, &m->w[l][2], NULL, n));
        if (m->fresh && o->rope_kv_store) {
            CHECK_OK(o->rope_kv_store(be, m->q, m->k, m->v, m->kc[l], m->vc[l], m->seq, m->pos,
                                      m->inv, n, NH, NKV, HD, CTX));
        } else {
            CHECK_OK(o->rope(be, m->q, m->pos, m->inv, n, NH, HD));
            CHECK_OK(o->rope(be, m->k, m->pos, m->inv, n, NKV, HD));
            CHECK_OK(o->kv_store(be, m->kc[l], m->vc[l], m->k, m->v, m->seq, m->pos, n, NKV, HD,
                                 CTX));
        }
        qlr_status ast = QLR_ERR_UNSUPPORTED;
        if (fresh) {
            ast = o->attention_fresh(be, m->att, m->q, m->k, m->v, n, NH, NKV, HD, SCALE);
            if (ast == QLR_ERR_UNSUPPORTED) {
                snprintf(m->why, sizeof m->why, "%s", qlr_error_msg());
                qlr_error_clear();
                m->fresh_refused++;
            } else {
                CHECK_OK(ast);
                m->fresh_ok++;
                if (m->snap) { /* stream-ordered copies: the forward is not synchronised */
                    CHECK_OK(be->mem.d2d(be, m->sq[l], m->q, (size_t)(n * NH * HD) * es));
                    CHECK_OK(be->mem.d2d(be, m->sa[l], m->att, (size_t)(n * NH * HD) * es));
                }
            }
        }
        if (ast == QLR_ERR_UNSUPPORTED)
            CHECK_OK(o->attention(be, m->att, m->q, m->kc[l], m->vc[l], m->seq, m->pos, n, NH, NKV,
                                  HD, CTX, SCALE));
        CHECK_OK(o->nf4_linear(be, m->h, m->att, &m->w[l][3], NULL, n));
        CHECK_OK(o->add(be, m->x, m->h, n * HID));
        CHECK_OK(o->rmsnorm(be, m->h, m->x, m->ln2[l], n, HID, 1e-5f));
        CHECK_OK(o->nf4_linear(be, m->g, m->h, &m->w[l][4], NULL, n));
        CHECK_OK(o->nf4_linear(be, m->u, m->h, &m->w[l][5], NULL, n));
        CHECK_OK(o->swiglu(be, m->g, m->g, m->u, n * FF));
        CHECK_OK(o->nf4_linear(be, m->h, m->g, &m->w[l][6], NULL, n));
        CHECK_OK(o->add(be, m->x, m->h, n * HID));
    }
    char *xl = (char *)m->x + (size_t)((n - 1) * HID) * es;
    CHECK_OK(o->rmsnorm(be, m->h, xl, m->lnf, 1, HID, 1e-5f));
    CHECK_OK(o->lm_head(be, m->logits, m->h, m->emb, 1, HID, VOCAB));
    CHECK_OK(be->mem.d2h(be, out, m->logits, VOCAB * 4));
    CHECK_OK(be->mem.sync(be));
}

/* The CPU attention op (f32) on q [n, NH, HD], k/v [n, NKV, HD] of seq 0 at positions 0..n-1. */
static void cpu_attention(float *ref, const float *q, const float *k, const float *v, int64_t n) {
    int32_t seq[MAXN] = {0}, pos[MAXN];
    for (int64_t i = 0; i < n; i++) pos[i] = (int32_t)i;
    gh_buf bq = gh_act(g_cpu, q, n * NH * HD), bk = gh_act(g_cpu, k, n * NKV * HD);
    gh_buf bv = gh_act(g_cpu, v, n * NKV * HD), bkc = gh_act(g_cpu, k, n * NKV * HD);
    gh_buf bvc = gh_act(g_cpu, v, n * NKV * HD), bo = gh_act(g_cpu, q, n * NH * HD);
    gh_buf bs = gh_raw(g_cpu, seq, (size_t)n * 4), bp = gh_raw(g_cpu, pos, (size_t)n * 4);
    CHECK_OK(g_cpu->ops.kv_store(g_cpu, bkc.p, bvc.p, bk.p, bv.p, bs.p, bp.p, n, NKV, HD, n));
    CHECK_OK(g_cpu->ops.attention(g_cpu, bo.p, bq.p, bkc.p, bvc.p, bs.p, bp.p, n, NH, NKV, HD, n,
                                  SCALE));
    gh_read_act(g_cpu, bo.p, ref, n * NH * HD);
    gh_buf *all[] = {&bq, &bk, &bv, &bkc, &bvc, &bo, &bs, &bp};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        gh_free_checked(g_cpu, all[i], "cpu attention buffer");
}

static void err_stats(const float *got, const float *ref, int64_t n, double *max, double *rms) {
    double mx = 0, s = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        if (d > mx || d != d) mx = d;
        s += d * d;
    }
    *max = mx;
    *rms = sqrt(s / (double)n);
}

/* After a fresh prefill of n tokens on m (m->snap: q and attention_fresh's output of every
 * layer kept; the cache rows 0..n-1 hold that layer's k/v): per layer, attention_fresh's output
 * and the attention op's (our kernel, on the same q and cache) against the CPU attention op on
 * the same bf16 q/k/v. A bug (wrong scale, diagonal, head mapping, stride, stale plan, k/v read
 * before they were written) gives errors of the size of the outputs; rounding gives at most
 * 2^-9·max|v| from the softmax weights rounded to bf16 before P·V (Σ_j |δp_j|·|v_j| with
 * |δp_j| <= 2^-9·p_j) plus 2^-9 of the output for its own bf16 rounding: allow twice that,
 * 2^-8·max|v| + 2^-7·|ref|. */
static void probe_attention(fmodel *m, int64_t n) {
    qlr_backend *be = m->be;
    int64_t nq = n * NH * HD, nk = n * NKV * HD;
    float *q = malloc((size_t)nq * 4), *k = malloc((size_t)nk * 4), *v = malloc((size_t)nk * 4);
    float *dnn = malloc((size_t)nq * 4), *ours = malloc((size_t)nq * 4);
    float *ref = malloc((size_t)nq * 4);
    void *att2 = dal(be, (size_t)nq * qlr_backend_act_size(be));
    int32_t seq[MAXN] = {0}, pos[MAXN];
    for (int64_t i = 0; i < n; i++) pos[i] = (int32_t)i;
    CHECK_OK(be->mem.h2d(be, m->seq, seq, (size_t)n * 4));
    CHECK_OK(be->mem.h2d(be, m->pos, pos, (size_t)n * 4));
    CHECK_OK(be->mem.sync(be));
    for (int l = 0; l < NL; l++) {
        CHECK_OK(be->ops.attention(be, att2, m->sq[l], m->kc[l], m->vc[l], m->seq, m->pos, n, NH,
                                   NKV, HD, CTX, SCALE));
        gh_read_act(be, m->sq[l], q, nq);
        gh_read_act(be, m->kc[l], k, nk); /* seq 0's rows 0..n-1: [n, NKV, HD] */
        gh_read_act(be, m->vc[l], v, nk);
        gh_read_act(be, m->sa[l], dnn, nq);
        gh_read_act(be, att2, ours, nq);
        cpu_attention(ref, q, k, v, n);
        double vmax = 0, e[6];
        for (int64_t i = 0; i < nk; i++) vmax = fmax(vmax, fabs(v[i]));
        err_stats(dnn, ref, nq, &e[0], &e[1]);
        err_stats(ours, ref, nq, &e[2], &e[3]);
        err_stats(dnn, ours, nq, &e[4], &e[5]);
        printf("  layer %d attention, %lld tokens (rms %.3g, max|v| %.3g): attention_fresh - cpu "
               "max %.3g rms %.3g; ours - cpu max %.3g rms %.3g; attention_fresh - ours max %.3g "
               "rms %.3g\n", l, (long long)n, gh_rms(ref, nq), vmax, e[0], e[1], e[2], e[3], e[4],
               e[5]);
        char what[96];
        snprintf(what, sizeof what, "layer %d attention_fresh (%lld tokens)", l, (long long)n);
        gh_compare(what, dnn, ref, nq, 0x1p-8 * vmax, 0x1p-7);
        snprintf(what, sizeof what, "layer %d attention op (%lld tokens)", l, (long long)n);
        gh_compare(what, ours, ref, nq, 0x1p-8 * vmax, 0x1p-7);
    }
    be->mem.free(be, att2);
    free(q);
    free(k);
    free(v);
    free(dnn);
    free(ours);
    free(ref);
}

static double rel_l2(const float *got, const float *ref, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static int argmax(const float *v, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[b]) b = i;
    return b;
}

/* Per GPU model over one case's steps. */
typedef struct tally {
    int same, close, bad;
    double max_err, max_rel;
} tally;

/* One step's GPU logits lg against the CPU's lc. Δ = lg - lc is the GPU's logit error, from
 * bf16 activations: Δ_i = e_i · δh (δh the error of the final normed hidden state, e_i the
 * random embedding rows), so over the vocabulary Δ is close to N(0, σ²) with σ = rms(Δ),
 * measured here at this very step. The GPU prefers b over the CPU's token a (margin
 * m = lc[a] - lc[b] > 0) only if Δ_b - Δ_a >= m, and Δ_b - Δ_a has deviation √2·σ: a differing
 * token is accepted when m <= 4·√2·σ (4 sigma). σ itself must stay below 2% of the CPU logits'
 * RMS. H100, both kernels: σ 0.030-0.039 at logit RMS 2.4 (relative L2 at most 1.6%) after the
 * 150-token prompt, where step 9 (CPU margin 0.053, allowance 0.18) flips with ours and with
 * cuDNN alike: a near-tie, which the former fixed allowance (2% of the logit RMS, 0.049, not
 * derived from the error at the step) rejected. */
static void judge(const char *who, int np, int s, const float *lc, const float *lg, tally *t,
                  int verbose) {
    double mx, sigma;
    err_stats(lg, lc, VOCAB, &mx, &sigma);
    double rel = rel_l2(lg, lc, VOCAB);
    if (mx > t->max_err) t->max_err = mx;
    if (rel > t->max_rel) t->max_rel = rel;
    CHECK_MSG(rel <= 0.02, "%s, prompt %d, step %d: logits' relative L2 error %.4f > 0.02", who, np,
              s, rel);
    int a = argmax(lc, VOCAB), b = argmax(lg, VOCAB);
    double m = (double)lc[a] - (double)lc[b], allow = 4.0 * sqrt(2.0) * sigma;
    if (a == b) t->same++;
    else if (m <= allow) t->close++;
    else {
        t->bad++;
        test_fail_(__FILE__, __LINE__, "%s, prompt %d, step %d: cpu token %d, gpu token %d, cpu "
                   "margin %.4g > 4·√2·rms(Δ) = %.4g (max |Δ| %.4g)", who, np, s, a, b, m, allow,
                   mx);
    }
    if (verbose)
        printf(" | %s: max|Δ| %.4f rms(Δ) %.4f %s", who, mx, sigma,
               a == b ? "same" : m <= allow ? "flip (within 4·√2·rms(Δ))" : "WRONG");
}

/* Prefill `prompt` on the CPU and both GPU models (the caches are overwritten from position 0),
 * then `steps` greedy decode steps teacher-forced with the CPU's token; every step judged for
 * both GPU models. verbose: one line per step (CPU margin, each model's logit error). */
static void run_case(fmodel *mc, fmodel *mg[2], const char *const who[2], const int32_t *prompt,
                     int np, int steps, int verbose) {
    float *lc = malloc(VOCAB * 4), *lg[2] = {malloc(VOCAB * 4), malloc(VOCAB * 4)};
    tally t[2];
    memset(t, 0, sizeof t);
    step(mc, prompt, np, 0, lc);
    for (int i = 0; i < 2; i++) step(mg[i], prompt, np, 0, lg[i]);
    /* logits after the prefill: the GPU rounds activations to bf16 (2^-9) about 15 times per
     * layer; on the H100 this gave a relative L2 error of 1.1% and a worst element of 4.2% of
     * the logit RMS among 4096 (about 4 sigma) for the 7-token prompt: bound each element by 6%
     * of the RMS (+3% relative); judge() bounds the L2 error by 2% */
    double rms = gh_rms(lc, VOCAB);
    for (int i = 0; i < 2; i++) {
        char what[96];
        snprintf(what, sizeof what, "%s: prefill logits (%d tokens)", who[i], np);
        gh_compare(what, lg[i], lc, VOCAB, 0.06 * rms, 0.03);
    }
    printf("  %d-token prefill: %s - %s logits relative L2 %.4g\n", np, who[0], who[1],
           rel_l2(lg[0], lg[1], VOCAB));
    for (int s = 0; s <= steps; s++) {
        if (verbose) {
            int a = argmax(lc, VOCAB);
            double second = -INFINITY;
            for (int i = 0; i < VOCAB; i++)
                if (i != a && lc[i] > second) second = lc[i];
            printf("  prompt %d step %2d: cpu top-2 margin %.4f (logit rms %.3f)", np, s,
                   lc[a] - second, gh_rms(lc, VOCAB));
        }
        for (int i = 0; i < 2; i++) judge(who[i], np, s, lc, lg[i], &t[i], verbose);
        if (verbose) printf("\n");
        if (s == steps) break;
        int32_t tok = argmax(lc, VOCAB);
        step(mc, &tok, 1, np + s, lc);
        for (int i = 0; i < 2; i++) step(mg[i], &tok, 1, np + s, lg[i]);
    }
    for (int i = 0; i < 2; i++) {
        printf("  %s, greedy after %d prompt tokens: %d of %d steps identical, %d within the "
               "logit error, %d wrong; worst max|Δ| %.4f, worst relative L2 %.4f\n", who[i], np,
               t[i].same, steps + 1, t[i].close, t[i].bad, t[i].max_err, t[i].max_rel);
        CHECK_MSG(t[i].bad == 0, "%s: greedy decode diverged beyond the logit error", who[i]);
        CHECK_MSG(t[i].same >= (steps + 1) / 2, "%s: only %d of %d greedy steps identical", who[i],
                  t[i].same, steps + 1);
    }
    free(lc);
    free(lg[0]);
    free(lg[1]);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    uint64_t rng = 0xf0f0;
    static const int64_t shp[7][2] = {{NH * HD, HID}, {NKV * HD, HID}, {NKV * HD, HID},
                                      {HID, NH * HD}, {FF, HID}, {FF, HID}, {HID, FF}};
    static qlr_nf4 host[NL][7];
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < 7; i++) {
            int64_t n = shp[i][0] * shp[i][1];
            float *w = malloc((size_t)n * 4);
            for (int64_t j = 0; j < n; j++) w[j] = 0.04f * test_rng_normal(&rng);
            CHECK_OK(qlr_nf4_quantize(w, shp[i][0], shp[i][1], 1, &host[l][i]));
            free(w);
        }
    uint16_t *emb = malloc((size_t)VOCAB * HID * 2);
    for (int64_t j = 0; j < (int64_t)VOCAB * HID; j++)
        emb[j] = qlr_f32_to_bf16(0.1f * test_rng_normal(&rng));
    float *norms = malloc((size_t)(2 * NL + 1) * HID * 4), inv[HD / 2];
    for (int64_t j = 0; j < (2 * NL + 1) * HID; j++) norms[j] = 1.0f + 0.1f * test_rng_normal(&rng);
    for (int j = 0; j < HD / 2; j++) inv[j] = powf(100000.0f, -2.0f * j / HD);
    static fmodel mc, mo, md;
    build(&mc, g_cpu, host, emb, norms, inv);
    build(&mo, g_gpu, host, emb, norms, inv);
    build(&md, g_gpu, host, emb, norms, inv);
    md.fresh = 1;
    fmodel *mg[2] = {&mo, &md};
    static const char *const who[2] = {"ours", "cudnn"};
    CHECK_MSG(g_gpu->ops.attention_fresh != NULL, "the CUDA backend has no attention_fresh op "
              "(QLR_CUDA_SDPA=0 in the environment?)");

    int32_t prompt[7] = {1, 17, 300, 4095, 2, 999, 42};
    run_case(&mc, mg, who, prompt, 7, 32, 0);
    CHECK_MSG(md.fresh_ok == 0, "attention_fresh was called for a 7-token prefill");

    /* a fresh prefill above 64 tokens: attention_fresh on the GPU (cuDNN SDPA) */
    int32_t *longp = malloc(MAXN * 4);
    for (int i = 0; i < MAXN; i++) longp[i] = (int32_t)(test_rng_u64(&rng) % VOCAB);
    md.snap = 1;
    run_case(&mc, mg, who, longp, MAXN, 16, 1);
    printf("  attention_fresh on the GPU: %d layer calls served, %d refused%s%s\n", md.fresh_ok,
           md.fresh_refused, md.fresh_refused ? ": " : "", md.why);
    CHECK_MSG(md.fresh_refused == 0 && md.fresh_ok == NL,
              "attention_fresh served %d of %d layers of the %d-token prefill (refused: %s)",
              md.fresh_ok, NL, MAXN, md.fresh_refused ? md.why : "-");
    /* the caches now also hold the decode steps; rows 0..MAXN-1 are still the prompt's */
    if (md.fresh_ok == NL) probe_attention(&md, MAXN);
    free(longp);
    destroy(&mc);
    destroy(&mo);
    destroy(&md);
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < 7; i++) qlr_nf4_free(&host[l][i]);
    free(emb);
    free(norms);
    gh_done();
    return test_finish();
}
