#!/usr/bin/env python3
"""tests/e2e/test_e2e_webui.py: the web page of `qlora serve` (infer/web/) driven in a real
headless browser (Debian's chromium + chromium-driver, the `selenium` package; scripts/setup.sh
installs them), on the CPU with the demo model.

1. An adapter is trained for 2 steps with the quickstart recipe (or $QLR_E2E_SERVE_ADAPTER, a
   GGUF LoRA) and `qlora serve --api-key ... --adapter quick=... --adapter-dir ...` started.
2. Over plain HTTP: / and its files load without the key, with their Content-Type and a
   Content-Security-Policy that allows this origin only; the API still needs the key. The
   greedy answers (temperature 0) of the base model and of the adapter come from the API.
3. In the browser, a screenshot after each step (into --artifacts, under the build folder):
   01-api-key       the page asks for the key (the API answered 401); the key is typed in;
   02-chat-adapter  a prompt sent with the adapter chosen streams back (several SSE events) and
                    equals the API's greedy answer for the same request;
   03-compare       base vs adapter side by side: each column equals its greedy answer, and the
                    page saw the engine run them in one batch (qlora_last_batch_sequences >= 2);
   04-attach-refused the adapters table (rank, targets, residency, request counts) and an attach
                    outside --adapter-dir, refused: the server's 403 shown as a message;
   05-adapters      a second adapter attached by the form, listed by the page and /v1/models;
   06-detached      the adapter detached from the page is gone from /v1/models;
   07-adapter-gone  the open conversation, still on the detached adapter, says so; sending gives
                    a clear message and keeps the question;
   08-continued     the same conversation continues on the base model and its answer equals the
                    API's greedy answer to the whole conversation.
   The browser's console shows no Content-Security-Policy violation.
Exit status 0 only when every check passed.
"""
import argparse
import glob
import os
import re
import shutil
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_e2e_serve as ts  # noqa: E402  (Server, request, run, check: shared with the API test)

check = ts.check
KEY = "webui-e2e-key"
MAX_TOKENS = 24
PROMPT = ("Extract the customer's name, city and order number as JSON: hana tanaka from nairobi wants a "
          "refund for order #19352.")
FOLLOW_UP = "Now only the city, please."


def api_answer(port, model, messages, max_tokens=MAX_TOKENS):
    """The API's greedy answer (not streamed) to a chat request."""
    status, _, data = ts.request(port, "POST", "/v1/chat/completions",
                                 {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0},
                                 key=KEY)
    check(status == 200, "API answer for %s: %d %s" % (model, status, data[:300]))
    return (ts.jbody(data) or {}).get("choices", [{}])[0].get("message", {}).get("content")


def model_ids(port):
    status, _, data = ts.request(port, "GET", "/v1/models", key=KEY)
    check(status == 200, "/v1/models: %d" % status)
    return [m["id"] for m in (ts.jbody(data) or {}).get("data", [])]


def http_checks(port, summary):
    check(any(re.search(r"web page\s+http://127\.0\.0\.1:%d/$" % port, l) for l in summary),
          "the summary does not give the page's URL: %s" % summary)
    status, hdrs, data = ts.request(port, "GET", "/", key=None)
    check(status == 200 and hdrs.get("content-type") == "text/html; charset=utf-8",
          "GET / without a key: %d %s" % (status, hdrs.get("content-type")))
    csp = hdrs.get("content-security-policy", "")
    check("default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp and
          "unsafe" not in csp and "http" not in csp and "*" not in csp, "CSP of /: %r" % csp)
    check(hdrs.get("x-content-type-options") == "nosniff", "/ without nosniff")
    check(b'<script src="/app.js"' in data and b"<title>qlora serve</title>" in data, "/ is not the page")
    for path, ctype in (("/app.js", "text/javascript; charset=utf-8"), ("/app.css", "text/css; charset=utf-8"),
                        ("/favicon.svg", "image/svg+xml"), ("/index.html", "text/html; charset=utf-8")):
        status, hdrs, data = ts.request(port, "GET", path, key=None)
        check(status == 200 and hdrs.get("content-type") == ctype and len(data) > 100 and
              hdrs.get("content-security-policy") == csp, "GET %s: %d %s" % (path, status, hdrs.get("content-type")))
    status, hdrs, data = ts.request(port, "HEAD", "/", key=None)
    check(status == 200 and data == b"" and int(hdrs.get("content-length", 0)) > 1000, "HEAD /: %d" % status)
    status, hdrs, data = ts.request(port, "POST", "/", body=b"{}", key=None)
    check(status == 405 and hdrs.get("allow") == "GET, HEAD", "POST /: %d %s" % (status, hdrs.get("allow")))
    status, _, _ = ts.request(port, "GET", "/nothing.js", key=None)
    check(status == 404, "GET /nothing.js: %d" % status)
    for path in ("/v1/models", "/metrics"):
        status, _, _ = ts.request(port, "GET", path, key=None)
        check(status == 401, "%s without the key: %d (the page must not open the API)" % (path, status))


class Page:
    """The browser on the page, with helpers to wait, read and keep screenshots."""

    def __init__(self, url, work, shots):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
        self.WebDriverWait = WebDriverWait
        o = webdriver.ChromeOptions()
        o.binary_location = shutil.which("chromium")
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--window-size=1360,1000", "--user-data-dir=" + os.path.join(work, "chromium"),
                  "--no-first-run", "--disable-extensions"):
            o.add_argument(a)
        o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.d = webdriver.Chrome(options=o, service=Service(shutil.which("chromedriver")))
        self.d.set_page_load_timeout(60)
        self.shots = shots
        self.d.get(url)

    def by_css(self, css):
        return self.d.find_element("css selector", css)

    def all_css(self, css):
        return self.d.find_elements("css selector", css)

    def wait(self, what, cond, timeout=120):
        try:
            return self.WebDriverWait(self.d, timeout, poll_frequency=0.1).until(lambda d: cond())
        except Exception as e:
            check(False, "timed out waiting for %s (%s)" % (what, type(e).__name__))
            return None

    def text(self, css):
        """textContent: the text exactly as streamed in (WebElement.text would fold whitespace)."""
        return self.by_css(css).get_attribute("textContent")

    def visible_text(self, css):
        e = self.by_css(css)
        return e.text if e.is_displayed() else ""

    def fill(self, css, value):
        e = self.by_css(css)
        e.clear()
        e.send_keys(value)

    def select(self, css, value):
        from selenium.webdriver.support.ui import Select
        Select(self.by_css(css)).select_by_value(value)

    def tab(self, name):
        self.by_css('#tabs button[data-tab="%s"]' % name).click()

    def shot(self, name):
        path = os.path.join(self.shots, name + ".png")
        self.d.save_screenshot(path)
        print("screenshot: " + path, flush=True)

    def close(self):
        self.d.quit()


def drive(p, port, base, ref_quick, ref_base):
    # 01: the key
    p.wait("the page to ask for the API key", lambda: "API key" in p.visible_text("#notice"), 30)
    check("requires an API key" in p.visible_text("#notice"), "the key message: %r" % p.visible_text("#notice"))
    check(p.by_css("#key") == p.d.switch_to.active_element, "the key field does not have the focus")
    p.shot("01-api-key")
    p.fill("#key", KEY)
    p.by_css("#key-form button").click()
    p.wait("the models after the key", lambda: len(p.all_css('#chat-model option[value="quick"]')) == 1, 30)
    p.wait("the notice to go", lambda: not p.by_css("#notice").is_displayed(), 10)
    p.wait("the metrics strip", lambda: re.fullmatch(r"\d+ / \d+", p.text("#m-kv")) is not None, 10)
    check(p.text("#m-health") == "ok", "server state in the strip: %r" % p.text("#m-health"))
    check(base in p.text("#base-model"), "the page does not name the base model: %r" % p.text("#base-model"))

    # 02: chat with the adapter
    p.select("#chat-model", "quick")
    p.fill("#chat-temp", "0")
    p.fill("#chat-max", str(MAX_TOKENS))
    p.fill("#chat-input", PROMPT)
    p.by_css("#chat-send").click()
    p.wait("the streamed answer", lambda: p.by_css(".msg.assistant").get_attribute("data-state") != "streaming")
    msg = p.by_css(".msg.assistant")
    got = p.text(".msg.assistant .body")
    print("page, quick: %r" % got, flush=True)
    check(msg.get_attribute("data-state") == "done", "chat state %s: %s" % (msg.get_attribute("data-state"),
                                                                          p.text(".msg.assistant .stats")))
    check(got == ref_quick, "the page's answer with the adapter %r != the API's greedy answer %r" % (got, ref_quick))
    check(int(msg.get_attribute("data-chunks") or 0) >= 3, "the answer came in %s pieces: not streamed" %
          msg.get_attribute("data-chunks"))
    check(msg.get_attribute("data-model") == "quick" and "quick" in p.text(".msg.assistant .who"), "answer not labelled")
    check("finish: " in p.text(".msg.assistant .stats") and "tokens/s" in p.text(".msg.assistant .stats"),
          "chat stats: %r" % p.text(".msg.assistant .stats"))
    p.shot("02-chat-adapter")

    # 03: compare base vs adapter
    p.tab("compare")
    p.fill("#cmp-prompt", PROMPT)
    boxes = {b.get_attribute("value"): b for b in p.all_css("#cmp-models input")}
    check(set(boxes) == {base, "quick"} and boxes[base].is_selected(), "compare choices: %s" % list(boxes))
    if not boxes["quick"].is_selected():
        boxes["quick"].click()
    p.fill("#cmp-temp", "0")
    p.fill("#cmp-max", str(MAX_TOKENS))
    p.by_css("#cmp-run").click()
    p.wait("two columns", lambda: len(p.all_css("#cmp-cols .col")) == 2, 10)
    p.wait("both columns to finish",
           lambda: all(c.get_attribute("data-state") != "streaming" for c in p.all_css("#cmp-cols .col")))
    p.wait("the comparison summary", lambda: "sent at once" in p.text("#cmp-together"), 10)
    for col in p.all_css("#cmp-cols .col"):
        model = col.get_attribute("data-model")
        text = col.find_element("css selector", ".body").get_attribute("textContent")
        want = ref_base if model == base else ref_quick
        check(col.get_attribute("data-state") == "done", "compare %s: %s" % (model, col.get_attribute("data-state")))
        check(text == want, "compare %s: %r != greedy %r" % (model, text, want))
    together = p.text("#cmp-together")
    print("compare: " + together, flush=True)
    check(int(p.by_css("#cmp-together").get_attribute("data-max-batch") or 0) >= 2,
          "the page did not see base and adapter in one engine step: %r" % together)
    check("They ran together" in together, "the page does not say they ran together: %r" % together)
    p.shot("03-compare")

    # 04, 05: adapters
    p.tab("adapters")
    row = 'tr[data-name="quick"] '
    p.wait("quick's request count", lambda: int(p.text(row + ".requests") or 0) >= 3, 15)
    check(p.text(row + ".rank") == "16", "rank %r" % p.text(row + ".rank"))
    check(p.text(row + ".targets") == "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
          "targets %r" % p.text(row + ".targets"))
    check(p.text(row + ".residency") in ("device", "host", "file"), "residency %r" % p.text(row + ".residency"))
    p.fill("#attach-name", "evil")
    p.fill("#attach-path", "../outside.gguf")
    p.by_css("#attach-btn").click()
    p.wait("the refusal", lambda: "failed" in p.visible_text("#ad-msg"), 15)
    check("403" in p.text("#ad-msg") and "lora_path" in p.text("#ad-msg"), "attach outside: %r" % p.text("#ad-msg"))
    p.shot("04-attach-refused")
    p.fill("#attach-name", "quick2")
    p.fill("#attach-path", "quick.gguf")
    p.by_css("#attach-btn").click()
    p.wait("quick2 in the table", lambda: len(p.all_css('tr[data-name="quick2"]')) == 1, 30)
    check("Attached" in p.text("#ad-msg"), "attach message: %r" % p.text("#ad-msg"))
    check(model_ids(port) == [base, "quick", "quick2"], "models after the attach: %s" % model_ids(port))
    p.shot("05-adapters")

    # 06: detach
    p.by_css(row + "button.detach").click()
    p.wait("quick to leave the table", lambda: not p.all_css(row), 15)
    check("Detached" in p.text("#ad-msg"), "detach message: %r" % p.text("#ad-msg"))
    check(model_ids(port) == [base, "quick2"], "models after the detach: %s" % model_ids(port))
    p.shot("06-detached")

    # 07: the conversation on the detached adapter
    p.tab("chat")
    p.wait("the detached warning", lambda: "no longer attached" in p.visible_text("#chat-warn"), 10)
    check('"quick"' in p.text("#chat-warn"), "warning: %r" % p.text("#chat-warn"))
    check(p.by_css("#chat-model").get_attribute("value") == "quick", "the conversation's model changed by itself")
    p.fill("#chat-input", FOLLOW_UP)
    p.by_css("#chat-send").click()
    p.wait("the refusal", lambda: p.all_css(".msg.assistant")[-1].get_attribute("data-state") == "error", 30)
    err = p.all_css(".msg.assistant")[-1].find_element("css selector", ".stats").get_attribute("textContent")
    check("no longer attached" in err and "conversation is kept" in err, "gone message: %r" % err)
    check(p.by_css("#chat-input").get_attribute("value") == FOLLOW_UP, "the question was not kept for a resend")
    check("unsent" in p.all_css(".msg.user")[-1].get_attribute("class"), "the unanswered question is not marked")
    p.shot("07-adapter-gone")

    # 08: the same conversation goes on with the base model
    p.select("#chat-model", base)
    p.wait("the warning to go", lambda: not p.by_css("#chat-warn").is_displayed(), 10)
    p.by_css("#chat-send").click()
    p.wait("the base model's answer", lambda: p.all_css(".msg.assistant")[-1].get_attribute("data-state") not in
           ("streaming", "error") and len(p.all_css(".msg.assistant")) == 3)
    got = p.all_css(".msg.assistant")[-1].find_element("css selector", ".body").get_attribute("textContent")
    want = api_answer(port, base, [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ref_quick},
                                   {"role": "user", "content": FOLLOW_UP}])
    print("page, base, turn 2: %r" % got, flush=True)
    check(got == want, "the continued conversation %r != the API's greedy answer %r" % (got, want))
    p.shot("08-continued")

    logs = p.d.get_log("browser")
    csp = [l["message"] for l in logs if "Content Security Policy" in l["message"] or "Refused to" in l["message"]]
    check(not csp, "CSP violations in the console: %s" % csp)
    errors = [l["message"] for l in logs if l["level"] == "SEVERE" and " 401 " not in l["message"] and
              " 403 " not in l["message"] and " 404 " not in l["message"]]
    check(not errors, "console errors: %s" % errors)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qlora", required=True)
    ap.add_argument("--source-dir", required=True)
    ap.add_argument("--artifacts", required=True, help="folder for the screenshots")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    t_start = time.time()
    model = os.environ.get("QLR_DEMO_MODEL") or os.path.join(a.source_dir, ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    missing = [w for w in ("chromium", "chromedriver") if not shutil.which(w)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if not os.path.exists(model):
        missing.append("the demo model " + model)
    if missing:
        print("missing: %s: run scripts/setup.sh (it installs chromium and chromium-driver with apt, selenium "
              "with pip, and the demo model; or set QLR_DEMO_MODEL)" % ", ".join(missing))
        return 1
    base = os.path.basename(model)[:-len(".gguf")]
    os.makedirs(a.artifacts, exist_ok=True)
    for old in glob.glob(os.path.join(a.artifacts, "*.png")):
        os.remove(old)
    work = tempfile.mkdtemp(prefix="qlr_e2e_webui_")
    adir = os.path.join(work, "adapters")
    os.makedirs(adir)

    pre = os.environ.get("QLR_E2E_SERVE_ADAPTER")
    if pre:
        shutil.copy(pre, os.path.join(adir, "quick.gguf"))
    else:
        run_dir = os.path.join(work, "run")
        p = ts.run([a.qlora, "train", os.path.join(a.source_dir, "recipes/smollm2-quickstart.yaml"),
                    "--set", "base_model=" + model, "--set", "output_dir=" + run_dir, "--set", "max_steps=2",
                    "--set", "warmup_steps=0", "--set", "eval_steps=0", "--set", "save_steps=0",
                    "--set", "val_set_size=0"])
        if not check(p.returncode == 0, "qlora train failed"):
            return 1
        shutil.copy(os.path.join(run_dir, "adapter_model.gguf"), os.path.join(adir, "quick.gguf"))
    shutil.copy(os.path.join(adir, "quick.gguf"), os.path.join(work, "outside.gguf"))

    srv = ts.Server([a.qlora, "serve", "-m", model, "--adapter", "quick=" + os.path.join(adir, "quick.gguf"),
                     "--adapter-dir", adir, "--port", "0", "--api-key", KEY, "--ctx", "1024", "--kv-memory", "64MiB"],
                    os.path.join(work, "serve.log"))
    port = srv.port
    print("\n".join(srv.summary), flush=True)
    page = None
    try:
        http_checks(port, srv.summary)
        user = [{"role": "user", "content": PROMPT}]
        ref_quick = api_answer(port, "quick", user)
        ref_base = api_answer(port, base, user)
        print("API greedy, quick: %r\nAPI greedy, base:  %r" % (ref_quick, ref_base), flush=True)
        check(ref_quick and ref_base and ref_quick != ref_base, "the adapter does not change the greedy answer")
        t = time.time()
        page = Page("http://127.0.0.1:%d/" % port, work, a.artifacts)
        print("[%.1fs] browser started" % (time.time() - t), flush=True)
        drive(page, port, base, ref_quick, ref_base)
    except Exception as e:  # a crash of the driver is a failure like any other, with its picture
        check(False, "the browser run stopped: %s: %s" % (type(e).__name__, e))
    finally:
        if page:
            if ts.FAILS:
                page.shot("failed")
            page.close()
        check(srv.stop(signal.SIGTERM) == 0, "qlora serve did not exit 0 on SIGTERM")

    print("%d checks, %d failed, %.0f s; screenshots in %s" % (ts.N_CHECKS[0], len(ts.FAILS), time.time() - t_start,
                                                                a.artifacts))
    if ts.FAILS:
        print("serve log: " + os.path.join(work, "serve.log"))
    elif not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if ts.FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
