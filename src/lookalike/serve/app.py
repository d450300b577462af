"""The HTTP layer of ``lookalike serve``: FastAPI routes over a :class:`SearchService`, one JSON
error shape for every error (``{"error": {"status": N, "message": "..."}}``), and an outer ASGI
layer for the body-size cap and the request timeout (Starlette's own body limit does not answer
in that shape). HTTP, multipart parsing and the OpenAPI schema are FastAPI's/Starlette's; the
search page is the static file ``page.html`` beside this module.
"""
# no `from __future__ import annotations` here: FastAPI reads the route signatures at runtime

import asyncio
import hmac
import logging
import time
from functools import lru_cache
from pathlib import Path

from PIL import Image

from .._version import __version__
from ..errors import LookalikeError
from .service import HTTPError, SearchService, check_name, decode_upload

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _page() -> str:
    return (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")


def create_app(service: SearchService):
    """The FastAPI application around a :class:`SearchService`."""
    from fastapi import FastAPI, File, Form, Header, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = service.config
    limit = int(cfg.max_upload_mb * 1024 * 1024)
    app = FastAPI(title="lookalike", version=__version__, docs_url=None, redoc_url=None,
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
        return HTMLResponse(_page())

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get("/health", summary="Liveness: the collection is loaded")
    async def health():
        return {"status": "ok", "items": len(service)}

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
