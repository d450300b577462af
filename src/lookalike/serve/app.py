"""The HTTP layer of ``lookalike serve``: FastAPI routes over a :class:`SearchService`, one JSON
error shape for every error (``{"error": {"status": N, "message": "..."}}``), an outer ASGI layer
(:class:`_Guard`) for what must be decided before a route runs, and the uvicorn settings with a
connection layer (:func:`server_config`).

The guard, in order: the ``Host`` header must name this server (DNS rebinding, 400); writes (any
method but GET/HEAD/OPTIONS on any path but ``/search``, i.e. ``POST``/``DELETE /items``) need an
API key or an explicit ``allow_anonymous_writes`` (403), a same-origin ``Origin`` when one is sent
(cross-site forms, 403) and the key (401) -- all before the body is read; the body-size cap (413, declared and streamed);
the number of requests handled at once (503 with ``Retry-After``); the request timeout (504; a
write that has begun its commit is finished and answered instead, see
:class:`~lookalike.serve.service.Ticket`). The connection layer (a subclass of uvicorn's h11
protocol) closes connections that do not send a request head within ``header_timeout`` and keeps
the number of open connections near ``max_connections`` by closing the oldest idle one. HTTP,
multipart parsing and the OpenAPI schema are FastAPI's/Starlette's; the search page is the static
file ``page.html`` beside this module.
"""
# no `from __future__ import annotations` here: FastAPI reads the route signatures at runtime

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from PIL import Image

from .._version import __version__
from ..errors import LookalikeError
from .service import HTTPError, SearchService, ServeConfig, Ticket, check_name, decode_upload

log = logging.getLogger(__name__)

TICKET = "lookalike.ticket"  # scope key of a write request's Ticket
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@lru_cache(maxsize=1)
def _page() -> str:
    return (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")


def create_app(service: SearchService):
    """The FastAPI application around a :class:`SearchService`."""
    from fastapi import FastAPI, File, Form, Header, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = service.config
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

    key_doc = "the server's key (--api-key); checked, with the Host and Origin headers, before the body is read"

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
        with service.arriving():  # from here the search batcher expects this request
            _, img = await read_image(file)
            t0 = time.perf_counter()
            results = await run_in_threadpool(service.search, img, k)
        # a plain JSONResponse: skips FastAPI's encoder walk over every hit (the event loop serialises
        # a whole group's answers one after another, the last client waits for all of them)
        return JSONResponse({"results": results, "k": k, "ms": round(1000 * (time.perf_counter() - t0), 1)})

    @app.get("/images/{name:path}", summary="JPEG thumbnail of a gallery image",
             responses={200: {"content": {"image/jpeg": {}}}})
    async def image(name: str):
        data = await run_in_threadpool(service.thumbnail, name)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/items", status_code=201, summary="Add an image to the collection (persisted, searchable at once)")
    async def add_item(request: Request, file: UploadFile = File(...),
                       name: str | None = Form(None, description="default: the file name"),
                       x_api_key: str | None = Header(None, description=key_doc)):
        name = name or (file.filename or "")
        check_name(name)
        data, img = await read_image(file)
        return await run_in_threadpool(service.add, name, data, img, request.scope.get(TICKET))

    @app.delete("/items/{name:path}", summary="Remove an image from the collection")
    async def delete_item(request: Request, name: str, x_api_key: str | None = Header(None, description=key_doc)):
        return await run_in_threadpool(service.delete, name, request.scope.get(TICKET))

    return _Guard(app, cfg, _error_response)


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``name``, ``name:port``, ``[v6]`` or ``[v6]:port`` -> (lower-case name, port); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, sep, port = value.partition(":")
        port = port if sep else None
    if not name or (port is not None and not (port.isdigit() and 0 < int(port) < 65536)):
        return None
    return name.rstrip("."), None if port is None else int(port)


def _ip(name: str):
    """The IP address ``name`` spells (IPv4-mapped IPv6 as IPv4), or None for a host name."""
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip


_DEFAULT_PORT = {"http": 80, "https": 443}


class _Guard:
    """Outermost ASGI layer: the checks made before a route runs (Host, write permission, Origin,
    key, body size, load) and the request timeout, all answered in the common JSON error shape.
    ``.app`` is the FastAPI application inside."""

    def __init__(self, app, config: ServeConfig, error):
        self.app, self.config, self.error = app, config, error
        self.limit = int(config.max_upload_mb * 1024 * 1024)
        self.timeout = config.timeout
        self.in_flight = 0
        names = {"localhost", "127.0.0.1", "::1"}
        bind = config.host.strip().strip("[]").lower()
        if bind not in ("", "0.0.0.0", "::"):
            names.add(bind)
        self.any_host = "*" in config.allowed_hosts
        for h in config.allowed_hosts:
            parsed = _split_host(h)
            if parsed and h != "*":
                names.add(parsed[0])
        self.host_names = frozenset(names)

    # ---------------------------------------------------------------- checks before the app
    def host_of(self, scope, headers: dict) -> tuple[str, int | None] | str:
        """The request's (host name, port), or the reason it is not served here."""
        raw = headers.get(b"host")
        if raw is None:  # HTTP/1.0 without Host: no browser sends that
            server = scope.get("server") or ("", None)
            return str(server[0]).lower(), server[1]
        text = raw.decode("latin-1")
        parsed = _split_host(text)
        if parsed is None:
            return f"malformed Host header {text[:100]!r}"
        name = parsed[0]
        if self.any_host or name in self.host_names:
            return parsed
        server = scope.get("server")
        if server and _ip(name) is not None and _ip(name) == _ip(str(server[0])):
            return parsed  # the address this connection reached: an IP literal cannot be rebound
        name = name[:100]
        return (f"host {name!r} is not served here (DNS-rebinding guard); to serve it, e.g. behind a "
                f"reverse proxy, start the server with --allowed-host {name}")

    def write_refusal(self, scope, headers: dict, host: tuple[str, int | None]) -> tuple[int, str] | None:
        cfg = self.config
        if not cfg.api_key and not cfg.allow_anonymous_writes:
            return 403, ("adding and removing items is off: this server has no API key; start it with "
                         "--api-key KEY (or LOOKALIKE_API_KEY) and send the header X-API-Key, or with "
                         "--allow-anonymous-writes to let anyone who can reach it change the collection")
        origin = headers.get(b"origin")
        if origin is not None:
            scheme = scope.get("scheme", "http")
            name, port = host
            here = (scheme, name, port or _DEFAULT_PORT.get(scheme))
            text = origin.decode("latin-1")
            try:
                u = urlsplit(text)
                there = (u.scheme, (u.hostname or "").rstrip("."), u.port or _DEFAULT_PORT.get(u.scheme))
            except ValueError:
                there = None
            if there != here:
                shown = f"[{name}]" if ":" in name else name
                return 403, (f"cross-site write refused: Origin {text[:100]!r} is not this server "
                             f"({scheme}://{shown}{f':{port}' if port else ''}); writes come from its own page or "
                             "from clients that send no Origin header")
        key = headers.get(b"x-api-key")
        if cfg.api_key and not (key and hmac.compare_digest(key, cfg.api_key.encode())):
            return 401, "this endpoint needs the header X-API-Key with the server's key"
        return None

    # ---------------------------------------------------------------- the request
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        headers = dict(scope.get("headers") or [])
        host = self.host_of(scope, headers)
        if isinstance(host, str):
            return await self.error(400, host)(scope, receive, send)
        write = scope["method"] not in _SAFE_METHODS and scope["path"] != "/search"  # POST /search reads
        if write and (refusal := self.write_refusal(scope, headers, host)):
            return await self.error(*refusal)(scope, receive, send)
        too_large = f"request body is larger than {self.limit / 2 ** 20:g} MB"
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self.error(413, too_large)(scope, receive, send)
        if self.in_flight >= self.config.max_in_flight:
            return await self.error(503, f"the server is busy ({self.in_flight} requests at once); try again shortly",
                                    headers={"Retry-After": "1"})(scope, receive, send)
        seen = 0
        started = closed = False

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
            if closed:  # answered already (timeout): a late message of the cancelled app is dropped
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        ticket = Ticket() if write else None
        if ticket is not None:
            scope[TICKET] = ticket
        # counted until the app's task ends (a cancelled task may wait for its worker thread)
        self.in_flight += 1
        task = asyncio.ensure_future(self.app(scope, counted_receive, watched_send))
        task.add_done_callback(self._finished)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if done:
            return task.result()
        if ticket is not None and not ticket.cancel():
            await task  # the change is being made: finish it and answer as usual
            return
        task.cancel()
        closed = True
        if not started:
            await self.error(504, f"request took longer than {self.timeout:g} s"
                             + ("; nothing was changed" if ticket is not None else ""))(scope, receive, send)

    def _finished(self, task) -> None:
        self.in_flight -= 1
        if not task.cancelled() and task.exception() is not None and not isinstance(task.exception(), HTTPError):
            log.debug("request task ended with %r", task.exception())


def _error_response(status: int, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


def _raw_error(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the JSON shape that closes the connection (written by
    the connection layer, outside any request)."""
    body = json.dumps({"error": {"status": status, "message": message}}, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n").encode() + body


def protocol_class(config: ServeConfig):
    """uvicorn's h11 protocol with a deadline for request heads and a cap on open connections.

    uvicorn arms no timer until a first response (a connection that dribbles its head stays open
    for good), and its ``limit_concurrency`` counts idle connections and answers in plain text.
    Here a connection must send a complete request head within ``header_timeout`` of connecting or
    of its previous response (and, once answered early, finish its body within that time); then it
    gets a JSON 408 (or is closed when it sent nothing). The time a request spends in the app is
    the guard's (``timeout``). When more than ``max_connections`` are open, the oldest one waiting
    for a request head is closed: slow or idle sockets cannot crowd out requests."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    header_timeout, max_connections = config.header_timeout, config.max_connections

    class Protocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._deadline = None
            self.waiting_since: float | None = None  # when it began waiting for the client (None: in the app)

        def connection_made(self, transport):
            super().connection_made(transport)
            self._watch()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and getattr(c, "waiting_since", None) is not None]
                if idle:
                    min(idle, key=lambda c: c.waiting_since).expire(evicted=True)

        def data_received(self, data):
            super().data_received(data)
            self._watch()

        def on_response_complete(self):
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a malformed head, in the JSON shape
            import h11

            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                self.transport.write(_raw_error(400, "Bad Request", "invalid HTTP request"))
            self.transport.close()

        def _watch(self) -> None:
            if self.transport is None or self.transport.is_closing():
                self._disarm()
            elif self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is in the app: the guard's timeout applies
            elif self._deadline is None:
                self.waiting_since = self.loop.time()
                self._deadline = self.loop.call_later(header_timeout, self.expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.waiting_since = None

        def expire(self, evicted: bool = False) -> None:
            """Close this connection: it waited for the client too long, or makes room for a new one.
            A client in the middle of a request head is told why (JSON 408 or 503)."""
            import h11

            self._disarm()
            if self.transport.is_closing():
                return
            if self.conn.trailing_data[0] and self.conn.our_state is h11.IDLE:
                self.transport.write(_raw_error(503, "Service Unavailable", "too many open connections; try again")
                                     if evicted else
                                     _raw_error(408, "Request Timeout", f"no complete request head within {header_timeout:g} s"))
            self.transport.close()

    return Protocol


def server_config(app, config: ServeConfig, **overrides):
    """The ``uvicorn.Config`` of ``lookalike serve`` (tests pass ``port`` and ``log_level``)."""
    import uvicorn

    settings = dict(host=config.host, port=config.port, log_level="warning", http=protocol_class(config), ws="none",
                    timeout_keep_alive=5, limit_concurrency=None, backlog=2048)
    settings.update(overrides)
    return uvicorn.Config(app, **settings)


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
