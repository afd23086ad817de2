"""``tdlm run``: the main job (train, evaluate and sample presets side by side)."""
from __future__ import annotations

import time
from pathlib import Path

from ..utils.io import atomic_write_json


def cmd_run(args) -> int:
    """Main job: train each preset on the bundled corpus on the same tokens and seed,
    evaluate all on the same validation batches, print NELBOs side by side and samples."""
    from ..config import get_preset
    from ..eval.nelbo import evaluate_to_files
    from ..generation import generate_to_files
    from ..train.loop import train
    presets = args.preset or ["tdlm-tiny", "tiny-gpt2"]
    out = Path(args.out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    cfgs = {}
    for name in presets:       # validate everything before any work
        cfg = get_preset(name)
        if args.set:
            cfg = cfg.override(args.set)
            cfg.preset = name
        cfgs[name] = cfg
    rows, outputs = {}, []
    for name, cfg in cfgs.items():
        run_dir = out / name
        where = "the bundled corpus" if cfg.data.source == "bundled" else cfg.data.source
        print(f"[tdlm] training {name!r} ({cfg.family.name}, {cfg.backbone.n_layers} blocks, "
              f"d={cfg.backbone.d_model}) on {where} for {cfg.train.max_steps} steps -> {run_dir}")
        res = train(cfg, run_dir, progress=not args.no_progress)
        ck = res.final_checkpoint
        ev, ev_dir = evaluate_to_files(str(ck), 0 if args.full_eval else 32, 0, 1, None)
        recs, spath, _ = generate_to_files({"model": str(ck)}, args.num_samples, args.steps)
        rows[name] = (cfg, ev, recs)
        outputs += [(f"{name} run folder", run_dir), (f"{name} checkpoint", ck),
                    (f"{name} eval metrics", ev_dir / "metrics.json"), (f"{name} samples", spath),
                    (f"{name} loss curve", run_dir / "loss_curve.png")]
    print("\n[tdlm] validation (same batches, same noise seed):")
    print(f"  {'preset':<12}{'family':<7}{'params':>12}{'NELBO/token':>13}{'ppl <=':>11}{'bits/token':>12}")
    from ..nn.dit import count_parameters
    from ..pipeline import load
    summary = {}
    for name, (cfg, ev, recs) in rows.items():
        n_params = count_parameters(load(ev["checkpoint"]).model)["total"]
        summary[name] = {"family": cfg.family.name, "parameters": n_params, **ev}
        print(f"  {name:<12}{cfg.family.name:<7}{n_params:>12,}{ev['nelbo_per_token']:>13.4f}"
              f"{ev['ppl_bound']:>11.1f}{ev['bits_per_token']:>12.3f}")
        if "parts_per_token" in ev:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ev["parts_per_token"].items()))
            print(f"  {'':<19}per level: {parts}")
    atomic_write_json(out / "summary.json", summary)
    for name, (cfg, ev, recs) in rows.items():
        for r in recs[:2]:
            print(f"--- {name} sample {r['id']} ({args.steps} steps) ---\n{r['text'][:300]}")
    print("[tdlm] outputs:")
    for label, p in outputs + [("summary", out / "summary.json")]:
        print(f"  {label:<26} {p}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="main job: train + evaluate + sample tiny TDLM and MDLM side by side")
    p.add_argument("--preset", action="append",
                   help="preset(s) to train side by side (default: tdlm-tiny and tiny-gpt2)")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=128, help="sampling steps")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--full-eval", action="store_true", help="evaluate the whole validation split")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_run)
