#!/usr/bin/env bash
# scripts/fuzz.sh [SECONDS_PER_TARGET] [NAME...]
#
# Builds every libFuzzer target of tests/fuzz/ (tests/fuzz/fuzz_<name>.c) with clang, ASan and
# UBSan in build-fuzz/ (cmake -DQLR_FUZZ=ON -DCMAKE_C_COMPILER=clang -DQLR_CUDA=OFF), then runs
# each target (or only the NAMEs given, e.g. `scripts/fuzz.sh 60 gguf`) for SECONDS_PER_TARGET
# seconds (default 30), starting from its seeds: tests/fuzz/corpus/<name>/ plus the corrupt-file
# set tests/data/<name>_bad/ when there is one.
#   - new interesting inputs go to build-fuzz/fuzz-corpus/<name>/ (the committed corpus is left
#     alone; copy a few small ones into tests/fuzz/corpus/<name>/ to keep them);
#   - a crash leaves its input in build-fuzz/fuzz-artifacts/<name>/; once fixed, commit it to
#     tests/fuzz/corpus/<name>/ so that the `fuzz` ctest replays it in every build.
# Exit status: 0 when no target crashed, 1 otherwise (2 for a usage error).
# Environment: QLR_FUZZ_BUILD_DIR (default build-fuzz), QLR_JOBS (build parallelism), CC (clang).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-30}
if ! [[ "$SECS" =~ ^[0-9]+$ ]]; then
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [NAME...]" >&2
  exit 2
fi
shift $(( $# > 0 ? 1 : 0 ))
BUILD=${QLR_FUZZ_BUILD_DIR:-build-fuzz}
CC_BIN=${CC:-clang}
command -v "$CC_BIN" >/dev/null || { echo "fuzz.sh: $CC_BIN not found (apt-get install clang)" >&2; exit 1; }

mkdir -p "$BUILD"
cmake -S . -B "$BUILD" -DQLR_FUZZ=ON -DQLR_CUDA=OFF -DCMAKE_C_COMPILER="$CC_BIN" \
      -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$BUILD/configure.log" 2>&1 \
  || { cat "$BUILD/configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j "${QLR_JOBS:-$(nproc)}" --target qlr_fuzz_all

names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for src in tests/fuzz/fuzz_*.c; do
    n=$(basename "$src" .c)
    names+=("${n#fuzz_}")
  done
fi

failed=()
for name in "${names[@]}"; do
  bin="$BUILD/fuzz/fuzz_$name"
  [ -x "$bin" ] || { echo "fuzz.sh: no target $bin" >&2; failed+=("$name"); continue; }
  work="$BUILD/fuzz-corpus/$name"
  art="$BUILD/fuzz-artifacts/$name"
  mkdir -p "$work" "$art"
  seeds=()
  for d in "tests/fuzz/corpus/$name" "tests/data/${name}_bad"; do
    [ -d "$d" ] && seeds+=("$d")
  done
  echo "=== fuzz_$name: ${SECS}s from ${seeds[*]:-no seeds}"
  if ! "$bin" -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$art/" "$work" "${seeds[@]}" >"$BUILD/fuzz-$name.log" 2>&1; then
    echo "fuzz_$name: FAILED (log: $BUILD/fuzz-$name.log, inputs: $art/)"
    tail -n 30 "$BUILD/fuzz-$name.log"
    failed+=("$name")
  else
    grep -E "^stat::number_of_executed_units|^stat::new_units_added" "$BUILD/fuzz-$name.log" | tr '\n' ' '
    echo
    echo "fuzz_$name: ok"
  fi
done

if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz.sh: failures in: ${failed[*]}"
  exit 1
fi
echo "fuzz.sh: all ${#names[@]} targets ran ${SECS}s without a crash"
