"""Write tests/fixtures/published/{mdlm,duo}: tiny random DiTs built and run with the *authors'*
modeling code, for the numerical check of ``tdlm convert`` (tests/families/test_convert.py).

The authors' code is never copied into this repository: pass the paths of local checkouts
(``fetch`` github:kuleshov-group/mdlm, github:s-sahoo/duo, github:Dao-AILab/flash-attention)::

    python scripts/make_published_fixture.py --mdlm /tmp/peers/mdlm --duo /tmp/peers/duo \\
        --flash-attn /tmp/peers/flash-attention

needs ``einops omegaconf huggingface_hub`` (the authors' imports). flash-attn's CUDA kernels
cannot run on a CPU: ``benchmarks/peer_code.py`` assembles a temporary ``flash_attn`` package
from flash-attention's own reference rotary function and a per-sequence SDPA stand-in for
its varlen attention (said there and in provenance.json).

Each family's DiT is built from its own repository with random weights (adaLN and the output
layer are zero at init; everything is re-drawn so every parameter matters), run in float32 on
fixed tokens and noise levels, and saved as the published checkpoints are laid out
(``backbone.`` + the DIT's names, a hub-style ``config.json``) plus ``logits.safetensors`` and
``provenance.json`` (commits, stand-ins, command).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "published"
sys.path.insert(0, str(ROOT / "benchmarks"))
from peer_code import STAND_INS, commit, flash_attn_shim, load_module  # noqa: E402

def load_dit(repo: Path, name: str):
    return load_module(repo / "models" / "dit.py", name)


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name.endswith("norm_final.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.25)


def build(which: str, repo: Path, seed: int) -> dict:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    V, d, H, cond, n, L, B = 64, 32, 4, 16, 2, 12, 3
    model_cfg = dict(hidden_size=d, cond_dim=cond, n_heads=H, n_blocks=n, dropout=0.1,
                     scale_by_sigma=True, length=L)
    if which == "mdlm":
        rows = V + 1                      # the [MASK] row (MDLM: vocab_size = len(tok) + 1)
        cfg = OmegaConf.create({"model": model_cfg})
        time_conditioning = False
    else:
        rows = V                          # DUO (uniform-state): no [MASK] row
        cfg = OmegaConf.create({"model": model_cfg, "algo": {"causal_attention": False}})
        time_conditioning = True
    mod = load_dit(repo, f"published_{which}_dit")
    torch.manual_seed(seed)
    dit = mod.DIT(cfg, vocab_size=rows)
    randomize(dit, seed)
    dit.eval()
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, rows, (B, L), generator=g)
    if which == "mdlm":
        tokens[0, ::3] = V                # some [MASK] inputs
    sigma = torch.rand(B, generator=g) * 3
    with torch.no_grad():
        logits = dit(tokens, sigma).float()
        logits0 = dit(tokens, torch.zeros(B)).float()
    out = OUT / which
    out.mkdir(parents=True, exist_ok=True)
    # as published: the hub models wrap the DIT as `backbone` (MDLM's HF `MDLM.backbone`)
    state = {f"backbone.{k}": v.detach().contiguous() for k, v in dit.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    hub_cfg = {"model_type": which, "hidden_dim": d, "cond_dim": cond, "n_blocks": n,
               "n_heads": H, "model_length": L, "vocab_size": rows, "dropout": 0.1,
               "time_conditioning": time_conditioning}
    (out / "config.json").write_text(json.dumps(hub_cfg, indent=2) + "\n")
    save_file({"tokens": tokens, "sigma": sigma, "logits": logits.contiguous(),
               "logits_sigma0": logits0.contiguous()}, str(out / "logits.safetensors"))
    return {"rows": rows, "vocab_size": V, "time_conditioning": time_conditioning}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mdlm", type=Path, required=True)
    ap.add_argument("--duo", type=Path, required=True)
    ap.add_argument("--flash-attn", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        flash_attn_shim(Path(tmp), a.flash_attn)
        info = {w: build(w, p, a.seed) for w, p in (("mdlm", a.mdlm), ("duo", a.duo))}
    prov = {
        "command": "python scripts/make_published_fixture.py --mdlm <mdlm checkout> --duo "
                   "<duo checkout> --flash-attn <flash-attention checkout>",
        "torch": torch.__version__, "seed": a.seed, "dtype": "float32 (CPU: the authors' "
        "bf16 autocast is CUDA-only and inactive here)",
        "sources": {"mdlm": {"repo": "github.com/kuleshov-group/mdlm", "commit": commit(a.mdlm),
                             "file": "models/dit.py"},
                    "duo": {"repo": "github.com/s-sahoo/duo", "commit": commit(a.duo),
                            "file": "models/dit.py"},
                    "flash-attention": {"repo": "github.com/Dao-AILab/flash-attention",
                                        "commit": commit(a.flash_attn),
                                        "file": "flash_attn/layers/rotary.py"}},
        "stand_ins": STAND_INS,
        "files": {"model.safetensors": "the DIT's state_dict with the hub's `backbone.` prefix",
                  "config.json": "hub-style config (MDLM's HF config field names)",
                  "logits.safetensors": "tokens [B, L], sigma [B], logits = DIT(tokens, sigma), "
                                        "logits_sigma0 = DIT(tokens, 0)"},
        "models": info,
    }
    (OUT / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
