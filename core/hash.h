/* core/hash.h: qlr-hash64, the project's 64-bit content hash (identity of weights: the NF4
 * store an adapter was trained against). Not cryptographic: it tells apart different weights,
 * it does not resist someone forging a collision. Fast (four independent 64-bit lanes), and
 * the same value on every platform (input read as little-endian words).
 *
 * Definition (stable; files record these values). Constants K1 = 0x9e3779b97f4a7c15,
 * K2 = 0xc2b2ae3d27d4eb4f, mix(z) = the splitmix64 finaliser
 * (z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27; z *= 0x94d049bb133111eb; z ^= z >> 31).
 * Lanes start at v[i] = mix(seed + (i + 1) * K1). The input is consumed in 32-byte stripes;
 * word i (8 bytes, little-endian) of a stripe updates lane i: v[i] = rotl64(v[i] ^ (w * K2), 29) * K1.
 * At the end the r < 32 remaining bytes are zero-padded to one stripe that is consumed the same
 * way when r > 0, and h = mix(v0) ^ rotl(mix(v1), 16) ^ rotl(mix(v2), 32) ^ rotl(mix(v3), 48);
 * the result is mix(h ^ mix(total length in bytes)). */
#ifndef QLR_CORE_HASH_H
#define QLR_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

typedef struct qlr_hash64 {
    uint64_t v[4];
    uint8_t buf[32];
    size_t nbuf;
    uint64_t total;
} qlr_hash64;

void qlr_hash64_init(qlr_hash64 *h, uint64_t seed);
void qlr_hash64_update(qlr_hash64 *h, const void *data, size_t n);
uint64_t qlr_hash64_final(const qlr_hash64 *h);
/* One buffer. */
uint64_t qlr_hash64_of(const void *data, size_t n, uint64_t seed);

#endif
