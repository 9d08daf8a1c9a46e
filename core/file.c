/* core/file.c: mmap, whole-file reads, atomic writes and crc32; see file.h. */
#include "core/file.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "core/log.h"
#include "core/testhook.h"

qlr_status qlr_mmap_open(const char *path, qlr_mmap *m) {
    m->data = NULL;
    m->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return qlr_errorf(QLR_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return qlr_errorf(QLR_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
        close(fd);
        return qlr_errorf(QLR_ERR_IO, "%s: is a directory, expected a file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return QLR_OK;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (p == MAP_FAILED) return qlr_errorf(QLR_ERR_IO, "%s: cannot mmap: %s", path, strerror(e));
    m->data = p;
    m->size = (size_t)st.st_size;
    return QLR_OK;
}

void qlr_mmap_close(qlr_mmap *m) {
    if (m->data) munmap((void *)m->data, m->size);
    m->data = NULL;
    m->size = 0;
}

qlr_status qlr_file_read_all(const char *path, size_t max_size, char **data, size_t *size) {
    *data = NULL;
    *size = 0;
    FILE *f = fopen(path, "rb");
    if (!f) return qlr_errorf(QLR_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        fclose(f);
        return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path);
    }
    for (;;) {
        if (n == cap) {
            if (cap >= max_size) {
                free(buf);
                fclose(f);
                return qlr_errorf(QLR_ERR_RANGE, "%s: larger than the %zu byte limit", path, max_size);
            }
            size_t ncap = cap * 2 > max_size ? max_size : cap * 2;
            char *nb = realloc(buf, ncap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path);
            }
            buf = nb;
            cap = ncap;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return qlr_errorf(QLR_ERR_IO, "%s: read error", path);
    }
    if (n > max_size) {
        free(buf);
        return qlr_errorf(QLR_ERR_RANGE, "%s: larger than the %zu byte limit", path, max_size);
    }
    buf[n] = 0;
    *data = buf;
    *size = n;
    return QLR_OK;
}

/* Removes the "<name>.tmp.<pid>" files next to `path` whose writer no longer runs: a process
 * killed while writing leaves its temp file behind, and a checkpoint's temp file can be as big
 * as the optimizer state. A live writer's (another process, or this one) is left alone. Best
 * effort: nothing here can fail the write. */
static void sweep_stale_temps(const char *path) {
    char *d1 = strdup(path), *d2 = strdup(path);
    DIR *d = NULL;
    if (!d1 || !d2) goto done;
    const char *dir = dirname(d1), *base = basename(d2);
    size_t bl = strlen(base);
    if (!(d = opendir(dir))) goto done;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *n = e->d_name;
        if (strncmp(n, base, bl) || strncmp(n + bl, ".tmp.", 5)) continue;
        const char *digits = n + bl + 5;
        char *end = NULL;
        errno = 0;
        long pid = strtol(digits, &end, 10);
        if (!*digits || *end || errno || pid <= 0 || pid == (long)getpid()) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue; /* alive (or not ours to know) */
        if (unlinkat(dirfd(d), n, 0) == 0) QLR_LOGD("removed %s/%s, left by a killed writer", dir, n);
    }
done:
    if (d) closedir(d);
    free(d1);
    free(d2);
}

qlr_status qlr_afile_open(qlr_afile *af, const char *path) {
    memset(af, 0, sizeof *af);
    size_t n = strlen(path) + 32;
    af->path = strdup(path);
    af->tmp = malloc(n);
    if (!af->path || !af->tmp) {
        qlr_afile_abort(af);
        return qlr_errorf(QLR_ERR_NOMEM, "%s: out of memory", path);
    }
    sweep_stale_temps(path);
    snprintf(af->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    af->f = fopen(af->tmp, "wb");
    if (!af->f) {
        qlr_status st = qlr_errorf(QLR_ERR_IO, "%s: cannot create: %s", af->tmp, strerror(errno));
        free(af->tmp);
        af->tmp = NULL;
        qlr_afile_abort(af);
        return st;
    }
    return QLR_OK;
}

qlr_status qlr_afile_write(qlr_afile *af, const void *data, size_t n) {
    if (af->failed) return QLR_ERR_IO;
    if (n == 0) return QLR_OK;
    if (fwrite(data, 1, n, af->f) != n) {
        af->failed = 1;
        return qlr_errorf(QLR_ERR_IO, "%s: write failed: %s", af->tmp, strerror(errno));
    }
    /* zlib's crc32 takes uInt lengths: feed large buffers in pieces */
    const uint8_t *p = data;
    size_t left = n;
    while (left) {
        uInt k = left > (1u << 30) ? (1u << 30) : (uInt)left;
        af->crc = (uint32_t)crc32(af->crc, p, k);
        p += k;
        left -= k;
    }
    af->written += n;
    qlr_kill_point("afile.write");
    return QLR_OK;
}

qlr_status qlr_afile_pad(qlr_afile *af, size_t n) {
    static const uint8_t zeros[256];
    while (n) {
        size_t k = n > sizeof zeros ? sizeof zeros : n;
        QLR_TRY(qlr_afile_write(af, zeros, k));
        n -= k;
    }
    return QLR_OK;
}

static void fsync_parent(const char *path) {
    char *dup = strdup(path);
    if (!dup) return;
    int fd = open(dirname(dup), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dup);
}

qlr_status qlr_afile_commit(qlr_afile *af) {
    qlr_status st = QLR_OK;
    if (af->failed) {
        st = QLR_ERR_IO;
        goto fail;
    }
    if (fflush(af->f) != 0 || fsync(fileno(af->f)) != 0) {
        st = qlr_errorf(QLR_ERR_IO, "%s: flush failed: %s", af->tmp, strerror(errno));
        goto fail;
    }
    if (fclose(af->f) != 0) {
        af->f = NULL;
        st = qlr_errorf(QLR_ERR_IO, "%s: close failed: %s", af->tmp, strerror(errno));
        goto fail;
    }
    af->f = NULL;
    qlr_kill_point("afile.synced");
    if (rename(af->tmp, af->path) != 0) {
        st = qlr_errorf(QLR_ERR_IO, "cannot rename %s to %s: %s", af->tmp, af->path, strerror(errno));
        goto fail;
    }
    qlr_kill_point("afile.renamed");
    fsync_parent(af->path);
    free(af->tmp);
    free(af->path);
    memset(af, 0, sizeof *af);
    return QLR_OK;
fail:
    qlr_afile_abort(af);
    return st;
}

void qlr_afile_abort(qlr_afile *af) {
    if (af->f) fclose(af->f);
    if (af->tmp) unlink(af->tmp);
    free(af->tmp);
    free(af->path);
    memset(af, 0, sizeof *af);
}

qlr_status qlr_write_atomic(const char *path, const void *data, size_t n) {
    qlr_afile af;
    QLR_TRY(qlr_afile_open(&af, path));
    qlr_status st = qlr_afile_write(&af, data, n);
    if (st != QLR_OK) {
        qlr_afile_abort(&af);
        return st;
    }
    return qlr_afile_commit(&af);
}

uint32_t qlr_crc32(uint32_t crc, const void *data, size_t n) {
    const uint8_t *p = data;
    while (n) {
        uInt k = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = (uint32_t)crc32(crc, p, k);
        p += k;
        n -= k;
    }
    return crc;
}

qlr_status qlr_mkdir_p(const char *path) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return qlr_errorf(QLR_ERR_INVALID, "bad directory path '%s'", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] == '/' || buf[i] == 0) {
            char c = buf[i];
            buf[i] = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return qlr_errorf(QLR_ERR_IO, "cannot create directory %s: %s", buf, strerror(errno));
            buf[i] = c;
        }
    }
    if (!qlr_is_dir(path)) return qlr_errorf(QLR_ERR_IO, "%s exists and is not a directory", path);
    return QLR_OK;
}

int qlr_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int qlr_is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

qlr_status qlr_path_normalize(const char *path, char *out, size_t cap) {
    if (cap < 2) return qlr_errorf(QLR_ERR_RANGE, "path too long: %s", path);
    int absolute = path[0] == '/';
    size_t n = 0, root = absolute ? 1 : 0; /* out[0..root) is "/" for an absolute path */
    if (absolute) out[n++] = '/';
    out[n] = 0;
    const char *p = path;
    while (*p) {
        while (*p == '/') p++;
        const char *e = p;
        while (*e && *e != '/') e++;
        size_t len = (size_t)(e - p);
        if (len == 0 || (len == 1 && p[0] == '.')) {
            p = e;
            continue;
        }
        if (len == 2 && p[0] == '.' && p[1] == '.') {
            const char *top = n > root ? strrchr(out, '/') : NULL;
            top = top ? top + 1 : out;
            struct stat st;
            int can_pop = n > root && strcmp(top, "..") && !(lstat(out, &st) == 0 && S_ISLNK(st.st_mode));
            if (can_pop) {
                n = (size_t)(top - out);
                if (n > root) n--; /* the slash before the popped name */
                out[n] = 0;
                p = e;
                continue;
            }
            if (absolute && n == root) { /* "/.." is "/" */
                p = e;
                continue;
            }
        }
        size_t need = n + (n > root ? 1 : 0) + len + 1;
        if (need > cap) return qlr_errorf(QLR_ERR_RANGE, "path too long: %s", path);
        if (n > root) out[n++] = '/';
        memcpy(out + n, p, len);
        n += len;
        out[n] = 0;
        p = e;
    }
    if (n == 0) {
        out[n++] = '.';
        out[n] = 0;
    }
    return QLR_OK;
}
