"""A collection: a searchable gallery and the one folder that holds it.

:class:`Collection` is the only code that reads or writes a collection folder:

  - ``index.faiss``   the faiss index (inner product on L2-normalised rows = cosine);
  - ``names.json``    gallery names: row i of the index is ``names[i]`` (``null`` for a row an IVF
                      index removed: IVF keeps row numbers);
  - ``manifest.json`` fingerprint, model_id, dimensions, count, factory string, the extraction
                      settings (so queries are embedded the same way), the image root, versions;
  - ``config.json``   the build settings (``IndexConfig``);
  - ``whitening.npz`` the PCA-whitening fitted on the gallery, when there is one;
  - ``index.ivfdata`` only for indexes built in shards: inverted lists on disk, memory-mapped;
  - ``journal.jsonl`` rows added and removed since the folder was written (``lookalike serve``):
                      one JSON line per change, fsynced before it is acknowledged, replayed by
                      :meth:`Collection.open`; a torn last line is ignored with a warning;
  - ``items/``        image files of rows added through the service (listed in the manifest's
                      ``items`` once :meth:`Collection.save` folds the journal in).

Rows change in one way only: :meth:`Collection.add` and :meth:`Collection.remove` (used by
``lookalike update`` and by the service alike). A removal marks the row deleted (search asks faiss
for ``k`` + #deleted and filters them out); :meth:`Collection.save` compacts: Flat indexes drop
the rows (names follow), IVF indexes keep row numbers (the name becomes ``null``), other indexes
(HNSW, code indexes) cannot drop rows: their removed rows are kept as a list in the manifest
(``deleted_rows``) and stay filtered out; an index built in shards is written once (removals made
through the service live in its journal). New rows of an IVF index get explicit ids equal to their row number, so
names and faiss ids never drift apart. ``save`` writes a complete folder beside the old one and
swaps it in; the journal is folded into it.

Written here rather than taken from a library: faiss stores vectors, not names, settings or a
change log; this is that bookkeeping, kept in one place.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ._io import atomic_path, write_json_atomic
from ._version import __version__
from . import flatscan
from .errors import LookalikeError, check_k
from .numeric import best_first
from .paths import confined

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
ITEMS = "items"


def _faiss():
    import faiss

    return faiss


def new_manifest(*, dim: int, input_dim: int, count: int, factory: str, attrs: dict | None = None,
                 whitening: bool = False, image_root=None, nprobe=None, ef_search=None, ondisk: bool = False,
                 features=None, **extra) -> dict:
    """The manifest of a new collection; ``attrs`` are the feature store's attributes (model
    identity and extraction settings)."""
    attrs = attrs or {}
    extract_config = attrs.get("config", "{}")
    return dict(
        fingerprint=attrs.get("fingerprint", ""), model_id=attrs.get("model_id", ""), model=attrs.get("model", ""),
        pooling=attrs.get("pooling", ""),
        extract_config=json.loads(extract_config or "{}") if isinstance(extract_config, str) else dict(extract_config),
        dim=int(dim), input_dim=int(input_dim), whitening=bool(whitening), count=int(count),
        factory=factory, image_root=None if image_root is None else str(image_root), nprobe=nprobe, ef_search=ef_search,
        ondisk=bool(ondisk), features=None if features is None else str(features),
        rows_digest=attrs.get("rows_digest", ""),  # what the rows were built from (run reuses only an equal one)
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        created_by=f"lookalike {__version__}", faiss=getattr(_faiss(), "__version__", "?"), **extra,
    )


def read_manifest(path) -> dict:
    """The manifest of the collection folder ``path`` (without loading its index)."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        recover(path)  # a writer killed mid-swap leaves the previous version beside it
    if not (path / MANIFEST).is_file():
        raise LookalikeError(f"{path}: not a lookalike index (no manifest.json); build one with `lookalike index`")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LookalikeError(f"{path}: damaged index ({type(e).__name__}); rebuild it with `lookalike index`") from None
    if not isinstance(manifest, dict):
        raise LookalikeError(f"{path}: damaged index (manifest is not an object); rebuild it with `lookalike index`")
    return manifest


def confined_name(name: str) -> str:
    """An item name as a relative path that cannot leave its folder (see ``paths.confined``)."""
    return confined(".", name).as_posix()


def image_base(root) -> Path | None:
    """The folder that gallery names are relative to: the image root, or the folder of a list file."""
    if not root:
        return None
    root = Path(root)
    return root.parent if root.is_file() else root


class Collection:
    def __init__(self, index, names: list, manifest: dict, path: Path | None = None, transform=None,
                 config: dict | None = None):
        self.index = index
        self.names = list(names)  # row -> name (None: a row an IVF index removed)
        self.manifest = manifest
        self.path = None if path is None else Path(path)
        self.transform = transform  # PCAWhitening applied to queries (the index holds transformed rows)
        self.config = config  # build settings (IndexConfig as a dict), saved as config.json
        # removed rows still in the faiss index (filtered from results): since the folder was written, or
        # for indexes that cannot drop rows (HNSW) kept in the manifest
        self.deleted: set[int] = {int(i) for i in manifest.get("deleted_rows") or []}
        self.row_of = {n: i for i, n in enumerate(self.names) if n is not None and i not in self.deleted}
        self.items: set[str] = set(manifest.get("items") or [])  # names whose image lives in items/
        self._scan = None  # flatscan.FlatScan for a Flat inner-product index (built at the first search)

    # ------------------------------------------------------------------ opening and saving
    @staticmethod
    def exists(path) -> bool:
        """Is ``path`` a collection folder (it has a manifest; an interrupted swap is undone first)?"""
        if not (Path(path) / MANIFEST).is_file():
            recover(path)
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def open(cls, path, replay: bool = True) -> "Collection":
        """Load a collection folder (and replay its journal of changes)."""
        faiss = _faiss()
        path = Path(path)
        with _read_lock(path):  # (read_manifest undoes an interrupted swap first)  # every file from one version (a writer swaps only between readers)
            return cls._read(path, replay, faiss)

    @classmethod
    def _read(cls, path: Path, replay: bool, faiss) -> "Collection":
        manifest = read_manifest(path)
        try:
            names = json.loads((path / "names.json").read_text(encoding="utf-8"))
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.get("ondisk") else 0
            index = faiss.read_index(str(path / "index.faiss"), flags)
            config = json.loads((path / "config.json").read_text(encoding="utf-8")) if (path / "config.json").is_file() else None
        except (OSError, ValueError, RuntimeError) as e:
            raise LookalikeError(f"{path}: damaged index ({type(e).__name__}); rebuild it with `lookalike index`") from None
        if (not isinstance(names, list) or not all(n is None or isinstance(n, str) for n in names)
                or index.ntotal != sum(n is not None for n in names) or index.d != manifest.get("dim")):
            raise LookalikeError(f"{path}: index, names and manifest disagree; rebuild it with `lookalike index`")
        deleted = manifest.get("deleted_rows") or []
        if not isinstance(deleted, list) or not all(isinstance(i, int) and 0 <= i < len(names) for i in deleted):
            raise LookalikeError(f"{path}: damaged manifest (deleted_rows); rebuild it with `lookalike index`")
        gone = set(deleted)  # a removed row's name may come back as a new row (HNSW keeps the old one)
        live = [n for i, n in enumerate(names) if n is not None and i not in gone]
        if len(set(live)) != len(live):
            raise LookalikeError(f"{path}: names.json lists a name twice; rebuild it with `lookalike index`")
        if not isinstance(manifest.get("items") or [], list) or not isinstance(manifest.get("input_dim", 0), int):
            raise LookalikeError(f"{path}: damaged manifest; rebuild it with `lookalike index`")
        transform = None
        if manifest.get("whitening"):
            from .postprocess import PCAWhitening

            transform = PCAWhitening.load(path / "whitening.npz")
        col = cls(index, names, manifest, path, transform, config)
        if manifest.get("nprobe") or manifest.get("ef_search"):
            col.set_search_params(manifest.get("nprobe"), manifest.get("ef_search"))
        if replay:
            col._replay()
        return col

    def save(self, out_dir=None, config: dict | None = None) -> Path:
        """Write the whole collection (journal folded in, removed rows compacted) into a temporary
        sibling folder, then swap it in place of ``out_dir`` (default: where it was opened)."""
        faiss = _faiss()
        out_dir = Path(out_dir) if out_dir is not None else self.path
        if out_dir is None:
            raise LookalikeError("save: give the folder to write the collection to")
        if self.manifest.get("ondisk"):
            raise LookalikeError(f"{self.path}: an index built in shards is written once; rebuild it instead of saving a copy")
        if config is not None:
            self.config = config
        self._compact()

        def write(tmp: Path) -> "Collection":
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            return self

        write_new(out_dir, write)
        return out_dir

    def _write_files(self, folder: Path) -> None:
        """Everything but the faiss index (written by the caller: in one piece, or merged on disk)."""
        self.manifest["count"] = len(self)
        live_items = sorted(n for n in self.items if n in self.row_of)
        if live_items:
            self.manifest["items"] = live_items
        else:
            self.manifest.pop("items", None)
        write_json_atomic(folder / "names.json", self.names)
        write_json_atomic(folder / "config.json", self.config if self.config is not None else {})
        if self.transform is not None:
            self.transform.save(folder / "whitening.npz")
        for name in live_items:  # images of rows added through the service come along
            src = self.path / ITEMS / name if self.path else None
            if src is not None and src.is_file():
                dest = folder / ITEMS / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
        write_json_atomic(folder / MANIFEST, self.manifest)

    # ------------------------------------------------------------------ what it is
    @property
    def dim(self) -> int:
        """Dimension of the features given to :meth:`search` (before any whitening)."""
        return int(self.manifest.get("input_dim", self.manifest["dim"]))

    @property
    def model_id(self) -> str:
        return self.manifest.get("model_id", "") or ""

    def __len__(self) -> int:
        """Rows that can be found (removed rows excluded)."""
        return int(self.index.ntotal) - len(self.deleted)

    def live_names(self) -> list[str]:
        return [n for i, n in enumerate(self.names) if n is not None and i not in self.deleted]

    @property
    def index_dim(self) -> int:
        """Dimension of the vectors in the faiss index (after any whitening)."""
        return int(self.manifest["dim"])

    @property
    def has_extract_config(self) -> bool:
        """Were the gallery's extraction settings recorded (not for decoded codes or old stores)?"""
        return bool(self.manifest.get("extract_config"))

    def extract_config(self, **overrides):
        """The extraction settings the gallery was embedded with (queries must match them).
        Saved settings may not name code to import unless ``trust_remote_code=True`` is given."""
        from .extract import ExtractConfig

        saved = self.manifest.get("extract_config") or {}
        if not saved and not overrides:
            log.warning("%s has no extraction settings; embedding queries with the defaults", self.path)
        if not isinstance(saved, dict):
            raise LookalikeError(f"{self.path}: damaged manifest (extract_config); rebuild it with `lookalike index`")
        return ExtractConfig.from_dict({**saved, **overrides}, trusted=bool(overrides.get("trust_remote_code")),
                                       source=str((self.path or Path("?")) / MANIFEST))

    @property
    def feature_store(self) -> str | None:
        """The feature store the gallery was indexed from (referenced, not copied)."""
        return self.manifest.get("features")

    @property
    def image_root(self) -> Path | None:
        root = self.manifest.get("image_root")
        return Path(root) if root else None

    def row_paths(self) -> list[Path | None]:
        """Where each row's image file should be (not checked; None for a removed IVF row)."""
        root = image_base(self.manifest.get("image_root"))
        items = self.path / ITEMS if self.path else None
        return [None if n is None else (items / n if n in self.items and items else root / n if root else None)
                for n in self.names]

    def image_path(self, name: str) -> Path:
        """The image file of a gallery row: under ``items/`` for rows added through the service
        (confined there), else where the gallery named it (under the image root, or a list file's
        line): links the gallery contains are followed. A name that is not in the collection is an
        error; nothing else is ever looked up."""
        if name not in self.row_of:
            raise LookalikeError(f"no image named {name!r} in the collection")
        if name in self.items:
            if self.path is None:
                raise LookalikeError(f"image file of {name!r} is missing")
            base = (self.path / ITEMS).resolve()
            path = (base / name).resolve()
            if not path.is_relative_to(base):
                raise LookalikeError(f"image file of {name!r} is missing")
        else:
            base = image_base(self.manifest.get("image_root"))
            if base is None:
                raise LookalikeError("this collection was indexed without --image-root; its images cannot be shown")
            path = base / name
        if not path.is_file():
            raise LookalikeError(f"image file of {name!r} is missing")
        return path

    # ------------------------------------------------------------------ searching
    def prepare(self, features: np.ndarray) -> np.ndarray:
        """Raw query features -> the space the index lives in."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self.transform.transform(x) if self.transform is not None else x

    def check_queries(self, features: np.ndarray, model_id: str | None, source: str = "queries") -> None:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise LookalikeError(
                f"{source}: features have dimension {features.shape[-1]}, the index {self.path} has {self.dim}; "
                "extract the queries with the index's model"
            )
        if model_id and self.model_id and model_id != self.model_id:
            raise LookalikeError(
                f"{source}: made by another model (model_id {model_id}, index {self.model_id}: "
                f"{self.manifest.get('model')}/{self.manifest.get('pooling')}); extract the queries with the index's model"
            )

    def search(self, features: np.ndarray, k: int, rerank=None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of the ``k`` best gallery rows per query, best first; ``rerank``: a
        ``postprocess.RerankConfig`` chain run on the gallery vectors instead of the faiss search."""
        check_k(k, len(self))
        q = self.prepare(features)
        if rerank is not None and rerank.steps:
            from .postprocess import rerank as run_chain

            rows = self._live_rows()
            scores, idx = run_chain(q, self._vectors(rows), k, rerank)
            if len(rows) == self.index.ntotal and (len(rows) == 0 or rows[-1] == len(rows) - 1):
                return scores, idx  # rows are positions
            return scores, np.where(idx >= 0, rows[np.maximum(idx, 0)], -1)
        if not self.deleted:
            return self._search_index(q, k)
        want = min(k + len(self.deleted), int(self.index.ntotal))
        scores, idx = self._search_index(q, want)
        out_s = np.full((len(q), k), -np.inf, np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        ok = (idx >= 0) & ~np.isin(idx, np.fromiter(self.deleted, np.int64, len(self.deleted)))
        for r in range(len(q)):
            keep = np.flatnonzero(ok[r])[:k]
            out_s[r, : len(keep)] = scores[r, keep]
            out_i[r, : len(keep)] = idx[r, keep]
        return out_s, out_i

    def _search_index(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The faiss index's answer, equal scores among the k ordered by row (``numeric.best_first``:
        faiss's own tie order depends on its code path; which of several tied rows make the cut at k
        stays faiss's choice); a Flat inner-product index is scanned by onnxruntime instead for
        fewer than ``flatscan.FASTER_BELOW`` queries (same rows and scores up to float rounding,
        3-7x faster there, ties by row also at the cut)."""
        if self._scan is None:
            self._scan = flatscan.FlatScan() if flatscan.supports(self.index) else False
        if self._scan and len(q) < flatscan.FASTER_BELOW:
            return self._scan.search(self.index, q, k)
        return best_first(*self.index.search(q, k))

    def gallery_features(self) -> np.ndarray:
        """The indexed (transformed) vectors of the rows that can be found, in row order (for
        re-ranking; needs an index that stores them: Flat or HNSW,Flat)."""
        return self._vectors(self._live_rows())

    def _live_rows(self) -> np.ndarray:
        return np.array([i for i, n in enumerate(self.names) if n is not None and i not in self.deleted], np.int64)

    def _vectors(self, rows: np.ndarray) -> np.ndarray:
        faiss = _faiss()
        try:
            contiguous = len(self.names) == self.index.ntotal  # faiss ids 0..ntotal-1 (no IVF gaps)
            if contiguous:
                every = self.index.reconstruct_n(0, self.index.ntotal)
                return every if len(rows) == len(every) else every[rows]
            # an IVF index with removed rows: ids have gaps; look them up by id (a copy with a hash map)
            copy = faiss.clone_index(self.index)
            faiss.extract_index_ivf(copy).set_direct_map_type(faiss.DirectMap.Hashtable)
            return np.vstack([copy.reconstruct(int(i)) for i in rows]) if len(rows) else np.zeros((0, copy.d), np.float32)
        except RuntimeError:
            raise LookalikeError(
                f"{self.path}: re-ranking needs the gallery vectors, which a {self.manifest.get('factory')} "
                "index does not keep; build the index with --factory Flat (or HNSW32,Flat)"
            ) from None

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF ``nprobe`` (inverted lists visited) and HNSW ``efSearch`` (candidate list size)."""
        set_search_params(self.index, nprobe, ef_search, self.manifest.get("factory", "?"))

    # ------------------------------------------------------------------ changing rows
    def _kind(self) -> str:
        faiss = _faiss()
        if self.manifest.get("ondisk"):
            return "ondisk"
        if self.manifest.get("codec"):
            return "codes"
        base = faiss.downcast_index(self.index.index if isinstance(self.index, faiss.IndexPreTransform) else self.index)
        if isinstance(base, faiss.IndexFlat):
            return "flat"
        try:
            faiss.extract_index_ivf(self.index)
            return "ivf"
        except RuntimeError:
            return "other"

    def add(self, names: list[str], features: np.ndarray, record: bool = False, files: dict | None = None) -> None:
        """Append rows (names must be new); searchable at once. ``record``: also append them to the
        journal first (durable before this returns); ``files``: name -> image file to keep under
        ``items/`` (written atomically before the journal line)."""
        names = [str(n) for n in names]
        dup = [n for n in names if n in self.row_of] or [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise LookalikeError(f"{dup[0]!r} is already in the index; remove it first or rename it")
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] != len(names) or features.shape[1] != self.dim:
            raise LookalikeError(f"{len(names)} names for features of shape {features.shape}; the index has dimension {self.dim}")
        bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
        if len(bad):  # a NaN row would be journalled, then refused as damaged when the folder is opened again
            raise LookalikeError(f"{names[bad[0]]!r}: its features are not finite (NaN or inf); extract it again")
        kind = self._kind()
        if kind in ("ondisk", "codes"):
            what = "built in shards (on-disk lists)" if kind == "ondisk" else "of codes"
            raise LookalikeError(f"{self.path}: an index {what} is read-only; rebuild it with the new rows")
        x = self.prepare(features)
        if record:
            self._require_folder()
            for name, data in (files or {}).items():
                self._write_item(name, data)
            for name, row in zip(names, features):
                self._append_journal(dict(op="add", name=name, feature=base64.b64encode(row.tobytes()).decode(),
                                          item=name in (files or {}), time=time.strftime("%Y-%m-%dT%H:%M:%S")))
        self._add_rows(names, x, kind)
        self.items.update(n for n in names if n in (files or {}))

    def _add_rows(self, names: list[str], x: np.ndarray, kind: str) -> None:
        start = len(self.names)
        if kind == "ivf":  # explicit ids: an IVF index may have fewer vectors than rows (removed ones)
            self.index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
        else:
            if self.index.ntotal != start:
                raise LookalikeError(f"{self.path}: index and names disagree; rebuild it with `lookalike index`")
            self.index.add(x)
        self.names.extend(names)
        for i, n in enumerate(names):
            self.row_of[n] = start + i

    def remove(self, names: list[str], record: bool = False) -> int:
        """Remove rows by name (unknown names are an error); returns how many. They stop being found
        at once; :meth:`save` drops them from the index. ``record``: journal the removal first."""
        missing = [n for n in names if n not in self.row_of]
        if missing:
            raise LookalikeError(f"{missing[0]!r} is not in the index" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if record:
            self._require_folder()
            for n in dict.fromkeys(names):
                self._append_journal(dict(op="delete", name=n, time=time.strftime("%Y-%m-%dT%H:%M:%S")))
        unique = list(dict.fromkeys(names))
        for n in unique:
            self.deleted.add(self.row_of.pop(n))
            self.items.discard(n)
        return len(unique)

    def _compact(self) -> None:
        """Drop the removed rows from the faiss index (before saving)."""
        if not self.deleted:
            return
        kind = self._kind()
        if kind == "ondisk":
            raise LookalikeError(f"{self.path}: an index built in shards is written once; rebuild it without the "
                                 "removed rows (the service keeps removals in its journal)")
        if kind not in ("flat", "ivf"):  # faiss cannot drop them: they stay, listed in the manifest
            self.manifest["deleted_rows"] = sorted(self.deleted)
            return
        self.manifest.pop("deleted_rows", None)
        ids = np.array(sorted(self.deleted), dtype=np.int64)
        self.index.remove_ids(ids)
        if kind == "flat":  # faiss compacts a flat index: the names follow
            gone = self.deleted
            self.names = [n for i, n in enumerate(self.names) if i not in gone]
        else:  # IVF keeps row numbers
            for i in ids:
                self.names[i] = None
        self.deleted = set()
        self.row_of = {n: i for i, n in enumerate(self.names) if n is not None}

    # ------------------------------------------------------------------ the journal
    def _require_folder(self) -> None:
        if self.path is None:
            raise LookalikeError("recording a change needs a collection folder; save the collection first")

    def _write_item(self, name: str, data: bytes) -> None:
        base = (self.path / ITEMS).resolve()
        target = (base / confined_name(name)).resolve()
        if not target.is_relative_to(base) or target == base:
            raise LookalikeError(f"invalid item name {name!r}: it leaves the collection's items folder")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                raise NotADirectoryError
            with atomic_path(target) as tmp:
                Path(tmp).write_bytes(data)
        except (NotADirectoryError, FileExistsError, IsADirectoryError):
            raise LookalikeError(f"item name {name!r} clashes with another item's file or folder; choose another name") from None

    def _append_journal(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        journal = self.path / JOURNAL
        with open(journal, "ab") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                with open(journal, "rb") as r:
                    r.seek(end - 1)
                    torn = r.read(1) != b"\n"
                if torn:  # a torn last line (ignored when replayed): cut it off, or this line would join it
                    with open(journal, "rb") as r:
                        data = r.read()
                    f.truncate(data.rfind(b"\n") + 1)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _replay(self) -> None:
        journal = self.path / JOURNAL
        if not journal.exists():
            return
        lines = journal.read_bytes().split(b"\n")
        kind = None
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                op, name = rec["op"], rec["name"]
                if op not in ("add", "delete") or not isinstance(name, str) or not name:
                    raise ValueError
                if op == "add":
                    feat = np.frombuffer(base64.b64decode(rec["feature"], validate=True), np.float32).reshape(1, -1)
                    if not np.isfinite(feat).all():
                        raise ValueError
            except (ValueError, KeyError, TypeError, AttributeError):
                if i >= len(lines) - 2:
                    log.warning("%s: ignoring a torn last line (an interrupted write)", journal)
                    continue
                raise LookalikeError(f"{journal}: line {i + 1} is damaged; remove it (or the file, to drop every change)") from None
            kind = kind or self._kind()
            if op == "add":
                if name in self.row_of:  # already in the index (folded in by an older version)
                    continue
                if feat.shape[1] != self.dim:
                    raise LookalikeError(f"{journal}: line {i + 1} holds a feature of dimension {feat.shape[1]}, "
                                         f"the collection has {self.dim}; remove the line")
                self._add_rows([name], self.prepare(feat), kind)
                if rec.get("item", True):
                    self.items.add(name)
            elif op == "delete" and name in self.row_of:
                self.deleted.add(self.row_of.pop(name))
                self.items.discard(name)


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(folder: Path, path: Path) -> int | None:
    """The pid in the name of one of ``folder``'s working folders (``.NAME.p123-xyz.tmp``,
    ``.NAME.old-123``); None for anything else (another collection's, e.g. ``.NAME.v2.old-1``)."""
    m = re.fullmatch(rf"\.{re.escape(folder.name)}\.(?:old-(\d+)|p(\d+)-[^/]*\.tmp)", path.name)
    return int(m.group(1) or m.group(2)) if m else None


def recover(folder) -> None:
    """Undo what a killed writer left beside ``folder``: if the folder itself is missing (killed
    between the two renames of a swap), the previous version (``.NAME.old-PID``) is put back; working
    folders of dead writers (``.NAME.pPID-*.tmp``, ``.NAME.old-PID``) are removed. Folders of live
    writers are left alone."""
    folder = Path(folder)
    parent = folder.parent
    if not parent.is_dir():
        return
    mine = [p for p in parent.glob(f".{folder.name}.*") if p.is_dir()]
    dead = [p for p in mine if (pid := _owner(folder, p)) is not None and pid != os.getpid() and not _pid_alive(pid)]
    if not (folder / MANIFEST).is_file():
        olds = [p for p in dead if ".old-" in p.name and (p / MANIFEST).is_file()]
        if olds:
            try:
                if folder.exists() and not any(folder.iterdir()):
                    folder.rmdir()
                os.replace(olds[0], folder)  # the version before the interrupted swap
                log.warning("%s: restored the previous version (a writer was killed while swapping it)", folder)
                _fsync_dir(parent)
            except OSError:
                pass  # another process recovered it first
    for p in dead:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file of a finished folder, then the folders themselves, before it is renamed in."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by the finished folder ``tmp``: flushed to disk first, then two renames
    (old out of the way, new in) and the parent folder flushed; the old one is removed after. A kill
    between the renames is undone by :func:`recover` (the old version comes back)."""
    _fsync_tree(tmp)
    old = None
    if out_dir.exists():
        if not (out_dir / MANIFEST).exists() and any(out_dir.iterdir()):
            raise LookalikeError(f"{out_dir}: exists and is not a lookalike index; choose another -o")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    with _read_lock(out_dir, exclusive=True):  # readers never see half a swap
        if old is not None:
            os.replace(out_dir, old)
            if os.environ.get("LOOKALIKE_TEST_KILL_IN_SWAP"):  # tests: a real SIGKILL between the two renames
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_HELD: dict[str, list] = {}  # lock file -> [fd, count]: a process may take its own lock again


def _lock_file(folder, suffix: str) -> Path:
    folder = Path(folder).resolve()  # a link to the folder locks the folder itself
    return folder.parent / f".{folder.name}.{suffix}"


class FolderLock:
    """An exclusive advisory lock on a collection folder (``.NAME.lock`` beside it, so it survives
    the swap): held by every change from its open to its swap (``update``, ``index``, ``run``'s
    rebuild) and by a running service for its lifetime, so two writers cannot lose each other's
    changes and ``update`` cannot rewrite a served folder. Re-entrant within a process; the path is
    resolved (a link locks its target). Readers take no part of it (see :func:`_read_lock`). Where
    ``fcntl`` is missing (Windows) it does nothing."""

    def __init__(self, folder, what: str = "written"):
        self.folder, self.what, self.key = Path(folder), what, None

    def acquire(self) -> "FolderLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        path = _lock_file(self.folder, "lock")
        key = str(path)
        if key in _HELD:
            _HELD[key][1] += 1
            self.key = key
            return self
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            raise LookalikeError(f"{self.folder}: in use ({holder or 'another lookalike process'}); it cannot be "
                                 f"{self.what} now. Stop the server (a served collection changes through its "
                                 "/items endpoints), or wait for the other command") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {self.what}".encode(), 0)
        _HELD[key] = [fd, 1]
        self.key = key
        return self

    def release(self) -> None:
        key, self.key = self.key, None
        held = _HELD.get(key) if key is not None else None
        if held is None:
            return
        held[1] -= 1
        if held[1] <= 0:
            del _HELD[key]
            os.close(held[0])  # closing releases the flock

    def __del__(self):
        self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class _read_lock:
    """Shared lock on ``.NAME.swap`` while a reader reads the folder's files; a writer holds it
    exclusively only for the two renames of its swap, so a reader never pairs files of two
    versions. Best effort: where the lock file cannot be made (read-only places) it does nothing."""

    def __init__(self, folder, exclusive: bool = False):
        self.path, self.exclusive, self.fd = _lock_file(folder, "swap"), exclusive, None

    def __enter__(self):
        try:
            import fcntl

            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_new(folder: Path, make) -> "Collection":
    """Write a new collection whose faiss files ``make(tmp_folder)`` writes (the sharded build
    merges its inverted lists there) and which it returns; the rest is written here, then swapped in.
    Leftovers of killed writers are cleaned first."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(folder, "rewritten"):
        recover(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.p{os.getpid()}-", suffix=".tmp", dir=folder.parent))
        try:
            col = make(tmp)
            col._write_files(tmp)
            _swap_in(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    col.path = folder
    return col


def config_dict(config) -> dict:
    """A build config (dataclass or dict) as the dict saved in ``config.json``."""
    return asdict(config) if hasattr(config, "__dataclass_fields__") else dict(config or {})
