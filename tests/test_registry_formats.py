"""The results-format registry: a format added by registration alone is checked, guessed from its
suffix, written, and recognised by read_results; the built-in ones keep their detection order."""
import numpy as np
import pytest

from lookalike import formats
from lookalike.errors import LookalikeError
from lookalike.formats import (check_format, format_for_path, read_results, register_format, results_format,
                               results_formats, unregister_format, write_results)


def _write_tsv(query_names, ranked, scores):
    return "#tsv\n" + "".join(f"{q}\t{r}\t{n}\n" for q, names in zip(query_names, ranked) for r, n in enumerate(names, 1))


def _read_tsv(path, text):
    out = {}
    for line in text.splitlines()[1:]:
        q, _, n = line.split("\t")
        out.setdefault(q, []).append(n)
    return out


@pytest.fixture
def tsv():
    register_format("tsv", _write_tsv, _read_tsv, detect=lambda t: t.startswith("#tsv"), suffixes=(".tsv",),
                    help="query<TAB>rank<TAB>gallery")
    try:
        yield
    finally:
        unregister_format("tsv")


def test_registered_format(tmp_path, tsv):
    assert formats.FORMATS == ("digix", "naic", "csv", "tsv") and check_format("tsv") == "tsv"
    assert format_for_path(tmp_path / "r.TSV", None) == "tsv" and format_for_path(tmp_path / "r.tsv", "csv") == "csv"
    assert results_format("tsv").help == "query<TAB>rank<TAB>gallery"
    idx, scores = np.array([[2, 0], [1, -1]]), np.zeros((2, 2), np.float32)
    write_results(tmp_path / "r.tsv", "tsv", ["q1", "q2"], ["a", "b", "c"], scores, idx)
    assert (tmp_path / "r.tsv").read_text() == "#tsv\nq1\t1\tc\nq1\t2\ta\nq2\t1\tb\n"
    assert read_results(tmp_path / "r.tsv") == {"q1": ["c", "a"], "q2": ["b"]}
    # the built-in formats are still read (the new detector comes after theirs, digix stays the fallback)
    for fmt in ("digix", "naic", "csv"):
        write_results(tmp_path / f"r.{fmt}", fmt, ["q1"], ["a", "b", "c"], scores[:1], idx[:1])
        assert read_results(tmp_path / f"r.{fmt}") == {"q1": ["c", "a"]}


def test_unregistered_format_is_gone(tmp_path):
    register_format("tsv", _write_tsv, _read_tsv, detect=lambda t: t.startswith("#tsv"), suffixes=(".tsv",))
    with pytest.raises(LookalikeError, match="needs a new name"):
        register_format("tsv", _write_tsv)
    unregister_format("tsv")
    assert formats.FORMATS == ("digix", "naic", "csv") == tuple(f.name for f in results_formats())
    assert format_for_path(tmp_path / "r.tsv", None) == "digix"
    with pytest.raises(LookalikeError, match="unknown format 'tsv'"):
        write_results(tmp_path / "r.tsv", "tsv", ["q"], ["a"], np.zeros((1, 1)), np.zeros((1, 1), int))
    (tmp_path / "r.tsv").write_text("#tsv\nq\t1\ta\n")
    with pytest.raises(LookalikeError, match="expected DIGIX"):
        read_results(tmp_path / "r.tsv")


def test_write_only_format_is_not_read(tmp_path):
    register_format("lines", lambda qn, ranked, s: "".join(" ".join(r) + "\n" for r in ranked))
    try:
        write_results(tmp_path / "r.txt", "lines", ["q"], ["a", "b"], np.zeros((1, 2)), np.array([[1, 0]]))
        assert (tmp_path / "r.txt").read_text() == "b a\n"
        with pytest.raises(LookalikeError, match="expected DIGIX"):  # the digix fallback tries it
            read_results(tmp_path / "r.txt")
    finally:
        unregister_format("lines")
