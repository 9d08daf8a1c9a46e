#!/usr/bin/env python3
"""tests/e2e/test_e2e_bench_train.py: `qlora bench train --shape` end to end on the CPU (label e2e),
or on CUDA with --device cuda (label gpu), with the SmolLM2-135M shape at a short sequence: every
JSON field a run reports is there and sane (tokens/s > 0, peak > 0, the plan's bytes, the
breakdown per op kind), --longest finds a length within the budget and its 3 capped steps pass;
bad options fail naming the option. `--recipe-plan`: `qlora plan` of
recipes/llama3.1-8b-16gb.yaml (no weights: the built-in shape) fits in 16 GiB.

  test_e2e_bench_train.py --qlora PATH --source-dir DIR [--device cpu|cuda] [--recipe-plan]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

FAILS = []


def check(ok, what):
    if not ok:
        FAILS.append(what)
        print("FAIL:", what)
    return ok


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)


def recipe_plan(qlora, src):
    recipe = os.path.join(src, "recipes", "llama3.1-8b-16gb.yaml")
    p = run([qlora, "plan", recipe])
    check(p.returncode == 0, "qlora plan %s: exit %d\n%s%s" % (recipe, p.returncode, p.stdout, p.stderr))
    check("Llama-3.1-8B" in p.stdout, "the plan names the Llama-3.1-8B shape")
    check("16.00 GiB): fits" in p.stdout, "the plan fits in 16 GiB:\n" + p.stdout)
    j = run([qlora, "plan", recipe, "--json"])
    if check(j.returncode == 0, "qlora plan --json: exit %d" % j.returncode):
        d = json.loads(j.stdout)
        tot = d.get("total_bytes")
        check(isinstance(tot, int) and 0 < tot <= 16 << 30, "plan total %r within 16 GiB" % (tot,))
        check(d.get("fits") is True and d.get("budget_bytes") == 16 << 30, "fits the recipe's 16 GiB")
    # the recipe's sequence_len with room to spare: 16 GiB refuses twice the length
    o = run([qlora, "plan", recipe, "--set", "sequence_len=32768"])
    check(o.returncode == 1, "sequence_len 32768 is over 16 GiB (exit %d)" % o.returncode)


def positive(d, key, what):
    v = d.get(key)
    return check(isinstance(v, (int, float)) and v > 0, "%s: %s = %r, expected > 0" % (what, key, v))


def bench(qlora, device):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        cmd = [qlora, "bench", "train", "--shape", "smollm2-135m", "--device", device, "--runs", "64:1,32:2",
               "--steps", "2", "--warmup", "1", "--vram", "1GiB" if device == "cuda" else "160MiB", "--longest",
               "--out", out]
        p = run(cmd)
        if not check(p.returncode == 0, "%s: exit %d\n%s" % (" ".join(cmd), p.returncode, p.stderr[-3000:])):
            return
        d = json.load(open(out))
        check(d.get("shape") == "smollm2-135m" and d.get("device") == device, "shape and device: %r" % d)
        check(isinstance(d.get("device_name"), str) and d["device_name"], "device_name")
        runs = d.get("runs", [])
        check([(r.get("seq"), r.get("micro_batch")) for r in runs] == [(64, 1), (32, 2)], "runs: %r" % runs)
        for r in runs:
            what = "run %s:%s" % (r.get("seq"), r.get("micro_batch"))
            for k in ("tokens_per_s", "step_s", "peak_alloc_bytes", "plan_bytes", "gemm_tflops", "mfu", "hfu",
                      "model_flops_per_token", "hardware_flops_per_token", "profiled_step_ms", "final_loss"):
                positive(r, k, what)
            check(r.get("nonfinite_steps") == 0, what + ": non-finite steps")
            check(r.get("hfu", 0) > r.get("mfu", 1), what + ": checkpointing's recompute makes HFU > MFU")
            check(0 < r.get("mfu", 0) < 1.5, what + ": MFU %r not plausible" % r.get("mfu"))
            ratio = r.get("peak_over_plan")
            check(isinstance(ratio, float) and 0.3 < ratio <= 1.05,
                  what + ": the allocator's peak against the plan: %r" % ratio)
            if device == "cuda":
                positive(r, "memgetinfo_used_delta", what)
            bd = r.get("breakdown_ms", {})
            for k in ("nf4_linears", "lora", "attention", "ce", "optimizer", "elementwise", "copies", "gaps"):
                check(k in bd, what + ": breakdown_ms has no " + k)
            for k in ("nf4_linears", "lora", "attention", "ce", "optimizer"):
                positive(bd, k, what + " breakdown_ms")
            # the profiled step's kinds add up to its wall time
            tot = sum(v for v in bd.values() if isinstance(v, (int, float)))
            check(abs(tot - r.get("profiled_step_ms", 0)) < 1.0, what + ": breakdown sums to %.2f" % tot)
        lg = d.get("longest", {})
        seq = lg.get("planner_longest_seq")
        check(isinstance(seq, int) and 16 <= seq <= lg.get("seq_bound", 0), "longest: %r" % lg)
        check(lg.get("confirmed") is True and len(lg.get("step_s", [])) == 3, "longest: 3 steps ran: %r" % lg)
        check(lg.get("plan_bytes", 1 << 62) <= lg.get("vram_budget_bytes", 0), "longest: the plan is within budget")
        if device == "cuda":
            check(lg.get("peak_alloc_bytes", 1 << 62) <= lg.get("alloc_cap_bytes", 0), "longest: the cap held")

    # option errors name the option
    for args, word in ((["--runs", "2048"], "--runs"), (["--checkpointing", "maybe"], "--checkpointing"),
                       (["--longest"], "--vram"), (["--shape", "gpt5"], "gpt5"), (["--warmup", "-1"], "--warmup")):
        base = ["--shape", "smollm2-135m"] if "--shape" not in args else []
        p = run([qlora, "bench", "train"] + base + args + ["--device", "cpu"])
        check(p.returncode != 0 and word in p.stderr, "bench train %s: exit %d, stderr %r" %
              (" ".join(args), p.returncode, p.stderr[-300:]))
    h = run([qlora, "bench", "--help"])
    for opt in ("--shape", "--runs", "--seq", "--mb", "--warmup", "--checkpointing", "--vram", "--longest",
                "--no-profile"):
        check(opt in h.stdout, "bench --help lists " + opt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--recipe-plan", action="store_true")
    a = ap.parse_args()
    if a.recipe_plan:
        recipe_plan(a.qlora, a.source_dir)
    else:
        bench(a.qlora, a.device)
    print("%d failure(s)" % len(FAILS))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
