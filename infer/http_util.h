/* infer/http_util.h: checks of the HTTP server that need no socket, kept apart so that they can
 * be tested alone: the API key (compared in constant time) and the confinement of adapter paths
 * that clients send to --adapter-dir. It does not own routing, responses or the registry. */
#ifndef QLR_INFER_HTTP_UTIL_H
#define QLR_INFER_HTTP_UTIL_H

#include <stddef.h>

#include "infer/openai.h"

/* 1 when the Authorization header value `header` (may be NULL) is "Bearer <key>" with the
 * configured key, else 0. The time taken depends only on the lengths, never on where the bytes
 * first differ. */
int qlr_http_auth_ok(const char *header, const char *key);

/* 1 when a[0..na) equals b[0..nb), in time that depends only on na and nb. */
int qlr_http_ct_equal(const char *a, size_t na, const char *b, size_t nb);

/* Resolves `path` (absolute, or relative to `dir`) to the real path of an existing file or
 * folder inside the real path of `dir`, into out[cap]. Refused: a ".." component (403), a path
 * whose real path (symlinks resolved) is outside `dir` (403), a path that does not exist (404),
 * one that cannot be resolved or is too long (400). `err` names "lora_path" and says why;
 * returns 1 on success, 0 on refusal. `dir` NULL: loading by path is off (403). */
int qlr_http_confine_path(const char *dir, const char *path, char *out, size_t cap,
                          qlr_oai_error *err);

#endif
