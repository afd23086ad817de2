"""Summaries of a :class:`VocabTree` for ``tdlm tree show``: :func:`tree_stats` (JSON-ready
numbers) and :func:`describe_tree` (the same numbers as text, plus sample clusters)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .tree import VocabTree


def _summary(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64)
    q = np.percentile(x, [0, 10, 50, 90, 100])
    return {"mean": round(float(x.mean()), 3), "min": int(q[0]), "p10": float(q[1]),
            "p50": float(q[2]), "p90": float(q[3]), "max": int(q[4])}


def _hist(x: np.ndarray, bins: int = 8) -> list:
    """``[[lo, hi, count], ...]`` over integer-valued ``x`` (closed integer bins)."""
    x = np.asarray(x, dtype=np.int64)
    lo, hi = int(x.min()), int(x.max())
    edges = np.unique(np.linspace(lo, hi + 1, min(bins, hi - lo + 1) + 1).astype(np.int64))
    cnt, _ = np.histogram(x, bins=edges)
    return [[int(a), int(b) - 1, int(c)] for a, b, c in zip(edges[:-1], edges[1:], cnt)]


def tree_stats(tree: VocabTree) -> dict:
    """Shape and balance of a tree, JSON-serialisable.

    Per height ``h >= 1``: number of nodes; children per node (mean/min/max and as a fraction
    of K: ``fill``); tokens under each node (cluster sizes: mean, min, p10, p50, p90, max and
    an 8-bin histogram). ``leaf_slot_fill`` = V / (K * #height-1 nodes)."""
    sizes = tree.level_sizes()
    sub = tree.subtree_sizes()
    levels = []
    for h in range(1, tree.H + 1):
        nodes = tree.nodes_at_height(h)
        nc = tree.n_children[nodes]
        levels.append({
            "height": h, "nodes": int(nodes.size),
            "children": {"mean": round(float(nc.mean()), 3), "min": int(nc.min()),
                         "max": int(nc.max())},
            "fill": {"mean": round(float(nc.mean()) / tree.K, 4),
                     "min": round(int(nc.min()) / tree.K, 4),
                     "max": round(int(nc.max()) / tree.K, 4)},
            "tokens": _summary(sub[nodes]),
            "tokens_hist": _hist(sub[nodes]),
        })
    return {"V": int(tree.V), "K": int(tree.K), "H": int(tree.H),
            "num_nodes": int(tree.num_nodes), "level_sizes": [int(s) for s in sizes],
            "leaf_slot_fill": round(tree.V / (tree.K * int(sizes[1])), 4),
            "vocab_hash": tree.vocab_hash,
            "method": tree.meta.get("method"), "seed": tree.meta.get("seed"),
            "embedding_source": tree.meta.get("embedding_source"),
            "levels": levels}


def describe_tree(tree: VocabTree, decode: Callable[[list[int]], str] | None = None,
                  n_samples: int = 5, seed: int = 0, max_tokens: int = 24) -> str:
    """Human-readable report: header, one line per height (nodes, children per node, fill of
    K, cluster-size percentiles and histogram) and ``n_samples`` random height-1 clusters with
    their tokens (``decode([id])`` per token when given, else ids)."""
    st = tree_stats(tree)
    lines = [f"vocabulary tree: V={st['V']} K={st['K']} H={st['H']} nodes={st['num_nodes']} "
             f"method={st['method']} seed={st['seed']} source={st['embedding_source']} "
             f"vocab_hash={st['vocab_hash'] or '<none>'}",
             f"nodes per height (0..H): {st['level_sizes']}; leaf slots used: "
             f"{100 * st['leaf_slot_fill']:.1f}%",
             "height  nodes  children mean [min, max]  fill of K mean [min, max]  "
             "tokens/node mean p10/p50/p90 [min, max]"]
    for lv in reversed(st["levels"]):
        c, f, t = lv["children"], lv["fill"], lv["tokens"]
        lines.append(f"{lv['height']:>6}  {lv['nodes']:>5}  "
                     f"{c['mean']:>8.1f} [{c['min']}, {c['max']}]"
                     f"  {100 * f['mean']:>8.1f}% [{100 * f['min']:.1f}%, {100 * f['max']:.1f}%]"
                     f"  {t['mean']:.1f} {t['p10']:g}/{t['p50']:g}/{t['p90']:g} "
                     f"[{t['min']}, {t['max']}]")
    for lv in reversed(st["levels"]):
        hist = ", ".join(f"{a}-{b}:{n}" if a != b else f"{a}:{n}"
                         for a, b, n in lv["tokens_hist"] if n)
        lines.append(f"cluster sizes at height {lv['height']} (tokens: nodes): {hist}")
    h1 = tree.nodes_at_height(1)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(h1, size=min(int(n_samples), h1.size), replace=False))
    if pick.size:
        lines.append(f"sample height-1 clusters ({pick.size} of {h1.size}):")
    for node in pick:
        toks = tree.child_list[tree.child_start[node]: tree.child_start[node + 1]]
        shown = toks[:max_tokens]
        if decode is not None:
            words = [repr(decode([int(t)])) for t in shown]
        else:
            words = [str(int(t)) for t in shown]
        more = f" ... (+{toks.size - shown.size})" if toks.size > shown.size else ""
        lines.append(f"  node {int(node)} ({toks.size} tokens): {' '.join(words)}{more}")
    return "\n".join(lines)
