/* infer/web/app.js: the behaviour of qlora serve's page (index.html), plain JavaScript with no
 * library. Everything goes through the server's public API, as any client would:
 *   GET /v1/models      the base model and the attached adapters (rank, targets, residency,
 *                       running references, request counts), polled every few seconds;
 *   GET /metrics        the Prometheus text, parsed for the strip at the top (every second) and,
 *                       while a comparison streams, for the engine's batch size (4 times a second);
 *   POST /v1/chat/completions with "stream": true, read as server-sent events from fetch();
 *   POST /v1/load_lora_adapter, /v1/unload_lora_adapter from the Adapters tab;
 *   GET /health         whether the server is up, which needs no key.
 * With --api-key the page asks for the key, keeps it in sessionStorage (this tab only) and sends
 * it as "Authorization: Bearer". Text from the server is only ever set as textContent. */
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "qlora.apiKey";
  const MAX_COMPARE_ADAPTERS = 4;

  const state = {
    key: sessionStorage.getItem(KEY_STORE) || "",
    needKey: false,
    base: null,              // the base model's entry of /v1/models
    names: null,             // the model names the selects were last built from
    adapters: [],            // the adapters' entries, in attach order
    chat: { messages: [], abort: null, model: null },
    compare: { aborts: [], running: false, maxBatch: 0, maxRunning: 0 },
  };

  /* ---- small helpers ---- */

  // el("div", {className: "x", text: "y", dataset: {a: 1}}, child...)
  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === "text") e.textContent = v;
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e[k] = v;
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  }

  function show(box, text, kind) {
    box.textContent = text || "";
    box.hidden = !text;
    box.classList.remove("error", "ok", "warn");
    if (kind) box.classList.add(kind);
  }

  function fmt(x, digits) {
    if (x === undefined || x === null || Number.isNaN(x)) return "–";
    return digits === undefined ? String(x) : x.toFixed(digits);
  }

  class ApiError extends Error {
    constructor(status, message, code, param) {
      super(message);
      this.status = status;
      this.code = code || null;
      this.param = param || null;
    }
  }

  // The OpenAI error object of a failed response, as an ApiError.
  async function errorOf(r) {
    let msg = "HTTP " + r.status + (r.statusText ? " " + r.statusText : "");
    let code = null, param = null;
    try {
      const j = await r.json();
      if (j && j.error) {
        msg = j.error.message || msg;
        code = j.error.code;
        param = j.error.param;
      }
    } catch (e) { /* not JSON: keep the status line */ }
    return new ApiError(r.status, msg, code, param);
  }

  // fetch() with the key; resolves to the Response when it is 2xx, else throws an ApiError
  // (status 0: the server could not be reached). An abort is rethrown as is.
  async function api(path, opts) {
    opts = opts || {};
    const headers = {};
    if (state.key) headers["Authorization"] = "Bearer " + state.key;
    let body;
    if (opts.json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(opts.json);
    }
    let r;
    try {
      r = await fetch(path, { method: opts.method || "GET", headers, body, signal: opts.signal, cache: "no-store" });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, "the server cannot be reached (" + e.message + ")");
    }
    if (r.status === 401) setNeedKey(true);
    if (!r.ok) throw await errorOf(r);
    return r;
  }

  /* ---- API key ---- */

  function setNeedKey(need) {
    if (need === state.needKey) return;
    state.needKey = need;
    const ks = $("key-state");
    if (need) {
      ks.textContent = state.key ? "the key was refused" : "this server needs a key";
      ks.className = "bad";
      show($("notice"), state.key
        ? "The server refused this API key (401). Enter the key it was started with (--api-key) above."
        : "This server requires an API key (it was started with --api-key). Enter it above.", "error");
      $("key").focus();
    } else {
      ks.textContent = state.key ? "key in use" : "";
      ks.className = "muted";
      show($("notice"), "");
    }
  }

  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
    else sessionStorage.removeItem(KEY_STORE);
    state.needKey = true;           // force the message update on the next answer
    setNeedKey(false);
    refreshModels();
    refreshMetrics();
  });

  /* ---- tabs ---- */

  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => {
      for (const o of document.querySelectorAll("#tabs button")) o.setAttribute("aria-selected", o === b ? "true" : "false");
      for (const t of document.querySelectorAll(".tab")) t.hidden = t.id !== "tab-" + b.dataset.tab;
    });
  }

  /* ---- server-sent events ---- */

  // Yields the data of each event of a text/event-stream response body.
  async function* sseData(response) {
    const reader = response.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  }

  // One streamed chat completion. onText(delta) for each piece of text; resolves to
  // {text, finish, usage, chunks, ttft, seconds}; throws an ApiError on a refusal, on an error
  // event in the stream, or when the stream ends without [DONE].
  async function streamChat(body, signal, onText) {
    const t0 = performance.now();
    const r = await api("/v1/chat/completions", {
      method: "POST", signal,
      json: Object.assign({ stream: true, stream_options: { include_usage: true } }, body),
    });
    const out = { text: "", finish: null, usage: null, chunks: 0, ttft: null, seconds: 0 };
    let done = false;
    for await (const data of sseData(r)) {
      if (data === "[DONE]") { done = true; break; }
      let j;
      try { j = JSON.parse(data); } catch (e) { throw new ApiError(0, "the server sent an event that is not JSON: " + data.slice(0, 80)); }
      if (j.error) throw new ApiError(500, j.error.message || "the server reported an error", j.error.code, j.error.param);
      const c = j.choices && j.choices[0];
      if (c) {
        const piece = c.delta && c.delta.content;
        if (piece) {
          if (out.ttft === null) out.ttft = (performance.now() - t0) / 1000;
          out.text += piece;
          out.chunks++;
          onText(piece);
        }
        if (c.finish_reason) out.finish = c.finish_reason;
      }
      if (j.usage) out.usage = j.usage;
    }
    out.seconds = (performance.now() - t0) / 1000;
    if (!done) throw new ApiError(0, "the stream ended before [DONE]: the server closed the connection");
    return out;
  }

  function statsLine(res) {
    const n = res.usage ? res.usage.completion_tokens : res.chunks;
    const parts = [n + " tokens", fmt(res.seconds, 1) + " s"];
    if (res.seconds > 0) parts.push(fmt(n / res.seconds, 1) + " tokens/s");
    if (res.ttft !== null) parts.push("first token " + fmt(res.ttft, 2) + " s");
    if (res.finish) parts.push("finish: " + res.finish);
    return parts.join(" · ");
  }

  function isGoneAdapter(err, model) {
    return err instanceof ApiError && err.status === 404 && err.code === "model_not_found" &&
      state.base && model !== state.base.id;
  }

  function goneMessage(model) {
    return "The adapter \"" + model + "\" is no longer attached to the server (it was detached while " +
      "this page was open). Nothing was generated; the conversation is kept. Choose another model, " +
      "or attach the adapter again in the Adapters tab, and send again.";
  }

  /* ---- models and adapters ---- */

  function allModels() {
    return (state.base ? [state.base] : []).concat(state.adapters);
  }

  async function refreshModels() {
    let list;
    try {
      list = await (await api("/v1/models")).json();
    } catch (e) {
      if (e.status !== 401) show($("notice"), "Listing the models failed: " + e.message, "error");
      return;
    }
    setNeedKey(false);
    const data = Array.isArray(list.data) ? list.data : [];
    state.base = data.find((m) => !m.parent) || null;
    state.adapters = data.filter((m) => m.parent);
    $("base-model").textContent = state.base
      ? state.base.id + " · context " + state.base.max_model_len + " tokens" : "no base model listed";
    if (state.base) {
      $("chat-max").max = state.base.max_model_len;
      $("cmp-max").max = state.base.max_model_len;
    }
    // rebuilt only when the names change: a poll must not close an open <select> or undo a click
    const names = allModels().map((m) => m.id).join("\n");
    if (names !== state.names) {
      state.names = names;
      renderChatModels();
      renderCompareModels();
    }
    renderAdapters();
  }

  function renderChatModels() {
    const sel = $("chat-model");
    const want = state.chat.model || (state.base && state.base.id);
    sel.replaceChildren();
    for (const m of allModels()) {
      sel.append(el("option", { value: m.id, text: m.parent ? m.id + " (adapter, r " + m.rank + ")" : m.id + " (base model)" }));
    }
    const exists = allModels().some((m) => m.id === want);
    if (want && !exists) {
      // keep the choice visible, and say why it no longer works
      sel.append(el("option", { value: want, text: want + " (detached)" }));
      show($("chat-warn"), "The adapter \"" + want + "\" chosen for this conversation is no longer attached " +
        "to the server. The conversation is kept: choose another model to continue, or attach it again.", "warn");
    } else {
      show($("chat-warn"), "");
    }
    if (want) sel.value = want;
    state.chat.model = sel.value || null;
  }

  $("chat-model").addEventListener("change", () => {
    state.chat.model = $("chat-model").value;
    renderChatModels();
  });

  function renderCompareModels() {
    const box = $("cmp-models");
    const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
    const first = !box.querySelector("input");
    for (const l of box.querySelectorAll("label")) l.remove();
    for (const m of allModels()) {
      const input = el("input", { type: "checkbox", value: m.id });
      input.checked = first ? !m.parent : checked.has(m.id);
      input.dataset.adapter = m.parent ? "1" : "";
      input.addEventListener("change", limitCompare);
      box.append(el("label", { className: "check" }, input, " " + m.id + (m.parent ? "" : " (base)")));
    }
    limitCompare();
  }

  // At most MAX_COMPARE_ADAPTERS adapters at once: the others are disabled while that many are checked.
  function limitCompare() {
    const boxes = [...$("cmp-models").querySelectorAll("input")];
    const n = boxes.filter((b) => b.dataset.adapter && b.checked).length;
    for (const b of boxes) if (b.dataset.adapter) b.disabled = !b.checked && n >= MAX_COMPARE_ADAPTERS;
  }

  function renderAdapters() {
    const body = $("ad-body");
    body.replaceChildren();
    for (const a of state.adapters) {
      const btn = el("button", { type: "button", className: "detach", text: "Detach" });
      btn.addEventListener("click", () => detach(a.id, btn));
      const res = el("span", { className: "badge " + a.residency, text: a.residency });
      body.append(el("tr", { dataset: { name: a.id } },
        el("td", { className: "name", text: a.id }),
        el("td", { className: "rank", text: fmt(a.rank) }),
        el("td", { text: fmt(a.alpha) }),
        el("td", { className: "targets", text: (a.targets || []).join(", ") }),
        el("td", { className: "residency" }, res),
        el("td", { className: "refs", text: fmt(a.refs) }),
        el("td", { className: "requests", text: fmt(a.requests) }),
        el("td", { className: "path", text: a.root || "", title: a.root || "" }),
        el("td", {}, btn)));
    }
    $("ad-empty").hidden = state.adapters.length > 0;
    $("m-adapters").textContent = String(state.adapters.length);
  }

  async function detach(name, btn) {
    btn.disabled = true;
    try {
      await api("/v1/unload_lora_adapter", { method: "POST", json: { lora_name: name } });
      show($("ad-msg"), "Detached \"" + name + "\" (requests already running with it finish first).", "ok");
    } catch (e) {
      show($("ad-msg"), "Detaching \"" + name + "\" failed: " + e.message, "error");
      btn.disabled = false;
    }
    await refreshModels();
  }

  $("attach-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("attach-name").value.trim(), path = $("attach-path").value.trim();
    $("attach-btn").disabled = true;
    try {
      await api("/v1/load_lora_adapter", { method: "POST", json: { lora_name: name, lora_path: path } });
      show($("ad-msg"), "Attached \"" + name + "\" from " + path + ".", "ok");
      $("attach-name").value = "";
      $("attach-path").value = "";
    } catch (e) {
      show($("ad-msg"), "Attaching \"" + name + "\" failed (" + (e.status || "no answer") + "): " + e.message, "error");
    } finally {
      $("attach-btn").disabled = false;
    }
    await refreshModels();
  });

  /* ---- chat ---- */

  function chatBubble(role, model) {
    const log = $("chat-log");
    const empty = log.querySelector(".empty");
    if (empty) empty.remove();
    const body = el("div", { className: "body" });
    const who = role === "user" ? "you" : "assistant · " + model;
    const b = el("div", { className: "msg " + role, dataset: { state: role === "user" ? "done" : "streaming", model: model || "" } },
      el("div", { className: "who", text: who }), body, el("div", { className: "stats" }));
    log.append(b);
    log.scrollTop = log.scrollHeight;
    return b;
  }

  function numberOf(input, lo, hi) {
    const v = Number(input.value);
    if (!Number.isFinite(v) || v < lo || v > hi) throw new Error(input.closest("label").textContent.trim() +
      " must be between " + lo + " and " + hi);
    return v;
  }

  async function sendChat() {
    const input = $("chat-input");
    const text = input.value;
    if (!text.trim() || state.chat.abort) return;
    const model = $("chat-model").value;
    let temperature, max_tokens;
    try {
      temperature = numberOf($("chat-temp"), 0, 2);
      max_tokens = Math.round(numberOf($("chat-max"), 1, state.base ? state.base.max_model_len : 1e9));
    } catch (e) {
      show($("chat-warn"), e.message, "error");
      return;
    }
    if (!model) {
      show($("chat-warn"), "No model to send to yet: the model list has not loaded (is the API key set?).", "error");
      return;
    }
    input.value = "";
    const user = chatBubble("user");
    user.querySelector(".body").textContent = text;
    state.chat.messages.push({ role: "user", content: text });
    const bubble = chatBubble("assistant", model);
    const body = bubble.querySelector(".body");
    const abort = new AbortController();
    state.chat.abort = abort;
    $("chat-send").disabled = true;
    $("chat-stop").hidden = false;
    let partial = "";
    try {
      const res = await streamChat({ model, messages: state.chat.messages.slice(), temperature, max_tokens },
        abort.signal, (piece) => {
          partial += piece;
          body.append(piece);
          bubble.dataset.chunks = String(Number(bubble.dataset.chunks || 0) + 1);
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        });
      state.chat.messages.push({ role: "assistant", content: res.text });
      bubble.querySelector(".stats").textContent = statsLine(res);
      bubble.dataset.state = "done";
    } catch (e) {
      if (e.name === "AbortError") {
        state.chat.messages.push({ role: "assistant", content: partial });
        bubble.querySelector(".stats").textContent = "stopped";
        bubble.dataset.state = "stopped";
      } else {
        // the question stays on screen, marked, but leaves the history, so that it can be sent again
        state.chat.messages.pop();
        input.value = text;
        user.classList.add("unsent");
        user.querySelector(".who").textContent = "you · not answered";
        bubble.classList.add("error");
        bubble.dataset.state = "error";
        const msg = isGoneAdapter(e, model) ? goneMessage(model) : "Error" + (e.status ? " " + e.status : "") + ": " + e.message;
        bubble.querySelector(".stats").textContent = msg;
        if (isGoneAdapter(e, model)) refreshModels();
      }
    } finally {
      state.chat.abort = null;
      $("chat-send").disabled = false;
      $("chat-stop").hidden = true;
    }
  }

  $("chat-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendChat(); });
  $("chat-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); sendChat(); }
  });
  $("chat-stop").addEventListener("click", () => { if (state.chat.abort) state.chat.abort.abort(); });
  $("chat-new").addEventListener("click", () => {
    if (state.chat.abort) state.chat.abort.abort();
    state.chat.messages = [];
    $("chat-log").replaceChildren(el("p", { className: "muted empty", text: "New conversation." }));
  });

  /* ---- compare ---- */

  async function runCompare() {
    if (state.compare.running) return;
    const prompt = $("cmp-prompt").value;
    const models = [...$("cmp-models").querySelectorAll("input:checked")].map((i) => i.value);
    let temperature, max_tokens;
    try {
      if (!prompt.trim()) throw new Error("Write a prompt first.");
      if (models.length === 0) throw new Error("Check at least one model.");
      if (models.filter((m) => !state.base || m !== state.base.id).length > MAX_COMPARE_ADAPTERS)
        throw new Error("At most " + MAX_COMPARE_ADAPTERS + " adapters at once.");
      temperature = numberOf($("cmp-temp"), 0, 2);
      max_tokens = Math.round(numberOf($("cmp-max"), 1, state.base ? state.base.max_model_len : 1e9));
    } catch (e) {
      show($("cmp-msg"), e.message, "error");
      return;
    }
    show($("cmp-msg"), "");
    const cols = $("cmp-cols");
    cols.replaceChildren();
    cols.style.setProperty("--cols", String(models.length));
    const c = state.compare;
    c.running = true;
    c.maxBatch = 0;
    c.maxRunning = 0;
    c.aborts = [];
    $("cmp-run").disabled = true;
    $("cmp-stop").hidden = false;
    const together = $("cmp-together");
    together.hidden = false;
    together.dataset.maxBatch = "0";
    together.textContent = "Sending " + models.length + " requests at once…";
    const poll = setInterval(() => pollBatch(models.length), 250);
    const t0 = performance.now();
    const runs = models.map((model) => {
      const body = el("div", { className: "body" });
      const stats = el("div", { className: "stats", text: "waiting…" });
      const col = el("div", { className: "col", dataset: { model, state: "streaming" } },
        el("div", { className: "who", text: model + (state.base && model === state.base.id ? " (base)" : "") }), body, stats);
      cols.append(col);
      const abort = new AbortController();
      c.aborts.push(abort);
      return streamChat({ model, messages: [{ role: "user", content: prompt }], temperature, max_tokens }, abort.signal,
        (piece) => { body.append(piece); col.dataset.chunks = String(Number(col.dataset.chunks || 0) + 1); stats.textContent = "streaming…"; })
        .then((res) => { stats.textContent = statsLine(res); col.dataset.state = "done"; },
          (e) => {
            col.dataset.state = e.name === "AbortError" ? "stopped" : "error";
            if (e.name !== "AbortError") col.classList.add("error");
            stats.textContent = e.name === "AbortError" ? "stopped"
              : isGoneAdapter(e, model) ? "The adapter \"" + model + "\" is no longer attached (detached); refresh the list and choose again."
              : "Error" + (e.status ? " " + e.status : "") + ": " + e.message;
          });
    });
    await Promise.all(runs);
    clearInterval(poll);
    await pollBatch(models.length);
    const secs = (performance.now() - t0) / 1000;
    c.running = false;
    $("cmp-run").disabled = false;
    $("cmp-stop").hidden = true;
    together.textContent = models.length + " requests sent at once, all answered in " + fmt(secs, 1) + " s. " +
      (c.maxBatch > 1 ? "They ran together: up to " + c.maxBatch + " sequences in one forward step of the engine"
        : "The engine never had more than " + c.maxBatch + " sequence in a step while they ran") +
      " (qlora_last_batch_sequences in /metrics).";
    refreshModels();
  }

  // While a comparison streams: the engine's last batch, from /metrics.
  async function pollBatch(n) {
    const c = state.compare;
    let m;
    try { m = await fetchMetrics(); } catch (e) { return; }
    const seqs = m.qlora_last_batch_sequences || 0, running = m.qlora_requests_running || 0;
    if (!c.running) return;
    c.maxBatch = Math.max(c.maxBatch, seqs);
    c.maxRunning = Math.max(c.maxRunning, running);
    const t = $("cmp-together");
    t.dataset.maxBatch = String(c.maxBatch);
    t.textContent = "Streaming " + n + " at once · engine now: " + running + " running, " + seqs +
      " sequences in the last forward step · most seen together: " + c.maxBatch;
  }

  $("cmp-form").addEventListener("submit", (ev) => { ev.preventDefault(); runCompare(); });
  $("cmp-stop").addEventListener("click", () => { for (const a of state.compare.aborts) a.abort(); });

  /* ---- metrics strip ---- */

  // The samples of the Prometheus text format: {"name" or "name{labels}": value}.
  function parseMetrics(text) {
    const out = {};
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const sp = line.lastIndexOf(" ");
      if (sp > 0) out[line.slice(0, sp)] = Number(line.slice(sp + 1));
    }
    return out;
  }

  async function fetchMetrics() {
    return parseMetrics(await (await api("/metrics")).text());
  }

  async function refreshMetrics() {
    let m;
    try {
      m = await fetchMetrics();
    } catch (e) {
      if (e.status !== 401) await refreshHealth();
      return;
    }
    $("m-tps").textContent = fmt(m.qlora_generation_tokens_per_second, 1);
    $("m-running").textContent = fmt(m.qlora_requests_running);
    $("m-queued").textContent = fmt(m.qlora_requests_waiting);
    const used = m.qlora_kv_blocks_used, total = m.qlora_kv_blocks_total;
    $("m-kv").textContent = fmt(used) + " / " + fmt(total);
    $("m-kv-bar").style.width = total ? Math.min(100, 100 * used / total).toFixed(1) + "%" : "0";
    $("m-step").textContent = fmt(m.qlora_last_batch_sequences) + " seq · " + fmt(m.qlora_last_batch_tokens) + " tok";
    $("m-gen").textContent = fmt(m.qlora_generation_tokens_total) + " tok";
    if (m.qlora_adapters_attached !== undefined) $("m-adapters").textContent = fmt(m.qlora_adapters_attached);
    setHealth(m.qlora_draining ? "draining" : "ok");
  }

  async function refreshHealth() {
    try {
      const r = await fetch("/health", { cache: "no-store" });
      setHealth(r.ok ? "ok" : r.status === 503 ? "draining" : "HTTP " + r.status);
    } catch (e) {
      setHealth("unreachable");
    }
  }

  function setHealth(s) {
    const h = $("m-health");
    h.textContent = s;
    h.className = "value " + (s === "ok" ? "good" : "bad");
  }

  /* ---- start ---- */

  if (state.key) {
    $("key").value = state.key;
    $("key-state").textContent = "key in use";
  }
  refreshHealth();
  refreshModels();
  refreshMetrics();
  setInterval(() => { if (!state.needKey) refreshMetrics(); }, 1000);
  setInterval(() => { if (!state.needKey) refreshModels(); }, 3000);
})();
