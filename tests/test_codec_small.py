"""The default codec (opq) on small fitting sets: the latent-size rule, its gain over the full rotation
on hand-made data, and old codec and code files still decoding byte for byte."""
import hashlib
import json
import struct
import zlib

import numpy as np
import pytest

from lookalike.codec import Codec, opq_latent_dim, opq_rotation, read_codes, write_codes
from lookalike.errors import LookalikeError
from lookalike.metrics import retrieval_metrics
from lookalike.numeric import knn, l2n


@pytest.mark.parametrize("n,d,nbytes,latent", [
    (3017, 1792, 16, 1792),   # 112 dims per sub-quantiser: coarse, the full rotation (as before)
    (3017, 1792, 32, 1792),   # 56
    (3017, 1792, 64, 128),    # 28: small set -> two principal directions per byte
    (3017, 1792, 128, 256),
    (3017, 1792, 256, 512),
    (2640, 1280, 32, 1280),   # 40: coarse
    (2640, 1280, 64, 128),
    (14335, 1792, 64, 128),   # just under 8 vectors per dimension: still small
    (14336, 1792, 64, 1792),  # 8 per dimension: the full rotation, as before the rule
    (20000, 1000, 64, 1024),  # large set, d padded to a multiple of the sub-quantisers
    (2048 * 4, 2048, 64, 128),  # exactly 32 dims per sub-quantiser counts as fine, not coarse
    (1200, 1792, 16, 1200),   # fewer vectors than dimensions: never more latent dims than vectors
    (300, 1792, 256, 256),    # never fewer than one dim per sub-quantiser
    (255, 32, 8, 16),
    (256, 32, 8, 32),
])
def test_rule_picks_the_latent_size(n, d, nbytes, latent):
    assert opq_latent_dim(n, d, nbytes) == latent


def world(n_ids, per, d, sig, noise, seed=0):
    """Non-negative, normalised features of ``n_ids`` classes whose centres span a ``sig``-d subspace."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, sig)))[0].T
    x = np.repeat(rng.normal(size=(n_ids, sig)) @ basis, per, axis=0) + noise * rng.normal(size=(n_ids * per, d))
    return l2n(np.maximum(x, 0)), np.repeat(np.arange(n_ids), per)


def protocol_score(codec, q, ql, g, gl):
    _, ids = knn(l2n(codec.decode(codec.encode(q))), l2n(codec.decode(codec.encode(g))), 10)
    return retrieval_metrics(gl[ids] == ql[:, None], np.array([(gl == lab).sum() for lab in ql]))[0]["digix_score"]


def test_small_set_default_beats_the_full_rotation():
    """360 gallery vectors of 256 dims at 32 B (8 dims per sub-quantiser): the full rotation's
    sub-quantisers over-fit the gallery and the held-out queries lose ~0.17; the default keeps 64
    principal directions."""
    x, y = world(60, 12, 256, 32, 0.5)
    g, gl, q, ql = x[::2], y[::2], x[1::2], y[1::2]
    new = Codec(nbytes=32).fit(g)
    old = Codec(nbytes=32, latent_dim=256).fit(g)
    assert (new.latent_dim_, old.latent_dim_) == (64, 256)
    assert new.history_ == [{"chosen": "64/pca+opq", "fit_count": 360}]
    assert old.history_[0]["chosen"] == "256/opq"
    s_new, s_old = protocol_score(new, q, ql, g, gl), protocol_score(old, q, ql, g, gl)
    assert s_new > s_old + 0.1, (s_new, s_old)
    codes = new.encode(q)
    assert np.array_equal(new.encode(new.decode(codes)), codes)  # still a stable, exact codec


def test_full_rotation_is_the_old_fit_and_large_sets_keep_it():
    x, _ = world(40, 8, 32, 16, 0.5)  # 320 vectors of 32 dims: 10 per dimension, a large set for the rule
    c = Codec(nbytes=8).fit(x)
    assert c.latent_dim_ == 32 and c.history_[0]["chosen"] == "32/opq"
    ref = np.round(opq_rotation(x - c.mean_, 8, 0) / 2.0 ** -18) * 2.0 ** -18  # the projection every opq fit used
    assert np.array_equal(c.proj_, ref)
    assert Codec(nbytes=8, latent_dim=32).fit(x).codec_id() == c.codec_id()
    assert Codec(nbytes=8, latent_dim=1000).fit(x).codec_id() == c.codec_id()  # anything >= d: the full rotation
    small = Codec(nbytes=8, latent_dim=16).fit(x)
    assert small.proj_.shape == (16, 32) and np.allclose(small.proj_ @ small.proj_.T, np.eye(16), atol=1e-5)
    with pytest.raises(LookalikeError, match="multiple of the 8 sub-quantisers"):
        Codec(nbytes=8, latent_dim=12).fit(x)


def test_fewer_vectors_than_dimensions_do_not_crash():
    """faiss's OPQ crashes the process (segfault) on fewer training vectors than dimensions; the
    default never asks it to."""
    x = l2n(np.random.default_rng(0).normal(size=(300, 1024)).astype(np.float32))
    c = Codec(nbytes=8).fit(x)  # 128 dims per sub-quantiser: the full rotation, but of 1,024 dims from 300 vectors
    assert c.latent_dim_ == 296 and c.proj_.shape == (296, 1024) and c.history_[0]["chosen"] == "296/pca+opq"
    codes = c.encode(x)
    assert np.array_equal(c.encode(c.decode(codes)), codes)


# An opq codec file in the layout every lookalike wrote before the small-set rule (full rotation,
# codec meta version 1, no history), built by hand; these digests were computed with the code before the
# rule and must never change: the decoded bits, the codec id a code file names, a version-2 code file.
OLD_CODEC_ID = "ba00a17e2624251e"
OLD_DECODED_SHA256 = "e69dd8ef471b7fda079daeb143f90d1a7e0b04c66f1fc9d22c083fa20da7fd74"
OLD_V2_FILE_SHA256 = "c9b583a4a83ae8756cab8839ec321de31644f7e6e2486bf1805caab7517d19ce"


def old_opq_codec(path):
    d, nbytes = 8, 4
    h = np.array([[1.0]])
    for _ in range(3):
        h = np.block([[h, h], [h, -h]])
    proj = np.round(h / np.sqrt(8) * 2 ** 18) / 2 ** 18  # a Hadamard rotation on the projection grid
    mean = (np.arange(d) / 16 - 0.2).astype(np.float32)
    cents = (((np.arange(256)[None, :, None] * 37 + np.arange(nbytes)[:, None, None] * 11
               + np.arange(2)[None, None, :] * 5) % 256) - 128) / 128.0
    meta = {"method": "opq", "nbytes": nbytes, "bits": 8, "dim": d, "latent_dim": d, "model_id": "m",
            "kind": "lookalike-codec", "version": 1, "seed": 0, "history": []}
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), mean_=mean, scale_exp_=np.array(1), proj_=proj, centroids_=cents)
    codes = ((np.arange(20)[:, None] * 29 + np.arange(nbytes)[None, :] * 71) % 256).astype(np.uint8)
    return codes, proj, mean, cents


def test_old_codec_and_code_files_decode_byte_for_byte(tmp_path):
    codes, proj, mean, cents = old_opq_codec(tmp_path / "old.npz")
    c = Codec.load(tmp_path / "old.npz")
    assert c.codec_id().hex() == OLD_CODEC_ID and c.latent_dim_ == 8
    # a version-1 code file (CRC of the payload only) and a version-2 one, as the old code wrote them
    payload = codes.tobytes()
    head = struct.pack("<6sHBBIQI8s", b"LKCODE", 1, 2, 8, 4, len(codes), 8, c.codec_id())
    (tmp_path / "v1.codes").write_bytes(head + struct.pack("<I", zlib.crc32(payload)) + payload)
    write_codes(tmp_path / "v2.codes", codes, c)
    assert hashlib.sha256((tmp_path / "v2.codes").read_bytes()).hexdigest() == OLD_V2_FILE_SHA256
    reference = (cents[np.arange(4)[None, :], codes.astype(np.int64)].reshape(len(codes), 8) @ proj).astype(np.float32) + mean
    for name in ("v1.codes", "v2.codes"):
        got = c.decode(read_codes(tmp_path / name, c)[0])
        assert hashlib.sha256(got.tobytes()).hexdigest() == OLD_DECODED_SHA256
        assert np.array_equal(got.view(np.uint32), reference.view(np.uint32))


def test_learned_codec_opq_candidate_on_fewer_vectors_than_dimensions():
    """The learned codec's opq candidate follows the same rule when its training split is smaller
    than the dimension (before, faiss crashed the process here)."""
    x = l2n(np.random.default_rng(1).normal(size=(300, 512)).astype(np.float32))
    c = Codec(nbytes=16, method="learned", epochs=0).fit(x)  # 240 training vectors: too few to score, opq kept
    assert c.history_[0]["chosen"] == "32/opq" and c.proj_.shape == (32, 512)
