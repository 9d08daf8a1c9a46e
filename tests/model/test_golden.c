/* tests/model/test_golden.c (label golden): the CPU forward of the demo model against the
 * reference in tests/data/golden/smollm2_135m.json, made by tests/tools/golden_make.py from
 * this loader's own NF4 weights (`qlora export-base`), so the only differences left are
 * arithmetic: f32 here against float64 (numpy engine) or float32 with other summation orders
 * (transformers engine). Compared: final logits (top-5 and logsumexp at every position, 512
 * fixed ids at the last position), the argmax at every position (unless the reference's top
 * two are closer than the logit tolerance), and per-layer hidden-state statistics. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "formats/json.h"
#include "model/model.h"
#include "tests/test_util.h"

/* Tolerances. Logits are O(10-30) after 30 layers whose residual stream reaches RMS ~100 and
 * max ~2000 (massive activations): f32 accumulation over d = 576..1536 per product gives
 * relative errors ~1e-6 per op that compound through the layers; measured max |diff| against
 * the float64 reference is ~2e-4 on logits. 5e-3 absolute is >10x that and still far below
 * anything a wrong op would produce (a wrong RoPE, mask or permutation moves logits by > 1). */
#define LOGIT_ATOL 5e-3
/* Hidden statistics: relative 1e-4 (measured ~1e-6), head values 1e-3 abs + 1e-4 rel. */
#define STAT_RTOL 1e-4
#define HEAD_ATOL 1e-3

typedef struct {
    int32_t n_layers;
    double (*st)[3]; /* [layer + 1][mean, rms, max_abs] */
    float (*head)[8];
} hid_ctx;

static void on_hidden(void *ud, int32_t layer, const void *h, int64_t n, int64_t d) {
    hid_ctx *c = ud;
    const float *x = h; /* the CPU backend's act dtype is f32 */
    double s = 0, s2 = 0, mx = 0;
    for (int64_t i = 0; i < n * d; i++) {
        s += x[i];
        s2 += (double)x[i] * x[i];
        if (fabs(x[i]) > mx) mx = fabs(x[i]);
    }
    c->st[layer + 1][0] = s / (n * d);
    c->st[layer + 1][1] = sqrt(s2 / (n * d));
    c->st[layer + 1][2] = mx;
    for (int j = 0; j < 8 && j < d; j++) c->head[layer + 1][j] = x[(n - 1) * d + j];
}

static double jnum(json_t *v) { return json_number_value(v); }

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    json_t *ref = NULL;
    char rp[4096];
    snprintf(rp, sizeof rp, "%s/golden/smollm2_135m.json", QLR_TEST_DATA);
    CHECK_OK(qlr_json_load_file(rp, &ref));
    if (!ref) return test_finish();
    printf("reference: %s\n", json_string_value(json_object_get(ref, "generator")));

    qlr_backend *be = NULL;
    qlr_model *m = NULL;
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    lp.max_layers = (int32_t)json_integer_value(json_object_get(ref, "n_layers"));
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    if (!m) return test_finish();
    int64_t V = m->cfg.n_vocab;
    CHECK_EQ_INT(V, json_integer_value(json_object_get(ref, "vocab_size")));

    json_t *prompts = json_object_get(ref, "prompts");
    double worst_logit = 0, worst_stat = 0, worst_head = 0;
    for (size_t pi = 0; pi < json_array_size(prompts); pi++) {
        json_t *p = json_array_get(prompts, pi);
        const char *name = json_string_value(json_object_get(p, "name"));
        json_t *jids = json_object_get(p, "ids");
        int32_t n = (int32_t)json_array_size(jids);
        int32_t *ids = malloc(n * 4), *pos = malloc(n * 4), *seq = calloc(n, 4);
        for (int32_t i = 0; i < n; i++)
            ids[i] = (int32_t)json_integer_value(json_array_get(jids, i)), pos[i] = i;
        qlr_kv_cache *kv = NULL;
        qlr_forward *f = NULL;
        CHECK_OK(qlr_kv_cache_create(m, 1, n, &kv));
        CHECK_OK(qlr_forward_create(m, n, n, &f));
        hid_ctx hc = {m->cfg.n_layers, calloc(m->cfg.n_layers + 1, sizeof(double[3])),
                      calloc(m->cfg.n_layers + 1, sizeof(float[8]))};
        qlr_forward_set_hidden_fn(f, on_hidden, &hc);
        float *lg = NULL;
        qlr_batch b = {n, ids, pos, seq, n, NULL, NULL, NULL};
        CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
        json_t *jpos = json_object_get(p, "positions");
        for (int32_t t = 0; lg && t < n; t++) {
            json_t *e = json_array_get(jpos, t);
            const float *row = lg + (int64_t)t * V;
            json_t *top = json_object_get(e, "top");
            int64_t am = 0;
            double mx = row[0];
            for (int64_t v = 1; v < V; v++)
                if (row[v] > mx) mx = row[v], am = v;
            double s = 0;
            for (int64_t v = 0; v < V; v++) s += exp(row[v] - mx);
            double lse = mx + log(s), rl = jnum(json_object_get(e, "logsumexp"));
            CHECK_MSG(fabs(lse - rl) <= LOGIT_ATOL, "%s pos %d: logsumexp %.6f vs %.6f", name, t, lse, rl);
            for (size_t k = 0; k < json_array_size(top); k++) {
                json_t *pair = json_array_get(top, k);
                int64_t id = json_integer_value(json_array_get(pair, 0));
                double rv = jnum(json_array_get(pair, 1)), d = fabs(row[id] - rv);
                if (d > worst_logit) worst_logit = d;
                CHECK_MSG(d <= LOGIT_ATOL, "%s pos %d: logit[%lld] %.6f vs %.6f", name, t,
                          (long long)id, row[id], rv);
            }
            int64_t ram = json_integer_value(json_object_get(e, "argmax"));
            double gap = jnum(json_array_get(json_array_get(top, 0), 1)) -
                         jnum(json_array_get(json_array_get(top, 1), 1));
            CHECK_MSG(am == ram || gap < LOGIT_ATOL, "%s pos %d: argmax %lld vs %lld (gap %.3g)", name,
                      t, (long long)am, (long long)ram, gap);
        }
        json_t *last = json_object_get(p, "last_logits");
        int64_t step = json_integer_value(json_object_get(p, "last_ids_step"));
        for (size_t k = 0; lg && k < json_array_size(last); k++) {
            double d = fabs(lg[(int64_t)(n - 1) * V + k * step] - jnum(json_array_get(last, k)));
            if (d > worst_logit) worst_logit = d;
            CHECK_MSG(d <= LOGIT_ATOL, "%s last logits[%lld]: diff %.3g", name, (long long)(k * step), d);
        }
        json_t *layers = json_object_get(p, "layers");
        CHECK_EQ_INT(json_array_size(layers), m->cfg.n_layers + 1);
        for (size_t li = 0; li < json_array_size(layers) && li <= (size_t)m->cfg.n_layers; li++) {
            json_t *L = json_array_get(layers, li);
            const char *keys[3] = {"mean", "rms", "max_abs"};
            double scale = jnum(json_object_get(L, "rms"));
            for (int k = 0; k < 3; k++) {
                double rv = jnum(json_object_get(L, keys[k]));
                /* the mean is small relative to the spread: scale its tolerance by the RMS */
                double d = fabs(hc.st[li][k] - rv) / (k == 0 ? scale : fabs(rv) + 1e-30);
                if (d > worst_stat) worst_stat = d;
                CHECK_MSG(d <= STAT_RTOL, "%s layer %d %s: %.8g vs %.8g", name, (int)li - 1, keys[k],
                          hc.st[li][k], rv);
            }
            json_t *hv = json_object_get(L, "last_head");
            for (size_t j = 0; j < json_array_size(hv); j++) {
                double rv = jnum(json_array_get(hv, j)), d = fabs(hc.head[li][j] - rv);
                if (d / (HEAD_ATOL + 1e-4 * fabs(rv)) > worst_head) worst_head = d / (HEAD_ATOL + 1e-4 * fabs(rv));
                CHECK_MSG(d <= HEAD_ATOL + 1e-4 * fabs(rv), "%s layer %d head[%zu]: %.6g vs %.6g", name,
                          (int)li - 1, j, hc.head[li][j], rv);
            }
        }
        free(hc.st), free(hc.head), free(ids), free(pos), free(seq);
        qlr_forward_free(f);
        qlr_kv_cache_free(kv);
    }
    printf("worst logit diff %.3g (tol %g), worst hidden-stat rel diff %.3g (tol %g), worst head "
           "diff %.3g x tol\n", worst_logit, LOGIT_ATOL, worst_stat, STAT_RTOL, worst_head);
    json_decref(ref);
    qlr_model_free(m);
    qlr_backend_free(be);
    return test_finish();
}
