"""k-reciprocal re-ranking at DIGIX test-B size: today's code against an earlier revision, one run.

On the synthetic test-B set of ``benchmarks/digix_b.py`` (41,574 + 95,120 clustered 512-d rows at
``--scale 1``), times three things in this order, each with its peak resident memory:

1. ``floor``: the exact k=31 k-NN graph of all rows (``numeric.knn``), which k-reciprocal needs
   first and no implementation can skip;
2. ``old``: ``k_reciprocal_rerank`` as it is in ``--old-rev`` (read with ``git show``, loaded as a
   module beside the installed package);
3. ``new``: ``k_reciprocal_rerank`` of the working tree.

Prints each time as a ratio of the floor, the share of queries whose top-10 is identical, the
largest score difference, and the DIGIX score of plain search, old and new.

    python benchmarks/kr_speed.py                    # full test-B size
    python benchmarks/kr_speed.py --scale 0.25 --old-rev 9f0cfe0
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digix_b import GALLERY, QUERIES, Peak, synthetic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def old_postprocess(rev: str):
    """``lookalike.postprocess`` as it was at ``rev``, as a separate module (its own registry)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:src/lookalike/postprocess.py"],
                         capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType("lookalike._postprocess_old")
    mod.__package__ = "lookalike"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:postprocess.py", "exec"), mod.__dict__)
    return mod


def score(ids, lq, lg):
    from lookalike.metrics import retrieval_metrics

    n_rel = np.bincount(lg, minlength=max(lq.max(), lg.max()) + 1)[lq]
    return retrieval_metrics(lg[ids[:, :10]] == lq[:, None], n_rel, 10)[0]["digix_score"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--old-rev", default="9f0cfe0", help="git revision of the earlier implementation")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--noise", type=float, default=2.5)
    args = ap.parse_args()
    from lookalike.numeric import knn
    from lookalike.postprocess import k_reciprocal_rerank

    old = old_postprocess(args.old_rev)
    n_q, n_g = round(QUERIES * args.scale), round(GALLERY * args.scale)
    q, g, lq, lg = synthetic(n_q, n_g, args.dim, args.classes, args.noise)
    print(f"{n_q} queries + {n_g} gallery, {args.dim}-d; k1 20, k2 6, lambda 0.3; old = {args.old_rev}", flush=True)
    x = np.concatenate([q, g])
    with Peak() as floor:
        knn(x, x, 32)
    del x
    print(f"floor  {floor.seconds:7.1f} s  peak {floor.peak:5.2f} GB", flush=True)
    out = {}
    for name, fn in (("old", old.k_reciprocal_rerank), ("new", k_reciprocal_rerank)):
        with Peak() as p:
            out[name] = fn(q, g, 10)
        print(f"{name:<5s}  {p.seconds:7.1f} s  peak {p.peak:5.2f} GB  = {p.seconds / floor.seconds:.2f}x floor",
              flush=True)
    (so, io), (sn, i_new) = out["old"], out["new"]
    _, plain = knn(q, g, 10)
    print(f"identical top-10: {(io == i_new).all(1).mean():.4f} of queries; largest score difference "
          f"{np.abs(so - sn).max():.2e}")
    print(f"DIGIX score: plain {score(plain, lq, lg):.4f}, old {score(io, lq, lg):.4f}, new {score(i_new, lq, lg):.4f}")


if __name__ == "__main__":
    main()
