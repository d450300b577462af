"""flatscan: the onnxruntime top-k over a Flat inner-product index, against float64 numpy brute
force and against faiss's own search."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from lookalike import flatscan
from lookalike.flatscan import FlatScan


def _index(x: np.ndarray):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


def _check_against_brute_force(x, q, scores, rows, k):
    """Each answer row: scores best first, equal to the float64 product of the rows it names, and
    as good as the true top k (any near-tie may be broken either way)."""
    exact = q.astype(np.float64) @ x.astype(np.float64).T
    kk = min(k, len(x))
    tol = 1e-5 * max(1.0, float(np.abs(exact).max()))
    for i in range(len(q)):
        got = rows[i, :kk]
        assert len(set(got.tolist())) == kk and (got >= 0).all()
        assert np.all(np.diff(scores[i, :kk]) <= tol)
        assert np.allclose(scores[i, :kk], exact[i, got], atol=tol)
        best = np.sort(exact[i])[::-1][:kk]
        assert np.all(exact[i, got] >= best - tol)
        assert (rows[i, kk:] == -1).all() and np.isneginf(scores[i, kk:]).all()


@pytest.mark.parametrize("b,k", [(1, 1), (7, 10), (300, 25), (5, 400), (3, 420)])
def test_matches_brute_force(b, k):
    rng = np.random.default_rng(b * 1000 + k)
    x = rng.standard_normal((400, 48)).astype(np.float32)
    q = rng.standard_normal((b, 48)).astype(np.float32)
    scores, rows = FlatScan(threads=1).search(_index(x), q, k)
    assert scores.shape == rows.shape == (b, k) and scores.dtype == np.float32 and rows.dtype == np.int64
    _check_against_brute_force(x, q, scores, rows, k)


def test_same_answer_as_faiss_on_separated_scores():
    """Integer vectors: every product is exact in float32 and all distinct, so faiss and the scan
    must agree row for row and score for score."""
    rng = np.random.default_rng(3)
    x = rng.integers(-8, 9, (2000, 32)).astype(np.float32)
    q = rng.integers(-8, 9, (40, 32)).astype(np.float32)
    index = _index(x)
    ref_s, ref_i = index.search(q, 15)
    scores, rows = FlatScan().search(index, q, 15)
    exact = q.astype(np.int64) @ x.astype(np.int64).T
    distinct = [i for i in range(len(q)) if len(np.unique(exact[i][ref_i[i]])) == 15
                and exact[i][ref_i[i][-1]] > np.sort(exact[i])[::-1][15]]
    assert len(distinct) > 10
    assert np.array_equal(rows[distinct], ref_i[distinct]) and np.array_equal(scores[distinct], ref_s[distinct])


def test_equal_scores_are_ordered_by_row():
    x = np.eye(6, dtype=np.float32)[[0, 1, 0, 2, 0, 3]]  # rows 0, 2 and 4 are the same vector
    scores, rows = FlatScan().search(_index(x), np.eye(6, dtype=np.float32)[:1], 4)
    assert rows[0, :3].tolist() == [0, 2, 4] and scores[0, :3].tolist() == [1.0, 1.0, 1.0]


def test_blocks_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((50, 16)).astype(np.float32)
    index = _index(x)
    whole = FlatScan().search(index, q, 9)
    monkeypatch.setattr(flatscan, "BLOCK_BYTES", 4 * 300 * 7)  # 7 queries per call
    blocks = FlatScan().search(index, q, 9)
    # the kernel depends on the block's size: scores may differ in the last bit (as faiss's do between
    # its paths under and over 20 queries), rows are the same here (no near-ties)
    assert np.array_equal(whole[1], blocks[1]) and np.allclose(whole[0], blocks[0], rtol=1e-6, atol=0)


def test_the_index_is_read_as_it_is_now():
    """The vectors are viewed at every call: rows added (faiss may move its storage) or removed
    after a first search are seen, never a stale copy."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    index, scan = _index(x), FlatScan()
    q = rng.standard_normal((2, 8)).astype(np.float32)
    scan.search(index, q, 3)
    far = 100 * q  # new rows that beat every old one
    for _ in range(30):  # many additions: the storage is reallocated on the way
        index.add(rng.standard_normal((1000, 8)).astype(np.float32) * 0.01)
    index.add(far)
    scores, rows = scan.search(index, q, 1)
    assert rows[:, 0].tolist() == [index.ntotal - 2, index.ntotal - 1]
    index.remove_ids(np.array([index.ntotal - 2, index.ntotal - 1], np.int64))
    _check_against_brute_force(flatscan.vectors(index).copy(), q, *scan.search(index, q, 3), 3)


def test_empty_index_and_no_queries():
    index = faiss.IndexFlatIP(4)
    scores, rows = FlatScan().search(index, np.ones((2, 4), np.float32), 3)
    assert (rows == -1).all() and np.isneginf(scores).all()
    scores, rows = FlatScan().search(_index(np.eye(4, dtype=np.float32)), np.zeros((0, 4), np.float32), 2)
    assert scores.shape == rows.shape == (0, 2)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        FlatScan().search(index, np.ones((2, 5), np.float32), 1)


def test_supports_only_flat_inner_product():
    assert flatscan.supports(faiss.IndexFlatIP(8))
    assert flatscan.supports(faiss.index_factory(8, "Flat", faiss.METRIC_INNER_PRODUCT))
    assert not flatscan.supports(faiss.IndexFlatL2(8))
    assert not flatscan.supports(faiss.index_factory(8, "HNSW8,Flat", faiss.METRIC_INNER_PRODUCT))
    assert not flatscan.supports(faiss.index_factory(8, "IVF4,Flat", faiss.METRIC_INNER_PRODUCT))
    assert not flatscan.supports(faiss.index_factory(8, "SQ8", faiss.METRIC_INNER_PRODUCT))
    assert not flatscan.supports(faiss.index_factory(8, "PCA4,Flat", faiss.METRIC_INNER_PRODUCT))


def test_collection_search_uses_the_scan_and_keeps_removals_out(tmp_path):
    """`Collection.search` on a Flat index goes through the scan (and gives faiss's answer on
    separated scores); removed rows never come back."""
    from lookalike.index import IndexConfig, build_index
    from lookalike.store import write_store

    rng = np.random.default_rng(7)
    x = rng.integers(-8, 9, (500, 24)).astype(np.float32)
    names = [f"img{i:04d}.jpg" for i in range(len(x))]
    write_store(tmp_path / "g.h5", names, x, {"model": "toy", "model_id": "toy"})
    col = build_index(tmp_path / "g.h5", tmp_path / "col", IndexConfig(factory="Flat", whiten=False))
    q = x[[3, 10, 200]] + 0.25
    calls = []
    real = FlatScan.search
    col._scan = None
    FlatScan.search = lambda self, *a: calls.append(1) or real(self, *a)
    try:
        scores, rows = col.search(q, 5)
        assert calls and isinstance(col._scan, FlatScan)
        ref_s, ref_i = col.index.search(col.prepare(q), 5)
        assert np.array_equal(rows[:, 0], [3, 10, 200]) and np.allclose(scores, ref_s, atol=1e-4)
        col.remove(["img0003.jpg"])
        scores, rows = col.search(q, 5)
        assert 3 not in rows and rows[1, 0] == 10
    finally:
        FlatScan.search = real


def test_best_first_orders_ties_by_row_and_padding_last():
    from lookalike.numeric import best_first

    scores = np.array([[0.5, 0.9, 0.5, -np.inf, 0.9]], np.float32)
    ids = np.array([[7, 4, 2, -1, 1]], np.int64)
    s, i = best_first(scores, ids)
    assert i.tolist() == [[1, 4, 2, 7, -1]] and np.allclose(s, [[0.9, 0.9, 0.5, 0.5, -np.inf]])
    s, i = best_first(scores, ids, 3)
    assert i.tolist() == [[1, 4, 2]]


def test_collection_orders_faiss_ties_by_row_too(tmp_path):
    """An IVF collection (searched by faiss) gives equal scores in row order, as the scan does."""
    from lookalike.index import IndexConfig, build_index
    from lookalike.store import write_store

    rng = np.random.default_rng(8)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[[40, 120, 250]] = x[7]  # four copies of one vector
    write_store(tmp_path / "g.h5", [f"{i}.jpg" for i in range(len(x))], x, {"model": "toy", "model_id": "toy"})
    for factory, nprobe in (("Flat", None), ("IVF2,Flat", 2)):
        col = build_index(tmp_path / "g.h5", tmp_path / factory, IndexConfig(factory=factory, whiten=False, nprobe=nprobe))
        scores, rows = col.search(x[[7]], 4)
        assert rows[0].tolist() == [7, 40, 120, 250], factory


def test_nan_is_never_a_result():
    """A NaN row is never returned (TopK alone ranked NaN first); a NaN query gets no rows, as faiss
    answers; both kernels."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((200, 12)).astype(np.float32)
    x[10, 3] = np.nan
    index = _index(x)
    for b in (1, 8):  # (queries, rows) and (rows, queries) kernels
        q = x[[11] * b].copy()
        scores, rows = FlatScan().search(index, q, 5)
        assert rows[0, 0] == 11 and 10 not in rows and np.isfinite(scores).all()
        q[0, 0] = np.nan
        scores, rows = FlatScan().search(index, q, 5)
        assert (rows[0] == -1).all() and np.isneginf(scores[0]).all()
        assert b == 1 or (rows[1, 0] == 11 and 10 not in rows[1])
