"""The Ray engine against the local engine: images/s on the same files, same machine, same run.

Writes a list file of ``--n`` photos, extracts it with the local engine, then with ``--engine ray``
(a local Ray cluster: startup counted separately) for each actor count given, and checks that the
stores agree (names, order, max |Δ| of the features).

    python benchmarks/extract_ray.py --data ../shared/datasets/grocery_store --n 1024 --actors 1,2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder of JPEG photos (searched recursively)")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--actors", default="1,2", help="comma list of Ray actor counts to try")
    args = ap.parse_args()
    import ray

    from lookalike.extract import ExtractConfig, Extractor
    from lookalike.store import read_store

    paths = sorted(Path(args.data).rglob("*.jpg"))
    rng = np.random.default_rng(0)
    paths = [paths[i] for i in sorted(rng.choice(len(paths), min(args.n, len(paths)), replace=False))]
    work = Path(tempfile.mkdtemp(prefix="extract-ray-"))
    listing = work / "images.txt"
    listing.write_text("\n".join(str(p.resolve()) for p in paths) + "\n")
    Extractor(ExtractConfig()).runner  # export/cache the ONNX model outside the timings

    t0 = time.perf_counter()
    Extractor(ExtractConfig()).extract(listing, work / "local.h5", progress=False)
    local_s = time.perf_counter() - t0
    local_rate = len(paths) / local_s
    print(f"local engine: {len(paths)} images in {local_s:.1f} s = {local_rate:.1f} img/s", flush=True)
    ref = read_store(work / "local.h5")

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"ray.init (local cluster): {time.perf_counter() - t0:.1f} s", flush=True)
    for actors in [int(a) for a in args.actors.split(",")]:
        out = work / f"ray{actors}.h5"
        t0 = time.perf_counter()
        Extractor(ExtractConfig(engine="ray", ray_actors=actors)).extract(listing, out, progress=False)
        secs = time.perf_counter() - t0
        st = read_store(out)
        same = st.names == ref.names
        diff = float(np.abs(st.features - ref.features).max()) if same else float("nan")
        print(f"ray engine, {actors} actor(s): {secs:.1f} s = {len(paths) / secs:.1f} img/s = "
              f"{len(paths) / secs / local_rate:.2f}x local; same names and order: {same}; max |diff| {diff:.2e}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
