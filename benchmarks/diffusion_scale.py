"""Diffusion re-ranking at (a fraction of) DIGIX test-B size: the whole graph vs truncated diffusion
(each query on its top-K gallery subgraph), same run, same synthetic clustered 512-d features as
``benchmarks/digix_b.py``. Prints seconds, peak RSS, DIGIX score and top-10 agreement with the
whole-graph answer.

    python benchmarks/diffusion_scale.py --scale 0.25 --truncate 1000,2000,4000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from digix_b import GALLERY, QUERIES, Peak, synthetic  # noqa: E402

from lookalike.metrics import retrieval_metrics  # noqa: E402
from lookalike.postprocess import diffusion_rerank, gallery_graph  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--truncate", default="1000,2000,4000", help="comma list of K (0 = the whole graph)")
    ap.add_argument("--whole", action="store_true", help="also run the whole graph (long at full size)")
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=2.5)
    args = ap.parse_args()
    n_q, n_g = round(QUERIES * args.scale), round(GALLERY * args.scale)
    q, g, lq, lg = synthetic(n_q, n_g, 512, args.classes, args.noise)
    n_rel = np.bincount(lg, minlength=args.classes)[lq]
    print(f"{n_q} queries, {n_g} gallery, 512-d, {args.classes} classes, noise {args.noise}", flush=True)
    t0 = time.perf_counter()
    S = gallery_graph(g, 30, 3.0)
    print(f"graph (k=30, mutual): {time.perf_counter() - t0:.1f} s, {S.nnz} edges", flush=True)
    ref = None
    runs = ([0] if args.whole else []) + [int(x) for x in args.truncate.split(",") if x]
    for K in runs:
        with Peak() as p:
            _, ids = diffusion_rerank(q, g, 10, graph=S, truncate=K)
        m = retrieval_metrics(lg[ids] == lq[:, None], n_rel)[0]
        if K == 0:
            ref = ids
        agree = f"; top-10 equal to the whole graph's for {np.mean((ids == ref).all(1)):.1%} of queries, " \
                f"top-1 for {np.mean(ids[:, 0] == ref[:, 0]):.1%}" if ref is not None and K else ""
        print(f"{'whole graph' if K == 0 else f'truncated K={K}':<18s} {p.seconds:8.1f} s  peak {p.peak:5.2f} GB  "
              f"DIGIX {m['digix_score']:.4f} (top-1 {m['top1']:.4f}, mAP@10 {m['mAP@10']:.4f}){agree}", flush=True)


if __name__ == "__main__":
    main()
