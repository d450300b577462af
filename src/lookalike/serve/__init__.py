"""``lookalike serve``: a collection behind HTTP (FastAPI + uvicorn) with a web page at ``/``.

Endpoints (every error, whatever its source, is ``{"error": {"status": N, "message": "..."}}``):
  - ``POST /search``          multipart ``file`` (an image) and ``k`` -> names, scores, thumbnail URLs;
  - ``GET  /images/{name}``   a JPEG thumbnail of a gallery image (only names in the collection);
  - ``POST /items``           multipart ``file`` and optional ``name``: add an image, searchable at once;
  - ``DELETE /items/{name}``  remove an image from the results;
  - ``GET /health``, ``GET /stats``, ``GET /openapi.json`` and ``GET /docs`` (a plain page, no CDN).

Modules: ``service`` (the collection, the query embedder, upload checks, thumbnails), ``batcher``
(one search for concurrent requests), ``app`` (routes, error shape, body cap and timeout),
``page.html`` (the search page). Additions and deletions are the collection's own
(:meth:`lookalike.collection.Collection.add` / ``remove`` with a journal).
"""
from __future__ import annotations

import logging

from .app import create_app
from .service import HTTPError, SearchService, ServeConfig, check_name, decode_upload

__all__ = ["HTTPError", "SearchService", "ServeConfig", "check_name", "create_app", "decode_upload", "serve"]

log = logging.getLogger(__name__)


def serve(collection_dir, config: ServeConfig | None = None) -> None:
    """Load the collection, warm the model up, and serve until interrupted."""
    import uvicorn

    config = config or ServeConfig()
    service = SearchService(collection_dir, config)  # loads the collection and the model
    log.info("serving %s (%d items) on http://%s:%d", collection_dir, len(service), config.host, config.port)
    uvicorn.run(create_app(service), host=config.host, port=config.port, log_level="warning",
                timeout_keep_alive=5, limit_concurrency=256)
