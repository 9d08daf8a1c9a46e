/* core/arena.c: host bump allocator; see arena.h. */
#include "core/arena.h"

#include <stdlib.h>
#include <string.h>

qlr_status qlr_arena_init(qlr_arena *a, const char *name, size_t size) {
    memset(a, 0, sizeof *a);
    a->name = name;
    if (size == 0) return QLR_OK;
    size_t rounded = (size + 63) & ~(size_t)63;
    if (rounded < size) return qlr_errorf(QLR_ERR_NOMEM, "arena '%s': size %zu overflows", name, size);
    void *p = aligned_alloc(64, rounded);
    if (!p)
        return qlr_errorf(QLR_ERR_NOMEM, "arena '%s': cannot allocate %.1f MiB of host memory", name,
                          (double)size / (1 << 20));
    a->base = p;
    a->size = rounded;
    a->owned = 1;
    return QLR_OK;
}

void qlr_arena_wrap(qlr_arena *a, const char *name, void *base, size_t size) {
    memset(a, 0, sizeof *a);
    a->name = name;
    a->base = base;
    a->size = size;
}

void *qlr_arena_alloc(qlr_arena *a, size_t bytes, size_t align) {
    QLR_ASSERT(align && (align & (align - 1)) == 0);
    uintptr_t start = (uintptr_t)a->base + a->used;
    uintptr_t aligned = (start + align - 1) & ~(uintptr_t)(align - 1);
    size_t pad = aligned - start;
    if (pad > a->size - a->used || bytes > a->size - a->used - pad) {
        qlr_errorf(QLR_ERR_NOMEM, "arena '%s' is full: %zu bytes requested, %zu of %zu free",
                   a->name ? a->name : "?", bytes, a->size - a->used, a->size);
        return NULL;
    }
    a->used += pad + bytes;
    if (a->used > a->peak) a->peak = a->used;
    return (void *)aligned;
}

void qlr_arena_reset(qlr_arena *a) { a->used = 0; }

void qlr_arena_free(qlr_arena *a) {
    if (a->owned) free(a->base);
    memset(a, 0, sizeof *a);
}
