/* adapters/lora_load.c: where an adapter is (a GGUF file, a PEFT folder, a training run's
 * final adapter or its newest checkpoint's) and the dispatch to the format readers. Sits above
 * lora_gguf.c and lora_peft.c, which sit above lora.c. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adapters/lora.h"
#include "core/core.h"

static char *path_join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", a, b);
    return p;
}

static int is_peft_dir(const char *dir) {
    char *p = path_join(dir, "adapter_config.json");
    int ok = p && qlr_path_exists(p);
    free(p);
    return ok;
}

qlr_status qlr_lora_resolve(const char *path, char **out, int *is_gguf) {
    *out = NULL;
    *is_gguf = 0;
    if (!qlr_path_exists(path)) return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: no such file or folder", path);
    if (!qlr_is_dir(path)) {
        *is_gguf = 1;
        if (!(*out = strdup(path))) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        return QLR_OK;
    }
    if (is_peft_dir(path)) {
        if (!(*out = strdup(path))) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
        return QLR_OK;
    }
    char *p = path_join(path, QLR_RUN_ADAPTER_DIR);
    if (!p) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    if (is_peft_dir(p)) {
        *out = p;
        return QLR_OK;
    }
    free(p);
    /* the latest checkpoint-N/adapter */
    DIR *d = opendir(path);
    if (!d) return qlr_errorf(QLR_ERR_IO, "%s: cannot list the folder", path);
    long best = -1;
    struct dirent *e;
    size_t pl = strlen(QLR_RUN_CHECKPOINT_PREFIX);
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, QLR_RUN_CHECKPOINT_PREFIX, pl)) continue;
        char *end = NULL;
        const char *num = e->d_name + pl;
        if (*num < '0' || *num > '9') continue;
        long n = strtol(num, &end, 10);
        if (*end || n <= best) continue;
        /* only a complete checkpoint (its manifest is written last): a killed run can leave a
         * newer folder whose adapter is there but whose other files or manifest are not */
        char *c = path_join(path, e->d_name);
        char *a = c ? path_join(c, QLR_RUN_ADAPTER_DIR) : NULL;
        char *m = c ? path_join(c, QLR_RUN_CHECKPOINT_MANIFEST) : NULL;
        if (a && m && is_peft_dir(a) && qlr_path_exists(m)) best = n;
        free(m);
        free(a);
        free(c);
    }
    closedir(d);
    if (best < 0)
        return qlr_errorf(QLR_ERR_NOT_FOUND,
                          "%s: no adapter found (looked for adapter_config.json, %s/adapter_config.json "
                          "and %sN/%s/adapter_config.json)",
                          path, QLR_RUN_ADAPTER_DIR, QLR_RUN_CHECKPOINT_PREFIX, QLR_RUN_ADAPTER_DIR);
    size_t n = strlen(path) + strlen(QLR_RUN_CHECKPOINT_PREFIX) + strlen(QLR_RUN_ADAPTER_DIR) + 32;
    if (!(*out = malloc(n))) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    snprintf(*out, n, "%s/%s%ld/%s", path, QLR_RUN_CHECKPOINT_PREFIX, best, QLR_RUN_ADAPTER_DIR);
    return QLR_OK;
}

qlr_status qlr_lora_load(const char *path, const qlr_lora_base *base, qlr_lora **out) {
    *out = NULL;
    char *p = NULL;
    int gguf = 0;
    QLR_TRY(qlr_lora_resolve(path, &p, &gguf));
    qlr_status st = gguf ? qlr_lora_load_gguf(p, base, out) : qlr_lora_load_peft(p, base, out);
    free(p);
    return st;
}

