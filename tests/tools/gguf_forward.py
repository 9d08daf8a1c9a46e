#!/usr/bin/env python3
"""tests/tools/gguf_forward.py: an independent reference engine for llama GGUF files, in numpy:
it reads a model with the PyPI `gguf` package (tensors decoded by gguf.quants.dequantize, so any
type gguf-py decodes: F32, F16, BF16, Q8_0, Q5_0, Q4_K, Q6_K, ...), runs the llama forward as
llama.cpp lays the weights out (Q/K rows in llama.cpp's order, RoPE rotating adjacent pairs),
in float32 with float64 softmax, and replays the greedy answers `qlora eval --answers` wrote.

For each answer: one teacher-forced pass over prompt + qlora's answer tokens checks that the
argmax at every position is qlora's next token (and a stop token where qlora stopped). If so the
answer is qlora's, token for token. If not, greedy generation continues from the first
divergence (KV cache) up to the same max_tokens and stop tokens, the text is decoded (byte-level
BPE, control tokens skipped, trimmed) and compared with the reference: an exact-match measure
of the model in this file, independent of qlora's runtime.

usage: gguf_forward.py MODEL.gguf ANSWERS.jsonl [-n N] [--json OUT]
Prints one line per example and "summary: same A/N, exact E/N (qlora exact Q/N)".
Exit 77 when gguf or numpy is missing."""
import argparse
import json
import sys
import time

try:
    import numpy as np
    import gguf
    from gguf.quants import dequantize
except Exception as e:  # noqa: BLE001 - any import problem means "skip"
    print("gguf_forward.py: gguf/numpy not importable (%s)" % e, file=sys.stderr)
    sys.exit(77)


def field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    v = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(v).decode("utf-8")
    return v.tolist()[0] if hasattr(v, "tolist") else v


def str_array(r, key):
    f = r.fields[key]
    return [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]


def num_array(r, key):
    f = r.fields[key]
    return [f.parts[i].tolist()[0] for i in f.data]


class Model:
    def __init__(self, path):
        r = gguf.GGUFReader(path)
        arch = field(r, "general.architecture")
        if arch != "llama":
            raise SystemExit("gguf_forward.py: only the llama architecture (got %s)" % arch)
        if field(r, "llama.rope.scaling.type") not in (None, "none"):
            raise SystemExit("gguf_forward.py: rope scaling is not implemented")
        self.n_layers = field(r, "llama.block_count")
        self.d = field(r, "llama.embedding_length")
        self.n_heads = field(r, "llama.attention.head_count")
        self.n_kv = field(r, "llama.attention.head_count_kv", self.n_heads)
        self.head_dim = self.d // self.n_heads
        self.theta = field(r, "llama.rope.freq_base", 10000.0)
        self.eps = field(r, "llama.attention.layer_norm_rms_epsilon")
        t = {x.name: x for x in r.tensors}
        if "rope_freqs.weight" in t:
            raise SystemExit("gguf_forward.py: rope_freqs is not implemented")
        self.types = {}

        def w(name):
            x = t[name]
            self.types[name] = x.tensor_type.name
            a = dequantize(x.data, x.tensor_type).astype(np.float32)
            return a.reshape([int(v) for v in reversed(x.shape)]) if a.ndim == 1 and len(x.shape) > 1 else a

        self.embd = w("token_embd.weight")
        self.out = w("output.weight") if "output.weight" in t else self.embd
        self.out_norm = w("output_norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            p = "blk.%d." % i
            self.layers.append({k: w(p + k + ".weight") for k in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                "ffn_down")})
        self.tokens = str_array(r, "tokenizer.ggml.tokens")
        self.token_type = num_array(r, "tokenizer.ggml.token_type")
        half = self.head_dim // 2
        self.inv_freq = self.theta ** (-np.arange(half, dtype=np.float64) * 2.0 / self.head_dim)
        self.k_cache = self.v_cache = None

    def rms(self, x, w):
        return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps)).astype(
            np.float32) * w

    def rope(self, x, pos):
        """x [n, heads, hd] in llama.cpp's layout: pairs (2i, 2i+1) rotate by pos * inv_freq[i]."""
        ang = np.outer(pos, self.inv_freq)  # [n, hd/2]
        c = np.cos(ang)[:, None, :].astype(np.float32)
        s = np.sin(ang)[:, None, :].astype(np.float32)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def reset(self):
        self.k_cache = [np.zeros((0, self.n_kv, self.head_dim), np.float32) for _ in range(self.n_layers)]
        self.v_cache = [np.zeros((0, self.n_kv, self.head_dim), np.float32) for _ in range(self.n_layers)]

    def forward(self, ids, logit_rows=None):
        """Appends ids to the cache; returns logits [len(logit_rows), vocab] (default: the last)."""
        n = len(ids)
        p0 = self.k_cache[0].shape[0]
        pos = np.arange(p0, p0 + n)
        x = self.embd[np.asarray(ids)]
        grp = self.n_heads // self.n_kv
        for i, L in enumerate(self.layers):
            h = self.rms(x, L["attn_norm"])
            q = (h @ L["attn_q"].T).reshape(n, self.n_heads, self.head_dim)
            k = (h @ L["attn_k"].T).reshape(n, self.n_kv, self.head_dim)
            v = (h @ L["attn_v"].T).reshape(n, self.n_kv, self.head_dim)
            q, k = self.rope(q, pos), self.rope(k, pos)
            self.k_cache[i] = K = np.concatenate([self.k_cache[i], k])
            self.v_cache[i] = V = np.concatenate([self.v_cache[i], v])
            T = K.shape[0]
            Kh = np.repeat(K, grp, axis=1).transpose(1, 0, 2)  # [heads, T, hd]
            Vh = np.repeat(V, grp, axis=1).transpose(1, 0, 2)
            s = np.einsum("nhd,htd->hnt", q, Kh).astype(np.float64) / np.sqrt(self.head_dim)
            mask = np.arange(T)[None, :] > pos[:, None]
            s[:, mask] = -np.inf
            s -= s.max(axis=-1, keepdims=True)
            pr = np.exp(s)
            pr /= pr.sum(axis=-1, keepdims=True)
            o = np.einsum("hnt,htd->nhd", pr.astype(np.float32), Vh).reshape(n, self.d)
            x = x + o @ L["attn_output"].T
            h = self.rms(x, L["ffn_norm"])
            g = h @ L["ffn_gate"].T
            u = h @ L["ffn_up"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ L["ffn_down"].T
        rows = [n - 1] if logit_rows is None else logit_rows
        return self.rms(x[rows], self.out_norm) @ self.out.T

    def decode(self, ids):
        """Byte-level BPE text of ids, control tokens skipped (as qlora's QLR_DEC_SKIP_SPECIAL)."""
        byte_of = {}
        n = 0
        for b in range(256):
            if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
                byte_of[chr(b)] = b
            else:
                byte_of[chr(256 + n)] = b
                n += 1
        out = bytearray()
        for t in ids:
            if self.token_type[t] == 3:  # control
                continue
            for ch in self.tokens[t]:
                out.append(byte_of.get(ch, ord("?") if ord(ch) > 255 else ord(ch)))
        return out.decode("utf-8", errors="replace")

    def text_of(self, ids, keep_special=True):
        if keep_special:
            parts = []
            for t in ids:
                parts.append(self.tokens[t] if self.token_type[t] == 3 else self.decode([t]))
            return "".join(parts)
        return self.decode(ids)


def replay(m, a, info=None):
    """Returns (same answer, exact, text). `info` (a dict) receives "gap": at the first divergence,
    how far (in logits of this model) qlora's token was below this model's argmax (0 if none)."""
    prompt, ans, stops = a["prompt_ids"], a["answer_ids"], set(a["stop_ids"])
    m.reset()
    seq = prompt + ans
    rows = list(range(len(prompt) - 1, len(seq)))
    logits = m.forward(seq, rows)
    pred = logits.argmax(axis=-1)
    div = None
    for j, tok in enumerate(ans):
        if pred[j] != tok:
            div = j
            gap = float(logits[j][pred[j]] - logits[j][tok])
            break
    if div is None and a["stopped"] and int(pred[len(ans)]) not in stops:
        div = len(ans)
        gap = float(logits[div][pred[div]] - max(logits[div][t] for t in stops))
    if info is not None:
        info["gap"] = 0.0 if div is None else gap
        info["at"] = div
    if div is None:
        return True, a["exact"], a["answer"]
    # greedy from the divergence
    m.reset()
    gen = ans[:div]
    nxt = int(m.forward(prompt + gen)[0].argmax())
    while nxt not in stops and len(gen) < a["max_tokens"]:
        gen.append(nxt)
        nxt = int(m.forward([nxt])[0].argmax())
    text = m.decode(gen).strip()
    return False, text == a["reference"], text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("answers")
    ap.add_argument("-n", type=int, default=0, help="first N answers only")
    ap.add_argument("--json", help="write per-example results here")
    ap.add_argument("-q", action="store_true", help="summary only")
    args = ap.parse_args()
    t0 = time.time()
    m = Model(args.model)
    answers = [json.loads(l) for l in open(args.answers, encoding="utf-8") if l.strip()]
    if args.n:
        answers = answers[:args.n]
    same = exact = qexact = 0
    res = []
    for i, a in enumerate(answers):
        info = {}
        s, e, text = replay(m, a, info)
        same += s
        exact += e
        qexact += a["exact"]
        res.append({"line": a["line"], "same": s, "exact": e, "answer": text, "qlora_exact": a["exact"],
                    "gap": info["gap"], "at": info["at"]})
        if not args.q:
            print("%3d line %s: %s, %s%s" % (i, a["line"], "same answer" if s else "DIFFERENT answer",
                                           "exact" if e else "not exact",
                                           "" if s else " (token %d, logit gap %.4f; got %r)" % (
                                               info["at"], info["gap"], text[:120])))
    n = len(answers)
    print("summary: same %d/%d, exact %d/%d (qlora exact %d/%d), %.1fs" % (same, n, exact, n, qexact, n,
                                                                            time.time() - t0))
    if args.json:
        json.dump({"model": args.model, "n": n, "same": same, "exact": exact, "qlora_exact": qexact,
                   "examples": res}, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
