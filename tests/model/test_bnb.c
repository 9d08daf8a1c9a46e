/* tests/model/test_bnb.c: bitsandbytes 4-bit HF checkpoints (spec §1.7) through the HF loader.
 * Writes a tiny llama as transformers' Linear4bit saves it (config.json with a bitsandbytes
 * quantization_config + model.safetensors with `<prefix>.weight` packed U8 codes, `.absmax`,
 * `.quant_map`, `.nested_absmax`, `.nested_quant_map` and the JSON blob
 * `.quant_state.bitsandbytes__nf4` as U8) from NF4 stores quantized here, and the same weights
 * as an f32 folder. Checks: the loaded NF4 bytes equal the written ones bit for bit (nested and
 * plain absmax), the forward equals the f32 folder's (re-quantized by the loader with the same
 * quantizer) within 1e-5 absolute (expected: identical), and the refusals — fp4, blocksize 128,
 * missing absmax, absmax size, bad JSON, quant_map not NF4 or one ulp off, nested_quant_map far
 * off, one ulp off or equal to the §2.2 float32 emulation instead of bitsandbytes' own map,
 * shape, 8-bit / non-bnb quantization_config — each naming the weight and the key (and the
 * entry, for maps). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "formats/safetensors.h"
#include "model/model.h"
#include "quant/nf4.h"
#include "tests/test_util.h"

enum { D = 64, NH = 4, NKV = 2, HD = 16, FF = 320, VOCAB = 50, NL = 2 };
#define BAD_W "model.layers.1.self_attn.v_proj.weight"

static const char *lin_names[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const int64_t lin_out[7] = {NH * HD, NKV * HD, NKV * HD, D, FF, FF, D};
static const int64_t lin_in[7] = {D, D, D, NH * HD, D, D, FF};

/* The model's weights (f32), made once. */
static float *w_embd, *w_head, *w_norm, *w_an[NL], *w_fn[NL], *w_lin[NL][7];
/* The NF4 stores written into the bnb folders: [dq][layer][linear]. */
static qlr_nf4 stores[2][NL][7];

typedef enum {
    MUT_NONE = 0,
    MUT_FP4,          /* quant_state.bitsandbytes__fp4, quant_type fp4 */
    MUT_BS128,        /* blocksize 128 in the JSON */
    MUT_NO_ABSMAX,    /* .absmax left out */
    MUT_ABSMAX_SIZE,  /* .absmax one element short */
    MUT_BAD_JSON,     /* truncated JSON blob */
    MUT_QMAP,         /* quant_map is not NF4 (fp4 values) */
    MUT_QMAP_ULP,     /* quant_map one ulp off the NF4 table in entry 5: refused */
    MUT_DYNMAP,       /* nested_quant_map far from ours */
    MUT_DYNMAP_ULP,   /* nested_quant_map one ulp off in entry 200: refused */
    MUT_DYNMAP_EMUL,  /* nested_quant_map = qlr_dynmap_create(1), <= 2 ulps off bnb's: refused */
    MUT_SHAPE,        /* JSON shape transposed */
    MUT_NO_NESTED,    /* absmax U8 but nested_absmax left out */
    MUT_CFG_8BIT,     /* quantization_config load_in_8bit */
    MUT_CFG_GPTQ,     /* quantization_config quant_method gptq */
    MUT_EMBD_4BIT,    /* embed_tokens carries an absmax key */
} mutation;

static uint64_t g_rng = 2024;
static float *rnd(int64_t n, float s, float add) {
    float *p = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) p[i] = test_rng_normal(&g_rng) * s + add;
    return p;
}

static void make_weights(void) {
    w_embd = rnd((int64_t)VOCAB * D, 1.0f, 0);
    w_head = rnd((int64_t)VOCAB * D, 0.2f, 0);
    w_norm = rnd(D, 0.1f, 1.0f);
    for (int l = 0; l < NL; l++) {
        w_an[l] = rnd(D, 0.1f, 1.0f);
        w_fn[l] = rnd(D, 0.1f, 1.0f);
        for (int i = 0; i < 7; i++) {
            w_lin[l][i] = rnd(lin_out[i] * lin_in[i], 0.15f, 0);
            for (int dq = 0; dq < 2; dq++)
                CHECK_OK(qlr_nf4_quantize(w_lin[l][i], lin_out[i], lin_in[i], dq, &stores[dq][l][i]));
        }
    }
}

/* Python repr of a float64 (shortest round trip), as json.dumps writes nested_offset. */
static void py_float(double v, char *out, size_t n) {
    for (int p = 1; p <= 17; p++) {
        snprintf(out, n, "%.*g", p, v);
        if (strtod(out, NULL) == v) break;
    }
    if (!strpbrk(out, ".eEn")) strncat(out, ".0", n - strlen(out) - 1);
}

static void write_config(const char *dir, int bnb, mutation mut) {
    char path[600], buf[2048];
    snprintf(path, sizeof path, "%s/config.json", dir);
    const char *qc = "";
    if (mut == MUT_CFG_GPTQ)
        qc = ", \"quantization_config\": {\"quant_method\": \"gptq\", \"bits\": 4}";
    else if (mut == MUT_CFG_8BIT)
        qc = ", \"quantization_config\": {\"quant_method\": \"bitsandbytes\", \"load_in_8bit\": true, "
             "\"load_in_4bit\": false}";
    else if (bnb)
        qc = ", \"quantization_config\": {\"_load_in_4bit\": true, \"_load_in_8bit\": false, "
             "\"bnb_4bit_compute_dtype\": \"bfloat16\", \"bnb_4bit_quant_storage\": \"uint8\", "
             "\"bnb_4bit_quant_type\": \"nf4\", \"bnb_4bit_use_double_quant\": true, "
             "\"load_in_4bit\": true, \"load_in_8bit\": false, \"quant_method\": \"bitsandbytes\"}";
    snprintf(buf, sizeof buf,
             "{\"architectures\": [\"LlamaForCausalLM\"], \"model_type\": \"llama\", "
             "\"hidden_size\": %d, \"num_hidden_layers\": %d, \"num_attention_heads\": %d, "
             "\"num_key_value_heads\": %d, \"intermediate_size\": %d, \"vocab_size\": %d, "
             "\"max_position_embeddings\": 128, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, "
             "\"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\"%s}",
             D, NL, NH, NKV, FF, VOCAB, qc);
    CHECK_OK(qlr_write_atomic(path, buf, strlen(buf)));
}

/* Buffers that must live until the writer has written. */
static void *keep[1024];
static int n_keep;
static void *kept(void *p) {
    keep[n_keep++] = p;
    return p;
}

static void add_f32(qlr_st_writer *w, const char *name, const float *d, uint64_t d0, uint64_t d1) {
    uint64_t shape[2] = {d0, d1};
    CHECK_OK(qlr_st_writer_add(w, name, QLR_ST_F32, d1 ? 2 : 1, shape, d, d0 * (d1 ? d1 : 1) * 4));
}

static void add_t(qlr_st_writer *w, const char *name, qlr_st_dtype dt, uint64_t d0, uint64_t d1,
                  const void *d, uint64_t nbytes) {
    uint64_t shape[2] = {d0, d1};
    CHECK_OK(qlr_st_writer_add(w, name, dt, d1 ? 2 : 1, shape, d, nbytes));
}

/* The keys of one Linear4bit weight, as bnb's QuantState.as_dict(packed=True) names them. */
static void add_bnb(qlr_st_writer *w, const char *wn, const qlr_nf4 *q, mutation mut) {
    int bad = !strcmp(wn, BAD_W);
    mutation m = bad ? mut : MUT_NONE;
    char k[256], json[1024], off[64];
    uint64_t nbytes = (uint64_t)(q->n + 1) / 2;
    add_t(w, wn, QLR_ST_U8, nbytes, 1, q->codes, nbytes);
    if (m != MUT_NO_ABSMAX) {
        snprintf(k, sizeof k, "%s.absmax", wn);
        uint64_t nb = (uint64_t)q->n_blocks - (m == MUT_ABSMAX_SIZE);
        if (q->dq) add_t(w, k, QLR_ST_U8, nb, 0, q->absmax_q, nb);
        else add_t(w, k, QLR_ST_F32, nb, 0, q->absmax, nb * 4);
    }
    /* bnb's fp4 code (get_4bit_type("fp4")), only its difference from NF4 matters here */
    static const float fp4[16] = {0, 0.0052083333f, 0.6666667f, 1.0f, 0.33333334f, 0.5f, 0.16666667f, 0.25f,
                                  0, -0.0052083333f, -0.6666667f, -1.0f, -0.33333334f, -0.5f, -0.16666667f, -0.25f};
    snprintf(k, sizeof k, "%s.quant_map", wn);
    const float *qmap = (m == MUT_QMAP || m == MUT_FP4) ? fp4 : qlr_nf4_table;
    if (m == MUT_QMAP_ULP) {
        float *qm = kept(malloc(16 * 4));
        memcpy(qm, qlr_nf4_table, 16 * 4);
        qm[5] = nextafterf(qm[5], 2.0f);
        qmap = qm;
    }
    add_f32(w, k, qmap, 16, 0);
    if (q->dq) {
        if (m != MUT_NO_NESTED) {
            snprintf(k, sizeof k, "%s.nested_absmax", wn);
            add_f32(w, k, q->dq_absmax, (uint64_t)q->n_dq_blocks, 0);
        }
        snprintf(k, sizeof k, "%s.nested_quant_map", wn);
        const float *map = qlr_dynmap_signed;
        if (m == MUT_DYNMAP || m == MUT_DYNMAP_ULP || m == MUT_DYNMAP_EMUL) {
            float *mm = kept(malloc(256 * 4));
            memcpy(mm, qlr_dynmap_signed, 256 * 4);
            if (m == MUT_DYNMAP) mm[200] *= 1.01f;
            else if (m == MUT_DYNMAP_ULP) mm[200] = nextafterf(mm[200], 2.0f);
            else qlr_dynmap_create(1, mm);
            map = mm;
        }
        add_f32(w, k, map, 256, 0);
    }
    const char *qt = m == MUT_FP4 ? "fp4" : "nf4";
    int64_t r = q->rows, c = q->cols;
    if (m == MUT_SHAPE) r = q->cols, c = q->rows;
    int n = snprintf(json, sizeof json, "{\"quant_type\": \"%s\", \"blocksize\": %d, \"dtype\": \"bfloat16\", "
                     "\"shape\": [%lld, %lld]", qt, m == MUT_BS128 ? 128 : 64, (long long)r, (long long)c);
    if (q->dq) {
        py_float((double)q->dq_offset, off, sizeof off);
        n += snprintf(json + n, sizeof json - n, ", \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", "
                      "\"nested_offset\": %s", off);
    }
    n += snprintf(json + n, sizeof json - n, "}");
    if (m == MUT_BAD_JSON) n -= 9;
    snprintf(k, sizeof k, "%s.quant_state.bitsandbytes__%s", wn, qt);
    char *blob = kept(malloc((size_t)n));
    memcpy(blob, json, (size_t)n);
    add_t(w, k, QLR_ST_U8, (uint64_t)n, 0, blob, (uint64_t)n);
}

/* Writes folder `name` under the tmpdir: bnb = -1 for f32 linears, else dq (0/1). */
static char *write_folder(const char *name, int bnb, mutation mut) {
    static char dirs[4][600];
    static int which;
    char *dir = dirs[which++ & 3];
    snprintf(dir, 600, "%s/%s", test_tmpdir(), name);
    CHECK_OK(qlr_mkdir_p(dir));
    write_config(dir, bnb >= 0, mut);
    qlr_st_writer *w = qlr_st_writer_create();
    n_keep = 0;
    add_f32(w, "model.embed_tokens.weight", w_embd, VOCAB, D);
    if (mut == MUT_EMBD_4BIT) {
        static const uint8_t am[4] = {0};
        add_t(w, "model.embed_tokens.weight.absmax", QLR_ST_U8, 4, 0, am, 4);
    }
    add_f32(w, "lm_head.weight", w_head, VOCAB, D);
    add_f32(w, "model.norm.weight", w_norm, D, 0);
    for (int l = 0; l < NL; l++) {
        char n[128];
        snprintf(n, sizeof n, "model.layers.%d.input_layernorm.weight", l);
        add_f32(w, n, w_an[l], D, 0);
        snprintf(n, sizeof n, "model.layers.%d.post_attention_layernorm.weight", l);
        add_f32(w, n, w_fn[l], D, 0);
        for (int i = 0; i < 7; i++) {
            snprintf(n, sizeof n, "model.layers.%d.%s.%s.weight", l, i < 4 ? "self_attn" : "mlp", lin_names[i]);
            if (bnb < 0) add_f32(w, n, w_lin[l][i], (uint64_t)lin_out[i], (uint64_t)lin_in[i]);
            else add_bnb(w, n, &stores[bnb][l][i], mut);
        }
    }
    char path[700];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK_OK(qlr_st_writer_write(w, path));
    qlr_st_writer_free(w);
    for (int i = 0; i < n_keep; i++) free(keep[i]);
    return dir;
}

static qlr_backend *be;

static qlr_model *load(const char *dir, int dq) {
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    lp.double_quant = dq;
    qlr_model *m = NULL;
    CHECK_OK(qlr_model_load(dir, be, &lp, &m));
    return m;
}

/* The loaded store's bytes against the written one (CPU backend: device == host memory). */
static int same_store(const qlr_nf4 *a, const qlr_nf4 *b) {
    if (a->rows != b->rows || a->cols != b->cols || a->n_blocks != b->n_blocks || a->dq != b->dq) return 0;
    if (memcmp(a->codes, b->codes, (size_t)(a->n + 1) / 2)) return 0;
    if (!a->dq) return !memcmp(a->absmax, b->absmax, (size_t)a->n_blocks * 4);
    return a->n_dq_blocks == b->n_dq_blocks && !memcmp(a->absmax_q, b->absmax_q, (size_t)a->n_blocks) &&
           !memcmp(a->dq_absmax, b->dq_absmax, (size_t)a->n_dq_blocks * 4) &&
           !memcmp(&a->dq_offset, &b->dq_offset, 4);
}

enum { T = 11 };
static void logits(qlr_model *m, float *out) {
    int32_t tok[T], pos[T], seq[T] = {0};
    uint64_t r = 7;
    for (int i = 0; i < T; i++) tok[i] = (int32_t)(test_rng_u64(&r) % VOCAB), pos[i] = i;
    qlr_kv_cache *kv = NULL;
    qlr_forward *f = NULL;
    CHECK_OK(qlr_kv_cache_create(m, 1, 32, &kv));
    CHECK_OK(qlr_forward_create(m, T, T, &f));
    float *lg = NULL;
    qlr_batch b = {T, tok, pos, seq, T, NULL, NULL, NULL};
    CHECK_OK(qlr_model_forward(f, kv, &b, &lg));
    if (lg) memcpy(out, lg, (size_t)T * VOCAB * 4);
    qlr_forward_free(f);
    qlr_kv_cache_free(kv);
}

/* Forward tolerance against the f32 folder: both hold the same NF4 bytes and run the same
 * kernels, so the logits are expected to be identical; 1e-5 absolute leaves room for nothing
 * but summation-order noise (logits are O(1)). */
#define FWD_ATOL 1e-5

static void test_load(int dq) {
    char nb[32], nf[32];
    snprintf(nb, sizeof nb, "bnb_dq%d", dq);
    snprintf(nf, sizeof nf, "f32_dq%d", dq);
    qlr_model *mb = load(write_folder(nb, dq, MUT_NONE), 1 /* ignored for bnb linears */);
    qlr_model *mf = load(write_folder(nf, -1, MUT_NONE), dq);
    if (!mb || !mf) goto out;
    int ok = 1, same_as_f32 = 1;
    for (int l = 0; l < NL; l++)
        for (int i = 0; i < 7; i++) {
            CHECK_MSG(same_store(&mb->layers[l].w[i], &stores[dq][l][i]),
                      "dq %d layer %d %s: loaded bytes differ from the written ones", dq, l, lin_names[i]);
            ok &= same_store(&mb->layers[l].w[i], &stores[dq][l][i]);
            same_as_f32 &= same_store(&mb->layers[l].w[i], &mf->layers[l].w[i]);
        }
    CHECK(ok);
    CHECK_MSG(same_as_f32, "dq %d: the f32 folder re-quantized differently from the written stores", dq);
    CHECK_EQ_INT(mb->nf4_bytes, mf->nf4_bytes);
    float *a = malloc(T * VOCAB * 4), *b = malloc(T * VOCAB * 4);
    logits(mb, a);
    logits(mf, b);
    double md = 0;
    for (int i = 0; i < T * VOCAB; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (!(d <= md)) md = d;
    }
    CHECK_MSG(md <= FWD_ATOL, "dq %d: bnb vs f32 forward max |diff| %g > %g", dq, md, FWD_ATOL);
    printf("dq %d: 14 linears bit-identical; forward max |diff| vs f32 folder %g\n", dq, md);
    free(a), free(b);
out:
    qlr_model_free(mb);
    qlr_model_free(mf);
}

static void refuse(const char *name, mutation mut, qlr_status want, const char *must1, const char *must2) {
    char *dir = write_folder(name, 1, mut);
    qlr_model_load_params lp = qlr_model_load_params_default();
    lp.progress = 0;
    qlr_model *m = NULL;
    qlr_status st = qlr_model_load(dir, be, &lp, &m);
    CHECK_MSG(st == want, "%s: status %s, expected %s (%s)", name, qlr_status_str(st), qlr_status_str(want),
              qlr_error_msg());
    CHECK(m == NULL);
    const char *msg = qlr_error_msg();
    CHECK_MSG(strstr(msg, must1) != NULL, "%s: message lacks '%s': %s", name, must1, msg);
    if (must2) CHECK_MSG(strstr(msg, must2) != NULL, "%s: message lacks '%s': %s", name, must2, msg);
    printf("%-14s %s\n", name, msg);
    qlr_model_free(m);
}

static void test_refusals(void) {
    refuse("fp4", MUT_FP4, QLR_ERR_UNSUPPORTED, BAD_W, "fp4");
    refuse("bs128", MUT_BS128, QLR_ERR_UNSUPPORTED, BAD_W ".quant_state.bitsandbytes__nf4", "blocksize 128");
    refuse("no_absmax", MUT_NO_ABSMAX, QLR_ERR_NOT_FOUND, BAD_W ".absmax", "missing");
    refuse("absmax_size", MUT_ABSMAX_SIZE, QLR_ERR_FORMAT, BAD_W ".absmax", "U8 [31]");
    refuse("bad_json", MUT_BAD_JSON, QLR_ERR_FORMAT, BAD_W ".quant_state.bitsandbytes__nf4", NULL);
    refuse("qmap_not_nf4", MUT_QMAP, QLR_ERR_UNSUPPORTED, BAD_W ".quant_map", "NF4");
    refuse("qmap_ulp", MUT_QMAP_ULP, QLR_ERR_UNSUPPORTED, BAD_W ".quant_map", "entry 5 is");
    refuse("dynmap", MUT_DYNMAP, QLR_ERR_UNSUPPORTED, BAD_W ".nested_quant_map", "entry 200");
    /* the tables are bitsandbytes' own, so even one ulp in one entry is another map */
    refuse("dynmap_ulp", MUT_DYNMAP_ULP, QLR_ERR_UNSUPPORTED, BAD_W ".nested_quant_map",
           "entry 200 is");
    /* the §2.2 float32 emulation (what the table used to be) differs from bitsandbytes' map in a
     * few entries by up to 2 ulps (tests/quant/test_dynmap.c); the message names the first */
    float emul[256];
    qlr_dynmap_create(1, emul);
    int first = -1, ndiff = 0;
    for (int i = 0; i < 256; i++)
        if (memcmp(&emul[i], &qlr_dynmap_signed[i], 4) != 0) {
            if (first < 0) first = i;
            ndiff++;
        }
    CHECK(first >= 0);
    char want[64];
    snprintf(want, sizeof want, "entry %d is %.9g", first, (double)emul[first]);
    refuse("dynmap_emul", MUT_DYNMAP_EMUL, QLR_ERR_UNSUPPORTED, BAD_W ".nested_quant_map", want);
    snprintf(want, sizeof want, "%d of 256 entries differ", ndiff);
    CHECK_MSG(strstr(qlr_error_msg(), want) != NULL, "dynmap_emul: message lacks '%s': %s", want,
              qlr_error_msg());
    refuse("shape", MUT_SHAPE, QLR_ERR_FORMAT, BAD_W ".quant_state.bitsandbytes__nf4", "shape [64, 32]");
    refuse("no_nested", MUT_NO_NESTED, QLR_ERR_NOT_FOUND, BAD_W ".nested_absmax", "missing");
    refuse("cfg_8bit", MUT_CFG_8BIT, QLR_ERR_UNSUPPORTED, "config.json", "8-bit");
    refuse("cfg_gptq", MUT_CFG_GPTQ, QLR_ERR_UNSUPPORTED, "config.json", "'gptq'");
    refuse("embd_4bit", MUT_EMBD_4BIT, QLR_ERR_UNSUPPORTED, "model.embed_tokens.weight", "only the decoder linears");
}

int main(void) {
    qlr_log_set_level(QLR_LOG_ERROR);
    CHECK_OK(qlr_backend_cpu_create(2, &be));
    if (!be) return test_finish();
    make_weights();
    /* the tensors are big enough for several absmax blocks and a partial second dq block */
    CHECK(stores[1][0][4].n_dq_blocks == 2);
    test_load(1);
    test_load(0);
    test_refusals();
    for (int dq = 0; dq < 2; dq++)
        for (int l = 0; l < NL; l++)
            for (int i = 0; i < 7; i++) qlr_nf4_free(&stores[dq][l][i]);
    for (int l = 0; l < NL; l++) {
        free(w_an[l]), free(w_fn[l]);
        for (int i = 0; i < 7; i++) free(w_lin[l][i]);
    }
    free(w_embd), free(w_head), free(w_norm);
    qlr_backend_free(be);
    return test_finish();
}
