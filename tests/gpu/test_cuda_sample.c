/* tests/gpu/test_cuda_sample.c: GPU sampling against the CPU reference on the same logits and
 * the same per-sequence RNG states: greedy (ties to the lowest id), temperature alone, top-k,
 * top-p, all three, top_k = 1, large and small vocabularies, flat and peaked distributions and
 * exact ties. The chosen ids and the advanced RNG states must be identical. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tests/gpu/gpu_harness.h"
#include "tests/test_util.h"

static uint64_t rng = 0x5a;

static void run(const char *name, int64_t n, int64_t vocab, float spread, int ties,
                qlr_sampling sp) {
    float *lg = malloc((size_t)(n * vocab) * 4);
    for (int64_t i = 0; i < n * vocab; i++) lg[i] = spread * test_rng_normal(&rng);
    if (ties)
        for (int64_t i = 0; i < n * vocab; i++) lg[i] = roundf(lg[i]); /* many exact ties */
    qlr_sampling *ps = malloc((size_t)n * sizeof *ps);
    uint64_t *r1 = malloc((size_t)n * 8), *r2 = malloc((size_t)n * 8);
    for (int64_t i = 0; i < n; i++) {
        ps[i] = sp;
        r1[i] = r2[i] = 1000 + (uint64_t)i * 7919;
    }
    int32_t *id1 = malloc((size_t)n * 4), *id2 = malloc((size_t)n * 4);
    int agree = 1;
    for (int step = 0; step < 3; step++) {
        float *cl = malloc((size_t)(n * vocab) * 4);
        memcpy(cl, lg, (size_t)(n * vocab) * 4); /* the CPU op may modify its logits */
        CHECK_OK(g_cpu->ops.sample(g_cpu, id1, cl, ps, r1, n, vocab));
        gh_buf gl = gh_raw(g_gpu, lg, (size_t)(n * vocab) * 4);
        CHECK_OK(g_gpu->ops.sample(g_gpu, id2, gl.p, ps, r2, n, vocab));
        gh_free_checked(g_gpu, &gl, "logits");
        for (int64_t i = 0; i < n; i++)
            if (id1[i] != id2[i] || r1[i] != r2[i]) {
                if (agree)
                    test_fail_(__FILE__, __LINE__, "sample %s step %d row %lld: gpu %d cpu %d", name,
                               step, (long long)i, id2[i], id1[i]);
                agree = 0;
            }
        free(cl);
    }
    CHECK_MSG(agree, "sample %s: ids differ", name);
    printf("  sample %-40s n=%lld vocab=%lld %s\n", name, (long long)n, (long long)vocab,
           agree ? "ok" : "FAIL");
    free(lg); free(ps); free(r1); free(r2); free(id1); free(id2);
}

int main(void) {
    if (!gh_init()) {
        CHECK_MSG(0, "no usable CUDA device (this test is label gpu: run it on a GPU machine)");
        return test_finish();
    }
    qlr_sampling greedy = {0.0f, 0, 1.0f}, temp = {0.8f, 0, 1.0f}, topk = {1.0f, 40, 1.0f};
    qlr_sampling topp = {0.7f, 0, 0.9f}, all3 = {0.9f, 50, 0.95f}, k1 = {1.0f, 1, 1.0f};
    run("greedy", 16, 49152, 2.0f, 0, greedy);
    run("greedy ties", 8, 1000, 0.5f, 1, greedy);
    run("temperature", 32, 49152, 2.0f, 0, temp);
    run("temperature flat", 8, 128256, 0.1f, 0, temp);
    run("top-k 40", 32, 49152, 2.0f, 0, topk);
    run("top-k ties", 16, 1000, 0.5f, 1, topk);
    run("top-p 0.9", 32, 49152, 3.0f, 0, topp);
    run("top-p ties", 16, 777, 0.7f, 1, topp);
    run("temp+top-k+top-p", 64, 128256, 3.0f, 0, all3);
    run("top_k=1", 4, 5000, 1.0f, 0, k1);
    run("one row vocab 3", 1, 3, 1.0f, 0, all3);
    gh_done();
    return test_finish();
}
