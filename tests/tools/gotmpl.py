#!/usr/bin/env python3
"""tests/tools/gotmpl.py: a small renderer of the Go text/template constructs our Ollama
TEMPLATEs use (data/ollama.c), written from Go's text/template documentation, to check that a
TEMPLATE renders the prompt our trainer tokenized:

  text and {{ actions }}, with "{{- " / " -}}" trimming the white space beside them;
  {{ range PIPE }} / {{ range $v := PIPE }} / {{ range $i, $v := PIPE }} ... {{ end }};
  {{ if PIPE }} ... {{ else if PIPE }} ... {{ else }} ... {{ end }};
  {{ $x := PIPE }} (declare) and {{ $x = PIPE }} (assign, visible in the enclosing scopes);
  fields .A.B, $.A, $x.A, literals "..." (Go escapes) and integers, true/false, parentheses;
  functions eq, ne, and, or (short-circuit, returning an operand as Go does), not, index, len.

Truth is Go's: false, 0, "", nil and empty lists are false. Ollama's data: .Messages is a list
of {"Role", "Content"}, consecutive messages of one role merged with "\n\n" (Ollama's
collate), .System the system messages joined; render_ollama() does that.

Usage as a checker (tests/data/test_ollama.c): gotmpl.py CASES.json, where the file holds a list
of {"name", "template", "messages": [[role, content], ...], "expected"}; prints one line per
failing case with the two texts, then "N passed, M failed"; exit 1 on any failure."""
import json
import re
import sys


class TemplateError(Exception):
    pass


def lex(src):
    """Splits into ("text", s) and ("action", body) with Go's trim markers applied."""
    out = []
    i = 0
    while True:
        j = src.find("{{", i)
        if j < 0:
            out.append(["text", src[i:]])
            break
        text = src[i:j]
        k = j + 2
        if src.startswith("- ", k) or src.startswith("-\t", k) or src.startswith("-\n", k):
            text = text.rstrip(" \t\r\n")
            k += 1
        out.append(["text", text])
        # find the closing }}, skipping string literals
        m = k
        while True:
            if m >= len(src):
                raise TemplateError("unclosed action")
            if src[m] == '"':
                m += 1
                while src[m] != '"':
                    m += 2 if src[m] == "\\" else 1
                m += 1
                continue
            if src.startswith("}}", m):
                break
            m += 1
        body = src[k:m]
        i = m + 2
        if body.endswith(" -") or body.endswith("\t-") or body.endswith("\n-"):
            body = body[:-1]
            n = i
            while n < len(src) and src[n] in " \t\r\n":
                n += 1
            i = n
        out.append(["action", body.strip()])
    return out


TOKEN = re.compile(r'\s*(?:(\()|(\))|("(?:[^"\\]|\\.)*")|(-?\d+)|(\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)'
                   r'|(\.(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?)|([A-Za-z_][A-Za-z0-9_]*)|(:=|=|,))')


def tokens(s):
    out, pos = [], 0
    while pos < len(s):
        if s[pos:].strip() == "":
            break
        m = TOKEN.match(s, pos)
        if not m:
            raise TemplateError("cannot parse %r" % s[pos:])
        pos = m.end()
        kinds = ["(", ")", "str", "int", "var", "field", "ident", "op"]
        for k, g in zip(kinds, m.groups()):
            if g is not None:
                out.append((k, g))
                break
    return out


def parse(src):
    """Returns a node list: ("text", s) | ("expr", toks) | ("set", name, toks, declare)
    | ("if", [(cond toks, body)...], else body) | ("range", names, toks, body)."""
    items = lex(src)
    pos = 0

    def block(stop):
        nonlocal pos
        nodes = []
        while pos < len(items):
            kind, val = items[pos]
            if kind == "text":
                if val:
                    nodes.append(("text", val))
                pos += 1
                continue
            words = val.split(None, 1)
            head = words[0] if words else ""
            if head in ("end", "else") and stop:
                return nodes, val
            pos += 1
            if head == "if":
                branches, els = [], None
                cond = tokens(val[2:])
                while True:
                    body, term = block(True)
                    if term is None:
                        raise TemplateError("if without end")
                    if els is None:
                        branches.append((cond, body))
                    else:
                        els = body
                    pos += 1
                    if term == "end":
                        break
                    if term.startswith("else if "):
                        cond = tokens(term[len("else if "):])
                    elif term == "else":
                        els = []
                    else:
                        raise TemplateError("unexpected %r" % term)
                nodes.append(("if", branches, els or []))
            elif head == "range":
                rest = val[len("range"):].strip()
                names = []
                m = re.match(r"(\$\w*)\s*(?:,\s*(\$\w*)\s*)?:=\s*(.*)$", rest, re.S)
                if m:
                    names = [n for n in (m.group(1), m.group(2)) if n]
                    rest = m.group(3)
                body, term = block(True)
                if term != "end":
                    raise TemplateError("range without end (else is not supported)")
                pos += 1
                nodes.append(("range", names, tokens(rest), body))
            else:
                m = re.match(r"(\$\w*)\s*(:=|=)\s*(.*)$", val, re.S)
                if m:
                    nodes.append(("set", m.group(1), tokens(m.group(3)), m.group(2) == ":="))
                else:
                    nodes.append(("expr", tokens(val)))
        if stop:
            return nodes, None
        return nodes

    return block(False)


def truth(v):
    if v is None or v is False:
        return False
    if v is True:
        return True
    if isinstance(v, (int, float)):
        return v != 0
    if isinstance(v, (str, list, dict)):
        return len(v) > 0
    return True


def go_str(v):
    if v is None:
        return "<no value>"
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


class Scope:
    def __init__(self, parent=None):
        self.vars, self.parent = {}, parent

    def lookup(self, name):
        s = self
        while s:
            if name in s.vars:
                return s
            s = s.parent
        raise TemplateError("undefined variable %s" % name)


def field(v, names):
    for n in names:
        if isinstance(v, dict):
            v = v.get(n)
        else:
            raise TemplateError("cannot take field %s of %r" % (n, v))
    return v


def evaluate(toks, dot, scope):
    """Evaluates a pipeline without '|' (a command: a value, or a function and its arguments)."""
    args, i = [], 0

    def operand(i):
        kind, val = toks[i]
        if kind == "(":
            depth, j = 1, i + 1
            while depth:
                if toks[j][0] == "(":
                    depth += 1
                elif toks[j][0] == ")":
                    depth -= 1
                j += 1
            return ("value", evaluate(toks[i + 1:j - 1], dot, scope)), j
        if kind == "str":
            return ("value", json.loads(val)), i + 1
        if kind == "int":
            return ("value", int(val)), i + 1
        if kind == "field":
            return ("value", dot if val == "." else field(dot, val[1:].split("."))), i + 1
        if kind == "var":
            parts = val.split(".")
            base = scope.lookup(parts[0]).vars[parts[0]]
            return ("value", field(base, parts[1:])), i + 1
        if kind == "ident":
            if val in ("true", "false"):
                return ("value", val == "true"), i + 1
            if val == "nil":
                return ("value", None), i + 1
            return ("func", val), i + 1
        raise TemplateError("unexpected %r" % (val,))

    while i < len(toks):
        a, i = operand(i)
        args.append(a)
    if not args:
        raise TemplateError("empty command")
    if args[0][0] == "value":
        if len(args) > 1:
            raise TemplateError("a value cannot take arguments")
        return args[0][1]
    fn, vals = args[0][1], [a[1] for a in args[1:]]
    if fn == "eq":
        return any(vals[0] == v for v in vals[1:])
    if fn == "ne":
        return vals[0] != vals[1]
    if fn == "not":
        return not truth(vals[0])
    if fn == "and":
        for v in vals:
            if not truth(v):
                return v
        return vals[-1]
    if fn == "or":
        for v in vals:
            if truth(v):
                return v
        return vals[-1]
    if fn == "index":
        v = vals[0]
        for k in vals[1:]:
            v = v[k]
        return v
    if fn == "len":
        return len(vals[0])
    raise TemplateError("unknown function %s" % fn)


def run(nodes, dot, scope, out):
    for n in nodes:
        if n[0] == "text":
            out.append(n[1])
        elif n[0] == "expr":
            out.append(go_str(evaluate(n[1], dot, scope)))
        elif n[0] == "set":
            v = evaluate(n[2], dot, scope)
            if n[3]:
                scope.vars[n[1]] = v
            else:
                scope.lookup(n[1]).vars[n[1]] = v
        elif n[0] == "if":
            for cond, body in n[1]:
                if truth(evaluate(cond, dot, scope)):
                    run(body, dot, Scope(scope), out)
                    break
            else:
                run(n[2], dot, Scope(scope), out)
        elif n[0] == "range":
            seq = evaluate(n[2], dot, scope) or []
            for i, el in enumerate(seq):
                s = Scope(scope)
                if len(n[1]) == 1:
                    s.vars[n[1][0]] = el
                elif len(n[1]) == 2:
                    s.vars[n[1][0]] = i
                    s.vars[n[1][1]] = el
                run(n[3], el, s, out)


def render(template, data):
    root = Scope()
    root.vars["$"] = data
    out = []
    run(parse(template), data, root, out)
    return "".join(out)


def collate(messages):
    """Ollama's collate: consecutive messages of one role merged with a blank line."""
    out, system = [], []
    for role, content in messages:
        if role == "system":
            system.append(content)
        if out and out[-1]["Role"] == role:
            out[-1]["Content"] += "\n\n" + content
        else:
            out.append({"Role": role, "Content": content})
    return "\n\n".join(system), out


def render_ollama(template, messages):
    system, msgs = collate(messages)
    return render(template, {"System": system, "Messages": msgs, "Response": ""})


def main():
    cases = json.load(open(sys.argv[1], encoding="utf-8"))
    bad = 0
    for c in cases:
        try:
            got = render_ollama(c["template"], c["messages"])
        except TemplateError as e:
            got = "<error: %s>" % e
        if got != c["expected"]:
            bad += 1
            print("FAIL %s:\n  expected %r\n  rendered %r" % (c["name"], c["expected"], got))
    print("%d passed, %d failed" % (len(cases) - bad, bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
