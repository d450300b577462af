"""The codec's files under attack: code files (header checksum, names that round-trip), codec .npz
files (data only, every value checked), NAIC .dat folders (confined to their folder, sub-folders)."""
import io
import json
import struct
import zipfile
import zlib

import numpy as np
import pytest

from conftest import lookalike_cli
from lookalike.codec import Codec, read_codes, write_codes
from lookalike.errors import LookalikeError
from lookalike.formats import read_naic_codes, read_naic_features, write_naic_codes, write_naic_features
from lookalike.store import read_store, write_store

HEADER = struct.Struct("<6sHBBIQI8sI")


def feats(n=300, d=32, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(features, a fitted 8-byte opq codec, its .npz path)."""
    x = feats()
    c = Codec(nbytes=8, method="opq").fit(x)
    path = tmp_path_factory.mktemp("codec") / "c.npz"
    c.save(path)
    return x, c, path


def v1_file(path, codes, codec, names=None):
    """A code file as lookalike wrote it before version 2: CRC-32 of the payload only, names.txt."""
    payload = np.ascontiguousarray(codes, np.uint8).tobytes()
    path.write_bytes(HEADER.pack(b"LKCODE", 1, 2, codec.bits, codec.nbytes, len(codes), codec.dim_, codec.codec_id(),
                                 zlib.crc32(payload)) + payload)
    if names is not None:
        (path.parent / (path.name + ".names.txt")).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


# ---------------------------------------------------------------- 1. names round-trip exactly

ODD_NAMES = ["plain", "new\nline", "cr\rreturn", "crlf\r\n", "sep\u2028line", "nel\x85", "tab\tx", "", " padded ",
             'quo"te', "ünï/cödé.jpg", "a,b{c}", "\\back\\slash", "trailing\n"]


def test_any_name_round_trips_through_a_code_file(fitted, tmp_path):
    x, c, _ = fitted
    codes = c.encode(x[: len(ODD_NAMES)])
    write_codes(tmp_path / "x.codes", codes, c, ODD_NAMES)
    back, names = read_codes(tmp_path / "x.codes", c)
    assert np.array_equal(back, codes) and names == ODD_NAMES


def test_cli_encode_then_decode_keeps_a_name_with_a_newline(fitted, tmp_path):
    """Was: encode exited 0, then decode of its own output failed ("301 names for 300 codes")."""
    x, _, codec_path = fitted
    names = [f"g{i}" for i in range(len(x))]
    names[3], names[7] = "bad\nname", "two\r\nlines\u2028more"
    write_store(tmp_path / "s.h5", names, x, {"model_id": "m", "fingerprint": "f"})
    lookalike_cli("codec", "encode", tmp_path / "s.h5", "-c", codec_path, "-o", tmp_path / "s.codes", check=True)
    lookalike_cli("codec", "decode", tmp_path / "s.codes", "-c", codec_path, "-o", tmp_path / "d.h5", check=True)
    assert read_store(tmp_path / "d.h5").names == names


def test_old_code_files_still_load_and_stale_names_are_noticed(fitted, tmp_path):
    x, c, _ = fitted
    codes = c.encode(x[:20])
    names = [f"n{i}" for i in range(20)]
    v1_file(tmp_path / "old.codes", codes, c, names)
    back, got = read_codes(tmp_path / "old.codes", c)
    assert np.array_equal(back, codes) and got == names
    # writing a new file at that path replaces the old sidecar
    write_codes(tmp_path / "old.codes", codes, c, names[::-1])
    assert not (tmp_path / "old.codes.names.txt").exists()
    assert read_codes(tmp_path / "old.codes", c)[1] == names[::-1]
    # names left beside another code file (same count) are refused, not silently misapplied
    write_codes(tmp_path / "other.codes", codes[::-1], c, names)
    (tmp_path / "old.codes.names.json").write_bytes((tmp_path / "other.codes.names.json").read_bytes())
    with pytest.raises(LookalikeError, match="names of another code file"):
        read_codes(tmp_path / "old.codes", c)
    for junk in ("not json", "[1, 2]", '{"kind": "lookalike-code-names", "names": [1]}'):
        (tmp_path / "old.codes.names.json").write_text(junk)
        with pytest.raises(LookalikeError, match="old.codes.names.json"):
            read_codes(tmp_path / "old.codes", c)


# ---------------------------------------------------------------- 2. every header bit is checked


def test_every_single_bit_flip_of_the_header_is_refused(fitted, tmp_path):
    """Was: twelve flips of the method, bits and dimension fields were accepted (the CRC covered only
    the payload)."""
    x, c, _ = fitted
    path = tmp_path / "x.codes"
    write_codes(path, c.encode(x[:10]), c)
    raw = path.read_bytes()
    bad = tmp_path / "bad.codes"
    for bit in range(HEADER.size * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad.write_bytes(bytes(flipped))
        for codec in (None, c):
            with pytest.raises(LookalikeError, match="bad.codes"):
                read_codes(bad, codec)
                pytest.fail(f"bit {bit} flipped was accepted (codec={codec is not None})")
    assert struct.unpack_from("<6sH", raw) == (b"LKCODE", 2)  # the version whose checksum covers the header


def test_version_1_files_are_checked_against_the_codec(fitted, tmp_path):
    """A version 1 file has no header checksum: decoding checks every header field against the codec."""
    x, c, _ = fitted
    v1_file(tmp_path / "v1.codes", c.encode(x[:10]), c)
    raw = (tmp_path / "v1.codes").read_bytes()
    for bit in range(HEADER.size * 8):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        (tmp_path / "bad.codes").write_bytes(bytes(flipped))
        with pytest.raises(LookalikeError, match="bad.codes"):
            read_codes(tmp_path / "bad.codes", c)
            pytest.fail(f"bit {bit} flipped was accepted")


def test_truncated_and_padded_code_files_are_refused(fitted, tmp_path):
    x, c, codec_path = fitted
    path = tmp_path / "x.codes"
    write_codes(path, c.encode(x[:10]), c)
    raw = path.read_bytes()
    bad = tmp_path / "bad.codes"
    for cut in range(len(raw)):
        bad.write_bytes(raw[:cut])
        with pytest.raises(LookalikeError, match="bad.codes"):
            read_codes(bad, c)
    for junk in (b"\0", b"junk", bytes(c.nbytes), raw[-c.nbytes:]):  # a whole extra code too
        bad.write_bytes(raw + junk)
        with pytest.raises(LookalikeError, match="truncated or padded"):
            read_codes(bad, c)
    flipped = bytearray(raw)
    flipped[12] ^= 4  # the bytes-per-vector field
    bad.write_bytes(bytes(flipped))
    p = lookalike_cli("codec", "decode", bad, "-c", codec_path, "-o", tmp_path / "d.h5")
    assert p.returncode == 2 and "bad.codes" in p.stderr and "unexpected" not in p.stderr


# ---------------------------------------------------------------- 3./4. NAIC folders


@pytest.mark.parametrize("writer", [write_naic_codes, write_naic_features])
def test_naic_names_stay_inside_their_folder(tmp_path, writer):
    """Was: an absolute name wrote `<photo path>.dat` beside the photo."""
    photos = tmp_path / "photos"
    photos.mkdir()
    out = tmp_path / "out"
    for name in (str(photos / "a.jpg"), "../a.jpg", "x/../../a.jpg", "a//b", "a/./b", "", "a\x00b", "a\nb",
                 "C:/a.jpg"):
        with pytest.raises(LookalikeError, match="cannot be a file name inside"):
            writer(out, ["ok", name], np.zeros((2, 4), np.uint8))
    with pytest.raises(LookalikeError, match="would both be written"):
        writer(out, ["a/b", "a\\b"], np.zeros((2, 4), np.uint8))
    with pytest.raises(LookalikeError, match="both a file and a folder"):
        writer(out, ["a.dat/b", "a"], np.zeros((2, 4), np.uint8))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["photos"]  # nothing written, anywhere


def test_cli_naic_dir_refuses_absolute_names_before_writing(fitted, tmp_path):
    x, _, codec_path = fitted
    photos = tmp_path / "photos"
    photos.mkdir()
    names = [str(photos / f"p{i}.jpg") for i in range(len(x))]
    write_store(tmp_path / "s.h5", names, x, {"model_id": "m", "fingerprint": "f"})
    p = lookalike_cli("codec", "encode", tmp_path / "s.h5", "-c", codec_path, "-o", tmp_path / "s.codes",
                      "--naic-dir", tmp_path / "naic")
    assert p.returncode == 2 and "cannot be a file name inside" in p.stderr and str(photos / "p0.jpg") in p.stderr
    assert list(photos.iterdir()) == [] and not (tmp_path / "naic").exists() and not (tmp_path / "s.codes").exists()


def test_cli_naic_round_trip_with_sub_folders(fitted, tmp_path):
    """Was: `codec encode --naic-dir` failed with "error: FileNotFoundError" for names in sub-folders."""
    x, c, codec_path = fitted
    names = [f"set{i % 3}/sub dir/{i:04d}.jpg" if i % 2 else f"{i:04d}" for i in range(len(x))]
    write_store(tmp_path / "s.h5", names, x, {"model_id": "m", "fingerprint": "f"})
    lookalike_cli("codec", "encode", tmp_path / "s.h5", "-c", codec_path, "-o", tmp_path / "s.codes",
                  "--naic-dir", tmp_path / "codes", check=True)
    assert (tmp_path / "codes" / "set1" / "sub dir" / "0001.jpg.dat").read_bytes() == c.encode(x[1:2]).tobytes()
    lookalike_cli("codec", "decode", tmp_path / "codes", "-c", codec_path, "-o", tmp_path / "a.h5",
                  "--naic-dir", tmp_path / "decoded", check=True)
    lookalike_cli("codec", "decode", tmp_path / "s.codes", "-c", codec_path, "-o", tmp_path / "b.h5", check=True)
    a, b = read_store(tmp_path / "a.h5"), read_store(tmp_path / "b.h5")
    order = sorted(range(len(names)), key=lambda i: (names[i] + ".dat").split("/"))  # a folder is read in path order
    assert a.names == [names[i] for i in order] and b.names == names
    assert np.array_equal(a.features, b.features[order])
    got_names, got = read_naic_features(tmp_path / "decoded")
    assert got_names == a.names and np.array_equal(got, a.features)


def test_naic_folders_with_wrong_sizes_are_refused(tmp_path):
    folder = tmp_path / "f"
    write_naic_features(folder, ["a", "s/b"], np.ones((2, 4), np.float32))
    assert read_naic_features(folder)[0] == ["a", "s/b"]
    (folder / "s" / "b.dat").write_bytes(b"\0" * 12)
    with pytest.raises(LookalikeError, match="b.dat: 12 bytes, but a.dat has 16"):
        read_naic_features(folder)
    (folder / "a.dat").write_bytes(b"\0" * 3)
    with pytest.raises(LookalikeError, match="a.dat: 3 bytes is not a float32 vector"):
        read_naic_features(folder)
    write_naic_codes(tmp_path / "c", ["a", "s/b"], np.ones((2, 8), np.uint8))
    assert read_naic_codes(tmp_path / "c", 8)[0] == ["a", "s/b"]
    with pytest.raises(LookalikeError, match="a.dat: 8 bytes, the codec writes exactly 16"):
        read_naic_codes(tmp_path / "c", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LookalikeError, match="no .dat files"):
        read_naic_codes(tmp_path / "empty", 8)
    with pytest.raises(LookalikeError, match="not a folder"):
        read_naic_features(tmp_path / "missing")


# ---------------------------------------------------------------- 5./6. codec files


def npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def codec_arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_unreadable_codec_files_are_one_line_errors(fitted, tmp_path):
    """Was: a truncated .npz ended in "unexpected BadZipFile ... please report it" (exit 1)."""
    x, c, codec_path = fitted
    raw = codec_path.read_bytes()
    write_codes(tmp_path / "x.codes", c.encode(x[:5]), c)
    cases = {"empty.npz": b"", "text.npz": b"hello, I am text\n", "npy.npz": np.lib.format.magic(1, 0) + b"junk"}
    for cut in (1, 100, len(raw) // 2, len(raw) - 30, len(raw) - 1):
        cases[f"cut{cut}.npz"] = raw[:cut]
    arr = io.BytesIO()
    np.save(arr, np.zeros(3))
    cases["array.npz"] = arr.getvalue()
    full = codec_arrays(codec_path)
    for key in full:
        cases[f"no_{key}.npz"] = npz_bytes({k: v for k, v in full.items() if k != key})
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LookalikeError, match=f"{name}: .*lookalike codec fit"):
            Codec.load(tmp_path / name)
    for name in ("cut100.npz", "empty.npz", "text.npz", "no_centroids_.npz"):
        p = lookalike_cli("codec", "decode", tmp_path / "x.codes", "-c", tmp_path / name, "-o", tmp_path / "d.h5")
        assert p.returncode == 2 and name in p.stderr and "unexpected" not in p.stderr, p.stderr
    # flipped bytes inside an array are caught by the archive's checksums
    flipped = bytearray(raw)
    flipped[raw.index(b"centroids_.npy") + 300] ^= 1
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    with pytest.raises(LookalikeError, match="flip.npz"):
        Codec.load(tmp_path / "flip.npz")


def forged(path, tmp_path, name, meta=None, **arrays) -> object:
    parts = codec_arrays(path)
    m = json.loads(str(parts.pop("meta")))
    m.update(meta or {})
    parts.update(arrays)
    parts = {k: v for k, v in parts.items() if v is not None}
    (tmp_path / name).write_bytes(npz_bytes({"meta": np.array(json.dumps(m)), **parts}))
    return tmp_path / name


@pytest.mark.parametrize("meta,arrays,message", [
    ({"nbytes": "8"}, {}, "nbytes '8' is not an integer"),
    ({"nbytes": True}, {}, "nbytes True"),
    ({"nbytes": 0}, {}, "nbytes 0"),
    ({"nbytes": -8}, {}, "nbytes -8"),
    ({"dim": 10 ** 12}, {}, "dim"),
    ({"dim": -1}, {}, "dim -1"),
    ({"dim": 16}, {}, "mean_"),
    ({"latent_dim": 10 ** 9}, {}, "proj_"),
    ({"latent_dim": 3.5}, {}, "latent_dim 3.5"),
    ({"bits": "8"}, {}, "bits"),
    ({"bits": 1000}, {}, "bits 1000"),
    ({"method": ["opq"]}, {}, "method"),
    ({"method": "lookalike.codec_train:fit_learned_projection"}, {}, "does not know"),
    ({"method": "os:system"}, {}, "does not know"),
    ({"version": 99}, {}, "version 99, newer"),
    ({"version": "1"}, {}, "version"),
    ({"history": "x"}, {}, "history"),
    ({"model_id": 5}, {}, "model_id"),
    ({"seed": 1.5}, {}, "seed"),
    ({}, {"mean_": np.zeros(32)}, "mean_ is <f8"),
    ({}, {"mean_": np.full(32, np.nan, np.float32)}, "NaN"),
    ({}, {"proj_": np.zeros((32, 31))}, "proj_"),
    ({}, {"centroids_": np.zeros((8, 255, 4))}, "centroids_"),
    ({}, {"centroids_": np.zeros((8, 256, 4), np.float32)}, "centroids_"),
    ({}, {"scale_exp_": np.array(5000)}, "scale_exp_"),
    ({}, {"scale_exp_": np.array(1.5)}, "scale_exp_"),
    ({}, {"scale_exp_": np.array("x")}, "scale_exp_"),
    ({}, {"scale_exp_": None}, "scale_exp_"),
])
def test_forged_codec_values_are_refused(fitted, tmp_path, monkeypatch, meta, arrays, message):
    """A codec file is data: wrong types, sizes, shapes and unregistered methods are refused, and
    nothing in it can make lookalike import a module."""
    import importlib

    _, _, path = fitted
    bad = forged(path, tmp_path, "forged.npz", meta, **arrays)
    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: pytest.fail(f"imported {a}"))
    with pytest.raises(LookalikeError, match=f"forged.npz: .*{message}"):
        Codec.load(bad)


def test_codec_files_never_run_code(fitted, tmp_path, monkeypatch):
    import importlib

    _, c, path = fitted
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "pickled.npz").write_bytes(npz_bytes({"meta": np.array([Evil()], dtype=object)}))
    pickled_array = {**codec_arrays(path), "mean_": np.array([Evil()], dtype=object)}
    (tmp_path / "pickled2.npz").write_bytes(npz_bytes(pickled_array))
    # a projection named in the file as module:function is ignored: the method is looked up by name
    learned = forged(path, tmp_path, "projection.npz", {"projection": "os:system", "fit_projection": "os:system"})
    monkeypatch.setattr(importlib, "import_module", lambda *a, **k: pytest.fail(f"imported {a}"))
    for name in ("pickled.npz", "pickled2.npz"):
        with pytest.raises(LookalikeError, match=f"{name}: .*Python objects"):
            Codec.load(tmp_path / name)
    assert not marker.exists()
    assert Codec.load(learned).codec_id() == c.codec_id()


def test_a_forged_array_size_cannot_exhaust_memory(fitted, tmp_path):
    """An .npy header declaring a huge shape over a few bytes is refused before numpy allocates it."""
    _, _, path = fitted
    parts = codec_arrays(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in parts.items():
            member = io.BytesIO()
            if k == "mean_":
                np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                              "shape": (2 ** 40,)})
                member.write(b"\0" * 128)
            else:
                np.save(member, v)
            zf.writestr(f"{k}.npy", member.getvalue())
    (tmp_path / "huge.npz").write_bytes(buf.getvalue())
    with pytest.raises(LookalikeError, match="huge.npz: .*truncated or padded"):
        Codec.load(tmp_path / "huge.npz")


@pytest.mark.parametrize("method,bits,kw", [("pq", 8, {}), ("opq", 8, {}), ("sq", 8, {}), ("sq", 4, {}),
                                            ("learned", 8, {"epochs": 0, "latent_dim": 32})])
def test_every_method_saves_and_loads(tmp_path, method, bits, kw):
    x = feats()
    c = Codec(nbytes=8, method=method, bits=bits, **kw).fit(x)
    c.save(tmp_path / "c.npz")
    again = Codec.load(tmp_path / "c.npz")
    assert again.codec_id() == c.codec_id() and again.describe() == c.describe()
    codes = c.encode(x)
    assert np.array_equal(again.encode(x), codes) and np.array_equal(again.decode(codes), c.decode(codes))
    write_codes(tmp_path / "x.codes", codes, again)
    assert np.array_equal(read_codes(tmp_path / "x.codes", c)[0], codes)
