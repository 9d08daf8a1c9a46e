/* formats/safetensors.h: safetensors reader, sharded-set reader and writer
 * (docs/FORMATS.md §6).
 *
 * The reader maps the file and validates it exactly as the Rust reference reader does before
 * anything is exposed: header length bounded and inside the file, a JSON object starting with
 * '{', no duplicate keys, every tensor with a known dtype, a non-negative integer shape whose
 * byte size does not overflow and equals end - begin, offsets dense from 0 with no gap or
 * overlap, no trailing bytes, __metadata__ string -> string. A corrupt file gets a status and
 * a message naming the file and the tensor; never a crash. Tensors are exposed without copying.
 * A sharded checkpoint (folder or model.safetensors.index.json) opens as one logical set.
 * The writer lays files out as the reference writer does, so our output is byte-identical to
 * Python's safetensors.save_file for the same tensors and metadata. */
#ifndef QLR_FORMATS_SAFETENSORS_H
#define QLR_FORMATS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/dtype.h"
#include "core/status.h"

/* Header size limit of the reference reader. */
#define QLR_ST_MAX_HEADER_SIZE 100000000ull

/* dtypes in the reference enum's order, which is ascending alignment: the writer sorts by this
 * order descending, then by name. */
typedef enum qlr_st_dtype {
    QLR_ST_BOOL = 0,
    QLR_ST_F4,
    QLR_ST_F6_E2M3,
    QLR_ST_F6_E3M2,
    QLR_ST_U8,
    QLR_ST_I8,
    QLR_ST_F8_E5M2,
    QLR_ST_F8_E4M3,
    QLR_ST_F8_E8M0,
    QLR_ST_F8_E4M3FNUZ,
    QLR_ST_F8_E5M2FNUZ,
    QLR_ST_I16,
    QLR_ST_U16,
    QLR_ST_F16,
    QLR_ST_BF16,
    QLR_ST_I32,
    QLR_ST_U32,
    QLR_ST_F32,
    QLR_ST_C64,
    QLR_ST_F64,
    QLR_ST_I64,
    QLR_ST_U64,
    QLR_ST_DTYPE_COUNT
} qlr_st_dtype;

/* "F32", "BF16", ... or NULL for an out-of-range value. */
const char *qlr_st_dtype_name(qlr_st_dtype t);
/* Parses a dtype string; returns 0 and leaves *out unchanged if unknown. */
int qlr_st_dtype_parse(const char *s, qlr_st_dtype *out);
/* Bits per element (4 for F4, 6 for F6_*, 64 for C64); 0 for an out-of-range value. */
uint32_t qlr_st_dtype_bits(qlr_st_dtype t);
/* The core dtype with the same bytes (F32 F16 BF16 I32 I64 U8 I8 F64); 0 if there is none. */
int qlr_st_dtype_to_core(qlr_st_dtype t, qlr_dtype *out);
/* The reverse (every core dtype has one). */
qlr_st_dtype qlr_st_dtype_from_core(qlr_dtype t);

typedef struct qlr_st_tensor {
    const char *name;      /* owned by the file/set */
    qlr_st_dtype dtype;
    uint32_t n_dims;       /* 0 for a scalar */
    const uint64_t *shape; /* [n_dims], PyTorch order (last dim contiguous); NULL if n_dims 0 */
    uint64_t numel;        /* product of shape (1 for a scalar, 0 if any dim is 0) */
    uint64_t offset;       /* begin, relative to the data buffer */
    uint64_t nbytes;       /* end - begin */
    const void *data;      /* into the mapping (valid until close); the buffer start if empty */
    uint32_t file;         /* index of the shard holding it (0 for a single file) */
} qlr_st_tensor;

/* ---- one file -------------------------------------------------------------------------- */

typedef struct qlr_safetensors qlr_safetensors;

/* Maps and validates `path`. QLR_ERR_IO if it cannot be opened, QLR_ERR_FORMAT (message names
 * the file, the tensor and the rule) if it is not a valid safetensors file. *out is NULL on
 * failure. */
qlr_status qlr_safetensors_open(const char *path, qlr_safetensors **out);
/* Validates `size` bytes at `data` that the caller keeps alive and unchanged until close; `name`
 * stands for the path in messages. Same errors as qlr_safetensors_open. */
qlr_status qlr_safetensors_open_buffer(const void *data, size_t size, const char *name,
                                       qlr_safetensors **out);
/* Frees everything (NULL is fine). Tensor pointers die with the file. */
void qlr_safetensors_close(qlr_safetensors *f);

/* Tensors ordered by data offset (file order). */
size_t qlr_safetensors_count(const qlr_safetensors *f);
/* NULL when i >= count. */
const qlr_st_tensor *qlr_safetensors_tensor(const qlr_safetensors *f, size_t i);
/* By exact name; NULL (no error recorded) when absent. */
const qlr_st_tensor *qlr_safetensors_find(const qlr_safetensors *f, const char *name);
/* __metadata__ value of `key`, or NULL. */
const char *qlr_safetensors_metadata(const qlr_safetensors *f, const char *key);
/* __metadata__ entries in key order; i < count. */
size_t qlr_safetensors_metadata_count(const qlr_safetensors *f);
void qlr_safetensors_metadata_at(const qlr_safetensors *f, size_t i, const char **key,
                                 const char **value);
/* N (the header length) and the file size. */
uint64_t qlr_safetensors_header_size(const qlr_safetensors *f);
uint64_t qlr_safetensors_file_size(const qlr_safetensors *f);
const char *qlr_safetensors_path(const qlr_safetensors *f);

/* ---- sharded sets ---------------------------------------------------------------------- */

typedef struct qlr_st_set qlr_st_set;

/* Opens a checkpoint as one logical set of tensors. `path` is
 *  - a *.index.json file: its "weight_map" (tensor name -> shard file name, relative to the
 *    index's folder) is the set; every shard must exist and validate, every mapped tensor must
 *    be in its shard (tensors of a shard that the map does not name are ignored with a warning);
 *  - a folder: its model.safetensors.index.json, else its only *.safetensors.index.json, else
 *    all its *.safetensors files (a name found in two files is refused);
 *  - a single .safetensors file (a set of one).
 * Errors name the index, the shard and the tensor. *out is NULL on failure. */
qlr_status qlr_st_set_open(const char *path, qlr_st_set **out);
void qlr_st_set_close(qlr_st_set *s);
/* Tensors ordered by (shard, offset). */
size_t qlr_st_set_count(const qlr_st_set *s);
const qlr_st_tensor *qlr_st_set_tensor(const qlr_st_set *s, size_t i);
const qlr_st_tensor *qlr_st_set_find(const qlr_st_set *s, const char *name);
/* Shards (files), in the order their index is t->file. */
size_t qlr_st_set_n_files(const qlr_st_set *s);
const qlr_safetensors *qlr_st_set_file(const qlr_st_set *s, size_t i);
/* The index file used, or NULL when the set came from a folder listing or a single file. */
const char *qlr_st_set_index_path(const qlr_st_set *s);

/* ---- writer ---------------------------------------------------------------------------- */

typedef struct qlr_st_writer qlr_st_writer;

/* A new empty writer; NULL (with an error recorded) on allocation failure. */
qlr_st_writer *qlr_st_writer_create(void);
void qlr_st_writer_free(qlr_st_writer *w);
/* Adds (or replaces) a __metadata__ entry. Strings are copied. */
qlr_status qlr_st_writer_set_metadata(qlr_st_writer *w, const char *key, const char *value);
/* Adds a tensor. `name` and `shape` are copied; `data` (nbytes bytes, little-endian, row-major)
 * must stay valid until qlr_st_writer_write returns. QLR_ERR_INVALID for a name that is not
 * UTF-8 or is "__metadata__" (an empty name is valid, as in the reference reader), a duplicate name, an unknown dtype, or nbytes != numel * size (or a size
 * that is not whole bytes or overflows). */
qlr_status qlr_st_writer_add(qlr_st_writer *w, const char *name, qlr_st_dtype dtype,
                             uint32_t n_dims, const uint64_t *shape, const void *data,
                             uint64_t nbytes);
/* Writes the file atomically: tensors sorted by dtype (qlr_st_dtype order, descending) then
 * name, packed back-to-back; header = compact JSON with __metadata__ first (only when there is
 * metadata), padded with spaces to a multiple of 8. The writer can be written again. */
qlr_status qlr_st_writer_write(qlr_st_writer *w, const char *path);
/* The header bytes (length prefix excluded) that qlr_st_writer_write would produce, malloc'ed. */
qlr_status qlr_st_writer_header(qlr_st_writer *w, char **out, size_t *n);

/* ---- inspect --------------------------------------------------------------------------- */

/* Opens `path` (a file, a folder or an index, as qlr_st_set_open) and prints to `out`: the
 * files, the metadata, each tensor's name, dtype, shape and bytes (the first 20 per file unless
 * `all`), totals, and "valid" at the end. On failure prints nothing after the error and returns
 * the status (the message is the current error). */
qlr_status qlr_safetensors_print_summary(FILE *out, const char *path, int all);

/* 1 if the first `n` (>= 9) bytes look like a safetensors file (an 8-byte LE length, then '{'),
 * else 0. The length is not checked, so that a bad one reaches the reader and its message. Used by `qlora inspect` to dispatch on content. */
int qlr_safetensors_sniff(const void *head, size_t n);

#endif
