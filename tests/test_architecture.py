"""The shape of src/tdlm (../shared/ARCHITECTURE.md): layers without cycles.

* No import cycle between modules (function-level imports included).
* Layer order: a module never imports one of a higher layer
  (L0 errors, utils < L1 config < L2 nn, data, tree, sampling, store, schedules, flops, did
  < L3 families < L4 pipeline < L5 train, eval, scheduling, export < L6 api < L7 command line).
* ``api.py`` is a façade: nothing inside the package imports it.
* No function in ``train/`` over 60 lines; longer functions elsewhere are listed below with
  their present length and may only shrink.
* Family names compared outside ``families/`` and the preset table: the known places are
  listed (the family-contract work removes them) and no new one may appear.
"""
from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "tdlm"

LAYERS = {"errors": 0, "utils": 0, "config": 1, "schedules": 2, "nn": 2, "data": 2, "tree": 2,
          "sampling": 2, "store": 2, "flops": 2, "did": 2, "families": 3, "pipeline": 4,
          "train": 5, "eval": 5, "scheduling": 5, "export": 5, "outputs": 5, "api": 6, "cli": 7,
          "bench_cli": 7}
# command-line modules inside packages sit with the command line
CLI_MODULES = {"tdlm.tree.cli", "tdlm.scheduling.cli"}

LONG_FUNCTIONS = {          # path:function -> lines today (may only shrink)
    "tree/build.py:auction_assign": 129,
    "eval/genppl.py:generative_perplexity": 110,
    "families/deletion_insertion.py:sample": 109,
}
FAMILY_SWITCHES = {         # file -> number of family-name comparisons today (may only shrink)
    "config.py": 3,
}


def _modules() -> dict:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = "tdlm." + ".".join(p.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _graph() -> dict:
    mods = _modules()
    graph = defaultdict(set)
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                cands = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target
                         for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for t in cands:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and t != "tdlm":
                    graph[m].add(t)
    return graph


def _layer(mod: str) -> int:
    if mod in CLI_MODULES:
        return 7
    top = mod.split(".")[1]
    assert top in LAYERS, f"module {mod} has no layer: add its package to LAYERS"
    return LAYERS[top]


def test_no_import_cycles():
    graph = _graph()
    seen, stack, cycles = {}, [], []

    def visit(v):
        seen[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if seen.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in seen:
                visit(w)
        stack.pop()
        seen[v] = 2

    for v in sorted(_modules()):
        if v not in seen:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layer_order():
    bad = [f"{m} (L{_layer(m)}) imports {t} (L{_layer(t)})"
           for m, ts in sorted(_graph().items()) if m != "tdlm" for t in sorted(ts)
           if _layer(t) > _layer(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_api_is_a_facade():
    users = sorted(m for m, ts in _graph().items() if "tdlm.api" in ts)
    assert not users, f"imported inside the package by: {users}"


def _functions():
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield rel, node.name, node.end_lineno - node.lineno + 1


def test_function_lengths():
    long = {}
    for rel, name, n in _functions():
        if rel.startswith("train/"):
            assert n <= 60, f"{rel}:{name} is {n} lines (train/ functions stay under 60)"
        elif n > 80:
            long[f"{rel}:{name}"] = n
    grown = {k: v for k, v in long.items() if v > LONG_FUNCTIONS.get(k, 80)}
    assert not grown, f"functions over 80 lines (new or longer than listed): {grown}"


def test_no_new_family_name_switches():
    pat = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](mdlm|tdlm|ar|did)["']|["'](mdlm|tdlm|ar|did)["']\s*(==|!=)|FAMILIES|SCHEDULABLE""")
    found: dict = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT).as_posix()
        if rel.startswith("families/"):
            continue
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines()
                 if pat.search(ln) and not ln.lstrip().startswith("#")]
        if rel == "config.py":      # the preset table may name families
            lines = [ln for ln in lines if "family=" not in ln]
        if lines:
            found[rel] = len(lines)
    grown = {k: v for k, v in found.items() if v > FAMILY_SWITCHES.get(k, 0)}
    assert not grown, f"new family-name comparisons outside families/: {grown}"
