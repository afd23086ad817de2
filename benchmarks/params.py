"""Parameter budget of TDLM vs MDLM presets side by side (issue: efficiency benchmarks, item 1).

    python benchmarks/params.py            # writes benchmarks/results/params.{json,md}

Counts come from the real model classes built on the meta device, with the family's
shape-only resources (``Family.shape_resources``; TDLM: a tree of the preset's K, H,
frequency-sorted, same node count as a k-means tree, which fixes the node-embedding rows); K and
H are reported as the family describes them (``Family.describe``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdlm.config import get_preset
from tdlm.families.base import meta_family
from tdlm.nn.dit import count_parameters

#: (baseline preset, tree preset); their rows in params.json are keyed by ROLES
PAIRS = [("mdlm-small", "tdlm-small"), ("mdlm-base", "tdlm-base"), ("tiny-gpt2", "tdlm-tiny")]
ROLES = ("mdlm", "tdlm")


def model_cfg(cfg) -> dict:
    """The config fields this script reads (backbone sizes, family name)."""
    m = cfg.backbone
    return {"family": cfg.family.name, "d_model": m.d_model, "n_layers": m.n_layers,
            "vocab_size": m.vocab_size}


def counts(name: str) -> dict:
    cfg = get_preset(name)
    family, model = meta_family(cfg)
    d = family.describe()
    tree = {"K": d["tree_K"], "H": d["tree_H"]} if "tree_K" in d else {}
    return {"preset": name, **model_cfg(cfg), **tree, **count_parameters(model)}


def main(out_dir: str = "benchmarks/results") -> None:
    rows = []
    for base, tree in PAIRS:
        b, t = counts(base), counts(tree)
        rows.append({ROLES[0]: b, ROLES[1]: t, "total_ratio": t["total"] / b["total"],
                     "head_ratio": b["head"] / t["head"]})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(rows, indent=2))
    lines = ["# Parameters: TDLM vs MDLM at equal budget", "",
             "Command: `python benchmarks/params.py` (counts from the model classes; machine-independent).", "",
             "| preset | layers | total | embedding | head | blocks | head share | TDLM/MDLM total | head shrink |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in ROLES:
            c = r[key]
            extra = (f"{r['total_ratio']:.4f} | {r['head_ratio']:.0f}x" if key == ROLES[1] else " | ")
            lines.append(f"| {c['preset']} | {c['n_layers']} | {c['total']:,} | {c['embedding']:,} | "
                         f"{c['head']:,} | {c['blocks']:,} | {100 * c['head_share']:.2f}% | {extra} |")
    (out / "params.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?", default="benchmarks/results",
                    help="folder for params.json and params.md")
    main(ap.parse_args().out_dir)
