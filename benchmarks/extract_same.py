"""Do two versions of the extraction code give the same features? Quality on both dev protocols.

For a change to decoding or preprocessing that should not change what is found (a faster decoder, a
faster resize): every photo of both protocols (``protocols.all_images``, 5,704) is extracted twice
in one run, with the code of ``--old-rev`` (a detached git worktree on ``PYTHONPATH``) and with the
current code, each in its own subprocess. Printed per model: the cosine between each photo's old and
new feature (mean and worst), how many queries keep the same top-10, and the plain-search score
(0.5 · top-1 + 0.5 · mAP@10, exact cosine search) of each version on books and grocery.

    python benchmarks/extract_same.py --old-rev f85a1ac --models lite0,sscd-mobile,lite0+sscd
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oldcode import ROOT, old_source  # noqa: E402
from protocols import features_for, protocols, write_listing  # noqa: E402

CHILD = """
import sys
from lookalike import Extractor
m = sys.argv[1]
Extractor(model=tuple(m.split("+")) if "+" in m else m).extract(sys.argv[2], sys.argv[3], progress=False)
"""


def extract(src: Path, model: str, listing: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, model, str(listing), str(out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(src)})
    return time.perf_counter() - t0


def top10(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    s = q @ g.T
    return np.argsort(-s, axis=1, kind="stable")[:, :10]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-rev", required=True)
    ap.add_argument("--models", default="lite0,sscd-mobile,lite0+sscd")
    args = ap.parse_args()
    from lookalike.store import read_store

    protos = protocols()
    print("| model | cos old/new mean | worst | books: same top-10 | books old → new | "
          "grocery: same top-10 | grocery old → new | wall s old / new (with start-up) |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp, old_source(args.old_rev) as old_src:
        tmp = Path(tmp)
        listing = write_listing(tmp / "all.txt")
        for model in args.models.split(","):
            secs, stores = [], []
            for label, src in (("old", old_src), ("new", ROOT / "src")):
                out = tmp / f"{model}-{label}.h5"
                secs.append(extract(src, model, listing, out))
                stores.append(read_store(out))
            old, new = stores
            if old.names != new.names:
                raise SystemExit(f"{model}: the two versions extracted different photos")
            cos = np.sum(old.features * new.features, axis=1)
            row = [model, f"{cos.mean():.5f}", f"{cos.min():.6f}"]
            for proto in protos:
                (qo, go), (qn, gn) = (features_for(s.names, s.features, proto) for s in (old, new))
                to, tn = top10(qo, go), top10(qn, gn)
                same = np.mean([set(a) == set(b) for a, b in zip(to, tn)])
                row += [f"{same:.1%}", f"{proto.score(to)['digix_score']:.4f} → {proto.score(tn)['digix_score']:.4f}"]
            row.append(f"{secs[0]:.0f} / {secs[1]:.0f}")
            print("| " + " | ".join(row) + " |", flush=True)

if __name__ == "__main__":
    main()
