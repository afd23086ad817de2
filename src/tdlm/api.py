"""Small user API over the library's objects::

    import tdlm
    pipe = tdlm.load("runs/quickstart/checkpoints/latest-or-step-folder")
    texts = pipe.generate(num=4, steps=128, seed=0)
    print(pipe.nelbo(["Some text to score."]))
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import RunConfig
from .errors import CheckpointError, ConfigError
from .families import Family, get_family_class
from .families.base import model_device
from .train.checkpoint import Checkpoint, load_checkpoint


def _posint(name: str, v) -> int:
    try:
        i = operator.index(v)
    except TypeError:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}") from None
    if i < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return i


@dataclass
class Pipeline:
    cfg: RunConfig
    family: Family
    model: torch.nn.Module
    tokenizer: object
    checkpoint: Optional[Checkpoint] = None
    weights: str = "raw"        # which weights the model holds: "ema" or "raw"

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    @torch.no_grad()
    def generate_ids(self, num: int = 1, steps: int = 128, seq_len: Optional[int] = None,
                     seed: int = 0, temperature: float = 1.0, top_p: float = 1.0,
                     prefix: Optional[torch.Tensor] = None, **kw) -> torch.Tensor:
        steps, num = _posint("steps", steps), _posint("num", num)
        seq_len = _posint("seq_len", self.cfg.data.seq_len if seq_len is None else seq_len)
        if seq_len > self.cfg.model.max_seq_len:
            raise ConfigError(f"seq_len {seq_len} exceeds the model's max_seq_len "
                              f"{self.cfg.model.max_seq_len}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature!r}")
        if not 0 < top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
        if prefix is not None:
            prefix = torch.as_tensor(prefix, dtype=torch.long)
            if prefix.dim() == 1:
                prefix = prefix[None].expand(num, -1)
            if prefix.dim() != 2 or prefix.shape[0] != num or prefix.shape[1] > seq_len:
                raise ConfigError(f"prefix must have shape [num={num}, k <= {seq_len}], got "
                                  f"{list(prefix.shape)}")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.model.eval()
        return self.family.sample(self.model, num, seq_len, steps, gen, temperature=temperature,
                                  top_p=top_p, prefix=prefix,
                                  bos_id=getattr(self.tokenizer, "bos_id", None), **kw)

    def save_pretrained(self, folder, overwrite: bool = False) -> Path:
        """Export this model (its current weights, tokenizer, tree, config) to ``folder``;
        see :func:`tdlm.export.save_pretrained`."""
        from .export import save_pretrained
        return save_pretrained(self, folder, overwrite=overwrite)

    def generate(self, num: int = 1, steps: int = 128, **kw) -> list[str]:
        ids = self.generate_ids(num, steps, **kw)
        return [self.tokenizer.decode(row.tolist()) for row in ids]

    @torch.no_grad()
    def nelbo(self, texts: Sequence[str], seed: int = 0, repeats: int = 4) -> dict:
        """NELBO (nats/token, averaged over ``repeats`` noise draws) of texts, each encoded and
        cut/padded to the model's sequence length as in training: packed layout, text + EOS
        cut into blocks; crop_pad layout, BOS + text + EOS cut into windows. Padding is not
        scored."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ConfigError("nelbo: no texts given")
        if repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {repeats}")
        L = self.cfg.data.seq_len
        tok = self.tokenizer
        ids = []
        layout = self.cfg.data.layout
        for t in texts:
            toks = tok.encode(t)
            if layout in ("packed_bos", "varlen"):
                # BOS-led windows: [BOS] + up to L-1 tokens (varlen: no EOS, as in training)
                if layout == "packed_bos":
                    toks = toks + [tok.eos_id]
                for i in range(0, max(len(toks), 1), L - 1):
                    ids.append([tok.bos_id] + toks[i:i + L - 1])
                continue
            toks = toks + [tok.eos_id]
            if layout == "crop_pad":
                toks = [tok.bos_id] + toks
            for i in range(0, len(toks), L):
                ids.append(toks[i:i + L])
        x = torch.full((len(ids), L), tok.pad_id, dtype=torch.long)
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
        from .eval.nelbo import conventions
        return {"nelbo_per_token": per_tok, "ppl_bound": math.exp(min(per_tok, 700)),
                "tokens": int(n / repeats), **conventions(self.family)}


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
    """Load a checkpoint (a step folder or a run folder) or an exported model folder
    (:func:`tdlm.save_pretrained`) into a :class:`Pipeline`. Every file is verified against
    its sha256 manifest first; only JSON and safetensors are read. With ``use_ema`` a
    checkpoint's EMA weights are used when it has them (``Pipeline.weights`` says which)."""
    from .export import is_pretrained_folder, load_pretrained_checkpoint
    if is_pretrained_folder(path):
        ckpt = load_pretrained_checkpoint(path, expect_family=expect_family)
    else:
        ckpt = load_checkpoint(path, expect_family=expect_family)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    cfg = ckpt.config
    fam_cls = get_family_class(cfg.model.family)
    family = fam_cls(cfg, **fam_cls.resources_from_checkpoint(ckpt))
    model = family.build_model()
    if ckpt.ema_state is not None and use_ema:
        state, weights = ckpt.ema_state, "ema"
    else:
        state, weights = ckpt.model_state, getattr(ckpt, "weights", "raw")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {ckpt.path} weights do not fit its config: "
                              f"{str(e).splitlines()[0]}") from None
    model.to(dev).eval()
    return Pipeline(cfg, family, model, load_tokenizer(ckpt), ckpt, weights)


def load_scheduled(paths: dict, device: str = "cpu", use_ema: bool = True):
    """Load named checkpoints (``{"H": "runs/heavy", "L": "runs/light"}``) into a
    :class:`tdlm.scheduling.ScheduledSampler`: ``generate_ids(num, steps, schedule=
    "sandwich:0.25", seed=0)``; its ``last_report`` holds forward calls, FLOPs and savings."""
    from .scheduling.sampler import load_scheduled as _load_scheduled
    return _load_scheduled(paths, device=device, use_ema=use_ema)


def generative_perplexity(samples, judge, **kw) -> dict:
    """Gen PPL + mean unigram entropy of samples (texts, id lists or ``tdlm sample`` records,
    any lengths) under a judge (a tdlm AR checkpoint or a local Hugging Face folder); see
    :func:`tdlm.eval.genppl.generative_perplexity`."""
    from .eval.genppl import generative_perplexity as _gp
    return _gp(samples, judge, **kw)
