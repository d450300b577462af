"""Grid search of post-processing chains on a labelled validation split (``lookalike tune``).

Tune with validation photos as queries against the gallery, never with the test queries; the best
chain is written as JSON that ``search``/``run --rerank FILE`` accept. The grid is generated from
the re-ranking step registry (``postprocess.register_rerank_step``: which steps are tried, with
which values), not written out here.
"""
from __future__ import annotations

import itertools
import time

import numpy as np

from .errors import LookalikeError
from .metrics import retrieval_metrics
from .numeric import knn, l2n
from .postprocess import RerankConfig, RerankStep, rerank, rerank_steps


def step_grid(step: RerankStep, n_gallery: int) -> list[dict]:
    """Every combination of the ``tune`` values of the step's parameters (the first parameter
    varying slowest); values of ``tune_below_gallery`` parameters must be < ``n_gallery``."""
    tuned = [p for p in step.params if p.tune]
    return [dict(zip((p.name for p in tuned), values)) for values in itertools.product(*(p.tune for p in tuned))
            if all(v < n_gallery for p, v in zip(tuned, values) if p.tune_below_gallery)]


def default_grid(n_gallery: int) -> list[RerankConfig]:
    """No post-processing; each step that changes gallery or queries (DBA, αQE/AQE) alone, then
    every chain of two or more of them (in registration order, all combinations of their values);
    each final step (k-reciprocal, diffusion) alone. Generated from the step registry: the
    steps with ``tune=True`` and their parameters' ``tune`` values."""
    steps = [s for s in rerank_steps() if s.tune]
    values = {s.name: step_grid(s, n_gallery) for s in steps}
    expansions = [s for s in steps if not s.final]
    grid = [RerankConfig()]
    for s in expansions:
        grid += [RerankConfig((s.name,), **v) for v in values[s.name]]
    for size in range(2, len(expansions) + 1):
        for chain in itertools.combinations(expansions, size):
            for combo in itertools.product(*(values[s.name] for s in chain)):
                grid.append(RerankConfig(tuple(s.name for s in chain), **{k: v for d in combo for k, v in d.items()}))
    for s in steps:
        if s.final:
            grid += [RerankConfig((s.name,), **v) for v in values[s.name]]
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
        # each final step (k-reciprocal, diffusion) with its best settings, after the best expansion chain
        finals = [s for s in rerank_steps() if s.final]
        final_names = {s.name for s in finals}
        best_exp = max((r for r in results if r[0].steps and not set(r[0].steps) & final_names),
                       key=lambda r: r[1]["digix_score"], default=None)
        for final in finals:
            best_final = max((r for r in results if final.name in r[0].steps), key=lambda r: r[1]["digix_score"],
                             default=None)
            if best_exp and best_final:
                params = {p.name: getattr(best_final[0], p.name) for p in final.params}
                cfg = best_exp[0].replace(steps=best_exp[0].steps + (final.name,), **params)
                results.append((cfg, score(cfg)))
    results.sort(key=lambda r: -r[1]["digix_score"])
    return results
