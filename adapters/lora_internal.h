/* adapters/lora_internal.h: helpers lora.c gives the format files (lora_gguf.c, lora_peft.c),
 * and the in-memory loaders of tests/fuzz/fuzz_adapter.c; not for other modules. */
#ifndef QLR_ADAPTERS_LORA_INTERNAL_H
#define QLR_ADAPTERS_LORA_INTERNAL_H

#include "adapters/lora.h"

/* Allocates an adapter with the given layer count and per-(layer, module) presence/shape
 * (shapes[layer*7+id] = {out, in}, 0 = absent); tensors zeroed. */
qlr_status qlr_lora_alloc_(const qlr_lora_base *base, int32_t n_layers, int32_t r,
                           const int32_t (*shapes)[2], qlr_lora **out);
/* Sets the hyper-parameters and derived scale/targets after allocation. */
void qlr_lora_finish_(qlr_lora *l, double alpha, double dropout, int use_rslora);
/* Fills base fields that are 0/"" in l->base from `base` after a successful check. */
void qlr_lora_adopt_base_(qlr_lora *l, const qlr_lora_base *base);

/* Parses 16 hex digits (a recorded nf4 hash). QLR_ERR_FORMAT otherwise (no message set). */
qlr_status qlr_lora_parse_hash_(const char *hex, uint64_t *out);

/* check_base with tensor names in GGUF (peft 0) or PEFT (peft 1) naming. */
qlr_status qlr_lora_check_base_(const qlr_lora *l, const qlr_lora_base *base, const char *src, int peft);
/* "blk.3.attn_q.weight.lora_b" or "base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"
 * (half 0 = A, 1 = B). */
void qlr_lora_tensor_name_(char *buf, size_t n, int peft, int32_t layer, qlr_linear_id id, int half);

/* The loaders on bytes in memory (the fuzz target's entry points; the file loaders of lora.h do
 * the same checks). PEFT: an adapter_config.json text and an adapter_model.safetensors image. */
qlr_status qlr_lora_load_peft_mem_(const void *cfg_text, size_t cfg_size, const void *st_data, size_t st_size,
                                   const qlr_lora_base *base, qlr_lora **out);
qlr_status qlr_lora_load_gguf_mem_(const void *data, size_t size, const char *name, const qlr_lora_base *base,
                                   qlr_lora **out);

#endif
