import numpy as np

import lookalike
from lookalike.sample import make_sample


def test_sample_and_python_api(tmp_path):
    info = make_sample(tmp_path / "demo", variants=1)
    assert info["gallery"] == 38 and info["queries"] == 19
    res = lookalike.run(tmp_path / "demo" / "gallery", tmp_path / "demo" / "queries", tmp_path / "r.csv", image_size=96)
    assert len(res.search.query_names) == 19 and res.search.indices.shape == (19, 10)
    m = lookalike.evaluate(tmp_path / "r.csv", tmp_path / "demo" / "labels.csv")
    assert m["queries"] == 19 and m["gallery_size"] == 38
    assert m["top1"] > 0.6  # the demo queries are crops/rotations of gallery photos
    # the search API on the cached index equals run's ranking
    s = lookalike.search(res.index_dir, queries=tmp_path / "demo" / "queries", k=10)
    assert np.array_equal(s.indices, res.search.indices)
