"""``evaluate``: metrics of a results file against labels, and the visual report."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .._io import write_json_atomic
from ..errors import LookalikeError
from ..formats import read_labels, read_names, read_results, write_per_query_csv
from ..metrics import relevance_matrix, retrieval_metrics


@dataclass
class EvaluateConfig:
    results: str
    labels: str
    k: int = 10
    gallery: str | None = None
    normalization: str = "min"


def evaluate(results, labels, k: int = 10, gallery=None, normalization: str = "min", output_json=None,
             per_query_csv=None, report=None, query_dir=None, gallery_dir=None, report_queries: int = 50,
             cam: int = 0, model=None, trust_remote_code: bool = False) -> dict:
    """``lookalike evaluate``: metrics of a results file against an ``image,label`` CSV.

    The gallery (for counting relevant images) is ``gallery`` — an index folder, a feature store or
    a text file of names — or, by default, every labelled image that is not a query.
    ``report``: a folder for an HTML page with per-query strips (worst first), a histogram of
    first-correct ranks and, with ``cam`` > 0, activation maps; image folders default to those in
    ``RESULTS.config.json`` (written by ``run`` and ``search``), the model to the one used there.
    """
    if not isinstance(k, int) or k < 1:
        raise LookalikeError(f"k={k}: the metrics need k >= 1 (mAP@k, recall@k)")
    ranked_by_q = read_results(results)
    label_of = read_labels(labels)
    queries = list(ranked_by_q)
    missing = [q for q in queries if q not in label_of]
    if missing:
        raise LookalikeError(f"{labels}: no label for query {missing[0]!r}" +
                             (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + "; add them or drop those queries")
    missing_g = sorted({g for v in ranked_by_q.values() for g in v if g not in label_of})
    if missing_g:
        raise LookalikeError(f"{labels}: no label for gallery image {missing_g[0]!r}" +
                             (f" and {len(missing_g) - 1} more" if len(missing_g) > 1 else "") + "; label every gallery image")
    if gallery is not None:
        gallery_names = _gallery_names(gallery)
    else:
        qs = set(queries)
        gallery_names = [n for n in label_of if n not in qs]
    counts: dict[str, int] = {}
    for n in gallery_names:
        lab = label_of.get(n)
        if lab is not None:
            counts[lab] = counts.get(lab, 0) + 1
    q_labels = [label_of[q] for q in queries]
    width = max(k, 10)
    rel = relevance_matrix([ranked_by_q[q] for q in queries], q_labels, label_of, width)
    n_rel = np.array([counts.get(lab, 0) for lab in q_labels])
    summary, per_query = retrieval_metrics(rel, n_rel, k, normalization)
    summary["results"] = str(results)
    summary["labels"] = str(labels)
    summary["gallery_size"] = len(gallery_names)
    if output_json:
        write_json_atomic(output_json, {**summary, "config": asdict(EvaluateConfig(str(results), str(labels), k,
                                                                                     str(gallery) if gallery else None, normalization))})
    if per_query_csv:
        write_per_query_csv(per_query_csv, queries, q_labels, per_query)
    if report:
        from ..report import write_report

        q_root, g_root, ext_cfg = _report_sources(results, trust_remote_code, with_model=cam > 0)
        if model:
            from ..extract import ExtractConfig

            ext_cfg = replace(ext_cfg, model=str(model)) if ext_cfg is not None else ExtractConfig(model=str(model))
        summary["report"] = str(write_report(report, summary, queries, q_labels, ranked_by_q, label_of, per_query,
                                             query_dir or q_root, gallery_dir or g_root, show_k=min(k, width),
                                             max_queries=report_queries, cam=cam, extract_config=ext_cfg))
    return summary


def _gallery_names(gallery) -> list[str]:
    from ..collection import Collection

    p = Path(gallery)
    if p.is_dir() and Collection.exists(p):
        return Collection.open(p).live_names()
    if p.suffix in (".h5", ".hdf5"):
        from ..store import read_store

        return read_store(p).names
    if p.is_file():
        return read_names(p)
    raise LookalikeError(f"{gallery}: give an index folder, a feature store (.h5) or a text file of gallery names")


def _report_sources(results, trust_remote_code: bool = False,
                    with_model: bool = True) -> tuple[Path | None, Path | None, object | None]:
    """(query images, gallery images, ExtractConfig) of the run or search that wrote ``results``,
    from ``RESULTS.config.json`` and the collection it names; missing parts are None."""
    from ..collection import Collection

    cfg_path = Path(str(results) + ".config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    except ValueError:
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    text = lambda key: cfg.get(key) if isinstance(cfg.get(key), str) and cfg.get(key) else None  # noqa: E731
    q = text("queries")
    q = Path(q) if q and not q.endswith((".h5", ".hdf5")) else None
    index = text("index_dir") if cfg.get("command") == "run" else text("index")
    col = None
    if index and Collection.exists(index):
        try:
            col = Collection.open(index, replay=False)
        except LookalikeError:
            col = None
    gallery = Path(text("gallery")) if cfg.get("command") == "run" and text("gallery") else (col.image_root if col else None)
    trust = {"trust_remote_code": True} if trust_remote_code else {}
    if not with_model:
        return q, gallery, None
    if col is not None and col.has_extract_config:
        return q, gallery, col.extract_config(**trust)
    if isinstance(cfg.get("extract"), dict):  # results of a run whose collection is gone (or older runs)
        from ..extract import ExtractConfig

        return q, gallery, ExtractConfig.from_dict({**cfg["extract"], **trust}, trusted=trust_remote_code,
                                                   source=str(cfg_path))
    return q, gallery, None
