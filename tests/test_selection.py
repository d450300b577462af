"""Choosing ensemble weights / whitening / re-ranking from the gallery itself (selection.py)."""
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image
from torch import nn

from conftest import lookalike_cli, make_photo, make_set
from lookalike import Extractor
from lookalike.errors import LookalikeError
from lookalike.extract import l2n
from lookalike.selection import (Probe, choose, class_probe, combine, gallery_classes, make_pseudo_queries,
                                 pseudo_query, split_members, weight_grid)


def test_reweighting_stored_rows_is_exact():
    rng = np.random.default_rng(0)
    a, b = l2n(rng.normal(size=(20, 7))), l2n(rng.normal(size=(20, 3)))
    stored = combine([a, b], (1.0, 0.5))  # what an ensemble store holds
    got = combine(split_members(stored, [7, 3]), (1.0, 2.0))
    assert np.abs(got - combine([a, b], (1.0, 2.0))).max() < 1e-6
    assert np.abs(got - combine([a, b], (1.0, 0.5))).max() > 0.01  # and the weights did change it
    with pytest.raises(LookalikeError, match="do not add up"):
        split_members(stored, [7, 4])
    assert (1.0, 0.0) in weight_grid(2) and (0.0, 1.0) in weight_grid(2)
    assert len(weight_grid(3)) == len(set(weight_grid(3)))


def test_class_probe_holds_out_some_of_each_class_never_all():
    labels = ["a"] * 10 + ["b"] * 2 + ["c"] + ["", None] + ["d"]
    held, singles, n_multi, n_single = class_probe(labels, fraction=0.2, seed=1)
    lab = np.array([str(x) for x in labels])
    assert (lab[held] == "a").sum() == 2 and (lab[held] == "b").sum() == 1
    assert set(lab[singles]) == {"c", "d"} and (n_multi, n_single) == (2, 2)
    held2, *_ = class_probe(labels, fraction=0.2, seed=1)
    assert held.tolist() == held2.tolist()  # deterministic


def _two_kinds_of_member(rng, n_classes=12, per_class=6):
    """Member A separates classes (category-level); member B is exact per photo (copy-level)."""
    labels = np.repeat(np.arange(n_classes), per_class).astype(str)
    centres = l2n(rng.normal(size=(n_classes, 16)))
    a = l2n(centres[labels.astype(int)] + 0.35 * rng.normal(size=(len(labels), 16)))
    b = l2n(rng.normal(size=(len(labels), 16)))  # no class structure at all
    return labels, a, b


def test_choose_follows_what_the_gallery_says():
    rng = np.random.default_rng(0)
    labels, a, b = _two_kinds_of_member(rng)
    # classes with several photos: member A should carry the weight
    held, singles, nm, ns = class_probe(labels, seed=0)
    probe = Probe(held, labels.astype(object), None, np.zeros(0, np.int64), nm, ns)
    c = choose([a, b], probe, whitening=(False,), chains=[None])
    assert c.weights[0] > c.weights[1], c.describe()
    # photos without classmates and pseudo-queries that are copies in B, unrelated in A: member B
    targets = np.arange(0, len(labels), 3)
    self_a = l2n(rng.normal(size=(len(targets), 16)))
    self_b = l2n(b[targets] + 0.2 * rng.normal(size=(len(targets), 16)))
    probe = Probe(np.zeros(0, np.int64), None, [self_a, self_b], targets, 0.0, float(len(labels)))
    c = choose([a, b], probe, [self_a, self_b], whitening=(False, True))
    assert c.weights[1] > c.weights[0], c.describe()
    assert c.rerank is None  # instance-level: chains are not tried
    assert {r["rerank"] for r in c.table} == {"none"}
    assert c.score == max(r["score"] for r in c.table if not r["whiten"] or r["score"] >= 0)


def test_pseudo_queries_are_deterministic_strong_views(tmp_path):
    img, bg = make_photo(1, size=(160, 120)), make_photo(2, size=(160, 120))
    v1 = pseudo_query(img, bg, np.random.default_rng(5))
    v2 = pseudo_query(img, bg, np.random.default_rng(5))
    assert v1.mode == "RGB" and np.array_equal(np.asarray(v1), np.asarray(v2))
    v3 = pseudo_query(img, bg, np.random.default_rng(6))
    assert not np.array_equal(np.asarray(v1), np.asarray(v3))
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        make_photo(i).save(paths[-1])
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.append(tmp_path / "bad.jpg")
    imgs, kept = make_pseudo_queries(paths, np.array([0, 3, 2]), seed=0)
    assert kept.tolist() == [0, 2] and len(imgs) == 2  # the unreadable one is left out


def test_gallery_classes_from_folders_or_labels(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
    names = ["cat/1.jpg", "cat/2.jpg", "dog/1.jpg", "dog/2.jpg"]
    assert gallery_classes(tmp_path, names) == {"cat/1.jpg": "cat", "cat/2.jpg": "cat", "dog/1.jpg": "dog", "dog/2.jpg": "dog"}
    assert gallery_classes(tmp_path, ["a.jpg", "b.jpg"]) is None  # flat: no classes
    assert gallery_classes(tmp_path, ["x/a.jpg", "x/y/b.jpg"]) is None  # mixed depth: not a class tree
    assert gallery_classes(tmp_path, ["a/1.jpg", "b/1.jpg", "c/1.jpg"]) is None  # all singletons: not classes
    lab = tmp_path / "l.csv"
    lab.write_text("image,label\nother.jpg,x\n")
    with pytest.raises(LookalikeError, match="none of its names is a gallery image"):
        gallery_classes(None, names, lab)
    lab.write_text("image,label\ncat/1.jpg,k\ndog/2.jpg,\n")
    assert gallery_classes(None, names, lab) == {"cat/1.jpg": "k"}  # unlabelled photos are left out


def _stem_factory():
    from lookalike.models import create_backbone

    bb = create_backbone("lite0").module.net
    return nn.Sequential(bb._conv_stem, bb._bn0)


def test_run_chooses_from_class_folders_and_caches_the_choice(tmp_path, monkeypatch):
    mod = types.ModuleType("sel_member")
    mod.factory = _stem_factory
    monkeypatch.setitem(sys.modules, "sel_member", mod)
    for c in range(3):
        make_set(tmp_path / "g" / f"class{c}", n_classes=1, per_class=3, prefix=f"c{c}", start=10 * c)
    make_set(tmp_path / "q", n_classes=3, per_class=1, prefix="q", start=500)
    import lookalike

    kw = dict(model=("lite0", "sel_member:factory"), workdir=tmp_path / "w", k=5)
    res = lookalike.run(tmp_path / "g", tmp_path / "q", tmp_path / "out.csv", **kw)
    assert res.choice is not None and "classes" in res.choice_source
    sel = json.loads((tmp_path / "out.csv.selection.json").read_text())
    assert len(sel["table"]) >= 9 and sel["ensemble_weights"] == list(res.choice.weights)
    cfg = json.loads((tmp_path / "out.csv.config.json").read_text())
    assert cfg["extract"]["ensemble_weights"] == list(res.choice.weights) or list(res.choice.weights) == [1.0, 1.0]
    # the queries were embedded with the chosen weights: the index accepted them (same model_id)
    res2 = lookalike.run(tmp_path / "g", tmp_path / "q", tmp_path / "out2.csv", **kw)
    assert res2.choice_source.endswith("(cached)") and res2.choice.weights == res.choice.weights
    res3 = lookalike.run(tmp_path / "g", tmp_path / "q", tmp_path / "out3.csv", select="off", **kw)
    assert res3.choice is None
    # explicit settings are not searched
    res4 = lookalike.run(tmp_path / "g", tmp_path / "q", tmp_path / "out4.csv", ensemble_weights=(1.0, 2.0),
                         **{**kw, "workdir": tmp_path / "w4"})
    assert res4.choice.weights == (1.0, 2.0)
    # a tune file is applied as it is
    (tmp_path / "best.json").write_text(json.dumps({"ensemble_weights": [0.5, 1.0], "whiten": False, "rerank": None}))
    res5 = lookalike.run(tmp_path / "g", tmp_path / "q", tmp_path / "out5.csv", select=str(tmp_path / "best.json"), **kw)
    assert res5.choice.weights == (0.5, 1.0)
    # a file chosen for other models is refused, not applied to the wrong members
    (tmp_path / "other.json").write_text(json.dumps({"models": ["sel_member:factory", "lite0"], "ensemble_weights": [0, 1],
                                                     "whiten": False, "rerank": None}))
    with pytest.raises(LookalikeError, match="chosen for sel_member:factory\+lite0"):
        lookalike.run(tmp_path / "g", tmp_path / "q", tmp_path / "out7.csv", select=str(tmp_path / "other.json"), **kw)
    # a member weighted 0 by the user: whitening / re-ranking are still chosen, on the rows as they are
    res8 = lookalike.run(tmp_path / "g", tmp_path / "q", tmp_path / "out8.csv", ensemble_weights=(1.0, 0.0),
                         **{**kw, "workdir": tmp_path / "w8"})
    assert res8.choice.weights == (1.0, 0.0)
    p = lookalike_cli("run", "--gallery", tmp_path / "g", "--queries", tmp_path / "q", "-o", tmp_path / "o6.csv",
                      "--select", tmp_path / "nothing.json", "--model", "lite0", "-k", "5")
    assert p.returncode == 2 and "nothing.json" in p.stderr


def test_copies_of_a_source_count_as_right_for_its_pseudo_query():
    from lookalike.selection import copies_of

    rng = np.random.default_rng(3)
    g = l2n(rng.normal(size=(30, 8)))
    g[7] = l2n(g[3:4] + 0.01 * rng.normal(size=(1, 8)))[0]  # a near-exact copy of photo 3
    copies = copies_of(g, np.array([3, 5]))
    assert copies[0].tolist() == [3, 7] and copies[1].tolist() == [5]
    # a pseudo-query of 3 that finds the copy 7 first is right at rank 1, not wrong
    probe = Probe(np.zeros(0, np.int64), None, [l2n(g[7:8] + 0.001)], np.array([3]), 0.0, 1.0, copies[:1])
    from lookalike.selection import evaluate

    assert evaluate(g, probe, l2n(g[7:8] + 0.001), False, None)["self"] == 1.0


def test_a_saturated_probe_keeps_the_configured_weights():
    rng = np.random.default_rng(1)
    a = l2n(rng.normal(size=(12, 4)))
    labels = np.repeat(np.arange(6), 2).astype(str)
    a[1::2] = a[0::2]  # every class: two identical photos -> every weight scores 1.0
    held, singles, nm, ns = class_probe(labels, seed=0)
    probe = Probe(held, labels.astype(object), None, np.zeros(0, np.int64), nm, ns)
    c = choose([a, a.copy()], probe, whitening=(False,), chains=[None], current=(1.0, 1.0))
    assert c.weights == (1.0, 1.0) and all(r["score"] == 1.0 for r in c.table)
