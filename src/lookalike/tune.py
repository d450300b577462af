"""Grid search of post-processing chains on a labelled validation split (``lookalike tune``).

Tune with validation photos as queries against the gallery, never with the test queries; the best
chain is written as JSON that ``search``/``run --rerank FILE`` accept.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import replace

import numpy as np

from .errors import LookalikeError
from .metrics import retrieval_metrics
from .numeric import knn, l2n
from .postprocess import FINAL_STEPS, RerankConfig, rerank


def default_grid(n_gallery: int) -> list[RerankConfig]:
    """No post-processing, DBA, αQE/AQE, their combinations, k-reciprocal and diffusion."""
    grid = [RerankConfig()]
    dbas = [RerankConfig(("dba",), dba_k=k, dba_alpha=a) for k in (2, 3, 5) for a in (0.0, 3.0)]
    qes = [RerankConfig(("qe",), qe_k=k, qe_alpha=a) for k in (1, 2, 3, 5) for a in (0.0, 3.0)]
    grid += dbas + qes
    for d, q in itertools.product(dbas, qes):
        grid.append(replace(q, steps=("dba", "qe"), dba_k=d.dba_k, dba_alpha=d.dba_alpha))
    krs = [dict(k1=k1, k2=k2, kr_lambda=lam) for k1 in (10, 20) for k2 in (3, 6) for lam in (0.1, 0.3, 0.6)
           if k1 < n_gallery]
    for kr in krs:
        grid.append(RerankConfig(("kr",), **kr))
    for gk, qk, a in itertools.product((10, 20, 50), (5, 10), (0.9, 0.99)):
        if gk < n_gallery:
            grid.append(RerankConfig(("df",), df_k=gk, df_query_k=qk, df_alpha=a))
    return grid


def tune(queries: np.ndarray, gallery: np.ndarray, query_labels, gallery_labels, grid: list[RerankConfig] | None = None,
         k: int = 10, with_kr_on_best: bool = True, log=None) -> list[tuple[RerankConfig, dict]]:
    """Score every chain of the grid; returns [(config, metrics)] best first (by DIGIX score)."""
    q, g = l2n(queries), l2n(gallery)
    ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(ql) != len(q) or len(gl) != len(g):
        raise LookalikeError("tune: labels and features disagree in length")
    n_rel = np.array([(gl == lab).sum() for lab in ql])
    if (n_rel == 0).all():
        raise LookalikeError("tune: no query has a relevant gallery image; check the labels and the split")
    k = min(k, len(g))
    grid = grid if grid is not None else default_grid(len(g))
    results = []

    def score(cfg: RerankConfig) -> dict:
        t0 = time.perf_counter()
        _, ids = rerank(q, g, k, cfg) if cfg.steps else knn(q, g, k)
        m, _ = retrieval_metrics(gl[ids] == ql[:, None], n_rel, k)
        m["seconds"] = time.perf_counter() - t0
        if log:
            log(f"{','.join(cfg.steps) or 'none':12s} score {m['digix_score']:.4f}  {cfg.to_dict()}")
        return m

    for cfg in grid:
        results.append((cfg, score(cfg)))
    if with_kr_on_best:
        # the best k-reciprocal and the best diffusion, each after the best expansion chain
        best_exp = max((r for r in results if r[0].steps and not set(r[0].steps) & set(FINAL_STEPS)),
                       key=lambda r: r[1]["digix_score"], default=None)
        for final in FINAL_STEPS:
            best_final = max((r for r in results if final in r[0].steps), key=lambda r: r[1]["digix_score"], default=None)
            if best_exp and best_final:
                params = {f: getattr(best_final[0], f) for f in
                          (("k1", "k2", "kr_lambda") if final == "kr" else ("df_k", "df_query_k", "df_gamma", "df_alpha"))}
                cfg = replace(best_exp[0], steps=best_exp[0].steps + (final,), **params)
                results.append((cfg, score(cfg)))
    results.sort(key=lambda r: -r[1]["digix_score"])
    return results
