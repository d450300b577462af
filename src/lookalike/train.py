"""Fine-tuning an embedding: backbone + CGD head with a margin-softmax (or pair) loss.

The losses are pytorch-metric-learning's (CosFace, ArcFace, SphereFace, multi-similarity); model
selection uses the *retrieval* score of a class-disjoint validation split (leave-one-out DIGIX score
among the validation images). Every epoch a checkpoint is written atomically; ``resume=True``
continues after an interruption. The exported model (fp16 state dict + ``lookalike_model.json``)
is what ``lookalike extract --model RUN_DIR`` loads.

Batches are drawn by :class:`BatchSampler` (shuffled, or P classes x K images for pair losses) from a
seed and the epoch number, so a resumed run sees the same batches and every ``torchrun`` process takes
its share of the same global batch (DDP; NCCL on GPUs, gloo on CPUs). The learning rate follows a
warm-up + cosine curve over the planned steps or, with a time limit, over the time budget, whichever
ends first.

Augmentation is done with Pillow (random resized crop, flip, rotation, colour jitter, affine shear,
random erasing) to avoid a second image stack; see the notes of the training issue.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from PIL import Image, ImageEnhance

from ._io import atomic_path, write_json_atomic
from .data import BadImage, list_images, load_image
from .errors import LookalikeError
from .metrics import leave_one_out
from .catalog import write_model_meta
from .models import CGDHead, Embedder, create_backbone, network_input

log = logging.getLogger(__name__)
LOSSES = ("cosface", "arcface", "sphereface", "multisimilarity")


@dataclass
class TrainConfig:
    data: str
    output: str
    model: str = "lite0"
    weights: str | None = None
    descriptors: str = "SMG"
    dim: int = 1536  # total; split evenly between the descriptors (512 each for SMG)
    gem_p: float = 3.0
    loss: str = "cosface"
    margin: float | None = None  # loss default when None
    scale: float | None = None
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # head and loss; the backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    accumulate: int = 1
    val_fraction: float = 0.25
    seed: int = 0
    fraction: float = 1.0
    augment: bool = True
    patience: int = 3
    max_steps: int = 0  # stop after this many optimiser steps per epoch (0 = all); for smoke tests
    val_data: str | None = None  # a given validation set (class folders or CSV) instead of held-out classes
    time_limit: float = 0  # minutes of training at most (0 = none); the last epoch is cut short
    workers: int = 2
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, nesterov)
    sampler: str = "random"  # or "pk": batch_size // pk_k classes x pk_k images each
    pk_k: int = 4
    freeze_blocks: int = 0  # leading backbone units kept frozen all along (see backbone_units)
    freeze_epochs: float = 0  # train the head only for this many epochs, then unfreeze the backbone
    threads: int = 0  # torch CPU threads (0: all cores, shared between the processes of a torchrun job)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise LookalikeError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if self.optimizer not in ("adamw", "sgd"):
            raise LookalikeError(f"unknown optimizer {self.optimizer!r}; use adamw or sgd")
        if self.sampler not in ("random", "pk"):
            raise LookalikeError(f"unknown sampler {self.sampler!r}; use random or pk")
        if self.sampler == "pk" and not 2 <= self.pk_k <= self.batch_size // 2:
            raise LookalikeError(f"--pk-k {self.pk_k} must be 2..batch_size/2 so a batch holds at least 2 classes")


def list_labelled(data) -> list[tuple[Path, str]]:
    """Class-folder tree (folder = label) or a CSV ``image,label`` (paths relative to the CSV)."""
    data = Path(data)
    if data.is_file():
        from .formats import read_labels

        return [(data.parent / k, v) for k, v in read_labels(data).items()]
    if not data.is_dir():
        raise LookalikeError(f"{data}: no such folder or labels CSV")
    try:
        entries = list_images(data)  # the one way images are found (sorted, hidden files skipped)
    except LookalikeError:
        entries = []
    items = [(e.path, e.name.split("/", 1)[0]) for e in entries if "/" in e.name]  # the first folder is the class
    items.sort(key=lambda it: (it[1], it[0].relative_to(data / it[1]).parts))  # classes by name, then their files
    if not items:
        raise LookalikeError(f"{data}: no class folders with images; expected DATA/<class>/<image>.jpg or a CSV image,label")
    return items


def split_classes(labels: list[str], val_fraction: float, seed: int) -> set[str]:
    classes = sorted(set(labels))
    rng = random.Random(seed)
    rng.shuffle(classes)
    return set(classes[: max(1, int(round(len(classes) * val_fraction)))]) if val_fraction > 0 else set()


def augment(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Random resized crop (scale 0.35–1), flip, rotation ±15°, shear, colour jitter, erasing."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.35, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            break
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
    shear = rng.uniform(-0.15, 0.15)
    img = img.transform(img.size, Image.Transform.AFFINE, (1, shear, -shear * img.height / 2, 0, 1, 0),
                        resample=Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
    for enh in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enh(img).enhance(rng.uniform(0.7, 1.3))
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.array(img)
    if rng.random() < 0.25:  # random erasing
        eh, ew = rng.randint(size // 8, size // 3), rng.randint(size // 8, size // 3)
        y, x = rng.randint(0, size - eh), rng.randint(0, size - ew)
        arr[y : y + eh, x : x + ew] = np.array([rng.randint(0, 255) for _ in range(3)], np.uint8)
    return Image.fromarray(arr)


class _Images(torch.utils.data.Dataset):
    """(normalised CHW tensor, class index, item index, reason); an unreadable image gives a grey
    tile, class -1 and the reason it was skipped."""

    def __init__(self, items, class_index, size, train: bool, seed: int):
        self.items, self.class_index, self.size, self.train, self.seed = items, class_index, size, train, seed
        self.epoch = 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        reason = ""
        try:
            img = load_image(path, min_side=self.size)
        except BadImage as e:
            img = Image.new("RGB", (self.size, self.size), (127, 127, 127))
            label, reason = None, str(e) or "unreadable"
        if self.train:
            img = augment(img, self.size, random.Random(hash((self.seed, self.epoch, i))))
        else:
            img = img.resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = network_input(torch.from_numpy(np.asarray(img, np.float32).copy())[None])[0]
        return x, self.class_index.get(label, -1), i, reason


def _make_loss(cfg: TrainConfig, num_classes: int):
    from pytorch_metric_learning import losses

    kw = {}
    if cfg.margin is not None:
        kw["margin"] = cfg.margin
    if cfg.scale is not None:
        kw["scale"] = cfg.scale
    if cfg.loss == "cosface":
        return losses.CosFaceLoss(num_classes, cfg.dim, **kw)
    if cfg.loss == "arcface":
        return losses.ArcFaceLoss(num_classes, cfg.dim, **kw)
    if cfg.loss == "sphereface":
        return losses.SphereFaceLoss(num_classes, cfg.dim, **kw)
    return losses.MultiSimilarityLoss(**kw)


def _embed_all(model: Embedder, loader, device) -> np.ndarray:
    model.eval()
    out = []
    with torch.inference_mode():
        for x, *_ in loader:
            out.append(model.embed(x.to(device)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


class BatchSampler:
    """Batches of indices drawn from ``(seed, epoch)``: ``random`` shuffles all images, ``pk`` picks
    ``batch_size // k`` classes and ``k`` images of each (pair losses need positives in every batch).
    Process ``rank`` of ``world`` yields the slice ``batch[rank::world]`` of every global batch; a
    P x K batch is laid out class by class, so each process still gets ``k / world`` images per class."""

    def __init__(self, labels, batch_size: int, mode: str = "random", k: int = 4, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.labels = np.asarray(labels)
        self.batch_size, self.mode, self.k, self.seed, self.rank, self.world = batch_size, mode, k, seed, rank, world
        self.epoch = 0
        n = len(self.labels)
        self.n_batches = max(1, n // batch_size)
        if mode == "pk":
            classes, inverse = np.unique(self.labels, return_inverse=True)
            self.members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
            self.pk_classes = [c for c, m in enumerate(self.members) if len(m) >= 2]
            if len(self.pk_classes) < 2:
                raise LookalikeError("the P x K sampler needs at least 2 classes with 2 or more images")

    def __len__(self):
        return self.n_batches

    def global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "random":
            perm = rng.permutation(len(self.labels))
            if len(perm) <= self.batch_size:
                return [perm]
            return [perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(self.n_batches)]
        p = min(len(self.pk_classes), max(2, self.batch_size // self.k))
        batches = []
        for _ in range(self.n_batches):
            chosen = rng.choice(self.pk_classes, size=p, replace=False)
            batches.append(np.concatenate([rng.choice(self.members[c], size=self.k, replace=len(self.members[c]) < self.k)
                                           for c in chosen]))
        return batches

    def __iter__(self):
        for b in self.global_batches():
            yield b[self.rank::self.world].tolist()


def backbone_units(module: nn.Module) -> list[nn.Module]:
    """The backbone's modules in forward order with containers opened, for ``freeze_blocks``:
    for EfficientNet-Lite that is stem conv, stem BN, the 16 (lite0) MBConv blocks, head conv, head BN, ..."""
    kids = list(module.children())
    if len(kids) == 1:
        return backbone_units(kids[0])
    units: list[nn.Module] = []
    for m in kids:
        units.extend(m.children() if isinstance(m, (nn.ModuleList, nn.Sequential)) else [m])
    return units


def _set_trainable(model: Embedder, cfg: TrainConfig, backbone_on: bool) -> list[nn.Module]:
    """requires_grad per parameter; returns the frozen backbone units (kept in eval mode for BN)."""
    units = backbone_units(model.backbone)
    frozen = units if not backbone_on else units[: cfg.freeze_blocks]
    for prm in model.backbone.parameters():
        prm.requires_grad_(backbone_on)
    for u in frozen:
        for prm in u.parameters():
            prm.requires_grad_(False)
    return frozen


class _TrainStep(nn.Module):
    """Embedding + loss in one module, so one DDP wrapper syncs both (the loss holds class weights)."""

    def __init__(self, model: Embedder, loss_fn: nn.Module, channels_last: bool):
        super().__init__()
        self.model, self.loss_fn, self.channels_last = model, loss_fn, channels_last

    def forward(self, x, y):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=x.device.type == "cuda"):
            emb = self.model.embed(x)
        keep = y >= 0  # unreadable images: embedded (every DDP process must run the graph) but not scored
        if keep.sum() == 0:
            return emb.float().sum() * 0.0
        return self.loss_fn(emb.float()[keep], y[keep])


def _distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); starts the process group under ``torchrun``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def _lr_factor(step: int, warm: int, progress: float, warm_progress: float) -> float:
    """Linear warm-up over ``warm`` steps, then cosine to 0 as ``progress`` goes to 1."""
    if step < warm:
        return (step + 1) / warm
    f = min(1.0, max(0.0, (progress - warm_progress) / max(1e-9, 1 - warm_progress)))
    return 0.5 * (1 + math.cos(math.pi * f))


def _check_architecture(out: Path, cfg: TrainConfig) -> None:
    """On --resume: the run's saved config must describe the same network."""
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return
    keys = ("model", "weights", "descriptors", "dim", "loss")
    diff = [f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in keys if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise LookalikeError(f"{out}: the checkpoint was trained with another architecture ({'; '.join(diff)}); "
                             "resume with the original options or start a new -o folder")


def train(cfg: TrainConfig, resume: bool = False, progress: bool = False) -> dict:
    """Train, select on validation retrieval, export. Returns the best validation metrics.

    Under ``torchrun`` every process calls this; rank 0 validates, writes checkpoints and exports."""
    from tqdm.auto import tqdm

    rank, world, device = _distributed()
    if cfg.batch_size % world:
        raise LookalikeError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif world > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise LookalikeError(f"{out}: holds a run already; pass --resume to continue it or choose another -o")
    if resume and ckpt_path.exists():
        _check_architecture(out, cfg)
    items = list_labelled(cfg.data)
    if cfg.fraction < 1:
        rng = random.Random(cfg.seed)
        items = rng.sample(items, max(2, int(len(items) * cfg.fraction)))
    if cfg.val_data:
        train_items, val_items = items, list_labelled(cfg.val_data)
    else:
        val_classes = split_classes([lab for _, lab in items], cfg.val_fraction, cfg.seed)
        train_items = [it for it in items if it[1] not in val_classes]
        val_items = [it for it in items if it[1] in val_classes]
    counts: dict[str, int] = {}
    for _, lab in train_items:
        counts[lab] = counts.get(lab, 0) + 1
    singles = sorted(c for c, n in counts.items() if n < 2)
    if singles and rank == 0:
        log.warning("%d training classes have one image (no positives; the P x K sampler leaves them out): %s",
                    len(singles), singles[:5])
    classes = sorted(counts)
    if len(classes) < 2:
        raise LookalikeError(f"{cfg.data}: need at least 2 training classes, found {len(classes)}")
    class_index = {c: i for i, c in enumerate(classes)}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "config.json", asdict(cfg))
    bb = create_backbone(cfg.model, cfg.weights)
    model = Embedder(bb.module, head=CGDHead(bb.channels, cfg.descriptors, cfg.dim, cfg.gem_p)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_fn = _make_loss(cfg, len(classes)).to(device)
    params = [{"params": list(model.backbone.parameters()), "lr": cfg.lr * cfg.backbone_lr_mult},
              {"params": list(model.head.parameters()) + list(loss_fn.parameters()), "lr": cfg.lr}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    train_ds = _Images(train_items, class_index, cfg.image_size, cfg.augment, cfg.seed)
    if rank == 0 and not resume:
        _preview(out / "augmentations.png", train_ds)
    sampler = BatchSampler([class_index[lab] for _, lab in train_items], cfg.batch_size, cfg.sampler, cfg.pk_k,
                           cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers)
    val_loader = torch.utils.data.DataLoader(_Images(val_items, {}, cfg.image_size, False, cfg.seed),
                                             batch_size=cfg.batch_size, num_workers=cfg.workers)
    steps_per_epoch = max(1, len(sampler) // cfg.accumulate)
    if cfg.max_steps:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps)
    total = steps_per_epoch * cfg.epochs
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    start_epoch, best, history, bad_epochs, global_step, elapsed = 0, None, [], 0, 0, 0.0
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        try:
            model.load_state_dict(ck["model"])
            loss_fn.load_state_dict(ck["loss"])
            opt.load_state_dict(ck["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise LookalikeError(f"{ckpt_path}: does not fit the requested model ({str(e).splitlines()[0][:120]}); "
                                 "resume with the original options or start a new -o folder") from None
        start_epoch, best, bad_epochs = ck["epoch"] + 1, ck["best"] or None, ck["bad_epochs"]
        global_step, elapsed = int(ck.get("step", 0)), float(ck.get("elapsed", 0.0))
        history = json.loads(ck["history"])
        log.info("resumed %s at epoch %d", out, start_epoch)
    limit_s = cfg.time_limit * 60
    t_start = time.perf_counter() - elapsed
    out_of_time = False
    skipped: dict[str, str] = {}
    step_net, trainable_state = None, None
    for epoch in range(start_epoch, cfg.epochs):
        backbone_on = epoch >= cfg.freeze_epochs
        frozen = _set_trainable(model, cfg, backbone_on)
        if step_net is None or trainable_state != backbone_on:  # DDP must be rebuilt when the trainable set changes
            step_net = _TrainStep(model, loss_fn, device.type == "cuda")
            if world > 1:
                step_net = torch.nn.parallel.DistributedDataParallel(step_net, find_unused_parameters=True)
            trainable_state = backbone_on
        model.train()
        for u in frozen:
            u.eval()
        train_ds.epoch = sampler.epoch = epoch
        t0, seen, loss_sum, step = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank != 0, leave=False)
        for i, (x, y, idx, reasons) in enumerate(bar):
            skipped.update((str(train_items[int(k)][0]), r) for k, r in zip(idx, reasons) if r)
            x, y = x.to(device, non_blocking=True), y.to(device)
            last = (i + 1) % cfg.accumulate == 0
            sync = step_net.no_sync() if world > 1 and not last else nullcontext()
            with sync:
                loss = step_net(x, y) / cfg.accumulate
                scaler.scale(loss).backward()
            if last:
                progress_now = global_step / max(1, total)
                if limit_s:
                    progress_now = max(progress_now, (time.perf_counter() - t_start) / limit_s)
                f = _lr_factor(global_step, warm, progress_now, warm / max(1, total))
                for g, base in zip(opt.param_groups, base_lrs):
                    g["lr"] = base * f
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                step += 1
                global_step += 1
            loss_sum += float(loss.detach()) * cfg.accumulate * len(y)
            seen += len(y)
            if step >= steps_per_epoch:
                break
            if limit_s and _agree(time.perf_counter() - t_start > limit_s, world):
                out_of_time = True
                break
        elapsed = time.perf_counter() - t_start
        if world > 1:
            import torch.distributed as dist

            gathered = [None] * world
            dist.all_gather_object(gathered, skipped)
            for d in gathered:
                skipped.update(d)
        stop = False
        if rank == 0:
            val = leave_one_out(_embed_all(model, val_loader, device), np.array([lab for _, lab in val_items])) \
                if len(val_items) > 1 else {"digix_score": float("nan"), "top1": float("nan"), "mAP@10": float("nan")}
            row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_top1": val["top1"],
                   "val_mAP@10": val["mAP@10"], "val_score": val["digix_score"], "seconds": time.perf_counter() - t0,
                   "images_per_s": seen * world / max(time.perf_counter() - t0, 1e-9),
                   "lr": opt.param_groups[-1]["lr"], "backbone_trained": int(backbone_on)}
            history.append(row)
            improved = best is None or not (val["digix_score"] <= best["val_score"])
            if improved:
                best, bad_epochs = row, 0
                _save_weights(model, out / "best.pt")
            else:
                bad_epochs += 1
            with atomic_path(ckpt_path, suffix=".pt") as tmp:
                torch.save({"model": model.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.state_dict(),
                            "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "step": global_step,
                            "elapsed": time.perf_counter() - t_start, "history": json.dumps(history)}, tmp)
            _write_history(out, history)
            if skipped:
                from .formats import write_skipped_csv

                write_skipped_csv(out / "skipped.csv", sorted(skipped.items()))
            if cfg.patience and bad_epochs >= cfg.patience:
                log.info("early stop after epoch %d", epoch + 1)
                stop = True
        if _agree(stop, world, src=0) or out_of_time:
            if out_of_time:
                log.info("time limit reached in epoch %d", epoch + 1)
            break
    if world > 1:
        log.info("rank %d of %d: parameter checksum %.6f", rank, world,
                 float(sum(prm.detach().double().sum() for prm in model.parameters())))
    if skipped and rank == 0:
        log.warning("%d unreadable training images skipped; listed in %s", len(skipped), out / "skipped.csv")
    if rank == 0:
        export(out, cfg, len(classes))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return best or {}


def _agree(flag: bool, world: int, src: int | None = None) -> bool:
    """One decision for all processes: any process's flag (or ``src``'s) counts."""
    if world <= 1:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    if src is None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    else:
        dist.broadcast(t, src)
    return bool(t.item())


def _preview(path: Path, ds: "_Images", n: int = 8) -> None:
    """A strip of n training images as the network sees them (after augmentation)."""
    tiles = []
    for i in range(min(n, len(ds))):
        x, *_ = ds[(i * 7919) % len(ds)]
        tiles.append(Image.fromarray((x.permute(1, 2, 0).numpy() * 128 + 127).clip(0, 255).astype(np.uint8)))
    if not tiles:
        return
    s = ds.size
    sheet = Image.new("RGB", (s * len(tiles), s), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, (i * s, 0))
    with atomic_path(path, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")


def _save_weights(model: Embedder, path: Path) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def _write_history(out: Path, history: list[dict]) -> None:
    with atomic_path(out / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [r["epoch"] for r in history]
    ax[0].plot(ep, [r["train_loss"] for r in history], marker="o")
    ax[0].set(title="training loss", xlabel="epoch")
    ax[1].plot(ep, [r["val_score"] for r in history], marker="o", label="score")
    ax[1].plot(ep, [r["val_top1"] for r in history], marker=".", label="top-1")
    ax[1].plot(ep, [r["val_mAP@10"] for r in history], marker=".", label="mAP@10")
    ax[1].set(title="validation retrieval", xlabel="epoch")
    ax[1].legend()
    fig.tight_layout()
    with atomic_path(out / "curves.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def export(out: Path, cfg: TrainConfig, num_classes: int) -> Path:
    """fp16 weights of the best epoch (``torch.load(weights_only=True)``) + model description + ONNX."""
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    with atomic_path(out / "model_fp16.pt", suffix=".pt") as tmp:
        torch.save({k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}, tmp)
    meta = {"backbone": cfg.model, "backbone_weights": cfg.weights, "descriptors": cfg.descriptors, "dim": cfg.dim,
            "gem_p": cfg.gem_p, "image_size": cfg.image_size, "classes": num_classes, "weights": "model_fp16.pt",
            "loss": cfg.loss}
    write_model_meta(out, meta)
    from .models import export_onnx, load_trained

    export_onnx(load_trained(out), out / "model.onnx")
    size = sum(os.path.getsize(out / f) for f in ("model_fp16.pt",))
    log.info("exported %s (%.1f MB fp16)", out, size / 1e6)
    return out
