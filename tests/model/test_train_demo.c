/* tests/model/test_train_demo.c (label grad): the training path on the demo model
 * (SmolLM2-135M): with LoRA on all 7 linears and B = 0 the training loss (fwd_bwd and eval)
 * equals the cross-entropy computed here in float64 from qlr_model_forward's logits, dA is
 * exactly 0 and dB is not. Then prints (does not assert) fwd+bwd tokens/s at 1 x 256 tokens
 * with and without checkpointing. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "model/model.h"
#include "model/backprop.h"
#include "tests/test_util.h"

enum { RANK = 16, N_CE = 96, N_BENCH = 256 };

int main(void) {
    const char *path = test_demo_model_or_fail();
    if (!path) return test_finish();
    qlr_backend *be = NULL;
    qlr_model *m = NULL;
    CHECK_OK(qlr_backend_create("cpu", 0, &be));
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    CHECK_OK(qlr_model_load(path, be, &lp, &m));
    if (!m) return test_finish();
    const qlr_model_config *c = &m->cfg;
    int32_t NLy = c->n_layers, V = c->n_vocab;
    uint64_t rng = 5;

    /* LoRA r 16 on every linear: A random (Kaiming-like scale), B = 0 as PEFT initialises */
    int64_t nrefs = (int64_t)NLy * QLR_LIN_COUNT;
    qlr_lora_ref *refs = calloc((size_t)nrefs, sizeof *refs);
    float **da = calloc((size_t)nrefs, sizeof *da), **db = calloc((size_t)nrefs, sizeof *db);
    float **A = calloc((size_t)nrefs, sizeof *A), **B = calloc((size_t)nrefs, sizeof *B);
    for (int32_t l = 0; l < NLy; l++)
        for (int i = 0; i < QLR_LIN_COUNT; i++) {
            int64_t k = (int64_t)l * QLR_LIN_COUNT + i, in = m->layers[l].w[i].cols,
                    out = m->layers[l].w[i].rows;
            A[k] = malloc((size_t)(RANK * in) * 4);
            for (int64_t j = 0; j < RANK * in; j++) A[k][j] = test_rng_normal(&rng) / sqrtf((float)in);
            B[k] = calloc((size_t)(out * RANK), 4);
            da[k] = calloc((size_t)(RANK * in), 4);
            db[k] = calloc((size_t)(out * RANK), 4);
            refs[k] = (qlr_lora_ref){A[k], B[k], RANK, 32.0f / RANK};
        }

    qlr_adapter_set set = {NLy, 1, RANK, refs, refs};

    /* tokens: a random walk over ordinary ids; targets = next token, last one ignored */
    int32_t tok[N_BENCH], tgt[N_BENCH], pos[N_BENCH], seq[N_BENCH] = {0};
    for (int i = 0; i < N_BENCH; i++) {
        tok[i] = 200 + (int32_t)(test_rng_u64(&rng) % 20000);
        pos[i] = i;
    }
    for (int i = 0; i < N_BENCH; i++) tgt[i] = i + 1 < N_CE ? tok[i + 1] : QLR_IGNORE_INDEX;

    /* the inference forward's logits -> CE in float64 */
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_cache_create(m, 1, N_CE, &kv));
    CHECK_OK(qlr_forward_create(m, N_CE, N_CE, &f));
    float *lg = NULL;
    qlr_batch fb = {N_CE, tok, pos, seq, N_CE, NULL, &set, NULL};
    CHECK_OK(qlr_model_forward(f, kv, &fb, &lg));
    double want = 0;
    int64_t want_n = 0;
    for (int t = 0; t < N_CE && lg; t++) {
        if (tgt[t] < 0) continue;
        const float *z = lg + (int64_t)t * V;
        double mx = -INFINITY, s = 0;
        for (int32_t v = 0; v < V; v++) mx = fmax(mx, z[v]);
        for (int32_t v = 0; v < V; v++) s += exp(z[v] - mx);
        want += mx + log(s) - z[tgt[t]];
        want_n++;
    }
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);

    qlr_train_params p = qlr_train_params_default();
    p.max_tokens = N_BENCH;
    p.max_seq_len = N_BENCH;
    p.ce_chunk = 64;
    for (int ck = 1; ck >= 0; ck--) {
        p.checkpointing = ck;
        qlr_train_ctx *tc = NULL;
        CHECK_OK(qlr_train_ctx_create(m, &p, &tc));
        if (!tc) break;
        printf("train workspace (%s): %.1f MiB\n", ck ? "checkpointing" : "all activations",
               (double)qlr_train_plan_bytes(c, be, &p) / (1 << 20));
        qlr_train_batch b = {N_CE, tok, tgt, pos, seq, 1};
        double ev = 0, lo = 0;
        int64_t ne = 0, nt = 0;
        CHECK_OK(qlr_train_eval(tc, &set, &b, &ev, &ne));
        CHECK_OK(qlr_train_fwd_bwd(tc, &set, &b, 1.0f, da, db, 0, &lo, &nt));
        printf("loss over %lld targets: eval %.6f, fwd_bwd %.6f, from qlr_model_forward logits "
               "%.6f (mean %.4f)\n", (long long)nt, ev, lo, want, want / (double)want_n);
        CHECK_EQ_INT(ne, want_n);
        CHECK_EQ_INT(nt, want_n);
        /* the same f32 math through other kernels (varlen vs cache attention, chunked CE):
         * rounding only, summed over ~95 tokens of CE ~10 */
        CHECK_NEAR(ev, want, 1e-3, 1e-5);
        CHECK_NEAR(lo, want, 1e-3, 1e-5);
        int a_zero = 1, b_nonzero = 0, finite = 1;
        for (int64_t k = 0; k < nrefs; k++) {
            int64_t in = m->layers[k / QLR_LIN_COUNT].w[k % QLR_LIN_COUNT].cols,
                    out = m->layers[k / QLR_LIN_COUNT].w[k % QLR_LIN_COUNT].rows;
            for (int64_t j = 0; j < RANK * in; j++) a_zero &= da[k][j] == 0.0f;
            int nz = 0;
            for (int64_t j = 0; j < out * RANK; j++) nz |= db[k][j] != 0.0f, finite &= isfinite(db[k][j]);
            b_nonzero += nz;
            memset(db[k], 0, (size_t)(out * RANK) * 4);
        }
        CHECK_MSG(a_zero, "B = 0 but some dA is not 0");
        CHECK_MSG(b_nonzero == nrefs && finite, "%d of %lld dB nonzero (finite %d)", b_nonzero,
                  (long long)nrefs, finite);

        /* throughput: 1 x 256 tokens, every target counted */
        int32_t tall[N_BENCH];
        for (int i = 0; i < N_BENCH; i++) tall[i] = i + 1 < N_BENCH ? tok[i + 1] : QLR_IGNORE_INDEX;
        qlr_train_batch bb = {N_BENCH, tok, tall, pos, seq, 1};
        CHECK_OK(qlr_train_fwd_bwd(tc, &set, &bb, 1.0f, da, db, 0, &lo, &nt)); /* warm-up */
        int reps = 2;
        double t0 = qlr_now();
        for (int r = 0; r < reps; r++) CHECK_OK(qlr_train_fwd_bwd(tc, &set, &bb, 1.0f, da, db, 0, &lo, &nt));
        double dt = (qlr_now() - t0) / reps;
        t0 = qlr_now();
        CHECK_OK(qlr_train_eval(tc, &set, &bb, &ev, &ne));
        double de = qlr_now() - t0;
        printf("demo model fwd+bwd, 1 x %d tokens, LoRA r %d on all 7 linears, %s, %d threads: "
               "%.2f s/step = %.1f tokens/s (forward only %.1f tokens/s)\n", N_BENCH, RANK,
               ck ? "checkpointing" : "no checkpointing", qlr_n_threads(), dt, N_BENCH / dt,
               N_BENCH / de);
        qlr_train_ctx_free(tc);
    }
    for (int64_t k = 0; k < nrefs; k++) free(A[k]), free(B[k]), free(da[k]), free(db[k]);
    free(A), free(B), free(da), free(db), free(refs);
    qlr_model_free(m);
    qlr_backend_free(be);
    return test_finish();
}
