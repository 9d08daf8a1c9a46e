/* bench/bench_shapes.h: the model shapes the benchmarks share (`qlora bench decode`, `qlora bench
 * serve`): Llama-3.1-8B and SmolLM2-135M-Instruct as their HF config.json say, for
 * qlr_model_create_random (random NF4 weights, no download). It owns only the presets. */
#ifndef QLR_BENCH_BENCH_SHAPES_H
#define QLR_BENCH_BENCH_SHAPES_H

#include "model/model.h"

/* The config of shape `name`: "llama3-8b" (also "llama3.1-8b") or "smollm2-135m". 1 when known,
 * 0 otherwise (*out untouched). */
int qlr_bench_shape(const char *name, qlr_model_config *out);

#endif
