#!/usr/bin/env python3
"""tests/tools/make_bnb_nf4_ref.py: reference bytes of bitsandbytes' NF4 quantizer for
tests/quant/test_nf4_bnb.c (writes tests/data/quant/bnb_nf4_ref.json).

For each case it makes a float32 matrix from a seed with integer arithmetic that the C test
repeats bit for bit, quantizes it with

    bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                          compress_statistics=True, quant_storage=torch.uint8)

on a CUDA GPU and records the 4-bit codes, the 8-bit absmax codes, the second-level absmax and
the offset (crc32 and size of each array, the bytes themselves in hex when small), and the
elements where bitsandbytes differs from an IEEE computation of the same algorithm (its kernels
are built with --use_fast_math, so 1/absmax is the GPU's approximate reciprocal). The cases
cover a partial block of 64 (and odd n, whose last byte has a padding nibble), a partial group
of 256 blocks, an all-zero block, SmolLM2's q_proj/gate_proj shapes, a bfloat16 input and one
matrix large enough (131584 blocks) that torch's CUDA mean splits over several thread blocks.

    python3 tests/tools/make_bnb_nf4_ref.py [--out tests/data/quant/bnb_nf4_ref.json]
        [--backend bnb|emulate]

--backend bnb (the default) needs a CUDA GPU, torch and bitsandbytes (0.50.2 was read for the
emulation below). bitsandbytes' CPU path is NOT a substitute: in 0.50.x quantize_4bit on the CPU
runs the pure-PyTorch backend (bucketize on recomputed midpoints, division in the last partial
block, padding nibble 0, torch's CPU mean) and its 8-bit CPU kernel uses a 65536-entry lookup
table, so its bytes differ from the CUDA kernels' in the last bits.

--backend emulate computes the same arrays with numpy only, from a reading of bitsandbytes'
and PyTorch's CUDA sources (kQuantizeBlockwiseSmall + dQuantizeNF4, kQuantizeBlockwise +
dQuantize<0>, Reduce.cuh's order for a float32 mean). It is an independent second
implementation of what quant/nf4.c does, not bitsandbytes; the file it writes says so
("producer"), and the C test prints which producer its reference came from. Replace such a file
by one made with --backend bnb on a GPU.
"""
import argparse
import json
import sys
import zlib

import numpy as np

MASK = (1 << 64) - 1

# (name, rows, cols, seed, dtype, zero_row): zero_row >= 0 zeroes that row (whole zero blocks)
CASES = [
    ("odd_single_partial_block", 1, 15, 1, "float32", -1),
    ("odd_partial_last_block", 7, 37, 2, "float32", -1),
    ("partial_group_zero_row", 96, 200, 3, "float32", 5),
    ("odd_172_blocks", 33, 333, 4, "float32", -1),
    ("groups_8_partial", 128, 1000, 5, "float32", -1),
    ("smollm2_q_proj", 576, 576, 6, "float32", -1),
    ("smollm2_gate_proj_bf16", 1536, 576, 7, "bfloat16", -1),
    ("multi_cta_mean", 4096, 2056, 8, "float32", -1),
]
HEX_LIMIT = 4096  # arrays up to this many bytes are stored whole


def splitmix64(z):
    """splitmix64 of a uint64 numpy array (the finalizer of the C test's generator)."""
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(MASK)
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(MASK)
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(MASK)
    return z ^ (z >> np.uint64(31))


def make_input(rows, cols, seed, dtype, zero_row):
    """x[r, c] = ((h >> 40) - 2^23) * 2^-23 * scale[r] in float32, h = splitmix64(seed << 32 | i),
    scale[r] = (8 + r % 7) / 8 * 2^-(4 + r % 5); bfloat16 cases round that to bfloat16 (RNE)."""
    n = rows * cols
    with np.errstate(over="ignore"):
        i = np.arange(n, dtype=np.uint64)
        h = splitmix64((np.uint64(seed) << np.uint64(32)) | i)
    k = (h >> np.uint64(40)).astype(np.int64) - (1 << 23)
    v = k.astype(np.float32) * np.float32(2.0 ** -23)
    r = np.arange(rows)
    scale = ((8 + r % 7).astype(np.float32) / np.float32(8)) * np.exp2(-(4 + r % 5)).astype(np.float32)
    x = (v.reshape(rows, cols) * scale.astype(np.float32)[:, None]).astype(np.float32)
    if zero_row >= 0:
        x[zero_row, :] = 0
    if dtype == "bfloat16":
        b = x.view(np.uint32).astype(np.uint64)
        b = (b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
        x = (b.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


# ---------------------------------------------------------------- the emulation backend

def literal_f32(text):
    """A C float literal: the decimal rounded once to float32 (not via double)."""
    from decimal import Decimal
    d = Decimal(text)
    f = np.float32(float(d))
    # step to the neighbour if it is nearer to the exact decimal (double rounding fix)
    best = f
    for cand in (np.nextafter(f, np.float32(-2)), np.nextafter(f, np.float32(2))):
        if abs(Decimal(float(cand)) - d) < abs(Decimal(float(best)) - d):
            best = cand
    return np.float32(best)


NF4_THRESH = np.array([literal_f32(t) for t in (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011")], dtype=np.float32)


def nf4_codes(s):
    """dQuantizeNF4 on float32 values: the number of thresholds s is strictly above (NaN: 0)."""
    c = np.zeros(s.shape, dtype=np.uint8)
    for t in NF4_THRESH:
        c += (s > t)
    return c


def block_absmax(x, block):
    """kQuantizeBlockwise*: max |x| per block from -FLT_MAX; a partial block also sees zeros."""
    n = x.size
    nb = -(-n // block)
    full = np.full(nb * block, -np.finfo(np.float32).max, dtype=np.float32)
    full[:n] = np.abs(x)
    m = np.fmax.reduce(full.reshape(nb, block), axis=1)
    if n % block:
        m[-1] = np.fmax(m[-1], np.float32(0))
    return m.astype(np.float32)


def dquantize8(code, x):
    """dQuantize<0>: the 7-step search from index 127 and the midpoint test, vectorized."""
    x = x.astype(np.float32)
    pivot = np.full(x.shape, 127, dtype=np.int64)
    upper_p = np.full(x.shape, 255, dtype=np.int64)
    lower_p = np.zeros(x.shape, dtype=np.int64)
    lower = np.full(x.shape, -1.0, dtype=np.float32)
    upper = np.full(x.shape, 1.0, dtype=np.float32)
    val = code[pivot]
    step = 64
    while step > 0:
        gt = x > val
        lower_p = np.where(gt, pivot, lower_p)
        lower = np.where(gt, val, lower)
        upper_p = np.where(gt, upper_p, pivot)
        upper = np.where(gt, upper, val)
        pivot = np.where(gt, pivot + step, pivot - step)
        val = code[pivot]
        step >>= 1
    upper = np.where(upper_p == 255, code[255], upper).astype(np.float32)
    lower = np.where(lower_p == 0, code[0], lower).astype(np.float32)
    gt = x > val
    mid_up = ((upper + val) * np.float32(0.5)).astype(np.float32)
    mid_lo = ((lower + val) * np.float32(0.5)).astype(np.float32)
    res = np.where(gt, np.where(x > mid_up, upper_p, pivot), np.where(x < mid_lo, lower_p, pivot))
    return res.astype(np.uint8)


def last_pow2(n):
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def block_x_reduce(v):
    """Reduce.cuh block_x_reduce (CUDA build): shared halving to 32, then shuffles 16..1."""
    v = v.copy()
    w = v.size
    o = w // 2
    while o >= 32:
        v[:o] = (v[:o] + v[o:2 * o]).astype(np.float32)
        o //= 2
    o = min(w, 32) // 2
    while o > 0:
        v[:o] = (v[:o] + v[o:2 * o]).astype(np.float32)
        o //= 2
    return v[0]


def torch_cuda_mean(x, sms=132, threads_per_sm=2048):
    """torch.mean of a contiguous 1-D float32 CUDA tensor, in Reduce.cuh's order."""
    x = x.astype(np.float32)
    n = x.size
    vec = n >= 128
    dim0 = n // 4 if vec else n
    w = last_pow2(dim0) if dim0 < 512 else 512
    vpt = -(-n // w)
    ctas = 1
    if vpt >= 16 and vpt >= 256:
        target = sms * (threads_per_sm // w)
        ctas = max(min(target, -(-vpt // 16)), -(-vpt // 256))
    stride = w * ctas
    blocks = np.zeros(ctas, dtype=np.float32)
    for c in range(ctas):
        v = np.zeros(w, dtype=np.float32)
        for t in range(w):
            acc = [np.float32(0)] * 4
            idx = t + c * w
            if vec:
                nv = n // 4
                idxs = np.arange(idx, nv, stride)
                for i in range(4):
                    for e in x[idxs * 4 + i]:
                        acc[i] = np.float32(acc[i] + e)
                tail = n - n % 4 + t
                if c == 0 and tail < n:
                    acc[0] = np.float32(acc[0] + x[tail])
            else:
                while idx + 3 * stride < n:
                    for i in range(4):
                        acc[i] = np.float32(acc[i] + x[idx + i * stride])
                    idx += 4 * stride
                for i in range(4):
                    if idx >= n:
                        break
                    acc[i] = np.float32(acc[i] + x[idx])
                    idx += stride
            v[t] = np.float32(np.float32(np.float32(acc[0] + acc[1]) + acc[2]) + acc[3])
        blocks[c] = block_x_reduce(v)
    s = blocks[0]
    if ctas > 1:
        v = np.zeros(w, dtype=np.float32)
        for t in range(w):
            a = np.float32(0)
            for k in range(t, ctas, w):
                a = np.float32(a + blocks[k])
            v[t] = a
        s = block_x_reduce(v)
    return np.float32(s * np.float32(np.float32(1.0) / np.float32(n)))


def emulate(x):
    from_dyn = dynamic_map()
    flat = x.reshape(-1)
    n = flat.size
    absmax = block_absmax(flat, 64)
    nb = absmax.size
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (np.float32(1.0) / absmax).astype(np.float32)
        padded = np.zeros(nb * 64, dtype=np.float32)
        padded[:n] = flat
        s = (padded.reshape(nb, 64) * r[:, None]).astype(np.float32).reshape(-1)
    codes = nf4_codes(s)[: n + (n % 2)]
    packed = ((codes[0::2] << 4) | codes[1::2]).astype(np.uint8)
    offset = torch_cuda_mean(absmax)
    centered = (absmax - offset).astype(np.float32)
    nested = block_absmax(centered, 256)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = (np.float32(1.0) / nested).astype(np.float32)
        ng = nested.size
        padded = np.zeros(ng * 256, dtype=np.float32)
        padded[:nb] = centered
        s2 = (padded.reshape(ng, 256) * r2[:, None]).astype(np.float32).reshape(-1)[:nb]
    qabs = dquantize8(from_dyn, s2)
    return packed, qabs, nested, offset


def dynamic_map():
    """bitsandbytes' signed dynamic map as measured from bitsandbytes 0.50.2 on a GPU
    (tests/data/quant/bnb_dynmap.txt, the table quant/dynmap.c holds)."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "data", "quant", "bnb_dynmap.txt")
    vals = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            vals.append(np.float32(float.fromhex(parts[1])))
    if len(vals) != 256:
        sys.exit("make_bnb_nf4_ref: %s: expected 256 entries, got %d" % (path, len(vals)))
    return np.array(vals, dtype=np.float32)


# ---------------------------------------------------------------- the bitsandbytes backend

def run_bnb(x, dtype):
    import torch
    import bitsandbytes.functional as F

    if not torch.cuda.is_available():
        sys.exit("make_bnb_nf4_ref: --backend bnb needs a CUDA GPU")
    t = torch.from_numpy(x).to("cuda")
    if dtype == "bfloat16":
        t = t.to(torch.bfloat16)
    packed, st = F.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.uint8)
    torch.cuda.synchronize()
    return (packed.reshape(-1).cpu().numpy().astype(np.uint8),
            st.absmax.reshape(-1).cpu().numpy().astype(np.uint8),
            st.state2.absmax.reshape(-1).float().cpu().numpy().astype(np.float32),
            np.float32(st.offset.float().cpu().item()))


def entry(arr):
    b = arr.tobytes()
    e = {"size": len(b), "crc32": "%08x" % (zlib.crc32(b) & 0xFFFFFFFF)}
    if len(b) <= HEX_LIMIT:
        e["hex"] = b.hex()
    return e


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/quant/bnb_nf4_ref.json")
    ap.add_argument("--backend", default="bnb", choices=["bnb", "emulate"])
    a = ap.parse_args()
    meta = {"generator": "tests/tools/make_bnb_nf4_ref.py", "backend": a.backend}
    if a.backend == "bnb":
        import torch
        import bitsandbytes
        meta["producer"] = "bitsandbytes %s, torch %s, %s" % (
            bitsandbytes.__version__, torch.__version__, torch.cuda.get_device_name(0))
    else:
        meta["producer"] = ("EMULATION (numpy reading of bitsandbytes 0.50.2 / PyTorch CUDA sources), "
                            "not bitsandbytes: regenerate with --backend bnb on a GPU")
    cases = []
    for name, rows, cols, seed, dtype, zero_row in CASES:
        x = make_input(rows, cols, seed, dtype, zero_row)
        e_packed, e_qabs, e_nested, e_offset = emulate(x)
        if a.backend == "emulate":
            packed, qabs, nested, offset = e_packed, e_qabs, e_nested, e_offset
        else:
            packed, qabs, nested, offset = run_bnb(x, dtype)
        # bitsandbytes builds its kernels with --use_fast_math: r = 1.0f / absmax is the GPU's
        # approximate reciprocal (within 1 ulp), so an element whose scaled value falls within
        # an ulp of a decision threshold can get the neighbouring code. Such elements are listed
        # (index, bitsandbytes' code) against the IEEE computation; the C test checks each one
        # is explained by a 1-ulp reciprocal and that everything else is equal.
        n = rows * cols
        bc = np.stack([packed >> 4, packed & 15], axis=1).reshape(-1)[:n]
        ec = np.stack([e_packed >> 4, e_packed & 15], axis=1).reshape(-1)[:n]
        code_diff = np.nonzero(bc != ec)[0]
        abs_diff = np.nonzero(qabs != e_qabs)[0]
        cases.append({
            "name": name, "rows": rows, "cols": cols, "seed": seed, "dtype": dtype, "zero_row": zero_row,
            "offset_bits": "%08x" % int(np.float32(offset).view(np.uint32)),
            "codes": entry(packed), "absmax_q": entry(qabs), "nested_absmax": entry(nested.astype("<f4")),
            "codes_fastmath": [[int(i), int(bc[i])] for i in code_diff[:1000]],
            "absmax_q_fastmath": [[int(j), int(qabs[j])] for j in abs_diff[:1000]],
        })
        print("%-26s n %9d: offset %.9g%s, %d nested groups, %d codes and %d absmax codes differ from the "
              "IEEE computation" % (name, n, float(offset), "" if np.float32(offset) == e_offset else
                                    " (IEEE emulation: %.9g)" % float(e_offset), nested.size, code_diff.size,
                                    abs_diff.size), file=sys.stderr)
    meta["cases"] = cases
    with open(a.out, "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print("wrote %s (%s)" % (a.out, meta["producer"]), file=sys.stderr)


if __name__ == "__main__":
    main()
