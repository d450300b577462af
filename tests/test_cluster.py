"""A collection split in shards answers like the collection: searched in-process and through a Ray
Serve application on a local Ray cluster (2 shards), merged names, scores and row numbers equal
``Collection.search`` for every query (Flat with whitening and removed rows; IVF at nprobe < nlist
and nprobe = nlist; uneven shards; k larger than a shard; ties across the shard boundary)."""
import json
import os
import shutil

import numpy as np
import pytest

from lookalike.cluster import read_shard_set, search_in_process, split_collection
from lookalike.collection import Collection
from lookalike.errors import LookalikeError
from lookalike.index import IndexConfig, build_index
from lookalike.store import write_store

N, D = 400, 32
REQUIRE_RAY = bool(os.environ.get("LOOKALIKE_REQUIRE_RAY"))


def _gallery(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    # ties: the same vector on both sides of every boundary the splits below use (50, 200)
    for a, b in ((199, 200), (199, 201), (49, 50), (10, 350)):
        x[b] = x[a]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _queries(x, seed=1):
    rng = np.random.default_rng(seed)
    rows = [199, 49, 10, 5, 0, 399, 120, 300]  # duplicated rows, a removed one (5), ends
    q = np.vstack([x[rows], x[rng.choice(N, 12, replace=False)] + 0.05 * rng.normal(size=(12, D)),
                   rng.normal(size=(10, D))]).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)  # 30 queries: faiss's BLAS path for Flat


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Source collections and their shard sets: name -> (collection folder, shard folder)."""
    root = tmp_path_factory.mktemp("cluster")
    x = _gallery()
    attrs = {"model_id": "m", "fingerprint": "f", "config": "{}"}
    write_store(root / "g.h5", [f"img/{i:04d}.jpg" for i in range(N)], x, attrs)
    out = {}

    build_index(root / "g.h5", root / "flat", IndexConfig(whiten=True))  # whitened: shards must reuse the fit
    col = Collection.open(root / "flat")
    col.remove(["img/0005.jpg", "img/0201.jpg", "img/0333.jpg"], record=True)  # removed rows, in the journal
    split_collection(root / "flat", root / "flat-2")
    out["flat"] = (root / "flat", root / "flat-2")
    split_collection(root / "flat", root / "flat-uneven", shards=2, sizes=[47, N - 3 - 47])
    out["flat-uneven"] = (root / "flat", root / "flat-uneven")

    for name, nprobe in (("ivf", 2), ("ivf-all", 8)):
        build_index(root / "g.h5", root / name, IndexConfig(factory="IVF8,Flat", nprobe=nprobe))
        col = Collection.open(root / name)
        col.remove(["img/0007.jpg", "img/0250.jpg"])
        col.save()  # compacted: IVF keeps row numbers, null names
        col = Collection.open(root / name)
        col.remove(["img/0005.jpg", "img/0390.jpg"], record=True)  # and two more in the journal
    split_collection(root / "ivf", root / "ivf-2")
    out["ivf"] = (root / "ivf", root / "ivf-2")
    split_collection(root / "ivf-all", root / "ivf-uneven", shards=2, sizes=[60, N - 4 - 60])
    out["ivf-all"] = (root / "ivf-all", root / "ivf-uneven")
    return out


CASES = [("flat", 10), ("flat", 397), ("flat-uneven", 80), ("ivf", 10), ("ivf-all", 10), ("ivf-all", 100)]


def _single(folder, q, k, threads=None):
    """The single collection's answer; ``threads``: faiss's thread count for it (faiss's own scores
    move by an ulp with its thread count when there are fewer queries than threads)."""
    import faiss

    col = Collection.open(folder)
    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        scores, rows = col.search(q, k)
    finally:
        faiss.omp_set_num_threads(before)
    return col, scores, rows, [[col.names[r] for r in row] for row in rows]


@pytest.mark.parametrize("case,k", CASES)
def test_in_process_merge_equals_single_index(sets, case, k):
    src, shards = sets[case]
    q = _queries(_gallery())
    for batch in (q, q[:3], q[:1]):  # 30 queries (BLAS), 3 and 1 (faiss's other paths)
        _, scores, _, names = _single(src, batch, k)
        s, n = search_in_process(shards, batch, k)
        assert n == names
        assert np.array_equal(s, scores)


def test_split_writes_normal_collections_with_the_source_whitening(sets):
    src, shards = sets["flat-uneven"]
    listing = json.loads((shards / "shards.json").read_text())
    assert [s["count"] for s in listing["shards"]] == [47, N - 3 - 47]
    assert listing["source"]["count"] == N - 3
    source = Collection.open(src)
    parts = [Collection.open(shards / s["folder"]) for s in listing["shards"]]
    assert sum((p.live_names() for p in parts), []) == source.live_names()  # contiguous, in order, removed rows gone
    q = _queries(_gallery())[:4]
    for p in parts:
        assert p.transform is not None and np.array_equal(p.prepare(q), source.prepare(q))
    ivf = Collection.open(sets["ivf"][1] / "shard-00001")
    assert ivf.names[0] is None and ivf.manifest["nprobe"] == 2  # IVF: source row numbers kept


def test_the_default_cut_follows_faiss_blocks_so_blas_scores_stay_exact(tmp_path):
    """Batches of 20+ queries go through BLAS a 1024-row block at a time; the last bit of a score
    depends on the block's shape, so the default cut starts shards on block boundaries (here, at 512-d
    and 256 queries, a cut at row 1000 or 1300 moves some scores by an ulp; at 1024 none)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2600, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_store(tmp_path / "g.h5", [f"{i}.jpg" for i in range(2600)], x, {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "flat")
    Collection.open(tmp_path / "flat").remove(["5.jpg", "2000.jpg"], record=True)  # pending removals come along
    folders = split_collection(tmp_path / "flat", tmp_path / "sh", shards=2)
    infos = [json.loads((f / "manifest.json").read_text())["shard"] for f in folders]
    assert [i["rows"] for i in infos] == [[0, 1024], [1024, 2600]]
    assert json.loads((folders[1] / "manifest.json").read_text())["deleted_rows"] == [2000 - 1024]
    q = x[rng.choice(2600, 256, replace=False)] + 0.1 * rng.normal(size=(256, 512)).astype(np.float32)
    _, scores, _, names = _single(tmp_path / "flat", q, 10)
    s, n = search_in_process(tmp_path / "sh", q, 10)
    assert n == names and np.array_equal(s, scores)


def test_an_ivf_built_in_shards_on_disk_splits_too(tmp_path):
    x = _gallery()
    write_store(tmp_path / "g.h5", [f"{i}.jpg" for i in range(N)], x, {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "od", IndexConfig(factory="IVF8,Flat", shard_size=150, nprobe=3))
    split_collection(tmp_path / "od", tmp_path / "sh", shards=2, sizes=[123, N - 123])
    q = _queries(x)
    _, scores, _, names = _single(tmp_path / "od", q, 10)
    s, n = search_in_process(tmp_path / "sh", q, 10)
    assert n == names and np.array_equal(s, scores)
    assert not Collection.open(tmp_path / "sh" / "shard-00000").manifest["ondisk"]  # the shards hold their lists


def test_a_shard_set_from_another_collection_is_refused(sets, tmp_path):
    flat, flat2 = sets["flat"]
    ivf2 = sets["ivf"][1]
    with pytest.raises(LookalikeError, match="another split.*shard-00001/manifest.json|shard-00001/manifest.json.*another split"):
        read_shard_set([flat2 / "shard-00000", ivf2 / "shard-00001"])
    mixed = tmp_path / "mixed"
    shutil.copytree(flat2, mixed)
    shutil.rmtree(mixed / "shard-00001")
    shutil.copytree(ivf2 / "shard-00001", mixed / "shard-00001")
    with pytest.raises(LookalikeError, match=r"mixed/shard-00001/manifest.json: .*another split.*shards.json"):
        read_shard_set(mixed)
    with pytest.raises(LookalikeError, match=r"flat-2: these shards were split from another collection"):
        read_shard_set(flat2, source=sets["ivf"][0])
    read_shard_set(flat2, source=flat)  # the right source passes
    with pytest.raises(LookalikeError, match="give each shard once"):
        read_shard_set([flat2 / "shard-00000", flat2 / "shard-00000"])
    with pytest.raises(LookalikeError, match="not a shard"):
        read_shard_set([flat])
    with pytest.raises(LookalikeError, match="shards.json: not found"):
        read_shard_set(tmp_path)


def test_source_changed_after_the_split_is_refused(sets, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(sets["flat"][0], src)
    split_collection(src, tmp_path / "sh", shards=3)
    Collection.open(src).remove(["img/0100.jpg"], record=True)
    with pytest.raises(LookalikeError, match="another version"):
        read_shard_set(tmp_path / "sh", source=src)
    split_collection(src, tmp_path / "sh", shards=2)  # splitting again replaces the set (and its 3rd shard)
    assert read_shard_set(tmp_path / "sh", source=src)["count"] == N - 4
    assert not (tmp_path / "sh" / "shard-00002").exists()


def test_what_cannot_be_split_or_asked(sets, tmp_path):
    x = _gallery()
    write_store(tmp_path / "g.h5", [f"{i}" for i in range(N)], x, {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "hnsw", IndexConfig(factory="HNSW16"))
    with pytest.raises(LookalikeError, match="HNSW16 index cannot be split"):
        split_collection(tmp_path / "hnsw", tmp_path / "out")
    with pytest.raises(LookalikeError, match="positive counts"):
        split_collection(sets["flat"][0], tmp_path / "out", shards=2, sizes=[10, 10])
    with pytest.raises(LookalikeError, match="is not a shard set"):
        split_collection(sets["flat"][0], tmp_path, shards=2)  # a folder with other things in it
    from lookalike.postprocess import RerankConfig

    with pytest.raises(LookalikeError, match="plain faiss search"):
        search_in_process(sets["flat"][1], x[:2], 5, rerank=RerankConfig(steps=("kr",)))
    with pytest.raises(LookalikeError, match="larger than the gallery"):
        search_in_process(sets["flat"][1], x[:2], N)


# ---------------------------------------------------------------------------------------------- Ray Serve
@pytest.fixture(scope="module")
def serve_cluster():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        if REQUIRE_RAY:
            pytest.fail(f"Ray Serve is required here (LOOKALIKE_REQUIRE_RAY): {e}; pip install 'ray[serve]'")
        pytest.skip(f"Ray Serve is not installed ({e}); pip install 'ray[serve]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def served(serve_cluster, sets):
    """Every shard set deployed at once (2 shards each at 0.25 CPU, a router at 0): name -> handle."""
    from lookalike.cluster import serve_shards

    handles = {name: serve_shards(shards, name=f"t-{name}", source=src, cpus_per_shard=0.25, threads=1)
               for name, (src, shards) in sets.items()}
    yield handles
    from lookalike.cluster import stop_shards

    stop_shards("t-flat")  # the others go with serve.shutdown()


@pytest.mark.parametrize("case,k", CASES)
def test_served_shards_answer_like_the_single_index(served, sets, case, k):
    from lookalike.cluster import search_shards

    src, _ = sets[case]
    q = _queries(_gallery())
    for batch in (q, q[:3], q[:1]):
        _, scores, rows, names = _single(src, batch, k, threads=1)  # as the replicas (threads=1)
        s, n, ids = search_shards(served[case], batch, k, with_ids=True)
        assert n == names
        assert np.array_equal(s, scores)
        assert np.array_equal(ids, rows)  # source row numbers, as Collection.search returns them


def test_served_shards_refuse_bad_requests(served):
    from lookalike.cluster import search_shards
    from lookalike.postprocess import RerankConfig

    h = served["flat"]
    q = _queries(_gallery())[:2]
    with pytest.raises(LookalikeError, match="dimension 32"):
        search_shards(h, q[:, :8], 5)
    with pytest.raises(LookalikeError, match="larger than the gallery"):
        search_shards(h, q, N)
    with pytest.raises(LookalikeError, match="another model"):
        search_shards(h, q, 5, model_id="other")
    with pytest.raises(LookalikeError, match="plain faiss search"):
        search_shards(h, q, 5, rerank=RerankConfig(steps=("kr",)))
    assert h.describe.remote().result()["count"] == N - 3


def test_the_shard_command_splits_and_refuses_with_one_line(sets, tmp_path):
    from click.testing import CliRunner

    from lookalike.cli import main

    source, _ = sets["flat"]
    r = CliRunner().invoke(main, ["shard", str(source), str(tmp_path / "s3"), "--shards", "3"])
    assert r.exit_code == 0, r.output
    assert "3 shards" in r.output and (tmp_path / "s3" / "shards.json").exists()
    q = _queries(_gallery())
    col, scores, rows, names = _single(source, q, 10)
    s, n = search_in_process(tmp_path / "s3", q, 10)
    assert [list(x) for x in n] == names and np.allclose(s, scores, atol=1e-6)
    r = CliRunner().invoke(main, ["shard", str(tmp_path / "nothing"), str(tmp_path / "s4")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
