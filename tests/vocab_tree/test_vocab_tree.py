"""Vocabulary tree (spec §2): structure, construction, embedding sources, files, summaries."""
import json
import time

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tdlm.errors import CheckpointError, ConfigError, DataError, TdlmError
from tdlm.tree import (VocabTree, build_frequency_tree, build_tree, corpus_embeddings,
                       describe_tree, frequency_embeddings, from_checkpoint_embeddings,
                       plan_groups, random_embeddings, token_counts, tree_stats)
from tdlm.tree import build as build_mod


# ----------------------------------------------------------------------------- helpers
def check_structure(tree: VocabTree, V: int, K: int, H: int) -> None:
    """Independent re-check of every structural promise (not only ``validate``)."""
    tree.validate()
    assert (tree.V, tree.K, tree.H) == (V, K, H)
    N = tree.num_nodes
    for name in ("parent", "height", "rank", "n_children", "anc"):
        assert getattr(tree, name).dtype == np.int64
    # numbering: leaves 0..V-1, internal nodes by increasing height, root last
    assert (tree.height[:V] == 0).all() and (tree.height[V:] > 0).all()
    assert (np.diff(tree.height) >= 0).all()
    assert tree.parent[N - 1] == -1 and tree.height[N - 1] == H
    assert tree.level_sizes().sum() == N and tree.level_sizes()[0] == V
    assert tree.level_sizes()[H] == 1
    # every token: exactly one root-to-leaf path of length H, consistent with parent
    node = np.arange(V)
    for h in range(1, H + 1):
        node = tree.parent[node]
        assert np.array_equal(tree.anc[h], node)
        assert (tree.height[node] == h).all()
    assert (node == N - 1).all()
    # no node with more than K children, internal nodes have at least one
    nc = np.bincount(tree.parent[:-1], minlength=N)
    assert np.array_equal(nc, tree.n_children)
    assert nc.max() <= K and (nc[V:] >= 1).all() and (nc[:V] == 0).all()
    # children table and CSR agree with parent/rank
    ch = tree.children
    assert ch.shape == (N, K)
    c = np.arange(N - 1)
    assert np.array_equal(ch[tree.parent[c], tree.rank[c]], c)
    assert ((ch >= 0).sum(1) == nc).all()
    assert (ch[np.arange(K)[None, :] >= nc[:, None]] == -1).all()
    for n in tree.nodes_at_height(min(1, H))[:5]:
        lst = tree.child_list[tree.child_start[n]:tree.child_start[n + 1]]
        assert np.array_equal(lst, ch[n, :nc[n]])
    # every node's subtree is non-empty; subtree sizes add up
    sub = tree.subtree_sizes()
    assert (sub >= 1).all() and sub[N - 1] == V


def blobs(sizes, d=16, noise=0.01, seed=0):
    """Well-separated blobs (random directions) with shuffled token ids; returns X, labels."""
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.standard_normal((d, d)))[0][: len(sizes)] * 5.0
    lab = np.repeat(np.arange(len(sizes)), sizes)
    perm = rng.permutation(lab.size)
    lab = lab[perm]
    X = centers[lab] + noise * rng.standard_normal((lab.size, d))
    return X.astype(np.float32), lab


def height1_groups(tree):
    """Set of frozensets of tokens under each height-1 node."""
    return {frozenset(np.flatnonzero(tree.anc[1] == n).tolist()) for n in tree.nodes_at_height(1)}


def label_groups(lab):
    return {frozenset(np.flatnonzero(lab == k).tolist()) for k in np.unique(lab)}


# ----------------------------------------------------------------------------- structure
CASES = [(V, K, H) for V in (1, 2, 7, 100, 1000) for K in (2, 3, 10, 32) for H in (1, 2, 3)
         if K ** H >= V and (H > 1 or K >= V)]


@pytest.mark.parametrize("V,K,H", CASES)
def test_build_tree_structure(V, K, H):
    X = random_embeddings(V, 8, seed=V + K + H)
    tree = build_tree(X, K, H, seed=1, vocab_hash="abc", meta={"embedding_source": "random"})
    check_structure(tree, V, K, H)
    assert tree.vocab_hash == "abc" and tree.meta["embedding_source"] == "random"
    assert tree.meta["method"] == "balanced_kmeans"
    json.dumps(tree.meta)


@pytest.mark.parametrize("V,K,H", [(64, 8, 2), (64, 4, 3), (27, 3, 3), (1000, 10, 3), (16, 16, 1)])
def test_tight_capacity(V, K, H):
    assert V == K ** H
    tree = build_tree(random_embeddings(V, 8, seed=3), K, H, seed=0)
    check_structure(tree, V, K, H)
    assert (tree.n_children[V:] == K).all()          # a full K-ary tree is the only option
    assert list(tree.level_sizes()) == [K ** (H - h) for h in range(H + 1)]


def test_deep_binary_tree_batched_levels():
    V, K, H = 1000, 2, 10                       # levels with > 64 nodes use the gather path
    tree = build_tree(random_embeddings(V, 8, 0), K, H, seed=0)
    check_structure(tree, V, K, H)


def test_loop_and_gather_distances_agree(monkeypatch):
    rng = np.random.default_rng(0)
    sizes = np.array([30, 50, 20])
    g, lo, hi = plan_groups(sizes, 2, 8)
    X = build_mod.normalise_rows(rng.standard_normal((sizes.sum(), 6)))
    seg = np.repeat(np.arange(3), sizes)
    lv = build_mod._Level(X, seg, sizes, g, lo, hi)
    C = lv.kmeanspp(np.random.default_rng(1))
    D_loop = lv.distances(C)
    lv.loop = False
    D_gather = lv.distances(C)
    assert np.array_equal(np.isinf(D_loop), np.isinf(D_gather))
    fin = np.isfinite(D_loop)
    np.testing.assert_allclose(D_loop[fin], D_gather[fin], atol=1e-5)


def test_seed_determinism():
    X = random_embeddings(250, 16, seed=0)
    a = build_tree(X, 16, 2, seed=5)
    b = build_tree(X, 16, 2, seed=5)
    c = build_tree(X, 16, 2, seed=6)
    for n in ("parent", "rank", "anc", "height", "n_children"):
        assert np.array_equal(getattr(a, n), getattr(b, n))
    assert height1_groups(a) == height1_groups(b)
    assert height1_groups(a) != height1_groups(c)


def test_one_level_is_mdlm_shape():
    tree = VocabTree.one_level(7, vocab_hash="h")
    check_structure(tree, 7, 7, 1)
    assert tree.num_nodes == 8 and tree.root == 7
    assert np.array_equal(tree.rank[:7], np.arange(7))
    assert np.array_equal(tree.children[7], np.arange(7))
    assert np.array_equal(tree.anc, np.stack([np.arange(7), np.full(7, 7)]))
    b = tree.torch_buffers()
    assert set(b) >= {"parent", "rank", "children", "n_children", "anc", "height",
                      "child_start", "child_list"}
    assert all(t.dtype == torch.long for t in b.values())
    assert "children" not in tree.torch_buffers(include_children=False)
    # the one-level GPT-2 tree must not allocate the [num_nodes, V] table unless asked
    big = VocabTree.one_level(50257)
    assert big.K == 50257 and "children" not in big._cache
    assert big.child_list.shape == (50257,)


def test_from_assignment_and_labels():
    # tokens 0..5 -> height-1 nodes [0,0,1,1,2,2] -> height-2 nodes [0,0,1] -> root
    t = VocabTree.from_assignment([np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 1]),
                                   np.array([0, 0])])
    check_structure(t, 6, 2, 3)
    assert list(t.level_sizes()) == [6, 3, 2, 1]
    labels = t.anc * 10 + 3                   # any labels with the same nesting
    labels[0] = np.arange(6)
    t2 = VocabTree.from_token_labels(labels)
    assert np.array_equal(t2.parent, t.parent) and np.array_equal(t2.rank, t.rank)
    with pytest.raises(ConfigError, match="no children"):
        VocabTree.from_assignment([np.array([0, 2]), np.array([0, 0, 0])])
    with pytest.raises(ConfigError, match="single root"):
        VocabTree.from_assignment([np.array([0, 1])])
    with pytest.raises(ConfigError, match="more than K"):
        VocabTree.from_assignment([np.zeros(5, dtype=int)], K=4)
    bad = np.array([np.arange(4), [0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(ConfigError, match="not nested"):
        VocabTree.from_token_labels(bad)


def test_validate_catches_corruption():
    tree = build_tree(random_embeddings(50, 4, 0), 8, 2, seed=0)
    for mutate, msg in [
        (lambda t: t.parent.__setitem__(3, t.root), "one level above"),
        (lambda t: t.rank.__setitem__(0, 99), "ranks"),
        (lambda t: t.anc.__setitem__((1, 0), t.anc[1, 0] + 1 if t.anc[1, 0] + 1 < t.root
                                     else t.anc[1, 0] - 1), "anc"),
        (lambda t: t.n_children.__setitem__(t.root, 0), "n_children"),
    ]:
        t = VocabTree(V=tree.V, K=tree.K, H=tree.H, parent=tree.parent.copy(),
                      height=tree.height.copy(), rank=tree.rank.copy(),
                      n_children=tree.n_children.copy(), anc=tree.anc.copy())
        mutate(t)
        with pytest.raises(CheckpointError, match=msg):
            t.validate()
    t = VocabTree(V=tree.V, K=2, H=tree.H, parent=tree.parent, height=tree.height,
                  rank=tree.rank, n_children=tree.n_children, anc=tree.anc)
    with pytest.raises(CheckpointError, match="more than K=2"):
        t.validate()


def test_invalid_inputs():
    X = random_embeddings(100, 4, 0)
    with pytest.raises(ConfigError, match="K\\^H"):
        build_tree(X, 9, 2)
    with pytest.raises(ConfigError, match="K\\^H"):
        build_tree(X, 50, 1)
    with pytest.raises(ConfigError, match="leaf_capacity_ratio"):
        build_tree(X, 16, 2, leaf_capacity_ratio=1.5)
    with pytest.raises(ConfigError, match="max_size_ratio"):
        build_tree(X, 16, 2, max_size_ratio=0.5)
    X[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        build_tree(X, 16, 2)
    with pytest.raises(DataError):
        build_tree(np.zeros(5), 4, 2)
    with pytest.raises(TdlmError):
        build_frequency_tree(np.ones(100), 9, 2)


# ----------------------------------------------------------------------------- clustering
def test_recovers_blobs_tight():
    X, lab = blobs([8] * 8)
    tree = build_tree(X, 8, 2, seed=0)
    assert height1_groups(tree) == label_groups(lab)


def test_recovers_uneven_blobs_with_headroom():
    sizes = [4, 6, 8, 10, 12, 8, 9, 7]         # 64 tokens; r=0.5 -> 8 groups, cap 16 each
    X, lab = blobs(sizes, seed=1)
    tree = build_tree(X, 16, 2, seed=0, leaf_capacity_ratio=0.5)
    assert tree.level_sizes()[1] == 8
    assert height1_groups(tree) == label_groups(lab)


def test_recovers_nested_blobs_three_levels():
    rng = np.random.default_rng(2)
    d = 32
    sup = np.linalg.qr(rng.standard_normal((d, d)))[0][:4] * 10
    sub = sup[:, None, :] + 0.5 * rng.standard_normal((4, 4, d))   # 4 x 4 sub-blobs
    lab_sub = np.repeat(np.arange(16), 4)
    perm = rng.permutation(64)
    lab_sub = lab_sub[perm]
    X = sub.reshape(16, d)[lab_sub] + 0.01 * rng.standard_normal((64, d))
    tree = build_tree(X.astype(np.float32), 4, 3, seed=0)
    check_structure(tree, 64, 4, 3)
    assert height1_groups(tree) == label_groups(lab_sub)
    h2 = {frozenset(np.flatnonzero(tree.anc[2] == n).tolist()) for n in tree.nodes_at_height(2)}
    assert h2 == label_groups(lab_sub // 4)


def test_size_bounds_respected():
    X = random_embeddings(500, 8, 1)
    X[:300] = X[0] + 1e-3 * X[:300]            # a dense region that would grab most tokens
    for lo_r, hi_r in ((0.9, 1.1), (0.1, 5.0)):
        tree = build_tree(X, 64, 2, seed=0, leaf_capacity_ratio=0.25, min_size_ratio=lo_r,
                          max_size_ratio=hi_r)
        g, lo, hi = plan_groups(np.array([500]), 2, 64, 0.25, lo_r, hi_r)
        sizes = tree.n_children[tree.nodes_at_height(1)]
        assert sizes.size == g[0] and sizes.min() >= lo[0] and sizes.max() <= hi[0]


def test_plan_groups():
    g, lo, hi = plan_groups(np.array([50257]), 2, 225)
    assert (g[0], hi[0]) == (224, 225) and g[0] * hi[0] >= 50257
    g, lo, hi = plan_groups(np.array([50257]), 2, 512, leaf_capacity_ratio=0.2)
    assert g[0] == 491 and hi[0] == 511 and lo[0] == 10     # 5 x mean 102.4
    g, lo, hi = plan_groups(np.array([50257]), 16, 2)   # binary tree of height 16: 2 groups
    assert g[0] == 2 and hi[0] == 2 ** 15


def test_auction_is_optimal():
    rng = np.random.default_rng(0)
    for n, g, c in ((120, 5, 24), (200, 7, 30), (90, 3, 31)):
        D = (rng.random((n, g)) * rng.random(g) * 3).astype(np.float32)
        cap = np.full(g, c)
        local, _ = build_mod.auction_assign(D, np.zeros(n, dtype=np.int64), cap, [0.1, 1e-5])
        assert np.bincount(local, minlength=g).max() <= c
        big = np.repeat(D.astype(np.float64), c, axis=1)
        r, cc = linear_sum_assignment(big)
        got = D[np.arange(n), local].astype(np.float64).sum()
        assert got <= big[r, cc].sum() + n * 1e-5 + 1e-6


# ----------------------------------------------------------------------------- files
@pytest.mark.parametrize("name", ["tree.safetensors", "tree.npz"])
def test_save_load_roundtrip(tmp_path, name):
    tree = build_tree(random_embeddings(120, 8, 0), 12, 2, seed=3, vocab_hash="v1",
                      meta={"embedding_source": "random"})
    path = tree.save(tmp_path / "sub" / name)
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    back = VocabTree.load(path, expected_vocab_hash="v1")
    for n in ("parent", "height", "rank", "n_children", "anc"):
        assert np.array_equal(getattr(back, n), getattr(tree, n))
    assert (back.V, back.K, back.H, back.vocab_hash) == (120, 12, 2, "v1")
    assert back.meta["embedding_source"] == "random" and back.meta["seed"] == 3
    assert VocabTree.load(path).vocab_hash == "v1"          # no check requested
    with pytest.raises(CheckpointError) as e:
        VocabTree.load(path, expected_vocab_hash="v2")
    assert str(e.value) == "tree was built for another tokenizer (vocab hash v1 != v2)"


def test_load_errors(tmp_path):
    tree = VocabTree.one_level(30)
    good = tree.save(tmp_path / "t.safetensors")
    data = good.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    for p in (bad, tmp_path / "missing.safetensors"):
        with pytest.raises(CheckpointError) as e:
            VocabTree.load(p)
        assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="truncated or invalid"):
        VocabTree.load(bad)
    with pytest.raises(CheckpointError, match="not found"):
        VocabTree.load(tmp_path / "missing.safetensors")
    npz = tree.save(tmp_path / "t.npz")
    (tmp_path / "trunc.npz").write_bytes(npz.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or invalid"):
        VocabTree.load(tmp_path / "trunc.npz")
    # a well-formed file holding a broken tree
    from safetensors.numpy import save_file
    arrays = {n: getattr(tree, n).copy() for n in ("parent", "height", "rank", "n_children", "anc")}
    arrays["parent"][0] = 5
    save_file(arrays, str(tmp_path / "broken.safetensors"), metadata=tree._header())
    with pytest.raises(CheckpointError, match="invalid vocabulary tree"):
        VocabTree.load(tmp_path / "broken.safetensors")


# ----------------------------------------------------------------------------- embeddings
def test_corpus_embeddings_group_shared_contexts():
    # 4 classes of 6 tokens; the class sequence is a fixed cycle, tokens uniform in a class,
    # so tokens of one class share their contexts. Token 24 never occurs.
    rng = np.random.default_rng(0)
    V, n_cls, per = 25, 4, 6
    cls_seq = rng.choice(n_cls, size=40000, p=[0.4, 0.3, 0.2, 0.1])
    nxt = (cls_seq + 1) % n_cls
    cls_seq = np.stack([cls_seq, nxt], 1).reshape(-1)    # class c is followed by c+1
    ids = cls_seq * per + rng.integers(0, per, size=cls_seq.size)
    E = corpus_embeddings(ids, V, dim=8, window=2, seed=0)
    assert E.shape == (V, 8) and E.dtype == np.float32
    assert np.linalg.norm(E[24]) > 0                     # unseen token still placed
    U = E[:24] / np.linalg.norm(E[:24], axis=1, keepdims=True)
    S = U @ U.T
    np.fill_diagonal(S, -np.inf)
    nn = S.argmax(1)
    assert (nn // per == np.arange(24) // per).all()
    assert np.array_equal(E, corpus_embeddings(ids, V, dim=8, window=2, seed=0))
    tree = build_tree(E, 7, 2, seed=0)               # 4 clusters of <= 7 tokens
    for c in range(n_cls):
        assert len(set(tree.anc[1, c * per:(c + 1) * per].tolist())) == 1
    with pytest.raises(DataError, match="token ids"):
        corpus_embeddings(np.array([0, 1, 30]), V)


def test_frequency_tree_groups_by_rank():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, size=300)
    order = np.lexsort((np.arange(300), -counts))
    rank = np.empty(300, dtype=int)
    rank[order] = np.arange(300)
    tree = build_frequency_tree(counts, 16, 3, vocab_hash="x")
    check_structure(tree, 300, 16, 3)
    assert tree.meta["method"] == "frequency"
    for h in (1, 2):
        for node in tree.nodes_at_height(h):
            r = np.sort(rank[tree.anc[h] == node])
            assert np.array_equal(r, np.arange(r[0], r[-1] + 1))        # contiguous ranks
    # height-1 nodes in id order cover ranks in order
    first = [rank[tree.anc[1] == n].min() for n in tree.nodes_at_height(1)]
    assert first == sorted(first)
    # the embedding variant gives (nearly) contiguous rank ranges through build_tree
    E = frequency_embeddings(counts)
    assert E.shape == (300, 2)
    t2 = build_tree(E, 16, 3, seed=0)
    for node in t2.nodes_at_height(1):
        r = rank[t2.anc[1] == node]
        assert r.max() - r.min() + 1 <= 2 * r.size


def test_embedding_sources():
    w = torch.randn(12, 5)
    E = from_checkpoint_embeddings(w, 10)
    assert E.shape == (10, 5) and E.dtype == np.float32
    np.testing.assert_array_equal(E, w[:10].numpy())
    with pytest.raises(DataError, match="fewer"):
        from_checkpoint_embeddings(w, 20)
    R = random_embeddings(10, 4, seed=1)
    assert R.shape == (10, 4) and R.dtype == np.float32
    assert np.array_equal(R, random_embeddings(10, 4, seed=1))
    assert np.array_equal(token_counts(np.array([0, 2, 2]), 4), [1, 0, 2, 0])


# ----------------------------------------------------------------------------- summaries
def test_stats_and_describe():
    tree = build_tree(random_embeddings(200, 8, 0), 16, 2, seed=0, vocab_hash="vh",
                      meta={"embedding_source": "random"})
    st = tree_stats(tree)
    json.dumps(st)
    assert st["level_sizes"] == [int(s) for s in tree.level_sizes()]
    lv1 = st["levels"][0]
    assert lv1["height"] == 1 and lv1["nodes"] == tree.level_sizes()[1]
    assert lv1["children"]["max"] <= 16 and 0 < lv1["fill"]["mean"] <= 1
    assert sum(c for _, _, c in lv1["tokens_hist"]) == lv1["nodes"]
    text = describe_tree(tree, decode=lambda ids: f"<{ids[0]}>", n_samples=3, seed=0)
    assert "V=200 K=16 H=2" in text and "source=random" in text
    assert text.count("  node ") == 3 and "'<" in text
    assert describe_tree(tree) != ""


# ----------------------------------------------------------------------------- benchmark
@pytest.mark.slow
@pytest.mark.parametrize("K", [225, 256])
def test_gpt2_sized_build_time(K):
    V = 50257
    X = random_embeddings(V, 64, seed=0)
    t0 = time.perf_counter()
    tree = build_tree(X, K, 2, seed=0)
    dt = time.perf_counter() - t0
    print(f"\nbuild_tree V={V} K={K} H=2 d=64 random: {dt:.1f} s")
    check_structure(tree, V, K, 2)
    assert dt < 300
