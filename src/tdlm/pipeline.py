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

    def nelbo_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """The rows :meth:`nelbo` scores, laid out as the model's training data
        (:mod:`tdlm.data.layouts`): ``packed``, the texts joined into one stream (each text +
        EOS) cut into blocks of L; ``packed_bos``, the same stream in blocks of L-1 tokens each
        after a BOS; the last block of these two is shorter when the stream does not fill it
        (scored as a shorter row, never padded: packed training rows have no padding; training
        drops that partial block, so it is the one row per call of a length never trained on);
        ``crop_pad``, each text as BOS + text + EOS cut into windows of L (the last one
        padded, as in training); ``varlen``, each text as BOS + up to L-1 tokens per window,
        no EOS (scored as a ragged batch, as in training)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ConfigError("nelbo: no texts given")
        L, tok, layout = self.cfg.data.seq_len, self.tokenizer, self.cfg.data.layout
        enc = [tok.encode(t) for t in texts]
        if layout in ("packed", "packed_bos"):
            stream = [i for toks in enc for i in toks + [tok.eos_id]]
            if layout == "packed":
                return [stream[i:i + L] for i in range(0, len(stream), L)]
            return [[tok.bos_id] + stream[i:i + L - 1] for i in range(0, len(stream), L - 1)]
        rows = []
        for toks in enc:
            if layout == "varlen":
                rows += [[tok.bos_id] + toks[i:i + L - 1]
                         for i in range(0, max(len(toks), 1), L - 1)]
            else:
                toks = [tok.bos_id] + toks + [tok.eos_id]
                rows += [toks[i:i + L] for i in range(0, len(toks), L)]
        return rows

    @torch.no_grad()
    def nelbo(self, texts: Sequence[str], seed: int = 0, repeats: int = 4,
              batch_rows: int = 32) -> dict:
        """NELBO (nats/token, averaged over ``repeats`` noise draws) of texts laid out as in
        training (:meth:`nelbo_rows`), scored ``batch_rows`` rows at a time: rows of one length
        as a dense batch, ``varlen`` rows as a ragged one, ``crop_pad`` rows padded to L with
        the padding not scored; totals pooled over tokens. The time draw is antithetic within
        each batch, so a larger ``batch_rows`` (or more ``repeats``) lowers the variance."""
        if repeats < 1:
            raise ConfigError(f"repeats must be >= 1, got {repeats}")
        batch_rows = _posint("batch_rows", batch_rows)
        rows = self.nelbo_rows(texts)
        L, pad = self.cfg.data.seq_len, self.tokenizer.pad_id
        batches = []
        if self.cfg.data.layout == "varlen":
            from .data.batches import collate_ragged
            for i in range(0, len(rows), batch_rows):
                grp = rows[i:i + batch_rows]
                batches.append(collate_ragged([(r, [True] * len(r)) for r in grp]))
        else:
            padded = self.cfg.data.layout == "crop_pad"
            by_len: dict = {}
            for r in rows:
                by_len.setdefault(L if padded else len(r), []).append(r)
            for n, group in by_len.items():
                for i in range(0, len(group), batch_rows):
                    grp = group[i:i + batch_rows]
                    x = torch.full((len(grp), n), pad, dtype=torch.long)
                    valid = torch.zeros((len(grp), n), dtype=torch.bool)
                    for j, r in enumerate(grp):
                        x[j, :len(r)] = torch.tensor(r)
                        valid[j, :len(r)] = True
                    batches.append({"input_ids": x, "valid": valid})
        dev = self.device
        batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.model.eval()
        tot, n = 0.0, 0.0
        for _ in range(repeats):
            for b in batches:
                terms = self.family.nelbo(self.model, b, gen)
                tot += terms.nll.sum().item()
                n += terms.n_tokens.sum().item()
        per_tok = tot / max(n, 1)
        return {"nelbo_per_token": per_tok, "ppl_bound": math.exp(min(per_tok, 700)),
                "tokens": int(n / repeats), "rows": len(rows), "layout": self.cfg.data.layout,
                **self.family.eval_conventions()}


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
