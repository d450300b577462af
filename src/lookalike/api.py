"""The Python API; one function per CLI command, each with its config dataclass.

>>> import lookalike
>>> lookalike.run("gallery/", "queries/", "results.csv")            # extract + index + search
>>> lookalike.evaluate("results.csv", "labels.csv")["digix_score"]
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ._io import write_json_atomic, write_text_atomic
from .errors import LookalikeError
from .extract import ExtractConfig, ExtractResult, Extractor, write_skipped_csv
from .formats import NAIC_K, format_for_path, read_labels, read_results, write_results
from .index import Collection, IndexConfig, build_index as _build_index, load_collection
from .metrics import relevance_matrix, retrieval_metrics
from .postprocess import RerankConfig, rerank
from .store import read_store

log = logging.getLogger(__name__)


def build_index(features, out_dir, factory: str = "Flat", image_root=None, whiten: bool | None = None,
                pca_dim: int | None = None, pca_power: float = 0.5, pca_shrinkage: float | None = None) -> Collection:
    """``lookalike index``: faiss index from a feature store, saved to ``out_dir``; optionally
    PCA-whitened (fitted on these gallery features, saved with the index, applied to queries)."""
    cfg = IndexConfig(factory=factory, whiten=whiten, pca_dim=pca_dim, pca_power=pca_power, pca_shrinkage=pca_shrinkage)
    return _build_index(features, out_dir, cfg, image_root=image_root)


@dataclass
class SearchConfig:
    k: int | None = None  # default: 10, or 100 for NAIC
    format: str | None = None  # digix | naic | csv; default from the output suffix
    extract: dict | None = None  # overrides of the index's extract config for the queries
    rerank: dict | None = None  # the post-processing chain (RerankConfig)


@dataclass
class SearchResult:
    query_names: list[str]
    scores: np.ndarray
    indices: np.ndarray
    gallery_names: list[str]
    output: Path | None = None
    format: str | None = None
    extract: ExtractResult | None = None
    seconds: float = 0.0

    def ranked(self) -> list[list[str]]:
        return [[self.gallery_names[j] for j in row if j >= 0] for row in self.indices]


def _resolve_k(k: int | None, fmt: str, n_gallery: int) -> int:
    if fmt == "naic":
        want = min(NAIC_K, n_gallery)
        if k is not None and k != want:
            raise LookalikeError(f"NAIC results hold exactly {want} names per query; drop -k or use -k {want}")
        return want
    k = 10 if k is None else k
    if k > n_gallery:
        raise LookalikeError(f"k={k} is larger than the gallery ({n_gallery} images); use -k {n_gallery} or less")
    return k


def as_rerank_config(rerank) -> RerankConfig | None:
    """None, a comma list of steps, a dict, a RerankConfig, or a JSON file written by `tune`."""
    if rerank is None or isinstance(rerank, RerankConfig):
        return rerank if rerank is None or rerank.steps else None
    if isinstance(rerank, dict):
        known = {k: v for k, v in rerank.items() if k in RerankConfig.__dataclass_fields__}
        return as_rerank_config(RerankConfig(**known))
    text = str(rerank)
    if text.endswith(".json"):
        import json

        try:
            data = json.loads(Path(text).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LookalikeError(f"{text}: cannot read a re-ranking config ({type(e).__name__}); write one with `lookalike tune`") from None
        return as_rerank_config(data.get("rerank", data))
    return as_rerank_config(RerankConfig(steps=text))


def _spatial(scores, idx, query_source, query_names, col: Collection, spatial, cache=None):
    """Re-order the top-N by RANSAC-verified local features (needs the image files)."""
    from .data import list_images
    from .spatial import SpatialConfig, default_cache_dir, spatial_rerank

    cfg = spatial if isinstance(spatial, SpatialConfig) else SpatialConfig(**(spatial if isinstance(spatial, dict) else {}))
    root = col.manifest.get("image_root")
    if not root or query_source is None:
        raise LookalikeError("spatial verification needs the image files: search with --queries and an index built "
                             "by `run` or with `lookalike index --image-root GALLERY_DIR`")
    root = Path(root)
    base = root.parent if root.is_file() else root
    qpath = {e.name: e.path for e in list_images(query_source)}
    gpaths = [base / n for n in col.names]
    s2, i2, _ = spatial_rerank([qpath[n] for n in query_names], gpaths, scores, idx, cfg, cache_dir=cache or default_cache_dir())
    return s2, i2


def _search_batched(col: Collection, q: np.ndarray, k: int, progress: bool,
                    rerank_cfg: RerankConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    if rerank_cfg is not None:
        return rerank(col.prepare(q), col.gallery_features(), k, rerank_cfg)

    step = 4096
    scores = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    with tqdm(total=len(q), unit="query", desc="search", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for s in range(0, len(q), step):
            scores[s : s + step], idx[s : s + step] = col.search(q[s : s + step], k)
            bar.update(min(step, len(q) - s))
    return scores, idx


def search(index_dir, queries=None, query_features=None, output=None, k: int | None = None, format: str | None = None,
           workdir=None, progress: bool = False, collection: Collection | None = None, rerank=None, spatial=None,
           **extract_overrides) -> SearchResult:
    """``lookalike search``: top-k gallery names for each query (images or a feature store)."""
    t0 = time.perf_counter()
    col = collection or load_collection(index_dir)
    fmt = format_for_path(output, format) if output else (format or "csv")
    k = _resolve_k(k, fmt, len(col))
    names, feats, ext = _query_features(col, index_dir, queries, query_features, workdir, progress, extract_overrides)
    rr = as_rerank_config(rerank)
    scores, idx = _search_batched(col, feats, k, progress, rr)
    if spatial:
        scores, idx = _spatial(scores, idx, queries, names, col, spatial)
    res = SearchResult(list(names), scores, idx, col.names, None, fmt, ext)
    if output:
        write_results(output, fmt, names, col.names, scores, idx)
        res.output = Path(output)
        write_json_atomic(Path(output).with_name(Path(output).name + ".config.json"),
                          {"command": "search", "index": str(index_dir), "queries": str(queries or query_features),
                           **asdict(SearchConfig(k=k, format=fmt, extract=extract_overrides or None,
                                                 rerank=rr.to_dict() if rr else None)), "spatial": spatial or None})
    res.seconds = time.perf_counter() - t0
    return res


def _query_features(col: Collection, index_dir, queries, query_features, workdir, progress: bool,
                    extract_overrides: dict | None = None):
    """Query names and features from a store, or extracted (and cached) with the index's settings;
    checked against the index. Returns (names, features, ExtractResult or None)."""
    if (queries is None) == (query_features is None):
        raise LookalikeError("give either --queries (images) or --query-features (a feature store), not both")
    ext = None
    if query_features is not None:
        store = read_store(query_features)
        names, feats, model_id, source = store.names, store.features, store.model_id, str(query_features)
    else:
        cfg = ExtractConfig.from_dict({**col.manifest.get("extract_config", {}), **(extract_overrides or {})})
        if not col.manifest.get("extract_config") and not extract_overrides:
            log.warning("index has no extract config; embedding queries with the defaults")
        workdir = Path(workdir) if workdir else Path(index_dir) / "queries"
        store_path = workdir / f"queries-{_path_key(queries)}-{cfg.fingerprint()}.h5"
        ext = Extractor(cfg).extract(queries, store_path, progress=progress, label="queries")
        names, feats, model_id, source = ext.names, ext.features, cfg.model_id(), str(queries)
    col.check_queries(feats, model_id, source)
    return names, feats, ext


def _path_key(path) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]


@dataclass
class RunConfig:
    gallery: str
    queries: str
    output: str
    format: str | None = None
    k: int | None = None
    workdir: str | None = None
    factory: str = "Flat"
    extract: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)
    rerank: dict | None = None
    select: str = "auto"
    gallery_labels: str | None = None


@dataclass
class RunResult:
    search: SearchResult
    gallery: ExtractResult
    index_dir: Path
    workdir: Path
    skipped_csv: Path
    seconds: float
    choice: object | None = None  # selection.Choice when settings were chosen from the gallery
    choice_source: str = ""

    def summary(self) -> str:
        q = self.search.extract
        lines = [self.gallery.summary("gallery")]
        if self.choice is not None:
            lines.append(f"settings chosen {self.choice_source}: {self.choice.describe()}")
        if q is not None:
            lines.append(q.summary("queries"))
        lines.append(f"results: {len(self.search.query_names)} queries -> {self.search.output} ({self.search.format}), "
                     f"{self.seconds:.1f} s in all")
        n_skip = len(self.gallery.skipped) + (len(q.skipped) if q else 0)
        if n_skip:
            lines.append(f"skipped {n_skip} unreadable files: see {self.skipped_csv}")
        return "\n".join(lines)


SELECT_MODES = ("auto", "off", "self")


def _load_choice(path, models: list[str] | None = None):
    from .selection import Choice

    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        choice = Choice(tuple(float(w) for w in d["ensemble_weights"]), bool(d["whiten"]), as_rerank_config(d.get("rerank")),
                        float(d.get("score", 0.0)), d.get("table", []), d.get("probe", ""))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LookalikeError(f"{path}: not a settings file written by `lookalike tune --self` or "
                             f"`--gallery-labels` ({type(e).__name__}); write one with tune") from None
    if models is not None and (d.get("models", models) != models or len(choice.weights) != len(models)):
        raise LookalikeError(f"{path}: chosen for {'+'.join(d.get('models') or ['?'])}, this run uses "
                             f"{'+'.join(models)}; choose again for these models (tune --self / --gallery-labels)")
    return choice


def _gallery_choice(extractor: Extractor, g: ExtractResult, gallery, select: str, gallery_labels, workdir: Path,
                    fixed: dict, progress: bool):
    """(Choice or None, where it came from) for ``run``: the gallery's classes (class folders or
    ``gallery_labels``) or pseudo-queries (``select='self'``); cached in the workdir."""
    from .data import list_images
    from .selection import gallery_classes, select_for_gallery

    if select == "off":
        return None, ""
    models = [m.model for m in extractor.config.members()]
    if select not in SELECT_MODES:
        return _load_choice(select, models), f"from {select}"
    root = Path(gallery)
    classes = gallery_classes(root if root.is_dir() else None, g.names, gallery_labels)
    if classes is None and select != "self":
        return None, ""
    if len(extractor.config.members()) == 1 and fixed.get("whiten") is not None and fixed.get("rerank") is not None:
        return None, ""  # nothing left to choose
    from .selection import VERSION

    key = hashlib.sha256(json.dumps([VERSION, g.fingerprint, g.names, sorted((classes or {}).items()), select,
                                     {k: str(v) for k, v in fixed.items()}], sort_keys=True).encode()).hexdigest()[:12]
    cache = workdir / f"selection-{key}.json"
    source = ("from the gallery's classes" if classes is not None else "from pseudo-queries of the gallery")
    if cache.exists():
        return _load_choice(cache, models), source + " (cached)"
    paths = {e.name: e.path for e in list_images(gallery)}
    log.info("choosing settings %s", source)
    choice = select_for_gallery(extractor, g.features, g.names, [paths[n] for n in g.names], classes,
                                weights=[fixed["weights"]] if fixed.get("weights") else None,
                                whitening=(fixed["whiten"],) if fixed.get("whiten") is not None else (False, True),
                                chains=[fixed["rerank"]] if fixed.get("rerank") is not None else None)
    write_json_atomic(cache, {"models": models, **choice.to_dict()})
    return choice, source


def _reweighted_store(extractor: Extractor, g: ExtractResult, weights, path: Path) -> tuple[Extractor, Path]:
    """The gallery store for other member weights, computed from the stored rows (no extraction)."""
    from .selection import combine, split_members
    from .store import write_store

    cfg = ExtractConfig.from_dict({**extractor.config.to_dict(), "ensemble_weights": list(weights)})
    ex = Extractor(cfg)
    ex._dims = extractor.member_dims()
    path = path.with_name(f"{path.name.rsplit('-', 1)[0]}-{cfg.fingerprint()}.h5")
    if not path.exists() or read_store(path).names != g.names:
        feats = combine(split_members(g.features, ex._dims), weights)
        write_store(path, g.names, feats, ex.store_attrs(), g.skipped, dtype=cfg.dtype)
    return ex, path


def run(gallery, queries, output, format: str | None = None, k: int | None = None, workdir=None,
        factory: str = "Flat", progress: bool = False, rerank=None, index_config: IndexConfig | None = None,
        spatial=None, select: str = "auto", gallery_labels=None, **extract_overrides) -> RunResult:
    """``lookalike run``: extract gallery and queries, index the gallery, search, write results.

    Features are cached in ``workdir`` (default: ``<output folder>/lookalike-work``) under the
    fingerprint of the settings, so a rerun only extracts new images. When the gallery carries
    classes (class folders or ``gallery_labels``), the ensemble weights, whitening and re-ranking not
    given explicitly are chosen on the gallery itself (``select``: ``auto``; ``self`` also without
    classes, from pseudo-queries; ``off``; or a JSON file written by ``tune``).
    """
    t0 = time.perf_counter()
    output = Path(output)
    fmt = format_for_path(output, format)
    explicit_weights = tuple(extract_overrides.get("ensemble_weights") or ())
    cfg = ExtractConfig.from_dict({**ExtractConfig().to_dict(), **extract_overrides})
    workdir = Path(workdir) if workdir else output.parent / "lookalike-work"
    workdir.mkdir(parents=True, exist_ok=True)
    icfg = index_config or IndexConfig(factory=factory)
    rr = as_rerank_config(rerank)
    fp = cfg.fingerprint()
    extractor = Extractor(cfg)
    g_store = workdir / f"gallery-{_path_key(gallery)}-{fp}.h5"
    g = extractor.extract(gallery, g_store, progress=progress, label="gallery")
    _resolve_k(k, fmt, len(g.names))  # before any costly choice
    fixed = {"weights": explicit_weights or None, "whiten": icfg.whiten,
             "rerank": (rr or RerankConfig()) if rerank is not None else None}
    choice, source = _gallery_choice(extractor, g, gallery, select, gallery_labels, workdir, fixed, progress)
    if choice is not None:
        from dataclasses import replace

        if cfg.is_ensemble and tuple(choice.weights) != tuple(cfg.member_weights):
            extractor, g_store = _reweighted_store(extractor, g, choice.weights, g_store)
            cfg = extractor.config
            fp = cfg.fingerprint()
        if icfg.whiten is None:
            icfg = replace(icfg, whiten=choice.whiten)
        if rerank is None:
            rr = choice.rerank
    config = RunConfig(str(gallery), str(queries), str(output), fmt, k, str(workdir), icfg.factory, cfg.to_dict(),
                       asdict(icfg), rr.to_dict() if rr else None, str(select),
                       str(gallery_labels) if gallery_labels else None)
    index_key = hashlib.sha256(json.dumps(asdict(icfg), sort_keys=True).encode()).hexdigest()[:6]
    index_dir = workdir / f"index-{_path_key(gallery)}-{fp}-{index_key}"
    col = None
    if index_dir.exists() and g.n_extracted == 0 and (index_dir / "manifest.json").exists():
        col = load_collection(index_dir)
        if col.names != g.names:
            col = None
    if col is None:
        col = _build_index(g_store, index_dir, icfg, image_root=str(Path(gallery).resolve()))
    q_store = workdir / f"queries-{_path_key(queries)}-{fp}.h5"
    q = extractor.extract(queries, q_store, progress=progress, label="queries")
    col.check_queries(q.features, cfg.model_id(), str(queries))
    kk = _resolve_k(k, fmt, len(col))
    scores, idx = _search_batched(col, q.features, kk, progress, rr)
    if spatial:
        scores, idx = _spatial(scores, idx, queries, q.names, col, spatial, workdir / "local-features")
    write_results(output, fmt, q.names, col.names, scores, idx)
    sres = SearchResult(q.names, scores, idx, col.names, output, fmt, q)
    skipped_csv = output.with_name("skipped.csv")
    write_skipped_csv(skipped_csv, {"gallery": g.skipped, "queries": q.skipped})
    write_json_atomic(output.with_name(output.name + ".config.json"),
                      {"command": "run", **asdict(config), "spatial": spatial or None,
                       "choice": {k2: v for k2, v in choice.to_dict().items() if k2 != "table"} if choice else None})
    if choice is not None:
        write_json_atomic(output.with_name(output.name + ".selection.json"),
                          {"source": source, "models": [m.model for m in cfg.members()], **choice.to_dict()})
    return RunResult(sres, g, index_dir, workdir, skipped_csv, time.perf_counter() - t0, choice, source)


@dataclass
class EvaluateConfig:
    results: str
    labels: str
    k: int = 10
    gallery: str | None = None
    normalization: str = "min"


def evaluate(results, labels, k: int = 10, gallery=None, normalization: str = "min", output_json=None,
             per_query_csv=None, report=None, query_dir=None, gallery_dir=None, report_queries: int = 50,
             cam: int = 0, model=None) -> dict:
    """``lookalike evaluate``: metrics of a results file against an ``image,label`` CSV.

    The gallery (for counting relevant images) is ``gallery`` — an index folder, a feature store or
    a text file of names — or, by default, every labelled image that is not a query.
    ``report``: a folder for an HTML page with per-query strips (worst first), a histogram of
    first-correct ranks and, with ``cam`` > 0, activation maps; image folders default to those in
    ``RESULTS.config.json`` (written by ``run`` and ``search``), the model to the one used there.
    """
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
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = list(per_query)
        w.writerow(["query", "label", *cols])
        for i, q in enumerate(queries):
            w.writerow([q, q_labels[i], *[f"{per_query[c][i]:.6g}" if isinstance(per_query[c][i], float) else per_query[c][i] for c in cols]])
        write_text_atomic(per_query_csv, buf.getvalue())
    if report:
        from .report import image_roots_from_config, write_report

        q_root, g_root, ext_cfg = image_roots_from_config(results)
        if model:
            ext_cfg = {**(ext_cfg or {}), "model": str(model)}
        summary["report"] = str(write_report(report, summary, queries, q_labels, ranked_by_q, label_of, per_query,
                                             query_dir or q_root, gallery_dir or g_root, show_k=min(k, width),
                                             max_queries=report_queries, cam=cam, extract_config=ext_cfg))
    return summary


def _gallery_names(gallery) -> list[str]:
    p = Path(gallery)
    if p.is_dir() and (p / "names.json").exists():
        return json.loads((p / "names.json").read_text(encoding="utf-8"))
    if p.suffix in (".h5", ".hdf5"):
        return read_store(p).names
    if p.is_file():
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise LookalikeError(f"{gallery}: give an index folder, a feature store (.h5) or a text file of gallery names")


def tune(index_dir, labels, queries=None, query_features=None, output=None, k: int = 10, workdir=None,
         progress: bool = False, log=None) -> list:
    """``lookalike tune``: grid-search post-processing chains with labelled validation queries against
    an index; writes the best chain (and the whole table) as JSON for ``search --rerank FILE``."""
    from .tune import tune as _tune

    col = load_collection(index_dir)
    names, feats, _ = _query_features(col, index_dir, queries, query_features, workdir, progress)
    label_of = read_labels(labels)
    for kind, group in (("query", names), ("gallery image", col.names)):
        missing = [n for n in group if n not in label_of]
        if missing:
            raise LookalikeError(f"{labels}: no label for {kind} {missing[0]!r}" +
                                 (f" and {len(missing) - 1} more" if len(missing) > 1 else "") + "; label every image")
    results = _tune(col.prepare(feats), col.gallery_features(), [label_of[n] for n in names],
                    [label_of[n] for n in col.names], k=k, log=log)
    if output:
        best_cfg, best_m = results[0]
        write_json_atomic(output, {"rerank": best_cfg.to_dict(), "metrics": best_m,
                                   "baseline": next(m for c, m in results if not c.steps),
                                   "index": str(index_dir), "queries": str(queries or query_features),
                                   "all": [{"rerank": c.to_dict(), "digix_score": m["digix_score"], "top1": m["top1"],
                                            "mAP@10": m["mAP@10"]} for c, m in results]})
    return results


def tune_gallery(index_dir, output=None, self_: bool = False, gallery_labels=None, progress: bool = False):
    """``lookalike tune INDEX --self`` / ``--gallery-labels``: choose ensemble weights, whitening and
    re-ranking from the indexed gallery (its classes, or pseudo-queries of its photos); writes the
    choice and its table as JSON for ``run --select FILE`` (and ``search --rerank FILE``)."""
    from .data import list_images
    from .selection import gallery_classes, select_for_gallery

    col = load_collection(index_dir)
    m = col.manifest
    store_path, root = m.get("features"), m.get("image_root")
    if not store_path or not Path(store_path).is_file():
        raise LookalikeError(f"{index_dir}: its feature store {store_path!r} is gone; rebuild the index with `lookalike index`")
    if not root or not Path(root).exists():
        raise LookalikeError(f"{index_dir}: choosing from the gallery needs its images; build the index with "
                             "`lookalike index --image-root GALLERY` (or with `run`)")
    if not m.get("extract_config"):
        raise LookalikeError(f"{index_dir}: records no extraction settings (built from decoded codes or an old "
                             "store); choose with `lookalike run --select self` on the images instead")
    store = read_store(store_path)
    extractor = Extractor(ExtractConfig.from_dict(m["extract_config"]))
    classes = None if self_ else gallery_classes(root if Path(root).is_dir() else None, store.names, gallery_labels)
    if classes is None and not self_:
        raise LookalikeError(f"{index_dir}: its gallery has no class folders; give --gallery-labels, or --self")
    paths = {e.name: e.path for e in list_images(root)}
    missing = [n for n in store.names if n not in paths]
    if missing:
        raise LookalikeError(f"{root}: {len(missing)} gallery images are missing (e.g. {missing[0]!r}); "
                             "point the index at the gallery folder it was built from")
    choice = select_for_gallery(extractor, store.features, store.names, [paths[n] for n in store.names], classes)
    source = "from the gallery's classes" if classes is not None else "from pseudo-queries of the gallery"
    if output:
        write_json_atomic(output, {"source": source, "index": str(index_dir),
                                   "models": [c.model for c in extractor.config.members()], **choice.to_dict()})
    return choice, source
