#!/usr/bin/env python3
"""tests/e2e/test_e2e_deploy.py: from a training run to llama.cpp and Ollama files, end to end on
the demo model (issue 20), checked with engines that are not qlora's:

 1. a short `qlora train` of the quickstart recipe; `qlora inspect` shows the recorded base
    identity and prompt format; `qlora eval --answers` on the first N held-out examples;
 2. `qlora export-base --type q8_0`: read by the PyPI `gguf` package without error, with the
    source GGUF's tensor names and shapes (llama.cpp's), every source metadata key kept;
 3. `qlora export RUN --merge` at f16: replayed by tests/tools/gguf_forward.py (numpy, gguf-py's
    decoders, llama.cpp's layout and RoPE), the same greedy answers as qlora's base + adapter,
    token for token; at q8_0 the same exact-match count within one example; at q4_k_m the
    exact match measured and printed, and the tensor types of llama.cpp's Q4_K_M mix;
 4. `qlora export RUN --format ollama --base-gguf BASE`: the Modelfile's TEMPLATE rendered by
    tests/tools/gotmpl.py for each held-out conversation equals the prompt tokens qlora's eval
    fed the model (decoded with the vocabulary, control tokens as text);
 5. loading the adapter on another NF4 store (the merged model) warns naming both models; on
    its exported base it does not.

usage: test_e2e_deploy.py --qlora BIN --source-dir DIR [-n N] [--keep]
QLR_E2E_DEPLOY_RUN=DIR reuses a finished training run instead of training (development).
Exit 77 (skipped) without numpy and the gguf package; 0 only when every check passed."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

FAILS = []
N_CHECKS = [0]


def check(cond, what):
    N_CHECKS[0] += 1
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def run(cmd, timeout=900):
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    print("[%.1fs] %s -> %d" % (time.time() - t, " ".join(os.path.basename(c) if i == 0 else c
                                                          for i, c in enumerate(cmd[:4])), p.returncode), flush=True)
    if p.returncode != 0:
        print(p.stdout.decode(errors="replace")[-2000:], p.stderr.decode(errors="replace")[-3000:])
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("-n", type=int, default=3, help="held-out examples to evaluate and replay")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    t_start = time.time()
    try:
        import numpy  # noqa: F401
        import gguf
    except Exception as e:  # noqa: BLE001
        print("skipped: numpy / gguf not importable (%s); scripts/setup.sh installs them" % e)
        return 77
    sys.path.insert(0, os.path.join(a.source_dir, "tests", "tools"))
    import gguf_forward
    import gotmpl
    model = os.environ.get("QLR_DEMO_MODEL") or os.path.join(a.source_dir, ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(model):
        print("demo model %s not found: run scripts/setup.sh (or set QLR_DEMO_MODEL)" % model)
        return 1
    recipe = os.path.join(a.source_dir, "recipes/smollm2-quickstart.yaml")
    work = tempfile.mkdtemp(prefix="qlr_e2e_deploy_")
    q = a.qlora

    # 1. a run, what it records, and qlora's own answers
    run_dir = os.environ.get("QLR_E2E_DEPLOY_RUN") or os.path.join(work, "run")
    if not os.environ.get("QLR_E2E_DEPLOY_RUN"):
        p = run([q, "train", recipe, "--set", "base_model=" + model, "--set", "output_dir=" + run_dir,
                 "--set", "max_steps=8", "--set", "eval_steps=0", "--set", "save_steps=0", "-q"])
        if not check(p.returncode == 0, "qlora train failed"):
            return 1
    p = run([q, "inspect", run_dir])
    out = p.stdout.decode()
    check(p.returncode == 0 and "prompt format:  chatml" in out, "inspect of the run: no prompt format chatml")
    m = re.search(r"trained on:\s+(\S+) \(nf4 ([0-9a-f]{16})\)", out)
    check(m and m.group(1) == os.path.basename(model), "inspect of the run: no base identity (%s)" % out[-400:])
    base_hash = m.group(2) if m else ""
    check("SmolLM" in out, "inspect of the run: the default system message is not shown")
    answers = os.path.join(work, "answers.jsonl")
    p = run([q, "eval", recipe, "--set", "base_model=" + model, "--set", "output_dir=" + run_dir, "--adapter-only",
             "-n", str(a.n), "--answers", answers, "-q"])
    if not check(p.returncode == 0, "qlora eval failed"):
        return 1
    rows = [json.loads(l) for l in open(answers) if l.strip()]
    check(len(rows) == a.n and all("prompt_ids" in r and "answer_ids" in r for r in rows),
          "answers: %d rows with tokens, expected %d" % (len(rows), a.n))
    q_exact = sum(r["exact"] for r in rows)
    print("qlora (NF4 base + adapter): exact %d/%d" % (q_exact, len(rows)))

    # 2. the base GGUF as llama.cpp reads it
    base = os.path.join(work, "base-q8_0.gguf")
    p = run([q, "export-base", "-m", model, "--type", "q8_0", "-o", base, "-q"])
    check(p.returncode == 0, "export-base failed")
    src, exp = gguf.GGUFReader(model), gguf.GGUFReader(base)
    check([(t.name, list(t.shape)) for t in src.tensors] == [(t.name, list(t.shape)) for t in exp.tensors],
          "export-base: tensor names/shapes differ from the source GGUF's")
    lost = [k for k in src.fields if k not in exp.fields]
    check(not lost, "export-base: metadata keys lost: %s" % lost[:5])
    check(gguf_forward.field(exp, "qlora.nf4.hash") == base_hash,
          "export-base: qlora.nf4.hash %s, the adapter records %s" % (gguf_forward.field(exp, "qlora.nf4.hash"), base_hash))
    check(gguf_forward.field(exp, "general.file_type") == 7, "export-base q8_0: general.file_type")

    # 3. merged models replayed by the numpy engine (q4_k_m: its layout here, its exact match in
    # the measurement the README reports: replaying it costs more than CI's budget)
    results = {}
    for t in ("f16", "q8_0", "q4_k_m"):
        path = os.path.join(work, "merged-%s.gguf" % t)
        p = run([q, "export", run_dir, "--format", "gguf", "--merge", "--type", t, "-o", path, "-q"])
        if not check(p.returncode == 0, "export --merge --type %s failed" % t):
            continue
        if t == "q4_k_m":
            types = {x.name: x.tensor_type.name for x in gguf.GGUFReader(path).tensors}
            want = {"blk.0.attn_v.weight": "Q8_0", "blk.4.attn_v.weight": "Q5_0", "blk.5.attn_v.weight": "Q8_0",
                    "blk.0.ffn_down.weight": "Q6_K", "blk.4.ffn_down.weight": "Q4_K", "token_embd.weight": "Q8_0",
                    "blk.4.attn_q.weight": "Q5_0", "blk.4.attn_norm.weight": "F32"}
            check(all(types.get(k) == v for k, v in want.items()),
                  "q4_k_m: tensor types are not llama.cpp's mix for this model: %s" % {k: types.get(k) for k in want})
            continue
        t0 = time.time()
        mdl = gguf_forward.Model(path)
        same = exact = ties = 0
        for r in rows:
            info = {}
            s, e, text = gguf_forward.replay(mdl, r, info)
            same += s
            exact += e
            # f16 rounds the merged weights (2^-11): an argmax may flip where two tokens tie to
            # within 0.02 logits (measured: 0.0024 on an undertrained adapter); not further
            ties += (not s) and info["gap"] < 0.02
        results[t] = (same, exact, ties)
        print("[%.1fs] merged %s (numpy engine): same answers %d/%d (%d more diverge at a near tie), exact %d/%d "
              "(qlora %d/%d)" % (time.time() - t0, t, same, len(rows), ties, exact, len(rows), q_exact, len(rows)),
              flush=True)
        del mdl
    if "f16" in results:
        check(results["f16"][0] + results["f16"][2] == len(rows), "merged f16: %d of %d answers differ from base + "
              "adapter" % (len(rows) - results["f16"][0] - results["f16"][2], len(rows)))
    if "q8_0" in results:
        check(abs(results["q8_0"][1] - q_exact) <= 1, "merged q8_0: exact %d vs qlora's %d" % (results["q8_0"][1], q_exact))

    # 4. the Ollama folder: its TEMPLATE renders the prompts qlora's eval tokenized
    odir = os.path.join(work, "ollama")
    p = run([q, "export", run_dir, "--format", "ollama", "--base-gguf", base, "-o", odir])
    check(p.returncode == 0 and "ollama create ollama -f" in p.stdout.decode(), "export --format ollama")
    mf = open(os.path.join(odir, "Modelfile")).read() if p.returncode == 0 else ""
    check(re.search(r"^FROM \./base\.gguf$", mf, re.M) and re.search(r"^ADAPTER \./adapter\.gguf$", mf, re.M),
          "Modelfile: FROM/ADAPTER lines")
    check(os.path.realpath(os.path.join(odir, "base.gguf")) == os.path.realpath(base), "base.gguf is not the link")
    check('PARAMETER stop "<|im_end|>"' in mf, "Modelfile: no stop <|im_end|>")
    tm = re.search(r'TEMPLATE """(.*?)"""', mf, re.S)
    if check(tm is not None, "Modelfile: no TEMPLATE"):
        vocab = gguf_forward.Model.__new__(gguf_forward.Model)
        vocab.tokens = gguf_forward.str_array(src, "tokenizer.ggml.tokens")
        vocab.token_type = gguf_forward.num_array(src, "tokenizer.ggml.token_type")
        lines = {}
        for r in rows:
            path = r["source"]
            if path not in lines:
                lines[path] = open(path, encoding="utf-8").read().split("\n")
            conv = json.loads(lines[path][r["line"] - 1])["messages"]
            last = max(i for i, mm in enumerate(conv) if mm["role"] == "assistant")
            msgs = [(mm["role"], mm["content"]) for mm in conv[:last]]
            got = gotmpl.render_ollama(tm.group(1), msgs)
            want = vocab.text_of(r["prompt_ids"])
            check(got == want, "TEMPLATE render of line %s differs from qlora's prompt:\n  %r\n  %r" % (
                r["line"], got[:300], want[:300]))

    # 5. the base identity: a warning on another NF4 store, none on the exported base
    for mpath, warn in ((os.path.join(work, "merged-f16.gguf"), True), (base, False)):
        p = run([q, "generate", "-m", mpath, "--adapter", run_dir, "-p", "Hi", "-n", "1"])
        err = p.stderr.decode(errors="replace")
        said = "this adapter was trained on " + os.path.basename(model) in err
        check(p.returncode == 0 and said == warn and (not warn or os.path.basename(mpath) in err),
              "generate -m %s --adapter: warning %s, expected %s" % (os.path.basename(mpath), said, warn))

    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print("work folder kept: " + work)
    print("%d passed, %d failed (%.0fs)" % (N_CHECKS[0] - len(FAILS), len(FAILS), time.time() - t_start))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
