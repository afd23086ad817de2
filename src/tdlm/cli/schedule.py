"""``tdlm schedule analyze`` / ``search`` / ``rescore``: model-scheduling studies of two models (the
library's ``tdlm.scheduling.runs`` computes and writes everything; this module parses)."""
from __future__ import annotations

from ..errors import ConfigError
from .sample import parse_model_args


def _pipes(args):
    from ..scheduling.sampler import load_scheduled
    paths = parse_model_args(args.model)
    sampler = load_scheduled(paths, device=args.device)
    light = args.light or ("L" if "L" in paths else None)
    heavy = args.heavy or ("H" if "H" in paths else None)
    if len(paths) != 2:
        raise ConfigError(f"give exactly two models (--model H=... --model L=...), got {len(paths)}")
    if light is None or heavy is None:
        cost = sampler.block_cost()
        a, b = list(paths)
        if cost[a] == cost[b]:
            raise ConfigError("cannot tell the light from the heavy model; name them L and H "
                              "or pass --light/--heavy")
        light, heavy = (a, b) if cost[a] < cost[b] else (b, a)
    for role, n in (("light", light), ("heavy", heavy)):
        if n not in paths:
            raise ConfigError(f"--{role} {n!r} is not one of the models ({', '.join(paths)})")
    if light == heavy:
        raise ConfigError("the light and the heavy model must differ")
    return sampler, light, heavy


def cmd_analyze(args) -> int:
    from ..scheduling.runs import analyze_to_files
    sampler, light, heavy = _pipes(args)
    res = analyze_to_files(sampler, light, heavy, args.out, args.grid, args.batches,
                           args.batch_size, args.seed, args.trajectory_samples,
                           args.trajectory_steps)
    ok = [r for r in res["rows"] if r.get("noised")]
    if ok:
        worst = max(ok, key=lambda r: r["kl_heavy_light"])
        print(f"largest KL(heavy||light) {worst['kl_heavy_light']:.3f} at t={worst['t']:.3f} "
              f"(progress {worst['step_fraction']:.2f}); loss gap there {worst['gap']:.3f} nats")
    for f in res["files"]:
        print(f"  {f}")
    return 0


def cmd_search(args) -> int:
    from ..scheduling.runs import search_to_files
    sampler, light, heavy = _pipes(args)
    if args.steps < args.segments:
        raise ConfigError(f"--steps {args.steps} is fewer than --segments {args.segments}")
    if args.light_segments is not None and args.light_segments < -1:
        raise ConfigError(f"--light-segments must be >= -1, got {args.light_segments}")
    if args.segments > 12 and args.light_segments is None:
        raise ConfigError("all 2^S schedules for S > 12 is too many; give --light-segments")
    if args.num < 1:
        raise ConfigError(f"--num must be >= 1, got {args.num}")
    seeds = [args.seed + i for i in range(args.seeds)]
    masks = [m.strip() for m in (args.masks or "").split(",") if m.strip()]
    if not seeds:
        raise ConfigError("--seeds must be >= 1")
    prefix = None
    if args.prefix_from_val is not None:
        from ..scheduling.sampler import prefixes_from_validation
        prefix, _ = prefixes_from_validation(sampler.pipes[heavy], args.num, args.prefix_from_val)
    if (args.judge is None) == (not args.score_later):
        raise ConfigError("give exactly one of --judge (score as the search goes) and "
                          "--score-later (keep the samples, score them with `tdlm schedule "
                          "rescore --judge`)")
    judge = None
    if args.judge is not None:
        from ..eval.genppl import load_judge
        judge = load_judge(args.judge, args.device)

    res = search_to_files(sampler, light, heavy, judge, args.out, args.steps, args.segments,
                          args.light_segments, args.num, seeds, args.batch, args.temperature,
                          args.top_p, masks, prefix, args.prefix_from_val, _progress)
    print(f"frontier: {', '.join(r['mask'] for r in res['frontier'])}" if judge is not None
          else f"sampled, not scored: tdlm schedule rescore --out {args.out} --judge JUDGE")
    for f in res["files"]:
        print(f"  {f}")
    return 0


def _progress(i, n, r):
    judged = (f"gen PPL {r['gen_ppl']:8.2f}  entropy {r['entropy']:.3f}" if "gen_ppl" in r
              else f"not scored (--score-later)  entropy {r.get('entropy', float('nan')):.3f}")
    print(f"[{i}/{n}] {r['mask']:<12} saved {100 * r['saved_blocks']:5.1f}%  {judged}  "
          f"({r['seconds']:.0f} s)", flush=True)


def cmd_rescore(args) -> int:
    from ..eval.genppl import load_judge
    from ..scheduling.runs import rescore_to_files
    res = rescore_to_files(args.out, load_judge(args.judge, args.device), _progress)
    print(f"frontier: {', '.join(r['mask'] for r in res['frontier'])}")
    for f in res["files"]:
        print(f"  {f}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("schedule", help="model scheduling: step-importance analysis, segment "
                       "search, re-scoring a search under another judge")
    ss = p.add_subparsers(dest="schedule_cmd", required=True)

    def common(q):
        q.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                       help="the two models, e.g. --model H=runs/heavy --model L=runs/light")
        q.add_argument("--light")
        q.add_argument("--heavy")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cpu")
        q.add_argument("--out", required=True, help="output folder")

    a = ss.add_parser("analyze", help="per-t masked-token loss of both models, gap, KL both "
                      "ways on the same noised validation input (+ on heavy trajectories)")
    common(a)
    a.add_argument("--grid", type=int, default=20, help="number of t values")
    a.add_argument("--batches", type=int, default=4)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--trajectory-samples", type=int, default=8,
                   help="heavy-model samples for the trajectory variant (0: skip)")
    a.add_argument("--trajectory-steps", type=int, default=64)
    a.set_defaults(fn=cmd_analyze)

    s = ss.add_parser("search", help="sample + judge every light/heavy assignment of S "
                      "segments; saved-FLOPs vs gen PPL frontier")
    common(s)
    s.add_argument("--judge", help="AR judge: tdlm ar run or HF folder")
    s.add_argument("--score-later", action="store_true",
                   help="no judge: sample and keep the samples (samples/<mask>.jsonl.gz), "
                        "saved FLOPs and seconds; `tdlm schedule rescore --judge` scores them")
    s.add_argument("--steps", type=int, default=128)
    s.add_argument("--segments", type=int, default=8)
    s.add_argument("--light-segments", type=int,
                   help="number of light segments (default: all 2^S assignments; -1: only "
                        "--masks)")
    s.add_argument("--masks", help="more assignments to evaluate, e.g. LLHHHHHL,HHLLLHHH")
    s.add_argument("--prefix-from-val", type=int, metavar="K",
                   help="prefix-conditional: clamp the first K tokens of held-out documents "
                        "(the same prefixes for every schedule and seed)")
    s.add_argument("--num", type=int, default=16, help="samples per seed")
    s.add_argument("--seeds", type=int, default=2, help="number of sampling seeds (--seed, "
                   "--seed + 1, ...; the same for every schedule)")
    s.add_argument("--batch", type=int, default=0, help="samples per sampler call (0: all)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.set_defaults(fn=cmd_search)

    r = ss.add_parser("rescore", help="score a finished search again under another judge from "
                      "its stored samples (no models, no sampling)")
    r.add_argument("--out", required=True, help="the search's output folder")
    r.add_argument("--judge", required=True, help="AR judge: tdlm ar run or HF folder")
    r.add_argument("--device", default="cpu")
    r.set_defaults(fn=cmd_rescore)
