/* bench/op_timer.h: a timing copy of a backend's op table, for benchmarks only. Installing it
 * replaces the entries the training forward/backward, eval and optimizer call (and the memory
 * copies) by wrappers that call the real op and add its wall time, and its multiply-adds where
 * they are known from the arguments, to a bucket per (phase, op kind). Other entries stay the
 * real ops (their time shows as "untimed" in a phase). CPU ops are synchronous; on a device
 * that is not host-visible every wrapped op is followed by a sync, which serialises the stream
 * (the breakdown is then of a slower, serialised run). One timer per process: one backend at a
 * time, installed and uninstalled around the profiled region. */
#ifndef QLR_BENCH_OP_TIMER_H
#define QLR_BENCH_OP_TIMER_H

#include <stdint.h>

#include "backend/backend.h"

typedef enum qlr_op_kind {
    QLR_OPK_LINEAR = 0,  /* nf4_linear, nf4_linear_dx (the frozen NF4 base) */
    QLR_OPK_LORA,        /* lora, lora_bwd */
    QLR_OPK_ATTENTION,   /* attention_varlen (+ bwd) */
    QLR_OPK_CE,          /* lm_head_ce (lm_head + cross-entropy + its dX) */
    QLR_OPK_OPTIMIZER,   /* adamw_step, sum_squares, scale_f32, f32_to_act */
    QLR_OPK_ELEMENTWISE, /* embedding, rmsnorm, rope, swiglu, add, dropout (+ bwd) */
    QLR_OPK_MEMORY,      /* memset0, h2d, d2h, d2d, sync */
    QLR_OPK_COUNT
} qlr_op_kind;

#define QLR_OP_TIMER_PHASES 8 /* buckets (the trainer's qlr_train_phase values) */

typedef struct qlr_op_bucket {
    double seconds;
    double flops;   /* 2 x multiply-adds the op needs (0 where not counted) */
    uint64_t calls;
} qlr_op_bucket;

/* Swaps the entries of be->ops / be->mem for the timing wrappers (the real entries are kept
 * for them to call; the wrapped backend stays usable until it is freed). Buckets start at
 * zero, phase 0. Call once per process. */
void qlr_op_timer_install(qlr_backend *be);
/* Puts back the real entries (the buckets stay readable): the backend runs unperturbed again.
 * Installing again later (on this or a new backend) starts from zeroed buckets. */
void qlr_op_timer_uninstall(qlr_backend *be);
/* Ops from now on go to `phase` (< QLR_OP_TIMER_PHASES). */
void qlr_op_timer_set_phase(int phase);
/* The bucket of (phase, kind). */
qlr_op_bucket qlr_op_timer_get(int phase, qlr_op_kind kind);
const char *qlr_op_kind_name(qlr_op_kind k);

#endif
