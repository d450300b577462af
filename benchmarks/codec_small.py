"""The default codec (``opq``) on small fitting sets: the full OPQ rotation (before) against the
small-set rule (:func:`lookalike.codec.opq_latent_dim`, now), side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/codec_small.py \\
        --default-features /work/bench-feats/2fa5ac6a2dde4afa.h5 \\
        --lite0-features /work/bench-feats/cd9ef7db78afcdd9.h5 --json bench-out/codec_small.json

Sets (each codec fitted without labels; both queries and gallery decoded, as in NAIC):
- ``gallery``: the default features (Lite0 + SSCD, 1,792-d) of the grocery protocol, the codec fitted
  on the 3,017 gallery photos themselves (what a user has);
- ``train``: the BENCHMARKS.md "Feature coding at fixed byte budgets" zero-shot set: Lite0 SPoC
  (1,280-d), fitted on the 2,640 ``train`` photos, scored on the grocery protocol;
- ``books``: the default features of the books protocol (instance level, 101 queries), fitted on its
  5,603-photo gallery (101 covers + the grocery photos as distractors).
Score = DIGIX score (0.5 top-1 + 0.5 mAP@10); in brackets its share of the float32 score. "before"
is ``Codec(method="opq", latent_dim=d)`` (the full rotation every opq codec used before the rule);
"now" is ``Codec(method="opq")``. When the rule keeps the full rotation, the two are the same fit
(same code path, same seed) and it is fitted once.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

import protocols
from lookalike.codec import Codec, opq_latent_dim
from lookalike.postprocess import knn, l2n
from lookalike.store import read_store


def _rows(store, names):
    pos = {n: i for i, n in enumerate(store.names)}
    return store.features[[pos[n] for n in names]]


def load_sets(args, wanted):
    out = {}
    if {"gallery", "books"} & set(wanted):
        st = read_store(args.default_features)
        for proto in (protocols.grocery(Path(args.data)), protocols.books(Path(args.data))):
            name = "gallery" if proto.name == "grocery" else "books"
            if name in wanted:
                q, g = protocols.features_for(st.names, st.features, proto)
                out[name] = (g, q, g, proto)
    if "train" in wanted:
        st = read_store(args.lite0_features)
        proto = protocols.grocery(Path(args.data))
        root = Path(args.data) / "grocery_store"
        with open(root / "labels.csv", newline="") as f:
            train = [str((root / r["path"]).resolve()) for r in csv.DictReader(f) if r["split"] == "train"]
        q, g = protocols.features_for(st.names, st.features, proto)
        out["train"] = (_rows(st, train), q, g, proto)
    return {k: out[k] for k in wanted if k in out}


def run(fit, q, g, proto, nbytes, latent_dim):
    t0 = time.perf_counter()
    c = Codec(nbytes=nbytes, method="opq", latent_dim=latent_dim).fit(fit)
    fit_s = time.perf_counter() - t0
    qd, gd = c.decode(c.encode(q)), c.decode(c.encode(g))
    _, ids = knn(l2n(qd), l2n(gd), 10)
    s = proto.score(ids)
    both, rec = np.concatenate([q, g]), np.concatenate([qd, gd])
    err = float((((both - rec) ** 2).sum(1) / (both ** 2).sum(1)).mean())
    return {"digix_score": s["digix_score"], "top1": s["top1"], "mAP@10": s["mAP@10"], "latent_dim": int(c.latent_dim_),
            "relative_squared_error": err, "fit_s": fit_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(protocols.DATA))
    ap.add_argument("--default-features", default="/work/bench-feats/2fa5ac6a2dde4afa.h5",
                    help="store of every protocol image with the default model (Lite0 + SSCD)")
    ap.add_argument("--lite0-features", default="/work/bench-feats/cd9ef7db78afcdd9.h5",
                    help="store of every grocery photo with Lite0 SPoC 224 (the BENCHMARKS.md codec set)")
    ap.add_argument("--sets", default="gallery,train,books")
    ap.add_argument("--budgets", default="16,32,64,128,256")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    out = {}
    for name, (fit, q, g, proto) in load_sets(args, args.sets.split(",")).items():
        _, ids = knn(l2n(q), l2n(g), 10)
        base = proto.score(ids)["digix_score"]
        n, d = fit.shape
        out[name] = {"float32": base, "fit_count": n, "dim": d}
        rows = []
        for b in budgets:
            full = -(-d // b) * b
            old = run(fit, q, g, proto, b, full)
            new = old if opq_latent_dim(n, d, b) >= full else run(fit, q, g, proto, b, None)
            out[name][str(b)] = {"before": old, "now": new}
            rows.append((b, old, new))
            print(f"{name} {b} B: before {old['digix_score']:.4f} (latent {old['latent_dim']}, {old['fit_s']:.0f} s), "
                  f"now {new['digix_score']:.4f} (latent {new['latent_dim']}, {new['fit_s']:.0f} s)", flush=True)
        print(f"\n**{name}**: fitted on {n} vectors, {d}-d; {len(q)} queries, {len(g)} gallery; float32 score {base:.4f}\n")
        print("| bytes | before: opq, full rotation | now: opq default (latent) | now − before | fit s before / now |")
        print("|---|---|---|---|---|")
        for b, old, new in rows:
            same = " (same fit)" if new is old else ""
            cell = lambda r: f"{r['digix_score']:.4f} ({100 * r['digix_score'] / base:.1f} %, err {r['relative_squared_error']:.3f})"  # noqa: E731
            print(f"| {b} | {cell(old)} | {cell(new)} {new['latent_dim']}{same} | "
                  f"{100 * (new['digix_score'] - old['digix_score']) / base:+.1f} | {old['fit_s']:.0f} / {new['fit_s']:.0f} |")
        print(flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
