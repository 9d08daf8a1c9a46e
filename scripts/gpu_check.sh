#!/usr/bin/env bash
# scripts/gpu_check.sh: on a machine with an NVIDIA GPU, the full build (every module, the CUDA
# backend for one architecture, default sm_90 = H100/H200, the tests and the decode benchmark) in
# build-gpu, then every gpu test (ctest -L gpu), compute-sanitizer memcheck and racecheck, and
# bench_decode (model/'s forward, so it needs the full build); logs and the bench JSON go under
# $OUT (default out/gpu_check).
#   QLR_CUDA_ARCH=90 QLR_GPU_BUILD=build-gpu OUT=out/gpu_check QLR_DEBS=.debs \
#     scripts/gpu_check.sh [bench_decode args]
# The full build needs jansson, libyaml, PCRE2 and libmicrohttpd (headers, pkg-config files,
# libraries). Where they are not installed, QLR_DEBS names a folder of their Debian packages
# (libjansson-dev libjansson4 libyaml-dev libyaml-0-2 libpcre2-dev libpcre2-8-0 libpcre2-16-0
# libpcre2-32-0 libpcre2-posix3 libmicrohttpd-dev libmicrohttpd12, e.g. from `apt-get download`):
# each is unpacked (dpkg -x) into QLR_DEBS_PREFIX (default $QLR_GPU_BUILD/debs-prefix), their .pc
# files are pointed at that prefix, and CMake finds them through CMAKE_PREFIX_PATH and
# PKG_CONFIG_PATH; the programs load the libraries through their build RPATH (LD_LIBRARY_PATH is
# set too). The gpu tests of the demo model (test_cuda_generate, test_cuda_train_demo,
# test_cuda_adapter_batch) need it (QLR_DEMO_MODEL or .cache/models/): without it they are left
# out, and the summary says so. Exit status: the configure/build's, else that of ctest (or a
# sanitizer), else the bench's.
# Parts of a run (device calls are limited in time): QLR_GPU_TESTS=REGEX runs only the gpu tests
# it matches (QLR_GPU_TESTS=none: none), QLR_GPU_SANITIZE=0 skips compute-sanitizer,
# QLR_GPU_BENCH=0 skips bench_decode.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-out/gpu_check}
BUILD=${QLR_GPU_BUILD:-build-gpu}
ARCH=${QLR_CUDA_ARCH:-90}
mkdir -p "$OUT" "$BUILD"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
: > "$OUT/build.log"

# ---- carried Debian packages of the full build's libraries ----
# unpack_deb DEB DIR: the package's files under DIR (dpkg -x; without dpkg, the data.tar.* member
# of the ar archive a .deb is)
unpack_deb() {
  if command -v dpkg > /dev/null; then
    dpkg -x "$1" "$2"
    return
  fi
  local tmp r deb
  deb=$(realpath "$1")
  tmp=$(mktemp -d) || return 1
  (cd "$tmp" && ar x "$deb") && tar -xf "$tmp"/data.tar.* -C "$2"
  r=$?
  rm -rf "$tmp"
  return $r
}
cmake_extra=()
if [ -n "${QLR_DEBS:-}" ]; then
  prefix=$(realpath -m "${QLR_DEBS_PREFIX:-$BUILD/debs-prefix}")
  echo "== unpacking $QLR_DEBS/*.deb into $prefix ==" | tee -a "$OUT/build.log"
  shopt -s nullglob
  debs=("$QLR_DEBS"/*.deb)
  shopt -u nullglob
  if [ ${#debs[@]} -eq 0 ]; then
    echo "QLR_DEBS=$QLR_DEBS holds no .deb files" | tee -a "$OUT/build.log"
    exit 1
  fi
  rm -rf "$prefix" && mkdir -p "$prefix"
  for d in "${debs[@]}"; do
    unpack_deb "$d" "$prefix" || { echo "cannot unpack $d" | tee -a "$OUT/build.log"; exit 1; }
    echo "  $(basename "$d")" >> "$OUT/build.log"
  done
  multiarch=$(gcc -print-multiarch 2> /dev/null)
  libdir=$prefix/usr/lib/${multiarch:-x86_64-linux-gnu}
  # The .pc files say prefix=/usr: point them at the unpacked tree. Requires.private lines go:
  # we link the shared libraries, and libmicrohttpd.pc's (gnutls) has no .pc on this machine.
  for pc in "$libdir"/pkgconfig/*.pc "$prefix"/usr/share/pkgconfig/*.pc; do
    [ -f "$pc" ] || continue
    sed -i -E "s#^(prefix|exec_prefix|libdir|includedir)=/usr#\1=$prefix/usr#; /^Requires\.private:/d" "$pc"
  done
  export PKG_CONFIG_PATH="$libdir/pkgconfig:$prefix/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  cmake_extra+=("-DCMAKE_PREFIX_PATH=$prefix/usr")
  # what the carried libraries need at run time and this machine lacks (gnutls for
  # libmicrohttpd, say): carry those packages too
  missing=$(for so in "$libdir"/*.so.*; do [ -L "$so" ] || ldd "$so" 2> /dev/null; done |
            grep "not found" | sort -u)
  if [ -n "$missing" ]; then
    echo "the carried libraries need libraries this machine lacks (add their packages to $QLR_DEBS):" |
      tee -a "$OUT/build.log"
    echo "$missing" | tee -a "$OUT/build.log"
    exit 1
  fi
fi

echo "== configure (sm_$ARCH, full build) ==" | tee -a "$OUT/build.log"
cmake -S . -B "$BUILD" -DQLR_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
      -DCMAKE_BUILD_TYPE=Release "${cmake_extra[@]}" >> "$OUT/build.log" 2>&1 ||
  { tail -30 "$OUT/build.log"; exit 1; }
if ! grep -E "qlora modules: .*model" "$OUT/build.log" > /dev/null; then
  grep -E "Missing|qlora modules" "$OUT/build.log"
  echo "configure found no full build (jansson, libyaml, PCRE2, libmicrohttpd): install them or" \
       "set QLR_DEBS to a folder of their .deb files" | tee -a "$OUT/build.log"
  exit 1
fi
grep -E "^-- (jansson|yaml|libpcre2|libmicrohttpd|CUDA|cuDNN|qlora modules)" "$OUT/build.log"
echo "== build ==" | tee -a "$OUT/build.log"
cmake --build "$BUILD" -j"$(nproc)" \
      >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }

echo "== gpu tests ==" | tee "$OUT/ctest_gpu.log"
exclude=()
demo=${QLR_DEMO_MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$demo" ]; then
  demo_tests="test_cuda_generate test_cuda_train_demo test_cuda_adapter_batch test_cuda_engine"
  echo "left out: $demo_tests (demo model $demo not found; set QLR_DEMO_MODEL)" |
    tee -a "$OUT/ctest_gpu.log"
  exclude=(-E "^(${demo_tests// /|})\$")
fi
select=()
[ -n "${QLR_GPU_TESTS:-}" ] && select=(-R "${QLR_GPU_TESTS}")
rc=0
if [ "${QLR_GPU_TESTS:-}" != none ]; then
  ctest --test-dir "$BUILD" -L gpu "${exclude[@]}" "${select[@]}" -V --timeout 300 \
      >> "$OUT/ctest_gpu.log" 2>&1
  rc=$?
fi
grep -E "Test +#|tests passed|FAIL|left out" "$OUT/ctest_gpu.log" | head -40
if [ "${QLR_GPU_SANITIZE:-1}" != 0 ] && command -v compute-sanitizer > /dev/null; then
  : > "$OUT/sanitizer.log"
  # each entry: a test binary and its arguments (test_cuda_varlen --sanitize: its small cases)
  for t in test_cuda_attention test_cuda_forward test_cuda_train "test_cuda_varlen --sanitize" \
           "test_cuda_paged --quick"; do
    read -r -a cmd <<< "$t"
    echo "== compute-sanitizer memcheck: $t ==" | tee -a "$OUT/sanitizer.log"
    timeout 200 compute-sanitizer --tool memcheck "$BUILD/tests/gpu/${cmd[0]}" "${cmd[@]:1}" \
        >> "$OUT/sanitizer.log" 2>&1
    echo "memcheck $t exit: $?" | tee -a "$OUT/sanitizer.log"
  done
  grep -E "ERROR SUMMARY|passed, " "$OUT/sanitizer.log" | tail -8
  # shared-memory races in the attention kernels (a missing barrier was found this way)
  for t in test_cuda_attention "test_cuda_varlen --sanitize" "test_cuda_paged --quick"; do
    read -r -a cmd <<< "$t"
    echo "== compute-sanitizer racecheck: $t ==" | tee -a "$OUT/sanitizer.log"
    timeout 300 compute-sanitizer --tool racecheck --error-exitcode 3 \
        "$BUILD/tests/gpu/${cmd[0]}" "${cmd[@]:1}" >> "$OUT/sanitizer.log" 2>&1
    rrc=$?
    echo "racecheck $t exit: $rrc" | tee -a "$OUT/sanitizer.log"
    grep -E "RACECHECK SUMMARY" "$OUT/sanitizer.log" | tail -1
    [ "$rrc" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$rrc
  done
fi
brc=0
if [ "${QLR_GPU_BENCH:-1}" != 0 ]; then
  echo "== bench_decode ==" | tee "$OUT/bench.log"
  "$BUILD/bench/bench_decode" --out "$OUT/bench_decode.json" "$@" 2>&1 | tee -a "$OUT/bench.log"
  brc=${PIPESTATUS[0]}
fi
grep -E "tests passed|tests failed" "$OUT/ctest_gpu.log" | tail -1
[ "$rc" -ne 0 ] && exit "$rc"
exit "$brc"
