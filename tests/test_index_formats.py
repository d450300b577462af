import json

import numpy as np
import pytest

from lookalike import LookalikeError
from lookalike.formats import (format_for_path, read_labels, read_results, write_per_query_csv, write_results,
                               write_skipped_csv)
from lookalike.index import build_index, load_collection
from lookalike.store import FeatureStore, read_store, write_store


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_index_matches_brute_force(tmp_path):
    rng = np.random.default_rng(0)
    g, q = _unit(rng, 500, 32), _unit(rng, 40, 32)
    names = [f"g{i}.jpg" for i in range(500)]
    write_store(tmp_path / "g.h5", names, g, {"fingerprint": "f", "model_id": "m", "config": "{}"})
    col = build_index(tmp_path / "g.h5", tmp_path / "idx")
    col = load_collection(tmp_path / "idx")
    scores, idx = col.search(q, 10)
    sims = q @ g.T
    ref = np.argsort(-sims, axis=1)[:, :10]
    assert np.array_equal(idx, ref)
    assert np.allclose(scores, np.take_along_axis(sims, ref, 1), atol=1e-5)
    assert col.names == names and col.manifest["model_id"] == "m"
    with pytest.raises(LookalikeError, match="dimension"):
        col.check_queries(_unit(rng, 3, 16), "m")
    with pytest.raises(LookalikeError, match="another model"):
        col.check_queries(q, "other")
    with pytest.raises(LookalikeError, match="larger than the gallery"):
        col.search(q, 501)
    # rebuilding over an existing index replaces it in one rename
    build_index(FeatureStore(names[:10], g[:10], {"model_id": "m"}), tmp_path / "idx")
    assert len(load_collection(tmp_path / "idx")) == 10
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")) == [".idx.lock", ".idx.swap"]  # locks only


def test_other_factories_and_bad_factory(tmp_path):
    rng = np.random.default_rng(1)
    g = _unit(rng, 2000, 16)
    st = FeatureStore([str(i) for i in range(2000)], g, {})
    col = build_index(st, None, __import__("lookalike.index").index.IndexConfig(factory="HNSW16"))
    _, idx = col.search(g[:50], 1)
    assert (idx[:, 0] == np.arange(50)).mean() > 0.95
    with pytest.raises(LookalikeError, match="invalid faiss factory"):
        build_index(st, None, __import__("lookalike.index").index.IndexConfig(factory="Nonsense42"))


def test_store_roundtrip_unicode(tmp_path):
    names = ["ü/ñ 1.jpg", "日本.png"]
    x = np.eye(2, 4, dtype=np.float32)
    write_store(tmp_path / "s.h5", names, x, {"fingerprint": "abc"}, skipped=[("bad.jpg", "empty file")])
    st = read_store(tmp_path / "s.h5")
    assert st.names == names and np.array_equal(st.features, x) and st.fingerprint == "abc"
    assert st.skipped == [("bad.jpg", "empty file")]
    (tmp_path / "junk.h5").write_text("nope")
    with pytest.raises(LookalikeError, match="not a readable HDF5"):
        read_store(tmp_path / "junk.h5")


@pytest.mark.parametrize("fmt", ["digix", "naic", "csv"])
def test_results_roundtrip(tmp_path, fmt):
    q = ["q1.jpg", "q2.jpg"]
    g = ["a.jpg", "b.jpg", "c.jpg"]
    idx = np.array([[2, 0, 1], [1, 2, 0]])
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]], np.float32)
    p = tmp_path / f"r.{fmt}"
    write_results(p, fmt, q, g, scores, idx)
    assert read_results(p) == {"q1.jpg": ["c.jpg", "a.jpg", "b.jpg"], "q2.jpg": ["b.jpg", "c.jpg", "a.jpg"]}
    if fmt == "digix":
        assert p.read_text() == "q1.jpg,{c.jpg,a.jpg,b.jpg}\nq2.jpg,{b.jpg,c.jpg,a.jpg}\n"
    if fmt == "naic":
        assert json.loads(p.read_text(encoding="utf-8"))["q2.jpg"] == ["b.jpg", "c.jpg", "a.jpg"]
        assert p.read_text() == '{"q1.jpg": ["c.jpg", "a.jpg", "b.jpg"], "q2.jpg": ["b.jpg", "c.jpg", "a.jpg"]}\n'
    if fmt == "csv":
        assert p.read_text() == ("query,rank,gallery,score\nq1.jpg,1,c.jpg,0.900000\nq1.jpg,2,a.jpg,0.500000\n"
                                 "q1.jpg,3,b.jpg,0.100000\nq2.jpg,1,b.jpg,0.800000\nq2.jpg,2,c.jpg,0.700000\n"
                                 "q2.jpg,3,a.jpg,0.200000\n")


def test_results_bytes_unicode_and_missing_neighbours(tmp_path):
    """Names are written as UTF-8 as they are, -1 (no neighbour) is dropped; the suffix picks the format."""
    idx, scores = np.array([[1, -1]]), np.array([[0.5, 0.0]], np.float32)
    for name, text in [("r.csv", "ü.jpg,{日本.png}\n"), ("r.JSON", '{"ü.jpg": ["日本.png"]}\n'), ("r.txt", "ü.jpg,{日本.png}\n")]:
        write_results(tmp_path / name, format_for_path(tmp_path / name, None), ["ü.jpg"], ["a.jpg", "日本.png"], scores, idx)
        assert (tmp_path / name).read_bytes() == text.encode("utf-8")
        assert read_results(tmp_path / name) == {"ü.jpg": ["日本.png"]}
    write_results(tmp_path / "r.json", format_for_path(tmp_path / "r.json", "csv"), ["q"], ["a", "b"], scores, idx)
    assert (tmp_path / "r.json").read_text() == "query,rank,gallery,score\nq,1,b,0.500000\n"
    with pytest.raises(LookalikeError, match="unknown format 'xml'; use one of digix, naic, csv"):
        format_for_path(tmp_path / "r.csv", "xml")


def test_skipped_and_per_query_csv_bytes(tmp_path):
    write_skipped_csv(tmp_path / "s1.csv", [("a,b.jpg", "empty file"), ("c.jpg", 'bad "x"')])
    assert (tmp_path / "s1.csv").read_text() == 'image,reason\n"a,b.jpg",empty file\nc.jpg,"bad ""x"""\n'
    write_skipped_csv(tmp_path / "s2.csv", {"gallery": [("ü.jpg", "truncated")], "queries": []})
    assert (tmp_path / "s2.csv").read_bytes() == "set,image,reason\ngallery,ü.jpg,truncated\n".encode("utf-8")
    per_query = {"top1": np.array([1, 0]), "ap@10": np.array([0.5, 1 / 3]), "first_correct_rank": np.array([1, 0])}
    write_per_query_csv(tmp_path / "pq.csv", ["q1.jpg", "q,2.jpg"], ["cat", "dog"], per_query)
    assert (tmp_path / "pq.csv").read_text() == ("query,label,top1,ap@10,first_correct_rank\n"
                                                 "q1.jpg,cat,1,0.5,1\n\"q,2.jpg\",dog,0,0.333333,0\n")


def test_digix_refuses_names_it_cannot_hold(tmp_path):
    with pytest.raises(LookalikeError, match="DIGIX"):
        write_results(tmp_path / "r.csv", "digix", ["a,b.jpg"], ["x.jpg"], np.ones((1, 1)), np.zeros((1, 1), int))


def test_labels_extra_columns(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("split,Image,Label,other\ntrain,a.jpg,1,x\ntest,b.jpg,2,y\n")
    assert read_labels(p) == {"a.jpg": "1", "b.jpg": "2"}
