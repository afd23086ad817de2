#!/usr/bin/env python3
"""Golden outputs of the library, to show that a refactoring changes no number.

    python scripts/golden.py record OUT.json [--work DIR]     # run everything, write OUT.json
    python scripts/golden.py compare A.json B.json            # exit 1 on any difference

What is recorded (every float as ``float.hex``, so "equal" means bit-identical):

* for every family and preset kind (MDLM time-conditioned / not / discrete-time / padded crop
  batches, TDLM shared and per-level heads / discrete-time / exponential windows, AR, DID fixed
  and variable length), on a small model with fixed random weights and a fixed batch:
  the training loss and the evaluation NELBO (per-sequence ``nll``, ``n_tokens``, ``parts``)
  at fixed generator seeds, the gradient of the training loss (sha256 of every parameter's
  gradient bytes and the global norm), and sampler outputs at fixed seeds;
* ``tdlm info --json`` for every preset (parameter counts);
* a short ``tdlm train`` run of ``tiny``, ``tdlm-tiny``-shaped and ``did-tiny-var``-shaped
  models on a slice of the bundled corpus: its ``metrics.jsonl`` (wall-clock fields dropped), the
  sha256 of every tensor in its final checkpoint, ``tdlm eval`` metrics and ``tdlm sample``
  ids, and the tensors of a ``tdlm export`` of it.

Float results depend on the thread count (reduction order), so recording always runs with one
thread (in-process and in the ``tdlm`` subprocesses); with 2 threads every entry differs.

``compare`` prints, per key, ``equal`` or the first differences (with the largest relative
difference of numeric leaves), so a deliberate change of convention shows up as exactly the
entries it should touch.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VOL = ("seconds", "time", "tok_per_s", "tokens_per_s", "elapsed", "wall", "date", "created",
       "path", "dir", "checkpoint", "host", "machine", "torch", "python", "run_dir", "out")


def fx(v):
    """Floats as hex (bit-exact), recursively; tensors as nested lists."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return fx(v.tolist()) if v.dtype.is_floating_point else v.tolist()
    if isinstance(v, float):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): fx(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [fx(x) for x in v]
    return v


def sha(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]


# ---- per-family losses, gradients and samples ---------------------------------------------
V, L, B = 24, 12, 6


def _cfg(family, model=None, diffusion=None, data=None):
    from tdlm.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
    m = dict(family=family, vocab_size=V, d_model=32, n_layers=2, n_heads=2, cond_dim=16,
             max_seq_len=L, dropout=0.0, tree_K=5, tree_H=2)
    m.update(model or {})
    d = dict(seq_len=L)
    d.update(data or {})
    return RunConfig(model=ModelConfig(**m), diffusion=DiffusionConfig(**(diffusion or {})),
                     data=DataConfig(**d))


CASES = {
    "mdlm": ("mdlm", {}, {}, {}),
    "mdlm-no-time": ("mdlm", {"time_conditioning": False}, {}, {}),
    "mdlm-discrete": ("mdlm", {}, {"num_timesteps": 16}, {}),
    "mdlm-cosine": ("mdlm", {}, {"schedule": "cosine"}, {}),
    "mdlm-crop-pad": ("mdlm", {}, {}, {"layout": "crop_pad"}),
    "mdlm-crop-pad-train-pads": ("mdlm", {}, {"train_on_padding": True}, {"layout": "crop_pad"}),
    "mdlm-keep-first": ("mdlm", {}, {"keep_first": True}, {"layout": "packed_bos"}),
    "tdlm": ("tdlm", {}, {}, {}),
    "tdlm-per-level": ("tdlm", {"tree_head": "per_level"}, {}, {}),
    "tdlm-discrete": ("tdlm", {}, {"num_timesteps": 16}, {}),
    "tdlm-exp-windows-clip": ("tdlm", {}, {"window_allocation": "exponential",
                                          "level_weighting": "linear", "train_weight_clip": 2.0},
                              {}),
    "tdlm-crop-pad": ("tdlm", {}, {}, {"layout": "crop_pad"}),
    "ar": ("ar", {"time_conditioning": False}, {}, {}),
    "ar-crop-pad": ("ar", {"time_conditioning": False}, {}, {"layout": "crop_pad"}),
    "did-fixed": ("did", {"time_conditioning": False, "did_length": "fixed"}, {},
                  {"layout": "packed_bos"}),
    "did-variable": ("did", {"time_conditioning": True, "did_length": "variable"}, {},
                     {"layout": "varlen"}),
}


def _family(name):
    import numpy as np
    from tdlm.families import get_family
    fam_name, m, d, data = CASES[name]
    cfg = _cfg(fam_name, m, d, data)
    res = {}
    if fam_name == "tdlm":
        from tdlm.tree import VocabTree
        lv0 = np.arange(V) % 5            # 5 leaf groups of <= 5 tokens
        res["tree"] = VocabTree.from_assignment([lv0, np.zeros(5, dtype=np.int64)], K=5)
    return get_family(cfg, **res), cfg


def _batch(name, cfg):
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, V - 1, (B, L), generator=g)
    layout = cfg.data.layout
    if layout == "varlen":
        lens = torch.tensor([L, 3, 7, 1, 9, 5])
        rows = [torch.cat([torch.tensor([V - 1]), x[i, :n - 1]]) for i, n in enumerate(lens)]
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        return {"input_ids": torch.cat(rows), "cu_seqlens": cu,
                "valid": torch.ones(int(lens.sum()), dtype=torch.bool)}
    if layout == "packed_bos":
        x[:, 0] = V - 1
        return {"input_ids": x, "valid": torch.ones_like(x, dtype=torch.bool)}
    if layout == "crop_pad":
        valid = torch.arange(L)[None] < torch.tensor([L, 2, 5, 8, 11, 1])[:, None]
        return {"input_ids": torch.where(valid, x, V - 1), "valid": valid}
    return {"input_ids": x, "valid": torch.ones_like(x, dtype=torch.bool)}


def _terms(t):
    return {"nll": fx(t.nll), "n_tokens": fx(t.n_tokens), "parts": fx(dict(t.parts))}


def record_family(name) -> dict:
    fam, cfg = _family(name)
    torch.manual_seed(0)
    model = fam.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(
                int(hashlib.sha256(str(p.shape).encode()).hexdigest()[:8], 16))) * 0.2)
    batch = _batch(name, cfg)
    out = {}
    model.train()
    tr = fam.loss(model, batch, torch.Generator().manual_seed(1))
    loss = tr.nll.sum() / tr.n_tokens.sum().clamp_min(1)
    loss.backward()
    out["train_loss"] = _terms(tr)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    out["grad_sha"] = {n: sha(g) for n, g in sorted(grads.items())}
    out["grad_norm"] = fx(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))))
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        for s in (2, 3):
            out[f"nelbo_seed{s}"] = _terms(fam.loss(model, batch, torch.Generator().manual_seed(s),
                                                    exact=True))
        for s in (0, 1):
            kw = {"bos_id": V - 1} if fam.name in ("ar", "did") else {}
            ids = fam.sample(model, 3, L, 6, torch.Generator().manual_seed(s), **kw)
            out[f"sample_seed{s}"] = [r.tolist() for r in ids] if isinstance(ids, list) else ids.tolist()
    return out


# ---- CLI-level: info, a short training run, eval, sample, export ---------------------------
def _run(args, cwd, env):
    r = subprocess.run([sys.executable, "-m", "tdlm.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"tdlm {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if not any(w in k for w in VOL)}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return fx(obj) if isinstance(obj, float) else obj


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, t in sorted(load_file(str(f)).items()):
            out[f"{f.relative_to(folder)}:{k}"] = sha(t)
    return out


RUNS = {
    "tiny": ["--preset", "tiny"],
    "tdlm-small-vocab": ["--preset", "tiny", "--set", "model.family=\"tdlm\"",
                         "--set", "model.tree_K=128", "--set", "model.tree_H=2"],
    "did-var": ["--preset", "did-tiny-var", "--set", "model.d_model=64", "--set", "model.n_heads=2",
                "--set", "model.n_layers=2"],
}
COMMON = ["--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.ckpt_every=2",
          "--set", "train.eval_batches=2", "--set", "train.log_every=1", "--set", "train.warmup_steps=1",
          "--set", "train.global_batch=4", "--set", "data.max_train_docs=60"]


def record_cli(work: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = {"info": {}}
    from tdlm.config import preset_names
    for p in preset_names():
        out["info"][p] = json.loads(_run(["info", "--preset", p, "--json"], work, env))
    for name, args in RUNS.items():
        rd = work / name
        _run(["train", "--no-progress", *args, *COMMON, "--set", f"data.cache_dir=\"{work / 'cache'}\"",
              "--out", str(rd)], work, env)
        metrics = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines() if l]
        rec = {"metrics": _clean(metrics), "checkpoint": _tensors(rd / "checkpoints")}
        rec["eval"] = _clean(json.loads(_run(["eval", str(rd), "--json", "--batches", "2"], work, env)))
        _run(["sample", str(rd), "--num", "2", "--steps", "8", "--seed", "0"], work, env)
        samples = [json.loads(l) for l in (rd / "samples" / "samples.jsonl").read_text().splitlines() if l]
        rec["samples"] = [s.get("ids", s.get("text")) for s in samples]
        _run(["export", str(rd), "--out", str(work / f"{name}-export")], work, env)
        rec["export"] = _tensors(work / f"{name}-export")
        out[name] = rec
    return out


def record(path: str, work: str | None) -> None:
    torch.set_num_threads(1)            # bit-exact results need a fixed reduction order
    res = {"torch": torch.__version__, "threads": 1, "families": {}}
    for name in CASES:
        res["families"][name] = record_family(name)
        print(f"[golden] {name}", flush=True)
    with tempfile.TemporaryDirectory(dir=work) as d:
        res["cli"] = record_cli(Path(d))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=1, sort_keys=True))
    print(f"[golden] wrote {path}")


def _diff(a, b, key, out, limit=5):
    if type(a) is not type(b):
        out.append(f"{key}: type {type(a).__name__} != {type(b).__name__}")
    elif isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{key}.{k}: only in {'B' if k not in a else 'A'}")
            else:
                _diff(a[k], b[k], f"{key}.{k}", out, limit)
    elif isinstance(a, list):
        if len(a) != len(b):
            out.append(f"{key}: length {len(a)} != {len(b)}")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                _diff(x, y, f"{key}[{i}]", out, limit)
    elif a != b:
        msg = f"{key}: {a!r} != {b!r}"
        try:
            fa, fb = float.fromhex(a), float.fromhex(b)
            msg += f" (rel {abs(fa - fb) / max(abs(fa), 1e-300):.2e})"
        except (TypeError, ValueError):
            pass
        out.append(msg)


def compare(a: str, b: str) -> int:
    A, B_ = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
    bad = 0
    for section in ("families", "cli"):
        for k in sorted(set(A.get(section, {})) | set(B_.get(section, {}))):
            diffs: list = []
            _diff(A.get(section, {}).get(k), B_.get(section, {}).get(k), k, diffs)
            print(f"{section}/{k}: " + ("equal" if not diffs else f"{len(diffs)} differences"))
            for d in diffs[:8]:
                print(f"    {d}")
            bad += bool(diffs)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--work", default=None, help="folder for the temporary run folders")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.out, args.work)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
