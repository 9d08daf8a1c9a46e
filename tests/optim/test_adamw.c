/* tests/optim/test_adamw.c: AdamW (8-bit blockwise as bitsandbytes, bnb 32-bit, PyTorch
 * 32-bit). The 8-bit step is compared with tests/data/optim/adamw8bit_ref.bin, written by
 * tests/tools/adamw8bit_ref.py from the spec text alone (with bitsandbytes' measured maps,
 * tests/data/quant/bnb_dynmap.txt); the rest are checks computed by hand
 * here: one-element steps, bias correction at t = 1, weight-decay order, the 4096 threshold,
 * the state1 sign fix, non-finite gradients, all-zero blocks, serialization round trips and a
 * least-squares problem that 8-bit AdamW must solve about as well as 32-bit AdamW. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "optim/optim.h"
#include "quant/nf4.h"
#include "tests/test_util.h"

static const float *Q1 = qlr_dynmap_signed, *Q2 = qlr_dynmap_unsigned;

/* ------------------------------------------------------------------ the reference file */

/* the generator of adamw8bit_ref.py (its docstring), reproduced */
static uint64_t lcg_s;
static uint64_t lcg_next(void) {
    lcg_s = lcg_s * 6364136223846793005ull + 1442695040888963407ull;
    return lcg_s >> 33;
}

static void make_input(int n, int steps, float *p0, float *grads /* [steps][n] */) {
    lcg_s = 12345;
    for (int i = 0; i < n; i++) p0[i] = ldexpf((float)((int64_t)(lcg_next() % (1u << 21)) - (1 << 20)), -20);
    for (int t = 1; t <= steps; t++) {
        float *g = grads + (size_t)(t - 1) * n;
        for (int i = 0; i < n; i++) {
            int64_t mant = (int64_t)(lcg_next() % (1u << 16)) - (1 << 15);
            int e = (int)(lcg_next() % 25);
            g[i] = ldexpf((float)mant, -15 - e);
        }
        if (t == 2) { g[7] = NAN; g[300] = INFINITY; g[4999] = -INFINITY; }
        if (t == 3) g[301] = NAN;
    }
}

static uint32_t rd_u32(const uint8_t *p) { uint32_t x; memcpy(&x, p, 4); return x; }

static void test_reference_file(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/optim/adamw8bit_ref.bin", QLR_TEST_DATA);
    char *data = NULL;
    size_t len = 0;
    qlr_status st = qlr_file_read_all(path, 1 << 24, &data, &len);
    CHECK_MSG(st == QLR_OK, "cannot read %s (regenerate with tests/tools/adamw8bit_ref.py): %s", path,
              qlr_error_msg());
    if (st != QLR_OK) return;
    const uint8_t *b = (const uint8_t *)data;
    CHECK(len > 36 && memcmp(b, "QLRA8REF", 8) == 0);
    int n = (int)rd_u32(b + 12), steps = (int)rd_u32(b + 16), nb = (n + 255) / 256;
    CHECK_EQ_INT(rd_u32(b + 8), 1);
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    memcpy(&hp.lr, b + 20, 4);
    memcpy(&hp.beta1, b + 24, 4);
    memcpy(&hp.beta2, b + 28, 4);
    memcpy(&hp.eps, b + 32, 4);
    memcpy(&hp.weight_decay, b + 36, 4);
    size_t off = 40;
    /* the maps the script read from tests/data/quant/bnb_dynmap.txt must be our tables, bit for bit */
    CHECK(memcmp(b + off, Q1, 1024) == 0);
    CHECK(memcmp(b + off + 1024, Q2, 1024) == 0);
    off += 2048;
    size_t per_step = (size_t)n * 3 + (size_t)nb * 8 + (size_t)n * 4;
    CHECK_EQ_INT(len, off + per_step * steps);
    if (len != off + per_step * steps) { free(data); return; }

    float *p = malloc(sizeof(float) * n), *grads = malloc(sizeof(float) * n * steps);
    make_input(n, steps, p, grads);
    qlr_adamw_state s;
    CHECK_OK(qlr_adamw_state_init(&s, n, 1));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_BNB8);
    int code_mismatch = 0, tie_mismatch = 0, absmax_mismatch = 0, param_bad = 0;
    double max_dp = 0.0;
    for (int t = 1; t <= steps; t++) {
        CHECK_OK(qlr_adamw_step(&s, p, grads + (size_t)(t - 1) * n, &hp));
        const uint8_t *c1 = b + off, *c2 = c1 + n, *tie = c2 + n;
        const uint8_t *a1 = tie + n, *a2 = a1 + 4 * nb, *pr = a2 + 4 * nb;
        for (int i = 0; i < n; i++) {
            int bad1 = s.code1[i] != c1[i], bad2 = s.code2[i] != c2[i];
            if ((bad1 && !(tie[i] & 1)) || (bad2 && !(tie[i] & 2))) {
                if (code_mismatch < 5)
                    fprintf(stderr, "step %d elem %d: codes (%d,%d), reference (%d,%d)\n", t, i,
                            s.code1[i], s.code2[i], c1[i], c2[i]);
                code_mismatch++;
            } else if (bad1 || bad2) {
                tie_mismatch++;
            }
            float pref;
            memcpy(&pref, pr + 4 * i, 4);
            double d = fabs((double)p[i] - (double)pref);
            if (d > max_dp) max_dp = d;
            if (d > 2.4e-7 + 5e-7 * fabs(pref)) {
                if (param_bad < 5) fprintf(stderr, "step %d elem %d: p %.9g, reference %.9g\n", t, i, p[i], pref);
                param_bad++;
            }
        }
        for (int k = 0; k < nb; k++) {
            float r1, r2;
            memcpy(&r1, a1 + 4 * k, 4);
            memcpy(&r2, a2 + 4 * k, 4);
            if (r1 != s.absmax1[k] || r2 != s.absmax2[k]) absmax_mismatch++;
        }
        off += per_step;
    }
    /* Codes and absmax are decided by the same float32 operations in both (IEEE, correctly
     * rounded, no FMA), so they must agree exactly; only a value exactly on a midpoint may be
     * rounded differently (the script flags those: 0 in the committed file). Params: same
     * float32 operations too, but the script's b^t is the correctly rounded power and ours is
     * libm's powf, which may be 1 ulp off; that changes step_size and c2*eps by ~1e-7 relative.
     * Updates reach ~2.5 here (a v that quantizes to code 0 leaves m / (c2*eps), as in bnb), so
     * the bound is 4 float32 ulps of the parameter: 2.4e-7 + 5e-7 * |p|. */
    CHECK_EQ_INT(code_mismatch, 0);
    CHECK_EQ_INT(absmax_mismatch, 0);
    CHECK_EQ_INT(param_bad, 0);
    printf("reference: %d elements x %d steps, %d code mismatches at near ties, max |dp| = %.3g\n", n,
           steps, tie_mismatch, max_dp);
    qlr_adamw_state_free(&s);
    free(p);
    free(grads);
    free(data);
}

/* ------------------------------------------------------------------ the code search */

static void test_quantize_code(void) {
    /* map entries map to themselves; random values agree with plain nearest except on exact
     * midpoints (where bnb's search may pick the upper index) */
    for (int k = 0; k < 256; k++) {
        CHECK_EQ_INT(qlr_adamw8_quantize_code(Q1, 1, Q1[k]), k);
        CHECK_EQ_INT(qlr_adamw8_quantize_code(Q2, 0, Q2[k]), k);
    }
    uint64_t rng = 7;
    int diff = 0;
    for (int i = 0; i < 200000; i++) {
        float x = (test_rng_uniform(&rng) * 2.0f - 1.0f) * powf(10.0f, -7.0f * test_rng_uniform(&rng));
        if (qlr_adamw8_quantize_code(Q1, 1, x) != qlr_dynmap_nearest(Q1, x)) diff++;
        float y = fabsf(x);
        if (qlr_adamw8_quantize_code(Q2, 0, y) != qlr_dynmap_nearest(Q2, y)) diff++;
    }
    CHECK_EQ_INT(diff, 0);
    CHECK_EQ_INT(qlr_adamw8_quantize_code(Q1, 1, -1.0f), 0);
    CHECK_EQ_INT(qlr_adamw8_quantize_code(Q1, 1, 1.0f), 255);
    CHECK_EQ_INT(qlr_adamw8_quantize_code(Q1, 1, NAN), 0);
    /* an exact midpoint: the search ends on the upper entry when it approaches from above */
    int ties_up = 0;
    for (int k = 0; k < 255; k++) {
        float mid = (Q1[k] + Q1[k + 1]) * 0.5f;
        int c = qlr_adamw8_quantize_code(Q1, 1, mid);
        CHECK(c == k || c == k + 1);
        ties_up += c == k + 1;
    }
    printf("quantize_code: exact signed-map midpoints resolved upward: %d of 255\n", ties_up);
}

/* ------------------------------------------------------------------ hand-computed steps */

static void test_one_element(void) {
    qlr_adamw_hparams hp = {.lr = 0.1f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                            .weight_decay = 0.0f, .gnorm_scale = 1.0f};
    /* t = 1, p = 0.5, g = 0.2: m = 0.02, v = 4e-5, m_hat = 0.2, v_hat = 0.04,
     * p = 0.5 - 0.1 * 0.2 / (0.2 + 1e-8) = 0.400000005 */
    float p = 0.5f, g = 0.2f, m = 0.0f, v = 0.0f;
    qlr_adamw32_torch_step(&p, &g, &m, &v, 1, &hp, 1);
    CHECK_NEAR(m, 0.02, 0, 1e-6);  /* float32 0.1f*0.2f */
    CHECK_NEAR(v, 4e-5, 0, 2e-5);  /* float32 (1 - 0.999f) = 0.00099998713 */
    CHECK_NEAR(p, 0.400000005, 3e-8, 0);
    /* t = 2, g = -0.1: m = 0.018 - 0.01 = 0.008, v = 0.999*4e-5 + 1e-5 = 4.996e-5,
     * m_hat = 0.008/0.19 = 0.0421053, v_hat = 4.996e-5/0.001999 = 0.0249925,
     * p = 0.400000005 - 0.1 * 0.0421053 / (0.158090 + 1e-8) = 0.3733661 */
    g = -0.1f;
    qlr_adamw32_torch_step(&p, &g, &m, &v, 1, &hp, 2);
    double mh = 0.008 / 0.19, vh = 4.996e-5 / (1.0 - 0.999 * 0.999);
    CHECK_NEAR(p, 0.400000005 - 0.1 * mh / (sqrt(vh) + 1e-8), 1e-7, 0);
    CHECK_NEAR(p, 0.3733661, 1e-6, 0);

    /* the bnb 32-bit kernel computes the same numbers (eps scaled by c2 instead) */
    float pb = 0.5f, gb = 0.2f, mb = 0.0f, vb = 0.0f;
    qlr_adamw32_bnb_step(&pb, &gb, &mb, &vb, 1, &hp, 1);
    CHECK_NEAR(pb, 0.400000005, 3e-8, 0);
    gb = -0.1f;
    qlr_adamw32_bnb_step(&pb, &gb, &mb, &vb, 1, &hp, 2);
    CHECK_NEAR(pb, p, 1e-7, 0);

    /* bias correction at t = 1: the first update is -lr * sign(g) * |g|/(|g| + eps'), i.e.
     * lr whatever the gradient's size (here eps = 0 to make it exact) */
    hp.eps = 0.0f;
    float gs[3] = {3.0f, -1e-3f, 250.0f};
    for (int k = 0; k < 3; k++) {
        float pt = 1.0f, mt = 0, vt = 0, pbn = 1.0f, mbn = 0, vbn = 0;
        qlr_adamw32_torch_step(&pt, &gs[k], &mt, &vt, 1, &hp, 1);
        qlr_adamw32_bnb_step(&pbn, &gs[k], &mbn, &vbn, 1, &hp, 1);
        double want = 1.0 - 0.1 * (gs[k] > 0 ? 1.0 : -1.0);
        CHECK_NEAR(pt, want, 2e-7, 0);
        CHECK_NEAR(pbn, want, 2e-7, 0);
    }
}

static void test_weight_decay_order(void) {
    /* t = 1, eps = 0: the Adam part is exactly -lr*sign(g). With p = 1, lr = 0.1, wd = 0.5:
     *   PyTorch (decay first): p = 1*(1 - 0.05) - 0.1       = 0.85
     *   bnb     (decay after): p = (1 - 0.1)*(1 - 0.05)     = 0.855 */
    qlr_adamw_hparams hp = {.lr = 0.1f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 0.0f,
                            .weight_decay = 0.5f, .gnorm_scale = 1.0f};
    float g = 0.3f, p = 1.0f, m = 0, v = 0;
    qlr_adamw32_torch_step(&p, &g, &m, &v, 1, &hp, 1);
    CHECK_NEAR(p, 0.85, 2e-7, 0);
    p = 1.0f, m = 0, v = 0;
    qlr_adamw32_bnb_step(&p, &g, &m, &v, 1, &hp, 1);
    CHECK_NEAR(p, 0.855, 2e-7, 0);
    /* the 8-bit step: same order; at t = 1 the update uses the fresh m, v (not requantized) */
    int n = 4096;
    float *pp = malloc(4 * n), *gg = malloc(4 * n);
    for (int i = 0; i < n; i++) { pp[i] = 1.0f; gg[i] = (i % 2 ? 0.3f : -0.7f); }
    qlr_adamw_state s;
    CHECK_OK(qlr_adamw_state_init(&s, n, 1));
    CHECK_OK(qlr_adamw_step(&s, pp, gg, &hp));
    CHECK_NEAR(pp[1], 0.855, 2e-7, 0);
    CHECK_NEAR(pp[0], (1.0 + 0.1) * 0.95, 2e-7, 0);
    CHECK_EQ_INT(s.step, 1);
    qlr_adamw_state_free(&s);
    free(pp);
    free(gg);
}

static void test_threshold(void) {
    qlr_adamw_state s;
    CHECK_OK(qlr_adamw_state_init(&s, 4095, 1));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_BNB32);
    CHECK(s.m && s.v && !s.code1);
    qlr_adamw_state_free(&s);
    CHECK_OK(qlr_adamw_state_init(&s, 4096, 1));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_BNB8);
    CHECK_EQ_INT(s.n_blocks, 16);
    CHECK(s.code1 && s.code2 && s.absmax1 && s.absmax2 && !s.m);
    qlr_adamw_state_free(&s);
    CHECK_OK(qlr_adamw_state_init(&s, 4097, 1));
    CHECK_EQ_INT(s.n_blocks, 17);
    qlr_adamw_state_free(&s);
    CHECK_OK(qlr_adamw_state_init(&s, 100000, 0));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_TORCH32);
    qlr_adamw_state_free(&s);
    CHECK(qlr_adamw_state_init(&s, -1, 1) == QLR_ERR_INVALID);
}

/* ------------------------------------------------------------------ 8-bit special cases */

static void test_sign_fix_nonfinite_zero_block(void) {
    int n = 4096 + 256; /* 17 blocks */
    float *p = malloc(4 * n), *g = malloc(4 * n), *p0 = malloc(4 * n);
    for (int i = 0; i < n; i++) { p[i] = p0[i] = 0.25f; g[i] = 0.01f * (float)((i % 7) - 3); }
    g[0] = 1.0f;     /* block 0: absmax1 = 0.1 */
    g[1] = -1e-9f;   /* m = -1e-10: m/absmax = -1e-9, nearest code is 127 (+0) */
    g[2] = 1e-9f;    /* m = +1e-10: code 127, already the right sign */
    for (int i = 256; i < 512; i++) g[i] = 0.0f; /* block 1: all zero */
    qlr_adamw_hparams hp = {.lr = 0.01f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                            .weight_decay = 0.1f, .gnorm_scale = 1.0f};
    qlr_adamw_state s;
    CHECK_OK(qlr_adamw_state_init(&s, n, 1));
    CHECK_OK(qlr_adamw_step(&s, p, g, &hp));
    /* sign fix */
    CHECK_NEAR(s.absmax1[0], 0.1, 0, 1e-6);
    CHECK_EQ_INT(qlr_adamw8_quantize_code(Q1, 1, -1e-9f), 127);
    CHECK_EQ_INT(s.code1[1], 126);
    CHECK(Q1[s.code1[1]] < 0.0f);
    CHECK_EQ_INT(s.code1[2], 127);
    /* the all-zero block: absmax 0; bnb's kernel divides 0/0 = NaN, searches to code 0, and the
     * sign fix wraps it to 255 for m = +0; v gets code 0. Both decode to 0. Params only decay. */
    CHECK(s.absmax1[1] == 0.0f && s.absmax2[1] == 0.0f);
    int zero_ok = 1;
    for (int i = 256; i < 512; i++) {
        zero_ok &= s.code1[i] == 255 && s.code2[i] == 0;
        zero_ok &= p[i] == 0.25f * (1.0f - 0.01f * 0.1f);
    }
    CHECK(zero_ok);

    /* non-finite gradients: m = v = 0 there, the parameter untouched, others updated */
    float before5 = p[5], before600 = p[600], before9 = p[9];
    g[5] = NAN;
    g[600] = INFINITY;
    g[9] = -INFINITY;
    CHECK_OK(qlr_adamw_step(&s, p, g, &hp));
    CHECK(p[5] == before5 && p[600] == before600 && p[9] == before9);
    CHECK(p[4] != p0[4]);
    CHECK(Q1[s.code1[5]] * s.absmax1[0] == 0.0f && Q2[s.code2[5]] * s.absmax2[0] == 0.0f);
    CHECK(Q1[s.code1[600]] * s.absmax1[2] == 0.0f && Q2[s.code2[600]] * s.absmax2[2] == 0.0f);
    int finite = 1;
    for (int i = 0; i < n; i++) finite &= isfinite(p[i]);
    CHECK(finite);
    qlr_adamw_state_free(&s);
    free(p);
    free(g);
    free(p0);
}

/* ------------------------------------------------------------------ serialization */

static void fill(float *x, int n, uint64_t *rng, float scale) {
    for (int i = 0; i < n; i++) x[i] = test_rng_normal(rng) * scale;
}

static void test_serialize_continue(void) {
    enum { T = 3 };
    int64_t ns[T] = {5000, 1000, 777};
    int use8[T] = {1, 1, 0};
    qlr_adamw_state a[T], b[T];
    float *p[T], *q[T], *g[T];
    uint64_t rng = 99;
    for (int t = 0; t < T; t++) {
        CHECK_OK(qlr_adamw_state_init(&a[t], ns[t], use8[t]));
        p[t] = malloc(4 * ns[t]);
        q[t] = malloc(4 * ns[t]);
        g[t] = malloc(4 * ns[t]);
        fill(p[t], (int)ns[t], &rng, 1.0f);
    }
    CHECK_EQ_INT(a[0].kind, QLR_ADAMW_KIND_BNB8);
    CHECK_EQ_INT(a[1].kind, QLR_ADAMW_KIND_BNB32);
    CHECK_EQ_INT(a[2].kind, QLR_ADAMW_KIND_TORCH32);
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    for (int step = 0; step < 2; step++)
        for (int t = 0; t < T; t++) {
            fill(g[t], (int)ns[t], &rng, 0.1f);
            CHECK_OK(qlr_adamw_step(&a[t], p[t], g[t], &hp));
        }
    size_t size = qlr_adamw_states_size(a, T), written = 0;
    CHECK_EQ_INT(size, 20 + 3 * 24 + (5000 * 2 + 20 * 8) + 1000 * 8 + 777 * 8);
    uint8_t *buf = malloc(size);
    CHECK(qlr_adamw_states_write(a, T, buf, size - 1, &written) == QLR_ERR_RANGE);
    CHECK_OK(qlr_adamw_states_write(a, T, buf, size, &written));
    CHECK_EQ_INT(written, size);
    for (int t = 0; t < T; t++) {
        CHECK_OK(qlr_adamw_state_init(&b[t], ns[t], use8[t]));
        memcpy(q[t], p[t], 4 * ns[t]);
    }
    CHECK_OK(qlr_adamw_states_read(b, T, buf, size, "test"));
    CHECK_EQ_INT(b[0].step, 2);
    /* identical continuation: three more steps on both, same gradients, same bits */
    for (int step = 0; step < 3; step++)
        for (int t = 0; t < T; t++) {
            fill(g[t], (int)ns[t], &rng, 0.1f);
            CHECK_OK(qlr_adamw_step(&a[t], p[t], g[t], &hp));
            CHECK_OK(qlr_adamw_step(&b[t], q[t], g[t], &hp));
        }
    for (int t = 0; t < T; t++) CHECK_MSG(memcmp(p[t], q[t], 4 * ns[t]) == 0, "tensor %d diverged after resume", t);
    CHECK(memcmp(a[0].code1, b[0].code1, 5000) == 0 && memcmp(a[0].absmax2, b[0].absmax2, 80) == 0);

    /* bad inputs are refused with the right status; no truncation is ever accepted */
    int trunc_ok = 0;
    for (size_t L = 0; L < size; L += 97) trunc_ok += qlr_adamw_states_read(b, T, buf, L, "test") == QLR_OK;
    CHECK_EQ_INT(trunc_ok, 0);
    buf[size / 2] ^= 0x40;
    CHECK(qlr_adamw_states_read(b, T, buf, size, "test") == QLR_ERR_FORMAT);
    buf[size / 2] ^= 0x40;
    CHECK(qlr_adamw_states_read(b, T, buf, size - 7, "test") == QLR_ERR_FORMAT);
    CHECK(qlr_adamw_states_read(b, T - 1, buf, size, "test") == QLR_ERR_INVALID);
    qlr_adamw_state other;
    CHECK_OK(qlr_adamw_state_init(&other, 5001, 1));
    qlr_adamw_state swapped[T] = {other, b[1], b[2]};
    CHECK(qlr_adamw_states_read(swapped, T, buf, size, "ckpt/optimizer.bin") == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "tensor 0") != NULL);
    qlr_adamw_state_free(&other);
    memcpy(buf, "XXXXXXXX", 8);
    CHECK(qlr_adamw_states_read(b, T, buf, size, "test") == QLR_ERR_FORMAT);
    for (int t = 0; t < T; t++) {
        qlr_adamw_state_free(&a[t]);
        qlr_adamw_state_free(&b[t]);
        free(p[t]);
        free(q[t]);
        free(g[t]);
    }
    free(buf);
}

/* ------------------------------------------------------------------ convergence */

/* least squares: W [R, C] (R*C = 4096, so 8-bit states), loss = mean over N samples of
 * |W x - W* x|^2 / 2; returns the final loss after `steps` AdamW updates */
enum { LS_R = 32, LS_C = 128, LS_N = 96 };

static double ls_loss_grad(const float *w, const float *wstar, const float *x, float *grad) {
    double loss = 0.0;
    if (grad) memset(grad, 0, sizeof(float) * LS_R * LS_C);
    for (int s = 0; s < LS_N; s++) {
        const float *xs = x + s * LS_C;
        for (int r = 0; r < LS_R; r++) {
            double e = 0.0;
            for (int c = 0; c < LS_C; c++) e += (double)(w[r * LS_C + c] - wstar[r * LS_C + c]) * xs[c];
            loss += 0.5 * e * e / LS_N;
            if (grad)
                for (int c = 0; c < LS_C; c++) grad[r * LS_C + c] += (float)(e * xs[c] / LS_N);
        }
    }
    return loss;
}

static double ls_run(int use_8bit, int steps, double *loss0) {
    uint64_t rng = 2024;
    int n = LS_R * LS_C;
    float *w = calloc(n, 4), *wstar = malloc(4 * n), *x = malloc(4 * LS_N * LS_C), *g = malloc(4 * n);
    fill(wstar, n, &rng, 0.5f);
    fill(x, LS_N * LS_C, &rng, 1.0f);
    qlr_adamw_state s;
    CHECK_OK(qlr_adamw_state_init(&s, n, use_8bit));
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    hp.lr = 0.01f;
    hp.weight_decay = 0.0f;
    *loss0 = ls_loss_grad(w, wstar, x, NULL);
    for (int k = 0; k < steps; k++) {
        ls_loss_grad(w, wstar, x, g);
        CHECK_OK(qlr_adamw_step(&s, w, g, &hp));
    }
    double loss = ls_loss_grad(w, wstar, x, NULL);
    qlr_adamw_state_free(&s);
    free(w);
    free(wstar);
    free(x);
    free(g);
    return loss;
}

static void test_convergence(void) {
    double l0a, l0b;
    double l8 = ls_run(1, 300, &l0a), l32 = ls_run(0, 300, &l0b);
    printf("least squares: initial %.4g, 8-bit AdamW %.4g, 32-bit AdamW %.4g (ratio %.3f)\n", l0a, l8,
           l32, l8 / l32);
    /* both must drive the loss down by orders of magnitude, and 8-bit must land within a
     * factor 2 of 32-bit (quantization noise in m, v costs a little, not the solution) */
    CHECK(l8 < 1e-2 * l0a);
    CHECK(l32 < 1e-2 * l0b);
    CHECK(l8 < 2.0 * l32 + 1e-6 * l0a);
}

int main(void) {
    test_reference_file();
    test_quantize_code();
    test_one_element();
    test_weight_decay_order();
    test_threshold();
    test_sign_fix_nonfinite_zero_block();
    test_serialize_continue();
    test_convergence();
    return test_finish();
}
