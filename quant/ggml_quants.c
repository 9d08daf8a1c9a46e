/* quant/ggml_quants.c: decoding of ggml block types to float32 (spec §3.6) and the reference
 * quantizers for Q8_0 / Q4_0 / Q4_1 / Q5_0 (ggml's rules, bit-exact with gguf-py); the Q6_K and
 * Q4_K quantizers are ours (ggml_kquants.c). Blocks are read byte by byte (little-endian fp16 fields,
 * no struct overlays), so any alignment works. The arithmetic order follows ggml's reference
 * dequantizers so that results agree bit for bit with gguf-py / ggml (FMA contraction is
 * turned off for this library in CMakeLists.txt). */
#include "quant/ggml_quants.h"

#include <float.h>
#include <math.h>
#include <string.h>

#include "core/dtype.h"
#include "core/threads.h"
#include "quant/ggml_quants_internal.h"

static const char *const type_names[] = {
    [0] = "F32",      [1] = "F16",     [2] = "Q4_0",    [3] = "Q4_1",   [6] = "Q5_0",
    [7] = "Q5_1",     [8] = "Q8_0",    [9] = "Q8_1",    [10] = "Q2_K",  [11] = "Q3_K",
    [12] = "Q4_K",    [13] = "Q5_K",   [14] = "Q6_K",   [15] = "Q8_K",  [16] = "IQ2_XXS",
    [17] = "IQ2_XS",  [18] = "IQ3_XXS", [19] = "IQ1_S", [20] = "IQ4_NL", [21] = "IQ3_S",
    [22] = "IQ2_S",   [23] = "IQ4_XS", [24] = "I8",     [25] = "I16",   [26] = "I32",
    [27] = "I64",     [28] = "F64",    [29] = "IQ1_M",  [30] = "BF16",  [34] = "TQ1_0",
    [35] = "TQ2_0",   [39] = "MXFP4",
};

const char *qlr_ggml_type_name(uint32_t type) {
    if (type < sizeof type_names / sizeof type_names[0] && type_names[type]) return type_names[type];
    return "unknown";
}

/* Layout table of every ggml type with a fixed block layout (spec §3.5). */
typedef struct ggml_layout {
    uint16_t elems; /* elements per block */
    uint16_t bytes; /* bytes per block */
} ggml_layout;

static const ggml_layout layouts[] = {
    [QLR_GGML_F32] = {1, 4},    [QLR_GGML_F16] = {1, 2},     [QLR_GGML_Q4_0] = {32, 18},
    [QLR_GGML_Q4_1] = {32, 20}, [QLR_GGML_Q5_0] = {32, 22},  [QLR_GGML_Q5_1] = {32, 24},
    [QLR_GGML_Q8_0] = {32, 34}, [QLR_GGML_Q8_1] = {32, 36},  [QLR_GGML_Q2_K] = {256, 84},
    [QLR_GGML_Q3_K] = {256, 110}, [QLR_GGML_Q4_K] = {256, 144}, [QLR_GGML_Q5_K] = {256, 176},
    [QLR_GGML_Q6_K] = {256, 210}, [QLR_GGML_Q8_K] = {256, 292}, [QLR_GGML_I8] = {1, 1},
    [QLR_GGML_I16] = {1, 2},    [QLR_GGML_I32] = {1, 4},     [QLR_GGML_I64] = {1, 8},
    [QLR_GGML_F64] = {1, 8},    [QLR_GGML_BF16] = {1, 2},
};

int64_t qlr_ggml_block_elems(uint32_t type) {
    return type < sizeof layouts / sizeof layouts[0] ? layouts[type].elems : 0;
}

size_t qlr_ggml_block_bytes(uint32_t type) {
    return type < sizeof layouts / sizeof layouts[0] ? layouts[type].bytes : 0;
}

int qlr_ggml_type_supported(uint32_t type) {
    switch (type) {
    case QLR_GGML_F32: case QLR_GGML_F16: case QLR_GGML_BF16: case QLR_GGML_Q4_0:
    case QLR_GGML_Q4_1: case QLR_GGML_Q5_0: case QLR_GGML_Q8_0: case QLR_GGML_Q4_K:
    case QLR_GGML_Q6_K: return 1;
    default: return 0;
    }
}

qlr_status qlr_ggml_type_check(uint32_t type) {
    if (qlr_ggml_type_supported(type)) return QLR_OK;
    return qlr_errorf(QLR_ERR_UNSUPPORTED,
                      "ggml type %s (%u) is not supported; supported: F32, F16, BF16, Q8_0, "
                      "Q4_0, Q4_1, Q5_0, Q4_K, Q6_K",
                      qlr_ggml_type_name(type), type);
}

qlr_status qlr_ggml_row_bytes(uint32_t type, int64_t ne0, size_t *out) {
    QLR_TRY(qlr_ggml_type_check(type));
    int64_t be = qlr_ggml_block_elems(type);
    if (ne0 < 0 || ne0 % be != 0)
        return qlr_errorf(QLR_ERR_INVALID,
                          "ggml type %s: row length %lld is not a multiple of the block size %lld",
                          qlr_ggml_type_name(type), (long long)ne0, (long long)be);
    uint64_t b;
    if (!qlr_mul_ok((uint64_t)(ne0 / be), qlr_ggml_block_bytes(type), &b) || b > SIZE_MAX)
        return qlr_errorf(QLR_ERR_NOMEM, "ggml type %s: row of %lld elements is too large",
                          qlr_ggml_type_name(type), (long long)ne0);
    *out = (size_t)b;
    return QLR_OK;
}

static inline float rd_f16(const uint8_t *p) { return qlr_f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }
static inline void wr_f16(uint8_t *p, float f) {
    uint16_t h = qlr_f32_to_f16(f);
    p[0] = (uint8_t)h;
    p[1] = (uint8_t)(h >> 8);
}

/* ---- dequantizers: nb blocks from src into y ---- */

static void deq_f32(const uint8_t *s, int64_t nb, float *y) { memcpy(y, s, (size_t)nb * 4); }

static void deq_f16(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t i = 0; i < nb; i++) y[i] = rd_f16(s + 2 * i);
}

static void deq_bf16(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t i = 0; i < nb; i++) y[i] = qlr_bf16_to_f32((uint16_t)(s[2 * i] | s[2 * i + 1] << 8));
}

static void deq_q8_0(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t b = 0; b < nb; b++, s += 34, y += 32) {
        float d = rd_f16(s);
        for (int j = 0; j < 32; j++) y[j] = (float)(int8_t)s[2 + j] * d;
    }
}

static void deq_q4_0(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t b = 0; b < nb; b++, s += 18, y += 32) {
        float d = rd_f16(s);
        const uint8_t *qs = s + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((qs[j] & 0x0F) - 8) * d;
            y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
        }
    }
}

static void deq_q4_1(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t b = 0; b < nb; b++, s += 20, y += 32) {
        float d = rd_f16(s), m = rd_f16(s + 2);
        const uint8_t *qs = s + 4;
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(qs[j] & 0x0F) * d + m;
            y[j + 16] = (float)(qs[j] >> 4) * d + m;
        }
    }
}

/* Q5_0: d, qh (bit j = 5th bit of element j, little-endian u32), qs as Q4_0; x = (q - 16) d. */
static void deq_q5_0(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t b = 0; b < nb; b++, s += 22, y += 32) {
        float d = rd_f16(s);
        uint32_t qh = (uint32_t)s[2] | (uint32_t)s[3] << 8 | (uint32_t)s[4] << 16 | (uint32_t)s[5] << 24;
        const uint8_t *qs = s + 6;
        for (int j = 0; j < 16; j++) {
            int q0 = (qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            int q1 = (qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = (float)(q0 - 16) * d;
            y[j + 16] = (float)(q1 - 16) * d;
        }
    }
}

/* 6-bit scale and min of sub-block j from the 12 packed bytes (spec §3.6, Q4_K). */
static inline void k4_scale_min(int j, const uint8_t *S, int *sc, int *mn) {
    if (j < 4) {
        *sc = S[j] & 63;
        *mn = S[j + 4] & 63;
    } else {
        *sc = (S[j + 4] & 0x0F) | ((S[j - 4] >> 6) << 4);
        *mn = (S[j + 4] >> 4) | ((S[j] >> 6) << 4);
    }
}

static void deq_q4_k(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t b = 0; b < nb; b++, s += 144, y += 256) {
        float d = rd_f16(s), dmin = rd_f16(s + 2);
        const uint8_t *S = s + 4, *qs = s + 16;
        for (int c = 0; c < 4; c++) {
            int sc0, mn0, sc1, mn1;
            k4_scale_min(2 * c, S, &sc0, &mn0);
            k4_scale_min(2 * c + 1, S, &sc1, &mn1);
            float d0 = d * (float)sc0, m0 = dmin * (float)mn0;
            float d1 = d * (float)sc1, m1 = dmin * (float)mn1;
            const uint8_t *q = qs + 32 * c;
            float *o = y + 64 * c;
            for (int l = 0; l < 32; l++) o[l] = d0 * (float)(q[l] & 0x0F) - m0;
            for (int l = 0; l < 32; l++) o[32 + l] = d1 * (float)(q[l] >> 4) - m1;
        }
    }
}

static void deq_q6_k(const uint8_t *s, int64_t nb, float *y) {
    for (int64_t b = 0; b < nb; b++, s += 210, y += 256) {
        float d = rd_f16(s + 208);
        for (int h = 0; h < 2; h++) {
            const uint8_t *L = s + 64 * h, *H = s + 128 + 32 * h;
            const int8_t *S = (const int8_t *)(s + 192 + 8 * h);
            float *o = y + 128 * h;
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32;
                o[l] = d * (float)S[is + 0] * (float)q1;
                o[l + 32] = d * (float)S[is + 2] * (float)q2;
                o[l + 64] = d * (float)S[is + 4] * (float)q3;
                o[l + 96] = d * (float)S[is + 6] * (float)q4;
            }
        }
    }
}

typedef void (*deq_fn)(const uint8_t *s, int64_t nb, float *y);

static deq_fn deq_for(uint32_t type) {
    switch (type) {
    case QLR_GGML_F32: return deq_f32;
    case QLR_GGML_F16: return deq_f16;
    case QLR_GGML_BF16: return deq_bf16;
    case QLR_GGML_Q8_0: return deq_q8_0;
    case QLR_GGML_Q4_0: return deq_q4_0;
    case QLR_GGML_Q4_1: return deq_q4_1;
    case QLR_GGML_Q5_0: return deq_q5_0;
    case QLR_GGML_Q4_K: return deq_q4_k;
    case QLR_GGML_Q6_K: return deq_q6_k;
    default: return NULL;
    }
}

qlr_status qlr_ggml_dequant_row(uint32_t type, const void *src, int64_t ne0, float *dst) {
    size_t rb;
    QLR_TRY(qlr_ggml_row_bytes(type, ne0, &rb));
    deq_for(type)(src, ne0 / qlr_ggml_block_elems(type), dst);
    return QLR_OK;
}

typedef struct deq_ctx {
    deq_fn fn;
    const uint8_t *src;
    float *dst;
    size_t bb;
    int64_t be;
} deq_ctx;

static void deq_range(void *vctx, int64_t b0, int64_t b1, int tid) {
    const deq_ctx *c = vctx;
    c->fn(c->src + (size_t)b0 * c->bb, b1 - b0, c->dst + b0 * c->be);
}

qlr_status qlr_ggml_dequant(uint32_t type, const void *src, size_t src_bytes, int64_t ne0,
                            int64_t nrows, float *dst) {
    size_t rb;
    QLR_TRY(qlr_ggml_row_bytes(type, ne0, &rb));
    uint64_t total, nel;
    if (nrows < 0)
        return qlr_errorf(QLR_ERR_INVALID, "ggml dequant: negative row count %lld", (long long)nrows);
    if (!qlr_mul_ok(rb, (uint64_t)nrows, &total) || !qlr_mul_ok((uint64_t)ne0, (uint64_t)nrows, &nel) ||
        nel > (uint64_t)INT64_MAX / 4)
        return qlr_errorf(QLR_ERR_NOMEM, "ggml dequant: %s tensor [%lld x %lld] is too large",
                          qlr_ggml_type_name(type), (long long)ne0, (long long)nrows);
    if (total > src_bytes)
        return qlr_errorf(QLR_ERR_FORMAT,
                          "ggml dequant: %s tensor [%lld x %lld] needs %llu bytes, only %zu present",
                          qlr_ggml_type_name(type), (long long)ne0, (long long)nrows,
                          (unsigned long long)total, src_bytes);
    deq_ctx c = {deq_for(type), src, dst, qlr_ggml_block_bytes(type), qlr_ggml_block_elems(type)};
    int64_t nb = (int64_t)(nel / (uint64_t)c.be);
    qlr_parallel_for(nb, (1 << 15) / c.be, deq_range, &c); /* >= 32K elements per chunk */
    return QLR_OK;
}

/* ---- reference quantizers ---- */

/* Truncating float -> nibble conversion of ggml's quantizers ((int8_t) cast, then min 15),
 * made total: NaN and negatives go to 0 instead of undefined behaviour. */
static inline int trunc_nibble(float t) {
    if (!(t >= 0.0f)) return 0;
    if (t >= 15.0f) return 15;
    return (int)t;
}

static void qz_q8_0(const float *x, int64_t nb, uint8_t *s) {
    for (int64_t b = 0; b < nb; b++, x += 32, s += 34) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        wr_f16(s, d);
        for (int j = 0; j < 32; j++) {
            float v = roundf(x[j] * id); /* half away from zero */
            if (!(v == v)) v = 0.0f;
            s[2 + j] = (uint8_t)(int8_t)fmaxf(-128.0f, fminf(127.0f, v));
        }
    }
}

static void qz_q4_0(const float *x, int64_t nb, uint8_t *s) {
    for (int64_t b = 0; b < nb; b++, x += 32, s += 18) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; j++)
            if (amax < fabsf(x[j])) { /* first element of largest magnitude, sign kept */
                amax = fabsf(x[j]);
                max = x[j];
            }
        float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        wr_f16(s, d);
        for (int j = 0; j < 16; j++) {
            int q0 = trunc_nibble(x[j] * id + 8.5f), q1 = trunc_nibble(x[j + 16] * id + 8.5f);
            s[2 + j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

static void qz_q4_1(const float *x, int64_t nb, uint8_t *s) {
    for (int64_t b = 0; b < nb; b++, x += 32, s += 20) {
        float mn = FLT_MAX, mx = -FLT_MAX;
        for (int j = 0; j < 32; j++) {
            if (x[j] < mn) mn = x[j];
            if (x[j] > mx) mx = x[j];
        }
        float d = (mx - mn) / 15.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        wr_f16(s, d);
        wr_f16(s + 2, mn);
        for (int j = 0; j < 16; j++) {
            int q0 = trunc_nibble((x[j] - mn) * id + 0.5f);
            int q1 = trunc_nibble((x[j + 16] - mn) * id + 0.5f);
            s[4 + j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

/* ggml's Q5_0 rule: d = max / -16 (max = the first element of largest magnitude, sign kept),
 * q = min(31, trunc(x / d + 16.5)). */
static void qz_q5_0(const float *x, int64_t nb, uint8_t *s) {
    for (int64_t b = 0; b < nb; b++, x += 32, s += 22) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < 32; j++)
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        float d = max / -16.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        wr_f16(s, d);
        uint32_t qh = 0;
        for (int j = 0; j < 16; j++) {
            float t0 = x[j] * id + 16.5f, t1 = x[j + 16] * id + 16.5f;
            int q0 = !(t0 >= 0.0f) ? 0 : t0 >= 31.0f ? 31 : (int)t0;
            int q1 = !(t1 >= 0.0f) ? 0 : t1 >= 31.0f ? 31 : (int)t1;
            s[6 + j] = (uint8_t)((q0 & 0x0F) | (q1 & 0x0F) << 4);
            qh |= (uint32_t)(q0 >> 4) << j | (uint32_t)(q1 >> 4) << (j + 16);
        }
        for (int k = 0; k < 4; k++) s[2 + k] = (uint8_t)(qh >> (8 * k));
    }
}

qlr_status qlr_ggml_quantize_row(uint32_t type, const float *src, int64_t n, void *dst) {
    size_t rb;
    QLR_TRY(qlr_ggml_row_bytes(type, n, &rb));
    uint8_t *d = dst;
    switch (type) {
    case QLR_GGML_F32: memcpy(d, src, (size_t)n * 4); break;
    case QLR_GGML_F16:
        for (int64_t i = 0; i < n; i++) wr_f16(d + 2 * i, src[i]);
        break;
    case QLR_GGML_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = qlr_f32_to_bf16(src[i]);
            d[2 * i] = (uint8_t)h;
            d[2 * i + 1] = (uint8_t)(h >> 8);
        }
        break;
    case QLR_GGML_Q8_0: qz_q8_0(src, n / 32, d); break;
    case QLR_GGML_Q4_0: qz_q4_0(src, n / 32, d); break;
    case QLR_GGML_Q4_1: qz_q4_1(src, n / 32, d); break;
    case QLR_GGML_Q5_0: qz_q5_0(src, n / 32, d); break;
    case QLR_GGML_Q6_K: qlr_ggml_qz_q6_k(src, n / 256, d); break;
    case QLR_GGML_Q4_K: qlr_ggml_qz_q4_k(src, n / 256, d); break;
    default:
        return qlr_errorf(QLR_ERR_UNSUPPORTED, "ggml quantize: no reference quantizer for %s (%u)",
                          qlr_ggml_type_name(type), type);
    }
    return QLR_OK;
}

typedef struct qz_ctx {
    uint32_t type;
    const float *src;
    uint8_t *dst;
    int64_t ne0;
    size_t rb;
} qz_ctx;

static void qz_rows(void *vctx, int64_t r0, int64_t r1, int tid) {
    (void)tid;
    const qz_ctx *c = vctx;
    for (int64_t r = r0; r < r1; r++) /* cannot fail: the row length was checked */
        (void)qlr_ggml_quantize_row(c->type, c->src + r * c->ne0, c->ne0, c->dst + (size_t)r * c->rb);
}

qlr_status qlr_ggml_quantize(uint32_t type, const float *src, int64_t ne0, int64_t nrows, void *dst,
                             size_t dst_bytes) {
    size_t rb;
    QLR_TRY(qlr_ggml_row_bytes(type, ne0, &rb));
    uint64_t total;
    if (nrows < 0 || !qlr_mul_ok(rb, (uint64_t)nrows, &total) || total > dst_bytes)
        return qlr_errorf(QLR_ERR_INVALID, "ggml quantize: %s [%lld x %lld] needs more than the %zu bytes given",
                          qlr_ggml_type_name(type), (long long)ne0, (long long)nrows, dst_bytes);
    if (ne0 && nrows) QLR_TRY(qlr_ggml_quantize_row(type, src, ne0, dst)); /* type supported? */
    qz_ctx c = {type, src, dst, ne0, rb};
    qlr_parallel_for(nrows, ne0 >= (1 << 14) ? 1 : (1 << 14) / (ne0 ? ne0 : 1), qz_rows, &c);
    return QLR_OK;
}
