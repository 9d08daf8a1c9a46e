/* backend/adamw_internal.h: what every backend's adamw_step op shares so that their results
 * agree bit for bit: the per-call scalars (bias corrections, step size, decay factors), computed
 * on the host once per call by one function, and bitsandbytes' nearest-code search over a
 * 256-entry dynamic map (host and device code). Not a public header: backend/cpu and
 * backend/cuda include it. A file that includes it must be compiled without FMA contraction
 * (gcc -ffp-contract=off; nvcc -Xcompiler=-ffp-contract=off) so that the scalar expressions
 * below round the same way in every backend. The per-element math lives in each backend
 * (cpu/ops_optim.c is the reference, cuda/optim.cu mirrors it operation for operation). */
#ifndef QLR_BACKEND_ADAMW_INTERNAL_H
#define QLR_BACKEND_ADAMW_INTERNAL_H

#include <math.h>
#include <stdint.h>

#include "backend/backend.h"

#ifdef __CUDACC__
#define QLR_ADAMW_HD __host__ __device__
#else
#define QLR_ADAMW_HD
#endif

/* The scalars of one adamw_step call (t = the already incremented step). Passed by value to
 * the device kernels; every field is what the CPU op uses, bit for bit. */
typedef struct qlr_adamw_consts {
    float b1, b2, eps, gnorm_scale;
    /* BNB8 / BNB32: float32, as bnb's kernels compute them */
    float one_m_b1;     /* 1 - b1 */
    float one_m_b2;     /* 1 - b2 */
    float c2;           /* sqrtf(1 - powf(b2, t)) */
    float c2_eps;       /* c2 * eps (IEEE products commute: also eps * c2) */
    float step_size;    /* (-lr * c2) / (1 - powf(b1, t)) */
    int32_t decay_on;   /* wd > 0 (bnb applies the decay only then) */
    float decay;        /* 1 - lr * wd, applied AFTER the Adam update */
    /* TORCH32: PyTorch computes these in double (Python floats) and casts to float32 */
    float t_decay;      /* (float)(1 - lr * wd), applied BEFORE the update */
    float t_bc2_sqrt;   /* (float)sqrt(1 - b2^t) */
    float t_neg_step;   /* (float)(-(lr / (1 - b1^t))) */
    float t_lerp_w;     /* (float)(1 - b1), torch.lerp's weight */
    float t_one_m_b2;   /* (float)(1 - b2) */
} qlr_adamw_consts;

/* Cannot fail; t >= 1. */
static inline qlr_adamw_consts qlr_adamw_consts_make(const qlr_adamw_hparams *hp, int64_t t) {
    qlr_adamw_consts k;
    k.b1 = hp->beta1;
    k.b2 = hp->beta2;
    k.eps = hp->eps;
    k.gnorm_scale = hp->gnorm_scale;
    k.one_m_b1 = 1.0f - hp->beta1;
    k.one_m_b2 = 1.0f - hp->beta2;
    float c1 = 1.0f - powf(hp->beta1, (float)t);
    k.c2 = sqrtf(1.0f - powf(hp->beta2, (float)t));
    k.c2_eps = k.c2 * hp->eps;
    k.step_size = (-hp->lr * k.c2) / c1;
    k.decay_on = hp->weight_decay > 0.0f;
    k.decay = 1.0f - hp->lr * hp->weight_decay;
    double lr = hp->lr, b1 = hp->beta1, b2 = hp->beta2;
    double bc1 = 1.0 - pow(b1, (double)t), bc2 = 1.0 - pow(b2, (double)t);
    k.t_decay = (float)(1.0 - lr * (double)hp->weight_decay);
    k.t_bc2_sqrt = (float)sqrt(bc2);
    k.t_neg_step = (float)(-(lr / bc1));
    k.t_lerp_w = (float)(1.0 - b1);
    k.t_one_m_b2 = (float)(1.0 - b2);
    return k;
}

/* bnb's quantize_2D search: a 7-level binary search from index 127 over the ascending map,
 * keeping the last entries seen above and below x, then a float32 midpoint comparison with the
 * neighbour on x's side. Ties go to the index the search ended on; NaN compares false
 * everywhere and ends on index 0. `is_signed` only sets the lower bound (-1 or 0). The only
 * arithmetic is (a + b) * 0.5f, which no compiler can contract. */
static inline QLR_ADAMW_HD uint8_t qlr_adamw8_search(const float *map, int is_signed, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = is_signed ? -1.0f : 0.0f, upper = 1.0f;
    float val = map[127];
    for (int step = 64; step > 0; step >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= step;
        }
        val = map[pivot];
    }
    if (x > val) {
        float mid = (upper + val) * 0.5f;
        return (uint8_t)(x > mid ? upper_pivot : pivot);
    }
    float mid = (lower + val) * 0.5f;
    return (uint8_t)(x < mid ? lower_pivot : pivot);
}

#endif
