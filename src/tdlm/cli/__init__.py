"""``tdlm`` command line: a thin layer over the library.

    tdlm run                         main job: train a tiny model on the bundled corpus, evaluate, sample
    tdlm train --preset tiny --out runs/x [--set train.max_steps=100 ...]
    tdlm train --out runs/x --resume     continue a run exactly, with its saved config
    tdlm eval CKPT [--json] [--batches N] [--seed S]
    tdlm sample CKPT --num N --steps T
    tdlm sample --model H=runs/heavy --model L=runs/light --schedule sandwich:0.25
    tdlm genppl SAMPLES.jsonl --judge runs/ar      generative perplexity + entropy
    tdlm ngram --preset ar-cpu --order 4 --out runs/kn4   Kneser-Ney n-gram judge (closed form)
    tdlm info --preset mdlm-small [--preset ...] [--json]
    tdlm fit --preset mdlm-small --seq-len 1024 --batch 8 --memory 24 40 80   peak memory, micro-batch
    tdlm export RUN_OR_CKPT --out DIR    shareable folder (tdlm.load / tdlm.from_pretrained)
    tdlm convert kuleshov-group/mdlm-owt --out DIR   published MDLM/DUO checkpoint -> that format

User errors (bad config, data, checkpoints, paths, usage) print ``error: <one line>`` on
stderr and exit with status 2 (no traceback); nothing existing is overwritten.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import TdlmError
from . import convert as _convert_cmd  # noqa: F401
from . import eval as _eval_cmd, export as _export_cmd, info as _info_cmd  # noqa: F401
from . import fit as _fit_cmd  # noqa: F401
from . import genppl as _genppl_cmd, ngram as _ngram_cmd  # noqa: F401
from . import schedule as _schedule_cmd  # noqa: F401
from . import run as _run_cmd, sample as _sample_cmd, train as _train_cmd  # noqa: F401


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error convention: one ``error:`` line, exit status 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """One module per subcommand, each with ``add_parser(sub)`` (``tree`` and ``bench`` add
    a group of subcommands)."""
    ap = _Parser(prog="tdlm", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for m in (_run_cmd, _train_cmd, _eval_cmd, _sample_cmd, _export_cmd, _convert_cmd, _info_cmd,
              _fit_cmd, _genppl_cmd, _ngram_cmd, _schedule_cmd):
        m.add_parser(sub)
    from .bench import add_bench_parser
    from .tree import add_tree_parser
    add_tree_parser(sub)             # tdlm tree build/show
    add_bench_parser(sub)            # tdlm bench {params,memory,speed,quality}
    return ap


def _os_error_line(e: OSError) -> str:
    what = e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0]
    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    return f"{what}{where}"


def _one_line(msg: str) -> str:
    return " ".join(msg.split()) or "unknown error"


def main(argv=None) -> int:
    """The ``tdlm`` command: its exit status. Garbage is collected before returning, while the
    interpreter is whole: a run's cyclic garbage may hold a DDP/FSDP wrapper and through it
    the gloo process group, whose worker threads abort the process ("terminate called
    without an active exception", SIGABRT) when they are torn down at interpreter exit
    instead (seen as rare torchrun test failures after a finished or preempted run)."""
    import gc
    try:
        return _main(argv)
    finally:
        gc.collect()


def _main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # usage errors (one line, see _Parser) and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    from ..train.preemption import EXIT_PREEMPTED, Preempted
    try:
        return args.fn(args)
    except Preempted as e:           # checkpoint written: a scheduler should requeue the job
        import os
        if os.environ.get("RANK", "0") == "0":       # under torchrun only rank 0 reports
            print(f"preempted: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_PREEMPTED
    except TdlmError as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:             # unwritable/unreadable paths, disk full, ...
        print(f"error: {_one_line(_os_error_line(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


