#!/usr/bin/env python3
"""tests/adapters/lora_py_check.py: lists an exported adapter with the reference Python readers so
that test_lora.c can compare the listing with what it expects.

  lora_py_check.py gguf FILE   -> gguf-py GGUFReader: selected keys with their value types, and every
                                  tensor as "tensor NAME TYPE ne0,ne1 crc32" (sorted)
  lora_py_check.py peft DIR    -> safetensors safe_open: metadata and tensors "tensor NAME float32
                                  s0,s1 crc32" (sorted); "config sorted-indent2 yes|no" says whether
                                  adapter_config.json equals json.dumps(indent=2, sort_keys=True)

Exit status 77 when the needed package is not importable (the caller prints a skip note)."""
import json
import os
import sys
import zlib


def gguf_listing(path):
    try:
        from gguf import GGUFReader, GGUFValueType
    except Exception:  # noqa: BLE001
        sys.exit(77)
    r = GGUFReader(path)
    out = []
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha",
                "general.quantization_version"):
        f = r.fields.get(key)
        if f is None:
            out.append(f"kv {key} MISSING")
            continue
        t = GGUFValueType(f.types[0]).name
        v = f.parts[f.data[0]]
        if t == "STRING":
            val = bytes(v).decode()
        elif t == "FLOAT32":
            val = "0x%08x" % int(v[:1].view("<u4")[0])  # float32 bits
        else:
            val = str(int(v[0]))
        out.append(f"kv {key} {t} {val}")
    ts = []
    for t in r.tensors:
        ne = ",".join(str(int(x)) for x in t.shape)
        crc = zlib.crc32(bytes(t.data.tobytes())) & 0xffffffff
        ts.append(f"tensor {t.name} {t.tensor_type.name} {ne} {crc:08x}")
    out += sorted(ts)
    return out


def peft_listing(d):
    try:
        from safetensors import safe_open
    except Exception:  # noqa: BLE001
        sys.exit(77)
    out = []
    with safe_open(os.path.join(d, "adapter_model.safetensors"), framework="np") as f:
        meta = f.metadata() or {}
        out.append(f"meta format {meta.get('format')}")
        ts = []
        for k in f.keys():
            a = f.get_tensor(k)
            crc = zlib.crc32(a.tobytes()) & 0xffffffff
            ts.append(f"tensor {k} {a.dtype} {a.shape[0]},{a.shape[1]} {crc:08x}")
        out += sorted(ts)
    with open(os.path.join(d, "adapter_config.json"), encoding="utf-8") as fh:
        text = fh.read()
    cfg = json.loads(text)
    same = json.dumps(cfg, indent=2, sort_keys=True) == text
    out.append(f"config sorted-indent2 {'yes' if same else 'no'}")
    out.append(f"config peft_type {cfg.get('peft_type')} r {cfg.get('r')} lora_alpha {cfg.get('lora_alpha')} "
               f"use_rslora {cfg.get('use_rslora')} target_modules {','.join(cfg.get('target_modules') or [])}")
    return out


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("gguf", "peft"):
        print(__doc__, file=sys.stderr)
        return 2
    lines = gguf_listing(sys.argv[2]) if sys.argv[1] == "gguf" else peft_listing(sys.argv[2])
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
