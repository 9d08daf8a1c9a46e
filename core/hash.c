/* core/hash.c: qlr-hash64 (definition in core/hash.h). */
#include "core/hash.h"

#include <string.h>

#define K1 0x9e3779b97f4a7c15ull
#define K2 0xc2b2ae3d27d4eb4full

static inline uint64_t mix(uint64_t z) {
    z ^= z >> 30;
    z *= 0xbf58476d1ce4e5b9ull;
    z ^= z >> 27;
    z *= 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static inline void stripe(uint64_t *v, const uint8_t *p) {
    for (int i = 0; i < 4; i++) v[i] = rotl(v[i] ^ (le64(p + 8 * i) * K2), 29) * K1;
}

void qlr_hash64_init(qlr_hash64 *h, uint64_t seed) {
    memset(h, 0, sizeof *h);
    for (int i = 0; i < 4; i++) h->v[i] = mix(seed + (uint64_t)(i + 1) * K1);
}

void qlr_hash64_update(qlr_hash64 *h, const void *data, size_t n) {
    const uint8_t *p = data;
    h->total += n;
    if (h->nbuf) {
        size_t k = 32 - h->nbuf < n ? 32 - h->nbuf : n;
        memcpy(h->buf + h->nbuf, p, k);
        h->nbuf += k;
        p += k;
        n -= k;
        if (h->nbuf < 32) return;
        stripe(h->v, h->buf);
        h->nbuf = 0;
    }
    for (; n >= 32; p += 32, n -= 32) stripe(h->v, p);
    memcpy(h->buf, p, n);
    h->nbuf = n;
}

uint64_t qlr_hash64_final(const qlr_hash64 *h) {
    uint64_t v[4] = {h->v[0], h->v[1], h->v[2], h->v[3]};
    if (h->nbuf) {
        uint8_t last[32] = {0};
        memcpy(last, h->buf, h->nbuf);
        stripe(v, last);
    }
    uint64_t x = mix(v[0]) ^ rotl(mix(v[1]), 16) ^ rotl(mix(v[2]), 32) ^ rotl(mix(v[3]), 48);
    return mix(x ^ mix(h->total));
}

uint64_t qlr_hash64_of(const void *data, size_t n, uint64_t seed) {
    qlr_hash64 h;
    qlr_hash64_init(&h, seed);
    qlr_hash64_update(&h, data, n);
    return qlr_hash64_final(&h);
}
