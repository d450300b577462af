"""Spatial verification: re-rank the top-N with local features matched and checked by RANSAC.

For instance-level galleries (packaged products, book covers, paintings) a global descriptor
confuses near-identical packages (two flavours of one brand); local features with geometric
verification tell them apart. OpenCV does the work (SIFT or ORB, brute-force matching with Lowe's
ratio test, ``findHomography`` with RANSAC); this module only caches keypoints per image and
re-orders the candidates: verified ones (≥ ``min_inliers``) first by inlier count, then the rest in
their original order. Needs the optional extra ``pip install 'lookalike[spatial]'``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import BadImage, load_image
from .errors import LookalikeError


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
    max_side: int = 512  # images are decoded at most this large for local features
    n_features: int = 1000
    ratio: float = 0.8  # Lowe's ratio test
    min_inliers: int = 12
    ransac_threshold: float = 8.0  # pixels, at max_side

    def __post_init__(self):
        if self.method not in ("sift", "orb"):
            raise LookalikeError(f"unknown local feature method {self.method!r}; use sift or orb")


class LocalFeatures:
    """Keypoints + descriptors per image, computed once and cached on disk (npz per image)."""

    def __init__(self, config: SpatialConfig | None = None, cache_dir=None):
        self.config = config or SpatialConfig()
        self.cache_dir = Path(cache_dir) if cache_dir else None
        cv2 = _cv2()
        c = self.config
        self.detector = cv2.SIFT_create(nfeatures=c.n_features) if c.method == "sift" else cv2.ORB_create(nfeatures=c.n_features)
        self.memory: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _key(self, path: Path) -> str:
        st = path.stat()
        c = self.config
        raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{c.method}|{c.max_side}|{c.n_features}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]

    def get(self, path) -> tuple[np.ndarray, np.ndarray]:
        path = Path(path)
        key = self._key(path)
        if key in self.memory:
            return self.memory[key]
        cached = self.cache_dir / f"{key}.npz" if self.cache_dir else None
        if cached is not None and cached.exists():
            with np.load(cached) as z:
                out = (z["xy"], z["desc"])
        else:
            out = self._compute(path)
            if cached is not None:
                from ._io import atomic_path

                with atomic_path(cached, suffix=".npz") as tmp, open(tmp, "wb") as f:
                    np.savez(f, xy=out[0], desc=out[1])
        self.memory[key] = out
        return out

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        """No keypoints (unreadable or featureless image): matches nothing."""
        orb = self.config.method == "orb"
        return np.zeros((0, 2), np.float32), np.zeros((0, 32 if orb else 128), np.uint8 if orb else np.float32)

    def _compute(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        cv2 = _cv2()
        c = self.config
        try:
            img = load_image(path, min_side=c.max_side)
        except BadImage:
            return self._empty()
        f = min(1.0, c.max_side / max(img.size))
        if f < 1:
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))))
        gray = cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2GRAY)
        kps, desc = self.detector.detectAndCompute(gray, None)
        if desc is None or not kps:
            return self._empty()
        return np.array([k.pt for k in kps], np.float32), desc


def count_inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], config: SpatialConfig) -> int:
    """RANSAC-verified matches between two images' local features (0 if fewer than 4 matches)."""
    cv2 = _cv2()
    (xa, da), (xb, db) = a, b
    if len(da) < 2 or len(db) < 2:
        return 0
    norm = cv2.NORM_HAMMING if config.method == "orb" else cv2.NORM_L2
    matcher = cv2.BFMatcher(norm)
    pairs = matcher.knnMatch(da, db, k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < config.ratio * n.distance]
    if len(good) < 4:
        return 0
    src = xa[[m.queryIdx for m in good]]
    dst = xb[[m.trainIdx for m in good]]
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, config.ransac_threshold)
    return int(mask.sum()) if mask is not None else 0


def spatial_rerank(query_paths, gallery_paths, scores: np.ndarray, ids: np.ndarray, config: SpatialConfig | None = None,
                   cache_dir=None, features: LocalFeatures | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-order each query's first ``top_n`` results by verified inliers.

    Returns ``(scores, ids, inliers)``; scores of verified results become ``1 + inliers`` (so they sort
    above every cosine score), the others keep theirs.
    """
    config = config or SpatialConfig()
    lf = features or LocalFeatures(config, cache_dir)
    scores = np.array(scores, dtype=np.float32, copy=True)
    ids = np.array(ids, copy=True)
    inl = np.zeros(ids.shape, np.int32)
    n = min(config.top_n, ids.shape[1])
    for qi, qp in enumerate(query_paths):
        qf = lf.get(qp)
        counts = np.array([count_inliers(qf, lf.get(gallery_paths[j]), config) if j >= 0 else 0 for j in ids[qi, :n]])
        verified = counts >= config.min_inliers
        order = np.concatenate([np.flatnonzero(verified)[np.argsort(-counts[verified], kind="stable")],
                                np.flatnonzero(~verified)])
        new_scores = np.where(verified, 1.0 + counts, scores[qi, :n])
        ids[qi, :n] = ids[qi, :n][order]
        scores[qi, :n] = new_scores[order]
        inl[qi, :n] = counts[order]
    return scores, ids, inl


def default_cache_dir() -> Path:
    from .extract import cache_dir

    return cache_dir() / "local-features"

