#!/usr/bin/env python3
"""tests/formats/test_gguf_py.py FILE: lists a GGUF file as gguf-py (llama.cpp's PyPI `gguf`
package) reads it, in the line format test_gguf_py.c prints from our reader:
  header <version> <alignment> <data_offset>
  kv <key> <type> [<elem type> <count>] <hex of each value's raw bytes>...
  tensor <name> <ggml type id> <ne...> <data offset> <bytes> <crc32 of the data>
Exits 77 (ctest: skipped) when the package is not importable."""
import sys
import zlib

try:
    import gguf
except Exception as e:  # noqa: BLE001 - any import failure means "not available"
    print("gguf-py not importable: %s" % e)
    sys.exit(77)

r = gguf.GGUFReader(sys.argv[1])
print("header %d %d %d" % (int(r.fields["GGUF.version"].parts[-1][0]), r.alignment, r.data_offset))
for name, f in r.fields.items():
    if name.startswith("GGUF."):
        continue
    types = [t.name for t in f.types]
    if types[0] == "ARRAY":  # parts: key length, key, type, element type, count, elements...
        head = "ARRAY %s %d" % (gguf.GGUFValueType(int(f.parts[3][0])).name, len(f.data))
    else:
        head = types[0]
    vals = " ".join(f.parts[i].tobytes().hex() or "-" for i in f.data)
    print(("kv %s %s %s" % (name, head, vals)).rstrip())
for t in r.tensors:
    ne = " ".join(str(int(x)) for x in t.shape)
    data = t.data.tobytes()
    print("tensor %s %d %s %d %d %08x" % (t.name, int(t.tensor_type), ne, t.data_offset, t.n_bytes,
                                          zlib.crc32(data) & 0xFFFFFFFF))
