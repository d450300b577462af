"""Post-processing after the network: PCA-whitening, αQE/AQE, DBA, k-reciprocal re-ranking, diffusion.

Everything works from faiss top-K neighbour lists, in memory O((queries + gallery) · K) — never a
dense (n × n) matrix, which at DIGIX scale (41,574 + 95,120 images) would need 75 GB.

Written by hand because no maintained library does it sparsely: the public k-reciprocal code
(Zhong et al., CVPR 2017) builds dense distance matrices. The definition here follows that paper
and its code with one deliberate difference: distances are the squared Euclidean distances of the
L2-normalised features, ``d = 2 - 2·cos``, used as they are (the public code divides each column
by its maximum, which needs every pairwise distance). Diffusion (Iscen et al., CVPR 2017) is
written here for the same reason: its public code builds the dense affinity matrix.

The chain (``RerankConfig`` + ``rerank``) is a registry, one ``register_rerank_step`` entry per
step (name, final or not, the function, its parameters with type, default, CLI help and the values
``tune`` tries): the config, the dispatch, ``tune``'s grid and the CLI options are generated from
it. ``RerankConfig`` is a hand-written class rather than a dataclass because its fields are the
registered parameters; it keeps the flat JSON of the dataclass it replaced.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .errors import LookalikeError, check_k, comma_choices
from .numeric import covariance_spectrum, knn, l2n  # noqa: F401  (knn, l2n: re-exported for callers)


# ------------------------------------------------------------------ learned: PCA-whitening


def _auto_ridge(evals: np.ndarray) -> float:
    """2·tr(C²)/tr(C), from the eigenvalues of the covariance C. tr(C²)/tr(C) = E[xᵀCx] / E[xᵀx] is
    the variance of the data along the direction of a typical (centred) data vector; the factor 2
    is a safety margin measured on the dev protocols (1 already avoided the collapse, but left
    category-level search 0.005 below no whitening with SSCD features; benchmarks/whitening.py)."""
    total = float(evals.sum())
    return 2.0 * float((evals ** 2).sum()) / total if total > 0 else 0.0


def _auto_dims(evals: np.ndarray, n: int, d: int, kept: float = 0.99) -> int:
    """The leading components that hold ``kept`` of the variance, at most n - 1 (the rank of n
    centred rows)."""
    m = max(1, min(n - 1, d))
    total = float(evals[:m].sum())
    if total <= 0:
        return m
    return int(min(m, np.searchsorted(np.cumsum(evals[:m]) / total, kept) + 1))


@dataclass
class PCAWhitening:
    """PCA with optional whitening, fitted on gallery or training features.

    ``power``: eigenvalues are raised to ``-power`` (0.5 = full whitening, 0 = plain PCA rotation);
    ``shrinkage`` s in [0, 1] pulls the kept eigenvalues λ towards their mean m, λ' = (1-s)·λ + s·m,
    before whitening (regularises the noisy small ones). Rows are L2-normalised after the projection.

    Left at ``None``, both are chosen from the data in :meth:`fit`, recorded as ``n_components_`` and
    ``shrinkage_`` (passing those back explicitly gives the same transform):

    - shrinkage: a ridge r = 2·tr(C²)/tr(C) is added to every eigenvalue (stored as the s above
      that gives the same scales up to a constant factor: s = r / (r + m)). tr(C²)/tr(C) is the
      variance along the direction of a typical gallery vector, so only the few dominant directions
      (shared by most images) are flattened, and no direction gains more than √((λ₁ + r) / r)
      over the largest one: the many small, noisy directions keep their natural scale instead of
      being blown up, which is what made all-dims whitening lose half the score on instance-level
      search.
    - dims: the leading components holding 99 % of the variance, at most n - 1 (and d).

    Explicit values are used as given (``n_components`` in 1..min(n, d), ``shrinkage`` in [0, 1]).
    Hand-written rather than ``sklearn.decomposition.PCA`` + ``sklearn.covariance``: scikit-learn
    is not a dependency, and neither offers the shrunk, powered whitening or this choice of ridge
    (the Ledoit-Wolf coefficient, which minimises the error of the covariance itself, is 0.004-0.02
    on the 1,500-5,600-photo dev galleries: far too small, all-dims whitening with it still loses
    0.15-0.20 on grocery; benchmarks/whitening.py).
    """

    n_components: int | None = None
    power: float = 0.5
    shrinkage: float | None = None

    def fit(self, x: np.ndarray) -> "PCAWhitening":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise LookalikeError(f"PCA: needs at least 2 feature rows, got shape {x.shape}")
        n, d = x.shape
        if self.shrinkage is not None and not 0.0 <= self.shrinkage <= 1.0:
            raise LookalikeError(f"PCA: shrinkage={self.shrinkage} is not in [0, 1]")
        self.mean_ = x.mean(axis=0)
        xc = x - self.mean_
        evals, evecs = covariance_spectrum(xc)
        evals = np.maximum(evals, 0.0)
        k = _auto_dims(evals, n, d) if self.n_components is None else int(self.n_components)
        if not 1 <= k <= min(n, d):
            raise LookalikeError(f"PCA: n_components={k} is not in 1..{min(n, d)} (features: {n} × {d})")
        kept = np.maximum(evals[:k], 1e-12)
        if self.shrinkage is None:
            ridge = _auto_ridge(evals)
            s = ridge / (ridge + float(kept.mean())) if ridge > 0 else 0.0
        else:
            s = float(self.shrinkage)
        kept = (1 - s) * kept + s * kept.mean()
        self.n_components_ = k
        self.shrinkage_ = s
        self.components_ = evecs[:, :k].T.astype(np.float32)  # (k, d)
        self.explained_variance_ = kept.astype(np.float32)
        self.scale_ = (kept ** -self.power).astype(np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if not hasattr(self, "components_"):
            raise LookalikeError("PCAWhitening: call fit() before transform()")
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1] != self.components_.shape[1]:
            raise LookalikeError(f"PCAWhitening: fitted on dimension {self.components_.shape[1]}, got {x.shape[1]}")
        return l2n(((x - self.mean_.astype(np.float32)) @ self.components_.T) * self.scale_)

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).transform(x)

    def save(self, path) -> None:
        """``n_components`` / ``shrinkage`` hold the values used (as files written before they could be
        chosen from the data); ``auto`` names those that were chosen, so ``load`` restores ``None``."""
        from ._io import atomic_path

        auto = ",".join(k for k in ("n_components", "shrinkage") if getattr(self, k) is None)
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, kind="pca_whitening", n_components=self.components_.shape[0], power=self.power,
                     shrinkage=self.shrinkage_, auto=auto, mean_=self.mean_, components_=self.components_,
                     explained_variance_=self.explained_variance_, scale_=self.scale_)

    @classmethod
    def load(cls, path) -> "PCAWhitening":
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["kind"]) != "pca_whitening":
                    raise KeyError
                k, s = int(z["n_components"]), float(z["shrinkage"])
                auto = str(z["auto"]).split(",") if "auto" in z.files else []  # older files: all explicit
                obj = cls(None if "n_components" in auto else k, float(z["power"]), None if "shrinkage" in auto else s)
                obj.n_components_, obj.shrinkage_ = k, s
                for key in ("mean_", "components_", "explained_variance_", "scale_"):
                    setattr(obj, key, z[key])
        except (OSError, KeyError, ValueError):
            raise LookalikeError(f"{path}: not a saved PCAWhitening; fit and save one first") from None
        return obj


# ------------------------------------------------------------------ query expansion, DBA


def _weighted_sum(base: np.ndarray, sims: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    w = np.power(np.clip(sims, 0, None), alpha) if alpha > 0 else np.ones_like(sims)
    w = np.where(ids >= 0, w, 0).astype(np.float32)
    return np.einsum("nk,nkd->nd", w, base[np.maximum(ids, 0)])


def alpha_qe(queries: np.ndarray, gallery: np.ndarray, k: int = 2, alpha: float = 3.0,
             neighbours: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """αQE (Radenović et al.): q' = normalise(q + Σ_{top-k} max(sim, 0)^α · g). ``alpha=0`` is AQE.

    ``neighbours``: (sims, ids) of the queries in the gallery if already searched (≥ k columns).
    """
    if k <= 0:
        return l2n(queries)
    sims, ids = neighbours if neighbours is not None else knn(queries, gallery, k)
    sims, ids = sims[:, :k], ids[:, :k]
    return l2n(np.asarray(queries, np.float32) + _weighted_sum(np.asarray(gallery, np.float32), sims, ids, alpha))


def dba(gallery: np.ndarray, k: int = 2, alpha: float = 3.0, chunk: int = 65536) -> np.ndarray:
    """Database-side augmentation: each gallery vector becomes the weighted mean of its top-k gallery
    neighbours (itself included, weight max(sim, 0)^α), normalised."""
    g = np.asarray(gallery, np.float32)
    if k <= 1:
        return l2n(g)
    out = np.empty_like(g)
    for s in range(0, len(g), chunk):
        sims, ids = knn(g[s : s + chunk], g, k)
        out[s : s + chunk] = _weighted_sum(g, sims, ids, alpha)
    return l2n(out)


# ------------------------------------------------------------------ k-reciprocal re-ranking


def _reciprocal(nbrs: np.ndarray, k: int, chunk: int = 8192) -> np.ndarray:
    """(n, k+1) neighbour ids where j in N(i, k) and i in N(j, k); -1 elsewhere."""
    n = len(nbrs)
    fwd_all = nbrs[:, : k + 1]
    out = np.full(fwd_all.shape, -1, dtype=np.int64)
    for s in range(0, n, chunk):
        fwd = fwd_all[s : s + chunk]
        rows = np.arange(s, s + len(fwd))
        back = fwd_all[fwd]  # (c, k+1, k+1)
        ok = (back == rows[:, None, None]).any(axis=2)
        out[s : s + chunk] = np.where(ok, fwd, -1)
    return out


def _row_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, step: int = 1 << 18) -> np.ndarray:
    """x[rows[i]] · x[cols[i]] for many pairs, in bounded memory."""
    out = np.empty(len(rows), np.float32)
    for s in range(0, len(rows), step):
        out[s : s + step] = np.einsum("nd,nd->n", x[rows[s : s + step]], x[cols[s : s + step]])
    return out


def _expansion_sets(R: np.ndarray, Rh: np.ndarray, chunk: int = 4096) -> list[np.ndarray]:
    """Per item: R(i,k1) ∪ every R(c,k1/2), c ∈ R(i,k1), that shares > 2/3 of itself with R(i,k1)."""
    n = len(R)
    sets: list[np.ndarray] = [None] * n  # type: ignore[list-item]
    for s in range(0, n, chunk):
        r = R[s : s + chunk]  # (c, k1+1)
        cand = Rh[np.maximum(r, 0)]  # (c, k1+1, kh+1): R(c, k1/2) of every member
        cand = np.where((r >= 0)[:, :, None], cand, -1)
        member = (cand[..., None] == r[:, None, None, :]).any(-1) & (cand >= 0)  # (c, k1+1, kh+1)
        size = (cand >= 0).sum(-1)
        accept = member.sum(-1) > (2.0 / 3.0) * size  # (c, k1+1)
        accept &= r >= 0
        allc = np.concatenate([r, np.where(accept[:, :, None], cand, -1).reshape(len(r), -1)], axis=1)
        allc.sort(axis=1)
        keep = allc >= 0
        keep[:, 1:] &= allc[:, 1:] != allc[:, :-1]
        for i in range(len(r)):
            sets[s + i] = allc[i][keep[i]]
    return sets


def _kth_per_row(values: np.ndarray, rows: np.ndarray, indptr: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """The k-th smallest of each row's ``values`` (CSR layout: ``rows`` sorted, ``indptr``); +inf for
    rows with fewer than k."""
    cnt = np.diff(indptr)
    out = np.full(n_rows, np.inf)
    if not len(values) or cnt.max() < k:
        return out
    pad = np.full((n_rows, int(cnt.max())), np.inf)
    pad[rows, np.arange(len(values)) - indptr[rows]] = values
    return np.partition(pad, k - 1, axis=1)[:, k - 1]


def k_reciprocal_rerank(queries: np.ndarray, gallery: np.ndarray, k: int = 10, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, max_triples: int = 20_000_000,
                        max_block: int = 256, row_max: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking with Jaccard distance and local query expansion, on sparse graphs.

    Returns ``(scores, indices)`` of shape (n_queries, k), best first, where score is minus the final
    distance ``(1 - λ)·Jaccard + λ·d``, ``d = 2 - 2·cos`` (the squared distance of unit rows).
    Memory O((nq + ng)·(k1 + k2)·support + max_block·ng); no n × n matrix. Each block of queries
    sums its Jaccard overlaps in one CSR matrix and its similarities to the whole gallery in one BLAS
    slab; each query's k-th overlap key bounds which other items can enter its top k, and only
    those candidates get the exact final distance.

    ``row_max=True`` divides each row's distances by that row's largest distance to any query or
    gallery row before the weights and the final sum, as the DIGIX 2020 winner's ``fast_kr_sparse``
    does; it costs one more exact pass over all pairs (as long as the k-NN graph). Measured on both
    dev protocols in BENCHMARKS.md; off by default.
    """
    from scipy import sparse

    q = l2n(queries)
    g = l2n(gallery)
    nq, ng = len(q), len(g)
    check_k(k, ng)
    x = np.concatenate([q, g])
    n = len(x)
    kk = max(k1 + 1, k2, 2)
    _, nbrs = knn(x, x, kk)
    nbrs = nbrs.astype(np.int64)
    kh = int(np.around(k1 / 2.0))
    R = _reciprocal(nbrs, k1)
    Rh = _reciprocal(nbrs, kh)
    sets = _expansion_sets(R, Rh)
    lens = np.fromiter((len(s) for s in sets), count=n, dtype=np.int64)
    rows = np.repeat(np.arange(n), lens)
    cols = np.concatenate(sets)
    d = 2.0 - 2.0 * _row_dots(x, rows, cols)
    scale = np.ones(n, np.float32)
    if row_max:  # the largest 2 - 2·cos of each row: its nearest neighbour among the negated rows
        far, _ = knn(x, -x, 1)
        scale = np.maximum(2.0 + 2.0 * far[:, 0], 1e-12).astype(np.float32)
        d = d / scale[rows]
    w = np.exp(-d).astype(np.float64)
    sums = np.bincount(rows, weights=w, minlength=n)
    V = sparse.csr_matrix((w / sums[rows], (rows, cols)), shape=(n, n))
    if k2 > 1:
        qe_rows = np.repeat(np.arange(n), k2)
        A = sparse.csr_matrix((np.full(n * k2, 1.0 / k2), (qe_rows, nbrs[:, :k2].ravel())), shape=(n, n))
        V = (A @ V).tocsr()
    Vq = V[:nq]
    VgT = V[nq:].T.tocsr()  # rows: support item t, columns: gallery j
    col_nnz = np.diff(VgT.indptr)
    out_scores = np.empty((nq, k), np.float32)
    out_ids = np.empty((nq, k), np.int64)
    per_row = np.add.reduceat(col_nnz[Vq.indices], Vq.indptr[:-1]) if Vq.nnz else np.zeros(nq, np.int64)
    per_row = np.where(np.diff(Vq.indptr) > 0, per_row, 0)
    s = 0
    while s < nq:
        e = s + 1
        budget = per_row[s]
        while e < nq and e - s < max_block and budget + per_row[e] <= max_triples:
            budget += per_row[e]
            e += 1
        b = e - s
        block = Vq[s:e].tocoo()
        cnt = col_nnz[block.col]
        rep_i = np.repeat(block.row.astype(np.int64), cnt)
        rep_a = np.repeat(block.data, cnt)
        starts = np.repeat(VgT.indptr[block.col], cnt)
        within = np.arange(cnt.sum()) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        idx = starts + within
        # Σ_t min(V[i,t], V[j,t]) for every (query i of the block, gallery j) with an overlap; CSR with
        # duplicates summed, so the flat positions row·ng + column come out sorted
        M = sparse.csr_matrix((np.minimum(rep_a, VgT.data[idx]), (rep_i, VgT.indices[idx])), shape=(b, ng))
        del rep_i, rep_a, starts, within, idx
        M.sum_duplicates()
        cnt = np.diff(M.indptr)
        r_nz = np.repeat(np.arange(b), cnt)
        nz = r_nz * ng + M.indices
        m_nz = M.data
        # Every gallery item is a candidate (Jaccard 1 where there is no overlap), so each query gets
        # k results. Ranking key = the final distance without its per-row constant:
        # c·s - (1-λ)·m/(2-m), c = -2λ/scale. The (block x gallery) similarity slab by BLAS is cheaper
        # than gathering candidate rows. A row's k-th key is at most the k-th among its overlaps
        # (``thr``), so the candidates are the overlaps with key <= thr and the items with c·s <= thr,
        # i.e. s >= thr / c: one comparison over the slab. They get the exact float64 final below.
        sims = q[s:e] @ g.T
        c = (-2.0 * lambda_value / scale[s:e]).astype(np.float64)
        key_nz = c[r_nz] * sims.ravel()[nz] - (1 - lambda_value) * (m_nz / (2.0 - m_nz))
        margin = 1e-4 * (1.0 + np.abs(c))
        thr = _kth_per_row(key_nz, r_nz, M.indptr, b, k)
        few = np.flatnonzero(cnt < k)  # fewer overlaps than k: the k-th key of the whole row
        if len(few):
            dense = sims[few] * c[few, None]
            sel = np.isin(r_nz, few)
            dense[np.searchsorted(few, r_nz[sel]), M.indices[sel]] = key_nz[sel]
            thr[few] = np.partition(dense, k - 1, axis=1)[:, k - 1]
        with np.errstate(divide="ignore", invalid="ignore"):  # c < 0: c·s <= thr + margin  <=>  s >= bound
            bound = np.where(c < 0, (thr + margin) / c, np.where(thr + margin >= 0, -np.inf, np.inf)).astype(np.float32)
        ri, cj = np.nonzero(sims >= bound[:, None])
        flat = np.union1d(ri * ng + cj, nz[key_nz <= (thr + margin)[r_nz]])
        ri, cj = flat // ng, flat % ng
        pos = np.minimum(np.searchsorted(nz, flat), max(len(nz) - 1, 0))
        mm = np.where(nz[pos] == flat, m_nz[pos], 0.0) if len(nz) else np.zeros(len(flat))
        final = 1.0 - mm / (2.0 - mm)
        final *= 1 - lambda_value
        sv = sims[ri, cj]
        del sims
        dist = 2.0 - 2.0 * sv
        if row_max:
            dist = dist / scale[s + ri]
        final += lambda_value * dist
        order = np.lexsort((cj, -sv, final, ri))  # equal finals (λ = 0: no overlap): the more similar first
        ri, cj, final = ri[order], cj[order], final[order]
        take = np.searchsorted(ri, np.arange(b))[:, None] + np.arange(k)[None, :]
        out_ids[s:e] = cj[take]
        out_scores[s:e] = -final[take]
        s = e
    return out_scores, out_ids


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024 if os.name == "posix" else float("nan")


# ------------------------------------------------------------------ diffusion


def gallery_graph(gallery: np.ndarray, k: int = 30, gamma: float = 3.0):
    """Symmetrically normalised affinity ``S = D^-1/2 W D^-1/2`` of the gallery's mutual k-NN graph,
    ``W_ij = max(cos, 0)^gamma`` where i and j are in each other's top k (self excluded). Sparse, n·k."""
    from scipy import sparse

    g = l2n(gallery)
    n = len(g)
    sims, ids = knn(g, g, min(k + 1, n))
    rows = np.repeat(np.arange(n), ids.shape[1])
    vals = np.power(np.clip(sims, 0, None), gamma).ravel().astype(np.float64)
    keep = (ids.ravel() != rows) & (ids.ravel() >= 0)
    W = sparse.csr_matrix((vals[keep], (rows[keep], ids.ravel()[keep])), shape=(n, n))
    W = W.minimum(W.T).tocsr()  # mutual neighbours only
    deg = np.asarray(W.sum(axis=1)).ravel()
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    return (sparse.diags(inv) @ W @ sparse.diags(inv)).tocsr()


TRUNCATE_ABOVE = 10_000  # galleries larger than this diffuse on each query's top-DF_TRUNCATE subgraph
DF_TRUNCATE = 2_000


def diffusion_rerank(queries: np.ndarray, gallery: np.ndarray, k: int = 10, graph_k: int = 30, query_k: int = 10,
                     gamma: float = 3.0, alpha: float = 0.99, iters: int = 20, graph=None,
                     max_cells: int = 1 << 25, truncate: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion on the gallery's k-NN graph (Iscen et al., CVPR 2017): for each query solve
    ``(I - alpha·S) f = y`` by conjugate gradient, ``y`` = the query's top ``query_k`` similarities to
    the power ``gamma``; rank the gallery by ``f`` (ties, e.g. outside the query's component, by the
    plain similarity). Queries are solved in blocks of ``max_cells / n_gallery`` columns, so memory is
    O(n·graph_k + max_cells); no n × n matrix. Returns ``(scores, indices)``, best first.

    ``truncate`` = K > 0: truncated diffusion (Iscen et al., CVPR 2018 §3): each query diffuses only
    on the subgraph of its K most similar gallery images (the rows and columns of the same ``S``),
    the rest keep their plain order after them; cost O(n_queries · iters · K · graph_k) instead of
    O(n_queries · iters · n_gallery · graph_k). ``None``: K = ``DF_TRUNCATE`` for galleries over
    ``TRUNCATE_ABOVE`` images, else the whole graph; 0: always the whole graph. K >= the gallery
    size is the whole graph."""
    q, g = l2n(queries), l2n(gallery)
    nq, ng = len(q), len(g)
    check_k(k, ng)
    S = graph if graph is not None else gallery_graph(g, graph_k, gamma)
    if truncate is None:
        truncate = DF_TRUNCATE if ng > TRUNCATE_ABOVE else 0
    if 0 < truncate < ng:
        return _truncated_diffusion(q, g, S, k, query_k, gamma, alpha, iters, max(truncate, k, query_k))
    qs, qi = knn(q, g, min(query_k, ng))
    yv = np.power(np.clip(qs, 0, None), gamma)
    out_scores = np.empty((nq, k), np.float32)
    out_ids = np.empty((nq, k), np.int64)
    block = max(1, min(nq, max_cells // max(ng, 1)))
    for s in range(0, nq, block):
        e = min(nq, s + block)
        Y = np.zeros((ng, e - s))
        Y[qi[s:e].T, np.arange(e - s)[None, :]] = yv[s:e].T
        F = _cg(S, Y, alpha, iters)
        F += 1e-6 * (g @ q[s:e].T)  # tie-break: nodes the diffusion does not reach keep their order
        top = np.argpartition(-F, k - 1, axis=0)[:k].T if k < ng else np.tile(np.arange(ng), (e - s, 1))
        vals = np.take_along_axis(F.T, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        out_ids[s:e] = np.take_along_axis(top, order, axis=1)
        out_scores[s:e] = np.take_along_axis(vals, order, axis=1)
    return out_scores, out_ids


def _truncated_diffusion(q, g, S, k: int, query_k: int, gamma: float, alpha: float, iters: int, K: int):
    """Each query on its top-K subgraph: ``(I - alpha·S[K, K]) f = y[K]``; the K are ranked by ``f``
    (ties by the plain similarity), and the top k of them are the answer."""
    nq = len(q)
    sims, ids = knn(q, g, K)  # best first: the query's top query_k seeds are its first query_k entries
    yv = np.power(np.clip(sims[:, :query_k], 0, None), gamma)
    out_scores = np.empty((nq, k), np.float32)
    out_ids = np.empty((nq, k), np.int64)
    for i in range(nq):
        sub = ids[i]
        y = np.zeros((K, 1))
        y[:query_k, 0] = yv[i]
        f = _cg(S[sub][:, sub], y, alpha, iters)[:, 0] + 1e-6 * sims[i]
        top = np.argpartition(-f, k - 1)[:k] if k < K else np.arange(K)
        order = top[np.argsort(-f[top], kind="stable")]
        out_ids[i] = sub[order]
        out_scores[i] = f[order]
    return out_scores, out_ids


def _cg(S, Y: np.ndarray, alpha: float, iters: int, tol: float = 1e-6) -> np.ndarray:
    """Conjugate gradient on ``(I - alpha·S) X = Y``, one independent solve per column of Y."""
    X = np.zeros_like(Y)
    R = Y.copy()
    P = R.copy()
    rs = (R * R).sum(axis=0)
    stop = tol * tol * np.maximum(rs, 1e-30)
    for _ in range(iters):
        AP = P - alpha * (S @ P)
        a = rs / np.maximum((P * AP).sum(axis=0), 1e-30)
        X += a * P
        R -= a * AP
        rs_new = (R * R).sum(axis=0)
        if (rs_new <= stop).all():
            break
        P = R + (rs_new / np.maximum(rs, 1e-30)) * P
        rs = rs_new
    return X


# ------------------------------------------------------------------ composing a chain: the step registry
#
# Every re-ranking step is one `register_rerank_step` call below: its name, whether it produces the
# final ranking, the function that applies it, its parameters (type, default, CLI help, the values
# `lookalike tune` tries). RerankConfig, rerank(), tune's grid and the CLI's options are all
# generated from the registry; nothing else needs editing to add a step.


@dataclass(frozen=True)
class RerankParam:
    """One setting of a re-ranking step: a keyword of :class:`RerankConfig`, a key of its JSON
    (``to_dict``) and a CLI option (:attr:`option`, ``--name-with-dashes``)."""

    name: str
    type: type  # int or float: how the CLI parses it
    default: int | float
    help: str = ""  # one line for the CLI's --help
    tune: tuple = ()  # the values the default grid of `lookalike tune` tries; () = only the default
    tune_below_gallery: bool = False  # the grid skips values >= the gallery size (neighbour counts)
    step: str = ""  # the step that owns it; filled in by register_rerank_step
    low: float | None = None  # accepted values: low <= value <= high (None: unbounded); the CLI checks them too
    high: float | None = None

    def check(self, value):
        """``value`` as this parameter's type, within its bounds; else a one-line error."""
        try:
            v = self.type(value)
            if isinstance(value, bool) or (self.type is int and float(value) != v):
                raise ValueError
        except (TypeError, ValueError):
            raise LookalikeError(f"{self.option} {value!r}: not a{'n integer' if self.type is int else ' number'}") from None
        if v != v or (self.low is not None and v < self.low) or (self.high is not None and v > self.high):
            lo = "" if self.low is None else f"{self.low:g} <= "
            hi = "" if self.high is None else f" <= {self.high:g}"
            raise LookalikeError(f"{self.option} {value!r}: give {lo}{self.option[2:]}{hi}")
        return v

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class RerankStep:
    """A registered step. ``apply(queries, gallery, k, config)`` gets L2-normalised float32 arrays
    and the :class:`RerankConfig` (its parameters as attributes, any step's, e.g. ``aqe`` reads
    ``qe_k``); a ``final`` step returns the ranking ``(scores, indices)``, shape (n_queries, k),
    best first, any other step the new ``(queries, gallery)`` (L2-normalised)."""

    name: str
    apply: Callable
    final: bool = False
    params: tuple[RerankParam, ...] = ()  # the parameters it owns
    label: str = ""  # shown after the name in messages and help: "qe (alpha-QE)"
    tune: bool = True  # in tune's default grid (with every combination of its params' ``tune`` values)


_STEPS: dict[str, RerankStep] = {}
_PARAMS: dict[str, RerankParam] = {}  # every registered parameter, in to_dict / CLI order
RERANK_STEPS: tuple[str, ...] = ()  # the registered step names (rebound by register/unregister)
FINAL_STEPS: tuple[str, ...] = ()  # those that produce the ranking


def _sync_names() -> None:
    global RERANK_STEPS, FINAL_STEPS
    RERANK_STEPS = tuple(_STEPS)
    FINAL_STEPS = tuple(n for n, s in _STEPS.items() if s.final)


def register_rerank_step(name: str, apply: Callable, *, final: bool = False, params=(), label: str = "",
                         tune: bool = True) -> RerankStep:
    """Add a step usable in ``--rerank``/``RerankConfig(steps=...)``, by ``rerank()``, in tune's grid
    and (through :func:`rerank_parameters`) as CLI options. ``params``: :class:`RerankParam` (or
    dicts of their fields) owned by this step; their names must be new."""
    if not isinstance(name, str) or not name.isidentifier():
        raise LookalikeError(f"re-ranking step name {name!r}: use a Python identifier (letters, digits, _)")
    if name in _STEPS:
        raise LookalikeError(f"re-ranking step {name!r} is already registered")
    if not callable(apply):
        raise LookalikeError(f"re-ranking step {name!r}: apply must be callable")
    owned = []
    for prm in params:
        prm = prm if isinstance(prm, RerankParam) else RerankParam(**prm)
        if not prm.name.isidentifier() or prm.name == "steps" or hasattr(RerankConfig, prm.name):
            raise LookalikeError(f"re-ranking parameter {prm.name!r}: not an identifier, or a RerankConfig attribute")
        if prm.name in _PARAMS or prm.name in (o.name for o in owned):
            raise LookalikeError(f"re-ranking parameter {prm.name!r} already exists"
                                 f" (step {_PARAMS[prm.name].step if prm.name in _PARAMS else name})")
        if not isinstance(prm.default, prm.type):
            raise LookalikeError(f"re-ranking parameter {prm.name!r}: default {prm.default!r} is not {prm.type.__name__}")
        owned.append(replace(prm, step=name, tune=tuple(prm.tune)))
    step = RerankStep(name, apply, bool(final), tuple(owned), label, bool(tune))
    _STEPS[name] = step
    _PARAMS.update((o.name, o) for o in owned)
    _sync_names()
    return step


def unregister_rerank_step(name: str) -> None:
    """Remove a step and its parameters (for tests and plugins that replace one)."""
    step = rerank_step(name)
    del _STEPS[name]
    for prm in step.params:
        _PARAMS.pop(prm.name, None)
    _sync_names()


def rerank_step(name: str) -> RerankStep:
    try:
        return _STEPS[name]
    except KeyError:
        raise LookalikeError(f"unknown re-ranking step {name!r}; use one of {', '.join(_STEPS)}") from None


def rerank_steps() -> tuple[RerankStep, ...]:
    """The registered steps, in registration order."""
    return tuple(_STEPS.values())


def rerank_parameters() -> tuple[RerankParam, ...]:
    """Every step's parameters, in registration order (the order of ``RerankConfig.to_dict``);
    the CLI makes one option of each: ``prm.option``, ``type=prm.type``, ``default=prm.default``,
    ``help=prm.help``."""
    return tuple(_PARAMS.values())


def _named(step: RerankStep) -> str:
    return f"{step.name} ({step.label})" if step.label else step.name


def rerank_chain_help() -> str:
    """The steps for the help of ``--rerank``: "dba, qe (alpha-QE), aqe, then kr (k-reciprocal) or df
    (diffusion) last"."""
    body = ", ".join(_named(s) for s in _STEPS.values() if not s.final)
    finals = " or ".join(_named(s) for s in _STEPS.values() if s.final)
    return f"{body}, then {finals} last" if body and finals else body or f"{finals} last"


class RerankConfig:
    """A post-processing chain, applied in order: ``dba`` changes the gallery, ``qe``/``aqe``
    the queries, ``kr`` (k-reciprocal) or ``df`` (diffusion), last, the ranking itself.

    ``RerankConfig(steps=(), **params)``: ``steps`` a comma string or a sequence of registered step
    names; ``params`` any registered parameter (:func:`rerank_parameters`), the others at their
    defaults, all readable and settable as attributes (``cfg.dba_k``). Not a dataclass since the
    parameters come from the registry; ``to_dict()`` (flat: ``steps`` then every parameter), ``==``
    and ``repr`` are those the dataclass it replaces had, so files written before load unchanged.
    """

    __hash__ = None  # mutable, like the dataclass it replaces

    def __init__(self, steps=(), **params):
        unknown = [n for n in params if n not in _PARAMS]
        if unknown:
            raise TypeError(f"RerankConfig: unknown parameter {unknown[0]!r}; known: {', '.join(_PARAMS)}")
        object.__setattr__(self, "_params", {n: prm.check(params[n]) if n in params else prm.default
                                             for n, prm in _PARAMS.items()})
        self.steps = comma_choices(steps, RERANK_STEPS, "re-ranking step")
        finals = [st for st in self.steps if _STEPS[st].final]
        if len(finals) > 1 or (finals and self.steps[-1] != finals[0]):
            names = [_named(s) for s in _STEPS.values() if s.final]
            who = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise LookalikeError(f"{who} produce the final ranking: use one of them and put it last in --rerank")

    @classmethod
    def from_dict(cls, d: dict) -> "RerankConfig":
        """From ``to_dict()`` output; keys of no registered parameter (other versions) are ignored."""
        return cls(**{k: v for k, v in d.items() if k == "steps" or k in _PARAMS})

    def __getattr__(self, name):  # only called for names that are not ordinary attributes
        if not name.startswith("_"):
            params = self.__dict__.get("_params", {})
            if name in params:
                return params[name]
            if name in _PARAMS:  # registered after this config was made
                return _PARAMS[name].default
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in _PARAMS or name in self.__dict__.get("_params", {}):
            self._params[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def params(self) -> dict:
        """A copy of the parameter values, {name: value}."""
        return dict(self._params)

    def replace(self, **changes) -> "RerankConfig":
        """A new config with ``changes`` (steps and/or parameters) applied."""
        kept = {k: v for k, v in self._params.items() if k in _PARAMS}
        return type(self)(**{"steps": self.steps, **kept, **changes})

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), **self._params}

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.steps, self._params) == (other.steps, other._params)

    def __repr__(self) -> str:
        fields = [f"steps={self.steps!r}", *(f"{k}={v!r}" for k, v in self._params.items())]
        return f"{type(self).__qualname__}({', '.join(fields)})"


def as_rerank_config(rerank) -> RerankConfig | None:
    """None, a comma list of steps, a dict, a RerankConfig, or a JSON file written by `tune`
    (``{"rerank": {...}}``, or the dict itself); None when the chain has no steps."""
    if rerank is None or isinstance(rerank, RerankConfig):
        return rerank if rerank is None or rerank.steps else None
    if isinstance(rerank, dict):
        return as_rerank_config(RerankConfig.from_dict(rerank))
    text = str(rerank)
    if text.endswith(".json"):
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LookalikeError(f"{text}: cannot read a re-ranking config ({type(e).__name__}); write one with `lookalike tune`") from None
        if isinstance(data, dict) and "rerank" in data and data["rerank"] is None:
            return None  # chosen: no re-ranking (settings files written by `tune --self`)
        chain = data.get("rerank", data) if isinstance(data, dict) else None
        if chain is not None and not isinstance(chain, dict):
            chain = None
        if chain is None or "steps" not in chain or not isinstance(chain["steps"], (list, str)):
            raise LookalikeError(f"{text}: not a re-ranking config (no list of steps); write one with `lookalike tune`")
        try:
            return as_rerank_config(RerankConfig.from_dict(chain))
        except TypeError as e:
            raise LookalikeError(f"{text}: damaged re-ranking config ({e}); write one with `lookalike tune`") from None
    return as_rerank_config(RerankConfig(steps=text))


def rerank(queries: np.ndarray, gallery: np.ndarray, k: int, config: RerankConfig) -> tuple[np.ndarray, np.ndarray]:
    """Run the chain and return the final ``(scores, indices)``, best first."""
    q, g = l2n(queries), l2n(gallery)
    check_k(k, len(g))
    for name in config.steps:
        step = rerank_step(name)
        if step.final:
            return step.apply(q, g, k, config)
        q, g = step.apply(q, g, k, config)
    return knn(q, g, k)


# ------------------------------------------------------------------ the built-in steps


def _apply_dba(q, g, k, c):
    return q, dba(g, c.dba_k, c.dba_alpha)


def _apply_qe(q, g, k, c):
    return alpha_qe(q, g, c.qe_k, c.qe_alpha), g


def _apply_aqe(q, g, k, c):
    return alpha_qe(q, g, c.qe_k, 0.0), g


def _apply_kr(q, g, k, c):
    return k_reciprocal_rerank(q, g, k, c.k1, c.k2, c.kr_lambda, row_max=bool(c.kr_row_max))


def _apply_df(q, g, k, c):
    return diffusion_rerank(q, g, k, c.df_k, c.df_query_k, c.df_gamma, c.df_alpha, c.df_iters,
                            truncate=c.df_truncate if c.df_truncate >= 0 else None)


register_rerank_step("dba", _apply_dba, params=(
    RerankParam("dba_k", int, 2, low=1, high=10000, help="DBA: gallery neighbours averaged into each gallery vector (itself included).",
                tune=(2, 3, 5)),
    RerankParam("dba_alpha", float, 3.0, low=0, high=100, help="DBA: similarity exponent of the weights (0: plain mean).", tune=(0.0, 3.0)),
))
register_rerank_step("qe", _apply_qe, label="alpha-QE", params=(
    RerankParam("qe_k", int, 2, low=1, high=10000, help="Query expansion (qe, aqe): gallery neighbours added to each query.", tune=(1, 2, 3, 5)),
    RerankParam("qe_alpha", float, 3.0, low=0, high=100, help="qe: similarity exponent of the weights (aqe: 0).", tune=(0.0, 3.0)),
))
# average QE is qe with qe_alpha=0 (its k is qe_k), which the grid already tries
register_rerank_step("aqe", _apply_aqe, tune=False)
register_rerank_step("kr", _apply_kr, final=True, label="k-reciprocal", params=(
    RerankParam("k1", int, 20, low=1, high=100000, help="k-reciprocal neighbourhood.", tune=(10, 20), tune_below_gallery=True),
    RerankParam("k2", int, 6, low=1, high=100000, help="k-reciprocal local query expansion.", tune=(3, 6)),
    RerankParam("kr_lambda", float, 0.3, low=0, high=1, help="Weight of the original distance.", tune=(0.1, 0.3, 0.6)),
    RerankParam("kr_row_max", int, 0, low=0, high=1,
                help="k-reciprocal: 1 divides each row's distances by its largest first (the DIGIX 2020 winner's "
                     "scaling; one more exact pass over all pairs)."),
))
register_rerank_step("df", _apply_df, final=True, label="diffusion", params=(
    RerankParam("df_k", int, 30, low=1, high=100000, help="Diffusion: gallery k-NN graph size.", tune=(10, 20, 50), tune_below_gallery=True),
    RerankParam("df_query_k", int, 10, low=1, high=100000, help="Diffusion: query neighbours seeded.", tune=(5, 10)),
    RerankParam("df_gamma", float, 3.0, low=0, high=100, help="Diffusion: similarity exponent."),
    RerankParam("df_alpha", float, 0.99, low=0, high=0.9999, help="Diffusion: walk continuation (0..1).", tune=(0.9, 0.99)),
    RerankParam("df_iters", int, 20, low=1, high=10000, help="Diffusion: conjugate-gradient iterations at most."),
    RerankParam("df_truncate", int, -1, low=-1, high=10_000_000,
                help="Diffusion: each query diffuses on its top-N gallery subgraph (truncated diffusion); 0: the "
                     "whole graph; -1: 2,000 for galleries over 10,000 images, else the whole graph."),
))
