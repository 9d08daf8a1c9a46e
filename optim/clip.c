/* optim/clip.c: global-norm gradient clipping over a list of fp32 gradient tensors, with the
 * semantics of torch.nn.utils.clip_grad_norm_ (factor max_norm / (norm + 1e-6), clamped to 1).
 * The squares are summed by the backend's sum_squares op (f64; on the CPU per fixed chunk with
 * the partials added in chunk order, so the result does not depend on how threads are
 * scheduled) and the scaling is its scale_f32 op. A NaN/Inf norm is reported and nothing is
 * scaled: the trainer decides (skip the step, stop the run). Two entry points: host arrays
 * (qlr_clip_grad_norm, the CPU ops called directly) and backend arrays (qlr_grad_clip). */
#include "optim/optim.h"

#include <math.h>

#include "backend/cpu/cpu_optim.h"

/* torch's rule on the accumulated sum of squares: sets *norm and *nonfinite (if not NULL);
 * returns 1 with *coef = the factor to scale every gradient by, or 0 when nothing is scaled. */
static int clip_rule(double total, float max_norm, float *norm, int *nonfinite, float *coef) {
    float nm = (float)sqrt(total);
    int bad = !isfinite(nm);
    *norm = nm;
    if (nonfinite) *nonfinite = bad;
    if (bad || !(max_norm > 0.0f)) return 0;
    *coef = max_norm / (nm + 1e-6f);
    return *coef < 1.0f;
}

float qlr_clip_grad_norm(float *const *grads, const int64_t *ns, int n_tensors, float max_norm,
                         int *nonfinite) {
    double total = 0.0;
    for (int t = 0; t < n_tensors; t++)
        if (ns[t] > 0) qlr_cpu_sum_squares(NULL, &total, grads[t], ns[t]);
    float norm, coef;
    if (clip_rule(total, max_norm, &norm, nonfinite, &coef))
        for (int t = 0; t < n_tensors; t++)
            if (ns[t] > 0) qlr_cpu_scale_f32(NULL, grads[t], coef, ns[t]);
    return norm;
}

qlr_status qlr_grad_clip(qlr_backend *be, float *const *grads, const int64_t *ns, int n_tensors,
                         float max_norm, double *acc_dev, float *norm, int *nonfinite) {
    if (!be->ops.sum_squares || !be->ops.scale_f32)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "grad clip: the %s backend has no sum_squares / "
                          "scale_f32 op", be->name);
    QLR_TRY(be->mem.memset0(be, acc_dev, sizeof(double)));
    for (int t = 0; t < n_tensors; t++)
        if (ns[t] > 0) QLR_TRY(be->ops.sum_squares(be, acc_dev, grads[t], ns[t]));
    double total = 0.0;
    QLR_TRY(be->mem.d2h(be, &total, acc_dev, sizeof total));
    QLR_TRY(be->mem.sync(be));
    float coef;
    if (clip_rule(total, max_norm, norm, nonfinite, &coef))
        for (int t = 0; t < n_tensors; t++)
            if (ns[t] > 0) QLR_TRY(be->ops.scale_f32(be, grads[t], coef, ns[t]));
    return QLR_OK;
}
