"""The user's object: a loaded model with its family, tokenizer and config (layer 4).

    import tdlm
    pipe = tdlm.load("runs/quickstart/tdlm-tiny")        # a run, checkpoint or exported folder
    texts = pipe.generate(num=4, steps=128, seed=0)
    print(pipe.nelbo(["Some text to score."]))
    pipe.save_pretrained("models/tiny")                  # tdlm.from_pretrained("models/tiny")

Below training, evaluation and scheduling (which use it); above the families and the stores.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import RunConfig
from .errors import CheckpointError, ConfigError
from .families import Family, get_family_class
from .families.base import model_device
from .sampling.result import SampleResult, StepPlan, build_options
from .store.checkpoint import Checkpoint, load_checkpoint
from .store.checkpoint import tokenizer_of as load_tokenizer  # noqa: F401 (public name)
from .store.export import (PRETRAINED_FORMAT, hub_snapshot, is_pretrained_folder,
                           load_pretrained_checkpoint, write_pretrained)


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
    def sample(self, num: int = 1, steps: int = 128, seq_len: Optional[int] = None,
               seed: int = 0, *, plan: Optional[StepPlan] = None, log=None,
               on_forward=None, **options) -> SampleResult:
        """``num`` samples (:class:`SampleResult`: ids, lengths, trajectory, stats) with
        ``steps`` steps, a generator seeded with ``seed`` and the family's typed options
        (``temperature``, ``top_p``, ``prefix`` [num, k] or [k], and the family's own, e.g.
        TDLM ``steps_split``; an option the family does not take is a one-line error).
        ``plan``: a model plan (model scheduling, :mod:`tdlm.scheduling`); ``log``: a
        ``ForwardLog`` that records the forward passes."""
        if "models" in options:           # deprecated: models=, plan=[names], time_conditioned=
            import warnings
            warnings.warn("generate_ids(models=, plan=[...]) is deprecated: pass "
                          "plan=StepPlan(models, per_step)", DeprecationWarning, stacklevel=3)
            plan = StepPlan(options.pop("models"), list(plan),
                            options.pop("time_conditioned", None) or {})
        num = _posint("num", num)
        seq_len = _posint("seq_len", self.cfg.data.seq_len if seq_len is None else seq_len)
        if seq_len > self.cfg.backbone.max_seq_len:
            raise ConfigError(f"seq_len {seq_len} exceeds the model's max_seq_len "
                              f"{self.cfg.backbone.max_seq_len}")
        prefix = options.get("prefix")
        if prefix is not None:
            prefix = torch.as_tensor(prefix, dtype=torch.long)
            if prefix.dim() == 1:
                prefix = prefix[None].expand(num, -1)
            if prefix.dim() != 2 or prefix.shape[0] != num or prefix.shape[1] > seq_len:
                raise ConfigError(f"prefix must have shape [num={num}, k <= {seq_len}], got "
                                  f"{list(prefix.shape)}")
            options["prefix"] = prefix
        if "bos_id" in self.family.sample_options:
            options.setdefault("bos_id", getattr(self.tokenizer, "bos_id", None))
        opts = build_options(self.family.SampleOptions, self.cfg.family.name,
                             steps=_posint("steps", steps), **options)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.model.eval()
        return self.family.sample(self.model, num, seq_len, opts, gen, plan, log=log,
                                  on_forward=on_forward)

    def generate_ids(self, num: int = 1, steps: int = 128, seq_len: Optional[int] = None,
                     seed: int = 0, **kw):
        """Token ids as :meth:`sample` draws them: a [num, L] tensor, or for variable-length
        families a list of 1-D tensors (``SampleResult.rows``)."""
        return self.sample(num, steps, seq_len, seed, **kw).rows()

    def save_pretrained(self, folder, overwrite: bool = False) -> Path:
        """Export this model (its current weights, tokenizer, tree, config) to ``folder``;
        see :mod:`tdlm.store.export`."""
        return write_pretrained(self, folder, overwrite=overwrite)

    def generate(self, num: int = 1, steps: int = 128, **kw) -> list[str]:
        """Decoded texts of :meth:`sample`."""
        return [self.tokenizer.decode(ids) for ids in self.sample(num, steps, **kw).sequences()]

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
            terms = self.family.nelbo(self.model, batch, gen)
            tot += terms.nll.sum().item()
            n += terms.n_tokens.sum().item()
        per_tok = tot / max(n, 1)
        return {"nelbo_per_token": per_tok, "ppl_bound": math.exp(min(per_tok, 700)),
                "tokens": int(n / repeats), **self.family.eval_conventions()}


def load(path: str | Path, device: str = "cpu", use_ema: bool = True,
         expect_family: Optional[str] = None) -> Pipeline:
    """Load a checkpoint (a step folder or a run folder) or an exported model folder
    (:func:`tdlm.save_pretrained`) into a :class:`Pipeline`. Every file is verified against
    its sha256 manifest first; only JSON and safetensors are read. With ``use_ema`` a
    checkpoint's EMA weights are used when it has them (``Pipeline.weights`` says which)."""
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
    fam_cls = get_family_class(cfg.family.name)
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


def save_pretrained(model, folder, *, use_ema: bool = True, overwrite: bool = False) -> Path:
    """Export ``model`` (a :class:`Pipeline`, or a run/checkpoint/exported folder, loaded with
    ``use_ema``) to ``folder`` (:mod:`tdlm.store.export`). Returns the folder."""
    pipe = model if isinstance(model, Pipeline) else load(model, use_ema=use_ema)
    return write_pretrained(pipe, folder, overwrite=overwrite)


def from_pretrained(name_or_path, device: str = "cpu", *, revision: Optional[str] = None,
                    expect_family: Optional[str] = None, use_ema: bool = True,
                    cache_dir: Optional[str] = None):
    """A :class:`Pipeline` from a local folder (exported, run or checkpoint folder)
    or, when ``name_or_path`` is not an existing local path, from the Hugging Face hub
    (``huggingface_hub.snapshot_download(name_or_path, revision=...)``; needs the package
    and network access). Errors are one-line TdlmError/CheckpointError."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.exists():
        return load(p, device=device, use_ema=use_ema, expect_family=expect_family)
    name = str(name_or_path)
    local = hub_snapshot(name, revision, cache_dir, what="model")
    if not is_pretrained_folder(local):
        raise CheckpointError(f"hub repository {name} is not a tdlm exported model "
                              f"(no {PRETRAINED_FORMAT} manifest.json)")
    return load(local, device=device, use_ema=use_ema, expect_family=expect_family)
