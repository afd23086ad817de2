"""Peak training memory of TDLM vs MDLM at paper shapes (issue: efficiency benchmarks).

    python benchmarks/memory.py --batch 1 2            # writes benchmarks/results/memory.{json,md,png}
    python benchmarks/memory.py --batch 1 --regimes plain --models mdlm-small   # one calibration run

Every (model, regime, micro-batch B) runs in a fresh subprocess (``--worker``) that builds the
preset (mdlm-small / tdlm-small, sequence length overridden to 512, GPT-2 vocabulary 50,257),
creates AdamW, and runs full optimizer steps (forward, ``family.loss``, backward, clip, AdamW
step) on random tokens. The family's own loss is used for both models, so MDLM computes full
logits + SUBS log-softmax exactly as the reference does.

Each step is the trainer's own, ``tdlm.train.step.train_step`` (context from
``single_process``, the B rows as one micro-batch; family and resources from ``family_for``:
TDLM gets a frequency-sorted tree of the preset's K, H). EMA is off (``train.ema=0``, as in the
hand-written step this replaced: an EMA would add a 4 B/param shadow copy to the baseline and
break the 12 B/param accounting below). Differences from that hand-written step (results
committed before this change): the gradients of the summed NELBO are divided by the token
count after backward instead of backpropagating the per-token mean (same gradients up to
rounding, no extra memory: in place), the step's learning rate follows the warm-up schedule,
noise is reseeded from (seed, step), non-finite checks run (host syncs), and on CUDA the SDPA
backends are tried flash first.

The first preset of ``--models`` is the reference (M), the second the one compared with it (T):
the ratio columns are T/M.

Memory, CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set of the process)
after the steps; the baseline is the resident set after model + optimizer creation (Adam moments
and gradients are allocated lazily, so they are part of the increment; the "activation"
increment subtracts them: 12 B/param). CUDA: ``torch.cuda.max_memory_allocated`` and two more
regimes with bf16 autocast (``bf16``, ``bf16_ckpt``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("mdlm-small", "tdlm-small")
SEQ_LEN = 512
MIB = 1024 * 1024


def _rss_now() -> int:
    """Current resident set in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def model_cfg(cfg, seq_len: int | None = None, activation_checkpointing: bool | None = None) -> dict:
    """The config fields this script reads (backbone sizes, family name). With ``seq_len``,
    the model's context is raised to at least that length; with ``activation_checkpointing``,
    that option is set. Returns the fields the benchmark reads."""
    m = cfg.backbone
    if seq_len is not None:
        m.max_seq_len = max(m.max_seq_len, seq_len)
    if activation_checkpointing is not None:
        cfg.train.activation_checkpointing = activation_checkpointing
    return {"family": cfg.family.name, "vocab_size": m.vocab_size, "n_layers": m.n_layers,
            "activation_checkpointing": cfg.train.activation_checkpointing}


def worker(model_name: str, regime: str, batch: int, steps: int, threads: int) -> dict:
    import torch

    from tdlm.config import get_preset
    from tdlm.train.step import family_for, single_process, train_step

    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset(model_name)
    if hasattr(cfg.family, "head_impl"):
        cfg.family.head_impl = "reference"     # the papers' MDLM head (full fp32 logits)
    mc = model_cfg(cfg, SEQ_LEN, activation_checkpointing=regime.endswith("ckpt"))
    cfg.data.seq_len = SEQ_LEN
    precision = "bf16" if regime.startswith("bf16") else "fp32"
    cfg.train.precision = precision
    cfg.train.ema = 0.0
    cfg.train.cpu_allocator = "system"     # RSS increments need glibc's release-to-OS malloc
    family = family_for(cfg)          # shape-only resources (TDLM: the tree)
    torch.manual_seed(0)
    model = family.build_model().to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    # single_process prepares the model as the trainer does (parallelize: activation
    # checkpointing from train.activation_checkpointing)
    ctx = single_process(family, model, cfg, device, micro=batch)
    x = torch.randint(0, mc["vocab_size"], (batch, SEQ_LEN),
                      generator=torch.Generator().manual_seed(1)).to(device)
    batch_d = {"input_ids": x}

    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        base_maxrss = None
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_now()
        base_maxrss = _maxrss()

    times, losses = [], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = train_step(ctx, batch_d, step)
        losses.append(res.loss)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    if device.type == "cuda":
        peak, measure = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, measure = _maxrss(), "ru_maxrss"
    static_lazy = 12 * n_params     # grads + 2 Adam moments, fp32, allocated during the steps
    step_s = min(times[1:]) if len(times) > 1 else times[0]
    return {"model": model_name, "family": mc["family"], "regime": regime, "precision": precision,
            "activation_checkpointing": mc["activation_checkpointing"], "batch": batch,
            "seq_len": SEQ_LEN, "vocab_size": mc["vocab_size"], "n_layers": mc["n_layers"],
            "n_params": n_params, "device": str(device), "measure": measure, "steps": steps,
            "peak_bytes": peak, "baseline_bytes": base, "baseline_maxrss_bytes": base_maxrss,
            "increment_bytes": peak - base,
            "activation_increment_bytes": peak - base - static_lazy,
            "step_times_s": times, "step_s": step_s, "tokens_per_s": batch * SEQ_LEN / step_s,
            "losses": losses}


def run_one(model: str, regime: str, batch: int, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, regime, str(batch),
           "--steps", str(steps), "--threads", str(threads)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return {"model": model, "regime": regime, "batch": batch, "error": p.stderr[-2000:]}
    row = json.loads(p.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.time() - t0
    return row


def machine(threads: int) -> dict:
    from tdlm.utils import machine_info
    return machine_info(threads)


def _mib(b):
    return b / MIB


def write_results(rows: list, mach: dict, command: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"command": command, "machine": mach, "rows": rows},
                                                indent=2))
    ok = [r for r in rows if "error" not in r]
    idx = {(r["model"], r["regime"], r["batch"]): r for r in ok}
    # the reference (M) and the compared model (T): the --models order, kept by the rows
    order = list(dict.fromkeys(r["model"] for r in rows))
    ref, cmp_ = (order + [None, None])[:2]
    regimes = sorted({r["regime"] for r in ok}, key=lambda s: ("ckpt" in s, s))
    batches = sorted({r["batch"] for r in ok})
    dev = "GPU: " + mach.get("gpu", "") if mach.get("cuda") else f"CPU: {mach.get('cpu', '?')}"
    measure = ok[0]["measure"] if ok else "?"
    L = ["# Peak training memory: TDLM vs MDLM (small, GPT-2 vocabulary, L=512)", "",
         f"Command: `{command}`", "",
         f"Machine: {dev}, {mach.get('cpu_count')} cores, {mach.get('mem_total', '?')}, "
         f"torch {mach.get('torch')}, {mach.get('threads', '?')} thread(s) per row. Measure: `{measure}` after {ok[0]['steps'] if ok else '?'} "
         "full optimizer steps (forward + family loss + backward + clip + AdamW), fp32, fresh process "
         "per row.", "",
         "Columns: *peak* = peak resident memory of the process (includes Python/torch runtime); "
         "*base* = resident memory after model + AdamW creation (parameters only: grads and Adam "
         "moments are allocated lazily); *act.* = peak − base − 12 B/param (grads + 2 Adam moments), "
         "i.e. what activations, logits and the loss add on top of the static 16 B/param "
         "(it also carries allocator slack and the init-time high-water mark, so compare it across "
         "models at equal B rather than reading it as exact activation bytes).", "",
         "| regime | B | model | params | peak MiB | base MiB | act. MiB | peak T/M | act. T/M | step s | tokens/s | tok/s T/M |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for reg in regimes:
        for B in batches:
            m, t = idx.get((ref, reg, B)), idx.get((cmp_, reg, B))
            for r in (m, t):
                if r is None:
                    continue
                ratio = " | | "
                if r is t and m is not None:
                    ratio = (f"{t['peak_bytes'] / m['peak_bytes']:.3f} | "
                             f"{t['activation_increment_bytes'] / m['activation_increment_bytes']:.3f} | ")
                tp = (f"{t['tokens_per_s'] / m['tokens_per_s']:.2f}" if (r is t and m is not None) else "")
                L.append(f"| {reg} | {B} | {r['model']} | {r['n_params'] / 1e6:.1f}M | "
                         f"{_mib(r['peak_bytes']):.0f} | {_mib(r['baseline_bytes']):.0f} | "
                         f"{_mib(r['activation_increment_bytes']):.0f} | {ratio}"
                         f"{r['step_s']:.1f} | {r['tokens_per_s']:.1f} | {tp} |")
    errs = [r for r in rows if "error" in r]
    if errs:
        L += ["", "Failed rows: " + ", ".join(f"{r['model']}/{r['regime']}/B={r['batch']}" for r in errs)]
    # honest verdict on the <=0.5 target
    ratios = [(reg, B, idx[(cmp_, reg, B)]["peak_bytes"] / idx[(ref, reg, B)]["peak_bytes"])
              for reg in regimes for B in batches if (cmp_, reg, B) in idx and (ref, reg, B) in idx]
    best = min(ratios, key=lambda x: x[2]) if ratios else None
    L += ["", "## Reading", "",
          "- On CPU at these micro-batches the static part dominates: parameters + gradients + the "
          "two AdamW moments are 16 B/param, about 2.5 GiB for both models (169.6M vs ~170M "
          "parameters, equal budget), plus the Python/torch runtime (~0.7 GiB). What one 512-token "
          "sample adds (activations, logits, loss, allocator slack) is ~0.3-1 GiB here, so at small B "
          "the peak ratio is pulled towards 1 (spec section 9, "
          "\"Where the memory goes\").",
          "- The activation increment (act.) is where the models differ: MDLM keeps V-sized "
          "float32 tensors (512 x 50,258 = 98 MiB per sample each: logits, SUBS log-softmax, its "
          "gradient), TDLM keeps 17 instead of 12 blocks and a K=512-way head applied only to "
          "the moved positions. With activation checkpointing the block activations shrink and "
          "the V-sized tensors become the dominant per-sample cost for MDLM.",
          "- The paper's ≈0.5x claim and the acceptance target (TDLM/MDLM peak ≤ 0.5) concern "
          "GPU training at micro-batches that fill a 24 GB device, not the small B measured here.",
          ]
    if best is not None:
        met = best[2] <= 0.5
        L.append(f"- Verdict for what was measured: the lowest peak ratio is {best[2]:.3f} "
                 f"({best[0]}, B={best[1]}); the ≤0.5 target is **{'met' if met else 'not met'}** "
                 f"in these CPU measurements" + ("" if met else
                 " — expected at this scale, where the 16 B/param static memory dominates; "
                 "the act. ratio shows the trend toward larger B") + ".")
    L.append("- Not run here: the CUDA regimes (`torch.cuda.max_memory_allocated`, bf16 autocast "
             "`bf16`/`bf16_ckpt`) were not measured (no GPU); the code path is present and selected "
             "automatically on a GPU, and their peaks are simulated with fake tensors in "
             "[memory_paper.md](memory_paper.md).")
    (out / "memory.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for model, color in zip(order, ("tab:red", "tab:blue", "tab:green", "tab:orange")):
            for reg in regimes:
                pts = sorted((B, _mib(idx[(model, reg, B)]["peak_bytes"])) for B in batches
                             if (model, reg, B) in idx)
                if pts:
                    fam = idx[(model, reg, pts[0][0])]["family"]
                    ax.plot(*zip(*pts), marker="o", color=color,
                            linestyle="--" if "ckpt" in reg else "-", label=f"{fam} {reg}")
        ax.set_xlabel("micro-batch B (L=512)")
        ax.set_ylabel(f"peak memory, MiB ({measure})")
        ax.set_title("Peak training memory, small models, fp32 + AdamW")
        ax.set_xticks(batches)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=120)
    except Exception as e:   # plotting is optional
        print(f"plot skipped: {e}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "REGIME", "B"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--regimes", nargs="+", default=None,
                    help="default: plain ckpt (+ bf16 bf16_ckpt on CUDA)")
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help="presets: the reference (M) first, then the one compared with it (T)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    if a.worker:
        m, reg, B = a.worker
        print(json.dumps(worker(m, reg, int(B), a.steps, a.threads)))
        return
    import torch
    regimes = a.regimes or (["plain", "ckpt"] + (["bf16", "bf16_ckpt"] if torch.cuda.is_available() else []))
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    rows = []
    for B in a.batch:
        for reg in regimes:
            for m in a.models:
                r = run_one(m, reg, B, a.steps, a.threads)
                rows.append(r)
                if "error" in r:
                    print(f"{m} {reg} B={B}: FAILED\n{r['error']}", file=sys.stderr, flush=True)
                else:
                    print(f"{m} {reg} B={B}: peak {_mib(r['peak_bytes']):.0f} MiB, base "
                          f"{_mib(r['baseline_bytes']):.0f} MiB, step {r['step_s']:.1f} s",
                          file=sys.stderr, flush=True)
    write_results(rows, machine(a.threads), command, Path(a.out))


if __name__ == "__main__":
    main()
