#!/usr/bin/env python3
"""tests/e2e/test_e2e_quickstart.py: a new user's first hour, end to end on the demo model.

1. The README cannot drift from the program:
   - every row of its Commands table is a command of `qlora --help`, and every command there has a
     row; each row's `--help` works and knows every flag the row shows; for the training flow
     (inspect, plan, data, train, eval, plot, export) every flag of `--help` is in the row
     (-h, -q, -t excepted);
   - the `qlora ...` lines of its Training block run as written (in a scratch folder laid out like
     the repository: recipes/, data/, .cache/models/), each with a few `--set` of this test appended
     to keep it short (a 24-example dataset, 1-3 steps), its Serving command with `--port 0`;
     a README line this test does not know, or a known one that is gone, fails the test;
   - no file of the tree points into ../shared (outside the repository: a clone does not have it).
2. The quickstart flow on a tiny recipe (test_datasets = the first lines of data/quickstart/val.jsonl,
   report_to: tensorboard, eval every step), with stderr not a terminal:
   - `qlora inspect` is a summary (the full tensor list behind --all), `qlora data preview` on
     alpaca data says no chat template is applied, `qlora --version` gives the build;
   - train: no progress line (label and count) printed twice; every path printed exists; the
     closing summary names loss.svg, a well-formed SVG whose train_loss / eval_loss polylines have
     a point per logged step / eval step; the hint names a command that works (a path when qlora is
     not on PATH, `qlora` when scripts/link_qlora.sh's link is);
   - resume from an older checkpoint (the newest one's manifest removed): TensorBoard, read back
     with the `tensorboard` package, has every step once (the restart event drops the steps the
     first run logged past that checkpoint) with the values of metrics.jsonl; the records' crc32c
     are checked with tensorboard's own function;
   - eval uses the test_datasets file (its answers name it as their source);
   - plot and export write what they say.
Exit status 0 only when every check passed.
"""
import argparse
import glob
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET

FAILS = []
N_CHECKS = [0]
SVG = "{http://www.w3.org/2000/svg}"
# options every command has that the README's table need not repeat
COMMON_FLAGS = {"-h", "--help", "-q", "--quiet", "-t", "--threads"}
SHARED = "../" + "shared/"  # (spelled so that this file does not hold it)
TRAINING_FLOW = {"inspect", "plan", "data", "train", "eval", "plot", "export"}


def check(cond, what):
    N_CHECKS[0] += 1
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def run(argv, cwd=None, env=None, timeout=600):
    t = time.time()
    p = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout)
    print("[%.1fs] %s -> %d" % (time.time() - t, " ".join(argv[:3]), p.returncode), flush=True)
    if p.returncode != 0:
        print(p.stdout[-3000:] + p.stderr[-3000:], flush=True)
    return p


# ------------------------------------------------------------------ README parsing

def readme_section(text, title):
    m = re.search(r"^## " + re.escape(title) + r"\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return m.group(1) if m else ""


def code_lines(section):
    """The `qlora ...` commands of the ```sh blocks of a section (continuations joined, comments cut)."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("qlora "):
                out.append(line)
    return out


def table_rows(section):
    """(command words, synopsis) of each `| `qlora ...` | ... |` row."""
    rows = []
    for line in section.splitlines():
        m = re.match(r"^\| `(qlora [^`]*)` \|", line)
        if m:
            syn = m.group(1).replace("\\|", "|")
            words = syn.split()
            name = words[1]
            if name in ("data", "bench") and len(words) > 2:
                name = name + " " + words[2]
            rows.append((name, syn))
    return rows


def flags_of(text):
    return set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text))


def help_flags(help_text):
    """The options of a --help text, as groups of aliases: each flag of the usage line, and each
    option line ("  -o, --output PATH   ...", "  --verbose, -v ...")."""
    groups = []
    for line in help_text.splitlines():
        if line.startswith("usage:"):
            groups += [{f} for f in flags_of(line)]
        m = re.match(r"^\s+((?:--?[a-zA-Z][\w-]*)(?:,\s*--?[a-zA-Z][\w-]*)*)", line)
        if m:
            groups.append(set(re.findall(r"--?[a-zA-Z][\w-]*", m.group(1))))
    return groups


def check_readme_table(qlora, readme):
    rows = table_rows(readme_section(readme, "Commands"))
    check(len(rows) >= 10, "the README's command table has %d rows" % len(rows))
    top = run([qlora, "--help"]).stdout
    commands = re.findall(r"^  ([a-z][\w-]*) {2,}", top, re.M)
    check(len(commands) >= 10, "qlora --help lists %d commands" % len(commands))
    names = {r[0].split()[0] for r in rows}
    for c in commands:
        check(c in names, "qlora %s (in qlora --help) has no row in the README's command table" % c)
    for name, syn in rows:
        p = run(["%s" % qlora] + name.split()[:1] + ["--help"])
        if not check(p.returncode == 0, "qlora %s --help: exit %d" % (name, p.returncode)):
            continue
        groups = help_flags(p.stdout)
        have = set().union(*groups) if groups else set()
        shown = flags_of(syn)
        for f in sorted(shown - have):
            check(False, "README row `%s`: %s is not an option of qlora %s --help" % (syn, f, name))
        if name.split()[0] in TRAINING_FLOW:
            for g in groups:
                if not (g & shown) and not (g & COMMON_FLAGS):
                    check(False, "qlora %s --help has %s, which its README row `%s` does not show" %
                          (name, "/".join(sorted(g)), syn))


# ------------------------------------------------------------------ output checks

PROGRESS = re.compile(r"^(?P<label>[\w ().-]+): (?P<count>\d+(?:/\d+)? \w+) \| ")


def no_duplicate_progress(text, what):
    seen = set()
    lines = [l for l in text.splitlines() if PROGRESS.match(l)]
    for l in lines:
        m = PROGRESS.match(l)
        key = (m.group("label"), m.group("count"))
        check(key not in seen, "%s: the progress line '%s: %s' is printed twice" % (what, key[0], key[1]))
        seen.add(key)
    return len(lines)


PATH_TOKEN = re.compile(r"^(?:/|\.{1,2}/)?[\w.+-]+(?:/[\w.+-]+)+/?$")


def printed_paths(text):
    """Tokens of the summary and hint lines that are file paths (not counts like 1/3 or rates)."""
    out = []
    for line in text.splitlines():
        # model answers are not paths; the checkpoint a run resumed from may be rotated out later
        # in the run by save_total_limit (by design)
        if PROGRESS.match(line) or re.match(r"^\s+(expected|got):", line) or line.startswith("resumed from "):
            continue
        for tok in line.split():
            tok = tok.strip(",;:()'\"")
            if not PATH_TOKEN.match(tok) or re.match(r"^[\d./]+$", tok) or tok.endswith("/s"):
                continue
            out.append(tok)
    return out


def paths_exist(text, cwd, what):
    paths = printed_paths(text)
    for pth in paths:
        check(os.path.exists(os.path.join(cwd, pth)), "%s printed %s, which does not exist" % (what, pth))
    return paths


def read_metrics(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def check_svg(path, metrics):
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        check(False, "%s is not well-formed XML: %s" % (path, e))
        return
    check(root.tag == SVG + "svg", "%s: root element %s" % (path, root.tag))
    lines = {el.get("id"): el for el in root.iter(SVG + "polyline")}
    n_eval = sum(1 for m in metrics if "eval_loss" in m)
    for sid, want in (("train_loss", len(metrics)), ("eval_loss", n_eval), ("learning_rate", len(metrics))):
        el = lines.get(sid)
        got = len(el.get("points").split()) if el is not None else -1
        check(got == want, "%s: polyline %s has %d points, metrics.jsonl %d" % (path, sid, got, want))


def check_tensorboard(runs, metrics):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    files = sorted(glob.glob(os.path.join(runs, "events.out.tfevents.*")))
    check(len(files) == 2, "%s: %d event files (a run and its resume)" % (runs, len(files)))
    for fn in files:  # the TFRecord framing, with tensorboard's crc32c
        data = open(fn, "rb").read()
        off, n = 0, 0
        while off < len(data):
            (length,) = struct.unpack_from("<Q", data, off)
            (hcrc,) = struct.unpack_from("<I", data, off + 8)
            body = data[off + 12: off + 12 + length]
            (dcrc,) = struct.unpack_from("<I", data, off + 12 + length)
            check(hcrc == masked_crc32c(data[off: off + 8]) and dcrc == masked_crc32c(body),
                  "%s: record %d: crc32c mismatch" % (fn, n))
            off += 16 + length
            n += 1
        check(off == len(data) and n >= 2, "%s: %d records, %d of %d bytes" % (fn, n, off, len(data)))
    ea = EventAccumulator(runs, size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags().get("scalars", [])
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"):
        check(tag in tags, "tensorboard: no scalar %s (tags %s)" % (tag, tags))
    want = {"train/loss": [(m["step"], m["loss"]) for m in metrics],
            "train/learning_rate": [(m["step"], m["lr"]) for m in metrics],
            "eval/loss": [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]}
    for tag, pts in want.items():
        if tag not in tags:
            continue
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        check([s for s, _ in got] == [s for s, _ in pts],
              "tensorboard %s steps %s, metrics.jsonl %s" % (tag, [s for s, _ in got], [s for s, _ in pts]))
        for (s, v), (_, w) in zip(got, pts):
            check(abs(v - w) <= 1e-6 * max(abs(w), 1e-30), "tensorboard %s step %d: %r vs %r" % (tag, s, v, w))


# ------------------------------------------------------------------ the flow

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", required=True)
    ap.add_argument("--source-dir", required=True)
    a = ap.parse_args()
    qlora = os.path.realpath(a.qlora)
    src = os.path.realpath(a.source_dir)
    model = os.environ.get("QLR_DEMO_MODEL") or os.path.join(
        os.environ.get("QLR_CACHE", os.path.join(src, ".cache")), "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(model):
        print("FAIL: demo model %s not found: run scripts/setup.sh (or set QLR_DEMO_MODEL)" % model)
        return 1
    readme = open(os.path.join(src, "README.md")).read()
    tmp = tempfile.mkdtemp(prefix="qlr_quickstart_")
    try:
        return flow(qlora, src, model, readme, tmp)
    finally:
        if not FAILS:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("scratch folder kept: " + tmp)


def flow(qlora, src, model, readme, tmp):
    # --- the README against the program
    check_readme_table(qlora, readme)
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d.startswith("build") or d in ("outputs", "__pycache__"))]
        for fn in files:
            if fn.endswith((".c", ".h", ".cu", ".cuh", ".md", ".py", ".sh", ".txt", ".yaml", ".cmake")):
                p = os.path.join(root, fn)
                with open(p, errors="replace") as f:
                    check(SHARED not in f.read(), "%s points at %s, which a clone does not have" %
                          (os.path.relpath(p, src), SHARED))

    v = run([qlora, "--version"]).stdout
    check(re.match(r"^qlora \d+\.\d+\.\d+\nbuild: backends cpu", v) is not None, "qlora --version: %r" % v)

    # --- a scratch folder laid out like the repository
    ws = os.path.join(tmp, "ws")
    os.makedirs(os.path.join(ws, ".cache", "models"))
    os.makedirs(os.path.join(ws, "recipes"))
    os.symlink(os.path.join(src, "recipes", "smollm2-quickstart.yaml"), os.path.join(ws, "recipes", "smollm2-quickstart.yaml"))
    os.symlink(os.path.join(src, "data"), os.path.join(ws, "data"))
    os.symlink(os.path.realpath(model), os.path.join(ws, ".cache", "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    tiny = os.path.join(tmp, "tiny")
    os.makedirs(tiny)
    with open(os.path.join(src, "data", "quickstart", "train.jsonl")) as f:
        train_lines = [next(f) for _ in range(24)]
    with open(os.path.join(src, "data", "quickstart", "val.jsonl")) as f:
        val_lines = [next(f) for _ in range(3)]
    open(os.path.join(tiny, "train.jsonl"), "w").writelines(train_lines)
    val_path = os.path.join(tiny, "val.jsonl")
    open(val_path, "w").writelines(val_lines)

    # qlora on PATH the way setup puts it there (scripts/link_qlora.sh, HOME in the scratch folder)
    home = os.path.join(tmp, "home")
    env_plain = dict(os.environ, HOME=home, PATH="/usr/bin:/bin", QLR_NO_TTY="1")
    p = run([os.path.join(src, "scripts", "link_qlora.sh"), qlora], env=env_plain)
    link_dir = os.path.join(home, ".local", "bin")
    check(p.returncode == 0 and os.path.realpath(os.path.join(link_dir, "qlora")) == qlora,
          "link_qlora.sh did not link %s/qlora: %s" % (link_dir, p.stdout + p.stderr))
    check("is not on PATH" in p.stdout and ("run it as: " + qlora) in p.stdout,
          "link_qlora.sh without the folder on PATH: %s" % p.stdout)
    env_path = dict(env_plain, PATH=link_dir + ":/usr/bin:/bin")
    p = run([os.path.join(src, "scripts", "link_qlora.sh"), qlora], env=env_path)
    check("run it as: qlora " in p.stdout, "link_qlora.sh with the folder on PATH: %s" % p.stdout)
    other = os.path.join(tmp, "home2", ".local", "bin")
    os.makedirs(other)
    os.symlink("/bin/true", os.path.join(other, "qlora"))
    p = run([os.path.join(src, "scripts", "link_qlora.sh"), qlora], env=dict(env_plain, HOME=os.path.join(tmp, "home2")))
    check("left alone" in p.stdout and os.path.realpath(os.path.join(other, "qlora")) == os.path.realpath("/bin/true"),
          "link_qlora.sh replaced another qlora: %s" % p.stdout)

    # --- inspect: a summary, the tensors behind --all
    p = run(["qlora", "inspect", ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"], cwd=ws, env=env_path)
    n_lines = len(p.stdout.splitlines())
    check(p.returncode == 0 and n_lines < 80 and "more, of blocks 1..29 (--all lists every tensor)" in p.stdout
          and "blk.29." not in p.stdout, "qlora inspect: %d lines:\n%s" % (n_lines, p.stdout[-1500:]))
    p = run(["qlora", "inspect", ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf", "--all"], cwd=ws, env=env_path)
    check(p.returncode == 0 and "blk.29.ffn_down.weight" in p.stdout, "qlora inspect --all lists every tensor")

    # --- data preview of alpaca data names what formats it
    alpaca = os.path.join(tiny, "alpaca.jsonl")
    with open(alpaca, "w") as f:
        f.write(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    p = run(["qlora", "data", "preview", "recipes/smollm2-quickstart.yaml", "--set",
             "datasets=[{path: %s, type: alpaca}]" % alpaca, "--set", "val_set_size=0", "-n", "1"], cwd=ws, env=env_path)
    check(p.returncode == 0 and re.search(r"datasets\.0 \S+alpaca\.jsonl \(alpaca\): Alpaca prompt .*no chat template",
                                          p.stdout) is not None and "chat template chatml" not in p.stdout,
          "data preview on alpaca data:\n" + p.stdout[:1500])
    p = run(["qlora", "plan", "recipes/smollm2-quickstart.yaml"], cwd=ws, env=env_path)
    check(p.returncode == 0 and "total" in p.stdout, "qlora plan")

    # --- the README's Training block, as written, plus this test's --set
    tiny_run = ["--set", "datasets.0.path=%s" % os.path.join(tiny, "train.jsonl"), "--set", "val_set_size=0",
                "--set", "test_datasets=[{path: %s, type: chat}]" % val_path, "--set", "micro_batch_size=1",
                "--set", "eval_steps=1", "--set", "save_steps=1", "--set", "report_to=tensorboard"]
    rules = [  # (pattern of the README line, what this test appends, key)
        (r"^qlora train recipes/smollm2-quickstart\.yaml$", ["--set", "max_steps=2", "--set", "lora_r=4"] + tiny_run, "fresh"),
        (r"^qlora train recipes/smollm2-quickstart\.yaml --set max_steps=100 --set lora_r=32$",
         ["--set", "max_steps=1", "--set", "output_dir=../outputs/r32"] + tiny_run, "override"),
        (r"^qlora train recipes/smollm2-quickstart\.yaml --resume$", ["--set", "max_steps=3", "--set", "lora_r=4"] + tiny_run,
         "resume"),
        (r"^qlora eval +recipes/smollm2-quickstart\.yaml$", ["-n", "1", "--answers", "answers.jsonl"] + tiny_run, "eval"),
        (r"^qlora plot +outputs/smollm2-quickstart$", [], "plot"),
        (r"^qlora export outputs/smollm2-quickstart --format gguf -o adapter\.gguf$", [], "export"),
    ]
    lines = code_lines(readme_section(readme, "Training"))
    plan = {}
    for line in lines:
        bare = re.sub(r"\s*\[[^\]]*\]", "", line)  # optional parts left out
        hit = [r for r in rules if re.match(r[0], bare)]
        if check(len(hit) == 1, "README Training command not covered by this test: %s" % line):
            plan[hit[0][2]] = shlex.split(bare) + hit[0][1]
    for r in rules:
        check(r[2] in plan, "this test expects a README Training command like /%s/; it is gone" % r[0])
    if FAILS:
        return 1
    run_dir = os.path.join(ws, "outputs", "smollm2-quickstart")

    # fresh run, qlora not on PATH: the hint names the binary's path
    argv = [qlora] + plan["fresh"][1:]
    p = run(argv, cwd=ws, env=env_plain)
    out = p.stdout + p.stderr
    check(p.returncode == 0, "README train: exit %d" % p.returncode)
    check(no_duplicate_progress(p.stderr, "train") >= 3, "train printed no progress lines:\n" + p.stderr)
    paths_exist(out, ws, "train")
    m = re.search(r"^  next: (\S+) eval recipes/smollm2-quickstart\.yaml$", p.stderr, re.M)
    check(m is not None and m.group(1) != "qlora" and os.path.exists(os.path.join(ws, m.group(1))),
          "train's hint without qlora on PATH: %s" % (m.group(0) if m else p.stderr[-800:]))
    m = re.search(r"^  plot: (\S+) \(", p.stderr, re.M)
    check(m is not None and m.group(1) == "outputs/smollm2-quickstart/loss.svg",
          "the closing summary names the plot: %s" % p.stderr[-1200:])
    check("split: 24 train, 3 validation examples (test_datasets)" in p.stderr, "train used test_datasets:\n" + p.stderr)
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    check([x["step"] for x in metrics] == [1, 2] and all("eval_loss" in x for x in metrics), "metrics %s" % metrics)
    check_svg(os.path.join(run_dir, "loss.svg"), metrics)

    # the README's override line, qlora on PATH (the link): the hint says qlora
    p = run(plan["override"], cwd=ws, env=env_path)
    check(p.returncode == 0 and re.search(r"^  next: qlora eval recipes/smollm2-quickstart\.yaml$", p.stderr, re.M),
          "README train --set max_steps=100 --set lora_r=32: exit %d, hint:\n%s" % (p.returncode, p.stderr[-800:]))
    paths_exist(p.stdout + p.stderr, ws, "train (override)")
    cfg = json.load(open(os.path.join(ws, "outputs", "r32", "adapter", "adapter_config.json")))
    check(cfg.get("r") == 32, "README's --set lora_r=32 gave r %s" % cfg.get("r"))

    # resume from checkpoint-1: the newest checkpoint's manifest removed, as after a crash
    os.remove(os.path.join(run_dir, "checkpoint-2", "manifest.json"))
    first = {x["step"]: x for x in metrics}
    p = run(plan["resume"], cwd=ws, env=env_path)
    check(p.returncode == 0 and "done: 3 steps" in p.stderr and "(resumed at step 1)" in p.stderr,
          "README train --resume: exit %d\n%s" % (p.returncode, p.stderr[-1500:]))
    no_duplicate_progress(p.stderr, "train --resume")
    paths_exist(p.stdout + p.stderr, ws, "train --resume")
    metrics = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    check([x["step"] for x in metrics] == [1, 2, 3], "metrics after the resume: %s" % [x["step"] for x in metrics])
    check(metrics[0]["loss"] == first[1]["loss"], "step 1 kept across the resume")
    check_svg(os.path.join(run_dir, "loss.svg"), metrics)
    check_tensorboard(os.path.join(run_dir, "runs"), metrics)

    # eval on the test_datasets file
    p = run(plan["eval"], cwd=ws, env=env_path)
    check(p.returncode == 0, "README eval: exit %d" % p.returncode)
    check(("eval: 1 validation examples (test_datasets: %s)" % val_path) in p.stdout, "eval's data:\n" + p.stdout)
    no_duplicate_progress(p.stderr, "eval")
    for label in ("loss (base)", "loss (adapter)", "exact match (base)", "exact match (adapter)"):
        check(re.search("^" + re.escape(label) + r": 1/1 ", p.stderr, re.M) is not None,
              "eval: no progress bar '%s':\n%s" % (label, p.stderr))
    paths_exist(p.stdout + p.stderr, ws, "eval")
    answers = read_metrics(os.path.join(ws, "answers.jsonl"))
    check(len(answers) == 2 and all(x["source"] == val_path for x in answers),
          "eval's answers come from %s" % [x.get("source") for x in answers])

    p = run(plan["plot"], cwd=ws, env=env_path)
    check(p.returncode == 0 and p.stdout.strip() == "plot: outputs/smollm2-quickstart/loss.svg", "README plot: " + p.stdout)
    paths_exist(p.stdout, ws, "plot")
    p = run(plan["export"], cwd=ws, env=env_path)
    check(p.returncode == 0 and os.path.exists(os.path.join(ws, "adapter.gguf")), "README export: exit %d" % p.returncode)
    p = run(["qlora", "inspect", "adapter.gguf"], cwd=ws, env=env_path)
    check(p.returncode == 0 and "well-formed GGUF" in p.stdout, "the exported adapter.gguf is valid")

    # --- the README's Serving command, on a free port
    serve = code_lines(readme_section(readme, "Serving"))
    check(len(serve) == 1 and serve[0].startswith("qlora serve "), "README Serving commands: %s" % serve)
    if serve:
        proc = subprocess.Popen(shlex.split(serve[0]) + ["--port", "0"], cwd=ws, env=env_path, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        port = None
        deadline = time.time() + 120
        while time.time() < deadline and port is None:
            line = proc.stdout.readline()
            if not line:
                break
            mm = re.search(r"listening http://[^:]+:(\d+)/v1", line)
            port = int(mm.group(1)) if mm else None
        if check(port is not None, "README serve did not start"):
            with urllib.request.urlopen("http://127.0.0.1:%d/v1/models" % port, timeout=30) as r:
                body = json.load(r)
            check(any(x.get("id") == "quick" for x in body.get("data", [])), "serve lists the adapter quick: %s" % body)
        proc.send_signal(signal.SIGTERM)
        check(proc.wait(timeout=60) == 0, "README serve: exit after SIGTERM")

    print("%d checks, %d failed" % (N_CHECKS[0], len(FAILS)))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
