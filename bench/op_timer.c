/* bench/op_timer.c: see op_timer.h. Each wrapper: clock, the real op, sync when the backend is
 * not host-visible, clock, add to the current phase's bucket of the op's kind. */
#include "bench/op_timer.h"

#include <string.h>
#include <time.h>

static qlr_backend_ops g_ops;   /* the real entries */
static qlr_backend_mem g_mem;
static qlr_op_bucket g_b[QLR_OP_TIMER_PHASES][QLR_OPK_COUNT];
static int g_phase;
static int g_sync;              /* 1: sync after each op (device not host-visible) */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static qlr_status done(qlr_backend *be, qlr_status st, qlr_op_kind k, double t0, double flops) {
    if (g_sync && st == QLR_OK) st = g_mem.sync(be);
    qlr_op_bucket *b = &g_b[g_phase][k];
    b->seconds += now_s() - t0;
    b->flops += flops;
    b->calls++;
    return st;
}

const char *qlr_op_kind_name(qlr_op_kind k) {
    static const char *const n[QLR_OPK_COUNT] = {"linears",   "lora",        "attention", "ce",
                                                 "optimizer", "elementwise", "memory"};
    return (unsigned)k < QLR_OPK_COUNT ? n[k] : "?";
}

void qlr_op_timer_set_phase(int phase) {
    if (phase >= 0 && phase < QLR_OP_TIMER_PHASES) g_phase = phase;
}

qlr_op_bucket qlr_op_timer_get(int phase, qlr_op_kind kind) {
    qlr_op_bucket z = {0, 0, 0};
    if (phase < 0 || phase >= QLR_OP_TIMER_PHASES || (unsigned)kind >= QLR_OPK_COUNT) return z;
    return g_b[phase][kind];
}

/* ---- linears ---- */

static qlr_status t_nf4_linear(qlr_backend *be, void *y, const void *x, const qlr_nf4 *w,
                               const float *bias, int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.nf4_linear(be, y, x, w, bias, n);
    return done(be, st, QLR_OPK_LINEAR, t0, 2.0 * (double)n * (double)w->rows * (double)w->cols);
}

static qlr_status t_nf4_linear_dx(qlr_backend *be, void *dx, const void *dy, const qlr_nf4 *w,
                                  int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.nf4_linear_dx(be, dx, dy, w, n);
    return done(be, st, QLR_OPK_LINEAR, t0, 2.0 * (double)n * (double)w->rows * (double)w->cols);
}

/* ---- LoRA ---- */

static qlr_status t_lora(qlr_backend *be, void *y, const void *x, const qlr_lora_ref *l,
                         int64_t n, int64_t in, int64_t out) {
    double t0 = now_s();
    qlr_status st = g_ops.lora(be, y, x, l, n, in, out);
    double r = l ? (double)l->r : 0.0;
    return done(be, st, QLR_OPK_LORA, t0, 2.0 * (double)n * r * (double)(in + out));
}

static qlr_status t_lora_bwd(qlr_backend *be, float *da, float *db, void *dx, const void *dy,
                             const void *x, const qlr_lora_ref *l, int64_t n, int64_t in,
                             int64_t out) {
    double t0 = now_s();
    qlr_status st = g_ops.lora_bwd(be, da, db, dx, dy, x, l, n, in, out);
    double r = l ? (double)l->r : 0.0, nr = 2.0 * (double)n * r;
    /* u = x·Aᵀ, g = dy·B, then dA, dB, dx as asked */
    double f = nr * (double)(in + out) + (da ? nr * (double)in : 0) + (db ? nr * (double)out : 0) +
               (dx ? nr * (double)in : 0);
    return done(be, st, QLR_OPK_LORA, t0, f);
}

/* ---- attention ---- */

static qlr_status t_attention_varlen(qlr_backend *be, void *out, float *lse, const void *q,
                                     const void *k, const void *v, const int32_t *start,
                                     int64_t n, int64_t n_heads, int64_t n_kv, int64_t hd,
                                     float scale) {
    double t0 = now_s();
    qlr_status st = g_ops.attention_varlen(be, out, lse, q, k, v, start, n, n_heads, n_kv, hd,
                                           scale);
    return done(be, st, QLR_OPK_ATTENTION, t0, 0);
}

static qlr_status t_attention_varlen_bwd(qlr_backend *be, void *dq, void *dk, void *dv,
                                         const void *dout, const void *q, const void *k,
                                         const void *v, const void *out, const float *lse,
                                         const int32_t *start, int64_t n, int64_t n_heads,
                                         int64_t n_kv, int64_t hd, float scale) {
    double t0 = now_s();
    qlr_status st = g_ops.attention_varlen_bwd(be, dq, dk, dv, dout, q, k, v, out, lse, start, n,
                                               n_heads, n_kv, hd, scale);
    return done(be, st, QLR_OPK_ATTENTION, t0, 0);
}

/* ---- lm_head + CE: the multiply-adds of the rows that have a target (host-visible targets;
 * elsewhere every row) ---- */

static qlr_status t_lm_head_ce(qlr_backend *be, float *loss, void *dx, float *logits,
                               const void *x, const uint16_t *w, const int32_t *targets,
                               int64_t n, int64_t d, int64_t vocab, float grad_scale) {
    int64_t rows = n;
    if (be->host_visible) {
        rows = 0;
        for (int64_t i = 0; i < n; i++) rows += targets[i] >= 0;
    }
    double t0 = now_s();
    qlr_status st = g_ops.lm_head_ce(be, loss, dx, logits, x, w, targets, n, d, vocab, grad_scale);
    double f = 2.0 * (double)rows * (double)d * (double)vocab * (dx ? 2.0 : 1.0);
    return done(be, st, QLR_OPK_CE, t0, f);
}

/* ---- optimizer ---- */

static qlr_status t_adamw_step(qlr_backend *be, int kind, float *p, const float *g, void *s1,
                               void *s2, float *absmax1, float *absmax2, int64_t n,
                               const qlr_adamw_hparams *hp, int64_t t) {
    double t0 = now_s();
    qlr_status st = g_ops.adamw_step(be, kind, p, g, s1, s2, absmax1, absmax2, n, hp, t);
    return done(be, st, QLR_OPK_OPTIMIZER, t0, 0);
}

static qlr_status t_sum_squares(qlr_backend *be, double *acc, const float *x, int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.sum_squares(be, acc, x, n);
    return done(be, st, QLR_OPK_OPTIMIZER, t0, 0);
}

static qlr_status t_scale_f32(qlr_backend *be, float *x, float s, int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.scale_f32(be, x, s, n);
    return done(be, st, QLR_OPK_OPTIMIZER, t0, 0);
}

static qlr_status t_f32_to_act(qlr_backend *be, void *dst, const float *src, int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.f32_to_act(be, dst, src, n);
    return done(be, st, QLR_OPK_OPTIMIZER, t0, 0);
}

/* ---- elementwise and row-wise ---- */

static qlr_status t_embedding(qlr_backend *be, void *out, const uint16_t *table,
                              const int32_t *ids, int64_t n, int64_t d, int64_t vocab) {
    double t0 = now_s();
    qlr_status st = g_ops.embedding(be, out, table, ids, n, d, vocab);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_rmsnorm(qlr_backend *be, void *y, const void *x, const float *w, int64_t n,
                            int64_t d, float eps) {
    double t0 = now_s();
    qlr_status st = g_ops.rmsnorm(be, y, x, w, n, d, eps);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_rmsnorm_bwd(qlr_backend *be, void *dx, const void *dy, const void *x,
                                const float *w, int64_t n, int64_t d, float eps) {
    double t0 = now_s();
    qlr_status st = g_ops.rmsnorm_bwd(be, dx, dy, x, w, n, d, eps);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_rope(qlr_backend *be, void *x, const int32_t *pos, const float *inv_freq,
                         int64_t n, int64_t n_heads, int64_t hd) {
    double t0 = now_s();
    qlr_status st = g_ops.rope(be, x, pos, inv_freq, n, n_heads, hd);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_rope_bwd(qlr_backend *be, void *dx, const int32_t *pos,
                             const float *inv_freq, int64_t n, int64_t n_heads, int64_t hd) {
    double t0 = now_s();
    qlr_status st = g_ops.rope_bwd(be, dx, pos, inv_freq, n, n_heads, hd);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_swiglu(qlr_backend *be, void *out, const void *gate, const void *up,
                           int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.swiglu(be, out, gate, up, n);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_swiglu_bwd(qlr_backend *be, void *dgate, void *dup, const void *dout,
                               const void *gate, const void *up, int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.swiglu_bwd(be, dgate, dup, dout, gate, up, n);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_add(qlr_backend *be, void *y, const void *x, int64_t n) {
    double t0 = now_s();
    qlr_status st = g_ops.add(be, y, x, n);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

static qlr_status t_dropout(qlr_backend *be, void *y, const void *x, int64_t n, float p,
                            uint64_t seed) {
    double t0 = now_s();
    qlr_status st = g_ops.dropout(be, y, x, n, p, seed);
    return done(be, st, QLR_OPK_ELEMENTWISE, t0, 0);
}

/* ---- memory ---- */

static qlr_status t_memset0(qlr_backend *be, void *p, size_t n) {
    double t0 = now_s();
    qlr_status st = g_mem.memset0(be, p, n);
    return done(be, st, QLR_OPK_MEMORY, t0, 0);
}

static qlr_status t_h2d(qlr_backend *be, void *dst, const void *src, size_t n) {
    double t0 = now_s();
    qlr_status st = g_mem.h2d(be, dst, src, n);
    return done(be, st, QLR_OPK_MEMORY, t0, 0);
}

static qlr_status t_d2h(qlr_backend *be, void *dst, const void *src, size_t n) {
    double t0 = now_s();
    qlr_status st = g_mem.d2h(be, dst, src, n);
    return done(be, st, QLR_OPK_MEMORY, t0, 0);
}

static qlr_status t_d2d(qlr_backend *be, void *dst, const void *src, size_t n) {
    double t0 = now_s();
    qlr_status st = g_mem.d2d(be, dst, src, n);
    return done(be, st, QLR_OPK_MEMORY, t0, 0);
}

static qlr_status t_sync(qlr_backend *be) {
    double t0 = now_s();
    qlr_status st = g_mem.sync(be);
    return done(be, st, QLR_OPK_MEMORY, t0, 0);
}

/* Installs one wrapper where the backend has the op (a NULL entry stays NULL). */
#define WRAP(tab, name) \
    if ((tab)->name) (tab)->name = t_##name

void qlr_op_timer_uninstall(qlr_backend *be) {
    be->ops = g_ops;
    be->mem = g_mem;
}

void qlr_op_timer_install(qlr_backend *be) {
    g_ops = be->ops;
    g_mem = be->mem;
    memset(g_b, 0, sizeof g_b);
    g_phase = 0;
    g_sync = !be->host_visible;
    qlr_backend_ops *o = &be->ops;
    WRAP(o, nf4_linear);
    WRAP(o, nf4_linear_dx);
    WRAP(o, lora);
    WRAP(o, lora_bwd);
    WRAP(o, attention_varlen);
    WRAP(o, attention_varlen_bwd);
    WRAP(o, lm_head_ce);
    WRAP(o, adamw_step);
    WRAP(o, sum_squares);
    WRAP(o, scale_f32);
    WRAP(o, f32_to_act);
    WRAP(o, embedding);
    WRAP(o, rmsnorm);
    WRAP(o, rmsnorm_bwd);
    WRAP(o, rope);
    WRAP(o, rope_bwd);
    WRAP(o, swiglu);
    WRAP(o, swiglu_bwd);
    WRAP(o, add);
    WRAP(o, dropout);
    qlr_backend_mem *m = &be->mem;
    WRAP(m, memset0);
    WRAP(m, h2d);
    WRAP(m, d2h);
    WRAP(m, d2d);
    WRAP(m, sync);
}
