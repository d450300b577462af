"""``lookalike serve``: a collection behind HTTP (FastAPI + uvicorn) with a web page at ``/``.

Endpoints (every error, whatever its source, is ``{"error": {"status": N, "message": "..."}}``):
  - ``POST /search``          multipart ``file`` (an image) and ``k`` -> names, scores, thumbnail URLs;
  - ``GET  /images/{name}``   a JPEG thumbnail of a gallery image (only names in the collection);
  - ``POST /items``           multipart ``file`` and optional ``name``: add an image, searchable at once;
  - ``DELETE /items/{name}``  remove an image from the results;
  - ``GET /health``, ``GET /stats``, ``GET /openapi.json`` and ``GET /docs`` (a plain page, no CDN).

Who may do what (see :class:`ServeConfig`): only ``Host`` names of this server are answered (the
bind address, ``localhost``, ``127.0.0.1``, ``[::1]``, the IP address a connection reached, and
``allowed_hosts``: add a reverse proxy's public name there); writes (``POST``/``DELETE /items``)
need ``api_key`` (header ``X-API-Key``) or ``allow_anonymous_writes=True``, and a browser's
``Origin`` must be this server's. Bodies are capped (``max_upload_mb``), images by pixels
(``max_pixels``), requests by time (``timeout``; a write that has begun its commit is finished),
request heads by time (``header_timeout``), connections (``max_connections``) and requests at once
(``max_in_flight``: more get a JSON 503). TLS, per-client rate limits and bandwidth limits are left
to a reverse proxy.

Modules: ``service`` (the collection, the query embedder, upload checks, thumbnails, the write
ticket), ``batcher`` (one search for concurrent requests), ``app`` (routes, error shape, the checks
made before a route runs, the timeout, the uvicorn settings and connection layer), ``page.html``
(the search page). Additions and deletions are the collection's own
(:meth:`lookalike.collection.Collection.add` / ``remove`` with a journal).
"""
from __future__ import annotations

import logging

from .app import create_app, server_config
from .service import HTTPError, SearchService, ServeConfig, Ticket, check_name, decode_upload

__all__ = ["HTTPError", "SearchService", "ServeConfig", "Ticket", "check_name", "create_app", "decode_upload", "serve",
           "server_config"]

log = logging.getLogger(__name__)


def serve(collection_dir, config: ServeConfig | None = None) -> None:
    """Load the collection, warm the model up, and serve until interrupted."""
    import uvicorn

    config = config or ServeConfig()
    service = SearchService(collection_dir, config)  # loads the collection and the model
    log.info("serving %s (%d items) on http://%s:%d", collection_dir, len(service), config.host, config.port)
    if not config.api_key and not config.allow_anonymous_writes:
        log.info("POST/DELETE /items are refused: no API key (--api-key) and no --allow-anonymous-writes")
    uvicorn.Server(server_config(create_app(service), config)).run()
