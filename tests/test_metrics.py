import numpy as np
import pytest

from lookalike.errors import LookalikeError
from lookalike.metrics import average_precision_at_k, retrieval_metrics


def test_ap_hand_computed():
    # ranks 1 and 3 relevant, 2 relevant in the gallery: (1/1 + 2/3) / 2
    rel = np.array([[1, 0, 1, 0, 0]], bool)
    assert average_precision_at_k(rel, [2], k=5)[0] == pytest.approx((1 + 2 / 3) / 2)
    # 5 relevant in the gallery, k=3: divide by min(5, 3) = 3 -> (1/2 + 2/3) / 3
    rel = np.array([[0, 1, 1]], bool)
    assert average_precision_at_k(rel, [5], k=3)[0] == pytest.approx((1 / 2 + 2 / 3) / 3)
    # 'hits' variant divides by the relevant found: (1/2 + 2/3) / 2
    assert average_precision_at_k(rel, [5], k=3, normalization="hits")[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    # nothing relevant retrieved, or nothing relevant exists -> 0
    assert average_precision_at_k(np.zeros((1, 3), bool), [4], k=3)[0] == 0
    assert average_precision_at_k(np.zeros((1, 3), bool), [0], k=3)[0] == 0
    # only the first k ranks count
    rel = np.array([[0, 0, 1]], bool)
    assert average_precision_at_k(rel, [1], k=2)[0] == 0


def test_summary_hand_computed():
    rel = np.array([
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # AP = 1 (1 relevant)
        [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # AP = 1/2 / min(3,10) = 1/6
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # AP = 0
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # AP = (1/7) / 1
    ], bool)
    s, per = retrieval_metrics(rel, np.array([1, 3, 2, 1]), k=10)
    assert s["top1"] == 0.25
    m = (1 + 1 / 6 + 0 + 1 / 7) / 4
    assert s["mAP@10"] == pytest.approx(m)
    assert s["digix_score"] == pytest.approx(0.5 * 0.25 + 0.5 * m)
    assert s["recall@1"] == 0.25 and s["recall@5"] == 0.5 and s["recall@10"] == 0.75
    assert list(per["first_correct_rank"]) == [1, 2, 0, 7]


def test_bad_normalization():
    with pytest.raises(LookalikeError):
        average_precision_at_k(np.ones((1, 1), bool), [1], normalization="x")


def test_ap_matches_slow_reference():
    rng = np.random.default_rng(0)
    rel = rng.random((50, 10)) < 0.3
    n_rel = rel.sum(1) + rng.integers(0, 5, 50)
    fast = average_precision_at_k(rel, n_rel, k=10)
    for q in range(50):
        hits, total = 0, 0.0
        for i in range(10):
            if rel[q, i]:
                hits += 1
                total += hits / (i + 1)
        ref = total / min(n_rel[q], 10) if n_rel[q] else 0.0
        assert fast[q] == pytest.approx(ref)
