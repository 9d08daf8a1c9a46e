#!/usr/bin/env bash
# scripts/quickstart.sh: set up (scripts/setup.sh), then run the main job on the demo model:
# inspect the model, print the memory plan of the quickstart recipe, fine-tune it (a few minutes
# on two CPU cores; training writes the adapter as a PEFT folder (Hugging Face) and as GGUF
# (llama.cpp), and the picture of the run, loss.svg), and evaluate base model vs adapter on the
# held-out examples (loss and exact match). `qlora export` is for converting other adapters.
# The run goes to outputs/smollm2-quickstart/ (the recipe's output_dir); a previous run there is
# replaced. Set QLR_EVAL_N to evaluate on fewer examples (default: the whole validation split).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
BIN=${QLR_BUILD_DIR:-build}/bin/qlora
MODEL=${QLR_DEMO_MODEL:-${QLR_CACHE:-.cache}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
RECIPE=recipes/smollm2-quickstart.yaml
RUN=outputs/smollm2-quickstart
SETS=()
[ -n "${QLR_DEMO_MODEL:-}" ] && SETS+=(--set "base_model=$(realpath "$QLR_DEMO_MODEL")")

echo; echo "== qlora inspect $MODEL"
"$BIN" inspect "$MODEL"
echo; echo "== qlora plan $RECIPE"
"$BIN" plan "$RECIPE" "${SETS[@]}"

echo; echo "== qlora train $RECIPE   (output: $RUN/)"
rm -rf "$RUN"
"$BIN" train "$RECIPE" "${SETS[@]}"

echo; echo "== qlora eval $RECIPE   (base model vs adapter, held-out examples)"
EVAL_N=()
[ -n "${QLR_EVAL_N:-}" ] && EVAL_N=(-n "$QLR_EVAL_N")
"$BIN" eval "$RECIPE" "${SETS[@]}" "${EVAL_N[@]}"
echo
echo "The adapter: $RUN/adapter/ (PEFT) and $RUN/adapter_model.gguf (llama.cpp --lora);"
echo "the run: $RUN/loss.svg (open it in a browser) and $RUN/metrics.jsonl"
