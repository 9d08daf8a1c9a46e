/* tests/formats/test_gguf_sample.h: a small GGUF file that exercises every metadata type
 * (scalars and arrays of each, string arrays with an empty string, an empty array) and several
 * tensor types, shared by test_gguf (round trip) and test_gguf_py (gguf-py reads our output). */
#ifndef QLR_TEST_GGUF_SAMPLE_H
#define QLR_TEST_GGUF_SAMPLE_H

#include <stdint.h>

#include "core/status.h"
#include "formats/gguf.h"

/* Fills `w` with the sample's metadata and tensors. Tensor bytes come from a deterministic PRNG
 * and live in static buffers that stay valid for the life of the process. */
qlr_status gguf_sample_fill(qlr_gguf_writer *w);

#endif
