/* formats/gguf.h: GGUF v2/v3 reader and writer (docs/FORMATS.md §3).
 *
 * The reader maps the file, validates everything before anything is used (counts against the
 * bytes that remain, string lengths, types, dimensions, sizes, dense aligned offsets, overflow)
 * and then exposes metadata and tensors without copying. A corrupt or hostile file gets a
 * status and a message naming the byte offset and the key or tensor; never a crash and never
 * an allocation larger than the file justifies. The writer produces files exactly as ggml and
 * gguf-py expect: dense offsets in tensor-info order, zero padding to the alignment after
 * every tensor (the last included). */
#ifndef QLR_FORMATS_GGUF_H
#define QLR_FORMATS_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "quant/ggml_quants.h"

/* Metadata value types (§3.2). */
typedef enum qlr_gguf_type {
    QLR_GGUF_UINT8 = 0,
    QLR_GGUF_INT8 = 1,
    QLR_GGUF_UINT16 = 2,
    QLR_GGUF_INT16 = 3,
    QLR_GGUF_UINT32 = 4,
    QLR_GGUF_INT32 = 5,
    QLR_GGUF_FLOAT32 = 6,
    QLR_GGUF_BOOL = 7,
    QLR_GGUF_STRING = 8,
    QLR_GGUF_ARRAY = 9,
    QLR_GGUF_UINT64 = 10,
    QLR_GGUF_INT64 = 11,
    QLR_GGUF_FLOAT64 = 12,
    QLR_GGUF_TYPE_COUNT
} qlr_gguf_type;

/* ggml type ids, names and block layouts live in quant/ggml_quants.h (qlr_ggml_type_name,
 * qlr_ggml_block_elems, qlr_ggml_block_bytes). */

#define QLR_GGUF_MAX_DIMS 4
#define QLR_GGUF_DEFAULT_ALIGNMENT 32

typedef struct qlr_gguf_tensor {
    const char *name;             /* NUL-terminated copy owned by the reader */
    uint32_t type;                /* qlr_ggml_type */
    uint32_t n_dims;
    uint64_t ne[QLR_GGUF_MAX_DIMS]; /* ne[0] contiguous; unused dims are 1 */
    uint64_t offset;              /* relative to the data blob */
    uint64_t size;                /* bytes */
    const void *data;             /* points into the mapping */
} qlr_gguf_tensor;

typedef struct qlr_gguf qlr_gguf;

/* Opens and validates a GGUF file (mmap). On failure *out is NULL and the message starts with
 * the path. */
qlr_status qlr_gguf_open(const char *path, qlr_gguf **out);
/* Same over a caller-owned buffer that must outlive the reader (fuzzing, tests). */
qlr_status qlr_gguf_open_mem(const void *data, size_t size, const char *name, qlr_gguf **out);
void qlr_gguf_close(qlr_gguf *g);

uint32_t qlr_gguf_version(const qlr_gguf *g);
uint32_t qlr_gguf_alignment(const qlr_gguf *g);
uint64_t qlr_gguf_data_offset(const qlr_gguf *g); /* file offset of the data blob */
const char *qlr_gguf_path(const qlr_gguf *g);

/* Metadata. Keys are looked up by exact name; index-based access for listing. */
int64_t qlr_gguf_n_kv(const qlr_gguf *g);
const char *qlr_gguf_kv_key(const qlr_gguf *g, int64_t i);
qlr_gguf_type qlr_gguf_kv_type(const qlr_gguf *g, int64_t i);
int64_t qlr_gguf_find_key(const qlr_gguf *g, const char *key); /* -1 if absent */

/* Typed getters. QLR_ERR_NOT_FOUND if the key is absent, QLR_ERR_FORMAT (message names the key,
 * the stored type and the wanted type) if it has another type. get_uint accepts any unsigned or
 * non-negative signed integer type and checks the range; get_float accepts F32 and F64. */
qlr_status qlr_gguf_get_u32(const qlr_gguf *g, const char *key, uint32_t *out);
qlr_status qlr_gguf_get_uint(const qlr_gguf *g, const char *key, uint64_t *out);
qlr_status qlr_gguf_get_i32(const qlr_gguf *g, const char *key, int32_t *out);
qlr_status qlr_gguf_get_f32(const qlr_gguf *g, const char *key, float *out);
qlr_status qlr_gguf_get_float(const qlr_gguf *g, const char *key, double *out);
qlr_status qlr_gguf_get_bool(const qlr_gguf *g, const char *key, int *out);
/* String values point into the mapping: not NUL-terminated, use the length. */
qlr_status qlr_gguf_get_str(const qlr_gguf *g, const char *key, const char **s, uint64_t *len);

/* Arrays: element type and count, then typed access. For numeric arrays `data` points at the
 * packed little-endian elements inside the mapping (possibly unaligned: use memcpy). */
qlr_status qlr_gguf_get_arr(const qlr_gguf *g, const char *key, qlr_gguf_type *elem_type,
                            uint64_t *n, const void **data);
/* The i-th string of a string array (O(1): the reader keeps an index of offsets). */
qlr_status qlr_gguf_get_arr_str(const qlr_gguf *g, const char *key, uint64_t i, const char **s,
                                uint64_t *len);
/* By kv index, for listing (type must match). */
qlr_status qlr_gguf_kv_arr(const qlr_gguf *g, int64_t kv, qlr_gguf_type *elem_type, uint64_t *n,
                           const void **data);
qlr_status qlr_gguf_kv_arr_str(const qlr_gguf *g, int64_t kv, uint64_t i, const char **s,
                               uint64_t *len);
/* Raw scalar value bytes for a kv (for printing); NULL for arrays. For STRING it points at the
 * uint64 length prefix: use qlr_gguf_kv_str instead. */
const void *qlr_gguf_kv_scalar(const qlr_gguf *g, int64_t kv);
qlr_status qlr_gguf_kv_str(const qlr_gguf *g, int64_t kv, const char **s, uint64_t *len);

/* Tensors. */
int64_t qlr_gguf_n_tensors(const qlr_gguf *g);
const qlr_gguf_tensor *qlr_gguf_tensor_at(const qlr_gguf *g, int64_t i);
const qlr_gguf_tensor *qlr_gguf_find_tensor(const qlr_gguf *g, const char *name); /* NULL if absent */

/* ---- writer ---- */

typedef struct qlr_gguf_writer qlr_gguf_writer;

/* alignment 0 = default 32 (then general.alignment is not written). */
qlr_gguf_writer *qlr_gguf_writer_create(uint32_t alignment);
void qlr_gguf_writer_free(qlr_gguf_writer *w);

/* Metadata setters copy their arguments. Adding a key twice is an error (QLR_ERR_INVALID). */
qlr_status qlr_gguf_set_u32(qlr_gguf_writer *w, const char *key, uint32_t v);
qlr_status qlr_gguf_set_i32(qlr_gguf_writer *w, const char *key, int32_t v);
qlr_status qlr_gguf_set_u64(qlr_gguf_writer *w, const char *key, uint64_t v);
qlr_status qlr_gguf_set_f32(qlr_gguf_writer *w, const char *key, float v);
qlr_status qlr_gguf_set_f64(qlr_gguf_writer *w, const char *key, double v);
qlr_status qlr_gguf_set_bool(qlr_gguf_writer *w, const char *key, int v);
qlr_status qlr_gguf_set_str(qlr_gguf_writer *w, const char *key, const char *s);
/* Numeric array of `n` elements of `elem_type` packed in `data`. */
qlr_status qlr_gguf_set_arr(qlr_gguf_writer *w, const char *key, qlr_gguf_type elem_type,
                            const void *data, uint64_t n);
qlr_status qlr_gguf_set_arr_str(qlr_gguf_writer *w, const char *key, const char *const *strs,
                                uint64_t n);
/* Copies the kv at index `kv` of a reader (any type, arrays included). */
qlr_status qlr_gguf_copy_kv(qlr_gguf_writer *w, const qlr_gguf *src, int64_t kv);

/* Adds a tensor. `data` (size bytes, must equal the size implied by type and ne) is NOT
 * copied: it must stay valid until qlr_gguf_writer_write returns. */
qlr_status qlr_gguf_add_tensor(qlr_gguf_writer *w, const char *name, uint32_t type,
                               uint32_t n_dims, const uint64_t *ne, const void *data, uint64_t size);

/* Fills `out` (exactly `size` bytes) with the data of tensor `name` when the writer reaches it.
 * A non-OK status stops the write (the file is not created) and is returned by
 * qlr_gguf_writer_write with the tensor's name prefixed. */
typedef qlr_status (*qlr_gguf_fill_fn)(void *ud, const char *name, void *out, uint64_t size);
/* Adds a tensor whose data is produced at write time by `fill` (called once, in tensor order,
 * with a writer-owned buffer reused between tensors): a file of any size is written with the
 * memory of its largest tensor. Checks as qlr_gguf_add_tensor. */
qlr_status qlr_gguf_add_tensor_fill(qlr_gguf_writer *w, const char *name, uint32_t type,
                                    uint32_t n_dims, const uint64_t *ne, uint64_t size,
                                    qlr_gguf_fill_fn fill, void *ud);

/* Writes the file atomically (core/file.h). */
qlr_status qlr_gguf_writer_write(qlr_gguf_writer *w, const char *path);

/* ---- additions (after the first version of this header) ---- */

/* Name of a metadata value type ("UINT32", "STRING", "ARRAY", ...) or NULL for an unknown id. */
const char *qlr_gguf_type_name(uint32_t type);
/* Bytes of a scalar metadata value of `type` (1, 2, 4 or 8); 0 for STRING, ARRAY and unknown ids. */
uint32_t qlr_gguf_scalar_size(uint32_t type);
/* Size in bytes of the file or buffer the reader validated. */
uint64_t qlr_gguf_file_size(const qlr_gguf *g);
/* Byte offset in the file of the value of kv `kv` (for messages in callers). */
uint64_t qlr_gguf_kv_offset(const qlr_gguf *g, int64_t kv);

/* Writer: any scalar type except STRING and ARRAY; `value` points at the native value (uint8_t,
 * int16_t, double, ... ; BOOL is one byte 0/1). QLR_ERR_INVALID for a bad type or duplicate key. */
qlr_status qlr_gguf_set_scalar(qlr_gguf_writer *w, const char *key, qlr_gguf_type type,
                               const void *value);
/* Writer: a string of `len` bytes that need not be NUL-terminated. */
qlr_status qlr_gguf_set_str_n(qlr_gguf_writer *w, const char *key, const char *s, uint64_t len);

#endif
