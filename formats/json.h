/* formats/json.h: thin helpers over jansson for every JSON file and payload we read or write
 * (HF config.json, tokenizer.json, tokenizer_config.json, adapter_config.json, safetensors
 * headers, HTTP request bodies).
 *
 * Parsing is jansson's; this file adds what every caller needs: errors in the form
 * "path:line:column: <jansson's text>", duplicate keys refused, typed getters whose errors name
 * the source and the key path (`config.json: key "num_attention_heads": expected an integer,
 * got string`), and an atomic pretty writer in Python's json.dumps(indent=2, sort_keys=True)
 * style (PEFT's adapter_config.json). It does not own schemas: callers check ranges. */
#ifndef QLR_FORMATS_JSON_H
#define QLR_FORMATS_JSON_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

/* Largest file qlr_json_load_file reads (tokenizer.json files are tens of MiB). */
#define QLR_JSON_MAX_FILE_SIZE ((size_t)1 << 30)

/* Parses the file at `path` into *out (a new reference: json_decref it). Any JSON value is
 * accepted at the top level; duplicate object keys are refused. Errors: QLR_ERR_IO (cannot read),
 * QLR_ERR_RANGE (over QLR_JSON_MAX_FILE_SIZE), QLR_ERR_FORMAT with "path:line:column: text".
 * *out is NULL on failure. */
qlr_status qlr_json_load_file(const char *path, json_t **out);

/* Same for `n` bytes at `data` (need not be NUL-terminated; embedded NULs are an error). `name`
 * is used in messages in place of a path ("request body", "x.safetensors: header"). */
qlr_status qlr_json_load_buffer(const char *name, const void *data, size_t n, json_t **out);

/* "object", "array", "string", "integer", "real", "true", "false", "null" ("missing" for NULL). */
const char *qlr_json_type_name(const json_t *v);

/* Looks `key` up in object `obj`: first as a literal key, then, if it holds dots, as a path
 * through nested objects ("rope_scaling.factor"). Returns a borrowed reference or NULL (also
 * when obj is not an object). Never records an error. */
json_t *qlr_json_lookup(const json_t *obj, const char *key);

/* Typed getters. `src` names the source in messages (a file name, "request body"); `key` is as
 * for qlr_json_lookup. The plain form requires the key: QLR_ERR_NOT_FOUND when missing,
 * QLR_ERR_FORMAT when of the wrong type, both with a message
 *   <src>: key "<key>": expected <what>, got <type>   /   <src>: missing key "<key>".
 * The _opt form stores `def` and returns QLR_OK when the key is missing or null, and fails
 * only on a wrong type. *out is written only on success. */
qlr_status qlr_json_get_int(const json_t *obj, const char *src, const char *key, int64_t *out);
qlr_status qlr_json_get_int_opt(const json_t *obj, const char *src, const char *key, int64_t def,
                                int64_t *out);
/* An integer or a real (HF configs write 10000.0 and 1e-05 alike). */
qlr_status qlr_json_get_double(const json_t *obj, const char *src, const char *key, double *out);
qlr_status qlr_json_get_double_opt(const json_t *obj, const char *src, const char *key, double def,
                                   double *out);
qlr_status qlr_json_get_bool(const json_t *obj, const char *src, const char *key, int *out);
qlr_status qlr_json_get_bool_opt(const json_t *obj, const char *src, const char *key, int def,
                                 int *out);
/* The string is borrowed from `obj` (valid while obj lives). The _opt form may store def (NULL). */
qlr_status qlr_json_get_string(const json_t *obj, const char *src, const char *key,
                               const char **out);
qlr_status qlr_json_get_string_opt(const json_t *obj, const char *src, const char *key,
                                   const char *def, const char **out);
/* Borrowed object / array; the _opt forms store NULL when missing or null. */
qlr_status qlr_json_get_object(const json_t *obj, const char *src, const char *key, json_t **out);
qlr_status qlr_json_get_object_opt(const json_t *obj, const char *src, const char *key,
                                   json_t **out);
qlr_status qlr_json_get_array(const json_t *obj, const char *src, const char *key, json_t **out);
qlr_status qlr_json_get_array_opt(const json_t *obj, const char *src, const char *key,
                                  json_t **out);

/* Serializes `v` as Python's json.dumps(v, indent=2, sort_keys=True) does (ensure_ascii, ", "
 * and ": " separators, shortest round-trip floats such as 0.05 and 1e-05, "[]" / "{}" when
 * empty), without a trailing newline. *out is malloc'ed and NUL-terminated; *n (if not NULL)
 * gets its length. QLR_ERR_INVALID for a non-finite real; QLR_ERR_NOMEM on allocation failure. */
qlr_status qlr_json_dump_pretty(const json_t *v, char **out, size_t *n);

/* Writes qlr_json_dump_pretty(v) to `path` atomically (qlr_write_atomic); like PEFT's
 * save_pretrained, no trailing newline. */
qlr_status qlr_json_write_file(const char *path, const json_t *v);

#endif
