"""Load test of `lookalike serve`: concurrent image searches from a second process on loopback.

Builds a collection of ``--items`` (default 100,000) entries: the scikit-image sample gallery,
embedded with the default model, plus synthetic rows (noisy copies of those features, so the
index has the real dimension and model id). Starts `lookalike serve` in a subprocess, then runs
``--clients`` threads here, each posting ``--searches`` uploads of the sample query photos to
``POST /search`` (k 10), after ``--warmup`` untimed ones (the client's connection and the server's
first calls; then all clients start the timed searches together). Prints errors, p50/p99 latency and searches/s, and, as the baseline
measured in the same run, the same search done in-process (embed + faiss, no HTTP) one at a time.

``--old-rev REV`` also serves the same collection with the code of an earlier git revision (a
detached worktree on ``PYTHONPATH``) under the same load, before the current code: old and new side
by side in one run. ``--model`` chooses the embedding model of the collection (default: the
library's default), ``--factory`` its faiss index (default Flat; e.g. ``IVF1024,Flat`` with
``--nprobe``: a collection folder per factory in the work folder, and the share of the Flat top-10
it finds is printed).

    python benchmarks/serve_load.py --items 100000 --clients 8 --searches 500
    python benchmarks/serve_load.py --model lite0 --old-rev 82f14ab --searches 100
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_collection(work: Path, items: int, model: str | None = None, factory: str = "Flat",
                     nprobe: int | None = None) -> Path:
    from lookalike.api import build_index
    from lookalike.index import IndexConfig
    from lookalike.extract import extract
    from lookalike.postprocess import l2n
    from lookalike.sample import make_sample
    from lookalike.store import read_store, write_store

    out = work / ("col" if factory == "Flat" else "col-" + "".join(c if c.isalnum() else "_" for c in factory))
    if (out / "manifest.json").exists():
        return out
    if (work / "all.h5").exists():
        build_index(work / "all.h5", out, IndexConfig(factory=factory, nprobe=nprobe), image_root=str(work / "sample" / "gallery"))
        return out
    make_sample(work / "sample", variants=3)
    res = extract(work / "sample" / "gallery", work / "real.h5", **({"model": tuple(model.split("+")) if "+" in model
                                                                        else model} if model else {}))
    real = read_store(work / "real.h5")
    rng = np.random.default_rng(0)
    n_syn = max(0, items - len(real.names))
    base = real.features[rng.integers(0, len(real.names), n_syn)]
    syn = l2n(base + 0.08 * rng.normal(size=base.shape).astype(np.float32))
    names = real.names + [f"synthetic/{i:07d}.jpg" for i in range(n_syn)]
    write_store(work / "all.h5", names, np.vstack([real.features, syn]).astype(np.float32), real.attrs)
    build_index(work / "all.h5", out, IndexConfig(factory=factory, nprobe=nprobe), image_root=str(work / "sample" / "gallery"))
    del res
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--searches", type=int, default=500, help="per client")
    ap.add_argument("--warmup", type=int, default=1, help="untimed searches per client first (connection, first calls)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--model", default=None, help="embedding model (default: the library's); A+B: an ensemble")
    ap.add_argument("--old-rev", default=None, help="also serve with the code of this git revision, same run")
    ap.add_argument("--factory", default="Flat", help="faiss index of the collection (default Flat)")
    ap.add_argument("--nprobe", type=int, default=None, help="IVF lists visited (with an IVF --factory)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="serve-load-"))
    t0 = time.perf_counter()
    col = build_collection(work, args.items, args.model, args.factory, args.nprobe)
    print(f"collection: {args.items} items, {args.factory}, ready in {time.perf_counter() - t0:.0f} s ({col})", flush=True)
    if args.factory != "Flat":
        print(f"share of the Flat top-10 found: {flat_overlap(work, col):.3f}", flush=True)
    queries = [p.read_bytes() for p in sorted((work / "sample" / "queries").glob("*.jpg"))]

    # baseline: the same work in-process, one search at a time
    from lookalike.serve import SearchService, ServeConfig, decode_upload

    svc = SearchService(col, ServeConfig())
    svc.search(decode_upload(queries[0], 10 ** 8), 10)
    t0 = time.perf_counter()
    n_base = 40
    for i in range(n_base):
        svc.search(decode_upload(queries[i % len(queries)], 10 ** 8), 10)
    base_rate = n_base / (time.perf_counter() - t0)
    svc.close()  # the server below needs the folder
    print(f"baseline in-process (no HTTP, sequential): {base_rate:.1f} searches/s", flush=True)

    servers = []
    if args.old_rev:
        old_src = work / f"src-{args.old_rev}"
        if not old_src.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_src), args.old_rev], check=True,
                           capture_output=True)
        servers.append((f"code of {args.old_rev}", old_src / "src"))
    servers.append(("current code", ROOT / "src"))
    for label, src in servers:
        rate = load(args, col, queries, label, src, work)
        print(f"  = {rate / base_rate:.2f}x the in-process sequential baseline ({label})", flush=True)


def flat_overlap(work: Path, col: Path) -> float:
    """Share of the exact (Flat) top-10 that ``col`` returns for the sample queries."""
    from lookalike.collection import Collection
    from lookalike.extract import Extractor
    from lookalike.serve import decode_upload

    approx = Collection.open(col)
    exact = Collection.open(build_collection(work, 0))
    imgs = [decode_upload(p.read_bytes(), 10 ** 8) for p in sorted((work / "sample" / "queries").glob("*.jpg"))]
    feats = Extractor(approx.extract_config()).embed_images(imgs)
    a, b = approx.search(feats, 10)[1], exact.search(feats, 10)[1]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a.tolist(), b.tolist())]))


def load(args, col: Path, queries: list[bytes], label: str, src: Path, work: Path) -> float:
    """Serve ``col`` with the package under ``src`` and run the clients; prints and returns searches/s."""
    import httpx

    log = open(work / "server.log", "a")
    env = {**os.environ, "PYTHONPATH": str(src)}
    server = subprocess.Popen([sys.executable, "-m", "lookalike.cli", "serve", str(col), "--port", str(args.port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        stats = httpx.get(url + "/stats").json()
        print(f"server ({label}): {stats['items']} items, {stats['dim']}-d, {stats['factory']}", flush=True)
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        ready = threading.Barrier(args.clients + 1)

        def client(c: int):
            with httpx.Client(timeout=120) as http:
                for j in range(args.warmup):  # connection, client and first-call paths: not timed
                    http.post(url + "/search", files={"file": ("q.jpg", queries[c % len(queries)], "image/jpeg")},
                              data={"k": "10"})
                ready.wait()
                for j in range(args.searches):
                    data = queries[(c * 7 + j) % len(queries)]
                    t = time.perf_counter()
                    try:
                        r = http.post(url + "/search", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "10"})
                        ok = r.status_code == 200 and len(r.json()["results"]) == 10
                        err = None if ok else f"{r.status_code} {r.text[:80]}"
                    except httpx.HTTPError as e:
                        err = f"{type(e).__name__}: {e}"
                    with lock:
                        (errors.append(err) if err else lat.append(time.perf_counter() - t))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        ready.wait()  # every client connected and warmed up: the timed searches start together
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    total = args.clients * args.searches
    lat_ms = sorted(1000 * x for x in lat)
    p = lambda q: lat_ms[min(len(lat_ms) - 1, int(q * len(lat_ms)))] if lat_ms else float("nan")  # noqa: E731
    rate = len(lat) / wall
    print(f"load ({label}): {args.clients} clients x {args.searches} searches = {total}; errors {len(errors)}; "
          f"p50 {p(0.50):.0f} ms, p90 {p(0.90):.0f} ms, p99 {p(0.99):.0f} ms, max {lat_ms[-1] if lat_ms else float('nan'):.0f} ms; "
          f"{rate:.1f} searches/s (mean {statistics.mean(lat_ms) if lat_ms else float('nan'):.0f} ms)", flush=True)
    if errors:
        print("first errors:", errors[:5])
    return rate


if __name__ == "__main__":
    main()
