"""Build time of every vocabulary-tree construction (issue: parity study, item 3: the default
tree comes with its build time for the GPT-2 vocabulary on 2 cores).

    python benchmarks/tree_build.py                       # -> results/tree_build.{json,md}
    python benchmarks/tree_build.py --vocab gpt2 --sources corpus frequency

Each (vocabulary, source) is one ``tdlm tree build`` in a fresh process with ``--threads``
threads on the bundled corpus: the data time (tokenising, cached after the first build of a
vocabulary, so it is reported apart) and the build time (embedding + balanced clustering) are
the command's own measurements. Vocabularies: ``gpt2`` (50,257 tokens, the tiny presets' tree:
K=256, H=2) and ``bpe-8k`` (the paper-shaped CPU presets' tree: K=128, H=2). The ``checkpoint``
source needs a trained run of the same tokenizer (``--checkpoint VOCAB=RUN``) and is skipped
without one. Run it on an otherwise idle machine: the figures are wall-clock.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"gpt2": (256, 2), "bpe-8k": (128, 2)}
SOURCES = ["corpus", "exchange", "frequency", "random", "checkpoint"]


def build(vocab: str, source: str, threads: int, checkpoint: str | None, tmp: Path) -> dict:
    K, H = SHAPES[vocab]
    out = tmp / f"{vocab}-{source}.safetensors"
    cmd = [sys.executable, "-m", "tdlm.cli", "tree", "build", "--source", source, "--K", str(K),
           "--H", str(H), "--tokenizer", vocab, "--out", str(out)]
    if source == "checkpoint":
        cmd += ["--checkpoint", checkpoint]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    info = json.loads(out.with_suffix(".json").read_text())
    return {"vocab": vocab, "source": source, "K": K, "H": H,
            "build_seconds": info["build_seconds"], "data_seconds": info["data_seconds"],
            "process_seconds": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--sources", nargs="+", default=SOURCES, choices=SOURCES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="VOCAB=RUN")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    ckpts = dict(x.split("=", 1) for x in a.checkpoint)
    from tdlm.utils import machine_info
    machine = machine_info()        # before the builds: its load average is the one at the start
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in a.vocab:
            for source in a.sources:
                if source == "checkpoint" and vocab not in ckpts:
                    print(f"[tree_build] {vocab}/checkpoint skipped: no --checkpoint {vocab}=RUN")
                    continue
                r = build(vocab, source, a.threads, ckpts.get(vocab), Path(tmp))
                print(f"[tree_build] {vocab}/{source}: build {r['build_seconds']:.1f} s "
                      f"(data {r['data_seconds']:.1f} s)", flush=True)
                rows.append(r)
    res = {"command": "python benchmarks/tree_build.py " + " ".join(argv or sys.argv[1:]),
           "threads": a.threads, "machine": machine, "rows": rows,
           "load_avg_at_end": os.getloadavg()[0]}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tree_build.json").write_text(json.dumps(res, indent=1, default=str))
    L = ["# Vocabulary-tree build time per construction", "",
         f"Command: `{res['command']}`; {a.threads} threads, one process per build, bundled "
         f"corpus; load average at the end {res['load_avg_at_end']:.2f}.", "",
         "| vocabulary | source | K | H | build s | data s (tokenising; cached after the first) |",
         "|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['vocab']} | {r['source']} | {r['K']} | {r['H']} | "
                 f"{r['build_seconds']:.1f} | {r['data_seconds']:.1f} |")
    (out / "tree_build.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
