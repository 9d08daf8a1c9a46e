/* tests/optim/test_lr_schedule.c: the LR schedules against values worked out by hand from HF
 * transformers' formulas (get_{constant,linear,cosine}_schedule_with_warmup and the cosine
 * min-lr variant), including the warmup boundaries and the warmup_ratio rule. */
#include <math.h>
#include <string.h>

#include "core/core.h"
#include "optim/optim.h"
#include "tests/test_util.h"

static qlr_lr_schedule sched(qlr_lr_schedule_type type, int64_t total, int64_t warmup) {
    qlr_lr_schedule s;
    memset(&s, 0, sizeof s);
    s.type = type;
    s.base_lr = 2e-4;
    s.total_steps = total;
    s.warmup_steps = warmup;
    return s;
}

#define LR(s, step, want) CHECK_NEAR(qlr_lr_at(&(s), (step)), (want), 1e-15, 1e-12)

int main(void) {
    const double b = 2e-4;
    /* constant, warmup 10: 0, b/10 .. 9b/10 then b */
    qlr_lr_schedule c = sched(QLR_LR_CONSTANT, 100, 10);
    LR(c, 0, 0.0);
    LR(c, 1, b * 0.1);
    LR(c, 9, b * 0.9);
    LR(c, 10, b);
    LR(c, 99, b);
    LR(c, 500, b);
    qlr_lr_schedule c0 = sched(QLR_LR_CONSTANT, 100, 0);
    LR(c0, 0, b);

    /* linear, warmup 10, total 110: decays over 100 steps */
    qlr_lr_schedule l = sched(QLR_LR_LINEAR, 110, 10);
    LR(l, 5, b * 0.5);
    LR(l, 10, b);
    LR(l, 11, b * 0.99);
    LR(l, 60, b * 0.5);
    LR(l, 109, b * 0.01);
    LR(l, 110, 0.0);
    LR(l, 130, 0.0);
    qlr_lr_schedule l0 = sched(QLR_LR_LINEAR, 4, 0);
    LR(l0, 0, b);
    LR(l0, 1, b * 0.75);

    /* cosine, warmup 10, total 110: 0.5 * (1 + cos(pi * progress)) */
    qlr_lr_schedule k = sched(QLR_LR_COSINE, 110, 10);
    LR(k, 3, b * 0.3);
    LR(k, 10, b);
    LR(k, 35, b * 0.5 * (1.0 + sqrt(0.5)));   /* progress 1/4: cos(pi/4) */
    LR(k, 60, b * 0.5);                       /* progress 1/2 */
    LR(k, 85, b * 0.5 * (1.0 - sqrt(0.5)));   /* progress 3/4 */
    LR(k, 110, 0.0);
    /* with a floor of 10%: f * 0.9 + 0.1 */
    k.min_lr_ratio = 0.1;
    LR(k, 10, b);
    LR(k, 60, b * 0.55);
    LR(k, 110, b * 0.1);
    LR(k, 5, b * 0.5); /* warmup is unaffected by the floor */

    /* warmup_ratio: ceil(55 * 0.1) = 6 warmup steps */
    qlr_lr_schedule r = sched(QLR_LR_LINEAR, 55, 0);
    r.warmup_ratio = 0.1;
    CHECK_EQ_INT(qlr_lr_warmup_steps(&r), 6);
    LR(r, 5, b * 5.0 / 6.0);
    LR(r, 6, b);
    LR(r, 30, b * 25.0 / 49.0);
    r.warmup_steps = 3; /* steps win over the ratio */
    CHECK_EQ_INT(qlr_lr_warmup_steps(&r), 3);
    /* warmup of 1: step 0 is 0, step 1 is full */
    qlr_lr_schedule w1 = sched(QLR_LR_CONSTANT, 10, 1);
    LR(w1, 0, 0.0);
    LR(w1, 1, b);

    qlr_lr_schedule_type t;
    CHECK_OK(qlr_lr_schedule_parse("cosine", &t));
    CHECK_EQ_INT(t, QLR_LR_COSINE);
    CHECK_OK(qlr_lr_schedule_parse("linear", &t));
    CHECK_EQ_INT(t, QLR_LR_LINEAR);
    CHECK_OK(qlr_lr_schedule_parse("constant_with_warmup", &t));
    CHECK_EQ_INT(t, QLR_LR_CONSTANT);
    CHECK(qlr_lr_schedule_parse("polynomial", &t) == QLR_ERR_INVALID);
    CHECK(strstr(qlr_error_msg(), "polynomial") != NULL);
    return test_finish();
}
