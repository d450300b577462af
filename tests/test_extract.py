import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import make_photo, make_set
from lookalike import ExtractConfig, Extractor, LookalikeError
from lookalike.store import read_store


@pytest.mark.parametrize("pooling", ["gem", "spoc", "mac", "gap"])
def test_onnx_matches_torch(tmp_path, pooling):
    images = [make_photo(i, size) for i, size in enumerate([(96, 80), (200, 100), (64, 128), (150, 150)])]
    cfg = ExtractConfig(model="lite0", pooling=pooling, image_size=96)
    a = Extractor(cfg, engine="onnx").embed_images(images)
    b = Extractor(cfg, engine="torch").embed_images(images)
    assert a.shape == b.shape == (4, 1280)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    cos = (a * b).sum(1)
    assert cos.min() > 0.9999


def test_tta_changes_and_keeps_unit_norm():
    images = [make_photo(i, (120, 90)) for i in range(3)]
    plain = Extractor(image_size=64).embed_images(images)
    tta = Extractor(image_size=64, tta="flip,multiscale").embed_images(images)
    assert np.allclose(np.linalg.norm(tta, axis=1), 1, atol=1e-5)
    assert not np.allclose(plain, tta)
    # flip TTA of a symmetric image equals the plain feature
    sym = np.asarray(make_photo(9, (64, 64)))
    sym = Image.fromarray(np.concatenate([sym, sym[:, ::-1]], axis=1))
    f1 = Extractor(image_size=64).embed_images([sym])
    f2 = Extractor(image_size=64, tta="flip").embed_images([sym])
    assert (f1 * f2).sum() > 0.9999


def test_extract_store_skips_and_reuses(tmp_path):
    make_set(tmp_path / "imgs", n_classes=3, per_class=2)
    (tmp_path / "imgs" / "bad.jpg").write_text("not a photo")
    out = tmp_path / "f.h5"
    ex = Extractor(model="lite0", image_size=64)
    r = ex.extract(tmp_path / "imgs", out, progress=False)
    assert r.n_extracted == 6 and len(r.skipped) == 1 and r.skipped[0][0] == "bad.jpg"
    st = read_store(out)
    assert st.names == sorted(st.names) and len(st.names) == 6
    assert st.features.dtype == np.float32 and st.features.shape == (6, 1280)
    assert st.fingerprint == ex.config.fingerprint() and st.attrs["pooling"] == "spoc"
    assert st.skipped == [("bad.jpg", "not an image Pillow can read (unknown or corrupt format)")]
    assert (tmp_path / "f.skipped.csv").read_text().count("bad.jpg") == 1
    # rerun: nothing recomputed; a new image: only it is extracted
    r2 = ex.extract(tmp_path / "imgs", out, progress=False)
    assert r2.n_extracted == 0 and r2.n_reused == 6
    make_photo(50).save(tmp_path / "imgs" / "new.jpg")
    r3 = ex.extract(tmp_path / "imgs", out, progress=False)
    assert r3.n_extracted == 1 and r3.n_reused == 6
    st3 = read_store(out)
    assert np.array_equal(st3.features[[st3.names.index(n) for n in st.names]], st.features)
    # a photo replaced by another under the same name is extracted again, never served from the cache
    victim = st.names[0]
    make_photo(77).save(tmp_path / "imgs" / victim)
    r4 = ex.extract(tmp_path / "imgs", out, progress=False)
    assert r4.n_extracted == 1 and r4.n_reused == 6 and r4.n_changed == 1 and "1 changed since cached" in r4.summary()
    fresh = Extractor(model="lite0", image_size=64).extract(tmp_path / "imgs", None, progress=False)
    st4 = read_store(out)
    assert np.allclose(st4.features, fresh.features, atol=1e-6) and not np.allclose(
        st4.features[0], st.features[0], atol=1e-3)
    st3 = st4
    # a replacement that keeps size and modification time (cp -p, rsync -t, unpacking) is caught too
    import os
    import shutil

    a, b = st.names[1], st.names[2]
    sa, sb = os.stat(tmp_path / "imgs" / a), os.stat(tmp_path / "imgs" / b)
    shutil.copyfile(tmp_path / "imgs" / b, tmp_path / "b.tmp")
    shutil.copyfile(tmp_path / "imgs" / a, tmp_path / "imgs" / b)  # b now shows a's photo ...
    shutil.copyfile(tmp_path / "b.tmp", tmp_path / "imgs" / a)
    os.utime(tmp_path / "imgs" / a, ns=(sa.st_atime_ns, sa.st_mtime_ns))  # ... with the old times
    os.utime(tmp_path / "imgs" / b, ns=(sb.st_atime_ns, sb.st_mtime_ns))
    r5 = ex.extract(tmp_path / "imgs", out, progress=False)
    assert r5.n_changed >= 2 and r5.n_extracted >= 2
    st5 = read_store(out)
    assert np.allclose(st5.features[st5.names.index(b)], st4.features[st4.names.index(a)], atol=1e-6)
    st3 = st5
    # other settings on the same file: refused, file untouched
    with pytest.raises(LookalikeError, match="other settings"):
        Extractor(image_size=64, pooling="mac").extract(tmp_path / "imgs", out, progress=False)
    # float16 storage
    Extractor(model="lite0", image_size=64, dtype="float16").extract(tmp_path / "imgs", tmp_path / "h.h5", progress=False)
    import h5py

    with h5py.File(tmp_path / "h.h5") as f:
        assert f["features"].dtype == np.float16
    assert np.allclose(read_store(tmp_path / "h.h5").features, st3.features, atol=2e-3)


def test_kill9_then_resume(tmp_path):
    """A real extraction subprocess is killed with SIGKILL mid-run; the rerun finishes the job."""
    imgs = tmp_path / "imgs"
    make_set(imgs, n_classes=10, per_class=24, size=(160, 120))  # 240 images
    out = tmp_path / "f.h5"
    args = [sys.executable, "-m", "lookalike.cli", "-q", "extract", str(imgs), "-o", str(out),
            "--image-size", "160", "--batch-size", "8", "--threads", "1", "--workers", "1", "--chunk-size", "16"]
    env = dict(os.environ)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    parts = tmp_path / "f.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.npz"))) < 2:
        time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_parts = len(list(parts.glob("part-*.npz")))
    assert n_parts >= 2 and not out.exists()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    reused = int(done.stdout.split(" reused")[0].rsplit(",", 1)[1])
    assert reused >= 16 * n_parts
    st = read_store(out)
    assert len(st.names) == 240 and not parts.exists()
    # same features as a clean, uninterrupted run
    Extractor(image_size=160, batch_size=8).extract(imgs, tmp_path / "fresh.h5", progress=False)
    ref = read_store(tmp_path / "fresh.h5")
    assert st.names == ref.names
    assert np.abs(st.features - ref.features).max() < 1e-4


def test_openvino_engine_matches_onnxruntime():
    pytest.importorskip("openvino")
    images = [make_photo(i, (160, 120)) for i in range(6)]
    ref = Extractor(model="lite0", image_size=96, engine="onnx").embed_images(images)
    f32 = Extractor(model="lite0", image_size=96, engine="openvino").embed_images(images)
    assert (ref * f32).sum(1).min() > 0.9999
    bf16 = Extractor(model="lite0", image_size=96, precision="bf16")
    assert bf16.config.engine == "openvino" and bf16.config.fingerprint() != Extractor(model="lite0", image_size=96).config.fingerprint()
    assert (ref * bf16.embed_images(images)).sum(1).min() > 0.97


def test_unknown_engine_and_precision():
    with pytest.raises(LookalikeError, match="unknown engine"):
        ExtractConfig(engine="tensorrt")
    with pytest.raises(LookalikeError, match="unknown precision"):
        ExtractConfig(precision="int4")
    with pytest.raises(LookalikeError, match="unknown TTA"):
        ExtractConfig(tta="rotate")


def test_unreadable_files_and_folders_are_listed_with_their_reason(tmp_path, monkeypatch):
    """Permissions are simulated (the tests may run as root, who reads everything): the operating
    system's errors are raised where it would raise them."""
    import builtins
    import io
    import os

    make_set(tmp_path / "imgs", n_classes=2, per_class=2)
    (tmp_path / "imgs" / "locked").mkdir()
    make_photo(9).save(tmp_path / "imgs" / "locked" / "x.jpg")
    real_scandir, real_open = os.scandir, builtins.open

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def file_open(fp, *a, **k):  # every reader of the file (pathlib, Pillow) goes through this
        if str(fp).endswith("img_0_0.jpg"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(builtins, "open", file_open)
    monkeypatch.setattr(io, "open", file_open)
    r = Extractor(model="lite0", image_size=64).extract(tmp_path / "imgs", tmp_path / "f.h5", progress=False)
    reasons = dict(r.skipped)
    assert reasons["locked/"] == "folder cannot be read: permission denied"
    assert reasons["img_0_0.jpg"].startswith("permission denied")
    assert "locked/" in (tmp_path / "f.skipped.csv").read_text()


def test_a_folder_of_only_broken_files_still_writes_its_skipped_list(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_text("not a photo")
    (tmp_path / "imgs" / "b.png").write_bytes(b"")
    with pytest.raises(LookalikeError, match="none of the 2 images could be read .*a.jpg.*f.skipped.csv"):
        Extractor(model="lite0", image_size=64).extract(tmp_path / "imgs", tmp_path / "f.h5", progress=False)
    text = (tmp_path / "f.skipped.csv").read_text()
    assert "a.jpg" in text and "b.png" in text and "empty file" in text


def test_fingerprint_names_the_resampler(monkeypatch):
    """Features made with another resize (Pillow's, before) are never reused as today's; the
    embedding space (model_id) is the same, so collections stay compatible."""
    import importlib

    extract = importlib.import_module("lookalike.extract")  # the module (the package exports a function of that name)
    cfg = ExtractConfig(model="lite0")
    ens = ExtractConfig(model=("lite0", "sscd-mobile"))
    before, before_ens, space = cfg.fingerprint(), ens.fingerprint(), cfg.model_id()
    monkeypatch.setattr(extract, "RESAMPLER", "bilinear/pillow")
    assert cfg.fingerprint() != before and ens.fingerprint() != before_ens
    assert cfg.model_id() == space
