/* tests/gpu/test_cuda_lora_segments.c: the CUDA segmented multi-adapter LoRA (lora_segmented, the
 * serving path) against the CPU lora_batched on the same bf16-rounded inputs, at Llama-3.1-8B's
 * shapes (k 4096 -> n 14336, 14336 -> 4096, 4096 -> 1024): 1 token; 64 tokens of 64 distinct
 * r16 adapters; 64 tokens over 8 adapters; mixed ranks 8/16/64 and rank 1; slot -1 tokens
 * interleaved; a 2048-token prefill over 3 adapters (dense runs) with scattered tokens mixed in;
 * an odd `in` and A/B at 2-byte offsets (the scalar loads). Guard bytes around every buffer.
 * Then a micro-benchmark of the 64-distinct decode shape: GB/s of A+B read (the op's floor).
 * Label gpu. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t g_rng = 20261204;

enum { SLOTS_DISTINCT = 0, SLOTS_GROUPS8 = 1, SLOTS_MIXED = 2, SLOTS_PREFILL = 3 };

typedef struct seg_case {
    const char *name;
    int64_t n, in, out;
    int32_t n_slots;
    const int32_t *ranks;   /* [n_slots] */
    int pattern;            /* SLOTS_* */
    int base_every;         /* > 0: every base_every-th token runs the base (slot -1) */
    int packed;             /* A/B at 2-byte offsets in one buffer */
} seg_case;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void make_slots(const seg_case *c, int32_t *slot) {
    for (int64_t t = 0; t < c->n; t++) {
        switch (c->pattern) {
        case SLOTS_DISTINCT: slot[t] = (int32_t)(t % c->n_slots); break;
        case SLOTS_GROUPS8: slot[t] = (int32_t)(test_rng_u64(&g_rng) % 8); break; /* scattered */
        case SLOTS_MIXED: slot[t] = (int32_t)(test_rng_u64(&g_rng) % (uint64_t)c->n_slots); break;
        default: /* prefill: 3 chunks of consecutive tokens, then scattered decode tokens */
            slot[t] = t < c->n * 3 / 4 ? (int32_t)(t * 3 / (c->n * 3 / 4))
                                       : (int32_t)(test_rng_u64(&g_rng) % 3);
        }
        if (c->base_every > 0 && t % c->base_every == c->base_every - 1) slot[t] = -1;
    }
}

/* Uploads the segment list of slot [n] to `be` (tok and tiles in one guarded buffer). */
static gh_buf upload_segs(qlr_backend *be, const int32_t *slot, int64_t n, int32_t ns,
                          qlr_lora_segs *g, int32_t *runs_host) {
    int32_t *h = malloc((size_t)n * 16 + 16), *mark = malloc((size_t)n * 4 + 4);
    qlr_lora_segs_build(slot, (int32_t)n, ns, 64, h, h + n, runs_host, mark, g);
    gh_buf b = gh_raw(be, h, (size_t)n * 16);
    g->tok = (const int32_t *)b.p;
    g->tiles = (const int32_t *)b.p + n;
    free(h), free(mark);
    return b;
}

static void run_case(const seg_case *c) {
    int64_t n = c->n, in = c->in, out = c->out;
    int32_t ns = c->n_slots, max_r = 0;
    for (int32_t s = 0; s < ns; s++) max_r = c->ranks[s] > max_r ? c->ranks[s] : max_r;
    float **A = malloc((size_t)ns * sizeof *A), **B = malloc((size_t)ns * sizeof *B);
    float *scale = malloc((size_t)ns * 4);
    int64_t tot = 0;
    for (int32_t s = 0; s < ns; s++) {
        int32_t r = c->ranks[s];
        A[s] = malloc((size_t)(r * in + 1) * 4);
        B[s] = malloc((size_t)(out * r + 1) * 4);
        gh_randn_bf16(A[s], r * in, 1.0f / sqrtf((float)in), &g_rng);
        gh_randn_bf16(B[s], out * r, r ? 1.0f / sqrtf((float)r) : 0.0f, &g_rng);
        scale[s] = (s % 3 == 0) ? 2.0f : (s % 3 == 1 ? 0.5f : -1.0f);
        tot += r * in + out * r + 2;
    }
    float *x = malloc((size_t)(n * in) * 4), *y0 = malloc((size_t)(n * out) * 4);
    gh_randn_bf16(x, n * in, 1.0f, &g_rng);
    gh_randn_bf16(y0, n * out, 1.0f, &g_rng);
    int32_t *slot = malloc((size_t)n * 4), *runs = malloc((size_t)n * 12 + 4);
    make_slots(c, slot);
    float *ref = malloc((size_t)(n * out) * 4), *got = malloc((size_t)(n * out) * 4);
    qlr_lora_ref *Lh = malloc((size_t)ns * sizeof *Lh);
    qlr_lora_segs g = {0};
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_act(be, x, n * in), by = gh_act(be, y0, n * out);
        gh_buf bslot = gh_raw(be, slot, (size_t)n * 4), bseg = {0}, pack = {0};
        gh_buf *bab = calloc((size_t)2 * ns, sizeof *bab);
        size_t es = qlr_backend_act_size(be);
        if (c->packed) {
            float *h = calloc((size_t)tot, 4);
            int64_t off = 0, *offs = malloc((size_t)2 * ns * 8);
            for (int32_t s = 0; s < ns; s++) {
                int32_t r = c->ranks[s];
                offs[2 * s] = ++off;
                memcpy(h + off, A[s], (size_t)(r * in) * 4);
                off += r * in;
                offs[2 * s + 1] = ++off;
                memcpy(h + off, B[s], (size_t)(out * r) * 4);
                off += out * r;
            }
            pack = gh_act(be, h, tot);
            for (int32_t s = 0; s < ns; s++)
                Lh[s] = (qlr_lora_ref){(char *)pack.p + offs[2 * s] * es,
                                       (char *)pack.p + offs[2 * s + 1] * es, c->ranks[s],
                                       scale[s]};
            free(h), free(offs);
        } else {
            for (int32_t s = 0; s < ns; s++) {
                int32_t r = c->ranks[s];
                bab[2 * s] = gh_act(be, A[s], r * in);
                bab[2 * s + 1] = gh_act(be, B[s], out * r);
                Lh[s] = (qlr_lora_ref){bab[2 * s].p, bab[2 * s + 1].p, r, scale[s]};
            }
        }
        gh_buf bL = gh_raw(be, Lh, ns * sizeof *Lh);
        if (k) {
            CHECK_MSG(be->ops.lora_segmented != NULL, "the CUDA backend has no lora_segmented op");
            bseg = upload_segs(be, slot, n, ns, &g, runs);
            if (be->ops.lora_segmented)
                CHECK_OK(be->ops.lora_segmented(be, by.p, bx.p, bL.p, Lh, ns, bslot.p, max_r, &g,
                                                n, in, out));
        } else {
            CHECK_OK(be->ops.lora_batched(be, by.p, bx.p, bL.p, Lh, ns, bslot.p, max_r, -1, n, in,
                                          out));
        }
        gh_read_act(be, by.p, k ? got : ref, n * out);
        gh_free_checked(be, &by, "lora_segmented y");
        gh_free_checked(be, &bx, "lora_segmented x");
        gh_free_checked(be, &bslot, "lora_segmented slot");
        gh_free_checked(be, &bL, "lora_segmented table");
        if (bseg.base) gh_free_checked(be, &bseg, "lora_segmented tok/tiles");
        if (pack.base) gh_free_checked(be, &pack, "lora_segmented packed A/B");
        for (int32_t i = 0; i < 2 * ns; i++)
            if (bab[i].base) gh_free_checked(be, &bab[i], "lora_segmented A/B");
        free(bab);
    }
    /* which tokens took the dense run path (cuBLASLt: rounds u to bf16 and the product before
     * adding y: test_cuda_lora_batched's 2^-7 bound) */
    char *dense = calloc((size_t)n, 1);
    for (int32_t i = 0; i < g.n_runs; i++)
        for (int32_t t = runs[3 * i + 1]; t < runs[3 * i + 1] + runs[3 * i + 2]; t++) dense[t] = 1;
    /* Per element (test_cuda_lora_batched's bound, and why): |got - ref| <= 2^-8·(1 + 2^-9)·M +
     * 2·(in + r + 2)·2^-24·Mf, M = |y0| + |scale|·Σ_j |u_j|·|B_oj|, Mf the same with |u_j| replaced
     * by Σ_k |x_k·A_jk|: one bf16 rounding of y on each side plus f32 sums in different orders
     * (the split-k partials are one more order); 2^-7·M on dense-run tokens. */
    int64_t bad = 0, untouched_bad = 0, first = -1, worst = -1;
    double wratio = 0, max_abs = 0, max_rel = 0;
    double *u = malloc((size_t)max_r * 8 + 8), *U = malloc((size_t)max_r * 8 + 8);
    for (int64_t t = 0; t < n; t++) {
        int32_t s = slot[t];
        const float *yg = got + t * out, *yr = ref + t * out, *yo = y0 + t * out;
        if (s < 0 || c->ranks[s] == 0) {
            for (int64_t o = 0; o < out; o++) {
                int b = yg[o] != yo[o] || yr[o] != yo[o];
                untouched_bad += b;
                if (b && first < 0) first = t * out + o;
            }
            continue;
        }
        int32_t r = c->ranks[s];
        for (int32_t j = 0; j < r; j++) {
            double a = 0, m = 0;
            for (int64_t k = 0; k < in; k++) {
                double p = (double)x[t * in + k] * A[s][j * in + k];
                a += p;
                m += fabs(p);
            }
            u[j] = a, U[j] = m;
        }
        double gamma = 2.0 * (double)(in + r + 2) * 0x1p-24;
        for (int64_t o = 0; o < out; o++) {
            double M = fabs(yo[o]), Mf = fabs(yo[o]);
            for (int32_t j = 0; j < r; j++) {
                double b = fabs(scale[s]) * fabs(B[s][o * r + j]);
                M += fabs(u[j]) * b;
                Mf += U[j] * b;
            }
            double tol = (dense[t] ? 0x1p-7 : 0x1p-8) * (1 + 0x1p-9) * M + gamma * Mf;
            double e = fabs((double)yg[o] - yr[o]);
            max_abs = e > max_abs ? e : max_abs;
            double rel = e / (fabs(yr[o]) + 1e-3);
            max_rel = rel > max_rel ? rel : max_rel;
            if (!(e <= tol)) {
                bad++;
                if (first < 0) first = t * out + o;
                if (worst < 0 || e / tol > wratio) wratio = e / tol, worst = t * out + o;
            }
        }
    }
    char what[200];
    snprintf(what, sizeof what, "%s n=%lld %lld->%lld slots=%d max_r=%d tiles=%d max_tile=%d "
             "runs=%d%s", c->name, (long long)n, (long long)in, (long long)out, ns, max_r,
             g.n_tiles, g.max_tile, g.n_runs, c->packed ? " packed" : "");
    printf("  %-96s max|err| %.3g max rel %.3g %s\n", what, max_abs, max_rel,
           bad || untouched_bad ? "FAIL" : "ok");
    CHECK_MSG(bad == 0, "lora_segmented %s: %lld values out of tolerance; first mismatch [%lld] "
              "(token %lld); worst [%lld] got %.6g ref %.6g (%.3g x tolerance)", what,
              (long long)bad, (long long)first, (long long)(first >= 0 ? first / out : -1),
              (long long)worst, worst >= 0 ? got[worst] : 0.0, worst >= 0 ? ref[worst] : 0.0,
              wratio);
    CHECK_MSG(untouched_bad == 0, "lora_segmented %s: %lld values of slot -1 rows changed (first "
              "[%lld])", what, (long long)untouched_bad, (long long)first);
    int64_t changed = 0;
    for (int64_t i = 0; i < n * out; i++) changed += ref[i] != y0[i];
    CHECK_MSG(changed > 0, "lora_segmented %s: the reference changed nothing", what);
    for (int32_t s = 0; s < ns; s++) free(A[s]), free(B[s]);
    free(A), free(B), free(scale), free(x), free(y0), free(slot), free(runs), free(ref), free(got),
        free(Lh), free(u), free(U), free(dense);
}

/* Times lora_segmented (and lora_batched, the per-token kernels) on 64 tokens of 64 distinct
 * adapters of rank r: GB/s of A and B bytes read (64 · r · (in + out) · 2), the op's floor. */
static void bench_shape(int64_t in, int64_t out, int32_t r) {
    enum { NS = 64, ITERS = 200 };
    qlr_backend *be = g_gpu;
    int64_t n = NS;
    float *h = malloc((size_t)((in > out ? in : out) * r) * 4);
    gh_randn_bf16(h, (in > out ? in : out) * r, 0.01f, &g_rng);
    qlr_lora_ref Lh[NS];
    void *ab[2 * NS];
    for (int s = 0; s < NS; s++) {
        ab[2 * s] = be->mem.alloc(be, (size_t)(r * in) * 2);
        ab[2 * s + 1] = be->mem.alloc(be, (size_t)(r * out) * 2);
        CHECK_OK(qlr_backend_upload_act(be, ab[2 * s], h, r * in));
        CHECK_OK(qlr_backend_upload_act(be, ab[2 * s + 1], h, r * out));
        Lh[s] = (qlr_lora_ref){ab[2 * s], ab[2 * s + 1], r, 0.5f};
    }
    int32_t slot[NS], runs[3 * NS];
    for (int s = 0; s < NS; s++) slot[s] = s;
    float *xf = calloc((size_t)(n * (in > out ? in : out)), 4);
    gh_buf bx = gh_act(be, xf, n * in), by = gh_act(be, xf, n * out);
    gh_buf bslot = gh_raw(be, slot, sizeof slot), bL = gh_raw(be, Lh, sizeof Lh);
    qlr_lora_segs g;
    gh_buf bseg = upload_segs(be, slot, n, NS, &g, runs);
    double gb = (double)NS * r * (double)(in + out) * 2 / 1e9;
    for (int v = 0; v < 2; v++) {
        for (int it = 0; it < 3; it++) /* warm-up (workspace growth) */
            CHECK_OK(v ? be->ops.lora_batched(be, by.p, bx.p, bL.p, Lh, NS, bslot.p, r, -1, n, in, out)
                       : be->ops.lora_segmented(be, by.p, bx.p, bL.p, Lh, NS, bslot.p, r, &g, n, in,
                                                out));
        CHECK_OK(be->mem.sync(be));
        double t0 = now_s();
        for (int it = 0; it < ITERS; it++)
            CHECK_OK(v ? be->ops.lora_batched(be, by.p, bx.p, bL.p, Lh, NS, bslot.p, r, -1, n, in, out)
                       : be->ops.lora_segmented(be, by.p, bx.p, bL.p, Lh, NS, bslot.p, r, &g, n, in,
                                                out));
        CHECK_OK(be->mem.sync(be));
        double us = (now_s() - t0) / ITERS * 1e6;
        printf("  bench %-14s 64 tokens x 64 distinct r%d %lld->%lld: %8.1f us/call, %7.1f GB/s "
               "of A+B (%.1f MB)\n", v ? "lora_batched" : "lora_segmented", r, (long long)in,
               (long long)out, us, gb / (us * 1e-6), gb * 1e3);
    }
    gh_free_checked(be, &bx, "bench x");
    gh_free_checked(be, &by, "bench y");
    gh_free_checked(be, &bslot, "bench slot");
    gh_free_checked(be, &bL, "bench table");
    gh_free_checked(be, &bseg, "bench segs");
    for (int i = 0; i < 2 * NS; i++) be->mem.free(be, ab[i]);
    free(h), free(xf);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    static int32_t r16x64[64], mixed64[64], r8x8[8];
    for (int i = 0; i < 64; i++) r16x64[i] = 16, mixed64[i] = i % 3 == 0 ? 8 : i % 3 == 1 ? 16 : 64;
    mixed64[5] = 1;  /* rank 1: B rows of 2 bytes (scalar loads) */
    mixed64[7] = 0;  /* a slot that does not adapt this linear */
    for (int i = 0; i < 8; i++) r8x8[i] = 16;
    static const int32_t r3[3] = {16, 64, 8};
    const int64_t shapes[3][2] = {{4096, 14336}, {14336, 4096}, {4096, 1024}};
    for (int k = 0; k < 3; k++) {
        int64_t in = shapes[k][0], out = shapes[k][1];
        seg_case one = {"1 token", 1, in, out, 64, r16x64, SLOTS_DISTINCT, 0, 0};
        run_case(&one);
        seg_case d64 = {"64 distinct r16", 64, in, out, 64, r16x64, SLOTS_DISTINCT, 0, 0};
        run_case(&d64);
        seg_case g8 = {"64 over 8 adapters", 64, in, out, 8, r8x8, SLOTS_GROUPS8, 0, 0};
        run_case(&g8);
        seg_case mx = {"mixed 8/16/64 + r1, r0", 64, in, out, 64, mixed64, SLOTS_MIXED, 0, 0};
        run_case(&mx);
        seg_case base = {"64 distinct, base every 3rd", 64, in, out, 64, r16x64, SLOTS_DISTINCT, 3, 0};
        run_case(&base);
    }
    /* prefill: 2048 tokens over 3 adapters (3 dense runs, then scattered tokens in tiles) */
    for (int k = 0; k < 2; k++) {
        seg_case pf = {"prefill 3 adapters", 2048, shapes[k][0], shapes[k][1], 3, r3,
                       SLOTS_PREFILL, 0, 0};
        run_case(&pf);
    }
    seg_case pfb = {"prefill 3 adapters, base every 50th", 600, 4096, 1024, 3, r3, SLOTS_PREFILL,
                    50, 0};
    run_case(&pfb);
    /* odd in / out and 2-byte offsets: the scalar paths */
    seg_case odd = {"odd shapes packed", 77, 575, 193, 64, mixed64, SLOTS_MIXED, 5, 1};
    run_case(&odd);
    seg_case oddp = {"packed", 64, 576, 1536, 64, mixed64, SLOTS_MIXED, 0, 1};
    run_case(&oddp);
    /* micro-benchmark: the 64-distinct decode shapes of Llama-3.1-8B */
    bench_shape(4096, 14336, 16);
    bench_shape(14336, 4096, 16);
    bench_shape(4096, 4096, 16);
    bench_shape(4096, 1024, 16);
    gh_done();
    return test_finish();
}
