/* tests/gpu/test_cuda_train.c: the CUDA training ops other than attention against the CPU
 * reference (backend/cpu): the fused lm_head + cross-entropy (vocab sizes that are multiples of
 * nothing, ignored targets, grad_scale, with and without dX), counter-based dropout (the mask bit
 * for bit, values = the bf16 rounding of the CPU's f32 result; odd n, in place) and the LoRA
 * backward (ranks 1, 8, 16, 64, in != out, dX and dA / dB present or NULL, accumulation into
 * non-zero gradients). Guard bytes around every output. Varlen attention has its own test
 * (test_cuda_varlen.c). */
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

/* ---- lm_head_ce ---- */

/* Targets: random ids, the first 0 and the last vocab - 1 (row ends), every third -100, or all
 * -100 when all_ignored. */
static void test_lm_head_ce(int64_t n, int64_t d, int64_t vocab, float grad_scale, int want_dx,
                            int all_ignored) {
    float *x = randv(n * d, 1.0f), *w = randv(vocab * d, 0.05f);
    uint16_t *wb = malloc((size_t)(vocab * d) * 2);
    qlr_f32_to_bf16_row(w, wb, (size_t)(vocab * d));
    int32_t *tg = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        tg[i] = all_ignored || i % 3 == 2 ? -100 : (int32_t)(test_rng_u64(&rng) % (uint64_t)vocab);
    if (!all_ignored) {
        tg[0] = 0;
        if (n > 1) tg[n - 1] = (int32_t)(vocab - 1);
    }
    float *loss[2], *dx[2];
    for (int k = 0; k < 2; k++) {
        loss[k] = malloc((size_t)n * 4);
        dx[k] = malloc((size_t)(n * d) * 4);
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_act(be, x, n * d), bw = gh_raw(be, wb, (size_t)(vocab * d) * 2);
        gh_buf bt = gh_raw(be, tg, (size_t)n * 4);
        gh_buf bl = gh_alloc(be, (size_t)n * 4), bz = gh_alloc(be, (size_t)(n * vocab) * 4);
        gh_buf bd = gh_alloc(be, (size_t)(n * d) * qlr_backend_act_size(be));
        CHECK_OK(be->ops.lm_head_ce(be, bl.p, want_dx ? bd.p : NULL, bz.p, bx.p, bw.p, bt.p, n, d,
                                    vocab, grad_scale));
        CHECK_OK(be->mem.d2h(be, loss[k], bl.p, (size_t)n * 4));
        CHECK_OK(be->mem.sync(be));
        if (want_dx) gh_read_act(be, bd.p, dx[k], n * d);
        gh_free_checked(be, &bl, "lm_head_ce loss");
        gh_free_checked(be, &bz, "lm_head_ce logits scratch");
        gh_free_checked(be, &bd, "lm_head_ce dx");
        gh_free_checked(be, &bx, "x");
        gh_free_checked(be, &bw, "w");
        gh_free_checked(be, &bt, "targets");
    }
    char what[128];
    snprintf(what, sizeof what, "lm_head_ce loss n=%lld d=%lld vocab=%lld%s", (long long)n,
             (long long)d, (long long)vocab, all_ignored ? " all ignored" : "");
    /* identical bf16 operands, f32 logits on both sides: only the summation order of the
     * products (~1e-6 of a logit) and expf/logf ulps differ; a loss is O(log vocab) */
    gh_compare(what, loss[1], loss[0], n, 1e-4, 1e-4);
    for (int64_t i = 0; i < n; i++)
        if (tg[i] < 0) CHECK_MSG(loss[1][i] == 0.0f, "%s: ignored row %lld has loss %g", what,
                                 (long long)i, loss[1][i]);
    if (want_dx) {
        snprintf(what, sizeof what, "lm_head_ce dx n=%lld d=%lld vocab=%lld gs=%g", (long long)n,
                 (long long)d, (long long)vocab, grad_scale);
        /* the GPU rounds g = grad_scale·(softmax - onehot) to bf16 (2^-9 relative per element,
         * independent across the vocabulary: ~2^-9 of the RMS of dx) and dx to bf16 (2^-9
         * relative): 2^-6 of the RMS absolute (margin for the worst of n·d elements) plus 2^-7
         * relative */
        double r = gh_rms(dx[0], n * d);
        gh_compare(what, dx[1], dx[0], n * d, (r > 0 ? r : 1e-30) * 0x1p-6, 0x1p-7);
        CHECK_MSG(rms_diff(dx[1], dx[0], n * d) <= 0x1p-7 * (r > 0 ? r : 1e-30) ||
                      (r == 0 && rms_diff(dx[1], dx[0], n * d) == 0),
                  "%s: rms error %.3g over 2^-7 of the rms %.3g", what,
                  rms_diff(dx[1], dx[0], n * d), r);
        /* ignored rows: exactly zero (their g rows are zeros) */
        int64_t nz = 0;
        for (int64_t i = 0; i < n; i++)
            if (tg[i] < 0)
                for (int64_t j = 0; j < d; j++) nz += dx[1][i * d + j] != 0.0f;
        CHECK_MSG(nz == 0, "%s: %lld non-zero dx values in ignored rows", what, (long long)nz);
    }
    for (int k = 0; k < 2; k++) {
        free(loss[k]);
        free(dx[k]);
    }
    free(x); free(w); free(wb); free(tg);
}

/* ---- dropout ---- */

/* backend.h's mask, written out again: both backends must agree with the definition, not only
 * with each other. */
static int keep_ref(uint64_t seed, int64_t i, float p) {
    uint64_t z = seed + (uint64_t)i * 0x9E3779B97F4A7C15ull;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * 0x1p-24f >= p;
}

static void test_dropout(int64_t n, float p, uint64_t seed, int in_place) {
    float *x = randv(n, 1.0f), *ref = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++)
        if (x[i] == 0.0f) x[i] = 1.0f; /* a zero input would hide the mask */
    uint16_t *got = malloc((size_t)n * 2);
    gh_buf cx = gh_act(g_cpu, x, n), cy = gh_alloc(g_cpu, (size_t)n * 4);
    CHECK_OK(g_cpu->ops.dropout(g_cpu, cy.p, cx.p, n, p, seed));
    memcpy(ref, cy.p, (size_t)n * 4);
    gh_buf gx = gh_act(g_gpu, x, n), gy = gh_alloc(g_gpu, (size_t)n * 2);
    void *out = in_place ? gx.p : gy.p;
    CHECK_OK(g_gpu->ops.dropout(g_gpu, out, gx.p, n, p, seed));
    CHECK_OK(g_gpu->mem.d2h(g_gpu, got, out, (size_t)n * 2));
    CHECK_OK(g_gpu->mem.sync(g_gpu));
    int64_t mask_bad = 0, def_bad = 0, val_bad = 0, kept = 0, first = -1;
    for (int64_t i = 0; i < n; i++) {
        int kc = ref[i] != 0.0f, kg = qlr_bf16_to_f32(got[i]) != 0.0f, kd = keep_ref(seed, i, p);
        kept += kg;
        mask_bad += kc != kg;
        def_bad += kd != kc;
        if (got[i] != qlr_f32_to_bf16(ref[i])) {
            val_bad++;
            if (first < 0) first = i;
        }
    }
    char what[96];
    snprintf(what, sizeof what, "dropout n=%lld p=%g seed=%llx%s", (long long)n, p,
             (unsigned long long)seed, in_place ? " in place" : "");
    printf("  %-48s kept %.4f (expected %.4f)\n", what, (double)kept / n, 1.0 - p);
    /* the mask: integer math and exact conversions on both sides: identical */
    CHECK_MSG(mask_bad == 0, "%s: %lld mask bits differ from the CPU op", what,
              (long long)mask_bad);
    CHECK_MSG(def_bad == 0, "%s: the CPU mask differs from backend.h's definition at %lld places",
              what, (long long)def_bad);
    /* a kept value is bf16(f32(x) · f32(1 / (1 - p))) on the GPU: bitwise the bf16 rounding of
     * the CPU's f32 value */
    CHECK_MSG(val_bad == 0, "%s: %lld values differ from bf16(cpu); first [%lld] got %04x "
              "want %04x", what, (long long)val_bad, (long long)first, first >= 0 ? got[first] : 0,
              first >= 0 ? qlr_f32_to_bf16(ref[first]) : 0);
    /* the kept fraction is a binomial count: within 6 standard deviations of n·(1 - p) */
    double sd = sqrt((double)n * p * (1.0 - p));
    CHECK_MSG(fabs((double)kept - n * (1.0 - p)) <= 6.0 * sd + 1.0, "%s: kept %lld of %lld", what,
              (long long)kept, (long long)n);
    gh_free_checked(g_gpu, &gy, what);
    gh_free_checked(g_gpu, &gx, "dropout x (in place: y)");
    gh_free_checked(g_cpu, &cy, "dropout y");
    gh_free_checked(g_cpu, &cx, "dropout x");
    free(x); free(ref); free(got);
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
    /* lm_head_ce: SmolLM2's vocab (g in place) and that plus 7 (g in the workspace), vocab 1000
     * and 3001, one row, every row ignored, dx with and without */
    test_lm_head_ce(7, 576, 49152, 0.25f, 1, 0);
    test_lm_head_ce(9, 576, 49152 + 7, 1.0f / 6.0f, 1, 0);
    test_lm_head_ce(9, 576, 49152 + 7, 1.0f, 0, 0);
    test_lm_head_ce(37, 64, 1000, 0.37f, 1, 0);
    test_lm_head_ce(1, 576, 1000, 2.0f, 1, 0);
    test_lm_head_ce(3, 64, 1000, 1.0f, 1, 1);
    test_lm_head_ce(2, 4096, 3001, 0.5f, 1, 0);
    /* dropout: odd n, p 0.1 and 0.5, separate output and in place, p = 0 (identity) */
    test_dropout(1001, 0.1f, 42, 0);
    test_dropout(1001, 0.5f, 0xdeadbeefcafeull, 0);
    test_dropout((1 << 20) + 3, 0.1f, 0x9e3779b97f4a7c15ull, 1);
    test_dropout((1 << 20) + 3, 0.5f, 7, 0);
    test_dropout(1, 0.5f, 3, 0);
    test_dropout(777, 0.0f, 11, 1);
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
