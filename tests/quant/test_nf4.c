/* tests/quant/test_nf4.c: the NF4 store against values derived from the spec (§1) by code
 * written independently of quant/nf4.c: table bits, thresholds and ties, zeros, all-zero and
 * all-negative blocks, partial last block, odd n, NaN, nibble order, double quant (partial
 * 256-block) and the error bounds on Gaussian data. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "quant/nf4.h"
#include "tests/test_util.h"

/* Spec §1.1 hex patterns and §1.3 thresholds, typed in from the spec. */
static const uint32_t spec_hex[16] = {
    0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
    0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000,
};
static const char *const spec_thresh[15] = {
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
};
/* float32 thresholds as bnb's CUDA kernel has them: the decimal rounded directly to float
 * (strtof), which is what a `0.86...f` literal compiles to */
static float T[15];
static float V[16];  /* table values from the hex patterns */

/* reference code: how many thresholds the scaled value is strictly above (NaN: none) */
static int ref_code(float s) {
    int c = 0;
    for (int i = 0; i < 15; i++) c += s > T[i];
    return c;
}

static int get_code(const uint8_t *codes, int64_t i) {
    return i % 2 == 0 ? codes[i / 2] >> 4 : codes[i / 2] & 15;
}

/* reference quantizer: absmax over the block's real elements ignoring NaN, r = 1/absmax */
static void ref_quant(const float *x, int64_t n, uint8_t *code, float *absmax) {
    for (int64_t b = 0; b * 64 < n; b++) {
        int64_t i1 = (b + 1) * 64 < n ? (b + 1) * 64 : n;
        float a = 0;
        for (int64_t i = b * 64; i < i1; i++)
            if (fabsf(x[i]) > a) a = fabsf(x[i]);
        absmax[b] = a;
        float r = 1.0f / a;
        for (int64_t i = b * 64; i < i1; i++) code[i] = (uint8_t)ref_code(x[i] * r);
    }
}

static void test_table(void) {
    for (int i = 0; i < 16; i++) V[i] = qlr_bits_f32(spec_hex[i]);
    for (int i = 0; i < 15; i++) T[i] = strtof(spec_thresh[i], NULL);
    for (int i = 0; i < 16; i++) CHECK_EQ_INT(qlr_f32_bits(qlr_nf4_table[i]), spec_hex[i]);
    CHECK(qlr_nf4_table_ok());
    /* Each decimal threshold is the exact midpoint of its neighbours (half-way between two
     * floats). Spec §1.3 says its float32 rounding is the float32 midpoint; that holds when
     * rounding via double (ties to even), but the direct rounding of the CUDA literal lands one
     * ulp away for thresholds 0, 8, 12, 14 (found while writing this test). */
    for (int i = 0; i < 15; i++) {
        float mid = (V[i] + V[i + 1]) / 2.0f;
        if (i == 0 || i == 8 || i == 12 || i == 14)
            CHECK_MSG(T[i] != mid && fabsf(T[i] - mid) <= fabsf(nextafterf(mid, 2.0f) - mid),
                      "threshold %d: literal %.9g vs midpoint %.9g", i, T[i], mid);
        else
            CHECK_MSG(T[i] == mid, "threshold %d: literal %.9g vs midpoint %.9g", i, T[i], mid);
    }
}

static void test_nearest(void) {
    for (int k = 0; k < 16; k++) CHECK_EQ_INT(qlr_nf4_nearest(V[k]), k);
    for (int k = 0; k < 15; k++) {
        CHECK_EQ_INT(qlr_nf4_nearest(T[k]), k);  /* on the threshold: lower code */
        CHECK_EQ_INT(qlr_nf4_nearest(nextafterf(T[k], 2.0f)), k + 1);
        CHECK_EQ_INT(qlr_nf4_nearest(nextafterf(T[k], -2.0f)), k);
    }
    CHECK_EQ_INT(qlr_nf4_nearest(NAN), 0);
    CHECK_EQ_INT(qlr_nf4_nearest(-NAN), 0);
    CHECK_EQ_INT(qlr_nf4_nearest(0.0f), 7);
    CHECK_EQ_INT(qlr_nf4_nearest(-0.0f), 7);
    CHECK_EQ_INT(qlr_nf4_nearest(-1.0f), 0);
    CHECK_EQ_INT(qlr_nf4_nearest(1.0f), 15);
    CHECK_EQ_INT(qlr_nf4_nearest(-3.0f), 0);
    CHECK_EQ_INT(qlr_nf4_nearest(INFINITY), 15);
    uint64_t rng = 1;
    int bad = 0;
    for (int i = 0; i < 100000; i++) {
        float s = test_rng_uniform(&rng) * 2.2f - 1.1f;
        if (qlr_nf4_nearest(s) != ref_code(s)) bad++;
    }
    CHECK_EQ_INT(bad, 0);
}

/* A 64-element block whose absmax is A and whose scaled values hit each threshold exactly:
 * x is searched near T[k]*A so that fl(x * fl(1/A)) == T[k] (multiply-by-reciprocal rounding). */
static void test_ties_in_block(float A) {
    float x[64], r = 1.0f / A;
    int want[64], nt = 0;
    for (int i = 0; i < 64; i++) {
        x[i] = 0.0f;
        want[i] = 7;
    }
    x[0] = A;
    want[0] = 15;
    x[1] = -A;
    want[1] = 0;
    int pos = 2;
    for (int k = 0; k < 15; k++) {
        float c = T[k] * A, hit = NAN;
        for (int d = -8; d <= 8 && hit != hit; d++) {
            float y = c;
            for (int s = 0; s < abs(d); s++) y = nextafterf(y, d > 0 ? INFINITY : -INFINITY);
            if (y * r == T[k]) hit = y;
        }
        if (hit != hit) continue;
        nt++;
        x[pos] = hit;
        want[pos++] = k; /* on the threshold: lower code */
        float up = nextafterf(hit, INFINITY);
        while (!(up * r > T[k])) up = nextafterf(up, INFINITY);
        x[pos] = up;
        want[pos++] = k + 1;
        float dn = nextafterf(hit, -INFINITY);
        x[pos] = dn;
        want[pos++] = dn * r <= T[k] ? k : -1;
    }
    /* with a power-of-two absmax the reciprocal is exact and every threshold is reachable; for
     * others some thresholds have no x with fl(x * r) exactly on them (measured: 11 of 15) */
    int need = frexpf(A, &(int){0}) == 0.5f ? 15 : 10;
    CHECK_MSG(nt >= need, "absmax %g: only %d of 15 thresholds reachable exactly", A, nt);
    qlr_nf4 q;
    CHECK_OK(qlr_nf4_quantize(x, 1, 64, 0, &q));
    CHECK(q.absmax[0] == A);
    for (int i = 0; i < 64; i++)
        if (want[i] >= 0)
            CHECK_MSG(get_code(q.codes, i) == want[i], "absmax %g elem %d (x=%.9g): code %d, want %d",
                      A, i, x[i], get_code(q.codes, i), want[i]);
    qlr_nf4_free(&q);
}

static void test_blocks(void) {
    qlr_nf4 q;
    /* nibble order + hand-picked codes: element 2k high nibble */
    float x[64];
    for (int i = 0; i < 64; i++) x[i] = 0.0f;
    x[0] = -2.0f; x[1] = 2.0f;     /* codes 0, 15 -> byte 0x0F */
    x[2] = 2.0f * V[9]; x[3] = 2.0f * V[3]; /* codes 9, 3 -> 0x93 */
    x[4] = 0.0f; x[5] = -0.0f;     /* zeros in a non-zero block -> code 7 -> 0x77 */
    x[6] = NAN; x[7] = 2.0f * V[14]; /* NaN -> 0 -> 0x0E */
    CHECK_OK(qlr_nf4_quantize(x, 8, 8, 0, &q));
    CHECK(q.absmax[0] == 2.0f);
    CHECK_EQ_INT(q.codes[0], 0x0F);
    CHECK_EQ_INT(q.codes[1], 0x93);
    CHECK_EQ_INT(q.codes[2], 0x77);
    CHECK_EQ_INT(q.codes[3], 0x0E);
    float y[64];
    qlr_nf4_dequant(&q, y);
    CHECK(y[0] == -2.0f && y[1] == 2.0f && y[2] == 2.0f * V[9] && y[4] == 0.0f && y[6] == -2.0f);
    qlr_nf4_free(&q);

    /* an all-zero block between non-zero ones: absmax 0, codes 0 (bnb CUDA: 0*inf = NaN -> 0),
     * dequantizes to exactly 0 */
    float z[192];
    for (int i = 0; i < 192; i++) z[i] = (i >= 64 && i < 128) ? 0.0f : (float)(i % 7) - 3.0f;
    CHECK_OK(qlr_nf4_quantize(z, 3, 64, 0, &q));
    CHECK(q.absmax[1] == 0.0f);
    int zc = 0;
    for (int i = 64; i < 128; i++) zc += get_code(q.codes, i) == 0;
    CHECK_EQ_INT(zc, 64);
    float zy[192];
    qlr_nf4_dequant(&q, zy);
    int zz = 0;
    for (int i = 64; i < 128; i++) zz += zy[i] == 0.0f;
    CHECK_EQ_INT(zz, 64);
    qlr_nf4_free(&q);

    /* all-negative block: absmax positive, the most negative value gets code 0 */
    float neg[64];
    for (int i = 0; i < 64; i++) neg[i] = -(float)(i + 1) / 64.0f;
    CHECK_OK(qlr_nf4_quantize(neg, 1, 64, 0, &q));
    CHECK(q.absmax[0] == 1.0f);
    CHECK_EQ_INT(get_code(q.codes, 63), 0);
    int nonpos = 1;
    for (int i = 0; i < 64; i++) {
        nonpos &= get_code(q.codes, i) <= 7;
        CHECK_EQ_INT(get_code(q.codes, i), ref_code(neg[i]));
    }
    CHECK(nonpos);
    qlr_nf4_free(&q);

    test_ties_in_block(1.0f);
    test_ties_in_block(2.0f);
    test_ties_in_block(3.0f);
    test_ties_in_block(0.0173f);
    test_ties_in_block(-0.75f * -1.0f);
}

/* partial last block, odd n, invalid shapes, qlr_nf4_bytes */
static void test_shapes(void) {
    qlr_nf4 q;
    /* n = 100: blocks of 64 and 36; the second block's absmax is over its 36 real elements */
    float x[100];
    for (int i = 0; i < 100; i++) x[i] = i < 64 ? 100.0f : (float)(i - 64) * 0.125f - 1.0f;
    CHECK_OK(qlr_nf4_quantize(x, 4, 25, 0, &q));
    CHECK_EQ_INT(q.n_blocks, 2);
    CHECK(q.absmax[0] == 100.0f);
    CHECK(q.absmax[1] == 3.375f); /* (99-64)*0.125-1 */
    for (int i = 64; i < 100; i++) CHECK_EQ_INT(get_code(q.codes, i), ref_code(x[i] * (1.0f / 3.375f)));
    qlr_nf4_free(&q);

    /* odd n = 21: 11 bytes; the last low nibble is the code of bnb's CUDA padding zero, 0 * r:
     * code 7 (the spec's "padding 0" is the pure-PyTorch backend's) */
    float o[21];
    for (int i = 0; i < 21; i++) o[i] = 0.5f; /* all code 15 */
    CHECK_OK(qlr_nf4_quantize(o, 3, 7, 0, &q));
    CHECK_EQ_INT(q.codes[9], 0xFF);
    CHECK_EQ_INT(q.codes[10], 0xF7);
    float y[22];
    y[21] = 12345.0f;
    qlr_nf4_dequant(&q, y);
    CHECK(y[20] == 0.5f && y[21] == 12345.0f); /* exactly n written */
    /* rows starting at an odd element */
    float r[7];
    qlr_nf4_dequant_rows(&q, 1, 1, r);
    CHECK(r[0] == 0.5f && r[6] == 0.5f);
    qlr_nf4_free(&q);

    CHECK(qlr_nf4_quantize(x, 0, 5, 0, &q) == QLR_ERR_INVALID);
    CHECK(qlr_nf4_quantize(x, 5, -1, 1, &q) == QLR_ERR_INVALID);
    CHECK(qlr_nf4_quantize(x, INT64_MAX / 2, 4, 1, &q) == QLR_ERR_INVALID);
    /* [3, 7] -> 11 code bytes + 1 block * 4 bytes; with dq: 11 + 1 + 4 */
    CHECK_EQ_INT(qlr_nf4_bytes(3, 7, 0), 15);
    CHECK_EQ_INT(qlr_nf4_bytes(3, 7, 1), 16);
    /* [640, 64]: 20480 + 640 blocks -> 640 u8 + 3 dq blocks * 4 */
    CHECK_EQ_INT(qlr_nf4_bytes(640, 64, 1), 20480 + 640 + 12);
    CHECK_EQ_INT(qlr_nf4_bytes(640, 64, 0), 20480 + 2560);
}

/* brute-force nearest over the signed dynamic map, ties to the lower index */
static int ref_dyn(float v) {
    int best = 0;
    double bd = INFINITY;
    for (int j = 0; j < 256; j++) {
        double d = fabs((double)qlr_dynmap_signed[j] - v);
        if (d < bd) {
            bd = d;
            best = j;
        }
    }
    return best;
}

/* Random data against the reference quantizer, single and double quant, threaded paths. */
static void test_random(void) {
    const int64_t rows = 701, cols = 64 + 1; /* n = 45565: 712 blocks (last partial), 3 dq blocks */
    const int64_t n = rows * cols;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float)), *y2 = malloc(n * sizeof(float));
    uint8_t *code = malloc(n);
    float *amax = malloc(((n + 63) / 64) * sizeof(float));
    uint64_t rng = 42;
    for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * 0.02f;
    for (int64_t i = 0; i < n; i += 97) x[i] = 0.0f;
    for (int64_t i = 64 * 10; i < 64 * 11; i++) x[i] = -fabsf(x[i]); /* an all-negative block */
    for (int64_t i = 64 * 20; i < 64 * 21; i++) x[i] = 0.0f;          /* an all-zero block */
    ref_quant(x, n, code, amax);

    qlr_nf4 q;
    CHECK_OK(qlr_nf4_quantize(x, rows, cols, 0, &q));
    CHECK_EQ_INT(q.n_blocks, 712);
    int bad_c = 0, bad_a = 0, bad_y = 0;
    for (int64_t i = 0; i < n; i++) bad_c += get_code(q.codes, i) != code[i];
    for (int64_t b = 0; b < q.n_blocks; b++) bad_a += q.absmax[b] != amax[b];
    CHECK_EQ_INT(bad_c, 0);
    CHECK_EQ_INT(bad_a, 0);
    CHECK_EQ_INT(q.codes[(n - 1) / 2] & 15, 7); /* odd n: the padding zero's code */
    qlr_nf4_dequant(&q, y);
    for (int64_t i = 0; i < n; i++) bad_y += y[i] != V[code[i]] * amax[i / 64];
    CHECK_EQ_INT(bad_y, 0);
    qlr_nf4_free(&q);

    /* double quant: offset = mean, 3 blocks of 256 (last has 200), codes by brute force */
    CHECK_OK(qlr_nf4_quantize(x, rows, cols, 1, &q));
    CHECK(q.dq == 1 && q.absmax == NULL && q.n_dq_blocks == 3);
    double s = 0;
    for (int64_t b = 0; b < 712; b++) s += amax[b];
    CHECK_NEAR(q.dq_offset, s / 712, 0, 1e-6);
    int bad_q = 0, bad_n = 0;
    double worst = 0;
    for (int64_t j = 0; j < 3; j++) {
        float na = 0;
        for (int64_t b = j * 256; b < (j + 1) * 256 && b < 712; b++)
            na = fmaxf(na, fabsf(amax[b] - q.dq_offset));
        bad_n += q.dq_absmax[j] != na;
        float r = 1.0f / na;
        for (int64_t b = j * 256; b < (j + 1) * 256 && b < 712; b++) {
            bad_q += q.absmax_q[b] != ref_dyn((amax[b] - q.dq_offset) * r);
            /* reconstruction bound: half the widest map gap (0.00703) of the nested absmax */
            double e = fabs((double)qlr_nf4_block_absmax(&q, b) - amax[b]) / na;
            if (e > worst) worst = e;
        }
    }
    CHECK_EQ_INT(bad_n, 0);
    CHECK_EQ_INT(bad_q, 0);
    CHECK_MSG(worst <= 0.00704, "double-quant absmax error %g of nested absmax > 0.00704", worst);
    /* and in absolute terms for these weights (absmax ~0.05): under 1% of the mean absmax */
    double worst_rel = 0;
    for (int64_t b = 0; b < 712; b++) {
        double e = fabs((double)qlr_nf4_block_absmax(&q, b) - amax[b]) / q.dq_offset;
        if (e > worst_rel) worst_rel = e;
    }
    CHECK_MSG(worst_rel < 0.01, "double-quant absmax error %g of the mean absmax", worst_rel);
    qlr_nf4_dequant(&q, y);
    bad_y = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t b = i / 64;
        float a = qlr_dynmap_signed[q.absmax_q[b]] * q.dq_absmax[b / 256] + q.dq_offset;
        bad_y += y[i] != V[code[i]] * a;
    }
    CHECK_EQ_INT(bad_y, 0);
    /* row-wise dequant (serial, arbitrary row range) equals the threaded whole */
    qlr_nf4_dequant_rows(&q, 0, 300, y2);
    qlr_nf4_dequant_rows(&q, 300, rows - 300, y2 + 300 * cols);
    CHECK(memcmp(y, y2, n * sizeof(float)) == 0);
    qlr_nf4_free(&q);
    qlr_nf4_free(&q); /* safe twice */
    free(x); free(y); free(y2); free(code); free(amax);
}

/* Gaussian data: NF4 relative RMS error ~0.1 (measured 0.0919 single, 0.0920 with dq on 4M
 * N(0, 0.02^2) values). Bounds: [0.085, 0.10]; a wrong table/threshold/scale moves it well out. */
static void test_gaussian_error(void) {
    const int64_t rows = 2048, cols = 2048, n = rows * cols;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    uint64_t rng = 2024;
    for (int64_t i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * 0.02f;
    for (int dq = 0; dq < 2; dq++) {
        qlr_nf4 q;
        CHECK_OK(qlr_nf4_quantize(x, rows, cols, dq, &q));
        qlr_nf4_dequant(&q, y);
        double se = 0, sx = 0, mx = 0;
        for (int64_t i = 0; i < n; i++) {
            double e = (double)y[i] - x[i];
            se += e * e;
            sx += (double)x[i] * x[i];
            mx = fabs(e) > mx ? fabs(e) : mx;
        }
        double rel = sqrt(se / sx);
        printf("NF4 gaussian dq=%d: relative RMS error %.4f, max abs error %.5f\n", dq, rel, mx);
        CHECK_MSG(rel > 0.085 && rel < 0.10, "dq=%d relative RMS error %.4f outside [0.085, 0.10]", dq, rel);
        qlr_nf4_err st;
        CHECK_OK(qlr_nf4_error_stats(&q, x, &st));
        CHECK_NEAR(st.rel_rms_err, rel, 0, 1e-6);
        CHECK_NEAR(st.rms_err, sqrt(se / n), 0, 1e-6);
        CHECK_NEAR(st.rms_ref, 0.02, 0, 0.01);
        CHECK(st.max_abs_err == mx);
        CHECK(st.max_rel_err >= 0.5 && st.max_rel_err <= 1.05);
        CHECK_EQ_INT(st.n_nonfinite, 0);
        qlr_nf4_free(&q);
    }
    free(x);
    free(y);
}

static int stores_equal(const qlr_nf4 *a, const qlr_nf4 *b) {
    if (a->rows != b->rows || a->cols != b->cols || a->dq != b->dq) return 0;
    if (memcmp(a->codes, b->codes, (size_t)(a->n + 1) / 2)) return 0;
    if (a->dq)
        return !memcmp(a->absmax_q, b->absmax_q, (size_t)a->n_blocks) &&
               !memcmp(a->dq_absmax, b->dq_absmax, (size_t)a->n_dq_blocks * 4) && a->dq_offset == b->dq_offset;
    return !memcmp(a->absmax, b->absmax, (size_t)a->n_blocks * 4);
}

/* Rebuilding a store from its dequantized weights and its scale state (export-base's round trip):
 * byte for byte from f32, bf16 and f16 copies; weights that did not come from that state are
 * told apart by the deviation; the hash follows every byte. */
static void test_from_state(void) {
    const int64_t rows = 96, cols = 200; /* 19200 = 300 blocks, 2 double-quant blocks */
    float *x = malloc(rows * cols * 4), *y = malloc(rows * cols * 4), *z = malloc(rows * cols * 4);
    uint64_t rng = 77;
    for (int64_t i = 0; i < rows * cols; i++) x[i] = test_rng_normal(&rng) * 0.02f;
    for (int dq = 0; dq < 2; dq++) {
        qlr_nf4 q, r;
        CHECK_OK(qlr_nf4_quantize(x, rows, cols, dq, &q));
        qlr_nf4_dequant(&q, y);
        qlr_nf4_state s = {dq, q.absmax, q.absmax_q, q.dq_absmax, q.dq_offset};
        float dev = -1;
        CHECK_OK(qlr_nf4_from_state(y, rows, cols, &s, &r, &dev));
        CHECK_MSG(stores_equal(&q, &r) && dev == 0.0f, "dq %d: f32 round trip not exact (deviation %g)", dq, dev);
        CHECK(qlr_nf4_hash(&q) == qlr_nf4_hash(&r));
        qlr_nf4_free(&r);
        for (int k = 0; k < 2; k++) { /* bf16 and f16 copies of the weights */
            for (int64_t i = 0; i < rows * cols; i++)
                z[i] = k ? qlr_f16_to_f32(qlr_f32_to_f16(y[i])) : qlr_bf16_to_f32(qlr_f32_to_bf16(y[i]));
            CHECK_OK(qlr_nf4_from_state(z, rows, cols, &s, &r, &dev));
            CHECK_MSG(stores_equal(&q, &r) && dev > 0.0f && dev < 0.005f, "dq %d %s copy: deviation %g", dq,
                      k ? "f16" : "bf16", dev);
            qlr_nf4_free(&r);
        }
        /* the original weights are not the dequantized ones: far off the grid */
        CHECK_OK(qlr_nf4_from_state(x, rows, cols, &s, &r, &dev));
        CHECK_MSG(dev > 0.03f, "dq %d: unrelated weights deviate only %g", dq, dev);
        qlr_nf4_free(&r);
        uint64_t h = qlr_nf4_hash(&q);
        q.codes[100] ^= 0x10;
        CHECK(qlr_nf4_hash(&q) != h);
        q.codes[100] ^= 0x10;
        if (dq) {
            q.dq_offset = nextafterf(q.dq_offset, 1.0f);
            CHECK(qlr_nf4_hash(&q) != h);
        }
        qlr_nf4_free(&q);
    }
    free(x);
    free(y);
    free(z);
}

int main(void) {
    test_from_state();
    test_table();
    test_nearest();
    test_blocks();
    test_shapes();
    test_random();
    test_gaussian_error();
    return test_finish();
}
