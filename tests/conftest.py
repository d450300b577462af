import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """One ONNX cache for the whole session, outside the user's home."""
    if "LOOKALIKE_CACHE_DIR" not in os.environ:
        os.environ["LOOKALIKE_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield


def make_photo(seed: int, size=(96, 80)) -> Image.Image:
    """A small synthetic 'product' photo: a class-specific pattern of coloured blobs plus noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float32) + rng.uniform(0, 255, 3)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 30)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_set(root: Path, n_classes=4, per_class=2, prefix="img", start=0, size=(96, 80)) -> dict:
    """Write class-patterned JPEGs; returns {name: label}. Same class = same base pattern, jittered."""
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    for c in range(n_classes):
        base = np.asarray(make_photo(1000 + c, size), np.float32)
        for i in range(per_class):
            rng = np.random.default_rng(start + 100 * c + i)
            arr = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
            name = f"{prefix}_{c}_{start + i}.jpg"
            Image.fromarray(arr).save(root / name, quality=92)
            labels[name] = f"class{c}"
    return labels


def lookalike_cli(*args, check=False, **kw):
    """Run the real console entry point in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "lookalike.cli", *map(str, args)], capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"lookalike {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_response(sock):
    """(status, headers, body) of one HTTP response read to the end of the connection; a reset raises."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def served_collection(root: Path, n_classes: int, per_class: int) -> Path:
    """``root/gallery`` (class-patterned photos ``g_*``), ``root/extra`` (two more, ``new_*``),
    ``root/g.h5`` and the collection ``root/col`` (64 px, with its image root): what the service
    tests serve."""
    make_set(root / "gallery", n_classes=n_classes, per_class=per_class, prefix="g")
    make_set(root / "extra", n_classes=2, per_class=1, prefix="new", start=70)
    lookalike_cli("extract", root / "gallery", "-o", root / "g.h5", "--image-size", "64", check=True)
    lookalike_cli("index", root / "g.h5", "-o", root / "col", "--image-root", root / "gallery", check=True)
    return root
