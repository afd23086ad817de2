"""Training and sampling speed of TDLM vs MDLM at paper shapes, with FLOPs and MFU
(issue: efficiency benchmarks, item 3).

    python benchmarks/speed.py                    # writes benchmarks/results/speed.{json,md,png}
    python benchmarks/speed.py --batch 1 --rounds 2 --sample-rounds 1 --out /tmp/speed   # smoke

Models: ``mdlm-small`` (12 blocks, 50,258-way head + SUBS loss) and ``tdlm-small`` (17 blocks,
K=512-way head, H=2), GPT-2 vocabulary, sequence length 512 (``mdlm-small``'s 1024 is
overridden, as in ``memory.py``), random tokens, the families' own losses. The TDLM tree is
a frequency-shaped tree of the preset's K, H (same node count as a k-means tree; the tree's
content does not change the cost). Both models live in one process, built with the same seed.

Timing is **round-robin**: the machine is shared and its speed swings by 2x over minutes, so
instead of timing one model and then the other, every round times one full optimizer step
(forward, family loss, backward, gradient clipping, AdamW) of each model back to back, the
order alternating between rounds; the figure per model is the median over rounds, and the
TDLM/MDLM ratio is reported both as the ratio of medians and as the median of the per-round
ratios. Sampling is timed the same way: ``family.sample`` of ``--sample-num`` sequences with
``--sample-steps`` denoising steps (the library's default sampler, caching included), in
``model.eval()``; sampling tokens/s = generated tokens / wall seconds.

FLOPs (``tdlm.flops``): analytic forward FLOPs of the built models at these shapes; training =
3 x forward. The ``full`` count treats the input embedding as a one-hot matmul (Hoffmann et al.
convention); achieved FLOP/s and MFU use the **non-embedding** count (blocks + head + adaLN/time
MLP), which is the arithmetic actually executed. TDLM's head is applied to the moved positions
only in training, so its analytic head FLOPs (all positions) are an upper bound. Sampling FLOPs
count the forward passes the sampler really made (``ForwardLog``).

Peak: the best FLOP/s of large square ``torch.matmul`` calls (fp32; bf16 on CUDA) with the same
thread count, measured before, between and after the model timings (the maximum is the peak;
the median is reported too). MFU = achieved non-embedding training FLOP/s / peak.

On CUDA (automatic if a GPU is visible) training and sampling run under bf16 autocast and
timings synchronise the device; the peak is a bf16 matmul.

The timed step is the trainer's own, ``tdlm.train.step.train_step`` (context from
``single_process``; family and resources from ``family_for``), with the B-row batch as one
micro-batch: learning rate of the step (warm-up schedule), ``zero_grad``, noise and dropout
reseeded from (seed, step), forward + family loss under the device's autocast (and on CUDA
flash-first SDPA), backward of the summed NELBO, gradients divided by the token count,
non-finite guard, clipping to ``train.grad_clip``, AdamW (fused on CUDA). EMA is off
(``train.ema=0``: ``mdlm-small``'s preset keeps one, ``tdlm-small``'s does not, and the
architectures are compared). Differences from the hand-written step used for the results
committed before this change: that step backpropagated the per-token mean loss (the same
gradients up to rounding) instead of dividing the gradients after backward (one more in-place
pass over the gradients now), had no non-finite checks (now a few ``.item()`` host syncs per
step, which matter on CUDA only), drew noise from one generator for all steps, used the
preset's learning rate without warm-up (the rate does not change the cost), and on CUDA left
the SDPA backend choice to PyTorch.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

MODELS = ("mdlm-small", "tdlm-small")
SEQ_LEN = 512


def model_cfg(cfg, seq_len: int | None = None) -> dict:
    """The config fields this script reads (backbone sizes, family name). With ``seq_len``,
    the model's context is raised to at least that length."""
    m = cfg.backbone
    if seq_len is not None:
        m.max_seq_len = max(m.max_seq_len, seq_len)
    return {"family": cfg.family.name, "vocab_size": m.vocab_size, "n_layers": m.n_layers,
            "d_model": m.d_model}


def machine(threads: int) -> dict:
    from tdlm.utils import machine_info
    return machine_info(threads)


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n: int, reps: int) -> list:
    """FLOP/s of ``reps`` timed ``n x n @ n x n`` matmuls (fp32 on CPU, bf16 on CUDA), after
    one warm-up call; returns one figure per call."""
    import torch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.matmul(a, b)
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        out.append(2.0 * n ** 3 / (time.perf_counter() - t0))
    return out


class Bench:
    """One preset built for timing: family, model, the trainer's step context, fixed random
    batches, FLOPs."""

    def __init__(self, name: str, device, precision: str, batches: list, seed: int = 0):
        import torch

        from tdlm.config import get_preset
        from tdlm.flops import model_forward_flops
        from tdlm.nn.dit import count_parameters
        from tdlm.train.step import family_for, single_process

        cfg = get_preset(name)
        vocab = model_cfg(cfg, SEQ_LEN)["vocab_size"]
        cfg.data.seq_len = SEQ_LEN
        cfg.train.precision = precision
        cfg.train.ema = 0.0
        # shape-only resources (TDLM: a frequency-sorted tree of the preset's K, H)
        self.family = family_for(cfg)
        torch.manual_seed(seed)
        self.name, self.cfg, self.device, self.precision = name, cfg, device, precision
        self.model = self.family.build_model().to(device)
        self.params = count_parameters(self.model)
        # every timed batch is one micro-batch
        self.ctx = single_process(self.family, self.model, cfg, device, micro=max(batches))
        self.opt = self.ctx.opt
        self.steps_done = 0
        self.x = {B: torch.randint(0, vocab, (B, SEQ_LEN),
                                   generator=torch.Generator().manual_seed(1 + B)).to(device)
                  for B in batches}
        self.flops = {B: model_forward_flops(self.model, [SEQ_LEN] * B) for B in batches}

    def facts(self) -> dict:
        """What the report shows of the model: config fields, the family's ``describe()``
        (TDLM: tree_K, tree_H, tree_nodes) and the parameter counts."""
        m = model_cfg(self.cfg)
        return {"family": m["family"], "n_layers": m["n_layers"], "d_model": m["d_model"],
                "params": self.params, **self.family.describe()}

    def train_step(self, B: int) -> float:
        """One full optimizer step (``tdlm.train.step.train_step``) on the B x 512 batch;
        returns wall seconds."""
        from tdlm.train.step import train_step
        self.model.train()
        _sync(self.device)
        t0 = time.perf_counter()
        train_step(self.ctx, {"input_ids": self.x[B]}, self.steps_done)
        _sync(self.device)
        self.steps_done += 1
        return time.perf_counter() - t0

    def sample(self, num: int, steps: int, seed: int) -> tuple:
        """``family.sample`` of ``num`` x 512 tokens in ``steps`` steps; returns (wall seconds,
        ForwardLog)."""
        import torch

        from tdlm.families.base import autocast_ctx
        from tdlm.sampling.loop import ForwardLog
        self.model.eval()
        log = ForwardLog()
        g = torch.Generator(device=self.device).manual_seed(seed)
        _sync(self.device)
        t0 = time.perf_counter()
        with autocast_ctx(self.device, self.precision):
            self.family.sample(self.model, num, SEQ_LEN, steps, g, log=log)
        _sync(self.device)
        return time.perf_counter() - t0, log


def _nonembed(f: dict) -> float:
    return float(f["full"] - f["embedding"])


def sample_efficiency(blocks: float, tokens: int, seconds: float, peak: float) -> dict:
    """Sampling's achieved FLOP/s and MFU on the backbone's FLOPs (the transformer blocks of
    every forward call): the output layer is left out because the samplers run it on the rows
    they read only (MDLM: the positions that move), so counting it at every position (the
    model-FLOPs convention of ``flops_nonembed``) would credit MDLM with work it never did."""
    return {"flops_blocks": blocks, "flops_per_token_blocks": blocks / tokens,
            "achieved_flops": blocks / seconds, "mfu": blocks / seconds / peak}


def run(a) -> dict:
    import torch

    from tdlm.flops import flops_from_log
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    peaks = matmul_peak(device, a.matmul_n, a.matmul_reps)
    print(f"[speed] matmul peak {max(peaks) / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)
    benches = [Bench(m, device, precision, a.batch) for m in a.models]
    res = {"train": {}, "sample": {}}
    for B in a.batch:
        for b in benches:            # warm-up (allocator, lazy optimizer state)
            for _ in range(a.warmup):
                b.train_step(B)
        times = {b.name: [] for b in benches}
        for r in range(a.rounds):
            order = benches if r % 2 == 0 else benches[::-1]
            for b in order:
                times[b.name].append(b.train_step(B))
            print(f"[speed] train B={B} round {r + 1}/{a.rounds}: " +
                  ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr, flush=True)
        peaks += matmul_peak(device, a.matmul_n, a.matmul_reps)
        res["train"][B] = times
    for b in benches:
        b.opt.zero_grad(set_to_none=True)
        b.sample(a.sample_num, 2, 0)     # warm-up
    stimes = {b.name: [] for b in benches}
    slogs = {}
    for r in range(a.sample_rounds):
        order = benches if r % 2 == 0 else benches[::-1]
        for b in order:
            dt, log = b.sample(a.sample_num, a.sample_steps, r)
            stimes[b.name].append(dt)
            slogs[b.name] = flops_from_log(log, {n: b.model for n in log.shapes})
        print(f"[speed] sample round {r + 1}/{a.sample_rounds}: " +
              ", ".join(f"{k} {v[-1]:.2f} s" for k, v in stimes.items()), file=sys.stderr, flush=True)
    peaks += matmul_peak(device, a.matmul_n, a.matmul_reps)
    res["sample"] = stimes
    peak = max(peaks)

    out = {"models": {}, "train": [], "sample": {}, "peak_flops": peak,
           "peak_flops_median": statistics.median(peaks), "peak_samples": peaks,
           "device": str(device), "precision": precision, "seq_len": SEQ_LEN}
    for b in benches:
        out["models"][b.name] = b.facts()
    for B in a.batch:
        row = {"batch": B, "tokens_per_step": B * SEQ_LEN, "models": {}}
        for b in benches:
            ts = res["train"][B][b.name]
            med = statistics.median(ts)
            f = b.flops[B]
            tr_full, tr_ne = 3.0 * f["full"], 3.0 * _nonembed(f)
            row["models"][b.name] = {
                "step_times_s": ts, "step_s_median": med, "step_s_min": min(ts),
                "tokens_per_s": B * SEQ_LEN / med, "tokens_per_s_best": B * SEQ_LEN / min(ts),
                "forward_flops": f, "train_flops_per_token_full": tr_full / (B * SEQ_LEN),
                "train_flops_per_token_nonembed": tr_ne / (B * SEQ_LEN),
                "achieved_flops": tr_ne / med, "mfu": tr_ne / med / peak,
                "mfu_best_step": tr_ne / min(ts) / peak}
        m_, t_ = row["models"][a.models[0]], row["models"][a.models[1]]
        row["throughput_ratio_tdlm_mdlm"] = t_["tokens_per_s"] / m_["tokens_per_s"]
        row["throughput_ratio_paired_median"] = statistics.median(
            mt / tt for mt, tt in zip(m_["step_times_s"], t_["step_times_s"]))
        row["flops_per_token_ratio_tdlm_mdlm"] = (t_["train_flops_per_token_nonembed"] /
                                                  m_["train_flops_per_token_nonembed"])
        out["train"].append(row)
    N = a.sample_num * SEQ_LEN
    for b in benches:
        ts = stimes[b.name]
        med = statistics.median(ts)
        lg = slogs[b.name]
        fl_ne = float(lg["full"] - lg["embedding"])
        out["sample"][b.name] = {"num": a.sample_num, "steps": a.sample_steps, "times_s": ts,
                                 "seconds_median": med, "tokens_per_s": N / med,
                                 "forward_calls": sum(v["calls"] for v in lg["per_model"].values()),
                                 "flops_full": float(lg["full"]), "flops_nonembed": fl_ne,
                                 "flops_per_token_nonembed": fl_ne / N,
                                 **sample_efficiency(float(lg["blocks"]), N, med, peak)}
    sm, st = out["sample"][a.models[0]], out["sample"][a.models[1]]
    out["sample_ratio_tdlm_mdlm"] = st["tokens_per_s"] / sm["tokens_per_s"]
    out["sample_ratio_paired_median"] = statistics.median(
        m / t for m, t in zip(sm["times_s"], st["times_s"]))
    return out


def half_head_ratio(row: dict, md: str, td: str) -> float:
    """TDLM's training FLOPs per token over MDLM's when MDLM's output layer runs on half the
    positions (the masked ones at t ~ U(0, 1)): MDLM's non-embedding model FLOPs less half of
    3 x its head's forward FLOPs."""
    m, t = row["models"][md], row["models"][td]
    tokens = row["tokens_per_step"]
    m_actual = m["train_flops_per_token_nonembed"] - 1.5 * m["forward_flops"]["head"] / tokens
    return t["train_flops_per_token_nonembed"] / m_actual


def write_results(res: dict, mach: dict, command: str, a, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "speed.json").write_text(json.dumps({"command": command, "machine": mach,
                                                    "settings": {k: v for k, v in vars(a).items() if k != "report_only"}, **res}, indent=2))
    G = 1e9
    dev = ("GPU: " + mach.get("gpu", "")) if mach.get("cuda") else f"CPU: {mach.get('cpu', '?')}"
    M = res["models"]
    MD, TD = a.models
    L = [f"# Training and sampling speed: TDLM vs MDLM ({TD} vs {MD}, GPT-2 vocabulary, L={SEQ_LEN})", "",
         f"Command: `{command}`", "",
         f"Machine: {dev}, {mach.get('cpu_count')} cores **shared with other jobs** (load "
         f"average at start {', '.join(f'{x:.2f}' for x in mach.get('load_average_at_start', []))}), "
         f"{mach.get('mem_total', '?')}, torch {mach['torch']}, {mach['threads']} threads, "
         f"{res['precision']}; whole benchmark {res.get('wall_s', float('nan')) / 60:.0f} min wall. "
         + ("Fewer threads than cores because the CPU was oversubscribed by other jobs (a "
            "2-thread attempt under that load was slower per step than 1 thread)."
            if mach["threads"] < (mach.get("cpu_count") or 1) else ""), "",
         f"Models: {MD} ({M[MD]['n_layers']} blocks, "
         f"{M[MD]['params']['total'] / 1e6:.1f}M parameters) and {TD} "
         f"({M[TD]['n_layers']} blocks, K={M[TD]['tree_K']}, "
         f"H={M[TD]['tree_H']}, {M[TD]['params']['total'] / 1e6:.1f}M), "
         f"random tokens, timed round-robin ({a.rounds} rounds per batch size after {a.warmup} "
         "warm-up step(s), order alternating; medians).", "",
         f"Measured matmul peak ({a.matmul_n}x{a.matmul_n} `torch.matmul`, same threads): "
         f"max {res['peak_flops'] / G:.1f} GFLOP/s (median {res['peak_flops_median'] / G:.1f}) "
         f"over {len(res['peak_samples'])} calls spread over the run.", "",
         "## Training (full optimizer steps)", "",
         "| B | model | step s (median) | tokens/s | TDLM/MDLM tokens/s (ratio of medians / median of paired rounds) | train GFLOP/token (non-emb.) | full GFLOP/token | achieved GFLOP/s | MFU |",
         "|---|---|---|---|---|---|---|---|---|"]
    for row in res["train"]:
        for name in a.models:
            r = row["models"][name]
            ratio = (f"**{row['throughput_ratio_tdlm_mdlm']:.2f}** / "
                     f"{row['throughput_ratio_paired_median']:.2f}" if name == TD else "")
            L.append(f"| {row['batch']} | {name} | {r['step_s_median']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{ratio} | {r['train_flops_per_token_nonembed'] / G:.3f} | "
                     f"{r['train_flops_per_token_full'] / G:.3f} | {r['achieved_flops'] / G:.1f} | "
                     f"{100 * r['mfu']:.1f}% |")
    s = res["sample"]
    L += ["", f"## Sampling ({s[MD]['num']} sequences x {SEQ_LEN} tokens, "
          f"{s[MD]['steps']} denoising steps, {a.sample_rounds} rounds)", "",
          "| model | seconds (median) | tokens/s | forward calls | backbone GFLOP/token | "
          "achieved GFLOP/s (backbone) | MFU (backbone) |",
          "|---|---|---|---|---|---|---|"]
    for name in a.models:
        r = s[name]
        L.append(f"| {name} | {r['seconds_median']:.2f} | {r['tokens_per_s']:.1f} | {r['forward_calls']} | "
                 f"{r['flops_per_token_blocks'] / G:.3f} | {r['achieved_flops'] / G:.1f} | {100 * r['mfu']:.1f}% |")
    L.append("\nSampling FLOPs are the blocks' (every forward call): the samplers run the output "
             "layer on the rows they read only, so it is not counted for either model.")
    L.append(f"\nSampling throughput TDLM/MDLM: **{res['sample_ratio_tdlm_mdlm']:.2f}x** "
             f"(median of paired rounds {res['sample_ratio_paired_median']:.2f}x).")
    ratios = [row["throughput_ratio_tdlm_mdlm"] for row in res["train"]]
    fr = res["train"][0]["flops_per_token_ratio_tdlm_mdlm"]
    met = all(x >= 1.0 for x in ratios)
    mfus = [row["models"][n]["mfu"] for row in res["train"] for n in a.models]
    L += ["", "## Reading", "",
          "- Training throughput ratio TDLM/MDLM (target >= 1.0): "
          + ", ".join(f"B={row['batch']}: {row['throughput_ratio_tdlm_mdlm']:.2f}" for row in res["train"])
          + f" — target **{'met' if met else 'not met at every B'}**"
          + ("" if met else f" (lowest {min(ratios):.2f}, {100 * (1 - min(ratios)):.0f}% short)") + ".",
          f"- Per token TDLM does {fr:.2f}x MDLM's non-embedding training FLOPs "
          f"({M[TD]['n_layers']} vs {M[MD]['n_layers']} blocks; K-way vs V-way head): the "
          "blocks bought with the head's parameters cost about what the head did, counted "
          "as model FLOPs (the output layer at every position). MDLM's step runs its d x V "
          "output layer only on the masked positions (`family.head_impl=masked`: SUBS gives "
          "the others zero loss and gradient), about half of them at t ~ U(0, 1), so it does "
          "less arithmetic than the column says and the achieved-GFLOP/s ratio ("
          + " / ".join(f"{row['models'][TD]['achieved_flops'] / row['models'][MD]['achieved_flops']:.2f}x"
                       for row in res["train"])
          + " at B=" + " / ".join(str(row["batch"]) for row in res["train"])
          + f") is mostly that: with half the head, TDLM's arithmetic per token is about "
          f"{half_head_ratio(res['train'][0], MD, TD):.2f}x MDLM's.",
          f"- MFU ({100 * min(mfus):.0f}-{100 * max(mfus):.0f}% in training) is relative to the "
          "matmul peak measured in the same conditions; on a shared, oversubscribed CPU that "
          "peak is itself depressed (see the spread between its max and median), so MFU here "
          "says how close a step gets to what the process could get from the machine at that "
          "time, not to the hardware's nominal peak.",
          f"- Sampling: {s[TD]['steps']} steps (TDLM: split evenly over its levels), "
          f"{s[MD]['num']} sequence(s); TDLM/MDLM {res['sample_ratio_tdlm_mdlm']:.2f}x.",
          "- The machine is shared: absolute figures move by up to 2x between runs; the "
          "round-robin ratios are the robust numbers. GPU figures (bf16) were not measured here "
          "(no GPU); the code path is automatic on CUDA."]
    (out_dir / "speed.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        labels = [f"train B={row['batch']}" for row in res["train"]] + ["sample"]
        xs = range(len(labels))
        for i, (name, color) in enumerate(((MD, "tab:red"), (TD, "tab:blue"))):
            vals = [row["models"][name]["tokens_per_s"] for row in res["train"]] + [s[name]["tokens_per_s"]]
            axes[0].bar([x + (i - 0.5) * 0.38 for x in xs], vals, width=0.38, color=color, label=name)
            mfu = [100 * row["models"][name]["mfu"] for row in res["train"]] + [100 * s[name]["mfu"]]
            axes[1].bar([x + (i - 0.5) * 0.38 for x in xs], mfu, width=0.38, color=color, label=name)
        for ax, yl in ((axes[0], "tokens/s (median, round-robin)"), (axes[1], "MFU % (non-embedding FLOPs)")):
            ax.set_xticks(list(xs))
            ax.set_xticklabels(labels)
            ax.set_ylabel(yl)
            ax.grid(alpha=0.3, axis="y")
            ax.legend()
        fig.suptitle(f"{TD} vs {MD}, L=512, {res['precision']}, {res['device']}")
        fig.tight_layout()
        fig.savefig(out_dir / "speed.png", dpi=120)
    except Exception as e:   # plotting is optional
        print(f"plot skipped: {e}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="micro-batch sizes (x 512 tokens)")
    ap.add_argument("--rounds", type=int, default=5, help="round-robin rounds per batch size")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model and batch size")
    ap.add_argument("--sample-num", type=int, default=1, help="sequences per sampling call")
    ap.add_argument("--sample-steps", type=int, default=16, help="denoising steps per sampling call")
    ap.add_argument("--sample-rounds", type=int, default=3)
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--matmul-reps", type=int, default=5)
    ap.add_argument("--models", nargs=2, default=list(MODELS), metavar=("MDLM", "TDLM"),
                    help="the masked and the tree preset (default: mdlm-small tdlm-small; "
                    "tiny-gpt2 tdlm-tiny for a quick check)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite speed.md/png from <out>/speed.json without measuring")
    a = ap.parse_args(argv)
    if a.report_only:
        d = json.loads((Path(a.out) / "speed.json").read_text())
        a = argparse.Namespace(**{**d.pop("settings"), "out": a.out})
        command, mach = d.pop("command"), d.pop("machine")
        write_results(d, mach, command, a, Path(a.out))
        return 0
    command = "python " + " ".join(shlex.quote(x) for x in
                                   ["benchmarks/speed.py"] + (argv if argv is not None else sys.argv[1:]))
    mach = machine(a.threads)
    t0 = time.time()
    res = run(a)
    res["wall_s"] = time.time() - t0
    write_results(res, mach, command, a, Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
