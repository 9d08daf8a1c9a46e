/* quant/ggml_quants.h: ggml tensor types as found in GGUF files (spec §3.5-3.6): names, block
 * sizes, dequantization to float32 for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K and Q6_K,
 * ggml's reference quantizers for Q8_0, Q4_0, Q4_1 and Q5_0, and our own for Q6_K and Q4_K
 * (model export: merged and base models for llama.cpp). Reading the GGUF container
 * is formats/'s job; this header only interprets the bytes of one tensor. */
#ifndef QLR_QUANT_GGML_QUANTS_H
#define QLR_QUANT_GGML_QUANTS_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

/* ggml type ids (spec §3.5). This header is the one owner of the ggml type table: formats/gguf.h
 * includes it for the ids and byte sizes. Any uint32 id can be passed where `type` is taken. */
typedef enum qlr_ggml_type {
    QLR_GGML_F32 = 0,
    QLR_GGML_F16 = 1,
    QLR_GGML_Q4_0 = 2,
    QLR_GGML_Q4_1 = 3,
    QLR_GGML_Q5_0 = 6,
    QLR_GGML_Q5_1 = 7,
    QLR_GGML_Q8_0 = 8,
    QLR_GGML_Q8_1 = 9,
    QLR_GGML_Q2_K = 10,
    QLR_GGML_Q3_K = 11,
    QLR_GGML_Q4_K = 12,
    QLR_GGML_Q5_K = 13,
    QLR_GGML_Q6_K = 14,
    QLR_GGML_Q8_K = 15,
    QLR_GGML_I8 = 24,
    QLR_GGML_I16 = 25,
    QLR_GGML_I32 = 26,
    QLR_GGML_I64 = 27,
    QLR_GGML_F64 = 28,
    QLR_GGML_BF16 = 30,
} qlr_ggml_type;

/* Name of a ggml type id ("Q4_K", "IQ2_XS", ...), also for the types we do not decode;
 * "unknown" for an id that is not a ggml type. Never NULL. */
const char *qlr_ggml_type_name(uint32_t type);
/* 1 if qlr_ggml_dequant* handles `type`, else 0. */
int qlr_ggml_type_supported(uint32_t type);
/* QLR_OK if `type` is supported; else QLR_ERR_UNSUPPORTED with a message naming the type and
 * listing the supported ones ("ggml type Q5_K (13) is not supported; supported: ..."). */
qlr_status qlr_ggml_type_check(uint32_t type);
/* Elements per block and bytes per block of any type with a known layout (the table of §3.5,
 * decodable or not); 0 for an unknown id. A GGUF reader uses these to size tensors. */
int64_t qlr_ggml_block_elems(uint32_t type);
size_t qlr_ggml_block_bytes(uint32_t type);

/* Bytes of a row of ne0 elements. QLR_ERR_UNSUPPORTED for an unsupported type,
 * QLR_ERR_INVALID if ne0 < 0 or ne0 is not a multiple of the block size, QLR_ERR_NOMEM on
 * overflow. */
qlr_status qlr_ggml_row_bytes(uint32_t type, int64_t ne0, size_t *out);

/* Dequantizes one row of ne0 elements from `src` (qlr_ggml_row_bytes(type, ne0) bytes, no
 * alignment needed) into dst[ne0]. Errors as qlr_ggml_row_bytes. */
qlr_status qlr_ggml_dequant_row(uint32_t type, const void *src, int64_t ne0, float *dst);

/* Dequantizes a whole tensor of nrows rows of ne0 elements (rows contiguous) into
 * dst[nrows * ne0], threaded. `src_bytes` is the number of bytes available at src: a tensor
 * larger than that is QLR_ERR_FORMAT (a truncated file), never an out-of-bounds read. Other
 * errors as qlr_ggml_row_bytes, and QLR_ERR_INVALID for nrows < 0. */
qlr_status qlr_ggml_dequant(uint32_t type, const void *src, size_t src_bytes, int64_t ne0,
                            int64_t nrows, float *dst);

/* Quantizes n floats into dst (qlr_ggml_row_bytes(type, n) bytes). Q8_0, Q4_0, Q4_1, Q5_0:
 * ggml's reference rules (spec §3.6; bit-exact with gguf-py's quantizers). Q6_K, Q4_K: our own
 * scale search (quant/ggml_kquants.c), any bytes the spec's dequantizer reads. F32/F16/BF16:
 * plain conversion, round to nearest even. QLR_ERR_UNSUPPORTED for other types,
 * QLR_ERR_INVALID if n is not a multiple of the block size. */
qlr_status qlr_ggml_quantize_row(uint32_t type, const float *src, int64_t n, void *dst);
/* qlr_ggml_quantize_row over nrows rows of ne0 (contiguous), threaded by rows, into dst of
 * dst_bytes (QLR_ERR_INVALID when too small). */
qlr_status qlr_ggml_quantize(uint32_t type, const float *src, int64_t ne0, int64_t nrows, void *dst,
                             size_t dst_bytes);

#endif
