/* model/export_gguf.h: a loaded model written back as a llama.cpp GGUF: the weights qlora runs
 * (decoder linears dequantized from the NF4 store, embeddings as their bf16 values, norms and
 * biases f32), Q/K rows permuted back to llama.cpp's order (llama arch, spec §4.6), in the
 * source GGUF's tensor order, names and shapes, with every metadata key of the source (tokenizer,
 * chat template, hyper-parameters) copied. Optionally a delta is added to each linear first (a
 * merged adapter: adapters/ provides it), and the linears are quantized to one of ggml's types
 * (quant/ggml_quants.h) with llama.cpp's per-tensor mixes. Used by `qlora export-base --format
 * gguf` (with the NF4 scale state recorded, so that our loader rebuilds the very store) and
 * `qlora export --merge`. It does not own adapters, or the HF export (tools.c). */
#ifndef QLR_MODEL_EXPORT_GGUF_H
#define QLR_MODEL_EXPORT_GGUF_H

#include <stdint.h>

#include "formats/gguf.h"
#include "model/model.h"

/* Output types: a llama.cpp "file type" (general.file_type). */
typedef enum qlr_export_type {
    QLR_EXPORT_F32 = 0, /* every 2-D weight F32 */
    QLR_EXPORT_F16,     /* F16 */
    QLR_EXPORT_BF16,    /* BF16 */
    QLR_EXPORT_Q8_0,    /* Q8_0 (F16 where a row is not a multiple of 32) */
    QLR_EXPORT_Q6_K,    /* Q6_K, output/tied embedding Q6_K; rows not a multiple of 256: Q8_0 */
    QLR_EXPORT_Q4_K_M,  /* llama.cpp's Q4_K_M mix (qlr_export_tensor_type) */
    QLR_EXPORT_COUNT
} qlr_export_type;

/* "f32", "f16", "bf16", "q8_0", "q6_k", "q4_k_m". */
const char *qlr_export_type_name(qlr_export_type t);
/* By name (case-insensitive); QLR_ERR_INVALID listing the names. */
qlr_status qlr_export_type_parse(const char *s, qlr_export_type *out);
/* The general.file_type value llama.cpp gives the type (0, 1, 32, 7, 18, 15). */
uint32_t qlr_export_file_type(qlr_export_type t);

/* The ggml type of one tensor under `t`, as llama.cpp's quantizer chooses it (facts read from
 * llama.cpp's src/llama-quant.cpp, rules restated here): 1-D tensors F32; F32/F16/BF16 as named;
 * Q8_0 everywhere (F16 when ne0 % 32). Q6_K and Q4_K_M: the output head, or token_embd when the
 * embeddings are tied (no output.weight), gets Q6_K (Q8_0 when ne0 % 256); Q4_K_M otherwise
 * Q4_K except attn_v and ffn_down of the layers where use_more_bits(layer, n_layers) holds
 * (layer < n/8, layer >= 7n/8, or (layer - n/8) % 3 == 2), which get Q6_K. Then a k-quant whose
 * rows are not a multiple of 256 falls back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0
 * (-> F16 when ne0 % 32). `layer` is -1 for tensors outside the blocks. */
uint32_t qlr_export_tensor_type(qlr_export_type t, const char *name, int32_t layer, int32_t n_layers,
                                uint64_t ne0, uint32_t n_dims, int tied_embeddings);

/* Adds the merged delta to linear (layer, id): w [rows, cols] f32, HF row order (before the Q/K
 * permutation). */
typedef qlr_status (*qlr_export_delta_fn)(void *ud, int32_t layer, qlr_linear_id id, float *w,
                                          int64_t rows, int64_t cols);
/* Adds extra metadata keys (called after the copied ones). */
typedef qlr_status (*qlr_export_meta_fn)(void *ud, qlr_gguf_writer *w);

typedef struct qlr_export_gguf_params {
    qlr_export_type type;       /* default QLR_EXPORT_F16 */
    int nf4_state;              /* 1: record qlora.nf4.* (the scale state of every linear, and
                                   the store's hash) so that our loader rebuilds the store byte
                                   for byte; only without a delta (default 0) */
    qlr_export_delta_fn delta;  /* NULL: the base as loaded */
    void *delta_ud;
    qlr_export_meta_fn meta;    /* NULL: none */
    void *meta_ud;
    int progress;               /* progress bar on stderr (default 0) */
} qlr_export_gguf_params;

qlr_export_gguf_params qlr_export_gguf_params_default(void);

/* What a write did. */
typedef struct qlr_export_stats {
    uint64_t bytes;             /* file size */
    int64_t n_tensors;
    int64_t n_by_type[64];      /* tensors per ggml type id (< 64) */
    int64_t n_fallback;         /* tensors written in another type than the mix gives rows of a
                                   multiple of 256 (k-quants fall back to Q5_0 / Q8_0) */
    int64_t n_copied;           /* source tensors copied as they are (not run by qlora) */
} qlr_export_stats;

/* Writes `m` to `path` atomically. The model must have been loaded from a GGUF file
 * (m->source) with all its layers, on a host-visible backend (cpu); other cases are
 * QLR_ERR_UNSUPPORTED with the reason. Memory: the largest tensor twice (f32 + encoded).
 * Errors of the source re-read, the delta, the quantizers and the writer, naming the tensor. */
qlr_status qlr_model_export_gguf(const qlr_model *m, const char *path, const qlr_export_gguf_params *p,
                                 qlr_export_stats *stats);

#endif
