/* infer/openai.c: parsing and validation of OpenAI-style request bodies, and the JSON of
 * responses, stream chunks, errors and the model list (see openai.h). Field checks are written
 * once as small typed getters that fill a qlr_oai_error naming the field, so that every refusal
 * says which key and what was expected. */
#include "infer/openai.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora.h"
#include "formats/json.h"
#include "model/model.h"

/* ---- errors ---- */

static const char *type_for_status(int st) {
    switch (st) {
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 429: return "rate_limit_error";
    default: return st >= 500 ? "server_error" : "invalid_request_error";
    }
}

void qlr_oai_error_set(qlr_oai_error *e, int http_status, const char *param, const char *code,
                       const char *fmt, ...) {
    e->http_status = http_status;
    e->type = type_for_status(http_status);
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

/* A new JSON string of `len` bytes with invalid UTF-8 replaced (jansson refuses invalid UTF-8). */
static json_t *str_json(const char *s, size_t len) {
    size_t n = 0;
    char *clean = qlr_oai_utf8_sanitize(s, len, &n);
    if (!clean) return NULL;
    json_t *v = json_stringn(clean, n);
    free(clean);
    return v;
}

static json_t *cstr_json(const char *s) { return s ? str_json(s, strlen(s)) : json_null(); }

/* json_dumps of a value we built, stealing the reference; NULL when any part failed. */
static char *dump_steal(json_t *v) {
    if (!v) return NULL;
    char *s = json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(v);
    return s;
}

static json_t *error_object(const qlr_oai_error *e) {
    json_t *inner = json_object();
    json_object_set_new(inner, "message", cstr_json(e->message));
    json_object_set_new(inner, "type", json_string(e->type ? e->type : type_for_status(e->http_status)));
    json_object_set_new(inner, "param", e->param[0] ? cstr_json(e->param) : json_null());
    json_object_set_new(inner, "code", e->code ? json_string(e->code) : json_null());
    json_t *o = json_object();
    json_object_set_new(o, "error", inner);
    return o;
}

char *qlr_oai_error_json(const qlr_oai_error *e) { return dump_steal(error_object(e)); }

/* ---- UTF-8 ---- */

char *qlr_oai_utf8_sanitize(const char *s, size_t len, size_t *out_len) {
    /* each bad byte becomes at most 3 bytes */
    if (len > ((size_t)-1 - 1) / 3) return NULL;
    char *out = malloc(len * 3 + 1);
    if (!out) return NULL;
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, o = 0;
    while (i < len) {
        unsigned c = p[i];
        if (c < 0x80) {
            out[o++] = (char)c;
            i++;
            continue;
        }
        /* Unicode Table 3-7: the range of the second byte depends on the lead byte */
        int need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) { need = 2; lo = 0xA0; }
        else if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) need = 2;
        else if (c == 0xED) { need = 2; hi = 0x9F; }
        else if (c == 0xF0) { need = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) { need = 3; hi = 0x8F; }
        else need = -1;
        int good = 0; /* continuation bytes that fit */
        if (need > 0) {
            for (int k = 1; k <= need && i + k < len; k++) {
                unsigned b = p[i + k];
                unsigned l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
                if (b < l || b > h) break;
                good++;
            }
        }
        if (need > 0 && good == need) {
            memcpy(out + o, p + i, (size_t)need + 1);
            o += (size_t)need + 1;
            i += (size_t)need + 1;
        } else {
            out[o++] = (char)0xEF; /* U+FFFD for the maximal bad subpart */
            out[o++] = (char)0xBF;
            out[o++] = (char)0xBD;
            i += 1 + (size_t)(need > 0 ? good : 0);
        }
    }
    out[o] = 0;
    if (out_len) *out_len = o;
    return out;
}

/* ---- typed field getters: each fills `err` naming the field on failure ---- */

#define BAD(err, param, ...) (qlr_oai_error_set((err), 400, (param), NULL, __VA_ARGS__), 0)

/* A string without embedded NULs; *out borrows from v. */
static int want_string(const json_t *v, const char *param, const char **out, qlr_oai_error *err) {
    if (!json_is_string(v))
        return BAD(err, param, "'%s': expected a string, got %s", param, qlr_json_type_name(v));
    if (strlen(json_string_value(v)) != json_string_length(v))
        return BAD(err, param, "'%s': the string holds a NUL character", param);
    *out = json_string_value(v);
    return 1;
}

static int want_int(const json_t *v, const char *param, int64_t lo, int64_t hi, int64_t *out,
                    qlr_oai_error *err) {
    if (!json_is_integer(v))
        return BAD(err, param, "'%s': expected an integer, got %s", param, qlr_json_type_name(v));
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return BAD(err, param, "'%s' must be between %" PRId64 " and %" PRId64 ", got %" PRId64,
                   param, lo, hi, (int64_t)x);
    *out = x;
    return 1;
}

static int want_number(const json_t *v, const char *param, double lo, double hi, double *out,
                       qlr_oai_error *err) {
    if (!json_is_number(v))
        return BAD(err, param, "'%s': expected a number, got %s", param, qlr_json_type_name(v));
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return BAD(err, param, "'%s' must be between %g and %g, got %g", param, lo, hi, x);
    *out = x;
    return 1;
}

static int want_bool(const json_t *v, const char *param, int *out, qlr_oai_error *err) {
    if (!json_is_boolean(v))
        return BAD(err, param, "'%s': expected true or false, got %s", param, qlr_json_type_name(v));
    *out = json_is_true(v);
    return 1;
}

/* The member `key` of `o`, or NULL when missing or null (absent and null mean the default). */
static json_t *opt(const json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    return v && !json_is_null(v) ? v : NULL;
}

/* ---- chat messages ---- */

static int keep_owned(qlr_oai_request *r, char *s) {
    char **n = realloc(r->owned, (r->n_owned + 1) * sizeof *n);
    if (!n) {
        free(s);
        return 0;
    }
    r->owned = n;
    r->owned[r->n_owned++] = s;
    return 1;
}

/* A message's content: a string, null (assistant and tool turns), or a list of
 * {"type": "text", "text": ...} parts joined with "\n" (as vLLM does). */
static int parse_content(qlr_oai_request *r, const json_t *c, size_t mi, const char *role,
                         const char **out, qlr_oai_error *err) {
    char param[96];
    snprintf(param, sizeof param, "messages[%zu].content", mi);
    if (!c || json_is_null(c)) {
        if (!strcmp(role, "assistant") || !strcmp(role, "tool")) {
            *out = "";
            return 1;
        }
        return BAD(err, param, "'%s' is required for a %s message", param, role);
    }
    if (json_is_string(c)) return want_string(c, param, out, err);
    if (!json_is_array(c))
        return BAD(err, param, "'%s': expected a string or a list of text parts, got %s", param,
                   qlr_json_type_name(c));
    qlr_strbuf b = {0};
    size_t j;
    json_t *part;
    json_array_foreach(c, j, part) {
        char pp[128];
        snprintf(pp, sizeof pp, "%s[%zu]", param, j);
        if (!json_is_object(part)) {
            qlr_strbuf_free(&b);
            return BAD(err, pp, "'%s': expected an object, got %s", pp, qlr_json_type_name(part));
        }
        char tp[140];
        snprintf(tp, sizeof tp, "%s.type", pp);
        const char *type = NULL;
        if (!want_string(json_object_get(part, "type"), tp, &type, err)) {
            qlr_strbuf_free(&b);
            return 0;
        }
        if (strcmp(type, "text")) {
            qlr_strbuf_free(&b);
            return BAD(err, tp, "'%s': content parts of type '%s' are not supported (only 'text')",
                       tp, type);
        }
        snprintf(tp, sizeof tp, "%s.text", pp);
        const char *text = NULL;
        if (!want_string(json_object_get(part, "text"), tp, &text, err)) {
            qlr_strbuf_free(&b);
            return 0;
        }
        if (j > 0) qlr_strbuf_puts(&b, "\n");
        qlr_strbuf_puts(&b, text);
    }
    if (b.oom) {
        qlr_strbuf_free(&b);
        qlr_oai_error_set(err, 500, NULL, NULL, "out of memory");
        return 0;
    }
    char *s = b.p ? b.p : strdup("");
    if (!s || !keep_owned(r, s)) {
        qlr_oai_error_set(err, 500, NULL, NULL, "out of memory");
        return 0;
    }
    *out = s;
    return 1;
}

static int parse_messages(qlr_oai_request *r, const json_t *body, qlr_oai_error *err) {
    json_t *m = json_object_get(body, "messages");
    if (!m || json_is_null(m)) return BAD(err, "messages", "'messages' is required");
    if (!json_is_array(m))
        return BAD(err, "messages", "'messages': expected a list, got %s", qlr_json_type_name(m));
    size_t n = json_array_size(m);
    if (n == 0) return BAD(err, "messages", "'messages' must hold at least one message");
    r->messages = calloc(n, sizeof *r->messages);
    if (!r->messages) {
        qlr_oai_error_set(err, 500, NULL, NULL, "out of memory");
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *msg = json_array_get(m, i);
        char param[96];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(msg))
            return BAD(err, param, "'%s': expected an object, got %s", param, qlr_json_type_name(msg));
        snprintf(param, sizeof param, "messages[%zu].role", i);
        const char *role = NULL;
        json_t *rv = json_object_get(msg, "role");
        if (!rv) return BAD(err, param, "'%s' is required", param);
        if (!want_string(rv, param, &role, err)) return 0;
        if (!strcmp(role, "developer")) role = "system";
        else if (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant") &&
                 strcmp(role, "tool"))
            return BAD(err, param,
                       "'%s': unknown role '%s' (expected system, developer, user, assistant or tool)",
                       param, role);
        json_t *tc = opt(msg, "tool_calls");
        if (tc && (!json_is_array(tc) || json_array_size(tc) > 0)) {
            snprintf(param, sizeof param, "messages[%zu].tool_calls", i);
            return BAD(err, param, "'%s': tool calls are not supported", param);
        }
        const char *content = NULL;
        if (!parse_content(r, json_object_get(msg, "content"), i, role, &content, err)) return 0;
        r->messages[i].role = role;
        r->messages[i].content = content;
        r->n_messages = i + 1;
    }
    return 1;
}

/* ---- completions prompt ---- */

static int parse_prompt(qlr_oai_request *r, const json_t *body, qlr_oai_error *err) {
    json_t *p = json_object_get(body, "prompt");
    if (!p || json_is_null(p)) return BAD(err, "prompt", "'prompt' is required");
    if (json_is_string(p)) return want_string(p, "prompt", &r->prompt, err);
    if (!json_is_array(p))
        return BAD(err, "prompt", "'prompt': expected a string, a list of one string or a list of "
                                  "token ids, got %s", qlr_json_type_name(p));
    size_t n = json_array_size(p);
    if (n == 0) return BAD(err, "prompt", "'prompt' must not be an empty list");
    json_t *first = json_array_get(p, 0);
    if (json_is_string(first) || json_is_array(first)) {
        if (n > 1)
            return BAD(err, "prompt", "'prompt' holds %zu prompts; one prompt per request is supported",
                       n);
        if (json_is_array(first))
            return BAD(err, "prompt[0]", "'prompt[0]': lists of token-id lists are not supported; "
                                         "give one list of token ids");
        return want_string(first, "prompt[0]", &r->prompt, err);
    }
    r->prompt_ids = malloc(n * sizeof *r->prompt_ids);
    if (!r->prompt_ids) {
        qlr_oai_error_set(err, 500, NULL, NULL, "out of memory");
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        char param[48];
        snprintf(param, sizeof param, "prompt[%zu]", i);
        int64_t id;
        if (!want_int(json_array_get(p, i), param, 0, INT32_MAX, &id, err)) return 0;
        r->prompt_ids[i] = (int32_t)id;
    }
    r->n_prompt_ids = n;
    return 1;
}

/* ---- options we cannot honour: refused rather than ignored ---- */

static int refuse_unsupported(qlr_oai_endpoint ep, const json_t *body, qlr_oai_error *err) {
    json_t *v;
    int64_t iv;
    double dv;
    int bv;
    if ((v = opt(body, "n"))) {
        if (!want_int(v, "n", INT64_MIN, INT64_MAX, &iv, err)) return 0;
        if (iv != 1) return BAD(err, "n", "'n' must be 1 (one choice per request), got %" PRId64, iv);
    }
    if ((v = opt(body, "best_of"))) {
        if (!want_int(v, "best_of", INT64_MIN, INT64_MAX, &iv, err)) return 0;
        if (iv != 1) return BAD(err, "best_of", "'best_of' must be 1, got %" PRId64, iv);
    }
    static const char *const penalties[] = {"frequency_penalty", "presence_penalty"};
    for (int i = 0; i < 2; i++)
        if ((v = opt(body, penalties[i]))) {
            if (!want_number(v, penalties[i], -2, 2, &dv, err)) return 0;
            if (dv != 0) return BAD(err, penalties[i], "'%s' is not supported (only 0)", penalties[i]);
        }
    if ((v = opt(body, "logit_bias"))) {
        if (!json_is_object(v))
            return BAD(err, "logit_bias", "'logit_bias': expected an object, got %s", qlr_json_type_name(v));
        if (json_object_size(v)) return BAD(err, "logit_bias", "'logit_bias' is not supported");
    }
    if ((v = opt(body, "logprobs"))) {
        if (ep == QLR_OAI_CHAT) {
            if (!want_bool(v, "logprobs", &bv, err)) return 0;
            if (bv) return BAD(err, "logprobs", "'logprobs' is not supported");
        } else {
            if (!want_int(v, "logprobs", 0, 5, &iv, err)) return 0;
            if (iv) return BAD(err, "logprobs", "'logprobs' is not supported");
        }
    }
    if (opt(body, "top_logprobs")) return BAD(err, "top_logprobs", "'top_logprobs' is not supported");
    static const char *const lists[] = {"tools", "functions"};
    for (int i = 0; i < 2; i++)
        if ((v = opt(body, lists[i]))) {
            if (!json_is_array(v))
                return BAD(err, lists[i], "'%s': expected a list, got %s", lists[i], qlr_json_type_name(v));
            if (json_array_size(v)) return BAD(err, lists[i], "'%s': tool calling is not supported", lists[i]);
        }
    if ((v = opt(body, "tool_choice"))) {
        if (!json_is_string(v) || strcmp(json_string_value(v), "none"))
            return BAD(err, "tool_choice", "'tool_choice': tool calling is not supported (only \"none\")");
    }
    if ((v = opt(body, "response_format"))) {
        json_t *t = json_is_object(v) ? json_object_get(v, "type") : NULL;
        if (!json_is_object(v))
            return BAD(err, "response_format", "'response_format': expected an object, got %s",
                       qlr_json_type_name(v));
        if (!json_is_string(t) || strcmp(json_string_value(t), "text"))
            return BAD(err, "response_format.type",
                       "'response_format.type': only \"text\" is supported");
    }
    if (ep == QLR_OAI_COMPLETIONS) {
        if ((v = opt(body, "echo"))) {
            if (!want_bool(v, "echo", &bv, err)) return 0;
            if (bv) return BAD(err, "echo", "'echo' is not supported");
        }
        if ((v = opt(body, "suffix"))) {
            const char *s;
            if (!want_string(v, "suffix", &s, err)) return 0;
            if (*s) return BAD(err, "suffix", "'suffix' is not supported");
        }
    }
    return 1;
}

/* ---- sampling, stop, stream, lora ---- */

static int parse_options(qlr_oai_request *r, const json_t *body, qlr_oai_error *err) {
    json_t *v;
    int64_t iv;
    double dv;
    if ((v = opt(body, "model")) && !want_string(v, "model", &r->model, err)) return 0;

    const char *mt = "max_tokens";
    if (r->endpoint == QLR_OAI_CHAT && opt(body, "max_completion_tokens")) mt = "max_completion_tokens";
    r->max_tokens_field = mt;
    if ((v = opt(body, mt))) {
        if (!want_int(v, mt, 1, INT32_MAX, &iv, err)) return 0;
        r->max_tokens = (int32_t)iv;
    }
    r->temperature = 1.0f;
    if ((v = opt(body, "temperature"))) {
        if (!want_number(v, "temperature", 0, 2, &dv, err)) return 0;
        r->temperature = (float)dv;
    }
    r->top_p = 1.0f;
    if ((v = opt(body, "top_p"))) {
        if (!want_number(v, "top_p", 0, 1, &dv, err)) return 0;
        r->top_p = (float)dv;
    }
    if ((v = opt(body, "top_k"))) {
        if (!want_int(v, "top_k", -1, INT32_MAX, &iv, err)) return 0;
        r->top_k = iv < 0 ? 0 : (int32_t)iv;
    }
    if ((v = opt(body, "seed"))) {
        if (!want_int(v, "seed", INT64_MIN, INT64_MAX, &iv, err)) return 0;
        r->has_seed = 1;
        r->seed = (uint64_t)iv;
    }

    if ((v = opt(body, "stop"))) {
        if (json_is_string(v)) {
            if (!want_string(v, "stop", &r->stop[0], err)) return 0;
            r->n_stop = 1;
        } else if (json_is_array(v)) {
            if (json_array_size(v) > QLR_OAI_MAX_STOP)
                return BAD(err, "stop", "'stop' holds %zu strings; at most %d are allowed",
                           json_array_size(v), QLR_OAI_MAX_STOP);
            for (size_t i = 0; i < json_array_size(v); i++) {
                char param[32];
                snprintf(param, sizeof param, "stop[%zu]", i);
                if (!want_string(json_array_get(v, i), param, &r->stop[i], err)) return 0;
                r->n_stop = (int32_t)i + 1;
            }
        } else {
            return BAD(err, "stop", "'stop': expected a string or a list of strings, got %s",
                       qlr_json_type_name(v));
        }
        for (int32_t i = 0; i < r->n_stop; i++) {
            size_t len = strlen(r->stop[i]);
            if (len == 0) return BAD(err, "stop", "'stop': a stop string must not be empty");
            if (len > QLR_OAI_MAX_STOP_BYTES)
                return BAD(err, "stop", "'stop': a stop string has %zu bytes; at most %d are allowed",
                           len, QLR_OAI_MAX_STOP_BYTES);
        }
    }

    if ((v = opt(body, "stream")) && !want_bool(v, "stream", &r->stream, err)) return 0;
    if ((v = opt(body, "ignore_eos")) && !want_bool(v, "ignore_eos", &r->ignore_eos, err)) return 0;
    if ((v = opt(body, "stream_options"))) {
        if (!json_is_object(v))
            return BAD(err, "stream_options", "'stream_options': expected an object, got %s",
                       qlr_json_type_name(v));
        if (!r->stream)
            return BAD(err, "stream_options", "'stream_options' is only allowed when 'stream' is true");
        json_t *u = opt(v, "include_usage");
        if (u && !want_bool(u, "stream_options.include_usage", &r->include_usage, err)) return 0;
    }

    r->lora_id = -1;
    r->lora_scale = 1.0f;
    if ((v = opt(body, "lora"))) {
        if (!json_is_array(v))
            return BAD(err, "lora", "'lora': expected a list of {\"id\" or \"name\", \"scale\"}, got %s",
                       qlr_json_type_name(v));
        size_t n = json_array_size(v);
        if (n > 1)
            return BAD(err, "lora", "'lora' lists %zu adapters; one adapter per request is supported", n);
        if (n == 1) {
            json_t *e = json_array_get(v, 0);
            if (!json_is_object(e))
                return BAD(err, "lora[0]", "'lora[0]': expected an object, got %s", qlr_json_type_name(e));
            json_t *id = opt(e, "id"), *name = opt(e, "name"), *scale = opt(e, "scale");
            if (id && name) return BAD(err, "lora[0]", "'lora[0]': give \"id\" or \"name\", not both");
            if (!id && !name) return BAD(err, "lora[0]", "'lora[0]': \"id\" or \"name\" is required");
            if (id) {
                if (!want_int(id, "lora[0].id", 0, INT32_MAX, &iv, err)) return 0;
                r->lora_id = (int32_t)iv;
            } else if (!want_string(name, "lora[0].name", &r->lora_name, err)) {
                return 0;
            }
            if (scale) {
                if (!want_number(scale, "lora[0].scale", -100, 100, &dv, err)) return 0;
                r->lora_scale = (float)dv;
            }
            r->has_lora = 1;
        }
    }
    return 1;
}

qlr_status qlr_oai_parse_request(qlr_oai_endpoint ep, const void *body, size_t n,
                                 qlr_oai_request *out, qlr_oai_error *err) {
    memset(out, 0, sizeof *out);
    out->endpoint = ep;
    json_t *root = NULL;
    if (qlr_json_load_buffer("request body", body, n, &root) != QLR_OK) {
        qlr_oai_error_set(err, 400, NULL, NULL, "malformed JSON: %s", qlr_error_msg());
        qlr_error_clear();
        return QLR_ERR_INVALID;
    }
    out->root = root;
    int ok;
    if (!json_is_object(root))
        ok = BAD(err, NULL, "the request body must be a JSON object, got %s", qlr_json_type_name(root));
    else
        ok = (ep == QLR_OAI_CHAT ? parse_messages(out, root, err) : parse_prompt(out, root, err)) &&
             refuse_unsupported(ep, root, err) && parse_options(out, root, err);
    if (ok) return QLR_OK;
    qlr_status st = err->http_status >= 500 ? QLR_ERR_NOMEM : QLR_ERR_INVALID;
    qlr_oai_request_free(out);
    out->endpoint = ep;
    return st;
}

void qlr_oai_request_free(qlr_oai_request *r) {
    if (!r) return;
    for (size_t i = 0; i < r->n_owned; i++) free(r->owned[i]);
    free(r->owned);
    free(r->messages);
    free(r->prompt_ids);
    json_decref(r->root);
    memset(r, 0, sizeof *r);
}

/* ---- adapter load / unload ---- */

qlr_status qlr_oai_parse_lora_request(const void *body, size_t n, int need_path,
                                      qlr_oai_lora_request *out, qlr_oai_error *err) {
    memset(out, 0, sizeof *out);
    if (qlr_json_load_buffer("request body", body, n, &out->root) != QLR_OK) {
        qlr_oai_error_set(err, 400, NULL, NULL, "malformed JSON: %s", qlr_error_msg());
        qlr_error_clear();
        return QLR_ERR_INVALID;
    }
    int ok = 1;
    if (!json_is_object(out->root)) {
        ok = BAD(err, NULL, "the request body must be a JSON object, got %s",
                 qlr_json_type_name(out->root));
    } else {
        json_t *name = opt(out->root, "lora_name"), *path = opt(out->root, "lora_path");
        if (!name) ok = BAD(err, "lora_name", "'lora_name' is required");
        else ok = want_string(name, "lora_name", &out->lora_name, err);
        if (ok && !*out->lora_name) ok = BAD(err, "lora_name", "'lora_name' must not be empty");
        if (ok && need_path) {
            if (!path) ok = BAD(err, "lora_path", "'lora_path' is required");
            else ok = want_string(path, "lora_path", &out->lora_path, err);
            if (ok && !*out->lora_path) ok = BAD(err, "lora_path", "'lora_path' must not be empty");
        }
    }
    if (ok) return QLR_OK;
    qlr_oai_lora_request_free(out);
    return QLR_ERR_INVALID;
}

void qlr_oai_lora_request_free(qlr_oai_lora_request *r) {
    if (!r) return;
    json_decref(r->root);
    memset(r, 0, sizeof *r);
}

/* ---- responses ---- */

void qlr_oai_make_id(qlr_oai_endpoint ep, uint64_t r, char *out, size_t cap) {
    /* splitmix64 of r and of r + 1: 24 hex digits that differ for nearby r */
    uint64_t a = r, h[2];
    for (int i = 0; i < 2; i++) {
        uint64_t z = (a += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        h[i] = z ^ (z >> 31);
    }
    snprintf(out, cap, "%s%016" PRIx64 "%08" PRIx64, ep == QLR_OAI_CHAT ? "chatcmpl-" : "cmpl-", h[0],
             h[1] >> 32);
}

static json_t *usage_json(int32_t prompt, int32_t completion, int32_t cached) {
    json_t *u = json_object();
    json_object_set_new(u, "prompt_tokens", json_integer(prompt));
    json_object_set_new(u, "completion_tokens", json_integer(completion));
    json_object_set_new(u, "total_tokens", json_integer((json_int_t)prompt + completion));
    json_t *d = json_object();
    json_object_set_new(d, "cached_tokens", json_integer(cached));
    json_object_set_new(u, "prompt_tokens_details", d);
    return u;
}

/* The fields every response and chunk starts with. */
static json_t *head_json(const char *id, const char *object, int64_t created, const char *model) {
    json_t *o = json_object();
    json_object_set_new(o, "id", cstr_json(id));
    json_object_set_new(o, "object", json_string(object));
    json_object_set_new(o, "created", json_integer(created));
    json_object_set_new(o, "model", cstr_json(model));
    return o;
}

char *qlr_oai_format_result(qlr_oai_endpoint ep, const qlr_oai_result *r) {
    int chat = ep == QLR_OAI_CHAT;
    json_t *o = head_json(r->id, chat ? "chat.completion" : "text_completion", r->created, r->model);
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    json_t *text = str_json(r->text ? r->text : "", r->text ? r->len : 0);
    if (chat) {
        json_t *msg = json_object();
        json_object_set_new(msg, "role", json_string("assistant"));
        json_object_set_new(msg, "content", text);
        json_object_set_new(choice, "message", msg);
    } else {
        json_object_set_new(choice, "text", text);
    }
    json_object_set_new(choice, "logprobs", json_null());
    json_object_set_new(choice, "finish_reason", cstr_json(r->finish_reason));
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_object_set_new(o, "choices", choices);
    json_object_set_new(o, "usage", usage_json(r->prompt_tokens, r->completion_tokens, r->cached_tokens));
    if (!text) {
        json_decref(o);
        return NULL;
    }
    return dump_steal(o);
}

/* Appends "data: <json>\n\n", stealing v; a failed build marks out as oom. */
static void sse_event(json_t *v, qlr_strbuf *out) {
    char *s = dump_steal(v);
    if (!s) {
        out->oom = 1;
        return;
    }
    qlr_strbuf_puts(out, "data: ");
    qlr_strbuf_puts(out, s);
    qlr_strbuf_puts(out, "\n\n");
    free(s);
}

/* A chunk with one choice; `delta_or_text` is the chat delta object or the completion text. */
static json_t *chunk_json(const qlr_oai_stream *s, json_t *delta_or_text, const char *finish) {
    int chat = s->endpoint == QLR_OAI_CHAT;
    json_t *o = head_json(s->id, chat ? "chat.completion.chunk" : "text_completion", s->created, s->model);
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    json_object_set_new(choice, chat ? "delta" : "text", delta_or_text);
    json_object_set_new(choice, "logprobs", json_null());
    json_object_set_new(choice, "finish_reason", finish ? json_string(finish) : json_null());
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_object_set_new(o, "choices", choices);
    if (s->include_usage) json_object_set_new(o, "usage", json_null());
    if (!delta_or_text) {
        json_decref(o);
        return NULL;
    }
    return o;
}

void qlr_oai_stream_begin(const qlr_oai_stream *s, qlr_strbuf *out) {
    if (s->endpoint != QLR_OAI_CHAT) return;
    json_t *delta = json_object();
    json_object_set_new(delta, "role", json_string("assistant"));
    json_object_set_new(delta, "content", json_string(""));
    sse_event(chunk_json(s, delta, NULL), out);
}

void qlr_oai_stream_text(const qlr_oai_stream *s, const char *text, size_t len, qlr_strbuf *out) {
    if (len == 0) return;
    json_t *t = str_json(text, len);
    if (s->endpoint == QLR_OAI_CHAT) {
        json_t *delta = json_object();
        if (!t) {
            json_decref(delta);
            out->oom = 1;
            return;
        }
        json_object_set_new(delta, "content", t);
        t = delta;
    }
    sse_event(chunk_json(s, t, NULL), out);
}

void qlr_oai_stream_end(const qlr_oai_stream *s, const char *finish_reason, int32_t prompt_tokens,
                        int32_t completion_tokens, int32_t cached_tokens, qlr_strbuf *out) {
    json_t *last = s->endpoint == QLR_OAI_CHAT ? json_object() : json_string("");
    sse_event(chunk_json(s, last, finish_reason ? finish_reason : "stop"), out);
    if (s->include_usage) {
        json_t *o = head_json(s->id, s->endpoint == QLR_OAI_CHAT ? "chat.completion.chunk" : "text_completion",
                              s->created, s->model);
        json_object_set_new(o, "choices", json_array());
        json_object_set_new(o, "usage", usage_json(prompt_tokens, completion_tokens, cached_tokens));
        sse_event(o, out);
    }
    qlr_strbuf_puts(out, "data: [DONE]\n\n");
}

void qlr_oai_stream_error(const qlr_oai_error *e, qlr_strbuf *out) {
    sse_event(error_object(e), out);
    qlr_strbuf_puts(out, "data: [DONE]\n\n");
}

/* ---- model list ---- */

const char *qlr_oai_residency_name(qlr_residency r) {
    switch (r) {
    case QLR_RESIDENCY_DEVICE: return "device";
    case QLR_RESIDENCY_HOST: return "host";
    default: return "file";
    }
}

static json_t *model_json(const char *id, int64_t created) {
    json_t *m = json_object();
    json_object_set_new(m, "id", cstr_json(id));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer(created));
    json_object_set_new(m, "owned_by", json_string("qlora"));
    return m;
}

char *qlr_oai_format_models(const char *base_name, int64_t created, int32_t max_ctx,
                            const qlr_adapter_info *adapters, size_t n_adapters) {
    json_t *data = json_array();
    json_t *base = model_json(base_name, created);
    json_object_set_new(base, "root", cstr_json(base_name));
    json_object_set_new(base, "parent", json_null());
    json_object_set_new(base, "max_model_len", json_integer(max_ctx));
    json_array_append_new(data, base);
    for (size_t i = 0; i < n_adapters; i++) {
        const qlr_adapter_info *a = &adapters[i];
        json_t *m = model_json(a->name, created);
        json_object_set_new(m, "root", cstr_json(a->path[0] ? a->path : a->name));
        json_object_set_new(m, "parent", cstr_json(base_name));
        json_object_set_new(m, "max_model_len", json_integer(max_ctx));
        json_object_set_new(m, "lora_id", json_integer((json_int_t)i));
        json_object_set_new(m, "rank", json_integer(a->r));
        json_object_set_new(m, "alpha", json_real(a->alpha));
        json_object_set_new(m, "scale", json_real(a->scale));
        json_t *targets = json_array();
        for (int id = 0; id < QLR_LIN_COUNT; id++)
            if (a->targets & QLR_LORA_TARGET(id))
                json_array_append_new(targets, json_string(qlr_linear_hf_name((qlr_linear_id)id)));
        json_object_set_new(m, "targets", targets);
        json_object_set_new(m, "residency", json_string(qlr_oai_residency_name(a->residency)));
        json_object_set_new(m, "refs", json_integer(a->refs));
        json_object_set_new(m, "requests", json_integer((json_int_t)a->uses));
        json_array_append_new(data, m);
    }
    json_t *o = json_object();
    json_object_set_new(o, "object", json_string("list"));
    json_object_set_new(o, "data", data);
    return dump_steal(o);
}
