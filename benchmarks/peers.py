"""One training step of the library beside the reference implementations, same shape/batch/precision.

    python benchmarks/peers.py --duo /tmp/peers/duo --gidd /tmp/peers/gidd \\
        --flash-attn /tmp/peers/flash-attention [--batch 2 4] [--rounds 3] [--threads 2]

Rows (mdlm-small's shape: d=768, 12 blocks, 12 heads, GPT-2 vocabulary + [MASK], L=512, fp32
on the CPU, dropout as each code's default for the 0.1-dropout small model, EMA off):

* ``tdlm mdlm-small``: the library's MDLM step as the trainer runs it
  (:func:`tdlm.train.step.train_step`: lean masked-position head, fused AdamW);
* ``tdlm mdlm-small (reference head, loop AdamW)``: the same step with ``family.head_impl =
  reference`` and PyTorch's per-tensor AdamW, i.e. the library's step before the lean one;
* ``tdlm tdlm-small``: TDLM at equal parameters (17 blocks, K=512, H=2);
* ``tdlm tdlm-small (train.cpu_allocator=system)``: the same with glibc's default allocator
  instead of the retained heap the trainer sets on the CPU (the allocator's share of the step);
* ``DUO MDLM``: DUO's ``models/dit.py`` DIT (github.com/s-sahoo/duo, the MDLM authors'
  maintained code), its MDLM loss written out here from ``algo.MDLM._process_model_output``
  and ``nll_per_token`` (SUBS on full [B, L, V] logits, log-linear weights; the Lightning
  trainer around it is not imported), AdamW as its trainer builds it (PyTorch's default:
  the per-tensor loop on the CPU);
* ``DUO MDLM (with the library's retained heap)``: DUO's step in a process where the library's
  allocator setting (``tdlm.train.step.retain_heap``) was applied first: what DUO's code gains
  from the same setting, so that the library's lead is not read as the allocator's alone;
* ``GIDD MDLM``: GIDD's ``gidd/models/dit.py`` DIT (github.com/dvruette/gidd, pure-PyTorch path)
  and GIDD's own ``MDLMLoss`` (imported from ``gidd/loss.py``), AdamW as its optimizer.py builds it;
* ``--compile ROW ...``: those rows also with ``torch.compile`` (the library: ``train.compile``,
  per block; the peers: ``torch.compile`` of their DIT module), where it compiles.

Each (row, B, round) runs in a fresh process (``--worker``): build the model, probe the
matmul rate (2048^3 fp32 matmuls, the MFU denominator, in the same process), one untimed
warm-up step, ``--steps`` timed full steps (forward, loss, backward, clipping to 1.0, AdamW);
the process reports the median step, its peak RSS and the probe. Rounds go round-robin over
the rows (order alternating) so machine load hits all rows alike; ratios are taken per
round against DUO's step in that round. The noising (masking with probability t) is the
same few lines for the peers (not their data pipelines). Model FLOPs per token for MFU are
the library's analytic count of the architecture (``tdlm.flops``: 3x the non-embedding
forward with the full V-way head), the same for every MDLM row, so a step that skips work
(the lean head) shows it as a higher MFU.
"""
from __future__ import annotations

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from peer_code import STAND_INS, commit, flash_attn_shim, load_module  # noqa: E402
from speed import machine, matmul_peak  # noqa: E402

SEQ_LEN = 512
V = 50257
ROWS = {
    "tdlm-mdlm": ("tdlm mdlm-small", "library"),
    "tdlm-mdlm-ref": ("tdlm mdlm-small (reference head, loop AdamW)", "library"),
    "tdlm-tdlm": ("tdlm tdlm-small", "library"),
    "tdlm-tdlm-sys": ("tdlm tdlm-small (train.cpu_allocator=system)", "library"),
    "duo": ("DUO MDLM", "peer"),
    "duo-heap": ("DUO MDLM (with the library's retained heap)", "peer"),
    "gidd": ("GIDD MDLM", "peer"),
}
SMALL = dict(hidden_size=768, cond_dim=128, n_heads=12, n_blocks=12, dropout=0.1,
             scale_by_sigma=True, length=SEQ_LEN, max_seq_len=SEQ_LEN)
# --shape smoke: every row end to end in seconds (a check of the harness, not a result)
SMOKE = dict(SMALL, hidden_size=64, cond_dim=32, n_heads=2, n_blocks=2)


def shape(name: str) -> dict:
    return SMALL if name == "small" else SMOKE


def _library_cfg(row: str, shp: dict):
    from tdlm.config import get_preset
    cfg = get_preset("tdlm-small" if row.startswith("tdlm-tdlm") else "mdlm-small")
    if shp is not SMALL:
        extra = cfg.backbone.n_layers - SMALL["n_blocks"]      # TDLM's extra blocks
        cfg.backbone.d_model, cfg.backbone.cond_dim = shp["hidden_size"], shp["cond_dim"]
        cfg.backbone.n_heads, cfg.backbone.n_layers = shp["n_heads"], shp["n_blocks"] + extra // 2
    cfg.data.seq_len = SEQ_LEN
    cfg.backbone.max_seq_len = max(cfg.backbone.max_seq_len, SEQ_LEN)
    return cfg


# ---- one step per row ----------------------------------------------------------------------
def library_step(row: str, B: int, compile_: bool, shp: dict):
    from dataclasses import replace

    import torch

    from tdlm.train.step import family_for, resolve_runtime, single_process, train_step
    cfg = _library_cfg(row, shp)
    cfg.train.precision, cfg.train.ema, cfg.train.compile = "fp32", 0.0, compile_
    if row == "tdlm-tdlm-sys":
        cfg.train.cpu_allocator = "system"
    opts = resolve_runtime(cfg.train, torch.device("cpu"))
    if row == "tdlm-mdlm-ref":
        cfg.family.head_impl = "reference"
        opts = replace(opts, fused_adamw=False)
    fam = family_for(cfg)
    torch.manual_seed(0)
    model = fam.build_model()
    ctx = single_process(fam, model, cfg, torch.device("cpu"), micro=B, opts=opts)
    x = torch.randint(0, V, (B, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    state = {"step": 0}

    def step():
        train_step(ctx, {"input_ids": x}, state["step"])
        state["step"] += 1
    return step, sum(p.numel() for p in model.parameters())


def _masking(B, gen, eps=1e-3):
    """t ~ U(eps, 1) per sequence (antithetic as both peers do), log-linear alpha_t = 1 - t."""
    import torch
    u = (torch.rand(1, generator=gen) + torch.arange(B) / B) % 1
    return (1 - eps) * u + eps


def duo_step(repo: Path, flash: Path, B: int, compile_: bool, tmp: Path, shp: dict):
    import torch
    from omegaconf import OmegaConf
    flash_attn_shim(tmp, flash)
    dit = load_module(repo / "models" / "dit.py", "duo_dit")
    cfg = OmegaConf.create({"model": shp, "algo": {"causal_attention": False}})
    torch.manual_seed(0)
    model = dit.DIT(cfg, vocab_size=V + 1)
    model.train()
    fwd = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0)
    mask = V
    neg_inf = -1000000.0                   # DUO's trainer_base neg_infinity
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V, (B, SEQ_LEN), generator=gen)

    def step():
        t = _masking(B, gen)
        xt = torch.where(torch.rand(B, SEQ_LEN, generator=gen) < t[:, None], mask, x0)
        sigma = torch.zeros(B)             # MDLM: time_conditioning False
        out = fwd(xt, sigma)
        # algo.MDLM._process_model_output
        out[:, :, mask] += neg_inf
        out = out - torch.logsumexp(out, dim=-1, keepdim=True)
        unmasked = xt != mask
        out[unmasked] = neg_inf
        out[unmasked, xt[unmasked]] = 0
        # algo.MDLM.nll_per_token with alpha_t = 1 - t, dalpha_t = -1
        log_p = torch.gather(out, -1, x0[:, :, None]).squeeze(-1)
        nll = log_p * (-1.0) / t[:, None]  # log p * dalpha_t / (1 - alpha_t)
        loss = nll.sum() / nll.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def gidd_step(repo: Path, B: int, compile_: bool, shp: dict):
    import torch
    from omegaconf import OmegaConf
    dit = load_module(repo / "gidd" / "models" / "dit.py", "gidd_dit")
    loss_mod = load_module(repo / "gidd" / "loss.py", "gidd_loss")
    cfg = OmegaConf.create({"model": shp})
    torch.manual_seed(0)
    model = dit.DIT(cfg, vocab_size=V + 1)
    model.train()
    fwd = torch.compile(model) if compile_ else model
    tok = type("Tok", (), {"mask_token_id": V, "__len__": lambda self: V + 1})()
    loss_fn = loss_mod.MDLMLoss(None, tok, None)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.99), weight_decay=0.02, eps=1e-9)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, V, (B, SEQ_LEN), generator=gen)
    attn = torch.ones(B, SEQ_LEN)

    def step():
        t = _masking(B, gen, eps=1e-4)
        zt = torch.where(torch.rand(B, SEQ_LEN, generator=gen) < t[:, None], V, x0)
        logits = fwd(zt, t)
        loss = loss_fn(logits, x0, attn, zt, t)
        loss = loss[0] if isinstance(loss, tuple) else loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def worker(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    row, B, compile_ = a.worker[0], int(a.worker[1]), a.worker[2] == "1"
    with tempfile.TemporaryDirectory() as tmp:
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t_build = time.perf_counter()
        if row.startswith("tdlm"):
            step, n = library_step(row, B, compile_, shape(a.shape))
        elif row in ("duo", "duo-heap"):
            if row == "duo-heap":           # the library's allocator setting, for DUO's code
                from tdlm.config import RunConfig
                from tdlm.train.step import resolve_runtime, retain_heap
                retain_heap(resolve_runtime(RunConfig().train, torch.device("cpu")))
            step, n = duo_step(Path(a.duo), Path(a.flash_attn), B, compile_, Path(tmp),
                               shape(a.shape))
        else:
            step, n = gidd_step(Path(a.gidd), B, compile_, shape(a.shape))
        build = time.perf_counter() - t_build
        probe = matmul_peak(torch.device("cpu"), 2048, 3)
        t0 = time.perf_counter()
        step()                                  # warm-up (and compilation)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        probe += matmul_peak(torch.device("cpu"), 2048, 3)
    return {"row": row, "B": B, "compile": compile_, "params": n, "step_s": statistics.median(times),
            "steps_s": times, "warmup_s": warm, "build_s": build,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "base_rss_mib": base_rss / 1024, "matmul_flops": statistics.median(probe)}


# ---- driver --------------------------------------------------------------------------------
def model_flops_per_token(shp: dict) -> dict:
    """3 x non-embedding forward FLOPs per token (full V-way head) of mdlm-small and
    tdlm-small at L=512, from the library's analytic count."""
    from tdlm.families.base import meta_family
    from tdlm.flops import model_forward_flops
    out = {}
    for name, row in (("mdlm-small", "tdlm-mdlm"), ("tdlm-small", "tdlm-tdlm")):
        cfg = _library_cfg(row, shp)
        if hasattr(cfg.family, "head_impl"):
            cfg.family.head_impl = "reference"
        _, model = meta_family(cfg)            # built on the meta device
        f = model_forward_flops(model, [SEQ_LEN])
        out[name] = 3 * float(f["full"] - f["embedding"]) / SEQ_LEN
    return out


def run_rows(a) -> list:
    rows = [r for r in a.rows]
    variants = [(r, False) for r in rows] + [(r, True) for r in a.compile]
    results = []
    for rnd in range(a.rounds):
        for B in a.batch:
            order = variants if rnd % 2 == 0 else variants[::-1]
            for row, comp in order:
                cmd = [sys.executable, __file__, "--worker", row, str(B), "1" if comp else "0",
                       "--threads", str(a.threads), "--steps", str(a.steps), "--shape", a.shape,
                       "--duo", str(a.duo), "--gidd", str(a.gidd), "--flash-attn", str(a.flash_attn)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    err = (p.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"[peers] round {rnd + 1} B={B} {row}{' compiled' if comp else ''}: "
                          f"FAILED ({err})", flush=True)
                    results.append({"row": row, "B": B, "compile": comp, "round": rnd,
                                     "error": err})
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r["round"] = rnd
                results.append(r)
                print(f"[peers] round {rnd + 1} B={B} {row}{' compiled' if comp else ''}: "
                      f"{r['step_s']:.2f} s/step, peak {r['peak_rss_mib']:.0f} MiB, matmul "
                      f"{r['matmul_flops'] / 1e9:.0f} GFLOP/s", flush=True)
                a.out.mkdir(parents=True, exist_ok=True)      # what is done survives a stop
                (a.out / "peers.partial.json").write_text(json.dumps(results, indent=1))
    return results


def summarise(results: list, flops: dict) -> list:
    ok = [r for r in results if "error" not in r]
    out = []
    for (row, comp) in sorted({(r["row"], r["compile"]) for r in results}):
        for B in sorted({r["B"] for r in results}):
            mine = [r for r in ok if r["row"] == row and r["compile"] == comp and r["B"] == B]
            errs = [r["error"] for r in results if r["row"] == row and r["compile"] == comp
                    and r["B"] == B and "error" in r]
            if not mine:
                out.append({"row": row, "compile": comp, "B": B, "error": errs[0] if errs else "?"})
                continue
            ratios = []
            for r in mine:    # against DUO's eager step of the same round and B
                duo = [d for d in ok if d["row"] == "duo" and not d["compile"] and d["B"] == B
                       and d["round"] == r["round"]]
                if duo:
                    ratios.append(r["step_s"] / duo[0]["step_s"])
            fpt = flops["tdlm-small" if row.startswith("tdlm-tdlm") else "mdlm-small"]
            step = statistics.median(r["step_s"] for r in mine)
            mm = statistics.median(r["matmul_flops"] for r in mine)
            mfu = [fpt * B * SEQ_LEN / r["step_s"] / r["matmul_flops"] for r in mine]
            out.append({"row": row, "label": ROWS[row][0], "compile": comp, "B": B,
                        "rounds": len(mine), "step_s": step, "tokens_per_s": B * SEQ_LEN / step,
                        "ratio_vs_duo_median": statistics.median(ratios) if ratios else None,
                        "ratio_vs_duo_range": [min(ratios), max(ratios)] if ratios else None,
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
                        "params": mine[0]["params"], "matmul_gflops": mm / 1e9,
                        "mfu_median": statistics.median(mfu),
                        "warmup_s": statistics.median(r["warmup_s"] for r in mine)})
    return out


def write(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(res, indent=2) + "\n")
    s = res["summary"]
    lines = ["# One training step: the library beside DUO's and GIDD's code (mdlm-small shape, "
             "L=512, fp32, CPU)", "", f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']['cpu']}, {res['machine'].get('cpu_count', '?')} cores, torch "
             f"{res['machine'].get('torch')}, {res['threads']} threads; {res['rounds']} rounds, "
             f"fresh process per (row, B, round), {res['steps']} timed steps each after one "
             f"warm-up; whole run {res['wall_s'] / 60:.0f} min.", "",
             "Peers (never copied here; checkouts passed by path): " + ", ".join(
                 f"{k} {v['repo']}@{v['commit'][:10]}" for k, v in res["sources"].items()) + ".",
             "Stand-ins: " + "; ".join(res["stand_ins"]) + ".", "",
             "| row | compiled | B | step s (median) | tokens/s | step / DUO's (median, range) | "
             "peak RSS MiB | MFU vs in-process matmul probe |", "|---|---|---|---|---|---|---|---|"]
    for r in s:
        if "error" in r:
            lines.append(f"| {ROWS[r['row']][0]} | {'yes' if r['compile'] else 'no'} | {r['B']} | "
                         f"failed: {r['error'][:120]} | | | | |")
            continue
        rr = r["ratio_vs_duo_median"]
        rng = r["ratio_vs_duo_range"]
        ratio = f"**{rr:.2f}** ({rng[0]:.2f}-{rng[1]:.2f})" if rr is not None else "-"
        lines.append(f"| {r['label']} | {'yes' if r['compile'] else 'no'} | {r['B']} | "
                     f"{r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {ratio} | "
                     f"{r['peak_rss_mib']:.0f} | {100 * r['mfu_median']:.0f}% |")
    lines += ["", "## Targets", ""] + [f"- {t}" for t in res["targets"]] + [""]
    (out / "peers.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = [r for r in s if "error" not in r]
    labels = [f"{r['label']}{' (compiled)' if r['compile'] else ''}\nB={r['B']}" for r in rows]
    ax.barh(range(len(rows)), [r["ratio_vs_duo_median"] or 0 for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xlabel("step time / DUO's step time (same round)")
    fig.tight_layout()
    fig.savefig(out / "peers.png", dpi=120)


def targets(summary: list) -> list:
    def get(row, B, comp=False):
        for r in summary:
            if r["row"] == row and r["B"] == B and r["compile"] == comp and "error" not in r:
                return r
    out = []
    for B in sorted({r["B"] for r in summary}):
        m, t, d = get("tdlm-mdlm", B), get("tdlm-tdlm", B), get("duo", B)
        if m and d:
            ok = m["ratio_vs_duo_median"] <= 0.85
            out.append(f"B={B}: library MDLM step / DUO's = {m['ratio_vs_duo_median']:.2f} "
                       f"(target <= 0.85: {'met' if ok else 'missed by %.2f' % (m['ratio_vs_duo_median'] - 0.85)}); "
                       f"peak RSS {m['peak_rss_mib']:.0f} vs {d['peak_rss_mib']:.0f} MiB")
        if t and d:
            ok = t["ratio_vs_duo_median"] <= 0.75
            mfu_ok = t["mfu_median"] >= 0.80
            out.append(f"B={B}: library TDLM step / DUO's MDLM step = {t['ratio_vs_duo_median']:.2f} "
                       f"(target <= 0.75: {'met' if ok else 'missed by %.2f' % (t['ratio_vs_duo_median'] - 0.75)}); "
                       f"peak RSS {t['peak_rss_mib']:.0f} vs {d['peak_rss_mib']:.0f} MiB "
                       f"(target: no more: {'met' if t['peak_rss_mib'] <= d['peak_rss_mib'] else 'missed'}); "
                       f"TDLM MFU {100 * t['mfu_median']:.0f}% (target >= 80%: "
                       f"{'met' if mfu_ok else 'missed by %.0f points' % (80 - 100 * t['mfu_median'])})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duo", type=Path, required=True, help="checkout of github.com/s-sahoo/duo")
    ap.add_argument("--gidd", type=Path, required=True, help="checkout of github.com/dvruette/gidd")
    ap.add_argument("--flash-attn", type=Path, required=True,
                    help="checkout of github.com/Dao-AILab/flash-attention (rotary reference)")
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--compile", nargs="*", default=[], choices=list(ROWS), metavar="ROW",
                    help="rows also timed with torch.compile (e.g. tdlm-mdlm duo)")
    ap.add_argument("--shape", choices=["small", "smoke"], default="small",
                    help="small: mdlm-small's shape (the result); smoke: a seconds-long check")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", nargs=3, metavar=("ROW", "B", "COMPILE"))
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    t0 = time.perf_counter()
    results = run_rows(a)
    summary = summarise(results, model_flops_per_token(shape(a.shape)))
    cmd = "python benchmarks/peers.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    res = {"command": cmd, "machine": machine(a.threads), "threads": a.threads,
           "rounds": a.rounds, "steps": a.steps, "seq_len": SEQ_LEN,
           "sources": {"duo": {"repo": "github.com/s-sahoo/duo", "commit": commit(a.duo)},
                       "gidd": {"repo": "github.com/dvruette/gidd", "commit": commit(a.gidd)},
                       "flash-attention": {"repo": "github.com/Dao-AILab/flash-attention",
                                           "commit": commit(a.flash_attn)}},
           "stand_ins": STAND_INS[:1] + ["DUO's MDLM loss written out from algo.MDLM "
                                         "(_process_model_output, nll_per_token); noising by "
                                         "the same few lines for both peers"],
           "summary": summary, "results": results, "wall_s": time.perf_counter() - t0}
    res["targets"] = targets(summary)
    write(res, a.out)
    print("\n".join(res["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
