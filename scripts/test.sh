#!/usr/bin/env bash
# scripts/test.sh: set up (scripts/setup.sh), then run the whole CPU test suite with ctest
# (labels unit, golden, grad, e2e, fuzz; gpu tests run where a GPU exists: see README).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
BUILD=${QLR_BUILD_DIR:-build}
LABELS=${QLR_TEST_LABELS:-}
args=(--test-dir "$BUILD" --output-on-failure -j "${QLR_JOBS:-$(nproc)}")
[ -n "$LABELS" ] && args+=(-L "$LABELS")
ctest "${args[@]}" -LE gpu
