"""A searchable collection: a faiss index built from a feature store, with names and fingerprint.

Layout of a collection folder (written to a temporary folder, then renamed into place):
  - ``index.faiss``   the faiss index (inner product on L2-normalised rows = cosine);
  - ``names.json``    gallery names, row i of the index is ``names[i]``;
  - ``manifest.json`` fingerprint, model_id, dimension, count, factory string, the extract config
                      (so queries are embedded the same way), the image root, versions.
  - ``index.ivfdata`` only for indexes built in shards (``shard_size``): the inverted lists on disk,
                      memory-mapped at search time (faiss ``OnDiskInvertedLists``).
Search returns ``(scores, indices)`` like faiss, best first. Index types are faiss factory strings;
``nprobe`` (IVF) and ``efSearch`` (HNSW) are set with faiss's ``ParameterSpace``. Rows can be added
and removed later (:meth:`Collection.add`, :meth:`Collection.remove`; ``lookalike update``): Flat
indexes compact, IVF indexes keep row numbers (a removed row's name becomes ``null``), HNSW cannot
remove. Sharded building trains on a sample, adds each shard of the store to a copy of the trained
index, and merges the shards' inverted lists into one on-disk file (``faiss.contrib.ondisk``), so the
gallery never has to fit in memory.
"""
from __future__ import annotations

import json
import os
from collections import Counter
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ._version import __version__
from ._io import write_json_atomic
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


class Collection:
    def __init__(self, index, names: list[str], manifest: dict, path: Path | None = None, transform=None):
        self.index = index
        self.names = names
        self.manifest = manifest
        self.path = path
        self.transform = transform  # PCAWhitening applied to queries (the index holds transformed rows)

    @property
    def dim(self) -> int:
        """Dimension of the features given to :meth:`search` (before any whitening)."""
        return int(self.manifest.get("input_dim", self.manifest["dim"]))

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """Raw query features -> the space the index lives in."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self.transform.transform(x) if self.transform is not None else x

    def gallery_features(self) -> np.ndarray:
        """The indexed (transformed) gallery vectors, for re-ranking; needs a Flat-storing index."""
        try:
            return self.index.reconstruct_n(0, self.index.ntotal)
        except RuntimeError:
            raise LookalikeError(
                f"{self.path}: re-ranking needs the gallery vectors, which a {self.manifest.get('factory')} "
                "index does not keep; build the index with --factory Flat (or HNSW32,Flat)"
            ) from None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def check_queries(self, features: np.ndarray, model_id: str | None, source: str = "queries") -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise LookalikeError(
                f"{source}: features have dimension {features.shape[-1]}, the index {self.path} has {self.dim}; "
                "extract the queries with the index's model"
            )
        if model_id and self.manifest.get("model_id") and model_id != self.manifest.get("model_id"):
            raise LookalikeError(
                f"{source}: made by another model (model_id {model_id}, index {self.manifest.get('model_id')}: "
                f"{self.manifest.get('model')}/{self.manifest.get('pooling')}); extract the queries with the index's model"
            )

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise LookalikeError(f"k must be at least 1, got {k}")
        if k > len(self):
            raise LookalikeError(f"k={k} is larger than the gallery ({len(self)} images); use -k {len(self)} or less")
        return self.index.search(self.prepare(features), k)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF ``nprobe`` (inverted lists visited) and HNSW ``efSearch`` (candidate list size)."""
        set_search_params(self.index, nprobe, ef_search, self.manifest.get("factory", "?"))

    # --- changes after building
    def _kind(self) -> str:
        faiss = _faiss()
        if self.manifest.get("ondisk"):
            return "ondisk"
        base = faiss.downcast_index(self.index.index if isinstance(self.index, faiss.IndexPreTransform) else self.index)
        if isinstance(base, faiss.IndexFlat):
            return "flat"
        try:
            faiss.extract_index_ivf(self.index)
            return "ivf"
        except RuntimeError:
            return "other"

    def add(self, names: list[str], features: np.ndarray) -> None:
        """Append rows (names must be new); searchable at once; :func:`save_collection` keeps them."""
        names = [str(n) for n in names]
        have = set(self.names)
        dup = [n for n in names if n in have] or [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise LookalikeError(f"{dup[0]!r} is already in the index; remove it first or rename it")
        x = self.prepare(features)
        if x.shape[0] != len(names) or (len(x) and x.shape[1] != self.index.d):
            raise LookalikeError(f"{len(names)} names for features of shape {features.shape}; the index has dimension {self.dim}")
        kind = self._kind()
        if kind == "ondisk":
            raise LookalikeError(f"{self.path}: an index built in shards (on-disk lists) is read-only; rebuild it with the new store")
        if kind == "ivf":
            self.index.add_with_ids(x, np.arange(len(self.names), len(self.names) + len(x), dtype=np.int64))
        else:
            self.index.add(x)
        self.names.extend(names)
        self.manifest["count"] = int(self.index.ntotal)

    def remove(self, names: list[str]) -> int:
        """Remove rows by name; returns how many were removed (unknown names are an error)."""
        row_of = {n: i for i, n in enumerate(self.names) if n is not None}
        missing = [n for n in names if n not in row_of]
        if missing:
            raise LookalikeError(f"{missing[0]!r} is not in the index" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        kind = self._kind()
        if kind in ("ondisk", "other"):
            raise LookalikeError(f"a {self.manifest.get('factory')} index{' built in shards' if kind == 'ondisk' else ''} "
                                 "cannot remove rows; rebuild it without them (or use Flat / IVF)")
        ids = np.array(sorted(row_of[n] for n in set(names)), dtype=np.int64)
        removed = int(self.index.remove_ids(ids))
        if kind == "flat":  # faiss compacts a flat index: the names follow
            gone = set(ids.tolist())
            self.names = [n for i, n in enumerate(self.names) if i not in gone]
        else:  # IVF keeps row numbers
            for i in ids:
                self.names[i] = None
        self.manifest["count"] = int(self.index.ntotal)
        return removed


def build_index(store: FeatureStore | str | os.PathLike, out_dir=None, config: IndexConfig | None = None,
                image_root: str | None = None) -> Collection:
    """Build a faiss index (``config.factory``, inner product) from a store; save it if ``out_dir``."""
    config = config or IndexConfig()
    source = str(store) if not isinstance(store, FeatureStore) else "features"
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
                                                         len(x), config, image_root, source), transform=transform)
    if config.nprobe or config.ef_search:
        col.set_search_params(config.nprobe, config.ef_search)
    if out_dir is not None:
        save_collection(col, out_dir, config)
    return col


def _manifest(attrs: dict, dim: int, input_dim: int, whitening: bool, count: int, config: IndexConfig, image_root, source) -> dict:
    faiss = _faiss()
    return dict(
        fingerprint=attrs.get("fingerprint", ""), model_id=attrs.get("model_id", ""), model=attrs.get("model", ""),
        pooling=attrs.get("pooling", ""), extract_config=json.loads(attrs.get("config", "{}") or "{}"),
        dim=int(dim), input_dim=int(input_dim), whitening=whitening, count=int(count),
        factory=config.factory, image_root=image_root, nprobe=config.nprobe, ef_search=config.ef_search,
        ondisk=bool(config.shard_size), features=str(source), created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        created_by=f"lookalike {__version__}", faiss=getattr(faiss, "__version__", "?"),
    )


def set_search_params(index, nprobe: int | None, ef_search: int | None, factory: str = "?") -> None:
    faiss = _faiss()
    ps = faiss.ParameterSpace()
    for name, value, kind in (("nprobe", nprobe, "IVF"), ("efSearch", ef_search, "HNSW")):
        if value is None:
            continue
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError:
            flag = "--nprobe" if name == "nprobe" else "--ef-search"
            raise LookalikeError(f"{flag} applies to {kind} indexes; this one is {factory}") from None


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
    import h5py
    from faiss.contrib.ondisk import merge_ondisk

    from .store import _decode, read_attrs

    faiss = _faiss()
    attrs = read_attrs(store_path)
    with h5py.File(store_path, "r") as f:
        ds = f["features"]
        n, input_dim = ds.shape
        if n == 0:
            raise LookalikeError(f"{store_path}: the feature store is empty; extract some images first")
        names = _decode(f["names"][()])
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
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
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
            write_json_atomic(tmp / "names.json", names)
            write_json_atomic(tmp / "config.json", asdict(config))
            if transform is not None:
                transform.save(tmp / "whitening.npz")
            write_json_atomic(tmp / "manifest.json", manifest)
            _swap_in(tmp, out_dir)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return load_collection(out_dir)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished folder ``tmp`` (the old one is removed after)."""
    old = None
    if out_dir.exists():
        if not (out_dir / "manifest.json").exists() and any(out_dir.iterdir()):
            raise LookalikeError(f"{out_dir}: exists and is not a lookalike index; choose another -o")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_collection(col: Collection, out_dir, config: IndexConfig | None = None) -> None:
    """Write into a temporary sibling folder, then swap it in (the old one is removed after)."""
    faiss = _faiss()
    out_dir = Path(out_dir)
    if col.manifest.get("ondisk"):
        raise LookalikeError(f"{col.path}: an index built in shards is written once; rebuild it instead of saving a copy")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        faiss.write_index(col.index, str(tmp / "index.faiss"))
        write_json_atomic(tmp / "names.json", col.names)
        if config is None and col.path is not None and (Path(col.path) / "config.json").exists():
            shutil.copy(Path(col.path) / "config.json", tmp / "config.json")  # an update keeps the build settings
        else:
            write_json_atomic(tmp / "config.json", asdict(config or IndexConfig()))
        if col.path is not None and Path(col.path).resolve() == out_dir.resolve():
            for extra in ("journal.jsonl", "items"):  # changes made by `lookalike serve` stay with the index
                if (out_dir / extra).exists():
                    (shutil.copytree if (out_dir / extra).is_dir() else shutil.copy2)(out_dir / extra, tmp / extra)
        if col.transform is not None:
            col.transform.save(tmp / "whitening.npz")
        write_json_atomic(tmp / "manifest.json", col.manifest)
        _swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    col.path = out_dir


def load_collection(path) -> Collection:
    faiss = _faiss()
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise LookalikeError(f"{path}: not a lookalike index (no manifest.json); build one with `lookalike index`")
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        names = json.loads((path / "names.json").read_text(encoding="utf-8"))
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.get("ondisk") else 0
        index = faiss.read_index(str(path / "index.faiss"), flags)
    except (OSError, ValueError, RuntimeError) as e:
        raise LookalikeError(f"{path}: damaged index ({type(e).__name__}); rebuild it with `lookalike index`") from None
    if index.ntotal != sum(n is not None for n in names) or index.d != manifest.get("dim"):
        raise LookalikeError(f"{path}: index, names and manifest disagree; rebuild it with `lookalike index`")
    transform = None
    if manifest.get("whitening"):
        from .postprocess import PCAWhitening

        transform = PCAWhitening.load(path / "whitening.npz")
    col = Collection(index, names, manifest, path, transform)
    if manifest.get("nprobe") or manifest.get("ef_search"):
        col.set_search_params(manifest.get("nprobe"), manifest.get("ef_search"))
    return col
