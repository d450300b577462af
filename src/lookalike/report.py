"""Visual evaluation report (``lookalike evaluate --report DIR``): an HTML page with PNGs.

- ``strips/NNN.png``: one per query, the query (blue frame) then its top-k results, green frame for
  the right class and red for a wrong one; worst queries (lowest AP, latest first hit) first;
- ``first_correct_rank.png``: histogram of the rank of the first correct result (and "none");
- ``cam/NNN.png`` (``--cam N``): a Grad-CAM style map for N of the worst queries: the gradient of
  the cosine similarity between the query and its top-1 result with respect to the backbone's last
  feature map, channel-weighted (Selvaraju et al. 2017, adapted to an embedding), over the photo.

Image composition is Pillow's, plots are matplotlib's; the page is plain HTML with relative links.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ._io import write_text_atomic
from .errors import LookalikeError

log = logging.getLogger(__name__)

GREEN, RED, BLUE, GREY = (46, 160, 67), (211, 47, 47), (30, 136, 229), (200, 200, 200)


def _resolver(root: Path | None):
    """name -> path, for a folder or a list file of images (names as `list_images` makes them)."""
    if root is None:
        return lambda name: None
    if root.is_file():
        from .data import list_images

        table = {e.name: e.path for e in list_images(root)}
        return table.get
    return lambda name: root / name


def _tile(path, size: int, colour, caption: str) -> Image.Image:
    from .data import BadImage, load_image

    border, text_h = 5, 16
    tile = Image.new("RGB", (size, size + text_h), (255, 255, 255))
    inner = size - 2 * border
    try:
        if path is None:
            raise BadImage("no image folder given")
        im = load_image(path, min_side=inner)
        im.thumbnail((inner, inner))
    except (BadImage, OSError):
        im = Image.new("RGB", (inner, inner), GREY)
        ImageDraw.Draw(im).text((6, inner // 2 - 6), "missing", fill=(80, 80, 80))
    frame = Image.new("RGB", (size, size), colour)
    frame.paste(Image.new("RGB", (inner, inner), (240, 240, 240)), (border, border))
    frame.paste(im, (border + (inner - im.width) // 2, border + (inner - im.height) // 2))
    tile.paste(frame, (0, 0))
    text = caption if len(caption) <= size // 7 else "…" + caption[-(size // 7 - 1):]
    ImageDraw.Draw(tile).text((3, size + 2), text, fill=(30, 30, 30))
    return tile


def query_strip(query_path, query_name: str, ranked: list[tuple[str, object, bool]], size: int = 128) -> Image.Image:
    """Query tile then one tile per result ``(name, path, correct)``."""
    tiles = [_tile(query_path, size, BLUE, query_name)]
    tiles += [_tile(p, size, GREEN if ok else RED, f"{i + 1}. {n}") for i, (n, p, ok) in enumerate(ranked)]
    gap = 6
    strip = Image.new("RGB", (len(tiles) * (size + gap) - gap + 2 * gap, tiles[0].height + 2 * gap), (255, 255, 255))
    for i, t in enumerate(tiles):
        strip.paste(t, (gap + i * (size + gap), gap))
    return strip


def rank_histogram(first_correct: np.ndarray, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [int((first_correct == r).sum()) for r in range(1, k + 1)] + [int((first_correct == 0).sum())]
    labels = [str(r) for r in range(1, k + 1)] + ["none"]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    ax.bar(labels, counts, color=["#2ea043"] * k + ["#d32f2f"])
    ax.set_xlabel(f"rank of the first correct result (none: not in the top {k})")
    ax.set_ylabel("queries")
    for i, c in enumerate(counts):
        if c:
            ax.text(i, c, str(c), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cam_model(extract_config=None):
    """(embedding network, preprocessing) for :func:`grad_cam`: built once per report;
    ``extract_config``: an ``ExtractConfig`` (default: the default model)."""
    from .extract import ExtractConfig, Extractor

    cfg = extract_config or ExtractConfig()
    if cfg.is_ensemble:  # the maps of the first torch member (an ONNX embedding model has no gradients here)
        torch_members = [m for m in cfg.members() if m.kind in ("backbone", "trained")]
        if not torch_members:
            raise LookalikeError(f"Grad-CAM maps need a torch model; {cfg.model_name} has none; drop --cam")
        cfg = torch_members[0]
    elif cfg.kind == "embedding":
        raise LookalikeError(f"Grad-CAM maps need a torch model, not the ONNX model {cfg.model}; drop --cam "
                             "or pass --model lite0")
    return Extractor(cfg).build_embedder().eval(), cfg.preprocess


def grad_cam(model, query_path, match_path) -> tuple[np.ndarray, np.ndarray]:
    """((H, W) map in [0, 1], the (H, W, 3) uint8 query as the model sees it): where the query's
    similarity to the match comes from. ``model`` is what :func:`cam_model` returns."""
    import torch

    from .data import load_image
    from .models import network_input

    net, pre = model

    def tensor(path):
        arr = pre(load_image(path))
        return network_input(torch.from_numpy(np.array(arr))[None]), arr

    xq, arr = tensor(query_path)
    xm, _ = tensor(match_path)
    with torch.no_grad():
        target = torch.nn.functional.normalize(net.embed(xm), dim=1)
    fmap = net.backbone(xq)
    fmap.retain_grad()
    emb = net.describe(fmap)
    sim = (torch.nn.functional.normalize(emb, dim=1) * target).sum()
    sim.backward()
    w = fmap.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((w * fmap).sum(1))[0].detach().numpy()
    cam = cam / cam.max() if cam.max() > 0 else cam
    up = Image.fromarray((cam * 255).astype(np.uint8)).resize((arr.shape[1], arr.shape[0]), Image.BILINEAR)
    return np.asarray(up, np.float32) / 255.0, arr


def cam_overlay(cam: np.ndarray, arr: np.ndarray) -> Image.Image:
    import matplotlib

    heat = (matplotlib.colormaps["jet"](cam)[..., :3] * 255).astype(np.float32)
    mixed = 0.55 * arr.astype(np.float32) + 0.45 * heat
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def write_report(out_dir, summary: dict, queries: list[str], q_labels: list[str], ranked_by_q: dict, label_of: dict,
                 per_query: dict, query_root=None, gallery_root=None, show_k: int = 10, max_queries: int = 50,
                 cam: int = 0, extract_config=None) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns the page's path."""
    out = Path(out_dir)
    (out / "strips").mkdir(parents=True, exist_ok=True)
    qpath, gpath = _resolver(Path(query_root) if query_root else None), _resolver(Path(gallery_root) if gallery_root else None)
    if query_root is None or gallery_root is None:
        log.warning("report: no image folder for %s; tiles are grey (give --images, or --query-dir/--gallery-dir)",
                    "queries" if query_root is None else "the gallery")
    k_key = next(c for c in per_query if c.startswith("ap@"))
    ap = np.asarray(per_query[k_key], np.float64)
    first = np.asarray(per_query["first_correct_rank"])
    lateness = np.where(first == 0, 10 ** 6, first)
    order = np.lexsort((-lateness, ap))  # lowest AP first; among equals, the latest first hit first
    rank_histogram(first, max(show_k, 10), out / "first_correct_rank.png")
    rows = []
    cam_done = 0
    model = None
    for pos, qi in enumerate(order[:max_queries]):
        q = queries[qi]
        ranked = [(g, gpath(g), label_of.get(g) == q_labels[qi]) for g in ranked_by_q[q][:show_k]]
        img_name = f"strips/{pos:04d}.png"
        query_strip(qpath(q), q, ranked).save(out / img_name)
        cam_html = ""
        if cam_done < cam and ranked and qpath(q) is not None and ranked[0][1] is not None:
            try:
                (out / "cam").mkdir(exist_ok=True)
                model = model or cam_model(extract_config)
                heat, arr = grad_cam(model, qpath(q), ranked[0][1])
                cam_name = f"cam/{pos:04d}.png"
                cam_overlay(heat, arr).save(out / cam_name)
                cam_html = f"<figure><img src='{cam_name}' alt='activation map'><figcaption>what matched " \
                           f"{html.escape(ranked[0][0])}</figcaption></figure>"
                cam_done += 1
            except (OSError, ValueError) as e:
                log.warning("report: no activation map for %s (%s)", q, e)
        fc = int(first[qi])
        rows.append(f"<section><h3>{pos + 1}. {html.escape(q)} <small>label {html.escape(str(q_labels[qi]))} · "
                    f"AP {ap[qi]:.3f} · first correct {'rank ' + str(fc) if fc else 'none in the top ' + str(show_k)} · "
                    f"{int(per_query['n_relevant'][qi])} relevant</small></h3>"
                    f"<div class=row><img src='{img_name}' alt='results of {html.escape(q)}'>{cam_html}</div></section>")
    keys = ["queries", "top1", "mAP@10", "digix_score", "recall@1", "recall@5", "recall@10", "gallery_size"]
    table = "".join(f"<tr><th>{html.escape(key)}</th><td>{summary[key]:.4f}</td></tr>" if isinstance(summary.get(key), float)
                    else f"<tr><th>{html.escape(key)}</th><td>{summary.get(key)}</td></tr>" for key in keys if key in summary)
    page = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content='width=device-width,initial-scale=1'>"
        "<title>lookalike evaluation</title><style>body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}"
        "img{max-width:100%}.row{display:flex;gap:1em;align-items:flex-start;overflow-x:auto}figure{margin:0}"
        "th{text-align:left;padding-right:1em}h3 small{font-weight:normal;color:#555}</style></head><body>"
        f"<h1>lookalike evaluation</h1><p>{html.escape(str(summary.get('results', '')))} against "
        f"{html.escape(str(summary.get('labels', '')))}</p><table>{table}</table>"
        "<h2>Rank of the first correct result</h2><img src='first_correct_rank.png' alt='histogram'>"
        f"<h2>Worst {len(rows)} of {len(queries)} queries</h2><p>Blue: the query; green: right class; red: wrong.</p>"
        + "".join(rows) + "</body></html>")
    write_text_atomic(out / "index.html", page)
    return out / "index.html"
