"""Where files go: lookalike's own cache folder (fetched model weights, local-feature caches), and
the one rule for turning an image name into a path inside an output folder (:func:`confined`).
A leaf module (it imports only ``errors``)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import LookalikeError


def cache_dir() -> Path:
    """``$LOOKALIKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lookalike`` (``~/.cache/lookalike``)."""
    base = os.environ.get("LOOKALIKE_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lookalike"


def confined(root, name: str) -> Path:
    """``root / name`` for a name that must stay inside ``root`` (an image name that becomes an
    output file): absolute names, ``..`` parts, empty parts, NUL and other control characters are
    refused with a ``LookalikeError`` naming the name. Symlinks are not resolved here (the caller writes
    to the returned path inside ``root``)."""
    text = str(name)
    parts = text.replace("\\", "/").split("/")
    if (not text or text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":")
            or any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 or ord(c) == 127 for c in text)):
        raise LookalikeError(f"name {name!r} cannot be a file name inside {root}: it is absolute, has '..' or "
                         "empty parts, or control characters")
    return Path(root).joinpath(*parts)
