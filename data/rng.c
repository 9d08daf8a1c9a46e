/* data/rng.c: the data pipeline's seeded streams (data/rng.h). */
#include "data/rng.h"

#include "core/core.h"

static uint64_t mix13(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

uint64_t qlr_data_rng_seed(uint64_t seed, uint64_t stream, uint64_t index) {
    return mix13(seed ^ mix13((stream << 32) ^ index));
}

uint64_t qlr_data_rng_next(uint64_t *state) {
    *state += 0x9e3779b97f4a7c15ULL;
    return mix13(*state);
}

uint64_t qlr_data_rng_below(uint64_t *state, uint64_t bound) {
    QLR_ASSERT(bound > 0);
    uint64_t threshold = (0 - bound) % bound; /* 2^64 mod bound: draws below it are rejected */
    for (;;) {
        uint64_t r = qlr_data_rng_next(state);
        if (r >= threshold) return r % bound;
    }
}

void qlr_data_permute(uint32_t *a, size_t n, uint64_t state) {
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)qlr_data_rng_below(&state, i);
        uint32_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

