"""What a user gets from ``lookalike run`` on both dev protocols: no flags, the gallery's classes,
``--select self`` (tune --self), and the best label-tuned choice of the same candidates.

Runs the real ``lookalike.run`` (gallery and queries as list files of absolute paths; labels CSVs
written to --workdir). Extraction is shared: the default ensemble is extracted once over all 5,704
images (``lookalike.Extractor``, cached) and each run's gallery/query store is seeded from it, so
the runs measure the choices, not the extraction again.

    python benchmarks/defaults.py --workdir /work/bench-feats/defaults
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from protocols import books, grocery, write_listing  # noqa: E402

import lookalike  # noqa: E402
from lookalike import Extractor  # noqa: E402
from lookalike.api import _path_key  # noqa: E402
from lookalike.store import read_store, write_store  # noqa: E402


def _write_list(path: Path, names) -> Path:
    path.write_text("".join(f"{n}\n" for n in names))
    return path


def _write_labels(path: Path, pairs) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        w.writerows(pairs)
    return path


def _seed(store, names, path: Path) -> None:
    if path.exists():
        return
    pos = {n: i for i, n in enumerate(store.names)}
    write_store(path, names, store.features[[pos[n] for n in names]], store.attrs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench-out/defaults")
    ap.add_argument("--features", default=None, help="store of the default ensemble over all images (else extracted)")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ex = Extractor()
    fp = ex.config.fingerprint()
    feats_path = Path(args.features) if args.features else work / f"all-{fp}.h5"
    if not feats_path.exists():
        ex.extract(write_listing(work / "all_images.txt"), feats_path, progress=False)
    allf = read_store(feats_path)
    assert allf.attrs.get("fingerprint") == fp, "the features store is not the default ensemble's"
    results = {}
    for proto in (books(), grocery()):
        d = work / proto.name
        d.mkdir(exist_ok=True)
        gl = _write_list(d / "gallery.txt", proto.gallery)
        ql = _write_list(d / "queries.txt", proto.queries)
        runs = d / "runs"
        runs.mkdir(exist_ok=True)
        _seed(allf, proto.gallery, runs / f"gallery-{_path_key(gl)}-{fp}.h5")
        _seed(allf, proto.queries, runs / f"queries-{_path_key(ql)}-{fp}.h5")
        labels = _write_labels(d / "labels.csv", list(zip(proto.queries, proto.query_labels)) +
                               list(zip(proto.gallery, proto.gallery_labels)))
        variants = {"no flags": {}, "--select self": {"select": "self"}}
        if proto.name == "books":
            refs = [(n, lab) for n, lab in zip(proto.gallery, proto.gallery_labels) if not lab.startswith("grocery_")]
            variants["gallery labels: covers only"] = {"gallery_labels": _write_labels(d / "glabels_refs.csv", refs)}
            variants["gallery labels: covers + distractor classes"] = {
                "gallery_labels": _write_labels(d / "glabels_all.csv", list(zip(proto.gallery, proto.gallery_labels)))}
        else:
            variants["gallery labels (class folders)"] = {
                "gallery_labels": _write_labels(d / "glabels.csv", list(zip(proto.gallery, proto.gallery_labels)))}
        for name, kw in variants.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            out = d / f"res-{len(results)}.csv"
            res = lookalike.run(gl, ql, out, workdir=runs, **kw)
            m = lookalike.evaluate(out, labels, gallery=gl)
            row = {"score": m["digix_score"], "top1": m["top1"], "mAP@10": m["mAP@10"],
                   "choice": res.choice.describe() if res.choice else "defaults",
                   "seconds": time.perf_counter() - t0}
            results[f"{proto.name}: {name}"] = row
            print(f"{proto.name:8s} {name:45s} {row['score']:.3f}  {row['choice']}  ({row['seconds']:.0f} s)", flush=True)
        if not args.only or "label-tuned" in args.only:
            row = label_tuned(proto, allf, fp)
            results[f"{proto.name}: label-tuned (best of the same candidates on the dev queries)"] = row
            print(f"{proto.name:8s} {'label-tuned':45s} {row['score']:.3f}  {row['choice']}", flush=True)
    (work / "defaults.json").write_text(json.dumps(results, indent=2))


def label_tuned(proto, allf, fp) -> dict:
    """The best of the candidates `run` chooses from, picked with the dev queries' labels (an oracle:
    what label tuning on these very queries would reach)."""
    from lookalike.postprocess import PCAWhitening, knn, rerank
    from lookalike.selection import combine, default_chains, split_members, weight_grid

    dims = [m["dim"] for m in json.loads(allf.attrs["members"])]
    pos = {n: i for i, n in enumerate(allf.names)}
    gm = split_members(allf.features[[pos[n] for n in proto.gallery]], dims)
    qm = split_members(allf.features[[pos[n] for n in proto.queries]], dims)
    best = (-1.0, None)
    for ws in weight_grid(len(dims)):
        g, q = combine(gm, ws), combine(qm, ws)
        w = PCAWhitening().fit(g)
        for wh in (False, True):
            gg, qq = (w.transform(g), w.transform(q)) if wh else (g, q)
            for chain in default_chains():
                ids = (rerank(qq, gg, 10, chain) if chain else knn(qq, gg, 10))[1]
                s = proto.score(ids)["digix_score"]
                if s > best[0]:
                    best = (s, f"weights {','.join(f'{x:g}' for x in ws)}, whitening {'on' if wh else 'off'}, "
                               f"re-ranking {','.join(chain.steps) if chain else 'none'}")
    return {"score": best[0], "choice": best[1]}


if __name__ == "__main__":
    main()
