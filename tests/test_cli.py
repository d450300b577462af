import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import lookalike_cli, make_photo, make_set
from lookalike.formats import read_results, write_labels


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    labels = make_set(root / "gallery", n_classes=4, per_class=3, prefix="g")
    labels.update(make_set(root / "queries", n_classes=4, per_class=1, prefix="q", start=50))
    write_labels(root / "labels.csv", labels)
    return root


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_run_evaluate_and_formats(dataset, tmp_path):
    out = tmp_path / "res.csv"
    p = lookalike_cli("run", "--gallery", dataset / "gallery", "--queries", dataset / "queries", "-o", out,
                      "--image-size", "64", check=True)
    assert "gallery: 12 done, 0 skipped" in p.stdout and "images/s" in p.stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    q, rest = lines[0].split(",", 1)
    assert q == "q_0_50.jpg" and rest.startswith("{") and rest.endswith("}") and len(rest[1:-1].split(",")) == 10
    res = read_results(out)
    assert all(v[0].startswith(f"g_{k.split('_')[1]}_") for k, v in res.items())  # easy synthetic set
    assert json.loads((tmp_path / "res.csv.config.json").read_text())["command"] == "run"
    # rerun reuses every feature
    p2 = lookalike_cli("run", "--gallery", dataset / "gallery", "--queries", dataset / "queries", "-o", out,
                       "--image-size", "64", check=True)
    assert "12 reused from cache, 0 extracted" in p2.stdout
    # evaluate: perfect ranking on this easy set
    e = lookalike_cli("evaluate", out, "--labels", dataset / "labels.csv", check=True)
    m = json.loads((tmp_path / "res.csv.metrics.json").read_text())
    assert m["top1"] == 1.0 and m["mAP@10"] == 1.0 and m["digix_score"] == 1.0 and "digix_score=1.0000" in e.stdout
    assert (tmp_path / "res.csv.per_query.csv").read_text().count("\n") == 5
    # NAIC JSON (gallery smaller than 100 -> gallery size) and plain CSV
    lookalike_cli("run", "--gallery", dataset / "gallery", "--queries", dataset / "queries", "-o", tmp_path / "r.json",
                  "--image-size", "64", check=True)
    naic = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(naic) == 4 and all(len(v) == 12 for v in naic.values())
    lookalike_cli("run", "--gallery", dataset / "gallery", "--queries", dataset / "queries", "-o", tmp_path / "r.txt",
                  "--format", "csv", "-k", "3", "--image-size", "64", check=True)
    rows = (tmp_path / "r.txt").read_text().splitlines()
    assert rows[0] == "query,rank,gallery,score" and len(rows) == 1 + 4 * 3
    assert read_results(tmp_path / "r.txt") == {q: v[:3] for q, v in res.items()}


def test_extract_index_search_and_mismatch(dataset, tmp_path):
    g = tmp_path / "g.h5"
    lookalike_cli("extract", dataset / "gallery", "-o", g, "--image-size", "64", check=True)
    p = lookalike_cli("index", g, "-o", tmp_path / "idx", check=True)
    assert "12 vectors of dimension 1792" in p.stdout  # the default: lite0 (1,280) + sscd (512)
    lookalike_cli("search", tmp_path / "idx", "--queries", dataset / "queries", "-k", "5", "-o", tmp_path / "a.csv", check=True)
    qf = tmp_path / "q.h5"
    lookalike_cli("extract", dataset / "queries", "-o", qf, "--image-size", "64", check=True)
    lookalike_cli("search", tmp_path / "idx", "--query-features", qf, "-k", "5", "-o", tmp_path / "b.csv", check=True)
    assert read_results(tmp_path / "a.csv") == read_results(tmp_path / "b.csv")
    # features of another model (pooling) are refused
    qm = tmp_path / "qm.h5"
    lookalike_cli("extract", dataset / "queries", "-o", qm, "--image-size", "64", "--pooling", "mac", check=True)
    _one_line_error(lookalike_cli("search", tmp_path / "idx", "--query-features", qm, "-o", tmp_path / "c.csv"),
                    "another model")
    # k larger than the gallery
    _one_line_error(lookalike_cli("search", tmp_path / "idx", "--query-features", qf, "-k", "50", "-o", tmp_path / "c.csv"),
                    "larger than the gallery")
    # unknown format
    _one_line_error(lookalike_cli("search", tmp_path / "idx", "--query-features", qf, "--format", "xml", "-o", tmp_path / "c.csv"),
                    "unknown format")
    # not an index
    _one_line_error(lookalike_cli("search", tmp_path, "--query-features", qf, "-o", tmp_path / "c.csv"), "not a lookalike index")


def test_errors_are_one_line(dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(lookalike_cli("run", "--gallery", tmp_path / "empty", "--queries", dataset / "queries",
                                  "-o", tmp_path / "r.csv"), "no images found", "empty")
    _one_line_error(lookalike_cli("extract", tmp_path / "nowhere", "-o", tmp_path / "x.h5"), "no such folder")
    _one_line_error(lookalike_cli("extract", dataset / "queries", "-o", tmp_path / "x.h5", "--pooling", "foo"), "unknown pooling")
    _one_line_error(lookalike_cli("extract", dataset / "queries", "-o", tmp_path / "x.h5", "--model", "resnet9000"), "unknown model")
    # labels missing for a query
    res = tmp_path / "r.csv"
    res.write_text("q_0_50.jpg,{g_0_0.jpg}\nmystery.jpg,{g_0_0.jpg}\n")
    _one_line_error(lookalike_cli("evaluate", res, "--labels", dataset / "labels.csv"), "no label for query 'mystery.jpg'")
    bad_labels = tmp_path / "l.csv"
    bad_labels.write_text("file,class\na,b\n")
    _one_line_error(lookalike_cli("evaluate", res, "--labels", bad_labels), "image,label")
    garbage = tmp_path / "g.csv"
    garbage.write_text("this is not a result file\n")
    _one_line_error(lookalike_cli("evaluate", garbage, "--labels", dataset / "labels.csv"), "expected DIGIX")


def test_run_on_a_folder_of_bad_and_odd_files(dataset, tmp_path):
    """Good photos mixed with a 0-byte file, a truncated JPEG, text named .jpg, CMYK, 16-bit PNG, EXIF-rotated."""
    q = tmp_path / "queries"
    q.mkdir()
    for i in range(3):
        make_photo(1000 + i).save(q / f"good_{i}.jpg")
    (q / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    make_photo(7, (300, 300)).save(buf, "JPEG")
    (q / "truncated.jpg").write_bytes(buf.getvalue()[:2000])
    (q / "text.jpg").write_text("definitely not an image\n")
    make_photo(1001).convert("CMYK").save(q / "cmyk.jpg")
    Image.fromarray((np.asarray(make_photo(1002).convert("L"), np.uint16) * 257)).save(q / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    make_photo(1003).save(q / "rotated.jpg", exif=exif)
    out = tmp_path / "out" / "res.csv"
    p = lookalike_cli("run", "--gallery", dataset / "gallery", "--queries", q, "-o", out, "--image-size", "64", check=True)
    assert "queries: 6 done, 3 skipped" in p.stdout, p.stdout
    res = read_results(out)
    assert sorted(res) == sorted(["good_0.jpg", "good_1.jpg", "good_2.jpg", "cmyk.jpg", "sixteen.png", "rotated.jpg"])
    skipped = (tmp_path / "out" / "skipped.csv").read_text().splitlines()
    assert skipped[0] == "set,image,reason"
    body = "\n".join(skipped[1:])
    assert "queries,zero.jpg,empty file" in body
    assert "queries,truncated.jpg,truncated or corrupt" in body
    assert "queries,text.jpg,not an image" in body
    assert len(skipped) == 4


def test_rerank_whiten_and_tune(dataset, tmp_path):
    g = tmp_path / "g.h5"
    lookalike_cli("extract", dataset / "gallery", "-o", g, "--image-size", "64", check=True)
    p = lookalike_cli("index", g, "-o", tmp_path / "idx", "--whiten", "--pca-dim", "8", check=True)
    assert "PCA-whitened to 8" in p.stdout and (tmp_path / "idx" / "whitening.npz").exists()
    p = lookalike_cli("search", tmp_path / "idx", "--queries", dataset / "queries", "-o", tmp_path / "a.csv",
                      "--rerank", "dba,qe,kr", "--k1", "3", "--k2", "2", check=True)
    assert len(read_results(tmp_path / "a.csv")) == 4
    cfg = json.loads((tmp_path / "a.csv.config.json").read_text())
    assert cfg["rerank"]["steps"] == ["dba", "qe", "kr"] and cfg["rerank"]["k1"] == 3
    _one_line_error(lookalike_cli("search", tmp_path / "idx", "--queries", dataset / "queries", "-o", tmp_path / "b.csv",
                                  "--rerank", "kr,dba"), "put it last")
    _one_line_error(lookalike_cli("search", tmp_path / "idx", "--queries", dataset / "queries", "-o", tmp_path / "b.csv",
                                  "--rerank", "magic"), "unknown re-ranking step")
    # tune writes a chain that search accepts
    lookalike_cli("index", g, "-o", tmp_path / "flat", check=True)
    t = lookalike_cli("tune", tmp_path / "flat", "--queries", dataset / "queries", "--labels", dataset / "labels.csv",
                      "-o", tmp_path / "best.json", check=True)
    assert "tried" in t.stdout and "best" in t.stdout
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["metrics"]["digix_score"] == max(a["digix_score"] for a in best["all"])  # the best is first
    # the scores tune reports are those `search` + `evaluate` give for the same chains
    for name, rerank, want in (("plain", [], best["baseline"]), ("best", ["--rerank", tmp_path / "best.json"], best["metrics"])):
        out = tmp_path / f"{name}.csv"
        lookalike_cli("search", tmp_path / "flat", "--queries", dataset / "queries", "-o", out, *rerank, check=True)
        lookalike_cli("evaluate", out, "--labels", dataset / "labels.csv", "--gallery", tmp_path / "flat", check=True)
        got = json.loads((tmp_path / f"{name}.csv.metrics.json").read_text())
        assert got["digix_score"] == pytest.approx(want["digix_score"], abs=1e-9), name
        assert got["top1"] == pytest.approx(want["top1"], abs=1e-9), name


def test_spatial_flag_runs_end_to_end(dataset, tmp_path):
    pytest.importorskip("cv2")
    out = tmp_path / "s.csv"
    lookalike_cli("run", "--gallery", dataset / "gallery", "--queries", dataset / "queries", "-o", out,
                  "--image-size", "64", "--spatial", "orb", "--spatial-top-n", "5", check=True)
    assert len(read_results(out)) == 4
    assert json.loads((tmp_path / "s.csv.config.json").read_text())["spatial"]["method"] == "orb"
    _one_line_error(lookalike_cli("run", "--gallery", dataset / "gallery", "--queries", dataset / "queries", "-o", out,
                                  "--image-size", "64", "--spatial", "surf"), "unknown local feature method")
