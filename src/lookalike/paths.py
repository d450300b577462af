"""Where lookalike keeps files of its own: the cache folder (fetched model weights, local-feature
caches). A leaf module: it imports nothing from the package."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LOOKALIKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lookalike`` (``~/.cache/lookalike``)."""
    base = os.environ.get("LOOKALIKE_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lookalike"
