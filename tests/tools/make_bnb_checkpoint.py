#!/usr/bin/env python3
"""tests/tools/make_bnb_checkpoint.py: turns an HF checkpoint folder (Llama family, bf16/f16/f32)
into a bitsandbytes 4-bit one exactly as transformers saves it (spec FORMATS.md §1.7): every
decoder linear becomes Linear4bit nf4 (block 64, double-quantized absmax unless
--no-double-quant), embeddings/norms/lm_head stay as they are. The output folder is what
`qlora generate -m OUT ...` loads through model/loader_bnb.c without re-quantization.

Needs a CUDA GPU and `pip install torch transformers accelerate bitsandbytes safetensors`
(bitsandbytes quantizes on the GPU). Not run in CI; our C tests write their own bnb-style
files (tests/model/test_bnb.c). Usage:

    python3 tests/tools/make_bnb_checkpoint.py SRC_HF_FOLDER OUT_FOLDER [--no-double-quant]
        [--compute-dtype bfloat16|float16|float32] [--reference]

--reference also writes OUT.bnb_reference.safetensors (beside OUT, not in it: the loader reads
every *.safetensors of an unsharded folder and would see the names twice): layer 0's seven linears dequantized by
bitsandbytes itself (float32, HF names), for comparing with our dequantization of the same
bytes (`qlora` loads OUT and qlr_model_export_hf writes ours). Prints the quant-state keys of
one weight so the layout can be checked against §1.7 by eye.
"""
import argparse
import json
import os
import shutil
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reference", action="store_true")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not torch.cuda.is_available():
        sys.exit("make_bnb_checkpoint: bitsandbytes 4-bit quantization needs a CUDA GPU")
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=not a.no_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, a.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )
    model = AutoModelForCausalLM.from_pretrained(a.src, quantization_config=qc, device_map={"": 0})
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        p = os.path.join(a.src, f)
        if os.path.exists(p) and not os.path.exists(os.path.join(a.out, f)):
            shutil.copy(p, a.out)

    from safetensors import safe_open

    shards = sorted(f for f in os.listdir(a.out) if f.endswith(".safetensors"))
    w0 = "model.layers.0.self_attn.q_proj.weight"
    for s in shards:
        with safe_open(os.path.join(a.out, s), "pt") as f:
            keys = [k for k in f.keys() if k.startswith(w0)]
            for k in sorted(keys):
                t = f.get_tensor(k)
                print(f"{s}: {k}: {str(t.dtype).replace('torch.', '')} {list(t.shape)}")
                if "quant_state" in k:
                    print("    " + json.dumps(json.loads(bytes(t.tolist()).decode("utf-8"))))

    if a.reference:
        import bitsandbytes.functional as F
        from safetensors.torch import save_file

        ref = {}
        layer = model.model.layers[0]
        for grp, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for n in names:
                w = getattr(getattr(layer, grp), n).weight
                deq = F.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
                ref[f"model.layers.0.{grp}.{n}.weight"] = deq.cpu().contiguous()
        rp = a.out.rstrip("/") + ".bnb_reference.safetensors"
        save_file(ref, rp)
        print(f"wrote {rp} ({len(ref)} tensors)")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
