/* tests/adapters/test_lora.c: the LoRA adapter object and its two file formats on a tiny llama
 * config (n_head 4, n_kv 2, head_dim 8, r 3): PEFT init statistics and determinism; GGUF and PEFT
 * round trips (bitwise); GGUF -> PEFT -> GGUF; the Q/K lora_b permutation against an independent
 * re-implementation, including (P·B)·A == P·(B·A); refusals (another base, missing half, wrong
 * general.type, corrupt adapter_config.json with file:line:col, rank_pattern, arch); run-folder
 * resolution; and listings by gguf-py and safetensors when those Python packages are importable. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "adapters/lora_internal.h"
#include "core/core.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "tests/test_util.h"

#define NH 4
#define NKV 2
#define HD 8
#define R 3

static qlr_lora_base tiny_base(void) {
    qlr_lora_base b;
    memset(&b, 0, sizeof b);
    snprintf(b.arch, sizeof b.arch, "llama");
    b.n_layers = 2;
    b.d_model = 20;
    b.n_heads = NH;
    b.n_kv_heads = NKV;
    b.head_dim = HD;
    b.d_ff = 24;
    return b;
}

static char *tmp(const char *name) {
    static char buf[8][512];
    static int k;
    char *p = buf[k++ % 8];
    snprintf(p, 512, "%s/%s", test_tmpdir(), name);
    return p;
}

/* An adapter on every module with random A and B (B is zero after init; fill it). */
static qlr_lora *random_adapter(uint64_t seed, int rslora) {
    qlr_lora_base b = tiny_base();
    qlr_lora_params p = qlr_lora_params_default();
    p.r = R;
    p.alpha = 7.5;
    p.dropout = 0.05;
    p.use_rslora = rslora;
    p.targets = QLR_LORA_TARGETS_ALL;
    p.seed = seed;
    p.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct";
    qlr_lora *l = NULL;
    CHECK_OK(qlr_lora_create(&b, &p, &l));
    if (!l) return NULL;
    uint64_t s = seed * 31 + 1;
    for (uint64_t i = 0; i < l->n_params; i++) l->block[i] = test_rng_normal(&s);
    return l;
}

static int same_adapter(const qlr_lora *x, const qlr_lora *y) {
    if (x->r != y->r || x->targets != y->targets || x->base.n_layers != y->base.n_layers ||
        x->n_params != y->n_params)
        return 0;
    for (int32_t L = 0; L < x->base.n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            const qlr_lora_module *a = qlr_lora_get_const(x, L, (qlr_linear_id)id);
            const qlr_lora_module *b = qlr_lora_get_const(y, L, (qlr_linear_id)id);
            if (!a != !b) return 0;
            if (!a) continue;
            if (a->in != b->in || a->out != b->out) return 0;
            if (memcmp(a->a, b->a, (size_t)x->r * a->in * 4) || memcmp(a->b, b->b, (size_t)x->r * a->out * 4))
                return 0;
        }
    return 1;
}

static int contains(const char *s, const char *sub) { return s && strstr(s, sub) != NULL; }

/* ---- init ---- */

static void test_init(void) {
    qlr_lora_base b = tiny_base();
    qlr_lora_params p = qlr_lora_params_default();
    p.r = 16;
    p.targets = QLR_LORA_TARGETS_ALL;
    p.seed = 1234;
    qlr_lora *l = NULL, *l2 = NULL, *l3 = NULL, *lqv = NULL;
    CHECK_OK(qlr_lora_create(&b, &p, &l));
    CHECK_OK(qlr_lora_create(&b, &p, &l2));
    p.seed = 1235;
    CHECK_OK(qlr_lora_create(&b, &p, &l3));
    p.seed = 1234;
    p.targets = QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_V);
    CHECK_OK(qlr_lora_create(&b, &p, &lqv));
    if (!l || !l2 || !l3 || !lqv) goto out;
    CHECK_NEAR(l->scale, 1.0, 0, 1e-7); /* 16 / 16 */
    CHECK(same_adapter(l, l2));         /* deterministic per seed */
    CHECK(memcmp(l->block, l3->block, l->n_params * 4) != 0);
    CHECK_EQ_INT(lqv->targets, QLR_LORA_TARGET(QLR_LIN_Q) | QLR_LORA_TARGET(QLR_LIN_V));
    CHECK(qlr_lora_get(lqv, 0, QLR_LIN_K) == NULL);
    double sum = 0, sum2 = 0;
    uint64_t n = 0;
    int in_bounds = 1, b_zero = 1;
    for (int32_t L = 0; L < b.n_layers; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            qlr_lora_module *m = qlr_lora_get(l, L, (qlr_linear_id)id);
            CHECK(m != NULL);
            if (!m) continue;
            double bound = 1.0 / sqrt((double)m->in);
            double ms = 0;
            for (int64_t k = 0; k < (int64_t)p.r * m->in; k++) {
                double v = m->a[k];
                if (fabs(v) > bound) in_bounds = 0;
                sum += v / bound;
                sum2 += (v / bound) * (v / bound);
                ms += v * v;
                n++;
            }
            for (int64_t k = 0; k < (int64_t)p.r * m->out; k++)
                if (m->b[k] != 0.0f || signbit(m->b[k])) b_zero = 0;
            /* per tensor the variance is bound^2/3 (uniform): within 30% at >= 320 samples */
            CHECK_NEAR(ms / ((double)p.r * m->in), bound * bound / 3, 0, 0.3);
            /* the module's stream does not depend on which other modules are targeted */
            const qlr_lora_module *mq = qlr_lora_get_const(lqv, L, (qlr_linear_id)id);
            if (mq) CHECK(!memcmp(mq->a, m->a, (size_t)p.r * m->in * 4));
        }
    CHECK(in_bounds);
    CHECK(b_zero);
    /* U(-1, 1) after scaling: mean 0 (sd 1/sqrt(3n)), mean square 1/3 */
    CHECK_NEAR(sum / n, 0.0, 5.0 / sqrt(3.0 * n), 0);
    CHECK_NEAR(sum2 / n, 1.0 / 3, 0.02, 0);
    /* parameters */
    qlr_lora *bad = NULL;
    p.r = 0;
    CHECK(qlr_lora_create(&b, &p, &bad) == QLR_ERR_INVALID && !bad);
    p.r = 8;
    p.targets = 0;
    CHECK(qlr_lora_create(&b, &p, &bad) == QLR_ERR_INVALID);
    CHECK_NEAR(qlr_lora_compute_scale(16, 4, 1), 8.0, 0, 1e-7);
    CHECK_NEAR(qlr_lora_compute_scale(16, 4, 0), 4.0, 0, 1e-7);
out:
    qlr_lora_free(l);
    qlr_lora_free(l2);
    qlr_lora_free(l3);
    qlr_lora_free(lqv);
}

/* ---- round trips ---- */

static int files_equal(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int eq = qlr_file_read_all(a, 1 << 28, &x, &nx) == QLR_OK && qlr_file_read_all(b, 1 << 28, &y, &ny) == QLR_OK &&
             nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return eq;
}

static void test_round_trips(int rslora) {
    qlr_lora *l = random_adapter(99 + rslora, rslora);
    if (!l) return;
    qlr_lora_base b = tiny_base();
    const char *g1 = tmp(rslora ? "rt_rs1.gguf" : "rt1.gguf"), *g2 = tmp(rslora ? "rt_rs2.gguf" : "rt2.gguf");
    const char *pd = tmp(rslora ? "rt_rs_peft" : "rt_peft"), *pd2 = tmp(rslora ? "rt_rs_peft2" : "rt_peft2");
    qlr_lora *x = NULL, *y = NULL, *z = NULL, *w = NULL;

    CHECK_OK(qlr_lora_save_gguf(l, g1));
    CHECK_OK(qlr_lora_load_gguf(g1, NULL, &x));
    if (x) {
        CHECK(same_adapter(l, x));
        CHECK(x->alpha == l->alpha && x->use_rslora == rslora && x->dropout == l->dropout);
        CHECK(x->scale == l->scale);
        CHECK(!strcmp(x->base.arch, "llama") && x->base.n_heads == NH && x->base.n_kv_heads == NKV &&
              x->base.head_dim == HD && x->base.d_ff == 24 && x->base.d_model == 20);
        CHECK(x->base_model && !strcmp(x->base_model, l->base_model));
    }
    qlr_lora_free(x);
    x = NULL;
    CHECK_OK(qlr_lora_load_gguf(g1, &b, &x)); /* with the base model as well */
    if (x) CHECK(same_adapter(l, x));

    CHECK_OK(qlr_lora_save_peft(l, pd));
    CHECK_OK(qlr_lora_load_peft(pd, NULL, &y));
    if (y) {
        CHECK(same_adapter(l, y));
        CHECK(y->alpha == l->alpha && y->use_rslora == rslora && y->dropout == l->dropout);
        CHECK(!strcmp(y->base.arch, "llama") && y->base.n_heads == NH && y->base.head_dim == HD);
        CHECK(y->base_model && !strcmp(y->base_model, l->base_model));
    }
    /* GGUF -> PEFT -> GGUF: identical tensors and an identical file */
    if (x) CHECK_OK(qlr_lora_save_peft(x, pd2));
    CHECK_OK(qlr_lora_load_peft(pd2, NULL, &z));
    if (z) {
        CHECK(same_adapter(l, z));
        CHECK_OK(qlr_lora_save_gguf(z, g2));
        CHECK(files_equal(g1, g2));
        CHECK_OK(qlr_lora_load_gguf(g2, NULL, &w));
        if (w) CHECK(same_adapter(l, w));
    }
    /* llama.cpp's scale from the file alone equals ours */
    qlr_gguf *g = NULL;
    CHECK_OK(qlr_gguf_open(g1, &g));
    if (g) {
        float a = 0;
        CHECK_OK(qlr_gguf_get_f32(g, "adapter.lora.alpha", &a));
        CHECK_NEAR(a / R, l->scale, 0, 1e-6);
        CHECK(qlr_gguf_kv_type(g, qlr_gguf_find_key(g, "adapter.lora.alpha")) == QLR_GGUF_FLOAT32);
        qlr_gguf_close(g);
    }
    qlr_lora_free(l);
    qlr_lora_free(x);
    qlr_lora_free(y);
    qlr_lora_free(z);
    qlr_lora_free(w);
}

/* ---- the Q/K permutation, re-implemented here from the spec (§4.6) ---- */

/* GGUF row g of a head (g = 2j + t) holds HF row t*(hd/2) + j. */
static void ref_permute_rows(const float *hf, float *gg, int heads, int hd, int cols) {
    for (int h = 0; h < heads; h++)
        for (int g = 0; g < hd; g++) {
            int j = g / 2, t = g % 2;
            int src = h * hd + t * (hd / 2) + j;
            memcpy(gg + (size_t)(h * hd + g) * cols, hf + (size_t)src * cols, (size_t)cols * 4);
        }
}

static void matmul(const float *b, const float *a, double *out, int rows, int r, int cols) {
    for (int i = 0; i < rows; i++)
        for (int c = 0; c < cols; c++) {
            double s = 0;
            for (int k = 0; k < r; k++) s += (double)b[i * r + k] * a[k * cols + c];
            out[i * cols + c] = s;
        }
}

static void test_qk_permutation(void) {
    qlr_lora *l = random_adapter(5, 0);
    if (!l) return;
    const char *path = tmp("perm.gguf");
    CHECK_OK(qlr_lora_save_gguf(l, path));
    qlr_gguf *g = NULL;
    CHECK_OK(qlr_gguf_open(path, &g));
    if (!g) goto out;
    for (int L = 0; L < 2; L++)
        for (int id = 0; id < QLR_LIN_COUNT; id++) {
            const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
            char na[96], nb[96];
            snprintf(na, sizeof na, "blk.%d.%s.weight.lora_a", L, qlr_linear_gguf_name((qlr_linear_id)id));
            snprintf(nb, sizeof nb, "blk.%d.%s.weight.lora_b", L, qlr_linear_gguf_name((qlr_linear_id)id));
            const qlr_gguf_tensor *ta = qlr_gguf_find_tensor(g, na), *tb = qlr_gguf_find_tensor(g, nb);
            CHECK_MSG(ta && tb, "missing %s / %s", na, nb);
            if (!ta || !tb) continue;
            CHECK(ta->type == QLR_GGML_F32 && tb->type == QLR_GGML_F32);
            CHECK(ta->n_dims == 2 && ta->ne[0] == (uint64_t)m->in && ta->ne[1] == R);
            CHECK(tb->n_dims == 2 && tb->ne[0] == R && tb->ne[1] == (uint64_t)m->out);
            CHECK(!memcmp(ta->data, m->a, (size_t)R * m->in * 4)); /* lora_a untouched */
            float *want = malloc((size_t)m->out * R * 4);
            int heads = id == QLR_LIN_Q ? NH : NKV;
            if (id == QLR_LIN_Q || id == QLR_LIN_K) {
                CHECK_EQ_INT(m->out, heads * HD);
                ref_permute_rows(m->b, want, heads, HD, R);
            } else {
                memcpy(want, m->b, (size_t)m->out * R * 4);
            }
            CHECK_MSG(!memcmp(tb->data, want, (size_t)m->out * R * 4), "%s differs from the reference permutation", nb);
            if (id == QLR_LIN_Q || id == QLR_LIN_K) {
                /* (P·B)·A == P·(B·A): applying the exported lora_b on llama.cpp's permuted rows
                 * gives the permuted HF delta-W */
                int rows = m->out, cols = m->in;
                double *dw = malloc((size_t)rows * cols * 8), *dg = malloc((size_t)rows * cols * 8);
                float *dwf = malloc((size_t)rows * cols * 4), *pdw = malloc((size_t)rows * cols * 4);
                float *bg = malloc((size_t)rows * R * 4);
                memcpy(bg, tb->data, (size_t)rows * R * 4);
                matmul(m->b, m->a, dw, rows, R, cols);
                for (int k = 0; k < rows * cols; k++) dwf[k] = (float)dw[k];
                ref_permute_rows(dwf, pdw, heads, HD, cols);
                matmul(bg, m->a, dg, rows, R, cols);
                double maxd = 0;
                for (int k = 0; k < rows * cols; k++) maxd = fmax(maxd, fabs(dg[k] - pdw[k]));
                /* same products in the same order; only the float rounding of dW differs */
                CHECK_NEAR(maxd, 0.0, 1e-6, 0);
                /* and the permutation is not the identity on these shapes */
                CHECK(memcmp(bg, m->b, (size_t)rows * R * 4) != 0);
                free(dw);
                free(dg);
                free(dwf);
                free(pdw);
                free(bg);
            }
            free(want);
        }
    qlr_gguf_close(g);
    /* qwen2 (NeoX rope) GGUFs keep the HF row order */
    snprintf(l->base.arch, sizeof l->base.arch, "qwen2");
    path = tmp("perm_qwen2.gguf");
    CHECK_OK(qlr_lora_save_gguf(l, path));
    g = NULL;
    CHECK_OK(qlr_gguf_open(path, &g));
    if (g) {
        const qlr_gguf_tensor *t = qlr_gguf_find_tensor(g, "blk.1.attn_q.weight.lora_b");
        CHECK(t && !memcmp(t->data, qlr_lora_get(l, 1, QLR_LIN_Q)->b, (size_t)NH * HD * R * 4));
        qlr_gguf_close(g);
    }
out:
    qlr_lora_free(l);
}

/* ---- refusals ---- */

static void test_refusals(void) {
    qlr_lora *l = random_adapter(11, 0), *x = NULL;
    if (!l) return;
    const char *gp = tmp("ref.gguf"), *pd = tmp("ref_peft");
    CHECK_OK(qlr_lora_save_gguf(l, gp));
    CHECK_OK(qlr_lora_save_peft(l, pd));

    /* an adapter made for another base (d_ff differs): refused naming the tensor */
    qlr_lora_base other = tiny_base();
    other.d_ff = 32;
    CHECK(qlr_lora_load_gguf(gp, &other, &x) == QLR_ERR_INVALID && !x);
    CHECK_MSG(contains(qlr_error_msg(), "blk.0.ffn_gate.weight.lora_b") && contains(qlr_error_msg(), "another base"),
              "message: %s", qlr_error_msg());
    CHECK(qlr_lora_load_peft(pd, &other, &x) == QLR_ERR_INVALID && !x);
    CHECK_MSG(contains(qlr_error_msg(), "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"),
              "message: %s", qlr_error_msg());
    other = tiny_base();
    other.d_model = 24;
    CHECK(qlr_lora_load_gguf(gp, &other, &x) == QLR_ERR_INVALID);
    CHECK_MSG(contains(qlr_error_msg(), "blk.0.attn_q.weight.lora_a"), "message: %s", qlr_error_msg());
    other = tiny_base();
    other.n_layers = 1;
    CHECK(qlr_lora_load_gguf(gp, &other, &x) == QLR_ERR_INVALID);
    CHECK_MSG(contains(qlr_error_msg(), "blk.1.attn_q.weight.lora_a"), "message: %s", qlr_error_msg());
    other = tiny_base();
    snprintf(other.arch, sizeof other.arch, "qwen2");
    CHECK(qlr_lora_load_gguf(gp, &other, &x) == QLR_ERR_INVALID);
    CHECK_MSG(contains(qlr_error_msg(), "'llama'") && contains(qlr_error_msg(), "'qwen2'"), "message: %s", qlr_error_msg());
    /* same shapes, another head layout (n_head 2 x head_dim 16): the permutation would differ */
    other = tiny_base();
    other.n_heads = 2;
    other.n_kv_heads = 1;
    other.head_dim = 16;
    CHECK(qlr_lora_load_gguf(gp, &other, &x) == QLR_ERR_INVALID);
    CHECK_MSG(contains(qlr_error_msg(), "heads"), "message: %s", qlr_error_msg());

    /* hand-built GGUFs: missing lora_b, wrong general.type */
    const qlr_lora_module *m = qlr_lora_get_const(l, 0, QLR_LIN_V);
    uint64_t ne_a[2] = {(uint64_t)m->in, R}, ne_b[2] = {R, (uint64_t)m->out};
    for (int c = 0; c < 4; c++) {
        qlr_gguf_writer *w = qlr_gguf_writer_create(0);
        CHECK_OK(qlr_gguf_set_str(w, "general.architecture", "llama"));
        CHECK_OK(qlr_gguf_set_str(w, "general.type", c == 1 ? "model" : "adapter"));
        if (c != 2) CHECK_OK(qlr_gguf_set_str(w, "adapter.type", "lora"));
        if (c != 3) CHECK_OK(qlr_gguf_set_f32(w, "adapter.lora.alpha", 6.0f));
        CHECK_OK(qlr_gguf_add_tensor(w, "blk.0.attn_v.weight.lora_a", QLR_GGML_F32, 2, ne_a, m->a, ne_a[0] * R * 4));
        if (c != 0) CHECK_OK(qlr_gguf_add_tensor(w, "blk.0.attn_v.weight.lora_b", QLR_GGML_F32, 2, ne_b, m->b, ne_b[1] * R * 4));
        const char *p = tmp("hand.gguf");
        CHECK_OK(qlr_gguf_writer_write(w, p));
        qlr_gguf_writer_free(w);
        qlr_status st = qlr_lora_load_gguf(p, NULL, &x);
        if (c == 0) {
            CHECK(st == QLR_ERR_FORMAT && !x);
            CHECK_MSG(contains(qlr_error_msg(), "blk.0.attn_v.weight.lora_b is missing"), "message: %s", qlr_error_msg());
        } else if (c == 1) {
            CHECK(st == QLR_ERR_FORMAT && !x);
            CHECK_MSG(contains(qlr_error_msg(), "general.type is 'model'"), "message: %s", qlr_error_msg());
        } else if (c == 2) {
            CHECK(st == QLR_ERR_FORMAT && !x);
            CHECK_MSG(contains(qlr_error_msg(), "adapter.type"), "message: %s", qlr_error_msg());
        } else {
            /* a foreign file (no qlora.* keys, no alpha): llama.cpp's scale 1 means alpha = r */
            CHECK_OK(st);
            if (x) {
                CHECK(x->r == R && x->alpha == R && x->scale == 1.0f && x->targets == QLR_LORA_TARGET(QLR_LIN_V));
                CHECK(!memcmp(qlr_lora_get(x, 0, QLR_LIN_V)->b, m->b, (size_t)m->out * R * 4));
                /* exporting it to GGUF again keeps alpha = r */
                CHECK_OK(qlr_lora_save_peft(x, tmp("foreign_peft")));
            }
            qlr_lora_free(x);
            x = NULL;
        }
    }

    /* a foreign llama file with q but no head layout needs the base model */
    {
        const qlr_lora_module *q = qlr_lora_get_const(l, 0, QLR_LIN_Q);
        uint64_t qa[2] = {(uint64_t)q->in, R}, qb[2] = {R, (uint64_t)q->out};
        qlr_gguf_writer *w = qlr_gguf_writer_create(0);
        CHECK_OK(qlr_gguf_set_str(w, "general.architecture", "llama"));
        CHECK_OK(qlr_gguf_set_str(w, "general.type", "adapter"));
        CHECK_OK(qlr_gguf_set_str(w, "adapter.type", "lora"));
        CHECK_OK(qlr_gguf_set_f32(w, "adapter.lora.alpha", 6.0f));
        CHECK_OK(qlr_gguf_add_tensor(w, "blk.0.attn_q.weight.lora_a", QLR_GGML_F32, 2, qa, q->a, qa[0] * R * 4));
        float *pb = malloc((size_t)q->out * R * 4);
        ref_permute_rows(q->b, pb, NH, HD, R);
        CHECK_OK(qlr_gguf_add_tensor(w, "blk.0.attn_q.weight.lora_b", QLR_GGML_F32, 2, qb, pb, qb[1] * R * 4));
        const char *p = tmp("foreign_q.gguf");
        CHECK_OK(qlr_gguf_writer_write(w, p));
        qlr_gguf_writer_free(w);
        CHECK(qlr_lora_load_gguf(p, NULL, &x) == QLR_ERR_INVALID && !x);
        CHECK_MSG(contains(qlr_error_msg(), "blk.0.attn_q.weight.lora_b") && contains(qlr_error_msg(), "head layout"),
                  "message: %s", qlr_error_msg());
        qlr_lora_base b = tiny_base();
        CHECK_OK(qlr_lora_load_gguf(p, &b, &x));
        if (x) {
            CHECK(!memcmp(qlr_lora_get(x, 0, QLR_LIN_Q)->b, q->b, (size_t)q->out * R * 4)); /* un-permuted */
            CHECK_NEAR(x->alpha, 6.0, 0, 0);
        }
        qlr_lora_free(x);
        x = NULL;
        free(pb);
    }

    /* PEFT: corrupt adapter_config.json -> file:line:col */
    char cfg[600];
    snprintf(cfg, sizeof cfg, "%s/adapter_config.json", pd);
    const char *broken = "{\n  \"peft_type\": \"LORA\",\n  \"r\": 3\n  \"lora_alpha\": 7.5\n}\n";
    CHECK_OK(qlr_write_atomic(cfg, broken, strlen(broken)));
    CHECK(qlr_lora_load_peft(pd, NULL, &x) == QLR_ERR_FORMAT && !x);
    char want[700];
    snprintf(want, sizeof want, "%s:4:", cfg);
    CHECK_MSG(contains(qlr_error_msg(), want), "message: %s (want %s<col>)", qlr_error_msg(), want);
    /* rank_pattern refused clearly */
    const char *rp = "{\"peft_type\": \"LORA\", \"r\": 3, \"lora_alpha\": 7.5, \"rank_pattern\": {\"q_proj\": 4},"
                     " \"target_modules\": [\"q_proj\"]}";
    CHECK_OK(qlr_write_atomic(cfg, rp, strlen(rp)));
    CHECK(qlr_lora_load_peft(pd, NULL, &x) == QLR_ERR_UNSUPPORTED);
    CHECK_MSG(contains(qlr_error_msg(), "rank_pattern"), "message: %s", qlr_error_msg());
    /* wrong r against the tensors */
    const char *wr = "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8, \"target_modules\": \"all-linear\"}";
    CHECK_OK(qlr_write_atomic(cfg, wr, strlen(wr)));
    CHECK(qlr_lora_load_peft(pd, NULL, &x) == QLR_ERR_FORMAT);
    CHECK_MSG(contains(qlr_error_msg(), "rank 3") && contains(qlr_error_msg(), "r = 4"), "message: %s", qlr_error_msg());
    /* target_modules as a string: modules inferred from the tensors */
    const char *ts = "{\"peft_type\": \"LORA\", \"r\": 3, \"lora_alpha\": 7.5, \"target_modules\": \"all-linear\"}";
    CHECK_OK(qlr_write_atomic(cfg, ts, strlen(ts)));
    CHECK_OK(qlr_lora_load_peft(pd, NULL, &x));
    if (x) CHECK(x->targets == QLR_LORA_TARGETS_ALL && same_adapter(l, x));
    qlr_lora_free(x);
    x = NULL;
    /* a target list that leaves out tensors present in the file */
    const char *tl = "{\"peft_type\": \"LORA\", \"r\": 3, \"lora_alpha\": 7.5, \"target_modules\": [\"q_proj\"]}";
    CHECK_OK(qlr_write_atomic(cfg, tl, strlen(tl)));
    CHECK(qlr_lora_load_peft(pd, NULL, &x) == QLR_ERR_FORMAT);
    CHECK_MSG(contains(qlr_error_msg(), "_proj is not in target_modules"), "message: %s", qlr_error_msg());

    /* PEFT: missing lora_B */
    const char *pm = tmp("missing_b_peft");
    CHECK_OK(qlr_mkdir_p(pm));
    qlr_st_writer *sw = qlr_st_writer_create();
    uint64_t sa[2] = {R, (uint64_t)m->in};
    CHECK_OK(qlr_st_writer_set_metadata(sw, "format", "pt"));
    CHECK_OK(qlr_st_writer_add(sw, "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", QLR_ST_F32, 2, sa,
                               m->a, sa[0] * sa[1] * 4));
    char stp[600];
    snprintf(stp, sizeof stp, "%s/adapter_model.safetensors", pm);
    CHECK_OK(qlr_st_writer_write(sw, stp));
    qlr_st_writer_free(sw);
    snprintf(cfg, sizeof cfg, "%s/adapter_config.json", pm);
    const char *ok = "{\"peft_type\": \"LORA\", \"r\": 3, \"lora_alpha\": 6, \"target_modules\": [\"v_proj\"]}";
    CHECK_OK(qlr_write_atomic(cfg, ok, strlen(ok)));
    CHECK(qlr_lora_load_peft(pm, NULL, &x) == QLR_ERR_FORMAT && !x);
    CHECK_MSG(contains(qlr_error_msg(), "layers.0.self_attn.v_proj.lora_B.weight is missing"), "message: %s",
              qlr_error_msg());

    /* GGUF export without a known architecture says to give the base model */
    l->base.arch[0] = 0;
    CHECK(qlr_lora_save_gguf(l, tmp("noarch.gguf")) == QLR_ERR_INVALID);
    CHECK_MSG(contains(qlr_error_msg(), "-m"), "message: %s", qlr_error_msg());
    qlr_lora_free(l);
}

/* ---- run folders ---- */

static void test_resolve(void) {
    qlr_lora *l = random_adapter(3, 0);
    if (!l) return;
    const char *run = tmp("run1");
    char p[700];
    /* complete checkpoints (a manifest, written last) 2 and 10; 12 has its adapter but no
     * manifest (a run killed while writing it) and is skipped */
    const int steps[3] = {2, 10, 12};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/checkpoint-%d/adapter", run, steps[i]);
        CHECK_OK(qlr_lora_save_peft(l, p));
        snprintf(p, sizeof p, "%s/checkpoint-%d/" QLR_RUN_CHECKPOINT_MANIFEST, run, steps[i]);
        if (steps[i] != 12) CHECK_OK(qlr_write_atomic(p, "{}", 2));
    }
    snprintf(p, sizeof p, "%s/checkpoint-9x", run);
    CHECK_OK(qlr_mkdir_p(p));
    char *out = NULL;
    int gguf = -1;
    CHECK_OK(qlr_lora_resolve(run, &out, &gguf));
    snprintf(p, sizeof p, "%s/checkpoint-10/adapter", run);
    CHECK(out && !strcmp(out, p) && gguf == 0);
    free(out);
    snprintf(p, sizeof p, "%s/adapter", run);
    CHECK_OK(qlr_lora_save_peft(l, p));
    CHECK_OK(qlr_lora_resolve(run, &out, &gguf));
    CHECK(out && !strcmp(out, p));
    free(out);
    qlr_lora *x = NULL;
    CHECK_OK(qlr_lora_load(run, NULL, &x));
    if (x) CHECK(same_adapter(l, x));
    qlr_lora_free(x);
    const char *empty = tmp("run_empty");
    CHECK_OK(qlr_mkdir_p(empty));
    CHECK(qlr_lora_resolve(empty, &out, &gguf) == QLR_ERR_NOT_FOUND);
    CHECK(qlr_lora_resolve(tmp("nope"), &out, &gguf) == QLR_ERR_NOT_FOUND);
    qlr_lora_free(l);
}

/* ---- the Python readers ---- */

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Runs the helper; returns 77 when the package is missing, else its status; *out its stdout. */
static int run_py(const char *mode, const char *path, qlr_strbuf *out) {
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "'%s' '%s/tests/adapters/lora_py_check.py' %s '%s'", QLR_PYTHON3, QLR_SOURCE_DIR, mode,
             path);
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) qlr_strbuf_printf(out, "%.*s", (int)n, buf);
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void sorted_lines(qlr_strbuf *b, char **lines, int n) {
    qsort(lines, (size_t)n, sizeof *lines, cmp_str);
    for (int i = 0; i < n; i++) {
        qlr_strbuf_printf(b, "%s\n", lines[i]);
        free(lines[i]);
    }
}

static void test_python(void) {
    qlr_lora *l = random_adapter(21, 1); /* rsLoRA: alpha' = alpha*sqrt(r) */
    if (!l) return;
    l->targets &= ~QLR_LORA_TARGET(QLR_LIN_UP); /* not every module: names must match exactly */
    for (int L = 0; L < 2; L++) l->mods[L * QLR_LIN_COUNT + QLR_LIN_UP].a = NULL;
    const char *gp = tmp("py.gguf"), *pd = tmp("py_peft");
    CHECK_OK(qlr_lora_save_gguf(l, gp));
    CHECK_OK(qlr_lora_save_peft(l, pd));

    /* gguf-py */
    qlr_strbuf got = {0}, want = {0};
    int rc = run_py("gguf", gp, &got);
    if (rc == 77) {
        printf("note: python 'gguf' package not importable by %s: gguf-py check skipped\n", QLR_PYTHON3);
    } else {
        CHECK_EQ_INT(rc, 0);
        float af = (float)(7.5 * sqrt(3.0));
        uint32_t bits;
        memcpy(&bits, &af, 4);
        qlr_strbuf_printf(&want, "kv general.architecture STRING llama\nkv general.type STRING adapter\n"
                      "kv adapter.type STRING lora\nkv adapter.lora.alpha FLOAT32 0x%08x\n"
                      "kv general.quantization_version UINT32 2\n", bits);
        char *lines[64];
        int n = 0;
        for (int L = 0; L < 2; L++)
            for (int id = 0; id < QLR_LIN_COUNT; id++) {
                const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
                if (!m) continue;
                const char *gn = qlr_linear_gguf_name((qlr_linear_id)id);
                float *b = malloc((size_t)m->out * R * 4);
                if (id == QLR_LIN_Q || id == QLR_LIN_K) ref_permute_rows(m->b, b, id == QLR_LIN_Q ? NH : NKV, HD, R);
                else memcpy(b, m->b, (size_t)m->out * R * 4);
                lines[n] = malloc(160);
                snprintf(lines[n++], 160, "tensor blk.%d.%s.weight.lora_a F32 %d,%d %08x", L, gn, m->in, R,
                         qlr_crc32(0, m->a, (size_t)R * m->in * 4));
                lines[n] = malloc(160);
                snprintf(lines[n++], 160, "tensor blk.%d.%s.weight.lora_b F32 %d,%d %08x", L, gn, R, m->out,
                         qlr_crc32(0, b, (size_t)R * m->out * 4));
                free(b);
            }
        sorted_lines(&want, lines, n);
        CHECK_MSG(got.p && !strcmp(got.p, want.p), "gguf-py listing differs:\n--- got\n%s--- want\n%s",
                  got.p ? got.p : "", want.p);
    }
    free(got.p);
    free(want.p);

    /* safetensors */
    memset(&got, 0, sizeof got);
    memset(&want, 0, sizeof want);
    rc = run_py("peft", pd, &got);
    if (rc == 77) {
        printf("note: python 'safetensors' package not importable by %s: PEFT file check skipped\n", QLR_PYTHON3);
    } else {
        CHECK_EQ_INT(rc, 0);
        qlr_strbuf_printf(&want, "meta format pt\n");
        char *lines[64];
        int n = 0;
        char nm[192];
        for (int L = 0; L < 2; L++)
            for (int id = 0; id < QLR_LIN_COUNT; id++) {
                const qlr_lora_module *m = qlr_lora_get_const(l, L, (qlr_linear_id)id);
                if (!m) continue;
                qlr_lora_tensor_name_(nm, sizeof nm, 1, L, (qlr_linear_id)id, 0);
                lines[n] = malloc(256);
                snprintf(lines[n++], 256, "tensor %s float32 %d,%d %08x", nm, R, m->in,
                         qlr_crc32(0, m->a, (size_t)R * m->in * 4));
                qlr_lora_tensor_name_(nm, sizeof nm, 1, L, (qlr_linear_id)id, 1);
                lines[n] = malloc(256);
                snprintf(lines[n++], 256, "tensor %s float32 %d,%d %08x", nm, m->out, R,
                         qlr_crc32(0, m->b, (size_t)R * m->out * 4));
            }
        sorted_lines(&want, lines, n);
        qlr_strbuf_printf(&want, "config sorted-indent2 yes\n"
                      "config peft_type LORA r 3 lora_alpha 7.5 use_rslora True "
                      "target_modules q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj\n");
        CHECK_MSG(got.p && !strcmp(got.p, want.p), "safetensors listing differs:\n--- got\n%s--- want\n%s",
                  got.p ? got.p : "", want.p);
    }
    free(got.p);
    free(want.p);
    for (int L = 0; L < 2; L++) l->mods[L * QLR_LIN_COUNT + QLR_LIN_UP].a = NULL;
    qlr_lora_free(l);
}

/* What the adapter records of its training (base name + nf4 hash, prompt format + system
 * message) survives GGUF and PEFT; a base with another hash warns, the same or an unknown one
 * does not; shapes stay the error path. Also the merge delta against a plain double loop. */
static void test_identity_and_merge(void) {
    qlr_lora *l = random_adapter(9, 0);
    if (!l) return;
    snprintf(l->base.name, sizeof l->base.name, "%s", "SmolLM2-135M-Instruct.Q4_1.gguf");
    l->base.nf4_hash = 0xa5eae5d5377676e9ull;
    CHECK_OK(qlr_lora_set_prompt(l, "chatml", "You are a helpful AI assistant named SmolLM"));
    const char *g = tmp("ident.gguf"), *d = tmp("ident_peft");
    CHECK_OK(qlr_lora_save_gguf(l, g));
    CHECK_OK(qlr_lora_save_peft(l, d));
    for (int k = 0; k < 2; k++) {
        qlr_lora *r = NULL;
        CHECK_OK(k ? qlr_lora_load_peft(d, NULL, &r) : qlr_lora_load_gguf(g, NULL, &r));
        if (!r) continue;
        CHECK_MSG(!strcmp(r->base.name, l->base.name) && r->base.nf4_hash == l->base.nf4_hash,
                  "%s: base identity %s %016llx", k ? "peft" : "gguf", r->base.name,
                  (unsigned long long)r->base.nf4_hash);
        CHECK(r->prompt_format && !strcmp(r->prompt_format, "chatml"));
        CHECK(r->prompt_system && !strcmp(r->prompt_system, l->prompt_system));
        CHECK(same_adapter(l, r));
        qlr_lora_base other = tiny_base();
        CHECK_EQ_INT(qlr_lora_warn_base(r, &other, "t"), 0); /* unknown hash: nothing to say */
        other.nf4_hash = l->base.nf4_hash;
        CHECK_EQ_INT(qlr_lora_warn_base(r, &other, "t"), 0);
        other.nf4_hash = 0x1234;
        snprintf(other.name, sizeof other.name, "%s", "merged.gguf");
        CHECK_EQ_INT(qlr_lora_warn_base(r, &other, "t"), 1);
        qlr_lora *r2 = NULL; /* loading with that base still works (a warning, not an error) */
        CHECK_OK(k ? qlr_lora_load_peft(d, &other, &r2) : qlr_lora_load_gguf(g, &other, &r2));
        CHECK(r2 && r2->base.nf4_hash == l->base.nf4_hash); /* the record is the training base's */
        qlr_lora_free(r2);
        qlr_lora_free(r);
    }
    /* merge: w += scale * B A, HF order */
    const qlr_lora_module *m = qlr_lora_get_const(l, 1, QLR_LIN_DOWN);
    float *w = malloc((size_t)m->out * m->in * 4), *v = malloc((size_t)m->out * m->in * 4);
    for (int64_t i = 0; i < (int64_t)m->out * m->in; i++) w[i] = v[i] = 0.01f * (float)(i % 13);
    CHECK_OK(qlr_lora_add_delta(l, 1, QLR_LIN_DOWN, 0.5f, w, m->out, m->in));
    double worst = 0;
    for (int32_t o = 0; o < m->out; o++)
        for (int32_t i = 0; i < m->in; i++) {
            double acc = 0;
            for (int32_t k = 0; k < l->r; k++) acc += (double)m->b[o * l->r + k] * m->a[k * m->in + i];
            double e = fabs((double)w[o * m->in + i] - ((double)v[o * m->in + i] + 0.5 * acc));
            if (e > worst) worst = e;
        }
    CHECK_MSG(worst < 1e-6, "merge delta off by %g", worst);
    CHECK(qlr_lora_add_delta(l, 1, QLR_LIN_DOWN, 0.5f, w, m->in, m->out) == QLR_ERR_INVALID || m->in == m->out);
    qlr_error_clear();
    free(w);
    free(v);
    qlr_lora_free(l);
}

int main(void) {
    test_identity_and_merge();
    test_init();
    test_round_trips(0);
    test_round_trips(1);
    test_qk_permutation();
    test_refusals();
    test_resolve();
    test_python();
    return test_finish();
}
