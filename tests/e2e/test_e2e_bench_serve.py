#!/usr/bin/env python3
"""tests/e2e/test_e2e_bench_serve.py: `qlora bench serve` at toy sizes on the CPU (SmolLM2-135M
shapes cut to 2 layers, random NF4 weights, no download): every scenario runs and the JSON is sane
(each figure present, positive and consistent with the others), and bad options are refused with
a message. A smoke test of the benchmark's code, not a measurement."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

FAILS = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILS.append(what)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "serve.json")
        cmd = [a.qlora, "bench", "serve", "--device", "cpu", "--shape", "smollm2-135m",
               "--layers", "2", "--streams", "4", "--tokens", "6", "--prompt", "8",
               "--registered", "24", "--files", "3", "--requests", "10", "--tmp", tmp, "--out", out]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        print(p.stderr[-3000:])
        check(p.returncode == 0, "bench serve exits 0")
        if p.returncode != 0:
            return 1
        j = json.load(open(out))
        check(j["benchmark"] == "serve" and j["device"] == "cpu" and j["streams"] == 4,
              "header: benchmark, device, streams")
        check(j["adapter_bytes_bf16"] > 0, "adapter_bytes_bf16 > 0")
        for key in ("base", "adapters_8", "adapters_distinct", "adapters_mixed_ranks"):
            s = j.get(key)
            check(s is not None, key + " present")
            if s is None:
                continue
            check(s["tokens_per_s"] > 0 and s["window_s"] > 0, key + ": tokens/s and window > 0")
            check(0 < s["ratio_to_base"] < 5, key + ": ratio_to_base in (0, 5)")
            check(0 < s["step_ms"] <= s["max_token_gap_ms"], key + ": 0 < step_ms <= max gap")
        check(j["base"]["ratio_to_base"] == 1.0, "base ratio is 1")
        at = j.get("attach", {})
        check(at.get("attach_ms", 0) > 0 and at["file_load_ms"] <= at["attach_ms"],
              "attach: attach_ms > 0 and >= file_load_ms")
        check(at.get("streams_outlived_attach") is True, "attach: the streams ran through the attach")
        check(at.get("max_stall_ms", 0) > 0, "attach: a stall figure")
        m = j.get("many_adapters", {})
        check(m.get("registered") == 24 and m.get("files") == 3 and m.get("requests") == 10,
              "many: registered, files, requests as asked")
        check(0 < m.get("ttft_ms_p50", 0) <= m["ttft_ms_p99"] <= m["ttft_ms_max"] + 1e-6,
              "many: 0 < TTFT p50 <= p99 <= max")
        check(1 <= m.get("file_loads", 0) <= 10, "many: 1..10 file loads for 10 requests")
        check(m.get("tokens_per_s", 0) > 0, "many: tokens/s > 0")
        check(not [f for f in os.listdir(tmp) if f.startswith("qlr-bench-serve")],
              "the adapter files' folder is removed")
        # one scenario only, and refusals
        p = subprocess.run(cmd[:-2] + ["--scenarios", "base"], capture_output=True, text=True, timeout=600)
        j = json.loads(p.stdout) if p.returncode == 0 else {}
        check("base" in j and "attach" not in j and "many_adapters" not in j, "--scenarios base runs only base")
        p = subprocess.run([a.qlora, "bench", "serve", "--scenarios", "nope", "--device", "cpu"],
                           capture_output=True, text=True, timeout=60)
        check(p.returncode != 0 and "unknown scenario 'nope'" in p.stderr, "an unknown scenario is refused")
        p = subprocess.run([a.qlora, "bench", "serve", "--streams", "x"], capture_output=True, text=True, timeout=60)
        check(p.returncode == 2 and "--streams" in p.stderr, "a bad count is a usage error")
        p = subprocess.run([a.qlora, "bench", "serve", "--shape", "gpt9", "--device", "cpu"],
                           capture_output=True, text=True, timeout=60)
        check(p.returncode != 0 and "unknown shape 'gpt9'" in p.stderr, "an unknown shape is refused")
    print("%d failure(s)" % len(FAILS))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
