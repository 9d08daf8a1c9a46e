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
    int32_t ns = c->n_slots;
    gh_lora_set set;
    gh_lora_make(&set, ns, c->ranks, in, out, &g_rng);
    float *x = malloc((size_t)(n * in) * 4), *y0 = malloc((size_t)(n * out) * 4);
    gh_randn_bf16(x, n * in, 1.0f, &g_rng);
    gh_randn_bf16(y0, n * out, 1.0f, &g_rng);
    int32_t *slot = malloc((size_t)n * 4), *runs = malloc((size_t)n * 12 + 4);
    make_slots(c, slot);
    float *ref = malloc((size_t)(n * out) * 4), *got = malloc((size_t)(n * out) * 4);
    qlr_lora_ref *Lh = malloc((size_t)ns * sizeof *Lh);
    gh_buf *bab = malloc((size_t)2 * ns * sizeof *bab), pack;
    qlr_lora_segs g = {0};
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_act(be, x, n * in), by = gh_act(be, y0, n * out);
        gh_buf bslot = gh_raw(be, slot, (size_t)n * 4), bseg = {0};
        gh_lora_upload(be, &set, c->packed, Lh, bab, &pack);
        gh_buf bL = gh_raw(be, Lh, ns * sizeof *Lh);
        if (k) { /* CUDA: the segmented op */
            CHECK_MSG(be->ops.lora_segmented != NULL, "the CUDA backend has no lora_segmented op");
            bseg = upload_segs(be, slot, n, ns, &g, runs);
            if (be->ops.lora_segmented)
                CHECK_OK(be->ops.lora_segmented(be, by.p, bx.p, bL.p, Lh, ns, bslot.p, set.max_r,
                                                &g, n, in, out));
        } else { /* the reference */
            CHECK_OK(be->ops.lora_batched(be, by.p, bx.p, bL.p, Lh, ns, bslot.p, set.max_r, -1, n,
                                          in, out));
        }
        gh_read_act(be, by.p, k ? got : ref, n * out);
        gh_free_checked(be, &by, "lora_segmented y");
        gh_free_checked(be, &bx, "lora_segmented x");
        gh_free_checked(be, &bslot, "lora_segmented slot");
        gh_free_checked(be, &bL, "lora_segmented table");
        if (bseg.base) gh_free_checked(be, &bseg, "lora_segmented tok/tiles");
        gh_lora_free_dev(be, &set, bab, &pack, "lora_segmented");
    }
    /* gh_lora_check's bound (split-k partials are one more f32 summation order, inside it);
     * tokens of dense runs took cuBLASLt: 2^-7 there */
    char *dense = calloc((size_t)n, 1);
    for (int32_t i = 0; i < g.n_runs; i++)
        for (int32_t t = runs[3 * i + 1]; t < runs[3 * i + 1] + runs[3 * i + 2]; t++) dense[t] = 1;
    gh_lora_err e;
    gh_lora_check(&set, x, y0, slot, n, got, ref, dense, 0, &e);
    char what[200];
    snprintf(what, sizeof what, "%s n=%lld %lld->%lld slots=%d max_r=%d tiles=%d max_tile=%d "
             "runs=%d%s", c->name, (long long)n, (long long)in, (long long)out, ns, set.max_r,
             g.n_tiles, g.max_tile, g.n_runs, c->packed ? " packed" : "");
    printf("  %-96s max|err| %.3g max rel %.3g %s\n", what, e.max_abs, e.max_rel,
           e.bad || e.untouched_bad ? "FAIL" : "ok");
    CHECK_MSG(e.bad == 0, "lora_segmented %s: %lld values out of tolerance; first mismatch "
              "[%lld] (token %lld); worst [%lld] got %.6g ref %.6g (%.3g x tolerance)", what,
              (long long)e.bad, (long long)e.first, (long long)(e.first >= 0 ? e.first / out : -1),
              (long long)e.worst, e.worst >= 0 ? got[e.worst] : 0.0,
              e.worst >= 0 ? ref[e.worst] : 0.0, e.worst_ratio);
    CHECK_MSG(e.untouched_bad == 0, "lora_segmented %s: %lld values of slot -1 / r = 0 rows "
              "changed (first [%lld])", what, (long long)e.untouched_bad, (long long)e.first);
    int64_t changed = 0;
    for (int64_t i = 0; i < n * out; i++) changed += ref[i] != y0[i];
    CHECK_MSG(changed > 0, "lora_segmented %s: the reference changed nothing", what);
    gh_lora_free(&set);
    free(x), free(y0), free(slot), free(runs), free(ref), free(got), free(Lh), free(bab),
        free(dense);
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
