/* optim/schedule.c: learning-rate schedules as HF transformers defines them
 * (get_constant_schedule_with_warmup, get_linear_schedule_with_warmup,
 * get_cosine_schedule_with_warmup with num_cycles 0.5, get_cosine_with_min_lr_schedule_with_warmup
 * with min_lr_rate) and HF's warmup_steps / warmup_ratio rule. lr(step) is a pure function of
 * the schedule and the number of updates already done; the formulas are in optim.h. */
#include "optim/optim.h"

#include <math.h>
#include <string.h>

int64_t qlr_lr_warmup_steps(const qlr_lr_schedule *s) {
    if (s->warmup_steps > 0) return s->warmup_steps;
    if (s->warmup_ratio > 0.0) return (int64_t)ceil((double)s->total_steps * s->warmup_ratio);
    return 0;
}

double qlr_lr_at(const qlr_lr_schedule *s, int64_t step) {
    int64_t w = qlr_lr_warmup_steps(s), total = s->total_steps;
    if (step < w) return s->base_lr * ((double)step / (double)(w > 1 ? w : 1));
    double denom = (double)(total - w > 1 ? total - w : 1);
    switch (s->type) {
    case QLR_LR_LINEAR: {
        double f = (double)(total - step) / denom;
        return s->base_lr * (f > 0.0 ? f : 0.0);
    }
    case QLR_LR_COSINE: {
        /* HF: 0.5 * (1 + cos(pi * num_cycles * 2 * progress)) with num_cycles = 0.5; the min-lr
         * variant maps f to f * (1 - r) + r. Past the end progress > 1 and cos rises again,
         * exactly as HF does. */
        double progress = (double)(step - w) / denom;
        double f = 0.5 * (1.0 + cos(M_PI * 0.5 * 2.0 * progress));
        double r = s->min_lr_ratio;
        f = f * (1.0 - r) + r;
        return s->base_lr * (f > 0.0 ? f : 0.0);
    }
    case QLR_LR_CONSTANT:
    default:
        return s->base_lr;
    }
}

qlr_status qlr_lr_schedule_parse(const char *name, qlr_lr_schedule_type *out) {
    if (!strcmp(name, "constant") || !strcmp(name, "constant_with_warmup")) *out = QLR_LR_CONSTANT;
    else if (!strcmp(name, "linear")) *out = QLR_LR_LINEAR;
    else if (!strcmp(name, "cosine") || !strcmp(name, "cosine_with_min_lr")) *out = QLR_LR_COSINE;
    else
        return qlr_errorf(QLR_ERR_INVALID,
                          "lr_scheduler '%s' is not supported: use constant, linear or cosine", name);
    return QLR_OK;
}
