/* formats/safetensors.c: the safetensors reader (validation of FORMATS.md §6.2), sharded sets
 * (folder / model.safetensors.index.json), the writer (layout of §6.3) and the inspect summary.
 * JSON parsing is jansson's through formats/json.h; this file owns the format rules only.
 * It does not convert dtypes: tensors are exposed as mapped bytes. */
#include "formats/safetensors.h"
#include "core/strbuf.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "core/log.h"
#include "formats/json.h"

/* ---- dtypes ------------------------------------------------------------------------------ */

static const struct {
    const char *name;
    uint32_t bits;
} k_dtypes[QLR_ST_DTYPE_COUNT] = {
    [QLR_ST_BOOL] = {"BOOL", 8},         [QLR_ST_F4] = {"F4", 4},
    [QLR_ST_F6_E2M3] = {"F6_E2M3", 6},   [QLR_ST_F6_E3M2] = {"F6_E3M2", 6},
    [QLR_ST_U8] = {"U8", 8},             [QLR_ST_I8] = {"I8", 8},
    [QLR_ST_F8_E5M2] = {"F8_E5M2", 8},   [QLR_ST_F8_E4M3] = {"F8_E4M3", 8},
    [QLR_ST_F8_E8M0] = {"F8_E8M0", 8},   [QLR_ST_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [QLR_ST_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [QLR_ST_I16] = {"I16", 16},          [QLR_ST_U16] = {"U16", 16},
    [QLR_ST_F16] = {"F16", 16},          [QLR_ST_BF16] = {"BF16", 16},
    [QLR_ST_I32] = {"I32", 32},          [QLR_ST_U32] = {"U32", 32},
    [QLR_ST_F32] = {"F32", 32},          [QLR_ST_C64] = {"C64", 64},
    [QLR_ST_F64] = {"F64", 64},          [QLR_ST_I64] = {"I64", 64},
    [QLR_ST_U64] = {"U64", 64},
};

const char *qlr_st_dtype_name(qlr_st_dtype t) {
    return (unsigned)t < QLR_ST_DTYPE_COUNT ? k_dtypes[t].name : NULL;
}

uint32_t qlr_st_dtype_bits(qlr_st_dtype t) {
    return (unsigned)t < QLR_ST_DTYPE_COUNT ? k_dtypes[t].bits : 0;
}

int qlr_st_dtype_parse(const char *s, qlr_st_dtype *out) {
    for (int i = 0; i < QLR_ST_DTYPE_COUNT; i++)
        if (strcmp(s, k_dtypes[i].name) == 0) {
            *out = (qlr_st_dtype)i;
            return 1;
        }
    return 0;
}

int qlr_st_dtype_to_core(qlr_st_dtype t, qlr_dtype *out) {
    switch (t) {
    case QLR_ST_F32: *out = QLR_F32; return 1;
    case QLR_ST_F16: *out = QLR_F16; return 1;
    case QLR_ST_BF16: *out = QLR_BF16; return 1;
    case QLR_ST_I32: *out = QLR_I32; return 1;
    case QLR_ST_I64: *out = QLR_I64; return 1;
    case QLR_ST_U8: *out = QLR_U8; return 1;
    case QLR_ST_I8: *out = QLR_I8; return 1;
    case QLR_ST_F64: *out = QLR_F64; return 1;
    default: return 0;
    }
}

qlr_st_dtype qlr_st_dtype_from_core(qlr_dtype t) {
    switch (t) {
    case QLR_F32: return QLR_ST_F32;
    case QLR_F16: return QLR_ST_F16;
    case QLR_BF16: return QLR_ST_BF16;
    case QLR_I32: return QLR_ST_I32;
    case QLR_I64: return QLR_ST_I64;
    case QLR_U8: return QLR_ST_U8;
    case QLR_I8: return QLR_ST_I8;
    case QLR_F64: return QLR_ST_F64;
    default: break;
    }
    QLR_ASSERT(!"core dtype without a safetensors dtype");
    return QLR_ST_U8;
}

/* Bytes of numel elements of t; 0 on overflow or when not whole bytes (error in *why). */
static int tensor_bytes(qlr_st_dtype t, const uint64_t *shape, uint32_t n_dims, uint64_t *numel,
                        uint64_t *nbytes, const char **why) {
    uint64_t n = 1, bits;
    for (uint32_t i = 0; i < n_dims; i++)
        if (!qlr_mul_ok(n, shape[i], &n)) { *why = "the element count overflows 64 bits"; return 0; }
    if (!qlr_mul_ok(n, qlr_st_dtype_bits(t), &bits)) {
        *why = "the byte size overflows 64 bits";
        return 0;
    }
    if (bits % 8) { *why = "the size is not a whole number of bytes"; return 0; }
    *numel = n;
    *nbytes = bits / 8;
    return 1;
}

/* ---- one file ---------------------------------------------------------------------------- */

struct qlr_safetensors {
    char *path;
    qlr_mmap map;           /* when opened from a path */
    const uint8_t *base;
    uint64_t size;
    uint64_t header_n;
    size_t n;
    qlr_st_tensor *t;       /* [n], offset order */
    const qlr_st_tensor **by_name; /* [n], strcmp order */
    uint64_t *shapes;       /* pool for every t[i].shape */
    size_t n_meta;
    char **meta_k, **meta_v; /* [n_meta], key order */
};

static int cmp_offset(const void *a, const void *b) {
    const qlr_st_tensor *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes) return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_name_ptr(const void *a, const void *b) {
    return strcmp((*(const qlr_st_tensor *const *)a)->name, (*(const qlr_st_tensor *const *)b)->name);
}

static const qlr_st_tensor *find_sorted(const qlr_st_tensor *const *by_name, size_t n,
                                        const char *name) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(by_name[mid]->name, name);
        if (c == 0) return by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

void qlr_safetensors_close(qlr_safetensors *f) {
    if (!f) return;
    for (size_t i = 0; i < f->n; i++) free((char *)f->t[i].name);
    for (size_t i = 0; i < f->n_meta; i++) {
        free(f->meta_k[i]);
        free(f->meta_v[i]);
    }
    free(f->meta_k);
    free(f->meta_v);
    free(f->t);
    free(f->by_name);
    free(f->shapes);
    qlr_mmap_close(&f->map);
    free(f->path);
    free(f);
}

static qlr_status parse_metadata(qlr_safetensors *f, json_t *meta) {
    const char *p = f->path;
    if (json_is_null(meta)) return QLR_OK;
    if (!json_is_object(meta))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: __metadata__ must be an object of strings, got %s", p,
                          qlr_json_type_name(meta));
    size_t n = json_object_size(meta);
    f->meta_k = calloc(n ? n : 1, sizeof(char *));
    f->meta_v = calloc(n ? n : 1, sizeof(char *));
    if (!f->meta_k || !f->meta_v) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", p);
    const char *key;
    json_t *val;
    json_object_foreach(meta, key, val) {
        if (!json_is_string(val))
            return qlr_errorf(QLR_ERR_FORMAT, "%s: __metadata__ key \"%s\": expected a string, got %s",
                              p, key, qlr_json_type_name(val));
        size_t i = f->n_meta;
        f->meta_k[i] = strdup(key);
        f->meta_v[i] = strdup(json_string_value(val));
        if (!f->meta_k[i] || !f->meta_v[i]) {
            free(f->meta_k[i]);
            free(f->meta_v[i]);
            return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", p);
        }
        f->n_meta++;
    }
    /* key order, so that lookups and printing do not depend on the writer's order */
    for (size_t i = 1; i < f->n_meta; i++)
        for (size_t j = i; j > 0 && strcmp(f->meta_k[j - 1], f->meta_k[j]) > 0; j--) {
            char *tk = f->meta_k[j], *tv = f->meta_v[j];
            f->meta_k[j] = f->meta_k[j - 1];
            f->meta_v[j] = f->meta_v[j - 1];
            f->meta_k[j - 1] = tk;
            f->meta_v[j - 1] = tv;
        }
    return QLR_OK;
}

/* A JSON integer >= 0 (jansson already refuses integers beyond int64). */
static int get_u64(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0) return 0;
    *out = (uint64_t)json_integer_value(v);
    return 1;
}

static qlr_status parse_tensor(qlr_safetensors *f, const char *name, json_t *e, qlr_st_tensor *t,
                               uint64_t **shape_pool) {
    const char *p = f->path;
    if (!json_is_object(e))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": expected an object, got %s", p, name,
                          qlr_json_type_name(e));
    json_t *dt = json_object_get(e, "dtype");
    json_t *sh = json_object_get(e, "shape");
    json_t *off = json_object_get(e, "data_offsets");
    if (!dt || !sh || !off)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": missing \"%s\"", p, name,
                          !dt ? "dtype" : !sh ? "shape" : "data_offsets");
    if (!json_is_string(dt))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": dtype must be a string, got %s", p,
                          name, qlr_json_type_name(dt));
    if (!qlr_st_dtype_parse(json_string_value(dt), &t->dtype))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": unknown dtype \"%s\"", p, name,
                          json_string_value(dt));
    if (!json_is_array(sh))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": shape must be an array, got %s", p,
                          name, qlr_json_type_name(sh));
    size_t nd = json_array_size(sh);
    if (nd > UINT32_MAX)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": too many dimensions", p, name);
    t->n_dims = (uint32_t)nd;
    t->shape = nd ? *shape_pool : NULL;
    for (size_t d = 0; d < nd; d++) {
        json_t *v = json_array_get(sh, d);
        if (json_is_integer(v) && json_integer_value(v) < 0)
            return qlr_errorf(QLR_ERR_FORMAT,
                              "%s: tensor \"%s\": shape[%zu] must be a non-negative integer, got %lld",
                              p, name, d, (long long)json_integer_value(v));
        if (!get_u64(v, &(*shape_pool)[d]))
            return qlr_errorf(QLR_ERR_FORMAT,
                              "%s: tensor \"%s\": shape[%zu] must be a non-negative integer, got %s",
                              p, name, d, qlr_json_type_name(v));
    }
    *shape_pool += nd;
    uint64_t begin, end;
    if (!json_is_array(off) || json_array_size(off) != 2 ||
        !get_u64(json_array_get(off, 0), &begin) || !get_u64(json_array_get(off, 1), &end))
        return qlr_errorf(QLR_ERR_FORMAT,
                          "%s: tensor \"%s\": data_offsets must be [begin, end] of non-negative integers",
                          p, name);
    if (end < begin)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": data_offsets end %llu < begin %llu", p,
                          name, (unsigned long long)end, (unsigned long long)begin);
    const char *why = NULL;
    uint64_t nbytes;
    if (!tensor_bytes(t->dtype, t->shape, t->n_dims, &t->numel, &nbytes, &why))
        return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": %s: %s", p, name,
                          k_dtypes[t->dtype].name, why);
    if (end - begin != nbytes)
        return qlr_errorf(QLR_ERR_FORMAT,
                          "%s: tensor \"%s\": data_offsets [%llu, %llu] hold %llu bytes but %s of %llu "
                          "elements needs %llu",
                          p, name, (unsigned long long)begin, (unsigned long long)end,
                          (unsigned long long)(end - begin), k_dtypes[t->dtype].name,
                          (unsigned long long)t->numel, (unsigned long long)nbytes);
    t->offset = begin;
    t->nbytes = nbytes;
    t->name = strdup(name);
    if (!t->name) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", p);
    return QLR_OK;
}

static qlr_status parse(qlr_safetensors *f) {
    const char *p = f->path;
    if (f->size < 8)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: %llu bytes, too small for the 8-byte header length", p,
                          (unsigned long long)f->size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = (n << 8) | f->base[i];
    if (n > QLR_ST_MAX_HEADER_SIZE)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: header length %llu is over the %llu byte limit", p,
                          (unsigned long long)n, (unsigned long long)QLR_ST_MAX_HEADER_SIZE);
    if (n > f->size - 8)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: header length %llu runs past the end of the file (%llu bytes)",
                          p, (unsigned long long)n, (unsigned long long)f->size);
    if (n == 0 || f->base[8] != '{')
        return qlr_errorf(QLR_ERR_FORMAT, "%s: header does not start with '{' (not a safetensors file?)", p);
    f->header_n = n;
    char name[512];
    snprintf(name, sizeof(name), "%s header", p);
    json_t *h = NULL;
    QLR_TRY(qlr_json_load_buffer(name, f->base + 8, (size_t)n, &h));
    qlr_status st = QLR_OK;
    if (!json_is_object(h)) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: header must be a JSON object, got %s", p,
                        qlr_json_type_name(h));
        goto done;
    }
    size_t n_keys = json_object_size(h), n_dims_total = 0;
    const char *key;
    json_t *val;
    json_object_foreach(h, key, val) {
        json_t *sh = json_is_object(val) ? json_object_get(val, "shape") : NULL;
        if (sh && json_is_array(sh)) n_dims_total += json_array_size(sh);
    }
    f->t = calloc(n_keys ? n_keys : 1, sizeof(*f->t));
    f->shapes = calloc(n_dims_total ? n_dims_total : 1, sizeof(uint64_t));
    if (!f->t || !f->shapes) {
        st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory for %zu tensors", p, n_keys);
        goto done;
    }
    uint64_t *pool = f->shapes;
    json_object_foreach(h, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            st = parse_metadata(f, val);
        } else {
            st = parse_tensor(f, key, val, &f->t[f->n], &pool);
            if (st == QLR_OK) f->n++;
        }
        if (st != QLR_OK) goto done;
    }
    qsort(f->t, f->n, sizeof(*f->t), cmp_offset);
    uint64_t expect = 0;
    for (size_t i = 0; i < f->n; i++) {
        qlr_st_tensor *t = &f->t[i];
        if (t->offset != expect) {
            if (i == 0)
                st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": the data buffer must start at 0, "
                                "first tensor begins at %llu", p, t->name, (unsigned long long)t->offset);
            else
                st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\": begins at %llu but \"%s\" ends at %llu (%s)",
                                p, t->name, (unsigned long long)t->offset, f->t[i - 1].name,
                                (unsigned long long)expect, t->offset > expect ? "gap" : "overlap");
            goto done;
        }
        expect = t->offset + t->nbytes;
    }
    uint64_t data_size = f->size - 8 - n;
    if (expect != data_size) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: the tensors cover %llu data bytes but the file holds %llu (%s)",
                        p, (unsigned long long)expect, (unsigned long long)data_size,
                        expect < data_size ? "trailing bytes" : "truncated");
        goto done;
    }
    const uint8_t *data = f->base + 8 + n;
    for (size_t i = 0; i < f->n; i++) f->t[i].data = data + f->t[i].offset;
    f->by_name = calloc(f->n ? f->n : 1, sizeof(*f->by_name));
    if (!f->by_name) {
        st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", p);
        goto done;
    }
    for (size_t i = 0; i < f->n; i++) f->by_name[i] = &f->t[i];
    qsort(f->by_name, f->n, sizeof(*f->by_name), cmp_name_ptr);
done:
    json_decref(h);
    return st;
}

static qlr_status open_common(qlr_safetensors *f, qlr_safetensors **out) {
    qlr_status st = parse(f);
    if (st != QLR_OK) {
        qlr_safetensors_close(f);
        return st;
    }
    *out = f;
    return QLR_OK;
}

qlr_status qlr_safetensors_open_buffer(const void *data, size_t size, const char *name,
                                       qlr_safetensors **out) {
    QLR_ASSERT(out != NULL);
    *out = NULL;
    qlr_safetensors *f = calloc(1, sizeof(*f));
    if (!f) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    f->path = strdup(name ? name : "safetensors");
    if (!f->path) {
        free(f);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    f->base = data;
    f->size = size;
    return open_common(f, out);
}

qlr_status qlr_safetensors_open(const char *path, qlr_safetensors **out) {
    QLR_ASSERT(out != NULL);
    *out = NULL;
    qlr_safetensors *f = calloc(1, sizeof(*f));
    if (!f) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    f->path = strdup(path);
    if (!f->path) {
        free(f);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    qlr_status st = qlr_mmap_open(path, &f->map);
    if (st != QLR_OK) {
        qlr_safetensors_close(f);
        return st;
    }
    f->base = f->map.data;
    f->size = f->map.size;
    return open_common(f, out);
}

size_t qlr_safetensors_count(const qlr_safetensors *f) { return f->n; }

const qlr_st_tensor *qlr_safetensors_tensor(const qlr_safetensors *f, size_t i) {
    return i < f->n ? &f->t[i] : NULL;
}

const qlr_st_tensor *qlr_safetensors_find(const qlr_safetensors *f, const char *name) {
    return find_sorted(f->by_name, f->n, name);
}

const char *qlr_safetensors_metadata(const qlr_safetensors *f, const char *key) {
    for (size_t i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta_k[i], key) == 0) return f->meta_v[i];
    return NULL;
}

size_t qlr_safetensors_metadata_count(const qlr_safetensors *f) { return f->n_meta; }

void qlr_safetensors_metadata_at(const qlr_safetensors *f, size_t i, const char **key,
                                 const char **value) {
    QLR_ASSERT(i < f->n_meta);
    *key = f->meta_k[i];
    *value = f->meta_v[i];
}

uint64_t qlr_safetensors_header_size(const qlr_safetensors *f) { return f->header_n; }
uint64_t qlr_safetensors_file_size(const qlr_safetensors *f) { return f->size; }
const char *qlr_safetensors_path(const qlr_safetensors *f) { return f->path; }

int qlr_safetensors_sniff(const void *head, size_t n) {
    const uint8_t *b = head;
    return n >= 9 && b[8] == '{';
}

/* ---- sharded sets ------------------------------------------------------------------------ */

struct qlr_st_set {
    char *index_path;
    size_t n_files;
    qlr_safetensors **files;
    size_t n;
    qlr_st_tensor *t;              /* copies, .file set */
    const qlr_st_tensor **by_name;
};

void qlr_st_set_close(qlr_st_set *s) {
    if (!s) return;
    for (size_t i = 0; i < s->n_files; i++) qlr_safetensors_close(s->files[i]);
    free(s->files);
    free(s->t);
    free(s->by_name);
    free(s->index_path);
    free(s);
}

static char *path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (!p) return NULL;
    memcpy(p, dir, a);
    size_t o = a;
    if (a && dir[a - 1] != '/') p[o++] = '/';
    memcpy(p + o, name, b + 1);
    return p;
}

static char *dir_of(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return strdup(".");
    if (slash == path) return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Builds the by-name index; refuses a name present twice (across shards). */
static qlr_status set_finish(qlr_st_set *s, const char *what) {
    s->by_name = calloc(s->n ? s->n : 1, sizeof(*s->by_name));
    if (!s->by_name) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", what);
    for (size_t i = 0; i < s->n; i++) s->by_name[i] = &s->t[i];
    qsort(s->by_name, s->n, sizeof(*s->by_name), cmp_name_ptr);
    for (size_t i = 1; i < s->n; i++)
        if (strcmp(s->by_name[i - 1]->name, s->by_name[i]->name) == 0)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\" is in both %s and %s", what,
                              s->by_name[i]->name, s->files[s->by_name[i - 1]->file]->path,
                              s->files[s->by_name[i]->file]->path);
    return QLR_OK;
}

static qlr_status set_add_file(qlr_st_set *s, const char *path) {
    qlr_safetensors *f = NULL;
    QLR_TRY(qlr_safetensors_open(path, &f));
    s->files[s->n_files++] = f;
    return QLR_OK;
}

/* All tensors of every file, in (file, offset) order. */
static qlr_status set_take_all(qlr_st_set *s, const char *what) {
    size_t total = 0;
    for (size_t i = 0; i < s->n_files; i++) total += s->files[i]->n;
    s->t = calloc(total ? total : 1, sizeof(*s->t));
    if (!s->t) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", what);
    for (size_t i = 0; i < s->n_files; i++)
        for (size_t j = 0; j < s->files[i]->n; j++) {
            s->t[s->n] = s->files[i]->t[j];
            s->t[s->n].file = (uint32_t)i;
            s->n++;
        }
    return set_finish(s, what);
}

static qlr_status open_folder_listing(qlr_st_set *s, const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return qlr_errorf(QLR_ERR_IO, "%s: cannot list the folder", dir);
    size_t n = 0, cap = 0;
    char **names = NULL;
    qlr_status st = QLR_OK;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || !ends_with(e->d_name, ".safetensors")) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            char **nn = realloc(names, cap * sizeof(*names));
            if (!nn) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", dir); break; }
            names = nn;
        }
        names[n] = strdup(e->d_name);
        if (!names[n]) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", dir); break; }
        n++;
    }
    closedir(d);
    if (st == QLR_OK && n == 0)
        st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: no *.safetensors file and no *.safetensors.index.json", dir);
    if (st == QLR_OK) {
        qsort(names, n, sizeof(*names), cmp_str);
        s->files = calloc(n, sizeof(*s->files));
        if (!s->files) st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", dir);
    }
    for (size_t i = 0; st == QLR_OK && i < n; i++) {
        char *p = path_join(dir, names[i]);
        st = p ? set_add_file(s, p) : qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", dir);
        free(p);
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    if (st != QLR_OK) return st;
    return set_take_all(s, dir);
}

/* A shard name from an index must stay inside the index's folder. */
static int shard_name_ok(const char *name) {
    if (!name[0] || name[0] == '/') return 0;
    for (const char *p = name; *p;) {
        const char *slash = strchr(p, '/');
        size_t len = slash ? (size_t)(slash - p) : strlen(p);
        if (len == 2 && p[0] == '.' && p[1] == '.') return 0;
        if (!slash) break;
        p = slash + 1;
    }
    return 1;
}

static qlr_status open_index(qlr_st_set *s, const char *index) {
    json_t *root = NULL, *map = NULL;
    char *dir = NULL, **shards = NULL;
    size_t n_shards = 0;
    qlr_status st = qlr_json_load_file(index, &root);
    if (st != QLR_OK) return st;
    s->index_path = strdup(index);
    dir = dir_of(index);
    if (!s->index_path || !dir) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", index); goto done; }
    if (!json_is_object(root)) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: expected a JSON object, got %s", index, qlr_json_type_name(root));
        goto done;
    }
    st = qlr_json_get_object(root, index, "weight_map", &map);
    if (st != QLR_OK) goto done;
    size_t n_map = json_object_size(map);
    shards = calloc(n_map ? n_map : 1, sizeof(*shards));
    if (!shards) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", index); goto done; }
    const char *name;
    json_t *v;
    json_object_foreach(map, name, v) {
        if (!json_is_string(v)) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: weight_map \"%s\": expected a file name, got %s", index,
                            name, qlr_json_type_name(v));
            goto done;
        }
        const char *file = json_string_value(v);
        if (!shard_name_ok(file)) {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: weight_map \"%s\": shard \"%s\" is not a file name inside "
                            "the index's folder", index, name, file);
            goto done;
        }
        shards[n_shards++] = (char *)file;
    }
    qsort(shards, n_shards, sizeof(*shards), cmp_str);
    size_t u = 0;
    for (size_t i = 0; i < n_shards; i++)
        if (u == 0 || strcmp(shards[u - 1], shards[i]) != 0) shards[u++] = shards[i];
    n_shards = u;
    s->files = calloc(n_shards ? n_shards : 1, sizeof(*s->files));
    s->t = calloc(n_map ? n_map : 1, sizeof(*s->t));
    if (!s->files || !s->t) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", index); goto done; }
    for (size_t i = 0; i < n_shards; i++) {
        char *p = path_join(dir, shards[i]);
        if (!p) { st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", index); goto done; }
        if (!qlr_path_exists(p)) {
            const char *who = "?";
            json_object_foreach(map, name, v) if (strcmp(json_string_value(v), shards[i]) == 0) { who = name; break; }
            st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: shard \"%s\" (named for tensor \"%s\") does not exist: %s",
                            index, shards[i], who, p);
            free(p);
            goto done;
        }
        st = set_add_file(s, p);
        free(p);
        if (st != QLR_OK) { qlr_error_prefix("%s: shard \"%s\"", index, shards[i]); goto done; }
    }
    /* (file, offset) order: walk each shard and keep the tensors the map assigns to it */
    size_t ignored = 0;
    for (size_t i = 0; i < n_shards; i++) {
        qlr_safetensors *f = s->files[i];
        for (size_t j = 0; j < f->n; j++) {
            json_t *m = json_object_get(map, f->t[j].name);
            if (!m || strcmp(json_string_value(m), shards[i]) != 0) {
                ignored++;
                continue;
            }
            s->t[s->n] = f->t[j];
            s->t[s->n].file = (uint32_t)i;
            s->n++;
        }
    }
    if (s->n != n_map) {
        /* some mapped tensor was not found in its shard: name the first one */
        json_object_foreach(map, name, v) {
            const char *file = json_string_value(v);
            size_t i = 0;
            while (i < n_shards && strcmp(shards[i], file) != 0) i++;
            if (i == n_shards || !qlr_safetensors_find(s->files[i], name)) {
                st = qlr_errorf(QLR_ERR_FORMAT, "%s: tensor \"%s\" is mapped to shard \"%s\" but that shard "
                                "does not hold it", index, name, file);
                goto done;
            }
        }
        st = qlr_errorf(QLR_ERR_INTERNAL, "%s: tensor count mismatch", index);
        goto done;
    }
    if (ignored)
        QLR_LOGW("%s: %zu tensor(s) in the shards are not named by weight_map and are ignored", index,
                 ignored);
    st = set_finish(s, index);
done:
    free(shards);
    free(dir);
    json_decref(root);
    return st;
}

qlr_status qlr_st_set_open(const char *path, qlr_st_set **out) {
    QLR_ASSERT(out != NULL);
    *out = NULL;
    qlr_st_set *s = calloc(1, sizeof(*s));
    if (!s) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    qlr_status st;
    if (qlr_is_dir(path)) {
        char *idx = path_join(path, "model.safetensors.index.json");
        if (!idx) { st = qlr_errorf(QLR_ERR_NOMEM, "out of memory"); goto done; }
        if (!qlr_path_exists(idx)) {
            /* the folder's only *.safetensors.index.json, if any */
            free(idx);
            idx = NULL;
            DIR *d = opendir(path);
            if (!d) { st = qlr_errorf(QLR_ERR_IO, "%s: cannot list the folder", path); goto done; }
            struct dirent *e;
            int count = 0;
            while ((e = readdir(d)) != NULL) {
                if (e->d_name[0] == '.' || !ends_with(e->d_name, ".safetensors.index.json")) continue;
                if (++count == 1) idx = path_join(path, e->d_name);
            }
            closedir(d);
            if (count > 1) {
                free(idx);
                st = qlr_errorf(QLR_ERR_INVALID, "%s: %d *.safetensors.index.json files; name the one to use",
                                path, count);
                goto done;
            }
        }
        st = idx ? open_index(s, idx) : open_folder_listing(s, path);
        free(idx);
    } else if (ends_with(path, ".json")) {
        st = open_index(s, path);
    } else {
        s->files = calloc(1, sizeof(*s->files));
        st = s->files ? set_add_file(s, path) : qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        if (st == QLR_OK) st = set_take_all(s, path);
    }
done:
    if (st != QLR_OK) {
        qlr_st_set_close(s);
        return st;
    }
    *out = s;
    return QLR_OK;
}

size_t qlr_st_set_count(const qlr_st_set *s) { return s->n; }
const qlr_st_tensor *qlr_st_set_tensor(const qlr_st_set *s, size_t i) {
    return i < s->n ? &s->t[i] : NULL;
}
const qlr_st_tensor *qlr_st_set_find(const qlr_st_set *s, const char *name) {
    return find_sorted(s->by_name, s->n, name);
}
size_t qlr_st_set_n_files(const qlr_st_set *s) { return s->n_files; }
const qlr_safetensors *qlr_st_set_file(const qlr_st_set *s, size_t i) {
    return i < s->n_files ? s->files[i] : NULL;
}
const char *qlr_st_set_index_path(const qlr_st_set *s) { return s->index_path; }

/* ---- writer ------------------------------------------------------------------------------ */

typedef struct wtensor {
    char *name;
    qlr_st_dtype dtype;
    uint32_t n_dims;
    uint64_t *shape;
    const void *data;
    uint64_t nbytes;
} wtensor;

struct qlr_st_writer {
    size_t n, cap;
    wtensor *t;
    size_t n_meta;
    char **meta_k, **meta_v;
};

qlr_st_writer *qlr_st_writer_create(void) {
    qlr_st_writer *w = calloc(1, sizeof(*w));
    if (!w) qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
    return w;
}

void qlr_st_writer_free(qlr_st_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n; i++) {
        free(w->t[i].name);
        free(w->t[i].shape);
    }
    for (size_t i = 0; i < w->n_meta; i++) {
        free(w->meta_k[i]);
        free(w->meta_v[i]);
    }
    free(w->t);
    free(w->meta_k);
    free(w->meta_v);
    free(w);
}

static int valid_utf8(const char *s) {
    json_t *j = json_string(s); /* jansson refuses invalid UTF-8 */
    if (!j) return 0;
    json_decref(j);
    return 1;
}

qlr_status qlr_st_writer_set_metadata(qlr_st_writer *w, const char *key, const char *value) {
    if (!valid_utf8(key) || !valid_utf8(value))
        return qlr_errorf(QLR_ERR_INVALID, "safetensors writer: metadata \"%s\" is not valid UTF-8", key);
    for (size_t i = 0; i < w->n_meta; i++)
        if (strcmp(w->meta_k[i], key) == 0) {
            char *v = strdup(value);
            if (!v) return qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
            free(w->meta_v[i]);
            w->meta_v[i] = v;
            return QLR_OK;
        }
    char **k = realloc(w->meta_k, (w->n_meta + 1) * sizeof(char *));
    if (k) w->meta_k = k;
    char **v = realloc(w->meta_v, (w->n_meta + 1) * sizeof(char *));
    if (v) w->meta_v = v;
    if (!k || !v) return qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
    char *kk = strdup(key), *vv = strdup(value);
    if (!kk || !vv) {
        free(kk);
        free(vv);
        return qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
    }
    /* keep key order (the reference writer's HashMap order is arbitrary; ours is stable) */
    size_t i = w->n_meta;
    while (i > 0 && strcmp(w->meta_k[i - 1], kk) > 0) {
        w->meta_k[i] = w->meta_k[i - 1];
        w->meta_v[i] = w->meta_v[i - 1];
        i--;
    }
    w->meta_k[i] = kk;
    w->meta_v[i] = vv;
    w->n_meta++;
    return QLR_OK;
}

qlr_status qlr_st_writer_add(qlr_st_writer *w, const char *name, qlr_st_dtype dtype,
                             uint32_t n_dims, const uint64_t *shape, const void *data,
                             uint64_t nbytes) {
    if (!name || strcmp(name, "__metadata__") == 0 || !valid_utf8(name))
        return qlr_errorf(QLR_ERR_INVALID, "safetensors writer: invalid tensor name \"%s\"",
                          name ? name : "(null)");
    if ((unsigned)dtype >= QLR_ST_DTYPE_COUNT)
        return qlr_errorf(QLR_ERR_INVALID, "safetensors writer: tensor \"%s\": unknown dtype %d", name,
                          (int)dtype);
    for (size_t i = 0; i < w->n; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return qlr_errorf(QLR_ERR_INVALID, "safetensors writer: tensor \"%s\" added twice", name);
    uint64_t numel, need;
    const char *why = NULL;
    if (!tensor_bytes(dtype, shape, n_dims, &numel, &need, &why))
        return qlr_errorf(QLR_ERR_INVALID, "safetensors writer: tensor \"%s\": %s", name, why);
    if (need != nbytes)
        return qlr_errorf(QLR_ERR_INVALID, "safetensors writer: tensor \"%s\": %llu bytes given, %s of %llu "
                          "elements needs %llu", name, (unsigned long long)nbytes, k_dtypes[dtype].name,
                          (unsigned long long)numel, (unsigned long long)need);
    if (nbytes && !data)
        return qlr_errorf(QLR_ERR_INVALID, "safetensors writer: tensor \"%s\": no data", name);
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 16;
        wtensor *t = realloc(w->t, cap * sizeof(*t));
        if (!t) return qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
        w->t = t;
        w->cap = cap;
    }
    wtensor *t = &w->t[w->n];
    memset(t, 0, sizeof(*t));
    t->name = strdup(name);
    t->shape = malloc((n_dims ? n_dims : 1) * sizeof(uint64_t));
    if (!t->name || !t->shape) {
        free(t->name);
        free(t->shape);
        return qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
    }
    if (n_dims) memcpy(t->shape, shape, n_dims * sizeof(uint64_t));
    t->dtype = dtype;
    t->n_dims = n_dims;
    t->data = data;
    t->nbytes = nbytes;
    w->n++;
    return QLR_OK;
}

/* serde_json string escaping: \" \\ \b \f \n \r \t, other controls \u00xx, the rest as is. */
static void hb_string(qlr_strbuf *b, const char *s) {
    char tmp[8];
    qlr_strbuf_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        switch (c) {
        case '"': qlr_strbuf_puts(b, "\\\""); break;
        case '\\': qlr_strbuf_puts(b, "\\\\"); break;
        case '\b': qlr_strbuf_puts(b, "\\b"); break;
        case '\f': qlr_strbuf_puts(b, "\\f"); break;
        case '\n': qlr_strbuf_puts(b, "\\n"); break;
        case '\r': qlr_strbuf_puts(b, "\\r"); break;
        case '\t': qlr_strbuf_puts(b, "\\t"); break;
        default:
            if (c < 0x20) {
                snprintf(tmp, sizeof(tmp), "\\u%04x", c);
                qlr_strbuf_puts(b, tmp);
            } else {
                qlr_strbuf_put(b, (const char *)&c, 1);
            }
        }
    }
    qlr_strbuf_put(b, "\"", 1);
}

static int cmp_wtensor(const void *a, const void *b) {
    const wtensor *x = *(const wtensor *const *)a, *y = *(const wtensor *const *)b;
    if (x->dtype != y->dtype) return x->dtype > y->dtype ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Header text and the tensors in data order (*order, malloc'ed). */
static qlr_status build_header(qlr_st_writer *w, qlr_strbuf *b, wtensor ***order) {
    char tmp[64];
    wtensor **o = malloc((w->n ? w->n : 1) * sizeof(*o));
    if (!o) return qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
    for (size_t i = 0; i < w->n; i++) o[i] = &w->t[i];
    qsort(o, w->n, sizeof(*o), cmp_wtensor);
    qlr_strbuf_puts(b, "{");
    int first = 1;
    if (w->n_meta) {
        qlr_strbuf_puts(b, "\"__metadata__\":{");
        for (size_t i = 0; i < w->n_meta; i++) {
            if (i) qlr_strbuf_puts(b, ",");
            hb_string(b, w->meta_k[i]);
            qlr_strbuf_puts(b, ":");
            hb_string(b, w->meta_v[i]);
        }
        qlr_strbuf_puts(b, "}");
        first = 0;
    }
    uint64_t off = 0;
    for (size_t i = 0; i < w->n; i++) {
        wtensor *t = o[i];
        if (!first) qlr_strbuf_puts(b, ",");
        first = 0;
        hb_string(b, t->name);
        qlr_strbuf_puts(b, ":{\"dtype\":\"");
        qlr_strbuf_puts(b, k_dtypes[t->dtype].name);
        qlr_strbuf_puts(b, "\",\"shape\":[");
        for (uint32_t d = 0; d < t->n_dims; d++) {
            snprintf(tmp, sizeof(tmp), "%s%llu", d ? "," : "", (unsigned long long)t->shape[d]);
            qlr_strbuf_puts(b, tmp);
        }
        uint64_t end;
        if (!qlr_add_ok(off, t->nbytes, &end)) {
            free(o);
            return qlr_errorf(QLR_ERR_RANGE, "safetensors writer: total size overflows");
        }
        snprintf(tmp, sizeof(tmp), "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                 (unsigned long long)end);
        qlr_strbuf_puts(b, tmp);
        off = end;
    }
    qlr_strbuf_puts(b, "}");
    while (b->n % 8) qlr_strbuf_puts(b, " ");
    if (b->oom) {
        free(o);
        return qlr_errorf(QLR_ERR_NOMEM, "safetensors writer: out of memory");
    }
    *order = o;
    return QLR_OK;
}

qlr_status qlr_st_writer_header(qlr_st_writer *w, char **out, size_t *n) {
    qlr_strbuf b = {0};
    wtensor **o = NULL;
    qlr_status st = build_header(w, &b, &o);
    free(o);
    if (st != QLR_OK) {
        free(b.p);
        return st;
    }
    *out = b.p;
    *n = b.n;
    return QLR_OK;
}

qlr_status qlr_st_writer_write(qlr_st_writer *w, const char *path) {
    qlr_strbuf b = {0};
    wtensor **o = NULL;
    qlr_status st = build_header(w, &b, &o);
    if (st != QLR_OK) {
        free(b.p);
        return qlr_error_prefix("writing %s", path);
    }
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)b.n >> (8 * i));
    qlr_afile af;
    st = qlr_afile_open(&af, path);
    if (st == QLR_OK) {
        st = qlr_afile_write(&af, len, 8);
        if (st == QLR_OK) st = qlr_afile_write(&af, b.p, b.n);
        for (size_t i = 0; st == QLR_OK && i < w->n; i++)
            if (o[i]->nbytes) st = qlr_afile_write(&af, o[i]->data, (size_t)o[i]->nbytes);
        if (st == QLR_OK) st = qlr_afile_commit(&af);
        else qlr_afile_abort(&af);
    }
    free(o);
    free(b.p);
    return st;
}

/* ---- inspect ----------------------------------------------------------------------------- */

static void print_shape(FILE *out, const qlr_st_tensor *t) {
    fputc('[', out);
    for (uint32_t d = 0; d < t->n_dims; d++) fprintf(out, "%s%llu", d ? ", " : "", (unsigned long long)t->shape[d]);
    fputc(']', out);
}

qlr_status qlr_safetensors_print_summary(FILE *out, const char *path, int all) {
    qlr_st_set *s = NULL;
    QLR_TRY(qlr_st_set_open(path, &s));
    fprintf(out, "%s: safetensors", path);
    if (qlr_st_set_index_path(s)) fprintf(out, ", index %s", qlr_st_set_index_path(s));
    fprintf(out, ", %zu file(s), %zu tensor(s)\n", qlr_st_set_n_files(s), qlr_st_set_count(s));
    uint64_t total_bytes = 0, total_elems = 0;
    uint64_t per_dtype[QLR_ST_DTYPE_COUNT] = {0};
    size_t next = 0;
    for (size_t fi = 0; fi < qlr_st_set_n_files(s); fi++) {
        const qlr_safetensors *f = qlr_st_set_file(s, fi);
        fprintf(out, "file %s: %llu bytes, header %llu bytes\n", f->path, (unsigned long long)f->size,
                (unsigned long long)f->header_n);
        for (size_t m = 0; m < f->n_meta; m++) fprintf(out, "  metadata %s = %s\n", f->meta_k[m], f->meta_v[m]);
        size_t shown = 0, in_file = 0;
        for (; next < s->n && s->t[next].file == fi; next++, in_file++) {
            const qlr_st_tensor *t = &s->t[next];
            total_bytes += t->nbytes;
            total_elems += t->numel;
            per_dtype[t->dtype] += t->nbytes;
            if (!all && shown >= 20) continue;
            fprintf(out, "  %-48s %-11s ", t->name, k_dtypes[t->dtype].name);
            print_shape(out, t);
            fprintf(out, " %llu bytes @%llu\n", (unsigned long long)t->nbytes, (unsigned long long)t->offset);
            shown++;
        }
        if (in_file > shown) fprintf(out, "  ... %zu more (use --all)\n", in_file - shown);
    }
    fprintf(out, "total: %zu tensors, %llu elements, %llu bytes", s->n, (unsigned long long)total_elems,
            (unsigned long long)total_bytes);
    for (int d = QLR_ST_DTYPE_COUNT - 1; d >= 0; d--)
        if (per_dtype[d]) fprintf(out, ", %s %llu", k_dtypes[d].name, (unsigned long long)per_dtype[d]);
    fprintf(out, "\nvalid\n");
    qlr_st_set_close(s);
    return QLR_OK;
}
