/* data/rng.h: the seeded random streams of the data pipeline (the train/validation split, each
 * epoch's order, packed-row order) and of the trainer's dropout seeds.
 *
 * PRNG: splitmix64 (Steele, Lea, Flood 2014: state += 0x9e3779b97f4a7c15, then the
 * "mix13" finalizer). A stream is seeded by qlr_data_rng_seed(seed, stream, index) so that the
 * split, and each epoch's order, are independent functions of the recipe seed and never of
 * how many numbers something else drew. Bounded draws use rejection (no modulo bias), and
 * permutations are Fisher-Yates from the last element down. The exact sequences are part of
 * the checkpoint contract: changing them changes what a resumed run sees. */
#ifndef QLR_DATA_RNG_H
#define QLR_DATA_RNG_H

#include <stddef.h>
#include <stdint.h>

enum {
    QLR_RNG_STREAM_SPLIT = 1, /* train/validation membership */
    QLR_RNG_STREAM_EPOCH = 2, /* example order of epoch `index` */
    QLR_RNG_STREAM_ROWS = 3,  /* packed-row order of epoch `index` */
};

/* state = mix13(seed ^ mix13((stream << 32) ^ index)) where mix13 is splitmix64's finalizer. */
uint64_t qlr_data_rng_seed(uint64_t seed, uint64_t stream, uint64_t index);
/* splitmix64: advances *state, returns the next 64 bits. */
uint64_t qlr_data_rng_next(uint64_t *state);
/* Uniform in [0, bound) by rejection; bound must be > 0 (asserted). */
uint64_t qlr_data_rng_below(uint64_t *state, uint64_t bound);
/* Fisher-Yates shuffle of a[0..n) with the stream starting at `state`. */
void qlr_data_permute(uint32_t *a, size_t n, uint64_t state);

#endif
