"""The Ray engine (local mode) writes the same store as the local engine, and resumes per chunk."""
import os

import numpy as np
import pytest

from conftest import make_set
from lookalike.extract import ExtractConfig, Extractor
from lookalike.store import read_store

ray = pytest.importorskip("ray") if not os.environ.get("LOOKALIKE_REQUIRE_RAY") else __import__("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayimgs")
    make_set(root / "imgs" / "sub", n_classes=3, per_class=3, prefix="a")
    make_set(root / "imgs", n_classes=2, per_class=2, prefix="b", size=(120, 64))  # another aspect bucket
    (root / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_ray_engine_matches_local(ray_local, images, tmp_path):
    base = dict(image_size=64, chunk_size=4, batch_size=3)
    Extractor(ExtractConfig(**base)).extract(images / "imgs", tmp_path / "local.h5", progress=False)
    dist = Extractor(ExtractConfig(engine="ray", ray_actors=2, threads=1, **base)).extract(
        images / "imgs", tmp_path / "ray.h5", progress=False)
    a, b = read_store(tmp_path / "local.h5"), read_store(tmp_path / "ray.h5")
    assert b.names == a.names and len(a.names) == 13
    assert a.skipped == b.skipped and [n for n, _ in b.skipped] == ["broken.jpg"]
    assert np.abs(a.features - b.features).max() < 1e-5
    assert a.fingerprint == b.fingerprint and dist.n_extracted == 13
    assert '"executor": "local"' in b.attrs["config"]  # queries against this store are embedded locally


def test_ray_engine_resumes_per_chunk(ray_local, images, tmp_path):
    cfg = ExtractConfig(engine="ray", ray_actors=1, threads=1, image_size=64, chunk_size=4)
    ex = Extractor(cfg)
    # an interrupted run left its first finished chunk in the .parts folder
    ref = Extractor(ExtractConfig(image_size=64, chunk_size=4)).extract(images / "imgs", None, progress=False)
    parts = tmp_path / "out.h5.parts"
    parts.mkdir()
    (parts / "meta.json").write_text('{"fingerprint": "%s"}' % cfg.fingerprint())
    from lookalike.data import file_signature

    ex._write_part(parts / "part-000000.npz", ref.names[:4], ref.features[:4],
                   [file_signature(images / "imgs" / n) for n in ref.names[:4]])
    res = ex.extract(images / "imgs", tmp_path / "out.h5", progress=False)
    assert res.n_reused == 4 and res.n_extracted == 9
    out = read_store(tmp_path / "out.h5")
    assert out.names == ref.names and np.abs(out.features - ref.features).max() < 1e-5
    assert not parts.exists()
