"""Backbones from timm (with a stand-in timm module: the real one needs torchvision) and ensembles."""
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from conftest import lookalike_cli, make_set
from lookalike import Extractor
from lookalike.errors import LookalikeError
from lookalike.extract import l2n
from lookalike.models import create_backbone


class _TinyTimm(nn.Module):
    num_features = 3
    pretrained_cfg = {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward_features(self, x):  # identity feature map: shows what the model is fed
        return x * self.scale


@pytest.fixture
def fake_timm(monkeypatch):
    mod = types.ModuleType("timm")

    def create_model(name, pretrained=False, num_classes=None, global_pool=None):
        assert pretrained is False and num_classes == 0 and global_pool == ""
        if name != "tiny":
            raise RuntimeError(f"Unknown model ({name})")
        return _TinyTimm()

    mod.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", mod)
    return mod


def test_timm_backbone_gets_imagenet_normalised_input(fake_timm, tmp_path):
    w = tmp_path / "tiny.pt"
    torch.save({"scale": torch.ones(1), "head.weight": torch.zeros(10, 3)}, w)  # a full checkpoint: head left over
    bb = create_backbone("timm:tiny", str(w))
    assert bb.channels == 3 and bb.name == "timm:tiny"
    pixels = torch.tensor([0.0, 127.0, 255.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    got = bb.module((pixels - 127) / 128)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(got, (pixels / 255 - mean) / std, atol=1e-5)


def test_timm_errors(fake_timm, tmp_path, monkeypatch):
    with pytest.raises(LookalikeError, match="timm cannot build 'nosuch'"):
        create_backbone("timm:nosuch")
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(LookalikeError, match="does not fit timm tiny"):
        create_backbone("timm:tiny", str(bad))
    monkeypatch.setitem(sys.modules, "timm", None)  # not installed
    with pytest.raises(LookalikeError, match="pip install timm"):
        create_backbone("timm:tiny")


def test_timm_model_extracts(fake_timm, tmp_path):
    make_set(tmp_path / "imgs", n_classes=2, per_class=2)
    w = tmp_path / "tiny.pt"
    torch.save({"scale": torch.ones(1)}, w)
    res = Extractor(model="timm:tiny", weights=str(w), pooling="gap", engine="torch").extract(tmp_path / "imgs")
    assert res.features.shape == (4, 3)


# ---------------------------------------------------------------- ensembles


def _shift_factory():
    """A second, different backbone for the ensemble test: lite0's stem only."""
    bb = create_backbone("lite0").module.net
    return nn.Sequential(bb._conv_stem, bb._bn0)


def test_ensemble_is_the_weighted_concatenation_of_its_members(tmp_path, monkeypatch):
    make_set(tmp_path / "imgs", n_classes=3, per_class=2)
    mod = types.ModuleType("ens_member")
    mod.factory = _shift_factory
    monkeypatch.setitem(sys.modules, "ens_member", mod)
    a = Extractor(model="lite0").extract(tmp_path / "imgs", progress=False).features
    b = Extractor(model="ens_member:factory").extract(tmp_path / "imgs", progress=False).features
    ex = Extractor(model=("lite0", "ens_member:factory"), ensemble_weights=(1.0, 0.5))
    res = ex.extract(tmp_path / "imgs", tmp_path / "ens.h5", progress=False)
    want = l2n(np.concatenate([a, 0.5 * b], axis=1))
    assert res.features.shape == (6, a.shape[1] + b.shape[1])
    assert np.abs(res.features - want).max() < 1e-4
    # the identity differs from each member's and from other weights
    ids = {Extractor(model=m).config.model_id() for m in ("lite0", "ens_member:factory")}
    ids |= {ex.config.model_id(), Extractor(model=("lite0", "ens_member:factory")).config.model_id()}
    assert len(ids) == 4


def test_ensemble_cli_size_cap_and_weights(tmp_path):
    make_set(tmp_path / "imgs", n_classes=2, per_class=2)
    p = lookalike_cli("extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--model", "lite0", "--model", "lite0",
                      "--max-model-mb", "30")
    assert p.returncode == 2 and "over the 30 MB cap" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = lookalike_cli("extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--model", "lite0", "--model", "lite0",
                      "--ensemble-weights", "1")
    assert p.returncode == 2 and "one weight per --model" in p.stderr
    lookalike_cli("extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--model", "lite0", "--model", "lite0",
                  "--ensemble-weights", "1,1", check=True)
