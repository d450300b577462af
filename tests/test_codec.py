import json

import numpy as np
import pytest

from conftest import lookalike_cli
from lookalike.codec import Codec, evaluate_codec, read_codes, write_codes
from lookalike.errors import LookalikeError
from lookalike.formats import write_naic_features
from lookalike.numeric import orthonormal_rows, pca_basis


def identities(n_ids=60, per=10, d=256, seed=0):
    """Clustered, non-negative, L2-normalised features of many identities (like re-ID features)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, d))
    x = np.repeat(centres, per, axis=0) + 0.6 * rng.normal(size=(n_ids * per, d))
    x = np.maximum(x, 0).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(n_ids), per)


@pytest.fixture(scope="module")
def data():
    return identities()


CASES = [("pq", 8), ("opq", 8), ("sq", 8), ("sq", 4), ("learned", 8)]


@pytest.mark.parametrize("nbytes", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("method,bits", CASES)
def test_every_budget_is_exact_and_stable(data, method, bits, nbytes):
    x, y = data
    if method == "sq" and nbytes * 8 // bits > x.shape[1]:
        with pytest.raises(LookalikeError, match="more than the features"):
            Codec(nbytes=nbytes, method=method, bits=bits).fit(x)
        return
    kw = {"epochs": 1, "latent_dim": 2 * nbytes} if method == "learned" else {}
    c = Codec(nbytes=nbytes, method=method, bits=bits, **kw).fit(x, y if method == "learned" else None)
    codes = c.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (len(x), nbytes)
    rec = c.decode(codes)
    assert rec.dtype == np.float32 and rec.shape == x.shape
    assert np.array_equal(c.encode(rec), codes)  # encode -> decode -> encode is stable
    assert np.array_equal(c.decode(codes), rec)


def test_decoding_is_exact_whatever_the_summation_order(data):
    """The latent and projection grids make every partial sum exact: any order gives the same bits."""
    x, _ = data
    c = Codec(nbytes=32, method="sq", bits=8).fit(x)
    codes = c.encode(x[:50])
    got = c.decode(codes)
    z = np.round((c.lo_ + codes.astype(np.float64) * c.step_) / c._latent_step()) * c._latent_step()
    acc = np.zeros((len(z), c.dim_))
    for j in reversed(range(z.shape[1])):  # the opposite order to any BLAS, one term at a time
        acc = acc + z[:, j:j + 1] * c.proj_[j][None, :]
    ref = acc.astype(np.float32) + c.mean_
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_more_bytes_reconstruct_better(data):
    x, y = data
    errs = [evaluate_codec(Codec(nbytes=b, method="pq").fit(x), x, y)["relative_squared_error"] for b in (16, 64, 256)]
    assert errs[0] > errs[1] > errs[2]
    m = evaluate_codec(Codec(nbytes=256, method="pq").fit(x), x, y)
    assert m["score_ratio"] > 0.97 and m["cosine_to_original"] > 0.95


def test_learned_codec_trains_and_records_history(data):
    from lookalike.codec_train import discriminant_basis, train_projection

    x, y = data
    proj, history = train_projection(x - x.mean(0), x.mean(0), y, 32, epochs=2, seed=0)
    assert proj.shape == (32, x.shape[1]) and [h["epoch"] for h in history] == [1, 2]
    assert np.allclose(proj @ proj.T, np.eye(32), atol=1e-4)  # rows stay orthonormal while training
    c = Codec(nbytes=16, method="learned", epochs=2, latent_dim=32).fit(x, y)
    # 60 identities: the discriminant subspace (59 dims) fills the fixed latent of 32, so the candidates are
    # PCA, LDA and the better of the two fine-tuned; the best held-out score wins
    sel = c.history_[0]["selection"]
    assert sorted(sel) == ["32/lda", "32/lda+trained", "32/pca"], sel
    assert c.history_[0]["chosen"] == max(sel, key=sel.get) == "32/lda", c.history_[0]
    assert len(c.history_) == 1  # the fine-tuned candidate lost: no training epochs recorded
    # ... and is refitted on all of x: the codec's projection is LDA's (up to its 2^-18 grid)
    lda = orthonormal_rows(discriminant_basis(x - c.mean_, y, 32, fill="zero"))
    assert c.latent_dim == c.latent_dim_ == 32 and np.abs(c.proj_ - lda).max() <= 2.0 ** -19
    assert evaluate_codec(c, x, y)["score_ratio"] > 0.5


def test_learned_refit_uses_the_winning_kind_exactly():
    """A winning "lda+pca" is refitted as "lda+pca" (PCA-completed), not as "lda" (zero-padded)."""
    from lookalike.codec_train import choose_and_train_projection, discriminant_basis

    x, y = identities(n_ids=40, per=10)  # 39 discriminant directions: a latent of 64 is completed by PCA
    proj, m, history = choose_and_train_projection(x, x.mean(0), y, 16, 64, epochs=0, seed=0)
    sel = history[0]["selection"]
    assert sorted(sel) == ["64/lda", "64/lda+pca", "64/pca"] and history[0]["chosen"] == "64/lda+pca", history
    assert sel["64/lda+pca"] == max(sel.values())
    assert m == 64 and np.abs(proj).sum(1).min() > 0  # no zero-padded rows
    assert np.array_equal(proj, orthonormal_rows(discriminant_basis(x - x.mean(0), y, 64, fill="pca")))


def test_registered_method_round_trips_and_ids_are_stable(data, tmp_path, monkeypatch):
    import struct

    import lookalike.codec as codec_mod
    from lookalike.codec import codec_method, register_codec_method

    # the ids every code file stores: those of the files written before the registry, never renumbered
    assert codec_mod.METHODS == ("sq", "pq", "opq", "learned")
    assert [codec_method(m).id for m in codec_mod.METHODS] == [0, 1, 2, 3]
    x, _ = data
    opq = Codec(nbytes=16, method="opq").fit(x)
    write_codes(tmp_path / "opq.codes", opq.encode(x[:10]), opq)
    magic, version, method_id = struct.unpack_from("<6sHB", (tmp_path / "opq.codes").read_bytes())
    assert (magic, version, method_id) == (b"LKCODE", 2, 2)

    # a toy method: a fixed random rotation to 32 dims, then PQ; registered for this test only
    monkeypatch.setattr(codec_mod, "_METHODS_BY_ID", dict(codec_mod._METHODS_BY_ID))
    monkeypatch.setattr(codec_mod, "METHODS", codec_mod.METHODS)

    def toy_projection(codec, feats, labels):
        return orthonormal_rows(np.random.default_rng(codec.seed).normal(size=(32, feats.shape[1])))

    entry = register_codec_method(200, "toy", toy_projection)
    assert register_codec_method(200, "toy", toy_projection) is entry  # the same entry again: a no-op
    assert codec_mod.METHODS == ("sq", "pq", "opq", "learned", "toy") and codec_method("toy").id == 200
    with pytest.raises(LookalikeError, match="clashes"):
        register_codec_method(2, "toy2", toy_projection)  # opq's id
    with pytest.raises(LookalikeError, match="clashes"):
        register_codec_method(201, "opq", toy_projection)
    with pytest.raises(LookalikeError, match="0..255"):
        register_codec_method(256, "toy3", toy_projection)
    c = Codec(nbytes=16, method="toy", seed=3).fit(x)
    assert c.proj_.shape == (32, x.shape[1]) and np.abs(c.proj_ - toy_projection(c, x, None)).max() <= 2.0 ** -19
    codes = c.encode(x)
    assert np.array_equal(c.encode(c.decode(codes)), codes)
    c.save(tmp_path / "toy.npz")
    again = Codec.load(tmp_path / "toy.npz")
    assert again.method == "toy" and again.codec_id() == c.codec_id()
    assert np.array_equal(again.decode(codes), c.decode(codes))
    write_codes(tmp_path / "toy.codes", codes, again, [f"n{i}" for i in range(len(x))])
    assert struct.unpack_from("<6sHB", (tmp_path / "toy.codes").read_bytes())[2] == 200
    back, names = read_codes(tmp_path / "toy.codes", again)
    assert np.array_equal(back, codes) and names[-1] == f"n{len(x) - 1}"

    # once the method is gone, its files are refused by name (codec) and by id (codes), clearly
    monkeypatch.undo()
    assert codec_mod.METHODS == ("sq", "pq", "opq", "learned")
    with pytest.raises(LookalikeError, match="toy.npz: a codec of method 'toy', which this lookalike does not know"):
        Codec.load(tmp_path / "toy.npz")
    with pytest.raises(LookalikeError, match="codec method id 200, which this lookalike does not know"):
        read_codes(tmp_path / "toy.codes")


def test_command_functions(data, tmp_path):
    """One plain function per `lookalike codec` verb: the files they write hold what the codec computes."""
    import faiss

    from lookalike.codec import decode_file, encode_file, evaluate_file, fit_file, index_codes
    from lookalike.store import read_store, write_store

    x, y = data
    names = [f"g{i}" for i in range(len(x))]
    write_store(tmp_path / "g.h5", names, x, {"model_id": "m1", "fingerprint": "f"})
    (tmp_path / "labels.csv").write_text("image,label\n" + "".join(f"{n},{lab}\n" for n, lab in zip(names, y)))
    c = fit_file(tmp_path / "g.h5", tmp_path / "c.npz", 16, "pq", seed=1)
    assert c.fit_count_ == len(x) and c.method == "pq" and c.nbytes == 16 and c.seed == 1
    ref = Codec(nbytes=16, method="pq", seed=1).fit(x)
    assert np.array_equal(ref.encode(x), c.encode(x))  # the same fit as the class gives
    loaded = Codec.load(tmp_path / "c.npz")
    assert loaded.codec_id() == c.codec_id() and loaded.describe()["model_id"] == "m1"

    with pytest.raises(LookalikeError, match="give -o CODES and/or --naic-dir DIR"):
        encode_file(tmp_path / "g.h5", tmp_path / "c.npz")
    assert encode_file(tmp_path / "g.h5", tmp_path / "c.npz", tmp_path / "g.codes", tmp_path / "naic") == len(x)
    codes, got_names = read_codes(tmp_path / "g.codes", loaded)
    assert np.array_equal(codes, c.encode(x)) and got_names == names
    assert (tmp_path / "naic" / "g7.dat").read_bytes() == codes[7].tobytes()

    assert decode_file(tmp_path / "g.codes", tmp_path / "c.npz", tmp_path / "d.h5") == len(x)
    st = read_store(tmp_path / "d.h5")
    assert st.names == names and np.array_equal(st.features, c.decode(codes)) and st.model_id == "decoded"

    col = index_codes(tmp_path / "g.codes", tmp_path / "c.npz", tmp_path / "idx", nlist=4)
    assert col.names == names and col.index.ntotal == len(x)
    assert col.manifest["factory"] == "codec:pq16,IVF4" and col.manifest["model_id"] == "m1"
    assert faiss.extract_index_ivf(col.index).nlist == 4 and (tmp_path / "idx").is_dir()

    m = evaluate_file(tmp_path / "g.h5", tmp_path / "c.npz", tmp_path / "labels.csv", tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == m
    ref_m = evaluate_codec(loaded, x, y.astype(str))
    assert m["count"] == len(x) and m["method"] == "pq" and m["nbytes"] == 16
    for key in ("relative_squared_error", "mse", "cosine_to_original", "digix_score", "digix_score_float32"):
        assert m[key] == ref_m[key], key


def test_code_file_round_trip_and_errors(data, tmp_path):
    x, _ = data
    c = Codec(nbytes=16, method="pq").fit(x)
    codes = c.encode(x)
    path = tmp_path / "x.codes"
    write_codes(path, codes, c, [f"n{i}" for i in range(len(x))])
    back, names = read_codes(path, c)
    assert np.array_equal(back, codes) and names[3] == "n3"
    raw = path.read_bytes()
    (tmp_path / "trunc.codes").write_bytes(raw[:-5])
    with pytest.raises(LookalikeError, match="truncated"):
        read_codes(tmp_path / "trunc.codes")
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    (tmp_path / "flip.codes").write_bytes(bytes(flipped))
    with pytest.raises(LookalikeError, match="checksum"):
        read_codes(tmp_path / "flip.codes")
    other = Codec(nbytes=16, method="pq", seed=1).fit(x)
    with pytest.raises(LookalikeError, match="another codec"):
        read_codes(path, other)
    (tmp_path / "junk.codes").write_bytes(b"hello world, not codes at all, no no no no")
    with pytest.raises(LookalikeError, match="not a lookalike code file"):
        read_codes(tmp_path / "junk.codes")
    c.save(tmp_path / "c.npz")
    again = Codec.load(tmp_path / "c.npz")
    assert np.array_equal(again.decode(codes), c.decode(codes)) and again.codec_id() == c.codec_id()
    with pytest.raises(LookalikeError, match="not a lookalike codec"):
        Codec.load(tmp_path / "junk.codes")


def test_cli_naic_round_trip(data, tmp_path):
    x, y = data
    feats = tmp_path / "feats"
    names = [f"{i:05d}" for i in range(len(x))]
    write_naic_features(feats, names, x)
    (tmp_path / "train_list.txt").write_text("".join(f"{n}.png {lab}\n" for n, lab in zip(names, y)))
    lookalike_cli("codec", "fit", feats, "-o", tmp_path / "c.npz", "--bytes", "32", "--method", "pq", check=True)
    lookalike_cli("codec", "encode", feats, "-c", tmp_path / "c.npz", "-o", tmp_path / "x.codes",
                  "--naic-dir", tmp_path / "codes", check=True)
    sizes = {p.stat().st_size for p in (tmp_path / "codes").glob("*.dat")}
    assert sizes == {32} and len(list((tmp_path / "codes").glob("*.dat"))) == len(x)
    lookalike_cli("codec", "decode", tmp_path / "codes", "-c", tmp_path / "c.npz", "-o", tmp_path / "a.h5", check=True)
    lookalike_cli("codec", "decode", tmp_path / "x.codes", "-c", tmp_path / "c.npz", "-o", tmp_path / "b.h5", check=True)
    from lookalike.store import read_store

    a, b = read_store(tmp_path / "a.h5"), read_store(tmp_path / "b.h5")
    assert a.names == b.names == names and np.array_equal(a.features, b.features)
    p = lookalike_cli("codec", "evaluate", feats, "-c", tmp_path / "c.npz", "--labels", tmp_path / "train_list.txt",
                      "--json", tmp_path / "m.json", check=True)
    m = json.loads((tmp_path / "m.json").read_text())
    assert "of float32" in p.stdout and m["bytes_per_vector"] == 32 and 0 < m["score_ratio"] <= 1.05
    # a code one byte over budget is refused, naming the file
    (tmp_path / "codes" / "00000.dat").write_bytes(b"\0" * 33)
    p = lookalike_cli("codec", "decode", tmp_path / "codes", "-c", tmp_path / "c.npz", "-o", tmp_path / "z.h5")
    assert p.returncode == 2 and "00000.dat: 33 bytes" in p.stderr
    p = lookalike_cli("codec", "decode", tmp_path / "x.codes", "-c", tmp_path / "nope.npz", "-o", tmp_path / "z.h5")
    assert p.returncode == 2 and "codec file not found" in p.stderr


@pytest.mark.parametrize("method", ["pq", "opq"])
def test_code_space_index_matches_brute_force_on_decoded(data, method):
    import faiss

    from lookalike.codec import code_index

    x, _ = data
    c = Codec(nbytes=16, method=method).fit(x)
    codes = c.encode(x[100:])
    q = x[:100]
    dec = c.decode(codes)
    ref = np.argsort(-(q @ dec.T), axis=1, kind="stable")[:, :10]
    flat = code_index(c, codes)
    stored = faiss.vector_to_array(faiss.downcast_index(flat.index).codes).reshape(len(codes), -1)
    assert np.array_equal(stored, codes)  # the index holds exactly our B bytes per vector
    _, ids = flat.search(q, 10)
    assert (ids == ref).all(axis=1).mean() >= 0.99
    ivf = code_index(c, codes, nlist=8)
    faiss.extract_index_ivf(ivf).nprobe = 8  # all lists: the same ranking
    _, ids = ivf.search(q, 10)
    assert (ids == ref).all(axis=1).mean() >= 0.99
    with pytest.raises(LookalikeError, match="PQ codec"):
        code_index(Codec(nbytes=16, method="sq").fit(x), codes)


def test_cli_code_index_and_naic_search(data, tmp_path):
    from lookalike.store import write_store

    x, _ = data
    names = [f"g{i}" for i in range(len(x))]
    write_store(tmp_path / "g.h5", names, x, {"model_id": "m1", "fingerprint": "f"})
    write_store(tmp_path / "q.h5", names[:5], x[:5], {"model_id": "m1", "fingerprint": "f"})
    lookalike_cli("codec", "fit", tmp_path / "g.h5", "-o", tmp_path / "c.npz", "--bytes", "16", "--method", "pq", check=True)
    lookalike_cli("codec", "encode", tmp_path / "g.h5", "-c", tmp_path / "c.npz", "-o", tmp_path / "g.codes", check=True)
    lookalike_cli("codec", "index", tmp_path / "g.codes", "-c", tmp_path / "c.npz", "-o", tmp_path / "idx", check=True)
    lookalike_cli("search", tmp_path / "idx", "--query-features", tmp_path / "q.h5", "-o", tmp_path / "r.json",
                  "--format", "naic", check=True)
    res = json.loads((tmp_path / "r.json").read_text())
    assert list(res) == names[:5] and all(len(v) == 100 for v in res.values())
    assert sum(res[n][0] == n for n in names[:5]) >= 4  # each query finds itself first from 16-byte codes


def _nuisance_world(n_ids, per, seed, d=96):
    """Identity signal in 8 directions, a larger shared nuisance (pose, light) in 8 others."""
    world = np.random.default_rng(7)
    basis = np.linalg.qr(world.normal(size=(d, 16)))[0].T
    rng = np.random.default_rng(seed)
    ident = np.repeat(rng.normal(size=(n_ids, 8)), per, axis=0)
    nuis = 2.5 * rng.normal(size=(n_ids * per, 8))
    x = np.hstack([ident, nuis]) @ basis + 0.1 * rng.normal(size=(n_ids * per, d))
    return x.astype(np.float32), np.repeat(np.arange(n_ids), per), basis


def test_discriminant_basis_finds_the_identity_subspace():
    from lookalike.codec_train import discriminant_basis

    x, y, basis = _nuisance_world(80, 6, seed=1)
    xc = x - x.mean(0)
    lda = discriminant_basis(xc, y, 12)
    assert np.allclose(lda @ lda.T, np.eye(12), atol=1e-8)
    ident, nuis = basis[:8], basis[8:]
    # the first 8 LDA rows span the identity directions; PCA's first 8 are mostly nuisance
    assert np.linalg.norm(lda[:8] @ ident.T) ** 2 / 8 > 0.95
    assert np.linalg.norm(pca_basis(xc, 8) @ nuis.T) ** 2 / 8 > 0.6


def test_learned_codec_beats_opq_when_nuisance_dominates():
    """Fitted on some identities, scored on others: the learned codec keeps the identity signal."""
    from lookalike.metrics import leave_one_out
    from lookalike.postprocess import l2n

    x, y, _ = _nuisance_world(150, 6, seed=2)
    xt, yt, _ = _nuisance_world(60, 6, seed=3)
    learned = Codec(nbytes=16, method="learned", epochs=0).fit(x, y)
    opq = Codec(nbytes=16, method="opq").fit(x)
    s_learned = leave_one_out(l2n(learned.decode(learned.encode(xt))), yt)["digix_score"]
    s_opq = leave_one_out(l2n(opq.decode(opq.encode(xt))), yt)["digix_score"]
    assert learned.history_[0]["chosen"] == "16/lda", learned.history_[0]  # the pure discriminant subspace
    assert s_learned > s_opq + 0.1, (s_learned, s_opq)


def test_holdout_by_identities_or_images():
    from lookalike.codec_train import _holdout

    y = np.repeat(np.arange(30), 10)
    tr, va = _holdout(len(y), y, 0, "identities")
    assert not set(y[tr]) & set(y[va]) and len(set(y[va])) == 6  # unseen identities
    tr, va = _holdout(len(y), y, 0, "images")
    assert set(y[tr]) == set(y[va]) == set(range(30))  # every identity on both sides
    assert np.bincount(y[va]).tolist() == [2] * 30 and not set(tr) & set(va)
    with pytest.raises(LookalikeError, match="selection"):
        Codec(method="learned", selection="everything")


def test_zero_padded_latent_rows_stay_zero():
    from lookalike.codec_train import discriminant_basis

    x, y, _ = _nuisance_world(40, 8, seed=4)
    p = discriminant_basis(x - x.mean(0), y, 48, fill="zero")  # 39 discriminant rows, 9 empty
    assert np.abs(p[39:]).max() == 0 and np.allclose(p[:39] @ p[:39].T, np.eye(39), atol=1e-8)
    q = orthonormal_rows(p)
    assert np.abs(q[39:]).max() == 0 and np.allclose(np.abs(np.diag(q[:39] @ p[:39].T)), 1)  # same rows, up to sign
    c = Codec(nbytes=16, method="pq").fit_quantiser(x, p, x.mean(0))
    rec = c.decode(c.encode(x))
    assert np.allclose((rec - c.mean_) @ p[39:].T, 0)  # nothing comes back from the empty rows
