/* formats/ggml_types.c: the table of ggml tensor types this tree knows (FORMATS.md §3.5):
 * name, elements per block and bytes per block, plus the row-size arithmetic built on it.
 * It owns no dequantization (quant/ does that); it only answers "how many bytes is this". */
#include "formats/gguf.h"

typedef struct ggml_type_info {
    const char *name;
    uint32_t block; /* elements per block */
    uint32_t size;  /* bytes per block */
} ggml_type_info;

/* Indexed by ggml type id; ids missing here (retired, IQ*, TQ*) are unknown to us. */
static const ggml_type_info g_types[] = {
    [QLR_GGML_F32] = {"F32", 1, 4},
    [QLR_GGML_F16] = {"F16", 1, 2},
    [QLR_GGML_Q4_0] = {"Q4_0", 32, 18},   /* d f16, qs[16] */
    [QLR_GGML_Q4_1] = {"Q4_1", 32, 20},   /* d, m f16, qs[16] */
    [QLR_GGML_Q5_0] = {"Q5_0", 32, 22},   /* d f16, qh[4], qs[16] */
    [QLR_GGML_Q5_1] = {"Q5_1", 32, 24},   /* d, m f16, qh[4], qs[16] */
    [QLR_GGML_Q8_0] = {"Q8_0", 32, 34},   /* d f16, qs[32] */
    [QLR_GGML_Q8_1] = {"Q8_1", 32, 36},   /* d, s f16, qs[32] */
    [QLR_GGML_Q2_K] = {"Q2_K", 256, 84},  /* scales[16], qs[64], d, dmin */
    [QLR_GGML_Q3_K] = {"Q3_K", 256, 110}, /* hmask[32], qs[64], scales[12], d */
    [QLR_GGML_Q4_K] = {"Q4_K", 256, 144}, /* d, dmin, scales[12], qs[128] */
    [QLR_GGML_Q5_K] = {"Q5_K", 256, 176}, /* d, dmin, scales[12], qh[32], qs[128] */
    [QLR_GGML_Q6_K] = {"Q6_K", 256, 210}, /* ql[128], qh[64], scales[16], d */
    [QLR_GGML_Q8_K] = {"Q8_K", 256, 292}, /* d f32, qs[256], bsums i16[16] */
    [QLR_GGML_I8] = {"I8", 1, 1},
    [QLR_GGML_I16] = {"I16", 1, 2},
    [QLR_GGML_I32] = {"I32", 1, 4},
    [QLR_GGML_I64] = {"I64", 1, 8},
    [QLR_GGML_F64] = {"F64", 1, 8},
    [QLR_GGML_BF16] = {"BF16", 1, 2},
};

static const ggml_type_info *type_info(uint32_t type) {
    if (type >= sizeof g_types / sizeof g_types[0] || !g_types[type].name) return NULL;
    return &g_types[type];
}

const char *qlr_ggml_type_name(uint32_t type) {
    const ggml_type_info *t = type_info(type);
    return t ? t->name : NULL;
}

uint32_t qlr_ggml_block_size(uint32_t type) {
    const ggml_type_info *t = type_info(type);
    return t ? t->block : 0;
}

uint32_t qlr_ggml_type_size(uint32_t type) {
    const ggml_type_info *t = type_info(type);
    return t ? t->size : 0;
}

uint64_t qlr_ggml_row_size(uint32_t type, uint64_t ne0) {
    const ggml_type_info *t = type_info(type);
    if (!t || ne0 % t->block) return 0;
    uint64_t blocks = ne0 / t->block;
    if (blocks > UINT64_MAX / t->size) return 0;
    return blocks * t->size;
}
