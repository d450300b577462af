"""Query features for a collection: read from a feature store, or extracted from images with the
collection's own settings and cached under a key of the query folder and those settings."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..collection import Collection
from ..errors import LookalikeError


def path_key(path) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]


def query_rows(col: Collection, index_dir, queries, query_features, workdir, progress: bool,
                    extract_overrides: dict | None = None, extractor=None):
    """Query names and features from a store, or extracted (and cached in ``workdir``) with the
    collection's settings; checked against the collection. Returns (names, features, ExtractResult
    or None)."""
    if (queries is None) == (query_features is None):
        raise LookalikeError("give either --queries (images) or --query-features (a feature store), not both")
    ext = None
    if query_features is not None:
        from ..store import read_store

        store = read_store(query_features)
        names, feats, model_id, source = store.names, store.features, store.model_id, str(query_features)
    else:
        from ..extract import Extractor

        if extractor is None:
            extractor = Extractor(col.extract_config(**(extract_overrides or {})))
        cfg = extractor.config
        workdir = Path(workdir) if workdir else Path(index_dir) / "queries"
        store_path = workdir / f"queries-{path_key(queries)}-{cfg.fingerprint()}.h5"
        ext = extractor.extract(queries, store_path, progress=progress, label="queries")
        names, feats, model_id, source = ext.names, ext.features, cfg.model_id(), str(queries)
    col.check_queries(feats, model_id, source)
    return names, feats, ext


def rows_digest(names: list[str], features: np.ndarray) -> str:
    """SHA-256 of names and feature bytes: which rows a collection was built from."""
    h = hashlib.sha256(json.dumps(names).encode())
    h.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return h.hexdigest()
