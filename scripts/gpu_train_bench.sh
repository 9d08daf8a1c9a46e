#!/usr/bin/env bash
# scripts/gpu_train_bench.sh: issue 13's training benchmark on a GPU machine, after a full build
# (scripts/gpu_check.sh builds one into build-gpu; QLR_GPU_BUILD names it): `qlora bench train`
# at Llama-3.1-8B dimensions with random NF4 weights (seq 2048 x micro-batch 1 and 2, 8192 x 1),
# then the longest sequence that trains within 16 GiB (--longest, allocations capped), then the
# peer: python3 $QLR_PEER (default peers/hf_bnb_qlora_bench.py) 2048:1 2048:2 8192:1 (HF
# transformers + bitsandbytes + PEFT), when it is there. JSON and logs under $OUT.
#   OUT=out/train_bench QLR_GPU_BUILD=build-gpu QLR_PEER=peers/hf_bnb_qlora_bench.py \
#     scripts/gpu_train_bench.sh
# Parts (default all; a device call is limited to 10 minutes, so they can go in separate calls
# of one warm machine): QLR_BENCH_PARTS="runs peer memory longest"
#   runs     2048:1, 2048:2, 8192:1 with --checkpointing auto --vram 16GiB (the planner's
#            fastest mode for a 16 GB card at each shape)
#   peer     the peer at the same shapes (must share a device call with `runs`)
#   memory   2048:1 with checkpointing on and with offload (the lowest peaks at 2048)
#   longest  --longest --vram 16GiB (the planner's mode per length)
# QLR_BENCH_STEPS / QLR_BENCH_WARMUP: timed and warm-up steps per run (default 4 and 2).
# Exit status: the first failing part's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-out/train_bench}
BUILD=${QLR_GPU_BUILD:-build-gpu}
PEER=${QLR_PEER:-peers/hf_bnb_qlora_bench.py}
STEPS=${QLR_BENCH_STEPS:-4}
WARMUP=${QLR_BENCH_WARMUP:-2}
QLORA=$BUILD/bin/qlora
mkdir -p "$OUT"
[ -x "$QLORA" ] || { echo "$QLORA not found: build first (scripts/gpu_check.sh, or QLR_GPU_BUILD)"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
rc=0
PARTS=" ${QLR_BENCH_PARTS:-runs peer memory longest} "
part() { [[ "$PARTS" == *" $1 "* ]]; }

if part runs; then
echo "== qlora bench train: llama3.1-8b 2048:1,2048:2,8192:1 (auto, 16GiB) ==" | tee "$OUT/bench_train.log"
start=$(date +%s)
"$QLORA" bench train --shape llama3.1-8b --device cuda --runs 2048:1,2048:2,8192:1 --steps "$STEPS" \
    --warmup "$WARMUP" --checkpointing auto --vram 16GiB --out "$OUT/bench_train_8b.json" >> "$OUT/bench_train.log" 2>&1
r=$?
echo "exit $r after $(( $(date +%s) - start ))s" | tee -a "$OUT/bench_train.log"
[ "$r" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$r
fi

if part memory; then
for mode in on offload; do
echo "== qlora bench train: llama3.1-8b 2048:1 checkpointing $mode ==" | tee -a "$OUT/bench_train_memory.log"
start=$(date +%s)
"$QLORA" bench train --shape llama3.1-8b --device cuda --runs 2048:1 --steps "$STEPS" --warmup "$WARMUP" \
    --checkpointing $mode --vram 16GiB --out "$OUT/bench_train_8b_2048_$mode.json" >> "$OUT/bench_train_memory.log" 2>&1
r=$?
echo "exit $r after $(( $(date +%s) - start ))s" | tee -a "$OUT/bench_train_memory.log"
[ "$r" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$r
done
fi

if part longest; then
echo "== qlora bench train: llama3.1-8b --longest within 16GiB ==" | tee "$OUT/bench_train_longest.log"
start=$(date +%s)
"$QLORA" bench train --shape llama3.1-8b --device cuda --longest --vram 16GiB --no-profile \
    --out "$OUT/bench_train_8b_longest.json" >> "$OUT/bench_train_longest.log" 2>&1
r=$?
echo "exit $r after $(( $(date +%s) - start ))s" | tee -a "$OUT/bench_train_longest.log"
[ "$r" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$r
fi

if ! part peer; then
  :
elif [ -f "$PEER" ]; then
  echo "== peer: $PEER 2048:1 2048:2 8192:1 ==" | tee "$OUT/peer.log"
  start=$(date +%s)
  OUT="$OUT" python3 "$PEER" 2048:1 2048:2 8192:1 > "$OUT/peer.json" 2>> "$OUT/peer.log"
  r=$?
  echo "exit $r after $(( $(date +%s) - start ))s" | tee -a "$OUT/peer.log"
  [ "$r" -ne 0 ] && [ "$rc" -eq 0 ] && rc=$r
else
  echo "peer $PEER not found (QLR_PEER): left out" | tee "$OUT/peer.log"
fi

# the headline figures, one line a run
python3 - "$OUT" <<'PY' || true
import json, os, sys
out = sys.argv[1]
for name in ("bench_train_8b.json", "bench_train_8b_2048_on.json", "bench_train_8b_2048_offload.json",
             "bench_train_8b_longest.json"):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        continue
    d = json.load(open(p))
    for r in d.get("runs", []):
        print("%s seq %d x %d (%s): %.0f tok/s, MFU %.3f, HFU %.3f, step %.3fs, peak %.2f GiB (plan %.2f GiB)" % (
            d.get("device_name"), r["seq"], r["micro_batch"], r.get("checkpointing"), r["tokens_per_s"], r["mfu"] or 0, r["hfu"] or 0,
            r["step_s"], r["peak_alloc_bytes"] / 2**30, r["plan_bytes"] / 2**30))
    lg = d.get("longest")
    if lg:
        print("longest within %.0f GiB: seq %s, confirmed %s, steps %s" % (
            lg["vram_budget_bytes"] / 2**30, lg.get("planner_longest_seq"), lg.get("confirmed"), lg.get("step_s")))
PY
exit "$rc"
