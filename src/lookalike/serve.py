"""``lookalike serve``: a collection behind HTTP (FastAPI + uvicorn) with a web page at ``/``.

Endpoints (every error, whatever its source, is ``{"error": {"status": N, "message": "..."}}``):
  - ``POST /search``          multipart ``file`` (an image) and ``k`` -> names, scores, thumbnail URLs;
  - ``GET  /images/{name}``   a JPEG thumbnail of a gallery image (only names in the collection);
  - ``POST /items``           multipart ``file`` and optional ``name``: add an image, searchable at once;
  - ``DELETE /items/{name}``  remove an image from the results;
  - ``GET /health``, ``GET /stats``, ``GET /openapi.json`` and ``GET /docs`` (a plain page, no CDN).

Additions and deletions go to ``journal.jsonl`` in the collection folder (one JSON line per change,
flushed and fsynced before the response; added images are written atomically under ``items/``),
and are replayed when the collection is served again; the index files themselves stay as `index`
wrote them. A torn last line (power cut mid-write) is ignored with a warning.

Written here: the journal, the body-size cap and request timeout (in the JSON error shape, which
Starlette's own body limit does not use), image sniffing, the API-key check and the page.
HTTP, multipart parsing and the OpenAPI schema are FastAPI's/Starlette's.
"""

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from ._io import atomic_path
from .errors import LookalikeError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\- /]{0,199}$")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 10.0  # request bodies above this get 413
    timeout: float = 30.0  # seconds per request before 504
    api_key: str | None = None  # when set, POST/DELETE /items need the header X-API-Key
    k_max: int = 100
    thumb_size: int = 256
    max_pixels: int = 40_000_000  # decompression-bomb guard for uploads
    threads: int = 0  # inference threads (0 = all cores)


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes of an upload -> RGB image, judged by content (not the file name or content type);
    decoded by :func:`lookalike.data.load_image`, its reasons mapped to HTTP statuses."""
    from .data import BadImage, TooManyPixels, load_image

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
    from .data import IMAGE_EXTENSIONS

    parts = PurePosixPath(name).parts
    if (not _NAME_RE.match(name) or any(p in (".", "..") or p.startswith(".") for p in parts)
            or "//" in name or name.endswith("/")):
        raise HTTPError(400, f"invalid name {name!r}: use letters, digits, '_', '-', '.', '/' (no '..', no leading '/')")
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        raise HTTPError(400, f"invalid name {name!r}: end it with an image suffix such as .jpg")
    return name


class SearchService:
    """The collection, the query embedder and the journal of changes; thread-safe."""

    def __init__(self, collection_dir, config: ServeConfig | None = None, extractor=None):
        from .extract import ExtractConfig, Extractor
        from .index import load_collection

        self.config = config or ServeConfig()
        self.path = Path(collection_dir)
        self.col = load_collection(self.path)
        m = self.col.manifest
        ecfg = ExtractConfig.from_dict({**m.get("extract_config", {}), **({"threads": self.config.threads} if self.config.threads else {})})
        if not m.get("extract_config"):
            log.warning("%s has no extract config; embedding uploads with the defaults", self.path)
        self.extractor = extractor or Extractor(ecfg)
        self.model_id = ecfg.model_id()
        root = m.get("image_root")
        self.image_base = (Path(root).parent if Path(root).is_file() else Path(root)) if root else None
        self.items_dir = self.path / "items"
        self.journal = self.path / "journal.jsonl"
        self.lock = threading.Lock()
        self.row_of = {n: i for i, n in enumerate(self.col.names)}
        self.deleted: set[int] = set()
        self.added: set[str] = set()
        self.counters = dict(searches=0, adds=0, deletes=0, errors=0)
        self.started = time.time()
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._batcher = _Batcher(self._search_block)
        self._replay()

    # --- journal
    def _replay(self) -> None:
        if not self.journal.exists():
            return
        lines = self.journal.read_bytes().split(b"\n")
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                if i >= len(lines) - 2:
                    log.warning("%s: ignoring a torn last line (an interrupted write)", self.journal)
                    continue
                raise LookalikeError(f"{self.journal}: line {i + 1} is damaged; remove it (or the file, to drop every change)") from None
            if rec["op"] == "add":
                if rec["name"] in self.row_of:  # already in the index (e.g. folded in by `lookalike update`)
                    continue
                feat = np.frombuffer(base64.b64decode(rec["feature"]), np.float32).reshape(1, -1)
                self._add_row(rec["name"], feat)
            elif rec["op"] == "delete":
                self._delete_row(rec["name"])

    def _append(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with open(self.journal, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _add_row(self, name: str, feat: np.ndarray) -> None:
        self.col.index.add(self.col.prepare(feat))
        self.col.names.append(name)
        self.row_of[name] = len(self.col.names) - 1
        self.added.add(name)

    def _delete_row(self, name: str) -> None:
        row = self.row_of.pop(name, None)
        if row is not None:
            self.deleted.add(row)
        self.added.discard(name)
        self._thumbs.pop(name, None)

    # --- operations
    def embed(self, img: Image.Image) -> np.ndarray:
        feat = self.extractor.embed_images([img])
        self.col.check_queries(feat, self.model_id, "upload")
        return feat

    def search(self, img: Image.Image, k: int) -> list[dict]:
        if not 1 <= k <= self.config.k_max:
            raise HTTPError(422, f"k must be between 1 and {self.config.k_max}, got {k}")
        feat = self.embed(img)
        return self._batcher.submit(feat, k).result()

    def _search_block(self, feats: np.ndarray, ks: list[int]) -> list[list[dict]]:
        """One faiss search for every waiting request (a (b, d) product is several times faster
        per query than b single-row searches); deleted rows are filtered out afterwards."""
        with self.lock:
            live = len(self.row_of)
            want = min(max(ks) + len(self.deleted), self.col.index.ntotal)
            if live == 0:
                return [[] for _ in ks]
            scores, idx = self.col.index.search(self.col.prepare(feats), want)
            names = list(self.col.names)
            deleted = set(self.deleted)
            self.counters["searches"] += len(ks)
        out = []
        for row, k in enumerate(ks):
            kk, hits = min(k, live), []
            for s, j in zip(scores[row], idx[row]):
                if j < 0 or int(j) in deleted:
                    continue
                hits.append(dict(name=names[j], score=round(float(s), 6), thumbnail=f"/images/{_quote(names[j])}"))
                if len(hits) == kk:
                    break
            out.append(hits)
        return out

    def add(self, name: str, data: bytes, img: Image.Image) -> dict:
        check_name(name)
        with self.lock:
            if name in self.row_of:
                raise HTTPError(409, f"{name!r} is already in the collection; DELETE /items/{name} first or choose another name")
        feat = self.embed(img)
        target = self.items_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            if name in self.row_of:
                raise HTTPError(409, f"{name!r} is already in the collection")
            with atomic_path(target) as tmp:
                Path(tmp).write_bytes(data)
            self._append(dict(op="add", name=name, feature=base64.b64encode(feat.astype(np.float32).tobytes()).decode(),
                              time=time.strftime("%Y-%m-%dT%H:%M:%S")))
            self._add_row(name, feat)
            self.counters["adds"] += 1
            return dict(name=name, count=len(self.row_of), thumbnail=f"/images/{_quote(name)}")

    def delete(self, name: str) -> dict:
        with self.lock:
            if name not in self.row_of:
                raise HTTPError(404, f"no item named {name!r}")
            self._append(dict(op="delete", name=name, time=time.strftime("%Y-%m-%dT%H:%M:%S")))
            self._delete_row(name)
            self.counters["deletes"] += 1
            return dict(deleted=name, count=len(self.row_of))

    def image_path(self, name: str) -> Path:
        with self.lock:
            known = name in self.row_of
            added = name in self.added
        if not known:
            raise HTTPError(404, f"no image named {name!r} in the collection")
        base = self.items_dir if added else self.image_base
        if base is None:
            raise HTTPError(404, "this collection was indexed without --image-root; its images cannot be shown")
        base = base.resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise HTTPError(404, f"image file of {name!r} is missing")
        return path

    def thumbnail(self, name: str) -> bytes:
        with self.lock:
            hit = self._thumbs.get(name)
            if hit is not None:
                self._thumbs.move_to_end(name)
                return hit
        from .data import BadImage, load_image

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
            self._thumbs[name] = data
            while len(self._thumbs) > 2048:
                self._thumbs.popitem(last=False)
        return data

    def stats(self) -> dict:
        m = self.col.manifest
        with self.lock:
            return dict(items=len(self.row_of), added=len(self.added), deleted=len(self.deleted),
                        dim=self.col.dim, model=m.get("model"), pooling=m.get("pooling"), factory=m.get("factory"),
                        whitening=bool(m.get("whitening")), collection=str(self.path),
                        uptime_s=round(time.time() - self.started, 1), **self.counters)


class _Batcher:
    """Collects concurrent search requests (up to ``max_batch``, waiting at most ``wait`` seconds
    after the first) and answers them with one call of ``run(features, ks)``."""

    def __init__(self, run, max_batch: int = 64, wait: float = 0.002):
        import queue

        self.run, self.max_batch, self.wait = run, max_batch, wait
        self.queue: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._loop, name="lookalike-search-batcher", daemon=True).start()

    def submit(self, feat: np.ndarray, k: int):
        from concurrent.futures import Future

        fut: Future = Future()
        self.queue.put((feat, k, fut))
        return fut

    def _loop(self) -> None:
        import queue

        while True:
            batch = [self.queue.get()]
            deadline = time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                results = self.run(np.vstack([b[0] for b in batch]), [b[1] for b in batch])
                for (_, _, fut), res in zip(batch, results):
                    fut.set_result(res)
            except BaseException as e:  # every waiting request gets the error, the loop goes on
                for _, _, fut in batch:
                    fut.set_exception(e)


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="/")


def create_app(service: SearchService):
    """The FastAPI application around a :class:`SearchService`."""
    from fastapi import FastAPI, File, Form, Header, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = service.config
    limit = int(cfg.max_upload_mb * 1024 * 1024)
    app = FastAPI(title="lookalike", version=_version(), docs_url=None, redoc_url=None,
                  description="Search a lookalike collection by image.")

    error = _error_response

    @app.exception_handler(HTTPError)
    async def _own(request, exc: HTTPError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(422, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request")

    @app.exception_handler(LookalikeError)
    async def _lookalike(request, exc):
        return error(400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request, exc):
        service.counters["errors"] += 1
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal error (logged on the server)")


    def check_key(key: str | None) -> None:
        if cfg.api_key and not (key and hmac.compare_digest(key.encode(), cfg.api_key.encode())):
            raise HTTPError(401, "this endpoint needs the header X-API-Key with the server's key")

    async def read_image(file: UploadFile) -> tuple[bytes, Image.Image]:
        data = await file.read()
        img = await run_in_threadpool(decode_upload, data, cfg.max_pixels)
        return data, img

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(_PAGE)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/health", summary="Liveness: the collection is loaded")
    async def health():
        return {"status": "ok", "items": len(service.row_of)}

    @app.get("/stats", summary="Collection size, model and request counters")
    async def stats():
        return service.stats()

    @app.post("/search", summary="Search by an uploaded image")
    async def search(file: UploadFile = File(..., description="the query image"),
                     k: int = Form(10, description="number of results")):
        _, img = await read_image(file)
        t0 = time.perf_counter()
        results = await run_in_threadpool(service.search, img, k)
        return {"results": results, "k": k, "ms": round(1000 * (time.perf_counter() - t0), 1)}

    @app.get("/images/{name:path}", summary="JPEG thumbnail of a gallery image",
             responses={200: {"content": {"image/jpeg": {}}}})
    async def image(name: str):
        data = await run_in_threadpool(service.thumbnail, name)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/items", status_code=201, summary="Add an image to the collection (persisted, searchable at once)")
    async def add_item(file: UploadFile = File(...), name: str | None = Form(None, description="default: the file name"),
                       x_api_key: str | None = Header(None)):
        check_key(x_api_key)
        name = name or (file.filename or "")
        check_name(name)
        data, img = await read_image(file)
        return await run_in_threadpool(service.add, name, data, img)

    @app.delete("/items/{name:path}", summary="Remove an image from the collection")
    async def delete_item(name: str, x_api_key: str | None = Header(None)):
        check_key(x_api_key)
        return await run_in_threadpool(service.delete, name)

    return _Guard(app, limit, cfg.timeout, _error_response)


class _Guard:
    """Outermost ASGI layer: the body-size cap (declared and streamed) and the request timeout, both
    answered in the common JSON error shape. ``.app`` is the FastAPI application inside."""

    def __init__(self, app, limit: int, timeout: float, error):
        self.app, self.limit, self.timeout, self.error = app, limit, timeout, error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        too_large = f"request body is larger than {self.limit / 2 ** 20:g} MB"
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.error(413, too_large)(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI passes HTTPExceptions raised while reading the body through
                    raise HTTPException(413, too_large)
            return message

        async def watched_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, counted_receive, watched_send), self.timeout)
        except asyncio.TimeoutError:
            if not started:
                await self.error(504, f"request took longer than {self.timeout:g} s")(scope, receive, send)


def _error_response(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def _version() -> str:
    from ._version import __version__

    return __version__


def serve(collection_dir, config: ServeConfig | None = None) -> None:
    """Load the collection, warm the model up, and serve until interrupted."""
    import uvicorn

    config = config or ServeConfig()
    service = SearchService(collection_dir, config)
    service.embed(Image.new("RGB", (64, 64), (127, 127, 127)))  # builds the runner before the first request
    log.info("serving %s (%d items) on http://%s:%d", collection_dir, len(service.row_of), config.host, config.port)
    uvicorn.run(create_app(service), host=config.host, port=config.port, log_level="warning",
                timeout_keep_alive=5, limit_concurrency=256)


def _docs_page(schema: dict) -> str:
    from html import escape

    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{escape(path)}</code></td>"
                        f"<td>{escape(op.get('summary', ''))}</td></tr>")
    return (f"<!doctype html><meta charset=utf-8><title>lookalike API</title>"
            f"<style>body{{font:15px system-ui;margin:2em}}td{{padding:.3em .8em;border-bottom:1px solid #ddd}}</style>"
            f"<h1>lookalike API {escape(schema.get('info', {}).get('version', ''))}</h1>"
            f"<p>Machine-readable schema: <a href='/openapi.json'>/openapi.json</a>. Errors are "
            f"<code>{{\"error\": {{\"status\": N, \"message\": \"...\"}}}}</code>.</p>"
            f"<table>{''.join(rows)}</table>")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>lookalike search</title>
<style>
 body{font:15px system-ui,sans-serif;margin:0;background:#f6f6f4;color:#222}
 header{padding:.8em 1em;background:#263238;color:#fff}header h1{margin:0;font-size:1.2em}
 main{display:flex;flex-wrap:wrap;gap:1em;padding:1em}
 #left{flex:0 0 260px;max-width:100%}
 #drop{border:2px dashed #90a4ae;border-radius:8px;padding:1.2em;text-align:center;background:#fff;cursor:pointer}
 #drop.over{background:#e3f2fd;border-color:#1e88e5}
 #query{max-width:100%;margin-top:.8em;border-radius:6px;display:none}
 #right{flex:1 1 320px;min-width:0}
 #grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:.6em}
 .hit{background:#fff;border-radius:6px;padding:.4em;box-shadow:0 1px 2px #0002;font-size:.85em;overflow:hidden}
 .hit img{width:100%;aspect-ratio:1;object-fit:contain;background:#eee;border-radius:4px}
 .hit .name{white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
 #status{margin:.5em 0;color:#555}.err{color:#b71c1c}
 label{display:block;margin-top:.6em}
 @media (max-width:600px){#left{flex:1 1 100%}#grid{grid-template-columns:repeat(2,1fr)}}
</style></head><body>
<header><h1>lookalike &mdash; search by photo</h1></header>
<main>
 <section id="left">
  <div id="drop" tabindex="0">Drop a photo here<br>or <u>choose a file</u>
   <input id="file" type="file" accept="image/*" hidden></div>
  <label>results <input id="k" type="number" min="1" max="100" value="12" style="width:4em"></label>
  <img id="query" alt="query photo">
 </section>
 <section id="right"><div id="status">Choose a photo to search the collection.</div><div id="grid"></div></section>
</main>
<script>
const drop=document.getElementById('drop'),file=document.getElementById('file'),grid=document.getElementById('grid'),
 statusEl=document.getElementById('status'),query=document.getElementById('query'),kEl=document.getElementById('k');
drop.onclick=()=>file.click();
drop.onkeydown=e=>{if(e.key==='Enter'||e.key===' ')file.click()};
file.onchange=()=>{if(file.files.length)search(file.files[0])};
['dragenter','dragover'].forEach(t=>drop.addEventListener(t,e=>{e.preventDefault();drop.classList.add('over')}));
['dragleave','drop'].forEach(t=>drop.addEventListener(t,e=>{e.preventDefault();drop.classList.remove('over')}));
drop.addEventListener('drop',e=>{if(e.dataTransfer.files.length)search(e.dataTransfer.files[0])});
function say(text,bad){statusEl.textContent=text;statusEl.className=bad?'err':''}
async function search(f){
 query.src=URL.createObjectURL(f);query.style.display='block';grid.innerHTML='';say('Searching…');
 const body=new FormData();body.append('file',f);body.append('k',kEl.value||'12');
 try{
  const r=await fetch('/search',{method:'POST',body});const data=await r.json();
  if(!r.ok){say(data.error?data.error.message:('error '+r.status),true);return}
  say(data.results.length+' results in '+data.ms+' ms');
  for(const hit of data.results){
   const d=document.createElement('div');d.className='hit';
   const img=document.createElement('img');img.src=hit.thumbnail;img.alt=hit.name;img.loading='lazy';
   const n=document.createElement('div');n.className='name';n.textContent=hit.name;n.title=hit.name;
   const s=document.createElement('div');s.className='score';s.textContent='score '+hit.score.toFixed(3);
   d.append(img,n,s);grid.append(d);
  }
 }catch(e){say('search failed: '+e,true)}
}
</script></body></html>
"""
