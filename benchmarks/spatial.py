"""Spatial verification on the two dev protocols (``protocols.py``): no spatial vs the previous
implementation (inlier count replaces the score) vs the current one (inlier bonus fused with the
global similarity), for several global feature sets, plus the time per query of old vs new measured
in the same run, interleaved query by query, one thread each.

    python benchmarks/spatial.py --features lite0=/work/bench-feats/lite0-spoc-224.h5 \
        --features sscd=/work/bench-feats/sscd.h5 --ensemble lite0:1+sscd:1 --grocery-every 5

``--ensemble A:WA+B:WB`` simulates the project's ensemble feature: the members' stores, each
L2-normalised and multiplied by its weight, concatenated, normalised. Inlier counts are memoised per (query, gallery
image) and configuration in ``--workdir`` (re-runs only add what is missing); local features are
cached there too. ``--grocery-every K`` takes every K-th grocery query (1 = all 2,485).
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one thread for numpy's BLAS (fair timing, shared machine)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocols import Protocol, books, features_for, grocery  # noqa: E402

from lookalike.postprocess import knn  # noqa: E402
from lookalike.spatial import (LocalFeatures, SpatialConfig, _cv2, rerank_with_inliers,  # noqa: E402
                               verify_candidates)
from lookalike.store import read_store  # noqa: E402

# ---------------------------------------------------------------- the previous implementation (baseline)


class Legacy:
    """lookalike's spatial verification before the fusion rewrite: SIFT 1000 @ 512 px, brute-force
    kNN matching with the ratio test (0.8), RANSAC (8 px); verified (>= 12 inliers) candidates go
    first by inlier count, the rest keep their order."""

    top_n, n_features, max_side, ratio, min_inliers, thr = 20, 1000, 512, 0.8, 12, 8.0

    def __init__(self, cache_dir: Path):
        cv2 = _cv2()
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.sift = cv2.SIFT_create(nfeatures=self.n_features)
        self.matcher = cv2.BFMatcher(cv2.NORM_L2)
        self.memory: dict = {}

    def get(self, path: str):
        if path in self.memory:
            return self.memory[path]
        f = self.cache_dir / (hashlib.sha256(path.encode()).hexdigest()[:24] + ".npz")
        if f.exists():
            with np.load(f) as z:
                out = z["xy"], z["desc"]
        else:
            out = self._compute(path)
            np.savez(f, xy=out[0], desc=out[1])
        self.memory[path] = out
        return out

    def _compute(self, path: str):
        from lookalike.data import BadImage, load_image

        cv2 = _cv2()
        try:
            img = load_image(path, min_side=self.max_side)
        except BadImage:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
        s = min(1.0, self.max_side / max(img.size))
        if s < 1:
            img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))))
        kps, desc = self.sift.detectAndCompute(cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2GRAY), None)
        if desc is None or not kps:
            return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
        return np.array([k.pt for k in kps], np.float32), desc

    def inliers(self, a, b) -> int:
        cv2 = _cv2()
        (xa, da), (xb, db) = a, b
        if len(da) < 2 or len(db) < 2:
            return 0
        good = [m for m, n in (p for p in self.matcher.knnMatch(da, db, k=2) if len(p) == 2) if m.distance < self.ratio * n.distance]
        if len(good) < 4:
            return 0
        _, mask = cv2.findHomography(xa[[m.queryIdx for m in good]], xb[[m.trainIdx for m in good]], cv2.RANSAC, self.thr)
        return int(mask.sum()) if mask is not None else 0

    def verify_candidates(self, qpath, gallery, row_ids) -> np.ndarray:
        q = self.get(qpath)
        return np.array([self.inliers(q, self.get(gallery[j])) for j in row_ids], np.int32)

    def rerank(self, scores, ids, inl):
        scores, ids, inl = scores.copy(), ids.copy(), inl.copy()
        n = min(self.top_n, ids.shape[1])
        for qi in range(len(ids)):
            c = inl[qi, :n]
            v = c >= self.min_inliers
            order = np.concatenate([np.flatnonzero(v)[np.argsort(-c[v], kind="stable")], np.flatnonzero(~v)])
            ids[qi, :n], inl[qi, :n] = ids[qi, :n][order], c[order]
            scores[qi, :n] = np.where(v, 1.0 + c, scores[qi, :n])[order]
        return scores, ids, inl


# ---------------------------------------------------------------- helpers


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def load_features(specs: list[str], ensembles: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    names, feats = None, {}
    for spec in specs:
        label, path = spec.split("=", 1)
        s = read_store(path)
        if names is None:
            names = list(s.names)
        elif list(s.names) != names:  # align on the first store's order
            pos = {n: i for i, n in enumerate(s.names)}
            s_feats = s.features[[pos[n] for n in names]]
            feats[label] = _unit(np.asarray(s_feats, np.float32))
            continue
        feats[label] = _unit(np.asarray(s.features, np.float32))
    for spec in ensembles:  # "a:wa+b:wb": weighted L2-normalised members, concatenated, normalised
        parts = [m.split(":") for m in spec.split("+")]
        feats[spec] = _unit(np.hstack([float(w) * feats[m] for m, w in parts]))
    return names, feats


def subset(p: Protocol, rows: np.ndarray) -> Protocol:
    return Protocol(p.name, [p.queries[i] for i in rows], p.gallery, p.query_labels[rows], p.gallery_labels)


def config_key(cfg) -> str:
    if isinstance(cfg, SpatialConfig):  # fusion-only fields do not change the inlier counts
        d = {k: v for k, v in asdict(cfg).items() if k not in ("top_n", "bonus", "saturation", "min_inliers")}
    else:
        d = {"legacy": 1}
    return hashlib.sha256(repr(sorted(d.items())).encode()).hexdigest()[:12]


class Memo:
    """Inlier counts per (query path, gallery path), persisted per configuration."""

    def __init__(self, workdir: Path, cfg):
        self.path = workdir / f"inliers-{config_key(cfg)}.pkl"
        self.data: dict = pickle.loads(self.path.read_bytes()) if self.path.exists() else {}

    def save(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self.data))
        tmp.replace(self.path)


def inliers_for(p: Protocol, ids: np.ndarray, n: int, memo: Memo, compute) -> np.ndarray:
    """(nq, ids.shape[1]) inliers of the first n candidates (memoised), zeros after."""
    out = np.zeros(ids.shape, np.int32)
    dirty = 0
    for qi, q in enumerate(p.queries):
        todo = [k for k in range(n) if (q, p.gallery[ids[qi, k]]) not in memo.data]
        if todo:
            got = compute(q, p.gallery, ids[qi, todo])
            for k, v in zip(todo, got):
                memo.data[(q, p.gallery[ids[qi, k]])] = int(v)
            dirty += 1
            if dirty % 200 == 0:
                memo.save()
        out[qi, :n] = [memo.data[(q, p.gallery[ids[qi, k]])] for k in range(n)]
    if dirty:
        memo.save()
    return out


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", action="append", default=[], help="LABEL=STORE.h5 over protocols.all_images()")
    ap.add_argument("--ensemble", action="append", default=[], help="A:WA+B:WB, simulated in numpy (see above)")
    ap.add_argument("--workdir", default="bench-out/spatial")
    ap.add_argument("--grocery-every", type=int, default=5, help="every K-th grocery query (1 = all)")
    ap.add_argument("--old-grocery-every", type=int, default=0, help="old spatial on every K-th grocery query (default: --grocery-every)")
    ap.add_argument("--variants", action="store_true", help="also a few geometry/fusion variants")
    ap.add_argument("--time-queries", type=int, default=10, help="queries per protocol for the timing (0 = skip)")
    ap.add_argument("--no-old", action="store_true", help="skip the old implementation's scores")
    ap.add_argument("--time-only", action="store_true", help="only the timing")
    args = ap.parse_args()
    _cv2().setNumThreads(1)
    if not args.features:
        ap.error("give at least one --features LABEL=STORE.h5")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    names, feats = load_features(args.features, args.ensemble)
    default = SpatialConfig()
    variants: dict[str, SpatialConfig] = {}
    if args.variants:
        variants = {
            "bonus 0.15": replace(default, bonus=0.15),
            "bonus 0.5": replace(default, bonus=0.5),
            "no mirror": replace(default, mirror=False),
            "no geometry checks": replace(default, max_scale=1e9, max_anisotropy=1e9, max_perspective=1e9, min_spread=0.0),
            "orb": replace(default, method="orb"),
        }
        if args.grocery_every > 1:  # 2.5x the pairs: dev subsets only
            variants["top_n 50"] = replace(default, top_n=50)
    lf_cache = work / "local-features"
    legacy = Legacy(work / "legacy-features")
    protos = [books(), grocery()]
    rows_by_proto = {"books": np.arange(len(protos[0].queries)),
                     "grocery": np.arange(0, len(protos[1].queries), args.grocery_every)}
    old_every = args.old_grocery_every or args.grocery_every
    results = []
    for proto in protos if not args.time_only else []:
        rows = rows_by_proto[proto.name]
        sub = subset(proto, rows)
        old_rows = rows if proto.name == "books" else np.arange(0, len(proto.queries), old_every)
        for label, F in feats.items():
            q, g = features_for(names, F, proto)
            need = max([10, default.top_n] + [v.top_n for v in variants.values()])
            sc, ids = knn(q[rows], g, need)
            res = {"features": label, "protocol": proto.name, "queries": len(rows), "none": sub.score(ids)["digix_score"]}
            for vname, cfg in [("new", default)] + list(variants.items()):
                # counts down to 4 inliers: any min_inliers >= 4 then gives what the config itself would
                probe = replace(cfg, min_inliers=4, saturation=max(4, cfg.saturation))
                memo = Memo(work, probe)
                lf = LocalFeatures(probe, cache_dir=lf_cache)
                inl = inliers_for(sub, ids, cfg.top_n, memo,
                                  lambda qp, gal, rid, c=probe, lf=lf: verify_candidates(qp, gal, rid, c, lf))
                res[vname] = sub.score(rerank_with_inliers(sc, ids, inl, cfg)[1])["digix_score"]
            if not args.no_old:
                osub = subset(proto, old_rows)
                osc, oids = knn(q[old_rows], g, max(10, legacy.top_n))
                inl = inliers_for(osub, oids, legacy.top_n, Memo(work, "legacy"), legacy.verify_candidates)
                res["old"] = osub.score(legacy.rerank(osc, oids, inl)[1])["digix_score"]
                res["old_queries"] = len(old_rows)
                res["none_old_rows"] = osub.score(oids)["digix_score"]
            results.append(res)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}, flush=True)
    timing = time_old_vs_new(protos, names, feats[next(iter(feats))], args.time_queries, default) if args.time_queries else None
    report(results, list(variants), timing, args)


def time_old_vs_new(protos, names, F, n_queries, cfg):
    """Seconds per query of old vs new spatial re-ranking of the top-20, interleaved query by query,
    in three cache states: ``cold`` (empty local-feature caches: extracting the query's and its
    candidates' features is included), ``query only`` (the gallery's local features are cached, the
    query's are not: a new query against an indexed gallery) and ``warm`` (everything on disk, fresh
    in-memory caches: a repeated search)."""
    out = {}
    plan = []
    for proto in protos:
        q, g = features_for(names, F, proto)
        rows = np.linspace(0, len(proto.queries) - 1, n_queries).astype(int)
        sc, ids = knn(q[rows], g, cfg.top_n)
        plan += [(proto.queries[r], proto.gallery, sc[k:k + 1], ids[k:k + 1]) for k, r in enumerate(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for phase in ("cold", "query only", "warm"):
            d = tmp / ("cold" if phase == "cold" else "steady")
            legacy, lf = Legacy(d / "old"), LocalFeatures(cfg, cache_dir=d / "new")
            if phase == "query only":  # untimed: the candidates' features only
                for _, gallery, _, ids in plan:
                    for j in ids[0, :cfg.top_n]:
                        legacy.get(gallery[j]), lf.get(gallery[j])
                legacy, lf = Legacy(d / "old"), LocalFeatures(cfg, cache_dir=d / "new")
            t_old = t_new = 0.0
            for qp, gallery, sc, ids in plan:
                t = time.perf_counter()
                legacy.rerank(sc, ids, legacy.verify_candidates(qp, gallery, ids[0, :legacy.top_n])[None])
                t_old += time.perf_counter() - t
                t = time.perf_counter()
                inl = np.zeros(ids.shape, np.int32)
                inl[0, :cfg.top_n] = verify_candidates(qp, gallery, ids[0, :cfg.top_n], cfg, lf)
                rerank_with_inliers(sc, ids, inl, cfg)
                t_new += time.perf_counter() - t
            out[phase] = (t_old / len(plan), t_new / len(plan), len(plan))
    return out


def report(results, variants, timing, args):
    cols = ["none", "old", "new"] + variants
    print("\n| features | protocol | queries | no spatial | old spatial | **new (defaults)** |" + "".join(f" {v} |" for v in variants))
    print("|---|---|---|---|---|---|" + "---|" * len(variants))
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            cell = "–" if v is None else f"{v:.4f}"
            if c == "old" and v is not None and r["old_queries"] != r["queries"]:
                cell += f" ({r['old_queries']} q; none {r['none_old_rows']:.4f})"
            cells.append(f"**{cell}**" if c == "new" else cell)
        print(f"| {r['features']} | {r['protocol']} | {r['queries']} | " + " | ".join(cells) + " |")
    if timing:
        print("\n| local-feature cache (timing: same run, interleaved, 1 thread) | queries | old s/query | new s/query | speed-up |")
        print("|---|---|---|---|---|")
        for phase, (o, n, nq) in timing.items():
            print(f"| {phase} | {nq} | {o:.3f} | {n:.3f} | {o / n:.1f}× |")
    cfg = SpatialConfig()
    print(f"\nnew defaults: {cfg}")
    print("command: python benchmarks/spatial.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
