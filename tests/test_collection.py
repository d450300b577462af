"""Collection: the one owner of a collection folder (rows, journal, deleted rows, items, saving)."""
import json

import numpy as np
import pytest

from lookalike.collection import Collection
from lookalike.errors import LookalikeError
from lookalike.index import IndexConfig, build_index
from lookalike.store import write_store


def _unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def gallery(tmp_path):
    rng = np.random.default_rng(3)
    x = _unit(rng, 300)
    names = [f"g/{i:04d}.jpg" for i in range(300)]
    write_store(tmp_path / "g.h5", names, x, {"model_id": "m", "fingerprint": "f"})
    return tmp_path / "g.h5", names, x, rng


def _brute(vecs: dict, q: np.ndarray, k: int) -> list[list[str]]:
    """The obvious reference: cosine against every vector that should be findable, by name."""
    order = []
    for row in q:
        sims = sorted(((float(v @ row), n) for n, v in vecs.items()), reverse=True)
        order.append([n for _, n in sims[:k]])
    return order


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16,Flat"])
def test_search_after_removals_and_additions_matches_brute_force(gallery, tmp_path, factory):
    store, names, x, rng = gallery
    params = {"nprobe": 4} if factory.startswith("IVF") else {"ef_search": 400} if factory.startswith("HNSW") else {}
    col = build_index(store, tmp_path / "c", IndexConfig(factory=factory, **params))
    col.remove(names[10:30])
    new = _unit(rng, 5)
    col.add([f"new/{i}.jpg" for i in range(5)], new)
    q = np.vstack([new, x[:3], x[15:16]])
    _, ids = col.search(q, 8)
    got = [[col.names[j] for j in row] for row in ids]
    live = {n: v for n, v in zip(names, x) if not 10 <= names.index(n) < 30}
    live.update((f"new/{i}.jpg", v) for i, v in enumerate(new))
    assert got == _brute(live, q, 8)
    assert got[0][0] == "new/0.jpg" and all(names[15] not in row for row in got)


def test_served_ivf_rows_keep_their_names_after_a_removal(gallery, tmp_path):
    """The reliability issue's reproduction: update --remove on an IVF index, then rows added the
    way `serve` adds them must be found under their own names (and `len` counts vectors)."""
    store, names, x, rng = gallery
    build_index(store, tmp_path / "c", IndexConfig(factory="IVF4,Flat", nprobe=4))
    col = Collection.open(tmp_path / "c")
    col.remove(names[:20])
    col.save()  # IVF keeps row numbers: 20 null names
    col = Collection.open(tmp_path / "c")
    assert col.names[:20] == [None] * 20 and len(col) == 280 == col.index.ntotal
    new = _unit(rng, 1)
    col.add(["added.jpg"], new, record=True, files={"added.jpg": b"jpeg bytes"})
    s, i = col.search(new, 1)
    assert col.names[i[0, 0]] == "added.jpg" and s[0, 0] > 0.999 and len(col) == 281 == col.index.ntotal
    col.remove([names[25]], record=True)  # removing a gallery row does not hide the new one
    assert col.names[col.search(new, 1)[1][0, 0]] == "added.jpg" and len(col) == 280
    # the journal is replayed on open, and folded in by save (items come along)
    again = Collection.open(tmp_path / "c")
    assert again.names[again.search(new, 1)[1][0, 0]] == "added.jpg" and len(again) == 280
    assert again.image_path("added.jpg").read_bytes() == b"jpeg bytes"
    again.save()
    folder = tmp_path / "c"
    assert not (folder / "journal.jsonl").exists() and (folder / "items" / "added.jpg").read_bytes() == b"jpeg bytes"
    final = Collection.open(folder)
    assert len(final) == 280 and names[25] not in final.live_names() and "added.jpg" in final.live_names()
    assert json.loads((folder / "manifest.json").read_text())["items"] == ["added.jpg"]
    assert final.image_path("added.jpg").read_bytes() == b"jpeg bytes"


def test_journal_torn_last_line_and_damage(gallery, tmp_path):
    store, names, x, rng = gallery
    build_index(store, tmp_path / "c")
    col = Collection.open(tmp_path / "c")
    col.add(["a.jpg"], _unit(rng, 1), record=True)
    col.remove([names[0]], record=True)
    journal = tmp_path / "c" / "journal.jsonl"
    with open(journal, "ab") as f:
        f.write(b'{"op":"add","name":"torn.jpg","feat')  # a power cut mid-write
    again = Collection.open(tmp_path / "c")
    assert "a.jpg" in again.live_names() and names[0] not in again.live_names() and "torn.jpg" not in again.live_names()
    # the next acknowledged change must survive the torn line (it is cut off, not joined)
    again.remove([names[1]], record=True)
    third = Collection.open(tmp_path / "c")
    assert names[1] not in third.live_names() and names[0] not in third.live_names() and "a.jpg" in third.live_names()
    assert b"torn.jpg" not in journal.read_bytes()
    journal.write_bytes(b"garbage\n" + journal.read_bytes())
    with pytest.raises(LookalikeError, match="line 1 is damaged"):
        Collection.open(tmp_path / "c")


def test_sharded_and_code_collections_can_hide_rows(gallery, tmp_path):
    store, names, x, rng = gallery
    build_index(store, tmp_path / "s", IndexConfig(factory="IVF4,Flat", shard_size=100, nprobe=4))
    col = Collection.open(tmp_path / "s")
    col.remove([names[7]], record=True)  # what DELETE /items does
    assert names[7] not in [col.names[j] for j in col.search(x[7:8], 5)[1][0]]
    assert names[7] not in Collection.open(tmp_path / "s").live_names()  # the journal keeps it
    with pytest.raises(LookalikeError, match="written once"):
        col.save()


def test_changes_are_checked(gallery, tmp_path):
    store, names, x, rng = gallery
    col = build_index(store, tmp_path / "c")
    with pytest.raises(LookalikeError, match="already in the index"):
        col.add([names[0]], x[:1])
    with pytest.raises(LookalikeError, match="dimension"):
        col.add(["x.jpg"], np.zeros((1, 3), np.float32))
    with pytest.raises(LookalikeError, match="not in the index"):
        col.remove(["nope.jpg"])
    for bad in ("../evil.jpg", "/tmp/evil.jpg", "a/../../evil.jpg", "evil\n.jpg"):
        with pytest.raises(LookalikeError, match="cannot be a file name"):
            col.add([bad], _unit(rng, 1), record=True, files={bad: b"x"})
    assert not (tmp_path / "evil.jpg").exists() and len(col) == 300
    with pytest.raises(LookalikeError, match="larger than the gallery"):
        col.search(x[:1], 301)


@pytest.mark.parametrize("factory,saved", [("Flat", False), ("Flat", True), ("IVF4,Flat", False), ("IVF4,Flat", True),
                                           ("HNSW16,Flat", True)])
def test_rerank_uses_only_live_rows(gallery, tmp_path, factory, saved):
    from lookalike.postprocess import RerankConfig, rerank

    store, names, x, rng = gallery
    col = build_index(store, tmp_path / "c", IndexConfig(factory=factory))
    if factory.startswith("IVF"):
        assert col.gallery_features().shape == x.shape  # IVF,Flat keeps the vectors (no direct map needed)
    col.remove(names[:50])
    if saved:  # IVF: ids with gaps after compaction; HNSW: rows listed as deleted
        col.save()
        col = Collection.open(tmp_path / "c")
    cfg = RerankConfig(steps=("dba", "qe"))
    s, ids = col.search(x[50:55], 5, rerank=cfg)
    want_s, want_i = rerank(x[50:55], x[50:], 5, cfg)  # the chain on the live rows alone
    assert [[col.names[j] for j in row] for row in ids] == [[names[50 + j] for j in row] for row in want_i]
    np.testing.assert_allclose(s, want_s, atol=1e-6)


def test_a_kill_between_the_two_renames_is_undone(gallery, tmp_path):
    """A real SIGKILL at the worst moment of a swap (old folder moved away, new not yet moved in)."""
    import os
    import subprocess
    import sys

    store, names, x, rng = gallery
    build_index(store, tmp_path / "idx")
    (tmp_path / "gone.txt").write_text("\n".join(names[:5]) + "\n")
    env = {**os.environ, "LOOKALIKE_TEST_KILL_IN_SWAP": "1"}
    p = subprocess.run([sys.executable, "-m", "lookalike.cli", "update", str(tmp_path / "idx"), "--remove",
                        str(tmp_path / "gone.txt")], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    left = sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".idx.") and q.is_dir())
    assert not (tmp_path / "idx").exists() and any(".old-" in n for n in left) and any(n.endswith(".tmp") for n in left)
    col = Collection.open(tmp_path / "idx")  # the previous version is back, the leftovers are gone
    assert len(col) == 300 and names[0] in col.live_names()
    assert sorted(q.name for q in tmp_path.iterdir() if q.name.startswith(".idx.")) == [".idx.lock", ".idx.swap"]  # locks only
    # and the interrupted command, run again, completes
    p = subprocess.run([sys.executable, "-m", "lookalike.cli", "update", str(tmp_path / "idx"), "--remove",
                        str(tmp_path / "gone.txt")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and len(Collection.open(tmp_path / "idx")) == 295


def test_the_service_adds_ivf_rows_under_their_own_names_after_an_update_removal(tmp_path):
    """The reliability issue's reproduction, through the service itself: `index --factory IVF4,Flat`,
    `update --remove` (20 names), then an upload must be found as itself, `/stats` must count the
    vectors, and deleting a gallery name must not hide the upload."""
    pytest.importorskip("fastapi")
    from PIL import Image

    from conftest import lookalike_cli, make_photo, make_set
    from lookalike.serve import SearchService, ServeConfig

    make_set(tmp_path / "imgs", n_classes=6, per_class=10)
    lookalike_cli("extract", tmp_path / "imgs", "-o", tmp_path / "g.h5", "--model", "lite0", "--image-size", "64",
                  check=True)
    lookalike_cli("index", tmp_path / "g.h5", "-o", tmp_path / "idx", "--factory", "IVF4,Flat", "--nprobe", "4",
                  "--image-root", tmp_path / "imgs", check=True)
    gone = sorted(p.name for p in (tmp_path / "imgs").glob("*.jpg"))[:20]
    (tmp_path / "gone.txt").write_text("\n".join(gone) + "\n")
    lookalike_cli("update", tmp_path / "idx", "--remove", tmp_path / "gone.txt", check=True)
    service = SearchService(tmp_path / "idx", ServeConfig(threads=1, allow_anonymous_writes=True)
                            if "allow_anonymous_writes" in ServeConfig.__dataclass_fields__ else ServeConfig(threads=1))
    photo = make_photo(4242)
    import io

    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=95)
    img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    service.add("uploads/new.jpg", buf.getvalue(), img)
    hits = service.search(img, 3)
    assert hits[0]["name"] == "uploads/new.jpg" and hits[0]["score"] > 0.99
    stats = service.stats()
    assert stats["items"] == 41 == service.col.index.ntotal
    kept = sorted(p.name for p in (tmp_path / "imgs").glob("*.jpg"))[20]
    service.delete(kept)
    assert service.search(img, 1)[0]["name"] == "uploads/new.jpg" and service.stats()["items"] == 40


def test_update_refuses_a_folder_that_is_being_served(tmp_path):
    """A running service owns its folder: `update` would otherwise swap the folder under it and the
    service's later journal lines would go to the old, deleted copy."""
    from conftest import lookalike_cli
    from lookalike.collection import FolderLock

    x = np.eye(4, dtype=np.float32)
    write_store(tmp_path / "g.h5", [f"g{i}.jpg" for i in range(4)], x, {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "c")
    (tmp_path / "gone.txt").write_text("g0.jpg\n")
    held = FolderLock(tmp_path / "c", "changed by another command: it is being served").acquire()  # what serve holds
    p = lookalike_cli("update", tmp_path / "c", "--remove", tmp_path / "gone.txt")
    assert p.returncode == 2 and "in use (pid" in p.stderr and "Stop the server" in p.stderr, p.stderr
    assert len(Collection.open(tmp_path / "c")) == 4
    held.release()
    assert lookalike_cli("update", tmp_path / "c", "--remove", tmp_path / "gone.txt").returncode == 0
    assert len(Collection.open(tmp_path / "c")) == 3


def test_thumbnails_follow_links_the_gallery_contains(tmp_path):
    """Gallery files that are links (to photos kept elsewhere) are shown; names not in the
    collection never are."""
    import os

    from PIL import Image

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "real.jpg")
    (tmp_path / "imgs").mkdir()
    os.symlink(elsewhere / "real.jpg", tmp_path / "imgs" / "linked.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "plain.jpg")
    write_store(tmp_path / "g.h5", ["linked.jpg", "plain.jpg"], np.eye(2, 4, dtype=np.float32), {"model_id": "m"})
    col = build_index(tmp_path / "g.h5", tmp_path / "c", image_root=str(tmp_path / "imgs"))
    assert col.image_path("linked.jpg").resolve() == (elsewhere / "real.jpg").resolve()
    for outsider in ("../elsewhere/real.jpg", str(elsewhere / "real.jpg"), "missing.jpg"):
        with pytest.raises(LookalikeError, match="no image named"):
            col.image_path(outsider)


def test_recovery_never_takes_another_collections_leftovers(tmp_path):
    import os

    x = np.eye(4, dtype=np.float32)
    write_store(tmp_path / "g.h5", [f"g{i}.jpg" for i in range(4)], x, {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "col.v2")
    dead = 2 ** 22 + 12345  # no such process
    os.rename(tmp_path / "col.v2", tmp_path / f".col.v2.old-{dead}")  # col.v2 killed mid-swap
    with pytest.raises(LookalikeError, match="not a lookalike index"):
        Collection.open(tmp_path / "col")  # "col" must not adopt col.v2's backup
    assert (tmp_path / f".col.v2.old-{dead}").is_dir() and not (tmp_path / "col").exists()
    assert len(Collection.open(tmp_path / "col.v2")) == 4  # its own owner gets it back


def test_hnsw_name_removed_and_added_again_survives_saving(tmp_path):
    rng = np.random.default_rng(1)
    x = _unit(rng, 50)
    names = [f"g{i}.jpg" for i in range(50)]
    write_store(tmp_path / "g.h5", names, x, {"model_id": "m"})
    col = build_index(tmp_path / "g.h5", tmp_path / "h", IndexConfig(factory="HNSW16,Flat", ef_search=200))
    col.remove(["g3.jpg"])
    col.add(["g3.jpg"], -x[3:4])  # the name comes back with another photo
    col.save()
    again = Collection.open(tmp_path / "h")
    s, i = again.search(-x[3:4], 1)
    assert again.names[i[0, 0]] == "g3.jpg" and s[0, 0] > 0.999 and len(again) == 50
    assert again.search(x[3:4], 1)[1][0, 0] != 3  # the old row stays removed


def test_update_holds_the_folder_from_open_to_swap(tmp_path, monkeypatch):
    """Two updates at once: the second is refused instead of one silently losing the other's rows."""
    import threading

    import lookalike.store as store_mod
    from conftest import lookalike_cli
    from lookalike.api import update

    x = np.eye(4, dtype=np.float32)
    write_store(tmp_path / "g.h5", [f"g{i}.jpg" for i in range(3)], x[:3], {"model_id": "m"})
    write_store(tmp_path / "a.h5", ["a.jpg"], x[3:], {"model_id": "m"})
    write_store(tmp_path / "b.h5", ["b.jpg"], x[3:], {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "c")
    inside, go = threading.Event(), threading.Event()
    real = store_mod.read_store

    def slow_read(path, *a, **k):  # the first update pauses between opening and saving
        inside.set()
        go.wait(30)
        return real(path, *a, **k)

    monkeypatch.setattr(store_mod, "read_store", slow_read)
    t = threading.Thread(target=update, args=(tmp_path / "c", tmp_path / "a.h5"))
    t.start()
    assert inside.wait(30)
    p = lookalike_cli("update", tmp_path / "c", "--add", tmp_path / "b.h5")
    go.set()
    t.join(30)
    assert p.returncode == 2 and "in use" in p.stderr, p.stderr
    assert sorted(Collection.open(tmp_path / "c").live_names()) == ["a.jpg", "g0.jpg", "g1.jpg", "g2.jpg"]


def test_a_link_to_a_served_folder_locks_the_folder(tmp_path):
    import os

    from conftest import lookalike_cli
    from lookalike.collection import FolderLock

    x = np.eye(4, dtype=np.float32)
    write_store(tmp_path / "g.h5", [f"g{i}.jpg" for i in range(4)], x, {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    held = FolderLock(tmp_path / "link", "served").acquire()
    (tmp_path / "gone.txt").write_text("g0.jpg\n")
    p = lookalike_cli("update", tmp_path / "real", "--remove", tmp_path / "gone.txt")
    held.release()
    assert p.returncode == 2 and "in use" in p.stderr


def test_readers_never_pair_files_of_two_versions(tmp_path):
    """A reader opening the folder while updates swap versions in: every row it gets is mapped to its
    own name (each version keeps the same names on different rows)."""
    import threading
    import time

    from lookalike.api import update

    rng = np.random.default_rng(2)
    x = _unit(rng, 40)
    names = [f"g{i:02d}.jpg" for i in range(40)]
    vec = dict(zip(names, x))
    write_store(tmp_path / "g.h5", names, x, {"model_id": "m"})
    build_index(tmp_path / "g.h5", tmp_path / "c")
    stop, bad, opened = threading.Event(), [], [0]

    def writer():
        i = 0
        while not stop.is_set():
            n = names[i % 40]
            (tmp_path / "rm.txt").write_text(n + "\n")
            write_store(tmp_path / "add.h5", [n], vec[n][None], {"model_id": "m"})
            update(tmp_path / "c", add=tmp_path / "add.h5", remove=tmp_path / "rm.txt")  # n moves to the last row
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    deadline = time.time() + 4
    while time.time() < deadline:
        col = Collection.open(tmp_path / "c")
        rows = col.gallery_features()
        opened[0] += 1
        for j, n in enumerate(col.live_names()):
            if not np.allclose(rows[j], vec[n], atol=1e-6):
                bad.append(n)
    stop.set()
    t.join(30)
    assert opened[0] > 5 and not bad


def test_a_closed_service_gives_its_folder_back(tmp_path):
    pytest.importorskip("fastapi")
    from conftest import lookalike_cli, make_set
    from lookalike.serve import SearchService, ServeConfig

    make_set(tmp_path / "imgs", n_classes=2, per_class=2)
    lookalike_cli("extract", tmp_path / "imgs", "-o", tmp_path / "g.h5", "--model", "lite0", "--image-size", "64",
                  check=True)
    lookalike_cli("index", tmp_path / "g.h5", "-o", tmp_path / "idx", check=True)
    (tmp_path / "gone.txt").write_text("img_0_0.jpg\n")
    with SearchService(tmp_path / "idx", ServeConfig(threads=1)):
        assert lookalike_cli("update", tmp_path / "idx", "--remove", tmp_path / "gone.txt").returncode == 2
    assert lookalike_cli("update", tmp_path / "idx", "--remove", tmp_path / "gone.txt").returncode == 0


def test_add_refuses_non_finite_features_and_journals_nothing(tmp_path):
    """A NaN or inf row is refused with the name, before the journal: it would otherwise be written,
    then refused as damaged when the folder is opened again."""
    import numpy as np

    from lookalike.collection import Collection
    from lookalike.errors import LookalikeError
    from lookalike.index import IndexConfig, build_index
    from lookalike.store import write_store

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 8)).astype(np.float32)
    write_store(tmp_path / "g.h5", [f"{i}.jpg" for i in range(20)], x, {"model": "toy", "model_id": "toy"})
    build_index(tmp_path / "g.h5", tmp_path / "col", IndexConfig(whiten=False))
    col = Collection.open(tmp_path / "col")
    for bad in (np.nan, np.inf):
        row = rng.standard_normal((2, 8)).astype(np.float32)
        row[1, 3] = bad
        with pytest.raises(LookalikeError, match=r"'new1.jpg'.*not finite"):
            col.add(["new0.jpg", "new1.jpg"], row, record=True)
    assert len(col) == 20 and not (tmp_path / "col" / "journal.jsonl").exists()
    col.add(["new0.jpg"], row[:1], record=True)
    assert len(Collection.open(tmp_path / "col")) == 21
