"""The whole DIGIX test-B night on this machine: every stage's seconds and peak memory.

Test-B is 41,574 queries against 95,120 gallery photos (136,694 images). Stages:

1. extraction: the end-to-end rate of ``Extractor.extract`` (default model) measured on real
   photos (grocery, ``../shared/datasets``), projected to 136,694 images;
2. synthetic features: 136,694 clustered 512-d rows with known classes (like
   ``benchmarks/rerank_scale.py``), standing in for the extracted ones;
3. index (``build_index``: Flat, saved), 4. search (top-10), 5. ``floor``: the exact k=31 k-NN
graph of all rows (the part of ``kr`` no implementation can skip; not part of the night), 6. ``kr``
and 7. ``df`` re-ranking, 8. the results file (DIGIX CSV) and 9. scoring it (``evaluate``) — the
library's own functions.

Peak memory is sampled from ``/proc/self/statm`` every 50 ms during each stage (resident set).

    python benchmarks/digix_b.py                      # full size (df is long: see --stages)
    python benchmarks/digix_b.py --scale 0.1          # a tenth, every stage
    python benchmarks/digix_b.py --stages extract,index,search,kr,write,score
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

QUERIES, GALLERY = 41_574, 95_120
STAGES = ("extract", "index", "search", "floor", "kr", "df", "write", "score")


class Peak:
    """Peak resident memory (GB) of this process while the block runs."""

    def __enter__(self):
        self.peak, self._stop = _rss_gb(), threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        self.t0 = time.perf_counter()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_gb())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_gb())


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def extraction_rate(n_photos: int) -> tuple[float, str]:
    """Images/s of the default extractor end to end on ``n_photos`` grocery photos (a fresh store)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from protocols import DATA, grocery

    from PIL import Image

    from lookalike import Extractor

    if not (DATA / "grocery_store").exists():
        return float("nan"), "no ../shared/datasets here"
    photos = grocery().gallery[:n_photos]
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "photos.txt"
        lst.write_text("\n".join(photos) + "\n")
        ex = Extractor()
        ex.embed_images([Image.new("RGB", (64, 64))])  # model load not timed
        res = ex.extract(lst, Path(tmp) / "f.h5", progress=False)
    return res.rate, ex.config.model_name


def synthetic(n_q: int, n_g: int, dim: int, classes: int, noise: float, seed: int = 0):
    from lookalike.numeric import l2n

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    lq, lg = rng.integers(0, classes, n_q), rng.integers(0, classes, n_g)
    q = l2n(centres[lq] + noise * rng.normal(size=(n_q, dim)).astype(np.float32))
    g = l2n(centres[lg] + noise * rng.normal(size=(n_g, dim)).astype(np.float32))
    return q, g, lq, lg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of test-B size (queries and gallery)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    ap.add_argument("--photos", type=int, default=300, help="grocery photos timed for the extraction rate")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=2.5, help="per-dimension noise relative to the class spread")
    args = ap.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    from lookalike.collection import Collection  # noqa: F401  (imports before timing)
    from lookalike.formats import write_labels, write_results
    from lookalike.index import IndexConfig, build_index
    from lookalike.postprocess import RerankConfig
    from lookalike.store import FeatureStore

    n_q, n_g = round(QUERIES * args.scale), round(GALLERY * args.scale)
    rows = []

    def report(name, p, extra=""):
        rows.append((name, p.seconds, p.peak, extra))
        print(f"{name:<10s} {p.seconds:8.1f} s   peak {p.peak:5.2f} GB   {extra}", flush=True)

    print(f"DIGIX test-B at scale {args.scale}: {n_q} queries + {n_g} gallery = {n_q + n_g} images, "
          f"{args.dim}-d, {args.classes} classes, noise {args.noise}; {os.cpu_count()} cores", flush=True)
    projected = 0.0
    if "extract" in stages:
        with Peak() as p:
            rate, model = extraction_rate(args.photos)
        projected = (n_q + n_g) / rate if rate == rate else 0.0
        report("extract", p, f"{rate:.1f} img/s end to end ({model}, {args.photos} grocery photos, model load "
                             f"excluded) -> {projected / 3600:.2f} h for {n_q + n_g} images (projected)")
    with Peak() as p:
        q, g, lq, lg = synthetic(n_q, n_g, args.dim, args.classes, args.noise)
    report("features", p, "synthetic, in place of the extracted ones")
    names_g = [f"g{i:06d}.jpg" for i in range(n_g)]
    names_q = [f"q{i:06d}.jpg" for i in range(n_q)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        col = None
        if set(stages) & {"index", "search", "kr", "df", "write", "score"}:
            with Peak() as p:
                col = build_index(FeatureStore(names_g, g, {"model_id": "synthetic"}), tmp / "idx", IndexConfig("Flat"))
            report("index", p, "Flat, saved (atomic swap)")
        if "search" in stages or "write" in stages or "score" in stages:
            with Peak() as p:
                results["search"] = col.search(q, 10)
            report("search", p, "exact top-10")
        if "floor" in stages:  # what k-reciprocal cannot beat: the exact k1+1 neighbours of every row
            from lookalike.numeric import knn

            with Peak() as p:
                knn(np.concatenate([q, g]), np.concatenate([q, g]), 32)
            report("floor", p, "exact k=31 k-NN graph of all rows (what kr builds first)")
        for step in ("kr", "df"):
            if step in stages:
                with Peak() as p:
                    results[step] = col.search(q, 10, rerank=RerankConfig(steps=(step,)))
                report(step, p, f"--rerank {step} (defaults)")
        if "write" in stages:
            with Peak() as p:
                for key, (s, i) in results.items():
                    write_results(tmp / f"{key}.csv", "digix", names_q, col.names, s, i)
            report("write", p, f"{len(results)} DIGIX results files")
        if "score" in stages:
            from lookalike.api import evaluate

            write_labels(tmp / "labels.csv", {**{n: str(c) for n, c in zip(names_q, lq)},
                                              **{n: str(c) for n, c in zip(names_g, lg)}})
            scores = {}
            with Peak() as p:
                for key in results:
                    scores[key] = evaluate(tmp / f"{key}.csv", tmp / "labels.csv", gallery=tmp / "idx")
            report("score", p, "evaluate, " + "; ".join(f"{k} {m['digix_score']:.4f} (top-1 {m['top1']:.4f}, "
                                                         f"mAP@10 {m['mAP@10']:.4f})" for k, m in scores.items()))
    measured = sum(s for n, s, _, _ in rows if n not in ("extract", "floor"))
    print(f"total: {measured:.0f} s measured after extraction + {projected:.0f} s extraction (projected) = "
          f"{(measured + projected) / 3600:.2f} h; peak {max(r[2] for r in rows):.2f} GB")


if __name__ == "__main__":
    main()
