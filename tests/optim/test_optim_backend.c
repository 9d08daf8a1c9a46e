/* tests/optim/test_optim_backend.c: optim/ on a backend (the CPU backend here; the CUDA ops are
 * checked against the CPU ops in tests/gpu/test_cuda_optim.c). States made with
 * qlr_adamw_state_create and stepped by qlr_adamw_update must give the bits of the host path
 * (qlr_adamw_state_init + qlr_adamw_step) for every kind, over several steps, with and without
 * weight decay, gnorm_scale != 1 and non-finite gradients; qlr_adamw_states_save must write the
 * bytes of qlr_adamw_states_write and qlr_adamw_states_load read them back (same checks and
 * messages as qlr_adamw_states_read, the states untouched when refused); qlr_grad_clip must
 * give qlr_clip_grad_norm's norm and scaled gradients bit for bit (clip, no clip, measure only,
 * NaN, Inf, empty tensors, more chunks than one parallel group). Also the CPU ops themselves:
 * sum_squares adds to the accumulator in chunk order, scale_f32, f32_to_act. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "optim/optim.h"
#include "tests/test_util.h"

static qlr_backend *be;
static uint64_t rng = 0x0b7;

static float *dev_copy(const float *x, int64_t n) {
    float *d = be->mem.alloc(be, (size_t)(n ? n : 1) * 4);
    QLR_ASSERT(d);
    QLR_ASSERT(be->mem.h2d(be, d, x, (size_t)n * 4) == QLR_OK);
    return d;
}

/* 1 when the device array equals the host one byte for byte */
static int dev_same(const void *dev, const void *host, size_t bytes) {
    if (!bytes) return 1;
    unsigned char *h = malloc(bytes);
    QLR_ASSERT(be->mem.d2h(be, h, dev, bytes) == QLR_OK && be->mem.sync(be) == QLR_OK);
    int same = memcmp(h, host, bytes) == 0;
    free(h);
    return same;
}

static int state_same(const qlr_adamw_state *d, const qlr_adamw_state *h) {
    if (d->n != h->n || d->step != h->step || d->kind != h->kind || d->n_blocks != h->n_blocks) return 0;
    if (d->kind == QLR_ADAMW_KIND_BNB8)
        return dev_same(d->code1, h->code1, (size_t)h->n) && dev_same(d->code2, h->code2, (size_t)h->n) &&
               dev_same(d->absmax1, h->absmax1, (size_t)h->n_blocks * 4) &&
               dev_same(d->absmax2, h->absmax2, (size_t)h->n_blocks * 4);
    return dev_same(d->m, h->m, (size_t)h->n * 4) && dev_same(d->v, h->v, (size_t)h->n * 4);
}

static void randn(float *x, int64_t n, float scale) {
    for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * scale;
}

/* ------------------------------------------------------------------ state + update */

static void test_create(void) {
    qlr_adamw_state s;
    memset(&s, 0, sizeof s);
    qlr_adamw_state_destroy(be, &s); /* zeroed struct: a no-op */
    CHECK_OK(qlr_adamw_state_create(be, &s, 4095, 1));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_BNB32);
    CHECK(s.m && s.v && !s.code1 && !s.absmax1);
    float *zero = calloc(4096, 4);
    CHECK(dev_same(s.m, zero, 4095 * 4) && dev_same(s.v, zero, 4095 * 4));
    qlr_adamw_state_destroy(be, &s);
    CHECK(s.m == NULL && s.n == 0);
    CHECK_OK(qlr_adamw_state_create(be, &s, 4096 + 1, 1));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_BNB8);
    CHECK_EQ_INT(s.n_blocks, 17);
    CHECK(s.code1 && s.code2 && s.absmax1 && s.absmax2 && !s.m);
    CHECK(dev_same(s.code1, zero, 4097) && dev_same(s.code2, zero, 4097));
    CHECK(dev_same(s.absmax1, zero, 17 * 4) && dev_same(s.absmax2, zero, 17 * 4));
    qlr_adamw_state_destroy(be, &s);
    CHECK_OK(qlr_adamw_state_create(be, &s, 100000, 0));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_TORCH32);
    qlr_adamw_state_destroy(be, &s);
    CHECK_OK(qlr_adamw_state_create(be, &s, 0, 1));
    CHECK_EQ_INT(s.kind, QLR_ADAMW_KIND_BNB32);
    qlr_adamw_state_destroy(be, &s);
    CHECK(qlr_adamw_state_create(be, &s, -1, 1) == QLR_ERR_INVALID);
    free(zero);
}

/* n elements, use_8bit, `steps` updates through both paths; every array compared after each */
static void check_update(int64_t n, int use_8bit, float wd, float gnorm_scale, int with_nonfinite) {
    qlr_adamw_state h, d;
    CHECK_OK(qlr_adamw_state_init(&h, n, use_8bit));
    CHECK_OK(qlr_adamw_state_create(be, &d, n, use_8bit));
    float *p = malloc((size_t)(n ? n : 1) * 4), *g = malloc((size_t)(n ? n : 1) * 4);
    randn(p, n, 1.0f);
    float *pd = dev_copy(p, n), *gd = be->mem.alloc(be, (size_t)(n ? n : 1) * 4);
    QLR_ASSERT(gd);
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    hp.weight_decay = wd;
    hp.gnorm_scale = gnorm_scale;
    int all_same = 1;
    for (int t = 1; t <= 5; t++) {
        randn(g, n, t == 2 ? 1e-6f : 0.05f);
        if (with_nonfinite && t >= 2 && n > 300) {
            g[7] = NAN;
            g[300] = INFINITY;
            g[n - 1] = -INFINITY;
        }
        hp.lr = 1e-3f * (float)t; /* a schedule: the lr changes every step */
        CHECK_OK(be->mem.h2d(be, gd, g, (size_t)n * 4));
        CHECK_OK(qlr_adamw_step(&h, p, g, &hp));
        CHECK_OK(qlr_adamw_update(be, &d, pd, gd, &hp));
        all_same &= state_same(&d, &h) && dev_same(pd, p, (size_t)n * 4);
    }
    CHECK_MSG(all_same, "n=%lld 8bit=%d wd=%g gnorm_scale=%g: qlr_adamw_update differs from "
              "qlr_adamw_step", (long long)n, use_8bit, wd, gnorm_scale);
    CHECK_EQ_INT(d.step, 5);
    qlr_adamw_state_free(&h);
    qlr_adamw_state_destroy(be, &d);
    be->mem.free(be, pd);
    be->mem.free(be, gd);
    free(p);
    free(g);
}

static void test_update(void) {
    int64_t sizes[] = {1, 255, 4095, 4096, 9216 + 77, 100003};
    for (int i = 0; i < 6; i++)
        for (int use8 = 0; use8 <= 1; use8++) {
            check_update(sizes[i], use8, 0.0f, 1.0f, 0);
            check_update(sizes[i], use8, 0.01f, 0.5f, 1);
        }
    /* an unknown kind is refused before the step counter moves; a backend without the op says so */
    qlr_adamw_state s;
    CHECK_OK(qlr_adamw_state_create(be, &s, 10, 0));
    float *p = calloc(10, 4), *g = calloc(10, 4);
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    s.kind = 7;
    CHECK(qlr_adamw_update(be, &s, p, g, &hp) == QLR_ERR_INVALID);
    CHECK_EQ_INT(s.step, 0);
    s.kind = QLR_ADAMW_KIND_TORCH32;
    qlr_backend bare = *be;
    bare.ops.adamw_step = NULL;
    CHECK(qlr_adamw_update(&bare, &s, p, g, &hp) == QLR_ERR_UNSUPPORTED);
    CHECK_EQ_INT(s.step, 0);
    CHECK_OK(qlr_adamw_update(be, &s, p, g, &hp));
    CHECK_EQ_INT(s.step, 1);
    qlr_adamw_state_destroy(be, &s);
    free(p);
    free(g);
}

/* ------------------------------------------------------------------ save / load */

static void test_save_load(void) {
    enum { T = 4 };
    int64_t ns[T] = {5000, 1000, 777, 0};
    int use8[T] = {1, 1, 0, 1};
    qlr_adamw_state h[T], d[T], d2[T];
    float *p[T], *g[T], *pd[T], *gd[T];
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    for (int t = 0; t < T; t++) {
        CHECK_OK(qlr_adamw_state_init(&h[t], ns[t], use8[t]));
        CHECK_OK(qlr_adamw_state_create(be, &d[t], ns[t], use8[t]));
        CHECK_OK(qlr_adamw_state_create(be, &d2[t], ns[t], use8[t]));
        p[t] = malloc((size_t)(ns[t] + 1) * 4);
        g[t] = malloc((size_t)(ns[t] + 1) * 4);
        randn(p[t], ns[t], 1.0f);
        pd[t] = dev_copy(p[t], ns[t]);
        gd[t] = dev_copy(p[t], ns[t]);
    }
    for (int step = 0; step < 2; step++)
        for (int t = 0; t < T; t++) {
            randn(g[t], ns[t], 0.1f);
            CHECK_OK(be->mem.h2d(be, gd[t], g[t], (size_t)ns[t] * 4));
            CHECK_OK(qlr_adamw_step(&h[t], p[t], g[t], &hp));
            CHECK_OK(qlr_adamw_update(be, &d[t], pd[t], gd[t], &hp));
        }
    size_t size = qlr_adamw_states_size(d, T), w1 = 0, w2 = 0;
    CHECK_EQ_INT(size, qlr_adamw_states_size(h, T));
    uint8_t *ref = malloc(size), *got = malloc(size);
    CHECK_OK(qlr_adamw_states_write(h, T, ref, size, &w1));
    memset(got, 0xA5, size);
    CHECK(qlr_adamw_states_save(be, d, T, got, size - 1, &w2) == QLR_ERR_RANGE);
    CHECK_EQ_INT(w2, 0);
    CHECK_OK(qlr_adamw_states_save(be, d, T, got, size, &w2));
    CHECK_EQ_INT(w2, size);
    CHECK_MSG(memcmp(ref, got, size) == 0, "qlr_adamw_states_save bytes differ from qlr_adamw_states_write");

    /* load into fresh device states: saving them again gives the same bytes, and both paths
     * continue with the same bits */
    CHECK_OK(qlr_adamw_states_load(be, d2, T, got, size, "test"));
    CHECK_EQ_INT(d2[0].step, 2);
    memset(got, 0, size);
    CHECK_OK(qlr_adamw_states_save(be, d2, T, got, size, &w2));
    CHECK(memcmp(ref, got, size) == 0);
    int same = 1;
    for (int step = 0; step < 3; step++)
        for (int t = 0; t < T; t++) {
            randn(g[t], ns[t], 0.1f);
            CHECK_OK(be->mem.h2d(be, gd[t], g[t], (size_t)ns[t] * 4));
            CHECK_OK(qlr_adamw_step(&h[t], p[t], g[t], &hp));
            CHECK_OK(qlr_adamw_update(be, &d2[t], pd[t], gd[t], &hp));
            same &= state_same(&d2[t], &h[t]) && dev_same(pd[t], p[t], (size_t)ns[t] * 4);
        }
    CHECK_MSG(same, "the loaded device states diverged from the host states");

    /* refusals: the status and the message of qlr_adamw_states_read, the states untouched */
    CHECK_OK(qlr_adamw_states_save(be, d2, T, got, size, &w2));
    uint8_t *bad = malloc(size);
    struct { const char *name; size_t len; int flip; } cases[] = {
        {"truncated", size - 7, -1}, {"crc", size, (int)(size / 2)}, {"short", 12, -1},
    };
    for (int c = 0; c < 3; c++) {
        memcpy(bad, ref, size);
        if (cases[c].flip >= 0) bad[cases[c].flip] ^= 0x40;
        qlr_status sr = qlr_adamw_states_read(h, T, bad, cases[c].len, "ckpt/optimizer.bin");
        char msg_read[512];
        snprintf(msg_read, sizeof msg_read, "%s", qlr_error_msg());
        qlr_status sl = qlr_adamw_states_load(be, d2, T, bad, cases[c].len, "ckpt/optimizer.bin");
        CHECK_MSG(sr == QLR_ERR_FORMAT && sl == sr, "%s: read %d, load %d", cases[c].name, sr, sl);
        CHECK_MSG(strcmp(msg_read, qlr_error_msg()) == 0, "%s: '%s' vs '%s'", cases[c].name, msg_read,
                  qlr_error_msg());
    }
    qlr_adamw_state other[T];
    for (int t = 0; t < T; t++) CHECK_OK(qlr_adamw_state_create(be, &other[t], ns[t], use8[t]));
    qlr_adamw_state_destroy(be, &other[2]);
    CHECK_OK(qlr_adamw_state_create(be, &other[2], 778, 0)); /* tensor 2 of another model */
    CHECK(qlr_adamw_states_load(be, other, T, got, size, "ckpt/optimizer.bin") == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "ckpt/optimizer.bin: tensor 2") != NULL);
    /* validation comes first: tensors 0 and 1 were not overwritten */
    CHECK_EQ_INT(other[0].step, 0);
    uint8_t *zero = calloc(5000, 1);
    CHECK(dev_same(other[0].code1, zero, 5000));
    CHECK(qlr_adamw_states_load(be, other, T - 1, got, size, "x") == QLR_ERR_INVALID);
    for (int t = 0; t < T; t++) qlr_adamw_state_destroy(be, &other[t]);

    for (int t = 0; t < T; t++) {
        qlr_adamw_state_free(&h[t]);
        qlr_adamw_state_destroy(be, &d[t]);
        qlr_adamw_state_destroy(be, &d2[t]);
        be->mem.free(be, pd[t]);
        be->mem.free(be, gd[t]);
        free(p[t]);
        free(g[t]);
    }
    free(ref);
    free(got);
    free(bad);
    free(zero);
}

/* ------------------------------------------------------------------ clipping */

/* qlr_grad_clip on device copies vs qlr_clip_grad_norm on host copies of the same tensors */
static void check_clip(const char *what, float **x, const int64_t *ns, int nt, float max_norm) {
    float **h = malloc(sizeof(float *) * nt), **d = malloc(sizeof(float *) * nt);
    for (int t = 0; t < nt; t++) {
        h[t] = malloc((size_t)(ns[t] + 1) * 4);
        memcpy(h[t], x[t], (size_t)ns[t] * 4);
        d[t] = dev_copy(x[t], ns[t]);
    }
    double *acc = be->mem.alloc(be, sizeof(double));
    QLR_ASSERT(acc);
    double junk = 123.0; /* qlr_grad_clip zeroes the accumulator itself */
    QLR_ASSERT(be->mem.h2d(be, acc, &junk, sizeof junk) == QLR_OK);
    int bad_h = -1, bad_d = -1;
    float norm_h = qlr_clip_grad_norm(h, ns, nt, max_norm, &bad_h), norm_d = -1.0f;
    CHECK_OK(qlr_grad_clip(be, d, ns, nt, max_norm, acc, &norm_d, &bad_d));
    CHECK_MSG(memcmp(&norm_h, &norm_d, 4) == 0, "%s: norm %.9g vs %.9g", what, norm_h, norm_d);
    CHECK_EQ_INT(bad_d, bad_h);
    int same = 1;
    for (int t = 0; t < nt; t++) same &= dev_same(d[t], h[t], (size_t)ns[t] * 4);
    CHECK_MSG(same, "%s: scaled gradients differ", what);
    /* nonfinite may be NULL */
    CHECK_OK(qlr_grad_clip(be, d, ns, nt, 0.0f, acc, &norm_d, NULL));
    for (int t = 0; t < nt; t++) {
        free(h[t]);
        be->mem.free(be, d[t]);
    }
    be->mem.free(be, acc);
    free(h);
    free(d);
}

static void test_clip(void) {
    /* more than 256 chunks in one tensor (the CPU op forms partials 256 at a time), odd tails,
     * an empty tensor in the list */
    int64_t ns[4] = {256 * QLR_SUMSQ_CHUNK + 4097, 17, 0, 100003};
    float *x[4];
    for (int t = 0; t < 4; t++) {
        x[t] = malloc((size_t)(ns[t] + 1) * 4);
        randn(x[t], ns[t], 1e-3f * (float)(t + 1));
    }
    double ss = 0.0;
    for (int t = 0; t < 4; t++)
        for (int64_t i = 0; i < ns[t]; i++) ss += (double)x[t][i] * x[t][i];
    float norm = (float)sqrt(ss);
    printf("clip: norm %.6g over %lld values\n", norm, (long long)(ns[0] + ns[1] + ns[3]));
    check_clip("clip", x, ns, 4, norm * 0.3f);
    check_clip("no clip", x, ns, 4, norm * 3.0f);
    check_clip("measure only", x, ns, 4, 0.0f);
    check_clip("no tensors", x, ns, 0, 1.0f);
    x[3][5] = NAN;
    check_clip("nan", x, ns, 4, 1.0f);
    x[3][5] = -INFINITY;
    check_clip("inf", x, ns, 4, 1.0f);
    x[3][5] = 3e30f; /* squares beyond float32, fine in f64 */
    check_clip("huge", x, ns, 4, 1.0f);
    qlr_backend bare = *be;
    bare.ops.sum_squares = NULL;
    float nm;
    CHECK(qlr_grad_clip(&bare, x, ns, 4, 1.0f, NULL, &nm, NULL) == QLR_ERR_UNSUPPORTED);
    for (int t = 0; t < 4; t++) free(x[t]);
}

/* ------------------------------------------------------------------ the CPU ops */

static void test_cpu_ops(void) {
    /* sum_squares adds to acc: partials of 16384 values, in chunk order */
    int64_t n = 3 * QLR_SUMSQ_CHUNK + 11;
    float *x = malloc((size_t)n * 4);
    randn(x, n, 2.0f);
    double want = 1.5;
    for (int64_t c0 = 0; c0 < n; c0 += QLR_SUMSQ_CHUNK) {
        double s = 0.0;
        for (int64_t i = c0; i < n && i < c0 + QLR_SUMSQ_CHUNK; i++) s += (double)x[i] * (double)x[i];
        want += s;
    }
    double acc = 1.5;
    CHECK_OK(be->ops.sum_squares(be, &acc, x, n));
    CHECK(memcmp(&acc, &want, 8) == 0);
    CHECK_OK(be->ops.sum_squares(be, &acc, x, 0));
    CHECK(memcmp(&acc, &want, 8) == 0);
    /* scale_f32: x[i] * s, rounded once */
    float *y = malloc((size_t)n * 4);
    memcpy(y, x, (size_t)n * 4);
    CHECK_OK(be->ops.scale_f32(be, y, 0.3f, n));
    int ok = 1;
    for (int64_t i = 0; i < n; i++) {
        float w = x[i] * 0.3f;
        ok &= memcmp(&w, &y[i], 4) == 0;
    }
    CHECK(ok);
    /* f32_to_act: act is f32 on the CPU, a copy (also in place) */
    CHECK_EQ_INT(be->act_dtype, QLR_F32);
    float *z = malloc((size_t)n * 4);
    CHECK_OK(be->ops.f32_to_act(be, z, x, n));
    CHECK(memcmp(z, x, (size_t)n * 4) == 0);
    CHECK_OK(be->ops.f32_to_act(be, z, z, n));
    CHECK(memcmp(z, x, (size_t)n * 4) == 0);
    /* adamw_step: an unknown kind is an error, n = 0 a no-op */
    qlr_adamw_hparams hp = qlr_adamw_default_hparams();
    CHECK(be->ops.adamw_step(be, 3, x, x, y, z, NULL, NULL, 4, &hp, 1) == QLR_ERR_INVALID);
    CHECK_OK(be->ops.adamw_step(be, QLR_ADAMW_KIND_BNB8, x, x, NULL, NULL, NULL, NULL, 0, &hp, 1));
    free(x);
    free(y);
    free(z);
}

int main(void) {
    CHECK_OK(qlr_backend_cpu_create(0, &be));
    if (!be) return test_finish();
    test_create();
    test_update();
    test_save_load();
    test_clip();
    test_cpu_ops();
    qlr_backend_free(be);
    return test_finish();
}
