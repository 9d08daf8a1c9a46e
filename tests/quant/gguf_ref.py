#!/usr/bin/env python3
"""tests/quant/gguf_ref.py: writes reference data for test_ggml_quants from the PyPI `gguf`
package (gguf.quants, numpy). Usage: gguf_ref.py OUT_FILE [SEED]. Exit code 77 when gguf or
numpy is not importable (the C test then prints a note and skips this cross-check).

Record format (little-endian), repeated until EOF:
  u32 kind (0 = dequant: bytes are blocks, floats the expected output;
            1 = quantize: floats are the input, bytes the expected blocks)
  u32 ggml type id, u32 n_floats, u32 n_bytes, then n_bytes bytes, then n_floats float32.
"""
import struct
import sys

try:
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf import quants
except Exception as e:  # noqa: BLE001 - any import problem means "skip"
    print(f"gguf_ref.py: gguf/numpy not importable ({e})", file=sys.stderr)
    sys.exit(77)

out_path = sys.argv[1]
rng = np.random.default_rng(int(sys.argv[2]) if len(sys.argv) > 2 else 1234)

# (type, elements per block, bytes per block, offsets of fp16 scale fields)
BLOCKS = [
    (T.Q8_0, 32, 34, [0]),
    (T.Q4_0, 32, 18, [0]),
    (T.Q4_1, 32, 20, [0, 2]),
    (T.Q5_0, 32, 22, [0]),
    (T.Q4_K, 256, 144, [0, 2]),
    (T.Q6_K, 256, 210, [208]),
]


def rec(f, kind, t, floats, raw):
    floats = np.ascontiguousarray(floats, dtype="<f4").ravel()
    raw = np.ascontiguousarray(raw, dtype=np.uint8).ravel()
    f.write(struct.pack("<IIII", kind, int(t), floats.size, raw.size))
    f.write(raw.tobytes())
    f.write(floats.tobytes())


with open(out_path, "wb") as f:
    for t, be, bb, dofs in BLOCKS:
        nb = 64
        raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
        for o in dofs:  # finite fp16 scales of varied sign and magnitude
            d = (rng.standard_normal(nb) * 10.0 ** rng.integers(-4, 1, nb)).astype(np.float16)
            raw[:, o:o + 2] = d.view(np.uint8).reshape(nb, 2)
        raw[0, dofs[0]:dofs[0] + 2] = 0  # one block with d = 0
        rec(f, 0, t, quants.dequantize(raw.reshape(1, -1), t), raw)
    x = (rng.standard_normal(4096) * 0.05).astype(np.float32)
    rec(f, 0, T.F16, quants.dequantize(x.astype(np.float16).view(np.uint8).reshape(1, -1), T.F16),
        x.astype(np.float16).view(np.uint8))
    b16 = quants.quantize(x.reshape(1, -1), T.BF16)
    rec(f, 0, T.BF16, quants.dequantize(b16, T.BF16), b16)
    rec(f, 1, T.BF16, x, b16)
    for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0):
        x = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
        x[0, :32] = 0.0           # an all-zero block
        x[1, :32] = np.abs(x[1, :32])  # an all-positive block
        x[2, 5] = 1.0             # an outlier
        rec(f, 1, t, x, quants.quantize(x, t))
