"""DID subsequence-count DP: our vectorised DP vs a plain Python double loop vs the authors' DP.

Same batch for all: B rows of L-1 GPT-2 tokens of real text from the bundled corpus (plus BOS),
each row's xt from deletion at alpha ~ U(0, 1). Targets of the issue (B = 8, L = 1024): ours
>= 50x the double loop and >= 5x the authors' DP.

The authors' code (FMD-NEXT/DID, did-fixlen/losses.py, ``get_N_ratio``) is read from a local
mirror (``--ref-repo``, fetched separately, never committed); only that function is extracted
into a temporary module and run. It differs in scope: it runs the DP on BOS+body (not
anchored), thresholds values below 1e-6 and returns a sparse COO matrix.

    python benchmarks/did_dp.py [--batch 8] [--seq-len 1024] [--ref-repo PATH]
Writes benchmarks/results/did_dp.{json,md}.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tdlm.data.sources import load_documents
from tdlm.data.tokenizer import get_tokenizer
from tdlm.did.dp import insertion_targets, rho_python
from tdlm.did.process import delete

OUT = Path(__file__).parent / "results"


def machine() -> dict:
    try:
        model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def make_batch(B: int, L: int, seed: int = 0):
    tok = get_tokenizer("gpt2")
    docs, _ = load_documents("bundled", "text")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for d in docs:
        ids = tok.encode(d)
        if len(ids) >= L - 1:
            rows.append(ids[:L - 1])
        if len(rows) == B:
            break
    x0 = torch.tensor(rows)
    m = torch.full((B,), L - 1)
    alpha = torch.rand(B, generator=g)
    xt, n, keep = delete(x0, m, alpha, g)
    return tok.bos_id, x0, m, xt, n, keep


def timeit(fn, repeat=3, sync=None):
    fn()
    if sync:
        sync()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        ts.append(time.perf_counter() - t)
    return min(ts)


def load_reference(repo: str):
    """Extract ``get_N_ratio`` (and its ``safe_log``/``LOG_ZERO``) from the authors' losses.py."""
    git_dir = Path(repo)
    src = subprocess.run(["git", "--git-dir", str(git_dir), "show", "HEAD:did-fixlen/losses.py"],
                         capture_output=True, text=True, check=True).stdout
    tree = ast.parse(src)
    keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in ("safe_log", "get_N_ratio"))
            or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "LOG_ZERO" for t in n.targets))]
    mod = ast.Module(body=keep, type_ignores=[])
    ns = {"torch": torch}
    exec(compile(mod, "did_ref_losses", "exec"), ns)
    commit = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return ns["get_N_ratio"], commit


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--ref-repo", default="/work/.mirror/FMD-NEXT+DID/repo")
    ap.add_argument("--python-rows", type=int, default=0, help="rows for the Python loop (0: all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    B, L = args.batch, args.seq_len
    bos, x0, m, xt, n, keep = make_batch(B, L)
    res = {"command": "python benchmarks/did_dp.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine(), "batch": B, "seq_len": L, "n": n.tolist()}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        sync = torch.cuda.synchronize if dev == "cuda" else None
        a, mm, b, nn = x0.to(dev), m.to(dev), xt.to(dev), n.to(dev)
        for name, accum in (("ours_torch_f32", torch.float32), ("ours_torch_f64", torch.float64)):
            res[f"{name}_{dev}_s"] = timeit(lambda: insertion_targets(a, mm, b, nn, accum=accum,
                                                                      backend="torch"), sync=sync)
        res[f"ours_default_{dev}_s"] = timeit(lambda: insertion_targets(a, mm, b, nn), sync=sync)
    res["default_backend_cpu"] = "numba" if __import__("tdlm.did.dp_numba", fromlist=["x"]).AVAILABLE else "torch"
    # plain Python double loop (exact integers), as many rows as asked
    rows = args.python_rows or B
    t = time.perf_counter()
    for r in range(rows):
        rho_python(x0[r].tolist(), xt[r, :int(n[r])].tolist())
    py = (time.perf_counter() - t) * B / rows
    res["python_loop_s"] = py
    res["python_loop_rows_timed"] = rows
    # the authors' DP on the same batch (BOS + body; their remain mask)
    try:
        ref, commit = load_reference(args.ref_repo)
        full = torch.cat([torch.full((B, 1), bos), x0], 1)
        remain = torch.cat([torch.ones(B, 1, dtype=torch.bool), keep], 1)
        seqlens = remain.sum(-1)
        for dev in devices:
            sync = torch.cuda.synchronize if dev == "cuda" else None
            f, rm, sl = full.to(dev), remain.to(dev), seqlens.to(dev)
            res[f"authors_{dev}_s"] = timeit(lambda: ref(f, rm, sl, 50257), sync=sync)
        res["authors_commit"] = commit
    except Exception as e:                               # record why, keep our figures
        res["authors_error"] = f"{type(e).__name__}: {e}"
    for dev in devices:
        ours = res[f"ours_default_{dev}_s"]
        res[f"speedup_vs_python_{dev}"] = py / ours
        if f"authors_{dev}_s" in res:
            res[f"speedup_vs_authors_{dev}"] = res[f"authors_{dev}_s"] / ours
            res[f"speedup_torch_f32_vs_authors_{dev}"] = res[f"authors_{dev}_s"] / res[f"ours_torch_f32_{dev}_s"]
    OUT.mkdir(exist_ok=True)
    (OUT / "did_dp.json").write_text(json.dumps(res, indent=2))
    lines = [f"# DID DP benchmark (B = {B}, L = {L})", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}", "",
             "| implementation | device | seconds per batch | ours is faster by |", "|---|---|---|---|"]
    for dev in devices:
        default = res["default_backend_cpu"] if dev == "cpu" else "torch"
        lines.append(f"| ours, default ({default}) | {dev} | {res[f'ours_default_{dev}_s']:.4f} | |")
        lines.append(f"| ours, torch column loop, float32 tables | {dev} | {res[f'ours_torch_f32_{dev}_s']:.4f} | |")
        lines.append(f"| ours, torch column loop, float64 tables | {dev} | {res[f'ours_torch_f64_{dev}_s']:.4f} | |")
        if f"authors_{dev}_s" in res:
            lines.append(f"| authors' `get_N_ratio` ({res['authors_commit'][:7]}) | {dev} | "
                         f"{res[f'authors_{dev}_s']:.4f} | {res[f'speedup_vs_authors_{dev}']:.1f}x |")
    lines.append(f"| plain Python double loop ({rows} of {B} rows timed) | cpu | {py:.2f} | "
                 f"{res['speedup_vs_python_cpu']:.0f}x |")
    if "authors_error" in res:
        lines.append(f"\nThe authors' DP could not run: {res['authors_error']}")
    lines += ["", f"xt lengths n per row: {res['n']}.",
              "The authors' DP runs on BOS + body, thresholds values below 1e-6 and builds a sparse "
              "COO matrix per row (a Python loop over the batch); ours anchors BOS, keeps every "
              "non-zero target and sums duplicates.",
              "", "The speed-up column compares with our default backend. The torch column loop "
              "needs ~n sequential small ops, whose dispatch overhead dominates on a CPU; on CPU the "
              "default is the numba kernel (dense recursions in compiled loops, band-restricted "
              "output)."]
    (OUT / "did_dp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
