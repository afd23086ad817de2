"""``tdlm info``: parameter counts (and family facts) of presets."""
from __future__ import annotations

import json


def cmd_info(args) -> int:
    from ..config import get_preset, preset_names
    from ..families.base import meta_family
    from ..nn.dit import count_parameters
    if args.list:
        print("\n".join(preset_names()))
        return 0
    if args.fields:
        return _print_fields(args.family)
    rows, cfgs = {}, {}
    for name in args.preset or ["tiny"]:
        cfg = cfgs[name] = get_preset(name)
        fam, model = meta_family(cfg)
        c = count_parameters(model)
        m = cfg.backbone
        rows[name] = {"family": cfg.family.name, "d_model": m.d_model, "n_layers": m.n_layers,
                      "n_heads": m.n_heads, "vocab_size": m.vocab_size, "seq_len": cfg.data.seq_len,
                      "parameters": c, "max_steps": cfg.train.max_steps,
                      "global_batch": cfg.train.global_batch,
                      "run_tokens": cfg.train.max_steps * cfg.train.global_batch * cfg.data.seq_len}
        rows[name].update(fam.describe())
    if args.measure:        # round-robin: one step of each preset in turn
        from ..train.throughput import compare_throughput
        for name, t in compare_throughput(cfgs, steps=args.measure).items():
            rows[name]["throughput"] = t
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else next(iter(rows.values())), indent=2))
    else:
        tp = (f"{'train tok/s':>13}{'run h':>7}{'s/step':>9}{'step x':>8}{'tok x':>7}"
              f"{'FLOPs x':>9}" if args.measure else "")
        hdr = (f"{'preset':<14}{'family':<7}{'d':>6}{'layers':>8}{'total':>14}{'embedding':>13}"
               f"{'head':>13}{'blocks':>14}{'head %':>8}{'run tokens':>13}")
        print(hdr + tp)
        for n, r in rows.items():
            c = r["parameters"]
            m = ""
            if args.measure:
                tps = r["throughput"]["tokens_per_s"]
                t = r["throughput"]
                x = [t["step_ratio"], t["tokens_ratio"], t["flops_ratio"]]
                x = ["-" if v is None or len(rows) == 1 else f"{v:.3f}" for v in x]
                m = (f"{tps:>13.0f}{r['run_tokens'] / tps / 3600:>7.2f}"
                     f"{t['seconds_per_step']:>9.3f}{x[0]:>8}{x[1]:>7}{x[2]:>9}")
            print(f"{n:<14}{r['family']:<7}{r['d_model']:>6}{r['n_layers']:>8}{c['total']:>14,}"
                  f"{c['embedding']:>13,}{c['head']:>13,}{c['blocks']:>14,}"
                  f"{100 * c['head_share']:>7.2f}%{r['run_tokens']:>13,}" + m)
        print("run tokens: the preset's training budget, max_steps x global_batch x seq_len"
              + ("; run h: those tokens at the measured rate" if args.measure else ""))
        if args.measure:
            t = next(iter(rows.values()))["throughput"]
            print(f"train tok/s: data tokens per second of {t['steps']} optimizer steps of the "
                  f"preset's batch after {t['warmup']} untimed ones, {t['threads']} thread(s), "
                  f"{t['device']}, measured now, the presets round-robin (one step of each in "
                  "turn); step x: mean step time / the first preset's over the same rounds; "
                  "tok x, FLOPs x: tokens the backbone forwarded and training FLOPs per step "
                  "/ the first preset's -- per step, so presets with different batches read "
                  "different data tokens (the parity study's figures: "
                  "benchmarks/results/parity.md)")
    return 0


def _print_fields(family) -> int:
    """Every config field: ``section.field  type  default  meaning``; the family section of
    ``family`` (default: every family's)."""
    from ..config import (BackboneConfig, DataConfig, TrainConfig, family_section, field_docs,
                          section_names)
    sections = [("backbone", BackboneConfig), ("data", DataConfig), ("train", TrainConfig)]
    for name in ([family] if family else section_names()):
        sections.append((f"family (name={name})", family_section(name)))
    for title, cls in sections:
        prefix = title.split(" ")[0]
        print(f"[{title}]")
        for r in field_docs(cls):
            print(f"  {prefix + '.' + r['name']:<32}{r['type']:<8}{r['default']!r:<16} {r['doc']}")
        print()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameter counts of presets")
    p.add_argument("--preset", action="append")
    p.add_argument("--json", action="store_true")
    p.add_argument("--list", action="store_true", help="list the preset names")
    p.add_argument("--fields", action="store_true",
                   help="list every config field with its type, default and meaning")
    p.add_argument("--family", help="with --fields: only this family's section")
    p.add_argument("--measure", type=int, metavar="STEPS", default=0,
                   help="also time STEPS training steps of each preset on the bundled data, "
                        "the presets round-robin (tokens/s, s/step and step time and FLOPs "
                        "relative to the first preset, on this machine, current thread count)")
    p.set_defaults(fn=cmd_info)
