/* core/dtype.h: element types shared by every module, and bf16/f16 <-> f32 conversion.
 * Conversions to 16 bits round to nearest even; NaN stays NaN (quiet), infinities stay. */
#ifndef QLR_CORE_DTYPE_H
#define QLR_CORE_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum qlr_dtype {
    QLR_F32 = 0,
    QLR_F16,
    QLR_BF16,
    QLR_I32,
    QLR_I64,
    QLR_U8,
    QLR_I8,
    QLR_F64,
    QLR_DTYPE_COUNT
} qlr_dtype;

/* Bytes per element (0 for an invalid value). */
size_t qlr_dtype_size(qlr_dtype t);
/* "f32", "bf16", ... */
const char *qlr_dtype_name(qlr_dtype t);

static inline float qlr_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t qlr_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float qlr_bf16_to_f32(uint16_t h) { return qlr_bits_f32((uint32_t)h << 16); }

static inline uint16_t qlr_f32_to_bf16(float f) {
    uint32_t u = qlr_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float qlr_f16_to_f32(uint16_t h);
uint16_t qlr_f32_to_f16(float f);

/* Row converters (n elements). */
void qlr_bf16_to_f32_row(const uint16_t *src, float *dst, size_t n);
void qlr_f32_to_bf16_row(const float *src, uint16_t *dst, size_t n);
void qlr_f16_to_f32_row(const uint16_t *src, float *dst, size_t n);
void qlr_f32_to_f16_row(const float *src, uint16_t *dst, size_t n);

/* Overflow-checked size arithmetic: return 0 and leave *out unchanged on overflow. */
static inline int qlr_mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    if (a && b > UINT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}
static inline int qlr_add_ok(uint64_t a, uint64_t b, uint64_t *out) {
    if (b > UINT64_MAX - a) return 0;
    *out = a + b;
    return 1;
}

#endif
