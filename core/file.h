/* core/file.h: file helpers. Outputs and checkpoints are written atomically (temp file in the
 * same folder, fsync, rename, fsync of the folder), so a crash never leaves half a file under
 * the final name. Inputs are read through read-only mmap. crc32 comes from zlib. */
#ifndef QLR_CORE_FILE_H
#define QLR_CORE_FILE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/status.h"

/* A read-only mapping of a whole file. */
typedef struct qlr_mmap {
    const uint8_t *data;
    size_t size;
} qlr_mmap;

/* Maps `path` read-only. An empty file maps to data == NULL, size 0. */
qlr_status qlr_mmap_open(const char *path, qlr_mmap *m);
void qlr_mmap_close(qlr_mmap *m);

/* Reads a whole file into a malloc'ed buffer with a terminating NUL (not counted in *size).
 * Files over `max_size` bytes are refused (QLR_ERR_RANGE). */
qlr_status qlr_file_read_all(const char *path, size_t max_size, char **data, size_t *size);

/* An atomic writer: bytes go to "<path>.tmp.<pid>" and appear under `path` only on commit.
 * Opening one removes the "<path>.tmp.<pid>" files of writers that no longer run (a killed
 * process cannot clean up after itself). */
typedef struct qlr_afile {
    FILE *f;
    char *path;
    char *tmp;
    uint32_t crc;      /* crc32 of everything written so far */
    uint64_t written;
    int failed;
} qlr_afile;

qlr_status qlr_afile_open(qlr_afile *af, const char *path);
qlr_status qlr_afile_write(qlr_afile *af, const void *data, size_t n);
/* Writes `n` zero bytes (alignment padding). */
qlr_status qlr_afile_pad(qlr_afile *af, size_t n);
/* fsync, close, rename over `path`, fsync the folder. On any earlier write failure it removes
 * the temp file and returns that failure. Frees the writer either way. */
qlr_status qlr_afile_commit(qlr_afile *af);
/* Removes the temp file and frees the writer (safe after a failed open). */
void qlr_afile_abort(qlr_afile *af);

/* One-shot atomic write of a buffer. */
qlr_status qlr_write_atomic(const char *path, const void *data, size_t n);

/* crc32 (zlib polynomial) continuing from `crc` (start with 0). */
uint32_t qlr_crc32(uint32_t crc, const void *data, size_t n);

/* mkdir -p. */
qlr_status qlr_mkdir_p(const char *path);
/* 1 if path exists (any type), 0 otherwise. */
int qlr_path_exists(const char *path);
/* 1 if path is a directory. */
int qlr_is_dir(const char *path);
/* The same path without "." components, repeated slashes and "name/.." pairs
 * ("recipes/../outputs/run" -> "outputs/run"), relative paths kept relative. A ".." after a
 * symbolic link is kept (it leaves the link's target, not the link's folder), so the result
 * names the same file as `path` wherever it exists. "" becomes ".". QLR_ERR_RANGE when it does
 * not fit in `cap` bytes. */
qlr_status qlr_path_normalize(const char *path, char *out, size_t cap);

#endif
