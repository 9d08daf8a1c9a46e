/* train/checkpoint.c: checkpoint-N folders: atomic files with a crc32 each, the manifest written
 * last, verification on open, latest-checkpoint search, rotation and the resume key-field check.
 * The contents of the files are the trainer's (train/trainer.c). */
#define _GNU_SOURCE
#include "train/checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/core.h"

#define CKPT_FORMAT "qlora-checkpoint"
#define CKPT_VERSION 1
#define CKPT_MAX_FILE_BYTES ((size_t)1 << 34)

static qlr_status join(char *out, size_t cap, const char *a, const char *b) {
    int n = snprintf(out, cap, "%s/%s", a, b);
    if (n < 0 || (size_t)n >= cap) return qlr_errorf(QLR_ERR_RANGE, "path too long: %s/%s", a, b);
    return QLR_OK;
}

/* The folder part of a relative name ("adapter" of "adapter/x.json"), created under dir. */
static qlr_status make_parent(const char *dir, const char *name) {
    const char *slash = strrchr(name, '/');
    if (!slash) return QLR_OK;
    char sub[4096];
    int n = snprintf(sub, sizeof sub, "%s/%.*s", dir, (int)(slash - name), name);
    if (n < 0 || (size_t)n >= sizeof sub) return qlr_errorf(QLR_ERR_RANGE, "path too long: %s/%s", dir, name);
    return qlr_mkdir_p(sub);
}

static qlr_status record(qlr_ckpt_writer *w, const char *name, uint64_t bytes, uint32_t crc) {
    for (int i = 0; i < w->n_files; i++)
        if (!strcmp(w->files[i].name, name)) {
            w->files[i].bytes = bytes;
            w->files[i].crc32 = crc;
            return QLR_OK;
        }
    if (w->n_files >= QLR_CKPT_MAX_FILES || strlen(name) >= sizeof w->files[0].name)
        return qlr_errorf(QLR_ERR_INTERNAL, "checkpoint: too many files or name too long (%s)", name);
    qlr_ckpt_file *f = &w->files[w->n_files++];
    snprintf(f->name, sizeof f->name, "%s", name);
    f->bytes = bytes;
    f->crc32 = crc;
    qlr_kill_point("ckpt.file");
    return QLR_OK;
}

qlr_status qlr_ckpt_begin(qlr_ckpt_writer *w, const char *output_dir, uint64_t step) {
    memset(w, 0, sizeof *w);
    int n = snprintf(w->dir, sizeof w->dir, "%s/checkpoint-%" PRIu64, output_dir, step);
    if (n < 0 || (size_t)n >= sizeof w->dir) return qlr_errorf(QLR_ERR_RANGE, "path too long: %s", output_dir);
    QLR_TRY(qlr_mkdir_p(w->dir));
    char man[4200];
    QLR_TRY(join(man, sizeof man, w->dir, QLR_CKPT_MANIFEST));
    if (unlink(man) != 0 && errno != ENOENT)
        return qlr_errorf(QLR_ERR_IO, "%s: cannot remove the old manifest: %s", man, strerror(errno));
    qlr_kill_point("ckpt.begin");
    return QLR_OK;
}

qlr_status qlr_ckpt_add_buffer(qlr_ckpt_writer *w, const char *name, const void *data, size_t n) {
    char path[4300];
    QLR_TRY(join(path, sizeof path, w->dir, name));
    QLR_TRY(make_parent(w->dir, name));
    qlr_afile af;
    QLR_TRY(qlr_afile_open(&af, path));
    qlr_status st = qlr_afile_write(&af, data, n);
    uint32_t crc = af.crc;
    uint64_t bytes = af.written;
    if (st != QLR_OK) {
        qlr_afile_abort(&af);
        return st;
    }
    QLR_TRY(qlr_afile_commit(&af));
    return record(w, name, bytes, crc);
}

/* crc32 and size of a whole file, read in chunks. */
static qlr_status file_crc(const char *path, uint64_t *bytes, uint32_t *crc) {
    FILE *f = fopen(path, "rb");
    if (!f) return qlr_errorf(QLR_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    static __thread uint8_t buf[1 << 16];
    uint32_t c = 0;
    uint64_t total = 0;
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
        c = qlr_crc32(c, buf, got);
        total += got;
    }
    int err = ferror(f);
    fclose(f);
    if (err) return qlr_errorf(QLR_ERR_IO, "%s: read error", path);
    *bytes = total;
    *crc = c;
    return QLR_OK;
}

qlr_status qlr_ckpt_add_file(qlr_ckpt_writer *w, const char *name) {
    char path[4300];
    QLR_TRY(join(path, sizeof path, w->dir, name));
    uint64_t bytes;
    uint32_t crc;
    QLR_TRY(file_crc(path, &bytes, &crc));
    return record(w, name, bytes, crc);
}

qlr_status qlr_ckpt_commit(qlr_ckpt_writer *w, const qlr_ckpt_meta *m) {
    json_t *o = json_object(), *files = json_object();
    char hex[32];
    if (!o || !files) {
        json_decref(o);
        json_decref(files);
        return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    json_object_set_new(o, "format", json_string(CKPT_FORMAT));
    json_object_set_new(o, "version", json_integer(CKPT_VERSION));
    json_object_set_new(o, "step", json_integer((json_int_t)m->step));
    json_object_set_new(o, "epoch", json_integer((json_int_t)m->epoch));
    json_object_set_new(o, "batch", json_integer((json_int_t)m->batch));
    snprintf(hex, sizeof hex, "%016" PRIx64, m->rng);
    json_object_set_new(o, "rng", json_string(hex));
    json_object_set_new(o, "tokens_seen", json_integer((json_int_t)m->tokens_seen));
    json_object_set_new(o, "elapsed", json_real(m->elapsed));
    json_object_set_new(o, "base_model", json_string(m->base_model));
    json_object_set_new(o, "lora_r", json_integer(m->lora_r));
    json_object_set_new(o, "lora_targets", json_integer(m->lora_targets));
    json_object_set_new(o, "sequence_len", json_integer(m->sequence_len));
    for (int i = 0; i < w->n_files; i++) {
        json_t *f = json_object();
        json_object_set_new(f, "bytes", json_integer((json_int_t)w->files[i].bytes));
        snprintf(hex, sizeof hex, "%08" PRIx32, w->files[i].crc32);
        json_object_set_new(f, "crc32", json_string(hex));
        json_object_set_new(files, w->files[i].name, f);
    }
    json_object_set_new(o, "files", files);
    char *text = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
    json_decref(o);
    if (!text) return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    char path[4300];
    qlr_status st = join(path, sizeof path, w->dir, QLR_CKPT_MANIFEST);
    qlr_kill_point("ckpt.manifest");
    if (st == QLR_OK) st = qlr_write_atomic(path, text, strlen(text));
    free(text);
    if (st == QLR_OK) qlr_kill_point("ckpt.committed");
    return st;
}

static qlr_status get_u64(json_t *o, const char *key, const char *path, uint64_t *out) {
    json_t *v = json_object_get(o, key);
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return qlr_errorf(QLR_ERR_FORMAT, "%s: \"%s\": expected a non-negative integer", path, key);
    *out = (uint64_t)json_integer_value(v);
    return QLR_OK;
}

static qlr_status get_hex(json_t *o, const char *key, const char *path, uint64_t *out) {
    json_t *v = json_object_get(o, key);
    const char *s = json_string_value(v);
    char *end;
    if (!s || !*s) return qlr_errorf(QLR_ERR_FORMAT, "%s: \"%s\": expected a hex string", path, key);
    errno = 0;
    unsigned long long x = strtoull(s, &end, 16);
    if (errno || *end) return qlr_errorf(QLR_ERR_FORMAT, "%s: \"%s\": '%s' is not a hex number", path, key, s);
    *out = x;
    return QLR_OK;
}

/* Parses the manifest without checking the files. */
static qlr_status read_manifest(const char *dir, qlr_ckpt_meta *m, qlr_ckpt_file *files, int *n_files) {
    char path[4300];
    QLR_TRY(join(path, sizeof path, dir, QLR_CKPT_MANIFEST));
    if (!qlr_path_exists(path))
        return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: no %s (an incomplete checkpoint)", dir, QLR_CKPT_MANIFEST);
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (!o) return qlr_errorf(QLR_ERR_FORMAT, "%s:%d:%d: %s", path, je.line, je.column, je.text);
    qlr_status st = QLR_OK;
    memset(m, 0, sizeof *m);
    uint64_t v;
    const char *fmt = json_string_value(json_object_get(o, "format"));
    if (!json_is_object(o) || !fmt || strcmp(fmt, CKPT_FORMAT)) {
        st = qlr_errorf(QLR_ERR_FORMAT, "%s: not a qlora checkpoint manifest (\"format\" is not \"%s\")", path,
                        CKPT_FORMAT);
        goto done;
    }
    if ((st = get_u64(o, "version", path, &v))) goto done;
    if (v != CKPT_VERSION) {
        st = qlr_errorf(QLR_ERR_UNSUPPORTED, "%s: checkpoint version %" PRIu64 " (this build reads %d)", path, v,
                        CKPT_VERSION);
        goto done;
    }
    if ((st = get_u64(o, "step", path, &m->step)) || (st = get_u64(o, "epoch", path, &m->epoch)) ||
        (st = get_u64(o, "batch", path, &m->batch)) || (st = get_hex(o, "rng", path, &m->rng)) ||
        (st = get_u64(o, "tokens_seen", path, &m->tokens_seen)))
        goto done;
    m->elapsed = json_number_value(json_object_get(o, "elapsed"));
    const char *bm = json_string_value(json_object_get(o, "base_model"));
    if (!bm) { st = qlr_errorf(QLR_ERR_FORMAT, "%s: \"base_model\" missing", path); goto done; }
    snprintf(m->base_model, sizeof m->base_model, "%s", bm);
    if ((st = get_u64(o, "lora_r", path, &v))) goto done;
    m->lora_r = (uint32_t)v;
    if ((st = get_u64(o, "lora_targets", path, &v))) goto done;
    m->lora_targets = (uint32_t)v;
    if ((st = get_u64(o, "sequence_len", path, &v))) goto done;
    m->sequence_len = (uint32_t)v;
    json_t *fl = json_object_get(o, "files");
    if (!json_is_object(fl)) { st = qlr_errorf(QLR_ERR_FORMAT, "%s: \"files\" missing", path); goto done; }
    int n = 0;
    const char *key;
    json_t *val;
    json_object_foreach(fl, key, val) {
        if (n >= QLR_CKPT_MAX_FILES || strlen(key) >= sizeof files[0].name || strstr(key, "..") || key[0] == '/') {
            st = qlr_errorf(QLR_ERR_FORMAT, "%s: bad file entry \"%s\"", path, key);
            goto done;
        }
        qlr_ckpt_file f;
        memset(&f, 0, sizeof f);
        snprintf(f.name, sizeof f.name, "%s", key);
        uint64_t crc;
        if ((st = get_u64(val, "bytes", path, &f.bytes)) || (st = get_hex(val, "crc32", path, &crc))) goto done;
        f.crc32 = (uint32_t)crc;
        if (files) files[n] = f;
        n++;
    }
    if (n_files) *n_files = n;
done:
    json_decref(o);
    return st;
}

qlr_status qlr_ckpt_open(const char *dir, qlr_ckpt_meta *meta, qlr_ckpt_file *files, int *n_files) {
    qlr_ckpt_file local[QLR_CKPT_MAX_FILES];
    int n = 0;
    QLR_TRY(read_manifest(dir, meta, local, &n));
    for (int i = 0; i < n; i++) {
        char path[4300];
        QLR_TRY(join(path, sizeof path, dir, local[i].name));
        if (!qlr_path_exists(path))
            return qlr_errorf(QLR_ERR_IO, "%s: missing (listed in %s/%s)", path, dir, QLR_CKPT_MANIFEST);
        uint64_t bytes;
        uint32_t crc;
        QLR_TRY(file_crc(path, &bytes, &crc));
        if (bytes != local[i].bytes)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: %" PRIu64 " bytes but the manifest says %" PRIu64 ": the file is corrupt",
                              path, bytes, local[i].bytes);
        if (crc != local[i].crc32)
            return qlr_errorf(QLR_ERR_FORMAT, "%s: crc32 %08x but the manifest says %08x: the file is corrupt", path,
                              crc, local[i].crc32);
    }
    if (files) memcpy(files, local, sizeof(qlr_ckpt_file) * (size_t)n);
    if (n_files) *n_files = n;
    return QLR_OK;
}

qlr_status qlr_ckpt_read(const char *dir, const qlr_ckpt_file *files, int n_files, const char *name,
                         uint8_t **data, size_t *n) {
    *data = NULL;
    *n = 0;
    const qlr_ckpt_file *f = NULL;
    for (int i = 0; i < n_files; i++)
        if (!strcmp(files[i].name, name)) f = &files[i];
    if (!f) return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: the manifest lists no %s", dir, name);
    char path[4300];
    QLR_TRY(join(path, sizeof path, dir, name));
    char *buf;
    size_t len;
    QLR_TRY(qlr_file_read_all(path, CKPT_MAX_FILE_BYTES, &buf, &len));
    uint32_t crc = qlr_crc32(0, buf, len);
    if (len != f->bytes || crc != f->crc32) {
        free(buf);
        return qlr_errorf(QLR_ERR_FORMAT, "%s: crc32 %08x but the manifest says %08x: the file is corrupt", path, crc,
                          f->crc32);
    }
    *data = (uint8_t *)buf;
    *n = len;
    return QLR_OK;
}

/* N of a "checkpoint-N" name, or -1. */
static int64_t ckpt_number(const char *name) {
    static const char pre[] = "checkpoint-";
    if (strncmp(name, pre, sizeof pre - 1)) return -1;
    const char *s = name + sizeof pre - 1;
    if (!*s) return -1;
    int64_t v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > (INT64_MAX - 9) / 10) return -1;
        v = v * 10 + (*s - '0');
    }
    return v;
}

typedef struct {
    int64_t n;
    char name[256];
} ckpt_ent;

static int cmp_ent(const void *a, const void *b) {
    int64_t x = ((const ckpt_ent *)a)->n, y = ((const ckpt_ent *)b)->n;
    return (x > y) - (x < y);
}

/* checkpoint-N folders of output_dir sorted by N (ascending). */
static qlr_status list_ckpts(const char *output_dir, ckpt_ent **out, size_t *n_out) {
    *out = NULL;
    *n_out = 0;
    DIR *d = opendir(output_dir);
    if (!d) {
        if (errno == ENOENT) return QLR_OK;
        return qlr_errorf(QLR_ERR_IO, "%s: cannot list: %s", output_dir, strerror(errno));
    }
    ckpt_ent *v = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        int64_t k = ckpt_number(e->d_name);
        if (k < 0 || strlen(e->d_name) >= sizeof v->name) continue;
        char path[4400];
        if (join(path, sizeof path, output_dir, e->d_name) || !qlr_is_dir(path)) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            ckpt_ent *nv = realloc(v, cap * sizeof *nv);
            if (!nv) {
                free(v);
                closedir(d);
                return qlr_errorf(QLR_ERR_NOMEM, "out of memory");
            }
            v = nv;
        }
        v[n].n = k;
        snprintf(v[n].name, sizeof v[n].name, "%s", e->d_name);
        n++;
    }
    closedir(d);
    if (n) qsort(v, n, sizeof *v, cmp_ent);
    *out = v;
    *n_out = n;
    return QLR_OK;
}

qlr_status qlr_ckpt_find_latest(const char *output_dir, char **dir) {
    *dir = NULL;
    ckpt_ent *v;
    size_t n;
    QLR_TRY(list_ckpts(output_dir, &v, &n));
    for (size_t i = n; i-- > 0;) {
        char path[4400];
        if (join(path, sizeof path, output_dir, v[i].name)) continue;
        qlr_ckpt_meta m;
        if (read_manifest(path, &m, NULL, NULL) != QLR_OK) {
            QLR_LOGW("%s: ignored (%s)", path, qlr_error_msg());
            qlr_error_clear();
            continue;
        }
        free(v);
        *dir = strdup(path);
        return *dir ? QLR_OK : qlr_errorf(QLR_ERR_NOMEM, "out of memory");
    }
    free(v);
    return qlr_errorf(QLR_ERR_NOT_FOUND, "%s: no checkpoint with a valid %s to resume from", output_dir,
                      QLR_CKPT_MANIFEST);
}

/* rm -r of a checkpoint folder (regular files and sub-folders only; links are unlinked, not
 * followed). */
static qlr_status remove_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) return qlr_errorf(QLR_ERR_IO, "%s: cannot list: %s", path, strerror(errno));
    struct dirent *e;
    qlr_status st = QLR_OK;
    while ((e = readdir(d)) && st == QLR_OK) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char sub[4400];
        if ((st = join(sub, sizeof sub, path, e->d_name))) break;
        struct stat sb;
        if (lstat(sub, &sb) != 0) continue;
        if (S_ISDIR(sb.st_mode)) st = remove_tree(sub);
        else if (unlink(sub) != 0) st = qlr_errorf(QLR_ERR_IO, "%s: cannot remove: %s", sub, strerror(errno));
        else qlr_kill_point("ckpt.remove");
    }
    closedir(d);
    if (st == QLR_OK && rmdir(path) != 0) st = qlr_errorf(QLR_ERR_IO, "%s: cannot remove: %s", path, strerror(errno));
    return st;
}

qlr_status qlr_ckpt_rotate(const char *output_dir, uint32_t keep) {
    if (keep == 0) return QLR_OK;
    ckpt_ent *v;
    size_t n;
    QLR_TRY(list_ckpts(output_dir, &v, &n));
    qlr_status st = QLR_OK;
    uint32_t kept = 0;
    int seen_complete = 0;
    for (size_t i = n; i-- > 0 && st == QLR_OK;) {
        char path[4400], man[4500];
        if ((st = join(path, sizeof path, output_dir, v[i].name))) break;
        if ((st = join(man, sizeof man, path, QLR_CKPT_MANIFEST))) break;
        qlr_ckpt_meta m;
        int complete = read_manifest(path, &m, NULL, NULL) == QLR_OK;
        qlr_error_clear();
        if (complete) {
            seen_complete = 1;
            if (kept < keep) {
                kept++;
                continue;
            }
        } else if (!seen_complete) {
            continue; /* incomplete and newer than every complete one: being (re)written */
        }
        QLR_LOGD("removing old checkpoint %s", path);
        /* the manifest first: a folder half removed by a crash is never taken as complete */
        if (unlink(man) != 0 && errno != ENOENT) {
            st = qlr_errorf(QLR_ERR_IO, "%s: cannot remove: %s", man, strerror(errno));
            break;
        }
        st = remove_tree(path);
    }
    free(v);
    return st;
}

static void mask_names(uint32_t mask, char *buf, size_t cap) {
    static const char *names[7] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < 7; i++)
        if (mask & (1u << i)) {
            int k = snprintf(buf + used, cap - used, "%s%s", used ? "," : "", names[i]);
            if (k < 0 || (size_t)k >= cap - used) break;
            used += (size_t)k;
        }
}

qlr_status qlr_ckpt_check_compatible(const char *dir, const qlr_ckpt_meta *c, const qlr_ckpt_meta *now) {
    static const char tail[] = " (these key fields must match to resume: base_model, lora_r, "
                               "lora_target_modules, sequence_len; start a new run with another output_dir)";
    if (strcmp(c->base_model, now->base_model))
        return qlr_errorf(QLR_ERR_INVALID, "cannot resume from %s: it was made with base_model %s, the recipe says %s%s",
                          dir, c->base_model, now->base_model, tail);
    if (c->lora_r != now->lora_r)
        return qlr_errorf(QLR_ERR_INVALID, "cannot resume from %s: it was made with lora_r %u, the recipe says %u%s",
                          dir, c->lora_r, now->lora_r, tail);
    if (c->lora_targets != now->lora_targets) {
        char a[128], b[128];
        mask_names(c->lora_targets, a, sizeof a);
        mask_names(now->lora_targets, b, sizeof b);
        return qlr_errorf(QLR_ERR_INVALID,
                          "cannot resume from %s: it was made with lora_target_modules [%s], the recipe says [%s]%s", dir,
                          a, b, tail);
    }
    if (c->sequence_len != now->sequence_len)
        return qlr_errorf(QLR_ERR_INVALID, "cannot resume from %s: it was made with sequence_len %u, the recipe says %u%s",
                          dir, c->sequence_len, now->sequence_len, tail);
    return QLR_OK;
}
