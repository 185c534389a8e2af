#!/usr/bin/env python3
"""The layers of grace/src, checked: run from the repository's root (CI does).

Reads every `crate::…`, `super::…` and `self::…` path of each file (test modules left out),
resolves it to the file that defines the module, and reports:

  - import circles (strongly connected files); one that spans more than one folder fails
    (a file directly in src/ counts as a folder of its own);
  - imports from conn/ into shutdown/, restart/, server/ (a connection sees the stop only
    through its own view), which fail;
  - functions longer than 80 lines (from the `fn` line to its closing brace), which fail.

usage: python3 scripts/layers.py [SRC_DIR]     (default grace/src; exit 1 on a failure)
"""
import os
import re
import sys

MAX_FN = 80
FORBIDDEN = {"conn": ("shutdown", "restart", "server")}


def files(src):
    found = {}
    for root, _, names in os.walk(src):
        for name in names:
            if name.endswith(".rs"):
                rel = os.path.relpath(os.path.join(root, name), src)
                parts = rel[:-3].split(os.sep)
                if parts[-1] in ("mod", "lib", "main"):
                    parts = parts[:-1]
                found[tuple(parts)] = rel
    return found


def code_of(text):
    """The text without comments, string contents and `#[cfg(test)] mod … { … }` blocks."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def imports(src, mods):
    edges = {rel: set() for rel in mods.values()}
    for key, rel in mods.items():
        code = code_of(open(os.path.join(src, rel)).read())
        for m in re.finditer(r"\b(crate|super|self)((?:::\w+)+)(?:::\{([^}]*)\})?", code):
            head, tail, group = m.group(1), [p for p in m.group(2).split("::") if p], m.group(3)
            base = [] if head == "crate" else list(key) if head == "self" else list(key)[:-1]
            paths = [base + tail]
            if group:
                names = [g.strip().split("::")[0] for g in group.split(",")]
                paths = [base + tail + [n] for n in names if n and n != "self"] or paths
            for path in paths:
                for n in range(len(path), 0, -1):
                    target = mods.get(tuple(path[:n]))
                    if target:
                        if target != rel:
                            edges[rel].add(target)
                        break
    return edges


def circles(edges):
    index, low, stack, on, found = {}, {}, [], set(), []
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def folder(rel):
    return os.path.dirname(rel) or rel


def long_functions(src, mods):
    found = []
    for rel in mods.values():
        lines = code_of(open(os.path.join(src, rel)).read()).split("\n")
        for i, line in enumerate(lines):
            m = re.match(r"\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)", line)
            if not m:
                continue
            depth, started = 0, False
            for j in range(i, len(lines)):
                depth += lines[j].count("{") - lines[j].count("}")
                started = started or "{" in lines[j]
                if started and depth <= 0:
                    break
                if not started and lines[j].rstrip().endswith(";"):
                    break
            if started and j - i + 1 > MAX_FN:
                found.append((j - i + 1, f"{rel}:{i + 1} {m.group(1)}"))
    return sorted(found, reverse=True)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "grace/src"
    mods = files(src)
    edges = imports(src, mods)
    failed = False
    for comp in circles(edges):
        crossing = len({folder(f) for f in comp}) > 1
        failed |= crossing
        kind = "crosses folders" if crossing else "within one folder"
        print(f"circle of {len(comp)} files ({kind}): {', '.join(comp)}")
    for rel, targets in sorted(edges.items()):
        top = rel.split(os.sep)[0]
        for target in sorted(targets):
            if target.split(os.sep)[0] in FORBIDDEN.get(top, ()):
                failed = True
                print(f"forbidden import: {rel} -> {target}")
    for length, where in long_functions(src, mods):
        failed = True
        print(f"function over {MAX_FN} lines: {where} ({length})")
    count = sum(len(t) for t in edges.values())
    print(f"{len(mods)} files, {count} imports between them: {'FAILED' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
