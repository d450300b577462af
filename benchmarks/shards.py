"""Searching a collection split in 2 shards through Ray Serve, against the single collection, in one run.

Random L2-normalised vectors (default 200,000 x 512) in a Flat collection built through lookalike,
split with ``lookalike.cluster.split_collection`` into 2 shards. The same query batches go, in turn
(interleaved, order rotated: the machine is shared), to:

  - ``single``      the collection in this process (``Collection.search``, faiss on 2 threads);
  - ``IndexShards`` the same two halves in a ``faiss.IndexShards`` in this process (a thread per shard,
                    1 faiss thread each, faiss's merge): sharding with no transport, one machine only;
  - ``serve``       ``search_shards`` through the Serve application on a local Ray cluster (a replica
                    per shard, 1 CPU and 1 faiss thread each, a router at 0 CPU);
  - ``faiss rpc``   faiss's own remote option, ``faiss.contrib.client_server``: a server process per
                    shard (faiss's ``rpc.Server`` over the shard's Flat index: its ``SearchServer``
                    wants an IVF), a ``ClientIndex`` that fans out on threads and merges with
                    ``faiss.ResultHeap``
                    (row numbers are per shard there: measured for speed only). Its restricted
                    unpickler allows ``numpy.core.multiarray`` but numpy 2 pickles arrays as
                    ``numpy._core.multiarray``: as shipped, a search hangs (the server's thread dies);
                    this script widens the allowed list in its own processes to measure it.

Printed per batch size: queries/s and p50/p99 latency per batch, ratios against ``single``, and the
fan-out cost measured on a tiny shard set (1,000 rows, where search itself costs nothing). The served
answers are checked against the single collection's (names and scores equal).

    python benchmarks/shards.py [--n 200000] [--dim 512] [--k 10] [--batches 1,16,256]
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, batches):
    """Per-batch latencies (s) of ``fn(batch)`` after one warm-up call."""
    fn(batches[0])
    out = []
    for b in batches:
        t = time.perf_counter()
        fn(b)
        out.append(time.perf_counter() - t)
    return np.array(out)


def stats(lat, batch):
    return dict(qps=batch * len(lat) / lat.sum(), p50=np.percentile(lat, 50) * 1e3, p99=np.percentile(lat, 99) * 1e3)


def allow_numpy2_in_faiss_rpc() -> None:
    from faiss.contrib import rpc

    rpc.safe_modules.add("numpy._core.multiarray")


def rpc_server(folder: str, port: int) -> None:
    """One shard behind faiss's RPC server (run in a subprocess of this script). faiss's
    ``SearchServer`` wants an IVF; this is the same server over the shard's Flat index."""
    import faiss
    from faiss.contrib import rpc

    from lookalike.collection import Collection

    allow_numpy2_in_faiss_rpc()
    faiss.omp_set_num_threads(1)
    index = Collection.open(folder).index

    class FlatServer(rpc.Server):
        def get_ntotal(self) -> int:
            return index.ntotal

        def search(self, x, k):
            return index.search(x, k)

    rpc.run_server(lambda s: FlatServer(s), port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rpc_client(ports, timeout=300):
    from faiss.contrib.client_server import ClientIndex

    allow_numpy2_in_faiss_rpc()
    t = time.time()
    while True:
        try:
            return ClientIndex([("127.0.0.1", p) for p in ports])
        except OSError:
            if time.time() - t > timeout:
                raise
            time.sleep(0.5)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--rpc-server":
        return rpc_server(sys.argv[2], int(sys.argv[3]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batches", default="1,16,256", help="query batch sizes")
    ap.add_argument("--queries", type=int, default=2048, help="queries per batch size (at most 200 batches)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one faiss thread per shard (threads, processes, replicas)
    # idle OpenMP threads sleep at once instead of spinning: the methods take turns on the same cores
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import faiss
    import ray

    from lookalike.cluster import (ShardSearcher, merge_answers, read_shard_set, search_shards, serve_shards,
                                   split_collection, stop_shards)
    from lookalike.collection import Collection
    from lookalike.index import IndexConfig, build_index
    from lookalike.store import write_store

    rng = np.random.default_rng(0)
    xb = rng.normal(size=(args.n, args.dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.integers(0, args.n, args.queries)] + 0.1 * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lookalike-shards-"))
    attrs = {"model_id": "bench", "fingerprint": "bench"}
    t = time.perf_counter()
    write_store(work / "g.h5", [f"{i:07d}.jpg" for i in range(args.n)], xb, attrs)
    build_index(work / "g.h5", work / "flat", IndexConfig(whiten=False))
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    split_collection(work / "flat", work / "flat-2", shards=2)
    t_split = time.perf_counter() - t
    write_store(work / "tiny.h5", [f"{i:07d}.jpg" for i in range(1000)], xb[:1000], attrs)
    build_index(work / "tiny.h5", work / "tiny", IndexConfig(whiten=False))
    split_collection(work / "tiny", work / "tiny-2", shards=2)
    print(f"{args.n:,} x {args.dim} Flat, k={args.k}; build {t_build:.1f}s, split in 2 {t_split:.1f}s "
          f"({args.n * args.dim * 4 / 2**20:.0f} MiB of vectors, {args.n * args.dim * 2 / 2**20:.0f} MiB per shard)")

    single = Collection.open(work / "flat")
    half = (args.n // 2048) * 1024 or args.n // 2  # where split_collection cuts (a 1024-row block boundary)
    shards = faiss.IndexShards(args.dim, True, True)  # threaded (1 faiss thread each: OMP_NUM_THREADS=1), successive ids
    parts = [faiss.IndexFlatIP(args.dim) for _ in range(2)]
    parts[0].add(xb[:half])
    parts[1].add(xb[half:])
    for p in parts:
        shards.add_shard(p)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    handle = serve_shards(work / "flat-2", name="bench", cpus_per_shard=1, threads=1)
    ports = [free_port() for _ in range(2)]
    servers = [subprocess.Popen([sys.executable, __file__, "--rpc-server", str(f), str(p)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for f, p in zip(read_shard_set(work / "flat-2")["folders"], ports)]

    def run_single(b):
        faiss.omp_set_num_threads(2)  # the whole machine (this thread's count; others keep OMP_NUM_THREADS=1)
        return single.search(b, args.k)

    methods = {"single": run_single, "IndexShards": lambda b: shards.search(b, args.k),
               "serve": lambda b: search_shards(handle, b, args.k)}
    try:
        client = rpc_client(ports)
        methods["faiss rpc"] = lambda b: client.search(b, args.k)
        sizes = [int(b) for b in args.batches.split(",")]
        rows = []
        for bs in sizes:
            batches = [xq[i * bs : (i + 1) * bs] for i in range(min(200, args.queries // bs))]
            # the served answer is the single collection's (faiss at 1 thread, as the replicas: with fewer
            # queries than threads its scores move by an ulp with the thread count)
            faiss.omp_set_num_threads(1)
            s1, r1 = single.search(batches[0], args.k)
            s2, names = search_shards(handle, batches[0], args.k)
            assert np.array_equal(s1, s2) and names == [[single.names[r] for r in row] for row in r1], "served != single"
            lat = {m: [] for m in methods}
            for fn in methods.values():
                fn(batches[0])  # warm-up
            for j, b in enumerate(batches):  # interleaved, order rotated: the machine is shared
                order = list(methods)[j % len(methods):] + list(methods)[: j % len(methods)]
                for m in order:
                    t = time.perf_counter()
                    methods[m](b)
                    lat[m].append(time.perf_counter() - t)
            rows.append((bs, len(batches), {m: stats(np.array(v), bs) for m, v in lat.items()}))
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait()
    stop_shards("bench")

    print(f"\nqueries/s, p50 / p99 ms per batch, ratio = queries/s against single ({len(methods)} methods interleaved)")
    print(f"{'batch':>5} {'n':>4} | " + " | ".join(f"{m:^31}" for m in methods))
    for bs, nb, st in rows:
        cells = [f"{st[m]['qps']:>7.0f} q/s {st[m]['p50']:>6.1f}/{st[m]['p99']:>6.1f} "
                 f"{st[m]['qps'] / st['single']['qps']:>4.2f}x" for m in methods]
        print(f"{bs:>5} {nb:>4} | " + " | ".join(cells))

    # the fan-out's own cost: a tiny shard set, where the search itself is ~free
    tiny = serve_shards(work / "tiny-2", name="tiny", cpus_per_shard=1, threads=1)
    local = [ShardSearcher(f, threads=1) for f in read_shard_set(work / "tiny-2")["folders"]]
    print("\nfan-out cost (1,000-row shard set, k=10, interleaved): p50 / p99 ms per batch")
    for bs in sizes:
        batches = [xq[i * bs : (i + 1) * bs] for i in range(min(200, args.queries // bs))]
        pair = {"in-process": lambda b: merge_answers([s.search(b, 10) for s in local], 10),
                "serve": lambda b: search_shards(tiny, b, 10)}
        lat = {m: [] for m in pair}
        for fn in pair.values():
            fn(batches[0])
        for b in batches:
            for m, fn in pair.items():
                t = time.perf_counter()
                fn(b)
                lat[m].append(time.perf_counter() - t)
        a, c = (stats(np.array(lat[m]), bs) for m in pair)
        print(f"  batch {bs:>4}: same shards and merge in-process {a['p50']:6.2f} / {a['p99']:6.2f}   "
              f"through Serve {c['p50']:6.2f} / {c['p99']:6.2f}")
    empty = timed(lambda _: tiny.describe.remote().result(), list(range(200)))
    print(f"  router round trip with no fan-out: p50 {np.percentile(empty, 50) * 1e3:.2f} ms, "
          f"p99 {np.percentile(empty, 99) * 1e3:.2f} ms")
    stop_shards("tiny")
    ray.shutdown()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
