"""The main job behind ``tdlm run`` (layer 5): train presets side by side on the same tokens
and seed, evaluate them on the same validation batches and noise, sample, and report only
what the budget supports.

For each preset: parameters and the output layer's share, the peak memory of its training
(measured in this run: CUDA ``max_memory_allocated``, or on a CPU the heap bytes in use that
the training added, glibc's ``mallinfo2``, ``tdlm.utils.machine.PeakMemory``; the resident set
would not see the second preset reuse the heap the first one's training kept), training
tokens/s (median of the logged steps), the validation NELBO per token with the standard error
of that estimate across the evaluated batches, its validation curve, and samples.
``summary.json`` and ``curves.png`` are written to the output folder, beside each preset's
run folder.

A few hundred steps cannot say whether TDLM matches MDLM. The closing ``parity`` entry is the
committed verdict of the parity study (``benchmarks/parity.py`` ->
``benchmarks/results/parity.json``) when the source checkout has it, and says so otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .utils.io import atomic_write_json
from .utils.machine import PeakMemory

PARITY = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "parity.json"
#: the same study with this job's own presets (tiny, GPT-2 vocabulary), longer and seeded
PARITY_GPT2 = PARITY.with_name("parity_gpt2.json")


def parity_verdict(path: Path = PARITY) -> str:
    """The committed parity study's verdict, or what is known without it."""
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            s = d["summary"]
            seeds = len(s.get("seeds", []))
            pair = " vs ".join(d.get("presets", {"mdlm": "mdlm-cpu", "tdlm": "tdlm-cpu"}).values())
            return (f"parity study ({pair}, {seeds} seed(s), "
                    f"benchmarks/results/{path.stem}.md): {s['verdict']}")
        except (KeyError, ValueError, TypeError):
            pass
    return ("the parity study (benchmarks/parity.py) has no committed verdict here; this run "
            "is too short to show whether TDLM matches MDLM")


def _curve(run_dir: Path, tokens_per_step: int) -> tuple[list, float | None]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    val = [(r["step"] * tokens_per_step, r["nelbo_per_token"]) for r in recs
           if r.get("split") == "val"]
    tps = sorted(r["tokens_per_s"] for r in recs
                 if r.get("split") == "train" and "tokens_per_s" in r)
    return val, (tps[len(tps) // 2] if tps else None)


def _plot(rows: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows.items():
        if r["curve"]:
            x, y = zip(*r["curve"])
            ax.plot([v / 1e3 for v in x], y, marker="o", label=f"{name} ({r['family']})")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation NELBO / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_job(cfgs: dict, out: Path, steps: int = 128, num_samples: int = 8,
             full_eval: bool = False, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and sample every ``{name: RunConfig}`` into ``out/<name>``; returns
    (and writes to ``out/summary.json``) one row per preset and the parity verdict."""
    from .eval.nelbo import evaluate_to_files
    from .generation import generate_to_files
    from .config import load_config
    from .families.base import meta_family
    from .nn.accounting import count_parameters
    from .train.loop import train
    from .train.parallel import resolve_device
    out = Path(out)
    rows: dict = {}
    for name, cfg in cfgs.items():
        run_dir = out / name
        where = "the bundled corpus" if cfg.data.source == "bundled" else cfg.data.source
        log(f"[tdlm] training {name!r} ({cfg.family.name}, {cfg.backbone.n_layers} blocks, "
            f"d={cfg.backbone.d_model}) on {where} for {cfg.train.max_steps} steps -> {run_dir}")
        with PeakMemory(resolve_device(cfg.train.device)) as mem:
            res = train(cfg, run_dir, progress=progress)
        ck = res.final_checkpoint
        ev, ev_dir = evaluate_to_files(str(ck), 0 if full_eval else 32, 0, 1, None)
        recs, spath, _ = generate_to_files({"model": str(ck)}, num_samples, steps)
        # counted on the meta device from the run's resolved config (no second weight load)
        params = count_parameters(meta_family(load_config(str(run_dir / "config.json")))[1])
        curve, tps = _curve(run_dir, cfg.train.global_batch * cfg.data.seq_len)
        rows[name] = {"family": cfg.family.name, "parameters": params["total"],
                      "head_share": params["head_share"], "peak_train_bytes": mem.peak_bytes,
                      "peak_kind": mem.kind, "tokens_per_s": tps, "curve": curve,
                      "eval": ev, "samples": [r["text"] for r in recs],
                      "outputs": {"run folder": str(run_dir), "checkpoint": str(ck),
                                  "eval metrics": str(ev_dir / "metrics.json"),
                                  "samples": str(spath),
                                  "loss curve": str(run_dir / "loss_curve.png")}}
    _plot(rows, out / "curves.png")
    summary = {"presets": rows, "parity": parity_verdict(),
               "parity_same_presets": (parity_verdict(PARITY_GPT2) if PARITY_GPT2.is_file()
                                       else None),
               "curves": str(out / "curves.png"),
               "note": ("NELBOs are compared on the same validation batches and noise seed; "
                        "their difference is within noise when it is not larger than a few "
                        "standard errors, and a short run says nothing about the converged "
                        "ranking")}
    atomic_write_json(out / "summary.json", summary)
    return summary
