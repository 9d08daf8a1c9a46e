/* optim/adamw.c: the AdamW entry points of optim/: the host ones on plain arrays
 * (qlr_adamw8bit_step, qlr_adamw32_bnb_step, qlr_adamw32_torch_step, qlr_adamw_step), which run
 * the CPU backend's adamw_step op (backend/cpu/ops_optim.c, where the step math lives, built
 * without FMA contraction), and qlr_adamw_update, which runs a backend's adamw_step on a state
 * in that backend's memory. Spec: docs/FORMATS.md §2.3. State allocation and
 * serialization live in adamw_state.c. */
#include "optim/optim.h"

#include "backend/cpu/cpu_optim.h"

qlr_adamw_hparams qlr_adamw_default_hparams(void) {
    qlr_adamw_hparams h = {.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f,
                           .weight_decay = 1e-2f, .gnorm_scale = 1.0f};
    return h;
}

uint8_t qlr_adamw8_quantize_code(const float *map, int is_signed, float x) {
    return qlr_cpu_adamw8_code(map, is_signed, x);
}

static int kind_ok(int32_t kind) {
    return kind == QLR_ADAMW_KIND_TORCH32 || kind == QLR_ADAMW_KIND_BNB32 || kind == QLR_ADAMW_KIND_BNB8;
}

/* The state's two moment arrays as the adamw_step op takes them. */
static void *state_s1(const qlr_adamw_state *s) {
    return s->kind == QLR_ADAMW_KIND_BNB8 ? (void *)s->code1 : (void *)s->m;
}
static void *state_s2(const qlr_adamw_state *s) {
    return s->kind == QLR_ADAMW_KIND_BNB8 ? (void *)s->code2 : (void *)s->v;
}

/* ------------------------------------------------------------------ host arrays */

void qlr_adamw8bit_step(float *p, const float *g, uint8_t *code1, uint8_t *code2, float *absmax1,
                        float *absmax2, int64_t n, const qlr_adamw_hparams *hp, int64_t t) {
    qlr_status st = qlr_cpu_adamw_step(NULL, QLR_ADAMW_KIND_BNB8, p, g, code1, code2, absmax1,
                                       absmax2, n, hp, t);
    QLR_ASSERT(st == QLR_OK);
}

void qlr_adamw32_bnb_step(float *p, const float *g, float *m, float *v, int64_t n,
                          const qlr_adamw_hparams *hp, int64_t t) {
    qlr_status st = qlr_cpu_adamw_step(NULL, QLR_ADAMW_KIND_BNB32, p, g, m, v, NULL, NULL, n, hp, t);
    QLR_ASSERT(st == QLR_OK);
}

void qlr_adamw32_torch_step(float *p, const float *g, float *m, float *v, int64_t n,
                            const qlr_adamw_hparams *hp, int64_t t) {
    qlr_status st = qlr_cpu_adamw_step(NULL, QLR_ADAMW_KIND_TORCH32, p, g, m, v, NULL, NULL, n, hp,
                                       t);
    QLR_ASSERT(st == QLR_OK);
}

qlr_status qlr_adamw_step(qlr_adamw_state *s, float *p, const float *g, const qlr_adamw_hparams *hp) {
    if (!kind_ok(s->kind))
        return qlr_errorf(QLR_ERR_INVALID, "adamw: unknown optimizer state kind %d", (int)s->kind);
    s->step++;
    return qlr_cpu_adamw_step(NULL, s->kind, p, g, state_s1(s), state_s2(s), s->absmax1, s->absmax2,
                              s->n, hp, s->step);
}

/* ------------------------------------------------------------------ backend arrays */

qlr_status qlr_adamw_update(qlr_backend *be, qlr_adamw_state *s, float *p, const float *g,
                            const qlr_adamw_hparams *hp) {
    if (!be->ops.adamw_step)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "adamw: the %s backend has no adamw_step op", be->name);
    if (!kind_ok(s->kind))
        return qlr_errorf(QLR_ERR_INVALID, "adamw: unknown optimizer state kind %d", (int)s->kind);
    s->step++;
    qlr_status st = be->ops.adamw_step(be, s->kind, p, g, state_s1(s), state_s2(s), s->absmax1,
                                       s->absmax2, s->n, hp, s->step);
    if (st != QLR_OK) s->step--;
    return st;
}
