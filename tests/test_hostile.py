"""Hostile and careless input, by class: every numeric CLI option out of range, every place a name
becomes a path or a line of a text file, every JSON file the tool reads with attacker-chosen values.
Each case must end in a one-line error (exit 2) or an exact round trip: never a traceback, never a
silently different answer, never code chosen by a file."""
import json
import os

import click
import numpy as np
import pytest

from conftest import lookalike_cli, make_set
from lookalike.cli import main
from lookalike.errors import LookalikeError

NASTY = ["a\rb.jpg", "a\x0bb.jpg", "a\x0cb.jpg", "a\x1cb.jpg", "a\x85b.jpg", "a\u2028b.jpg", " lead.jpg", "trail.jpg ",
         "co,mma.jpg", 'quo"te.jpg', "{brace}.jpg", "tab\t.jpg", "ünï ködé.jpg", "new\nline.jpg", "semi;colon.jpg"]


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ numeric options


def _commands(group=main, path=()):
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


NUMERIC = [(cmd_path, opt) for cmd_path, cmd in _commands() for opt in cmd.params
           if isinstance(opt, click.Option) and isinstance(opt.type, (click.types.IntParamType, click.types.FloatParamType))]


def test_every_numeric_option_is_bounded():
    assert len(NUMERIC) > 60  # all commands were walked (codec sub-commands included)
    loose = [f"{' '.join(c)} {o.opts[0]}" for c, o in NUMERIC
             if not isinstance(o.type, (click.IntRange, click.FloatRange)) or o.type.min is None or o.type.max is None]
    assert not loose, f"numeric options without bounds: {loose}"


@pytest.mark.parametrize("cmd_path,opt", NUMERIC, ids=[f"{' '.join(c)}{o.opts[0]}" for c, o in NUMERIC])
def test_numeric_options_out_of_range_are_one_line_errors(cmd_path, opt, capsys):
    t = opt.type
    step = 1 if isinstance(t, click.IntRange) else 0.5
    below = t.min - step if not t.min_open else t.min
    above = t.max + step if not t.max_open else t.max
    for value in (below, above, "1e400" if isinstance(t, click.FloatRange) else "99999999999999999999999", "x"):
        with pytest.raises(SystemExit) as e:
            main.main([*cmd_path, opt.opts[0], str(value)], prog_name="lookalike")
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err, (value, err)
        assert opt.opts[0] in err or opt.name in err or "Invalid value" in err, (value, err)


def test_evaluate_and_search_k_and_chunk_size(tmp_path):
    make_set(tmp_path / "imgs", n_classes=2, per_class=1)
    for args in (["extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--chunk-size", "0"],
                 ["extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--batch-size", "0"],
                 ["extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--workers", "-1"],
                 ["extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--chunk-size", "-5"],
                 ["search", tmp_path / "idx", "--query-features", tmp_path / "f.h5", "-o", tmp_path / "r.csv", "-k", "-1"],
                 ["evaluate", tmp_path / "r.csv", "--labels", tmp_path / "l.csv", "-k", "0"]):
        _one_line_error(lookalike_cli(*args))
    with pytest.raises(LookalikeError, match="k >= 1"):
        from lookalike.api import evaluate

        evaluate(tmp_path / "r.csv", tmp_path / "l.csv", k=0)


def test_unwritable_output_is_a_user_error(tmp_path):
    """A file in the way of an output folder (the same class as a read-only folder, which root can
    write anyway): exit 2 and the path, not an unexpected error."""
    make_set(tmp_path / "imgs", n_classes=2, per_class=1)
    (tmp_path / "file").write_text("x")
    err = _one_line_error(lookalike_cli("extract", tmp_path / "imgs", "-o", tmp_path / "file" / "f.h5",
                                        "--image-size", "64", "--model", "lite0"))
    assert str(tmp_path / "file") in err


# ------------------------------------------------------------------ names in text files


@pytest.mark.parametrize("fmt", ["digix", "naic", "csv"])
def test_result_names_round_trip_exactly_or_are_refused(fmt, tmp_path):
    from lookalike.formats import read_results, write_results

    for name in NASTY:
        out = tmp_path / f"r.{fmt}"
        q, g = ["q " + name, "plain.jpg"], [name, "other.jpg", "x" + name]
        try:
            write_results(out, fmt, q, g, np.ones((2, 3), np.float32), np.array([[0, 1, 2], [2, 1, 0]]))
        except LookalikeError as e:
            assert fmt == "digix" and "DIGIX" in str(e)
            continue
        back = read_results(out)
        assert back == {q[0]: g, q[1]: [g[2], g[1], g[0]]}, (fmt, name)


def test_labels_skipped_and_per_query_files_round_trip(tmp_path):
    import csv

    from lookalike.formats import read_labels, read_names, write_labels, write_per_query_csv, write_skipped_csv

    labels = {n: f"cls {i}" for i, n in enumerate(NASTY)}
    write_labels(tmp_path / "l.csv", labels)
    assert read_labels(tmp_path / "l.csv") == labels
    write_skipped_csv(tmp_path / "s.csv", [(n, "reason, with\rbreak") for n in NASTY])
    with open(tmp_path / "s.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[1:] == [[n, "reason, with\rbreak"] for n in NASTY]
    write_per_query_csv(tmp_path / "p.csv", NASTY, ["c"] * len(NASTY), {"ap@10": [0.5] * len(NASTY)})
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        assert [r[0] for r in list(csv.reader(f))[1:]] == NASTY
    (tmp_path / "n.txt").write_text("\n".join(n for n in NASTY if "\n" not in n) + "\r\n\n")
    assert read_names(tmp_path / "n.txt")[:2] == NASTY[:2]
    assert " lead.jpg" in read_names(tmp_path / "n.txt") and "trail.jpg " in read_names(tmp_path / "n.txt")


def test_labels_keep_leading_spaces_so_evaluate_finds_them(tmp_path):
    from lookalike.api import evaluate
    from lookalike.formats import write_labels, write_results

    write_labels(tmp_path / "l.csv", {" q.jpg": "a", " g.jpg": "a", "h.jpg": "b"})
    write_results(tmp_path / "r.csv", "csv", [" q.jpg"], [" g.jpg", "h.jpg"], np.ones((1, 2)), np.array([[0, 1]]))
    m = evaluate(tmp_path / "r.csv", tmp_path / "l.csv")
    assert m["top1"] == 1.0


# ------------------------------------------------------------------ names that become paths


HOSTILE_PATHS = ["../escape.jpg", "/tmp/lookalike-abs.jpg", "a/../../escape.jpg", "nul\x00.jpg", "ctl\x07.jpg",
                 "c:\\win.jpg", "..\\escape.jpg", "", "a//b.jpg"]


@pytest.mark.parametrize("name", HOSTILE_PATHS)
def test_confined_refuses_every_escape(name, tmp_path):
    from lookalike.paths import confined

    with pytest.raises(LookalikeError, match="cannot be a file name"):
        confined(tmp_path, name)


@pytest.mark.parametrize("name", HOSTILE_PATHS)
def test_collection_items_stay_in_their_folder(name, tmp_path):
    from lookalike.index import build_index
    from lookalike.store import write_store

    x = np.eye(4, dtype=np.float32)
    write_store(tmp_path / "g.h5", [f"g{i}.jpg" for i in range(4)], x, {"model_id": "m"})
    col = build_index(tmp_path / "g.h5", tmp_path / "c")
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(LookalikeError):
        col.add([name], x[:1], record=True, files={name: b"x"})
    assert sorted(p for p in tmp_path.rglob("*")) == before and len(col) == 4


# ------------------------------------------------------------------ JSON files chosen by an attacker


@pytest.fixture
def index_with_queries(tmp_path):
    make_set(tmp_path / "imgs", n_classes=2, per_class=2)
    lookalike_cli("extract", tmp_path / "imgs", "-o", tmp_path / "g.h5", "--model", "lite0", "--image-size", "64", check=True)
    lookalike_cli("index", tmp_path / "g.h5", "-o", tmp_path / "idx", "--image-root", tmp_path / "imgs", check=True)
    return tmp_path


def _edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("model", ["os:abort", ["lite0", "os:abort"], "posix:abort"])
def test_a_saved_index_cannot_choose_code_to_run(index_with_queries, model):
    t = index_with_queries
    _edit_json(t / "idx" / "manifest.json", lambda d: d["extract_config"].update(model=model))
    p = lookalike_cli("search", t / "idx", "--queries", t / "imgs", "-o", t / "r.csv", "-k", "3")
    _one_line_error(p, "names code to run", "--trust-remote-code")  # not SIGABRT


def test_a_trained_model_folder_cannot_choose_code_to_run_unless_trusted(tmp_path):
    """lookalike_model.json naming package.module:factory: refused, even with --model given by the
    user; with --trust-remote-code the named factory is imported (a harmless one here)."""
    mod = tmp_path / "mods" / "tinybackbone.py"
    mod.parent.mkdir()
    mod.write_text("import torch\n"
                   "def make():\n"
                   "    return torch.nn.Conv2d(3, 8, 3, stride=4)\n")
    run = tmp_path / "run"
    run.mkdir()
    import torch

    from lookalike.catalog import write_model_meta
    from lookalike.models import CGDHead, Embedder

    emb = Embedder(torch.nn.Conv2d(3, 8, 3, stride=4), head=CGDHead(8, "SG", 16))
    torch.save({k: v.half() for k, v in emb.state_dict().items()}, run / "model_fp16.pt")
    write_model_meta(run, {"backbone": "tinybackbone:make", "descriptors": "SG", "dim": 16, "gem_p": 3.0,
                           "image_size": 64, "classes": 2, "weights": "model_fp16.pt"})
    make_set(tmp_path / "imgs", n_classes=2, per_class=1)
    env = {"PYTHONPATH": str(mod.parent)}
    args = ("extract", tmp_path / "imgs", "-o", tmp_path / "f.h5", "--model", run, "--engine", "torch")
    _one_line_error(lookalike_cli(*args, env={**os.environ, **env}), "names code to run")
    p = lookalike_cli(*args, "--trust-remote-code", env={**os.environ, **env})
    assert p.returncode == 0, p.stderr
    # abort would have killed the process: with trust it is imported, so it is never tried here


@pytest.mark.parametrize("damage", [
    ("manifest.json", lambda d: d.update(extract_config=["not", "a", "dict"])),
    ("manifest.json", lambda d: d.update(extract_config={"model": "lite0", "image_size": "huge"})),
    ("manifest.json", lambda d: d.update(extract_config={"model": "lite0", "pooling": "os:system"})),
    ("manifest.json", lambda d: d.update(extract_config={"model": 5})),
    ("manifest.json", lambda d: d.update(extract_config={"model": [{"a": 1}]})),
    ("manifest.json", lambda d: d.update(dim="512")),
    ("manifest.json", lambda d: d.update(deleted_rows=[-1])),
    ("manifest.json", lambda d: d.update(items="all")),
    ("names.json", lambda d: d.__setitem__(0, 7)),
    ("names.json", lambda d: d.__setitem__(1, d[0])),
])
def test_damaged_index_files_are_one_line_errors(index_with_queries, damage):
    t = index_with_queries
    file, change = damage
    _edit_json(t / "idx" / file, change)
    _one_line_error(lookalike_cli("search", t / "idx", "--queries", t / "imgs", "-o", t / "r.csv", "-k", "3"))


@pytest.mark.parametrize("line", [
    b'{"op":"add","name":"x.jpg","feature":"%%%not base64"}',
    b'{"op":"add","name":"x.jpg","feature":"AAAAAAAAAAA="}',  # 8 bytes: 2 floats, wrong dimension
    b'{"op":"add","name":"x.jpg","feature":"AADAfw=="}',  # NaN
    b'{"op":"rm -rf","name":"x.jpg"}',
    b'{"op":"delete","name":["a"]}',
    b'["op","add"]',
])
def test_damaged_journal_lines_are_one_line_errors(index_with_queries, line):
    t = index_with_queries
    (t / "idx" / "journal.jsonl").write_bytes(line + b"\n" + b'{"op":"delete","name":"nothing.jpg"}\n')
    _one_line_error(lookalike_cli("search", t / "idx", "--queries", t / "imgs", "-o", t / "r.csv", "-k", "3"), "journal")


@pytest.mark.parametrize("content", [
    {"ensemble_weights": "abc", "whiten": True},
    {"ensemble_weights": [1.0], "whiten": True, "rerank": {"steps": ["os.system"]}},
    {"ensemble_weights": [1.0], "whiten": True, "rerank": {"steps": ["kr"], "k1": "1e9"}},
    {"ensemble_weights": [1.0], "whiten": True, "rerank": {"steps": ["kr"], "k1": -4}},
    ["not", "an", "object"],
])
def test_settings_files_with_bad_values_are_refused(index_with_queries, content):
    t = index_with_queries
    (t / "s.json").write_text(json.dumps(content))
    _one_line_error(lookalike_cli("run", "--gallery", t / "imgs", "--queries", t / "imgs", "-o", t / "r.csv",
                                  "-k", "3", "--model", "lite0", "--image-size", "64", "--select", t / "s.json"))
    (t / "rr.json").write_text(json.dumps({"rerank": content["rerank"]} if isinstance(content, dict) and "rerank" in content
                                          else content))
    if isinstance(content, dict) and "rerank" in content:
        _one_line_error(lookalike_cli("search", t / "idx", "--queries", t / "imgs", "-o", t / "r.csv",
                                      "-k", "3", "--rerank", t / "rr.json"))


@pytest.mark.parametrize("config", [
    {"command": "run", "gallery": 5, "queries": ["x"], "extract": "lite0"},
    {"command": "search", "index": {"a": 1}, "queries": None},
    {"command": "run", "extract": {"model": "os:abort"}, "index_dir": "/nonexistent"},
    "just a string",
])
def test_results_config_files_with_bad_values(config, tmp_path):
    from lookalike.api.scoring import _report_sources

    (tmp_path / "r.csv").write_text("q.jpg,{g.jpg}\n")
    (tmp_path / "r.csv.config.json").write_text(json.dumps(config))
    try:
        q, g, cfg = _report_sources(tmp_path / "r.csv")
    except LookalikeError as e:
        assert "names code to run" in str(e) or "settings" in str(e)
    else:
        assert cfg is None or cfg.model != "os:abort"
