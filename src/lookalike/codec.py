"""Feature coding at a fixed byte budget (the NAIC 2021 visual-feature-coding track).

Every codec is the same three parts:

1. an orthonormal linear map to a latent space (``x -> (x - mean) @ P.T``): PCA (``sq``), the
   identity (``pq``), faiss's OPQ rotation (``opq``; on a small fitting set, of a PCA subspace whose
   size :func:`opq_latent_dim` picks from the set's size), or a projection chosen and *learned* for
   retrieval on held-out identities (``learned``: PCA, the discriminant (LDA) subspace when labels
   are given, or OPQ, optionally fine-tuned with torch; see :mod:`lookalike.codec_train`);
2. a quantiser that gives exactly ``B`` bytes per vector: per-dimension uniform 8- or 4-bit levels
   (``sq``), or product quantisation with ``B`` sub-quantisers of 256 centroids each (faiss k-means);
3. the transposed map back (``latent @ P + mean``).

This module owns the codec: the registry of methods (:func:`register_codec_method`; each entry
declares the method's name, the id its code files store, its projection fitter and its quantiser),
the :class:`Codec` itself, its two files (the ``.npz`` codec and the ``.codes`` code file), search in
code space, and one plain function per ``lookalike codec`` verb (:func:`fit_file`,
:func:`encode_file`, :func:`decode_file`, :func:`index_codes`, :func:`evaluate_file`) that the
command line and the Python API call. :mod:`lookalike.codec_train` depends on this module, never the
reverse: the ``learned`` entry names its fitter there by module path, imported only when a learned
codec is fitted.

Decoding is bit-for-bit reproducible on any machine: the projection and the latent values live on
fixed-point grids (2^-18 and 2^-20 of the latent's range) small enough that every product and every
partial sum of the float64 matrix product is exact, so no BLAS summation order can change a bit.
Because the map is orthonormal, encode → decode → encode returns the same codes.

Written by hand because no maintained library offers byte-exact codecs tuned for retrieval; faiss
supplies k-means, PQ and OPQ training. The method registry is a dict keyed by the file id: a plugin
system (entry points) would add machinery for four built-in methods and the rare one a test or a
user registers.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ._io import atomic_path, write_json_atomic
from ._version import __version__
from .errors import LookalikeError
from .numeric import orthonormal_rows, pca_basis

log = logging.getLogger(__name__)

BUDGETS = (16, 32, 64, 128, 256)
_MAGIC = b"LKCODE"
# Code file versions: 1 (CRC-32 of the payload only; still read, its header checked against the codec that
# decodes it) and 2 (written now: CRC-32 of the header's first 34 bytes and the payload).
_VERSION = 2
_READ_VERSIONS = (1, 2)
_HEADER = struct.Struct("<6sHBBIQI8sI")  # magic, version, method, bits, bytes/vector, count, dim, codec id, crc32
_CODEC_VERSION = 1  # the "version" in a codec .npz's meta
_NAMES_KIND = "lookalike-code-names"
_PROJ_BITS = 18  # projection entries: multiples of 2^-18 (|p| <= 1)
_LATENT_BITS = 20  # latent values: multiples of 2^(e - 20) where 2^e bounds their magnitude


def _to_grid(x: np.ndarray, step: float) -> np.ndarray:
    return np.round(np.asarray(x, np.float64) / step) * step


# ---------------------------------------------------------------------- methods: one registry entry each


@dataclass(frozen=True)
class CodecMethod:
    """One codec method.

    ``id`` is the byte every code file of this method stores in its header: it is fixed for good
    (files written years ago must still load), so never renumber or reuse one. ``projection`` fits
    the linear map: ``(codec, x, labels) -> (k, d) projection`` (orthonormal rows) or ``None`` for
    the identity; it is called once ``codec.mean_`` and ``codec.dim_`` are set, and may record on
    the codec (``latent_dim``, ``history_``). It may be given as ``"package.module:function"``,
    imported at the first fit (so this module need not import the module that implements it).
    ``quantiser`` is ``"pq"`` (``nbytes`` sub-quantisers of 256 centroids) or ``"scalar"``
    (uniform 8- or 4-bit levels per latent dimension, ``nbytes * 8 / bits`` dimensions)."""

    id: int
    name: str
    projection: Callable | str
    quantiser: str = "pq"

    def fit_projection(self, codec: "Codec", x: np.ndarray, labels) -> np.ndarray | None:
        fn = self.projection
        if isinstance(fn, str):
            module, _, attr = fn.partition(":")
            fn = getattr(importlib.import_module(module), attr)
        return fn(codec, x, labels)


_QUANTISERS = ("pq", "scalar")
_METHODS_BY_ID: dict[int, CodecMethod] = {}
METHODS: tuple[str, ...] = ()  # the registered names in id order (rebound by register_codec_method)


def register_codec_method(method_id: int, name: str, projection: Callable | str, quantiser: str = "pq") -> CodecMethod:
    """Make ``name`` a codec method (``Codec(method=name)``, ``--method name``) whose code files
    store ``method_id`` (0..255). Registering the same entry again is a no-op; another method under
    a taken id or name is an error."""
    global METHODS
    entry = CodecMethod(int(method_id), str(name), projection, quantiser)
    if not 0 <= entry.id <= 255:
        raise LookalikeError(f"codec method {name!r}: id {method_id} does not fit the code file's one byte (0..255)")
    if quantiser not in _QUANTISERS:
        raise LookalikeError(f"codec method {name!r}: unknown quantiser {quantiser!r}; use one of {', '.join(_QUANTISERS)}")
    for other in _METHODS_BY_ID.values():
        if other == entry:
            return other
        if other.id == entry.id or other.name == entry.name:
            raise LookalikeError(f"codec method {name!r} (id {entry.id}) clashes with the registered "
                                 f"{other.name!r} (id {other.id}): ids and names are unique and never change")
    _METHODS_BY_ID[entry.id] = entry
    METHODS = tuple(_METHODS_BY_ID[i].name for i in sorted(_METHODS_BY_ID))
    return entry


def codec_method(name: str) -> CodecMethod:
    """The registered method called ``name`` (a clear error naming the known ones otherwise)."""
    for entry in _METHODS_BY_ID.values():
        if entry.name == name:
            return entry
    raise LookalikeError(f"unknown codec method {name!r}; use one of {', '.join(METHODS)}")


def _method_by_id(method_id: int, where) -> CodecMethod:
    if method_id not in _METHODS_BY_ID:
        known = ", ".join(f"{m.name}={m.id}" for m in map(_METHODS_BY_ID.get, sorted(_METHODS_BY_ID)))
        raise LookalikeError(f"{where}: written by codec method id {method_id}, which this lookalike does not know "
                             f"(it knows {known}); encode the features again, or use the lookalike that wrote it")
    return _METHODS_BY_ID[method_id]


def _pca_projection(codec: "Codec", x: np.ndarray, labels) -> np.ndarray:
    m = codec.nbytes * 8 // codec.bits
    if m > x.shape[1]:
        raise LookalikeError(f"{codec.nbytes} bytes at {codec.bits} bits hold {m} dimensions, more than the "
                             f"features' {x.shape[1]}: use --method pq or fewer bytes")
    return pca_basis(x - codec.mean_, m)


def _identity_projection(codec: "Codec", x: np.ndarray, labels) -> None:
    return None


# The opq method's latent size on small fitting sets (measured in BENCHMARKS.md, "64-byte codes on
# small fitting sets"): below _OPQ_SMALL_SET vectors per feature dimension, a full-dimensional OPQ
# whose sub-quantisers get _OPQ_COARSE_DIMS or fewer dimensions each fits 256 centroids to about ten
# vectors apiece (and a d x d rotation to a few vectors per dimension): against the top
# _OPQ_DIMS_PER_BYTE * nbytes principal directions rotated and quantised instead, it lost up to 4 points of
# the grocery score and 17-30 of the books score at 64-256 B, and fitted 2-7x slower. Coarser
# sub-quantisers (16-32 B for 1,280-1,792-d features) keep the full rotation, which scored best there.
_OPQ_SMALL_SET = 8
_OPQ_COARSE_DIMS = 32
_OPQ_DIMS_PER_BYTE = 2


def padded_dim(d: int, nbytes: int) -> int:
    """``d`` rounded up to a multiple of ``nbytes``: the latent size of the identity projection and of
    the full OPQ rotation."""
    return -(-d // nbytes) * nbytes


def opq_latent_dim(n: int, d: int, nbytes: int) -> int:
    """The latent size the ``opq`` method picks for ``n`` fitting vectors of ``d`` dimensions at
    ``nbytes`` sub-quantisers: ``d`` rounded up to a multiple of ``nbytes`` (the full rotation, as
    before this rule) unless the set is small (``n < 8 d``) and the full rotation would leave each
    sub-quantiser 32 dimensions or fewer; then ``2 * nbytes`` principal directions. Never more than
    ``n`` (faiss's OPQ crashes the process on fewer vectors than dimensions), never fewer than
    ``nbytes``."""
    full = padded_dim(d, nbytes)
    if n >= _OPQ_SMALL_SET * d:
        return full
    k = full if full > _OPQ_COARSE_DIMS * nbytes else min(full, _OPQ_DIMS_PER_BYTE * nbytes)
    return min(k, max(nbytes, n // nbytes * nbytes))


def opq_projection(xc: np.ndarray, nbytes: int, seed: int, latent: int | None = None) -> np.ndarray:
    """``(latent, d)`` orthonormal rows for the centred rows ``xc``: faiss's OPQ rotation of all
    ``d`` dimensions when ``latent`` (default: :func:`opq_latent_dim`) is ``d`` rounded up to a
    multiple of ``nbytes`` (exactly :func:`opq_rotation`), else of the top ``latent`` principal
    directions (a multiple of ``nbytes``; PCA alone when there are fewer vectors than that)."""
    n, d = xc.shape
    full = padded_dim(d, nbytes)
    latent = opq_latent_dim(n, d, nbytes) if latent is None else int(latent)
    if latent >= full:
        return opq_rotation(xc, nbytes, seed)
    if latent < nbytes or latent % nbytes:
        raise LookalikeError(f"opq latent size {latent}: give a multiple of the {nbytes} sub-quantisers, "
                             f"or {full} or more for the full rotation")
    basis = pca_basis(xc, latent)
    if n < latent:  # faiss's OPQ crashes on fewer vectors than dimensions
        return orthonormal_rows(basis)
    return orthonormal_rows(opq_rotation(xc @ basis.T, nbytes, seed) @ basis)


def _opq_projection(codec: "Codec", x: np.ndarray, labels) -> np.ndarray:
    proj = opq_projection(x - codec.mean_, codec.nbytes, codec.seed, codec.latent_dim)
    full = padded_dim(x.shape[1], codec.nbytes)
    codec.history_ = [{"chosen": f"{len(proj)}/{'opq' if len(proj) >= full else 'pca+opq'}", "fit_count": len(x)}]
    return proj


# The built-in methods. Their ids are those of the files written before the registry existed.
register_codec_method(0, "sq", _pca_projection, quantiser="scalar")
register_codec_method(1, "pq", _identity_projection)
register_codec_method(2, "opq", _opq_projection)
register_codec_method(3, "learned", "lookalike.codec_train:fit_learned_projection")
_PROJECTING = (_pca_projection, _opq_projection, "lookalike.codec_train:fit_learned_projection")


@dataclass
class Codec:
    """``fit`` on training features (optionally labelled), then ``encode`` to ``(n, nbytes)`` uint8
    and ``decode`` back to float32 features. Learned attributes end in ``_``."""

    nbytes: int = 64
    method: str = "opq"
    bits: int = 8  # sq only: 8 or 4 bits per latent dimension
    # learned: None = chosen on held-out training features; opq: None = opq_latent_dim(n, d, nbytes)
    # of the fitting set (d or more: the full rotation, as before that rule)
    latent_dim: int | None = None
    epochs: int = 30
    seed: int = 0
    # learned only: how candidates are compared. "identities": on identities held out of the fit
    # (open set: queries show identities never trained on, as in NAIC re-ID); "images": on images
    # held out of every identity (closed set: the gallery's classes are the training classes)
    selection: str = "identities"
    history_: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        spec = codec_method(self.method)
        if not 1 <= self.nbytes <= 65536:
            raise LookalikeError(f"--bytes {self.nbytes}: give a budget of 1..65536 bytes per vector")
        if self.selection not in ("identities", "images"):
            raise LookalikeError(f"unknown selection {self.selection!r}; use identities (open set) or images (closed set)")
        if spec.quantiser == "scalar" and self.bits not in (4, 8):
            raise LookalikeError(f"scalar quantisation takes 8 or 4 bits, not {self.bits}")

    # ------------------------------------------------------------------ fitting
    def fit(self, x: np.ndarray, labels=None) -> "Codec":
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or len(x) < 2:
            raise LookalikeError(f"codec: need an (n, d) feature matrix with n >= 2, got shape {x.shape}")
        self.dim_ = x.shape[1]
        self.mean_ = x.mean(axis=0).astype(np.float32)
        proj = codec_method(self.method).fit_projection(self, x, labels)
        return self.fit_quantiser(x, proj)

    def _scalar(self) -> bool:
        return codec_method(self.method).quantiser == "scalar"

    def fit_quantiser(self, x: np.ndarray, proj: np.ndarray | None, mean: np.ndarray | None = None) -> "Codec":
        """Set the projection (None: identity) and fit the quantiser on the latent of ``x``."""
        self.dim_ = x.shape[1]
        if mean is not None:
            self.mean_ = np.asarray(mean, np.float32)
        self._set_projection(proj, self.dim_)
        z = self._latent(x)
        self.scale_exp_ = int(np.ceil(np.log2(max(float(np.abs(z).max()), 1e-30)))) + 1
        if self._scalar():
            lo, hi = np.quantile(z, 0.001, axis=0), np.quantile(z, 0.999, axis=0)
            self.lo_ = _to_grid(lo, self._latent_step())
            self.step_ = _to_grid(np.maximum(hi - lo, 1e-12) / (2 ** self.bits - 1), self._latent_step() / 64)
        else:
            cents = _to_grid(_train_pq(z, self.nbytes, self.seed), self._latent_step())
            self.centroids_ = _merge_close(cents, 1e-4 * 2.0 ** self.scale_exp_)
        return self

    def _set_projection(self, proj: np.ndarray | None, d: int) -> None:
        if proj is None:  # identity, padded to a multiple of the sub-quantiser count
            self.proj_ = None
            self.latent_dim_ = padded_dim(d, self.nbytes)
        else:
            self.proj_ = _to_grid(proj, 2.0 ** -_PROJ_BITS)
            self.latent_dim_ = self.proj_.shape[0]

    def _latent_step(self) -> float:
        return 2.0 ** (self.scale_exp_ - _LATENT_BITS)

    def _latent(self, x: np.ndarray) -> np.ndarray:
        xc = np.asarray(x, np.float32) - self.mean_
        if self.proj_ is None:
            out = np.zeros((len(xc), self.latent_dim_), np.float32)
            out[:, : xc.shape[1]] = xc
            return out
        return xc @ self.proj_.T.astype(np.float32)

    # ------------------------------------------------------------------ coding
    def _check_fitted(self):
        if not hasattr(self, "mean_"):
            raise LookalikeError("codec: call fit() (or load a fitted codec) first")

    def encode(self, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """(n, d) float -> (n, nbytes) uint8."""
        self._check_fitted()
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim_:
            raise LookalikeError(f"codec fitted on dimension {self.dim_}; got features of shape {x.shape}")
        out = np.empty((len(x), self.nbytes), np.uint8)
        scalar = self._scalar()
        for s in range(0, len(x), chunk):
            z = self._latent(x[s : s + chunk]).astype(np.float64)
            if scalar:
                q = np.clip(np.round((z - self.lo_) / self.step_), 0, 2 ** self.bits - 1).astype(np.uint8)
                out[s : s + chunk] = q if self.bits == 8 else (q[:, 0::2] << 4) | q[:, 1::2]
            else:
                out[s : s + chunk] = _pq_assign(z, self.centroids_)
        return out

    def decode(self, codes: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """(n, nbytes) uint8 -> (n, d) float32; identical bits on every machine."""
        self._check_fitted()
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.nbytes or codes.dtype != np.uint8:
            raise LookalikeError(f"codec expects (n, {self.nbytes}) uint8 codes, got {codes.dtype} {codes.shape}")
        out = np.empty((len(codes), self.dim_), np.float32)
        scalar = self._scalar()
        for s in range(0, len(codes), chunk):
            c = codes[s : s + chunk]
            if scalar:
                q = c if self.bits == 8 else np.stack([c >> 4, c & 15], axis=2).reshape(len(c), -1)
                z = _to_grid(self.lo_ + q.astype(np.float64) * self.step_, self._latent_step())
            else:
                m, ksub, dsub = self.centroids_.shape
                z = self.centroids_[np.arange(m)[None, :], c.astype(np.int64)].reshape(len(c), m * dsub)
            if self.proj_ is None:
                y = z[:, : self.dim_]
            else:
                y = z @ self.proj_  # exact: every product and partial sum fits float64's 53 bits
            out[s : s + chunk] = y.astype(np.float32) + self.mean_
        return out

    # ------------------------------------------------------------------ identity and persistence
    def codec_id(self) -> bytes:
        """8 bytes that change with every learned parameter: a code file names the codec it needs."""
        self._check_fitted()
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode())
        for a in (self.mean_, self.proj_ if self.proj_ is not None else np.zeros(0),
                  getattr(self, "centroids_", np.zeros(0)), getattr(self, "lo_", np.zeros(0)),
                  getattr(self, "step_", np.zeros(0))):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.digest()[:8]

    def describe(self) -> dict:
        return {"method": self.method, "nbytes": self.nbytes, "bits": self.bits, "dim": int(self.dim_),
                "latent_dim": int(self.latent_dim_), "model_id": getattr(self, "model_id_", "")}

    def save(self, path) -> None:
        self._check_fitted()
        arrays = {"mean_": self.mean_, "scale_exp_": np.array(self.scale_exp_)}
        if self.proj_ is not None:
            arrays["proj_"] = self.proj_
        for k in ("centroids_", "lo_", "step_"):
            if hasattr(self, k):
                arrays[k] = getattr(self, k)
        meta = json.dumps({**self.describe(), "kind": "lookalike-codec", "version": _CODEC_VERSION, "seed": self.seed,
                           "history": self.history_})
        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(meta), **arrays)

    @classmethod
    def load(cls, path) -> "Codec":
        """The codec saved at ``path``. The file is data only: arrays read without pickle and a JSON
        meta whose every value is checked (types, ranges, the arrays' shapes and dtypes); its method is
        looked up by name among the registered ones, so a file never chooses code to import or run.
        Anything else is refused with a ``LookalikeError`` naming the file."""
        meta, arrays = _read_codec_file(path)
        return _codec_from_parts(cls, path, meta, arrays)


_NPY_DTYPES = {"mean_": "<f4", "proj_": "<f8", "centroids_": "<f8", "lo_": "<f8", "step_": "<f8"}


def _read_codec_file(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a codec .npz, every member's header checked before its data is read (so a
    forged shape cannot make numpy allocate more than the file holds); only LookalikeErrors escape."""
    fix = "make one with `lookalike codec fit`"
    try:
        disk = os.path.getsize(path)
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                ratio = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}.get(info.compress_type)  # deflate's limit
                if ratio is None or info.compress_size > disk or info.file_size > ratio * info.compress_size + 1024:
                    raise ValueError(f"entry {info.filename!r} has an impossible size or compression")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"entry {info.filename!r} has .npy version {version}")
                    if dtype.hasobject:
                        raise ValueError(f"entry {info.filename!r} holds Python objects")
                    if f.tell() + int(np.prod(shape, dtype=object)) * dtype.itemsize != info.file_size:
                        raise ValueError(f"entry {info.filename!r} is truncated or padded")
        with np.load(path, allow_pickle=False) as z:
            if "meta" not in z.files:
                raise KeyError("meta")
            raw = z["meta"]
            if raw.dtype.kind != "U" or raw.ndim != 0:
                raise ValueError("its meta is not a JSON string")
            meta = json.loads(str(raw))
            if not isinstance(meta, dict) or meta.get("kind") != "lookalike-codec":
                raise ValueError("its meta is not a lookalike codec's")
            arrays = {k: z[k] for k in ("mean_", "scale_exp_", "proj_", "centroids_", "lo_", "step_") if k in z.files}
    except FileNotFoundError:
        raise LookalikeError(f"{path}: codec file not found; {fix}") from None
    except IsADirectoryError:
        raise LookalikeError(f"{path}: is a folder, not a codec file; give the .npz that `lookalike codec fit` "
                             "wrote") from None
    except PermissionError as e:
        raise LookalikeError(f"{path}: cannot read the codec file ({e.strerror}); check its permissions") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError, OverflowError,
            MemoryError, RecursionError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error,
            NotImplementedError) as e:
        what = str(e) or type(e).__name__
        if isinstance(e, KeyError):
            what = f"no {e.args[0]!r} entry"
        elif isinstance(e, zipfile.BadZipFile) and "not a zip file" in what:
            what = "not an .npz archive"
        elif isinstance(e, EOFError):
            what = "it ends early"
        raise LookalikeError(f"{path}: not a lookalike codec, or a truncated or corrupt one ({what}); {fix}") from None
    return meta, arrays


def _codec_from_parts(cls, path, meta: dict, arrays: dict) -> "Codec":
    """A fitted codec from a file's checked meta and arrays (nothing is imported or called by name)."""

    def bad(what: str) -> LookalikeError:
        return LookalikeError(f"{path}: corrupt lookalike codec ({what}); fit the codec again with "
                              "`lookalike codec fit`")

    def integer(key, lo, hi, default=None):
        v = meta.get(key, default)
        if type(v) is not int or not lo <= v <= hi:
            raise bad(f"{key} {v!r} is not an integer in {lo}..{hi}")
        return v

    version = integer("version", 0, 2 ** 31, default=_CODEC_VERSION)
    if version > _CODEC_VERSION:
        raise LookalikeError(f"{path}: codec file version {version}, newer than this lookalike reads "
                             f"({_CODEC_VERSION}); use the lookalike that made it")
    method = meta.get("method")
    if not isinstance(method, str):
        raise bad(f"method {method!r} is not a name")
    if method not in METHODS:  # looked up by name only: a file never names code to import
        raise LookalikeError(f"{path}: a codec of method {method!r}, which this lookalike does not know (it "
                             f"knows {', '.join(METHODS)}); use the lookalike that made it")
    spec = codec_method(method)
    nbytes = integer("nbytes", 1, 65536)
    bits = integer("bits", 0, 255)
    if spec.quantiser == "scalar" and bits not in (4, 8):
        raise bad(f"bits {bits} for scalar quantisation, which takes 4 or 8")
    dim = integer("dim", 1, 2 ** 32 - 1)
    latent = integer("latent_dim", 1, 2 ** 32 - 1)
    seed = integer("seed", -(2 ** 63), 2 ** 64 - 1, default=0)
    history, model_id = meta.get("history", []), meta.get("model_id", "")
    if not isinstance(history, list) or not isinstance(model_id, str):
        raise bad("history is not a list or model_id not a string")

    def array(key, shape, required=True):
        if key not in arrays:
            if required:
                raise bad(f"no {key!r} array")
            return None
        a = arrays[key]
        if a.dtype.str != _NPY_DTYPES[key] or a.shape != shape:
            raise bad(f"{key} is {a.dtype.str} {a.shape}, expected {_NPY_DTYPES[key]} {shape}")
        if not np.isfinite(a).all():
            raise bad(f"{key} holds NaN or infinity")
        return a

    mean = array("mean_", (dim,))
    scale = arrays.get("scale_exp_")
    if scale is None or scale.shape != () or scale.dtype.kind not in "iu" or not -1000 <= int(scale) <= 1000:
        raise bad("scale_exp_ is not an integer in -1000..1000")
    projects = spec.projection in _PROJECTING  # a built-in that always projects (else: the identity, or a plugin's)
    if spec.projection is _identity_projection and "proj_" in arrays:
        raise bad(f"a projection for method {method}, which has none")
    proj = array("proj_", (latent, dim), required=projects)
    if proj is None and latent != padded_dim(dim, nbytes):
        raise bad(f"latent_dim {latent} for an identity projection of {dim} dimensions in {nbytes} bytes")
    obj = cls(nbytes=nbytes, method=method, bits=bits, seed=seed)
    if spec.quantiser == "scalar":
        if latent * bits != nbytes * 8:
            raise bad(f"latent_dim {latent} at {bits} bits does not fill {nbytes} bytes")
        obj.lo_, obj.step_ = array("lo_", (latent,)), array("step_", (latent,))
    else:
        if latent % nbytes:
            raise bad(f"latent_dim {latent} is not a multiple of the {nbytes} sub-quantisers")
        obj.centroids_ = array("centroids_", (nbytes, 256, latent // nbytes))
    obj.history_ = history
    obj.dim_, obj.mean_, obj.scale_exp_, obj.proj_, obj.latent_dim_ = dim, mean, int(scale), proj, latent
    obj.model_id_ = model_id
    return obj


# ---------------------------------------------------------------------- the pieces


def opq_rotation(xc: np.ndarray, m_sub: int, seed: int) -> np.ndarray:
    """faiss's OPQ rotation for ``m_sub`` sub-quantisers of the centred rows ``xc``, as orthonormal
    rows ``(d2, d)`` (``d2``: ``d`` rounded up to a multiple of ``m_sub``; trained on at most 65536
    rows drawn with ``seed``)."""
    import faiss

    d = xc.shape[1]
    d2 = padded_dim(d, m_sub)
    opq = faiss.OPQMatrix(d, m_sub, d2)
    opq.niter = 10
    opq.verbose = False
    pq = faiss.ProductQuantizer(d2, m_sub, 8)
    pq.cp.min_points_per_centroid = 1
    pq.cp.seed = seed
    opq.pq = pq  # OPQ trains this one (kept referenced until training ends)
    sample = _sample(xc, 65536, seed)
    opq.train(np.ascontiguousarray(sample, np.float32))
    A = faiss.vector_to_array(opq.A).reshape(d2, d)
    return orthonormal_rows(A)


def _sample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(x) <= n:
        return x
    return x[np.random.default_rng(seed).choice(len(x), n, replace=False)]


def _train_pq(z: np.ndarray, m: int, seed: int) -> np.ndarray:
    """(m, 256, dsub) centroids: faiss k-means on each sub-vector."""
    import faiss

    n, dz = z.shape
    if n < 256:
        raise LookalikeError(f"product quantisation trains 256 centroids per byte: give at least 256 training "
                             f"vectors (got {n})")
    pq = faiss.ProductQuantizer(dz, m, 8)
    pq.cp.seed = seed
    pq.cp.niter = 20
    pq.cp.min_points_per_centroid = 1  # small training sets are the user's choice: no warning per sub-quantiser
    pq.train(np.ascontiguousarray(_sample(z, 65536, seed), np.float32))
    return faiss.vector_to_array(pq.centroids).reshape(m, 256, dz // m).astype(np.float64)


def _merge_close(cents: np.ndarray, eps: float) -> np.ndarray:
    """Centroids closer than ``eps`` to an earlier one become exact copies of it (k-means on few
    points leaves near-duplicates), so a decoded vector always re-encodes to the same, first index."""
    cents = cents.copy()
    for j in range(len(cents)):
        c = cents[j]
        d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        close = np.tril(d2 < eps * eps, k=-1)
        for i in np.flatnonzero(close.any(1)):
            cents[j, i] = c[np.argmax(close[i])]
    return cents


def _pq_assign(z: np.ndarray, cents: np.ndarray) -> np.ndarray:
    m, ksub, dsub = cents.shape
    out = np.empty((len(z), m), np.uint8)
    for j in range(m):
        sub = z[:, j * dsub:(j + 1) * dsub]
        c = cents[j]
        d2 = (c * c).sum(1)[None, :] - 2 * sub @ c.T
        out[:, j] = np.argmin(d2, axis=1)
    return out


# ---------------------------------------------------------------------- the code file


def _names_paths(path) -> tuple[Path, Path]:
    """The names beside a code file: ``PATH.names.json`` (written now) and ``PATH.names.txt`` (one name
    a line, written by lookalike before names were JSON; still read)."""
    return Path(str(path) + ".names.json"), Path(str(path) + ".names.txt")


def write_codes(path, codes: np.ndarray, codec: Codec, names: list[str] | None = None) -> None:
    """Header (magic, version 2, method, bits, bytes per vector, count, dimension, codec id, CRC-32 of
    the header's other 34 bytes and the payload) then ``n × B`` bytes; names, when given, in
    ``PATH.names.json`` (``{"kind", "crc32": the code file's CRC, "names": [...]}``: any name round-trips,
    and names left from another code file are noticed)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    if codes.ndim != 2 or codes.shape[1] != codec.nbytes:
        raise LookalikeError(f"codec writes (n, {codec.nbytes}) codes, got shape {codes.shape}")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(codes):
            raise LookalikeError(f"{len(names)} names for {len(codes)} codes")
    payload = codes.tobytes()
    head = _HEADER.pack(_MAGIC, _VERSION, codec_method(codec.method).id, codec.bits, codec.nbytes, len(codes),
                        codec.dim_, codec.codec_id(), 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(head))
    with atomic_path(path, suffix=".codes") as tmp:
        Path(tmp).write_bytes(head + struct.pack("<I", crc) + payload)
    json_path, txt_path = _names_paths(path)
    with contextlib.suppress(FileNotFoundError):
        txt_path.unlink()  # an older sidecar of this path would describe other codes
    if names is None:
        with contextlib.suppress(FileNotFoundError):
            json_path.unlink()
    else:
        with atomic_path(json_path) as tmp:
            Path(tmp).write_text(json.dumps({"kind": _NAMES_KIND, "crc32": crc, "names": names}), encoding="utf-8")


def read_codes(path, codec: Codec | None = None) -> tuple[np.ndarray, list[str] | None]:
    """(codes, names or None) of a code file, checked: header and payload checksum (version 2; a
    version 1 file has only its payload's), sizes, and with ``codec`` every header field against it.
    Anything wrong is a ``LookalikeError`` naming the file."""
    path = Path(path)
    again = "encode the features again"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LookalikeError(f"{path}: code file not found; make it with `lookalike codec encode`") from None
    except IsADirectoryError:
        raise LookalikeError(f"{path}: is a folder but holds no NAIC .dat codes; give a code file") from None
    except OSError as e:
        raise LookalikeError(f"{path}: cannot read the code file ({e.strerror or e}); check its permissions") from None
    if data[:6] != _MAGIC:
        raise LookalikeError(f"{path}: not a lookalike code file (bad header); {again}")
    if len(data) < _HEADER.size:
        raise LookalikeError(f"{path}: truncated inside its {_HEADER.size}-byte header; {again}")
    magic, version, method, bits, nbytes, count, dim, cid, crc = _HEADER.unpack_from(data)
    if version not in _READ_VERSIONS:
        raise LookalikeError(f"{path}: code file version {version}; this lookalike reads versions "
                             f"{', '.join(map(str, _READ_VERSIONS))} (a newer lookalike wrote it, or it is corrupt)")
    payload = memoryview(data)[_HEADER.size:]
    if not 1 <= nbytes <= 65536 or len(payload) != count * nbytes:
        raise LookalikeError(f"{path}: truncated or padded: {len(payload)} payload bytes for {count} codes of "
                             f"{nbytes} bytes; {again}")
    covered = zlib.crc32(payload, zlib.crc32(data[: _HEADER.size - 4])) if version >= 2 else zlib.crc32(payload)
    if covered != crc:
        raise LookalikeError(f"{path}: checksum mismatch (the file is corrupt); {again}")
    spec = _method_by_id(method, path)
    if codec is not None:
        c_bits = codec.bits
        if (cid, nbytes, spec.name, bits, dim) != (codec.codec_id(), codec.nbytes, codec.method, c_bits, codec.dim_):
            raise LookalikeError(f"{path}: made by another codec ({spec.name}, {nbytes} bytes, {bits} bits, {dim}-d); "
                                 "decode it with the codec that encoded it")
    codes = np.frombuffer(payload, np.uint8).reshape(count, nbytes).copy()
    return codes, _read_names(path, count, crc)


def _read_names(path, count: int, crc: int) -> list[str] | None:
    json_path, txt_path = _names_paths(path)
    again = "encode the features again"
    where = json_path
    try:
        if json_path.exists():
            where = json_path
            doc = json.loads(json_path.read_text(encoding="utf-8"))
            names = doc.get("names") if isinstance(doc, dict) and doc.get("kind") == _NAMES_KIND else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise LookalikeError(f"{json_path}: not the names of a lookalike code file; {again}")
            if doc.get("crc32") != crc:
                raise LookalikeError(f"{json_path}: the names of another code file (checksums differ); {again}")
        elif txt_path.exists():  # written before version 2: one name per line, each ending in "\n"
            where = txt_path
            names = txt_path.read_text(encoding="utf-8").split("\n")
            if names[-1] == "":
                names.pop()
            names = [n[:-1] if n.endswith("\r") else n for n in names]
        else:
            return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LookalikeError(f"{where}: cannot read the names ({e}); {again}") from None
    if len(names) != count:
        raise LookalikeError(f"{where}: {len(names)} names for {count} codes; {again}")
    return names


# ---------------------------------------------------------------------- search in code space


def code_index(codec: Codec, codes: np.ndarray, nlist: int = 0, seed: int = 0):
    """A faiss index holding exactly these codes (PQ-based codecs), searched by asymmetric distance:
    a float query is projected and scored against the codes without decoding them. The score is the
    inner product with the decoded vector minus a per-query constant (so the ranking is that of
    ``q · decode(c)``; decoded vectors are not re-normalised). ``nlist > 0`` adds an inverted file
    (IVF-PQ, codes not residual, ``nprobe`` settable on the returned index)."""
    import faiss

    codec._check_fitted()
    if codec._scalar():
        pq = [m for m in METHODS if codec_method(m).quantiser == "pq"]
        raise LookalikeError(f"searching in code space needs a PQ codec ({', '.join(pq[:-1])} or {pq[-1]}); decode "
                             f"{codec.method} codes and use `lookalike index`")
    m, ksub, dsub = codec.centroids_.shape
    dz = m * dsub
    z = codec.centroids_[np.arange(m)[None, :], codes.astype(np.int64)].reshape(len(codes), dz).astype(np.float32)
    if nlist:
        quant = faiss.IndexFlatIP(dz)
        base = faiss.IndexIVFPQ(quant, dz, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        base.by_residual = False
        km = faiss.Kmeans(dz, nlist, niter=20, seed=seed, spherical=False, min_points_per_centroid=1)
        km.train(z)
        quant.add(km.centroids)
    else:
        base = faiss.IndexPQ(dz, m, 8, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(codec.centroids_.astype(np.float32).ravel(), base.pq.centroids)
    base.is_trained = True
    base.add(z)  # re-encoding the decoded latents gives back exactly these codes (stable codec)
    if codec.proj_ is None:
        A = np.zeros((dz, codec.dim_), np.float32)
        A[np.arange(codec.dim_), np.arange(codec.dim_)] = 1
    else:
        A = codec.proj_.astype(np.float32)
    lt = faiss.LinearTransform(codec.dim_, dz, False)
    faiss.copy_array_to_vector(A.ravel(), lt.A)
    lt.is_trained = True
    index = faiss.IndexPreTransform(lt, base)
    index.is_trained = True
    return index


# ---------------------------------------------------------------------- commands


def load_features(path, with_model_id: bool = False):
    """A feature store (.h5) or a folder of NAIC ``.dat`` float32 files -> (names, (n, d) float32)
    [, the store's model_id ("" for .dat folders)]."""
    from .formats import read_naic_features
    from .store import read_store

    path = Path(path)
    if path.is_dir():
        names, x = read_naic_features(path)
        return (names, x, "") if with_model_id else (names, x)
    if not path.exists():
        raise LookalikeError(f"{path}: no such feature store or .dat folder")
    st = read_store(path)
    return (st.names, st.features, st.model_id) if with_model_id else (st.names, st.features)


def load_codes(path, codec: Codec) -> tuple[list[str], np.ndarray]:
    """A code file (names from its ``.names.json`` or older ``.names.txt``, else row numbers) or a
    folder of NAIC code ``.dat`` files (names: their paths under it without ``.dat``) -> (names,
    (n, B) uint8), checked against ``codec``."""
    from .formats import read_naic_codes

    if Path(path).is_dir():
        return read_naic_codes(path, codec.nbytes)
    codes, names = read_codes(path, codec)
    return names or [str(i) for i in range(len(codes))], codes


def load_labels_for(names: list[str], path) -> np.ndarray:
    """Labels for ``names`` from a CSV ``image,label`` or a NAIC ``train_list.txt``."""
    from .formats import read_labels, read_train_list

    path = Path(path)
    table = read_train_list(path) if path.suffix == ".txt" else read_labels(path)
    stems = {Path(k).stem: v for k, v in table.items()}
    out, missing = [], []
    for n in names:
        lab = table.get(n, stems.get(Path(n).stem))
        if lab is None:
            missing.append(n)
        out.append(lab)
    if missing:
        raise LookalikeError(f"{path}: no label for {len(missing)} of {len(names)} features (e.g. {missing[0]!r}); "
                             "label every feature or drop --labels")
    return np.array(out)


def evaluate_codec(codec: Codec, feats: np.ndarray, labels=None) -> dict:
    """Reconstruction error and retrieval with reconstructed vs. original features (both normalised),
    plus encode/decode throughput."""
    import time

    from .metrics import leave_one_out, neighbour_recall
    from .numeric import l2n

    t0 = time.perf_counter()
    codes = codec.encode(feats)
    t1 = time.perf_counter()
    rec = codec.decode(codes)
    t2 = time.perf_counter()
    err = ((feats - rec) ** 2).sum(1) / np.maximum((feats ** 2).sum(1), 1e-12)
    out = {**codec.describe(), "count": len(feats), "bytes_per_vector": int(codes.shape[1]),
           "relative_squared_error": float(err.mean()), "mse": float(((feats - rec) ** 2).mean()),
           "cosine_to_original": float((l2n(feats) * l2n(rec)).sum(1).mean()),
           "encode_per_s": len(feats) / max(t1 - t0, 1e-9), "decode_per_s": len(feats) / max(t2 - t1, 1e-9)}
    if labels is not None:
        base, got = leave_one_out(l2n(feats), labels), leave_one_out(l2n(rec), labels)
        for key in ("top1", "mAP@10", "digix_score"):
            out[f"{key}_float32"], out[key] = base[key], got[key]
        out["score_ratio"] = got["digix_score"] / max(base["digix_score"], 1e-12)
    else:
        out["neighbour_recall@10"] = neighbour_recall(l2n(feats), l2n(rec))
    return out


# ---------------------------------------------------------------------- one function per `lookalike codec` verb
# (no printing: the command line prints, the Python API returns)


def fit_file(feats, output, nbytes: int, method: str = "opq", bits: int = 8, labels=None, epochs: int = 30,
             latent_dim: int | None = None, selection: str = "identities", seed: int = 0) -> Codec:
    """``lookalike codec fit``: fit a codec on the features at ``feats`` (a store .h5 or a folder of
    NAIC .dat files; ``labels``: a CSV ``image,label`` or a NAIC ``train_list.txt``) and save it to
    ``output`` (.npz). Returns the fitted codec; its ``fit_count_`` is the number of training
    vectors (for the report; not saved in the file)."""
    names, x, model_id = load_features(feats, with_model_id=True)
    y = load_labels_for(names, labels) if labels else None
    c = Codec(nbytes=nbytes, method=method, bits=int(bits), latent_dim=latent_dim, epochs=epochs, seed=seed,
              selection=selection).fit(x, y)
    c.model_id_ = model_id
    c.save(output)
    c.fit_count_ = len(x)
    return c


def encode_file(feats, codec_path, output=None, naic_dir=None) -> int:
    """``lookalike codec encode``: encode the features at ``feats`` with the codec at ``codec_path``
    to a code file ``output`` and/or one ``NAME.dat`` of exactly B bytes per vector in ``naic_dir``.
    Returns the number of vectors encoded."""
    from .formats import write_naic_codes

    if not output and not naic_dir:
        raise LookalikeError("give -o CODES and/or --naic-dir DIR")
    c = Codec.load(codec_path)
    names, x = load_features(feats)
    codes = c.encode(x)
    if naic_dir:  # first: it checks every name is a file inside naic_dir before writing anything
        write_naic_codes(naic_dir, names, codes)
    if output:
        write_codes(output, codes, c, names)
    return len(codes)


def decode_file(codes, codec_path, output, naic_dir=None) -> int:
    """``lookalike codec decode``: reconstruct the features of a code file (or a folder of NAIC code
    .dat files) into the feature store ``output`` (.h5) and, with ``naic_dir``, NAIC float32 .dat
    files. Returns the number of vectors decoded."""
    from .formats import write_naic_features
    from .store import write_store

    c = Codec.load(codec_path)
    names, arr = load_codes(codes, c)
    feats = c.decode(arr)
    if naic_dir:  # first: it checks every name is a file inside naic_dir before writing anything
        write_naic_features(naic_dir, names, feats)
    write_store(output, names, feats, {"model": f"decoded:{c.method}", "codec": c.describe(), "model_id": "decoded",
                                       "fingerprint": "decoded", "created_by": f"lookalike {__version__}"})
    return len(arr)


def index_codes(codes, codec_path, output, nlist: int = 0):
    """``lookalike codec index``: a collection folder ``output`` searching the codes themselves
    (:func:`code_index`; ``nlist > 0``: IVF-PQ) for ``lookalike search --query-features``. Returns
    the saved collection."""
    from .collection import Collection, new_manifest

    c = Codec.load(codec_path)
    names, arr = load_codes(codes, c)
    index = code_index(c, arr, nlist)
    factory = f"codec:{c.method}{c.nbytes}" + (f",IVF{nlist}" if nlist else "")
    manifest = new_manifest(attrs={"model_id": c.describe()["model_id"], "model": f"codes:{c.method}"},
                            dim=c.dim_, input_dim=c.dim_, count=len(arr), factory=factory, codec=c.describe())
    col = Collection(index, list(names), manifest)
    col.save(output)
    return col


def evaluate_file(feats, codec_path, labels=None, json_out=None) -> dict:
    """``lookalike codec evaluate``: :func:`evaluate_codec` of the codec at ``codec_path`` on the
    features at ``feats`` (retrieval metrics with ``labels``), also written to ``json_out`` when
    given. Returns the metrics (with the codec's ``method`` and ``nbytes``)."""
    c = Codec.load(codec_path)
    names, x = load_features(feats)
    m = evaluate_codec(c, x, load_labels_for(names, labels) if labels else None)
    if json_out:
        write_json_atomic(json_out, m)
    return m
