"""Spatial verification on top of what `lookalike run` does by default (Lite0 ⊕ SSCD 1:1, whitening
fitted on the gallery), on both dev protocols: books (all 101 queries) and grocery (every 5th query).

    python benchmarks/spatial_default.py --features /work/bench-feats/2fa5ac6a2dde4afa.h5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from protocols import protocols  # noqa: E402

from lookalike.metrics import retrieval_metrics  # noqa: E402
from lookalike.postprocess import PCAWhitening, knn  # noqa: E402
from lookalike.spatial import SpatialConfig, spatial_rerank  # noqa: E402
from lookalike.store import read_store  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True, help="store of the default ensemble over all images (benchmarks/defaults.py)")
    ap.add_argument("--cache", default="bench-out/spatial-default-cache")
    ap.add_argument("--grocery-every", type=int, default=5)
    args = ap.parse_args()
    import cv2

    cv2.setNumThreads(1)
    store = read_store(args.features)
    pos = {n: i for i, n in enumerate(store.names)}
    for p in protocols():
        g = store.features[[pos[n] for n in p.gallery]]
        q = store.features[[pos[n] for n in p.queries]]
        w = PCAWhitening().fit(g)
        g, q = w.transform(g), w.transform(q)
        sel = np.arange(0, len(q), 1 if p.name == "books" else args.grocery_every)
        s, ids = knn(q[sel], g, 20)
        t0 = time.perf_counter()
        _, ids2, _ = spatial_rerank([p.queries[i] for i in sel], p.gallery, s, ids, SpatialConfig(), cache_dir=args.cache)
        ql = p.query_labels[sel]
        n_rel = np.array([(p.gallery_labels == lab).sum() for lab in ql])

        def score(ii):
            return retrieval_metrics(p.gallery_labels[ii[:, :10]] == ql[:, None], n_rel, 10)[0]["digix_score"]

        print(f"{p.name}: {len(sel)} queries, default features without spatial {score(ids):.4f}, with the spatial "
              f"defaults {score(ids2):.4f} ({time.perf_counter() - t0:.0f} s incl. local features)", flush=True)


if __name__ == "__main__":
    main()
