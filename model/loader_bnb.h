/* model/loader_bnb.h: bitsandbytes 4-bit (Linear4bit) weights in HF safetensors checkpoints
 * (docs/FORMATS.md §1.7), taken into the NF4 store exactly as stored: the packed
 * codes, the (double-quantized) absmax and the nested absmax/offset are copied byte for byte,
 * never re-quantized. Used by model/loader_hf.c; not public. */
#ifndef QLR_MODEL_LOADER_BNB_H
#define QLR_MODEL_LOADER_BNB_H

#include <stdint.h>

#include "formats/safetensors.h"
#include "model/model_internal.h"

/* 1 if `weight` ("<prefix>.weight") has bitsandbytes quant-state keys beside it in the set
 * (`<weight>.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map`,
 * `.quant_state.bitsandbytes__nf4` or `__fp4`), i.e. it is (meant to be) a 4-bit weight. */
int qlr_bnb_has_quant_state(const qlr_st_set *s, const char *weight);

/* Checks config.json's "quantization_config" if there is one: quant_method must be
 * "bitsandbytes" and not 8-bit (load_in_8bit); anything else is QLR_ERR_UNSUPPORTED naming the
 * method. No quantization_config is fine (the tensors decide). *is_bnb4 (may be NULL) is set
 * to 1 when the config declares bitsandbytes 4-bit. */
qlr_status qlr_bnb_check_config(const char *config_path, int *is_bnb4);

/* Validates the bnb 4-bit weight `weight` that must be [rows, cols] and fills *out with a
 * host view whose pointers point INTO the set's mapping (owned = 0; valid while the set is
 * open; the float arrays may be unaligned, so the view is for byte copies such as
 * qlr_backend_nf4_upload, not for arithmetic). Checked: the quant_state JSON blob (object;
 * quant_type "nf4" — fp4 refused by name; blocksize 64 — others QLR_ERR_UNSUPPORTED; dtype
 * float32/float16/bfloat16; shape == [rows, cols]; when nested nested_blocksize 256,
 * nested_dtype float32, nested_offset finite), every tensor's dtype and size against the shape
 * (overflow-checked), quant_map == the NF4 table and nested_quant_map == the signed dynamic map
 * (qlr_dynmap_signed, bitsandbytes' own values), both bit for bit: the CPU and CUDA backends
 * decode with the built-in maps, so a map that differs in any entry (even by one ulp) is
 * refused with QLR_ERR_UNSUPPORTED naming the key and the first differing entry. `src` (the folder) starts every message; messages name the weight and the key.
 * The nested state is the store's dq = 1 form; a non-nested one gives dq = 0 (f32 absmax). */
qlr_status qlr_bnb_nf4_view(const qlr_st_set *s, const char *src, const char *weight, int64_t rows,
                            int64_t cols, qlr_nf4 *out);

/* qlr_bnb_nf4_view + upload to the model's backend (a byte copy) + the model's byte count. */
qlr_status qlr_model_upload_bnb(qlr_model *m, const qlr_st_set *s, const char *src,
                                const char *weight, int64_t rows, int64_t cols, qlr_nf4 *out,
                                uint64_t *hash);

#endif
