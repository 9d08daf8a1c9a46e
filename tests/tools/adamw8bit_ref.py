#!/usr/bin/env python3
"""tests/tools/adamw8bit_ref.py: an independent reference for bitsandbytes' blockwise 8-bit
AdamW, written from the text of docs/FORMATS.md §2.2-2.3 (not from our C code).

It reads the dynamic maps (qmap1 signed, qmap2 unsigned) as bitsandbytes itself computes them from
tests/data/quant/bnb_dynmap.txt (measured from bitsandbytes 0.50.2; the §2.2 float32 emulation
differs from them by up to 2 ulps in 73 entries, so it is not used), generates a deterministic
input (5000 parameters, 3 steps of gradients, some of them NaN/Inf), runs §2.3 in IEEE float32
and writes tests/data/optim/adamw8bit_ref.bin, which tests/optim/test_adamw.c compares against.

Float32 is emulated in pure Python: every +, -, *, /, sqrt of float32 inputs is done in double
and rounded to float32, which equals the correctly rounded float32 result (double has more than
2*24+2 bits). numpy is not needed.

Choices the spec leaves open, and what this script does:
  * nearest code: plain nearest over the float32 midpoints (map[j]+map[j+1])/2, a value on a
    midpoint goes to the lower index; the CUDA search may break exact ties differently, so every
    element whose scaled value lies within 1e-6 (relative) of a midpoint is flagged "near tie";
  * state1 sign fix (CUDA): if the chosen code's sign bit differs from m's, move one code toward
    m's sign;
  * weight decay after the Adam update (the CUDA kernel's order);
  * bias corrections in float32 like the CUDA kernel: c1 = 1 - f32(b1^t),
    c2 = sqrt(1 - f32(b2^t)), step_size = (-lr * c2) / c1, every operation rounded to float32
    (f32(b^t) is the correctly rounded power; 1 - b2^t cancels, so float32 vs double here
    changes c2 by ~1e-5 relative, which an update divided by c2*eps amplifies).
No block of the generated input is all zero (the spec leaves the codes of absmax 0 open).

Input generator (the C test regenerates it; keep both in step): a 64-bit LCG
    s = (s * 6364136223846793005 + 1442695040888963407) mod 2^64,  r = s >> 33  (31 bits)
seeded with 12345. p0[i] = (r % 2^21 - 2^20) * 2^-20. For step t = 1..3, gradient element i:
    mant = r1 % 2^16 - 2^15, e = r2 % 25, g = mant * 2^-15 * 2^-e   (two draws r1, r2 per element)
then for t = 2: g[7] = NaN, g[300] = +Inf, g[4999] = -Inf; for t = 3: g[301] = NaN.
All these values are exact in float32.

Output layout (little-endian):
  "QLRA8REF", u32 version=1, u32 n, u32 steps, f32 lr, beta1, beta2, eps, weight_decay,
  f32 qmap1[256], f32 qmap2[256],
  per step: u8 code1[n], u8 code2[n], u8 near_tie[n] (bit0: m, bit1: v),
            f32 absmax1[nb], f32 absmax2[nb], f32 params[n]
Usage: python3 tests/tools/adamw8bit_ref.py [OUT]   (default: tests/data/optim/adamw8bit_ref.bin)
"""
import math
import os
import struct
import sys

_F = struct.Struct("<f")


def f32(x):
    """Round a Python float to the nearest float32 (ties to even), as a Python float."""
    if math.isnan(x) or math.isinf(x):
        return x
    try:
        return _F.unpack(_F.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


# ---------------------------------------------------------------- §2.2 dynamic maps

def bnb_maps(path):
    """bitsandbytes' signed and unsigned dynamic maps from tests/data/quant/bnb_dynmap.txt
    (lines "index signed-hex unsigned-hex signed-%.9g unsigned-%.9g", '#' comments)."""
    sgn, uns = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            idx, hs, hu, ds, du = line.split()
            s, u = float.fromhex(hs), float.fromhex(hu)
            if int(idx) != len(sgn) or f32(s) != s or f32(u) != u:
                sys.exit(f"{path}: bad line {line.strip()!r}")
            if "%.9g" % s != ds or "%.9g" % u != du:
                sys.exit(f"{path}: decimal columns disagree with the hex ones: {line.strip()!r}")
            sgn.append(s)
            uns.append(u)
    if len(sgn) != 256 or sgn != sorted(sgn) or uns != sorted(uns):
        sys.exit(f"{path}: expected 256 ascending entries per map")
    if sgn[127] != 0.0 or sgn[255] != 1.0 or uns[0] != 0.0 or uns[255] != 1.0:
        sys.exit(f"{path}: landmarks of §2.2 (0.0 and 1.0) not where expected")
    return sgn, uns


# ---------------------------------------------------------------- §2.3 one step

def nearest(qmap, mids, x):
    """Index of the nearest map entry: count of midpoints strictly below x (ties to lower)."""
    lo, hi = 0, 255
    while lo < hi:
        mid = (lo + hi) // 2
        if mids[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def near_tie(mids, x):
    for m in mids:
        if abs(x - m) <= 1e-6 * max(abs(x), 1e-30):
            return True
    return False


def signbit(x):
    return math.copysign(1.0, x) < 0


def step8(p, g, code1, code2, absmax1, absmax2, t, hp, q1, q2, mids1, mids2):
    lr, b1, b2, eps, wd = hp
    n = len(p)
    c1 = f32(1.0 - f32(b1 ** t))
    c2 = f32(math.sqrt(f32(1.0 - f32(b2 ** t))))
    step_size = f32(f32(-lr * c2) / c1)
    one_b1, one_b2 = f32(1.0 - b1), f32(1.0 - b2)
    ties = [0] * n
    sign_fixes = 0
    nb = (n + 255) // 256
    for b in range(nb):
        i0, i1 = b * 256, min(n, b * 256 + 256)
        m = [0.0] * (i1 - i0)
        v = [0.0] * (i1 - i0)
        for j in range(i0, i1):
            gj = g[j]
            if math.isfinite(gj):
                mj = f32(q1[code1[j]] * absmax1[b])          # old scales
                vj = f32(q2[code2[j]] * absmax2[b])
                vj = f32(f32(vj * b2) + f32(f32(one_b2 * gj) * gj))
                mj = f32(f32(mj * b1) + f32(one_b1 * gj))
                m[j - i0], v[j - i0] = mj, vj
        a1 = max(abs(x) for x in m)
        a2 = max(abs(x) for x in v)
        absmax1[b], absmax2[b] = a1, a2
        for j in range(i0, i1):
            if not math.isfinite(g[j]):
                continue
            mj, vj = m[j - i0], v[j - i0]
            upd = f32(mj / f32(f32(math.sqrt(vj)) + f32(c2 * eps)))
            pj = f32(p[j] + f32(step_size * upd))
            if wd > 0:
                pj = f32(pj * f32(1.0 - f32(lr * wd)))
            p[j] = pj
        for j in range(i0, i1):
            mj, vj = m[j - i0], v[j - i0]
            x1, x2 = f32(mj / a1), f32(vj / a2)
            k1 = nearest(q1, mids1, x1)
            if signbit(q1[k1]) != signbit(mj):
                k1 = k1 + 1 if mj > 0 else k1 - 1
                sign_fixes += 1
            code1[j] = k1
            code2[j] = nearest(q2, mids2, x2)
            ties[j] = (1 if near_tie(mids1, x1) else 0) | (2 if near_tie(mids2, x2) else 0)
    return ties, sign_fixes


# ---------------------------------------------------------------- input

class Lcg:
    def __init__(self, seed):
        self.s = seed

    def next(self):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        return self.s >> 33


def make_input(n, steps):
    r = Lcg(12345)
    p0 = [((r.next() % (1 << 21)) - (1 << 20)) * 2.0 ** -20 for _ in range(n)]
    grads = []
    for t in range(1, steps + 1):
        g = []
        for _ in range(n):
            mant = (r.next() % (1 << 16)) - (1 << 15)
            e = r.next() % 25
            g.append(mant * 2.0 ** -15 * 2.0 ** -e)
        if t == 2:
            g[7], g[300], g[4999] = math.nan, math.inf, -math.inf
        if t == 3:
            g[301] = math.nan
        grads.append(g)
    return p0, grads


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "tests", "data", "optim",
                                                                  "adamw8bit_ref.bin")
    q1, q2 = bnb_maps(os.path.join(root, "tests", "data", "quant", "bnb_dynmap.txt"))
    mids1 = [f32(f32(q1[j] + q1[j + 1]) * 0.5) for j in range(255)]
    mids2 = [f32(f32(q2[j] + q2[j + 1]) * 0.5) for j in range(255)]

    n, steps = 5000, 3
    hp = (f32(0.01), f32(0.9), f32(0.999), f32(1e-8), f32(0.1))
    nb = (n + 255) // 256
    p, grads = make_input(n, steps)
    code1, code2 = [0] * n, [0] * n
    absmax1, absmax2 = [0.0] * nb, [0.0] * nb

    blob = bytearray(b"QLRA8REF")
    blob += struct.pack("<III", 1, n, steps)
    blob += struct.pack("<5f", *hp)
    blob += struct.pack("<256f", *q1) + struct.pack("<256f", *q2)
    for t in range(1, steps + 1):
        ties, fixes = step8(p, grads[t - 1], code1, code2, absmax1, absmax2, t, hp, q1, q2, mids1, mids2)
        blob += bytes(code1) + bytes(code2) + bytes(ties)
        blob += struct.pack(f"<{nb}f", *absmax1) + struct.pack(f"<{nb}f", *absmax2)
        blob += struct.pack(f"<{n}f", *p)
        print(f"step {t}: {sum(1 for x in ties if x)} near-tie elements, {fixes} sign fixes")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(blob)
    print(f"wrote {out_path} ({len(blob)} bytes)")


if __name__ == "__main__":
    main()
