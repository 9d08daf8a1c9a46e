/* tests/gpu/test_cuda_lora_batched.c: the CUDA batched multi-adapter LoRA (lora_batched) against
 * the CPU op on the same bf16-rounded inputs: 1, 3 and 17 slots, ranks 4/8/16/64 mixed and a slot
 * with r = 0, tokens of one slot scattered through the batch, slot -1 mixed in, n from 1 to 300,
 * in != out both ways, an odd `in` and A/B packed at 2-byte offsets (the kernels' scalar loads),
 * the `uniform` dense path, and guard bytes around every buffer. Label gpu. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t g_rng = 20261203;

typedef struct lb_case {
    int64_t n, in, out;
    int32_t n_slots;
    const int32_t *ranks;  /* [n_slots] */
    int scatter;           /* 1: random slots with -1 mixed in; 0: every token uniform_slot */
    int32_t uniform_slot;  /* scatter 0: the slot of every token */
    int hint;              /* pass uniform_slot as the uniform hint (the dense path) */
    int packed;            /* A/B of every slot in one buffer at odd element offsets */
} lb_case;

static void run_case(const lb_case *c) {
    int64_t n = c->n, in = c->in, out = c->out;
    int32_t ns = c->n_slots, max_r = 0;
    for (int32_t s = 0; s < ns; s++) max_r = c->ranks[s] > max_r ? c->ranks[s] : max_r;
    float **A = malloc((size_t)ns * sizeof *A), **B = malloc((size_t)ns * sizeof *B);
    float *scale = malloc((size_t)ns * 4);
    int64_t tot = 0; /* elements of every A and B, each preceded by one pad element */
    for (int32_t s = 0; s < ns; s++) {
        int32_t r = c->ranks[s];
        A[s] = malloc((size_t)(r * in + 1) * 4);
        B[s] = malloc((size_t)(out * r + 1) * 4);
        /* A ~ N(0, 1/in), B ~ N(0, 1/r): u and the update are O(1), like y0 */
        gh_randn_bf16(A[s], r * in, 1.0f / sqrtf((float)in), &g_rng);
        gh_randn_bf16(B[s], out * r, r ? 1.0f / sqrtf((float)r) : 0.0f, &g_rng);
        scale[s] = (s % 3 == 0) ? 2.0f : (s % 3 == 1 ? 0.5f : -1.0f);
        tot += r * in + out * r + 2;
    }
    float *x = malloc((size_t)(n * in) * 4), *y0 = malloc((size_t)(n * out) * 4);
    gh_randn_bf16(x, n * in, 1.0f, &g_rng);
    gh_randn_bf16(y0, n * out, 1.0f, &g_rng);
    int32_t *slot = malloc((size_t)n * 4);
    for (int64_t t = 0; t < n; t++)
        slot[t] = c->scatter ? (int32_t)(test_rng_u64(&g_rng) % (uint64_t)(ns + 1)) - 1
                             : c->uniform_slot;
    int32_t uniform = c->hint ? c->uniform_slot : -1;

    float *ref = malloc((size_t)(n * out) * 4), *got = malloc((size_t)(n * out) * 4);
    qlr_lora_ref *Lh = malloc((size_t)ns * sizeof *Lh);
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_act(be, x, n * in), by = gh_act(be, y0, n * out);
        gh_buf bslot = gh_raw(be, slot, (size_t)n * 4);
        gh_buf *bab = calloc((size_t)2 * ns, sizeof *bab), pack = {0};
        if (c->packed) {
            float *h = calloc((size_t)tot, 4);
            int64_t off = 0;
            int64_t *offs = malloc((size_t)2 * ns * 8);
            for (int32_t s = 0; s < ns; s++) {
                int32_t r = c->ranks[s];
                offs[2 * s] = ++off; /* one pad element: 2-byte offsets on the GPU */
                memcpy(h + off, A[s], (size_t)(r * in) * 4);
                off += r * in;
                offs[2 * s + 1] = ++off;
                memcpy(h + off, B[s], (size_t)(out * r) * 4);
                off += out * r;
            }
            pack = gh_act(be, h, tot);
            size_t es = qlr_backend_act_size(be);
            for (int32_t s = 0; s < ns; s++)
                Lh[s] = (qlr_lora_ref){(char *)pack.p + offs[2 * s] * es,
                                       (char *)pack.p + offs[2 * s + 1] * es, c->ranks[s],
                                       scale[s]};
            free(h);
            free(offs);
        } else {
            for (int32_t s = 0; s < ns; s++) {
                int32_t r = c->ranks[s];
                bab[2 * s] = gh_act(be, A[s], r * in);
                bab[2 * s + 1] = gh_act(be, B[s], out * r);
                Lh[s] = (qlr_lora_ref){bab[2 * s].p, bab[2 * s + 1].p, r, scale[s]};
            }
        }
        gh_buf bL = gh_raw(be, Lh, ns * sizeof *Lh);
        CHECK_OK(be->ops.lora_batched(be, by.p, bx.p, bL.p, Lh, ns, bslot.p, max_r, uniform, n,
                                      in, out));
        gh_read_act(be, by.p, k ? got : ref, n * out);
        gh_free_checked(be, &by, "lora_batched y");
        gh_free_checked(be, &bx, "lora_batched x");
        gh_free_checked(be, &bslot, "lora_batched slot");
        gh_free_checked(be, &bL, "lora_batched table");
        gh_free_checked(be, &pack, "lora_batched packed A/B");
        for (int32_t i = 0; i < 2 * ns; i++) gh_free_checked(be, &bab[i], "lora_batched A/B");
        free(bab);
    }

    /* Per element: |got - ref| <= 2^-8·(1 + 2^-9)·M + 2·(in + r + 2)·2^-24·Mf, with M = |y0| +
     * |scale|·Σ_j |u_j|·|B_oj| and Mf the same with |u_j| replaced by Σ_k |x_k·A_jk|. Why: the
     * dense path rounds u to bf16 (2^-9 of each |u_j|: at most 2^-9·M on the sum) and every
     * path rounds y to bf16 once (2^-9 of a value at most (1 + 2^-9)·M); both sides sum the same
     * f32 products in different orders (each within (in + r + 2)·2^-24·Mf of the exact value).
     * Untouched rows (slot -1, r = 0) must keep y0's bits on both. */
    int64_t bad = 0, untouched_bad = 0, adapted = 0, worst = -1;
    double wratio = 0;
    double *u = malloc((size_t)(max_r > 0 ? max_r : 1) * 8), *U = malloc((size_t)(max_r > 0 ? max_r : 1) * 8);
    for (int64_t t = 0; t < n; t++) {
        int32_t s = slot[t];
        const float *yg = got + t * out, *yr = ref + t * out, *yo = y0 + t * out;
        if (s < 0 || c->ranks[s] == 0) {
            for (int64_t o = 0; o < out; o++) untouched_bad += yg[o] != yo[o] || yr[o] != yo[o];
            continue;
        }
        adapted++;
        int32_t r = c->ranks[s];
        for (int32_t j = 0; j < r; j++) {
            double a = 0, m = 0;
            for (int64_t k = 0; k < in; k++) {
                double p = (double)x[t * in + k] * A[s][j * in + k];
                a += p;
                m += fabs(p);
            }
            u[j] = a;
            U[j] = m;
        }
        double gamma = 2.0 * (double)(in + r + 2) * 0x1p-24;
        for (int64_t o = 0; o < out; o++) {
            double M = fabs(yo[o]), Mf = fabs(yo[o]);
            for (int32_t j = 0; j < r; j++) {
                double b = fabs(scale[s]) * fabs(B[s][o * r + j]);
                M += fabs(u[j]) * b;
                Mf += U[j] * b;
            }
            double tol = 0x1p-8 * (1 + 0x1p-9) * M + gamma * Mf;
            double e = fabs((double)yg[o] - yr[o]);
            if (!(e <= tol)) {
                bad++;
                if (worst < 0 || e / tol > wratio) wratio = e / tol, worst = t * out + o;
            }
        }
    }
    char what[160];
    snprintf(what, sizeof what, "n=%lld in=%lld out=%lld slots=%d max_r=%d %s%s%s",
             (long long)n, (long long)in, (long long)out, ns, max_r,
             c->scatter ? "scattered" : "uniform", c->hint ? " hint" : "",
             c->packed ? " packed" : "");
    printf("  lora_batched %-70s %s\n", what, bad || untouched_bad ? "FAIL" : "ok");
    CHECK_MSG(bad == 0, "lora_batched %s: %lld values out of tolerance; worst [%lld] got %.6g ref "
              "%.6g (%.3g x tolerance)", what, (long long)bad, (long long)worst,
              worst >= 0 ? got[worst] : 0.0, worst >= 0 ? ref[worst] : 0.0, wratio);
    CHECK_MSG(untouched_bad == 0, "lora_batched %s: %lld values of slot -1 / r = 0 rows changed",
              what, (long long)untouched_bad);
    /* the comparison above means something only if the CPU op did change adapted rows */
    if (adapted) {
        int64_t changed = 0;
        for (int64_t i = 0; i < n * out; i++) changed += ref[i] != y0[i];
        CHECK_MSG(changed > 0, "lora_batched %s: the reference changed nothing", what);
    }
    for (int32_t s = 0; s < ns; s++) free(A[s]), free(B[s]);
    free(A), free(B), free(scale), free(x), free(y0), free(slot), free(ref), free(got), free(Lh),
        free(u), free(U);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    static const int32_t r1[1] = {8};
    static const int32_t r3[3] = {4, 16, 64};
    static const int32_t r17[17] = {4, 8, 16, 64, 8, 4, 0, 64, 16, 8, 4, 16, 64, 8, 4, 16, 8};
    static const int32_t r4z[4] = {0, 8, 64, 4};
    const int64_t ns_[] = {1, 2, 5, 31, 64, 129, 300};
    const int64_t shapes[][2] = {{576, 192}, {576, 1536}, {1536, 576}, {576, 576}};
    /* scattered slots over every (n, shape) with 3 and 17 slots */
    for (size_t i = 0; i < sizeof ns_ / sizeof ns_[0]; i++)
        for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
            lb_case c3 = {ns_[i], shapes[k][0], shapes[k][1], 3, r3, 1, 0, 0, 0};
            run_case(&c3);
            lb_case c17 = {ns_[i], shapes[k][0], shapes[k][1], 17, r17, 1, 0, 0, 0};
            run_case(&c17);
        }
    /* one slot: the mixed kernels on a one-slot table, then the dense path (hint) */
    for (size_t i = 0; i < sizeof ns_ / sizeof ns_[0]; i++) {
        lb_case a = {ns_[i], 576, 576, 1, r1, 0, 0, 0, 0};
        run_case(&a);
        lb_case b = {ns_[i], 576, 1536, 1, r1, 0, 0, 1, 0};
        run_case(&b);
    }
    /* the hint with several slots in the table, a uniform batch without the hint, and the hint
     * naming a slot with r = 0 (nothing changes) */
    lb_case h1 = {300, 1536, 576, 17, r17, 0, 3, 1, 0};
    run_case(&h1);
    lb_case h2 = {129, 576, 192, 17, r17, 0, 3, 0, 0};
    run_case(&h2);
    lb_case h3 = {64, 576, 576, 4, r4z, 0, 0, 1, 0};
    run_case(&h3);
    /* odd in / out (scalar loads) and A/B at 2-byte offsets */
    lb_case o1 = {37, 70, 33, 3, r3, 1, 0, 0, 0};
    run_case(&o1);
    lb_case o2 = {300, 576, 192, 17, r17, 1, 0, 0, 1};
    run_case(&o2);
    lb_case o3 = {31, 1536, 576, 4, r4z, 1, 0, 0, 1};
    run_case(&o3);
    gh_done();
    return test_finish();
}
