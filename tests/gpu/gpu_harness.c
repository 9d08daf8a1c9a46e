/* tests/gpu/gpu_harness.c: see gpu_harness.h. */
#include "tests/gpu/gpu_harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tests/test_util.h"

qlr_backend *g_cpu, *g_gpu;

int gh_init(void) {
    if (qlr_backend_cpu_create(0, &g_cpu) != QLR_OK) {
        fprintf(stderr, "cpu backend: %s\n", qlr_error_msg());
        return 0;
    }
    if (qlr_backend_create("cuda", 0, &g_gpu) != QLR_OK) {
        fprintf(stderr, "cuda backend: %s\n", qlr_error_msg());
        return 0;
    }
    printf("device: %s\n", qlr_cuda_device_name(g_gpu));
    return 1;
}

void gh_done(void) {
    qlr_backend_free(g_gpu);
    qlr_backend_free(g_cpu);
}

#define GUARD_BYTE 0xA5

gh_buf gh_alloc(qlr_backend *be, size_t bytes) {
    gh_buf b = {0};
    b.bytes = bytes;
    size_t tot = bytes + 2 * GH_GUARD;
    b.base = be->mem.alloc(be, tot);
    QLR_ASSERT(b.base);
    unsigned char *pat = malloc(tot);
    memset(pat, GUARD_BYTE, tot);
    QLR_ASSERT(be->mem.h2d(be, b.base, pat, tot) == QLR_OK);
    QLR_ASSERT(be->mem.sync(be) == QLR_OK);
    free(pat);
    b.p = b.base + GH_GUARD;
    return b;
}

void gh_free_checked(qlr_backend *be, gh_buf *b, const char *what) {
    if (!b->base) return;
    size_t tot = b->bytes + 2 * GH_GUARD;
    unsigned char *h = malloc(tot);
    QLR_ASSERT(be->mem.sync(be) == QLR_OK);
    QLR_ASSERT(be->mem.d2h(be, h, b->base, tot) == QLR_OK);
    QLR_ASSERT(be->mem.sync(be) == QLR_OK);
    int bad = 0;
    for (size_t i = 0; i < GH_GUARD; i++)
        if (h[i] != GUARD_BYTE || h[GH_GUARD + b->bytes + i] != GUARD_BYTE) bad++;
    CHECK_MSG(bad == 0, "%s: %d guard bytes overwritten (out-of-bounds write)", what, bad);
    free(h);
    be->mem.free(be, b->base);
    memset(b, 0, sizeof *b);
}

void gh_randn_bf16(float *x, int64_t n, float sigma, uint64_t *rng) {
    for (int64_t i = 0; i < n; i++)
        x[i] = qlr_bf16_to_f32(qlr_f32_to_bf16(sigma * test_rng_normal(rng)));
}

gh_buf gh_act(qlr_backend *be, const float *x, int64_t n) {
    gh_buf b = gh_alloc(be, (size_t)n * qlr_backend_act_size(be));
    if (n) QLR_ASSERT(qlr_backend_upload_act(be, b.p, x, n) == QLR_OK);
    return b;
}

gh_buf gh_raw(qlr_backend *be, const void *x, size_t bytes) {
    gh_buf b = gh_alloc(be, bytes);
    if (bytes) QLR_ASSERT(be->mem.h2d(be, b.p, x, bytes) == QLR_OK);
    QLR_ASSERT(be->mem.sync(be) == QLR_OK);
    return b;
}

void gh_read_act(qlr_backend *be, const void *p, float *out, int64_t n) {
    qlr_status st = qlr_backend_download_act(be, out, p, n);
    CHECK_MSG(st == QLR_OK, "download: %s", qlr_error_msg());
}

double gh_rms(const float *x, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return n ? sqrt(s / n) : 0.0;
}

int gh_compare(const char *what, const float *got, const float *ref, int64_t n, double atol,
               double rtol) {
    double maxe = 0, num = 0, den = 0;
    int64_t worst = -1, nbad = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - (double)ref[i]);
        if (!(d <= atol + rtol * fabs(ref[i]))) {
            nbad++;
            if (worst < 0 || !(d <= maxe)) worst = i;
        }
        if (d > maxe || d != d) maxe = d;
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    printf("  %-48s n=%-9lld max_abs=%.3g rel_l2=%.3g %s\n", what, (long long)n, maxe, rel,
           nbad ? "FAIL" : "ok");
    CHECK_MSG(nbad == 0, "%s: %lld of %lld elements out of tolerance; worst [%lld] got %.6g ref %.6g "
              "(atol %.3g, rtol %.3g)", what, (long long)nbad, (long long)n, (long long)worst,
              worst >= 0 ? got[worst] : 0.0, worst >= 0 ? ref[worst] : 0.0, atol, rtol);
    return nbad == 0;
}

int gh_compare_attention(const char *what, const float *got, const float *ref, int64_t n) {
    return gh_compare(what, got, ref, n, 8e-3, 0x1p-7);
}
