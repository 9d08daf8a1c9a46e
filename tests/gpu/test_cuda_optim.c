/* tests/gpu/test_cuda_optim.c: the CUDA optimizer ops against the CPU ops (backend/cpu/
 * ops_optim.c), through the op table only (so it builds with core + quant + backend):
 *  - adamw_step, every kind, BIT FOR BIT (parameters, moments, 8-bit codes and block absmax):
 *    sizes 1 .. 100003 (partial 8-bit blocks), five steps in a row carrying the state, a new lr
 *    every step, weight decay on/off, gnorm_scale != 1, a random initial 8-bit state, and in the
 *    8-bit kind gradients with NaN/Inf elements, all-zero and all-non-finite blocks. The 32-bit
 *    kinds with non-finite gradients are compared with NaN == NaN whatever the payload (x86 and
 *    CUDA make different NaN bits; the finite elements must still match bit for bit);
 *  - sum_squares within the written bound below (exact for exactly summable data; NaN/Inf kept);
 *  - scale_f32 bit for bit (denormal results included);
 *  - f32_to_act bit for bit against qlr_f32_to_bf16 (NaN payloads and signs, Inf, denormals,
 *    exact ties, overflow to Inf, 2^24 random bit patterns).
 * Every device output sits between guard bytes. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0x0a3;

static const char *kind_name(int kind) {
    return kind == QLR_ADAMW_KIND_BNB8 ? "bnb8" : kind == QLR_ADAMW_KIND_BNB32 ? "bnb32" : "torch32";
}

static void d2h_sync(qlr_backend *be, void *dst, const void *src, size_t bytes) {
    QLR_ASSERT(be->mem.d2h(be, dst, src, bytes) == QLR_OK);
    QLR_ASSERT(be->mem.sync(be) == QLR_OK);
}

/* Bytes of `got` against `ref`; with nan_eq, two f32 NaNs count as equal. Returns the number of
 * differing elements and prints the first. */
static int64_t diff_bytes(const char *what, const void *got, const void *ref, int64_t n, int elem,
                          int nan_eq) {
    const unsigned char *a = got, *b = ref;
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        if (memcmp(a + i * elem, b + i * elem, (size_t)elem) == 0) continue;
        if (elem == 4 && nan_eq) {
            float x, y;
            memcpy(&x, a + i * 4, 4);
            memcpy(&y, b + i * 4, 4);
            if (isnan(x) && isnan(y)) continue;
        }
        if (bad == 0) {
            if (elem == 4) {
                uint32_t x, y;
                float fx, fy;
                memcpy(&x, a + i * 4, 4);
                memcpy(&y, b + i * 4, 4);
                memcpy(&fx, &x, 4);
                memcpy(&fy, &y, 4);
                fprintf(stderr, "  %s [%lld]: cuda %.9g (0x%08x), cpu %.9g (0x%08x)\n", what,
                        (long long)i, fx, x, fy, y);
            } else {
                fprintf(stderr, "  %s [%lld]: cuda %u, cpu %u\n", what, (long long)i, a[i], b[i]);
            }
        }
        bad++;
    }
    return bad;
}

/* ------------------------------------------------------------------ adamw_step */

typedef struct adamw_case {
    int kind;
    int64_t n;
    float wd, gnorm_scale;
    int nonfinite;      /* NaN/Inf gradient elements from step 2 */
    int random_state;   /* bnb8: start from random codes and absmax instead of zeros */
} adamw_case;

static void gen_grad(float *g, int64_t n, int t, const adamw_case *c) {
    for (int64_t i = 0; i < n; i++) {
        /* magnitudes over 1e-9 .. 1, exact zeros and negative zeros now and then */
        float mag = powf(10.0f, -9.0f * test_rng_uniform(&rng));
        g[i] = test_rng_normal(&rng) * mag;
        uint64_t r = test_rng_u64(&rng) % 97;
        if (r == 0) g[i] = 0.0f;
        if (r == 1) g[i] = -0.0f;
    }
    if (c->kind == QLR_ADAMW_KIND_BNB8 && n > 600) {
        for (int64_t i = 256; i < 512; i++) g[i] = 0.0f; /* an all-zero block (0/0 in requantize) */
        if (t == 4) g[256] = -0.0f;
    }
    if (c->nonfinite && t >= 2) {
        g[0] = NAN;
        if (n > 3) g[3] = INFINITY;
        if (n > 1) g[n - 1] = -INFINITY;
        if (n > 300) g[300] = -NAN;
        if (c->kind == QLR_ADAMW_KIND_BNB8 && n > 1100)
            for (int64_t i = 768; i < 1024; i++) g[i] = (i & 1) ? NAN : INFINITY; /* a whole block */
    }
}

static void run_adamw(const adamw_case *c) {
    const int is8 = c->kind == QLR_ADAMW_KIND_BNB8;
    const int64_t n = c->n, nb = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
    const size_t sbytes = is8 ? (size_t)n : (size_t)n * 4, abytes = (size_t)nb * 4;
    float *p0 = malloc((size_t)n * 4), *g = malloc((size_t)n * 4);
    unsigned char *s0 = calloc(sbytes, 1);
    float *a0 = calloc((size_t)nb, 4);
    for (int64_t i = 0; i < n; i++) p0[i] = test_rng_normal(&rng);
    if (is8 && c->random_state) {
        for (size_t i = 0; i < sbytes; i++) s0[i] = (unsigned char)test_rng_u64(&rng);
        for (int64_t b = 0; b < nb; b++) a0[b] = fabsf(test_rng_normal(&rng)) * 1e-2f;
        s0[0] = 0;
        s0[n - 1] = 255;
        a0[0] = 0.0f; /* a block whose old scale is 0 */
    }
    /* [0] cpu, [1] cuda: p, g, s1, s2, absmax1, absmax2 */
    gh_buf bp[2], bg[2], b1[2], b2[2], ba1[2], ba2[2];
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        bp[k] = gh_raw(be, p0, (size_t)n * 4);
        bg[k] = gh_alloc(be, (size_t)n * 4);
        b1[k] = gh_raw(be, s0, sbytes);
        b2[k] = gh_raw(be, s0, sbytes);
        ba1[k] = is8 ? gh_raw(be, a0, abytes) : (gh_buf){0};
        ba2[k] = is8 ? gh_raw(be, a0, abytes) : (gh_buf){0};
    }
    unsigned char *ref = malloc((size_t)n * 4), *got = malloc((size_t)n * 4);
    char what[128];
    snprintf(what, sizeof what, "adamw %s n=%lld wd=%g gs=%g%s%s", kind_name(c->kind), (long long)n,
             c->wd, c->gnorm_scale, c->nonfinite ? " nonfinite" : "", c->random_state ? " rstate" : "");
    /* NaN bits differ between x86 and CUDA (see optim.cu): the 32-bit kinds with non-finite
     * gradients compare NaN == NaN; the 8-bit kind never makes a NaN (its guard) */
    const int nan_eq = c->nonfinite && !is8;
    int64_t bad = 0;
    for (int t = 1; t <= 5; t++) {
        gen_grad(g, n, t, c);
        qlr_adamw_hparams hp = {.lr = 1e-3f * (float)t, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                                .weight_decay = c->wd, .gnorm_scale = c->gnorm_scale};
        for (int k = 0; k < 2; k++) {
            qlr_backend *be = k ? g_gpu : g_cpu;
            CHECK_OK(be->mem.h2d(be, bg[k].p, g, (size_t)n * 4));
            CHECK_OK(be->ops.adamw_step(be, c->kind, bp[k].p, bg[k].p, b1[k].p, b2[k].p, ba1[k].p,
                                        ba2[k].p, n, &hp, t));
        }
        char w2[160];
        struct { gh_buf *b; size_t bytes; int elem; const char *name; } arr[5] = {
            {bp, (size_t)n * 4, 4, "p"}, {b1, sbytes, is8 ? 1 : 4, is8 ? "code1" : "m"},
            {b2, sbytes, is8 ? 1 : 4, is8 ? "code2" : "v"}, {ba1, abytes, 4, "absmax1"},
            {ba2, abytes, 4, "absmax2"}};
        for (int a = 0; a < (is8 ? 5 : 3); a++) {
            d2h_sync(g_cpu, ref, arr[a].b[0].p, arr[a].bytes);
            d2h_sync(g_gpu, got, arr[a].b[1].p, arr[a].bytes);
            snprintf(w2, sizeof w2, "%s t=%d %s", what, t, arr[a].name);
            int64_t d = diff_bytes(w2, got, ref, (int64_t)(arr[a].bytes / arr[a].elem), arr[a].elem, nan_eq);
            CHECK_MSG(d == 0, "%s: %lld elements differ", w2, (long long)d);
            bad += d;
        }
    }
    printf("  %-64s %s\n", what, bad ? "FAIL" : "bitwise ok");
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_free_checked(be, &bp[k], "adamw p");
        gh_free_checked(be, &bg[k], "adamw g");
        gh_free_checked(be, &b1[k], "adamw s1");
        gh_free_checked(be, &b2[k], "adamw s2");
        gh_free_checked(be, &ba1[k], "adamw absmax1");
        gh_free_checked(be, &ba2[k], "adamw absmax2");
    }
    free(p0); free(g); free(s0); free(a0); free(ref); free(got);
}

static void test_adamw(void) {
    const int64_t sizes[] = {1, 255, 256, 257, 4095, 4096, 9216, 100003};
    const int kinds[] = {QLR_ADAMW_KIND_TORCH32, QLR_ADAMW_KIND_BNB32, QLR_ADAMW_KIND_BNB8};
    for (int ki = 0; ki < 3; ki++)
        for (int si = 0; si < 8; si++) {
            adamw_case c = {.kind = kinds[ki], .n = sizes[si], .wd = 0.0f, .gnorm_scale = 1.0f};
            run_adamw(&c);
            c.wd = 0.01f;
            c.gnorm_scale = 0.37f;
            run_adamw(&c);
            c.nonfinite = 1;
            run_adamw(&c);
            if (kinds[ki] == QLR_ADAMW_KIND_BNB8) {
                c.random_state = 1;
                c.gnorm_scale = 3.0f;
                run_adamw(&c);
            }
        }
    /* an unknown kind is refused, n = 0 writes nothing */
    qlr_adamw_hparams hp = {1e-3f, 0.9f, 0.999f, 1e-8f, 0.0f, 1.0f};
    CHECK(g_gpu->ops.adamw_step(g_gpu, 5, NULL, NULL, NULL, NULL, NULL, NULL, 4, &hp, 1) ==
          QLR_ERR_INVALID);
    gh_buf z = gh_alloc(g_gpu, 0);
    CHECK_OK(g_gpu->ops.adamw_step(g_gpu, QLR_ADAMW_KIND_BNB8, z.p, z.p, z.p, z.p, z.p, z.p, 0, &hp, 1));
    gh_free_checked(g_gpu, &z, "adamw n=0");
}

/* ------------------------------------------------------------------ sum_squares */

/* Tolerance: every term x² of an f32 x is exact in f64 (48 significant bits) and >= 0, so the
 * CPU's chunked sum and the GPU's tree sum are both within (n - 1)·2⁻⁵³·S of the exact S
 * (the recursive-summation bound for non-negative terms, which the tree also meets). Their
 * difference is therefore at most 2·n·2⁻⁵³·S; the start value acc0 adds one more rounding. */
static void check_sumsq(const char *what, const float *x, int64_t n, double acc0, int exact) {
    double acc[2];
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_raw(be, x, (size_t)n * 4), ba = gh_raw(be, &acc0, sizeof acc0);
        CHECK_OK(be->ops.sum_squares(be, ba.p, bx.p, n));
        d2h_sync(be, &acc[k], ba.p, sizeof(double));
        gh_free_checked(be, &bx, "sumsq x");
        gh_free_checked(be, &ba, "sumsq acc");
    }
    double cpu = acc[0], gpu = acc[1];
    double tol = exact ? 0.0 : 2.0 * ((double)n + 1.0) * 0x1p-53 * fabs(cpu);
    int ok = (isnan(cpu) && isnan(gpu)) || (isinf(cpu) && gpu == cpu) || fabs(gpu - cpu) <= tol;
    printf("  %-40s n=%-9lld cpu %.17g gpu %.17g rel %.3g (tol %.3g) %s\n", what, (long long)n, cpu,
           gpu, cpu != 0 ? fabs(gpu - cpu) / fabs(cpu) : fabs(gpu), cpu != 0 ? tol / fabs(cpu) : tol,
           ok ? "ok" : "FAIL");
    CHECK_MSG(ok, "sum_squares %s n=%lld: gpu %.17g, cpu %.17g", what, (long long)n, gpu, cpu);
}

static void test_sum_squares(void) {
    const int64_t sizes[] = {1, 255, QLR_SUMSQ_CHUNK, QLR_SUMSQ_CHUNK + 1, 100003,
                             3 * QLR_SUMSQ_CHUNK + 7, 300 * (int64_t)QLR_SUMSQ_CHUNK + 5};
    int64_t nmax = sizes[6];
    float *x = malloc((size_t)nmax * 4);
    for (int si = 0; si < 7; si++) {
        int64_t n = sizes[si];
        for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * powf(10.0f, -4.0f * test_rng_uniform(&rng));
        check_sumsq("random", x, n, 0.0, 0);
        check_sumsq("random, acc0 = 0.25", x, n, 0.25, 0);
        /* small integers: every partial sum is an exact integer, so any order gives the same */
        for (int64_t i = 0; i < n; i++) x[i] = (float)((int)(test_rng_u64(&rng) % 7) - 3);
        check_sumsq("integers", x, n, 2.0, 1);
    }
    int64_t n = 100003;
    for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&rng);
    x[5] = 3e30f; /* a square beyond f32, fine in f64 */
    check_sumsq("huge element", x, n, 0.0, 0);
    x[70000] = INFINITY;
    check_sumsq("inf", x, n, 0.0, 0);
    x[17] = NAN;
    check_sumsq("nan", x, n, 0.0, 0);
    check_sumsq("n = 0", x, 0, 1.5, 1);
    free(x);
}

/* ------------------------------------------------------------------ scale_f32, f32_to_act */

static void test_scale(int64_t n, float s) {
    float *x = malloc((size_t)n * 4), *ref = malloc((size_t)n * 4), *got = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * powf(10.0f, 30.0f - 70.0f * test_rng_uniform(&rng));
    if (n > 8) {
        x[0] = 0.0f;
        x[1] = -0.0f;
        x[2] = INFINITY;
        x[3] = -INFINITY;
        x[4] = 1e-45f;   /* denormal */
        x[5] = -3e-39f;  /* denormal */
        x[6] = 3.4e38f;  /* overflows when s > 1 */
    }
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf b = gh_raw(be, x, (size_t)n * 4);
        CHECK_OK(be->ops.scale_f32(be, b.p, s, n));
        d2h_sync(be, k ? got : ref, b.p, (size_t)n * 4);
        gh_free_checked(be, &b, "scale_f32");
    }
    char what[64];
    snprintf(what, sizeof what, "scale_f32 n=%lld s=%g", (long long)n, s);
    int64_t d = diff_bytes(what, got, ref, n, 4, 0);
    printf("  %-64s %s\n", what, d ? "FAIL" : "bitwise ok");
    CHECK_MSG(d == 0, "%s: %lld elements differ", what, (long long)d);
    free(x); free(ref); free(got);
}

static void test_f32_to_act(void) {
    const uint32_t special[] = {
        0x00000000, 0x80000000, 0x7f800000, 0xff800000,             /* ±0, ±Inf */
        0x7fc00000, 0xffc00000, 0x7fc00001, 0x7f800001, 0xff800001, /* quiet / signalling NaNs */
        0x7fbfffff, 0x7fffffff, 0xffffffff, 0x7f80ffff, 0x7f810000,
        0x00000001, 0x80000001, 0x007fffff, 0x00008000, 0x00018000, /* denormals, denormal ties */
        0x3f808000, 0x3f818000, 0x3f80807f, 0x3f808001, 0xbf808000, /* ties to even, near ties */
        0x7f7fffff, 0xff7fffff, 0x7f7f8000, 0x7f7f7fff,             /* rounding up to Inf */
        0x3f800000, 0x40490fdb, 0x00800000, 0x0080ffff};
    const int64_t ns = (int64_t)(sizeof special / sizeof special[0]);
    const int64_t n = ns + (1 << 24) + 5;
    uint32_t *x = malloc((size_t)n * 4);
    memcpy(x, special, sizeof special);
    for (int64_t i = ns; i < n; i++) x[i] = (uint32_t)test_rng_u64(&rng);
    uint16_t *ref = malloc((size_t)n * 2), *got = malloc((size_t)n * 2);
    for (int64_t i = 0; i < n; i++) {
        float f;
        memcpy(&f, &x[i], 4);
        ref[i] = qlr_f32_to_bf16(f);
    }
    CHECK_EQ_INT(g_gpu->act_dtype, QLR_BF16);
    gh_buf src = gh_raw(g_gpu, x, (size_t)n * 4), dst = gh_alloc(g_gpu, (size_t)n * 2);
    CHECK_OK(g_gpu->ops.f32_to_act(g_gpu, dst.p, src.p, n));
    d2h_sync(g_gpu, got, dst.p, (size_t)n * 2);
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++)
        if (got[i] != ref[i]) {
            if (bad++ < 5)
                fprintf(stderr, "  f32_to_act [%lld] 0x%08x: cuda 0x%04x, qlr_f32_to_bf16 0x%04x\n",
                        (long long)i, x[i], got[i], ref[i]);
        }
    printf("  %-64s %s\n", "f32_to_act (specials + 2^24 random bit patterns)", bad ? "FAIL" : "bitwise ok");
    CHECK_MSG(bad == 0, "f32_to_act: %lld of %lld values differ", (long long)bad, (long long)n);
    gh_free_checked(g_gpu, &dst, "f32_to_act dst");
    /* a short odd length: no write past the end */
    dst = gh_alloc(g_gpu, 3 * 2);
    CHECK_OK(g_gpu->ops.f32_to_act(g_gpu, dst.p, src.p, 3));
    d2h_sync(g_gpu, got, dst.p, 3 * 2);
    CHECK(got[0] == ref[0] && got[1] == ref[1] && got[2] == ref[2]);
    gh_free_checked(g_gpu, &dst, "f32_to_act dst n=3");
    gh_free_checked(g_gpu, &src, "f32_to_act src");
    free(x); free(ref); free(got);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    test_adamw();
    test_sum_squares();
    test_scale(1, 0.5f);
    test_scale(1000003, 0.3f);
    test_scale(4097, 1e-20f);  /* denormal results */
    test_scale(4097, 7.0f);    /* overflow to Inf */
    test_f32_to_act();
    gh_done();
    return test_finish();
}
