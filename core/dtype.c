/* core/dtype.c: f16 conversions (bit-exact IEEE binary16, round to nearest even) and row
 * converters. bf16 is inline in dtype.h. */
#include "core/dtype.h"

size_t qlr_dtype_size(qlr_dtype t) {
    switch (t) {
    case QLR_F32: case QLR_I32: return 4;
    case QLR_F16: case QLR_BF16: return 2;
    case QLR_I64: case QLR_F64: return 8;
    case QLR_U8: case QLR_I8: return 1;
    default: return 0;
    }
}

const char *qlr_dtype_name(qlr_dtype t) {
    static const char *n[] = {"f32", "f16", "bf16", "i32", "i64", "u8", "i8", "f64"};
    return (unsigned)t < QLR_DTYPE_COUNT ? n[t] : "invalid";
}

float qlr_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0);
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    return qlr_bits_f32(u);
}

uint16_t qlr_f32_to_f16(float f) {
    uint32_t u = qlr_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;             /* NaN */
    if (a >= 0x47800000u) {                                   /* >= 65536 or inf */
        /* values rounding below 65520 would have been caught below; all of these overflow */
        return sign | 0x7c00u;
    }
    if (a < 0x38800000u) {                                    /* below the smallest normal */
        if (a < 0x33000000u) return sign;                     /* < 2^-25 rounds to 0 */
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)e;                             /* 14 + (113 - e) - ... */
        /* value = m * 2^(e-150); subnormal unit = 2^-24 -> q = m >> (126 - e) */
        uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return sign | (uint16_t)q;
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u);              /* round to nearest even */
    r -= 0x38000000u;                                         /* rebias 127 -> 15 */
    if (r >= 0x0f800000u) return sign | 0x7c00u;              /* rounded up to inf */
    return sign | (uint16_t)(r >> 13);
}

void qlr_bf16_to_f32_row(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = qlr_bf16_to_f32(src[i]);
}
void qlr_f32_to_bf16_row(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = qlr_f32_to_bf16(src[i]);
}
void qlr_f16_to_f32_row(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = qlr_f16_to_f32(src[i]);
}
void qlr_f32_to_f16_row(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = qlr_f32_to_f16(src[i]);
}
