import json

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

from conftest import lookalike_cli, make_set  # noqa: E402
from lookalike.store import read_store  # noqa: E402


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    for c in range(6):
        make_set(root / f"class{c}", n_classes=1, per_class=4, prefix=f"c{c}", start=10 * c, size=(72, 64))
    # make_set names its class folder-less files; move the class pattern per folder
    return root


def test_train_resume_export_extract(class_folders, tmp_path):
    run = tmp_path / "run"
    args = ["train", class_folders, "-o", run, "--image-size", "64", "--batch-size", "8", "--max-steps", "2",
            "--workers", "0", "--dim", "48", "--val-fraction", "0.34"]
    p = lookalike_cli(*args, "--epochs", "1", check=True)
    assert "val score" in p.stdout
    assert (run / "checkpoint.pt").exists() and (run / "augmentations.png").exists() and (run / "curves.png").exists()
    # the same output again without --resume is refused; with --resume it continues at epoch 2
    err = lookalike_cli(*args, "--epochs", "2")
    assert err.returncode == 2 and "--resume" in err.stderr
    lookalike_cli(*args, "--epochs", "2", "--resume", check=True)
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("1,") and rows[2].startswith("2,")
    # export: fp16 weights loadable with weights_only=True, description, ONNX
    state = torch.load(run / "model_fp16.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    meta = json.loads((run / "lookalike_model.json").read_text())
    assert meta["descriptors"] == "SMG" and meta["dim"] == 48 and (run / "model.onnx").exists()
    # extract with the trained model (onnxruntime and torch agree)
    out = tmp_path / "f.h5"
    lookalike_cli("extract", class_folders, "-o", out, "--model", run, "--image-size", "64", check=True)
    st = read_store(out)
    assert st.features.shape == (24, 48) and np.allclose(np.linalg.norm(st.features, axis=1), 1, atol=1e-4)
    lookalike_cli("extract", class_folders, "-o", tmp_path / "t.h5", "--model", run, "--image-size", "64",
                  "--engine", "torch", check=True)
    assert (read_store(tmp_path / "t.h5").features * st.features).sum(1).min() > 0.999


def test_train_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    p = lookalike_cli("train", tmp_path / "empty", "-o", tmp_path / "r")
    assert p.returncode == 2 and "no class folders" in p.stderr
    p = lookalike_cli("train", tmp_path / "empty", "-o", tmp_path / "r", "--loss", "hinge")
    assert p.returncode == 2 and "unknown loss" in p.stderr


# ---------------------------------------------------------------- sampler, schedule, freezing

from lookalike.train import BatchSampler, _lr_factor, backbone_units  # noqa: E402


def test_random_batches_cover_every_image_once_and_ranks_split_them():
    labels = np.repeat(np.arange(10), 7)  # 70 images
    s = BatchSampler(labels, 16, "random", seed=3)
    batches = s.global_batches()
    flat = np.concatenate(batches)
    assert len(batches) == 4 and len(flat) == 64 and len(set(flat.tolist())) == 64  # drop_last, no repeats
    assert [b.tolist() for b in BatchSampler(labels, 16, seed=3).global_batches()] == [b.tolist() for b in batches]
    s.epoch = 1
    assert [b.tolist() for b in s.global_batches()] != [b.tolist() for b in batches]  # reshuffled per epoch
    r0, r1 = BatchSampler(labels, 16, seed=3, rank=0, world=2), BatchSampler(labels, 16, seed=3, rank=1, world=2)
    for a, b, full in zip(r0, r1, batches):
        assert len(a) == len(b) == 8 and sorted(a + b) == sorted(full.tolist())


def test_pk_batches_hold_p_classes_of_k_images():
    labels = np.array([c for c in range(12) for _ in range(3 + c % 4)] + [99])  # class 99 has one image
    s = BatchSampler(labels, 16, "pk", k=4, seed=0)
    assert len(s) == len(labels) // 16
    for b in s.global_batches():
        cls, cnt = np.unique(labels[b], return_counts=True)
        assert len(b) == 16 and len(cls) == 4 and (cnt == 4).all() and 99 not in cls
        # a class with fewer than K images is drawn with replacement, one with K or more without
        for c in cls:
            members = b[labels[b] == c]
            if (labels == c).sum() >= 4:
                assert len(set(members.tolist())) == 4
    # two processes: each gets K/2 images of every class of the global batch (positives stay)
    for part in BatchSampler(labels, 16, "pk", k=4, seed=0, rank=1, world=2):
        assert (np.unique(labels[part], return_counts=True)[1] == 2).all()


def test_lr_schedule_warms_up_then_follows_the_larger_of_steps_and_time():
    assert _lr_factor(0, 10, 0.0, 0.1) == pytest.approx(0.1)
    assert _lr_factor(9, 10, 0.09, 0.1) == pytest.approx(1.0)
    assert _lr_factor(10, 10, 0.1, 0.1) == pytest.approx(1.0)
    assert _lr_factor(55, 10, 0.55, 0.1) == pytest.approx(0.5)  # halfway through the cosine
    assert _lr_factor(100, 10, 1.0, 0.1) == pytest.approx(0.0)
    assert _lr_factor(20, 10, 1.3, 0.1) == pytest.approx(0.0)  # out of time before the planned steps


def test_freeze_epochs_trains_the_head_only(class_folders, tmp_path):
    from torch import nn

    from lookalike.models import CGDHead, create_backbone

    run = tmp_path / "frozen"
    lookalike_cli("train", class_folders, "-o", run, "--image-size", "64", "--batch-size", "8", "--max-steps", "2",
                  "--workers", "0", "--dim", "48", "--val-fraction", "0.34", "--epochs", "1", "--freeze-epochs", "1",
                  "--optimizer", "sgd", "--sampler", "pk", "--pk-k", "2", "--loss", "multisimilarity", check=True)
    trained = torch.load(run / "best.pt", weights_only=True)
    original = create_backbone("lite0").module.state_dict()
    assert all(torch.equal(trained["backbone." + k], v) for k, v in original.items())  # BN stats too (eval mode)
    # the head did train: its weights left their initialisation (that of train(): seed 0, then backbone, then head)
    torch.manual_seed(0)
    init = CGDHead(create_backbone("lite0").channels, "SMG", 48).state_dict()
    head = {k[len("head."):]: v for k, v in trained.items() if k.startswith("head.")}
    assert sorted(head) == ["proj.0.weight", "proj.1.weight", "proj.2.weight"] == sorted(init)
    for k, v in head.items():
        assert v.shape == init[k].shape == (16, 1280)
        assert not torch.equal(v, init[k]) and (v - init[k]).norm() < 0.1 * init[k].norm(), k  # two small steps
    # units in forward order: stem conv, stem BN, the 16 MBConv blocks, head conv, head BN, then the classifier's
    units = backbone_units(create_backbone("lite0").module)
    kinds = [type(u).__name__ for u in units]
    assert isinstance(units[0], nn.Conv2d) and isinstance(units[1], nn.BatchNorm2d)
    assert kinds[2:18] == ["MBConvBlock"] * 16 and "MBConvBlock" not in kinds[18:]
    assert isinstance(units[18], nn.Conv2d) and isinstance(units[19], nn.BatchNorm2d) and len(units) == 24


def test_freeze_blocks_keeps_the_first_units(class_folders, tmp_path):
    from lookalike.models import create_backbone

    run = tmp_path / "partial"
    lookalike_cli("train", class_folders, "-o", run, "--image-size", "64", "--batch-size", "8", "--max-steps", "2",
                  "--workers", "0", "--dim", "48", "--val-fraction", "0.34", "--epochs", "1", "--freeze-blocks", "5",
                  "--lr", "0.01", check=True)
    trained = torch.load(run / "best.pt", weights_only=True)
    bb = create_backbone("lite0").module
    units = backbone_units(bb)
    names = {id(m): n for n, m in bb.named_modules()}
    first = [names[id(u)] for u in units[:5] if list(u.parameters())]
    later = [names[id(u)] for u in units[5:] if list(u.parameters())]
    state = bb.state_dict()
    assert first and all(torch.equal(trained[f"backbone.{k}"], v) for k, v in state.items()
                         if any(k.startswith(n + ".") for n in first))
    changed = [k for k, v in state.items() if any(k.startswith(n + ".") for n in later)
               and v.is_floating_point() and not torch.equal(trained[f"backbone.{k}"], v)]
    assert changed


def test_resume_with_another_architecture_is_one_line(class_folders, tmp_path):
    run = tmp_path / "run"
    base = ["train", class_folders, "-o", run, "--image-size", "64", "--batch-size", "8", "--max-steps", "1",
            "--workers", "0", "--val-fraction", "0.34", "--epochs", "1"]
    lookalike_cli(*base, "--dim", "48", check=True)
    p = lookalike_cli(*base, "--dim", "48", "--descriptors", "G", "--resume")
    assert p.returncode == 2 and "another architecture" in p.stderr and "descriptors" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_unreadable_training_images_are_listed(tmp_path):
    root = tmp_path / "data"
    for c in range(3):
        make_set(root / f"k{c}", n_classes=1, per_class=4, prefix=f"k{c}", start=10 * c, size=(64, 64))
    (root / "k0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    run = tmp_path / "run"
    lookalike_cli("train", root, "-o", run, "--image-size", "64", "--batch-size", "13", "--workers", "0",
                  "--dim", "48", "--epochs", "1", "--val-fraction", "0", check=True)
    rows = (run / "skipped.csv").read_text().splitlines()
    assert rows[0] == "image,reason" and len(rows) == 2 and "broken.jpg" in rows[1]


def test_ddp_two_cpu_processes_with_gloo(class_folders, tmp_path):
    """torchrun, 2 processes, gloo: the run finishes, one set of outputs, both replicas end identical."""
    import subprocess
    import sys

    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lookalike.cli", "-v", "train", str(class_folders), "-o", str(run), "--image-size", "64",
           "--batch-size", "8", "--max-steps", "2", "--workers", "0", "--dim", "48", "--val-fraction", "0.34",
           "--epochs", "2", "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    sums = sorted(line.split("parameter checksum ")[1] for line in p.stderr.splitlines() if "parameter checksum" in line)
    assert len(sums) == 2 and sums[0] == sums[1], p.stderr
    assert len((run / "metrics.csv").read_text().splitlines()) == 3 and (run / "model.onnx").exists()
