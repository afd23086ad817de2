"""The vocabulary tree as integer arrays (spec §2).

A :class:`VocabTree` is an equal-depth rooted tree of height ``H`` whose leaves are the ``V``
tokens. Node numbering (fixed, relied on by the model):

* leaves are nodes ``0 .. V-1`` and node id == token id;
* internal nodes follow, grouped by increasing height (all height-1 nodes, then height-2, ...);
* the root is the last node, ``num_nodes - 1``, at height ``H``.

Arrays (numpy ``int64``):

* ``parent[n]``      parent node id, ``-1`` for the root;
* ``height[n]``      0 for leaves, ``H`` for the root; ``height[parent[n]] == height[n] + 1``;
* ``rank[n]``        position of ``n`` among its siblings, ``0 .. n_children[parent[n]] - 1``
                     (siblings are ranked by node id); head logit ``r`` = "child of rank r";
* ``n_children[n]``  number of children (0 for leaves, ``1..K`` for internal nodes);
* ``anc[h, x]``      the height-``h`` ancestor of token ``x``: ``anc[0] = arange(V)``,
                     ``anc[h] = parent[anc[h-1]]``, ``anc[H] = root``;
* ``children[n, r]`` the child of rank ``r`` (``-1`` padded to ``K`` columns). It is derived from
  ``parent``/``rank`` on first use and cached, because it costs ``num_nodes * K`` integers
  (206 MB for V=50,257, K=512; 20 GB for the one-level K=V tree). Code that only needs a child
  lookup can use the compact CSR form ``child_list[child_start[n] + r]`` instead.

So ``a_h(x) = anc[h, x]`` and the forward process of spec §3 moves a position from
``anc[h, x]`` to ``anc[h+1, x] = parent[anc[h, x]]``; the in-level target is ``rank[anc[h, x]]``
among the ``n_children[anc[h+1, x]]`` children of the current node.

Files: safetensors (default) or ``.npz``; the arrays plus a JSON header with ``V, K, H,
vocab_hash, meta``; written atomically (temporary file + ``os.replace``). ``load`` checks the
file, the structure (:meth:`VocabTree.validate`) and, when asked, the tokenizer's vocab hash.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..utils.io import atomic_write_bytes

FORMAT_NAME = "tdlm.vocab_tree"
FORMAT_VERSION = 1
ARRAY_NAMES = ("parent", "height", "rank", "n_children", "anc")
_BUFFER_NAMES = ("parent", "rank", "children", "n_children", "anc", "height")


def _invalid(msg: str) -> CheckpointError:
    return CheckpointError(f"invalid vocabulary tree: {msg}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


@dataclass(eq=False)
class VocabTree:
    """Equal-depth vocabulary tree of height ``H`` over ``V`` tokens, at most ``K`` children per
    node. See the module docstring for the numbering and the arrays. Build one with
    :func:`tdlm.tree.build_tree`, :meth:`from_assignment`, :meth:`from_token_labels` or
    :meth:`one_level`; check it with :meth:`validate`."""

    V: int
    K: int
    H: int
    parent: np.ndarray
    height: np.ndarray
    rank: np.ndarray
    n_children: np.ndarray
    anc: np.ndarray
    vocab_hash: str = ""
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    # ------------------------------------------------------------------ basic views
    @property
    def num_nodes(self) -> int:
        return int(self.parent.shape[0])

    @property
    def root(self) -> int:
        return self.num_nodes - 1

    def level_sizes(self) -> np.ndarray:
        """Number of nodes at each height, ``[H+1]`` (``[0]`` = V leaves, ``[H]`` = 1 root)."""
        return np.bincount(self.height, minlength=self.H + 1).astype(np.int64)

    def level_offsets(self) -> np.ndarray:
        """First node id of each height, ``[H+2]`` (last entry = num_nodes)."""
        return np.concatenate([[0], np.cumsum(self.level_sizes())]).astype(np.int64)

    def nodes_at_height(self, h: int) -> np.ndarray:
        """Node ids at height ``h`` (a contiguous range, by the numbering convention)."""
        if not 0 <= h <= self.H:
            raise ConfigError(f"invalid height {h}: must be in 0..{self.H}")
        off = self.level_offsets()
        return np.arange(off[h], off[h + 1], dtype=np.int64)

    @property
    def child_start(self) -> np.ndarray:
        """CSR offsets ``[num_nodes + 1]``: node n's children are
        ``child_list[child_start[n] : child_start[n+1]]`` in rank order."""
        if "child_start" not in self._cache:
            self._build_csr()
        return self._cache["child_start"]

    @property
    def child_list(self) -> np.ndarray:
        """All non-root nodes sorted by (parent, rank), ``[num_nodes - 1]``."""
        if "child_list" not in self._cache:
            self._build_csr()
        return self._cache["child_list"]

    def _build_csr(self) -> None:
        nr = np.arange(self.num_nodes - 1, dtype=np.int64)   # every node but the root
        order = np.lexsort((self.rank[nr], self.parent[nr]))
        self._cache["child_list"] = nr[order]
        self._cache["child_start"] = np.concatenate(
            [[0], np.cumsum(self.n_children)]).astype(np.int64)

    @property
    def children(self) -> np.ndarray:
        """``[num_nodes, K]`` child table, ``children[n, rank[c]] = c``, ``-1`` padded (cached)."""
        if "children" not in self._cache:
            ch = np.full((self.num_nodes, self.K), -1, dtype=np.int64)
            nr = np.arange(self.num_nodes - 1, dtype=np.int64)
            ch[self.parent[nr], self.rank[nr]] = nr
            self._cache["children"] = ch
        return self._cache["children"]

    def subtree_sizes(self) -> np.ndarray:
        """Number of leaves (tokens) under each node, ``[num_nodes]``."""
        return np.bincount(self.anc.reshape(-1), minlength=self.num_nodes).astype(np.int64)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_assignment(cls, level_parents: Sequence[np.ndarray], *, K: int | None = None,
                        vocab_hash: str = "", meta: dict | None = None) -> "VocabTree":
        """Tree from nested cluster assignments, one array per height.

        ``level_parents[h][i]`` (``h = 0 .. H-1``) is the local index, among height-``h+1``
        nodes, of the parent of the ``i``-th height-``h`` node; ``level_parents[0]`` has one
        entry per token (length V), ``level_parents[h]`` has ``max(level_parents[h-1]) + 1``
        entries, every local index must be used (no empty internal node), and the last array is
        all zeros (the root). Node ids follow the module's numbering; siblings are ranked by id.
        ``K`` defaults to the largest number of children.
        """
        H = len(level_parents)
        if H < 1:
            raise ConfigError("invalid tree: need at least one level (H >= 1)")
        lps = []
        sizes = [None] * (H + 1)
        for h, lp in enumerate(level_parents):
            a = np.asarray(lp)
            if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
                raise ConfigError(f"invalid tree: level_parents[{h}] must be a non-empty 1-D "
                                  f"integer array")
            a = a.astype(np.int64)
            if h == 0:
                sizes[0] = a.size
            elif a.size != sizes[h]:
                raise ConfigError(f"invalid tree: level_parents[{h}] has {a.size} entries, but "
                                  f"level {h - 1} uses {sizes[h]} parents")
            if a.min() < 0:
                raise ConfigError(f"invalid tree: level_parents[{h}] has negative entries")
            m = int(a.max()) + 1
            counts = np.bincount(a, minlength=m)
            if (counts == 0).any():
                raise ConfigError(f"invalid tree: height-{h + 1} node {int(np.argmin(counts))} "
                                  f"has no children")
            sizes[h + 1] = m
            lps.append(a)
        if sizes[H] != 1:
            raise ConfigError(f"invalid tree: the top level must map to a single root, got "
                              f"{sizes[H]} nodes")
        V = sizes[0]
        off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        N = int(off[-1])
        parent = np.empty(N, dtype=np.int64)
        for h in range(H):
            parent[off[h]:off[h + 1]] = off[h + 1] + lps[h]
        parent[N - 1] = -1
        height = np.repeat(np.arange(H + 1, dtype=np.int64), sizes)
        n_children = np.bincount(parent[:-1], minlength=N).astype(np.int64)
        kmax = int(n_children.max())
        if K is None:
            K = kmax
        elif kmax > K:
            raise ConfigError(f"invalid tree: a node has {kmax} children, more than K={K}")
        # rank among siblings, siblings ordered by node id: position inside the parent's group
        nr = np.arange(N - 1, dtype=np.int64)
        order = np.lexsort((nr, parent[nr]))            # by parent, then id
        start = np.concatenate([[0], np.cumsum(n_children)])[:-1]
        rank = np.zeros(N, dtype=np.int64)
        rank[order] = np.arange(N - 1) - start[parent[order]]
        anc = np.empty((H + 1, V), dtype=np.int64)
        anc[0] = np.arange(V)
        for h in range(1, H + 1):
            anc[h] = parent[anc[h - 1]]
        tree = cls(V=int(V), K=int(K), H=int(H), parent=parent, height=height, rank=rank,
                   n_children=n_children, anc=anc, vocab_hash=str(vocab_hash),
                   meta=dict(meta or {}))
        tree.validate()
        return tree

    @classmethod
    def from_token_labels(cls, labels: np.ndarray, *, K: int | None = None,
                          vocab_hash: str = "", meta: dict | None = None) -> "VocabTree":
        """Tree from per-token nested cluster labels laid out like ``anc``.

        ``labels[h, x]`` (shape ``[H+1, V]``) is any integer naming token ``x``'s height-``h``
        cluster; clusters must nest (tokens sharing a height-``h`` label share their height-
        ``h+1`` label). Row 0 must be ``arange(V)`` (leaves are tokens), row ``H`` constant (one
        root). Internal nodes of one height are numbered in increasing label order.
        """
        lab = np.asarray(labels)
        if lab.ndim != 2 or lab.shape[0] < 2 or lab.shape[1] < 1 \
                or not np.issubdtype(lab.dtype, np.integer):
            raise ConfigError("invalid tree: labels must be an integer array [H+1, V] with H >= 1")
        H, V = lab.shape[0] - 1, lab.shape[1]
        if not np.array_equal(lab[0], np.arange(V)):
            raise ConfigError("invalid tree: labels[0] must be arange(V) (leaves are tokens)")
        if (lab[H] != lab[H, 0]).any():
            raise ConfigError("invalid tree: labels[H] must be constant (a single root)")
        dense = [np.arange(V, dtype=np.int64)]
        for h in range(1, H + 1):
            dense.append(np.unique(lab[h], return_inverse=True)[1].reshape(-1).astype(np.int64))
        level_parents = []
        for h in range(H):
            m = int(dense[h].max()) + 1
            par = np.full(m, -1, dtype=np.int64)
            par[dense[h]] = dense[h + 1]
            if (par[dense[h]] != dense[h + 1]).any():
                raise ConfigError(f"invalid tree: height-{h} clusters are not nested in "
                                  f"height-{h + 1} clusters")
            level_parents.append(par)
        return cls.from_assignment(level_parents, K=K, vocab_hash=vocab_hash, meta=meta)

    @classmethod
    def one_level(cls, V: int, *, vocab_hash: str = "", meta: dict | None = None) -> "VocabTree":
        """H=1, K=V: the root's children are all V tokens (rank == token id). With the spec's
        absorbing-to-parent process this is exactly MDLM (root = [MASK])."""
        if int(V) < 1:
            raise ConfigError(f"invalid vocabulary size {V}: must be >= 1")
        m = {"method": "one_level"}
        m.update(meta or {})
        return cls.from_assignment([np.zeros(int(V), dtype=np.int64)], K=int(V),
                                   vocab_hash=vocab_hash, meta=m)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "VocabTree":
        """Check the structure; raise :class:`CheckpointError` naming the first problem.

        Checks: int64 arrays of consistent shapes; leaves 0..V-1 at height 0, heights
        non-decreasing with node id, a unique root (last node, height H, parent -1);
        ``height[parent[n]] = height[n] + 1`` (so every leaf is at depth H and the path
        root -> leaf is unique); ``n_children`` = number of nodes naming n as parent, 1..K for
        internal nodes; ranks of each node's children are exactly ``0..n_children-1``;
        ``anc[0] = arange(V)``, ``anc[h] = parent[anc[h-1]]``, ``anc[H] = root``.
        """
        V, K, H = self.V, self.K, self.H
        if not (isinstance(V, (int, np.integer)) and V >= 1 and K >= 1 and H >= 1):
            raise _invalid(f"V={V}, K={K}, H={H} must all be >= 1")
        arrs = {n: getattr(self, n) for n in ARRAY_NAMES}
        for n, a in arrs.items():
            if not isinstance(a, np.ndarray) or a.dtype != np.int64:
                raise _invalid(f"array '{n}' must be a numpy int64 array")
        N = self.parent.shape[0]
        for n in ("parent", "height", "rank", "n_children"):
            if arrs[n].shape != (N,):
                raise _invalid(f"array '{n}' has shape {arrs[n].shape}, expected ({N},)")
        if self.anc.shape != (H + 1, V):
            raise _invalid(f"array 'anc' has shape {self.anc.shape}, expected ({H + 1}, {V})")
        if N < V + 1:
            raise _invalid(f"{N} nodes cannot hold {V} leaves and a root")
        par, hgt = self.parent, self.height
        root = N - 1
        if (hgt[:V] != 0).any() or (hgt[V:] < 1).any():
            raise _invalid("nodes 0..V-1 must be the leaves (height 0) and only they")
        if (np.diff(hgt) < 0).any():
            raise _invalid("internal nodes are not numbered by increasing height")
        if hgt[root] != H or (hgt[:root] >= H).any():
            raise _invalid(f"the root must be the last node and the only one at height {H}")
        if par[root] != -1:
            raise _invalid("the root's parent must be -1")
        pr = par[:root]
        if pr.size and (pr.min() < 0 or pr.max() >= N):
            raise _invalid("a non-root node has no valid parent")
        if (hgt[pr] != hgt[:root] + 1).any():
            raise _invalid("a node's parent is not exactly one level above it")
        counts = np.bincount(pr, minlength=N)
        if not np.array_equal(counts, self.n_children):
            raise _invalid("n_children disagrees with parent")
        if (counts[V:] < 1).any():
            raise _invalid("an internal node has no children")
        if counts.max() > K:
            raise _invalid(f"a node has {int(counts.max())} children, more than K={K}")
        if self.rank[root] != 0:
            raise _invalid("the root's rank must be 0")
        nr = np.arange(root)
        order = np.lexsort((self.rank[nr], pr))
        start = np.concatenate([[0], np.cumsum(counts)])[:-1]
        expect = np.arange(root) - start[pr[order]]
        if not np.array_equal(self.rank[order], expect):
            raise _invalid("sibling ranks are not a permutation of 0..n_children-1")
        if not np.array_equal(self.anc[0], np.arange(V)):
            raise _invalid("anc[0] must be arange(V)")
        for h in range(1, H + 1):
            if not np.array_equal(self.anc[h], par[self.anc[h - 1]]):
                raise _invalid(f"anc[{h}] disagrees with parent")
        if (self.anc[H] != root).any():
            raise _invalid("not every token reaches the root in H steps")
        return self

    # ------------------------------------------------------------------ torch
    def torch_buffers(self, include_children: bool = True) -> dict:
        """The arrays as ``torch.long`` tensors for ``register_buffer``: ``parent, rank,
        children, n_children, anc, height`` plus the compact ``child_start, child_list``.
        ``include_children=False`` leaves out the ``[num_nodes, K]`` table (large for big K)."""
        import torch

        out = {}
        for n in _BUFFER_NAMES:
            if n == "children" and not include_children:
                continue
            out[n] = torch.from_numpy(np.ascontiguousarray(getattr(self, n), dtype=np.int64).copy())
        out["child_start"] = torch.from_numpy(self.child_start.copy())
        out["child_list"] = torch.from_numpy(self.child_list.copy())
        return out

    # ------------------------------------------------------------------ files
    def _header(self) -> dict:
        return {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "V": str(self.V),
                "K": str(self.K), "H": str(self.H), "vocab_hash": self.vocab_hash,
                "meta": json.dumps(self.meta, sort_keys=True, default=str)}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tree atomically: safetensors (any suffix but ``.npz``) or ``.npz``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {n: np.ascontiguousarray(getattr(self, n)) for n in ARRAY_NAMES}
        header = self._header()
        if path.suffix == ".npz":
            buf = io.BytesIO()
            np.savez(buf, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
                     **arrays)
            data = buf.getvalue()
        else:
            from safetensors.numpy import save as st_save
            data = st_save(arrays, metadata=header)
        atomic_write_bytes(path, data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike,
             expected_vocab_hash: str | None = None) -> "VocabTree":
        """Read a tree written by :meth:`save` and validate it. Raises
        :class:`CheckpointError` (one line) for a missing, truncated or invalid file, and when
        ``expected_vocab_hash`` is given and differs from the stored one."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"vocabulary tree file not found: {path}")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    header = json.loads(bytes(z["__header__"]).decode())
                    arrays = {n: z[n] for n in ARRAY_NAMES}
            else:
                from safetensors import safe_open
                with safe_open(str(path), framework="numpy") as f:
                    header = dict(f.metadata() or {})
                    arrays = {n: f.get_tensor(n) for n in ARRAY_NAMES}
        except Exception as exc:  # safetensors, zipfile, json, OSError...: all mean a bad file
            raise CheckpointError(f"cannot read vocabulary tree {path}: truncated or invalid "
                                  f"file ({_one_line(exc)})") from None
        if header.get("format") != FORMAT_NAME:
            raise CheckpointError(f"cannot read vocabulary tree {path}: not a {FORMAT_NAME} file")
        try:
            V, K, H = int(header["V"]), int(header["K"]), int(header["H"])
            meta = json.loads(header.get("meta") or "{}")
            stored_hash = str(header.get("vocab_hash", ""))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"cannot read vocabulary tree {path}: bad header "
                                  f"({_one_line(exc)})") from None
        if expected_vocab_hash is not None and stored_hash != expected_vocab_hash:
            raise CheckpointError(
                f"tree was built for another tokenizer (vocab hash {stored_hash or '<none>'} "
                f"!= {expected_vocab_hash or '<none>'})")
        for n, a in arrays.items():
            if not np.issubdtype(a.dtype, np.integer):
                raise CheckpointError(f"cannot read vocabulary tree {path}: array '{n}' is not "
                                      f"an integer array")
        tree = cls(V=V, K=K, H=H, vocab_hash=stored_hash, meta=meta,
                   **{n: np.array(a, dtype=np.int64) for n, a in arrays.items()})
        try:
            tree.validate()
        except CheckpointError as exc:
            raise CheckpointError(f"cannot read vocabulary tree {path}: {exc}") from None
        return tree

    def __repr__(self) -> str:
        sizes = ",".join(str(int(s)) for s in self.level_sizes())
        return (f"VocabTree(V={self.V}, K={self.K}, H={self.H}, level_sizes=[{sizes}], "
                f"vocab_hash={self.vocab_hash!r}, method={self.meta.get('method')!r})")
