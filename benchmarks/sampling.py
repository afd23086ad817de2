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

Every (family, steps, cache) configuration is called once untimed (warm-up), then timed
``--rounds`` times round-robin (the raw times are kept, ``--render`` rewrites the markdown); the
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


def summarize(raw: dict, built_info: dict) -> list[dict]:
    """Rows from the raw round-robin timings ``raw[key] = [measurement per round]``
    (``key = row|steps|cache``): ``wall_s`` is the mean over rounds and ``tokens_per_s`` the
    tokens over the wall time of all rounds (so tokens/s = tokens / s in the table);
    ``outside_backbone``: the share of all rounds' wall time not inside the DiT. ``built_info``:
    row -> (causal, weights)."""
    rows = []
    for key, ms in raw.items():
        f, steps, cache = key.split("|")
        wall = sum(m["wall_s"] for m in ms)
        rows.append({"row": f, "causal": built_info[f][0], "steps": int(steps),
                     "cache": None if cache == "None" else cache == "True",
                     "weights": built_info[f][1], "wall_s": wall / len(ms),
                     "tokens": statistics.mean(m["tokens"] for m in ms),
                     "tokens_per_s": sum(m["tokens"] for m in ms) / wall,
                     "forwards": statistics.mean(m["forwards"] for m in ms),
                     "outside_backbone": 1 - sum(m["forward_s"] for m in ms) / wall,
                     "rounds": len(ms)})
    return rows


def ratios(raw: dict, reference: str) -> list[dict]:
    """Each row's time per sample against ``reference``'s at the same steps and cache, from
    the same rounds: the ratio of the summed wall times (the headline: what both take for the
    same work over the run) and the median and range of the per-round ratios (the spread the
    machine's load leaves; round-robin, so both sides of a round share it)."""
    out = []
    for key, ms in raw.items():
        f, steps, cache = key.split("|")
        ref = raw.get(f"{reference}|{steps}|{cache}")
        if f == reference or ref is None:
            continue
        n = min(len(ms), len(ref))
        per = sorted(a["wall_s"] / b["wall_s"] for a, b in zip(ms[:n], ref[:n]))
        out.append({"row": f, "reference": reference, "steps": int(steps), "cache": cache,
                    "ratio": sum(m["wall_s"] for m in ms[:n]) / sum(m["wall_s"] for m in ref[:n]),
                    "per_round_median": statistics.median(per),
                    "per_round_range": [per[0], per[-1]], "rounds": n})
    return out


def render(res: dict) -> str:
    """sampling.md from a result: the table of :func:`summarize` rows and, when the raw
    timings are kept, the ratios against the reference row."""
    a = res.get("args", {})
    rounds = a.get("rounds", max((r["rounds"] for r in res["rows"]), default=0))
    summary = ("means over the rounds" if "raw" in res else
               "medians over the rounds; tokens/s here is tokens / s (a re-render of a result "
               "kept without its raw timings)")
    lines = ["# Sampling throughput per family (CPU presets' backbone: d=112, 8k BPE, L=256)", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine'].get('cpu')}, torch {res['machine'].get('torch')}, "
             f"{res['machine'].get('threads')} threads; {res['num']} samples per call, {rounds} "
             f"rounds round-robin (every other round in reverse order)"
             + (" after one untimed warm-up call per configuration" if "raw" in res else
                ", no warm-up call") + f", {summary}. *outside backbone*: share of the wall "
             "time not inside the forward calls of the model's DiT (the output layer, on the "
             "rows the sampler reads, and the sampler's own work); *forwards*: DiT forward "
             "calls.", "",
             "| row | weights | steps | cache | forwards | tokens | s | tokens/s | outside backbone |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        tps = r["tokens_per_s"] if "raw" in res else r["tokens"] / r["wall_s"]
        lines.append(f"| {r['row']} | {r['weights']} | {'L (causal)' if r['causal'] else r['steps']} | "
                     f"{'-' if r['cache'] is None else ('on' if r['cache'] else 'off')} | "
                     f"{r['forwards']:.0f} | {r['tokens']:.0f} | {r['wall_s']:.2f} | "
                     f"{tps:.0f} | {100 * r['outside_backbone']:.0f}% |")
    if res.get("ratios"):
        ref = res["ratios"][0]["reference"]
        lines += ["", f"Time per sample against {ref} at the same steps and cache, the same "
                  "rounds (ratio of summed wall times; per-round ratios: median and range):", "",
                  f"| row | steps | cache | time / {ref}'s | per-round median | per-round range |",
                  "|---|---|---|---|---|---|"]
        for q in res["ratios"]:
            c = {"True": "on", "False": "off"}.get(q["cache"], "-")
            lines.append(f"| {q['row']} | {q['steps']} | {c} | {q['ratio']:.3f} | "
                         f"{q['per_round_median']:.3f} | {q['per_round_range'][0]:.3f}-"
                         f"{q['per_round_range'][1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[128, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", action="append", default=[], metavar="ROW=PATH")
    ap.add_argument("--reference", default="mdlm-cpu",
                    help="the row every other row's time per sample is divided by")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="rewrite the sampling.md beside a result JSON from it (no timing; "
                         "its sections from the first '## ' heading are kept)")
    a = ap.parse_args(argv)
    if a.render:                  # keeps the markdown's own sections (from "## ") below
        res = json.loads(a.render.read_text())
        md = a.render.parent / "sampling.md"
        old = md.read_text() if md.exists() else ""
        kept = old[old.index("\n## ") + 1:] if "\n## " in old else ""
        md.write_text(render(res) + ("\n" + kept if kept else ""))
        return 0
    import torch
    torch.set_num_threads(a.threads)
    machine_info = machine(a.threads)            # the load before this run adds its own
    ck = dict(x.split("=", 1) for x in a.checkpoint)
    t_start = time.perf_counter()
    built = {}
    for f in a.rows:
        fam, model, cfg, src = build(f, ck.get(f))
        built[f] = (fam, model, cfg, src, ForwardTimer(model))
    todo = [(f, c) for f in a.rows for c in configs(built[f][0], a.steps)]
    for f, c in todo:                            # warm-up: first calls (allocations, caches)
        fam, model, cfg, src, timer = built[f]
        time_one(fam, model, cfg, timer, 1, dict(c, steps=min(c["steps"], 4)), seed=12345)
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
    info = {f: (b[0].causal, b[3]) for f, b in built.items()}
    cmd = "python benchmarks/sampling.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    res = {"command": cmd, "machine": machine_info, "num": a.num,
           "args": {"rounds": a.rounds, "steps": a.steps, "rows": a.rows},
           "rows": summarize(raw, info), "ratios": ratios(raw, a.reference), "raw": raw,
           "wall_s": time.perf_counter() - t_start}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "sampling.json").write_text(json.dumps(res, indent=2) + "\n")
    md = render(res)
    (a.out / "sampling.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
