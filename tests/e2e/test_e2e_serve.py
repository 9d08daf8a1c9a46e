#!/usr/bin/env python3
"""tests/e2e/test_e2e_serve.py: `qlora serve` end to end on the demo model, driven with curl, the
standard library's http.client and the official `openai` package.

1. An adapter is trained for 2 steps with the quickstart recipe (or taken from
   $QLR_E2E_SERVE_ADAPTER, a GGUF LoRA, to iterate faster); a PEFT copy, a corrupt file, a
   symlink out of the adapter folder and a file outside it are laid out.
2. `qlora generate --chat` gives the reference greedy answers with and without the adapter, and
   `qlora generate` the reference continuation of a plain prompt.
3. `qlora serve --port 0 --api-key ... --adapter quick=... --adapter-dir ... --max-running 2
   --max-queue 2` is started and its port read from the summary. Then:
   - /health without a key; /v1/models with no key or a wrong one -> 401, with the key: base +
     adapter with rank and residency;
   - chat with the adapter (openai, by "model"; curl, by "lora" name and id) equals generate
     --adapter's answer; with the base model equals generate's; usage, ids, object fields;
   - streaming (openai with include_usage, curl raw SSE framing): deltas joined equal the answer;
   - /v1/completions equals generate's plain continuation;
   - while a stream of the adapter runs: load a second adapter (PEFT folder, relative path), use
     it, unload the running one: the stream still ends normally; the unloaded name then gives 404;
   - a burst of 10 requests against 2 running + 2 queued gets 429 with Retry-After for some;
   - a client that disconnects, mid-stream or while waiting for a whole answer: its request is
     cancelled and its KV blocks are back (qlora_kv_blocks_used 0, qlora_requests_cancelled_total
     + 1 in /metrics) within a few engine steps;
   - malformed JSON, wrong types, n = 2, two adapters, a 2 MiB body, an unknown model, paths
     outside --adapter-dir (.., symlink, absolute), a corrupt adapter, a wrong method or route:
     each the right 4xx with an OpenAI error object naming the field, and the server keeps
     answering correctly afterwards;
   - SIGTERM while a stream runs: the stream finishes with [DONE], the process exits 0.
4. A second server without --adapter-dir and without a key (context 8192, a 64 MiB KV cache)
   refuses loading by path (403) and a max_tokens over the KV cache (400), serves /metrics in the
   Prometheus text format; SIGINT stops it.
Exit status 0 only when every check passed.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

FAILS = []
N_CHECKS = [0]
MAX_TOKENS = 20
KEY = "e2e-secret-key"
PROMPT = ("Extract the customer's name, city and order number from this message. Answer with JSON only."
          "\n\nre: order #19352\nfrom: hana tanaka\nlocation: nairobi\ni want a refund.")
PLAIN_PROMPT = "The capital of France is"


def check(cond, what):
    N_CHECKS[0] += 1
    if not cond:
        FAILS.append(what)
        print("FAIL: " + what, flush=True)
    return cond


def run(cmd, timeout=600, env=None):
    t = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, env=env)
    print("[%.1fs] %s -> %d" % (time.time() - t, " ".join(cmd[:3]), p.returncode), flush=True)
    if p.returncode != 0:
        print(p.stderr.decode(errors="replace")[-3000:])
    return p


class Server:
    """A `qlora serve` process; its stdout summary is read for the port, stderr kept in a log."""

    def __init__(self, args, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.port = None
        self.summary = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.summary.append(line.rstrip("\n"))
            m = re.search(r"listening http://[^:]+:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            raise RuntimeError("qlora serve did not start:\n" + "\n".join(self.summary) + "\n" +
                               open(log_path).read()[-4000:])
        # keep draining stdout so the server never blocks on a full pipe
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            check(False, "the server did not exit within %ds of signal %d" % (timeout, sig))
        self.log.close()
        return rc


def request(port, method, path, body=None, key=KEY, headers=None, timeout=120):
    """One HTTP request; returns (status, headers dict (lower-case names), body bytes)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = "Bearer " + key
    h.update(headers or {})
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    hdrs = {k.lower(): v for k, v in r.getheaders()}
    c.close()
    return r.status, hdrs, data


def jbody(data):
    try:
        return json.loads(data)
    except ValueError:
        return None


def check_error(status, data, want_status, want_param, what):
    """An OpenAI error object with the status and the field named (want_param None = null)."""
    e = (jbody(data) or {}).get("error")
    ok = check(status == want_status, "%s: status %d, expected %d (%s)" % (what, status, want_status, data[:300]))
    ok = check(isinstance(e, dict) and set(e) == {"message", "type", "param", "code"},
               "%s: not an OpenAI error object: %s" % (what, data[:300])) and ok
    if ok:
        check(e["param"] == want_param, "%s: param %r, expected %r" % (what, e["param"], want_param))
        check(isinstance(e["message"], str) and e["message"], "%s: empty message" % what)
        if want_param:
            check(want_param in e["message"], "%s: message does not name %r: %s" % (what, want_param, e["message"]))
    return e or {}


def metrics(port):
    status, _, data = request(port, "GET", "/metrics")
    check(status == 200, "/metrics status %d" % status)
    out = {}
    for line in data.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def sse_events(raw):
    """The data payloads of an SSE body; checks the framing."""
    text = raw.decode()
    events = [e for e in text.split("\n\n") if e]
    payloads = []
    for e in events:
        check(e.startswith("data: ") and "\n" not in e, "bad SSE event: %r" % e[:200])
        payloads.append(e[6:])
    check(text.endswith("\n\n"), "SSE body does not end with a blank line")
    return payloads


def chat_body(model, stream=False, max_tokens=MAX_TOKENS, **kw):
    b = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
         "temperature": 0}
    if stream:
        b["stream"] = True
    b.update(kw)
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    t_start = time.time()
    model = os.environ.get("QLR_DEMO_MODEL") or os.path.join(a.source_dir, ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(model):
        print("demo model %s not found: run scripts/setup.sh (or set QLR_DEMO_MODEL)" % model)
        return 1
    try:
        import openai
    except ImportError:
        print("the openai package is missing: run scripts/setup.sh (or pip install openai)")
        return 1
    base_name = os.path.basename(model)[:-len(".gguf")]
    work = tempfile.mkdtemp(prefix="qlr_e2e_serve_")
    adir = os.path.join(work, "adapters")
    os.makedirs(adir)

    # 1. the adapter
    pre = os.environ.get("QLR_E2E_SERVE_ADAPTER")
    if pre:
        shutil.copy(pre, os.path.join(adir, "quick.gguf"))
        peft = os.path.join(os.path.dirname(pre), "adapter")
    else:
        run_dir = os.path.join(work, "run")
        p = run([a.qlora, "train", os.path.join(a.source_dir, "recipes/smollm2-quickstart.yaml"),
                 "--set", "base_model=" + model, "--set", "output_dir=" + run_dir, "--set", "max_steps=2",
                 "--set", "warmup_steps=0", "--set", "eval_steps=0", "--set", "save_steps=0",
                 "--set", "val_set_size=0"])
        if not check(p.returncode == 0, "qlora train failed"):
            return 1
        shutil.copy(os.path.join(run_dir, "adapter_model.gguf"), os.path.join(adir, "quick.gguf"))
        peft = os.path.join(run_dir, "adapter")
    if os.path.isdir(peft):
        shutil.copytree(peft, os.path.join(adir, "quick_peft"))
    with open(os.path.join(adir, "corrupt.gguf"), "wb") as f:
        f.write(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    shutil.copy(os.path.join(adir, "quick.gguf"), os.path.join(work, "outside.gguf"))
    os.symlink(os.path.join(work, "outside.gguf"), os.path.join(adir, "escape.gguf"))
    quick = os.path.join(adir, "quick.gguf")

    # 2. references
    g = run([a.qlora, "generate", "-m", model, "--chat", "-p", PROMPT, "-n", str(MAX_TOKENS), "--quiet",
             "--adapter", quick])
    ref_adapter = g.stdout.decode()[:-1] if g.stdout.endswith(b"\n") else g.stdout.decode()
    g = run([a.qlora, "generate", "-m", model, "--chat", "-p", PROMPT, "-n", str(MAX_TOKENS), "--quiet"])
    ref_base = g.stdout.decode()[:-1]
    g = run([a.qlora, "generate", "-m", model, "-p", PLAIN_PROMPT, "-n", "8", "--quiet"])
    ref_plain = g.stdout.decode()[:-1]
    check(ref_plain.startswith(PLAIN_PROMPT), "generate does not echo the plain prompt: %r" % ref_plain)
    ref_plain = ref_plain[len(PLAIN_PROMPT):]
    print("reference with adapter: %r\nreference base:         %r\nplain: %r" % (ref_adapter, ref_base, ref_plain))
    check(ref_adapter and ref_adapter != ref_base, "the adapter does not change the greedy answer")

    # 3. the server
    srv = Server([a.qlora, "serve", "-m", model, "--adapter", "quick=" + quick, "--adapter-dir", adir,
                  "--port", "0", "--api-key", KEY, "--max-running", "2", "--max-queue", "2", "--ctx", "1024",
                  "--max-body", "1MiB", "--kv-memory", "64MiB"], os.path.join(work, "serve.log"))
    port = srv.port
    print("\n".join(srv.summary), flush=True)
    check(any("quick" in l for l in srv.summary), "the summary does not list the adapter")
    check(any(re.search(r"KV cache \d+ tokens", l) for l in srv.summary), "the summary lacks the KV capacity")
    client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key=KEY, max_retries=0, timeout=120)
    try:
        serve_checks(a, srv, port, client, openai, base_name, ref_adapter, ref_base, ref_plain, work)
    finally:
        if srv.proc.poll() is None:
            srv.stop(signal.SIGKILL)

    # 4. a second server: no --adapter-dir, no key
    srv2 = Server([a.qlora, "serve", "-m", model, "--port", "0", "--quiet", "--kv-memory", "64MiB"], os.path.join(work, "serve2.log"))
    status, _, data = request(srv2.port, "POST", "/v1/load_lora_adapter",
                              {"lora_name": "x", "lora_path": quick}, key=None)
    e = check_error(status, data, 403, "lora_path", "load without --adapter-dir")
    check("--adapter-dir" in e.get("message", ""), "the 403 does not say how to allow loading: %s" % e)
    status, hdrs, data = request(srv2.port, "GET", "/metrics", key=None)
    check(status == 200 and hdrs.get("content-type", "").startswith("text/plain"), "/metrics without a key")
    text = data.decode()
    check("# TYPE qlora_kv_blocks_used gauge" in text and "qlora_http_requests_total{status=\"403\"} 1" in text,
          "metrics text lacks the expected lines")
    status, _, data = request(srv2.port, "POST", "/v1/chat/completions", chat_body(base_name, max_tokens=4000), key=None)
    e = check_error(status, data, 400, "max_tokens", "more tokens than the KV cache holds")
    check("KV cache" in e.get("message", ""), "the KV refusal does not say why: %s" % e.get("message"))
    status, _, data = request(srv2.port, "POST", "/v1/chat/completions", chat_body(base_name), key=None)
    check(status == 200 and jbody(data)["choices"][0]["message"]["content"] == ref_base,
          "second server: base answer differs")
    check(srv2.stop(signal.SIGINT) == 0, "second server: SIGINT exit status not 0")

    print("%d checks, %d failed, %.0f s" % (N_CHECKS[0], len(FAILS), time.time() - t_start))
    if FAILS:
        print("serve log: " + os.path.join(work, "serve.log"))
    elif not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if FAILS else 0


def serve_checks(a, srv, port, client, openai, base_name, ref_adapter, ref_base, ref_plain, work):
    # health and auth
    status, _, data = request(port, "GET", "/health", key=None)
    check(status == 200 and jbody(data) == {"status": "ok"}, "/health: %d %s" % (status, data))
    status, hdrs, data = request(port, "GET", "/v1/models", key=None)
    check_error(status, data, 401, None, "no key")
    check(hdrs.get("www-authenticate", "").startswith("Bearer"), "401 without WWW-Authenticate")
    status, _, data = request(port, "GET", "/v1/models", key="wrong-key")
    check_error(status, data, 401, None, "wrong key")
    try:
        openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="nope", max_retries=0).models.list()
        check(False, "openai with a wrong key did not raise")
    except openai.AuthenticationError:
        pass

    # models
    models = client.models.list()
    ids = [m.id for m in models.data]
    check(ids == [base_name, "quick"], "models: %s" % ids)
    status, _, data = request(port, "GET", "/v1/models")
    d = jbody(data)["data"]
    check(d[1].get("rank") == 16 and d[1].get("residency") in ("device", "host", "file") and
          d[1].get("parent") == base_name and d[1].get("lora_id") == 0, "adapter entry: %s" % d[1])
    check(client.models.retrieve("quick").id == "quick", "models.retrieve")

    # chat, not streamed
    r = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    got = r.choices[0].message.content
    check(got == ref_adapter, "chat with the adapter: %r != generate --adapter %r" % (got, ref_adapter))
    check(r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "quick", "chat fields")
    check(r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.role == "assistant",
          "finish_reason / role")
    u = r.usage
    check(u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens,
          "usage %s" % u)
    check(u.completion_tokens <= MAX_TOKENS, "more tokens than max_tokens")
    r = client.chat.completions.create(model=base_name, messages=[{"role": "user", "content": PROMPT}],
                                       max_completion_tokens=MAX_TOKENS, temperature=0)
    check(r.choices[0].message.content == ref_base, "chat with the base: %r != %r" % (r.choices[0].message.content, ref_base))
    for how, body in (("lora by name", chat_body(base_name, lora=[{"name": "quick"}])),
                      ("lora by id", chat_body(None, lora=[{"id": 0, "scale": 1.0}])),
                      ("top_p 0 (greedy)", chat_body("quick", temperature=0.8, top_p=0))):
        if body["model"] is None:
            del body["model"]
        status, _, data = request(port, "POST", "/v1/chat/completions", body)
        j = jbody(data) or {}
        check(status == 200 and j["choices"][0]["message"]["content"] == ref_adapter, "%s: %d %s" % (how, status, data[:300]))

    # streaming: openai (with usage) and raw SSE through curl
    chunks = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, finish, usage, n = "", None, None, 0
    for ch in chunks:
        n += 1
        check(ch.object == "chat.completion.chunk", "chunk object %s" % ch.object)
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        if ch.usage:
            usage = ch.usage
    check(text == ref_adapter, "streamed text %r != %r" % (text, ref_adapter))
    check(finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0, "stream end: %s %s" % (finish, usage))
    check(n >= 3, "only %d chunks" % n)
    p = subprocess.run(["curl", "-sS", "-N", "-H", "Authorization: Bearer " + KEY, "-H", "Content-Type: application/json",
                        "-d", json.dumps(chat_body("quick", stream=True)), "http://127.0.0.1:%d/v1/chat/completions" % port],
                       stdout=subprocess.PIPE, timeout=120)
    payloads = sse_events(p.stdout)
    check(payloads and payloads[-1] == "[DONE]", "curl stream does not end with [DONE]")
    deltas = [jbody(x) for x in payloads[:-1]]
    check(all(d and d["object"] == "chat.completion.chunk" for d in deltas), "curl stream chunk objects")
    check("".join(d["choices"][0]["delta"].get("content") or "" for d in deltas if d and d["choices"]) == ref_adapter,
          "curl streamed text differs")

    # completions
    r = client.completions.create(model=base_name, prompt=PLAIN_PROMPT, max_tokens=8, temperature=0)
    check(r.choices[0].text == ref_plain and r.object == "text_completion" and r.id.startswith("cmpl-"),
          "completion %r != generate %r" % (r.choices[0].text, ref_plain))

    load_unload_during_stream(port, client, base_name, ref_adapter, os.path.join(work, "adapters"))
    burst_429(port)
    cancel_on_disconnect(port, base_name, stream=True)
    cancel_on_disconnect(port, base_name, stream=False)
    bad_requests(port, base_name, work)

    # still serving, same answer
    r = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    check(r.choices[0].message.content == ref_adapter, "after the bad requests the answer changed")

    # SIGTERM drains a running stream
    got = {}

    def reader():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/v1/chat/completions", body=json.dumps(chat_body("quick", stream=True)),
                  headers={"Authorization": "Bearer " + KEY, "Content-Type": "application/json"})
        resp = c.getresponse()
        got["first"] = resp.readline()
        started.set()
        got["rest"] = got["first"] + resp.read()
        c.close()
    started = threading.Event()
    t = threading.Thread(target=reader)
    t.start()
    check(started.wait(60), "the stream before SIGTERM never started")
    rc = srv.stop(signal.SIGTERM)
    t.join(60)
    check(rc == 0, "exit status after SIGTERM: %s" % rc)
    payloads = sse_events(got.get("rest", b""))
    check(payloads and payloads[-1] == "[DONE]", "the stream running at SIGTERM did not finish")
    finishes = [jbody(x)["choices"][0]["finish_reason"] for x in payloads[:-1] if jbody(x) and jbody(x).get("choices")]
    check(finishes and finishes[-1] in ("stop", "length"), "the drained stream has no finish_reason")
    log = open(srv.log_path).read()
    check("draining" in log, "no drain message in the log")


def load_unload_during_stream(port, client, base_name, ref_adapter, adir):
    box = {}
    first = threading.Event()

    def streamer():
        try:
            s = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=MAX_TOKENS, temperature=0, stream=True)
            text, fin = "", None
            for ch in s:
                if ch.choices:
                    text += ch.choices[0].delta.content or ""
                    fin = ch.choices[0].finish_reason or fin
                first.set()
            box["text"], box["finish"] = text, fin
        except Exception as e:  # reported below
            box["error"] = repr(e)
            first.set()
    t = threading.Thread(target=streamer)
    t.start()
    check(first.wait(60), "the stream never started")
    status, _, data = request(port, "POST", "/v1/load_lora_adapter", {"lora_name": "quick2", "lora_path": "quick_peft"})
    check(status == 200, "load quick2 (PEFT, relative path): %d %s" % (status, data[:300]))
    ids = [m.id for m in client.models.list().data]
    check("quick2" in ids, "quick2 not listed: %s" % ids)
    status, _, data = request(port, "POST", "/v1/unload_lora_adapter", {"lora_name": "quick"})
    check(status == 200, "unload quick while its stream runs: %d %s" % (status, data[:300]))
    r = client.chat.completions.create(model="quick2", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=MAX_TOKENS, temperature=0)
    check(len(r.choices[0].message.content) > 0, "quick2 answered nothing")
    t.join(120)
    check("error" not in box, "the stream failed after its adapter was unloaded: %s" % box.get("error"))
    check(box.get("finish") in ("stop", "length") and box.get("text"), "the stream did not end normally: %s" % box)
    status, _, data = request(port, "POST", "/v1/chat/completions", chat_body("quick"))
    e = check_error(status, data, 404, "model", "unloaded adapter")
    check(e.get("code") == "model_not_found", "404 code %s" % e.get("code"))
    check("quick" not in [m.id for m in client.models.list().data], "quick still listed after unload")
    status, _, data = request(port, "POST", "/v1/unload_lora_adapter", {"lora_name": "quick"})
    check_error(status, data, 404, "lora_name", "unload twice")
    # back for the rest (an absolute path inside the folder)
    status, _, data = request(port, "POST", "/v1/load_lora_adapter",
                              {"lora_name": "quick", "lora_path": os.path.join(adir, "quick.gguf")})
    check(status == 200, "reload quick: %d %s" % (status, data[:200]))
    status, _, data = request(port, "POST", "/v1/load_lora_adapter", {"lora_name": "quick", "lora_path": "quick.gguf"})
    check_error(status, data, 400, "lora_name", "load a taken name")


def burst_429(port):
    results = []
    lock = threading.Lock()

    def one():
        st, hd, data = request(port, "POST", "/v1/chat/completions", chat_body("quick", max_tokens=12))
        with lock:
            results.append((st, hd, data))
    ts = [threading.Thread(target=one) for _ in range(10)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    codes = sorted(r[0] for r in results)
    print("burst: %s" % codes, flush=True)
    check(len(results) == 10 and set(codes) <= {200, 429}, "burst answers: %s" % codes)
    check(429 in codes and 200 in codes, "a burst of 10 over 2 running + 2 queued gave %s" % codes)
    for st, hd, data in results:
        if st == 429:
            check(hd.get("retry-after", "").isdigit(), "429 without Retry-After")
            e = (jbody(data) or {}).get("error", {})
            check(e.get("type") == "rate_limit_error", "429 type %s" % e.get("type"))


def cancel_on_disconnect(port, base_name, stream):
    """A long completion whose client goes away: streamed (after 3 events) or not (once it runs)."""
    what = "streamed" if stream else "not streamed"
    before = metrics(port)
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": base_name, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
                       "stream": stream}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    deadline = time.time() + 60
    if stream:
        buf = b""
        while buf.count(b"data: ") < 3 and time.time() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        check(buf.startswith(b"HTTP/1.1 200") and buf.count(b"data: ") >= 3, "the long stream did not start: %r" % buf[:200])
    else:
        while time.time() < deadline and metrics(port).get("qlora_generation_tokens_total", 0) < \
                before.get("qlora_generation_tokens_total", 0) + 3:
            time.sleep(0.05)
    during = metrics(port)
    check(during.get("qlora_requests_running", 0) >= 1 and during.get("qlora_kv_blocks_used", 0) > 0,
          "%s, while generating: running %s, kv used %s" % (what, during.get("qlora_requests_running"),
                                                            during.get("qlora_kv_blocks_used")))
    s.close()
    t0 = time.time()
    after = None
    while time.time() - t0 < 10:
        after = metrics(port)
        if after.get("qlora_kv_blocks_used", 1) == 0 and after.get("qlora_requests_running", 1) == 0:
            break
        time.sleep(0.05)
    print("%s: blocks back %.2f s after the disconnect" % (what, time.time() - t0), flush=True)
    check(after.get("qlora_kv_blocks_used") == 0 and after.get("qlora_requests_running") == 0,
          "%s, after the disconnect: kv used %s, running %s" % (what, after.get("qlora_kv_blocks_used"),
                                                                after.get("qlora_requests_running")))
    check(after.get("qlora_requests_cancelled_total", 0) == before.get("qlora_requests_cancelled_total", 0) + 1,
          "%s: cancelled_total %s -> %s" % (what, before.get("qlora_requests_cancelled_total"),
                                            after.get("qlora_requests_cancelled_total")))
    check(after.get("qlora_generation_tokens_total", 0) - before.get("qlora_generation_tokens_total", 0) < 400,
          "%s: the cancelled request generated all its tokens" % what)


def bad_requests(port, base_name, work):
    C = "/v1/chat/completions"
    status, _, data = request(port, "POST", C, b'{"model": "quick", "messages": [')
    check_error(status, data, 400, None, "malformed JSON")
    status, _, data = request(port, "POST", C, chat_body("quick", temperature="hot"))
    check_error(status, data, 400, "temperature", "temperature as a string")
    status, _, data = request(port, "POST", C, {"model": "quick", "messages": "hi"})
    check_error(status, data, 400, "messages", "messages as a string")
    status, _, data = request(port, "POST", C, {"model": "quick", "messages": [{"role": "user", "content": 5}]})
    check_error(status, data, 400, "messages[0].content", "content as a number")
    status, _, data = request(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": "8"})
    check_error(status, data, 400, "max_tokens", "max_tokens as a string")
    status, _, data = request(port, "POST", C, chat_body("quick", n=2))
    check_error(status, data, 400, "n", "n = 2")
    status, _, data = request(port, "POST", C, chat_body(base_name, lora=[{"name": "quick"}, {"name": "quick2"}]))
    e = check_error(status, data, 400, "lora", "two adapters")
    check("one adapter per request" in e.get("message", ""), "two adapters: message %s" % e.get("message"))
    status, _, data = request(port, "POST", C, chat_body("no-such-adapter"))
    check_error(status, data, 404, "model", "unknown model")
    status, _, data = request(port, "POST", C, chat_body(base_name, lora=[{"id": 99}]))
    check_error(status, data, 404, "lora[0].id", "unknown lora id")
    status, _, data = request(port, "POST", C, chat_body("quick", max_tokens=5000))
    check_error(status, data, 400, "max_tokens", "max_tokens over the context")
    big = os.path.join(work, "big.json")
    with open(big, "w") as f:
        f.write('{"model": "quick", "messages": [{"role": "user", "content": "' + "a" * (2 << 20) + '"}]}')
    p = subprocess.run(["curl", "-sS", "-o", "/dev/stdout", "-w", "\n%{http_code}", "-H", "Authorization: Bearer " + KEY,
                        "-H", "Content-Type: application/json", "--data-binary", "@" + big,
                        "http://127.0.0.1:%d%s" % (port, C)], stdout=subprocess.PIPE, timeout=60)
    out = p.stdout.decode(errors="replace").rsplit("\n", 1)
    check(len(out) == 2 and out[1] == "413", "2 MiB body: %s" % out[-1])
    check_error(int(out[1]) if out[-1].isdigit() else 0, out[0].encode(), 413, None, "2 MiB body")
    # the same big body sent without waiting for 100-continue, in chunks (no Content-Length)
    p = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Authorization: Bearer " + KEY,
                        "-H", "Transfer-Encoding: chunked", "-H", "Expect:", "--data-binary", "@" + big,
                        "http://127.0.0.1:%d%s" % (port, C)], stdout=subprocess.PIPE, timeout=60)
    check(p.stdout == b"413", "chunked 2 MiB body: %s" % p.stdout)
    L = "/v1/load_lora_adapter"
    for path, want, what in (("../outside.gguf", 403, "'..' out of the adapter dir"),
                             ("escape.gguf", 403, "a symlink out of the adapter dir"),
                             (os.path.join(work, "outside.gguf"), 403, "an absolute path outside"),
                             ("missing.gguf", 404, "a missing file")):
        status, _, data = request(port, "POST", L, {"lora_name": "evil", "lora_path": path})
        check_error(status, data, want, "lora_path", what)
    status, _, data = request(port, "POST", L, {"lora_name": "bad", "lora_path": "corrupt.gguf"})
    e = check_error(status, data, 400, "lora_path", "a corrupt adapter")
    check("corrupt.gguf" in e.get("message", ""), "the corrupt adapter's message does not name the file: %s" % e)
    status, _, data = request(port, "POST", L, {"lora_name": 3, "lora_path": "quick.gguf"})
    check_error(status, data, 400, "lora_name", "lora_name as a number")
    status, _, data = request(port, "GET", C)
    check_error(status, data, 405, None, "GET on a POST route")
    status, _, data = request(port, "GET", "/v1/nothing")
    check_error(status, data, 404, None, "unknown route")
    status, _, data = request(port, "GET", "/health", key=None)
    check(status == 200, "health after the bad requests: %d" % status)
    m = metrics(port)
    for code in (400, 401, 403, 404, 405, 413, 429):
        check(m.get('qlora_http_requests_total{status="%d"}' % code, 0) >= 1, "no %d counted in /metrics" % code)


if __name__ == "__main__":
    sys.exit(main())
