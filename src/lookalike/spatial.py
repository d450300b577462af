"""Spatial verification: add geometrically verified local-feature evidence to the top-N scores.

For instance-level galleries (packaged products, book covers, paintings) a global descriptor
confuses near-identical packages (two flavours of one brand); local features with geometric
verification tell them apart. OpenCV does the detection (SIFT or ORB) and the robust fit
(``findHomography`` with USAC MAGSAC++); matching is one matrix product per candidate pair on
descriptors cached per image (RootSIFT, or ORB bits as ±1), with Lowe's ratio test and one-to-one
matches. A fit counts only if the homography is plausible (orientation kept, bounded scale,
anisotropy and perspective, inliers spread over an area in both images); the horizontally mirrored
query is tried too (for SIFT by permuting the descriptor bins, no second detection).

Scores are *fused*, never replaced: a candidate with ``inliers >= min_inliers`` gets
``cosine + bonus * min(1, (inliers - min_inliers + 1) / (saturation - min_inliers + 1))``, the
others keep their cosine, and the top-N are re-sorted by the fused score. So unverified candidates
keep their relative order, and a verified one overtakes only those whose global similarity is less
than ``bonus`` above its own. Needs the optional extra ``pip install 'lookalike[spatial]'``.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .data import BadImage, load_image
from .errors import LookalikeError

METHODS = ("sift", "orb")
_FORMAT = 2  # cache file layout version (part of the cache key)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise LookalikeError("spatial verification needs OpenCV: pip install 'lookalike[spatial]'") from None
    return cv2


@dataclass
class SpatialConfig:
    method: str = "sift"  # sift | orb
    top_n: int = 20  # candidates verified per query
    max_side: int = 256  # images are decoded at most this large for local features
    n_features: int = 500
    ratio: float = 0.85  # Lowe's ratio test
    min_inliers: int = 10  # verified from this many (unique) inliers on
    ransac_threshold: float = 6.0  # pixels at max_side (MAGSAC++ maximum sigma)
    bonus: float = 0.3  # added to the global similarity at saturation
    saturation: int = 40  # inliers that earn the full bonus
    mirror: bool = True  # also try the horizontally flipped query
    max_scale: float = 8.0  # plausible homography: local scale change within [1/max_scale, max_scale]
    max_anisotropy: float = 6.0  # ratio of the local Jacobian's singular values
    max_perspective: float = 4.0  # ratio of the homography's denominators over the inliers' box
    min_spread: float = 0.03  # inliers' spread (sqrt of the smaller covariance eigenvalue) / image side

    def __post_init__(self):
        if self.method not in METHODS:
            raise LookalikeError(f"unknown local feature method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.min_inliers < 4 or self.saturation < self.min_inliers:
            raise LookalikeError("spatial: need 4 <= min_inliers <= saturation")
        if self.bonus < 0:
            raise LookalikeError("spatial: bonus must be >= 0")


class Features(NamedTuple):
    """Local features of one image at ``max_side``: keypoint xy (n, 2), matching-ready descriptors
    (n, d) float32 with unit rows, image size (width, height)."""

    xy: np.ndarray
    desc: np.ndarray
    size: tuple[int, int]


def _prepare(desc: np.ndarray, method: str) -> np.ndarray:
    """Raw descriptors -> unit rows whose dot product ranks like the descriptor distance."""
    if len(desc) == 0:
        return np.zeros((0, 256 if method == "orb" else 128), np.float32)
    if method == "orb":  # Hamming distance = (256 - 256 * dot) / 2
        bits = np.unpackbits(desc, axis=1).astype(np.float32)
        return (bits * 2 - 1) / 16.0
    d = desc.astype(np.float32)  # RootSIFT: L1-normalise, square root (already unit L2)
    return np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-12))


def _mirror_sift(desc: np.ndarray) -> np.ndarray:
    """Descriptors of the horizontally flipped image: in each keypoint's own frame a mirror flips
    the rows of the 4x4 spatial grid and negates the gradient orientation (bin o -> -o mod 8)."""
    return desc.reshape(-1, 4, 4, 8)[:, ::-1][:, :, :, (-np.arange(8)) % 8].reshape(len(desc), 128)


class LocalFeatures:
    """Keypoints + descriptors per image, computed once and cached on disk (npz per image) and in
    memory (the ``memory_items`` most recently used images)."""

    def __init__(self, config: SpatialConfig | None = None, cache_dir=None, memory_items: int = 512):
        self.config = config or SpatialConfig()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        cv2 = _cv2()
        c = self.config
        self.detector = cv2.SIFT_create(nfeatures=c.n_features) if c.method == "sift" else cv2.ORB_create(nfeatures=c.n_features)
        self.memory: OrderedDict[str, Features] = OrderedDict()
        self.memory_items = memory_items
        self.computed = 0  # images whose features were computed (not read from a cache)

    def _key(self, path: Path, mirrored: bool = False) -> str:
        st = path.stat()
        c = self.config
        raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{c.method}|{c.max_side}|{c.n_features}|v{_FORMAT}|{int(mirrored)}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def get(self, path, mirrored: bool = False) -> Features:
        """Features of an image (of its horizontal mirror with ``mirrored``)."""
        path = Path(path)
        if mirrored and self.config.method == "sift":  # no second detection: permute the bins
            f = self.get(path)
            xy = f.xy.copy()
            xy[:, 0] = f.size[0] - 1 - xy[:, 0]
            return Features(xy, np.ascontiguousarray(_mirror_sift(f.desc)), f.size)
        try:
            key = self._key(path, mirrored)
        except OSError:
            return self._empty()
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        cached = self.cache_dir / f"{key}.npz" if self.cache_dir else None
        raw = None
        if cached is not None and cached.exists():
            try:
                with np.load(cached) as z:
                    raw = z["xy"], z["desc"], tuple(int(v) for v in z["size"])
            except (OSError, ValueError, KeyError):
                raw = None  # a damaged cache file is recomputed
        if raw is None:
            raw = self._compute(path, mirrored)
            self.computed += 1
            if cached is not None:
                from ._io import atomic_path

                with atomic_path(cached, suffix=".npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, xy=raw[0], desc=raw[1], size=np.array(raw[2]))
        out = Features(raw[0], _prepare(raw[1], self.config.method), raw[2])
        self.memory[key] = out
        if len(self.memory) > self.memory_items:
            self.memory.popitem(last=False)
        return out

    def _empty(self) -> Features:
        """No keypoints (unreadable or featureless image): matches nothing."""
        return Features(np.zeros((0, 2), np.float32), _prepare(np.zeros((0, 0), np.uint8), self.config.method), (1, 1))

    def _compute(self, path: Path, mirrored: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        cv2 = _cv2()
        c = self.config
        nbytes = 32 if c.method == "orb" else 128
        empty = np.zeros((0, 2), np.float32), np.zeros((0, nbytes), np.uint8), (1, 1)
        try:
            img = load_image(path, min_side=c.max_side)
        except BadImage:
            return empty
        f = min(1.0, c.max_side / max(img.size))
        if f < 1:
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))))
        gray = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2GRAY)
        if mirrored:
            gray = np.ascontiguousarray(gray[:, ::-1])
        kps, desc = self.detector.detectAndCompute(gray, None)
        if desc is None or not kps:
            return empty[0], empty[1], img.size
        # SIFT descriptors are integers in 0..255 stored as float: keep them as bytes (4x smaller)
        return np.array([k.pt for k in kps], np.float32), np.clip(desc, 0, 255).astype(np.uint8), img.size


def _tentative(q: Features, g: Features, config: SpatialConfig) -> tuple[np.ndarray, np.ndarray]:
    """Ratio-test, one-to-one matches (query rows, gallery rows)."""
    none = np.zeros(0, np.intp), np.zeros(0, np.intp)
    if len(q.desc) < 2 or len(g.desc) < 2:
        return none
    sim = q.desc @ g.desc.T
    best = sim.argmax(1)
    rows = np.arange(len(sim))
    s1 = sim[rows, best]
    sim[rows, best] = -np.inf
    s2 = sim.max(1)
    if config.method == "orb":
        d1, d2 = 1 - s1, 1 - s2
    else:
        d1, d2 = np.sqrt(np.maximum(2 - 2 * s1, 0)), np.sqrt(np.maximum(2 - 2 * s2, 0))
    ok = np.flatnonzero(d1 < config.ratio * d2)
    if len(ok) < config.min_inliers:
        return none
    # one-to-one: a gallery keypoint keeps only its closest query keypoint
    order = ok[np.argsort(d1[ok], kind="stable")]
    _, first = np.unique(best[order], return_index=True)
    keep = order[first]
    return keep, best[keep]


def plausible(H: np.ndarray | None, src: np.ndarray, dst: np.ndarray, qsize, gsize, config: SpatialConfig) -> bool:
    """Whether a homography (query xy -> gallery xy) fitted to inliers ``src``/``dst`` describes a
    real view change: finite, orientation-preserving, bounded scale / anisotropy / perspective over
    the inliers, and inliers spread over an area (not a line or a blob) in both images."""
    if H is None or not np.all(np.isfinite(H)) or len(src) < 4:
        return False
    H = H / H[2, 2] if abs(H[2, 2]) > 1e-12 else H
    # spread of the inliers in both images, relative to the image size
    for pts, size in ((src, qsize), (dst, gsize)):
        ev = np.linalg.eigvalsh(np.cov(pts.T.astype(np.float64)))
        if np.sqrt(max(ev[0], 0.0)) < config.min_spread * max(size):
            return False
    # perspective: the projective denominator must keep one sign and vary boundedly over the box
    lo, hi = src.min(0), src.max(0)
    corners = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]], np.float64)
    w = corners @ H[2, :2] + H[2, 2]
    if np.any(w <= 0) or w.max() / w.min() > config.max_perspective:
        return False
    # local Jacobian at the inliers' centroid: orientation kept, bounded scale and shear
    x, y = src.mean(0)
    wc = H[2, 0] * x + H[2, 1] * y + H[2, 2]
    u = (H[0, 0] * x + H[0, 1] * y + H[0, 2]) / wc
    v = (H[1, 0] * x + H[1, 1] * y + H[1, 2]) / wc
    J = np.array([[H[0, 0] - u * H[2, 0], H[0, 1] - u * H[2, 1]],
                  [H[1, 0] - v * H[2, 0], H[1, 1] - v * H[2, 1]]]) / wc
    det = np.linalg.det(J)
    if det <= 0:
        return False
    scale = np.sqrt(abs(det))
    if not (1 / config.max_scale <= scale <= config.max_scale):
        return False
    sv = np.linalg.svd(J, compute_uv=False)
    return bool(sv[0] / max(sv[1], 1e-12) <= config.max_anisotropy)


def _verify_one(q: Features, g: Features, config: SpatialConfig) -> int:
    cv2 = _cv2()
    qi, gi = _tentative(q, g, config)
    if len(qi) < config.min_inliers:  # cannot verify: skip the robust fit
        return 0
    src, dst = q.xy[qi], g.xy[gi]
    H, mask = cv2.findHomography(src, dst, cv2.USAC_MAGSAC, config.ransac_threshold, maxIters=1000, confidence=0.999)
    if H is None or mask is None:
        return 0
    m = mask.ravel().astype(bool)
    # unique inliers: duplicate keypoints (same spot, several orientations) count once
    n = min(len(np.unique(np.round(src[m]), axis=0)), len(np.unique(np.round(dst[m]), axis=0)))
    if n < config.min_inliers or not plausible(H, src[m], dst[m], q.size, g.size, config):
        return 0
    return int(n)


def verify(query: Features | tuple, gallery: Features | tuple, config: SpatialConfig,
           mirrored: Features | None = None) -> int:
    """Plausible-homography inliers between two images' local features (0 when not verified);
    with ``mirrored`` (the query's mirror features) the better of the two views."""
    query, gallery = _as_features(query, config), _as_features(gallery, config)
    n = _verify_one(query, gallery, config)
    if mirrored is not None:
        n = max(n, _verify_one(mirrored, gallery, config))
    return n


def count_inliers(a, b, config: SpatialConfig) -> int:
    """Verified inliers between two images' features (mirror included when ``config.mirror``);
    kept for callers of the previous API."""
    a, b = _as_features(a, config), _as_features(b, config)
    m = None
    if config.mirror and config.method == "sift" and len(a.desc):
        xy = a.xy.copy()
        xy[:, 0] = a.size[0] - 1 - xy[:, 0]
        m = Features(xy, np.ascontiguousarray(_mirror_sift(a.desc)), a.size)
    return verify(a, b, config, m)


def _as_features(f, config: SpatialConfig) -> Features:
    if isinstance(f, Features):
        return f
    xy, desc = f[0], f[1]
    size = tuple(f[2]) if len(f) > 2 else (int(xy[:, 0].max(initial=0)) + 1, int(xy[:, 1].max(initial=0)) + 1)
    if desc.dtype != np.float32 or (len(desc) and abs(float(np.linalg.norm(desc[0])) - 1) > 1e-3):
        desc = _prepare(desc, config.method)
    return Features(xy, desc, size)


def fuse(scores: np.ndarray, inliers: np.ndarray, config: SpatialConfig) -> np.ndarray:
    """Global similarity + a bonus growing linearly with verified inliers up to ``saturation``;
    unverified candidates (fewer than ``min_inliers``) keep their score."""
    inl = np.asarray(inliers)
    g = np.clip((inl - config.min_inliers + 1) / (config.saturation - config.min_inliers + 1), 0, 1)
    return np.asarray(scores, np.float32) + np.float32(config.bonus) * np.where(inl >= config.min_inliers, g, 0).astype(np.float32)


def rerank_with_inliers(scores: np.ndarray, ids: np.ndarray, inliers: np.ndarray, config: SpatialConfig
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-sort each row's first ``top_n`` by the fused score (stable: ties and unverified keep
    their order). ``inliers`` has the shape of ``ids`` (zeros past ``top_n``)."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    ids = np.array(ids, copy=True)
    inl = np.array(inliers, np.int32, copy=True)
    n = min(config.top_n, ids.shape[1])
    fused = fuse(scores[:, :n], inl[:, :n], config)
    order = np.argsort(-fused, axis=1, kind="stable")
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    ids[:, :n], scores[:, :n], inl[:, :n] = take(ids[:, :n]), take(fused), take(inl[:, :n])
    return scores, ids, inl


def verify_candidates(query_path, gallery_paths, row_ids, config: SpatialConfig, features: LocalFeatures) -> np.ndarray:
    """Verified inliers of one query against the gallery rows ``row_ids`` (-1 = none: 0)."""
    q = features.get(query_path)
    qm = features.get(query_path, mirrored=True) if config.mirror and len(q.desc) else None
    out = np.zeros(len(row_ids), np.int32)
    if len(q.desc) < config.min_inliers:
        return out
    for k, j in enumerate(row_ids):
        if j >= 0:
            out[k] = verify(q, features.get(gallery_paths[j]), config, qm)
    return out


def spatial_rerank(query_paths, gallery_paths, scores: np.ndarray, ids: np.ndarray, config: SpatialConfig | None = None,
                   cache_dir=None, features: LocalFeatures | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verify each query's first ``top_n`` results and re-sort them by the fused score.

    Returns ``(scores, ids, inliers)``: fused scores (the global similarity, plus the bonus for
    verified candidates), the re-ordered ids and each result's verified inlier count (0 = not
    verified); results past ``top_n`` are unchanged.
    """
    config = config or SpatialConfig()
    lf = features or LocalFeatures(config, cache_dir)
    ids = np.asarray(ids)
    inl = np.zeros(ids.shape, np.int32)
    n = min(config.top_n, ids.shape[1])
    for qi, qp in enumerate(query_paths):
        inl[qi, :n] = verify_candidates(qp, gallery_paths, ids[qi, :n], config, lf)
    return rerank_with_inliers(scores, ids, inl, config)


def default_cache_dir() -> Path:
    from .paths import cache_dir

    return cache_dir() / "local-features"


def spatial_rerank_collection(col, query_source, query_names, scores: np.ndarray, ids: np.ndarray, spatial,
                              cache_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`spatial_rerank` of search results against a collection's gallery images; ``spatial``:
    a :class:`SpatialConfig` or a dict of its fields."""
    from .data import list_images

    cfg = spatial if isinstance(spatial, SpatialConfig) else SpatialConfig(**(spatial if isinstance(spatial, dict) else {}))
    if col.image_root is None:
        raise LookalikeError("spatial verification needs the image files: search with --queries and an index built "
                             "by `run` or with `lookalike index --image-root GALLERY_DIR`")
    qpath = {e.name: e.path for e in list_images(query_source)}
    s2, i2, _ = spatial_rerank([qpath[n] for n in query_names], col.row_paths(), scores, ids, cfg,
                               cache_dir=cache_dir or default_cache_dir())
    return s2, i2
