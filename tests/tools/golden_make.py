#!/usr/bin/env python3
"""tests/tools/golden_make.py: writes the golden reference of qlora's CPU forward.

Input: a folder written by `qlora export-base -m MODEL -o DIR` (HF-named f32 model.safetensors
of the weights exactly as qlora runs them: NF4-dequantized linears, HF Q/K row order, bf16
embeddings; plus config.json) and tests/data/golden/prompts.json (fixed token ids).
Output: one small JSON file with, for every prompt,
  - per position: argmax id, the top-5 (id, logit) and logsumexp of the final logits;
  - for the last position: the logits at 512 fixed ids (every 96th id, 0, 96, ...);
  - per layer (-1 = embedding output, then each decoder layer's output, i.e. the residual
    stream before the final norm): mean, RMS and max |x| over all tokens, and the first 8
    values of the last token.

Generators:
  --engine hf     transformers' LlamaForCausalLM / Qwen2ForCausalLM in float32 (eager attention,
                  TF32 off), on CUDA when available. This is the reference of record.
  --engine numpy  an independent float64 implementation of the same HF math in numpy (no torch
                  needed); used where torch is not installed. The file records which one ran.

Regenerate (one command, from the repo root, after building qlora):
  build/bin/qlora export-base -o /tmp/golden_base && \
  python3 tests/tools/golden_make.py /tmp/golden_base --engine hf \
      -o tests/data/golden/smollm2_135m.json
"""
import argparse
import json
import math
import os
import sys

import numpy as np

TOPK = 5
N_LAST = 512
N_HEAD_VALUES = 8


def load_prompts(path):
    with open(path) as f:
        return json.load(f)["prompts"]


def stats(h):
    """h: [tokens, d] float64 -> dict of summary statistics."""
    return {
        "mean": float(h.mean()),
        "rms": float(np.sqrt((h * h).mean())),
        "max_abs": float(np.abs(h).max()),
        "last_head": [float(v) for v in h[-1, :N_HEAD_VALUES]],
    }


def summarize(logits, hiddens, vocab):
    """logits: [tokens, vocab] float64; hiddens: list of [tokens, d] (layer -1 first)."""
    out = {"positions": []}
    for t in range(logits.shape[0]):
        row = logits[t]
        top = np.argsort(-row, kind="stable")[:TOPK]
        m = row.max()
        lse = m + math.log(np.exp(row - m).sum())
        out["positions"].append({
            "argmax": int(top[0]),
            "top": [[int(i), float(row[i])] for i in top],
            "logsumexp": float(lse),
        })
    step = max(1, vocab // N_LAST)
    ids = list(range(0, vocab, step))[:N_LAST]
    out["last_ids_step"] = step
    out["last_logits"] = [float(logits[-1, i]) for i in ids]
    out["layers"] = [dict(layer=i - 1, **stats(h)) for i, h in enumerate(hiddens)]
    return out


# ---- numpy float64 engine (HF Llama/Qwen2 math) ----

def numpy_forward(weights, cfg, ids):
    d = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim", d // nh)
    eps = cfg["rms_norm_eps"]
    theta = cfg.get("rope_theta", 10000.0)
    if cfg.get("rope_scaling"):
        raise SystemExit("numpy engine: rope_scaling is not implemented; use --engine hf")
    W = lambda n: weights[n].astype(np.float64)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    T = len(ids)
    x = W("model.embed_tokens.weight")[ids]
    hiddens = [x.copy()]
    # HF: inv_freq in float32, angle = float32(inv_freq * pos); cos/sin of it
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / np.float32(hd)))).astype(np.float32)
    ang = (np.arange(T, dtype=np.float32)[:, None] * inv[None, :]).astype(np.float64)
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v: [T, heads, hd], rotate-half
        a, b = v[..., : hd // 2], v[..., hd // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        xn = rms(x, W(p + "input_layernorm.weight"))

        def lin(name, inp):
            y = inp @ W(p + name + ".weight").T
            if p + name + ".bias" in weights:
                y = y + W(p + name + ".bias")
            return y

        q = rope(lin("self_attn.q_proj", xn).reshape(T, nh, hd))
        k = rope(lin("self_attn.k_proj", xn).reshape(T, nkv, hd))
        v = lin("self_attn.v_proj", xn).reshape(T, nkv, hd)
        rep = nh // nkv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        att = np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd)
        x = x + lin("self_attn.o_proj", att)
        xn = rms(x, W(p + "post_attention_layernorm.weight"))
        g = lin("mlp.gate_proj", xn)
        u = lin("mlp.up_proj", xn)
        x = x + lin("mlp.down_proj", g / (1.0 + np.exp(-g)) * u)
        hiddens.append(x.copy())
    xn = rms(x, W("model.norm.weight"))
    head = W("lm_head.weight") if "lm_head.weight" in weights else W("model.embed_tokens.weight")
    return xn @ head.T, hiddens


def run_numpy(base, cfg, prompts):
    from safetensors.numpy import load_file
    weights = load_file(os.path.join(base, "model.safetensors"))
    res = []
    for p in prompts:
        logits, hiddens = numpy_forward(weights, cfg, np.array(p["ids"], dtype=np.int64))
        res.append((logits, hiddens))
    return res, "numpy float64 (tests/tools/golden_make.py --engine numpy)"


def run_hf(base, cfg, prompts):
    import torch
    import transformers
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(base, torch_dtype=torch.float32, attn_implementation="eager").to(dev)
    model.eval()
    captured = []

    def hook(_mod, _inp, out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        captured.append(h[0].detach().double().cpu().numpy())

    layers = model.model.layers
    handles = [l.register_forward_hook(hook) for l in layers]
    emb = []
    handles.append(model.model.embed_tokens.register_forward_hook(
        lambda _m, _i, out: emb.append(out[0].detach().double().cpu().numpy())))
    res = []
    with torch.no_grad():
        for p in prompts:
            captured.clear()
            emb.clear()
            ids = torch.tensor([p["ids"]], device=dev)
            out = model(input_ids=ids, use_cache=False)
            logits = out.logits[0].double().cpu().numpy()
            res.append((logits, [emb[0]] + list(captured)))
    for h in handles:
        h.remove()
    gen = f"transformers {transformers.__version__}, torch {torch.__version__}, float32 on {dev}, eager attention"
    return res, gen


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="folder from `qlora export-base` (model.safetensors + config.json)")
    ap.add_argument("--engine", choices=["hf", "numpy"], default="hf")
    ap.add_argument("--prompts", default=os.path.join(os.path.dirname(__file__), "..", "data", "golden", "prompts.json"))
    ap.add_argument("--model-name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    with open(os.path.join(a.base, "config.json")) as f:
        cfg = json.load(f)
    prompts = load_prompts(a.prompts)
    res, gen = (run_hf if a.engine == "hf" else run_numpy)(a.base, cfg, prompts)
    doc = {
        "generator": gen,
        "model": a.model_name,
        "n_layers": cfg["num_hidden_layers"],
        "vocab_size": cfg["vocab_size"],
        "prompts": [],
    }
    for p, (logits, hiddens) in zip(prompts, res):
        if len(hiddens) != cfg["num_hidden_layers"] + 1:
            sys.exit(f"captured {len(hiddens)} hidden states, expected {cfg['num_hidden_layers'] + 1}")
        entry = {"name": p["name"], "ids": p["ids"]}
        entry.update(summarize(np.asarray(logits, dtype=np.float64), hiddens, cfg["vocab_size"]))
        doc["prompts"].append(entry)
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {a.out} ({gen})")


if __name__ == "__main__":
    main()
