"""Small user API over the library's objects::

    import tdlm
    pipe = tdlm.load("runs/quickstart/checkpoints/latest-or-step-folder")
    texts = pipe.generate(num=4, steps=128, seed=0)
    print(pipe.nelbo(["Some text to score."]))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import RunConfig
from .errors import CheckpointError
from .families import Family, get_family_class
from .train.checkpoint import Checkpoint, load_checkpoint


@dataclass
class Pipeline:
    cfg: RunConfig
    family: Family
    model: torch.nn.Module
    tokenizer: object
    checkpoint: Optional[Checkpoint] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate_ids(self, num: int = 1, steps: int = 128, seq_len: Optional[int] = None,
                     seed: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                     prefix: Optional[torch.Tensor] = None, **kw) -> torch.Tensor:
        if steps <= 0:
            raise ValueError("steps must be >= 1")
        if num <= 0:
            raise ValueError("num must be >= 1")
        seq_len = seq_len or self.cfg.data.seq_len
        if seq_len > self.cfg.model.max_seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len "
                             f"{self.cfg.model.max_seq_len}")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.model.eval()
        return self.family.sample(self.model, num, seq_len, steps, gen, temperature=temperature,
                                  top_p=top_p, prefix=prefix,
                                  bos_id=getattr(self.tokenizer, "bos_id", None), **kw)

    def generate(self, num: int = 1, steps: int = 128, **kw) -> list[str]:
        ids = self.generate_ids(num, steps, **kw)
        return [self.tokenizer.decode(row.tolist()) for row in ids]

    @torch.no_grad()
    def nelbo(self, texts: Sequence[str], seed: int = 0, repeats: int = 4) -> dict:
        """NELBO (nats/token, averaged over ``repeats`` noise draws) of texts, each encoded and
        cut/padded to the model's sequence length as in training (packed layout)."""
        L = self.cfg.data.seq_len
        ids = []
        for t in texts:
            toks = self.tokenizer.encode(t) + [self.tokenizer.eos_id]
            for i in range(0, len(toks), L):
                ids.append(toks[i:i + L])
        x = torch.full((len(ids), L), self.tokenizer.pad_id, dtype=torch.long)
        valid = torch.zeros((len(ids), L), dtype=torch.bool)
        for i, row in enumerate(ids):
            x[i, :len(row)] = torch.tensor(row)
            valid[i, :len(row)] = True
        batch = {"input_ids": x.to(self.device), "valid": valid.to(self.device)}
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.model.eval()
        tot, n = 0.0, 0.0
        for _ in range(repeats):
            terms = self.family.loss(self.model, batch, gen, exact=True)
            tot += terms.nll.sum().item()
            n += terms.n_tokens.sum().item()
        per_tok = tot / max(n, 1)
        return {"nelbo_per_token": per_tok, "ppl_bound": math.exp(min(per_tok, 700)),
                "tokens": int(n / repeats)}


def load_tokenizer(ckpt: Checkpoint):
    from .data import get_tokenizer
    from .data.tokenizer import Tokenizer
    p = ckpt.extra("tokenizer")
    if p is not None:
        return Tokenizer.load(str(p))
    if ckpt.config.data.tokenizer == "gpt2":
        return get_tokenizer("gpt2")
    raise CheckpointError(f"checkpoint {ckpt.path} carries no tokenizer")


def load(path: str | Path, device: str = "cpu", use_ema: bool = True,
         expect_family: Optional[str] = None) -> Pipeline:
    """Load a checkpoint (a step folder or a run folder) into a :class:`Pipeline`."""
    ckpt = load_checkpoint(path, expect_family=expect_family)
    cfg = ckpt.config
    fam_cls = get_family_class(cfg.model.family)
    family = fam_cls(cfg, **fam_cls.resources_from_checkpoint(ckpt))
    model = family.build_model()
    state = ckpt.ema_state if (use_ema and ckpt.ema_state is not None) else ckpt.model_state
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt.path} weights do not fit its config: "
                              f"{str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return Pipeline(cfg, family, model, load_tokenizer(ckpt), ckpt)
