import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")

from lookalike.spatial import LocalFeatures, SpatialConfig, count_inliers, spatial_rerank  # noqa: E402


def _texture(seed, size=(320, 240)):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.NEAREST)  # blocky: many corners


@pytest.mark.parametrize("method", ["sift", "orb"])
def test_verification_separates_same_object_from_other(tmp_path, method):
    a = _texture(1)
    a.save(tmp_path / "a.png")
    a.rotate(10, expand=True, fillcolor=(0, 0, 0)).resize((300, 260)).save(tmp_path / "a_view.png")
    _texture(2).save(tmp_path / "b.png")
    cfg = SpatialConfig(method=method)
    lf = LocalFeatures(cfg, cache_dir=tmp_path / "cache")
    same = count_inliers(lf.get(tmp_path / "a_view.png"), lf.get(tmp_path / "a.png"), cfg)
    other = count_inliers(lf.get(tmp_path / "a_view.png"), lf.get(tmp_path / "b.png"), cfg)
    assert same >= 30 and other < cfg.min_inliers, (same, other)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # cached per image
    # re-ranking puts the verified image first
    scores, ids, inl = spatial_rerank([tmp_path / "a_view.png"], [tmp_path / "b.png", tmp_path / "a.png"],
                                      np.array([[0.9, 0.8]]), np.array([[0, 1]]), cfg, features=lf)
    assert ids.tolist() == [[1, 0]] and inl[0, 0] == same and scores[0, 0] > 1


def test_unreadable_image_gives_zero(tmp_path):
    (tmp_path / "bad.jpg").write_text("nope")
    _texture(3).save(tmp_path / "ok.png")
    cfg = SpatialConfig()
    lf = LocalFeatures(cfg)
    assert count_inliers(lf.get(tmp_path / "bad.jpg"), lf.get(tmp_path / "ok.png"), cfg) == 0
