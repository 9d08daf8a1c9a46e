/* tests/optim/test_clip.c: global-norm gradient clipping: the norm over several tensors, the
 * torch clip factor max_norm / (norm + 1e-6), no change below the threshold, NaN/Inf reported
 * with nothing scaled, and a large tensor whose threaded norm matches a serial double sum. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "optim/optim.h"
#include "tests/test_util.h"

int main(void) {
    float a[2] = {3.0f, 4.0f}, b[1] = {12.0f};
    float *gs[2] = {a, b};
    int64_t ns[2] = {2, 1};
    int bad = -1;
    /* norm 13; max 6.5: factor 6.5 / (13 + 1e-6) */
    float norm = qlr_clip_grad_norm(gs, ns, 2, 6.5f, &bad);
    CHECK_NEAR(norm, 13.0, 0, 1e-7);
    CHECK_EQ_INT(bad, 0);
    double f = 6.5 / (13.0 + 1e-6);
    CHECK_NEAR(a[0], 3.0 * f, 0, 1e-6);
    CHECK_NEAR(a[1], 4.0 * f, 0, 1e-6);
    CHECK_NEAR(b[0], 12.0 * f, 0, 1e-6);
    /* the clipped norm is now max_norm */
    norm = qlr_clip_grad_norm(gs, ns, 2, 0.0f, &bad);
    CHECK_NEAR(norm, 6.5, 0, 1e-6);

    /* below the threshold: bit-identical */
    float c[3] = {0.1f, -0.2f, 0.3f}, c0[3];
    memcpy(c0, c, sizeof c);
    float *gc[1] = {c};
    int64_t nc[1] = {3};
    norm = qlr_clip_grad_norm(gc, nc, 1, 1.0f, &bad);
    CHECK_NEAR(norm, sqrt(0.14), 0, 1e-6);
    CHECK(memcmp(c, c0, sizeof c) == 0);

    /* NaN and Inf: reported, nothing scaled */
    float d[3] = {1.0f, NAN, 2.0f}, e[2] = {1e3f, 1e3f};
    float *gd[2] = {e, d};
    int64_t nd[2] = {2, 3};
    norm = qlr_clip_grad_norm(gd, nd, 2, 1.0f, &bad);
    CHECK(isnan(norm));
    CHECK_EQ_INT(bad, 1);
    CHECK(e[0] == 1e3f && d[0] == 1.0f);
    d[1] = INFINITY;
    norm = qlr_clip_grad_norm(gd, nd, 2, 1.0f, &bad);
    CHECK(isinf(norm));
    CHECK_EQ_INT(bad, 1);
    /* a finite tensor whose squares overflow float32 is still measured in double */
    float big[2] = {3e30f, 4e30f};
    float *gb[1] = {big};
    int64_t nbig[1] = {2};
    norm = qlr_clip_grad_norm(gb, nbig, 1, 0.0f, &bad);
    CHECK_NEAR(norm, 5e30, 0, 1e-6);
    CHECK_EQ_INT(bad, 0);

    /* a large tensor: threaded chunked sum vs a serial double sum */
    int64_t n = 1000003;
    float *x = malloc(sizeof(float) * n);
    uint64_t rng = 5;
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = test_rng_normal(&rng) * 1e-3f;
        ss += (double)x[i] * x[i];
    }
    float *gx[1] = {x};
    int64_t nx[1] = {n};
    norm = qlr_clip_grad_norm(gx, nx, 1, 0.5f, &bad);
    CHECK_NEAR(norm, sqrt(ss), 0, 1e-6);
    double s2 = 0.0;
    for (int64_t i = 0; i < n; i++) s2 += (double)x[i] * x[i];
    CHECK_NEAR(sqrt(s2), 0.5, 0, 1e-5);
    free(x);
    return test_finish();
}
