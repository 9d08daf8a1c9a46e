/* quant/nf4.h: the NF4 weight store, byte-compatible with bitsandbytes
 * (docs/FORMATS.md §1): codes in row-major order, block 64, element 2k in the high
 * nibble of byte k; absmax per block, double-quantized (uint8 codes over the signed dynamic map,
 * block 256, fp32 second-level absmax, mean offset). This is the CPU-side (host) form; backends
 * copy the same bytes to device memory. */
#ifndef QLR_QUANT_NF4_H
#define QLR_QUANT_NF4_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "quant/dynmap.h"

#define QLR_NF4_BLOCK 64          /* elements per 4-bit block (bnb default, QLoRA) */
#define QLR_NF4_DQ_BLOCK 256      /* absmax values per double-quant block */

/* The 16 NF4 code values (spec §1.1), index = code. */
extern const float qlr_nf4_table[16];
/* bnb's signed dynamic map, 256 entries ascending: the values bitsandbytes itself computes (see
 * quant/dynmap.c; within 2 ulps of the spec's Appendix A.1 emulation, not equal to it). */
extern const float qlr_dynmap_signed[256];
/* bnb's unsigned dynamic map, likewise (Appendix A.2 is the emulation). */
extern const float qlr_dynmap_unsigned[256];

/* One NF4-quantized matrix [rows, cols] (PyTorch [out, in]). Host memory unless a backend
 * says otherwise. With double quant (dq = 1) `absmax_q` holds n_blocks uint8 codes and
 * `absmax` is NULL; without it `absmax` holds n_blocks floats. */
typedef struct qlr_nf4 {
    int64_t rows, cols;
    int64_t n;               /* rows * cols */
    int64_t n_blocks;        /* ceil(n / 64) */
    int64_t n_dq_blocks;     /* ceil(n_blocks / 256) when dq */
    int dq;
    uint8_t *codes;          /* [ceil(n/2)] packed */
    float *absmax;           /* [n_blocks] when !dq */
    uint8_t *absmax_q;       /* [n_blocks] when dq */
    float *dq_absmax;        /* [n_dq_blocks] when dq (bnb: nested_absmax) */
    float dq_offset;         /* mean of the first-level absmax (bnb: nested offset) */
    int owned;               /* 1 if the buffers are malloc'ed by this module */
} qlr_nf4;

/* Index of the nearest NF4 code for a value already scaled to [-1, 1] (ties to the lower
 * code, NaN to 0), exactly the bnb decision tree. */
uint8_t qlr_nf4_nearest(float s);
/* Index of the nearest entry of a sorted 256-entry map (ties to the lower index). */
uint8_t qlr_dynmap_nearest(const float *map, float x);

/* Bytes needed to hold a quantized [rows, cols] matrix (codes + absmax + dq arrays). */
size_t qlr_nf4_bytes(int64_t rows, int64_t cols, int dq);

/* Quantizes a float matrix into a freshly allocated store (dq = double quant on/off). */
qlr_status qlr_nf4_quantize(const float *w, int64_t rows, int64_t cols, int dq, qlr_nf4 *out);
/* Frees an owned store; safe on a zeroed struct. */
void qlr_nf4_free(qlr_nf4 *q);

/* The first-level absmax of block b (reconstructed from the double quant when dq). */
float qlr_nf4_block_absmax(const qlr_nf4 *q, int64_t b);
/* Dequantizes rows [r0, r0+nr) into out[nr * cols] (f32). Threaded by the caller. */
void qlr_nf4_dequant_rows(const qlr_nf4 *q, int64_t r0, int64_t nr, float *out);
/* Dequantizes everything into out[n]. */
void qlr_nf4_dequant(const qlr_nf4 *q, float *out);

/* ---- additions (quant/nf4.c) ---- */

/* 1 if the float table above equals the spec's hex bit patterns and every decision threshold
 * is within one ulp of the float32 midpoint of its two codes (thresholds are bnb's CUDA float
 * literals; see nf4.c); 0 otherwise (a build/consistency check). */
int qlr_nf4_table_ok(void);

/* The raw bnb CUDA kernel on a flat array: absmax[ceil(n/64)] = max |x| per block (NaN
 * ignored; a partial last block also counts the zeros bnb pads it with),
 * codes[ceil(n/2)] = nearest(x * (1/absmax)) packed high nibble first; odd n: the last low
 * nibble is the code of bnb's padding zero (7; 0 in an all-zero block). An all-zero block
 * stores absmax 0 and codes 0 (0 * inf = NaN -> code 0, as bnb's CUDA kernel). Threaded.
 * Returns QLR_ERR_INVALID if n < 0, else QLR_OK. */
qlr_status qlr_nf4_quantize_blocks(const float *x, int64_t n, uint8_t *codes, float *absmax);

/* Double-quant offset: bnb's absmax.mean(), the float32 mean of absmax[nb] computed as
 * PyTorch's CUDA reduction computes it (same association order, float32 sums, times 1.0f/nb;
 * see nf4.c), so that the offset has bnb's last bit. 0 when nb <= 0. */
float qlr_nf4_dq_mean(const float *absmax, int64_t nb);

/* Double quantization of absmax[nb] (spec §1.6): *dq_offset = qlr_nf4_dq_mean, then
 * blockwise 8-bit (block 256, signed dynamic map) of absmax - offset into absmax_q[nb] and
 * dq_absmax[ceil(nb/256)]. Returns QLR_ERR_INVALID (nb < 0) or QLR_ERR_NOMEM, else QLR_OK. */
qlr_status qlr_nf4_double_quant(const float *absmax, int64_t nb, uint8_t *absmax_q,
                                float *dq_absmax, float *dq_offset);

/* qlr-hash64 (core/hash.h) of a host store: rows, cols (int64 little-endian), dq (one byte),
 * the packed codes, then absmax_q, dq_absmax and dq_offset (dq) or absmax (float32 bytes). Two
 * stores hash equal exactly when every one of those bytes is equal (up to collisions). */
uint64_t qlr_nf4_hash(const qlr_nf4 *q);

/* The first-level scale state of a store, as another program recorded it (export-base writes
 * it beside the dequantized weights: model/export_gguf.c). Arrays are borrowed. */
typedef struct qlr_nf4_state {
    int dq;
    const float *absmax;     /* [n_blocks] when !dq */
    const uint8_t *absmax_q; /* [n_blocks] when dq */
    const float *dq_absmax;  /* [ceil(n_blocks / 256)] when dq */
    float dq_offset;
} qlr_nf4_state;

/* Rebuilds a store from weights w [rows, cols] that are (up to a rounding of their own) the
 * dequantized values of a store with scale state `s`: the state is copied and each code is the
 * nearest NF4 code of w * (1 / block absmax), the same rounding the quantizer made. For weights
 * that came out of such a store as f32 the result equals that store byte for byte. *max_dev is
 * the largest |w - dequant| / |block absmax| (|w| for a zero absmax): the caller decides whether
 * w really came from this state (0 for an exact f32 round trip; a bf16/f16/q8_0 copy stays well
 * below 0.01, unrelated weights are near 0.05 or more). QLR_ERR_INVALID for a bad shape,
 * QLR_ERR_NOMEM. */
qlr_status qlr_nf4_from_state(const float *w, int64_t rows, int64_t cols, const qlr_nf4_state *s,
                              qlr_nf4 *out, float *max_dev);

/* Quantization error of a store against the float data it was made from (`qlora inspect
 * --nf4`). Non-finite originals are skipped and counted. */
typedef struct qlr_nf4_err {
    double rms_err;      /* sqrt(mean (dequant - x)^2) */
    double rms_ref;      /* sqrt(mean x^2) */
    double rel_rms_err;  /* rms_err / rms_ref (0 when rms_ref is 0); ~0.1 for Gaussian data */
    double max_abs_err;  /* max |dequant - x| */
    double max_rel_err;  /* max |dequant - x| / |x| over x != 0 (about 1 for values that round
                            to the zero code or up from just above a zero threshold) */
    int64_t n_nonfinite; /* NaN/inf elements in the original */
} qlr_nf4_err;
/* Fills *out (threaded). `orig` holds q->n floats. Returns QLR_ERR_NOMEM or QLR_OK. */
qlr_status qlr_nf4_error_stats(const qlr_nf4 *q, const float *orig, qlr_nf4_err *out);

#endif
