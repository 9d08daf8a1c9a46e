/* model/ggml_bridge.c: the loader's access to quant/ggml_quants.h, in a translation unit of its
 * own because formats/gguf.h declares the same ggml type enumerators. */
#include "model/model_internal.h"
#include "quant/ggml_quants.h"

qlr_status qlr_model_ggml_check(uint32_t type) { return qlr_ggml_type_check(type); }

qlr_status qlr_model_ggml_dequant(uint32_t type, const void *src, size_t bytes, int64_t ne0,
                                  int64_t nrows, float *dst) {
    return qlr_ggml_dequant(type, src, bytes, ne0, nrows, dst);
}

const char *qlr_model_ggml_type_name(uint32_t type) { return qlr_ggml_type_name(type); }
