"""DID subsequence-count DP: our vectorised DP vs a plain Python double loop vs the authors' DP.

One batch for all: B rows of x0 = L-1 GPT-2 tokens of real text (bundled corpus), xt from
deletion at alpha ~ U(0, 1) per row. Targets of the issue (B = 8, L = 1024): ours >= 50x the
Python double loop and >= 5x the authors' DP.

* ours: ``tdlm.did.dp.insertion_targets`` (default: exact float64 count tables, float32
  outputs), also with log-space float32 / float64 tables.
* Python: ``tdlm.did.dp.rho_python``, the O(mn) prefix, suffix and rho double loops on exact
  integers. With ``--python-rows k`` only k rows are timed and the time is scaled by
  sum m(n+1) over all rows / over the timed rows (the loops do ~3 m(n+1) steps).
* authors: ``get_N_ratio`` of FMD-NEXT/DID (did-fixlen/losses.py), read from a local git mirror
  (``--ref-repo``, never copied into this repository): only that function (with its
  ``safe_log``/``LOG_ZERO``) is extracted into a temporary module and run on BOS + body with
  their remain mask. It runs its DP over all of BOS + x0 (1024 steps of a [1024, 2, B]
  logaddexp), keeps values >= 1e-6 and builds a sparse COO matrix per row.

    python benchmarks/did_dp.py [--batch 8] [--seq-len 1024] [--threads 1] [--repeat 7]
Writes benchmarks/results/did_dp.{json,md}.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from tdlm.data.sources import load_documents
from tdlm.data.tokenizer import get_tokenizer
from tdlm.did.dp import insertion_targets, rho_python
from tdlm.did.process import delete

OUT = Path(__file__).parent / "results"


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name"))
    except Exception:
        model = platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def make_batch(B: int, L: int, seed: int = 0):
    tok = get_tokenizer("gpt2")
    docs, _ = load_documents("bundled", "text")
    rows = []
    for d in docs:                                       # documents long enough for L-1 tokens
        ids = tok.encode(d)
        if len(ids) >= L - 1:
            rows.append(ids[:L - 1])
        if len(rows) == B:
            break
    if len(rows) < B:                                    # else: concatenate documents
        stream = [t for d in docs for t in tok.encode(d)]
        rows += [stream[k * (L - 1):(k + 1) * (L - 1)] for k in range(B - len(rows))]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.tensor(rows)
    m = torch.full((B,), L - 1)
    alpha = torch.rand(B, generator=g)
    xt, n, keep = delete(x0, m, alpha, g)
    return tok.bos_id, x0, m, xt, n, keep, alpha


def _setup(dev: str):
    """Thread count for "cpuK"; the synchronisation for "cuda"."""
    if dev.startswith("cpu"):
        torch.set_num_threads(int(dev[3:]))
        return None
    return torch.cuda.synchronize


def timeit(fn, repeat: int, sync=None) -> dict:
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
    return {"median_s": statistics.median(ts), "min_s": min(ts), "repeat": repeat}


def load_reference(git_dir: str):
    """``get_N_ratio`` (and ``safe_log``, ``LOG_ZERO``) from the authors' losses.py at HEAD."""
    git = ["git", "--git-dir", git_dir]
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    src = subprocess.run(git + ["show", f"{commit}:did-fixlen/losses.py"], capture_output=True, text=True,
                         check=True).stdout
    keep = [s for s in ast.parse(src).body
            if (isinstance(s, ast.FunctionDef) and s.name in ("safe_log", "get_N_ratio"))
            or (isinstance(s, ast.Assign) and any(getattr(t, "id", "") == "LOG_ZERO" for t in s.targets))]
    ns = {"torch": torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "FMD-NEXT/DID:did-fixlen/losses.py", "exec"), ns)
    return ns["get_N_ratio"], commit


def compare_with_reference(tg, ref_sparse, n: torch.Tensor) -> dict:
    """Our targets vs the authors' (their rows: packed BOS+xt positions = gaps; threshold 1e-6)."""
    starts = torch.cumsum(n + 1, 0) - (n + 1)
    ours = torch.sparse_coo_tensor(torch.stack([starts[tg.seq] + tg.gap, tg.token]), tg.rho.double(),
                                   size=ref_sparse.shape).coalesce()
    diff = (ours - ref_sparse.double()).coalesce().values().abs()
    big = ours.values() >= 1e-6
    return {"ours_nnz": int(ours.values().numel()), "ours_nnz_ge_1e-6": int(big.sum()),
            "authors_nnz": int(ref_sparse.values().numel()), "max_abs_diff": float(diff.max()) if diff.numel() else 0.0}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="+", default=[1],
                    help="torch CPU thread counts to time ours and the authors' DP at")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--python-rows", type=int, default=0, help="rows timed for the Python loop (0: all)")
    ap.add_argument("--ref-repo", default="/work/.mirror/FMD-NEXT+DID/repo", help="git dir of FMD-NEXT/DID")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")   # from the authors' code
    threads = sorted(set(args.threads))
    B, L = args.batch, args.seq_len
    bos, x0, m, xt, n, keep, alpha = make_batch(B, L)
    res = {"command": " ".join(["python", "benchmarks/did_dp.py"] + list(argv if argv is not None else sys.argv[1:])),
           "machine": machine(), "batch": B, "seq_len": L, "m": m.tolist(), "n": n.tolist(),
           "alpha": [round(a, 4) for a in alpha.tolist()], "timings": {}}
    T = res["timings"]
    # devices: "cpu<threads>" and "cuda"
    devices = [f"cpu{k}" for k in threads] + (["cuda"] if torch.cuda.is_available() else [])
    variants = {"ours": {}, "ours_log_f32": {"log_space": True, "table_dtype": torch.float32},
                "ours_log_f64": {"log_space": True, "table_dtype": torch.float64}}
    for dev in devices:
        sync = _setup(dev)
        a, mm, b, nn = (t.to(dev.rstrip("0123456789")) for t in (x0, m, xt, n))
        for name, kw in variants.items():
            T[f"{name}_{dev}"] = timeit(lambda: insertion_targets(a, mm, b, nn, **kw), args.repeat, sync)
    torch.set_num_threads(1)
    tg = insertion_targets(x0, m, xt, n)
    res["targets"] = int(tg.rho.numel())
    # the plain Python double loop (exact integers)
    rows = args.python_rows or B
    t = time.perf_counter()
    for r in range(rows):
        rho_python(x0[r].tolist(), xt[r, :int(n[r])].tolist())
    timed = time.perf_counter() - t
    cells = (m * (n + 1)).double()
    scale = float(cells.sum() / cells[:rows].sum())
    T["python_loop"] = {"seconds_timed": timed, "rows_timed": rows, "scale": scale, "estimate_s": timed * scale}
    # the authors' DP on the same batch: BOS + body, their remain mask
    try:
        ref, commit = load_reference(args.ref_repo)
        full = torch.cat([torch.full((B, 1), bos), x0], 1)
        remain = torch.cat([torch.ones(B, 1, dtype=torch.bool), keep], 1)
        for dev in devices:
            sync = _setup(dev)
            f, rm, sl = (t.to(dev.rstrip("0123456789")) for t in (full, remain, remain.sum(-1)))
            T[f"authors_{dev}"] = timeit(lambda: ref(f, rm, sl, 50257), max(3, args.repeat // 2), sync)
        torch.set_num_threads(1)
        res["authors_commit"] = commit
        res["agreement_with_authors"] = compare_with_reference(tg, ref(full, remain, remain.sum(-1), 50257), n)
    except Exception as e:                               # record why, keep our figures
        res["authors_error"] = f"{type(e).__name__}: {e}"
    py = T["python_loop"]["estimate_s"]
    sp = res["speedups"] = {}
    for dev in devices:
        ours = T[f"ours_{dev}"]["median_s"]
        sp[f"python_loop_over_ours_{dev}"] = py / ours
        if f"authors_{dev}" in T:
            sp[f"authors_over_ours_{dev}"] = T[f"authors_{dev}"]["median_s"] / ours
    # headline on CPU: each implementation at its best thread count
    best = {k: min(T[f"{k}_{d}"]["median_s"] for d in devices if d.startswith("cpu") and f"{k}_{d}" in T)
            for k in ("ours", "authors") if any(f"{k}_{d}" in T for d in devices)}
    sp["python_loop_over_ours_cpu_best"] = py / best["ours"]
    if "authors" in best:
        sp["authors_over_ours_cpu_best"] = best["authors"] / best["ours"]
    res["machine"]["torch_threads_timed"] = threads
    OUT.mkdir(exist_ok=True)
    (OUT / "did_dp.json").write_text(json.dumps(res, indent=2) + "\n")
    mc = res["machine"]
    lines = [f"# DID DP benchmark (B = {B}, L = {L})", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {mc['cpu']} (`lscpu` model name), {mc['cores']} cores shared with other jobs, "
             f"torch {mc['torch']}, Python {mc['python']}, CUDA: {mc['cuda'] or 'none'}. "
             f"Device `cpuK` = CPU with K torch threads.", "",
             f"Batch: {B} rows of x0 = {L - 1} GPT-2 tokens of bundled text; xt by deletion at "
             f"alpha ~ U(0,1): n = {res['n']}; {res['targets']} targets.", "",
             "| implementation | device | median s / batch | min s | ours (default) is faster by |",
             "|---|---|---|---|---|"]
    for dev in devices:
        for name, label in (("ours", "ours, exact float64 counts (default)"),
                            ("ours_log_f32", "ours, log space, float32 tables"),
                            ("ours_log_f64", "ours, log space, float64 tables")):
            lines.append(f"| {label} | {dev} | {T[f'{name}_{dev}']['median_s']:.4f} | {T[f'{name}_{dev}']['min_s']:.4f} | |")
        if f"authors_{dev}" in T:
            lines.append(f"| authors' `get_N_ratio` (FMD-NEXT/DID@{res['authors_commit'][:7]}) | {dev} | "
                         f"{T[f'authors_{dev}']['median_s']:.4f} | {T[f'authors_{dev}']['min_s']:.4f} | "
                         f"{sp[f'authors_over_ours_{dev}']:.1f}x |")
    pl = T["python_loop"]
    how = "all rows timed" if pl["rows_timed"] == B else \
        f"{pl['rows_timed']} of {B} rows timed ({pl['seconds_timed']:.2f} s), scaled by sum m(n+1) (x{pl['scale']:.2f})"
    lines.append(f"| plain Python double loop, exact ints ({how}) | cpu | {py:.3f} | | "
                 f"{sp['python_loop_over_ours_cpu_best']:.0f}x |")
    lines += ["", f"Headline (CPU, each at its best thread count): ours is "
              f"{sp['python_loop_over_ours_cpu_best']:.0f}x faster than the Python double loop"
              + (f" and {sp['authors_over_ours_cpu_best']:.1f}x faster than the authors' DP."
                 if "authors_over_ours_cpu_best" in sp else "."), ""]
    if "authors_error" in res:
        lines.append(f"The authors' DP could not run: {res['authors_error']}")
    else:
        ag = res["agreement_with_authors"]
        lines.append(f"Agreement: the authors' {ag['authors_nnz']} targets (their threshold 1e-6) vs our "
                     f"{ag['ours_nnz']} ({ag['ours_nnz_ge_1e-6']} of them >= 1e-6): max |difference| "
                     f"{ag['max_abs_diff']:.2e} over the union.")
    lines += ["", "Targets of the issue: >= 50x the Python double loop, >= 5x the authors' DP. "
              "Timings are wall clock on a shared machine (median of the repeats)."]
    (OUT / "did_dp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
