/* quant/dynmap.h: bitsandbytes' 8-bit dynamic maps (spec §2.2) and blockwise 8-bit
 * quantization over a 256-entry map: the scheme of NF4 double quantization (signed map, block
 * 256) and of the 8-bit AdamW states (signed map for m, unsigned for v, block 256). The tables
 * themselves (qlr_dynmap_signed / qlr_dynmap_unsigned, bitsandbytes' own values as measured, see
 * tests/data/quant/bnb_dynmap.txt) and qlr_dynmap_nearest are declared in quant/nf4.h. */
#ifndef QLR_QUANT_DYNMAP_H
#define QLR_QUANT_DYNMAP_H

#include <stdint.h>

#include "core/status.h"

/* Emulates bnb's create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) in float32
 * (torch.linspace's scalar path), sorted ascending: the §2.2 algorithm, equal to spec Appendix A.
 * It is NOT the table in use: it is within 2 ulps of qlr_dynmap_signed / qlr_dynmap_unsigned
 * (bnb's measured values) but differs from them in 42 / 31 entries. Cannot fail. */
void qlr_dynmap_create(int is_signed, float out[256]);

/* bitsandbytes' CUDA search for the code of x over a 256-entry ascending map (dQuantize<0> of
 * csrc/kernels.cu): nearest entry by float32 midpoints; on an exact midpoint the even index
 * wins (the bucketize rule of qlr_dynmap_nearest takes the lower one); NaN gives 0. */
uint8_t qlr_dynmap_quantize_bnb(const float *map, float x);

/* Blockwise 8-bit quantization of x[n] over `map` (256 entries, ascending), as bnb's CUDA
 * kQuantizeBlockwise does it: absmax[b] = max |x| over block b (float32, NaN ignored, from
 * -FLT_MAX, and a partial last block also counts the zeros bnb pads it with; length
 * ceil(n/block)), and codes[i] = qlr_dynmap_quantize_bnb(map, x[i] * (1/absmax[b])) (multiply by
 * the float32 reciprocal). A block whose absmax is 0 gets code 0 (0 * inf = NaN; decodes to
 * -0). Threaded. Returns QLR_ERR_INVALID if n < 0 or block <= 0; otherwise QLR_OK. */
qlr_status qlr_blockwise8_quantize(const float *x, int64_t n, int block, const float *map,
                                   uint8_t *codes, float *absmax);

/* Inverse: out[i] = map[codes[i]] * absmax[i / block] (float32). Threaded. Returns
 * QLR_ERR_INVALID if n < 0 or block <= 0; otherwise QLR_OK. */
qlr_status qlr_blockwise8_dequant(const uint8_t *codes, int64_t n, int block, const float *map,
                                  const float *absmax, float *out);

#endif
