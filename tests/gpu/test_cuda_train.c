/* tests/gpu/test_cuda_train.c: the CUDA training ops other than attention against the CPU
 * reference (backend/cpu): the LoRA backward (ranks 1, 8, 16, 64, in != out, dX and dA / dB
 * present or NULL, accumulation into non-zero gradients). Guard bytes around every output. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0x7a11;

static float *randv(int64_t n, float s) {
    float *x = malloc((size_t)(n ? n : 1) * 4);
    gh_randn_bf16(x, n, s, &rng);
    return x;
}

/* Root mean square of a - b (n values). */
static double rms_diff(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return n ? sqrt(s / n) : 0.0;
}

/* ---- lora_bwd ---- */

/* Compares the increments (after - before) of an accumulated output: the GPU's u and g are
 * bf16 (lora_bwd.cu), 2^-9 relative per element, independent over the n (or r) terms of each
 * sum, so the error is ~2^-9 of the increment's RMS: bound the RMS error by 2^-7 of it and every
 * element by 2^-5 of it plus 2^-8 of its value (bf16 storage of dx). */
static void cmp_increment(const char *what, const float *got, const float *ref, const float *init,
                          int64_t n) {
    float *gi = malloc((size_t)n * 4), *ri = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) {
        gi[i] = got[i] - init[i];
        ri[i] = ref[i] - init[i];
    }
    double r = gh_rms(ri, n);
    CHECK_MSG(r > 0, "%s: the reference increment is zero (test inputs)", what);
    gh_compare(what, got, ref, n, r * 0x1p-5, 0x1p-8);
    double e = rms_diff(gi, ri, n);
    CHECK_MSG(e <= r * 0x1p-7, "%s: rms error of the increment %.3g over 2^-7 of its rms %.3g",
              what, e, r);
    free(gi);
    free(ri);
}

/* what_null: 0 all outputs, 1 dx NULL, 2 dA and dB NULL (dx only). */
static void test_lora_bwd(int64_t n, int64_t in, int64_t out, int32_t r, int what_null) {
    float *x = randv(n * in, 1.0f), *dy = randv(n * out, 1.0f);
    float *a = randv((int64_t)r * in, 0.05f), *b = randv(out * (int64_t)r, 0.05f);
    float *da0 = randv((int64_t)r * in, 0.01f), *db0 = randv(out * (int64_t)r, 0.01f);
    /* dx0 small next to the increment, so that its bf16 rounding stays below the bound */
    float *dx0 = randv(n * in, 0.05f);
    int with_dx = what_null != 1, with_w = what_null != 2;
    float *da[2], *db[2], *dx[2];
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        da[k] = malloc((size_t)(r * in) * 4);
        db[k] = malloc((size_t)(out * r) * 4);
        dx[k] = malloc((size_t)(n * in) * 4);
        gh_buf bx = gh_act(be, x, n * in), bdy = gh_act(be, dy, n * out);
        gh_buf ba = gh_act(be, a, (int64_t)r * in), bb = gh_act(be, b, out * (int64_t)r);
        gh_buf bda = gh_raw(be, da0, (size_t)(r * in) * 4);
        gh_buf bdb = gh_raw(be, db0, (size_t)(out * r) * 4);
        gh_buf bdx = gh_act(be, dx0, n * in);
        qlr_lora_ref l = {ba.p, bb.p, r, 2.0f};
        CHECK_OK(be->ops.lora_bwd(be, with_w ? bda.p : NULL, with_w ? bdb.p : NULL,
                                  with_dx ? bdx.p : NULL, bdy.p, bx.p, &l, n, in, out));
        CHECK_OK(be->mem.d2h(be, da[k], bda.p, (size_t)(r * in) * 4));
        CHECK_OK(be->mem.d2h(be, db[k], bdb.p, (size_t)(out * r) * 4));
        CHECK_OK(be->mem.sync(be));
        gh_read_act(be, bdx.p, dx[k], n * in);
        gh_free_checked(be, &bda, "lora_bwd dA");
        gh_free_checked(be, &bdb, "lora_bwd dB");
        gh_free_checked(be, &bdx, "lora_bwd dx");
        gh_free_checked(be, &bx, "x");
        gh_free_checked(be, &bdy, "dy");
        gh_free_checked(be, &ba, "a");
        gh_free_checked(be, &bb, "b");
    }
    char what[128];
    const char *tag = what_null == 1 ? " (dx NULL)" : what_null == 2 ? " (dA, dB NULL)" : "";
    if (with_w) {
        snprintf(what, sizeof what, "lora_bwd dA n=%lld in=%lld out=%lld r=%d%s", (long long)n,
                 (long long)in, (long long)out, r, tag);
        cmp_increment(what, da[1], da[0], da0, (int64_t)r * in);
        snprintf(what, sizeof what, "lora_bwd dB n=%lld in=%lld out=%lld r=%d%s", (long long)n,
                 (long long)in, (long long)out, r, tag);
        cmp_increment(what, db[1], db[0], db0, out * (int64_t)r);
    } else {
        /* NULL gradients: nothing to write (the device buffers were passed as NULL) */
        CHECK(memcmp(da[1], da0, (size_t)(r * in) * 4) == 0);
        CHECK(memcmp(db[1], db0, (size_t)(out * r) * 4) == 0);
    }
    if (with_dx) {
        snprintf(what, sizeof what, "lora_bwd dx n=%lld in=%lld out=%lld r=%d%s", (long long)n,
                 (long long)in, (long long)out, r, tag);
        /* dx0 went through bf16 on both sides (gh_act), so init is exact for both */
        cmp_increment(what, dx[1], dx[0], dx0, n * in);
    } else {
        /* dx NULL: the buffer keeps its initial values (bf16-rounded dx0 on both sides) */
        CHECK(memcmp(dx[1], dx0, (size_t)(n * in) * 4) == 0);
    }
    for (int k = 0; k < 2; k++) {
        free(da[k]);
        free(db[k]);
        free(dx[k]);
    }
    free(x); free(dy); free(a); free(b); free(da0); free(db0); free(dx0);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    /* lora_bwd: ranks 1, 8, 16, 64; in != out; dx and the weight gradients NULL or not */
    test_lora_bwd(1, 576, 192, 1, 0);
    test_lora_bwd(37, 576, 192, 1, 1);
    test_lora_bwd(128, 576, 1536, 8, 0);
    test_lora_bwd(300, 960, 320, 16, 1);
    test_lora_bwd(64, 2048, 576, 64, 0);
    test_lora_bwd(65, 576, 2048, 64, 2);
    test_lora_bwd(513, 4096, 1024, 16, 0);
    gh_done();
    return test_finish();
}
