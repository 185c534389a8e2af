#!/usr/bin/env python3
"""Counts a crate's public API from `cargo doc` output: items (by kind) and inherent methods.

usage: python3 scripts/api-count.py target/doc/grace_http
(build the docs first: cargo doc --no-deps -p grace-http --all-features)
"""
import collections
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/doc/grace_http"
kinds = collections.Counter()
methods = {}
for dirpath, _, names in os.walk(root):
    for name in names:
        m = re.match(r"(struct|enum|trait|fn|type|constant|macro|union)\.(\w+)\.html$", name)
        if not m:
            continue
        page = open(os.path.join(dirpath, name)).read()
        if "Redirecting to" in page[:600]:
            continue  # a re-export's second path
        kinds[m.group(1)] += 1
        inherent = page.split('id="trait-implementations"')[0]
        inherent = inherent.split('id="synthetic-implementations"')[0]
        n = len(set(re.findall(r'id="method\.(\w+)"', inherent)))
        if n:
            methods[m.group(2)] = n
mods = sum(1 for d, _, f in os.walk(root) if "index.html" in f) - 1
print(f"items: {sum(kinds.values())} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), public modules: {mods}")
print(f"inherent methods: {sum(methods.values())}")
for name, n in sorted(methods.items(), key=lambda x: -x[1]):
    print(f"  {name}: {n}")
