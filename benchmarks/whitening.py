"""PCA-whitening defaults on both dev protocols (benchmarks/protocols.py), several feature sets.

Whitening is fitted on each protocol's gallery, as `lookalike index --whiten` does. Rows:
``none``; ``old default`` (all dims, no shrinkage: what `--whiten` did before the defaults were
chosen from the data); ``default`` (``PCAWhitening()``: dims and shrinkage chosen from the data);
``ridge x1`` (the default's dims with half its ridge, tr(C²)/tr(C): why the factor 2);
``Ledoit-Wolf`` (all dims, the Ledoit-Wolf shrinkage coefficient); explicit PCA-256 / PCA-512 with
shrinkage 0.1. Feature sets: each store alone and, when two are given, their concatenation as the
ensemble feature is built (each member L2-normalised, times its weight, concatenated, normalised).

Columns ``@N``: the gallery cut to N photos (books: the 101 covers kept, distractors drawn), mean
over ``--draws`` random draws, all queries kept. Score = 0.5 · top-1 + 0.5 · mAP@10.

    OMP_NUM_THREADS=1 python benchmarks/whitening.py --store lite0=/work/bench-feats/lite0-spoc-224.h5 \\
        --store sscd=/work/bench-feats/a76fc0a3ea16bfd9.h5 --weights 1:1,1:2,2:1 --json bench-out/whitening.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocols as P  # noqa: E402

from lookalike.postprocess import PCAWhitening, knn, l2n  # noqa: E402
from lookalike.store import read_store  # noqa: E402


def ledoit_wolf_shrinkage(x: np.ndarray) -> float:
    """Ledoit & Wolf (2004) shrinkage coefficient towards (tr S / d)·I, written out because
    scikit-learn (sklearn.covariance.ledoit_wolf_shrinkage computes the same) is not a dependency."""
    xc = np.asarray(x, np.float64) - np.mean(x, axis=0)
    n, d = xc.shape
    ev = np.clip(np.linalg.eigvalsh(xc.T @ xc / n), 0, None)  # eigenvalues of S (1/n convention)
    mu = ev.sum() / d
    delta = ((ev - mu) ** 2).sum() / d  # ||S - mu I||² / d
    beta = (((xc ** 2).sum(1) ** 2).sum() / n - (ev ** 2).sum()) / (d * n)  # mean ||x xᵀ - S||² / n / d
    return float(min(beta, delta) / delta) if delta > 0 else 0.0


def ridge_x1(g: np.ndarray, k: int) -> float:
    """The shrinkage that adds tr(C²)/tr(C) (half the default ridge) to the top-k eigenvalues."""
    xc = np.asarray(g, np.float64) - g.mean(0)
    ev = np.sort(np.clip(np.linalg.eigvalsh(xc.T @ xc / (len(g) - 1)), 1e-12, None))[::-1]
    r = (ev ** 2).sum() / ev.sum()
    return float(r / (r + ev[:k].mean()))


VARIANTS = ["none", "old default (all dims, s=0)", "default", "ridge x1", "Ledoit-Wolf (all dims)",
            "PCA-256, s=0.1", "PCA-512, s=0.1"]


def evaluate(proto: P.Protocol, q: np.ndarray, g: np.ndarray) -> tuple[dict, dict]:
    n, d = g.shape
    score = lambda a, b: proto.score(knn(a, b, 10)[1])["digix_score"]  # noqa: E731
    out = {"none": score(q, g)}
    chosen = {}
    for name in VARIANTS[1:]:
        if name.startswith("old"):
            w = PCAWhitening(min(n - 1, d), 0.5, 0.0)
        elif name == "default":
            w = PCAWhitening()
        elif name == "ridge x1":
            k = chosen["n_components_"]
            w = PCAWhitening(k, 0.5, ridge_x1(g, k))
        elif name.startswith("Ledoit"):
            w = PCAWhitening(min(n - 1, d), 0.5, ledoit_wolf_shrinkage(g))
        else:
            k = int(name.split(",")[0].split("-")[1])
            if k >= min(n, d):
                continue
            w = PCAWhitening(k, 0.5, 0.1)
        w.fit(g)
        if name == "default":
            chosen = {"n_components_": w.n_components_, "shrinkage_": round(w.shrinkage_, 4)}
        out[name] = score(w.transform(q), w.transform(g))
    return out, chosen


def sub(proto: P.Protocol, size: int, seed: int) -> P.Protocol:
    rng = np.random.default_rng(seed)
    gal, lab = np.array(proto.gallery), proto.gallery_labels
    keep = np.flatnonzero(np.char.startswith(lab.astype(str), "book_")) if proto.name == "books" else np.array([], int)
    rest = np.setdiff1d(np.arange(len(gal)), keep)
    idx = np.sort(np.concatenate([keep, rng.choice(rest, size - len(keep), replace=False)]))
    return P.Protocol(f"{proto.name}@{size}", proto.queries, list(gal[idx]), proto.query_labels, lab[idx])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", action="append", required=True, help="NAME=PATH of a feature store over all images")
    ap.add_argument("--weights", default="1:1", help="ensemble weights of the first two stores, comma-separated")
    ap.add_argument("--small", type=int, default=1500, help="gallery size of the @N columns (0: skip)")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    stores = {}
    for spec in args.store:
        name, path = spec.split("=", 1)
        s = read_store(path)
        stores[name] = (list(s.names), np.asarray(s.features, np.float32))
    names = next(iter(stores.values()))[0]
    if any(v[0] != names for v in stores.values()):
        raise SystemExit("the stores must list the same images in the same order")
    sets = {k: v[1] for k, v in stores.items()}
    if len(stores) >= 2 and args.weights:
        (a, fa), (b, fb) = list(sets.items())[:2]
        for wspec in args.weights.split(","):
            wa, wb = (float(t) for t in wspec.split(":"))
            sets[f"{a}⊕{b} {wspec}"] = l2n(np.concatenate([wa * l2n(fa), wb * l2n(fb)], axis=1))
    protos = P.protocols()
    cols = [p.name for p in protos] + ([f"{p.name}@{args.small}" for p in protos] if args.small else [])
    results = {}
    t0 = time.time()
    for fname, F in sets.items():
        res = {}
        for proto in protos:
            q, g = P.features_for(names, F, proto)
            res[proto.name], chosen = evaluate(proto, q, g)
            res[proto.name + " chosen"] = chosen
            if args.small:
                runs = [evaluate(sp, *P.features_for(names, F, sp))[0] for sp in
                        (sub(proto, args.small, seed) for seed in range(args.draws))]
                res[f"{proto.name}@{args.small}"] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
                res[f"{proto.name}@{args.small} worst Δ default"] = float(min(r["default"] - r["none"] for r in runs))
        results[fname] = res
        print(f"\n### {fname} (dim {F.shape[1]})  [{time.time() - t0:.0f} s]", flush=True)
        print("| whitening | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for v in VARIANTS:
            cells = []
            for c in cols:
                x = res[c].get(v)
                cells.append("—" if x is None else (f"{x:.4f}" if v == "none" else f"{x:.4f} ({x - res[c]['none']:+.4f})"))
            print(f"| {v} | " + " | ".join(cells) + " |")
        print("chosen by default (full galleries): " + "; ".join(f"{p.name}: k={res[p.name + ' chosen']['n_components_']}, "
                                                                   f"s={res[p.name + ' chosen']['shrinkage_']}" for p in protos)
              + ("; worst Δ of default over the draws: " + ", ".join(
                  f"{c} {res[c + ' worst Δ default']:+.4f}" for c in cols if "@" in c) if args.small else ""), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
