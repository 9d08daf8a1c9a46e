/* tests/quant/test_ggml_quants.c: ggml block dequantizers on blocks written byte by byte from
 * spec §3.6 with hand-computed expected values, quantize->dequantize bounds for Q8_0/Q4_0/Q4_1,
 * input validation, and (when the PyPI gguf package is importable) a cross-check against
 * gguf.quants on random blocks written by tests/quant/gguf_ref.py. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "core/core.h"
#include "quant/ggml_quants.h"
#include "tests/test_util.h"

static void test_types(void) {
    CHECK(!strcmp(qlr_ggml_type_name(QLR_GGML_Q4_K), "Q4_K"));
    CHECK(!strcmp(qlr_ggml_type_name(13), "Q5_K"));
    CHECK(!strcmp(qlr_ggml_type_name(30), "BF16"));
    CHECK(!strcmp(qlr_ggml_type_name(4), "unknown"));
    CHECK(!strcmp(qlr_ggml_type_name(1000), "unknown"));
    CHECK(qlr_ggml_type_supported(QLR_GGML_Q6_K) && !qlr_ggml_type_supported(13));
    CHECK(qlr_ggml_type_check(13) == QLR_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(qlr_error_msg(), "Q5_K") != NULL, "message does not name the type: %s", qlr_error_msg());
    CHECK(qlr_ggml_type_check(QLR_GGML_Q8_0) == QLR_OK);
    size_t rb = 0;
    CHECK_OK(qlr_ggml_row_bytes(QLR_GGML_Q4_K, 512, &rb));
    CHECK_EQ_INT(rb, 288);
    CHECK_OK(qlr_ggml_row_bytes(QLR_GGML_Q6_K, 256, &rb));
    CHECK_EQ_INT(rb, 210);
    CHECK_OK(qlr_ggml_row_bytes(QLR_GGML_Q4_1, 64, &rb));
    CHECK_EQ_INT(rb, 40);
    CHECK_OK(qlr_ggml_row_bytes(QLR_GGML_BF16, 3, &rb));
    CHECK_EQ_INT(rb, 6);
    CHECK(qlr_ggml_row_bytes(QLR_GGML_Q4_K, 100, &rb) == QLR_ERR_INVALID);
    CHECK(qlr_ggml_row_bytes(QLR_GGML_Q8_0, -32, &rb) == QLR_ERR_INVALID);
    float out[256];
    uint8_t blk[256] = {0};
    CHECK(qlr_ggml_dequant_row(QLR_GGML_Q4_0, blk, 33, out) == QLR_ERR_INVALID);
    CHECK(qlr_ggml_dequant_row(13, blk, 256, out) == QLR_ERR_UNSUPPORTED);
    /* a tensor larger than the bytes present is a format error, not an overread */
    CHECK(qlr_ggml_dequant(QLR_GGML_Q8_0, blk, 67, 32, 2, out) == QLR_ERR_FORMAT);
    CHECK(qlr_ggml_dequant(QLR_GGML_Q8_0, blk, 68, 32, -1, out) == QLR_ERR_INVALID);
    CHECK_OK(qlr_ggml_dequant(QLR_GGML_Q8_0, blk, 68, 32, 2, out));
    CHECK(qlr_ggml_quantize_row(QLR_GGML_Q2_K, out, 256, blk) == QLR_ERR_UNSUPPORTED);
}

static void test_plain(void) {
    /* F16: 1.0, -2.0, 65504, smallest subnormal 2^-24; BF16: 1.0, -5.0 */
    const uint8_t f16[8] = {0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B, 0x01, 0x00};
    float y[4];
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_F16, f16, 4, y));
    CHECK(y[0] == 1.0f && y[1] == -2.0f && y[2] == 65504.0f && y[3] == ldexpf(1.0f, -24));
    const uint8_t bf16[4] = {0x80, 0x3F, 0xA0, 0xC0};
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_BF16, bf16, 2, y));
    CHECK(y[0] == 1.0f && y[1] == -5.0f);
    const float f32[2] = {3.25f, -0.0f};
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_F32, f32, 2, y));
    CHECK(y[0] == 3.25f && y[1] == 0.0f && signbit(y[1]));
}

static void test_q8_q4(void) {
    float y[32];
    /* Q8_0: d = 0.5 (fp16 0x3800), qs[j] = j - 16 */
    uint8_t q8[34] = {0x00, 0x38};
    for (int j = 0; j < 32; j++) q8[2 + j] = (uint8_t)(int8_t)(j - 16);
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_Q8_0, q8, 32, y));
    int bad = 0;
    for (int j = 0; j < 32; j++) bad += y[j] != (float)(j - 16) * 0.5f;
    CHECK_EQ_INT(bad, 0);
    /* Q4_0: d = 2 (0x4000); qs[j] = j | (15-j)<<4: y[j] = (j-8)*2, y[j+16] = (7-j)*2 */
    uint8_t q40[18] = {0x00, 0x40};
    for (int j = 0; j < 16; j++) q40[2 + j] = (uint8_t)(j | (15 - j) << 4);
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_Q4_0, q40, 32, y));
    bad = 0;
    for (int j = 0; j < 16; j++) bad += y[j] != (float)((j - 8) * 2) || y[j + 16] != (float)((7 - j) * 2);
    CHECK_EQ_INT(bad, 0);
    CHECK(y[0] == -16.0f && y[16] == 14.0f); /* low nibble first, high nibble at j+16 */
    /* Q4_1: d = 0.25 (0x3400), m = -1 (0xBC00); qs[j] = (j%16) | 3<<4 */
    uint8_t q41[20] = {0x00, 0x34, 0x00, 0xBC};
    for (int j = 0; j < 16; j++) q41[4 + j] = (uint8_t)(j | 3 << 4);
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_Q4_1, q41, 32, y));
    bad = 0;
    for (int j = 0; j < 16; j++) bad += y[j] != j * 0.25f - 1.0f || y[j + 16] != -0.25f;
    CHECK_EQ_INT(bad, 0);
}

static void test_q4_k(void) {
    /* d = 0.5 (0x3800), dmin = 0.25 (0x3400);
     * scales sc = {1,2,3,63, 40,17,5,33}, mins mn = {0,1,10,63, 50,2,31,7}, packed by hand:
     *   S[0..3] = sc0..3 | (sc4..7 >> 4) << 6 = 0x81 0x42 0x03 0xBF
     *   S[4..7] = mn0..3 | (mn4..7 >> 4) << 6 = 0xC0 0x01 0x4A 0x3F
     *   S[8..11] = (sc4..7 & 15) | (mn4..7 & 15) << 4 = 0x28 0x21 0xF5 0x71
     * qs[32c + l] = (l & 15) | ((l + c) & 15) << 4 */
    static const int sc[8] = {1, 2, 3, 63, 40, 17, 5, 33}, mn[8] = {0, 1, 10, 63, 50, 2, 31, 7};
    uint8_t b[144] = {0x00, 0x38, 0x00, 0x34, 0x81, 0x42, 0x03, 0xBF, 0xC0, 0x01,
                      0x4A, 0x3F, 0x28, 0x21, 0xF5, 0x71};
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) b[16 + 32 * c + l] = (uint8_t)((l & 15) | ((l + c) & 15) << 4);
    float y[256];
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_Q4_K, b, 256, y));
    int bad = 0;
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            double lo = 0.5 * sc[2 * c] * (l & 15) - 0.25 * mn[2 * c];
            double hi = 0.5 * sc[2 * c + 1] * ((l + c) & 15) - 0.25 * mn[2 * c + 1];
            if (y[64 * c + l] != lo || y[64 * c + 32 + l] != hi) {
                if (bad++ < 4)
                    fprintf(stderr, "Q4_K c=%d l=%d: %g %g want %g %g\n", c, l, y[64 * c + l],
                            y[64 * c + 32 + l], lo, hi);
            }
        }
    CHECK_EQ_INT(bad, 0);
    /* spot values: sub-block 7 (j >= 4 packing): l = 5, c = 3 -> q = 8: 0.5*33*8 - 0.25*7 */
    CHECK(y[64 * 3 + 32 + 5] == 132.0f - 1.75f);
    /* chunk c = 2, low nibbles: sub-block j = 4 (sc 40, mn 50), l = 3 -> q = 3 */
    CHECK(y[64 * 2 + 3] == 0.5f * 40 * 3 - 0.25f * 50);
}

static void test_q6_k(void) {
    /* all zero except: ql[0]=0x5A, qh[0]=0xE4, ql[81]=0x3C, qh[49]=0x1B, scales (int8)
     * S[0]=3, S[2]=-2, S[4]=-128, S[6]=127, S[9]=-5, S[11]=7, S[13]=-1, S[15]=2; d = 0.125
     * (fp16 0x3000) at bytes 208-209 */
    uint8_t b[210] = {0};
    b[0] = 0x5A;
    b[128 + 0] = 0xE4;
    b[81] = 0x3C;
    b[128 + 49] = 0x1B;
    int8_t S[16] = {3, 0, -2, 0, -128, 0, 127, 0, 0, -5, 0, 7, 0, -1, 0, 2};
    memcpy(b + 192, S, 16);
    b[208] = 0x00;
    b[209] = 0x30;
    float y[256];
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_Q6_K, b, 256, y));
    /* h=0, l=0: q = 0xA | (0xE4 & 3) << 4 = 10 -> -22, * 3 * 0.125 */
    CHECK(y[0] == -8.25f);
    /* y[32]: ql[32] = 0, (0xE4 >> 2) & 3 = 1 -> 16 - 32 = -16, * -2 * 0.125 */
    CHECK(y[32] == 4.0f);
    /* y[64]: 0x5A >> 4 = 5, (0xE4 >> 4) & 3 = 2 -> 37 - 32 = 5, * -128 * 0.125 */
    CHECK(y[64] == -80.0f);
    /* y[96]: 0, (0xE4 >> 6) & 3 = 3 -> 48 - 32 = 16, * 127 * 0.125 */
    CHECK(y[96] == 254.0f);
    /* y[1]: q = 0 -> -32, * 3 * 0.125; y[33]: -32 * -2 * 0.125; y[16]: scale S[1] = 0 */
    CHECK(y[1] == -12.0f && y[33] == 8.0f && y[16] == 0.0f);
    /* h=1, l=17 (scale index 1): ql[64+17] = 0x3C, qh[32+17] = 0x1B */
    CHECK(y[128 + 17] == -17.5f);  /* 0xC | 3<<4 = 60 -> 28, * S[9] = -5 */
    CHECK(y[128 + 49] == 0.0f);    /* 0 | 2<<4 = 32 -> 0 */
    CHECK(y[128 + 81] == 1.625f);  /* 3 | 1<<4 = 19 -> -13, * S[13] = -1 */
    CHECK(y[128 + 113] == -8.0f);  /* 0 | 0 -> -32, * S[15] = 2 */
    CHECK(y[128 + 15] == 0.0f);    /* l = 15: scale index 0, S[8] = 0 */
    CHECK(y[128 + 16] == 20.0f);   /* l = 16: scale index 1, -32 * S[9] = -5 * 0.125 */
    CHECK(y[128 + 48] == -32.0f * 7 * 0.125f); /* l=16: S[8+1+2] = 7 */
}

static void test_roundtrip(void) {
    const int n = 32 * 64;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    uint8_t *q = malloc(n * 2);
    uint64_t rng = 5;
    for (int i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * 0.03f;
    for (int i = 0; i < 32; i++) x[i] = 0.0f;           /* an all-zero block */
    for (int i = 32; i < 64; i++) x[i] = fabsf(x[i]);   /* all positive */
    x[100] = 2.0f;                                       /* an outlier */
    const uint32_t types[4] = {QLR_GGML_Q8_0, QLR_GGML_Q4_0, QLR_GGML_Q4_1, QLR_GGML_Q5_0};
    for (int t = 0; t < 4; t++) {
        CHECK_OK(qlr_ggml_quantize_row(types[t], x, n, q));
        size_t rb;
        CHECK_OK(qlr_ggml_row_bytes(types[t], n, &rb));
        CHECK_OK(qlr_ggml_dequant(types[t], q, rb, n, 1, y));
        int bad = 0;
        for (int b = 0; b < n / 32; b++) {
            float amax = 0, mn = INFINITY, mx = -INFINITY;
            for (int j = 0; j < 32; j++) {
                float v = x[32 * b + j];
                amax = fmaxf(amax, fabsf(v));
                mn = fminf(mn, v);
                mx = fmaxf(mx, v);
            }
            /* bounds: half a step, plus the fp16 rounding of the scale (2^-11 relative) times
             * the largest code, plus (Q4_1) the fp16 rounding of the min; Q4_0 can clip the
             * side opposite to the max by one full step (q = 16 -> 15) */
            double bound;
            if (types[t] == QLR_GGML_Q8_0) bound = amax / 127.0 * (0.5 + 127.0 / 2048) + 1e-9;
            else if (types[t] == QLR_GGML_Q4_0) bound = amax / 8.0 * (1.0 + 8.0 / 2048) + 1e-9;
            else if (types[t] == QLR_GGML_Q5_0) bound = amax / 16.0 * (1.0 + 16.0 / 2048) + 1e-9;
            else bound = (mx - mn) / 15.0 * (0.5 + 15.0 / 2048) + fabs(mn) / 2048 + 1e-9;
            for (int j = 0; j < 32; j++)
                if (fabs(y[32 * b + j] - x[32 * b + j]) > bound) bad++;
        }
        CHECK_MSG(bad == 0, "%s: %d values outside the error bound", qlr_ggml_type_name(types[t]), bad);
        int zero = 1;
        for (int j = 0; j < 32; j++) zero &= y[j] == 0.0f;
        CHECK_MSG(zero, "%s: an all-zero block does not decode to 0", qlr_ggml_type_name(types[t]));
    }
    /* F16/BF16 writers: exact for values representable in both */
    float v[4] = {1.0f, -2.5f, 0.15625f, 0.0f}, w[4];
    uint8_t h[8];
    CHECK_OK(qlr_ggml_quantize_row(QLR_GGML_F16, v, 4, h));
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_F16, h, 4, w));
    CHECK(memcmp(v, w, sizeof v) == 0);
    CHECK_OK(qlr_ggml_quantize_row(QLR_GGML_BF16, v, 4, h));
    CHECK_OK(qlr_ggml_dequant_row(QLR_GGML_BF16, h, 4, w));
    CHECK(memcmp(v, w, sizeof v) == 0);
    free(x);
    free(y);
    free(q);
}

/* Our Q6_K / Q4_K quantizers (gguf-py has no reference for them), decoded by our dequantizer
 * (test_gguf_py proves it equal to gguf-py's on arbitrary blocks). Checked: (1) every value
 * decodes to the point nearest to it of its sub-block's grid as the bytes define it (Q6_K:
 * d*sc[j]*(q-32), q in 0..63; Q4_K: d*sc[j]*q - dmin*mn[j], q in 0..15), so no value is rounded
 * the wrong way or clipped needlessly; (2) an all-zero block decodes to 0 and a constant
 * sub-block to within 2% (Q6_K) / half a 4-bit step (Q4_K); (3) the relative RMS error on
 * Gaussian data is below figures written from the step sizes: Q6_K ~ 4.2 sigma / 63 / sqrt(12)
 * = 1.9%, about 3.4x Q8_0's step over a 16-value instead of a 32-value range; Q4_K ~ 4.1 sigma /
 * 15 / sqrt(12) = 7.9%, and not worse than Q4_1 (same bits, 32-value blocks). */
static void kq_grid(uint32_t type, const uint8_t *blk, int sub, float *e, float *o, int *qmin, int *qmax) {
    if (type == QLR_GGML_Q6_K) {
        float d = qlr_f16_to_f32((uint16_t)(blk[208] | blk[209] << 8));
        *e = d * (float)(int8_t)blk[192 + sub];
        *o = 0.0f;
        *qmin = -32, *qmax = 31;
    } else {
        float d = qlr_f16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
        float dmin = qlr_f16_to_f32((uint16_t)(blk[2] | blk[3] << 8));
        const uint8_t *S = blk + 4;
        int sc, mn;
        if (sub < 4) sc = S[sub] & 63, mn = S[sub + 4] & 63;
        else sc = (S[sub + 4] & 0x0F) | ((S[sub - 4] >> 6) << 4), mn = (S[sub + 4] >> 4) | ((S[sub] >> 6) << 4);
        *e = d * (float)sc;
        *o = dmin * (float)mn;
        *qmin = 0, *qmax = 15;
    }
}

static double rel_rms(const float *x, const float *y, int n) {
    double e = 0, r = 0;
    for (int i = 0; i < n; i++) {
        e += ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
        r += (double)x[i] * x[i];
    }
    return r > 0 ? sqrt(e / r) : 0;
}

static void test_kquants(void) {
    const int n = 256 * 64;
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float)), *z = malloc(n * sizeof(float));
    uint8_t *q = malloc(n * 2);
    uint64_t rng = 11;
    for (int i = 0; i < n; i++) x[i] = test_rng_normal(&rng) * 0.02f;
    for (int i = 0; i < 256; i++) x[i] = 0.0f;                 /* an all-zero super-block */
    for (int i = 256; i < 512; i++) x[i] = fabsf(x[i]);        /* all positive */
    for (int i = 512; i < 768; i++) x[i] = -fabsf(x[i]);       /* all negative */
    for (int i = 768; i < 800; i++) x[i] = 0.013f;             /* a constant sub-block */
    x[1100] = 0.5f;                                             /* an outlier (25 sigma) */
    for (int i = 1280; i < 1536; i++) x[i] *= (i / 32) % 2 ? 100.0f : 0.01f; /* mixed magnitudes */
    const uint32_t types[2] = {QLR_GGML_Q6_K, QLR_GGML_Q4_K};
    const int sub_n[2] = {16, 32};
    for (int t = 0; t < 2; t++) {
        const char *tn = qlr_ggml_type_name(types[t]);
        size_t rb;
        CHECK_OK(qlr_ggml_row_bytes(types[t], n, &rb));
        CHECK_OK(qlr_ggml_quantize(types[t], x, 256, n / 256, q, rb));
        CHECK_OK(qlr_ggml_dequant(types[t], q, rb, n, 1, y));
        int bad = 0;
        size_t bb = qlr_ggml_block_bytes(types[t]);
        for (int b = 0; b < n / 256; b++)
            for (int j = 0; j < 256 / sub_n[t]; j++) {
                float e, o;
                int qmin, qmax;
                kq_grid(types[t], q + (size_t)b * bb, j, &e, &o, &qmin, &qmax);
                for (int i = 0; i < sub_n[t]; i++) {
                    int k = 256 * b + sub_n[t] * j + i;
                    double best = INFINITY; /* distance to the nearest grid point */
                    for (int c = qmin; c <= qmax; c++) best = fmin(best, fabs((double)e * c - o - x[k]));
                    /* 1e-6 relative: the decoder's float products against this double search */
                    if (fabs((double)y[k] - x[k]) > best + 1e-6 * (fabs(x[k]) + fabs(e) * 32 + o) + 1e-12 &&
                        bad++ < 3)
                        fprintf(stderr, "%s elem %d: %g decoded as %g, the nearest grid point is %g away\n", tn, k,
                                x[k], y[k], best);
                }
            }
        CHECK_MSG(bad == 0, "%s: %d values not decoded to their nearest grid point", tn, bad);
        int zero = 1;
        for (int i = 0; i < 256; i++) zero &= y[i] == 0.0f;
        CHECK_MSG(zero, "%s: an all-zero block does not decode to 0", tn);
        float e0, o0;
        int a0, b0;
        kq_grid(types[t], q + 3 * bb, 0, &e0, &o0, &a0, &b0);
        double ctol = types[t] == QLR_GGML_Q6_K ? 0.013 * 0.02 : 0.5 * e0 + 1e-9;
        for (int i = 768; i < 800; i++) CHECK_MSG(fabs(y[i] - 0.013) <= ctol, "%s: constant 0.013 -> %g", tn, y[i]);
        /* quality on the Gaussian part (super-blocks 8..63) */
        int g0 = 256 * 8, gn = n - g0;
        double err = rel_rms(x + g0, y + g0, gn);
        uint32_t ref = types[t] == QLR_GGML_Q6_K ? QLR_GGML_Q8_0 : QLR_GGML_Q4_1;
        CHECK_OK(qlr_ggml_row_bytes(ref, gn, &rb));
        CHECK_OK(qlr_ggml_quantize_row(ref, x + g0, gn, q));
        CHECK_OK(qlr_ggml_dequant(ref, q, rb, gn, 1, z));
        double er = rel_rms(x + g0, z, gn);
        printf("%s relative RMS error %.3f%% (%s %.3f%%)\n", tn, 100 * err, qlr_ggml_type_name(ref), 100 * er);
        if (types[t] == QLR_GGML_Q6_K) CHECK_MSG(err < 0.019 && err < 3.4 * er, "Q6_K error %g (Q8_0 %g)", err, er);
        else CHECK_MSG(err < 0.079 && err < er, "Q4_K error %g (Q4_1 %g)", err, er);
    }
    /* ragged sizes are refused, not read out of bounds */
    CHECK(qlr_ggml_quantize_row(QLR_GGML_Q4_K, x, 128, q) == QLR_ERR_INVALID);
    CHECK(qlr_ggml_quantize(QLR_GGML_Q6_K, x, 256, 2, q, 419) == QLR_ERR_INVALID);
    free(x);
    free(y);
    free(z);
    free(q);
}

/* Cross-check against gguf.quants (PyPI gguf + numpy) when importable. */
static void test_gguf_py(void) {
    char path[512], cmd[1200];
    snprintf(path, sizeof path, "%s/gguf_ref.bin", test_tmpdir());
    snprintf(cmd, sizeof cmd, "python3 '%s/tests/quant/gguf_ref.py' '%s' 2>&1", QLR_SOURCE_DIR, path);
    int rc = system(cmd);
    if (rc == -1 || !WIFEXITED(rc) || WEXITSTATUS(rc) == 77 || WEXITSTATUS(rc) == 127) {
        printf("NOTE: gguf cross-check skipped (python3 with the PyPI gguf package and numpy not available)\n");
        return;
    }
    CHECK_MSG(WEXITSTATUS(rc) == 0, "gguf_ref.py failed with exit code %d", WEXITSTATUS(rc));
    FILE *f = fopen(path, "rb");
    CHECK_MSG(f != NULL, "cannot open %s", path);
    if (!f) return;
    int n_rec = 0, n_deq = 0, n_q = 0;
    uint32_t hdr[4];
    while (fread(hdr, 4, 4, f) == 4) {
        uint32_t kind = hdr[0], type = hdr[1], nf = hdr[2], nbytes = hdr[3];
        uint8_t *raw = malloc(nbytes ? nbytes : 1);
        float *fl = malloc((nf ? nf : 1) * sizeof(float)), *y = malloc((nf ? nf : 1) * sizeof(float));
        uint8_t *mine = malloc(nbytes ? nbytes : 1);
        if (fread(raw, 1, nbytes, f) != nbytes || fread(fl, 4, nf, f) != nf) {
            CHECK_MSG(0, "truncated record in %s", path);
            free(raw); free(fl); free(y); free(mine);
            break;
        }
        n_rec++;
        if (kind == 0) {
            CHECK_OK(qlr_ggml_dequant(type, raw, nbytes, nf, 1, y));
            int bad = 0;
            for (uint32_t i = 0; i < nf; i++)
                if (qlr_f32_bits(y[i]) != qlr_f32_bits(fl[i]) && !(y[i] == fl[i]) && !(isnan(y[i]) && isnan(fl[i]))) {
                    if (bad++ < 3)
                        fprintf(stderr, "%s elem %u: %.9g vs gguf %.9g\n", qlr_ggml_type_name(type), i, y[i], fl[i]);
                }
            CHECK_MSG(bad == 0, "dequant %s: %d of %u values differ from gguf.quants", qlr_ggml_type_name(type), bad, nf);
            n_deq++;
        } else {
            CHECK_OK(qlr_ggml_quantize_row(type, fl, nf, mine));
            int bad = 0;
            for (uint32_t i = 0; i < nbytes; i++) bad += mine[i] != raw[i];
            CHECK_MSG(bad == 0, "quantize %s: %d of %u bytes differ from gguf.quants", qlr_ggml_type_name(type), bad, nbytes);
            n_q++;
        }
        free(raw); free(fl); free(y); free(mine);
    }
    fclose(f);
    printf("gguf cross-check: %d dequant and %d quantize records compared\n", n_deq, n_q);
    CHECK_EQ_INT(n_deq, 8);
    CHECK_EQ_INT(n_q, 5);
}

int main(void) {
    test_types();
    test_plain();
    test_q8_q4();
    test_q4_k();
    test_q6_k();
    test_roundtrip();
    test_kquants();
    test_gguf_py();
    return test_finish();
}
