/* model/loader_hf.c: loading an HF checkpoint folder (config.json + safetensors). */
#include "model/model_internal.h"

qlr_status qlr_model_load_hf(const char *dir, qlr_model *m, const qlr_model_load_params *p) {
    return qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: HF checkpoint folders are not supported yet; "
                      "use a .gguf file", dir);
}
