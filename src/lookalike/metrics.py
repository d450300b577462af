"""Retrieval metrics on ranked relevance: top-1, AP@k / mAP@k, recall@k, the DIGIX score.

AP@k = (1 / N) · Σ_{i ≤ k} precision@i · rel(i), where by default N = min(#relevant in the
gallery, k) (the DIGIX definition). Some DIGIX write-ups instead divide by the number of relevant
images *found* in the top k (``normalization="hits"``), which scores a query with one late hit as
high as one with that hit first among few relevant; both are offered, ``min`` is the default.
DIGIX score = 0.5 · top-1 + 0.5 · mAP@10. Written by hand: a few lines of numpy, tested against
hand-computed values.
"""
from __future__ import annotations

import numpy as np

from .errors import LookalikeError

NORMALIZATIONS = ("min", "hits")


def average_precision_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int = 10,
                           normalization: str = "min") -> np.ndarray:
    """Per-query AP@k. ``relevance``: (nq, >=k) bool, ranked best first; ``n_relevant``: (nq,)."""
    if normalization not in NORMALIZATIONS:
        raise LookalikeError(f"unknown AP normalization {normalization!r}; use min or hits")
    rel = np.asarray(relevance, dtype=bool)[:, :k].astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    num = (hits / ranks * rel).sum(axis=1)
    if normalization == "min":
        den = np.minimum(np.asarray(n_relevant, dtype=np.float64), k)
    else:
        den = rel.sum(axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def retrieval_metrics(relevance: np.ndarray, n_relevant: np.ndarray, k: int = 10,
                      normalization: str = "min") -> tuple[dict, dict]:
    """Summary metrics and per-query columns from a (nq, K) ranked relevance matrix."""
    rel = np.asarray(relevance, dtype=bool)
    if rel.ndim != 2 or rel.shape[0] == 0:
        raise LookalikeError("no queries to evaluate")
    n_relevant = np.asarray(n_relevant)
    top1 = rel[:, 0] if rel.shape[1] else np.zeros(len(rel), bool)
    ap_k = average_precision_at_k(rel, n_relevant, k, normalization)
    ap_10 = ap_k if k == 10 else average_precision_at_k(rel, n_relevant, 10, normalization)
    first = np.where(rel.any(axis=1), rel.argmax(axis=1) + 1, 0)
    summary = {
        "queries": int(len(rel)),
        "top1": float(top1.mean()),
        f"mAP@{k}": float(ap_k.mean()),
        "mAP@10": float(ap_10.mean()),
        "digix_score": float(0.5 * top1.mean() + 0.5 * ap_10.mean()),
        "ap_normalization": normalization,
        "queries_without_relevant": int((n_relevant == 0).sum()),
    }
    for r in (1, 5, 10):
        summary[f"recall@{r}"] = float(rel[:, :r].any(axis=1).mean())
    per_query = {"top1": top1.astype(int), f"ap@{k}": ap_k, "first_correct_rank": first,
                 "n_relevant": n_relevant.astype(int)}
    return summary, per_query


def relevance_matrix(ranked: list[list[str]], query_labels: list[str], label_of: dict[str, str], width: int) -> np.ndarray:
    """(nq, width) bool: does the i-th result of query q share q's label (missing ranks are False)."""
    rel = np.zeros((len(ranked), width), dtype=bool)
    for qi, (names, ql) in enumerate(zip(ranked, query_labels)):
        for r, n in enumerate(names[:width]):
            rel[qi, r] = label_of[n] == ql
    return rel


def leave_one_out(feats: np.ndarray, labels, k: int = 10) -> dict:
    """Every row queries all the others (cosine): top-1, mAP@k, DIGIX score. Rows whose label has no
    other member are left out. Used for training validation and codec evaluation."""
    from .numeric import knn

    labels = np.asarray(labels)
    kk = min(k + 1, len(feats))
    _, ids = knn(feats, feats, kk)
    ranked = np.array([[j for j in row if j != i][: kk - 1] for i, row in enumerate(ids)])
    n_rel = np.array([(labels == lab).sum() - 1 for lab in labels])
    ok = n_rel > 0
    if not ok.any():
        raise LookalikeError("leave-one-out needs a label with at least two rows")
    return retrieval_metrics((labels[ranked] == labels[:, None])[ok], n_rel[ok], k)[0]


def neighbour_recall(orig: np.ndarray, approx: np.ndarray, k: int = 10) -> float:
    """Share of each row's k nearest neighbours (itself excluded) under ``orig`` that ``approx`` keeps."""
    from .numeric import knn

    kk = min(k + 1, len(orig))
    _, a = knn(orig, orig, kk)
    _, b = knn(approx, approx, kk)
    hits = [len(set(x[x != i][: kk - 1]) & set(y[y != i][: kk - 1])) / max(1, kk - 1)
            for i, (x, y) in enumerate(zip(a, b))]
    return float(np.mean(hits))
