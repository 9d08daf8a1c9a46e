/* data/chat_template.c: the built-in chat formats (chatml, llama3, llama2, mistral), their
 * detection from Jinja source, and rendering with per-message byte spans. The output mirrors
 * what the Hugging Face templates of SmolLM2 / Qwen2 / Llama 3 / Llama 2 / Mistral v0.1 print
 * for plain text messages (no tools, no images). */
#include "data/chat_template.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"

struct qlr_chat_template {
    qlr_chat_format format;
    char *default_system; /* chatml: inserted when messages[0] is not system; NULL = none */
};

static const char *const FORMAT_NAMES[] = {"chatml", "llama3", "llama2", "mistral"};

static qlr_status make(qlr_chat_format f, const char *def_sys, size_t def_len, qlr_chat_template **out) {
    qlr_chat_template *t = calloc(1, sizeof *t);
    if (!t) return qlr_errorf(QLR_ERR_NOMEM, "chat template: out of memory");
    t->format = f;
    if (def_sys) {
        t->default_system = malloc(def_len + 1);
        if (!t->default_system) {
            free(t);
            return qlr_errorf(QLR_ERR_NOMEM, "chat template: out of memory");
        }
        memcpy(t->default_system, def_sys, def_len);
        t->default_system[def_len] = 0;
    }
    *out = t;
    return QLR_OK;
}

qlr_status qlr_chat_template_from_name(const char *name, qlr_chat_template **out) {
    *out = NULL;
    for (int i = 0; i < 4; i++)
        if (name && strcmp(name, FORMAT_NAMES[i]) == 0) return make((qlr_chat_format)i, NULL, 0, out);
    return qlr_errorf(QLR_ERR_INVALID, "unknown chat template '%s' (known: chatml, llama3, llama2, mistral)",
                      name ? name : "(null)");
}

static const char *find_n(const char *hay, size_t n, const char *needle) {
    size_t m = strlen(needle);
    if (m == 0 || m > n) return NULL;
    for (size_t i = 0; i + m <= n; i++)
        if (hay[i] == needle[0] && memcmp(hay + i, needle, m) == 0) return hay + i;
    return NULL;
}

/* Looks for a literal "<|im_start|>system" + newline (real or the two characters \n) + text +
 * "<|im_end|>" where the text holds no Jinja/string syntax; writes the unescaped text. */
static int chatml_default_system(const char *src, size_t len, char **out) {
    static const char head[] = "<|im_start|>system";
    const char *p = src, *end = src + len;
    while ((p = find_n(p, (size_t)(end - p), head))) {
        const char *q = p + sizeof head - 1;
        p = q;
        if (q < end && *q == '\n') q++;
        else if (q + 1 < end && q[0] == '\\' && q[1] == 'n') q += 2;
        else continue;
        const char *e = find_n(q, (size_t)(end - q), "<|im_end|>");
        if (!e || e == q) continue;
        int literal = 1;
        for (const char *c = q; c < e; c++)
            if (*c == '\'' || *c == '"' || *c == '{' || *c == '}' || *c == '+') literal = 0;
        if (!literal) continue;
        size_t span = (size_t)(e - q);
        if (span >= len) continue; /* cannot happen: e lies after q inside src */
        char *o = malloc(span + 1);
        if (!o) return 0;
        size_t k = 0;
        for (const char *c = q; c < e; c++) {
            if (c[0] == '\\' && c + 1 < e && c[1] == 'n') o[k++] = '\n', c++;
            else o[k++] = *c;
        }
        o[k] = 0;
        *out = o;
        return 1;
    }
    return 0;
}

qlr_status qlr_chat_template_detect(const char *src, size_t len, qlr_chat_template **out) {
    *out = NULL;
    if (!src || len == 0) return qlr_errorf(QLR_ERR_NOT_FOUND, "chat template: the model has no chat template");
    if (find_n(src, len, "<|im_start|>")) {
        char *sys = NULL;
        qlr_status st;
        if (chatml_default_system(src, len, &sys)) st = make(QLR_CHAT_CHATML, sys, strlen(sys), out);
        else st = make(QLR_CHAT_CHATML, NULL, 0, out);
        free(sys);
        return st;
    }
    if (find_n(src, len, "<|start_header_id|>") && find_n(src, len, "<|eot_id|>"))
        return make(QLR_CHAT_LLAMA3, NULL, 0, out);
    if (find_n(src, len, "[INST]")) {
        if (find_n(src, len, "<<SYS>>")) return make(QLR_CHAT_LLAMA2, NULL, 0, out);
        return make(QLR_CHAT_MISTRAL, NULL, 0, out);
    }
    return qlr_errorf(QLR_ERR_UNSUPPORTED,
                      "chat template not recognised (known families: chatml, llama3, llama2, mistral); "
                      "set chat_template to one of those names");
}

void qlr_chat_template_free(qlr_chat_template *t) {
    if (!t) return;
    free(t->default_system);
    free(t);
}

qlr_chat_format qlr_chat_template_format(const qlr_chat_template *t) { return t->format; }
const char *qlr_chat_template_name(const qlr_chat_template *t) { return FORMAT_NAMES[t->format]; }
const char *qlr_chat_template_default_system(const qlr_chat_template *t) { return t->default_system; }
int qlr_chat_template_has_bos(const qlr_chat_template *t) { return t->format != QLR_CHAT_CHATML; }

/* ---- rendering ---- */

typedef struct builder {
    char *text;
    size_t len, cap;
    qlr_chat_segment *segs;
    size_t n_segs, seg_cap;
    int failed;
} builder;

/* Appends bytes as one segment (merged with the previous one when the attributes match). */
static void put(builder *b, const char *s, size_t n, int32_t msg, int is_content, int is_assistant) {
    if (b->failed || n == 0) return;
    if (b->len + n + 1 > b->cap) {
        size_t c = b->cap ? b->cap : 256;
        while (c < b->len + n + 1) c *= 2;
        char *t = realloc(b->text, c);
        if (!t) { b->failed = 1; return; }
        b->text = t;
        b->cap = c;
    }
    memcpy(b->text + b->len, s, n);
    size_t start = b->len;
    b->len += n;
    b->text[b->len] = 0;
    if (b->n_segs) {
        qlr_chat_segment *l = &b->segs[b->n_segs - 1];
        if (l->message == msg && l->is_content == is_content && l->is_assistant == is_assistant && !is_content) {
            l->end = b->len;
            return;
        }
    }
    if (b->n_segs == b->seg_cap) {
        size_t c = b->seg_cap ? b->seg_cap * 2 : 16;
        qlr_chat_segment *t = realloc(b->segs, c * sizeof *t);
        if (!t) { b->failed = 1; return; }
        b->segs = t;
        b->seg_cap = c;
    }
    b->segs[b->n_segs++] = (qlr_chat_segment){start, b->len, msg, (uint8_t)is_content, (uint8_t)is_assistant};
}

static void puts_(builder *b, const char *s, int32_t msg, int is_assistant) { put(b, s, strlen(s), msg, 0, is_assistant); }

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

/* Jinja's trim / Python's strip on ASCII whitespace. */
static void trim(const char *s, const char **b, size_t *n) {
    size_t len = strlen(s), i = 0;
    while (i < len && is_ws(s[i])) i++;
    while (len > i && is_ws(s[len - 1])) len--;
    *b = s + i;
    *n = len - i;
}

void qlr_chat_render_free(qlr_chat_render *r) {
    free(r->text);
    free(r->segs);
    memset(r, 0, sizeof *r);
}

static int role_is(const char *r, const char *x) { return strcmp(r, x) == 0; }

qlr_status qlr_chat_render_messages(const qlr_chat_template *t, const qlr_chat_msg *msgs, size_t n,
                                    int add_generation_prompt, qlr_chat_render *out) {
    memset(out, 0, sizeof *out);
    for (size_t i = 0; i < n; i++) {
        if (!msgs[i].role || !msgs[i].content)
            return qlr_errorf(QLR_ERR_INVALID, "chat message %zu: missing role or content", i);
        if (!msgs[i].role[0]) return qlr_errorf(QLR_ERR_INVALID, "chat message %zu: empty role", i);
        if (t->format != QLR_CHAT_CHATML && t->format != QLR_CHAT_LLAMA3) {
            const char *r = msgs[i].role;
            if (role_is(r, "system")) {
                if (i != 0)
                    return qlr_errorf(QLR_ERR_INVALID, "chat message %zu: %s allows a system message only first", i,
                                      FORMAT_NAMES[t->format]);
            } else if (!role_is(r, "user") && !role_is(r, "assistant")) {
                return qlr_errorf(QLR_ERR_INVALID, "chat message %zu: role '%s' is not expressible in %s (use "
                                  "system, user or assistant)", i, r, FORMAT_NAMES[t->format]);
            } else {
                size_t first = n && role_is(msgs[0].role, "system") ? 1 : 0;
                int want_user = (i - first) % 2 == 0;
                if (role_is(r, "user") != want_user)
                    return qlr_errorf(QLR_ERR_INVALID, "chat message %zu: %s needs roles alternating user/assistant/"
                                      "user/... (got '%s')", i, FORMAT_NAMES[t->format], r);
            }
        }
        if (t->format == QLR_CHAT_LLAMA3 && strpbrk(msgs[i].role, "<>\n"))
            return qlr_errorf(QLR_ERR_INVALID, "chat message %zu: invalid role '%s'", i, msgs[i].role);
        if (t->format == QLR_CHAT_CHATML && strchr(msgs[i].role, '\n'))
            return qlr_errorf(QLR_ERR_INVALID, "chat message %zu: a role may not contain a newline", i);
    }
    builder b = {0};
    switch (t->format) {
    case QLR_CHAT_CHATML:
        for (size_t i = 0; i < n; i++) {
            int32_t m = (int32_t)i;
            int asst = role_is(msgs[i].role, "assistant");
            if (i == 0 && t->default_system && !role_is(msgs[0].role, "system")) {
                puts_(&b, "<|im_start|>system\n", -1, 0);
                puts_(&b, t->default_system, -1, 0);
                puts_(&b, "<|im_end|>\n", -1, 0);
            }
            puts_(&b, "<|im_start|>", m, 0);
            puts_(&b, msgs[i].role, m, 0);
            puts_(&b, "\n", m, 0);
            put(&b, msgs[i].content, strlen(msgs[i].content), m, 1, asst);
            puts_(&b, "<|im_end|>", m, asst);
            puts_(&b, "\n", m, 0);
        }
        if (add_generation_prompt) puts_(&b, "<|im_start|>assistant\n", -1, 0);
        break;
    case QLR_CHAT_LLAMA3:
        if (n) puts_(&b, "<|begin_of_text|>", -1, 0); /* the template prefixes bos to the first message */
        for (size_t i = 0; i < n; i++) {
            int32_t m = (int32_t)i;
            int asst = role_is(msgs[i].role, "assistant");
            const char *c;
            size_t cl;
            trim(msgs[i].content, &c, &cl);
            puts_(&b, "<|start_header_id|>", m, 0);
            puts_(&b, msgs[i].role, m, 0);
            puts_(&b, "<|end_header_id|>\n\n", m, 0);
            put(&b, c, cl, m, 1, asst);
            puts_(&b, "<|eot_id|>", m, asst);
        }
        if (add_generation_prompt) puts_(&b, "<|start_header_id|>assistant<|end_header_id|>\n\n", -1, 0);
        break;
    case QLR_CHAT_LLAMA2:
    case QLR_CHAT_MISTRAL: {
        /* Llama 2 strips each turn (the first user turn together with the <<SYS>> block, so
         * the system text itself is kept verbatim); Mistral v0.1 keeps content verbatim and
         * has no system role: the system text goes before the first user turn. */
        int llama2 = t->format == QLR_CHAT_LLAMA2;
        size_t first = 0;
        const char *sys = NULL;
        size_t sys_len = 0;
        if (n && role_is(msgs[0].role, "system")) {
            sys = msgs[0].content;
            sys_len = strlen(sys);
            first = 1;
        }
        int sys_done = 0;
        if (!llama2) puts_(&b, "<s>", -1, 0);
        for (size_t i = first; i < n; i++) {
            int32_t m = (int32_t)i;
            const char *c = msgs[i].content;
            size_t cl = strlen(c);
            int with_sys = sys && !sys_done && role_is(msgs[i].role, "user");
            if (llama2) {
                if (with_sys) {
                    while (cl && is_ws(c[cl - 1])) cl--;
                } else {
                    trim(msgs[i].content, &c, &cl);
                }
            }
            if (role_is(msgs[i].role, "user")) {
                puts_(&b, llama2 ? "<s>[INST] " : "[INST] ", m, 0);
                if (with_sys) {
                    if (llama2) {
                        puts_(&b, "<<SYS>>\n", m, 0);
                        put(&b, sys, sys_len, 0, 1, 0);
                        puts_(&b, cl ? "\n<</SYS>>\n\n" : "\n<</SYS>>", m, 0);
                    } else {
                        put(&b, sys, sys_len, 0, 1, 0);
                        puts_(&b, "\n\n", m, 0);
                    }
                    sys_done = 1;
                }
                put(&b, c, cl, m, 1, 0);
                puts_(&b, " [/INST]", m, 0);
            } else {
                if (llama2) puts_(&b, " ", m, 0);
                put(&b, c, cl, m, 1, 1);
                puts_(&b, llama2 ? " </s>" : "</s>", m, 1);
            }
        }
        if (sys && !sys_done) {
            /* a system message with no user turn: render it as an instruction on its own */
            puts_(&b, llama2 ? "<s>[INST] " : "[INST] ", 0, 0);
            if (llama2) puts_(&b, "<<SYS>>\n", 0, 0);
            put(&b, sys, sys_len, 0, 1, 0);
            puts_(&b, llama2 ? "\n<</SYS>> [/INST]" : " [/INST]", 0, 0);
        }
        break; /* generation continues right after [/INST]: nothing to add */
    }
    }
    if (b.failed) {
        free(b.text);
        free(b.segs);
        return qlr_errorf(QLR_ERR_NOMEM, "chat template: out of memory");
    }
    if (!b.text) {
        b.text = calloc(1, 1);
        if (!b.text) return qlr_errorf(QLR_ERR_NOMEM, "chat template: out of memory");
    }
    out->text = b.text;
    out->len = b.len;
    out->segs = b.segs;
    out->n_segs = b.n_segs;
    return QLR_OK;
}
