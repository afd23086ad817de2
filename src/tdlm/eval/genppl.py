"""Generative perplexity of samples under a judge LM, with the samples' unigram entropy.

Judge: a ``tdlm`` autoregressive checkpoint (family ``ar``, e.g. trained with ``tdlm train
--preset ar-tiny``; labelled as this library's AR model, not GPT-2) or a local Hugging Face
causal-LM folder (``config.json`` + weights + tokenizer files; loaded with ``transformers``,
never downloaded), e.g. GPT-2 Large.

For sample i with judge tokens ``g_i`` (the generated part) after a context ``c_i`` (a clamped
prefix, if any), the judge sees ``[BOS] + c_i + g_i`` and scores the tokens of ``g_i``:

    NLL = sum_i sum_{j in S_i} -log p_judge(g_ij | BOS, c_i, g_i,<j),   N = sum_i |S_i|,
    gen PPL = exp(NLL / N)   (token-pooled over all samples, not a mean of per-sample PPLs).

EOS tokens at the very start of ``g_i`` (a sample that opens on a document boundary, or on
the BOS its sampler starts from: BOS = EOS here) are moved into the context first, and the
judge's own BOS is left out when the context already starts with it (one BOS, as in the
judge's training rows). Then ``S_i`` (``eos="first"``, the default): positions up to and
including the first EOS; ``eos="mdlm"``: every non-EOS token plus the first EOS (the MDLM
reference code's mask); ``eos="none"``: every token. Sequences longer than the judge's
context are scored in consecutive windows of ``context`` inputs (each window restarts its
context; every target is scored exactly once).

Retokenisation: when the samples' tokenizer has the judge's vocabulary (the same token string
for every id: :func:`vocab_ids_hash`; merges may differ, the ids mean the same) the sample
ids are scored as they are; otherwise the text is split on ``<|endoftext|>``, each piece is
encoded with the judge's tokenizer and the pieces are joined with the judge's EOS id.

Sampling error: the samples are independent draws, so ``r = NLL / N`` is a ratio estimator
over samples; its standard error (delta method) over the ``m`` samples with scored tokens,

    se(r) = sqrt( sum_i (NLL_i - r N_i)^2 / (m (m - 1)) ) / mean_i N_i,

reduces to the usual s.e. of a mean when every sample scores as many tokens. The 95% interval
of gen PPL is ``exp(r -+ 1.96 se)`` (``gen_ppl_ci95``).

Entropy: for each sample, the unigram entropy ``H_i = -sum_v p_v log p_v`` (nats) of the token
frequencies ``p_v`` of its generated part (all generated tokens, in the sampler's own
tokenizer when ids are given), averaged over samples; reported beside gen PPL because a low
gen PPL with a low entropy means repetitive text.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError

EOT = "<|endoftext|>"
EOS_MODES = ("first", "mdlm", "none")


# ---- judges ------------------------------------------------------------------------------------
def vocab_ids_hash(backend) -> str:
    """sha256 of a ``tokenizers.Tokenizer``'s vocabulary as the list of token strings by id
    (added tokens included). Two tokenizers with the same hash give every id the same meaning
    (their BPE merges, i.e. which tokenisation of a text is canonical, may still differ)."""
    import hashlib
    vocab = backend.get_vocab(with_added_tokens=True)
    ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    return hashlib.sha256(json.dumps(ordered, ensure_ascii=False).encode("utf-8")).hexdigest()


def checkpoint_weights_id(manifest: dict) -> Optional[str]:
    """sha256 over the manifest's hashes of a checkpoint's weight files (model and EMA
    safetensors; not optimizer or RNG state): equal exactly when the weights are."""
    import hashlib
    files = {k: v for k, v in (manifest or {}).get("files", {}).items()
             if k.endswith(".safetensors") and not k.startswith(("optimizer", "rng"))}
    if not files:
        return None
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def folder_weights_id(ckpt) -> Optional[str]:
    """:func:`checkpoint_weights_id` of a checkpoint folder's manifest.json; None when the
    folder or its manifest is not there (e.g. an archived run without weights)."""
    from pathlib import Path
    try:
        return checkpoint_weights_id(json.loads((Path(ckpt) / "manifest.json").read_text()))
    except (OSError, ValueError):
        return None


class Judge:
    """A causal LM that scores token ids: ``logits(x [B, L], mask [B, L]) -> [B, L, V]``."""
    kind = "base"
    label = ""
    path = ""
    context = 1024
    eos_id = 0
    bos_id = 0
    precision = "fp32"
    vocab_size = 0
    device = torch.device("cpu")
    #: a fingerprint of the weights that score (None when unknown): two judges trained alike
    #: at the same path are told apart by it, not by the path
    weights_id: Optional[str] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def vocab_hash(self) -> Optional[str]:
        return None

    def logits(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target_nll(self, x: torch.Tensor, y: torch.Tensor) -> Optional[torch.Tensor]:
        """``-log p(y_j | x_<=j)`` [B, L] (float64) where the judge computes it without the
        full-vocabulary logits (an n-gram judge), else None: :func:`_score` then takes the
        cross-entropy of :meth:`logits`."""
        return None

    def info(self) -> dict:
        return {"kind": self.kind, "path": self.path, "label": self.label,
                "context": self.context, "eos_id": self.eos_id, "bos_id": self.bos_id,
                "vocab_hash": self.vocab_hash(), "weights_id": self.weights_id}


class TdlmARJudge(Judge):
    """This library's AR model (family ``ar``) loaded from a run or checkpoint folder."""
    kind = "tdlm-ar"

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32"):
        from ..pipeline import load
        pipe = load(path, device=device)
        if not pipe.family.causal:
            raise CheckpointError(f"judge {path} holds a {pipe.cfg.family.name!r} model; a judge "
                                  "must be autoregressive (a tdlm 'ar' checkpoint or a Hugging "
                                  "Face causal LM folder)")
        self.pipe, self.path = pipe, str(pipe.checkpoint.path)
        self.context = pipe.cfg.backbone.max_seq_len
        self.vocab_size = pipe.cfg.backbone.vocab_size
        tok = pipe.tokenizer
        self.eos_id, self.bos_id = tok.eos_id, tok.bos_id
        self.device, self.precision = pipe.device, precision
        m = pipe.cfg.backbone
        self.label = (f"tdlm AR model ({m.n_layers} blocks, d={m.d_model}, step "
                      f"{pipe.checkpoint.trainer.get('step')}, data {pipe.cfg.data.source}, "
                      f"tokenizer {tok.name}); not GPT-2")
        self.weights_id = checkpoint_weights_id(pipe.checkpoint.manifest)

    def encode(self, text):
        return self.pipe.tokenizer.encode(text)

    def vocab_hash(self):
        return vocab_ids_hash(self.pipe.tokenizer.hf)

    def logits(self, x, mask):
        from ..families.base import autocast_ctx
        with autocast_ctx(self.device, "bf16" if self.precision == "bf16" else "fp32"):
            return self.pipe.model(x).float()


class HFJudge(Judge):
    """A local Hugging Face causal LM folder, through ``transformers`` (no download)."""
    kind = "hf"

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32"):
        try:
            import transformers
        except ImportError:
            raise ConfigError("a Hugging Face judge needs the transformers package "
                              "(pip install 'tdlm[hf]')") from None
        try:
            self.tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            # safetensors only: a judge folder is user input, never unpickled
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot load the Hugging Face judge in {path}: "
                                  f"{' '.join(str(e).split())[:300]}") from None
        self.device = torch.device(device)
        self.model.to(self.device).float().eval()
        self.precision = precision
        self.path = str(path)
        cfg = self.model.config
        self.context = int(getattr(cfg, "n_positions", None)
                           or getattr(cfg, "max_position_embeddings", 1024))
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        if self.tok.eos_token_id is None:
            raise CheckpointError(f"the judge tokenizer in {path} has no EOS token")
        self.eos_id = int(self.tok.eos_token_id)
        self.bos_id = int(self.tok.bos_token_id if self.tok.bos_token_id is not None
                          else self.eos_id)
        self.label = (f"Hugging Face {cfg.model_type} ({getattr(cfg, 'name_or_path', '') or path},"
                      f" {sum(p.numel() for p in self.model.parameters()):,} parameters)")
        self._hash = None

    def encode(self, text):
        return list(self.tok.encode(text, add_special_tokens=False))

    def vocab_hash(self):
        if self._hash is None:
            backend = getattr(self.tok, "backend_tokenizer", None)
            if backend is None:
                return None
            self._hash = vocab_ids_hash(backend)
        return self._hash

    def logits(self, x, mask):
        if self.precision == "bf16" and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(input_ids=x, attention_mask=mask.long()).logits.float()
        return self.model(input_ids=x, attention_mask=mask.long()).logits.float()


class NgramJudge(Judge):
    """A :class:`tdlm.eval.ngram.KneserNey` model saved with its tokenizer
    (:func:`tdlm.eval.ngram.build_ngram_judge`, ``tdlm ngram``), as a judge: ``logits`` are the
    model's log-probabilities (already normalised); ``target_nll`` scores the targets alone."""
    kind = "ngram"

    def __init__(self, path: str, device: str = "cpu", precision: str = "fp32"):
        from ..data.tokenizer import Tokenizer
        from .ngram import KneserNey
        self.lm = KneserNey.load(path)
        self.path = str(path)
        self.tok = Tokenizer.load(str(path))
        self.eos_id, self.bos_id = self.tok.eos_id, self.tok.bos_id
        self.vocab_size = self.lm.V
        self.context = 1024
        self.precision = "fp32"
        self.weights_id = self.lm.info.get("weights_id")
        i = self.lm.info
        self.label = (f"Kneser-Ney {self.lm.order}-gram (interpolated, modified; "
                      f"{i.get('train_tokens', i.get('stream_tokens', 0)):,} training tokens of "
                      f"{i.get('source', '?')}, "
                      f"tokenizer {self.tok.name}); not GPT-2")

    def encode(self, text):
        return self.tok.encode(text)

    def vocab_hash(self):
        return vocab_ids_hash(self.tok.hf)

    def _histories(self, x):
        """Each position's BOS-padded n-1 token history, flattened: [B * L, n-1]."""
        return self.lm.histories(x.cpu(), self.bos_id).reshape(x.numel(), self.lm.order - 1)

    def target_nll(self, x, y):
        return -torch.log(self.lm.prob(self._histories(x), y.cpu().reshape(-1))).reshape(x.shape)

    def logits(self, x, mask):
        return torch.log(self.lm.distribution(self._histories(x))).reshape(*x.shape, self.lm.V)


def load_judge(path, device: str = "cpu", precision: str = "fp32") -> Judge:
    """A judge from a path: a tdlm run/checkpoint folder (family ar), an n-gram judge folder
    (``tdlm ngram``: :class:`tdlm.eval.ngram.NgramJudge`) or a local Hugging Face model folder
    (``config.json`` with a ``model_type``)."""
    if isinstance(path, Judge):
        return path
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"judge precision must be fp32 or bf16, got {precision!r}")
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"judge not found: {p} (a tdlm AR run/checkpoint folder or a local "
                          "Hugging Face model folder; nothing is downloaded)")
    from .ngram import is_ngram_folder
    if is_ngram_folder(p):
        return NgramJudge(str(p), device, precision)
    is_tdlm = (p / "manifest.json").exists() or (p / "checkpoints").is_dir() or \
        (p / "latest").is_file()
    if is_tdlm:
        return TdlmARJudge(str(p), device, precision)
    cfgf = p / "config.json"
    if cfgf.is_file():
        try:
            cfg = json.loads(cfgf.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            cfg = {}
        if isinstance(cfg, dict) and "model_type" in cfg:
            return HFJudge(str(p), device, precision)
    raise ConfigError(f"{p} is neither a tdlm checkpoint/run folder nor a Hugging Face model "
                      "folder (config.json with model_type)")


# ---- samples -------------------------------------------------------------------------------
def read_samples(path) -> tuple[list[dict], dict]:
    """Records of a samples JSONL (``text`` and/or ``ids``) and its ``.meta.json`` if any."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"samples file not found: {p}")
    recs = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"samples file {p} is not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"samples file {p} line {n} is not JSON") from None
        if isinstance(r, str):
            r = {"text": r}
        if not isinstance(r, dict) or not ("text" in r or "ids" in r):
            raise ConfigError(f"samples file {p} line {n}: expected an object with 'text' or 'ids'")
        recs.append(r)
    if not recs:
        raise ConfigError(f"samples file {p} holds no samples")
    meta = {}
    mp = p.with_suffix(".meta.json")
    if mp.is_file():
        try:
            meta = json.loads(mp.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            meta = {}
    return recs, meta


def unigram_entropy(ids: Sequence[int]) -> float:
    """``-sum_v p_v log p_v`` (nats) of the token frequencies of one sample (0 if empty)."""
    n = len(ids)
    if n == 0:
        return 0.0
    return -sum(c / n * math.log(c / n) for c in Counter(int(i) for i in ids).values())


def leading_eos(r: dict, eos: Optional[int] = None) -> int:
    """How many EOS/BOS tokens open a genppl record's generated part (past its ``prefix_len``
    clamped prefix): the sampler's start token (BOS = EOS in these tokenizers) or a document
    boundary, which the scorer treats as context (:func:`_scored`). Counted on the ids when
    ``eos`` (the ids' EOS id) is given; else as the leading ``<|endoftext|>`` markers of the
    generated text, which needs no tokenizer but needs the generated text located: with a
    clamped prefix, ``prefix_text`` must be the start of ``text`` (it is not when the prefix
    ends inside a multi-byte character), else 0 (not located: nothing is skipped); 0 for a
    record with neither ids and ``eos`` nor text."""
    k = int(r.get("prefix_len", 0) or 0)
    ids = r.get("ids")
    if eos is not None and ids is not None:
        return _lead([int(v) for v in list(ids)[k:]], eos)
    text = r.get("text")
    if text is None:
        return 0
    if k:
        pt = r.get("prefix_text")
        if not pt or not text.startswith(pt):
            return 0
        text = text[len(pt):]
    n = 0
    while text.startswith(EOT):
        text, n = text[len(EOT):], n + 1
    return n


def generated_ids(r: dict, eos: Optional[int] = None) -> Optional[list[int]]:
    """A genppl record's generated ids as the judge scores them: past its ``prefix_len``
    clamped prefix tokens and past its leading EOS/BOS tokens (:func:`leading_eos`). None for
    a record without ids."""
    ids = r.get("ids")
    if ids is None:
        return None
    k = int(r.get("prefix_len", 0) or 0)
    return [int(v) for v in list(ids)[k + leading_eos(r, eos):]]


def sample_entropy(r: dict, eos: Optional[int] = None) -> Optional[float]:
    """:func:`unigram_entropy` of a genppl record's generated ids (:func:`generated_ids`: past
    the clamped prefix and the leading EOS/BOS the scorer moves to the context) -- a
    sampler's start token is not text, and counting it would tilt a comparison between
    samplers that clamp one and samplers that do not, the more the shorter the samples. Every
    generated token after them counts, those after a first EOS too (which ``eos="first"``
    does not score). ``eos``: the ids' EOS id (counting on the ids; else on the text). No
    judge is needed. None for a record without ids (its entropy is that of the judge's
    retokenisation)."""
    g = generated_ids(r, eos)
    return None if g is None else unigram_entropy(g)


def _retokenise(text: str, judge: Judge) -> list[int]:
    out: list[int] = []
    for i, piece in enumerate(text.split(EOT)):
        if i:
            out.append(judge.eos_id)
        if piece:
            out += judge.encode(piece)
    return out


def _lead(seq: Sequence[int], eos: int) -> int:
    """How many ``eos`` tokens open ``seq``."""
    n = 0
    while n < len(seq) and seq[n] == eos:
        n += 1
    return n


def _scored(targets: list[int], eos: int, mode: str) -> tuple[list[int], list[bool], int]:
    """(targets kept, count mask, leading EOS tokens moved to the context). Leading EOS
    tokens (a sample that opens on a document boundary, or on the BOS its sampler starts
    from: BOS = EOS in these tokenizers) are context in every mode, not generated text."""
    lead = _lead(targets, eos)
    t = targets[lead:]
    if mode == "none":
        return t, [True] * len(t), lead
    if mode == "first":
        if eos in t:
            t = t[:t.index(eos) + 1]
        return t, [True] * len(t), lead
    first = t.index(eos) if eos in t else -1
    return t, [(v != eos) or (j == first) for j, v in enumerate(t)], lead


@torch.no_grad()
def _records(samples: Sequence) -> list[dict]:
    """Samples as records: a string -> ``{"text"}``, an id sequence -> ``{"ids"}``."""
    recs = []
    for s in samples:
        if isinstance(s, str):
            recs.append({"text": s})
        elif isinstance(s, dict):
            recs.append(s)
        else:
            recs.append({"ids": [int(v) for v in (s.tolist() if hasattr(s, "tolist") else s)]})
    if not recs:
        raise ConfigError("no samples to score")
    return recs


def _context_and_targets(i: int, r: dict, judge: Judge, retokenise: bool):
    """Judge-vocabulary context (the clamped prefix) and generated targets of record ``i``, and
    the unigram entropy of its generated ids (the sample's own tokens when it has them)."""
    k = int(r.get("prefix_len", 0) or 0)
    ids = r.get("ids")
    if retokenise:
        if "text" not in r:
            raise ConfigError(f"sample {i} has ids but no text, and its tokenizer is not the "
                              "judge's: cannot retokenise")
        if k and "prefix_text" in r:
            ctx = _retokenise(r["prefix_text"], judge)
            tgt = _retokenise(r["text"][len(r["prefix_text"]):]
                              if r["text"].startswith(r["prefix_text"]) else r["text"], judge)
        else:
            ctx, tgt = [], _retokenise(r["text"], judge)
    else:
        if ids is None:
            raise ConfigError(f"sample {i} has no ids")
        ctx, tgt = list(ids)[:k], list(ids)[k:]
    ent = (sample_entropy(r, None if retokenise else judge.eos_id) if ids is not None
           else unigram_entropy(tgt[_lead(tgt, judge.eos_id):]))
    bad = [v for v in ctx + tgt if not 0 <= v < judge.vocab_size]
    if bad:
        raise ConfigError(f"sample {i} holds token id {bad[0]}, outside the judge's "
                          f"vocabulary of {judge.vocab_size} (an unfilled [MASK]?)")
    return ctx, tgt, ent


def _windows(items: list, judge: Judge) -> list:
    """Windows of at most ``judge.context`` inputs over ``[BOS] + ctx + tgt`` (``ctx + tgt``
    when ``ctx`` already opens with BOS), each ``(item index, inputs, targets, count mask)``;
    windows that count no target are dropped."""
    windows = []
    C = judge.context
    for i, (ctx, tgt, cnt) in enumerate(items):
        if not tgt:
            continue
        # the judge's BOS opens the sequence unless the context already does (a sample that
        # starts from its BOS: one BOS, as the judge's training rows have it)
        lead = [] if ctx[:1] == [judge.bos_id] else [judge.bos_id]
        seq = lead + ctx + tgt
        counted = ([False] * len(ctx) + cnt)[1 - len(lead):]     # aligned with seq[1:]
        for a in range(0, len(seq) - 1, C):
            tg = seq[a + 1:a + C + 1]
            inp = seq[a:a + C][:len(tg)]
            cm = counted[a:a + len(tg)]
            if any(cm):
                windows.append((i, inp, tg, cm))
    return windows


@torch.no_grad()
def _score(windows: list, n_items: int, judge: Judge, batch_size: int,
           per_token: bool = False):
    """Summed NLL (nats) and counted tokens per item: windows batched by length, padded, one
    judge forward per batch, cross-entropy in the logits' dtype (float32 for a network)
    summed in float64 over the counted positions (no autograd graph: the judge only scores).
    ``per_token``: also each item's counted tokens' NLLs in order (a third list)."""
    nll = [0.0] * n_items
    ntok = [0] * n_items
    parts: list = [[] for _ in range(n_items)]      # (window index, NLLs of its counted targets)
    order = sorted(range(len(windows)), key=lambda j: len(windows[j][1]))
    dev = judge.device
    for b in range(0, len(order), batch_size):
        chunk = [windows[j] for j in order[b:b + batch_size]]
        Lm = max(len(w[1]) for w in chunk)
        x = torch.full((len(chunk), Lm), judge.eos_id, dtype=torch.long)
        y = torch.zeros((len(chunk), Lm), dtype=torch.long)
        m = torch.zeros((len(chunk), Lm), dtype=torch.bool)
        c = torch.zeros((len(chunk), Lm), dtype=torch.bool)
        for r, (_, inp, tg, cm) in enumerate(chunk):
            x[r, :len(inp)] = torch.tensor(inp)
            y[r, :len(tg)] = torch.tensor(tg)
            m[r, :len(inp)] = True
            c[r, :len(cm)] = torch.tensor(cm)
        ce = judge.target_nll(x.to(dev), y.to(dev))
        if ce is None:
            # log-softmax in the logits' own dtype: float32 for a network judge (within ~2e-6
            # nats of float64 per token and 5x faster on a CPU, where float64 took half of an
            # AR judge's scoring time), float64 for an n-gram's log-probabilities
            logits = judge.logits(x.to(dev), m.to(dev))
            ce = F.cross_entropy(logits.transpose(1, 2), y.to(dev), reduction="none")
        ce = torch.where(c.to(dev), ce.double(), 0.0).cpu()
        tot = ce.sum(-1)
        for r, (i, *_rest) in enumerate(chunk):
            nll[i] += float(tot[r])
            ntok[i] += int(c[r].sum())
            if per_token:
                parts[i].append((order[b + r], ce[r][c[r]].tolist()))
    if per_token:
        return nll, ntok, [[v for _, vals in sorted(p) for v in vals] for p in parts]
    return nll, ntok


def pooled_nll_se(nll: Sequence[float], ntok: Sequence[int]) -> float:
    """Standard error of the token-pooled NLL ``sum(nll) / sum(ntok)`` across samples (the
    ratio estimator's delta-method s.e., module docstring); samples without tokens are left
    out; NaN with fewer than 2 samples."""
    pairs = [(a, n) for a, n in zip(nll, ntok) if n > 0]
    m = len(pairs)
    if m < 2:
        return float("nan")
    r = sum(a for a, _ in pairs) / sum(n for _, n in pairs)
    mean_n = sum(n for _, n in pairs) / m
    return math.sqrt(sum((a - r * n) ** 2 for a, n in pairs) / (m * (m - 1))) / mean_n


def generative_perplexity(samples: Sequence, judge, eos: str = "first", batch_size: int = 8,
                          sample_vocab_hash: Optional[str] = None, retokenise: Optional[bool] = None,
                          device: str = "cpu", precision: str = "fp32",
                          per_token: bool = False) -> dict:
    """Token-pooled gen PPL of ``samples`` under ``judge`` (module docstring).

    ``samples``: records ``{"text", "ids", "prefix_len"}`` (as written by ``tdlm sample``;
    ``prefix_len`` = clamped prefix tokens, scored as context only), plain strings, or id lists
    (then the samples' tokenizer must be the judge's). Samples may have different lengths.
    ``sample_vocab_hash``: :func:`vocab_ids_hash` of the samples' tokenizer (retokenise when it
    differs from the judge's; unknown -> retokenise the text). ``judge``: a :class:`Judge` or a path.
    Returns gen_ppl (with its 95% interval), nll_per_token (with its s.e. across samples),
    tokens, entropy (mean, std), per-sample values, settings. ``per_token``: every per-sample
    entry also holds ``token_nll``, the NLLs of its scored tokens in order (position ``j`` =
    ``j``-th scored token of ``g_i``), for :func:`position_matched`."""
    if eos not in EOS_MODES:
        raise ConfigError(f"eos must be one of {', '.join(EOS_MODES)}, got {eos!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    judge = load_judge(judge, device, precision)
    recs = _records(samples)
    same = (sample_vocab_hash is not None and judge.vocab_hash() is not None
            and sample_vocab_hash == judge.vocab_hash())
    if retokenise is None:
        retokenise = not same
    items = []         # (context ids, targets, count mask)
    ents, moved = [], 0
    for i, r in enumerate(recs):
        ctx, tgt, ent = _context_and_targets(i, r, judge, retokenise)
        ents.append(ent)
        tgt, cnt, lead = _scored(tgt, judge.eos_id, eos)
        moved += lead
        items.append((ctx + [judge.eos_id] * lead, tgt, cnt))
    scored = _score(_windows(items, judge), len(items), judge, batch_size, per_token)
    nll, ntok = scored[:2]
    N = sum(ntok)
    per_tok = sum(nll) / N if N else float("nan")
    se = pooled_nll_se(nll, ntok)
    ent_t = torch.tensor(ents, dtype=torch.float64)
    return {"gen_ppl": math.exp(min(per_tok, 700)) if N else float("nan"),
            "gen_ppl_ci95": ([math.exp(min(per_tok + z * se, 700)) for z in (-1.96, 1.96)]
                             if math.isfinite(se) else None),
            "nll_per_token": per_tok, "nll_se_per_token": se,
            "tokens": N, "num_samples": len(recs),
            "samples_without_tokens": sum(1 for v in ntok if v == 0),
            "leading_eos_moved_to_context": moved,
            "entropy": float(ent_t.mean()),
            "entropy_std": float(ent_t.std()) if len(ents) > 1 else 0.0,
            "eos": eos, "retokenised": bool(retokenise), "judge": judge.info(),
            "precision": judge.precision,
            "per_sample": [{"nll": a, "tokens": t, "entropy": e,
                            **({"token_nll": scored[2][k]} if per_token else {})}
                           for k, (a, t, e) in enumerate(zip(nll, ntok, ents))]}


def position_matched(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                     rounds: int = 2000, seed: int = 0) -> dict:
    """Gen PPL of sample set ``a`` against set ``b`` with the length confound removed.

    ``a``, ``b``: per sample, the judge NLLs of its scored tokens in order
    (``generative_perplexity(..., per_token=True)``). A judge with a long context predicts a
    token better the more context precedes it, so token-pooled gen PPL favours the set with
    longer samples. With ``n_a(j)`` samples of ``a`` scoring a token at position ``j`` and
    ``m_b(j)`` the mean NLL of ``b``'s tokens at ``j``, ``b``'s NLL at ``a``'s positions is

        r_b|a = sum_j n_a(j) m_b(j) / sum_j n_a(j)      (over the positions j that both reach),

    and the position-matched ratio is ``exp(r_a - r_b|a)`` with ``r_a`` the pooled NLL of
    ``a`` on the same positions (1: equal at equal positions). Also the plain pooled ratio
    ``exp(r_a - r_b)``. 95% intervals: percentile bootstrap, ``rounds`` resamplings of the
    samples of each set independently (``seed``); a resampling that draws no scored token on a
    side has no ratio and is left out (``rounds_used`` counts the rest). ``covered``: share of ``a``'s tokens at positions ``b`` reaches."""
    def arrays(sets):
        L = max((len(x) for x in sets), default=0)
        v = torch.zeros(len(sets), L, dtype=torch.float64)
        m = torch.zeros(len(sets), L, dtype=torch.bool)
        for i, x in enumerate(sets):
            v[i, :len(x)] = torch.tensor(list(x), dtype=torch.float64)
            m[i, :len(x)] = True
        return v, m

    va, ma = arrays(a)
    vb, mb = arrays(b)
    if not ma.any() or not mb.any():
        raise ConfigError("position_matched needs scored tokens on both sides")
    L = min(va.shape[1], vb.shape[1])

    def stats(ia, ib):
        sa, na = (va[ia] * ma[ia]).sum(0), ma[ia].sum(0).double()
        sb, nb = (vb[ib] * mb[ib]).sum(0), mb[ib].sum(0).double()
        plain = sa.sum() / na.sum() - sb.sum() / nb.sum()
        both = (na[:L] > 0) & (nb[:L] > 0)
        w = torch.where(both, na[:L], 0.0)
        mb_j = torch.where(both, sb[:L] / nb[:L].clamp(min=1), 0.0)
        matched = sa[:L][both].sum() / w.sum() - (w * mb_j).sum() / w.sum()
        return float(plain), float(matched), float(w.sum() / na.sum())

    plain, matched, covered = stats(torch.arange(len(a)), torch.arange(len(b)))
    g = torch.Generator().manual_seed(seed)
    boot = torch.tensor([stats(torch.randint(0, len(a), (len(a),), generator=g),
                               torch.randint(0, len(b), (len(b),), generator=g))[:2]
                         for _ in range(rounds)], dtype=torch.float64)
    boot = boot[torch.isfinite(boot).all(1)]              # degenerate resamplings: no ratio
    if boot.shape[0] == 0:
        raise ConfigError("position_matched: every bootstrap resampling was degenerate")
    q = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    return {"ratio": math.exp(plain), "ratio_ci95": [math.exp(float(x)) for x in q[:, 0]],
            "matched_ratio": math.exp(matched),
            "matched_ratio_ci95": [math.exp(float(x)) for x in q[:, 1]],
            "covered": covered, "rounds": rounds, "rounds_used": int(boot.shape[0]),
            "seed": seed,
            "samples": [len(a), len(b)]}


def genppl_file(samples_path, judge, out: Optional[str] = None, eos: str = "first",
                batch_size: int = 8, device: str = "cpu", precision: str = "fp32") -> tuple[dict, Path]:
    """Score a samples JSONL written by ``tdlm sample`` and write the metrics JSON: to ``out``
    (a .json path, or a folder -> ``folder/metrics.json``), by default next to the samples
    (``metrics.json`` for ``samples.jsonl``, else ``<stem>.metrics.json``)."""
    from ..utils.io import atomic_write_text
    recs, meta = read_samples(samples_path)
    tokinfo = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    vhash = tokinfo.get("vocab_ids_hash")
    if vhash is None and meta.get("checkpoint"):
        vhash = _checkpoint_vocab_hash(meta["checkpoint"])
    res = generative_perplexity(recs, judge, eos=eos, batch_size=batch_size,
                                sample_vocab_hash=vhash, device=device, precision=precision)
    per_sample = res.pop("per_sample")
    sp = Path(samples_path)
    res.update({"samples": str(sp), "sampler": {k: meta.get(k) for k in (
        "family", "checkpoint", "checkpoints", "schedule", "temperature", "top_p", "gumbel",
        "seed", "seq_len", "prefix_len", "saved_blocks", "saved_full") if k in meta},
        "steps": meta.get("steps")})
    if out is None:
        dest = sp.parent / ("metrics.json" if sp.stem == "samples" else f"{sp.stem}.metrics.json")
    else:
        o = Path(out)
        dest = o if o.suffix == ".json" else o / "metrics.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, json.dumps(res, indent=2, sort_keys=True))
    res["per_sample"] = per_sample
    return res, dest


def _checkpoint_vocab_hash(path) -> Optional[str]:
    """:func:`vocab_ids_hash` of a checkpoint's tokenizer, without loading its weights."""
    try:
        from ..store.checkpoint import resolve_checkpoint
        p = resolve_checkpoint(path)
        tdir = p / "extra" / "tokenizer"
        if tdir.is_dir():
            from ..data.tokenizer import Tokenizer
            return vocab_ids_hash(Tokenizer.load(str(tdir)).hf)
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        if cfg.get("data", {}).get("tokenizer") == "gpt2":
            from ..data import get_tokenizer
            return vocab_ids_hash(get_tokenizer("gpt2").hf)
    except Exception:      # unknown tokenizer -> retokenise (always correct)
        return None
    return None
