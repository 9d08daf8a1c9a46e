/* core/strbuf.h: a growable NUL-terminated string buffer for writers that build text
 * (JSON, safetensors headers, YAML write-back, test listings). Appends never fail loudly: an
 * allocation failure sets `oom`, later appends do nothing, and the caller checks `oom` once at
 * the end. Start from a zeroed struct; free with qlr_strbuf_free. */
#ifndef QLR_CORE_STRBUF_H
#define QLR_CORE_STRBUF_H

#include <stddef.h>

typedef struct qlr_strbuf {
    char *p;    /* NUL-terminated once anything was appended; NULL before */
    size_t n;   /* bytes, without the NUL */
    size_t cap;
    int oom;    /* 1 after a failed allocation */
} qlr_strbuf;

/* Appends n bytes of s (s may hold NULs). */
void qlr_strbuf_put(qlr_strbuf *b, const char *s, size_t n);
void qlr_strbuf_puts(qlr_strbuf *b, const char *s);
void qlr_strbuf_printf(qlr_strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Frees the text and zeroes the struct. */
void qlr_strbuf_free(qlr_strbuf *b);

#endif
