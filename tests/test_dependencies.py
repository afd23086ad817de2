"""Every third-party module that ``src/tdlm`` imports is declared in pyproject.toml, so a clean
``pip install -e .`` in a fresh virtual environment has everything the library needs.

Imports at module level (outside functions and ``try`` blocks) must be covered by
``[project.dependencies]``; imports inside functions or ``try`` blocks (optional features) by
the dependencies or an optional extra. Module -> distribution names come from
``importlib.metadata.packages_distributions()``, so a module provided by a distribution with
another name (e.g. ``yaml`` from PyYAML) is matched correctly."""
import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:          # Python 3.10 (the test extra installs tomli there)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tdlm"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def declared() -> tuple[set, set]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_req_name(r) for r in proj.get("dependencies", [])}
    extra = {_req_name(r) for reqs in proj.get("optional-dependencies", {}).values() for r in reqs}
    return core, extra


def third_party_imports() -> dict:
    """module top-level name -> (required at import time?, [file:line])."""
    stdlib = set(sys.stdlib_module_names)
    found: dict = {}

    def visit(node, guarded, where):
        for child in ast.iter_child_nodes(node):
            g = guarded or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name.split(".")[0] for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            for n in names:
                if n in stdlib or n == "tdlm" or n == "__future__":
                    continue
                req, locs = found.get(n, (False, []))
                found[n] = (req or not guarded, locs + [f"{where}:{child.lineno}"])
            visit(child, g, where)

    for path in sorted(SRC.rglob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), False, path.relative_to(ROOT))
    return found


def test_scan_finds_the_known_imports():
    imps = third_party_imports()
    assert {"torch", "numpy", "tokenizers", "safetensors", "scipy"} <= set(imps)
    assert imps["torch"][0] and imps["scipy"][0]          # needed at import time


def test_every_third_party_import_is_declared():
    core, extra = declared()
    dists = md.packages_distributions()
    problems = []
    for mod, (required, locs) in sorted(third_party_imports().items()):
        names = {_norm(d) for d in dists.get(mod, [])} or {_norm(mod)}
        ok = names & core if required else names & (core | extra)
        if not ok:
            need = "[project.dependencies]" if required else "dependencies or an extra"
            problems.append(f"{mod} (distribution {'/'.join(sorted(names))}) imported at "
                            f"{locs[0]} is not declared in {need}")
    assert not problems, "\n".join(problems)
