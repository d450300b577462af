"""Flat inner-product search: faiss's ``IndexFlatIP.search`` against ``flatscan.FlatScan``
(onnxruntime Gemm + TopK over the same index memory), same index, same queries, same run.

For each batch size the two alternate (``--rounds`` each, the median kept) and the script prints
milliseconds, the ratio faiss / scan, the share of queries whose top-``k`` rows are identical, and
the largest score difference. Vectors: ``--n`` random unit rows of ``--dim`` (or ``--index`` a
collection's ``index.faiss``), queries are gallery rows plus noise.

    python benchmarks/flat_scan.py                       # 100,000 x 1,263, batches 1 .. 1,024
    python benchmarks/flat_scan.py --index /tmp/col/index.faiss --batches 1,8,64
"""
from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np

from lookalike.flatscan import FlatScan


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1263)
    ap.add_argument("--index", default=None, help="a Flat inner-product index.faiss instead of random rows")
    ap.add_argument("--batches", default="1,8,16,32,64,256,1024")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    if args.index:
        index = faiss.read_index(args.index)
    else:
        x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(args.dim)
        index.add(x)
        del x
    n, d = index.ntotal, index.d
    scan = FlatScan()
    print(f"{n:,} x {d} Flat IP, k {args.k}, faiss threads {faiss.omp_get_max_threads()}, "
          f"faiss {faiss.__version__}", flush=True)
    print(f"{'batch':>6} {'faiss ms':>9} {'scan ms':>8} {'faiss/scan':>10} {'same top-k':>10} {'max |ds|':>9}")
    for b in (int(v) for v in args.batches.split(",")):
        rows = rng.integers(0, n, b)
        q = index.reconstruct_batch(rows) + 0.05 * rng.standard_normal((b, d)).astype(np.float32)
        q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
        index.search(q, args.k), scan.search(index, q, args.k)  # warm
        tf, ts = [], []
        for _ in range(args.rounds):
            t = time.perf_counter(); fs, fi = index.search(q, args.k); tf.append(time.perf_counter() - t)
            t = time.perf_counter(); ss, si = scan.search(index, q, args.k); ts.append(time.perf_counter() - t)
        mf, ms = 1e3 * statistics.median(tf), 1e3 * statistics.median(ts)
        same = float(np.mean([(fi[i] == si[i]).all() for i in range(b)]))
        print(f"{b:>6} {mf:>9.1f} {ms:>8.1f} {mf / ms:>9.2f}x {100 * same:>9.1f}% {np.abs(fs - ss).max():>9.1e}",
              flush=True)


if __name__ == "__main__":
    main()
