/* cli/cmd_inspect.c: `qlora inspect FILE [--all]` shows what is inside a model file and whether
 * it is valid. It dispatches on the first bytes of the file: GGUF (magic "GGUF") is listed here
 * through formats/gguf.h (version, alignment, every metadata key with its type and value, the
 * tensors outside the decoder blocks and those of block 0 (every tensor with --all), totals);
 * safetensors goes to the branch marked below. It only reads and prints: all
 * validation is the format readers' job, and their error message is what the user sees. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora.h"
#include "cli/cli.h"
#include "core/core.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "model/model.h" /* --nf4 (model engineer) */

/* Without --all: strings are cut after this many bytes, arrays after this many elements. */
#define INSPECT_MAX_STR 72
#define INSPECT_MAX_ARRAY_STR 24
#define INSPECT_MAX_ELEMS 8

typedef struct inspect_opts {
    const char *path;
    int all; /* --all: every tensor, and long strings and arrays in full */
    int nf4; /* --nf4: per-tensor NF4 quantization error of a GGUF model (model/) */
} inspect_opts;

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora inspect FILE [--all]\n"
            "\n"
            "Validates a model file and prints what is inside it. The format is recognised from\n"
            "the file's first bytes:\n"
            "  GGUF         version, alignment, every metadata key with its type and value, the\n"
            "               tensors (name, ggml type, shape in PyTorch order, ne, bytes) outside the\n"
            "               decoder blocks and those of block 0, totals (parameters, bytes by type)\n"
            "  safetensors  a file, a sharded checkpoint folder or its model.safetensors.index.json\n"
            "               (the first 20 tensors of each file)\n"
            "The last line says whether the file is valid; an invalid file prints the reason (with\n"
            "the byte offset and the key or tensor) and exits 1.\n"
            "\n"
            "options:\n"
            "  --all        list every tensor, and print long strings (e.g. the chat template)\n"
            "               and arrays (e.g. the vocabulary) in full instead of abbreviated\n"
            "  --nf4        GGUF models: quantize every decoder linear to NF4 (double quant) and\n"
            "               print its error (relative RMS, max relative, max absolute) and a total\n"
            "  -h, --help   this text\n"
            "\n"
            "exit status: 0 valid, 1 invalid or unreadable, 2 usage error\n");
}

/* Returns 0, or 2 after printing a usage error. New flags (e.g. --nf4) get a field in
 * inspect_opts, a branch here and a line in usage(). */
static int parse_args(int argc, char **argv, inspect_opts *o) {
    memset(o, 0, sizeof *o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--all")) {
            o->all = 1;
        } else if (!strcmp(a, "--nf4")) {
            o->nf4 = 1;
        } else if (!strcmp(a, "--")) {
            if (i + 1 < argc && !o->path) o->path = argv[++i];
            if (i + 1 < argc) return qlr_cli_usage_error("inspect", "expected one FILE");
        } else if (a[0] == '-' && a[1]) {
            return qlr_cli_usage_error("inspect", "unknown option '%s'", a);
        } else if (o->path) {
            return qlr_cli_usage_error("inspect", "expected one FILE, got '%s' and '%s'", o->path, a);
        } else {
            o->path = a;
        }
    }
    if (!o->path) return qlr_cli_usage_error("inspect", "missing FILE");
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* Printing helpers                                                                          */

/* A quoted string with C escapes for control bytes; cut after `max` bytes (at a UTF-8
 * boundary) with the full length noted, unless max is 0. */
static void print_str(const char *s, uint64_t len, uint64_t max) {
    uint64_t n = len;
    if (max && len > max) {
        n = max;
        while (n > 0 && ((uint8_t)s[n] & 0xC0) == 0x80) n--; /* do not split a UTF-8 sequence */
    }
    putchar('"');
    for (uint64_t i = 0; i < n; i++) {
        uint8_t c = (uint8_t)s[i];
        switch (c) {
        case '\n': fputs("\\n", stdout); break;
        case '\t': fputs("\\t", stdout); break;
        case '\r': fputs("\\r", stdout); break;
        case '"': fputs("\\\"", stdout); break;
        case '\\': fputs("\\\\", stdout); break;
        default:
            if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
            else putchar(c);
        }
    }
    putchar('"');
    if (n < len) printf("... (%" PRIu64 " bytes)", len);
}

static void print_scalar(qlr_gguf_type t, const uint8_t *p) {
    union {
        uint8_t u8;
        int8_t i8;
        uint16_t u16;
        int16_t i16;
        uint32_t u32;
        int32_t i32;
        float f32;
        uint64_t u64;
        int64_t i64;
        double f64;
    } v;
    memcpy(&v, p, qlr_gguf_scalar_size(t)); /* the file is little-endian, like every host we build for */
    switch (t) {
    case QLR_GGUF_UINT8: printf("%u", v.u8); break;
    case QLR_GGUF_INT8: printf("%d", v.i8); break;
    case QLR_GGUF_UINT16: printf("%u", v.u16); break;
    case QLR_GGUF_INT16: printf("%d", v.i16); break;
    case QLR_GGUF_UINT32: printf("%" PRIu32, v.u32); break;
    case QLR_GGUF_INT32: printf("%" PRId32, v.i32); break;
    case QLR_GGUF_FLOAT32: printf("%.9g", v.f32); break;
    case QLR_GGUF_BOOL: printf("%s", v.u8 ? "true" : "false"); break;
    case QLR_GGUF_UINT64: printf("%" PRIu64, v.u64); break;
    case QLR_GGUF_INT64: printf("%" PRId64, v.i64); break;
    case QLR_GGUF_FLOAT64: printf("%.17g", v.f64); break;
    default: printf("?"); break;
    }
}

static void print_kv_value(const qlr_gguf *g, int64_t i, const inspect_opts *o) {
    qlr_gguf_type t = qlr_gguf_kv_type(g, i);
    const char *s;
    uint64_t len;
    if (t == QLR_GGUF_STRING) {
        qlr_gguf_kv_str(g, i, &s, &len);
        print_str(s, len, o->all ? 0 : INSPECT_MAX_STR);
        return;
    }
    if (t != QLR_GGUF_ARRAY) {
        print_scalar(t, qlr_gguf_kv_scalar(g, i));
        return;
    }
    qlr_gguf_type et;
    uint64_t n;
    const void *data;
    qlr_gguf_kv_arr(g, i, &et, &n, &data);
    uint64_t shown = o->all || n <= INSPECT_MAX_ELEMS ? n : INSPECT_MAX_ELEMS;
    putchar('[');
    for (uint64_t k = 0; k < shown; k++) {
        if (k) fputs(", ", stdout);
        if (et == QLR_GGUF_STRING) {
            qlr_gguf_kv_arr_str(g, i, k, &s, &len);
            print_str(s, len, o->all ? 0 : INSPECT_MAX_ARRAY_STR);
        } else {
            print_scalar(et, (const uint8_t *)data + k * qlr_gguf_scalar_size(et));
        }
    }
    if (shown < n) fputs(", ...", stdout);
    printf("] (%" PRIu64 " elements)", n);
}

/* "[a, b, c]" into buf. */
static void dims_str(char *buf, size_t cap, const uint64_t *ne, uint32_t n_dims, int reverse) {
    size_t k = (size_t)snprintf(buf, cap, "[");
    for (uint32_t d = 0; d < n_dims && k < cap; d++) {
        uint64_t v = ne[reverse ? n_dims - 1 - d : d];
        k += (size_t)snprintf(buf + k, cap - k, "%s%" PRIu64, d ? ", " : "", v);
    }
    if (k < cap) snprintf(buf + k, cap - k, "]");
}

/* ---------------------------------------------------------------------------------------- */
/* GGUF                                                                                      */

/* The decoder block a tensor belongs to ("blk.N.*"), or -1. */
static long block_of(const char *name) {
    if (strncmp(name, "blk.", 4)) return -1;
    char *end;
    long b = strtol(name + 4, &end, 10);
    return end != name + 4 && *end == '.' ? b : -1;
}

/* A LoRA adapter (GGUF, PEFT folder, run folder): what it records of its training. */
static int print_adapter(const char *path) {
    qlr_lora *l = NULL;
    if (qlr_lora_load(path, NULL, &l) != QLR_OK) return qlr_cli_fail("inspect");
    printf("\nadapter:   ");
    qlr_lora_print(l, stdout);
    if (l->base.name[0] || l->base.nf4_hash)
        printf("  trained on:     %s (nf4 %016llx)\n", l->base.name[0] ? l->base.name : "?",
               (unsigned long long)l->base.nf4_hash);
    else
        printf("  trained on:     unknown (no qlora base identity recorded)\n");
    printf("  prompt format:  %s\n", l->prompt_format ? l->prompt_format : "unknown (none recorded)");
    if (l->prompt_system) {
        printf("  system message: ");
        print_str(l->prompt_system, strlen(l->prompt_system), INSPECT_MAX_STR);
        putchar('\n');
    }
    qlr_lora_free(l);
    return 0;
}

static int inspect_gguf(const inspect_opts *o) {
    qlr_gguf *g = NULL;
    if (qlr_gguf_open(o->path, &g) != QLR_OK) return qlr_cli_fail("inspect");
    printf("file:      %s\n", o->path);
    printf("format:    GGUF v%" PRIu32 ", alignment %" PRIu32 ", %" PRIu64 " bytes, data blob at offset %" PRIu64 "\n",
           qlr_gguf_version(g), qlr_gguf_alignment(g), qlr_gguf_file_size(g), qlr_gguf_data_offset(g));

    int64_t n_kv = qlr_gguf_n_kv(g);
    printf("\nmetadata (%" PRId64 " keys):\n", n_kv);
    for (int64_t i = 0; i < n_kv; i++) {
        qlr_gguf_type t = qlr_gguf_kv_type(g, i);
        char type[40];
        if (t == QLR_GGUF_ARRAY) {
            qlr_gguf_type et;
            qlr_gguf_kv_arr(g, i, &et, NULL, NULL);
            snprintf(type, sizeof type, "ARRAY[%s]", qlr_gguf_type_name(et));
        } else {
            snprintf(type, sizeof type, "%s", qlr_gguf_type_name(t));
        }
        printf("  %-40s %-15s ", qlr_gguf_kv_key(g, i), type);
        print_kv_value(g, i, o);
        putchar('\n');
    }

    /* per-type totals, indexed by ggml type id (all known ids are < 64) */
    uint64_t type_count[64] = {0}, type_bytes[64] = {0}, type_params[64] = {0};
    uint64_t params = 0, bytes = 0;
    int64_t n_t = qlr_gguf_n_tensors(g);
    int64_t hidden = 0;
    long last_block = -1;
    printf("\ntensors (%" PRId64 ")%s:\n", n_t, o->all ? "" : ", outside the decoder blocks and block 0");
    printf("  %5s  %-40s %-5s %-20s %-20s %12s\n", "#", "name", "type", "shape (torch)", "ne", "bytes");
    for (int64_t i = 0; i < n_t; i++) {
        const qlr_gguf_tensor *t = qlr_gguf_tensor_at(g, i);
        char shape[96], ne[96];
        dims_str(shape, sizeof shape, t->ne, t->n_dims, 1);
        dims_str(ne, sizeof ne, t->ne, t->n_dims, 0);
        long blk = block_of(t->name);
        if (blk > last_block) last_block = blk;
        if (o->all || blk <= 0)
            printf("  %5" PRId64 "  %-40s %-5s %-20s %-20s %12" PRIu64 "\n", i, t->name, qlr_ggml_type_name(t->type),
                   shape, ne, t->size);
        else hidden++;
        uint64_t nel = t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3]; /* the reader checked the overflow */
        params += nel;
        bytes += t->size;
        if (t->type < 64) {
            type_count[t->type]++;
            type_bytes[t->type] += t->size;
            type_params[t->type] += nel;
        }
    }
    if (hidden)
        printf("  ... %" PRId64 " more, of blocks 1..%ld (--all lists every tensor)\n", hidden, last_block);
    printf("\ntotals:    %" PRId64 " tensors, %" PRIu64 " parameters (%.2f M), %" PRIu64 " bytes of tensor data (%.2f MiB)\n",
           n_t, params, params / 1e6, bytes, bytes / 1048576.0);
    for (uint32_t ty = 0; ty < 64; ty++) {
        if (!type_count[ty]) continue;
        printf("  %-5s %6" PRIu64 " tensors %14" PRIu64 " parameters %14" PRIu64 " bytes (%.3f bits/param)\n",
               qlr_ggml_type_name(ty), type_count[ty], type_params[ty], type_bytes[ty],
               type_params[ty] ? 8.0 * type_bytes[ty] / type_params[ty] : 0.0);
    }
    const char *s;
    uint64_t sl;
    int adapter = qlr_gguf_get_str(g, "general.type", &s, &sl) == QLR_OK && sl == 7 && !memcmp(s, "adapter", 7);
    if (qlr_gguf_get_str(g, "qlora.nf4.hash", &s, &sl) == QLR_OK)
        printf("\nqlora base: written by qlora export-base; reloads to the NF4 store nf4 %.*s\n", (int)sl, s);
    qlr_error_clear();
    printf("\nvalid:     %s is a well-formed GGUF v%" PRIu32 " file\n", o->path, qlr_gguf_version(g));
    qlr_gguf_close(g);
    return adapter ? print_adapter(o->path) : 0;
}

/* ---------------------------------------------------------------------------------------- */
/* SAFETENSORS BRANCH: listing and validation are formats/safetensors.h's.                  */
static int looks_like_safetensors(const uint8_t *head, size_t n) {
    return qlr_safetensors_sniff(head, n);
}

static int inspect_safetensors(const inspect_opts *o) {
    if (qlr_safetensors_print_summary(stdout, o->path, o->all) != QLR_OK) return qlr_cli_fail("inspect");
    return 0;
}
/* END OF SAFETENSORS BRANCH                                                                 */
/* ---------------------------------------------------------------------------------------- */

static int cmd_inspect(int argc, char **argv) {
    if (qlr_cli_wants_help(argc, argv)) {
        usage(stdout);
        return 0;
    }
    inspect_opts o;
    int rc = parse_args(argc, argv, &o);
    if (rc) return rc;

    /* BEGIN --nf4 (model/tools.c, owned by the model engineer) */
    if (o.nf4) {
        if (qlr_model_print_nf4_error(o.path, stdout) != QLR_OK) return qlr_cli_fail("inspect");
        return 0;
    }
    /* END --nf4 */

    if (qlr_is_dir(o.path)) {
        char *ad = NULL;
        int ag = 0;
        if (qlr_lora_resolve(o.path, &ad, &ag) == QLR_OK) { /* a PEFT folder or a run folder */
            printf("folder:    %s\nadapter files: %s%s\n", o.path, ad, ag ? "" : "/adapter_model.safetensors");
            int rc = print_adapter(ad);
            free(ad);
            return rc;
        }
        qlr_error_clear();
        return inspect_safetensors(&o); /* sharded checkpoint folder */
    }
    size_t plen = strlen(o.path);
    if (plen >= 11 && !strcmp(o.path + plen - 11, ".index.json")) return inspect_safetensors(&o);
    uint8_t head[16] = {0};
    size_t n = 0;
    FILE *f = fopen(o.path, "rb");
    if (f) {
        n = fread(head, 1, sizeof head, f);
        fclose(f);
    }
    /* "GGUF", or anything too short to be safetensors: the GGUF reader explains what is wrong */
    if (!f || n < 9 || !memcmp(head, "GGUF", 4)) return inspect_gguf(&o);
    if (looks_like_safetensors(head, n)) return inspect_safetensors(&o);
    qlr_errorf(QLR_ERR_FORMAT,
               "%s: offset 0: not a GGUF or safetensors file (first bytes %02x %02x %02x %02x %02x %02x %02x %02x %02x)",
               o.path, head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7], head[8]);
    return qlr_cli_fail("inspect");
}

const qlr_cli_cmd qlr_cmd_inspect = {"inspect", "show and validate what is inside a GGUF or safetensors file",
                                     cmd_inspect};
