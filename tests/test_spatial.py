import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

from lookalike.errors import LookalikeError  # noqa: E402
from lookalike.spatial import (LocalFeatures, SpatialConfig, count_inliers, fuse, plausible,  # noqa: E402
                               rerank_with_inliers, spatial_rerank)

# a mild view change: rotation, scale, shear and a little perspective
VIEW = np.array([[0.95, -0.18, 30.0], [0.15, 0.9, 20.0], [2e-4, -1e-4, 1.0]])


def _texture(seed, size=(320, 240)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.NEAREST))  # blocky: many corners


def _save(tmp_path, name, arr) -> str:
    p = tmp_path / name
    Image.fromarray(arr).save(p)
    return str(p)


def _warp(arr, H=VIEW, size=(360, 300)) -> np.ndarray:
    return cv2.warpPerspective(arr, H, size, borderValue=(0, 0, 0))


@pytest.fixture
def scene(tmp_path):
    """query = a view of texture 1; gallery = textures 2, 3, 1 (the true match last)."""
    q = _save(tmp_path, "query.png", _warp(_texture(1)))
    gallery = [_save(tmp_path, f"g{i}.png", _texture(s)) for i, s in enumerate((2, 3, 1))]
    return q, gallery


@pytest.mark.parametrize("method", ["sift", "orb"])
def test_fused_ranking_puts_true_match_first(tmp_path, scene, method):
    q, gallery = scene
    cfg = SpatialConfig(method=method, n_features=1000 if method == "orb" else 500)
    scores = np.array([[0.62, 0.60, 0.55]], np.float32)
    s2, ids, inl = spatial_rerank([q], gallery, scores, np.array([[0, 1, 2]]), cfg, cache_dir=tmp_path / "cache")
    assert ids.tolist() == [[2, 0, 1]], (ids, inl)
    assert inl[0, 0] >= 30 and inl[0, 1] == 0 and inl[0, 2] == 0
    # fused, not replaced: global similarity + a bounded bonus; the unverified keep their scores
    assert s2[0, 0] == pytest.approx(0.55 + cfg.bonus) and s2[0, 1:].tolist() == pytest.approx([0.62, 0.60])


def test_nothing_verifies_keeps_order_and_scores(tmp_path):
    q = _save(tmp_path, "q.png", _texture(10))
    gallery = [_save(tmp_path, f"g{i}.png", _texture(20 + i)) for i in range(4)]
    scores = np.array([[0.9, 0.8, 0.8, 0.7, 0.1]], np.float32)  # ties stay in order too
    ids = np.array([[3, 1, 0, 2, -1]])  # -1: fewer results than k
    s2, i2, inl = spatial_rerank([q], gallery, scores, ids, SpatialConfig(top_n=5), cache_dir=tmp_path / "c")
    assert i2.tolist() == ids.tolist() and np.array_equal(s2, scores) and not inl.any()


def test_strong_global_match_is_not_pushed_down_by_a_weak_verified_one():
    cfg = SpatialConfig()
    scores = np.array([[0.95, 0.70, 0.69, 0.60]], np.float32)
    inliers = np.array([[0, cfg.min_inliers, 0, 500]])  # weak verification at 0.70, strong at 0.60
    s2, ids, inl = rerank_with_inliers(scores, np.array([[0, 1, 2, 3]]), inliers, cfg)
    # 0.95 stays first (beyond any bonus), the strong one rises to 0.60 + bonus, the weak one barely moves
    assert ids.tolist() == [[0, 3, 1, 2]] and inl.tolist() == [[0, 500, cfg.min_inliers, 0]]
    assert s2[0].tolist() == pytest.approx([0.95, 0.60 + cfg.bonus, 0.70 + cfg.bonus / (cfg.saturation - cfg.min_inliers + 1), 0.69])
    # the bonus grows with inliers and is bounded
    f = fuse(np.zeros(5), np.array([0, cfg.min_inliers - 1, cfg.min_inliers, cfg.saturation, 10 * cfg.saturation]), cfg)
    assert f[0] == f[1] == 0 and 0 < f[2] < f[3] == f[4] == pytest.approx(cfg.bonus)
    # past top_n nothing moves
    s3, ids3, _ = rerank_with_inliers(scores, np.array([[0, 1, 2, 3]]), inliers, SpatialConfig(top_n=2))
    assert ids3.tolist() == [[0, 1, 2, 3]] and s3[0, 3] == pytest.approx(0.60)


def test_degenerate_homographies_are_rejected():
    cfg = SpatialConfig()
    rng = np.random.default_rng(0)
    src = rng.uniform(20, 300, (40, 2)).astype(np.float32)

    def ok(H, s=src):
        d = cv2.perspectiveTransform(s[None].astype(np.float64), H)[0]
        return plausible(H, s, d, (320, 320), (320, 320), cfg)

    assert ok(VIEW) and ok(np.eye(3))
    assert not ok(np.diag([-1.0, 1.0, 1.0]) + np.array([[0, 0, 320], [0, 0, 0], [0, 0, 0]]))  # mirrored
    assert not ok(np.diag([20.0, 20.0, 1.0]))  # extreme zoom
    assert not ok(np.diag([0.02, 0.02, 1.0]))  # collapsed (near-singular): all on a blob
    assert not ok(np.array([[1.0, 8.0, 0], [0, 1.0, 0], [0, 0, 1.0]]))  # extreme shear
    assert not ok(np.array([[1.0, 0, 0], [0, 1.0, 0], [0.02, 0, 1.0]]))  # extreme perspective
    assert not ok(np.array([[1.0, 0, 0], [0, 1.0, 0], [-0.005, 0, 1.0]]))  # crosses the horizon
    line = np.stack([np.linspace(20, 300, 40), np.linspace(40, 200, 40)], 1).astype(np.float32)
    assert not ok(np.eye(3), line)  # inliers on a line
    assert not plausible(None, src, src, (320, 320), (320, 320), cfg)
    assert not plausible(np.full((3, 3), np.nan), src, src, (320, 320), (320, 320), cfg)


def test_flipped_gallery_image_verifies_only_through_the_mirrored_query(tmp_path):
    tex = _texture(5)
    q = _save(tmp_path, "q.png", _warp(tex))
    flipped = _save(tmp_path, "flipped.png", np.ascontiguousarray(tex[:, ::-1]))
    for method in ("sift", "orb"):
        on = SpatialConfig(method=method, n_features=1000 if method == "orb" else 500)
        lf = LocalFeatures(on)
        assert count_inliers(lf.get(q), lf.get(flipped), SpatialConfig(method=method, mirror=False)) == 0
        got = spatial_rerank([q], [flipped], np.array([[0.5]]), np.array([[0]]), on, features=lf)[2]
        assert got[0, 0] >= 30, (method, got)


def test_local_features_are_cached_and_reused(tmp_path):
    img = _save(tmp_path, "a.png", _texture(7))
    cfg = SpatialConfig()
    lf = LocalFeatures(cfg, cache_dir=tmp_path / "cache")
    a = lf.get(img)
    assert lf.computed == 1 and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    assert lf.get(img) is a and lf.computed == 1  # in memory
    lf2 = LocalFeatures(cfg, cache_dir=tmp_path / "cache")
    b = lf2.get(img)
    assert lf2.computed == 0 and np.array_equal(a.xy, b.xy) and np.array_equal(a.desc, b.desc) and a.size == b.size
    lf2.get(img, mirrored=True)  # SIFT mirror: permuted from the cached features, no detection
    assert lf2.computed == 0
    # another configuration, or a changed file, is not served stale features
    assert LocalFeatures(SpatialConfig(max_side=200), cache_dir=tmp_path / "cache").get(img).size == (200, 150)
    Image.fromarray(_texture(8)).save(img)
    lf3 = LocalFeatures(cfg, cache_dir=tmp_path / "cache")
    c = lf3.get(img)
    assert lf3.computed == 1 and not np.array_equal(a.xy, c.xy)
    # the in-memory cache is bounded
    small = LocalFeatures(cfg, memory_items=2)
    for s in range(4):
        small.get(_save(tmp_path, f"m{s}.png", _texture(30 + s)))
    assert len(small.memory) == 2


def test_unreadable_or_missing_image_gives_zero(tmp_path):
    (tmp_path / "bad.jpg").write_text("nope")
    ok = _save(tmp_path, "ok.png", _texture(3))
    cfg = SpatialConfig()
    lf = LocalFeatures(cfg)
    assert count_inliers(lf.get(tmp_path / "bad.jpg"), lf.get(ok), cfg) == 0
    assert count_inliers(lf.get(tmp_path / "missing.png"), lf.get(ok), cfg) == 0


def test_config_is_validated():
    with pytest.raises(LookalikeError):
        SpatialConfig(method="surf")
    with pytest.raises(LookalikeError):
        SpatialConfig(min_inliers=20, saturation=10)
