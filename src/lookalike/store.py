"""The HDF5 feature store: one file per image set.

Schema (h5py):
  - ``features``  (n, d) float32 (or float16), rows L2-normalised, chunked and compressed-free;
  - ``names``     (n,) UTF-8 strings, aligned with ``features``;
  - ``skipped_names`` / ``skipped_reasons`` (m,) UTF-8: files that could not be decoded;
  - attributes: ``fingerprint`` (weights + pooling + preprocessing + TTA), ``model_id``
    (weights + pooling: what must match for two stores to be comparable), ``model``, ``pooling``,
    ``preprocess`` (JSON), ``config`` (JSON of the extract config), ``created_by``.

A store is always written whole to a temporary file and renamed into place, so a reader never
sees a half-written file; resumable extraction keeps its progress in a ``.parts`` folder beside it.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from ._io import atomic_path
from .errors import LookalikeError

STR = h5py.string_dtype("utf-8")


@dataclass
class FeatureStore:
    names: list[str]
    features: np.ndarray
    attrs: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    signatures: list[str] | None = None  # per row, the image file's size:mtime when it was embedded

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def fingerprint(self) -> str:
        return self.attrs.get("fingerprint", "")

    @property
    def model_id(self) -> str:
        return self.attrs.get("model_id", "")


def _decode(a) -> list[str]:
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in a]


@contextlib.contextmanager
def open_rows(path: str | os.PathLike):
    """``(names, features dataset)`` of a store, read lazily (slices of the dataset are read on
    demand): for galleries larger than memory (building an index in shards)."""
    read_attrs(path)  # a clear error for a missing or unreadable file
    with h5py.File(path, "r") as f:
        if "features" not in f or "names" not in f:
            raise LookalikeError(f"{path}: missing 'features' or 'names'; not a lookalike feature store")
        yield _decode(f["names"][()]), f["features"]


def read_attrs(path: str | os.PathLike) -> dict:
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except FileNotFoundError:
        raise LookalikeError(f"{path}: feature store not found; create it with `lookalike extract`") from None
    except OSError as e:
        raise LookalikeError(f"{path}: not a readable HDF5 feature store ({e}); re-run `lookalike extract`") from None


def read_store(path: str | os.PathLike, dtype=np.float32) -> FeatureStore:
    path = Path(path)
    attrs = read_attrs(path)
    with h5py.File(path, "r") as f:
        if "features" not in f or "names" not in f:
            raise LookalikeError(f"{path}: missing 'features' or 'names'; not a lookalike feature store")
        feats = f["features"][()].astype(dtype, copy=False)
        names = _decode(f["names"][()])
        skipped = []
        if "skipped_names" in f:
            skipped = list(zip(_decode(f["skipped_names"][()]), _decode(f["skipped_reasons"][()])))
        signatures = _decode(f["signatures"][()]) if "signatures" in f else None
    if feats.ndim != 2 or feats.shape[0] != len(names):
        raise LookalikeError(f"{path}: features {feats.shape} and {len(names)} names disagree; re-extract")
    if signatures is not None and len(signatures) != len(names):
        signatures = None  # not trusted: every row counts as changed
    return FeatureStore(names, feats, attrs, skipped, signatures)


def write_store(
    path: str | os.PathLike,
    names: list[str],
    features: np.ndarray | Iterable[np.ndarray],
    attrs: dict,
    skipped: list[tuple[str, str]] = (),
    dtype: str = "float32",
    n: int | None = None,
    dim: int | None = None,
    signatures: list[str] | None = None,
) -> None:
    """Write a store atomically. ``features`` is an array or an iterable of row blocks (streamed);
    ``signatures``: per row, the image file's ``size:mtime`` (what extraction caches are checked by)."""
    if isinstance(features, np.ndarray):
        n, dim, blocks = features.shape[0], features.shape[1], [features]
    else:
        blocks = features
    if n != len(names):
        raise ValueError(f"{n} feature rows for {len(names)} names")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset(
                "features", shape=(n, dim), dtype=dtype, chunks=(max(1, min(n, 1024)), dim) if n else None
            )
            row = 0
            for b in blocks:
                ds[row : row + len(b)] = b
                row += len(b)
            if row != n:
                raise ValueError(f"wrote {row} rows, expected {n}")
            f.create_dataset("names", data=np.array(names, dtype=object), dtype=STR)
            if signatures is not None:
                if len(signatures) != n:
                    raise ValueError(f"{len(signatures)} signatures for {n} rows")
                f.create_dataset("signatures", data=np.array(signatures, dtype=object), dtype=STR)
            f.create_dataset("skipped_names", data=np.array([s[0] for s in skipped], dtype=object), dtype=STR)
            f.create_dataset("skipped_reasons", data=np.array([s[1] for s in skipped], dtype=object), dtype=STR)
            for k, v in attrs.items():
                f.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v)
