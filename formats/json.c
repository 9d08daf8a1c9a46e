/* formats/json.c: loading with positioned errors, typed getters that name the key path, and
 * the Python-style pretty writer (indent 2, sorted keys, shortest floats) over jansson.
 * jansson does all parsing; the writer is ours only because jansson prints reals with 17
 * significant digits (0.05 -> 0.050000000000000003), which PEFT's files never contain. */
#include "formats/json.h"
#include "core/strbuf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"

static qlr_status load_error(const char *name, const json_error_t *err) {
    return qlr_errorf(QLR_ERR_FORMAT, "%s:%d:%d: %s", name, err->line, err->column, err->text);
}

qlr_status qlr_json_load_buffer(const char *name, const void *data, size_t n, json_t **out) {
    QLR_ASSERT(out != NULL);
    *out = NULL;
    /* A raw NUL byte is never valid JSON, but jansson lets one through right after a number
     * ("[1\0,2]"); refuse it here with its position. */
    const char *nul = data ? memchr(data, 0, n) : NULL;
    if (nul) {
        int line = 1, col = 1;
        for (const char *c = data; c < nul; c++) {
            if (*c == '\n') { line++; col = 1; }
            else col++;
        }
        return qlr_errorf(QLR_ERR_FORMAT, "%s:%d:%d: NUL byte in JSON text", name ? name : "json",
                          line, col);
    }
    json_error_t err;
    memset(&err, 0, sizeof(err));
    json_t *v = json_loadb(data ? (const char *)data : "", data ? n : 0,
                           JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &err);
    if (!v) return load_error(name ? name : "json", &err);
    *out = v;
    return QLR_OK;
}

qlr_status qlr_json_load_file(const char *path, json_t **out) {
    QLR_ASSERT(out != NULL);
    *out = NULL;
    char *buf = NULL;
    size_t n = 0;
    qlr_status st = qlr_file_read_all(path, QLR_JSON_MAX_FILE_SIZE, &buf, &n);
    if (st != QLR_OK) return st;
    st = qlr_json_load_buffer(path, buf, n, out);
    free(buf);
    return st;
}

const char *qlr_json_type_name(const json_t *v) {
    if (!v) return "missing";
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "object";
    case JSON_ARRAY: return "array";
    case JSON_STRING: return "string";
    case JSON_INTEGER: return "integer";
    case JSON_REAL: return "real";
    case JSON_TRUE: return "true";
    case JSON_FALSE: return "false";
    case JSON_NULL: return "null";
    }
    return "unknown";
}

json_t *qlr_json_lookup(const json_t *obj, const char *key) {
    if (!obj || !json_is_object(obj) || !key) return NULL;
    json_t *v = json_object_get(obj, key);
    if (v) return v;
    /* Dotted path: try each split point left to right, so keys that themselves hold dots
     * still resolve when the rest of the path matches. */
    for (const char *dot = strchr(key, '.'); dot; dot = strchr(dot + 1, '.')) {
        size_t len = (size_t)(dot - key);
        json_t *child = json_object_getn(obj, key, len);
        if (child && json_is_object(child)) {
            json_t *r = qlr_json_lookup(child, dot + 1);
            if (r) return r;
        }
    }
    return NULL;
}

/* Finds `key`: 1 found (non-null), 0 missing or null (optional), <0 error already recorded. */
static int find(const json_t *obj, const char *src, const char *key, int required, json_t **v,
                qlr_status *st) {
    *v = qlr_json_lookup(obj, key);
    if (*v && !json_is_null(*v)) return 1;
    if (!required) return 0;
    if (!obj || !json_is_object(obj))
        *st = qlr_errorf(QLR_ERR_FORMAT, "%s: expected an object holding key \"%s\", got %s",
                         src ? src : "json", key, qlr_json_type_name(obj));
    else if (*v)
        *st = qlr_errorf(QLR_ERR_FORMAT, "%s: key \"%s\": must not be null", src ? src : "json",
                         key);
    else
        *st = qlr_errorf(QLR_ERR_NOT_FOUND, "%s: missing key \"%s\"", src ? src : "json", key);
    return -1;
}

static qlr_status type_error(const char *src, const char *key, const char *what, const json_t *v) {
    return qlr_errorf(QLR_ERR_FORMAT, "%s: key \"%s\": expected %s, got %s", src ? src : "json",
                      key, what, qlr_json_type_name(v));
}

static qlr_status get_int(const json_t *obj, const char *src, const char *key, int required,
                          int64_t def, int64_t *out) {
    json_t *v;
    qlr_status st = QLR_OK;
    int r = find(obj, src, key, required, &v, &st);
    if (r < 0) return st;
    if (r == 0) { *out = def; return QLR_OK; }
    if (json_is_integer(v)) { *out = (int64_t)json_integer_value(v); return QLR_OK; }
    if (json_is_real(v)) {
        /* 2048.0 is an integer written by a float-happy tool; 1.5 is not. */
        double d = json_real_value(v);
        if (d == floor(d) && d >= -9.2233720368547758e18 && d < 9.2233720368547758e18) {
            *out = (int64_t)d;
            return QLR_OK;
        }
        return qlr_errorf(QLR_ERR_FORMAT, "%s: key \"%s\": expected an integer, got real %g",
                          src ? src : "json", key, d);
    }
    return type_error(src, key, "an integer", v);
}

qlr_status qlr_json_get_int(const json_t *obj, const char *src, const char *key, int64_t *out) {
    return get_int(obj, src, key, 1, 0, out);
}
qlr_status qlr_json_get_int_opt(const json_t *obj, const char *src, const char *key, int64_t def,
                                int64_t *out) {
    return get_int(obj, src, key, 0, def, out);
}

static qlr_status get_double(const json_t *obj, const char *src, const char *key, int required,
                             double def, double *out) {
    json_t *v;
    qlr_status st = QLR_OK;
    int r = find(obj, src, key, required, &v, &st);
    if (r < 0) return st;
    if (r == 0) { *out = def; return QLR_OK; }
    if (!json_is_number(v)) return type_error(src, key, "a number", v);
    *out = json_number_value(v);
    return QLR_OK;
}

qlr_status qlr_json_get_double(const json_t *obj, const char *src, const char *key, double *out) {
    return get_double(obj, src, key, 1, 0.0, out);
}
qlr_status qlr_json_get_double_opt(const json_t *obj, const char *src, const char *key, double def,
                                   double *out) {
    return get_double(obj, src, key, 0, def, out);
}

static qlr_status get_bool(const json_t *obj, const char *src, const char *key, int required,
                           int def, int *out) {
    json_t *v;
    qlr_status st = QLR_OK;
    int r = find(obj, src, key, required, &v, &st);
    if (r < 0) return st;
    if (r == 0) { *out = def; return QLR_OK; }
    if (!json_is_boolean(v)) return type_error(src, key, "a boolean", v);
    *out = json_is_true(v);
    return QLR_OK;
}

qlr_status qlr_json_get_bool(const json_t *obj, const char *src, const char *key, int *out) {
    return get_bool(obj, src, key, 1, 0, out);
}
qlr_status qlr_json_get_bool_opt(const json_t *obj, const char *src, const char *key, int def,
                                 int *out) {
    return get_bool(obj, src, key, 0, def, out);
}

static qlr_status get_string(const json_t *obj, const char *src, const char *key, int required,
                             const char *def, const char **out) {
    json_t *v;
    qlr_status st = QLR_OK;
    int r = find(obj, src, key, required, &v, &st);
    if (r < 0) return st;
    if (r == 0) { *out = def; return QLR_OK; }
    if (!json_is_string(v)) return type_error(src, key, "a string", v);
    *out = json_string_value(v);
    return QLR_OK;
}

qlr_status qlr_json_get_string(const json_t *obj, const char *src, const char *key,
                               const char **out) {
    return get_string(obj, src, key, 1, NULL, out);
}
qlr_status qlr_json_get_string_opt(const json_t *obj, const char *src, const char *key,
                                   const char *def, const char **out) {
    return get_string(obj, src, key, 0, def, out);
}

static qlr_status get_typed(const json_t *obj, const char *src, const char *key, int required,
                            json_type want, const char *what, json_t **out) {
    json_t *v;
    qlr_status st = QLR_OK;
    int r = find(obj, src, key, required, &v, &st);
    if (r < 0) return st;
    if (r == 0) { *out = NULL; return QLR_OK; }
    if (json_typeof(v) != want) return type_error(src, key, what, v);
    *out = v;
    return QLR_OK;
}

qlr_status qlr_json_get_object(const json_t *obj, const char *src, const char *key, json_t **out) {
    return get_typed(obj, src, key, 1, JSON_OBJECT, "an object", out);
}
qlr_status qlr_json_get_object_opt(const json_t *obj, const char *src, const char *key,
                                   json_t **out) {
    return get_typed(obj, src, key, 0, JSON_OBJECT, "an object", out);
}
qlr_status qlr_json_get_array(const json_t *obj, const char *src, const char *key, json_t **out) {
    return get_typed(obj, src, key, 1, JSON_ARRAY, "an array", out);
}
qlr_status qlr_json_get_array_opt(const json_t *obj, const char *src, const char *key,
                                  json_t **out) {
    return get_typed(obj, src, key, 0, JSON_ARRAY, "an array", out);
}

/* ---- pretty writer ---------------------------------------------------------------------- */

/* Decodes one UTF-8 sequence (jansson guarantees valid UTF-8 in strings). */
static size_t utf8_next(const unsigned char *s, size_t n, uint32_t *cp) {
    unsigned c = s[0];
    size_t len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    if (len > n) { *cp = 0xFFFD; return 1; }
    uint32_t v = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t i = 1; i < len; i++) v = (v << 6) | (s[i] & 0x3F);
    *cp = v;
    return len;
}

/* Python's ensure_ascii string escaping: \" \\ \n \r \t \b \f, other controls and every
 * non-ASCII code point as \uXXXX (lowercase hex, surrogate pairs above U+FFFF). */
static void put_string(qlr_strbuf *b, const char *s, size_t n) {
    char tmp[16];
    qlr_strbuf_put(b, "\"", 1);
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') {
            size_t j = i;
            while (j < n && (unsigned char)s[j] >= 0x20 && (unsigned char)s[j] < 0x7F &&
                   s[j] != '"' && s[j] != '\\')
                j++;
            qlr_strbuf_put(b, s + i, j - i);
            i = j;
            continue;
        }
        uint32_t cp;
        i += utf8_next((const unsigned char *)s + i, n - i, &cp);
        switch (cp) {
        case '"': qlr_strbuf_puts(b, "\\\""); break;
        case '\\': qlr_strbuf_puts(b, "\\\\"); break;
        case '\n': qlr_strbuf_puts(b, "\\n"); break;
        case '\r': qlr_strbuf_puts(b, "\\r"); break;
        case '\t': qlr_strbuf_puts(b, "\\t"); break;
        case '\b': qlr_strbuf_puts(b, "\\b"); break;
        case '\f': qlr_strbuf_puts(b, "\\f"); break;
        default:
            if (cp >= 0x10000) {
                uint32_t v = cp - 0x10000;
                snprintf(tmp, sizeof(tmp), "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
            } else {
                snprintf(tmp, sizeof(tmp), "\\u%04x", cp);
            }
            qlr_strbuf_puts(b, tmp);
        }
    }
    qlr_strbuf_put(b, "\"", 1);
}

/* Python repr(float): the shortest digits that round-trip; positional notation when the
 * decimal exponent e is in [-5, 16) with ".0" added to integers, else d[.ddd]e+XX. */
static void put_real(qlr_strbuf *b, double x) {
    char tmp[40];
    int prec = 1;
    for (; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, x);
        if (strtod(tmp, NULL) == x) break;
    }
    /* tmp = [-]d[.ddd]e[+-]XX */
    char digits[24];
    int nd = 0, neg = 0;
    const char *p = tmp;
    if (*p == '-') { neg = 1; p++; }
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[nd++] = *p;
    int e = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    char out[64];
    size_t o = 0;
    if (neg) out[o++] = '-';
    if (e < -4 || e >= 16) {
        out[o++] = digits[0];
        if (nd > 1) {
            out[o++] = '.';
            for (int i = 1; i < nd; i++) out[o++] = digits[i];
        }
        o += (size_t)snprintf(out + o, sizeof(out) - o, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    } else if (e < 0) {
        out[o++] = '0';
        out[o++] = '.';
        for (int i = 0; i < -e - 1; i++) out[o++] = '0';
        for (int i = 0; i < nd; i++) out[o++] = digits[i];
    } else {
        for (int i = 0; i <= e; i++) out[o++] = i < nd ? digits[i] : '0';
        out[o++] = '.';
        if (nd > e + 1)
            for (int i = e + 1; i < nd; i++) out[o++] = digits[i];
        else
            out[o++] = '0';
    }
    qlr_strbuf_put(b, out, o);
}

static void put_indent(qlr_strbuf *b, int depth) {
    qlr_strbuf_put(b, "\n", 1);
    for (int i = 0; i < depth; i++) qlr_strbuf_put(b, "  ", 2);
}

static int cmp_key(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static qlr_status put_value(qlr_strbuf *b, const json_t *v, int depth) {
    char tmp[32];
    switch (json_typeof(v)) {
    case JSON_NULL: qlr_strbuf_puts(b, "null"); return QLR_OK;
    case JSON_TRUE: qlr_strbuf_puts(b, "true"); return QLR_OK;
    case JSON_FALSE: qlr_strbuf_puts(b, "false"); return QLR_OK;
    case JSON_INTEGER:
        snprintf(tmp, sizeof(tmp), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        qlr_strbuf_puts(b, tmp);
        return QLR_OK;
    case JSON_REAL: {
        double d = json_real_value(v);
        if (!isfinite(d)) return qlr_errorf(QLR_ERR_INVALID, "json: cannot write a non-finite number");
        put_real(b, d);
        return QLR_OK;
    }
    case JSON_STRING:
        put_string(b, json_string_value(v), json_string_length(v));
        return QLR_OK;
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        if (n == 0) { qlr_strbuf_puts(b, "[]"); return QLR_OK; }
        qlr_strbuf_puts(b, "[");
        for (size_t i = 0; i < n; i++) {
            if (i) qlr_strbuf_puts(b, ",");
            put_indent(b, depth + 1);
            QLR_TRY(put_value(b, json_array_get(v, i), depth + 1));
        }
        put_indent(b, depth);
        qlr_strbuf_puts(b, "]");
        return QLR_OK;
    }
    case JSON_OBJECT: {
        size_t n = json_object_size(v);
        if (n == 0) { qlr_strbuf_puts(b, "{}"); return QLR_OK; }
        const char **keys = malloc(n * sizeof(*keys));
        if (!keys) return qlr_errorf(QLR_ERR_NOMEM, "json: out of memory");
        size_t k = 0;
        const char *key;
        json_t *val;
        json_object_foreach((json_t *)v, key, val) keys[k++] = key;
        qsort(keys, k, sizeof(*keys), cmp_key);
        qlr_strbuf_puts(b, "{");
        qlr_status st = QLR_OK;
        for (size_t i = 0; i < k && st == QLR_OK; i++) {
            if (i) qlr_strbuf_puts(b, ",");
            put_indent(b, depth + 1);
            put_string(b, keys[i], strlen(keys[i]));
            qlr_strbuf_puts(b, ": ");
            st = put_value(b, json_object_get(v, keys[i]), depth + 1);
        }
        free(keys);
        QLR_TRY(st);
        put_indent(b, depth);
        qlr_strbuf_puts(b, "}");
        return QLR_OK;
    }
    }
    return qlr_errorf(QLR_ERR_INTERNAL, "json: unknown value type");
}

qlr_status qlr_json_dump_pretty(const json_t *v, char **out, size_t *n) {
    QLR_ASSERT(v != NULL && out != NULL);
    *out = NULL;
    qlr_strbuf b = {0};
    qlr_status st = put_value(&b, v, 0);
    if (st == QLR_OK && b.oom) st = qlr_errorf(QLR_ERR_NOMEM, "json: out of memory while writing");
    if (st == QLR_OK && !b.p) qlr_strbuf_put(&b, "", 0);
    if (st != QLR_OK || b.oom) {
        free(b.p);
        return st != QLR_OK ? st : qlr_errorf(QLR_ERR_NOMEM, "json: out of memory while writing");
    }
    *out = b.p;
    if (n) *n = b.n;
    return QLR_OK;
}

qlr_status qlr_json_write_file(const char *path, const json_t *v) {
    char *text = NULL;
    size_t n = 0;
    qlr_status st = qlr_json_dump_pretty(v, &text, &n);
    if (st != QLR_OK) return qlr_error_prefix("writing %s", path);
    st = qlr_write_atomic(path, text, n);
    free(text);
    return st;
}
