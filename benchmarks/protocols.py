"""The two dev protocols of ``../shared/datasets`` (its README), shared by the benchmarks.

- ``grocery`` (category level): queries = the 2,485 ``test`` photos; gallery = ``train`` + ``val`` +
  ``iconic`` (3,017); relevant = same ``class_id``.
- ``books`` (instance level): queries = the 101 phone photos of ``smvs_books/query``; gallery = the
  101 cover scans + all 5,502 grocery photos as distractors (5,603); exactly one relevant image.

Score = 0.5 · top-1 + 0.5 · mAP@10 (AP@10 normalised by min(#relevant, 10)).

Images are named by their absolute path, so one feature store over :func:`all_images` serves both
protocols (``features_for`` picks the rows). Gallery classes (for leave-one-out selection) are the
grocery ``class_id`` for grocery photos and the book label for a cover (a class of one).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@dataclass
class Protocol:
    name: str
    queries: list[str]  # absolute paths
    gallery: list[str]
    query_labels: np.ndarray
    gallery_labels: np.ndarray

    def score(self, ids: np.ndarray, k: int = 10) -> dict:
        """Metrics of ranked gallery row ids (nq, >= k)."""
        from lookalike.metrics import retrieval_metrics

        rel = self.gallery_labels[ids[:, :k]] == self.query_labels[:, None]
        n_rel = np.array([(self.gallery_labels == lab).sum() for lab in self.query_labels])
        return retrieval_metrics(rel, n_rel, k)[0]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def grocery(data: Path = DATA) -> Protocol:
    root = data / "grocery_store"
    rows = _rows(root / "labels.csv")
    q = [r for r in rows if r["split"] == "test"]
    g = [r for r in rows if r["split"] in ("train", "val", "iconic")]
    p = lambda r: str((root / r["path"]).resolve())  # noqa: E731
    return Protocol("grocery", [p(r) for r in q], [p(r) for r in g],
                    np.array([r["class_id"] for r in q]), np.array([r["class_id"] for r in g]))


def books(data: Path = DATA) -> Protocol:
    root = data / "smvs_books"
    rows = _rows(root / "labels.csv")
    q = [r for r in rows if r["role"] == "query"]
    ref = [r for r in rows if r["role"] == "reference"]
    groc = _rows(data / "grocery_store" / "labels.csv")
    p = lambda base, r: str((base / r["path"]).resolve())  # noqa: E731
    gallery = [p(root, r) for r in ref] + [p(data / "grocery_store", r) for r in groc]
    glabels = [r["label"] for r in ref] + ["grocery_" + r["class_id"] for r in groc]
    return Protocol("books", [p(root, r) for r in q], gallery,
                    np.array([r["label"] for r in q]), np.array(glabels))


def protocols(data: Path = DATA) -> list[Protocol]:
    return [books(data), grocery(data)]


def all_images(data: Path = DATA) -> list[str]:
    """Every image either protocol uses, once (5,704 paths)."""
    seen: dict[str, None] = {}
    for p in protocols(data):
        for x in p.queries + p.gallery:
            seen.setdefault(x, None)
    return list(seen)


def write_listing(path: Path, data: Path = DATA) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{x}\n" for x in all_images(data)))
    return path


def features_for(names: list[str], features: np.ndarray, proto: Protocol) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, gallery rows) of a store made over :func:`all_images`."""
    pos = {n: i for i, n in enumerate(names)}
    return features[[pos[n] for n in proto.queries]], features[[pos[n] for n in proto.gallery]]
