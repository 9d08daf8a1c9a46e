#!/usr/bin/env python3
"""tests/tools/tokenizer_ref.py: reference token ids from Hugging Face `tokenizers`.

Builds the tokenizer the way SmolLM2's real tokenizer.json defines it -- BPE model over the GGUF
vocabulary and merges, pre_tokenizer Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)], ByteLevel decoder, the control tokens as
special added tokens -- so the expected ids do not depend on our reading of the regexes.

  tokenizer_ref.py ids   MODEL.gguf TEXT_FILE      one id per line (special tokens parsed)
  tokenizer_ref.py split PRE TEXT_FILE             pre-tokens of HF's Split(regex) for PRE in
                                                   gpt2|llama3|qwen2|smollm, as UTF-8 hex, one per line
Needs: pip install tokenizers gguf. Exit 2 when they are missing.
"""
import sys

try:
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
except ImportError as e:  # the ctest falls back to the committed ids
    print(f"tokenizer_ref.py: {e}", file=sys.stderr)
    sys.exit(2)

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
         r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def field_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_ints(reader, key):
    f = reader.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


def build_smollm(path):
    r = gguf.GGUFReader(path)
    tokens = field_strings(r, "tokenizer.ggml.tokens")
    types = field_ints(r, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field_strings(r, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(specials)
    return tok


def split(pre, text):
    if pre == "smollm":
        pt = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.Split(Regex(GPT2), behavior="isolated")])
    else:
        pat = {"gpt2": GPT2, "llama3": LLAMA3, "qwen2": QWEN2}[pre]
        pt = pre_tokenizers.Split(Regex(pat), behavior="isolated")
    return [s for s, _ in pt.pre_tokenize_str(text)]


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("ids", "split"):
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    text = open(sys.argv[3], encoding="utf-8", newline="").read()
    if sys.argv[1] == "ids":
        tok = build_smollm(sys.argv[2])
        enc = tok.encode(text, add_special_tokens=False)
        dec = tok.decode(enc.ids, skip_special_tokens=False)
        if dec != text:
            print("tokenizer_ref.py: HF decode(encode(text)) != text", file=sys.stderr)
        print("\n".join(str(i) for i in enc.ids))
    else:
        for s in split(sys.argv[2], text):
            print(s.encode("utf-8").hex())


if __name__ == "__main__":
    main()
