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
    int32_t ns = c->n_slots;
    gh_lora_set set;
    gh_lora_make(&set, ns, c->ranks, in, out, &g_rng);
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
    gh_buf *bab = malloc((size_t)2 * ns * sizeof *bab), pack;
    for (int k = 0; k < 2; k++) {
        qlr_backend *be = k ? g_gpu : g_cpu;
        gh_buf bx = gh_act(be, x, n * in), by = gh_act(be, y0, n * out);
        gh_buf bslot = gh_raw(be, slot, (size_t)n * 4);
        gh_lora_upload(be, &set, c->packed, Lh, bab, &pack);
        gh_buf bL = gh_raw(be, Lh, ns * sizeof *Lh);
        CHECK_OK(be->ops.lora_batched(be, by.p, bx.p, bL.p, Lh, ns, bslot.p, set.max_r, uniform,
                                      n, in, out));
        gh_read_act(be, by.p, k ? got : ref, n * out);
        gh_free_checked(be, &by, "lora_batched y");
        gh_free_checked(be, &bx, "lora_batched x");
        gh_free_checked(be, &bslot, "lora_batched slot");
        gh_free_checked(be, &bL, "lora_batched table");
        gh_lora_free_dev(be, &set, bab, &pack, "lora_batched");
    }

    /* gh_lora_check's bound; the dense (uniform-hint) path goes through cuBLASLt: 2^-7 there */
    gh_lora_err e;
    gh_lora_check(&set, x, y0, slot, n, got, ref, NULL, c->hint, &e);
    char what[160];
    snprintf(what, sizeof what, "n=%lld in=%lld out=%lld slots=%d max_r=%d %s%s%s",
             (long long)n, (long long)in, (long long)out, ns, set.max_r,
             c->scatter ? "scattered" : "uniform", c->hint ? " hint" : "",
             c->packed ? " packed" : "");
    printf("  lora_batched %-70s %s\n", what, e.bad || e.untouched_bad ? "FAIL" : "ok");
    CHECK_MSG(e.bad == 0, "lora_batched %s: %lld values out of tolerance; worst [%lld] got %.6g "
              "ref %.6g (%.3g x tolerance)", what, (long long)e.bad, (long long)e.worst,
              e.worst >= 0 ? got[e.worst] : 0.0, e.worst >= 0 ? ref[e.worst] : 0.0,
              e.worst_ratio);
    CHECK_MSG(e.untouched_bad == 0, "lora_batched %s: %lld values of slot -1 / r = 0 rows changed",
              what, (long long)e.untouched_bad);
    /* the comparison above means something only if the CPU op did change adapted rows */
    if (e.adapted) {
        int64_t changed = 0;
        for (int64_t i = 0; i < n * out; i++) changed += ref[i] != y0[i];
        CHECK_MSG(changed > 0, "lora_batched %s: the reference changed nothing", what);
    }
    gh_lora_free(&set);
    free(x), free(y0), free(slot), free(ref), free(got), free(Lh), free(bab);
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
