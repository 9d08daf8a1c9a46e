/* model/loader_bnb.c: bitsandbytes 4-bit checkpoints (spec §1.7). For each Linear4bit weight
 * `<prefix>.weight` the packed codes, `.absmax` (f32, or uint8 when nested), `.quant_map`,
 * `.nested_absmax`, `.nested_quant_map` and the JSON blob `.quant_state.bitsandbytes__nf4` are
 * validated against each other and against the expected [out, in], then the stored bytes go
 * into the NF4 store unchanged (no re-quantization). The backends decode with the built-in NF4
 * table and signed dynamic map (bitsandbytes' own values, bit for bit), so a checkpoint whose
 * maps differ in any bit is refused naming the entry rather than decoded with other values. Also
 * the config.json
 * quantization_config check. The unpacked quant-state form (quant_type, blocksize, ... as
 * separate items) cannot occur in safetensors, which hold only tensors, so it is not read. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "formats/json.h"
#include "model/loader_bnb.h"
#include "quant/nf4.h"

static const char *const k_suffixes[] = {
    "absmax", "quant_map", "nested_absmax", "nested_quant_map",
    "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4",
};

static const qlr_st_tensor *find_key(const qlr_st_set *s, const char *weight, const char *suffix,
                                     char *key, size_t key_sz) {
    snprintf(key, key_sz, "%s.%s", weight, suffix);
    return qlr_st_set_find(s, key);
}

int qlr_bnb_has_quant_state(const qlr_st_set *s, const char *weight) {
    char key[512];
    for (size_t i = 0; i < sizeof k_suffixes / sizeof *k_suffixes; i++)
        if (find_key(s, weight, k_suffixes[i], key, sizeof key)) return 1;
    return 0;
}

qlr_status qlr_bnb_check_config(const char *path, int *is_bnb4) {
    if (is_bnb4) *is_bnb4 = 0;
    json_t *j = NULL;
    QLR_TRY(qlr_json_load_file(path, &j));
    qlr_status st = QLR_OK;
    json_t *qc = NULL;
    const char *method = NULL;
    int b8 = 0, b4 = 0;
    if ((st = qlr_json_get_object_opt(j, path, "quantization_config", &qc)) != QLR_OK || !qc) goto done;
    if ((st = qlr_json_get_string_opt(j, path, "quantization_config.quant_method", NULL, &method)))
        goto done;
    if (!method || strcmp(method, "bitsandbytes") != 0) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: quantization_config.quant_method '%s' is not "
                        "supported (supported: bitsandbytes 4-bit nf4, or an unquantized checkpoint)",
                        path, method ? method : "(missing)");
        goto done;
    }
    if ((st = qlr_json_get_bool_opt(j, path, "quantization_config.load_in_8bit", 0, &b8))) goto done;
    if ((st = qlr_json_get_bool_opt(j, path, "quantization_config.load_in_4bit", 0, &b4))) goto done;
    if (b8) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: quantization_config: bitsandbytes 8-bit "
                        "(load_in_8bit, LLM.int8) checkpoints are not supported; only 4-bit nf4", path);
        goto done;
    }
    if (is_bnb4) *is_bnb4 = b4;
done:
    json_decref(j);
    return st;
}

/* ---- helpers ---- */

static void shape_str(const qlr_st_tensor *t, char *out, size_t n) {
    size_t k = (size_t)snprintf(out, n, "%s [", qlr_st_dtype_name(t->dtype));
    for (uint32_t i = 0; i < t->n_dims && i < 4 && k < n; i++)
        k += (size_t)snprintf(out + k, n - k, "%s%llu", i ? ", " : "", (unsigned long long)t->shape[i]);
    if (k < n) snprintf(out + k, n - k, "%s]", t->n_dims > 4 ? ", ..." : "");
}

/* A 1-D tensor of `dt` with `n` elements, or an error naming the key. */
static qlr_status check_1d(const char *src, const char *weight, const char *key,
                           const qlr_st_tensor *t, qlr_st_dtype dt, uint64_t n, const char *why) {
    if (t->dtype == dt && t->n_dims == 1 && t->shape[0] == n) return QLR_OK;
    char got[96];
    shape_str(t, got, sizeof got);
    return qlr_errorf(QLR_ERR_FORMAT, "%s: bitsandbytes 4-bit weight '%s': key '%s' is %s, "
                      "expected %s [%llu]%s", src, weight, key, got, qlr_st_dtype_name(dt),
                      (unsigned long long)n, why ? why : "");
}

/* Distance in units in the last place between two finite floats (UINT32_MAX for NaN/inf);
 * only for the message: any difference refuses. */
static uint32_t ulps(float a, float b) {
    if (!isfinite(a) || !isfinite(b)) return UINT32_MAX;
    int32_t ia, ib;
    memcpy(&ia, &a, 4);
    memcpy(&ib, &b, 4);
    if (ia < 0) ia = INT32_MIN - ia; /* ordered integer line: -0 and +0 both 0 */
    if (ib < 0) ib = INT32_MIN - ib;
    int64_t d = (int64_t)ia - ib;
    if (d < 0) d = -d;
    return d > (int64_t)UINT32_MAX ? UINT32_MAX : (uint32_t)d;
}

/* The stored f32 map t (n entries, possibly unaligned bytes) must equal ref bit for bit: the
 * tables are bitsandbytes' own (quant/dynmap.c, quant/nf4.c), so a real checkpoint matches
 * exactly and anything else (even one ulp, even -0 for +0) is another map. Returns
 * QLR_ERR_UNSUPPORTED naming the key and the first differing entry, else QLR_OK. */
static qlr_status check_map(const char *src, const char *weight, const char *key,
                            const qlr_st_tensor *t, const float *ref, int n, const char *what) {
    const uint8_t *p = t->data;
    int first = -1, diff = 0;
    float fv = 0;
    for (int i = 0; i < n; i++) {
        float v;
        memcpy(&v, p + 4 * (size_t)i, 4);
        if (memcmp(&v, &ref[i], 4) == 0) continue;
        if (first < 0) first = i, fv = v;
        diff++;
    }
    if (first < 0) return QLR_OK;
    uint32_t u = ulps(fv, ref[first]);
    char dist[48];
    if (u == UINT32_MAX) snprintf(dist, sizeof dist, "not finite");
    else if (u == 0) snprintf(dist, sizeof dist, "sign of zero differs");
    else snprintf(dist, sizeof dist, "%lu ulp%s apart", (unsigned long)u, u == 1 ? "" : "s");
    return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: bitsandbytes 4-bit weight '%s': key '%s' is not %s "
                      "(entry %d is %.9g, expected %.9g, %s; %d of %d entries differ); only that "
                      "map, bit for bit, is supported", src, weight, key, what, first, (double)fv,
                      (double)ref[first], dist, diff, n);
}

/* ---- the view ---- */

qlr_status qlr_bnb_nf4_view(const qlr_st_set *s, const char *src, const char *weight, int64_t rows,
                            int64_t cols, qlr_nf4 *out) {
    memset(out, 0, sizeof *out);
    char key[512], qs_src[1200];
    const qlr_st_tensor *t_w = qlr_st_set_find(s, weight);
    const qlr_st_tensor *t_fp4 = find_key(s, weight, "quant_state.bitsandbytes__fp4", key, sizeof key);
    if (t_fp4)
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: bitsandbytes 4-bit weight '%s' is fp4 (key '%s'); "
                          "only nf4 is supported", src, weight, key);
    const qlr_st_tensor *t_qs = find_key(s, weight, "quant_state.bitsandbytes__nf4", key, sizeof key);
    if (!t_qs)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: bitsandbytes 4-bit weight '%s': key '%s' is "
                          "missing (the packed quant state)", src, weight, key);
    if (!t_w)
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: bitsandbytes 4-bit weight '%s': the packed weight "
                          "'%s' is missing", src, weight, weight);

    /* the JSON blob */
    if (t_qs->dtype != QLR_ST_U8 || t_qs->n_dims != 1) {
        char got[96];
        shape_str(t_qs, got, sizeof got);
        return qlr_errorf(QLR_ERR_FORMAT, "%s: bitsandbytes 4-bit weight '%s': key '%s' is %s, "
                          "expected U8 [L] (UTF-8 JSON bytes)", src, weight, key, got);
    }
    snprintf(qs_src, sizeof qs_src, "%s: bitsandbytes 4-bit weight '%s': key '%s'", src, weight, key);
    json_t *j = NULL;
    QLR_TRY(qlr_json_load_buffer(qs_src, t_qs->data, (size_t)t_qs->nbytes, &j));
    qlr_status st = QLR_OK;
    const char *qt = NULL, *dtype = NULL, *ndtype = NULL;
    int64_t bs = 0, nbs = 0;
    double noff = 0;
    json_t *shape = NULL, *jnoff = NULL;
    if (!json_is_object(j)) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: expected a JSON object, got %s", qs_src, qlr_json_type_name(j));
        goto done;
    }
    if ((st = qlr_json_get_string(j, qs_src, "quant_type", &qt))) goto done;
    if (strcmp(qt, "nf4") != 0) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: quant_type '%s' is not supported (only nf4)", qs_src, qt);
        goto done;
    }
    if ((st = qlr_json_get_int(j, qs_src, "blocksize", &bs))) goto done;
    if (bs != QLR_NF4_BLOCK) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: blocksize %lld is not supported (only %d, the "
                        "QLoRA default)", qs_src, (long long)bs, QLR_NF4_BLOCK);
        goto done;
    }
    if ((st = qlr_json_get_string(j, qs_src, "dtype", &dtype))) goto done;
    if (strcmp(dtype, "float32") && strcmp(dtype, "float16") && strcmp(dtype, "bfloat16")) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: dtype '%s' is not one of float32, float16, bfloat16",
                        qs_src, dtype);
        goto done;
    }
    if ((st = qlr_json_get_array(j, qs_src, "shape", &shape))) goto done;
    {
        json_t *s0 = json_array_get(shape, 0), *s1 = json_array_get(shape, 1);
        if (json_array_size(shape) != 2 || !json_is_integer(s0) || !json_is_integer(s1)) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: key \"shape\": expected [out, in] (two integers)", qs_src);
            goto done;
        }
        if (json_integer_value(s0) != rows || json_integer_value(s1) != cols) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: shape [%lld, %lld], expected [%lld, %lld] from config.json",
                            qs_src, (long long)json_integer_value(s0), (long long)json_integer_value(s1),
                            (long long)rows, (long long)cols);
            goto done;
        }
    }
    /* sizes (overflow-checked) */
    uint64_t n, n_bytes, nb, ndq;
    if (rows <= 0 || cols <= 0 || !qlr_mul_ok((uint64_t)rows, (uint64_t)cols, &n) || n > (uint64_t)INT64_MAX - 1) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: shape [%lld, %lld] is empty or too large", qs_src,
                        (long long)rows, (long long)cols);
        goto done;
    }
    n_bytes = n / 2 + (n & 1);
    nb = n / QLR_NF4_BLOCK + (n % QLR_NF4_BLOCK != 0);
    ndq = nb / QLR_NF4_DQ_BLOCK + (nb % QLR_NF4_DQ_BLOCK != 0);

    /* the packed weight: uint8 [(n+1)/2, 1]; another quant_storage dtype holds the same bytes */
    if (t_w->nbytes != n_bytes || (t_w->n_dims == 2 && t_w->shape[1] != 1) || t_w->n_dims < 1 ||
        t_w->n_dims > 2 || (t_w->dtype == QLR_ST_U8 && t_w->shape[0] != n_bytes)) {
        char got[96];
        shape_str(t_w, got, sizeof got);
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: bitsandbytes 4-bit weight '%s': key '%s' is %s (%llu "
                        "bytes), expected U8 [%llu, 1] (packed codes of %lld x %lld)", src, weight, weight,
                        got, (unsigned long long)t_w->nbytes, (unsigned long long)n_bytes,
                        (long long)rows, (long long)cols);
        goto done;
    }

    /* quant_map: the NF4 table */
    const qlr_st_tensor *t_qm = find_key(s, weight, "quant_map", key, sizeof key);
    if (!t_qm) {
        st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: bitsandbytes 4-bit weight '%s': key '%s' is missing",
                        src, weight, key);
        goto done;
    }
    if ((st = check_1d(src, weight, key, t_qm, QLR_ST_F32, 16, NULL))) goto done;
    if ((st = check_map(src, weight, key, t_qm, qlr_nf4_table, 16, "the NF4 table (fp4 or another 4-bit map?)")))
        goto done;

    /* absmax, and the nested state */
    const qlr_st_tensor *t_am = find_key(s, weight, "absmax", key, sizeof key);
    char am_key[512];
    snprintf(am_key, sizeof am_key, "%s", key);
    if (!t_am) {
        st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: bitsandbytes 4-bit weight '%s': key '%s' is missing",
                        src, weight, am_key);
        goto done;
    }
    const qlr_st_tensor *t_na = find_key(s, weight, "nested_absmax", key, sizeof key);
    char na_key[512];
    snprintf(na_key, sizeof na_key, "%s", key);
    const qlr_st_tensor *t_nm = find_key(s, weight, "nested_quant_map", key, sizeof key);
    char nm_key[512];
    snprintf(nm_key, sizeof nm_key, "%s", key);
    jnoff = json_object_get(j, "nested_offset");
    int nested = t_na || t_nm || jnoff || t_am->dtype == QLR_ST_U8;
    char why[128];
    snprintf(why, sizeof why, " (one per %d-element block of %llu)", QLR_NF4_BLOCK, (unsigned long long)n);
    if (!nested) {
        if ((st = check_1d(src, weight, am_key, t_am, QLR_ST_F32, nb, why))) goto done;
        out->dq = 0;
        out->absmax = (float *)(uintptr_t)t_am->data;
    } else {
        if (!t_na || !t_nm) {
            st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: bitsandbytes 4-bit weight '%s': key '%s' is missing "
                            "(the state is double-quantized)", src, weight, !t_na ? na_key : nm_key);
            goto done;
        }
        if ((st = check_1d(src, weight, am_key, t_am, QLR_ST_U8, nb, why))) goto done;
        snprintf(why, sizeof why, " (one per %d absmax values of %llu)", QLR_NF4_DQ_BLOCK,
                 (unsigned long long)nb);
        if ((st = check_1d(src, weight, na_key, t_na, QLR_ST_F32, ndq, why))) goto done;
        if ((st = check_1d(src, weight, nm_key, t_nm, QLR_ST_F32, 256, NULL))) goto done;
        if ((st = check_map(src, weight, nm_key, t_nm, qlr_dynmap_signed, 256,
                            "bitsandbytes' signed dynamic map")))
            goto done;
        if ((st = qlr_json_get_int(j, qs_src, "nested_blocksize", &nbs))) goto done;
        if (nbs != QLR_NF4_DQ_BLOCK) {
            st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: nested_blocksize %lld is not supported (only %d)",
                            qs_src, (long long)nbs, QLR_NF4_DQ_BLOCK);
            goto done;
        }
        if ((st = qlr_json_get_string(j, qs_src, "nested_dtype", &ndtype))) goto done;
        if (strcmp(ndtype, "float32") != 0) {
            st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: nested_dtype '%s' is not supported (only float32)",
                            qs_src, ndtype);
            goto done;
        }
        if ((st = qlr_json_get_double(j, qs_src, "nested_offset", &noff))) goto done;
        if (!isfinite(noff) || fabs(noff) > 3.4028234663852886e38) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: nested_offset %g is not a finite float32", qs_src, noff);
            goto done;
        }
        out->dq = 1;
        out->absmax_q = (uint8_t *)(uintptr_t)t_am->data;
        out->dq_absmax = (float *)(uintptr_t)t_na->data;
        out->dq_offset = (float)noff; /* bnb writes offset.item(): a float32 value, exact */
        out->n_dq_blocks = (int64_t)ndq;
    }
    out->rows = rows;
    out->cols = cols;
    out->n = (int64_t)n;
    out->n_blocks = (int64_t)nb;
    out->codes = (uint8_t *)(uintptr_t)t_w->data;
    out->owned = 0;
done:
    json_decref(j);
    if (st != QLR_OK) memset(out, 0, sizeof *out);
    return st;
}

qlr_status qlr_model_upload_bnb(qlr_model *m, const qlr_st_set *s, const char *src,
                                const char *weight, int64_t rows, int64_t cols, qlr_nf4 *out,
                                uint64_t *hash) {
    qlr_nf4 view;
    QLR_TRY(qlr_bnb_nf4_view(s, src, weight, rows, cols, &view));
    *hash = qlr_nf4_hash(&view);
    /* not owned: the backend copies the bytes (also on the CPU backend) */
    qlr_status st = qlr_backend_nf4_upload(m->be, &view, out, 0);
    if (st != QLR_OK) return qlr_error_prefix("%s: bitsandbytes 4-bit weight '%s'", src, weight);
    m->nf4_bytes += qlr_nf4_bytes(rows, cols, view.dq);
    if (!m->be->host_visible) st = m->be->mem.sync(m->be);
    return st;
}
