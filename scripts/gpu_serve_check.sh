#!/usr/bin/env bash
# scripts/gpu_serve_check.sh: `qlora serve` on a CUDA device with the demo model and 8 adapters,
# under load (scripts/serve_load.py): 64 concurrent streams on the base model, then 64 over the
# 8 adapters (round-robin), each generating N_PREDICT tokens. The adapters are 8 short quickstart
# trainings on the GPU with different seeds (3 steps each: distinct weights, what matters here).
# Needs a build with the full program (scripts/gpu_check.sh makes build-gpu) and the demo model.
#   OUT=dir QLR_GPU_BUILD=build-gpu QLR_DEMO_MODEL=... scripts/gpu_serve_check.sh [N_PREDICT]
# Writes $OUT/serve_load.jsonl and $OUT/serve.log; prints the two result lines.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-out/gpu_serve}
BUILD=${QLR_GPU_BUILD:-build-gpu}
MODEL=${QLR_DEMO_MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
NPRED=${1:-256}
QLORA=$BUILD/bin/qlora
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'kill $srv 2> /dev/null; rm -rf "$work"' EXIT
adapters=() names=()
for i in 0 1 2 3 4 5 6 7; do
  "$QLORA" train recipes/smollm2-quickstart.yaml --device cuda --quiet --no-gguf --set "base_model=$MODEL" \
      --set "output_dir=$work/a$i" --set max_steps=3 --set "seed=$((i + 1))" --set eval_steps=0 \
      --set val_set_size=0 >> "$OUT/serve.log" 2>&1 || { echo "training adapter $i failed"; tail -5 "$OUT/serve.log"; exit 1; }
  adapters+=(--adapter "a$i=$work/a$i")
  names+=("a$i")
done
"$QLORA" serve -m "$MODEL" --device cuda --port 0 "${adapters[@]}" --max-queue 512 \
    > "$work/summary" 2>> "$OUT/serve.log" &
srv=$!
for _ in $(seq 600); do
  grep -q "listening" "$work/summary" 2> /dev/null && break
  kill -0 $srv 2> /dev/null || { cat "$work/summary"; tail -5 "$OUT/serve.log"; exit 1; }
  sleep 0.2
done
cat "$work/summary" | tee -a "$OUT/serve.log"
url=$(grep -o "http://[^ ]*" "$work/summary" | head -1)
url=${url%/v1}
rc=0
python3 scripts/serve_load.py "$url" 64 "$NPRED" base | tee -a "$OUT/serve_load.jsonl" || rc=1
python3 scripts/serve_load.py "$url" 64 "$NPRED" "$(IFS=,; echo "${names[*]}")" | tee -a "$OUT/serve_load.jsonl" || rc=1
kill -TERM $srv
wait $srv
exit $rc
