"""k-reciprocal re-ranking at DIGIX test-B scale on synthetic features, in bounded memory.

41,574 queries + 95,120 gallery, 512-d, clustered (like product classes). Prints time, peak RSS and
what the dense method (full (q+g)² float32 matrix) would need.

    python benchmarks/rerank_scale.py
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lookalike.metrics import retrieval_metrics
from lookalike.postprocess import k_reciprocal_rerank, knn, l2n, peak_rss_gb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=41_574)
    ap.add_argument("--gallery", type=int, default=95_120)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=1.2, help="per-dimension noise relative to the class centre spread")
    ap.add_argument("--k1", type=int, default=20)
    ap.add_argument("--k2", type=int, default=6)
    ap.add_argument("--lambda-value", type=float, default=0.3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    lq = rng.integers(0, args.classes, args.queries)
    lg = rng.integers(0, args.classes, args.gallery)
    q = l2n(centres[lq] + args.noise * rng.normal(size=(args.queries, args.dim)).astype(np.float32))
    g = l2n(centres[lg] + args.noise * rng.normal(size=(args.gallery, args.dim)).astype(np.float32))
    del centres
    n = args.queries + args.gallery
    print(f"{args.queries} queries + {args.gallery} gallery, {args.dim}-d, {args.classes} classes; "
          f"k1={args.k1} k2={args.k2} lambda={args.lambda_value}, noise {args.noise}", flush=True)
    rss0 = peak_rss_gb()
    t0 = time.perf_counter()
    _, base = knn(q, g, 10)
    t_base = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids = k_reciprocal_rerank(q, g, k=10, k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)
    secs = time.perf_counter() - t0
    n_rel = np.bincount(lg, minlength=args.classes)[lq]
    m0 = retrieval_metrics(lg[base] == lq[:, None], n_rel)[0]
    m1 = retrieval_metrics(lg[ids] == lq[:, None], n_rel)[0]
    print(f"exact search top-10: {t_base:.1f} s; DIGIX score {m0['digix_score']:.4f} (top-1 {m0['top1']:.4f}, mAP@10 {m0['mAP@10']:.4f})", flush=True)
    print(f"k-reciprocal (sparse): {secs:.1f} s = {secs / 60:.1f} min; DIGIX score {m1['digix_score']:.4f} "
          f"(top-1 {m1['top1']:.4f}, mAP@10 {m1['mAP@10']:.4f})")
    print(f"peak RSS {peak_rss_gb():.2f} GB (features alone {rss0:.2f} GB before)")
    print(f"dense method: one (q+g)^2 float32 matrix = {n * n * 4 / 1e9:.1f} GB (the public code keeps several)")


if __name__ == "__main__":
    main()
