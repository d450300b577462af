"""``lookalike inspect``: the data checks a retrieval project starts with.

Counts and unreadable files, image sizes (table and plot), images per class, exact duplicates
(same bytes, SHA-256) and near duplicates (perceptual hash within a Hamming radius), also between a
query set and the gallery — printed, and as JSON + HTML + PNGs with ``--report``.

Perceptual hashes are the ``imagehash`` package's pHash; the radius search is faiss's binary index;
plots are matplotlib's. Written here: the grouping and the report.
"""
from __future__ import annotations

import hashlib
import html
import io
import logging
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ._io import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass
class InspectConfig:
    images: str
    labels: str | None = None
    queries: str | None = None
    near_radius: int = 4  # pHash bits that may differ for a near duplicate (of 64)
    workers: int = 0


@dataclass
class ImageInfo:
    name: str
    set: str  # gallery | queries
    sha256: str = ""
    width: int = 0
    height: int = 0
    format: str = ""
    phash: bytes = b""
    error: str = ""


def _probe(entry, which: str) -> ImageInfo:
    import imagehash
    from PIL import Image

    from .data import BadImage, load_image

    info = ImageInfo(entry.name, which)
    try:
        data = entry.path.read_bytes()  # read once: hashed, decoded, and its header read from memory
        info.sha256 = hashlib.sha256(data).hexdigest()
        if not data:
            raise BadImage("empty file (0 bytes)")
        img = load_image(io.BytesIO(data), min_side=64)
        with Image.open(io.BytesIO(data)) as im:  # full-size dimensions (the decode above may be reduced)
            info.width, info.height, info.format = im.width, im.height, im.format or ""
        info.phash = np.packbits(imagehash.phash(img).hash.flatten()).tobytes()
    except BadImage as e:
        info.error = str(e)
    except Exception as e:  # noqa: BLE001 - any file Pillow cannot take is reported, not fatal
        info.error = f"{type(e).__name__}: {e}"
    return info


def _groups(pairs: list[tuple[int, int]], n: int) -> list[list[int]]:
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    out = defaultdict(list)
    for i in range(n):
        out[find(i)].append(i)
    return [sorted(g) for g in out.values() if len(g) > 1]


def near_pairs(hashes: np.ndarray, radius: int, other: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """(i, j, distance) with Hamming distance <= radius: within ``hashes`` (i < j), or from each
    row of ``other`` (i) to ``hashes`` (j). Rows are 8-byte pHashes."""
    import faiss

    if len(hashes) == 0 or (other is not None and len(other) == 0):
        return []
    index = faiss.IndexBinaryFlat(hashes.shape[1] * 8)
    index.add(hashes)
    queries = hashes if other is None else other
    lims, dist, ids = index.range_search(queries, radius + 1)  # faiss keeps distances < radius
    out = []
    for i in range(len(queries)):
        for d, j in zip(dist[lims[i]:lims[i + 1]], ids[lims[i]:lims[i + 1]]):
            if other is not None or j > i:
                out.append((i, int(j), int(d)))
    return out


def inspect_images(config: InspectConfig, progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    from .data import list_images
    from .formats import read_labels

    sets = [("gallery", list_images(config.images))]
    if config.queries:
        sets.append(("queries", list_images(config.queries)))
    infos: list[ImageInfo] = []
    with ThreadPoolExecutor(config.workers or None) as pool:
        for which, entries in sets:
            it = pool.map(lambda e, w=which: _probe(e, w), entries)
            infos += list(tqdm(it, total=len(entries), desc=f"inspect {which}", disable=not progress, leave=False))
    ok = [i for i in infos if not i.error]
    report: dict = {"config": asdict(config)}
    for which, entries in sets:
        mine = [i for i in infos if i.set == which]
        report[which] = {"images": len(mine), "unreadable": sum(bool(i.error) for i in mine)}
    report["unreadable"] = [{"name": i.name, "set": i.set, "reason": i.error} for i in infos if i.error]

    w = np.array([i.width for i in ok]) if ok else np.zeros(0)
    h = np.array([i.height for i in ok]) if ok else np.zeros(0)
    if len(ok):
        aspect = w / np.maximum(h, 1)
        report["sizes"] = {
            "width": _quantiles(w), "height": _quantiles(h), "aspect_w_over_h": _quantiles(aspect),
            "most_common": [{"size": f"{a}x{b}", "images": c} for (a, b), c in Counter(zip(w.tolist(), h.tolist())).most_common(10)],
            "formats": dict(Counter(i.format for i in ok).most_common()),
            "smaller_than_224": int(((w < 224) | (h < 224)).sum()),
        }

    if config.labels:
        label_of = read_labels(config.labels)
        gal = [i.name for i in infos if i.set == "gallery"]
        per_class = Counter(label_of[n] for n in gal if n in label_of)
        counts = np.array(sorted(per_class.values()))
        report["classes"] = {
            "classes": len(per_class), "unlabelled_images": sum(n not in label_of for n in gal),
            "images_per_class": _quantiles(counts) if len(counts) else {},
            "classes_with_one_image": int((counts == 1).sum()),
            "largest": [{"label": k, "images": v} for k, v in per_class.most_common(5)],
        }
        report["_per_class"] = counts

    by_hash = defaultdict(list)
    for i in ok:
        by_hash[i.sha256].append(i)
    exact = [[f"{x.set}:{x.name}" for x in g] for g in by_hash.values() if len(g) > 1]
    report["exact_duplicates"] = {"groups": len(exact), "images": sum(len(g) for g in exact), "examples": exact[:20],
                                  "across_sets": sum(len({x.split(':')[0] for x in g}) > 1 for g in exact)}

    gal = [i for i in ok if i.set == "gallery"]
    g_hash = np.frombuffer(b"".join(i.phash for i in gal), np.uint8).reshape(-1, 8) if gal else np.zeros((0, 8), np.uint8)
    pairs = [(a, b, d) for a, b, d in near_pairs(g_hash, config.near_radius) if gal[a].sha256 != gal[b].sha256]
    groups = _groups([(a, b) for a, b, _ in pairs], len(gal))
    report["near_duplicates"] = {"radius_bits": config.near_radius, "pairs": len(pairs), "groups": len(groups),
                                 "examples": [[gal[j].name for j in g] for g in groups[:20]]}
    if config.queries:
        qs = [i for i in ok if i.set == "queries"]
        q_hash = np.frombuffer(b"".join(i.phash for i in qs), np.uint8).reshape(-1, 8) if qs else np.zeros((0, 8), np.uint8)
        cross = near_pairs(g_hash, config.near_radius, other=q_hash)
        report["query_gallery_overlap"] = {
            "queries_with_a_near_duplicate_in_gallery": len({a for a, _, _ in cross}),
            "exact": sum(qs[a].sha256 == gal[b].sha256 for a, b, _ in cross),
            "examples": [{"query": qs[a].name, "gallery": gal[b].name, "bits": d} for a, b, d in cross[:20]],
        }
    report["_w"], report["_h"] = w, h
    return report


def _quantiles(a: np.ndarray) -> dict:
    a = np.asarray(a, np.float64)
    return {"min": float(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 3), "max": float(a.max())}


def summary_lines(r: dict) -> list[str]:
    lines = []
    for which in ("gallery", "queries"):
        if which in r:
            lines.append(f"{which}: {r[which]['images']} images, {r[which]['unreadable']} unreadable")
    for u in r["unreadable"][:10]:
        lines.append(f"  unreadable {u['set']}:{u['name']}: {u['reason']}")
    if "sizes" in r:
        s = r["sizes"]
        lines.append(f"sizes: width {s['width']['min']:.0f}–{s['width']['median']:.0f}–{s['width']['max']:.0f}, "
                     f"height {s['height']['min']:.0f}–{s['height']['median']:.0f}–{s['height']['max']:.0f} (min–median–max); "
                     f"{s['smaller_than_224']} smaller than 224 px; most common "
                     + ", ".join(f"{m['size']} ({m['images']})" for m in s["most_common"][:3]))
    if "classes" in r:
        c = r["classes"]
        q = c["images_per_class"]
        lines.append(f"classes: {c['classes']}, images per class {q.get('min', 0):.0f}–{q.get('median', 0):.0f}–{q.get('max', 0):.0f}, "
                     f"{c['classes_with_one_image']} with one image, {c['unlabelled_images']} unlabelled images")
    e = r["exact_duplicates"]
    lines.append(f"exact duplicates: {e['groups']} groups ({e['images']} images, {e['across_sets']} across query/gallery)")
    n = r["near_duplicates"]
    lines.append(f"near duplicates (pHash ≤ {n['radius_bits']} bits): {n['pairs']} pairs in {n['groups']} groups")
    if "query_gallery_overlap" in r:
        o = r["query_gallery_overlap"]
        lines.append(f"queries with a (near) duplicate in the gallery: {o['queries_with_a_near_duplicate_in_gallery']}")
    return lines


def write_inspect_report(r: dict, out_dir) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pics = []
    if len(r["_w"]):
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
        ax[0].scatter(r["_w"], r["_h"], s=6, alpha=0.4)
        ax[0].set_xlabel("width (px)")
        ax[0].set_ylabel("height (px)")
        ax[0].set_title("image sizes")
        ax[1].hist(r["_w"] / np.maximum(r["_h"], 1), bins=40)
        ax[1].set_xlabel("aspect ratio (w / h)")
        ax[1].set_title("aspect ratios")
        fig.tight_layout()
        fig.savefig(out / "sizes.png")
        plt.close(fig)
        pics.append("sizes.png")
    if "_per_class" in r and len(r["_per_class"]):
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
        counts = r["_per_class"]
        ax.hist(counts, bins=np.arange(1, counts.max() + 2) - 0.5 if counts.max() < 60 else 40)
        ax.set_xlabel("images per class")
        ax.set_ylabel("classes")
        fig.tight_layout()
        fig.savefig(out / "per_class.png")
        plt.close(fig)
        pics.append("per_class.png")
    clean = {k: v for k, v in r.items() if not k.startswith("_")}
    write_json_atomic(out / "inspect.json", clean)
    body = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(r))
    dups = "".join(f"<li>{html.escape(', '.join(g))}</li>" for g in r["near_duplicates"]["examples"])
    exact = "".join(f"<li>{html.escape(', '.join(g))}</li>" for g in r["exact_duplicates"]["examples"])
    page = ("<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width,initial-scale=1'>"
            "<title>lookalike inspect</title><style>body{font:14px system-ui,sans-serif;margin:1.5em}img{max-width:100%}</style>"
            f"</head><body><h1>Data inspection</h1><ul>{body}</ul>"
            + "".join(f"<img src='{p}' alt='{p}'>" for p in pics)
            + f"<h2>Exact duplicates</h2><ul>{exact or '<li>none</li>'}</ul>"
            + f"<h2>Near duplicates</h2><ul>{dups or '<li>none</li>'}</ul>"
            + "<p>Everything above as JSON: <a href='inspect.json'>inspect.json</a></p></body></html>")
    write_text_atomic(out / "index.html", page)
    return out / "index.html"
