/* backend/cpu/ops_optim.c: the CPU optimizer ops, the oracle of every backend's: one AdamW
 * update of each kind (bitsandbytes' blockwise 8-bit kernel kOptimizerStatic8bit2StateBlockwise,
 * bnb >= 0.44, block 256; bnb's 32-bit kernel, used for tensors under 4096 elements in 8-bit
 * mode; PyTorch's AdamW; math in optim/optim.h, spec docs/FORMATS.md §2.3), the
 * chunked f64 sum of squares of gradient clipping, f32 scaling and the f32 -> act copy.
 * float32 arithmetic in the order the reference kernels use; built with -ffp-contract=off so
 * that no compiler fuses a*b+c (tests compare bits with bnb's reference and with the CUDA ops).
 * Known rounding-level differences from bnb's own CUDA kernel: exact division where it uses
 * __fdividef, libm powf for __powf, no FMA contraction. bnb's pure-PyTorch/CPU path differs
 * more: weight decay first, no sign fix, no non-finite guard. The optimizer state (allocation,
 * serialization) belongs to optim/; this file only steps arrays it is given. */
#include "backend/cpu/cpu_optim.h"

#include <math.h>
#include <string.h>

#include "backend/adamw_internal.h"
#include "backend/cpu/cpu_internal.h"
#include "core/threads.h"

uint8_t qlr_cpu_adamw8_code(const float *map, int is_signed, float x) {
    return qlr_adamw8_search(map, is_signed, x);
}

/* ------------------------------------------------------------------ 8-bit blockwise */

typedef struct adamw8_ctx {
    float *p;
    const float *g;
    uint8_t *code1, *code2;
    float *absmax1, *absmax2;
    int64_t n;
    qlr_adamw_consts k;
} adamw8_ctx;

static void adamw8_blocks(void *vctx, int64_t b0, int64_t b1, int tid) {
    const adamw8_ctx *c = vctx;
    const qlr_adamw_consts *k = &c->k;
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
                float gs = gj * k->gnorm_scale;
                float vj = q2[s2[j]] * old2;
                vj = vj * k->b2 + (k->one_m_b2 * gs) * gs;
                float mj = q1[s1[j]] * old1;
                mj = mj * k->b1 + k->one_m_b1 * gs;
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
        if (len < QLR_ADAMW8_BLOCK) amax1 = fmaxf(amax1, fabsf(q1[128] * old1 * k->b1 + 0.0f));

        /* 2. new block scales, from the updated moments */
        c->absmax1[b] = amax1;
        c->absmax2[b] = amax2;

        /* 3. parameter update (finite gradients only), then decoupled weight decay.
         *    Order: weight decay AFTER the Adam update, as bnb's CUDA kernels do (both 8- and
         *    32-bit). We follow the CUDA kernel rather than PyTorch's order (decay first)
         *    because 8-bit AdamW users run bnb on GPUs, and this CPU code is the oracle of our
         *    CUDA op. The difference is O(lr*wd*update). */
        for (int j = 0; j < len; j++) {
            if (!isfinite(g[j])) continue;
            float pj = p[j] + k->step_size * (m[j] / (sqrtf(v[j]) + k->c2_eps));
            if (k->decay_on) pj = pj * k->decay;
            p[j] = pj;
        }

        /* 4. requantize with the NEW scales. The division by absmax 0 (an all-zero block) gives
         *    NaN, which the search maps to code 0, and the sign fix below turns into 255 for
         *    m = +0: both decode to 0 with absmax 0, bit for bit what bnb's kernel stores.
         *    Sign fix (bnb CUDA): when the chosen m code's sign bit differs from m's, move one
         *    code toward m's sign, so a tiny negative m never decodes to +0 or a positive. */
        for (int j = 0; j < len; j++) {
            float x1 = m[j] / amax1, x2 = v[j] / amax2;
            uint8_t k1 = qlr_adamw8_search(q1, 1, x1);
            if ((signbit(q1[k1]) != 0) != (signbit(m[j]) != 0)) {
                if (m[j] > 0.0f) k1 = (uint8_t)(k1 + 1);
                else k1 = (uint8_t)(k1 - 1);
            }
            s1[j] = k1;
            s2[j] = qlr_adamw8_search(q2, 0, x2);
        }
    }
}

/* ------------------------------------------------------------------ 32-bit, bnb kernel */

typedef struct adamw32_ctx {
    float *p;
    const float *g;
    float *m, *v;
    qlr_adamw_consts k;
} adamw32_ctx;

static void adamw32_bnb_range(void *vctx, int64_t i0, int64_t i1, int tid) {
    const adamw32_ctx *c = vctx;
    const qlr_adamw_consts *k = &c->k;
    for (int64_t i = i0; i < i1; i++) {
        float g = k->gnorm_scale * c->g[i];
        float m = c->m[i] * k->b1 + k->one_m_b1 * g;
        float v = c->v[i] * k->b2 + k->one_m_b2 * (g * g);
        float p = c->p[i] + k->step_size * (m / (sqrtf(v) + k->c2_eps));
        if (k->decay_on) p = p * k->decay; /* after the update, as bnb's kernel */
        c->m[i] = m;
        c->v[i] = v;
        c->p[i] = p;
    }
}

/* ------------------------------------------------------------------ 32-bit, PyTorch */

static void adamw32_torch_range(void *vctx, int64_t i0, int64_t i1, int tid) {
    const adamw32_ctx *c = vctx;
    const qlr_adamw_consts *k = &c->k;
    const float w = k->t_lerp_w; /* 1 - beta1, the lerp weight */
    for (int64_t i = i0; i < i1; i++) {
        float g = c->g[i] * k->gnorm_scale;
        float p = c->p[i] * k->t_decay; /* decoupled decay BEFORE the update (PyTorch order) */
        float m = c->m[i];
        m = (w < 0.5f) ? m + w * (g - m) : g - (g - m) * (1.0f - w); /* torch.lerp */
        float v = c->v[i] * k->b2 + (k->t_one_m_b2 * g) * g; /* mul_(b2).addcmul_(g, g, 1-b2) */
        float denom = sqrtf(v) / k->t_bc2_sqrt + k->eps;
        p = p + (k->t_neg_step * m) / denom;
        c->m[i] = m;
        c->v[i] = v;
        c->p[i] = p;
    }
}

/* ------------------------------------------------------------------ the op */

qlr_status qlr_cpu_adamw_step(qlr_backend *be, int kind, float *p, const float *g, void *s1,
                              void *s2, float *absmax1, float *absmax2, int64_t n,
                              const qlr_adamw_hparams *hp, int64_t t) {
    QLR_ASSERT(t >= 1 && n >= 0);
    if (kind != QLR_ADAMW_KIND_TORCH32 && kind != QLR_ADAMW_KIND_BNB32 && kind != QLR_ADAMW_KIND_BNB8)
        return qlr_errorf(QLR_ERR_INVALID, "adamw: unknown optimizer state kind %d", kind);
    if (n == 0) return QLR_OK;
    qlr_adamw_consts k = qlr_adamw_consts_make(hp, t);
    if (kind == QLR_ADAMW_KIND_BNB8) {
        adamw8_ctx c = {.p = p, .g = g, .code1 = s1, .code2 = s2, .absmax1 = absmax1,
                        .absmax2 = absmax2, .n = n, .k = k};
        int64_t nb = (n + QLR_ADAMW8_BLOCK - 1) / QLR_ADAMW8_BLOCK;
        qlr_parallel_for(nb, 16, adamw8_blocks, &c);
        return QLR_OK;
    }
    adamw32_ctx c = {.p = p, .g = g, .m = s1, .v = s2, .k = k};
    qlr_parallel_for(n, 4096, kind == QLR_ADAMW_KIND_BNB32 ? adamw32_bnb_range : adamw32_torch_range,
                     &c);
    return QLR_OK;
}

/* ------------------------------------------------------------------ reductions, scaling */

/* Chunk partials are formed in parallel SUMSQ_GROUP at a time (a fixed stack array: the op
 * never allocates) and added to the accumulator one by one in chunk order, so the result is
 * the same for every thread count and group size. */
#define SUMSQ_GROUP 256

typedef struct sumsq_ctx {
    const float *x;
    int64_t n, ch0;
    double *partial; /* [SUMSQ_GROUP] */
} sumsq_ctx;

static void sumsq_chunks(void *vctx, int64_t c0, int64_t c1, int tid) {
    const sumsq_ctx *c = vctx;
    for (int64_t ch = c0; ch < c1; ch++) {
        int64_t i0 = (c->ch0 + ch) * QLR_SUMSQ_CHUNK;
        int64_t i1 = i0 + QLR_SUMSQ_CHUNK < c->n ? i0 + QLR_SUMSQ_CHUNK : c->n;
        double s = 0.0;
        for (int64_t i = i0; i < i1; i++) s += (double)c->x[i] * (double)c->x[i];
        c->partial[ch] = s;
    }
}

qlr_status qlr_cpu_sum_squares(qlr_backend *be, double *acc, const float *x, int64_t n) {
    QLR_ASSERT(n >= 0);
    int64_t nch = (n + QLR_SUMSQ_CHUNK - 1) / QLR_SUMSQ_CHUNK;
    double partial[SUMSQ_GROUP];
    double total = acc[0];
    for (int64_t g0 = 0; g0 < nch; g0 += SUMSQ_GROUP) {
        int64_t cnt = nch - g0 < SUMSQ_GROUP ? nch - g0 : SUMSQ_GROUP;
        sumsq_ctx c = {.x = x, .n = n, .ch0 = g0, .partial = partial};
        qlr_parallel_for(cnt, 1, sumsq_chunks, &c);
        for (int64_t k = 0; k < cnt; k++) total += partial[k];
    }
    acc[0] = total;
    return QLR_OK;
}

typedef struct scale_ctx {
    float *x;
    float s;
} scale_ctx;

static void scale_range(void *vctx, int64_t i0, int64_t i1, int tid) {
    const scale_ctx *c = vctx;
    for (int64_t i = i0; i < i1; i++) c->x[i] *= c->s;
}

qlr_status qlr_cpu_scale_f32(qlr_backend *be, float *x, float s, int64_t n) {
    QLR_ASSERT(n >= 0);
    if (n == 0) return QLR_OK;
    scale_ctx c = {.x = x, .s = s};
    qlr_parallel_for(n, 16384, scale_range, &c);
    return QLR_OK;
}

qlr_status qlr_cpu_f32_to_act(qlr_backend *be, void *dst, const float *src, int64_t n) {
    QLR_ASSERT(n >= 0);
    if (n > 0 && dst != (const void *)src) memmove(dst, src, (size_t)n * sizeof(float));
    return QLR_OK;
}
