"""Choosing a collection's ensemble weights, whitening and re-ranking without query labels.

Category-level search (same kind of product) and instance-level search (this very object) want
opposite settings: on the dev sets an ImageNet backbone wins the first, a copy-detection model the
second, and no fixed mix serves both. What the gallery itself tells:

- **classes with several photos** (class folders, ``--gallery-labels``): hold out some of each
  class's photos as queries against the rest (leave-some-out), relevant = same class;
- **photos with no classmate** (a class of one, or every photo under ``--self``): pseudo-queries
  made from the photo (strong crop, perspective, rotation, colour, blur, JPEG, pasted into another
  gallery photo), whose right answer is the photo itself.

Every candidate (member weights × whitening × re-ranking chain) is scored on both kinds of probe
with the DIGIX score; the two are averaged weighted by how many classes of each kind the gallery
holds (a query is equally likely to look for any class). Member weights are changed on the stored
features, without extracting again: each member's slice of an ensemble row is re-normalised and
re-weighted (exact, for members stored with a weight > 0).

Written here because it is specific to lookalike's ensembles; the augmentations are Pillow calls.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import LookalikeError
from .metrics import average_precision_at_k
from .numeric import knn, l2n
from .postprocess import PCAWhitening, RerankConfig, rerank

log = logging.getLogger(__name__)

WEIGHT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
VERSION = 4  # bump when a choice could change for the same gallery (cached choices are keyed by it)


# ---------------------------------------------------------------- member weights on stored rows


def split_members(features: np.ndarray, dims: list[int]) -> list[np.ndarray]:
    """An ensemble's rows -> each member's L2-normalised rows (its weight divides out)."""
    if sum(dims) != features.shape[1]:
        raise LookalikeError(f"member dimensions {dims} do not add up to the features' {features.shape[1]}")
    edges = np.cumsum([0, *dims])
    return [l2n(features[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]


def combine(members: list[np.ndarray], weights) -> np.ndarray:
    """What the extractor computes for these member rows and weights."""
    return l2n(np.concatenate([m * np.float32(w) for m, w in zip(members, weights)], axis=1))


def weight_grid(n_members: int) -> list[tuple[float, ...]]:
    """Candidate member weights (scale-free: the first non-zero weight set to 1 is dropped as a duplicate)."""
    if n_members == 1:
        return [(1.0,)]
    if n_members == 2:
        return [(w, 1.0) for w in WEIGHT_GRID] + [(1.0, 0.0)]
    seen, out = set(), []
    for ws in itertools.product((0.0, 0.5, 1.0, 2.0), repeat=n_members):
        if not any(ws):
            continue
        top = max(ws)
        key = tuple(round(w / top, 6) for w in ws)
        if key not in seen:
            seen.add(key)
            out.append(tuple(float(w) for w in ws))
    return out


# ---------------------------------------------------------------- pseudo-queries


def pseudo_query(img, background, rng: np.random.Generator):
    """One strong, photo-like view of ``img``: a crop, or the photo put into ``background`` at an
    angle; then perspective, rotation, colour, blur and JPEG. Deterministic for a given ``rng``."""
    import io

    from PIL import Image, ImageEnhance, ImageFilter

    img = img.convert("RGB")
    w, h = img.size
    if rng.random() < 0.5 or background is None:  # zoom in: a strong crop
        area = rng.uniform(0.35, 0.85)
        aspect = math.exp(rng.uniform(-0.3, 0.3))
        cw = max(8, min(w, int(round(w * math.sqrt(area * aspect)))))
        ch = max(8, min(h, int(round(h * math.sqrt(area / aspect)))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        out = img.crop((x0, y0, x0 + cw, y0 + ch))
    else:  # the object in a scene: pasted into another photo, smaller
        bg = background.convert("RGB").resize((w, h))
        s = rng.uniform(0.5, 0.9)
        pw, ph = max(8, int(w * s)), max(8, int(h * s))
        x0, y0 = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
        bg.paste(img.resize((pw, ph)), (x0, y0))
        out = bg
    # perspective: move each corner by up to 12 % of the side
    ow, oh = out.size
    j = 0.12
    src = [(rng.uniform(0, j) * ow, rng.uniform(0, j) * oh), (ow - rng.uniform(0, j) * ow, rng.uniform(0, j) * oh),
           (ow - rng.uniform(0, j) * ow, oh - rng.uniform(0, j) * oh), (rng.uniform(0, j) * ow, oh - rng.uniform(0, j) * oh)]
    dst = [(0, 0), (ow, 0), (ow, oh), (0, oh)]
    out = out.transform(out.size, Image.Transform.PERSPECTIVE, _perspective_coeffs(dst, src),
                        Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
    out = out.rotate(rng.uniform(-15, 15), Image.Resampling.BILINEAR, fillcolor=(127, 127, 127))
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.6, 1.4))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.6, 1.4))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(30, 80)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _perspective_coeffs(dst, src) -> list[float]:
    """PIL's PERSPECTIVE data: the map from output (dst) corners to input (src) corners."""
    a = []
    b = []
    for (x, y), (u, v) in zip(dst, src):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        b += [u, v]
    return np.linalg.solve(np.array(a, np.float64), np.array(b, np.float64)).tolist()


def make_pseudo_queries(paths: list, rows: np.ndarray, seed: int = 0):
    """Pseudo-queries for the gallery rows ``rows`` (images at ``paths``); backgrounds are other gallery photos."""
    from .data import BadImage, load_image

    rng = np.random.default_rng(seed)
    out, kept = [], []
    for r in rows:
        other = int(rng.integers(0, len(paths)))
        try:
            img = load_image(paths[r], min_side=640)
        except BadImage:
            continue
        try:
            bg = load_image(paths[other], min_side=640) if other != r else None
        except BadImage:
            bg = None
        out.append(pseudo_query(img, bg, rng))
        kept.append(int(r))
    return out, np.array(kept, dtype=np.int64)


# ---------------------------------------------------------------- the probes and the choice


@dataclass
class Probe:
    """Queries with known answers, drawn from the gallery itself.

    ``class_queries``: gallery rows held out as queries (relevant = same label among the rest);
    ``self_features``: pseudo-query rows (one per member, like the gallery) with ``self_targets``
    their source gallery rows. ``weight_class`` / ``weight_self``: classes of each kind.
    """

    class_queries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    labels: np.ndarray | None = None
    self_members: list[np.ndarray] | None = None
    self_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    weight_class: float = 0.0
    weight_self: float = 0.0
    self_copies: list[np.ndarray] | None = None  # per pseudo-query, gallery rows that also count as right

    def describe(self) -> str:
        return (f"{len(self.class_queries)} held-out photos of {self.weight_class:g} classes, "
                f"{len(self.self_targets)} pseudo-queries for {self.weight_self:g} photos without classmates")


def class_probe(labels, max_queries: int = 1000, fraction: float = 0.2, seed: int = 0):
    """Rows to hold out (a ``fraction`` of each class with ≥ 2 labelled photos, at least one, never
    all), rows without a classmate, and the number of classes of each kind. Unlabelled rows are ``None``/''."""
    rng = np.random.default_rng(seed)
    labels = np.asarray([("" if v is None else str(v)) for v in labels], dtype=object)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        if lab:
            by_class.setdefault(lab, []).append(i)
    multi = {c: r for c, r in by_class.items() if len(r) >= 2}
    singles = np.array(sorted(r[0] for r in by_class.values() if len(r) == 1), dtype=np.int64)
    held = []
    for c, rows in multi.items():
        m = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        held += rng.choice(rows, size=m, replace=False).tolist()
    held = np.array(sorted(held), dtype=np.int64)
    if len(held) > max_queries:
        held = np.sort(rng.choice(held, size=max_queries, replace=False))
    return held, singles, len(multi), len(singles)


def _per_query_scores(ids: np.ndarray, relevant: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    """0.5 · top-1 + 0.5 · AP@10 per query."""
    return 0.5 * relevant[:, 0] + 0.5 * average_precision_at_k(relevant, n_rel, min(10, ids.shape[1]))


def _pairs(gallery: np.ndarray, probe: Probe, self_queries: np.ndarray | None, whiten: bool) -> dict:
    """(gallery, queries) of each kind of probe, whitened once per candidate (not once per chain)."""
    def prepared(g, q):
        if whiten:
            w = PCAWhitening().fit(g)
            g, q = w.transform(g), w.transform(q)
        return g, q

    out = {}
    if len(probe.class_queries):
        keep = np.ones(len(gallery), bool)
        keep[probe.class_queries] = False
        base_rows = np.flatnonzero(keep)
        out["class"] = (*prepared(gallery[base_rows], gallery[probe.class_queries]), base_rows)
    if self_queries is not None and len(self_queries):
        out["self"] = prepared(gallery, self_queries)
    return out


def _score_pairs(pairs: dict, probe: Probe, chain: RerankConfig | None, k: int = 10) -> dict:
    def ranked(g, q):
        kk = min(k, len(g))
        return (rerank(q, g, kk, chain) if chain and chain.steps else knn(q, g, kk))[1]

    out = {}
    if "class" in pairs:
        g, q, base_rows = pairs["class"]
        ids = ranked(g, q)
        lab = probe.labels
        rel = lab[base_rows][ids] == lab[probe.class_queries][:, None]
        counts: dict = {}
        for x in lab[base_rows]:
            counts[x] = counts.get(x, 0) + 1
        n_rel = np.array([counts.get(x, 0) for x in lab[probe.class_queries]])
        out["class"] = float(_per_query_scores(ids, rel, n_rel).mean())
    if "self" in pairs:
        ids = ranked(*pairs["self"])
        rel = ids == probe.self_targets[:, None]
        n_rel = np.ones(len(ids))
        if probe.self_copies is not None:
            for i, copies in enumerate(probe.self_copies):
                if len(copies) > 1:
                    rel[i] = np.isin(ids[i], copies)
                    n_rel[i] = len(copies)
        out["self"] = float(_per_query_scores(ids, rel, n_rel).mean())
    wc = probe.weight_class if "class" in out else 0.0
    ws = probe.weight_self if "self" in out else 0.0
    if wc + ws == 0:
        raise LookalikeError("nothing to choose from: the gallery has no class with two photos and no pseudo-queries")
    out["score"] = (wc * out.get("class", 0.0) + ws * out.get("self", 0.0)) / (wc + ws)
    return out


def evaluate(gallery: np.ndarray, probe: Probe, self_queries: np.ndarray | None, whiten: bool,
             chain: RerankConfig | None, k: int = 10) -> dict:
    """Scores of one candidate (features already combined) on the probe's two kinds of queries:
    ``class`` (held-out photos against the rest), ``self`` (pseudo-queries) and their mix ``score``."""
    return _score_pairs(_pairs(gallery, probe, self_queries, whiten), probe, chain, k)


def default_chains() -> list[RerankConfig | None]:
    """A short list of re-ranking chains (``tune`` searches a longer one with labelled queries)."""
    return [None, RerankConfig(("dba",), dba_k=2, dba_alpha=3.0), RerankConfig(("qe",), qe_k=2, qe_alpha=3.0),
            RerankConfig(("dba", "qe"), dba_k=2, dba_alpha=3.0, qe_k=2, qe_alpha=3.0),
            RerankConfig(("kr",), k1=20, k2=6, kr_lambda=0.3)]


@dataclass
class Choice:
    weights: tuple[float, ...]
    whiten: bool
    rerank: RerankConfig | None
    score: float
    table: list[dict]
    probe: str

    def to_dict(self) -> dict:
        return {"ensemble_weights": list(self.weights), "whiten": self.whiten,
                "rerank": self.rerank.to_dict() if self.rerank else None, "score": self.score,
                "probe": self.probe, "table": self.table}

    def describe(self) -> str:
        chain = ",".join(self.rerank.steps) if self.rerank else "none"
        return (f"weights {','.join(f'{w:g}' for w in self.weights)}, whitening {'on' if self.whiten else 'off'}, "
                f"re-ranking {chain} (probe score {self.score:.3f})")


def choose(gallery_members: list[np.ndarray], probe: Probe, self_members: list[np.ndarray] | None = None,
           weights: list[tuple[float, ...]] | None = None, whitening=(False, True), chains=None,
           log_fn=None, min_gain: float = 0.002, current: tuple[float, ...] | None = None) -> Choice:
    """Best (member weights, whitening, re-ranking) on the probe, searched jointly. Whitening or a
    chain is kept only when it gains at least ``min_gain`` over the same weights without it; other
    weights than ``current`` (tried first) only when they beat it by ``min_gain`` (a saturated probe
    keeps the configured weights instead of the first of the grid)."""
    weights = list(weights or weight_grid(len(gallery_members)))
    if current is not None:
        current = tuple(float(w) for w in current)
        weights = [current] + [w for w in weights if tuple(w) != current]
    chains = default_chains() if chains is None else chains
    if probe.weight_self > 0:
        # photos without classmates are instance-level: one relevant photo per query, where k-reciprocal
        # and expansion lower the score (they assume several relevant photos) and pseudo-queries cannot
        # show it; only weights and whitening are chosen for such galleries
        chains = [None]
    table = []
    best = None
    for ws in weights:
        g = combine(gallery_members, ws)
        s = combine(self_members, ws) if self_members is not None else None
        plain = None
        prepared = {wh: _pairs(g, probe, s, wh) for wh in whitening}
        for wh, chain in itertools.product(whitening, chains):
            r = _score_pairs(prepared[wh], probe, chain)
            row = {"weights": list(ws), "whiten": wh, "rerank": ",".join(chain.steps) if chain else "none", **r}
            table.append(row)
            if log_fn:
                log_fn(json.dumps(row))
            if plain is None:
                plain = r["score"]  # the first pair is (no whitening, no chain)
            elif r["score"] < plain + min_gain:
                continue
            # leaving the configured weights takes min_gain; between other weights the better one wins
            leaving = current is not None and best is not None and tuple(best[1]) == current and tuple(ws) != current
            margin = min_gain if leaving else 1e-9
            if best is None or r["score"] > best[0] + margin:
                best = (r["score"], ws, wh, chain)
    score, ws, wh, chain = best
    return Choice(tuple(ws), wh, chain, score, table, probe.describe())


# ---------------------------------------------------------------- a gallery's classes, and the whole choice


def gallery_classes(gallery, names: list[str], labels_file=None) -> dict[str, str] | None:
    """{name: class} from ``labels_file`` (CSV image,label; unlabelled photos are left out), or from
    class folders (every photo exactly one folder deep, at least two folders, at least half of the
    photos in a folder with another photo: the DIGIX ``train_data`` layout); else None."""
    from pathlib import Path

    if labels_file is not None:
        from .formats import read_labels

        labels = read_labels(labels_file)
        found = {n: labels[n] for n in names if labels.get(n)}
        if not found:
            raise LookalikeError(f"{labels_file}: none of its names is a gallery image (e.g. {names[0]!r}); "
                                 "name images by their path relative to the gallery folder")
        return found
    if gallery is None or not Path(gallery).is_dir() or not names:
        return None
    parts = [n.split("/") for n in names]
    if any(len(p) != 2 for p in parts):
        return None
    folders: dict[str, int] = {}
    for p in parts:
        folders[p[0]] = folders.get(p[0], 0) + 1
    if len(folders) < 2 or sum(c for c in folders.values() if c >= 2) < 0.5 * len(names):
        return None
    return {n: p[0] for n, p in zip(names, parts)}


COPY_COSINE = 0.9  # gallery photos this close to a pseudo-query's source are copies of it: right too


def copies_of(features: np.ndarray, rows: np.ndarray, threshold: float = COPY_COSINE) -> list[np.ndarray]:
    """For each gallery row in ``rows``: itself and the gallery rows at cosine >= ``threshold`` (its
    copies: a pseudo-query that finds an exact duplicate of its source first is not wrong)."""
    out = []
    for a in range(0, len(rows), 256):
        sims = features[rows[a : a + 256]] @ features.T
        for r, row in zip(rows[a : a + 256], sims):
            near = np.flatnonzero(row >= threshold)
            out.append(np.union1d(near, [r]).astype(np.int64))
    return out


def select_for_gallery(extractor, features: np.ndarray, names: list[str], paths: list, classes: dict | None,
                       weights=None, whitening=(False, True), chains=None, max_pseudo: int = 600,
                       max_class_queries: int = 1000, seed: int = 0, log_fn=None) -> Choice:
    """The choice for one gallery: ``features`` as ``extractor`` made them (every member weighted
    > 0), ``paths`` the image files (for pseudo-queries), ``classes`` {name: class} or None
    (then every photo is its own class: ``tune --self``). 600 pseudo-queries: with 300, the
    whitening and weight choices on the dev sets were within the probe's noise."""
    cfg = extractor.config
    fixed = weights is not None and len(weights) == 1 and tuple(weights[0]) == tuple(cfg.member_weights)
    if fixed or len(cfg.member_weights) == 1:  # the rows as they are: whitening and re-ranking only
        dims, weights = [features.shape[1]], [(1.0,)]
    elif any(w <= 0 for w in cfg.member_weights):
        raise LookalikeError("choosing ensemble weights needs features of every member: extract with weights > 0, "
                             "or give --ensemble-weights to keep them")
    else:
        dims = extractor.member_dims()
    members = split_members(features, dims)
    labels = [classes.get(n, "") for n in names] if classes is not None else [f"#{i}" for i in range(len(names))]
    held, singles, n_multi, n_single = class_probe(labels, max_queries=max_class_queries, seed=seed)
    rng = np.random.default_rng(seed)
    rows = singles if len(singles) <= max_pseudo else np.sort(rng.choice(singles, max_pseudo, replace=False))
    self_members, targets = None, np.zeros(0, np.int64)
    if len(rows):
        images, targets = make_pseudo_queries(paths, rows, seed=seed)
        if len(images):
            self_members = split_members(extractor.embed_images(images), dims)
    probe = Probe(held, np.asarray(labels, dtype=object), self_members, targets, float(n_multi), float(n_single),
                  copies_of(l2n(features), targets) if len(targets) else None)
    if weights is None and len(members) > 1:
        weights = weight_grid(len(members))
    choice = choose(members, probe, self_members, weights=weights or [(1.0,)], whitening=whitening, chains=chains,
                    log_fn=log_fn, current=tuple(cfg.member_weights) if len(members) > 1 else None)
    if len(members) == 1:
        choice.weights = tuple(cfg.member_weights)
    return choice
