#!/usr/bin/env python3
"""Generates tests/data/safetensors_bad/: one small file per rule of FORMATS.md §6.2 that a
reader must refuse, a few sharded sets with a broken index, and one valid control file.

Stdlib only. MANIFEST.tsv lists each case as `<path>\t<substring the error must contain>`
("OK" for the control); tests/formats/test_safetensors_bad.c replays it. Run from anywhere:
    python3 tests/tools/make_bad_safetensors.py [out_dir]
The output is deterministic, so rerunning it leaves the committed files unchanged."""
import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "data", "safetensors_bad")

cases = []  # (relative path, expected substring)


def raw(name, header_bytes, data=b"", length=None, expect=""):
    """A file of: 8-byte LE length (header length unless given), header bytes, data."""
    n = len(header_bytes) if length is None else length
    path = os.path.join(OUT, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header_bytes + data)
    cases.append((name, expect))


def st(name, header, data=b"", expect=""):
    """A file whose header is `header` (a dict, or a str used verbatim) padded to 8 bytes."""
    h = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    hb = h.encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    raw(name, hb, data, expect=expect)


def good_header():
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    data12 = bytes(range(12))

    st("good.safetensors", good_header(), data12, expect="OK")

    raw("too_small.safetensors", b"", length=0, expect="too small")
    with open(os.path.join(OUT, "too_small.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00")
    raw("header_huge.safetensors", b"{}      ", length=1 << 62, expect="over the")
    raw("header_past_eof.safetensors", b"{}      ", length=4096, expect="past the end")
    raw("header_empty.safetensors", b"", length=0, expect="start with '{'")
    st("not_json.safetensors", "{this is not json}", expect="header:1:")
    st("json_array.safetensors", "[1, 2, 3]", expect="start with '{'")
    st("leading_space.safetensors", ' {"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}',
       expect="start with '{'")
    st("trailing_garbage_json.safetensors", '{"a":1} x', expect="header:1:")
    raw("invalid_utf8.safetensors", b'{"\xff\xfe":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
        + b" " * 3, expect="header:1:")

    def bad_entry(name, entry, data=b"", expect=""):
        st(name, {"t": entry}, data, expect=expect)

    bad_entry("entry_not_object.safetensors", [1, 2], expect="expected an object")
    bad_entry("missing_dtype.safetensors", {"shape": [1], "data_offsets": [0, 1]}, b"\0",
              expect="missing \"dtype\"")
    bad_entry("missing_shape.safetensors", {"dtype": "U8", "data_offsets": [0, 1]}, b"\0",
              expect="missing \"shape\"")
    bad_entry("missing_offsets.safetensors", {"dtype": "U8", "shape": [1]}, b"\0",
              expect="missing \"data_offsets\"")
    bad_entry("dtype_not_string.safetensors", {"dtype": 5, "shape": [1], "data_offsets": [0, 1]},
              b"\0", expect="dtype must be a string")
    bad_entry("unknown_dtype.safetensors", {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]},
              bytes(16), expect="unknown dtype \"F128\"")
    bad_entry("shape_not_array.safetensors", {"dtype": "U8", "shape": 4, "data_offsets": [0, 4]},
              bytes(4), expect="shape must be an array")
    bad_entry("negative_shape.safetensors", {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]},
              expect="shape[0] must be a non-negative integer")
    bad_entry("float_shape.safetensors", {"dtype": "U8", "shape": [2.5], "data_offsets": [0, 2]},
              bytes(2), expect="shape[0] must be a non-negative integer")
    bad_entry("string_shape.safetensors", {"dtype": "U8", "shape": ["2"], "data_offsets": [0, 2]},
              bytes(2), expect="shape[0] must be a non-negative integer")
    bad_entry("overflow_shape.safetensors",
              {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 0]},
              expect="overflows")
    bad_entry("overflow_bytes.safetensors",
              {"dtype": "F64", "shape": [1 << 61, 4], "data_offsets": [0, 0]},
              expect="overflows")
    bad_entry("subbyte_not_whole.safetensors", {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]},
              bytes(2), expect="whole number of bytes")
    bad_entry("offsets_not_pair.safetensors", {"dtype": "U8", "shape": [2], "data_offsets": [0, 1, 2]},
              bytes(2), expect="data_offsets must be")
    bad_entry("offsets_negative.safetensors", {"dtype": "U8", "shape": [2], "data_offsets": [-2, 0]},
              bytes(2), expect="data_offsets must be")
    bad_entry("end_before_begin.safetensors", {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]},
              bytes(4), expect="end 2 < begin 4")
    bad_entry("size_mismatch.safetensors", {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
              bytes(4), expect="needs 8")
    bad_entry("not_from_zero.safetensors", {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
              bytes(8), expect="must start at 0")

    st("gap.safetensors", {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                           "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}},
       data12, expect="(gap)")
    st("out_of_order_gap.safetensors", {"b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]},
                                        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}},
       data12, expect="(gap)")
    st("overlap.safetensors", {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                               "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}},
       data12, expect="(overlap)")
    st("trailing_bytes.safetensors", good_header(), data12 + b"\0", expect="trailing bytes")
    st("truncated.safetensors", good_header(), data12[:10], expect="truncated")
    st("duplicate_key.safetensors",
       '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
       '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\0\0", expect="duplicate")
    st("duplicate_metadata.safetensors",
       '{"__metadata__":{"format":"pt"},"__metadata__":{"format":"pt"}}', expect="duplicate")
    st("metadata_not_string.safetensors", {"__metadata__": {"format": "pt", "step": 5}},
       expect="__metadata__ key \"step\": expected a string")
    st("metadata_nested.safetensors", {"__metadata__": {"cfg": {"a": "b"}}},
       expect="__metadata__ key \"cfg\": expected a string")
    st("metadata_not_object.safetensors", {"__metadata__": ["format", "pt"]},
       expect="__metadata__ must be an object")
    raw("nul_after_number.safetensors",
        b'{"t":{"dtype":"U8","shape":[1\x00],"data_offsets":[0,1]}}' + b" " * 3, b"\0",
        expect="NUL byte")
    st("nul_in_name.safetensors", '{"a\\u0000b":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
       b"\0", expect="header:1:")

    # sharded sets: a valid shard pair and indexes that break one rule each
    shard1 = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    shard2 = {"y": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}

    def shard_set(folder, weight_map, shards, expect, index_text=None):
        d = os.path.join(OUT, folder)
        os.makedirs(d, exist_ok=True)
        for fname, (hdr, data) in shards.items():
            h = json.dumps(hdr, separators=(",", ":")).encode()
            h += b" " * ((8 - len(h) % 8) % 8)
            with open(os.path.join(d, fname), "wb") as f:
                f.write(struct.pack("<Q", len(h)) + h + data)
        text = index_text if index_text is not None else json.dumps(
            {"metadata": {"total_size": 12}, "weight_map": weight_map}, indent=2, sort_keys=True)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            f.write(text)
        cases.append((folder, expect))

    two = {"model-00001-of-00002.safetensors": (shard1, bytes(8)),
           "model-00002-of-00002.safetensors": (shard2, bytes(4))}
    shard_set("index_good", {"x": "model-00001-of-00002.safetensors",
                             "y": "model-00002-of-00002.safetensors"}, two, "OK")
    shard_set("index_missing_shard", {"x": "model-00001-of-00002.safetensors",
                                      "y": "model-00003-of-00002.safetensors"},
              {"model-00001-of-00002.safetensors": (shard1, bytes(8))}, "does not exist")
    shard_set("index_tensor_not_in_shard", {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors",
                                            "z": "model-00002-of-00002.safetensors"},
              two, "tensor \"z\" is mapped to shard")
    shard_set("index_wrong_shard", {"x": "model-00002-of-00002.safetensors",
                                    "y": "model-00002-of-00002.safetensors"},
              two, "tensor \"x\" is mapped to shard")
    shard_set("index_no_weight_map", None, two, "missing key \"weight_map\"",
              index_text='{"metadata": {}}')
    shard_set("index_weight_map_not_object", None, two, "expected an object",
              index_text='{"weight_map": ["x"]}')
    shard_set("index_value_not_string", None, two, "expected a file name",
              index_text='{"weight_map": {"x": 1}}')
    shard_set("index_path_escape", {"x": "../good.safetensors"}, two, "not a file name inside")
    shard_set("index_not_json", None, two, "model.safetensors.index.json:1:",
              index_text='{"weight_map": ')
    shard_set("index_bad_shard", {"x": "model-00001-of-00002.safetensors"},
              {"model-00001-of-00002.safetensors": ({"x": {"dtype": "F32", "shape": [2],
                                                           "data_offsets": [0, 4]}}, bytes(4))},
              "needs 8")

    with open(os.path.join(OUT, "MANIFEST.tsv"), "w") as f:
        f.write("# generated by tests/tools/make_bad_safetensors.py: path<TAB>expected error substring\n")
        for name, expect in cases:
            f.write(f"{name}\t{expect}\n")


if __name__ == "__main__":
    main()
