"""Small numeric rules the stages share: row normalisation, exact k-NN, PCA bases.

A leaf module (numpy, and faiss for exact search); nothing here keeps state. The PCA is an
eigendecomposition of the covariance written here because scikit-learn is not a dependency and
both whitening (``postprocess``) and codecs (``codec``) need the full spectrum, not only a basis.
"""
from __future__ import annotations

import numpy as np


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with faiss: ``(sims, ids)``, best first (k capped at ``len(base)``)."""
    import faiss

    base = np.ascontiguousarray(base, dtype=np.float32)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(base)))


def best_first(scores: np.ndarray, ids: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``(scores, ids)`` ordered best first, equal scores by id, ids ``-1`` last; the
    first ``k`` columns (all by default). One order for every index type and for merged shards,
    so a tie is broken the same way whoever computed it."""
    order = np.lexsort((ids, -scores, ids < 0), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def covariance_spectrum(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of the covariance of the
    centred rows ``xc`` (float64)."""
    xc = np.asarray(xc, np.float64)
    cov = xc.T @ xc / max(len(xc) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    return evals[order], evecs[:, order]


def pca_basis(xc: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` leading principal directions of the centred rows ``xc`` as rows ``(m, d)``."""
    return covariance_spectrum(xc)[1][:, :m].T


def orthonormal_rows(a: np.ndarray) -> np.ndarray:
    """Orthonormalised rows of ``a`` (k, d), in order (row i spans what rows 0..i span); all-zero
    rows, and rows beyond d, stay zero (padding: latent dimensions that carry nothing)."""
    a = np.asarray(a, np.float64)
    keep = np.flatnonzero(np.abs(a).sum(axis=1) > 0)
    out = np.zeros_like(a)
    if len(keep):
        q, _ = np.linalg.qr(a[keep].T)
        out[keep[: q.shape[1]]] = q.T
    return out
