"""Sequence-length histograms: ``<prefix>.json`` (counts per length bucket and summary
statistics) and ``<prefix>.png`` (matplotlib, Agg backend).

Used for the variable-length data (``length_histogram.*`` in a run folder, train and val items
after capping) and for the lengths a variable-length sampler generates.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..utils.io import atomic_write, atomic_write_json

Lengths = Union[Sequence[int], np.ndarray]


def length_stats(lengths: Lengths, cap: Optional[int] = None) -> dict:
    """n, mean, median, p10/p90/p99, min, max (and, with ``cap``, how many are at the cap)."""
    a = np.asarray(lengths, dtype=np.int64).ravel()
    if a.size == 0:
        out = {"n": 0, "mean": None, "median": None, "p10": None, "p90": None, "p99": None,
               "min": None, "max": None, "total": 0}
    else:
        p10, med, p90, p99 = np.percentile(a, [10, 50, 90, 99])
        out = {"n": int(a.size), "mean": float(a.mean()), "median": float(med),
               "p10": float(p10), "p90": float(p90), "p99": float(p99),
               "min": int(a.min()), "max": int(a.max()), "total": int(a.sum())}
    if cap is not None:
        out["cap"] = int(cap)
        out["at_cap"] = int((a >= cap).sum()) if a.size else 0
    return out


def _bucket_width(max_len: int, n_buckets: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... giving at most ``n_buckets`` buckets."""
    raw = max(1, math.ceil((max_len + 1) / n_buckets))
    mag = 1
    while True:
        for m in (1, 2, 5):
            if m * mag >= raw:
                return m * mag
        mag *= 10


def length_histogram(splits: Mapping[str, Lengths], n_buckets: int = 40,
                     cap: Optional[int] = None) -> dict:
    """Counts per length bucket ``[edges[i], edges[i+1])`` with shared edges across splits."""
    arrays = {k: np.asarray(v, dtype=np.int64).ravel() for k, v in splits.items()}
    max_len = max([int(a.max()) for a in arrays.values() if a.size] + [cap or 0, 1])
    width = _bucket_width(max_len, n_buckets)
    n_b = max_len // width + 1
    edges = [i * width for i in range(n_b + 1)]
    out = {"bucket_width": width, "edges": edges, "splits": {}}
    for k, a in arrays.items():
        counts = np.bincount(a // width, minlength=n_b)[:n_b] if a.size else np.zeros(n_b, int)
        out["splits"][k] = {**length_stats(a, cap), "counts": [int(c) for c in counts]}
    return out


def write_length_histogram(lengths: Union[Lengths, Mapping[str, Lengths]], path_prefix: str,
                           title: str, cap: Optional[int] = None, n_buckets: int = 40,
                           extra: Optional[dict] = None) -> tuple[str, str]:
    """Write ``<path_prefix>.json`` and ``<path_prefix>.png``; returns both paths.

    ``lengths``: one sequence of lengths, or a mapping split name -> lengths (e.g.
    ``{"train": ..., "val": ...}``); a single sequence is stored under the name ``"all"``.
    ``cap``: the maximum length (drawn as a line; ``at_cap`` counts the capped items).
    ``extra``: more JSON fields (e.g. the source, the sampler's settings)."""
    if isinstance(lengths, Mapping):
        splits = dict(lengths)
    else:
        splits = {"all": lengths}
    hist = length_histogram(splits, n_buckets=n_buckets, cap=cap)
    doc = {"title": title, "unit": "tokens", **(extra or {}), **hist}
    d = os.path.dirname(os.path.abspath(path_prefix))
    os.makedirs(d, exist_ok=True)
    json_path, png_path = path_prefix + ".json", path_prefix + ".png"
    atomic_write_json(json_path, doc, sort_keys=False)
    _plot(hist, png_path, title, cap)
    return json_path, png_path


def _plot(hist: dict, path: str, title: str, cap: Optional[int]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    edges = np.asarray(hist["edges"], dtype=float)
    width = float(hist["bucket_width"])
    names = list(hist["splits"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for j, name in enumerate(names):
        s = hist["splits"][name]
        counts = np.asarray(s["counts"], dtype=float)
        frac = counts / max(counts.sum(), 1.0)
        w = width / max(len(names), 1)
        label = name if s["n"] == 0 else (f"{name} (n={s['n']}, mean {s['mean']:.1f}, "
                                          f"median {s['median']:.0f}, max {s['max']})")
        ax.bar(edges[:-1] + j * w, frac, width=w, align="edge", alpha=0.8, label=label)
    if cap is not None:
        ax.axvline(cap, color="k", ls="--", lw=1, label=f"cap {cap}")
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("fraction of sequences")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
