/* core/arena.h: bump allocators. One arena per class of memory (weights, activations,
 * workspaces), sized once from a plan; allocation never fails silently and reset frees all.
 * Host arenas live here; device arenas use the same struct over backend memory. */
#ifndef QLR_CORE_ARENA_H
#define QLR_CORE_ARENA_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

typedef struct qlr_arena {
    uint8_t *base;   /* start of the block (host or device address) */
    size_t size;     /* capacity in bytes */
    size_t used;     /* bytes handed out, including alignment padding */
    size_t peak;     /* high-water mark of `used` */
    int owned;       /* 1 if base was malloc'ed by qlr_arena_init */
    const char *name;
} qlr_arena;

/* Allocates a host arena of `size` bytes (64-byte aligned). QLR_ERR_NOMEM on failure. */
qlr_status qlr_arena_init(qlr_arena *a, const char *name, size_t size);
/* Wraps memory the caller owns (device memory, a mapped file). */
void qlr_arena_wrap(qlr_arena *a, const char *name, void *base, size_t size);
/* Carves `bytes` aligned to `align` (a power of two). Returns NULL and records an error naming
 * the arena and the shortfall when it does not fit. */
void *qlr_arena_alloc(qlr_arena *a, size_t bytes, size_t align);
/* Forgets every allocation (keeps the block). */
void qlr_arena_reset(qlr_arena *a);
/* Frees an owned block; safe on a zeroed struct. */
void qlr_arena_free(qlr_arena *a);

#endif
