#!/usr/bin/env python3
"""tests/tools/make_bad_gguf.py: generates the committed GGUF test inputs (Python stdlib only).

Writes
  tests/data/gguf_bad/*.gguf      one small file per corruption, each a single change to a valid
                                  base file, and EXPECTED.txt: "<file>\t<substring>[|<alt>...]"
                                  that the reader's error message must contain (test_gguf_bad);
  tests/fuzz/corpus/gguf/*.gguf   small VALID files used as fuzzing seeds (and checked to load).
Run from anywhere: python3 tests/tools/make_bad_gguf.py [repo root]. The output is deterministic;
re-run and commit after changing a case. The layout follows docs/FORMATS.md §3.
"""
import os
import struct
import sys

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR_FMT = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f",
              BOOL: "B", UINT64: "Q", INT64: "q", FLOAT64: "d"}
F32, F16, Q4_0 = 0, 1, 2
TYPE_BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18)}


class Gguf:
    """A GGUF file under construction; build() serializes it, with hooks to corrupt any field."""

    def __init__(self, version=3, alignment=32, endian="<"):
        self.version = version
        self.alignment = alignment
        self.e = endian
        self.magic = b"GGUF"
        self.kvs = []       # (key bytes, type, value) or (key bytes, type, raw value bytes, True)
        self.tensors = []   # dicts: name, ne, type, data, offset (None = dense)
        self.n_kv = None    # overrides of the header counts
        self.n_tensors = None

    def p(self, fmt, *v):
        return struct.pack(self.e + fmt, *v)

    def s(self, b):
        if isinstance(b, str):
            b = b.encode()
        return self.p("Q", len(b)) + b

    def value(self, t, v):
        if t == STRING:
            return self.s(v)
        if t == ARRAY:
            et, items = v
            out = self.p("I", et) + self.p("Q", len(items))
            for it in items:
                out += self.value(et, it)
            return out
        return self.p(SCALAR_FMT[t], v)

    def kv(self, key, t, v):
        self.kvs.append((key.encode() if isinstance(key, str) else key, t, v))
        return self

    def kv_raw(self, key, t, raw):
        self.kvs.append((key.encode() if isinstance(key, str) else key, t, raw, True))
        return self

    def tensor(self, name, ne, t, offset=None, data=None):
        bs, ts = TYPE_BLOCK.get(t, (1, 4))
        n = 1
        for d in ne[1:]:
            n *= d
        size = (ne[0] // bs) * ts * n if ne else 0
        if data is None:
            data = bytes((i * 7 + len(self.tensors)) & 0xFF for i in range(min(size, 1 << 16)))
        self.tensors.append(dict(name=name.encode() if isinstance(name, str) else name, ne=list(ne), type=t,
                                 offset=offset, data=data, n_dims=len(ne)))
        return self

    def build(self):
        out = self.magic + self.p("I", self.version)
        out += self.p("Q", len(self.tensors) if self.n_tensors is None else self.n_tensors)
        out += self.p("Q", len(self.kvs) if self.n_kv is None else self.n_kv)
        for kv in self.kvs:
            out += self.s(kv[0]) + self.p("I", kv[1])
            out += kv[2] if len(kv) == 4 else self.value(kv[1], kv[2])
        a = self.alignment
        off = 0
        for t in self.tensors:
            out += self.s(t["name"]) + self.p("I", t["n_dims"])
            for d in t["ne"]:
                out += self.p("Q", d)
            out += self.p("I", t["type"])
            out += self.p("Q", off if t["offset"] is None else t["offset"])
            off += (len(t["data"]) + a - 1) // a * a
        out += b"\0" * (-len(out) % a)
        for t in self.tensors:
            out += t["data"] + b"\0" * (-len(t["data"]) % a)
        return out


def base(**kw):
    g = Gguf(**kw)
    g.kv("general.architecture", STRING, "llama")
    g.kv("general.name", STRING, "tiny test model")
    g.kv("llama.block_count", UINT32, 2)
    g.kv("llama.rope.freq_base", FLOAT32, 10000.0)
    g.kv("tokenizer.ggml.tokens", ARRAY, (STRING, ["<s>", "</s>", "a", "b", ""]))
    g.kv("tokenizer.ggml.token_type", ARRAY, (INT32, [3, 3, 1, 1, 1]))
    g.kv("tokenizer.ggml.add_bos_token", BOOL, 1)
    g.tensor("token_embd.weight", [8, 4], F32)
    g.tensor("blk.0.attn_q.weight", [32, 2], Q4_0)
    g.tensor("output_norm.weight", [8], F16)
    return g


def all_types():
    g = Gguf()
    for i, (t, v) in enumerate([(UINT8, 200), (INT8, -100), (UINT16, 60000), (INT16, -30000),
                                (UINT32, 4000000000), (INT32, -2000000000), (FLOAT32, 1.5), (BOOL, 0),
                                (STRING, "h\u00e9llo\nworld"), (UINT64, 1 << 60), (INT64, -(1 << 60)),
                                (FLOAT64, 3.25)]):
        g.kv("t.scalar.%d" % i, t, v)
        if t != STRING:
            g.kv("t.array.%d" % i, ARRAY, (t, [v, v]))
    g.kv("t.array.strings", ARRAY, (STRING, ["x", "", "yz"]))
    g.kv("t.array.empty", ARRAY, (UINT32, []))
    g.tensor("a", [4, 3, 2, 1], F32)
    return g


def bad_cases():
    """(file name, bytes, expected message substrings joined by '|')."""
    cases = []

    def add(name, g_or_bytes, expect):
        data = g_or_bytes if isinstance(g_or_bytes, bytes) else g_or_bytes.build()
        cases.append((name, data, expect))

    good = base().build()
    add("empty", b"", "empty")
    g = base(); g.magic = b"GGML"; add("bad_magic", g, "not a GGUF file")
    add("version1", base(version=1), "version 1 is not supported")
    add("version4", base(version=4), "version 4 is not supported")
    add("byteswapped", base(endian=">"), "byte-swapped")
    add("truncated_header", good[:13], "file truncated")
    # cut inside the FLOAT32 value of kv 3 (after its key and type)
    cut = good.index(b"llama.rope.freq_base") + len(b"llama.rope.freq_base") + 4 + 2
    add("truncated_in_kv", good[:cut], "key 'llama.rope.freq_base': file truncated: value needs 4 bytes")
    # cut inside the value type of the last kv
    cut = good.index(b"add_bos_token") + len(b"add_bos_token") + 2
    add("truncated_in_kv_type", good[:cut], "file truncated: value type needs 4 bytes")
    g = base(); g.n_kv = 1 << 60; add("huge_kv_count", g, "metadata kv count")
    g = base(); g.n_tensors = 1 << 60; add("huge_tensor_count", g, "tensor count")
    g = base(); g.n_tensors = 4; add("tensor_count_too_big", g, "tensor 3")
    g = base(); g.kv_raw("general.url", STRING, g.p("Q", 1 << 40) + b"abc"); add("string_past_end", g, "runs past the end")
    g = base(); g.kv_raw("x", STRING, g.p("Q", (1 << 64) - 1)); add("string_len_max", g, "runs past the end")
    g = base(); g.kvs.append((b"k" * 10, UINT8, b"\x01", True))
    data = g.build().replace(g.p("Q", 10) + b"k" * 10, g.p("Q", 5000) + b"k" * 10)
    add("key_unterminated", data, "key length 5000 runs past the end")
    data = g.build().replace(g.p("Q", 10) + b"k" * 10, g.p("Q", 1 << 63) + b"k" * 10)
    add("key_oversized", data, "exceeds the 65535-byte limit")
    g = base(); g.kv("", UINT8, 1); add("empty_key", g, "empty key")
    g = base(); g.kv(b"a\0b", UINT8, 1); add("key_with_nul", g, "NUL byte")
    g = base(); g.kv_raw("general.weird", 13, b"\0" * 8); add("unknown_value_type", g, "unknown value type 13")
    g = base(); g.kv_raw("general.weird", 0xFFFFFFFF, b"\0" * 8); add("unknown_value_type_max", g, "unknown value type")
    g = base(); g.kv_raw("general.nested", ARRAY, g.p("I", ARRAY) + g.p("Q", 1) + g.p("I", UINT8) + g.p("Q", 1) + b"\x01")
    add("array_of_arrays", g, "arrays of arrays")
    g = base(); g.kv_raw("general.arr", ARRAY, g.p("I", 77) + g.p("Q", 1) + b"\0" * 8)
    add("array_unknown_elem_type", g, "unknown array element type 77")
    g = base(); g.kv_raw("general.arr", ARRAY, g.p("I", UINT8) + g.p("Q", 1 << 62) + b"\1\2\3")
    add("huge_array_count", g, "cannot fit")
    g = base(); g.kv_raw("general.arr", ARRAY, g.p("I", UINT64) + g.p("Q", (1 << 61) + 1) + b"\1" * 16)
    add("huge_array_bytes_overflow", g, "cannot fit")
    g = base(); g.kv_raw("tokenizer.ggml.merges", ARRAY, g.p("I", STRING) + g.p("Q", 1 << 60) + g.s("a b"))
    add("huge_string_array_count", g, "cannot fit")
    g = base(); g.kv_raw("tokenizer.ggml.merges", ARRAY, g.p("I", STRING) + g.p("Q", 3) + g.s("a b") + g.p("Q", 999) + b"xx")
    add("string_array_elem_past_end", g, "array string length 999 runs past the end")
    g = base(); g.kv("general.name", STRING, "again"); add("duplicate_key", g, "duplicate key")
    g = base(); g.tensor("token_embd.weight", [8], F32); add("duplicate_tensor", g, "duplicate tensor name")
    g = base(); g.tensor("x", [], F32); add("n_dims_0", g, "n_dims is 0")
    g = base(); g.tensor("x", [1, 1, 1, 1, 1], F32); add("n_dims_5", g, "n_dims is 5")
    g = base(); g.tensor("x", [33], Q4_0, data=b""); add("ne0_not_block_multiple", g, "not a multiple of the Q4_0 block size 32")
    g = base(); g.tensor("x", [1 << 32, 1 << 32, 4], F32, data=b""); add("dims_overflow", g, "element count overflows")
    g = base(); g.tensor("x", [(1 << 64) - 1], F32, data=b""); add("dim_negative", g, "negative as int64")
    g = base(); g.tensor("x", [1 << 62], F32, data=b""); add("size_overflow", g, "byte size of a F32 tensor of this shape overflows")
    g = base(); g.tensor("x", [8], 200, data=b"\0" * 32); add("unknown_ggml_type", g, "unknown ggml type id 200")
    g = base(); g.tensor("x", [256], 16, data=b"\0" * 66); add("unsupported_ggml_type", g, "ggml type id 16 is not supported")
    g = base(); g.tensor("x", [8], 4, data=b"\0" * 32); add("retired_ggml_type", g, "ggml type id 4 is not supported")
    data = good[:-20]  # last tensor (F16 [8] = 16 bytes + 16 padding) loses 4 data bytes
    add("data_truncated", data, "runs past the end of the file")
    g = base(); g.tensors[2]["offset"] = 1 << 40; add("offset_past_end", g, "runs past the end of the file")
    g = base(); g.tensors[2]["offset"] = (1 << 64) - 32; add("offset_overflow", g, "runs past the end of the file")
    g = base(); g.tensors[1]["offset"] = 0; add("overlapping_tensors", g, "overlaps the previous one")
    g = base(); g.tensors[1]["offset"] = 160
    add("gap_between_tensors", g, "leaves a gap")
    g = base(); g.tensors[1]["offset"] = 132; add("misaligned_offset", g, "not a multiple of the alignment 32")
    g = base(); g.kv("general.alignment", UINT32, 48); add("alignment_not_pow2", g, "alignment 48 is not a power of two")
    g = base(); g.kv("general.alignment", UINT32, 0); add("alignment_zero", g, "alignment 0 is not a power of two")
    g = base(); g.kv("general.alignment", UINT64, 32); add("alignment_wrong_type", g, "must be UINT32, found UINT64")
    g = base(); g.tensor("n" * 64, [8], F32); add("name_too_long", g, "must be < 64")
    g = base(); g.tensor("", [8], F32); add("name_empty", g, "empty tensor name")
    g = base(); g.tensor(b"na\0me", [8], F32); add("name_with_nul", g, "NUL byte")
    return cases


def seeds():
    g64 = base(alignment=64)
    g64.kvs.insert(0, (b"general.alignment", UINT32, 64))
    no_tensors = base()
    no_tensors.tensors = []
    return [("base_v3", base().build()), ("base_v2", base(version=2).build()), ("align64", g64.build()),
            ("no_tensors", no_tensors.build()), ("all_types", all_types().build()),
            ("header_only", Gguf().build())]


def main():
    root = os.path.normpath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    bad_dir = os.path.join(root, "tests", "data", "gguf_bad")
    seed_dir = os.path.join(root, "tests", "fuzz", "corpus", "gguf")
    for d in (bad_dir, seed_dir):
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(d):
            if f.endswith(".gguf"):
                os.remove(os.path.join(d, f))
    lines = []
    for name, data, expect in bad_cases():
        with open(os.path.join(bad_dir, name + ".gguf"), "wb") as f:
            f.write(data)
        lines.append("%s.gguf\t%s\n" % (name, expect))
    with open(os.path.join(bad_dir, "EXPECTED.txt"), "w") as f:
        f.write("# generated by tests/tools/make_bad_gguf.py: file<TAB>substring[|alternative...] of the error\n")
        f.writelines(lines)
    for name, data in seeds():
        with open(os.path.join(seed_dir, name + ".gguf"), "wb") as f:
            f.write(data)
    print("wrote %d bad files to %s and %d seeds to %s" % (len(lines), bad_dir, len(seeds()), seed_dir))


if __name__ == "__main__":
    main()
