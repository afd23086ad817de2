"""Sampling throughput per family: tokens/s at 128 and 1000 steps, with and without the cache,
and the share of the time spent outside the backbone (the DiT).

    python benchmarks/sampling.py [--num 4] [--steps 128 1000] [--rounds 2] [--threads 2]
        [--checkpoint mdlm-cpu=runs/parity/mdlm-s0 ...]

Models: the paper-shaped CPU presets (``mdlm-cpu``, ``tdlm-cpu``, ``ar-cpu``: d=112, 8k BPE,
L=256) and DID at the same backbone, fixed and variable length. A row without
``--checkpoint`` gets random weights (the zero-initialised output layers drawn N(0, 0.02) so
predictions are not uniform): the network's cost does not depend on the weights, but what the
sampler does around it can (MDLM/TDLM's cache hits depend on whether anything moved; DID's
lengths on its rates), so a trained checkpoint gives the representative figures and the
results say which was used.

Every (family, steps, cache) configuration is timed ``--rounds`` times round-robin; the
backbone's share is the wall time inside the forward calls of the model's DiT (hooks), the
rest being the output layer (run by the samplers on the rows they read only), the sampler's
own work (noise, Gumbel draws, bookkeeping, Python). AR draws one
token per forward whatever ``steps`` is (timed once per round).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speed import machine  # noqa: E402

CPU_BACKBONE = "mdlm-cpu"      # the backbone and data every row is given
ROWS = {   # row -> (preset, overrides)
    "mdlm-cpu": ("mdlm-cpu", []),
    "tdlm-cpu": ("tdlm-cpu", []),
    "ar-cpu": ("ar-cpu", []),
    "did-cpu-fixed": ("did-tiny", ["data.layout=packed_bos"]),
    "did-cpu-var": ("did-tiny-var", []),
}


def build(name: str, checkpoint: str | None):
    import torch

    from tdlm.config import get_preset
    from tdlm.train.step import family_for
    if checkpoint:
        from tdlm.pipeline import load
        pipe = load(checkpoint)
        return pipe.family, pipe.model.eval(), pipe.cfg, "checkpoint " + checkpoint
    preset, sets = ROWS[name]
    cfg = get_preset(preset)
    base = get_preset(CPU_BACKBONE)       # every row at the CPU presets' backbone and data
    if cfg.backbone.d_model != base.backbone.d_model:
        d = cfg.to_dict()
        d["backbone"].update({k: v for k, v in base.to_dict()["backbone"].items()
                              if k != "time_conditioning"})
        d["data"].update(seq_len=base.data.seq_len, tokenizer=base.data.tokenizer)
        cfg = type(cfg).from_dict(d)
    cfg = cfg.override(sets) if sets else cfg
    fam = family_for(cfg)
    torch.manual_seed(0)
    model = fam.build_model()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if torch.count_nonzero(p) == 0 and p.dim() > 1:
                p.normal_(0, 0.02)
    return fam, model.eval(), cfg, "random weights"


class ForwardTimer:
    """Wall time inside the model's backbone: the forward calls of its DiT (every family runs
    it once per network forward; the samplers call the model's ``features`` and output layer
    apart, not its ``forward``), or of the model itself when it has no DiT."""

    def __init__(self, model):
        from tdlm.nn.dit import backbone_of
        self.total, self.calls, self._t = 0.0, 0, None
        net = backbone_of(model) or model
        net.register_forward_pre_hook(self._pre)
        net.register_forward_hook(self._post)

    def _pre(self, *a):
        self._t = time.perf_counter()

    def _post(self, *a):
        self.total += time.perf_counter() - self._t
        self.calls += 1


def configs(fam, steps_list) -> list[dict]:
    has_cache = "cache" in fam.sample_options
    if fam.causal:                        # left to right: one token per forward, no steps
        return [{"steps": 1, "cache": None}]
    return [{"steps": s, "cache": c} for s in steps_list
            for c in ([True, False] if has_cache else [None])]


def time_one(fam, model, cfg, timer, num: int, conf: dict, seed: int) -> dict:
    import torch

    from tdlm.sampling.result import build_options
    kw = {} if conf["cache"] is None else {"cache": conf["cache"]}
    if "bos_id" in fam.sample_options:
        kw["bos_id"] = 0
    opts = build_options(fam.SampleOptions, cfg.family.name, steps=conf["steps"], **kw)
    L = cfg.data.seq_len
    g = torch.Generator().manual_seed(seed)
    timer.total, timer.calls = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        res = fam.sample(model, num, L, opts, g)
    wall = time.perf_counter() - t0
    toks = int(sum(len(s) for s in res.sequences()))
    return {"wall_s": wall, "forward_s": timer.total, "forwards": timer.calls, "tokens": toks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[128, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="ROW=PATH")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    ck = dict(x.split("=", 1) for x in a.checkpoint)
    t_start = time.perf_counter()
    built = {}
    for f in a.rows:
        fam, model, cfg, src = build(f, ck.get(f))
        built[f] = (fam, model, cfg, src, ForwardTimer(model))
    todo = [(f, c) for f in a.rows for c in configs(built[f][0], a.steps)]
    raw: dict = {}
    for r in range(a.rounds):
        for f, c in (todo if r % 2 == 0 else todo[::-1]):
            fam, model, cfg, src, timer = built[f]
            m = time_one(fam, model, cfg, timer, a.num, c, seed=r)
            key = f"{f}|{c['steps']}|{c['cache']}"
            raw.setdefault(key, []).append(m)
            print(f"[sampling] round {r + 1} {f} steps={c['steps']} cache={c['cache']}: "
                  f"{m['wall_s']:.2f} s, {m['tokens'] / m['wall_s']:.0f} tok/s, backbone "
                  f"{100 * m['forward_s'] / m['wall_s']:.0f}%", flush=True)
    rows = []
    for key, ms in raw.items():
        f, steps, cache = key.split("|")
        wall = statistics.median(m["wall_s"] for m in ms)
        rows.append({"row": f, "causal": built[f][0].causal, "steps": int(steps), "cache": None if cache == "None" else cache == "True",
                     "weights": built[f][3], "wall_s": wall,
                     "tokens": statistics.median(m["tokens"] for m in ms),
                     "tokens_per_s": statistics.median(m["tokens"] / m["wall_s"] for m in ms),
                     "forwards": statistics.median(m["forwards"] for m in ms),
                     "outside_backbone": statistics.median(1 - m["forward_s"] / m["wall_s"] for m in ms),
                     "rounds": len(ms)})
    cmd = "python benchmarks/sampling.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    res = {"command": cmd, "machine": machine(a.threads), "num": a.num, "rows": rows,
           "wall_s": time.perf_counter() - t_start}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sampling.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Sampling throughput per family (CPU presets' backbone: d=112, 8k BPE, L=256)", "",
             f"Command: `{cmd}`", "",
             f"Machine: {res['machine'].get('cpu')}, torch {res['machine'].get('torch')}, "
             f"{a.threads} threads; {a.num} samples per call, {a.rounds} rounds round-robin, "
             "medians. *outside backbone*: share of the wall time not inside the forward calls "
             "of the model's DiT (the output layer, on the rows the sampler reads, and the "
             "sampler's own work); *forwards*: DiT forward calls.", "",
             "| row | weights | steps | cache | forwards | tokens | s | tokens/s | outside backbone |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['weights']} | {'L (causal)' if r['causal'] else r['steps']} | "
                     f"{'-' if r['cache'] is None else ('on' if r['cache'] else 'off')} | "
                     f"{r['forwards']:.0f} | {r['tokens']:.0f} | {r['wall_s']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {100 * r['outside_backbone']:.0f}% |")
    (a.out / "sampling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
