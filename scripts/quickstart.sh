#!/usr/bin/env bash
# scripts/quickstart.sh: set up (scripts/setup.sh), then run the main job on the demo model:
# inspect the model, and print the memory plan of the quickstart recipe.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
BIN=${QLR_BUILD_DIR:-build}/bin/qlora
MODEL=${QLR_DEMO_MODEL:-${QLR_CACHE:-.cache}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
echo; echo "== qlora inspect $MODEL"
"$BIN" inspect "$MODEL"
echo; echo "== qlora plan recipes/smollm2-quickstart.yaml"
"$BIN" plan recipes/smollm2-quickstart.yaml
