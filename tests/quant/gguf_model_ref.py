#!/usr/bin/env python3
"""tests/quant/gguf_model_ref.py: reference data for test_quant_demo from a real GGUF model,
using the PyPI `gguf` package. Usage: gguf_model_ref.py MODEL.gguf OUT_FILE. Exit code 77
when gguf/numpy are not importable.

For every tensor (little-endian): u32 ggml type, u32 pad, i64 ne0, i64 nrows, u64 absolute
file offset of the data, u64 data bytes, f64 sum and f64 sum of squares of gguf's dequantized
values, u32 n_sample, then n_sample float32: the first n_sample/2 and the last n_sample/2
dequantized values.
"""
import struct
import sys

try:
    import numpy as np
    import gguf
    from gguf import quants
except Exception as e:  # noqa: BLE001
    print(f"gguf_model_ref.py: gguf/numpy not importable ({e})", file=sys.stderr)
    sys.exit(77)

reader = gguf.GGUFReader(sys.argv[1])
with open(sys.argv[2], "wb") as f:
    for t in reader.tensors:
        ne0 = int(t.shape[0])
        n = int(t.n_elements)
        flat = np.asarray(t.data).reshape(-1) if t.tensor_type != gguf.GGMLQuantizationType.F32 \
            else np.asarray(t.data, dtype=np.float32).reshape(-1)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            y = flat.astype(np.float32)
        else:
            y = quants.dequantize(np.asarray(t.data).reshape(n // ne0, -1), t.tensor_type).reshape(-1)
        y = y.astype(np.float32)
        half = min(n // 2, 4096)
        sample = np.concatenate([y[:half], y[n - half:]]).astype("<f4")
        y64 = y.astype(np.float64)
        f.write(struct.pack("<IIqqQQddI", int(t.tensor_type), 0, ne0, n // ne0, int(t.data_offset),
                            int(t.n_bytes), float(y64.sum()), float((y64 * y64).sum()), sample.size))
        f.write(sample.tobytes())
