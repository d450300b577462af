"""Batched feature extraction: decode in worker threads, run the network, write a resumable store.

Fast path: the embedding network exported once to ONNX (cached under ``~/.cache/lookalike``, keyed by
a fingerprint of the weights and the graph) and run with onnxruntime; PyTorch is the fallback and
the CUDA path (channels_last + fp16 autocast). Photos are grouped by aspect-ratio bucket so each
batch has one shape. Progress is saved every chunk in ``<store>.parts/`` (each part written with
an atomic rename), so an interrupted run — Ctrl-C or ``kill -9`` — resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ._version import __version__
from ._io import atomic_path, write_text_atomic
from .catalog import BUILTIN_POOLINGS, is_lite, names_code, refuse_code, is_trained_model, lite_weights_file, trained_weights_file, weights_digest
from .data import RESAMPLER, BadImage, ImageEntry, Preprocess, file_signature, list_images, load_array
from .errors import LookalikeError, comma_choices
from .numeric import l2n
from .onnx_models import ort_session
from .paths import cache_dir
from .formats import write_skipped_csv
from .store import read_attrs, read_store, write_store

log = logging.getLogger(__name__)

FEATURE_VERSION = 1  # bump when the meaning of features changes for the same settings
TTA_CHOICES = ("flip", "multiscale")
ENGINES = ("auto", "onnx", "torch", "openvino")
MULTISCALES = (1.0, 1 / math.sqrt(2), math.sqrt(2))


DEFAULT_MODEL = ("lite0", "sscd")  # equal weights; BENCHMARKS.md "Backbones and ensembles"
NATIVE_INPUT = (224, "bucket")  # torch backbones and trained runs: size, resize


def _per_member(value, n: int, what: str, cast):
    """A scalar, a comma string or a sequence -> one value per member (None stays None)."""
    if value is None or value == "" or value == ():
        return [None] * n
    if isinstance(value, str) and "," in value:
        value = [v.strip() for v in value.split(",")]
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
            if value is None or value == "":
                return [None] * n
        elif len(value) != n:
            raise LookalikeError(f"{len(value)} values of {what} for {n} models; give one, or one per --model")
        else:
            try:
                return [None if v in (None, "") else cast(v) for v in value]
            except ValueError:
                raise LookalikeError(f"{what} {value!r}: not a list of {cast.__name__}") from None
    try:
        return [cast(value)] * n
    except ValueError:
        raise LookalikeError(f"{what} {value!r}: not a {cast.__name__}") from None


@dataclass
class ExtractConfig:
    """Everything that decides what features an image gets (plus speed knobs that do not)."""

    model: str | tuple[str, ...] = DEFAULT_MODEL  # several: an ensemble (features concatenated)
    weights: str | None = None
    ensemble_weights: tuple[float, ...] = ()  # one per ensemble member (default: equal)
    max_model_mb: float = 500.0  # cap on the total size of the model files (the DIGIX rule)
    pooling: str = "spoc"  # best zero-shot on grocery (BENCHMARKS.md); gem for fine-tuned models
    gem_p: float = 3.0
    image_size: int | tuple[int, ...] | None = None  # None: each model's own (224; sscd 288; onnx: its JSON)
    resize: str | tuple[str, ...] | None = None  # None: each model's own (bucket; onnx: its JSON)
    tta: tuple[str, ...] = ()
    reduced_decode: bool = True
    precision: str = "fp32"  # fp32 | bf16 (openvino/torch on CPUs with bf16 units; changes features slightly)
    # speed only
    engine: str = "auto"  # auto | onnx | torch | openvino
    batch_size: int = 32
    workers: int = 0  # decode threads; 0 = number of cores
    threads: int = 0  # inference threads; 0 = number of cores
    chunk_size: int = 256
    dtype: str = "float32"
    executor: str = "local"  # local | ray (`--engine ray`): where the chunks run
    ray_address: str | None = None  # a Ray cluster (default: a local one)
    ray_actors: int = 0  # model replicas (0: one per GPU, else cores / threads)
    # a trained run's lookalike_model.json (or saved settings) may name package.module:factory code
    trust_remote_code: bool = False

    def __post_init__(self):
        self.tta = comma_choices(self.tta, TTA_CHOICES, "TTA")
        if not isinstance(self.model, str):
            models = tuple(str(m) for m in self.model)
            if not models:
                raise LookalikeError("no model given")
            self.model = models[0] if len(models) == 1 else models
        # onnx:PATH is kept absolute: configs saved with an index must work from any folder
        absolute = lambda m: f"onnx:{Path(m[5:]).expanduser().resolve()}" if m.startswith("onnx:") else m  # noqa: E731
        self.model = absolute(self.model) if isinstance(self.model, str) else tuple(absolute(m) for m in self.model)
        n = len(self.model) if isinstance(self.model, tuple) else 1
        self.ensemble_weights = tuple(float(w) for w in self.ensemble_weights or ())
        if self.ensemble_weights and len(self.ensemble_weights) != n:
            raise LookalikeError(f"{len(self.ensemble_weights)} ensemble weights for {n} models; "
                                 "give one weight per --model")
        if any(w < 0 for w in self.ensemble_weights) or self.ensemble_weights and not any(self.ensemble_weights):
            raise LookalikeError(f"ensemble weights {list(self.ensemble_weights)}: give weights >= 0, not all 0")
        sizes = _per_member(self.image_size, n, "--image-size", int)
        resizes = _per_member(self.resize, n, "--resize", str)
        self.image_size = (sizes[0] if n == 1 else tuple(sizes)) if any(v is not None for v in sizes) else None
        self.resize = (resizes[0] if n == 1 else tuple(resizes)) if any(v is not None for v in resizes) else None
        if isinstance(self.model, tuple) and self.weights:
            raise LookalikeError("--weights applies to one backbone; for an ensemble, train or register each member")
        if self.engine == "ray":  # `--engine ray`: Ray runs the chunks, the runner is chosen as usual
            self.executor, self.engine = "ray", "auto"
        if self.executor not in ("local", "ray"):
            raise LookalikeError(f"unknown executor {self.executor!r}; use local or ray")
        if self.engine not in ENGINES:
            raise LookalikeError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.precision not in ("fp32", "bf16"):
            raise LookalikeError(f"unknown precision {self.precision!r}; use fp32 or bf16")
        if self.precision == "bf16" and self.engine in ("auto", "onnx"):
            self.engine = "openvino"  # onnxruntime has no bf16 CPU kernels
        if self.dtype not in ("float32", "float16"):
            raise LookalikeError(f"unknown dtype {self.dtype!r}; use float32 or float16")
        for sz, rs in zip(sizes, resizes):
            Preprocess(size=sz or 224, mode=rs or "bucket")  # validates size and mode
        if self.pooling not in BUILTIN_POOLINGS:  # a registered one: the registry lives with the torch code
            from .models import get_pooling

            get_pooling(self.pooling)

    # --- what kind of model
    @property
    def is_ensemble(self) -> bool:
        return isinstance(self.model, tuple)

    @property
    def kind(self) -> str:
        """``embedding`` (sscd, onnx:PATH: used as they are), ``trained`` (a run folder) or ``backbone``."""
        from .onnx_models import is_embedding_model

        if self.is_ensemble:
            return "ensemble"
        if is_embedding_model(self.model):
            return "embedding"
        return "trained" if is_trained_model(self.model) else "backbone"

    def _native(self) -> tuple[int, str]:
        if self.kind == "embedding":
            from .onnx_models import native_input

            return native_input(self.model)
        return NATIVE_INPUT

    @property
    def preprocess(self) -> Preprocess:
        if self.is_ensemble:
            raise LookalikeError("an ensemble has one preprocessing per member; use members()")
        size, mode = self.image_size, self.resize
        if size is None or mode is None:
            nsize, nmode = self._native()
            size, mode = size or nsize, mode or nmode
        return Preprocess(size=size, mode=mode)

    @property
    def scales(self) -> tuple[float, ...]:
        return MULTISCALES if "multiscale" in self.tta else (1.0,)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tta"] = list(self.tta)
        d["ensemble_weights"] = list(self.ensemble_weights)
        for key in ("model", "image_size", "resize"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    def portable_dict(self) -> dict:
        """:meth:`to_dict` without where it ran (saved in stores: queries are embedded locally)."""
        d = self.to_dict()
        d.update(executor="local", ray_address=None, ray_actors=0, trust_remote_code=False)
        return d

    # --- ensembles
    def members(self) -> list["ExtractConfig"]:
        """One config per ensemble member (just ``[self]`` for a single model), each with its own
        input size and resize (given per member, or the model's own)."""
        if not self.is_ensemble:
            return [self]
        n = len(self.model)
        sizes = _per_member(self.image_size, n, "--image-size", int)
        resizes = _per_member(self.resize, n, "--resize", str)
        return [replace(self, model=m, ensemble_weights=(), image_size=s, resize=r)
                for m, s, r in zip(self.model, sizes, resizes)]

    @property
    def member_weights(self) -> tuple[float, ...]:
        return self.ensemble_weights or (1.0,) * len(self.members())

    @property
    def model_name(self) -> str:
        return self.model if isinstance(self.model, str) else "+".join(self.model)

    def check_model_size(self) -> float:
        """Total MB of the members' weight files; over ``max_model_mb`` is an error."""
        sizes = []
        for m in self.members():
            f = m.weights_file()
            sizes.append(os.path.getsize(f) / 1e6 if f and os.path.exists(f) else 0.0)
        total = sum(sizes)
        if self.max_model_mb and total > self.max_model_mb:
            each = ", ".join(f"{m.model} {s:.0f} MB" for m, s in zip(self.members(), sizes))
            raise LookalikeError(f"the models take {total:.0f} MB ({each}), over the {self.max_model_mb:g} MB cap; "
                                 "drop a member, export in fp16, or raise --max-model-mb")
        return total

    @classmethod
    def from_dict(cls, d: dict, trusted: bool = False, source: str = "saved settings") -> "ExtractConfig":
        """Settings read back from a file. Unless ``trusted`` (the user said so), they may not name
        code to import (``package.module:factory``) and cannot grant ``trust_remote_code``."""
        if not isinstance(d, dict):
            raise LookalikeError(f"{source}: extraction settings are not a JSON object; rebuild the index")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if not trusted:
            known.pop("trust_remote_code", None)
            models = known.get("model", "lite0")
            if not (isinstance(models, str) or (isinstance(models, list) and models
                                                and all(isinstance(m, str) for m in models))):
                raise LookalikeError(f"{source}: damaged extraction settings (model {models!r}); rebuild the index")
            for m in ([models] if isinstance(models, str) else models):
                if names_code(m):
                    refuse_code(m, source)
        try:
            return cls(**known)
        except TypeError as e:
            raise LookalikeError(f"{source}: extraction settings are damaged ({e}); rebuild the index") from None

    # --- identities
    def weights_file(self) -> str | None:
        if self.weights:
            return self.weights
        if self.kind == "embedding":
            from .onnx_models import resolve

            return str(resolve(self.model).path)
        if is_trained_model(self.model):
            return trained_weights_file(self.model)
        if is_lite(self.model):
            return lite_weights_file(self.model)
        return None

    def model_id(self) -> str:
        """Identity of the embedding space: backbone, weights and pooling (of every ensemble member)."""
        if self.is_ensemble:
            # v2: members are normalised after their own TTA views are averaged (mixed ensembles)
            key = dict(ensemble=[m.model_id() for m in self.members()], weights=list(self.member_weights), ens_v=2)
            return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        kind = self.kind
        if kind == "embedding":
            from .onnx_models import resolve

            rm = resolve(self.model)
            key = dict(model="embedding", weights=weights_digest(str(rm.path)), spec=rm.spec.to_dict(),
                       runtime=rm.runtime, v=FEATURE_VERSION)
            return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        trained = kind == "trained"
        key = dict(model="trained" if trained else self.model, weights=weights_digest(self.weights_file()),
                   pooling="head" if trained else self.pooling,
                   gem_p=self.gem_p if self.pooling == "gem" else None, v=FEATURE_VERSION)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def fingerprint(self) -> str:
        """Identity of the exact features: model_id plus preprocessing and TTA."""
        if self.is_ensemble:
            key = dict(members=[m.fingerprint() for m in self.members()], weights=list(self.member_weights), ens_v=2)
        else:
            key = dict(model_id=self.model_id(), pre=self.preprocess.to_dict(), tta=sorted(self.tta),
                       reduced_decode=self.reduced_decode, resampler=RESAMPLER)
            if self.precision != "fp32":
                key["precision"] = self.precision
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class TorchRunner:
    """Eager PyTorch: CUDA with fp16 autocast when present, channels_last everywhere."""

    def __init__(self, embedder, threads: int = 0, device: str | None = None, precision: str = "fp32"):
        import torch

        self.torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = embedder.to(self.device).eval().to(memory_format=torch.channels_last)
        cuda = self.device.type == "cuda"
        self.amp_dtype = torch.float16 if cuda else torch.bfloat16
        self.amp = cuda or precision == "bf16"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return self.model(x).float().cpu().numpy()


class OnnxRunner:
    """onnxruntime on the exported graph (uint8 NHWC in, pooled descriptors out)."""

    def __init__(self, onnx_path: Path, threads: int = 0):
        self.session = ort_session(onnx_path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})[0]


class TorchScriptRunner:
    """A TorchScript embedding model (the downloaded SSCD fallback): CUDA when present."""

    def __init__(self, model, threads: int = 0):
        import torch

        self.torch, self.spec = torch, model.spec
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = torch.jit.load(str(model.path), map_location=self.device).eval()
        except Exception as e:  # RuntimeError from a bad archive
            raise LookalikeError(f"{model.path}: not a TorchScript model ({type(e).__name__}); delete it to fetch it again") from None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(self.spec.convert(batch)).to(self.device)
        with torch.inference_mode():
            return self.model(x).float().cpu().numpy()


class OpenVinoRunner:
    """OpenVINO on the same ONNX graph (optional extra); with bf16 about 2x onnxruntime on CPUs
    with AVX512-BF16/AMX, at a cosine of about 0.995 to the fp32 features."""

    def __init__(self, onnx_path: Path, threads: int = 0, precision: str = "fp32"):
        try:
            import openvino as ov
        except ImportError:
            raise LookalikeError("the openvino engine needs OpenVINO: pip install 'lookalike[openvino]'") from None
        cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        self.request = core.compile_model(core.read_model(str(onnx_path)), "CPU", cfg).create_infer_request()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: np.ascontiguousarray(batch)})[0], dtype=np.float32)


@dataclass
class ExtractResult:
    output: Path | None
    names: list[str]
    n_extracted: int
    n_reused: int
    skipped: list[tuple[str, str]]
    seconds: float
    fingerprint: str
    features: np.ndarray | None = field(default=None, repr=False)
    signatures: list[str] | None = field(default=None, repr=False)  # per name: its file's size:mtime
    n_changed: int = 0  # cached rows whose file changed since (extracted again)

    @property
    def rate(self) -> float:
        return self.n_extracted / self.seconds if self.seconds > 0 else 0.0

    def summary(self, label: str = "images") -> str:
        s = f"{label}: {len(self.names)} done, {len(self.skipped)} skipped"
        if self.n_reused:
            s += f", {self.n_reused} reused from cache"
        if self.n_changed:
            s += f", {self.n_changed} changed since cached"
        return s + f", {self.n_extracted} extracted in {self.seconds:.1f} s ({self.rate:.1f} images/s)"


class Extractor:
    """Turns photos into L2-normalised float32 rows; the network is built on first use.

    An ensemble runs each member with its own input size, preprocessing and runner (torch
    backbones, ONNX embedding models, trained runs) on one decode of each photo; the member rows,
    each L2-normalised, are scaled by their weights and concatenated.
    """

    def __init__(self, config: ExtractConfig | None = None, member_dims: list[int] | None = None, **overrides):
        """``member_dims``: the members' output dimensions when already known (saves running each
        model once on a dummy image to learn them)."""
        self.config = replace(config or ExtractConfig(), **overrides)
        self._runner = None
        self.engine = None
        self._members = [Extractor(m) for m in self.config.members()] if self.config.is_ensemble else None
        self._plan_key = self._plan_value = None
        self._dims: list[int] | None = list(member_dims) if member_dims else None

    # --- network
    def build_embedder(self):
        """The torch module (uint8 NHWC in): for Grad-CAM and the torch runner."""
        from .models import Embedder, EnsembleEmbedder, create_backbone, load_trained

        c = self.config
        if c.is_ensemble:
            if any(m.config.kind in ("embedding", "ensemble") for m in self._members) or \
                    len({m.config.preprocess for m in self._members}) > 1:
                raise LookalikeError(f"{c.model_name}: members differ in kind or input; one torch module needs "
                                     "torch members with the same --image-size and --resize")
            return EnsembleEmbedder([m.build_embedder() for m in self._members], c.member_weights).eval()
        if c.kind == "embedding":
            raise LookalikeError(f"{c.model}: an ONNX embedding model has no torch module; use a torch backbone")
        if is_trained_model(c.model):
            return load_trained(c.model, trust_remote_code=c.trust_remote_code)
        bb = create_backbone(c.model, c.weights)
        return Embedder(bb.module, c.pooling, c.gem_p).eval()

    @property
    def runner(self):
        if self._runner is None:
            c = self.config
            c.check_model_size()
            if c.is_ensemble:
                self._runner = [m.runner for m in self._members]
                self.engine = "+".join(m.engine for m in self._members)
                return self._runner
            engine = c.engine
            if c.kind == "embedding":
                from .onnx_models import OnnxEmbedRunner, resolve

                rm = resolve(c.model)
                if rm.runtime == "torchscript":
                    self._runner, engine = TorchScriptRunner(rm, c.threads), "torch"
                elif engine == "openvino":
                    ov = OpenVinoRunner(rm.path, c.threads, c.precision)
                    self._runner = lambda batch, ov=ov, spec=rm.spec: ov(spec.convert(batch))
                else:  # onnxruntime (CUDA provider when installed); there is no torch module to run
                    self._runner, engine = OnnxEmbedRunner(rm, c.threads), "onnx"
                    fixed, pre = self._runner.fixed, c.preprocess
                    if fixed and ((pre.size, pre.size) != tuple(fixed) or pre.mode == "bucket"):
                        raise LookalikeError(f"{rm.path}: the graph takes only {fixed[0]}x{fixed[1]} images; drop "
                                             f"--image-size/--resize for it (or give {fixed[0]} with letterbox or crop)")
                self.engine = engine
                return self._runner
            if engine == "auto":
                engine = "torch" if _cuda_available() else "onnx"
            if engine in ("onnx", "openvino"):
                path = cache_dir() / "onnx" / f"{c.model_id()}-opset17.onnx"
                if not path.exists():
                    log.info("exporting %s to ONNX (once): %s", c.model_name, path)
                    from .models import export_onnx

                    export_onnx(self.build_embedder(), path)
                if engine == "onnx":
                    self._runner = OnnxRunner(path, c.threads)
                else:
                    self._runner = OpenVinoRunner(path, c.threads, c.precision)
            else:
                self._runner = TorchRunner(self.build_embedder(), c.threads, precision=c.precision)
            self.engine = engine
        return self._runner

    # --- images to arrays
    def decode_side(self) -> int:
        """The smallest side a reduced-size JPEG decode must keep for every member and scale."""
        if self._members:
            return max(m.decode_side() for m in self._members)
        return self.config.preprocess.decode_side(self.config.scales)

    def _plan(self):
        """(preprocess, scales, decode side or None): worked out once per settings, since prepare runs
        per photo and this costs tens of microseconds; keyed on the settings, so never stale."""
        c = self.config
        key = (c.model, c.image_size, c.resize, tuple(c.tta), c.reduced_decode)
        if self._plan_key != key:
            pre, scales = (None, None) if self._members else (c.preprocess, c.scales)
            self._plan_key, self._plan_value = key, (pre, scales, self.decode_side() if c.reduced_decode else None)
        return self._plan_value

    def prepare(self, img):
        """A decoded RGB image (PIL, or a uint8 array) -> one uint8 array per scale (per member, for an ensemble)."""
        if self._members:
            return tuple(m.prepare(img) for m in self._members)
        pre, scales, _ = self._plan()
        return [pre(img, s) for s in scales]

    def prepare_file(self, path):
        return self.prepare(load_array(path, min_side=self._plan()[2]))

    def member_dims(self) -> list[int]:
        """Output dimension of each member (one dummy image through each, once)."""
        if self._dims is None:
            from PIL import Image

            dummy = Image.new("RGB", (64, 64), (127, 127, 127))
            members = self._members or [self]
            self._dims = [int(m.embed_prepared([m.prepare(dummy)]).shape[1]) for m in members]
        return self._dims

    def embed_prepared(self, prepared: list) -> np.ndarray:
        """Arrays from :meth:`prepare` -> (n, d) float32 L2-normalised (TTA views averaged)."""
        c = self.config
        if self._members:
            if not prepared:
                return np.zeros((0, 0), np.float32)
            parts = []
            for i, (m, w) in enumerate(zip(self._members, c.member_weights)):
                if w == 0:  # a member weighted 0 contributes zeros; no need to run it
                    parts.append(np.zeros((len(prepared), self.member_dims()[i]), np.float32))
                else:
                    parts.append(m.embed_prepared([p[i] for p in prepared]) * np.float32(w))
            self._dims = [p.shape[1] for p in parts]
            return l2n(np.concatenate(parts, axis=1)).astype(np.float32)
        acc = None
        for si in range(len(c.scales)):
            groups = defaultdict(list)
            for i, arrs in enumerate(prepared):
                groups[arrs[si].shape].append(i)
            for idx in groups.values():
                for b in range(0, len(idx), c.batch_size):
                    ii = idx[b : b + c.batch_size]
                    batch = np.stack([prepared[i][si] for i in ii])
                    views = [batch, batch[:, :, ::-1]] if "flip" in c.tta else [batch]
                    for v in views:
                        d = l2n(np.asarray(self.runner(v), dtype=np.float32))
                        if acc is None:
                            acc = np.zeros((len(prepared), d.shape[1]), np.float32)
                        acc[ii] += d
        if acc is None:
            return np.zeros((0, 0), np.float32)
        return l2n(acc).astype(np.float32)

    def embed_images(self, images) -> np.ndarray:
        """PIL images (any mode) -> (n, d) features."""
        from .data import to_rgb

        return self.embed_prepared([self.prepare(to_rgb(im)) for im in images])

    # --- files to a store
    def prepare_or_reason(self, entry: ImageEntry):
        try:
            return self.prepare_file(entry.path)
        except BadImage as e:
            return str(e)
        except MemoryError:
            return "out of memory while decoding"

    def _local_chunks(self, chunks):
        """Decode in threads (one chunk ahead) and embed here; yields (chunk, names, features, skipped)."""
        if not chunks:
            return
        self.runner  # build before the decode threads start
        ex = ThreadPoolExecutor(max_workers=self.config.workers or os.cpu_count() or 1)
        try:
            pending = [ex.submit(self.prepare_or_reason, e) for e in chunks[0]]
            for ci, chunk in enumerate(chunks):
                futs = pending
                pending = [ex.submit(self.prepare_or_reason, e) for e in chunks[ci + 1]] if ci + 1 < len(chunks) else []
                good, good_names, bad = [], [], []
                for e, f in zip(chunk, futs):
                    r = f.result()
                    if isinstance(r, str):
                        bad.append((e.name, r))
                    else:
                        good.append(r)
                        good_names.append(e.name)
                yield chunk, good_names, (self.embed_prepared(good) if good else None), bad
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    def extract(self, images, output=None, progress: bool = True, label: str | None = None) -> ExtractResult:
        """Extract features of every image under ``images`` into the store ``output``.

        Already-extracted images (same fingerprint) are reused; unreadable ones are skipped and
        listed. Without ``output`` the features are only returned (``result.features``).
        """
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        c = self.config
        unlisted: list[tuple[str, str]] = []
        entries = list_images(images, unreadable=unlisted)
        signature = {e.name: file_signature(e.path) for e in entries}  # a cached row is reused only if unchanged
        fp = c.fingerprint()
        output = Path(output) if output else None
        have: dict[str, tuple[object, int, str | None]] = {}  # name -> (array, row, file signature then)
        prior_names: list[str] = []
        prior_skipped: list[tuple[str, str]] = []
        if output is not None and output.exists():
            attrs = read_attrs(output)
            if attrs.get("fingerprint") != fp:
                raise LookalikeError(
                    f"{output}: holds features made with other settings ({attrs.get('model')}, "
                    f"{attrs.get('pooling')}, fingerprint {attrs.get('fingerprint')}); delete it or use another -o"
                )
            store = read_store(output, dtype=np.float32)
            prior_names, prior_skipped = store.names, store.skipped
            sigs = store.signatures or [None] * len(store.names)  # stores without them: every row counts as changed
            for i, n in enumerate(store.names):
                have[n] = (store.features, i, sigs[i])
        parts_dir = output.with_name(output.name + ".parts") if output else None
        next_part = 0
        if parts_dir is not None and parts_dir.exists():
            next_part = self._load_parts(parts_dir, fp, have)
        stale = [e.name for e in entries if e.name in have and (not signature[e.name] or have[e.name][2] != signature[e.name])]
        for n in stale:
            del have[n]
        if stale:
            log.info("%d cached images changed since they were embedded; extracting them again", len(stale))
        n_reused = sum(1 for e in entries if e.name in have)
        todo = [e for e in entries if e.name not in have]
        skipped: list[tuple[str, str]] = []
        if parts_dir is not None and todo:
            parts_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(parts_dir / "meta.json", json.dumps({"fingerprint": fp}))
        n_new = 0
        bar = tqdm(total=len(todo), unit="img", desc=f"extract {label or Path(images).name}",
                   disable=not progress or not todo, dynamic_ncols=True, leave=False)
        # a short first chunk: the network starts after 2 batches are decoded, not a whole chunk
        first = min(c.chunk_size, 2 * c.batch_size)
        chunks = [todo[:first]] + [todo[i : i + c.chunk_size] for i in range(first, len(todo), c.chunk_size)]
        chunks = [ch for ch in chunks if ch]
        if c.executor == "ray":
            from .ray_engine import ray_chunks

            done = ray_chunks(self, chunks)  # the same chunks on Ray Data actors, in the same order
        else:
            done = self._local_chunks(chunks)
        try:
            for chunk, good_names, feats, bad in done:
                for name, reason in bad:
                    skipped.append((name, reason))
                    log.warning("skipped %s: %s", name, reason)
                if good_names:
                    for i, n in enumerate(good_names):
                        have[n] = (feats, i, signature[n])
                    if parts_dir is not None:
                        self._write_part(parts_dir / f"part-{next_part:06d}.npz", good_names, feats,
                                         [signature[n] for n in good_names])
                        next_part += 1
                n_new += len(good_names)
                bar.update(len(chunk))
        finally:
            done.close()
            bar.close()
        skipped = unlisted + skipped
        names = [e.name for e in entries if e.name in have]
        result = ExtractResult(output, names, n_new, n_reused, skipped, 0.0, fp, n_changed=len(stale))
        dim = next((arr.shape[1] for arr, _, _ in have.values()), 0)
        skipped_csv = output.with_name(output.stem + ".skipped.csv") if output is not None else None
        if not names:
            if skipped_csv is not None:
                write_skipped_csv(skipped_csv, skipped)
            first = f" (e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise LookalikeError(f"{images}: none of the {len(entries)} images could be read{first}"
                                 + (f"; every reason is in {skipped_csv}" if skipped_csv else ""))
        features = np.empty((len(names), dim), np.float32)
        for i, n in enumerate(names):
            arr, row, _ = have[n]
            features[i] = arr[row]
        result.signatures = [signature[n] for n in names]
        if c.dtype == "float16":  # what the store holds, so a run in memory equals one read back from disk
            features = features.astype(np.float16).astype(np.float32)
        result.features = features
        if not self._members:
            self._dims = [dim]
        if output is not None:
            changed = (n_new > 0 or names != prior_names or next_part > 0 or sorted(prior_skipped) != sorted(skipped)
                       or stale)
            if changed or not output.exists():
                write_store(output, names, features, self.store_attrs(), skipped, dtype=c.dtype,
                            signatures=result.signatures)
            if parts_dir is not None and parts_dir.exists():
                shutil.rmtree(parts_dir, ignore_errors=True)
            write_skipped_csv(skipped_csv, skipped)
        result.seconds = time.perf_counter() - t0
        return result

    def store_attrs(self) -> dict:
        c = self.config
        members = self._members or [self]
        pre = [m.config.preprocess.to_dict() for m in members]
        info = [dict(model=m.config.model, kind=m.config.kind, dim=d, weight=w, preprocess=p)
                for m, d, w, p in zip(members, self.member_dims(), c.member_weights, pre)]
        return dict(fingerprint=c.fingerprint(), model_id=c.model_id(), model=c.model_name, pooling=c.pooling,
                    preprocess=json.dumps(pre[0] if len(pre) == 1 else pre), config=json.dumps(c.portable_dict()),
                    members=json.dumps(info), created_by=f"lookalike {__version__}")

    @staticmethod
    def _write_part(path: Path, names: list[str], feats: np.ndarray, signatures: list[str]) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, names=np.array(names, dtype=str), features=feats, signatures=np.array(signatures, dtype=str))

    @staticmethod
    def _load_parts(parts_dir: Path, fp: str, have: dict) -> int:
        try:
            meta = json.loads((parts_dir / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("fingerprint") != fp:
            log.warning("%s: left by a run with other settings; starting afresh", parts_dir)
            shutil.rmtree(parts_dir, ignore_errors=True)
            return 0
        last = -1
        for p in sorted(parts_dir.glob("part-*.npz")):
            try:
                with np.load(p, allow_pickle=False) as z:
                    names, feats = list(z["names"]), z["features"]
                    sigs = [str(s) for s in z["signatures"]] if "signatures" in z.files else [None] * len(names)
            except Exception as e:  # a part is only ever renamed in whole; be safe anyway
                log.warning("ignoring unreadable %s (%s)", p, e)
                continue
            for i, n in enumerate(names):
                have[str(n)] = (feats, i, sigs[i] if i < len(sigs) else None)
            last = max(last, int(p.stem.split("-")[1]))
        return last + 1


def extract(images, output=None, config: ExtractConfig | None = None, progress: bool = False, **overrides) -> ExtractResult:
    """Python API for ``lookalike extract``."""
    return Extractor(config, **overrides).extract(images, output, progress=progress)
