/* core/status.h: status codes and the thread-local last error.
 *
 * Every fallible function returns a qlr_status. On failure it records a message a user can
 * act on ("model.gguf: tensor 'blk.3.attn_q.weight': offset 1234 is past the end of the file")
 * together with the file:line of the code that raised it. The caller either handles it or
 * returns the status unchanged; cli/ prints it. Nothing here allocates on the error path. */
#ifndef QLR_CORE_STATUS_H
#define QLR_CORE_STATUS_H

#include <stdarg.h>

typedef enum qlr_status {
    QLR_OK = 0,
    QLR_ERR_INVALID,     /* bad argument or bad user input (recipe, request, flag) */
    QLR_ERR_FORMAT,      /* a file or payload is corrupt or not what it claims */
    QLR_ERR_UNSUPPORTED, /* valid but not handled (architecture, dtype, feature) */
    QLR_ERR_IO,          /* open/read/write/rename failed */
    QLR_ERR_NOMEM,       /* allocation failed or a size would overflow */
    QLR_ERR_NOT_FOUND,   /* a key, tensor, file or adapter that should exist does not */
    QLR_ERR_RANGE,       /* a value outside its allowed range */
    QLR_ERR_DEVICE,      /* CUDA, cuBLAS, cuDNN or NCCL failure */
    QLR_ERR_CANCELLED,   /* interrupted (SIGINT) or cancelled by a client */
    QLR_ERR_INTERNAL,    /* a bug: an invariant did not hold */
    QLR_ERR_BUSY,        /* over capacity right now (a full queue): try again later */
} qlr_status;

/* Name of a status ("format error", ...). Never NULL. */
const char *qlr_status_str(qlr_status st);

/* Records `st` with a printf-style message and the raising file:line; returns `st` so that
 * `return qlr_errorf(QLR_ERR_FORMAT, "%s: bad magic", path);` reads naturally. */
qlr_status qlr_error_set_(qlr_status st, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
qlr_status qlr_error_vset_(qlr_status st, const char *file, int line, const char *fmt, va_list ap);
#define qlr_errorf(st, ...) qlr_error_set_((st), __FILE__, __LINE__, __VA_ARGS__)

/* Prepends context to the current message: "loading x.gguf: " + old message. Returns the
 * current status so that `return qlr_error_prefix("loading %s", p);` propagates it. */
qlr_status qlr_error_prefix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The last error's message ("" when none), where it was raised ("file.c:123"), and status. */
const char *qlr_error_msg(void);
const char *qlr_error_where(void);
qlr_status qlr_error_status(void);
void qlr_error_clear(void);

/* Propagate a failing status unchanged. */
#define QLR_TRY(expr)                        \
    do {                                     \
        qlr_status qlr_try_st_ = (expr);     \
        if (qlr_try_st_ != QLR_OK) return qlr_try_st_; \
    } while (0)

/* Bugs assert (STYLE.md habit 4): prints the condition and aborts, also in release builds. */
void qlr_assert_fail_(const char *cond, const char *file, int line) __attribute__((noreturn));
#define QLR_ASSERT(cond) ((cond) ? (void)0 : qlr_assert_fail_(#cond, __FILE__, __LINE__))

#endif
