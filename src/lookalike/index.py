"""A searchable collection: a faiss index built from a feature store, with names and fingerprint.

Layout of a collection folder (written to a temporary folder, then renamed into place):
  - ``index.faiss``   the faiss index (inner product on L2-normalised rows = cosine);
  - ``names.json``    gallery names, row i of the index is ``names[i]``;
  - ``manifest.json`` fingerprint, model_id, dimension, count, factory string, the extract config
                      (so queries are embedded the same way), the image root, versions.
Search returns ``(scores, indices)`` like faiss, best first.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import __version__
from ._io import write_json_atomic
from .errors import LookalikeError
from .store import FeatureStore, read_store


@dataclass
class IndexConfig:
    factory: str = "Flat"
    train_size: int = 200_000  # rows used to train IVF/PQ factories
    whiten: bool = False  # fit PCA-whitening on the gallery; queries get the same transform
    pca_dim: int | None = None  # output dimension of the PCA (None: keep all)
    pca_power: float = 0.5  # 0.5 = full whitening, 0 = rotation only
    pca_shrinkage: float = 0.0


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
        return len(self.names)

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


def build_index(store: FeatureStore | str | os.PathLike, out_dir=None, config: IndexConfig | None = None,
                image_root: str | None = None) -> Collection:
    """Build a faiss index (``config.factory``, inner product) from a store; save it if ``out_dir``."""
    faiss = _faiss()
    config = config or IndexConfig()
    source = str(store) if not isinstance(store, FeatureStore) else "features"
    if not isinstance(store, FeatureStore):
        store = read_store(store)
    x = np.ascontiguousarray(store.features, dtype=np.float32)
    if len(x) == 0:
        raise LookalikeError(f"{source}: the feature store is empty; extract some images first")
    input_dim = int(x.shape[1])
    transform = None
    if config.whiten:
        from .postprocess import PCAWhitening

        transform = PCAWhitening(config.pca_dim, config.pca_power, config.pca_shrinkage).fit(x)
        x = transform.transform(x)
    try:
        index = faiss.index_factory(x.shape[1], config.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise LookalikeError(f"invalid faiss factory string {config.factory!r} ({first}); e.g. Flat, HNSW32, IVF1024,PQ32") from None
    if not index.is_trained:
        rng = np.random.default_rng(0)
        sample = x if len(x) <= config.train_size else x[rng.choice(len(x), config.train_size, replace=False)]
        try:
            index.train(sample)
        except RuntimeError as e:
            raise LookalikeError(f"cannot train {config.factory!r} on {len(sample)} vectors ({str(e).strip().splitlines()[-1]}); "
                                 "use a smaller index or more images") from None
    index.add(x)
    attrs = store.attrs
    manifest = dict(
        fingerprint=attrs.get("fingerprint", ""), model_id=attrs.get("model_id", ""), model=attrs.get("model", ""),
        pooling=attrs.get("pooling", ""), extract_config=json.loads(attrs.get("config", "{}") or "{}"),
        dim=int(x.shape[1]), input_dim=input_dim, whitening=transform is not None, count=int(len(x)),
        factory=config.factory, image_root=image_root,
        features=str(source), created=time.strftime("%Y-%m-%dT%H:%M:%S"), created_by=f"lookalike {__version__}",
        faiss=getattr(faiss, "__version__", "?"),
    )
    col = Collection(index, list(store.names), manifest, transform=transform)
    if out_dir is not None:
        save_collection(col, out_dir, config)
    return col


def save_collection(col: Collection, out_dir, config: IndexConfig | None = None) -> None:
    """Write into a temporary sibling folder, then swap it in (the old one is removed after)."""
    faiss = _faiss()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        faiss.write_index(col.index, str(tmp / "index.faiss"))
        write_json_atomic(tmp / "names.json", col.names)
        write_json_atomic(tmp / "config.json", asdict(config or IndexConfig()))
        if col.transform is not None:
            col.transform.save(tmp / "whitening.npz")
        write_json_atomic(tmp / "manifest.json", col.manifest)
        old = None
        if out_dir.exists():
            if not (out_dir / "manifest.json").exists() and any(out_dir.iterdir()):
                raise LookalikeError(f"{out_dir}: exists and is not a lookalike index; choose another -o")
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
        index = faiss.read_index(str(path / "index.faiss"))
    except (OSError, ValueError, RuntimeError) as e:
        raise LookalikeError(f"{path}: damaged index ({type(e).__name__}); rebuild it with `lookalike index`") from None
    if index.ntotal != len(names) or index.d != manifest.get("dim"):
        raise LookalikeError(f"{path}: index, names and manifest disagree; rebuild it with `lookalike index`")
    transform = None
    if manifest.get("whitening"):
        from .postprocess import PCAWhitening

        transform = PCAWhitening.load(path / "whitening.npz")
    return Collection(index, names, manifest, path, transform)
