"""The verbs whose work lives in one stage: ``extract``, ``train``, ``inspect``, ``serve``, ``sample``
and ``codec ...``. Each is a thin function here so the CLI calls the API and nothing else; the
stage is imported only when the verb runs (``train`` and ``extract`` import torch, the others do not)."""
from __future__ import annotations


def extract(images, output=None, progress: bool = False, **settings):
    """``lookalike extract``: features of IMAGES into a feature store (resumable); ``settings`` are
    ``ExtractConfig`` fields. Returns the ``ExtractResult``."""
    from ..extract import extract as _extract

    return _extract(images, output, progress=progress, **settings)


def train(data, output, resume: bool = False, progress: bool = False, **settings) -> dict:
    """``lookalike train``: fine-tune an embedding; ``settings`` are ``TrainConfig`` fields. Returns
    the best epoch's record."""
    from ..train import TrainConfig, train as _train

    return _train(TrainConfig(data=str(data), output=str(output), **settings), resume=resume, progress=progress)


def inspect(images, labels=None, queries=None, near_radius: int = 4, report=None, progress: bool = False):
    """``lookalike inspect``: (findings, their summary lines, the report page or None)."""
    from ..inspection import InspectConfig, inspect_images, summary_lines, write_inspect_report

    r = inspect_images(InspectConfig(str(images), labels, queries, near_radius), progress=progress)
    page = write_inspect_report(r, report) if report else None
    return r, summary_lines(r), page


def serve(collection, **settings) -> None:
    """``lookalike serve``: serve a collection over HTTP until interrupted; ``settings`` are
    ``ServeConfig`` fields."""
    import importlib.util

    from ..errors import LookalikeError

    if not (importlib.util.find_spec("fastapi") and importlib.util.find_spec("uvicorn")):
        raise LookalikeError("serving needs FastAPI and uvicorn: pip install 'lookalike[serve]'")
    from ..serve import ServeConfig, serve as _serve

    _serve(collection, ServeConfig(**settings))


def sample(directory, variants: int = 3) -> dict:
    """``lookalike sample``: the demo set (gallery/, queries/, labels.csv) from scikit-image's photos."""
    from ..sample import make_sample

    return make_sample(directory, variants=variants)


def shard(collection, output, shards: int = 2, sizes: list[int] | None = None) -> list:
    """``lookalike shard``: split a Flat or IVF collection into ``shards`` shard collections under
    ``output`` (``shards.json`` lists them); serve them with :func:`lookalike.cluster.serve_shards`."""
    from ..cluster import split_collection

    return split_collection(collection, output, shards=shards, sizes=sizes)


def codec_fit(feats, output, nbytes: int, method: str = "opq", bits: int = 8, labels=None, epochs: int = 30,
              latent_dim: int | None = None, selection: str = "identities", seed: int = 0):
    """``lookalike codec fit``: fit a codec on training features; returns the ``Codec``."""
    from ..codec import fit_file

    return fit_file(feats, output, nbytes, method, bits, labels, epochs, latent_dim, selection, seed)


def codec_encode(feats, codec, output=None, naic_dir=None) -> int:
    """``lookalike codec encode``: features -> exactly B bytes each; returns how many."""
    from ..codec import encode_file

    return encode_file(feats, codec, output, naic_dir)


def codec_decode(codes, codec, output, naic_dir=None) -> int:
    """``lookalike codec decode``: codes -> a feature store; returns how many."""
    from ..codec import decode_file

    return decode_file(codes, codec, output, naic_dir)


def codec_index(codes, codec, output, nlist: int = 0):
    """``lookalike codec index``: a collection of the codes themselves; returns it."""
    from ..codec import index_codes

    return index_codes(codes, codec, output, nlist)


def codec_evaluate(feats, codec, labels=None, json_out=None) -> dict:
    """``lookalike codec evaluate``: reconstruction error and retrieval with decoded features."""
    from ..codec import evaluate_file

    return evaluate_file(feats, codec, labels, json_out)
