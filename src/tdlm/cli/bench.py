"""``tdlm bench {params,memory,speed,quality}``: run the repository's efficiency benchmarks.

    tdlm bench params [OUT_DIR]                      parameter budgets (benchmarks/params.py)
    tdlm bench memory --batch 1 2 4 8                peak training memory (benchmarks/memory.py)
    tdlm bench speed                                 training/sampling tokens/s, FLOPs, MFU
    tdlm bench quality --steps 200                   tiny equal-budget NELBO suite + ablations
    tdlm bench speed --help                          the script's own options

Each subcommand runs ``benchmarks/<name>.py`` of the source checkout this package was
installed from (an editable install), in a child Python process, in the current directory,
passing every further argument through unchanged; the exit status is the script's. Default
output folders of the scripts (``benchmarks/results``, ``runs/...``) are relative to the
current directory, so run from the repository root to update the committed results. An
installation without the ``benchmarks/`` folder (e.g. from a wheel) gets a one-line error and
exit status 2.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ..errors import TdlmError

#: subcommand -> (script file, one-line help)
BENCHMARKS = {
    "params": ("params.py", "parameter budgets of TDLM vs MDLM presets (JSON + markdown)"),
    "memory": ("memory.py", "peak training memory of full optimizer steps, L=512, per micro-batch"),
    "speed": ("speed.py", "training and sampling tokens/s, analytic FLOPs and MFU, round-robin"),
    "quality": ("quality.py", "tiny equal-budget NELBO suite: TDLM vs MDLM vs AR + ablations"),
}


def benchmarks_dir() -> Path | None:
    """The ``benchmarks/`` folder of the source checkout holding this package
    (``<repo>/src/tdlm/cli/bench.py`` -> ``<repo>/benchmarks``), or None if absent."""
    here = Path(__file__).resolve()
    for root in here.parents[1:5]:
        cand = root / "benchmarks"
        if cand.is_dir() and any((cand / s).is_file() for s, _ in BENCHMARKS.values()):
            return cand
    return None


def cmd_bench(args) -> int:
    """Run ``benchmarks/<script>`` with the pass-through arguments; returns its exit status."""
    script_name = args.bench_script
    bdir = benchmarks_dir()
    if bdir is None or not (bdir / script_name).is_file():
        raise TdlmError(f"benchmarks/{script_name} not found: `tdlm bench` needs the source "
                        "checkout (pip install -e <repo>); this installation has no benchmarks/ folder")
    script = bdir / script_name
    return subprocess.run([sys.executable, str(script), *args.bench_args]).returncode


class _PassThrough(argparse.ArgumentParser):
    """Sub-parser that takes every remaining argument verbatim (options included) for the
    benchmark script, instead of parsing them."""

    def parse_known_args(self, args=None, namespace=None):
        ns = namespace if namespace is not None else argparse.Namespace()
        for k, v in self._defaults.items():
            setattr(ns, k, v)
        ns.bench_args = list(args or [])
        return ns, []


def add_bench_parser(sub) -> None:
    """Register ``tdlm bench {params,memory,speed,quality} [ARGS...]`` on the CLI's
    sub-parsers."""
    p = sub.add_parser("bench", help="efficiency benchmarks: params | memory | speed | quality",
                       description=__doc__.splitlines()[0],
                       epilog="\n".join(__doc__.splitlines()[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = p.add_subparsers(dest="bench", required=True, parser_class=_PassThrough,
                            metavar="{" + ",".join(BENCHMARKS) + "}")
    for name, (script, help_) in BENCHMARKS.items():
        q = bsub.add_parser(name, help=f"{help_} (benchmarks/{script}; arguments passed through)",
                            add_help=False)
        q.set_defaults(fn=cmd_bench, bench_script=script, bench=name)
