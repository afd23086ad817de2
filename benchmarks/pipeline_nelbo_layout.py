"""Pipeline.nelbo before and after session 23's layout change, on one trained model.

    python benchmarks/pipeline_nelbo_layout.py RUN [--texts 48] [--seeds 12]

Until session 23 ``Pipeline.nelbo`` padded every text to L on its own (``padded_nelbo`` here,
that method transcribed), so models trained without padding (packed, packed_bos, varlen) were
shown pad tokens; it now lays the texts out as training does (``Pipeline.nelbo_rows``). Both
score the first ``--texts`` validation documents of the run's data once per seed (one noise
draw each); the report gives each method's mean and standard error over seeds and the mean
difference (not paired: the two draw their noise over different batches). Writes
benchmarks/results/pipeline_nelbo_layout.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))


@torch.no_grad()
def padded_nelbo(pipe, texts, seed: int, repeats: int = 1) -> dict:
    """The pre-session-23 method (as tdlm had it since v1; tests/config checks the v1
    fixtures' bounds with it): each text cut into rows of at most L (BOS-led windows on
    packed_bos / varlen; text + EOS, BOS in front on crop_pad), padded to L, one batch,
    ``repeats`` draws from one generator seeded with ``seed``. {nelbo_per_token, tokens}."""
    L, tok, layout = pipe.cfg.data.seq_len, pipe.tokenizer, pipe.cfg.data.layout
    rows = []
    for t in texts:
        toks = tok.encode(t)
        if layout in ("packed_bos", "varlen"):
            toks = toks + ([tok.eos_id] if layout == "packed_bos" else [])
            rows += [[tok.bos_id] + toks[i:i + L - 1] for i in range(0, max(len(toks), 1), L - 1)]
        else:
            toks = ([tok.bos_id] if layout == "crop_pad" else []) + toks + [tok.eos_id]
            rows += [toks[i:i + L] for i in range(0, len(toks), L)]
    x = torch.full((len(rows), L), tok.pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, r in enumerate(rows):
        x[i, :len(r)], valid[i, :len(r)] = torch.tensor(r), True
    pipe.model.eval()
    gen = torch.Generator().manual_seed(seed)
    tot = n = 0.0
    for _ in range(repeats):
        t = pipe.family.nelbo(pipe.model, {"input_ids": x, "valid": valid}, gen)
        tot, n = tot + t.nll.sum().item(), n + t.n_tokens.sum().item()
    return {"nelbo_per_token": tot / n, "tokens": int(n / repeats)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "results" / "pipeline_nelbo_layout.json"))
    a = ap.parse_args(argv)
    import tdlm
    from tdlm.data.sources import load_documents, split_documents
    torch.set_num_threads(1)
    pipe = tdlm.load(a.run)
    d = pipe.cfg.data
    docs, _ = load_documents(d.source, d.text_field)
    texts = split_documents(docs, d.val_fraction, d.split_seed)[1][:a.texts]
    t0 = time.time()
    per = {"layout": [], "padded": []}
    for s in range(a.seeds):
        per["layout"].append(pipe.nelbo(texts, seed=s, repeats=1)["nelbo_per_token"])
        per["padded"].append(padded_nelbo(pipe, texts, s)["nelbo_per_token"])
        print(f"seed {s}: layout {per['layout'][-1]:.4f}, padded {per['padded'][-1]:.4f}",
              flush=True)
    n = a.seeds
    summ = {k: {"mean": statistics.mean(v), "se": statistics.stdev(v) / n ** 0.5}
            for k, v in per.items()}
    diff = summ["layout"]["mean"] - summ["padded"]["mean"]
    res = {"command": f"python benchmarks/pipeline_nelbo_layout.py {a.run} --texts {a.texts} "
                      f"--seeds {a.seeds}",
           "run": a.run, "layout": d.layout, "seq_len": d.seq_len, "texts": len(texts),
           "tokens": pipe.nelbo(texts, repeats=1)["tokens"], "seeds": n, "per_seed": per,
           "summary": summ, "difference": diff,
           "difference_se": (summ["layout"]["se"] ** 2 + summ["padded"]["se"] ** 2) ** 0.5,
           "seconds": time.time() - t0, "torch": torch.__version__}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"layout {summ['layout']['mean']:.4f} +- {summ['layout']['se']:.4f}, padded "
          f"{summ['padded']['mean']:.4f} +- {summ['padded']['se']:.4f}: difference "
          f"{diff:+.4f} +- {res['difference_se']:.4f} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
