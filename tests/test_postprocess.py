import numpy as np
import pytest

from lookalike.errors import LookalikeError
from lookalike.metrics import retrieval_metrics
from lookalike.postprocess import PCAWhitening, _kth_per_row, alpha_qe, dba, k_reciprocal_rerank, l2n


def clustered(n_q, n_g, d=32, n_clusters=200, noise=0.7, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    lq = rng.integers(0, n_clusters, n_q)
    lg = rng.integers(0, n_clusters, n_g)
    q = l2n(centres[lq] + noise * rng.normal(size=(n_q, d)))
    g = l2n(centres[lg] + noise * rng.normal(size=(n_g, d)))
    return q, g, lq, lg


def dense_k_reciprocal(q, g, k1=20, k2=6, lam=0.3, row_max=False):
    """Straightforward dense reference of the same definition (loops, full n x n matrices)."""
    x = np.concatenate([q, g]).astype(np.float64)
    n, nq = len(x), len(q)
    dist = 2 - 2 * (x @ x.T)
    if row_max:  # the DIGIX 2020 winner's scaling: each row divided by its largest distance
        dist = dist / dist.max(1, keepdims=True)
    rank = np.argsort(dist, axis=1, kind="stable")

    def recip(i, kk):
        fwd = rank[i, : kk + 1]
        return np.array([j for j in fwd if i in rank[j, : kk + 1]], dtype=int)

    V = np.zeros((n, n))
    kh = int(np.around(k1 / 2))
    for i in range(n):
        R = recip(i, k1)
        E = set(R.tolist())
        for c in R:
            Rc = recip(c, kh)
            if len(np.intersect1d(Rc, R)) > 2 / 3 * len(Rc):
                E.update(Rc.tolist())
        E = np.array(sorted(E))
        w = np.exp(-dist[i, E])
        V[i, E] = w / w.sum()
    if k2 > 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(n)])
    final = np.zeros((nq, n - nq))
    Vg = V[nq:]
    for i in range(nq):
        t = np.nonzero(V[i])[0]  # only the support of the query row can contribute to the minimum
        mins = np.minimum(V[i, t][None, :], Vg[:, t]).sum(1)
        jac = 1 - mins / (2 - mins)
        final[i] = (1 - lam) * jac + lam * dist[i, nq:]
    return final


def test_sparse_k_reciprocal_matches_dense_reference():
    q, g, lq, lg = clustered(2000, 8000, d=64, n_clusters=800, noise=1.2, seed=1)
    scores, ids = k_reciprocal_rerank(q, g, k=10, k1=20, k2=6, lambda_value=0.3)
    ref = dense_k_reciprocal(q, g)
    ref_ids = np.argsort(ref, axis=1, kind="stable")[:, :10]
    same = (ids == ref_ids).all(1).mean()
    assert same >= 0.99, same
    assert np.allclose(-scores, np.take_along_axis(ref, ids, 1), atol=1e-4)
    n_rel = np.array([(lg == l).sum() for l in lq])
    m_sparse = retrieval_metrics(lg[ids] == lq[:, None], n_rel)[0]["mAP@10"]
    m_dense = retrieval_metrics(lg[ref_ids] == lq[:, None], n_rel)[0]["mAP@10"]
    assert abs(m_sparse - m_dense) <= 1e-4
    # and it helps on clustered data
    base = np.argsort(-(q @ g.T), axis=1)[:, :10]
    m_base = retrieval_metrics(lg[base] == lq[:, None], n_rel)[0]["mAP@10"]
    assert m_sparse > m_base


def test_k_reciprocal_row_max_matches_dense_reference():
    q, g, lq, lg = clustered(300, 1200, d=32, n_clusters=120, noise=0.9, seed=3)
    ref = dense_k_reciprocal(q, g, row_max=True)
    scores, ids = k_reciprocal_rerank(q, g, k=10, row_max=True)
    ref_ids = np.argsort(ref, axis=1, kind="stable")[:, :10]
    assert (ids == ref_ids).all(1).mean() >= 0.99
    assert np.allclose(-scores, np.take_along_axis(ref, ids, 1), atol=1e-4)
    # and it is a different ranking from the unscaled one
    _, plain = k_reciprocal_rerank(q, g, k=10)
    assert (plain != ids).any()


def test_k_reciprocal_blocks():
    q, g, _, _ = clustered(120, 400, d=16, n_clusters=40, noise=0.8, seed=5)
    s1, i1 = k_reciprocal_rerank(q, g, k=12)
    s2, i2 = k_reciprocal_rerank(q, g, k=12, max_block=7, max_triples=1)  # one query per block
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-6)  # BLAS rounding differs by block shape
    assert (np.diff(-s1, axis=1) >= 0).all()
    # k = gallery size: every row once
    _, iall = k_reciprocal_rerank(q[:5], g, k=len(g))
    assert all(sorted(r) == list(range(len(g))) for r in iall)


def test_kth_per_row():
    from scipy import sparse

    m = sparse.csr_matrix(np.array([[0, 3.0, 1.0, 0, 2.0], [0, 0, 0, 0, 0], [5.0, 0, 0, 4.0, 0]]))
    rows = np.repeat(np.arange(3), np.diff(m.indptr))
    assert _kth_per_row(m.data, rows, m.indptr, 3, 2).tolist() == [2.0, np.inf, 5.0]
    assert _kth_per_row(m.data, rows, m.indptr, 3, 3).tolist() == [3.0, np.inf, np.inf]
    assert _kth_per_row(m.data, rows, m.indptr, 3, 4).tolist() == [np.inf] * 3


def test_k_reciprocal_lambda_zero_and_few_overlaps():
    q, g, _, _ = clustered(40, 300, d=16, n_clusters=30, noise=0.8, seed=7)
    ref = dense_k_reciprocal(q, g, lam=0.0)
    scores, ids = k_reciprocal_rerank(q, g, k=10, lambda_value=0.0)
    assert np.allclose(-scores, np.take_along_axis(ref, ids, 1), atol=1e-6)
    assert np.allclose(-scores, np.sort(ref, axis=1)[:, :10], atol=1e-6)  # the 10 smallest, whatever the ties
    # items without overlap (Jaccard 1, all tied) come by similarity
    s2, i2 = k_reciprocal_rerank(q, g, k=60, k1=3, k2=1, lambda_value=0.0)
    tied = s2 == -1.0
    assert tied.sum() > 100
    sims = np.take_along_axis(q @ g.T, i2, 1)
    for row in range(len(q)):
        t = sims[row][tied[row]]
        assert (np.diff(t) <= 1e-6).all()
        rest = np.setdiff1d(np.arange(len(g)), i2[row][~tied[row]])  # the tied ones are the most similar of the rest
        assert np.allclose(np.sort(t)[::-1], np.sort(q[row] @ g[rest].T)[::-1][: len(t)], atol=1e-6)


def test_alpha_qe_hand_computed():
    q = np.array([[1.0, 0.0]], np.float32)
    g = l2n(np.array([[1.0, 1.0], [0.0, 1.0], [1.0, -0.2]], np.float32))
    s0, s2 = float(g[0] @ q[0]), float(g[2] @ q[0])
    # top-2 are g2 (sim .98) then g0 (sim .707); alpha=3
    exp = l2n(q + s2 ** 3 * g[2] + s0 ** 3 * g[0])
    assert np.allclose(alpha_qe(q, g, k=2, alpha=3), exp, atol=1e-6)
    # AQE (alpha=0): plain mean of the query and its top-2
    assert np.allclose(alpha_qe(q, g, k=2, alpha=0), l2n(q + g[2] + g[0]), atol=1e-6)
    assert np.allclose(alpha_qe(q, g, k=0), q)


def test_dba_hand_computed():
    g = l2n(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32))
    out = dba(g, k=2, alpha=1)
    # g0's top-2: itself (1.0) and g1 (0.8): normalise(1*g0 + 0.8*g1)
    assert np.allclose(out[0], l2n((g[0] + 0.8 * g[1])[None])[0], atol=1e-6)
    # g1's top-2: itself and g0 (0.8, above g2's 0.6)
    assert np.allclose(out[1], l2n((g[1] + 0.8 * g[0])[None])[0], atol=1e-6)
    # g2's top-2: itself and g1 (0.6)
    assert np.allclose(out[2], l2n((g[2] + 0.6 * g[1])[None])[0], atol=1e-6)
    assert np.allclose(dba(g, k=1), g)


def test_pca_whitening():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16)) * np.linspace(5, 0.1, 16)
    w = PCAWhitening(n_components=8, shrinkage=0.0).fit(x)
    z = (x - w.mean_) @ w.components_.T * w.scale_
    assert np.allclose(np.cov(z.T), np.eye(8), atol=1e-3)  # whitened before the L2 norm
    out = w.transform(x)
    assert out.shape == (500, 8) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    plain = PCAWhitening(n_components=8, power=0).fit(x)
    assert np.allclose(plain.scale_, 1)
    with pytest.raises(LookalikeError):
        PCAWhitening(n_components=99).fit(x)
    with pytest.raises(LookalikeError, match="dimension"):
        w.transform(x[:, :4])


def test_pca_save_load(tmp_path):
    x = np.random.default_rng(1).normal(size=(100, 8))
    for w in (PCAWhitening(4, shrinkage=0.2).fit(x), PCAWhitening().fit(x)):
        w.save(tmp_path / "pca.npz")
        w2 = PCAWhitening.load(tmp_path / "pca.npz")
        assert np.array_equal(w.transform(x), w2.transform(x))
        assert (w2.n_components, w2.power, w2.shrinkage) == (w.n_components, w.power, w.shrinkage)
        assert (w2.n_components_, w2.shrinkage_) == (w.n_components_, w.shrinkage_)
    assert w2.n_components is None and w2.shrinkage is None and 0 < w2.shrinkage_ < 1
    (tmp_path / "junk.npz").write_bytes(b"nope")
    with pytest.raises(LookalikeError, match="not a saved"):
        PCAWhitening.load(tmp_path / "junk.npz")


def test_pca_loads_files_saved_before_auto_choice(tmp_path):
    """The format written before dims/shrinkage could be chosen from the data (no ``auto`` key)."""
    x = np.random.default_rng(2).normal(size=(60, 6))
    w = PCAWhitening(3, 0.5, 0.1).fit(x)
    np.savez(tmp_path / "old.npz", kind="pca_whitening", n_components=3, power=0.5, shrinkage=0.1,
             mean_=w.mean_, components_=w.components_, explained_variance_=w.explained_variance_, scale_=w.scale_)
    old = PCAWhitening.load(tmp_path / "old.npz")
    assert (old.n_components, old.shrinkage, old.n_components_, old.shrinkage_) == (3, 0.1, 3, 0.1)
    assert np.array_equal(old.transform(x), w.transform(x))


def whitening_trap(seed=0, n_q=300, n_g=150, d=120, informative=6, n_classes=30):
    """Few informative directions plus many weak noise dims, about as many gallery photos as dims:
    all-dims whitening scales the noise dims up to the informative ones and ruins retrieval."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, informative)) * 2.0
    rot = np.linalg.qr(rng.normal(size=(d, d)))[0]

    def sample(n):
        lab = rng.integers(0, n_classes, n)
        x = np.concatenate([centres[lab] + 0.6 * rng.normal(size=(n, informative)),
                            0.05 * rng.normal(size=(n, d - informative))], axis=1)
        return l2n(x @ rot.T), lab

    (q, lq), (g, lg) = sample(n_q), sample(n_g)
    return q, g, lq, lg


def retrieval_score(q, g, lq, lg):
    ids = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :10]
    n_rel = np.array([(lg == lab).sum() for lab in lq])
    return retrieval_metrics(lg[ids] == lq[:, None], n_rel)[0]["digix_score"]


def test_pca_defaults_safe_where_all_dims_whitening_fails():
    q, g, lq, lg = whitening_trap()
    n, d = g.shape
    none = retrieval_score(q, g, lq, lg)
    alldims = PCAWhitening(n_components=min(n - 1, d), shrinkage=0.0).fit(g)
    old = retrieval_score(alldims.transform(q), alldims.transform(g), lq, lg)
    w = PCAWhitening().fit(g)
    new = retrieval_score(w.transform(q), w.transform(g), lq, lg)
    assert old < none - 0.2, (old, none)  # the trap works: all-dims whitening fails here
    assert new >= none - 0.005 and new > old + 0.2, (new, none, old)
    assert 1 <= w.n_components_ < min(n - 1, d) and 0 < w.shrinkage_ < 1
    # passing the chosen values back explicitly gives the same transform
    again = PCAWhitening(n_components=w.n_components_, shrinkage=w.shrinkage_).fit(g)
    assert np.allclose(again.transform(q), w.transform(q), atol=1e-6)


def test_pca_defaults_still_whiten_dominant_nuisances():
    """A few shared high-variance directions unrelated to the classes (exposure, background...):
    the defaults must still damp them."""
    rng = np.random.default_rng(3)
    d, n_classes = 64, 40
    centres = rng.normal(size=(n_classes, d))
    nuisance = np.linalg.qr(rng.normal(size=(d, 4)))[0].T  # 4 orthonormal directions

    def sample(n):
        lab = rng.integers(0, n_classes, n)
        x = centres[lab] + 0.5 * rng.normal(size=(n, d)) + 4.0 * rng.normal(size=(n, 4)) @ nuisance
        return l2n(x), lab

    (q, lq), (g, lg) = sample(400), sample(800)
    none = retrieval_score(q, g, lq, lg)
    w = PCAWhitening().fit(g)
    assert retrieval_score(w.transform(q), w.transform(g), lq, lg) > none + 0.03


def test_pca_explicit_values_used_as_given():
    x = np.random.default_rng(4).normal(size=(200, 12)) * np.linspace(4, 0.2, 12)
    w = PCAWhitening(n_components=5, power=0.5, shrinkage=0.0).fit(x)
    assert (w.n_components_, w.shrinkage_) == (5, 0.0)
    z = (x - w.mean_) @ w.components_.T
    assert np.allclose(w.explained_variance_, z.var(axis=0, ddof=1), rtol=1e-4)  # no shrinkage applied
    s = PCAWhitening(n_components=12, power=0.25, shrinkage=0.3).fit(x)
    ev = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1]
    shrunk = 0.7 * ev + 0.3 * ev.mean()
    assert (s.n_components_, s.shrinkage_) == (12, 0.3)
    assert np.allclose(s.explained_variance_, shrunk, rtol=1e-4) and np.allclose(s.scale_, shrunk ** -0.25, rtol=1e-4)
    auto_s = PCAWhitening(n_components=5).fit(x)  # dims given, shrinkage chosen from the data
    assert auto_s.n_components_ == 5 and 0 < auto_s.shrinkage_ < 1
    auto_k = PCAWhitening(shrinkage=0.0).fit(x)  # the other way round
    assert auto_k.shrinkage_ == 0.0 and 1 <= auto_k.n_components_ <= 12
    for bad in (-0.1, 1.5):
        with pytest.raises(LookalikeError, match="shrinkage"):
            PCAWhitening(shrinkage=bad).fit(x)


def dense_diffusion(q, g, graph_k, query_k, gamma, alpha):
    """Iscen et al. written out with dense matrices: mutual k-NN affinity, solve (I - αS) f = y."""
    q, g = l2n(q), l2n(g)
    n = len(g)
    sim = g @ g.T
    np.fill_diagonal(sim, -np.inf)
    A = np.zeros((n, n))
    for i in range(n):
        nb = np.argsort(-sim[i], kind="stable")[:graph_k]
        A[i, nb] = np.clip(sim[i, nb], 0, None) ** gamma
    W = np.minimum(A, A.T)
    d = W.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-12)), 0)
    S = inv[:, None] * W * inv[None, :]
    qs = q @ g.T
    Y = np.zeros((n, len(q)))
    for j in range(len(q)):
        nb = np.argsort(-qs[j], kind="stable")[:query_k]
        Y[nb, j] = np.clip(qs[j, nb], 0, None) ** gamma
    F = np.linalg.solve(np.eye(n) - alpha * S, Y)
    return F.T + 1e-6 * qs


def test_diffusion_matches_dense_solve():
    from lookalike.postprocess import diffusion_rerank

    q, g, ql, gl = clustered(300, 1200, d=32, n_clusters=60, noise=0.8, seed=4)
    ref = dense_diffusion(q, g, 20, 10, 3.0, 0.9)
    ref_ids = np.argsort(-ref, axis=1, kind="stable")[:, :10]
    scores, ids = diffusion_rerank(q, g, 10, graph_k=20, query_k=10, gamma=3.0, alpha=0.9, iters=100, max_cells=1200 * 64)
    same = (ids == ref_ids).all(axis=1).mean()
    assert same >= 0.99
    assert np.allclose(scores, np.take_along_axis(ref, ids, axis=1), atol=1e-5)
    # and it helps on clustered data, as diffusion should
    base = retrieval_metrics(gl[np.argsort(-(l2n(q) @ l2n(g).T), axis=1)[:, :10]] == ql[:, None],
                             np.array([(gl == x).sum() for x in ql]))[0]["mAP@10"]
    diff = retrieval_metrics(gl[ids] == ql[:, None], np.array([(gl == x).sum() for x in ql]))[0]["mAP@10"]
    assert diff > base


def test_rerank_chain_rules():
    from lookalike.postprocess import RerankConfig

    with pytest.raises(LookalikeError, match="use one of them and put it last"):
        RerankConfig(steps="kr,df")
    with pytest.raises(LookalikeError, match="put it last"):
        RerankConfig(steps="df,qe")
    assert RerankConfig(steps="dba,aqe,df").steps == ("dba", "aqe", "df")


def test_truncated_diffusion_is_the_whole_graph_when_it_covers_the_gallery_and_stays_in_the_top_k():
    from lookalike.numeric import knn, l2n
    from lookalike.postprocess import TRUNCATE_ABOVE, diffusion_rerank

    rng = np.random.default_rng(5)
    c = rng.normal(size=(20, 16)).astype(np.float32)
    lg, lq = rng.integers(0, 20, 400), rng.integers(0, 20, 30)
    g = l2n(c[lg] + 1.2 * rng.normal(size=(400, 16)).astype(np.float32))
    q = l2n(c[lq] + 1.2 * rng.normal(size=(30, 16)).astype(np.float32))
    whole = diffusion_rerank(q, g, 10, truncate=0)
    for K in (400, 10_000):  # K >= gallery: exactly the whole graph
        s, i = diffusion_rerank(q, g, 10, truncate=K)
        assert np.array_equal(i, whole[1]) and np.array_equal(s, whole[0])
    assert len(g) <= TRUNCATE_ABOVE and np.array_equal(diffusion_rerank(q, g, 10)[1], whole[1])  # default: whole graph
    s, i = diffusion_rerank(q, g, 10, truncate=50)
    _, top50 = knn(q, g, 50)
    assert all(set(row) <= set(t) for row, t in zip(i, top50))  # only the query's subgraph is ranked
    assert (np.diff(s, axis=1) <= 0).all() and len({tuple(r) for r in i}) > 1
    # and it diffuses: the same class gathers at least as well as the plain top 10 on this clustered data
    plain = (lg[top50[:, :10]] == lq[:, None]).mean()
    assert (lg[i] == lq[:, None]).mean() >= plain - 0.02
