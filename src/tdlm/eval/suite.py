"""Likelihood of one checkpoint on several held-out collections (``tdlm eval --dataset`` /
``--suite``), e.g. MDLM's zero-shot table (``tdlm.data.eval_sets``).

Every collection goes the way the checkpoint's validation split goes: its documents are
tokenised with the checkpoint's tokenizer (token cache in ``data.cache_dir``), laid out as the
model was trained (``data.layout``, ``data.seq_len``) and evaluated by
:func:`tdlm.eval.nelbo.evaluate_nelbo` with the same seed rule (``batches`` batches, 0: all).
Written to the output folder: ``metrics.json`` (the checkpoint's description and one row per
collection: NELBO per token, perplexity bound, bits, tokens, standard error, parts, where the
text came from and how it was preprocessed) and ``table.md`` (one line per collection).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError
from ..store.checkpoint import run_dir_of
from ..utils.io import atomic_write_json, atomic_write_text
from .nelbo import evaluate_nelbo


def evaluate_sets(pipe, sources, batches: int = 0, seed: int = 0, repeats: int = 1,
                  log=None) -> list[dict]:
    """One row per :class:`tdlm.data.eval_sets.EvalSource` for the loaded ``pipe``."""
    from ..data.cache import build_or_load_cache
    from ..data.layouts import layout_dataset
    from ..train.parallel import derive_micro
    cfg, tok = pipe.cfg, pipe.tokenizer
    micro, _ = derive_micro(cfg.train.global_batch, cfg.train.micro_batch, 1)
    rows = []
    for src in sources:
        docs, info = src.load()
        cache = build_or_load_cache(docs, tok, cfg.data.cache_path,
                                    {"source": info["source"], "split": "eval-set",
                                     "preprocessing": info["preprocessing"]})
        ds = layout_dataset(cfg.data, cache, tok)
        if len(ds) == 0:
            raise DataError(f"dataset {src.label!r} has {cache.n_tokens} tokens, fewer than "
                            f"one block of seq_len={cfg.data.seq_len}")
        res = evaluate_nelbo(pipe.family, pipe.model, ds, batch_size=micro,
                             max_batches=batches, seed=seed, repeats=repeats)
        rows.append({"dataset": src.label,
                     "title": src.known.title if src.known is not None else src.label,
                     **info, "documents": len(docs), **res})
        if log is not None:
            log(f"{src.label}: NELBO/token {res['nelbo_per_token']:.4f}  "
                f"ppl <= {res['ppl_bound']:.2f}  ({res['tokens']} tokens)")
    return rows


def markdown_table(meta: dict, rows: Sequence[dict]) -> str:
    """The rows as a markdown table (perplexity bound as MDLM reports it, with the NELBO,
    its standard error and the tokens counted), and a line saying what was evaluated."""
    bound = "PPL" if rows and rows[0].get("bound") == "exact NLL" else "PPL (≤)"
    lines = [f"| dataset | split | {bound} | NELBO/token | ± s.e. | tokens |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        se = r.get("stderr_per_token")
        lines.append(f"| {r['title']} | {r.get('split') or '-'} | {r['ppl_bound']:.2f} | "
                     f"{r['nelbo_per_token']:.4f} | {'-' if se is None else f'{se:.4f}'} | "
                     f"{r['tokens']} |")
    lines.append("")
    lines.append(f"{meta['family']} checkpoint `{meta['checkpoint']}` (step {meta['step']}, "
                 f"{meta['weights']} weights), layout {meta['data_layout']}, seq_len "
                 f"{meta['seq_len']}, tokenizer {meta['tokenizer']}; "
                 f"{rows[0]['bound'] if rows else ''}; seed {meta['seed']}, "
                 f"{'all' if not meta['batches'] else meta['batches']} batches.")
    return "\n".join(lines) + "\n"


def evaluate_sets_to_files(ckpt_path: str, datasets: Sequence[str] = (),
                           suite: Optional[str] = None, data_root: Optional[str] = None,
                           batches: int = 0, seed: int = 0, repeats: int = 1,
                           out: Optional[str] = None, use_ema: bool = True,
                           log=None) -> tuple[dict, Path]:
    """Evaluate a checkpoint on ``suite`` and/or ``datasets`` (``NAME``, ``NAME=SOURCE`` or
    a source; ``tdlm.data.eval_sets.resolve_eval_sets``) and write ``metrics.json`` and
    ``table.md`` (default folder ``<run>/eval/<suite or "datasets">``). Returns (metrics,
    folder); ``metrics["datasets"]`` holds one row per collection."""
    from ..data.eval_sets import resolve_eval_sets
    from ..errors import ConfigError
    from ..pipeline import load
    if batches < 0:
        raise ConfigError(f"--batches must be >= 0 (0: every batch), got {batches}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    sources = resolve_eval_sets(datasets, suite, data_root)     # errors before loading
    pipe = load(ckpt_path, use_ema=use_ema)
    cfg = pipe.cfg
    meta = {"checkpoint": str(pipe.checkpoint.path), "family": cfg.family.name,
            "step": pipe.checkpoint.trainer.get("step"), "weights": pipe.weights,
            "data_layout": cfg.data.layout, "seq_len": cfg.data.seq_len,
            "tokenizer": cfg.data.tokenizer, "suite": suite, "seed": seed,
            "repeats": repeats, "batches": batches}
    rows = evaluate_sets(pipe, sources, batches, seed, repeats, log)
    res = {**meta, "datasets": rows}
    out_dir = Path(out) if out else run_dir_of(pipe.checkpoint.path) / "eval" / (suite or "datasets")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", res)
    atomic_write_text(out_dir / "table.md", markdown_table(meta, rows))
    return res, out_dir
