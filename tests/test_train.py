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
