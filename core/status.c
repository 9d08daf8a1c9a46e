/* core/status.c: the thread-local last error (message + where it was raised). */
#include "core/status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QLR_ERRMSG_MAX 2048

static _Thread_local char tl_msg[QLR_ERRMSG_MAX];
static _Thread_local char tl_where[128];
static _Thread_local qlr_status tl_status;

const char *qlr_status_str(qlr_status st) {
    switch (st) {
    case QLR_OK: return "ok";
    case QLR_ERR_INVALID: return "invalid input";
    case QLR_ERR_FORMAT: return "format error";
    case QLR_ERR_UNSUPPORTED: return "unsupported";
    case QLR_ERR_IO: return "I/O error";
    case QLR_ERR_NOMEM: return "out of memory";
    case QLR_ERR_NOT_FOUND: return "not found";
    case QLR_ERR_RANGE: return "out of range";
    case QLR_ERR_DEVICE: return "device error";
    case QLR_ERR_CANCELLED: return "cancelled";
    case QLR_ERR_INTERNAL: return "internal error";
    case QLR_ERR_BUSY: return "busy";
    }
    return "unknown status";
}

qlr_status qlr_error_vset_(qlr_status st, const char *file, int line, const char *fmt, va_list ap) {
    vsnprintf(tl_msg, sizeof tl_msg, fmt, ap);
    const char *base = strrchr(file, '/');
    snprintf(tl_where, sizeof tl_where, "%s:%d", base ? base + 1 : file, line);
    tl_status = st;
    return st;
}

qlr_status qlr_error_set_(qlr_status st, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    qlr_error_vset_(st, file, line, fmt, ap);
    va_end(ap);
    return st;
}

qlr_status qlr_error_prefix(const char *fmt, ...) {
    char pre[512], old[QLR_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(pre, sizeof pre, fmt, ap);
    va_end(ap);
    memcpy(old, tl_msg, sizeof old);
    int k = snprintf(tl_msg, sizeof tl_msg, "%s: ", pre);
    if (k > 0 && (size_t)k < sizeof tl_msg) memcpy(tl_msg + k, old, strnlen(old, sizeof tl_msg - k - 1) + 1), tl_msg[sizeof tl_msg - 1] = 0;
    return tl_status;
}

const char *qlr_error_msg(void) { return tl_msg; }
const char *qlr_error_where(void) { return tl_where; }
qlr_status qlr_error_status(void) { return tl_status; }

void qlr_error_clear(void) {
    tl_msg[0] = 0;
    tl_where[0] = 0;
    tl_status = QLR_OK;
}

void qlr_assert_fail_(const char *cond, const char *file, int line) {
    fprintf(stderr, "qlora: internal error: assertion '%s' failed at %s:%d\n", cond, file, line);
    abort();
}
