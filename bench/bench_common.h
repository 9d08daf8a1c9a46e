/* bench/bench_common.h: what the benchmarks share: the model configs of the shapes they build
 * with random NF4 weights (model/model.h qlr_model_create_random; no download) and the device's
 * cuBLASLt bf16 GEMM rate and the host's OpenBLAS sgemm rate, the yardsticks their MFU-style
 * ratios divide by. Used by
 * bench/decode_bench.c and bench/train_bench.c. */
#ifndef QLR_BENCH_BENCH_COMMON_H
#define QLR_BENCH_BENCH_COMMON_H

#include "backend/backend.h"
#include "core/status.h"
#include "model/model.h"

/* The config of a benchmark shape, as the model's HF config.json says: "llama3.1-8b" (also
 * "llama3-8b": Llama-3.1-8B with llama3 RoPE scaling) or "smollm2-135m" (SmolLM2-135M-Instruct).
 * *plan_name (may be NULL) gets the train/plan.h preset name of the same shape
 * ("Llama-3.1-8B", "SmolLM2-135M"). QLR_ERR_NOT_FOUND naming the known shapes otherwise. */
qlr_status qlr_bench_model_config(const char *name, qlr_model_config *cfg, const char **plan_name);

/* TFLOP/s of a cuBLASLt bf16 GEMM 8192 x 8192 x 8192 (f32 accumulation, bf16 out) on `be`, 20
 * repetitions after 3 warm-up calls, three 128 MiB buffers allocated and freed through
 * be->mem. *tflops = 0 (QLR_OK) on a backend that is not CUDA or a build without it. */
qlr_status qlr_bench_gemm_bf16_tflops(qlr_backend *be, double *tflops);

/* GFLOP/s of the fastest of repeated C[m, n] = A[m, k] · B[n, k]ᵀ (the shape of our linears)
 * through OpenBLAS's cblas_sgemm with `threads` threads, over about `seconds` (at least 3
 * calls; the first warms up). 0 when the host buffers cannot be allocated. */
double qlr_bench_sgemm_gflops(int threads, int m, int n, int k, double seconds);

#endif
