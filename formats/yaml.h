/* formats/yaml.h: YAML documents (recipes) loaded through libyaml into a small node tree.
 *
 * Owns: turning YAML text into maps, sequences and scalars, each node carrying its 1-based line
 * and column so that callers can report "file:line:column: key: message". It does not know
 * what any key means (train/recipe.c does). Refused on purpose, with a message: anchors and
 * aliases, tags other than !!str, more than one document, duplicate keys in a map, non-scalar
 * map keys. Input is bounded (QLR_YAML_MAX_DEPTH nesting, QLR_YAML_MAX_NODES nodes,
 * QLR_YAML_MAX_BYTES of text) so that hostile input cannot exhaust the stack or memory. */
#ifndef QLR_FORMATS_YAML_H
#define QLR_FORMATS_YAML_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

#define QLR_YAML_MAX_DEPTH 64
#define QLR_YAML_MAX_NODES 100000
#define QLR_YAML_MAX_BYTES (4u << 20)

typedef enum qlr_yaml_kind {
    QLR_YAML_SCALAR = 0,
    QLR_YAML_SEQ,
    QLR_YAML_MAP,
} qlr_yaml_kind;

typedef struct qlr_yaml_node qlr_yaml_node;
struct qlr_yaml_node {
    qlr_yaml_kind kind;
    uint32_t line;   /* 1-based line of the node's first character */
    uint32_t col;    /* 1-based column */
    /* scalars */
    char *text;      /* NUL-terminated value as written (after YAML unescaping); "" for empty */
    size_t len;      /* bytes in text (a scalar may hold NUL bytes from "\0" escapes) */
    int quoted;      /* 1 if single/double quoted, literal (|) or folded (>) or tagged !!str */
    /* sequences: items[0..n); maps: keys[0..n) (scalars) with values[0..n), in file order */
    size_t n;
    qlr_yaml_node **items;  /* seq items, or map values */
    qlr_yaml_node **keys;   /* map keys (NULL for seqs) */
};

typedef struct qlr_yaml_doc {
    qlr_yaml_node *root;    /* NULL for an empty document (empty file or only comments) */
    char *name;             /* the name used in messages (file path) */
    size_t n_nodes;
} qlr_yaml_doc;

/* Parses `size` bytes of YAML. `name` prefixes every message ("quick.yaml:3:7: ..."). On
 * failure *out is NULL and the status is QLR_ERR_FORMAT (syntax, refused feature) or
 * QLR_ERR_RANGE (a bound was hit) or QLR_ERR_NOMEM. */
qlr_status qlr_yaml_parse(const char *data, size_t size, const char *name, qlr_yaml_doc **out);

/* Reads and parses a file (at most QLR_YAML_MAX_BYTES). */
qlr_status qlr_yaml_load(const char *path, qlr_yaml_doc **out);

/* Frees a document and every node; NULL is fine. */
void qlr_yaml_free(qlr_yaml_doc *doc);

/* The value of `key` in a map node, or NULL (also when `map` is not a map). */
const qlr_yaml_node *qlr_yaml_map_get(const qlr_yaml_node *map, const char *key);

/* 1 if a scalar is YAML null: unquoted "", "~", "null", "Null" or "NULL". */
int qlr_yaml_is_null(const qlr_yaml_node *n);

/* "map", "sequence" or "scalar". */
const char *qlr_yaml_kind_name(qlr_yaml_kind k);

/* Appends `s` to `buf` as a double-quoted YAML scalar with escapes. Returns the number of
 * bytes it needs (like snprintf: writes at most cap-1 and a NUL when cap > 0). */
size_t qlr_yaml_quote(char *buf, size_t cap, const char *s);

#endif
