/* tests/quant/test_nf4_bnb.c: our NF4 quantizer against bitsandbytes' bytes for the same
 * weights (tests/data/quant/bnb_nf4_ref.json, written by tests/tools/make_bnb_nf4_ref.py):
 * quantize_4bit(nf4, blocksize 64, compress_statistics=True) gives the packed 4-bit codes, the
 * 8-bit absmax codes, the second-level absmax and the offset, and ours must equal each of them
 * bit for bit, for every case (odd sizes, a partial block of 64, a partial group of 256, an
 * all-zero block, a bfloat16 input, a mean that torch splits over thread blocks). The input of
 * each case is rebuilt here from its seed with the generator's integer arithmetic. The test
 * prints which producer made the reference: real bitsandbytes on a GPU, or the script's numpy
 * emulation (a second implementation of the same reading of the sources) until someone with a
 * GPU regenerates the file. bitsandbytes' one deviation from IEEE arithmetic, the fast-math
 * reciprocal of its kernels, is listed element by element in the reference and each listed
 * element must be explained by it (apply_fastmath). */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "quant/nf4.h"
#include "tests/test_util.h"

static uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The generator's input (make_input in make_bnb_nf4_ref.py). */
static float *make_input(int64_t rows, int64_t cols, uint64_t seed, int bf16, int64_t zero_row) {
    float *x = malloc(sizeof(float) * (size_t)(rows * cols));
    if (!x) return NULL;
    for (int64_t r = 0; r < rows; r++) {
        float scale = ((float)(8 + r % 7) / 8.0f) * ldexpf(1.0f, -(int)(4 + r % 5));
        for (int64_t c = 0; c < cols; c++) {
            uint64_t i = (uint64_t)(r * cols + c);
            int64_t k = (int64_t)(splitmix64(seed << 32 | i) >> 40) - (1 << 23);
            float v = (float)k * ldexpf(1.0f, -23);
            float y = r == zero_row ? 0.0f : v * scale;
            x[i] = bf16 ? qlr_bf16_to_f32(qlr_f32_to_bf16(y)) : y;
        }
    }
    return x;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Compares `n` bytes with a reference entry {"size", "crc32", "hex"?}. Returns the number of
 * differing bytes when the hex is there, else 0 or 1 (crc32 and size), and -1 on a malformed
 * entry. `first` gets the first differing byte (or -1). */
static long compare(const char *what, const char *case_name, json_t *e, const uint8_t *p, size_t n, long *first) {
    *first = -1;
    json_t *jsize = json_object_get(e, "size"), *jcrc = json_object_get(e, "crc32");
    const char *hex = json_string_value(json_object_get(e, "hex"));
    if (!json_is_integer(jsize) || !json_is_string(jcrc)) {
        CHECK_MSG(0, "%s: %s: malformed reference entry", case_name, what);
        return -1;
    }
    if ((size_t)json_integer_value(jsize) != n) {
        CHECK_MSG(0, "%s: %s: %zu bytes, the reference has %lld", case_name, what, n,
                  (long long)json_integer_value(jsize));
        return 1;
    }
    if (hex) {
        if (strlen(hex) != 2 * n) {
            CHECK_MSG(0, "%s: %s: reference hex of the wrong length", case_name, what);
            return -1;
        }
        long diff = 0;
        for (size_t i = 0; i < n; i++) {
            int b = hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]);
            if (b != p[i]) {
                if (*first < 0) *first = (long)i;
                diff++;
            }
        }
        return diff;
    }
    char crc[16];
    snprintf(crc, sizeof crc, "%08x", qlr_crc32(0, p, n));
    return strcmp(crc, json_string_value(jcrc)) != 0;
}

/* bitsandbytes' kernels are built with --use_fast_math: their r = 1.0f / absmax is the GPU's
 * approximate reciprocal, within 1 ulp of ours, which moves an element whose scaled value lies
 * within an ulp of a decision threshold to the neighbouring code. The reference lists such
 * elements ([index, bitsandbytes' code]) against the IEEE computation of the same algorithm.
 * Each must be explained: ours differs there, and bitsandbytes' code is what a reciprocal one
 * ulp up or down gives. Then ours takes bitsandbytes' code there, so that the whole arrays can
 * be compared. `which`: 0 = the 4-bit codes, 1 = the 8-bit absmax codes. Returns the count. */
static int apply_fastmath(const char *name, json_t *list, qlr_nf4 *q, const float *x, const float *amax, int which) {
    if (!json_is_array(list)) return 0;
    size_t k;
    json_t *e;
    int count = 0, bad = 0;
    int64_t limit = which ? q->n_blocks : q->n;
    CHECK_MSG((int64_t)json_array_size(list) * 1000 <= limit + 1000,
              "%s: %zu fast-math differences in %lld values is far more than a reciprocal's last bit explains", name,
              json_array_size(list), (long long)limit);
    json_array_foreach(list, k, e) {
        int64_t i = json_integer_value(json_array_get(e, 0));
        int want = (int)json_integer_value(json_array_get(e, 1));
        if (i < 0 || i >= limit || want < 0 || want > (which ? 255 : 15)) {
            CHECK_MSG(0, "%s: bad fast-math entry", name);
            return count;
        }
        int ours, up, down;
        if (!which) {
            float r = 1.0f / amax[i / QLR_NF4_BLOCK];
            ours = i % 2 == 0 ? q->codes[i / 2] >> 4 : q->codes[i / 2] & 15;
            up = qlr_nf4_nearest(x[i] * nextafterf(r, INFINITY));
            down = qlr_nf4_nearest(x[i] * nextafterf(r, -INFINITY));
        } else {
            float centered = amax[i] - q->dq_offset, r = 1.0f / q->dq_absmax[i / QLR_NF4_DQ_BLOCK];
            ours = q->absmax_q[i];
            up = qlr_dynmap_quantize_bnb(qlr_dynmap_signed, centered * nextafterf(r, INFINITY));
            down = qlr_dynmap_quantize_bnb(qlr_dynmap_signed, centered * nextafterf(r, -INFINITY));
        }
        if (ours == want || (want != up && want != down)) {
            if (bad++ < 5)
                CHECK_MSG(0, "%s: %s %lld: bitsandbytes %d, ours %d, a reciprocal 1 ulp up/down gives %d/%d: not "
                          "explained by the fast-math reciprocal", name, which ? "absmax code" : "code", (long long)i,
                          want, ours, up, down);
            continue;
        }
        if (!which) q->codes[i / 2] = (uint8_t)(i % 2 == 0 ? (q->codes[i / 2] & 15) | want << 4
                                                           : (q->codes[i / 2] & 0xF0) | want);
        else q->absmax_q[i] = (uint8_t)want;
        count++;
    }
    CHECK_MSG(bad == 0, "%s: %d fast-math entries not explained", name, bad);
    return count;
}

static void run_case(json_t *c) {
    const char *name = json_string_value(json_object_get(c, "name"));
    int64_t rows = json_integer_value(json_object_get(c, "rows")), cols = json_integer_value(json_object_get(c, "cols"));
    uint64_t seed = (uint64_t)json_integer_value(json_object_get(c, "seed"));
    int64_t zero_row = json_integer_value(json_object_get(c, "zero_row"));
    const char *dtype = json_string_value(json_object_get(c, "dtype"));
    const char *off = json_string_value(json_object_get(c, "offset_bits"));
    if (!name || rows <= 0 || cols <= 0 || !dtype || !off) {
        CHECK_MSG(0, "malformed case in the reference");
        return;
    }
    float *x = make_input(rows, cols, seed, !strcmp(dtype, "bfloat16"), zero_row);
    CHECK(x != NULL);
    if (!x) return;
    qlr_nf4 q;
    CHECK_OK(qlr_nf4_quantize(x, rows, cols, 1, &q));
    if (!q.codes) {
        free(x);
        return;
    }
    /* the first-level absmax (the store keeps only its double quantization) */
    float *amax = malloc(sizeof(float) * (size_t)q.n_blocks);
    uint8_t *scratch = malloc((size_t)((q.n + 1) / 2));
    CHECK_OK(qlr_nf4_quantize_blocks(x, q.n, scratch, amax));
    free(scratch);
    int fm_codes = apply_fastmath(name, json_object_get(c, "codes_fastmath"), &q, x, amax, 0);
    int fm_absq = apply_fastmath(name, json_object_get(c, "absmax_q_fastmath"), &q, x, amax, 1);
    free(amax);
    free(x);
    long f1, f2, f3;
    long d_codes = compare("codes", name, json_object_get(c, "codes"), q.codes, (size_t)((q.n + 1) / 2), &f1);
    long d_absq = compare("absmax_q", name, json_object_get(c, "absmax_q"), q.absmax_q, (size_t)q.n_blocks, &f2);
    uint8_t *nested = malloc(4 * (size_t)q.n_dq_blocks);
    for (int64_t j = 0; j < q.n_dq_blocks; j++) {
        uint32_t b = qlr_f32_bits(q.dq_absmax[j]);
        for (int k = 0; k < 4; k++) nested[4 * j + k] = (uint8_t)(b >> (8 * k)); /* little-endian */
    }
    long d_nest = compare("nested_absmax", name, json_object_get(c, "nested_absmax"), nested,
                          4 * (size_t)q.n_dq_blocks, &f3);
    free(nested);
    char ours[16];
    snprintf(ours, sizeof ours, "%08x", qlr_f32_bits(q.dq_offset));
    int off_ok = !strcmp(ours, off);
    printf("%-26s n %9lld: offset %s%s, codes %s, absmax codes %s, nested absmax %s", name, (long long)q.n,
           off_ok ? "equal" : "DIFFERS (ours ", off_ok ? "" : ours, d_codes ? "DIFFER" : "equal",
           d_absq ? "DIFFER" : "equal", d_nest ? "DIFFER" : "equal");
    if (fm_codes || fm_absq)
        printf(" (after %d codes and %d absmax codes of bitsandbytes' fast-math reciprocal, each explained)", fm_codes,
               fm_absq);
    printf("\n");
    CHECK_MSG(off_ok, "%s: offset bits %s, bitsandbytes %s", name, ours, off);
    CHECK_MSG(d_codes == 0, "%s: packed codes differ (%ld bytes, first at %ld; -1: only the crc32 is stored)", name,
              d_codes, f1);
    CHECK_MSG(d_absq == 0, "%s: absmax codes differ (%ld, first at block %ld; -1: only the crc32 is stored)", name,
              d_absq, f2);
    CHECK_MSG(d_nest == 0, "%s: nested absmax differs (first at byte %ld; -1: only the crc32 is stored)", name, f3);
    qlr_nf4_free(&q);
}

int main(void) {
    char path[1024];
    snprintf(path, sizeof path, "%s/quant/bnb_nf4_ref.json", QLR_TEST_DATA);
    json_error_t e;
    json_t *root = json_load_file(path, 0, &e);
    CHECK_MSG(root != NULL, "%s: %s", path, e.text);
    if (!root) return test_finish();
    const char *producer = json_string_value(json_object_get(root, "producer"));
    const char *backend = json_string_value(json_object_get(root, "backend"));
    printf("reference: %s\n  producer: %s\n", path, producer ? producer : "(none)");
    if (backend && strcmp(backend, "bnb"))
        printf("  NOTE: not made by bitsandbytes; run tests/tools/make_bnb_nf4_ref.py on a CUDA machine to "
               "check against the real thing\n");
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_is_array(cases) && json_array_size(cases) >= 8);
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) run_case(c);
    json_decref(root);
    return test_finish();
}
