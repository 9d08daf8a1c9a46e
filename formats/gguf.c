/* formats/gguf.c: the GGUF v2/v3 reader and writer declared in formats/gguf.h
 * (docs/FORMATS.md §3).
 *
 * Reader: one validating pass over a mapping (header, key/value records, tensor infos, data
 * layout) that builds small side tables (kv records, tensor records, hash indexes for keys and
 * tensor names, an offset index per string array). Every count is checked against the bytes
 * that remain before anything is allocated, so a hostile file cannot make us allocate more
 * than a small constant times its size. Values are never copied; getters read the mapping.
 * Writer: collects encoded metadata and tensor descriptors, then streams one file through the
 * atomic writer of core/file.h with dense, aligned, zero-padded data. Block sizes come from
 * quant/ggml_quants.h (the one ggml type table). */
#include "formats/gguf.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

#define GGUF_VERSION_WRITTEN 3
#define GGUF_MAX_KEY_LEN 65535u /* FORMATS.md §3.1 */
#define GGUF_MAX_NAME 64        /* tensor names must be shorter (ggml GGML_MAX_NAME) */
#define GGUF_HEADER_BYTES 24
/* Smallest possible records, used to bound counts by the bytes that remain:
 * kv = key length (8) + 1 key byte + type (4) + 1 value byte;
 * tensor info = name length (8) + 1 name byte + n_dims (4) + one ne (8) + type (4) + offset (8). */
#define GGUF_MIN_KV_BYTES 14
#define GGUF_MIN_TENSOR_BYTES 33
#define GGML_TYPE_ID_LIMIT 40 /* ids below this exist in ggml; we may still not support them */

/* ---- little-endian decoding (the file is LE whatever the host) ---- */

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32); }
static void put32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* ---- metadata type table ---- */

static const char *const g_gguf_type_names[QLR_GGUF_TYPE_COUNT] = {
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32",
    "BOOL", "STRING", "ARRAY", "UINT64", "INT64", "FLOAT64",
};
static const uint8_t g_gguf_scalar_sizes[QLR_GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *qlr_gguf_type_name(uint32_t type) {
    return type < QLR_GGUF_TYPE_COUNT ? g_gguf_type_names[type] : NULL;
}

uint32_t qlr_gguf_scalar_size(uint32_t type) {
    return type < QLR_GGUF_TYPE_COUNT ? g_gguf_scalar_sizes[type] : 0;
}

static const char *type_name_or(uint32_t type) {
    const char *n = qlr_gguf_type_name(type);
    return n ? n : "unknown";
}

/* ---- string -> index hash map (open addressing, FNV-1a); keys are borrowed, stable pointers ---- */

typedef struct strmap_slot {
    const char *key; /* NULL = empty */
    int64_t idx;
} strmap_slot;

typedef struct strmap {
    strmap_slot *slots;
    uint64_t cap; /* power of two or 0 */
    uint64_t n;
} strmap;

static uint64_t hash_str(const char *s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

static int64_t strmap_find(const strmap *m, const char *key) {
    if (!m->cap) return -1;
    for (uint64_t i = hash_str(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->slots[i].key) return -1;
        if (!strcmp(m->slots[i].key, key)) return m->slots[i].idx;
    }
}

static void strmap_insert_slot(strmap_slot *slots, uint64_t cap, const char *key, int64_t idx) {
    uint64_t i = hash_str(key) & (cap - 1);
    while (slots[i].key) i = (i + 1) & (cap - 1);
    slots[i].key = key;
    slots[i].idx = idx;
}

/* Inserts a key known to be absent; grows to keep the load under 1/2. */
static qlr_status strmap_put(strmap *m, const char *key, int64_t idx) {
    if ((m->n + 1) * 2 > m->cap) {
        uint64_t cap = m->cap ? m->cap * 2 : 16;
        strmap_slot *slots = calloc(cap, sizeof *slots);
        if (!slots) return qlr_errorf(QLR_ERR_NOMEM, "out of memory for a name index of %" PRIu64 " slots", cap);
        for (uint64_t i = 0; i < m->cap; i++)
            if (m->slots[i].key) strmap_insert_slot(slots, cap, m->slots[i].key, m->slots[i].idx);
        free(m->slots);
        m->slots = slots;
        m->cap = cap;
    }
    strmap_insert_slot(m->slots, m->cap, key, idx);
    m->n++;
    return QLR_OK;
}

static void strmap_free(strmap *m) {
    free(m->slots);
    memset(m, 0, sizeof *m);
}

/* ====================================== reader ====================================== */

typedef struct gguf_kv {
    char *key;          /* NUL-terminated copy */
    uint32_t type;      /* qlr_gguf_type */
    uint32_t elem_type; /* arrays only */
    uint64_t n;         /* arrays only: element count */
    uint64_t key_off;   /* file offset of the kv record */
    uint64_t raw_off;   /* file offset of the encoded value (after the type field) */
    uint64_t raw_len;   /* its length in bytes */
    uint64_t *str_offs; /* string arrays: file offset of each element's length prefix */
} gguf_kv;

typedef struct gguf_tensor_rec {
    qlr_gguf_tensor t;
    uint64_t info_off; /* file offset of the tensor-info record */
    char name[GGUF_MAX_NAME];
} gguf_tensor_rec;

struct qlr_gguf {
    char *name; /* path, or the caller's name for a buffer */
    qlr_mmap map;
    const uint8_t *p;
    uint64_t size;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_offset;
    int64_t n_kv;
    gguf_kv *kv;
    strmap kv_map;
    int64_t n_tensors;
    gguf_tensor_rec *tensors;
    strmap t_map;
};

/* Parser state: the reader being filled, the read position and what is being read (for
 * messages: "key 'general.name'", "tensor 3 'blk.0.attn_q.weight'"). */
typedef struct cursor {
    qlr_gguf *g;
    uint64_t pos;
    char what[200];
} cursor;

static qlr_status perr(const cursor *c, qlr_status st, uint64_t off, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static qlr_status perr(const cursor *c, qlr_status st, uint64_t off, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return qlr_errorf(st, "%s: offset %" PRIu64 ": %s%s%s", c->g->name, off, c->what,
                      c->what[0] ? ": " : "", msg);
}

static uint64_t remaining(const cursor *c) { return c->g->size - c->pos; }

static qlr_status need(cursor *c, uint64_t n, const char *thing) {
    if (n > remaining(c))
        return perr(c, QLR_ERR_FORMAT, c->pos,
                    "file truncated: %s needs %" PRIu64 " bytes but only %" PRIu64
                    " remain (file is %" PRIu64 " bytes)",
                    thing, n, remaining(c), c->g->size);
    return QLR_OK;
}

static qlr_status rd_u32(cursor *c, uint32_t *v, const char *thing) {
    QLR_TRY(need(c, 4, thing));
    *v = le32(c->g->p + c->pos);
    c->pos += 4;
    return QLR_OK;
}

static qlr_status rd_u64(cursor *c, uint64_t *v, const char *thing) {
    QLR_TRY(need(c, 8, thing));
    *v = le64(c->g->p + c->pos);
    c->pos += 8;
    return QLR_OK;
}

/* Reads a gguf_string: *off is the offset of its bytes, *len their count. */
static qlr_status rd_str(cursor *c, const char *thing, uint64_t *off, uint64_t *len) {
    uint64_t at = c->pos;
    QLR_TRY(rd_u64(c, len, thing));
    if (*len > remaining(c))
        return perr(c, QLR_ERR_FORMAT, at,
                    "%s length %" PRIu64 " runs past the end of the file (%" PRIu64 " bytes remain)",
                    thing, *len, remaining(c));
    *off = c->pos;
    c->pos += *len;
    return QLR_OK;
}

/* Reads one value of a type other than ARRAY (the type is already validated). */
static qlr_status rd_plain_value(cursor *c, uint32_t type) {
    if (type == QLR_GGUF_STRING) {
        uint64_t off, len;
        return rd_str(c, "string value", &off, &len);
    }
    QLR_TRY(need(c, g_gguf_scalar_sizes[type], "value"));
    c->pos += g_gguf_scalar_sizes[type];
    return QLR_OK;
}

static qlr_status rd_array(cursor *c, gguf_kv *kv) {
    uint64_t at = c->pos;
    QLR_TRY(rd_u32(c, &kv->elem_type, "array element type"));
    if (kv->elem_type == QLR_GGUF_ARRAY)
        return perr(c, QLR_ERR_FORMAT, at, "arrays of arrays are not supported (ggml rejects them too)");
    if (kv->elem_type >= QLR_GGUF_TYPE_COUNT)
        return perr(c, QLR_ERR_FORMAT, at, "unknown array element type %" PRIu32, kv->elem_type);
    uint64_t n_at = c->pos;
    QLR_TRY(rd_u64(c, &kv->n, "array element count"));
    uint64_t min_elem = kv->elem_type == QLR_GGUF_STRING ? 8 : g_gguf_scalar_sizes[kv->elem_type];
    if (kv->n > remaining(c) / min_elem)
        return perr(c, QLR_ERR_FORMAT, n_at,
                    "array of %" PRIu64 " %s elements cannot fit in the %" PRIu64 " bytes that remain",
                    kv->n, g_gguf_type_names[kv->elem_type], remaining(c));
    if (kv->elem_type != QLR_GGUF_STRING) {
        c->pos += kv->n * min_elem;
        return QLR_OK;
    }
    /* n * 8 <= remaining bytes, so this index is at most as large as the file. */
    kv->str_offs = malloc((kv->n ? kv->n : 1) * sizeof *kv->str_offs);
    if (!kv->str_offs)
        return perr(c, QLR_ERR_NOMEM, n_at, "out of memory for an index of %" PRIu64 " strings", kv->n);
    for (uint64_t i = 0; i < kv->n; i++) {
        uint64_t off, len;
        kv->str_offs[i] = c->pos;
        QLR_TRY(rd_str(c, "array string", &off, &len));
    }
    return QLR_OK;
}

/* 1 if the n bytes at p contain a NUL (names are exposed as C strings). */
static int has_nul(const uint8_t *p, uint64_t n) { return memchr(p, 0, n) != NULL; }

static qlr_status rd_kv(cursor *c, int64_t i) {
    qlr_gguf *g = c->g;
    gguf_kv *kv = &g->kv[i];
    kv->key_off = c->pos;
    snprintf(c->what, sizeof c->what, "kv %" PRId64, i);
    uint64_t len;
    QLR_TRY(rd_u64(c, &len, "key length"));
    if (len == 0) return perr(c, QLR_ERR_FORMAT, kv->key_off, "empty key");
    if (len > GGUF_MAX_KEY_LEN)
        return perr(c, QLR_ERR_FORMAT, kv->key_off, "key length %" PRIu64 " exceeds the %u-byte limit",
                    len, GGUF_MAX_KEY_LEN);
    if (len > remaining(c))
        return perr(c, QLR_ERR_FORMAT, kv->key_off,
                    "key length %" PRIu64 " runs past the end of the file (%" PRIu64 " bytes remain)", len,
                    remaining(c));
    if (has_nul(g->p + c->pos, len)) return perr(c, QLR_ERR_FORMAT, c->pos, "key contains a NUL byte");
    kv->key = malloc(len + 1);
    if (!kv->key) return perr(c, QLR_ERR_NOMEM, kv->key_off, "out of memory for a key");
    memcpy(kv->key, g->p + c->pos, len);
    kv->key[len] = 0;
    c->pos += len;
    snprintf(c->what, sizeof c->what, "key '%.160s'", kv->key);
    int64_t prev = strmap_find(&g->kv_map, kv->key);
    if (prev >= 0)
        return perr(c, QLR_ERR_FORMAT, kv->key_off, "duplicate key (first defined at offset %" PRIu64 ")",
                    g->kv[prev].key_off);
    uint64_t type_at = c->pos;
    QLR_TRY(rd_u32(c, &kv->type, "value type"));
    if (kv->type >= QLR_GGUF_TYPE_COUNT)
        return perr(c, QLR_ERR_FORMAT, type_at, "unknown value type %" PRIu32 " (valid: 0..%d)", kv->type,
                    QLR_GGUF_TYPE_COUNT - 1);
    kv->raw_off = c->pos;
    if (kv->type == QLR_GGUF_ARRAY) QLR_TRY(rd_array(c, kv));
    else QLR_TRY(rd_plain_value(c, kv->type));
    kv->raw_len = c->pos - kv->raw_off;
    QLR_TRY(strmap_put(&g->kv_map, kv->key, i));
    return QLR_OK;
}

static qlr_status check_alignment(cursor *c) {
    qlr_gguf *g = c->g;
    g->alignment = QLR_GGUF_DEFAULT_ALIGNMENT;
    int64_t i = strmap_find(&g->kv_map, "general.alignment");
    if (i < 0) return QLR_OK;
    const gguf_kv *kv = &g->kv[i];
    snprintf(c->what, sizeof c->what, "key 'general.alignment'");
    if (kv->type != QLR_GGUF_UINT32)
        return perr(c, QLR_ERR_FORMAT, kv->raw_off, "must be UINT32, found %s", g_gguf_type_names[kv->type]);
    uint32_t a = le32(g->p + kv->raw_off);
    if (a == 0 || (a & (a - 1)))
        return perr(c, QLR_ERR_FORMAT, kv->raw_off, "alignment %" PRIu32 " is not a power of two", a);
    g->alignment = a;
    return QLR_OK;
}

static qlr_status rd_tensor_info(cursor *c, int64_t i) {
    qlr_gguf *g = c->g;
    gguf_tensor_rec *r = &g->tensors[i];
    qlr_gguf_tensor *t = &r->t;
    r->info_off = c->pos;
    snprintf(c->what, sizeof c->what, "tensor %" PRId64, i);
    uint64_t off, len;
    QLR_TRY(rd_str(c, "tensor name", &off, &len));
    if (len == 0) return perr(c, QLR_ERR_FORMAT, r->info_off, "empty tensor name");
    if (len >= GGUF_MAX_NAME)
        return perr(c, QLR_ERR_FORMAT, r->info_off, "name '%.*s...' is %" PRIu64 " bytes, must be < %d", 40,
                    (const char *)g->p + off, len, GGUF_MAX_NAME);
    if (has_nul(g->p + off, len)) return perr(c, QLR_ERR_FORMAT, off, "tensor name contains a NUL byte");
    memcpy(r->name, g->p + off, len);
    r->name[len] = 0;
    t->name = r->name;
    snprintf(c->what, sizeof c->what, "tensor %" PRId64 " '%s'", i, r->name);
    int64_t prev = strmap_find(&g->t_map, r->name);
    if (prev >= 0)
        return perr(c, QLR_ERR_FORMAT, r->info_off, "duplicate tensor name (first defined as tensor %" PRId64 ")",
                    prev);

    uint64_t at = c->pos;
    QLR_TRY(rd_u32(c, &t->n_dims, "n_dims"));
    if (t->n_dims < 1 || t->n_dims > QLR_GGUF_MAX_DIMS)
        return perr(c, QLR_ERR_FORMAT, at, "n_dims is %" PRIu32 ", must be 1..%d", t->n_dims, QLR_GGUF_MAX_DIMS);
    uint64_t nel = 1;
    for (uint32_t d = 0; d < QLR_GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        at = c->pos;
        QLR_TRY(rd_u64(c, &t->ne[d], "dimension"));
        if (t->ne[d] > (uint64_t)INT64_MAX)
            return perr(c, QLR_ERR_FORMAT, at, "ne[%" PRIu32 "] = %" PRIu64 " is negative as int64", d, t->ne[d]);
        if (!qlr_mul_ok(nel, t->ne[d], &nel) || nel > (uint64_t)INT64_MAX)
            return perr(c, QLR_ERR_FORMAT, at, "the element count overflows at ne[%" PRIu32 "] = %" PRIu64, d,
                        t->ne[d]);
    }
    at = c->pos;
    QLR_TRY(rd_u32(c, &t->type, "ggml type"));
    if (!qlr_ggml_block_elems(t->type)) {
        if (t->type < GGML_TYPE_ID_LIMIT)
            return perr(c, QLR_ERR_UNSUPPORTED, at,
                        "ggml type id %" PRIu32 " is not supported (supported: F32 F16 BF16 F64 I8 I16 I32 I64 "
                        "Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K)",
                        t->type);
        return perr(c, QLR_ERR_FORMAT, at, "unknown ggml type id %" PRIu32, t->type);
    }
    uint32_t bs = (uint32_t)qlr_ggml_block_elems(t->type);
    if (t->ne[0] % bs)
        return perr(c, QLR_ERR_FORMAT, at, "ne[0] = %" PRIu64 " is not a multiple of the %s block size %" PRIu32,
                    t->ne[0], qlr_ggml_type_name(t->type), bs);
    uint64_t size = t->ne[0] / bs;
    if (!qlr_mul_ok(size, (uint64_t)qlr_ggml_block_bytes(t->type), &size) || !qlr_mul_ok(size, t->ne[1], &size) ||
        !qlr_mul_ok(size, t->ne[2], &size) || !qlr_mul_ok(size, t->ne[3], &size))
        return perr(c, QLR_ERR_FORMAT, at, "byte size of a %s tensor of this shape overflows",
                    qlr_ggml_type_name(t->type));
    t->size = size;
    QLR_TRY(rd_u64(c, &t->offset, "data offset"));
    QLR_TRY(strmap_put(&g->t_map, r->name, i));
    return QLR_OK;
}

/* Offsets must be aligned, inside the file, and dense in tensor-info order (FORMATS.md §3.3). */
static qlr_status check_layout(cursor *c) {
    qlr_gguf *g = c->g;
    uint64_t expect = 0;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor_rec *r = &g->tensors[i];
        qlr_gguf_tensor *t = &r->t;
        snprintf(c->what, sizeof c->what, "tensor %" PRId64 " '%s'", i, r->name);
        uint64_t off_at = r->info_off + 8 + strlen(r->name) + 4 + 8 * (uint64_t)t->n_dims + 4;
        if (t->offset % g->alignment)
            return perr(c, QLR_ERR_FORMAT, off_at, "data offset %" PRIu64 " is not a multiple of the alignment %" PRIu32,
                        t->offset, g->alignment);
        uint64_t begin, end;
        if (!qlr_add_ok(g->data_offset, t->offset, &begin) || !qlr_add_ok(begin, t->size, &end) || end > g->size)
            return perr(c, QLR_ERR_FORMAT, off_at,
                        "data (offset %" PRIu64 ", %" PRIu64 " bytes, data blob at %" PRIu64
                        ") runs past the end of the file (%" PRIu64 " bytes)",
                        t->offset, t->size, g->data_offset, g->size);
        if (t->offset != expect)
            return perr(c, QLR_ERR_FORMAT, off_at,
                        "data offset %" PRIu64 " should be %" PRIu64 ": tensors must be stored densely in "
                        "tensor-info order (this one %s)",
                        t->offset, expect, t->offset < expect ? "overlaps the previous one" : "leaves a gap");
        t->data = g->p + begin;
        uint64_t padded = align_up(t->size, g->alignment);
        if (!qlr_add_ok(expect, padded, &expect))
            return perr(c, QLR_ERR_FORMAT, off_at, "the data blob size overflows");
    }
    return QLR_OK;
}

static qlr_status parse(qlr_gguf *g) {
    cursor c = {.g = g, .pos = 0, .what = ""};
    if (g->size < 4 || memcmp(g->p, "GGUF", 4)) {
        if (g->size == 0) return perr(&c, QLR_ERR_FORMAT, 0, "file is empty, not a GGUF file");
        char m[20] = "";
        for (uint64_t i = 0; i < 4 && i < g->size; i++)
            snprintf(m + 3 * i, sizeof m - 3 * i, "%02x ", g->p[i]);
        return perr(&c, QLR_ERR_FORMAT, 0, "not a GGUF file (magic bytes %sare not 47 47 55 46 'GGUF')", m);
    }
    c.pos = 4;
    QLR_TRY(rd_u32(&c, &g->version, "version"));
    if ((g->version & 0xFFFFu) == 0)
        return perr(&c, QLR_ERR_UNSUPPORTED, 4,
                    "version field 0x%08" PRIx32 " looks byte-swapped: this is a big-endian GGUF file; "
                    "only little-endian files are supported",
                    g->version);
    if (g->version == 1)
        return perr(&c, QLR_ERR_UNSUPPORTED, 4,
                    "GGUF version 1 is not supported (only 2 and 3); re-convert the model with a current "
                    "llama.cpp");
    if (g->version != 2 && g->version != 3)
        return perr(&c, QLR_ERR_UNSUPPORTED, 4, "GGUF version %" PRIu32 " is not supported (only 2 and 3)",
                    g->version);
    uint64_t n_tensors, n_kv;
    QLR_TRY(rd_u64(&c, &n_tensors, "tensor count"));
    QLR_TRY(rd_u64(&c, &n_kv, "metadata kv count"));
    if (n_kv > remaining(&c) / GGUF_MIN_KV_BYTES)
        return perr(&c, QLR_ERR_FORMAT, 16,
                    "metadata kv count %" PRIu64 " cannot fit in a file of %" PRIu64 " bytes", n_kv, g->size);
    if (n_tensors > remaining(&c) / GGUF_MIN_TENSOR_BYTES)
        return perr(&c, QLR_ERR_FORMAT, 8, "tensor count %" PRIu64 " cannot fit in a file of %" PRIu64 " bytes",
                    n_tensors, g->size);

    g->kv = calloc(n_kv ? n_kv : 1, sizeof *g->kv);
    if (!g->kv) return perr(&c, QLR_ERR_NOMEM, 16, "out of memory for %" PRIu64 " kv records", n_kv);
    g->n_kv = (int64_t)n_kv;
    for (int64_t i = 0; i < g->n_kv; i++) QLR_TRY(rd_kv(&c, i));
    QLR_TRY(check_alignment(&c));

    c.what[0] = 0;
    if (n_tensors > remaining(&c) / GGUF_MIN_TENSOR_BYTES)
        return perr(&c, QLR_ERR_FORMAT, 8,
                    "tensor count %" PRIu64 " cannot fit in the %" PRIu64 " bytes after the metadata", n_tensors,
                    remaining(&c));
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
    if (!g->tensors) return perr(&c, QLR_ERR_NOMEM, 8, "out of memory for %" PRIu64 " tensor infos", n_tensors);
    g->n_tensors = (int64_t)n_tensors;
    for (int64_t i = 0; i < g->n_tensors; i++) QLR_TRY(rd_tensor_info(&c, i));
    g->data_offset = align_up(c.pos, g->alignment);
    return check_layout(&c);
}

void qlr_gguf_close(qlr_gguf *g) {
    if (!g) return;
    for (int64_t i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str_offs);
    }
    free(g->kv);
    free(g->tensors);
    strmap_free(&g->kv_map);
    strmap_free(&g->t_map);
    qlr_mmap_close(&g->map);
    free(g->name);
    free(g);
}

static qlr_status open_common(qlr_gguf *g, qlr_gguf **out) {
    qlr_status st = parse(g);
    if (st != QLR_OK) {
        qlr_gguf_close(g);
        return st;
    }
    *out = g;
    return QLR_OK;
}

qlr_status qlr_gguf_open_mem(const void *data, size_t size, const char *name, qlr_gguf **out) {
    *out = NULL;
    if (!name) name = "<memory>";
    qlr_gguf *g = calloc(1, sizeof *g);
    char *nm = strdup(name);
    if (!g || !nm) {
        free(g);
        free(nm);
        return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name);
    }
    g->name = nm;
    g->p = data;
    g->size = data ? size : 0;
    return open_common(g, out);
}

qlr_status qlr_gguf_open(const char *path, qlr_gguf **out) {
    *out = NULL;
    qlr_gguf *g = calloc(1, sizeof *g);
    char *nm = strdup(path);
    if (!g || !nm) {
        free(g);
        free(nm);
        return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path);
    }
    g->name = nm;
    qlr_status st = qlr_mmap_open(path, &g->map);
    if (st != QLR_OK) {
        qlr_gguf_close(g);
        return st;
    }
    g->p = g->map.data;
    g->size = g->map.size;
    return open_common(g, out);
}

uint32_t qlr_gguf_version(const qlr_gguf *g) { return g->version; }
uint32_t qlr_gguf_alignment(const qlr_gguf *g) { return g->alignment; }
uint64_t qlr_gguf_data_offset(const qlr_gguf *g) { return g->data_offset; }
const char *qlr_gguf_path(const qlr_gguf *g) { return g->name; }
uint64_t qlr_gguf_file_size(const qlr_gguf *g) { return g->size; }

int64_t qlr_gguf_n_kv(const qlr_gguf *g) { return g->n_kv; }

const char *qlr_gguf_kv_key(const qlr_gguf *g, int64_t i) {
    QLR_ASSERT(i >= 0 && i < g->n_kv);
    return g->kv[i].key;
}

qlr_gguf_type qlr_gguf_kv_type(const qlr_gguf *g, int64_t i) {
    QLR_ASSERT(i >= 0 && i < g->n_kv);
    return (qlr_gguf_type)g->kv[i].type;
}

uint64_t qlr_gguf_kv_offset(const qlr_gguf *g, int64_t i) {
    QLR_ASSERT(i >= 0 && i < g->n_kv);
    return g->kv[i].raw_off;
}

int64_t qlr_gguf_find_key(const qlr_gguf *g, const char *key) { return strmap_find(&g->kv_map, key); }

/* Finds `key` and checks that its type is one of the allowed ones (bit mask of types). */
static qlr_status lookup(const qlr_gguf *g, const char *key, unsigned allowed, const char *wanted,
                         const gguf_kv **out) {
    int64_t i = strmap_find(&g->kv_map, key);
    if (i < 0) return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: key '%s' not found", g->name, key);
    const gguf_kv *kv = &g->kv[i];
    if (!(allowed & (1u << kv->type)))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: offset %" PRIu64 ": key '%s' has type %s, wanted %s", g->name,
                          kv->raw_off, key, g_gguf_type_names[kv->type], wanted);
    *out = kv;
    return QLR_OK;
}

#define TBIT(t) (1u << QLR_GGUF_##t)

qlr_status qlr_gguf_get_u32(const qlr_gguf *g, const char *key, uint32_t *out) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(UINT32), "UINT32", &kv));
    *out = le32(g->p + kv->raw_off);
    return QLR_OK;
}

qlr_status qlr_gguf_get_i32(const qlr_gguf *g, const char *key, int32_t *out) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(INT32), "INT32", &kv));
    *out = (int32_t)le32(g->p + kv->raw_off);
    return QLR_OK;
}

qlr_status qlr_gguf_get_uint(const qlr_gguf *g, const char *key, uint64_t *out) {
    const gguf_kv *kv = NULL;
    unsigned ints = TBIT(UINT8) | TBIT(UINT16) | TBIT(UINT32) | TBIT(UINT64) | TBIT(INT8) | TBIT(INT16) |
                    TBIT(INT32) | TBIT(INT64);
    QLR_TRY(lookup(g, key, ints, "an unsigned integer", &kv));
    const uint8_t *p = g->p + kv->raw_off;
    int64_t s = 0;
    switch (kv->type) {
    case QLR_GGUF_UINT8: *out = p[0]; return QLR_OK;
    case QLR_GGUF_UINT16: *out = le16(p); return QLR_OK;
    case QLR_GGUF_UINT32: *out = le32(p); return QLR_OK;
    case QLR_GGUF_UINT64: *out = le64(p); return QLR_OK;
    case QLR_GGUF_INT8: s = (int8_t)p[0]; break;
    case QLR_GGUF_INT16: s = (int16_t)le16(p); break;
    case QLR_GGUF_INT32: s = (int32_t)le32(p); break;
    default: s = (int64_t)le64(p); break;
    }
    if (s < 0)
        return qlr_errorf(QLR_ERR_RANGE, "%s: offset %" PRIu64 ": key '%s' is %" PRId64 ", must be >= 0", g->name,
                          kv->raw_off, key, s);
    *out = (uint64_t)s;
    return QLR_OK;
}

qlr_status qlr_gguf_get_f32(const qlr_gguf *g, const char *key, float *out) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(FLOAT32), "FLOAT32", &kv));
    *out = qlr_bits_f32(le32(g->p + kv->raw_off));
    return QLR_OK;
}

qlr_status qlr_gguf_get_float(const qlr_gguf *g, const char *key, double *out) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(FLOAT32) | TBIT(FLOAT64), "FLOAT32 or FLOAT64", &kv));
    if (kv->type == QLR_GGUF_FLOAT32) {
        *out = qlr_bits_f32(le32(g->p + kv->raw_off));
    } else {
        uint64_t u = le64(g->p + kv->raw_off);
        memcpy(out, &u, 8);
    }
    return QLR_OK;
}

qlr_status qlr_gguf_get_bool(const qlr_gguf *g, const char *key, int *out) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(BOOL), "BOOL", &kv));
    *out = g->p[kv->raw_off] != 0;
    return QLR_OK;
}

qlr_status qlr_gguf_get_str(const qlr_gguf *g, const char *key, const char **s, uint64_t *len) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(STRING), "STRING", &kv));
    *len = le64(g->p + kv->raw_off);
    *s = (const char *)g->p + kv->raw_off + 8;
    return QLR_OK;
}

static qlr_status arr_of(const qlr_gguf *g, const gguf_kv *kv, qlr_gguf_type *elem_type, uint64_t *n,
                         const void **data) {
    if (elem_type) *elem_type = (qlr_gguf_type)kv->elem_type;
    if (n) *n = kv->n;
    if (data) *data = g->p + kv->raw_off + 12;
    return QLR_OK;
}

static qlr_status arr_str_of(const qlr_gguf *g, const gguf_kv *kv, uint64_t i, const char **s, uint64_t *len) {
    if (kv->elem_type != QLR_GGUF_STRING)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: offset %" PRIu64 ": key '%s' is an array of %s, wanted STRING",
                          g->name, kv->raw_off, kv->key, g_gguf_type_names[kv->elem_type]);
    if (i >= kv->n)
        return qlr_errorf(QLR_ERR_RANGE, "%s: key '%s': index %" PRIu64 " is past the %" PRIu64 " elements",
                          g->name, kv->key, i, kv->n);
    *len = le64(g->p + kv->str_offs[i]);
    *s = (const char *)g->p + kv->str_offs[i] + 8;
    return QLR_OK;
}

qlr_status qlr_gguf_get_arr(const qlr_gguf *g, const char *key, qlr_gguf_type *elem_type, uint64_t *n,
                            const void **data) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(ARRAY), "ARRAY", &kv));
    return arr_of(g, kv, elem_type, n, data);
}

qlr_status qlr_gguf_get_arr_str(const qlr_gguf *g, const char *key, uint64_t i, const char **s, uint64_t *len) {
    const gguf_kv *kv = NULL;
    QLR_TRY(lookup(g, key, TBIT(ARRAY), "ARRAY", &kv));
    return arr_str_of(g, kv, i, s, len);
}

static qlr_status kv_at(const qlr_gguf *g, int64_t i, uint32_t type, const gguf_kv **out) {
    QLR_ASSERT(i >= 0 && i < g->n_kv);
    const gguf_kv *kv = &g->kv[i];
    if (kv->type != type)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: offset %" PRIu64 ": key '%s' has type %s, wanted %s", g->name,
                          kv->raw_off, kv->key, g_gguf_type_names[kv->type], g_gguf_type_names[type]);
    *out = kv;
    return QLR_OK;
}

qlr_status qlr_gguf_kv_arr(const qlr_gguf *g, int64_t kv, qlr_gguf_type *elem_type, uint64_t *n,
                           const void **data) {
    const gguf_kv *r = NULL;
    QLR_TRY(kv_at(g, kv, QLR_GGUF_ARRAY, &r));
    return arr_of(g, r, elem_type, n, data);
}

qlr_status qlr_gguf_kv_arr_str(const qlr_gguf *g, int64_t kv, uint64_t i, const char **s, uint64_t *len) {
    const gguf_kv *r = NULL;
    QLR_TRY(kv_at(g, kv, QLR_GGUF_ARRAY, &r));
    return arr_str_of(g, r, i, s, len);
}

const void *qlr_gguf_kv_scalar(const qlr_gguf *g, int64_t kv) {
    QLR_ASSERT(kv >= 0 && kv < g->n_kv);
    if (g->kv[kv].type == QLR_GGUF_ARRAY) return NULL;
    return g->p + g->kv[kv].raw_off;
}

qlr_status qlr_gguf_kv_str(const qlr_gguf *g, int64_t kv, const char **s, uint64_t *len) {
    const gguf_kv *r = NULL;
    QLR_TRY(kv_at(g, kv, QLR_GGUF_STRING, &r));
    *len = le64(g->p + r->raw_off);
    *s = (const char *)g->p + r->raw_off + 8;
    return QLR_OK;
}

int64_t qlr_gguf_n_tensors(const qlr_gguf *g) { return g->n_tensors; }

const qlr_gguf_tensor *qlr_gguf_tensor_at(const qlr_gguf *g, int64_t i) {
    QLR_ASSERT(i >= 0 && i < g->n_tensors);
    return &g->tensors[i].t;
}

const qlr_gguf_tensor *qlr_gguf_find_tensor(const qlr_gguf *g, const char *name) {
    int64_t i = strmap_find(&g->t_map, name);
    return i < 0 ? NULL : &g->tensors[i].t;
}

/* ====================================== writer ====================================== */

typedef struct wkv {
    char *key;
    uint32_t type;
    uint8_t *val; /* the encoded value exactly as it goes after the type field */
    uint64_t len;
} wkv;

typedef struct wtensor {
    char *name;
    uint32_t type, n_dims;
    uint64_t ne[QLR_GGUF_MAX_DIMS];
    const void *data;
    uint64_t size;
    qlr_gguf_fill_fn fill; /* when set, data is NULL: called at write time */
    void *ud;
} wtensor;

struct qlr_gguf_writer {
    uint32_t alignment;
    wkv *kv;
    int64_t n_kv, cap_kv;
    strmap kv_map;
    wtensor *t;
    int64_t n_t, cap_t;
    strmap t_map;
};

qlr_gguf_writer *qlr_gguf_writer_create(uint32_t alignment) {
    if (alignment == 0) alignment = QLR_GGUF_DEFAULT_ALIGNMENT;
    if (alignment & (alignment - 1)) {
        qlr_errorf(QLR_ERR_INVALID, "gguf writer: alignment %" PRIu32 " is not a power of two", alignment);
        return NULL;
    }
    qlr_gguf_writer *w = calloc(1, sizeof *w);
    if (!w) {
        qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory");
        return NULL;
    }
    w->alignment = alignment;
    return w;
}

void qlr_gguf_writer_free(qlr_gguf_writer *w) {
    if (!w) return;
    for (int64_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].val);
    }
    for (int64_t i = 0; i < w->n_t; i++) free(w->t[i].name);
    free(w->kv);
    free(w->t);
    strmap_free(&w->kv_map);
    strmap_free(&w->t_map);
    free(w);
}

/* Adds an encoded value; takes ownership of `val` (freed on failure too). */
static qlr_status add_kv(qlr_gguf_writer *w, const char *key, uint32_t type, uint8_t *val, uint64_t len) {
    qlr_status st = QLR_OK;
    size_t klen = key ? strlen(key) : 0;
    if (klen == 0 || klen > GGUF_MAX_KEY_LEN) {
        st = qlr_errorf(QLR_ERR_INVALID, "gguf writer: key '%.80s' must be 1..%u bytes", key ? key : "",
                        GGUF_MAX_KEY_LEN);
        goto fail;
    }
    if (!strcmp(key, "general.alignment")) {
        /* Managed by the writer: written (first) only when not the default. */
        if (type != QLR_GGUF_UINT32 || len != 4 || le32(val) != w->alignment) {
            st = qlr_errorf(QLR_ERR_INVALID,
                            "gguf writer: general.alignment must be the UINT32 %" PRIu32
                            " given to qlr_gguf_writer_create",
                            w->alignment);
            goto fail;
        }
        free(val);
        return QLR_OK;
    }
    if (strmap_find(&w->kv_map, key) >= 0) {
        st = qlr_errorf(QLR_ERR_INVALID, "gguf writer: key '%s' added twice", key);
        goto fail;
    }
    if (w->n_kv == w->cap_kv) {
        int64_t cap = w->cap_kv ? w->cap_kv * 2 : 16;
        wkv *n = realloc(w->kv, (size_t)cap * sizeof *n);
        if (!n) {
            st = qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory");
            goto fail;
        }
        w->kv = n;
        w->cap_kv = cap;
    }
    char *k = strdup(key);
    if (!k) {
        st = qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory");
        goto fail;
    }
    st = strmap_put(&w->kv_map, k, w->n_kv);
    if (st != QLR_OK) {
        free(k);
        goto fail;
    }
    w->kv[w->n_kv++] = (wkv){.key = k, .type = type, .val = val, .len = len};
    return QLR_OK;
fail:
    free(val);
    return st;
}

static qlr_status add_copy(qlr_gguf_writer *w, const char *key, uint32_t type, const void *src, uint64_t len) {
    uint8_t *val = malloc(len ? len : 1);
    if (!val) return qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory for key '%s'", key);
    if (len) memcpy(val, src, len);
    return add_kv(w, key, type, val, len);
}

qlr_status qlr_gguf_set_scalar(qlr_gguf_writer *w, const char *key, qlr_gguf_type type, const void *value) {
    uint32_t sz = qlr_gguf_scalar_size(type);
    if (!sz) return qlr_errorf(QLR_ERR_INVALID, "gguf writer: key '%s': %s is not a scalar type", key, type_name_or(type));
    uint8_t b[8];
    uint64_t v = 0;
    switch (sz) { /* native -> little-endian */
    case 1: v = *(const uint8_t *)value; break;
    case 2: { uint16_t x; memcpy(&x, value, 2); v = x; break; }
    case 4: { uint32_t x; memcpy(&x, value, 4); v = x; break; }
    default: memcpy(&v, value, 8); break;
    }
    if (type == QLR_GGUF_BOOL) v = v != 0;
    put64(b, v);
    return add_copy(w, key, type, b, sz);
}

qlr_status qlr_gguf_set_u32(qlr_gguf_writer *w, const char *key, uint32_t v) {
    return qlr_gguf_set_scalar(w, key, QLR_GGUF_UINT32, &v);
}
qlr_status qlr_gguf_set_i32(qlr_gguf_writer *w, const char *key, int32_t v) {
    return qlr_gguf_set_scalar(w, key, QLR_GGUF_INT32, &v);
}
qlr_status qlr_gguf_set_u64(qlr_gguf_writer *w, const char *key, uint64_t v) {
    return qlr_gguf_set_scalar(w, key, QLR_GGUF_UINT64, &v);
}
qlr_status qlr_gguf_set_f32(qlr_gguf_writer *w, const char *key, float v) {
    return qlr_gguf_set_scalar(w, key, QLR_GGUF_FLOAT32, &v);
}
qlr_status qlr_gguf_set_f64(qlr_gguf_writer *w, const char *key, double v) {
    return qlr_gguf_set_scalar(w, key, QLR_GGUF_FLOAT64, &v);
}
qlr_status qlr_gguf_set_bool(qlr_gguf_writer *w, const char *key, int v) {
    uint8_t b = v != 0;
    return qlr_gguf_set_scalar(w, key, QLR_GGUF_BOOL, &b);
}

qlr_status qlr_gguf_set_str_n(qlr_gguf_writer *w, const char *key, const char *s, uint64_t len) {
    if (len > UINT64_MAX - 8) return qlr_errorf(QLR_ERR_INVALID, "gguf writer: key '%s': string too long", key);
    uint8_t *val = malloc(8 + len);
    if (!val) return qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory for key '%s'", key);
    put64(val, len);
    if (len) memcpy(val + 8, s, len);
    return add_kv(w, key, QLR_GGUF_STRING, val, 8 + len);
}

qlr_status qlr_gguf_set_str(qlr_gguf_writer *w, const char *key, const char *s) {
    return qlr_gguf_set_str_n(w, key, s, strlen(s));
}

qlr_status qlr_gguf_set_arr(qlr_gguf_writer *w, const char *key, qlr_gguf_type elem_type, const void *data,
                            uint64_t n) {
    uint32_t sz = qlr_gguf_scalar_size(elem_type);
    uint64_t bytes;
    if (!sz)
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: key '%s': qlr_gguf_set_arr takes numeric elements, not %s",
                          key, type_name_or(elem_type));
    if (!qlr_mul_ok(n, sz, &bytes) || bytes > UINT64_MAX - 12)
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: key '%s': array too large", key);
    uint8_t *val = malloc(12 + bytes);
    if (!val) return qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory for key '%s'", key);
    put32(val, elem_type);
    put64(val + 4, n);
    const uint8_t *src = data;
    for (uint64_t i = 0; i < n; i++) { /* native -> little-endian, element by element */
        uint64_t v = 0;
        switch (sz) {
        case 1: v = src[i]; if (elem_type == QLR_GGUF_BOOL) v = v != 0; break;
        case 2: { uint16_t x; memcpy(&x, src + 2 * i, 2); v = x; break; }
        case 4: { uint32_t x; memcpy(&x, src + 4 * i, 4); v = x; break; }
        default: memcpy(&v, src + 8 * i, 8); break;
        }
        uint8_t b[8];
        put64(b, v);
        memcpy(val + 12 + i * sz, b, sz);
    }
    return add_kv(w, key, QLR_GGUF_ARRAY, val, 12 + bytes);
}

qlr_status qlr_gguf_set_arr_str(qlr_gguf_writer *w, const char *key, const char *const *strs, uint64_t n) {
    uint64_t bytes = 12;
    for (uint64_t i = 0; i < n; i++)
        if (!qlr_add_ok(bytes, 8 + strlen(strs[i]), &bytes))
            return qlr_errorf(QLR_ERR_INVALID, "gguf writer: key '%s': array too large", key);
    uint8_t *val = malloc(bytes);
    if (!val) return qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory for key '%s'", key);
    put32(val, QLR_GGUF_STRING);
    put64(val + 4, n);
    uint64_t k = 12;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len = strlen(strs[i]);
        put64(val + k, len);
        memcpy(val + k + 8, strs[i], len);
        k += 8 + len;
    }
    return add_kv(w, key, QLR_GGUF_ARRAY, val, bytes);
}

qlr_status qlr_gguf_copy_kv(qlr_gguf_writer *w, const qlr_gguf *src, int64_t kv) {
    QLR_ASSERT(kv >= 0 && kv < src->n_kv);
    const gguf_kv *r = &src->kv[kv];
    return add_copy(w, r->key, r->type, src->p + r->raw_off, r->raw_len);
}

static qlr_status add_tensor(qlr_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                             const uint64_t *ne, const void *data, uint64_t size, qlr_gguf_fill_fn fill,
                             void *ud) {
    size_t nlen = name ? strlen(name) : 0;
    if (nlen == 0 || nlen >= GGUF_MAX_NAME)
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor name '%.80s' must be 1..%d bytes", name ? name : "",
                          GGUF_MAX_NAME - 1);
    if (strmap_find(&w->t_map, name) >= 0)
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s' added twice", name);
    if (n_dims < 1 || n_dims > QLR_GGUF_MAX_DIMS)
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s': n_dims %" PRIu32 " must be 1..%d", name, n_dims,
                          QLR_GGUF_MAX_DIMS);
    if (!qlr_ggml_block_elems(type))
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s': unknown ggml type %" PRIu32, name, type);
    uint32_t bs = (uint32_t)qlr_ggml_block_elems(type);
    if (ne[0] % bs)
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s': ne[0] = %" PRIu64 " is not a multiple of %" PRIu32,
                          name, ne[0], bs);
    uint64_t want = ne[0] / bs, nel = 1;
    int ok = qlr_mul_ok(want, (uint64_t)qlr_ggml_block_bytes(type), &want);
    for (uint32_t d = 0; d < n_dims; d++) {
        ok = ok && ne[d] <= (uint64_t)INT64_MAX && qlr_mul_ok(nel, ne[d], &nel) && nel <= (uint64_t)INT64_MAX;
        if (d) ok = ok && qlr_mul_ok(want, ne[d], &want);
    }
    if (!ok) return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s': shape overflows", name);
    if (size != want)
        return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s': %" PRIu64 " bytes given, type %s and shape need %" PRIu64,
                          name, size, qlr_ggml_type_name(type), want);
    if (size && !data && !fill) return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s': no data", name);
    if (w->n_t == w->cap_t) {
        int64_t cap = w->cap_t ? w->cap_t * 2 : 64;
        wtensor *n = realloc(w->t, (size_t)cap * sizeof *n);
        if (!n) return qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory");
        w->t = n;
        w->cap_t = cap;
    }
    char *nm = strdup(name);
    if (!nm) return qlr_errorf(QLR_ERR_NOMEM, "gguf writer: out of memory");
    qlr_status st = strmap_put(&w->t_map, nm, w->n_t);
    if (st != QLR_OK) {
        free(nm);
        return st;
    }
    wtensor *t = &w->t[w->n_t++];
    *t = (wtensor){.name = nm, .type = type, .n_dims = n_dims, .data = data, .size = size, .fill = fill, .ud = ud};
    for (uint32_t d = 0; d < QLR_GGUF_MAX_DIMS; d++) t->ne[d] = d < n_dims ? ne[d] : 1;
    return QLR_OK;
}

qlr_status qlr_gguf_add_tensor(qlr_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                               const uint64_t *ne, const void *data, uint64_t size) {
    return add_tensor(w, name, type, n_dims, ne, data, size, NULL, NULL);
}

qlr_status qlr_gguf_add_tensor_fill(qlr_gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                                    const uint64_t *ne, uint64_t size, qlr_gguf_fill_fn fill, void *ud) {
    if (!fill) return qlr_errorf(QLR_ERR_INVALID, "gguf writer: tensor '%s': no fill function", name ? name : "");
    return add_tensor(w, name, type, n_dims, ne, NULL, size, fill, ud);
}

static qlr_status w_u32(qlr_afile *af, uint32_t v) {
    uint8_t b[4];
    put32(b, v);
    return qlr_afile_write(af, b, 4);
}

static qlr_status w_u64(qlr_afile *af, uint64_t v) {
    uint8_t b[8];
    put64(b, v);
    return qlr_afile_write(af, b, 8);
}

static qlr_status w_str(qlr_afile *af, const char *s) {
    size_t n = strlen(s);
    QLR_TRY(w_u64(af, n));
    return qlr_afile_write(af, s, n);
}

static qlr_status write_body(qlr_gguf_writer *w, qlr_afile *af) {
    int custom_align = w->alignment != QLR_GGUF_DEFAULT_ALIGNMENT;
    QLR_TRY(qlr_afile_write(af, "GGUF", 4));
    QLR_TRY(w_u32(af, GGUF_VERSION_WRITTEN));
    QLR_TRY(w_u64(af, (uint64_t)w->n_t));
    QLR_TRY(w_u64(af, (uint64_t)w->n_kv + (custom_align ? 1 : 0)));
    if (custom_align) {
        QLR_TRY(w_str(af, "general.alignment"));
        QLR_TRY(w_u32(af, QLR_GGUF_UINT32));
        QLR_TRY(w_u32(af, w->alignment));
    }
    for (int64_t i = 0; i < w->n_kv; i++) {
        QLR_TRY(w_str(af, w->kv[i].key));
        QLR_TRY(w_u32(af, w->kv[i].type));
        QLR_TRY(qlr_afile_write(af, w->kv[i].val, w->kv[i].len));
    }
    uint64_t off = 0;
    for (int64_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        QLR_TRY(w_str(af, t->name));
        QLR_TRY(w_u32(af, t->n_dims));
        for (uint32_t d = 0; d < t->n_dims; d++) QLR_TRY(w_u64(af, t->ne[d]));
        QLR_TRY(w_u32(af, t->type));
        QLR_TRY(w_u64(af, off));
        off += align_up(t->size, w->alignment);
    }
    QLR_TRY(qlr_afile_pad(af, align_up(af->written, w->alignment) - af->written));
    void *buf = NULL; /* one buffer for the filled tensors, as large as the largest */
    uint64_t cap = 0;
    qlr_status st = QLR_OK;
    for (int64_t i = 0; i < w->n_t && st == QLR_OK; i++) {
        const wtensor *t = &w->t[i];
        const void *data = t->data;
        if (t->fill && t->size) {
            if (t->size > cap) {
                free(buf);
                buf = t->size <= SIZE_MAX ? malloc((size_t)t->size) : NULL;
                cap = buf ? t->size : 0;
                if (!buf) {
                    st = qlr_errorf(QLR_ERR_NOMEM, "gguf writer: tensor '%s': out of memory for %" PRIu64 " bytes",
                                    t->name, t->size);
                    break;
                }
            }
            if ((st = t->fill(t->ud, t->name, buf, t->size)) != QLR_OK) {
                qlr_error_prefix("tensor %s", t->name);
                break;
            }
            data = buf;
        }
        if (t->size) st = qlr_afile_write(af, data, t->size);
        if (st == QLR_OK) st = qlr_afile_pad(af, align_up(t->size, w->alignment) - t->size);
    }
    free(buf);
    return st;
}

qlr_status qlr_gguf_writer_write(qlr_gguf_writer *w, const char *path) {
    qlr_afile af;
    QLR_TRY(qlr_afile_open(&af, path));
    qlr_status st = write_body(w, &af);
    if (st != QLR_OK) {
        qlr_afile_abort(&af);
        return st; /* the message already names the file */
    }
    return qlr_afile_commit(&af);
}
