#!/usr/bin/env python3
"""scripts/serve_load.py: concurrent load against `qlora serve` (OpenAI /v1/completions).

N requests start at once, each asking for exactly N_PREDICT tokens (ignore_eos), greedy; the
adapter of request i is names[i % len(names)] ("base" = the base model, sent as its model name).
Prints one JSON line: wall time, generated tokens (from each answer's usage), aggregate tokens/s,
mean and worst request time, and the engine's batch figures from /metrics.

usage: serve_load.py URL N N_PREDICT NAME[,NAME...]
"""
import json
import sys
import threading
import time
import urllib.request


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as r:
        return json.loads(r.read())


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    url, n, npred, names = sys.argv[1].rstrip("/"), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=60).read())
    base = models["data"][0]["id"]
    results, errors = [None] * n, []

    def one(i):
        name = names[i % len(names)]
        body = {"model": base if name == "base" else name, "max_tokens": npred, "ignore_eos": True,
                "temperature": 0, "prompt": f"Request {i}: write a long story about a lighthouse keeper."}
        t = time.perf_counter()
        try:
            j = post(url + "/v1/completions", body)
            results[i] = (j["usage"]["completion_tokens"], time.perf_counter() - t)
        except Exception as e:  # reported, and the run counts as failed
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for r in results if r]
    tok = sum(r[0] for r in done)
    metrics = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    batch = [l for l in metrics.splitlines() if l.startswith(("qlora_batch", "qlora_engine_steps"))]
    print(json.dumps({"adapters": names, "requests": n, "n_predict": npred, "wall_s": round(wall, 3),
                      "tokens": tok, "agg_tok_s": round(tok / wall, 1),
                      "mean_req_s": round(sum(r[1] for r in done) / max(1, len(done)), 3),
                      "max_req_s": round(max((r[1] for r in done), default=0), 3),
                      "errors": errors[:5], "n_errors": len(errors), "metrics": batch}), flush=True)
    sys.exit(1 if errors or tok != n * npred else 0)


if __name__ == "__main__":
    main()
