"""Spatial verification on the grocery packaged-product classes (31 brand/SKU classes).

Test queries of packaged classes against the whole protocol gallery (train + val + iconic); base
ranking = the default zero-shot features; then the top-N re-ordered by RANSAC-verified local
feature matches (fused with the global similarity, see ``lookalike.spatial``). Prints top-1 /
mAP@10 / score before and after and the time per query. ``benchmarks/spatial.py`` measures both dev
protocols, several feature sets, and the previous implementation for comparison.

    python benchmarks/spatial_grocery.py --data ../shared/datasets/grocery_store --method sift
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from lookalike import Extractor
from lookalike.metrics import retrieval_metrics
from lookalike.postprocess import knn
from lookalike.spatial import LocalFeatures, SpatialConfig, spatial_rerank

PACKAGED = {"Juice", "Milk", "Oat-Milk", "Oatghurt", "Sour-Cream", "Sour-Milk", "Soy-Milk", "Soyghurt", "Yoghurt"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/grocery_store")
    ap.add_argument("--workdir", default="bench-out/quality")
    ap.add_argument("--method", default="sift")
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--min-inliers", type=int, default=SpatialConfig.min_inliers)
    ap.add_argument("--max-queries", type=int, default=0, help="0 = all packaged-class test queries")
    ap.add_argument("--model", default="lite0", help="lite0 (zero-shot, SPoC), or a RUN_DIR from lookalike train")
    ap.add_argument("--all-classes", action="store_true", help="every test query, not only the packaged classes")
    args = ap.parse_args()
    root = Path(args.data)
    rows = list(csv.DictReader(open(root / "labels.csv", newline="")))
    path = {id(r): str((root / r["path"]).resolve()) for r in rows}
    work = Path(args.workdir)
    listing = work / "all_images.txt"
    listing.write_text("".join(f"{path[id(r)]}\n" for r in rows))
    ex = Extractor(model=args.model)
    res = ex.extract(listing, work / f"{ex.config.fingerprint()}.h5", progress=False)
    pos = {n: i for i, n in enumerate(res.names)}
    qs = [r for r in rows if r["split"] == "test" and (args.all_classes or r["coarse_name"] in PACKAGED)]
    if args.max_queries:
        qs = qs[:: max(1, len(qs) // args.max_queries)][: args.max_queries]
    gs = [r for r in rows if r["split"] in ("train", "val", "iconic")]
    qf = res.features[[pos[path[id(r)]] for r in qs]]
    gf = res.features[[pos[path[id(r)]] for r in gs]]
    ql = np.array([r["class_id"] for r in qs])
    gl = np.array([r["class_id"] for r in gs])
    n_rel = np.array([(gl == lab).sum() for lab in ql])
    scores, ids = knn(qf, gf, max(10, args.top_n))
    before = retrieval_metrics(gl[ids[:, :10]] == ql[:, None], n_rel)[0]
    cfg = SpatialConfig(method=args.method, top_n=args.top_n, min_inliers=args.min_inliers)
    cache = work / "local-features"
    lf = LocalFeatures(cfg, cache_dir=cache)
    cached_before = len(list(cache.glob("*.npz"))) if cache.exists() else 0
    t0 = time.perf_counter()
    _, ids2, inl = spatial_rerank([path[id(r)] for r in qs], [path[id(r)] for r in gs], scores, ids, cfg, features=lf)
    secs = time.perf_counter() - t0
    after = retrieval_metrics(gl[ids2[:, :10]] == ql[:, None], n_rel)[0]
    print(f"{len(qs)} {'' if args.all_classes else 'packaged-product '}test queries ({args.model}) vs {len(gs)} gallery; {args.method}, top-{args.top_n}, "
          f"min {args.min_inliers} inliers")
    print(f"before: top-1 {before['top1']:.4f}  mAP@10 {before['mAP@10']:.4f}  score {before['digix_score']:.4f}")
    print(f"after : top-1 {after['top1']:.4f}  mAP@10 {after['mAP@10']:.4f}  score {after['digix_score']:.4f}")
    computed = len(list(cache.glob("*.npz"))) - cached_before
    print(f"time: {secs / len(qs) * 1000:.0f} ms per query ({secs:.0f} s for {len(qs)} queries; local features "
          f"computed this run for {computed} images, the rest from the cache); "
          f"verified candidates per query: {(inl >= args.min_inliers).sum(1).mean():.1f}")


if __name__ == "__main__":
    main()
