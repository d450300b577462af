"""Index types at a million vectors: recall@10 against exact search, queries/s, build time, memory.

1M synthetic 256-d vectors drawn around 20,000 centres (like product classes), L2-normalised;
5,000 queries from the same distribution. Every index is built through lookalike (`build_index`
from a feature store on disk, faiss factory strings, `nprobe`/`efSearch` via `set_search_params`),
including the sharded build whose inverted lists are merged on disk and memory-mapped. Speed is
reported as a ratio against exact search (IndexFlatIP) measured in the same run, all queries in one
batch (faiss spreads them over the cores).

    python benchmarks/index_scale.py [--n 1000000] [--dim 256] [--queries 5000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = [  # (factory, extra build settings, search settings to sweep)
    ("IVF4096,Flat", {}, [dict(nprobe=p) for p in (4, 8, 16, 32, 64)]),
    ("IVF4096,Flat", {"shard_size": 250_000}, [dict(nprobe=p) for p in (16, 32)]),
    ("IVF4096,PQ32", {}, [dict(nprobe=p) for p in (16, 64)]),
    ("IVF4096,SQ8", {}, [dict(nprobe=p) for p in (16, 32)]),
    ("HNSW32,Flat", {}, [dict(ef_search=e) for e in (16, 32, 64, 128)]),
]


def make_data(n: int, d: int, nq: int, centres: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d)).astype(np.float32)
    def draw(m):
        x = c[rng.integers(0, centres, m)] + 0.6 * rng.normal(size=(m, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    xb = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        xb[s : s + 100_000] = draw(min(100_000, n - s))
    return xb, draw(nq).astype(np.float32)


def index_bytes(col, path: Path | None) -> int:
    import faiss

    if path is not None and (path / "index.ivfdata").exists():
        return os.path.getsize(path / "index.faiss") + os.path.getsize(path / "index.ivfdata")
    return int(faiss.serialize_index(col.index).size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=5_000)
    ap.add_argument("--centres", type=int, default=20_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--only", default=None, help="comma list of factories to run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import faiss

    from lookalike.index import IndexConfig, build_index
    from lookalike.store import write_store

    work = Path(args.workdir or tempfile.mkdtemp(prefix="index-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    xb, xq = make_data(args.n, args.dim, args.queries, args.centres)
    store = work / "gallery.h5"
    if not store.exists():
        write_store(store, [f"{i:08d}" for i in range(args.n)], xb, {"model_id": "synthetic", "fingerprint": "synthetic"})
    print(f"{args.n} x {args.dim}-d gallery, {args.queries} queries, {args.centres} centres; data {time.perf_counter() - t0:.0f} s; "
          f"{faiss.omp_get_max_threads()} faiss threads", flush=True)

    k = 10
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(xb)
    t0 = time.perf_counter()
    _, truth = flat.search(xq, k)
    exact_s = time.perf_counter() - t0
    exact_qps = args.queries / exact_s
    del flat
    print(f"exact (Flat): {exact_qps:.0f} queries/s, memory {args.n * args.dim * 4 / 1e6:.0f} MB "
          f"({args.dim * 4} B/vector)", flush=True)
    rows = [dict(index="Flat (exact)", build_s=0.0, mb=args.n * args.dim * 4 / 1e6, bytes_per_vector=args.dim * 4,
                 params="", recall10=1.0, qps=exact_qps, speedup=1.0)]
    del xb
    only = set(args.only.split(",")) if args.only else None
    for factory, extra, sweeps in CONFIGS:
        if only and factory not in only:
            continue
        name = factory + (" sharded on disk" if extra.get("shard_size") else "")
        out = work / ("idx-" + name.replace(",", "_").replace(" ", "_"))
        t0 = time.perf_counter()
        col = build_index(store, out if extra.get("shard_size") else None,
                          IndexConfig(factory=factory, train_size=min(args.n, 200_000), **extra))
        build_s = time.perf_counter() - t0
        size = index_bytes(col, out if extra.get("shard_size") else None)
        for params in sweeps:
            col.set_search_params(**params)
            col.search(xq[:100], k)  # warm (pages of an on-disk index, threads)
            t0 = time.perf_counter()
            _, ids = col.search(xq, k)
            secs = time.perf_counter() - t0
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))
            row = dict(index=name, build_s=round(build_s, 1), mb=round(size / 1e6, 1), bytes_per_vector=round(size / args.n, 1),
                       params=",".join(f"{a}={b}" for a, b in params.items()), recall10=round(recall, 4),
                       qps=round(args.queries / secs, 1), speedup=round(exact_s / secs, 1))
            rows.append(row)
            print(f"{name:28s} build {build_s:6.0f} s  {size / 1e6:7.0f} MB ({size / args.n:6.1f} B/vec)  "
                  f"{row['params']:12s} recall@10 {recall:.4f}  {row['qps']:8.0f} q/s  {row['speedup']:6.1f}x exact", flush=True)
        del col
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "exact_qps": exact_qps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
