/* optim/clip.c: global-norm gradient clipping over a list of fp32 gradient tensors, with the
 * semantics of torch.nn.utils.clip_grad_norm_ (factor max_norm / (norm + 1e-6), clamped to 1).
 * The norm is accumulated in double per fixed chunk and the partials summed in chunk order,
 * so the result does not depend on how threads are scheduled. A NaN/Inf norm is reported and
 * nothing is scaled: the trainer decides (skip the step, stop the run). */
#include "optim/optim.h"

#include <math.h>
#include <stdlib.h>

#include "core/threads.h"

#define CLIP_CHUNK 16384

typedef struct clip_ctx {
    const float *x;
    int64_t n;
    double *partial; /* [n_chunks] */
    float scale;
    float *y;
} clip_ctx;

static void sumsq_chunks(void *vctx, int64_t c0, int64_t c1, int tid) {
    clip_ctx *c = vctx;
    for (int64_t ch = c0; ch < c1; ch++) {
        int64_t i0 = ch * CLIP_CHUNK, i1 = i0 + CLIP_CHUNK < c->n ? i0 + CLIP_CHUNK : c->n;
        double s = 0.0;
        for (int64_t i = i0; i < i1; i++) s += (double)c->x[i] * (double)c->x[i];
        c->partial[ch] = s;
    }
}

static void scale_range(void *vctx, int64_t i0, int64_t i1, int tid) {
    clip_ctx *c = vctx;
    for (int64_t i = i0; i < i1; i++) c->y[i] *= c->scale;
}

float qlr_clip_grad_norm(float *const *grads, const int64_t *ns, int n_tensors, float max_norm,
                         int *nonfinite) {
    double total = 0.0;
    double stack_partial[64];
    for (int t = 0; t < n_tensors; t++) {
        int64_t n = ns[t];
        if (n <= 0) continue;
        int64_t nch = (n + CLIP_CHUNK - 1) / CLIP_CHUNK;
        double *partial = nch <= 64 ? stack_partial : malloc((size_t)nch * sizeof(double));
        if (!partial) { /* out of memory: fall back to one serial pass */
            double s = 0.0;
            for (int64_t i = 0; i < n; i++) s += (double)grads[t][i] * (double)grads[t][i];
            total += s;
            continue;
        }
        clip_ctx c = {.x = grads[t], .n = n, .partial = partial};
        qlr_parallel_for(nch, 1, sumsq_chunks, &c);
        for (int64_t ch = 0; ch < nch; ch++) total += partial[ch];
        if (partial != stack_partial) free(partial);
    }
    float norm = (float)sqrt(total);
    int bad = !isfinite(norm);
    if (nonfinite) *nonfinite = bad;
    if (bad || !(max_norm > 0.0f)) return norm;
    float coef = max_norm / (norm + 1e-6f);
    if (coef < 1.0f) {
        for (int t = 0; t < n_tensors; t++) {
            if (ns[t] <= 0) continue;
            clip_ctx c = {.y = grads[t], .n = ns[t], .scale = coef};
            qlr_parallel_for(ns[t], 16384, scale_range, &c);
        }
    }
    return norm;
}
