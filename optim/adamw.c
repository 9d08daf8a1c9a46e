/* optim/adamw.c: the AdamW step functions of the CPU backend: bitsandbytes' blockwise 8-bit
 * AdamW (kOptimizerStatic8bit2StateBlockwise, bnb >= 0.44: block 256), bnb's 32-bit AdamW
 * kernel (used for tensors under 4096 elements in 8-bit mode) and PyTorch's AdamW. Spec:
 * ../shared/specs/FORMATS.md §2.3. State allocation and serialization live in adamw_state.c.
 * Everything is float32 arithmetic in the order the reference kernels use; this file is built
 * with -ffp-contract=off so that the results do not depend on the compiler fusing a*b+c.
 * Known rounding-level differences from bnb's CUDA kernel (a GPU run may differ by ulps):
 * exact division where it uses __fdividef, libm powf for __powf, no FMA contraction. bnb's
 * pure-PyTorch/CPU path differs more: weight decay first, no sign fix, no non-finite guard. */
#include "optim/optim.h"

#include <math.h>

#include "core/threads.h"
#include "quant/nf4.h"

qlr_adamw_hparams qlr_adamw_default_hparams(void) {
    qlr_adamw_hparams h = {.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                           .weight_decay = 1e-2f, .gnorm_scale = 1.0f};
    return h;
}

uint8_t qlr_adamw8_quantize_code(const float *map, int is_signed, float x) {
    /* bnb's quantize_2D: binary search over the sorted map (7 halvings from 127 reach any index
     * in 0..254), keeping the last entries seen above and below x, then a midpoint comparison
     * with the neighbour on x's side. NaN compares false everywhere and ends on index 0. */
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

/* ------------------------------------------------------------------ 8-bit blockwise */

typedef struct adamw8_ctx {
    float *p;
    const float *g;
    uint8_t *code1, *code2;
    float *absmax1, *absmax2;
    int64_t n;
    float b1, b2, eps, lr, wd, gnorm_scale, c2, step_size;
} adamw8_ctx;

static void adamw8_blocks(void *vctx, int64_t b0, int64_t b1, int tid) {
    const adamw8_ctx *c = vctx;
    const float *q1 = qlr_dynmap_signed, *q2 = qlr_dynmap_unsigned;
    float m[QLR_ADAMW8_BLOCK], v[QLR_ADAMW8_BLOCK];
    for (int64_t b = b0; b < b1; b++) {
        int64_t i0 = b * QLR_ADAMW8_BLOCK;
        int len = (int)(c->n - i0 < QLR_ADAMW8_BLOCK ? c->n - i0 : QLR_ADAMW8_BLOCK);
        const float *g = c->g + i0;
        float *p = c->p + i0;
        uint8_t *s1 = c->code1 + i0, *s2 = c->code2 + i0;
        const float old1 = c->absmax1[b], old2 = c->absmax2[b];

        /* 1. dequantize with the OLD scales and update the moments. A non-finite gradient
         *    element resets its moments to 0 (bnb's CUDA kernel; its CPU path does not). */
        float amax1 = 0.0f, amax2 = 0.0f;
        for (int j = 0; j < len; j++) {
            float gj = g[j];
            if (isfinite(gj)) {
                float gs = gj * c->gnorm_scale;
                float vj = q2[s2[j]] * old2;
                vj = vj * c->b2 + ((1.0f - c->b2) * gs) * gs;
                float mj = q1[s1[j]] * old1;
                mj = mj * c->b1 + (1.0f - c->b1) * gs;
                m[j] = mj;
                v[j] = vj;
            } else {
                m[j] = 0.0f;
                v[j] = 0.0f;
            }
            amax1 = fmaxf(amax1, fabsf(m[j]));
            amax2 = fmaxf(amax2, fabsf(v[j]));
        }
        /* The CUDA kernel pads a partial last block with g = 0, code1 = 128, code2 = 0 and
         * lets the padding enter the max: m_pad = q1[128]*old1*b1 (~5.5e-7 * old1), v_pad = 0.
         * It only matters when every real |m| of the block is below that; kept for fidelity. */
        if (len < QLR_ADAMW8_BLOCK) amax1 = fmaxf(amax1, fabsf(q1[128] * old1 * c->b1 + 0.0f));

        /* 2. new block scales, from the updated moments */
        c->absmax1[b] = amax1;
        c->absmax2[b] = amax2;

        /* 3. parameter update (finite gradients only), then decoupled weight decay.
         *    Order: weight decay AFTER the Adam update, as bnb's CUDA kernels do (both 8- and
         *    32-bit). We follow the CUDA kernel rather than PyTorch's order (decay first)
         *    because 8-bit AdamW users run bnb on GPUs, our CUDA backend mirrors this function
         *    and this CPU code is its oracle. The difference is O(lr*wd*update). */
        for (int j = 0; j < len; j++) {
            if (!isfinite(g[j])) continue;
            float pj = p[j] + c->step_size * (m[j] / (sqrtf(v[j]) + c->c2 * c->eps));
            if (c->wd > 0.0f) pj = pj * (1.0f - c->lr * c->wd);
            p[j] = pj;
        }

        /* 4. requantize with the NEW scales. The division by absmax 0 (an all-zero block) gives
         *    NaN, which the search maps to code 0, and the sign fix below turns into 255 for
         *    m = +0: both decode to 0 with absmax 0, bit for bit what bnb's kernel stores.
         *    Sign fix (bnb CUDA): when the chosen m code's sign bit differs from m's, move one
         *    code toward m's sign, so a tiny negative m never decodes to +0 or a positive. */
        for (int j = 0; j < len; j++) {
            float x1 = m[j] / amax1, x2 = v[j] / amax2;
            uint8_t k1 = qlr_adamw8_quantize_code(q1, 1, x1);
            if ((signbit(q1[k1]) != 0) != (signbit(m[j]) != 0)) {
                if (m[j] > 0.0f) k1 = (uint8_t)(k1 + 1);
                else k1 = (uint8_t)(k1 - 1);
            }
            s1[j] = k1;
            s2[j] = qlr_adamw8_quantize_code(q2, 0, x2);
        }
    }
}

void qlr_adamw8bit_step(float *p, const float *g, uint8_t *code1, uint8_t *code2, float *absmax1,
                        float *absmax2, int64_t n, const qlr_adamw_hparams *hp, int64_t t) {
    QLR_ASSERT(t >= 1 && n >= 0);
    if (n == 0) return;
    adamw8_ctx c = {.p = p, .g = g, .code1 = code1, .code2 = code2, .absmax1 = absmax1,
                    .absmax2 = absmax2, .n = n, .b1 = hp->beta1, .b2 = hp->beta2, .eps = hp->eps,
                    .lr = hp->lr, .wd = hp->weight_decay, .gnorm_scale = hp->gnorm_scale};
    /* bias corrections in float32 as the kernel computes them */
    float c1 = 1.0f - powf(hp->beta1, (float)t);
    c.c2 = sqrtf(1.0f - powf(hp->beta2, (float)t));
    c.step_size = (-hp->lr * c.c2) / c1;
    int64_t nb = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
    qlr_parallel_for(nb, 16, adamw8_blocks, &c);
}

/* ------------------------------------------------------------------ 32-bit, bnb kernel */

typedef struct adamw32_ctx {
    float *p;
    const float *g;
    float *m, *v;
    float b1, b2, eps, lr, wd, gnorm_scale, c2, step_size;
    /* torch variant */
    float decay, bc2_sqrt, neg_step, lerp_w, one_m_b2;
} adamw32_ctx;

static void adamw32_bnb_range(void *vctx, int64_t i0, int64_t i1, int tid) {
    const adamw32_ctx *c = vctx;
    for (int64_t i = i0; i < i1; i++) {
        float g = c->gnorm_scale * c->g[i];
        float m = c->m[i] * c->b1 + (1.0f - c->b1) * g;
        float v = c->v[i] * c->b2 + (1.0f - c->b2) * (g * g);
        float p = c->p[i] + c->step_size * (m / (sqrtf(v) + c->eps * c->c2));
        if (c->wd > 0.0f) p = p * (1.0f - c->lr * c->wd); /* after the update, as bnb's kernel */
        c->m[i] = m;
        c->v[i] = v;
        c->p[i] = p;
    }
}

void qlr_adamw32_bnb_step(float *p, const float *g, float *m, float *v, int64_t n,
                          const qlr_adamw_hparams *hp, int64_t t) {
    QLR_ASSERT(t >= 1 && n >= 0);
    if (n == 0) return;
    adamw32_ctx c = {.p = p, .g = g, .m = m, .v = v, .b1 = hp->beta1, .b2 = hp->beta2,
                     .eps = hp->eps, .lr = hp->lr, .wd = hp->weight_decay,
                     .gnorm_scale = hp->gnorm_scale};
    float c1 = 1.0f - powf(hp->beta1, (float)t);
    c.c2 = sqrtf(1.0f - powf(hp->beta2, (float)t));
    c.step_size = (-hp->lr * c.c2) / c1;
    qlr_parallel_for(n, 4096, adamw32_bnb_range, &c);
}

/* ------------------------------------------------------------------ 32-bit, PyTorch */

static void adamw32_torch_range(void *vctx, int64_t i0, int64_t i1, int tid) {
    const adamw32_ctx *c = vctx;
    const float w = c->lerp_w; /* 1 - beta1, the lerp weight */
    for (int64_t i = i0; i < i1; i++) {
        float g = c->g[i] * c->gnorm_scale;
        float p = c->p[i] * c->decay; /* decoupled decay BEFORE the update (PyTorch order) */
        float m = c->m[i];
        m = (w < 0.5f) ? m + w * (g - m) : g - (g - m) * (1.0f - w); /* torch.lerp */
        float v = c->v[i] * c->b2 + (c->one_m_b2 * g) * g; /* mul_(b2).addcmul_(g, g, 1-b2) */
        float denom = sqrtf(v) / c->bc2_sqrt + c->eps;
        p = p + (c->neg_step * m) / denom;
        c->m[i] = m;
        c->v[i] = v;
        c->p[i] = p;
    }
}

void qlr_adamw32_torch_step(float *p, const float *g, float *m, float *v, int64_t n,
                            const qlr_adamw_hparams *hp, int64_t t) {
    QLR_ASSERT(t >= 1 && n >= 0);
    if (n == 0) return;
    /* PyTorch computes these scalars in double (Python floats) and casts them to the tensor's
     * float32 when it applies them. */
    double lr = hp->lr, b1 = hp->beta1, b2 = hp->beta2;
    double bc1 = 1.0 - pow(b1, (double)t), bc2 = 1.0 - pow(b2, (double)t);
    adamw32_ctx c = {.p = p, .g = g, .m = m, .v = v, .b1 = hp->beta1, .b2 = hp->beta2,
                     .eps = hp->eps, .lr = hp->lr, .wd = hp->weight_decay,
                     .gnorm_scale = hp->gnorm_scale};
    c.decay = (float)(1.0 - lr * (double)hp->weight_decay);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.neg_step = (float)(-(lr / bc1));
    c.lerp_w = (float)(1.0 - b1);
    c.one_m_b2 = (float)(1.0 - b2);
    qlr_parallel_for(n, 4096, adamw32_torch_range, &c);
}

/* ------------------------------------------------------------------ dispatch */

qlr_status qlr_adamw_step(qlr_adamw_state *s, float *p, const float *g, const qlr_adamw_hparams *hp) {
    switch (s->kind) {
    case QLR_ADAMW_KIND_TORCH32:
        s->step++;
        qlr_adamw32_torch_step(p, g, s->m, s->v, s->n, hp, s->step);
        return QLR_OK;
    case QLR_ADAMW_KIND_BNB32:
        s->step++;
        qlr_adamw32_bnb_step(p, g, s->m, s->v, s->n, hp, s->step);
        return QLR_OK;
    case QLR_ADAMW_KIND_BNB8:
        s->step++;
        qlr_adamw8bit_step(p, g, s->code1, s->code2, s->absmax1, s->absmax2, s->n, hp, s->step);
        return QLR_OK;
    default:
        return qlr_errorf(QLR_ERR_INVALID, "adamw: unknown optimizer state kind %d", (int)s->kind);
    }
}
