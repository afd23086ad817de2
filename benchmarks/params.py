"""Parameter budget of TDLM vs MDLM presets side by side (issue: efficiency benchmarks, item 1).

    python benchmarks/params.py            # writes benchmarks/results/params.{json,md}

Counts come from the real model classes built on the meta device; a TDLM tree of the preset's
K, H (frequency-sorted, same node count as a k-means tree) fixes the node-embedding rows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdlm.config import get_preset
from tdlm.families import meta_model
from tdlm.nn.dit import count_parameters

PAIRS = [("mdlm-small", "tdlm-small"), ("mdlm-base", "tdlm-base"), ("tiny-gpt2", "tdlm-tiny")]


def counts(name: str) -> dict:
    cfg = get_preset(name)
    c = count_parameters(meta_model(cfg))
    m = cfg.model
    return {"preset": name, "family": m.family, "d_model": m.d_model, "n_layers": m.n_layers,
            "vocab_size": m.vocab_size, **({"K": m.tree_K, "H": m.tree_H} if m.family == "tdlm" else {}),
            **c}


def main(out_dir: str = "benchmarks/results") -> None:
    rows = []
    for base, tree in PAIRS:
        b, t = counts(base), counts(tree)
        rows.append({"mdlm": b, "tdlm": t, "total_ratio": t["total"] / b["total"],
                     "head_ratio": b["head"] / t["head"]})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(rows, indent=2))
    lines = ["# Parameters: TDLM vs MDLM at equal budget", "",
             "Command: `python benchmarks/params.py` (counts from the model classes; machine-independent).", "",
             "| preset | layers | total | embedding | head | blocks | head share | TDLM/MDLM total | head shrink |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for key in ("mdlm", "tdlm"):
            c = r[key]
            extra = (f"{r['total_ratio']:.4f} | {r['head_ratio']:.0f}x" if key == "tdlm" else " | ")
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
