"""The service behind the HTTP routes: a :class:`~lookalike.collection.Collection`, the query
embedder and a lock. Rows are added and removed only through ``Collection.add`` / ``remove``
(journaled, so a restart replays them); this module adds upload checks and thumbnails."""
from __future__ import annotations

import contextlib

import io
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import numpy as np
from PIL import Image

from ..errors import LookalikeError
from .batcher import Batcher

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- /]{0,199}$")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 10.0  # request bodies above this get 413
    timeout: float = 30.0  # seconds per request before 504 (a write that has begun its commit is finished)
    api_key: str | None = None  # when set, writes (POST/DELETE /items) need the header X-API-Key
    k_max: int = 100
    thumb_size: int = 256
    max_pixels: int = 40_000_000  # decompression-bomb guard for uploads
    threads: int = 0  # inference threads (0 = all cores)
    allow_anonymous_writes: bool = False  # without api_key, writes get 403 unless this is set
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides the bind address, localhost,
    # 127.0.0.1 and [::1] (e.g. a reverse proxy's public name); "*" accepts any (no DNS-rebinding guard)
    header_timeout: float = 10.0  # seconds to send a request head (counted from the connection or the
    # previous response), and to finish sending a body the server has already answered
    max_connections: int = 512  # above this, the oldest connection waiting for a request head is closed
    max_in_flight: int = 64  # requests handled at once; more get 503 with Retry-After
    trust_remote_code: bool = False  # the collection's saved settings may name package.module:factory code

    def __post_init__(self):
        hosts = self.allowed_hosts
        self.allowed_hosts = (hosts,) if isinstance(hosts, str) else tuple(str(h) for h in hosts or ())
        for field in ("timeout", "header_timeout", "max_upload_mb"):
            if not getattr(self, field) > 0:
                raise LookalikeError(f"serve: {field} must be positive, got {getattr(self, field)}")
        for field in ("max_connections", "max_in_flight"):
            if getattr(self, field) < 1:
                raise LookalikeError(f"serve: {field} must be at least 1, got {getattr(self, field)}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Ticket:
    """One write request, shared by the HTTP layer and the service so that a timeout never reports
    a change that was made (nor makes one it reported as failed): the service calls
    :meth:`begin_commit` under its lock right before changing the collection; the HTTP layer calls
    :meth:`cancel` when the request times out. Whichever comes first wins: a cancelled ticket never
    commits; a committing one is waited for and answered normally."""

    def __init__(self):
        self._lock = threading.Lock()
        self.state = "pending"  # -> "committing" | "cancelled"

    def begin_commit(self) -> None:
        with self._lock:
            if self.state == "cancelled":
                raise HTTPError(504, "the request timed out before the change was made; nothing was changed")
            self.state = "committing"

    def cancel(self) -> bool:
        """True: cancelled, the change will not be made; False: the commit has begun (wait for it)."""
        with self._lock:
            if self.state == "pending":
                self.state = "cancelled"
            return self.state == "cancelled"


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of an upload -> RGB image, judged by content (not the file name or content type);
    decoded by :func:`lookalike.data.load_image`, its reasons mapped to HTTP statuses."""
    from ..data import BadImage, TooManyPixels, load_image

    if not data:
        raise HTTPError(400, "empty upload: send an image file in the form field 'file'")
    try:
        return load_image(io.BytesIO(data), max_pixels=max_pixels)
    except TooManyPixels as e:
        raise HTTPError(413, str(e)) from None
    except BadImage as e:
        raise HTTPError(415, f"{e}; send a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None


def check_name(name: str) -> str:
    """A client-chosen item name: relative POSIX path, no '..', no hidden parts, image suffix."""
    from ..data import IMAGE_EXTENSIONS

    parts = PurePosixPath(name).parts
    if (not _NAME_RE.match(name) or any(p in (".", "..") or p.startswith(".") for p in parts)
            or "//" in name or name.endswith("/")):
        raise HTTPError(400, f"invalid name {name!r}: use letters, digits, '_', '-', '.', '/' (no '..', no leading '/')")
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        raise HTTPError(400, f"invalid name {name!r}: end it with an image suffix such as .jpg")
    return name


def thumbnail_url(name: str) -> str:
    return f"/images/{quote(name, safe='/')}"


_BLAS_LOCK = threading.Lock()


def _numpy_blas():
    """threadpoolctl's handle on the BLAS libraries loaded here except faiss's (faiss's OpenBLAS is an
    OpenMP build: limiting it would also cut faiss's and the scan's thread counts); None if none."""
    from threadpoolctl import ThreadpoolController

    ctl = ThreadpoolController()
    paths = [i["filepath"] for i in ctl.info() if i["user_api"] == "blas" and "faiss" not in i["filepath"]]
    return ctl.select(filepath=paths) if paths else None


class SearchService:
    """The collection, the query embedder and one lock around every use of the collection."""

    def __init__(self, collection_dir, config: ServeConfig | None = None, extractor=None):
        from ..collection import Collection, FolderLock
        from ..extract import Extractor

        self.config = config or ServeConfig()
        self.path = Path(collection_dir)
        # one owner of the folder while it is served: `update` (or a second server) would lose changes
        self._folder_lock = FolderLock(self.path, "changed by another command: it is being served").acquire()
        self.col = Collection.open(self.path)  # replays the journal
        self._blas = _numpy_blas()
        self.extractor = extractor or Extractor(
            self.col.extract_config(**({"threads": self.config.threads} if self.config.threads else {}),
                                    **({"trust_remote_code": True} if self.config.trust_remote_code else {})))
        self.model_id = self.extractor.config.model_id()
        self.lock = threading.Lock()
        self.counters = dict(searches=0, adds=0, deletes=0, errors=0)
        self.started = time.time()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._changes = 0  # add/delete count: a thumbnail rendered across a change is not cached
        # one stage: the photos of a group through the network, then one scan for the group (it costs
        # about the same for 1 or 16 queries). Two overlapping stages (network | scan) measured slower
        # with 8 clients (52-64 against 66-69 searches/s): their groups split into ~3 requests.
        self._arriving = 0  # requests begun (``arriving``) and not answered: the batcher waits for them
        self._arriving_lock = threading.Lock()
        self._batcher = Batcher(self._search_block, expected=lambda: self._arriving, name="lookalike-search-batcher")
        # build the model runner and the index scan now: the first requests must not pay for them (nor
        # time out on them; the first scan of a 100k Flat index took ~0.3 s more than the next)
        warm = self.extractor.embed_images([Image.new("RGB", (64, 64), (127, 127, 127))])
        if len(self.col) and warm.shape[1] == self.col.dim:  # (another model: each request gets the error)
            self.col.search(warm, 1)

    def __len__(self) -> int:
        with self.lock:
            return len(self.col)

    def close(self) -> None:
        """Stop answering and give the collection folder back (others may change it again)."""
        self._batcher.close()
        self._folder_lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def embed(self, img: Image.Image) -> np.ndarray:
        feat = self.extractor.embed_images([img])
        self.col.check_queries(feat, self.model_id, "upload")
        return feat

    @contextlib.contextmanager
    def _one_blas_thread(self):
        """numpy's BLAS at one thread during a search: its idle threads spin after each small product
        (the queries' whitening) and took a core from the network (benchmarks/serve_load.py, 8
        clients: server CPU per search 40 -> 22 core-ms). faiss's own BLAS is left alone."""
        if self._blas is None:
            yield
            return
        with _BLAS_LOCK, self._blas.limit(limits=1):  # the count is the process's: one limiter at a time
            yield

    @contextlib.contextmanager
    def arriving(self):
        """Count a request from its start (before its upload is decoded) until it is answered, so a
        search group being gathered waits for it (see :class:`Batcher`)."""
        with self._arriving_lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._arriving_lock:
                self._arriving -= 1

    def search(self, img: Image.Image, k: int) -> list[dict]:
        if not 1 <= k <= self.config.k_max:
            raise HTTPError(422, f"k must be between 1 and {self.config.k_max}, got {k}")
        from ..data import to_rgb

        # resized and cropped here, in the request's thread, beside the batch running (~1 ms a photo
        # that the batch thread did one after another)
        prepared = self.extractor.prepare(to_rgb(img))
        return self._batcher.submit(prepared, k).result()

    def _search_block(self, prepared: list, ks: list[int]) -> list[list[dict]]:
        """The photos of every waiting request through the network in one batch (it keeps both cores
        busy in one inference call), then one search for all of them: a (b, d) scan of a Flat index
        costs about what one row's does (the gallery is read once), so the group shares it."""
        feats = self.extractor.embed_prepared(prepared)
        self.col.check_queries(feats, self.model_id, "upload")
        with self.lock, self._one_blas_thread():
            live = len(self.col)
            self.counters["searches"] += len(ks)
            if live == 0:
                return [[] for _ in ks]
            scores, idx = self.col.search(feats, min(max(ks), live))
            names = self.col.names
            out = []
            for row, k in enumerate(ks):
                hits = [dict(name=names[j], score=round(float(s), 6), thumbnail=thumbnail_url(names[j]))
                        for s, j in zip(scores[row], idx[row]) if j >= 0]
                out.append(hits[:k])
        return out

    def add(self, name: str, data: bytes, img: Image.Image, ticket: Ticket | None = None) -> dict:
        check_name(name)
        with self.lock:
            if name in self.col.row_of:
                raise HTTPError(409, f"{name!r} is already in the collection; DELETE /items/{name} first or choose another name")
        feat = self.embed(img)
        with self.lock:
            if name in self.col.row_of:
                raise HTTPError(409, f"{name!r} is already in the collection")
            if ticket is not None:
                ticket.begin_commit()
            try:
                self.col.add([name], feat, record=True, files={name: data})
            except LookalikeError as e:
                raise HTTPError(409, str(e)) from None
            finally:
                self._changes += 1
            self._thumbs.pop(name, None)
            self.counters["adds"] += 1
            return dict(name=name, count=len(self.col), thumbnail=thumbnail_url(name))

    def delete(self, name: str, ticket: Ticket | None = None) -> dict:
        with self.lock:
            if name not in self.col.row_of:
                raise HTTPError(404, f"no item named {name!r}")
            if ticket is not None:
                ticket.begin_commit()
            try:
                self.col.remove([name], record=True)
            finally:
                self._changes += 1
            self._thumbs.pop(name, None)
            self.counters["deletes"] += 1
            return dict(deleted=name, count=len(self.col))

    def image_path(self, name: str) -> Path:
        with self.lock:
            try:
                return self.col.image_path(name)
            except LookalikeError as e:
                raise HTTPError(404, str(e)) from None

    def thumbnail(self, name: str) -> bytes:
        with self.lock:
            hit = self._thumbs.get(name)
            if hit is not None:
                self._thumbs.move_to_end(name)
                return hit
            changes = self._changes
        from ..data import BadImage, load_image

        path = self.image_path(name)
        try:
            img = load_image(path, min_side=self.config.thumb_size)
        except BadImage as e:
            raise HTTPError(404, f"image file of {name!r} cannot be read: {e}") from None
        img.thumbnail((self.config.thumb_size, self.config.thumb_size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self.lock:
            if name in self.col.row_of and self._changes == changes:  # not across a DELETE + POST of the name
                self._thumbs[name] = data
                while len(self._thumbs) > 2048:
                    self._thumbs.popitem(last=False)
        return data

    def stats(self) -> dict:
        m = self.col.manifest
        with self.lock:
            return dict(items=len(self.col), added=len(self.col.items), deleted=len(self.col.deleted),
                        dim=self.col.dim, model=m.get("model"), pooling=m.get("pooling"), factory=m.get("factory"),
                        whitening=bool(m.get("whitening")), collection=str(self.path),
                        uptime_s=round(time.time() - self.started, 1), **self.counters)
