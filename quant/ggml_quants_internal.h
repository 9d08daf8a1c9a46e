/* quant/ggml_quants_internal.h: the block quantizers ggml_quants.c dispatches to that live in
 * other files of quant/ (ggml_kquants.c); not for other modules. Each writes nb blocks of x. */
#ifndef QLR_QUANT_GGML_QUANTS_INTERNAL_H
#define QLR_QUANT_GGML_QUANTS_INTERNAL_H

#include <stdint.h>

void qlr_ggml_qz_q6_k(const float *x, int64_t nb, uint8_t *s); /* 256 values -> 210 bytes */
void qlr_ggml_qz_q4_k(const float *x, int64_t nb, uint8_t *s); /* 256 values -> 144 bytes */

#endif
