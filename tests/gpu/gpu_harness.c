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

/* ---- multi-adapter LoRA ---- */

void gh_lora_make(gh_lora_set *s, int32_t n_slots, const int32_t *ranks, int64_t in, int64_t out,
                  uint64_t *rng) {
    memset(s, 0, sizeof *s);
    s->n_slots = n_slots;
    s->ranks = ranks;
    s->in = in;
    s->out = out;
    s->a = calloc((size_t)n_slots, sizeof *s->a);
    s->b = calloc((size_t)n_slots, sizeof *s->b);
    s->scale = malloc((size_t)n_slots * 4);
    for (int32_t i = 0; i < n_slots; i++) {
        int32_t r = ranks[i];
        s->max_r = r > s->max_r ? r : s->max_r;
        s->a[i] = malloc((size_t)(r * in + 1) * 4);
        s->b[i] = malloc((size_t)(out * r + 1) * 4);
        gh_randn_bf16(s->a[i], r * in, 1.0f / sqrtf((float)in), rng);
        gh_randn_bf16(s->b[i], out * r, r ? 1.0f / sqrtf((float)r) : 0.0f, rng);
        s->scale[i] = (i % 3 == 0) ? 2.0f : (i % 3 == 1 ? 0.5f : -1.0f);
    }
}

void gh_lora_free(gh_lora_set *s) {
    for (int32_t i = 0; i < s->n_slots; i++) free(s->a[i]), free(s->b[i]);
    free(s->a), free(s->b), free(s->scale);
    memset(s, 0, sizeof *s);
}

void gh_lora_upload(qlr_backend *be, const gh_lora_set *s, int packed, qlr_lora_ref *Lh,
                    gh_buf *dev, gh_buf *pack) {
    int32_t ns = s->n_slots;
    int64_t in = s->in, out = s->out;
    memset(pack, 0, sizeof *pack);
    memset(dev, 0, (size_t)2 * ns * sizeof *dev);
    if (!packed) {
        for (int32_t i = 0; i < ns; i++) {
            int32_t r = s->ranks[i];
            dev[2 * i] = gh_act(be, s->a[i], r * in);
            dev[2 * i + 1] = gh_act(be, s->b[i], out * r);
            Lh[i] = (qlr_lora_ref){dev[2 * i].p, dev[2 * i + 1].p, r, s->scale[i]};
        }
        return;
    }
    int64_t tot = 0; /* every A and B, each preceded by one pad element */
    for (int32_t i = 0; i < ns; i++) tot += s->ranks[i] * (in + out) + 2;
    float *h = calloc((size_t)tot, 4);
    int64_t off = 0, *offs = malloc((size_t)2 * ns * 8);
    for (int32_t i = 0; i < ns; i++) {
        int32_t r = s->ranks[i];
        offs[2 * i] = ++off;
        memcpy(h + off, s->a[i], (size_t)(r * in) * 4);
        off += r * in;
        offs[2 * i + 1] = ++off;
        memcpy(h + off, s->b[i], (size_t)(out * r) * 4);
        off += out * r;
    }
    *pack = gh_act(be, h, tot);
    size_t es = qlr_backend_act_size(be);
    for (int32_t i = 0; i < ns; i++)
        Lh[i] = (qlr_lora_ref){(char *)pack->p + offs[2 * i] * es,
                               (char *)pack->p + offs[2 * i + 1] * es, s->ranks[i], s->scale[i]};
    free(h);
    free(offs);
}

void gh_lora_free_dev(qlr_backend *be, const gh_lora_set *s, gh_buf *dev, gh_buf *pack,
                      const char *what) {
    char w[160];
    snprintf(w, sizeof w, "%s packed A/B", what);
    if (pack->base) gh_free_checked(be, pack, w);
    snprintf(w, sizeof w, "%s A/B", what);
    for (int32_t i = 0; i < 2 * s->n_slots; i++)
        if (dev[i].base) gh_free_checked(be, &dev[i], w);
}

void gh_lora_check(const gh_lora_set *s, const float *x, const float *y0, const int32_t *slot,
                   int64_t n, const float *got, const float *ref, const char *coarse,
                   int coarse_all, gh_lora_err *e) {
    int64_t in = s->in, out = s->out;
    memset(e, 0, sizeof *e);
    e->first = e->worst = -1;
    double *u = malloc((size_t)(s->max_r + 1) * 8), *U = malloc((size_t)(s->max_r + 1) * 8);
    for (int64_t t = 0; t < n; t++) {
        int32_t sl = slot[t];
        const float *yg = got + t * out, *yr = ref + t * out, *yo = y0 + t * out;
        if (sl < 0 || sl >= s->n_slots || s->ranks[sl] == 0) {
            for (int64_t o = 0; o < out; o++)
                if (yg[o] != yo[o] || yr[o] != yo[o]) {
                    e->untouched_bad++;
                    if (e->first < 0) e->first = t * out + o;
                }
            continue;
        }
        e->adapted++;
        int32_t r = s->ranks[sl];
        const float *A = s->a[sl], *B = s->b[sl];
        for (int32_t j = 0; j < r; j++) {
            double a = 0, m = 0;
            for (int64_t k = 0; k < in; k++) {
                double p = (double)x[t * in + k] * A[j * in + k];
                a += p;
                m += fabs(p);
            }
            u[j] = a, U[j] = m;
        }
        double gamma = 2.0 * (double)(in + r + 2) * 0x1p-24;
        double c = coarse_all || (coarse && coarse[t]) ? 0x1p-7 : 0x1p-8;
        for (int64_t o = 0; o < out; o++) {
            double M = fabs(yo[o]), Mf = fabs(yo[o]);
            for (int32_t j = 0; j < r; j++) {
                double b = fabs(s->scale[sl]) * fabs(B[o * r + j]);
                M += fabs(u[j]) * b;
                Mf += U[j] * b;
            }
            double tol = c * (1 + 0x1p-9) * M + gamma * Mf;
            double err = fabs((double)yg[o] - yr[o]), rel = err / (fabs(yr[o]) + 1e-3);
            e->max_abs = err > e->max_abs ? err : e->max_abs;
            e->max_rel = rel > e->max_rel ? rel : e->max_rel;
            if (!(err <= tol)) {
                e->bad++;
                if (e->first < 0) e->first = t * out + o;
                if (e->worst < 0 || err / tol > e->worst_ratio)
                    e->worst_ratio = err / tol, e->worst = t * out + o;
            }
        }
    }
    free(u);
    free(U);
}
