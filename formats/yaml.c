/* formats/yaml.c: libyaml event stream -> qlr_yaml_node tree (see yaml.h).
 *
 * The tree is built with an explicit stack (no recursion while parsing), so nesting is limited
 * by QLR_YAML_MAX_DEPTH and not by the C stack; freeing recurses at most that deep. libyaml
 * does the YAML syntax; this file only refuses what recipes must not use and records
 * positions. It does not interpret scalars (numbers, booleans): callers do. */
#include "formats/yaml.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "core/file.h"

#define QLR_YAML_MAX_MAP_KEYS 4096

const char *qlr_yaml_kind_name(qlr_yaml_kind k) {
    switch (k) {
    case QLR_YAML_MAP: return "map";
    case QLR_YAML_SEQ: return "sequence";
    default: return "scalar";
    }
}

static void node_free(qlr_yaml_node *n) {
    if (!n) return;
    for (size_t i = 0; i < n->n; i++) {
        if (n->items) node_free(n->items[i]);
        if (n->keys) node_free(n->keys[i]);
    }
    free(n->items);
    free(n->keys);
    free(n->text);
    free(n);
}

void qlr_yaml_free(qlr_yaml_doc *doc) {
    if (!doc) return;
    node_free(doc->root);
    free(doc->name);
    free(doc);
}

int qlr_yaml_is_null(const qlr_yaml_node *n) {
    if (!n || n->kind != QLR_YAML_SCALAR || n->quoted) return 0;
    return !strcmp(n->text, "") || !strcmp(n->text, "~") || !strcmp(n->text, "null") ||
           !strcmp(n->text, "Null") || !strcmp(n->text, "NULL");
}

const qlr_yaml_node *qlr_yaml_map_get(const qlr_yaml_node *map, const char *key) {
    if (!map || map->kind != QLR_YAML_MAP) return NULL;
    for (size_t i = 0; i < map->n; i++)
        if (!strcmp(map->keys[i]->text, key)) return map->items[i];
    return NULL;
}

size_t qlr_yaml_quote(char *buf, size_t cap, const char *s) {
    size_t k = 0;
#define PUT(c)                          \
    do {                                \
        if (cap && k + 1 < cap) buf[k] = (char)(c); \
        k++;                            \
    } while (0)
    PUT('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        unsigned char c = *p;
        if (c == '"' || c == '\\') { PUT('\\'); PUT(c); }
        else if (c == '\n') { PUT('\\'); PUT('n'); }
        else if (c == '\t') { PUT('\\'); PUT('t'); }
        else if (c == '\r') { PUT('\\'); PUT('r'); }
        else if (c == 0xc2 && p[1] == 0x85) { PUT('\\'); PUT('N'); p++; } /* NEL: a YAML line break */
        else if (c == 0xc2 && p[1] >= 0x80 && p[1] <= 0x9f) { /* C1 controls are not printable */
            static const char hex[] = "0123456789abcdef";
            PUT('\\'); PUT('x'); PUT(hex[p[1] >> 4]); PUT(hex[p[1] & 15]);
            p++;
        } else if (c == 0xef && ((p[1] == 0xbb && p[2] == 0xbf) || (p[1] == 0xbf && p[2] >= 0xbe))) {
            /* U+FEFF, U+FFFE, U+FFFF are not printable either */
            const char *u = p[1] == 0xbb ? "\\uFEFF" : p[2] == 0xbe ? "\\uFFFE" : "\\uFFFF";
            for (; *u; u++) PUT(*u);
            p += 2;
        }
        else if (c == 0xe2 && p[1] == 0x80 && (p[2] == 0xa8 || p[2] == 0xa9)) { /* LS, PS */
            PUT('\\');
            PUT(p[2] == 0xa8 ? 'L' : 'P');
            p += 2;
        } else if (c < 0x20 || c == 0x7f) {
            static const char hex[] = "0123456789abcdef";
            PUT('\\'); PUT('x'); PUT(hex[c >> 4]); PUT(hex[c & 15]);
        } else PUT(c);
    }
    PUT('"');
#undef PUT
    if (cap) buf[k < cap ? k : cap - 1] = 0;
    return k;
}

typedef struct frame {
    qlr_yaml_node *node;
    size_t cap;
    int want_value;  /* maps: the next completed node is a value */
} frame;

typedef struct builder {
    const char *name;
    qlr_yaml_doc *doc;
    frame stack[QLR_YAML_MAX_DEPTH];
    int depth;
} builder;

static qlr_status err_at(const builder *b, const yaml_mark_t *m, qlr_status st, const char *msg) {
    return qlr_errorf(st, "%s:%zu:%zu: %s", b->name, m->line + 1, m->column + 1, msg);
}

static qlr_yaml_node *node_new(builder *b, qlr_yaml_kind kind, const yaml_mark_t *m) {
    qlr_yaml_node *n = calloc(1, sizeof *n);
    if (!n) return NULL;
    n->kind = kind;
    n->line = (uint32_t)(m->line + 1);
    n->col = (uint32_t)(m->column + 1);
    b->doc->n_nodes++;
    return n;
}

/* Attaches a finished node to the open container on top of the stack (or makes it the root).
 * Takes ownership of `n` in every case. */
static qlr_status attach(builder *b, qlr_yaml_node *n) {
    if (b->depth == 0) {
        b->doc->root = n;
        return QLR_OK;
    }
    frame *f = &b->stack[b->depth - 1];
    qlr_yaml_node *p = f->node;
    if (p->kind == QLR_YAML_MAP && !f->want_value) {
        if (n->kind != QLR_YAML_SCALAR) {
            qlr_status st = qlr_errorf(QLR_ERR_FORMAT, "%s:%u:%u: a map key must be a plain scalar, not a %s",
                                       b->name, n->line, n->col, qlr_yaml_kind_name(n->kind));
            node_free(n);
            return st;
        }
        for (size_t i = 0; i < p->n; i++) {
            if (p->keys[i]->len == n->len && !memcmp(p->keys[i]->text, n->text, n->len)) {
                qlr_status st = qlr_errorf(QLR_ERR_FORMAT, "%s:%u:%u: %s: duplicate key (first at line %u)",
                                           b->name, n->line, n->col, n->text, p->keys[i]->line);
                node_free(n);
                return st;
            }
        }
        if (p->n >= QLR_YAML_MAX_MAP_KEYS) {
            qlr_status st = qlr_errorf(QLR_ERR_RANGE, "%s:%u:%u: more than %d keys in one map", b->name,
                                       n->line, n->col, QLR_YAML_MAX_MAP_KEYS);
            node_free(n);
            return st;
        }
        if (p->n == f->cap) {
            size_t nc = f->cap ? f->cap * 2 : 8;
            qlr_yaml_node **k = realloc(p->keys, nc * sizeof *k);
            if (k) p->keys = k;
            qlr_yaml_node **v = k ? realloc(p->items, nc * sizeof *v) : NULL;
            if (v) p->items = v;
            if (!k || !v) {
                node_free(n);
                return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", b->name);
            }
            f->cap = nc;
        }
        p->keys[p->n] = n;
        p->items[p->n] = NULL;
        f->want_value = 1;
        return QLR_OK;
    }
    if (p->kind == QLR_YAML_MAP) {
        p->items[p->n++] = n;
        f->want_value = 0;
        return QLR_OK;
    }
    if (p->n == f->cap) {
        size_t nc = f->cap ? f->cap * 2 : 8;
        qlr_yaml_node **v = realloc(p->items, nc * sizeof *v);
        if (!v) {
            node_free(n);
            return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", b->name);
        }
        p->items = v;
        f->cap = nc;
    }
    p->items[p->n++] = n;
    return QLR_OK;
}

/* Frees a half-built tree: the open containers on the stack (the root owns the rest). */
static void builder_abort(builder *b) {
    if (b->depth > 0) {
        /* A map waiting for a value has a key with no value: count it so that free sees it. */
        for (int d = b->depth - 1; d >= 0; d--) {
            frame *f = &b->stack[d];
            if (f->node->kind == QLR_YAML_MAP && f->want_value) f->node->n++;
        }
        /* Containers below the top are not yet attached to their parents: free bottom-up
         * by attaching each to its parent slot first would be complex; free them directly. */
        for (int d = b->depth - 1; d >= 0; d--) node_free(b->stack[d].node);
        b->depth = 0;
    }
}

static qlr_status check_props(builder *b, const yaml_event_t *ev, const yaml_char_t *anchor,
                              const yaml_char_t *tag, int *is_str) {
    *is_str = 0;
    if (anchor)
        return err_at(b, &ev->start_mark, QLR_ERR_FORMAT,
                      "YAML anchors (&name) and aliases (*name) are not supported: write the value out");
    if (tag) {
        if (!strcmp((const char *)tag, "tag:yaml.org,2002:str")) {
            *is_str = 1;
            return QLR_OK;
        }
        char msg[256];
        snprintf(msg, sizeof msg, "YAML tag '%.100s' is not supported (only !!str)", (const char *)tag);
        return err_at(b, &ev->start_mark, QLR_ERR_FORMAT, msg);
    }
    return QLR_OK;
}

qlr_status qlr_yaml_parse(const char *data, size_t size, const char *name, qlr_yaml_doc **out) {
    *out = NULL;
    if (!name) name = "<yaml>";
    if (size > QLR_YAML_MAX_BYTES)
        return qlr_errorf(QLR_ERR_RANGE, "%s: %zu bytes is more than the %u bytes a YAML file may have", name,
                          size, QLR_YAML_MAX_BYTES);
    builder b = {0};
    b.name = name;
    b.doc = calloc(1, sizeof *b.doc);
    if (!b.doc) return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name);
    b.doc->name = strdup(name);
    if (!b.doc->name) {
        free(b.doc);
        return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name);
    }
    yaml_parser_t p;
    if (!yaml_parser_initialize(&p)) {
        qlr_yaml_free(b.doc);
        return qlr_errorf(QLR_ERR_NOMEM, "%s: cannot initialise libyaml", name);
    }
    yaml_parser_set_input_string(&p, (const unsigned char *)(data ? data : ""), size);
    qlr_status st = QLR_OK;
    int n_docs = 0, done = 0;
    while (!done && st == QLR_OK) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&p, &ev)) {
            if (p.error == YAML_MEMORY_ERROR) st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name);
            else if (p.context)
                st = qlr_errorf(QLR_ERR_FORMAT, "%s:%zu:%zu: %s (%s at line %zu)", name, p.problem_mark.line + 1,
                                p.problem_mark.column + 1, p.problem ? p.problem : "syntax error", p.context,
                                p.context_mark.line + 1);
            else
                st = qlr_errorf(QLR_ERR_FORMAT, "%s:%zu:%zu: %s", name, p.problem_mark.line + 1,
                                p.problem_mark.column + 1, p.problem ? p.problem : "syntax error");
            break;
        }
        int is_str = 0;
        qlr_yaml_node *n = NULL;
        if (b.doc->n_nodes >= QLR_YAML_MAX_NODES &&
            (ev.type == YAML_SCALAR_EVENT || ev.type == YAML_SEQUENCE_START_EVENT ||
             ev.type == YAML_MAPPING_START_EVENT)) {
            char msg[96];
            snprintf(msg, sizeof msg, "more than %d YAML nodes", QLR_YAML_MAX_NODES);
            st = err_at(&b, &ev.start_mark, QLR_ERR_RANGE, msg);
            yaml_event_delete(&ev);
            break;
        }
        switch (ev.type) {
        case YAML_STREAM_END_EVENT: done = 1; break;
        case YAML_DOCUMENT_START_EVENT:
            if (++n_docs > 1)
                st = err_at(&b, &ev.start_mark, QLR_ERR_FORMAT,
                            "a second YAML document ('---'): a recipe is one document");
            break;
        case YAML_ALIAS_EVENT:
            st = err_at(&b, &ev.start_mark, QLR_ERR_FORMAT,
                        "YAML aliases (*name) are not supported: write the value out");
            break;
        case YAML_SCALAR_EVENT:
            st = check_props(&b, &ev, ev.data.scalar.anchor, ev.data.scalar.tag, &is_str);
            if (st != QLR_OK) break;
            n = node_new(&b, QLR_YAML_SCALAR, &ev.start_mark);
            if (n) n->text = malloc(ev.data.scalar.length + 1);
            if (!n || !n->text) {
                node_free(n);
                st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name);
                break;
            }
            memcpy(n->text, ev.data.scalar.value, ev.data.scalar.length);
            n->text[ev.data.scalar.length] = 0;
            n->len = ev.data.scalar.length;
            n->quoted = is_str || ev.data.scalar.style != YAML_PLAIN_SCALAR_STYLE;
            st = attach(&b, n);
            break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT: {
            int is_seq = ev.type == YAML_SEQUENCE_START_EVENT;
            st = check_props(&b, &ev, is_seq ? ev.data.sequence_start.anchor : ev.data.mapping_start.anchor,
                             is_seq ? ev.data.sequence_start.tag : ev.data.mapping_start.tag, &is_str);
            if (st != QLR_OK) break;
            if (is_str) {
                st = err_at(&b, &ev.start_mark, QLR_ERR_FORMAT, "!!str on a map or sequence");
                break;
            }
            if (b.depth >= QLR_YAML_MAX_DEPTH) {
                char msg[96];
                snprintf(msg, sizeof msg, "nesting deeper than %d levels", QLR_YAML_MAX_DEPTH);
                st = err_at(&b, &ev.start_mark, QLR_ERR_RANGE, msg);
                break;
            }
            /* A key that is itself a map or sequence is refused before we descend. */
            if (b.depth > 0 && b.stack[b.depth - 1].node->kind == QLR_YAML_MAP && !b.stack[b.depth - 1].want_value) {
                st = err_at(&b, &ev.start_mark, QLR_ERR_FORMAT, "a map key must be a plain scalar");
                break;
            }
            n = node_new(&b, is_seq ? QLR_YAML_SEQ : QLR_YAML_MAP, &ev.start_mark);
            if (!n) {
                st = qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", name);
                break;
            }
            b.stack[b.depth].node = n;
            b.stack[b.depth].cap = 0;
            b.stack[b.depth].want_value = 0;
            b.depth++;
            break;
        }
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            QLR_ASSERT(b.depth > 0);
            n = b.stack[--b.depth].node;
            st = attach(&b, n);
            break;
        default: break;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&p);
    if (st != QLR_OK) {
        builder_abort(&b);
        qlr_yaml_free(b.doc);
        return st;
    }
    *out = b.doc;
    return QLR_OK;
}

qlr_status qlr_yaml_load(const char *path, qlr_yaml_doc **out) {
    *out = NULL;
    char *data = NULL;
    size_t size = 0;
    qlr_status st = qlr_file_read_all(path, QLR_YAML_MAX_BYTES, &data, &size);
    if (st != QLR_OK) return st;
    st = qlr_yaml_parse(data, size, path, out);
    free(data);
    return st;
}
