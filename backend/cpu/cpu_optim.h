/* backend/cpu/cpu_optim.h: the CPU backend's optimizer ops (ops_optim.c), callable on plain
 * host arrays: `be` is not used and may be NULL. optim/'s host entry points (qlr_adamw_step,
 * qlr_clip_grad_norm, ...) are built on them, so the old host path and the backend op give the
 * same bits. The contracts are the op table's (backend/backend.h: adamw_step, sum_squares,
 * scale_f32, f32_to_act); the AdamW math of each kind is optim/optim.h's. All threaded with
 * qlr_parallel_for; none allocates. */
#ifndef QLR_BACKEND_CPU_OPTIM_H
#define QLR_BACKEND_CPU_OPTIM_H

#include "backend/backend.h"

/* QLR_ERR_INVALID (with a message) for an unknown kind; otherwise QLR_OK. t >= 1, n >= 0. */
qlr_status qlr_cpu_adamw_step(qlr_backend *be, int kind, float *p, const float *g, void *s1,
                              void *s2, float *absmax1, float *absmax2, int64_t n,
                              const qlr_adamw_hparams *hp, int64_t t);
/* acc[0] += the chunked f64 sum of x[i]² (QLR_SUMSQ_CHUNK chunks, partials added in chunk
 * order). Deterministic whatever the thread count. Cannot fail. */
qlr_status qlr_cpu_sum_squares(qlr_backend *be, double *acc, const float *x, int64_t n);
/* x[i] *= s. Cannot fail. */
qlr_status qlr_cpu_scale_f32(qlr_backend *be, float *x, float s, int64_t n);
/* act is f32 on the CPU: a copy (dst may equal src). Cannot fail. */
qlr_status qlr_cpu_f32_to_act(qlr_backend *be, void *dst, const float *src, int64_t n);

/* bnb's nearest-code search (backend/adamw_internal.h), for optim's qlr_adamw8_quantize_code. */
uint8_t qlr_cpu_adamw8_code(const float *map, int is_signed, float x);

#endif
