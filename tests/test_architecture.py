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

LAYERS = {"errors": 0, "utils": 0, "config": 1, "schedules": 2, "nn": 2, "data": 2,
          "vocab_tree": 2, "sampling": 2, "store": 2, "flops": 2, "families": 3, "pipeline": 4,
          "train": 5, "eval": 5, "scheduling": 5, "export": 5, "outputs": 5, "generation": 5,
          "mainjob": 5, "viewer": 5, "convert": 5, "api": 6, "cli": 7,
          # deprecated aliases of moved packages (tdlm.tree -> vocab_tree, tdlm.did ->
          # families.did): façades like api, imported by nothing inside the package
          "tree": 6, "did": 6}
FACADES = ("tdlm.api", "tdlm.tree", "tdlm.did")
# command-line modules inside packages sit with the command line
CLI_MODULES: set = set()

LONG_FUNCTIONS: dict = {}   # path:function -> lines today (may only shrink; none left)
PRESET_TABLE = "config/presets.py"      # the one place outside families/ that names families


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


def test_facades_are_not_imported_inside():
    for facade in FACADES:
        users = sorted(m for m, ts in _graph().items()
                       if any(t == facade or t.startswith(facade + ".") for t in ts)
                       and not m.startswith(facade))
        assert not users, f"{facade} imported inside the package by: {users}"


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
    stale = [k for k in LONG_FUNCTIONS if k not in long]
    assert not stale, f"listed long functions now within 80 lines (drop them from the list): {stale}"


FAMILY_NAME = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](mdlm|tdlm|ar|did)["']|"""
                         r"""["'](mdlm|tdlm|ar|did)["']\s*(==|!=)|FAMILIES|SCHEDULABLE""")


def family_name_comparisons(root: Path, skip=()) -> dict:
    """``{file: [lines]}`` comparing a family name (``== "tdlm"``, ``in ("ar", ...)``)."""
    found: dict = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if any(rel.startswith(s) for s in skip):
            continue
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()
                 if FAMILY_NAME.search(ln) and not ln.lstrip().startswith("#")]
        if lines:
            found[rel] = lines
    return found


def test_no_family_name_switches_outside_families():
    found = family_name_comparisons(ROOT, skip=("families/", PRESET_TABLE))
    assert not found, f"family-name comparisons outside families/: {found}"
    bench = family_name_comparisons(ROOT.parents[1] / "benchmarks")
    assert not bench, f"family-name comparisons in benchmarks/: {bench}"


def test_family_name_check_catches_a_switch(tmp_path):
    (tmp_path / "x.py").write_text('if cfg.family.name == "tdlm":\n    pass\n'
                                   'ok = name in ("ar", "did")\n')
    assert len(family_name_comparisons(tmp_path)["x.py"]) == 2
