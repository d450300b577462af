"""Result and label files: DIGIX CSV, NAIC JSON, plain CSV, the ``image,label`` labels CSV, and the
``skipped.csv`` (unreadable images) and per-query metrics CSVs.

- DIGIX: one line per query, ``query.jpg,{g1.jpg,g2.jpg,...,g10.jpg}`` (no header).
- NAIC: UTF-8 JSON ``{"query.png": ["g1.png", ... 100 names]}`` (exactly 100, or the gallery size).
- CSV: header ``query,rank,gallery,score``, rank starting at 1.
Readers detect the format from the content, so ``evaluate`` takes any of them.

The results formats are a registry (``register_format``: name, suffixes it is guessed from, writer,
reader, content detector); ``FORMATS``, ``format_for_path``, ``write_results`` and ``read_results``
go through it. Readers and writers are hand-written: each is a few lines of ``csv``/``json``, and
no library knows these competition formats.

NAIC feature coding I/O: a folder of ``NAME.dat`` files, each one little-endian float32 vector
(features) or exactly B bytes (codes); ``train_list.txt`` lines ``filename id``. An image's name is
its file name without ``.dat``.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ._io import write_text_atomic
from .errors import LookalikeError

NAIC_K = 100
DEFAULT_FORMAT = "digix"  # for paths whose suffix names no format


# ---------------------------------------------------------------- results formats: the registry
#
# Each results format is one `register_format` entry (name, the suffixes it is guessed from, writer,
# reader and the detector that recognises its content); FORMATS, check_format, format_for_path,
# write_results and read_results all go through the registry.


@dataclass(frozen=True)
class ResultsFormat:
    """A results file format.

    - ``write(query_names, ranked, scores) -> str``: the whole file text (written atomically as
      UTF-8); ``ranked`` holds each query's gallery names best first, ``scores`` the (n, k) scores.
    - ``read(path, text) -> {query: [gallery names, best first]}`` (``text``: the file decoded as
      UTF-8, a BOM removed; ``path`` for messages); None for a format that is only written.
    - ``detect(text) -> bool``: is ``text`` (leading whitespace stripped) this format? A reader
      without a detector is the fallback for content no detector claims (the first registered wins).
    - ``suffixes``: lower-case path endings ``format_for_path`` guesses the format from.
    """

    name: str
    write: Callable
    read: Callable | None = None
    detect: Callable | None = None
    suffixes: tuple[str, ...] = ()
    help: str = ""


_FORMATS: dict[str, ResultsFormat] = {}
FORMATS: tuple[str, ...] = ()  # the registered names (rebound by register_format / unregister_format)


def register_format(name: str, write: Callable, read: Callable | None = None, detect: Callable | None = None,
                    suffixes=(), help: str = "") -> ResultsFormat:
    """Add a results format for ``search``/``run --format`` (and, with a reader, ``evaluate``)."""
    global FORMATS
    if not isinstance(name, str) or not name or "," in name or name in _FORMATS:
        raise LookalikeError(f"results format {name!r}: needs a new name without commas")
    fmt = ResultsFormat(name, write, read, detect, tuple(x.lower() for x in suffixes), help)
    _FORMATS[name] = fmt
    FORMATS = tuple(_FORMATS)
    return fmt


def unregister_format(name: str) -> None:
    global FORMATS
    results_format(name)
    del _FORMATS[name]
    FORMATS = tuple(_FORMATS)


def results_format(name: str) -> ResultsFormat:
    return _FORMATS[check_format(name)]


def results_formats() -> tuple[ResultsFormat, ...]:
    """The registered formats, in registration order."""
    return tuple(_FORMATS.values())


def check_format(fmt: str) -> str:
    if fmt not in _FORMATS:
        raise LookalikeError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    return fmt


def format_for_path(path, fmt: str | None) -> str:
    """The explicit format, else guessed from the suffix (.json -> naic), else digix."""
    if fmt:
        return check_format(fmt)
    low = str(path).lower()
    return next((f.name for f in _FORMATS.values() if any(low.endswith(x) for x in f.suffixes)), DEFAULT_FORMAT)


def write_results(path, fmt: str, query_names, gallery_names, scores: np.ndarray, indices: np.ndarray) -> None:
    writer = results_format(fmt).write
    gallery_names = list(gallery_names)
    ranked = [[gallery_names[j] for j in row if j >= 0] for row in indices]
    write_text_atomic(path, writer(query_names, ranked, scores))


def read_results(path) -> dict[str, list[str]]:
    """Any readable format -> {query: [gallery names, best first]} (file order kept), recognised by
    its content."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LookalikeError(f"{path}: results file not found") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not UTF-8 text; write results with `lookalike search`") from None
    stripped = text.lstrip()
    if not stripped:
        raise LookalikeError(f"{path}: empty results file")
    readers = [f for f in _FORMATS.values() if f.read and f.detect]
    readers += [f for f in _FORMATS.values() if f.read and not f.detect][:1]
    for f in readers:
        if f.detect is None or f.detect(stripped):
            return f.read(path, text)
    raise LookalikeError(f"{path}: not a results file in any readable format ({', '.join(f.name for f in readers)})")


# ---------------------------------------------------------------- the built-in results formats


def _write_digix(query_names, ranked, scores) -> str:
    lines = []
    for q, names in zip(query_names, ranked):
        for n in [q, *names]:
            if any(ch in n for ch in ",{}\n"):
                raise LookalikeError(f"image name {n!r} contains , {{ }} or a newline, which DIGIX CSV cannot hold; use --format csv")
        lines.append(f"{q},{{{','.join(names)}}}\n")
    return "".join(lines)


def _read_digix(path, text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        q, sep, rest = line.partition(",")
        rest = rest.strip()
        if not sep or not (rest.startswith("{") and rest.endswith("}")):
            raise LookalikeError(f"{path}:{i}: expected DIGIX `query,{{g1,g2,...}}`, NAIC JSON or query,rank,gallery,score CSV")
        inner = rest[1:-1].strip()
        out[q.strip()] = [g.strip() for g in inner.split(",")] if inner else []
    return out


def _write_naic(query_names, ranked, scores) -> str:
    return json.dumps(dict(zip(query_names, ranked)), ensure_ascii=False) + "\n"


def _read_naic(path, text: str) -> dict[str, list[str]]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise LookalikeError(f"{path}: invalid JSON ({e}); expected NAIC {{query: [names]}}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise LookalikeError(f"{path}: expected NAIC JSON {{query: [gallery names]}}")
    return {str(k): [str(x) for x in v] for k, v in data.items()}


def _write_csv(query_names, ranked, scores) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["query", "rank", "gallery", "score"])
    for q, names, srow in zip(query_names, ranked, scores):
        for r, (n, s) in enumerate(zip(names, srow), 1):
            w.writerow([q, r, n, f"{float(s):.6f}"])
    return buf.getvalue()


def _detect_csv(stripped: str) -> bool:
    return stripped.splitlines()[0].strip().lower().replace(" ", "") == "query,rank,gallery,score"


def _read_csv(path, text: str) -> dict[str, list[str]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for i, row in enumerate(csv.DictReader(io.StringIO(text.lstrip())), 2):
        try:
            out.setdefault(row["query"], []).append((int(row["rank"]), row["gallery"]))
        except (KeyError, TypeError, ValueError):
            raise LookalikeError(f"{path}:{i}: bad row; expected query,rank,gallery,score") from None
    return {q: [g for _, g in sorted(v)] for q, v in out.items()}


register_format("digix", _write_digix, _read_digix, help="one line per query: query.jpg,{g1.jpg,...,g10.jpg}")
register_format("naic", _write_naic, _read_naic, detect=lambda t: t.startswith("{"), suffixes=(".json",),
                help='JSON {"query.png": ["g1.png", ... 100 names]}')
register_format("csv", _write_csv, _read_csv, detect=_detect_csv, help="header query,rank,gallery,score")


# ---------------------------------------------------------------- other CSV files


def write_skipped_csv(path, skipped: list[tuple[str, str]] | dict[str, list[tuple[str, str]]]) -> None:
    """``image,reason`` rows for one set, or ``set,image,reason`` for a dict {set name: rows}."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if isinstance(skipped, dict):
        w.writerow(["set", "image", "reason"])
        w.writerows([set_name, name, reason] for set_name, rows in skipped.items() for name, reason in rows)
    else:
        w.writerow(["image", "reason"])
        w.writerows(skipped)
    write_text_atomic(path, buf.getvalue())


def write_per_query_csv(path, queries, labels, per_query: dict) -> None:
    """``query,label,<metric>...`` one row per query (``evaluate --per-query``); ``per_query`` maps a
    metric to its per-query values (as ``metrics.retrieval_metrics`` returns); floats with 6
    significant digits."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = list(per_query)
    w.writerow(["query", "label", *cols])
    for i, q in enumerate(queries):
        w.writerow([q, labels[i], *[f"{per_query[c][i]:.6g}" if isinstance(per_query[c][i], float) else per_query[c][i] for c in cols]])
    write_text_atomic(path, buf.getvalue())


def read_labels(path) -> dict[str, str]:
    """Labels CSV with a header holding ``image`` and ``label`` columns (others ignored)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = {(h or "").strip().lower(): h for h in (reader.fieldnames or [])}
            if "image" not in fields or "label" not in fields:
                raise LookalikeError(f"{path}: needs a header with columns image,label (found {','.join(reader.fieldnames or [])})")
            labels = {}
            for row in reader:
                name = (row[fields["image"]] or "").strip()
                if name:
                    labels[name] = (row[fields["label"]] or "").strip()
    except FileNotFoundError:
        raise LookalikeError(f"{path}: labels file not found") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not UTF-8 text; save the labels CSV as UTF-8") from None
    if not labels:
        raise LookalikeError(f"{path}: no labels; expected rows image,label")
    return labels


def write_labels(path: str | os.PathLike, labels: dict[str, str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "label"])
    for k, v in labels.items():
        w.writerow([k, v])
    write_text_atomic(path, buf.getvalue())


# ---------------------------------------------------------------- NAIC feature-coding files


def _dat_files(folder: Path) -> list[Path]:
    files = sorted(p for p in Path(folder).glob("*.dat") if p.is_file())
    if not files:
        raise LookalikeError(f"{folder}: no .dat files; expected one NAME.dat per image")
    return files


def read_naic_features(folder) -> tuple[list[str], np.ndarray]:
    """Every ``NAME.dat`` (little-endian float32, all the same length) -> (names, (n, d) float32)."""
    files = _dat_files(Path(folder))
    size = files[0].stat().st_size
    if size == 0 or size % 4:
        raise LookalikeError(f"{files[0]}: {size} bytes is not a float32 vector; expected 4·d bytes")
    out = np.empty((len(files), size // 4), np.float32)
    for i, f in enumerate(files):
        data = f.read_bytes()
        if len(data) != size:
            raise LookalikeError(f"{f}: {len(data)} bytes, but {files[0].name} has {size}; all features must have one dimension")
        out[i] = np.frombuffer(data, "<f4")
    return [f.name[:-4] for f in files], out


def write_naic_features(folder, names, features: np.ndarray) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n, row in zip(names, np.asarray(features, "<f4")):
        (folder / f"{n}.dat").write_bytes(row.tobytes())


def write_naic_codes(folder, names, codes: np.ndarray) -> None:
    """One ``NAME.dat`` per image holding exactly its B code bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for n, row in zip(names, np.ascontiguousarray(codes, np.uint8)):
        (folder / f"{n}.dat").write_bytes(row.tobytes())


def read_naic_codes(folder, nbytes: int) -> tuple[list[str], np.ndarray]:
    files = _dat_files(Path(folder))
    out = np.empty((len(files), nbytes), np.uint8)
    for i, f in enumerate(files):
        data = f.read_bytes()
        if len(data) != nbytes:
            raise LookalikeError(f"{f}: {len(data)} bytes, the codec writes exactly {nbytes}; a code over or under "
                                 "budget is invalid")
        out[i] = np.frombuffer(data, np.uint8)
    return [f.name[:-4] for f in files], out


def read_train_list(path) -> dict[str, str]:
    """NAIC ``train_list.txt``: lines ``filename id`` -> {name without extension: id}."""
    path = Path(path)
    labels = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LookalikeError(f"{path}: train list not found") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise LookalikeError(f"{path}:{i}: expected `filename id`, got {line.strip()!r}")
        labels[Path(parts[0]).stem] = parts[1]
    if not labels:
        raise LookalikeError(f"{path}: empty train list")
    return labels


def read_names(path) -> list[str]:
    """A text file of image names, one per line (blank lines skipped; surrounding whitespace removed)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LookalikeError(f"{path}: names file not found") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not UTF-8 text; write one name per line") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
