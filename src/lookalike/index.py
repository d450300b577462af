"""Building a collection from a feature store: ``IndexConfig``, the faiss index (a factory string,
inner product on L2-normalised rows = cosine), optional PCA-whitening fitted on the gallery, and
``auto_whiten`` (the default for ``whiten=None``). The folder and everything done with it later
(search, add, remove, save, open) belong to :class:`lookalike.collection.Collection`.

``nprobe`` (IVF) and ``efSearch`` (HNSW) are set with faiss's ``ParameterSpace`` and saved with the
collection. Sharded building trains on a sample, adds each shard of the store to a copy of the
trained index, and merges the shards' inverted lists into one on-disk file
(``faiss.contrib.ondisk``), so the gallery never has to fit in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .collection import Collection, config_dict, new_manifest, write_new
from .errors import LookalikeError
from .store import FeatureStore, read_store


@dataclass
class IndexConfig:
    factory: str = "Flat"
    train_size: int = 200_000  # rows used to train IVF/PQ factories
    whiten: bool | None = None  # PCA-whitening fitted on the gallery, queries get the same; None: auto_whiten()
    pca_dim: int | None = None  # output dimension of the PCA (None: keep all)
    pca_power: float = 0.5  # 0.5 = full whitening, 0 = rotation only
    pca_shrinkage: float | None = None  # None: chosen from the data (PCAWhitening)
    shard_size: int = 0  # > 0: IVF only; add the store in shards of this many rows, merged on disk
    nprobe: int | None = None  # default search parameters, saved with the index
    ef_search: int | None = None


AUTO_WHITEN_MIN = 300  # photos; benchmarks/whitening.py measured galleries of 300 to 5,603


def auto_whiten(attrs: dict, n: int) -> bool:
    """The default for ``whiten=None``: on for galleries of at least ``AUTO_WHITEN_MIN`` photos whose
    features come from untrained models (ImageNet or copy-detection backbones, where whitening with
    data-chosen settings gained on both dev protocols and never lost: BENCHMARKS.md); off for trained
    runs (not measured), decoded codes, stores without member records, and small galleries."""
    try:
        members = json.loads(attrs.get("members", "") or "[]")
    except ValueError:
        members = []
    zero_shot = bool(members) and all(m.get("kind") in ("backbone", "embedding") for m in members)
    return zero_shot and n >= AUTO_WHITEN_MIN


def _faiss():
    import faiss

    return faiss


def build_index(store: FeatureStore | str | os.PathLike, out_dir=None, config: IndexConfig | None = None,
                image_root: str | None = None, source=None) -> Collection:
    """Build a faiss index (``config.factory``, inner product) from a store (a file, or one in
    memory whose file is ``source``); save it if ``out_dir``."""
    config = config or IndexConfig()
    if source is None:
        source = str(store) if not isinstance(store, FeatureStore) else "features"
    elif config.shard_size and isinstance(store, FeatureStore):
        store = source  # building in shards reads the file
    if config.shard_size:
        if isinstance(store, FeatureStore) or out_dir is None:
            raise LookalikeError("building in shards reads a feature store file and writes an index folder; give both")
        return _build_sharded(Path(store), Path(out_dir), config, image_root)
    if not isinstance(store, FeatureStore):
        store = read_store(store)
    x = np.ascontiguousarray(store.features, dtype=np.float32)
    if len(x) == 0:
        raise LookalikeError(f"{source}: the feature store is empty; extract some images first")
    input_dim = int(x.shape[1])
    transform = None
    if config.whiten is None:
        config = replace(config, whiten=auto_whiten(store.attrs, len(x)))
    if config.whiten:
        from .postprocess import PCAWhitening

        transform = PCAWhitening(config.pca_dim, config.pca_power, config.pca_shrinkage).fit(x)
        x = transform.transform(x)
    index = _factory_index(x.shape[1], config.factory)
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = x if len(x) <= config.train_size else x[np.sort(rng.choice(len(x), config.train_size, replace=False))]
        try:
            index.train(sample)
        except RuntimeError as e:
            raise LookalikeError(f"cannot train {config.factory!r} on {len(sample)} vectors ({str(e).strip().splitlines()[-1]}); "
                                 "use a smaller index or more images") from None
    index.add(x)
    col = Collection(index, list(store.names), _manifest(store.attrs, x.shape[1], input_dim, transform is not None,
                                                         len(x), config, image_root, source),
                     transform=transform, config=asdict(config))
    if config.nprobe or config.ef_search:
        col.set_search_params(config.nprobe, config.ef_search)
    if out_dir is not None:
        col.save(out_dir)
    return col


def _manifest(attrs: dict, dim: int, input_dim: int, whitening: bool, count: int, config: IndexConfig, image_root,
              source) -> dict:
    return new_manifest(attrs=attrs, dim=dim, input_dim=input_dim, whitening=whitening, count=count,
                        factory=config.factory, image_root=image_root, nprobe=config.nprobe, ef_search=config.ef_search,
                        ondisk=bool(config.shard_size), features=source)


def _factory_index(dim: int, factory: str):
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise LookalikeError(f"invalid faiss factory string {factory!r} ({first}); e.g. Flat, HNSW32, IVF1024,PQ32") from None


def _build_sharded(store_path: Path, out_dir: Path, config: IndexConfig, image_root) -> "Collection":
    """Train on a sample, add the store shard by shard to copies of the trained index, merge the
    shards' inverted lists into ``index.ivfdata`` (memory-mapped when searching)."""
    from faiss.contrib.ondisk import merge_ondisk

    from .store import open_rows, read_attrs

    faiss = _faiss()
    attrs = read_attrs(store_path)
    with open_rows(store_path) as (names, ds):
        n, input_dim = ds.shape
        if n == 0:
            raise LookalikeError(f"{store_path}: the feature store is empty; extract some images first")
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(n, min(n, config.train_size), replace=False))
        sample = np.ascontiguousarray(ds[rows], dtype=np.float32)
        transform = None
        if config.whiten is None:
            config = replace(config, whiten=auto_whiten(attrs, n))
        if config.whiten:
            from .postprocess import PCAWhitening

            transform = PCAWhitening(config.pca_dim, config.pca_power, config.pca_shrinkage).fit(sample)
            sample = transform.transform(sample)
        trained = _factory_index(sample.shape[1], config.factory)
        try:
            faiss.extract_index_ivf(trained)
        except RuntimeError:
            raise LookalikeError(f"building in shards needs an IVF factory (e.g. IVF4096,Flat or IVF4096,PQ32), "
                                 f"not {config.factory!r}") from None
        if not trained.is_trained:
            trained.train(sample)
        del sample

        def write(tmp: Path) -> Collection:
            shard_files = []
            for s in range(0, n, config.shard_size):
                x = np.ascontiguousarray(ds[s : s + config.shard_size], dtype=np.float32)
                if transform is not None:
                    x = transform.transform(x)
                shard = faiss.clone_index(trained)
                shard.add_with_ids(x, np.arange(s, s + len(x), dtype=np.int64))
                path = tmp / f"shard-{len(shard_files):05d}.faiss"
                faiss.write_index(shard, str(path))
                shard_files.append(str(path))
                del shard, x
            merged = faiss.clone_index(trained)
            merge_ondisk(merged, shard_files, str(tmp / "index.ivfdata"))
            for p in shard_files:
                os.remove(p)
            faiss.write_index(merged, str(tmp / "index.faiss"))
            manifest = _manifest(attrs, trained.d, input_dim, transform is not None, n, config, image_root, store_path)
            return Collection(merged, names, manifest, transform=transform, config=asdict(config))

        write_new(out_dir, write)
    return load_collection(out_dir)


def load_collection(path) -> Collection:
    """Open a collection folder (:meth:`Collection.open`)."""
    return Collection.open(path)


def save_collection(col: Collection, out_dir, config: IndexConfig | None = None) -> None:
    """Write a collection folder (:meth:`Collection.save`); ``config`` replaces the build settings."""
    col.save(out_dir, config_dict(config) if config is not None else None)
