"""Index types beyond Flat: search parameters, sharded on-disk building, adding and removing rows —
each checked against exact (brute-force) search."""
import shutil

import numpy as np
import pytest

from conftest import lookalike_cli
from lookalike.errors import LookalikeError
from lookalike.index import IndexConfig, build_index, load_collection, save_collection
from lookalike.store import FeatureStore, write_store


def _clustered(n, d=32, k=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    x = centres[rng.integers(0, k, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    x = _clustered(1200)
    names = [f"img{i:05d}.jpg" for i in range(len(x))]
    write_store(root / "g.h5", names, x, {"model_id": "m", "fingerprint": "f"})
    q = _clustered(50, seed=1)
    return root, x, names, q


def _exact(x, q, k):
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


def _recall(ids, truth):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, truth)])


def test_nprobe_and_ef_search(data, tmp_path):
    root, x, names, q = data
    truth = _exact(x, q, 10)
    col = build_index(root / "g.h5", tmp_path / "ivf", IndexConfig(factory="IVF16,Flat", nprobe=1))
    r1 = _recall(col.search(q, 10)[1], truth)
    col.set_search_params(nprobe=16)  # every list: exact
    assert _recall(col.search(q, 10)[1], truth) == 1.0 and r1 < 1.0
    assert load_collection(tmp_path / "ivf").index.nprobe == 1  # the saved default
    hnsw = build_index(root / "g.h5", None, IndexConfig(factory="HNSW16,Flat"))
    hnsw.set_search_params(ef_search=128)
    assert _recall(hnsw.search(q, 10)[1], truth) >= 0.95
    flat = build_index(root / "g.h5", None, IndexConfig(factory="Flat"))
    with pytest.raises(LookalikeError, match="--nprobe applies to IVF"):
        flat.set_search_params(nprobe=4)


def test_sharded_ondisk_equals_in_memory(data, tmp_path):
    root, x, names, q = data
    cfg = dict(factory="IVF16,Flat", nprobe=4, train_size=800)
    mem = build_index(root / "g.h5", None, IndexConfig(**cfg))
    build_index(root / "g.h5", tmp_path / "disk", IndexConfig(shard_size=250, **cfg))
    assert (tmp_path / "disk" / "index.ivfdata").exists() and not list((tmp_path / "disk").glob("shard-*"))
    shutil.move(tmp_path / "disk", tmp_path / "moved")  # the lists are found beside the index file
    moved = load_collection(tmp_path / "moved")
    s1, i1 = mem.search(q, 10)
    s2, i2 = moved.search(q, 10)
    assert len(moved) == 1200 and moved.names == names
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    with pytest.raises(LookalikeError, match="read-only"):
        moved.add(["new.jpg"], x[:1])
    with pytest.raises(LookalikeError, match="IVF factory"):
        build_index(root / "g.h5", tmp_path / "bad", IndexConfig(factory="HNSW16,Flat", shard_size=100))


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_add_remove_match_a_rebuild(data, tmp_path, factory):
    root, x, names, q = data
    col = build_index(FeatureStore(names[:1000], x[:1000], {"model_id": "m"}), None, IndexConfig(factory=factory, nprobe=8 if "IVF" in factory else None))
    gone = set(names[::7][:100])
    assert col.remove(sorted(gone)) == len(gone)
    col.add(names[1000:], x[1000:])
    save_collection(col, tmp_path / "c")
    col = load_collection(tmp_path / "c")
    keep = [i for i, n in enumerate(names) if n not in gone]
    assert len(col) == len(keep)
    s, ids = col.search(q, 10)
    got = [[col.names[j] for j in row] for row in ids]
    want = [[names[keep[j]] for j in row] for row in _exact(x[keep], q, 10)]
    assert got == want
    with pytest.raises(LookalikeError, match="already in the index"):
        col.add([names[1100]], x[:1])
    with pytest.raises(LookalikeError, match="not in the index"):
        col.remove([names[0]] if names[0] in gone else ["nope.jpg"])


def test_hnsw_removal_is_kept_as_a_list_and_cli_update(data, tmp_path):
    root, x, names, q = data
    col = build_index(root / "g.h5", None, IndexConfig(factory="HNSW16,Flat", ef_search=256))
    assert col.remove([names[0], names[5]]) == 2 and len(col) == 1198
    _, ids = col.search(x[[0, 5, 7]], 3)
    assert 0 not in ids and 5 not in ids and ids[2, 0] == 7  # removed rows are never found
    col.save(tmp_path / "hnsw")
    again = load_collection(tmp_path / "hnsw")  # faiss cannot drop HNSW rows: the list is saved
    assert len(again) == 1198 and again.manifest["deleted_rows"] == [0, 5]
    assert names[0] not in again.live_names() and again.search(x[:1], 1)[1][0, 0] != 0
    again.add([names[0]], x[:1])  # the name can come back, as a new row
    assert again.search(x[:1], 1)[1][0, 0] == 1200 and again.names[1200] == names[0]
    write_store(tmp_path / "first.h5", names[:1000], x[:1000], {"model_id": "m", "fingerprint": "f"})
    write_store(tmp_path / "more.h5", names[1000:], x[1000:], {"model_id": "m", "fingerprint": "f"})
    lookalike_cli("index", tmp_path / "first.h5", "-o", tmp_path / "idx", "--factory", "IVF8,Flat", "--nprobe", "8", check=True)
    (tmp_path / "gone.txt").write_text("img00003.jpg\nimg00004.jpg\n")
    p = lookalike_cli("update", tmp_path / "idx", "--add", tmp_path / "more.h5", "--remove", tmp_path / "gone.txt", check=True)
    assert "+200 -2 -> 1198 vectors" in p.stdout
    col = load_collection(tmp_path / "idx")
    assert col.index.nprobe == 8 and '"factory": "IVF8,Flat"' in (tmp_path / "idx" / "config.json").read_text()
    assert col.names[3] is None and col.names[1199] == names[1199]
    p = lookalike_cli("search", tmp_path / "idx", "--query-features", tmp_path / "more.h5", "-o", tmp_path / "r.csv",
                      "--nprobe", "2", check=True)
    p = lookalike_cli("search", tmp_path / "idx", "--query-features", tmp_path / "more.h5", "-o", tmp_path / "r.csv",
                      "--ef-search", "2")
    assert p.returncode == 2 and "--ef-search applies to HNSW" in p.stderr
