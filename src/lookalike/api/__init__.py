"""The Python API: one function per CLI verb, each with the same arguments as the command.

>>> import lookalike
>>> lookalike.run("gallery/", "queries/", "results.csv")            # extract + index + search
>>> lookalike.evaluate("results.csv", "labels.csv")["digix_score"]

Modules: ``searching`` (index, search, run, update: one search path), ``choosing`` (settings chosen
on the gallery, tune), ``scoring`` (evaluate and its report), ``commands`` (the verbs whose work is
one stage's: extract, train, inspect, serve, shard, sample, codec).
"""
from .choosing import SELECT_MODES, load_choice, tune, tune_gallery
from .commands import (codec_decode, codec_encode, codec_evaluate, codec_fit, codec_index, extract, inspect, sample,
                       serve, shard, train)
from .scoring import EvaluateConfig, evaluate
from .queries import path_key as _path_key  # noqa: F401  (benchmarks/defaults.py)
from .searching import RunConfig, RunResult, SearchConfig, SearchResult, build_index, run, search, update

__all__ = ["EvaluateConfig", "RunConfig", "RunResult", "SELECT_MODES", "SearchConfig", "SearchResult", "build_index",
           "codec_decode", "codec_encode", "codec_evaluate", "codec_fit", "codec_index", "evaluate", "extract",
           "inspect", "load_choice", "run", "sample", "search", "serve", "shard", "train", "tune", "tune_gallery", "update"]
