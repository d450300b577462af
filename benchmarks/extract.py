"""Extraction speed: lookalike's pipeline against a naive one, measured in the same run.

- naive: per image, PIL decode + resize/crop, eager PyTorch forward with batch 1 (the usual script);
- model only: onnxruntime on ready uint8 batches (no decoding) — the ceiling for the pipeline;
- lookalike: files on disk -> L2-normalised features (threaded decode, buckets, onnxruntime).
Also: decode time of large (2000 px) JPEGs with and without reduced-size (draft) decoding.

    python benchmarks/extract.py --data ../shared/datasets/grocery_store --n 1024
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike import Extractor
from lookalike.data import load_image


def images_from(root: Path, n: int) -> list[Path]:
    paths = sorted(p for p in root.rglob("*.jpg"))
    rng = np.random.default_rng(0)
    return [paths[i] for i in sorted(rng.choice(len(paths), min(n, len(paths)), replace=False))]


def naive_rate(paths: list[Path], threads: int) -> float:
    """The pipeline found in most competition repos: one image at a time, PIL resize + centre crop,
    a ToTensor/Normalize-style contiguous NCHW float tensor, eager PyTorch, global average pooling."""
    import torch

    from lookalike.models import create_backbone

    torch.set_num_threads(threads)
    backbone = create_backbone("lite0").module.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in paths:
            im = Image.open(p).convert("RGB")
            w, h = im.size
            f = 256 / min(w, h)
            im = im.resize((round(w * f), round(h * f)), Image.Resampling.BILINEAR)
            left, top = (im.width - 224) // 2, (im.height - 224) // 2
            a = (np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32) - 127.0) / 128.0
            x = torch.from_numpy(a).permute(2, 0, 1).contiguous()[None]
            feat = backbone(x).mean(dim=(2, 3))
            torch.nn.functional.normalize(feat, dim=1)
    return len(paths) / (time.perf_counter() - t0)


def model_only_rate(ex: Extractor, n: int, batch: int) -> float:
    runner = ex.runner
    x = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    runner(x)  # warm-up
    t0 = time.perf_counter()
    done = 0
    while done < n:
        runner(x)
        done += batch
    return done / (time.perf_counter() - t0)


def decode_times(sources: list[Path], tmp: Path, n: int = 20, noise: float = 0.0) -> tuple[float, float]:
    """ms per 2000x1500 JPEG (upscaled real photos, plus optional noise: more entropy to decode),
    full decode vs reduced-size (draft) decode."""
    rng = np.random.default_rng(0)
    paths = []
    for i, src in enumerate(sources[:n]):
        im = Image.open(src).convert("RGB").resize((2000, 1500), Image.Resampling.BICUBIC)
        a = np.asarray(im, np.float32) + rng.normal(0, noise, (1500, 2000, 3))
        p = tmp / f"big_{i}.jpg"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    out = []
    for side in (None, 320):
        t0 = time.perf_counter()
        for p in paths:
            load_image(p, min_side=side)
        out.append((time.perf_counter() - t0) / len(paths) * 1000)
    return out[0], out[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/grocery_store/images")
    ap.add_argument("--n", type=int, default=1024, help="images for the pipeline runs")
    ap.add_argument("--n-naive", type=int, default=128, help="images for the (slow) naive run")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    root = Path(args.data)
    paths = images_from(root, args.n)
    print(f"{len(paths)} images from {root}, {threads} threads, batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = tmp / "list.txt"
        listing.write_text("".join(f"{p.resolve()}\n" for p in paths))
        ex = Extractor(pooling="spoc", batch_size=args.batch)
        naive_before = naive_rate(paths[: args.n_naive], threads)
        model = model_only_rate(ex, args.n, args.batch)
        t0 = time.perf_counter()
        res = ex.extract(listing, None, progress=False)
        pipe = len(res.names) / (time.perf_counter() - t0)
        bf16 = None
        try:
            import openvino  # noqa: F401

            ex16 = Extractor(pooling="spoc", batch_size=args.batch, precision="bf16")
            model16 = model_only_rate(ex16, args.n, args.batch)
            t0 = time.perf_counter()
            ex16.extract(listing, None, progress=False)
            bf16 = (model16, len(paths) / (time.perf_counter() - t0))
        except ImportError:
            pass
        naive = (naive_before + naive_rate(paths[args.n_naive : 2 * args.n_naive], threads)) / 2  # before and after
        decodes = {noise: decode_times(paths, tmp, noise=noise) for noise in (0.0, 4.0)}
    print(f"naive per-image eager PyTorch + PIL : {naive:8.1f} img/s   1.00x")
    print(f"onnxruntime model only (no decode)  : {model:8.1f} img/s   {model / naive:5.2f}x")
    print(f"lookalike end to end (files->feats) : {pipe:8.1f} img/s   {pipe / naive:5.2f}x naive, "
          f"{pipe / model:.0%} of model-only")
    if bf16:
        print(f"openvino bf16 model only (no decode): {bf16[0]:8.1f} img/s   {bf16[0] / naive:5.2f}x")
        print(f"lookalike --precision bf16 end to end: {bf16[1]:8.1f} img/s   {bf16[1] / naive:5.2f}x naive, "
              f"{bf16[1] / bf16[0]:.0%} of its model-only, {bf16[1] / model:.0%} of onnxruntime model-only")
    for noise, (full_ms, draft_ms) in decodes.items():
        print(f"decode 2000x1500 JPEG (noise sigma {noise:.0f}): full {full_ms:.1f} ms, reduced (draft) {draft_ms:.1f} ms, "
              f"{full_ms / draft_ms:.1f}x faster")


if __name__ == "__main__":
    main()
