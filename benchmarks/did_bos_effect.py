"""python benchmarks/did_bos_effect.py (about 4 min, one thread; needs runs/did-bos/mdlm-s0 and runs/judge-2000)

The retrained keep_first MDLM (runs/did-bos/mdlm-s0) sampled both ways with the same seed:
from [BOS] + masks (the fix) and from all masks (position 0 masked, as before the fix), both
scored under judge-2000: isolates the BOS effect from the retraining."""
import json, torch
torch.set_num_threads(1)
from tdlm.api import load
from tdlm.eval.genppl import generative_perplexity, load_judge, vocab_ids_hash
pipe = load("runs/did-bos/mdlm-s0")
judge = load_judge("runs/judge-2000/ar-judge")
vh = vocab_ids_hash(pipe.tokenizer.hf)
out = {}
for name, keep in (("bos", True), ("masked-position-0", False)):
    pipe.family.cfg = pipe.cfg.override([f"family.keep_first={'true' if keep else 'false'}"])
    res = pipe.sample(32, 128, seed=1)
    recs = [{"ids": r, "text": pipe.tokenizer.decode(r)} for r in res.ids.tolist()]
    g = generative_perplexity(recs, judge, sample_vocab_hash=vh)
    out[name] = {k: g[k] for k in ("gen_ppl", "gen_ppl_ci95", "tokens", "nll_per_token",
                                   "nll_se_per_token")}
    out[name]["entropy"] = g["entropy"]
    out[name]["position0_is_bos"] = sum(r[0] == pipe.tokenizer.bos_id for r in res.ids.tolist())
    print(name, out[name], flush=True)
OUT = "benchmarks/results/runs/did-study/samples/mdlm-s0-masked-position-0/bos_effect.json"
json.dump(out, open(OUT, "w"), indent=1)
