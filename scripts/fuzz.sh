#!/usr/bin/env bash
# scripts/fuzz.sh [SECONDS_PER_TARGET] [NAME...]
#
# Builds every libFuzzer target of tests/fuzz/ (tests/fuzz/fuzz_<name>.c) with clang, ASan and
# UBSan in build-fuzz/ (cmake -DQLR_FUZZ=ON -DCMAKE_C_COMPILER=clang -DQLR_CUDA=OFF), then runs
# each target (or only the NAMEs given, e.g. `scripts/fuzz.sh 60 gguf`), one at a time in one
# process, for SECONDS_PER_TARGET seconds (default 30) or QLR_FUZZ_RUNS executions (default 10
# million), whichever comes first, starting from its seeds: tests/fuzz/corpus/<name>/ plus the
# corrupt-file set tests/data/<name>_bad/ when there is one. Leaks (LeakSanitizer) and hangs
# (-timeout=10 s per input) count as crashes.
#   - new interesting inputs go to build-fuzz/fuzz-corpus/<name>/ (the committed corpus is left
#     alone; copy a few small ones into tests/fuzz/corpus/<name>/ to keep them);
#   - a crash leaves its input in build-fuzz/fuzz-artifacts/<name>/; once fixed, commit it to
#     tests/fuzz/corpus/<name>/ so that the `fuzz` ctest replays it in every build.
# At the end it prints a table (also written to build-fuzz/fuzz-table.md): per target the
# seconds run, executions, exec/s, coverage (libFuzzer's cov: edges and ft: features), corpus
# size, and crashes found / fixed: every input in build-fuzz/fuzz-artifacts/<name>/ (from this
# run or an earlier one) counts as found, and as fixed when the current build replays it
# without a failure.
# Exit status: 0 when no target has an unfixed crash, 1 otherwise (2 for a usage error).
# Environment: QLR_FUZZ_BUILD_DIR (default build-fuzz), QLR_FUZZ_RUNS, QLR_JOBS (build
# parallelism), CC (clang).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-30}
RUNS=${QLR_FUZZ_RUNS:-10000000}
if ! [[ "$SECS" =~ ^[0-9]+$ && "$RUNS" =~ ^[0-9]+$ ]]; then
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

rows=()
unfixed_total=0
for name in "${names[@]}"; do
  bin="$BUILD/fuzz/fuzz_$name"
  [ -x "$bin" ] || { echo "fuzz.sh: no target $bin" >&2; rows+=("| $name | - | - | - | - | - | - | no binary | |"); unfixed_total=$((unfixed_total + 1)); continue; }
  work="$BUILD/fuzz-corpus/$name"
  art="$BUILD/fuzz-artifacts/$name"
  mkdir -p "$work" "$art"
  seeds=()
  for d in "tests/fuzz/corpus/$name" "tests/data/${name}_bad"; do
    [ -d "$d" ] && seeds+=("$d")
  done
  log="$BUILD/fuzz-$name.log"
  echo "=== fuzz_$name: up to ${SECS}s / ${RUNS} runs from ${seeds[*]:-no seeds}"
  t0=$(date +%s)
  if "$bin" -max_total_time="$SECS" -runs="$RUNS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$art/" "$work" "${seeds[@]}" >"$log" 2>&1; then
    echo "fuzz_$name: ok"
  else
    echo "fuzz_$name: FAILED (log: $log, inputs: $art/)"
    tail -n 30 "$log"
  fi
  secs=$(( $(date +%s) - t0 ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov: [0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\)\/.*/\1/p' <<<"$last")
  found=0
  fixed=0
  for a in "$art"/*; do
    [ -f "$a" ] || continue
    found=$((found + 1))
    if "$bin" -runs=1 -timeout=10 -rss_limit_mb=2048 "$a" >/dev/null 2>&1; then fixed=$((fixed + 1)); fi
  done
  unfixed_total=$((unfixed_total + found - fixed))
  rows+=("| $name | $secs | ${execs:-?} | ${rate:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | $found | $fixed |")
done

table="| target | seconds | executions | exec/s | cov (edges) | ft (features) | corpus | crashes found | fixed |
|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for r in "${rows[@]}"; do table+=$'\n'"$r"; done
echo
echo "$table"
echo "$table" >"$BUILD/fuzz-table.md"
if [ "$unfixed_total" -ne 0 ]; then
  echo "fuzz.sh: $unfixed_total crash input(s) still fail (see $BUILD/fuzz-artifacts/)"
  exit 1
fi
echo "fuzz.sh: ${#names[@]} targets, no open crash"
