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
    # a service's changes to run's cached collection are neither applied to a rerun nor thrown away
    from lookalike.collection import Collection

    col = Collection.open(res.index_dir)
    gone = col.names[int(res.search.indices[0, 0])]
    col.remove([gone], record=True)
    col.add(["served.jpg"], np.asarray(s.extract.features[:1]), record=True, files={"served.jpg": b"x"})
    again = lookalike.run(tmp_path / "demo" / "gallery", tmp_path / "demo" / "queries", tmp_path / "r2.csv", image_size=96)
    assert np.array_equal(again.search.indices, res.search.indices)
    assert (tmp_path / "r.csv").read_bytes() == (tmp_path / "r2.csv").read_bytes()
    kept = Collection.open(res.index_dir)
    assert gone not in kept.live_names() and "served.jpg" in kept.live_names()


def test_run_never_reuses_an_index_built_from_other_rows(tmp_path):
    """Another run (another factory) refreshes the shared gallery store after a photo changed: the
    first run's cached index must not be reused with its old vectors."""
    import shutil

    make_sample(tmp_path / "demo", variants=1)
    g, q = tmp_path / "demo" / "gallery", tmp_path / "demo" / "queries"
    kw = dict(image_size=64, model="lite0", select="off", k=2)
    lookalike.run(g, q, tmp_path / "a.csv", **kw)
    a, b = g / "astronaut.jpg", g / "coffee.jpg"
    shutil.move(a, tmp_path / "x.jpg")
    shutil.move(b, a)
    shutil.move(tmp_path / "x.jpg", b)
    lookalike.run(g, q, tmp_path / "b.csv", factory="HNSW32", **kw)  # re-extracts the two photos into the store
    again = lookalike.run(g, q, tmp_path / "a2.csv", **kw)  # nothing new to extract
    fresh = lookalike.run(g, q, tmp_path / "fresh.csv", workdir=tmp_path / "fresh-work", **kw)
    assert again.gallery.n_extracted == 0
    assert (tmp_path / "a2.csv").read_text() == (tmp_path / "fresh.csv").read_text()
