"""Searching past one machine: a collection split in shards, served by Ray Serve.

``split_collection`` cuts a collection folder into N shard folders. Each shard is a normal collection
(:class:`~lookalike.collection.Collection` opens it) holding a contiguous run of the source's rows
exactly as the source stores them, with the source's whitening and settings, so that searching the
shards and merging their top-k gives the source's own answer:

  - Flat: the run's vectors are read back with faiss ``reconstruct_n`` into an empty copy of the
    index; its rows are numbered from 0 (the manifest's ``shard.offset`` gives the source row).
  - IVF (any ``IVF…`` factory, also one built in shards on disk): faiss's ``IndexIVF.copy_subset_to``
    copies the run's inverted-list entries into an empty index with the *same* trained quantizer and
    codes, so every ``nprobe`` visits the same lists as the source (merged = single answer at any
    nprobe, not only nprobe = nlist); ids stay the source row numbers, so the shard's ``names.json``
    has ``null`` before its first row, as an IVF collection with removed rows has.
  - Rows removed in the source's journal come along as removed rows (``deleted_rows``, filtered as
    the source filters them), so the shards' faiss data are slices of the source's.
  - Other indexes (HNSW: a graph cannot be cut) are refused.

``OUT/shards.json`` lists the shards (folder, live count, source rows ``[start, stop)``), a random id
of this split and the source's digest (its manifest, names and journal); every shard's manifest
repeats them (``shard``). A shard folder from another split, or a shard set used against another
version of the source, is refused with a :class:`LookalikeError` that names the file.

``serve_shards`` deploys a Ray Serve application: one deployment per shard (one replica, which opens
its shard and answers ``search(features, k)`` with its top-k, global row numbers and names) and a
router deployment that fans a query batch out to every shard and merges the answers: best first,
equal scores by row (``numeric.best_first``, the order ``Collection.search`` gives every index type,
so the merge equals the single index; faiss's ``merge_knn_results`` put a tie across a shard boundary
the other way round from the single index's scan). ``search_shards(handle, features, k)`` is the
client call: numpy arrays and lists of names cross the boundary, nothing else.

Scores are those of the single index bit for bit when they are computed the same way:
- under 128 queries a Flat shard is scanned like the single index (``flatscan``: each row's product
  does not depend on how many rows the index has);
- faiss runs at the thread count the single index ran at (with fewer queries than threads, faiss's
  score moves by an ulp with the thread count, the single index's too);
- a shard starts at a multiple of faiss's 1024-row BLAS block (the default cut: faiss computes
  batches of 20+ queries a block at a time and BLAS's last bit depends on the block's shape).

The sharded path serves plain faiss search: re-ranking chains (αQE, DBA, k-reciprocal, diffusion)
need the whole gallery's vectors and its neighbourhoods, which no shard has; a ``rerank`` request is
refused. Shards are read-only: change the source and split it again.

Hand-written here, and why: the split bookkeeping (which rows go to which shard, ``shards.json``, the
checks) because faiss and Ray know nothing of names or collection folders; the fan-out is a few lines
of ``asyncio.gather`` over Serve handles, and the names lookup after the merge. Serving, placement,
restarts and transport are Ray Serve's; the IVF copy is faiss's; the merge is one ``lexsort``. Ray
is imported only inside the functions that need it (it is the optional ``ray`` extra); torch never.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import shutil
from pathlib import Path

import numpy as np

from ._io import write_json_atomic
from .collection import MANIFEST, Collection, read_manifest, write_new
from .errors import LookalikeError, check_k
from .numeric import best_first

log = logging.getLogger(__name__)

SHARDS_FILE = "shards.json"
FORMAT = "lookalike-shards"
FORMAT_VERSION = 1
APP_NAME = "lookalike-shards"


def _faiss():
    import faiss

    return faiss


# ---------------------------------------------------------------------------------------------- splitting
def source_digest(collection_dir) -> str:
    """What version of a collection folder this is: a hash of its manifest, names and journal (read
    as files, the index is not loaded). Any save, add or removal changes it."""
    folder = Path(collection_dir)
    read_manifest(folder)  # a clear error for a folder that is not a collection
    h = hashlib.sha256()
    for name in (MANIFEST, "names.json", "journal.jsonl"):
        p = folder / name
        h.update(name.encode() + b"\0")
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()


def _kind(index) -> str:
    faiss = _faiss()
    base = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    if isinstance(base, faiss.IndexFlat):
        return "flat"
    try:
        faiss.extract_index_ivf(index)
        return "ivf"
    except RuntimeError:
        return "other"


def _bounds(live: np.ndarray, n_rows: int, shards: int, sizes) -> list[int]:
    """Where the shards start and end, as source row numbers ``[0, …, n_rows]``: after ``sizes`` live
    rows each when given; by default as evenly as possible at multiples of faiss's BLAS block of
    database rows (1024), so that a Flat shard's blocks are the single index's blocks and its scores
    equal them bit for bit (faiss computes batches of 20 queries or more a block at a time with BLAS,
    whose last bit depends on the block's shape); a collection too small for that is cut evenly."""
    n = len(live)
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        if len(sizes) != shards or any(s < 1 for s in sizes) or sum(sizes) != n:
            raise LookalikeError(f"shard sizes {sizes} must be {shards} positive counts adding up to the "
                                 f"collection's {n} rows")
        return [0, *live[np.cumsum(sizes)[:-1]].tolist(), n_rows]
    if shards < 1:
        raise LookalikeError(f"shards must be at least 1, got {shards}")
    if shards > n:
        raise LookalikeError(f"{shards} shards for a collection of {n} rows; use {n} shards or fewer")
    block = int(_faiss().cvar.distance_compute_blas_database_bs)
    bounds = [0, *(int(round(i * n_rows / shards / block)) * block for i in range(1, shards)), n_rows]
    if all(np.searchsorted(live, b) > np.searchsorted(live, a) for a, b in zip(bounds, bounds[1:])):
        return bounds  # every shard has live rows
    even = np.cumsum([len(p) for p in np.array_split(live, shards)])[:-1]
    return [0, *live[even].tolist(), n_rows]


def _slice(col: Collection, kind: str, lo: int, hi: int):
    """A faiss index holding the source's rows ``lo..hi-1`` as they are stored: Flat vectors read back
    (positions from 0), IVF entries copied by faiss with their codes and ids into an empty index with
    the source's trained quantizer."""
    faiss = _faiss()
    if kind == "flat":
        index = faiss.clone_index(col.index)
        index.reset()
        src = col.index.index if isinstance(col.index, faiss.IndexPreTransform) else col.index
        dst = index.index if isinstance(index, faiss.IndexPreTransform) else index
        faiss.downcast_index(dst).add(faiss.downcast_index(src).reconstruct_n(lo, hi - lo))
        index.ntotal = dst.ntotal
        return index
    if col.manifest.get("ondisk"):  # faiss cannot clone on-disk lists: read the index without them
        index = faiss.read_index(str(col.path / "index.faiss"), faiss.IO_FLAG_SKIP_IVF_DATA)
        ivf = faiss.extract_index_ivf(index)
        lists = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        ivf.replace_invlists(lists, True)
        lists.this.disown()  # the index owns them now
        ivf.ntotal = 0
    else:
        index = faiss.clone_index(col.index)
        index.reset()
        ivf = faiss.extract_index_ivf(index)
    faiss.extract_index_ivf(col.index).copy_subset_to(ivf, 0, lo, hi)  # ids in [lo, hi)
    index.ntotal = ivf.ntotal
    return index


def split_collection(collection_dir, out_dir, shards: int = 2, sizes: list[int] | None = None) -> list[Path]:
    """Split the collection folder ``collection_dir`` into ``shards`` shard collections
    ``OUT/shard-00000``… (contiguous runs of its rows; ``sizes``: live rows per shard, default as even
    as faiss's 1024-row blocks allow) and ``OUT/shards.json``. Returns the shard folders.

    A shard holds the source's rows of its run exactly as the source stores them; rows removed in the
    source's journal come along as removed rows (``deleted_rows``: filtered, as the source does)."""
    collection_dir, out_dir = Path(collection_dir), Path(out_dir)
    digest = source_digest(collection_dir)
    col = Collection.open(collection_dir)
    if source_digest(collection_dir) != digest:
        raise LookalikeError(f"{collection_dir}: changed while it was read; split it again")
    kind = _kind(col.index)
    if kind == "other":
        raise LookalikeError(f"{collection_dir}: a {col.manifest.get('factory')} index cannot be split into shards "
                             "that answer like it; build it as Flat or IVF (e.g. --factory IVF4096,Flat)")
    live = np.array(sorted(col.row_of.values()), np.int64)
    bounds = _bounds(live, len(col.names), int(shards), sizes)
    previous = out_dir / SHARDS_FILE
    if out_dir.exists() and any(out_dir.iterdir()) and not previous.is_file():
        raise LookalikeError(f"{out_dir}: exists and is not a shard set (no {SHARDS_FILE}); choose another folder")
    old = []
    if previous.is_file():
        try:
            old = [s["folder"] for s in json.loads(previous.read_text(encoding="utf-8")).get("shards", [])]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            old = []
    set_id = secrets.token_hex(8)
    entries, folders = [], []
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        index = _slice(col, kind, lo, hi)
        offset = lo if kind == "flat" else 0  # Flat rows are renumbered from 0, IVF keeps its ids
        names = ([None] * lo if kind == "ivf" else []) + col.names[lo:hi]
        deleted = sorted(r - offset for r in col.deleted if lo <= r < hi)
        count = len(names) - names.count(None) - len(deleted)
        folder = f"shard-{i:05d}"
        info = dict(set=set_id, index=i, shards=len(bounds) - 1, source=digest, count=count, rows=[lo, hi],
                    offset=offset)
        manifest = {k: v for k, v in col.manifest.items() if k not in ("deleted_rows", "items", "shard")}
        manifest.update(count=count, ondisk=False, shard=info)
        if deleted:
            manifest["deleted_rows"] = deleted
        items = sorted(n for n in col.items if n in col.row_of and lo <= col.row_of[n] < hi)
        if items:
            manifest["items"] = items
        shard = Collection(index, names, manifest, col.path, col.transform, col.config)  # path: items/ come along
        if index.ntotal != len(names) - names.count(None):
            raise LookalikeError(f"{collection_dir}: index and names disagree; rebuild it with `lookalike index`")

        def write(tmp: Path, index=index, shard=shard) -> Collection:
            _faiss().write_index(index, str(tmp / "index.faiss"))
            return shard

        write_new(out_dir / folder, write)  # as written, not compacted: the source's rows, removed ones too
        entries.append(dict(folder=folder, count=count, rows=[lo, hi]))
        folders.append(out_dir / folder)
    write_json_atomic(out_dir / SHARDS_FILE, dict(
        format=FORMAT, version=FORMAT_VERSION, set=set_id,
        source=dict(path=str(collection_dir.resolve()), digest=digest, count=len(live), model_id=col.model_id,
                    dim=col.dim, factory=col.manifest.get("factory")),
        shards=entries))
    for name in old:  # shards of the previous split that this one did not rewrite
        stale = out_dir / name
        if re.fullmatch(r"shard-\d{5}", name) and stale not in folders and (stale / MANIFEST).is_file():
            shutil.rmtree(stale, ignore_errors=True)
    log.info("split %s (%d rows) into %d shards in %s", collection_dir, len(live), len(folders), out_dir)
    return folders


# ---------------------------------------------------------------------------------------------- checking a set
def _shard_info(folder: Path) -> dict:
    manifest = read_manifest(folder)
    info = manifest.get("shard")
    if not isinstance(info, dict) or not all(k in info for k in ("set", "index", "shards", "source", "count")):
        raise LookalikeError(f"{folder / MANIFEST}: not a shard (no 'shard' entry); make shards with split_collection")
    return {**info, "dim": int(manifest.get("input_dim", manifest.get("dim", 0))), "model_id": manifest.get("model_id", "")}


def read_shard_set(shards, source=None) -> dict:
    """Check a shard set and describe it: ``shards`` is the folder ``split_collection`` wrote (or its
    ``shards.json``), or a list of shard folders. Every shard must come from the same split, each
    index once; with ``source``, the source collection must be the version that was split."""
    if isinstance(shards, (list, tuple)):
        folders = [Path(f) for f in shards]
        if not folders:
            raise LookalikeError("no shard folders given")
        infos = [_shard_info(f) for f in folders]
        first = infos[0]
        for f, info in zip(folders, infos):
            if info["set"] != first["set"] or info["source"] != first["source"]:
                raise LookalikeError(f"{f / MANIFEST}: a shard of another split (set {info['set']}) than "
                                     f"{folders[0] / MANIFEST} (set {first['set']}); give the shards of one split")
        order = sorted(range(len(folders)), key=lambda j: infos[j]["index"])
        if [infos[j]["index"] for j in order] != list(range(first["shards"])):
            raise LookalikeError(f"{folders[0] / MANIFEST}: its split has {first['shards']} shards, given shard(s) "
                                 f"{sorted(i['index'] for i in infos)}; give each shard once")
        folders, infos = [folders[j] for j in order], [infos[j] for j in order]
        where, set_id, digest = folders[0].parent, first["set"], first["source"]
    else:
        path = Path(shards)
        listing = path if path.name == SHARDS_FILE and path.is_file() else path / SHARDS_FILE
        try:
            data = json.loads(listing.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT or not isinstance(data.get("shards"), list) or not data["shards"]:
                raise ValueError
            set_id, digest = str(data["set"]), str(data["source"]["digest"])
            folders = [listing.parent / s["folder"] for s in data["shards"]]
            counts = [int(s["count"]) for s in data["shards"]]
        except FileNotFoundError:
            raise LookalikeError(f"{listing}: not found; make a shard set with split_collection") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            raise LookalikeError(f"{listing}: damaged shard list; split the collection again") from None
        infos = []
        for i, (f, n) in enumerate(zip(folders, counts)):
            info = _shard_info(f)
            if info["set"] != set_id or info["index"] != i or info["count"] != n or info["shards"] != len(folders):
                raise LookalikeError(f"{f / MANIFEST}: shard {info['index']} of another split (set {info['set']}); "
                                     f"{listing} lists set {set_id}; split the collection again")
            infos.append(info)
        where = listing.parent
    if source is not None:
        now = source_digest(source)
        if now != digest:
            raise LookalikeError(f"{where}: these shards were split from another collection or another version of "
                                 f"{source} (it changed since); split it again")
    dims = {i["dim"] for i in infos}
    if len(dims) != 1:
        raise LookalikeError(f"{folders[0] / MANIFEST}: shards of one split disagree on the dimension; split again")
    return dict(set=set_id, source=digest, folders=[str(f.resolve()) for f in folders], counts=[int(i["count"]) for i in infos],
                count=sum(int(i["count"]) for i in infos), dim=dims.pop(), model_id=infos[0]["model_id"])


# ---------------------------------------------------------------------------------------------- one shard, the merge
class ShardSearcher:
    """One shard, opened: answers a query batch with its top-k (scores, source row numbers, names),
    padded with ``-inf`` / ``-1`` / ``None`` when the shard has fewer than k rows. A Serve replica
    runs one; the same class works in-process."""

    def __init__(self, folder: str, set_id: str | None = None, index: int | None = None, threads: int | None = None):
        self.threads = int(threads) if threads else None  # faiss's threads (set per call: OpenMP's count is per thread)
        info = _shard_info(Path(folder))
        if (set_id is not None and info["set"] != set_id) or (index is not None and info["index"] != index):
            raise LookalikeError(f"{Path(folder) / MANIFEST}: shard {info['index']} of set {info['set']}, expected "
                                 f"shard {index} of set {set_id}; split the collection again")
        self.col = Collection.open(folder)
        self.info = info
        self.offset = int(info.get("offset", 0))  # shard row + offset = source row

    def search(self, features: np.ndarray, k: int, model_id: str | None = None) -> dict:
        features = np.ascontiguousarray(features, dtype=np.float32)
        self.col.check_queries(features, model_id)
        if self.threads:
            _faiss().omp_set_num_threads(self.threads)
        kk = min(int(k), len(self.col))
        scores, ids = self.col.search(features, kk)
        names = [[self.col.names[i] if i >= 0 else None for i in row] + [None] * (k - kk) for row in ids]
        ids = np.where(ids >= 0, ids + self.offset, -1)
        if kk < k:
            scores = np.hstack([scores, np.full((len(ids), k - kk), -np.inf, np.float32)])
            ids = np.hstack([ids, np.full((len(ids), k - kk), -1, np.int64)])
        return dict(scores=np.ascontiguousarray(scores, np.float32), ids=np.ascontiguousarray(ids, np.int64),
                    names=names)


def merge_answers(answers: list[dict], k: int) -> dict:
    """The top-k of the shards' answers (in shard order); names follow the row numbers. Equal scores
    are ordered by row (``numeric.best_first``), as ``Collection.search`` orders them: faiss's
    ``merge_knn_results`` put a tie across a shard boundary in another order than one index does."""
    scores, ids = best_first(np.concatenate([np.asarray(a["scores"][:, :k], np.float32) for a in answers], axis=1),
                             np.concatenate([np.asarray(a["ids"][:, :k], np.int64) for a in answers], axis=1), k)
    lookup = {}
    for a in answers:
        for row_ids, row_names in zip(a["ids"], a["names"]):
            lookup.update(zip(row_ids.tolist(), row_names))
    names = [[lookup.get(i) if i >= 0 else None for i in row] for row in ids.tolist()]
    return dict(scores=scores, ids=ids, names=names)


def _check_request(description: dict, features, k: int, model_id) -> np.ndarray:
    features = np.ascontiguousarray(features, dtype=np.float32)
    if features.ndim != 2 or features.shape[1] != description["dim"]:
        raise LookalikeError(f"queries: features of shape {features.shape}, the shards have dimension "
                             f"{description['dim']}; extract the queries with the collection's model")
    if model_id and description.get("model_id") and model_id != description["model_id"]:
        raise LookalikeError(f"queries: made by another model (model_id {model_id}, shards {description['model_id']}); "
                             "extract the queries with the collection's model")
    check_k(int(k), description["count"])
    return features


def _refuse_rerank(rerank) -> None:
    if rerank is not None and (getattr(rerank, "steps", None) or (rerank and not hasattr(rerank, "steps"))):
        raise LookalikeError("the sharded path serves plain faiss search: re-ranking chains need the whole gallery "
                             "(its vectors and neighbourhoods), which no shard holds; re-rank on the single collection")


def search_in_process(shards, features: np.ndarray, k: int, rerank=None) -> tuple[np.ndarray, list]:
    """The sharded answer without Ray (each shard opened here, one after another): the reference the
    Serve path is measured and tested against. Returns ``(scores, names)``."""
    _refuse_rerank(rerank)
    description = read_shard_set(shards)
    features = _check_request(description, features, k, None)
    answers = [ShardSearcher(f, description["set"], i).search(features, k) for i, f in enumerate(description["folders"])]
    out = merge_answers(answers, k)
    return out["scores"], out["names"]


# ---------------------------------------------------------------------------------------------- Ray Serve
class ShardRouter:
    """The ingress deployment: checks a request, fans it out to every shard deployment, merges."""

    def __init__(self, description: dict, *shards):
        self.description = description
        self.shards = shards  # Serve deployment handles, in shard order

    async def search(self, features, k: int, model_id: str | None = None) -> dict:
        features = _check_request(self.description, features, k, model_id)
        answers = await asyncio.gather(*(h.search.remote(features, int(k)) for h in self.shards))
        return merge_answers(list(answers), int(k))

    def describe(self) -> dict:
        return self.description


def serve_shards(shards, *, name: str = APP_NAME, source=None, cpus_per_shard: float = 1.0,
                 threads: int | None = None, placement: list[dict] | None = None, address: str | None = None):
    """Deploy a shard set (see :func:`read_shard_set`) as the Ray Serve application ``name``: one
    deployment of one replica per shard and a router; returns the router's handle. Connects to the
    Ray cluster at ``address`` (or starts a local one) unless Ray is already initialised. No HTTP
    proxy is started: the handle is the way in (:func:`search_shards`).

    Every replica opens its shard folder by path, so on a cluster each shard's folder must be at that
    path on the node its replica runs on (a shared file system, or copied there); ``placement``: per
    shard, more Ray actor options, e.g. ``{"resources": {"shard-0": 1}}`` to pin it to the node that
    declares that resource; ``threads``: faiss threads per replica (default: Ray's, one per CPU)."""
    description = read_shard_set(shards, source=source)
    if placement is not None and len(placement) != len(description["folders"]):
        raise LookalikeError(f"placement: {len(placement)} entries for {len(description['folders'])} shards")
    try:
        import ray
        from ray import serve
        from ray.serve.config import ProxyLocation
    except ImportError as e:
        raise LookalikeError(f"serving shards needs Ray Serve ({e.name} is missing): pip install 'ray[serve]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    serve.start(proxy_location=ProxyLocation.Disabled)
    shard_apps = [
        serve.deployment(ShardSearcher, name=f"shard-{i}", num_replicas=1,
                         ray_actor_options={"num_cpus": cpus_per_shard, **(placement[i] if placement else {})},
                         ).bind(folder, description["set"], i, threads)
        for i, folder in enumerate(description["folders"])
    ]
    router = serve.deployment(ShardRouter, name="router", num_replicas=1,
                              ray_actor_options={"num_cpus": 0}).bind(description, *shard_apps)
    return serve.run(router, name=name, route_prefix=None)


def search_shards(handle, features: np.ndarray, k: int, rerank=None, model_id: str | None = None,
                  with_ids: bool = False, timeout_s: float | None = 300):
    """Search a served shard set: ``(scores, names)`` of shape ``(n_queries, k)``, best first (with
    ``with_ids``, also the source row numbers, as ``Collection.search`` returns them)."""
    _refuse_rerank(rerank)
    features = np.ascontiguousarray(features, dtype=np.float32)
    try:
        out = handle.search.remote(features, int(k), model_id).result(timeout_s=timeout_s)
    except LookalikeError as e:  # raised in a replica: Ray's error is also a LookalikeError
        cause = getattr(e, "cause", None)
        raise LookalikeError(str(cause if cause is not None else e).strip().splitlines()[-1]) from None
    if with_ids:
        return out["scores"], out["names"], out["ids"]
    return out["scores"], out["names"]


def stop_shards(name: str = APP_NAME) -> None:
    """Remove the Serve application ``name`` (its replicas stop; Ray keeps running)."""
    from ray import serve

    serve.delete(name)
