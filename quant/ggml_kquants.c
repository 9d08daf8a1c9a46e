/* quant/ggml_kquants.c: our quantizers for ggml's k-quant blocks Q6_K and Q4_K (layouts: spec
 * §3.6; the byte packing is the inverse of the dequantizers in ggml_quants.c). The choice of
 * scales is ours, written for this project (not ggml's search): per sub-block a small scan of
 * candidate scales, each followed by a least-squares refit of the scale (Q6_K) or of scale and
 * min (Q4_K) to the codes it gave, keeping the lowest squared error; then the sub-block scales
 * are quantized to the super-block's 8-bit (Q6_K) / 6-bit (Q4_K) grid and the codes are chosen
 * again against the scales as the dequantizer will read them (fp16 d times the integer scale).
 * Tested by round trip through our dequantizer and through gguf-py's, with error bounds
 * (tests/quant/test_ggml_quants.c); gguf-py has no reference quantizer for these types. */
#include <math.h>
#include <string.h>

#include "core/dtype.h"
#include "quant/ggml_quants_internal.h"

static inline float f16_round(float f) { return qlr_f16_to_f32(qlr_f32_to_f16(f)); }

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* Nearest integer (half away from zero) of a finite float, clamped to [lo, hi]; NaN -> 0. */
static inline int qround(float v, int lo, int hi) {
    if (!(v == v)) return clampi(0, lo, hi);
    if (v <= (float)lo) return lo;
    if (v >= (float)hi) return hi;
    return (int)roundf(v);
}

/* ---- Q6_K: 16 sub-blocks of 16, x = d * sc[j] * (q - 32), q in 0..63, sc int8 ---- */

/* Best signed scale of n values for codes in [-32, 31] (0 for an all-zero block). */
static float q6_sub_scale(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; i++)
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    if (amax == 0.0f) return 0.0f;
    /* the largest value maps to -32, the code with the larger magnitude */
    float base = max / -32.0f, best_s = base;
    double best_err = INFINITY;
    for (int t = -8; t <= 8; t++) {
        float s = base * (1.0f + 0.02f * (float)t);
        double sxq = 0, sqq = 0;
        int q[16];
        for (int i = 0; i < n; i++) {
            q[i] = qround(x[i] / s, -32, 31);
            sxq += (double)x[i] * q[i];
            sqq += (double)q[i] * q[i];
        }
        if (sqq > 0) s = (float)(sxq / sqq); /* least squares for these codes */
        double err = 0;
        for (int i = 0; i < n; i++) {
            double e = (double)x[i] - (double)s * q[i];
            err += e * e;
        }
        if (err < best_err && s != 0.0f) {
            best_err = err;
            best_s = s;
        }
    }
    return best_s;
}

void qlr_ggml_qz_q6_k(const float *x, int64_t nb, uint8_t *s) {
    for (int64_t b = 0; b < nb; b++, x += 256, s += 210) {
        float sub[16], amax = 0.0f;
        for (int j = 0; j < 16; j++) {
            sub[j] = q6_sub_scale(x + 16 * j, 16);
            amax = fmaxf(amax, fabsf(sub[j]));
        }
        float d = f16_round(amax / 127.0f);
        int8_t sc[16];
        uint8_t q[256];
        for (int j = 0; j < 16; j++) {
            /* the integer scale next below or above sub[j] / d, whichever decodes better */
            float r = d > 0.0f ? sub[j] / d : 0.0f;
            int lo = clampi((int)floorf(r), -127, 127), hi = clampi((int)ceilf(r), -127, 127);
            double best = INFINITY;
            for (int c = lo; c <= hi; c++) {
                float e = d * (float)c; /* the scale the dequantizer reads */
                double err = 0;
                uint8_t qq[16];
                for (int i = 0; i < 16; i++) {
                    int v = e != 0.0f ? qround(x[16 * j + i] / e, -32, 31) : 0;
                    qq[i] = (uint8_t)(v + 32);
                    double dv = (double)x[16 * j + i] - (double)e * v;
                    err += dv * dv;
                }
                if (err < best) {
                    best = err;
                    sc[j] = (int8_t)c;
                    memcpy(q + 16 * j, qq, 16);
                }
            }
        }
        memset(s, 0, 210);
        uint8_t *ql = s, *qh = s + 128;
        for (int h = 0; h < 2; h++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < 32; l++) {
                    int v = q[128 * h + 32 * k + l];
                    uint8_t *L = ql + 64 * h + l + 32 * (k & 1);
                    *L |= (uint8_t)((v & 0xF) << (k < 2 ? 0 : 4));
                    qh[32 * h + l] |= (uint8_t)(((v >> 4) & 3) << (2 * k));
                }
        memcpy(s + 192, sc, 16);
        uint16_t dh = qlr_f32_to_f16(d);
        s[208] = (uint8_t)dh;
        s[209] = (uint8_t)(dh >> 8);
    }
}

/* ---- Q4_K: 8 sub-blocks of 32, x = d * sc[j] * q - dmin * mn[j], q in 0..15, sc/mn 6-bit ---- */

/* Least-squares (a, m) of x ~ a * q - m over n values with m >= 0; returns the squared error. */
static double q4_fit(const float *x, const int *q, int n, float *a, float *m) {
    double sq = 0, sqq = 0, sx = 0, sxq = 0;
    for (int i = 0; i < n; i++) {
        sq += q[i];
        sqq += (double)q[i] * q[i];
        sx += x[i];
        sxq += (double)x[i] * q[i];
    }
    double det = n * sqq - sq * sq, A, M;
    if (det > 0) {
        A = (n * sxq - sq * sx) / det; /* normal equations of x = A q - M */
        M = (A * sq - sx) / n;
    } else {
        A = 0;
        M = -sx / n;
    }
    if (M < 0) { /* the min term can only subtract: refit the scale alone */
        M = 0;
        A = sqq > 0 ? sxq / sqq : 0;
    }
    if (A < 0) A = 0;
    *a = (float)A;
    *m = (float)M;
    double err = 0;
    for (int i = 0; i < n; i++) {
        double e = (double)x[i] - (A * q[i] - M);
        err += e * e;
    }
    return err;
}

static void q4_sub_scale_min(const float *x, int n, float *a_out, float *m_out) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < n; i++) {
        mn = fminf(mn, x[i]);
        mx = fmaxf(mx, x[i]);
    }
    if (mn > 0.0f) mn = 0.0f;
    if (mx <= mn) {
        *a_out = 0.0f;
        *m_out = -mn;
        return;
    }
    float best_a = (mx - mn) / 15.0f, best_m = -mn;
    double best_err = INFINITY;
    int q[32];
    for (int t = -6; t <= 8; t++) {
        float a = (mx - mn) / (15.0f + 0.25f * (float)t), m = -mn;
        for (int i = 0; i < n; i++) q[i] = qround((x[i] + m) / a, 0, 15);
        float fa, fm;
        double err = q4_fit(x, q, n, &fa, &fm);
        if (err < best_err && fa > 0.0f) {
            best_err = err;
            best_a = fa;
            best_m = fm;
        }
    }
    *a_out = best_a;
    *m_out = best_m;
}

void qlr_ggml_qz_q4_k(const float *x, int64_t nb, uint8_t *s) {
    for (int64_t b = 0; b < nb; b++, x += 256, s += 144) {
        float a[8], m[8], amax = 0.0f, mmax = 0.0f;
        for (int j = 0; j < 8; j++) {
            q4_sub_scale_min(x + 32 * j, 32, &a[j], &m[j]);
            amax = fmaxf(amax, a[j]);
            mmax = fmaxf(mmax, m[j]);
        }
        float d = f16_round(amax / 63.0f), dmin = f16_round(mmax / 63.0f);
        int sc[8], mn[8];
        uint8_t q[256];
        for (int j = 0; j < 8; j++) {
            /* the integer scale and min next below or above the ideal ones, best pair kept */
            float rs = d > 0.0f ? a[j] / d : 0.0f, rm = dmin > 0.0f ? m[j] / dmin : 0.0f;
            int s0 = clampi((int)floorf(rs), 0, 63), s1 = clampi((int)ceilf(rs), 0, 63);
            int m0 = clampi((int)floorf(rm), 0, 63), m1 = clampi((int)ceilf(rm), 0, 63);
            double best = INFINITY;
            for (int cs = s0; cs <= s1; cs++)
                for (int cm = m0; cm <= m1; cm++) {
                    float e = d * (float)cs, o = dmin * (float)cm; /* as the dequantizer reads them */
                    double err = 0;
                    uint8_t qq[32];
                    for (int i = 0; i < 32; i++) {
                        int v = e > 0.0f ? qround((x[32 * j + i] + o) / e, 0, 15) : 0;
                        qq[i] = (uint8_t)v;
                        double dv = (double)x[32 * j + i] - ((double)e * v - o);
                        err += dv * dv;
                    }
                    if (err < best) {
                        best = err;
                        sc[j] = cs;
                        mn[j] = cm;
                        memcpy(q + 32 * j, qq, 32);
                    }
                }
        }
        memset(s, 0, 144);
        uint16_t dh = qlr_f32_to_f16(d), mh = qlr_f32_to_f16(dmin);
        s[0] = (uint8_t)dh;
        s[1] = (uint8_t)(dh >> 8);
        s[2] = (uint8_t)mh;
        s[3] = (uint8_t)(mh >> 8);
        uint8_t *S = s + 4;
        for (int j = 0; j < 8; j++) { /* the inverse of the spec's 6-bit unpacking */
            if (j < 4) {
                S[j] |= (uint8_t)(sc[j] & 63);
                S[j + 4] |= (uint8_t)(mn[j] & 63);
            } else {
                S[j + 4] |= (uint8_t)((sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4));
                S[j - 4] |= (uint8_t)((sc[j] >> 4) << 6);
                S[j] |= (uint8_t)((mn[j] >> 4) << 6);
            }
        }
        uint8_t *qs = s + 16;
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                qs[32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
    }
}
