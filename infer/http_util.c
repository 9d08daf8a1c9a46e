/* infer/http_util.c: API key comparison in constant time and adapter path confinement (see
 * http_util.h). */
#include "infer/http_util.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int qlr_http_ct_equal(const char *a, size_t na, const char *b, size_t nb) {
    /* every byte of a is compared with a byte of b (cycled), whatever happened before */
    volatile unsigned char d = (unsigned char)(na != nb);
    for (size_t i = 0; i < na; i++) {
        unsigned char y = nb ? (unsigned char)b[i % nb] : 0;
        d |= (unsigned char)((unsigned char)a[i] ^ y);
    }
    return d == 0;
}

int qlr_http_auth_ok(const char *header, const char *key) {
    if (!key) return 1;
    if (!header) return 0;
    while (*header == ' ') header++;
    if (strncasecmp(header, "Bearer", 6) || header[6] != ' ') return 0;
    const char *tok = header + 7;
    while (*tok == ' ') tok++;
    size_t n = strlen(tok);
    while (n && (tok[n - 1] == ' ' || tok[n - 1] == '\t')) n--;
    return qlr_http_ct_equal(tok, n, key, strlen(key));
}

/* 1 if some '/'-separated component of p is exactly "..". */
static int has_dotdot(const char *p) {
    for (const char *c = p; *c;) {
        const char *e = strchr(c, '/');
        size_t len = e ? (size_t)(e - c) : strlen(c);
        if (len == 2 && c[0] == '.' && c[1] == '.') return 1;
        if (!e) break;
        c = e + 1;
    }
    return 0;
}

int qlr_http_confine_path(const char *dir, const char *path, char *out, size_t cap,
                          qlr_oai_error *err) {
    if (!dir) {
        qlr_oai_error_set(err, 403, "lora_path", "adapter_dir_not_set",
                          "'lora_path': loading adapters by path is disabled: start the server "
                          "with --adapter-dir DIR to allow paths under DIR");
        return 0;
    }
    if (has_dotdot(path)) {
        qlr_oai_error_set(err, 403, "lora_path", "path_outside_adapter_dir",
                          "'lora_path': '..' is not allowed in adapter paths");
        return 0;
    }
    char full[PATH_MAX];
    int n = path[0] == '/' ? snprintf(full, sizeof full, "%s", path)
                           : snprintf(full, sizeof full, "%s/%s", dir, path);
    if (n < 0 || (size_t)n >= sizeof full) {
        qlr_oai_error_set(err, 400, "lora_path", NULL, "'lora_path' is too long");
        return 0;
    }
    char rd[PATH_MAX], rp[PATH_MAX];
    if (!realpath(dir, rd)) {
        qlr_oai_error_set(err, 500, NULL, NULL, "the adapter directory cannot be resolved: %s",
                          strerror(errno));
        return 0;
    }
    if (!realpath(full, rp)) {
        int e = errno;
        if (e == ENOENT || e == ENOTDIR)
            qlr_oai_error_set(err, 404, "lora_path", "adapter_not_found",
                              "'lora_path': '%s' does not exist in the adapter directory", path);
        else if (e == EACCES)
            qlr_oai_error_set(err, 403, "lora_path", NULL, "'lora_path': '%s': permission denied", path);
        else
            qlr_oai_error_set(err, 400, "lora_path", NULL, "'lora_path': '%s': %s", path, strerror(e));
        return 0;
    }
    size_t nd = strlen(rd);
    int inside = !strcmp(rd, "/") || (!strncmp(rp, rd, nd) && (rp[nd] == '/' || rp[nd] == 0));
    if (!inside) {
        qlr_oai_error_set(err, 403, "lora_path", "path_outside_adapter_dir",
                          "'lora_path': '%s' is outside the adapter directory", path);
        return 0;
    }
    if (strlen(rp) >= cap) {
        qlr_oai_error_set(err, 400, "lora_path", NULL, "'lora_path' is too long");
        return 0;
    }
    memcpy(out, rp, strlen(rp) + 1);
    return 1;
}
