/* model/model_internal.h: helpers shared by the model's files (loaders, export); not public. */
#ifndef QLR_MODEL_INTERNAL_H
#define QLR_MODEL_INTERNAL_H

#include "model/model.h"

/* Device uploads that also count bytes on the model. upload_bf16 converts buf in place. */
qlr_status qlr_model_upload_f32(qlr_model *m, const float *src, int64_t n, float **out);
qlr_status qlr_model_upload_bf16(qlr_model *m, float *buf, int64_t n, uint16_t **out);
/* Quantizes w [rows, cols] to NF4 and uploads it; *hash = qlr_nf4_hash of the store. */
qlr_status qlr_model_upload_nf4(qlr_model *m, const float *w, int64_t rows, int64_t cols, int dq,
                                qlr_nf4 *out, uint64_t *hash);
/* Uploads a host store made elsewhere (the loader's rebuild from a recorded state), moving its
 * buffers on a host-visible backend (free `host` after, as usual); *hash = qlr_nf4_hash. */
qlr_status qlr_model_upload_nf4_store(qlr_model *m, qlr_nf4 *host, qlr_nf4 *out, uint64_t *hash);
/* HF folder (config.json + safetensors); loader_hf.c. */
qlr_status qlr_model_load_hf(const char *dir, qlr_model *m, const qlr_model_load_params *p);

#endif
