/* tests/model/test_grad_ops.c (label grad): central finite differences of every backward op
 * of the CPU backend, each through the same harness: a scalar L = Σ r·op(inputs) with random
 * r (or the op's own loss for lm_head_ce), perturbed input by input in f32 (h = 1e-2 for
 * linear ops, 5e-3 otherwise; L summed in double), against the op's analytic gradient.
 * Ops: rmsnorm_bwd, rope_bwd, swiglu_bwd, attention_bwd + kv_store_bwd, attention_varlen_bwd,
 * nf4_linear_dx, lora_bwd (dA, dB, dX), lm_head_ce (dX, with an ignored row), dropout. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "quant/nf4.h"
#include "tests/test_util.h"

static qlr_backend *be;
static uint64_t g_rng = 3;

static float *rnd(int64_t n, float s) {
    float *p = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) p[i] = test_rng_normal(&g_rng) * s;
    return p;
}
static double dot(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

typedef double (*loss_fn)(void *ud);

/* Perturbs x[j] (up to 40 sampled entries) and compares (L(x+h) - L(x-h)) / 2h with g[j]. */
static void fd_check(const char *name, float *x, int64_t n, const float *g, loss_fn L, void *ud,
                     float h) {
    double gmax = 0, worst = 0;
    for (int64_t j = 0; j < n; j++) gmax = fmax(gmax, fabs(g[j]));
    int bad = 0;
    for (int e = 0; e < 40; e++) {
        int64_t j = n <= 40 ? e : (int64_t)(test_rng_u64(&g_rng) % (uint64_t)n);
        if (j >= n) break;
        float keep = x[j], xp = keep + h, xm = keep - h;
        x[j] = xp;
        double lp = L(ud);
        x[j] = xm;
        double lm = L(ud);
        x[j] = keep;
        double fd = (lp - lm) / ((double)xp - xm);
        double err = fabs(fd - g[j]) / (fabs(fd) + 1e-2 * gmax + 1e-9);
        worst = fmax(worst, err);
        bad += err > 5e-3;
    }
    printf("%-28s worst relative error %.2e (max |g| %.3g)\n", name, worst, gmax);
    /* f32 op outputs summed in double: rounding ~1e-7 of L over 2h, truncation ~h²; 0.5% */
    CHECK_MSG(bad == 0 && gmax > 0, "%s: %d entries off by more than 0.5%% (worst %.3g)", name,
              bad, worst);
}

/* ---- elementwise / row ops ---- */

enum { N = 5, DD = 32, NH = 4, NKV = 2, HD = 8 };
static float *X, *X2, *Rv, *Y, *W, *INV;
static int32_t POS[N] = {0, 1, 2, 0, 7}, SEQ[N] = {0, 0, 0, 1, 1}, START[N] = {0, 0, 0, 3, 3};

static double l_rms(void *ud) {
    CHECK_OK(be->ops.rmsnorm(be, Y, X, W, N, DD, 1e-5f));
    return dot(Y, Rv, N * DD);
}
static double l_rope(void *ud) {
    memcpy(Y, X, N * NH * HD * 4);
    CHECK_OK(be->ops.rope(be, Y, POS, INV, N, NH, HD));
    return dot(Y, Rv, N * NH * HD);
}
static double l_swiglu(void *ud) {
    CHECK_OK(be->ops.swiglu(be, Y, X, X2, N * DD));
    return dot(Y, Rv, N * DD);
}
static double l_dropout(void *ud) {
    CHECK_OK(be->ops.dropout(be, Y, X, N * DD, 0.4f, 77));
    return dot(Y, Rv, N * DD);
}

static void test_rowwise(void) {
    X = rnd(N * DD * 4, 1.0f), X2 = rnd(N * DD, 1.0f), Rv = rnd(N * DD * 4, 1.0f);
    Y = malloc(N * DD * 16), W = rnd(DD, 0.3f), INV = malloc(HD / 2 * 4);
    for (int i = 0; i < DD; i++) W[i] += 1.0f;
    for (int j = 0; j < HD / 2; j++) INV[j] = powf(10000.0f, -2.0f * j / HD);
    float *g = malloc(N * DD * 16), *g2 = malloc(N * DD * 16);
    CHECK_OK(be->ops.rmsnorm_bwd(be, g, Rv, X, W, N, DD, 1e-5f));
    fd_check("rmsnorm_bwd", X, N * DD, g, l_rms, NULL, 5e-3f);
    memcpy(g, Rv, N * NH * HD * 4);
    CHECK_OK(be->ops.rope_bwd(be, g, POS, INV, N, NH, HD));
    fd_check("rope_bwd", X, N * NH * HD, g, l_rope, NULL, 1e-2f);
    CHECK_OK(be->ops.swiglu_bwd(be, g, g2, Rv, X, X2, N * DD));
    fd_check("swiglu_bwd dgate", X, N * DD, g, l_swiglu, NULL, 5e-3f);
    fd_check("swiglu_bwd dup", X2, N * DD, g2, l_swiglu, NULL, 1e-2f);
    CHECK_OK(be->ops.dropout(be, g, Rv, N * DD, 0.4f, 77)); /* its backward: the same mask */
    fd_check("dropout", X, N * DD, g, l_dropout, NULL, 1e-2f);
    free(g), free(g2);
}

/* ---- attention ---- */

enum { CTX = 8, NQ = N * NH * HD, NK = N * NKV * HD, CSZ = 2 * CTX * NKV * HD };
static float *Q, *K, *V, *KC, *VC, *O;

static double l_att_cache(void *ud) {
    memset(KC, 0, CSZ * 4), memset(VC, 0, CSZ * 4);
    CHECK_OK(be->ops.kv_store(be, KC, VC, K, V, SEQ, POS, N, NKV, HD, CTX));
    CHECK_OK(be->ops.attention(be, O, Q, KC, VC, SEQ, POS, N, NH, NKV, HD, CTX, 0.35f));
    return dot(O, Rv, NQ);
}
static double l_att_varlen(void *ud) {
    CHECK_OK(be->ops.attention_varlen(be, O, NULL, Q, K, V, START, N, NH, NKV, HD, 0.35f));
    return dot(O, Rv, NQ);
}

static void test_attention(void) {
    /* cache attention needs every row below a token's position written: positions 0..2 of
     * sequence 0 and rows 0..1 of sequence 1 (pos 0 and 1 here) */
    POS[4] = 1;
    Q = rnd(NQ, 1.0f), K = rnd(NK, 1.0f), V = rnd(NK, 1.0f), KC = malloc(CSZ * 4),
    VC = malloc(CSZ * 4), O = malloc(NQ * 4);
    float *dq = malloc(NQ * 4), *dkc = calloc(CSZ, 4), *dvc = calloc(CSZ, 4), *dk = malloc(NK * 4),
          *dv = malloc(NK * 4);
    l_att_cache(NULL);
    CHECK_OK(be->ops.attention_bwd(be, dq, dkc, dvc, Rv, Q, KC, VC, O, NULL, SEQ, POS, N, NH, NKV,
                                   HD, CTX, 0.35f));
    CHECK_OK(be->ops.kv_store_bwd(be, dk, dv, dkc, dvc, SEQ, POS, N, NKV, HD, CTX));
    fd_check("attention_bwd dq", Q, NQ, dq, l_att_cache, NULL, 5e-3f);
    fd_check("attention_bwd+kv_store_bwd dk", K, NK, dk, l_att_cache, NULL, 5e-3f);
    fd_check("attention_bwd+kv_store_bwd dv", V, NK, dv, l_att_cache, NULL, 1e-2f);
    float *lse = malloc(N * NH * 4);
    CHECK_OK(be->ops.attention_varlen(be, O, lse, Q, K, V, START, N, NH, NKV, HD, 0.35f));
    CHECK_OK(be->ops.attention_varlen_bwd(be, dq, dk, dv, Rv, Q, K, V, O, lse, START, N, NH, NKV,
                                          HD, 0.35f));
    fd_check("attention_varlen_bwd dq", Q, NQ, dq, l_att_varlen, NULL, 5e-3f);
    fd_check("attention_varlen_bwd dk", K, NK, dk, l_att_varlen, NULL, 5e-3f);
    fd_check("attention_varlen_bwd dv", V, NK, dv, l_att_varlen, NULL, 1e-2f);
    /* varlen == cache attention on the same tokens (same causal sets) */
    float *o2 = malloc(NQ * 4);
    l_att_cache(NULL);
    memcpy(o2, O, NQ * 4);
    l_att_varlen(NULL);
    double md = 0;
    for (int i = 0; i < NQ; i++) md = fmax(md, fabs(O[i] - o2[i]));
    CHECK_MSG(md < 1e-6, "varlen vs cache attention differ by %g", md);
    free(o2), free(lse), free(dq), free(dkc), free(dvc), free(dk), free(dv);
    free(Q), free(K), free(V), free(KC), free(VC), free(O);
}

/* ---- linears ---- */

enum { IN = 128, OUT = 48, RK = 3, VOC = 40 };
static qlr_nf4 WQ;
static qlr_lora_ref LR;
static uint16_t *WB;
static int32_t TG[N] = {3, -100, 39, 0, 17};
static float *LOSS, *LOGITS;

static double l_nf4(void *ud) {
    CHECK_OK(be->ops.nf4_linear(be, Y, X, &WQ, NULL, N));
    return dot(Y, Rv, N * OUT);
}
static double l_lora(void *ud) {
    memset(Y, 0, N * OUT * 4);
    CHECK_OK(be->ops.lora(be, Y, X, &LR, N, IN, OUT));
    return dot(Y, Rv, N * OUT);
}
static double l_ce(void *ud) {
    CHECK_OK(be->ops.lm_head_ce(be, LOSS, NULL, LOGITS, X, WB, TG, N, DD, VOC, 1.0f));
    double s = 0;
    for (int i = 0; i < N; i++) s += 0.5 * LOSS[i];
    return s;
}

static void test_linears(void) {
    free(X), free(Rv), free(Y);
    X = rnd(N * IN, 1.0f), Rv = rnd(N * IN, 1.0f), Y = malloc(N * IN * 4);
    float *w = rnd(OUT * IN, 0.2f), *g = malloc(N * IN * 4);
    qlr_nf4 host;
    CHECK_OK(qlr_nf4_quantize(w, OUT, IN, 1, &host));
    CHECK_OK(qlr_backend_nf4_upload(be, &host, &WQ, 0));
    CHECK_OK(be->ops.nf4_linear_dx(be, g, Rv, &WQ, N));
    fd_check("nf4_linear_dx", X, N * IN, g, l_nf4, NULL, 1e-2f);

    float *a = rnd(RK * IN, 0.3f), *b = rnd(OUT * RK, 0.3f);
    float *da = calloc(RK * IN, 4), *db = calloc(OUT * RK, 4);
    LR = (qlr_lora_ref){a, b, RK, 1.5f};
    memset(g, 0, N * IN * 4);
    CHECK_OK(be->ops.lora_bwd(be, da, db, g, Rv, X, &LR, N, IN, OUT));
    fd_check("lora_bwd dX", X, N * IN, g, l_lora, NULL, 1e-2f);
    fd_check("lora_bwd dA", a, RK * IN, da, l_lora, NULL, 1e-2f);
    fd_check("lora_bwd dB", b, OUT * RK, db, l_lora, NULL, 1e-2f);

    /* lm_head_ce: L = 0.5 · Σ loss (grad_scale 0.5), row 1 ignored (its dX must be 0) */
    float *wf = rnd(VOC * DD, 0.5f);
    WB = malloc(VOC * DD * 2);
    for (int i = 0; i < VOC * DD; i++) WB[i] = qlr_f32_to_bf16(wf[i]);
    LOSS = malloc(N * 4), LOGITS = malloc(N * VOC * 4);
    float *x = rnd(N * DD, 1.0f);
    memcpy(X, x, N * DD * 4);
    CHECK_OK(be->ops.lm_head_ce(be, LOSS, g, LOGITS, X, WB, TG, N, DD, VOC, 0.5f));
    CHECK(LOSS[1] == 0.0f);
    int zero = 1;
    for (int j = 0; j < DD; j++) zero &= g[DD + j] == 0.0f;
    CHECK_MSG(zero, "lm_head_ce: the ignored row has a gradient");
    fd_check("lm_head_ce dX", X, N * DD, g, l_ce, NULL, 5e-3f);
    /* the loss against float64 (fd_check left LOSS at a perturbed x: recompute) */
    l_ce(NULL);
    for (int i = 0; i < N; i++) {
        if (TG[i] < 0) continue;
        double z[VOC], mx = -INFINITY, s = 0;
        for (int v = 0; v < VOC; v++) {
            z[v] = 0;
            for (int j = 0; j < DD; j++) z[v] += (double)X[i * DD + j] * qlr_bf16_to_f32(WB[v * DD + j]);
            mx = fmax(mx, z[v]);
        }
        for (int v = 0; v < VOC; v++) s += exp(z[v] - mx);
        CHECK_NEAR(LOSS[i], mx + log(s) - z[TG[i]], 1e-5, 1e-5);
    }
    free(wf), free(x), free(a), free(b), free(da), free(db), free(w), free(g);
    qlr_backend_nf4_free(be, &WQ);
    qlr_nf4_free(&host);
}

int main(void) {
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    test_rowwise();
    test_attention();
    test_linears();
    free(X), free(X2), free(Rv), free(Y), free(W), free(INV), free(WB), free(LOSS), free(LOGITS);
    qlr_backend_free(be);
    return test_finish();
}
