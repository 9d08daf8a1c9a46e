/* backend/cuda/attention_cudnn.cu: causal GQA prefill attention of one sequence through cuDNN's
 * fused scaled-dot-product attention (flash attention), built with the cuDNN backend C API (no
 * frontend): per shape (S, H, KV, D) one operation graph in cuDNN's documented SDPA pattern
 * (Q·Kᵀ -> scale -> causal mask from generated row/column indices -> softmax -> ·V), an engine
 * from the heuristics, and the finalized execution plan kept in a small per-backend cache so
 * that later calls of the same shape only bind pointers and execute on the backend's stream.
 * Owns the backend's cuDNN handle. attention.cu's kernels serve the attention op;
 * qlr_cuda_attention_prefill_cudnn serves the optional attention_fresh op (fresh prefills above
 * 64 tokens, cuda_backend.cu) and callers that pick it explicitly, all falling back on
 * QLR_ERR_UNSUPPORTED. */
#include "backend/cuda/cuda_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern "C" {
#include "backend/cuda/cuda_backend.h"
#include "core/log.h"
}

/* A plan keeps every descriptor it was built from (the operation graph, its tensors and the
 * engine config stay alive as long as the plan: the backend API does not say the plan copies
 * them). ~45 for the graph, plus per heuristics mode one heuristics descriptor, its configs and
 * the plans tried. */
#define SDPA_MAX_DESC 192
#define SDPA_MAX_CFG 8    /* engine configs tried per heuristics mode */
#define SDPA_CACHE 32     /* shapes remembered per backend (round robin) */

typedef struct sdpa_entry {
    int64_t S, H, KV, D;
    int state;                    /* 0 empty, 1 plan ready, -1 cuDNN said unsupported */
    cudnnBackendDescriptor_t desc[SDPA_MAX_DESC];
    int n_desc;
    cudnnBackendDescriptor_t plan;
    int64_t ws_bytes;
    float mask_value;             /* by-value operand of the causal select (read at execute) */
    char why[1800];               /* state -1: cuDNN's reason, returned again on later calls */
} sdpa_entry;

struct qlr_cuda_sdpa_cache {
    sdpa_entry e[SDPA_CACHE];
    int next;
};

/* Tensor unique ids: the non-virtual ones are bound in the variant pack. */
enum { UID_Q = 1, UID_K, UID_V, UID_O, UID_SCALE, UID_MASKVAL, UID_VIRT = 100 };

/* ---- checking ---- */

/* NOT_SUPPORTED* becomes QLR_ERR_UNSUPPORTED (the caller falls back), anything else
 * QLR_ERR_DEVICE; the message has the statement, file:line, cuDNN's status and its last error. */
static qlr_status sdpa_fail(cudnnStatus_t e, const char *stmt, const char *file, int line) {
    char last[400];
    last[0] = 0;
    cudnnGetLastErrorString(last, sizeof last);
    int dev = -1;
    cudaGetDevice(&dev);
    qlr_status st = CUDNN_STATUS_CATEGORY(e) == CUDNN_STATUS_NOT_SUPPORTED ? QLR_ERR_UNSUPPORTED
                                                                          : QLR_ERR_DEVICE;
    return qlr_error_set_(st, file, line, "%s:%d: %s: cuDNN %s (%d)%s%s (device %d)", file, line,
                          stmt, cudnnGetErrorString(e), (int)e, last[0] ? ": " : "", last, dev);
}

#define DNN_CK(expr)                                                         \
    do {                                                                     \
        cudnnStatus_t dnn_e_ = (expr);                                       \
        if (dnn_e_ != CUDNN_STATUS_SUCCESS)                                  \
            return sdpa_fail(dnn_e_, #expr, __FILE__, __LINE__);             \
    } while (0)

/* ---- attribute setters (one line per attribute at the call sites) ---- */

static cudnnStatus_t at_desc(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
                             cudnnBackendDescriptor_t v) {
    return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v);
}
static cudnnStatus_t at_i64(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a, int64_t v) {
    return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_INT64, 1, &v);
}
static cudnnStatus_t at_dims(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
                             const int64_t *v) {
    return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_INT64, 4, v);
}
static cudnnStatus_t at_dtype(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a,
                              cudnnDataType_t v) {
    return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_DATA_TYPE, 1, &v);
}
static cudnnStatus_t at_true(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a) {
    bool v = true;
    return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_BOOLEAN, 1, &v);
}
static cudnnStatus_t at_f32(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t a, float v) {
    return cudnnBackendSetAttribute(d, a, CUDNN_TYPE_FLOAT, 1, &v);
}

/* ---- descriptor pool of one entry ---- */

static qlr_status dnn_new(sdpa_entry *e, cudnnBackendDescriptorType_t t,
                          cudnnBackendDescriptor_t *out) {
    QLR_ASSERT(e->n_desc < SDPA_MAX_DESC);
    DNN_CK(cudnnBackendCreateDescriptor(t, out));
    e->desc[e->n_desc++] = *out;
    return QLR_OK;
}

/* Destroys the most recent descriptor (a plan or config that did not work out). */
static void dnn_pop(sdpa_entry *e) {
    if (e->n_desc > 0) cudnnBackendDestroyDescriptor(e->desc[--e->n_desc]);
}

static void entry_clear(sdpa_entry *e) {
    while (e->n_desc > 0) dnn_pop(e);
    e->plan = NULL;
    e->state = 0;
    e->ws_bytes = 0;
    e->why[0] = 0;
}

/* ---- graph pieces ---- */

static qlr_status dnn_tensor(sdpa_entry *e, int64_t uid, cudnnDataType_t dt, const int64_t *dim,
                             const int64_t *str, int is_virtual, int by_value,
                             cudnnBackendDescriptor_t *out) {
    cudnnBackendDescriptor_t t;
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_TENSOR_DESCRIPTOR, &t));
    DNN_CK(at_i64(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, uid));
    DNN_CK(at_dtype(t, CUDNN_ATTR_TENSOR_DATA_TYPE, dt));
    DNN_CK(at_dims(t, CUDNN_ATTR_TENSOR_DIMENSIONS, dim));
    DNN_CK(at_dims(t, CUDNN_ATTR_TENSOR_STRIDES, str));
    DNN_CK(at_i64(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16));
    if (is_virtual) DNN_CK(at_true(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL));
    if (by_value) DNN_CK(at_true(t, CUDNN_ATTR_TENSOR_IS_BY_VALUE));
    DNN_CK(cudnnBackendFinalize(t));
    *out = t;
    return QLR_OK;
}

/* y = mode(x[, b][, t]); axis >= 0 for GEN_INDEX. Appends the operation to ops[]. */
static qlr_status dnn_pointwise(sdpa_entry *e, cudnnPointwiseMode_t mode, cudnnDataType_t prec,
                                int64_t axis, cudnnBackendDescriptor_t x,
                                cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t,
                                cudnnBackendDescriptor_t y, cudnnBackendDescriptor_t *ops,
                                int *n_ops) {
    cudnnBackendDescriptor_t pw, op;
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_POINTWISE_DESCRIPTOR, &pw));
    DNN_CK(cudnnBackendSetAttribute(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1,
                                    &mode));
    DNN_CK(at_dtype(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, prec));
    if (axis >= 0) DNN_CK(at_i64(pw, CUDNN_ATTR_POINTWISE_AXIS, axis));
    DNN_CK(cudnnBackendFinalize(pw));
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, &op));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x));
    if (b) DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b));
    if (t) DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y));
    DNN_CK(at_f32(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, 1.0f));
    DNN_CK(at_f32(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, 1.0f));
    DNN_CK(cudnnBackendFinalize(op));
    ops[(*n_ops)++] = op;
    return QLR_OK;
}

/* y [.., 1] = reduce(x) over the last dimension, f32. */
static qlr_status dnn_reduction(sdpa_entry *e, cudnnReduceTensorOp_t red,
                                cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y,
                                cudnnBackendDescriptor_t *ops, int *n_ops) {
    cudnnBackendDescriptor_t rd, op;
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_REDUCTION_DESCRIPTOR, &rd));
    DNN_CK(cudnnBackendSetAttribute(rd, CUDNN_ATTR_REDUCTION_OPERATOR,
                                    CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &red));
    DNN_CK(at_dtype(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT));
    DNN_CK(cudnnBackendFinalize(rd));
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, &op));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd));
    DNN_CK(cudnnBackendFinalize(op));
    ops[(*n_ops)++] = op;
    return QLR_OK;
}

/* c = a · b (batched over the leading dims, b's head dim broadcast for GQA), f32 compute. */
static qlr_status dnn_matmul(sdpa_entry *e, cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b,
                             cudnnBackendDescriptor_t c, cudnnBackendDescriptor_t *ops,
                             int *n_ops) {
    cudnnBackendDescriptor_t mm, op;
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_MATMUL_DESCRIPTOR, &mm));
    DNN_CK(at_dtype(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT));
    DNN_CK(cudnnBackendFinalize(mm));
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, &op));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c));
    DNN_CK(at_desc(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm));
    DNN_CK(cudnnBackendFinalize(op));
    ops[(*n_ops)++] = op;
    return QLR_OK;
}

/* The operation graph. Layout (B = 1): q/out [S, H, D] token-major are viewed as [1, H, S, D]
 * with strides [S·H·D, D, H·D, 1]; k as Kᵀ [1, KV, D, S] (strides [S·KV·D, D, 1, KV·D]); v as
 * [1, KV, S, D]. Intermediates are virtual [1, H, S, S] f32 (never materialised by the fused
 * engine); row statistics [1, H, S, 1].
 *   s  = (q · kᵀ) · scale
 *   s' = row >= col ? s : mask_value           (GEN_INDEX axis 2 / 3, CMP_GE, BINARY_SELECT)
 *   p  = exp(s' - max(s')) / sum(exp(...))    (bf16, the second product's input type)
 *   out = p · v
 * cuDNN's own frontend also emits stats = max + log(sum) as a virtual output in inference mode;
 * form bit 1 leaves it out. Form bit 0 writes the mask the way older frontends did (INT32 index
 * arithmetic, lowest float instead of -inf). The forms are tried in order 0..3: all compute the
 * same thing, they differ only in how cuDNN's pattern matcher may want to see it. */
static qlr_status sdpa_graph(qlr_cuda_impl *im, sdpa_entry *e, int form,
                             cudnnBackendDescriptor_t *graph) {
    const int64_t S = e->S, H = e->H, KV = e->KV, D = e->D;
    const int64_t qd[4] = {1, H, S, D}, qs[4] = {S * H * D, D, H * D, 1};
    const int64_t kd[4] = {1, KV, D, S}, ks[4] = {S * KV * D, D, 1, KV * D};
    const int64_t vd[4] = {1, KV, S, D}, vs[4] = {S * KV * D, D, KV * D, 1};
    const int64_t sd[4] = {1, H, S, S}, ss[4] = {H * S * S, S * S, S, 1};
    const int64_t rd[4] = {1, H, S, 1}, rs[4] = {H * S, S, 1, 1};
    const int64_t one[4] = {1, 1, 1, 1};
    const int old_mask = form & 1, with_stats = !(form & 2);
    e->mask_value = old_mask ? -3.40282347e38f : -INFINITY;

    cudnnBackendDescriptor_t tq, tk, tv, to, tscale, tmaskv;
    QLR_TRY(dnn_tensor(e, UID_Q, CUDNN_DATA_BFLOAT16, qd, qs, 0, 0, &tq));
    QLR_TRY(dnn_tensor(e, UID_K, CUDNN_DATA_BFLOAT16, kd, ks, 0, 0, &tk));
    QLR_TRY(dnn_tensor(e, UID_V, CUDNN_DATA_BFLOAT16, vd, vs, 0, 0, &tv));
    QLR_TRY(dnn_tensor(e, UID_O, CUDNN_DATA_BFLOAT16, qd, qs, 0, 0, &to));
    QLR_TRY(dnn_tensor(e, UID_SCALE, CUDNN_DATA_FLOAT, one, one, 0, 1, &tscale));
    QLR_TRY(dnn_tensor(e, UID_MASKVAL, CUDNN_DATA_FLOAT, one, one, 0, 1, &tmaskv));

    int64_t uid = UID_VIRT;
    cudnnBackendDescriptor_t s0, s1, row, col, mask, s2, mx, s3, s4, sum, lg, stats, p;
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, sd, ss, 1, 0, &s0));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, sd, ss, 1, 0, &s1));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_INT32, sd, ss, 1, 0, &row));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_INT32, sd, ss, 1, 0, &col));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_BOOLEAN, sd, ss, 1, 0, &mask));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, sd, ss, 1, 0, &s2));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, rd, rs, 1, 0, &mx));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, sd, ss, 1, 0, &s3));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, sd, ss, 1, 0, &s4));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, rd, rs, 1, 0, &sum));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, rd, rs, 1, 0, &lg));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_FLOAT, rd, rs, 1, 0, &stats));
    QLR_TRY(dnn_tensor(e, uid++, CUDNN_DATA_BFLOAT16, sd, ss, 1, 0, &p));

    cudnnBackendDescriptor_t ops[16];
    int n = 0;
    const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
    const cudnnDataType_t idx_prec = old_mask ? CUDNN_DATA_INT32 : CUDNN_DATA_FLOAT;
    QLR_TRY(dnn_matmul(e, tq, tk, s0, ops, &n));
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_MUL, f32, -1, s0, tscale, NULL, s1, ops, &n));
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_GEN_INDEX, idx_prec, 2, s1, NULL, NULL, row, ops, &n));
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_GEN_INDEX, idx_prec, 3, s1, NULL, NULL, col, ops, &n));
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, -1, row, col, NULL, mask,
                          ops, &n));
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_BINARY_SELECT, f32, -1, s1, tmaskv, mask, s2, ops, &n));
    QLR_TRY(dnn_reduction(e, CUDNN_REDUCE_TENSOR_MAX, s2, mx, ops, &n));
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_SUB, f32, -1, s2, mx, NULL, s3, ops, &n));
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_EXP, f32, -1, s3, NULL, NULL, s4, ops, &n));
    QLR_TRY(dnn_reduction(e, CUDNN_REDUCE_TENSOR_ADD, s4, sum, ops, &n));
    if (with_stats) {
        QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_LOG, f32, -1, sum, NULL, NULL, lg, ops, &n));
        QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_ADD, f32, -1, mx, lg, NULL, stats, ops, &n));
    }
    QLR_TRY(dnn_pointwise(e, CUDNN_POINTWISE_DIV, f32, -1, s4, sum, NULL, p, ops, &n));
    QLR_TRY(dnn_matmul(e, p, tv, to, ops, &n));

    cudnnBackendDescriptor_t g;
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, &g));
    DNN_CK(cudnnBackendSetAttribute(g, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                    n, ops));
    DNN_CK(cudnnBackendSetAttribute(g, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1,
                                    &im->dnn));
    DNN_CK(cudnnBackendFinalize(g));
    *graph = g;
    return QLR_OK;
}

/* The engine's global index (for the log line); -1 if cuDNN does not say. */
static int64_t engine_index(sdpa_entry *e, cudnnBackendDescriptor_t cfg) {
    cudnnBackendDescriptor_t eng;
    int64_t n = 0, idx = -1;
    if (dnn_new(e, CUDNN_BACKEND_ENGINE_DESCRIPTOR, &eng) != QLR_OK) return -1;
    if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                                 &n, &eng) != CUDNN_STATUS_SUCCESS ||
        cudnnBackendGetAttribute(eng, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
                                 &idx) != CUDNN_STATUS_SUCCESS)
        idx = -1;
    dnn_pop(e);
    return idx;
}

/* Runs heuristics `mode` on the graph: up to SDPA_MAX_CFG engine configs into cfg[], *n_cfg. */
static qlr_status heur_configs(sdpa_entry *e, cudnnBackendDescriptor_t graph,
                               cudnnBackendHeurMode_t mode, cudnnBackendDescriptor_t *cfg,
                               int64_t *n_cfg) {
    cudnnBackendDescriptor_t heur;
    *n_cfg = 0;
    QLR_TRY(dnn_new(e, CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, &heur));
    DNN_CK(at_desc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph));
    DNN_CK(cudnnBackendSetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1,
                                    &mode));
    DNN_CK(cudnnBackendFinalize(heur));
    int64_t cnt = 0, got = 0;
    DNN_CK(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                    CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &cnt, NULL));
    if (cnt > SDPA_MAX_CFG) cnt = SDPA_MAX_CFG;
    if (cnt <= 0) return QLR_OK;
    for (int64_t i = 0; i < cnt; i++)
        QLR_TRY(dnn_new(e, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, &cfg[i]));
    DNN_CK(cudnnBackendGetAttribute(heur, CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                    CUDNN_TYPE_BACKEND_DESCRIPTOR, cnt, &got, cfg));
    *n_cfg = got < cnt ? got : cnt;
    return QLR_OK;
}

/* Finalizes an execution plan for one engine config; e->ws_bytes = its workspace. */
static qlr_status plan_make(qlr_cuda_impl *im, sdpa_entry *e, cudnnBackendDescriptor_t plan,
                            cudnnBackendDescriptor_t cfg) {
    int64_t n = 0;
    DNN_CK(cudnnBackendSetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1,
                                    &im->dnn));
    DNN_CK(at_desc(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfg));
    DNN_CK(cudnnBackendFinalize(plan));
    DNN_CK(cudnnBackendGetAttribute(plan, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                    CUDNN_TYPE_INT64, 1, &n, &e->ws_bytes));
    return QLR_OK;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

/* A cuDNN refusal while planning (status UNSUPPORTED, or DEVICE for a rejected attribute):
 * the shape or graph form is not served, the caller falls back. Anything else is ours. */
static int refused(qlr_status st) { return st == QLR_ERR_UNSUPPORTED || st == QLR_ERR_DEVICE; }

/* Heuristics mode A, then B, then the fallback list; the first engine config whose execution
 * plan finalizes wins. QLR_ERR_UNSUPPORTED (with the first refusal) when none does. */
static qlr_status sdpa_plan(qlr_cuda_impl *im, sdpa_entry *e, cudnnBackendDescriptor_t graph) {
    static const cudnnBackendHeurMode_t modes[3] = {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_B,
                                                    CUDNN_HEUR_MODE_FALLBACK};
    static const char *mode_name[3] = {"A", "B", "fallback"};
    char first[700] = "";
    int tried = 0;
    for (int mi = 0; mi < 3; mi++) {
        cudnnBackendDescriptor_t cfg[SDPA_MAX_CFG];
        int64_t n_cfg = 0;
        double t0 = now_ms();
        qlr_status st = heur_configs(e, graph, modes[mi], cfg, &n_cfg);
        double t_heur = now_ms() - t0;
        if (st != QLR_OK) {
            if (!refused(st)) return st;
            if (!first[0])
                snprintf(first, sizeof first, "heuristics %s: %s", mode_name[mi], qlr_error_msg());
            continue;
        }
        for (int64_t i = 0; i < n_cfg; i++) {
            cudnnBackendDescriptor_t plan;
            QLR_TRY(dnn_new(e, CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, &plan));
            tried++;
            t0 = now_ms();
            st = plan_make(im, e, plan, cfg[i]);
            if (st == QLR_OK) {
                e->plan = plan;
                QLR_LOGD("cuda sdpa: S=%lld H=%lld KV=%lld D=%lld: engine %lld (heuristics %s, "
                         "config %lld of %lld), workspace %lld bytes; heuristics %.1f ms, plan "
                         "%.1f ms", (long long)e->S, (long long)e->H, (long long)e->KV,
                         (long long)e->D, (long long)engine_index(e, cfg[i]), mode_name[mi],
                         (long long)i + 1, (long long)n_cfg, (long long)e->ws_bytes, t_heur,
                         now_ms() - t0);
                return QLR_OK;
            }
            if (!refused(st)) return st;
            if (!first[0])
                snprintf(first, sizeof first, "heuristics %s, config %lld: %s", mode_name[mi],
                         (long long)i + 1, qlr_error_msg());
            dnn_pop(e);
        }
    }
    return qlr_errorf(QLR_ERR_UNSUPPORTED, "no cuDNN engine (%d execution plans tried)%s%s", tried,
                      first[0] ? "; first refusal: " : "", first);
}

/* ---- handle, cache ---- */

static qlr_status sdpa_init(qlr_cuda_impl *im) {
    if (!im->sdpa) {
        im->sdpa = (qlr_cuda_sdpa_cache *)calloc(1, sizeof *im->sdpa);
        if (!im->sdpa) return qlr_errorf(QLR_ERR_NOMEM, "cuda sdpa: plan cache");
    }
    if (!im->dnn) {
        cudnnHandle_t h = NULL;
        DNN_CK(cudnnCreate(&h));
        cudnnStatus_t e = cudnnSetStream(h, im->stream);
        if (e != CUDNN_STATUS_SUCCESS) {
            cudnnDestroy(h);
            return sdpa_fail(e, "cudnnSetStream(h, im->stream)", __FILE__, __LINE__);
        }
        im->dnn = h;
        QLR_LOGD("cuda sdpa: cuDNN %zu (headers %d.%d.%d)", cudnnGetVersion(), CUDNN_MAJOR,
                 CUDNN_MINOR, CUDNN_PATCHLEVEL);
    }
    return QLR_OK;
}

/* The cached entry of a shape, building its plan on a miss. An unsupported shape is remembered
 * (with cuDNN's reason) so that a caller falling back every layer does not re-run heuristics. */
static qlr_status sdpa_lookup(qlr_cuda_impl *im, int64_t S, int64_t H, int64_t KV, int64_t D,
                              sdpa_entry **out) {
    qlr_cuda_sdpa_cache *c = im->sdpa;
    for (int i = 0; i < SDPA_CACHE; i++) {
        sdpa_entry *e = &c->e[i];
        if (e->state && e->S == S && e->H == H && e->KV == KV && e->D == D) {
            if (e->state < 0) return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s", e->why);
            *out = e;
            return QLR_OK;
        }
    }
    sdpa_entry *e = &c->e[c->next];
    c->next = (c->next + 1) % SDPA_CACHE;
    entry_clear(e);
    e->S = S, e->H = H, e->KV = KV, e->D = D;
    qlr_status st = QLR_ERR_UNSUPPORTED;
    char why[1600] = "";
    size_t len = 0;
    for (int form = 0; form < 4 && refused(st); form++) {
        while (e->n_desc > 0) dnn_pop(e);
        cudnnBackendDescriptor_t graph;
        st = sdpa_graph(im, e, form, &graph);
        if (st == QLR_OK) st = sdpa_plan(im, e, graph);
        if (st == QLR_OK && form > 0) QLR_LOGD("cuda sdpa: graph form %d accepted", form);
        if (refused(st) && len + 1 < sizeof why) /* form 0's reason in full, then short ones */
            len += (size_t)snprintf(why + len, sizeof why - len, "%sform %d: %.*s",
                                    form ? " | " : "", form, form ? 160 : 700, qlr_error_msg());
    }
    if (st == QLR_OK) {
        e->state = 1;
        *out = e;
        return QLR_OK;
    }
    entry_clear(e);
    if (!refused(st)) return st;
    e->S = S, e->H = H, e->KV = KV, e->D = D;
    snprintf(e->why, sizeof e->why, "cuda sdpa: S=%lld H=%lld KV=%lld D=%lld bf16 causal not "
             "served by cuDNN %zu: %s", (long long)S, (long long)H, (long long)KV, (long long)D,
             cudnnGetVersion(), why);
    e->state = -1;
    return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s", e->why);
}

void qlr_cuda_sdpa_release(qlr_cuda_impl *im) {
    if (im->sdpa) {
        for (int i = 0; i < SDPA_CACHE; i++) entry_clear(&im->sdpa->e[i]);
        free(im->sdpa);
        im->sdpa = NULL;
    }
    if (im->dnn) {
        cudnnDestroy(im->dnn);
        im->dnn = NULL;
    }
}

/* ---- entry ---- */

static qlr_status sdpa_execute(qlr_cuda_impl *im, sdpa_entry *e, cudnnBackendDescriptor_t vp,
                               void *out, const void *q, const void *k, const void *v, void *ws,
                               float scale) {
    int64_t uids[6] = {UID_Q, UID_K, UID_V, UID_O, UID_SCALE, UID_MASKVAL};
    /* by-value operands are host pointers, read when the kernel is launched */
    void *ptrs[6] = {(void *)q, (void *)k, (void *)v, out, &scale, &e->mask_value};
    DNN_CK(cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 6,
                                    uids));
    DNN_CK(cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                    6, ptrs));
    DNN_CK(cudnnBackendSetAttribute(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1,
                                    &ws));
    DNN_CK(cudnnBackendFinalize(vp));
    DNN_CK(cudnnBackendExecute(im->dnn, e->plan, vp));
    return QLR_OK;
}

extern "C" qlr_status qlr_cuda_attention_prefill_cudnn(qlr_backend *be, void *out, const void *q,
                                                       const void *k, const void *v, int64_t S,
                                                       int64_t H, int64_t KV, int64_t D,
                                                       float scale) {
    QLR_ASSERT(be && be->kind == QLR_DEVICE_CUDA);
    if (S <= 0) return QLR_OK;
    if (H <= 0 || KV <= 0 || H % KV != 0)
        return qlr_errorf(QLR_ERR_INVALID, "cuda sdpa: %lld query heads are not a multiple of %lld "
                          "KV heads", (long long)H, (long long)KV);
    if (D <= 0 || D % 8 != 0 || D > 256)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda sdpa: head_dim %lld (needs a multiple of 8, "
                          "at most 256)", (long long)D);
    if (((uintptr_t)out | (uintptr_t)q | (uintptr_t)k | (uintptr_t)v) % 16 != 0)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "cuda sdpa: q, k, v and out must be 16-byte aligned");
    if (!(scale == scale) || isinf(scale))
        return qlr_errorf(QLR_ERR_INVALID, "cuda sdpa: scale %g", (double)scale);
    qlr_cuda_impl *im = qlr_cuda_im(be);
    QLR_TRY(sdpa_init(im));
    sdpa_entry *e;
    QLR_TRY(sdpa_lookup(im, S, H, KV, D, &e));
    void *ws = NULL;
    if (e->ws_bytes > 0) QLR_TRY(qlr_cuda_ws(be, (size_t)e->ws_bytes, &ws));
    cudnnBackendDescriptor_t vp = NULL;
    cudnnStatus_t cs = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &vp);
    if (cs != CUDNN_STATUS_SUCCESS)
        return sdpa_fail(cs, "cudnnBackendCreateDescriptor(VARIANT_PACK)", __FILE__, __LINE__);
    qlr_status st = sdpa_execute(im, e, vp, out, q, k, v, ws, scale);
    cudnnBackendDestroyDescriptor(vp);
    return st;
}
