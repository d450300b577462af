"""`evaluate --report` (strips, histogram, activation maps) and `inspect` (counts, sizes, classes,
exact and near duplicates) on tiny generated images."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import lookalike_cli, make_photo, make_set
from lookalike.errors import LookalikeError
from lookalike.formats import write_labels
from lookalike.inspection import near_pairs
from lookalike.report import query_strip


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    labels = make_set(root / "gallery", n_classes=3, per_class=3, prefix="g")
    labels.update(make_set(root / "queries", n_classes=3, per_class=1, prefix="q", start=50))
    write_labels(root / "labels.csv", labels)
    lookalike_cli("run", "--gallery", root / "gallery", "--queries", root / "queries", "-o", root / "res.csv",
                  "--image-size", "64", "-k", "5", "--model", "lite0", check=True)  # Grad-CAM: one torch model
    return root


def test_strip_frames_are_green_for_right_and_red_for_wrong(tmp_path):
    make_photo(1).save(tmp_path / "a.jpg")
    s = query_strip(tmp_path / "a.jpg", "q", [("r1", tmp_path / "a.jpg", True), ("r2", None, False)], size=64)
    a = np.asarray(s)
    gap = 6
    assert tuple(a[gap + 1, gap + 1]) == (30, 136, 229)  # query: blue frame
    assert tuple(a[gap + 1, gap + 70 + 1]) == (46, 160, 67)  # right: green
    assert tuple(a[gap + 1, gap + 140 + 1]) == (211, 47, 47)  # wrong: red (a missing file is a grey tile inside)
    assert s.width == 3 * 64 + 2 * 6 + 2 * 6


def test_evaluate_report_with_cam(evaluated, tmp_path):
    root = evaluated
    p = lookalike_cli("evaluate", root / "res.csv", "--labels", root / "labels.csv", "--report", tmp_path / "rep",
                      "--cam", "1", "-k", "5", check=True)
    assert "report:" in p.stdout
    page = (tmp_path / "rep" / "index.html").read_text()
    strips = sorted((tmp_path / "rep" / "strips").glob("*.png"))
    assert len(strips) == 3 and page.count("<section>") == 3
    assert (tmp_path / "rep" / "first_correct_rank.png").stat().st_size > 1000
    cams = list((tmp_path / "rep" / "cam").glob("*.png"))
    assert len(cams) == 1 and Image.open(cams[0]).size == (64, 64)
    # image folders came from res.csv.config.json: the tiles are photos, not grey placeholders
    im = np.asarray(Image.open(strips[0]))
    assert im[20:60, 20:60].std() > 5
    assert "q_0_50.jpg" in page and "digix_score" in page


def test_report_orders_worst_first_and_uses_given_folders(evaluated, tmp_path):
    root = evaluated
    # a results file where q_1 is wrong everywhere and q_0 right at rank 1
    res = tmp_path / "res.csv"
    res.write_text("q_0_50.jpg,{g_0_0.jpg,g_0_1.jpg,g_0_2.jpg}\n"
                   "q_1_50.jpg,{g_0_0.jpg,g_2_0.jpg,g_2_1.jpg}\n"
                   "q_2_50.jpg,{g_0_0.jpg,g_2_0.jpg,g_2_1.jpg}\n")
    lookalike_cli("evaluate", res, "--labels", root / "labels.csv", "--report", tmp_path / "rep", "-k", "3",
                  "--query-dir", root / "queries", "--gallery-dir", root / "gallery", check=True)
    page = (tmp_path / "rep" / "index.html").read_text()
    assert page.index("q_1_50.jpg") < page.index("q_2_50.jpg") < page.index("q_0_50.jpg")
    assert "first correct none" in page and "first correct rank 2" in page


def test_near_pairs_matches_brute_force():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 256, (200, 8), dtype=np.uint8)
    h[5] = h[7]
    h[9] = h[3] ^ np.array([1, 0, 0, 0, 2, 0, 0, 0], np.uint8)  # 2 bits apart
    bits = np.unpackbits(h, axis=1)
    d = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    want = {(i, j) for i in range(200) for j in range(i + 1, 200) if d[i, j] <= 3}
    assert {(i, j) for i, j, _ in near_pairs(h, 3)} == want and (5, 7) in want and (3, 9) in want
    q = h[[3, 100]]
    assert {(i, j) for i, j, _ in near_pairs(h, 2, other=q)} == {(0, 3), (0, 9), (1, 100)}


def test_inspect_cli(tmp_path):
    labels = make_set(tmp_path / "g", n_classes=3, per_class=2, prefix="g")
    make_photo(7, size=(300, 200)).save(tmp_path / "g" / "big.png")
    labels["big.png"] = "class9"
    shutil.copy(tmp_path / "g" / "g_0_0.jpg", tmp_path / "g" / "copy_of_g00.jpg")  # exact duplicate
    Image.open(tmp_path / "g" / "g_1_0.jpg").resize((120, 100)).save(tmp_path / "g" / "resized_g10.jpg", quality=80)  # near
    (tmp_path / "g" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    make_set(tmp_path / "q", n_classes=1, per_class=1, prefix="q", start=70)
    shutil.copy(tmp_path / "g" / "g_2_1.jpg", tmp_path / "q" / "leaked.jpg")  # a query that is in the gallery
    write_labels(tmp_path / "labels.csv", labels)
    p = lookalike_cli("inspect", tmp_path / "g", "--labels", tmp_path / "labels.csv", "--queries", tmp_path / "q",
                      "--report", tmp_path / "rep", check=True)
    out = p.stdout
    assert "gallery: 10 images, 1 unreadable" in out and "queries: 2 images, 0 unreadable" in out
    assert "broken.jpg" in out
    assert "classes: 4" in out and "1 with one image" in out
    r = json.loads((tmp_path / "rep" / "inspect.json").read_text())
    assert r["exact_duplicates"]["groups"] == 2 and r["exact_duplicates"]["across_sets"] == 1
    assert any({"g_1_0.jpg", "resized_g10.jpg"} <= set(g) for g in r["near_duplicates"]["examples"])
    assert not any("big.png" in g for g in r["near_duplicates"]["examples"])
    assert r["query_gallery_overlap"]["exact"] == 1
    assert {"query": "leaked.jpg", "gallery": "g_2_1.jpg", "bits": 0} in r["query_gallery_overlap"]["examples"]
    assert r["sizes"]["width"]["max"] == 300 and r["sizes"]["smaller_than_224"] == 11  # both sets; 300x200 is under 224 high
    assert {"size": "96x80", "images": 9} in r["sizes"]["most_common"]
    assert (tmp_path / "rep" / "sizes.png").exists() and (tmp_path / "rep" / "per_class.png").exists()
    assert "Near duplicates" in (tmp_path / "rep" / "index.html").read_text()


def test_cam_model_of_an_ensemble_is_its_first_torch_member():
    from lookalike.extract import ExtractConfig
    from lookalike.report import cam_model

    net, pre = cam_model(ExtractConfig(model=("sscd", "lite0"), image_size=(288, 160)))
    assert pre.size == 160 and net.pooling == "spoc"
    with pytest.raises(LookalikeError, match="need a torch model"):
        cam_model(ExtractConfig(model="sscd"))


def test_report_model_comes_from_the_collection_or_the_results_config(tmp_path):
    import json

    from lookalike.api.scoring import _report_sources

    res = tmp_path / "r.csv"
    res.write_text("q.jpg,{g.jpg}\n")
    # a run whose collection is gone: its config's extraction settings
    (tmp_path / "r.csv.config.json").write_text(json.dumps(
        {"command": "run", "gallery": str(tmp_path / "g"), "queries": str(tmp_path / "q"),
         "extract": {"model": "lite1", "image_size": 160}, "index_dir": str(tmp_path / "gone")}))
    q, g, cfg = _report_sources(res)
    assert q == tmp_path / "q" and g == tmp_path / "g" and cfg.model == "lite1" and cfg.image_size == 160
    (tmp_path / "r.csv.config.json").write_text("not json")
    assert _report_sources(res) == (None, None, None)
