"""A small quick-start set made from the photos scikit-image ships (no download).

Gallery: each photo once, plus one mild variant; queries: ``variants`` harder variants (crop,
rotation, colour change, flip) per photo. Labels: the photo's name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .formats import write_labels

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "camera", "moon", "coins", "page", "clock", "brick", "grass", "gravel", "colorwheel", "logo", "horse", "text")


def _photo(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)()
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    im = Image.fromarray(a)
    return im.convert("RGB") if im.mode != "RGB" else im


def _variant(im: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    w, h = im.size
    f = 1 - strength * rng.uniform(0.1, 0.3)
    cw, ch = int(w * f), int(h * f)
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    out = im.crop((x0, y0, x0 + cw, y0 + ch))
    out = out.rotate(float(rng.uniform(-15, 15) * strength), resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(255, 255, 255))
    out = ImageEnhance.Color(out).enhance(1 + strength * rng.uniform(-0.4, 0.4))
    out = ImageEnhance.Brightness(out).enhance(1 + strength * rng.uniform(-0.3, 0.3))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    s = rng.uniform(0.6, 1.2)
    return out.resize((max(32, int(out.width * s)), max(32, int(out.height * s))), Image.Resampling.BILINEAR)


def make_sample(directory, variants: int = 3, seed: int = 0) -> dict:
    d = Path(directory)
    (d / "gallery").mkdir(parents=True, exist_ok=True)
    (d / "queries").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels: dict[str, str] = {}
    n_g = n_q = 0
    for name in PHOTOS:
        im = _photo(name)
        for fn, img in ((f"{name}.jpg", im), (f"{name}_b.jpg", _variant(im, rng, 0.5))):
            img.save(d / "gallery" / fn, quality=90)
            labels[fn] = name
            n_g += 1
        for v in range(variants):
            fn = f"q_{name}_{v}.jpg"
            _variant(im, rng, 1.0).save(d / "queries" / fn, quality=85)
            labels[fn] = name
            n_q += 1
    write_labels(d / "labels.csv", labels)
    return {"gallery": n_g, "queries": n_q, "labels": str(d / "labels.csv")}
