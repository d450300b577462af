"""Result and label files: DIGIX CSV, NAIC JSON, plain CSV, the ``image,label`` labels CSV, and the
``skipped.csv`` (unreadable images) and per-query metrics CSVs.

- DIGIX: one line per query, ``query.jpg,{g1.jpg,g2.jpg,...,g10.jpg}`` (no header).
- NAIC: UTF-8 JSON ``{"query.png": ["g1.png", ... 100 names]}`` (exactly 100, or the gallery size).
- CSV: header ``query,rank,gallery,score``, rank starting at 1.
Readers detect the format from the content, so ``evaluate`` takes any of them.

One rule for names in text files: what a writer writes, its reader reads back exactly, or the
writer refuses it. DIGIX cannot hold names with commas, braces, outer spaces or any line break
(anything ``str.splitlines`` splits on), so those are refused there; CSV rows holding a line break
are written fully quoted; NAIC JSON escapes everything. Readers keep names exactly (the labels
reader too: a name may start with a space).

The results formats are a registry (``register_format``: name, suffixes it is guessed from, writer,
reader, content detector); ``FORMATS``, ``format_for_path``, ``write_results`` and ``read_results``
go through it. Readers and writers are hand-written: each is a few lines of ``csv``/``json``, and
no library knows these competition formats.

NAIC feature coding I/O: a folder of ``NAME.dat`` files, each one little-endian float32 vector
(features) or exactly B bytes (codes); ``train_list.txt`` lines ``filename id``. An image's name is
its ``.dat`` file's path relative to the folder (POSIX style, sub-folders included) without ``.dat``;
names are confined to the folder (``paths.confined``) when written.
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
        text = path.read_bytes().decode("utf-8-sig")  # no newline translation: a quoted \r in a name survives
    except FileNotFoundError:
        raise LookalikeError(f"{path}: results file not found") from None
    except IsADirectoryError:
        raise LookalikeError(f"{path}: a folder, not a results file") from None
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


# what str.splitlines() (and so any line-based reader) splits on
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _csv_text(rows) -> str:
    """CSV text with "\\n" line ends. A row with a field holding a line break of any kind is written
    fully quoted (the csv module would leave a lone ``\\r`` unquoted), so a CSV reader gets every
    field back exactly; NUL, which CSV cannot carry, is refused."""
    buf = io.StringIO()
    plain = csv.writer(buf, lineterminator="\n")
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        cells = [c if isinstance(c, str) else str(c) for c in row]
        if any("\x00" in c for c in cells):
            raise LookalikeError(f"a name holds a NUL character, which a CSV file cannot carry: {cells!r}")
        (quoted if any(ch in c for c in cells for ch in LINE_BREAKS) else plain).writerow(row)
    return buf.getvalue()


def _digix_name(n: str) -> str:
    """DIGIX lines are split on any line break, then on commas and braces, and names are stripped:
    a name that cannot come back the same is refused."""
    if not n or n != n.strip() or any(ch in n for ch in ",{}" + LINE_BREAKS):
        raise LookalikeError(f"image name {n!r} is empty, has spaces around it, or holds a comma, a brace or a line "
                             "break, which a DIGIX results file cannot hold; use --format csv or naic")
    return n


def _write_digix(query_names, ranked, scores) -> str:
    lines = []
    for q, names in zip(query_names, ranked):
        for n in [q, *names]:
            _digix_name(n)
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
    rows = [["query", "rank", "gallery", "score"]]
    for q, names, srow in zip(query_names, ranked, scores):
        rows += [[q, r, n, f"{float(s):.6f}"] for r, (n, s) in enumerate(zip(names, srow), 1)]
    return _csv_text(rows)


def _detect_csv(stripped: str) -> bool:
    return stripped.splitlines()[0].strip().lower().replace(" ", "") == "query,rank,gallery,score"


def _read_csv(path, text: str) -> dict[str, list[str]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for i, row in enumerate(csv.DictReader(io.StringIO(text.lstrip(), newline="")), 2):
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
    if isinstance(skipped, dict):
        rows = [["set", "image", "reason"]] + [[set_name, name, reason] for set_name, rows in skipped.items()
                                               for name, reason in rows]
    else:
        rows = [["image", "reason"], *skipped]
    write_text_atomic(path, _csv_text(rows))


def write_per_query_csv(path, queries, labels, per_query: dict) -> None:
    """``query,label,<metric>...`` one row per query (``evaluate --per-query``); ``per_query`` maps a
    metric to its per-query values (as ``metrics.retrieval_metrics`` returns); floats with 6
    significant digits."""
    cols = list(per_query)
    rows = [["query", "label", *cols]]
    for i, q in enumerate(queries):
        rows.append([q, labels[i], *[f"{per_query[c][i]:.6g}" if isinstance(per_query[c][i], float) else per_query[c][i]
                                     for c in cols]])
    write_text_atomic(path, _csv_text(rows))


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
                name = row[fields["image"]] or ""  # exact: names may start or end with spaces
                if name.strip():
                    labels[name] = (row[fields["label"]] or "").strip()
    except FileNotFoundError:
        raise LookalikeError(f"{path}: labels file not found") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not UTF-8 text; save the labels CSV as UTF-8") from None
    if not labels:
        raise LookalikeError(f"{path}: no labels; expected rows image,label")
    return labels


def write_labels(path: str | os.PathLike, labels: dict[str, str]) -> None:
    write_text_atomic(path, _csv_text([["image", "label"], *([k, v] for k, v in labels.items())]))


# ---------------------------------------------------------------- NAIC feature-coding files


def _dat_files(folder: Path) -> list[Path]:
    """Every ``*.dat`` file under ``folder``, sub-folders included (symlinked folders are not
    followed), ordered by their path relative to ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LookalikeError(f"{folder}: not a folder; expected a folder of NAME.dat files")

    def fail(err: OSError):
        raise LookalikeError(f"{err.filename or folder}: cannot list the folder ({err.strerror or err}); check its "
                             "permissions") from None

    files = []
    for root, _, names in os.walk(folder, onerror=fail):
        files += [p for p in (Path(root, n) for n in names if n.endswith(".dat")) if p.is_file()]
    if not files:
        raise LookalikeError(f"{folder}: no .dat files; expected one NAME.dat per image")
    return sorted(files, key=lambda p: p.relative_to(folder).parts)


def _dat_name(folder: Path, file: Path) -> str:
    """An image's name: its ``.dat`` file's path relative to ``folder`` (POSIX style) without ``.dat``."""
    return file.relative_to(folder).as_posix()[:-4]


def _read_dat(file: Path, size: int, what: str) -> bytes:
    """The ``size`` bytes of ``file`` (its size checked before reading it)."""
    try:
        got = file.stat().st_size
        data = file.read_bytes() if got == size else b""
    except OSError as e:
        raise LookalikeError(f"{file}: cannot read it ({e.strerror or e}); check its permissions") from None
    if got != size or len(data) != size:
        raise LookalikeError(f"{file}: {got} bytes, {what}")
    return data


def _naic_paths(folder, names) -> list[Path]:
    """``folder/NAME.dat`` for every name, each confined to ``folder`` (:func:`lookalike.paths.confined`:
    sub-folders allowed; absolute names, ``..``, empty parts and control characters refused), and no
    two names on one file; all checked before anything is written."""
    from .paths import confined

    folder = Path(folder)
    paths, owner = [], {}
    for n in names:
        try:
            p = confined(folder, n)
        except LookalikeError as e:
            raise LookalikeError(f"{e}; a NAIC .dat folder names each file after its image, so give the images "
                                 "relative names (a list file's lines are the names: write them relative to the "
                                 "list) or write a code file with -o instead") from None
        p = p.with_name(p.name + ".dat")
        key = p.relative_to(folder).as_posix()
        if key in owner:
            raise LookalikeError(f"names {owner[key]!r} and {n!r} would both be written to {p}; give the images "
                                 "distinct names")
        owner[key] = n
        paths.append(p)
    for key, n in owner.items():  # NAME.dat must not be the folder of another name's file
        parts = key.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in owner:
                other = owner["/".join(parts[:i])]
                raise LookalikeError(f"names {other!r} and {n!r} clash: {folder / '/'.join(parts[:i])} would be both "
                                     "a file and a folder; give the images distinct names")
    return paths


def _write_dats(folder, names, rows) -> None:
    paths = _naic_paths(folder, names)
    if len(paths) != len(rows):
        raise LookalikeError(f"{len(paths)} names for {len(rows)} vectors")
    Path(folder).mkdir(parents=True, exist_ok=True)
    for p, row in zip(paths, rows):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(row.tobytes())


def read_naic_features(folder) -> tuple[list[str], np.ndarray]:
    """Every ``NAME.dat`` under ``folder`` (little-endian float32, all the same length; ``NAME`` may
    hold sub-folders) -> (names, (n, d) float32)."""
    folder = Path(folder)
    files = _dat_files(folder)
    try:
        size = files[0].stat().st_size
    except OSError as e:
        raise LookalikeError(f"{files[0]}: cannot read it ({e.strerror or e}); check its permissions") from None
    if size == 0 or size % 4:
        raise LookalikeError(f"{files[0]}: {size} bytes is not a float32 vector; expected 4·d bytes")
    out = np.empty((len(files), size // 4), np.float32)
    for i, f in enumerate(files):
        data = _read_dat(f, size, f"but {files[0].name} has {size}; all features must have one dimension")
        out[i] = np.frombuffer(data, "<f4")
    return [_dat_name(folder, f) for f in files], out


def write_naic_features(folder, names, features: np.ndarray) -> None:
    """One ``NAME.dat`` (little-endian float32) per image, inside ``folder`` (see :func:`_naic_paths`)."""
    _write_dats(folder, list(names), np.asarray(features, "<f4"))


def write_naic_codes(folder, names, codes: np.ndarray) -> None:
    """One ``NAME.dat`` per image holding exactly its B code bytes, inside ``folder`` (see
    :func:`_naic_paths`)."""
    _write_dats(folder, list(names), np.ascontiguousarray(codes, np.uint8))


def read_naic_codes(folder, nbytes: int) -> tuple[list[str], np.ndarray]:
    """Every ``NAME.dat`` under ``folder``, each exactly ``nbytes`` -> (names, (n, nbytes) uint8)."""
    folder = Path(folder)
    files = _dat_files(folder)
    out = np.empty((len(files), nbytes), np.uint8)
    for i, f in enumerate(files):
        data = _read_dat(f, nbytes, f"the codec writes exactly {nbytes}; a code over or under budget is invalid")
        out[i] = np.frombuffer(data, np.uint8)
    return [_dat_name(folder, f) for f in files], out


def read_train_list(path) -> dict[str, str]:
    """NAIC ``train_list.txt``: lines ``filename id`` -> {filename without its extension: id} (a
    filename with folders keeps them: ``a/b.png`` -> ``a/b``)."""
    path = Path(path)
    labels = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LookalikeError(f"{path}: train list not found") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not UTF-8 text; write the train list as UTF-8 `filename id` lines") from None
    except OSError as e:
        raise LookalikeError(f"{path}: cannot read the train list ({e.strerror or e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise LookalikeError(f"{path}:{i}: expected `filename id`, got {line.strip()!r}")
        name = parts[0]
        stem = name.rsplit("/", 1)[-1]
        labels[name[: len(name) - len(stem)] + Path(stem).stem] = parts[1]
    if not labels:
        raise LookalikeError(f"{path}: empty train list")
    return labels


def read_names(path) -> list[str]:
    """A text file of image names, one per line, taken exactly (a CRLF line end is removed; blank
    lines are skipped): a name may start or end with spaces."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LookalikeError(f"{path}: names file not found") from None
    except UnicodeDecodeError:
        raise LookalikeError(f"{path}: not UTF-8 text; write one name per line") from None
    # one name per line, exactly (a name may start or end with spaces); only blank lines are skipped
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]
