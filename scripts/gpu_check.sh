#!/usr/bin/env bash
# scripts/gpu_check.sh: on a machine with an NVIDIA GPU, builds the CUDA backend, its gpu-labelled
# tests and the decode benchmark for one architecture (default sm_90, H100/H200) in build-gpu,
# runs every gpu test (ctest -L gpu), compute-sanitizer memcheck and racecheck, and
# bench_decode, and writes the logs and the bench JSON under $OUT (default out/gpu_check).
#   QLR_CUDA_ARCH=90 QLR_GPU_BUILD=build-gpu OUT=out/gpu_check scripts/gpu_check.sh [bench args]
# Needs only core + quant + backend (no jansson/libyaml/PCRE2/libmicrohttpd). Exit status: that
# of ctest, or of the bench when the tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
BUILD=${QLR_GPU_BUILD:-build-gpu}
ARCH=${QLR_CUDA_ARCH:-90}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
echo "== configure (sm_$ARCH) ==" | tee "$OUT/build.log"
cmake -S . -B "$BUILD" -DQLR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
      -DCMAKE_BUILD_TYPE=Release >> "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "== build ==" | tee -a "$OUT/build.log"
cmake --build "$BUILD" -j"$(nproc)" \
      >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "== gpu tests ==" | tee "$OUT/ctest_gpu.log"
ctest --test-dir "$BUILD" -L gpu -V --timeout 300 >> "$OUT/ctest_gpu.log" 2>&1
rc=$?
grep -E "Test +#|tests passed|FAIL" "$OUT/ctest_gpu.log" | head -40
if command -v compute-sanitizer > /dev/null; then
  : > "$OUT/sanitizer.log"
  for t in test_cuda_attention test_cuda_forward test_cuda_paged; do
    echo "== compute-sanitizer memcheck: $t ==" | tee -a "$OUT/sanitizer.log"
    args=""; [ "$t" = test_cuda_paged ] && args=--quick
    timeout 200 compute-sanitizer --tool memcheck "$BUILD/tests/gpu/$t" $args >> "$OUT/sanitizer.log" 2>&1
    echo "memcheck $t exit: $?" | tee -a "$OUT/sanitizer.log"
  done
  grep -E "ERROR SUMMARY|passed, " "$OUT/sanitizer.log" | tail -4
  # shared-memory races in the attention kernels (a missing barrier was found this way)
  for t in test_cuda_attention test_cuda_paged; do
    echo "== compute-sanitizer racecheck: $t ==" | tee -a "$OUT/sanitizer.log"
    args=""; [ "$t" = test_cuda_paged ] && args=--quick
    timeout 300 compute-sanitizer --tool racecheck --error-exitcode 3 \
        "$BUILD/tests/gpu/$t" $args >> "$OUT/sanitizer.log" 2>&1
    rrc=$?
    echo "racecheck $t exit: $rrc" | tee -a "$OUT/sanitizer.log"
    grep -E "RACECHECK SUMMARY" "$OUT/sanitizer.log" | tail -1
    [ "$rrc" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$rrc
  done
fi
echo "== bench_decode ==" | tee "$OUT/bench.log"
"$BUILD/bench/bench_decode" --out "$OUT/bench_decode.json" "$@" 2>&1 | tee -a "$OUT/bench.log"
brc=${PIPESTATUS[0]}
grep -E "tests passed|tests failed" "$OUT/ctest_gpu.log" | tail -1
[ "$rc" -ne 0 ] && exit "$rc"
exit "$brc"
