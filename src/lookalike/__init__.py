"""lookalike: image retrieval that trains, extracts, indexes, re-ranks, evaluates and serves."""
from ._version import __version__  # noqa: F401

from .api import build_index, evaluate, run, search  # noqa: E402
from .errors import LookalikeError  # noqa: E402
from .extract import ExtractConfig, Extractor, extract  # noqa: E402
from .sample import make_sample  # noqa: E402

__all__ = ["ExtractConfig", "Extractor", "LookalikeError", "build_index", "evaluate", "extract", "make_sample", "run", "search"]
