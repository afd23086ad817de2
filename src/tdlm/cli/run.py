"""``tdlm run``: the main job (train, evaluate and sample presets side by side)."""
from __future__ import annotations

import time
from pathlib import Path


def cmd_run(args) -> int:
    """Main job: train each preset on the bundled corpus on the same tokens and seed,
    evaluate all on the same validation batches, print NELBOs side by side and samples."""
    from ..config import get_preset
    from ..mainjob import main_job
    presets = args.preset or ["tdlm-tiny", "tiny-gpt2"]
    out = Path(args.out or f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}")
    cfgs = {}
    for name in presets:       # validate everything before any work
        cfg = get_preset(name)
        if args.set:
            cfg = cfg.override(args.set)
            cfg.preset = name
        cfgs[name] = cfg
    res = main_job(cfgs, out, args.steps, args.num_samples, args.full_eval,
                   progress=not args.no_progress)
    rows = res["presets"]
    print("\n[tdlm] side by side (same tokens and seed; validation on the same batches and noise):")
    print(f"  {'preset':<12}{'family':<7}{'params':>12}{'head %':>8}{'peak train MB':>15}"
          f"{'tokens/s':>10}{'NELBO/token':>13}{'± SE':>8}{'ppl <=':>9}")
    for name, r in rows.items():
        ev, se = r["eval"], r["eval"].get("stderr_per_token")
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        print(f"  {name:<12}{r['family']:<7}{r['parameters']:>12,}{100 * r['head_share']:>7.1f}%"
              f"{r['peak_train_bytes'] / 2**20:>15.0f}{tps:>10}{ev['nelbo_per_token']:>13.4f}"
              f"{se if se is None else round(se, 4):>8}{ev['ppl_bound']:>9.1f}")
        if "parts_per_token" in ev:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(ev["parts_per_token"].items()))
            print(f"  {'':<19}per level: {parts}")
    kind = next(iter(rows.values()))["peak_kind"] if rows else ""
    print(f"  (peak train memory: {kind}; validation curves: {res['curves']})")
    for name, r in rows.items():
        for i, text in enumerate(r["samples"][:2]):
            print(f"--- {name} sample {i} ({args.steps} steps) ---\n{text[:300]}")
    print("[tdlm] outputs:")
    for name, r in rows.items():
        for label, p in r["outputs"].items():
            print(f"  {name + ' ' + label:<26} {p}")
    print(f"  {'summary':<26} {out / 'summary.json'}")
    print(f"[tdlm] {res['note']}.")
    print(f"[tdlm] parity: {res['parity']}")
    if res.get("parity_same_presets"):
        print(f"[tdlm] parity at this job's presets: {res['parity_same_presets']}")
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
