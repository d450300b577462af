"""``index``, ``search``, ``run`` and ``update``: one search path, used by ``search`` and ``run`` alike
(``run`` = extract the gallery + choose settings + build the collection + that search, with the
features kept in memory)."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .._io import write_json_atomic
from ..collection import Collection
from ..errors import LookalikeError, check_k
from ..formats import NAIC_K, format_for_path, write_results, write_skipped_csv
from ..index import IndexConfig, build_index as _build_index
from ..postprocess import RerankConfig, as_rerank_config
from .queries import path_key, query_rows, rows_digest


def build_index(features, out_dir, factory: str = "Flat", image_root=None, whiten: bool | None = None,
                pca_dim: int | None = None, pca_power: float = 0.5, pca_shrinkage: float | None = None,
                shard_size: int = 0, nprobe: int | None = None, ef_search: int | None = None,
                config: IndexConfig | None = None) -> Collection:
    """``lookalike index``: faiss index from a feature store, saved to ``out_dir``; optionally
    PCA-whitened (fitted on these gallery features, saved with the index, applied to queries)."""
    cfg = config or IndexConfig(factory=factory, whiten=whiten, pca_dim=pca_dim, pca_power=pca_power,
                                pca_shrinkage=pca_shrinkage, shard_size=shard_size or 0, nprobe=nprobe,
                                ef_search=ef_search)
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
    extract: object | None = None  # ExtractResult of the queries, when they were images
    seconds: float = 0.0

    def ranked(self) -> list[list[str]]:
        return [[self.gallery_names[j] for j in row if j >= 0] for row in self.indices]


def _resolve_k(k: int | None, fmt: str, n_gallery: int) -> int:
    if fmt == "naic":
        want = min(NAIC_K, n_gallery)
        if k is not None and k != want:
            raise LookalikeError(f"NAIC results hold exactly {want} names per query; drop -k or use -k {want}")
        return want
    return check_k(10 if k is None else k, n_gallery)


def _rank(col: Collection, feats: np.ndarray, k: int, progress: bool, rr: RerankConfig | None, spatial=None,
          query_source=None, query_names=None, spatial_cache=None) -> tuple[np.ndarray, np.ndarray]:
    """The one search path: faiss (in blocks, with a progress bar) or the re-ranking chain, then
    optional spatial verification."""
    from tqdm.auto import tqdm

    if rr is not None:
        scores, idx = col.search(feats, k, rerank=rr)
    else:
        step = 4096
        scores = np.empty((len(feats), k), np.float32)
        idx = np.empty((len(feats), k), np.int64)
        with tqdm(total=len(feats), unit="query", desc="search", disable=not progress, leave=False,
                  dynamic_ncols=True) as bar:
            for s in range(0, len(feats), step):
                scores[s : s + step], idx[s : s + step] = col.search(feats[s : s + step], k)
                bar.update(min(step, len(feats) - s))
    if spatial:
        from ..spatial import spatial_rerank_collection

        if query_source is None:
            raise LookalikeError("spatial verification needs the image files: search with --queries and an index built "
                                 "by `run` or with `lookalike index --image-root GALLERY_DIR`")
        scores, idx = spatial_rerank_collection(col, query_source, query_names, scores, idx, spatial, spatial_cache)
    return scores, idx


def search(index_dir, queries=None, query_features=None, output=None, k: int | None = None, format: str | None = None,
           workdir=None, progress: bool = False, collection: Collection | None = None, rerank=None, spatial=None,
           nprobe: int | None = None, ef_search: int | None = None, **extract_overrides) -> SearchResult:
    """``lookalike search``: top-k gallery names for each query (images or a feature store)."""
    t0 = time.perf_counter()
    col = collection or Collection.open(index_dir)
    if nprobe or ef_search:
        col.set_search_params(nprobe, ef_search)
    fmt = format_for_path(output, format) if output else (format or "csv")
    k = _resolve_k(k, fmt, len(col))
    names, feats, ext = query_rows(col, index_dir, queries, query_features, workdir, progress, extract_overrides)
    rr = as_rerank_config(rerank)
    scores, idx = _rank(col, feats, k, progress, rr, spatial, queries, names)
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
    gallery: object  # ExtractResult
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
    from ..extract import ExtractConfig, Extractor
    from ..store import FeatureStore
    from .choosing import gallery_choice, reweighted

    t0 = time.perf_counter()
    output = Path(output)
    fmt = format_for_path(output, format)
    explicit_weights = tuple(extract_overrides.get("ensemble_weights") or ())
    cfg = ExtractConfig(**extract_overrides)
    workdir = Path(workdir) if workdir else output.parent / "lookalike-work"
    workdir.mkdir(parents=True, exist_ok=True)
    icfg = index_config or IndexConfig(factory=factory)
    rr = as_rerank_config(rerank)
    extractor = Extractor(cfg)
    g_store = workdir / f"gallery-{path_key(gallery)}-{cfg.fingerprint()}.h5"
    g = extractor.extract(gallery, g_store, progress=progress, label="gallery")
    _resolve_k(k, fmt, len(g.names))  # before any costly choice
    fixed = {"weights": explicit_weights or None, "whiten": icfg.whiten,
             "rerank": (rr or RerankConfig()) if rerank is not None else None}
    g_digest = rows_digest(g.names, g.features)  # what the gallery rows are: keys the cached choice and index
    choice, source = gallery_choice(extractor, g, gallery, select, gallery_labels, workdir, fixed, g_digest)
    g_features = g.features
    if choice is not None:
        if cfg.is_ensemble and tuple(choice.weights) != tuple(cfg.member_weights):
            extractor, g_store, g_features = reweighted(extractor, g, choice.weights, g_store)
            cfg = extractor.config
        if icfg.whiten is None:
            icfg = replace(icfg, whiten=choice.whiten)
        if rerank is None:
            rr = choice.rerank
    config = RunConfig(str(gallery), str(queries), str(output), fmt, k, str(workdir), icfg.factory, cfg.to_dict(),
                       asdict(icfg), rr.to_dict() if rr else None, str(select),
                       str(gallery_labels) if gallery_labels else None)
    index_key = hashlib.sha256(json.dumps(asdict(icfg), sort_keys=True).encode()).hexdigest()[:6]
    index_dir = workdir / f"index-{path_key(gallery)}-{cfg.fingerprint()}-{index_key}"
    digest = g_digest if g_features is g.features else rows_digest(g.names, g_features)
    col = None
    if Collection.exists(index_dir):
        # run's collection answers for the gallery as extracted: changes a service made to this
        # cached folder (its journal) are neither applied nor thrown away; it is reused only if it
        # was built from exactly these rows (another run may have refreshed the shared store)
        col = Collection.open(index_dir, replay=False)
        if col.names != g.names or col.manifest.get("rows_digest") != digest:
            col = None
    if col is None:
        store = FeatureStore(list(g.names), g_features, {**extractor.store_attrs(), "rows_digest": digest}, g.skipped)
        col = _build_index(store, index_dir, icfg, image_root=str(Path(gallery).resolve()), source=g_store)
    q_names, q_feats, q = query_rows(col, index_dir, queries, None, workdir, progress, extractor=extractor)
    kk = _resolve_k(k, fmt, len(col))
    scores, idx = _rank(col, q_feats, kk, progress, rr, spatial, queries, q_names, workdir / "local-features")
    write_results(output, fmt, q_names, col.names, scores, idx)
    sres = SearchResult(list(q_names), scores, idx, col.names, output, fmt, q)
    skipped_csv = output.with_name("skipped.csv")
    write_skipped_csv(skipped_csv, {"gallery": g.skipped, "queries": q.skipped})
    write_json_atomic(output.with_name(output.name + ".config.json"),
                      {"command": "run", **asdict(config), "index_dir": str(index_dir.resolve()), "spatial": spatial or None,
                       "choice": {k2: v for k2, v in choice.to_dict().items() if k2 != "table"} if choice else None})
    if choice is not None:
        write_json_atomic(output.with_name(output.name + ".selection.json"),
                          {"source": source, "models": [m.model for m in cfg.members()], **choice.to_dict()})
    return RunResult(sres, g, index_dir, workdir, skipped_csv, time.perf_counter() - t0, choice, source)


def update(index_dir, add=None, remove=None) -> tuple[int, int, int]:
    """``lookalike update``: add the rows of a feature store and/or remove the names listed in a
    text file (one per line); the folder is rewritten atomically. Returns (added, removed, rows)."""
    from ..formats import read_names
    from ..store import read_store

    from ..collection import FolderLock

    if not add and not remove:
        raise LookalikeError("nothing to do: give --add FEATS.h5 and/or --remove NAMES.txt")
    with FolderLock(index_dir, "updated"):  # from reading it to swapping the new version in: no lost update
        col = Collection.open(index_dir)
        removed = added = 0
        if remove:
            removed = col.remove(read_names(remove))
        if add:
            st = read_store(add)
            col.check_queries(st.features, st.model_id, str(add))
            col.add(st.names, st.features)
            added = len(st.names)
        col.save()
    return added, removed, len(col)
